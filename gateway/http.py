"""The HTTP front of the egress proxy, sans-IO: bytes in, a parsed request and body
bytes out, or `BadRequest`; and the bytes the proxy sends (the rebuilt upstream head,
chunk framing, its own short answers). No sockets here (python-hyper/h11's shape).

h11 frames the body. It is deliberately lenient in ways a proxy cannot afford: in
0.16 it accepts bare LF line endings, control bytes (\\x01-\\x08, \\x0e-\\x1f, \\x7f) in
header values, obs-fold continuation lines (it joins them), Content-Length repeated
with an equal value or as a list ("5, 5"), Content-Length together with
Transfer-Encoding (it lets chunked win, the classic request-smuggling pair), chunk
extensions with any bytes in them, trailer fields, and any "HTTP/d.d" version. So the
head is parsed and validated here, and the raw chunked body is validated
(`_ChunkedValidator`) before h11 sees it. h11 is given the head only when there is a
body to frame (parsing a head costs it more than the rest of a small request): its
grammar for the request line and header fields is the same as this module's or looser
in every part, so it reads the same request from any head that passed
(tests/unit/test_http_front.py checks this on mutated heads). Anything outside what
this module accepts is a `BadRequest` and nothing of the request is forwarded.

A head that arrives whole in the first bytes is checked by one regular expression
(`_WELL_FORMED_HEAD`) and then only split; one that does not match, or arrives in
pieces, is checked line by line, which also says what is wrong with it.

What is accepted (a forward proxy, one request per client connection):
- absolute-form `http://host[:port]/path?query` (port 80 by default) and CONNECT
  `host:port` (authority-form); origin-form only where the caller allows it (the
  in-sandbox API on the Unix socket). https:// absolute-form, userinfo, fragments,
  asterisk-form and other schemes are refused.
- HTTP/1.0 and HTTP/1.1 (anything else: 505). Request line at most 8 KiB, header
  block at most 32 KiB and 100 fields; over those limits is 400, not 431, because
  the proxy answers every malformed head the same way and closes.
- Host once at most (required for 1.1), equal to the target's authority; for
  CONNECT a Host without a port matches any port, since CONNECT has no scheme and
  so no default port.
- `Connection` may name hop-by-hop options ("close", "keep-alive", "te", ...) and
  extension headers, which are then removed (RFC 9110 7.6.1); naming a header
  whose removal changes the framing, target or authentication of the request
  (`CONNECTION_CRITICAL`) is refused rather than obeyed.
- Upgrade (WebSocket over plain HTTP, h2c) is 501: the proxy does not switch
  protocols; wss:// goes through CONNECT.
- Chunked bodies: chunk sizes of 1 to 16 hex digits, no extensions, CRLF after
  every chunk's data, no trailer fields. Bytes after the end of the request
  (pipelining) are dropped: the proxy serves one request per connection.

The rebuilt upstream request: the origin-form request line in the client's HTTP
version, Host from the target, the remaining end-to-end headers in their order and
spelling, the framing header, and `Connection: close`. Removed: Proxy-Authorization,
Proxy-Connection, Forwarded, X-Forwarded-*, Via, and every hop-by-hop header. No Via
is added (RFC 9110 asks proxies for one, but it would only tell upstreams about the
gateway, and the sandbox is not anyone's business).

BadRequest reasons never quote header values or the request target: they are
returned to the client and written to the audit log, and values may be secrets.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus

import h11

from gateway.addr import parse_ip_literal
from gateway.policy import normalize_host

MAX_REQUEST_LINE = 8 * 1024
MAX_HEADER_BLOCK = 32 * 1024
MAX_HEADERS = 100
MAX_CHUNK_SIZE_DIGITS = 16
_MAX_HEAD = MAX_REQUEST_LINE + 2 + MAX_HEADER_BLOCK + 2

# Headers a client may not ask the proxy to drop by naming them in Connection: they
# decide the framing (content-length, transfer-encoding), the target (host), the
# meaning of the body (content-*) or authentication (authorization, cookie).
CONNECTION_CRITICAL = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "content-type",
        "content-encoding",
        "content-range",
        "expect",
        "authorization",
        "proxy-authorization",
        "cookie",
    }
)

# Never forwarded: hop-by-hop (RFC 9110 7.6.1, plus the de-facto Proxy-Connection),
# the proxy's own credentials, and what a sandbox has no business asserting about
# proxies or client addresses. Host and the framing headers are rebuilt.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
    }
)
_NOT_FORWARDED = HOP_BY_HOP | {"forwarded", "via", "host", "content-length"}

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_TOKEN_RE = re.compile(_TOKEN)
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])")
_HEADER_LINE = re.compile(rb"(" + _TOKEN + rb"):[ \t]*(.*?)[ \t]*")
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_BARE_CR_OR_LF = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_CONTENT_LENGTH = re.compile(rb"[0-9]{1,18}")
_ABSOLUTE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?]*)(.*)", re.DOTALL)
_PORT = re.compile(r"[0-9]{1,5}")
# A head that is certainly well formed: request line (checked further by _REQUEST_LINE),
# then header fields `name: value` with no control character but HT in the value, each
# line ending in CRLF, no folding; group 1 is the request line. What does not match is
# parsed line by line, which says what is wrong with it.
_WELL_FORMED_HEAD = re.compile(
    rb"(" + _TOKEN + rb" [\x21-\x7e]+ HTTP/[0-9]\.[0-9])\r\n"
    rb"(?:" + _TOKEN + rb":[\t\x20-\x7e\x80-\xff]*\r\n)*\r\n"
)
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,%d}\r\n" % MAX_CHUNK_SIZE_DIGITS)


class BadRequest(Exception):
    """The request is refused before anything is forwarded (or, mid-body, before the
    upstream receives a complete request). `status` is the HTTP status to answer
    with (400, 413, 501, 505); `reason` says what was wrong, quoting no header value."""

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(f"{status}: {reason}")


class RequestKind(enum.Enum):
    HTTP = "http"  # absolute-form http://, forwarded as origin-form
    CONNECT = "connect"  # authority-form host:port, a tunnel
    LOCAL = "local"  # origin-form, for the gateway itself (in-sandbox API)


@dataclass(frozen=True)
class ProxyRequest:
    """A request that passed every check.

    `target_host` is normalised (gateway.policy.normalize_host: lower case, IDNA
    A-labels, no trailing dot) or, for an IP literal, the literal as written in lower
    case without brackets (the policy denies literals; they are kept for the log).
    `path` is origin-form ("/p?q") for HTTP and LOCAL, "" for CONNECT. `headers` are
    the end-to-end headers to forward, as h11 parsed them (original spelling), without
    Host, framing or hop-by-hop headers. `content_length` None with `chunked` False
    means no body."""

    method: str
    kind: RequestKind
    target_host: str
    port: int
    path: str
    http_version: str
    headers: tuple[tuple[bytes, bytes], ...]
    content_length: int | None = None
    chunked: bool = False

    @property
    def is_connect(self) -> bool:
        return self.kind is RequestKind.CONNECT


class Sentinel:
    """A named marker returned by the sans-IO readers (http, pktline) instead of data."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = Sentinel("NEED_DATA")
"""next_event(): feed more bytes (or b"" at end of input)."""
END_OF_BODY = Sentinel("END_OF_BODY")
"""next_event(): the body is complete (returned at once for CONNECT and bodiless requests)."""

Event = ProxyRequest | bytes | Sentinel


class RequestReader:
    """One request from a client, h11 style: `feed(bytes)` (b"" for end of input),
    then `next_event()` until it returns NEED_DATA. Events: one ProxyRequest, then
    body bytes (de-chunked), then END_OF_BODY. Raises BadRequest.

    `allow_origin_form` lets origin-form targets through as RequestKind.LOCAL (only
    the Unix-socket listener serves them). `limit_body(n)` sets the body limit once
    the policy has decided: a Content-Length over it, or chunked data whose declared
    chunk sizes would exceed it, raise BadRequest(413) before any of that data is
    returned. After a CONNECT head, `trailing_data()` is whatever the client sent
    past the head (the start of the tunnel)."""

    def __init__(self, *, allow_origin_form: bool = False) -> None:
        self._allow_origin_form = allow_origin_form
        self._buf = bytearray()
        self._scanned = 0
        self._eof = False
        self._request: ProxyRequest | None = None
        self._head = b""
        self._h11: h11.Connection | None = None  # made for the body, see _body_parser
        self._chunks: _ChunkedValidator | None = None
        self._limit: int | None = None
        self._done = False

    def feed(self, data: bytes) -> None:
        if not data:
            self._eof = True
        elif not self._eof:
            self._buf += data

    def limit_body(self, max_bytes: int) -> None:
        self._limit = max_bytes
        if self._chunks is not None:
            self._chunks.limit = max_bytes

    def received(self) -> bytes:
        """Every byte fed and not yet read as a body: the request head exactly as it
        was sent, then what followed it (before any body is read: the whole input)."""
        return self._head + bytes(self._buf)

    def trailing_data(self) -> bytes:
        """Bytes received after the head of a CONNECT (or a bodiless request)."""
        return bytes(self._buf)

    def next_event(self) -> Event:
        if self._request is None:
            return self._read_head()
        if self._done:
            return END_OF_BODY
        return self._read_body()

    # --- head ------------------------------------------------------------------------

    def _read_head(self) -> ProxyRequest | Sentinel:
        buf = self._buf
        end = buf.find(b"\r\n\r\n", max(0, self._scanned - 3))
        if end >= 0 and self._scanned == 0:
            # The whole head in the first bytes (the usual case): one match says it is
            # well formed; anything else takes the way below, which finds what is wrong.
            head = bytes(buf[: end + 4])
            m = _WELL_FORMED_HEAD.fullmatch(head)
            if m is not None and m.end(1) <= MAX_REQUEST_LINE:
                block = head[m.end(1) + 2 : -4]
                lines = block.split(b"\r\n") if block else []
                if len(block) + 2 <= MAX_HEADER_BLOCK and len(lines) <= MAX_HEADERS:
                    del buf[: end + 4]
                    return self._have_head(head, m.group(1), lines, well_formed=True)
        head_len = end + 4 if end >= 0 else len(buf)
        # Bare CR/LF are refused as soon as they arrive, so a client using bare LF
        # gets its 400 now rather than the proxy waiting for a CRLFCRLF that never
        # comes. A CR at the very end may still be followed by its LF.
        scan_to = head_len if end >= 0 or not buf.endswith(b"\r") else head_len - 1
        bare = _BARE_CR_OR_LF.search(buf, max(0, self._scanned - 1), scan_to)
        if bare is not None:
            which = "CR" if buf[bare.start()] == 0x0D else "LF"
            raise BadRequest(400, f"bare {which} in the request head: lines end with CRLF")
        self._scanned = scan_to
        if end < 0:
            line_end = buf.find(b"\r\n")
            if (line_end < 0 and len(buf) > MAX_REQUEST_LINE) or line_end > MAX_REQUEST_LINE:
                raise BadRequest(400, f"request line longer than {MAX_REQUEST_LINE} bytes")
            if line_end >= 0 and len(buf) - line_end - 2 > MAX_HEADER_BLOCK:
                raise BadRequest(400, f"header block larger than {MAX_HEADER_BLOCK} bytes")
            if self._eof:
                raise BadRequest(400, "the connection closed before the request head was complete")
            return NEED_DATA
        head = bytes(buf[:head_len])
        del buf[:head_len]
        request_line, *lines = head[:-4].split(b"\r\n")
        if len(request_line) > MAX_REQUEST_LINE:
            raise BadRequest(400, f"request line longer than {MAX_REQUEST_LINE} bytes")
        if len(head) - len(request_line) - 2 > MAX_HEADER_BLOCK + 2:
            raise BadRequest(400, f"header block larger than {MAX_HEADER_BLOCK} bytes")
        return self._have_head(head, request_line, lines, well_formed=False)

    def _have_head(
        self, head: bytes, request_line: bytes, lines: list[bytes], *, well_formed: bool
    ) -> ProxyRequest:
        self._head = head
        self._request = self._parse_head(request_line, lines, well_formed)
        if self._request.chunked:
            self._chunks = _ChunkedValidator(self._limit)
        elif not self._request.content_length:
            self._done = True
        return self._request

    def _parse_head(
        self, request_line: bytes, lines: list[bytes], well_formed: bool
    ) -> ProxyRequest:
        """`well_formed`: _WELL_FORMED_HEAD matched the head, so every line is known
        to be a valid header field and only needs splitting."""
        m = _REQUEST_LINE.fullmatch(request_line)
        if m is None:
            raise BadRequest(
                400, "malformed request line: expected 'METHOD target HTTP/1.1', single spaces"
            )
        method, target, major, minor = m.groups()
        if (major, minor) not in ((b"1", b"1"), (b"1", b"0")):
            raise BadRequest(505, "only HTTP/1.0 and HTTP/1.1 are accepted")
        if len(lines) > MAX_HEADERS:
            raise BadRequest(400, f"more than {MAX_HEADERS} header fields")
        if well_formed:
            raw = [_split_header_line(line) for line in lines]
        else:
            raw = [_check_header_line(line) for line in lines]
        fields = [(name.decode("ascii").lower(), value) for name, value in raw]

        version = f"{major.decode()}.{minor.decode()}"
        content_length, chunked = _framing(fields, version)
        stripped = _connection_options(fields)
        if "upgrade" in stripped or any(name == "upgrade" for name, _ in fields):
            raise BadRequest(
                501, "protocol upgrades are not supported through plain HTTP; use CONNECT"
            )
        hosts = [value for name, value in fields if name == "host"]
        if len(hosts) > 1:
            raise BadRequest(400, "more than one Host header")
        if version == "1.1" and not hosts:
            raise BadRequest(400, "HTTP/1.1 requires a Host header")

        method_text = method.decode("ascii")
        kind, host, port, path = self._parse_target(method_text, target.decode("ascii"))
        if kind is RequestKind.CONNECT and (content_length is not None or chunked):
            raise BadRequest(400, "a CONNECT request carries no body")
        if hosts and kind is not RequestKind.LOCAL:
            _check_host_header(hosts[0], host, port, kind)

        forwarded = tuple(
            raw[i] for i, (name, _) in enumerate(fields) if not _dropped(name, stripped)
        )
        return ProxyRequest(
            method_text, kind, host, port, path, version, forwarded, content_length, chunked
        )

    def _parse_target(self, method: str, target: str) -> tuple[RequestKind, str, int, str]:
        if "#" in target:
            raise BadRequest(400, "a request target has no fragment ('#')")
        if method == "CONNECT":
            if "/" in target or "@" in target:
                raise BadRequest(400, "CONNECT takes host:port (authority-form)")
            host, port = _parse_authority(target, default_port=None)
            return RequestKind.CONNECT, host, port, ""
        if target.startswith("/") and self._allow_origin_form:
            return RequestKind.LOCAL, "", 0, target
        if target.startswith("/") or target == "*":
            raise BadRequest(
                400,
                "this is a forward proxy: send absolute-form requests "
                "(GET http://host/path) or CONNECT host:port",
            )
        m = _ABSOLUTE.fullmatch(target)
        if m is None:
            raise BadRequest(400, "the request target is not an absolute http:// URL")
        scheme, authority, rest = m.groups()
        if scheme.lower() == "https":
            raise BadRequest(400, "https:// goes through CONNECT, not as a plain request")
        if scheme.lower() != "http":
            raise BadRequest(400, "only http:// URLs are forwarded")
        if "@" in authority:
            raise BadRequest(400, "credentials (userinfo) in the URL are not accepted")
        host, port = _parse_authority(authority, default_port=80)
        if not rest.startswith("/"):
            rest = "/" + rest  # "http://h" and "http://h?q" mean "/" and "/?q"
        return RequestKind.HTTP, host, port, rest

    # --- body ------------------------------------------------------------------------

    def _read_body(self) -> bytes | Sentinel:
        req = self._request
        assert req is not None
        if self._limit is not None and (req.content_length or 0) > self._limit:
            raise BadRequest(413, f"body of {req.content_length} bytes exceeds {self._limit}")
        parser = self._h11 or self._body_parser()
        if self._buf:
            data = bytes(self._buf)
            self._buf.clear()
            if self._chunks is not None:
                data = data[: self._chunks.check(data)]
            parser.receive_data(data)
        try:
            event = parser.next_event()
            if event is h11.NEED_DATA and self._eof:
                parser.receive_data(b"")
                event = parser.next_event()
        except h11.RemoteProtocolError:
            raise BadRequest(
                400, "the connection closed before the request body was complete"
            ) from None
        if isinstance(event, h11.Data):
            return bytes(event.data)
        if isinstance(event, h11.EndOfMessage):
            self._done = True
            return END_OF_BODY
        return NEED_DATA

    def _body_parser(self) -> h11.Connection:
        """h11, which frames the body, given the head first. It accepts every head this
        module accepts (its grammar is the same or looser in each part: see
        tests/unit/test_http_front.py), so a refusal here is a bug; it still means 400,
        before any of the body is returned."""
        parser = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD)
        try:
            parser.receive_data(self._head)
            event = parser.next_event()
        except h11.RemoteProtocolError as e:
            raise BadRequest(400, f"malformed request: {_h11_reason(e)}") from None
        if not isinstance(event, h11.Request):  # cannot happen with a complete head
            raise BadRequest(400, "malformed request head")
        self._h11 = parser
        return parser


class _ChunkedValidator:
    """The strict chunked grammar, checked over raw bytes before h11 decodes them:
    `1*16HEXDIG CRLF data CRLF` ... `0 CRLF CRLF`; no extensions, no trailers."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self._state = "size"
        self._line = bytearray()
        self._remaining = 0
        self._total = 0

    def check(self, data: bytes) -> int:
        """How many bytes of `data` belong to the body (the rest follows its end)."""
        i = 0
        while i < len(data) and self._state != "done":
            if self._state == "size":
                nl = data.find(b"\n", i)
                self._line += data[i : nl + 1 if nl >= 0 else len(data)]
                i = nl + 1 if nl >= 0 else len(data)
                if nl < 0:
                    if len(self._line) > MAX_CHUNK_SIZE_DIGITS + 1:
                        raise BadRequest(400, "malformed chunk size line")
                    continue
                self._chunk_size(bytes(self._line))
                self._line.clear()
            elif self._state == "data":
                take = min(self._remaining, len(data) - i)
                self._remaining -= take
                i += take
                if self._remaining == 0:
                    self._state = "data-cr"
            else:
                expected = {"data-cr": 0x0D, "data-lf": 0x0A, "last-cr": 0x0D, "last-lf": 0x0A}
                if data[i] != expected[self._state]:
                    if self._state == "last-cr":
                        raise BadRequest(
                            400, "trailer fields after a chunked body are not accepted"
                        )
                    raise BadRequest(400, "chunk data not followed by CRLF")
                i += 1
                following = {
                    "data-cr": "data-lf",
                    "data-lf": "size",
                    "last-cr": "last-lf",
                    "last-lf": "done",
                }
                self._state = following[self._state]
        return i

    def _chunk_size(self, line: bytes) -> None:
        if b";" in line:
            raise BadRequest(400, "chunk extensions are not accepted")
        if not _CHUNK_SIZE.fullmatch(line):
            raise BadRequest(
                400, f"malformed chunk size: 1 to {MAX_CHUNK_SIZE_DIGITS} hex digits and CRLF"
            )
        size = int(line[:-2], 16)
        if size == 0:
            self._state = "last-cr"
            return
        if self.limit is not None and self._total + size > self.limit:
            raise BadRequest(413, f"chunked body exceeds {self.limit} bytes")
        self._total += size
        self._remaining = size
        self._state = "data"


# --- head helpers --------------------------------------------------------------------


def _split_header_line(line: bytes) -> tuple[bytes, bytes]:
    """_check_header_line for a line known to be valid."""
    name, _, value = line.partition(b":")
    return name, value.strip(b" \t")


def _check_header_line(line: bytes) -> tuple[bytes, bytes]:
    """(name as sent, value without surrounding whitespace) of one raw header line,
    or BadRequest."""
    m = _HEADER_LINE.fullmatch(line)
    if m is None or _CONTROL.search(line):
        if line[:1] in (b" ", b"\t"):
            raise BadRequest(400, "obsolete line folding (a header line starting with whitespace)")
        if _CONTROL.search(line):
            raise BadRequest(400, "control character in a header field")
        name, colon, _ = line.partition(b":")
        if colon and name.rstrip(b" \t") != name:
            raise BadRequest(400, "whitespace between a header name and its colon")
        raise BadRequest(400, "malformed header field: expected 'Name: value'")
    return m.group(1), m.group(2)


def _framing(fields: list[tuple[str, bytes]], version: str) -> tuple[int | None, bool]:
    lengths = [value for name, value in fields if name == "content-length"]
    encodings = [value for name, value in fields if name == "transfer-encoding"]
    if lengths and encodings:
        raise BadRequest(400, "Content-Length together with Transfer-Encoding")
    if len(lengths) > 1:
        raise BadRequest(400, "more than one Content-Length header")
    if len(encodings) > 1:
        raise BadRequest(400, "more than one Transfer-Encoding header")
    if encodings:
        if encodings[0].lower() != b"chunked":
            raise BadRequest(400, "the only Transfer-Encoding accepted is a single 'chunked'")
        if version == "1.0":
            raise BadRequest(400, "Transfer-Encoding in an HTTP/1.0 request")
        return None, True
    if lengths:
        if not _CONTENT_LENGTH.fullmatch(lengths[0]):
            raise BadRequest(400, "Content-Length is not a single decimal number")
        return int(lengths[0]), False
    return None, False


def _connection_options(fields: list[tuple[str, bytes]]) -> frozenset[str]:
    """The header names the Connection headers ask to remove (lower case)."""
    named: set[str] = set()
    for name, value in fields:
        if name != "connection":
            continue
        for token in value.split(b","):
            token = token.strip(b" \t")
            if not _TOKEN_RE.fullmatch(token):
                raise BadRequest(400, "malformed Connection header")
            option = token.decode("ascii").lower()
            if option in CONNECTION_CRITICAL:
                raise BadRequest(400, f"Connection names {option!r}, which a proxy must not remove")
            named.add(option)
    return frozenset(named)


def _dropped(name: str, connection_options: frozenset[str]) -> bool:
    return name in _NOT_FORWARDED or name in connection_options or name.startswith("x-forwarded-")


def _parse_authority(text: str, *, default_port: int | None) -> tuple[str, int]:
    """(host, port) of `host[:port]`; see ProxyRequest.target_host for the host's form."""
    host, port = _split_authority(text)
    if port is None:
        if default_port is None:
            raise BadRequest(400, "CONNECT needs host:port")
        port = default_port
    return host, port


def _split_authority(text: str) -> tuple[str, int | None]:
    """(canonical host, port or None) of `host[:port]`, or BadRequest. Remembered
    for the most recent AUTHORITY_CACHE_SIZE texts: a pure function of the text, and
    reading an IP literal in every spelling is most of the cost of parsing a head."""
    found = _authorities.get(text)
    if found is None:
        found = _parse_authority_text(text)
        if len(_authorities) >= AUTHORITY_CACHE_SIZE:
            _authorities.clear()
        _authorities[text] = found
    return found


AUTHORITY_CACHE_SIZE = 1024
_authorities: dict[str, tuple[str, int | None]] = {}


def _parse_authority_text(text: str) -> tuple[str, int | None]:
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise BadRequest(400, "unbalanced '[' in the host")
        host, rest = text[: close + 1], text[close + 1 :]
        if rest and not rest.startswith(":"):
            raise BadRequest(400, "malformed host")
        port_text = rest[1:] if rest else None
    else:
        if text.count(":") > 1:
            raise BadRequest(400, "malformed host (IPv6 addresses go in brackets)")
        host, sep, port_text_or_empty = text.partition(":")
        port_text = port_text_or_empty if sep else None
    port = None
    if port_text is not None:
        if not _PORT.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
            raise BadRequest(400, "the port is not a number from 1 to 65535")
        port = int(port_text)
    return _canonical_host(host), port


def _canonical_host(host: str) -> str:
    if not host:
        raise BadRequest(400, "empty host")
    try:
        literal = parse_ip_literal(host)
    except ValueError:
        raise BadRequest(400, "malformed IP address in the host") from None
    if literal is not None:
        return host.lower().strip("[]")
    try:
        return normalize_host(host)
    except ValueError:
        raise BadRequest(400, "the host is not a valid host name") from None


def _same_host(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        ip_a, ip_b = parse_ip_literal(a), parse_ip_literal(b)
    except ValueError:
        return False
    return ip_a is not None and ip_a == ip_b


def _check_host_header(value: bytes, host: str, port: int, kind: RequestKind) -> None:
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest(400, "the Host header is not ASCII") from None
    if "@" in text or "/" in text:
        raise BadRequest(400, "malformed Host header")
    try:
        header_host, header_port = _split_authority(text)
    except BadRequest as e:
        raise BadRequest(400, f"Host header: {e.reason}") from None
    if header_port is None and kind is RequestKind.HTTP:
        header_port = 80
    if not _same_host(header_host, host) or header_port not in (None, port):
        raise BadRequest(400, "the Host header does not match the request target")


def _h11_reason(e: h11.RemoteProtocolError) -> str:
    # h11 quotes the offending line ("illegal header line: b'...'"); keep only its words.
    return str(e).split(": b'", 1)[0].split(': b"', 1)[0] or "rejected by the HTTP parser"


# --- what the proxy sends ------------------------------------------------------------


def host_header(req: ProxyRequest) -> bytes:
    host = f"[{req.target_host}]" if ":" in req.target_host else req.target_host
    return (host if req.port == 80 else f"{host}:{req.port}").encode("ascii")


def serialize_request_head(req: ProxyRequest) -> bytes:
    """The head sent upstream for an HTTP request: origin-form, rebuilt (never the
    client's bytes), with `Connection: close` (one request per upstream connection)."""
    lines = [f"{req.method} {req.path} HTTP/{req.http_version}".encode("ascii")]
    lines.append(b"Host: " + host_header(req))
    lines.extend(name + b": " + value for name, value in req.headers)
    if req.chunked:
        lines.append(b"Transfer-Encoding: chunked")
    elif req.content_length is not None:
        lines.append(b"Content-Length: %d" % req.content_length)
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def encode_chunk(data: bytes) -> bytes:
    """One chunk of a chunked body; empty data encodes to nothing (a zero-size chunk
    would end the body)."""
    return b"%x\r\n%s\r\n" % (len(data), data) if data else b""


def end_chunked() -> bytes:
    return b"0\r\n\r\n"


REQUEST_ID_HEADER = "X-Sandgate-Request-Id"


def response(
    status: int,
    body: str,
    request_id: str,
    *,
    content_type: str = "text/plain; charset=utf-8",
    extra_headers: Iterable[tuple[str, str]] = (),
) -> bytes:
    """One of the proxy's own answers (400, 403, 413, 429, 502, 504, the API's JSON):
    a complete response with the request id and `Connection: close`."""
    payload = body.encode("utf-8")
    headers = [
        ("Content-Type", content_type),
        ("Content-Length", str(len(payload))),
        ("Connection", "close"),
        ("Cache-Control", "no-store"),
        ("X-Content-Type-Options", "nosniff"),
        (REQUEST_ID_HEADER, request_id),
        *extra_headers,
    ]
    for name, value in headers:
        if not _TOKEN_RE.fullmatch(name.encode()) or _CONTROL.search(value.encode()):
            raise ValueError(f"invalid response header {name!r}")
    phrase = HTTPStatus(status).phrase
    head = f"HTTP/1.1 {status} {phrase}\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers)
    return head.encode("utf-8") + b"\r\n" + payload


CONNECT_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
