"""The git gateway, quickly, end to end: `git http-backend` behind a small HTTPS server
(a test CA) in an upstream network namespace at 10.214.N.2 that wants HTTP Basic
`x-access-token:<token>`, and git talking to the gateway, first from the host against
an in-process Gateway, then from inside a sandbox through `sandgate run`. Names are
pinned (a fake resolver, `--resolve`): nothing real is ever looked up or reached.

The full suite (every refusal, GitHub App tokens, both endpoints from a sandbox) is
tests/integration/test_git_sandbox.py. The first tests here are pure (no root).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import IPv4Address, ip_address
from pathlib import Path

import pytest
import uvloop

from gateway.git import PushAdvertisementFilter, split_git_path
from gateway.pktline import encode_pkt
from gateway.policy import parse_policy
from gateway.proxy import Gateway, GatewayConfig
from runner.gateway_thread import proxy_env
from tests.integration.gateway_fixtures import GATEWAY_PROCESSES
from tests.nsutil import run_in_netns
from tests.testca import make_test_ca

SANDGATE = os.path.join(os.path.dirname(sys.executable), "sandgate")
GIT = shutil.which("git") or "/usr/bin/git"
HOST = "git.test"
REPO_URL = f"https://{HOST}/org/repo"
ZERO = "0" * 40


# --- pure pieces -------------------------------------------------------------------------


def test_the_receive_pack_advertisement_keeps_only_push_capabilities() -> None:
    oid = "a" * 40
    caps = (
        "report-status report-status-v2 delete-refs side-band-64k quiet atomic ofs-delta "
        "push-options object-format=sha1 agent=git/2.39.5 push-cert=1234-abcd no-thin "
        "some-future-thing"
    )
    advert = (
        encode_pkt(b"# service=git-receive-pack\n")
        + b"0000"
        + encode_pkt(f"{oid} refs/heads/main\0{caps}\n".encode())
        + encode_pkt(f"{oid} refs/heads/other\n".encode())
        + b"0000"
    )
    for step in (1, 7, len(advert)):  # any split of the stream
        f = PushAdvertisementFilter()
        out = b"".join(f.feed(advert[i : i + step]) for i in range(0, len(advert), step))
        f.close()
        first = out[out.index(b"0000") + 4 :]
        line = first[4 : int(first[:4], 16)]
        kept = line.split(b"\0")[1].rstrip(b"\n").decode().split(" ")
        assert kept == [
            "report-status",
            "report-status-v2",
            "delete-refs",
            "side-band-64k",
            "quiet",
            "atomic",
            "ofs-delta",
            "push-options",
            "object-format=sha1",
            "agent=git/2.39.5",
            "no-thin",
        ]
        assert out.endswith(encode_pkt(f"{oid} refs/heads/other\n".encode()) + b"0000")


def test_git_paths_name_a_plain_host() -> None:
    assert split_git_path("/git/git.test/org/repo/info/refs?service=x") == (
        "git.test",
        "/org/repo/info/refs?service=x",
    )
    for bad in ("/git/", "/git/git.test", "/git/10.0.0.1/o/r", "/git/git.test./o/r", "/git/a_b/r"):
        with pytest.raises(Exception) as info:
            split_git_path(bad)
        assert getattr(info.value, "status", None) == 400, bad


def test_git_in_the_sandbox_is_pointed_at_the_gateway() -> None:
    env = proxy_env(IPv4Address("10.213.0.0"), 3128, ["github.com", "git.test", "github.com"])
    assert env["GIT_CONFIG_COUNT"] == "3"
    config = {env[f"GIT_CONFIG_KEY_{i}"]: env[f"GIT_CONFIG_VALUE_{i}"] for i in range(3)}
    assert config == {
        "http.proxy": "http://10.213.0.0:3128",
        "url.http://10.213.0.0:3128/git/git.test/.insteadOf": "https://git.test/",
        "url.http://10.213.0.0:3128/git/github.com/.insteadOf": "https://github.com/",
    }
    assert "10.213.0.0" in env["NO_PROXY"].split(",") and env["no_proxy"] == env["NO_PROXY"]
    assert not any("token" in k.lower() or "cred" in k.lower() for k in env)


def test_repo_flag() -> None:
    from runner.cli import build_parser
    from runner.workload import parse_repo

    args = build_parser().parse_args(
        ["run", "--repo", "https://git.test/org/a.git", "--repo", f"{REPO_URL}=write", "--", "x"]
    )
    # The command line keeps the text (a daemon request sends it as is), checked.
    read, write = (parse_repo(text) for text in args.repo)
    assert (read.url, read.access, read.refs) == ("https://git.test/org/a", "read", ())
    assert (write.url, write.access, write.refs) == (REPO_URL, "write", ("refs/heads/*",))
    assert (write.allow_tags, write.allow_delete, write.max_refs) == (False, False, 10)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--repo", f"{REPO_URL}=admin", "--", "x"])


# --- an upstream git server ---------------------------------------------------------------


@dataclass
class GitServer:
    addr: IPv4Address
    root: Path  # bare repositories: root/org/repo.git
    ca_cert: Path
    token: str
    seen: list[dict] = field(default_factory=list)

    def ref(self, name: str) -> str | None:
        out = subprocess.run(
            [GIT, "--git-dir", str(self.root / "org/repo.git"), "rev-parse", "--verify", name],
            capture_output=True,
            text=True,
            check=False,
        )
        return out.stdout.strip() if out.returncode == 0 else None


def _handler(server: GitServer) -> type[BaseHTTPRequestHandler]:
    expected = "Basic " + base64.b64encode(f"x-access-token:{server.token}".encode()).decode()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self._cgi()

        def do_POST(self) -> None:
            self._cgi()

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = b""
                while size := int(self.rfile.readline().strip(), 16):
                    out += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
                return out
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _cgi(self) -> None:
            body = self._body()
            server.seen.append(
                {"method": self.command, "path": self.path, "headers": self.headers.items()}
            )
            if self.headers.get("Authorization") != expected:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="git"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            path, _, query = self.path.partition("?")
            env = {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "GIT_PROJECT_ROOT": str(server.root),
                "GIT_HTTP_EXPORT_ALL": "1",
                "GIT_CONFIG_NOSYSTEM": "1",
                "HOME": str(server.root),
                "REQUEST_METHOD": self.command,
                "PATH_INFO": path,
                "QUERY_STRING": query,
                "REMOTE_USER": "x-access-token",
                "REMOTE_ADDR": self.client_address[0],
                "CONTENT_LENGTH": str(len(body)),
                "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            }
            for name in ("Content-Encoding", "Git-Protocol"):
                if name in self.headers:
                    env["HTTP_" + name.upper().replace("-", "_")] = self.headers[name]
            proc = subprocess.run(
                [GIT, "http-backend"], input=body, env=env, capture_output=True, check=False
            )
            head, _, payload = proc.stdout.partition(b"\r\n\r\n")
            status, headers = 200, []
            for line in head.decode("latin-1").split("\r\n"):
                name, _, value = line.partition(":")
                if name.lower() == "status":
                    status = int(value.split()[0])
                elif name:
                    headers.append((name, value.strip()))
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    return Handler


def _git(*args: str, cwd: Path | None = None, env: dict | None = None, check: bool = True):
    base = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(cwd or "/tmp"),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    return subprocess.run(
        [GIT, *args],
        cwd=cwd,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=check,
    )


@pytest.fixture
def git_server(upstream, tmp_path) -> Iterator[GitServer]:
    certs, keys = tmp_path / "certs", tmp_path / "keys"
    certs.mkdir()
    keys.mkdir(mode=0o700)
    ca = make_test_ca(certs, keys, [HOST])
    root = tmp_path / "repos"
    work = tmp_path / "seed"
    work.mkdir()
    _git("init", "-q", "-b", "main", cwd=work)
    (work / "README").write_text("hello\n")
    _git("add", "README", cwd=work)
    _git("commit", "-q", "-m", "first", cwd=work)
    (root / "org").mkdir(parents=True)
    _git("clone", "-q", "--bare", str(work), str(root / "org/repo.git"))
    server = GitServer(upstream.addr, root, ca.ca_cert, "tok-" + secrets.token_urlsafe(24))

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(ca.server_cert, ca.server_key)

    def listen() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((str(upstream.addr), 443))
        s.listen(16)
        return s

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def get_request(self):
            conn, peer = self.socket.accept()
            conn.settimeout(30)
            return ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False), peer

    httpd = Server((str(upstream.addr), 443), _handler(server), bind_and_activate=False)
    httpd.socket.close()
    httpd.socket = run_in_netns(upstream.netns, listen)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        httpd.shutdown()
        thread.join()
        httpd.server_close()


# --- from the host, through an in-process gateway ------------------------------------------


# Every test here runs with the gateway in one process and in two: with two, the
# kernel gives each connection to either, and a helper hands a git request back to
# the first process (which holds the credentials) with the bytes it has read.
pytestmark = pytest.mark.usefixtures("gateway_processes")


@contextlib.contextmanager
def gateway(policy_text: str, tmp_path: Path, server: GitServer, creds: Path) -> Iterator:
    loop = uvloop.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def call(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(30)

    def resolve(host: str, port: int):
        if host != HOST:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [ip_address(str(server.addr))]

    config = GatewayConfig(
        audit_path=str(tmp_path / "audit.jsonl"),
        resolver=resolve,
        credentials_dir=str(creds),
        upstream_ca_file=str(server.ca_cert),
        processes=GATEWAY_PROCESSES[0],
    )

    async def start():
        gw = Gateway(config)
        ends = await gw.add_sandbox("gitlocal", parse_policy(policy_text), tcp=("127.0.0.1", 0))
        return gw, ends

    gw, ends = call(start())
    try:
        yield ends.tcp, tmp_path / "audit.jsonl"
    finally:
        call(gw.close())
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


def _credentials(tmp_path: Path, token: str) -> Path:
    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    (creds / f"{HOST}.token").write_text(token + "\n")
    (creds / f"{HOST}.token").chmod(0o600)
    return creds


POLICY = f"""
[egress]
allow_cidrs = ["10.214.0.0/16"]
[[git.repos]]
url = "{REPO_URL}"
access = "write"
[git.repos.push]
refs = ["refs/heads/sandbox/*"]
"""


@pytest.mark.root
def test_host_git_through_the_gateway(git_server, tmp_path) -> None:
    creds = _credentials(tmp_path, git_server.token)
    with gateway(POLICY, tmp_path, git_server, creds) as (tcp, audit_path):
        addr, port = tcp
        rewrite = {
            "GIT_CONFIG_COUNT": "2",
            "GIT_CONFIG_KEY_0": f"url.http://{addr}:{port}/git/{HOST}/.insteadOf",
            "GIT_CONFIG_VALUE_0": f"https://{HOST}/",
            # A client's own credential never reaches the upstream.
            "GIT_CONFIG_KEY_1": "http.extraHeader",
            "GIT_CONFIG_VALUE_1": "Authorization: Basic c2FuZGJveDpzdG9sZW4=",
        }
        _git("clone", "-q", REPO_URL, str(tmp_path / "r"), env=rewrite)
        work = tmp_path / "r"
        assert (work / "README").read_text() == "hello\n"
        (work / "new").write_text("x\n")
        _git("add", "new", cwd=work)
        _git("commit", "-q", "-m", "second", cwd=work)
        head = _git("rev-parse", "HEAD", cwd=work).stdout.strip()

        ok = _git("push", "origin", "HEAD:refs/heads/sandbox/one", cwd=work, env=rewrite)
        assert git_server.ref("refs/heads/sandbox/one") == head, ok.stderr

        # Over http.postBuffer (1 MiB) git probes with an empty push, then streams chunked.
        (work / "big").write_bytes(os.urandom(3 << 20))
        _git("add", "big", cwd=work)
        _git("commit", "-q", "-m", "big", cwd=work)
        big = _git("rev-parse", "HEAD", cwd=work).stdout.strip()
        ok = _git("push", "origin", "HEAD:refs/heads/sandbox/big", cwd=work, env=rewrite)
        assert git_server.ref("refs/heads/sandbox/big") == big, ok.stderr

        # A repository the policy does not list: 403, and git shows the gateway's reason.
        other = _git("ls-remote", f"https://{HOST}/org/other", env=rewrite, check=False)
        assert other.returncode != 0 and "error: 403" in other.stderr
        assert f"remote: sandgate: git upload-pack for https://{HOST}/org/other refused" in (
            other.stderr
        )
        assert "[[git.repos]]" in other.stderr and "remote: request id: " in other.stderr

        main_before = git_server.ref("refs/heads/main")
        refused = _git("push", "origin", "HEAD:main", cwd=work, env=rewrite, check=False)
        assert refused.returncode != 0
        assert "! [remote rejected] HEAD -> main (not a ref this sandbox may push" in refused.stderr
        assert "remote: sandgate: this push was refused" in refused.stderr
        assert git_server.ref("refs/heads/main") == main_before

    seen_auth = {
        v for r in git_server.seen for k, v in r["headers"] if k.lower() == "authorization"
    }
    assert len(seen_auth) == 1 and "c2FuZGJveDpzdG9sZW4=" not in seen_auth.pop()
    assert all(r["path"].startswith("/org/repo.git/") for r in git_server.seen)
    # The refused push never reached the upstream: one receive-pack POST (the allowed one).
    posts = [r for r in git_server.seen if r["method"] == "POST" and "receive" in r["path"]]
    assert len(posts) == 3  # the small push, the probe and the big push

    text = audit_path.read_text()
    assert git_server.token not in text
    lines = [json.loads(line) for line in text.splitlines()]
    assert {a["repo"] for a in lines} == {REPO_URL, f"https://{HOST}/org/other"}
    (denied,) = [a for a in lines if a["decision"] != "allow" and not a["refs"]]
    assert (denied["status"], denied["rule"], denied["service"]) == (
        403,
        "git.repos",
        "upload-pack",
    )
    pushes = [a for a in lines if a["refs"]]
    assert [(a["decision"], a["refs"][0]["ref"], a["refs"][0]["verdict"]) for a in pushes] == [
        ("allow", "refs/heads/sandbox/one", "allow"),
        ("allow", "refs/heads/sandbox/big", "allow"),
        ("deny", "refs/heads/main", "deny"),
    ]
    assert pushes[2]["refs"][0]["old"] == main_before and pushes[2]["refs"][0]["new"] == big
    assert pushes[0]["refs"][0]["old"] == ZERO


# --- from inside a sandbox, through `sandgate run` ------------------------------------------


def _sandgate_run(tmp_path: Path, name: str, server: GitServer, extra: list[str], script: str):
    creds = tmp_path / "credentials"
    if not creds.exists():
        _credentials(tmp_path, server.token)
    audit = tmp_path / f"{name}-audit.jsonl"
    args = [SANDGATE, "run", "--state-dir", str(tmp_path / "state"), "--audit-log", str(audit)]
    args += ["--resolve", f"{HOST}={server.addr}", "--allow-cidr", "10.214.0.0/16"]
    args += ["--credentials", str(creds), "--upstream-ca", str(server.ca_cert), *extra]
    args += ["-e", "GIT_AUTHOR_NAME=t", "-e", "GIT_AUTHOR_EMAIL=t@t"]
    args += ["-e", "GIT_COMMITTER_NAME=t", "-e", "GIT_COMMITTER_EMAIL=t@t"]
    args += ["--", "sh", "-c", script]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    return proc, audit.read_text() if audit.exists() else ""


@pytest.mark.root
def test_clone_and_push_from_a_sandbox(git_server, tmp_path) -> None:
    clone_and_push = (
        f"set -e; git clone -q {REPO_URL} /workspace/r; cd /workspace/r; cat README; "
        "echo y > y; git add y; git commit -q -m y; git push -q origin HEAD:refs/heads/feature; "
        "git rev-parse HEAD; env | grep -ci token || true"
    )
    proc, audit = _sandgate_run(
        tmp_path, "write", git_server, ["--repo", f"{REPO_URL}=write"], clone_and_push
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.split()
    assert out[0] == "hello" and git_server.ref("refs/heads/feature") == out[1]
    assert out[2] == "0"  # nothing named like a token in the sandbox's environment
    assert git_server.token not in audit and audit.count(f'"repo":"{REPO_URL}"') >= 4

    policy = tmp_path / "sandbox-branches.toml"
    policy.write_text(POLICY)
    main_before = git_server.ref("refs/heads/main")
    push_main = (
        f"git clone -q {REPO_URL} /workspace/r && cd /workspace/r && echo z > z && git add z "
        "&& git commit -q -m z && git push origin HEAD:main"
    )
    proc, audit = _sandgate_run(
        tmp_path, "refused", git_server, ["--policy", str(policy)], push_main
    )
    assert proc.returncode == 1, proc.stderr
    assert "! [remote rejected] HEAD -> main (not a ref this sandbox may push" in proc.stderr
    assert git_server.ref("refs/heads/main") == main_before
    refused = [json.loads(line) for line in audit.splitlines() if '"refs":[' in line]
    assert [(a["decision"], a["refs"][0]["ref"]) for a in refused] == [("deny", "refs/heads/main")]


@pytest.mark.root
def test_a_readable_token_file_stops_the_run_before_the_sandbox(tmp_path) -> None:
    creds = _credentials(tmp_path, "tok-" + secrets.token_urlsafe(16))
    (creds / f"{HOST}.token").chmod(0o644)
    args = [SANDGATE, "run", "--state-dir", str(tmp_path / "state"), "--credentials", str(creds)]
    args += ["--repo", REPO_URL, "--", "true"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 125
    assert f"chmod 600 {creds / f'{HOST}.token'}" in proc.stderr
    assert not list((tmp_path / "state").glob("sandboxes/*.json"))
