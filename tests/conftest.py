"""Suite-wide fixtures: the `root` marker, and the check that nothing of sandgate's is
left on the machine when the suite ends."""

from __future__ import annotations

import json
import os
import subprocess

import pytest


def sandgate_residue() -> set[str]:
    """Every kernel object whose name marks it as sandgate's (or a sandgate test's)."""
    found: set[str] = set()
    if os.path.isdir("/run/netns"):
        for name in os.listdir("/run/netns"):
            if name.startswith(("sg-", "sgtest-")):
                found.add(f"netns {name}")
    for name in os.listdir("/sys/class/net"):
        if name.startswith(("sg", "tsg")):
            found.add(f"link {name}")
    nft = subprocess.run(
        ["nft", "-j", "list", "tables"], capture_output=True, text=True, check=False
    )
    if nft.returncode == 0:
        for entry in json.loads(nft.stdout).get("nftables", []):
            table = entry.get("table")
            if table and table["name"].startswith(("sandgate", "sgtest")):
                found.add(f"nft table {table['family']} {table['name']}")
    ipt = subprocess.run(["iptables-legacy-save"], capture_output=True, text=True, check=False)
    for line in ipt.stdout.splitlines():
        if "sandgate" in line.lower() or "sg+" in line:
            found.add(f"xtables rule {line.strip()}")
    scopes = "/sys/fs/cgroup/sandgate.slice"  # the daemon's, under systemd on cgroup v2
    if os.path.isdir(scopes):
        found |= {f"scope {e}" for e in os.listdir(scopes) if e.startswith("sandgate-")}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        # A gateway helper process, or a `sandgate serve` (the tests' daemons).
        helper = any(b"from gateway.workers import main" in a for a in argv[1:4])
        if helper or (argv[1:2] == [b"serve"] and b"sandgate" in argv[0]):
            found.add(f"process {pid} {b' '.join(argv).decode(errors='replace').strip()}")
    try:
        from runner.cgroups import CgroupError, detect

        for name in detect().list():
            found.add(f"cgroup {name}")
    except (CgroupError, OSError):
        pass  # no usable cgroups here: nothing of ours can be left in them
    return found


# `sandgate run` goes through a daemon when one answers on the control socket. The
# suite's runs are embedded unless a test names a daemon itself (test_daemon.py starts
# its own; test_service_vm.py uses the installed service): a service running on the
# machine (the Vagrant VM) must not take them over.
NO_DAEMON = "/nonexistent/sandgate-tests-run-embedded.sock"


def pytest_configure(config: pytest.Config) -> None:
    os.environ["SANDGATE_CONTROL_SOCKET"] = NO_DAEMON
    config._sandgate_residue_before = sandgate_residue() if os.geteuid() == 0 else set()  # type: ignore[attr-defined]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root: creates real namespaces and nftables rules")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def no_residue_at_end(request: pytest.FixtureRequest):
    """Fails the run if any test left a sandgate kernel object behind."""
    yield
    if os.geteuid() != 0:
        return
    before = request.config._sandgate_residue_before  # type: ignore[attr-defined]
    left = sandgate_residue() - before
    assert not left, f"the suite left sandgate objects behind: {sorted(left)}"
