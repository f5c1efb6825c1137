"""gateway.addr: IP literal parsing and address classification. Pure: no traffic, and
resolve_and_check gets a fake resolver."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network

import pytest

from gateway.addr import (
    NEVER_ALLOWED,
    AddressClass,
    AddressRefused,
    address_class,
    classify,
    embedded_ipv4,
    never_allowed_overlap,
    parse_ip_literal,
    resolve_and_check,
)

C = AddressClass

# --- parse_ip_literal ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "addr"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0X7F.0.0.1", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0177.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("10.1.2", "10.1.0.2"),
        ("10.0.258", "10.0.1.2"),
        ("0x0a.0x00.0x00.0x01", "10.0.0.1"),
        ("0xa000001", "10.0.0.1"),
        ("017700000001", "127.0.0.1"),
        ("0", "0.0.0.0"),
        ("0x", "0.0.0.0"),
        ("4294967295", "255.255.255.255"),
        ("127.0.0.1.", "127.0.0.1"),
        ("::1", "::1"),
        ("[::1]", "::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("::ffff:10.0.0.1", "::ffff:10.0.0.1"),
        ("::ffff:7f00:1", "::ffff:127.0.0.1"),
    ],
)
def test_parse_ip_literal(text: str, addr: str) -> None:
    assert parse_ip_literal(text) == ip_address(addr)


def test_ipv4_mapped_stays_ipv6() -> None:
    mapped = parse_ip_literal("::ffff:10.0.0.1")
    assert isinstance(mapped, IPv6Address)
    assert mapped.ipv4_mapped == IPv4Address("10.0.0.1")


@pytest.mark.parametrize(
    "name",
    [
        "deadbeef",
        "1e100",
        "example.com",
        "0x7f.example",
        "127.0.0.1.example",
        "08.0.0.1",  # 8 is not an octal digit: inet_aton fails, so it is a name
        "0xg.1",
        "1.2.3.4.5",
        "+1.2.3.4",
        "",
        "localhost",
    ],
)
def test_host_names_are_not_ip_literals(name: str) -> None:
    assert parse_ip_literal(name) is None


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("fe80::1%eth0", "zone ids"),
        ("[fe80::1%25eth0]", "zone ids"),
        ("[127.0.0.1]", "only IPv6 addresses are written in brackets"),
        ("[::1", "unbalanced brackets"),
        ("::1]", "unbalanced brackets"),
        ("1:2", "not a valid IPv6 address"),
        ("example.com:443", "not a valid IPv6 address"),
        ("256.0.0.1", "out of range"),
        ("1.2.3.256", "out of range"),
        ("1.16777216", "out of range"),
        ("4294967296", "out of range"),
        ("0x100000000", "out of range"),
    ],
)
def test_malformed_ip_literals_raise(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_ip_literal(text)


# --- classification ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("addr", "klass"),
    [
        ("2130706433", C.LOOPBACK),
        ("0x7f.1", C.LOOPBACK),
        ("0177.0.0.1", C.LOOPBACK),
        ("127.1", C.LOOPBACK),
        ("::1", C.LOOPBACK),
        ("[::1]", C.LOOPBACK),
        ("::ffff:10.0.0.1", C.PRIVATE),
        ("::ffff:7f00:1", C.LOOPBACK),
        ("169.254.169.254", C.METADATA),
        ("169.254.170.2", C.METADATA),
        ("100.100.100.200", C.METADATA),
        ("168.63.129.16", C.METADATA),
        ("fd00:ec2::254", C.METADATA),
        ("64:ff9b::a00:1", C.NAT64),
        ("64:ff9b::5db8:d822", C.NAT64),
        ("64:ff9b:1::a00:1", C.NAT64),
        ("2002:a00:1::", C.SIX_TO_FOUR),
        ("2002:5db8:d822::1", C.SIX_TO_FOUR),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", C.TEREDO),
        ("::10.0.0.1", C.IPV4_MAPPED_OR_EMBEDDED),
        ("::ffff:0:5db8:d822", C.IPV4_MAPPED_OR_EMBEDDED),
        ("100.64.1.1", C.CGNAT),
        ("100.127.255.255", C.CGNAT),
        ("10.0.0.1", C.PRIVATE),
        ("10.255.255.255", C.PRIVATE),
        ("192.168.1.1", C.PRIVATE),
        ("172.16.0.1", C.PRIVATE),
        ("172.31.255.255", C.PRIVATE),
        ("0.0.0.0", C.UNSPECIFIED),
        ("0.1.2.3", C.UNSPECIFIED),
        ("::", C.UNSPECIFIED),
        ("255.255.255.255", C.BROADCAST),
        ("224.0.0.1", C.MULTICAST),
        ("239.255.255.250", C.MULTICAST),
        ("ff02::1", C.MULTICAST),
        ("240.0.0.1", C.RESERVED),
        ("192.0.0.8", C.RESERVED),
        ("100::1", C.RESERVED),
        ("fec0::1", C.RESERVED),
        ("4000::1", C.RESERVED),
        ("169.254.1.1", C.LINK_LOCAL),
        ("fe80::1", C.LINK_LOCAL),
        ("fc00::1", C.ULA),
        ("fd12:3456::1", C.ULA),
        ("192.0.2.1", C.DOCUMENTATION),
        ("198.51.100.7", C.DOCUMENTATION),
        ("203.0.113.9", C.DOCUMENTATION),
        ("2001:db8::1", C.DOCUMENTATION),
        ("198.18.0.1", C.BENCHMARKING),
        ("198.19.255.255", C.BENCHMARKING),
        ("2001:2::1", C.BENCHMARKING),
    ],
)
def test_refused_with_the_right_class(addr: str, klass: AddressClass) -> None:
    allowed, got, reason = classify(addr)
    assert not allowed
    assert got is klass, reason
    assert reason


@pytest.mark.parametrize(
    "addr",
    [
        "93.184.216.34",
        "8.8.8.8",
        "1.1.1.1",
        "172.32.0.1",
        "100.128.0.1",
        "192.169.0.1",
        "198.20.0.1",
        "2606:2800:220:1:248:1893:25c8:1946",
        "2a00:1450:4001:80b::200e",
        "::ffff:93.184.216.34",
    ],
)
def test_public_addresses_are_allowed(addr: str) -> None:
    allowed, klass, reason = classify(addr)
    assert allowed
    assert klass is C.GLOBAL
    assert "global unicast" in reason


def test_classify_accepts_address_objects() -> None:
    assert classify(IPv4Address("10.0.0.1"))[1] is C.PRIVATE
    assert classify(IPv6Address("fe80::1"))[1] is C.LINK_LOCAL


def test_classify_rejects_non_addresses() -> None:
    with pytest.raises(ValueError, match="not an IP address"):
        classify("example.com")
    with pytest.raises(ValueError, match="zone ids"):
        classify(IPv6Address("fe80::1%eth0"))


def test_allow_cidrs_let_a_private_range_through() -> None:
    cidrs = [ip_network("10.214.0.0/16")]
    allowed, klass, reason = classify("10.214.0.5", allow_cidrs=cidrs)
    assert allowed
    assert klass is C.PRIVATE
    assert "allowed by allow_cidrs 10.214.0.0/16" in reason
    assert classify("10.215.0.5", allow_cidrs=cidrs)[:2] == (False, C.PRIVATE)
    assert classify("::ffff:10.214.0.5", allow_cidrs=cidrs)[0]
    assert classify("100.64.0.1", allow_cidrs=["100.64.0.0/10"])[:2] == (True, C.CGNAT)
    assert classify("fd12::1", allow_cidrs=["fd12::/16"])[:2] == (True, C.ULA)
    assert classify("198.18.0.1", allow_cidrs=["198.18.0.0/15"])[:2] == (True, C.BENCHMARKING)


def test_private_refusal_says_how_to_open_it() -> None:
    assert "add its range to egress.allow_cidrs" in classify("10.0.0.1")[2]


def test_self_is_refused_even_when_allow_cidrs_cover_it() -> None:
    self_addrs = [ip_address("10.214.0.1")]
    cidrs = [ip_network("10.214.0.0/16")]
    result = classify("10.214.0.1", self_addrs=self_addrs, allow_cidrs=cidrs)
    assert result[:2] == (False, C.SELF)
    assert classify("::ffff:10.214.0.1", self_addrs=self_addrs, allow_cidrs=cidrs)[1] is C.SELF
    assert classify("10.214.0.2", self_addrs=self_addrs, allow_cidrs=cidrs)[0]
    assert classify("93.184.216.34", self_addrs=["93.184.216.0/24"])[1] is C.SELF


@pytest.mark.parametrize(
    ("addr", "cidr"),
    [
        ("127.0.0.1", "0.0.0.0/0"),
        ("169.254.169.254", "169.254.0.0/16"),
        ("100.100.100.200", "100.64.0.0/10"),
        ("fd00:ec2::254", "fd00::/8"),
        ("fe80::1", "::/0"),
        ("224.0.0.1", "224.0.0.0/4"),
        ("0.0.0.0", "0.0.0.0/8"),
    ],
)
def test_no_allow_cidr_opens_loopback_link_local_or_metadata(addr: str, cidr: str) -> None:
    allowed, klass, _ = classify(addr, allow_cidrs=[cidr])
    assert not allowed
    assert klass in NEVER_ALLOWED


def test_ipv6_embeddings_are_refused_even_when_the_ipv4_is_public() -> None:
    for addr in ["64:ff9b::5db8:d822", "2002:5db8:d822::1", "::93.184.216.34"]:
        allowed, _, reason = classify(addr)
        assert not allowed
        assert "unless egress.allow_cidrs names their prefix" in reason


def test_embedded_private_address_is_named_in_the_reason() -> None:
    allowed, klass, reason = classify("64:ff9b::a00:1")
    assert (allowed, klass) == (False, C.NAT64)
    assert "carries 10.0.0.1, a private (RFC 1918) address" in reason


def test_nat64_prefix_in_allow_cidrs_still_checks_the_embedded_address() -> None:
    cidrs = ["64:ff9b::/96"]
    assert classify("64:ff9b::5db8:d822", allow_cidrs=cidrs)[:2] == (True, C.NAT64)
    assert classify("64:ff9b::a00:1", allow_cidrs=cidrs)[:2] == (False, C.NAT64)
    assert classify("64:ff9b::7f00:1", allow_cidrs=cidrs)[:2] == (False, C.NAT64)
    assert classify("64:ff9b::a00:1", allow_cidrs=[*cidrs, "10.0.0.0/8"])[0]


def test_embedded_ipv4() -> None:
    assert embedded_ipv4(IPv6Address("64:ff9b::a00:1")) == (IPv4Address("10.0.0.1"),)
    assert embedded_ipv4(IPv6Address("2002:a00:1::")) == (IPv4Address("10.0.0.1"),)
    server, client = embedded_ipv4(IPv6Address("2001:0:4136:e378:8000:63bf:3fff:fdd2"))
    assert (server, client) == (IPv4Address("65.54.227.120"), IPv4Address("192.0.2.45"))
    assert embedded_ipv4(IPv6Address("2606:2800:220:1::1")) == ()


def test_address_class_is_policy_free() -> None:
    assert address_class(IPv4Address("10.214.0.5")) is C.PRIVATE
    assert address_class(IPv4Address("93.184.216.34")) is C.GLOBAL


@pytest.mark.parametrize(
    ("cidr", "refused"),
    [
        ("0.0.0.0/0", True),
        ("127.0.0.0/8", True),
        ("127.0.0.1/32", True),
        ("169.254.0.0/16", True),
        ("224.0.0.0/24", True),
        ("255.255.255.255/32", True),
        ("::/0", True),
        ("::1/128", True),
        ("fe80::/64", True),
        ("ff00::/8", True),
        ("100.100.100.200/32", True),
        ("fd00:ec2::254/128", True),
        ("10.0.0.0/8", False),
        ("100.64.0.0/10", False),
        ("fc00::/7", False),
        ("64:ff9b::/96", False),
        ("8.0.0.0/8", False),
    ],
)
def test_never_allowed_overlap(cidr: str, refused: bool) -> None:
    assert (never_allowed_overlap(ip_network(cidr)) is not None) is refused


# --- resolve_and_check ---------------------------------------------------------------


def fake_resolver(answers: dict[str, list[str]]):
    calls: list[tuple[str, int]] = []

    def resolve(host: str, port: int) -> list[IPv4Address | IPv6Address]:
        calls.append((host, port))
        return [ip_address(a) for a in answers.get(host, [])]

    resolve.calls = calls  # type: ignore[attr-defined]
    return resolve


def test_all_public_answers_are_returned_in_order() -> None:
    resolver = fake_resolver({"packages.example": ["93.184.216.34", "2606:2800:220:1::1"]})
    got = resolve_and_check("packages.example", 443, resolver=resolver)
    assert got == [ip_address("93.184.216.34"), ip_address("2606:2800:220:1::1")]
    assert resolver.calls == [("packages.example", 443)]  # type: ignore[attr-defined]


def test_a_mixed_answer_refuses_the_whole_name() -> None:
    resolver = fake_resolver({"rebind.example": ["93.184.216.34", "10.0.0.1"]})
    with pytest.raises(AddressRefused) as info:
        resolve_and_check("rebind.example", 443, resolver=resolver)
    e = info.value
    assert (e.host, e.addr, e.klass) == ("rebind.example", ip_address("10.0.0.1"), C.PRIVATE)
    assert "all must be allowed" in e.reason
    assert str(e).startswith("rebind.example: 10.0.0.1 is a private")


@pytest.mark.parametrize(
    ("answer", "klass"),
    [
        ("127.0.0.1", C.LOOPBACK),
        ("169.254.169.254", C.METADATA),
        ("::ffff:127.0.0.1", C.LOOPBACK),
        ("64:ff9b::a00:1", C.NAT64),
        ("fd00:ec2::254", C.METADATA),
    ],
)
def test_a_name_resolving_to_a_refused_address_is_refused(answer: str, klass: AddressClass) -> None:
    resolver = fake_resolver({"evil.example": [answer]})
    with pytest.raises(AddressRefused) as info:
        resolve_and_check("evil.example", 80, resolver=resolver)
    assert info.value.klass is klass


def test_ip_literals_are_not_resolved() -> None:
    resolver = fake_resolver({})
    assert resolve_and_check("93.184.216.34", 443, resolver=resolver) == [
        ip_address("93.184.216.34")
    ]
    with pytest.raises(AddressRefused) as info:
        resolve_and_check("0x7f.1", 443, resolver=resolver)
    assert (info.value.addr, info.value.klass) == (ip_address("127.0.0.1"), C.LOOPBACK)
    with pytest.raises(AddressRefused) as info:
        resolve_and_check("[fe80::1%25eth0]", 443, resolver=resolver)
    assert (info.value.addr, info.value.klass) == (None, None)
    assert resolver.calls == []  # type: ignore[attr-defined]


def test_allow_cidrs_and_self_apply_to_resolved_answers() -> None:
    resolver = fake_resolver({"mirror.lan.example": ["10.214.0.5", "10.214.0.6"]})
    got = resolve_and_check(
        "mirror.lan.example", 80, resolver=resolver, allow_cidrs=["10.214.0.0/16"]
    )
    assert got == [ip_address("10.214.0.5"), ip_address("10.214.0.6")]
    with pytest.raises(AddressRefused) as info:
        resolve_and_check(
            "mirror.lan.example",
            80,
            resolver=resolver,
            allow_cidrs=["10.214.0.0/16"],
            self_addrs=["10.214.0.6"],
        )
    assert info.value.klass is C.SELF


def test_mapped_answers_are_returned_as_the_ipv4_address_dialed() -> None:
    resolver = fake_resolver({"a.example": ["::ffff:93.184.216.34", "93.184.216.34"]})
    assert resolve_and_check("a.example", 443, resolver=resolver) == [ip_address("93.184.216.34")]


def test_no_answers_is_refused() -> None:
    with pytest.raises(AddressRefused, match="resolved to no addresses"):
        resolve_and_check("empty.example", 443, resolver=fake_resolver({}))


def test_resolver_errors_pass_through() -> None:
    def failing(host: str, port: int) -> list[IPv4Address | IPv6Address]:
        raise OSError("name or service not known")

    with pytest.raises(OSError, match="not known"):
        resolve_and_check("nx.example", 443, resolver=failing)


@pytest.mark.parametrize("port", [0, -1, 65536])
def test_bad_port(port: int) -> None:
    with pytest.raises(ValueError, match="not a valid TCP port"):
        resolve_and_check("a.example", port, resolver=fake_resolver({}))
