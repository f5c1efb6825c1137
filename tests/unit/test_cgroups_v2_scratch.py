"""runner/cgroups.py against a scratch directory laid out like cgroupfs (no root needed).

`ScratchKernel` plays the kernel's part that plain files cannot: mkdir fills in
the interface files, a write to cgroup.procs moves the pid, subtree_control
obeys the no-internal-processes rule, cgroup.kill empties the subtree and
rmdir refuses a populated cgroup. Signals are recorded, never sent: the pids
in the scratch tree are fiction.
"""

from __future__ import annotations

import errno
import os
import posixpath
import signal

import pytest

from runner.cgroups import (
    CgroupError,
    CgroupFS,
    CgroupV1,
    CgroupV2,
    Limits,
    SystemdScopes,
    UnifiedCgroup,
    default_limits,
    detect,
    parse_cpus,
    parse_size,
)

SERVICE = "system.slice/sandgate.service"
ALL_V2 = "cpuset cpu io memory hugetlb pids rdma misc"
RUNNER_PIDS = [4242, 4243]
# Files that depend on the kernel version or its config; a test may take some away.
ALL_KNOBS = frozenset(
    {"cgroup.kill", "cgroup.freeze", "memory.peak", "memory.swap.max", "memory.oom.group"}
)


class ScratchKernel(CgroupFS):
    """A CgroupFS whose side effects mimic cgroupfs within a scratch tree."""

    def __init__(self, root: str, knobs: frozenset[str] | None = None) -> None:
        self.root = root
        self.knobs = ALL_KNOBS if knobs is None else knobs
        self.writes: list[tuple[str, str]] = []
        self.signals: list[tuple[int, int]] = []
        self.unkillable: set[int] = set()

    # --- helpers the tests use to arrange the tree, as the kernel would have it -----------

    def plain(self, path: str, text: str) -> None:
        with open(path, "w") as f:
            f.write(text)

    def cgroup_files(self, path: str, controllers: list[str]) -> None:
        files = {
            "cgroup.controllers": " ".join(controllers),
            "cgroup.subtree_control": "",
            "cgroup.procs": "",
            "cgroup.events": "populated 0\nfrozen 0\n",
        }
        for knob in ("cgroup.kill", "cgroup.freeze"):
            if knob in self.knobs:
                files[knob] = "0" if knob == "cgroup.freeze" else ""
        if "memory" in controllers:
            files["memory.max"] = "max"
            files["memory.events"] = "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n"
            for knob, default in (
                ("memory.swap.max", "max"),
                ("memory.oom.group", "0"),
                ("memory.peak", "0"),
            ):
                if knob in self.knobs:
                    files[knob] = default
        if "pids" in controllers:
            files["pids.max"] = "max"
        if "cpu" in controllers:
            files["cpu.max"] = "max 100000"
        for name, text in files.items():
            self.plain(posixpath.join(path, name), text)

    def pids_in(self, path: str) -> list[int]:
        with open(posixpath.join(path, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]

    def set_pids(self, path: str, pids: list[int]) -> None:
        self.plain(posixpath.join(path, "cgroup.procs"), "".join(f"{p}\n" for p in pids))

    def all_cgroups(self, top: str | None = None) -> list[str]:
        return [d for d, _, files in os.walk(top or self.root) if "cgroup.procs" in files]

    def drop_pid(self, pid: int) -> None:
        for cgroup in self.all_cgroups():
            pids = self.pids_in(cgroup)
            if pid in pids:
                self.set_pids(cgroup, [p for p in pids if p != pid])

    # --- the kernel's side of CgroupFS -----------------------------------------------------

    def mkdir(self, path: str) -> None:
        os.mkdir(path)
        with open(posixpath.join(posixpath.dirname(path), "cgroup.subtree_control")) as f:
            self.cgroup_files(path, f.read().split())

    def write(self, path: str, text: str) -> None:
        self.writes.append((posixpath.relpath(path, self.root), text))
        if not os.path.exists(path):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        cgroup, name = posixpath.split(path)
        if name == "cgroup.procs":
            pid = int(text)
            self.drop_pid(pid)
            self.set_pids(cgroup, [*self.pids_in(cgroup), pid])
        elif name == "cgroup.subtree_control":
            with open(posixpath.join(cgroup, "cgroup.controllers")) as f:
                offered = f.read().split()
            with open(path) as f:
                enabled = f.read().split()
            for token in text.split():
                if token[1:] not in offered:
                    raise FileNotFoundError(errno.ENOENT, "controller not offered", path)
                if cgroup != self.root and self.pids_in(cgroup):
                    raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), path)
                if token.startswith("+") and token[1:] not in enabled:
                    enabled.append(token[1:])
            self.plain(path, " ".join(enabled))
        elif name == "cgroup.kill":
            for sub in self.all_cgroups(cgroup):
                for pid in self.pids_in(sub):
                    self.kill(pid, signal.SIGKILL)
        else:
            self.plain(path, text)

    def rmdir(self, path: str) -> None:
        if not os.path.isdir(path):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        if self.pids_in(path) or any(
            os.path.isdir(posixpath.join(path, e)) for e in os.listdir(path)
        ):
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), path)
        for entry in os.listdir(path):
            os.unlink(posixpath.join(path, entry))
        os.rmdir(path)

    def kill(self, pid: int, sig: int) -> None:
        self.signals.append((pid, sig))
        if sig == signal.SIGKILL and pid not in self.unkillable:
            self.drop_pid(pid)


@pytest.fixture
def scratch(tmp_path):
    """A v2 host: the runner is the only occupant of system.slice/sandgate.service."""
    return make_scratch(tmp_path)


def make_scratch(
    tmp_path, knobs: frozenset[str] | None = None, own: str = SERVICE
) -> tuple[ScratchKernel, str, str]:
    fs_root = str(tmp_path / "cgroup")
    proc_root = str(tmp_path / "proc")
    os.makedirs(posixpath.join(proc_root, "self"))
    with open(posixpath.join(proc_root, "self", "cgroup"), "w") as f:
        f.write(f"0::/{own}\n")
    with open(posixpath.join(proc_root, "meminfo"), "w") as f:
        f.write("MemTotal:       24684084 kB\nMemFree:        24089336 kB\n")
    os.mkdir(fs_root)
    kernel = ScratchKernel(fs_root, knobs)
    kernel.cgroup_files(fs_root, ALL_V2.split())
    kernel.plain(posixpath.join(fs_root, "cgroup.subtree_control"), "cpu io memory pids")
    slice_dir = posixpath.join(fs_root, "system.slice")
    kernel.mkdir(slice_dir)
    kernel.plain(posixpath.join(slice_dir, "cgroup.subtree_control"), "cpu io memory pids")
    service = posixpath.join(fs_root, SERVICE)
    kernel.mkdir(service)
    kernel.set_pids(service, RUNNER_PIDS)
    return kernel, fs_root, proc_root


def service_dir(fs_root: str) -> str:
    return posixpath.join(fs_root, SERVICE)


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


LIMITS = Limits(memory_bytes=512 << 20, pids=64, cpus=1.0)


# --- detection --------------------------------------------------------------------------


def test_detect_prefers_v2_when_the_unified_hierarchy_has_the_controllers(scratch, tmp_path):
    kernel, fs_root, proc_root = scratch
    # v1 hierarchies are present as well, and listed in /proc/self/cgroup: v2 still wins.
    for controller in ("memory", "pids", "cpu"):
        os.mkdir(posixpath.join(fs_root, controller))
        kernel.plain(posixpath.join(fs_root, controller, "cgroup.procs"), "")
    kernel.plain(
        posixpath.join(proc_root, "self", "cgroup"),
        f"3:memory:/\n2:pids:/\n1:cpu:/\n0::/{SERVICE}\n",
    )
    backend = detect(proc_root=proc_root, fs_root=fs_root, fs=kernel)
    assert isinstance(backend, CgroupV2)
    assert backend.version == 2
    assert backend.info.version == 2
    assert backend.info.root == fs_root
    assert backend.info.base == service_dir(fs_root)


def test_detect_falls_back_to_v1_when_unified_lacks_controllers(tmp_path):
    # The layout of a hybrid host (like Debian with systemd.unified_cgroup_hierarchy=0).
    fs_root, proc_root = tmp_path / "cgroup", tmp_path / "proc"
    (proc_root / "self").mkdir(parents=True)
    (proc_root / "self" / "cgroup").write_text(
        "8:pids:/\n6:freezer:/\n4:memory:/box/1\n2:cpu,cpuacct:/\n0::/\n"
    )
    (fs_root / "unified").mkdir(parents=True)
    (fs_root / "unified" / "cgroup.controllers").write_text("hugetlb\n")
    for hierarchy, own in (("pids", ""), ("freezer", ""), ("memory", "box/1"), ("cpu,cpuacct", "")):
        (fs_root / hierarchy / own).mkdir(parents=True, exist_ok=True)
        (fs_root / hierarchy / "cgroup.procs").write_text("")
        (fs_root / hierarchy / own / "cgroup.procs").write_text("")
    backend = detect(proc_root=str(proc_root), fs_root=str(fs_root))
    assert isinstance(backend, CgroupV1)
    assert backend.info.version == 1
    assert f"{fs_root}/memory/box/1" in backend.info.base
    assert f"{fs_root}/cpu,cpuacct" in backend.info.base


def test_detect_error_names_what_is_missing(tmp_path):
    fs_root, proc_root = tmp_path / "cgroup", tmp_path / "proc"
    (proc_root / "self").mkdir(parents=True)
    (proc_root / "self" / "cgroup").write_text("4:memory:/\n0::/\n")
    (fs_root / "unified").mkdir(parents=True)
    (fs_root / "unified" / "cgroup.controllers").write_text("hugetlb\n")
    with pytest.raises(CgroupError) as caught:
        detect(proc_root=str(proc_root), fs_root=str(fs_root))
    message = str(caught.value)
    assert "cgroup v2:" in message
    assert "missing memory pids cpu" in message
    assert f"{fs_root}/unified/cgroup.controllers offers hugetlb" in message
    assert f"memory: no hierarchy mounted at {fs_root}/memory" in message
    assert "pids: not a v1 hierarchy" in message
    assert "cpu: not a v1 hierarchy" in message


def test_detect_after_the_move_uses_the_service_cgroup_as_base(tmp_path):
    kernel, fs_root, proc_root = make_scratch(tmp_path, own=f"{SERVICE}/runner")
    backend = detect(proc_root=proc_root, fs_root=fs_root, fs=kernel)
    assert backend.info.base == service_dir(fs_root)


def test_detect_rejects_a_cgroup_without_delegated_controllers(tmp_path):
    kernel, fs_root, proc_root = make_scratch(tmp_path)
    kernel.plain(posixpath.join(service_dir(fs_root), "cgroup.controllers"), "cpu")
    with pytest.raises(CgroupError, match="offers cpu, missing memory pids"):
        detect(proc_root=proc_root, fs_root=fs_root, fs=kernel)


# --- create -----------------------------------------------------------------------------


def test_create_writes_every_limit(scratch):
    kernel, fs_root, proc_root = scratch
    backend = detect(proc_root=proc_root, fs_root=fs_root, fs=kernel)
    cgroup = backend.create("sandgate-a1", LIMITS)
    path = posixpath.join(service_dir(fs_root), "sandgate-a1")
    assert cgroup.paths == [path]
    assert read(f"{path}/memory.max") == str(512 << 20)
    assert read(f"{path}/memory.swap.max") == "0"
    assert read(f"{path}/memory.oom.group") == "1"
    assert read(f"{path}/pids.max") == "64"
    assert read(f"{path}/cpu.max") == "100000 100000"
    assert cgroup.notes == []


def test_cpu_max_scales_the_quota(scratch):
    kernel, fs_root, proc_root = scratch
    backend = detect(proc_root=proc_root, fs_root=fs_root, fs=kernel)
    cgroup = backend.create("sandgate-a2", Limits(memory_bytes=64 << 20, pids=8, cpus=1.5))
    assert read(f"{cgroup.paths[0]}/cpu.max") == "150000 100000"


def test_create_moves_the_runner_into_a_leaf_then_enables_controllers(scratch):
    kernel, fs_root, proc_root = scratch
    service = service_dir(fs_root)
    backend = detect(proc_root=proc_root, fs_root=fs_root, fs=kernel)
    backend.create("sandgate-a1", LIMITS)
    assert kernel.pids_in(service) == []
    assert kernel.pids_in(f"{service}/runner") == RUNNER_PIDS
    assert sorted(read(f"{service}/cgroup.subtree_control").split()) == ["cpu", "memory", "pids"]
    # The moves happen before the controllers are enabled (the kernel would say EBUSY).
    order = [name for name, _ in kernel.writes]
    enable = order.index(f"{SERVICE}/cgroup.subtree_control")
    assert order[:enable] == [f"{SERVICE}/runner/cgroup.procs"] * len(RUNNER_PIDS)
    assert ("system.slice/sandgate.service/cgroup.subtree_control", "+memory +pids +cpu") in (
        kernel.writes
    )
    assert backend.list() == ["sandgate-a1"]  # the leaf is not a sandbox


def test_create_without_processes_in_the_own_cgroup_makes_no_leaf(scratch):
    kernel, fs_root, proc_root = scratch
    kernel.set_pids(service_dir(fs_root), [])
    backend = detect(proc_root=proc_root, fs_root=fs_root, fs=kernel)
    backend.create("sandgate-a1", LIMITS)
    assert not os.path.exists(f"{service_dir(fs_root)}/runner")
    backend.create("sandgate-a2", LIMITS)
    enables = [w for w in kernel.writes if w[0].endswith("subtree_control")]
    assert len(enables) == 1  # already enabled the second time


def test_create_is_idempotent_while_empty_and_refuses_a_running_sandbox(scratch):
    kernel, fs_root, proc_root = scratch
    backend = detect(proc_root=proc_root, fs_root=fs_root, fs=kernel)
    first = backend.create("sandgate-a1", LIMITS)
    again = backend.create("sandgate-a1", Limits(memory_bytes=256 << 20, pids=32, cpus=0.5))
    assert again.paths == first.paths
    assert read(f"{again.paths[0]}/memory.max") == str(256 << 20)
    again.add_process(5000)
    with pytest.raises(CgroupError, match=r"already exists with processes \[5000\]"):
        backend.create("sandgate-a1", LIMITS)


def test_create_notes_missing_swap_and_oom_group_knobs(tmp_path):
    kernel, fs_root, proc_root = make_scratch(tmp_path, knobs=frozenset({"cgroup.kill"}))
    backend = detect(proc_root=proc_root, fs_root=fs_root, fs=kernel)
    cgroup = backend.create("sandgate-a1", LIMITS)
    assert any("swap accounting is off" in note for note in cgroup.notes)
    assert any("memory.oom.group" in note for note in cgroup.notes)


def test_create_fails_closed_and_removes_what_it_made(scratch):
    kernel, fs_root, proc_root = scratch
    backend = detect(proc_root=proc_root, fs_root=fs_root, fs=kernel)
    # A kernel without the cpu controller's file: the sandbox must not start half-limited.
    original = kernel.cgroup_files

    def without_cpu_max(path: str, controllers: list[str]) -> None:
        original(path, controllers)
        if os.path.basename(path).startswith("sandgate-"):
            os.unlink(posixpath.join(path, "cpu.max"))

    kernel.cgroup_files = without_cpu_max  # type: ignore[method-assign]
    with pytest.raises(CgroupError, match=r"cpu\.max: .*ENOENT"):
        backend.create("sandgate-a1", LIMITS)
    assert backend.list() == []


def test_names_are_checked():
    with pytest.raises(ValueError, match="invalid sandbox cgroup name"):
        CgroupV2(CgroupFS(), "/nonexistent", "/nonexistent").create("../escape", LIMITS)


# --- a sandbox cgroup -------------------------------------------------------------------


def test_add_process_writes_cgroup_procs(scratch):
    kernel, fs_root, proc_root = scratch
    cgroup = detect(proc_root=proc_root, fs_root=fs_root, fs=kernel).create("sandgate-a1", LIMITS)
    cgroup.add_process(5001)
    assert (f"{SERVICE}/sandgate-a1/cgroup.procs", "5001") in kernel.writes
    assert cgroup.procs() == [5001]


def test_procs_include_nested_cgroups(scratch):
    kernel, fs_root, proc_root = scratch
    cgroup = detect(proc_root=proc_root, fs_root=fs_root, fs=kernel).create("sandgate-a1", LIMITS)
    kernel.mkdir(f"{cgroup.paths[0]}/inner")
    kernel.set_pids(f"{cgroup.paths[0]}/inner", [6001])
    cgroup.add_process(5001)
    assert cgroup.procs() == [5001, 6001]


def test_oom_killed_reads_memory_events(scratch):
    kernel, fs_root, proc_root = scratch
    cgroup = detect(proc_root=proc_root, fs_root=fs_root, fs=kernel).create("sandgate-a1", LIMITS)
    assert cgroup.oom_killed() is False
    kernel.plain(
        f"{cgroup.paths[0]}/memory.events",
        "low 0\nhigh 0\nmax 17\noom 1\noom_kill 1\noom_group_kill 1\n",
    )
    assert cgroup.oom_killed() is True


def test_peak_memory_when_the_kernel_records_it_and_when_not(scratch, tmp_path):
    kernel, fs_root, proc_root = scratch
    cgroup = detect(proc_root=proc_root, fs_root=fs_root, fs=kernel).create("sandgate-a1", LIMITS)
    kernel.plain(f"{cgroup.paths[0]}/memory.peak", "67108864\n")
    assert cgroup.peak_memory() == 64 << 20
    old = make_scratch(tmp_path / "old", knobs=frozenset())
    backend = detect(proc_root=old[2], fs_root=old[1], fs=old[0])
    assert backend.create("sandgate-a1", LIMITS).peak_memory() is None


def test_kill_all_uses_cgroup_kill(scratch):
    kernel, fs_root, proc_root = scratch
    cgroup = detect(proc_root=proc_root, fs_root=fs_root, fs=kernel).create("sandgate-a1", LIMITS)
    for pid in (5001, 5002):
        cgroup.add_process(pid)
    cgroup.kill_all()
    assert (f"{SERVICE}/sandgate-a1/cgroup.kill", "1") in kernel.writes
    assert cgroup.procs() == []


def test_kill_all_without_cgroup_kill_freezes_then_signals(tmp_path):
    kernel, fs_root, proc_root = make_scratch(tmp_path, knobs=frozenset({"cgroup.freeze"}))
    cgroup = detect(proc_root=proc_root, fs_root=fs_root, fs=kernel).create("sandgate-a1", LIMITS)
    for pid in (5001, 5002):
        cgroup.add_process(pid)
    before = len(kernel.writes)
    cgroup.kill_all()
    freezes = [text for name, text in kernel.writes[before:] if name.endswith("cgroup.freeze")]
    assert freezes[0] == "1" and freezes[-1] == "0"
    assert sorted(kernel.signals) == [(5001, signal.SIGKILL), (5002, signal.SIGKILL)]
    assert cgroup.procs() == []


def test_kill_all_gives_up_with_an_actionable_error(tmp_path):
    kernel, fs_root, proc_root = make_scratch(tmp_path, knobs=frozenset())
    cgroup = detect(proc_root=proc_root, fs_root=fs_root, fs=kernel).create("sandgate-a1", LIMITS)
    cgroup.add_process(5001)
    kernel.unkillable.add(5001)  # a task stuck in D state
    with pytest.raises(CgroupError, match=r"processes \[5001\] .* survived SIGKILL .*D state"):
        cgroup.kill_all(timeout=0.2)


def test_kill_all_refuses_to_kill_the_runner(scratch):
    kernel, fs_root, proc_root = scratch
    cgroup = detect(proc_root=proc_root, fs_root=fs_root, fs=kernel).create("sandgate-a1", LIMITS)
    cgroup.add_process(os.getpid())
    with pytest.raises(CgroupError, match="the runner itself"):
        cgroup.kill_all()
    assert kernel.signals == []
    assert not [w for w in kernel.writes if w[0].endswith("cgroup.kill")]


def test_destroy_kills_removes_and_is_idempotent(scratch):
    kernel, fs_root, proc_root = scratch
    backend = detect(proc_root=proc_root, fs_root=fs_root, fs=kernel)
    cgroup = backend.create("sandgate-a1", LIMITS)
    kernel.mkdir(f"{cgroup.paths[0]}/inner")
    kernel.set_pids(f"{cgroup.paths[0]}/inner", [6001])
    cgroup.add_process(5001)
    cgroup.destroy()
    assert not os.path.exists(cgroup.paths[0])
    assert backend.find("sandgate-a1") is None
    assert backend.list() == []
    cgroup.destroy()


def test_find_and_list(scratch):
    kernel, fs_root, proc_root = scratch
    backend = detect(proc_root=proc_root, fs_root=fs_root, fs=kernel)
    backend.create("sandgate-b2", LIMITS)
    backend.create("sandgate-a1", LIMITS)
    os.mkdir(f"{service_dir(fs_root)}/unrelated")
    assert backend.list() == ["sandgate-a1", "sandgate-b2"]
    found = backend.find("sandgate-b2")
    assert isinstance(found, UnifiedCgroup)
    assert found.paths == [f"{service_dir(fs_root)}/sandgate-b2"]
    assert backend.find("sandgate-zz") is None


# --- pure parsing -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1048576", 1 << 20),
        ("512M", 512 << 20),
        ("512m", 512 << 20),
        ("2G", 2 << 30),
        ("1.5G", 3 << 29),
        ("64MiB", 64 << 20),
        ("64MB", 64 << 20),
        ("4K", 4096),
        (" 1T ", 1 << 40),
        ("100B", 100),
        ("0", 0),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "M", "12X", "-1G", "1.5", "1,5G", "G1", "1e9", "2 GG"])
def test_parse_size_rejects_and_names_the_text(text):
    with pytest.raises(ValueError, match="invalid size") as caught:
        parse_size(text)
    assert repr(text) in str(caught.value)


def test_parse_cpus():
    assert parse_cpus("1.5") == 1.5
    assert parse_cpus("2") == 2.0
    for bad in ("", "abc", "-1", "0", "0.001", "nan", "inf", "1.5cpu"):
        with pytest.raises(ValueError, match=f"invalid cpus {bad!r}"):
            parse_cpus(bad)


def test_limits_reject_nonsense():
    with pytest.raises(ValueError, match="memory"):
        Limits(memory_bytes=100, pids=1, cpus=1.0)
    with pytest.raises(ValueError, match="pids"):
        Limits(memory_bytes=1 << 30, pids=0, cpus=1.0)
    with pytest.raises(ValueError, match="cpus"):
        Limits(memory_bytes=1 << 30, pids=1, cpus=0.0)
    with pytest.raises(ValueError, match="swap"):
        Limits(memory_bytes=1 << 30, pids=1, cpus=1.0, swap_bytes=-1)


def test_default_limits_are_conservative(scratch, tmp_path):
    _, _, proc_root = scratch
    limits = default_limits(proc_root)
    assert limits == Limits(memory_bytes=2 << 30, pids=512, cpus=1.0, swap_bytes=0)
    small = tmp_path / "small"
    small.mkdir()
    (small / "meminfo").write_text("MemTotal:        2000000 kB\n")
    assert default_limits(str(small)).memory_bytes == 2000000 * 1024 // 4 // 4096 * 4096


# --- systemd scopes (a runner that is a systemd service, on v2) ------------------------


class FakeSystemd:
    """Plays systemd's StartTransientUnit: makes the scope under sandgate.slice and moves
    the pid into it, as systemd would; records each call's properties."""

    def __init__(self, kernel: ScratchKernel, fs_root: str, refuse: str | None = None) -> None:
        self.kernel, self.fs_root, self.refuse = kernel, fs_root, refuse
        self.calls: list[dict[str, list[str]]] = []

    def __call__(self, argv: list[str]) -> None:
        assert argv[:7] == [
            "busctl",
            "call",
            "org.freedesktop.systemd1",
            "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager",
            "StartTransientUnit",
            "ssa(sv)a(sa(sv))",
        ]
        unit, mode, count = argv[7], argv[8], int(argv[9])
        assert mode == "fail" and argv[-1] == "0"
        props, rest = {}, argv[10:-1]
        for _ in range(count):
            key, sig = rest[0], rest[1]
            width = 1 + int(rest[2]) if sig.startswith("a") else 1
            props[key] = rest[2 : 2 + width]
            rest = rest[2 + width :]
        assert not rest
        self.calls.append({"unit": [unit], **props})
        if self.refuse:
            raise CgroupError(self.refuse)
        slice_dir = posixpath.join(self.fs_root, "sandgate.slice")
        if not os.path.isdir(slice_dir):
            self.kernel.mkdir(slice_dir)
            self.kernel.plain(
                posixpath.join(slice_dir, "cgroup.subtree_control"), "cpu memory pids"
            )
        scope = posixpath.join(slice_dir, unit)
        self.kernel.mkdir(scope)
        self.kernel.write(posixpath.join(scope, "cgroup.procs"), props["PIDs"][1])


def test_detect_gives_scopes_to_a_systemd_service_only_when_asked(scratch):
    kernel, fs_root, proc_root = scratch
    assert isinstance(
        detect(proc_root, fs_root, fs=kernel, environ={"SANDGATE_CGROUP_SCOPES": "1"}),
        SystemdScopes,
    )
    assert isinstance(
        detect(proc_root, fs_root, fs=kernel, environ={"SANDGATE_CGROUP_SCOPES": "0"}), CgroupV2
    )


def test_a_scope_is_made_around_init_with_the_limits_as_properties(scratch):
    kernel, fs_root, _proc_root = scratch
    systemd = FakeSystemd(kernel, fs_root)
    backend = SystemdScopes(kernel, fs_root, busctl=systemd)
    cgroup = backend.create("sandgate-1a2b3c4d", LIMITS)
    assert not os.path.exists(cgroup.path)  # nothing until there is a process to hold
    cgroup.add_process(777)
    (call,) = systemd.calls
    assert call["unit"] == ["sandgate-1a2b3c4d.scope"]
    assert call["Slice"] == ["sandgate.slice"] and call["Delegate"] == ["true"]
    assert call["PIDs"] == ["1", "777"]
    assert call["MemoryMax"] == [str(512 << 20)] and call["MemorySwapMax"] == ["0"]
    assert call["TasksMax"] == ["64"] and call["CPUQuotaPerSecUSec"] == ["1000000"]
    assert cgroup.dirs == {
        "unified": posixpath.join(fs_root, "sandgate.slice/sandgate-1a2b3c4d.scope")
    }
    assert kernel.pids_in(cgroup.path) == [777]
    assert read(posixpath.join(cgroup.path, "memory.oom.group")) == "1"
    # The service's own cgroup got no controllers: systemd can restart it.
    assert read(posixpath.join(service_dir(fs_root), "cgroup.subtree_control")) == ""
    assert backend.list() == ["sandgate-1a2b3c4d"]
    assert backend.find("sandgate-1a2b3c4d").path == cgroup.path
    cgroup.destroy()
    assert not os.path.exists(cgroup.path) and (777, signal.SIGKILL) in kernel.signals
    assert backend.list() == []


def test_a_scope_systemd_refuses_is_an_error_naming_it(scratch):
    kernel, fs_root, _proc_root = scratch
    backend = SystemdScopes(kernel, fs_root, busctl=FakeSystemd(kernel, fs_root, "Access denied"))
    cgroup = backend.create("sandgate-1a2b3c4d", LIMITS)
    with pytest.raises(CgroupError, match="Access denied"):
        cgroup.add_process(777)
