"""netns.namespace against the real kernel: a sandbox network is built as documented,
reaches its gateway address and nothing else, and leaves nothing behind.

Addresses come from 10.213.200.0/24 (a corner of the default pool other suites avoid),
still checked against addresses_in_use(). Every test removes what it created.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network

import pytest
from pyroute2 import IPRoute
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from netns import namespace
from netns.addressing import SandboxAddress, allocate, new_sandbox_id
from netns.namespace import NetnsError, SandboxNetwork
from netns.rtnl import IPV4_DEVCONF_IDS, LOOPBACK_IFINDEX, RtnlSocket, parse_ack
from tests.nsutil import scratch_netns

pytestmark = pytest.mark.root

TEST_POOL = IPv4Network("10.213.200.0/24")


# --- helpers ------------------------------------------------------------------------


def fresh() -> tuple[str, SandboxAddress]:
    return (
        new_sandbox_id(namespace.sandbox_ids_present()),
        allocate(TEST_POOL, namespace.addresses_in_use()),
    )


def ip_json(*args: str) -> list[dict]:
    out = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True).stdout
    return json.loads(out) if out.strip() else []


def link_exists(ifname: str) -> bool:
    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=ifname))


def assert_gone(net: SandboxNetwork) -> None:
    assert not os.path.exists(net.netns_path)
    assert not link_exists(net.host_ifname)
    assert net.sandbox_id not in namespace.sandbox_ids_present()
    assert net.address.host not in namespace.addresses_in_use()


def read_sysctl(relpath: str) -> str:
    with open(os.path.join("/proc/sys", relpath)) as f:
        return f.read().strip()


@contextlib.contextmanager
def sandbox_network() -> Iterator[SandboxNetwork]:
    sandbox_id, address = fresh()
    try:
        yield namespace.create_network(sandbox_id, address)
    finally:
        namespace.destroy_network(sandbox_id)


@pytest.fixture
def net() -> Iterator[SandboxNetwork]:
    with sandbox_network() as n:
        yield n


def icmp_echo(dst: IPv4Address, timeout: float = 2.0) -> bool:
    """Send one ICMP echo request on a raw socket; True if the reply comes back."""
    ident = os.getpid() & 0xFFFF

    def checksum(data: bytes) -> int:
        data += b"\0" * (len(data) % 2)
        total = sum(struct.unpack(f"!{len(data) // 2}H", data))
        total = (total >> 16) + (total & 0xFFFF)
        total += total >> 16
        return ~total & 0xFFFF

    header = struct.pack("!BBHHH", 8, 0, 0, ident, 1)
    payload = b"sandgate-ping"
    packet = struct.pack("!BBHHH", 8, 0, checksum(header + payload), ident, 1) + payload
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        s.settimeout(timeout)
        s.sendto(packet, (str(dst), 0))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data, (src, _) = s.recvfrom(2048)
            ihl = (data[0] & 0x0F) * 4
            kind, _code, _sum, rid, _seq = struct.unpack("!BBHHH", data[ihl : ihl + 8])
            if kind == 0 and rid == ident and src == str(dst):
                return True
    return False


def connect_errno(dst: str, port: int) -> int:
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(2.0)
        try:
            s.connect((dst, port))
        except OSError as exc:
            return exc.errno or -1
    return 0


# --- the shape of one sandbox network -----------------------------------------------


def test_create_builds_the_documented_shape(net: SandboxNetwork) -> None:
    addr = net.address
    assert net.netns == f"sg-{net.sandbox_id}" and net.host_ifname == f"sg{net.sandbox_id}"
    assert net.netns_path == f"/run/netns/sg-{net.sandbox_id}"
    assert os.path.exists(net.netns_path)
    assert net.sandbox_id in namespace.sandbox_ids_present()
    assert addr.host in namespace.addresses_in_use()

    # Host end: a veth, up, not enslaved to anything (no bridge), holding only host/31.
    (host,) = ip_json("-d", "addr", "show", "dev", net.host_ifname)
    assert host["linkinfo"]["info_kind"] == "veth"
    assert "master" not in host
    assert (host["num_tx_queues"], host["num_rx_queues"]) == (1, 1)
    assert "UP" in host["flags"]
    assert [(a["family"], a["local"], a["prefixlen"]) for a in host["addr_info"]] == [
        ("inet", str(addr.host), 31)
    ]
    # Host end sysctls (set through netlink; read back through /proc/sys).
    conf4 = f"net/ipv4/conf/{net.host_ifname}"
    assert read_sysctl(f"{conf4}/rp_filter") == "1"
    assert read_sysctl(f"{conf4}/forwarding") == "0"
    assert read_sysctl(f"{conf4}/accept_local") == "0"
    assert read_sysctl(f"{conf4}/route_localnet") == "0"
    assert read_sysctl(f"{conf4}/proxy_arp") == "0"
    assert read_sysctl(f"{conf4}/accept_redirects") == "0"
    assert read_sysctl(f"{conf4}/send_redirects") == "0"
    assert read_sysctl(f"{conf4}/accept_source_route") == "0"
    assert read_sysctl(f"net/ipv6/conf/{net.host_ifname}/disable_ipv6") == "1"
    assert read_sysctl("net/ipv4/ip_forward") == "0"
    # The host's own IPv6 settings are untouched: the netns writes landed in the netns.
    assert read_sysctl("net/ipv6/conf/all/disable_ipv6") == "0"

    # Inside: exactly lo and eth0, both up; eth0 holds sandbox/31; no IPv6 at all.
    links = {link["ifname"]: link for link in ip_json("-n", net.netns, "-d", "addr")}
    assert set(links) == {"lo", "eth0"}
    assert (links["eth0"]["num_tx_queues"], links["eth0"]["num_rx_queues"]) == (1, 1)
    assert "UP" in links["lo"]["flags"] and "UP" in links["eth0"]["flags"]
    assert [(a["family"], a["local"], a["prefixlen"]) for a in links["eth0"]["addr_info"]] == [
        ("inet", str(addr.sandbox), 31)
    ]
    assert all(a["family"] == "inet" for link in links.values() for a in link["addr_info"])

    # Routes inside: the kernel's on-link /31 in main, local-table entries, nothing else.
    routes = ip_json("-n", net.netns, "-4", "route", "show", "table", "all")
    main = [r for r in routes if r.get("table", "main") == "main"]
    assert main == [
        {
            "dst": f"{addr.host}/31",
            "dev": "eth0",
            "protocol": "kernel",
            "scope": "link",
            "prefsrc": str(addr.sandbox),
            "flags": [],
        }
    ]
    others = [r for r in routes if r.get("table", "main") != "main"]
    assert others and all(r["table"] == "local" for r in others)
    assert not any(r["dst"] == "default" for r in routes)
    assert ip_json("-n", net.netns, "-6", "route", "show", "table", "all") == []

    def inside_sysctls() -> dict[str, str]:
        return {
            k: read_sysctl(f"net/ipv6/conf/{k}/disable_ipv6")
            for k in ("all", "default", "lo", "eth0")
        }

    assert namespace.run_in_netns(net.netns, inside_sysctls) == dict.fromkeys(
        ("all", "default", "lo", "eth0"), "1"
    )


def test_destroy_removes_everything_and_is_idempotent() -> None:
    sandbox_id, address = fresh()
    try:
        net = namespace.create_network(sandbox_id, address)
        namespace.destroy_network(sandbox_id)
        assert_gone(net)
        namespace.destroy_network(sandbox_id)  # again: nothing to do, no error
        assert_gone(net)
    finally:
        namespace.destroy_network(sandbox_id)


def test_destroy_of_an_unknown_id_is_a_no_op() -> None:
    namespace.destroy_network(new_sandbox_id(namespace.sandbox_ids_present()))


def test_destroy_removes_a_netns_left_without_its_veth() -> None:
    """A crash between the two steps of create leaves a bare netns: destroy still cleans up."""
    sandbox_id, _ = fresh()
    path = f"/run/netns/sg-{sandbox_id}"
    subprocess.run(["ip", "netns", "add", f"sg-{sandbox_id}"], check=True)
    try:
        assert sandbox_id in namespace.sandbox_ids_present()
        namespace.destroy_network(sandbox_id)
        assert not os.path.exists(path)
    finally:
        namespace.destroy_network(sandbox_id)


# --- failures leave nothing of their own behind -------------------------------------


def test_create_fails_cleanly_when_the_host_ifname_is_taken() -> None:
    sandbox_id, address = fresh()
    ifname = f"sg{sandbox_id}"
    with scratch_netns() as other:
        # Someone else's link with our host-end name (its peer parked in a scratch netns).
        subprocess.run(
            ["ip", "link", "add", ifname, "type", "veth", "peer", "name", "eth0", "netns", other],
            check=True,
        )
        try:
            before = ip_json("link", "show", "dev", ifname)[0]["ifindex"]
            with pytest.raises(NetnsError, match=rf"sandbox {sandbox_id}: create veth {ifname}"):
                namespace.create_network(sandbox_id, address)
            # Our netns is gone; the foreign link is untouched.
            assert not os.path.exists(f"/run/netns/sg-{sandbox_id}")
            assert ip_json("link", "show", "dev", ifname)[0]["ifindex"] == before
            assert address.host not in namespace.addresses_in_use()
        finally:
            subprocess.run(["ip", "link", "del", ifname], check=False)
            namespace.destroy_network(sandbox_id)


def test_create_refuses_an_existing_netns_and_leaves_it_alone() -> None:
    sandbox_id, address = fresh()
    name = f"sg-{sandbox_id}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        with pytest.raises(NetnsError, match="already exists"):
            namespace.create_network(sandbox_id, address)
        assert os.path.exists(f"/run/netns/{name}")
        assert not link_exists(f"sg{sandbox_id}")
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_failure_inside_the_netns_rolls_back_veth_and_netns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(inside: RtnlSocket, address: SandboxAddress) -> None:
        raise OSError(errno.EIO, "injected failure")

    monkeypatch.setattr(namespace, "_configure_sandbox_end", broken)
    sandbox_id, address = fresh()
    try:
        with pytest.raises(NetnsError, match=r"configure eth0 in sg-\w+ .* injected failure"):
            namespace.create_network(sandbox_id, address)
        assert not os.path.exists(f"/run/netns/sg-{sandbox_id}")
        assert not link_exists(f"sg{sandbox_id}")
        assert sandbox_id not in namespace.sandbox_ids_present()
    finally:
        namespace.destroy_network(sandbox_id)


# --- reachability -------------------------------------------------------------------


def test_sandbox_reaches_its_gateway_address_over_tcp_and_icmp(net: SandboxNetwork) -> None:
    gateway = str(net.address.host)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind((gateway, 0))  # the kernel picks a free high port
        listener.listen(1)
        listener.settimeout(5)
        port = listener.getsockname()[1]

        def client() -> bytes:
            with socket.create_connection((gateway, port), timeout=5) as s:
                s.sendall(b"ping")
                return s.recv(4)

        result: dict[str, bytes] = {}
        thread = threading.Thread(
            target=lambda: result.update(reply=namespace.run_in_netns(net.netns, client))
        )
        thread.start()
        try:
            conn, peer = listener.accept()
            with conn:
                assert conn.recv(4) == b"ping"
                conn.sendall(b"pong")
        finally:
            thread.join(10)
        assert result["reply"] == b"pong"
        assert peer[0] == str(net.address.sandbox)  # no NAT: the gateway sees who it is

    assert namespace.run_in_netns(net.netns, lambda: icmp_echo(net.address.host))


def test_nothing_but_the_gateway_is_routable_from_inside(net: SandboxNetwork) -> None:
    for dst in ("10.214.0.1", "10.214.37.2", "1.1.1.1", "169.254.169.254"):
        assert namespace.run_in_netns(net.netns, lambda d=dst: connect_errno(d, 80)) == (
            errno.ENETUNREACH
        ), dst

    def udp() -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.sendto(b"x", ("10.214.0.1", 53))
            except OSError as exc:
                return exc.errno or -1
        return 0

    assert namespace.run_in_netns(net.netns, udp) == errno.ENETUNREACH
    # IPv6 is off inside: not even loopback, let alone anywhere else.
    for dst in ("::1", "2001:db8::1"):
        got = namespace.run_in_netns(net.netns, lambda d=dst: connect_errno(d, 80))
        assert got in (errno.EADDRNOTAVAIL, errno.ENETUNREACH), (dst, got)


def test_two_sandboxes_cannot_reach_each_other(net: SandboxNetwork) -> None:
    with sandbox_network() as other:
        for dst in (other.address.sandbox, other.address.host):
            got = namespace.run_in_netns(net.netns, lambda d=dst: connect_errno(str(d), 80))
            assert got == errno.ENETUNREACH, dst


# --- run_in_netns -------------------------------------------------------------------


def test_run_in_netns_runs_inside_and_leaves_the_caller_alone(net: SandboxNetwork) -> None:
    own = os.stat("/proc/thread-self/ns/net").st_ino
    inside = namespace.run_in_netns(net.netns, lambda: os.stat("/proc/thread-self/ns/net").st_ino)
    assert inside == os.stat(net.netns_path).st_ino != own
    assert os.stat("/proc/thread-self/ns/net").st_ino == own

    class Boom(Exception):
        pass

    def fail() -> None:
        raise Boom("from inside")

    with pytest.raises(Boom, match="from inside"):
        namespace.run_in_netns(net.netns, fail)


def test_run_in_netns_refuses_paths_and_missing_names() -> None:
    with pytest.raises(NetnsError, match="invalid network namespace name"):
        namespace.run_in_netns("../../proc/1/ns/net", lambda: None)
    with pytest.raises(FileNotFoundError):
        namespace.run_in_netns("sg-nonexistent", lambda: None)


# --- timing -------------------------------------------------------------------------


def test_create_makes_one_thread_hop_and_leaves_no_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Creating the namespace is the only step that needs a thread of its own; the rest
    is plain netlink requests from the caller's thread (pyroute2's IPRoute would add an
    asyncio loop and helper threads to every request)."""
    started: list[str] = []
    real_start = threading.Thread.start

    def counting_start(self: threading.Thread) -> None:
        started.append(self.name)
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", counting_start)
    before = threading.active_count()
    with sandbox_network():
        assert started == ["sandgate-netns"]
        assert threading.active_count() == before


# --- rtnl: the netlink requests underneath -----------------------------------------


def ack(seq: int, error: int, extack: bytes = b"", capped: bool = True) -> bytes:
    """An NLMSG_ERROR message as the kernel sends it (nlmsgerr, then TLVs if any)."""
    echoed = struct.pack("=IHHII", 16 if capped else 24, 16, 5, seq, 0)
    if not capped:
        echoed += b"\0" * 8  # the rest of the echoed request
    tlvs = b""
    if extack:
        payload = extack + b"\0"
        tlvs = struct.pack("=HH", 4 + len(payload), 1) + payload
        tlvs += b"\0" * (-len(tlvs) % 4)
    flags = (0x100 if capped else 0) | (0x200 if tlvs else 0)
    body = struct.pack("=i", error) + echoed + tlvs
    return struct.pack("=IHHII", 16 + len(body), 2, flags, seq, 4242) + body


def test_parse_ack_reads_errno_and_the_kernels_message() -> None:
    assert parse_ack(ack(7, 0), 7) == (0, "")
    assert parse_ack(ack(7, -errno.EEXIST), 7) == (errno.EEXIST, "")
    assert parse_ack(ack(7, -errno.EINVAL, b"ipv4: bad prefix"), 7) == (
        errno.EINVAL,
        "ipv4: bad prefix",
    )
    assert parse_ack(ack(7, -errno.EINVAL, b"uncapped", capped=False), 7) == (
        errno.EINVAL,
        "uncapped",
    )
    # Another request's ack, in front of ours or alone.
    assert parse_ack(ack(6, -errno.ENODEV) + ack(7, 0), 7) == (0, "")
    assert parse_ack(ack(6, 0), 7) is None
    with pytest.raises(ValueError, match="malformed"):
        parse_ack(ack(7, 0)[:-4], 7)
    with pytest.raises(ValueError, match="malformed"):
        parse_ack(struct.pack("=IHHII", 8, 2, 0, 7, 0), 7)


def test_devconf_ids_are_the_kernels() -> None:
    # pyroute2's dump layout of ipv4_devconf is the kernel's enum order: a second source.
    names = ifinfmsg.af_spec_inet.inet.field_names
    assert {name: names[index] for name, index in IPV4_DEVCONF_IDS.items()} == {
        name: name for name in IPV4_DEVCONF_IDS
    }
    assert {key for key, _ in namespace.HOST_END_IPV4_SYSCTLS} <= IPV4_DEVCONF_IDS.keys()


def test_rtnl_errors_are_oserrors_with_the_kernels_errno() -> None:
    with scratch_netns() as name, namespace.run_in_netns(name, RtnlSocket) as rtnl:
        with pytest.raises(OSError) as info:
            rtnl.set_up(999_999)
        assert info.value.errno == errno.ENODEV
        assert "set ifindex 999999 up" in str(info.value)

        rtnl.set_up(LOOPBACK_IFINDEX)
        with pytest.raises(FileExistsError) as info:
            rtnl.add_ipv4_address(LOOPBACK_IFINDEX, IPv4Address("127.0.0.1"), 8)
        assert info.value.errno == errno.EEXIST
        assert "add 127.0.0.1/8 to ifindex 1" in str(info.value)

        own_fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            with pytest.raises(FileExistsError):
                rtnl.create_veth("lo", "eth0", own_fd)
        finally:
            os.close(own_fd)
        assert rtnl.delete_link("nonexistent") is False
        with pytest.raises(OSError) as info:
            rtnl.link_index("nonexistent")
        assert info.value.errno == errno.ENODEV
        with pytest.raises(ValueError, match="invalid interface name"):
            rtnl.link_index("sg" + "0" * 14)  # 16 bytes: the kernel would cut it
        with pytest.raises(ValueError, match="unknown IPv4 interface settings: bogus"):
            rtnl.set_ipv4_devconf(LOOPBACK_IFINDEX, {"bogus": 1})
        # The socket still works after refusals: acks are matched by sequence.
        assert rtnl.link_index("lo") == LOOPBACK_IFINDEX


def test_rtnl_builds_a_veth_between_two_scratch_namespaces() -> None:
    """A socket opened in a namespace works there from any thread; the requests build
    a veth the same way create_network does, and delete it with both ends."""
    settings = dict(namespace.HOST_END_IPV4_SYSCTLS)
    # The opposite of every setting but forwarding (left alone: never turned on), so
    # each one must really be written to read back right.
    flipped = {key: 1 - value for key, value in settings.items() if key != "forwarding"}
    with scratch_netns() as a, scratch_netns() as b:

        def set_defaults(values: dict[str, int]) -> None:
            for key, value in values.items():
                with open(f"/proc/sys/net/ipv4/conf/default/{key}", "w") as f:
                    f.write(str(value))

        namespace.run_in_netns(a, lambda: set_defaults(flipped))
        b_fd = os.open(f"/run/netns/{b}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            with (
                namespace.run_in_netns(a, RtnlSocket) as in_a,
                namespace.run_in_netns(b, RtnlSocket) as in_b,
            ):
                in_a.create_veth("va", "vb", b_fd)
                index = in_a.link_index("va")  # resolved in a, from this thread
                assert not link_exists("va")

                def conf(ifname: str) -> dict[str, str]:
                    return {k: read_sysctl(f"net/ipv4/conf/{ifname}/{k}") for k in settings}

                assert namespace.run_in_netns(a, lambda: conf("va")) == {
                    **{k: str(v) for k, v in flipped.items()},
                    "forwarding": "0",
                }
                in_a.set_ipv4_devconf(index, settings)
                expected = {k: str(v) for k, v in settings.items()}
                assert namespace.run_in_netns(a, lambda: conf("va")) == expected
                # Marked as set for the device, as a sysctl write would: a change to
                # the namespace's defaults no longer reaches it.
                namespace.run_in_netns(a, lambda: set_defaults(flipped))
                assert namespace.run_in_netns(a, lambda: conf("va")) == expected

                in_a.add_ipv4_address(index, IPv4Address("10.213.255.254"), 31)
                in_a.set_up(index)
                vb = in_b.link_index("vb")
                in_b.add_ipv4_address(vb, IPv4Address("10.213.255.255"), 31)
                in_b.set_up(vb)
                (link,) = ip_json("-n", a, "-d", "addr", "show", "dev", "va")
                assert "UP" in link["flags"] and link["linkinfo"]["info_kind"] == "veth"
                assert [
                    (x["local"], x["prefixlen"]) for x in link["addr_info"] if x["family"] == "inet"
                ] == [("10.213.255.254", 31)]
                assert (link["num_tx_queues"], link["num_rx_queues"]) == (1, 1)
                assert namespace.run_in_netns(b, lambda: icmp_echo(IPv4Address("10.213.255.254")))

                assert in_a.delete_link("va") is True
                # Acknowledged after unregistering: both ends are gone already.
                assert ip_json("-n", a, "link", "show", "type", "veth") == []
                assert ip_json("-n", b, "link", "show", "type", "veth") == []
                assert in_a.delete_link("va") is False
        finally:
            os.close(b_fd)
