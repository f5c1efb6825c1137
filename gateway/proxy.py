"""The egress proxy: asyncio listeners per sandbox that move bytes and ask.

gateway/http.py parses, gateway/policy.py decides, gateway/addr.py classifies,
gateway/ratelimit.py counts and gateway/audit.py records; this module owns sockets,
timeouts and the order of the questions. Per connection, one request:

  read the head (bounded, head_timeout)       malformed      -> 400 (501, 505)
  in-sandbox API (Unix listener, origin-form) GET /_sandgate/v1/policy, /denials
  git gateway (origin-form /git/..., both)    rate and connection cap, then gateway/git.py
  request rate (token bucket)                 over           -> 429
  open connections                            over the cap   -> 429
  policy.decide                               denied         -> 403 (413: body size)
  upload budget vs Content-Length             over           -> 429
  body bytes that came with the head          malformed/big  -> 400/413, nothing dialed
  resolve and classify                        refused        -> 403
  dial exactly a checked address              fails          -> 502, times out -> 504
  CONNECT: "200 Connection established", then relay both ways
  HTTP: the rebuilt head and re-framed body, then the response relayed unchanged

Resolving. A name the resolver can answer without I/O (a pinned name, see
gateway.addr.Resolver) or that was looked up less than `resolve_cache_ttl` seconds
ago is answered on the event loop; any other name is looked up in a thread pool
(getaddrinfo blocks). Only answers are reused, never a verdict: every answer is
classified (gateway/addr.py) again for every request, against the sandbox's
allow_cidrs and the gateway's own addresses as they are then.

Identity is the listener a connection arrived on, never something the client says.
Each connection carries one request (plain HTTP is sent upstream with
`Connection: close` and the response is relayed until the upstream closes, then the
client connection is closed too), so every decision is one audit line, written
when the connection ends (a refusal, at once).

Connections and transports. Each listener is registered with the loop once and
accepts up to ACCEPT_BATCH queued connections per wake-up; every connection then
becomes an event-loop transport (_Stream), registered with epoll once for its life,
and the plain-HTTP upstream connection is made by the loop's own connect. (uvloop's
sock_* calls register and unregister the descriptor around every single wait, a dozen
epoll_ctl calls and as many loop iterations per request; its own server accepts one
connection per loop iteration.) A CONNECT tunnel, and the git gateway, take the client
connection back as a socket of their own (_Stream.detach). One loop timer per
connection enforces, in turn, the head timeout, each connect timeout and the relay's
idle and total timeouts (_Deadlines).

Moving bytes. A plain-HTTP response is relayed from the transports' callbacks as it
arrives (_Stream.pipe), reading from the upstream only while the client has taken
everything sent so far, and the status line is read for the log; a request body is
decoded and re-framed by a second pump. Tunnels are relayed by two pumps, one per
direction, that run on the event loop. A tunnel pump uses splice(2)
(socket -> pipe -> socket, zero-copy) on non-blocking sockets, waiting with
add_reader and add_writer: it reads at most one pipe's worth and does not read
again until that is written, so a slow receiver stops the sender through TCP flow
control, and no thread is needed per tunnel (a thread per tunnel would cost a stack
and a kernel task per connection and would need its own idle/total timeout
machinery). When a socket does not support splice (EINVAL) the pump falls back to
recv/send.
Upload bytes (tunnel client->upstream, plain-HTTP head and body) are charged to the
sandbox's budget before they are written: when it runs out, the connection is
closed, and a chunked body then never gets its terminating 0-chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import errno
import fcntl
import functools
import json
import logging
import os
import re
import socket
import stat
import time
import traceback
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from ipaddress import ip_address
from typing import Any

from gateway import http
from gateway.addr import (
    AddressRefused,
    IPAddress,
    IPNetwork,
    Resolver,
    as_networks,
    check_answers,
    literal_target,
    local_answer,
    parse_ip_literal,
    system_resolver,
)
from gateway.audit import (
    DEFAULT_AUDIT_PATH,
    AuditLog,
    AuditRecord,
    Count,
    Tally,
    count_from_json,
    new_request_id,
    redact,
)
from gateway.credentials import DEFAULT_CREDENTIALS_DIR, CredentialStore
from gateway.git import (
    DEFAULT_MAX_FETCH_BODY,
    DEFAULT_MAX_PUSH_BODY,
    DEFAULT_MAX_RESPONSE,
    GIT_PREFIX,
    GitGateway,
    GitLimits,
    GitRefused,
)
from gateway.http import BadRequest, ProxyRequest, RequestKind, RequestReader
from gateway.policy import DEFAULT_DENY, Decision, EgressPolicy, Policy, Request, decide
from gateway.policy import policy_summary as _policy_summary
from gateway.ratelimit import SandboxLimits
from gateway.shared import MAX_PROCESSES, SharedLimits, SharedTable
from gateway.workers import PrimaryLink, WorkerPool

log = logging.getLogger("sandgate.gateway")

RECV_SIZE = 64 * 1024
PIPE_SIZE = 1024 * 1024  # asked for; the kernel may give less (fs.pipe-max-size)
API_PREFIX = "/_sandgate/"
API_POLICY = "/_sandgate/v1/policy"
API_DENIALS = "/_sandgate/v1/denials"
GATEWAY_SOCKET_IN_SANDBOX = "/run/sandgate/gateway.sock"
REFUSED_HEAD_TIMEOUT = 2.0  # over the connection cap: read the head only briefly
LINGER_TIMEOUT = 1.0
LINGER_BYTES = 256 * 1024
ACCEPT_BATCH = 16  # connections taken from a listener's queue per wake-up, at most
LISTEN_BACKLOG = 128
ACCEPT_RETRY = 0.1  # seconds without accepting after running out of descriptors
MAX_BUFFERED = 64 * 1024  # received from a connection and not yet taken (_Stream)
_RESPONSE_STATUS = re.compile(rb"HTTP/1\.[01] ([0-9]{3})")
_ENDPOINTS = ("tcp", "unix")
_AUDIT_FIELDS = len(dataclasses.fields(AuditRecord))
VERDICTS_KEPT = 256  # per sandbox: checked answers reused (Gateway._resolve)
DECISIONS_KEPT = 1024  # per sandbox: policy decisions reused (_decide)


@dataclass(frozen=True)
class GatewayConfig:
    """`self_addrs` are the host's own addresses or networks (the sandbox pool, the
    host's interfaces): never dialed whatever a policy allows. The TCP listener
    addresses of all sandboxes are added to them automatically. `splice` False makes
    tunnels use recv/send (for measurement and for kernels without splice).

    The git gateway (gateway/git.py): `credentials_dir` is the root-only directory of
    upstream credentials (gateway/credentials.py; None: never any), `upstream_ca_file`
    the CA bundle git hosts and the GitHub API are verified against (None: the system
    trust store), and the git_max_* limits bound a push body, an upload-pack body and
    one relayed response body, in bytes.

    `resolve_cache_ttl`: how long (seconds) the gateway reuses a name's addresses
    from a blocking lookup before asking the resolver again (0: never reuse); the
    addresses are checked again on every use, and failures are never reused.

    `on_record`: called on the loop thread with every AuditRecord right after its line
    is written to the audit log (for whatever wants each record; counters want
    on_counts). It must be quick and must not keep or modify the record; whatever it raises
    is logged and ignored, never failing a request. With several processes, every
    helper sends every record to the first process for it (~5-10 us a request).

    `on_counts`: called on the loop thread with the records of the last moments summed
    as audit.Counts (by kind, decision, rule or reason, status: how many, bytes up and
    down), after their lines are written; for counters, which want every record but
    not each one. The first process's own records are summed per turn of its loop; a
    helper sends its sums every workers.COUNTS_INTERVAL seconds (and before a sandbox's
    removal is acknowledged, and when it ends), so a count may lag by that much; a
    helper that is killed takes its unsent sums with it. Errors as for on_record.

    `processes`: how many processes serve the sandboxes' connections (1 to
    gateway.shared.MAX_PROCESSES). Above 1, the gateway starts processes - 1 helpers
    (gateway/workers.py) that accept on the same listeners, and keeps the per-sandbox
    limits in shared memory with room for `max_sandboxes` sandboxes at once."""

    audit_path: str = DEFAULT_AUDIT_PATH
    resolver: Resolver = system_resolver
    connect_timeout: float = 10.0
    head_timeout: float = 30.0
    idle_timeout: float = 300.0
    tunnel_total_timeout: float = 3600.0
    self_addrs: frozenset[IPAddress | IPNetwork | str] = frozenset()
    splice: bool = True
    recent_denials: int = 100
    resolver_threads: int = 16
    resolve_cache_ttl: float = 30.0
    credentials_dir: str | None = DEFAULT_CREDENTIALS_DIR
    upstream_ca_file: str | None = None
    git_max_push_body: int = DEFAULT_MAX_PUSH_BODY
    git_max_fetch_body: int = DEFAULT_MAX_FETCH_BODY
    git_max_response: int = DEFAULT_MAX_RESPONSE
    on_record: Callable[[AuditRecord], None] | None = None
    on_counts: Callable[[list[Count]], None] | None = None
    processes: int = 1
    max_sandboxes: int = 1024


@dataclass(frozen=True)
class SandboxEndpoints:
    """Where a sandbox's listeners are bound (the real port when 0 was asked)."""

    tcp: tuple[str, int] | None
    unix: str | None


class _Refusal(Exception):
    """Stop this exchange: answer `status` (unless the response has started), audit."""

    def __init__(
        self,
        status: int,
        decision: str,
        rule: str,
        reason: str,
        hint: str = "",
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.status = status
        self.decision = decision
        self.rule = rule
        self.reason = reason
        self.hint = hint
        self.headers = headers
        super().__init__(reason)


@dataclass
class _Exchange:
    """One client connection's progress; `record` becomes its audit line."""

    record: AuditRecord
    counted: bool  # holds one of the sandbox's connection slots
    started: float = field(default_factory=time.monotonic)
    last_activity: float = field(default_factory=time.monotonic)
    received: int = 0
    responded: bool = False  # bytes of a response reached the client
    audit: bool = True
    status_sniff: bytearray = field(default_factory=bytearray)
    deadlines: _Deadlines = field(init=False)
    # What was read from the connection before its transport was made (or, in the
    # first process, what the helper that handed it over had read).
    prefix: bytes = b""
    denial_sent: bool = False  # a helper sent the refusal's record before answering

    def touch(self) -> None:
        self.last_activity = time.monotonic()


class _ResolutionCache:
    """Recent answers of blocking lookups, by key ((host, port); a helper process's
    are by (sandbox, host, port)), for `ttl` seconds; at most `size` names (the oldest
    is dropped first). Answers only: every use is classified again, so what is reused
    can never be a stale allow."""

    def __init__(self, ttl: float, size: int = 1024) -> None:
        self.ttl = ttl
        self.size = size
        self._answers: dict[tuple, tuple[float, tuple[IPAddress, ...]]] = {}

    def get(self, key: tuple) -> tuple[IPAddress, ...] | None:
        found = self._answers.get(key)
        if found is None:
            return None
        expires, answers = found
        if time.monotonic() >= expires:
            del self._answers[key]
            return None
        return answers

    def put(self, key: tuple, answers: list[IPAddress]) -> None:
        if self.ttl <= 0:
            return
        now = time.monotonic()
        if len(self._answers) >= self.size:
            for key in [k for k, (expires, _) in self._answers.items() if expires <= now]:
                del self._answers[key]
            while len(self._answers) >= self.size:
                del self._answers[next(iter(self._answers))]
        self._answers.pop(key, None)  # re-inserted last: the newest
        self._answers[key] = (now + self.ttl, tuple(answers))


@dataclass
class _Sandbox:
    id: str
    policy: Policy
    limits: SandboxLimits
    denials: deque[dict[str, Any]]
    listeners: list[socket.socket] = field(default_factory=list)
    connections: set[asyncio.Task[None]] = field(default_factory=set)
    unix_path: str | None = None
    tcp_addr: str | None = None  # the TCP listener's address: one of the gateway's own
    stopped: bool = False
    slot: int | None = None  # in the shared limits table (several processes)
    # The context the listeners were made in: a helper's lookups are answered in it
    # (a resolver may read per-sandbox settings from a context variable).
    context: contextvars.Context | None = None
    # (host, port) -> the answers, own networks and allow_cidrs last checked, and
    # the addresses they allowed (Gateway._resolve).
    verdicts: dict[tuple[str, int], tuple] = field(default_factory=dict)
    # (method, host, port) -> policy.decide's bodiless decision under `decisions_for`.
    decisions: dict[tuple[str, str, int], Decision] = field(default_factory=dict)
    decisions_for: EgressPolicy | None = None


class Gateway:
    """Serves every sandbox's egress from the running event loop (uvloop in the
    runner; the default loop works too): it is made in that loop, and used only
    there. With GatewayConfig.processes > 1 it also
    runs helper processes (gateway/workers.py); a helper's own Gateway is made with
    `link` (its channel to this one), the shared `table` and its process number."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        link: PrimaryLink | None = None,
        table: SharedTable | None = None,
        proc: int = 0,
    ) -> None:
        if not 1 <= config.processes <= MAX_PROCESSES:
            raise ValueError(f"gateway processes must be 1 to {MAX_PROCESSES}")
        self.config = config
        # Kept: Python 3.11's asyncio.get_running_loop() asks the kernel for the pid
        # on every call (~6 times a request).
        self._loop = asyncio.get_running_loop()
        self._audit = AuditLog(config.audit_path)
        self._audit_flush_due = False
        self._to_notify: list[AuditRecord] = []
        # Records summed for on_counts: in a helper, the link's (it sends them).
        self._tally: Tally | None = (
            link.tally if link is not None else Tally() if config.on_counts else None
        )
        self._sandboxes: dict[str, _Sandbox] = {}
        self._resolver_pool = ThreadPoolExecutor(
            config.resolver_threads, thread_name_prefix="sandgate-resolve"
        )
        self._resolved = _ResolutionCache(config.resolve_cache_ttl)
        # Never dialed: the configured addresses and every sandbox's TCP listener, as
        # networks; rebuilt when a sandbox is added or removed, not per request.
        self._self_networks = self._own_networks()
        self._git = GitGateway(
            self,
            CredentialStore(config.credentials_dir),
            GitLimits(config.git_max_push_body, config.git_max_fetch_body, config.git_max_response),
        )
        self._link = link  # set in a helper process
        self._proc = proc
        self._table = table
        self._pool: WorkerPool | None = None
        self._free_slots: list[int] = []
        if link is None and config.processes > 1:
            self._table = SharedTable.create(config.max_sandboxes)
            self._free_slots = list(range(config.max_sandboxes - 1, -1, -1))
            self._pool = WorkerPool(self, config.processes - 1, self._table.fd)
            self._pool.start()

    # --- sandboxes ---------------------------------------------------------------------

    async def add_sandbox(
        self,
        sandbox_id: str,
        policy: Policy,
        tcp: tuple[str, int] | None = None,
        unix_path: str | None = None,
    ) -> SandboxEndpoints:
        """Listen for `sandbox_id` on a TCP address and/or a Unix socket path. A stale
        socket file at `unix_path` is replaced; any other file there is an error."""
        if sandbox_id in self._sandboxes:
            raise ValueError(f"sandbox {sandbox_id} already has gateway endpoints")
        if tcp is None and unix_path is None:
            raise ValueError("a sandbox needs a TCP or a Unix endpoint")
        sandbox = self._new_sandbox(sandbox_id, policy)
        tcp_bound: tuple[str, int] | None = None
        try:
            if tcp is not None:
                sock = _tcp_listener(*tcp)
                sandbox.listeners.append(sock)
                tcp_bound = sock.getsockname()[:2]
                sandbox.tcp_addr = tcp_bound[0]
                self._start_accepting(sandbox, sock, "tcp")
            if unix_path is not None:
                sock = _unix_listener(unix_path)
                sandbox.unix_path = unix_path
                sandbox.listeners.append(sock)
                self._start_accepting(sandbox, sock, "unix")
        except BaseException:
            await self._stop(sandbox)
            self._free_slot(sandbox)
            raise
        self._sandboxes[sandbox_id] = sandbox
        self._self_networks = self._own_networks()
        if self._pool is not None:
            self._pool.send(*self._add_message(sandbox))
        return SandboxEndpoints(tcp_bound, unix_path)

    def _new_sandbox(self, sandbox_id: str, policy: Policy, slot: int | None = None) -> _Sandbox:
        """The sandbox's state; its limits in the shared table when there is one (the
        first process takes a free slot and fills it; a helper is told the slot)."""
        limits: SandboxLimits | SharedLimits
        if self._table is None:
            limits = SandboxLimits.from_policy(policy.egress)
        else:
            if slot is None:
                if not self._free_slots:
                    raise RuntimeError(
                        f"the gateway has room for {self.config.max_sandboxes} sandboxes "
                        "(GatewayConfig.max_sandboxes) and all are taken"
                    )
                slot = self._free_slots.pop()
                self._table.set_limits(slot, policy.egress, keep_counts=False)
            limits = SharedLimits(self._table, slot, self._proc)
        return _Sandbox(
            sandbox_id,
            policy,
            limits,  # type: ignore[arg-type]
            deque(maxlen=self.config.recent_denials),
            slot=slot,
            # Only the first process of several answers lookups in it.
            context=contextvars.copy_context() if self._pool is not None else None,
        )

    def _free_slot(self, sandbox: _Sandbox) -> None:
        if self._pool is not None and sandbox.slot is not None:
            self._free_slots.append(sandbox.slot)
            sandbox.slot = None

    async def remove_sandbox(self, sandbox_id: str) -> None:
        """Close the sandbox's listeners and every connection it has open (in every
        process of the gateway)."""
        sandbox = self._sandboxes.pop(sandbox_id, None)
        if sandbox is not None:
            self._self_networks = self._own_networks()
            if self._pool is not None:
                await self._pool.remove(sandbox_id)
            await self._stop(sandbox)
            self._free_slot(sandbox)
            await self._git.release(sandbox)  # revoke minted tokens, best effort

    async def close(self) -> None:
        for sandbox_id in list(self._sandboxes):
            await self.remove_sandbox(sandbox_id)
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        self._audit_flush()
        if self._link is not None:
            self._link.flush()
        if self._table is not None and self._link is None:
            self._table.close()
            self._table = None
        self._resolver_pool.shutdown(wait=False, cancel_futures=True)
        self._audit.close()

    def update_policy(self, sandbox_id: str, policy: Policy) -> None:
        """Give a running sandbox a new policy (`sandgate reload --apply-to-running`):
        every later request is decided by it. Its open connections and the upload it
        has used so far carry over to the new limits; the rate bucket starts full.
        Exchanges in flight finish under the policy they started with. Call it on the
        loop thread."""
        sandbox = self._sandboxes.get(sandbox_id)
        if sandbox is None:
            raise KeyError(f"sandbox {sandbox_id} has no gateway endpoints")
        if sandbox.slot is not None:
            if self._link is None:  # the first process owns the shared slot
                assert self._table is not None
                self._table.set_limits(sandbox.slot, policy.egress, keep_counts=True)
            sandbox.policy = policy
            if self._pool is not None:
                self._pool.send(("policy", sandbox_id, policy))
            return
        limits = SandboxLimits.from_policy(policy.egress)
        limits.connections.open = sandbox.limits.connections.open
        limits.upload.used = sandbox.limits.upload.used
        sandbox.policy = policy
        sandbox.limits = limits

    def set_own_addresses(self, addrs: frozenset[IPAddress | IPNetwork | str]) -> None:
        """Replace the host's own addresses (GatewayConfig.self_addrs), e.g. when a
        long-running daemon sees the host's addresses change. Every later request is
        classified against the new set (the sandboxes' TCP listener addresses stay
        included). An invalid item raises ValueError and changes nothing. Call it on
        the loop thread."""
        if isinstance(addrs, str | bytes):
            raise TypeError("set_own_addresses takes a set of addresses, not one string")
        addrs = frozenset(addrs)
        networks = self._own_networks(addrs)  # validates before anything changes
        self.config = replace(self.config, self_addrs=addrs)
        self._self_networks = networks
        if self._pool is not None:
            self._pool.send(("own", addrs))

    def denials(self, sandbox_id: str) -> list[dict[str, Any]]:
        """The sandbox's recent denials and errors, oldest first (audit records)."""
        if self._pool is not None:
            self._pool.drain()
        sandbox = self._sandboxes.get(sandbox_id)
        return [dict(d) for d in sandbox.denials] if sandbox else []

    # --- the first process and its helpers (GatewayConfig.processes > 1) ---------------

    def _add_message(self, sandbox: _Sandbox) -> tuple[tuple, list[int]]:
        endpoints = ["tcp" if s.family != socket.AF_UNIX else "unix" for s in sandbox.listeners]
        message = ("add", sandbox.id, sandbox.policy, sandbox.slot, endpoints, sandbox.tcp_addr)
        return message, [s.fileno() for s in sandbox.listeners]

    def _helper_state(self) -> list[tuple[tuple, list[int]]]:
        """What a (re)started helper is sent first: the configuration, then every
        sandbox with duplicates of its listeners."""
        config = replace(
            self.config,
            resolver=system_resolver,  # never used: a helper asks this process
            on_record=None,
            on_counts=None,
            credentials_dir=None,  # a helper never holds a credential
            processes=1,
        )
        state: list[tuple[tuple, list[int]]] = [
            (("config", config, self.config.on_record is not None, self._tally is not None), [])
        ]
        state.extend(self._add_message(s) for s in self._sandboxes.values())
        return state

    def _helper_gone(self, index: int) -> None:
        """A helper exited or died: the connections it held are closed."""
        if self._table is not None:
            in_use = [s.slot for s in self._sandboxes.values() if s.slot is not None]
            self._table.forget_process(index, in_use)

    def _from_helper(
        self, index: int, header: dict[str, Any], payload: bytes, fds: list[int]
    ) -> None:
        """A helper's message (gateway/workers.py): a connection handed over, records,
        a denial, a name to resolve."""
        op = header["op"]
        if op == "handoff":
            sandbox = self._sandboxes.get(str(header.get("id")))
            endpoint = header.get("endpoint")
            if len(fds) != 1 or sandbox is None or sandbox.stopped or endpoint not in _ENDPOINTS:
                for fd in fds:
                    os.close(fd)
                return
            conn = socket.socket(fileno=fds[0])
            conn.setblocking(False)
            task = self._loop.create_task(self._serve(sandbox, conn, endpoint, prefix=payload))
            sandbox.connections.add(task)
            task.add_done_callback(sandbox.connections.discard)
            return
        for fd in fds:
            os.close(fd)
        if op == "records":
            for item in header.get("records", ()):
                if isinstance(item, list) and len(item) == 2 and isinstance(item[1], list):
                    self._helper_record(item[1], bool(item[0]))
                else:
                    log.error("gateway: a helper sent a malformed record; ignored")
        elif op == "counts":
            try:
                counts = [count_from_json(c) for c in header.get("counts", ())]
            except (TypeError, ValueError) as e:
                log.error("gateway: a helper sent malformed counts (%s); ignored", e)
            else:
                self._deliver_counts(counts)
        elif op == "denial":
            record = header.get("record")
            if isinstance(record, list):
                self._helper_record(record, early=False, notify=False)
        elif op == "resolve":
            self._loop.create_task(self._resolve_for_helper(index, header))

    def _helper_record(self, values: list[Any], early: bool, notify: bool = True) -> None:
        """A helper's record: the values of AuditRecord's fields, in order."""
        try:
            if len(values) != _AUDIT_FIELDS:
                raise TypeError("not an audit record")
            record = AuditRecord(*values)
        except TypeError:
            log.error("gateway: a helper sent a malformed audit record; ignored")
            return
        sandbox = self._sandboxes.get(record.sandbox)
        if sandbox is not None and not early and record.decision != "allow":
            sandbox.denials.append(record.as_dict())
        if notify:
            self._notify(record)

    async def _resolve_for_helper(self, index: int, header: dict[str, Any]) -> None:
        """The answers for a helper's lookup, as _resolve would find them here (the
        helper classifies them)."""
        pool = self._pool
        assert pool is not None
        seq = header.get("seq")
        sandbox = self._sandboxes.get(str(header.get("id")))
        host, port = header.get("host"), header.get("port")
        reply: dict[str, Any]
        if sandbox is None or not isinstance(host, str) or not isinstance(port, int):
            reply = {"refusal": [502, "error", "resolve", "the sandbox is gone"]}
        else:
            try:
                answers = await self._answers(host, port, sandbox.context)
                reply = {"answers": [str(a) for a in answers]}
            except _Refusal as r:
                reply = {"refusal": [r.status, r.decision, r.rule, r.reason]}
            except Exception:
                log.error(
                    "gateway: looking up %s for a helper failed\n%s",
                    host,
                    self._redact(traceback.format_exc()),
                )
                reply = {"refusal": [502, "error", "resolve", f"cannot resolve {host}"]}
        pool.reply(index, ("resolved", seq, reply))

    def _from_primary(self, message: tuple, fds: list[int]) -> None:
        """In a helper: the first process's message (see _add_message, WorkerPool)."""
        op = message[0]
        if op == "add":
            _, sandbox_id, policy, slot, endpoints, tcp_addr = message
            if sandbox_id in self._sandboxes or len(fds) != len(endpoints):
                for fd in fds:
                    os.close(fd)
                return
            sandbox = self._new_sandbox(sandbox_id, policy, slot)
            sandbox.tcp_addr = tcp_addr
            for fd, endpoint in zip(fds, endpoints, strict=True):
                sock = socket.socket(fileno=fd)
                sock.setblocking(False)
                sandbox.listeners.append(sock)
                self._start_accepting(sandbox, sock, endpoint)
            self._sandboxes[sandbox_id] = sandbox
            self._self_networks = self._own_networks()
            return
        for fd in fds:
            os.close(fd)
        if op == "remove":
            self._loop.create_task(self._remove_for_primary(message[1]))
        elif op == "policy":
            with contextlib.suppress(KeyError):
                self.update_policy(message[1], message[2])
        elif op == "own":
            self.set_own_addresses(message[1])
        elif op == "resolved":
            assert self._link is not None
            fut = self._link.pending.get(message[1])
            if fut is not None and not fut.done():
                fut.set_result(message[2])

    async def _remove_for_primary(self, sandbox_id: str) -> None:
        assert self._link is not None
        await self.remove_sandbox(sandbox_id)
        # The records and sums of the connections just closed, first.
        self._audit_flush()
        self._link.flush()
        self._link.send({"op": "removed", "id": sandbox_id})

    def _audit_add(self, record: AuditRecord) -> None:
        """The record's line, written with the others of this turn of the loop; then
        the on_record hook sees it and the tally counts it (after its line is written,
        as promised)."""
        full = self._audit.add(record)
        if self._tally is not None or (self._link is None and self.config.on_record is not None):
            self._to_notify.append(record)
        if full:
            self._audit_flush()
        elif not self._audit_flush_due:
            self._audit_flush_due = True
            self._loop.call_soon(self._audit_flush_soon)

    def _audit_flush_soon(self) -> None:
        self._audit_flush_due = False
        self._audit_flush()

    def _audit_flush(self) -> None:
        try:
            self._audit.flush()
        except OSError as e:
            log.error("gateway: cannot write the audit log %s: %s", self._audit.path, e)
        notify, self._to_notify = self._to_notify, []
        tally = self._tally
        if tally is not None:
            for record in notify:
                tally.add(record)
            if self._link is not None:
                if tally:
                    self._link.counts_due()
                return
        for record in notify:
            self._notify(record)
        if tally:
            self._deliver_counts(tally.take())

    def _redact(self, text: str) -> str:
        """`text` without any secret the git credential store holds (audit.redact)."""
        if not text:
            return text
        secrets = self._git.credentials.secrets()
        return redact(text, secrets) if secrets else text

    def _deliver_counts(self, counts: list[Count]) -> None:
        """GatewayConfig.on_counts, if any; its errors are logged, never raised."""
        hook = self.config.on_counts
        if hook is None or not counts:
            return
        try:
            hook(counts)
        except Exception:
            log.error(
                "gateway: the on_counts hook failed\n%s", self._redact(traceback.format_exc())
            )

    def _notify(self, record: AuditRecord) -> None:
        """GatewayConfig.on_record, if any; its errors are logged, never raised."""
        hook = self.config.on_record
        if hook is None:
            return
        try:
            hook(record)
        except Exception:
            log.error(
                "gateway: the on_record hook failed for request %s\n%s",
                record.request_id,
                self._redact(traceback.format_exc()),
            )

    def _start_accepting(self, sandbox: _Sandbox, sock: socket.socket, endpoint: str) -> None:
        """Accept on `sock` whenever it is readable, for as long as it is open: the
        listener is registered with the loop once (loop.sock_accept would register and
        unregister it for every wait, and uvloop's own server takes one connection per
        loop iteration, which ties the request rate to the loop's iteration rate)."""
        self._loop.add_reader(sock.fileno(), self._accept, sandbox, sock, endpoint)

    def _accept(self, sandbox: _Sandbox, sock: socket.socket, endpoint: str) -> None:
        """Take up to ACCEPT_BATCH queued connections (the bound keeps a flood of new
        connections from starving those already open); each gets a task (_serve)."""
        loop = self._loop
        kind = _Accepted.of(socket.AF_UNIX if endpoint == "unix" else _family(sandbox.tcp_addr))
        for _ in range(ACCEPT_BATCH):
            try:
                # socket.accept() without its wrapper, which asks the listener for its
                # family and type (an enum conversion each) for every connection.
                fd = sock._accept()[0]  # type: ignore[attr-defined]
                conn = kind(kind.family, socket.SOCK_STREAM, 0, fd)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno == errno.ECONNABORTED:
                    continue
                # Out of descriptors or memory (or worse): stop accepting for a moment
                # and leave the connections queued, rather than spin.
                log.warning("gateway %s: accept: %s; retrying", sandbox.id, e.strerror or e)
                loop.remove_reader(sock.fileno())
                loop.call_later(ACCEPT_RETRY, self._resume_accepting, sandbox, sock, endpoint)
                return
            task = loop.create_task(self._serve(sandbox, conn, endpoint))
            sandbox.connections.add(task)
            task.add_done_callback(sandbox.connections.discard)

    def _resume_accepting(self, sandbox: _Sandbox, sock: socket.socket, endpoint: str) -> None:
        if not sandbox.stopped:
            self._start_accepting(sandbox, sock, endpoint)

    async def _stop(self, sandbox: _Sandbox) -> None:
        sandbox.stopped = True
        loop = self._loop
        for sock in sandbox.listeners:
            loop.remove_reader(sock.fileno())
        tasks = list(sandbox.connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sock in sandbox.listeners:
            sock.close()
        if sandbox.unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(sandbox.unix_path)

    # --- one connection ----------------------------------------------------------------

    async def _serve(
        self, sandbox: _Sandbox, conn: socket.socket, endpoint: str, prefix: bytes = b""
    ) -> None:
        """One connection; `prefix`: what a helper read from it before handing it over."""
        ex = _Exchange(
            AuditRecord(new_request_id(), sandbox.id, endpoint),
            counted=sandbox.limits.open_connection(),
            prefix=prefix,
        )
        record = ex.record
        loop = self._loop
        task = asyncio.current_task(loop)
        assert task is not None
        config = self.config
        head_limit = config.head_timeout if ex.counted else REFUSED_HEAD_TIMEOUT
        first = min(head_limit, config.connect_timeout, config.idle_timeout)
        deadlines = ex.deadlines = _Deadlines(loop, task, first)
        deadlines.limit("head", head_limit)
        client = _Stream(loop)
        try:
            if not prefix:
                # What the client has sent already (under load, usually its whole
                # request head): read now, it needs no wait for the transport to read it.
                ex.prefix = _read_ready(conn)
            # The accepted socket becomes a transport (see _Stream); from here on the
            # transport owns its descriptor.
            await loop.connect_accepted_socket(lambda: client, conn)
            await self._handle(sandbox, client, ex)
        except _Refusal as r:
            deadlines.limit(None)  # _refuse keeps its own time
            r.reason, r.hint = self._redact(r.reason), self._redact(r.hint)
            record.decision, record.rule, record.reason = r.decision, r.rule, r.reason
            if not ex.responded:
                record.status = r.status
                if self._link is not None:
                    # The sandbox may ask for its denials as soon as it has the answer.
                    record.duration_ms = round((time.monotonic() - ex.started) * 1000)
                    self._link.denial(list(record.as_dict().values()))
                    ex.denial_sent = True
                await self._refuse(client, r, record)
        except asyncio.CancelledError:
            expired = deadlines.expired()
            if expired is None:
                closed = "closed: the sandbox was removed"
                record.reason = f"{record.reason}; {closed}" if record.reason else closed
                raise
            # Every limit is caught where it applies; this one was not (a bug): the
            # exchange ends, counted as an error.
            log.error("gateway %s: request %s: %s limit", sandbox.id, record.request_id, expired)
            record.decision, record.reason = "error", f"internal error: {expired} limit"
        except OSError as e:
            if record.decision != "allow":
                record.decision = "error"
            record.reason = f"connection error: {e.strerror or e}"
        except Exception:
            log.error(
                "gateway %s: request %s failed\n%s",
                sandbox.id,
                record.request_id,
                self._redact(traceback.format_exc()),
            )
            record.decision, record.reason = "error", "internal error"
            if not ex.responded:
                record.status = 500
                with contextlib.suppress(Exception):
                    await self._refuse(client, _Refusal(500, "error", "", "internal error"), record)
        finally:
            deadlines.cancel()
            if ex.counted:
                sandbox.limits.close_connection()
            if client.transport is None:
                conn.close()
            client.close()
            record.duration_ms = round((time.monotonic() - ex.started) * 1000)
            if record.reason:
                record.reason = self._redact(record.reason)
            if ex.audit:
                self._audit_add(record)
                if self._link is not None:
                    if self._link.wants(record.decision, ex.denial_sent):
                        self._link.record(record.as_dict(), ex.denial_sent)
                elif record.decision != "allow":
                    sandbox.denials.append(record.as_dict())

    async def _handle(self, sandbox: _Sandbox, client: _Stream, ex: _Exchange) -> None:
        record = ex.record
        unix = record.endpoint == "unix"
        # Origin-form is for the gateway itself: the git gateway on both endpoints, the
        # in-sandbox API on the Unix socket only.
        reader = RequestReader(allow_origin_form=True)
        if ex.prefix:
            ex.received += len(ex.prefix)
            reader.feed(ex.prefix)
        req = await self._read_head(client, reader, ex)
        if req is None:
            ex.audit = False  # connected and closed without a byte: nothing was asked
            return
        record.method = req.method
        if req.kind is RequestKind.LOCAL:
            if self._link is not None:
                self._hand_over(sandbox, client, reader, ex)
                return
            if req.path.startswith(GIT_PREFIX):
                record.path = audit_path(req.path)
                self._admit(sandbox, ex)
                try:
                    await self._git.serve(sandbox, self._detach(client, reader), reader, req, ex)
                except GitRefused as g:
                    raise _Refusal(
                        g.status, g.decision, g.rule, g.reason, g.hint, g.headers
                    ) from None
                return
            if not unix or not req.path.startswith(API_PREFIX):
                local = f"{GIT_PREFIX} and {API_PREFIX}" if unix else f"{GIT_PREFIX}..."
                raise _Refusal(
                    400,
                    "deny",
                    "http.malformed",
                    "this is a forward proxy: send absolute-form requests (GET http://host/path) "
                    f"or CONNECT host:port; origin-form is only for {local}",
                )
            ex.audit = False  # the in-sandbox API is not egress
            await self._api(sandbox, client, req, record.request_id)
            return
        record.host, record.port = req.target_host, req.port
        record.path = audit_path(req.path) if req.path else None
        self._admit(sandbox, ex)
        decision, status = _decide(sandbox, req)
        record.rule = decision.rule
        if not decision.allowed:
            raise _Refusal(
                status, "deny", decision.rule, decision.reason, _how_to_allow(req, decision)
            )
        upload = sandbox.limits.upload
        if req.content_length is not None and req.content_length > upload.remaining:
            raise _Refusal(429, "deny", "egress.upload_budget", _budget_reason(upload.limit))
        early: list[http.Event] = []
        if not req.is_connect:
            if decision.max_body is not None:
                reader.limit_body(decision.max_body)
            # Body bytes that came with the head are checked before anything is dialed,
            # so a malformed or oversized body in the first packet reaches nothing.
            early = _buffered_body_events(reader, decision)
        if req.is_connect:
            sock, addr = await self._connect(sandbox, req.target_host, req.port)
            record.decision, record.reason = "allow", decision.reason
            record.addr = str(addr)
            try:
                await self._tunnel(sandbox, self._detach(client, reader), sock, reader, ex)
            finally:
                sock.close()
            return
        addrs = await self._resolve(sandbox, req.target_host, req.port)
        upstream, addr = await self._dial_stream(addrs, req.target_host, req.port, ex)
        record.decision, record.reason = "allow", decision.reason
        record.addr = str(addr)
        try:
            await self._forward(sandbox, client, upstream, reader, req, decision, early, ex)
        finally:
            upstream.close()

    def _hand_over(
        self, sandbox: _Sandbox, client: _Stream, reader: RequestReader, ex: _Exchange
    ) -> None:
        """In a helper: a git or API request goes to the first process (which holds
        the credentials and the sandbox's denials), with every byte read so far. The
        connection slot is given back first: the first process takes its own."""
        assert self._link is not None
        sock = client.detach()
        raw = reader.received() + client.take()
        ex.audit = False  # the first process audits it
        if ex.counted:
            ex.counted = False
            sandbox.limits.close_connection()
        self._link.handoff(sandbox.id, ex.record.endpoint, raw, sock.fileno())

    @staticmethod
    def _detach(client: _Stream, reader: RequestReader) -> socket.socket:
        """The client connection as a socket, for code that works on sockets (the
        tunnel's splice, the git gateway); what arrived after the head goes to `reader`."""
        sock = client.detach()
        rest = client.take()
        if rest:
            reader.feed(rest)
        return sock

    def _admit(self, sandbox: _Sandbox, ex: _Exchange) -> None:
        """The sandbox's request rate and connection cap (429)."""
        egress = sandbox.policy.egress
        if not sandbox.limits.try_acquire_request():
            raise _Refusal(
                429,
                "deny",
                "egress.rate",
                f"more than {egress.rate:g} requests a second (burst {egress.burst})",
            )
        if not ex.counted:
            raise _Refusal(
                429,
                "deny",
                "egress.max_connections",
                f"{egress.max_connections} connections are already open (egress.max_connections)",
            )

    async def _read_head(
        self, client: _Stream, reader: RequestReader, ex: _Exchange
    ) -> ProxyRequest | None:
        """The request head, within the "head" limit set by _serve; None if the client
        closed without sending a byte."""
        recv = client.recv
        try:
            while True:
                event = reader.next_event()
                if isinstance(event, ProxyRequest):
                    ex.deadlines.limit(None)
                    return event
                data = await recv()
                if not data and not ex.received:
                    return None
                ex.received += len(data)
                reader.feed(data)
        except BadRequest as e:
            raise _Refusal(e.status, "deny", "http.malformed", e.reason) from None
        except asyncio.CancelledError:
            if ex.deadlines.expired() != "head":
                raise
            limit = self.config.head_timeout if ex.counted else REFUSED_HEAD_TIMEOUT
            raise _Refusal(
                408, "deny", "http.head_timeout", f"no complete request head within {limit:g}s"
            ) from None

    async def _connect(
        self, sandbox: _Sandbox, host: str, port: int
    ) -> tuple[socket.socket, IPAddress]:
        """Resolve `host`, check its addresses against the sandbox's allow_cidrs and the
        gateway's own, and dial one of exactly those (refusals: 403, 502, 504)."""
        addrs = await self._resolve(sandbox, host, port)
        return await self._dial(addrs, host, port)

    async def _resolve(self, sandbox: _Sandbox, host: str, port: int) -> list[IPAddress]:
        """gateway.addr.resolve_and_check in steps, so that only a lookup that does I/O
        leaves the event loop (a thread hop costs more than the rest of the request)."""
        try:
            literal = literal_target(host, port)
            if literal is not None:
                answers = [literal]
            elif self._link is not None:
                answers = await self._ask_primary(sandbox, host, port)
            else:
                answers = await self._answers(host, port)
            # The verdict on these answers, if they were checked against the same own
            # networks and allow_cidrs before (objects replaced, never changed, when
            # those change): an allow is reused, a refusal is never kept.
            selfs, allow = self._self_networks, sandbox.policy.egress.allow_cidrs
            answers_t = answers if type(answers) is tuple else tuple(answers)
            known = sandbox.verdicts.get((host, port))
            if (
                known is not None
                and known[1] is selfs
                and known[2] is allow
                and (known[0] is answers_t or known[0] == answers_t)
            ):
                return known[3]
            result = check_answers(host, answers_t, self_addrs=selfs, allow_cidrs=allow)
            if len(sandbox.verdicts) >= VERDICTS_KEPT:
                sandbox.verdicts.clear()
            sandbox.verdicts[host, port] = (answers_t, selfs, allow, result)
            return result
        except AddressRefused as e:
            klass = e.klass.value if e.klass is not None else "invalid"
            raise _Refusal(
                403,
                "deny",
                f"address.{klass}",
                e.reason,
                "The gateway refuses this address whatever the host rules say; a private "
                "range can be opened with egress.allow_cidrs, loopback, link-local and "
                "metadata addresses never.",
            ) from None

    async def _answers(
        self, host: str, port: int, context: contextvars.Context | None = None
    ) -> Sequence[IPAddress]:
        """The resolver's answers for a name, unchecked: without I/O when it can answer
        (a pin, asked in `context` when given: a helper's lookup is answered in the
        sandbox's) or answered within resolve_cache_ttl, else a lookup (_lookup)."""
        resolver = self.config.resolver
        if context is None:
            answers = local_answer(resolver, host, port)
        else:
            answers = context.run(local_answer, resolver, host, port)
        if answers is None:
            answers = self._resolved.get((host, port))
        if answers is None:
            answers = await self._lookup(host, port)
        return answers

    async def _ask_primary(self, sandbox: _Sandbox, host: str, port: int) -> list[IPAddress]:
        """In a helper: the first process's answers (its resolver, pins and cache), kept
        here for resolve_cache_ttl like a lookup's."""
        assert self._link is not None
        key = (sandbox.id, host, port)
        answers = self._resolved.get(key)
        if answers is not None:
            return answers
        try:
            reply = await self._link.resolve(sandbox.id, host, port, self.config.connect_timeout)
        except TimeoutError:
            raise _Refusal(504, "error", "resolve", f"resolving {host} took too long") from None
        if "refusal" in reply:
            status, decision, rule, reason = reply["refusal"]
            raise _Refusal(status, decision, rule, reason)
        answers = [ip_address(a) for a in reply["answers"]]
        if answers:
            self._resolved.put(key, answers)
        return answers

    async def _lookup(self, host: str, port: int) -> list[IPAddress]:
        """The resolver's blocking answer, from the thread pool (502, 504)."""
        loop = self._loop
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                answers = await loop.run_in_executor(
                    self._resolver_pool, self.config.resolver, host, port
                )
        except TimeoutError:
            raise _Refusal(504, "error", "resolve", f"resolving {host} took too long") from None
        except OSError as e:
            raise _Refusal(
                502, "error", "resolve", f"cannot resolve {host}: {e.strerror or e}"
            ) from None
        if answers:  # an empty answer is refused; let the next request ask again
            self._resolved.put((host, port), answers)
        return answers

    def _own_networks(
        self, addrs: frozenset[IPAddress | IPNetwork | str] | None = None
    ) -> tuple[IPNetwork, ...]:
        """`addrs` (by default the configured own addresses) and every sandbox's TCP
        listener address, as networks."""
        if addrs is None:
            addrs = self.config.self_addrs
        base = as_networks(addrs)
        # A listener inside a configured network (the daemon's pool holds every host
        # end) adds nothing: leaving it out keeps both this rebuild, on every add and
        # remove, and each request's classification from growing with the sandboxes.
        extra = set()
        for sandbox in self._sandboxes.values():
            if sandbox.tcp_addr:
                ip = ip_address(sandbox.tcp_addr)
                if not any(ip.version == net.version and ip in net for net in base):
                    extra.add(ip)
        return (*base, *as_networks(extra))

    async def _dial(
        self, addrs: list[IPAddress], host: str, port: int
    ) -> tuple[socket.socket, IPAddress]:
        """Connect to the first of the checked addresses that answers."""
        loop = self._loop
        timed_out, last_error = False, None
        for addr in addrs:
            family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.setblocking(False)
            try:
                async with asyncio.timeout(self.config.connect_timeout):
                    await _sock_connect(loop, sock, addr, port)
            except TimeoutError:
                sock.close()
                timed_out = True
                continue
            except OSError as e:
                sock.close()
                last_error = e
                continue
            except BaseException:
                sock.close()
                raise
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock, addr
        raise self._dial_failed(addrs, host, port, timed_out, last_error)

    async def _dial_stream(
        self, addrs: list[IPAddress], host: str, port: int, ex: _Exchange
    ) -> tuple[_Stream, IPAddress]:
        """_dial for a plain-HTTP request: the connection as a _Stream (the loop's own
        connect; a numeric address is never looked up), each attempt within the
        exchange's "connect" limit."""
        loop = self._loop
        deadlines = ex.deadlines
        timed_out, last_error = False, None
        for addr in addrs:
            family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
            deadlines.limit("connect", self.config.connect_timeout)
            try:
                _, stream = await loop.create_connection(
                    functools.partial(_Stream, loop), str(addr), port, family=family
                )
            except asyncio.CancelledError:
                if deadlines.expired() != "connect":
                    raise
                timed_out = True
                continue
            except OSError as e:
                last_error = e
                continue
            finally:
                deadlines.limit(None)
            return stream, addr
        raise self._dial_failed(addrs, host, port, timed_out, last_error)

    def _dial_failed(
        self,
        addrs: list[IPAddress],
        host: str,
        port: int,
        timed_out: bool,
        last_error: OSError | None,
    ) -> _Refusal:
        where = f"{host}:{port} ({', '.join(map(str, addrs))})"
        if last_error is None and timed_out:
            return _Refusal(
                504,
                "error",
                "connect",
                f"connecting to {where} timed out after {self.config.connect_timeout:g}s",
            )
        why = last_error.strerror if last_error and last_error.strerror else str(last_error)
        return _Refusal(502, "error", "connect", f"cannot connect to {where}: {why}")

    # --- relaying ----------------------------------------------------------------------

    async def _tunnel(
        self,
        sandbox: _Sandbox,
        client: socket.socket,
        upstream: socket.socket,
        reader: RequestReader,
        ex: _Exchange,
    ) -> None:
        loop = self._loop
        await loop.sock_sendall(client, http.CONNECT_ESTABLISHED)
        ex.responded, ex.record.status = True, 200
        early = reader.trailing_data()  # a client may send its TLS hello without waiting
        if early:
            self._charge(sandbox, len(early), ex)
            await loop.sock_sendall(upstream, early)
            ex.record.bytes_up += len(early)

        def up(n: int) -> None:
            self._charge(sandbox, n, ex)
            ex.record.bytes_up += n

        def down(n: int) -> None:
            ex.touch()
            ex.record.bytes_down += n

        await self._relay(
            ex, self._pump(client, upstream, up), self._pump(upstream, client, down), both=True
        )

    async def _forward(
        self,
        sandbox: _Sandbox,
        client: _Stream,
        upstream: _Stream,
        reader: RequestReader,
        req: ProxyRequest,
        decision: Decision,
        early: list[http.Event],
        ex: _Exchange,
    ) -> None:
        await self._send_up(sandbox, upstream, http.serialize_request_head(req), ex)
        # Without a body (most requests) the upload pump would have nothing to do:
        # only the response is relayed, without a second task.
        bodiless = not req.chunked and len(early) == 1 and early[0] is http.END_OF_BODY
        await self._relay(
            ex,
            None
            if bodiless
            else self._send_body(sandbox, client, upstream, reader, req, decision, early, ex),
            self._respond(upstream, client, ex),
            both=False,
        )

    async def _respond(self, upstream: _Stream, client: _Stream, ex: _Exchange) -> None:
        """Relay the response as it arrives, until the upstream's end and every byte
        has been sent to the client (which the caller then closes: no half-close first,
        closing sends the same FIN). The status for the audit record is taken from the
        first bytes."""
        record = ex.record

        def down(data: bytes) -> None:
            ex.touch()
            ex.responded = True
            record.bytes_down += len(data)
            if len(ex.status_sniff) < 8192:
                ex.status_sniff += data[:8192]
                record.status = _response_status(bytes(ex.status_sniff))

        try:
            await upstream.pipe(client, down)
        finally:
            upstream.unpipe()
        await client.drain()  # the caller closes it now: the end of the response

    async def _send_body(
        self,
        sandbox: _Sandbox,
        client: _Stream,
        upstream: _Stream,
        reader: RequestReader,
        req: ProxyRequest,
        decision: Decision,
        early: list[http.Event],
        ex: _Exchange,
    ) -> None:
        """Strictly decoded body, re-framed chunk by chunk; on any error the upstream
        is closed by the caller and never sees the end of the request."""
        while True:
            event = early.pop(0) if early else _body_event(reader, decision)
            if event is http.NEED_DATA:
                data = await client.recv()
                ex.touch()
                reader.feed(data)
            elif event is http.END_OF_BODY:
                if req.chunked:
                    await self._send_up(sandbox, upstream, http.end_chunked(), ex)
                return
            elif isinstance(event, bytes):
                out = http.encode_chunk(event) if req.chunked else event
                await self._send_up(sandbox, upstream, out, ex)

    async def _send_up(
        self, sandbox: _Sandbox, upstream: _Stream, data: bytes, ex: _Exchange
    ) -> None:
        self._charge(sandbox, len(data), ex)
        await upstream.sendall(data)
        ex.record.bytes_up += len(data)

    def _charge(self, sandbox: _Sandbox, n: int, ex: _Exchange) -> None:
        ex.touch()
        if not sandbox.limits.charge_upload(n):
            budget = sandbox.limits.upload.limit
            raise _Refusal(429, "deny", "egress.upload_budget", _budget_reason(budget))

    async def _relay(
        self,
        ex: _Exchange,
        up: Coroutine[Any, Any, None] | None,
        down: Coroutine[Any, Any, None],
        *,
        both: bool,
    ) -> None:
        """Run both pumps until `down` is done (and `up` too when `both`), an error, the
        idle timeout or the total timeout; cancel whatever is left. Without `up`, `down`
        runs in this task."""
        loop = self._loop
        pumps = [] if up is None else [loop.create_task(up), loop.create_task(down)]
        deadlines = ex.deadlines
        deadlines.relay(ex, self.config.idle_timeout, self.config.tunnel_total_timeout)
        try:
            if up is None:
                await down
            else:
                await _wait_pumps(*pumps, both=both)
        except asyncio.CancelledError:
            expired = deadlines.expired()
            if expired is None:
                raise
            if expired == "idle":
                ex.record.reason = (
                    f"{ex.record.reason}; closed after {self.config.idle_timeout:g}s idle"
                )
            else:
                ex.record.reason = (
                    f"{ex.record.reason}; closed at the {self.config.tunnel_total_timeout:g}s limit"
                )
        finally:
            deadlines.limit(None)  # first: nothing may time out while the pumps wind down
            for task in pumps:
                task.cancel()
            if pumps:
                await asyncio.gather(*pumps, return_exceptions=True)

    async def _pump(
        self, src: socket.socket, dst: socket.socket, moved: Callable[[int], None]
    ) -> None:
        if self.config.splice:
            await _splice(src, dst, moved, fallback=functools.partial(self._copy, src, dst, moved))
        else:
            await self._copy(src, dst, moved)

    async def _copy(
        self, src: socket.socket, dst: socket.socket, moved: Callable[[int], None]
    ) -> None:
        """recv/send until EOF, then half-close `dst`."""
        loop = self._loop
        recv = _Receiver(src)
        while True:
            data = await recv()
            if not data:
                break
            moved(len(data))
            await loop.sock_sendall(dst, data)
        _shutdown_write(dst)

    # --- the proxy's own answers -------------------------------------------------------

    async def _refuse(self, client: _Stream, r: _Refusal, record: AuditRecord) -> None:
        """Send the refusal, then close gracefully: stop writing, and read (and drop)
        what the client is still sending for a moment, so that closing with unread
        data does not reset the connection before the client has read the answer."""
        body = _refusal_text(r, record)
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(LINGER_TIMEOUT):
                await client.sendall(
                    http.response(r.status, body, record.request_id, extra_headers=r.headers),
                )
            client.write_eof()
            drained = 0
            async with asyncio.timeout(LINGER_TIMEOUT):
                while drained < LINGER_BYTES:
                    data = await client.recv()
                    if not data:
                        break
                    drained += len(data)

    async def _api(
        self, sandbox: _Sandbox, client: _Stream, req: ProxyRequest, request_id: str
    ) -> None:
        """The in-sandbox API (Unix listener only): what am I allowed, why was I denied."""
        path = req.path.split("?", 1)[0]
        if req.method != "GET":
            status, body = 405, {"error": "the gateway API takes GET only"}
        elif path == API_POLICY:
            status, body = 200, _policy_summary(sandbox.policy)
        elif path == API_DENIALS:
            if self._pool is not None:
                self._pool.drain()  # the helpers' refusals sent before their answers
            status, body = 200, {"denials": list(sandbox.denials)}
        else:
            status, body = 404, {"error": f"no such endpoint; try {API_POLICY} or {API_DENIALS}"}
        payload = json.dumps(body, indent=2) + "\n"
        await client.sendall(
            http.response(status, payload, request_id, content_type="application/json")
        )


# --- pure helpers --------------------------------------------------------------------


def _decide(sandbox: _Sandbox, req: ProxyRequest) -> tuple[Decision, int]:
    """The policy's decision and the status it means: a request denied only for its
    declared body size is 413, not 403.

    policy.decide on (method, host, port) alone is kept per sandbox and policy (a
    policy is never changed, only replaced): a declared body can only add a refusal
    (its size is checked last, against the limit of the rule that allows the request
    without one), so the bodiless decision stands unless the body is over that limit,
    and only then is decide asked again with the body."""
    egress = sandbox.policy.egress
    if sandbox.decisions_for is not egress:
        sandbox.decisions, sandbox.decisions_for = {}, egress
    key = (req.method, req.target_host, req.port)
    bodiless = sandbox.decisions.get(key)
    if bodiless is None:
        bodiless = decide(egress, Request(req.method, req.target_host, req.port))
        if len(sandbox.decisions) >= DECISIONS_KEPT:
            sandbox.decisions.clear()
        sandbox.decisions[key] = bodiless
    if not bodiless.allowed:
        return bodiless, 403
    body = req.content_length if not req.is_connect else None
    if body is None or bodiless.max_body is None or body <= bodiless.max_body:
        return bodiless, 200
    decision = decide(egress, Request(req.method, req.target_host, req.port, body))
    return decision, 200 if decision.allowed else 413


def _budget_reason(budget: int) -> str:
    return (
        f"this would exceed the sandbox's upload budget of {budget} bytes "
        "(egress.upload_budget); nothing more is sent upstream"
    )


def _body_event(reader: RequestReader, decision: Decision) -> http.Event:
    try:
        return reader.next_event()
    except BadRequest as e:
        rule = decision.rule if e.status == 413 else "http.malformed"
        raise _Refusal(e.status, "deny", rule, e.reason) from None


def _buffered_body_events(reader: RequestReader, decision: Decision) -> list[http.Event]:
    """The body events the bytes received so far yield (none of them waits)."""
    events: list[http.Event] = []
    while (event := _body_event(reader, decision)) is not http.NEED_DATA:
        events.append(event)
        if event is http.END_OF_BODY:
            break
    return events


def _how_to_allow(req: ProxyRequest, decision: Decision) -> str:
    if decision.rule.startswith("egress.deny"):
        return f"{decision.rule} in the sandbox's policy denies this host."
    if decision.rule != DEFAULT_DENY or _is_ip_literal(req.target_host):
        return ""
    methods = (
        "" if req.is_connect or req.method in ("GET", "HEAD") else f'\n  methods = ["{req.method}"]'
    )
    return (
        "To allow it, add to the sandbox's policy:\n"
        f'  [[egress.allow]]\n  host = "{req.target_host}"\n  ports = [{req.port}]{methods}\n'
        f"or run with --allow {req.target_host}:{req.port}"
    )


def _is_ip_literal(host: str) -> bool:
    try:
        return parse_ip_literal(host) is not None
    except ValueError:
        return True


def _refusal_text(r: _Refusal, record: AuditRecord) -> str:
    what = f"{record.method} {record.host}:{record.port}" if record.host else "the request"
    if record.repo:
        what = f"git {record.service or 'request'} for {record.repo}"
    elif record.path and record.path.startswith(GIT_PREFIX):
        what = f"git request {record.method} {record.path}"
    lines = [f"sandgate: {what} refused: {r.reason}"]
    if r.rule:
        lines.append(f"rule: {r.rule}")
    if r.hint:
        lines.append(r.hint)
    lines.append(
        "What this sandbox may reach: curl --unix-socket "
        f"{GATEWAY_SOCKET_IN_SANDBOX} http://sandgate{API_POLICY}"
    )
    lines.append(f"request id: {record.request_id}")
    return "\n".join(lines) + "\n"


def _response_status(prefix: bytes) -> int | None:
    """The final status code at the start of a response (after any 1xx heads)."""
    pos = 0
    while True:
        m = _RESPONSE_STATUS.match(prefix, pos)
        if m is None:
            return None
        status = int(m.group(1))
        if status >= 200:
            return status
        end = prefix.find(b"\r\n\r\n", m.end())
        if end < 0:
            return status
        pos = end + 4


class _Receiver:
    """loop.sock_recv(sock, RECV_SIZE), trying the socket first when that is fair.

    uvloop's sock_recv never tries: it registers the socket with its poller and waits
    for the next loop iteration even when the bytes (or the end of the stream) are
    already there, several epoll_ctl calls and a wake-up per read. A try is made only
    after a read that waited, so a stream that is always ready still yields to the
    loop (and to the other connections) every other read."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._eager = True

    async def __call__(self) -> bytes:
        if self._eager:
            try:
                data = self._sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                pass
            else:
                self._eager = False
                return data
        self._eager = True
        return await self._loop.sock_recv(self._sock, RECV_SIZE)


class _Stream(asyncio.Protocol):
    """One connection held by an event-loop transport, for a coroutine: `recv()` and
    `sendall()` behave as loop.sock_recv and loop.sock_sendall would on its socket
    (sendall returns once the kernel has every byte), and `pipe()` relays what arrives
    straight to another stream from the transport's callbacks.

    Why a transport: uvloop's sock_* calls make a poll handle for every wait and close
    it after (four epoll_ctl calls and a loop iteration per wait), while a transport's
    socket is registered with epoll once for the connection's life, and libuv accepts,
    connects, reads and writes in C. A small request costs a dozen such waits.

    Reading is flow-controlled: at most MAX_BUFFERED bytes wait to be taken before the
    transport stops reading, so a client that sends what the gateway does not ask for
    (bytes after its request) fills its own TCP window, not the gateway's memory.
    Writing: the write-buffer limits are 0, so the transport asks its writer to pause
    as soon as anything is left unsent, and to resume when all is sent.

    `detach()` hands the connection over to code that needs a socket (CONNECT's
    splice, the git gateway): a duplicate of the descriptor, after which recv and
    sendall use it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._read_paused = False
        self._eof = False
        self._lost = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None  # recv() waiting for bytes
        self._write_paused = False
        self._writable: asyncio.Future[None] | None = None  # sendall() waiting to drain
        self._on_data: Callable[[bytes], None] | None = None  # pipe(): this is the source
        self._piped: asyncio.Future[None] | None = None
        self._pipe_dst: _Stream | None = None
        self._pipe_src: _Stream | None = None  # pipe(): this is the destination
        self._sock: socket.socket | None = None  # after detach()

    # --- the protocol's side ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are no subclass
        transport.set_write_buffer_limits(0, 0)

    def data_received(self, data: bytes) -> None:
        if self._on_data is not None:
            self._relay_chunk(data)
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered >= MAX_BUFFERED and not self._read_paused:
            self._pause_reading()
        self._wake_reader()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake_reader()
        self._end_pipe(None)
        return True  # keep the transport open: the answer may still be on its way

    def connection_lost(self, exc: Exception | None) -> None:
        if self._sock is not None:
            return  # detached: the transport closed its descriptor, not the connection
        self._lost, self._eof = True, True
        self._error = exc
        self._wake_reader()
        self._end_pipe(exc)
        error = exc or BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))
        if self._writable is not None and not self._writable.done():
            self._writable.set_exception(error)
        if self._pipe_src is not None:
            self._pipe_src._end_pipe(error)

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._pipe_src is not None:
            self._pipe_src._pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        if self._pipe_src is not None:
            self._pipe_src._resume_reading()

    # --- the coroutine's side --------------------------------------------------------

    async def recv(self) -> bytes:
        """What has arrived (at most MAX_BUFFERED bytes, or RECV_SIZE once detached),
        waiting for something if nothing has; b"" at the end of the stream."""
        if self._sock is not None:
            return await self._loop.sock_recv(self._sock, RECV_SIZE)
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            self._resume_reading()
            waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        return self.take()

    def take(self) -> bytes:
        """The bytes received and not taken yet, without waiting."""
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        self._resume_reading()
        return data

    async def sendall(self, data: bytes) -> None:
        if self._sock is not None:
            await self._loop.sock_sendall(self._sock, data)
            return
        self._check_writable()
        assert self.transport is not None
        self.transport.write(data)
        await self.drain()

    async def drain(self) -> None:
        """Until every byte written has been handed to the kernel."""
        while self._write_paused and self._sock is None:
            self._check_writable()
            writable = self._writable = self._loop.create_future()
            try:
                await writable
            finally:
                self._writable = None

    def write_eof(self) -> None:
        """Half-close: no more bytes will be sent (after the buffered ones)."""
        if self._sock is not None:
            _shutdown_write(self._sock)
        elif self.transport is not None and not self._lost:
            with contextlib.suppress(OSError, RuntimeError):
                self.transport.write_eof()

    def close(self) -> None:
        """Close now; bytes still unsent are dropped (sendall and drain wait for them)."""
        if self._sock is not None:
            self._sock.close()
        elif self.transport is not None and not self._lost:
            if self.transport.get_write_buffer_size():
                self.transport.abort()
            else:
                self.transport.close()

    def detach(self) -> socket.socket:
        """The connection as a non-blocking socket of its own (a duplicate descriptor;
        the transport is closed). Bytes already received stay to be taken with take()."""
        if self._sock is not None:
            return self._sock
        self._check_writable()
        transport = self.transport
        assert transport is not None
        transport.pause_reading()
        fd = os.dup(transport.get_extra_info("socket").fileno())
        try:
            sock = socket.socket(fileno=fd)
        except BaseException:
            os.close(fd)
            raise
        sock.setblocking(False)
        self._sock = sock
        transport.abort()
        return sock

    def pipe(self, dst: _Stream, on_data: Callable[[bytes], None]) -> asyncio.Future[None]:
        """From now on, write every chunk received to `dst` as it arrives, after
        `on_data(chunk)` (which may raise to stop). Reading pauses while `dst` has
        bytes unsent. The future is done at the end of this stream, or fails with the
        first error (of either connection, or of on_data). `unpipe()` when done."""
        done = self._piped = self._loop.create_future()
        self._on_data, self._pipe_dst, dst._pipe_src = on_data, dst, self
        if self._chunks:
            self._relay_chunk(self.take())
        if dst._lost:
            self._end_pipe(dst._error or BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE)))
        elif self._eof:
            self._end_pipe(self._error)
        elif dst._write_paused:
            self._pause_reading()
        else:
            self._resume_reading()
        return done

    def unpipe(self) -> None:
        if self._pipe_dst is not None:
            self._pipe_dst._pipe_src = None
        self._on_data = self._piped = self._pipe_dst = None

    # --- internals ---------------------------------------------------------------------

    def _relay_chunk(self, data: bytes) -> None:
        dst = self._pipe_dst
        assert self._on_data is not None and dst is not None
        try:
            self._on_data(data)
            dst._check_writable()
        except Exception as e:
            self._end_pipe(e)
            return
        assert dst.transport is not None
        dst.transport.write(data)
        if dst._write_paused:
            self._pause_reading()

    def _end_pipe(self, exc: BaseException | None) -> None:
        done = self._piped
        if done is None or done.done():
            return
        self._on_data = None  # what still arrives is held (and bounded), not relayed
        if exc is None:
            done.set_result(None)
        else:
            done.set_exception(exc)

    def _check_writable(self) -> None:
        if self._lost:
            raise self._error or BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))

    def _wake_reader(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _pause_reading(self) -> None:
        if not self._read_paused and not self._lost and self._sock is None:
            self._read_paused = True
            assert self.transport is not None
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._read_paused and not self._lost and self._sock is None:
            self._read_paused = False
            assert self.transport is not None
            self.transport.resume_reading()


async def _wait_pumps(up: asyncio.Task[None], down: asyncio.Task[None], *, both: bool) -> None:
    """Until `down` is done (and `up` too when `both`), or one fails (its error is
    raised); the caller cancels whatever is left."""
    waiting = {up, down} if both else {down}
    running = {up, down}
    while waiting:
        done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()  # re-raises a pump's error
        waiting -= done


class _Deadlines:
    """The time limits of one exchange as a single loop timer that cancels the
    exchange's task when the limit in force has passed. One limit is in force at a time:
    the head's (head_timeout), each connection attempt's (connect_timeout), the relay's
    idle and total timeouts, or none. Per request, asyncio.timeout for each phase and a
    timer for the relay cost more than relaying a small response.

    Setting a limit costs no timer of its own: the timer is armed once, no later than
    any limit can end (`first`), and when it fires it looks at the limit then in force
    (the relay's idle limit reads `ex.last_activity` only then, so moving bytes costs
    nothing extra) and re-arms itself for its end. Only a limit that ends before the
    armed time re-arms it at once.

    After a CancelledError, `expired()` says which limit it was ("head", "connect",
    "idle", "total"), or None when it was not this timer's doing (as asyncio.timeout
    does: only when no other cancellation is pending)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any], first: float):
        self._loop = loop
        self._task = task
        self._cancelling = task.cancelling()
        self._what: str | None = None
        self._end = 0.0
        self._relay: tuple[_Exchange, float] | None = None  # (ex, idle timeout)
        self._fired: str | None = None
        self._armed = time.monotonic() + first
        self._timer: asyncio.TimerHandle | None = loop.call_later(first, self._check)

    def limit(self, what: str | None, seconds: float = 0.0) -> None:
        """From now on, `what` may take `seconds` (None: no limit)."""
        self._relay = None
        self._what = what
        if what is not None:
            self._end = time.monotonic() + seconds
            self._arm(self._end)

    def relay(self, ex: _Exchange, idle: float, total: float) -> None:
        """From now on, the relay's idle and total timeouts."""
        self.limit("total", total)
        self._relay = (ex, idle)
        self._arm(ex.last_activity + idle)

    def _arm(self, when: float) -> None:
        if self._timer is None or when < self._armed:
            if self._timer is not None:
                self._timer.cancel()
            self._armed = when
            self._timer = self._loop.call_later(max(when - time.monotonic(), 0), self._check)

    def _check(self) -> None:
        self._timer = None
        if self._what is None:
            return  # armed again by the next limit
        now = time.monotonic()
        left = self._end - now
        if left <= 0:
            fired = self._what
        elif self._relay is not None and self._relay[0].last_activity + self._relay[1] <= now:
            fired = "idle"
        else:
            if self._relay is not None:
                left = min(left, self._relay[0].last_activity + self._relay[1] - now)
            self._arm(now + left)
            return
        self._what, self._relay, self._fired = None, None, fired
        self._task.cancel()

    def expired(self) -> str | None:
        """The limit that cancelled the task, else None (see the class)."""
        fired, self._fired = self._fired, None
        if fired is None or self._task.uncancel() > self._cancelling:
            return None
        return fired

    def cancel(self) -> None:
        """Stop the timer; withdraw its cancellation if the exchange ended otherwise."""
        self._what = self._relay = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._fired is not None:
            self._fired = None
            self._task.uncancel()


def _read_ready(sock: socket.socket) -> bytes:
    """What has arrived on a new connection, without waiting (b"" for nothing yet, and
    for an end or an error, which the transport then finds by itself). MSG_DONTWAIT
    rather than setblocking(False): one ioctl less a connection (the transport makes
    the socket non-blocking anyway)."""
    try:
        return sock.recv(RECV_SIZE, socket.MSG_DONTWAIT)
    except OSError:  # BlockingIOError (nothing yet) included
        return b""


def _shutdown_write(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)


async def _splice(
    src: socket.socket,
    dst: socket.socket,
    moved: Callable[[int], None],
    fallback: Callable[[], Coroutine[Any, Any, None]],
) -> None:
    """Move bytes src -> pipe -> dst with splice(2) until EOF, then half-close dst.
    At most one pipe's worth is in flight: nothing more is read until it is written."""
    loop = asyncio.get_running_loop()
    rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        try:
            size = fcntl.fcntl(wfd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            size = fcntl.fcntl(wfd, fcntl.F_GETPIPE_SZ)
        flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
        src_fd, dst_fd = src.fileno(), dst.fileno()
        pending, first = 0, True
        while True:
            if pending == 0:
                try:
                    n = os.splice(src_fd, wfd, size, flags=flags)
                except BlockingIOError:
                    await _ready(loop, src_fd, write=False)
                    continue
                except OSError as e:
                    if first and e.errno == errno.EINVAL:  # this socket type cannot splice
                        await fallback()
                        return
                    raise
                if n == 0:
                    break
                first = False
                moved(n)  # may raise (upload budget): those bytes are then never sent
                pending = n
            try:
                pending -= os.splice(rfd, dst_fd, pending, flags=flags)
            except BlockingIOError:
                await _ready(loop, dst_fd, write=True)
        _shutdown_write(dst)
    finally:
        os.close(rfd)
        os.close(wfd)


async def _sock_connect(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, addr: IPAddress, port: int
) -> None:
    """loop.sock_connect for an address the gateway has checked, minus the lookup:
    uvloop passes even a numeric address through getaddrinfo in its thread pool, a
    thread hop per connection. Errors read as loop.sock_connect's (asyncio's and
    uvloop's alike), since they end up in refusals and the audit log."""
    address = (str(addr), port) if addr.version == 4 else (str(addr), port, 0, 0)
    err = sock.connect_ex(address)
    if err in (errno.EINPROGRESS, errno.EINTR):  # EINTR: it goes on in the background
        await _ready(loop, sock.fileno(), write=True)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, f"Connect call failed {address}")
    elif err:
        raise OSError(err, os.strerror(err))


async def _ready(loop: asyncio.AbstractEventLoop, fd: int, *, write: bool) -> None:
    """Wait until `fd` is readable (or writable)."""
    done = loop.create_future()

    def wake() -> None:
        if not done.done():
            done.set_result(None)

    if write:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await done
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


@functools.lru_cache(maxsize=64)
def _family(addr: str | None) -> int:
    return socket.AF_INET6 if addr is not None and ":" in addr else socket.AF_INET


class _Accepted(socket.socket):
    """An accepted connection whose `family` and `type` are plain class attributes:
    socket.socket's are properties that convert to an enum on every read, and the
    loop reads them three times a connection (connect_accepted_socket)."""

    __slots__ = ()
    family = socket.AF_INET  # type: ignore[assignment]
    type = socket.SOCK_STREAM  # type: ignore[assignment]

    @staticmethod
    def of(family: int) -> type[socket.socket]:
        return _ACCEPTED[family]


class _Accepted6(_Accepted):
    __slots__ = ()
    family = socket.AF_INET6  # type: ignore[assignment]


class _AcceptedUnix(_Accepted):
    __slots__ = ()
    family = socket.AF_UNIX  # type: ignore[assignment]


_ACCEPTED: dict[int, type[socket.socket]] = {
    socket.AF_INET: _Accepted,
    socket.AF_INET6: _Accepted6,
    socket.AF_UNIX: _AcceptedUnix,
}


def _tcp_listener(addr: str, port: int) -> socket.socket:
    family = socket.AF_INET if ip_address(addr).version == 4 else socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr, port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def audit_path(path: str) -> str:
    """The request path as the audit log keeps it: query values are replaced by "***",
    since tokens travel there (?access_token=...); names stay, to show what was asked."""
    base, sep, query = path.partition("?")
    if not sep:
        return path
    parts = []
    for item in query.split("&"):
        name, eq, _value = item.partition("=")
        parts.append(f"{name}=***" if eq else name)
    return f"{base}?{'&'.join(parts)}"


def _unix_listener(path: str) -> socket.socket:
    """A listening Unix socket at `path`, mode 0666: who can reach it is decided by
    where it is visible (bind-mounted into one sandbox), not by its mode."""
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise FileExistsError(f"{path} exists and is not a socket; not replacing it")
        os.unlink(path)  # a stale socket from an earlier run
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        os.chmod(path, 0o666)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return sock
