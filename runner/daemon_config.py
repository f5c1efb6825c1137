"""The daemon's configuration: /etc/sandgate/sandgate.toml, strictly validated.

`load_daemon_config(path)` returns a frozen `DaemonConfig`. A missing file is the
built-in configuration (every default); anything else wrong (a TOML syntax error, an
unknown section or key, a wrong type, a bad value) raises `DaemonConfigError`, which
lists every problem found, each as "FILE:LINE: dotted.key: what is wrong". No partial
configuration is ever returned.

Sections, keys and defaults (scripts/systemd/sandgate.toml is the commented copy):

  [network]  pool = "10.213.0.0/16"   the /31s of sandboxes come from here
             gateway_port = 3128      the gateway's TCP port on each veth's host end
  [control]  socket = "/run/sandgate/control.sock"
             group = "sandgate"       members may use the control socket besides root;
                                      "" means root only. A group that does not exist
                                      also means root only: the daemon resolves the name
                                      when it binds the socket, not here.
  [paths]    state_dir, run_dir, policies_dir, audit_log, credentials_dir
  [gateway]  upstream_ca = PATH       optional; an existing PEM CA bundle
             resolve = { "HOST" = ["ADDR", ...] }   optional pins
             default_policy = "NAME"  optional; policies_dir/NAME.toml must exist.
                                      Absent: the built-in policy (no egress at all).
             processes = "auto"       processes serving the sandboxes' connections,
                                      1 to 8; "auto": one per CPU, at most 8
  [metrics]  socket = "/run/sandgate/metrics.sock"  (root only)
             listen = "127.0.0.1:PORT"  optional; loopback addresses only
  [limits]   max_sandboxes = 1000

Every path is absolute. Under systemd, LoadCredential= puts the credentials in
$CREDENTIALS_DIRECTORY, which wins over [paths] credentials_dir: see
`effective_credentials_dir`.

Line numbers come from gateway.policy's `_Locator` (tomllib reports positions only
for syntax errors), so a key's line is found the same way for policies and for this
file; keys inside inline tables fall back to the line of the enclosing key.
"""

from __future__ import annotations

import difflib
import os
import re
import ssl
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, ip_address
from pathlib import Path
from types import MappingProxyType
from typing import Any

from gateway.credentials import DEFAULT_CREDENTIALS_DIR

# Private helpers of gateway.policy, reused so that both files place their errors the
# same way (and name value types in the same words).
from gateway.policy import _Locator, _type_name, normalize_host
from gateway.shared import MAX_PROCESSES
from netns.addressing import DEFAULT_POOL, AddressError, validate_pool

from .config import DEFAULT_GATEWAY_PORT, RunnerConfig

IPAddress = IPv4Address | IPv6Address

DEFAULT_CONFIG_PATH = "/etc/sandgate/sandgate.toml"
DEFAULT_GROUP = "sandgate"
DEFAULT_MAX_SANDBOXES = 1000
MAX_GATEWAY_PROCESSES = MAX_PROCESSES

_RUNNER_DEFAULTS = RunnerConfig()

_SECTIONS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "network": ("pool", "gateway_port"),
        "control": ("socket", "group"),
        "paths": ("state_dir", "run_dir", "policies_dir", "audit_log", "credentials_dir"),
        "gateway": ("upstream_ca", "resolve", "default_policy", "processes"),
        "metrics": ("socket", "listen"),
        "limits": ("max_sandboxes",),
    }
)

# sockaddr_un.sun_path is 108 bytes, one of them the terminating NUL.
_SUN_PATH_MAX = 107
# Group names as shadow's groupadd accepts them on Debian (without the trailing '$'
# of machine accounts), at most 32 characters.
_GROUP_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")
_POLICY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_PORT = re.compile(r"[0-9]{1,5}")
_TOML_POSITION = re.compile(r"(?P<msg>.*) \(at line (?P<line>[0-9]+), column (?P<col>[0-9]+)\)$")


@dataclass(frozen=True)
class DaemonConfig:
    """What /etc/sandgate/sandgate.toml says; every default is the built-in value."""

    # [network]
    pool: IPv4Network = DEFAULT_POOL
    gateway_port: int = DEFAULT_GATEWAY_PORT
    # [control]
    control_socket: Path = Path("/run/sandgate/control.sock")
    # The group whose members may use the control socket besides root, by name; None:
    # root only. The daemon resolves it (a group that does not exist: root only).
    control_group: str | None = DEFAULT_GROUP
    # [paths]
    state_dir: Path = _RUNNER_DEFAULTS.state_dir
    run_dir: Path = _RUNNER_DEFAULTS.run_dir
    policies_dir: Path = Path("/etc/sandgate/policies")
    audit_log: Path = _RUNNER_DEFAULTS.audit_path
    credentials_dir: Path = Path(DEFAULT_CREDENTIALS_DIR)
    # [gateway]
    upstream_ca: Path | None = None
    # Normalised host -> the addresses the gateway uses for it (still checked against
    # the address rules, like any answer).
    resolve: Mapping[str, tuple[IPAddress, ...]] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )
    default_policy: str | None = None
    # None: "auto" (gateway_processes() decides)
    processes: int | None = None
    # [metrics]
    metrics_socket: Path = Path("/run/sandgate/metrics.sock")
    metrics_listen: tuple[str, int] | None = None  # (loopback address, port)
    # [limits]
    max_sandboxes: int = DEFAULT_MAX_SANDBOXES
    # The file this came from; None for the built-in configuration. Not compared.
    source: str | None = field(default=None, compare=False)

    def runner_config(self) -> RunnerConfig:
        """The runner's share of this configuration."""
        return RunnerConfig(
            pool=self.pool,
            gateway_port=self.gateway_port,
            state_dir=self.state_dir,
            run_dir=self.run_dir,
            audit_path=self.audit_log,
        )

    @property
    def default_policy_path(self) -> Path | None:
        """policies_dir/NAME.toml for `default_policy`; None: the built-in policy."""
        if self.default_policy is None:
            return None
        return self.policies_dir / f"{self.default_policy}.toml"

    def gateway_processes(self) -> int:
        """`processes`, with "auto" as one per CPU this process may run on, 1 to 8."""
        if self.processes is not None:
            return self.processes
        return max(1, min(MAX_GATEWAY_PROCESSES, len(os.sched_getaffinity(0))))

    def resolver_pins(self) -> dict[str, list[IPAddress]]:
        """`resolve` in the shape runner.gateway_thread.pinned_resolver takes."""
        return {host: list(addrs) for host, addrs in self.resolve.items()}


def effective_credentials_dir(
    config: DaemonConfig, environ: Mapping[str, str] | None = None
) -> str:
    """Where the upstream credentials are: $CREDENTIALS_DIRECTORY when set (systemd's
    LoadCredential= puts them there), else [paths] credentials_dir."""
    env = os.environ if environ is None else environ
    return env.get("CREDENTIALS_DIRECTORY") or str(config.credentials_dir)


# --- errors --------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with the file: where (line, column when known), which dotted
    key ("" for syntax errors and unreadable files), and what."""

    path: str
    line: int | None
    key: str
    message: str
    column: int | None = None

    def __str__(self) -> str:
        where = self.path
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class DaemonConfigError(Exception):
    """The configuration file is unusable. str() is every problem, one per line, in
    line order; `problems` lists them."""

    def __init__(self, problems: Sequence[ConfigProblem]) -> None:
        if not problems:
            raise ValueError("DaemonConfigError needs at least one problem")
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


# --- loading -------------------------------------------------------------------------


def load_daemon_config(path: str | os.PathLike, *, missing_ok: bool = True) -> DaemonConfig:
    """The configuration in the TOML file `path`.

    A file that does not exist gives the built-in configuration (every default), unless
    `missing_ok` is false (for a --config the operator named: a typo should not
    silently mean the defaults). Raises DaemonConfigError otherwise."""
    source = os.fspath(path)
    try:
        data = Path(source).read_bytes()
    except FileNotFoundError:
        if missing_ok:
            return DaemonConfig()
        raise DaemonConfigError([ConfigProblem(source, None, "", "no such file")]) from None
    except OSError as e:
        problem = ConfigProblem(source, None, "", f"cannot read: {e.strerror or e}")
        raise DaemonConfigError([problem]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DaemonConfigError([ConfigProblem(source, line, "", "not UTF-8 text")]) from None
    return parse_daemon_config(text, source)


def parse_daemon_config(text: str, source: str = "<string>") -> DaemonConfig:
    """The configuration `text` describes; DaemonConfigError with every problem."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise DaemonConfigError([_syntax_problem(str(e), source)]) from None
    v = _Validator(text, source)
    values = v.config(raw)
    if v.problems:
        problems = sorted(v.problems, key=lambda p: (p.line is None, p.line or 0))
        raise DaemonConfigError(problems)
    return DaemonConfig(**values, source=source)


def _syntax_problem(message: str, source: str) -> ConfigProblem:
    m = _TOML_POSITION.fullmatch(message)
    if m is None:
        return ConfigProblem(source, None, "", f"TOML syntax error: {message}")
    return ConfigProblem(
        source,
        int(m.group("line")),
        "",
        f"TOML syntax error: {m.group('msg')}",
        column=int(m.group("col")),
    )


_MISSING = object()


class _Validator:
    """Walks the parsed TOML, collecting every problem; returns DaemonConfig keyword
    arguments for the keys that were given and valid."""

    def __init__(self, text: str, source: str) -> None:
        self.source = source
        self.locator = _Locator(text)
        self.problems: list[ConfigProblem] = []

    def error(self, key: str, message: str, *, locate: str | None = None) -> None:
        line = self.locator.line_of(locate or key)
        self.problems.append(ConfigProblem(self.source, line, key, message))

    def config(self, raw: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        sections: dict[str, dict[str, Any]] = {}
        for name, value in raw.items():
            if name not in _SECTIONS:
                self.unknown_section(name, value)
            elif not isinstance(value, dict):
                self.error(name, f"expected a table ([{name}]), got {_type_name(value)}")
            else:
                self.unknown_keys(name, value)
                sections[name] = value
        network = sections.get("network", {})
        control = sections.get("control", {})
        paths = sections.get("paths", {})
        gateway = sections.get("gateway", {})
        metrics = sections.get("metrics", {})
        limits = sections.get("limits", {})

        self.put(out, "pool", self.pool(network))
        self.put(out, "gateway_port", self.port(network, "network", "gateway_port"))
        self.put(out, "control_socket", self.socket_path(control, "control"))
        self.put(out, "control_group", self.group(control))
        for key in _SECTIONS["paths"]:
            self.put(out, key, self.path(paths, "paths", key))
        self.put(out, "upstream_ca", self.upstream_ca(gateway))
        self.put(out, "resolve", self.resolve(gateway))
        # A policies_dir that is itself wrong has its error already: no file check then.
        bad_dir = "policies_dir" in paths and "policies_dir" not in out
        policies_dir = None if bad_dir else out.get("policies_dir", DaemonConfig.policies_dir)
        self.put(out, "default_policy", self.default_policy(gateway, policies_dir))
        self.put(out, "processes", self.processes(gateway))
        self.put(out, "metrics_socket", self.socket_path(metrics, "metrics"))
        self.put(out, "metrics_listen", self.listen(metrics))
        self.put(out, "max_sandboxes", self.integer(limits, "limits", "max_sandboxes", low=1))

        control_socket = out.get("control_socket", DaemonConfig.control_socket)
        if out.get("metrics_socket", DaemonConfig.metrics_socket) == control_socket:
            self.error(
                "metrics.socket",
                f"{str(control_socket)!r} \N{EM DASH} the same path as control.socket; "
                "the metrics socket needs a path of its own",
            )
        return out

    @staticmethod
    def put(out: dict[str, Any], key: str, value: object) -> None:
        if value is not _MISSING:
            out[key] = value

    # shapes

    def unknown_section(self, name: str, value: object) -> None:
        owner = [s for s, keys in _SECTIONS.items() if name in keys]
        if owner and not isinstance(value, dict):
            hint = f" (it belongs in {' or '.join(f'[{o}]' for o in owner)})"
        else:
            close = difflib.get_close_matches(name, list(_SECTIONS), n=1)
            hint = f" (did you mean [{close[0]}]?)" if close else ""
        self.error(name, f"unknown section or key {name!r}{hint}; sections: {', '.join(_SECTIONS)}")

    def unknown_keys(self, section: str, table: dict[str, Any]) -> None:
        keys = _SECTIONS[section]
        for key in table:
            if key in keys:
                continue
            owner = [s for s, names in _SECTIONS.items() if key in names]
            close = difflib.get_close_matches(key, keys, n=1)
            if owner:
                hint = f" (it belongs in {' or '.join(f'[{o}]' for o in owner)})"
            else:
                hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.error(
                f"{section}.{key}",
                f"unknown key {key!r}{hint}; allowed in [{section}]: {', '.join(keys)}",
            )

    def string(self, table: dict[str, Any], section: str, key: str) -> object:
        value = table.get(key, _MISSING)
        if value is _MISSING:
            return _MISSING
        if not isinstance(value, str):
            self.error(f"{section}.{key}", f"expected a string, got {_type_name(value)}")
            return _MISSING
        return value

    def processes(self, gateway: dict[str, Any]) -> object:
        value = gateway.get("processes", _MISSING)
        if value is _MISSING or value == "auto":
            return _MISSING
        if not isinstance(value, int) or isinstance(value, bool):
            self.error(
                "gateway.processes",
                f'expected an integer from 1 to {MAX_GATEWAY_PROCESSES} or "auto", '
                f"got {_type_name(value)}",
            )
            return _MISSING
        if not 1 <= value <= MAX_GATEWAY_PROCESSES:
            self.error(
                "gateway.processes",
                f'{value!r} \N{EM DASH} must be from 1 to {MAX_GATEWAY_PROCESSES}, or "auto"',
            )
            return _MISSING
        return value

    def integer(self, table: dict[str, Any], section: str, key: str, *, low: int) -> object:
        value = table.get(key, _MISSING)
        if value is _MISSING:
            return _MISSING
        if not isinstance(value, int) or isinstance(value, bool):
            self.error(f"{section}.{key}", f"expected an integer, got {_type_name(value)}")
            return _MISSING
        if value < low:
            self.error(f"{section}.{key}", f"{value!r} \N{EM DASH} must be at least {low}")
            return _MISSING
        return value

    def path(self, table: dict[str, Any], section: str, key: str) -> object:
        value = self.string(table, section, key)
        if value is _MISSING:
            return _MISSING
        assert isinstance(value, str)
        if "\0" in value:
            self.error(f"{section}.{key}", f"{value!r} \N{EM DASH} a path has no NUL character")
            return _MISSING
        if not os.path.isabs(value):
            self.error(f"{section}.{key}", f"{value!r} \N{EM DASH} must be an absolute path")
            return _MISSING
        return Path(os.path.normpath(value))

    # keys

    def pool(self, network: dict[str, Any]) -> object:
        value = self.string(network, "network", "pool")
        if value is _MISSING:
            return _MISSING
        assert isinstance(value, str)
        try:
            pool = IPv4Network(value, strict=True)
        except ValueError as e:
            self.error("network.pool", f"{value!r} is not a CIDR: {e}")
            return _MISSING
        try:
            validate_pool(pool)
        except AddressError as e:
            self.error("network.pool", f"{value!r} \N{EM DASH} {e}")
            return _MISSING
        return pool

    def port(self, table: dict[str, Any], section: str, key: str) -> object:
        value = self.integer(table, section, key, low=1)
        if isinstance(value, int) and value > 65535:
            self.error(f"{section}.{key}", f"{value!r} \N{EM DASH} a port is in 1..65535")
            return _MISSING
        return value

    def socket_path(self, table: dict[str, Any], section: str) -> object:
        value = self.path(table, section, "socket")
        if isinstance(value, Path) and len(os.fsencode(value)) > _SUN_PATH_MAX:
            self.error(
                f"{section}.socket",
                f"{str(value)!r} \N{EM DASH} {len(os.fsencode(value))} bytes long; a unix "
                f"socket path has at most {_SUN_PATH_MAX}",
            )
            return _MISSING
        return value

    def group(self, control: dict[str, Any]) -> object:
        value = self.string(control, "control", "group")
        if value is _MISSING:
            return _MISSING
        if value == "":
            return None
        assert isinstance(value, str)
        if not _GROUP_NAME.fullmatch(value) or value.isdigit():
            self.error(
                "control.group",
                f"{value!r} \N{EM DASH} not a group name (letters, digits, '_', '.', '-', "
                'at most 32, not starting with a digit); "" means root only',
            )
            return _MISSING
        return value

    def upstream_ca(self, gateway: dict[str, Any]) -> object:
        value = self.path(gateway, "gateway", "upstream_ca")
        if value is _MISSING:
            return _MISSING
        assert isinstance(value, Path)
        if not value.is_file():
            why = "no such file" if not value.exists() else "not a regular file"
            self.error("gateway.upstream_ca", f"{str(value)!r} \N{EM DASH} {why}")
            return _MISSING
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=value)
        except (OSError, ssl.SSLError) as e:
            self.error(
                "gateway.upstream_ca",
                f"{str(value)!r} \N{EM DASH} not a usable PEM CA bundle: {e}",
            )
            return _MISSING
        return value

    def resolve(self, gateway: dict[str, Any]) -> object:
        raw = gateway.get("resolve", _MISSING)
        if raw is _MISSING:
            return _MISSING
        if not isinstance(raw, dict):
            self.error(
                "gateway.resolve",
                f'expected a table of "HOST" = ["ADDR", ...], got {_type_name(raw)}',
            )
            return _MISSING
        pins: dict[str, tuple[IPAddress, ...]] = {}
        first_key: dict[str, str] = {}
        ok = True
        for host, addrs in raw.items():
            key = f"gateway.resolve.{host}"
            if isinstance(addrs, dict):
                # `github.com = [...]` is the dotted key github -> com in TOML.
                dotted = _first_leaf(host, addrs)
                self.error(
                    key,
                    f"expected an array of addresses, got a table; quote a host name "
                    f'that has dots: "{dotted}" = [...]',
                    locate=f"gateway.resolve.{dotted}",
                )
                ok = False
                continue
            try:
                name = normalize_host(host)
            except ValueError as e:
                self.error(key, str(e))
                ok = False
                name = None
            addresses = self.addresses(addrs, key)
            if name is None or addresses is None:
                ok = False
                continue
            if name in pins:
                self.error(key, f"{host!r} \N{EM DASH} the same host as {first_key[name]!r}")
                ok = False
                continue
            pins[name] = addresses
            first_key[name] = host
        return MappingProxyType(pins) if ok else _MISSING

    def addresses(self, addrs: object, key: str) -> tuple[IPAddress, ...] | None:
        if not isinstance(addrs, list):
            self.error(
                key, f'expected an array of addresses ["ADDR", ...], got {_type_name(addrs)}'
            )
            return None
        if not addrs:
            self.error(key, "expected at least one address")
            return None
        out: list[IPAddress] = []
        for i, addr in enumerate(addrs):
            if not isinstance(addr, str):
                self.error(f"{key}[{i}]", f"expected a string, got {_type_name(addr)}")
                return None
            try:
                out.append(ip_address(addr))
            except ValueError:
                self.error(f"{key}[{i}]", f"{addr!r} \N{EM DASH} not an IPv4 or IPv6 address")
                return None
        return tuple(out)

    def default_policy(self, gateway: dict[str, Any], policies_dir: Path | None) -> object:
        value = self.string(gateway, "gateway", "default_policy")
        if value is _MISSING:
            return _MISSING
        assert isinstance(value, str)
        if not _POLICY_NAME.fullmatch(value) or value.endswith(".toml"):
            hint = (
                f"; write {value.removesuffix('.toml')!r}"
                if value.endswith(".toml") and _POLICY_NAME.fullmatch(value)
                else ""
            )
            self.error(
                "gateway.default_policy",
                f"{value!r} \N{EM DASH} a policy name: the file NAME.toml in "
                f"{policies_dir or 'paths.policies_dir'}, without the .toml{hint}",
            )
            return _MISSING
        if policies_dir is None:
            return value
        file = policies_dir / f"{value}.toml"
        if not file.is_file():
            self.error(
                "gateway.default_policy",
                f"{value!r} \N{EM DASH} no policy file {file}",
            )
            return _MISSING
        return value

    def listen(self, metrics: dict[str, Any]) -> object:
        value = self.string(metrics, "metrics", "listen")
        if value is _MISSING:
            return _MISSING
        assert isinstance(value, str)
        try:
            return _parse_listen(value)
        except ValueError as e:
            self.error("metrics.listen", f"{value!r} \N{EM DASH} {e}")
            return _MISSING


def _first_leaf(prefix: str, value: object) -> str:
    while isinstance(value, dict) and value:
        key, value = next(iter(value.items()))
        prefix = f"{prefix}.{key}"
    return prefix


def _parse_listen(text: str) -> tuple[str, int]:
    """("127.0.0.1", 9100) from "127.0.0.1:9100" ("[::1]:9100" for IPv6); loopback only."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError('expected "127.0.0.1:PORT"')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError('write an IPv6 address in brackets: "[::1]:PORT"')
    try:
        addr = ip_address(host)
    except ValueError:
        raise ValueError(f'{host!r} is not an IP address; expected "127.0.0.1:PORT"') from None
    if not addr.is_loopback:
        raise ValueError(
            "only a loopback address (127.0.0.0/8 or [::1]): the metrics stay on this host"
        )
    if not _PORT.fullmatch(port) or not 1 <= int(port) <= 65535:
        raise ValueError(f"port {port!r} is not in 1..65535")
    return str(addr), int(port)
