"""gateway/audit.py: JSON lines with every field, line-atomic appends, redaction."""

from __future__ import annotations

import json
import os
import re
import threading

from gateway.audit import REDACTED, AuditLog, AuditRecord, new_request_id, redact, rfc3339_now

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
