"""What an attacker sees and can touch from inside a sandbox: files, processes, pid 1,
credentials, environment, writable places. Prints one JSON object, then (with --wait)
waits for a line on stdin so that the host can look at the live sandbox.

Usage: python3 inside_view.py RO_DIR MARKER HOST_PID [--wait]
  RO_DIR    a directory bound with --ro that holds a 0600 root file `secret` and a
            0644 file `public`
  MARKER    reversed: a string only a host process's command line holds
  HOST_PID  the test runner's PID on the host
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time


def outcome(fn) -> object:
    """fn()'s result (0 when it returns None), or the errno name it failed with."""
    try:
        result = fn()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return 0 if result is None else result


def read(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode(errors="replace")


def create(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, b"x")
    os.close(fd)
    os.unlink(path)


def overwrite(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def processes() -> list[dict]:
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cmdline = read(f"/proc/{name}/cmdline").split("\0")
            status = read(f"/proc/{name}/status")
        except OSError:
            continue  # exited meanwhile
        uid = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("Uid:"))
        out.append({"pid": int(name), "uid": uid, "cmdline": [c for c in cmdline if c]})
    return sorted(out, key=lambda p: p["pid"])


def status_fields(text: str) -> dict:
    keep = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp", "PPid")
    return {
        key: value.strip()
        for key, _, value in (line.partition(":") for line in text.splitlines())
        if key in keep
    }


def main() -> None:
    # The marker comes reversed, so that no command line in the sandbox holds it.
    ro_dir, marker, host_pid = sys.argv[1], sys.argv[2][::-1], int(sys.argv[3])
    home = os.environ.get("HOME", "/nonexistent")
    procs = processes()
    writes = {
        path: outcome(lambda p=path: create(p))
        for path in (
            "/x",
            "/usr/x",
            "/etc/x",
            "/lib/x",
            "/var/x",
            "/dev/x",
            "/run/x",
            "/home/x",
            "/proc/x",
            "/sys/x",
            f"{ro_dir}/x",
            "/workspace/x",
            "/tmp/x",
            f"{home}/x",
            "/dev/shm/x",
        )
    }
    for path, text in (("/proc/sys/kernel/hostname", "evil"), ("/proc/sysrq-trigger", "h")):
        writes[path] = outcome(lambda p=path, t=text: overwrite(p, t))
    # Left in the workspace for the host to look at.
    with open("/workspace/made-inside", "w") as f:
        f.write("hello\n")
    os.mkdir("/workspace/dir-made-inside")

    view = {
        "ids": {"res_uid": os.getresuid(), "res_gid": os.getresgid(), "groups": os.getgroups()},
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "hostname": socket.gethostname(),
        "sethostname": outcome(lambda: socket.sethostname("evil")),
        # As exec'd: Python itself may add LC_CTYPE to os.environ (PEP 538).
        "env": dict(v.split("=", 1) for v in read("/proc/self/environ").split("\0") if v),
        "status": status_fields(read("/proc/self/status")),
        "processes": procs,
        "marker_seen": any(marker in " ".join(p["cmdline"]) for p in procs),
        "host_pid_present": os.path.exists(f"/proc/{host_pid}"),
        "root_listing": sorted(os.listdir("/")),
        "exists": {p: os.path.lexists(p) for p in ("/root", "/var", "/sys", "/etc/shadow")},
        "list_root_home": outcome(lambda: os.listdir("/root")),
        "read_shadow": outcome(lambda: read("/etc/shadow")),
        "ro_listing": outcome(lambda: sorted(os.listdir(ro_dir))),
        "ro_secret": outcome(lambda: read(f"{ro_dir}/secret")),
        "ro_public": outcome(lambda: read(f"{ro_dir}/public")),
        "self_environ": outcome(lambda: len(read("/proc/self/environ"))),
        "pid1": {
            "environ": outcome(lambda: read("/proc/1/environ")),
            "mem": outcome(lambda: os.close(os.open("/proc/1/mem", os.O_RDONLY))),
            "ns_mnt": outcome(lambda: os.close(os.open("/proc/1/ns/mnt", os.O_RDONLY))),
            "root": outcome(lambda: os.listdir("/proc/1/root")),
            "kill": outcome(lambda: os.kill(1, 9)),
            # The kernel drops signals to a pid namespace's init that it has no handler
            # for, whoever sends them: init must still be there.
            "alive_after_kill": (time.sleep(0.2), os.path.exists("/proc/1/status"))[1],
        },
        "writes": writes,
    }
    print(json.dumps(view), flush=True)
    if "--wait" in sys.argv:
        sys.stdin.readline()


if __name__ == "__main__":
    main()
