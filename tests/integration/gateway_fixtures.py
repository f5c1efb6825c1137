"""Helpers for the gateway's end-to-end tests (test_gateway_sandbox.py): a test CA and
server certificate, an "upstream" network namespace in 10.214.0.0/16 with recording
HTTP, HTTPS, echo and sink servers, and the client module the tests run *inside*
sandboxes.

Nothing here touches a real host name or an address outside the namespaces the tests
make: the upstream answers at 10.214.N.2 only, and sandboxes reach it through the
gateway with `--resolve NAME=10.214.N.2`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import socket
import ssl
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from tests import nsutil
from tests.nsutil import run_in_netns
from tests.testca import TestCA

# How many processes the in-process gateways of the test modules that take the
# `gateway_processes` fixture (tests/integration/conftest.py) run with, per test.
GATEWAY_PROCESSES: list[int] = [1]

HTTP_PORT, HTTPS_PORT, ECHO_PORT, SINK_PORT = 80, 443, 7000, 7001

# --- a test CA -------------------------------------------------------------------------


# --- a tiny PEP 503 index with one wheel -----------------------------------------------

PACKAGE = "somepkg"
WHEEL_NAME = f"{PACKAGE}-1.0-py3-none-any.whl"


def _make_wheel() -> bytes:
    files = {
        f"{PACKAGE}/__init__.py": b"VERSION = '1.0'\n",
        f"{PACKAGE}-1.0.dist-info/METADATA": (
            f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: 1.0\nSummary: test\n\n"
        ).encode(),
        f"{PACKAGE}-1.0.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: sandgate-tests\nRoot-Is-Purelib: true\n"
            b"Tag: py3-none-any\n"
        ),
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
        record.append(f"{name},sha256={digest.decode()},{len(data)}")
    record.append(f"{PACKAGE}-1.0.dist-info/RECORD,,")
    files[f"{PACKAGE}-1.0.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), data)
    return out.getvalue()


WHEEL = _make_wheel()
WHEEL_SHA256 = hashlib.sha256(WHEEL).hexdigest()


def _route(path: str) -> tuple[int, str, bytes]:
    """(status, content type, body) the upstream answers a request for `path` with."""
    path = path.split("?", 1)[0]
    html = "text/html; charset=utf-8"
    if path == "/simple/":
        return (
            200,
            html,
            f'<html><body><a href="/simple/{PACKAGE}/">{PACKAGE}</a></body></html>'.encode(),
        )
    if path == f"/simple/{PACKAGE}/":
        link = f"/packages/{WHEEL_NAME}#sha256={WHEEL_SHA256}"
        return 200, html, f'<html><body><a href="{link}">{WHEEL_NAME}</a></body></html>'.encode()
    if path == f"/packages/{WHEEL_NAME}":
        return 200, "application/octet-stream", WHEEL
    if path.startswith("/simple/"):
        return 404, "text/plain", b"not found\n"
    return 200, "text/plain", f"upstream ok {path}\n".encode()


# --- recording servers -----------------------------------------------------------------


@dataclass(frozen=True)
class SeenRequest:
    """One request as the upstream received it (after the gateway rebuilt it)."""

    method: str
    target: str
    version: str
    headers: tuple[tuple[str, str], ...]  # in order, names as sent
    body_len: int
    tls: bool

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


@dataclass(frozen=True)
class Counts:
    connections: int
    bytes: int
    requests: int


@dataclass
class Recorder:
    """What one upstream server saw: accepted connections, bytes received (for TLS, the
    decrypted bytes), and parsed requests."""

    connections: int = 0
    bytes: int = 0
    requests: list[SeenRequest] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def counts(self) -> Counts:
        with self.lock:
            return Counts(self.connections, self.bytes, len(self.requests))

    def requests_since(self, counts: Counts) -> list[SeenRequest]:
        with self.lock:
            return list(self.requests[counts.requests :])

    def _add_bytes(self, n: int) -> None:
        with self.lock:
            self.bytes += n


class _Server:
    """A listener created inside the upstream netns; one thread per connection."""

    def __init__(self, netns: str, addr: str, port: int, kind: str, tls: ssl.SSLContext | None):
        self.kind, self.tls, self.seen = kind, tls, Recorder()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

        def make() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((addr, port))
            s.listen(64)
            s.settimeout(0.05)
            return s

        self.sock = run_in_netns(netns, make)
        self._spawn(self._accept)

    def _spawn(self, fn, *args) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self.seen.lock:
                self.seen.connections += 1
            with self._lock:
                self._conns.add(conn)
            self._spawn(self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(15)
        stream: socket.socket = conn
        try:
            if self.kind == "echo" or self.kind == "sink":
                while data := conn.recv(65536):
                    self.seen._add_bytes(len(data))
                    if self.kind == "echo":
                        conn.sendall(data)
                return
            if self.tls is not None:
                stream = self.tls.wrap_socket(conn, server_side=True)
            _HttpConnection(stream, self.seen, self.tls is not None).serve()
        except (OSError, ValueError):
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
            with contextlib.suppress(OSError):
                stream.close()
            with contextlib.suppress(OSError):
                conn.close()

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.sock.close()
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(5)


class _HttpConnection:
    """A small, strict-enough HTTP/1.1 server side: keep-alive, Content-Length and
    chunked request bodies, every response with Content-Length."""

    def __init__(self, stream: socket.socket, seen: Recorder, tls: bool) -> None:
        self.stream, self.seen, self.tls = stream, seen, tls
        self.buf = b""

    def _fill(self) -> bool:
        data = self.stream.recv(65536)
        self.seen._add_bytes(len(data))
        self.buf += data
        return bool(data)

    def _read_line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise ValueError("closed")
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise ValueError("closed")
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def serve(self) -> None:
        while True:
            while b"\r\n\r\n" not in self.buf:
                if len(self.buf) > 256 * 1024 or not self._fill():
                    return
            head, self.buf = self.buf.split(b"\r\n\r\n", 1)
            request_line, *lines = head.decode("latin-1").split("\r\n")
            method, target, version = request_line.split(" ", 2)
            headers = tuple((k, v.strip()) for k, _, v in (ln.partition(":") for ln in lines))
            values = {k.lower(): v for k, v in headers}
            body = 0
            if values.get("transfer-encoding", "").lower() == "chunked":
                while size := int(self._read_line(), 16):
                    body += len(self._read_exact(size + 2)) - 2
                self._read_line()
            elif "content-length" in values:
                body = len(self._read_exact(int(values["content-length"])))
            with self.seen.lock:
                self.seen.requests.append(
                    SeenRequest(method, target, version, headers, body, self.tls)
                )
            status, ctype, payload = _route(target)
            close = values.get("connection", "").lower() == "close" or version == "HTTP/1.0"
            reason = "OK" if status == 200 else "Not Found"
            self.stream.sendall(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(payload)}\r\n"
                f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n".encode()
                + (b"" if method == "HEAD" else payload)
            )
            if close:
                return


@dataclass
class Upstream:
    """The stand-in internet: a netns at `addr` (10.214.N.2) with four servers."""

    netns: str
    host_addr: IPv4Address
    addr: IPv4Address
    http: Recorder
    https: Recorder
    echo: Recorder
    sink: Recorder

    def counts(self) -> dict[str, Counts]:
        return {name: getattr(self, name).counts() for name in ("http", "https", "echo", "sink")}


def upstream_netns() -> contextlib.AbstractContextManager:
    """The gateway tests' upstream namespace (tests/nsutil.py builds it)."""
    return nsutil.upstream_netns("sgtest-gw")


@contextlib.contextmanager
def upstream_servers(ca: TestCA) -> Iterator[Upstream]:
    """An upstream namespace serving HTTP on :80, HTTPS (the test CA's certificate) on
    :443, an echo server on :7000 and a sink on :7001; all recorded; all closed on exit."""
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(ca.server_cert, ca.server_key)
    with upstream_netns() as (name, host_addr, addr):
        servers: list[_Server] = []
        try:
            for port, kind, ctx in (
                (HTTP_PORT, "http", None),
                (HTTPS_PORT, "http", tls),
                (ECHO_PORT, "echo", None),
                (SINK_PORT, "sink", None),
            ):
                servers.append(_Server(name, str(addr), port, kind, ctx))
            yield Upstream(name, host_addr, addr, *(s.seen for s in servers))
        finally:
            for s in servers:
                s.close()


# --- the client side, run inside sandboxes ---------------------------------------------

# Installed as sgclient.py in a directory bound read-only into each sandbox; the
# scripts the tests run inside (/usr/bin/python3, the host's Python) import it.
SANDBOX_CLIENT = r'''
"""Raw clients for the sandgate gateway, run inside a sandbox."""
import json
import os
import socket
import ssl
import subprocess
import sys
import urllib.parse

UNIX = os.environ.get("SANDGATE_GATEWAY_SOCKET", "/run/sandgate/gateway.sock")


def gateway_addr():
    url = urllib.parse.urlsplit(os.environ["HTTP_PROXY"])
    return url.hostname, url.port


def connect(unix=False, timeout=5.0, addr=None):
    if unix:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(UNIX)
        return s
    return socket.create_connection(addr or gateway_addr(), timeout=timeout)


def read_all(s, limit=4 << 20):
    data, error = b"", None
    try:
        while len(data) < limit:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError as e:
        error = type(e).__name__
    return data, error


def parse(data):
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = None
    if lines and lines[0].startswith("HTTP/1."):
        status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return {
        "status": status,
        "request_id": headers.get("x-sandgate-request-id"),
        "headers": headers,
        "body": body.decode("utf-8", "replace"),
    }


def exchange(data, unix=False, timeout=5.0):
    """Send raw bytes in one write; read to EOF; the parsed response."""
    try:
        s = connect(unix, timeout)
    except OSError as e:
        return {"status": None, "error": type(e).__name__, "body": "", "request_id": None}
    with s:
        s.sendall(data)
        raw, error = read_all(s)
    out = parse(raw)
    out["error"] = error
    return out


def get(url, *headers, unix=False, method="GET", body=b""):
    """An absolute-form request for `url` (whose authority is the Host)."""
    host = urllib.parse.urlsplit(url).netloc.rpartition("@")[2]
    lines = [f"{method} {url} HTTP/1.1", f"Host: {host}", *headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return exchange(("\r\n".join(lines) + "\r\n\r\n").encode() + body, unix=unix)


def read_head(s):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(1)
        if not chunk:
            break
        data += chunk
    return parse(data)


def tunnel(authority, *headers, unix=False, timeout=5.0):
    """CONNECT authority; (socket or None, parsed response head)."""
    s = connect(unix, timeout)
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}", *headers]
    s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    head = read_head(s)
    if head["status"] != 200:
        rest, _ = read_all(s)
        head["body"] += rest.decode("utf-8", "replace")
        s.close()
        return None, head
    return s, head


def https_get(s, host, path, cafile):
    """GET path over TLS on an open tunnel, verifying `host` against `cafile`."""
    ctx = ssl.create_default_context(cafile=cafile)
    with ctx.wrap_socket(s, server_hostname=host) as t:
        t.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        raw, error = read_all(t)
    out = parse(raw)
    out["error"] = error
    return out


def run(*argv, timeout=60, env=None):
    p = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout,
        env=None if env is None else {**os.environ, **env},
    )
    return {"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr}


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()
'''
