"""The sandbox's filesystem view: deny by default, built on a fresh tmpfs root.

Owns: the mount plan (pure: what goes where, with which flags) and carrying it out
inside the sandbox's own mount namespace, then pivot_root into it.

What is in the view: read-only binds of /usr, /bin, /sbin, /lib* and /etc (with
sandgate's own config masked and resolv.conf naming no resolver); private tmpfs
/tmp, /run and the sandbox user's home; a minimal /dev; a new /proc for the sandbox's
pid namespace with its writable corners read-only; the workspace read-write at a
fixed path; and extra --ro/--rw binds. Nothing else: not /root, /home, /var,
/sys, /run/sandgate. Every mount is nosuid, and nodev except the device binds.

Symlink races: every bind source is resolved with realpath and checked when the
command line is read; init then opens exactly that path with openat2
(RESOLVE_NO_SYMLINKS: no component may be a symlink, so a directory swapped for a
link after the check fails the open) and binds from /proc/self/fd/N, so the mount is
of what was opened. Targets live in the fresh root, which only sandgate writes to
until the pivot.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from . import syscalls

# Read-only system directories (where present). Merged-/usr symlinks are recreated.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
# Inside /etc: sandgate's own config and credentials are masked by an empty tmpfs.
MASKED_DIRS = ("/etc/sandgate",)
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
# /proc entries a sandbox must not write even if it somehow had the privilege.
PROC_READONLY = ("sys", "sysrq-trigger", "irq", "bus", "fs")
# Where the new root is assembled, inside the sandbox's private mount namespace.
STAGING = "/run/sandgate/rootfs"
# Paths that never enter a sandbox, whatever --workspace/--ro/--rw ask for: these
# with everything below them, and every directory above them (binding /var would
# bring /var/lib/sandgate along). A user's own project under /home/NAME is allowed.
FORBIDDEN_TREES = ("/root", "/var/lib/sandgate", "/run/sandgate", "/etc/sandgate", "/proc", "/sys")
FORBIDDEN_EXACT = ("/", "/home")

RESOLV_CONF = (
    b"# sandgate: there is no DNS inside a sandbox. Programs reach the outside through\n"
    b"# the gateway (HTTP_PROXY / HTTPS_PROXY), which resolves names itself.\n"
)

NOSUID_NODEV = syscalls.MS_NOSUID | syscalls.MS_NODEV


class MountError(Exception):
    """The filesystem view could not be built; the message names the path."""


@dataclass(frozen=True)
class Bind:
    source: str  # host path, already resolved
    target: str  # path inside the sandbox
    writable: bool


@dataclass(frozen=True)
class FilesystemSpec:
    workspace: str | None = None  # host directory; None = an empty tmpfs
    workspace_target: str = "/workspace"
    ro: tuple[str, ...] = ()
    rw: tuple[str, ...] = ()
    home: str = "/home/sandbox"
    uid: int = 65534
    gid: int = 65534
    tmpfs_size: str = "256m"


@dataclass(frozen=True)
class MountPlan:
    symlinks: tuple[tuple[str, str], ...]  # (target in sandbox, link text)
    binds: tuple[Bind, ...]
    tmpfs: tuple[tuple[str, str], ...]  # (target, mount options)
    masked: tuple[str, ...] = field(default=())


def _check_extra(path: str, flag: str) -> str:
    if not os.path.isabs(path):
        raise MountError(f"{flag} {path}: must be an absolute path")
    try:
        real = os.path.realpath(path, strict=True)
    except FileNotFoundError as exc:
        raise MountError(f"{flag} {path}: does not exist") from exc
    except OSError as exc:
        raise MountError(f"{flag} {path}: cannot resolve it: {exc.strerror or exc}") from exc
    for bad in FORBIDDEN_TREES:
        if real == bad or real.startswith(bad + "/") or bad.startswith(real.rstrip("/") + "/"):
            raise MountError(f"{flag} {path}: {real} is never mounted into a sandbox ({bad})")
    if real in FORBIDDEN_EXACT:
        raise MountError(f"{flag} {path}: {real} is never mounted into a sandbox as a whole")
    return real


def plan_mounts(spec: FilesystemSpec, host_root: str = "/") -> MountPlan:
    """What the sandbox's view holds (pure apart from reading the host's directory layout)."""
    symlinks: list[tuple[str, str]] = []
    binds: list[Bind] = []
    for path in SYSTEM_DIRS:
        host = os.path.join(host_root, path.lstrip("/"))
        if os.path.islink(host):
            symlinks.append((path, os.readlink(host)))
        elif os.path.isdir(host):
            binds.append(Bind(source=path, target=path, writable=False))
    masked = tuple(p for p in MASKED_DIRS if os.path.isdir(os.path.join(host_root, p.lstrip("/"))))
    mode = f"uid={spec.uid},gid={spec.gid}"
    tmpfs = [
        ("/tmp", f"mode=1777,size={spec.tmpfs_size}"),
        ("/run", "mode=0755,size=16m"),
        (spec.home, f"mode=0700,{mode},size={spec.tmpfs_size}"),
    ]
    if spec.workspace is None:
        tmpfs.append((spec.workspace_target, f"mode=0755,{mode},size={spec.tmpfs_size}"))
    else:
        src = _check_extra(spec.workspace, "--workspace")
        if not os.path.isdir(src):
            raise MountError(f"--workspace {spec.workspace}: not a directory")
        binds.append(Bind(source=src, target=spec.workspace_target, writable=True))
    for flag, paths, writable in (("--ro", spec.ro, False), ("--rw", spec.rw, True)):
        for path in paths:
            binds.append(Bind(source=_check_extra(path, flag), target=path, writable=writable))
    targets = [b.target for b in binds] + [t for t, _ in tmpfs]
    dupes = {t for t in targets if targets.count(t) > 1}
    if dupes:
        raise MountError(f"more than one mount at {', '.join(sorted(dupes))}")
    return MountPlan(tuple(symlinks), tuple(binds), tuple(tmpfs), masked)


def with_bind(plan: MountPlan, source: str, target: str, writable: bool = True) -> MountPlan:
    """The plan plus one bind sandgate itself provides (the gateway socket); the source
    is sandgate's own file, so it skips the checks for user-given paths."""
    return dataclasses.replace(plan, binds=(*plan.binds, Bind(source, target, writable)))


# --- effects: these run in the sandbox's init, in its own mount namespace --------------


def _open_path(path: str) -> int:
    """An O_PATH descriptor to exactly this resolved path: no component may be a symlink."""
    resolve = syscalls.RESOLVE_NO_SYMLINKS | syscalls.RESOLVE_NO_MAGICLINKS
    try:
        fd = syscalls.openat2(path, os.O_PATH | os.O_CLOEXEC, resolve)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise MountError(
                f"{path}: a component became a symlink after it was checked; refusing it"
            ) from exc
        raise MountError(f"{path}: cannot open: {exc.strerror}") from exc
    # Belt and braces: the kernel's own name for what was opened is the checked path.
    if os.readlink(f"/proc/self/fd/{fd}") != path:
        os.close(fd)
        raise MountError(f"{path}: opened something else; refusing it")
    return fd


def _mkdirs(path: str) -> None:
    os.makedirs(path, mode=0o755, exist_ok=True)


def _mount_point(root: str, target: str, like: int) -> str:
    """Create the empty file or directory a bind of `like` (an fd) lands on."""
    dest = os.path.join(root, target.lstrip("/"))
    if stat.S_ISDIR(os.fstat(like).st_mode):
        _mkdirs(dest)
    else:
        _mkdirs(os.path.dirname(dest))
        if not os.path.lexists(dest):
            os.close(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
    return dest


def _bind(fd: int, dest: str, writable: bool, dev: bool = False) -> None:
    flags = syscalls.MS_NOSUID | (0 if dev else syscalls.MS_NODEV)
    syscalls.mount(f"/proc/self/fd/{fd}", dest, None, syscalls.MS_BIND)
    syscalls.mount(
        None,
        dest,
        None,
        syscalls.MS_REMOUNT | syscalls.MS_BIND | flags | (0 if writable else syscalls.MS_RDONLY),
    )


def _tmpfs(dest: str, options: str, readonly: bool = False) -> None:
    _mkdirs(dest)
    flags = NOSUID_NODEV | (syscalls.MS_RDONLY if readonly else 0)
    syscalls.mount("tmpfs", dest, "tmpfs", flags, options)


@contextlib.contextmanager
def _opened(binds: Sequence[Bind]) -> Iterator[list[int]]:
    fds: list[int] = []
    try:
        for b in binds:
            fds.append(_open_path(b.source))
        yield fds
    finally:
        for fd in fds:
            os.close(fd)


def _build_dev(root: str) -> None:
    dev = os.path.join(root, "dev")
    _tmpfs(dev, "mode=0755,size=1m")
    for name in DEVICES:
        fd = _open_path(f"/dev/{name}")
        try:
            _bind(fd, _mount_point(root, f"/dev/{name}", fd), writable=True, dev=True)
        finally:
            os.close(fd)
    pts = os.path.join(dev, "pts")
    _mkdirs(pts)
    syscalls.mount(
        "devpts",
        pts,
        "devpts",
        syscalls.MS_NOSUID | syscalls.MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    )
    os.symlink("pts/ptmx", os.path.join(dev, "ptmx"))
    _tmpfs(os.path.join(dev, "shm"), "mode=1777,size=64m")
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, os.path.join(dev, name))


def _build_proc(root: str) -> None:
    proc = os.path.join(root, "proc")
    _mkdirs(proc)
    flags = NOSUID_NODEV | syscalls.MS_NOEXEC
    syscalls.mount("proc", proc, "proc", flags, None)
    for name in PROC_READONLY:
        path = os.path.join(proc, name)
        if os.path.exists(path):
            syscalls.mount(path, path, None, syscalls.MS_BIND | syscalls.MS_REC)
            syscalls.mount(
                None,
                path,
                None,
                syscalls.MS_REMOUNT | syscalls.MS_BIND | flags | syscalls.MS_RDONLY,
            )


def build_and_enter(plan: MountPlan, root: str = STAGING) -> None:
    """Assemble the view on a fresh tmpfs and pivot_root into it.

    Call in a process that has its own mount namespace and is pid 1 of the sandbox's
    pid namespace (the new /proc shows that namespace). On return, / is the sandbox's
    read-only root and the host's tree is unreachable.
    """
    syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
    binds = sorted(plan.binds, key=lambda b: b.target.count("/"))
    with _opened(binds) as fds:
        _mkdirs(root)
        _tmpfs(root, "mode=0755,size=16m")
        for target, link in plan.symlinks:
            os.symlink(link, os.path.join(root, target.lstrip("/")))
        # tmpfs first (all top-level), then binds parents-first, so nothing is hidden.
        for target, options in sorted(plan.tmpfs, key=lambda item: item[0].count("/")):
            _tmpfs(os.path.join(root, target.lstrip("/")), options)
        for b, fd in zip(binds, fds, strict=True):
            _bind(fd, _mount_point(root, b.target, fd), b.writable)
    for target in plan.masked:
        _tmpfs(os.path.join(root, target.lstrip("/")), "mode=0755,size=4k", readonly=True)
    _no_resolver(root)
    _build_dev(root)
    _build_proc(root)
    os.chdir(root)
    syscalls.pivot_root(".", ".")
    syscalls.umount2(".", syscalls.MNT_DETACH)
    os.chdir("/")
    # The root itself is read-only: a sandbox writes only to its tmpfs and binds.
    syscalls.mount(None, "/", None, syscalls.MS_REMOUNT | syscalls.MS_RDONLY | NOSUID_NODEV)


def _no_resolver(root: str) -> None:
    """/etc/resolv.conf names no resolver: bound read-only from a file in the sandbox's /run."""
    resolv = os.path.join(root, "etc", "resolv.conf")
    if not os.path.lexists(resolv):
        return
    staged = os.path.join(root, "run", "resolv.conf")
    _mkdirs(os.path.dirname(staged))
    with open(staged, "wb") as f:
        f.write(RESOLV_CONF)
    fd = _open_path(staged)
    try:
        if os.path.islink(resolv):
            return  # a symlink into /run (systemd-resolved): /run is ours and empty
        _bind(fd, resolv, writable=False)
    finally:
        os.close(fd)
