"""The privilege drop and the seccomp filter on the real kernel, in forked children.

Each test forks; the child drops privileges and/or installs the filter, probes,
and reports JSON through a pipe (or dies, where dying is the point). The child
always leaves through os._exit. A fixture checks that the pytest process itself
keeps its uid, capabilities, no_new_privs and seccomp state.

Where EPERM could come from the missing capabilities rather than the filter, a
control child (root, private mount namespace, same calls, no filter) shows the
call would otherwise have worked.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from functools import cache
from typing import Any

import pytest
from cffi import FFI

from runner import caps, seccomp, syscalls

pytestmark = pytest.mark.root

NOBODY = 65534
CHILD_TIMEOUT = 60.0
ARCH = os.uname().machine
if ARCH not in seccomp.SYSCALL_NUMBERS:
    pytest.skip(f"no seccomp table for {ARCH}", allow_module_level=True)
NR = seccomp.syscall_numbers(ARCH)

KEYCTL_GET_KEYRING_ID = 0
KEY_SPEC_SESSION_KEYRING = -3
PTRACE_TRACEME = 0
ADDR_NO_RANDOMIZE = 0x0040000


@cache
def _libc() -> tuple[FFI, Any]:
    ffi = FFI()
    ffi.cdef("long syscall(long number, ...);")
    return ffi, ffi.dlopen(None)


def raw_syscall(name_or_nr: str | int, *args: int) -> tuple[int, int]:
    """(return value, errno) of syscall(2), every argument passed as a long."""
    ffi, lib = _libc()
    nr = NR[name_or_nr] if isinstance(name_or_nr, str) else name_or_nr
    ret = lib.syscall(ffi.cast("long", nr), *(ffi.cast("long", a) for a in args))
    return ret, (ffi.errno if ret == -1 else 0)


def clone_or_exit(flags: int) -> tuple[int, int]:
    """Raw clone(flags); a child it should not have created leaves at once."""
    ret, err = raw_syscall("clone", flags, 0, 0, 0, 0)
    if ret == 0:
        os._exit(0)
    if ret > 0:
        os.waitpid(ret, 0)
    return ret, err


def errno_of(fn: Callable[[], object]) -> int:
    """0 if `fn` succeeds, else the OSError's errno."""
    try:
        fn()
    except OSError as exc:
        return exc.errno or -1
    return 0


def fork_child(work: Callable[[], Any]) -> tuple[int, Any]:
    """Run `work` in a forked child: (wait status, its JSON result or None)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.close(read_end)
            try:
                report: dict[str, Any] = {"result": work()}
            except BaseException as exc:
                report = {"error": f"{exc!r}\n{traceback.format_exc()}"}
            with os.fdopen(write_end, "w") as out:
                json.dump(report, out)
        except BaseException:
            code = 70
        finally:
            os._exit(code)
    os.close(write_end)
    # A filter that fails open can leave the child stopped (e.g. traced after a
    # PTRACE_TRACEME that should have been denied): fail then, do not hang.
    chunks: list[bytes] = []
    deadline = time.monotonic() + CHILD_TIMEOUT
    with os.fdopen(read_end, "rb") as inp:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([inp], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise AssertionError(f"child {pid} gave no report in {CHILD_TIMEOUT}s; killed")
            chunk = os.read(inp.fileno(), 65536)
            if not chunk:
                break
            chunks.append(chunk)
    while True:
        _, status = os.waitpid(pid, 0)
        if not os.WIFSTOPPED(status):  # a traced child reports stops too
            break
        os.kill(pid, signal.SIGKILL)
    raw = b"".join(chunks)
    return status, (json.loads(raw) if raw else None)


def in_child(work: Callable[[], Any]) -> Any:
    status, report = fork_child(work)
    assert report is not None, f"child died without a report (wait status {status:#x})"
    assert "error" not in report, report["error"]
    assert os.waitstatus_to_exitcode(status) == 0
    return report["result"]


def sandboxed() -> None:
    """What the runner does before exec: drop everything, then the filter."""
    caps.drop_privileges(NOBODY, NOBODY)
    seccomp.install_filter(seccomp.build_filter())


def private_mount_namespace() -> None:
    """So a mount that wrongly succeeds stays in the child and dies with it."""
    syscalls.unshare(syscalls.CLONE_NEWNS)
    syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)


def parent_state() -> dict[str, Any]:
    return {
        "caps": caps.current_capabilities(),
        "uids": os.getresuid(),
        "gids": os.getresgid(),
    }


@pytest.fixture(autouse=True)
def parent_unaffected() -> Iterator[None]:
    before = parent_state()
    yield
    assert parent_state() == before


@pytest.fixture
def scratch() -> Iterator[str]:
    """A directory under /tmp that uid 65534 can reach (pytest's tmp_path is 0700)."""
    path = tempfile.mkdtemp(prefix="sgtest-caps-", dir="/tmp")
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def test_drop_leaves_nothing_and_the_filter_is_on() -> None:
    def work() -> dict[str, Any]:
        sandboxed()
        return {
            "status": caps.current_capabilities(),
            "uids": os.getresuid(),
            "gids": os.getresgid(),
            "groups": os.getgroups(),
        }

    got = in_child(work)
    status = got["status"]
    for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert status[key] == 0, key
    assert status["NoNewPrivs"] == 1
    assert status["Seccomp"] == 2
    assert got["uids"] == [NOBODY] * 3 and got["gids"] == [NOBODY] * 3
    assert got["groups"] == []


def test_switch_user_alone_clears_permitted_and_effective() -> None:
    def work() -> dict[str, int]:
        caps.switch_user(NOBODY, NOBODY, [NOBODY])
        return caps.current_capabilities()

    status = in_child(work)
    assert status["CapEff"] == 0 and status["CapPrm"] == 0
    assert status["CapBnd"] != 0  # untouched: that takes drop_bounding_set


def test_the_wrong_order_fails_loudly() -> None:
    def clear_then_switch() -> str:
        caps.drop_all_capabilities()
        try:
            caps.switch_user(NOBODY, NOBODY)
        except caps.CapabilityError as exc:
            return str(exc)
        return "switched"

    def switch_then_bounding() -> str:
        caps.switch_user(NOBODY, NOBODY)
        try:
            caps.drop_bounding_set()
        except caps.CapabilityError as exc:
            return str(exc)
        return "dropped"

    assert "CAP_SETUID" in in_child(clear_then_switch)
    assert "CAP_SETPCAP" in in_child(switch_then_bounding)


def test_drop_privileges_refuses_root() -> None:
    def work() -> str:
        try:
            caps.drop_privileges(0, NOBODY)
        except caps.CapabilityError as exc:
            return str(exc)
        return "dropped"

    assert "uid/gid 0" in in_child(work)


def test_install_filter_requires_no_new_privs() -> None:
    def work() -> dict[str, Any]:
        try:
            seccomp.install_filter(seccomp.build_filter())
        except seccomp.SeccompError as exc:
            return {"error": str(exc), "status": caps.current_capabilities()}
        return {"error": None}

    got = in_child(work)
    assert "no_new_privs" in got["error"]
    assert got["status"]["Seccomp"] == 0


def test_every_denied_syscall_returns_eperm_and_the_process_lives() -> None:
    def work() -> dict[str, Any]:
        sandboxed()
        out = {name: raw_syscall(name) for name in seccomp.DENIED_SYSCALLS if name in NR}
        out["clone3"] = raw_syscall("clone3")
        return out

    got = in_child(work)
    for name in seccomp.DENIED_SYSCALLS:
        if name in NR:
            assert got[name] == [-1, errno.EPERM], name
    assert got["clone3"] == [-1, errno.ENOSYS]


def test_sandboxed_probes() -> None:
    def work() -> dict[str, Any]:
        sandboxed()
        pid = os.fork()
        if pid == 0:
            os._exit(7)
        _, fork_status = os.waitpid(pid, 0)
        seen: list[str] = []
        thread = threading.Thread(target=lambda: seen.append("ran"))
        thread.start()
        thread.join()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            inet = s.family
        return {
            "mount": errno_of(lambda: syscalls.mount("none", "/tmp", "tmpfs")),
            "unshare_user": errno_of(lambda: syscalls.unshare(syscalls.CLONE_NEWUSER)),
            "packet": errno_of(lambda: socket.socket(seccomp.AF_PACKET, socket.SOCK_RAW, 0)),
            "vsock": errno_of(lambda: socket.socket(seccomp.AF_VSOCK, socket.SOCK_STREAM)),
            "ptrace": raw_syscall("ptrace", PTRACE_TRACEME, 0, 0, 0),
            "clone_newuser": clone_or_exit(syscalls.CLONE_NEWUSER | signal.SIGCHLD),
            "personality_query": raw_syscall("personality", 0xFFFFFFFF),
            "personality_norandom": raw_syscall("personality", ADDR_NO_RANDOMIZE),
            "fork_exit": os.waitstatus_to_exitcode(fork_status),
            "thread": seen,
            "inet": int(inet),
            "true": subprocess.run(["true"], check=False).returncode,
        }

    got = in_child(work)
    assert got["mount"] == errno.EPERM
    assert got["unshare_user"] == errno.EPERM
    assert got["packet"] == errno.EPERM
    assert got["vsock"] == errno.EPERM
    assert got["ptrace"] == [-1, errno.EPERM]
    assert got["clone_newuser"] == [-1, errno.EPERM]
    assert got["personality_query"][1] == 0
    assert got["personality_norandom"] == [-1, errno.EPERM]
    assert got["fork_exit"] == 7
    assert got["thread"] == ["ran"]
    assert got["inet"] == socket.AF_INET
    assert got["true"] == 0


def _root_probes(target: str) -> dict[str, Any]:
    """Calls root may make, each harmless or confined to this child's namespaces."""
    mounted = errno_of(lambda: syscalls.mount("none", target, "tmpfs"))
    if mounted == 0:
        syscalls.umount2(target)

    def packet() -> None:
        socket.socket(seccomp.AF_PACKET, socket.SOCK_RAW, 0).close()

    return {
        "mount": mounted,
        "packet": errno_of(packet),
        "keyctl": raw_syscall("keyctl", KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0)[1],
        "bpf": raw_syscall("bpf", 0, 0, 0)[1],  # NULL attr: EINVAL from bpf itself
        "io_uring": raw_syscall("io_uring_setup", 1, 0)[1],  # NULL params: EFAULT
        "clone3": raw_syscall("clone3", 0, 0)[1],  # NULL args: EINVAL from the kernel
        # Last: the child is then in a user namespace where it owns nothing outside.
        "unshare_user": errno_of(lambda: syscalls.unshare(syscalls.CLONE_NEWUSER)),
    }


def test_the_filter_denies_what_root_could_do(scratch: str) -> None:
    def control() -> dict[str, Any]:
        private_mount_namespace()
        caps.set_no_new_privs()
        return _root_probes(scratch)

    def filtered() -> dict[str, Any]:
        private_mount_namespace()
        caps.set_no_new_privs()
        seccomp.install_filter(seccomp.build_filter())
        return _root_probes(scratch)

    without = in_child(control)
    assert without["mount"] == 0
    assert without["packet"] == 0
    assert without["keyctl"] == 0
    assert without["unshare_user"] == 0
    assert without["clone3"] == errno.EINVAL
    assert without["bpf"] != errno.EPERM
    assert without["io_uring"] != errno.EPERM

    got = in_child(filtered)
    for probe in ("mount", "packet", "keyctl", "bpf", "io_uring", "unshare_user"):
        assert got[probe] == errno.EPERM, probe
    assert got["clone3"] == errno.ENOSYS


def test_an_x32_syscall_kills_the_process() -> None:
    def work() -> None:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        sandboxed()
        raw_syscall(seccomp.X32_SYSCALL_BIT | 39)  # x32 getpid
        raise AssertionError("still alive after an x32 syscall")

    if ARCH != "x86_64":
        pytest.skip("x32 exists only on x86_64")
    status, report = fork_child(work)
    assert os.WIFSIGNALED(status), (status, report)
    assert os.WTERMSIG(status) == signal.SIGSYS
    assert report is None


def test_exec_keeps_the_filter_and_no_privileges(scratch: str) -> None:
    def work() -> dict[str, Any]:
        sandboxed()

        def run(*argv: str) -> dict[str, Any]:
            done = subprocess.run(list(argv), capture_output=True, text=True, check=False)
            return {"rc": done.returncode, "out": done.stdout, "err": done.stderr}

        return {
            "unshare": run("/usr/bin/unshare", "-U", "true"),
            "mount": run("/bin/mount", "-t", "tmpfs", "none", scratch),
            "status": run("/bin/cat", "/proc/self/status"),
        }

    got = in_child(work)
    assert got["unshare"]["rc"] != 0
    assert "Operation not permitted" in got["unshare"]["err"]
    assert got["mount"]["rc"] != 0
    assert not os.path.ismount(scratch)
    status = caps.parse_proc_status(got["status"]["out"])
    for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert status[key] == 0, key
    assert status["NoNewPrivs"] == 1
    assert status["Seccomp"] == 2


def test_setuid_and_file_capabilities_give_nothing(scratch: str) -> None:
    # Copies the kernel will honour, on /tmp (not nosuid): a setuid-root `id`, and a
    # `cat` with CAP_DAC_READ_SEARCH as a file capability.
    setuid_id = os.path.join(scratch, "id")
    shutil.copy("/usr/bin/id", setuid_id)
    os.chown(setuid_id, 0, 0)
    os.chmod(setuid_id, 0o4755)
    capable_cat = os.path.join(scratch, "cat")
    shutil.copy("/bin/cat", capable_cat)
    os.chmod(capable_cat, 0o755)
    if shutil.which("setcap") is None:
        pytest.skip("setcap (libcap2-bin) not installed")
    subprocess.run(["setcap", "cap_dac_read_search+ep", capable_cat], check=True)

    def run(*argv: str) -> dict[str, Any]:
        try:
            done = subprocess.run(list(argv), capture_output=True, text=True, check=False)
        except OSError as exc:
            return {"exec_errno": exc.errno}
        return {"rc": done.returncode, "out": done.stdout}

    def probes() -> dict[str, Any]:
        return {
            "id": run(setuid_id),
            "shadow": run(capable_cat, "/etc/shadow"),
            "status": run(capable_cat, "/proc/self/status"),
        }

    def control() -> dict[str, Any]:
        caps.switch_user(NOBODY, NOBODY)
        return probes()

    def dropped() -> dict[str, Any]:
        sandboxed()
        return probes()

    without = in_child(control)
    assert "euid=0" in without["id"]["out"], "setuid is not honoured here: the test proves nothing"
    assert without["shadow"]["rc"] == 0
    assert caps.parse_proc_status(without["status"]["out"])["CapEff"] != 0

    got = in_child(dropped)
    assert got["id"]["rc"] == 0
    assert got["id"]["out"].startswith(f"uid={NOBODY}")
    assert "euid=" not in got["id"]["out"]
    # With an empty bounding set the kernel refuses to exec a binary whose file
    # capabilities it cannot grant (capabilities(7), "capability-dumb binaries").
    assert got["shadow"] == {"exec_errno": errno.EPERM}
    assert got["status"] == {"exec_errno": errno.EPERM}


def test_distro_setuid_and_setgid_binaries_stay_unprivileged() -> None:
    # passwd (setuid root) reports the caller's own account from /etc/shadow, and chage
    # (setgid shadow) lists it; both can only read the file with the privilege they
    # carry. Without it passwd falls back to placeholders and chage fails.
    def probes() -> dict[str, Any]:
        passwd = subprocess.run(
            ["passwd", "-S"], capture_output=True, text=True, check=False, env={"LC_ALL": "C"}
        )
        chage = subprocess.run(
            ["chage", "-l", "nobody"], capture_output=True, text=True, check=False
        )
        return {"passwd": passwd.stdout, "chage_rc": chage.returncode, "chage": chage.stderr}

    def control() -> dict[str, Any]:
        caps.switch_user(NOBODY, NOBODY)
        return probes()

    def dropped() -> dict[str, Any]:
        sandboxed()
        return probes()

    as_root = subprocess.run(
        ["passwd", "-S", "nobody"], capture_output=True, text=True, check=True, env={"LC_ALL": "C"}
    ).stdout
    without = in_child(control)
    assert without["passwd"] == as_root, "the setuid bit is not honoured: the test proves nothing"
    assert without["chage_rc"] == 0

    got = in_child(dropped)
    assert got["passwd"].startswith("nobody ")
    assert got["passwd"] != as_root
    assert got["chage_rc"] != 0
    assert "/etc/shadow" in got["chage"]
