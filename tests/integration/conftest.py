"""Fixtures for integration tests: real sandboxes, an "upstream" network namespace in
10.214.0.0/16, and TCP listeners on the host, each removed whatever the test does."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address

import pytest

from netns import syscalls
from runner.config import RunnerConfig
from runner.sandbox import Sandbox, create_sandbox, destroy_sandbox
from tests.integration.gateway_fixtures import GATEWAY_PROCESSES
from tests.nsutil import run_in_netns, upstream_netns

SANDBOX_PYTHON = "/usr/bin/python3"


@pytest.fixture
def config(tmp_path) -> RunnerConfig:
    return RunnerConfig(state_dir=tmp_path / "state")


@pytest.fixture
def make_sandbox(config: RunnerConfig) -> Iterator:
    """A factory for real sandboxes; every one is destroyed when the test ends."""
    made: list[Sandbox] = []

    def make() -> Sandbox:
        sandbox = create_sandbox(config)
        made.append(sandbox)
        return sandbox

    yield make
    for sandbox in made:
        destroy_sandbox(config, sandbox.id)


def sandbox_python(sandbox: Sandbox, code: str, timeout: float = 60) -> dict:
    """Run Python code inside the sandbox's network namespace; it prints one JSON object."""

    ns_fd = os.open(sandbox.network.netns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        proc = subprocess.run(
            [SANDBOX_PYTHON, "-c", code],
            preexec_fn=lambda: syscalls.setns(ns_fd, syscalls.CLONE_NEWNET),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    finally:
        os.close(ns_fd)
    assert proc.returncode == 0, f"sandbox code failed: {proc.stderr}"
    return json.loads(proc.stdout)


@dataclass
class Listener:
    addr: str
    port: int
    accepted: list[tuple[str, int]]


@contextlib.contextmanager
def tcp_listener(addr: str, port: int = 0, netns: str | None = None) -> Iterator[Listener]:
    """A TCP listener that accepts, writes b"hi" and closes; in the host or a test netns."""

    def make_socket() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, port))
        s.listen(64)
        return s

    sock = run_in_netns(netns, make_socket) if netns else make_socket()
    listener = Listener(addr, sock.getsockname()[1], [])
    stop = threading.Event()

    def serve() -> None:
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, peer = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            listener.accepted.append(peer)
            with conn, contextlib.suppress(OSError):
                conn.sendall(b"hi")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener
    finally:
        stop.set()
        thread.join()
        sock.close()


@dataclass
class Upstream:
    netns: str
    host_ifname: str
    host_addr: IPv4Address
    addr: IPv4Address


@pytest.fixture(params=[1, 2], ids=["1proc", "2proc"])
def gateway_processes(request: pytest.FixtureRequest) -> Iterator[int]:
    """A module that uses this (pytestmark usefixtures) runs each test twice: its
    gateway in one process, then in two (a helper accepting beside the first;
    gateway/workers.py). Its gateways read GATEWAY_PROCESSES[0]."""
    GATEWAY_PROCESSES[0] = request.param
    try:
        yield request.param
    finally:
        GATEWAY_PROCESSES[0] = 1


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    """A stand-in for "the internet": a netns at 10.214.N.2, routed from the host (see
    tests/nsutil.upstream_netns), removed when the test ends."""
    with upstream_netns() as (name, host_addr, addr):
        yield Upstream(name, f"tsg{name.removeprefix('sgtest-up')}", host_addr, addr)
