"""gateway/shared.py: per-sandbox limits in shared memory, for the gateway's processes.
The cross-process tests run a second Python process on the same memfd."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gateway.policy import parse_policy
from gateway.shared import MAX_PROCESSES, SLOT_SIZE, SharedLimits, SharedTable

ROOT = Path(__file__).resolve().parents[2]


def egress(**settings: object):
    lines = ["[egress]", *(f"{k} = {v}" for k, v in settings.items())]
    return parse_policy("\n".join(lines)).egress


@pytest.fixture
def table():
    t = SharedTable.create(4)
    try:
        yield t
    finally:
        t.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_bucket_is_full_then_refills(table) -> None:
    clock = Clock()
    table.set_limits(1, egress(rate=2, burst=3), keep_counts=False)
    limits = SharedLimits(table, 1, 0, clock)
    # set_limits stamps the bucket with the real monotonic clock; start from there.
    clock.now = time.monotonic()
    assert [limits.try_acquire_request() for _ in range(4)] == [True, True, True, False]
    clock.now += 0.5  # one token at 2 a second
    assert [limits.try_acquire_request() for _ in range(2)] == [True, False]
    clock.now += 100  # never more than the burst
    assert sum(limits.try_acquire_request() for _ in range(10)) == 3
    clock.now -= 50  # a clock that steps back drains nothing and adds nothing
    assert limits.try_acquire_request() is False


def test_connections_count_every_process(table) -> None:
    table.set_limits(0, egress(max_connections=3), keep_counts=False)
    first, second = SharedLimits(table, 0, 0), SharedLimits(table, 0, 5)
    assert first.open_connection() and second.open_connection() and second.open_connection()
    assert not first.open_connection() and not second.open_connection()
    assert table.open_count(0) == 3
    second.close_connection()
    assert first.open_connection()
    first.close_connection()
    with pytest.raises(RuntimeError):
        SharedLimits(table, 0, 7).close_connection()  # process 7 holds none


def test_a_dead_process_is_forgotten(table) -> None:
    table.set_limits(2, egress(max_connections=2, upload_budget=1000), keep_counts=False)
    dead, alive = SharedLimits(table, 2, 1), SharedLimits(table, 2, 0)
    assert dead.open_connection() and dead.open_connection()
    assert dead.charge_upload(600)
    assert not alive.open_connection()
    table.forget_process(1)
    assert alive.open_connection()  # its connections died with it
    assert alive.upload.used == 600 and not alive.charge_upload(401)  # its bytes were sent


def test_the_upload_budget_is_shared_and_refuses_whole_charges(table) -> None:
    table.set_limits(3, egress(upload_budget=1000), keep_counts=False)
    a, b = SharedLimits(table, 3, 0), SharedLimits(table, 3, 1)
    assert a.charge_upload(400) and b.charge_upload(500)
    assert not a.charge_upload(101)  # refused whole: nothing counted
    assert a.upload.used == 900 and a.upload.remaining == 100 and a.upload.limit == 1000
    assert b.charge_upload(100) and not b.charge_upload(1)
    with pytest.raises(ValueError):
        a.charge_upload(-1)


def test_a_reload_keeps_counts_and_a_new_sandbox_does_not(table) -> None:
    table.set_limits(0, egress(max_connections=5, upload_budget=1000), keep_counts=False)
    limits = SharedLimits(table, 0, 0)
    assert limits.open_connection() and limits.charge_upload(700)
    table.set_limits(0, egress(max_connections=1, upload_budget=800), keep_counts=True)
    assert not limits.open_connection()  # one is open; the new cap is 1
    assert limits.upload.remaining == 100
    table.set_limits(0, egress(max_connections=1, upload_budget=800), keep_counts=False)
    assert limits.upload.used == 0 and limits.open_connection()


def test_bad_slots_processes_and_files() -> None:
    with pytest.raises(ValueError):
        SharedTable.create(0)
    t = SharedTable.create(2)
    try:
        with pytest.raises(ValueError):
            SharedLimits(t, 2, 0)
        with pytest.raises(ValueError):
            SharedLimits(t, 0, MAX_PROCESSES)
    finally:
        t.close()
    fd = os.memfd_create("not-a-table")
    try:
        os.ftruncate(fd, SLOT_SIZE + 1)
        with pytest.raises(ValueError):
            SharedTable.attach(fd)
    finally:
        os.close(fd)


# Two processes hammer the same slot for the same half second: each holds as many
# connections as the shared cap lets it (closing one now and then) and charges small
# uploads. Without the slot's lock, both would pass the cap and lose each other's
# charges within a few thousand rounds (checked: the test fails with _lock a no-op).
_HAMMER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, sys.argv[2])
    from gateway.shared import SharedLimits, SharedTable
    table = SharedTable.attach(int(sys.argv[1]))
    limits = SharedLimits(table, 1, int(sys.argv[3]))
    held = opened = charged = over = rounds = 0
    print("ready", flush=True)
    sys.stdin.readline()
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        rounds += 1
        if limits.open_connection():
            held += 1
            opened += 1
        # Counted under the lock: no one opens meanwhile, so the sum is a true upper
        # bound (an unlocked sum of the cells can mix moments: one cell read before a
        # close, another after an open that the close made room for).
        table._lock(1)
        try:
            if table.open_count(1) > 4:
                over += 1
        finally:
            table._unlock(1)
        if rounds % 2 == 0 and held:
            limits.close_connection()
            held -= 1
        if limits.charge_upload(7):
            charged += 7
    for _ in range(held):
        limits.close_connection()
    print(opened, charged, over, flush=True)
    """
)


def test_two_processes_never_pass_the_limits_together(table) -> None:
    budget = 1_500_000
    table.set_limits(1, egress(max_connections=4, upload_budget=budget), keep_counts=False)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _HAMMER, str(table.fd), str(ROOT), str(proc)],
            pass_fds=(table.fd,),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for proc in (0, 1)
    ]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
    for p in procs:  # go
        assert p.stdin is not None
        p.stdin.write("\n")
        p.stdin.flush()
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        results.append([int(x) for x in out.split()])
    (opened_a, charged_a, over_a), (opened_b, charged_b, over_b) = results
    assert over_a == over_b == 0
    assert opened_a > 1000 and opened_b > 1000  # both really took turns
    assert charged_a > 0 and charged_b > 0
    assert charged_a + charged_b == table.used(1) <= budget
    assert table.open_count(1) == 0


_HOLD_AND_DIE = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, sys.argv[2])
    from gateway.shared import SharedTable
    table = SharedTable.attach(int(sys.argv[1]))
    table._lock(0)  # and never unlock: killed while holding it
    print("locked", flush=True)
    time.sleep(60)
    """
)

_LOCK_AGAIN = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, sys.argv[2])
    from gateway.shared import SharedLimits, SharedTable
    table = SharedTable.attach(int(sys.argv[1]))
    limits = SharedLimits(table, 0, 2)
    print(limits.open_connection(), limits.try_acquire_request(), flush=True)
    """
)


def test_a_process_killed_holding_a_slot_does_not_lock_it_forever(table) -> None:
    table.set_limits(0, egress(max_connections=4), keep_counts=False)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_AND_DIE, str(table.fd), str(ROOT)],
        pass_fds=(table.fd,),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
    finally:
        holder.kill()
        holder.wait()
    # In another process (a wait on the lock would hold this one's GIL): it gets the
    # slot (EOWNERDEAD, made consistent) instead of waiting forever.
    again = subprocess.run(
        [sys.executable, "-c", _LOCK_AGAIN, str(table.fd), str(ROOT)],
        pass_fds=(table.fd,),
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )
    assert again.stdout.split() == ["True", "True"]
    SharedLimits(table, 0, 0).try_acquire_request()  # and so does this process
