"""sandgate's nftables rulesets as data: libnftables JSON documents, rendered by pure functions.

Owns the shape of the host table `inet sandgate` (two sets keyed by interface name, and
chains that never change once created), the per-sandbox set elements, and the table
applied inside each sandbox's netns. Nothing here touches the kernel; nft/apply.py does.

Every rule carries a comment naming its purpose. Comments survive the round trip through
the kernel, so a read-back can be compared rule by rule without relying on handles.

The JSON is written in the exact form libnftables 1.0.6 prints when listing, so what is
applied and what is read back compare equal without translation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

TABLE = "sandgate"
FAMILY = "inet"

SANDBOX_SRC = "sandbox_src"  # ifname . ipv4_addr: which source address each sg<id> may use
GATEWAY_EP = "gateway_ep"  # ifname . ipv4_addr . inet_service: the one endpoint it may reach

HOST_IFNAME_PREFIX = "sg"
HOST_IFNAME_GLOB = HOST_IFNAME_PREFIX + "*"
SANDBOX_IFNAME = "eth0"  # the sandbox end of the veth, inside the sandbox netns
IFNAME_MAX = 15  # IFNAMSIZ - 1

# filter - 10: ahead of any ordinary filter chain at priority 0. Order does not make a
# drop less final, but it keeps our verdicts first in `nft monitor trace` and counters.
HOST_PRIORITY = -10
SANDBOX_PRIORITY = 0

_IFNAME_RE = re.compile(r"[A-Za-z0-9_-]+")
_TABLE_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")

Doc = dict[str, Any]


@dataclass(frozen=True)
class SandboxElements:
    """One sandbox's entries in the host table: its interface, its address, its endpoint."""

    host_ifname: str  # "sg<id>", the host end of the veth
    sandbox_addr: IPv4Address  # the sandbox end (eth0 inside)
    gateway_addr: IPv4Address  # the host end's address, where the gateway listens
    gateway_port: int  # the gateway's TCP port on that address

    def __post_init__(self) -> None:
        check_host_ifname(self.host_ifname, "host_ifname")
        check_unicast(self.sandbox_addr, "sandbox_addr")
        check_unicast(self.gateway_addr, "gateway_addr")
        check_port(self.gateway_port, "gateway_port")
        if self.sandbox_addr == self.gateway_addr:
            raise ValueError(
                f"sandbox_addr and gateway_addr are both {self.sandbox_addr}: "
                "the two ends of a veth need distinct addresses"
            )


def check_host_ifname(value: object, field: str) -> None:
    """Raise ValueError unless value can name a sandbox's host-side interface."""
    if not isinstance(value, str):
        raise ValueError(f"{field}: expected an interface name, got {value!r}")
    if len(value) > IFNAME_MAX:
        raise ValueError(
            f"{field}: {value!r} is {len(value)} characters; Linux allows at most {IFNAME_MAX}"
        )
    if not value.startswith(HOST_IFNAME_PREFIX) or len(value) <= len(HOST_IFNAME_PREFIX):
        # The input chain only looks at interfaces matching "sg*"; any other name would be
        # an element that no rule ever consults.
        raise ValueError(f"{field}: {value!r} must be {HOST_IFNAME_PREFIX!r} followed by an id")
    if not _IFNAME_RE.fullmatch(value):
        raise ValueError(f"{field}: {value!r} may contain only letters, digits, '_' and '-'")


def check_unicast(value: object, field: str) -> None:
    """Raise ValueError unless value is an IPv4Address usable as one end of a veth."""
    if not isinstance(value, IPv4Address):
        raise ValueError(f"{field}: expected an IPv4Address, got {value!r}")
    if (
        value.is_unspecified
        or value.is_loopback
        or value.is_multicast
        or value == IPv4Address("255.255.255.255")
    ):
        raise ValueError(f"{field}: {value} is not a unicast address a veth end can have")


def check_port(value: object, field: str) -> None:
    """Raise ValueError unless value is a TCP port number (1-65535)."""
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise ValueError(f"{field}: {value!r} is not a TCP port (1-65535)")


def check_table(value: object) -> None:
    """Raise ValueError unless value is a plausible table name of ours."""
    if not isinstance(value, str) or not _TABLE_RE.fullmatch(value):
        raise ValueError(
            f"table: {value!r} must be a letter followed by up to 63 letters, digits, '_' or '-'"
        )


# --- expression builders (fresh dicts each call: documents are never shared) ----------------


def _meta(key: str) -> Doc:
    return {"meta": {"key": key}}


def _payload(protocol: str, field: str) -> Doc:
    return {"payload": {"protocol": protocol, "field": field}}


def _match(left: Any, right: Any, op: str = "==") -> Doc:
    return {"match": {"op": op, "left": left, "right": right}}


def _accept() -> Doc:
    return {"accept": None}


def _drop() -> Doc:
    return {"drop": None}


def _ct_replies() -> Doc:
    return _match({"ct": {"key": "state"}}, ["established", "related"], op="in")


def _ipv6() -> Doc:
    return _match(_meta("nfproto"), "ipv6")


# --- document pieces ----------------------------------------------------------------------


def _table(table: str) -> Doc:
    return {"table": {"family": FAMILY, "name": table}}


def _set(table: str, name: str, types: list[str]) -> Doc:
    return {"set": {"family": FAMILY, "table": table, "name": name, "type": types}}


def _chain(table: str, name: str, hook: str | None = None, **base: Any) -> Doc:
    chain: Doc = {"family": FAMILY, "table": table, "name": name}
    if hook is not None:
        chain.update({"type": "filter", "hook": hook, **base})
    return {"chain": chain}


def _rule(table: str, chain: str, comment: str, *expr: Doc) -> Doc:
    return {
        "rule": {
            "family": FAMILY,
            "table": table,
            "chain": chain,
            "comment": f"sandgate: {comment}",
            "expr": list(expr),
        }
    }


def host_table(table: str = TABLE) -> Doc:
    """The whole host table, to be applied in one transaction.

    The table is `create`d, so the transaction fails as a whole if the table already
    exists: applying it twice can never duplicate rules.
    """
    check_table(table)
    src = "from_sandbox"
    objects = [
        _table(table),
        _set(table, SANDBOX_SRC, ["ifname", "ipv4_addr"]),
        _set(table, GATEWAY_EP, ["ifname", "ipv4_addr", "inet_service"]),
        _chain(table, "input", "input", prio=HOST_PRIORITY, policy="accept"),
        _chain(table, src),
        _chain(table, "forward", "forward", prio=HOST_PRIORITY, policy="accept"),
        _rule(
            table,
            "input",
            "traffic from sandboxes",
            _match(_meta("iifname"), HOST_IFNAME_GLOB),
            {"jump": {"target": src}},
        ),
        _rule(
            table,
            src,
            "spoofed source",
            _match(
                {"concat": [_meta("iifname"), _payload("ip", "saddr")]},
                f"@{SANDBOX_SRC}",
                op="!=",
            ),
            _drop(),
        ),
        _rule(table, src, "no ipv6", _ipv6(), _drop()),
        _rule(table, src, "replies", _ct_replies(), _accept()),
        _rule(
            table,
            src,
            "gateway endpoint",
            _match(
                {"concat": [_meta("iifname"), _payload("ip", "daddr"), _payload("tcp", "dport")]},
                f"@{GATEWAY_EP}",
            ),
            _accept(),
        ),
        _rule(table, src, "everything else", _drop()),
        _rule(
            table,
            "forward",
            "no forwarding from sandboxes",
            _match(_meta("iifname"), HOST_IFNAME_GLOB),
            _drop(),
        ),
        _rule(
            table,
            "forward",
            "no forwarding to sandboxes",
            _match(_meta("oifname"), HOST_IFNAME_GLOB),
            _drop(),
        ),
    ]
    return {"nftables": [{"create" if i == 0 else "add": obj} for i, obj in enumerate(objects)]}


def _elements(e: SandboxElements, table: str) -> list[Doc]:
    check_table(table)
    if not isinstance(e, SandboxElements):
        raise ValueError(f"expected SandboxElements, got {e!r}")
    return [
        {
            "element": {
                "family": FAMILY,
                "table": table,
                "name": SANDBOX_SRC,
                "elem": [{"concat": [e.host_ifname, str(e.sandbox_addr)]}],
            }
        },
        {
            "element": {
                "family": FAMILY,
                "table": table,
                "name": GATEWAY_EP,
                "elem": [{"concat": [e.host_ifname, str(e.gateway_addr), e.gateway_port]}],
            }
        },
    ]


def add_sandbox(e: SandboxElements, table: str = TABLE) -> Doc:
    """Add one sandbox's elements to both sets. Adding an element that exists is a no-op."""
    return {"nftables": [{"add": el} for el in _elements(e, table)]}


def delete_sandbox(e: SandboxElements, table: str = TABLE) -> Doc:
    """Delete one sandbox's elements from both sets.

    Each element is added before it is deleted, in the same transaction: nft fails a
    delete of an absent element, and the add makes the delete succeed whether or not the
    element was there. The sets themselves must exist.
    """
    elements = _elements(e, table)
    return {"nftables": [{"add": el} for el in elements] + [{"delete": el} for el in elements]}


def sandbox_table(gateway_addr: IPv4Address, gateway_port: int, table: str = TABLE) -> Doc:
    """The table applied inside a sandbox's netns: output only to lo and the gateway endpoint.

    Both chains default to drop, so anything not named here (IPv6, DNS, any other
    address or port) never leaves the sandbox.
    """
    check_table(table)
    check_unicast(gateway_addr, "gateway_addr")
    check_port(gateway_port, "gateway_port")
    base = {"prio": SANDBOX_PRIORITY, "policy": "drop"}
    objects = [
        _table(table),
        _chain(table, "output", "output", **base),
        _chain(table, "input", "input", **base),
        _rule(table, "output", "loopback", _match(_meta("oif"), "lo"), _accept()),
        _rule(table, "output", "no ipv6", _ipv6(), _drop()),
        _rule(table, "output", "replies", _ct_replies(), _accept()),
        _rule(
            table,
            "output",
            "gateway endpoint",
            _match(_meta("oifname"), SANDBOX_IFNAME),
            _match(_payload("ip", "daddr"), str(gateway_addr)),
            _match(_payload("tcp", "dport"), gateway_port),
            _accept(),
        ),
        _rule(table, "input", "loopback", _match(_meta("iif"), "lo"), _accept()),
        _rule(table, "input", "no ipv6", _ipv6(), _drop()),
        _rule(table, "input", "replies", _ct_replies(), _accept()),
    ]
    return {"nftables": [{"create" if i == 0 else "add": obj} for i, obj in enumerate(objects)]}


def delete_table(table: str = TABLE) -> Doc:
    """Delete a whole table of ours (both the host table and the in-sandbox one)."""
    check_table(table)
    return {"nftables": [{"delete": _table(table)}]}
