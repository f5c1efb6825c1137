"""Reconciling: the kernel's sandgate objects against the sandbox records.

Every kernel object a sandbox owns is named after its id (netns sg-<id>, veth
sg<id>, nft set elements keyed by sg<id>, cgroup sandgate-<id>, gateway and exec
sockets under /run/sandgate), and every id has a record from the moment it is taken
(state "creating"). So after any crash the question for each id is only: does a live
process still own it? A `sandgate run` owns its sandbox while that process lives; the
daemon's sandboxes are owned, once ready, by their resident init. Whatever no live
process owns is removed, whole, by destroy_sandbox. Only ids of this runner's own
state are considered (see sandgate_ids).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Container
from dataclasses import dataclass

from netns import addressing
from nft import apply as nft_apply

from .config import RunnerConfig
from .gateway_thread import remove_socket_dir
from .sandbox import destroy_sandbox
from .state import SandboxRecord, load_record, load_record_ids, process_alive
from .workload import exec_socket_path

Liveness = Callable[[SandboxRecord], bool]


@dataclass(frozen=True)
class Reconciled:
    kept: tuple[str, ...]  # ids a live process owns
    removed: tuple[str, ...]
    failed: tuple[tuple[str, str], ...]  # (id, why) that could not be removed


def owner_alive(record: SandboxRecord) -> bool:
    """The default test: the process that keeps the sandbox is alive (same start time).
    A sandbox whose removal had begun (state "removing") has no owner any more."""
    if record.state == "removing":
        return False
    if record.owner == "daemon" and record.state == "ready":
        return process_alive(record.init_pid, record.init_start)
    return process_alive(record.owner_pid, record.owner_start)


def sandgate_ids(config: RunnerConfig) -> set[str]:
    """The ids this runner's state names: a record in its state directory, or a socket
    in its run directory.

    Not every sg-* object on the host: another sandgate with another state directory
    (a test's, a `sandgate run --state-dir`) owns its own, and every id has a record
    (in somebody's state directory) from before its first kernel object until after
    its last, so an object without a record here is not this runner's to remove.
    `sandgate ls` shows such objects and `sandgate rm` removes them."""
    ids = set(load_record_ids(config.sandboxes_dir))
    for sub in ("gateways", "inits"):
        try:
            names = os.listdir(config.run_dir / sub)
        except FileNotFoundError:
            continue
        ids |= {n[:8] for n in names}
    return {i for i in ids if addressing.is_sandbox_id(i)}


def remove_leftovers(
    config: RunnerConfig, sandbox_id: str, hook=None, nft: nft_apply.Nft | None = None
) -> dict[str, float]:
    """destroy_sandbox plus the sockets a sandbox has under the run directory; the
    milliseconds each phase took."""
    timings = destroy_sandbox(config, sandbox_id, hook, nft=nft)
    remove_socket_dir(config.run_dir, sandbox_id)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(exec_socket_path(config.run_dir, sandbox_id))
    return timings


def reconcile(
    config: RunnerConfig,
    alive: Liveness = owner_alive,
    skip: Container[str] = frozenset(),
    nft: nft_apply.Nft | None = None,
) -> Reconciled:
    """Remove every sandbox whose owner is gone; `skip` names ids being worked on (it
    may change while this runs: it is read for each id in turn, never iterated). Each
    record is read when its id comes up, not before the kernel is listed: a sandbox
    made meanwhile has its record before any kernel object of it exists."""
    kept, removed, failed = [], [], []
    for sid in sorted(sandgate_ids(config)):
        if sid in skip:
            continue
        record = load_record(config.sandboxes_dir, sid)
        if record is not None and alive(record):
            kept.append(sid)
            continue
        try:
            remove_leftovers(config, sid, nft=nft)
            removed.append(sid)
        except Exception as exc:
            failed.append((sid, str(exc)))
    return Reconciled(tuple(kept), tuple(removed), tuple(failed))
