"""netns.addressing: names, ids, pool validation and /31 allocation (pure, no root)."""

from __future__ import annotations

import random
import time
from ipaddress import IPv4Address, IPv4Network, IPv6Network

import pytest

from netns.addressing import (
    DEFAULT_POOL,
    AddressError,
    PoolExhausted,
    SandboxAddress,
    allocate,
    host_ifname,
    is_sandbox_id,
    netns_name,
    new_sandbox_id,
    validate_pool,
)

SMALL = IPv4Network("10.213.200.0/28")  # 8 pairs


def pair_addresses(pool: IPv4Network) -> list[tuple[IPv4Address, IPv4Address]]:
    base = int(pool.network_address)
    return [
        (IPv4Address(base + i), IPv4Address(base + i + 1)) for i in range(0, pool.num_addresses, 2)
    ]


# --- names and ids ------------------------------------------------------------------


def test_names_derive_from_the_id() -> None:
    assert netns_name("0123abcd") == "sg-0123abcd"
    assert host_ifname("0123abcd") == "sg0123abcd"
    assert len(host_ifname("ffffffff")) <= 15


@pytest.mark.parametrize("good", ["00000000", "deadbeef", "0123abcd"])
def test_is_sandbox_id_accepts(good: str) -> None:
    assert is_sandbox_id(good)


@pytest.mark.parametrize(
    "bad",
    ["", "abc", "0123abc", "0123abcde", "DEADBEEF", "0123abcg", "0123abc\n", " 0123abc", "../x"],
)
def test_is_sandbox_id_rejects(bad: str) -> None:
    assert not is_sandbox_id(bad)


@pytest.mark.parametrize("bad", ["DEADBEEF", "0123abcde", "x", "a/b/c/d/"])
def test_names_refuse_bad_ids(bad: str) -> None:
    with pytest.raises(AddressError, match="invalid sandbox id"):
        netns_name(bad)
    with pytest.raises(AddressError, match="invalid sandbox id"):
        host_ifname(bad)


def test_new_sandbox_id_format_and_avoids_taken() -> None:
    rng = random.Random(7)
    first = new_sandbox_id(set(), random.Random(7))
    assert is_sandbox_id(first)
    # The same seed would draw `first` again; taken forces the next draw.
    second = new_sandbox_id({first}, rng)
    assert is_sandbox_id(second) and second != first


def test_new_sandbox_id_default_rng_is_random() -> None:
    ids = {new_sandbox_id(set()) for _ in range(50)}
    assert len(ids) == 50
    assert all(is_sandbox_id(i) for i in ids)


def test_new_sandbox_id_gives_up_on_a_broken_rng() -> None:
    class Stuck(random.Random):
        def getrandbits(self, k: int) -> int:
            return 0

    with pytest.raises(AddressError, match="no free sandbox id"):
        new_sandbox_id({"00000000"}, Stuck())


# --- SandboxAddress -----------------------------------------------------------------


def test_sandbox_address_is_an_even_odd_pair() -> None:
    a = SandboxAddress(IPv4Address("10.213.0.4"), IPv4Address("10.213.0.5"))
    assert a.prefixlen == 31
    assert a.network == IPv4Network("10.213.0.4/31")


@pytest.mark.parametrize(
    ("host", "sandbox"),
    [("10.213.0.5", "10.213.0.6"), ("10.213.0.4", "10.213.0.4"), ("10.213.0.4", "10.213.0.7")],
)
def test_sandbox_address_rejects_non_pairs(host: str, sandbox: str) -> None:
    with pytest.raises(AddressError, match="not a /31 pair"):
        SandboxAddress(IPv4Address(host), IPv4Address(sandbox))


# --- validate_pool ------------------------------------------------------------------


@pytest.mark.parametrize("ok", ["10.213.0.0/16", "10.213.200.0/24", "192.168.7.0/30"])
def test_validate_pool_accepts(ok: str) -> None:
    validate_pool(IPv4Network(ok))


@pytest.mark.parametrize(
    ("pool", "message"),
    [
        (IPv4Network("10.213.0.0/31"), "prefix length must be between /16 and /30"),
        (IPv4Network("10.213.0.1/32"), "prefix length must be between /16 and /30"),
        (IPv4Network("10.0.0.0/8"), "prefix length must be between /16 and /30"),
        (IPv4Network("127.0.0.0/16"), "special-purpose"),
        (IPv4Network("169.254.0.0/16"), "special-purpose"),
        (IPv4Network("224.1.0.0/16"), "special-purpose"),
        (IPv4Network("240.1.0.0/16"), "special-purpose"),
        (IPv4Network("0.1.0.0/16"), "special-purpose"),
        (IPv6Network("fd00::/64"), "must be an IPv4 network"),
        ("10.213.0.0/16", "must be an IPv4 network"),
    ],
)
def test_validate_pool_rejects(pool: object, message: str) -> None:
    with pytest.raises(AddressError, match=message) as info:
        validate_pool(pool)  # type: ignore[arg-type]
    assert str(pool) in str(info.value) or repr(pool) in str(info.value)


# --- allocate -----------------------------------------------------------------------


def test_allocate_returns_a_pair_inside_the_pool() -> None:
    rng = random.Random(1)
    for _ in range(500):
        a = allocate(DEFAULT_POOL, set(), rng)
        assert a.host in DEFAULT_POOL and a.sandbox in DEFAULT_POOL
        assert int(a.host) % 2 == 0 and int(a.sandbox) == int(a.host) + 1
        assert a.prefixlen == 31


def test_allocate_spreads_over_the_pool() -> None:
    rng = random.Random(2)
    seen = {allocate(SMALL, set(), rng).host for _ in range(400)}
    assert seen == {h for h, _ in pair_addresses(SMALL)}


def test_allocate_never_returns_in_use_addresses() -> None:
    rng = random.Random(3)
    pairs = pair_addresses(SMALL)
    # Block pairs by either of their addresses: host ends (even) and sandbox ends (odd).
    in_use = {pairs[0][0], pairs[1][1], pairs[2][0], pairs[5][1], IPv4Address("10.1.1.1")}
    blocked = {0, 1, 2, 5}
    for _ in range(300):
        a = allocate(SMALL, in_use, rng)
        assert a.host not in in_use and a.sandbox not in in_use
        assert (a.host, a.sandbox) not in {pairs[i] for i in blocked}


def test_allocate_matches_a_brute_force_free_list() -> None:
    rng = random.Random(4)
    pool = IPv4Network("10.213.200.0/26")
    pairs = pair_addresses(pool)
    for _ in range(200):
        in_use = {addr for pair in rng.sample(pairs, rng.randrange(len(pairs))) for addr in pair}
        free = [p for p in pairs if p[0] not in in_use and p[1] not in in_use]
        got = {allocate(pool, in_use, rng).host for _ in range(20)}
        assert got <= {h for h, _ in free}


def test_allocate_last_free_pair_is_found() -> None:
    pairs = pair_addresses(DEFAULT_POOL)
    last = pairs[12345]
    in_use = {host for host, sandbox in pairs if (host, sandbox) != last}
    a = allocate(DEFAULT_POOL, in_use, random.Random(5))
    assert (a.host, a.sandbox) == last


def test_nearly_full_pool_is_fast() -> None:
    pairs = pair_addresses(DEFAULT_POOL)
    free = {pairs[10], pairs[20000], pairs[-1]}
    in_use = {s for pair in pairs if pair not in free for s in pair}
    rng = random.Random(6)
    start = time.perf_counter()
    got = {(a.host, a.sandbox) for a in (allocate(DEFAULT_POOL, in_use, rng) for _ in range(20))}
    elapsed = time.perf_counter() - start
    assert got <= free
    assert elapsed < 2.0, f"20 allocations from a nearly full /16 took {elapsed:.2f}s"


def test_exhausted_pool_raises_naming_the_pool() -> None:
    in_use = {h for h, _ in pair_addresses(SMALL)}
    with pytest.raises(PoolExhausted, match=r"10\.213\.200\.0/28 is exhausted") as info:
        allocate(SMALL, in_use)
    assert "8 /31 pairs" in str(info.value)
    assert isinstance(info.value, AddressError)


def test_exhausted_full_default_pool_is_fast() -> None:
    in_use = {h for h, _ in pair_addresses(DEFAULT_POOL)}
    start = time.perf_counter()
    with pytest.raises(PoolExhausted, match=r"10\.213\.0\.0/16"):
        allocate(DEFAULT_POOL, in_use)
    assert time.perf_counter() - start < 1.0


def test_allocate_validates_the_pool() -> None:
    with pytest.raises(AddressError, match="prefix length"):
        allocate(IPv4Network("10.213.0.0/31"), set())
