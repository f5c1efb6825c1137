"""The CLI's side of the control protocol (runner/control.py): one blocking connection
per request to `sandgate serve`."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Iterator
from typing import Any

from . import control
from .init import FORWARDED_SIGNALS

DEFAULT_CONTROL_SOCKET = "/run/sandgate/control.sock"


class DaemonUnavailable(Exception):
    """Nothing answers on the control socket."""


class DaemonRefused(Exception):
    """The daemon answered {"ok": false, ...}."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def control_socket_path() -> str:
    return os.environ.get("SANDGATE_CONTROL_SOCKET") or DEFAULT_CONTROL_SOCKET


class ControlClient:
    def __init__(self, path: str | None = None, timeout: float | None = None) -> None:
        self.path = path or control_socket_path()
        self.timeout = timeout

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise DaemonUnavailable(f"no sandgate serve answers on {self.path}") from exc
        except PermissionError as exc:
            sock.close()
            raise DaemonRefused(
                "forbidden",
                f"{self.path}: permission denied: use sudo, or join the daemon's group",
            ) from exc
        return sock

    def available(self) -> bool:
        """True when a daemon answers a ping within a second."""
        if not os.path.exists(self.path):
            return False
        try:
            return bool(ControlClient(self.path, timeout=1.0).call({"op": "ping"}).get("ok"))
        except (DaemonUnavailable, DaemonRefused, OSError, control.ProtocolError):
            return False

    def stream(self, message: dict[str, Any], fds: list[int] | None = None) -> Iterator[dict]:
        """Send one request; yield every answer frame until the daemon closes.
        An {"ok": false} frame raises DaemonRefused."""
        sock = self._connect()
        with contextlib.closing(sock):
            data = control.encode(message)
            if fds:
                socket.send_fds(sock, [data], fds)
            else:
                sock.sendall(data)
            yield from _frames(sock)

    def call(self, message: dict[str, Any]) -> dict[str, Any]:
        """One request, one answer."""
        for frame in self.stream(message):
            return frame
        raise DaemonUnavailable("the daemon closed the connection without an answer")

    def run_command(self, message: dict[str, Any], on_event=None) -> dict[str, Any]:
        """exec or run: pass our stdio, forward signals, return the "exit" frame."""
        sock = self._connect()
        previous: dict[int, Any] = {}

        def forward(signum: int, _frame: object) -> None:
            with contextlib.suppress(OSError):
                sock.sendall(control.encode({"op": "signal", "signal": signum}))

        try:
            socket.send_fds(sock, [control.encode(message)], [0, 1, 2])
            for sig in FORWARDED_SIGNALS:
                previous[sig] = signal.signal(sig, forward)
            for frame in _frames(sock):
                if frame.get("event") == "exit":
                    final = frame
                    # A `run` also reports the removal; read it if it comes.
                    for more in _frames(sock):
                        if on_event is not None:
                            on_event(more)
                    return final
                if on_event is not None:
                    on_event(frame)
            raise DaemonUnavailable("the daemon closed the connection before the command ended")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            sock.close()


def _frames(sock: socket.socket) -> Iterator[dict]:
    reader = control.FrameReader()
    while True:
        try:
            data = sock.recv(65536)
        except InterruptedError:
            continue
        except ConnectionResetError:
            data = b""
        if not data:
            if reader.pending:
                raise control.ProtocolError("the daemon's answer was cut short")
            return
        for frame in reader.feed(data):
            if frame.get("ok") is False:
                error = frame.get("error") or {}
                raise DaemonRefused(error.get("code", "failed"), error.get("message", "failed"))
            yield frame
