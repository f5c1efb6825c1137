"""The git gateway end to end: `sandgate run` real sandboxes that clone, fetch and push
with the real git client (protocols v0 and v2), get refused for what their policy does
not allow, send malformed push bodies from raw sockets, and look for the upstream
credential everywhere they can read.

The world (git_fixtures.git_upstream) is one network namespace at 10.214.N.2 with an
HTTPS git server (git http-backend) that takes only `x-access-token` Basic credentials,
and a stand-in GitHub App token API that verifies the app's JWT and the narrowing of
each token. Every name is made up under .test and pinned with --resolve; the one test
that uses the name github.com pins it too, and runs only once a .test clone has shown
that the gateway dials the pinned address for git hosts.

Several checks share one sandbox run (a Python script inside prints one JSON object)
to keep the suite fast: the module-scoped fixtures below each run one sandbox, and the
tests read what it saw, what the upstream saw and what the audit log says.

Environment: SANDGATE_GIT_TEST_DUMP=DIR keeps each run's JSON output and audit log in
DIR; SANDGATE_GIT_TEST_CLOSE_NOTIFY=1 makes the upstream send a TLS close_notify
before it closes a connection (it does not by default, as many servers do not).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.git_fixtures import (
    SCAN_SCRIPT,
    ZERO_OID,
    AppState,
    GitUpstream,
    PushBody,
    Seen,
    basic,
    git,
    git_upstream,
    make_app_key,
    make_bare_repo,
    malformed_bodies,
    random_token,
    scan_env,
)

pytestmark = pytest.mark.root

SANDGATE = os.path.join(os.path.dirname(sys.executable), "sandgate")
UPSTREAM_CIDR = "10.214.0.0/16"
GIT_HOST = "git.test"  # static token
APP_HOST = "apphost.test"  # GitHub App
API_HOST = "api.apphost.test"
GITHUB = "github.com"  # only ever with --resolve github.com=10.214.N.2
BAD_HOST = "bad.test"  # a token file the upstream does not accept
APP_ID, INSTALLATION_ID = 424242, 31337
RUN_TIMEOUT = 120

SANDBOX_ENV = {
    "GIT_AUTHOR_NAME": "sandbox",
    "GIT_AUTHOR_EMAIL": "sandbox@sandbox.test",
    "GIT_COMMITTER_NAME": "sandbox",
    "GIT_COMMITTER_EMAIL": "sandbox@sandbox.test",
    "GIT_TERMINAL_PROMPT": "0",
    "PYTHONDONTWRITEBYTECODE": "1",
    "LC_ALL": "C",
}

# What every sandbox script starts with: run commands, talk raw HTTP to the gateway.
PRELUDE = r'''
import json, os, socket, subprocess, sys, urllib.parse
GW = urllib.parse.urlsplit(os.environ["HTTP_PROXY"]).netloc  # "10.213.x.y:3128"
W = "/workspace"
R = {}

def sh(*args, cwd=None, timeout=90):
    try:
        p = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        return {"rc": p.returncode, "out": p.stdout[-6000:], "err": p.stderr[-6000:]}
    except subprocess.TimeoutExpired as e:
        return {"rc": None, "out": "", "err": f"timeout: {e}"}

def head(cwd, rev="HEAD"):
    if not os.path.isdir(cwd):
        return None
    return sh("git", "rev-parse", rev, cwd=cwd)["out"].strip()

def commit(cwd, name, data=b"x"):
    with open(os.path.join(cwd, name), "wb") as f:
        f.write(data)
    sh("git", "add", name, cwd=cwd)
    r = sh("git", "commit", "-q", "-m", "sandbox " + name, cwd=cwd)
    assert r["rc"] == 0, r
    return head(cwd)

def http(method, path, body=b"", headers=None, chunked=False):
    """One raw HTTP/1.1 request to the gateway (origin-form, as git sends it);
    (status, first 800 bytes of the body as text, headers)."""
    host, port = GW.rsplit(":", 1)
    hdrs = {"Host": GW, "User-Agent": "git/2.39.5", "Connection": "close"}
    if chunked:
        hdrs["Transfer-Encoding"] = "chunked"
    elif method != "GET":
        hdrs["Content-Length"] = str(len(body))
    hdrs.update(headers or {})
    raw = (f"{method} {path} HTTP/1.1\r\n"
           + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items() if v != "") + "\r\n").encode()
    if chunked and not isinstance(chunked, bytes):
        raw += b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 100]), body[i:i + 100])
                        for i in range(0, len(body), 100)) + b"0\r\n\r\n"
    elif isinstance(chunked, bytes):
        raw += chunked
    else:
        raw += body
    s = socket.create_connection((host, int(port)), timeout=30)
    err = None
    try:
        s.sendall(raw)
    except OSError as e:
        err = repr(e)
    resp = b""
    try:
        while True:
            data = s.recv(65536)
            if not data:
                break
            resp += data
    except OSError as e:
        err = (err or "") + repr(e)
    s.close()
    head_, _, rest = resp.partition(b"\r\n\r\n")
    lines = head_.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        return None, f"no HTTP answer ({err}): {resp[:200]!r}", {}
    hs = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        hs[k.strip().lower()] = v.strip()
    if hs.get("transfer-encoding", "").lower() == "chunked":
        body, rest2 = b"", rest
        while rest2:
            size_line, _, rest2 = rest2.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if not size:
                break
            body += rest2[:size]
            rest2 = rest2[size + 2:]
        rest = body
    return status, rest[:800].decode("utf-8", "replace"), hs

def emit():
    print(json.dumps(R))
'''


# --- the module's world ---------------------------------------------------------------------


@dataclass
class World:
    up: GitUpstream
    share: Path  # bound read-only into every sandbox: scripts, bodies
    creds: Path  # --credentials (root-only)
    work: Path  # per-run state, audit logs, policies (host only)
    token: str  # static token for git.test
    github_token: str  # static token for github.com (the pinned stand-in)
    bad_token: str  # in bad.test.token; the upstream refuses it
    app: AppState
    since: float  # before any secret existed (the scan's cut-off)
    pins_proven: bool = False  # a .test clone reached the pinned upstream

    @property
    def addr(self) -> str:
        return str(self.up.addr)

    def secrets(self) -> list[str]:
        """Every secret the sandbox must never see, in every form it could take."""
        key_lines = [ln for ln in self.app.key.pem.decode().splitlines() if "-----" not in ln]
        out = []
        for t in (self.token, self.github_token, self.bad_token):
            out += [t, basic(t)[6:]]
        out += key_lines[1:3]  # two lines of the App's private key
        for t in [*self.app.all_tokens, *self.app.next_tokens]:
            out += [t, basic(t)[6:]]
        return out


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    since = time.time()
    base = Path(tempfile.mkdtemp(prefix="sgtest-git-"))
    try:
        base.chmod(0o711)
        share, creds, work = base / "share", base / "creds", base / "work"
        share.mkdir(mode=0o755)
        share.chmod(0o755)
        creds.mkdir(mode=0o700)
        work.mkdir(mode=0o700)
        names = [GIT_HOST, APP_HOST, API_HOST, GITHUB, BAD_HOST]
        # SANDGATE_GIT_TEST_CLOSE_NOTIFY=1: the upstream ends each TLS connection with a
        # close_notify (by default it does not; see git_fixtures.git_upstream).
        close_notify = os.environ.get("SANDGATE_GIT_TEST_CLOSE_NOTIFY") == "1"
        with git_upstream(base / "upstream", names, close_notify=close_notify) as up:
            token, gh_token, bad_token = random_token(), random_token(), random_token()
            up.set_token(GIT_HOST, token)
            up.set_token(GITHUB, gh_token)
            up.set_token(BAD_HOST, random_token())  # not the one in bad.test.token
            for host, value in ((GIT_HOST, token), (GITHUB, gh_token), (BAD_HOST, bad_token)):
                path = creds / f"{host}.token"
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(value + "\n")
            key = make_app_key(base / "upstream" / "keys", APP_ID, INSTALLATION_ID)
            app_toml = creds / f"{APP_HOST}.github-app.toml"
            fd = os.open(app_toml, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(
                    f"app_id = {APP_ID}\ninstallation_id = {INSTALLATION_ID}\n"
                    f'private_key = "{key.private_key_path}"\n'
                    f'api_url = "https://{API_HOST}"\n'
                )
            app = AppState(key)
            up.set_app(app)
            (share / "scan.py").write_text(SCAN_SCRIPT)
            (share / "scan.py").chmod(0o644)
            yield World(up, share, creds, work, token, gh_token, bad_token, app, since)
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --- running a sandbox -------------------------------------------------------------------------


@dataclass
class Run:
    rc: int
    out: dict  # the JSON object the script printed last
    stdout: str
    stderr: str
    summary: dict  # sandgate's --json result line
    audit: list[dict]
    audit_text: str
    seen: list[Seen]  # what the upstream received during the run
    argv: list[str]

    def git_audit(self) -> list[dict]:
        """The audit lines of git requests (those that name a repository: `repo`)."""
        return [r for r in self.audit if _audit_repo(r) is not None]


def _audit_repo(rec: dict) -> str | None:
    """The repository a git audit line is about (its URL), None for other lines."""
    return rec.get("repo")


def _audit_field(rec: dict, name: str):
    return rec.get(name)


def sandbox_run(
    world: World,
    name: str,
    script: str,
    *,
    policy: str | None = None,
    repos: Sequence[str] = (),
    pins: Sequence[str] = (GIT_HOST,),
    env: Mapping[str, str] | None = None,
    extra: Sequence[str] = (),
    timeout: float = RUN_TIMEOUT,
    check: bool = True,
) -> Run:
    """`sandgate run` python3 SCRIPT (with PRELUDE) in a fresh sandbox; the script's
    last stdout line is JSON. Everything it writes on the host is under world.work."""
    run_dir = world.work / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(mode=0o700)
    state, audit = run_dir / "state", run_dir / "audit.jsonl"
    script_path = world.share / f"{name}.py"
    script_path.write_text(PRELUDE + script)
    script_path.chmod(0o644)
    argv = [SANDGATE, "run", "--state-dir", str(state), "--json", "--audit-log", str(audit)]
    argv += ["--credentials", str(world.creds), "--upstream-ca", str(world.up.ca.ca_cert)]
    argv += ["--allow-cidr", UPSTREAM_CIDR, "--ro", str(world.share)]
    for host in pins:
        argv += ["--resolve", f"{host}={world.addr}"]
    if policy is not None:
        path = run_dir / "policy.toml"
        path.write_text(policy)
        argv += ["--policy", str(path)]
    for repo in repos:
        argv += ["--repo", repo]
    for key, value in {**SANDBOX_ENV, **(env or {})}.items():
        argv += ["-e", f"{key}={value}"]
    argv += [*extra, "--", "python3", str(script_path)]
    mark = world.up.mark()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    finally:
        for record in (state / "sandboxes").glob("*.json"):
            subprocess.run(
                [SANDGATE, "rm", "--state-dir", str(state), record.stem],
                capture_output=True,
                check=False,
                timeout=60,
            )
    summary_lines = [ln for ln in proc.stderr.splitlines() if ln.startswith('{"')]
    summary = json.loads(summary_lines[-1]) if summary_lines else {}
    out_lines = proc.stdout.strip().splitlines()
    out: dict = {}
    if out_lines:
        with contextlib.suppress(ValueError):
            out = json.loads(out_lines[-1])
    if check:
        assert proc.returncode == 0 and out, (
            f"sandbox run {name} failed ({proc.returncode}):\nstdout: {proc.stdout[-3000:]}\n"
            f"stderr: {proc.stderr[-3000:]}"
        )
    audit_text = audit.read_text() if audit.exists() else ""
    dump = os.environ.get("SANDGATE_GIT_TEST_DUMP")  # a directory: keep what each run saw
    if dump:
        Path(dump, f"{name}.json").write_text(
            json.dumps({"rc": proc.returncode, "out": out, "stderr": proc.stderr}, indent=1)
        )
        Path(dump, f"{name}.audit.jsonl").write_text(audit_text)
    records = []
    for line in audit_text.splitlines():
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return Run(
        proc.returncode,
        out,
        proc.stdout,
        proc.stderr,
        summary,
        records,
        audit_text,
        world.up.since(mark),
        argv,
    )


def url(host: str, repo: str) -> str:
    return f"https://{host}/{repo}"


def write_policy(*repos: tuple[str, str, str | None], rate: int | None = None) -> str:
    """[[git.repos]] entries: (url, access, refs TOML list or None); `rate` sets the
    sandbox's request rate and burst (git requests count against them)."""
    lines = [] if rate is None else ["[egress]", f"rate = {rate}", f"burst = {rate}"]
    for repo_url, access, refs in repos:
        lines += ["[[git.repos]]", f'url = "{repo_url}"', f'access = "{access}"']
        if refs is not None:
            lines += ["[git.repos.push]", f"refs = {refs}", "max_refs = 10"]
    return "\n".join(lines) + "\n"


def _fail_text(res: dict) -> str:
    return f"rc={res.get('rc')}\nstdout: {res.get('out')}\nstderr: {res.get('err')}"


# --- 1. clone, fetch and push of an allowed repository, protocol v0 and v2 -------------------

CLONE_FETCH_PUSH = r"""
V = os.environ["PROTO"]
REPO = os.environ["REPO"]
url = f"https://git.test/{REPO}"
d = W + "/r"
g = ["git", "-c", f"protocol.version={V}"]
R["clone"] = sh(*g, "clone", "--single-branch", "-b", "main", url, d)
R["main"] = head(d)
R["fetch"] = sh(*g, "fetch", "origin", "other:refs/remotes/origin/other", cwd=d)
R["other"] = head(d, "refs/remotes/origin/other")
R["small"] = commit(d, "small.txt", b"from the sandbox\n")
R["push_small"] = sh(*g, "push", "origin", "HEAD:refs/heads/sandbox-small", cwd=d)
# > 1 MiB (http.postBuffer): git probes with "0000", then sends the pack chunked.
R["big"] = commit(d, "big.bin", os.urandom(3 * 1024 * 1024))
R["push_big"] = sh(*g, "push", "origin", "HEAD:refs/heads/sandbox-big", cwd=d)
R["ls_remote"] = sh(*g, "ls-remote", "origin", cwd=d)
# A shallow clone's push carries "shallow" lines before its commands.
s = W + "/shallow"
R["shallow_clone"] = sh(*g, "clone", "--depth", "1", url, s)
R["shallow_new"] = commit(s, "shallow.txt", b"from a shallow clone\n")
R["push_shallow"] = sh(*g, "push", "origin", "HEAD:refs/heads/sandbox-shallow", cwd=s)
# A partial clone: blobs come in a second fetch, at checkout.
R["partial"] = sh(*g, "clone", "--filter=blob:none", url, W + "/partial")
# Four clones at once.
procs = [subprocess.Popen([*g, "clone", "-q", url, f"{W}/par{i}"], stderr=subprocess.PIPE)
         for i in range(4)]
R["parallel"] = [p.wait(timeout=90) for p in procs]
R["parallel_err"] = [p.stderr.read().decode()[-500:] for p in procs]
R["parallel_heads"] = [head(f"{W}/par{i}") for i in range(4)]
R["git_config"] = sh("git", "config", "--list", "--show-origin")["out"]
emit()
"""


@pytest.fixture(scope="module", params=["0", "2"], ids=["v0", "v2"])
def cfp(request, world: World):
    """One sandbox per protocol version: clone, fetch, push (small, then chunked)."""
    version = request.param
    repo = f"org/cfp-v{version}"
    refs = world.up.make_repo(repo, branches={"main": 2, "other": 1})
    try:
        run = sandbox_run(
            world,
            f"cfp-v{version}",
            CLONE_FETCH_PUSH,
            # ~40 git requests in a few seconds: near the default burst, which git
            # requests share with egress; the repository itself comes from --repo.
            policy=write_policy(rate=1000),
            repos=[f"{url(GIT_HOST, repo)}=write"],
            env={"PROTO": version, "REPO": repo},
        )
        yield version, repo, refs, run, world.up.show_ref(repo)
    finally:
        world.up.remove_repo(repo)


def test_clone_fetch_push(cfp, world):
    _, _, before, run, after = cfp
    r = run.out
    assert r["clone"]["rc"] == 0, _fail_text(r["clone"])
    assert r["main"] == before["refs/heads/main"]
    assert r["fetch"]["rc"] == 0, _fail_text(r["fetch"])
    assert r["other"] == before["refs/heads/other"]
    assert r["push_small"]["rc"] == 0, _fail_text(r["push_small"])
    assert r["push_big"]["rc"] == 0, _fail_text(r["push_big"])
    assert after["refs/heads/sandbox-small"] == r["small"]
    assert after["refs/heads/sandbox-big"] == r["big"]
    assert after["refs/heads/main"] == before["refs/heads/main"]
    assert f"{r['big']}\trefs/heads/sandbox-big" in r["ls_remote"]["out"]
    world.pins_proven = True  # git.test reached 10.214.N.2, the pinned address


def test_shallow_partial_and_parallel_clones(cfp):
    _, _, before, run, after = cfp
    r = run.out
    for key in ("shallow_clone", "push_shallow", "partial"):
        assert r[key]["rc"] == 0, f"{key}: {_fail_text(r[key])}"
    assert after["refs/heads/sandbox-shallow"] == r["shallow_new"]
    shallow_pushes = [s for s in run.seen if s.is_push_rpc and s.body.startswith(b"0035shallow ")]
    assert len(shallow_pushes) == 1, "the shallow clone's push had no shallow line upstream"
    errors = [rec["reason"] for rec in run.git_audit() if rec["decision"] != "allow"]
    assert r["parallel"] == [0, 0, 0, 0], (r["parallel_err"], errors)
    assert r["parallel_heads"] == [before["refs/heads/main"]] * 4


def test_upstream_saw_the_protocol_and_the_token(cfp, world):
    version, repo, _, run, _ = cfp
    git_reqs = [s for s in run.seen if s.service]
    assert git_reqs, "the upstream saw no git request"
    assert {s.repo for s in git_reqs} == {repo}
    assert {s.host for s in git_reqs} == {GIT_HOST}
    # The gateway's credential, and nothing else, on every request.
    assert {s.credential for s in git_reqs} == {f"static:{GIT_HOST}"}, [
        (s.method, s.path, s.credential) for s in git_reqs
    ]
    fetches = [s for s in git_reqs if s.service == "upload-pack"]
    protocols = {s.headers.get("git-protocol") for s in fetches}
    assert protocols == ({"version=2"} if version == "2" else {None}), protocols
    if version == "2":
        # v2: ls-refs and fetch are separate commands in separate POSTs.
        assert sum(1 for s in fetches if s.method == "POST") >= 2
    pushes = [s for s in git_reqs if s.is_push_rpc]
    # small push; the big one: a "0000" probe and the chunked body; the shallow one.
    assert len(pushes) == 4, [(s.body_len, s.chunked) for s in pushes]
    assert pushes[1].body == b"0000"
    assert pushes[2].chunked and pushes[2].body_len > 3 * 1024 * 1024
    assert all(s.status == 200 for s in git_reqs), [(s.path, s.status) for s in git_reqs]


def test_sandbox_git_config_points_at_the_gateway(cfp):
    _, _, _, run, _ = cfp
    config = run.out["git_config"]
    gw = run.summary["gateway"]
    assert f"url.http://{gw}/git/{GIT_HOST}/.insteadof=https://{GIT_HOST}/" in config.lower()


def test_audit_has_one_line_per_git_request(cfp):
    _, repo, _, run, _ = cfp
    lines = run.git_audit()
    forwarded = [s for s in run.seen if s.service]
    assert len(lines) == len(forwarded), (
        f"{len(lines)} git audit lines for {len(forwarded)} git requests:\n{run.audit_text}"
    )
    for rec in lines:
        assert repo in _audit_repo(rec), rec
        assert _audit_field(rec, "service") in ("upload-pack", "receive-pack"), rec
        # "error" only for the truncated responses test_shallow_partial_and_parallel_clones
        # reports; nothing in this run may be denied.
        assert rec["decision"] in ("allow", "error"), rec
    push_lines = [r for r in lines if _audit_field(r, "refs")]
    refs = [ref for r in push_lines for ref in _audit_field(r, "refs")]
    names = {ref.get("ref") for ref in refs}
    assert {"refs/heads/sandbox-small", "refs/heads/sandbox-big"} <= names, push_lines
    for ref in refs:
        assert ref.get("old") == ZERO_OID, ref
        assert ref.get("new") in (run.out["small"], run.out["big"], run.out["shallow_new"]), ref
        assert _verdict(ref) == "allow", ref


def _verdict(ref: dict) -> str | None:
    """A ref's verdict in an audit line: "allow" or "deny"."""
    return ref.get("verdict")


def test_github_com_is_served_through_the_pinned_address(world):
    """The realistic URL (https://github.com/...) with --resolve github.com=10.214.N.2;
    only once a .test clone proved that the gateway dials pinned addresses for git
    (test_clone_fetch_push, or a clone made here when that did not run)."""
    if not world.pins_proven:
        repo = "org/pin-proof"
        world.up.make_repo(repo)
        try:
            proof = sandbox_run(
                world,
                "pin-proof",
                'R["clone"] = sh("git", "clone", "https://git.test/org/pin-proof", W + "/p")\n'
                "emit()\n",
                repos=[url(GIT_HOST, repo)],
            )
        finally:
            world.up.remove_repo(repo)
        if proof.out["clone"]["rc"] != 0 or not [s for s in proof.seen if s.service]:
            pytest.skip("a .test clone did not reach the pinned upstream; not risking github.com")
    repo = "org/gh"
    refs = world.up.make_repo(repo)
    try:
        run = sandbox_run(
            world,
            "github",
            r"""
R["clone"] = sh("git", "clone", "https://github.com/org/gh", W + "/gh")
R["head"] = head(W + "/gh")
emit()
""",
            repos=[url(GITHUB, repo)],
            pins=[GITHUB],
        )
    finally:
        world.up.remove_repo(repo)
    assert run.out["clone"]["rc"] == 0, _fail_text(run.out["clone"])
    assert run.out["head"] == refs["refs/heads/main"]
    assert {s.credential for s in run.seen if s.service} == {f"static:{GITHUB}"}


LARGE_CLONES = r"""
for i, v in enumerate(["2", "0", "2"]):
    d = f"{W}/large{i}"
    R[f"clone{i}"] = sh("git", "-c", f"protocol.version={v}", "clone", "-q",
                        "https://git.test/org/large", d, timeout=120)
    R[f"head{i}"] = head(d)
    sh("rm", "-rf", d)
emit()
"""


def test_large_clones_arrive_whole(world):
    """Three clones of a 12 MiB incompressible repository: the whole pack arrives every
    time, however the upstream ends its TLS connection (this one closes TCP after the
    last chunk without a close_notify, which RFC 8446 allows and many servers do)."""
    repo = "org/large"
    path = world.up.bare(repo)
    refs = make_bare_repo(
        path, branches={"main": 1}, files=2, file_size=6 * 1024 * 1024, random_data=True
    )
    try:
        run = sandbox_run(world, "large", LARGE_CLONES, repos=[url(GIT_HOST, repo)])
    finally:
        world.up.remove_repo(repo)
    failed = {
        key: _fail_text(res)
        for key, res in run.out.items()
        if key.startswith("clone") and res["rc"] != 0
    }
    errors = [rec.get("reason") for rec in run.git_audit() if rec["decision"] == "error"]
    assert not failed, f"{len(failed)} of 3 clones failed: {failed}\naudit errors: {errors}"
    for i in range(3):
        assert run.out[f"head{i}"] == refs["refs/heads/main"]


# --- 2. refusals: unlisted, read-only, rules, LFS ------------------------------------------

REFUSALS = r"""
H = "git.test"
def clone(repo, d):
    return sh("git", "clone", f"https://{H}/{repo}", d)

R["unlisted"] = clone("org/unlisted", W + "/unlisted")
R["ro_clone"] = clone("org/ro", W + "/ro")
R["ro_new"] = commit(W + "/ro", "ro.txt")
R["ro_push"] = sh("git", "push", "origin", "HEAD:refs/heads/main", cwd=W + "/ro")

d = W + "/rules"
R["rules_clone"] = clone("org/rules", d)
R["rules_new"] = commit(d, "rules.txt")
R["push_main"] = sh("git", "push", "origin", "HEAD:refs/heads/main", cwd=d)
R["push_delete"] = sh("git", "push", "origin", "--delete", "refs/heads/sandbox/old", cwd=d)
sh("git", "tag", "v1", cwd=d)
R["push_tag"] = sh("git", "push", "origin", "refs/tags/v1", cwd=d)
R["push_mixed"] = sh("git", "push", "origin", "HEAD:refs/heads/sandbox/ok",
                     "HEAD:refs/heads/main", cwd=d)
R["push_many"] = sh("git", "push", "origin",
                    *[f"HEAD:refs/heads/sandbox/m{i}" for i in range(11)], cwd=d)
R["push_nested"] = sh("git", "push", "origin", "HEAD:refs/heads/sandbox/a/b", cwd=d)
# Positive control: an allowed ref goes through.
R["push_ok"] = sh("git", "push", "origin", "HEAD:refs/heads/sandbox/ok", cwd=d)
# A refused push larger than http.postBuffer: git probes, then sends it chunked.
sh("git", "checkout", "-q", "-b", "bigbranch", cwd=d)
R["big_new"] = commit(d, "big.bin", os.urandom(3 * 1024 * 1024))
R["push_big_refused"] = sh("git", "push", "origin", "HEAD:refs/heads/main", cwd=d)

# The policy's spelling goes upstream, whatever case the sandbox writes.
R["case"] = sh("git", "clone", f"https://{H}/Org/RULES", W + "/case")
# The upstream refuses the gateway's credential: a message, never a password prompt.
R["bad_cred"] = sh("git", "clone", "https://bad.test/org/rules", W + "/bad")
# The Unix endpoint serves git too.
R["unix"] = sh("curl", "-sS", "--unix-socket", "/run/sandgate/gateway.sock",
               "-w", "\n%{http_code}",
               f"http://sandgate/git/{H}/org/rules.git/info/refs?service=git-upload-pack")
# Around the git gateway: CONNECT to the git host (curl through HTTPS_PROXY, and git
# with a URL the insteadOf does not rewrite) is egress, which this policy does not allow.
R["connect_curl"] = sh("curl", "-sS", "-o", "/dev/null",
                       f"https://{H}/org/rules.git/info/refs?service=git-upload-pack")
R["connect_git"] = sh("git", "ls-remote", f"https://{H}:443/org/rules")

lfs = {"Content-Type": "application/vnd.git-lfs+json", "Accept": "application/vnd.git-lfs+json"}
body = json.dumps({"operation": "download", "objects": [{"oid": "a" * 64, "size": 1}]}).encode()
# Where the policy allows deletes and tags, they pass (a delete-only push has no pack).
o = W + "/open"
R["open_clone"] = clone("org/open", o)
R["open_delete"] = sh("git", "push", "origin", "--delete", "refs/heads/gone", cwd=o)
sh("git", "tag", "-a", "-m", "release", "v2", cwd=o)
R["open_tag"] = sh("git", "push", "origin", "refs/tags/v2", cwd=o)
R["open_tag_id"] = head(o, "refs/tags/v2")

R["lfs"] = http("POST", f"/git/{H}/org/rules.git/info/lfs/objects/batch", body, lfs)
R["lfs_curl"] = sh("curl", "-sS", "-X", "POST", "-H", "Content-Type: application/vnd.git-lfs+json",
                   "--data-binary", body.decode(), "-w", "\n%{http_code}", "--noproxy", "*",
                   f"http://{GW}/git/{H}/org/rules.git/info/lfs/objects/batch")
R["dumb"] = http("GET", f"/git/{H}/org/rules.git/info/refs")
R["dumb_head"] = http("GET", f"/git/{H}/org/rules.git/HEAD")
R["unlisted_raw"] = http("GET", f"/git/{H}/org/unlisted.git/info/refs?service=git-upload-pack")
emit()
"""


@dataclass
class Refusals:
    run: Run
    before: dict[str, dict[str, str]]
    after: dict[str, dict[str, str]]


@pytest.fixture(scope="module")
def refusals(world: World) -> Iterator[Refusals]:
    repos = {
        "org/unlisted": {"main": 1},
        "org/ro": {"main": 1},
        "org/rules": {"main": 2, "sandbox/old": 1},
        "org/open": {"main": 1, "gone": 1},
    }
    before = {name: world.up.make_repo(name, branches=b) for name, b in repos.items()}
    policy = write_policy(
        (url(GIT_HOST, "org/ro"), "read", None),
        (url(GIT_HOST, "org/rules"), "write", '["refs/heads/sandbox/*"]'),
        (url(BAD_HOST, "org/rules"), "read", None),
    ) + (
        f'[[git.repos]]\nurl = "{url(GIT_HOST, "org/open")}"\naccess = "write"\n'
        '[git.repos.push]\nrefs = ["refs/heads/*", "refs/tags/*"]\n'
        "allow_delete = true\nallow_tags = true\n"
    )
    try:
        run = sandbox_run(world, "refusals", REFUSALS, policy=policy, pins=[GIT_HOST, BAD_HOST])
        after = {name: world.up.show_ref(name) for name in repos}
        yield Refusals(run, before, after)
    finally:
        for name in repos:
            world.up.remove_repo(name)


def _rejected(res: dict, ref: str) -> str:
    """git's own line for a ref the remote refused, with its reason: git prints
    `! [remote rejected] [SRC -> ]NAME (REASON)`, NAME without refs/heads/ or refs/tags/."""
    assert res["rc"] != 0, f"the push succeeded:\n{_fail_text(res)}"
    short = ref.removeprefix("refs/heads/").removeprefix("refs/tags/")
    pattern = re.compile(r"! \[remote rejected\] (\S+ -> )?" + re.escape(short) + r" \(")
    lines = [ln for ln in res["err"].splitlines() if pattern.search(ln)]
    assert lines, f"no '! [remote rejected] {ref} (...)' line:\n{_fail_text(res)}"
    return lines[0]


def test_unlisted_repository_is_403_with_a_message(refusals):
    r = refusals.run.out
    assert r["unlisted"]["rc"] != 0
    err = r["unlisted"]["err"]
    assert "403" in err, err
    assert "remote:" in err and "not in this sandbox's list" in err, err
    status, body, headers = r["unlisted_raw"]
    assert status == 403 and "org/unlisted" in body, (status, body)
    assert headers.get("x-sandgate-request-id"), headers
    assert not [s for s in refusals.run.seen if s.repo == "org/unlisted"], "reached upstream"
    assert refusals.after["org/unlisted"] == refusals.before["org/unlisted"]


def test_push_to_read_only_repository_is_refused(refusals):
    r = refusals.run.out
    assert r["ro_clone"]["rc"] == 0, _fail_text(r["ro_clone"])
    res = r["ro_push"]
    assert res["rc"] != 0, _fail_text(res)
    assert "read-only" in res["err"], _fail_text(res)
    assert refusals.after["org/ro"] == refusals.before["org/ro"]
    assert not [s for s in refusals.run.seen if s.repo == "org/ro" and s.service == "receive-pack"]


def test_push_to_a_disallowed_ref_is_refused(refusals):
    line = _rejected(refusals.run.out["push_main"], "refs/heads/main")
    assert "not a ref this sandbox may push" in line, line
    line = _rejected(refusals.run.out["push_nested"], "refs/heads/sandbox/a/b")
    assert "not a ref this sandbox may push" in line, line


def test_delete_is_refused(refusals):
    line = _rejected(refusals.run.out["push_delete"], "refs/heads/sandbox/old")
    assert "deleting refs is not allowed" in line, line


def test_tag_is_refused(refusals):
    line = _rejected(refusals.run.out["push_tag"], "refs/tags/v1")
    assert "tags" in line, line


def test_a_push_with_one_bad_ref_is_refused_whole(refusals):
    res = refusals.run.out["push_mixed"]
    _rejected(res, "refs/heads/main")
    line = _rejected(res, "refs/heads/sandbox/ok")
    assert "another ref" in line, line


def test_more_than_max_refs_is_refused(refusals):
    res = refusals.run.out["push_many"]
    line = _rejected(res, "refs/heads/sandbox/m0")
    assert "max_refs" in line, line


def test_refused_pushes_leave_the_upstream_unchanged(refusals):
    """Every refused push left the repository as it was; the only change is the
    allowed control push at the end, and only it reached git-receive-pack."""
    r = refusals.run.out
    assert r["push_ok"]["rc"] == 0, _fail_text(r["push_ok"])
    before, after = refusals.before["org/rules"], refusals.after["org/rules"]
    assert after == {**before, "refs/heads/sandbox/ok": r["rules_new"]}
    _rejected(r["push_big_refused"], "refs/heads/main")
    # git's "0000" probe before a large push holds no command and may pass.
    pushes = [
        s
        for s in refusals.run.seen
        if s.is_push_rpc and s.repo == "org/rules" and s.body != b"0000"
    ]
    assert len(pushes) == 1, [(s.repo, s.body[:120]) for s in pushes]
    assert b"refs/heads/sandbox/ok" in pushes[0].body
    assert max(s.body_len for s in refusals.run.seen if s.is_push_rpc) < 1024 * 1024
    assert not [s for s in refusals.run.seen if s.repo == "org/ro" and s.is_push_rpc]


def test_deletes_and_tags_pass_where_the_policy_allows_them(refusals):
    r = refusals.run.out
    for key in ("open_clone", "open_delete", "open_tag"):
        assert r[key]["rc"] == 0, f"{key}: {_fail_text(r[key])}"
    before, after = refusals.before["org/open"], refusals.after["org/open"]
    assert "refs/heads/gone" in before and "refs/heads/gone" not in after
    assert after["refs/tags/v2"] == r["open_tag_id"]
    delete = [
        ref
        for rec in refusals.run.git_audit()
        for ref in rec.get("refs") or []
        if ref["ref"] == "refs/heads/gone"
    ]
    assert delete and delete[0]["new"] == ZERO_OID and delete[0]["verdict"] == "allow"


def test_repository_case_is_the_policys_upstream(refusals):
    r = refusals.run.out
    assert r["case"]["rc"] == 0, _fail_text(r["case"])
    paths = {s.path for s in refusals.run.seen}
    assert not [p for p in paths if "Org" in p or "RULES" in p], paths


def test_upstream_refusing_the_credential_is_a_message_not_a_prompt(refusals):
    res = refusals.run.out["bad_cred"]
    assert res["rc"] != 0
    assert "asked for authentication" in res["err"], _fail_text(res)
    assert "Username" not in res["err"] and "terminal prompts" not in res["err"], res["err"]
    bad = [s for s in refusals.run.seen if s.host == BAD_HOST]
    assert bad and {s.credential for s in bad} == {"bad"}


def test_the_unix_endpoint_serves_git(refusals):
    res = refusals.run.out["unix"]
    assert res["rc"] == 0 and res["out"].rstrip().endswith("200"), _fail_text(res)
    assert "# service=git-upload-pack" in res["out"]


def test_the_git_host_is_not_reachable_around_the_git_gateway(refusals):
    r = refusals.run.out
    assert r["connect_curl"]["rc"] != 0 and "403" in r["connect_curl"]["err"], _fail_text(
        r["connect_curl"]
    )
    assert r["connect_git"]["rc"] != 0 and "403" in r["connect_git"]["err"], _fail_text(
        r["connect_git"]
    )
    connects = [rec for rec in refusals.run.audit if rec.get("method") == "CONNECT"]
    assert connects and all(rec["decision"] == "deny" for rec in connects), connects


def test_lfs_and_dumb_http_are_501_with_a_message(refusals):
    r = refusals.run.out
    status, body, _ = r["lfs"]
    assert status == 501 and "LFS" in body, (status, body)
    assert r["lfs_curl"]["out"].rstrip().endswith("501"), _fail_text(r["lfs_curl"])
    for key in ("dumb", "dumb_head"):
        status, body, _ = r[key]
        assert status == 501 and "dumb" in body, (key, status, body)
    assert not [s for s in refusals.run.seen if "lfs" in s.path or s.path.endswith("/HEAD")]


def test_audit_names_each_refused_ref_with_old_new_and_verdict(refusals):
    r, run = refusals.run.out, refusals.run
    lines = run.git_audit()
    assert lines, run.audit_text[-3000:]
    pushes = [rec for rec in lines if _audit_field(rec, "refs")]
    entries = [(rec, ref) for rec in pushes for ref in _audit_field(rec, "refs")]
    main_old = refusals.before["org/rules"]["refs/heads/main"]
    found = [
        (rec, ref)
        for rec, ref in entries
        if ref.get("ref") == "refs/heads/main" and ref.get("new") == r["rules_new"]
    ]
    assert found, json.dumps(pushes, indent=1)[:4000]
    rec, ref = found[0]
    assert ref.get("old") == main_old, ref
    assert _verdict(ref) not in ("allow", None), ref
    assert rec["decision"] == "deny", rec
    delete = [ref for _, ref in entries if ref.get("ref") == "refs/heads/sandbox/old"]
    assert delete and delete[0].get("new") == ZERO_OID, delete
    ok = [
        (rec, ref)
        for rec, ref in entries
        if ref.get("ref") == "refs/heads/sandbox/ok" and rec["decision"] == "allow"
    ]
    assert ok and ok[0][1].get("old") == ZERO_OID, json.dumps(pushes, indent=1)[:4000]
    unlisted = [rec for rec in lines if "org/unlisted" in _audit_repo(rec)]
    assert unlisted and all(rec["decision"] == "deny" for rec in unlisted), unlisted
    smart = [rec for rec in lines if rec["status"] != 501]  # LFS and dumb HTTP have none
    assert all(_audit_field(rec, "service") for rec in smart), [
        (rec["path"], rec["status"]) for rec in smart if not _audit_field(rec, "service")
    ]


# --- 3. malformed push bodies from a raw socket ---------------------------------------------

MALFORMED = r"""
bodies = json.load(open(os.environ["BODIES"]))
path = f"/git/git.test/{os.environ['REPO']}.git/git-receive-pack"
ctype = {"Content-Type": "application/x-git-receive-pack-request",
         "Accept": "application/x-git-receive-pack-result"}
for name, (hexbody, headers) in bodies.items():
    body = bytes.fromhex(hexbody)
    if name == "bad-chunk-size":
        R[name] = http("POST", path, body, {**ctype, **headers},
                       chunked=b"zz\r\n" + body + b"\r\n0\r\n\r\n")
    else:
        R[name] = http("POST", path, body, {**ctype, **headers},
                       chunked=name.startswith("chunked"))
# The sandbox's own credentials and forwarding headers never go upstream.
R["headers"] = http("GET", f"/git/git.test/{os.environ['REPO']}.git/info/refs"
                    "?service=git-upload-pack", b"", {
    "Authorization": "Basic eC1hY2Nlc3MtdG9rZW46c2FuZGJveA==", "Cookie": "session=sandbox",
    "X-Forwarded-For": "203.0.113.9", "Proxy-Authorization": "Basic eDp5"})
# Paths that try to reach something else than a listed repository's git endpoints.
adv = "info/refs?service=git-upload-pack"
R["paths"] = {
    "ip-literal-host": http("GET", f"/git/{os.environ['UPSTREAM']}/org/mal.git/{adv}"),
    "dotdot": http("GET", f"/git/git.test/org/mal/../unlisted.git/{adv}"),
    "percent-encoded": http("GET", f"/git/git.test/org/%6dal.git/{adv}"),
    "encoded-slash": http("GET", f"/git/git.test/org%2fmal.git/{adv}"),
    "extra-query": http("GET", f"/git/git.test/org/mal.git/{adv}&x=1"),
    "host-not-plain": http("GET", f"/git/GIT.TEST./org/mal.git/{adv}"),
    "no-host": http("GET", f"/git//org/mal.git/{adv}"),
    "api-via-git": http("POST", "/git/api.apphost.test/app/installations/1/access_tokens",
                        b"{}", {"Content-Type": "application/json"}),
    "api-host-as-repo": http("GET", f"/git/api.apphost.test/installation/token.git/{adv}"),
    "git-protocol-v3": http("GET", f"/git/git.test/org/mal.git/{adv}",
                            headers={"Git-Protocol": "version=3"}),
    "body-on-info-refs": http("POST", f"/git/git.test/org/mal.git/{adv}", b"0000",
                              {"Content-Type": "application/x-git-upload-pack-request"}),
    "get-on-rpc": http("GET", "/git/git.test/org/mal.git/git-upload-pack"),
}
emit()
"""

MALFORMED_STATUS = {"wrong-content-type": {415}, "no-content-type": {415}}
# A gzip-compressed push body cannot be read before it is forwarded: refused, as a
# 400 (not a pkt-line) or a 415 (an encoding the gateway does not take).
MALFORMED_STATUS["gzip-content-encoding"] = {400, 415}


@dataclass
class Malformed:
    run: Run
    names: list[str]
    before: dict[str, str]
    after: dict[str, str]
    control: bytes
    base: PushBody


def _capture_push_body(world: World) -> bytes:
    """A real push body: git 2.39 on the host pushing a new repository's main straight
    to the upstream (not through the gateway); the body as the upstream got it."""
    repo = "org/capture"
    world.up.make_empty_repo(repo)
    work = world.work / "capture"
    try:
        git("init", "-q", "-b", "main", str(work))
        for i in range(3):
            (work / f"f{i}.txt").write_text(f"captured {i}\n" * 20)
            git("add", "-A", cwd=work)
            git("commit", "-q", "-m", f"c{i}", cwd=work)
        mark = world.up.mark()
        git(
            *world.up.git_direct_args(GIT_HOST),
            "push",
            "-q",
            url(GIT_HOST, repo),
            "main",
            cwd=work,
        )
        pushes = [s for s in world.up.since(mark) if s.is_push_rpc]
        assert len(pushes) == 1
        return pushes[0].body
    finally:
        shutil.rmtree(work, ignore_errors=True)
        world.up.remove_repo(repo)


@pytest.fixture(scope="module")
def malformed(world: World) -> Iterator[Malformed]:
    base = PushBody.parse(_capture_push_body(world))
    repo = "org/mal"
    world.up.make_empty_repo(repo)
    before = world.up.show_ref(repo)
    bodies = {
        name: (body.hex(), headers)
        for name, (body, headers) in malformed_bodies(base, "refs/heads/sandbox/mal").items()
    }
    bodies["bad-chunk-size"] = (base.body("refs/heads/sandbox/mal").hex(), {})
    names = list(bodies)
    control = base.body("refs/heads/sandbox/ctrl")
    bodies["control"] = (control.hex(), {})
    bodies["chunked-control"] = (base.body("refs/heads/sandbox/ctrl2").hex(), {})
    path = world.share / "bodies.json"
    path.write_text(json.dumps(bodies))
    path.chmod(0o644)
    # ~50 requests in a second: over the default burst (40), which git requests share.
    policy = write_policy((url(GIT_HOST, repo), "write", '["refs/heads/sandbox/*"]'), rate=1000)
    try:
        run = sandbox_run(
            world,
            "malformed",
            MALFORMED,
            policy=policy,
            env={"BODIES": str(path), "REPO": repo, "UPSTREAM": world.addr},
        )
        yield Malformed(run, names, before, world.up.show_ref(repo), control, base)
    finally:
        world.up.remove_repo(repo)


def test_the_raw_client_works_when_the_body_is_valid(malformed):
    """Control: the same client and a valid body (plain and chunked) are forwarded, so
    the refusals below are the parser's."""
    r = malformed.run.out
    for key, ref in (("control", "ctrl"), ("chunked-control", "ctrl2")):
        status, body, _ = r[key]
        assert status == 200, (key, status, body)
        assert f"ok refs/heads/sandbox/{ref}" in body, (key, body)
        assert malformed.after[f"refs/heads/sandbox/{ref}"] == malformed.base.new


def _malformed_names() -> list[str]:
    # Build the names from a dummy base body (the content does not matter for names).
    dummy = PushBody(ZERO_OID, "1" * 40, "refs/heads/x", "report-status", b"PACK")
    return [*malformed_bodies(dummy, "refs/heads/x"), "bad-chunk-size"]


@pytest.mark.parametrize("name", _malformed_names())
def test_malformed_push_body_is_refused_and_nothing_forwarded(malformed, name):
    status, body, _ = malformed.run.out[name]
    assert status in MALFORMED_STATUS.get(name, {400}), (name, status, body)
    assert body.strip(), f"{name}: the refusal says nothing"
    # Nothing of it reached git-receive-pack: the only push POSTs upstream are the two
    # controls, byte for byte.
    pushes = [s for s in malformed.run.seen if s.is_push_rpc]
    assert [s.body for s in pushes].count(malformed.control) == 1
    assert len(pushes) == 2, [s.body[:100] for s in pushes]
    assert set(malformed.after) - set(malformed.before) == {
        "refs/heads/sandbox/ctrl",
        "refs/heads/sandbox/ctrl2",
    }


def test_client_credentials_are_replaced_not_forwarded(malformed):
    status, body, _ = malformed.run.out["headers"]
    assert status == 200 and "# service=git-upload-pack" in body, (status, body)
    gets = [s for s in malformed.run.seen if s.method == "GET" and s.repo == "org/mal"]
    assert len(gets) == 1
    assert gets[0].credential == f"static:{GIT_HOST}"
    for name in ("cookie", "x-forwarded-for", "proxy-authorization", "forwarded", "via"):
        assert name not in gets[0].headers, gets[0].headers


PATH_STATUS = {
    "ip-literal-host": {400},
    "dotdot": {400},
    "percent-encoded": {400},
    "encoded-slash": {400},
    "extra-query": {400},
    "host-not-plain": {400},
    "no-host": {400},
    "api-via-git": {403, 404},
    "api-host-as-repo": {403},
    "git-protocol-v3": {400},
    "body-on-info-refs": {400, 405},
    "get-on-rpc": {405},
}


@pytest.mark.parametrize("name", list(PATH_STATUS))
def test_paths_around_the_listed_repositories_are_refused(malformed, name):
    status, body, _ = malformed.run.out["paths"][name]
    assert status in PATH_STATUS[name], (name, status, body)
    # Upstream: only the header test's GET and the two control pushes, ever.
    seen = [(s.method, s.path) for s in malformed.run.seen]
    assert sorted(seen) == sorted(
        [
            ("GET", "/org/mal.git/info/refs"),
            ("POST", "/org/mal.git/git-receive-pack"),
            ("POST", "/org/mal.git/git-receive-pack"),
        ]
    ), seen


def test_malformed_refusals_are_audited(malformed):
    lines = [rec for rec in malformed.run.git_audit() if rec.get("status") in (400, 415)]
    assert len(lines) >= len(malformed.names), malformed.run.audit_text[-3000:]


# --- 4. the GitHub App flow, and no secret anywhere the sandbox can read ------------------------

SCAN_RUN = r"""
R["static_clone"] = sh("git", "clone", "https://git.test/org/secret", W + "/secret")
R["app_clone_a"] = sh("git", "clone", "https://apphost.test/org/app-a", W + "/app-a")
R["app_clone_b"] = sh("git", "clone", "https://apphost.test/org/app-b", W + "/app-b")
R["app_head"] = head(W + "/app-a")
R["creds_dir_visible"] = os.path.exists(os.environ["CREDS"])
# What the in-sandbox API says goes to files, so the scan reads it too.
for name in ("policy", "denials"):
    res = sh("curl", "-sS", "--unix-socket", "/run/sandgate/gateway.sock",
             f"http://sandgate/_sandgate/v1/{name}")
    with open(f"/tmp/api-{name}.json", "w") as f:
        f.write(res["out"] + res["err"])
R["api_policy"] = open("/tmp/api-policy.json").read()[-3000:]
scan = sh(sys.executable, "/" + os.environ["SHARE"].strip("/") + "/scan.py", timeout=240)
R["scan_rc"] = scan["rc"]
R["scan_err"] = scan["err"][-2000:]
try:
    R["scan"] = json.loads(scan["out"])
except ValueError:
    R["scan"] = None
emit()
"""


@dataclass
class Secrets:
    run: Run
    app_refs: dict[str, str]
    secrets: list[str]
    mints_before: int


@pytest.fixture(scope="module")
def secrets_run(world: World) -> Iterator[Secrets]:
    repos = {"org/secret": {"main": 1}, "org/app-a": {"main": 2}, "org/app-b": {"main": 1}}
    refs = {name: world.up.make_repo(name, branches=b) for name, b in repos.items()}
    world.app.expect = {"repositories": ["app-a", "app-b"], "permissions": {"contents": "read"}}
    world.app.next_tokens = [random_token() for _ in range(3)]
    mints_before = len(world.app.mints)
    policy = write_policy(
        (url(GIT_HOST, "org/secret"), "read", None),
        (url(APP_HOST, "org/app-a"), "read", None),
        (url(APP_HOST, "org/app-b"), "read", None),
    )
    secrets_now = world.secrets()
    try:
        run = sandbox_run(
            world,
            "secrets",
            SCAN_RUN,
            policy=policy,
            pins=[GIT_HOST, APP_HOST, API_HOST],
            env={
                **scan_env(secrets_now, world.since),
                "SHARE": str(world.share),
                "CREDS": str(world.creds),
            },
            timeout=300,
        )
        yield Secrets(run, refs["org/app-a"], world.secrets(), mints_before)
    finally:
        world.app.expect = None
        for name in repos:
            world.up.remove_repo(name)


def test_app_clone_works_with_an_installation_token(secrets_run, world):
    r = secrets_run.run.out
    assert r["app_clone_a"]["rc"] == 0, _fail_text(r["app_clone_a"])
    assert r["app_clone_b"]["rc"] == 0, _fail_text(r["app_clone_b"])
    assert r["app_head"] == secrets_run.app_refs["refs/heads/main"]
    app_reqs = [s for s in secrets_run.run.seen if s.service and s.host == APP_HOST]
    assert app_reqs and {s.credential for s in app_reqs} == {"app"}, [
        (s.path, s.credential) for s in app_reqs
    ]
    static = [s for s in secrets_run.run.seen if s.service and s.host == GIT_HOST]
    assert static and {s.credential for s in static} == {f"static:{GIT_HOST}"}


def test_app_jwt_verified_and_token_narrowed(secrets_run, world):
    mints = world.app.mints[secrets_run.mints_before :]
    assert mints, "the gateway never asked the App API for a token"
    # One token for the sandbox's life, cached across its requests (credentials.py).
    assert len(mints) == 1, [(m.status, m.body) for m in mints]
    for call in mints:
        assert call.status == 201, (call.status, call.error)
        assert call.jwt_claims and str(call.jwt_claims["iss"]) == str(APP_ID)
        assert call.jwt_header and call.jwt_header["alg"] == "RS256"
        assert sorted(call.body["repositories"]) == ["app-a", "app-b"], call.body
        assert call.body["permissions"] == {"contents": "read"}, call.body
    assert all(m.installation_id == str(INSTALLATION_ID) for m in mints)


def test_app_token_revoked_when_the_sandbox_is_removed(secrets_run, world):
    minted = [m.token for m in world.app.mints[secrets_run.mints_before :] if m.token]
    assert minted
    assert set(minted) <= set(world.app.revoked), "an installation token was not revoked"
    deletes = [s for s in secrets_run.run.seen if s.method == "DELETE"]
    assert deletes and all(s.path == "/installation/token" for s in deletes)
    assert all(s.headers.get("authorization", "").startswith("token ") for s in deletes)


def test_no_secret_is_readable_inside_the_sandbox(secrets_run):
    r = secrets_run.run.out
    assert r["static_clone"]["rc"] == 0, _fail_text(r["static_clone"])
    assert r["creds_dir_visible"] is False
    assert r["scan_rc"] == 0 and r["scan"], r["scan_err"]
    scan = r["scan"]
    assert scan["hits"] == [], scan["hits"]
    stats = scan["stats"]
    # It did look: the workspace clones, the share, /proc of every process.
    assert stats["read"] > 10 and stats["proc"] >= 3 and stats["files"] > 1000, stats
    assert "insteadof" in scan["git_config"].lower()


def test_no_secret_in_the_audit_log_or_sandgate_output(secrets_run, world):
    run = secrets_run.run
    jwts = [m.jwt for m in world.app.mints if m.jwt]
    texts = {"audit": run.audit_text, "stdout": run.stdout, "stderr": run.stderr}
    for where, text in texts.items():
        for i, secret in enumerate([*secrets_run.secrets, *world.secrets(), *jwts]):
            assert secret not in text, f"secret #{i} appears in {where}"
    # And the audit log has its git lines for both hosts.
    repos = " ".join(_audit_repo(rec) or "" for rec in run.git_audit())
    assert "org/secret" in repos and "org/app-a" in repos, run.audit_text[-2000:]


APP_WRITE = r"""
d = W + "/w"
R["clone"] = sh("git", "clone", "https://apphost.test/org/app-w", d)
R["new"] = commit(d, "w.txt")
R["push"] = sh("git", "push", "origin", "HEAD:refs/heads/sandbox/w", cwd=d)
emit()
"""


def test_app_write_repository_gets_a_contents_write_token(world):
    repo = "org/app-w"
    world.up.make_repo(repo)
    world.app.expect = {"repositories": ["app-w"], "permissions": {"contents": "write"}}
    mints_before = len(world.app.mints)
    try:
        run = sandbox_run(
            world,
            "app-write",
            APP_WRITE,
            policy=write_policy((url(APP_HOST, repo), "write", '["refs/heads/sandbox/*"]')),
            pins=[APP_HOST, API_HOST],
        )
        after = world.up.show_ref(repo)
    finally:
        world.app.expect = None
        world.up.remove_repo(repo)
    r = run.out
    assert r["clone"]["rc"] == 0, _fail_text(r["clone"])
    assert r["push"]["rc"] == 0, _fail_text(r["push"])
    assert after["refs/heads/sandbox/w"] == r["new"]
    mints = world.app.mints[mints_before:]
    assert mints and all(m.status == 201 for m in mints), [(m.status, m.error) for m in mints]
    assert {s.credential for s in run.seen if s.service} == {"app"}
    minted = {m.token for m in mints}
    assert minted <= set(world.app.revoked)


def test_app_token_revoked_when_the_sandbox_times_out(world):
    """The wall-clock limit kills the command in the middle of its work: the token the
    sandbox was using is revoked all the same."""
    repo = "org/app-t"
    world.up.make_repo(repo)
    world.app.expect = {"repositories": ["app-t"], "permissions": {"contents": "read"}}
    mints_before = len(world.app.mints)
    try:
        run = sandbox_run(
            world,
            "app-timeout",
            r"""
import time
R["clone"] = sh("git", "clone", "https://apphost.test/org/app-t", W + "/t")
print(json.dumps(R), flush=True)
time.sleep(120)
""",
            repos=[url(APP_HOST, repo)],
            pins=[APP_HOST, API_HOST],
            extra=["--timeout", "4s"],
            check=False,
        )
    finally:
        world.app.expect = None
        world.up.remove_repo(repo)
    assert run.rc == 137, run.stderr[-2000:]
    assert run.out["clone"]["rc"] == 0, _fail_text(run.out["clone"])
    minted = [m.token for m in world.app.mints[mints_before:] if m.token]
    assert minted and set(minted) <= set(world.app.revoked), "not revoked after the timeout"


def test_app_token_refused_by_the_api_is_a_clear_error(world):
    """The App API refuses to mint (here: the narrowing is not what it expects): the
    clone fails with the gateway's message, nothing reaches the git server, and no
    secret (the JWT included) shows."""
    repo = "org/app-x"
    world.up.make_repo(repo)
    world.app.expect = {"repositories": ["something-else"], "permissions": {"contents": "read"}}
    mints_before = len(world.app.mints)
    try:
        run = sandbox_run(
            world,
            "app-refused",
            r"""
R["clone"] = sh("git", "clone", "https://apphost.test/org/app-x", W + "/x")
emit()
""",
            repos=[url(APP_HOST, repo)],
            pins=[APP_HOST, API_HOST],
        )
    finally:
        world.app.expect = None
        world.up.remove_repo(repo)
    res = run.out["clone"]
    assert res["rc"] != 0
    assert "422" in res["err"] and APP_HOST in res["err"], _fail_text(res)
    assert not [s for s in run.seen if s.service], "a git request went upstream"
    mints = world.app.mints[mints_before:]
    assert mints and all(m.status == 422 for m in mints)
    for m in mints:
        for where, text in (("stderr", res["err"]), ("audit", run.audit_text)):
            assert m.jwt not in text, f"the JWT appears in {where}"
