"""From inside a real sandbox, as an attacker would try: nothing but the sandbox's own
gateway endpoint answers.

The command in a sandbox still runs as root in its network namespace (process
isolation is a separate layer), so the attacker here may also rewrite its own routes
and delete its in-namespace table: the host's table must hold on its own.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import textwrap
import time

import pytest

from tests.integration.conftest import sandbox_python, tcp_listener

pytestmark = pytest.mark.root

# Attacker code: try each (addr, port) with a short timeout; report what happened.
PROBE = textwrap.dedent(
    """
    import json, socket, sys
    targets = json.loads(sys.argv[1]) if len(sys.argv) > 1 else TARGETS
    out = {}
    for addr, port in targets:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(1.0)
        try:
            s.connect((addr, port))
            out[f"{addr}:{port}"] = "connected:" + s.recv(2).decode()
        except TimeoutError:
            out[f"{addr}:{port}"] = "timeout"
        except OSError as e:
            out[f"{addr}:{port}"] = f"error:{e.errno}"
        finally:
            s.close()
    print(json.dumps(out))
    """
)

ENETUNREACH = 101


def probe(sandbox, targets, prelude: str = "") -> dict:
    code = f"TARGETS = {json.dumps(targets)}\n{prelude}\n{PROBE}"
    return sandbox_python(sandbox, code)


def attacker_opens_routes(sandbox) -> str:
    """Prelude that, as root in the netns, adds a default route and drops the in-netns table."""
    gw = sandbox.gateway[0]
    return textwrap.dedent(
        f"""
        import subprocess
        subprocess.run(["ip", "route", "replace", "default", "via", "{gw}"], check=True)
        subprocess.run(["nft", "delete", "table", "inet", "sandgate"], check=True)
        """
    )


def test_only_own_gateway_endpoint_answers(make_sandbox):
    a = make_sandbox()
    gw, port = a.gateway
    with tcp_listener(str(gw), port) as own:
        result = probe(a, [[str(gw), port]])
    assert result == {f"{gw}:{port}": "connected:hi"}
    assert len(own.accepted) == 1
    assert own.accepted[0][0] == str(a.network.address.sandbox)


def test_upstream_is_unreachable_even_with_a_default_route(make_sandbox, upstream):
    a = make_sandbox()
    with tcp_listener(str(upstream.addr), 8080, netns=upstream.netns) as up:
        plain = probe(a, [[str(upstream.addr), 8080]])
        # No route at all: the kernel in the sandbox refuses at once.
        assert plain == {f"{upstream.addr}:8080": f"error:{ENETUNREACH}"}
        # Root in the sandbox adds a default route and drops its own table: the host
        # still routes nothing (no forwarding, forward chain drops sg*).
        forced = probe(a, [[str(upstream.addr), 8080]], attacker_opens_routes(a))
        assert not forced[f"{upstream.addr}:8080"].startswith("connected"), forced
    assert up.accepted == []


def test_other_sandbox_and_its_gateway_are_unreachable(make_sandbox):
    a, b = make_sandbox(), make_sandbox()
    b_gw, port = b.gateway
    b_addr = b.network.address.sandbox
    with (
        tcp_listener(str(b_gw), port) as b_endpoint,
        tcp_listener(str(b_addr), 9000, netns=b.network.netns) as b_service,
    ):
        targets = [[str(b_gw), port], [str(b_addr), 9000]]
        plain = probe(a, targets)
        assert set(plain.values()) == {f"error:{ENETUNREACH}"}
        forced = probe(a, targets, attacker_opens_routes(a))
        assert not any(v.startswith("connected") for v in forced.values()), forced
    assert b_endpoint.accepted == [] and b_service.accepted == []


def test_host_service_on_all_addresses_is_unreachable(make_sandbox):
    a = make_sandbox()
    gw, _port = a.gateway
    with tcp_listener("0.0.0.0") as host_service:
        target = [[str(gw), host_service.port]]
        # Blocked by the in-netns table first, and by the host table when that is gone.
        assert probe(a, target) == {f"{gw}:{host_service.port}": "timeout"}
        forced = probe(a, target, attacker_opens_routes(a))
        assert forced == {f"{gw}:{host_service.port}": "timeout"}
        # 127.0.0.1 in the sandbox is its own loopback, not the host's.
        local = probe(a, [["127.0.0.1", host_service.port]])
        assert not local[f"127.0.0.1:{host_service.port}"].startswith("connected"), local
    assert host_service.accepted == []


def test_spoofed_source_gets_nothing_through(make_sandbox):
    """Raw SYNs from the sandbox to its own gateway endpoint, one with its real source
    and one with a forged one; a probe table behind sandgate's input chain counts what
    got past it."""
    a, b = make_sandbox(), make_sandbox()
    gw, port = a.gateway
    real, forged = str(a.network.address.sandbox), str(b.network.address.sandbox)
    probe_table = f"sgtest_probe{secrets.token_hex(3)}"
    ruleset = {
        "nftables": [
            {"table": {"family": "inet", "name": probe_table}},
            {
                "chain": {
                    "family": "inet",
                    "table": probe_table,
                    "name": "input",
                    "type": "filter",
                    "hook": "input",
                    "prio": -5,
                    "policy": "accept",
                }
            },
        ]
        + [
            {
                "rule": {
                    "family": "inet",
                    "table": probe_table,
                    "chain": "input",
                    "comment": src,
                    "expr": [
                        {
                            "match": {
                                "op": "==",
                                "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                                "right": src,
                            }
                        },
                        {
                            "match": {
                                "op": "==",
                                "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                                "right": port,
                            }
                        },
                        {"counter": {"packets": 0, "bytes": 0}},
                    ],
                }
            }
            for src in (real, forged)
        ]
    }
    subprocess.run(["nft", "-j", "-f", "-"], input=json.dumps(ruleset), text=True, check=True)
    try:
        send = textwrap.dedent(
            f"""
            import json, socket, struct
            def csum(b):
                if len(b) % 2: b += b"\\0"
                s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
                s = (s >> 16) + (s & 0xffff); s += s >> 16
                return ~s & 0xffff
            def syn(src, dst, sport, dport):
                tcp = struct.pack("!HHLLBBHHH", sport, dport, 1, 0, 5 << 4, 0x02, 64240, 0, 0)
                pseudo = socket.inet_aton(src) + socket.inet_aton(dst)
                pseudo += struct.pack("!BBH", 0, 6, len(tcp))
                tcp = tcp[:16] + struct.pack("!H", csum(pseudo + tcp)) + tcp[18:]
                ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0, 64, 6, 0,
                                 socket.inet_aton(src), socket.inet_aton(dst))
                ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
                return ip + tcp
            # Root in the sandbox first removes its own table, so only the host guards.
            import subprocess
            subprocess.run(["nft", "delete", "table", "inet", "sandgate"], check=True)
            s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            for src in ({real!r}, {forged!r}):
                for i in range(3):
                    s.sendto(syn(src, {str(gw)!r}, 40000 + i, {port}), ({str(gw)!r}, 0))
            print(json.dumps("sent"))
            """
        )
        assert sandbox_python(a, send) == "sent"
        time.sleep(0.2)
        listed = subprocess.run(
            ["nft", "-j", "list", "table", "inet", probe_table],
            capture_output=True,
            text=True,
            check=True,
        )
        counts = {}
        for entry in json.loads(listed.stdout)["nftables"]:
            rule = entry.get("rule")
            if rule:
                counts[rule["comment"]] = next(
                    e["counter"]["packets"] for e in rule["expr"] if "counter" in e
                )
        assert counts[real] == 3, f"the real source must pass (control): {counts}"
        assert counts[forged] == 0, f"a forged source got through: {counts}"
    finally:
        subprocess.run(["nft", "delete", "table", "inet", probe_table], check=False)


def test_ipv6_has_no_route(make_sandbox):
    a = make_sandbox()
    code = textwrap.dedent(
        """
        import json, socket
        out = {"disable_ipv6": open("/proc/sys/net/ipv6/conf/all/disable_ipv6").read().strip()}
        for dst in ("fd00::1", "2001:db8::1", "::1"):
            try:
                s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
                s.settimeout(1)
                s.connect((dst, 3128))
                out[dst] = "connected"
            except OSError as e:
                out[dst] = f"error:{e.errno}"
        print(json.dumps(out))
        """
    )
    result = sandbox_python(a, code)
    assert result.pop("disable_ipv6") == "1"
    for dst, outcome in result.items():
        assert outcome.startswith("error:"), (dst, outcome)
