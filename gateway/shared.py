"""Per-sandbox limits shared by the gateway's processes (GatewayConfig.processes > 1).

When several processes accept on a sandbox's listeners, its request rate, open
connections and upload budget must be counted once for all of them, or each process
would let the sandbox have the whole allowance again. They are kept here, in one
shared memory file (a memfd, mapped by every gateway process), one fixed-size slot
per sandbox, and changed only under the slot's lock.

The lock is a process-shared, robust pthread mutex in the slot itself, called
through ctypes without releasing the GIL: ~0.26 us for a lock and an unlock (an
fcntl record lock costs ~1.2 us, two system calls and two GIL hand-overs; with
three locked steps per request, the gateway measured that difference). Robust: when
a process dies holding it, the next one to lock is told (EOWNERDEAD) and carries on,
so a killed process can never leave a slot locked. The critical sections are a few
Python statements, never I/O.

The same checks as gateway/ratelimit.py (a token bucket, a capped counter, a byte
budget), with the same interface (SandboxLimits), only the state lives in the slot:

  mutex                           the slot's lock (64 bytes kept for pthread_mutex_t)
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

import ctypes
import errno
import mmap
import os
import struct
import time
from collections.abc import Iterable

from gateway.policy import EgressPolicy
from gateway.ratelimit import Clock

MAX_PROCESSES = 8
_MUTEX_SIZE = 64  # glibc's pthread_mutex_t: 40 bytes on x86_64, 48 on aarch64
_BUCKET = struct.Struct("=dqdd")  # rate, burst, tokens, updated
_TOKENS = struct.Struct("=dd")  # tokens, updated
_LIMITS = struct.Struct("=qq")  # max_connections, upload_limit
_Q = struct.Struct("=q")
_CELLS = struct.Struct(f"={MAX_PROCESSES}q")
_BUCKET_AT = _MUTEX_SIZE
_TOKENS_AT = _BUCKET_AT + 16
_MAX_CONN_AT = _BUCKET_AT + _BUCKET.size
_UPLOAD_LIMIT_AT = _MAX_CONN_AT + 8
_OPEN_AT = _MAX_CONN_AT + _LIMITS.size
_USED_AT = _OPEN_AT + _CELLS.size
SLOT_SIZE = 64 * ((_USED_AT + _CELLS.size + 63) // 64)

_PTHREAD_PROCESS_SHARED = 1
_PTHREAD_MUTEX_ROBUST = 1


class _Pthread:
    """glibc's mutex calls, bound once: PyDLL keeps the GIL (the calls never wait
    long: a critical section is a few statements in another process)."""

    def __init__(self) -> None:
        libc = ctypes.PyDLL(None, use_errno=True)
        self.lock = libc.pthread_mutex_lock
        self.unlock = libc.pthread_mutex_unlock
        self.consistent = libc.pthread_mutex_consistent
        self.init = libc.pthread_mutex_init
        for fn in (self.lock, self.unlock, self.consistent):
            fn.argtypes = [ctypes.c_void_p]
            fn.restype = ctypes.c_int
        self.init.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self.init.restype = ctypes.c_int
        self.attr = ctypes.create_string_buffer(64)  # pthread_mutexattr_t: 4 bytes
        for call, args in (
            (libc.pthread_mutexattr_init, ()),
            (libc.pthread_mutexattr_setpshared, (_PTHREAD_PROCESS_SHARED,)),
            (libc.pthread_mutexattr_setrobust, (_PTHREAD_MUTEX_ROBUST,)),
        ):
            err = call(self.attr, *args)
            if err:
                raise OSError(err, f"{call.__name__}: {os.strerror(err)}")


_pthread: _Pthread | None = None


def _libc() -> _Pthread:
    global _pthread
    if _pthread is None:
        _pthread = _Pthread()
    return _pthread


class SharedTable:
    """`slots` slots in one memfd. The process that makes it (create: every slot's
    mutex initialised) passes `fd` to the others (inherited or SCM_RIGHTS), which
    open it with SharedTable.attach."""

    def __init__(self, fd: int, slots: int) -> None:
        self.fd = fd
        self.slots = slots
        self._map = mmap.mmap(fd, slots * SLOT_SIZE)
        self._buf = ctypes.c_char.from_buffer(self._map)
        self._base = ctypes.addressof(self._buf)
        pt = _libc()
        self._pt_lock, self._pt_unlock, self._pt_consistent = pt.lock, pt.unlock, pt.consistent

    @classmethod
    def create(cls, slots: int) -> SharedTable:
        if slots < 1:
            raise ValueError("a shared table needs at least one slot")
        fd = os.memfd_create("sandgate-gateway-limits", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, slots * SLOT_SIZE)  # zero-filled, pages made when touched
            table = cls(fd, slots)
        except BaseException:
            os.close(fd)
            raise
        pt = _libc()
        for slot in range(slots):
            err = pt.init(table._base + slot * SLOT_SIZE, pt.attr)
            if err:
                table.close()
                raise OSError(err, f"pthread_mutex_init: {os.strerror(err)}")
        return table

    @classmethod
    def attach(cls, fd: int) -> SharedTable:
        size = os.fstat(fd).st_size
        if size == 0 or size % SLOT_SIZE:
            raise ValueError(f"not a shared limits table: {size} bytes")
        return cls(fd, size // SLOT_SIZE)

    def close(self) -> None:
        del self._buf  # the mapping cannot close while ctypes holds a view of it
        self._map.close()
        os.close(self.fd)

    # --- under the slot's lock -------------------------------------------------------

    def _lock(self, slot: int) -> None:
        at = self._base + slot * SLOT_SIZE
        err = self._pt_lock(at)
        if err == errno.EOWNERDEAD:
            # A process died holding it (between two statements of a section below):
            # the slot's numbers are as it left them, which is the best there is.
            self._pt_consistent(at)
        elif err:
            raise OSError(err, f"pthread_mutex_lock: {os.strerror(err)}")

    def _unlock(self, slot: int) -> None:
        self._pt_unlock(self._base + slot * SLOT_SIZE)

    def set_limits(self, slot: int, egress: EgressPolicy, *, keep_counts: bool) -> None:
        """Give `slot` the policy's limits, the bucket full. keep_counts False (a new
        sandbox) zeroes the open and used cells too; True (a policy reload) keeps them."""
        base = slot * SLOT_SIZE
        m = self._map
        self._lock(slot)
        try:
            _BUCKET.pack_into(
                m,
                base + _BUCKET_AT,
                float(egress.rate),
                egress.burst,
                float(egress.burst),
                time.monotonic(),
            )
            _LIMITS.pack_into(m, base + _MAX_CONN_AT, egress.max_connections, egress.upload_budget)
            if not keep_counts:
                zero = (0,) * MAX_PROCESSES
                _CELLS.pack_into(m, base + _OPEN_AT, *zero)
                _CELLS.pack_into(m, base + _USED_AT, *zero)
        finally:
            self._unlock(slot)

    def take_token(self, slot: int, now: float) -> bool:
        at = slot * SLOT_SIZE + _BUCKET_AT
        m = self._map
        self._lock(slot)
        try:
            rate, burst, tokens, updated = _BUCKET.unpack_from(m, at)
            # max(0, ...): as TokenBucket, a clock that steps back must not drain it.
            tokens = min(float(burst), tokens + max(0.0, now - updated) * rate)
            ok = tokens >= 1.0
            _TOKENS.pack_into(m, at + 16, tokens - 1.0 if ok else tokens, now)
            return ok
        finally:
            self._unlock(slot)

    def open_connection(self, slot: int, proc: int) -> bool:
        base = slot * SLOT_SIZE
        m = self._map
        self._lock(slot)
        try:
            cells = _CELLS.unpack_from(m, base + _OPEN_AT)
            if sum(cells) >= _Q.unpack_from(m, base + _MAX_CONN_AT)[0]:
                return False
            _Q.pack_into(m, base + _OPEN_AT + 8 * proc, cells[proc] + 1)
            return True
        finally:
            self._unlock(slot)

    def close_connection(self, slot: int, proc: int) -> None:
        """Under the lock too, although only process `proc` writes its cell: without
        it, two processes hammering one slot under CPU contention did pass the cap
        (cells (3, 3) with a cap of 4, about one run in eight, in
        test_two_processes_never_pass_the_limits_together); with it, never. The
        same lock-free decrement written as one 8-byte ctypes store did not (0 in
        16), so struct.pack_into's store, which is not one machine store, is
        involved; every write here is therefore made under the lock."""
        at = slot * SLOT_SIZE + _OPEN_AT + 8 * proc
        self._lock(slot)
        try:
            (n,) = _Q.unpack_from(self._map, at)
            if n <= 0:
                raise RuntimeError("close_connection() without a matching open_connection()")
            _Q.pack_into(self._map, at, n - 1)
        finally:
            self._unlock(slot)

    def charge(self, slot: int, proc: int, n: int) -> bool:
        if n < 0:
            raise ValueError("cannot charge a negative number of bytes")
        base = slot * SLOT_SIZE
        m = self._map
        self._lock(slot)
        try:
            cells = _CELLS.unpack_from(m, base + _USED_AT)
            if sum(cells) + n > _Q.unpack_from(m, base + _UPLOAD_LIMIT_AT)[0]:
                return False
            _Q.pack_into(m, base + _USED_AT + 8 * proc, cells[proc] + n)
            return True
        finally:
            self._unlock(slot)

    def forget_process(self, proc: int, slots: Iterable[int] | None = None) -> None:
        """A gateway process died: the connections it held (in `slots`, by default
        every slot) are closed by the kernel."""
        for slot in range(self.slots) if slots is None else slots:
            self._lock(slot)
            try:
                _Q.pack_into(self._map, slot * SLOT_SIZE + _OPEN_AT + 8 * proc, 0)
            finally:
                self._unlock(slot)

    # --- reads without the lock, for reports and the limits' properties: the cells
    # are read one after the other, so a sum can mix moments (a cell read before a
    # close and another after the open that close made room for). Under _lock the
    # sum of open cells is an upper bound: nothing opens meanwhile. ---------------

    def open_count(self, slot: int) -> int:
        return sum(_CELLS.unpack_from(self._map, slot * SLOT_SIZE + _OPEN_AT))

    def used(self, slot: int) -> int:
        return sum(_CELLS.unpack_from(self._map, slot * SLOT_SIZE + _USED_AT))

    def upload_limit(self, slot: int) -> int:
        return _Q.unpack_from(self._map, slot * SLOT_SIZE + _UPLOAD_LIMIT_AT)[0]


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
