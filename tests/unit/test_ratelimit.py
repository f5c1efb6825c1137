"""gateway/ratelimit.py with a fake clock."""

from __future__ import annotations

import pytest

from gateway.policy import EgressPolicy
from gateway.ratelimit import ByteBudget, ConnectionCounter, SandboxLimits, TokenBucket


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=2, burst=3, clock=clock)
    assert [bucket.try_take() for _ in range(4)] == [True, True, True, False]
    clock.now += 0.4  # 0.8 tokens
    assert not bucket.try_take()
    clock.now += 0.1  # 1.0
    assert bucket.try_take()
    assert not bucket.try_take()
    clock.now += 100  # refills to the burst, no further
    assert [bucket.try_take() for _ in range(4)] == [True, True, True, False]


def test_token_bucket_survives_a_clock_stepping_back() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=1, burst=1, clock=clock)
    assert bucket.try_take()
    clock.now -= 50
    assert not bucket.try_take()
    clock.now += 1
    assert bucket.try_take()


def test_token_bucket_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1)
    with pytest.raises(ValueError):
        TokenBucket(rate=1, burst=0)


def test_connection_counter() -> None:
    counter = ConnectionCounter(2)
    assert counter.try_open() and counter.try_open()
    assert not counter.try_open()
    counter.close()
    assert counter.try_open()
    assert counter.open == 2
    counter.close()
    counter.close()
    with pytest.raises(RuntimeError):
        counter.close()


def test_byte_budget_refuses_a_charge_that_does_not_fit_whole() -> None:
    budget = ByteBudget(100)
    assert budget.charge(60)
    assert not budget.charge(41)
    assert budget.used == 60 and budget.remaining == 40
    assert budget.charge(40)
    assert not budget.charge(1)
    assert budget.charge(0)
    with pytest.raises(ValueError):
        budget.charge(-1)


def test_sandbox_limits_from_policy() -> None:
    clock = FakeClock()
    limits = SandboxLimits.from_policy(
        EgressPolicy(rate=1, burst=2, max_connections=1, upload_budget=10), clock
    )
    assert limits.try_acquire_request() and limits.try_acquire_request()
    assert not limits.try_acquire_request()
    clock.now += 1
    assert limits.try_acquire_request()
    assert limits.open_connection()
    assert not limits.open_connection()
    limits.close_connection()
    assert limits.open_connection()
    assert limits.charge_upload(10)
    assert not limits.charge_upload(1)
