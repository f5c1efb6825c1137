"""The seccomp program, checked as bytes and by running it on synthetic seccomp_data.

The interpreter below implements the classic BPF subset seccomp accepts for
these opcodes, with the kernel checker's rules (forward jumps inside the program,
aligned loads inside struct seccomp_data, a return at the end), so a program it
runs is one the kernel would run the same way.
"""

from __future__ import annotations

import errno
import os
import re
import struct

import pytest

from runner import seccomp

ARCHES = ("x86_64", "aarch64")
AUDIT_ARCH = {"x86_64": seccomp.AUDIT_ARCH_X86_64, "aarch64": seccomp.AUDIT_ARCH_AARCH64}
AUDIT_ARCH_I386 = 0x40000003
AUDIT_ARCH_ARM = 0x40000028
# Syscalls the filter does not name; numbers from the same kernel tables.
PLAIN = {
    "x86_64": {"read": 0, "write": 1, "execve": 59, "openat": 257, "setresuid": 117},
    "aarch64": {"read": 63, "write": 64, "execve": 221, "openat": 56, "setresuid": 147},
}

ALLOW = seccomp.SECCOMP_RET_ALLOW
KILL = seccomp.SECCOMP_RET_KILL_PROCESS
EPERM = seccomp.SECCOMP_RET_ERRNO | errno.EPERM
ENOSYS = seccomp.SECCOMP_RET_ERRNO | errno.ENOSYS

SIGCHLD = 17
FORK_FLAGS = 0x01200000 | SIGCHLD  # CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID, as glibc fork
THREAD_FLAGS = 0x003D0F00  # glibc pthread_create: VM|FS|FILES|SIGHAND|THREAD|SYSVSEM|SETTLS|...


def decode(program: bytes) -> list[tuple[int, int, int, int]]:
    return [struct.unpack_from("=HBBI", program, off) for off in range(0, len(program), 8)]


def run_filter(program: bytes, nr: int, arch: int, args: tuple[int, ...] = ()) -> int:
    """What the kernel would do with this syscall: the filter's return value."""
    args = tuple(args) + (0,) * (6 - len(args))
    data = struct.pack("<iIQ6Q", nr, arch, 0x401000, *args)
    insns = decode(program)
    pc = 0
    acc = 0
    while True:
        assert 0 <= pc < len(insns), f"fell off the program at {pc}"
        code, jt, jf, k = insns[pc]
        pc += 1
        if code == seccomp.BPF_LD_W_ABS:
            assert k % 4 == 0 and k + 4 <= len(data), f"bad load offset {k}"
            acc = int.from_bytes(data[k : k + 4], "little")
        elif code == seccomp.BPF_JEQ_K:
            pc += jt if acc == k else jf
        elif code == seccomp.BPF_JSET_K:
            pc += jt if acc & k else jf
        elif code == seccomp.BPF_RET_K:
            return k
        else:
            raise AssertionError(f"opcode {code:#x} at {pc - 1} is not one seccomp accepts here")


def table(arch: str) -> dict[str, int]:
    return dict(seccomp.syscall_numbers(arch))


def call(arch: str, name: str, *args: int) -> int:
    nr = table(arch)[name] if name in table(arch) else PLAIN[arch][name]
    return run_filter(seccomp.build_filter(arch), nr, AUDIT_ARCH[arch], args)


# --- the bytes ---


@pytest.mark.parametrize("arch", ARCHES)
def test_program_is_whole_sock_filters_within_kernel_limit(arch: str) -> None:
    program = seccomp.build_filter(arch)
    assert len(program) % 8 == 0
    assert 0 < len(program) // 8 <= seccomp.BPF_MAXINSNS
    assert decode(program)[-1][0] == seccomp.BPF_RET_K


@pytest.mark.parametrize("arch", ARCHES)
def test_program_starts_with_the_arch_check(arch: str) -> None:
    first, second = decode(seccomp.build_filter(arch))[:2]
    assert first == (seccomp.BPF_LD_W_ABS, 0, 0, 4)  # A = seccomp_data.arch
    assert second[0] == seccomp.BPF_JEQ_K and second[3] == AUDIT_ARCH[arch]


@pytest.mark.parametrize("arch", ARCHES)
def test_every_jump_stays_inside_the_program(arch: str) -> None:
    insns = decode(seccomp.build_filter(arch))
    for pc, (code, jt, jf, _k) in enumerate(insns):
        if code in (seccomp.BPF_JEQ_K, seccomp.BPF_JSET_K):
            assert pc + 1 + max(jt, jf) < len(insns)


@pytest.mark.parametrize("arch", ARCHES)
def test_program_compares_against_every_denied_syscall_number(arch: str) -> None:
    insns = decode(seccomp.build_filter(arch))
    compared = {k for code, _, _, k in insns if code == seccomp.BPF_JEQ_K}
    for name in seccomp.DENIED_SYSCALLS:
        if name in table(arch):
            assert table(arch)[name] in compared, name


def test_default_arch_is_this_machine() -> None:
    machine = os.uname().machine
    if machine not in ARCHES:
        pytest.skip(f"no table for {machine}")
    assert seccomp.build_filter() == seccomp.build_filter(machine)


@pytest.mark.parametrize("arch", ["riscv64", "i686", "armv7l", ""])
def test_unknown_arch_is_refused_by_name(arch: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(arch))):
        seccomp.build_filter(arch)
    with pytest.raises(ValueError, match="supported: aarch64, x86_64"):
        seccomp.describe(arch)


def test_x86_64_table_names_every_denied_syscall_and_aarch64_lacks_only_legacy_ones() -> None:
    assert set(seccomp.DENIED_SYSCALLS) <= set(table("x86_64"))
    missing = set(seccomp.DENIED_SYSCALLS) - set(table("aarch64"))
    assert missing == {"iopl", "ioperm", "uselib"}


def test_denied_names_are_unique() -> None:
    assert len(seccomp.DENIED_SYSCALLS) == len(set(seccomp.DENIED_SYSCALLS))


def _header_numbers(path: str) -> dict[str, int]:
    found: dict[str, int] = {}
    with open(path) as f:
        for line in f:
            m = re.match(r"#define __NR(?:3264)?_(\w+)\s+(\d+)\s*$", line)
            if m:
                found.setdefault(m.group(1), int(m.group(2)))
    return found


@pytest.mark.parametrize(
    ("arch", "header"),
    [
        ("x86_64", "/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
        ("aarch64", "/usr/include/asm-generic/unistd.h"),
    ],
)
def test_syscall_numbers_match_the_kernel_headers(arch: str, header: str) -> None:
    if not os.path.exists(header):
        pytest.skip(f"{header} not installed (linux-libc-dev)")
    numbers = _header_numbers(header)
    checked = 0
    for name, nr in table(arch).items():
        if name in numbers:  # older headers lack the newest calls (open_tree_attr)
            assert numbers[name] == nr, f"{arch} {name}: table {nr}, header {numbers[name]}"
            checked += 1
    assert checked >= len(table(arch)) - 2


# --- the behaviour, by running the program ---


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("name", ["read", "write", "execve", "openat", "setresuid"])
def test_ordinary_syscalls_are_allowed(arch: str, name: str) -> None:
    assert call(arch, name, 3, 0x7FFF0000, 4096) == ALLOW


@pytest.mark.parametrize("arch", ARCHES)
def test_every_denied_syscall_gets_eperm(arch: str) -> None:
    for name in seccomp.DENIED_SYSCALLS:
        if name in table(arch):
            assert call(arch, name) == EPERM, name
            assert call(arch, name, 0xFFFFFFFF, 1, 2, 3, 4, 5) == EPERM, name


@pytest.mark.parametrize("arch", ARCHES)
def test_mount_gets_eperm(arch: str) -> None:
    assert call(arch, "mount", 0x1000, 0x2000, 0x3000, 0, 0) == EPERM


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize(
    "flag",
    [0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000, 0x80],
)
def test_clone_with_a_namespace_flag_gets_eperm(arch: str, flag: int) -> None:
    assert call(arch, "clone", flag | SIGCHLD) == EPERM
    assert call(arch, "clone", flag | FORK_FLAGS) == EPERM
    # The kernel reads the flags as 32 bits; junk in the high half changes nothing.
    assert call(arch, "clone", (0xDEAD << 32) | flag | SIGCHLD) == EPERM


@pytest.mark.parametrize("arch", ARCHES)
def test_clone_for_fork_and_threads_is_allowed(arch: str) -> None:
    assert call(arch, "clone", FORK_FLAGS, 0, 0, 0, 0) == ALLOW
    assert call(arch, "clone", THREAD_FLAGS, 0x7F0000, 0x7F1000, 0x7F2000, 0x7F3000) == ALLOW
    assert call(arch, "clone", 0x00004000 | 0x00000100 | SIGCHLD) == ALLOW  # vfork-style
    assert call(arch, "clone", (0xFFFFFFFF << 32) | SIGCHLD) == ALLOW


@pytest.mark.parametrize("arch", ARCHES)
def test_clone3_gets_enosys_whatever_its_arguments(arch: str) -> None:
    assert call(arch, "clone3") == ENOSYS
    assert call(arch, "clone3", 0x7FFF1000, 88) == ENOSYS


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("family", [seccomp.AF_PACKET, seccomp.AF_VSOCK])
def test_socket_packet_and_vsock_get_eperm(arch: str, family: int) -> None:
    assert call(arch, "socket", family, 3, 0x0300) == EPERM
    assert call(arch, "socket", (1 << 40) | family, 1, 0) == EPERM


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("family", [1, 2, 10, 16])  # AF_UNIX, AF_INET, AF_INET6, AF_NETLINK
def test_other_socket_families_are_allowed(arch: str, family: int) -> None:
    assert call(arch, "socket", family, 1, 0) == ALLOW
    assert call(arch, "socket", family, 2 | 0x80000, 0) == ALLOW


@pytest.mark.parametrize("arch", ARCHES)
def test_personality_only_docker_personas(arch: str) -> None:
    for persona in seccomp.ALLOWED_PERSONALITIES:
        assert call(arch, "personality", persona) == ALLOW
    assert call(arch, "personality", 0x0040000) == EPERM  # ADDR_NO_RANDOMIZE
    assert call(arch, "personality", 0x0400000) == EPERM  # READ_IMPLIES_EXEC
    assert call(arch, "personality", 0x0100000) == EPERM  # MMAP_PAGE_ZERO


@pytest.mark.parametrize(
    ("arch", "foreign"),
    [
        ("x86_64", AUDIT_ARCH_I386),
        ("x86_64", seccomp.AUDIT_ARCH_AARCH64),
        ("aarch64", AUDIT_ARCH_ARM),
        ("aarch64", seccomp.AUDIT_ARCH_X86_64),
    ],
)
def test_a_foreign_abi_is_killed(arch: str, foreign: int) -> None:
    program = seccomp.build_filter(arch)
    for nr in (0, 1, 3, 11, 21, 120):  # harmless and dangerous alike under another table
        assert run_filter(program, nr, foreign) == KILL


def test_x32_syscalls_are_killed_on_x86_64() -> None:
    program = seccomp.build_filter("x86_64")
    for nr in (0, 1, 165, 272, 512 + 8):
        assert run_filter(program, seccomp.X32_SYSCALL_BIT | nr, seccomp.AUDIT_ARCH_X86_64) == KILL


def test_syscall_minus_one_is_left_to_the_kernel() -> None:
    for arch in ARCHES:
        assert run_filter(seccomp.build_filter(arch), -1, AUDIT_ARCH[arch]) == ALLOW


@pytest.mark.parametrize("arch", ARCHES)
def test_describe_names_the_policy_and_lists_the_program(arch: str) -> None:
    text = seccomp.describe(arch)
    assert arch in text
    for name in seccomp.DENIED_SYSCALLS:
        if name in table(arch):
            assert f"{name}({table(arch)[name]})" in text
    listing = [line for line in text.splitlines() if re.match(r"\s+\d+: ", line)]
    assert len(listing) == len(seccomp.build_filter(arch)) // 8
