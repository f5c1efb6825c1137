"""The process-isolation layer attacked from inside real sandboxes (`sandgate run`).

Every probe runs inside a sandbox as its unprivileged user, the way hostile code would.
Where a failure could be vacuous (a broken probe fails everywhere), a positive control
shows the same probe working: on the host as root, on the host as the sandbox's own uid
(then it is the sandbox, not the uid, that stops it), or in a writable place.

Sandboxes are shared where the probes do not interfere: one sandbox answers every
"what can it see and touch" question (`view`), one runs every raw-syscall probe
(`syscalls`), one the setuid and namespace tools (`tools`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import secrets
import shutil
import stat
import subprocess
import threading
import time
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from runner.cgroups import detect
from runner.gateway_thread import proxy_env
from tests.integration.attacks import (
    HOST_PYTHON,
    SANDBOX_GID,
    SANDBOX_UID,
    kept_sandboxes,
    last_json,
    read_line,
    run_as_sandbox_user,
    sandbox_in_kernel,
    sandgate,
    script,
    summary,
)

pytestmark = pytest.mark.root

# What the sandbox's environment may hold (runner/process.py: sandbox_env).
SANDBOX_IDS = (SANDBOX_UID, SANDBOX_GID)
# The fixed base, and the variables that point tools at the gateway.
ALLOWED_ENV = {"PATH", "SANDGATE_ID", "HOME", "USER", "LOGNAME", "TERM", "LANG", "LC_ALL", "TZ"}
ALLOWED_ENV |= set(proxy_env(IPv4Address("10.213.0.0"), 3128))


def _mkdir(path: Path, mode: int, owner: tuple[int, int] = (0, 0)) -> Path:
    path.mkdir(parents=True)
    os.chmod(path, mode)
    os.chown(path, *owner)
    return path


def _host_processes_with(text: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{name}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(name))
    return found


# --- one sandbox, seen from inside and from the host ---------------------------------------


@pytest.fixture(scope="module")
def view(tmp_path_factory):
    """Run attacks/inside_view.py in a sandbox with a --workspace, a --ro directory, a
    secret in sandgate's environment and a marked host process; while the sandbox is
    still running, look at its processes from the host."""
    base = tmp_path_factory.mktemp("view")
    workspace = _mkdir(base / "ws", 0o755, SANDBOX_IDS)
    ro = _mkdir(base / "ro", 0o777)  # world-writable on the host: only the bind is read-only
    (ro / "secret").write_text("root only\n")
    os.chmod(ro / "secret", 0o600)
    (ro / "public").write_text("for everyone\n")
    os.chmod(ro / "public", 0o644)
    secret = f"s3cr3t-{secrets.token_hex(8)}"
    marker = f"sgtest-marker-{secrets.token_hex(6)}"
    with contextlib.ExitStack() as stack:
        host_proc = subprocess.Popen([HOST_PYTHON, "-c", "import time; time.sleep(120)", marker])
        stack.callback(host_proc.wait)
        stack.callback(host_proc.kill)
        kept = stack.enter_context(kept_sandboxes(tmp_path_factory.mktemp("state")))
        # The marker goes in reversed: pid 1 inside shows sandgate's own command line.
        proc = kept.popen(
            "run",
            "--json",
            "--workspace",
            str(workspace),
            "--ro",
            str(ro),
            "--",
            "python3",
            "-c",
            script("inside_view"),
            str(ro),
            marker[::-1],
            str(os.getpid()),
            "--wait",
            env={"PATH": os.environ["PATH"], "SECRET": secret},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        line = read_line(proc)
        if not line:
            _, err = proc.communicate(timeout=30)
            pytest.fail(f"the sandbox printed nothing (exit {proc.returncode}):\n{err}")
        seen = json.loads(line)
        kept.add(seen["hostname"])
        cgroup = detect().find(f"sandgate-{seen['hostname']}")
        host_pids = cgroup.procs() if cgroup else []
        holders = []
        for pid in host_pids:
            with contextlib.suppress(OSError), open(f"/proc/{pid}/environ", "rb") as f:
                if secret.encode() in f.read():
                    holders.append(pid)
        marker_on_host = _host_processes_with(marker)
        _, err = proc.communicate("\n", timeout=30)
    assert proc.returncode == 0, err
    return {
        "inside": seen,
        "summary": summary(err),
        "workspace": workspace,
        "ro": ro,
        "secret": secret,
        "host_pids": host_pids,
        "secret_holders_on_host": holders,
        "marker_on_host": marker_on_host,
    }


def test_runs_as_the_unprivileged_sandbox_user(view):
    ids = view["inside"]["ids"]
    assert ids["res_uid"] == [SANDBOX_UID] * 3
    assert ids["res_gid"] == [SANDBOX_GID] * 3
    assert 0 not in ids["groups"]
    assert view["summary"]["user"]["uid"] == SANDBOX_UID


def test_root_home_var_and_sys_are_absent(view):
    inside = view["inside"]
    assert os.path.isdir("/root") and os.path.isdir("/var")  # control: the host has them
    assert inside["exists"]["/root"] is False
    assert inside["list_root_home"] == "ENOENT"
    assert inside["exists"]["/var"] is False and inside["exists"]["/sys"] is False
    for name in ("root", "var", "sys", "boot", "mnt", "srv", "opt", "media"):
        assert name not in inside["root_listing"]
    assert {"usr", "etc", "tmp", "workspace", "proc", "dev"} <= set(inside["root_listing"])


def test_etc_shadow_is_present_but_unreadable(view):
    inside = view["inside"]
    assert inside["exists"]["/etc/shadow"] is True  # not absent: denied
    assert inside["read_shadow"] == "EACCES"


def test_root_only_file_in_a_ro_bind_cannot_be_read_but_is_listed(view):
    inside = view["inside"]
    assert inside["ro_listing"] == ["public", "secret"]
    assert inside["ro_secret"] == "EACCES"
    assert inside["ro_public"] == "for everyone\n"  # control: the bind itself is readable
    # The directory is world-writable on the host (control: the sandbox's uid writes there
    # outside a sandbox, through an inherited descriptor since tmp_path's parents are
    # 0700); inside, the read-only bind refuses the same write.
    fd = os.open(view["ro"], os.O_RDONLY | os.O_DIRECTORY)
    try:
        touch = run_as_sandbox_user(["touch", f"/proc/self/fd/{fd}/host-control"], pass_fds=(fd,))
    finally:
        os.close(fd)
    assert touch.returncode == 0, touch.stderr
    (view["ro"] / "host-control").unlink()
    assert inside["writes"][f"{view['ro']}/x"] == "EROFS"


def test_proc_shows_only_the_sandbox_processes(view):
    inside = view["inside"]
    procs = {p["pid"]: p for p in inside["processes"]}
    # pid 1 is sandgate's init (a fork of the runner, so it shows the runner's argv); it
    # dropped to the sandbox user before starting the command, its child, pid 2.
    init = procs[1]
    assert any("sandgate" in arg for arg in init["cmdline"]) and "run" in init["cmdline"]
    assert init["uid"] == SANDBOX_UID
    assert inside["pid"] == 2 and inside["ppid"] == 1
    assert inside["status"]["PPid"] == "1"
    # Nothing else but the command (and what it started), all of them the sandbox user.
    assert set(procs) == {1, inside["pid"]}, procs
    assert all(p["uid"] == SANDBOX_UID for p in procs.values())
    # A marked host process ran the whole time: the host sees it, the sandbox does not.
    assert view["marker_on_host"], "control: the marked host process was not running"
    assert inside["marker_seen"] is False
    assert inside["host_pid_present"] is False
    # The host sees the sandbox's processes under host pids (init, command).
    assert len(view["host_pids"]) >= 2


def test_pid1_and_its_secrets_are_out_of_reach(view):
    pid1 = view["inside"]["pid1"]
    assert pid1["environ"] == "EACCES"
    assert pid1["mem"] == "EACCES"
    assert pid1["ns_mnt"] == "EACCES"
    assert pid1["root"] == "EACCES"
    # Same uid as init now, so kill() itself may succeed: the signal is dropped.
    assert pid1["kill"] in ("EPERM", 0, None) and pid1["alive_after_kill"] is True
    assert view["inside"]["self_environ"] > 0  # control: reading an environ file works


def test_the_callers_environment_is_not_passed_in(view):
    env = view["inside"]["env"]
    assert "SECRET" not in env
    assert set(env) <= ALLOWED_ENV, set(env) - ALLOWED_ENV
    assert all(view["secret"] not in value for value in env.values())
    assert env["SANDGATE_ID"] == view["summary"]["id"]
    # Control: sandgate's own environment did hold it, and so does the init process it
    # forked (as the host sees it); the sandbox cannot read init's environ (above).
    assert view["secret_holders_on_host"], "control: the secret never reached sandgate"


def test_writes_only_to_workspace_tmp_and_home(view):
    writes = view["inside"]["writes"]
    home = view["inside"]["env"]["HOME"]
    for path in ("/workspace/x", "/tmp/x", f"{home}/x", "/dev/shm/x"):
        assert writes[path] == 0, (path, writes[path])
    denied = {
        "/x": {"EROFS"},
        "/usr/x": {"EROFS"},
        "/etc/x": {"EROFS"},
        "/lib/x": {"EROFS"},
        "/var/x": {"EROFS", "ENOENT"},
        "/sys/x": {"EROFS", "ENOENT"},
        "/home/x": {"EROFS", "EACCES"},
        "/dev/x": {"EACCES", "EROFS"},
        "/run/x": {"EACCES", "EROFS"},
        "/proc/x": {"ENOENT", "EACCES", "EROFS"},
        "/proc/sys/kernel/hostname": {"EACCES", "EROFS", "EPERM"},
        "/proc/sysrq-trigger": {"EACCES", "EROFS", "EPERM", "ENOENT"},  # ENOENT: no SYSRQ
    }
    for path, allowed in denied.items():
        assert writes[path] in allowed, (path, writes[path])


def test_hostname_is_the_sandbox_id_and_cannot_be_changed(view):
    assert view["inside"]["hostname"] == view["summary"]["id"]
    assert view["inside"]["sethostname"] == "EPERM"


def test_no_capabilities_no_new_privs_and_seccomp(view):
    status = view["inside"]["status"]
    for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[key], 16) == 0, (key, status[key])
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"


def test_workspace_files_belong_to_the_sandbox_user_on_the_host(view):
    made = view["workspace"] / "made-inside"
    assert made.read_text() == "hello\n"
    for path in (made, view["workspace"] / "dir-made-inside"):
        st = path.stat()
        assert (st.st_uid, st.st_gid) == SANDBOX_IDS, path
    assert not stat.S_IMODE(made.stat().st_mode) & 0o022  # umask 022 inside


# --- raw system calls ----------------------------------------------------------------------

# Probe -> who can do it on the host without a sandbox: "root" only, or also the
# sandbox's the sandbox's uid (then the sandbox, not the uid, is what stops it).
SYSCALL_PROBES = {
    "mount_tmpfs": "root",
    "unshare_user": "user",
    "clone_user": "user",
    "bpf_map": "root",
    "perf_event": "user",
    "ptrace_traceme": "user",
    "ptrace_sibling": "user",
    "io_uring": "user",
    "keyring": "user",
    "raw_socket": "root",
    "packet_socket": "root",
}


@pytest.fixture(scope="module")
def syscalls(tmp_path_factory):
    source = script("syscall_probe")
    result = sandgate(
        "run",
        "--",
        "python3",
        "-c",
        source,
        state_dir=tmp_path_factory.mktemp("state"),
    )
    assert result.returncode == 0, result.stderr
    # Controls: root on the host (in a private mount namespace, for the tmpfs mount),
    # and the sandbox's uid on the host.
    root = subprocess.run(
        ["unshare", "-m", "--propagation", "private", HOST_PYTHON, "-c", source],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    user = run_as_sandbox_user([HOST_PYTHON, "-c", source])
    assert user.returncode == 0, user.stderr
    return {
        "sandbox": last_json(result.stdout),
        "root": last_json(root.stdout),
        "user": last_json(user.stdout),
    }


@pytest.mark.parametrize("probe", sorted(SYSCALL_PROBES))
def test_kernel_surface_is_closed(syscalls, probe, request):
    assert syscalls["sandbox"][probe] == "EPERM", syscalls["sandbox"]
    control = syscalls["root"][probe]
    assert control == 0, f"control: the probe fails on the host as root too: {control}"
    if SYSCALL_PROBES[probe] == "user":
        # Where this host lets any user do it, the sandbox is what stops it. A hardened
        # host (perf_event_paranoid=3, no user namespaces) forbids it to everyone.
        note = (
            "the sandbox's uid can do this on the host: the sandbox is what denies it"
            if syscalls["user"][probe] == 0
            else f"this host forbids it to the sandbox's uid too ({syscalls['user'][probe]})"
        )
        request.node.add_report_section("call", "control", note)


def test_init_cannot_be_traced(syscalls):
    # PTRACE_ATTACH to pid 1 (root-owned init) from the sandbox.
    assert syscalls["sandbox"]["ptrace_init"] == "EPERM"


# --- setuid programs and namespace tools ---------------------------------------------------


@pytest.fixture(scope="module")
def tools(tmp_path_factory):
    """A setuid+setgid-root copy of /usr/bin/id in the workspace, and the usual tools."""
    workspace = _mkdir(tmp_path_factory.mktemp("tools") / "ws", 0o755)
    suid = workspace / "id-suid"
    shutil.copy("/usr/bin/id", suid)
    os.chown(suid, 0, 0)
    os.chmod(suid, 0o6755)
    names = ["unshare_user", "unshare_mount", "su", "mount_tmpfs", "file:/workspace/id-suid"]
    result = sandgate(
        "run",
        "--workspace",
        str(workspace),
        "--",
        "python3",
        "-c",
        script("tools_probe"),
        *names,
        state_dir=tmp_path_factory.mktemp("state"),
    )
    assert result.returncode == 0, result.stderr
    return {"inside": last_json(result.stdout), "suid": suid}


def test_setuid_root_binary_gives_no_privilege(tools):
    if os.statvfs(tools["suid"]).f_flag & os.ST_NOSUID:
        pytest.skip("the test's tmp directory is on a nosuid mount: no host control possible")
    # Control: on the host the copy really makes the sandbox's uid root.
    assert run_as_sandbox_user([str(tools["suid"]), "-u"]).stdout.strip() == "0"
    assert run_as_sandbox_user([str(tools["suid"]), "-g"]).stdout.strip() == "0"
    inside = tools["inside"]["file:/workspace/id-suid"]
    assert inside["euid"]["rc"] == 0 and inside["euid"]["out"] == str(SANDBOX_UID), inside
    assert inside["egid"]["rc"] == 0 and inside["egid"]["out"] == str(SANDBOX_GID), inside


def test_su_and_setuid_mount_stay_unprivileged(tools):
    su = tools["inside"]["su"]
    assert su["rc"] != 0 and su["out"] != "0", su
    mount = tools["inside"]["mount_tmpfs"]
    assert mount["rc"] != 0 and "superuser" in mount["err"], mount


def test_unshare_tool_cannot_make_namespaces(tools):
    for name in ("unshare_user", "unshare_mount"):
        result = tools["inside"][name]
        assert result["rc"] != 0 and "Operation not permitted" in result["err"], (name, result)
    # Control: the sandbox's uid on the host may make a user namespace and be root in it.
    host = run_as_sandbox_user(["unshare", "-U", "--map-root-user", "id", "-u"])
    if host.returncode != 0:
        pytest.skip(f"this host forbids user namespaces to users: {host.stderr.strip()}")
    assert host.stdout.strip() == "0"


# --- the sandbox's own network configuration ------------------------------------------------


def test_routes_links_and_in_netns_firewall_cannot_be_changed(tmp_path):
    state = tmp_path / "state"
    names = ["ip_route_add", "ip_link_down", "ip_addr_add", "nft_flush", "nft_delete_table"]
    with kept_sandboxes(state) as kept:
        result = sandgate(
            "run",
            "--keep",
            "--json",
            "--",
            "python3",
            "-c",
            script("tools_probe"),
            *names,
            state_dir=state,
        )
        sid = kept.add(summary(result.stderr)["id"])
        assert result.returncode == 0, result.stderr
        inside = last_json(result.stdout)
        for name in names:
            assert inside[name]["rc"] != 0, (name, inside[name])
            assert "Operation not permitted" in inside[name]["err"], (name, inside[name])
        # From the host (root, in the kept sandbox's netns) everything is as it was.
        netns = f"sg-{sid}"
        table = subprocess.run(
            ["ip", "netns", "exec", netns, "nft", "-j", "list", "table", "inet", "sandgate"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert table.returncode == 0, table.stderr
        objects = json.loads(table.stdout)["nftables"]
        assert any("rule" in obj for obj in objects), "the in-netns table lost its rules"
        routes = json.loads(_ip(netns, "-4", "route"))
        assert all(r["dst"] != "192.0.2.0/24" for r in routes) and routes
        (eth0,) = json.loads(_ip(netns, "link", "show", "eth0"))
        assert "UP" in eth0["flags"]
        addrs = json.loads(_ip(netns, "addr", "show", "eth0"))[0]["addr_info"]
        assert all(a["local"] != "192.0.2.9" for a in addrs)
        removed = sandgate("rm", sid, state_dir=state)
        assert removed.returncode == 0, removed.stderr
        assert sandbox_in_kernel(sid) == []


def _ip(netns: str, *args: str) -> str:
    return subprocess.run(
        ["ip", "-n", netns, "-j", *args], capture_output=True, text=True, check=True
    ).stdout


# --- another sandbox ------------------------------------------------------------------------

OTHER_SANDBOX_PROBE = r"""
import json, os, sys
other_ws, token = sys.argv[1], sys.argv[2][::-1]
names = []
for top in ("/workspace", "/tmp", "/home", "/run", "/dev/shm"):
    for dirpath, dirnames, filenames in os.walk(top):
        names += dirnames + filenames
cmdlines = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        cmdlines.append(open(f"/proc/{pid}/cmdline", "rb").read().decode())
    except OSError:
        pass
print(json.dumps({
    "other_path_exists": os.path.exists(other_ws),
    "own_workspace": sorted(os.listdir("/workspace")),
    "token_in_names": any(token in n for n in names),
    "token_in_processes": any(token in c for c in cmdlines),
}))
"""


def test_a_sandbox_cannot_see_another_sandboxs_files_or_processes(tmp_path):
    state = tmp_path / "state"
    ws_a = _mkdir(tmp_path / "a", 0o755, SANDBOX_IDS)
    ws_b = _mkdir(tmp_path / "b", 0o755, SANDBOX_IDS)
    (ws_b / "mine").write_text("b\n")
    token = f"sgtest-a-{secrets.token_hex(6)}"
    with kept_sandboxes(state) as kept:
        sandbox_a = kept.popen(
            "run",
            "--workspace",
            str(ws_a),
            "--",
            "sh",
            "-c",
            f"echo private > /workspace/{token}; echo ready; read line",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert read_line(sandbox_a) == "ready\n"
        # Control: A's file and A's process (its command line carries the token) exist.
        assert (ws_a / token).read_text() == "private\n"
        assert _host_processes_with(token)
        b = sandgate(
            "run",
            "--workspace",
            str(ws_b),
            "--",
            "python3",
            "-c",
            OTHER_SANDBOX_PROBE,
            str(ws_a),
            token[::-1],
            state_dir=state,
        )
        sandbox_a.communicate("\n", timeout=30)
        assert sandbox_a.returncode == 0
    assert b.returncode == 0, b.stderr
    seen = last_json(b.stdout)
    assert seen == {
        "other_path_exists": False,
        "own_workspace": ["mine"],
        "token_in_names": False,
        "token_in_processes": False,
    }


# --- who the command runs as ----------------------------------------------------------------


@pytest.mark.parametrize("user", ["0", "0:0", "root:nogroup", "nobody:0", "nobody:root"])
def test_root_user_or_group_is_refused(tmp_path, user):
    result = sandgate("run", "--user", user, "--", "id", state_dir=tmp_path / "state")
    assert result.returncode == 2, result.stderr
    assert "refusing to run sandboxed code" in result.stderr
    assert result.stdout == ""


def test_user_root_is_root_only_inside_its_own_user_namespace(tmp_path):
    """`--user root`: uid 0 inside, mapped to the unprivileged sandbox user on the host,
    with no capabilities; what it writes to the workspace belongs to that host user."""
    ws = _mkdir(tmp_path / "ws", 0o777)
    code = (
        "import json, os, ctypes\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "st = dict(l.split(':', 1) for l in open('/proc/self/status'))\n"
        "open('/workspace/made-by-root', 'w').close()\n"
        "r = libc.mount(b'none', b'/tmp', b'tmpfs', 0, None)\n"
        "print(json.dumps({'uid': os.getuid(), 'gid': os.getgid(),\n"
        "  'uid_map': open('/proc/self/uid_map').read().split(),\n"
        "  'capeff': st['CapEff'].strip(), 'capbnd': st['CapBnd'].strip(),\n"
        "  'mount': r, 'errno': ctypes.get_errno()}))\n"
    )
    result = sandgate(
        "run",
        "--user",
        "root",
        "--workspace",
        str(ws),
        "--",
        "python3",
        "-c",
        code,
        state_dir=tmp_path / "state",
    )
    assert result.returncode == 0, result.stderr
    inside = json.loads(result.stdout)
    assert (inside["uid"], inside["gid"]) == (0, 0)
    host_uid = int(inside["uid_map"][1])
    assert inside["uid_map"] == ["0", str(host_uid), "1"] and host_uid == SANDBOX_UID != 0
    assert inside["capeff"] == inside["capbnd"] == "0000000000000000"
    assert inside["mount"] == -1 and inside["errno"] == errno.EPERM
    made = (ws / "made-by-root").stat()
    assert (made.st_uid, made.st_gid) == SANDBOX_IDS


# --- symlinks in --ro / --workspace paths ---------------------------------------------------


def test_ro_symlink_is_resolved_and_bound_at_the_path_given(tmp_path):
    """What happens: the link is resolved on the host (realpath) and its target's contents
    appear, read-only, at the path as given; inside, that path is a plain directory, not a
    link, and the target's own path does not exist."""
    real = _mkdir(tmp_path / "real", 0o777)
    (real / "file").write_text("via link\n")
    link = tmp_path / "link"
    link.symlink_to(real)
    probe = r"""
import json, os, sys
link, real = sys.argv[1], sys.argv[2]
try:
    open(os.path.join(link, "new"), "w")
    write = "ok"
except OSError as exc:
    write = os.strerror(exc.errno)
print(json.dumps({
    "is_link": os.path.islink(link),
    "is_dir": os.path.isdir(link),
    "file": open(os.path.join(link, "file")).read(),
    "real_exists": os.path.exists(real),
    "write": write,
}))
"""
    result = sandgate(
        "run",
        "--ro",
        str(link),
        "--",
        "python3",
        "-c",
        probe,
        str(link),
        str(real),
        state_dir=tmp_path / "state",
    )
    assert result.returncode == 0, result.stderr
    assert last_json(result.stdout) == {
        "is_link": False,
        "is_dir": True,
        "file": "via link\n",
        "real_exists": False,
        "write": os.strerror(errno.EROFS),
    }


@pytest.mark.parametrize("flag", ["--ro", "--rw", "--workspace"])
@pytest.mark.parametrize("how", ["link to /root", "link in a parent", "link to /proc/1"])
def test_symlink_into_a_forbidden_tree_is_refused(tmp_path, flag, how):
    if how == "link to /root":
        path = tmp_path / "root-link"
        path.symlink_to("/root")
    elif how == "link in a parent":
        (tmp_path / "up").symlink_to("/")
        path = tmp_path / "up" / "root"
    else:
        path = tmp_path / "proc-link"
        path.symlink_to("/proc/1")
    result = sandgate("run", flag, str(path), "--", "true", state_dir=tmp_path / "state")
    assert result.returncode == 2, result.stderr
    assert "is never mounted into a sandbox" in result.stderr


_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_EXCHANGE = 2


def test_a_parent_swapped_for_a_symlink_while_starting_cannot_mount_a_forbidden_tree(tmp_path):
    """An attacker who owns a directory on the path of a --ro bind flips it, atomically and
    over and over, between a real directory and a symlink to /sys (a forbidden tree) while
    sandgate starts. Refusals and failed starts are fine; host /sys/kernel inside is not."""
    base = _mkdir(tmp_path / "race", 0o755)
    _mkdir(base / "p" / "kernel", 0o755)
    (base / "p" / "kernel" / "benign").write_text("")
    (base / "q").symlink_to("/sys")
    target = base / "p" / "kernel"
    stop = threading.Event()

    def flip() -> None:
        p, q = str(base / "p").encode(), str(base / "q").encode()
        while not stop.is_set():
            _libc.renameat2(AT_FDCWD, p, AT_FDCWD, q, RENAME_EXCHANGE)

    flipper = threading.Thread(target=flip, daemon=True)
    flipper.start()
    outcomes = []
    try:
        deadline = time.monotonic() + 15
        for _ in range(8):
            if time.monotonic() > deadline:
                break
            result = sandgate(
                "run", "--ro", str(target), "--", "ls", "-1", str(target), state_dir=tmp_path / "s"
            )
            outcomes.append((result.returncode, result.stdout.split()))
            if "uevent_seqnum" in result.stdout:
                break
    finally:
        stop.set()
        flipper.join()
    escaped = [o for o in outcomes if "uevent_seqnum" in o[1]]
    assert not escaped, f"host /sys/kernel was mounted into the sandbox: {outcomes}"
