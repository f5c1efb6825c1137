"""A synchronous rtnetlink client for the few requests a sandbox network needs.

Owns: one NETLINK_ROUTE socket (bound for its whole life to the network namespace of
the thread that opened it), sending one request at a time and turning the kernel's
acknowledgement into a return or an OSError carrying the kernel's errno. pyroute2's
message classes encode the requests; this module parses only the NLMSG_ERROR ack.

Why not pyroute2's IPRoute: in pyroute2 0.9 every request through the synchronous
wrapper drives an asyncio event loop, and each IPRoute starts helper threads. A sandbox
network takes seven small requests, each of which the kernel answers within the
sendto() call, so a plain blocking socket is all that is needed.

A socket stays in the namespace it was opened in even when used from another thread,
so a thread that joins or creates a namespace can open one and hand it back.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from ipaddress import IPv4Address

from pyroute2.netlink import (
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_EXCL,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    nlmsg,
)
from pyroute2.netlink.rtnl import RTM_DELLINK, RTM_NEWADDR, RTM_NEWLINK
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import IFF_UP, ifinfmsg

# <linux/netlink.h>; not all of them are in Python's socket module.
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10  # acks carry only the request's header, not its whole body
NETLINK_EXT_ACK = 11  # error acks carry the kernel's explanation (extack) as a TLV
NLM_F_CAPPED = 0x100
NLM_F_ACK_TLVS = 0x200
NLMSGERR_ATTR_MSG = 1

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NLATTR = struct.Struct("=HH")  # len, type
_ERRNO = struct.Struct("=i")
_U32_ATTR = struct.Struct("=HHI")  # an nlattr holding one u32
_IFREQ_INDEX = struct.Struct("=16si12x")  # struct ifreq: ifr_name, ifr_ifindex, padding
SIOCGIFINDEX = 0x8933
IFNAMSIZ = 15  # longest interface name, in bytes, without the NUL

LOOPBACK_IFINDEX = 1  # lo is always ifindex 1 in every network namespace

IFLA_AF_SPEC = 26
IFLA_INET_CONF = 1
# IPV4_DEVCONF_* from <linux/ip.h> (kernel ABI), by sysctl name: the settings sandgate
# sets. Spelled out rather than taken from a table's order, because a wrong id would
# silently set a different knob.
IPV4_DEVCONF_IDS = {
    "forwarding": 1,
    "proxy_arp": 3,
    "accept_redirects": 4,
    "send_redirects": 6,
    "rp_filter": 8,
    "accept_source_route": 9,
    "accept_local": 23,
    "route_localnet": 26,
}


def _nest(kind: int, payload: bytes) -> bytes:
    return _NLATTR.pack(_NLATTR.size + len(payload), kind) + payload


def parse_ack(data: bytes, seq: int) -> tuple[int, str] | None:
    """The ack for request `seq` in one received datagram: (errno, the kernel's message),
    errno 0 for success and positive otherwise, the message "" when there is none; None
    if the datagram holds no ack for `seq`. Raises ValueError on a malformed message.
    """
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, msg_type, flags, msg_seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            raise ValueError(f"malformed netlink message (length {length} at offset {offset})")
        if msg_type == NLMSG_ERROR and msg_seq == seq:
            body = offset + _NLMSGHDR.size
            if length < _NLMSGHDR.size + _ERRNO.size:
                raise ValueError("truncated netlink error message")
            (error,) = _ERRNO.unpack_from(data, body)
            return -error, _extack_message(data, body + _ERRNO.size, offset + length, flags)
        offset += (length + 3) & ~3
    return None


def _extack_message(data: bytes, start: int, end: int, flags: int) -> str:
    """NLMSGERR_ATTR_MSG from the TLVs after the echoed request, if the kernel sent any."""
    if not flags & NLM_F_ACK_TLVS or start + _NLMSGHDR.size > end:
        return ""
    echoed = _NLMSGHDR.unpack_from(data, start)[0]
    offset = start + (_NLMSGHDR.size if flags & NLM_F_CAPPED else (echoed + 3) & ~3)
    while offset + _NLATTR.size <= end:
        length, kind = _NLATTR.unpack_from(data, offset)
        if length < _NLATTR.size or offset + length > end:
            break
        if kind & 0x3FFF == NLMSGERR_ATTR_MSG:
            raw = data[offset + _NLATTR.size : offset + length]
            return raw.split(b"\0", 1)[0].decode(errors="replace")
        offset += (length + 3) & ~3
    return ""


class RtnlSocket:
    """A NETLINK_ROUTE socket in the calling thread's network namespace.

    Every method sends one request and returns when the kernel has acknowledged it;
    a refusal raises OSError with the kernel's errno (FileExistsError for EEXIST, and
    so on), its message naming the request and, where the kernel gives one, why.
    """

    def __init__(self) -> None:
        self._sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
        )
        try:
            self._sock.bind((0, 0))
            self._sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            self._sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        except BaseException:
            self._sock.close()
            raise
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> RtnlSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self, msg: nlmsg, msg_type: int, flags: int, what: str, raw_attrs: bytes = b""
    ) -> None:
        """Encode msg as one request of msg_type, send it and wait for its ack.

        raw_attrs (already encoded, 4-byte aligned) go after msg's own attributes.
        """
        self._seq += 1
        seq = self._seq
        header = msg["header"]
        header["type"] = msg_type
        header["flags"] = NLM_F_REQUEST | NLM_F_ACK | flags
        header["sequence_number"] = seq
        msg.encode()
        data = msg.data
        if raw_attrs:
            data = bytearray(data)
            data += raw_attrs
            struct.pack_into("=I", data, 0, len(data))
        self._sock.sendto(data, (0, 0))
        while True:
            ack = parse_ack(self._sock.recv(65536), seq)
            if ack is None:
                continue  # an earlier request's ack, left behind by an interruption
            error, message = ack
            if error:
                detail = f"{os.strerror(error)}: {message}" if message else os.strerror(error)
                raise OSError(error, f"{what}: {detail}")
            return

    # --- the requests a sandbox network is made of ---------------------------------

    def link_index(self, ifname: str) -> int:
        """The ifindex of `ifname` in this socket's namespace; ENODEV if there is none.

        SIOCGIFINDEX, what if_nametoindex(3) does, but asked through this socket so
        that it resolves in the socket's namespace, not the calling thread's.
        """
        name = os.fsencode(ifname)
        if not 0 < len(name) <= IFNAMSIZ or b"\0" in name:
            # The kernel would cut a longer name to 15 bytes and find another link.
            raise ValueError(f"invalid interface name {ifname!r}")
        request = _IFREQ_INDEX.pack(name, 0)
        reply = fcntl.ioctl(self._sock.fileno(), SIOCGIFINDEX, request)
        return _IFREQ_INDEX.unpack(reply)[1]

    def create_veth(self, ifname: str, peer_ifname: str, peer_netns_fd: int) -> None:
        """A veth pair: `ifname` here, `peer_ifname` in the namespace behind the fd.

        Both ends are created down, with one transmit and one receive queue each.
        EEXIST if either name is taken where it would go.
        """
        # Unasked, the kernel allocates a queue per possible CPU for each end (only one
        # of them in use); one is all a point-to-point link to the host needs, and
        # allocating fewer makes creation measurably cheaper.
        queues = [("IFLA_NUM_TX_QUEUES", 1), ("IFLA_NUM_RX_QUEUES", 1)]
        peer = {"attrs": [("IFLA_IFNAME", peer_ifname), ("IFLA_NET_NS_FD", peer_netns_fd), *queues]}
        msg = ifinfmsg()
        msg["attrs"] = [
            ("IFLA_IFNAME", ifname),
            *queues,
            (
                "IFLA_LINKINFO",
                {
                    "attrs": [
                        ("IFLA_INFO_KIND", "veth"),
                        ("IFLA_INFO_DATA", {"attrs": [("VETH_INFO_PEER", peer)]}),
                    ]
                },
            ),
        ]
        self.request(
            msg, RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, f"create veth {ifname}/{peer_ifname}"
        )

    def set_ipv4_devconf(self, index: int, settings: dict[str, int]) -> None:
        """Set per-interface IPv4 settings, as writing net/ipv4/conf/<ifname>/<key> would.

        The kernel stores each value and marks it set for the device, so a later change
        to conf/default does not overwrite it, which is what a sysctl write does too.
        Names are the sysctl names (keys of IPV4_DEVCONF_IDS); any other raises
        ValueError before anything is sent.
        """
        unknown = sorted(set(settings) - IPV4_DEVCONF_IDS.keys())
        if unknown:
            raise ValueError(f"unknown IPv4 interface settings: {', '.join(unknown)}")
        # pyroute2 0.9 encodes IFLA_INET_CONF only in the layout the kernel reports (one
        # struct of every value); a request takes one nested u32 per setting, so those
        # few bytes are packed here.
        conf = b"".join(
            _U32_ATTR.pack(_U32_ATTR.size, IPV4_DEVCONF_IDS[key], value)
            for key, value in settings.items()
        )
        af_spec = _nest(IFLA_AF_SPEC, _nest(socket.AF_INET, _nest(IFLA_INET_CONF, conf)))
        msg = ifinfmsg()
        msg["index"] = index
        self.request(msg, RTM_NEWLINK, 0, f"set IPv4 settings of ifindex {index}", af_spec)

    def add_ipv4_address(self, index: int, address: IPv4Address, prefixlen: int) -> None:
        """Add address/prefixlen to the link; the kernel adds the on-link prefix route."""
        msg = ifaddrmsg()
        msg["family"] = socket.AF_INET
        msg["prefixlen"] = prefixlen
        msg["index"] = index
        msg["attrs"] = [("IFA_LOCAL", str(address)), ("IFA_ADDRESS", str(address))]
        self.request(
            msg,
            RTM_NEWADDR,
            NLM_F_CREATE | NLM_F_EXCL,
            f"add {address}/{prefixlen} to ifindex {index}",
        )

    def set_up(self, index: int) -> None:
        """Bring the link up (IFF_UP; no other flag is touched)."""
        msg = ifinfmsg()
        msg["index"] = index
        msg["flags"] = IFF_UP
        msg["change"] = IFF_UP
        self.request(msg, RTM_NEWLINK, 0, f"set ifindex {index} up")

    def delete_link(self, ifname: str) -> bool:
        """Delete a link by name (both ends, for a veth); False if there was none.

        Acknowledged only once the device is unregistered, so its name and addresses
        are free when this returns.
        """
        msg = ifinfmsg()
        msg["attrs"] = [("IFLA_IFNAME", ifname)]
        try:
            self.request(msg, RTM_DELLINK, 0, f"delete link {ifname}")
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                return False
            raise
        return True


RTM_GETADDR = 22
NLM_F_DUMP = 0x300
NLMSG_DONE = 3
IFA_ADDRESS, IFA_LOCAL = 1, 2
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index


def ipv4_addresses() -> set[bytes]:
    """Every IPv4 address (packed) in the calling thread's netns: one RTM_GETADDR dump
    of the AF_INET family only. getifaddrs(3) also dumps every link, whose messages are
    large; with a veth per sandbox, that dump grew with the sandboxes on every create."""
    sock = socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
    )
    found: set[bytes] = set()
    with sock:
        sock.bind((0, 0))
        request = _NLMSGHDR.pack(
            _NLMSGHDR.size + _IFADDRMSG.size, RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, 1, 0
        ) + _IFADDRMSG.pack(socket.AF_INET, 0, 0, 0, 0)
        sock.sendto(request, (0, 0))
        while True:
            data = sock.recv(1 << 17)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size:
                    raise OSError(errno.EPROTO, "RTM_GETADDR dump: a malformed message")
                if kind == NLMSG_DONE:
                    return found
                if kind == NLMSG_ERROR:
                    (error,) = _ERRNO.unpack_from(data, offset + _NLMSGHDR.size)
                    raise OSError(-error, f"RTM_GETADDR dump: {os.strerror(-error)}")
                if kind == RTM_NEWADDR:
                    found.add(_address_of(data, offset, length))
                offset += (length + 3) & ~3


def _address_of(data: bytes, start: int, length: int) -> bytes:
    """IFA_LOCAL (the interface's own address), else IFA_ADDRESS, of one RTM_NEWADDR."""
    attrs: dict[int, bytes] = {}
    pos, end = start + _NLMSGHDR.size + _IFADDRMSG.size, start + length
    while pos + _NLATTR.size <= end:
        rta_len, rta_type = _NLATTR.unpack_from(data, pos)
        if rta_len < _NLATTR.size:
            break
        if rta_type in (IFA_ADDRESS, IFA_LOCAL):
            attrs[rta_type] = bytes(data[pos + _NLATTR.size : pos + rta_len])
        pos += (rta_len + 3) & ~3
    return attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS, b"")
