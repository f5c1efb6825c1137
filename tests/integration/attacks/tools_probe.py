"""Privilege through programs rather than raw system calls: setuid binaries, the
`unshare` and `mount` tools, `ip` and `nft` against the sandbox's own network.

Usage: python3 tools_probe.py NAME...   where NAME is a key of TOOLS, or `file:PATH`
to run a setuid-root copy PATH (of /usr/bin/id) that reports its effective ids.
Prints {"NAME": {"rc": N, "out": "...", "err": "..."}}.
"""

from __future__ import annotations

import json
import subprocess
import sys

TOOLS = {
    # util-linux's unshare: a new user namespace is the usual first step of an escape.
    "unshare_user": ["unshare", "-U", "--map-root-user", "id", "-u"],
    "unshare_mount": ["unshare", "-m", "true"],
    # setuid-root programs from the host's /usr.
    "su": ["su", "-c", "id -u"],
    "mount_tmpfs": ["mount", "-t", "tmpfs", "none", "/tmp"],
    # The sandbox's own network configuration.
    "ip_route_add": ["ip", "route", "add", "192.0.2.0/24", "dev", "eth0"],
    "ip_link_down": ["ip", "link", "set", "eth0", "down"],
    "ip_addr_add": ["ip", "addr", "add", "192.0.2.9/32", "dev", "eth0"],
    "nft_flush": ["nft", "flush", "ruleset"],
    "nft_delete_table": ["nft", "delete", "table", "inet", "sandgate"],
}


def run(argv: list[str]) -> dict:
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=20
        )
    except OSError as exc:
        return {"rc": -1, "out": "", "err": str(exc)}
    return {"rc": proc.returncode, "out": proc.stdout.strip(), "err": proc.stderr.strip()}


def main(names: list[str]) -> None:
    result = {}
    for name in names:
        if name.startswith("file:"):
            path = name[5:]
            result[name] = {"euid": run([path, "-u"]), "egid": run([path, "-g"])}
        else:
            result[name] = run(TOOLS[name])
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
