"""systemd's notification protocol (sd_notify(3)), without libsystemd.

`notify("READY=1")` sends one datagram of newline-separated VAR=value assignments to
the AF_UNIX socket named by $NOTIFY_SOCKET: a path, or "@name" for a socket in the
abstract namespace. It returns False, and does nothing, when the process does not run
under systemd (no $NOTIFY_SOCKET, or an address kind this module does not speak, such
as vsock), or when the message could not be delivered; True when it was sent.

The unit uses NotifyAccess=main, so only the main process's messages count; the
variable is read at every call (not cached, not removed), and sandboxes never see it:
their environment is built from scratch (runner/process.py sandbox_env).

`watchdog_interval()` is how often to send "WATCHDOG=1": half of $WATCHDOG_USEC (as
sd_watchdog_enabled(3) advises), or None when no watchdog is asked of this process.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping

READY = "READY=1"
RELOADING = "RELOADING=1"
STOPPING = "STOPPING=1"
WATCHDOG = "WATCHDOG=1"

# A full receive queue on systemd's side must not stall the daemon for long.
SEND_TIMEOUT_S = 1.0

_ASSIGNMENT = re.compile(r"[A-Z][A-Z0-9_]*=[^\n\0]*")
_NUMBER = re.compile(r"[0-9]+")


def status(text: str) -> str:
    """A STATUS= assignment (free text shown by `systemctl status`); line breaks,
    which would end the assignment, become spaces."""
    return "STATUS=" + " ".join(text.splitlines())


def notify(*states: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send `states` ("READY=1", "STATUS=...", ...) to systemd in one datagram.

    False when not under systemd or when sending failed; ValueError for a state that is
    not one VAR=value line (it would corrupt the message)."""
    if not states:
        raise ValueError("notify() needs at least one VAR=value state")
    for state in states:
        if not isinstance(state, str) or not _ASSIGNMENT.fullmatch(state):
            raise ValueError(f"not a VAR=value notification on one line: {state!r}")
    env = os.environ if environ is None else environ
    address = _address(env.get("NOTIFY_SOCKET", ""))
    if address is None:
        return False
    payload = "\n".join(states).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT_S)
            sock.sendto(payload, address)
    except OSError:  # gone, refused, queue full past the timeout, path too long
        return False
    return True


def watchdog_interval(environ: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between two "WATCHDOG=1": half of $WATCHDOG_USEC. None when systemd
    asks no watchdog of this process ($WATCHDOG_USEC unset, not a positive number, or
    $WATCHDOG_PID set to another process)."""
    usec = environ.get("WATCHDOG_USEC", "")
    if not _NUMBER.fullmatch(usec) or int(usec) <= 0:
        return None
    pid = environ.get("WATCHDOG_PID", "")
    if pid and (not _NUMBER.fullmatch(pid) or int(pid) != os.getpid()):
        return None
    return int(usec) / 2 / 1_000_000


def _address(value: str) -> bytes | None:
    """The sockaddr_un path for $NOTIFY_SOCKET, or None when there is none to use."""
    if value.startswith("@") and len(value) > 1:
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return os.fsencode(value)
    return None
