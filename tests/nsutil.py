"""Test-side helpers for running code in a network namespace the test made itself.

Test-only namespaces are named `sgtest-<hex>` so the suite's residue check finds
any that a test leaves behind.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
from collections.abc import Iterator
from ipaddress import IPv4Address

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

from netns.namespace import addresses_in_use, run_in_netns

__all__ = ["netns_exec", "run_in_netns", "scratch_netns", "upstream_netns"]


def netns_exec(name: str, argv: list[str], **kw: object) -> subprocess.CompletedProcess:
    """Run a command inside the named netns (test side only: `ip netns exec`)."""
    return subprocess.run(["ip", "netns", "exec", name, *argv], **kw)  # type: ignore[arg-type]


@contextlib.contextmanager
def scratch_netns(prefix: str = "sgtest") -> Iterator[str]:
    """A throwaway network namespace, removed on exit whatever happens."""
    name = f"{prefix}-{secrets.token_hex(4)}"
    pr_netns.create(name)
    try:
        yield name
    finally:
        pr_netns.remove(name)


@contextlib.contextmanager
def upstream_netns(prefix: str = "sgtest-up") -> Iterator[tuple[str, IPv4Address, IPv4Address]]:
    """A stand-in for "the internet": a netns at 10.214.N.2 behind a veth tsg<hex> (host
    end 10.214.N.1/30; not sg*, it is no sandbox), with a route back to the sandbox pool
    only, never a default route, and an N no interface on the host uses already.
    Yields (netns name, host-end address, upstream address); removed whatever happens."""
    used = addresses_in_use()
    for _ in range(64):
        tag = secrets.token_hex(3)
        n = int(tag[:2], 16)
        host_addr, addr = IPv4Address(f"10.214.{n}.1"), IPv4Address(f"10.214.{n}.2")
        if host_addr not in used and addr not in used:
            break
    else:
        raise RuntimeError("no free 10.214.N.0/30 for an upstream namespace")
    name, ifname = f"{prefix}{tag}", f"tsg{tag}"
    pr_netns.create(name)
    try:
        with IPRoute() as ipr:
            ipr.link("add", ifname=ifname, kind="veth", peer={"ifname": "eth0", "net_ns_fd": name})
            idx = ipr.link_lookup(ifname=ifname)[0]
            ipr.addr("add", index=idx, address=str(host_addr), prefixlen=30)
            ipr.link("set", index=idx, state="up")

        def inside() -> None:
            with IPRoute() as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                eth = ipr.link_lookup(ifname="eth0")[0]
                ipr.addr("add", index=eth, address=str(addr), prefixlen=30)
                ipr.link("set", index=eth, state="up")
                ipr.route("add", dst="10.213.0.0/16", gateway=str(host_addr))

        run_in_netns(name, inside)
        yield name, host_addr, addr
    finally:
        with IPRoute() as ipr, contextlib.suppress(Exception):
            ipr.link("del", ifname=ifname)
        with contextlib.suppress(Exception):
            pr_netns.remove(name)
