"""The gateway in several processes (GatewayConfig.processes > 1), for real: a first
process (the test's loop thread) and helpers (gateway.workers.main) accepting on
the same listeners, upstreams in a test namespace.

Which process takes a connection is the kernel's choice. To make a helper take it, a
test blocks the first process's event loop (a sleep run on its thread): while it
sleeps, only a helper accepts. Everything in tests/integration/test_proxy_local.py
also runs with two processes (its `gateway_processes` fixture); these tests are about
what only several processes have: limits counted once for all, the hand-over of git
and API requests, lookups through the first process, helpers that die, and nothing
left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.integration.test_proxy_local import (
    ECHO_PORT,
    HTTP_PORT,
    OK_RESPONSE,
    RunningGateway,
    UpstreamServer,
    connect,
    counted,
    echo_roundtrip,
    exchange,
    http_and_echo,
    make_policy,
    open_tunnel,
    read_to_eof,
    request_id,
    running_gateway,
    status,
)

pytestmark = pytest.mark.root

GET = b"GET http://upstream.test/p HTTP/1.1\r\nHost: upstream.test\r\n\r\n"
DENIED = b"GET http://evil.test/ HTTP/1.1\r\nHost: evil.test\r\n\r\n"


@pytest.fixture
def servers(upstream) -> Iterator[dict[str, UpstreamServer]]:
    with http_and_echo(upstream) as made:
        yield made


def helper_pids(run: RunningGateway) -> list[int]:
    pool = run.gateway._pool
    assert pool is not None
    return [h.proc.pid for h in pool.helpers if h.proc is not None and h.proc.poll() is None]


@contextlib.contextmanager
def first_process_blocked(run: RunningGateway, seconds: float) -> Iterator[None]:
    """The first process's loop sleeps for `seconds` (from now): only helpers accept
    meanwhile. The block ends before the context does."""
    started = threading.Event()

    def block() -> None:
        started.set()
        time.sleep(seconds)

    run.loop.call_soon_threadsafe(block)
    assert started.wait(5)
    end = time.monotonic() + seconds
    try:
        yield
    finally:
        time.sleep(max(0.0, end - time.monotonic()))


def test_a_helper_serves_while_the_first_process_is_busy(tmp_path, upstream, servers) -> None:
    with running_gateway(tmp_path, upstream_addr=upstream.addr, processes=2) as run:
        assert len(helper_pids(run)) == 1
        with first_process_blocked(run, 0.5):
            exchange(run, GET)  # the helper asks the first process for the name, once
        with first_process_blocked(run, 1.5):
            t0 = time.monotonic()
            resp = exchange(run, GET)
            took = time.monotonic() - t0
        assert resp.endswith(OK_RESPONSE.split(b"\r\n\r\n", 1)[1]) and status(resp) == 200
        assert took < 1.0, f"answered after {took:.2f}s: the first process did it"
        lines = run.last_audit(2)
        assert [(x["decision"], x["status"]) for x in lines] == [("allow", 200)] * 2


def test_a_lookup_in_a_helper_is_the_first_process_resolvers(tmp_path, upstream, servers) -> None:
    """upstream.test and meta.test are known only to the resolver the test gave the
    first process; the helper asks it, then classifies the answers itself."""
    with running_gateway(tmp_path, upstream_addr=upstream.addr, processes=2) as run:
        with first_process_blocked(run, 1.0):
            with connect(run) as s:
                s.sendall(GET)
                resp = read_to_eof(s)  # the helper waits for the answer, then dials
            with connect(run) as s:
                s.sendall(b"GET http://meta.test/ HTTP/1.1\r\nHost: meta.test\r\n\r\n")
                meta = read_to_eof(s)
        assert status(resp) == 200
        assert status(meta) == 403
        assert run.audit_for(request_id(meta))["rule"] == "address.metadata"


def test_the_connection_cap_holds_across_processes(tmp_path, upstream, servers) -> None:
    with running_gateway(
        tmp_path,
        policy=make_policy(max_connections=3),
        upstream_addr=upstream.addr,
        processes=2,
    ) as run:
        target = f"upstream.test:{ECHO_PORT}"
        tunnels = []
        with first_process_blocked(run, 1.0):
            tunnels.append(open_tunnel(run, target))  # held by the helper
        tunnels.append(open_tunnel(run, target))
        tunnels.append(open_tunnel(run, target))
        refused = [
            status(exchange(run, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()))
            for _ in range(6)
        ]
        assert refused == [429] * 6
        with first_process_blocked(run, 1.0):
            resp = exchange(run, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        assert status(resp) == 429  # the helper counts the first process's tunnels too
        for s in tunnels:
            assert echo_roundtrip(s, b"ping") == b"ping"
            s.close()
        time.sleep(0.3)
        with open_tunnel(run, target) as again:
            assert echo_roundtrip(again, b"pong") == b"pong"


def test_the_rate_limit_holds_across_processes(tmp_path) -> None:
    with running_gateway(tmp_path, policy=make_policy(rate=0.2, burst=4), processes=2) as run:
        statuses = []
        with first_process_blocked(run, 1.0):
            statuses += [status(exchange(run, DENIED)) for _ in range(2)]  # the helper's
        statuses += [status(exchange(run, DENIED)) for _ in range(6)]
        assert statuses.count(403) == 4 and statuses.count(429) == 4, statuses
        assert statuses[:4] == [403] * 4


def test_the_upload_budget_holds_across_processes(tmp_path, upstream, servers) -> None:
    budget = 512 * 1024
    with running_gateway(
        tmp_path,
        policy=make_policy(upload_budget=budget),
        upstream_addr=upstream.addr,
        processes=2,
    ) as run:
        target = f"upstream.test:{ECHO_PORT}"
        with first_process_blocked(run, 1.0):
            helpers = open_tunnel(run, target)
        first = open_tunnel(run, target)
        sent = 0
        for s in (helpers, first, helpers, first):
            with contextlib.suppress(OSError):
                s.sendall(b"y" * (200 * 1024))
                sent += 200 * 1024
            time.sleep(0.3)
        for s in (helpers, first):
            s.settimeout(2)
            with contextlib.suppress(OSError):
                while s.recv(1 << 20):
                    pass
            s.close()
        conns = servers["echo"].wait_done(2)
        upstream_got = sum(len(c.data) for c in conns)
        assert budget - 200 * 1024 < upstream_got <= budget
        lines = run.last_audit(2)
        assert sum(line["bytes_up"] for line in lines) == upstream_got
        assert "egress.upload_budget" in {line["rule"] for line in lines}


def test_api_and_denials_through_a_helper(tmp_path) -> None:
    """A denial made in the helper is in the denials API at once; an API request the
    helper accepts is answered by the first process (the helper hands it over)."""
    with running_gateway(tmp_path, processes=2) as run:
        with first_process_blocked(run, 1.5):
            resp = exchange(run, DENIED)  # refused by the helper
            assert status(resp) == 403
            rid = request_id(resp)
            t0 = time.monotonic()
            with connect(run, "unix") as s:
                s.sendall(b"GET /_sandgate/v1/denials HTTP/1.1\r\nHost: gateway\r\n\r\n")
                api = read_to_eof(s)
            waited = time.monotonic() - t0
        assert waited > 0.3, "the API was answered while the first process slept"
        assert status(api) == 200
        denials = json.loads(api.split(b"\r\n\r\n", 1)[1])["denials"]
        assert [d["request_id"] for d in denials] == [rid]
        assert run.audit_for(rid)["decision"] == "deny"
        # The handed-over API request is not egress: no audit line of its own.
        assert [line["request_id"] for line in run.audit()] == [rid]


def test_a_helper_that_dies_is_replaced(tmp_path, upstream, servers) -> None:
    with running_gateway(
        tmp_path,
        policy=make_policy(max_connections=2),
        upstream_addr=upstream.addr,
        processes=2,
    ) as run:
        target = f"upstream.test:{ECHO_PORT}"
        with first_process_blocked(run, 1.0):
            held = open_tunnel(run, target)  # one of the 2 slots, in the helper
        (old,) = helper_pids(run)
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pids = helper_pids(run)
            if pids and pids != [old]:
                break
            time.sleep(0.05)
        (new,) = helper_pids(run)
        assert new != old
        held.settimeout(5)
        with contextlib.suppress(OSError):
            assert read_to_eof(held) == b""  # the dead helper's tunnel closed
        held.close()
        # Its slot is free again: two tunnels fit, and the new helper serves.
        a = open_tunnel(run, target)
        with first_process_blocked(run, 1.0):
            b = open_tunnel(run, target)
        for s in (a, b):
            assert echo_roundtrip(s, b"x") == b"x"
            s.close()


def test_a_helpers_counts_reach_the_first_processs_hook(tmp_path, upstream, servers) -> None:
    """What a helper served is counted in the first process: its sums come every
    COUNTS_INTERVAL, and a removed sandbox's last ones before the removal returns."""
    seen: list = []
    with running_gateway(
        tmp_path, upstream_addr=upstream.addr, processes=2, on_counts=seen.append
    ) as run:
        with first_process_blocked(run, 1.0):
            denied = [exchange(run, DENIED) for _ in range(3)]
            tunnel = open_tunnel(run, f"upstream.test:{ECHO_PORT}")
            assert echo_roundtrip(tunnel, b"x" * 1000) == b"x" * 1000
            assert len(run.audit()) == 3  # the helper wrote them; the tunnel is open
        assert [status(r) for r in denied] == [403] * 3
        counted(seen, 3)
        assert sum(c.requests for batch in seen for c in batch) == 3
        # The tunnel's record is made when the removal cuts it, in the helper.
        run.call(run.gateway.remove_sandbox("sbtest"))
        counts = [c for batch in seen for c in batch]
        tunnel.close()
    (tunnel_count,) = [c for c in counts if c.decision == "allow"]
    assert (tunnel_count.requests, tunnel_count.bytes_up, tunnel_count.bytes_down) == (
        1,
        1000,
        1000,
    )
    assert [(c.decision, c.status, c.requests) for c in counts if c.decision != "allow"] == [
        ("deny", 403, 3)
    ]


def test_removing_a_sandbox_closes_every_processs_listener(tmp_path) -> None:
    with running_gateway(tmp_path, processes=2) as run:
        pids = helper_pids(run)
        port = run.tcp[1]
        run.call(run.gateway.remove_sandbox("sbtest"))
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(run.tcp, timeout=2)
        # The port is free at once: a new listener can bind it (no helper holds it).
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
        run.call(run.gateway.close())
        for pid in pids:
            assert wait_gone(pid), f"helper {pid} is still running"


def wait_gone(pid: int, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.02)
    return False


def test_helpers_end_with_the_first_process(tmp_path) -> None:
    """A helper whose first process is gone (its channel closed) exits."""
    with running_gateway(tmp_path, processes=3) as run:
        pids = helper_pids(run)
        assert len(pids) == 2
        pool = run.gateway._pool
        assert pool is not None
        pool._closing = True  # as if the first process died: no restart
        for helper in pool.helpers:
            assert helper.channel is not None
            helper.channel.sock.shutdown(socket.SHUT_RDWR)
        for pid in pids:
            assert wait_gone(pid), f"helper {pid} outlived its channel"


def test_a_plain_http_exchange_through_the_helper_is_audited_by_it(
    tmp_path, upstream, servers
) -> None:
    with running_gateway(tmp_path, upstream_addr=upstream.addr, processes=2) as run:
        with first_process_blocked(run, 0.5):
            exchange(run, GET)
        with first_process_blocked(run, 1.0):
            resp = exchange(run, GET)
            rid = request_id_from_audit(run, 2)  # written while the first process sleeps
        assert status(resp) == 200
        line = run.audit_for(rid)
        assert (line["host"], line["port"]) == ("upstream.test", HTTP_PORT)
        assert (line["decision"], line["bytes_down"]) == ("allow", len(resp))


def request_id_from_audit(run: RunningGateway, count: int) -> str:
    """The request id of the count-th audit line, waiting for it (written by the helper
    while the first process sleeps)."""
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        lines = run.audit()
        if len(lines) >= count:
            return lines[count - 1]["request_id"]
        time.sleep(0.02)
    raise AssertionError(f"fewer than {count} audit lines")
