"""Starting the sandbox's command and waiting for it like `docker run` does.

Owns: the child's entry into the sandbox's namespaces, terminal foreground
hand-over, signal forwarding, and turning a wait status into an exit code.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from netns import syscalls

# Signals a user sends to `sandgate run` that belong to the command.
FORWARDED_SIGNALS = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class ProcessSpec:
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None


class LaunchError(Exception):
    """The command could not be started; `exit_code` follows the shell's 126/127."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def exit_code_of(returncode: int) -> int:
    """subprocess's returncode (negative for a signal) as a shell exit code (128+N)."""
    return 128 - returncode if returncode < 0 else returncode


def sandbox_env(extra: Mapping[str, str], sandbox_id: str) -> dict[str, str]:
    """The command's environment: a small fixed base, never the caller's whole one."""
    env = {"PATH": DEFAULT_PATH, "SANDGATE_ID": sandbox_id, "HOME": "/tmp"}
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


def start(spec: ProcessSpec, netns_path: str) -> tuple[subprocess.Popen, int | None]:
    """Start the command in the sandbox's network namespace, in its own process group.

    When stdin is our terminal, the command's group becomes the terminal's
    foreground group, so Ctrl-C reaches the command once (from the terminal) and
    not twice (terminal + our forwarding). Returns the process and the tty fd.
    """
    tty = _controlling_tty()
    ns_fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)

    def child_setup() -> None:
        # Runs in the forked child, before exec: single-threaded, async-signal context.
        syscalls.setns(ns_fd, syscalls.CLONE_NEWNET)
        os.setpgid(0, 0)
        if tty is not None:
            old = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
            os.tcsetpgrp(tty, os.getpgrp())
            signal.signal(signal.SIGTTOU, old)

    try:
        proc = subprocess.Popen(
            list(spec.argv),
            env=dict(spec.env),
            cwd=spec.cwd,
            # The namespace must be joined between fork and exec.
            preexec_fn=child_setup,
            pass_fds=(),
        )
    except FileNotFoundError as exc:
        raise LaunchError(f"{spec.argv[0]}: command not found", 127) from exc
    except PermissionError as exc:
        raise LaunchError(f"{spec.argv[0]}: permission denied", 126) from exc
    except OSError as exc:
        raise LaunchError(f"{spec.argv[0]}: cannot execute: {exc}", 126) from exc
    except subprocess.SubprocessError as exc:
        # preexec failed: the child could not enter the sandbox; nothing ran.
        raise LaunchError(f"cannot enter the sandbox's namespaces: {exc}", 125) from exc
    finally:
        os.close(ns_fd)
    return proc, tty


@contextlib.contextmanager
def forwarding_signals(pid: int) -> Iterator[list[int]]:
    """Forward the signals a user sends us to the command while it runs."""
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


def reclaim_terminal(tty: int | None) -> None:
    """Make our own process group the terminal's foreground group again."""
    if tty is None:
        return
    old = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    try:
        with contextlib.suppress(OSError):
            os.tcsetpgrp(tty, os.getpgrp())
    finally:
        signal.signal(signal.SIGTTOU, old)


def run_to_completion(spec: ProcessSpec, netns_path: str) -> int:
    """Start the command, forward signals until it ends, return its shell exit code."""
    proc, tty = start(spec, netns_path)
    try:
        with forwarding_signals(proc.pid):
            returncode = proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reclaim_terminal(tty)
    return exit_code_of(returncode)
