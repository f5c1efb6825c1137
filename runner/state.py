"""Sandbox records on disk: one JSON file per sandbox, written atomically.

A record is what the kernel cannot tell us (creation time, command, policy name);
everything else about a sandbox is re-derived from the kernel by its id, so a lost
or stale record never leaves objects that cannot be found and removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path


class StateError(Exception):
    pass


@dataclass(frozen=True)
class SandboxRecord:
    id: str
    netns: str
    host_ifname: str
    gateway_addr: str
    sandbox_addr: str
    gateway_port: int
    created_at: float
    policy: str
    command: tuple[str, ...] = ()
    pid: int | None = None
    # The sandbox's cgroup directories: {"unified": path} (v2) or controller -> dir (v1).
    cgroup: dict[str, str] = field(default_factory=dict)
    # "creating" from the moment its id is taken (before any kernel object exists),
    # "ready" once every object is in place: a crash in between leaves a record that
    # says whose the objects are, so reconciling never guesses. "removing" once its
    # removal began: it has no owner any more, and a crash mid-way is finished by the
    # next reconcile (and never restored, nor repaired by the drift watch).
    state: str = "ready"
    # Who keeps it alive: "run" (a `sandgate run` process, owner_pid) or "daemon"
    # (`sandgate serve`; once ready, its resident init, init_pid, keeps it).
    owner: str = "run"
    owner_pid: int | None = None
    owner_start: int | None = None  # /proc/PID/stat starttime: tells pid reuse apart
    init_pid: int | None = None
    init_start: int | None = None
    creator_uid: int = 0
    expires_at: float | None = None  # wall clock (time.time()) of its --timeout
    # The daemon's create request (checked), with the policy text it used: enough to
    # rebuild the sandbox's gateway endpoint after a restart.
    request: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        d["command"] = list(self.command)
        return d

    @classmethod
    def from_json(cls, d: dict) -> SandboxRecord:
        d = dict(d)
        d["command"] = tuple(d.get("command", ()))
        return cls(**d)


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of a process (clock ticks since boot), or None if there
    is no such process. A pid plus its start time names one process for good."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return int(fields[19])


def process_alive(pid: int | None, start: int | None) -> bool:
    if pid is None or start is None:
        return False
    return process_start_time(pid) == start


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write, fsync, rename, fsync the directory: a reader sees the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def save_record(directory: Path, record: SandboxRecord) -> None:
    body = json.dumps(record.to_json(), indent=2, sort_keys=True).encode() + b"\n"
    write_atomic(directory / f"{record.id}.json", body)


def load_record(directory: Path, sandbox_id: str) -> SandboxRecord | None:
    path = directory / f"{sandbox_id}.json"
    try:
        return SandboxRecord.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as exc:
        raise StateError(f"{path}: unreadable sandbox record: {exc}") from exc


def load_records(directory: Path) -> dict[str, SandboxRecord]:
    records: dict[str, SandboxRecord] = {}
    if not directory.is_dir():
        return records
    for entry in sorted(directory.glob("*.json")):
        record = load_record(directory, entry.stem)
        if record is not None:
            records[record.id] = record
    return records


def load_record_ids(directory: Path) -> list[str]:
    """The ids that have a record, without reading them."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return [n[:-5] for n in names if n.endswith(".json") and not n.startswith(".")]


def delete_record(directory: Path, sandbox_id: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        (directory / f"{sandbox_id}.json").unlink()


@contextlib.contextmanager
def host_lock(path: Path) -> Iterator[None]:
    """Serialise allocation and shared-table changes between sandgate processes on this host."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
