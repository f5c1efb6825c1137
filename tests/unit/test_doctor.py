"""doctor's checks that need no root: firewall managers and the audit log's disk."""

from __future__ import annotations

import shutil
import subprocess

from runner.doctor import check_audit_disk, check_daemon, check_firewall_managers, check_systemd


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


def _systemctl(version: str, show: str):
    def run(argv: list[str]) -> str:
        return version if argv[1] == "--version" else show

    return run


def test_systemd_not_booted_is_information_only():
    (check,) = check_systemd(booted=False)
    assert check.status == "info" and "not the init system" in check.detail


def test_systemd_service_active_and_delegated():
    checks = check_systemd(
        _systemctl(
            "systemd 252 (252.39-1~deb12u2)\n+PAM +AUDIT",
            "LoadState=loaded\nActiveState=active\nDelegate=yes\n",
        ),
        booted=True,
    )
    by_name = {c.name: c for c in checks}
    assert by_name["systemd"].status == "ok" and "252" in by_name["systemd"].detail
    assert by_name["service"].status == "ok"
    assert by_name["cgroup delegation"].status == "ok"


def test_systemd_too_old_inactive_and_not_delegated_are_named():
    checks = check_systemd(
        _systemctl("systemd 245 (245.4)", "LoadState=loaded\nActiveState=failed\nDelegate=no\n"),
        booted=True,
    )
    by_name = {c.name: c for c in checks}
    assert by_name["systemd"].status == "warn" and "247" in by_name["systemd"].detail
    assert by_name["service"].status == "warn" and "journalctl" in by_name["service"].fix
    assert by_name["cgroup delegation"].status == "fail"


def test_systemd_unit_not_installed():
    checks = check_systemd(
        _systemctl("systemd 252", "LoadState=not-found\nActiveState=inactive\n"), booted=True
    )
    assert [c.name for c in checks] == ["systemd", "service"]
    assert checks[1].status == "warn" and "scripts/install" in checks[1].fix


def test_daemon_not_answering_is_information(tmp_path):
    check = check_daemon(str(tmp_path / "control.sock"))
    assert check.status == "info" and "not answering" in check.detail
