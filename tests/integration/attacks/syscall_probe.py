"""Attack probes for the kernel surface the sandbox must close, run as a script.

Runs inside a sandbox (the attack) and on the host (the positive control: the same
probe, with nothing in the way, works). Each probe runs in its own forked child, so a
probe that changes the process (a new user namespace, a tracer) cannot colour the
next. Prints one JSON object: probe name -> 0 (it worked) or the errno name it got.

Usage: python3 syscall_probe.py [NAME...]   (default: every probe)
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import signal
import socket
import sys
import tempfile
import time

_NR = {
    "x86_64": {
        "clone": 56,
        "mount": 165,
        "umount2": 166,
        "unshare": 272,
        "bpf": 321,
        "perf_event_open": 298,
        "ptrace": 101,
        "io_uring_setup": 425,
        "keyctl": 250,
    },
    "aarch64": {
        "clone": 220,
        "mount": 40,
        "umount2": 39,
        "unshare": 97,
        "bpf": 280,
        "perf_event_open": 241,
        "ptrace": 117,
        "io_uring_setup": 425,
        "keyctl": 219,
    },
}[platform.machine()]

CLONE_NEWUSER = 0x10000000
PTRACE_TRACEME, PTRACE_ATTACH, PTRACE_DETACH = 0, 16, 17
BPF_MAP_CREATE, BPF_MAP_TYPE_ARRAY = 0, 2
PERF_TYPE_SOFTWARE, PERF_COUNT_SW_TASK_CLOCK = 1, 1
PERF_FLAGS = 1 | 1 << 5 | 1 << 6  # disabled, exclude_kernel, exclude_hv: allowed to users
KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING = 0, -3

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def syscall(name: str, *args: object) -> int:
    """syscall(2); raises OSError like the os module does."""
    conv = [a if isinstance(a, ctypes.Array | ctypes.c_char_p) else ctypes.c_long(a) for a in args]
    ret = _libc.syscall(ctypes.c_long(_NR[name]), *conv)
    if ret == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def mount_tmpfs() -> None:
    where = tempfile.mkdtemp()
    try:
        syscall(
            "mount",
            ctypes.c_char_p(b"none"),
            ctypes.c_char_p(where.encode()),
            ctypes.c_char_p(b"tmpfs"),
            0,
            0,
        )
        syscall("umount2", ctypes.c_char_p(where.encode()), 0)
    finally:
        os.rmdir(where)


def unshare_user() -> None:
    syscall("unshare", CLONE_NEWUSER)


def clone_user() -> None:
    pid = syscall("clone", CLONE_NEWUSER | signal.SIGCHLD, 0, 0, 0, 0)
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)


def bpf_map() -> None:
    attr = ctypes.create_string_buffer(128)
    ctypes.memmove(attr, (ctypes.c_uint32 * 4)(BPF_MAP_TYPE_ARRAY, 4, 4, 1), 16)
    os.close(syscall("bpf", BPF_MAP_CREATE, attr, 128))


def perf_event() -> None:
    attr = ctypes.create_string_buffer(128)
    ctypes.memmove(attr, (ctypes.c_uint32 * 2)(PERF_TYPE_SOFTWARE, 128), 8)
    ctypes.memmove(ctypes.byref(attr, 8), (ctypes.c_uint64 * 1)(PERF_COUNT_SW_TASK_CLOCK), 8)
    ctypes.memmove(ctypes.byref(attr, 40), (ctypes.c_uint64 * 1)(PERF_FLAGS), 8)
    os.close(syscall("perf_event_open", attr, 0, -1, -1, 0))


def ptrace_traceme() -> None:
    syscall("ptrace", PTRACE_TRACEME, 0, 0, 0)


def ptrace_sibling() -> None:
    """Attach to a process of the same uid that is not our descendant: the easiest target."""
    target = int(os.environ["PROBE_SIBLING"])
    syscall("ptrace", PTRACE_ATTACH, target, 0, 0)
    os.waitpid(target, getattr(os, "__WALL", 0x40000000))
    syscall("ptrace", PTRACE_DETACH, target, 0, 0)


def ptrace_init() -> None:
    syscall("ptrace", PTRACE_ATTACH, 1, 0, 0)


def io_uring() -> None:
    params = ctypes.create_string_buffer(120)
    os.close(syscall("io_uring_setup", 4, params))


def keyring() -> None:
    syscall("keyctl", KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0)


def raw_socket() -> None:
    socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()


def packet_socket() -> None:
    socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0).close()


PROBES = {
    "mount_tmpfs": mount_tmpfs,
    "unshare_user": unshare_user,
    "clone_user": clone_user,
    "bpf_map": bpf_map,
    "perf_event": perf_event,
    "ptrace_traceme": ptrace_traceme,
    "ptrace_sibling": ptrace_sibling,
    "ptrace_init": ptrace_init,
    "io_uring": io_uring,
    "keyring": keyring,
    "raw_socket": raw_socket,
    "packet_socket": packet_socket,
}


def run_one(fn) -> str | int:
    """The probe in a forked child; 0 or the errno name, 'crash:N' if the child died."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            fn()
            out = "0"
        except OSError as exc:
            out = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        except BaseException as exc:
            out = f"error:{type(exc).__name__}:{exc}"
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    if not out:
        return f"crash:{status}"
    return 0 if out == "0" else out


def main(names: list[str]) -> None:
    sibling = os.fork()
    if sibling == 0:
        time.sleep(60)
        os._exit(0)
    os.environ["PROBE_SIBLING"] = str(sibling)
    try:
        result = {name: run_one(PROBES[name]) for name in names or PROBES}
    finally:
        os.kill(sibling, signal.SIGKILL)
        os.waitpid(sibling, 0)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
