"""The Debian package (`make deb`, scripts/deb/build): what it holds, and sandgate run
from it, without installing anything on this host.

- Its control data and file list (dpkg-deb --info, --contents).
- Its files unpacked (dpkg -x) into a temporary tree. The venv in it is made for
  /opt/sandgate/venv, so it runs in a private mount namespace with the tree's /opt
  bind-mounted on /opt: `sandgate doctor --json`, `sandgate run --embedded`, and
  `systemd-analyze verify` of the packaged unit (with the tree's /usr/bin overlaid on
  /usr/bin, so its ExecStart=/usr/bin/sandgate exists).
- `apt-get install ./sandgate_*.deb`, a reinstallation, `apt-get remove` and `purge`
  in a chroot that is a throwaway overlay of this host's root file system, with its
  own /run (no systemd to reach) and /tmp: the maintainer scripts, the conffile, and
  sandgate run from the installed package. The overlay's upper layer is a tmpfs of the
  mount namespace, so all of it vanishes with the namespace.

The package is dist/sandgate_<version>_<arch>.deb when that exists and is newer than
everything it is made of (or $SANDGATE_DEB); otherwise these tests are skipped, saying
so: building it fetches wheels from the package index, which no test may reach, so
`make deb` runs before the tests (.ci/run does).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.root

HERE = Path(__file__).resolve().parents[2]
BUILD = HERE / "scripts" / "deb" / "build"
# What the package is made of: a dist/ package older than any of these is stale.
SOURCES = ("pyproject.toml", "README.md", "runner", "netns", "nft", "gateway", "docs")
SOURCES_SCRIPTS = ("scripts/deb", "scripts/systemd")
# A clean environment: nothing of this checkout's venv or of pytest's leaks in.
ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
}
TOP_DIRS = {"etc", "lib", "opt", "usr"}


def version() -> str:
    """The package's version: pyproject.toml's, in Debian's ordering (as the build)."""
    with open(HERE / "pyproject.toml", "rb") as f:
        version = tomllib.load(f)["project"]["version"]
    version = re.sub(r"[.-]?(a|b|rc|dev)(\d*)", r"~\1\2", version)
    return re.sub(r"[.-]?post(\d*)", r"+post\1", version)


def arch() -> str:
    return subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()


def newest_source_mtime() -> float:
    newest = 0.0
    for name in (*SOURCES, *SOURCES_SCRIPTS):
        path = HERE / name
        paths = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for p in paths:
            if "__pycache__" not in p.parts:
                newest = max(newest, p.stat().st_mtime)
    return newest


def run(cmd: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, check=False, env=ENV, **kw
    )


@pytest.fixture(scope="module")
def deb() -> Iterator[Path]:
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed: no Debian package to check")
    name = f"sandgate_{version()}_{arch()}.deb"
    given = os.environ.get("SANDGATE_DEB")
    if given:
        yield Path(given)
        return
    dist = HERE / "dist" / name
    if dist.is_file() and dist.stat().st_mtime > newest_source_mtime():
        yield dist
        return
    # Building fetches wheels from the package index, and tests never reach a package
    # registry: the package is built by `make deb` (.ci/run does, before the tests).
    pytest.skip(
        f"no {dist.relative_to(HERE)} newer than the sources it is made of: run `make deb` "
        "first (.ci/run does)"
    )


def field(deb: Path, name: str) -> str:
    proc = run(["dpkg-deb", "--field", str(deb), name])
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_control_data(deb):
    assert field(deb, "Package") == "sandgate"
    assert field(deb, "Version") == version()
    assert field(deb, "Architecture") == arch()
    depends = [d.strip() for d in field(deb, "Depends").split(",")]
    # The venv's interpreter is the system's python3 and its compiled modules are for
    # its minor version: the package holds the system to that minor version.
    py = run(["/usr/bin/python3", "-c", "import sys; print(*sys.version_info[:2])"])
    major, minor = map(int, py.stdout.split())
    assert f"python3 (>= {major}.{minor})" in depends
    assert f"python3 (<< {major}.{minor + 1})" in depends
    names = {re.split(r"[ (]", d)[0] for d in depends}
    assert {
        "python3-nftables",
        "python3-cffi",
        "python3-cryptography",
        "nftables",
        "iproute2",
        "iptables",
        "passwd",
        "libc6",
    } <= names
    assert {"git", "curl"} <= {d.strip() for d in field(deb, "Recommends").split(",")}

    info = run(["dpkg-deb", "--info", str(deb), "conffiles"])
    assert info.stdout.split() == ["/etc/sandgate/sandgate.toml"]
    listing = run(["dpkg-deb", "--info", str(deb)]).stdout
    for script in ("postinst", "prerm", "postrm"):
        # dpkg-deb marks executable control members with "*".
        assert re.search(rf"\*\s+{script}\s", listing), f"no executable {script}:\n{listing}"


def test_file_list(deb):
    proc = run(["dpkg-deb", "--contents", str(deb)])
    assert proc.returncode == 0, proc.stderr
    entries = {}
    for line in proc.stdout.splitlines():
        mode, owner, _size, _date, _time, path, *rest = line.split()
        entries[path.removeprefix("./").rstrip("/")] = (mode, owner, rest)
    entries.pop("")
    assert {p.split("/")[0] for p in entries} == TOP_DIRS, "files outside /etc /lib /opt /usr"
    assert {owner for _, owner, _ in entries.values()} == {"root/root"}
    assert entries["usr/bin/sandgate"][2] == ["->", "/opt/sandgate/venv/bin/sandgate"]
    for path in (
        "lib/systemd/system/sandgate.service",
        "etc/sandgate/sandgate.toml",
        "opt/sandgate/venv/pyvenv.cfg",
        "opt/sandgate/venv/bin/sandgate",
        "usr/share/doc/sandgate/copyright",
        "usr/share/doc/sandgate/changelog.gz",
    ):
        assert entries[path][0].startswith("-"), path
    assert entries["etc/sandgate/policies"][0].startswith("d")
    assert "etc/sandgate/credentials" not in entries  # made 0700 by postinst
    # Every module of the venv has its byte code, so Python never writes any into /opt.
    (site, minor) = next(
        (p, m.group(1))
        for p in entries
        if (m := re.fullmatch(r"opt/sandgate/venv/lib/python3\.(\d+)/site-packages", p))
    )
    for path in entries:
        if path.startswith(site + "/") and path.endswith(".py"):
            d, f = path.rsplit("/", 1)
            assert f"{d}/__pycache__/{f[:-3]}.cpython-3{minor}.pyc" in entries, path
    assert not [p for p in entries if "/pip/" in p or p.endswith("/bin/pip")], "pip in the venv"


@pytest.fixture(scope="module")
def tree(deb) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="sandgate-test-debtree.") as d:
        proc = run(["dpkg", "-x", str(deb), d])
        assert proc.returncode == 0, proc.stderr
        yield Path(d)


def in_package_namespace(tree: Path, script: str, *args: str, timeout: float = 120):
    """Runs sh SCRIPT in a private mount namespace where the unpacked package's /opt is
    /opt and its /usr/bin is overlaid on /usr/bin (when overlayfs allows: $OVERLAID
    says). The mounts die with the namespace."""
    setup = (
        'mount --bind "$TREE/opt" /opt\n'
        'OVERLAID=""\n'
        'if mount -t overlay sandgate-test -o "lowerdir=$TREE/usr/bin:/usr/bin" /usr/bin'
        " 2>/dev/null; then OVERLAID=1; fi\n"
    )
    unshare = ["unshare", "--mount", "--propagation", "private"]
    return subprocess.run(
        [*unshare, "sh", "-euc", setup + script, "sh", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**ENV, "TREE": str(tree)},
        cwd=tree,
    )


def test_unpacked_tree(tree):
    unit = (tree / "lib/systemd/system/sandgate.service").read_text()
    execs = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    assert execs == ["ExecStart=/usr/bin/sandgate serve --config /etc/sandgate/sandgate.toml"]
    source = (HERE / "scripts/systemd/sandgate.service").read_text()
    strip = re.compile(r"^(ExecStart=|# Installed to ).*$", re.M)
    assert strip.sub("", unit) == strip.sub("", source)
    assert (tree / "etc/sandgate/sandgate.toml").read_bytes() == (
        HERE / "scripts/systemd/sandgate.toml"
    ).read_bytes()
    cfg = (tree / "opt/sandgate/venv/pyvenv.cfg").read_text()
    assert "include-system-site-packages = true" in cfg
    assert "home = /usr/bin" in cfg
    assert os.readlink(tree / "opt/sandgate/venv/bin/python3") == "/usr/bin/python3"
    shebang = (tree / "opt/sandgate/venv/bin/sandgate").read_text().splitlines()[0]
    assert shebang == "#!/opt/sandgate/venv/bin/python"


def test_doctor_and_run_from_the_package(tree):
    state = tree / "test-state"
    script = """
        sg="$TREE/usr/bin/sandgate"   # the package's symlink, to /opt/sandgate/venv
        echo "version: $("$sg" --version)"
        /opt/sandgate/venv/bin/python -c 'import runner, uvloop, nftables, cffi
print("modules:", runner.__file__, uvloop.__file__, nftables.__file__, cffi.__file__)'
        "$sg" doctor --json --state-dir "$1" >"$TREE/doctor.json" || echo "doctor rc=$?"
        "$sg" run --embedded --state-dir "$1" --audit-log "$TREE/audit.jsonl" \\
          -- sh -c 'echo hi' >"$TREE/run.out" || echo "run rc=$?"
    """
    proc = in_package_namespace(tree, script, str(state))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert f"version: sandgate {version()}" in lines, proc.stdout
    modules = next(line for line in lines if line.startswith("modules:")).split()[1:]
    venv_site = "/opt/sandgate/venv/lib/python3."
    # sandgate and its pip dependencies from the package's venv, Debian's from the system.
    assert modules[0].startswith(venv_site) and modules[1].startswith(venv_site), modules
    assert modules[2].startswith("/usr/lib/python3/") and modules[3].startswith("/usr/lib/python3/")

    assert "doctor rc=" not in proc.stdout, (tree / "doctor.json").read_text()
    report = json.loads((tree / "doctor.json").read_text())
    assert report["ok"] is True, report
    status = {c["name"]: c["status"] for c in report["checks"]}
    for module in ("pyroute2", "nftables", "cffi", "iptc"):
        assert status[f"python module {module}"] == "ok", report

    assert "run rc=" not in proc.stdout, proc.stdout + proc.stderr
    assert (tree / "run.out").read_text() == "hi\n"
    assert not list((state / "sandboxes").glob("*.json")), "the run left its record"


def test_packaged_unit_verifies(tree):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    # Without the overlay on /usr/bin, ExecStart names the tree's symlink instead: it
    # still resolves through /opt/sandgate/venv, which the namespace provides.
    script = """
        unit="$TREE/lib/systemd/system/sandgate.service"
        if [ -z "$OVERLAID" ]; then
          mkdir -p "$TREE/verify"
          sed "s|^ExecStart=/usr/bin/sandgate |ExecStart=$TREE/usr/bin/sandgate |" "$unit" \\
            >"$TREE/verify/sandgate.service"
          unit="$TREE/verify/sandgate.service"
        fi
        echo "overlaid: ${OVERLAID:-no}"
        systemd-analyze verify --recursive-errors=no "$unit" 2>&1
    """
    proc = in_package_namespace(tree, script)
    # verify only warns (exit 0) about unknown or misspelt keys: any message about the
    # unit fails too.
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "sandgate.service" not in proc.stdout.split("\n", 1)[1], proc.stdout


CHROOT_SCRIPT = r"""
layers=$1 out=$2 deb=$3
mount -t tmpfs sandgate-test "$layers"
mkdir "$layers/upper" "$layers/work" "$layers/root"
if ! mount -t overlay sandgate-test \
    -o "lowerdir=/,upperdir=$layers/upper,workdir=$layers/work" "$layers/root"; then
  echo "overlay of / refused" >"$out/skip"
  exit 0
fi
r=$layers/root
mount -t proc proc "$r/proc"
mount --rbind /sys "$r/sys"
mount --rbind /dev "$r/dev"
mount -t tmpfs run "$r/run"
mount -t tmpfs tmp "$r/tmp"
cp "$deb" "$r/tmp/sandgate.deb"
# A host that never had sandgate (in the overlay only): no scripts/install leftovers,
# no sandgate users, an empty /opt as on a fresh Debian.
rm -rf "$r/etc/sandgate" "$r/usr/local/bin/sandgate" "$r/etc/systemd/system/sandgate.service" \
  "$r/var/lib/sandgate" "$r/var/log/sandgate"
for f in passwd shadow group gshadow; do
  if [ -f "$r/etc/$f" ]; then sed -i '/^_sandgate:/d; /^sandgate:/d' "$r/etc/$f"; fi
done
if [ -d "$r/opt" ]; then find "$r/opt" -mindepth 1 -maxdepth 1 -exec rm -rf {} +; fi
step() {
  name=$1; shift
  rc=0
  chroot "$r" /usr/bin/env -i PATH="$PATH" LANG=C.UTF-8 HOME=/root \
    DEBIAN_FRONTEND=noninteractive sh -c "$*" >"$out/$name.out" 2>"$out/$name.err" || rc=$?
  echo "$rc" >"$out/$name.rc"
}
facts='
  echo "sandgate: $(command -v sandgate) -> $(readlink /usr/bin/sandgate)"
  echo "status: $(dpkg-query -W -f "\${Status}" sandgate 2>/dev/null)"
  echo "credentials: $(stat -c "%a %U" /etc/sandgate/credentials 2>/dev/null)"
  echo "conffile: $(tail -n 1 /etc/sandgate/sandgate.toml 2>/dev/null)"
  echo "user: $(getent passwd _sandgate | cut -d: -f1,6,7)"
  echo "group: $(getent group sandgate | cut -d: -f1)"
  echo "enabled: $(readlink /etc/systemd/system/multi-user.target.wants/sandgate.service)"
  echo "venv: $(ls -d /opt/sandgate/venv 2>/dev/null)"
  echo "opt: $(ls -d /opt 2>/dev/null)"
  echo "etc: $(ls -A /etc/sandgate 2>/dev/null | tr "\n" " ")"
'
step install "apt-get install -y --no-install-recommends /tmp/sandgate.deb"
step installed "$facts"
step doctor "sandgate doctor --json"
step run "sandgate run --embedded -- sh -c 'echo hi; id -un'"
step edit "echo '# changed here' >>/etc/sandgate/sandgate.toml"
step reinstall "dpkg -i /tmp/sandgate.deb"
step reinstalled "$facts"
step remove "apt-get remove -y sandgate"
step removed "$facts"
step purge "apt-get purge -y sandgate"
step purged "$facts"
"""


def test_apt_install_remove_purge_in_a_chroot(deb):
    for name in ("/usr", "/etc", "/var", "/opt", "/lib", "/bin", "/sbin"):
        if os.path.ismount(name):
            pytest.skip(f"{name} is a mount of its own: an overlay of / would not hold it")
    if not Path("/usr/bin/apt-get").exists():
        pytest.skip("apt-get is not installed")
    # layers: the mount point of the namespace's tmpfs (empty on the host); out: what
    # each step printed.
    with (
        tempfile.TemporaryDirectory(prefix="sandgate-test-chroot.") as layers,
        tempfile.TemporaryDirectory(prefix="sandgate-test-chroot-out.") as out,
    ):
        unshare = ["unshare", "--mount", "--propagation", "private"]
        proc = subprocess.run(
            [*unshare, "sh", "-euc", CHROOT_SCRIPT, "sh", layers, out, str(deb)],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
            env=ENV,
        )
        printed = {p.name: p.read_text() for p in Path(out).iterdir()}
    assert proc.returncode == 0, proc.stderr
    if "skip" in printed:
        pytest.skip(printed["skip"].strip())

    def step(name: str) -> str:
        rc, text = int(printed[f"{name}.rc"]), printed[f"{name}.out"]
        assert rc == 0, f"{name}: exit {rc}\n{text}\n{printed[f'{name}.err']}"
        return text

    def facts(name: str) -> dict[str, str]:
        return dict(line.split(": ", 1) for line in step(name).splitlines() if ": " in line)

    step("install")
    installed = facts("installed")
    assert installed["sandgate"] == "/usr/bin/sandgate -> /opt/sandgate/venv/bin/sandgate"
    assert installed["status"] == "install ok installed"
    assert installed["credentials"] == "700 root"
    assert installed["user"] == "_sandgate:/nonexistent:/usr/sbin/nologin"
    assert installed["group"] == "sandgate"
    # No systemd runs in the chroot: the unit is enabled for the next boot, not started.
    assert installed["enabled"] == "/lib/systemd/system/sandgate.service"
    assert "systemd is not running" in printed["install.out"]

    assert json.loads(step("doctor"))["ok"] is True
    assert step("run") == "hi\n_sandgate\n"

    step("edit")
    step("reinstall")  # postinst configure with the version before: the upgrade path
    assert facts("reinstalled")["conffile"] == "# changed here", "the conffile was replaced"

    step("remove")
    removed = facts("removed")
    assert removed["status"] == "deinstall ok config-files"
    assert removed["sandgate"] == " -> "  # neither the command nor its symlink
    assert removed["venv"] == ""  # /opt/sandgate is gone...
    assert removed["opt"] == "/opt"  # ...and /opt, which dpkg removed when empty, is back
    assert removed["conffile"] == "# changed here"  # kept until purge
    assert removed["etc"].split() == ["credentials", "sandgate.toml"]
    assert removed["enabled"] == "/lib/systemd/system/sandgate.service"  # kept until purge

    step("purge")
    purged = facts("purged")
    assert purged["status"] in ("", "unknown ok not-installed"), purged
    assert purged["etc"] == ""  # /etc/sandgate: gone (credentials/ was empty)
    assert purged["enabled"] == ""
    assert purged["user"] == "_sandgate:/nonexistent:/usr/sbin/nologin"  # Debian's practice
