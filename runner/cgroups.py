"""Cgroup limits for sandboxes: memory (swap 0), pids and cpu, on cgroup v2 or v1.

Owns: finding which cgroup hierarchy the host offers (`detect`), creating one
cgroup named `sandgate-<id>` per sandbox beneath the runner's own cgroup,
joining processes into it, reading OOM kills and peak memory, killing
everything inside and removing it. Nothing here writes to a cgroup it did not
create, except moving processes into cgroups it did create and, on v2,
enabling controllers in the runner's own (delegated) cgroup.

v2 (one unified hierarchy): the "no internal processes" rule forbids enabling
controllers for children of a cgroup that holds processes. Under systemd with
Delegate=yes the service starts inside its own cgroup, so, like other
delegated services, the runner moves the processes of its cgroup into a leaf
`<own>/runner` the first time it creates a sandbox, then enables
+memory +pids +cpu in `<own>/cgroup.subtree_control`. Sandbox cgroups are
siblings of that leaf. A later `detect` that finds itself in `<own>/runner`
uses `<own>` as the base again.

A runner that is a systemd service on v2 (the daemon) uses SystemdScopes instead:
each sandbox is a transient scope in sandgate.slice, made by systemd around init, so
no sandbox cgroup lies beneath the service and systemd can restart it (before
systemd 254 it cannot start a main process in a cgroup with controllers enabled for
children).

v1 (one hierarchy per controller): a sandbox cgroup is one directory in each
of the memory, pids and cpu hierarchies (and freezer when it is mounted),
each beneath the runner's own cgroup in that hierarchy.

Every read, write, mkdir, rmdir and signal goes through `CgroupFS`, so the
logic runs unchanged against a scratch directory laid out like cgroupfs,
with a test subclass playing the kernel's part.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import posixpath
import re
import signal
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from decimal import Decimal

log = logging.getLogger(__name__)

CPU_PERIOD_US = 100_000
RUNNER_LEAF = "runner"
NAME_PREFIX = "sandgate-"
REQUIRED_CONTROLLERS = ("memory", "pids", "cpu")
KILL_TIMEOUT_S = 10.0

_NAME_RE = re.compile(r"sandgate-[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:([KMGT])(?:i?B)?|B)?", re.IGNORECASE)
_CPUS_RE = re.compile(r"\d+(?:\.\d+)?")
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_ERRNO_HINTS = {
    errno.EACCES: "the runner needs root, or a cgroup delegated to it (systemd Delegate=yes)",
    errno.EPERM: "the runner needs root, or a cgroup delegated to it (systemd Delegate=yes)",
    errno.ENOENT: "the kernel does not offer this file: controller not enabled, or kernel too old",
    errno.EBUSY: "the cgroup still holds processes or child cgroups",
    errno.EINVAL: "the kernel rejected the value",
    errno.ENOSPC: "the cgroup hierarchy is at cgroup.max.descendants or cgroup.max.depth",
}


class CgroupError(Exception):
    """A cgroup operation failed; the message names the file, the errno and what to check."""


class _Unusable(Exception):
    """One backend cannot be used on this host; the message says why."""


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandbox."""

    memory_bytes: int  # v2 memory.max; v1 memory.limit_in_bytes
    pids: int  # pids.max
    cpus: float  # v2 cpu.max "quota period"; v1 cpu.cfs_quota_us / cpu.cfs_period_us
    swap_bytes: int = 0  # v2 memory.swap.max; v1 memory.memsw.limit_in_bytes - memory

    def __post_init__(self) -> None:
        if self.memory_bytes < 1 << 20:
            raise ValueError(f"memory limit {self.memory_bytes} bytes: must be at least 1M")
        if self.pids < 1:
            raise ValueError(f"pids limit {self.pids}: must be at least 1")
        if not 0.01 <= self.cpus <= 4096:
            raise ValueError(f"cpus {self.cpus}: must be between 0.01 and 4096")
        if self.swap_bytes < 0:
            raise ValueError(f"swap limit {self.swap_bytes} bytes: must not be negative")

    @property
    def cpu_quota_us(self) -> int:
        return round(self.cpus * CPU_PERIOD_US)


def default_limits(proc_root: str = "/proc") -> Limits:
    """Conservative limits: 512 pids, min(2 GiB, 25% of MemTotal) memory, 1 cpu, no swap."""
    meminfo = posixpath.join(proc_root, "meminfo")
    with open(meminfo) as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == "MemTotal":
                total = int(value.split()[0]) * 1024
                break
        else:
            raise CgroupError(f"{meminfo} has no MemTotal line")
    memory = min(2 << 30, total // 4) // 4096 * 4096
    return Limits(memory_bytes=memory, pids=512, cpus=1.0, swap_bytes=0)


def parse_size(text: str) -> int:
    """'512M', '2G', '1.5G', '1048576' -> bytes. K, M, G, T are powers of 1024."""
    match = _SIZE_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"invalid size {text!r}: expected a number with an optional K, M, G or T suffix,"
            " e.g. '512M' or '1.5G'"
        )
    number, unit = match.group(1), (match.group(2) or "").upper()
    if "." in number and not unit:
        raise ValueError(f"invalid size {text!r}: a fraction needs a unit, e.g. '1.5G'")
    return int(Decimal(number) * _SIZE_UNITS[unit])


def parse_cpus(text: str) -> float:
    """'1.5' -> 1.5 cpus; between 0.01 (the kernel's 1 ms quota floor) and 4096."""
    if _CPUS_RE.fullmatch(text.strip()) is None:
        raise ValueError(f"invalid cpus {text!r}: expected a number such as '1' or '0.5'")
    cpus = float(text.strip())
    if not 0.01 <= cpus <= 4096:
        raise ValueError(f"invalid cpus {text!r}: must be between 0.01 and 4096")
    return cpus


class CgroupFS:
    """The only code that touches cgroupfs or signals processes.

    Writes never create files: on cgroupfs a missing file means the kernel lacks
    the knob, and that must be an error, not a new regular file.
    """

    def read(self, path: str) -> str:
        with open(path) as f:
            return f.read()

    def write(self, path: str, text: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def is_dir(self, path: str) -> bool:
        return os.path.isdir(path)

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def mkdir(self, path: str) -> None:
        os.mkdir(path, 0o755)

    def rmdir(self, path: str) -> None:
        os.rmdir(path)

    def kill(self, pid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


@dataclass(frozen=True)
class CgroupBackendInfo:
    """What `detect` found: version, mount point(s), and where sandbox cgroups go.

    On v1 `root` and `base` list one path per hierarchy, separated by ", ".
    """

    version: int
    root: str
    base: str


# --- small effects with actionable errors -------------------------------------------------


def _explain(action: str, path: str, e: OSError) -> CgroupError:
    code = errno.errorcode.get(e.errno or 0, str(e.errno))
    hint = _ERRNO_HINTS.get(e.errno or 0, "")
    return CgroupError(
        f"cannot {action} {path}: {e.strerror or e} ({code})" + (f"; {hint}" if hint else "")
    )


def _read(fs: CgroupFS, path: str) -> str:
    try:
        return fs.read(path)
    except OSError as e:
        raise _explain("read", path, e) from e


def _write(fs: CgroupFS, path: str, text: str) -> None:
    try:
        fs.write(path, text)
    except OSError as e:
        raise _explain(f"write {text!r} to", path, e) from e


def _read_pids(fs: CgroupFS, path: str) -> list[int]:
    """The pids in one cgroup.procs; an empty list if the cgroup vanished meanwhile."""
    try:
        return [int(line) for line in fs.read(path).split()]
    except FileNotFoundError:
        return []
    except OSError as e:
        raise _explain("read", path, e) from e


def _read_keyed(fs: CgroupFS, path: str) -> dict[str, int]:
    """A flat-keyed cgroup file ('oom_kill 3' per line) as a dict."""
    fields: dict[str, int] = {}
    for line in _read(fs, path).splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            fields[key] = int(value)
    return fields


def _tree(fs: CgroupFS, path: str) -> list[str]:
    """`path` and every cgroup beneath it, deepest first (the order rmdir needs)."""
    try:
        entries = fs.listdir(path)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise _explain("list", path, e) from e
    found: list[str] = []
    for entry in sorted(entries):
        child = posixpath.join(path, entry)
        if fs.is_dir(child):
            found.extend(_tree(fs, child))
    found.append(path)
    return found


def _under(mount: str, cgroup_path: str) -> str:
    """A path from /proc/self/cgroup, placed under the mount of its hierarchy."""
    parts = [p for p in cgroup_path.split("/") if p]
    if ".." in parts:
        raise _Unusable(
            f"own cgroup {cgroup_path!r} lies outside this cgroup namespace's mount at {mount}"
        )
    return posixpath.join(mount, *parts) if parts else mount


def _check_name(name: str) -> None:
    if _NAME_RE.fullmatch(name) is None:
        raise ValueError(
            f"invalid sandbox cgroup name {name!r}: must be 'sandgate-' followed by up to 64"
            " letters, digits, '_' or '-'"
        )


def _own_cgroups(fs: CgroupFS, proc_root: str) -> dict[str, tuple[tuple[str, ...], str]]:
    """/proc/self/cgroup as controller -> (controllers of its hierarchy, own path).

    The v2 line is under the key ''; co-mounted v1 controllers (cpu,cpuacct) share a tuple.
    """
    own: dict[str, tuple[tuple[str, ...], str]] = {}
    for line in _read(fs, posixpath.join(proc_root, "self", "cgroup")).splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        controllers = tuple(fields[1].split(",")) if fields[1] else ("",)
        for controller in controllers:
            own[controller] = (controllers, fields[2])
    return own


# --- sandbox cgroups ----------------------------------------------------------------------


class Cgroup(ABC):
    """One sandbox's cgroup: one directory on v2, one per hierarchy on v1."""

    def __init__(self, fs: CgroupFS, name: str, paths: list[str]) -> None:
        self.name = name
        self.paths = paths
        self.notes: list[str] = []  # limits the kernel could not apply, for the sandbox's status
        self._fs = fs

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.paths!r})"

    def add_process(self, pid: int) -> None:
        """Move `pid` (all its threads) into this cgroup, in every hierarchy."""
        for path in self.paths:
            _write(self._fs, posixpath.join(path, "cgroup.procs"), str(pid))

    def procs(self) -> list[int]:
        """Every process in this cgroup and the cgroups beneath it."""
        found: set[int] = set()
        for path in self.paths:
            for cgroup in _tree(self._fs, path):
                found.update(_read_pids(self._fs, posixpath.join(cgroup, "cgroup.procs")))
        return sorted(found)

    @abstractmethod
    def kill_all(self, timeout: float = KILL_TIMEOUT_S) -> None:
        """SIGKILL every process inside, and wait until none is left."""

    @abstractmethod
    def oom_killed(self) -> bool:
        """Whether the kernel's OOM killer killed a process in this cgroup."""

    @abstractmethod
    def peak_memory(self) -> int | None:
        """The highest memory use recorded, in bytes; None where the kernel does not record it."""

    def destroy(self, timeout: float = KILL_TIMEOUT_S) -> None:
        """Kill everything inside, then remove the directories. Idempotent."""
        if not any(self._fs.exists(path) for path in self.paths):
            return
        self.kill_all(timeout)
        deadline = time.monotonic() + timeout
        for path in self.paths:
            for cgroup in _tree(self._fs, path):
                self._rmdir(cgroup, deadline)

    def _rmdir(self, path: str, deadline: float) -> None:
        delay = 0.005
        while True:
            try:
                self._fs.rmdir(path)
                return
            except FileNotFoundError:
                return
            except OSError as e:
                # EBUSY while killed tasks finish exiting; anything else will not go away.
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    left = _read_pids(self._fs, posixpath.join(path, "cgroup.procs"))
                    raise CgroupError(
                        f"{_explain('remove', path, e)}; processes still inside: {left or 'none'}"
                    ) from e
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _refuse_self(self, pids: list[int]) -> None:
        if os.getpid() in pids:
            raise CgroupError(
                f"refusing to kill cgroup {self.name}: the runner itself (pid {os.getpid()}) is"
                f" inside {self.paths}"
            )

    def _signal_until_empty(
        self, deadline: float, timeout: float, freeze: bool, thaw_each_round: bool
    ) -> None:
        """SIGKILL whatever is listed until nothing is; freezing first stops a fork bomb
        from outrunning the loop."""
        delay = 0.005
        while True:
            pids = self.procs()
            if not pids:
                return
            self._refuse_self(pids)
            if time.monotonic() > deadline:
                raise self._survivors(pids, timeout)
            if freeze:
                self._freeze(True)
            for pid in self.procs():
                self._fs.kill(pid, signal.SIGKILL)
            if freeze and thaw_each_round:
                self._freeze(False)
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _wait_empty(self, deadline: float, timeout: float) -> None:
        delay = 0.005
        while pids := self.procs():
            if time.monotonic() > deadline:
                raise self._survivors(pids, timeout)
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _survivors(self, pids: list[int], timeout: float) -> CgroupError:
        return CgroupError(
            f"processes {pids} in cgroup {self.name} ({', '.join(self.paths)}) survived SIGKILL"
            f" for {timeout:g}s; they are probably in uninterruptible sleep (D state): check"
            f" `ps -o pid,stat,wchan -p {','.join(map(str, pids))}`"
        )

    @abstractmethod
    def _freeze(self, frozen: bool) -> None:
        """Freeze or thaw every process inside (called only where a freezer exists)."""


class UnifiedCgroup(Cgroup):
    """A sandbox cgroup on v2: one directory in the unified hierarchy."""

    @property
    def dirs(self) -> dict[str, str]:
        return {"unified": self.path}

    @property
    def path(self) -> str:
        return self.paths[0]

    def _file(self, name: str) -> str:
        return posixpath.join(self.path, name)

    def apply(self, limits: Limits) -> None:
        """Write every limit; a knob the kernel lacks is noted, unless it is essential."""
        fs = self._fs
        _write(fs, self._file("memory.max"), str(limits.memory_bytes))
        if fs.exists(self._file("memory.swap.max")):
            _write(fs, self._file("memory.swap.max"), str(limits.swap_bytes))
        else:
            self._note(
                "swap accounting is off (no memory.swap.max): the sandbox may swap beyond its"
                " memory limit; enable CONFIG_MEMCG_SWAP / boot with swapaccount=1"
            )
        # oom.group: an OOM kills the whole sandbox, not one process that leaves the rest broken.
        if fs.exists(self._file("memory.oom.group")):
            _write(fs, self._file("memory.oom.group"), "1")
        else:
            self._note("no memory.oom.group (kernel < 4.19): an OOM kills single processes")
        _write(fs, self._file("pids.max"), str(limits.pids))
        _write(fs, self._file("cpu.max"), f"{limits.cpu_quota_us} {CPU_PERIOD_US}")

    def _note(self, text: str) -> None:
        log.warning("cgroup %s: %s", self.name, text)
        self.notes.append(text)

    def kill_all(self, timeout: float = KILL_TIMEOUT_S) -> None:
        if not self._fs.exists(self.path):
            return
        deadline = time.monotonic() + timeout
        self._refuse_self(self.procs())
        if self._fs.exists(self._file("cgroup.kill")):
            # cgroup.kill (5.14+) kills the subtree atomically, forks in flight included.
            _write(self._fs, self._file("cgroup.kill"), "1")
            self._wait_empty(deadline, timeout)
            return
        freeze = self._fs.exists(self._file("cgroup.freeze"))
        try:
            # v2 frozen tasks still die on SIGKILL, so the cgroup stays frozen throughout.
            self._signal_until_empty(deadline, timeout, freeze=freeze, thaw_each_round=False)
        finally:
            if freeze and self._fs.exists(self.path):
                self._freeze(False)

    def _freeze(self, frozen: bool) -> None:
        _write(self._fs, self._file("cgroup.freeze"), "1" if frozen else "0")

    def oom_killed(self) -> bool:
        return _read_keyed(self._fs, self._file("memory.events")).get("oom_kill", 0) > 0

    def peak_memory(self) -> int | None:
        if not self._fs.exists(self._file("memory.peak")):
            return None  # memory.peak arrived in 5.19
        return int(_read(self._fs, self._file("memory.peak")))


class LegacyCgroup(Cgroup):
    """A sandbox cgroup on v1: one directory per hierarchy (memory, pids, cpu, freezer)."""

    def __init__(self, fs: CgroupFS, name: str, dirs: dict[str, str]) -> None:
        super().__init__(fs, name, list(dict.fromkeys(dirs.values())))
        self.dirs = dirs  # controller -> directory; co-mounted controllers share one

    def _file(self, controller: str, name: str) -> str:
        if controller not in self.dirs:
            raise CgroupError(f"cgroup {self.name} has no {controller} directory: {self.paths}")
        return posixpath.join(self.dirs[controller], name)

    def apply(self, limits: Limits) -> None:
        fs = self._fs
        memory = self._file("memory", "memory.limit_in_bytes")
        memsw = self._file("memory", "memory.memsw.limit_in_bytes")
        if fs.exists(memsw):
            total = str(limits.memory_bytes + limits.swap_bytes)
            # The kernel keeps memsw >= memory, so the order depends on which way we move.
            try:
                fs.write(memory, str(limits.memory_bytes))
                _write(fs, memsw, total)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise _explain(f"write {limits.memory_bytes} to", memory, e) from e
                _write(fs, memsw, total)
                _write(fs, memory, str(limits.memory_bytes))
        else:
            _write(fs, memory, str(limits.memory_bytes))
            text = (
                "swap accounting is off (no memory.memsw.limit_in_bytes): the sandbox may swap"
                " beyond its memory limit; boot with swapaccount=1 to limit swap"
            )
            log.warning("cgroup %s: %s", self.name, text)
            self.notes.append(text)
        _write(fs, self._file("pids", "pids.max"), str(limits.pids))
        _write(fs, self._file("cpu", "cpu.cfs_period_us"), str(CPU_PERIOD_US))
        _write(fs, self._file("cpu", "cpu.cfs_quota_us"), str(limits.cpu_quota_us))

    def kill_all(self, timeout: float = KILL_TIMEOUT_S) -> None:
        if not any(self._fs.exists(path) for path in self.paths):
            return
        deadline = time.monotonic() + timeout
        freeze = "freezer" in self.dirs and self._fs.exists(self.dirs["freezer"])
        try:
            # v1 frozen tasks act on SIGKILL only once thawed: freeze, kill, thaw, each round.
            self._signal_until_empty(deadline, timeout, freeze=freeze, thaw_each_round=True)
        finally:
            if freeze and self._fs.exists(self.dirs["freezer"]):
                self._freeze(False)

    def _freeze(self, frozen: bool) -> None:
        state = self._file("freezer", "freezer.state")
        _write(self._fs, state, "FROZEN" if frozen else "THAWED")
        if not frozen:
            return
        # FREEZING can last while a task sits in the kernel; kill it anyway after a moment.
        deadline = time.monotonic() + 0.5
        while _read(self._fs, state).strip() != "FROZEN" and time.monotonic() < deadline:
            time.sleep(0.005)

    def oom_killed(self) -> bool:
        control = _read_keyed(self._fs, self._file("memory", "memory.oom_control"))
        if "oom_kill" in control:
            return control["oom_kill"] > 0
        # Kernels before 4.13 do not count kills: a hit limit is the closest evidence.
        failcnt = int(_read(self._fs, self._file("memory", "memory.failcnt")))
        return control.get("under_oom", 0) == 1 or failcnt > 0

    def peak_memory(self) -> int | None:
        return int(_read(self._fs, self._file("memory", "memory.max_usage_in_bytes")))


# --- backends -----------------------------------------------------------------------------


class Backend(ABC):
    """Creates, finds and lists sandbox cgroups beneath the runner's own cgroup."""

    version: int
    info: CgroupBackendInfo

    @abstractmethod
    def create(self, name: str, limits: Limits) -> Cgroup:
        """Create (or reuse, if it exists and is empty) the cgroup `name`, with `limits`."""

    @abstractmethod
    def find(self, name: str) -> Cgroup | None:
        """The existing cgroup `name`, or None."""

    @abstractmethod
    def list(self) -> list[str]:
        """Names of the sandgate-* cgroups under our base, for reconciliation."""


class CgroupV2(Backend):
    """The unified hierarchy; sandbox cgroups go in `base`, the runner's own cgroup."""

    version = 2

    def __init__(self, fs: CgroupFS, root: str, base: str) -> None:
        self._fs = fs
        self._root = root
        self._base = base
        self.info = CgroupBackendInfo(version=2, root=root, base=base)

    def __repr__(self) -> str:
        return f"CgroupV2(root={self._root!r}, base={self._base!r})"

    @classmethod
    def probe(
        cls, fs: CgroupFS, own: dict[str, tuple[tuple[str, ...], str]], fs_root: str
    ) -> CgroupV2:
        root = next(
            (
                candidate
                for candidate in (fs_root, posixpath.join(fs_root, "unified"))
                if fs.exists(posixpath.join(candidate, "cgroup.controllers"))
            ),
            None,
        )
        if root is None:
            raise _Unusable(f"no unified hierarchy (no cgroup.controllers in {fs_root}[/unified])")
        if "" not in own:
            raise _Unusable("/proc/self/cgroup has no '0::' line for the unified hierarchy")
        own_path = own[""][1]
        if posixpath.basename(own_path) == RUNNER_LEAF:
            own_path = posixpath.dirname(own_path)  # we moved ourselves there earlier
        base = _under(root, own_path)
        controllers_file = posixpath.join(base, "cgroup.controllers")
        if not fs.exists(controllers_file):
            raise _Unusable(f"own cgroup {own_path} not found at {base}")
        offered = _read(fs, controllers_file).split()
        missing = [c for c in REQUIRED_CONTROLLERS if c not in offered]
        if missing:
            raise _Unusable(
                f"{controllers_file} offers {' '.join(offered) or 'no controllers'}, missing"
                f" {' '.join(missing)} (bound to v1 hierarchies, or not delegated to this cgroup)"
            )
        return cls(fs, root, base)

    def create(self, name: str, limits: Limits) -> Cgroup:
        _check_name(name)
        self._enable_controllers()
        path = posixpath.join(self._base, name)
        cgroup = UnifiedCgroup(self._fs, name, [path])
        created = not self._fs.exists(path)
        if created:
            try:
                self._fs.mkdir(path)
            except OSError as e:
                raise _explain("create", path, e) from e
        elif busy := cgroup.procs():
            raise CgroupError(
                f"{path} already exists with processes {busy}: sandbox {name} is still running"
            )
        try:
            cgroup.apply(limits)
        except BaseException:
            if created:
                cgroup.destroy()
            raise
        return cgroup

    def _enable_controllers(self) -> None:
        control = posixpath.join(self._base, "cgroup.subtree_control")
        enabled = _read(self._fs, control).split()
        missing = [c for c in REQUIRED_CONTROLLERS if c not in enabled]
        if not missing:
            return
        if self._base != self._root and _read_pids(
            self._fs, posixpath.join(self._base, "cgroup.procs")
        ):
            self._move_into_leaf()
        try:
            self._fs.write(control, " ".join(f"+{c}" for c in missing))
        except OSError as e:
            raise CgroupError(
                f"{_explain('enable ' + ' '.join(missing) + ' in', control, e)}. Run the runner"
                " in a cgroup of its own: the systemd unit with Delegate=yes, or"
                " `systemd-run --scope -p Delegate=yes sandgate ...`"
            ) from e

    def _move_into_leaf(self) -> None:
        """Obey "no internal processes": move every process of our cgroup into a leaf."""
        leaf = posixpath.join(self._base, RUNNER_LEAF)
        if not self._fs.exists(leaf):
            try:
                self._fs.mkdir(leaf)
            except OSError as e:
                raise _explain("create", leaf, e) from e
        procs = posixpath.join(self._base, "cgroup.procs")
        deadline = time.monotonic() + 2.0
        moved = 0
        while pids := _read_pids(self._fs, procs):
            if time.monotonic() > deadline:
                raise CgroupError(
                    f"processes {pids} keep appearing in {self._base} while moving them into"
                    f" {leaf}; controllers cannot be enabled while it holds processes"
                )
            for pid in pids:
                try:
                    self._fs.write(posixpath.join(leaf, "cgroup.procs"), str(pid))
                    moved += 1
                except ProcessLookupError:
                    pass  # exited meanwhile
                except OSError as e:
                    raise _explain(f"move pid {pid} into", leaf, e) from e
        log.info(
            "moved %d processes of %s into %s so that controllers can be enabled"
            " (cgroup v2 allows no processes in a cgroup whose children have controllers)",
            moved,
            self._base,
            leaf,
        )

    def find(self, name: str) -> Cgroup | None:
        _check_name(name)
        path = posixpath.join(self._base, name)
        return UnifiedCgroup(self._fs, name, [path]) if self._fs.is_dir(path) else None

    def list(self) -> list[str]:
        return sorted(
            entry
            for entry in self._fs.listdir(self._base)
            if _NAME_RE.fullmatch(entry) and self._fs.is_dir(posixpath.join(self._base, entry))
        )


SCOPE_SLICE = "sandgate.slice"
SCOPE_WAIT_S = 5.0


def scope_unit(name: str) -> str:
    return f"{name}.scope"


def start_transient_scope_argv(name: str, pid: int, limits: Limits) -> list[str]:
    """busctl's call of systemd's StartTransientUnit for one sandbox: a scope in
    sandgate.slice holding `pid`, delegated, with the limits as systemd properties."""
    props: list[tuple[str, str, list[str]]] = [
        ("Description", "s", [f"sandgate sandbox {name.removeprefix(NAME_PREFIX)}"]),
        ("Slice", "s", [SCOPE_SLICE]),
        ("Delegate", "b", ["true"]),
        ("CollectMode", "s", ["inactive-or-failed"]),
        ("PIDs", "au", ["1", str(pid)]),
        ("MemoryMax", "t", [str(limits.memory_bytes)]),
        ("MemorySwapMax", "t", [str(limits.swap_bytes)]),
        ("TasksMax", "t", [str(limits.pids)]),
        ("CPUQuotaPerSecUSec", "t", [str(round(limits.cpus * 1_000_000))]),
    ]
    argv = [
        "busctl",
        "call",
        "org.freedesktop.systemd1",
        "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager",
        "StartTransientUnit",
        "ssa(sv)a(sa(sv))",
        scope_unit(name),
        "fail",
        str(len(props)),
    ]
    for key, signature, values in props:
        argv += [key, signature, *values]
    return [*argv, "0"]


def _busctl(argv: list[str]) -> None:
    import subprocess

    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CgroupError(f"cannot ask systemd for a scope ({argv[5]}): {e}") from e
    if done.returncode != 0:
        raise CgroupError(
            f"systemd refused the scope {argv[7]}: {done.stderr.strip() or done.stdout.strip()}"
        )


class ScopeCgroup(UnifiedCgroup):
    """A sandbox cgroup that is a systemd scope (sandgate.slice/sandgate-<id>.scope).

    Under systemd on cgroup v2, a service whose cgroup has children with controllers
    cannot be restarted before systemd 254 (the new main process may not join an
    inner cgroup): so the daemon's sandboxes live in scopes of their own, outside the
    service, and outlive its restarts. The scope is made when init joins it
    (add_process): systemd makes a scope only around a process."""

    def __init__(self, fs: CgroupFS, name: str, path: str, limits: Limits, busctl=None) -> None:
        super().__init__(fs, name, [path])
        self._limits = limits
        self._busctl = busctl or _busctl

    def add_process(self, pid: int) -> None:
        self._busctl(start_transient_scope_argv(self.name, pid, self._limits))
        procs = posixpath.join(self.path, "cgroup.procs")
        deadline = time.monotonic() + SCOPE_WAIT_S
        while not (self._fs.exists(procs) and pid in _read_pids(self._fs, procs)):
            if time.monotonic() > deadline:
                raise CgroupError(
                    f"systemd accepted the scope {scope_unit(self.name)} but pid {pid} is "
                    f"not in {self.path} after {SCOPE_WAIT_S:g}s"
                )
            time.sleep(0.002)
        # What systemd has no property for: an OOM kills the whole sandbox.
        if self._fs.exists(self._file("memory.oom.group")):
            with contextlib.suppress(OSError):
                self._fs.write(self._file("memory.oom.group"), "1")

    def apply(self, limits: Limits) -> None:
        self._limits = limits  # given to systemd with the scope


class SystemdScopes(Backend):
    """cgroup v2 under systemd, for a runner that is itself a systemd service: each
    sandbox is a transient scope in sandgate.slice (ScopeCgroup)."""

    version = 2

    def __init__(self, fs: CgroupFS, root: str, busctl=None) -> None:
        self._fs = fs
        self._root = root
        self._slice = posixpath.join(root, SCOPE_SLICE)
        self._busctl = busctl
        self.info = CgroupBackendInfo(version=2, root=root, base=self._slice)

    def __repr__(self) -> str:
        return f"SystemdScopes(slice={self._slice!r})"

    def _path(self, name: str) -> str:
        return posixpath.join(self._slice, scope_unit(name))

    def create(self, name: str, limits: Limits) -> Cgroup:
        _check_name(name)
        path = self._path(name)
        if self._fs.exists(path) and (
            busy := _read_pids(self._fs, posixpath.join(path, "cgroup.procs"))
        ):
            raise CgroupError(f"{path} already holds processes {busy}: sandbox {name} still runs")
        return ScopeCgroup(self._fs, name, path, limits, self._busctl)

    def find(self, name: str) -> Cgroup | None:
        _check_name(name)
        path = self._path(name)
        return UnifiedCgroup(self._fs, name, [path]) if self._fs.is_dir(path) else None

    def list(self) -> list[str]:
        if not self._fs.is_dir(self._slice):
            return []
        return sorted(
            entry.removesuffix(".scope")
            for entry in self._fs.listdir(self._slice)
            if entry.endswith(".scope") and _NAME_RE.fullmatch(entry.removesuffix(".scope"))
        )


def _want_scopes(environ) -> bool:
    """Scopes for a systemd service (INVOCATION_ID) on a systemd host with busctl;
    SANDGATE_CGROUP_SCOPES=0 turns them off, =1 forces them."""
    import shutil

    forced = environ.get("SANDGATE_CGROUP_SCOPES")
    if forced in ("0", "1"):
        return forced == "1"
    return (
        bool(environ.get("INVOCATION_ID"))
        and os.path.isdir("/run/systemd/system")
        and shutil.which("busctl") is not None
    )


class CgroupV1(Backend):
    """Separate memory, pids and cpu (and optional freezer) hierarchies."""

    version = 1

    def __init__(self, fs: CgroupFS, mounts: dict[str, str], bases: dict[str, str]) -> None:
        self._fs = fs
        self._bases = bases  # controller -> the runner's own cgroup directory in its hierarchy
        self.info = CgroupBackendInfo(
            version=1,
            root=", ".join(dict.fromkeys(mounts.values())),
            base=", ".join(dict.fromkeys(bases.values())),
        )

    def __repr__(self) -> str:
        return f"CgroupV1(bases={self._bases!r})"

    @classmethod
    def probe(
        cls, fs: CgroupFS, own: dict[str, tuple[tuple[str, ...], str]], fs_root: str
    ) -> CgroupV1:
        mounts: dict[str, str] = {}
        bases: dict[str, str] = {}
        problems: list[str] = []
        for controller in (*REQUIRED_CONTROLLERS, "freezer"):
            if controller not in own:
                problems.append(f"{controller}: not a v1 hierarchy in /proc/self/cgroup")
                continue
            # cpu,cpuacct is mounted at cpu,cpuacct with a symlink cpu; some hosts have only one.
            candidates = list(
                dict.fromkeys(
                    posixpath.join(fs_root, name)
                    for name in (",".join(own[controller][0]), controller)
                )
            )
            mount = next(
                (c for c in candidates if fs.exists(posixpath.join(c, "cgroup.procs"))), None
            )
            if mount is None:
                problems.append(f"{controller}: no hierarchy mounted at {' or '.join(candidates)}")
                continue
            try:
                base = _under(mount, own[controller][1])
            except _Unusable as e:
                problems.append(f"{controller}: {e}")
                continue
            if not fs.exists(posixpath.join(base, "cgroup.procs")):
                problems.append(
                    f"{controller}: own cgroup {own[controller][1]} not found at {base}"
                )
                continue
            mounts[controller], bases[controller] = mount, base
        missing = [p for p in problems if p.split(":")[0] in REQUIRED_CONTROLLERS]
        if missing:
            raise _Unusable("; ".join(missing))
        for problem in problems:
            log.info(
                "cgroup v1 without freezer (%s): killing falls back to a SIGKILL loop", problem
            )
        return cls(fs, mounts, bases)

    def _dirs(self, name: str) -> dict[str, str]:
        return {c: posixpath.join(base, name) for c, base in self._bases.items()}

    def create(self, name: str, limits: Limits) -> Cgroup:
        _check_name(name)
        dirs = self._dirs(name)
        cgroup = LegacyCgroup(self._fs, name, dirs)
        if busy := cgroup.procs():
            raise CgroupError(
                f"{', '.join(cgroup.paths)} already exist with processes {busy}: sandbox {name}"
                " is still running"
            )
        created: list[str] = []
        try:
            for path in cgroup.paths:
                if not self._fs.exists(path):
                    try:
                        self._fs.mkdir(path)
                    except OSError as e:
                        raise _explain("create", path, e) from e
                    created.append(path)
            cgroup.apply(limits)
        except BaseException:
            if created:
                LegacyCgroup(
                    self._fs, name, {c: d for c, d in dirs.items() if d in created}
                ).destroy()
            raise
        return cgroup

    def find(self, name: str) -> Cgroup | None:
        _check_name(name)
        # A crash between mkdirs can leave some hierarchies only: return those, to remove them.
        dirs = {c: d for c, d in self._dirs(name).items() if self._fs.is_dir(d)}
        return LegacyCgroup(self._fs, name, dirs) if dirs else None

    def list(self) -> list[str]:
        names: set[str] = set()
        for base in dict.fromkeys(self._bases.values()):
            names.update(
                entry
                for entry in self._fs.listdir(base)
                if _NAME_RE.fullmatch(entry) and self._fs.is_dir(posixpath.join(base, entry))
            )
        return sorted(names)


def cgroup_at(name: str, dirs: dict[str, str], fs: CgroupFS | None = None) -> Cgroup | None:
    """The cgroup a sandbox record names by its directories ({"unified": path} on v2,
    controller -> directory on v1), or None when none of them exists any more.

    The runner's own cgroup can differ between the process that created a sandbox and
    the one removing it, so removal goes by the recorded directories, not by `find`.
    """
    _check_name(name)
    fs = fs or CgroupFS()
    present = {c: d for c, d in dirs.items() if fs.is_dir(d)}
    if not present:
        return None
    if "unified" in present:
        return UnifiedCgroup(fs, name, [present["unified"]])
    return LegacyCgroup(fs, name, present)


def detect(
    proc_root: str = "/proc",
    fs_root: str = "/sys/fs/cgroup",
    *,
    fs: CgroupFS | None = None,
    environ=None,
) -> Backend:
    """The cgroup backend this host offers: v2 if the unified hierarchy gives the runner's
    cgroup memory, pids and cpu; else v1 if those three hierarchies are mounted."""
    fs = fs or CgroupFS()
    own = _own_cgroups(fs, proc_root)
    problems: list[str] = []
    try:
        v2 = CgroupV2.probe(fs, own, fs_root)
        if _want_scopes(environ if environ is not None else os.environ):
            return SystemdScopes(fs, v2.info.root)
        return v2
    except _Unusable as e:
        problems.append(f"cgroup v2: {e}")
    try:
        return CgroupV1.probe(fs, own, fs_root)
    except _Unusable as e:
        problems.append(f"cgroup v1: {e}")
    raise CgroupError(
        "no usable cgroup hierarchy for memory, pids and cpu limits:\n  "
        + "\n  ".join(problems)
        + f"\nCheck `cat {proc_root}/self/cgroup` and `grep cgroup {proc_root}/self/mountinfo`;"
        " a sandbox is not started without these limits."
    )
