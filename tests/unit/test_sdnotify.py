"""runner.sdnotify: datagrams to $NOTIFY_SOCKET (a path, or '@name' in the abstract
namespace) received on a real AF_UNIX socket, and the watchdog interval."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner import sdnotify


def _receiver(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    sock.bind(address)
    sock.settimeout(5)
    return sock


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # sun_path holds 107 bytes: pytest's tmp_path can be longer than that.
    path = Path(tempfile.mkdtemp(prefix="sgnotify-", dir="/tmp"))
    yield path
    shutil.rmtree(path)


@pytest.fixture
def path_socket(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    address = str(short_dir / "notify")
    with _receiver(address) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        yield sock


@pytest.fixture
def abstract_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    name = f"sandgate-test-notify-{secrets.token_hex(8)}"
    with _receiver(b"\0" + name.encode()) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", f"@{name}")
        yield sock


def test_ready_to_a_path_socket(path_socket: socket.socket) -> None:
    assert sdnotify.notify("READY=1") is True
    assert path_socket.recv(4096) == b"READY=1"


def test_several_states_are_one_datagram(path_socket: socket.socket) -> None:
    assert sdnotify.notify(sdnotify.READY, "STATUS=serving 3 sandbox(es)") is True
    assert path_socket.recv(4096) == b"READY=1\nSTATUS=serving 3 sandbox(es)"


@pytest.mark.parametrize(
    "state", [sdnotify.WATCHDOG, sdnotify.STOPPING, sdnotify.RELOADING, "STATUS=reloading"]
)
def test_each_state(path_socket: socket.socket, state: str) -> None:
    assert sdnotify.notify(state) is True
    assert path_socket.recv(4096) == state.encode()


def test_abstract_socket(abstract_socket: socket.socket) -> None:
    assert sdnotify.notify("READY=1", "STATUS=up") is True
    assert abstract_socket.recv(4096) == b"READY=1\nSTATUS=up"


def test_the_sender_is_this_process(path_socket: socket.socket) -> None:
    # systemd checks the sender's pid (NotifyAccess=main) from the kernel's credentials.
    path_socket.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    assert sdnotify.notify("READY=1")
    _data, ancdata, _flags, _addr = path_socket.recvmsg(4096, socket.CMSG_SPACE(12))
    ((level, kind, creds),) = ancdata
    assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)
    assert int.from_bytes(creds[:4], "little") == os.getpid()


def test_an_environ_mapping_may_be_given(short_dir: Path, monkeypatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    address = str(short_dir / "other")
    with _receiver(address) as sock:
        assert sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": address}) is True
        assert sock.recv(4096) == b"READY=1"


def test_not_under_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": ""}) is False


@pytest.mark.parametrize("value", ["vsock:2:1234", "relative/path", "@"])
def test_addresses_this_module_does_not_speak(value: str) -> None:
    assert sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": value}) is False


def test_nobody_listening_is_false_not_an_exception(short_dir: Path) -> None:
    env = {"NOTIFY_SOCKET": str(short_dir / "gone")}
    assert sdnotify.notify("READY=1", environ=env) is False
    name = f"@sandgate-test-nobody-{secrets.token_hex(8)}"
    assert sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": name}) is False


def test_a_path_too_long_is_false() -> None:
    assert sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": "/" + "x" * 200}) is False


@pytest.mark.parametrize(
    "state",
    ["READY", "ready=1", "=1", "STATUS=two\nlines", "STATUS=nul\0", "READY=1\n"],
)
def test_a_state_that_would_corrupt_the_message_is_refused(
    path_socket: socket.socket, state: str
) -> None:
    with pytest.raises(ValueError):
        sdnotify.notify("READY=1", state)
    path_socket.settimeout(0.05)
    with pytest.raises(TimeoutError):
        path_socket.recv(4096)  # nothing at all was sent


def test_no_state_is_refused() -> None:
    with pytest.raises(ValueError):
        sdnotify.notify()


def test_status_makes_one_line() -> None:
    assert sdnotify.status("could not start:\nno pool") == "STATUS=could not start: no pool"


# --- watchdog ------------------------------------------------------------------------


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "1000"}) == 0.0005


def test_watchdog_for_this_process_only() -> None:
    me = str(os.getpid())
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": me}) == 15.0
    other = str(os.getpid() + 1)
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": other}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}) is None


@pytest.mark.parametrize("usec", [None, "", "0", "-5", "abc", "1.5", "\N{SUPERSCRIPT TWO}"])
def test_no_watchdog(usec: str | None) -> None:
    env = {} if usec is None else {"WATCHDOG_USEC": usec}
    assert sdnotify.watchdog_interval(env) is None


def test_watchdog_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_interval() == 2.0
