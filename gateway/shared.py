"""Per-sandbox limits shared by the gateway's processes (GatewayConfig.processes > 1).

When several processes accept on a sandbox's listeners, its request rate, open
connections and upload budget must be counted once for all of them, or each process
would let the sandbox have the whole allowance again. They are kept here, in one
shared memory file (a memfd, mapped by every gateway process), one fixed-size slot
per sandbox, and changed only under a lock on the slot's first byte (fcntl record
lock: ~1.6 us for lock, read-modify-write and unlock; released by the kernel if the
holder dies, so a killed process can never leave a slot locked).

The same checks as gateway/ratelimit.py (a token bucket, a capped counter, a byte
budget), with the same interface (SandboxLimits), only the state lives in the slot:

  rate, burst, tokens, updated    the bucket (updated: CLOCK_MONOTONIC, one clock for
                                  every process on the host)
  max_connections, upload_limit   from the policy
  open[p], used[p]                per process p (at most MAX_PROCESSES): connections it
                                  holds open, upload bytes it sent. The limits apply to
                                  the sums. A process that dies is forgotten with
                                  forget_process: its connections died with it, what it
                                  sent stays charged.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import time

from gateway.policy import EgressPolicy
from gateway.ratelimit import Clock

MAX_PROCESSES = 8
_HEAD = struct.Struct("=dqddqq")  # rate, burst, tokens, updated, max_connections, upload_limit
_CELLS = struct.Struct(f"={MAX_PROCESSES}q")
_OPEN_AT = _HEAD.size
_USED_AT = _OPEN_AT + _CELLS.size
SLOT_SIZE = 64 * ((_USED_AT + _CELLS.size + 63) // 64)


class SharedTable:
    """`slots` slots in one memfd. The process that makes it passes `fd` to the others
    (inherited or SCM_RIGHTS), which open it with SharedTable.attach."""

    def __init__(self, fd: int, slots: int) -> None:
        self.fd = fd
        self.slots = slots
        self._map = mmap.mmap(fd, slots * SLOT_SIZE)

    @classmethod
    def create(cls, slots: int) -> SharedTable:
        if slots < 1:
            raise ValueError("a shared table needs at least one slot")
        fd = os.memfd_create("sandgate-gateway-limits", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, slots * SLOT_SIZE)  # zero-filled, pages made when touched
            return cls(fd, slots)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, fd: int) -> SharedTable:
        size = os.fstat(fd).st_size
        if size == 0 or size % SLOT_SIZE:
            raise ValueError(f"not a shared limits table: {size} bytes")
        return cls(fd, size // SLOT_SIZE)

    def close(self) -> None:
        self._map.close()
        os.close(self.fd)

    # --- under the slot's lock -------------------------------------------------------

    def _lock(self, slot: int) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, slot * SLOT_SIZE)

    def _unlock(self, slot: int) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, slot * SLOT_SIZE)

    def set_limits(self, slot: int, egress: EgressPolicy, *, keep_counts: bool) -> None:
        """Give `slot` the policy's limits, the bucket full. keep_counts False (a new
        sandbox) zeroes the open and used cells too; True (a policy reload) keeps them."""
        base = slot * SLOT_SIZE
        self._lock(slot)
        try:
            _HEAD.pack_into(
                self._map,
                base,
                float(egress.rate),
                egress.burst,
                float(egress.burst),
                time.monotonic(),
                egress.max_connections,
                egress.upload_budget,
            )
            if not keep_counts:
                zero = (0,) * MAX_PROCESSES
                _CELLS.pack_into(self._map, base + _OPEN_AT, *zero)
                _CELLS.pack_into(self._map, base + _USED_AT, *zero)
        finally:
            self._unlock(slot)

    def take_token(self, slot: int, now: float) -> bool:
        base = slot * SLOT_SIZE
        m = self._map
        self._lock(slot)
        try:
            rate, burst, tokens, updated, _, _ = _HEAD.unpack_from(m, base)
            # max(0, ...): as TokenBucket, a clock that steps back must not drain it.
            tokens = min(float(burst), tokens + max(0.0, now - updated) * rate)
            ok = tokens >= 1.0
            if ok:
                tokens -= 1.0
            struct.pack_into("=dd", m, base + 16, tokens, now)
            return ok
        finally:
            self._unlock(slot)

    def open_connection(self, slot: int, proc: int) -> bool:
        base = slot * SLOT_SIZE
        m = self._map
        self._lock(slot)
        try:
            limit = _HEAD.unpack_from(m, base)[4]
            cells = _CELLS.unpack_from(m, base + _OPEN_AT)
            if sum(cells) >= limit:
                return False
            struct.pack_into("=q", m, base + _OPEN_AT + 8 * proc, cells[proc] + 1)
            return True
        finally:
            self._unlock(slot)

    def close_connection(self, slot: int, proc: int) -> None:
        """Without the lock: only process `proc` writes its cell, and another process
        that reads it meanwhile sees one more connection open, never one fewer."""
        at = slot * SLOT_SIZE + _OPEN_AT + 8 * proc
        (n,) = struct.unpack_from("=q", self._map, at)
        if n <= 0:
            raise RuntimeError("close_connection() without a matching open_connection()")
        struct.pack_into("=q", self._map, at, n - 1)

    def charge(self, slot: int, proc: int, n: int) -> bool:
        if n < 0:
            raise ValueError("cannot charge a negative number of bytes")
        base = slot * SLOT_SIZE
        m = self._map
        self._lock(slot)
        try:
            limit = _HEAD.unpack_from(m, base)[5]
            cells = _CELLS.unpack_from(m, base + _USED_AT)
            if sum(cells) + n > limit:
                return False
            struct.pack_into("=q", m, base + _USED_AT + 8 * proc, cells[proc] + n)
            return True
        finally:
            self._unlock(slot)

    def forget_process(self, proc: int) -> None:
        """A gateway process died: the connections it held are closed (by the kernel)."""
        for slot in range(self.slots):
            at = slot * SLOT_SIZE + _OPEN_AT + 8 * proc
            self._lock(slot)
            try:
                struct.pack_into("=q", self._map, at, 0)
            finally:
                self._unlock(slot)

    # --- reads (no lock: a snapshot for reports and the limits' properties) ---------

    def open_count(self, slot: int) -> int:
        return sum(_CELLS.unpack_from(self._map, slot * SLOT_SIZE + _OPEN_AT))

    def used(self, slot: int) -> int:
        return sum(_CELLS.unpack_from(self._map, slot * SLOT_SIZE + _USED_AT))

    def upload_limit(self, slot: int) -> int:
        return _HEAD.unpack_from(self._map, slot * SLOT_SIZE)[5]


class _UploadView:
    """ByteBudget's read side (limit, used, remaining) for a shared slot."""

    def __init__(self, table: SharedTable, slot: int) -> None:
        self._table, self._slot = table, slot

    @property
    def limit(self) -> int:
        return self._table.upload_limit(self._slot)

    @property
    def used(self) -> int:
        return self._table.used(self._slot)

    @property
    def remaining(self) -> int:
        return self.limit - self.used


class SharedLimits:
    """gateway.ratelimit.SandboxLimits's interface over slot `slot` of `table`, as
    process number `proc` (0: the gateway's first process)."""

    def __init__(
        self, table: SharedTable, slot: int, proc: int, clock: Clock = time.monotonic
    ) -> None:
        if not 0 <= proc < MAX_PROCESSES:
            raise ValueError(f"process number {proc} is not below {MAX_PROCESSES}")
        if not 0 <= slot < table.slots:
            raise ValueError(f"slot {slot} is not in the table ({table.slots} slots)")
        self.table, self.slot, self.proc = table, slot, proc
        self._clock = clock
        self.upload = _UploadView(table, slot)

    def try_acquire_request(self) -> bool:
        return self.table.take_token(self.slot, self._clock())

    def open_connection(self) -> bool:
        return self.table.open_connection(self.slot, self.proc)

    def close_connection(self) -> None:
        self.table.close_connection(self.slot, self.proc)

    def charge_upload(self, n: int) -> bool:
        return self.table.charge(self.slot, self.proc, n)
