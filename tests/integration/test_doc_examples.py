"""The examples in docs/usage/commands.md, run as written (without `sudo`: the suite
runs as root). Every example is either run here or listed in NOT_RUN with the
reason, so a new example cannot go untested unnoticed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.root

DOC = Path(__file__).resolve().parents[2] / "docs" / "usage" / "commands.md"
BIN = os.path.dirname(sys.executable)
EXAMPLE = re.compile(r"^    (?:\$ )?(.*\bsandgate\b.*?)(?:\s{2,}#.*)?$")

# Examples that need what a test cannot provide here, and why.
NOT_RUN = {
    'sudo sandgate run --workspace "$PWD" -- make test': "needs a project with a Makefile",
    "sudo sandgate run --memory 256M --pids 64 --timeout 10m -- ./untrusted.sh": (
        "needs the reader's script"
    ),
    "id=$(sudo sandgate create --allow packages.example --timeout 1h)": (
        "needs the daemon and a package index: test_daemon.py covers create/exec/rm"
    ),
    'sudo sandgate exec "$id" -- pip download somepkg': "as above",
    'sudo sandgate rm "$id"': "as above",
    "sandgate policy check bad.toml": "shown with its output; test_policy covers the message",
}


def examples() -> list[str]:
    found = []
    for line in DOC.read_text().splitlines():
        m = EXAMPLE.match(line)
        # Examples are what a reader types: `sudo sandgate ...` or `$ sandgate ...`;
        # the usage synopses (`    sandgate run [OPTIONS]`) are neither.
        if m and ("sudo sandgate" in line or line.startswith("    $ ")):
            found.append(m.group(1).strip())
    return found


def test_every_example_is_run_or_has_a_reason():
    listed = examples()
    assert listed, "no examples found: the pattern or the document changed"
    unknown = [e for e in NOT_RUN if e not in listed]
    assert not unknown, f"NOT_RUN names examples the document no longer has: {unknown}"


RUN = [e for e in examples() if e not in NOT_RUN]


@pytest.mark.parametrize("example", RUN)
def test_example_runs(example, tmp_path):
    command = example.replace("sudo ", "")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    done = subprocess.run(
        ["sh", "-c", command], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, f"{example}\n{done.stdout}\n{done.stderr}"
    if "ip -4 route" in example:
        routes = done.stdout.strip().splitlines()
        assert len(routes) == 1 and "default" not in done.stdout, done.stdout
    if "wc -c" in example:
        assert done.stdout.strip() == "5"  # "data\n"
    if "--json" in example:
        summary = json.loads((tmp_path / "summary.json").read_text().splitlines()[-1])
        assert summary["sandgate"] == "result" and summary["exit_code"] == 0
