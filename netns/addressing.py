"""Sandbox ids, the kernel object names derived from them, and /31 allocation from a pool.

Pure: no I/O. namespace.py lists what the kernel holds (sandbox_ids_present,
addresses_in_use) and passes it in here as `taken` / `in_use`.

Every sandbox gets a /31 (RFC 3021): the even address is the host end of its veth
and the sandbox's gateway, the odd one is eth0 inside the sandbox. A /31 has no
network or broadcast address, so both are usable and no two sandboxes share a subnet.
"""

from __future__ import annotations

import random
import re
import secrets
from bisect import bisect_right
from collections.abc import Collection
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

DEFAULT_POOL = IPv4Network("10.213.0.0/16")

# Largest and smallest pools accepted. A /30 is the smallest that still holds /31 pairs
# with room to spare; larger than /16 would be far more than one host can run.
MIN_POOL_PREFIXLEN = 16
MAX_POOL_PREFIXLEN = 30

NETNS_PREFIX = "sg-"
IFNAME_PREFIX = "sg"
IFNAMSIZ = 15  # Linux interface names: at most 15 bytes plus the NUL

_SANDBOX_ID = re.compile(r"[0-9a-f]{8}")
_ID_ATTEMPTS = 1000


class AddressError(Exception):
    """A pool, address or sandbox id that sandgate cannot use."""


class PoolExhausted(AddressError):
    """Every /31 in the pool is in use."""


@dataclass(frozen=True)
class SandboxAddress:
    host: IPv4Address  # host end of the veth = the sandbox's gateway (even address of the /31)
    sandbox: IPv4Address  # eth0 inside the sandbox (odd address)
    prefixlen: int = 31

    def __post_init__(self) -> None:
        if not isinstance(self.host, IPv4Address) or not isinstance(self.sandbox, IPv4Address):
            raise AddressError(
                f"sandbox address pair must be IPv4 addresses, got {self.host!r}, {self.sandbox!r}"
            )
        if self.prefixlen != 31 or int(self.host) % 2 or int(self.sandbox) != int(self.host) + 1:
            raise AddressError(
                f"{self.host} / {self.sandbox} (prefix /{self.prefixlen}) is not a /31 pair: "
                "the host end must be the even address and the sandbox the next one"
            )

    @property
    def network(self) -> IPv4Network:
        return IPv4Network((self.host, self.prefixlen))


def validate_pool(pool: IPv4Network) -> None:
    """Raise AddressError unless `pool` is an IPv4 network sandboxes can be addressed from."""
    if not isinstance(pool, IPv4Network):
        raise AddressError(f"address pool {pool!r} must be an IPv4 network such as {DEFAULT_POOL}")
    if not MIN_POOL_PREFIXLEN <= pool.prefixlen <= MAX_POOL_PREFIXLEN:
        raise AddressError(
            f"address pool {pool}: prefix length must be between /{MIN_POOL_PREFIXLEN} and "
            f"/{MAX_POOL_PREFIXLEN} (each sandbox takes a /31)"
        )
    if (
        pool.is_loopback
        or pool.is_link_local
        or pool.is_multicast
        or pool.is_reserved
        or pool.is_unspecified
        or pool.overlaps(IPv4Network("0.0.0.0/8"))
    ):
        raise AddressError(
            f"address pool {pool} is in a special-purpose range (loopback, link-local, "
            "multicast, reserved or 0.0.0.0/8); use a private range such as "
            f"{DEFAULT_POOL}"
        )


def is_sandbox_id(s: str) -> bool:
    """True if `s` is a sandbox id: exactly 8 lowercase hex characters."""
    return isinstance(s, str) and _SANDBOX_ID.fullmatch(s) is not None


def _checked_id(sandbox_id: str) -> str:
    if not is_sandbox_id(sandbox_id):
        raise AddressError(
            f"invalid sandbox id {sandbox_id!r}: expected 8 lowercase hex characters"
        )
    return sandbox_id


def netns_name(sandbox_id: str) -> str:
    """The sandbox's network namespace name: `sg-<id>`."""
    return NETNS_PREFIX + _checked_id(sandbox_id)


def host_ifname(sandbox_id: str) -> str:
    """The host end of the sandbox's veth: `sg<id>`."""
    name = IFNAME_PREFIX + _checked_id(sandbox_id)
    if len(name.encode()) > IFNAMSIZ:  # cannot happen with 8-char ids; guards a format change
        raise AddressError(f"interface name {name!r} is longer than {IFNAMSIZ} bytes")
    return name


def new_sandbox_id(taken: Collection[str], rng: random.Random | None = None) -> str:
    """A random sandbox id not in `taken`.

    `taken` must hold every id whose kernel objects may still exist (namespace.
    sandbox_ids_present()) plus the ids the caller's state knows, so an id is never
    reused while anything named after it lingers.
    """
    rng = rng or secrets.SystemRandom()
    for _ in range(_ID_ATTEMPTS):
        candidate = f"{rng.getrandbits(32):08x}"
        if candidate not in taken:
            return candidate
    raise AddressError(f"no free sandbox id after {_ID_ATTEMPTS} random draws ({len(taken)} taken)")


def allocate(
    pool: IPv4Network,
    in_use: Collection[IPv4Address],
    rng: random.Random | None = None,
) -> SandboxAddress:
    """A uniformly random /31 of `pool` neither of whose addresses is in `in_use`.

    No retry loop: the k-th free pair is found by walking the sorted taken pairs, so the
    cost is O(len(in_use) log len(in_use)) however full the pool is.
    """
    validate_pool(pool)
    rng = rng or secrets.SystemRandom()
    base = int(pool.network_address)
    pairs = pool.num_addresses // 2
    taken = sorted(
        {(int(a) - base) // 2 for a in in_use if isinstance(a, IPv4Address) and a in pool}
    )
    free = pairs - len(taken)
    if free <= 0:
        raise PoolExhausted(
            f"address pool {pool} is exhausted: all {pairs} /31 pairs are in use; "
            "remove sandboxes or configure a larger pool"
        )
    # Map k in [0, free) onto the k-th pair index not in `taken`: every taken index at or
    # below the running candidate pushes it up by one.
    index = rng.randrange(free)
    pos = 0
    while True:
        skip = bisect_right(taken, index, lo=pos)
        if skip == pos:
            break
        index += skip - pos
        pos = skip
    host = IPv4Address(base + 2 * index)
    return SandboxAddress(host=host, sandbox=host + 1)
