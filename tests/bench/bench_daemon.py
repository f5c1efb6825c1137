#!/usr/bin/env python3
"""`sandgate serve` under load: create→exec latency through the daemon with 0, 100 and 500
live sandboxes (with `sandgate run --embedded -- true` as the baseline, in the same run,
alternating), the sustained create+destroy rate with K concurrent clients and the daemon's
CPU time per sandbox, and the daemon's memory per live sandbox (RSS, PSS of the daemon,
its fork server and the resident inits). Prints p50/p90/p99 and ratios; no pass/fail.

Run as root: .venv/bin/python tests/bench/bench_daemon.py [--rounds 30] [--duration 60]
    [--live 0,100,500] [--clients 2,4,8] [--quick]
Targets (the daemon's issue): create→exec p50 with 500 live <= 1.5x with 0 live;
>= 50 sandboxes/s created and destroyed on 2 cores.

The script starts its own daemon (a temporary config under /tmp) and removes everything it
made at the end, also on an error or Ctrl-C: through the daemon, then `sandgate rm` for
what is left, then the daemon is stopped by its pid. A daemon's reconcile removes every
sg-* sandbox it has no record of, so two daemons on one host remove each other's
sandboxes: the script refuses to start while another `sandgate serve` or a foreign sg-*
namespace is present (--force to go on anyway). On a shared machine use --isolate: the
script then runs itself, its daemon and every sandbox in a network namespace, a mount
namespace (its own /run/netns) and a cgroup of their own, which no other daemon sees
(nor theirs it); the "host" is then that network namespace.

SANDGATE_BENCH_CPROFILE=FILE runs the daemon under `python -m cProfile -o FILE` (its
event-loop thread only); --py-spy PATH samples every thread of the daemon with that
py-spy binary during the rate and 500-live phases and prints the top functions.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from runner.client import ControlClient, DaemonRefused, DaemonUnavailable
from runner.control import ProtocolError

SANDGATE = os.path.join(os.path.dirname(sys.executable), "sandgate")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
NETNS_DIR = "/run/netns"
PR_SET_PDEATHSIG = 1
DESTROY_BATCH = 64  # ids per destroy request (the protocol allows 256)
CPROFILE_ENV = "SANDGATE_BENCH_CPROFILE"

CONFIG = """\
[control]
socket = "{tmp}/control.sock"
group = ""
[paths]
state_dir = "{tmp}/state"
run_dir = "{tmp}/run"
policies_dir = "{tmp}/policies"
audit_log = "{tmp}/audit.jsonl"
[metrics]
socket = "{tmp}/metrics.sock"
[limits]
max_sandboxes = 2000
"""


class BenchError(Exception):
    """The benchmark cannot go on; the message says why."""


# --- numbers -----------------------------------------------------------------------------


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile (with 30 samples p99 is the largest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def p3(values: list[float]) -> tuple[float, float, float]:
    return pct(values, 50), pct(values, 90), pct(values, 99)


def fmt3(values: list[float]) -> str:
    a, b, c = p3(values)
    return f"{a:8.1f} {b:8.1f} {c:8.1f}"


# --- /proc ---------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    return data[data.rindex(b")") + 2 :].split()  # fields from 3 (state) on


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cgroup_cpu() -> float | None:
    """CPU seconds used by everything in this process's own cpuacct cgroup (with --isolate:
    the daemon, its fork server, the inits and their commands, this script), or None
    when that cgroup is the root one (the whole host)."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            _num, controllers, path = line.rstrip("\n").split(":", 2)
            if "cpuacct" in controllers.split(",") and path != "/":
                usage = os.path.join("/sys/fs/cgroup", controllers, path.lstrip("/"))
                with open(os.path.join(usage, "cpuacct.usage")) as u:
                    return int(u.read()) / 1e9
    return None


def kernel_threads_cpu() -> float:
    """CPU seconds of the kernel's threads (kthreadd's children: kworkers, where network
    namespaces are torn down, ksoftirqd, RCU), alive now."""
    total = 0.0
    for pid in pids():
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = _stat_fields(pid)
            if fields[1] == b"2":
                total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def machine_cpu() -> tuple[float, float]:
    """(busy, total) seconds over all cores since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return (total - idle) / CLK_TCK, total / CLK_TCK


@dataclass(frozen=True)
class Mem:
    rss: int  # KiB
    pss: int
    uss: int  # private: what the process alone costs


def memory(pid: int) -> Mem:
    keys: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if rest.strip().endswith("kB"):
                keys[name] = int(rest.split()[0])
    return Mem(
        keys.get("Rss", 0),
        keys.get("Pss", 0),
        keys.get("Private_Clean", 0) + keys.get("Private_Dirty", 0),
    )


def meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, _, rest = line.partition(":")
            out[name] = int(rest.split()[0])
    return out


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def pids() -> Iterator[int]:
    for name in os.listdir("/proc"):
        if name.isdigit():
            yield int(name)


def parent_of(pid: int) -> int | None:
    try:
        return int(_stat_fields(pid)[1])
    except (OSError, ValueError, IndexError):
        return None


def sandgate_serve_processes() -> dict[str, list[int]]:
    """--config value -> pids of processes whose command line is `sandgate serve` (the
    daemons, their fork servers and their inits all have it)."""
    found: dict[str, list[int]] = collections.defaultdict(list)
    for pid in pids():
        argv = cmdline(pid)
        if "serve" in argv and any(os.path.basename(a) == "sandgate" for a in argv):
            config = argv[argv.index("--config") + 1] if "--config" in argv[:-1] else "default"
            found[config].append(pid)
    return found


def sg_netns() -> set[str]:
    try:
        return {n for n in os.listdir(NETNS_DIR) if n.startswith("sg-")}
    except FileNotFoundError:
        return set()


def loadavg() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


# --- the daemon ------------------------------------------------------------------------------


class BenchDaemon:
    """The benchmark's own `sandgate serve`, on a temporary config."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.config = tmp / "sandgate.toml"
        self.socket = str(tmp / "control.sock")
        self.metrics_socket = str(tmp / "metrics.sock")
        self.log = tmp / "daemon.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        (self.tmp / "policies").mkdir(mode=0o755, exist_ok=True)
        self.config.write_text(CONFIG.format(tmp=self.tmp))
        argv = [SANDGATE, "serve", "--config", str(self.config)]
        profile = os.environ.get(CPROFILE_ENV)
        if profile:
            argv = [sys.executable, "-m", "cProfile", "-o", profile, *argv]
        libc = ctypes.CDLL(None, use_errno=True)

        def die_with_parent() -> None:
            # An orphaned daemon would reconcile away every other sandbox on the host.
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # the terminal's Ctrl-C is ours to handle
                preexec_fn=die_with_parent,
            )
        client = ControlClient(self.socket, timeout=2.0)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"the daemon exited with {self.proc.returncode} at start:\n{self.log_tail()}"
                )
            if client.available():
                return
            time.sleep(0.1)
        raise BenchError(f"the daemon did not answer within 60 s:\n{self.log_tail()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def forkserver_pid(self) -> int | None:
        children = [p for p in pids() if parent_of(p) == self.pid]
        return min(children) if children else None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join("  | " + line for line in text[-lines:])

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


# --- the client ------------------------------------------------------------------------------


class Sandboxes:
    """Requests to the daemon, and every id this run made that may still exist."""

    def __init__(self, socket_path: str) -> None:
        self.path = socket_path
        self.made: set[str] = set()  # may still exist
        self.ever: set[str] = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        # exec passes stdin, stdout and stderr: ours stay out of it.
        self.null_in = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self.null_out = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)

    def client(self) -> ControlClient:
        return ControlClient(self.path, timeout=120.0)

    def create(self) -> str:
        if self.stop.is_set():
            raise BenchError("stopping")
        sid = self.client().call({"op": "create"})["sandbox"]["id"]
        with self.lock:
            self.made.add(sid)
            self.ever.add(sid)
        return sid

    def destroy(self, ids: list[str]) -> None:
        answer = self.client().call({"op": "destroy", "ids": ids})
        removed = {r["id"] for r in answer.get("results", ()) if r.get("removed")}
        with self.lock:
            self.made -= removed

    def exec_true(self, sid: str) -> dict[str, Any]:
        message = {"op": "exec", "id": sid, "argv": ["true"]}
        fds = [self.null_in, self.null_out, self.null_out]
        for frame in self.client().stream(message, fds=fds):
            if frame.get("event") == "exit":
                return frame
        raise BenchError(f"exec in {sid}: the daemon closed before the exit frame")

    def metrics(self, socket_path: str) -> dict[str, float]:
        """The daemon's Prometheus metrics (name{labels} -> value) from its metrics socket."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(socket_path)
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        out = {}
        for line in data.partition(b"\r\n\r\n")[2].decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[name] = float(value)
        return out

    def served(self) -> list[str]:
        return [b["id"] for b in self.client().call({"op": "list"})["sandboxes"]]

    def close(self) -> None:
        os.close(self.null_in)
        os.close(self.null_out)


def in_parallel(box: Sandboxes, fn: Callable[[Any], Any], items: list, workers: int) -> list:
    """fn over items on `workers` threads; on an error or Ctrl-C the rest is cancelled and
    the calls already running are waited for (so every id they make is known)."""
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futures = [pool.submit(fn, item) for item in items]
        return [f.result() for f in futures]
    except BaseException:
        box.stop.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --- the measurements ---------------------------------------------------------------------------


@dataclass
class Level:
    live: int
    total: list[float] = field(default_factory=list)  # create sent → exit frame, ms
    create: list[float] = field(default_factory=list)
    exec: list[float] = field(default_factory=list)
    destroy: list[float] = field(default_factory=list)
    embedded: list[float] = field(default_factory=list)
    fill_rate: float | None = None  # creates/s while adding the idle sandboxes
    daemon: Mem | None = None
    forkserver: Mem | None = None
    inits: list[Mem] = field(default_factory=list)
    cgroup_kib: list[int] = field(default_factory=list)
    host: dict[str, int] = field(default_factory=dict)  # /proc/meminfo
    daemon_fds: int = 0


@dataclass
class Rate:
    clients: int
    seconds: float
    done: int
    errors: int
    first_error: str
    create: list[float]
    destroy: list[float]
    daemon_cpu: float
    forkserver_cpu: float
    client_cpu: float
    machine_busy: float  # fraction of all cores
    cgroup_cpu: float | None
    kernel_cpu: float
    load: str
    daemon_create_ms: float  # mean inside the daemon (its metrics), queueing excluded
    daemon_destroy_ms: float


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path, profiles: Path | None) -> None:
        self.args = args
        self.profiles = profiles
        self.tmp = tmp
        self.daemon = BenchDaemon(tmp)
        self.box = Sandboxes(self.daemon.socket)
        self.idle: list[str] = []
        self.levels: list[Level] = []
        self.rates: list[Rate] = []
        self.after: dict[str, Mem] = {}
        self.daemon_log: list[str] = []
        self.failed_level: tuple[int, str] | None = None
        self.restart_notes: list[str] = []
        self.spy: PySpy | None = None

    # one round: create, exec `true`, destroy
    def round(self, level: Level | None) -> None:
        t0 = time.perf_counter()
        sid = self.box.create()
        t1 = time.perf_counter()
        try:
            frame = self.box.exec_true(sid)
            t2 = time.perf_counter()
        finally:
            self.box.destroy([sid])
        t3 = time.perf_counter()
        if frame.get("exit_code") != 0:
            raise BenchError(f"`true` in {sid} ended with {frame}")
        if level is not None:
            level.total.append((t2 - t0) * 1e3)
            level.create.append((t1 - t0) * 1e3)
            level.exec.append((t2 - t1) * 1e3)
            level.destroy.append((t3 - t2) * 1e3)

    def embedded(self) -> float:
        argv = [SANDGATE, "run", "--embedded", "--state-dir", str(self.tmp / "state")]
        argv += ["--audit-log", str(self.tmp / "audit-embedded.jsonl"), "--json", "--", "true"]
        t0 = time.perf_counter()
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        ms = (time.perf_counter() - t0) * 1e3
        if done.returncode != 0:
            raise BenchError(
                f"sandgate run --embedded -- true: exit {done.returncode}\n{done.stderr.strip()}"
            )
        for line in done.stderr.splitlines():  # --json: a summary with its sandbox's id
            with contextlib.suppress(ValueError, AttributeError):
                self.box.ever.add(json.loads(line)["id"])
        return ms

    def fill(self, target: int) -> float | None:
        need = target - len(self.idle)
        if need <= 0:
            return None
        print(f"  adding {need} idle sandboxes (8 client threads)...", flush=True)
        t0 = time.perf_counter()
        self.idle += in_parallel(self.box, lambda _i: self.box.create(), list(range(need)), 8)
        return need / (time.perf_counter() - t0)

    def inits(self) -> list[tuple[int, str | None]]:
        """(init pid, memory cgroup dir) of every idle sandbox, from the daemon's records."""
        out = []
        for path in (self.tmp / "state" / "sandboxes").glob("*.json"):
            with contextlib.suppress(OSError, ValueError):
                rec = json.loads(path.read_text())
                if rec.get("id") in self.idle and rec.get("init_pid"):
                    cg = rec.get("cgroup") or {}
                    out.append((rec["init_pid"], cg.get("memory") or cg.get("unified")))
        return out

    def snapshot(self, level: Level) -> None:
        time.sleep(1.0)  # let the frees of the last round settle
        level.daemon = memory(self.daemon.pid)
        level.daemon_fds = len(os.listdir(f"/proc/{self.daemon.pid}/fd"))
        fs = self.daemon.forkserver_pid()
        level.forkserver = memory(fs) if fs else None
        for pid, cg in self.inits():
            with contextlib.suppress(OSError):
                level.inits.append(memory(pid))
            if cg:
                for name in ("memory.usage_in_bytes", "memory.current"):
                    with contextlib.suppress(OSError), open(os.path.join(cg, name)) as f:
                        level.cgroup_kib.append(int(f.read()) // 1024)
                        break
        level.host = meminfo()

    def latency(self, live: int, with_embedded: bool) -> Level:
        level = Level(live)
        level.fill_rate = self.fill(live)
        self.round(None)  # warm-up: the first create after a fill pays for its stragglers
        if with_embedded:
            self.embedded()
        self.snapshot(level)
        if self.spy and live == max(self.args.live_levels):
            self.spy.start(f"latency-{live}")
        print(f"  {self.args.rounds} rounds at {live} live...", flush=True)
        for _ in range(self.args.rounds):
            self.round(level)
            if with_embedded:
                level.embedded.append(self.embedded())
        if self.spy:
            self.spy.stop()
        return level

    def teardown_idle(self) -> float | None:
        if not self.idle:
            return None
        ids, self.idle = self.idle, []
        batches = [ids[i : i + DESTROY_BATCH] for i in range(0, len(ids), DESTROY_BATCH)]
        t0 = time.perf_counter()
        in_parallel(self.box, self.box.destroy, batches, 4)
        return len(ids) / (time.perf_counter() - t0)

    def rate(self, clients: int) -> Rate:
        deadline_s = self.args.duration
        creates: list[float] = []
        destroys: list[float] = []
        counts = [0] * clients
        errors: list[str] = []

        def worker(i: int) -> None:
            end = t_start + deadline_s
            while time.perf_counter() < end and not self.box.stop.is_set():
                try:
                    t0 = time.perf_counter()
                    sid = self.box.create()
                    t1 = time.perf_counter()
                    self.box.destroy([sid])
                    t2 = time.perf_counter()
                except Exception as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    if len(errors) > 20:
                        return
                    continue
                creates.append((t1 - t0) * 1e3)
                destroys.append((t2 - t1) * 1e3)
                counts[i] += 1

        fs = self.daemon.forkserver_pid()
        k0 = self.box.metrics(self.daemon.metrics_socket)
        d0 = cpu_seconds(self.daemon.pid)
        f0 = cpu_seconds(fs) if fs else 0.0
        c0 = sum(os.times()[:2])
        m0 = machine_cpu()
        g0 = cgroup_cpu()
        kt0 = kernel_threads_cpu()
        t_start = time.perf_counter()
        in_parallel(self.box, worker, list(range(clients)), clients)
        seconds = time.perf_counter() - t_start
        m1 = machine_cpu()
        g1 = cgroup_cpu()
        kt1 = kernel_threads_cpu()
        k1 = self.box.metrics(self.daemon.metrics_socket)

        def mean_ms(name: str) -> float:
            n = k1.get(f"{name}_count", 0) - k0.get(f"{name}_count", 0)
            return 1e3 * (k1.get(f"{name}_sum", 0) - k0.get(f"{name}_sum", 0)) / max(1, n)

        return Rate(
            clients=clients,
            seconds=seconds,
            done=sum(counts),
            errors=len(errors),
            first_error=errors[0] if errors else "",
            create=creates,
            destroy=destroys,
            daemon_cpu=cpu_seconds(self.daemon.pid) - d0,
            forkserver_cpu=(cpu_seconds(fs) - f0) if fs else 0.0,
            client_cpu=sum(os.times()[:2]) - c0,
            machine_busy=(m1[0] - m0[0]) / max(1e-9, m1[1] - m0[1]),
            cgroup_cpu=None if g0 is None or g1 is None else g1 - g0,
            kernel_cpu=kt1 - kt0,
            load=loadavg(),
            daemon_create_ms=mean_ms("sandgate_create_seconds"),
            daemon_destroy_ms=mean_ms("sandgate_destroy_seconds"),
        )

    def run(self) -> None:
        args = self.args
        self.daemon.start()
        if self.args.py_spy and self.profiles is not None:
            self.spy = PySpy(self.args.py_spy, self.daemon.pid, self.profiles)
        print(
            f"daemon pid {self.daemon.pid}, fork server pid {self.daemon.forkserver_pid()}, "
            f"config {self.daemon.config}",
            flush=True,
        )
        self.round(None)  # warm-up: imports, the first table, the seccomp program
        self.embedded()
        lowest = min(args.live_levels)
        for live in sorted(args.live_levels):
            print(f"latency with {live} live sandboxes (load {loadavg()})", flush=True)
            try:
                self.levels.append(self.latency(live, with_embedded=(live == lowest)))
            except (BenchError, DaemonRefused, DaemonUnavailable, ProtocolError, OSError) as exc:
                # A daemon that fails at some number of sandboxes is a finding: note it,
                # skip the higher levels and go on with the rate phase.
                self.failed_level = (live, f"{type(exc).__name__}: {exc}")
                print(f"  failed at {live} live: {exc}; skipping higher levels", flush=True)
                self.box.stop.clear()
                if self.daemon.alive():
                    self.idle = self.box.served()
                else:
                    self.restart_daemon()
                break
        rate = self.teardown_idle()
        if rate is not None:
            print(
                f"  removed the idle sandboxes: {rate:.1f}/s (4 threads, {DESTROY_BATCH} ids "
                "per request)",
                flush=True,
            )
        time.sleep(1.0)
        self.after["after the latency phases"] = memory(self.daemon.pid)
        for clients in args.clients:
            print(
                f"create+destroy for {args.duration:g} s with {clients} clients (load {loadavg()})",
                flush=True,
            )
            if self.spy:
                self.spy.start(f"rate-{clients}")
            try:
                self.rates.append(self.rate(clients))
            finally:
                if self.spy:
                    self.spy.stop()
            time.sleep(2.0)  # the kernel frees namespaces asynchronously
        self.after["after the rate phases"] = memory(self.daemon.pid)

    # --- clean-up -------------------------------------------------------------------------------

    def cleanup(self) -> list[str]:
        """Remove every sandbox this run made and stop the daemon. Returns warnings."""
        warnings: list[str] = []
        self.box.stop.set()
        self.stop_daemon(warnings)
        self.box.close()
        return warnings

    def stop_daemon(self, warnings: list[str]) -> None:
        """Destroy the daemon's sandboxes through it, stop it, then remove what is left
        with `sandgate rm` and kill stray processes of its."""
        if self.daemon.alive():
            try:
                ids = self.box.served()  # all of them are this run's
                for i in range(0, len(ids), DESTROY_BATCH):
                    self.box.destroy(ids[i : i + DESTROY_BATCH])
            except Exception as exc:
                warnings.append(f"removing through the daemon failed: {exc}")
        self.daemon.stop()
        with contextlib.suppress(OSError):
            self.daemon_log += self.daemon.log.read_text(errors="replace").splitlines()
        leftovers = self._leftover_ids()
        if leftovers:
            warnings.append(
                f"{len(leftovers)} sandbox(es) left after the daemon: "
                "removing them with `sandgate rm`"
            )
            env = {**os.environ, "SANDGATE_CONTROL_SOCKET": self.daemon.socket}
            argv = [SANDGATE, "rm", "--state-dir", str(self.tmp / "state"), *sorted(leftovers)]
            done = subprocess.run(argv, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                warnings.append(f"sandgate rm: {done.stderr.strip()}")
        # Inits share the daemon's command line, with our own config path in it.
        for pid in sandgate_serve_processes().get(str(self.daemon.config), []):
            warnings.append(f"process {pid} of this run's daemon still runs: killing it")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.box.made.clear()
        self.idle = []

    def restart_daemon(self) -> None:
        """After the daemon died: clean up after it and start a new one (the rate phase
        needs one). What had to be cleaned up goes in the report."""
        warnings: list[str] = []
        self.stop_daemon(warnings)
        self.restart_notes += warnings
        self.box.stop.clear()
        self.daemon.start()
        if self.spy is not None:
            self.spy.pid = self.daemon.pid
        print(f"  restarted the daemon: pid {self.daemon.pid}", flush=True)

    def _leftover_ids(self) -> set[str]:
        from runner.state import load_record_ids

        ids = set(load_record_ids(self.tmp / "state" / "sandboxes"))
        present = {n[3:] for n in sg_netns()}
        return ids | (self.box.made & present)


# --- py-spy -------------------------------------------------------------------------------------


class PySpy:
    """py-spy record on the daemon (every thread), as collapsed stacks, one file a phase."""

    def __init__(self, binary: str, pid: int, out: Path) -> None:
        self.binary = binary
        self.pid = pid
        self.out = out
        self.proc: subprocess.Popen | None = None
        self.files: list[Path] = []

    def start(self, name: str) -> None:
        path = self.out / f"{name}.txt"
        self.files.append(path)
        argv = [self.binary, "record", "--pid", str(self.pid), "--threads", "--format", "raw"]
        argv += ["--idle", "--rate", "200", "--nonblocking", "-o", str(path)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


def print_profile(path: Path, top: int = 20) -> None:
    """Top functions of a py-spy raw (collapsed) file, recorded with --idle: for the worker
    pool (wall time of the blocking work: create, destroy, drift watch) and for the
    event-loop thread (on-CPU time only)."""
    work_marker = "_WorkItem.run (concurrent/futures/thread.py)"
    # Leaves where a thread waits: uvloop's own loop shows as its caller, serve().
    idle_frames = ("Condition.wait", "run_until_complete", "_run_once", "serve (runner/daemon")
    views: dict[str, tuple[collections.Counter[str], collections.Counter[str]]] = {
        "worker pool, wall time": (collections.Counter(), collections.Counter()),
        "other threads (the event loop), busy time": (collections.Counter(), collections.Counter()),
    }
    totals = dict.fromkeys(views, 0)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        print(f"  {path}: {exc}")
        return
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = [
            re.sub(r":\d+\)$", ")", f)  # by function, not by line
            for f in stack.split(";")
            if not f.startswith(("thread ", "process "))
        ]
        if not frames:
            continue
        if work_marker in frames or any(f.startswith("_in_thread.") for f in frames):
            view = "worker pool, wall time"  # with the threads it starts to enter a netns
        elif "_worker (concurrent/futures/thread.py)" in frames or frames[-1].startswith(
            idle_frames
        ):
            continue  # an idle worker, or the loop waiting
        else:
            view = "other threads (the event loop), busy time"
        inclusive, own = views[view]
        totals[view] += int(count)
        for frame in set(frames):
            inclusive[frame] += int(count)
        own[frames[-1]] += int(count)
    print(f"\nprofile {path.stem} (py-spy, 200 samples/s a thread)")
    for view, (inclusive, own) in views.items():
        total = totals[view]
        if not total:
            continue
        print(f"  {view}: {total} samples; inclusive, then self")
        skip = ("Thread.", "_worker ", "_WorkItem.run", "<module>", "main (", "serve (", "cmd_")
        shown = [(f, n) for f, n in inclusive.most_common() if not f.startswith(skip)]
        for frame, n in shown[:top]:
            print(f"    {100 * n / total:5.1f}%  {frame}")
        print("    --")
        for frame, n in own.most_common(top // 2):
            print(f"    {100 * n / total:5.1f}%  {frame}")


# --- report -------------------------------------------------------------------------------------


def report_latency(bench: Bench) -> None:
    args = bench.args
    levels = bench.levels
    if not levels:
        return
    base = levels[0]
    print(
        f"\nrounds: {args.rounds} per level; each round is create → exec `true` → destroy "
        "through the daemon, one client"
    )
    print("\n1. create→exec through the daemon (ms; create sent → exec's exit frame)")
    print(
        f"{'live':>6} {'p50':>8} {'p90':>8} {'p99':>8}   {'create p50':>10} {'exec p50':>9} "
        f"{'destroy p50':>11} {'fill/s':>7}"
    )
    for lv in levels:
        fill = f"{lv.fill_rate:7.1f}" if lv.fill_rate else "      -"
        print(
            f"{lv.live:>6} {fmt3(lv.total)}   {pct(lv.create, 50):10.1f} "
            f"{pct(lv.exec, 50):9.1f} {pct(lv.destroy, 50):11.1f} {fill}"
        )
    if bench.failed_level:
        live, error = bench.failed_level
        print(f"{live:>6} failed: {error}")
        for note in bench.restart_notes:
            print(f"         then: {note}")
    if base.embedded:
        print(
            f"{'embedded `sandgate run --embedded -- true` at ' + str(base.live) + ' live':<48}"
            f" p50/p90/p99 {fmt3(base.embedded)}"
        )
        print(
            f"  daemon create→exec / embedded run, p50: "
            f"{pct(base.total, 50) / pct(base.embedded, 50):.2f}x"
        )
    for lv in levels[1:]:
        ratios = [a / b for a, b in zip(p3(lv.total), p3(base.total), strict=True)]
        target = "  (target <= 1.5)" if lv.live == 500 and base.live == 0 else ""
        print(
            f"  ratio {lv.live}/{base.live} live: p50 {ratios[0]:.2f}x, p90 {ratios[1]:.2f}x, "
            f"p99 {ratios[2]:.2f}x{target}"
        )


def report_rate(bench: Bench) -> None:
    args = bench.args
    if bench.rates:
        print(f"\n2. sustained create+destroy, {args.duration:g} s each, 0 idle sandboxes")
        print(
            f"{'clients':>7} {'done':>6} {'per s':>7} {'create p50/p90':>15} "
            f"{'destroy p50/p90':>16} {'in daemon: create':>18} {'destroy':>8} {'errors':>7}"
        )
        for r in bench.rates:
            cp = f"{pct(r.create, 50):.1f}/{pct(r.create, 90):.1f}" if r.create else "-"
            dp = f"{pct(r.destroy, 50):.1f}/{pct(r.destroy, 90):.1f}" if r.destroy else "-"
            print(
                f"{r.clients:>7} {r.done:>6} {r.done / r.seconds:7.1f} {cp:>15} {dp:>16} "
                f"{r.daemon_create_ms:18.1f} {r.daemon_destroy_ms:8.1f} {r.errors:>7}"
            )
            if r.first_error:
                print(f"        first error: {r.first_error}")
        print("  (ms: p50/p90 as the client sees it; 'in daemon' the mean of its own metrics)")
        print(
            f"{'clients':>7} {'CPU ms per sandbox: daemon':>27} {'fork server':>12} "
            f"{'client':>7} {'run cgroup':>11} {'kthreads':>9} {'machine':>8} {'busy':>6}  load"
        )
        for r in bench.rates:
            n = max(1, r.done)
            total = (os.cpu_count() or 1) * r.seconds * r.machine_busy
            cg = f"{1e3 * r.cgroup_cpu / n:11.1f}" if r.cgroup_cpu is not None else f"{'-':>11}"
            print(
                f"{r.clients:>7} {1e3 * r.daemon_cpu / n:27.1f} {1e3 * r.forkserver_cpu / n:12.1f} "
                f"{1e3 * r.client_cpu / n:7.1f} {cg} {1e3 * r.kernel_cpu / n:9.1f} "
                f"{1e3 * total / n:8.1f} {100 * r.machine_busy:5.0f}%  {r.load}"
            )
        print(
            "  (run cgroup, with --isolate: daemon, fork server, inits, this script; kthreads: "
            "the kernel's threads (netns teardown); machine: all CPU time on the host, other "
            "users' work included)"
        )
        best = max(bench.rates, key=lambda r: r.done / r.seconds)
        per_s = best.done / best.seconds
        cpu = 1e3 * (best.daemon_cpu + best.forkserver_cpu) / max(1, best.done)
        print(
            f"  best: {per_s:.1f} sandboxes/s with {best.clients} clients (target >= 50/s on "
            f"2 cores); daemon + fork server CPU {cpu:.1f} ms per sandbox "
            f"(at most {1e3 / cpu if cpu else 0:.0f}/s per core on that alone)"
        )


def report_memory(bench: Bench) -> None:
    levels = bench.levels
    base, top = levels[0], levels[-1]
    print("\n3. memory (KiB): RSS / PSS / private of each process; inits: the mean")
    print(
        f"{'live':>6} {'daemon':>22} {'fork server':>22} {'one init':>22} "
        f"{'init cgroup':>11} {'host avail':>11} {'slab':>9}"
    )
    for lv in levels:
        d, f = lv.daemon, lv.forkserver

        def m(x: Mem | None) -> str:
            return f"{x.rss:>6} /{x.pss:>6} /{x.uss:>6}" if x else f"{'-':>22}"

        init = None
        if lv.inits:
            init = Mem(
                *(
                    int(statistics.mean(getattr(i, k) for i in lv.inits))
                    for k in ("rss", "pss", "uss")
                )
            )
        cg = f"{int(statistics.mean(lv.cgroup_kib)):>11}" if lv.cgroup_kib else f"{'-':>11}"
        print(
            f"{lv.live:>6} {m(d)} {m(f)} {m(init)} {cg} {lv.host.get('MemAvailable', 0):>11} "
            f"{lv.host.get('Slab', 0):>9}"
        )
    if top.live > base.live and top.daemon and base.daemon:
        n = top.live - base.live
        print(
            f"  daemon per live sandbox ({top.live} vs {base.live}): "
            f"RSS {(top.daemon.rss - base.daemon.rss) / n:.1f} KiB, "
            f"PSS {(top.daemon.pss - base.daemon.pss) / n:.1f} KiB, "
            f"private {(top.daemon.uss - base.daemon.uss) / n:.1f} KiB "
            "(PSS: the daemon's and fork server's fall as more inits share their pages)"
        )
        if top.forkserver and base.forkserver:
            print(
                f"  fork server per live sandbox: "
                f"RSS {(top.forkserver.rss - base.forkserver.rss) / n:.1f} KiB"
            )
        if top.inits:
            print(
                f"  per init: RSS {statistics.mean(i.rss for i in top.inits):.0f} KiB, "
                f"PSS {statistics.mean(i.pss for i in top.inits):.0f} KiB, private "
                f"{statistics.mean(i.uss for i in top.inits):.0f} KiB (mean of {len(top.inits)})"
            )
        avail = (base.host.get("MemAvailable", 0) - top.host.get("MemAvailable", 0)) / n
        slab = (top.host.get("Slab", 0) - base.host.get("Slab", 0)) / n
        print(
            f"  host MemAvailable drop per sandbox {avail:.0f} KiB, of it kernel slab "
            f"{slab:.0f} KiB (a shared machine: noisy)"
        )
    for when, mem in bench.after.items():
        print(f"  daemon {when}: RSS {mem.rss} KiB, PSS {mem.pss} KiB")
    fds = ", ".join(f"{lv.daemon_fds} at {lv.live} live" for lv in levels)
    print(f"  the daemon's open descriptors: {fds}")


def report(bench: Bench) -> None:
    if bench.levels:
        report_latency(bench)
    elif bench.failed_level:
        print(f"\nlatency: failed at {bench.failed_level[0]} live: {bench.failed_level[1]}")
    report_rate(bench)
    if bench.levels:
        report_memory(bench)
    notable, in_traceback = [], False
    for line in bench.daemon_log:
        if line.startswith("Traceback"):
            in_traceback = True
        elif in_traceback and not line.startswith(" "):
            in_traceback = False
            notable.append(line)  # the exception that ends it
        elif not in_traceback and " INFO " not in line:
            notable.append(line)
    print(f"\nthe daemon's log: {len(bench.daemon_log)} lines, {len(notable)} not INFO")
    kinds = collections.Counter(re.sub(r"[0-9a-f]{8}|\d+", "N", line) for line in notable)
    for line, count in kinds.most_common(12):
        print(f"  {count:>5} x {line[:300]}")


# --- --isolate ---------------------------------------------------------------------------------

ISOLATED_CONTROLLERS = {"memory", "pids", "cpu", "cpuacct", "freezer"}


class BenchCgroups:
    """A cgroup of this run's own in each v1 hierarchy (or the unified one) the runner
    uses, so that its sandboxes' cgroups are made beneath it, out of other daemons' view."""

    def __init__(self, name: str) -> None:
        self.dirs: list[str] = []
        with open("/proc/self/cgroup") as f:
            for line in f:
                _num, controllers, path = line.rstrip("\n").split(":", 2)
                names = set(controllers.split(",")) if controllers else set()
                if controllers and not names & ISOLATED_CONTROLLERS:
                    continue
                mount = os.path.join("/sys/fs/cgroup", controllers or "unified")
                if not controllers and not os.path.exists(
                    os.path.join(mount, "cgroup.controllers")
                ):
                    continue
                if os.path.exists(os.path.join(mount, "cgroup.procs")):
                    self.dirs.append(os.path.join(mount, path.lstrip("/"), name))
        for d in self.dirs:
            os.mkdir(d)

    def join(self) -> None:
        """Move the calling process in (a preexec_fn)."""
        for d in self.dirs:
            with open(os.path.join(d, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))

    def remove(self) -> list[str]:
        """Kill whatever is left inside, remove every cgroup beneath and ours."""
        warnings = []
        for top in self.dirs:
            for d, _subdirs, _files in os.walk(top, topdown=False):
                for attempt in range(50):
                    with contextlib.suppress(OSError), open(os.path.join(d, "cgroup.procs")) as f:
                        procs = [int(p) for p in f.read().split()]
                    if not procs:
                        break
                    if attempt == 0:
                        warnings.append(f"processes {procs} left in {d}: killing them")
                    for pid in procs:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    time.sleep(0.1)
                if d != top:
                    warnings.append(f"cgroup {d} was left behind: removing it")
                try:
                    os.rmdir(d)
                except OSError as exc:
                    warnings.append(f"cannot remove {d}: {exc}")
        return warnings


def run_isolated() -> int:
    """Run this script again inside new network and mount namespaces and a cgroup of its
    own; then remove what the inner run may have left in that cgroup."""
    cgroups = BenchCgroups(f"sgbench-{os.getpid()}")
    os.makedirs(NETNS_DIR, exist_ok=True)
    ids_file = f"/tmp/sgbench-{os.getpid()}.ids"  # the inner run writes the ids it made
    argv = ["unshare", "--net", "--mount", "--propagation", "private", "--"]
    argv += [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--inside", ids_file]
    warnings: list[str] = []
    try:
        inner = subprocess.Popen(argv, preexec_fn=cgroups.join)
    except BaseException:
        cgroups.remove()
        raise
    # The inner run handles Ctrl-C (the terminal sends it to both) and cleans up itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: inner.send_signal(signal.SIGTERM))
    try:
        status = inner.wait()
    finally:
        warnings += cgroups.remove()
    try:
        with open(ids_file) as f:
            made = {f"sg-{i}" for i in f.read().split()}
        os.unlink(ids_file)
    except FileNotFoundError:
        made = set()
        warnings.append("the inner run did not say which sandboxes it made")
    # Other sessions' sandboxes come and go on a shared host: only ours count.
    left = sorted(sg_netns() & made)
    if left:
        warnings.append(f"network namespaces left on the host: {' '.join(left)}")
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    return status


def enter_isolation() -> None:
    """Inside the new namespaces: a private /run/netns and loopback up."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=755", "sgbench", NETNS_DIR], check=True)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


# --- main ---------------------------------------------------------------------------------------


def preflight(force: bool) -> set[str]:
    """The sg-* namespaces present at the start; refuses if another daemon would
    reconcile ours away (or ours theirs)."""
    problems = []
    for config, found in sandgate_serve_processes().items():
        problems.append(f"another sandgate serve runs (--config {config}; pids {found[:5]})")
    before = sg_netns()
    if before:
        problems.append(f"{len(before)} sg-* namespace(s) exist: {' '.join(sorted(before)[:5])}")
    if problems:
        print("\n".join("warning: " + p for p in problems), file=sys.stderr)
        message = (
            "a daemon removes every sg-* sandbox it has no record of, within 30 s: another "
            "daemon would remove this run's sandboxes, and this run's daemon theirs"
        )
        if not force:
            raise BenchError(message + "; use --isolate, or stop them first, or pass --force")
        print(f"warning: {message} (--force given)", file=sys.stderr)
    return before


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30, help="create→exec rounds per level")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per rate run")
    ap.add_argument("--live", default="0,100,500", help="idle sandboxes per level")
    ap.add_argument("--clients", default="2,4,8", help="concurrent clients of the rate runs")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: --rounds 5 --duration 5 --live 0,10 --clients 2",
    )
    ap.add_argument(
        "--force",
        action="store_true",
        help="go on although another daemon or sg-* sandboxes are present",
    )
    ap.add_argument(
        "--isolate",
        action="store_true",
        help="run in network and mount namespaces and a cgroup of its own (shared machines)",
    )
    ap.add_argument("--inside", metavar="IDS_FILE", help=argparse.SUPPRESS)
    ap.add_argument("--py-spy", metavar="PATH", help="a py-spy binary: profile the daemon")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.duration, args.live, args.clients = 5, 5.0, "0,10", "2"
    args.live_levels = sorted({int(v) for v in args.live.split(",")})
    args.clients = [int(v) for v in str(args.clients).split(",")]
    if args.rounds < 1 or not args.live_levels or min(args.live_levels) < 0:
        ap.error("--rounds must be >= 1 and --live non-negative numbers")
    return args


def main() -> int:
    args = parse_args()
    if os.geteuid() != 0:
        print("run as root: it makes network namespaces, veths and firewall rules", file=sys.stderr)
        return 2
    if args.isolate and not args.inside:
        return run_isolated()
    if args.inside:
        enter_isolation()
    try:
        before = sg_netns() if args.inside else preflight(args.force)
    except BenchError as exc:
        print(f"bench_daemon: {exc}", file=sys.stderr)
        return 2

    def on_term(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    tmp = Path(tempfile.mkdtemp(prefix="sgbd-", dir="/tmp"))
    profiles = Path(tempfile.mkdtemp(prefix="sgbd-profile-", dir="/tmp")) if args.py_spy else None
    bench = Bench(args, tmp, profiles)
    print(f"machine: {os.cpu_count()} cores, load {loadavg()}; temporary files in {tmp}")
    status = 0
    try:
        bench.run()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        status = 130
    except Exception as exc:
        print(f"\nbench_daemon: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        if bench.daemon.proc is not None:
            print(f"the daemon's log:\n{bench.daemon.log_tail()}", file=sys.stderr)
        status = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("cleaning up (Ctrl-C is ignored until done)...", file=sys.stderr, flush=True)
        if bench.spy:
            bench.spy.stop()
        warnings = bench.cleanup()
        if args.inside:
            with open(args.inside, "w") as f:
                f.write("\n".join(sorted(bench.box.ever)) + "\n")
        out = subprocess.run(["ip", "netns"], capture_output=True, text=True).stdout
        listed = {line.split()[0] for line in out.splitlines() if line.startswith("sg-")}
        ours = {f"sg-{i}" for i in bench.box.ever}
        if listed & ours:
            warnings.append(f"network namespaces left behind: {' '.join(sorted(listed & ours))}")
        if listed - before - ours:
            print(
                f"note: sg-* namespaces not of this run appeared meanwhile (another user's?): "
                f"{' '.join(sorted(listed - before - ours))}",
                file=sys.stderr,
            )
        for w in warnings:
            print(f"warning: {w}", file=sys.stderr)
        if not warnings:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp} for a look (daemon.log)", file=sys.stderr)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    report(bench)
    if profiles is not None and bench.spy is not None:
        for path in bench.spy.files:
            print_profile(path)
        print(f"\nprofiles (py-spy raw, collapsed stacks) kept in {profiles}")
    print(f"\nmachine load at the end: {loadavg()}")
    return status


if __name__ == "__main__":
    sys.exit(main())
