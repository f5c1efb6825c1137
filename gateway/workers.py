"""The gateway's other processes (GatewayConfig.processes > 1).

One Python process moves at most one core's worth of requests. With `processes` N,
the gateway (the "first" process: the daemon, or `sandgate run`'s gateway thread)
starts N - 1 helper processes (a new Python running gateway.workers.main, exec'd:
the daemon has threads and must not fork). Every process accepts on every sandbox's listeners (the
first one makes them and passes each helper a duplicate), so the kernel gives each
new connection to whichever process is waiting.

What stays in the first process: making and removing listeners, the in-sandbox API,
the git gateway and its credentials (a helper never holds one: it passes a git or API
connection, and the bytes it has read, back to the first process), the resolver
(a helper asks for a name it has not looked up within resolve_cache_ttl; its answers
are classified in the helper as they would be in the first), the sandboxes' recent
denials and the on_record hook (helpers send their records). The per-sandbox limits
are in shared memory (gateway/shared.py). Each process appends its own audit lines
to the same file (O_APPEND, one write per line).

The channel: a SOCK_SEQPACKET socketpair per helper (messages keep their bounds and
their order, and carry descriptors). First -> helper: pickled tuples (the first
process trusts only itself). Helper -> first: a JSON header line, then raw bytes for
a handoff; never unpickled, since a helper reads what sandboxes send.

A helper ends when its channel closes (the first process exited or died; also
PR_SET_PDEATHSIG). A helper that dies is replaced (at most RESTARTS_ALLOWED times per
RESTART_WINDOW seconds, then the first process carries on alone); the connections it
held are forgotten in the shared table.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from gateway.audit import Tally

log = logging.getLogger("sandgate.gateway")

MAX_MESSAGE = 256 * 1024  # the channel's socket buffers are at least this
MAX_FDS = 4
REMOVE_ACK_TIMEOUT = 5.0  # a helper that does not close a sandbox's listeners in time is killed
EXIT_TIMEOUT = 2.0
RESTARTS_ALLOWED = 5
RESTART_WINDOW = 60.0
RECORDS_PER_MESSAGE = 100
COUNTS_INTERVAL = 0.1


class Channel:
    """One end of a SOCK_SEQPACKET pair on the running loop. send() never blocks: what
    the kernel does not take yet waits here, in order (the descriptors duplicated
    until sent). `on_message(data, fds)` gets every message as it arrives (the fds
    are the receiver's to close); `on_closed()` once, at the end."""

    def __init__(
        self,
        sock: socket.socket,
        on_message: Callable[[bytes, list[int]], None],
        on_closed: Callable[[], None],
    ) -> None:
        sock.setblocking(False)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, 2 * MAX_MESSAGE)
        self.sock = sock
        self._on_message = on_message
        self._on_closed = on_closed
        self._queue: list[tuple[bytes, list[int]]] = []
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self._loop.add_reader(sock.fileno(), self.drain)

    def send(self, data: bytes, fds: tuple[int, ...] | list[int] = ()) -> None:
        if self._closed:
            return
        if len(data) > MAX_MESSAGE:
            raise ValueError(f"a gateway channel message is at most {MAX_MESSAGE} bytes")
        owned = [os.dup(fd) for fd in fds]
        self._queue.append((data, owned))
        if len(self._queue) == 1:
            self._flush()

    def _flush(self) -> None:
        while self._queue:
            data, fds = self._queue[0]
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            try:
                self.sock.sendmsg([data], anc)
            except (BlockingIOError, InterruptedError):
                self._loop.add_writer(self.sock.fileno(), self._flush)
                return
            except OSError:
                self.close()  # the other end is gone: its reader sees the end too
                return
            self._queue.pop(0)
            for fd in fds:
                os.close(fd)
        with contextlib.suppress(Exception):
            self._loop.remove_writer(self.sock.fileno())

    def drain(self) -> None:
        """Take every message waiting now (also called directly, to be sure that what a
        helper sent before it answered a client has been taken)."""
        while not self._closed:
            try:
                data, anc, flags, _ = self.sock.recvmsg(
                    MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC
                )
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, anc, flags = b"", [], 0
            fds: list[int] = []
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
            if not data and not fds:
                self.close()
                self._on_closed()
                return
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                for fd in fds:
                    os.close(fd)
                log.error("gateway: a channel message was cut off; dropped")
                continue
            try:
                self._on_message(data, fds)
            except Exception:
                log.exception("gateway: a channel message failed")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self.sock.fileno())
        with contextlib.suppress(Exception):
            self._loop.remove_writer(self.sock.fileno())
        for _, fds in self._queue:
            for fd in fds:
                os.close(fd)
        self._queue.clear()
        self.sock.close()


def encode_up(header: dict[str, Any], payload: bytes = b"") -> bytes:
    """Helper -> first: a JSON header line, then raw bytes."""
    return json.dumps(header, separators=(",", ":")).encode() + b"\n" + payload


def decode_up(data: bytes) -> tuple[dict[str, Any], bytes]:
    head, _, payload = data.partition(b"\n")
    header = json.loads(head)
    if not isinstance(header, dict) or not isinstance(header.get("op"), str):
        raise ValueError("not a gateway channel message")
    return header, payload


# --- the first process's side --------------------------------------------------------


class _Helper:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: Channel | None = None
        self.acks: dict[str, asyncio.Future[None]] = {}
        self.starts: list[float] = []


class WorkerPool:
    """The first process's helpers. `gateway` is the first process's Gateway: the pool
    calls its _from_helper(index, header, payload, fds) for every message, and asks
    it for the state to give a (re)started helper (gateway._helper_state())."""

    def __init__(self, gateway: Any, count: int, table_fd: int) -> None:
        self.gateway = gateway
        self.table_fd = table_fd
        self.helpers = [_Helper(i + 1) for i in range(count)]
        self._closing = False

    def start(self) -> None:
        for helper in self.helpers:
            self._spawn(helper)

    def _spawn(self, helper: _Helper) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            helper.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-I",  # no current directory, no PYTHON* variables, no user site
                    "-c",
                    _HELPER_MAIN,
                    _CODE_ROOT,
                    str(helper.index),
                    str(theirs.fileno()),
                    str(self.table_fd),
                    str(os.getpid()),
                ],
                pass_fds=(theirs.fileno(), self.table_fd),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                close_fds=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        helper.starts.append(time.monotonic())
        helper.channel = Channel(
            ours,
            lambda data, fds, h=helper: self._message(h, data, fds),
            lambda h=helper: self._closed(h),
        )
        for message, fds in self.gateway._helper_state():
            helper.channel.send(pickle.dumps(message), fds)

    def send(self, message: tuple, fds: tuple[int, ...] | list[int] = ()) -> None:
        data = pickle.dumps(message)
        for helper in self.helpers:
            if helper.channel is not None:
                helper.channel.send(data, fds)

    async def remove(self, sandbox_id: str) -> None:
        """Every helper has closed the sandbox's listeners and connections (or has
        been killed for not doing so within REMOVE_ACK_TIMEOUT)."""
        loop = asyncio.get_running_loop()
        waits = []
        for helper in self.helpers:
            if helper.channel is None:
                continue
            ack = helper.acks[sandbox_id] = loop.create_future()
            helper.channel.send(pickle.dumps(("remove", sandbox_id)))
            waits.append((helper, ack))
        for helper, ack in waits:
            try:
                await asyncio.wait_for(asyncio.shield(ack), REMOVE_ACK_TIMEOUT)
            except TimeoutError:
                log.error(
                    "gateway helper %d did not close sandbox %s's listeners within %gs; killing it",
                    helper.index,
                    sandbox_id,
                    REMOVE_ACK_TIMEOUT,
                )
                self._kill(helper)
            finally:
                helper.acks.pop(sandbox_id, None)

    def drain(self) -> None:
        for helper in self.helpers:
            if helper.channel is not None:
                helper.channel.drain()

    def reply(self, index: int, message: tuple) -> None:
        helper = self.helpers[index - 1]
        if helper.channel is not None:
            helper.channel.send(pickle.dumps(message))

    def _message(self, helper: _Helper, data: bytes, fds: list[int]) -> None:
        try:
            header, payload = decode_up(data)
        except ValueError:
            for fd in fds:
                os.close(fd)
            log.error("gateway helper %d sent a malformed message; ignored", helper.index)
            return
        if header["op"] == "removed":
            ack = helper.acks.get(str(header.get("id")))
            if ack is not None and not ack.done():
                ack.set_result(None)
            return
        self.gateway._from_helper(helper.index, header, payload, fds)

    def _kill(self, helper: _Helper) -> None:
        if helper.proc is not None and helper.proc.poll() is None:
            helper.proc.kill()

    def _closed(self, helper: _Helper) -> None:
        """The helper's channel ended: it exited or died."""
        helper.channel = None
        proc = helper.proc
        code = None
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = proc.wait(0.2)  # its channel closed: it is exiting
            if code is None:
                proc.kill()
                code = proc.wait()
        for ack in helper.acks.values():
            if not ack.done():
                ack.set_result(None)  # its listeners are closed: it is gone
        self.gateway._helper_gone(helper.index)
        if self._closing:
            return
        now = time.monotonic()
        helper.starts = [t for t in helper.starts if now - t < RESTART_WINDOW]
        if len(helper.starts) >= RESTARTS_ALLOWED:
            log.error(
                "gateway helper %d ended (status %s) %d times within %gs; not restarted: "
                "the gateway goes on with fewer processes",
                helper.index,
                code,
                len(helper.starts),
                RESTART_WINDOW,
            )
            return
        log.error("gateway helper %d ended (status %s); starting another", helper.index, code)
        try:
            self._spawn(helper)
        except Exception:
            log.exception("gateway helper %d could not be restarted", helper.index)

    async def close(self) -> None:
        """Ask every helper to exit; kill those still there after EXIT_TIMEOUT."""
        self._closing = True
        for helper in self.helpers:
            if helper.channel is not None:
                helper.channel.send(pickle.dumps(("exit",)))
        deadline = time.monotonic() + EXIT_TIMEOUT
        for helper in self.helpers:
            proc = helper.proc
            if proc is None:
                continue
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if helper.channel is not None:
                helper.channel.close()
                helper.channel = None


# --- the helper's side -----------------------------------------------------------------


class PrimaryLink:
    """A helper's channel to the first process, as the helper's Gateway uses it."""

    def __init__(self, index: int, sock: socket.socket, on_message, on_closed) -> None:
        self.index = index
        self.channel = Channel(sock, on_message, on_closed)
        self._records: list[list[Any]] = []
        self._flush_scheduled = False
        self._seq = 0
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.records_wanted = True
        # Set when the first process has an on_counts hook: the helper's Gateway sums
        # its records here, sent every COUNTS_INTERVAL seconds.
        self.tally: Tally | None = None
        self._counts_scheduled: asyncio.TimerHandle | None = None

    def send(self, header: dict[str, Any], payload: bytes = b"", fds: tuple[int, ...] = ()):
        self.channel.send(encode_up(header, payload), fds)

    def handoff(self, sandbox_id: str, endpoint: str, raw: bytes, fd: int) -> None:
        self.send({"op": "handoff", "id": sandbox_id, "endpoint": endpoint}, raw, (fd,))

    def wants(self, decision: str, early: bool) -> bool:
        """Whether the first process wants a record: every one for its on_record hook;
        without a hook, only the denials and errors not sent already (denial())."""
        return self.records_wanted or (decision != "allow" and not early)

    def record(self, record: dict[str, Any], early: bool) -> None:
        """A finished exchange's record (one it wants()), sent with others at the end
        of this loop iteration (at once when RECORDS_PER_MESSAGE are waiting), as
        [early, values in AuditRecord's field order]: a list encodes and decodes in
        about half the time of the dict, and the daemon's metrics want every record."""
        self._records.append([early, list(record.values())])
        if len(self._records) >= RECORDS_PER_MESSAGE:
            self.flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def counts_due(self) -> None:
        """The tally has sums: send them within COUNTS_INTERVAL seconds."""
        if self._counts_scheduled is None:
            loop = asyncio.get_running_loop()
            self._counts_scheduled = loop.call_later(COUNTS_INTERVAL, self._send_counts)

    def _send_counts(self) -> None:
        self._counts_scheduled = None
        if self.tally:
            counts = self.tally.take()
            for at in range(0, len(counts), RECORDS_PER_MESSAGE):
                self.send({"op": "counts", "counts": counts[at : at + RECORDS_PER_MESSAGE]})

    def flush(self) -> None:
        """Send the records and sums kept so far, now."""
        self._flush_scheduled = False
        if self._records:
            records, self._records = self._records, []
            self.send({"op": "records", "records": records})
        if self._counts_scheduled is not None:
            self._counts_scheduled.cancel()
            self._send_counts()

    def denial(self, record: list[Any]) -> None:
        """A refusal, sent before the client gets it: the sandbox may ask for its
        denials as soon as it has the answer."""
        self.send({"op": "denial", "record": record})

    async def resolve(self, sandbox_id: str, host: str, port: int, timeout: float):
        self._seq += 1
        seq = self._seq
        fut = self.pending[seq] = asyncio.get_running_loop().create_future()
        try:
            self.send({"op": "resolve", "seq": seq, "id": sandbox_id, "host": host, "port": port})
            async with asyncio.timeout(timeout):
                return await fut
        finally:
            self.pending.pop(seq, None)


# A helper runs the very code its first process runs (the directory this package was
# imported from), whatever the current directory, the environment or an upgrade in
# place since the first process started would otherwise find first.
_CODE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HELPER_MAIN = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from gateway.workers import main; sys.exit(main(sys.argv[2:]))"
)


def _die_with_parent(parent: int) -> None:
    from runner import syscalls  # the same call the fork server and inits make

    syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(0)  # the parent was already gone


async def _helper_main(index: int, sock: socket.socket, table_fd: int) -> None:
    from gateway.proxy import Gateway
    from gateway.shared import SharedTable

    done = asyncio.get_running_loop().create_future()
    gateway: list[Gateway] = []
    table = SharedTable.attach(table_fd)

    def on_message(data: bytes, fds: list[int]) -> None:
        message = pickle.loads(data)
        if message[0] == "exit":
            if not done.done():
                done.set_result(None)
            return
        if message[0] == "config":
            link.records_wanted = bool(message[2])
            link.tally = Tally() if message[3] else None
            gateway.append(Gateway(message[1], link=link, table=table, proc=index))
            return
        gateway[0]._from_primary(message, fds)

    def on_closed() -> None:
        if not done.done():
            done.set_result(None)

    link = PrimaryLink(index, sock, on_message, on_closed)
    try:
        await done
    finally:
        if gateway:
            await gateway[0].close()
        link.channel.close()


def main(argv: list[str]) -> int:
    index, chan_fd, table_fd, parent = (int(a) for a in argv)
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is for the first process
    logging.basicConfig(
        level=logging.INFO, format=f"sandgate gateway helper {index}: %(levelname)s %(message)s"
    )
    import uvloop

    sock = socket.socket(fileno=chan_fd)
    uvloop.run(_helper_main(index, sock, table_fd))
    return 0
