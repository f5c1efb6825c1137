"""`sandgate` end to end as a sysadmin types it: exit codes, stdio, signals, --keep/rm/ls,
--json, doctor, and usage errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.root

SANDGATE = os.path.join(os.path.dirname(sys.executable), "sandgate")


def sandgate(*args: str, state_dir, **kw) -> subprocess.CompletedProcess:
    cmd = [SANDGATE, args[0], "--state-dir", str(state_dir), *args[1:]]
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 60)
    return subprocess.run(cmd, check=False, **kw)


def sandbox_ids_in_kernel() -> set[str]:
    return (
        {n[3:] for n in os.listdir("/run/netns") if n.startswith("sg-")}
        if os.path.isdir("/run/netns")
        else set()
    )


@pytest.fixture
def state(tmp_path):
    state_dir = tmp_path / "state"
    yield state_dir
    # Whatever a test kept, remove it through the CLI itself: only this test's own
    # sandboxes (its state directory's records), never another run's.
    for record in (state_dir / "sandboxes").glob("*.json"):
        sandgate("rm", record.stem, state_dir=state_dir)


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["true"], 0),
        (["sh", "-c", "exit 7"], 7),
        (["sh", "-c", "kill -TERM $$"], 128 + 15),
        (["/nonexistent/cmd"], 127),
        (["/etc/hostname"], 126),
    ],
)
def test_exit_codes(state, argv, code):
    result = sandgate("run", "--", *argv, state_dir=state)
    assert result.returncode == code, result.stderr


def test_stdio_passes_through(state):
    result = sandgate(
        "run", "--", "sh", "-c", "cat; echo err >&2", state_dir=state, input="from stdin\n"
    )
    assert result.returncode == 0
    assert result.stdout == "from stdin\n"
    assert result.stderr == "err\n"


def test_command_sees_only_its_sandbox_network(state):
    result = sandgate("run", "--json", "--", "ip", "-j", "-4", "route", state_dir=state)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stderr.strip().splitlines()[-1])
    assert summary["sandgate"] == "result" and summary["exit_code"] == 0
    routes = json.loads(result.stdout)
    assert [r["dst"] for r in routes] == [summary["gateway"].split(":")[0] + "/31"] or all(
        r["dst"] != "default" for r in routes
    )
    assert all(r["dst"] != "default" for r in routes)
    assert set(summary["create_ms"]) >= {"network", "host-firewall", "sandbox-firewall"}


def test_ctrl_c_reaches_the_command_and_cleans_up(state):
    proc = subprocess.Popen(
        [
            SANDGATE,
            "run",
            "--json",
            "--state-dir",
            str(state),
            "--",
            "sh",
            "-c",
            "trap 'echo got-int; exit 42' INT; echo ready; while :; do sleep 0.1; done",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert out == "got-int\n"
    assert proc.returncode == 42
    sid = json.loads(err.strip().splitlines()[-1])["id"]
    assert sid not in sandbox_ids_in_kernel()


def test_sigterm_kills_a_command_that_ignores_nothing(state):
    proc = subprocess.Popen(
        [SANDGATE, "run", "--state-dir", str(state), "--", "sh", "-c", "echo ready; sleep 30"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline() == "ready\n"
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert proc.returncode == 128 + 15
    assert time.monotonic() - t0 < 10


def test_keep_ls_rm(state):
    kept = sandgate("run", "--keep", "--json", "--", "true", state_dir=state)
    assert kept.returncode == 0, kept.stderr
    sid = json.loads(kept.stderr.strip().splitlines()[-1])["id"]
    assert sid in sandbox_ids_in_kernel()

    listed = sandgate("ls", "--json", state_dir=state)
    entry = next(b for b in json.loads(listed.stdout) if b["id"] == sid)
    assert entry["in_kernel"] and entry["recorded"] and entry["command"] == ["true"]
    human = sandgate("ls", state_dir=state)
    assert sid in human.stdout

    removed = sandgate("rm", "--json", sid, state_dir=state)
    assert removed.returncode == 0
    assert json.loads(removed.stdout) == [{"id": sid, "removed": True}]
    assert sid not in sandbox_ids_in_kernel()
    again = sandgate("rm", sid, state_dir=state)
    assert again.returncode == 1 and "no such sandbox" in again.stderr


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["run"], 2, "no command given"),
        (["run", "--"], 2, "no command given"),
        (["rm"], 2, "at least one sandbox id"),
        (["rm", "not-an-id"], 1, "not a sandbox id"),
        (["run", "--pool", "10.213.0.0/32", "--", "true"], 2, "bad pool"),
        (["run", "--gateway-port", "70000", "--", "true"], 2, "bad port"),
        (["run", "--env", "NOEQUALS", "--", "true"], 2, "KEY=VALUE"),
    ],
)
def test_usage_errors(state, args, code, message):
    result = sandgate(*args, state_dir=state)
    assert result.returncode == code
    assert message in result.stderr
    assert result.stdout == ""


def test_env_is_small_and_settable(state):
    result = sandgate(
        "run",
        "-e",
        "FOO=bar",
        "--",
        "env",
        state_dir=state,
        env={"SECRET": "x", "PATH": os.environ["PATH"]},
    )
    env = dict(line.split("=", 1) for line in result.stdout.splitlines())
    assert env["FOO"] == "bar"
    assert "SECRET" not in env
    assert len(env["SANDGATE_ID"]) == 8


def test_doctor_passes_here(state):
    result = sandgate("doctor", "--json", state_dir=state)
    report = json.loads(result.stdout)
    assert result.returncode == 0, report
    assert report["ok"] is True
    names = {c["name"] for c in report["checks"]}
    assert {
        "network namespaces",
        "veth",
        "nf_tables",
        "seccomp",
        "cgroups",
        "address pool",
    } <= names


def test_doctor_names_an_overlapping_pool(state, upstream):
    # The upstream fixture routes a 10.214.N.0/30 on the host: a pool over it must fail.
    result = sandgate("doctor", "--json", "--pool", "10.214.0.0/16", state_dir=state)
    report = json.loads(result.stdout)
    assert result.returncode == 1
    pool = next(c for c in report["checks"] if c["name"] == "address pool")
    assert pool["status"] == "fail" and upstream.host_ifname in pool["detail"] and pool["fix"]
