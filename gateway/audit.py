"""The audit log: one JSON line per gateway decision, appended to a file.

Every line has the same fields (null where one does not apply): request_id, time
(RFC 3339, UTC), sandbox, endpoint ("tcp" or "unix"), method, host, port, addr (the
address dialed), path (plain HTTP only), decision ("allow", "deny" or "error"), rule,
reason, status, bytes_up, bytes_down, duration_ms; and for the git gateway repo (the
repository's URL as the policy spells it, or as requested when it is not listed),
service ("upload-pack" or "receive-pack") and refs (for a push: one {"ref", "old",
"new", "verdict": "allow"|"deny", "reason"} per ref, in the push's order). Headers
and bodies are never logged; the path is logged with its query values replaced by
"***" (tokens travel in query strings).

Appends are line-atomic: the file is opened with O_APPEND and each line is one
write(2). POSIX promises atomicity of O_APPEND writes only for pipes (up to
PIPE_BUF), but on local Linux filesystems (ext4, xfs, btrfs, tmpfs) a single
write() to an O_APPEND file takes the inode lock, so a full line never interleaves
with another appender's. Not on NFS. A short write (disk full) is completed with
further writes: the line is then no longer atomic, but it is not lost halfway.

`redact` is for code that handles credentials (the git gateway): it removes every
occurrence of every given secret from a text before it is logged or shown.
"""

from __future__ import annotations

import json
import os
import secrets as _secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import NamedTuple

DEFAULT_AUDIT_PATH = "/var/log/sandgate/audit.jsonl"
REDACTED = "[REDACTED]"


def new_request_id() -> str:
    """16 hex digits, random: unguessable, and short enough to quote in a bug report.
    Taken from a block of 4 KiB read from the kernel at once (one getrandom call per
    512 ids); a forked child starts a block of its own."""
    global _random_at, _random
    at = _random_at
    if at + 8 > len(_random):
        _random, at = _secrets.token_bytes(4096), 0
    _random_at = at + 8
    return _random[at : at + 8].hex()


_random = b""
_random_at = 0


def _new_block_after_fork() -> None:
    global _random, _random_at
    _random, _random_at = b"", 0


os.register_at_fork(after_in_child=_new_block_after_fork)


def rfc3339_now() -> str:
    """The time in UTC to the millisecond; the string is made once per millisecond."""
    global _last_now
    now = time.time()
    ms = int(now * 1000)
    if ms != _last_now[0]:
        moment = datetime.fromtimestamp(ms // 1000, UTC).replace(microsecond=ms % 1000 * 1000)
        text = moment.isoformat(timespec="milliseconds")
        _last_now = (ms, text.replace("+00:00", "Z"))
    return _last_now[1]


_last_now: tuple[int, str] = (-1, "")


@dataclass
class AuditRecord:
    """One decision. Mutable: the proxy fills it in as the exchange goes, and writes
    it once when the connection ends (or at once, for a denial)."""

    request_id: str
    sandbox: str
    endpoint: str
    time: str = field(default_factory=rfc3339_now)
    method: str | None = None
    host: str | None = None
    port: int | None = None
    addr: str | None = None
    path: str | None = None
    decision: str = "error"
    rule: str | None = None
    reason: str | None = None
    status: int | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    duration_ms: int = 0
    repo: str | None = None
    service: str | None = None
    refs: list[dict[str, str | None]] | None = None

    def as_dict(self) -> dict[str, object]:
        # Written out rather than dataclasses.asdict, which recurses and deep-copies
        # every value (~60 us a record, on the gateway's one loop thread). Same keys,
        # same order; `refs` is copied as asdict would, so the dict shares nothing
        # mutable with the record.
        return {
            "request_id": self.request_id,
            "sandbox": self.sandbox,
            "endpoint": self.endpoint,
            "time": self.time,
            "method": self.method,
            "host": self.host,
            "port": self.port,
            "addr": self.addr,
            "path": self.path,
            "decision": self.decision,
            "rule": self.rule,
            "reason": self.reason,
            "status": self.status,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "duration_ms": self.duration_ms,
            "repo": self.repo,
            "service": self.service,
            "refs": None if self.refs is None else [dict(ref) for ref in self.refs],
        }

    def to_line(self) -> bytes:
        return (_ENCODER.encode(self.as_dict()) + "\n").encode("utf-8")


# as_dict is written out by hand: it must name every field, in the dataclass's order.
if list(AuditRecord("", "", "", time="").as_dict()) != [f.name for f in fields(AuditRecord)]:
    raise AssertionError("AuditRecord.as_dict does not match the record's fields")

# One encoder for every line: json.dumps with non-default arguments builds a new
# JSONEncoder per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"))


class Count(NamedTuple):
    """Records of one kind ("egress", "git" or "api"), decision, label (the rule of
    an allowed exchange, the reason of any other) and status, summed: how many, and
    their bytes."""

    kind: str
    decision: str
    label: str
    status: int | None
    requests: int
    bytes_up: int
    bytes_down: int


def record_kind(record: AuditRecord) -> str:
    if record.repo or record.service:
        return "git"
    if record.path and record.path.startswith("/_sandgate/"):
        return "api"
    return "egress"


class Tally:
    """Records summed as Counts, for counters that want every record but not each one
    (GatewayConfig.on_counts): a gateway helper process sends these sums to the first
    process instead of its records."""

    def __init__(self) -> None:
        self._sums: dict[tuple[str, str, str, int | None], list[int]] = {}

    def __bool__(self) -> bool:
        return bool(self._sums)

    def add(self, record: AuditRecord) -> None:
        label = (record.rule if record.decision == "allow" else record.reason) or ""
        key = (record_kind(record), record.decision, label, record.status)
        sums = self._sums.get(key)
        if sums is None:
            self._sums[key] = [1, record.bytes_up, record.bytes_down]
        else:
            sums[0] += 1
            sums[1] += record.bytes_up
            sums[2] += record.bytes_down

    def take(self) -> list[Count]:
        """The sums since the last take(), and start again from nothing."""
        sums, self._sums = self._sums, {}
        return [Count(*key, *values) for key, values in sums.items()]


def count_from_json(value: object) -> Count:
    """A Count sent as a JSON list (by a helper process); ValueError if it is not one."""
    if not isinstance(value, list) or len(value) != len(Count._fields):
        raise ValueError("not a count")
    kind, decision, label, status, *numbers = value
    if not all(isinstance(v, str) for v in (kind, decision, label)):
        raise ValueError("a count's kind, decision and label are strings")
    if status is not None and (type(status) is not int):
        raise ValueError("a count's status is an integer or null")
    if not all(type(n) is int and n >= 0 for n in numbers):
        raise ValueError("a count's numbers are integers, not negative")
    return Count(kind, decision, label, status, *numbers)


ROTATION_CHECK_S = 1.0


class AuditLog:
    """An append-only JSON-lines file. The parent directory is created (mode 0750)
    if missing; the file is created with mode 0640.

    write() appends a line at once. add() keeps it to be written by flush() with the
    others added meanwhile, in one write (O_APPEND: whole lines, never mixed with
    another process's); the gateway flushes at the end of each turn of its event
    loop, and at once when ADD_MAX lines wait."""

    ADD_MAX = 64

    def __init__(self, path: str = DEFAULT_AUDIT_PATH) -> None:
        self.path = path
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, mode=0o750, exist_ok=True)
        self._fd: int | None = self._open()
        self._checked = time.monotonic()
        self._pending: list[bytes] = []

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def _follow_rotation(self) -> None:
        """At most once a second: if the path no longer names the file being written
        (logrotate renamed it), start a new file there. A long-running gateway would
        otherwise write on into the rotated file."""
        now = time.monotonic()
        if now - self._checked < ROTATION_CHECK_S:
            return
        self._checked = now
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            current = None
        mine = os.fstat(self._fd)
        if current is None or (current.st_ino, current.st_dev) != (mine.st_ino, mine.st_dev):
            fd = self._open()
            os.close(self._fd)
            self._fd = fd

    def write(self, record: AuditRecord) -> None:
        self.add(record)
        self.flush()

    def add(self, record: AuditRecord) -> bool:
        """Keep the record's line for flush(); True when ADD_MAX lines wait (flush now)."""
        if self._fd is None:
            raise ValueError("the audit log is closed")
        self._pending.append(record.to_line())
        return len(self._pending) >= self.ADD_MAX

    def flush(self) -> None:
        if not self._pending or self._fd is None:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        self._follow_rotation()
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def close(self) -> None:
        self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with every character that belongs to an occurrence of any of `secrets`
    replaced, one REDACTED marker per run. Overlapping and nested occurrences are
    covered whole (no fragment of any secret survives); empty secrets are ignored."""
    covered = [False] * len(text)
    for secret in set(secrets):
        if not secret:
            continue
        start = text.find(secret)
        while start >= 0:
            covered[start : start + len(secret)] = [True] * len(secret)
            start = text.find(secret, start + 1)
    out: list[str] = []
    for i, ch in enumerate(text):
        if not covered[i]:
            out.append(ch)
        elif i == 0 or not covered[i - 1]:
            out.append(REDACTED)
    return "".join(out)
