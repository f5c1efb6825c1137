"""The egress proxy for real: a Gateway on 127.0.0.1 (and a Unix socket), upstreams in
a test network namespace at 10.214.N.2 (the `upstream` fixture), and a fake resolver,
so no real name is ever looked up and nothing leaves the machine. The gateway's loop
(uvloop, or asyncio's own) runs in a thread; the tests talk to it with plain sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, ip_address
from pathlib import Path

import pytest
import uvloop

from gateway.addr import IPAddress
from gateway.policy import Policy, parse_policy
from gateway.proxy import Gateway, GatewayConfig
from tests.integration.gateway_fixtures import GATEWAY_PROCESSES
from tests.nsutil import run_in_netns
from tests.unit.test_audit import FIELDS

LOOPS = [
    pytest.param(uvloop.new_event_loop, id="uvloop"),
    pytest.param(asyncio.new_event_loop, id="asyncio"),
]
SECRET = "Zm9vOmJhcg-s3cr3t-proxy-credential"
HTTP_PORT, ECHO_PORT, CLOSED_PORT, FULL_PORT = 80, 7000, 7001, 7002
OK_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
AUDIT_FIELDS = FIELDS  # the one literal list of audit fields: tests/unit/test_audit.py


def make_policy(**egress: object) -> Policy:
    settings = {"allow_cidrs": '["10.214.0.0/16"]', "rate": 1000, "burst": 1000, **egress}
    lines = ["[egress]", *(f"{k} = {v}" for k, v in settings.items())]
    for host in ("upstream.test", "loop.test", "meta.test", "mapped.test", "mixed.test"):
        lines += [
            "[[egress.allow]]",
            f'host = "{host}"',
            f"ports = [{HTTP_PORT}, {ECHO_PORT}, {CLOSED_PORT}, {FULL_PORT}]",
            'methods = ["GET", "HEAD", "POST"]',
        ]
    return parse_policy("\n".join(lines))


def fake_resolver(upstream_addr: IPv4Address | None) -> Callable[[str, int], list[IPAddress]]:
    names: dict[str, list[str]] = {
        "loop.test": ["127.0.0.2"],  # 127.0.0.1 is the gateway's own: "self"
        "meta.test": ["169.254.169.254"],
        "mapped.test": ["::ffff:10.0.0.1"],
    }
    if upstream_addr is not None:
        names["upstream.test"] = [str(upstream_addr)]
        names["mixed.test"] = [str(upstream_addr), "127.0.0.2"]

    def resolve(host: str, port: int) -> list[IPAddress]:
        if host not in names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [ip_address(a) for a in names[host]]

    return resolve


# --- the gateway in a thread ---------------------------------------------------------

# Every test here runs twice: with the gateway in one process, and with a helper
# process beside it (GatewayConfig.processes = 2: both accept on the same listeners;
# limits in shared memory; git, API and lookups through the first process).
pytestmark = pytest.mark.usefixtures("gateway_processes")


class RunningGateway:
    def __init__(self, loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
        self.loop = loop_factory()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.gateway: Gateway
        self.tcp: tuple[str, int]
        self.unix: str
        self.audit_path: str

    def call(self, coro, timeout: float = 10):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def audit(self) -> list[dict]:
        with open(self.audit_path) as f:
            return [json.loads(line) for line in f]

    def audit_for(self, request_id: str) -> dict:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            found = [r for r in self.audit() if r["request_id"] == request_id]
            if found:
                return found[0]
            time.sleep(0.02)
        raise AssertionError(f"no audit line for {request_id}")

    def last_audit(self, count: int = 1, timeout: float = 5) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(self.audit()) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.audit()


@contextlib.contextmanager
def running_gateway(
    tmp_path,
    loop_factory=uvloop.new_event_loop,
    policy: Policy | None = None,
    upstream_addr: IPv4Address | None = None,
    **config: object,
) -> Iterator[RunningGateway]:
    run = RunningGateway(loop_factory)
    run.audit_path = str(tmp_path / "audit.jsonl")
    run.unix = str(tmp_path / "gateway.sock")
    settings = {
        "resolver": fake_resolver(upstream_addr),
        "connect_timeout": 3.0,
        "processes": GATEWAY_PROCESSES[0],
        **config,
    }

    async def start() -> None:
        run.gateway = Gateway(GatewayConfig(audit_path=run.audit_path, **settings))
        endpoints = await run.gateway.add_sandbox(
            "sbtest", policy or make_policy(), ("127.0.0.1", 0), run.unix
        )
        assert endpoints.tcp is not None
        run.tcp = endpoints.tcp

    try:
        run.call(start())
        yield run
    finally:
        with contextlib.suppress(AttributeError):
            run.call(run.gateway.close())
        run.loop.call_soon_threadsafe(run.loop.stop)
        run.thread.join(10)
        run.loop.close()
    assert not os.path.exists(run.unix)


# --- upstream servers in the test namespace ------------------------------------------


@dataclass
class Seen:
    data: bytearray = field(default_factory=bytearray)
    done: threading.Event = field(default_factory=threading.Event)
    error: str | None = None


class UpstreamServer:
    """Accepts in the upstream netns and records every byte. "http": answers
    OK_RESPONSE once a whole request has arrived; "echo": sends everything back;
    "full": listens with a full backlog and never accepts (connects time out)."""

    def __init__(self, netns: str, addr: IPv4Address, port: int, mode: str) -> None:
        self.mode = mode
        self.conns: list[Seen] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

        def make() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((str(addr), port))
            s.listen(0 if mode == "full" else 64)
            return s

        self.sock = run_in_netns(netns, make)
        if mode != "full":
            self._spawn(self._accept)

    def _spawn(self, fn, *args) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        self.sock.settimeout(0.05)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            seen = Seen()
            self.conns.append(seen)
            self._spawn(self._handle, conn, seen)

    def _handle(self, conn: socket.socket, seen: Seen) -> None:
        conn.settimeout(10)
        try:
            while not self._stop.is_set():
                chunk = conn.recv(1 << 20)
                if not chunk:
                    break
                seen.data += chunk
                if self.mode == "echo":
                    conn.sendall(chunk)
                elif request_complete(bytes(seen.data)):
                    conn.sendall(OK_RESPONSE)
                    break
        except OSError as e:
            seen.error = type(e).__name__
        finally:
            conn.close()
            seen.done.set()

    def wait_done(self, count: int = 1, timeout: float = 5) -> list[Seen]:
        deadline = time.monotonic() + timeout
        while len(self.conns) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        for seen in self.conns:
            seen.done.wait(max(0.0, deadline - time.monotonic()))
        return self.conns

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        for t in self._threads:
            t.join(5)


def request_complete(data: bytes) -> bool:
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return False
    head, body = data[:end].lower(), data[end + 4 :]
    if b"transfer-encoding: chunked" in head:
        return body.endswith(b"0\r\n\r\n")
    m = re.search(rb"content-length: (\d+)", head)
    return len(body) >= (int(m.group(1)) if m else 0)


@contextlib.contextmanager
def http_and_echo(upstream) -> Iterator[dict[str, UpstreamServer]]:
    """An HTTP server on :80 and an echo server on :7000 in the upstream namespace."""
    made = {
        "http": UpstreamServer(upstream.netns, upstream.addr, HTTP_PORT, "http"),
        "echo": UpstreamServer(upstream.netns, upstream.addr, ECHO_PORT, "echo"),
    }
    try:
        yield made
    finally:
        for server in made.values():
            server.close()


@pytest.fixture
def servers(upstream) -> Iterator[dict[str, UpstreamServer]]:
    with http_and_echo(upstream) as made:
        yield made


# --- clients -------------------------------------------------------------------------


def connect(run: RunningGateway, via: str = "tcp") -> socket.socket:
    if via == "unix":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(run.unix)
    else:
        s = socket.create_connection(run.tcp)
    s.settimeout(10)
    return s


def read_to_eof(s: socket.socket) -> bytes:
    out = bytearray()
    with contextlib.suppress(ConnectionResetError):
        while chunk := s.recv(1 << 16):
            out += chunk
    return bytes(out)


def exchange(run: RunningGateway, raw: bytes, via: str = "tcp") -> bytes:
    with connect(run, via) as s:
        s.sendall(raw)
        return read_to_eof(s)


def status(resp: bytes) -> int:
    m = re.match(rb"HTTP/1\.1 (\d{3}) ", resp)
    assert m, resp[:200]
    return int(m.group(1))


def request_id(resp: bytes) -> str:
    m = re.search(rb"\r\nX-Sandgate-Request-Id: ([0-9a-f]{16})\r\n", resp)
    assert m, resp[:300]
    return m.group(1).decode()


def open_tunnel(run: RunningGateway, target: str, via: str = "tcp") -> socket.socket:
    s = connect(run, via)
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        assert chunk, head
        head += chunk
    assert head == b"HTTP/1.1 200 Connection established\r\n\r\n", head
    return s


def echo_roundtrip(s: socket.socket, payload: bytes) -> bytes:
    received = bytearray()

    def reader() -> None:
        while len(received) < len(payload):
            chunk = s.recv(1 << 20)
            if not chunk:
                return
            received.extend(chunk)

    t = threading.Thread(target=reader)
    t.start()
    s.sendall(payload)
    t.join(30)
    return bytes(received)


# --- the tests -----------------------------------------------------------------------


@pytest.mark.root
@pytest.mark.parametrize("loop_factory", LOOPS)
def test_allowed_get_is_rebuilt_and_audited(tmp_path, upstream, servers, loop_factory) -> None:
    with running_gateway(tmp_path, loop_factory, upstream_addr=upstream.addr) as run:
        resp = exchange(
            run,
            b"GET http://UPSTREAM.test/some/path?q=1 HTTP/1.1\r\n"
            b"Host: upstream.test\r\n"
            b"Proxy-Authorization: Basic " + SECRET.encode() + b"\r\n"
            b"Proxy-Connection: keep-alive\r\n"
            b"X-Forwarded-For: 1.2.3.4\r\n"
            b"Accept: */*\r\n\r\n",
        )
        assert resp == OK_RESPONSE
        (seen,) = servers["http"].wait_done()
        assert bytes(seen.data) == (
            b"GET /some/path?q=1 HTTP/1.1\r\nHost: upstream.test\r\nAccept: */*\r\n"
            b"Connection: close\r\n\r\n"
        )
        (line,) = run.last_audit()
        assert set(line) == AUDIT_FIELDS
        assert line["decision"] == "allow" and line["rule"] == "egress.allow[0]"
        assert (line["method"], line["host"], line["port"]) == ("GET", "upstream.test", 80)
        assert line["path"] == "/some/path?q=***" and line["addr"] == str(upstream.addr)
        assert line["status"] == 200 and line["endpoint"] == "tcp"
        assert line["bytes_up"] == len(seen.data) and line["bytes_down"] == len(OK_RESPONSE)
        assert SECRET not in Path(run.audit_path).read_text()


@pytest.mark.root
def test_post_bodies_are_reframed(tmp_path, upstream, servers) -> None:
    with running_gateway(tmp_path, upstream_addr=upstream.addr) as run:
        head = b"POST http://upstream.test/u HTTP/1.1\r\nHost: upstream.test\r\n"
        resp = exchange(run, head + b"Content-Length: 5\r\n\r\nhello")
        assert resp == OK_RESPONSE
        resp = exchange(
            run, head + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n002\r\nde\r\n0\r\n\r\n"
        )
        assert resp == OK_RESPONSE
        first, second = servers["http"].wait_done(2)
        assert bytes(first.data).endswith(b"Content-Length: 5\r\nConnection: close\r\n\r\nhello")
        assert bytes(second.data).endswith(
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        )


@pytest.mark.root
@pytest.mark.parametrize("loop_factory", LOOPS)
@pytest.mark.parametrize("splice", [True, False], ids=["splice", "copy"])
@pytest.mark.parametrize("via", ["tcp", "unix"])
def test_connect_tunnel_relays_both_ways(
    tmp_path, upstream, servers, loop_factory, splice, via
) -> None:
    payload = os.urandom(3 << 20)
    with running_gateway(tmp_path, loop_factory, upstream_addr=upstream.addr, splice=splice) as run:
        with open_tunnel(run, f"upstream.test:{ECHO_PORT}", via) as s:
            assert echo_roundtrip(s, payload) == payload
            s.shutdown(socket.SHUT_WR)  # half-close: the echo server closes, so do we
            assert read_to_eof(s) == b""
        (line,) = run.last_audit()
        assert line["decision"] == "allow" and line["method"] == "CONNECT"
        assert line["endpoint"] == via and line["path"] is None and line["status"] == 200
        assert line["bytes_up"] == line["bytes_down"] == len(payload)


@pytest.mark.root
def test_bytes_sent_with_the_connect_head_are_relayed(tmp_path, upstream, servers) -> None:
    with running_gateway(tmp_path, upstream_addr=upstream.addr) as run, connect(run) as s:
        target = f"upstream.test:{ECHO_PORT}"
        s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\nearly".encode())
        expected = b"HTTP/1.1 200 Connection established\r\n\r\nearly"
        got = b""
        while len(got) < len(expected):
            got += s.recv(100)
        assert got == expected


def test_denied_host_is_403_with_a_request_id_and_how_to_allow_it(tmp_path) -> None:
    with running_gateway(tmp_path) as run:
        resp = exchange(run, b"CONNECT evil.test:443 HTTP/1.1\r\nHost: evil.test:443\r\n\r\n")
        assert status(resp) == 403
        rid = request_id(resp)
        body = resp.split(b"\r\n\r\n", 1)[1].decode()
        assert "rule: default-deny" in body
        assert 'host = "evil.test"' in body and "ports = [443]" in body
        assert "--allow evil.test:443" in body
        assert rid in body
        line = run.audit_for(rid)
        assert set(line) == AUDIT_FIELDS
        assert (line["decision"], line["rule"], line["status"]) == ("deny", "default-deny", 403)
        assert (line["host"], line["port"], line["method"]) == ("evil.test", 443, "CONNECT")

        resp = exchange(
            run, b"DELETE http://upstream.test/x HTTP/1.1\r\nHost: upstream.test\r\n\r\n"
        )
        assert status(resp) == 403
        assert b"method DELETE is not in methods" in resp


def test_in_sandbox_api_on_the_unix_socket_only(tmp_path) -> None:
    with running_gateway(tmp_path) as run:
        denied = exchange(run, b"GET http://evil.test/ HTTP/1.1\r\nHost: evil.test\r\n\r\n")
        rid = request_id(denied)
        api = b"GET /_sandgate/v1/%s HTTP/1.1\r\nHost: localhost\r\n\r\n"
        resp = exchange(run, api % b"policy", via="unix")
        assert status(resp) == 200
        summary = json.loads(resp.split(b"\r\n\r\n", 1)[1])
        assert summary["egress"]["allow"][0]["host"] == "upstream.test"
        resp = exchange(run, api % b"denials", via="unix")
        denials = json.loads(resp.split(b"\r\n\r\n", 1)[1])["denials"]
        assert [d["request_id"] for d in denials] == [rid]
        assert denials[0]["reason"].startswith("host not in the allowlist")
        assert run.call(_async(run.gateway.denials, "sbtest"))[0]["request_id"] == rid
        assert status(exchange(run, api % b"nope", via="unix")) == 404
        assert status(exchange(run, api % b"policy")) == 400  # not on the TCP listener
        post = b"POST /_sandgate/v1/policy HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
        assert status(exchange(run, post, via="unix")) == 405


async def _async(fn, *args):
    return fn(*args)


def raw_request(line: str, *headers: str, body: bytes = b"") -> bytes:
    return ("\r\n".join([line, "Host: upstream.test", *headers]) + "\r\n\r\n").encode() + body


GET = "GET http://upstream.test/ HTTP/1.1"
POST = "POST http://upstream.test/ HTTP/1.1"
CHUNKED = "Transfer-Encoding: chunked"
MALFORMED = [
    (400, raw_request(POST, "Content-Length: 3", CHUNKED, body=b"3\r\nabc\r\n0\r\n\r\n")),
    (400, raw_request(POST, "Content-Length: 3", "Content-Length: 3", body=b"abc")),
    (400, raw_request(POST, "Transfer-Encoding: gzip, chunked", body=b"0\r\n\r\n")),
    (400, raw_request(POST, CHUNKED, body=b"3;x=y\r\nabc\r\n0\r\n\r\n")),
    (400, raw_request(POST, CHUNKED, body=b"zz\r\nabc\r\n0\r\n\r\n")),
    (400, raw_request(POST, CHUNKED, body=b"3\r\nabcX\r\n0\r\n\r\n")),
    (400, b"GET http://upstream.test/ HTTP/1.1\nHost: upstream.test\n\n"),
    (400, b"GET http://upstream.test/ HTTP/1.1\r\nHost: upstream.test\rX: y\r\n\r\n"),
    (400, raw_request(GET, "X: a\x00b")),
    (400, raw_request(GET, "X: a\x7fb")),
    (400, raw_request(GET, "X: a", " b")),
    (400, raw_request(GET, "X-A : 1")),
    (400, raw_request(GET, "Host: upstream.test")),
    (400, raw_request(GET.replace("upstream", "other"))),
    (400, raw_request("GET http://upstream.test/" + "a" * 9000 + " HTTP/1.1")),
    (400, raw_request(GET, "X-Big: " + "b" * 33000)),
    (400, raw_request(GET, *["X-A: 1"] * 100)),
    (400, raw_request(GET, "Connection: Authorization")),
    (400, raw_request(GET, "Connection: close, content-length")),
    (400, raw_request("GET / HTTP/1.1")),
    (400, raw_request("OPTIONS * HTTP/1.1")),
    (400, raw_request("GET https://upstream.test/ HTTP/1.1")),
    (400, raw_request("GET http://user:pw@upstream.test/ HTTP/1.1")),
    (505, raw_request("GET http://upstream.test/ HTTP/2.0")),
    (501, raw_request(GET, "Upgrade: websocket", "Connection: Upgrade")),
    (400, raw_request("CONNECT upstream.test:7000 HTTP/1.1").replace(b"test\r", b"test:7001\r")),
]


@pytest.mark.root
@pytest.mark.parametrize("via", ["tcp", "unix"])
def test_malformed_requests_are_refused_and_reach_nothing(tmp_path, upstream, servers, via) -> None:
    secret_header = b"Proxy-Authorization: Basic " + SECRET.encode() + b"\r\n"
    with running_gateway(tmp_path, upstream_addr=upstream.addr) as run:
        for expected, raw in MALFORMED:
            # The secret rides along in every request, right after the request line.
            first_line, rest = raw.split(b"\n", 1)
            resp = exchange(run, first_line + b"\n" + secret_header + rest, via)
            assert status(resp) == expected, raw[:120]
            line = run.audit_for(request_id(resp))
            assert line["decision"] == "deny" and line["rule"] == "http.malformed"
            assert line["status"] == expected
        time.sleep(0.2)
        assert servers["http"].conns == [] and servers["echo"].conns == []
        log = Path(run.audit_path).read_text()
        assert SECRET not in log and "pw@" not in log
        assert len(log.splitlines()) == len(MALFORMED)


@pytest.mark.parametrize(
    "host,klass",
    [
        ("loop.test", "loopback"),
        ("meta.test", "metadata"),
        ("mapped.test", "private"),  # ::ffff:10.0.0.1 is judged as 10.0.0.1
        ("mixed.test", "loopback"),  # every address must pass
    ],
)
def test_names_resolving_to_refused_addresses_are_403(tmp_path, host: str, klass: str) -> None:
    with running_gateway(tmp_path, upstream_addr=IPv4Address("10.214.255.2")) as run:
        resp = exchange(run, f"GET http://{host}/ HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        assert status(resp) == 403
        line = run.audit_for(request_id(resp))
        assert (line["decision"], line["rule"]) == ("deny", f"address.{klass}")
        assert line["addr"] is None


@pytest.mark.parametrize("literal", ["2130706433", "0x7f.1", "127.0.0.1", "169.254.169.254"])
def test_ip_literals_are_403(tmp_path, literal: str) -> None:
    with running_gateway(tmp_path) as run:
        for raw in (
            f"GET http://{literal}/ HTTP/1.1\r\nHost: {literal}\r\n\r\n",
            f"CONNECT {literal}:443 HTTP/1.1\r\nHost: {literal}:443\r\n\r\n",
        ):
            resp = exchange(run, raw.encode())
            assert status(resp) == 403
            assert "is an IP address" in run.audit_for(request_id(resp))["reason"]


def test_unresolvable_name_is_502(tmp_path) -> None:
    policy = parse_policy('[[egress.allow]]\nhost = "nowhere.test"\n')
    with running_gateway(tmp_path, policy=policy) as run:
        resp = exchange(run, b"GET http://nowhere.test/ HTTP/1.1\r\nHost: nowhere.test\r\n\r\n")
        assert status(resp) == 502
        assert run.audit_for(request_id(resp))["decision"] == "error"


def test_rate_limit_is_429(tmp_path) -> None:
    with running_gateway(tmp_path, policy=make_policy(rate=0.5, burst=3)) as run:
        raw = b"GET http://evil.test/ HTTP/1.1\r\nHost: evil.test\r\n\r\n"
        statuses = [status(exchange(run, raw)) for _ in range(5)]
        assert statuses == [403, 403, 403, 429, 429]
        assert run.last_audit(5)[-1]["rule"] == "egress.rate"


@pytest.mark.root
def test_connection_cap_is_429(tmp_path, upstream, servers) -> None:
    with running_gateway(
        tmp_path, policy=make_policy(max_connections=2), upstream_addr=upstream.addr
    ) as run:
        target = f"upstream.test:{ECHO_PORT}"
        first, second = open_tunnel(run, target), open_tunnel(run, target)
        resp = exchange(run, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        assert status(resp) == 429
        assert run.audit_for(request_id(resp))["rule"] == "egress.max_connections"
        first.close()
        time.sleep(0.2)
        with open_tunnel(run, target) as third:
            assert echo_roundtrip(third, b"ping") == b"ping"
        second.close()


@pytest.mark.root
def test_upload_budget_closes_a_tunnel(tmp_path, upstream, servers) -> None:
    budget = 256 * 1024
    with running_gateway(
        tmp_path, policy=make_policy(upload_budget=budget), upstream_addr=upstream.addr
    ) as run:
        with open_tunnel(run, f"upstream.test:{ECHO_PORT}") as s:
            with contextlib.suppress(OSError):
                for _ in range(64):
                    s.sendall(b"x" * 65536)
            s.settimeout(5)
            with contextlib.suppress(OSError):
                while s.recv(1 << 20):
                    pass
        (seen,) = servers["echo"].wait_done()
        assert 0 < len(seen.data) <= budget
        (line,) = run.last_audit()
        assert (line["decision"], line["rule"]) == ("deny", "egress.upload_budget")
        assert line["bytes_up"] <= budget
        # Spent: a request whose body cannot fit is refused before it is sent.
        resp = exchange(
            run,
            b"POST http://upstream.test/ HTTP/1.1\r\nHost: upstream.test\r\n"
            b"Content-Length: %d\r\n\r\n" % budget + b"x" * budget,
        )
        assert status(resp) == 429
        assert len(servers["http"].conns) == 0


@pytest.mark.root
def test_max_body(tmp_path, upstream, servers) -> None:
    with running_gateway(
        tmp_path, policy=make_policy(max_body=1000), upstream_addr=upstream.addr
    ) as run:
        head = b"POST http://upstream.test/ HTTP/1.1\r\nHost: upstream.test\r\n"
        resp = exchange(run, head + b"Content-Length: 1001\r\n\r\n" + b"a" * 1001)
        assert status(resp) == 413
        time.sleep(0.1)
        assert servers["http"].conns == []  # refused up front: not even dialed

        # Chunked: the first chunk goes through, the one that crosses the limit does
        # not, and the upstream never receives the terminating chunk.
        with connect(run) as s:
            s.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n258\r\n" + b"b" * 600 + b"\r\n")
            (seen,) = servers["http"].wait_done(1, timeout=0.5) or [None]
            s.sendall(b"258\r\n" + b"c" * 600 + b"\r\n0\r\n\r\n")
            resp = read_to_eof(s)
        assert status(resp) == 413
        (seen,) = servers["http"].wait_done()
        assert b"b" * 600 in seen.data and b"cccc" not in seen.data
        assert not seen.data.endswith(b"0\r\n\r\n")
        line = run.audit_for(request_id(resp))
        assert (line["status"], line["rule"]) == (413, "egress.allow[0]")


@pytest.mark.root
def test_unreachable_port_is_502_and_a_silent_one_504(tmp_path, upstream) -> None:
    full = UpstreamServer(upstream.netns, upstream.addr, FULL_PORT, "full")
    fillers: list[socket.socket] = []
    try:
        with running_gateway(tmp_path, upstream_addr=upstream.addr, connect_timeout=0.5) as run:
            resp = exchange(
                run, b"CONNECT upstream.test:7001 HTTP/1.1\r\nHost: upstream.test:7001\r\n\r\n"
            )
            assert status(resp) == 502
            # Fill the never-accepting listener's queue so further SYNs are dropped.
            for _ in range(4):
                f = socket.socket()
                f.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    f.connect((str(upstream.addr), FULL_PORT))
                fillers.append(f)
            time.sleep(0.2)
            resp = exchange(
                run, b"CONNECT upstream.test:7002 HTTP/1.1\r\nHost: upstream.test:7002\r\n\r\n"
            )
            assert status(resp) == 504
            assert run.audit_for(request_id(resp))["rule"] == "connect"
    finally:
        for f in fillers:
            f.close()
        full.close()


@pytest.mark.root
def test_idle_tunnels_are_closed(tmp_path, upstream, servers) -> None:
    with running_gateway(tmp_path, upstream_addr=upstream.addr, idle_timeout=0.5) as run:
        with open_tunnel(run, f"upstream.test:{ECHO_PORT}") as s:
            assert echo_roundtrip(s, b"ping") == b"ping"
            started = time.monotonic()
            assert read_to_eof(s) == b""
            assert 0.3 < time.monotonic() - started < 3
        (line,) = run.last_audit()
        assert "idle" in line["reason"]


@pytest.mark.root
def test_removing_a_sandbox_closes_its_listeners_and_tunnels(tmp_path, upstream, servers) -> None:
    with running_gateway(tmp_path, upstream_addr=upstream.addr) as run:
        s = open_tunnel(run, f"upstream.test:{ECHO_PORT}", via="unix")
        run.call(run.gateway.remove_sandbox("sbtest"))
        assert read_to_eof(s) == b""
        s.close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(run.tcp, timeout=2)
        assert not os.path.exists(run.unix)
        (line,) = run.last_audit()
        assert "sandbox was removed" in line["reason"]


@pytest.mark.root
def test_tunnels_end_at_the_total_time_limit_even_when_busy(tmp_path, upstream, servers) -> None:
    with running_gateway(
        tmp_path, upstream_addr=upstream.addr, tunnel_total_timeout=0.5, idle_timeout=0.2
    ) as run:
        with open_tunnel(run, f"upstream.test:{ECHO_PORT}") as s:
            started = time.monotonic()
            with contextlib.suppress(OSError):
                while time.monotonic() - started < 5:
                    if echo_roundtrip(s, b"ping") != b"ping":
                        break
                    time.sleep(0.05)
            assert 0.4 < time.monotonic() - started < 3
        (line,) = run.last_audit()
        assert "0.5s limit" in line["reason"]


@pytest.mark.root
def test_on_record_hook_sees_every_decision(tmp_path, upstream, servers) -> None:
    seen: list[dict] = []
    on_disk: list[bool] = []

    def hook(record) -> None:
        seen.append(record.as_dict())
        # Called right after the line is written: it is already in the file.
        on_disk.append(record.request_id in Path(run.audit_path).read_text())

    with running_gateway(tmp_path, upstream_addr=upstream.addr, on_record=hook) as run:
        assert exchange(run, raw_request(GET)) == OK_RESPONSE
        denied = exchange(run, b"GET http://evil.test/ HTTP/1.1\r\nHost: evil.test\r\n\r\n")
        malformed = exchange(run, raw_request(GET, "X: a\x00b"))
        lines = run.last_audit(3)
    assert len(seen) == len(lines) == 3 and all(on_disk)
    allowed = next(r for r in seen if r["decision"] == "allow")
    assert (allowed["status"], allowed["rule"]) == (200, "egress.allow[0]")
    assert allowed["bytes_down"] == len(OK_RESPONSE) and allowed["addr"] == str(upstream.addr)
    by_id = {r["request_id"]: r for r in seen}
    assert (by_id[request_id(denied)]["decision"], by_id[request_id(denied)]["status"]) == (
        "deny",
        403,
    )
    assert by_id[request_id(denied)]["rule"] == "default-deny"
    assert by_id[request_id(malformed)]["status"] == 400
    assert by_id[request_id(malformed)]["rule"] == "http.malformed"
    assert sorted(seen, key=lambda r: r["request_id"]) == sorted(
        lines, key=lambda r: r["request_id"]
    )


def test_a_failing_on_record_hook_breaks_nothing(tmp_path) -> None:
    calls: list[str] = []

    def hook(record) -> None:
        calls.append(record.request_id)
        raise RuntimeError("metrics are down")

    with running_gateway(tmp_path, policy=make_policy(rate=0.5, burst=2), on_record=hook) as run:
        raw = b"GET http://evil.test/ HTTP/1.1\r\nHost: evil.test\r\n\r\n"
        responses = [exchange(run, raw) for _ in range(3)]
        assert [status(r) for r in responses] == [403, 403, 429]
        lines = run.last_audit(3)
    assert [line["request_id"] for line in lines] == calls == [request_id(r) for r in responses]
    assert lines[-1]["rule"] == "egress.rate"


def counted(seen: list, total: int, timeout: float = 5) -> list:
    """Every Count the on_counts hook was given (`seen`: lists of them), once they sum
    to `total` requests: a helper sends its sums every COUNTS_INTERVAL seconds."""
    deadline = time.monotonic() + timeout
    while sum(c.requests for batch in list(seen) for c in batch) < total:
        assert time.monotonic() < deadline, f"counted {list(seen)}, expected {total} requests"
        time.sleep(0.02)
    return [c for batch in list(seen) for c in batch]


@pytest.mark.root
def test_on_counts_hook_sums_every_decision(tmp_path, upstream, servers) -> None:
    """The sums match the audit lines, whichever process made them (with two, a
    helper sends its sums; the calls come on the first process's loop)."""
    seen: list = []
    threads: set[int] = set()

    def hook(counts) -> None:
        seen.append(counts)
        threads.add(threading.get_ident())

    policy = make_policy(rate=1000, burst=20)
    with running_gateway(
        tmp_path, policy=policy, upstream_addr=upstream.addr, on_counts=hook
    ) as run:
        for _ in range(10):
            assert exchange(run, raw_request(GET)) == OK_RESPONSE
        for _ in range(6):
            raw = b"GET http://evil.test/ HTTP/1.1\r\nHost: evil.test\r\n\r\n"
            assert status(exchange(run, raw)) == 403
        assert status(exchange(run, raw_request(GET, "X: a\x00b"))) == 400
        lines = run.last_audit(17)
        counts = counted(seen, 17)
    assert len(lines) == 17 and threads == {run.thread.ident}
    by_key: dict = {}
    for c in counts:
        key = (c.kind, c.decision, c.label, c.status)
        total = by_key.setdefault(key, [0, 0, 0])
        for i, n in enumerate((c.requests, c.bytes_up, c.bytes_down)):
            total[i] += n
    allowed = [x for x in lines if x["decision"] == "allow"]
    assert by_key.pop(("egress", "allow", "egress.allow[0]", 200)) == [
        10,
        sum(x["bytes_up"] for x in allowed),
        10 * len(OK_RESPONSE),
    ]
    denied = {x["reason"] for x in lines if x["status"] == 403}
    assert len(denied) == 1
    assert by_key.pop(("egress", "deny", denied.pop(), 403)) == [6, 0, 0]
    (bad,) = (x for x in lines if x["status"] == 400)
    assert by_key.pop(("egress", bad["decision"], bad["reason"], 400)) == [1, bad["bytes_up"], 0]
    assert by_key == {}


def test_a_failing_on_counts_hook_breaks_nothing(tmp_path) -> None:
    calls: list = []

    def hook(counts) -> None:
        calls.append(counts)
        raise RuntimeError("metrics are down")

    with running_gateway(tmp_path, on_counts=hook) as run:
        raw = b"GET http://evil.test/ HTTP/1.1\r\nHost: evil.test\r\n\r\n"
        assert [status(exchange(run, raw)) for _ in range(3)] == [403] * 3
        counted(calls, 3)


@pytest.mark.root
def test_own_addresses_can_be_replaced(tmp_path, upstream, servers) -> None:
    async def set_own(addrs) -> None:
        run.gateway.set_own_addresses(addrs)

    with running_gateway(tmp_path, upstream_addr=upstream.addr) as run:
        assert exchange(run, raw_request(GET)) == OK_RESPONSE
        # The upstream's address becomes one of the host's own: refused from now on,
        # whatever allow_cidrs says; nothing is dialed.
        run.call(set_own(frozenset({str(upstream.addr)})))
        resp = exchange(run, raw_request(GET))
        assert status(resp) == 403
        line = run.audit_for(request_id(resp))
        assert (line["decision"], line["rule"]) == ("deny", "address.self")
        resp = exchange(run, b"CONNECT upstream.test:7000 HTTP/1.1\r\nHost: upstream.test\r\n\r\n")
        assert status(resp) == 403
        assert len(servers["http"].conns) == 1 and servers["echo"].conns == []
        # A network works too, and an invalid set changes nothing.
        run.call(set_own(frozenset({"10.214.0.0/16"})))
        with pytest.raises(ValueError):
            run.call(set_own(frozenset({"not an address"})))
        assert status(exchange(run, raw_request(GET))) == 403
        assert run.gateway.config.self_addrs == frozenset({"10.214.0.0/16"})
        run.call(set_own(frozenset()))
        assert exchange(run, raw_request(GET)) == OK_RESPONSE
        assert len(servers["http"].conns) == 2


def to_port(method: str, port: int, *headers: str) -> bytes:
    target = f"upstream.test:{port}"
    lines = [f"{method} http://{target}/ HTTP/1.1", f"Host: {target}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_a_head_that_never_ends_is_408(tmp_path) -> None:
    with running_gateway(tmp_path, head_timeout=0.3) as run, connect(run) as s:
        started = time.monotonic()
        s.sendall(b"GET http://upstream.test/ HTTP/1.1\r\nHost: upstream.test\r\n")
        resp = read_to_eof(s)
        assert 0.2 < time.monotonic() - started < 3
        assert status(resp) == 408
        line = run.audit_for(request_id(resp))
        assert (line["decision"], line["rule"], line["status"]) == (
            "deny",
            "http.head_timeout",
            408,
        )


@pytest.mark.root
@pytest.mark.parametrize("loop_factory", LOOPS)
def test_plain_http_connect_timeout_is_504(tmp_path, upstream, loop_factory) -> None:
    full = UpstreamServer(upstream.netns, upstream.addr, FULL_PORT, "full")
    fillers: list[socket.socket] = []
    try:
        for _ in range(4):  # fill the never-accepting listener's queue: SYNs are dropped
            f = socket.socket()
            f.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                f.connect((str(upstream.addr), FULL_PORT))
            fillers.append(f)
        time.sleep(0.2)
        with running_gateway(
            tmp_path, loop_factory, upstream_addr=upstream.addr, connect_timeout=0.5
        ) as run:
            started = time.monotonic()
            resp = exchange(run, to_port("GET", FULL_PORT))
            assert 0.4 < time.monotonic() - started < 3
            assert status(resp) == 504
            line = run.audit_for(request_id(resp))
            assert (line["decision"], line["rule"]) == ("error", "connect")
            assert "timed out after 0.5s" in line["reason"]
    finally:
        for f in fillers:
            f.close()
        full.close()


@pytest.mark.root
@pytest.mark.parametrize("loop_factory", LOOPS)
def test_plain_http_response_idle_and_total_limits(
    tmp_path, upstream, servers, loop_factory
) -> None:
    # The echo server answers a GET with its own head and then waits for more: the
    # response goes idle, and the gateway ends it.
    raw = to_port("GET", ECHO_PORT)
    with running_gateway(
        tmp_path, loop_factory, upstream_addr=upstream.addr, idle_timeout=0.4
    ) as run:
        started = time.monotonic()
        resp = exchange(run, raw)
        assert 0.3 < time.monotonic() - started < 3
        assert resp.startswith(b"GET / HTTP/1.1\r\nHost: upstream.test:7000\r\n")
        (line,) = run.last_audit()
        assert line["decision"] == "allow" and "0.4s idle" in line["reason"]
        assert line["bytes_down"] == len(resp)
    with running_gateway(
        tmp_path, loop_factory, upstream_addr=upstream.addr, tunnel_total_timeout=0.4
    ) as run:
        started = time.monotonic()
        exchange(run, raw)
        assert 0.3 < time.monotonic() - started < 3
        (_, line) = run.last_audit(2)  # the same log: after the first gateway's line
        assert "0.4s limit" in line["reason"]


@pytest.mark.root
def test_plain_http_relay_holds_back_for_a_client_that_does_not_read(
    tmp_path, upstream, servers
) -> None:
    # A POST to the echo server comes straight back. While the client sends and does
    # not read, every stage must stop in turn (the gateway stops reading the upstream
    # while the client has not taken the response; the echo server then stops reading
    # the body; the gateway stops reading the client), so the client's send stalls
    # instead of the gateway taking the body into memory. The socket buffers on the
    # way can hold up to ~110 MB here (tcp_rmem's 32 MB maximum, autotuned), so the
    # body is larger than that by far.
    size = 256 << 20
    block = os.urandom(1 << 20)
    head = to_port("POST", ECHO_PORT, f"Content-Length: {size}")
    policy = make_policy(max_body=size, upload_budget=2 * size)
    with running_gateway(tmp_path, policy=policy, upstream_addr=upstream.addr) as run:
        s = connect(run)
        s.settimeout(1)
        s.sendall(head)
        sent = 0
        with contextlib.suppress(TimeoutError):
            while sent < size:
                sent += s.send(memoryview(block)[sent % len(block) :])
        assert sent < size * 3 // 4, sent
        # Now read: everything arrives, intact and in order (after the echoed head).
        received, intact = 0, True

        def reader() -> None:
            nonlocal received, intact
            s.settimeout(30)
            pending = bytearray()
            with contextlib.suppress(OSError):
                while chunk := s.recv(1 << 20):
                    pending += chunk
                    if received == 0:
                        end = pending.find(b"\r\n\r\n")
                        if end < 0:
                            continue
                        del pending[: end + 4]
                    while pending:
                        at = received % len(block)
                        n = min(len(pending), len(block) - at)
                        intact = intact and pending[:n] == block[at : at + n]
                        received += n
                        del pending[:n]

        t = threading.Thread(target=reader)
        t.start()
        s.settimeout(30)
        while sent < size:
            sent += s.send(memoryview(block)[sent % len(block) :])
        t.join(60)
        s.close()
        assert received == size and intact
        (line,) = run.last_audit()
        assert line["decision"] == "allow" and line["bytes_up"] > size
