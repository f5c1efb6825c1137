"""gateway/http.py with plain bytes: every malformed input is refused with the right
status, and good requests come out rebuilt exactly."""

from __future__ import annotations

import random

import h11
import pytest

from gateway.http import (
    CONNECTION_CRITICAL,
    END_OF_BODY,
    MAX_HEADER_BLOCK,
    MAX_HEADERS,
    MAX_REQUEST_LINE,
    NEED_DATA,
    BadRequest,
    ProxyRequest,
    RequestKind,
    RequestReader,
    encode_chunk,
    end_chunked,
    response,
    serialize_request_head,
)

SECRET = "s3cr3t-T0ken-value"


def read_all(raw: bytes, *, limit: int | None = None, step: int | None = None, **kw) -> list:
    """Every event `raw` yields (fed whole, or `step` bytes at a time), then EOF."""
    reader = RequestReader(**kw)
    events: list = []
    chunks = [raw] if step is None else [raw[i : i + step] for i in range(0, len(raw), step)]
    chunks.append(b"")  # end of input
    for chunk in chunks:
        reader.feed(chunk)
        while True:
            event = reader.next_event()
            if event is NEED_DATA:
                break
            events.append(event)
            if isinstance(event, ProxyRequest) and limit is not None:
                reader.limit_body(limit)
            if event is END_OF_BODY:
                return events
    return events


def refused(raw: bytes, status: int = 400, **kw) -> BadRequest:
    with pytest.raises(BadRequest) as info:
        read_all(raw, **kw)
    assert info.value.status == status, info.value.reason
    assert SECRET not in info.value.reason
    return info.value


def get(target: str = "http://example.com/", *headers: str, version: str = "1.1") -> bytes:
    lines = [f"GET {target} HTTP/{version}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def post(body_headers: str, body: bytes) -> bytes:
    return (
        b"POST http://example.com/up HTTP/1.1\r\nHost: example.com\r\n"
        + body_headers.encode()
        + b"\r\n"
        + body
    )


# --- framing -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        "Content-Length: 5\r\nContent-Length: 5\r\n",  # several, even equal
        "Content-Length: 5\r\nContent-Length: 6\r\n",
        "Content-Length: 5, 5\r\n",
        "Content-Length: +5\r\n",
        "Content-Length: 0x5\r\n",
        "Content-Length: \r\n",
        "Transfer-Encoding: gzip, chunked\r\n",
        "Transfer-Encoding: chunked, chunked\r\n",
        "Transfer-Encoding: identity\r\n",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: xchunked\r\n",
        "Transfer-Encoding: \r\n",
    ],
)
def test_ambiguous_framing_is_refused(headers: str) -> None:
    refused(post(headers, b"hello"))


def test_transfer_encoding_in_http10_is_refused() -> None:
    refused(b"POST http://example.com/ HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")


@pytest.mark.parametrize(
    "body",
    [
        b"g\r\nhello\r\n0\r\n\r\n",  # not hex
        b"-5\r\nhello\r\n0\r\n\r\n",
        b"0x5\r\nhello\r\n0\r\n\r\n",
        b" 5\r\nhello\r\n0\r\n\r\n",
        b"5 \r\nhello\r\n0\r\n\r\n",  # h11 allows trailing whitespace
        b"\r\nhello\r\n0\r\n\r\n",  # empty size
        b"00000000000000005\r\nhello\r\n0\r\n\r\n",  # 17 digits
        b"5;ext=1\r\nhello\r\n0\r\n\r\n",  # chunk extension
        b"5;\r\nhello\r\n0\r\n\r\n",
        b"5\nhello\r\n0\r\n\r\n",  # bare LF after the size
        b"5\r\nhelloX\r\n0\r\n\r\n",  # data longer than its size
        b"5\r\nhello\n0\r\n\r\n",  # bare LF after the data
        b"5\r\nhello\r\r\n0\r\n\r\n",
        b"5\r\nhello0\r\n\r\n",  # no CRLF after the data at all
        b"5\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n",  # trailer fields
        b"5\r\nhello\r\n0\r\n\n",
    ],
)
def test_bad_chunked_bodies_are_refused(body: bytes) -> None:
    refused(post("Transfer-Encoding: chunked\r\n", body))
    refused(post("Transfer-Encoding: chunked\r\n", body), step=1)


def test_a_bad_chunk_is_refused_before_any_of_its_data_is_returned() -> None:
    reader = RequestReader()
    reader.feed(post("Transfer-Encoding: chunked\r\n", b"3\r\nabc\r\n4;x\r\nwxyz\r\n"))
    assert isinstance(reader.next_event(), ProxyRequest)
    with pytest.raises(BadRequest):
        reader.next_event()


def test_incomplete_bodies_are_refused() -> None:
    refused(post("Content-Length: 10\r\n", b"hello"))  # then EOF
    refused(post("Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n"))


# --- the head ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"GET http://example.com/ HTTP/1.1\nHost: example.com\r\n\r\n",  # bare LF, request line
        b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\n\r\n",
        b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\n\n",
        b"GET http://example.com/ HTTP/1.1\rHost: example.com\r\n\r\n",  # bare CR
        b"GET http://example.com/ HTTP/1.1\r\nHost: exa\rmple.com\r\n\r\n",
        b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\nX: a\rb\r\n\r\n",
        b"\r\nGET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n",  # leading CRLF
        b"\nGET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n",
    ],
)
def test_bare_cr_or_lf_and_empty_lines_are_refused(raw: bytes) -> None:
    refused(raw)
    refused(raw, step=1)


def test_bare_lf_is_refused_without_waiting_for_the_end_of_the_head() -> None:
    reader = RequestReader()
    reader.feed(b"GET http://example.com/ HTTP/1.1\n")
    with pytest.raises(BadRequest):
        reader.next_event()


@pytest.mark.parametrize("byte", [0, 1, 8, 0x0B, 0x0C, 0x1B, 0x1F, 0x7F])
def test_control_bytes_are_refused(byte: int) -> None:
    c = chr(byte)
    refused(get("http://example.com/", "Host: example.com", f"X-Thing: a{c}b"))
    refused(get("http://example.com/", "Host: example.com", f"X-Th{c}ing: ab"))
    refused(get(f"http://example.com/a{c}b", "Host: example.com"))


def test_htab_and_obs_text_in_values_are_accepted() -> None:
    (req, _) = read_all(get("http://example.com/", "Host: example.com", "X-A: a\tb\xe9"))
    assert (b"X-A", b"a\tb\xe9") in req.headers


@pytest.mark.parametrize("fold", [" continued", "\tcontinued"])
def test_obs_fold_is_refused(fold: str) -> None:
    refused(get("http://example.com/", "Host: example.com", "X-A: a", fold))
    refused(get("http://example.com/", f"{fold}", "Host: example.com"))


@pytest.mark.parametrize("line", ["Host : example.com", "Host\t: example.com", "X-A : 1"])
def test_whitespace_before_the_colon_is_refused(line: str) -> None:
    headers = [line] if line.startswith("Host") else ["Host: example.com", line]
    e = refused(get("http://example.com/", *headers))
    assert "colon" in e.reason


@pytest.mark.parametrize("line", ["NoColon", ": empty-name", "X(A): 1", "X A: 1"])
def test_malformed_header_lines_are_refused(line: str) -> None:
    refused(get("http://example.com/", "Host: example.com", line))


@pytest.mark.parametrize(
    "target,headers",
    [
        ("http://example.com/", ["Host: example.com", "Host: example.com"]),  # duplicate
        ("http://example.com/", ["Host: other.example"]),
        ("http://example.com/", ["Host: example.com:8080"]),
        ("http://example.com:8080/", ["Host: example.com"]),  # Host means port 80
        ("http://example.com/", ["Host: user@example.com"]),
        ("http://example.com/", ["Host: example.com/x"]),
        ("http://example.com/", ["Host: "]),
        ("http://example.com/", ["Host: exa mple.com"]),
        ("http://example.com/", []),  # HTTP/1.1 requires Host
        ("http://127.0.0.1/", ["Host: 127.0.0.2"]),
    ],
)
def test_host_must_be_single_and_match_the_target(target: str, headers: list[str]) -> None:
    refused(get(target, *headers))


def test_host_matching_is_canonical() -> None:
    for target, host in [
        ("http://Example.COM./", "example.com"),
        ("http://example.com/", "EXAMPLE.com:80"),
        ("http://example.com:8080/", "example.com:8080"),
        ("http://127.1/", "127.0.0.1"),
        ("http://[::1]:8080/", "[0::1]:8080"),
    ]:
        (req, _) = read_all(get(target, f"Host: {host}"))
        assert req.kind is RequestKind.HTTP


def test_connect_host_header() -> None:
    raw = b"CONNECT example.com:443 HTTP/1.1\r\nHost: %s\r\n\r\n"
    for ok in (b"example.com:443", b"example.com", b"EXAMPLE.com:443"):
        (req, end) = read_all(raw % ok)
        assert req.is_connect and (req.target_host, req.port) == ("example.com", 443)
        assert end is END_OF_BODY
    for bad in (b"example.com:8443", b"other.example:443", b"example.com:80"):
        refused(raw % bad)


def test_size_limits() -> None:
    long_target = "http://example.com/" + "a" * MAX_REQUEST_LINE
    refused(get(long_target, "Host: example.com"))
    refused(get(long_target, "Host: example.com"), step=4096)
    # Without any line end, the reader gives up once the limit is passed.
    reader = RequestReader()
    reader.feed(b"GET http://example.com/" + b"a" * MAX_REQUEST_LINE)
    with pytest.raises(BadRequest):
        reader.next_event()

    big = [f"X-Pad-{i}: " + "b" * 1000 for i in range(MAX_HEADER_BLOCK // 1000 + 1)]
    read_all(get("http://example.com/", "Host: example.com", *big[:30]))  # ~30 KB: fine
    refused(get("http://example.com/", "Host: example.com", *big))
    refused(get("http://example.com/", "Host: example.com", *big), step=4096)

    many = [f"X-H{i}: 1" for i in range(MAX_HEADERS)]
    refused(get("http://example.com/", "Host: example.com", *many))
    (req, _) = read_all(get("http://example.com/", "Host: example.com", *many[:-1]))
    assert len(req.headers) == MAX_HEADERS - 1


def test_size_limits_are_exact() -> None:
    # A request line of exactly MAX_REQUEST_LINE bytes passes.
    head = "GET http://example.com/ HTTP/1.1"
    target = "http://example.com/" + "a" * (MAX_REQUEST_LINE - len(head))
    line = f"GET {target} HTTP/1.1"
    assert len(line) == MAX_REQUEST_LINE
    read_all(get(target, "Host: example.com"))
    refused(get(target + "a", "Host: example.com"))


@pytest.mark.parametrize("option", sorted(CONNECTION_CRITICAL))
def test_connection_naming_a_critical_header_is_refused(option: str) -> None:
    refused(get("http://example.com/", "Host: example.com", f"Connection: close, {option}"))
    refused(get("http://example.com/", "Host: example.com", f"Connection: {option.upper()}"))


def test_malformed_connection_header_is_refused() -> None:
    refused(get("http://example.com/", "Host: example.com", "Connection: a b"))
    refused(get("http://example.com/", "Host: example.com", "Connection: a,,b"))


@pytest.mark.parametrize(
    "line",
    [
        "GET / HTTP/1.1",  # origin-form
        "OPTIONS * HTTP/1.1",  # asterisk-form
        "GET https://example.com/ HTTP/1.1",
        "GET HTTPS://example.com/ HTTP/1.1",
        "GET ftp://example.com/ HTTP/1.1",
        "GET example.com:80 HTTP/1.1",  # authority-form without CONNECT
        "GET http://user:" + SECRET + "@example.com/ HTTP/1.1",
        "GET http://" + SECRET + "@example.com/ HTTP/1.1",
        "GET http://example.com/#frag HTTP/1.1",
        "GET http:///path HTTP/1.1",
        "GET http://exa_mple.com/ HTTP/1.1",
        "GET http://example.com:0/ HTTP/1.1",
        "GET http://example.com:65536/ HTTP/1.1",
        "GET http://example.com:/ HTTP/1.1",
        "GET http://example.com:8o/ HTTP/1.1",
        "GET http://256.1.1.1/ HTTP/1.1",
        "GET http://[::1/ HTTP/1.1",
        "GET http://fe80::1/ HTTP/1.1",
        "CONNECT example.com HTTP/1.1",  # no port
        "CONNECT http://example.com:443/ HTTP/1.1",
        "CONNECT user@example.com:443 HTTP/1.1",
        "CONNECT example.com:443/x HTTP/1.1",
        "GET  http://example.com/ HTTP/1.1",  # two spaces
        "GET http://example.com/  HTTP/1.1",
        "GET http://example.com/ HTTP/1.1 ",
        "GET http://example.com/ http/1.1",
        "GET http://example.com/ HTTP/11",
        "GET http://example.com/",  # HTTP/0.9 style
        "G(T http://example.com/ HTTP/1.1",
    ],
)
def test_bad_request_lines_and_targets_are_refused(line: str) -> None:
    refused((line + "\r\nHost: example.com\r\n\r\n").encode())


def test_origin_form_is_accepted_only_where_allowed() -> None:
    raw = b"GET /_sandgate/v1/policy HTTP/1.1\r\nHost: localhost\r\n\r\n"
    refused(raw)
    (req, end) = read_all(raw, allow_origin_form=True)
    assert req.kind is RequestKind.LOCAL and req.path == "/_sandgate/v1/policy"
    assert end is END_OF_BODY
    refused(b"OPTIONS * HTTP/1.1\r\nHost: localhost\r\n\r\n", allow_origin_form=True)


@pytest.mark.parametrize("version", ["2.0", "0.9", "1.2", "3.0"])
def test_other_http_versions_are_505(version: str) -> None:
    refused(get("http://example.com/", "Host: example.com", version=version), 505)


@pytest.mark.parametrize(
    "headers",
    [
        ["Upgrade: websocket", "Connection: Upgrade"],
        ["Upgrade: h2c"],
        ["Connection: upgrade"],
    ],
)
def test_upgrades_are_501(headers: list[str]) -> None:
    refused(get("http://example.com/", "Host: example.com", *headers), 501)


def test_connect_with_a_body_is_refused() -> None:
    refused(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com\r\nContent-Length: 3\r\n\r\n")
    refused(
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )


def test_eof_before_the_head_is_complete() -> None:
    refused(b"GET http://example.com/ HTTP/1.1\r\nHost: exa")


# --- body limits ---------------------------------------------------------------------


def test_content_length_over_the_limit_is_413_before_any_body() -> None:
    reader = RequestReader()
    reader.feed(post("Content-Length: 11\r\n", b"hello world"))
    assert isinstance(reader.next_event(), ProxyRequest)
    reader.limit_body(10)
    with pytest.raises(BadRequest) as info:
        reader.next_event()
    assert info.value.status == 413


def test_chunked_over_the_limit_is_413_mid_stream_without_an_end() -> None:
    body = b"4\r\nabcd\r\n4\r\nefgh\r\n4\r\nijkl\r\n0\r\n\r\n"
    reader = RequestReader()
    reader.feed(post("Transfer-Encoding: chunked\r\n", b""))
    assert isinstance(reader.next_event(), ProxyRequest)
    reader.limit_body(10)
    got = b""
    with pytest.raises(BadRequest) as info:
        for i in range(len(body)):
            reader.feed(body[i : i + 1])
            while (event := reader.next_event()) is not NEED_DATA:
                assert event is not END_OF_BODY
                got += event
    assert info.value.status == 413
    assert got == b"abcdefgh"  # the third chunk was refused before any of it came out
    # Exactly at the limit is fine.
    events = read_all(post("Transfer-Encoding: chunked\r\n", body), limit=12)
    assert b"".join(e for e in events if isinstance(e, bytes)) == b"abcdefghijkl"


# --- good requests, rebuilt ----------------------------------------------------------


def test_get_is_rebuilt_in_origin_form_without_proxy_headers() -> None:
    raw = (
        b"GET http://Example.com/path/x?q=1&r=%20 HTTP/1.1\r\n"
        b"Host: example.com\r\n"
        b"User-Agent: curl/8.0\r\n"
        b"Proxy-Authorization: Basic " + SECRET.encode() + b"\r\n"
        b"Proxy-Connection: Keep-Alive\r\n"
        b"X-Forwarded-For: 10.0.0.1\r\n"
        b"x-forwarded-proto: https\r\n"
        b"Forwarded: for=10.0.0.1\r\n"
        b"Via: 1.1 inner\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"TE: trailers\r\n"
        b"Trailer: X-T\r\n"
        b"Connection: keep-alive, TE, X-Hop\r\n"
        b"X-Hop: drop me\r\n"
        b"Authorization: Bearer upstream-token\r\n"
        b"Cookie: a=b\r\n"
        b"Accept: */*\r\n\r\n"
    )
    for step in (None, 1, 7):
        (req, end) = read_all(raw, step=step)
        assert end is END_OF_BODY
        assert (req.method, req.kind, req.target_host, req.port, req.path) == (
            "GET",
            RequestKind.HTTP,
            "example.com",
            80,
            "/path/x?q=1&r=%20",
        )
        assert serialize_request_head(req) == (
            b"GET /path/x?q=1&r=%20 HTTP/1.1\r\n"
            b"Host: example.com\r\n"
            b"User-Agent: curl/8.0\r\n"
            b"Authorization: Bearer upstream-token\r\n"
            b"Cookie: a=b\r\n"
            b"Accept: */*\r\n"
            b"Connection: close\r\n\r\n"
        )


def test_post_with_content_length_keeps_its_framing() -> None:
    for step in (None, 1, 5):
        req, *body, end = read_all(post("Content-Length: 11\r\n", b"hello worldEXTRA"), step=step)
        assert b"".join(body) == b"hello world"  # what follows the body is dropped
        assert end is END_OF_BODY
        assert req.content_length == 11 and not req.chunked
        assert serialize_request_head(req) == (
            b"POST /up HTTP/1.1\r\nHost: example.com\r\nContent-Length: 11\r\n"
            b"Connection: close\r\n\r\n"
        )


def test_chunked_is_decoded_strictly_and_reencoded() -> None:
    body = (
        b"5\r\nhello\r\n00006\r\n world\r\nA\r\n0123456789\r\n0\r\n\r\nGET http://x/ HTTP/1.1\r\n"
    )
    for step in (None, 1, 3):
        req, *data, end = read_all(post("Transfer-Encoding: Chunked\r\n", body), step=step)
        assert req.chunked and req.content_length is None
        assert end is END_OF_BODY
        assert b"".join(data) == b"hello world0123456789"
        assert serialize_request_head(req) == (
            b"POST /up HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n"
        )
        wire = b"".join(encode_chunk(d) for d in data) + end_chunked()
        assert read_all(post("Transfer-Encoding: chunked\r\n", wire))[1:-1]  # re-parses


def test_http10_and_ports_and_ipv6() -> None:
    (req, _) = read_all(get("http://example.com:8080", version="1.0"))
    assert serialize_request_head(req) == (
        b"GET / HTTP/1.0\r\nHost: example.com:8080\r\nConnection: close\r\n\r\n"
    )
    (req, _) = read_all(get("http://example.com?x=1", "Host: example.com"))
    assert req.path == "/?x=1"
    (req, _) = read_all(get("http://[2001:db8::1]:81/", "Host: [2001:db8::1]:81"))
    assert (req.target_host, req.port) == ("2001:db8::1", 81)
    assert serialize_request_head(req).split(b"\r\n")[1] == b"Host: [2001:db8::1]:81"


def test_ip_literals_are_kept_for_the_policy_to_deny() -> None:
    for literal in ("2130706433", "0x7f.1", "127.1", "10.0.0.1"):
        (req, _) = read_all(get(f"http://{literal}/", f"Host: {literal}"))
        assert req.target_host == literal


def test_idna_hosts_are_normalised() -> None:
    (req, _) = read_all(get("http://XN--BCHER-KVA.example/", "Host: xn--bcher-kva.example"))
    assert req.target_host == "xn--bcher-kva.example"


def test_connect_and_the_bytes_after_its_head() -> None:
    reader = RequestReader()
    reader.feed(b"CONNECT Example.com:8443 HTTP/1.1\r\nHost: example.com:8443\r\n\r\n\x16\x03\x01")
    req = reader.next_event()
    assert isinstance(req, ProxyRequest) and req.is_connect
    assert (req.target_host, req.port, req.path) == ("example.com", 8443, "")
    assert reader.next_event() is END_OF_BODY
    assert reader.trailing_data() == b"\x16\x03\x01"


def test_expect_is_forwarded() -> None:
    (req, *_) = read_all(post("Content-Length: 1\r\nExpect: 100-continue\r\n", b"x"))
    assert (b"Expect", b"100-continue") in req.headers


def test_response() -> None:
    raw = response(403, "denied\n", "0123456789abcdef", extra_headers=[("Retry-After", "1")])
    head, body = raw.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 403 Forbidden"
    assert b"X-Sandgate-Request-Id: 0123456789abcdef" in lines
    assert b"Connection: close" in lines
    assert b"Content-Length: 7" in lines
    assert b"Retry-After: 1" in lines
    assert body == b"denied\n"
    with pytest.raises(ValueError):
        response(400, "", "id", extra_headers=[("X-A", "a\r\nInjected: 1")])


def test_encode_chunk() -> None:
    assert encode_chunk(b"hello" * 4) == b"14\r\n" + b"hello" * 4 + b"\r\n"
    assert encode_chunk(b"") == b""
    assert end_chunked() == b"0\r\n\r\n"


# --- one head, read in one piece or byte by byte; and what h11 makes of it -----------
# A head that arrives whole is checked by one regular expression (_WELL_FORMED_HEAD) and
# only split; one that arrives in pieces, or does not match, is checked line by line.
# Both ways must decide alike, and h11 (which frames bodies) must accept every head the
# reader accepts, reading the same request from it.

HEADS = [
    get("http://example.com/", "Host: example.com"),
    get("http://example.com:8080/p?q=1", "Host: example.com:8080", "Accept: */*"),
    get("http://example.com/", "Host: example.com", "X-A: a\tb\xe9", "X-Empty:", "X-B:  c  "),
    get("http://example.com/", version="1.0"),
    get("http://[::1]:8080/", "Host: [0::1]:8080"),
    get("http://example.com/", "Host: example.com", "Connection: close, X-Drop", "X-Drop: 1"),
    get("http://example.com/", "Host: example.com", "Proxy-Authorization: Basic " + SECRET),
    post("Content-Length: 5\r\n", b"hello"),
    post("Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"),
    b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\nearly",
    b"GET /_sandgate/v1/policy HTTP/1.1\r\nHost: localhost\r\n\r\n",
    get("http://example.com/", "Host: example.com", *[f"X-H{i}: 1" for i in range(MAX_HEADERS)]),
    get("http://example.com/" + "a" * MAX_REQUEST_LINE, "Host: example.com"),
    get("http://example.com/", "Host: example.com", "X-Big: " + "b" * MAX_HEADER_BLOCK),
    get("http://example.com/", "Host: example.com", "X-A: a", " folded"),
    get("http://example.com/", "Host: example.com", "X-A : 1"),
    get("http://example.com/", "Host: example.com", "X-A: a\x01b"),
    get("http://example.com/", "Host: example.com", "X-A: a\x7f"),
    get("http://example.com/", "Host: example.com", "NoColon"),
    get("http://example.com/", "Host: example.com", "Host: example.com"),
    get("http://example.com/", "Host: other.example"),
    get("http://example.com/", "Host: example.com", "Upgrade: websocket"),
    get("http://example.com/", "Host: example.com", version="2.0"),
    get("http://example.com/"),
    get("https://example.com/", "Host: example.com"),
    get("http://example.com/a\x80b", "Host: example.com"),
    b"GET http://example.com/ HTTP/1.1\nHost: example.com\r\n\r\n",
    b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\rX: y\r\n\r\n",
    b"GET  http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n",
    b"\r\nGET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n",
    post("Content-Length: 5\r\nContent-Length: 5\r\n", b"hello"),
    post("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", b"hello"),
    post("Transfer-Encoding: gzip\r\n", b"hello"),
]


def outcome(raw: bytes, step: int | None = None) -> tuple:
    """("read", the request, its body, the last event) or ("refused", status, reason)."""
    try:
        req, *rest = read_all(raw, step=step, allow_origin_form=True)
    except BadRequest as e:
        return ("refused", e.status, e.reason)
    body = b"".join(event for event in rest if isinstance(event, bytes))
    return ("read", req, body, rest[-1] if rest else None)


def same_as_h11(raw: bytes, req: ProxyRequest) -> None:
    """h11 reads the same request from the head (the headers the reader forwards are
    h11's, in order, with the same values)."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw[: raw.index(b"\r\n\r\n") + 4])
    event = conn.next_event()
    assert isinstance(event, h11.Request), raw
    assert (event.method.decode(), event.http_version.decode()) == (req.method, req.http_version)
    items = list(event.headers.raw_items())
    assert [h for h in items if h in req.headers] == list(req.headers)


@pytest.mark.parametrize("raw", HEADS, ids=range(len(HEADS)))
def test_a_head_is_read_alike_in_one_piece_and_byte_by_byte(raw: bytes) -> None:
    whole = outcome(raw)
    assert outcome(raw, step=1) == whole
    if whole[0] == "read":
        same_as_h11(raw, whole[1])


def test_mutated_heads_are_read_alike_in_one_piece_and_byte_by_byte() -> None:
    rng = random.Random(20261127)
    alphabet = b"\x00\x01\x09\x0b\x0d\x0a\x20\x7f\x80\xff:;,/@[]?#%aZ09-_."
    read = 0
    for _ in range(3000):
        raw = bytearray(rng.choice(HEADS[:11]))
        end = raw.index(b"\r\n\r\n") + 4
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(end)
            if rng.random() < 0.5:
                raw[at : at + 1] = bytes([rng.choice(alphabet)])
            else:
                raw[at:at] = bytes([rng.choice(alphabet)])
        raw = bytes(raw)
        whole = outcome(raw)
        assert outcome(raw, step=1) == whole, raw
        if whole[0] == "read" and b"\r\n\r\n" in raw:
            read += 1
            same_as_h11(raw, whole[1])
    assert read > 100  # the mutations leave many heads valid, not only broken ones
