"""doctor's checks that need no root: firewall managers and the audit log's disk."""

from __future__ import annotations

import shutil
import subprocess

from runner.doctor import check_audit_disk, check_firewall_managers


def test_audit_disk_ok_and_low(tmp_path):
    log = str(tmp_path / "logs" / "audit.jsonl")  # the directory need not exist yet
    assert check_audit_disk(log).status == "ok"
    low = check_audit_disk(log, min_free=1 << 62)
    assert low.status == "warn" and "rotate" in low.fix and "MiB free" in low.detail


def test_a_running_firewalld_is_named_with_what_it_would_do(tmp_path):
    fake = tmp_path / "firewalld"  # a process whose name is firewalld: a copy of sleep
    shutil.copy("/bin/sleep", fake)
    proc = subprocess.Popen([str(fake), "30"])
    try:
        check = check_firewall_managers()
    finally:
        proc.kill()
        proc.wait()
    assert check.status == "warn"
    assert "firewalld" in check.detail and "FlushAllOnReload" in check.fix
    assert check_firewall_managers().status == "ok" or "dockerd" in check_firewall_managers().detail
