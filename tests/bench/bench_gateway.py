#!/usr/bin/env python3
"""The egress gateway under load, side by side with tinyproxy and with no proxy at all
(direct), in the same run, alternating: CONNECT bulk throughput (download and upload),
small plain-HTTP request rate with 64 concurrent clients, and the latency a proxy adds
to one request at a time. Prints medians, ranges over the rounds and ratios.

Run as root: .venv/bin/python tests/bench/bench_gateway.py [--rounds 3] [--quick]
Needs Debian's tinyproxy and apache2-utils (ab):  apt-get install -y tinyproxy apache2-utils
(the package's own tinyproxy service is never used; this script runs its own instance).
Targets (issue): added p50 latency <= 0.5 ms; bulk throughput and request rate at least
tinyproxy's.

What runs where (nothing leaves the machine, no name is ever looked up):
  upstream   a network namespace made here, 10.214.N.2 behind a veth whose host end is
             10.214.N.1/30: a tiny HTTP server on :8080 (uvloop, one response, closes)
             and a bulk server on :9000 (zeros by sendfile from a memfd; a sink that
             discards with MSG_TRUNC), in one child process.
  gateway    a child process running GatewayThread (uvloop in a thread, as `sandgate
             run` runs it; the main thread only waits), a policy allowing
             upstream.bench.test on 8080 and 9000 with allow_cidrs ["10.214.0.0/16"], the
             name pinned to 10.214.N.2 (no DNS fallback), audit log to a file. Listens on
             127.0.0.1. "gateway": as `sandgate serve` runs it: as many processes as
             it uses by default ([gateway] processes = "auto": one per CPU, at most 8;
             the helpers are its children, and their CPU is counted with it) and the
             daemon's metrics counting every decision (GatewayConfig.on_counts);
             "gateway-nometrics": the same without the metrics; "gateway-1proc": one
             process, no metrics (the embedded `sandgate run`), for the request rate
             and latency; "gateway-nosplice": one process, splice off, for tunnels only.
  tinyproxy  its own instance (tinyproxy -d -c <temp conf>) on 127.0.0.1, LogLevel Warning
             (one log line per connection, like the audit line), upstream by IP literal.
  clients    on the host. Bulk and latency: this process (blocking sockets). Request
             rate: ApacheBench (ab -X proxy, a new connection per request; C, epoll, one
             core; its CPU use is reported so a client bottleneck would show).
Everything made here (netns, veth, processes, temp dir) is removed in `finally`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import resource
import secrets
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

UPSTREAM_NAME = "upstream.bench.test"
HTTP_PORT = 8080
BULK_PORT = 9000
TINY_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
MIB = 1024 * 1024
CHUNK = 4 * MIB  # the bulk server's memfd of zeros; the client's send buffer
IO_TIMEOUT = 60.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
POLICY = f"""
[egress]
allow_cidrs = ["10.214.0.0/16"]
rate = 1000000
burst = 1000000
max_connections = 1024
upload_budget = "1T"

[[egress.allow]]
host = "{UPSTREAM_NAME}"
ports = [{HTTP_PORT}, {BULK_PORT}]
methods = ["GET"]
"""


class BenchError(Exception):
    pass


# --- child: the upstream servers (run inside the upstream netns) ---------------------


def serve_upstream(addr: str) -> None:
    """Tiny HTTP on :8080 (uvloop protocol), bulk on :9000 (threads). Until stdin closes.

    Bulk protocol, so that no proxy's half-close handling matters: the client sends
    b"D" + 8-byte size (the server sends that many zero bytes) or b"U" + size (the
    client sends that many bytes, the server discards them and answers b"K")."""
    import asyncio

    import uvloop

    zeros = os.memfd_create("sgbench-zeros", os.MFD_CLOEXEC)
    os.write(zeros, bytes(CHUNK))

    def bulk_conn(conn: socket.socket) -> None:
        tv = (int(IO_TIMEOUT)).to_bytes(8, sys.byteorder) + bytes(8)  # struct timeval
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        with conn, contextlib.suppress(OSError):
            head = b""
            while len(head) < 9:
                chunk = conn.recv(9 - len(head))
                if not chunk:
                    return
                head += chunk
            size = int.from_bytes(head[1:9], "big")
            left = size
            if head[:1] == b"D":
                while left:
                    offset = (size - left) % CHUNK
                    n = os.sendfile(conn.fileno(), zeros, offset, min(CHUNK - offset, left))
                    if n == 0:
                        return
                    left -= n
            elif head[:1] == b"U":
                buf = bytearray(MIB)
                while left:
                    n = conn.recv_into(buf, min(len(buf), left), socket.MSG_TRUNC)
                    if n == 0:
                        return
                    left -= n
                conn.sendall(b"K")
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(4096):  # until the client (or proxy) closes
                pass

    bulk = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    bulk.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    bulk.bind((addr, BULK_PORT))
    bulk.listen(64)

    def accept_bulk() -> None:
        while True:
            try:
                conn, _ = bulk.accept()
            except OSError:
                return
            threading.Thread(target=bulk_conn, args=(conn,), daemon=True).start()

    threading.Thread(target=accept_bulk, daemon=True).start()

    class Tiny(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.buf = b""

        def data_received(self, data: bytes) -> None:
            self.buf += data
            if b"\r\n\r\n" in self.buf:
                self.transport.write(TINY_RESPONSE)  # type: ignore[attr-defined]
                self.transport.close()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Tiny, addr, HTTP_PORT, backlog=4096, reuse_address=True)
        stop = loop.create_future()
        loop.add_reader(0, lambda: stop.done() or stop.set_result(None))
        print("ready", flush=True)
        await stop
        server.close()

    uvloop.run(main())
    bulk.close()


# --- child: the gateway, as `sandgate run` runs it ------------------------------------


def serve_gateway(
    upstream_ip: str, host_end: str, port: int, splice: bool, tmp: str, processes: int, hook: str
) -> None:
    from ipaddress import IPv4Address, ip_address

    from gateway.policy import parse_policy
    from gateway.proxy import GatewayConfig
    from netns.addressing import DEFAULT_POOL
    from runner.gateway_thread import GatewayThread, own_networks, pinned_resolver

    def no_dns(host: str, port: int):
        raise socket.gaierror(socket.EAI_NONAME, f"{host}: not pinned (the bench uses no DNS)")

    tag = f"{'splice' if splice else 'nosplice'}-{processes}-{hook}"
    on_counts = None
    if hook == "metrics":  # what `sandgate serve` counts every request with
        from runner.metrics import DaemonMetrics

        on_counts = DaemonMetrics().observe_counts
    config = GatewayConfig(
        on_counts=on_counts,
        processes=processes,
        audit_path=f"{tmp}/audit-{tag}.jsonl",
        resolver=pinned_resolver({UPSTREAM_NAME: [ip_address(upstream_ip)]}, no_dns),
        self_addrs=own_networks(DEFAULT_POOL, [IPv4Address("127.0.0.1"), IPv4Address(host_end)]),
        splice=splice,
    )
    gw = GatewayThread(config)
    sock = Path(tmp) / f"gateway-{tag}.sock"
    gw.add_sandbox("sgbench", parse_policy(POLICY), ("127.0.0.1", port), sock)
    print("ready", flush=True)
    try:
        sys.stdin.read()  # like the runner's main thread waiting for the command
    finally:
        gw.remove_sandbox("sgbench", sock)
        gw.close()


# --- the parent: set-up ---------------------------------------------------------------


@dataclass
class Target:
    name: str
    proxy: tuple[str, int] | None  # None: direct
    host: str  # in request targets: the pinned name (gateway) or the IP literal
    pid: int | None = None  # the proxy's process, for CPU accounting


@dataclass
class Bench:
    tmp: str
    ns: str = ""
    veth: str = ""
    host_end: str = ""
    upstream_ip: str = ""
    procs: list[subprocess.Popen] = field(default_factory=list)
    upstream_pid: int = 0


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def make_upstream(b: Bench) -> None:
    """A netns at 10.214.N.2/30, host end 10.214.N.1; names that no sandgate residue
    check claims (gwbench-*, gwb*)."""
    used = sh("ip", "-4", "-o", "addr", "show")
    free = [n for n in range(256) if f" 10.214.{n}." not in used]
    if not free:
        raise BenchError("no free 10.214.N.0/30 for the upstream")
    n = secrets.choice(free)
    tag = secrets.token_hex(3)
    b.ns, b.veth = f"gwbench-{tag}", f"gwb{tag}"
    b.host_end, b.upstream_ip = f"10.214.{n}.1", f"10.214.{n}.2"
    sh("ip", "netns", "add", b.ns)
    sh("ip", "link", "add", b.veth, "type", "veth", "peer", "name", "eth0", "netns", b.ns)
    sh("ip", "addr", "add", f"{b.host_end}/30", "dev", b.veth)
    sh("ip", "link", "set", b.veth, "up")
    sh("ip", "-n", b.ns, "link", "set", "lo", "up")
    sh("ip", "-n", b.ns, "addr", "add", f"{b.upstream_ip}/30", "dev", "eth0")
    sh("ip", "-n", b.ns, "link", "set", "eth0", "up")


def remove_upstream(b: Bench) -> None:
    if b.veth:
        subprocess.run(["ip", "link", "del", b.veth], capture_output=True)
    if b.ns:
        subprocess.run(["ip", "netns", "del", b.ns], capture_output=True)


def start_child(b: Bench, argv: list[str], wait_ready: bool = True) -> subprocess.Popen:
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    b.procs.append(proc)
    if wait_ready:
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        line = proc.stdout.readline().strip() if ready else ""  # type: ignore[union-attr]
        if line != "ready":
            proc.kill()
            err = proc.stderr.read() if proc.poll() is not None else ""  # type: ignore[union-attr]
            raise BenchError(f"{argv[:4]} did not start: {line!r} {err}")
    return proc


def stop_children(b: Bench) -> None:
    for proc in reversed(b.procs):
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.stdin.close()  # type: ignore[union-attr]
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited: {proc.stderr.read()}")  # type: ignore[union-attr]
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    raise BenchError(f"{what} is not listening on 127.0.0.1:{port}")


def start_tinyproxy(b: Bench, log_level: str) -> tuple[subprocess.Popen, int]:
    """Its own instance. tinyproxy fsync()s its log file after every line it writes
    (src/log.c), three lines per request at LogLevel Connect or Info (Debian's default):
    "Warning" logs nothing per request and is the fast, main baseline; "Connect" is a
    data point for a tinyproxy that keeps a per-request log like the gateway's audit."""
    port = free_port()
    conf = Path(b.tmp) / f"tinyproxy-{log_level}.conf"
    conf.write_text(
        f"Port {port}\nListen 127.0.0.1\nTimeout 120\nMaxClients 1024\n"
        f'LogFile "{b.tmp}/tinyproxy-{log_level}.log"\nLogLevel {log_level}\n'
        f"Allow 127.0.0.1\nConnectPort {BULK_PORT}\nDisableViaHeader Yes\n"
    )
    proc = start_child(b, ["tinyproxy", "-d", "-c", str(conf)], wait_ready=False)
    wait_listening(port, proc, "tinyproxy")
    return proc, port


# --- measurements ---------------------------------------------------------------------


def cpu_seconds(pid: int | None) -> float:
    """utime + stime (all threads) + reaped children's, of a process."""
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / CLK_TCK


def sys_seconds(pid: int | None) -> float:
    """stime (all threads) + reaped children's: the part of cpu_seconds in the kernel."""
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[12]) + int(fields[14])) / CLK_TCK


def children(pid: int) -> list[int]:
    """The live children of a process (a gateway's helper processes)."""
    out: list[int] = []
    with contextlib.suppress(FileNotFoundError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    return out


def tree_cpu(pid: int | None, of=cpu_seconds) -> float:
    """`of` (cpu_seconds or sys_seconds) for a process and its live children."""
    if pid is None:
        return 0.0
    total = of(pid)
    for child in children(pid):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += of(child)
    return total


def open_tunnel(t: Target, port: int) -> socket.socket:
    if t.proxy is None:
        return socket.create_connection((t.host, port), timeout=IO_TIMEOUT)
    s = socket.create_connection(t.proxy, timeout=IO_TIMEOUT)
    authority = f"{t.host}:{port}"
    s.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            s.close()
            raise BenchError(f"{t.name}: CONNECT {authority}: closed after {head!r}")
        head += chunk
    if not re.match(rb"HTTP/1\.[01] 200", head) or not head.endswith(b"\r\n\r\n"):
        s.close()
        raise BenchError(f"{t.name}: CONNECT {authority}: {head[:200]!r}")
    return s


def download(t: Target, size: int) -> float:
    """Seconds to receive `size` bytes through a tunnel (connect and CONNECT included)."""
    buf = bytearray(MIB)
    t0 = time.perf_counter()
    with open_tunnel(t, BULK_PORT) as s:
        s.sendall(b"D" + size.to_bytes(8, "big"))
        got = 0
        while got < size:
            n = s.recv_into(buf, min(len(buf), size - got))
            if n == 0:
                raise BenchError(f"{t.name}: download closed at {got} of {size} bytes")
            got += n
    return time.perf_counter() - t0


def upload(t: Target, size: int) -> float:
    """Seconds to send `size` bytes through a tunnel until the upstream has them all."""
    data = memoryview(bytes(CHUNK))
    t0 = time.perf_counter()
    with open_tunnel(t, BULK_PORT) as s:
        s.sendall(b"U" + size.to_bytes(8, "big"))
        left = size
        while left:
            n = min(CHUNK, left)
            s.sendall(data[:n])
            left -= n
        if s.recv(1) != b"K":
            raise BenchError(f"{t.name}: upload of {size} bytes not acknowledged")
    return time.perf_counter() - t0


def http_request(t: Target) -> bytes:
    target = "/" if t.proxy is None else f"http://{t.host}:{HTTP_PORT}/"
    return (
        f"GET {target} HTTP/1.1\r\nHost: {t.host}:{HTTP_PORT}\r\nConnection: close\r\n\r\n"
    ).encode()


def one_get(t: Target, request: bytes) -> float:
    """One request on a new connection, until the response ends (the connection closes)."""
    addr = t.proxy or (t.host, HTTP_PORT)
    t0 = time.perf_counter()
    with socket.create_connection(addr, timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    dt = time.perf_counter() - t0
    if not re.match(rb"HTTP/1\.[01] 200 ", data) or not data.endswith(b"\r\n\r\nok"):
        raise BenchError(f"{t.name}: unexpected response {data[:300]!r}")
    return dt


@dataclass
class AbResult:
    rps: float
    complete: int
    failed: int
    non2xx: int
    ab_cpu: float  # seconds of CPU ab used
    wall: float


def run_ab(t: Target, concurrency: int, seconds: float) -> AbResult:
    url = f"http://{t.host}:{HTTP_PORT}/"
    argv = ["ab", "-q", "-r", "-c", str(concurrency), "-t", f"{seconds:g}", "-n", "100000000"]
    if t.proxy is not None:
        argv += ["-X", f"{t.proxy[0]}:{t.proxy[1]}"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [*argv, url], capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = proc.stdout

    def num(pattern: str, default: float | None = None) -> float:
        m = re.search(pattern, out)
        if m is None:
            if default is not None:
                return default
            raise BenchError(f"{t.name}: ab: no {pattern!r} in output:\n{out}\n{proc.stderr}")
        return float(m.group(1))

    return AbResult(
        rps=num(r"Requests per second:\s+([\d.]+)"),
        complete=int(num(r"Complete requests:\s+(\d+)")),
        failed=int(num(r"Failed requests:\s+(\d+)")),
        non2xx=int(num(r"Non-2xx responses:\s+(\d+)", 0)),
        ab_cpu=(after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
        wall=wall,
    )


def rotated(items: list, k: int) -> list:
    k %= len(items)
    return items[k:] + items[:k]


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


class Usage:
    """CPU the whole machine used between start and `text()`, and how much of it this
    benchmark's own processes used (the rest is other work on the machine; softirq
    time can land on either side, so "others" is approximate). The load average is
    printed too, but our own threads inflate it (tinyproxy-log's in fsync)."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.start = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        busy = (sum(v) - v[3] - v[4]) / CLK_TCK  # all but idle and iowait
        ours = sum(cpu_seconds(p) for p in self.pids)
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            ru = resource.getrusage(who)
            ours += ru.ru_utime + ru.ru_stime
        return time.monotonic(), busy, ours

    def text(self) -> str:
        t1, busy1, ours1 = self._sample()
        t0, busy0, ours0 = self.start
        wall = max(t1 - t0, 1e-9)
        busy, ours = (busy1 - busy0) / wall, (ours1 - ours0) / wall
        return (
            f"{t1 - t0:.0f} s; machine busy {busy:.2f} of {os.cpu_count()} cores, "
            f"this benchmark {ours:.2f}, others ~{max(busy - ours, 0):.2f}; load {loadavg()}"
        )


def span(values: list[float], fmt: str = "{:.0f}") -> str:
    return f"{fmt.format(min(values))}-{fmt.format(max(values))}"


def timed_with_cpu(fn: Callable[[], float], pids: list[int | None]) -> tuple[float, list[float]]:
    before = [tree_cpu(p) for p in pids]
    result = fn()
    return result, [tree_cpu(p) - b for p, b in zip(pids, before, strict=True)]


# --- the phases -----------------------------------------------------------------------


def bench_bulk(
    targets: list[Target], size: int, rounds: int, upstream_pid: int, with_upload: bool
) -> dict:
    """{direction: {target: [(MB/s, proxy CPU s, upstream CPU s), ...]}}."""
    out: dict[str, dict[str, list[tuple[float, float, float]]]] = {}
    directions = [("download", download), ("upload", upload)][: 2 if with_upload else 1]
    for direction, fn in directions:
        per: dict[str, list[tuple[float, float, float]]] = {t.name: [] for t in targets}
        for r in range(rounds):
            for t in rotated(targets, r):
                secs, (proxy_cpu, up_cpu) = timed_with_cpu(
                    lambda t=t, fn=fn: fn(t, size), [t.pid, upstream_pid]
                )
                per[t.name].append((size / secs / 1e6, proxy_cpu, up_cpu))
        out[direction] = per
    return out


def bench_rate(
    targets: list[Target], concurrency: int, seconds: float, rounds: int, upstream_pid: int
) -> dict[str, list[tuple[AbResult, float, float, float]]]:
    """{target: [(ab result, proxy CPU s, upstream CPU s, proxy CPU s in the kernel), ...]}."""
    out: dict[str, list[tuple[AbResult, float, float, float]]] = {t.name: [] for t in targets}
    for r in range(rounds):
        for t in rotated(targets, r):
            sys_before = tree_cpu(t.pid, sys_seconds)
            res, (proxy_cpu, up_cpu) = timed_with_cpu(
                lambda t=t: run_ab(t, concurrency, seconds), [t.pid, upstream_pid]
            )
            proxy_sys = tree_cpu(t.pid, sys_seconds) - sys_before
            out[t.name].append((res, proxy_cpu, up_cpu, proxy_sys))  # type: ignore[arg-type]
    return out


def bench_latency(targets: list[Target], n: int) -> dict[str, list[float]]:
    """n sequential requests per target, interleaved request by request (ms)."""
    requests = {t.name: http_request(t) for t in targets}
    for t in targets:  # warm-up
        for _ in range(50):
            one_get(t, requests[t.name])
    out: dict[str, list[float]] = {t.name: [] for t in targets}
    for i in range(n):
        for t in rotated(targets, i):
            out[t.name].append(one_get(t, requests[t.name]) * 1e3)
    return out


# --- main -----------------------------------------------------------------------------


def tool_version(argv: list[str], pattern: str) -> str:
    try:
        text = subprocess.run(argv, capture_output=True, text=True, check=False).stdout
    except FileNotFoundError:
        return "missing"
    m = re.search(pattern, text)
    return m.group(1) if m else "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds of bulk and rate (3)")
    ap.add_argument("--bulk-mib", type=int, default=1024, help="MiB per transfer (1024)")
    ap.add_argument("--rate-seconds", type=float, default=10.0, help="per ab run (10)")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--latency-n", type=int, default=2000)
    ap.add_argument("--no-upload", action="store_true", help="skip the upload direction")
    ap.add_argument("--quick", action="store_true", help="1 round, 128 MiB, 3 s, N=300")
    ap.add_argument("_role", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._role[:1] == ["_upstream"]:
        serve_upstream(args._role[1])
        return 0
    if args._role[:1] == ["_gateway"]:
        _, ip, host_end, port, splice, tmp, processes, hook = args._role
        serve_gateway(ip, host_end, int(port), splice == "on", tmp, int(processes), hook)
        return 0
    if args.quick:
        args.rounds, args.bulk_mib, args.rate_seconds, args.latency_n = 1, 128, 3.0, 300
    if os.geteuid() != 0:
        print("run as root (it makes a network namespace)", file=sys.stderr)
        return 2
    for tool, pkg in (("tinyproxy", "tinyproxy"), ("ab", "apache2-utils")):
        if shutil.which(tool) is None:
            print(f"{tool} is missing: apt-get install -y {pkg}", file=sys.stderr)
            return 2

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    idle = Usage([])
    time.sleep(2)
    before = idle.text()  # what the machine does without us
    b = Bench(tmp=tempfile.mkdtemp(prefix="sgbench-gw-"))
    try:
        make_upstream(b)
        me = [sys.executable, str(Path(__file__).resolve())]
        up = start_child(b, ["ip", "netns", "exec", b.ns, *me, "_upstream", b.upstream_ip])
        b.upstream_pid = up.pid  # `ip netns exec` execs python: the same pid
        from runner.daemon_config import DaemonConfig

        gateways = []
        processes = DaemonConfig().gateway_processes()  # what `sandgate serve` uses here
        for name, splice, n, hook in (
            ("gateway", "on", processes, "metrics"),
            ("gateway-1proc", "on", 1, "none"),
            ("gateway-nosplice", "off", 1, "none"),
            ("gateway-nometrics", "on", processes, "none"),
        ):
            port = free_port()
            role = [b.upstream_ip, b.host_end, str(port), splice, b.tmp, str(n), hook]
            proc = start_child(b, [*me, "_gateway", *role])
            gateways.append(Target(name, ("127.0.0.1", port), UPSTREAM_NAME, proc.pid))
        gw, gw_1proc, gw_nosplice, gw_nometrics = gateways
        tp_proc, tp_port = start_tinyproxy(b, "Warning")
        tp = Target("tinyproxy", ("127.0.0.1", tp_port), b.upstream_ip, tp_proc.pid)
        tpl_proc, tpl_port = start_tinyproxy(b, "Connect")
        tp_log = Target("tinyproxy-log", ("127.0.0.1", tpl_port), b.upstream_ip, tpl_proc.pid)
        direct = Target("direct", None, b.upstream_ip)
        main_targets = [gw, gw_nometrics, gw_1proc, tp, tp_log, direct]
        bulk_targets = [gw, gw_nosplice, tp, direct]

        for t in [*bulk_targets, tp_log]:  # sanity: every path works before anything is timed
            one_get(t, http_request(t))
            download(t, MIB)
            upload(t, MIB)

        import uvloop

        tinyproxy_version = tool_version(["tinyproxy", "-v"], r"tinyproxy (\S+)")
        ab_version = tool_version(["ab", "-V"], r"Version (\S+)")
        print(
            f"machine: nproc {os.cpu_count()}; before start ({before}); "
            f"kernel {platform.release()}; Python {platform.python_version()}; "
            f"uvloop {uvloop.__version__}; tinyproxy {tinyproxy_version}; ab {ab_version}"
        )
        print(
            f"upstream {b.upstream_ip} in netns {b.ns}; clients, gateway and tinyproxy on the "
            f"host (proxies on 127.0.0.1); audit log and tinyproxy log in {b.tmp}\n"
            f'gateway: {processes} process(es) ([gateway] processes = "auto" here) and the '
            "daemon's metrics; gateway-nometrics: the same without them; gateway-1proc and "
            "gateway-nosplice: 1 process, no metrics\n"
            "tinyproxy: LogLevel Warning (no per-request log); tinyproxy-log: LogLevel Connect "
            "(3 log lines a request, each fsync()ed)\n"
        )
        pids = [b.upstream_pid, *(t.pid for t in [*gateways, tp, tp_log] if t.pid)]
        pids += [c for t in (gw, gw_nometrics) if t.pid for c in children(t.pid)]

        size = args.bulk_mib * MIB
        usage = Usage(pids)
        bulk = bench_bulk(bulk_targets, size, args.rounds, b.upstream_pid, not args.no_upload)
        print(
            f"1. CONNECT bulk: {args.bulk_mib} MiB per transfer, {args.rounds} round(s), order "
            f"rotating; MB = 10^6 bytes\n   ({usage.text()})"
        )
        print(
            f"   {'direction':<9} {'target':<17} {'median MB/s':>11} {'range':>11} "
            f"{'proxy CPU s/GiB':>15} {'upstream CPU s/GiB':>18}"
        )
        gib = size / (1024 * MIB)
        for direction, per in bulk.items():
            for name, samples in per.items():
                mbs = [s[0] for s in samples]
                proxy_cpu = statistics.median(s[1] for s in samples) / gib
                up_cpu = statistics.median(s[2] for s in samples) / gib
                pc = f"{proxy_cpu:.2f}" if name != "direct" else "-"
                print(
                    f"   {direction:<9} {name:<17} {statistics.median(mbs):>11.0f} "
                    f"{span(mbs):>11} {pc:>15} {up_cpu:>18.2f}"
                )
        for direction, per in bulk.items():
            med = {k: statistics.median(s[0] for s in v) for k, v in per.items()}
            print(
                f"   {direction}: gateway/tinyproxy {med['gateway'] / med['tinyproxy']:.2f}x, "
                f"gateway/direct {med['gateway'] / med['direct']:.2f}x, "
                f"gateway splice on/off {med['gateway'] / med['gateway-nosplice']:.2f}x"
            )

        usage = Usage(pids)
        rate = bench_rate(
            main_targets, args.concurrency, args.rate_seconds, args.rounds, b.upstream_pid
        )
        print(
            f"\n2. Small plain-HTTP GETs, a new connection each, {args.concurrency} concurrent "
            f"(ab -c {args.concurrency} -t {args.rate_seconds:g}), {args.rounds} round(s)"
            f"\n   ({usage.text()})"
        )
        print(
            f"   {'target':<17} {'median req/s':>12} {'range':>13} {'failed':>7} "
            f"{'non-2xx':>8} {'proxy CPU':>10} {'proxy us/req':>12} {'of it sys':>9} "
            f"{'ab CPU':>7} {'upstream us/req':>15}"
        )
        med_rate = {}
        for name, samples in rate.items():
            rps = [s[0].rps for s in samples]
            med_rate[name] = statistics.median(rps)
            reqs = sum(s[0].complete for s in samples)
            failed = sum(s[0].failed for s in samples)
            non2xx = sum(s[0].non2xx for s in samples)
            wall = sum(s[0].wall for s in samples)
            proxy_cpu = sum(s[1] for s in samples)
            ab_cpu = sum(s[0].ab_cpu for s in samples)
            up_cpu = sum(s[2] for s in samples)
            proxy_sys = sum(s[3] for s in samples)
            pcpu = f"{proxy_cpu / wall:.0%}" if name != "direct" else "-"
            pus = f"{proxy_cpu / reqs * 1e6:.0f}" if name != "direct" else "-"
            psys = f"{proxy_sys / reqs * 1e6:.0f}" if name != "direct" else "-"
            print(
                f"   {name:<17} {med_rate[name]:>12.0f} {span(rps):>13} {failed:>7} {non2xx:>8} "
                f"{pcpu:>10} {pus:>12} {psys:>9} {ab_cpu / wall:>7.0%} "
                f"{up_cpu / reqs * 1e6:>15.0f}"
            )
        print(
            f"   gateway/tinyproxy {med_rate['gateway'] / med_rate['tinyproxy']:.2f}x, "
            f"gateway-nometrics/tinyproxy "
            f"{med_rate['gateway-nometrics'] / med_rate['tinyproxy']:.2f}x, "
            f"gateway-1proc/tinyproxy {med_rate['gateway-1proc'] / med_rate['tinyproxy']:.2f}x, "
            f"gateway/tinyproxy-log {med_rate['gateway'] / med_rate['tinyproxy-log']:.2f}x, "
            f"gateway/direct {med_rate['gateway'] / med_rate['direct']:.2f}x\n"
            "   (CPU % is of one core, over the runs' wall time; us/req is CPU per request, "
            "'of it sys' the part in the kernel)"
        )

        usage = Usage(pids)
        lat = bench_latency(main_targets, args.latency_n)
        print(
            f"\n3. Latency, one request at a time on a new connection, N={args.latency_n} per "
            f"target, interleaved request by request\n   ({usage.text()})"
        )
        print(
            f"   {'target':<17} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
            f"{'added p50':>10} {'added p99':>10}"
        )
        d50, d99 = pct(lat["direct"], 50), pct(lat["direct"], 99)
        for name, ms in lat.items():
            p50, p90, p99 = pct(ms, 50), pct(ms, 90), pct(ms, 99)
            add = (
                f"{p50 - d50:>10.3f} {p99 - d99:>10.3f}"
                if name != "direct"
                else f"{'-':>10} {'-':>10}"
            )
            print(f"   {name:<17} {p50:>8.3f} {p90:>8.3f} {p99:>8.3f} {add}")

        with open(f"{b.tmp}/audit-splice-{processes}-metrics.jsonl") as f:
            audit_lines = sum(1 for _ in f)
        made = (
            3  # the sanity checks
            + args.rounds * len(bulk)
            + sum(s[0].complete for s in rate["gateway"])
            + 50
            + args.latency_n
        )
        print(
            f"\naudit lines written by the gateway (splice on): {audit_lines}; requests it "
            f"completed for the clients: {made} (ab does not count those cut off at its -t)"
        )

        added = pct(lat["gateway"], 50) - d50
        down = {k: statistics.median(s[0] for s in v) for k, v in bulk["download"].items()}
        checks = [
            (f"added p50 latency {added:.3f} ms <= 0.5 ms", added <= 0.5),
            (
                f"CONNECT download {down['gateway']:.0f} MB/s >= tinyproxy's "
                f"{down['tinyproxy']:.0f}",
                down["gateway"] >= down["tinyproxy"],
            ),
        ]
        if "upload" in bulk:
            upm = {k: statistics.median(s[0] for s in v) for k, v in bulk["upload"].items()}
            checks.append(
                (
                    f"CONNECT upload {upm['gateway']:.0f} MB/s >= tinyproxy's "
                    f"{upm['tinyproxy']:.0f}",
                    upm["gateway"] >= upm["tinyproxy"],
                )
            )
        checks.append(
            (
                f"request rate {med_rate['gateway']:.0f}/s >= tinyproxy's "
                f"{med_rate['tinyproxy']:.0f}/s",
                med_rate["gateway"] >= med_rate["tinyproxy"],
            )
        )
        print("\ntargets:")
        for text, ok in checks:
            print(f"   {'MET    ' if ok else 'NOT MET'} {text}")
        print(f"\nload average at end: {loadavg()}")
        return 0
    finally:
        stop_children(b)
        remove_upstream(b)
        shutil.rmtree(b.tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
