"""Resource limits attacked from inside real sandboxes (`sandgate run`): a fork bomb, a
memory hog, a command that outlives its wall clock, zombies, a busy loop.

Each test also checks the host side: the host stays usable, the runner survives and
removes everything, the limits the kernel enforces are the ones --json reports. The
cgroup backend that really ran is printed in the terminal and attached to each report.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import signal
import subprocess
import time

import pytest

from runner.cgroups import Backend, detect
from tests.integration.attacks import (
    cgroup_file,
    kept_sandboxes,
    last_json,
    read_keyed,
    read_line,
    sandbox_in_kernel,
    sandgate,
    script,
    summary,
)

pytestmark = pytest.mark.root

BANNER = pytest.StashKey[str]()
MiB = 1 << 20


@pytest.fixture(scope="module")
def backend(request: pytest.FixtureRequest) -> Backend:
    found = detect()
    banner = (
        f"sandgate cgroup backend in use: v{found.version}\n"
        f"  root: {found.info.root}\n  base: {found.info.base}"
    )
    # Shown in the terminal even though output is being captured (fd-level) right now.
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None:
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            reporter.write_line("")
            reporter.write_line(banner)
    request.config.stash[BANNER] = banner
    return found


@pytest.fixture(autouse=True)
def report_backend(request: pytest.FixtureRequest, backend: Backend) -> None:
    request.node.add_report_section("setup", "cgroups backend", request.config.stash[BANNER])


@pytest.fixture
def state(tmp_path):
    return tmp_path / "state"


def _limit_files(backend: Backend) -> dict[str, tuple[str, str]]:
    """What each limit is called on this backend: key -> (controller, file)."""
    if backend.version == 1:
        return {
            "memory": ("memory", "memory.limit_in_bytes"),
            "pids": ("pids", "pids.max"),
            "cpu_quota": ("cpu", "cpu.cfs_quota_us"),
            "cpu_period": ("cpu", "cpu.cfs_period_us"),
        }
    return {"memory": ("memory", "memory.max"), "pids": ("pids", "pids.max")}


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _host_processes_with(argv: list[str]) -> list[int]:
    want = ("\0".join(argv) + "\0").encode()
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if f.read() == want:
                        found.append(int(name))
            except OSError:
                continue
    return found


def test_fork_bomb_stops_at_the_pids_limit_and_the_host_stays_usable(state, backend, request):
    limit = 40
    with kept_sandboxes(state) as kept:
        bomb = kept.popen(
            "run",
            "--json",
            "--pids",
            str(limit),
            "--timeout",
            "60s",
            "--",
            "python3",
            "-c",
            script("fork_bomb"),
            "--wait",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        line = read_line(bomb)
        assert line, bomb.communicate(timeout=30)[1]
        report = json.loads(line)
        sid = kept.add(report["hostname"])
        # The bomb is at its limit and holding it: every pid of the cgroup is taken.
        current = int(_read(cgroup_file(sid, "pids", "pids.current")))
        maximum = _read(cgroup_file(sid, "pids", "pids.max"))
        events = read_keyed(cgroup_file(sid, "pids", "pids.events"))
        # Meanwhile the host forks and runs commands as usual (loosely timed).
        timings = []
        for _ in range(5):
            t0 = time.monotonic()
            subprocess.run(["true"], check=True, timeout=30)
            timings.append(time.monotonic() - t0)
        many = subprocess.run(
            ["sh", "-c", "for i in $(seq 100); do true & done; wait"], timeout=30, check=False
        )
        request.node.add_report_section(
            "call", "host while the bomb ran", f"`true` took {[round(t, 4) for t in timings]} s"
        )
        _, err = bomb.communicate("\n", timeout=30)
    assert report["errno"] == "EAGAIN", report
    # entry, init and the bomb itself count too: the forks stop just short of the limit.
    assert limit - 8 <= report["forked"] < limit, report
    assert maximum == str(limit) and current == limit
    assert events.get("max", 0) > 0
    assert many.returncode == 0
    assert max(timings) < 5, timings
    assert bomb.returncode == 0, err
    assert summary(err)["limits"]["pids"] == limit
    assert sandbox_in_kernel(sid) == []


def test_memory_hog_is_oom_killed_and_the_runner_cleans_up(state):
    hog = ["python3", "-c", "x = bytearray(256 << 20)"]
    result = sandgate("run", "--json", "--memory", "64M", "--", *hog, state_dir=state)
    out = summary(result.stderr)
    assert result.returncode == 137, result.stderr
    assert out["exit_code"] == 137 and out["signal"] == signal.SIGKILL
    assert out["oom_killed"] is True
    assert "out of memory" in out["error"]
    assert 32 * MiB <= out["peak_memory"] <= 72 * MiB, out["peak_memory"]
    # The runner survived the kill: it removed the sandbox and reported how long it took.
    assert "destroy_ms" in out
    assert sandbox_in_kernel(out["id"]) == []
    # Control: the same allocation fits under a larger limit.
    roomy = sandgate("run", "--json", "--memory", "512M", "--", *hog, state_dir=state)
    assert roomy.returncode == 0, roomy.stderr
    assert summary(roomy.stderr)["oom_killed"] is False


def test_timeout_kills_every_process_of_the_sandbox(state):
    # A unique duration tells these sleeps apart from any other `sleep` on the machine.
    sleep = ["sleep", f"100.{secrets.randbelow(10**6):06d}"]
    command = f"{' '.join(sleep)} & echo started; {' '.join(sleep)}"
    t0 = time.monotonic()
    with kept_sandboxes(state) as kept:
        proc = kept.popen(
            "run",
            "--json",
            "--timeout",
            "1s",
            "--",
            "sh",
            "-c",
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert read_line(proc) == "started\n"
        # Control: both sleeps do run on the host (in the sandbox's pid namespace).
        running: list[int] = []
        for _ in range(50):
            running = _host_processes_with(sleep)
            if len(running) == 2:
                break
            time.sleep(0.02)
        _, err = proc.communicate(timeout=30)
    elapsed = time.monotonic() - t0
    assert len(running) == 2, running
    out = summary(err)
    assert proc.returncode == 137
    assert out["exit_code"] == 137 and out["timed_out"] is True
    assert elapsed < 10, elapsed
    assert _host_processes_with(sleep) == []
    assert all(not os.path.exists(f"/proc/{pid}") for pid in running)
    assert sandbox_in_kernel(out["id"]) == []


def test_orphaned_zombies_are_reaped(state):
    count = "ps -eo stat | grep -c Z"
    # Control first: children of a live parent that does not wait are zombies, and the
    # count sees them (init cannot reap what is not its child).
    control = (
        "import os, subprocess, time\n"
        "[os.fork() or os._exit(0) for _ in range(3)]\n"
        "time.sleep(0.3)\n"
        f"print(subprocess.run({count!r}, shell=True, capture_output=True, text=True)"
        ".stdout.strip(), flush=True)\n"
    )
    command = (
        f"python3 -c {shlex.quote(control)}; "
        f"for i in 1 2 3 4 5; do (true &) ; done; sleep 1; {count}"
    )
    result = sandgate("run", "--", "sh", "-c", command, state_dir=state)
    assert result.stdout.split() == ["3", "0"], (result.stdout, result.stderr)
    assert result.returncode == 1  # grep -c found nothing


def test_json_reports_the_limits_the_kernel_enforces_and_peak_memory(state, backend):
    files = _limit_files(backend)
    code = (
        "import socket, sys\n"
        "x = bytearray(16 << 20)\n"
        "print(socket.gethostname(), flush=True)\n"
        "sys.stdin.readline()\n"
    )
    with kept_sandboxes(state) as kept:
        proc = kept.popen(
            "run",
            "--json",
            "--memory",
            "128M",
            "--pids",
            "100",
            "--cpus",
            "1.5",
            "--timeout",
            "30s",
            "--",
            "python3",
            "-c",
            code,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        sid = read_line(proc).strip()
        assert sid, proc.communicate(timeout=30)[1]
        kept.add(sid)
        enforced = {key: _read(cgroup_file(sid, *where)) for key, where in files.items()}
        if backend.version == 2:
            enforced["cpu_quota"], enforced["cpu_period"] = _read(
                cgroup_file(sid, "cpu", "cpu.max")
            ).split()
        _, err = proc.communicate("\n", timeout=30)
    assert proc.returncode == 0, err
    out = summary(err)
    assert out["limits"] == {"memory": 128 * MiB, "pids": 100, "cpus": 1.5, "timeout": 30.0}
    assert enforced == {
        "memory": str(128 * MiB),
        "pids": "100",
        "cpu_quota": "150000",
        "cpu_period": "100000",
    }
    assert out["peak_memory"] >= 16 * MiB
    assert out["oom_killed"] is False and out["timed_out"] is False
    assert sandbox_in_kernel(sid) == []


CPU_PROBE = r"""
import json, os, time
tick = os.sysconf("SC_CLK_TCK")
def cpu():
    fields = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / tick  # utime + stime
t0, c0 = time.monotonic(), cpu()
while time.monotonic() - t0 < 2:
    pass
print(json.dumps({"share": (cpu() - c0) / (time.monotonic() - t0)}))
"""


def test_cpu_limit_holds_a_busy_loop_to_its_share(state, request):
    with kept_sandboxes(state) as kept:
        result = sandgate(
            "run",
            "--json",
            "--keep",
            "--cpus",
            "0.5",
            "--",
            "python3",
            "-c",
            CPU_PROBE,
            state_dir=state,
        )
        sid = kept.add(summary(result.stderr)["id"])
        assert result.returncode == 0, result.stderr
        share = last_json(result.stdout)["share"]
        # Evidence that the quota (not a busy host) held it back: the kernel throttled it.
        stat = read_keyed(cgroup_file(sid, "cpu", "cpu.stat"))
    request.node.add_report_section("call", "cpu", f"share {share:.3f} of a cpu; {stat}")
    assert 0.2 <= share <= 0.8, share
    assert stat["nr_throttled"] > 0, stat
    assert sandbox_in_kernel(sid) == []
