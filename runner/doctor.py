"""`sandgate doctor`: can this host run sandboxes, and if not, what exactly to fix.

Each check is a small function returning a Check. Probes that need kernel objects
make them inside a throwaway network namespace and remove them before returning.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from ipaddress import IPv4Network

from .config import RunnerConfig


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | warn | fail | info
    detail: str
    fix: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def _ok(name: str, detail: str) -> Check:
    return Check(name, "ok", detail)


def _fail(name: str, detail: str, fix: str) -> Check:
    return Check(name, "fail", detail, fix)


def check_root() -> Check:
    if os.geteuid() == 0:
        return _ok("privileges", "running as root")
    return _fail(
        "privileges",
        f"running as uid {os.geteuid()}; namespaces and nftables need root",
        "run sandgate as root (sudo sandgate ...)",
    )


def check_modules() -> list[Check]:
    wanted = {
        "pyroute2": "pip install pyroute2 (scripts/install does this)",
        "nftables": "apt-get install python3-nftables, and make the venv with "
        "--system-site-packages (scripts/install does this)",
        "cffi": "pip install cffi",
        "iptc": "pip install python-iptables (only for the legacy-xtables backstop)",
    }
    out = []
    for mod, fix in wanted.items():
        try:
            importlib.import_module(mod)
            out.append(_ok(f"python module {mod}", "imports"))
        except Exception as exc:  # an import can fail in many ways (missing .so, ...)
            status = "warn" if mod == "iptc" else "fail"
            out.append(Check(f"python module {mod}", status, f"does not import: {exc}", fix))
    return out


def check_tools() -> list[Check]:
    out = []
    for tool, why, pkg in (
        ("git", "git gateway tests and sandboxed git", "git"),
        ("nft", "inspecting the ruleset by hand", "nftables"),
    ):
        path = shutil.which(tool)
        if path:
            out.append(_ok(f"tool {tool}", path))
        else:
            out.append(
                Check(f"tool {tool}", "warn", f"not found ({why})", f"apt-get install {pkg}")
            )
    return out


@contextlib.contextmanager
def _probe_netns() -> Iterator[str]:
    from pyroute2 import netns as pr_netns

    name = f"sgtest-doctor{secrets.token_hex(3)}"
    pr_netns.create(name)
    try:
        yield name
    finally:
        pr_netns.remove(name)


def check_netns_veth() -> list[Check]:
    from pyroute2 import IPRoute

    from netns.namespace import run_in_netns

    try:
        with _probe_netns() as ns:

            def veth() -> None:
                with IPRoute() as ipr:
                    ipr.link("add", ifname="sgprobe0", kind="veth", peer="sgprobe1")
                    ipr.link("del", ifname="sgprobe0")

            try:
                run_in_netns(ns, veth)
            except Exception as exc:
                return [
                    _ok("network namespaces", "created and removed a probe namespace"),
                    _fail(
                        "veth",
                        f"cannot create a veth pair: {exc}",
                        "load the veth module "
                        "(modprobe veth) or use a kernel built with CONFIG_VETH",
                    ),
                ]
    except Exception as exc:
        return [
            _fail(
                "network namespaces",
                f"cannot create a network namespace: {exc}",
                "use a kernel with CONFIG_NET_NS, run as root, and make /run/netns writable",
            )
        ]
    return [
        _ok("network namespaces", "created and removed a probe namespace"),
        _ok("veth", "created and removed a probe veth pair"),
    ]


def check_nftables() -> Check:
    from netns.namespace import run_in_netns
    from nft.apply import Nft, ensure_host_table

    try:
        with _probe_netns() as ns:
            run_in_netns(ns, lambda: ensure_host_table(Nft(), "sandgate_probe"))
    except Exception as exc:
        return _fail(
            "nf_tables",
            f"cannot apply sandgate's table (in a probe namespace): {exc}",
            "apt-get install nftables python3-nftables; the kernel needs nf_tables "
            "(modprobe nf_tables)",
        )
    return _ok("nf_tables", "applied and verified sandgate's table in a probe namespace")


def check_xtables() -> Check:
    from nft.backstop import backstop_available

    ok, reason = backstop_available()
    if ok:
        return _ok("legacy xtables backstop", "available")
    return Check(
        "legacy xtables backstop",
        "warn",
        f"unavailable ({reason}); sandboxes still run, guarded by nftables alone",
        "apt-get install iptables and load ip_tables (modprobe ip_tables) for a second "
        "layer that survives a foreign `nft flush ruleset`",
    )


def check_seccomp() -> Check:
    try:
        with open("/proc/self/status") as f:
            has = any(line.startswith("Seccomp:") for line in f)
    except OSError as exc:
        has, why = False, str(exc)
    else:
        why = "no Seccomp field in /proc/self/status"
    if has:
        return _ok("seccomp", "supported")
    return _fail("seccomp", f"not supported: {why}", "use a kernel with CONFIG_SECCOMP_FILTER")


def check_cgroups() -> Check:
    from .cgroups import CgroupError, detect

    try:
        backend = detect()
    except CgroupError as exc:
        return _fail(
            "cgroups",
            str(exc),
            "mount cgroup v2 with memory, pids and cpu delegated to sandgate (systemd: "
            "Delegate=yes), or cgroup v1 memory, pids and cpu hierarchies",
        )
    info = backend.info
    return _ok("cgroups", f"v{info.version}; sandbox cgroups go under {info.base}")


def check_pool(pool: IPv4Network) -> Check:
    """The pool must not overlap a host route that is not sandgate's own."""
    from pyroute2 import IPRoute

    overlaps = []
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for route in ipr.get_routes(family=2, table=254):
            dst = route.get_attr("RTA_DST") or "0.0.0.0"
            net = IPv4Network(f"{dst}/{route['dst_len']}", strict=False)
            dev = names.get(route.get_attr("RTA_OIF"), "?")
            if route["dst_len"] == 0 or dev.startswith("sg"):
                continue  # the default route, and sandgate's own /31s
            if net.overlaps(pool):
                overlaps.append(f"{net} dev {dev}")
    if overlaps:
        return _fail(
            "address pool",
            f"{pool} overlaps host routes: {', '.join(overlaps)}",
            "choose another pool with --pool (or pool = in /etc/sandgate/sandgate.toml)",
        )
    return _ok("address pool", f"{pool} overlaps no host route")


def check_ip_forward() -> Check:
    try:
        with open("/proc/sys/net/ipv4/ip_forward") as f:
            value = f.read().strip()
    except OSError as exc:
        return Check("ip_forward", "info", f"unreadable: {exc}")
    if value == "0":
        return _ok("ip_forward", "off (sandgate never needs forwarding)")
    return Check(
        "ip_forward",
        "warn",
        "on: sandgate does not need it; its forward chain drops sandbox traffic anyway",
        "sysctl -w net.ipv4.ip_forward=0 unless this host routes for something else",
    )


def _running(name: str) -> bool:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == name:
                    return True
        except OSError:
            continue
    return False


def check_firewall_managers() -> Check:
    """Tools that rewrite the ruleset can remove sandgate's table; say what they do."""
    found = []
    if _running("firewalld"):
        found.append(
            "firewalld (a reload flushes the whole nftables ruleset when FlushAllOnReload "
            "is on, sandgate's table included)"
        )
    if _running("dockerd"):
        found.append(
            "dockerd (it enables ip_forward and adds FORWARD rules; sandgate's forward "
            "chain still drops sg* traffic)"
        )
    if not found:
        return _ok("firewall managers", "none running (firewalld, dockerd)")
    return Check(
        "firewall managers",
        "warn",
        "running: " + "; ".join(found) + ". sandgate serve notices a removed or changed "
        "table within a second and restores it; meanwhile (and without the daemon) the "
        "in-sandbox table, the missing default route and the xtables backstop keep "
        "sandboxes closed",
        "set FlushAllOnReload=no in /etc/firewalld/firewalld.conf; avoid `nft flush "
        "ruleset` on this host",
    )


def check_audit_disk(audit_path: str, min_free: int = 256 * 1024 * 1024) -> Check:
    directory = os.path.dirname(audit_path) or "."
    probe = directory
    while not os.path.isdir(probe) and probe not in ("/", ""):
        probe = os.path.dirname(probe)
    try:
        st = os.statvfs(probe)
    except OSError as exc:
        return _fail("audit log", f"cannot inspect {directory}: {exc}", "create the directory")
    free = st.f_bavail * st.f_frsize
    where = f"{audit_path} ({free // (1024 * 1024)} MiB free on its filesystem)"
    if free < min_free:
        return Check(
            "audit log",
            "warn",
            f"{where}: less than {min_free // (1024 * 1024)} MiB",
            "rotate the audit log (logrotate) or move it with --audit-log",
        )
    return _ok("audit log", where)


def _control_socket() -> str:
    from .client import control_socket_path

    return control_socket_path()


SYSTEMD_MIN = 247  # LoadCredential= and the notify protocol the unit uses


def _systemd_version(run: Callable[[list[str]], str]) -> int | None:
    first = run(["systemctl", "--version"]).splitlines()[:1]
    parts = first[0].split() if first else []
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


def _command_output(argv: list[str]) -> str:
    import subprocess

    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout


def check_systemd(
    run: Callable[[list[str]], str] = _command_output, booted: bool | None = None
) -> list[Check]:
    """The service mode: systemd's version, the unit's state and its cgroup delegation."""
    if booted is None:
        booted = os.path.isdir("/run/systemd/system")
    if not booted:
        return [
            Check(
                "systemd",
                "info",
                "systemd is not the init system here: sandgate.service cannot run; "
                "`sandgate run` works, and `sandgate serve` can run under another supervisor",
            )
        ]
    version = _systemd_version(run)
    checks = []
    if version is None or version < SYSTEMD_MIN:
        checks.append(
            Check(
                "systemd",
                "warn",
                f"systemd {version or 'unknown'}: sandgate.service needs {SYSTEMD_MIN} or "
                "newer (LoadCredential=)",
                "upgrade systemd, or drop LoadCredential= lines and pass --credentials",
            )
        )
    else:
        checks.append(_ok("systemd", f"systemd {version}"))
    props = dict(
        line.split("=", 1)
        for line in run(
            ["systemctl", "show", "sandgate.service", "-p", "LoadState,ActiveState,Delegate"]
        ).splitlines()
        if "=" in line
    )
    if props.get("LoadState") != "loaded":
        checks.append(
            Check(
                "service",
                "warn",
                "sandgate.service is not installed",
                "sudo ./scripts/install (it installs and starts the unit)",
            )
        )
        return checks
    state = props.get("ActiveState", "unknown")
    checks.append(
        _ok("service", f"sandgate.service is {state}")
        if state == "active"
        else Check(
            "service",
            "warn",
            f"sandgate.service is {state}",
            "systemctl start sandgate; journalctl -u sandgate says why it stopped",
        )
    )
    if props.get("Delegate") != "yes":
        checks.append(
            _fail(
                "cgroup delegation",
                "sandgate.service has Delegate=no: systemd may move or remove the "
                "sandboxes' cgroups",
                "restore Delegate=yes in the unit (systemctl edit sandgate)",
            )
        )
    else:
        checks.append(_ok("cgroup delegation", "sandgate.service has Delegate=yes"))
    return checks


def check_daemon(control_socket: str) -> Check:
    from .client import ControlClient, DaemonRefused, DaemonUnavailable

    try:
        answer = ControlClient(control_socket, timeout=2.0).call({"op": "ping"})
    except (DaemonUnavailable, DaemonRefused, OSError) as exc:
        return Check("daemon", "info", f"not answering on {control_socket}: {exc}")
    return _ok(
        "daemon",
        f"sandgate serve (pid {answer.get('pid')}) answers on {control_socket}, serving "
        f"{answer.get('sandboxes')} sandbox(es)",
    )


def run_checks(config: RunnerConfig) -> list[Check]:
    checks: list[Check] = [check_root()]
    checks += check_modules()
    checks += check_tools()
    if os.geteuid() != 0:
        return checks
    probes: list[Callable[[], Check | list[Check]]] = [
        check_netns_veth,
        check_nftables,
        check_xtables,
        check_seccomp,
        check_cgroups,
        lambda: check_pool(config.pool),
        check_ip_forward,
        check_firewall_managers,
        lambda: check_audit_disk(str(config.audit_path)),
        check_systemd,
        lambda: check_daemon(_control_socket()),
    ]
    for probe in probes:
        try:
            got = probe()
        except Exception as exc:
            got = _fail(getattr(probe, "__name__", "check"), f"check crashed: {exc}", "")
        checks += got if isinstance(got, list) else [got]
    return checks
