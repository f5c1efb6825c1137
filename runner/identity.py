"""Who the sandboxed command runs as: always an unprivileged uid/gid, never the host's root.

Owns resolving `--user`, the invoking user (SUDO_UID/SUDO_GID) and the dedicated
sandbox user into numeric ids, and refusing root.
"""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Mapping
from dataclasses import dataclass

# Made by scripts/install (useradd --system); `nobody` where it does not exist.
SANDBOX_USER = "_sandgate"
NOBODY = 65534


class IdentityError(Exception):
    """The requested user cannot run sandboxed code; the message says why."""


@dataclass(frozen=True)
class Identity:
    uid: int
    gid: int
    name: str  # for USER/LOGNAME inside; "sandbox" when the uid has no passwd entry
    source: str  # "--user", "SUDO_UID", "sandbox user", "nobody", "user namespace"
    # `--user root`: uid/gid are 0 inside a user namespace whose root is these host ids.
    userns: tuple[int, int] | None = None


def _name_of(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return "sandbox"


def _parse_user(spec: str) -> tuple[int, int]:
    user, _, group = spec.partition(":")
    if not user:
        raise IdentityError(f"--user {spec!r}: expected USER[:GROUP] (names or numbers)")
    if user.isdigit():
        uid = int(user)
        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            gid = uid  # a bare uid with no passwd entry: its own group number
    else:
        try:
            entry = pwd.getpwnam(user)
        except KeyError as exc:
            raise IdentityError(f"--user {spec!r}: no such user {user!r}") from exc
        uid, gid = entry.pw_uid, entry.pw_gid
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError as exc:
                raise IdentityError(f"--user {spec!r}: no such group {group!r}") from exc
    return uid, gid


def _sandbox_user() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(SANDBOX_USER)
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return NOBODY, NOBODY


def resolve_identity(user: str | None, environ: Mapping[str, str] | None = None) -> Identity:
    """`--user` if given, else the invoking user behind sudo, else the sandbox user.

    Root (uid or gid 0) is refused: a sandbox never runs code as the host's root.
    `--user root` (the name) means root inside a user namespace whose root is the
    sandbox user on the host; `--user 0` stays refused, so the difference is explicit.
    """
    env = os.environ if environ is None else environ
    if user == "root":
        host = _sandbox_user()
        return Identity(uid=0, gid=0, name="root", source="user namespace", userns=host)
    if user is not None:
        uid, gid = _parse_user(user)
        source = "--user"
    elif env.get("SUDO_UID", "").isdigit() and env["SUDO_UID"] != "0":
        uid = int(env["SUDO_UID"])
        gid = int(env["SUDO_GID"]) if env.get("SUDO_GID", "").isdigit() else uid
        source = "SUDO_UID"
    else:
        (uid, gid), source = _sandbox_user(), "sandbox user"
    if uid == 0 or gid == 0:
        raise IdentityError(
            f"refusing to run sandboxed code as uid {uid} gid {gid}: root on the host is "
            "never used inside a sandbox (pick an unprivileged --user)"
        )
    return Identity(uid=uid, gid=gid, name=_name_of(uid), source=source)
