"""`sandgate serve`: one process, one uvloop loop, serving the control API and every
sandbox's gateway endpoints.

Owns the daemon's life: start (fork server first, then reconcile the kernel against
the records and restore the gateway endpoints of the sandboxes that still run), the
control socket (SO_PEERCRED checked before a byte is read; runner/control.py is the
protocol), the sandboxes it serves (create, exec, run, destroy, expiry), the drift
watch over the firewall, reload, metrics, and systemd's notify protocol.

Blocking work (netlink, libnftables, cgroup writes, fsync) runs on a small thread
pool, so the loop keeps serving gateways while sandboxes come and go; the forking
is the fork server's (runner/forkserver.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import errno
import grp
import json
import logging
import os
import pwd
import signal
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.addr import system_resolver
from gateway.policy import DEFAULT_POLICY, Policy, PolicyError, parse_policy
from gateway.proxy import Gateway, GatewayConfig
from netns.namespace import addresses_in_use
from nft import apply as nft_apply
from nft import backstop

from . import control, sdnotify
from .cgroups import Cgroup
from .control import ProtocolError
from .daemon_config import DaemonConfig, effective_credentials_dir
from .forkserver import ForkServer, ForkServerError
from .gateway_thread import own_networks, pinned_resolver, socket_path
from .identity import NOBODY, SANDBOX_USER
from .init import listen_owner_only
from .metrics import CONTENT_TYPE, DaemonMetrics
from .process import LaunchError, StartedInit, read_to_eof, release
from .reconcile import owner_alive, reconcile, remove_leftovers
from .sandbox import SandboxError, SandboxSpec, create_sandbox, open_sandbox
from .state import (
    SandboxRecord,
    load_records,
    process_alive,
    process_start_time,
    save_record,
)
from .workload import (
    OptionsError,
    SandboxOptions,
    build_options,
    command_spec,
    exec_socket_path,
    parse_pin,
    parse_repo,
    with_additions,
)

log = logging.getLogger("sandgate.daemon")

SO_PEERGROUPS = 59  # linux/socket.h; Python has no name for it
READY_TIMEOUT = 15.0
# Blocking work (netlink, nft, cgroups, fsync) runs here; most of a create or destroy
# is waiting on the kernel (veth teardown, cgroup moves, init getting ready).
WORKERS = 8
REQUEST_TIMEOUT = 10.0  # a connection that sends no whole request in this is closed
DRIFT_INTERVAL = 0.5
RECONCILE_INTERVAL = 30.0
# Test-only: "create:network" makes the daemon stop itself (SIGSTOP) on entering that
# phase, so a test can kill -9 it exactly there.
TEST_STOP_ENV = "SANDGATE_TEST_STOP_AT"


class DaemonError(Exception):
    """A request the daemon could not carry out; `code` is a control.ERROR_CODES entry."""

    def __init__(self, message: str, code: str = "failed") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    @property
    def is_root(self) -> bool:
        return self.uid == 0


@dataclass
class Live:
    """A sandbox this daemon serves."""

    record: SandboxRecord
    policy: Policy
    cgroup: Cgroup | None
    expiry: asyncio.TimerHandle | None = None
    removing: bool = False
    execs: int = 0

    @property
    def id(self) -> str:
        return self.record.id


@dataclass
class _Policies:
    """The named policies of policies_dir, as last (re)loaded: name -> (policy, text)."""

    by_name: dict[str, tuple[Policy, str, str]] = field(default_factory=dict)
    loaded_at: float = 0.0


class Daemon:
    def __init__(
        self, dconfig: DaemonConfig, forkserver: ForkServer, environ: dict[str, str] | None = None
    ) -> None:
        self.dconfig = dconfig
        self.config = dconfig.runner_config()
        self.forkserver = forkserver
        self.environ = dict(os.environ if environ is None else environ)
        self.metrics = DaemonMetrics()
        # One libnftables context for the host, made now, while this process has few
        # descriptors: libnftables select()s its socket, which must stay below 1024
        # (the daemon holds two descriptors per sandbox). Calls on it are serialised.
        self.nft = nft_apply.Nft()
        self.live: dict[str, Live] = {}
        self.busy: set[str] = set()  # ids being created or removed by this daemon
        self.policies = _Policies()
        self.pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="sandgate-work")
        self.loop: asyncio.AbstractEventLoop | None = None
        self.gateway: Gateway | None = None
        self._servers: list[socket.socket] = []
        self._tasks: set[asyncio.Task] = set()
        self._stopping = asyncio.Event()
        self._stop_at = self.environ.get(TEST_STOP_ENV, "")
        self._control_gid = _group_id(dconfig.control_group)
        self._last_drift_log = 0.0
        self.started_at = time.time()

    # --- life --------------------------------------------------------------------------

    async def run(self) -> int:
        self.loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self._stopping.set)
        self.loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload()))
        try:
            await self.start()
        except Exception as exc:
            log.error("sandgate serve could not start: %s", exc)
            sdnotify.notify(f"STATUS=could not start: {exc}")
            await self.shutdown()
            return 1
        sdnotify.notify("READY=1", f"STATUS=serving {len(self.live)} sandbox(es)")
        log.info(
            "serving on %s: %d sandbox(es) restored", self.dconfig.control_socket, len(self.live)
        )
        await self._stopping.wait()
        sdnotify.notify("STOPPING=1")
        log.info("stopping; sandboxes keep running and are restored at the next start")
        await self.shutdown()
        return 0

    async def start(self) -> None:
        cfg = self.config
        for path, mode in (
            (cfg.run_dir, 0o755),
            (cfg.run_dir / "gateways", 0o700),
            (cfg.run_dir / "inits", 0o700),
            (cfg.state_dir, 0o700),
        ):
            path.mkdir(parents=True, exist_ok=True, mode=mode)
        self._load_policies()
        gw_config = GatewayConfig(
            audit_path=str(cfg.audit_path),
            resolver=_SandboxPins(
                pinned_resolver(
                    {h: list(a) for h, a in self.dconfig.resolve.items()}, system_resolver
                )
            ),
            self_addrs=own_networks(cfg.pool, addresses_in_use()),
            credentials_dir=effective_credentials_dir(self.dconfig, self.environ),
            upstream_ca_file=None
            if self.dconfig.upstream_ca is None
            else str(self.dconfig.upstream_ca),
            processes=self.dconfig.gateway_processes(),
            # Room in the gateway's shared limits table for every sandbox the daemon
            # may have, and for those being removed while new ones are made.
            max_sandboxes=self.dconfig.max_sandboxes + 64,
            on_counts=self.metrics.observe_counts,
        )
        self.gateway = Gateway(gw_config)
        await self._reconcile_at_start()
        self._servers.append(self._listen_control())
        self._servers.append(self._listen_metrics())
        if self.dconfig.metrics_listen is not None:
            self._servers.append(self._listen_metrics_tcp(*self.dconfig.metrics_listen))
        self._spawn(self._drift_watch())
        self._spawn(self._reconcile_every())
        interval = sdnotify.watchdog_interval(self.environ)
        if interval:
            self._spawn(self._watchdog(interval))

    async def shutdown(self) -> None:
        for sock in self._servers:
            self.loop.remove_reader(sock.fileno())
            sock.close()
        for path in (self.dconfig.control_socket, self.dconfig.metrics_socket):
            with contextlib.suppress(OSError):
                os.unlink(path)
        for task in list(self._tasks):
            task.cancel()
        if self.gateway is not None:
            # The sandboxes stay; only their endpoints close (egress fails closed).
            await self.gateway.close()
        self.pool.shutdown(wait=True)
        self.forkserver.close()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("daemon task failed: %r", task.exception())

    async def _work(self, fn: Callable, *args: Any) -> Any:
        return await self.loop.run_in_executor(self.pool, fn, *args)

    async def _watchdog(self, interval: float) -> None:
        while True:
            sdnotify.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    def _hook(self, operation: str, phase: str) -> None:
        """Test-only fault injection (TEST_STOP_ENV); a no-op otherwise."""
        if self._stop_at and self._stop_at == f"{operation}:{phase}":
            os.write(2, f"sandgate: test hook: stopping at {operation}:{phase}\n".encode())
            # To this thread, not the process: kill(getpid()) hands the stop to the
            # main thread, and until that one is scheduled this thread runs on (on a
            # busy host it got as far as writing the next phase's record).
            signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)

    # --- reconcile and restore ------------------------------------------------------------

    async def _reconcile_at_start(self) -> None:
        result = await self._work(reconcile, self.config, owner_alive, frozenset(), self.nft)
        for sid, why in result.failed:
            log.error("reconcile: could not remove sandbox %s: %s", sid, why)
        if result.removed:
            log.warning(
                "reconcile: removed %d sandbox(es) no live process owned: %s",
                len(result.removed),
                " ".join(result.removed),
            )
            self.metrics.reconcile_removals.inc(len(result.removed))
        records = load_records(self.config.sandboxes_dir)
        if result.kept:
            await self._work(self._repair_firewall, True)
        for sid in result.kept:
            record = records.get(sid)
            if record is None or record.owner != "daemon":
                continue  # a `sandgate run`'s own: it serves itself
            try:
                await self._restore(record)
            except Exception as exc:
                log.error("restore: sandbox %s could not be restored, removing it: %s", sid, exc)
                await self._work(remove_leftovers, self.config, sid, None, self.nft)
                self.metrics.reconcile_removals.inc()
        self.metrics.sandboxes.set(len(self.live))

    async def _restore(self, record: SandboxRecord) -> None:
        policy = self._policy_from_request(record.request)
        sandbox = await self._work(open_sandbox, self.config, record.id)
        if sandbox is None:
            raise DaemonError("its network namespace is gone")
        live = Live(record=record, policy=policy, cgroup=sandbox.cgroup)
        await self._add_endpoints(live)
        self.live[record.id] = live
        self._schedule_expiry(live)

    async def _add_endpoints(self, live: Live) -> None:
        rec = live.record
        unix = socket_path(self.config.run_dir, rec.id)
        unix.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        # The request's --resolve pins, for the connections these listeners accept.
        pins = (parse_pin(p) for p in rec.request.get("resolve", ()))
        token = _SANDBOX_PINS.set({host: tuple(addrs) for host, addrs in pins})
        try:
            await self.gateway.add_sandbox(
                rec.id, live.policy, tcp=(rec.gateway_addr, rec.gateway_port), unix_path=str(unix)
            )
        finally:
            _SANDBOX_PINS.reset(token)

    async def _reconcile_every(self) -> None:
        """Sandboxes whose init died (killed, OOM) and leftovers of `sandgate run`s that
        were killed: removed within RECONCILE_INTERVAL."""
        while True:
            await asyncio.sleep(RECONCILE_INTERVAL)
            await self.reconcile_now()
            # The host's addresses may have changed (DHCP, a new interface): the
            # gateway never dials them, whatever a policy allows.
            own = await self._work(addresses_in_use)
            self.gateway.set_own_addresses(own_networks(self.config.pool, own))

    async def reconcile_now(self) -> list[str]:
        mine = {sid for sid, live in self.live.items() if not live.removing}

        def alive(record: SandboxRecord) -> bool:
            # Asked on the worker, when reconcile gets to the id, of this daemon's state
            # then (not of a copy taken when the job was queued, maybe behind many
            # creates): a sandbox made meanwhile is busy or live by then.
            if record.id in self.busy:
                return True
            if record.owner == "daemon" and record.state == "ready" and record.init_pid:
                return record.id in self.live and owner_alive(record)
            # Not ready, or its init not started yet: alive while the process making
            # it (this daemon, a `sandgate run`) is.
            return record.state != "removing" and process_alive(
                record.owner_pid, record.owner_start
            )

        dead = [sid for sid in mine if not owner_alive(self.live[sid].record)]
        for sid in dead:
            log.warning("sandbox %s: its init is gone; removing the sandbox", sid)
            with contextlib.suppress(DaemonError):
                await self.destroy(sid, "init gone")
        result = await self._work(reconcile, self.config, alive, self.busy, self.nft)
        if result.removed:
            log.warning("reconcile: removed %s", " ".join(result.removed))
            self.metrics.reconcile_removals.inc(len(result.removed))
        return list(result.removed) + dead

    # --- drift -------------------------------------------------------------------------

    async def _drift_watch(self) -> None:
        tick = 0
        while True:
            await asyncio.sleep(DRIFT_INTERVAL)
            tick += 1
            try:
                # Rules every tick (a deleted table is back within DRIFT_INTERVAL);
                # elements and the backstop every 4th (their check lists every sandbox).
                await self._work(self._repair_firewall, tick % 4 == 0)
            except Exception as exc:
                now = time.monotonic()
                if now - self._last_drift_log > 10:
                    log.error("drift watch: %s", exc)
                    self._last_drift_log = now

    def _repair_firewall(self, thorough: bool) -> None:
        """Put the host table (and the backstop) back if another tool changed them,
        with every live sandbox's elements. Runs on the worker pool.

        Every call checks the rules tersely (cost independent of the number of
        sandboxes); `thorough` calls, and any call that repaired something, also check
        each ready sandbox's elements and the xtables backstop. Sandboxes this daemon
        is creating or removing (busy) are left to that work."""
        # A sandbox this daemon is creating or removing is its work's to finish: the
        # last removal drops the table on purpose (shared clean-up), which is no drift.
        if not thorough and all(sid in self.busy for sid in self.live):
            return
        if thorough and not any(
            r.state == "ready" for r in load_records(self.config.sandboxes_dir).values()
        ):
            # Only a ready sandbox needs the table: one being created has a record
            # before its create makes the table, and that is no drift to repair.
            return
        nft = self.nft
        table = self.config.table
        repaired = None
        if nft.table(table, elements=False) is None:
            repaired = "table"
            nft_apply.ensure_host_table(nft, table)
        else:
            try:
                nft_apply.verify_host_table(nft, table)
            except nft_apply.NftError:
                repaired = "rules"
                try:
                    nft_apply.restore_host_table(nft, table)
                except nft_apply.NftDrift:
                    nft.run(
                        {"nftables": [{"delete": {"table": {"family": "inet", "name": table}}}]}
                    )
                    nft_apply.ensure_host_table(nft, table)
        check_backstop = thorough
        if repaired is None and not thorough:
            return
        present = {e.host_ifname for e in nft_apply.sandbox_elements(nft, table)}
        missing = 0
        busy = set(self.busy)
        for record in load_records(self.config.sandboxes_dir).values():
            if record.state != "ready" or record.host_ifname in present or record.id in busy:
                continue
            sandbox = open_sandbox(self.config, record.id)
            if sandbox is not None:
                nft_apply.add_sandbox(nft, sandbox.elements(), table)
                missing += 1
        if missing and repaired is None:
            repaired = "elements"
        if check_backstop and backstop.backstop_available()[0] and not backstop.backstop_present():
            backstop.ensure_backstop(self.config.gateway_port)
            self.metrics.drift_repairs.labels("backstop").inc()
            log.warning("drift: the xtables backstop was missing; restored")
        if repaired is not None:
            self.metrics.drift_repairs.labels(repaired).inc()
            log.warning(
                "drift: table inet %s was changed by another tool (%s); restored with %d "
                "sandbox(es)' elements",
                table,
                repaired,
                len(present) + missing,
            )

    # --- policies ------------------------------------------------------------------------

    def _load_policies(self) -> None:
        """Every NAME.toml in policies_dir, all valid or none taken (PolicyError)."""
        found: dict[str, tuple[Policy, str, str]] = {}
        directory = Path(self.dconfig.policies_dir)
        errors = []
        if directory.is_dir():
            for path in sorted(directory.glob("*.toml")):
                try:
                    text = path.read_text()
                    found[path.stem] = (parse_policy(text, str(path)), text, str(path))
                except (PolicyError, OSError, UnicodeDecodeError) as exc:
                    errors.append(str(exc))
        if errors:
            raise DaemonError("; ".join(errors), "bad_request")
        self.policies = _Policies(found, time.time())

    async def reload(self, apply_to_running: bool = False) -> dict[str, Any]:
        sdnotify.notify("RELOADING=1")
        try:
            self._load_policies()
        except DaemonError as exc:
            log.error("reload refused, nothing changed: %s", exc)
            sdnotify.notify("READY=1", "STATUS=reload refused: a policy is invalid")
            raise
        updated = []
        if apply_to_running:
            for live in self.live.values():
                name = live.record.request.get("policy")
                if name not in self.policies.by_name:
                    continue
                _policy, text, origin = self.policies.by_name[name]
                request = {**live.record.request, "policy_toml": text, "policy_origin": origin}
                policy = self._policy_from_request(request)
                self.gateway.update_policy(live.id, policy)
                live.policy = policy
                live.record = dataclasses.replace(live.record, request=request)
                await self._work(save_record, self.config.sandboxes_dir, live.record)
                updated.append(live.id)
        sdnotify.notify("READY=1", f"STATUS=serving {len(self.live)} sandbox(es)")
        log.info(
            "reloaded %d policies; applied to %d running sandbox(es)",
            len(self.policies.by_name),
            len(updated),
        )
        return {"policies": sorted(self.policies.by_name), "updated": updated}

    def _policy_source(self, fields: dict[str, Any]) -> tuple[str, str]:
        """(text, origin) of the policy a create request names."""
        if "policy_toml" in fields:
            return fields["policy_toml"], fields.get("policy_origin") or "request"
        name = fields.get("policy") or self.dconfig.default_policy
        if not name:
            return "", "built-in default"
        if name not in self.policies.by_name:
            known = ", ".join(sorted(self.policies.by_name)) or "none"
            raise DaemonError(
                f"no policy named {name!r} in {self.dconfig.policies_dir} (known: {known}); "
                "add it there and reload",
                "not_found",
            )
        _policy, text, origin = self.policies.by_name[name]
        return text, origin

    def _policy_from_request(self, request: dict[str, Any]) -> Policy:
        text = request.get("policy_toml", "")
        policy = parse_policy(text, request.get("policy_origin", "request")) if text else None
        return with_additions(
            policy or DEFAULT_POLICY,
            request.get("allow", ()),
            request.get("allow_cidr", ()),
            [parse_repo(r) for r in request.get("repos", ())],
        )

    # --- sandboxes -----------------------------------------------------------------------

    def _options(self, peer: Peer, fields: dict[str, Any]) -> tuple[SandboxOptions, dict]:
        text, origin = self._policy_source(fields)
        request = {k: v for k, v in fields.items() if k not in ("argv", "keep")}
        request.update(policy_toml=text, policy_origin=origin)
        try:
            policy = self._policy_from_request(request)
        except PolicyError as exc:
            raise DaemonError(f"invalid policy: {exc}", "bad_request") from exc
        environ = {} if peer.is_root else {"SUDO_UID": str(peer.uid), "SUDO_GID": str(peer.gid)}
        try:
            options = build_options(
                policy,
                user=fields.get("user"),
                environ=environ,
                workspace=fields.get("workspace"),
                ro=fields.get("ro", ()),
                rw=fields.get("rw", ()),
                env=sorted(fields.get("env", {}).items()),
                workdir=fields.get("workdir"),
                memory=fields.get("memory"),
                pids=fields.get("pids"),
                cpus=fields.get("cpus"),
                timeout=fields.get("timeout"),
                resolve=[parse_pin(p) for p in fields.get("resolve", ())],
            )
        except OptionsError as exc:
            raise DaemonError(str(exc), "bad_request") from exc
        if not peer.is_root:
            _check_unprivileged(peer, options)
        return options, request

    async def create(self, peer: Peer, fields: dict[str, Any]) -> Live:
        if len(self.live) + len(self.busy) >= self.dconfig.max_sandboxes:
            raise DaemonError(
                f"this host is at its limit of {self.dconfig.max_sandboxes} sandboxes "
                "(limits.max_sandboxes in sandgate.toml)",
                "conflict",
            )
        options, request = self._options(peer, fields)
        t0 = time.monotonic()
        spec = SandboxSpec(
            policy_name=options.policy.name,
            limits=options.limits,
            owner="daemon",
            creator_uid=peer.uid,
            expires_at=None if options.timeout is None else time.time() + options.timeout,
            request=request,
        )
        try:
            sandbox = await self._work(self._create_sandbox, spec)
        except SandboxError as exc:
            self.metrics.creates.labels("failed").inc()
            raise DaemonError(str(exc)) from exc
        sid = sandbox.id
        self.busy.add(sid)
        live = Live(record=sandbox.record, policy=options.policy, cgroup=sandbox.cgroup)
        try:
            self._hook("create", "gateway")
            await self._add_endpoints(live)
            self._hook("create", "init")
            exec_path = exec_socket_path(self.config.run_dir, sid)
            cmd = command_spec(
                options, sid, sandbox.gateway, self.config.run_dir, exec_socket=exec_path
            )
            started = await self._work(self.forkserver.start_init, cmd, sandbox.network.netns_path)
            await self._work(self._await_ready, started, sandbox.cgroup)
            self._hook("create", "ready")
            live.record = dataclasses.replace(
                sandbox.record, init_pid=started.pid, init_start=process_start_time(started.pid)
            )
            await self._work(save_record, self.config.sandboxes_dir, live.record)
        except BaseException as exc:
            self.metrics.creates.labels("failed").inc()
            with contextlib.suppress(Exception):
                await self.gateway.remove_sandbox(sid)
            await self._work(remove_leftovers, self.config, sid, None, self.nft)
            self.busy.discard(sid)
            if isinstance(exc, LaunchError | ForkServerError | OSError):
                raise DaemonError(f"starting the sandbox's init failed: {exc}") from exc
            raise
        self.busy.discard(sid)
        self.live[sid] = live
        self._schedule_expiry(live)
        self.metrics.creates.labels("ok").inc()
        self.metrics.create_seconds.observe(time.monotonic() - t0)
        self.metrics.sandboxes.set(len(self.live))
        return live

    def _create_sandbox(self, spec: SandboxSpec):
        """create_sandbox with the daemon's host nft context, and the in-sandbox table
        applied by the fork server (few descriptors, one thread). Worker pool."""

        def sandbox_firewall(net) -> None:
            self.forkserver.apply_sandbox_table(
                net.netns_path, str(net.address.host), self.config.gateway_port, self.config.table
            )

        return create_sandbox(
            self.config, spec, self._hook, nft=self.nft, sandbox_firewall=sandbox_firewall
        )

    def _await_ready(self, started: StartedInit, cgroup: Cgroup | None) -> None:
        """Release init (cgroup first) and wait for its ready line. Worker pool."""
        try:
            release(started, cgroup)
            # The resident init writes one line ("ready", or what failed), then closes.
            line = read_to_eof(started.status_fd, time.monotonic() + READY_TIMEOUT)
        finally:
            os.close(started.status_fd)
        if not line:
            raise LaunchError(f"the sandbox's init did not report ready in {READY_TIMEOUT:g}s")
        report = json.loads(line)
        if not report.get("ready"):
            raise LaunchError(report.get("error") or "the sandbox's init failed")

    def _schedule_expiry(self, live: Live) -> None:
        if live.record.expires_at is None:
            return
        delay = max(0.0, live.record.expires_at - time.time())

        def expire() -> None:
            log.info("sandbox %s: its time limit ran out; removing it", live.id)
            self._spawn(self.destroy(live.id, "timeout"))

        live.expiry = self.loop.call_later(delay, expire)

    async def destroy(self, sid: str, reason: str = "request") -> dict[str, float]:
        live = self.live.get(sid)
        if live is None:
            raise DaemonError(f"no sandbox {sid} is served by this daemon", "not_found")
        if live.removing:
            raise DaemonError(f"sandbox {sid} is being removed already", "conflict")
        live.removing = True
        self.busy.add(sid)
        t0 = time.monotonic()
        try:
            if live.expiry is not None:
                live.expiry.cancel()
            # Recorded first: a daemon killed from here on finishes this removal when
            # it starts again (reconcile), instead of restoring a half-removed sandbox.
            live.record = dataclasses.replace(live.record, state="removing")
            await self._work(save_record, self.config.sandboxes_dir, live.record)
            self._hook("destroy", "gateway")
            await self.gateway.remove_sandbox(sid)
            timings = await self._work(remove_leftovers, self.config, sid, self._hook, self.nft)
        finally:
            self.busy.discard(sid)
            self.live.pop(sid, None)
            self.metrics.sandboxes.set(len(self.live))
        self.metrics.destroys.labels(reason).inc()
        self.metrics.destroy_seconds.observe(time.monotonic() - t0)
        return timings or {}

    def _owned(self, peer: Peer, sid: str) -> Live:
        live = self.live.get(sid)
        if live is None or (not peer.is_root and live.record.creator_uid != peer.uid):
            raise DaemonError(f"no sandbox {sid} here", "not_found")
        return live

    def describe(self, live: Live, full: bool = False) -> dict[str, Any]:
        rec = live.record
        out: dict[str, Any] = {
            "id": rec.id,
            "policy": live.policy.name,
            "sandbox_addr": rec.sandbox_addr,
            "gateway": f"{rec.gateway_addr}:{rec.gateway_port}",
            "created_at": rec.created_at,
            "creator_uid": rec.creator_uid,
            "expires_at": rec.expires_at,
            "state": "removing" if live.removing else "running",
            "execs": live.execs,
        }
        if full:
            out["init_pid"] = rec.init_pid
            out["netns"] = rec.netns
            out["cgroup"] = rec.cgroup
            out["request"] = {k: v for k, v in rec.request.items() if k != "policy_toml"}
            from gateway.policy import policy_summary

            out["effective_policy"] = policy_summary(live.policy)
            if live.cgroup is not None:
                with contextlib.suppress(Exception):
                    out["memory_peak"] = live.cgroup.peak_memory()
                    out["oom_killed"] = live.cgroup.oom_killed()
        return out

    # --- control socket ----------------------------------------------------------------

    def _listen_control(self) -> socket.socket:
        path = str(self.dconfig.control_socket)
        sock = _unix_server(path, 0o660, self._control_gid)
        self.loop.add_reader(sock.fileno(), self._accept, sock, self._control_client)
        return sock

    def _listen_metrics(self) -> socket.socket:
        sock = _unix_server(str(self.dconfig.metrics_socket), 0o600, None)
        self.loop.add_reader(sock.fileno(), self._accept, sock, self._metrics_client)
        return sock

    def _listen_metrics_tcp(self, addr: str, port: int) -> socket.socket:
        """[metrics] listen: loopback only (the configuration refuses anything else)."""
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr, port))
        sock.listen(64)
        sock.setblocking(False)
        self.loop.add_reader(
            sock.fileno(), self._accept, sock, lambda c: self._metrics_client(c, unix=False)
        )
        return sock

    def _accept(self, server: socket.socket, handler) -> None:
        for _ in range(64):
            try:
                sock, _ = server.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.error("accept: %s", exc)
                return
            sock.setblocking(False)
            self._spawn(handler(sock))

    def _peer(self, sock: socket.socket) -> Peer:
        pid, uid, gid = struct.unpack(
            "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        )
        groups: tuple[int, ...] = ()
        # Python's getsockopt takes at most 1024 bytes (256 groups; more fail with
        # ERANGE, and then only the primary group counts).
        with contextlib.suppress(OSError):
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
            groups = struct.unpack(f"{len(raw) // 4}I", raw)
        return Peer(pid, uid, gid, groups)

    def _allowed(self, peer: Peer) -> bool:
        if peer.is_root:
            return True
        gid = self._control_gid
        return gid is not None and (peer.gid == gid or gid in peer.groups)

    async def _control_client(self, sock: socket.socket) -> None:
        conn = _Conn(self.loop, sock)
        try:
            peer = self._peer(sock)
            if not self._allowed(peer):
                # Refused before a byte of the request is read.
                self.metrics.control_errors.labels("forbidden").inc()
                await conn.send(
                    control.error(
                        "forbidden",
                        f"uid {peer.uid} may not use sandgate's control socket: root, or a "
                        f"member of group {self.dconfig.control_group!r}, may",
                    )
                )
                return
            try:
                try:
                    message, fds = await asyncio.wait_for(
                        conn.receive(with_fds=True), REQUEST_TIMEOUT
                    )
                except TimeoutError:
                    raise ProtocolError(
                        f"no complete request within {REQUEST_TIMEOUT:g}s"
                    ) from None
                if message is None:
                    return
                try:
                    op, fields = control.validate(message)
                    if (op in control.STDIO_OPS) != bool(fds) or (fds and len(fds) != 3):
                        raise ProtocolError(
                            f"{op}: "
                            + (
                                "pass exactly stdin, stdout and stderr (3 descriptors)"
                                if op in control.STDIO_OPS
                                else "takes no descriptors"
                            )
                        )
                    await self._dispatch(conn, peer, op, fields, fds)
                finally:
                    for fd in fds:
                        with contextlib.suppress(OSError):
                            os.close(fd)
            except ProtocolError as exc:
                self.metrics.control_errors.labels(exc.code).inc()
                await conn.send(exc.to_json())
            except DaemonError as exc:
                self.metrics.control_errors.labels(exc.code).inc()
                await conn.send(control.error(exc.code, str(exc)))
            except (ConnectionError, BrokenPipeError):
                pass
            except Exception as exc:
                log.exception("control request failed")
                self.metrics.control_errors.labels("failed").inc()
                with contextlib.suppress(OSError):
                    await conn.send(control.error("failed", f"internal error: {exc}"))
        except (ConnectionError, OSError):
            pass
        finally:
            conn.close()

    async def _dispatch(
        self, conn: _Conn, peer: Peer, op: str, fields: dict[str, Any], fds: list[int]
    ) -> None:
        if op == "ping":
            await conn.send(
                {
                    "ok": True,
                    "protocol": control.PROTOCOL_VERSION,
                    "pid": os.getpid(),
                    "sandboxes": len(self.live),
                    "started_at": self.started_at,
                }
            )
        elif op == "create":
            live = await self.create(peer, fields)
            await conn.send({"ok": True, "sandbox": self.describe(live)})
        elif op == "list":
            boxes = [
                self.describe(live)
                for live in self.live.values()
                if peer.is_root or live.record.creator_uid == peer.uid
            ]
            await conn.send({"ok": True, "sandboxes": sorted(boxes, key=lambda b: b["created_at"])})
        elif op == "inspect":
            await conn.send(
                {"ok": True, "sandbox": self.describe(self._owned(peer, fields["id"]), True)}
            )
        elif op == "destroy":
            results = []
            for sid in fields["ids"]:
                try:
                    self._owned(peer, sid)
                    results.append({"id": sid, "removed": True, "ms": await self.destroy(sid)})
                except DaemonError as exc:
                    results.append({"id": sid, "removed": False, "error": str(exc)})
            ok = all(r["removed"] for r in results)
            await conn.send({"ok": ok, "results": results, **({} if ok else _partial(results))})
        elif op == "exec":
            live = self._owned(peer, fields["id"])
            await self._exec(conn, live, fields, fds, timeout=None)
        elif op == "run":
            await self._run(conn, peer, fields, fds)
        elif op == "logs":
            self._owned_or_gone(peer, fields["id"])
            await self._logs(conn, fields["id"], fields.get("tail"), fields.get("follow", False))
        elif op == "reload":
            if not peer.is_root:
                raise DaemonError("only root may reload the daemon", "forbidden")
            result = await self.reload(fields.get("apply_to_running", False))
            await conn.send({"ok": True, **result})

    def _owned_or_gone(self, peer: Peer, sid: str) -> None:
        """logs works for a removed sandbox too (root), or one of the peer's own."""
        if sid in self.live:
            self._owned(peer, sid)
        elif not peer.is_root:
            raise DaemonError(f"no sandbox {sid} here", "not_found")

    async def _exec(
        self,
        conn: _Conn,
        live: Live,
        fields: dict[str, Any],
        fds: list[int],
        timeout: float | None,
    ) -> dict[str, Any]:
        """Start argv in the sandbox through its init; relay signals; the end."""
        if live.removing:
            raise DaemonError(f"sandbox {live.id} is being removed", "conflict")
        path = str(exec_socket_path(self.config.run_dir, live.id))
        init = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        init.setblocking(False)
        try:
            try:
                await self.loop.sock_connect(init, path)
            except OSError as exc:
                raise DaemonError(f"sandbox {live.id}: its init does not answer: {exc}") from exc
            request = {"argv": fields["argv"], "env": fields.get("env", {})}
            if fields.get("workdir"):
                request["cwd"] = fields["workdir"]
            socket.send_fds(init, [(json.dumps(request) + "\n").encode()], fds)
            for fd in fds:
                os.close(fd)
            fds.clear()
            init_conn = _LineConn(self.loop, init)
            first = await init_conn.line()
            if first is None or "pid" not in first:
                result = first or {"exit_code": control_exit_setup(), "error": "init went away"}
                await conn.send({"ok": True, "event": "exit", **result})
                return result
            live.execs += 1
            self.metrics.execs.inc()
            await conn.send({"ok": True, "event": "started", "id": live.id, "pid": first["pid"]})
            result = await self._relay(conn, init_conn, live, timeout)
            await conn.send({"ok": True, "event": "exit", **result})
            return result
        finally:
            init.close()

    async def _relay(
        self, conn: _Conn, init_conn: _LineConn, live: Live, timeout: float | None
    ) -> dict[str, Any]:
        ended = asyncio.ensure_future(init_conn.line())
        signals = asyncio.ensure_future(self._signals(conn, init_conn))
        try:
            done, _ = await asyncio.wait(
                {ended, signals}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if ended in done:
                return ended.result() or _killed(live)
            if signals in done:
                # The caller went away: the command goes on (exec) or the caller's
                # `run` is torn down by _run.
                raise ConnectionResetError("the caller went away")
            # The wall-clock limit of a `run`.
            if live.cgroup is not None:
                await self._work(live.cgroup.kill_all)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(ended), 5)
            return {
                "exit_code": 128 + signal.SIGKILL,
                "signal": int(signal.SIGKILL),
                "timed_out": True,
                "error": f"killed: the wall-clock limit of {timeout:g}s ran out",
            }
        finally:
            for task in (ended, signals):
                task.cancel()

    async def _signals(self, conn: _Conn, init_conn: _LineConn) -> None:
        """Pass the caller's {"op": "signal"} frames on to init until the caller closes."""
        while True:
            message, _ = await conn.receive()
            if message is None:
                return
            try:
                signum = control.validate_signal(message)
            except ProtocolError as exc:
                await conn.send(exc.to_json())
                continue
            await self.loop.sock_sendall(
                init_conn.sock, (json.dumps({"signal": signum}) + "\n").encode()
            )

    async def _run(self, conn: _Conn, peer: Peer, fields: dict[str, Any], fds: list[int]) -> None:
        create_fields = {
            k: v for k, v in fields.items() if k not in ("argv", "keep", "env", "workdir")
        }
        # env and workdir serve the command: they go with the exec, as for `sandgate exec`.
        live = await self.create(peer, create_fields)
        timings: dict[str, Any] = {}
        try:
            await conn.send({"ok": True, "event": "created", "sandbox": self.describe(live)})
            timeout = live.record.expires_at and max(0.0, live.record.expires_at - time.time())
            if live.expiry is not None:
                live.expiry.cancel()  # the run's own deadline below replaces it
            await self._exec(conn, live, fields, fds, timeout)
        finally:
            if not fields.get("keep") and not live.removing:
                with contextlib.suppress(DaemonError):
                    timings = await self.destroy(live.id, "run ended")
        if timings:
            with contextlib.suppress(OSError, ConnectionError):
                await conn.send({"ok": True, "event": "removed", "destroy_ms": timings})

    async def _logs(self, conn: _Conn, sid: str, tail: int | None, follow: bool) -> None:
        path = self.config.audit_path
        needle = f'"sandbox":"{sid}"'
        lines: list[dict] = []
        offset = 0
        with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
            for raw in f:
                if needle.encode() in raw:
                    with contextlib.suppress(ValueError):
                        lines.append(json.loads(raw))
            offset = f.tell()
        if tail is not None:
            lines = lines[-tail:] if tail else []
        for line in lines:
            await conn.send({"ok": True, "line": line})
        if not follow:
            await conn.send({"ok": True, "event": "end", "lines": len(lines)})
            return
        closed = asyncio.ensure_future(conn.receive())
        try:
            inode = _inode(path)
            while not closed.done():
                await asyncio.wait({closed}, timeout=0.25)
                now = _inode(path)
                if now != inode:  # rotated: start the new file from its top
                    inode, offset = now, 0
                with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
                    f.seek(offset)
                    chunk = f.read()
                    complete = chunk[: chunk.rfind(b"\n") + 1]
                    offset += len(complete)
                for raw in complete.splitlines() if now is not None else ():
                    if needle.encode() in raw:
                        with contextlib.suppress(ValueError):
                            await conn.send({"ok": True, "line": json.loads(raw)})
                complete = b""
        finally:
            closed.cancel()

    async def _metrics_client(self, sock: socket.socket, unix: bool = True) -> None:
        conn = _Conn(self.loop, sock)
        try:
            if unix and not self._peer(sock).is_root:
                return
            head = await conn.read_http_head()
            if head is None:
                return
            if head.startswith(b"GET /metrics ") or head.startswith(b"GET / "):
                body = self.metrics.render()
                status, ctype = "200 OK", CONTENT_TYPE
            else:
                body, status, ctype = b"only GET /metrics here\n", "404 Not Found", "text/plain"
            await conn.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                f"Connection: close\r\n\r\n".encode()
                + body
            )
        except OSError:
            pass
        finally:
            conn.close()


# --- small pieces -------------------------------------------------------------------------

# One Gateway serves every sandbox with one resolver, but a create request's `resolve`
# pins are that sandbox's alone. The pins are set in this context variable while the
# sandbox's listeners are made: asyncio and uvloop run a listener's accept callbacks,
# and the tasks they start for each connection, in a copy of the context the listener
# was made in, so _SandboxPins.local (called on the loop, in the connection's task)
# sees the pins of the sandbox the connection came to, and never another sandbox's.
_SANDBOX_PINS: contextvars.ContextVar[Mapping[str, list] | None] = contextvars.ContextVar(
    "sandgate_sandbox_pins", default=None
)


class _SandboxPins:
    """The daemon's resolver: the connection's sandbox's pins, then [gateway] resolve,
    then the host's resolver (gateway.addr.Resolver's shape)."""

    def __init__(self, base) -> None:
        self._base = base

    def local(self, host: str, port: int) -> tuple | None:
        pinned = (_SANDBOX_PINS.get() or {}).get(host)
        return pinned if pinned is not None else self._base.local(host, port)

    def __call__(self, host: str, port: int) -> list:
        pinned = self.local(host, port)
        return list(pinned) if pinned is not None else self._base(host, port)


def control_exit_setup() -> int:
    from .init import EXIT_SETUP

    return EXIT_SETUP


def _killed(live: Live) -> dict[str, Any]:
    out: dict[str, Any] = {"exit_code": 128 + signal.SIGKILL, "signal": int(signal.SIGKILL)}
    oom = False
    if live.cgroup is not None:
        with contextlib.suppress(Exception):
            oom = live.cgroup.oom_killed()
    out["error"] = (
        "killed: out of memory (the sandbox's memory limit)" if oom else "the sandbox's init ended"
    )
    out["oom_killed"] = oom
    return out


def _partial(results: list[dict]) -> dict:
    failed = [r for r in results if not r["removed"]]
    return {
        "error": {
            "code": "failed",
            "message": "; ".join(f"{r['id']}: {r['error']}" for r in failed),
        }
    }


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def _group_id(name: str | None) -> int | None:
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def _sandbox_uids() -> set[int]:
    uids = {NOBODY}
    with contextlib.suppress(KeyError):
        uids.add(pwd.getpwnam(SANDBOX_USER).pw_uid)
    return uids


def _check_unprivileged(peer: Peer, options: SandboxOptions) -> None:
    """What a non-root member of the control group may ask for: run code as itself or
    the sandbox user, and bind only what it could read (ro) or owns (rw)."""
    ident = options.identity
    uid = ident.userns[0] if ident.userns else ident.uid
    if uid != peer.uid and uid not in _sandbox_uids():
        raise DaemonError(
            f"uid {peer.uid} may run sandboxed code only as itself or the sandbox user, "
            f"not uid {uid}",
            "forbidden",
        )
    fs = options.fs
    writable = ([fs.workspace] if fs.workspace else []) + list(fs.rw)
    for path in writable:
        st = os.stat(path)
        if st.st_uid != peer.uid:
            raise DaemonError(
                f"{path}: uid {peer.uid} may bind read-write only directories it owns",
                "forbidden",
            )
    for path in fs.ro:
        st = os.stat(path)
        if st.st_uid != peer.uid and not (st.st_mode & stat.S_IROTH):
            raise DaemonError(
                f"{path}: uid {peer.uid} may bind read-only only what it owns or anyone may read",
                "forbidden",
            )


def _unix_server(path: str, mode: int, gid: int | None) -> socket.socket:
    Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise DaemonError(f"{path} exists and is not a socket; not replacing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale: nobody listens
        else:
            raise DaemonError(f"{path}: another sandgate serve is listening there")
        finally:
            probe.close()
    sock = listen_owner_only(path, 256)
    os.chown(path, 0, gid if gid is not None else 0)
    os.chmod(path, mode)
    sock.setblocking(False)
    return sock


class _Conn:
    """One control connection on the loop: frames in (with descriptors), frames out."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self.loop = loop
        self.sock = sock
        self.reader = control.FrameReader()
        self.queue: list[dict] = []
        self.eof = False
        self._watched: int | None = None  # the fd add_reader watches for _readable

    async def _readable(self) -> None:
        fut = self.loop.create_future()
        fd = self._watched = self.sock.fileno()
        self.loop.add_reader(fd, lambda: fut.done() or fut.set_result(None))
        try:
            await fut
        finally:
            self._unwatch(fd)

    def _unwatch(self, fd: int) -> None:
        # Only while the fd is still this socket's: a task cancelled at the end of a
        # request (the signal relay, a follow) runs this after close() freed the fd,
        # and by then the number may be another socket's, whose reader must stay.
        if self._watched == fd:
            self._watched = None
            self.loop.remove_reader(fd)

    async def receive(self, with_fds: bool = False) -> tuple[dict | None, list[int]]:
        fds: list[int] = []
        while not self.queue:
            if self.eof:
                return None, fds
            try:
                data, new, flags, _ = socket.recv_fds(
                    self.sock, 65536, 3, socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT
                )
            except (BlockingIOError, InterruptedError):
                await self._readable()
                continue
            if flags & socket.MSG_CTRUNC:
                # More than 3 descriptors (the kernel closed the rest): not a request.
                for fd in new + fds:
                    os.close(fd)
                raise ProtocolError("at most 3 descriptors (stdin, stdout, stderr) may come")
            if new:
                if not with_fds or fds:
                    for fd in new:
                        os.close(fd)
                    raise ProtocolError("descriptors may come only with the request frame")
                fds.extend(new)
            if not data:
                self.eof = True
                if self.reader.pending:
                    for fd in fds:
                        os.close(fd)
                    raise ProtocolError("the connection ended inside a frame")
                continue
            try:
                self.queue.extend(self.reader.feed(data))
            except ProtocolError:
                for fd in fds:
                    os.close(fd)
                raise
        return self.queue.pop(0), fds

    async def read_http_head(self) -> bytes | None:
        data = b""
        while b"\r\n\r\n" not in data and len(data) < 8192:
            try:
                chunk = self.sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                await self._readable()
                continue
            if not chunk:
                return None
            data += chunk
        return data

    async def write(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    async def send(self, message: dict) -> None:
        await self.write(control.encode(message))

    def close(self) -> None:
        if self._watched is not None:
            self._unwatch(self._watched)
        self.sock.close()


class _LineConn:
    """The daemon's side of a resident init's exec socket: JSON lines."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self.loop = loop
        self.sock = sock
        self.buffer = b""

    async def line(self) -> dict | None:
        while b"\n" not in self.buffer:
            try:
                chunk = await self.loop.sock_recv(self.sock, 4096)
            except OSError as exc:
                if exc.errno in (errno.ECONNRESET, errno.EPIPE):
                    return None
                raise
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        try:
            value = json.loads(line)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None


def serve(dconfig: DaemonConfig) -> int:
    """The body of `sandgate serve`. The fork server is made first, while this process
    has one thread."""
    import uvloop

    logging.basicConfig(
        level=logging.INFO, format="sandgate[%(process)d]: %(levelname)s %(message)s"
    )
    forkserver = ForkServer.start()
    # Two descriptors per sandbox's endpoints, plus connections: take the hard limit
    # (the unit sets LimitNOFILE=65536).
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    daemon = Daemon(dconfig, forkserver)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(daemon.run())
    finally:
        loop.close()
