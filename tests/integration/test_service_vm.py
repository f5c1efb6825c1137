"""sandgate.service under a real systemd (the Vagrant VM): the checks that cannot run
where systemd is not PID 1. Skipped elsewhere, saying why.

They use the installed service as an operator would: its default control socket,
`systemctl restart` / `reload`, and the transient scope systemd makes for each
sandbox on cgroup v2 (sandgate.slice/sandgate-<id>.scope).
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from runner.client import DEFAULT_CONTROL_SOCKET, ControlClient

pytestmark = pytest.mark.root


def _systemctl(*args: str) -> str:
    return subprocess.run(
        ["systemctl", *args], capture_output=True, text=True, check=False
    ).stdout.strip()


def _why_not() -> str | None:
    if not os.path.isdir("/run/systemd/system"):
        return "systemd is not PID 1 here (these run in the Vagrant VM: vagrant/README.md)"
    if _systemctl("is-active", "sandgate.service") != "active":
        return "sandgate.service is not active (sudo ./scripts/install starts it)"
    if not ControlClient(DEFAULT_CONTROL_SOCKET).available():
        return f"sandgate.service does not answer on {DEFAULT_CONTROL_SOCKET}"
    return None


REASON = _why_not()
if REASON is not None:
    pytestmark = [pytestmark, pytest.mark.skip(reason=REASON)]


def sandgate(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SANDGATE_CONTROL_SOCKET"}
    done = subprocess.run(
        ["sandgate", *args], capture_output=True, text=True, check=False, env=env, timeout=120
    )
    if check:
        assert done.returncode == 0, done.stderr
    return done


def main_pid() -> int:
    return int(_systemctl("show", "sandgate.service", "-p", "MainPID", "--value"))


def wait_until(predicate, timeout: float = 10.0) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, "timed out"
        time.sleep(0.05)
    return time.monotonic() - start


@pytest.fixture
def sandbox():
    sid = sandgate("create").stdout.strip()
    try:
        yield sid
    finally:
        sandgate("rm", sid, check=False)


def test_each_sandbox_is_a_delegated_scope_outside_the_service(sandbox):
    unit = f"sandgate-{sandbox}.scope"
    props = dict(
        line.split("=", 1)
        for line in _systemctl(
            "show", unit, "-p", "ActiveState,Delegate,Slice,MemoryMax,TasksMax,ControlGroup"
        ).splitlines()
    )
    assert props["ActiveState"] == "active" and props["Delegate"] == "yes"
    assert props["Slice"] == "sandgate.slice"
    assert props["ControlGroup"] == f"/sandgate.slice/{unit}"
    assert int(props["TasksMax"]) > 0 and props["MemoryMax"].isdigit()
    info = json.loads(sandgate("inspect", "--json", sandbox).stdout)
    assert info["cgroup"] == {"unified": f"/sys/fs/cgroup/sandgate.slice/{unit}"}
    # The service's own cgroup has no sandbox beneath it.
    service_cgroup = _systemctl("show", "sandgate.service", "-p", "ControlGroup", "--value")
    assert not [
        e for e in os.listdir(f"/sys/fs/cgroup{service_cgroup}") if e.startswith("sandgate-")
    ]


def test_systemctl_restart_keeps_sandboxes_and_serves_them_again(sandbox):
    before = main_pid()
    subprocess.run(["systemctl", "restart", "sandgate.service"], check=True, timeout=60)
    assert main_pid() != before
    took = wait_until(lambda: sandgate("exec", sandbox, "--", "true", check=False).returncode == 0)
    print(f"sandbox {sandbox} answered {took:.2f}s after systemctl restart returned")
    assert _systemctl("is-active", f"sandgate-{sandbox}.scope") == "active"
    out = sandgate("exec", sandbox, "--", "cat", "/proc/1/status").stdout
    assert "NSpid" in out


def test_systemctl_reload_keeps_serving(sandbox):
    before = main_pid()
    subprocess.run(["systemctl", "reload", "sandgate.service"], check=True, timeout=60)
    assert main_pid() == before and _systemctl("is-active", "sandgate.service") == "active"
    assert sandgate("exec", sandbox, "--", "true").returncode == 0


def test_rm_removes_the_scope():
    sid = sandgate("create").stdout.strip()
    sandgate("rm", sid)
    wait_until(lambda: _systemctl("is-active", f"sandgate-{sid}.scope") != "active")
    assert not os.path.exists(f"/sys/fs/cgroup/sandgate.slice/sandgate-{sid}.scope")


def test_doctor_sees_the_service():
    report = json.loads(sandgate("doctor", "--json").stdout)
    by_name = {c["name"]: c for c in report["checks"]}
    assert by_name["systemd"]["status"] == "ok"
    assert by_name["service"]["status"] == "ok"
    assert by_name["cgroup delegation"]["status"] == "ok"
    assert by_name["daemon"]["status"] == "ok"
