"""The git smart-HTTP gateway: origin-form `/git/<host>/<repo>/...` on a sandbox's
endpoints, relayed to `https://<host>/<repo>.git/...` with the upstream credential.

gateway/gitroutes.py decides (which endpoint, which repository, which refs),
gateway/pktline.py parses pushes, gateway/credentials.py holds the secrets; this
module owns the order of the questions, the bytes and the upstream connection. The
proxy (gateway/proxy.py) reads the request head, counts the request against the
sandbox's rate and connection limits, and hands over any origin-form request under
GIT_PREFIX. Per request:

  /git/<host>/<path>: host a valid name          else 400
  gitroutes.route: the three smart-HTTP endpoints   400/404/405/415, LFS and dumb 501
  find_repo + check_access: listed, read or write   403 naming how to add it
  body rules: info/refs has none; receive-pack has  400/415
    no Content-Encoding; upload-pack may be gzip
    (passed through as sent, never decoded); size
    limits (max_push_body, max_fetch_body)          413
  push: the body is parsed (PushRequestParser) up to the pack before anything is
    dialed; check_push: any refused ref -> the rest of the body is read (bounded),
    then 200 application/x-git-receive-pack-result with report_status (`! [remote
    rejected] <ref> (<reason>)` in git push), and nothing goes upstream
  credential (credentials.py)                        502 when unusable
  resolve and check the host's addresses as egress does (the policy's allow_cidrs
    apply; the host need not be in egress.allow: listing a repository is the
    permission), dial, TLS verified against upstream_ca_file (None: the system
    trust store) with SNI and hostname checking for the git host  403/502/504
  request upstream: the policy's spelling of the repository (upstream_target), a
    rebuilt head with an allowlist of the client's headers (never Authorization,
    Cookie, Proxy-*, Expect or anything unknown) plus the credential
  response: 401/407 -> 502 with a message (git would otherwise ask the sandbox for a
    password); 200 must carry the smart-HTTP Content-Type of the endpoint, else 502
    (git would fall back to the dumb protocol); other statuses, redirects included,
    are relayed as they are (Location untouched, never followed: nothing is ever
    re-sent with the credential). Set-Cookie, WWW-Authenticate, Alt-Svc,
    Strict-Transport-Security and hop-by-hop headers are dropped; the receive-pack
    advertisement keeps only the capabilities a push may ask for (pktline), so a
    client cannot ask for one the parser refuses. At most max_response body bytes.

Limits (GatewayConfig): git_max_push_body 1 GiB (a receive-pack body as sent),
git_max_fetch_body 64 MiB (an upload-pack body as sent, compressed or not: wants and
haves, even for large negotiations, are far smaller), git_max_response 4 GiB (one
response body as relayed, the pack of a clone included). Request bodies sent
upstream count against the sandbox's upload budget, like any egress; git requests
count against its request rate and connection cap.

The gateway's own answers are text/plain with the request id (git prints the body
of a refused info/refs as "remote:" lines). Every request is one audit line with
`repo`, `service` and, for pushes, `refs`: each ref with its old and new ids and its
verdict. Every text that reaches the audit log, a client or the log goes through
the credential store's redaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import h11

from gateway import http
from gateway.credentials import CredentialError, CredentialStore, Fetch, FetchResponse
from gateway.gitroutes import (
    GitRefusal,
    GitRoute,
    check_access,
    check_push,
    find_repo,
    push_allowed,
    repo_url,
    results_when_refused,
    route,
    upstream_target,
)
from gateway.http import BadRequest, ProxyRequest, RequestReader
from gateway.pktline import (
    MAX_PKT_LEN,
    PUSH_CAPABILITIES,
    PUSH_VALUE_CAPABILITIES,
    PktLineError,
    PushRequest,
    PushRequestParser,
    Special,
    encode_pkt,
    read_pkt,
    report_status,
)
from gateway.pktline import NEED_DATA as PKT_NEED_DATA
from gateway.policy import GIB, MIB, RepoRule, normalize_host

if TYPE_CHECKING:
    from gateway.addr import IPAddress

GIT_PREFIX = "/git/"
GIT_PORT = 443
RECV_SIZE = 64 * 1024
MAX_RESPONSE_HEAD = 64 * 1024
MAX_API_RESPONSE = 1024 * 1024
DRAIN_IDLE = 10.0  # a refused push: how long to wait for each piece of the rest
CREDENTIAL_TIMEOUT = 30.0
RELEASE_TIMEOUT = 10.0

DEFAULT_MAX_PUSH_BODY = 1 * GIB
DEFAULT_MAX_FETCH_BODY = 64 * MIB
DEFAULT_MAX_RESPONSE = 4 * GIB

# The client's headers that go upstream (lower case); everything else is dropped.
FORWARDED_HEADERS = frozenset(
    {"accept", "accept-language", "user-agent", "git-protocol", "content-type", "pragma"}
)
# Only for upload-pack, whose bodies the gateway does not read: git gzips its requests
# and accepts compressed answers. A receive-pack advertisement must come uncompressed
# (its capabilities are filtered) and receive-pack bodies are parsed.
UPLOAD_PACK_HEADERS = frozenset({"accept-encoding", "content-encoding"})
# Upstream response headers never relayed to a sandbox (lower case).
DROPPED_RESPONSE_HEADERS = http.HOP_BY_HOP | {
    "content-length",
    "www-authenticate",
    "set-cookie",
    "set-cookie2",
    "alt-svc",
    "strict-transport-security",
}
# Advertised capabilities passed to a pushing client: those it may send back, and
# no-thin, an instruction it follows without echoing it.
ADVERTISED_PUSH_CAPABILITIES = PUSH_CAPABILITIES | PUSH_VALUE_CAPABILITIES | {"no-thin"}


class GitRefused(Exception):
    """A git request the gateway answers itself (unless its response has started):
    `status`, the audit `decision` and `rule`, a `reason` (one line, no secrets), a
    `hint` for the client, extra response `headers` (Allow for 405)."""

    def __init__(
        self,
        status: int,
        rule: str,
        reason: str,
        *,
        decision: str = "deny",
        hint: str = "",
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.status = status
        self.rule = rule
        self.reason = reason
        self.decision = decision
        self.hint = hint
        self.headers = tuple(headers)
        super().__init__(reason)


class _Host(Protocol):
    """What this module uses of gateway.proxy.Gateway."""

    config: Any

    async def _connect(
        self, sandbox: Any, host: str, port: int
    ) -> tuple[socket.socket, IPAddress]: ...

    async def _relay(self, ex: Any, up: Any, down: Any, *, both: bool) -> None: ...

    def _charge(self, sandbox: Any, n: int, ex: Any) -> None: ...


@dataclass(frozen=True)
class GitLimits:
    max_push_body: int = DEFAULT_MAX_PUSH_BODY
    max_fetch_body: int = DEFAULT_MAX_FETCH_BODY
    max_response: int = DEFAULT_MAX_RESPONSE


# --- pure helpers ----------------------------------------------------------------------


def split_git_path(path: str) -> tuple[str, str]:
    """(host, rest) of an origin-form "/git/<host>/<repo path...>[?query]", the host
    normalised; GitRefused(400) when it names no valid host."""
    rest = path[len(GIT_PREFIX) :]
    host_text, slash, tail = rest.partition("/")
    if not slash or not host_text or "?" in host_text:
        raise GitRefused(
            400, "git.path", "git gateway paths are /git/<host>/<org>/<repo>/... (no host named)"
        )
    try:
        host = normalize_host(host_text)
    except ValueError:
        raise GitRefused(
            400, "git.path", "the git host in the path is not a valid host name"
        ) from None
    if host != host_text.lower():
        raise GitRefused(400, "git.path", "the git host in the path is not in its plain form")
    return host, "/" + tail


def filter_capabilities(caps: str) -> str:
    """The advertised capability list with only ADVERTISED_PUSH_CAPABILITIES kept."""
    allowed = ADVERTISED_PUSH_CAPABILITIES
    return " ".join(cap for cap in caps.split(" ") if cap and cap.split("=", 1)[0] in allowed)


class PushAdvertisementFilter:
    """Streams a receive-pack advertisement (`# service=...`, flush, [`version 1`],
    then the refs, the first with NUL and the capabilities), rewriting that first ref
    line's capabilities with `filter_capabilities`; everything else passes unchanged.
    `feed(bytes) -> bytes` out; `close()` at the end (PktLineError if it was cut
    inside the part being rewritten)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._done = False
        self._flushes = 0

    def feed(self, data: bytes) -> bytes:
        if self._done:
            return data
        self._buf += data
        out = bytearray()
        while not self._done:
            pkt = read_pkt(self._buf)
            if pkt is None:
                if len(self._buf) > MAX_PKT_LEN:  # cannot happen: read_pkt bounds lengths
                    raise PktLineError("an advertisement line is too long")
                break
            packet, end = pkt
            raw = bytes(self._buf[:end])
            del self._buf[:end]
            if packet is Special.FLUSH:
                self._flushes += 1
                out += raw
                if self._flushes >= 2:  # the end of an advertisement with no refs at all
                    self._done = True
                continue
            if not isinstance(packet, bytes):
                raise PktLineError("unexpected special packet in a receive-pack advertisement")
            line = packet.rstrip(b"\n")
            if line.startswith(b"# service=") or line == b"version 1":
                out += raw
                continue
            self._done = True  # the first ref line: the only one with capabilities
            refpart, nul, caps = packet.partition(b"\0")
            if not nul:
                out += raw
                continue
            newline = caps.endswith(b"\n")
            text = caps.rstrip(b"\n").decode("ascii", "replace")
            kept = filter_capabilities(text).encode()
            out += encode_pkt(refpart + b"\0" + kept + (b"\n" if newline else b""))
        if self._done and self._buf:
            out += self._buf
            self._buf.clear()
        return bytes(out)

    def close(self) -> None:
        if self._buf:
            raise PktLineError("the receive-pack advertisement ends inside a pkt-line")


def refused_request_subject(path: str, query: str) -> tuple[str | None, str | None]:
    """(repository path, service) that a request `route` refused was about, when its
    path names them (a wrong method, Content-Type, query or Git-Protocol; LFS), for
    the audit line; (None, None) otherwise. The repository path is what `route` makes
    of the path with the request's other parts set right, so it is as checked."""
    service: str | None = None
    if "/info/lfs" in path:
        probe = route(
            "GET",
            path.split("/info/lfs", 1)[0] + "/info/refs",
            "service=git-upload-pack",
            None,
            None,
        )
    elif path.endswith("/info/refs"):
        named = query.removeprefix("service=git-")
        service = named if named in ("upload-pack", "receive-pack") else None
        probe = route("GET", path, "service=git-upload-pack", None, None)
    elif path.endswith(("/git-upload-pack", "/git-receive-pack")):
        service = path.rsplit("/git-", 1)[1]
        probe = route("POST", path, "", f"application/x-git-{service}-request", None)
    else:
        return None, None
    if isinstance(probe, GitRefusal):
        return None, None
    return probe.repo_path, service


def media_type(value: str | None) -> str | None:
    if value is None:
        return None
    return value.split(";", 1)[0].strip().lower()


def forwarded_headers(req: ProxyRequest, service: str) -> list[tuple[bytes, bytes]]:
    """The client's headers that go upstream (see FORWARDED_HEADERS), in order."""
    allowed = FORWARDED_HEADERS | (UPLOAD_PACK_HEADERS if service == "upload-pack" else set())
    return [(name, value) for name, value in req.headers if name.lower().decode() in allowed]


def response_head(
    status: int,
    reason: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    framing: str,
    length: int | None,
    request_id: str,
) -> bytes:
    """The head relayed to the client: the upstream's status and headers without
    DROPPED_RESPONSE_HEADERS, the framing ("length", "chunked", or "close" and "none"
    without a framing header),
    Connection: close and the request id."""
    phrase = reason.decode("latin-1") if reason else ""
    if not phrase or not phrase.isprintable():
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Status"
    lines = [f"HTTP/1.1 {status} {phrase}".encode("latin-1")]
    for name, value in headers:
        if name.lower().decode("latin-1") not in DROPPED_RESPONSE_HEADERS:
            lines.append(name + b": " + value)
    if framing == "length":
        lines.append(b"Content-Length: %d" % (length or 0))
    elif framing == "chunked":
        lines.append(b"Transfer-Encoding: chunked")
    lines.append(b"Connection: close")
    lines.append(f"{http.REQUEST_ID_HEADER}: {request_id}".encode("ascii"))
    return b"\r\n".join(lines) + b"\r\n\r\n"


def binary_response(status: int, body: bytes, content_type: str, request_id: str) -> bytes:
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-cache\r\n"
        "Connection: close\r\n"
        f"{http.REQUEST_ID_HEADER}: {request_id}\r\n\r\n"
    )
    return head.encode("ascii") + body


def push_audit(push: PushRequest, verdicts: Sequence[tuple[str, str | None]]) -> list[dict]:
    reasons = dict(verdicts)
    return [
        {
            "ref": u.ref,
            "old": u.old,
            "new": u.new,
            "verdict": "allow" if reasons.get(u.ref) is None else "deny",
            "reason": reasons.get(u.ref),
        }
        for u in push.updates
    ]


def _single_header(req: ProxyRequest, name: str) -> str | None:
    values = [v for n, v in req.headers if n.lower() == name.encode()]
    if len(values) > 1:
        raise GitRefused(400, "http.malformed", f"more than one {name} header")
    return values[0].decode("latin-1") if values else None


def _expects_continue(req: ProxyRequest) -> bool:
    value = _single_header(req, "expect")
    return value is not None and value.strip().lower() == "100-continue"


# --- the client's body -----------------------------------------------------------------


class _ClientBody:
    """The request body from the client, piece by piece (`next()`: bytes, or None at
    the end); BadRequest becomes GitRefused (413 names the limit's rule)."""

    def __init__(
        self, client: socket.socket, reader: RequestReader, ex: Any, idle: float, rule: str
    ) -> None:
        self._client, self._reader, self._ex = client, reader, ex
        self.idle, self._rule = idle, rule

    async def next(self) -> bytes | None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                event = self._reader.next_event()
            except BadRequest as e:
                rule = self._rule if e.status == 413 else "http.malformed"
                raise GitRefused(e.status, rule, e.reason) from None
            if event is http.NEED_DATA:
                try:
                    async with asyncio.timeout(self.idle):
                        data = await loop.sock_recv(self._client, RECV_SIZE)
                except TimeoutError:
                    raise GitRefused(
                        408, "http.body_timeout", f"no request body bytes for {self.idle:g}s"
                    ) from None
                self._ex.touch()
                self._ex.received += len(data)
                self._reader.feed(data)
            elif event is http.END_OF_BODY:
                return None
            elif isinstance(event, bytes) and event:
                return event


# --- the gateway -----------------------------------------------------------------------


class GitGateway:
    """The git side of a Gateway: `serve` one request, `release` a sandbox's
    credentials when it is removed."""

    def __init__(self, host: _Host, credentials: CredentialStore, limits: GitLimits) -> None:
        self._gw = host
        self.credentials = credentials
        self.limits = limits
        self._tls: ssl.SSLContext | None = None

    # --- one request -------------------------------------------------------------------

    async def serve(
        self,
        sandbox: Any,
        client: socket.socket,
        reader: RequestReader,
        req: ProxyRequest,
        ex: Any,
    ) -> None:
        record = ex.record
        host, rest = split_git_path(req.path)
        record.host, record.port = host, GIT_PORT
        path, _, query = rest.partition("?")
        routed = route(
            req.method,
            path,
            query,
            _single_header(req, "content-type"),
            _single_header(req, "git-protocol"),
        )
        if isinstance(routed, GitRefusal):
            repo_path, service = refused_request_subject(path, query)
            if repo_path is not None:
                known = find_repo(sandbox.policy.repos, host, repo_path)
                record.repo = known.url if known is not None else repo_url(host, repo_path)
                record.service = service
            raise GitRefused(routed.status, routed.rule, routed.reason, headers=routed.headers)
        record.service = routed.service
        repo = find_repo(sandbox.policy.repos, host, routed.repo_path)
        url = repo_url(host, routed.repo_path)
        record.repo = repo.url if repo is not None else url
        refusal = check_access(repo, routed.service, url=url)
        if refusal is not None:
            hint = ""
            if repo is None:
                hint = f"or run with: sandgate run --repo {url}"
            elif routed.service == "receive-pack":
                hint = f"or run with: sandgate run --repo {repo.url}=write"
            raise GitRefused(refusal.status, refusal.rule, refusal.reason, hint=hint)
        assert repo is not None
        body = self._check_body(client, reader, req, routed, ex)
        upload = sandbox.limits.upload
        if req.content_length is not None and req.content_length > upload.remaining:
            raise GitRefused(
                429,
                "egress.upload_budget",
                f"this would exceed the sandbox's upload budget of {upload.limit} bytes "
                "(egress.upload_budget); git request bodies count against it",
            )
        record.rule = "git.repos"
        record.reason = f"{repo.url} ({repo.access})"
        buffered: list[bytes] = []
        if body is not None and _expects_continue(req):
            await asyncio.get_running_loop().sock_sendall(client, b"HTTP/1.1 100 Continue\r\n\r\n")
        if routed.service == "receive-pack" and routed.kind == "rpc":
            assert body is not None
            push, buffered, ended = await self._read_push(body)
            verdicts = check_push(repo, push)
            record.refs = push_audit(push, verdicts)
            record.rule = "git.repos.push"
            if not push_allowed(verdicts):
                await self._refuse_push(client, body, ended, push, verdicts, ex)
                return
            if ended:
                body = None  # the whole body is in `buffered`
        auth = await self._authorization(sandbox, host)
        await self._forward(sandbox, client, req, routed, repo, body, buffered, auth, ex)

    def _check_body(
        self,
        client: socket.socket,
        reader: RequestReader,
        req: ProxyRequest,
        routed: GitRoute,
        ex: Any,
    ) -> _ClientBody | None:
        has_body = req.chunked or bool(req.content_length)
        encoding = _single_header(req, "content-encoding")
        if routed.kind == "advertise":
            if has_body:
                raise GitRefused(400, "git.body", "info/refs takes no request body")
            return None
        if routed.service == "receive-pack":
            if encoding is not None and encoding.strip().lower() != "identity":
                raise GitRefused(
                    415,
                    "git.content-encoding",
                    "push bodies are sent uncompressed (git never encodes them); "
                    "Content-Encoding is refused on git-receive-pack",
                )
            limit, rule = self.limits.max_push_body, "git.max_push_body"
        else:
            if encoding is not None and encoding.strip().lower() not in ("gzip", "identity"):
                raise GitRefused(
                    415, "git.content-encoding", "git-upload-pack bodies may only be gzip-encoded"
                )
            limit, rule = self.limits.max_fetch_body, "git.max_fetch_body"
        reader.limit_body(limit)
        return _ClientBody(client, reader, ex, self._gw.config.idle_timeout, rule)

    async def _read_push(self, body: _ClientBody) -> tuple[PushRequest, list[bytes], bool]:
        """The push's head, the body bytes read for it (all forwarded as they are),
        and whether the body has ended."""
        parser = PushRequestParser()
        buffered: list[bytes] = []
        ended = False
        try:
            while True:
                data = await body.next()
                if data is None:
                    ended = True
                    parser.feed(b"")
                else:
                    buffered.append(data)
                    parser.feed(data)
                event = parser.next_event()
                if event is not PKT_NEED_DATA:
                    assert isinstance(event, PushRequest)
                    return event, buffered, ended
                if ended:  # cannot happen: the parser raises at the end of the body
                    raise PktLineError("the push request is incomplete")
        except PktLineError as e:
            raise GitRefused(400, "git.push.malformed", f"malformed push request: {e}") from None

    async def _refuse_push(
        self,
        client: socket.socket,
        body: _ClientBody,
        ended: bool,
        push: PushRequest,
        verdicts: Sequence[tuple[str, str | None]],
        ex: Any,
    ) -> None:
        """Read the rest of the body (bounded by the push limit, DRAIN_IDLE per piece)
        so the client is not cut off while sending, then git's report of the refusal."""
        record = ex.record
        refused = [(ref, reason) for ref, reason in verdicts if reason is not None]
        record.decision = "deny"
        record.reason = "; ".join(f"{ref}: {reason}" for ref, reason in refused)[:2000]
        if not ended:
            body.idle = min(body.idle, DRAIN_IDLE)
            with contextlib.suppress(GitRefused, OSError):
                while await body.next() is not None:
                    pass
        message = (
            f"sandgate: this push was refused by the sandbox's git policy "
            f"(request id {record.request_id})"
        )
        report = report_status(True, results_when_refused(verdicts), push.sideband, message=message)
        answer = binary_response(
            200, report, "application/x-git-receive-pack-result", record.request_id
        )
        await asyncio.get_running_loop().sock_sendall(client, answer)
        ex.responded, record.status = True, 200
        record.bytes_down += len(report)

    async def _authorization(self, sandbox: Any, host: str) -> str | None:
        try:
            async with asyncio.timeout(CREDENTIAL_TIMEOUT):
                return await self.credentials.authorization(
                    sandbox.id, host, sandbox.policy.repos, self.fetcher(sandbox)
                )
        except CredentialError as e:
            raise GitRefused(
                502,
                "git.credentials",
                f"the gateway's credential for {host} cannot be used: "
                f"{self.credentials.redact(str(e))}",
                decision="error",
            ) from None
        except TimeoutError:
            raise GitRefused(
                504,
                "git.credentials",
                f"getting the gateway's credential for {host} took over {CREDENTIAL_TIMEOUT:g}s",
                decision="error",
            ) from None

    # --- upstream ----------------------------------------------------------------------

    def tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            cafile = self._gw.config.upstream_ca_file
            ctx = ssl.create_default_context(cafile=cafile)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.set_alpn_protocols(["http/1.1"])
            self._tls = ctx
        return self._tls

    async def _open(
        self, sandbox: Any, host: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, IPAddress]:
        """Resolve and check (raises the proxy's refusals), dial, TLS handshake."""
        sock, addr = await self._gw._connect(sandbox, host, port)
        timeout = self._gw.config.connect_timeout
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    sock=sock,
                    ssl=self.tls_context(),
                    server_hostname=host,
                    ssl_handshake_timeout=timeout,
                    limit=RECV_SIZE,
                )
        except ssl.SSLCertVerificationError as e:
            sock.close()
            raise GitRefused(
                502,
                "git.tls",
                f"the TLS certificate of {host} ({addr}) is not trusted: "
                f"{e.verify_message or e.reason}",
                decision="error",
            ) from None
        except TimeoutError:
            sock.close()
            raise GitRefused(
                504, "git.tls", f"the TLS handshake with {host} timed out", decision="error"
            ) from None
        except (OSError, ssl.SSLError) as e:
            sock.close()
            raise GitRefused(
                502, "git.tls", f"TLS with {host} ({addr}) failed: {e}", decision="error"
            ) from None
        except BaseException:
            sock.close()
            raise
        return reader, writer, addr

    async def _forward(
        self,
        sandbox: Any,
        client: socket.socket,
        req: ProxyRequest,
        routed: GitRoute,
        repo: RepoRule,
        body: _ClientBody | None,
        buffered: list[bytes],
        auth: str | None,
        ex: Any,
    ) -> None:
        record = ex.record
        up_reader, up_writer, addr = await self._open(sandbox, repo.host, GIT_PORT)
        record.addr = str(addr)
        record.decision = "allow"
        try:
            conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
            headers: list[tuple[bytes | str, bytes | str]] = [("Host", repo.host)]
            headers += forwarded_headers(req, routed.service)
            if auth is not None:
                headers.append(("Authorization", auth))
            if req.chunked:
                headers.append(("Transfer-Encoding", "chunked"))
            elif req.content_length is not None:
                headers.append(("Content-Length", str(req.content_length)))
            # No "Connection: close": the response's own framing tells h11 where it
            # ends and the gateway closes then. A server that closes right after the
            # last byte (Python's ssl, many others, without TLS close_notify) can have
            # its tail dropped by uvloop 0.23's SSL transport while reading is paused
            # for a slow client (a truncated clone; MagicStack/uvloop#661).
            request = h11.Request(
                method=req.method, target=upstream_target(routed, repo), headers=headers
            )
            await self._gw._relay(
                ex,
                self._send_request(sandbox, conn, request, body, buffered, up_writer, ex),
                self._relay_response(client, conn, req, routed, up_reader, ex),
                both=False,
            )
        finally:
            up_writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1):
                    await up_writer.wait_closed()

    async def _send_request(
        self,
        sandbox: Any,
        conn: h11.Connection,
        request: h11.Request,
        body: _ClientBody | None,
        buffered: list[bytes],
        writer: asyncio.StreamWriter,
        ex: Any,
    ) -> None:
        head = conn.send(request)
        assert head is not None
        writer.write(head)
        await writer.drain()
        pending = list(buffered)
        while True:
            if pending:
                data: bytes | None = pending.pop(0)
            elif body is not None:
                data = await body.next()
            else:
                data = None
            if data is None:
                break
            self._gw._charge(sandbox, len(data), ex)  # the upload budget, before sending
            out = conn.send(h11.Data(data=data))
            assert out is not None
            writer.write(out)
            await writer.drain()
            ex.record.bytes_up += len(data)
        end = conn.send(h11.EndOfMessage())
        if end:
            writer.write(end)
            await writer.drain()

    async def _relay_response(
        self,
        client: socket.socket,
        conn: h11.Connection,
        req: ProxyRequest,
        routed: GitRoute,
        reader: asyncio.StreamReader,
        ex: Any,
    ) -> None:
        loop = asyncio.get_running_loop()
        record = ex.record
        host = record.host
        framing = "close"
        adv: PushAdvertisementFilter | None = None
        total = 0
        limit = self.limits.max_response
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as e:
                raise GitRefused(
                    502, "git.upstream", f"{host} sent a malformed response: {e}", decision="error"
                ) from None
            if event is h11.NEED_DATA:
                data = await reader.read(RECV_SIZE)
                ex.touch()
                conn.receive_data(data)
                continue
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                framing, adv, head = self._response_head(event, req, routed, ex)
                await loop.sock_sendall(client, head)
                ex.responded, record.status = True, event.status_code
                continue
            if isinstance(event, h11.Data):
                data = bytes(event.data)
                total += len(data)
                if total > limit:
                    raise GitRefused(
                        502,
                        "git.max_response",
                        f"the response from {host} is larger than {limit} bytes "
                        "(git_max_response); cut off",
                        decision="error",
                    )
                if adv is not None:
                    try:
                        data = adv.feed(data)
                    except PktLineError as e:
                        raise GitRefused(
                            502,
                            "git.upstream",
                            f"{host} sent a malformed receive-pack advertisement: {e}",
                            decision="error",
                        ) from None
                if data:
                    out = http.encode_chunk(data) if framing == "chunked" else data
                    await loop.sock_sendall(client, out)
                    record.bytes_down += len(data)
                ex.touch()
                continue
            if isinstance(event, h11.EndOfMessage):
                if adv is not None:
                    try:
                        adv.close()
                    except PktLineError as e:
                        raise GitRefused(
                            502, "git.upstream", f"{host}: {e}", decision="error"
                        ) from None
                if framing == "chunked":
                    await loop.sock_sendall(client, http.end_chunked())
                with contextlib.suppress(OSError):
                    client.shutdown(socket.SHUT_WR)
                return
            if isinstance(event, h11.ConnectionClosed):
                raise GitRefused(
                    502,
                    "git.upstream",
                    f"{host} closed the connection before its response was complete",
                    decision="error",
                )

    def _response_head(
        self, event: h11.Response, req: ProxyRequest, routed: GitRoute, ex: Any
    ) -> tuple[str, PushAdvertisementFilter | None, bytes]:
        """Check the upstream's response head; (framing to the client, the
        advertisement filter if any, the head to send)."""
        record = ex.record
        host = record.host
        status = event.status_code
        values: dict[str, list[str]] = {}
        for name, value in event.headers:
            values.setdefault(name.decode("latin-1"), []).append(value.decode("latin-1"))
        if status in (401, 407):
            # Where the host keeps credentials is for the operator (docs/git), not
            # for the sandbox that reads this answer.
            raise GitRefused(
                502,
                "git.upstream.auth",
                f"{host} asked for authentication (HTTP {status}): the gateway's credential "
                f"for {host} is missing, wrong or lacks access to {record.repo}",
                decision="error",
            )
        encoding = (values.get("content-encoding") or [None])[0]
        if status == 200:
            ctype = media_type((values.get("content-type") or [None])[0])
            expected = routed.response_content_type
            if ctype != expected:
                shown = (ctype or "none")[:80]
                raise GitRefused(
                    502,
                    "git.upstream",
                    f"{host} answered with Content-Type {shown}, not {expected}: "
                    "not git smart HTTP (is the repository URL right?)",
                    decision="error",
                )
        rewrite = status == 200 and routed.kind == "advertise" and routed.service == "receive-pack"
        if rewrite and encoding is not None and encoding.strip().lower() != "identity":
            raise GitRefused(
                502,
                "git.upstream",
                f"{host} compressed the receive-pack advertisement unasked",
                decision="error",
            )
        length_text = (values.get("content-length") or [None])[0]
        length = int(length_text) if length_text is not None else None
        if length is not None and length > self.limits.max_response:
            raise GitRefused(
                502,
                "git.max_response",
                f"the response from {host} is {length} bytes, over the "
                f"{self.limits.max_response} of git_max_response",
                decision="error",
            )
        if status in (204, 304):
            framing = "none"  # no body
        elif length is not None and not rewrite:
            framing = "length"
        elif req.http_version == "1.1":
            framing = "chunked"
        else:
            framing = "close"
        raw = list(event.headers.raw_items())
        head = response_head(status, event.reason, raw, framing, length, record.request_id)
        return framing, PushAdvertisementFilter() if rewrite else None, head

    # --- HTTPS for the credential store ------------------------------------------------

    def fetcher(self, sandbox: Any) -> Fetch:
        """One HTTPS request on behalf of `sandbox` (its allow_cidrs apply), for the
        GitHub API: same resolver, address checks and TLS trust as git requests."""

        async def fetch(
            method: str, url: str, headers: Sequence[tuple[str, str]], body: bytes | None
        ) -> FetchResponse:
            parts = urlsplit(url)
            if parts.scheme != "https" or not parts.hostname:
                raise CredentialError("API URLs are https://")
            host = normalize_host(parts.hostname)
            port = parts.port or 443
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            try:
                reader, writer, _ = await self._open(sandbox, host, port)
            except Exception as e:  # the proxy's refusals (address, connect), TLS
                why = getattr(e, "reason", None) or str(e)
                raise CredentialError(f"cannot reach {host}:{port}: {why}") from None
            try:
                conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
                authority = host if port == 443 else f"{host}:{port}"
                all_headers = [
                    ("Host", authority),
                    ("User-Agent", "sandgate-gateway"),
                    *headers,
                    ("Connection", "close"),
                ]
                if body is not None:
                    all_headers.append(("Content-Length", str(len(body))))
                out = conn.send(h11.Request(method=method, target=target, headers=all_headers))
                writer.write(out or b"")
                if body:
                    writer.write(conn.send(h11.Data(data=body)) or b"")
                writer.write(conn.send(h11.EndOfMessage()) or b"")
                await writer.drain()
                status, chunks, total = 0, [], 0
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await reader.read(RECV_SIZE))
                    elif isinstance(event, h11.Response):
                        status = event.status_code
                    elif isinstance(event, h11.Data):
                        total += len(event.data)
                        if total > MAX_API_RESPONSE:
                            raise CredentialError(f"{host} answered with over {MAX_API_RESPONSE}")
                        chunks.append(bytes(event.data))
                    elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                        break
                return FetchResponse(status, b"".join(chunks))
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(1):
                        await writer.wait_closed()

        return fetch

    async def release(self, sandbox: Any) -> None:
        """The sandbox is gone: revoke its minted tokens (best effort, bounded)."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(RELEASE_TIMEOUT):
                await self.credentials.release(sandbox.id, self.fetcher(sandbox))
