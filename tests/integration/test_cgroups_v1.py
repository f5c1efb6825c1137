"""runner/cgroups.py on this host's real cgroup v1 hierarchies (root).

Creates sandgate-test-* cgroups beneath the runner's own cgroups, runs real
children in them (a fork bomb, a memory hog, sleepers) and checks the limits
bite, the kill is complete and nothing is left behind. The backend that really
ran is printed in the terminal and attached to every test's report.
"""

from __future__ import annotations

import os
import secrets
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from runner.cgroups import Backend, Cgroup, CgroupError, CgroupFS, LegacyCgroup, Limits, detect

pytestmark = pytest.mark.root

TEST_PREFIX = "sandgate-test-"
BANNER = pytest.StashKey[str]()

# Forks until the pids limit stops it. Every process forks, so it grows like a real
# fork bomb; it refuses to start outside the sandbox's pids cgroup and every process
# gives up on its own after a wall-clock deadline, so a broken cgroup cannot hurt the host.
FORK_BOMB = r"""
import errno, os, sys, time
name, seconds = sys.argv[1], float(sys.argv[2])
inside = any(
    line.split(":", 2)[2].strip().endswith("/" + name)
    for line in open("/proc/self/cgroup")
    if "pids" in line.split(":", 2)[1].split(",")
)
if not inside:
    sys.exit("not inside the sandbox's pids cgroup: refusing to fork")
deadline = time.monotonic() + seconds
root, forked, eagain = True, 0, 0
while time.monotonic() < deadline:
    try:
        pid = os.fork()
    except OSError as e:
        if e.errno != errno.EAGAIN:
            raise
        eagain += 1
        if root and eagain >= 100:
            break
        time.sleep(0.001)
        continue
    if pid == 0:
        root, forked, eagain = False, 0, 0
    else:
        forked += 1
if root:
    print(f"forked={forked} eagain={eagain}", flush=True)
while time.monotonic() < deadline + 5:
    time.sleep(0.05)
"""

# Touches 16 MiB at a time (b"\x01" * n writes every page) up to the size asked.
MEMORY_HOG = r"""
import sys
chunks = []
for i in range(int(sys.argv[1]) // 16):
    chunks.append(b"\x01" * (16 << 20))
    print(f"allocated {(i + 1) * 16}M", flush=True)
print("survived", flush=True)
"""


@pytest.fixture(scope="module")
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    found = detect()
    own = read("/proc/self/cgroup").replace("\n", " | ")
    banner = (
        f"cgroups backend that ran: v{found.version} {found!r}\n"
        f"  root: {found.info.root}\n  base: {found.info.base}\n  /proc/self/cgroup: {own}"
    )
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("")
        reporter.write_line(banner)
    if found.version != 1:
        pytest.skip(f"this host's cgroups are v{found.version}; this module tests v1:\n{banner}")
    request.config.stash[BANNER] = banner
    yield found
    left = [name for name in found.list() if name.startswith(TEST_PREFIX)]
    assert not left, f"test cgroups left behind: {left}"


@pytest.fixture(autouse=True)
def report_backend(request: pytest.FixtureRequest, backend: Backend) -> None:
    request.node.add_report_section("setup", "cgroups backend", request.config.stash[BANNER])


class Sandboxes:
    """Creates test cgroups and children in them; `close` removes every one, whatever failed."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.cgroups: list[Cgroup] = []
        self.children: list[subprocess.Popen] = []

    def create(self, limits: Limits) -> Cgroup:
        name = TEST_PREFIX + secrets.token_hex(4)
        cgroup = self.backend.create(name, limits)
        self.cgroups.append(cgroup)
        return cgroup

    def spawn(self, cgroup: Cgroup, argv: list[str], **kwargs) -> subprocess.Popen:
        """Starts argv inside `cgroup`: the child joins it between fork and exec."""
        child = subprocess.Popen(argv, preexec_fn=lambda: cgroup.add_process(os.getpid()), **kwargs)
        self.children.append(child)
        return child

    def close(self) -> None:
        errors: list[str] = []
        for cgroup in self.cgroups:
            try:
                cgroup.destroy()
            except CgroupError as e:
                errors.append(str(e))
                for pid in cgroup.procs():  # last resort, so the host is not left with them
                    os.kill(pid, signal.SIGKILL)
                cgroup.destroy()
            assert self.backend.find(cgroup.name) is None
        for child in self.children:
            if child.poll() is None:
                child.kill()
            child.wait(timeout=10)
        assert not errors, errors


@pytest.fixture
def sandboxes(backend: Backend) -> Iterator[Sandboxes]:
    made = Sandboxes(backend)
    try:
        yield made
    finally:
        made.close()


def read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def keyed(path: str) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split() for line in read(path).splitlines())}


def readline(child: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([child.stdout], [], [], timeout)
    assert ready, f"no output from pid {child.pid} within {timeout}s"
    return child.stdout.readline().strip()


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def alive(pid: int) -> bool:
    try:
        return read(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_backend_is_v1_with_our_hierarchies(backend: Backend, sandboxes: Sandboxes) -> None:
    cgroup = sandboxes.create(Limits(memory_bytes=64 << 20, pids=16, cpus=0.5))
    assert isinstance(cgroup, LegacyCgroup)
    assert {"memory", "pids", "cpu"} <= set(cgroup.dirs)
    for path in cgroup.paths:
        assert os.path.isdir(path)
        assert path.endswith("/" + cgroup.name)
    assert read(f"{cgroup.dirs['memory']}/memory.limit_in_bytes") == str(64 << 20)
    memsw = f"{cgroup.dirs['memory']}/memory.memsw.limit_in_bytes"
    if os.path.exists(memsw):
        assert read(memsw) == str(64 << 20)  # swap 0: memory+swap equals memory
    else:
        assert any("swap accounting is off" in note for note in cgroup.notes)
    assert read(f"{cgroup.dirs['pids']}/pids.max") == "16"
    assert read(f"{cgroup.dirs['cpu']}/cpu.cfs_period_us") == "100000"
    assert read(f"{cgroup.dirs['cpu']}/cpu.cfs_quota_us") == "50000"
    assert cgroup.name in backend.list()


@pytest.mark.parametrize("join", ["child joins before exec", "parent adds the pid"])
def test_a_child_runs_inside_every_hierarchy(sandboxes: Sandboxes, join: str) -> None:
    cgroup = sandboxes.create(Limits(memory_bytes=64 << 20, pids=16, cpus=1.0))
    script = "import sys; sys.stdin.readline(); print(open('/proc/self/cgroup').read())"
    argv = [sys.executable, "-c", script]
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True}
    if join == "child joins before exec":
        child = sandboxes.spawn(cgroup, argv, **pipes)
    else:
        child = subprocess.Popen(argv, **pipes)
        sandboxes.children.append(child)
        cgroup.add_process(child.pid)
    assert cgroup.procs() == [child.pid]
    out, _ = child.communicate("go\n", timeout=30)
    lines = {line.split(":")[1]: line.split(":", 2)[2] for line in out.split()}
    for controller in ("memory", "pids", "cpu"):
        hierarchy = next(key for key in lines if controller in key.split(","))
        assert lines[hierarchy].endswith("/" + cgroup.name), out


@pytest.mark.parametrize("kill", ["freezer", "SIGKILL loop only"])
def test_fork_bomb_stops_at_pids_max_and_the_host_stays_fine(
    sandboxes: Sandboxes, kill: str
) -> None:
    limits = Limits(memory_bytes=512 << 20, pids=32, cpus=1.0)
    created = sandboxes.create(limits)
    assert isinstance(created, LegacyCgroup)
    cgroup = created
    if kill == "SIGKILL loop only":
        # The same cgroup seen without its freezer directory, as on a host without one.
        dirs = {c: d for c, d in created.dirs.items() if c != "freezer"}
        cgroup = LegacyCgroup(CgroupFS(), created.name, dirs)
    bomb = sandboxes.spawn(
        cgroup, [sys.executable, "-c", FORK_BOMB, cgroup.name, "20"], stdout=subprocess.PIPE
    )
    result = readline(bomb, timeout=30).decode()
    counts = dict(field.split("=") for field in result.split())
    assert int(counts["eagain"]) >= 100, result  # the limit, not the deadline, stopped it
    pids_current = int(read(f"{cgroup.dirs['pids']}/pids.current"))
    pids_events = keyed(f"{cgroup.dirs['pids']}/pids.events")
    assert pids_current == limits.pids
    assert pids_events["max"] > 0
    assert len(cgroup.procs()) == limits.pids

    # The host still forks and runs programs while the bomb holds its 32 slots.
    assert subprocess.run(["true"], timeout=10).returncode == 0

    victims = cgroup.procs()
    started = time.monotonic()
    cgroup.kill_all()
    took = time.monotonic() - started
    assert cgroup.procs() == []
    assert bomb.wait(timeout=10) == -signal.SIGKILL
    wait_for(lambda: not any(alive(pid) for pid in victims), 10, "the bomb's processes to go")
    assert read(f"{created.dirs['freezer']}/freezer.state") == "THAWED"
    print(
        f"fork bomb ({kill}): {result}, pids.current={pids_current}"
        f" pids.events max={pids_events['max']}, kill_all took {took:.3f}s"
    )


def test_memory_hog_is_oom_killed(sandboxes: Sandboxes) -> None:
    limits = Limits(memory_bytes=64 << 20, pids=16, cpus=1.0)
    cgroup = sandboxes.create(limits)
    assert not cgroup.oom_killed()
    hog = sandboxes.spawn(
        cgroup, [sys.executable, "-c", MEMORY_HOG, "256"], stdout=subprocess.PIPE, text=True
    )
    out, _ = hog.communicate(timeout=60)
    assert hog.returncode == -signal.SIGKILL, out
    assert "survived" not in out
    assert cgroup.oom_killed()
    peak = cgroup.peak_memory()
    assert peak is not None
    assert limits.memory_bytes // 2 < peak <= limits.memory_bytes
    print(f"memory hog: {out.split()[-1] if out else 'nothing allocated'}; peak {peak} bytes")


def test_kill_all_kills_every_process(sandboxes: Sandboxes) -> None:
    cgroup = sandboxes.create(Limits(memory_bytes=64 << 20, pids=32, cpus=1.0))
    shell = "for i in 1 2 3 4 5; do sleep 300 & done; setsid sleep 300 & wait"
    parent = sandboxes.spawn(cgroup, ["sh", "-c", shell])
    wait_for(lambda: len(cgroup.procs()) == 7, 10, "sh and its six sleeps")
    victims = cgroup.procs()
    cgroup.kill_all()
    assert cgroup.procs() == []
    assert parent.wait(timeout=10) == -signal.SIGKILL
    wait_for(lambda: not any(alive(pid) for pid in victims), 10, "every sleep to be gone")
    cgroup.kill_all()  # nothing left: returns at once


def test_destroy_leaves_no_directory(backend: Backend, sandboxes: Sandboxes) -> None:
    cgroup = sandboxes.create(Limits(memory_bytes=64 << 20, pids=16, cpus=1.0))
    child = sandboxes.spawn(cgroup, ["sleep", "300"])
    paths = list(cgroup.paths)
    cgroup.destroy()
    assert child.wait(timeout=10) == -signal.SIGKILL
    for path in paths:
        assert not os.path.exists(path), path
    assert backend.find(cgroup.name) is None
    assert cgroup.name not in backend.list()
    cgroup.destroy()  # idempotent


def test_create_refuses_a_name_that_is_still_running(
    backend: Backend, sandboxes: Sandboxes
) -> None:
    limits = Limits(memory_bytes=64 << 20, pids=16, cpus=1.0)
    cgroup = sandboxes.create(limits)
    sandboxes.spawn(cgroup, ["sleep", "300"])
    wait_for(lambda: len(cgroup.procs()) == 1, 10, "the sleep to join")
    with pytest.raises(CgroupError, match="still running"):
        backend.create(cgroup.name, limits)
    cgroup.kill_all()
    again = backend.create(cgroup.name, Limits(memory_bytes=32 << 20, pids=8, cpus=1.0))
    assert isinstance(again, LegacyCgroup)
    assert read(f"{again.dirs['memory']}/memory.limit_in_bytes") == str(32 << 20)
    # Raising the limit past memory+swap needs the other write order; create handles it.
    bigger = backend.create(cgroup.name, Limits(memory_bytes=128 << 20, pids=8, cpus=1.0))
    assert isinstance(bigger, LegacyCgroup)
    assert read(f"{bigger.dirs['memory']}/memory.limit_in_bytes") == str(128 << 20)
