"""runner.daemon_config: /etc/sandgate/sandgate.toml (defaults, every key, every error
as FILE:LINE: key: message, all at once), and the files in scripts/systemd."""

from __future__ import annotations

import os
import re
from ipaddress import IPv4Network, ip_address
from pathlib import Path

import pytest

from runner import seccomp
from runner.config import RunnerConfig
from runner.daemon_config import (
    DEFAULT_CONFIG_PATH,
    DaemonConfig,
    DaemonConfigError,
    effective_credentials_dir,
    load_daemon_config,
    parse_daemon_config,
)
from tests.testca import make_test_ca

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_TOML = ROOT / "scripts" / "systemd" / "sandgate.toml"
UNIT = ROOT / "scripts" / "systemd" / "sandgate.service"
EM = "\N{EM DASH}"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sandgate.toml"
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    """Every problem, as "LINE: key: message" (the file name taken off)."""
    path = write(tmp_path, text)
    with pytest.raises(DaemonConfigError) as e:
        load_daemon_config(path)
    prefix = f"{path}:"
    lines = str(e.value).splitlines()
    assert all(line.startswith(prefix) for line in lines), lines
    assert len(lines) == len(e.value.problems)
    return [line[len(prefix) :] for line in lines]


def only_problem(tmp_path: Path, text: str) -> str:
    (problem,) = problems(tmp_path, text)
    return problem


# --- defaults ------------------------------------------------------------------------


def test_a_missing_file_is_the_built_in_configuration(tmp_path: Path) -> None:
    config = load_daemon_config(tmp_path / "nope.toml")
    assert config == DaemonConfig()
    assert config.source is None


def test_a_missing_file_named_on_purpose_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DaemonConfigError) as e:
        load_daemon_config(tmp_path / "nope.toml", missing_ok=False)
    assert str(e.value) == f"{tmp_path / 'nope.toml'}: no such file"


def test_the_defaults() -> None:
    c = DaemonConfig()
    assert c.pool == IPv4Network("10.213.0.0/16")
    assert c.gateway_port == 3128
    assert c.control_socket == Path("/run/sandgate/control.sock")
    assert c.control_group == "sandgate"
    assert c.state_dir == Path("/var/lib/sandgate")
    assert c.run_dir == Path("/run/sandgate")
    assert c.policies_dir == Path("/etc/sandgate/policies")
    assert c.audit_log == Path("/var/log/sandgate/audit.jsonl")
    assert c.credentials_dir == Path("/etc/sandgate/credentials")
    assert c.upstream_ca is None
    assert dict(c.resolve) == {}
    assert c.default_policy is None and c.default_policy_path is None
    assert c.metrics_socket == Path("/run/sandgate/metrics.sock")
    assert c.metrics_listen is None
    assert c.max_sandboxes == 1000
    assert DEFAULT_CONFIG_PATH == "/etc/sandgate/sandgate.toml"


def test_an_empty_file_and_empty_sections_are_the_defaults(tmp_path: Path) -> None:
    assert load_daemon_config(write(tmp_path, "")) == DaemonConfig()
    sections = "[network]\n[control]\n[paths]\n[gateway]\n[metrics]\n[limits]\n"
    config = load_daemon_config(write(tmp_path, sections))
    assert config == DaemonConfig()
    assert config.source == str(tmp_path / "sandgate.toml")


def test_runner_config_takes_pool_port_and_paths() -> None:
    c = DaemonConfig(
        pool=IPv4Network("10.50.0.0/20"),
        gateway_port=8080,
        state_dir=Path("/srv/sg/state"),
        run_dir=Path("/run/sg"),
        audit_log=Path("/srv/sg/audit.jsonl"),
    )
    assert c.runner_config() == RunnerConfig(
        pool=IPv4Network("10.50.0.0/20"),
        gateway_port=8080,
        state_dir=Path("/srv/sg/state"),
        run_dir=Path("/run/sg"),
        audit_path=Path("/srv/sg/audit.jsonl"),
    )
    assert DaemonConfig().runner_config() == RunnerConfig()


def test_credentials_directory_from_systemd_wins() -> None:
    c = DaemonConfig(credentials_dir=Path("/srv/creds"))
    assert effective_credentials_dir(c, {}) == "/srv/creds"
    assert effective_credentials_dir(c, {"CREDENTIALS_DIRECTORY": ""}) == "/srv/creds"
    env = {"CREDENTIALS_DIRECTORY": "/run/credentials/sandgate.service"}
    assert effective_credentials_dir(c, env) == "/run/credentials/sandgate.service"


def test_credentials_directory_reads_the_process_environment(monkeypatch) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "/run/credentials/x.service")
    assert effective_credentials_dir(DaemonConfig()) == "/run/credentials/x.service"
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    assert effective_credentials_dir(DaemonConfig()) == "/etc/sandgate/credentials"


# --- every key -----------------------------------------------------------------------


def test_every_key(tmp_path: Path) -> None:
    ca = make_test_ca(tmp_path, tmp_path, ["upstream.example"])
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "ci.toml").write_text("")
    text = f"""\
[network]
pool = "10.99.0.0/24"
gateway_port = 8888

[control]
socket = "/run/sg/ctl.sock"
group = "wheel"

[paths]
state_dir = "/srv/sandgate/state"
run_dir = "/run/sg"
policies_dir = "{policies}"
audit_log = "/srv/sandgate/log/audit.jsonl"
credentials_dir = "/srv/sandgate/creds"

[gateway]
upstream_ca = "{ca.ca_cert}"
default_policy = "ci"

[gateway.resolve]
"GitHub.com." = ["140.82.112.3", "2606:50c0:8000::154"]
"git.internal.example" = ["192.0.2.10"]

[metrics]
socket = "/run/sg/metrics.sock"
listen = "127.0.0.1:9464"

[limits]
max_sandboxes = 5
"""
    c = load_daemon_config(write(tmp_path, text))
    assert c.pool == IPv4Network("10.99.0.0/24")
    assert c.gateway_port == 8888
    assert c.control_socket == Path("/run/sg/ctl.sock")
    assert c.control_group == "wheel"
    assert c.state_dir == Path("/srv/sandgate/state")
    assert c.run_dir == Path("/run/sg")
    assert c.policies_dir == policies
    assert c.audit_log == Path("/srv/sandgate/log/audit.jsonl")
    assert c.credentials_dir == Path("/srv/sandgate/creds")
    assert c.upstream_ca == ca.ca_cert
    assert c.default_policy == "ci"
    assert c.default_policy_path == policies / "ci.toml"
    assert dict(c.resolve) == {
        "github.com": (ip_address("140.82.112.3"), ip_address("2606:50c0:8000::154")),
        "git.internal.example": (ip_address("192.0.2.10"),),
    }
    assert c.resolver_pins()["github.com"] == [
        ip_address("140.82.112.3"),
        ip_address("2606:50c0:8000::154"),
    ]
    assert c.metrics_socket == Path("/run/sg/metrics.sock")
    assert c.metrics_listen == ("127.0.0.1", 9464)
    assert c.max_sandboxes == 5


def test_resolve_as_an_inline_table_and_ipv6_metrics(tmp_path: Path) -> None:
    text = """\
[gateway]
resolve = { "a.example" = ["::1"] }
[metrics]
listen = "[::1]:9000"
"""
    c = load_daemon_config(write(tmp_path, text))
    assert dict(c.resolve) == {"a.example": (ip_address("::1"),)}
    assert c.metrics_listen == ("::1", 9000)


def test_an_empty_group_means_root_only(tmp_path: Path) -> None:
    c = load_daemon_config(write(tmp_path, '[control]\ngroup = ""\n'))
    assert c.control_group is None


def test_a_group_that_does_not_exist_is_accepted(tmp_path: Path) -> None:
    # Resolved by the daemon when it binds the socket: an unknown group is root only.
    c = load_daemon_config(write(tmp_path, '[control]\ngroup = "no-such-group-here"\n'))
    assert c.control_group == "no-such-group-here"


def test_paths_are_normalised(tmp_path: Path) -> None:
    c = load_daemon_config(write(tmp_path, '[paths]\nstate_dir = "/var/lib//sandgate/"\n'))
    assert c.state_dir == Path("/var/lib/sandgate")


def test_the_default_policy_is_looked_up_in_the_configured_policies_dir(
    tmp_path: Path,
) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "build.toml").write_text("")
    # [gateway] before [paths]: the order of the sections does not matter.
    text = f'[gateway]\ndefault_policy = "build"\n[paths]\npolicies_dir = "{tmp_path}/p"\n'
    assert load_daemon_config(write(tmp_path, text)).default_policy == "build"


# --- errors: one of each kind, placed at FILE:LINE with the dotted key ----------------


def test_the_message_names_file_line_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, '# a comment\n\n[network]\n\n\n\npool = "10.0.0.0/33"\n')
    with pytest.raises(DaemonConfigError) as e:
        load_daemon_config(path)
    assert str(e.value).startswith(f"{path}:7: network.pool: '10.0.0.0/33' is not a CIDR")
    (p,) = e.value.problems
    assert (p.path, p.line, p.key) == (str(path), 7, "network.pool")


def test_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, '[network]\npool = "10.213.0.0/16\n')
    assert re.fullmatch(r"2:[0-9]+: TOML syntax error: .+", problem), problem


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "sandgate.toml"
    path.write_bytes(b"[network]\n# caf\xe9\n")
    with pytest.raises(DaemonConfigError) as e:
        load_daemon_config(path)
    assert str(e.value) == f"{path}:2: not UTF-8 text"


def test_unreadable(tmp_path: Path) -> None:
    with pytest.raises(DaemonConfigError) as e:
        load_daemon_config(tmp_path)  # a directory
    assert str(e.value).startswith(f"{tmp_path}: cannot read: ")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "[netwrok]\n",
            "1: netwrok: unknown section or key 'netwrok' (did you mean [network]?); "
            "sections: network, control, paths, gateway, metrics, limits",
        ),
        (
            'pool = "10.1.0.0/16"\n',
            "1: pool: unknown section or key 'pool' (it belongs in [network]); "
            "sections: network, control, paths, gateway, metrics, limits",
        ),
        (
            "[network]\n\ngatway_port = 1\n",
            "3: network.gatway_port: unknown key 'gatway_port' (did you mean 'gateway_port'?); "
            "allowed in [network]: pool, gateway_port",
        ),
        (
            '[limits]\nsocket = "/x"\n',
            "2: limits.socket: unknown key 'socket' (it belongs in [control] or [metrics]); "
            "allowed in [limits]: max_sandboxes",
        ),
        ("network = 3\n", "1: network: expected a table ([network]), got an integer"),
    ],
)
def test_unknown_sections_and_keys(tmp_path: Path, text: str, expected: str) -> None:
    assert only_problem(tmp_path, text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[network]\ngateway_port = "3128"\n',
            "2: network.gateway_port: expected an integer, got a string",
        ),
        (
            "[limits]\nmax_sandboxes = true\n",
            "2: limits.max_sandboxes: expected an integer, got a boolean",
        ),
        (
            "[limits]\nmax_sandboxes = 1.5\n",
            "2: limits.max_sandboxes: expected an integer, got a float",
        ),
        ("[network]\npool = 10\n", "2: network.pool: expected a string, got an integer"),
        ("[control]\ngroup = false\n", "2: control.group: expected a string, got a boolean"),
        ('[paths]\nstate_dir = ["/a"]\n', "2: paths.state_dir: expected a string, got an array"),
        ("[metrics]\nlisten = 9464\n", "2: metrics.listen: expected a string, got an integer"),
        (
            '[gateway]\nresolve = "a.example=1.2.3.4"\n',
            '2: gateway.resolve: expected a table of "HOST" = ["ADDR", ...], got a string',
        ),
        (
            '[gateway]\nresolve = { "a.example" = "1.2.3.4" }\n',
            '2: gateway.resolve.a.example: expected an array of addresses ["ADDR", ...], '
            "got a string",
        ),
    ],
)
def test_wrong_types(tmp_path: Path, text: str, expected: str) -> None:
    assert only_problem(tmp_path, text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[network]\npool = "10.213.0.1/16"\n',
            "2: network.pool: '10.213.0.1/16' is not a CIDR: 10.213.0.1/16 has host bits set",
        ),
        (
            '[network]\npool = "fd00::/64"\n',
            "2: network.pool: 'fd00::/64' is not a CIDR: ",
        ),
        (
            '[network]\npool = "10.0.0.0/8"\n',
            f"2: network.pool: '10.0.0.0/8' {EM} address pool 10.0.0.0/8: prefix length must "
            "be between /16 and /30",
        ),
        ("[network]\ngateway_port = 0\n", f"2: network.gateway_port: 0 {EM} must be at least 1"),
        (
            "[network]\ngateway_port = 65536\n",
            f"2: network.gateway_port: 65536 {EM} a port is in 1..65535",
        ),
        ("[limits]\nmax_sandboxes = 0\n", f"2: limits.max_sandboxes: 0 {EM} must be at least 1"),
        (
            '[paths]\nrun_dir = "run/sandgate"\n',
            f"2: paths.run_dir: 'run/sandgate' {EM} must be an absolute path",
        ),
        (
            '[paths]\naudit_log = "/var/log/\\u0000x"\n',
            f"2: paths.audit_log: '/var/log/\\x00x' {EM} a path has no NUL character",
        ),
        (
            f'[control]\nsocket = "/run/{"s" * 120}.sock"\n',
            f"2: control.socket: '/run/{'s' * 120}.sock' {EM} 130 bytes long; a unix socket "
            "path has at most 107",
        ),
        (
            '[metrics]\nsocket = "/run/sandgate/control.sock"\n',
            f"2: metrics.socket: '/run/sandgate/control.sock' {EM} the same path as "
            "control.socket; the metrics socket needs a path of its own",
        ),
        ('[control]\ngroup = "1234"\n', f"2: control.group: '1234' {EM} not a group name"),
        ('[control]\ngroup = "a b"\n', f"2: control.group: 'a b' {EM} not a group name"),
        (
            '[gateway]\nupstream_ca = "/nonexistent/ca.pem"\n',
            f"2: gateway.upstream_ca: '/nonexistent/ca.pem' {EM} no such file",
        ),
        (
            '[gateway]\nupstream_ca = "/"\n',
            f"2: gateway.upstream_ca: '/' {EM} not a regular file",
        ),
        (
            '[gateway]\ndefault_policy = "../x"\n',
            f"2: gateway.default_policy: '../x' {EM} a policy name: the file NAME.toml in "
            "/etc/sandgate/policies, without the .toml",
        ),
        (
            '[gateway]\ndefault_policy = "ci.toml"\n',
            f"2: gateway.default_policy: 'ci.toml' {EM} a policy name: the file NAME.toml in "
            "/etc/sandgate/policies, without the .toml; write 'ci'",
        ),
        (
            '[gateway]\ndefault_policy = "surely-not-there"\n',
            f"2: gateway.default_policy: 'surely-not-there' {EM} no policy file "
            "/etc/sandgate/policies/surely-not-there.toml",
        ),
        (
            '[metrics]\nlisten = "0.0.0.0:9464"\n',
            f"2: metrics.listen: '0.0.0.0:9464' {EM} only a loopback address",
        ),
        (
            '[metrics]\nlisten = "::1:9464"\n',
            f"2: metrics.listen: '::1:9464' {EM} write an IPv6 address in brackets",
        ),
        (
            '[metrics]\nlisten = "127.0.0.1:0"\n',
            f"2: metrics.listen: '127.0.0.1:0' {EM} port '0' is not in 1..65535",
        ),
        (
            '[metrics]\nlisten = "localhost:9464"\n',
            f"2: metrics.listen: 'localhost:9464' {EM} 'localhost' is not an IP address",
        ),
        ('[metrics]\nlisten = "9464"\n', f"2: metrics.listen: '9464' {EM} expected"),
    ],
)
def test_bad_values(tmp_path: Path, text: str, expected: str) -> None:
    assert only_problem(tmp_path, text).startswith(expected)


def test_upstream_ca_that_is_not_pem(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    problem = only_problem(tmp_path, f'[gateway]\nupstream_ca = "{bad}"\n')
    assert problem.startswith(f"2: gateway.upstream_ca: '{bad}' {EM} not a usable PEM CA bundle: ")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[gateway.resolve]\n\ngithub.com = ["1.2.3.4"]\n',
            "3: gateway.resolve.github: expected an array of addresses, got a table; quote a "
            'host name that has dots: "github.com" = [...]',
        ),
        (
            '[gateway.resolve]\n"bad_host!" = ["1.2.3.4"]\n',
            "2: gateway.resolve.bad_host!: 'bad_host!'",
        ),
        (
            '[gateway.resolve]\n"1.2.3.4" = ["1.2.3.4"]\n',
            "2: gateway.resolve.1.2.3.4: '1.2.3.4'",
        ),
        (
            '[gateway.resolve]\n"a.example" = []\n',
            "2: gateway.resolve.a.example: expected at least one address",
        ),
        (
            '[gateway.resolve]\n"a.example" = ["1.2.3.4", "1.2.3"]\n',
            f"2: gateway.resolve.a.example[1]: '1.2.3' {EM} not an IPv4 or IPv6 address",
        ),
        (
            '[gateway.resolve]\n"a.example" = [1]\n',
            "2: gateway.resolve.a.example[0]: expected a string, got an integer",
        ),
        (
            '[gateway.resolve]\n"a.example" = ["1.2.3.4"]\n"A.Example." = ["1.2.3.5"]\n',
            f"3: gateway.resolve.A.Example.: 'A.Example.' {EM} the same host as 'a.example'",
        ),
    ],
)
def test_bad_resolve_pins(tmp_path: Path, text: str, expected: str) -> None:
    assert only_problem(tmp_path, text).startswith(expected)


def test_a_bad_policies_dir_is_one_error_not_two(tmp_path: Path) -> None:
    text = '[paths]\npolicies_dir = "policies"\n[gateway]\ndefault_policy = "ci"\n'
    assert problems(tmp_path, text) == [
        f"2: paths.policies_dir: 'policies' {EM} must be an absolute path"
    ]


def test_every_error_is_reported_at_once_in_line_order(tmp_path: Path) -> None:
    text = """\
[limits]
max_sandboxes = 0

[network]
pool = "10.0.0.0/33"
gateway_port = "x"

[control]
sockt = "/run/x"

[gateway]
default_policy = "ci.toml"
resolve = { "a.example" = ["nope"] }

[metrics]
listen = "192.0.2.1:80"

[extra]
"""
    found = problems(tmp_path, text)
    assert [p.split(":", 2)[:2] for p in found] == [
        ["2", " limits.max_sandboxes"],
        ["5", " network.pool"],
        ["6", " network.gateway_port"],
        ["9", " control.sockt"],
        ["12", " gateway.default_policy"],
        ["13", " gateway.resolve.a.example[0]"],
        ["16", " metrics.listen"],
        ["18", " extra"],
    ]


def test_gateway_processes() -> None:
    assert parse_daemon_config("[gateway]\nprocesses = 3\n").gateway_processes() == 3
    auto = parse_daemon_config('[gateway]\nprocesses = "auto"\n')
    assert auto == DaemonConfig()
    assert auto.gateway_processes() == max(1, min(8, len(os.sched_getaffinity(0))))
    for value, message in (
        ("0", f'0 {EM} must be from 1 to 8, or "auto"'),
        ("9", f'9 {EM} must be from 1 to 8, or "auto"'),
        ('"many"', 'expected an integer from 1 to 8 or "auto", got a string'),
        ("true", 'expected an integer from 1 to 8 or "auto", got a boolean'),
    ):
        with pytest.raises(DaemonConfigError) as e:
            parse_daemon_config(f"[gateway]\nprocesses = {value}\n")
        assert str(e.value) == f"<string>:2: gateway.processes: {message}", value


def test_parse_without_a_file_names_the_string() -> None:
    with pytest.raises(DaemonConfigError) as e:
        parse_daemon_config("[limits]\nmax_sandboxes = -1\n")
    assert str(e.value) == f"<string>:2: limits.max_sandboxes: -1 {EM} must be at least 1"


def test_an_error_needs_a_problem() -> None:
    with pytest.raises(ValueError):
        DaemonConfigError([])


# --- scripts/systemd -----------------------------------------------------------------


def test_the_shipped_config_is_the_defaults() -> None:
    config = load_daemon_config(SHIPPED_TOML, missing_ok=False)
    assert config == DaemonConfig()


def test_the_shipped_config_shows_the_true_defaults(tmp_path: Path) -> None:
    """Uncommenting every `#key = value` line changes nothing: the values shown are
    the defaults, and every key with a default is shown."""
    text = SHIPPED_TOML.read_text()
    uncommented = re.sub(r"(?m)^#(?=[a-z_]+ = )", "", text)
    shown = re.findall(r"(?m)^([a-z_]+) = ", uncommented)
    assert sorted(shown) == sorted(
        [
            "pool",
            "gateway_port",
            "socket",
            "group",
            "state_dir",
            "run_dir",
            "policies_dir",
            "audit_log",
            "credentials_dir",
            "socket",
            "max_sandboxes",
            "processes",
        ]
    )
    assert load_daemon_config(write(tmp_path, uncommented)) == DaemonConfig()
    # The keys without a default are there too, as examples.
    for key in ("upstream_ca", "default_policy", "listen", "[gateway.resolve]"):
        assert re.search(rf"(?m)^# (e\.g\. )?{re.escape(key)}", text), key


def _unit_values(key: str) -> list[str]:
    return [
        line.split("=", 1)[1]
        for line in UNIT.read_text().splitlines()
        if line.startswith(f"{key}=")
    ]


# systemd 252's groups (`systemd-analyze syscall-filter @clock ...`), less the calls
# that exist on neither architecture the sandbox filter supports (x86_64, aarch64):
# clock_*64, pciconfig_*, rtas, s390_*, sys_debug_setcontext.
_SYSTEMD_GROUPS = {
    "@clock": ("adjtimex", "clock_adjtime", "clock_settime", "settimeofday"),
    "@debug": ("lookup_dcookie", "perf_event_open", "pidfd_getfd", "ptrace"),
    "@raw-io": ("ioperm", "iopl"),
    "@reboot": ("kexec_file_load", "kexec_load", "reboot"),
    "@swap": ("swapoff", "swapon"),
}


def test_unit_syscall_filter_denies_only_what_the_sandbox_filter_denies() -> None:
    """systemd's filters are inherited by every sandbox: each call the unit denies must
    already be denied by runner/seccomp.py, with the same errno (EPERM)."""
    lines = _unit_values("SystemCallFilter")
    assert lines
    denied: list[str] = []
    for entries in lines:
        assert entries.startswith("~"), "a deny list only"
        for entry in entries[1:].split():
            assert not entry.startswith("@") or entry in _SYSTEMD_GROUPS, entry
            denied += _SYSTEMD_GROUPS.get(entry, (entry,))
    assert set(denied) <= set(seccomp.DENIED_SYSCALLS)
    assert _unit_values("SystemCallErrorNumber") == ["EPERM"]


def test_unit_address_families_deny_only_what_the_sandbox_filter_denies() -> None:
    import socket

    (entries,) = _unit_values("RestrictAddressFamilies")
    assert entries.startswith("~")
    families = {getattr(socket, name) for name in entries[1:].split()}
    assert families <= set(seccomp.DENIED_SOCKET_FAMILIES)


# Settings that give the service a mount namespace, or filters every sandbox would
# inherit that take away what a sandbox may do: the comments say why each stays off.
_NEVER_IN_THE_UNIT = (
    "ProtectSystem",
    "ProtectHome",
    "PrivateTmp",
    "PrivateDevices",
    "PrivateMounts",
    "PrivateNetwork",
    "PrivateUsers",
    "PrivateIPC",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectKernelLogs",
    "ProtectControlGroups",
    "ProtectProc",
    "ProcSubset",
    "ProtectHostname",
    "ProtectClock",
    "ReadWritePaths",
    "ReadOnlyPaths",
    "InaccessiblePaths",
    "TemporaryFileSystem",
    "BindPaths",
    "BindReadOnlyPaths",
    "MountFlags",
    "RestrictNamespaces",
    "LockPersonality",
    "MemoryDenyWriteExecute",
    "RestrictSUIDSGID",
    "DevicePolicy",
    "DeviceAllow",
    "IPAddressDeny",
    "DynamicUser",
    "User",
)


def test_unit_keeps_namespaces_and_sandboxes_working() -> None:
    for key in _NEVER_IN_THE_UNIT:
        assert not _unit_values(key), f"{key}= must stay off (see the unit's comments)"
    assert _unit_values("KillMode") == ["process"]
    assert _unit_values("Delegate") == ["yes"]
    assert _unit_values("RuntimeDirectoryPreserve") == ["yes"]
    assert _unit_values("ExecStart") == [
        "/usr/local/bin/sandgate serve --config /etc/sandgate/sandgate.toml"
    ]
