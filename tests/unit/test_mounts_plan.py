"""The sandbox's filesystem plan, without root: what goes in, what never does."""

from __future__ import annotations

import os

import pytest

from runner.mounts import FilesystemSpec, MountError, plan_mounts


@pytest.fixture
def host(tmp_path):
    """A tiny host tree: merged-/usr symlinks, /etc with sandgate's config, a project."""
    for d in ("usr/bin", "usr/lib", "etc/sandgate", "home/alice/proj", "root", "var/lib/sandgate"):
        (tmp_path / d).mkdir(parents=True)
    for link, target in (("bin", "usr/bin"), ("lib", "usr/lib")):
        os.symlink(target, tmp_path / link)
    return tmp_path


def test_system_dirs_are_read_only_and_symlinks_are_recreated(host):
    plan = plan_mounts(FilesystemSpec(), host_root=str(host))
    assert ("/bin", "usr/bin") in plan.symlinks and ("/lib", "usr/lib") in plan.symlinks
    ro = {b.target for b in plan.binds if not b.writable}
    assert {"/usr", "/etc"} <= ro
    assert not any(b.writable for b in plan.binds)  # no workspace given: tmpfs
    assert "/etc/sandgate" in plan.masked


def test_private_tmpfs_and_home_belong_to_the_sandbox_user(host):
    plan = plan_mounts(FilesystemSpec(uid=1234, gid=4321), host_root=str(host))
    tmpfs = dict(plan.tmpfs)
    assert set(tmpfs) == {"/tmp", "/run", "/home/sandbox", "/workspace"}
    assert "uid=1234,gid=4321" in tmpfs["/home/sandbox"]
    assert "mode=1777" in tmpfs["/tmp"]


def test_nothing_sensitive_is_ever_planned(host):
    plan = plan_mounts(FilesystemSpec(), host_root=str(host))
    targets = {b.target for b in plan.binds} | {t for t, _ in plan.tmpfs}
    assert not targets & {"/root", "/home", "/var", "/var/lib/sandgate", "/sys", "/run/sandgate"}


def test_workspace_is_bound_read_write(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    plan = plan_mounts(FilesystemSpec(workspace=str(ws)))
    (bind,) = [b for b in plan.binds if b.target == "/workspace"]
    assert bind.writable and bind.source == str(ws)
    assert "/workspace" not in dict(plan.tmpfs)


@pytest.mark.parametrize(
    ("flag", "path", "message"),
    [
        ("ro", "/root", "never mounted"),
        ("rw", "/var/lib/sandgate", "never mounted"),
        ("rw", "/var", "never mounted"),  # it holds /var/lib/sandgate
        ("ro", "/etc", "never mounted"),  # it holds /etc/sandgate
        ("ro", "/", "never mounted"),
        ("ro", "/home", "as a whole"),
        ("ro", "/proc/1", "never mounted"),
        ("ro", "relative/path", "absolute"),
        ("rw", "/nonexistent/sandgate-test", "does not exist"),
    ],
)
def test_forbidden_and_bad_extra_paths_are_refused(flag, path, message):
    spec = FilesystemSpec(ro=(path,)) if flag == "ro" else FilesystemSpec(rw=(path,))
    with pytest.raises(MountError, match=message):
        plan_mounts(spec)


def test_a_symlinked_extra_path_is_resolved_before_it_is_bound(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / "link")
    plan = plan_mounts(FilesystemSpec(ro=(str(tmp_path / "link"),)))
    (bind,) = [b for b in plan.binds if b.target == str(tmp_path / "link")]
    assert bind.source == str(real) and not bind.writable


def test_a_symlink_into_a_forbidden_place_is_refused(tmp_path):
    os.symlink("/root", tmp_path / "sneaky")
    with pytest.raises(MountError, match="never mounted"):
        plan_mounts(FilesystemSpec(rw=(str(tmp_path / "sneaky"),)))


def test_two_mounts_on_one_target_are_refused(tmp_path):
    with pytest.raises(MountError, match="more than one mount"):
        plan_mounts(FilesystemSpec(ro=(str(tmp_path),), rw=(str(tmp_path),)))
