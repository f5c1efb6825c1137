"""The sandbox's init: pid 1 of its pid namespace, so the command is not.

Owns what happens inside the new namespaces: hostname, the filesystem view, then
starting the command (privileges dropped, seccomp on, rlimits set) and, while it
runs, reaping every zombie, forwarding signals and finally reporting how the
command ended on the status pipe as one JSON line.

Signals: init blocks the forwarded signals and takes them with sigwaitinfo. One sent
by a process (the runner forwarding a `kill`, si_code SI_USER/SI_TKILL/SI_QUEUE) is
passed on to the command; one raised by the terminal (SI_KERNEL, e.g. Ctrl-C) is not,
because the terminal already sent it to the command's process group.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import resource
import select
import shutil
import signal
import socket
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass

from . import caps, mounts, seccomp, syscalls

FORWARDED_SIGNALS = frozenset(
    {
        signal.SIGINT,
        signal.SIGTERM,
        signal.SIGHUP,
        signal.SIGQUIT,
        signal.SIGUSR1,
        signal.SIGUSR2,
        signal.SIGWINCH,
    }
)
_SI_KERNEL = 0x80

# Exit codes init reports for failures before the command ran (shell conventions).
EXIT_SETUP = 125
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127


@dataclass(frozen=True)
class CommandSpec:
    """Everything init needs to start the command; built by the runner, pure data."""

    argv: tuple[str, ...]
    env: Mapping[str, str]
    cwd: str
    uid: int
    gid: int
    hostname: str
    mounts: mounts.MountPlan
    nofile: int = 4096
    # (host uid, host gid) that root inside a user namespace maps to (`--user root`);
    # None: no user namespace, the command runs as uid/gid directly.
    userns: tuple[int, int] | None = None
    seccomp_filter: bytes = b""  # filled by process.launch from seccomp.build_filter()
    # Resident init (the daemon's sandboxes): no command of its own; it serves exec
    # requests on a Unix socket bound at this host path before it leaves the host's
    # mount namespace. None: the embedded runner's init, which runs `argv` and ends.
    exec_socket: str | None = None


def _report(fd: int, status: dict) -> None:
    data = (json.dumps(status) + "\n").encode()
    with contextlib.suppress(OSError):
        os.write(fd, data)


def _set_rlimits(nofile: int) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = nofile if hard == resource.RLIM_INFINITY else min(nofile, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


def _write_id_maps(pid: int, userns: tuple[int, int]) -> None:
    """From init (root on the host): root inside the command's user namespace is the
    unprivileged host uid/gid, and nothing else is mapped."""
    uid, gid = userns
    for name, text in (
        ("setgroups", "deny"),
        ("uid_map", f"0 {uid} 1\n"),
        ("gid_map", f"0 {gid} 1\n"),
    ):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write(text)


def _enter_user_namespace(sync_w: int, sync_r: int) -> None:
    """In the command's process, for `--user root`: a user namespace that owns none of
    the sandbox's other namespaces (so its root can change nothing), whose root init
    maps to the unprivileged host ids; then become that root."""
    os.setgroups([])  # host root's supplementary groups must not come along
    syscalls.unshare(syscalls.CLONE_NEWUSER)
    os.write(sync_w, b"u")
    if os.read(sync_r, 1) != b"m":
        raise OSError(errno.EPERM, "init did not map the user namespace")
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)


def _exec_command(
    spec: CommandSpec,
    errpipe: int,
    sync: tuple[int, int],
    stdio: tuple[int, int, int] | None = None,
) -> None:
    """In the forked command's process (`--user root`): enter the user namespace, drop
    every capability, then exec. Never returns."""
    try:
        if stdio is not None:
            for i, fd in enumerate(stdio):
                os.dup2(fd, i)
            os.setpgid(0, 0)
        for sig in range(1, signal.NSIG):
            with contextlib.suppress(OSError, ValueError, RuntimeError):
                signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        _set_rlimits(spec.nofile)
        os.chdir(spec.cwd)
        os.umask(0o022)
        _enter_user_namespace(*sync)
        # Root of an otherwise empty user namespace: keep the uid, lose every
        # capability anyway.
        caps.drop_all_capabilities()
        caps.set_no_new_privs()
        # Dropping credentials clears the parent-death signal; set it again.
        syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
        seccomp.install_filter(spec.seccomp_filter or seccomp.build_filter())
        os.closerange(3, errpipe)
        os.closerange(errpipe + 1, 65536)
        os.execvpe(spec.argv[0], list(spec.argv), dict(spec.env))
    except OSError as exc:
        code = EXIT_NOT_FOUND if exc.errno in (errno.ENOENT, errno.ENOTDIR) else EXIT_CANNOT_EXECUTE
        message = f"{spec.argv[0]}: {exc.strerror or exc}"
    except Exception as exc:  # a privilege that would not drop: never exec
        code, message = EXIT_SETUP, f"cannot drop privileges: {exc}"
    with contextlib.suppress(OSError):
        os.write(errpipe, json.dumps({"exit_code": code, "error": message}).encode())
    os._exit(code)


def _no_inherited_fds() -> None:
    """Mark every descriptor above stderr close-on-exec: the command inherits only 0-2."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)


def _drop_to_command(spec: CommandSpec) -> None:
    """init becomes what the command will be: its uid, no capabilities, no_new_privs,
    seccomp, rlimits. Dropping credentials also makes init non-dumpable, so the command,
    though of the same uid, cannot read its memory."""
    _set_rlimits(spec.nofile)
    os.chdir(spec.cwd)
    os.umask(0o022)
    caps.drop_privileges(spec.uid, spec.gid)
    seccomp.install_filter(spec.seccomp_filter or seccomp.build_filter())
    _no_inherited_fds()


def _spawn(
    spec: CommandSpec, stdio: tuple[int, int, int] | None = None
) -> tuple[int | None, dict | None]:
    """posix_spawn (vfork) the command from an init that has already dropped to the
    command's credentials: no second copy of a Python process per command. With
    `stdio`, those descriptors become the command's 0, 1, 2 and it leads a process
    group of its own (an exec into a resident sandbox).

    Returns (pid, None), or (None, status) when the command could not be started."""
    argv0 = spec.argv[0]
    path = argv0 if "/" in argv0 else shutil.which(argv0, path=spec.env.get("PATH", ""))
    if path is None:
        return None, {"exit_code": EXIT_NOT_FOUND, "error": f"{argv0}: command not found"}
    extra: dict = {}
    if stdio is not None:
        extra["file_actions"] = [(os.POSIX_SPAWN_DUP2, fd, i) for i, fd in enumerate(stdio)]
        extra["setpgroup"] = 0
    try:
        pid = os.posix_spawn(
            path,
            list(spec.argv),
            dict(spec.env),
            setsigmask=(),
            setsigdef=signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP},
            **extra,
        )
    except OSError as exc:
        code = EXIT_NOT_FOUND if exc.errno in (errno.ENOENT, errno.ENOTDIR) else 126
        return None, {"exit_code": code, "error": f"{argv0}: {exc.strerror or exc}"}
    return pid, None


def _spawn_unprivileged(spec: CommandSpec) -> tuple[int | None, dict | None]:
    """Drop init to the command's credentials, then start the command (see `_spawn`)."""
    try:
        _drop_to_command(spec)
    except Exception as exc:  # a privilege that would not drop: never start the command
        return None, {"exit_code": EXIT_SETUP, "error": f"cannot drop privileges: {exc}"}
    return _spawn(spec)


def _fork_into_user_namespace(
    spec: CommandSpec, status_fd: int | None, stdio: tuple[int, int, int] | None = None
) -> tuple[int | None, dict | None]:
    """`--user root`: fork the command, which enters a user namespace of its own that
    init (still root on the host) maps; the command then drops and execs itself."""
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    to_init = os.pipe2(os.O_CLOEXEC)
    to_cmd = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(err_r)
        if status_fd is not None:
            os.close(status_fd)
        _exec_command(spec, err_w, (to_init[1], to_cmd[0]), stdio)
    for fd in (err_w, to_init[1], to_cmd[0]):
        os.close(fd)
    if os.read(to_init[0], 1) == b"u":
        with contextlib.suppress(OSError):
            _write_id_maps(pid, spec.userns)
            os.write(to_cmd[1], b"m")
    os.close(to_init[0])
    os.close(to_cmd[1])
    with os.fdopen(err_r, "rb") as f:
        failure = f.read()  # EOF at the exec (close-on-exec) or the failure report
    return pid, (json.loads(failure) if failure else None)


def _kill_everything_else() -> None:
    """As pid 1: SIGKILL every other process of the sandbox's pid namespace."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(-1, signal.SIGKILL)


def _enter_view(spec: CommandSpec, go_fd: int, stamps: dict[str, float]) -> None:
    """hostname, the filesystem view, the bounding set; then, once the runner has put
    init in the sandbox's cgroup (b"g" on go_fd), the cgroup namespace rooted there."""
    syscalls.sethostname(spec.hostname)
    mounts.build_and_enter(spec.mounts)
    stamps["filesystem"] = time.monotonic()
    # Emptying the bounding set takes one prctl (and one credential commit) per
    # capability, ~5 ms in all: done now, while the runner moves this process into
    # the cgroup, rather than on the way to exec. init's own effective
    # capabilities are untouched; only what an exec could gain goes.
    caps.drop_bounding_set()
    if os.read(go_fd, 1) != b"g":
        raise OSError(errno.ECHILD, "the runner went away before the cgroup was ready")
    os.close(go_fd)
    syscalls.unshare(syscalls.CLONE_NEWCGROUP)


def run_init(spec: CommandSpec, status_fd: int, go_fd: int) -> None:
    """Body of pid 1. Never returns: exits after writing the command's end to status_fd.

    go_fd delivers b"g" once the runner has put this process in the sandbox's cgroup;
    only then is the cgroup namespace made (rooted there) and the command started.

    The report carries CLOCK_MONOTONIC stamps (shared by every namespace) of init's
    start, the finished filesystem view and the exec, for the runner's phase timings.
    """
    stamps = {"init": time.monotonic()}
    try:
        _enter_view(spec, go_fd, stamps)
    except Exception as exc:
        _report(status_fd, {"exit_code": EXIT_SETUP, "error": f"sandbox setup failed: {exc}"})
        os._exit(EXIT_SETUP)

    watched = set(FORWARDED_SIGNALS) | {signal.SIGCHLD}
    signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    if spec.userns is None:
        pid, status = _spawn_unprivileged(spec)
    else:
        pid, status = _fork_into_user_namespace(spec, status_fd)
    stamps["exec"] = time.monotonic()

    while pid is not None:
        info = signal.sigwaitinfo(watched)
        if info.si_signo != signal.SIGCHLD:
            if info.si_code != _SI_KERNEL:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, info.si_signo)
            continue
        done = False
        while True:
            try:
                reaped, wstatus = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                done = True
                break
            if reaped == 0:
                break
            if reaped == pid and status is None:
                if os.WIFSIGNALED(wstatus):
                    sig = os.WTERMSIG(wstatus)
                    status = {"exit_code": 128 + sig, "signal": sig}
                else:
                    status = {"exit_code": os.WEXITSTATUS(wstatus)}
            if reaped == pid:
                # The command is gone: so is everything it left running.
                _kill_everything_else()
        if done or status is not None:
            break

    # Reap whatever the final SIGKILL left, then report.
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, 0)[0] > 0:
            pass
    stamps["exit"] = time.monotonic()
    final = status or {"exit_code": EXIT_SETUP, "error": "the command vanished"}
    _report(status_fd, {**final, "stamps": stamps})
    os._exit(0)


# --- resident init: the daemon's sandboxes -------------------------------------------------
#
# The daemon's sandboxes have no command of their own; init stays, as pid 1, and starts
# commands on request ("exec"). Requests come on a Unix socket that init binds at a host
# path (in sandgate's root-only run directory) before it leaves the host's mount
# namespace: nothing inside the sandbox can reach it, and a restarted daemon finds it
# again. Protocol, one JSON object per line:
#   daemon → init  {"argv": [...], "env": {...}, "cwd": "..."}  + 3 fds (SCM_RIGHTS):
#                  the command's stdin, stdout, stderr
#   init → daemon  {"pid": N}  (started; N as the sandbox sees it)
#                  or {"exit_code": 125|126|127, "error": "..."}  (not started)
#   daemon → init  {"signal": N}  (any number of times: to the command's process group)
#   init → daemon  {"exit_code": N[, "signal": S]}  when the command ended
# A daemon that goes away leaves the command running; its end is then not reported.

EXEC_REQUEST_MAX = 256 * 1024


def listen_owner_only(path: str, backlog: int) -> socket.socket:
    """A Unix listener at `path`, mode 0600 from the moment it exists (bound under
    umask 0177: no instant in which anyone else could connect)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(backlog)
    return sock


def bind_exec_socket(path: str) -> socket.socket:
    """The resident init's listening socket, owner-only, at a fresh path."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return listen_owner_only(path, 64)


def run_resident_init(
    spec: CommandSpec, status_fd: int, go_fd: int, listener: socket.socket
) -> None:
    """Body of a resident pid 1. Reports {"ready": true} (or the setup failure) on
    status_fd, closes it, then serves exec requests until killed. Never returns."""
    stamps = {"init": time.monotonic()}
    try:
        _enter_view(spec, go_fd, stamps)
        null = os.open("/dev/null", os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.close(null)
        if spec.userns is None:
            _drop_to_command(spec)
    except Exception as exc:
        _report(status_fd, {"exit_code": EXIT_SETUP, "error": f"sandbox setup failed: {exc}"})
        os._exit(EXIT_SETUP)
    stamps["ready"] = time.monotonic()
    _report(status_fd, {"ready": True, "stamps": stamps})
    os.close(status_fd)
    _ExecServer(spec, listener).serve()


@dataclass
class _ExecConn:
    sock: socket.socket
    buffer: bytes = b""
    fds: list[int] | None = None
    pid: int | None = None  # the command it started


class _ExecServer:
    def __init__(self, spec: CommandSpec, listener: socket.socket) -> None:
        self.spec = spec
        self.listener = listener
        self.poller = select.poll()
        self.conns: dict[int, _ExecConn] = {}
        self.by_pid: dict[int, _ExecConn] = {}

    def serve(self) -> None:
        # SIGCHLD wakes poll() through the wakeup fd; the handler itself does nothing.
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.signal(signal.SIGCHLD, lambda _s, _f: None)
        signal.set_wakeup_fd(wake_w)
        self.poller.register(wake_r, select.POLLIN)
        self.poller.register(self.listener.fileno(), select.POLLIN)
        self._reap()
        while True:
            for fd, _events in self.poller.poll():
                if fd == wake_r:
                    with contextlib.suppress(BlockingIOError):
                        while os.read(wake_r, 512):
                            pass
                    self._reap()
                elif fd == self.listener.fileno():
                    self._accept()
                elif fd in self.conns:
                    self._readable(self.conns[fd])

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        uid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
        if uid != 0:  # only the daemon (root) may ask; nothing else can reach the path
            sock.close()
            return
        self.conns[sock.fileno()] = _ExecConn(sock)
        self.poller.register(sock.fileno(), select.POLLIN)

    def _close(self, conn: _ExecConn) -> None:
        fd = conn.sock.fileno()
        self.conns.pop(fd, None)
        with contextlib.suppress(KeyError, ValueError):
            self.poller.unregister(fd)
        for passed in conn.fds or ():
            with contextlib.suppress(OSError):
                os.close(passed)
        conn.fds = None
        conn.sock.close()
        if conn.pid is not None and self.by_pid.get(conn.pid) is conn:
            self.by_pid[conn.pid] = None  # still running; nobody to tell how it ends

    def _send(self, conn: _ExecConn, message: dict) -> None:
        try:
            conn.sock.sendall((json.dumps(message) + "\n").encode())
        except OSError:
            self._close(conn)

    def _readable(self, conn: _ExecConn) -> None:
        try:
            data, fds, _flags, _addr = socket.recv_fds(
                conn.sock, 65536, 3, socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT
            )
        except BlockingIOError:
            return
        except OSError:
            data, fds = b"", []
        if fds:
            if conn.fds is not None or conn.pid is not None:
                for fd in fds:
                    os.close(fd)
                self._close(conn)
                return
            conn.fds = list(fds)
        if not data:
            self._close(conn)
            return
        conn.buffer += data
        if len(conn.buffer) > EXEC_REQUEST_MAX:
            self._close(conn)
            return
        while b"\n" in conn.buffer and conn.sock.fileno() in self.conns:
            line, conn.buffer = conn.buffer.split(b"\n", 1)
            try:
                message = json.loads(line)
            except ValueError:
                self._close(conn)
                return
            if conn.pid is None:
                self._start(conn, message)
            elif isinstance(message, dict) and isinstance(message.get("signal"), int):
                with contextlib.suppress(OSError):
                    os.killpg(conn.pid, message["signal"])

    def _start(self, conn: _ExecConn, request: object) -> None:
        fds, conn.fds = conn.fds, None
        try:
            if not isinstance(request, dict) or fds is None or len(fds) != 3:
                self._send(conn, {"exit_code": EXIT_SETUP, "error": "bad exec request"})
                self._close(conn)
                return
            argv, env = request.get("argv"), request.get("env", {})
            cwd = request.get("cwd") or self.spec.cwd
            if not (
                isinstance(argv, list)
                and argv
                and all(isinstance(a, str) for a in argv)
                and isinstance(env, dict)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
                and isinstance(cwd, str)
            ):
                self._send(conn, {"exit_code": EXIT_SETUP, "error": "bad exec request"})
                self._close(conn)
                return
            spec = dataclasses.replace(
                self.spec, argv=tuple(argv), env={**self.spec.env, **env}, cwd=cwd
            )
            try:
                os.chdir(cwd)
            except OSError as exc:
                self._send(
                    conn,
                    {"exit_code": EXIT_CANNOT_EXECUTE, "error": f"{cwd}: {exc.strerror or exc}"},
                )
                self._close(conn)
                return
            stdio = (fds[0], fds[1], fds[2])
            if spec.userns is None:
                pid, status = _spawn(spec, stdio)
            else:
                pid, status = _fork_into_user_namespace(spec, None, stdio)
                if status is not None and pid is not None:
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(pid, 0)
                    pid = None
        finally:
            for fd in fds or ():
                with contextlib.suppress(OSError):
                    os.close(fd)
        if pid is None:
            self._send(conn, status or {"exit_code": EXIT_SETUP, "error": "not started"})
            self._close(conn)
            return
        conn.pid = pid
        self.by_pid[pid] = conn
        self._send(conn, {"pid": pid})

    def _reap(self) -> None:
        while True:
            try:
                pid, wstatus = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid not in self.by_pid:
                continue  # an orphan that ended here
            conn = self.by_pid.pop(pid)
            if conn is None:
                continue
            if os.WIFSIGNALED(wstatus):
                sig = os.WTERMSIG(wstatus)
                status = {"exit_code": 128 + sig, "signal": sig}
            else:
                status = {"exit_code": os.WEXITSTATUS(wstatus)}
            self._send(conn, status)
            if conn.sock.fileno() in self.conns:
                self._close(conn)
