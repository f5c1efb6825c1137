"""A sandbox's network: its namespace `sg-<id>` and a routed point-to-point veth.

Owns: creating and removing the named netns, the veth pair (host end `sg<id>`,
sandbox end `eth0`), their addresses and per-interface sysctls; listing which
sandbox ids and addresses the kernel holds; running a function inside a netns.

The shape follows containernetworking/plugins' ptp: one veth per sandbox, no bridge,
an on-link /31 and nothing else. The sandbox has no default route, so the only
place it can send to is the host end, which is its gateway.

All netlink work is in-process, through rtnl.RtnlSocket: plain blocking request/ack
on a NETLINK_ROUTE socket, with pyroute2's message classes encoding the requests.
(pyroute2's IPRoute runs an asyncio loop per request and starts helper threads; its
netns helpers fork a process per call.) setns/unshare(CLONE_NEWNET) only move the
calling thread, so one short-lived thread creates the namespace, configures what only
/proc/sys can, and opens a netlink socket there; a socket keeps the namespace it was
opened in, so the sandbox end is then configured from the caller's thread.

Reuse after teardown. The kernel frees a network namespace asynchronously (cleanup_net
runs on a workqueue), and whatever devices are still inside go with it, later. So
destroy_network deletes the veth explicitly first: RTM_DELLINK is acknowledged only
after the device is unregistered (rtnl_unlock runs the unregister todo list before the
ack is sent), and deleting one end removes both, so when destroy_network returns the
host-end name `sg<id>`, its address and the sandbox's eth0 are gone. Then the name
`/run/netns/sg-<id>` is unmounted and unlinked, also synchronously. What may linger is
an anonymous namespace holding only its own loopback: no name, no address visible to
the host. Allocation takes its inputs from the kernel itself (sandbox_ids_present,
addresses_in_use), so anything that still exists, including a half-removed sandbox
from a crash, keeps its id and /31 out of reach; ids are also random 32-bit values,
so even a name freed a moment ago is practically never drawn again.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from collections.abc import Callable
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import TypeVar

from . import rtnl, syscalls
from .addressing import (
    IFNAME_PREFIX,
    NETNS_PREFIX,
    SandboxAddress,
    host_ifname,
    is_sandbox_id,
    netns_name,
)
from .rtnl import LOOPBACK_IFINDEX, RtnlSocket

T = TypeVar("T")

NETNS_DIR = "/run/netns"
SANDBOX_IFNAME = "eth0"

# Per-interface IPv4 settings on the host end (net/ipv4/conf/sg<id>/*, set in one
# netlink request rather than eight /proc/sys writes). rp_filter=1 (strict) drops
# anything whose source would not be routed back out of this very interface, i.e.
# anything but the sandbox's own /31 (the effective value is max(all, interface), so
# this holds whatever conf.all says). forwarding=0 makes the kernel refuse to route
# packets that arrive here even if someone turns ip_forward on later (until they toggle
# it again, which rewrites every interface); sandgate itself never enables forwarding.
HOST_END_IPV4_SYSCTLS: tuple[tuple[str, int], ...] = (
    ("rp_filter", 1),
    ("forwarding", 0),
    ("accept_local", 0),
    ("route_localnet", 0),
    ("proxy_arp", 0),
    ("accept_redirects", 0),
    ("send_redirects", 0),
    ("accept_source_route", 0),
)

# Written in the new namespace before eth0 exists, so eth0 is born with IPv6 off
# ("default") and lo is switched off too ("all" applies to existing devices).
SANDBOX_IPV6_SYSCTLS: tuple[str, ...] = (
    "net/ipv6/conf/default/disable_ipv6",
    "net/ipv6/conf/all/disable_ipv6",
)


class NetnsError(Exception):
    """A sandbox network could not be created or removed; the message names the step."""


@dataclass(frozen=True)
class SandboxNetwork:
    sandbox_id: str
    netns: str
    host_ifname: str
    address: SandboxAddress

    @property
    def netns_path(self) -> str:
        return os.path.join(NETNS_DIR, self.netns)


# --- helpers ------------------------------------------------------------------------


def _in_thread(fn: Callable[[], T]) -> T:
    """Run fn in a fresh thread and return its result or re-raise its exception here.

    Namespace switches are per thread; a thread that exits takes them with it, so the
    caller's thread never changes namespace.
    """
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, name="sandgate-netns")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def _netns_path(name: str) -> str:
    if not name or "/" in name or name in (".", ".."):
        raise NetnsError(f"invalid network namespace name {name!r}")
    return os.path.join(NETNS_DIR, name)


def _write_sysctl(relpath: str, value: str) -> None:
    """Write /proc/sys/<relpath> as the calling thread's network namespace sees it."""
    with open(os.path.join("/proc/sys", relpath), "w") as f:
        f.write(value)


def _ipv6_present() -> bool:
    # With ipv6.disable=1 on the kernel command line there is no IPv6 to switch off.
    return os.path.isdir("/proc/sys/net/ipv6")


def _ensure_netns_dir() -> None:
    """Make /run/netns a shared mount point, as `ip netns add` does.

    Shared propagation lets a namespace bind-mounted here be seen from mount
    namespaces created later (the sandbox's own, for one).
    """
    os.makedirs(NETNS_DIR, mode=0o755, exist_ok=True)
    try:
        syscalls.mount("", NETNS_DIR, "none", syscalls.MS_SHARED | syscalls.MS_REC)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: not a mount point yet
            raise
        syscalls.mount(NETNS_DIR, NETNS_DIR, "none", syscalls.MS_BIND | syscalls.MS_REC)
        syscalls.mount("", NETNS_DIR, "none", syscalls.MS_SHARED | syscalls.MS_REC)


def _create_netns(name: str) -> RtnlSocket:
    """Create the named namespace `/run/netns/<name>`, switch IPv6 off inside it and
    return a netlink socket in it (the caller closes it).

    Raises FileExistsError if the name is taken; on any other failure nothing is left.
    """
    path = _netns_path(name)
    _ensure_netns_dir()
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0))

    def unshare_and_bind() -> RtnlSocket:
        syscalls.unshare(syscalls.CLONE_NEWNET)
        syscalls.mount("/proc/thread-self/ns/net", path, "none", syscalls.MS_BIND)
        if _ipv6_present():
            for relpath in SANDBOX_IPV6_SYSCTLS:
                _write_sysctl(relpath, "1")
        return RtnlSocket()

    try:
        return _in_thread(unshare_and_bind)
    except BaseException:
        _remove_netns(name)
        raise


def _remove_netns(name: str) -> None:
    """Unmount and unlink `/run/netns/<name>`; a missing or unmounted name is fine."""
    path = _netns_path(name)
    try:
        syscalls.umount2(path, syscalls.MNT_DETACH)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOENT):  # not mounted / not there
            raise
    with suppress(FileNotFoundError):
        os.unlink(path)


def _link_index(rtnl: RtnlSocket, ifname: str) -> int:
    try:
        return rtnl.link_index(ifname)
    except OSError as exc:
        if exc.errno == errno.ENODEV:
            raise NetnsError(f"interface {ifname} vanished while it was being configured") from exc
        raise


def _configure_host_end(host: RtnlSocket, ifname: str, address: SandboxAddress) -> None:
    # Settings before the link goes up: it never runs a moment with IPv6 or loose
    # rp_filter. IPv6's per-interface settings can only be written through /proc/sys.
    if _ipv6_present():
        _write_sysctl(f"net/ipv6/conf/{ifname}/disable_ipv6", "1")
    index = _link_index(host, ifname)
    host.set_ipv4_devconf(index, dict(HOST_END_IPV4_SYSCTLS))
    host.add_ipv4_address(index, address.host, address.prefixlen)
    host.set_up(index)


def _configure_sandbox_end(inside: RtnlSocket, address: SandboxAddress) -> None:
    """Through a socket in the netns: lo up, eth0 with the odd address, up. The kernel
    adds the on-link /31 route for the address; no other route is ever added."""
    inside.set_up(LOOPBACK_IFINDEX)
    index = _link_index(inside, SANDBOX_IFNAME)
    inside.add_ipv4_address(index, address.sandbox, address.prefixlen)
    inside.set_up(index)


# --- public API ---------------------------------------------------------------------


def create_network(sandbox_id: str, address: SandboxAddress) -> SandboxNetwork:
    """Create the sandbox's netns and veth pair, addressed from `address`.

    On failure, everything this call created is removed (objects that already existed,
    such as a link with the same name, are left alone) and NetnsError names the step.

    The order matters for a crash halfway: the sandbox end gets its address only after
    the host end holds the even address, so any /31 in use inside some netns is also
    visible to addresses_in_use() on the host.
    """
    net = SandboxNetwork(
        sandbox_id=sandbox_id,
        netns=netns_name(sandbox_id),
        host_ifname=host_ifname(sandbox_id),
        address=address,
    )
    step = f"create network namespace {net.netns}"
    with ExitStack() as undo:
        try:
            try:
                inside = _create_netns(net.netns)
            except FileExistsError as exc:
                raise NetnsError(f"{net.netns_path} already exists") from exc
            undo.callback(_remove_netns, net.netns)

            with inside, RtnlSocket() as host:
                step = f"create veth {net.host_ifname} <-> {net.netns}:{SANDBOX_IFNAME}"
                ns_fd = os.open(net.netns_path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    host.create_veth(net.host_ifname, SANDBOX_IFNAME, ns_fd)
                finally:
                    os.close(ns_fd)
                # Runs before the netns removal above (ExitStack is LIFO): the veth goes
                # synchronously rather than with the namespace's asynchronous cleanup.
                undo.callback(_delete_host_link, net.host_ifname)

                step = f"configure host end {net.host_ifname} ({address.host}/{address.prefixlen})"
                _configure_host_end(host, net.host_ifname, address)

                step = (
                    f"configure {SANDBOX_IFNAME} in {net.netns} "
                    f"({address.sandbox}/{address.prefixlen})"
                )
                _configure_sandbox_end(inside, address)
        except Exception as exc:
            cleanup_error: BaseException | None = None
            try:
                undo.close()
            except Exception as err:
                cleanup_error = err
            message = f"sandbox {sandbox_id}: {step} failed: {exc}"
            if cleanup_error is not None:
                message += f" (and removing what was created failed too: {cleanup_error})"
            raise NetnsError(message) from exc
        undo.pop_all()
    return net


def _delete_host_link(ifname: str) -> None:
    """Delete a link by name in this namespace; a missing link is fine."""
    with RtnlSocket() as host:
        host.delete_link(ifname)


def destroy_network(sandbox_id: str) -> None:
    """Remove the sandbox's veth pair, then its netns name. Idempotent.

    The veth is deleted explicitly (see the module docstring) so that its name and
    addresses are free when this returns.
    """
    netns = netns_name(sandbox_id)
    ifname = host_ifname(sandbox_id)
    try:
        _delete_host_link(ifname)
    except OSError as exc:
        raise NetnsError(f"sandbox {sandbox_id}: delete veth {ifname} failed: {exc}") from exc
    try:
        _remove_netns(netns)
    except OSError as exc:
        raise NetnsError(
            f"sandbox {sandbox_id}: remove network namespace {netns} failed: {exc}"
        ) from exc


def sandbox_ids_present() -> set[str]:
    """Ids that have a `sg-<id>` netns name or a `sg<id>` link in this namespace."""
    ids: set[str] = set()
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        names = []
    for name in names:
        if name.startswith(NETNS_PREFIX) and is_sandbox_id(name[len(NETNS_PREFIX) :]):
            ids.add(name[len(NETNS_PREFIX) :])
    # if_nameindex(3) is glibc's own RTM_GETLINK dump, in the calling thread's netns:
    # ~7 ms for 1000 links where decoding full link messages with pyroute2 takes ~200 ms,
    # and this runs on every allocation.
    for _index, name in socket.if_nameindex():
        if name.startswith(IFNAME_PREFIX) and is_sandbox_id(name[len(IFNAME_PREFIX) :]):
            ids.add(name[len(IFNAME_PREFIX) :])
    return ids


def any_sandbox_present() -> bool:
    """Whether any sandbox is present, cheaply: a `sg-*` netns name ends the search at
    once (the common case: no link dump); only without one are the links listed."""
    try:
        with os.scandir(NETNS_DIR) as entries:
            if any(e.name.startswith(NETNS_PREFIX) for e in entries):
                return True
    except FileNotFoundError:
        pass
    return bool(sandbox_ids_present())


def sandbox_present(sandbox_id: str) -> bool:
    """Whether this one sandbox has its netns name or its host link: no dump of all links."""
    if os.path.exists(os.path.join(NETNS_DIR, netns_name(sandbox_id))):
        return True
    try:
        socket.if_nametoindex(host_ifname(sandbox_id))
    except OSError:
        return False
    return True


def addresses_in_use() -> set[IPv4Address]:
    """Every IPv4 address on any interface of this namespace, sandbox host ends included."""
    return {IPv4Address(packed) for packed in rtnl.ipv4_addresses() if len(packed) == 4}


def run_in_netns(netns: str, fn: Callable[[], T]) -> T:
    """Run fn in a fresh thread that has joined `/run/netns/<netns>`; return its result.

    fn's exception is re-raised in the caller. The caller's own thread never changes
    namespace.
    """
    path = _netns_path(netns)

    def joined() -> T:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            syscalls.setns(fd, syscalls.CLONE_NEWNET)
        finally:
            os.close(fd)
        return fn()

    return _in_thread(joined)
