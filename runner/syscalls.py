"""Process-isolation system calls Python's os module lacks, through cffi (ABI mode).

Builds on netns/syscalls.py (setns, unshare, mount, umount2, prctl's declaration and
the CLONE_*/MS_* constants live there, shared with netns/) and adds pivot_root,
sethostname, prctl, capget/capset and seccomp. Every wrapper raises OSError with
errno and the call named, so callers never check return codes.
"""

from __future__ import annotations

import os
import struct
from functools import cache

from cffi import FFI

from netns.syscalls import (  # noqa: F401  (re-exported for runner/)
    CLONE_NEWCGROUP,
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWUSER,
    CLONE_NEWUTS,
    MNT_DETACH,
    MS_BIND,
    MS_MOVE,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
    MS_SHARED,
    MS_SLAVE,
    MS_STRICTATIME,
    check,
    libc,
    mount,
    setns,
    umount2,
    unshare,
)

PR_SET_PDEATHSIG = 1
PR_SET_KEEPCAPS = 8
PR_SET_SECCOMP = 22
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return check(libc()[1].prctl(option, arg2, arg3, arg4, arg5), f"prctl({option})")


def sethostname(name: str) -> None:
    raw = name.encode()
    check(libc()[1].sethostname(raw, len(raw)), "sethostname")


# pivot_root has no glibc wrapper; its number is per architecture.
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}


def pivot_root(new_root: str, put_old: str) -> None:
    ffi, lib = libc()
    nr = _SYS_PIVOT_ROOT.get(os.uname().machine)
    if nr is None:
        raise OSError(0, f"pivot_root: unsupported architecture {os.uname().machine}")
    ret = lib.syscall(
        ffi.cast("long", nr),
        ffi.new("char[]", os.fsencode(new_root)),
        ffi.new("char[]", os.fsencode(put_old)),
    )
    check(ret, "pivot_root")


# openat2 has no glibc wrapper; its number is the same on every architecture.
_SYS_OPENAT2 = 437
_AT_FDCWD = -100
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04


def openat2(path: str, flags: int, resolve: int) -> int:
    """open(2) with RESOLVE_* rules applied to every component of `path` (Linux 5.6+)."""
    ffi, lib = libc()
    how = ffi.new("char[]", struct.pack("=QQQ", flags, 0, resolve))
    ret = lib.syscall(
        ffi.cast("long", _SYS_OPENAT2),
        ffi.cast("int", _AT_FDCWD),
        ffi.new("char[]", os.fsencode(path)),
        how,
        ffi.cast("size_t", 24),
    )
    return check(ret, f"openat2 {path}")


# --- Capabilities and seccomp (used by runner/caps.py and runner/seccomp.py) ---

PR_GET_KEEPCAPS = 7
PR_GET_SECCOMP = 21
PR_CAPBSET_READ = 23
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT_IS_SET = 1
SECCOMP_MODE_FILTER = 2

# capget/capset: version 3 carries 64 capability bits as two 32-bit halves.
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_CDEF_PRIVS = """
struct cap_header { uint32_t version; int pid; };
struct cap_data { uint32_t effective; uint32_t permitted; uint32_t inheritable; };
struct sock_filter { uint16_t code; uint8_t jt; uint8_t jf; uint32_t k; };
struct sock_fprog { unsigned short len; struct sock_filter *filter; };
int capget(struct cap_header *hdrp, struct cap_data *datap);
int capset(struct cap_header *hdrp, const struct cap_data *datap);
int prctl(int option, unsigned long arg2, unsigned long arg3,
          unsigned long arg4, unsigned long arg5);
"""


@cache
def _privs_lib() -> tuple[FFI, object]:
    # A separate FFI so these struct declarations stay next to the calls that use them.
    ffi = FFI()
    ffi.cdef(_CDEF_PRIVS)
    return ffi, ffi.dlopen(None)


def capget() -> tuple[int, int, int]:
    """The calling thread's (effective, permitted, inheritable) capability masks."""
    ffi, lib = _privs_lib()
    header = ffi.new("struct cap_header *", {"version": _LINUX_CAPABILITY_VERSION_3})
    data = ffi.new("struct cap_data[2]")
    check(lib.capget(header, data), "capget")
    return (
        data[0].effective | data[1].effective << 32,
        data[0].permitted | data[1].permitted << 32,
        data[0].inheritable | data[1].inheritable << 32,
    )


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """Set the calling thread's capability masks (64-bit each)."""
    ffi, lib = _privs_lib()
    header = ffi.new("struct cap_header *", {"version": _LINUX_CAPABILITY_VERSION_3})
    data = ffi.new("struct cap_data[2]")
    for i in range(2):
        shift = 32 * i
        data[i].effective = (effective >> shift) & 0xFFFFFFFF
        data[i].permitted = (permitted >> shift) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> shift) & 0xFFFFFFFF
    check(lib.capset(header, data), "capset")


def seccomp_set_mode_filter(program: bytes) -> None:
    """prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &sock_fprog) for a classic BPF program.

    `program` is the raw array of struct sock_filter (8 bytes each, native order).
    The kernel copies the program, so the buffers need only live through the call.
    """
    if not program or len(program) % 8:
        raise ValueError(
            f"seccomp program must be a non-empty multiple of 8 bytes, not {len(program)}"
        )
    ffi, lib = _privs_lib()
    insns = ffi.new("char[]", program)
    fprog = ffi.new(
        "struct sock_fprog *",
        {"len": len(program) // 8, "filter": ffi.cast("struct sock_filter *", insns)},
    )
    ret = lib.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ffi.cast("unsigned long", fprog), 0, 0)
    check(ret, "prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER)")
