"""Capabilities, the user switch and no_new_privs: the sandboxed command's privilege drop.

Owns everything that turns the forked, still-root child into an unprivileged
process before exec, and the read-back of that state (/proc/self/status) for
tests and `sandgate doctor`.

The order is forced by what each step needs (`drop_privileges` does it):

1. drop the bounding set     needs CAP_SETPCAP, so while still root;
2. clear the ambient set     (no capability needed; done early so nothing re-adds it);
3. switch_user               setgroups/setresgid need CAP_SETGID, setresuid CAP_SETUID;
                             going from uid 0 to a non-zero uid with KEEPCAPS off makes the
                             kernel clear the permitted, effective and ambient sets;
4. clear_capability_sets     the inheritable set survives setresuid; capset zeroes it and
                             makes the empty sets explicit (whatever the securebits say);
5. set_no_new_privs          so exec can never add privilege back (setuid bits, file caps);
6. verify                    read every set back: the command never starts half-dropped.

The seccomp filter (runner/seccomp.py) comes after this and right before exec: it
needs no_new_privs, and it denies the mount and namespace calls the setup before
step 1 still makes. Changing credentials clears PR_SET_PDEATHSIG, so the caller
sets it again after `drop_privileges`. Do not combine this with subprocess's
user=/group=/extra_groups=: those switch user before preexec_fn runs, after which
step 1 is no longer possible.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable

from . import syscalls

_ID_MAX = 0xFFFFFFFE  # (uid_t)-1 means "leave unchanged" to the set*id calls


class CapabilityError(Exception):
    """A privilege could not be dropped; the command must not start."""


def last_capability() -> int:
    """The highest capability number this kernel knows (CAP_LAST_CAP)."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        # No /proc (e.g. after pivot_root, before proc is mounted): ask the kernel, which
        # answers EINVAL for the first number past the last capability.
        cap = 0
        while True:
            try:
                syscalls.prctl(syscalls.PR_CAPBSET_READ, cap + 1)
            except OSError:
                return cap
            cap += 1


def _in_bounding_set(cap: int) -> bool:
    return syscalls.prctl(syscalls.PR_CAPBSET_READ, cap) == 1


def drop_bounding_set() -> None:
    """Remove every capability from the bounding set, so no exec can ever gain one.

    Needs CAP_SETPCAP; capabilities already absent are skipped, so calling it again
    later (without CAP_SETPCAP) succeeds as long as the set is already empty.
    """
    for cap in range(last_capability() + 1):
        if not _in_bounding_set(cap):
            continue
        try:
            syscalls.prctl(syscalls.PR_CAPBSET_DROP, cap)
        except OSError as exc:
            raise CapabilityError(
                f"cannot drop capability {cap} from the bounding set: {exc.strerror} "
                "(it needs CAP_SETPCAP: drop the bounding set before switching user)"
            ) from exc


def clear_ambient() -> None:
    """Empty the ambient set (capabilities that would survive exec for a non-root uid)."""
    try:
        syscalls.prctl(syscalls.PR_CAP_AMBIENT, syscalls.PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError as exc:
        # EINVAL: a kernel older than 4.3 has no ambient set, so it is empty.
        if exc.errno != errno.EINVAL:
            raise CapabilityError(f"cannot clear the ambient capability set: {exc}") from exc


def clear_capability_sets() -> None:
    """Set the effective, permitted and inheritable sets to empty (lowering needs no cap)."""
    try:
        syscalls.capset(0, 0, 0)
    except OSError as exc:
        raise CapabilityError(f"cannot clear the capability sets: {exc}") from exc


def drop_all_capabilities() -> None:
    """Bounding set, ambient set, then effective/permitted/inheritable: all empty.

    For a process that keeps its uid. To also change user, use `drop_privileges`:
    once the sets are empty there is no CAP_SETUID left to switch with.
    """
    drop_bounding_set()
    clear_ambient()
    clear_capability_sets()
    _verify_no_capabilities()


def set_no_new_privs() -> None:
    """PR_SET_NO_NEW_PRIVS: exec ignores setuid/setgid bits and file capabilities from now
    on, for this process and everything it starts. Irreversible. seccomp needs it."""
    try:
        syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
    except OSError as exc:
        raise CapabilityError(f"cannot set no_new_privs: {exc}") from exc


def _check_id(kind: str, value: int) -> None:
    if not 0 <= value <= _ID_MAX:
        raise CapabilityError(f"{kind} {value} is not a valid id (0..{_ID_MAX})")


def switch_user(uid: int, gid: int, groups: Iterable[int] = ()) -> None:
    """Set the supplementary groups, then real/effective/saved gid, then uid.

    Groups and gid first: after the uid changes there is no CAP_SETGID left. KEEPCAPS
    is turned off first, so leaving uid 0 empties the permitted and effective sets.
    """
    groups = list(groups)
    _check_id("uid", uid)
    _check_id("gid", gid)
    for group in groups:
        _check_id("supplementary gid", group)
    try:
        os.setgroups(groups)
        os.setresgid(gid, gid, gid)
        syscalls.prctl(syscalls.PR_SET_KEEPCAPS, 0)
        os.setresuid(uid, uid, uid)
    except OSError as exc:
        raise CapabilityError(
            f"cannot switch to uid {uid} gid {gid} groups {groups}: {exc} "
            "(it needs CAP_SETUID and CAP_SETGID: switch before clearing capabilities)"
        ) from exc
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise CapabilityError(
            f"switching to uid {uid} gid {gid} did not take: "
            f"uids {os.getresuid()}, gids {os.getresgid()}"
        )
    if set(os.getgroups()) != set(groups):
        raise CapabilityError(f"supplementary groups are {os.getgroups()}, not {groups}")


def drop_privileges(uid: int, gid: int, groups: Iterable[int] = ()) -> None:
    """The whole drop, in the one order that works (see the module docstring).

    Leaves the process as `uid`/`gid` with no capabilities in any set, an empty
    bounding set and no_new_privs. Refuses uid or gid 0: root without capabilities
    still owns root's files.
    """
    groups = list(groups)
    if uid == 0 or gid == 0 or 0 in groups:
        raise CapabilityError(
            f"refusing to run sandboxed code as uid/gid 0 (uid {uid}, gid {gid}, "
            f"groups {groups}); configure an unprivileged user"
        )
    drop_bounding_set()
    clear_ambient()
    switch_user(uid, gid, groups)
    clear_capability_sets()
    set_no_new_privs()
    _verify_no_capabilities()
    if syscalls.prctl(syscalls.PR_GET_NO_NEW_PRIVS) != 1:
        raise CapabilityError("no_new_privs did not take")


def _verify_no_capabilities() -> None:
    # Through syscalls rather than /proc, which may not be mounted at this point.
    effective, permitted, inheritable = syscalls.capget()
    left = {
        name: mask
        for name, mask in (
            ("effective", effective),
            ("permitted", permitted),
            ("inheritable", inheritable),
        )
        if mask
    }
    last = last_capability()
    bounding = [cap for cap in range(last + 1) if _in_bounding_set(cap)]
    ambient = [
        cap
        for cap in range(last + 1)
        if syscalls.prctl(syscalls.PR_CAP_AMBIENT, syscalls.PR_CAP_AMBIENT_IS_SET, cap) == 1
    ]
    if left or bounding or ambient:
        sets = ", ".join(f"{name} {mask:#x}" for name, mask in left.items())
        raise CapabilityError(
            f"capabilities remain after the drop: {sets or 'none in E/P/I'}; "
            f"bounding {bounding}; ambient {ambient}"
        )


_HEX_FIELDS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
_DECIMAL_FIELDS = ("NoNewPrivs", "Seccomp", "Seccomp_filters")


def parse_proc_status(text: str) -> dict[str, int]:
    """The capability masks, NoNewPrivs and Seccomp mode from a /proc/<pid>/status text."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in _HEX_FIELDS:
            out[key] = int(value.strip(), 16)
        elif key in _DECIMAL_FIELDS:
            out[key] = int(value.strip())
    return out


def current_capabilities() -> dict[str, int]:
    """This process's CapInh/CapPrm/CapEff/CapBnd/CapAmb masks, NoNewPrivs and Seccomp
    (0 off, 1 strict, 2 filter), as the kernel reports them in /proc/self/status."""
    with open("/proc/self/status") as f:
        return parse_proc_status(f.read())
