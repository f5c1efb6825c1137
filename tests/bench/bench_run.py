#!/usr/bin/env python3
"""Sandbox start-up: create→exec latency phase by phase (in-process: network, firewall,
cgroup, namespaces, filesystem view, privilege drop, exec of `true`), and `sandgate run
-- true` end to end, side by side in the same run with
`bwrap --unshare-all --ro-bind / / --dev /dev --proc /proc true` and
`unshare --mount --pid --ipc --uts --net --fork true`. Prints medians and ratios.

Run as root: .venv/bin/python tests/bench/bench_run.py [--rounds 30]
(bwrap comes from Debian's bubblewrap package; it is skipped if missing.)
Target (issue 3): create→exec p50 <= 20 ms in-process, network included.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from runner.config import RunnerConfig
from runner.identity import resolve_identity
from runner.init import CommandSpec
from runner.mounts import FilesystemSpec, plan_mounts
from runner.process import launch, sandbox_env
from runner.sandbox import create_sandbox, destroy_sandbox

SANDGATE = os.path.join(os.path.dirname(sys.executable), "sandgate")


def in_process(config: RunnerConfig) -> tuple[dict[str, float], float]:
    """One sandbox: its phases (ms) and create→exec (ms)."""
    ident = resolve_identity(None)
    fs = FilesystemSpec(uid=ident.uid, gid=ident.gid)
    box = create_sandbox(config)
    spec = CommandSpec(
        argv=("true",),
        env=sandbox_env({}, box.id, fs.home, ident.name),
        cwd=fs.workspace_target,
        uid=ident.uid,
        gid=ident.gid,
        hostname=box.id,
        mounts=plan_mounts(fs),
    )
    try:
        outcome = launch(spec, box.network.netns_path, box.cgroup).wait()
    finally:
        destroy_sandbox(config, box.id)
    assert outcome.exit_code == 0, outcome
    phases = {**box.timings, **outcome.phases}
    to_exec = sum(v for k, v in phases.items() if k != "command")
    return phases, to_exec


def timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return (time.perf_counter() - t0) * 1000


def med(values: list[float]) -> float:
    return statistics.median(values)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    bwrap = shutil.which("bwrap")
    baselines = {
        "unshare": ["unshare", "--mount", "--pid", "--ipc", "--uts", "--net", "--fork", "true"],
    }
    if bwrap:
        baselines["bwrap"] = [
            bwrap,
            "--unshare-all",
            "--ro-bind",
            "/",
            "/",
            "--dev",
            "/dev",
            "--proc",
            "/proc",
            "true",
        ]
    with tempfile.TemporaryDirectory() as tmp:
        config = RunnerConfig(state_dir=Path(tmp))
        anchor = create_sandbox(config)  # holds the shared table, as a running host would
        try:
            in_process(config)  # warm-up: imports, cffi declarations, the seccomp program
            phases: list[dict[str, float]] = []
            to_exec: list[float] = []
            cli: list[float] = []
            base: dict[str, list[float]] = {name: [] for name in baselines}
            for _ in range(args.rounds):
                p, t = in_process(config)
                phases.append(p)
                to_exec.append(t)
                cli.append(timed([SANDGATE, "run", "--state-dir", tmp, "--", "true"]))
                for name, argv in baselines.items():
                    base[name].append(timed(argv))
        finally:
            destroy_sandbox(config, anchor.id)

    print(f"rounds: {args.rounds} (all variants alternate in one run)\n")
    print("create→exec in-process, phase by phase (p50 ms):")
    for key in phases[0]:
        print(f"  {key:<18} {med([p[key] for p in phases]):7.2f}")
    slowest = max(phases[0], key=lambda k: med([p[k] for p in phases]) if k != "command" else 0)
    print(f"  slowest phase: {slowest}")
    t = med(to_exec)
    print(f"\ncreate→exec p50 {t:.2f} ms (target <= 20 ms)")
    c = med(cli)
    print(f"`sandgate run -- true` end to end p50 {c:.1f} ms (a new Python process each time)")
    for name, values in base.items():
        b = med(values)
        print(
            f"  {name:<8} p50 {b:6.1f} ms   in-process create→exec / {name}: {t / b:5.2f}x"
            f"   sandgate run / {name}: {c / b:5.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
