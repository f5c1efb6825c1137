"""The sandbox's seccomp filter: a classic BPF program built here, byte for byte.

Owns the policy (which system calls the sandboxed command may not make), the
per-architecture syscall numbers it names, the program that encodes it, and the
one call that installs it.

The policy is allow-by-default with a deny list, like Docker's and nsjail's
defaults: the sandbox already runs as an unprivileged uid with no capabilities,
in its own namespaces, so the filter does not carry the isolation alone. It
removes what that leaves reachable: kernel attack surface open to any user
(namespaces, io_uring, bpf, keyrings, userfaultfd, perf, AF_PACKET/AF_VSOCK),
and, belt and braces, the calls that would be fatal if a capability slipped
through (mount, modules, kexec, reboot, the clock).

Pure part: `build_filter(arch)` and `describe(arch)` (no root, no side effects).
Effect: `install_filter(program)`, in the forked child right before exec; it
needs no_new_privs (see runner/caps.py: `set_no_new_privs`, `drop_privileges`).
Build the program in the parent and install it in the child: the child then
only makes one prctl call. The child is single-threaded, so no TSYNC flag.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from . import syscalls


class SeccompError(Exception):
    """The filter could not be built or installed; the command must not start."""


# linux/audit.h: seccomp_data.arch values.
AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_AARCH64 = 0xC00000B7
# x86_64's x32 ABI: same entry point, syscall numbers with this bit set.
X32_SYSCALL_BIT = 0x40000000

# linux/seccomp.h: filter return values (action in the high 16 bits, data in the low).
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_DATA = 0x0000FFFF

# linux/filter.h: the classic BPF opcodes this program uses.
BPF_LD_W_ABS = 0x20  # A = 32-bit word at seccomp_data + k
BPF_JEQ_K = 0x15  # pc += (A == k) ? jt : jf
BPF_JSET_K = 0x45  # pc += (A & k) ? jt : jf
BPF_RET_K = 0x06  # return k
BPF_MAXINSNS = 4096

# struct seccomp_data { int nr; u32 arch; u64 instruction_pointer; u64 args[6]; }
_OFF_NR = 0
_OFF_ARCH = 4
_OFF_ARG0_LOW = 16  # both supported architectures are little-endian

# linux/sched.h. In clone() the low byte is the exit signal (CSIGNAL), so 0x80 there
# could only be a signal >= 128, which is invalid: denying it costs nothing and keeps
# one mask meaning "any namespace".
CLONE_NEWTIME = 0x00000080
CLONE_NAMESPACE_FLAGS = (
    syscalls.CLONE_NEWNS
    | syscalls.CLONE_NEWCGROUP
    | syscalls.CLONE_NEWUTS
    | syscalls.CLONE_NEWIPC
    | syscalls.CLONE_NEWUSER
    | syscalls.CLONE_NEWPID
    | syscalls.CLONE_NEWNET
    | CLONE_NEWTIME
)

AF_PACKET = 17
AF_VSOCK = 40
DENIED_SOCKET_FAMILIES = (
    # Raw frames on eth0: forged ARP and non-IP traffic that the inet nftables table
    # never sees, and a long CVE history.
    AF_PACKET,
    # vsock is not network-namespaced: inside a VM it reaches the hypervisor host,
    # around the sandbox's netns and the gateway entirely.
    AF_VSOCK,
)

# personality(2) values Docker's default profile allows: Linux, 32-bit uname
# (linux32), 2.6-style uname, both, and the 0xffffffff query. The other flags
# (ADDR_NO_RANDOMIZE, READ_IMPLIES_EXEC, MMAP_PAGE_ZERO, ...) switch exploit
# mitigations off for everything the sandbox execs; no build or test needs them.
ALLOWED_PERSONALITIES = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)

# Denied with EPERM, grouped by why. A call missing from an architecture's table
# (iopl, ioperm, uselib on aarch64) does not exist there and needs no rule.
_DENY_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "namespaces and mounts: the filesystem view and namespaces are set up before exec "
        "and must stay as built (the new mount API included)",
        (
            "mount",
            "umount2",
            "pivot_root",
            "chroot",
            "unshare",
            "setns",
            "fsopen",
            "fsconfig",
            "fsmount",
            "fspick",
            "move_mount",
            "open_tree",
            "open_tree_attr",
            "mount_setattr",
        ),
    ),
    (
        "kernel keyrings: not namespaced, shared with the host's users",
        ("keyctl", "add_key", "request_key"),
    ),
    (
        "large kernel attack surface reachable without privilege (io_uring also runs "
        "operations that seccomp never sees)",
        (
            "bpf",
            "perf_event_open",
            "userfaultfd",
            "io_uring_setup",
            "io_uring_enter",
            "io_uring_register",
        ),
    ),
    (
        "kernel code and machine state",
        (
            "init_module",
            "finit_module",
            "delete_module",
            "kexec_load",
            "kexec_file_load",
            "reboot",
            "swapon",
            "swapoff",
            "acct",
            "iopl",
            "ioperm",
            "syslog",
        ),
    ),
    (
        "the host's clock (adjtimex too: it both reads and sets, one call)",
        ("settimeofday", "clock_settime", "clock_adjtime", "adjtimex"),
    ),
    (
        "reaching into other processes: ptrace and the calls with its power "
        "(older kernels let ptrace rewrite syscalls past seccomp)",
        ("ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd"),
    ),
    (
        "file handles: open_by_handle_at opens any inode on a mounted filesystem, "
        "outside the mount view (the 'shocker' escape)",
        ("open_by_handle_at", "name_to_handle_at"),
    ),
    (
        "obsolete, or only for a console the sandbox does not own",
        ("uselib", "lookup_dcookie", "vhangup"),
    ),
)

DENIED_SYSCALLS: tuple[str, ...] = tuple(name for _, names in _DENY_GROUPS for name in names)

# The syscall numbers the filter names: arch/x86/entry/syscalls/syscall_64.tbl and
# include/uapi/asm-generic/unistd.h (aarch64). tests/unit checks them against the
# installed kernel headers.
_X86_64 = MappingProxyType(
    {
        "clone": 56,
        "clone3": 435,
        "socket": 41,
        "personality": 135,
        "mount": 165,
        "umount2": 166,
        "pivot_root": 155,
        "chroot": 161,
        "unshare": 272,
        "setns": 308,
        "fsopen": 430,
        "fsconfig": 431,
        "fsmount": 432,
        "fspick": 433,
        "move_mount": 429,
        "open_tree": 428,
        "open_tree_attr": 467,
        "mount_setattr": 442,
        "keyctl": 250,
        "add_key": 248,
        "request_key": 249,
        "bpf": 321,
        "perf_event_open": 298,
        "userfaultfd": 323,
        "io_uring_setup": 425,
        "io_uring_enter": 426,
        "io_uring_register": 427,
        "init_module": 175,
        "finit_module": 313,
        "delete_module": 176,
        "kexec_load": 246,
        "kexec_file_load": 320,
        "reboot": 169,
        "swapon": 167,
        "swapoff": 168,
        "acct": 163,
        "iopl": 172,
        "ioperm": 173,
        "syslog": 103,
        "settimeofday": 164,
        "clock_settime": 227,
        "clock_adjtime": 305,
        "adjtimex": 159,
        "ptrace": 101,
        "process_vm_readv": 310,
        "process_vm_writev": 311,
        "kcmp": 312,
        "pidfd_getfd": 438,
        "open_by_handle_at": 304,
        "name_to_handle_at": 303,
        "uselib": 134,
        "lookup_dcookie": 212,
        "vhangup": 153,
    }
)
_AARCH64 = MappingProxyType(
    {
        "clone": 220,
        "clone3": 435,
        "socket": 198,
        "personality": 92,
        "mount": 40,
        "umount2": 39,
        "pivot_root": 41,
        "chroot": 51,
        "unshare": 97,
        "setns": 268,
        "fsopen": 430,
        "fsconfig": 431,
        "fsmount": 432,
        "fspick": 433,
        "move_mount": 429,
        "open_tree": 428,
        "open_tree_attr": 467,
        "mount_setattr": 442,
        "keyctl": 219,
        "add_key": 217,
        "request_key": 218,
        "bpf": 280,
        "perf_event_open": 241,
        "userfaultfd": 282,
        "io_uring_setup": 425,
        "io_uring_enter": 426,
        "io_uring_register": 427,
        "init_module": 105,
        "finit_module": 273,
        "delete_module": 106,
        "kexec_load": 104,
        "kexec_file_load": 294,
        "reboot": 142,
        "swapon": 224,
        "swapoff": 225,
        "acct": 89,
        "syslog": 116,
        "settimeofday": 170,
        "clock_settime": 112,
        "clock_adjtime": 266,
        "adjtimex": 171,
        "ptrace": 117,
        "process_vm_readv": 270,
        "process_vm_writev": 271,
        "kcmp": 272,
        "pidfd_getfd": 438,
        "open_by_handle_at": 265,
        "name_to_handle_at": 264,
        "lookup_dcookie": 18,
        "vhangup": 58,
    }
)
SYSCALL_NUMBERS: Mapping[str, Mapping[str, int]] = MappingProxyType(
    {"x86_64": _X86_64, "aarch64": _AARCH64}
)


@dataclass(frozen=True)
class _ArchSpec:
    audit_arch: int
    has_x32: bool


_ARCHES: Mapping[str, _ArchSpec] = MappingProxyType(
    {
        "x86_64": _ArchSpec(AUDIT_ARCH_X86_64, has_x32=True),
        "aarch64": _ArchSpec(AUDIT_ARCH_AARCH64, has_x32=False),
    }
)


def syscall_numbers(arch: str) -> Mapping[str, int]:
    """The syscall numbers the filter uses on `arch`; ValueError for an unknown one."""
    if arch not in _ARCHES:
        supported = ", ".join(sorted(_ARCHES))
        raise ValueError(
            f"seccomp: no syscall table for architecture {arch!r} (supported: {supported})"
        )
    return SYSCALL_NUMBERS[arch]


# --- a tiny assembler: instructions with label targets, resolved to offsets ---


@dataclass(frozen=True)
class _Insn:
    code: int
    k: int
    jt: str | None = None  # label to jump to when true; None: the next instruction
    jf: str | None = None
    note: str = ""


@dataclass(frozen=True)
class _Label:
    name: str


@dataclass(frozen=True)
class _Resolved:
    code: int
    jt: int
    jf: int
    k: int
    note: str


def _load(offset: int, note: str) -> _Insn:
    return _Insn(BPF_LD_W_ABS, offset, note=note)


def _ret(action: int, note: str) -> _Insn:
    return _Insn(BPF_RET_K, action, note=note)


def _assemble(items: list[_Insn | _Label]) -> list[_Resolved]:
    where: dict[str, int] = {}
    pc = 0
    for item in items:
        if isinstance(item, _Label):
            where[item.name] = pc
        else:
            pc += 1
    out: list[_Resolved] = []
    for item in items:
        if isinstance(item, _Label):
            continue
        pc = len(out)

        def offset(label: str | None, pc: int = pc) -> int:
            if label is None:
                return 0
            # Classic BPF only jumps forward, at most 255 instructions.
            off = where[label] - pc - 1
            if not 0 <= off <= 255:
                raise SeccompError(f"seccomp: jump to {label!r} out of range ({off})")
            return off

        out.append(_Resolved(item.code, offset(item.jt), offset(item.jf), item.k, item.note))
    if len(out) > BPF_MAXINSNS:
        raise SeccompError(f"seccomp: program too long ({len(out)} > {BPF_MAXINSNS})")
    return out


def _errno(code: int) -> int:
    return SECCOMP_RET_ERRNO | (code & SECCOMP_RET_DATA)


def _program(arch: str) -> list[_Resolved]:
    table = syscall_numbers(arch)
    spec = _ARCHES[arch]
    items: list[_Insn | _Label] = [
        # Syscall numbers mean different calls under another ABI (i386 via int 0x80,
        # AArch32): a deny list checked against the wrong table denies nothing.
        _load(_OFF_ARCH, "A = arch"),
        _Insn(BPF_JEQ_K, spec.audit_arch, jf="kill", note=f"{arch} ABI only"),
        _load(_OFF_NR, "A = syscall number"),
    ]
    if spec.has_x32:
        # x32 shares x86_64's audit arch; its numbers carry bit 30 and would slip past.
        items.append(_Insn(BPF_JSET_K, X32_SYSCALL_BIT, jt="x32", note="x32 ABI?"))
    items += [
        _Insn(BPF_JEQ_K, table["clone"], jt="clone", note="clone: check flags"),
        _Insn(BPF_JEQ_K, table["socket"], jt="socket", note="socket: check family"),
        _Insn(BPF_JEQ_K, table["personality"], jt="personality", note="personality: check"),
        # clone3's flags live in memory that BPF cannot read. ENOSYS makes glibc fall
        # back to clone(), whose flags it can (what Docker does).
        _Insn(BPF_JEQ_K, table["clone3"], jt="enosys", note="clone3"),
    ]
    items += [
        _Insn(BPF_JEQ_K, table[name], jt="eperm", note=name)
        for name in DENIED_SYSCALLS
        if name in table
    ]
    items += [
        _ret(SECCOMP_RET_ALLOW, "everything else"),
        # The kernel reads clone flags and socket family as 32-bit values, so the
        # low half of args[0] is all there is to check.
        _Label("clone"),
        _load(_OFF_ARG0_LOW, "A = clone flags"),
        _Insn(BPF_JSET_K, CLONE_NAMESPACE_FLAGS, jt="eperm", jf="allow", note="CLONE_NEW*"),
        _Label("socket"),
        _load(_OFF_ARG0_LOW, "A = socket family"),
    ]
    items += [
        _Insn(BPF_JEQ_K, family, jt="eperm", note=f"family {family}")
        for family in DENIED_SOCKET_FAMILIES
    ]
    items += [
        _ret(SECCOMP_RET_ALLOW, "other socket families"),
        _Label("personality"),
        _load(_OFF_ARG0_LOW, "A = persona"),
    ]
    items += [
        _Insn(BPF_JEQ_K, persona, jt="allow", note=f"persona {persona:#x}")
        for persona in ALLOWED_PERSONALITIES
    ]
    items.append(_ret(_errno(errno.EPERM), "other personas"))
    if spec.has_x32:
        # syscall(-1) also has bit 30 set; the kernel answers it with ENOSYS, so it is
        # no x32 call and need not kill.
        items += [
            _Label("x32"),
            _Insn(BPF_JEQ_K, 0xFFFFFFFF, jt="allow", jf="kill", note="nr == -1?"),
        ]
    items += [
        _Label("allow"),
        _ret(SECCOMP_RET_ALLOW, "allow"),
        _Label("eperm"),
        _ret(_errno(errno.EPERM), "deny: EPERM"),
        _Label("enosys"),
        _ret(_errno(errno.ENOSYS), "deny: ENOSYS"),
        _Label("kill"),
        _ret(SECCOMP_RET_KILL_PROCESS, "foreign ABI: kill the process"),
    ]
    return _assemble(items)


def build_filter(arch: str = os.uname().machine) -> bytes:
    """The filter for `arch` as an array of struct sock_filter (8 bytes each).

    Raises ValueError when there is no syscall table for `arch`.
    """
    return b"".join(
        struct.pack("=HBBI", insn.code, insn.jt, insn.jf, insn.k) for insn in _program(arch)
    )


_MNEMONICS = MappingProxyType(
    {BPF_LD_W_ABS: "ld", BPF_JEQ_K: "jeq", BPF_JSET_K: "jset", BPF_RET_K: "ret"}
)


def describe(arch: str = os.uname().machine) -> str:
    """The policy in words, then the program as a listing: for docs and debugging."""
    table = syscall_numbers(arch)
    lines = [
        f"seccomp filter for {arch} (allow by default)",
        f"  any other ABI ({'x32, ' if _ARCHES[arch].has_x32 else ''}32-bit): kill the process",
    ]
    for why, names in _DENY_GROUPS:
        present = [f"{n}({table[n]})" for n in names if n in table]
        if present:
            lines.append(f"  EPERM, {why}:")
            lines.append(f"    {' '.join(present)}")
    lines += [
        f"  EPERM: clone({table['clone']}) with any CLONE_NEW* flag "
        f"(mask {CLONE_NAMESPACE_FLAGS:#010x})",
        f"  ENOSYS: clone3({table['clone3']}), so that libc falls back to clone",
        f"  EPERM: socket({table['socket']}) with family "
        + ", ".join(str(f) for f in DENIED_SOCKET_FAMILIES),
        f"  EPERM: personality({table['personality']}) except "
        + ", ".join(f"{p:#x}" for p in ALLOWED_PERSONALITIES),
        "",
    ]
    for pc, insn in enumerate(_program(arch)):
        op = _MNEMONICS[insn.code]
        if insn.code == BPF_LD_W_ABS:
            text = f"{op}   [{insn.k}]"
        elif insn.code == BPF_RET_K:
            text = f"{op}  {insn.k:#010x}"
        else:
            text = f"{op} {insn.k:#x}, {pc + 1 + insn.jt}, {pc + 1 + insn.jf}"
        lines.append(f"  {pc:3d}: {text:<32} ; {insn.note}")
    return "\n".join(lines) + "\n"


def install_filter(program: bytes) -> None:
    """Install `program` on the calling process; it holds for it and all it execs.

    Irreversible. Requires no_new_privs already set (runner/caps.py): the kernel
    would also accept CAP_SYS_ADMIN instead, but a filter under which a setuid
    binary could still gain privilege is what no_new_privs exists to prevent, so
    this refuses rather than relying on the capability.
    """
    if syscalls.prctl(syscalls.PR_GET_NO_NEW_PRIVS) != 1:
        raise SeccompError(
            "seccomp: no_new_privs is not set; call caps.set_no_new_privs() "
            "(or caps.drop_privileges()) before installing the filter"
        )
    try:
        syscalls.seccomp_set_mode_filter(program)
    except ValueError as exc:
        raise SeccompError(f"seccomp: {exc}") from exc
    except OSError as exc:
        hint = {
            errno.EINVAL: "the kernel rejected the program, or lacks CONFIG_SECCOMP_FILTER",
            errno.EACCES: "no_new_privs is not in effect",
            errno.ENOMEM: "too many filters or instructions already installed",
        }.get(exc.errno or 0, "")
        raise SeccompError(
            f"seccomp: installing the filter failed: {exc}" + (f" ({hint})" if hint else "")
        ) from exc
