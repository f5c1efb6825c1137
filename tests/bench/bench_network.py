#!/usr/bin/env python3
"""Network setup and teardown per sandbox, phase by phase: sandgate (in-process:
pyroute2 + libnftables) side by side with the same steps done by `ip` and `nft`
commands, in the same run, alternating. Prints medians, p90s and ratios.

Run as root: .venv/bin/python tests/bench/bench_network.py [--rounds 50]
Target (issue 2): create p50 <= 15 ms and <= 0.3x the shell baseline.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from netns import addressing, namespace
from nft import ruleset
from runner.config import RunnerConfig
from runner.sandbox import create_sandbox, destroy_sandbox


def sh(*argv: str, stdin: str | None = None) -> None:
    subprocess.run(argv, input=stdin, text=True, check=True, capture_output=True)


def shell_create(sid: str, addr: addressing.SandboxAddress, port: int) -> dict[str, float]:
    """The same objects sandgate makes, made by `ip`, `sysctl` and `nft` commands."""
    ns, ifname = addressing.netns_name(sid), addressing.host_ifname(sid)
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    sh("ip", "netns", "add", ns)
    sh(
        "ip",
        "netns",
        "exec",
        ns,
        "sysctl",
        "-qw",
        "net.ipv6.conf.all.disable_ipv6=1",
        "net.ipv6.conf.default.disable_ipv6=1",
    )
    sh("ip", "link", "add", ifname, "type", "veth", "peer", "name", "eth0", "netns", ns)
    sh(
        "sysctl",
        "-qw",
        f"net.ipv6.conf.{ifname}.disable_ipv6=1",
        f"net.ipv4.conf.{ifname}.rp_filter=1",
        f"net.ipv4.conf.{ifname}.forwarding=0",
    )
    sh("ip", "addr", "add", f"{addr.host}/31", "dev", ifname)
    sh("ip", "link", "set", ifname, "up")
    sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "-n", ns, "addr", "add", f"{addr.sandbox}/31", "dev", "eth0")
    sh("ip", "-n", ns, "link", "set", "eth0", "up")
    t1 = time.perf_counter()
    elems = ruleset.SandboxElements(ifname, addr.sandbox, addr.host, port)
    sh("nft", "-j", "-f", "-", stdin=json.dumps(ruleset.add_sandbox(elems)))
    t2 = time.perf_counter()
    doc = ruleset.sandbox_table(addr.host, port)
    sh("ip", "netns", "exec", ns, "nft", "-j", "-f", "-", stdin=json.dumps(doc))
    t3 = time.perf_counter()
    t["network"], t["host-firewall"], t["sandbox-firewall"] = (
        (t1 - t0) * 1e3,
        (t2 - t1) * 1e3,
        (t3 - t2) * 1e3,
    )
    t["total"] = (t3 - t0) * 1e3
    return t


def shell_destroy(sid: str, addr: addressing.SandboxAddress, port: int) -> dict[str, float]:
    ns, ifname = addressing.netns_name(sid), addressing.host_ifname(sid)
    t0 = time.perf_counter()
    elems = ruleset.SandboxElements(ifname, addr.sandbox, addr.host, port)
    sh("nft", "-j", "-f", "-", stdin=json.dumps(ruleset.delete_sandbox(elems)))
    t1 = time.perf_counter()
    sh("ip", "link", "del", ifname)
    sh("ip", "netns", "del", ns)
    t2 = time.perf_counter()
    return {"host-firewall": (t1 - t0) * 1e3, "network": (t2 - t1) * 1e3, "total": (t2 - t0) * 1e3}


def summary(samples: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    out = {}
    for key in samples[0]:
        values = sorted(s[key] for s in samples)
        out[key] = (statistics.median(values), values[int(0.9 * (len(values) - 1))])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = RunnerConfig(state_dir=Path(tmp))
        # A sandbox kept alive through the run holds the shared table for the shell side.
        anchor = create_sandbox(config)
        try:
            sg_create, sg_destroy, sh_create, sh_destroy, next_create = [], [], [], [], []
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                box = create_sandbox(config)
                total = (time.perf_counter() - t0) * 1e3
                sg_create.append({**box.timings, "total": total})
                t0 = time.perf_counter()
                d = destroy_sandbox(config, box.id)
                sg_destroy.append({**d, "total": (time.perf_counter() - t0) * 1e3})
                # The next create right after a destroy: is teardown on its critical path?
                t0 = time.perf_counter()
                box = create_sandbox(config)
                next_create.append({"total": (time.perf_counter() - t0) * 1e3})
                destroy_sandbox(config, box.id)

                sid = addressing.new_sandbox_id(namespace.sandbox_ids_present())
                addr = addressing.allocate(config.pool, namespace.addresses_in_use())
                try:
                    sh_create.append(shell_create(sid, addr, config.gateway_port))
                finally:
                    sh_destroy.append(shell_destroy(sid, addr, config.gateway_port))
        finally:
            destroy_sandbox(config, anchor.id)

    rows = [
        ("create", summary(sg_create), summary(sh_create)),
        ("destroy", summary(sg_destroy), summary(sh_destroy)),
    ]
    print(f"rounds: {args.rounds} (sandgate and shell alternate in one run)\n")
    print(
        f"{'phase':<28} {'sandgate p50':>12} {'p90':>8} {'shell p50':>10} {'p90':>8} {'ratio':>7}"
    )
    for op, sg, shl in rows:
        for phase, (p50, p90) in sg.items():
            base = shl.get(phase)
            if base:
                print(
                    f"{op + ' ' + phase:<28} {p50:>10.2f}ms {p90:>6.2f}ms {base[0]:>8.2f}ms "
                    f"{base[1]:>6.2f}ms {p50 / base[0]:>6.2f}x"
                )
            else:
                print(f"{op + ' ' + phase:<28} {p50:>10.2f}ms {p90:>6.2f}ms" + " " * 10 + "-" * 3)
    nc = summary(next_create)["total"]
    print(f"\ncreate right after a destroy: p50 {nc[0]:.2f} ms, p90 {nc[1]:.2f} ms")
    create_p50 = summary(sg_create)["total"][0]
    ratio = create_p50 / summary(sh_create)["total"][0]
    print(
        f"create p50 {create_p50:.2f} ms (target <= 15 ms); ratio to shell {ratio:.2f}x "
        f"(target <= 0.3x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
