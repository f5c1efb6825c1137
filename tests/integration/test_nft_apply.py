"""nft/apply.py against the real kernel, always inside scratch network namespaces: the host
namespace's `inet sandgate` table belongs to whoever else is running sandgate here.

Removing a scratch netns removes every table in it, so nothing outlives a test.
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address
from typing import TypeVar

import pytest

from nft import apply, ruleset
from nft.apply import Nft, NftDrift, NftError
from nft.ruleset import SandboxElements
from tests.nsutil import netns_exec, run_in_netns, scratch_netns

pytestmark = pytest.mark.root

T = TypeVar("T")


def nft_in(ns: str, fn: Callable[[Nft], T]) -> T:
    """Run fn with an Nft made inside ns (libnftables binds to the creating thread's netns)."""
    return run_in_netns(ns, lambda: fn(Nft()))


def nft_cli(ns: str, command: str, json_output: bool = False) -> str:
    """One nft command line (as typed after `nft`), run inside ns."""
    argv = ["nft", "-j", command] if json_output else ["nft", command]
    return netns_exec(ns, argv, capture_output=True, text=True, check=True).stdout


def rule_handle(ns: str, chain: str, comment: str, table: str = "sandgate") -> int:
    listing = json.loads(nft_cli(ns, f"list chain inet {table} {chain}", json_output=True))
    for obj in listing["nftables"]:
        if obj.get("rule", {}).get("comment") == comment:
            return obj["rule"]["handle"]
    raise AssertionError(f"no rule {comment!r} in chain {chain}")


def sandbox(i: int, port: int = 3128) -> SandboxElements:
    base = int(IPv4Address("10.213.0.0")) + 2 * i
    return SandboxElements(f"sg{i:06x}", IPv4Address(base + 1), IPv4Address(base), port)


@pytest.fixture
def ns() -> Iterator[str]:
    with scratch_netns() as name:
        yield name


# --- the host table -----------------------------------------------------------------------


def test_ensure_creates_then_verifies(ns):
    assert nft_in(ns, apply.ensure_host_table) is True
    assert nft_in(ns, apply.ensure_host_table) is False
    nft_in(ns, apply.verify_host_table)
    text = nft_cli(ns, "list table inet sandgate")
    assert "iifname . ip saddr != @sandbox_src drop" in text
    assert "type filter hook input priority filter - 10; policy accept;" in text
    assert nft_cli(ns, "list tables").split("\n") == ["table inet sandgate", ""]


def test_table_is_none_when_absent(ns):
    assert nft_in(ns, lambda n: n.table()) is None
    nft_in(ns, apply.ensure_host_table)
    listing = nft_in(ns, lambda n: n.table())
    assert listing is not None
    tables = [obj["table"] for obj in listing["nftables"] if "table" in obj]
    assert [(t["family"], t["name"]) for t in tables] == [("inet", "sandgate")]


def test_run_names_what_failed(ns):
    with pytest.raises(NftError, match=r"delete table inet nosuch failed: .*No such file"):
        nft_in(ns, lambda n: n.run(ruleset.delete_table("nosuch")))


def test_deleted_rule_is_drift_naming_the_rule(ns):
    nft_in(ns, apply.ensure_host_table)
    handle = rule_handle(ns, "from_sandbox", "sandgate: spoofed source")
    nft_cli(ns, f"delete rule inet sandgate from_sandbox handle {handle}")
    with pytest.raises(NftDrift, match=r"drifted: chain from_sandbox: rule 'sandgate: spoofed "):
        nft_in(ns, apply.verify_host_table)
    with pytest.raises(NftDrift, match="spoofed source"):
        nft_in(ns, apply.ensure_host_table)


def test_foreign_rule_chain_and_policy_are_drift(ns):
    nft_in(ns, apply.ensure_host_table)
    nft_cli(ns, "insert rule inet sandgate from_sandbox tcp dport 22 accept")
    nft_cli(ns, "add chain inet sandgate extra")
    nft_cli(ns, "add chain inet sandgate forward { policy drop ; }")
    with pytest.raises(NftDrift) as caught:
        nft_in(ns, apply.verify_host_table)
    message = str(caught.value)
    assert "chain from_sandbox: unexpected rule without comment" in message
    assert "unexpected chain extra" in message
    assert "chain forward is" in message and "'policy': 'drop'" in message


def test_handles_and_counters_are_not_drift(ns):
    nft_in(ns, apply.ensure_host_table)
    handle = rule_handle(ns, "from_sandbox", "sandgate: everything else")
    nft_cli(
        ns,
        f"replace rule inet sandgate from_sandbox handle {handle} "
        'counter drop comment "sandgate: everything else"',
    )
    assert "counter packets 0 bytes 0 drop" in nft_cli(ns, "list chain inet sandgate from_sandbox")
    nft_in(ns, apply.verify_host_table)


def test_restore_repairs_drift_and_keeps_elements(ns):
    nft_in(ns, apply.ensure_host_table)
    nft_in(ns, lambda n: apply.add_sandbox(n, sandbox(1)))
    handle = rule_handle(ns, "input", "sandgate: traffic from sandboxes")
    nft_cli(ns, f"delete rule inet sandgate input handle {handle}")
    nft_cli(ns, "add chain inet sandgate extra")
    nft_cli(ns, "add rule inet sandgate extra jump from_sandbox")
    nft_cli(ns, "add set inet sandgate foreign { type ipv4_addr ; }")
    with pytest.raises(NftDrift):
        nft_in(ns, apply.verify_host_table)
    nft_in(ns, apply.restore_host_table)
    nft_in(ns, apply.verify_host_table)
    assert nft_in(ns, apply.sandbox_elements) == [sandbox(1)]


def test_restore_refuses_a_set_of_another_type(ns):
    nft_in(ns, apply.ensure_host_table)
    nft_cli(ns, "flush chain inet sandgate from_sandbox")
    nft_cli(ns, "delete set inet sandgate gateway_ep")
    nft_cli(ns, "add set inet sandgate gateway_ep { type ipv4_addr ; }")
    with pytest.raises(NftDrift, match=r"set gateway_ep .* cannot be repaired in place"):
        nft_in(ns, apply.restore_host_table)


def test_restore_creates_a_missing_table(ns):
    nft_in(ns, apply.restore_host_table)
    nft_in(ns, apply.verify_host_table)


# --- per-sandbox elements -----------------------------------------------------------------


def test_elements_round_trip(ns):
    nft_in(ns, apply.ensure_host_table)
    boxes = [sandbox(3), sandbox(1), sandbox(2, port=8080)]
    for box in boxes:
        nft_in(ns, lambda n, box=box: apply.add_sandbox(n, box))
    nft_in(ns, lambda n: apply.add_sandbox(n, sandbox(1)))  # adding twice is harmless
    assert nft_in(ns, apply.sandbox_elements) == sorted(boxes, key=lambda b: b.host_ifname)
    nft_in(ns, lambda n: apply.delete_sandbox(n, sandbox(1)))
    nft_in(ns, lambda n: apply.delete_sandbox(n, sandbox(1)))  # idempotent
    assert nft_in(ns, apply.sandbox_elements) == [sandbox(2, port=8080), sandbox(3)]
    nft_in(ns, apply.verify_host_table)  # elements are not drift


def test_sandbox_elements_ignores_unpartnered_elements(ns):
    nft_in(ns, apply.ensure_host_table)
    nft_in(ns, lambda n: apply.add_sandbox(n, sandbox(1)))
    nft_cli(ns, 'add element inet sandgate sandbox_src { "sg000009" . 10.213.9.9 }')
    assert nft_in(ns, apply.sandbox_elements) == [sandbox(1)]


def test_add_sandbox_without_table_says_so(ns):
    with pytest.raises(NftError, match="ensure_host_table"):
        nft_in(ns, lambda n: apply.add_sandbox(n, sandbox(1)))


def test_delete_sandbox_tolerates_missing_table_and_set(ns):
    nft_in(ns, lambda n: apply.delete_sandbox(n, sandbox(1)))  # no table at all
    nft_in(ns, apply.ensure_host_table)
    nft_in(ns, lambda n: apply.add_sandbox(n, sandbox(1)))
    nft_cli(ns, "flush chain inet sandgate from_sandbox")
    nft_cli(ns, "delete set inet sandgate gateway_ep")
    nft_in(ns, lambda n: apply.delete_sandbox(n, sandbox(1)))
    assert "elements" not in nft_cli(ns, "list set inet sandgate sandbox_src")


def test_thousand_sandboxes_are_only_elements(ns):
    nft_in(ns, apply.ensure_host_table)
    batch = [cmd for i in range(1000) for cmd in ruleset.add_sandbox(sandbox(i))["nftables"]]
    nft_in(ns, lambda n: n.run({"nftables": batch}))
    nft_in(ns, lambda n: apply.add_sandbox(n, sandbox(1000)))
    assert len(nft_in(ns, apply.sandbox_elements)) == 1001
    nft_in(ns, apply.verify_host_table)  # still the same five chains' worth of rules


def test_delete_host_table_only_when_unused(ns):
    assert nft_in(ns, apply.delete_host_table_if_unused) is False  # absent
    nft_in(ns, apply.ensure_host_table)
    nft_in(ns, lambda n: apply.add_sandbox(n, sandbox(1)))
    assert nft_in(ns, apply.delete_host_table_if_unused) is False
    assert nft_in(ns, lambda n: n.table()) is not None
    nft_in(ns, lambda n: apply.delete_sandbox(n, sandbox(1)))
    assert nft_in(ns, apply.delete_host_table_if_unused) is True
    assert nft_in(ns, lambda n: n.table()) is None


# --- the table inside a sandbox -----------------------------------------------------------


def test_apply_sandbox_table_creates_verifies_and_detects_drift(ns):
    gw = IPv4Address("10.213.0.0")
    nft_in(ns, lambda n: apply.apply_sandbox_table(n, gw, 3128))
    nft_in(ns, lambda n: apply.apply_sandbox_table(n, gw, 3128))  # idempotent
    text = nft_cli(ns, "list table inet sandgate")
    assert 'oifname "eth0" ip daddr 10.213.0.0 tcp dport 3128 accept' in text
    assert text.count("policy drop;") == 2
    with pytest.raises(NftDrift, match="gateway endpoint"):
        nft_in(ns, lambda n: apply.apply_sandbox_table(n, gw, 8080))


# --- traffic ------------------------------------------------------------------------------

HOST_ADDR = IPv4Address("10.213.250.0")
BOX_ADDR = IPv4Address("10.213.250.1")
SPOOF_ADDR = IPv4Address("10.213.250.77")
ENDPOINT_PORT = 3128
OTHER_PORT = 3129


@pytest.fixture
def veth_pair() -> Iterator[tuple[str, str, str]]:
    """A "host" netns and a "sandbox" netns joined by sgt<hex> <-> eth0, like the runner's.

    The sandbox netns has a second address, and the host a route back to it, so that a
    connection from it succeeds unless something drops it.
    """
    with scratch_netns() as host, scratch_netns() as box:
        ifname = f"sgt{secrets.token_hex(3)}"

        def ip(netns: str, *args: str) -> None:
            subprocess.run(["ip", "-n", netns, *args], check=True)

        ip(host, "link", "add", ifname, "type", "veth", "peer", "name", "eth0", "netns", box)
        ip(host, "addr", "add", f"{HOST_ADDR}/31", "dev", ifname)
        ip(host, "link", "set", ifname, "up")
        ip(host, "route", "add", f"{SPOOF_ADDR}/32", "dev", ifname)
        ip(box, "addr", "add", f"{BOX_ADDR}/31", "dev", "eth0")
        ip(box, "addr", "add", f"{SPOOF_ADDR}/32", "dev", "eth0")
        ip(box, "link", "set", "eth0", "up")
        ip(box, "link", "set", "lo", "up")
        yield host, box, ifname


def listeners(ns: str, addr: IPv4Address, ports: list[int]) -> list[socket.socket]:
    """Listening sockets in ns; the kernel completes handshakes without accept()."""

    def make() -> list[socket.socket]:
        socks = []
        for port in ports:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((str(addr), port))
            s.listen(8)
            socks.append(s)
        return socks

    return run_in_netns(ns, make)


def connects(ns: str, dst: IPv4Address, port: int, src: IPv4Address | None = None) -> bool:
    def attempt() -> bool:
        with socket.socket() as s:
            s.settimeout(0.4)
            if src is not None:
                s.bind((str(src), 0))
            try:
                s.connect((str(dst), port))
            except OSError:
                return False
            return True

    return run_in_netns(ns, attempt)


def test_host_table_drops_spoofed_source_and_allows_only_the_endpoint(veth_pair):
    host, box, ifname = veth_pair
    socks = listeners(host, HOST_ADDR, [ENDPOINT_PORT, OTHER_PORT])
    try:
        # Without the table, all three connections work: any failure below is the table's.
        assert connects(box, HOST_ADDR, ENDPOINT_PORT)
        assert connects(box, HOST_ADDR, OTHER_PORT)
        assert connects(box, HOST_ADDR, ENDPOINT_PORT, src=SPOOF_ADDR)

        nft_in(host, apply.ensure_host_table)
        elements = SandboxElements(ifname, BOX_ADDR, HOST_ADDR, ENDPOINT_PORT)
        nft_in(host, lambda n: apply.add_sandbox(n, elements))

        assert connects(box, HOST_ADDR, ENDPOINT_PORT)
        assert not connects(box, HOST_ADDR, OTHER_PORT)
        assert not connects(box, HOST_ADDR, ENDPOINT_PORT, src=SPOOF_ADDR)

        nft_in(host, lambda n: apply.delete_sandbox(n, elements))
        assert not connects(box, HOST_ADDR, ENDPOINT_PORT)  # no elements: nothing passes
    finally:
        for s in socks:
            s.close()


def test_sandbox_table_allows_only_loopback_and_the_gateway(veth_pair):
    host, box, _ = veth_pair
    host_socks = listeners(host, HOST_ADDR, [ENDPOINT_PORT, OTHER_PORT])
    box_socks = listeners(box, IPv4Address("127.0.0.1"), [OTHER_PORT])
    try:
        nft_in(box, lambda n: apply.apply_sandbox_table(n, HOST_ADDR, ENDPOINT_PORT))
        assert connects(box, HOST_ADDR, ENDPOINT_PORT)
        assert connects(box, IPv4Address("127.0.0.1"), OTHER_PORT)
        assert not connects(box, HOST_ADDR, OTHER_PORT)
    finally:
        for s in host_socks + box_socks:
            s.close()
