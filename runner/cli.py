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
DEFAULT_DAEMON_CONFIG = "/etc/sandgate/sandgate.toml"


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


def _pin(text: str):
    from .workload import OptionsError, parse_pin

    try:
        parse_pin(text)
        return text
    except OptionsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _repo(text: str):
    """`--repo URL[=read|write]`: see runner.workload.parse_repo."""
    from .workload import OptionsError, parse_repo

    try:
        parse_repo(text)
        return text
    except OptionsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


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
    from .sandbox import SandboxError, SandboxSpec, create_sandbox, destroy_sandbox

    argv = _command(args, "run")
    if not args.embedded:
        from .client import ControlClient

        client = ControlClient(args.control_socket)
        if args.daemon or client.available():
            return _run_via_daemon(client, args, argv)
    policy = _policy_for(args)
    _check_upstream_ca(args.upstream_ca)
    options = _options(args, policy)
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
                SandboxSpec(policy_name=policy.name, command=tuple(argv), limits=options.limits),
            )
    except (SandboxError, Terminated) as exc:
        _err(str(exc))
        return EXIT_SANDGATE
    result: dict = {
        "id": sandbox.id,
        "policy": policy.name,
        "gateway": f"{sandbox.gateway[0]}:{sandbox.gateway[1]}",
        "sandbox_addr": str(sandbox.network.address.sandbox),
        **_options_summary(options),
        "create_ms": sandbox.timings,
    }
    try:
        result.update(_run_command(sandbox, argv, args, options, config))
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


def _command(args: argparse.Namespace, name: str) -> list[str]:
    argv = list(args.command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise UsageError(
            f"{name}: no command given (usage: sandgate {name} [OPTIONS] -- CMD [ARG...])"
        )
    return argv


def _policy_for(args: argparse.Namespace):
    """The policy file (or the built-in default) plus this sandbox's additions."""
    from .workload import OptionsError, parse_repo, with_additions

    try:
        repos = [parse_repo(r) for r in args.repo]
        return with_additions(_load_policy(args.policy), args.allow, args.allow_cidr, repos)
    except OptionsError as exc:
        raise UsageError(str(exc)) from exc


def _options(args: argparse.Namespace, policy):
    from .workload import OptionsError, build_options, parse_pin

    try:
        return build_options(
            policy,
            user=args.user,
            workspace=args.workspace,
            ro=args.ro,
            rw=args.rw,
            env=args.env,
            workdir=args.workdir,
            memory=args.memory,
            pids=args.pids,
            cpus=args.cpus,
            timeout=args.timeout,
            resolve=[parse_pin(p) for p in args.resolve],
        )
    except OptionsError as exc:
        raise UsageError(str(exc)) from exc


def _options_summary(options) -> dict:
    identity = options.identity
    return {
        "user": {"uid": identity.uid, "gid": identity.gid, "from": identity.source},
        "limits": {
            "memory": options.limits.memory_bytes,
            "pids": options.limits.pids,
            "cpus": options.limits.cpus,
            "timeout": options.timeout,
        },
    }


def _run_command(sandbox, argv, args, options, config) -> dict:
    """Start the gateway and the command in the sandbox, wait for the command; the
    result fields for --json."""
    from gateway.addr import system_resolver
    from gateway.proxy import GatewayConfig
    from netns.namespace import addresses_in_use

    from .gateway_thread import GatewayThread, own_networks, pinned_resolver, socket_path
    from .process import LaunchError, launch
    from .workload import command_spec

    sock = socket_path(config.run_dir, sandbox.id)
    spec = command_spec(options, sandbox.id, sandbox.gateway, config.run_dir, argv)
    gateway: list[GatewayThread] = []

    def start_gateway() -> None:
        gw = GatewayThread(
            GatewayConfig(
                audit_path=str(config.audit_path),
                resolver=pinned_resolver(options.resolve, system_resolver),
                self_addrs=own_networks(config.pool, addresses_in_use()),
                credentials_dir=args.credentials,
                upstream_ca_file=args.upstream_ca,
            )
        )
        gateway.append(gw)
        gw.add_sandbox(
            sandbox.id, options.policy, (str(sandbox.gateway[0]), sandbox.gateway[1]), sock
        )

    t0 = time.monotonic()
    try:
        try:
            with _terminate_as_exception():
                running = launch(spec, sandbox.network.netns_path, sandbox.cgroup, start_gateway)
        except (LaunchError, Terminated, OSError) as exc:
            _err(str(exc))
            return {"exit_code": EXIT_SANDGATE, "error": str(exc)}
        outcome = running.wait(options.timeout)
    finally:
        for gw in gateway:
            with _signals_deferred():
                gw.remove_sandbox(sandbox.id, sock)
                gw.close()
    if outcome.error and not args.json:
        _err(f"sandbox {sandbox.id}: {outcome.error}")
    return {**outcome.to_json(), "run_ms": round((time.monotonic() - t0) * 1000, 1)}


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


def _check_upstream_ca(path: str | None) -> None:
    if path is None:
        return
    import ssl

    try:
        ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"--upstream-ca {path}: not a usable PEM CA bundle: {exc}") from exc


def _load_policy(path: str | None):
    from gateway.policy import DEFAULT_POLICY

    return DEFAULT_POLICY if path is None else _read_policy(path)[0]


def _read_policy(path: str):
    """(policy, its text); UsageError naming the file when it is unreadable or invalid."""
    from gateway.policy import PolicyError, read_policy

    try:
        return read_policy(path)
    except PolicyError as exc:
        raise UsageError(f"invalid policy: {exc}") from exc
    except OSError as exc:
        raise UsageError(f"policy {path}: cannot read: {exc.strerror or exc}") from exc


# --- through the daemon ------------------------------------------------------------------


def _sandbox_request(args: argparse.Namespace) -> dict:
    """The create fields of a control request from run/create's options. A policy
    file is read here and sent as text: the daemon never opens a caller's paths."""
    fields: dict = {}
    if args.policy:
        # Checked here as for an embedded run (the same errors), then sent as text.
        _policy, fields["policy_toml"] = _read_policy(args.policy)
        fields["policy_origin"] = os.path.abspath(args.policy)
    elif getattr(args, "policy_name", None):
        fields["policy"] = args.policy_name
    for key in ("allow", "allow_cidr"):
        if getattr(args, key):
            fields[key] = list(getattr(args, key))
    if args.repo:
        fields["repos"] = list(args.repo)
    if args.resolve:
        fields["resolve"] = list(args.resolve)
    user = args.user
    sudo_uid = os.environ.get("SUDO_UID", "")
    if user is None and os.geteuid() == 0 and sudo_uid.isdigit() and sudo_uid != "0":
        user = f"{sudo_uid}:{os.environ.get('SUDO_GID', sudo_uid)}"  # as embedded runs do
    if user is not None:
        fields["user"] = user
    if args.workspace:
        fields["workspace"] = os.path.abspath(args.workspace)
    if args.ro:
        fields["ro"] = [os.path.abspath(p) for p in args.ro]
    if args.rw:
        fields["rw"] = [os.path.abspath(p) for p in args.rw]
    for key in ("memory", "pids", "cpus", "timeout"):
        if getattr(args, key) is not None:
            fields[key] = getattr(args, key)
    return fields


def _command_request(args: argparse.Namespace, argv: list[str]) -> dict:
    fields: dict = {"argv": argv}
    if args.env:
        fields["env"] = dict(args.env)
    if args.workdir:
        fields["workdir"] = args.workdir
    return fields


def _daemon_error(exc: Exception) -> str:
    return f"{exc}"


def _run_via_daemon(client, args: argparse.Namespace, argv: list[str]) -> int:
    from .client import DaemonRefused, DaemonUnavailable

    request = {
        "op": "run",
        **_sandbox_request(args),
        **_command_request(args, argv),
        **({"keep": True} if args.keep else {}),
    }
    started = time.monotonic()
    result: dict = {"via": "daemon"}

    def on_event(frame: dict) -> None:
        if frame.get("event") == "created":
            result["id"] = frame["sandbox"]["id"]
            result["gateway"] = frame["sandbox"]["gateway"]
            result["sandbox_addr"] = frame["sandbox"]["sandbox_addr"]
        elif frame.get("event") == "removed":
            result["destroy_ms"] = frame.get("destroy_ms")

    try:
        final = client.run_command(request, on_event)
    except (DaemonRefused, DaemonUnavailable, OSError) as exc:
        _err(str(exc))
        return EXIT_SANDGATE
    result.update({k: v for k, v in final.items() if k not in ("ok", "event")})
    if args.keep and "id" in result:
        result["kept"] = True
        if not args.json:
            _err(f"sandbox {result['id']} kept; remove it with: sandgate rm {result['id']}")
    if final.get("error") and not args.json:
        _err(f"sandbox {result.get('id', '?')}: {final['error']}")
    result["duration_ms"] = round((time.monotonic() - started) * 1000, 1)
    if args.json:
        _print_json({"sandgate": "result", **result}, sys.stderr)
    return int(final.get("exit_code", EXIT_SANDGATE))


def _client(args: argparse.Namespace):
    from .client import ControlClient

    return ControlClient(args.control_socket)


def cmd_create(args: argparse.Namespace) -> int:
    from .client import DaemonRefused, DaemonUnavailable

    try:
        answer = _client(args).call({"op": "create", **_sandbox_request(args)})
    except DaemonUnavailable as exc:
        _err(
            f"{exc}: create needs the daemon (start it: systemctl start sandgate, or "
            "sandgate serve); `sandgate run` works without it"
        )
        return EXIT_FAILED
    except DaemonRefused as exc:
        _err(f"create: {exc}")
        return EXIT_USAGE if exc.code == "bad_request" else EXIT_FAILED
    box = answer["sandbox"]
    if args.json:
        _print_json(box)
    else:
        print(box["id"])
    return EXIT_OK


def cmd_exec(args: argparse.Namespace) -> int:
    from .client import DaemonRefused, DaemonUnavailable

    argv = _command(args, "exec")
    try:
        final = _client(args).run_command(
            {"op": "exec", "id": args.id, **_command_request(args, argv)}
        )
    except DaemonUnavailable as exc:
        _err(f"{exc}: exec needs the daemon")
        return EXIT_SANDGATE
    except DaemonRefused as exc:
        _err(f"exec: {exc}")
        return EXIT_SANDGATE
    if final.get("error") and not args.json:
        _err(f"sandbox {args.id}: {final['error']}")
    if args.json:
        summary = {k: v for k, v in final.items() if k not in ("ok", "event")}
        _print_json({"sandgate": "result", "id": args.id, **summary}, sys.stderr)
    return int(final.get("exit_code", EXIT_SANDGATE))


def cmd_inspect(args: argparse.Namespace) -> int:
    from .client import DaemonRefused, DaemonUnavailable

    try:
        answer = _client(args).call({"op": "inspect", "id": args.id})
    except DaemonUnavailable as exc:
        _err(f"{exc}: inspect needs the daemon; `sandgate ls --json` shows the records")
        return EXIT_FAILED
    except DaemonRefused as exc:
        _err(f"inspect: {exc}")
        return EXIT_FAILED
    _print_json(answer["sandbox"]) if args.json else print(
        json.dumps(answer["sandbox"], indent=2, sort_keys=True)
    )
    return EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    from .client import DaemonRefused, DaemonUnavailable

    request = {"op": "logs", "id": args.id, "follow": args.follow}
    if args.tail is not None:
        request["tail"] = args.tail
    try:
        for frame in _client(args).stream(request):
            line = frame.get("line")
            if line is None:
                continue
            if args.json:
                _print_json(line)
            else:
                print(_log_line(line), flush=True)
    except DaemonUnavailable as exc:
        _err(f"{exc}: logs needs the daemon; the audit log is {RunnerConfig().audit_path}")
        return EXIT_FAILED
    except DaemonRefused as exc:
        _err(f"logs: {exc}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_OK
    return EXIT_OK


def _log_line(d: dict) -> str:
    target = d.get("repo") or f"{d.get('host') or ''}:{d.get('port') or ''}"
    why = d.get("rule") or d.get("reason") or ""
    return (
        f"{d.get('time', '')} {d.get('request_id', '')} {d.get('decision', ''):<5} "
        f"{d.get('status') or '':<3} {d.get('method') or '':<7} {target} {d.get('path') or ''}"
        f"  {why}"
    ).rstrip()


def cmd_reload(args: argparse.Namespace) -> int:
    from .client import DaemonRefused, DaemonUnavailable

    try:
        answer = _client(args).call({"op": "reload", "apply_to_running": args.apply_to_running})
    except (DaemonUnavailable, DaemonRefused) as exc:
        _err(f"reload: {exc}")
        return EXIT_FAILED
    if args.json:
        _print_json(answer)
    else:
        print(
            f"reloaded {len(answer['policies'])} policies; applied to "
            f"{len(answer['updated'])} running sandbox(es)"
        )
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from .daemon import serve
    from .daemon_config import DaemonConfigError, load_daemon_config

    try:
        # An explicit --config must exist; the default path may be absent (defaults).
        path = args.config or DEFAULT_DAEMON_CONFIG
        dconfig = load_daemon_config(path, missing_ok=args.config is None)
    except DaemonConfigError as exc:
        _err(f"invalid configuration:\n{exc}")
        return EXIT_USAGE
    except OSError as exc:
        _err(f"{args.config or DEFAULT_DAEMON_CONFIG}: cannot read: {exc.strerror or exc}")
        return EXIT_USAGE
    _require_root()
    return serve(dconfig)


# --- rm / ls -----------------------------------------------------------------------------------


def cmd_rm(args: argparse.Namespace) -> int:
    from netns.addressing import is_sandbox_id

    from .sandbox import destroy_sandbox, list_sandboxes

    via_daemon = _rm_via_daemon(args)
    if via_daemon is not None:
        return via_daemon
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


def _rm_via_daemon(args: argparse.Namespace) -> int | None:
    """rm through the daemon when it answers and serves every named sandbox (so their
    gateway endpoints close too); None: do it here."""
    from .client import DaemonRefused, DaemonUnavailable

    client = _client(args)
    if not (args.all or args.ids) or not client.available():
        return None
    if args.all:
        return _rm_all_via_daemon(args, client)
    try:
        served = {b["id"] for b in client.call({"op": "list"})["sandboxes"]}
        if not set(args.ids) <= served:
            return None if os.geteuid() == 0 else _rm_refused(args.ids, served)
        answer = next(client.stream({"op": "destroy", "ids": list(args.ids)}), None)
        if answer is None:
            # The daemon went away mid-way; its records say "removing", so it finishes
            # the removal when it starts again (or `sandgate rm` without it does).
            why = "the daemon went away while removing it; it finishes when it is back"
            results = [{"id": i, "removed": False, "error": why} for i in args.ids]
        else:
            results = answer["results"]
    except DaemonRefused as exc:
        if exc.code == "bad_request":
            raise UsageError(f"rm: {exc}") from exc
        results = [{"id": i, "removed": False, "error": str(exc)} for i in args.ids]
    except DaemonUnavailable:
        return None
    return _rm_report(args, results)


def _rm_all_via_daemon(args: argparse.Namespace, client) -> int | None:
    """--all with a daemon: its sandboxes through it, then (root) the rest here."""
    from .client import DaemonRefused, DaemonUnavailable

    try:
        served = [b["id"] for b in client.call({"op": "list"})["sandboxes"]]
        answer = next(client.stream({"op": "destroy", "ids": served}), None) if served else None
        if served and answer is None:
            raise DaemonUnavailable("the daemon went away while removing")
        results = answer["results"] if answer else []
    except (DaemonRefused, DaemonUnavailable) as exc:
        if os.geteuid() == 0:
            return None
        _err(f"rm --all: {exc}")
        return EXIT_FAILED
    if os.geteuid() == 0:
        from .sandbox import destroy_sandbox, list_sandboxes

        config = _config(args)
        for box in list_sandboxes(config):
            if box["id"] in served:
                continue
            try:
                destroy_sandbox(config, box["id"])
                results.append({"id": box["id"], "removed": True})
            except Exception as exc:
                results.append({"id": box["id"], "removed": False, "error": str(exc)})
    return _rm_report(args, results)


def _rm_refused(ids, served) -> int:
    for sid in ids:
        if sid not in served:
            _err(f"rm {sid}: no such sandbox of yours")
    return EXIT_FAILED


def _rm_report(args: argparse.Namespace, results: list[dict]) -> int:
    if args.json:
        _print_json([{k: r[k] for k in r if k != "ms"} for r in results])
    else:
        for r in results:
            if r["removed"]:
                print(r["id"])
            else:
                _err(f"rm {r['id']}: {r['error']}")
    return EXIT_OK if all(r["removed"] for r in results) else EXIT_FAILED


def cmd_ls(args: argparse.Namespace) -> int:
    from .sandbox import list_sandboxes

    if os.geteuid() != 0:
        return _ls_via_daemon(args)
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


def _ls_via_daemon(args: argparse.Namespace) -> int:
    from .client import DaemonRefused, DaemonUnavailable

    try:
        boxes = _client(args).call({"op": "list"})["sandboxes"]
    except (DaemonUnavailable, DaemonRefused) as exc:
        _err(f"ls: {exc} (root sees every sandbox without the daemon)")
        return EXIT_FAILED
    if args.json:
        _print_json(boxes)
        return EXIT_OK
    print(f"{'ID':<10} {'ADDRESS':<15} {'GATEWAY':<21} {'POLICY':<12} {'AGE':>8}")
    now = time.time()
    for b in boxes:
        age = f"{int(now - b['created_at'])}s"
        print(
            f"{b['id']:<10} {b['sandbox_addr']:<15} {b['gateway']:<21} {b['policy']:<12} {age:>8}"
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

    # Options that say what a sandbox is: shared by run and create.
    box = argparse.ArgumentParser(add_help=False)
    box.add_argument("--policy", metavar="FILE", help="policy file (TOML); default: built-in")
    box.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="HOST[:PORT[,PORT]]",
        help="also allow egress to HOST (exact, or *.domain for its subdomains) for this "
        "run; ports default to 443 (CONNECT) and 80 (plain http). Repeatable",
    )
    box.add_argument(
        "--allow-cidr",
        action="append",
        default=[],
        metavar="CIDR",
        help="also let the gateway dial addresses in this private range (a LAN mirror). Repeatable",
    )
    box.add_argument(
        "--resolve",
        action="append",
        default=[],
        type=_pin,
        metavar="HOST=ADDR[,ADDR]",
        help="the gateway resolves HOST to these addresses instead of asking the host's "
        "resolver (the answers are still checked against the address rules). Repeatable",
    )
    box.add_argument(
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
    box.add_argument(
        "--credentials",
        metavar="DIR",
        # Under systemd, LoadCredential= puts them in $CREDENTIALS_DIRECTORY.
        default=os.environ.get("CREDENTIALS_DIRECTORY") or "/etc/sandgate/credentials",
        help="root-only directory of upstream git credentials: HOST.token or "
        "HOST.github-app.toml (default: $CREDENTIALS_DIRECTORY, the systemd credentials "
        "of the service, else %(default)s); never visible in the sandbox",
    )
    box.add_argument(
        "--upstream-ca",
        metavar="FILE",
        type=_readable_file,
        help="PEM CA bundle that git hosts (and the GitHub API) must chain to; "
        "default: the system trust store",
    )
    box.add_argument(
        "--audit-log",
        metavar="FILE",
        default="/var/log/sandgate/audit.jsonl",
        help="where the gateway appends one JSON line per decision (default: %(default)s)",
    )
    box.add_argument(
        "--workspace",
        metavar="DIR",
        help="host directory mounted read-write at /workspace (the working directory); "
        "default: an empty tmpfs",
    )
    box.add_argument(
        "--ro", action="append", default=[], metavar="PATH", help="bind PATH read-only (repeatable)"
    )
    box.add_argument(
        "--rw",
        action="append",
        default=[],
        metavar="PATH",
        help="bind PATH read-write (repeatable)",
    )
    box.add_argument(
        "--user",
        metavar="USER[:GROUP]",
        help="unprivileged user to run CMD as; default: the user behind sudo, else the "
        "_sandgate system user, else nobody. `root` means root inside a user namespace "
        "mapped to that unprivileged user; uid 0 on the host is refused.",
    )
    box.add_argument("--memory", type=_size, metavar="SIZE", help="memory limit, e.g. 512M, 2G")
    box.add_argument("--pids", type=_positive_int, metavar="N", help="process/thread limit")
    box.add_argument("--cpus", type=_cpus, metavar="N", help="CPU limit, e.g. 0.5, 2")
    box.add_argument(
        "--timeout",
        type=_duration,
        metavar="DURATION",
        help="wall-clock limit (30s, 5m, 1h); when it runs out every process of the "
        "sandbox is killed and run exits 137",
    )
    # Options of the command started in a sandbox: shared by run and exec.
    cmdp = argparse.ArgumentParser(add_help=False)
    cmdp.add_argument(
        "--env",
        "-e",
        type=_env_pair,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set an environment variable for CMD (repeatable); CMD gets a small fixed "
        "environment otherwise, never the caller's",
    )
    cmdp.add_argument("--workdir", metavar="PATH", help="working directory inside the sandbox")
    daemon_opts = argparse.ArgumentParser(add_help=False)
    daemon_opts.add_argument(
        "--control-socket",
        metavar="PATH",
        default=None,
        help="the daemon's control socket (default: $SANDGATE_CONTROL_SOCKET, else "
        "/run/sandgate/control.sock)",
    )

    run = sub.add_parser(
        "run",
        parents=[common, box, cmdp, daemon_opts],
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
    run.add_argument("--keep", action="store_true", help="leave the sandbox for inspection")
    where = run.add_mutually_exclusive_group()
    where.add_argument(
        "--embedded",
        action="store_true",
        help="run in this process even if sandgate serve is running",
    )
    where.add_argument(
        "--daemon",
        action="store_true",
        help="run through sandgate serve; fail (125) if it does not answer",
    )
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")
    run.set_defaults(func=cmd_run)

    rm = sub.add_parser(
        "rm",
        parents=[common, daemon_opts],
        help="remove sandboxes",
        description="Remove sandboxes by id: their network namespace, veth, firewall "
        "elements and records. Works from the kernel's own objects, so it also cleans "
        "up after a crash.",
    )
    rm.add_argument("ids", nargs="*", metavar="ID")
    rm.add_argument("--all", action="store_true", help="remove every sandbox on this host")
    rm.set_defaults(func=cmd_rm)

    ls = sub.add_parser(
        "ls",
        parents=[common, daemon_opts],
        help="list sandboxes",
        description="List sandboxes. Root reads the records and the kernel directly (every "
        "sandbox: the daemon's and those of `sandgate run`); anyone else asks the daemon, "
        "which shows a user only their own.",
    )
    ls.set_defaults(func=cmd_ls)

    create = sub.add_parser(
        "create",
        parents=[common, box, daemon_opts],
        help="create a sandbox that stays (needs the daemon)",
        description="Ask sandgate serve for a sandbox that stays until `sandgate rm` (or its "
        "--timeout): run commands in it with `sandgate exec`. Prints its id.",
        epilog="example:\n  id=$(sandgate create --allow packages.example)\n"
        "  sandgate exec $id -- pip download requests\n  sandgate rm $id\n"
        "exit codes: 0 created; 1 the daemon failed or is not running; 2 bad usage "
        "(also a request the daemon found invalid).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    create.add_argument(
        "--policy-name",
        metavar="NAME",
        help="a named policy of the daemon (/etc/sandgate/policies/NAME.toml)",
    )
    create.set_defaults(func=cmd_create)

    exec_ = sub.add_parser(
        "exec",
        parents=[common, cmdp, daemon_opts],
        help="run a command in a sandbox made by create (needs the daemon)",
        description="Start CMD in a running sandbox, with this terminal's stdin, stdout and "
        "stderr, as the sandbox's user; signals (Ctrl-C) are passed on.",
        epilog="exit codes: as for run: CMD's own; 128+N if signal N ended it; 125 sandgate "
        "could not start it; 126 not executable; 127 not found.",
    )
    exec_.add_argument("id", metavar="ID")
    exec_.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")
    exec_.set_defaults(func=cmd_exec)

    inspect = sub.add_parser(
        "inspect",
        parents=[common, daemon_opts],
        help="show everything about one sandbox (needs the daemon)",
    )
    inspect.add_argument("id", metavar="ID")
    inspect.set_defaults(func=cmd_inspect)

    logs = sub.add_parser(
        "logs",
        parents=[common, daemon_opts],
        help="a sandbox's gateway decisions from the audit log (needs the daemon)",
        description="Print the audit log's lines for one sandbox: every request the gateway "
        "allowed or denied, with its request id.",
    )
    logs.add_argument("id", metavar="ID")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing new lines")
    logs.add_argument("--tail", type=int, metavar="N", help="only the last N lines")
    logs.set_defaults(func=cmd_logs)

    reload = sub.add_parser(
        "reload",
        parents=[common, daemon_opts],
        help="reload the daemon's named policies (like systemctl reload sandgate)",
        description="Re-read /etc/sandgate/policies. All valid or nothing changes. Running "
        "sandboxes keep the policy they started with unless --apply-to-running.",
    )
    reload.add_argument(
        "--apply-to-running",
        action="store_true",
        help="also give running sandboxes made from a named policy its new version",
    )
    reload.set_defaults(func=cmd_reload)

    serve = sub.add_parser(
        "serve",
        help="run the daemon (systemd runs this: sandgate.service)",
        description="Serve the control socket and every sandbox's gateway. At start, "
        "reconcile the kernel against the records: remove what no live process owns, "
        "restore the gateway endpoints of the sandboxes that still run. SIGHUP reloads "
        "policies; SIGTERM stops serving and leaves the sandboxes running.",
    )
    serve.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help=f"daemon configuration (default: {DEFAULT_DAEMON_CONFIG}, where a missing "
        "file means the built-in defaults; a FILE given here must exist)",
    )
    serve.set_defaults(func=cmd_serve)

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
