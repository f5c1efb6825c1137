"""The `sandgate` command line.

Exit codes (docs/usage/commands.md is the reference):
  run:   the command's own exit code; 128+N when a signal N ended it;
         125 sandgate could not create the sandbox or start the command in it;
         126 the command cannot be executed; 127 the command was not found.
  other: 0 success; 1 the operation failed (the message says why); 2 bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from ipaddress import IPv4Network
from pathlib import Path

from .config import DEFAULT_GATEWAY_PORT, RunnerConfig

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_SANDGATE = 125

VERSION = "0.1.0"


class UsageError(Exception):
    pass


def _print_json(obj: object, stream=None) -> None:
    stream = stream or sys.stdout
    stream.write(json.dumps(obj, sort_keys=True) + "\n")
    stream.flush()


def _err(msg: str) -> None:
    sys.stderr.write(f"sandgate: {msg}\n")
    sys.stderr.flush()


def _pool(text: str) -> IPv4Network:
    from netns.addressing import AddressError, validate_pool

    try:
        pool = IPv4Network(text, strict=True)
        validate_pool(pool)
    except (ValueError, AddressError) as exc:
        raise argparse.ArgumentTypeError(f"bad pool {text!r}: {exc}") from exc
    return pool


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"bad port {text!r}: expected a number in 1..65535")
    return port


def _size(text: str) -> int:
    from .cgroups import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _cpus(text: str) -> float:
    from .cgroups import parse_cpus

    try:
        return parse_cpus(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _duration(text: str) -> float:
    from gateway.policy import parse_duration

    try:
        value = float(text) if text.replace(".", "", 1).isdigit() else parse_duration(text)
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(f"bad duration {text!r}: {exc}") from exc
    if value <= 0:
        raise argparse.ArgumentTypeError(f"bad duration {text!r}: must be more than 0")
    return value


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"bad number {text!r}: expected a whole number >= 1")
    return int(text)


def _pin(text: str) -> tuple[str, list]:
    from ipaddress import ip_address

    from gateway.policy import normalize_host

    host, sep, addrs = text.partition("=")
    try:
        if not sep or not addrs:
            raise ValueError("expected HOST=ADDR[,ADDR]")
        return normalize_host(host), [ip_address(a.strip()) for a in addrs.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad --resolve {text!r}: {exc}") from exc


def _repo(text: str):
    """A [[git.repos]] entry from `--repo URL[=read|write]`: read by default; write
    may push branches (refs/heads/*) only: no tags, no deletes, at most 10 refs a push."""
    from gateway.policy import PolicyError, parse_policy

    url, sep, access = text.rpartition("=")
    if not sep:
        url, access = text, "read"
    if access not in ("read", "write"):
        raise argparse.ArgumentTypeError(
            f"bad --repo {text!r}: expected URL, URL=read or URL=write"
        )
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
        raise argparse.ArgumentTypeError(f"bad --repo {text!r}: {reason}") from exc
    return repo


def _readable_file(text: str) -> str:
    path = os.path.abspath(text)
    if not os.path.isfile(path):
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return path


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or "\0" in text:
        raise argparse.ArgumentTypeError(f"bad --env {text!r}: expected KEY=VALUE")
    return key, value


def _config(args: argparse.Namespace) -> RunnerConfig:
    extra = {"audit_path": Path(args.audit_log)} if getattr(args, "audit_log", None) else {}
    return RunnerConfig(
        pool=args.pool, gateway_port=args.gateway_port, state_dir=Path(args.state_dir), **extra
    )


def _require_root() -> None:
    if os.geteuid() != 0:
        raise PermissionError("this needs root (network namespaces and nftables); run it with sudo")


# --- run ---------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from .identity import IdentityError, resolve_identity
    from .mounts import FilesystemSpec, MountError, plan_mounts
    from .sandbox import SandboxError, SandboxSpec, create_sandbox, destroy_sandbox

    argv = list(args.command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise UsageError("run: no command given (usage: sandgate run [OPTIONS] -- CMD [ARG...])")
    policy = _with_cli_rules(_load_policy(args.policy), args)
    policy = _with_cli_repos(policy, args.repo)
    _check_upstream_ca(args.upstream_ca)
    limits = _limits(args, policy)
    timeout = args.timeout if args.timeout is not None else policy.limits.timeout
    try:
        identity = resolve_identity(args.user)
        # The home and workspace tmpfs belong to the command's ids as the host sees them.
        owner = identity.userns or (identity.uid, identity.gid)
        fs = FilesystemSpec(
            workspace=args.workspace,
            ro=(*policy.mounts.ro, *args.ro),
            rw=(*policy.mounts.rw, *args.rw),
            uid=owner[0],
            gid=owner[1],
        )
        plan = plan_mounts(fs)
    except (IdentityError, MountError) as exc:
        raise UsageError(str(exc)) from exc
    try:
        _require_root()
    except PermissionError as exc:
        _err(str(exc))
        return EXIT_SANDGATE
    if policy.repos:
        from gateway.credentials import check_credentials

        # The gateway would refuse these at the first git request; say so now instead.
        problems = check_credentials(args.credentials, {r.host for r in policy.repos})
        for problem in problems:
            _err(f"git credentials: {problem}")
        if problems:
            return EXIT_SANDGATE
    config = _config(args)
    started = time.monotonic()
    try:
        with _terminate_as_exception():
            sandbox = create_sandbox(
                config,
                SandboxSpec(policy_name=policy.name, command=tuple(argv), limits=limits),
            )
    except (SandboxError, Terminated) as exc:
        _err(str(exc))
        return EXIT_SANDGATE
    result: dict = {
        "id": sandbox.id,
        "policy": policy.name,
        "gateway": f"{sandbox.gateway[0]}:{sandbox.gateway[1]}",
        "sandbox_addr": str(sandbox.network.address.sandbox),
        "user": {"uid": identity.uid, "gid": identity.gid, "from": identity.source},
        "limits": {
            "memory": limits.memory_bytes,
            "pids": limits.pids,
            "cpus": limits.cpus,
            "timeout": timeout,
        },
        "create_ms": sandbox.timings,
    }
    try:
        result.update(
            _run_command(sandbox, argv, args, identity, fs, plan, timeout, policy, config)
        )
    finally:
        if args.keep:
            result["kept"] = True
            if not args.json:
                _err(f"sandbox {sandbox.id} kept; remove it with: sandgate rm {sandbox.id}")
        else:
            try:
                with _signals_deferred():
                    result["destroy_ms"] = destroy_sandbox(config, sandbox.id)
            except Exception as exc:
                _err(
                    f"removing sandbox {sandbox.id} failed: {exc}; retry: sandgate rm {sandbox.id}"
                )
                result["exit_code"] = EXIT_SANDGATE
    result["duration_ms"] = round((time.monotonic() - started) * 1000, 1)
    if args.json:
        # stdout belongs to the command; the summary goes to stderr as one JSON line.
        _print_json({"sandgate": "result", **result}, sys.stderr)
    return result["exit_code"]


def _run_command(sandbox, argv, args, identity, fs, plan, timeout, policy, config) -> dict:
    """Start the gateway and the command in the sandbox, wait for the command; the
    result fields for --json."""
    from gateway.addr import system_resolver
    from gateway.proxy import GatewayConfig
    from netns.namespace import addresses_in_use

    from .gateway_thread import (
        SOCKET_IN_SANDBOX,
        GatewayThread,
        own_networks,
        pinned_resolver,
        proxy_env,
        socket_path,
    )
    from .init import CommandSpec
    from .mounts import with_bind
    from .process import LaunchError, launch, sandbox_env

    gw_addr, gw_port = sandbox.gateway
    sock = socket_path(config.run_dir, sandbox.id)
    spec = CommandSpec(
        argv=tuple(argv),
        env=sandbox_env(
            {**proxy_env(gw_addr, gw_port, {r.host for r in policy.repos}), **dict(args.env)},
            sandbox.id,
            fs.home,
            identity.name,
        ),
        cwd=args.workdir or fs.workspace_target,
        uid=identity.uid,
        gid=identity.gid,
        hostname=sandbox.id,
        mounts=with_bind(plan, str(sock), SOCKET_IN_SANDBOX),
        userns=identity.userns,
    )
    gateway: list[GatewayThread] = []

    def start_gateway() -> None:
        gw = GatewayThread(
            GatewayConfig(
                audit_path=str(config.audit_path),
                resolver=pinned_resolver(dict(args.resolve), system_resolver),
                self_addrs=own_networks(config.pool, addresses_in_use()),
                credentials_dir=args.credentials,
                upstream_ca_file=args.upstream_ca,
            )
        )
        gateway.append(gw)
        gw.add_sandbox(sandbox.id, policy, (str(gw_addr), gw_port), sock)

    t0 = time.monotonic()
    try:
        try:
            with _terminate_as_exception():
                running = launch(spec, sandbox.network.netns_path, sandbox.cgroup, start_gateway)
        except (LaunchError, Terminated, OSError) as exc:
            _err(str(exc))
            return {"exit_code": EXIT_SANDGATE, "error": str(exc)}
        outcome = running.wait(timeout)
    finally:
        for gw in gateway:
            with _signals_deferred():
                gw.remove_sandbox(sandbox.id, sock)
                gw.close()
    if outcome.error and not args.json:
        _err(f"sandbox {sandbox.id}: {outcome.error}")
    return {**outcome.to_json(), "run_ms": round((time.monotonic() - t0) * 1000, 1)}


def _limits(args: argparse.Namespace, policy):
    """Command line over policy over the built-in defaults."""
    from .cgroups import Limits, default_limits

    base = default_limits()
    try:
        return Limits(
            memory_bytes=args.memory or policy.limits.memory or base.memory_bytes,
            pids=args.pids or policy.limits.pids or base.pids,
            cpus=args.cpus or policy.limits.cpus or base.cpus,
        )
    except ValueError as exc:
        raise UsageError(f"bad limits: {exc}") from exc


class Terminated(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}; nothing was left behind")


@contextlib.contextmanager
def _terminate_as_exception():
    """While the sandbox is being built, SIGTERM/SIGHUP/SIGINT unwind it instead of killing us."""

    def raise_terminated(signum: int, _frame: object) -> None:
        raise Terminated(signum)

    sigs = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
    previous = {sig: signal.signal(sig, raise_terminated) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _signals_deferred():
    """Teardown runs to the end: a second Ctrl-C must not leave half a sandbox."""
    sigs = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _with_cli_rules(policy, args: argparse.Namespace):
    """--allow and --allow-cidr add to the policy for this run."""
    from gateway.policy import parse_allow_arg, with_extra

    if not args.allow and not args.allow_cidr:
        return policy
    try:
        rules = [parse_allow_arg(a) for a in args.allow]
        return with_extra(policy, allow=rules, allow_cidrs=args.allow_cidr)
    except ValueError as exc:
        raise UsageError(f"--allow/--allow-cidr: {exc}") from exc


def _with_cli_repos(policy, repos):
    """--repo entries join the policy's [[git.repos]] for this run; one for a
    repository the policy lists already replaces that entry."""
    from dataclasses import replace

    if not repos:
        return policy
    seen: set[str] = set()
    for repo in repos:
        if repo.url.lower() in seen:
            raise UsageError(f"--repo {repo.url} is given twice")
        seen.add(repo.url.lower())
    kept = [r for r in policy.repos if r.url.lower() not in seen]
    return replace(policy, repos=(*kept, *repos))


def _check_upstream_ca(path: str | None) -> None:
    if path is None:
        return
    import ssl

    try:
        ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"--upstream-ca {path}: not a usable PEM CA bundle: {exc}") from exc


def _load_policy(path: str | None):
    from gateway.policy import DEFAULT_POLICY, PolicyError, load_policy

    if path is None:
        return DEFAULT_POLICY
    try:
        return load_policy(path)
    except PolicyError as exc:
        raise UsageError(f"invalid policy: {exc}") from exc
    except OSError as exc:
        raise UsageError(f"policy {path}: cannot read: {exc.strerror or exc}") from exc


# --- rm / ls -----------------------------------------------------------------------------------


def cmd_rm(args: argparse.Namespace) -> int:
    from netns.addressing import is_sandbox_id

    from .sandbox import destroy_sandbox, list_sandboxes

    _require_root()
    config = _config(args)
    ids = list(args.ids)
    if args.all:
        ids = [s["id"] for s in list_sandboxes(config)]
    if not ids:
        raise UsageError("rm: name at least one sandbox id, or --all")
    known = {s["id"] for s in list_sandboxes(config)}
    status = EXIT_OK
    results = []
    for sid in ids:
        if not is_sandbox_id(sid):
            results.append({"id": sid, "removed": False, "error": "not a sandbox id"})
            status = EXIT_FAILED
            continue
        if sid not in known:
            results.append({"id": sid, "removed": False, "error": "no such sandbox"})
            status = EXIT_FAILED
            continue
        try:
            destroy_sandbox(config, sid)
            results.append({"id": sid, "removed": True})
        except Exception as exc:
            results.append({"id": sid, "removed": False, "error": str(exc)})
            status = EXIT_FAILED
    if args.json:
        _print_json(results)
    else:
        for r in results:
            if r["removed"]:
                print(r["id"])
            else:
                _err(f"rm {r['id']}: {r['error']}")
    return status


def cmd_ls(args: argparse.Namespace) -> int:
    from .sandbox import list_sandboxes

    _require_root()
    boxes = list_sandboxes(_config(args))
    if args.json:
        _print_json(boxes)
        return EXIT_OK
    print(f"{'ID':<10} {'ADDRESS':<15} {'GATEWAY':<21} {'POLICY':<12} {'AGE':>8}  COMMAND")
    now = time.time()
    for b in boxes:
        if not b["recorded"]:
            print(f"{b['id']:<10} (no record: left by a crash; `sandgate rm {b['id']}` removes it)")
            continue
        state = "" if b["in_kernel"] else " [gone from the kernel]"
        age = f"{int(now - b['created_at'])}s"
        gw = f"{b['gateway_addr']}:{b['gateway_port']}"
        cmd = " ".join(b["command"])
        print(
            f"{b['id']:<10} {b['sandbox_addr']:<15} {gw:<21} {b['policy']:<12} {age:>8}"
            f"  {cmd}{state}"
        )
    return EXIT_OK


# --- doctor ------------------------------------------------------------------------------------


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import run_checks

    checks = run_checks(_config(args))
    failed = [c for c in checks if c.status == "fail"]
    if args.json:
        _print_json(
            {"ok": not failed, "checks": [c.to_json() for c in checks]},
        )
    else:
        for c in checks:
            mark = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL", "info": "info"}[c.status]
            print(f"[{mark}] {c.name}: {c.detail}")
            if c.fix and c.status in ("warn", "fail"):
                print(f"        fix: {c.fix}")
        print(
            "this host can run sandboxes"
            if not failed
            else f"this host cannot run sandboxes: {len(failed)} check(s) failed"
        )
    return EXIT_FAILED if failed else EXIT_OK


# --- policy check ------------------------------------------------------------------------------


def cmd_policy_check(args: argparse.Namespace) -> int:
    from gateway.policy import PolicyError, load_policy, policy_summary

    status = EXIT_OK
    report = []
    for path in args.files:
        try:
            policy = load_policy(path)
        except PolicyError as exc:
            status = EXIT_FAILED
            report.append({"file": path, "ok": False, "errors": [e.as_dict() for e in exc.errors]})
            if not args.json:
                _err(str(exc))
            continue
        except OSError as exc:
            status = EXIT_FAILED
            message = f"{path}: cannot read: {exc.strerror or exc}"
            report.append({"file": path, "ok": False, "errors": [{"message": message}]})
            if not args.json:
                _err(message)
            continue
        summary = policy_summary(policy)
        report.append({"file": path, "ok": True, "policy": summary})
        if not args.json:
            egress = summary["egress"]
            print(
                f"{path}: ok: policy {policy.name!r}, {len(egress['allow'])} allow rule(s), "
                f"{len(egress['deny'])} deny rule(s), {len(summary['git']['repos'])} git repo(s)"
            )
    if args.json:
        _print_json(report)
    return status


# --- parser ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--state-dir",
        default="/var/lib/sandgate",
        metavar="DIR",
        help="where sandbox records live (default: %(default)s)",
    )
    common.add_argument(
        "--pool",
        type=_pool,
        default=IPv4Network("10.213.0.0/16"),
        metavar="CIDR",
        help="IPv4 pool each sandbox's /31 is taken from (default: %(default)s)",
    )
    common.add_argument(
        "--gateway-port",
        type=_port,
        default=DEFAULT_GATEWAY_PORT,
        metavar="PORT",
        help="TCP port of the gateway on each sandbox's host end (default: %(default)s)",
    )
    common.add_argument("--json", action="store_true", help="print machine-readable JSON")

    parser = argparse.ArgumentParser(
        prog="sandgate",
        description=(
            "Run untrusted code in a sandbox whose only way out is sandgate's gateway: "
            "its own network namespace, a point-to-point veth, and nftables rules that "
            "let it reach nothing but the gateway endpoint on the host end of that veth."
        ),
        epilog=(
            "examples:\n"
            "  sudo sandgate doctor                     check that this host can run sandboxes\n"
            "  sudo sandgate run -- make test           run a command in a fresh sandbox\n"
            "  sudo sandgate run --keep -- sh -c 'id'   keep the sandbox afterwards\n"
            "  sudo sandgate ls                         list sandboxes\n"
            "  sudo sandgate rm 1a2b3c4d                remove a kept sandbox\n"
            "\nexit codes: see `sandgate run --help`; other commands: 0 ok, 1 failed, 2 usage."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sandgate {VERSION}")
    sub = parser.add_subparsers(dest="subcommand", metavar="COMMAND")

    run = sub.add_parser(
        "run",
        parents=[common],
        help="run a command in a new sandbox (no daemon needed)",
        description=(
            "Create a sandbox, run CMD in it with stdin/stdout/stderr passed through, "
            "forward signals (Ctrl-C) to it, remove the sandbox, and exit with CMD's exit "
            "code, like `docker run`. The built-in default policy allows no egress."
        ),
        epilog=(
            "exit codes: CMD's own; 128+N if signal N ended it; 125 sandgate could not "
            "create the sandbox or enter it; 126 CMD cannot be executed; 127 CMD not found.\n"
            "With --json, a one-line JSON summary (id, exit_code, timings) goes to stderr; "
            "stdout stays CMD's."
        ),
    )
    run.add_argument("--policy", metavar="FILE", help="policy file (TOML); default: built-in")
    run.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="HOST[:PORT[,PORT]]",
        help="also allow egress to HOST (exact, or *.domain for its subdomains) for this "
        "run; ports default to 443 (CONNECT) and 80 (plain http). Repeatable",
    )
    run.add_argument(
        "--allow-cidr",
        action="append",
        default=[],
        metavar="CIDR",
        help="also let the gateway dial addresses in this private range (a LAN mirror). Repeatable",
    )
    run.add_argument(
        "--resolve",
        action="append",
        default=[],
        type=_pin,
        metavar="HOST=ADDR[,ADDR]",
        help="the gateway resolves HOST to these addresses instead of asking the host's "
        "resolver (the answers are still checked against the address rules). Repeatable",
    )
    run.add_argument(
        "--repo",
        action="append",
        default=[],
        type=_repo,
        metavar="URL[=read|write]",
        help="also let the sandbox use this git repository (https://host/org/repo) for "
        "this run, through the git gateway: read (clone, fetch; the default) or write "
        "(also push branches, refs/heads/*: no tags, no deletes, at most 10 refs a push). "
        "Repeatable",
    )
    run.add_argument(
        "--credentials",
        metavar="DIR",
        # Under systemd, LoadCredential= puts them in $CREDENTIALS_DIRECTORY.
        default=os.environ.get("CREDENTIALS_DIRECTORY") or "/etc/sandgate/credentials",
        help="root-only directory of upstream git credentials: HOST.token or "
        "HOST.github-app.toml (default: $CREDENTIALS_DIRECTORY, the systemd credentials "
        "of the service, else %(default)s); never visible in the sandbox",
    )
    run.add_argument(
        "--upstream-ca",
        metavar="FILE",
        type=_readable_file,
        help="PEM CA bundle that git hosts (and the GitHub API) must chain to; "
        "default: the system trust store",
    )
    run.add_argument(
        "--audit-log",
        metavar="FILE",
        default="/var/log/sandgate/audit.jsonl",
        help="where the gateway appends one JSON line per decision (default: %(default)s)",
    )
    run.add_argument("--keep", action="store_true", help="leave the sandbox for inspection")
    run.add_argument(
        "--env",
        "-e",
        type=_env_pair,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set an environment variable for CMD (repeatable); CMD gets a small fixed "
        "environment otherwise, never the caller's",
    )
    run.add_argument(
        "--workspace",
        metavar="DIR",
        help="host directory mounted read-write at /workspace (the working directory); "
        "default: an empty tmpfs",
    )
    run.add_argument("--workdir", metavar="PATH", help="working directory inside the sandbox")
    run.add_argument(
        "--ro", action="append", default=[], metavar="PATH", help="bind PATH read-only (repeatable)"
    )
    run.add_argument(
        "--rw",
        action="append",
        default=[],
        metavar="PATH",
        help="bind PATH read-write (repeatable)",
    )
    run.add_argument(
        "--user",
        metavar="USER[:GROUP]",
        help="unprivileged user to run CMD as; default: the user behind sudo, else the "
        "_sandgate system user, else nobody. `root` means root inside a user namespace "
        "mapped to that unprivileged user; uid 0 on the host is refused.",
    )
    run.add_argument("--memory", type=_size, metavar="SIZE", help="memory limit, e.g. 512M, 2G")
    run.add_argument("--pids", type=_positive_int, metavar="N", help="process/thread limit")
    run.add_argument("--cpus", type=_cpus, metavar="N", help="CPU limit, e.g. 0.5, 2")
    run.add_argument(
        "--timeout",
        type=_duration,
        metavar="DURATION",
        help="wall-clock limit (30s, 5m, 1h); when it runs out every process of the "
        "sandbox is killed and run exits 137",
    )
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")
    run.set_defaults(func=cmd_run)

    rm = sub.add_parser(
        "rm",
        parents=[common],
        help="remove sandboxes",
        description="Remove sandboxes by id: their network namespace, veth, firewall "
        "elements and records. Works from the kernel's own objects, so it also cleans "
        "up after a crash.",
    )
    rm.add_argument("ids", nargs="*", metavar="ID")
    rm.add_argument("--all", action="store_true", help="remove every sandbox on this host")
    rm.set_defaults(func=cmd_rm)

    ls = sub.add_parser("ls", parents=[common], help="list sandboxes")
    ls.set_defaults(func=cmd_ls)

    doctor = sub.add_parser(
        "doctor",
        parents=[common],
        help="check that this host can run sandboxes",
        description="Check kernel features, tools, permissions and the address pool; "
        "print each missing piece with its fix. Exit 1 if this host cannot run sandboxes.",
    )
    doctor.set_defaults(func=cmd_doctor)

    policy = sub.add_parser("policy", help="work with policy files")
    policy_sub = policy.add_subparsers(dest="policy_command", metavar="ACTION")
    check = policy_sub.add_parser(
        "check",
        help="validate policy files",
        description="Validate policy files strictly (unknown keys, bad hosts, globs, sizes "
        "and CIDRs are errors with file:line and the field). Exit 0 if every file is "
        "valid, 1 otherwise. Nothing is applied.",
    )
    check.add_argument("files", nargs="+", metavar="FILE")
    check.add_argument("--json", action="store_true", help="print machine-readable JSON")
    check.set_defaults(func=cmd_policy_check)
    policy.set_defaults(func=lambda _args: _usage(policy))
    return parser


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.func(args)
    except UsageError as exc:
        _err(str(exc))
        return EXIT_USAGE
    except PermissionError as exc:
        _err(str(exc))
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 128 + 2


if __name__ == "__main__":
    sys.exit(main())
