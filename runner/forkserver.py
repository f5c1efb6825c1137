"""The daemon's fork server: the one process that forks the daemon's sandbox inits.

The daemon runs threads (its worker pool, the resolver's) and forking a threaded
process is a gamble on which locks other threads held at that instant. So `sandgate
serve` forks this helper first thing, while it is still single-threaded; the helper
stays single-threaded for good, and forks every init on the daemon's behalf. It is
small, so each fork copies little; it dies with the daemon (parent-death signal), and
the inits it forked do not: they belong to their sandboxes' cgroups, not to it.

Protocol over a socketpair, one request at a time: the daemon sends a length-prefixed
pickle of (CommandSpec, netns path); the helper answers with a length-prefixed pickle
of {"pid": N} or {"error": "..."}, the first carrying init's go-ahead pipe (write end)
and status pipe (read end) as SCM_RIGHTS. Pickle is safe here: both ends are the same
root program, and the socketpair has no name anyone else could reach.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import pickle
import signal
import socket
import struct
import threading

from nft import apply as nft_apply
from nft.apply import NftError

from . import syscalls
from .init import CommandSpec
from .process import LaunchError, StartedInit, _prepared_filter, start_init

_LEN = struct.Struct("!I")


class ForkServerError(Exception):
    """The fork server is gone or answered nonsense; the daemon cannot start sandboxes."""


def _send(sock: socket.socket, obj: object, fds: list[int] | None = None) -> None:
    data = pickle.dumps(obj)
    payload = _LEN.pack(len(data)) + data
    if fds:
        socket.send_fds(sock, [payload], fds)
    else:
        sock.sendall(payload)


def _recv_exact(sock: socket.socket, n: int, fds: list[int]) -> bytes:
    chunks, got = [], 0
    while got < n:
        data, new_fds, _flags, _addr = socket.recv_fds(sock, n - got, 4, socket.MSG_CMSG_CLOEXEC)
        fds.extend(new_fds)
        if not data:
            raise EOFError("the other end closed")
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def _recv(sock: socket.socket) -> tuple[object, list[int]]:
    fds: list[int] = []
    (length,) = _LEN.unpack(_recv_exact(sock, _LEN.size, fds))
    return pickle.loads(_recv_exact(sock, length, fds)), fds


class ForkServer:
    """The daemon's handle on its fork server. Thread-safe: one request at a time."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self._sock = sock
        self._lock = threading.Lock()

    @classmethod
    def start(cls) -> ForkServer:
        """Fork the helper. Call it before the daemon starts any thread."""
        _prepared_filter()  # the seccomp program and cffi, parsed once, inherited
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            ours.close()
            try:
                syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
                if os.getppid() != parent:
                    os._exit(0)
                _serve(theirs)
            finally:
                os._exit(0)
        theirs.close()
        return cls(pid, ours)

    def start_init(self, spec: CommandSpec, netns_path: str) -> StartedInit:
        with self._lock:
            try:
                _send(self._sock, (spec, netns_path))
                answer, fds = _recv(self._sock)
            except (OSError, EOFError, pickle.UnpicklingError, struct.error) as exc:
                raise ForkServerError(f"the fork server is gone: {exc}") from exc
        if not isinstance(answer, dict) or "pid" not in answer or len(fds) != 2:
            for fd in fds:
                os.close(fd)
            error = answer.get("error") if isinstance(answer, dict) else repr(answer)
            raise LaunchError(str(error))
        return StartedInit(pid=answer["pid"], go_fd=fds[0], status_fd=fds[1])

    def apply_sandbox_table(
        self, netns_path: str, gateway_addr: str, gateway_port: int, table: str
    ) -> None:
        """The in-sandbox nftables table, applied from the fork server: it has few
        descriptors, so libnftables' select() on its socket is safe (the daemon has
        two per sandbox, past FD_SETSIZE at ~500), and it is single-threaded."""
        with self._lock:
            try:
                _send(self._sock, ("sandbox_table", netns_path, gateway_addr, gateway_port, table))
                answer, fds = _recv(self._sock)
            except (OSError, EOFError, pickle.UnpicklingError, struct.error) as exc:
                raise ForkServerError(f"the fork server is gone: {exc}") from exc
        for fd in fds:
            os.close(fd)
        if not isinstance(answer, dict) or answer.get("ok") is not True:
            error = answer.get("error") if isinstance(answer, dict) else repr(answer)
            raise NftError(f"the sandbox's own table: {error}")

    def close(self) -> None:
        self._sock.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


def _apply_sandbox_table(netns_path: str, gateway_addr: str, port: int, table: str) -> dict:
    """In the fork server's one thread: join the sandbox's netns, apply, come back."""
    own = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            syscalls.setns(target, syscalls.CLONE_NEWNET)
        finally:
            os.close(target)
        try:
            nft_apply.apply_sandbox_table(
                nft_apply.Nft(), ipaddress.IPv4Address(gateway_addr), port, table
            )
        finally:
            syscalls.setns(own, syscalls.CLONE_NEWNET)
    except (OSError, NftError, ValueError) as exc:
        return {"ok": False, "error": str(exc)}
    finally:
        os.close(own)
    return {"ok": True}


def _serve(sock: socket.socket) -> None:
    """The helper's loop. The inits it forks are reaped by the kernel (SIGCHLD ignored:
    the daemon learns how they end from their status pipes and exec sockets)."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # the daemon decides; the helper follows it
    while True:
        try:
            request, fds = _recv(sock)
        except (EOFError, OSError):
            return
        for fd in fds:
            os.close(fd)
        if isinstance(request, tuple) and request and request[0] == "sandbox_table":
            _send(sock, _apply_sandbox_table(*request[1:]))
            continue
        try:
            spec, netns_path = request  # type: ignore[misc]
            init = start_init(spec, netns_path, close_in_child=(sock.fileno(),))
        except (LaunchError, ValueError, TypeError) as exc:
            _send(sock, {"error": str(exc)})
            continue
        try:
            _send(sock, {"pid": init.pid}, [init.go_fd, init.status_fd])
        finally:
            os.close(init.go_fd)
            os.close(init.status_fd)
