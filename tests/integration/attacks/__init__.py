"""Attack code run inside real sandboxes, and the helpers the security tests share.

The modules here besides this one are scripts: the tests read their source and run it
inside a sandbox as `python3 -c SOURCE ARGS...` (the sandbox's /usr/bin/python3 is the
host's), and where a positive control needs it, on the host too. They use only the
standard library and print one JSON object.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from runner.cgroups import CgroupError, detect
from runner.identity import resolve_identity

SANDGATE = os.path.join(os.path.dirname(sys.executable), "sandgate")
HERE = Path(__file__).resolve().parent
# Who sandboxes run as by default (these helpers never pass SUDO_UID on): the _sandgate
# system user where it exists, else nobody.
_IDENTITY = resolve_identity(None, environ={})
SANDBOX_UID, SANDBOX_GID = _IDENTITY.uid, _IDENTITY.gid
HOST_PYTHON = "/usr/bin/python3"  # the interpreter the sandbox gets, not the venv's


def script(name: str) -> str:
    """The source of attacks/<name>.py, to pass as `python3 -c`."""
    return (HERE / f"{name}.py").read_text()


def host_env(**extra: str) -> dict[str, str]:
    """The test's environment without sudo's SUDO_* (which would pick the sandbox user)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUDO_")}
    env.update(extra)
    return env


def sandgate_cmd(*args: str, state_dir: Path | str) -> list[str]:
    return [SANDGATE, args[0], "--state-dir", str(state_dir), *args[1:]]


def sandgate(*args: str, state_dir: Path | str, **kw) -> subprocess.CompletedProcess:
    """`sandgate SUBCOMMAND --state-dir DIR ARGS...`, captured, never raising on exit codes."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 60)
    kw.setdefault("env", host_env())
    return subprocess.run(sandgate_cmd(*args, state_dir=state_dir), check=False, **kw)


def summary(stderr: str) -> dict:
    """The one-line JSON summary `run --json` writes last on stderr."""
    for line in reversed(stderr.strip().splitlines()):
        if line.startswith("{"):
            obj = json.loads(line)
            if obj.get("sandgate") == "result":
                return obj
    raise AssertionError(f"no --json summary on stderr:\n{stderr}")


def last_json(stdout: str) -> dict:
    """The last line of stdout that is a JSON object (what an attack script printed)."""
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON on stdout:\n{stdout}")


def run_as_sandbox_user(argv: list[str], **kw) -> subprocess.CompletedProcess:
    """A command on the host as the sandbox's uid and gid, with no sandbox around it."""
    prefix = ["setpriv", f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_GID}", "--clear-groups"]
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 30)
    return subprocess.run([*prefix, *argv], check=False, **kw)


def sandbox_in_kernel(sandbox_id: str) -> list[str]:
    """What of this sandbox the kernel still holds: netns, host link, cgroup."""
    left = []
    if os.path.exists(f"/run/netns/sg-{sandbox_id}"):
        left.append(f"netns sg-{sandbox_id}")
    if os.path.exists(f"/sys/class/net/sg{sandbox_id}"):
        left.append(f"link sg{sandbox_id}")
    with contextlib.suppress(CgroupError):
        if detect().find(f"sandgate-{sandbox_id}") is not None:
            left.append(f"cgroup sandgate-{sandbox_id}")
    return left


def cgroup_file(sandbox_id: str, controller: str, name: str) -> str:
    """Path of a control file of a live sandbox's cgroup, on v1 or v2."""
    cgroup = detect().find(f"sandgate-{sandbox_id}")
    assert cgroup is not None, f"sandbox {sandbox_id} has no cgroup"
    dirs = cgroup.dirs
    return os.path.join(dirs.get(controller) or dirs["unified"], name)


def read_keyed(path: str) -> dict[str, int]:
    out = {}
    with open(path) as f:
        for line in f:
            key, _, value = line.partition(" ")
            out[key] = int(value)
    return out


class Kept:
    """Sandboxes a test keeps (--keep) or may leave running; all removed at teardown."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.ids: list[str] = []
        self.procs: list[subprocess.Popen] = []

    def add(self, sandbox_id: str) -> str:
        self.ids.append(sandbox_id)
        return sandbox_id

    def popen(self, *args: str, **kw) -> subprocess.Popen:
        kw.setdefault("text", True)
        kw.setdefault("env", host_env())
        proc = subprocess.Popen(sandgate_cmd(*args, state_dir=self.state_dir), **kw)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()  # sandgate forwards it and removes its sandbox
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        for sandbox_id in self.ids:
            if sandbox_in_kernel(sandbox_id):
                sandgate("rm", sandbox_id, state_dir=self.state_dir)


@contextlib.contextmanager
def kept_sandboxes(state_dir: Path) -> Iterator[Kept]:
    kept = Kept(state_dir)
    try:
        yield kept
    finally:
        kept.close()


def read_line(proc: subprocess.Popen, timeout: float = 30) -> str:
    """The next line of a running sandgate's stdout, failing (not hanging) after timeout."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no output from the sandbox within {timeout}s"
    return proc.stdout.readline()
