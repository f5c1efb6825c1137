"""Address classification: may the gateway dial this IP address?

This module owns one question, asked after the policy has allowed a host by name
(gateway/policy.py decides, this module classifies, the proxy only moves bytes and
asks): the gateway resolves the name itself, and every address it would dial is
classified here first. Public (global unicast) addresses pass; loopback, private,
link-local, carrier-grade NAT, cloud metadata, multicast, reserved and IPv6 addresses
that embed an IPv4 one are refused, unless the policy's `allow_cidrs` names them, and
some of them (see NEVER_ALLOWED) not even then.

`classify` is one readable function, in smokescreen's order (stripe/smokescreen,
classifyAddr): the gateway's own addresses; an IPv4-mapped address is judged as the
IPv4 address it is; then addresses that are never routable ("not global unicast":
loopback, link-local, multicast, unspecified, broadcast) and cloud metadata
endpoints; then IPv6 embeddings (NAT64, 6to4, Teredo, IPv4-compatible), refused
when the IPv4 they carry is, and otherwise unless allow_cidrs names their prefix;
then the policy's allowed ranges; then private and the other special-purpose
ranges; and finally global unicast. Metadata and the never-routable kinds come
before the allowed ranges so that no `allow_cidrs` entry, however broad, opens
them; gateway/policy.py rejects such an entry outright (`never_allowed_overlap`).

Pure, except `system_resolver`, the one function that does I/O; `resolve_and_check`
takes the resolver as an argument so that tests pass a fake one. The gateway runs
the same steps in pieces (`literal_target`, its own lookup, `check_answers`) so that
a name answered without I/O is not sent to a thread.
"""

from __future__ import annotations

import enum
import re
import socket
from collections.abc import Callable, Collection, Iterable, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network
Resolver = Callable[[str, int], list[IPAddress]]
"""(host, port) -> the host's addresses; may block (DNS), so the gateway calls it in a
thread pool. A resolver may also answer some names without I/O (pinned names,
runner.gateway_thread.pinned_resolver): it then has a method `local(host, port)` that
returns those answers (a sequence the caller must not change: it may be given out
again), or None for a name that needs the blocking call; the gateway asks `local`
first, on its event loop (`local_answer`)."""


class AddressClass(enum.Enum):
    """What an address is. The value is the name written to the audit log."""

    GLOBAL = "global"
    SELF = "self"
    METADATA = "metadata"
    UNSPECIFIED = "unspecified"
    LOOPBACK = "loopback"
    LINK_LOCAL = "link-local"
    MULTICAST = "multicast"
    BROADCAST = "broadcast"
    PRIVATE = "private"
    CGNAT = "cgnat"
    ULA = "ula"
    DOCUMENTATION = "documentation"
    BENCHMARKING = "benchmarking"
    RESERVED = "reserved"
    IPV4_MAPPED_OR_EMBEDDED = "ipv4-embedded"
    NAT64 = "nat64"
    SIX_TO_FOUR = "6to4"
    TEREDO = "teredo"


_DESCRIPTION = {
    AddressClass.GLOBAL: "a global unicast address",
    AddressClass.SELF: "the gateway's own address",
    AddressClass.METADATA: "a cloud metadata endpoint",
    AddressClass.UNSPECIFIED: "an unspecified ('this network') address",
    AddressClass.LOOPBACK: "a loopback address",
    AddressClass.LINK_LOCAL: "a link-local address",
    AddressClass.MULTICAST: "a multicast address",
    AddressClass.BROADCAST: "the broadcast address",
    AddressClass.PRIVATE: "a private (RFC 1918) address",
    AddressClass.CGNAT: "a carrier-grade NAT (RFC 6598) address",
    AddressClass.ULA: "an IPv6 unique local address",
    AddressClass.DOCUMENTATION: "a documentation address",
    AddressClass.BENCHMARKING: "a benchmarking address",
    AddressClass.RESERVED: "a reserved address",
    AddressClass.IPV4_MAPPED_OR_EMBEDDED: "an IPv6 address embedding an IPv4 one",
    AddressClass.NAT64: "a NAT64 address",
    AddressClass.SIX_TO_FOUR: "a 6to4 address",
    AddressClass.TEREDO: "a Teredo address",
}

# Refused whatever the policy says: no allow_cidrs entry opens these.
NEVER_ALLOWED = frozenset(
    {
        AddressClass.SELF,
        AddressClass.METADATA,
        AddressClass.UNSPECIFIED,
        AddressClass.LOOPBACK,
        AddressClass.LINK_LOCAL,
        AddressClass.MULTICAST,
        AddressClass.BROADCAST,
    }
)

_EMBEDDINGS = frozenset(
    {
        AddressClass.IPV4_MAPPED_OR_EMBEDDED,
        AddressClass.NAT64,
        AddressClass.SIX_TO_FOUR,
        AddressClass.TEREDO,
    }
)

# Cloud metadata endpoints outside link-local space (link-local is never allowed anyway,
# but 169.254.169.254 is named so that the audit log says "metadata").
_METADATA = frozenset(
    ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle
        "169.254.170.2",  # AWS ECS task metadata
        "100.100.100.200",  # Alibaba Cloud (inside CGNAT space)
        "168.63.129.16",  # Azure WireServer (a public address)
        "192.0.0.192",  # Oracle Cloud, legacy
        "fd00:ec2::254",  # AWS IMDS over IPv6 (inside ULA space)
    )
)

# First match wins, so more specific ranges come before the ranges that contain them.
_V4_RANGES: tuple[tuple[IPv4Network, AddressClass], ...] = tuple(
    (IPv4Network(net), cls)
    for net, cls in (
        ("0.0.0.0/8", AddressClass.UNSPECIFIED),
        ("127.0.0.0/8", AddressClass.LOOPBACK),
        ("169.254.0.0/16", AddressClass.LINK_LOCAL),
        ("224.0.0.0/4", AddressClass.MULTICAST),
        ("255.255.255.255/32", AddressClass.BROADCAST),
        ("10.0.0.0/8", AddressClass.PRIVATE),
        ("172.16.0.0/12", AddressClass.PRIVATE),
        ("192.168.0.0/16", AddressClass.PRIVATE),
        ("100.64.0.0/10", AddressClass.CGNAT),
        ("192.0.2.0/24", AddressClass.DOCUMENTATION),
        ("198.51.100.0/24", AddressClass.DOCUMENTATION),
        ("203.0.113.0/24", AddressClass.DOCUMENTATION),
        ("198.18.0.0/15", AddressClass.BENCHMARKING),
        ("192.0.0.0/24", AddressClass.RESERVED),  # IETF protocol assignments
        ("192.88.99.0/24", AddressClass.RESERVED),  # former 6to4 relay anycast
        ("240.0.0.0/4", AddressClass.RESERVED),
    )
)

_V6_RANGES: tuple[tuple[IPv6Network, AddressClass], ...] = tuple(
    (IPv6Network(net), cls)
    for net, cls in (
        ("::/128", AddressClass.UNSPECIFIED),
        ("::1/128", AddressClass.LOOPBACK),
        ("::ffff:0:0/96", AddressClass.IPV4_MAPPED_OR_EMBEDDED),  # IPv4-mapped
        ("::ffff:0:0:0/96", AddressClass.IPV4_MAPPED_OR_EMBEDDED),  # IPv4-translated (SIIT)
        ("::/96", AddressClass.IPV4_MAPPED_OR_EMBEDDED),  # IPv4-compatible (deprecated)
        ("64:ff9b::/96", AddressClass.NAT64),
        ("64:ff9b:1::/48", AddressClass.NAT64),  # local-use NAT64 (RFC 8215)
        ("100::/64", AddressClass.RESERVED),  # discard-only
        ("2001::/32", AddressClass.TEREDO),
        ("2001:2::/48", AddressClass.BENCHMARKING),
        ("2001::/23", AddressClass.RESERVED),  # IETF protocol assignments
        ("2001:db8::/32", AddressClass.DOCUMENTATION),
        ("3fff::/20", AddressClass.DOCUMENTATION),
        ("2002::/16", AddressClass.SIX_TO_FOUR),
        ("5f00::/16", AddressClass.RESERVED),  # SRv6 SIDs
        ("fc00::/7", AddressClass.ULA),
        ("fe80::/10", AddressClass.LINK_LOCAL),
        ("fec0::/10", AddressClass.RESERVED),  # deprecated site-local
        ("ff00::/8", AddressClass.MULTICAST),
    )
)

_V6_GLOBAL_UNICAST = IPv6Network("2000::/3")


class AddressRefused(Exception):
    """The gateway will not dial `host`: `addr` (None when no address was obtained) is of
    class `klass` (None likewise), and `reason` says why in words a sysadmin can act on."""

    def __init__(
        self, host: str, addr: IPAddress | None, klass: AddressClass | None, reason: str
    ) -> None:
        self.host = host
        self.addr = addr
        self.klass = klass
        self.reason = reason
        super().__init__(f"{host}: {reason}")


# --- parsing -------------------------------------------------------------------------

# One part of an IPv4 address as inet_aton(3) reads it: hex (a bare "0x" is 0), octal
# with a leading zero, or decimal.
_INET_ATON_PART = re.compile(r"0[xX][0-9a-fA-F]*|0[0-7]*|[1-9][0-9]*")


def parse_ip_literal(text: str) -> IPAddress | None:
    """The address `text` spells, or None when `text` is a host name.

    Every IPv4 spelling glibc's inet_aton accepts is an address here, because that is
    what getaddrinfo would make of it: "2130706433", "0177.0.0.1", "0x7f.1", "127.1",
    "10.1.2" (plus one trailing dot, as browsers read it). "deadbeef" and "1e100" are
    host names. IPv6 may be bracketed ("[::1]"); an IPv4-mapped address stays IPv6
    (`classify` unwraps it).

    Raises ValueError for text that is plainly meant as an address but is not a valid
    one: any IPv6 zone id ("fe80::1%eth0"), a colon outside a valid IPv6 address,
    unbalanced brackets, or IPv4 parts out of range ("256.1.1.1").
    """
    if text.startswith("[") or text.endswith("]"):
        if not (text.startswith("[") and text.endswith("]")):
            raise ValueError(f"{text!r} has unbalanced brackets")
        inner = text[1:-1]
        if ":" not in inner:
            raise ValueError(f"{text!r}: only IPv6 addresses are written in brackets")
        return _parse_ipv6(inner)
    if ":" in text:
        return _parse_ipv6(text)
    return _parse_inet_aton(text)


def _parse_ipv6(text: str) -> IPv6Address:
    if "%" in text:
        raise ValueError(f"{text!r}: IPv6 zone ids are not accepted")
    try:
        return IPv6Address(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a valid IPv6 address") from None


def _parse_inet_aton(text: str) -> IPv4Address | None:
    parts = text.removesuffix(".").split(".")
    if len(parts) > 4 or not all(_INET_ATON_PART.fullmatch(p) for p in parts):
        return None
    values = [_inet_aton_value(p) for p in parts]
    # With n parts, the first n-1 are one byte each and the last fills the rest.
    last_bits = 8 * (5 - len(values))
    if any(v > 0xFF for v in values[:-1]) or values[-1] >= 1 << last_bits:
        raise ValueError(f"{text!r}: a part of this IPv4 address is out of range")
    number = 0
    for v in values[:-1]:
        number = number << 8 | v
    return IPv4Address(number << last_bits | values[-1])


def _inet_aton_value(part: str) -> int:
    if part[:2] in ("0x", "0X"):
        return int(part[2:] or "0", 16)
    if part.startswith("0"):
        return int(part, 8)
    return int(part)


def _as_ip(addr: IPAddress | str) -> IPAddress:
    if isinstance(addr, IPv4Address | IPv6Address):
        if isinstance(addr, IPv6Address) and addr.scope_id:
            raise ValueError(f"{addr}: IPv6 zone ids are not accepted")
        return addr
    parsed = parse_ip_literal(addr)
    if parsed is None:
        raise ValueError(f"{addr!r} is not an IP address")
    return parsed


def as_networks(items: Iterable[IPAddress | IPNetwork | str]) -> tuple[IPNetwork, ...]:
    """Addresses (as /32 or /128), networks or their text, as networks."""
    return tuple(
        item if isinstance(item, IPv4Network | IPv6Network) else ip_network(item) for item in items
    )


def _containing(ip: IPAddress, networks: Iterable[IPNetwork]) -> IPNetwork | None:
    return next((net for net in networks if ip.version == net.version and ip in net), None)


# --- classification ------------------------------------------------------------------


def address_class(addr: IPAddress) -> AddressClass:
    """What `addr` is, by the IANA special-purpose registries; no policy involved."""
    if addr in _METADATA:
        return AddressClass.METADATA
    ranges = _V4_RANGES if isinstance(addr, IPv4Address) else _V6_RANGES
    for net, cls in ranges:
        if addr in net:
            return cls
    if isinstance(addr, IPv6Address) and addr not in _V6_GLOBAL_UNICAST:
        return AddressClass.RESERVED
    return AddressClass.GLOBAL


def embedded_ipv4(addr: IPv6Address) -> tuple[IPv4Address, ...]:
    """The IPv4 addresses an IPv6 address carries (none for an ordinary one).

    For Teredo both the server and the client address; for NAT64, the last 32 bits
    (the /96 layout, which is also what a local-use prefix is normally given)."""
    cls = address_class(addr)
    if cls is AddressClass.TEREDO and addr.teredo is not None:
        return addr.teredo
    if cls is AddressClass.SIX_TO_FOUR and addr.sixtofour is not None:
        return (addr.sixtofour,)
    if cls in (AddressClass.IPV4_MAPPED_OR_EMBEDDED, AddressClass.NAT64):
        return (IPv4Address(int(addr) & 0xFFFFFFFF),)
    return ()


def classify(
    addr: IPAddress | str,
    *,
    self_addrs: Collection[IPAddress | IPNetwork | str] = (),
    allow_cidrs: Collection[IPNetwork | str] = (),
) -> tuple[bool, AddressClass, str]:
    """(allowed, class, reason) for dialing `addr`.

    `self_addrs` are the gateway's own addresses (or networks): never dialed, so a
    sandbox cannot loop through the gateway to itself or reach the host's services.
    `allow_cidrs` are the policy's ranges that let private (and other special-purpose,
    but routable) addresses through.
    """
    return _classify(_as_ip(addr), as_networks(self_addrs), as_networks(allow_cidrs))


def _classify(
    ip: IPAddress, selfs: tuple[IPNetwork, ...], allowed: tuple[IPNetwork, ...]
) -> tuple[bool, AddressClass, str]:
    if _containing(ip, selfs) is not None:
        return False, AddressClass.SELF, f"{ip} is {_DESCRIPTION[AddressClass.SELF]}"
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        # ::ffff:a.b.c.d is a.b.c.d on the wire: judge it as that address.
        ok, cls, reason = _classify(ip.ipv4_mapped, selfs, allowed)
        return ok, cls, f"IPv4-mapped {ip}: {reason}"
    cls = address_class(ip)
    description = f"{ip} is {_DESCRIPTION[cls]}"
    if cls in NEVER_ALLOWED:
        return False, cls, description
    if cls in _EMBEDDINGS and isinstance(ip, IPv6Address):
        return _classify_embedding(ip, cls, selfs, allowed)
    net = _containing(ip, allowed)
    if net is not None:
        return True, cls, f"{description}, allowed by allow_cidrs {net}"
    if cls is AddressClass.GLOBAL:
        return True, cls, description
    return False, cls, f"{description}; add its range to egress.allow_cidrs to let it through"


def _classify_embedding(
    ip: IPv6Address, cls: AddressClass, selfs: tuple[IPNetwork, ...], allowed: tuple[IPNetwork, ...]
) -> tuple[bool, AddressClass, str]:
    """IPv6 carrying IPv4 (NAT64, 6to4, Teredo, IPv4-compatible/translated): refused,
    unless allow_cidrs names the IPv6 range *and* every embedded IPv4 address is itself
    allowed (an IPv6-only host behind NAT64 lists 64:ff9b::/96 and still cannot reach
    64:ff9b::a00:1, which is 10.0.0.1)."""
    description = f"{ip} is {_DESCRIPTION[cls]}"
    for inner in embedded_ipv4(ip):
        ok, inner_cls, _ = _classify(inner, selfs, allowed)
        if not ok:
            return False, cls, f"{description}: it carries {inner}, {_DESCRIPTION[inner_cls]}"
    net = _containing(ip, allowed)
    if net is not None:
        return True, cls, f"{description}, allowed by allow_cidrs {net}"
    return (
        False,
        cls,
        f"{description}; IPv6 addresses that carry IPv4 ones are refused unless "
        "egress.allow_cidrs names their prefix",
    )


def never_allowed_overlap(network: IPNetwork) -> str | None:
    """Why no policy may list `network` in allow_cidrs, or None when it may.

    A network that overlaps a range no policy can open (loopback, link-local,
    multicast, unspecified, broadcast) or that is exactly one metadata endpoint is a
    mistake worth an error. A wider range that merely contains a metadata address
    (100.64.0.0/10 holds Alibaba's 100.100.100.200) is fine: that address stays refused.
    """
    for net, cls in _V4_RANGES + _V6_RANGES:
        if cls in NEVER_ALLOWED and net.version == network.version and net.overlaps(network):
            return f"it overlaps {net} ({cls.value}), which no policy can open"
    if network.num_addresses == 1 and network.network_address in _METADATA:
        return f"{network.network_address} is a cloud metadata endpoint, which no policy can open"
    return None


# --- resolution ----------------------------------------------------------------------


def resolve_and_check(
    host: str,
    port: int,
    *,
    resolver: Resolver,
    self_addrs: Collection[IPAddress | IPNetwork | str] = (),
    allow_cidrs: Collection[IPNetwork | str] = (),
) -> list[IPAddress]:
    """The addresses the gateway may dial for host:port, in the resolver's order.

    An IP literal is not resolved. Otherwise every address the resolver returns must be
    allowed, or the whole name is refused: a name that answers with a mix of public and
    private addresses is a rebinding or split-horizon trick, not something to pick from.
    IPv4-mapped answers come back as the IPv4 address they are, so the caller dials
    exactly what was checked. Raises AddressRefused; the resolver's own errors
    (socket.gaierror) pass through.
    """
    literal = literal_target(host, port)
    answers = [literal] if literal is not None else resolver(host, port)
    return check_answers(host, answers, self_addrs=self_addrs, allow_cidrs=allow_cidrs)


def literal_target(host: str, port: int) -> IPAddress | None:
    """The first step of `resolve_and_check`: the address `host` spells when it is an
    IP literal (not to be resolved), None for a name. ValueError for a port out of
    range; AddressRefused for text that is meant as an address but is not a valid one."""
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is not a valid TCP port")
    try:
        return parse_ip_literal(host)
    except ValueError as e:
        raise AddressRefused(host, None, None, str(e)) from None


def check_answers(
    host: str,
    answers: Sequence[IPAddress | str],
    *,
    self_addrs: Collection[IPAddress | IPNetwork | str] = (),
    allow_cidrs: Collection[IPNetwork | str] = (),
) -> list[IPAddress]:
    """The last step of `resolve_and_check`: every answer for `host` classified, all
    of them allowed or AddressRefused; the addresses to dial, IPv4-mapped ones unwrapped."""
    selfs, allowed = as_networks(self_addrs), as_networks(allow_cidrs)
    if not answers:
        raise AddressRefused(host, None, None, "the name resolved to no addresses")
    result: list[IPAddress] = []
    for answer in answers:
        ip = _as_ip(answer)
        ok, cls, reason = _classify(ip, selfs, allowed)
        if not ok:
            if len(answers) > 1:
                reason += f" (one of {len(answers)} addresses of the name: all must be allowed)"
            raise AddressRefused(host, ip, cls, reason)
        mapped = ip.ipv4_mapped if isinstance(ip, IPv6Address) else None
        dial = mapped if mapped is not None else ip
        if dial not in result:
            result.append(dial)
    return result


def local_answer(resolver: Resolver, host: str, port: int) -> Sequence[IPAddress] | None:
    """What `resolver` answers for `host` without I/O (see `Resolver`), or None."""
    local = getattr(resolver, "local", None)
    return local(host, port) if local is not None else None


def system_resolver(host: str, port: int) -> list[IPAddress]:
    """getaddrinfo (which reads /etc/hosts, then DNS): the gateway's one I/O function here."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    result: list[IPAddress] = []
    for _family, _type, _proto, _canonname, sockaddr in infos:
        addr = ip_address(str(sockaddr[0]).split("%", 1)[0])
        if addr not in result:
            result.append(addr)
    return result
