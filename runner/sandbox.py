"""The Sandbox lifecycle: create network → firewall → (process); destroy in reverse.

Every step registers its undo before the next step starts, so a failure at any
point removes exactly what was created so far. Names of every kernel object derive
from the sandbox id, so `destroy_sandbox(config, id)` can remove a sandbox from
the kernel's own listing even when its record is lost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from netns import addressing, namespace
from netns.namespace import SandboxNetwork
from nft import apply as nft_apply
from nft import backstop
from nft.ruleset import SandboxElements

from . import cgroups
from .cgroups import Cgroup, CgroupError, Limits, default_limits
from .config import RunnerConfig
from .state import (
    SandboxRecord,
    delete_record,
    host_lock,
    load_record,
    load_record_ids,
    process_start_time,
    save_record,
)

# Named phases of create, in order; a test-only hook can stop the runner at any one.
CREATE_PHASES = ("allocate", "network", "host-firewall", "sandbox-firewall", "cgroup", "record")
DESTROY_PHASES = ("processes", "host-firewall", "network", "record", "shared-cleanup")

PhaseHook = Callable[[str, str], None]  # (operation, phase)


class SandboxError(Exception):
    """Creating or destroying a sandbox failed; the message names the phase."""


@dataclass(frozen=True)
class SandboxSpec:
    policy_name: str = "default"
    command: tuple[str, ...] = ()
    limits: Limits | None = None  # None: cgroups.default_limits()
    owner: str = "run"  # or "daemon": see SandboxRecord
    creator_uid: int = 0
    expires_at: float | None = None
    request: dict = field(default_factory=dict)


@dataclass
class PhaseTimer:
    """Wall-clock milliseconds per phase, for `--json` output and the benchmarks."""

    ms: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.ms[name] = round((time.perf_counter() - t0) * 1000, 3)


@dataclass(frozen=True)
class Sandbox:
    config: RunnerConfig
    record: SandboxRecord
    network: SandboxNetwork
    timings: dict[str, float]
    cgroup: Cgroup | None = None

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def gateway(self) -> tuple[IPv4Address, int]:
        return self.network.address.host, self.record.gateway_port

    def elements(self) -> SandboxElements:
        return _elements(self.network, self.record.gateway_port)


def _elements(net: SandboxNetwork, port: int) -> SandboxElements:
    return SandboxElements(
        host_ifname=net.host_ifname,
        sandbox_addr=net.address.sandbox,
        gateway_addr=net.address.host,
        gateway_port=port,
    )


def create_sandbox(
    config: RunnerConfig,
    spec: SandboxSpec = SandboxSpec(),
    hook: PhaseHook | None = None,
    *,
    nft: nft_apply.Nft | None = None,
    sandbox_firewall: Callable[[SandboxNetwork], None] | None = None,
) -> Sandbox:
    """Create a sandbox's network and firewall. On any failure nothing is left behind.

    `nft`: the host-netns libnftables context to use (the daemon keeps one; see
    nft.apply.Nft); a new one by default. `sandbox_firewall(net)` applies the
    in-sandbox table; by default a thread of this process joins the netns to do it."""
    nft = nft or nft_apply.Nft()
    sandbox_firewall = sandbox_firewall or (lambda net: _apply_sandbox_firewall(config, net))
    timer = PhaseTimer()
    step = "allocate"

    def enter(phase: str) -> None:
        nonlocal step
        step = phase
        if hook is not None:
            hook("create", phase)

    with contextlib.ExitStack() as undo:
        # Registered first so it runs last: the shared table and backstop go only
        # after this sandbox's own objects are gone, and only if no other needs them.
        undo.callback(_release_shared, config, nft)
        try:
            with host_lock(config.lock_path):
                enter("allocate")
                with timer.phase("allocate"):
                    sandbox_id = addressing.new_sandbox_id(_TakenIds(config))
                    address = addressing.allocate(config.pool, namespace.addresses_in_use())
                    # Before any kernel object: whose they will be (see SandboxRecord.state).
                    record = SandboxRecord(
                        id=sandbox_id,
                        netns=addressing.netns_name(sandbox_id),
                        host_ifname=addressing.host_ifname(sandbox_id),
                        gateway_addr=str(address.host),
                        sandbox_addr=str(address.sandbox),
                        gateway_port=config.gateway_port,
                        created_at=time.time(),
                        policy=spec.policy_name,
                        command=spec.command,
                        state="creating",
                        owner=spec.owner,
                        owner_pid=os.getpid(),
                        owner_start=process_start_time(os.getpid()),
                        creator_uid=spec.creator_uid,
                        expires_at=spec.expires_at,
                        request=spec.request,
                    )
                    undo.callback(delete_record, config.sandboxes_dir, sandbox_id)
                    save_record(config.sandboxes_dir, record)

                enter("network")
                with timer.phase("network"):
                    undo.callback(namespace.destroy_network, sandbox_id)
                    net = namespace.create_network(sandbox_id, address)

                enter("host-firewall")
                with timer.phase("host-firewall"):
                    elems = _elements(net, config.gateway_port)
                    # The backstop goes in with the shared table (the first sandbox
                    # on this host); checking it on every create would cost 2 ms each.
                    if nft_apply.ensure_host_table(nft, config.table):
                        _ensure_backstop(config.gateway_port)
                    undo.callback(nft_apply.delete_sandbox, nft, elems, config.table)
                    nft_apply.add_sandbox(nft, elems, config.table)

            enter("sandbox-firewall")
            with timer.phase("sandbox-firewall"):
                sandbox_firewall(net)

            enter("cgroup")
            with timer.phase("cgroup"):
                limits = spec.limits or default_limits()
                cgroup = cgroups.detect().create(cgroup_name(sandbox_id), limits)
                undo.callback(cgroup.destroy)

            enter("record")
            with timer.phase("record"):
                record = dataclasses.replace(
                    record, netns=net.netns, cgroup=dict(cgroup.dirs), state="ready"
                )
                save_record(config.sandboxes_dir, record)
        except BaseException as exc:
            # The ExitStack unwinds every registered undo, newest first.
            if isinstance(exc, Exception) and not isinstance(exc, SandboxError):
                raise SandboxError(f"creating the sandbox failed at phase {step!r}: {exc}") from exc
            raise
        undo.pop_all()
    return Sandbox(config=config, record=record, network=net, timings=timer.ms, cgroup=cgroup)


class _TakenIds:
    """The ids a new sandbox may not have, asked one candidate at a time: its netns
    name or host link exists, or a record has it. Listing every link instead grew
    with the number of sandboxes on every create."""

    def __init__(self, config: RunnerConfig) -> None:
        self._records = config.sandboxes_dir

    def __contains__(self, sandbox_id: object) -> bool:
        sid = str(sandbox_id)
        return namespace.sandbox_present(sid) or (self._records / f"{sid}.json").exists()

    def __len__(self) -> int:
        return len(load_record_ids(self._records))


def _apply_sandbox_firewall(config: RunnerConfig, net: SandboxNetwork) -> None:
    namespace.run_in_netns(
        net.netns,
        lambda: nft_apply.apply_sandbox_table(
            nft_apply.Nft(), net.address.host, config.gateway_port, config.table
        ),
    )


def cgroup_name(sandbox_id: str) -> str:
    return f"sandgate-{sandbox_id}"


def _find_cgroup(sandbox_id: str, record: SandboxRecord | None) -> Cgroup | None:
    """The sandbox's cgroup: where its record says, else under this runner's own cgroup."""
    name = cgroup_name(sandbox_id)
    if record is not None and record.cgroup:
        return cgroups.cgroup_at(name, record.cgroup)
    try:
        return cgroups.detect().find(name)
    except CgroupError:
        return None


def _ensure_backstop(port: int) -> None:
    available, _reason = backstop.backstop_available()
    if available:
        backstop.ensure_backstop(port)


def _release_shared(config: RunnerConfig, nft: nft_apply.Nft | None = None) -> None:
    """Drop the host table and the backstop once no sandbox of this host needs them."""
    with host_lock(config.lock_path):
        _release_shared_locked(config, nft)


def _release_shared_locked(config: RunnerConfig, nft: nft_apply.Nft | None = None) -> None:
    if namespace.any_sandbox_present():
        return
    nft = nft or nft_apply.Nft()
    if (
        nft_apply.delete_host_table_if_unused(nft, config.table)
        and backstop.backstop_available()[0]
    ):
        backstop.remove_backstop()


def open_sandbox(config: RunnerConfig, sandbox_id: str) -> Sandbox | None:
    """The sandbox with this id as the kernel and its record describe it, or None."""
    record = load_record(config.sandboxes_dir, sandbox_id)
    if record is None or not namespace.sandbox_present(sandbox_id):
        return None
    address = addressing.SandboxAddress(
        host=IPv4Address(record.gateway_addr), sandbox=IPv4Address(record.sandbox_addr)
    )
    net = SandboxNetwork(
        sandbox_id=sandbox_id,
        netns=record.netns,
        host_ifname=record.host_ifname,
        address=address,
    )
    cgroup = _find_cgroup(sandbox_id, record)
    return Sandbox(config=config, record=record, network=net, timings={}, cgroup=cgroup)


def destroy_sandbox(
    config: RunnerConfig,
    sandbox_id: str,
    hook: PhaseHook | None = None,
    *,
    nft: nft_apply.Nft | None = None,
) -> dict[str, float]:
    """Remove every kernel object and the record of one sandbox. Idempotent.

    Works from the kernel's listing (nft elements by interface name, the netns and
    veth by id), not from the record, so it also cleans up after a crash.
    """
    if not addressing.is_sandbox_id(sandbox_id):
        raise SandboxError(f"{sandbox_id!r} is not a sandbox id (8 lowercase hex characters)")
    timer = PhaseTimer()
    ifname = addressing.host_ifname(sandbox_id)

    def enter(phase: str) -> None:
        if hook is not None:
            hook("destroy", phase)

    enter("processes")
    with timer.phase("processes"):
        record = load_record(config.sandboxes_dir, sandbox_id)
        if record is not None and record.state != "removing":
            # First: nobody (a reconcile, the daemon's drift watch) brings it back now.
            record = dataclasses.replace(record, state="removing")
            save_record(config.sandboxes_dir, record)
        cgroup = _find_cgroup(sandbox_id, record)
        if cgroup is not None:
            cgroup.destroy()
    enter("host-firewall")
    with timer.phase("host-firewall"):
        nft = nft or nft_apply.Nft()
        if nft.table(config.table, elements=False) is not None:
            _delete_elements(nft, config, ifname, record)
    enter("network")
    with timer.phase("network"):
        namespace.destroy_network(sandbox_id)
    enter("record")
    with timer.phase("record"):
        delete_record(config.sandboxes_dir, sandbox_id)
    enter("shared-cleanup")
    with timer.phase("shared-cleanup"):
        _release_shared(config, nft)
    return timer.ms


def _delete_elements(
    nft: nft_apply.Nft, config: RunnerConfig, ifname: str, record: SandboxRecord | None
) -> None:
    """The sandbox's elements: those its record names, in one transaction; without a
    record, or if they are not what the table holds, those the table lists for its
    interface (a whole listing: its cost grows with the number of sandboxes)."""
    if record is not None and record.host_ifname == ifname:
        elems = SandboxElements(
            host_ifname=ifname,
            sandbox_addr=IPv4Address(record.sandbox_addr),
            gateway_addr=IPv4Address(record.gateway_addr),
            gateway_port=record.gateway_port,
        )
        try:
            nft_apply.delete_sandbox(nft, elems, config.table)
            return
        except nft_apply.NftError:
            pass
    for elems in nft_apply.sandbox_elements(nft, config.table):
        if elems.host_ifname == ifname:
            nft_apply.delete_sandbox(nft, elems, config.table)


def list_sandboxes(config: RunnerConfig) -> list[dict]:
    """Every sandbox the kernel or the records know of, with where each was found."""
    from .state import load_records

    records = load_records(config.sandboxes_dir)
    present = namespace.sandbox_ids_present()
    out = []
    for sid in sorted(set(records) | present):
        rec = records.get(sid)
        entry: dict = {"id": sid, "in_kernel": sid in present, "recorded": rec is not None}
        if rec is not None:
            entry.update(rec.to_json())
        out.append(entry)
    return out
