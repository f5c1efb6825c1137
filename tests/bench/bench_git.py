#!/usr/bin/env python3
"""Clone of a ~50 MB repository through sandgate's git gateway, side by side with the
same clone straight from the same git server, in the same run, alternating. Prints
medians, ranges and the ratio (target: gateway <= 1.10x direct).

Run as root: .venv/bin/python tests/bench/bench_git.py [--rounds 5] [--size-mib 50]

What runs where (nothing leaves the machine, no name is ever looked up):
  upstream   a network namespace made here, 10.214.N.2 behind a veth (host end
             10.214.N.1/30): the test git server of tests/integration/git_fixtures.py
             (git http-backend behind a threaded HTTPS front, Basic x-access-token
             auth), serving one bare repository of incompressible random data (built
             once, cached under /tmp/sandgate-git-bench-cache, removed at the end
             unless --keep-cache).
  gateway    `sandgate run --repo https://git.test/org/big --credentials DIR
             --resolve git.test=10.214.N.2 --upstream-ca CA --cpus 2`: the command is
             a Python script that times `git clone https://git.test/org/big` into the
             sandbox's tmpfs workspace (only the clone is timed, not the sandbox's
             start or end). The gateway injects the token.
  direct     git on the host, into a tmpfs directory (/dev/shm), over TLS straight to
             10.214.N.2 (http.curloptResolve, the test CA, the token in an
             http.extraHeader, so no 401 round trip either), same protocol (v2).
Both clones check out the same commit; both are verified. Order alternates each round.
A clone that fails is counted and reported (with the gateway's audit reason), not
timed; the run goes on.

--tls-close-notify: the upstream sends a TLS close_notify before closing each
connection. By default it closes TCP right after the last byte without one (Python's
ssl module does; RFC 8446 allows it, HTTP framing says where a response ends), which
is what exposes the gateway's truncated-response bug (see the report): with the
option, the gateway's throughput can be measured anyway.
Everything made here (netns, veth, temp dirs, sandboxes) is removed in `finally`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.integration.git_fixtures import (  # noqa: E402
    GIT_ENV,
    big_repo,
    drop_big_repo,
    git,
    git_upstream,
    random_token,
)

HOST = "git.test"
REPO = "org/big"
SANDGATE = str(Path(sys.executable).parent / "sandgate")

CLONE_SCRIPT = r"""
import json, os, subprocess, time
t = time.monotonic()
p = subprocess.run(["git", "clone", "-q", "https://git.test/org/big", "/workspace/big"],
                   capture_output=True, text=True)
dt = time.monotonic() - t
head = subprocess.run(["git", "-C", "/workspace/big", "rev-parse", "HEAD"],
                      capture_output=True, text=True).stdout.strip()
print(json.dumps({"rc": p.returncode, "err": p.stderr[-2000:], "seconds": dt, "head": head}))
"""


class BenchError(Exception):
    pass


def last_audit_error(work: Path) -> str:
    path = work / "audit.jsonl"
    if not path.exists():
        return ""
    for line in reversed(path.read_text().splitlines()):
        rec = json.loads(line)
        if rec.get("decision") == "error":
            return f"{rec.get('rule')}: {rec.get('reason')}"
    return ""


def clone_via_gateway(
    up, work: Path, creds: Path, share: Path, script: Path
) -> tuple[float, str, float]:
    state = work / f"state-{time.monotonic_ns()}"
    argv = [
        SANDGATE,
        "run",
        "--state-dir",
        str(state),
        "--json",
        "--audit-log",
        str(work / "audit.jsonl"),
        "--credentials",
        str(creds),
        "--upstream-ca",
        str(up.ca.ca_cert),
        "--allow-cidr",
        "10.214.0.0/16",
        "--resolve",
        f"{HOST}={up.addr}",
        "--repo",
        f"https://{HOST}/{REPO}",
        "--ro",
        str(share),
        "--cpus",
        "2",
        "--memory",
        "4G",
        "-e",
        "GIT_TERMINAL_PROMPT=0",
        "--",
        "python3",
        str(script),
    ]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    finally:
        for record in (state / "sandboxes").glob("*.json"):
            subprocess.run(
                [SANDGATE, "rm", "--state-dir", str(state), record.stem],
                capture_output=True,
                check=False,
            )
        shutil.rmtree(state, ignore_errors=True)
    wall = time.monotonic() - t0
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise BenchError(f"gateway clone failed ({proc.returncode}): {proc.stderr[-2000:]}")
    out = json.loads(lines[-1])
    if out["rc"] != 0:
        err = out["err"].strip().splitlines()
        raise BenchError(
            f"git clone in the sandbox failed: {err[0] if err else ''} "
            f"[gateway audit: {last_audit_error(work)}]"
        )
    return out["seconds"], out["head"], wall


def clone_direct(up) -> tuple[float, str]:
    target = Path(tempfile.mkdtemp(prefix="sgbench-git-", dir="/dev/shm"))
    try:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent", **GIT_ENV}
        t = time.monotonic()
        proc = subprocess.run(
            [
                "git",
                *up.git_direct_args(HOST),
                "clone",
                "-q",
                f"https://{HOST}/{REPO}",
                str(target / "big"),
            ],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        dt = time.monotonic() - t
        if proc.returncode != 0:
            raise BenchError(f"direct clone failed: {proc.stderr[-2000:]}")
        head = git("-C", str(target / "big"), "rev-parse", "HEAD").strip()
        return dt, head
    finally:
        shutil.rmtree(target, ignore_errors=True)


def fmt(values: list[float]) -> str:
    return (
        f"median {statistics.median(values):6.3f} s   "
        f"range {min(values):6.3f} .. {max(values):6.3f} s"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--size-mib", type=int, default=50)
    ap.add_argument("--keep-cache", action="store_true", help="keep the cached repository")
    ap.add_argument(
        "--tls-close-notify",
        action="store_true",
        help="the upstream sends a TLS close_notify before it closes a connection",
    )
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_git.py needs root (network namespaces, sandboxes)", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="sgbench-git-"))
    try:
        base.chmod(0o711)
        t = time.monotonic()
        big = big_repo(args.size_mib)
        pack_bytes = sum(f.stat().st_size for f in (big / "objects" / "pack").glob("*.pack"))
        print(
            f"repository: {pack_bytes / 2**20:.1f} MiB pack (incompressible), "
            f"ready in {time.monotonic() - t:.1f} s ({big})"
        )
        share, creds, work = base / "share", base / "creds", base / "work"
        share.mkdir(mode=0o755)
        share.chmod(0o755)
        creds.mkdir(mode=0o700)
        work.mkdir(mode=0o700)
        script = share / "clone.py"
        script.write_text(CLONE_SCRIPT)
        script.chmod(0o644)
        with git_upstream(base / "upstream", [HOST], close_notify=args.tls_close_notify) as up:
            token = random_token()
            up.set_token(HOST, token)
            fd = os.open(creds / f"{HOST}.token", os.O_WRONLY | os.O_CREAT, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(token + "\n")
            shutil.copytree(big, up.bare(REPO))
            want = git("--git-dir", str(up.bare(REPO)), "rev-parse", "HEAD").strip()
            print(
                f"upstream closes connections {'with' if args.tls_close_notify else 'without'} "
                "a TLS close_notify"
            )
            # Warm-up (page cache, first TLS handshakes), not measured.
            clone_direct(up)
            with contextlib.suppress(BenchError):
                clone_via_gateway(up, work, creds, share, script)
            gw_times, direct_times, walls = [], [], []
            failures: dict[str, list[str]] = {"gateway": [], "direct": []}
            for i in range(args.rounds):
                order = ("gateway", "direct") if i % 2 == 0 else ("direct", "gateway")
                for which in order:
                    try:
                        if which == "gateway":
                            dt, head, wall = clone_via_gateway(up, work, creds, share, script)
                        else:
                            dt, head = clone_direct(up)
                    except BenchError as e:
                        failures[which].append(str(e))
                        print(f"round {i + 1}: {which:<7} FAILED: {e}", flush=True)
                        continue
                    if head != want:
                        raise BenchError(f"{which} clone checked out {head}, not {want}")
                    if which == "gateway":
                        gw_times.append(dt)
                        walls.append(wall)
                    else:
                        direct_times.append(dt)
                    print(f"round {i + 1}: {which:<7} {dt:6.3f} s", flush=True)
            load = os.getloadavg()
        print()
        print(f"clone of {pack_bytes / 2**20:.1f} MiB, {args.rounds} rounds, alternating")
        for which, errors in failures.items():
            if errors:
                print(f"  {which}: {len(errors)} of {args.rounds} clones FAILED")
        if not gw_times or not direct_times:
            print("  no ratio: one side never completed a clone")
            return 1
        print(f"  direct   {fmt(direct_times)}")
        print(
            f"  gateway  {fmt(gw_times)}   (whole `sandgate run`: median "
            f"{statistics.median(walls):.3f} s)"
        )
        ratio = statistics.median(gw_times) / statistics.median(direct_times)
        mib_s = pack_bytes / 2**20 / statistics.median(gw_times)
        print(
            f"  ratio gateway/direct (medians): {ratio:.3f}x  (target <= 1.10x)  "
            f"gateway {mib_s:.0f} MiB/s"
        )
        print(
            f"  load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
            f"on {os.cpu_count()} cores"
        )
        return 0 if ratio <= 1.10 and not any(failures.values()) else 1
    except BenchError as e:
        print(f"bench_git: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(base, ignore_errors=True)
        if not args.keep_cache:
            drop_big_repo()


if __name__ == "__main__":
    sys.exit(main())
