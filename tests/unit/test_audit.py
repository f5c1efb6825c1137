"""gateway/audit.py: JSON lines with every field, line-atomic appends, redaction."""

from __future__ import annotations

import json
import os
import re
import threading

import pytest

from gateway.audit import (
    REDACTED,
    AuditLog,
    AuditRecord,
    Count,
    Tally,
    count_from_json,
    new_request_id,
    redact,
    rfc3339_now,
)

FIELDS = {
    "request_id",
    "time",
    "sandbox",
    "endpoint",
    "method",
    "host",
    "port",
    "addr",
    "path",
    "decision",
    "rule",
    "reason",
    "status",
    "bytes_up",
    "bytes_down",
    "duration_ms",
    "repo",
    "service",
    "refs",
}


def test_request_ids_are_16_hex_and_distinct() -> None:
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(r"[0-9a-f]{16}", i) for i in ids)


def test_time_is_rfc3339_utc() -> None:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rfc3339_now())


def test_every_line_has_every_field(tmp_path) -> None:
    path = tmp_path / "log" / "audit.jsonl"  # the directory is created
    with AuditLog(str(path)) as audit:
        audit.write(AuditRecord("a" * 16, "sb1", "tcp", method="GET", host="example.com"))
        audit.write(
            AuditRecord("b" * 16, "sb1", "unix", decision="deny", rule="default-deny", status=403)
        )
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert set(first) == FIELDS and set(second) == FIELDS
    assert first["host"] == "example.com" and first["path"] is None
    assert second["decision"] == "deny" and second["status"] == 403
    assert oct(path.stat().st_mode & 0o777) == "0o640"


def test_appends_from_many_writers_never_interleave(tmp_path) -> None:
    path = str(tmp_path / "audit.jsonl")
    logs = [AuditLog(path) for _ in range(4)]  # separate open files, as separate processes

    def write(n: int) -> None:
        for i in range(300):
            logs[n].write(AuditRecord(f"{n:02d}{i:014d}", "sb", "tcp", path="/" + "x" * 5000))

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for log in logs:
        log.close()
    with open(path) as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 1200
    assert len({r["request_id"] for r in records}) == 1200


def test_an_existing_log_is_appended_to(tmp_path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text('{"old": 1}\n')
    with AuditLog(str(path)) as audit:
        audit.write(AuditRecord("c" * 16, "sb", "tcp"))
    assert path.read_text().startswith('{"old": 1}\n{"request_id"')
    assert os.path.exists(path)


def test_redact_removes_every_secret_whatever_its_shape() -> None:
    assert redact("token=abc123 and abc123", ["abc123"]) == f"token={REDACTED} and {REDACTED}"
    assert redact("x", []) == "x"
    assert redact("nothing here", ["", "zzz"]) == "nothing here"
    # One character, or no recognisable prefix: still removed.
    assert redact("a-b-a", ["a"]) == f"{REDACTED}-b-{REDACTED}"
    # Overlapping and nested secrets leave no fragment of either.
    assert redact("xxabcdyy", ["abc", "bcd"]) == f"xx{REDACTED}yy"
    assert redact("xxabcdyy", ["bc", "abcd"]) == f"xx{REDACTED}yy"
    # Overlapping occurrences of one secret.
    assert redact("aaaa", ["aaa"]) == REDACTED
    # Unicode and regex metacharacters are matched literally.
    assert redact("p=[.*]ß", ["[.*]ß"]) == f"p={REDACTED}"


def test_query_values_never_reach_the_audit_path():
    from gateway.proxy import audit_path

    assert audit_path("/a/b") == "/a/b"
    assert audit_path("/q?access_token=s3cr3t&x=1&flag") == "/q?access_token=***&x=***&flag"
    assert "s3cr3t" not in audit_path("/q?a=b&token=s3cr3t")


def test_a_rotated_log_is_followed_within_a_second(tmp_path, monkeypatch):
    import gateway.audit as audit_module

    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path))
    clock = [1000.0]
    monkeypatch.setattr(audit_module.time, "monotonic", lambda: clock[0])
    log._checked = clock[0]
    log.write(AuditRecord("r1", "1a2b3c4d", "tcp", decision="deny"))
    os.rename(path, tmp_path / "audit.jsonl.1")  # logrotate's default: rename
    log.write(AuditRecord("r2", "1a2b3c4d", "tcp", decision="deny"))  # within the second
    clock[0] += 1.5
    log.write(AuditRecord("r3", "1a2b3c4d", "tcp", decision="deny"))
    log.close()
    rotated = (tmp_path / "audit.jsonl.1").read_text().splitlines()
    fresh = path.read_text().splitlines()
    assert [json.loads(x)["request_id"] for x in rotated] == ["r1", "r2"]
    assert [json.loads(x)["request_id"] for x in fresh] == ["r3"]


def test_added_lines_wait_for_flush_and_go_in_one_write(tmp_path, monkeypatch) -> None:
    path = tmp_path / "audit.jsonl"
    writes: list[int] = []
    real_write = os.write

    def counting_write(fd: int, data) -> int:
        writes.append(len(data))
        return real_write(fd, data)

    with AuditLog(str(path)) as audit:
        monkeypatch.setattr(os, "write", counting_write)
        for i in range(3):
            assert audit.add(AuditRecord(f"{i:016x}", "sb1", "tcp")) is False
        assert path.read_text() == "" and writes == []
        audit.flush()
        assert len(writes) == 1 and len(path.read_text().splitlines()) == 3
        full = [audit.add(AuditRecord(f"{i:016x}", "sb1", "tcp")) for i in range(AuditLog.ADD_MAX)]
        assert full == [False] * (AuditLog.ADD_MAX - 1) + [True]  # time to flush
        audit.add(AuditRecord("f" * 16, "sb1", "tcp"))
    # close() flushed what was left.
    assert len(path.read_text().splitlines()) == 3 + AuditLog.ADD_MAX + 1


def test_request_ids_differ_in_a_forked_child() -> None:
    new_request_id()  # this process has a block of random bytes now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the next id, from a block of its own
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    theirs = os.read(read, 64).decode()
    os.close(read)
    assert re.fullmatch(r"[0-9a-f]{16}", theirs)
    assert theirs != new_request_id()


def test_time_changes_with_the_millisecond(monkeypatch) -> None:
    import gateway.audit as audit

    for ms, text in (
        (1_700_000_000_000, "2023-11-14T22:13:20.000Z"),
        (1_700_000_000_001, "2023-11-14T22:13:20.001Z"),
        (1_700_000_000_999, "2023-11-14T22:13:20.999Z"),
        (1_700_000_001_000, "2023-11-14T22:13:21.000Z"),
    ):
        monkeypatch.setattr(audit.time, "time", lambda ms=ms: ms / 1000 + 0.0004)
        assert rfc3339_now() == text


def test_a_tally_sums_records_by_kind_decision_label_and_status() -> None:
    tally = Tally()
    assert not tally and tally.take() == []
    allowed = dict(decision="allow", rule="egress.allow[0]", status=200)
    tally.add(AuditRecord("1", "sb", "tcp", bytes_up=10, bytes_down=100, **allowed))
    tally.add(AuditRecord("2", "sb", "tcp", bytes_up=5, bytes_down=1, reason="x", **allowed))
    tally.add(AuditRecord("3", "sb", "tcp", decision="deny", rule="egress.rate", status=429))
    tally.add(AuditRecord("4", "sb", "tcp", decision="deny", rule="r", reason="why", status=403))
    tally.add(AuditRecord("5", "sb", "unix", path="/_sandgate/v1/policy", **allowed))
    tally.add(AuditRecord("6", "sb", "tcp", service="upload-pack", **allowed))
    assert tally
    counts = sorted(tally.take())
    assert counts == [
        Count("api", "allow", "egress.allow[0]", 200, 1, 0, 0),
        Count("egress", "allow", "egress.allow[0]", 200, 2, 15, 101),
        Count("egress", "deny", "", 429, 1, 0, 0),  # the label of a refusal is its reason
        Count("egress", "deny", "why", 403, 1, 0, 0),
        Count("git", "allow", "egress.allow[0]", 200, 1, 0, 0),
    ]
    assert not tally and tally.take() == []  # take() starts again from nothing


def test_a_count_travels_as_a_json_list() -> None:
    count = Count("egress", "deny", "why", None, 3, 0, 7)
    assert count_from_json(json.loads(json.dumps(count))) == count


@pytest.mark.parametrize(
    "value",
    [
        {"kind": "egress"},
        ["egress", "allow", "r", 200, 1, 0],  # one short
        ["egress", "allow", "r", 200, 1, 0, 0, 0],
        [1, "allow", "r", 200, 1, 0, 0],
        ["egress", "allow", None, 200, 1, 0, 0],
        ["egress", "allow", "r", "200", 1, 0, 0],
        ["egress", "allow", "r", True, 1, 0, 0],
        ["egress", "allow", "r", 200, -1, 0, 0],
        ["egress", "allow", "r", 200, 1, 0.5, 0],
        ["egress", "allow", "r", 200, 1, 0, False],
    ],
)
def test_a_malformed_count_is_refused(value) -> None:
    with pytest.raises(ValueError):
        count_from_json(value)
