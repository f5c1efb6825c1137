"""What a sandbox is asked to be, whoever asks: `sandgate run` in the CLI process or a
create request to the daemon. One place turns the asked-for policy additions, user,
mounts, environment and limits into checked values, and those into init's CommandSpec.

Owns: parsing --allow/--allow-cidr/--repo/--resolve values (for both front ends), the
policy of one sandbox (file or named policy plus additions), `SandboxOptions`, and
`command_spec`. Raises `OptionsError` with a message fit for the person who asked.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path

from gateway.policy import (
    Policy,
    PolicyError,
    RepoRule,
    normalize_host,
    parse_allow_arg,
    parse_policy,
    with_extra,
)

from .cgroups import Limits, default_limits
from .gateway_thread import SOCKET_IN_SANDBOX, proxy_env
from .identity import Identity, IdentityError, resolve_identity
from .init import CommandSpec
from .mounts import FilesystemSpec, MountError, MountPlan, plan_mounts, with_bind
from .process import sandbox_env

IPAddress = IPv4Address | IPv6Address


class OptionsError(ValueError):
    """A sandbox was asked for with a value that cannot be used; the message says which."""


def parse_pin(text: str) -> tuple[str, list[IPAddress]]:
    """`HOST=ADDR[,ADDR]` (--resolve)."""
    host, sep, addrs = text.partition("=")
    try:
        if not sep or not addrs:
            raise ValueError("expected HOST=ADDR[,ADDR]")
        return normalize_host(host), [ip_address(a.strip()) for a in addrs.split(",")]
    except ValueError as exc:
        raise OptionsError(f"bad --resolve {text!r}: {exc}") from exc


def parse_repo(text: str) -> RepoRule:
    """A [[git.repos]] entry from `URL[=read|write]`: read by default; write may push
    branches (refs/heads/*) only: no tags, no deletes, at most 10 refs a push."""
    url, sep, access = text.rpartition("=")
    if not sep:
        url, access = text, "read"
    if access not in ("read", "write"):
        raise OptionsError(f"bad --repo {text!r}: expected URL, URL=read or URL=write")
    lines = ["[[git.repos]]", f"url = {json.dumps(url)}", f'access = "{access}"']
    if access == "write":
        lines += [
            "[git.repos.push]",
            'refs = ["refs/heads/*"]',
            "allow_delete = false",
            "allow_tags = false",
            "max_refs = 10",
        ]
    try:
        (repo,) = parse_policy("\n".join(lines), "--repo").repos
    except PolicyError as exc:
        reason = str(exc).split(": ", 2)[-1]
        raise OptionsError(f"bad --repo {text!r}: {reason}") from exc
    return repo


def with_additions(
    policy: Policy,
    allow: Sequence[str] = (),
    allow_cidrs: Sequence[str] = (),
    repos: Sequence[RepoRule] = (),
) -> Policy:
    """The policy plus --allow / --allow-cidr rules and --repo entries for one sandbox;
    a --repo for a repository the policy lists already replaces that entry."""
    if allow or allow_cidrs:
        try:
            rules = [parse_allow_arg(a) for a in allow]
            policy = with_extra(policy, allow=rules, allow_cidrs=list(allow_cidrs))
        except ValueError as exc:
            raise OptionsError(f"--allow/--allow-cidr: {exc}") from exc
    if repos:
        seen: set[str] = set()
        for repo in repos:
            if repo.url.lower() in seen:
                raise OptionsError(f"--repo {repo.url} is given twice")
            seen.add(repo.url.lower())
        kept = [r for r in policy.repos if r.url.lower() not in seen]
        policy = replace(policy, repos=(*kept, *repos))
    return policy


@dataclass(frozen=True)
class SandboxOptions:
    """Everything about one sandbox's processes, checked."""

    policy: Policy
    identity: Identity
    fs: FilesystemSpec
    plan: MountPlan
    limits: Limits
    timeout: float | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    workdir: str | None = None
    resolve: Mapping[str, list[IPAddress]] = field(default_factory=dict)

    @property
    def cwd(self) -> str:
        return self.workdir or self.fs.workspace_target


def build_options(
    policy: Policy,
    *,
    user: str | None = None,
    environ: Mapping[str, str] | None = None,
    workspace: str | None = None,
    ro: Iterable[str] = (),
    rw: Iterable[str] = (),
    env: Iterable[tuple[str, str]] = (),
    workdir: str | None = None,
    memory: int | None = None,
    pids: int | None = None,
    cpus: float | None = None,
    timeout: float | None = None,
    resolve: Iterable[tuple[str, list[IPAddress]]] = (),
) -> SandboxOptions:
    """Command line (or request) over policy over the built-in defaults."""
    base = default_limits()
    try:
        limits = Limits(
            memory_bytes=memory or policy.limits.memory or base.memory_bytes,
            pids=pids or policy.limits.pids or base.pids,
            cpus=cpus or policy.limits.cpus or base.cpus,
        )
    except ValueError as exc:
        raise OptionsError(f"bad limits: {exc}") from exc
    try:
        identity = resolve_identity(user, environ)
        # The home and workspace tmpfs belong to the command's ids as the host sees them.
        owner = identity.userns or (identity.uid, identity.gid)
        fs = FilesystemSpec(
            workspace=workspace,
            ro=(*policy.mounts.ro, *ro),
            rw=(*policy.mounts.rw, *rw),
            uid=owner[0],
            gid=owner[1],
        )
        plan = plan_mounts(fs)
    except (IdentityError, MountError) as exc:
        raise OptionsError(str(exc)) from exc
    for key, _value in env:
        if not key or "=" in key or "\0" in key:
            raise OptionsError(f"bad environment variable name {key!r}")
    if workdir is not None and not workdir.startswith("/"):
        raise OptionsError(f"--workdir {workdir}: must be an absolute path inside the sandbox")
    return SandboxOptions(
        policy=policy,
        identity=identity,
        fs=fs,
        plan=plan,
        limits=limits,
        timeout=timeout if timeout is not None else policy.limits.timeout,
        env=dict(env),
        workdir=workdir,
        resolve=dict(resolve),
    )


def gateway_dir(run_dir: Path, sandbox_id: str) -> Path:
    """The host directory bind-mounted at /run/sandgate inside the sandbox; it holds
    the gateway's Unix socket. The directory, not the socket, is bound, so a daemon
    that restarts and makes a new socket there reaches the running sandbox again."""
    return run_dir / "gateways" / sandbox_id


def exec_socket_path(run_dir: Path, sandbox_id: str) -> Path:
    """Where a resident init listens for exec requests (root-only directory)."""
    return run_dir / "inits" / f"{sandbox_id}.sock"


def command_env(
    options: SandboxOptions, sandbox_id: str, gateway: tuple[IPv4Address, int], extra=()
) -> dict[str, str]:
    gw_addr, gw_port = gateway
    return sandbox_env(
        {
            **proxy_env(gw_addr, gw_port, {r.host for r in options.policy.repos}),
            **options.env,
            **dict(extra),
        },
        sandbox_id,
        options.fs.home,
        options.identity.name,
    )


def command_spec(
    options: SandboxOptions,
    sandbox_id: str,
    gateway: tuple[IPv4Address, int],
    run_dir: Path,
    argv: Sequence[str] = (),
    exec_socket: Path | None = None,
) -> CommandSpec:
    """init's instructions. With `exec_socket`, a resident init (no command of its own)."""
    gw_dir = gateway_dir(run_dir, sandbox_id)
    gw_dir.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    gw_dir.mkdir(mode=0o755, exist_ok=True)
    if exec_socket is not None:
        exec_socket.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return CommandSpec(
        argv=tuple(argv),
        env=command_env(options, sandbox_id, gateway),
        cwd=options.cwd,
        uid=options.identity.uid,
        gid=options.identity.gid,
        hostname=sandbox_id,
        mounts=with_bind(
            options.plan, str(gw_dir), str(Path(SOCKET_IN_SANDBOX).parent), writable=False
        ),
        userns=options.identity.userns,
        exec_socket=None if exec_socket is None else str(exec_socket),
    )
