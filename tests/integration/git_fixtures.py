"""Helpers for the git gateway's end-to-end tests (test_git_sandbox.py) and its
benchmark (tests/bench/bench_git.py): a test CA, an "upstream" network namespace in
10.214.0.0/16 with an HTTPS git server (git http-backend behind a small threaded
HTTP/1.1 front) and a stand-in GitHub App token API, bare repositories with commits,
and the malformed push bodies the tests send from inside sandboxes.

Nothing here touches a real host or a real name: the servers listen at 10.214.N.2 in
a namespace made here, and every name the tests use is pinned with --resolve.

The git server
- accepts a request only with `Authorization: Basic base64("x-access-token:" + T)`
  where T is a static token or a token the App API minted (401 otherwise), and records
  every request (method, Host, path, query, Git-Protocol, which credential, body);
- runs /usr/lib/git-core/git-http-backend as CGI (GIT_PROJECT_ROOT, GIT_HTTP_EXPORT_ALL,
  http.receivepack), with GIT_PROTOCOL from the Git-Protocol header (protocol v2),
  Content-Encoding passed on (git gzips large upload-pack requests), and request bodies
  with Content-Length or chunked (decoded here and streamed to the backend's stdin to
  EOF, with no CONTENT_LENGTH, which http-backend reads as "until EOF"); responses go
  out chunked, streamed as the backend writes them.

The App API (the same server, told apart by path)
- POST /app/installations/{id}/access_tokens: verifies the RS256 JWT against the
  app's public key and its claims (iss, iat, exp), and the body against what the test
  expects (repositories, permissions); answers 201 {"token", "expires_at"} with a
  fresh random token (random length, no fixed prefix) that the git server then takes;
- DELETE /installation/token with `Authorization: token <installation token>`: revokes
  it (the git server no longer takes it) and records the call.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import gzip
import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import IPv4Address
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests import nsutil
from tests.nsutil import run_in_netns
from tests.testca import TestCA, make_test_ca

HTTP_BACKEND = "/usr/lib/git-core/git-http-backend"
HTTPS_PORT = 443
ZERO_OID = "0" * 40
GIT_ENV = {
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_AUTHOR_NAME": "sandgate tests",
    "GIT_AUTHOR_EMAIL": "tests@sandgate.test",
    "GIT_COMMITTER_NAME": "sandgate tests",
    "GIT_COMMITTER_EMAIL": "tests@sandgate.test",
    "GIT_TERMINAL_PROMPT": "0",
    "LC_ALL": "C",
}


def git(*args: str, cwd: str | Path | None = None, check: bool = True, **kw) -> str:
    """Run git on the host with a clean configuration; its stdout."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent", **GIT_ENV}
    env.update(kw.pop("env", {}))
    proc = subprocess.run(
        ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=False, **kw
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout


# --- a test CA ---------------------------------------------------------------------------


# --- tokens and the GitHub App -------------------------------------------------------------


def random_token() -> str:
    """A credential-looking random string: random length, no fixed prefix, so that only
    real redaction (not a pattern like 'ghs_') hides it."""
    return secrets.token_urlsafe(secrets.choice(range(24, 41)))


def basic(token: str) -> str:
    """The Authorization value the gateway must send upstream for `token`."""
    return "Basic " + base64.b64encode(f"x-access-token:{token}".encode()).decode()


@dataclass
class AppKey:
    """A GitHub App's RSA key: the private key PEM file (root-only, for the gateway's
    credentials) and the public key the test API verifies JWTs with."""

    app_id: int
    installation_id: int
    private_key_path: Path
    public_key: rsa.RSAPublicKey
    pem: bytes


def make_app_key(key_dir: Path, app_id: int, installation_id: int) -> AppKey:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,  # what GitHub hands out
        serialization.NoEncryption(),
    )
    path = key_dir / f"app-{app_id}.pem"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return AppKey(app_id, installation_id, path, key.public_key(), pem)


def _b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def verify_jwt(token: str, public_key: rsa.RSAPublicKey, app_id: int) -> tuple[dict, dict]:
    """(header, claims) of a GitHub App JWT, or ValueError saying what is wrong: the
    RS256 signature, iss (the app id, as GitHub accepts it: number or string), iat not
    in the future (60 s of clock skew), exp in the future and at most 10 minutes after
    iat (GitHub's limit)."""
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError("not a JWS compact serialisation (three dot-separated parts)")
    try:
        header = json.loads(_b64url_decode(parts[0]))
        claims = json.loads(_b64url_decode(parts[1]))
        signature = _b64url_decode(parts[2])
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"undecodable JWT: {e}") from None
    if header.get("alg") != "RS256":
        raise ValueError(f"alg is {header.get('alg')!r}, not RS256")
    try:
        public_key.verify(
            signature, f"{parts[0]}.{parts[1]}".encode(), padding.PKCS1v15(), hashes.SHA256()
        )
    except InvalidSignature:
        raise ValueError("bad signature") from None
    now = time.time()
    if str(claims.get("iss")) != str(app_id):
        raise ValueError(f"iss is {claims.get('iss')!r}, not the app id {app_id}")
    iat, exp = claims.get("iat"), claims.get("exp")
    if not isinstance(iat, int | float) or not isinstance(exp, int | float):
        raise ValueError("iat and exp must be numbers")
    if iat > now + 60:
        raise ValueError("iat is in the future")
    if exp <= now:
        raise ValueError("exp is in the past")
    if exp - iat > 600:
        raise ValueError("exp is more than 10 minutes after iat")
    return header, claims


@dataclass
class MintCall:
    """One POST .../access_tokens: what was asked, whether it was accepted, and why not."""

    installation_id: str
    jwt_header: dict | None
    jwt_claims: dict | None
    body: dict | None
    status: int
    error: str | None
    token: str | None
    jwt: str


@dataclass
class AppState:
    """The test's GitHub App as the API sees it. `expect` (set by a test before a run):
    {"repositories": [...], "permissions": {...}}; a request asking for anything else
    gets 422, as a narrowing mismatch would fail the test anyway."""

    key: AppKey
    expect: dict | None = None
    mints: list[MintCall] = field(default_factory=list)
    revoked: list[str] = field(default_factory=list)  # tokens DELETEd
    live: set[str] = field(default_factory=set)
    all_tokens: list[str] = field(default_factory=list)
    next_tokens: list[str] = field(default_factory=list)  # handed out first, if set

    def mint(self, inst: str, auth: str | None, raw: bytes) -> tuple[int, dict]:
        jwt = auth[len("Bearer ") :] if auth and auth.startswith("Bearer ") else ""
        call = MintCall(inst, None, None, None, 0, None, None, jwt)
        self.mints.append(call)
        try:
            if not jwt:
                raise PermissionError("no 'Authorization: Bearer <jwt>'")
            try:
                call.jwt_header, call.jwt_claims = verify_jwt(
                    jwt, self.key.public_key, self.key.app_id
                )
            except ValueError as e:
                raise PermissionError(f"JWT: {e}") from None
            if inst != str(self.key.installation_id):
                call.status, call.error = 404, f"no installation {inst}"
                return 404, {"message": "Not Found"}
            try:
                call.body = json.loads(raw or b"{}")
            except ValueError:
                call.status, call.error = 400, "body is not JSON"
                return 400, {"message": "Problems parsing JSON"}
            if self.expect is not None:
                got = {
                    "repositories": sorted(call.body.get("repositories") or []),
                    "permissions": call.body.get("permissions"),
                }
                want = {
                    "repositories": sorted(self.expect["repositories"]),
                    "permissions": self.expect["permissions"],
                }
                if got != want:
                    call.status, call.error = 422, f"asked for {got}, expected {want}"
                    return 422, {"message": call.error}
        except PermissionError as e:
            call.status, call.error = 401, str(e)
            return 401, {"message": str(e)}
        token = self.next_tokens.pop(0) if self.next_tokens else random_token()
        self.live.add(token)
        self.all_tokens.append(token)
        call.status, call.token = 201, token
        expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)  # noqa: UP017
        return 201, {
            "token": token,
            "expires_at": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "permissions": (call.body or {}).get("permissions") or {"contents": "read"},
            "repository_selection": "selected",
        }

    def revoke(self, auth: str | None) -> int:
        token = (
            auth.split(" ", 1)[1] if auth and auth.split(" ", 1)[0] in ("token", "Bearer") else ""
        )
        if token in self.live:
            self.live.discard(token)
            self.revoked.append(token)
            return 204
        return 401


# --- what the upstream saw -----------------------------------------------------------------


@dataclass
class Seen:
    """One request as the upstream received it (after the gateway rebuilt it)."""

    n: int
    method: str
    host: str
    path: str
    query: str
    headers: dict[str, str]  # lower-cased names
    credential: str  # "static:<host>", "app", "revoked", "bad", "none", "n/a" (API)
    body_len: int
    body: bytes  # git-receive-pack request bodies only (up to 16 MiB)
    chunked: bool
    status: int = 0
    response_len: int = 0

    @property
    def service(self) -> str | None:
        if self.path.endswith("/git-upload-pack") or self.query == "service=git-upload-pack":
            return "upload-pack"
        if self.path.endswith("/git-receive-pack") or self.query == "service=git-receive-pack":
            return "receive-pack"
        return None

    @property
    def repo(self) -> str:
        """ "org/name" of a git request (no .git)."""
        path = self.path
        for tail in ("/info/refs", "/git-upload-pack", "/git-receive-pack"):
            path = path.removesuffix(tail)
        return path.strip("/").removesuffix(".git")

    @property
    def is_push_rpc(self) -> bool:
        return self.method == "POST" and self.path.endswith("/git-receive-pack")


# --- the server ----------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _GitHTTPSServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_DELETE = do_PUT = do_HEAD = do_GET

    # body ---------------------------------------------------------------------------
    def _body_chunks(self) -> Iterator[bytes]:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                line = self.rfile.readline(1024)
                size = int(line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    return
                left = size
                while left:
                    data = self.rfile.read(min(left, 1 << 20))
                    if not data:
                        raise ConnectionError("body ended early")
                    left -= len(data)
                    yield data
                self.rfile.readline(1024)
            return
        left = int(self.headers.get("Content-Length") or 0)
        while left:
            data = self.rfile.read(min(left, 1 << 20))
            if not data:
                raise ConnectionError("body ended early")
            left -= len(data)
            yield data

    def _send(self, status: int, body: bytes, ctype: str = "text/plain", extra=()) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self._seen.status, self._seen.response_len = status, len(body)

    # dispatch -----------------------------------------------------------------------
    def _dispatch(self) -> None:
        srv = self.server
        path, _, query = self.path.partition("?")
        host = (self.headers.get("Host") or "").split(":")[0].lower()
        auth = self.headers.get("Authorization")
        is_api = path.startswith(("/app/", "/installation/"))
        credential = "n/a" if is_api else srv.credential_of(host, auth)
        chunked = self.headers.get("Transfer-Encoding", "").lower() == "chunked"
        seen = Seen(
            srv.next_n(),
            self.command,
            host,
            path,
            query,
            {k.lower(): v for k, v in self.headers.items()},
            credential,
            0,
            b"",
            chunked,
        )
        self._seen = seen
        with srv.lock:
            srv.seen.append(seen)
        if is_api:
            self._api(seen, path, auth)
            return
        if credential in ("none", "bad", "revoked"):
            # Drain the body so the connection stays usable, then ask for credentials.
            for data in self._body_chunks():
                seen.body_len += len(data)
            self._send(
                401,
                b"authentication required\n",
                extra=(("WWW-Authenticate", 'Basic realm="git"'),),
            )
            return
        self._cgi(seen, path, query)

    def _api(self, seen: Seen, path: str, auth: str | None) -> None:
        app = self.server.app
        raw = b"".join(self._body_chunks())
        seen.body_len = len(raw)
        if app is None:
            self._send(404, b'{"message":"Not Found"}', "application/json")
            return
        parts = path.strip("/").split("/")
        if (
            self.command == "POST"
            and len(parts) == 4
            and parts[0] == "app"
            and parts[1] == "installations"
            and parts[3] == "access_tokens"
        ):
            with self.server.lock:
                status, answer = app.mint(parts[2], auth, raw)
            self._send(status, json.dumps(answer).encode(), "application/json; charset=utf-8")
            return
        if self.command == "DELETE" and path == "/installation/token":
            with self.server.lock:
                status = app.revoke(auth)
            self._send(status, b"" if status == 204 else b'{"message":"Bad credentials"}')
            return
        self._send(404, b'{"message":"Not Found"}', "application/json")

    def _cgi(self, seen: Seen, path: str, query: str) -> None:
        srv = self.server
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(srv.project_root),
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": "/dev/null",
            "GIT_PROJECT_ROOT": str(srv.project_root),
            "GIT_HTTP_EXPORT_ALL": "1",
            # As GitHub: pushes, partial clones (filters, and fetching any object a
            # partial clone lacks later on).
            "GIT_CONFIG_COUNT": "3",
            "GIT_CONFIG_KEY_0": "http.receivepack",
            "GIT_CONFIG_VALUE_0": "true",
            "GIT_CONFIG_KEY_1": "uploadpack.allowFilter",
            "GIT_CONFIG_VALUE_1": "true",
            "GIT_CONFIG_KEY_2": "uploadpack.allowAnySHA1InWant",
            "GIT_CONFIG_VALUE_2": "true",
            "GATEWAY_INTERFACE": "CGI/1.1",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "SERVER_NAME": seen.host or "git.test",
            "SERVER_PORT": str(HTTPS_PORT),
            "HTTPS": "on",
            "REQUEST_METHOD": self.command,
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "REMOTE_ADDR": self.client_address[0],
            "REMOTE_USER": "x-access-token",
        }
        if self.headers.get("Content-Type"):
            env["CONTENT_TYPE"] = self.headers["Content-Type"]
        if self.headers.get("Content-Encoding"):
            env["HTTP_CONTENT_ENCODING"] = self.headers["Content-Encoding"]
        if self.headers.get("Git-Protocol"):
            env["GIT_PROTOCOL"] = self.headers["Git-Protocol"]
        length = self.headers.get("Content-Length")
        if length is not None and not seen.chunked:
            env["CONTENT_LENGTH"] = length
        proc = subprocess.Popen(
            [HTTP_BACKEND],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            bufsize=0,
        )
        keep_body = seen.is_push_rpc

        def feed() -> None:
            try:
                for data in self._body_chunks():
                    seen.body_len += len(data)
                    if keep_body and len(seen.body) < (16 << 20):
                        seen.body += data
                    proc.stdin.write(data)
            except (OSError, ValueError, ConnectionError):
                pass
            finally:
                with contextlib.suppress(OSError):
                    proc.stdin.close()

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        try:
            self._relay_cgi(proc, seen)
        finally:
            feeder.join(60)
            proc.stdout.close()
            proc.wait(60)

    def _relay_cgi(self, proc: subprocess.Popen, seen: Seen) -> None:
        out = proc.stdout
        head = b""
        while b"\r\n\r\n" not in head and b"\n\n" not in head:
            data = out.read(4096)
            if not data:
                self._send(502, b"git http-backend wrote no headers\n")
                return
            head += data
        sep = b"\r\n\r\n" if b"\r\n\r\n" in head else b"\n\n"
        raw_headers, rest = head.split(sep, 1)
        status, headers = 200, []
        for line in raw_headers.decode("latin-1").splitlines():
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.strip().split()[0])
            elif name:
                headers.append((name, value.strip()))
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        seen.status = status
        wfile = self.wfile
        total = 0
        data = rest
        while True:
            if data:
                total += len(data)
                wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            data = out.read(256 * 1024)
            if not data:
                break
        wfile.write(b"0\r\n\r\n")
        seen.response_len = total


class _GitHTTPSServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, sock: socket.socket, tls: ssl.SSLContext, project_root: Path) -> None:
        super().__init__(sock.getsockname(), _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.tls = tls
        self.project_root = project_root
        self.lock = threading.Lock()
        self.seen: list[Seen] = []
        self.static_tokens: dict[str, str] = {}  # host -> token
        self.app: AppState | None = None
        self.close_notify = False
        self._n = 0

    def next_n(self) -> int:
        with self.lock:
            self._n += 1
            return self._n

    def credential_of(self, host: str, auth: str | None) -> str:
        if not auth:
            return "none"
        scheme, _, value = auth.partition(" ")
        if scheme.lower() != "basic":
            return "bad"
        try:
            user, _, token = base64.b64decode(value, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return "bad"
        if user != "x-access-token":
            return "bad"
        if self.static_tokens.get(host) == token:
            return f"static:{host}"
        if self.app is not None:
            if token in self.app.live:
                return "app"
            if token in self.app.revoked:
                return "revoked"
        return "bad"

    def finish_request(self, request, client_address) -> None:
        request.settimeout(120)
        try:
            conn = self.tls.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError):
            return
        try:
            self.RequestHandlerClass(conn, client_address, self)
        finally:
            if self.close_notify:
                with contextlib.suppress(OSError, ValueError):
                    conn.unwrap()
            with contextlib.suppress(OSError):
                conn.close()

    def handle_error(self, request, client_address) -> None:
        pass


# --- the upstream namespace -----------------------------------------------------------------


def upstream_netns(prefix: str = "sgtest-git") -> contextlib.AbstractContextManager:
    """The git upstream's namespace (tests/nsutil.py builds it)."""
    return nsutil.upstream_netns(prefix)


@dataclass
class GitUpstream:
    """The running upstream: the server's state and the repositories behind it."""

    netns: str
    addr: IPv4Address
    host_addr: IPv4Address
    ca: TestCA
    root: Path  # GIT_PROJECT_ROOT
    server: _GitHTTPSServer

    @property
    def seen(self) -> list[Seen]:
        with self.server.lock:
            return list(self.server.seen)

    def mark(self) -> int:
        """A position in the request log; `since(mark)` is what came after it."""
        with self.server.lock:
            return len(self.server.seen)

    def since(self, mark: int) -> list[Seen]:
        with self.server.lock:
            return list(self.server.seen[mark:])

    def set_token(self, host: str, token: str) -> None:
        self.server.static_tokens[host] = token

    @property
    def app(self) -> AppState | None:
        return self.server.app

    def set_app(self, app: AppState | None) -> None:
        self.server.app = app

    # repositories ---------------------------------------------------------------------
    def bare(self, name: str) -> Path:
        return self.root / f"{name}.git"

    def show_ref(self, name: str) -> dict[str, str]:
        """ref -> object id of a bare repository ({} when it has none)."""
        out = git("--git-dir", str(self.bare(name)), "show-ref", check=False)
        return {ref: oid for oid, ref in (line.split(" ", 1) for line in out.splitlines())}

    def make_repo(
        self, name: str, *, branches: dict[str, int] | None = None, files: int = 2
    ) -> dict[str, str]:
        """A bare repository `name` ("org/repo") with `branches` (name -> commits on top
        of main's first commit; default {"main": 2}); its refs."""
        return make_bare_repo(self.bare(name), branches=branches or {"main": 2}, files=files)

    def make_empty_repo(self, name: str) -> Path:
        path = self.bare(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        git("init", "-q", "--bare", "-b", "main", str(path))
        return path

    def remove_repo(self, name: str) -> None:
        shutil.rmtree(self.bare(name), ignore_errors=True)

    # talking to it from the host (never through the gateway) ---------------------------
    def git_direct_args(self, host: str) -> list[str]:
        """`git -c ...` options that reach `host` at this upstream over TLS directly from
        the host, with the static token in an extra header (never in a URL)."""
        return [
            "-c",
            f"http.curloptResolve={host}:{HTTPS_PORT}:{self.addr}",
            "-c",
            f"http.sslCAInfo={self.ca.ca_cert}",
            "-c",
            f"http.extraHeader=Authorization: {basic(self.server.static_tokens[host])}",
            "-c",
            "http.proxy=",
            "-c",
            "credential.helper=",
        ]


@contextlib.contextmanager
def git_upstream(
    work: Path, names: list[str], *, close_notify: bool = False
) -> Iterator[GitUpstream]:
    """The upstream namespace with the git server (and App API) on :443, serving
    certificates for `names`; repositories under `work`/repos. All removed on exit.

    After the last response on a connection the server closes TCP without a TLS
    close_notify (as Python's ssl module, and many servers, do: RFC 8446 allows it,
    and HTTP framing says where a response ends); `close_notify` sends one first."""
    certs, keys, root = work / "certs", work / "keys", work / "repos"
    for d, mode in ((certs, 0o755), (keys, 0o700), (root, 0o755)):
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(mode)
    ca = make_test_ca(certs, keys, names, prefix="git-")
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(ca.server_cert, ca.server_key)
    with upstream_netns() as (ns, host_addr, addr):

        def make() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((str(addr), HTTPS_PORT))
            s.listen(128)
            return s

        sock = run_in_netns(ns, make)
        server = _GitHTTPSServer(sock, tls, root)
        server.close_notify = close_notify
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        try:
            yield GitUpstream(ns, addr, host_addr, ca, root, server)
        finally:
            server.shutdown()
            server.server_close()
            thread.join(10)


# --- repositories ---------------------------------------------------------------------------


def make_bare_repo(
    path: Path,
    *,
    branches: dict[str, int],
    files: int = 2,
    file_size: int = 200,
    random_data: bool = False,
) -> dict[str, str]:
    """A bare repository at `path` whose branches each have `branches[name]` commits
    (main first; the others fork from main's first commit); every commit writes `files`
    files of `file_size` bytes (random, incompressible bytes when `random_data`). Its
    refs (show-ref)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    work = path.parent / f".work-{path.name}-{secrets.token_hex(3)}"
    try:
        git("init", "-q", "-b", "main", str(work))
        first = None
        for branch, count in branches.items():
            if first is not None:
                git("checkout", "-q", "-b", branch, first, cwd=work)
            for c in range(count):
                for f in range(files):
                    data = (
                        os.urandom(file_size)
                        if random_data
                        else (f"{branch} {c} {f} " * (file_size // 16 + 1))[:file_size].encode()
                    )
                    (work / f"{branch.replace('/', '_')}-{f}.dat").write_bytes(data)
                git("add", "-A", cwd=work)
                git("commit", "-q", "-m", f"{branch} commit {c}", cwd=work)
                if first is None:
                    first = git("rev-parse", "HEAD", cwd=work).strip()
        git("checkout", "-q", "main", cwd=work)  # the bare repository's HEAD: main
        git("clone", "-q", "--bare", str(work), str(path))
        # The clone's origin remote and packed refs are fine; drop the remote.
        git("--git-dir", str(path), "remote", "remove", "origin", check=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = git("--git-dir", str(path), "show-ref")
    return {ref: oid for oid, ref in (line.split(" ", 1) for line in out.splitlines())}


BIG_REPO_CACHE = Path("/tmp/sandgate-git-bench-cache")


def big_repo(size_mib: int = 50, cache: Path = BIG_REPO_CACHE) -> Path:
    """A bare repository of about `size_mib` MiB of incompressible data (a few files in
    a few commits), built once and cached under /tmp (remove with `drop_big_repo`)."""
    path = cache / f"big-{size_mib}m.git"
    if (path / "HEAD").exists() and (cache / f"big-{size_mib}m.ok").exists():
        return path
    shutil.rmtree(path, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    cache.chmod(0o755)
    per_file = 5 * 1024 * 1024
    files = max(1, size_mib // 5 // 2)
    make_bare_repo(path, branches={"main": 2}, files=files, file_size=per_file, random_data=True)
    git("--git-dir", str(path), "repack", "-a", "-d", "-q")
    (cache / f"big-{size_mib}m.ok").write_text("ok\n")
    return path


def drop_big_repo(cache: Path = BIG_REPO_CACHE) -> None:
    shutil.rmtree(cache, ignore_errors=True)


# --- malformed push bodies --------------------------------------------------------------------


def pkt(payload: bytes | str) -> bytes:
    data = payload.encode() if isinstance(payload, str) else payload
    return b"%04x" % (len(data) + 4) + data


FLUSH = b"0000"


@dataclass(frozen=True)
class PushBody:
    """A real push body split where the gateway reads it: the commands (each without
    the 4 length digits), the capabilities, and the pack."""

    old: str
    new: str
    ref: str
    caps: str
    pack: bytes

    @classmethod
    def parse(cls, body: bytes) -> PushBody:
        """The body of a one-ref push as git 2.39 sends it."""
        length = int(body[:4], 16)
        line = body[4:length].rstrip(b"\n")
        command, _, caps = line.partition(b"\0")
        old, new, ref = command.decode().split(" ", 2)
        rest = body[length:]
        assert rest.startswith(FLUSH), rest[:8]
        pack = rest[4:]
        assert pack.startswith(b"PACK"), pack[:8]
        return cls(old, new, ref, caps.decode(), pack)

    def first(self, ref: str | None = None, *, old=None, new=None, caps=None) -> bytes:
        old = self.old if old is None else old
        new = self.new if new is None else new
        caps = self.caps if caps is None else caps
        return pkt(f"{old} {new} {ref or self.ref}\0{caps}".encode())

    def body(self, ref: str) -> bytes:
        return self.first(ref) + FLUSH + self.pack


def malformed_bodies(base: PushBody, ref: str) -> dict[str, tuple[bytes, dict[str, str]]]:
    """name -> (body, extra headers) of pushes that are not valid push requests. Each
    would push `ref` (a ref the policy allows) from a real push body, so what refuses
    them must be the parser, not a rule. The default Content-Type is right."""
    first = base.first(ref)
    pack = base.pack
    caps = base.caps
    other = "refs/heads/sandbox/other"
    second = pkt(f"{ZERO_OID} {base.new} {other}")
    out: dict[str, tuple[bytes, dict[str, str]]] = {
        "bad-hex-length": (b"00zz" + first[4:] + FLUSH + pack, {}),
        "delim-0001-in-commands": (first + b"0001" + FLUSH + pack, {}),
        "response-end-0002-in-commands": (first + b"0002" + FLUSH + pack, {}),
        "length-0003": (first + b"0003" + FLUSH + pack, {}),
        "empty-pkt-0004": (first + b"0004" + FLUSH + pack, {}),
        "length-over-65520": (b"fff5" + first[4:] + b"x" * (0xFFF5 - len(first)) + FLUSH, {}),
        "truncated-in-first-pkt": (first[: len(first) // 2], {}),
        "truncated-before-flush": (first, {}),
        "bad-oid-non-hex": (base.first(ref, new="g" * 40) + FLUSH + pack, {}),
        "bad-oid-upper-case": (base.first(ref, new=base.new.upper()) + FLUSH + pack, {}),
        "bad-oid-short": (base.first(ref, new=base.new[:39]) + FLUSH + pack, {}),
        "mixed-oid-lengths": (base.first(ref, old="0" * 64) + FLUSH + pack, {}),
        "both-oids-zero": (base.first(ref, new=ZERO_OID) + FLUSH, {}),
        "bad-ref-dotdot": (base.first("refs/heads/sandbox/a..b") + FLUSH + pack, {}),
        "bad-ref-not-under-refs": (base.first("sandbox-main") + FLUSH + pack, {}),
        "bad-ref-control-char": (base.first("refs/heads/sandbox/a\x01b") + FLUSH + pack, {}),
        "bad-ref-lock-suffix": (base.first("refs/heads/sandbox/x.lock") + FLUSH + pack, {}),
        "missing-caps-nul": (pkt(f"{base.old} {base.new} {ref}") + FLUSH + pack, {}),
        "nul-in-second-command": (
            first + pkt(f"{ZERO_OID} {base.new} {other}\0{caps}") + FLUSH + pack,
            {},
        ),
        "duplicate-ref": (first + pkt(f"{ZERO_OID} {base.new} {ref}") + FLUSH + pack, {}),
        "shallow-after-commands": (first + pkt(f"shallow {base.new}") + FLUSH + pack, {}),
        "push-options-without-capability": (first + FLUSH + pkt("ci.skip") + FLUSH + pack, {}),
        "unknown-capability": (base.first(ref, caps=caps + " evil-cap") + FLUSH + pack, {}),
        "signed-push-cert": (pkt(f"push-cert\0{caps}") + second + FLUSH + pack, {}),
        "garbage-instead-of-pack": (first + FLUSH + b"JUNK" + pack[4:], {}),
        "no-pack-after-create": (first + FLUSH, {}),
        "gzip-content-encoding": (
            gzip.compress(first + FLUSH + pack),
            {"Content-Encoding": "gzip"},
        ),
        "wrong-content-type": (
            first + FLUSH + pack,
            {"Content-Type": "application/x-git-upload-pack-request"},
        ),
        "no-content-type": (first + FLUSH + pack, {"Content-Type": ""}),
    }
    return out


# --- the scan for secrets run inside a sandbox ---------------------------------------------------

SCAN_SCRIPT = r'''
"""Look for secrets everywhere this sandbox can read. The secrets arrive XOR-masked
(SCAN_MASK, SCAN_SECRETS: hex), so this process's own environment and command line
never hold them in the clear; they are unmasked in memory only.

Files: every regular file under /, except /proc and /sys, whose content could have
been written after the secrets existed (max(mtime, ctime) >= SCAN_SINCE - 5 s): a file
last changed before a random secret was generated cannot contain it, and ctime cannot
be set back without root. Every file counted; the older ones are listed as skipped by
that rule. /proc: every process's environ, cmdline, and the mounts. Plus
`git config --list --show-origin` and the environment, as text."""
import json, os, stat, subprocess

mask = bytes.fromhex(os.environ["SCAN_MASK"])
needles = []
for h in os.environ["SCAN_SECRETS"].split(","):
    raw = bytes.fromhex(h)
    needles.append(bytes(b ^ mask[i % len(mask)] for i, b in enumerate(raw)))
since = float(os.environ["SCAN_SINCE"]) - 5
hits, stats = [], {"files": 0, "read": 0, "old": 0, "unreadable": 0, "bytes": 0, "proc": 0}

def check(name, data):
    for i, n in enumerate(needles):
        if n in data:
            hits.append({"where": name, "secret": i})

def read(path):
    with open(path, "rb") as f:
        return f.read()

for top, dirs, files in os.walk("/", topdown=True):
    if top == "/":
        dirs[:] = [d for d in dirs if d not in ("proc", "sys")]
    for name in files:
        p = os.path.join(top, name)
        try:
            st = os.lstat(p)
        except OSError:
            stats["unreadable"] += 1
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        stats["files"] += 1
        if max(st.st_mtime, st.st_ctime) < since:
            stats["old"] += 1
            continue
        try:
            data = read(p)
        except OSError:
            stats["unreadable"] += 1
            continue
        stats["read"] += 1
        stats["bytes"] += len(data)
        check(p, data)

for pid in os.listdir("/proc"):
    if not pid.isdigit():
        continue
    for what in ("environ", "cmdline", "mountinfo"):
        try:
            data = read(f"/proc/{pid}/{what}")
        except OSError:
            continue
        stats["proc"] += 1
        check(f"/proc/{pid}/{what}", data)
for what in ("/proc/self/environ", "/proc/mounts", "/proc/cmdline"):
    try:
        check(what, read(what))
    except OSError:
        pass

cfg = subprocess.run(["git", "config", "--list", "--show-origin"], capture_output=True)
check("git config --list --show-origin", cfg.stdout + cfg.stderr)
env = subprocess.run(["env"], capture_output=True)
check("env", env.stdout)
check("os.environ", "\n".join(f"{k}={v}" for k, v in os.environ.items()).encode())
print(json.dumps({"hits": hits, "stats": stats, "git_config": cfg.stdout.decode(errors="replace"),
                  "env": env.stdout.decode(errors="replace")}))
'''


def scan_env(secret_values: list[str], since: float) -> dict[str, str]:
    """The environment for SCAN_SCRIPT: `secret_values` masked with a random key."""
    mask = os.urandom(32)

    def masked(s: str) -> str:
        raw = s.encode()
        return bytes(b ^ mask[i % len(mask)] for i, b in enumerate(raw)).hex()

    return {
        "SCAN_MASK": mask.hex(),
        "SCAN_SECRETS": ",".join(masked(s) for s in secret_values),
        "SCAN_SINCE": f"{since:.3f}",
    }
