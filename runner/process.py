"""Starting the sandbox's process tree and waiting for it like `docker run` does.

Owns the runner's side of a sandbox's processes: the fork into the sandbox's
namespaces, the cgroup hand-over, terminal foreground hand-over, signal forwarding,
the wall-clock limit, and turning init's report into an outcome.

The tree, as the host sees it:

    sandgate (runner)
      └─ init    forked straight into a new pid namespace (pid 1 inside); joins the
         │       netns, unshares mount/uts/ipc/cgroup, builds the filesystem view,
         │       reaps, forwards signals (runner/init.py)
         └─ CMD   unprivileged, no capabilities, seccomp, rlimits

init is in the sandbox's cgroup before it unshares anything, so every descendant is
too, and the cgroup namespace is rooted there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import select
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from . import seccomp, syscalls
from .cgroups import Cgroup
from .init import (
    EXIT_SETUP,
    FORWARDED_SIGNALS,
    CommandSpec,
    bind_exec_socket,
    run_init,
    run_resident_init,
)

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Unshared by init itself; the pid namespace is made by the fork that creates it.
NAMESPACES = (
    syscalls.CLONE_NEWNS | syscalls.CLONE_NEWUTS | syscalls.CLONE_NEWIPC | syscalls.CLONE_NEWCGROUP
)


class LaunchError(Exception):
    """The sandbox's processes could not be started; nothing of them is left."""


@dataclass
class Outcome:
    """How the command ended, for `sandgate run`'s exit code and --json summary."""

    exit_code: int
    signal: int | None = None
    error: str | None = None
    timed_out: bool = False
    oom_killed: bool = False
    peak_memory: int | None = None
    # Milliseconds per launch phase: entry (fork of init, cgroup, namespaces),
    # filesystem (the view and pivot_root), exec (fork of the command, privilege drop,
    # seccomp, exec), command (until it ended).
    phases: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        out: dict = {"exit_code": self.exit_code}
        for key in ("signal", "error", "peak_memory"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        out["timed_out"] = self.timed_out
        out["oom_killed"] = self.oom_killed
        if self.phases:
            out["launch_ms"] = self.phases
        return out


def sandbox_env(extra: Mapping[str, str], sandbox_id: str, home: str, user: str) -> dict[str, str]:
    """The command's environment: a small fixed base, never the caller's whole one."""
    env = {
        "PATH": DEFAULT_PATH,
        "SANDGATE_ID": sandbox_id,
        "HOME": home,
        "USER": user,
        "LOGNAME": user,
    }
    for key in ("TERM", "LANG", "LC_ALL", "TZ"):
        if key in os.environ:
            env[key] = os.environ[key]
    env.update(extra)
    return env


def _controlling_tty() -> int | None:
    """stdin's fd if it is a terminal whose foreground group is ours, else None."""
    try:
        fd = sys.stdin.fileno()
        if os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp():
            return fd
    except (OSError, ValueError):
        pass
    return None


def _take_terminal(tty: int | None, pgrp: int) -> None:
    if tty is None:
        return
    old = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    try:
        with contextlib.suppress(OSError):
            os.tcsetpgrp(tty, pgrp)
    finally:
        signal.signal(signal.SIGTTOU, old)


def read_to_eof(fd: int, deadline: float | None = None) -> bytes:
    """Everything up to EOF (the writer closed or died), or b"" at the deadline.
    poll, not select: the daemon's descriptors go past FD_SETSIZE."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    chunks = []
    while True:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                return b""
        try:
            chunk = os.read(fd, 4096)
        except InterruptedError:
            continue
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _become_init(spec: CommandSpec, netns_path: str, go_r: int, status_w: int) -> None:
    """The forked child: pid 1 of the sandbox's new pid namespace. Never returns."""
    try:
        if spec.exec_socket is None:
            # Embedded: the sandbox lives as long as the runner that waits for it.
            syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
        else:
            # Resident (the daemon's): outlives the daemon; answers exec requests on a
            # socket made here, in the host's mount namespace, before leaving it.
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the fork server ignores it
            exec_listener = bind_exec_socket(spec.exec_socket)
        if os.read(go_r, 1) != b"s":
            os._exit(EXIT_SETUP)  # the runner went away before starting the gateway
        ns_fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
        syscalls.setns(ns_fd, syscalls.CLONE_NEWNET)
        os.close(ns_fd)
        syscalls.unshare(NAMESPACES)
    except BaseException as exc:
        report = {"exit_code": EXIT_SETUP, "error": f"cannot enter the sandbox: {exc}"}
        with contextlib.suppress(BaseException):
            os.write(status_w, (json.dumps(report) + "\n").encode())
        os._exit(EXIT_SETUP)
    if spec.exec_socket is None:
        run_init(spec, status_w, go_r)
    else:
        run_resident_init(spec, status_w, go_r, exec_listener)


def _fork_into_new_pid_namespace() -> int:
    """fork(), with the child as pid 1 of a new pid namespace and this process's own
    children-to-be back in its own namespace afterwards. Saves the intermediate
    process that unshare(CLONE_NEWPID) would otherwise need (a whole Python fork)."""
    own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    try:
        syscalls.unshare(syscalls.CLONE_NEWPID)
        pid = -1
        try:
            pid = os.fork()
        finally:
            if pid != 0:  # the parent, whether or not the fork worked
                syscalls.setns(own, syscalls.CLONE_NEWPID)
    finally:
        os.close(own)
    return pid


@dataclass
class Running:
    init_pid: int
    status_fd: int
    tty: int | None
    cgroup: Cgroup | None
    started: float  # CLOCK_MONOTONIC at launch()

    def wait(self, timeout: float | None = None) -> Outcome:
        """Forward signals until the command ends (or the wall clock runs out)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            with forwarding_signals(self.init_pid):
                raw = read_to_eof(self.status_fd, deadline)
            timed_out = not raw and deadline is not None and time.monotonic() >= deadline
            if timed_out and self.cgroup is not None:
                self.cgroup.kill_all()
        finally:
            os.close(self.status_fd)
            _reap(self.init_pid)
            _take_terminal(self.tty, os.getpgrp())
        if timed_out:
            outcome = Outcome(exit_code=128 + signal.SIGKILL, signal=signal.SIGKILL)
            outcome.timed_out = True
            outcome.error = f"killed: the wall-clock limit of {timeout:g}s ran out"
        elif raw:
            report = json.loads(raw.decode().splitlines()[-1])
            outcome = Outcome(
                exit_code=report["exit_code"],
                signal=report.get("signal"),
                error=report.get("error"),
                phases=_phases(self.started, report.get("stamps", {})),
            )
        else:
            # init died without a word: killed from outside (OOM of init, kill -9).
            outcome = Outcome(exit_code=128 + signal.SIGKILL, signal=signal.SIGKILL)
            outcome.error = "the sandbox's init was killed"
        if self.cgroup is not None:
            outcome.oom_killed = self.cgroup.oom_killed()
            outcome.peak_memory = self.cgroup.peak_memory()
            if outcome.oom_killed and outcome.signal == signal.SIGKILL:
                outcome.error = "killed: out of memory (the sandbox's memory limit)"
        return outcome


def _phases(started: float, stamps: dict[str, float]) -> dict[str, float]:
    order = [("entry", "init"), ("filesystem", "filesystem"), ("exec", "exec"), ("command", "exit")]
    phases, last = {}, started
    for name, key in order:
        if key in stamps:
            phases[name] = round((stamps[key] - last) * 1000, 3)
            last = stamps[key]
    return phases


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


@functools.cache
def _prepared_filter() -> bytes:
    """The seccomp program, and cffi's declarations parsed, once per runner process:
    otherwise every forked child would redo both (~25 ms of pycparser and assembly)."""
    syscalls.libc()
    syscalls.capget()
    return seccomp.build_filter()


@dataclass
class StartedInit:
    """init, forked and waiting for its go-aheads (see `release`)."""

    pid: int
    go_fd: int  # write end: b"s" then b"g"
    status_fd: int  # read end: init's report


def start_init(
    spec: CommandSpec, netns_path: str, tty: int | None = None, close_in_child: tuple[int, ...] = ()
) -> StartedInit:
    """Fork init into a new pid namespace. Runs in the process that forks: the
    embedded runner, or the daemon's fork server (runner/forkserver.py), which names
    its own socket in `close_in_child`."""
    spec = dataclasses.replace(spec, seccomp_filter=spec.seccomp_filter or _prepared_filter())
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    try:
        pid = _fork_into_new_pid_namespace()
    except OSError as exc:
        for fd in (go_r, go_w, status_r, status_w):
            os.close(fd)
        raise LaunchError(f"cannot start the sandbox's init: {exc}") from exc
    if pid == 0:
        os.close(go_w)
        os.close(status_r)
        for fd in close_in_child:
            os.close(fd)
        os.setpgid(0, 0)
        _take_terminal(tty, os.getpgrp())
        _become_init(spec, netns_path, go_r, status_w)
    os.close(go_r)
    os.close(status_w)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.setpgid(pid, pid)  # also done by the child; whichever runs first wins
    return StartedInit(pid=pid, go_fd=go_w, status_fd=status_r)


def release(
    init: StartedInit,
    cgroup: Cgroup | None,
    before_start: Callable[[], None] | None = None,
) -> None:
    """Let init go on: b"s" once `before_start` (the gateway) is done, b"g" once init is
    in the cgroup. Closes the go pipe. If anything fails, init is killed (not reaped:
    that is its parent's business) and the error propagates."""
    try:
        # Moving a task between v1 cgroups costs milliseconds (an RCU grace period
        # per hierarchy), so init builds the filesystem view meanwhile, on the other core.
        if before_start is not None:
            before_start()
        os.write(init.go_fd, b"s")
        if cgroup is not None:
            cgroup.add_process(init.pid)
        os.write(init.go_fd, b"g")
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.kill(init.pid, signal.SIGKILL)
        raise
    finally:
        os.close(init.go_fd)


def launch(
    spec: CommandSpec,
    netns_path: str,
    cgroup: Cgroup | None,
    before_start: Callable[[], None] | None = None,
) -> Running:
    """Start init → command in the sandbox. Raises LaunchError if init cannot be forked.

    `before_start` runs after init is forked and before it may go on:
    the place to start threads (the gateway's loop), so that the only fork of this
    runner happens while it is still single-threaded.
    """
    started = time.monotonic()
    tty = _controlling_tty()
    init = start_init(spec, netns_path, tty)
    try:
        release(init, cgroup, before_start)
    except BaseException:
        _reap(init.pid)
        os.close(init.status_fd)
        _take_terminal(tty, os.getpgrp())
        raise
    return Running(
        init_pid=init.pid, status_fd=init.status_fd, tty=tty, cgroup=cgroup, started=started
    )


@contextlib.contextmanager
def forwarding_signals(pid: int) -> Iterator[list[int]]:
    """Forward the signals a user sends us to the sandbox's init, which passes them on."""
    received: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        received.append(signum)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
