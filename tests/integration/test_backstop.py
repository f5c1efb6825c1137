"""The legacy-xtables backstop against the real kernel, inside scratch network namespaces
only (the host's filter table is not ours to experiment on). Removing a scratch netns
removes its xtables tables too, so nothing outlives a test."""

from __future__ import annotations

import secrets
import socket
import subprocess
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

from nft import backstop
from tests.nsutil import netns_exec, run_in_netns, scratch_netns

pytestmark = pytest.mark.root

T = TypeVar("T")

OURS = [
    "-A INPUT -m comment --comment sandgate -j SANDGATE-IN",
    "-A FORWARD -m comment --comment sandgate -j SANDGATE-FWD",
    "-A SANDGATE-FWD -i sg+ -j DROP",
    "-A SANDGATE-FWD -o sg+ -j DROP",
    "-A SANDGATE-IN -i sg+ -p tcp -m tcp --dport {port} -j RETURN",
    "-A SANDGATE-IN -i sg+ -j DROP",
]


def ours(port: int) -> list[str]:
    return [line.format(port=port) for line in OURS]


def filter_rules(ns: str) -> list[str]:
    """The filter table's chains and rules in ns, as iptables-legacy-save prints them."""
    out = netns_exec(
        ns, ["iptables-legacy-save", "-t", "filter"], capture_output=True, text=True, check=True
    ).stdout
    return [line for line in out.splitlines() if line.startswith(("-A", ":SANDGATE"))]


def rules_only(ns: str) -> list[str]:
    return [line for line in filter_rules(ns) if line.startswith("-A")]


def iptables(ns: str, *args: str) -> None:
    netns_exec(ns, ["iptables-legacy", *args], check=True)


def legacy_tables(ns: str) -> str:
    return netns_exec(
        ns, ["cat", "/proc/net/ip_tables_names"], capture_output=True, text=True, check=False
    ).stdout


def inside(ns: str, fn: Callable[[], T]) -> T:
    return run_in_netns(ns, fn)


@pytest.fixture
def ns() -> Iterator[str]:
    with scratch_netns() as name:
        available, reason = run_in_netns(name, backstop.backstop_available)
        if not available:
            pytest.skip(f"no legacy xtables here: {reason}")
        yield name


def test_ensure_installs_exactly_our_rules(ns):
    assert inside(ns, backstop.backstop_present) is False
    inside(ns, lambda: backstop.ensure_backstop(3128))
    assert rules_only(ns) == ours(3128)
    assert ":SANDGATE-FWD - [0:0]" in filter_rules(ns)
    assert inside(ns, backstop.backstop_present) is True
    assert inside(ns, backstop.installed_port) == 3128


def test_ensure_is_idempotent(ns):
    inside(ns, lambda: backstop.ensure_backstop(3128))
    before = filter_rules(ns)
    inside(ns, lambda: backstop.ensure_backstop(3128))
    inside(ns, lambda: backstop.ensure_backstop(3128))
    assert filter_rules(ns) == before


def test_another_port_rewrites_it(ns):
    inside(ns, lambda: backstop.ensure_backstop(3128))
    inside(ns, lambda: backstop.ensure_backstop(8080))
    assert rules_only(ns) == ours(8080)
    assert inside(ns, backstop.installed_port) == 8080


def test_tampering_is_seen_and_repaired(ns):
    inside(ns, lambda: backstop.ensure_backstop(3128))
    iptables(ns, "-D", "SANDGATE-IN", "2")
    assert inside(ns, backstop.backstop_present) is False
    inside(ns, lambda: backstop.ensure_backstop(3128))
    assert rules_only(ns) == ours(3128)


def test_foreign_rules_are_left_alone_and_ours_go_first(ns):
    iptables(ns, "-A", "FORWARD", "-i", "eth9", "-j", "ACCEPT")
    iptables(ns, "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT")
    inside(ns, lambda: backstop.ensure_backstop(3128))
    iptables(ns, "-I", "FORWARD", "-o", "eth8", "-j", "ACCEPT")  # someone goes above us
    assert inside(ns, backstop.backstop_present) is False
    inside(ns, lambda: backstop.ensure_backstop(3128))
    assert rules_only(ns) == [
        "-A INPUT -m comment --comment sandgate -j SANDGATE-IN",
        "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT",
        "-A FORWARD -m comment --comment sandgate -j SANDGATE-FWD",
        "-A FORWARD -o eth8 -j ACCEPT",
        "-A FORWARD -i eth9 -j ACCEPT",
        *ours(3128)[2:],
    ]
    inside(ns, backstop.remove_backstop)
    assert rules_only(ns) == [
        "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT",
        "-A FORWARD -o eth8 -j ACCEPT",
        "-A FORWARD -i eth9 -j ACCEPT",
    ]


def test_remove_leaves_nothing_and_is_idempotent(ns):
    inside(ns, lambda: backstop.ensure_backstop(3128))
    iptables(ns, "-A", "FORWARD", "-j", "SANDGATE-FWD")  # a stray second jump is ours too
    inside(ns, backstop.remove_backstop)
    assert filter_rules(ns) == []
    inside(ns, backstop.remove_backstop)
    assert inside(ns, backstop.backstop_present) is False
    assert inside(ns, backstop.installed_port) is None


def test_remove_and_present_do_not_create_a_legacy_table():
    with scratch_netns() as name:
        assert "filter" not in legacy_tables(name)
        inside(name, backstop.remove_backstop)
        assert inside(name, backstop.backstop_present) is False
        assert "filter" not in legacy_tables(name)


@pytest.mark.parametrize("port", [0, 65536, "3128", True])
def test_bad_port_is_refused(port):
    with pytest.raises(ValueError, match="gateway_port"):
        backstop.ensure_backstop(port)


def test_backstop_alone_lets_only_the_gateway_port_in(ns):
    """No nftables at all (as after a foreign `nft flush ruleset`): the backstop still holds."""
    with scratch_netns() as box:
        ifname = f"sgt{secrets.token_hex(3)}"
        veth = f"link add {ifname} type veth peer name eth0 netns {box}"
        subprocess.run(["ip", "-n", ns, *veth.split()], check=True)
        for netns, dev, addr in ((ns, ifname, "10.213.251.0"), (box, "eth0", "10.213.251.1")):
            subprocess.run(["ip", "-n", netns, "addr", "add", f"{addr}/31", "dev", dev], check=True)
            subprocess.run(["ip", "-n", netns, "link", "set", dev, "up"], check=True)

        def listen() -> list[socket.socket]:
            socks = []
            for port in (3128, 3129):
                s = socket.socket()
                s.bind(("10.213.251.0", port))
                s.listen(4)
                socks.append(s)
            return socks

        def connects(port: int) -> bool:
            with socket.socket() as s:
                s.settimeout(0.4)
                try:
                    s.connect(("10.213.251.0", port))
                except OSError:
                    return False
                return True

        socks = run_in_netns(ns, listen)
        try:
            assert run_in_netns(box, lambda: connects(3129))  # open before the backstop
            inside(ns, lambda: backstop.ensure_backstop(3128))
            assert run_in_netns(box, lambda: connects(3128))
            assert not run_in_netns(box, lambda: connects(3129))
        finally:
            for s in socks:
                s.close()
