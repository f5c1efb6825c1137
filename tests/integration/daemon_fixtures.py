"""Helpers for the daemon's end-to-end tests (test_daemon.py): a real `sandgate serve`
per test, with its own configuration, state, run directory, audit log and sockets
under the test's tmp_path; the CLI run against it; and what the kernel holds of a
sandbox, read straight from the kernel (not through sandgate's own listing code).

Nothing here reaches outside the machine: sandboxes reach only the upstream
namespace of gateway_fixtures (10.214.N.2), by a made-up name pinned with --resolve.

Teardown never guesses: the daemon is killed by its pid (its sandbox inits are forks
of it and share its command line, so never by name), and only the sandboxes this
daemon's state directory knows of, or that a test registered, are removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.client import ControlClient
from tests.integration.gateway_fixtures import Upstream, upstream_servers
from tests.testca import TestCA, make_test_ca

SANDGATE = os.path.join(os.path.dirname(sys.executable), "sandgate")
UPSTREAM_NAME = "upstream.test"
UPSTREAM_CIDR = "10.214.0.0/16"
TABLE = "sandgate"
START_TIMEOUT = 30.0


# --- the world the sandboxes talk to -------------------------------------------------------


@dataclass(frozen=True)
class World:
    share: Path  # bound read-only into sandboxes: the test CA's ca.pem
    ca: TestCA
    up: Upstream

    @property
    def addr(self) -> str:
        return str(self.up.addr)

    def box_args(self) -> list[str]:
        """create/run options that let a sandbox reach the upstream, and nothing else."""
        return [
            "--allow",
            UPSTREAM_NAME,
            "--resolve",
            f"{UPSTREAM_NAME}={self.addr}",
            "--allow-cidr",
            UPSTREAM_CIDR,
            "--ro",
            str(self.share),
        ]


@contextlib.contextmanager
def daemon_world(share: Path, keys: Path) -> Iterator[World]:
    share.chmod(0o755)  # the sandbox's unprivileged user reads it
    ca = make_test_ca(share, keys, [UPSTREAM_NAME])
    with upstream_servers(ca) as up:
        yield World(share, ca, up)


# --- the kernel's view ---------------------------------------------------------------------


def netns_ids() -> set[str]:
    try:
        names = os.listdir("/run/netns")
    except FileNotFoundError:
        return set()
    return {n[3:] for n in names if n.startswith("sg-")}


def link_ids() -> set[str]:
    return {n[2:] for n in os.listdir("/sys/class/net") if n.startswith("sg") and len(n) == 10}


def nft_table() -> dict | None:
    """`nft -j list table inet sandgate`, or None when there is no such table."""
    out = subprocess.run(
        ["nft", "-j", "list", "table", "inet", TABLE],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    if out.returncode != 0:
        return None
    return json.loads(out.stdout)


def nft_elements(listing: dict | None = None) -> dict[str, set[tuple]]:
    """Set name -> its elements (tuples of the concatenated values)."""
    listing = nft_table() if listing is None else listing
    found: dict[str, set[tuple]] = {}
    for entry in (listing or {}).get("nftables", []):
        s = entry.get("set")
        if not s:
            continue
        values = set()
        for elem in s.get("elem", []):
            if isinstance(elem, dict) and "elem" in elem:
                elem = elem["elem"]["val"]
            if isinstance(elem, dict) and "concat" in elem:
                values.add(tuple(elem["concat"]))
            else:
                values.add((elem,))
        found[s["name"]] = values
    return found


def nft_ids(listing: dict | None = None) -> set[str]:
    """Ids (from the interface names sg<id>) that have any element in the host table."""
    ids = set()
    for values in nft_elements(listing).values():
        for value in values:
            if value and isinstance(value[0], str) and value[0].startswith("sg"):
                ids.add(value[0][2:])
    return ids


def cgroup_ids() -> set[str]:
    """Ids with a sandgate-<id> cgroup directory in any hierarchy (v1 or v2)."""
    ids = set()
    for root, dirs, _files in os.walk("/sys/fs/cgroup"):
        for d in dirs:
            if d.startswith("sandgate-") and len(d) == len("sandgate-") + 8:
                ids.add(d[len("sandgate-") :])
        # sandgate's cgroups sit at most a few levels down; the rest is noise.
        if root.count("/") > 7:
            dirs[:] = []
    return ids


def remove_state(state_dir: Path) -> None:
    """Remove (embedded `sandgate rm`) every sandbox that has a record in `state_dir`."""
    ids = [p.stem for p in (state_dir / "sandboxes").glob("*.json")]
    if ids:
        subprocess.run(
            [SANDGATE, "rm", "--state-dir", str(state_dir), *ids],
            capture_output=True,
            check=False,
            timeout=300,
            env={**os.environ, "SANDGATE_CONTROL_SOCKET": str(state_dir / "no-daemon.sock")},
        )


def process_state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat (R, S, T, Z...), or None if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat[stat.rindex(b")") + 2 :].split()[0].decode()


def wait_for(predicate, timeout: float, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


# --- the daemon ------------------------------------------------------------------------------


class Daemon:
    """One `sandgate serve` with its own everything under `root`."""

    def __init__(
        self,
        root: Path,
        *,
        control_socket: Path | None = None,
        group: str = "",
        policies: Mapping[str, str] | None = None,
    ) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.control_socket = control_socket or root / "control.sock"
        self.metrics_socket = root / "metrics.sock"
        self.state_dir = root / "state"
        self.run_dir = root / "run"
        self.policies_dir = root / "policies"
        self.audit_log = root / "audit.jsonl"
        self.config_path = root / "sandgate.toml"
        self.log_path = root / "daemon.log"
        self.policies_dir.mkdir(exist_ok=True)
        for name, text in (policies or {}).items():
            (self.policies_dir / f"{name}.toml").write_text(text)
        self.proc: subprocess.Popen | None = None
        self.known_ids: set[str] = set()  # every sandbox id a test saw: removed at the end
        self.starts = 0
        lines = [
            "[control]",
            f"socket = {json.dumps(str(self.control_socket))}",
            f"group = {json.dumps(group)}",  # "": root only
            "[paths]",
            f"state_dir = {json.dumps(str(self.state_dir))}",
            f"run_dir = {json.dumps(str(self.run_dir))}",
            f"policies_dir = {json.dumps(str(self.policies_dir))}",
            f"audit_log = {json.dumps(str(self.audit_log))}",
            "[metrics]",
            f"socket = {json.dumps(str(self.metrics_socket))}",
        ]
        self.config_path.write_text("\n".join(lines) + "\n")

    # life

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the daemon is not running"
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, env: Mapping[str, str] | None = None, wait: bool = True) -> float:
        """Start `sandgate serve`; with `wait`, return once a ping answers (seconds)."""
        assert not self.running, "the daemon runs already"
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {self.starts} env={dict(env or {})}\n".encode())
            log.flush()
            t0 = time.monotonic()
            self.proc = subprocess.Popen(
                [SANDGATE, "serve", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )
        if wait:
            self.wait_ready()
        return time.monotonic() - t0

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        client = self.client(timeout=1.0)
        deadline = time.monotonic() + timeout
        while not client.available():
            if not self.running:
                raise AssertionError(
                    f"sandgate serve exited ({self.proc.returncode}):\n{self.log()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"sandgate serve did not answer in {timeout:g}s:\n{self.log()}"
                )
            time.sleep(0.01)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM: the daemon stops serving; its sandboxes keep running."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.kill()

    def kill(self) -> None:
        """SIGKILL by pid (also a stopped daemon: SIGKILL ends a stopped process)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def restart(self, env: Mapping[str, str] | None = None, wait: bool = True) -> float:
        if self.running:
            self.stop()
        return self.start(env, wait)

    def wait_stopped(self, timeout: float = 60.0) -> None:
        """Until the daemon stopped itself (SIGSTOP: state T), e.g. at a test hook."""
        wait_for(
            lambda: process_state(self.pid) == "T" or not self.running,
            timeout,
            what=f"the daemon (pid {self.pid}) to stop itself",
        )
        assert self.running, f"the daemon exited instead of stopping:\n{self.log()}"

    # talking to it

    def client(self, timeout: float | None = 60.0) -> ControlClient:
        return ControlClient(str(self.control_socket), timeout=timeout)

    def call(self, message: dict[str, Any]) -> dict[str, Any]:
        return self.client().call(message)

    def env(self) -> dict[str, str]:
        return {**os.environ, "SANDGATE_CONTROL_SOCKET": str(self.control_socket)}

    def cli(
        self, *args: str, input: str | None = None, timeout: float = 120, state: bool = False
    ) -> subprocess.CompletedProcess:
        """`sandgate ARGS` against this daemon (`state`: with --state-dir after the command)."""
        argv = [
            SANDGATE,
            args[0],
            *(["--state-dir", str(self.state_dir)] if state else []),
            *args[1:],
        ]
        return subprocess.run(
            argv,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(),
            check=False,
        )

    def create(self, *args: str) -> str:
        """`sandgate create ARGS`; the new sandbox's id."""
        result = self.cli("create", *args)
        assert result.returncode == 0, f"create failed ({result.returncode}): {result.stderr}"
        sid = result.stdout.strip()
        assert len(sid) == 8, result.stdout
        self.known_ids.add(sid)
        return sid

    def exec(
        self, sid: str, *argv: str, env: Iterable[str] = (), **kw
    ) -> subprocess.CompletedProcess:
        args = ["exec"]
        for e in env:
            args += ["-e", e]
        return self.cli(*args, sid, "--", *argv, **kw)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def audit(self) -> list[dict]:
        try:
            text = self.audit_log.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def metrics(self) -> str:
        out = subprocess.run(
            [
                "curl",
                "-sS",
                "--max-time",
                "10",
                "--unix-socket",
                str(self.metrics_socket),
                "http://x/metrics",
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    def records(self) -> dict[str, dict]:
        found = {}
        for path in (self.state_dir / "sandboxes").glob("*.json"):
            with contextlib.suppress(FileNotFoundError, ValueError):
                found[path.stem] = json.loads(path.read_text())
        return found

    def run_dir_ids(self) -> set[str]:
        """Ids with a gateway directory or an exec socket under the run directory."""
        ids = set()
        with contextlib.suppress(FileNotFoundError):
            ids |= set(os.listdir(self.run_dir / "gateways"))
        with contextlib.suppress(FileNotFoundError):
            ids |= {n.removesuffix(".sock") for n in os.listdir(self.run_dir / "inits")}
        return ids

    def leftovers(self, sid: str) -> list[str]:
        """Whatever of sandbox `sid` still exists, named; [] when nothing does."""
        left = []
        if sid in netns_ids():
            left.append(f"netns sg-{sid}")
        if sid in link_ids():
            left.append(f"link sg{sid}")
        if sid in nft_ids():
            left.append(f"nft elements of sg{sid}")
        if sid in cgroup_ids():
            left.append(f"cgroup sandgate-{sid}")
        if sid in self.records():
            left.append(f"record {sid}")
        if (self.run_dir / "gateways" / sid).exists():
            left.append(f"gateway dir {sid}")
        if (self.run_dir / "inits" / f"{sid}.sock").exists():
            left.append(f"exec socket {sid}")
        return left

    # the end

    def close(self) -> None:
        """Kill the daemon (by pid) and remove every sandbox it or the test made."""
        self.kill()
        ids = sorted(set(self.records()) | self.known_ids | self.run_dir_ids())
        env = {k: v for k, v in os.environ.items() if k != "SANDGATE_CONTROL_SOCKET"}
        # No daemon answers on the default socket in the tests: this is the embedded rm.
        env["SANDGATE_CONTROL_SOCKET"] = str(self.root / "no-daemon.sock")
        present = netns_ids() | link_ids() | nft_ids() | cgroup_ids() | set(self.records())
        mine = [sid for sid in ids if sid in present]
        if mine:
            subprocess.run(
                [SANDGATE, "rm", "--state-dir", str(self.state_dir), *mine],
                capture_output=True,
                check=False,
                timeout=300,
                env=env,
            )
        still = [sid for sid in ids if self.leftovers(sid)]
        if still:
            # The last resort: everything of sandgate's on this host.
            subprocess.run(
                [SANDGATE, "rm", "--all", "--state-dir", str(self.state_dir)],
                capture_output=True,
                check=False,
                timeout=300,
                env=env,
            )


def print_log(d: Daemon, limit: int = 200) -> None:
    """The daemon's log without the frames of its tracebacks (their last line, the
    exception, stays); pytest shows it when the test failed."""
    out = [ln for ln in d.log().splitlines() if not ln.startswith((" ", "Traceback"))]
    if out:
        print(f"--- {d.log_path} ---", *out[-limit:], sep="\n")


@contextlib.contextmanager
def daemons(base: Path) -> Iterator:
    """A factory of Daemons (not started) under `base`. On the way out, whatever
    happened, each is killed and its sandboxes removed, its log printed (pytest shows
    it when the test failed) and its directory removed."""
    made: list[Daemon] = []

    def make(name: str = "daemon", **kw: Any) -> Daemon:
        d = Daemon(base / name, **kw)
        made.append(d)
        return d

    try:
        yield make
    finally:
        for d in made:
            try:
                d.close()
            finally:
                print_log(d)
                shutil.rmtree(d.root, ignore_errors=True)


# --- raw control connections ---------------------------------------------------------------


def raw_exchange(
    path: str | Path,
    data: bytes,
    *,
    fds: list[int] | None = None,
    shut_write: bool = True,
    timeout: float = 10.0,
) -> tuple[list[dict], bytes]:
    """Send `data` (with `fds`) on a fresh connection, half-close, read to EOF:
    (the frames parsed from the answer, the raw answer)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    with sock:
        sock.connect(str(path))
        if fds:
            socket.send_fds(sock, [data], fds)
        elif data:
            sock.sendall(data)
        if shut_write:
            sock.shutdown(socket.SHUT_WR)
        raw = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            raw += chunk
    return parse_frames(raw), raw


def parse_frames(raw: bytes) -> list[dict]:
    frames = []
    while len(raw) >= 4:
        n = int.from_bytes(raw[:4], "big")
        if len(raw) < 4 + n:
            break
        frames.append(json.loads(raw[4 : 4 + n]))
        raw = raw[4 + n :]
    return frames


def frame(body: bytes | str | dict) -> bytes:
    if isinstance(body, dict):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    return len(body).to_bytes(4, "big") + body
