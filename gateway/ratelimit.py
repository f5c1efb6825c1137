"""Per-sandbox limits the gateway enforces: request rate (a token bucket), open
connections (a counter with a cap) and the upload budget (bytes a sandbox may send
upstream over its whole life). Pure: time comes from an injectable clock, and
nothing here does I/O; the proxy asks and acts on the answers.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gateway.policy import EgressPolicy

Clock = Callable[[], float]


class TokenBucket:
    """`rate` tokens a second, up to `burst` saved; starts full."""

    def __init__(self, rate: float, burst: int, clock: Clock = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._updated = clock()

    def try_take(self, n: float = 1.0) -> bool:
        now = self._clock()
        # max(0, ...): a clock that steps back must not drain the bucket.
        elapsed = max(0.0, now - self._updated)
        self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)
        self._updated = now
        if self._tokens >= n:
            self._tokens -= n
            return True
        return False


class ConnectionCounter:
    """Open connections, at most `limit` at once."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("a connection limit is at least 1")
        self.limit = limit
        self.open = 0

    def try_open(self) -> bool:
        if self.open >= self.limit:
            return False
        self.open += 1
        return True

    def close(self) -> None:
        if self.open <= 0:
            raise RuntimeError("close() without a matching try_open()")
        self.open -= 1


class ByteBudget:
    """A total of `limit` bytes. A charge that does not fit is refused whole (and not
    counted): the caller stops before sending those bytes."""

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError("a byte budget cannot be negative")
        self.limit = limit
        self.used = 0

    def charge(self, n: int) -> bool:
        if n < 0:
            raise ValueError("cannot charge a negative number of bytes")
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    @property
    def remaining(self) -> int:
        return self.limit - self.used


class SandboxLimits:
    """One sandbox's rate, connection and upload state, from its egress policy."""

    def __init__(
        self,
        *,
        rate: float,
        burst: int,
        max_connections: int,
        upload_budget: int,
        clock: Clock = time.monotonic,
    ) -> None:
        self.requests = TokenBucket(rate, burst, clock)
        self.connections = ConnectionCounter(max_connections)
        self.upload = ByteBudget(upload_budget)

    @classmethod
    def from_policy(cls, egress: EgressPolicy, clock: Clock = time.monotonic) -> SandboxLimits:
        return cls(
            rate=egress.rate,
            burst=egress.burst,
            max_connections=egress.max_connections,
            upload_budget=egress.upload_budget,
            clock=clock,
        )

    def try_acquire_request(self) -> bool:
        return self.requests.try_take()

    def open_connection(self) -> bool:
        return self.connections.try_open()

    def close_connection(self) -> None:
        self.connections.close()

    def charge_upload(self, n: int) -> bool:
        return self.upload.charge(n)
