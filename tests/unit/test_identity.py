"""Who the command runs as: never root, and the documented order of defaults."""

from __future__ import annotations

import pwd

import pytest

from runner.identity import NOBODY, SANDBOX_USER, IdentityError, resolve_identity


def test_explicit_user_by_number_and_group():
    ident = resolve_identity("1234:5678", environ={})
    assert (ident.uid, ident.gid, ident.source) == (1234, 5678, "--user")


def test_explicit_user_by_name():
    ident = resolve_identity("nobody", environ={})
    assert ident.uid == pwd.getpwnam("nobody").pw_uid


def test_the_user_behind_sudo_comes_next():
    ident = resolve_identity(None, environ={"SUDO_UID": "1000", "SUDO_GID": "1001"})
    assert (ident.uid, ident.gid, ident.source) == (1000, 1001, "SUDO_UID")


def test_then_the_sandbox_user_or_nobody():
    ident = resolve_identity(None, environ={})
    try:
        expected = pwd.getpwnam(SANDBOX_USER).pw_uid
    except KeyError:
        expected = NOBODY
    assert ident.uid == expected and ident.uid != 0


@pytest.mark.parametrize("spec", ["0", "0:0", "1000:0", "nobody:root"])
def test_root_is_refused(spec):
    with pytest.raises(IdentityError, match="refusing"):
        resolve_identity(spec, environ={})


def test_sudo_by_root_falls_through_to_the_sandbox_user():
    assert resolve_identity(None, environ={"SUDO_UID": "0"}).uid != 0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no-such-user-x", "no such user"),
        ("nobody:no-such-group-x", "no such group"),
        (":1", "expected"),
    ],
)
def test_unknown_names_are_clear_errors(spec, message):
    with pytest.raises(IdentityError, match=message):
        resolve_identity(spec, environ={})


def test_user_root_means_root_in_a_user_namespace_of_the_sandbox_user():
    ident = resolve_identity("root", environ={"SUDO_UID": "1000"})
    assert (ident.uid, ident.gid, ident.source) == (0, 0, "user namespace")
    assert ident.userns is not None and 0 not in ident.userns
