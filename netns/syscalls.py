"""The namespace and mount system calls Python's os module lacks, through cffi (ABI mode).

netns/ needs setns, unshare and mount to create and join network namespaces; runner/
builds its process-isolation calls on this same module (it may import netns/, not the
other way round). Every wrapper raises OSError with errno and the call named.
"""

from __future__ import annotations

import os
from functools import cache

from cffi import FFI

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_SLAVE = 0x80000
MS_SHARED = 0x100000
MS_STRICTATIME = 0x1000000
MNT_DETACH = 0x2

_CDEF = """
int setns(int fd, int nstype);
int unshare(int flags);
int mount(const char *source, const char *target, const char *filesystemtype,
          unsigned long mountflags, const void *data);
int umount2(const char *target, int flags);
int prctl(int option, unsigned long arg2, unsigned long arg3,
          unsigned long arg4, unsigned long arg5);
long syscall(long number, ...);
int sethostname(const char *name, size_t len);

"""


@cache
def libc() -> tuple[FFI, object]:
    """The FFI and the C library handle (loaded once)."""
    ffi = FFI()
    ffi.cdef(_CDEF)
    return ffi, ffi.dlopen(None)


def check(ret: int, what: str) -> int:
    """Turn a -1 return into OSError(errno, "<what>: <strerror>")."""
    if ret == -1:
        err = libc()[0].errno
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def _cstr(p: str | None) -> object:
    return libc()[0].NULL if p is None else os.fsencode(p)


def setns(fd: int, nstype: int = 0) -> None:
    """Move the calling thread into the namespace that `fd` refers to."""
    check(libc()[1].setns(fd, nstype), "setns")


def unshare(flags: int) -> None:
    check(libc()[1].unshare(flags), f"unshare({flags:#x})")


def mount(
    source: str | None,
    target: str,
    fstype: str | None = None,
    flags: int = 0,
    data: str | None = None,
) -> None:
    ret = libc()[1].mount(_cstr(source), _cstr(target), _cstr(fstype), flags, _cstr(data))
    check(ret, f"mount {source or fstype} on {target}")


def umount2(target: str, flags: int = 0) -> None:
    check(libc()[1].umount2(os.fsencode(target), flags), f"umount {target}")
