"""gateway/gitroutes.py: every route and refusal as plain values, the repository and
push rules over parsed policies, and then a small gateway built from these pieces
(and gateway/pktline.py) in front of a real `git http-backend`, driven by real git:
clones, fetches over protocol v0, v1 and v2, allowed and refused pushes, the probe
before a large push, and the refusals git shows its user."""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.gitroutes import (
    MAX_PATH,
    GitRefusal,
    GitRoute,
    check_access,
    check_push,
    find_repo,
    push_allowed,
    ref_matches,
    repo_url,
    results_when_refused,
    route,
    upstream_target,
)
from gateway.http import response
from gateway.pktline import (
    NEED_DATA,
    PushRequest,
    PushRequestParser,
    RefUpdate,
    encode_pkt,
    flush,
    read_pkt,
    report_status,
)
from gateway.policy import RepoRule, parse_policy

UPLOAD_REQ = "application/x-git-upload-pack-request"
RECEIVE_REQ = "application/x-git-receive-pack-request"

POLICY = """
[[git.repos]]
url = "https://git.example/org/app"
access = "write"

[git.repos.push]
refs = ["refs/heads/sandbox/*", "refs/heads/feat-*", "refs/heads/exact"]
max_refs = 3

[[git.repos]]
url = "https://git.example/org/lib.git"

[[git.repos]]
url = "https://git.example/group/sub/deep"

[[git.repos]]
url = "https://other.example/org/app"
access = "write"

[git.repos.push]
refs = ["refs/heads/*", "refs/tags/v*"]
allow_delete = true
allow_tags = true
"""
REPOS = parse_policy(POLICY).repos
APP, LIB, DEEP, OTHER_APP = REPOS


def get(path: str, query: str = "", protocol: str | None = None) -> GitRoute | GitRefusal:
    return route("GET", path, query, None, protocol)


def post(path: str, content_type: str | None, query: str = "") -> GitRoute | GitRefusal:
    return route("POST", path, query, content_type, None)


def refused(result: GitRoute | GitRefusal, status: int, text: str = "") -> GitRefusal:
    assert isinstance(result, GitRefusal), result
    assert result.status == status, result.reason
    assert text in result.reason
    return result


# --- route: what passes --------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".git"])
@pytest.mark.parametrize("service", ["upload-pack", "receive-pack"])
def test_advertisement(suffix: str, service: str) -> None:
    got = get(f"/org/repo{suffix}/info/refs", f"service=git-{service}")
    assert got == GitRoute("/org/repo", service, "advertise")
    assert got.request_content_type is None
    assert got.response_content_type == f"application/x-git-{service}-advertisement"


@pytest.mark.parametrize("suffix", ["", ".git"])
@pytest.mark.parametrize("service", ["upload-pack", "receive-pack"])
def test_rpc(suffix: str, service: str) -> None:
    got = post(f"/org/repo{suffix}/git-{service}", f"application/x-git-{service}-request")
    assert got == GitRoute("/org/repo", service, "rpc")
    assert got.request_content_type == f"application/x-git-{service}-request"
    assert got.response_content_type == f"application/x-git-{service}-result"


@pytest.mark.parametrize(
    ("path", "repo_path"),
    [
        ("/group/sub/repo.git/info/refs", "/group/sub/repo"),
        ("/repo/info/refs", "/repo"),
        ("/org/repo.git.git/info/refs", "/org/repo.git"),
        ("/Org/My_Repo-2.x/info/refs", "/Org/My_Repo-2.x"),
        ("/org/a..b/info/refs", "/org/a..b"),
        ("/org/info/info/refs", "/org/info"),
        ("/org/objects/info/refs", "/org/objects"),
    ],
)
def test_repository_paths(path: str, repo_path: str) -> None:
    got = get(path, "service=git-upload-pack")
    assert isinstance(got, GitRoute) and got.repo_path == repo_path


@pytest.mark.parametrize("protocol", [None, "version=1", "version=2"])
def test_git_protocol_versions(protocol: str | None) -> None:
    assert isinstance(get("/o/r/info/refs", "service=git-upload-pack", protocol), GitRoute)
    assert isinstance(route("POST", "/o/r/git-upload-pack", "", UPLOAD_REQ, protocol), GitRoute)


def test_content_type_is_compared_without_case_and_outer_space() -> None:
    assert isinstance(
        post("/o/r/git-upload-pack", " Application/X-Git-Upload-Pack-Request "), GitRoute
    )


# --- route: what is refused ----------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/org/repo.git/info/lfs/objects/batch"),
        ("GET", "/org/repo/info/lfs/objects/batch"),
        ("POST", "/org/repo.git/info/lfs/locks/verify"),
        ("GET", "/org/repo.git/info/lfs"),
        ("PUT", "/org/repo.git/info/lfs/objects/" + "a" * 64),
    ],
)
def test_lfs_is_501(method: str, path: str) -> None:
    got = refused(route(method, path, "", "application/vnd.git-lfs+json", None), 501, "LFS")
    assert "GIT_LFS_SKIP_SMUDGE" in got.reason and got.rule == "git.lfs"


@pytest.mark.parametrize(
    ("path", "query"),
    [
        ("/org/repo.git/info/refs", ""),
        ("/org/repo.git/HEAD", ""),
        ("/org/repo/HEAD", ""),
        ("/org/repo.git/objects/info/packs", ""),
        ("/org/repo.git/objects/info/alternates", ""),
        ("/org/repo.git/objects/info/http-alternates", ""),
        ("/org/repo.git/objects/ab/" + "c" * 38, ""),
        ("/org/repo.git/objects/pack/pack-" + "d" * 40 + ".pack", ""),
        ("/org/repo.git/objects/pack/pack-" + "d" * 40 + ".idx", ""),
        ("/org/repo.git/info/packs", ""),
    ],
)
def test_dumb_http_is_501(path: str, query: str) -> None:
    got = refused(get(path, query), 501, "dumb HTTP")
    assert "smart" in got.reason and got.rule == "git.dumb-http"


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/org/repo",
        "/org/repo.git",
        "/org/repo.git/",
        "/favicon.ico",
        "/org/repo.git/git-upload-archive",
        "/org/repo.git/info/refs/extra",
        "/org/repo.git/info",
        "/info/refs",
        "/git-upload-pack",
        "/HEAD",
        "/org/repo.git/objects",
    ],
)
def test_other_paths_are_404(path: str) -> None:
    got = refused(get(path, "service=git-upload-pack"), 404, "smart-HTTP endpoint")
    assert got.rule == "git.not-found"


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("POST", "/o/r/info/refs", "GET"),
        ("HEAD", "/o/r/info/refs", "GET"),
        ("PUT", "/o/r/info/refs", "GET"),
        ("get", "/o/r/info/refs", "GET"),
        ("GET", "/o/r/git-upload-pack", "POST"),
        ("PUT", "/o/r/git-receive-pack", "POST"),
        ("DELETE", "/o/r.git/git-receive-pack", "POST"),
    ],
)
def test_wrong_method_is_405(method: str, path: str, allowed: str) -> None:
    got = refused(route(method, path, "service=git-upload-pack", UPLOAD_REQ, None), 405)
    assert got.headers == (("Allow", allowed),)
    assert f"takes {allowed}" in got.reason


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/o/r/git-upload-pack", None),
        ("/o/r/git-upload-pack", ""),
        ("/o/r/git-upload-pack", "text/plain"),
        ("/o/r/git-upload-pack", RECEIVE_REQ),
        ("/o/r/git-receive-pack", UPLOAD_REQ),
        ("/o/r/git-upload-pack", UPLOAD_REQ + "; charset=utf-8"),
        ("/o/r/git-receive-pack", "application/x-git-receive-pack-result"),
    ],
)
def test_wrong_content_type_is_415(path: str, content_type: str | None) -> None:
    service = path.rsplit("git-", 1)[1]
    got = refused(post(path, content_type), 415, f"application/x-git-{service}-request")
    assert got.rule == "git.content-type"


@pytest.mark.parametrize(
    "query",
    [
        "service=git-upload-archive",
        "service=upload-pack",
        "service=git-upload-pack&x=1",
        "x=1&service=git-upload-pack",
        "service=git-upload-pack&service=git-receive-pack",
        "service=git-upload-pack%00",
        "service=GIT-UPLOAD-PACK",
        "service=",
        "x",
    ],
)
def test_info_refs_takes_exactly_one_service(query: str) -> None:
    refused(get("/o/r/info/refs", query), 400, "exactly one query parameter")


def test_rpc_takes_no_query() -> None:
    refused(post("/o/r/git-upload-pack", UPLOAD_REQ, "service=git-upload-pack"), 400, "no query")


@pytest.mark.parametrize(
    "protocol", ["", "version=0", "version=3", "version=2 ", "Version=2", "version=2:x=y", "2"]
)
def test_other_git_protocol_values_are_400(protocol: str) -> None:
    got = refused(get("/o/r/info/refs", "service=git-upload-pack", protocol), 400, "Git-Protocol")
    assert got.rule == "git.protocol"


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("/org/../repo.git/info/refs", "'..' segment"),
        ("/../org/repo/info/refs", "'..' segment"),
        ("/org/repo/../../x/info/refs", "'..' segment"),
        ("/org/./repo/info/refs", "'.' or '..'"),
        ("/org/../info/refs", "'..' segment"),
        ("//org/repo/info/refs", "'//'"),
        ("/org//repo/info/refs", "'//'"),
        ("/org/repo.git//info/refs", "'//'"),
        ("/org%2Frepo/info/refs", "percent-encoding"),
        ("/org%2frepo/info/refs", "percent-encoding"),
        ("/org/%2E%2E/info/refs", "percent-encoding"),
        ("/org/%2e%2e/info/refs", "percent-encoding"),
        ("/org/re%70o/info/refs", "percent-encoding"),
        ("/org/repo%/info/refs", "percent-encoding"),
        ("/org\\repo/info/refs", "backslash"),
        ("/org/repo\\..\\x/info/refs", "backslash"),
        ("/org/re\x00po/info/refs", "control"),
        ("/org/re\x1fpo/info/refs", "control"),
        ("/org/re\x7fpo/info/refs", "control"),
        ("/org/re po/info/refs", "control characters, spaces"),
        ("/org/re\tpo/info/refs", "control"),
        ("/org/r\u00e9po/info/refs", "non-ASCII"),
        ("/org/repo@main/info/refs", "characters other than"),
        ("/org/repo~1/info/refs", "characters other than"),
        ("/org/repo:x/info/refs", "characters other than"),
        ("/org/repo;x/info/refs", "characters other than"),
        ("org/repo/info/refs", "start with '/'"),
        ("", "start with '/'"),
        ("/" + "a" * MAX_PATH + "/info/refs", f"longer than {MAX_PATH}"),
        ("/.git/info/refs", "names no repository"),
        ("/org/.git/git-upload-pack", "names no repository"),
    ],
)
def test_path_hygiene_is_400(path: str, why: str) -> None:
    got = refused(route("GET", path, "service=git-upload-pack", None, None), 400, why)
    assert got.rule == "git.path"


def test_path_length_limit_is_inclusive() -> None:
    suffix = "/info/refs"
    path = "/" + "a" * (MAX_PATH - 1 - len(suffix)) + suffix
    assert len(path) == MAX_PATH
    assert isinstance(get(path, "service=git-upload-pack"), GitRoute)


def test_hygiene_comes_before_lfs_and_dumb_http() -> None:
    refused(get("/org/%2e%2e/info/lfs/objects/batch"), 400)
    refused(get("/org/../HEAD"), 400)


def test_refusals_never_echo_the_method_at_length() -> None:
    got = refused(route("X" * 500, "/o/r/info/refs", "service=git-upload-pack", None, None), 405)
    assert len(got.reason) < 100


# --- find_repo -----------------------------------------------------------------------


def test_find_repo() -> None:
    assert find_repo(REPOS, "git.example", "/org/app") is APP
    assert find_repo(REPOS, "git.example", "/org/lib") is LIB  # its url had ".git/"
    assert find_repo(REPOS, "git.example", "/group/sub/deep") is DEEP
    assert find_repo(REPOS, "other.example", "/org/app") is OTHER_APP
    assert find_repo(REPOS, "git.example", "/org/nope") is None
    assert find_repo(REPOS, "nowhere.example", "/org/app") is None
    assert find_repo(REPOS, "git.example", "/org") is None
    assert find_repo(REPOS, "git.example", "/org/app/more") is None


def test_find_repo_normalises_the_host() -> None:
    assert find_repo(REPOS, "GIT.Example.", "/org/app") is APP
    assert find_repo(REPOS, "not a host", "/org/app") is None
    assert find_repo(REPOS, "10.0.0.1", "/org/app") is None


def test_find_repo_ignores_case_in_the_path() -> None:
    assert find_repo(REPOS, "git.example", "/ORG/App") is APP


def test_find_repo_exact_case_wins_and_ambiguity_is_not_listed() -> None:
    upper = RepoRule("https://git.example/Org/App", "git.example", "/Org/App", "read")
    repos = (APP, upper)
    assert find_repo(repos, "git.example", "/org/app") is APP
    assert find_repo(repos, "git.example", "/Org/App") is upper
    assert find_repo(repos, "git.example", "/ORG/APP") is None


def test_upstream_target_uses_the_policy_spelling() -> None:
    requested = get("/ORG/APP/info/refs", "service=git-receive-pack")
    assert isinstance(requested, GitRoute)
    repo = find_repo(REPOS, "git.example", requested.repo_path)
    assert repo is APP
    assert upstream_target(requested, repo) == "/org/app.git/info/refs?service=git-receive-pack"
    rpc = post("/ORG/APP.git/git-upload-pack", UPLOAD_REQ)
    assert isinstance(rpc, GitRoute)
    assert upstream_target(rpc, repo) == "/org/app.git/git-upload-pack"


# --- check_access --------------------------------------------------------------------


def test_a_repository_not_listed_is_403_with_what_to_add() -> None:
    url = repo_url("git.example", "/org/nope")
    assert url == "https://git.example/org/nope"
    got = check_access(None, "upload-pack", url=url)
    assert got is not None and got.status == 403 and got.rule == "git.repos"
    assert "not in this sandbox's list" in got.reason
    assert '[[git.repos]] url = "https://git.example/org/nope"' in got.reason
    anonymous = check_access(None, "receive-pack")
    assert anonymous is not None and anonymous.status == 403


def test_read_only_repositories_take_no_push() -> None:
    assert check_access(LIB, "upload-pack") is None
    got = check_access(LIB, "receive-pack")
    assert got is not None and got.status == 403 and got.rule == "git.repos.access"
    assert "https://git.example/org/lib is read-only" in got.reason
    assert 'access = "write"' in got.reason


def test_write_repositories_take_both() -> None:
    assert check_access(APP, "upload-pack") is None
    assert check_access(APP, "receive-pack") is None


def test_check_access_knows_its_services() -> None:
    with pytest.raises(ValueError):
        check_access(APP, "upload-archive")


# --- check_push ----------------------------------------------------------------------

OLD = "1" * 40
NEW = "2" * 40
ZERO = "0" * 40


def push(*updates: RefUpdate) -> PushRequest:
    return PushRequest(tuple(updates), ("report-status",), (), (), pack_offset=0)


def update(ref: str) -> RefUpdate:
    return RefUpdate(OLD, NEW, ref)


def create(ref: str) -> RefUpdate:
    return RefUpdate(ZERO, NEW, ref)


def delete(ref: str) -> RefUpdate:
    return RefUpdate(OLD, ZERO, ref)


@pytest.mark.parametrize(
    ("pattern", "ref", "matches"),
    [
        ("refs/heads/sandbox/*", "refs/heads/sandbox/x", True),
        ("refs/heads/sandbox/*", "refs/heads/sandbox/fix-1.2", True),
        ("refs/heads/sandbox/*", "refs/heads/sandbox/a/b", False),
        ("refs/heads/sandbox/*", "refs/heads/sandbox", False),
        ("refs/heads/sandbox/*", "refs/heads/sandboxx/y", False),
        ("refs/heads/sandbox/*", "refs/heads/other/x", False),
        ("refs/heads/feat-*", "refs/heads/feat-1", True),
        ("refs/heads/feat-*", "refs/heads/feat-", True),
        ("refs/heads/feat-*", "refs/heads/feat-a/b", False),
        ("refs/heads/feat-*", "refs/heads/feat", False),
        ("refs/heads/*-wip", "refs/heads/x-wip", True),
        ("refs/heads/*-wip", "refs/heads/-wip", True),
        ("refs/heads/*-wip", "refs/heads/x-wip2", False),
        ("refs/heads/*-wip", "refs/heads/a/x-wip", False),
        ("refs/heads/a*a", "refs/heads/a", False),
        ("refs/heads/a*a", "refs/heads/aa", True),
        ("refs/heads/exact", "refs/heads/exact", True),
        ("refs/heads/exact", "refs/heads/exact2", False),
        ("refs/heads/exact", "refs/heads/Exact", False),
    ],
)
def test_ref_matches(pattern: str, ref: str, matches: bool) -> None:
    assert ref_matches(pattern, ref) is matches


def test_allowed_refs() -> None:
    verdicts = check_push(
        APP,
        push(
            create("refs/heads/sandbox/one"),
            update("refs/heads/feat-x"),
            update("refs/heads/exact"),
        ),
    )
    assert verdicts == [
        ("refs/heads/sandbox/one", None),
        ("refs/heads/feat-x", None),
        ("refs/heads/exact", None),
    ]
    assert push_allowed(verdicts)


def test_refs_outside_the_patterns() -> None:
    verdicts = check_push(
        APP, push(update("refs/heads/main"), update("refs/heads/sandbox/a/b"), update("refs/x"))
    )
    for ref, reason in verdicts:
        assert reason is not None, ref
        assert "not a ref this sandbox may push" in reason
        assert "refs/heads/sandbox/*, refs/heads/feat-*, refs/heads/exact" in reason
    assert not push_allowed(verdicts)


def test_deletes_need_allow_delete() -> None:
    ((_, reason),) = check_push(APP, push(delete("refs/heads/sandbox/x")))
    assert reason is not None and "allow_delete = false" in reason
    assert check_push(OTHER_APP, push(delete("refs/heads/main"))) == [("refs/heads/main", None)]


def test_tags_need_allow_tags() -> None:
    ((_, reason),) = check_push(APP, push(create("refs/tags/v1")))
    assert reason is not None and "allow_tags = false" in reason
    assert check_push(OTHER_APP, push(create("refs/tags/v1"))) == [("refs/tags/v1", None)]
    ((_, reason),) = check_push(OTHER_APP, push(create("refs/tags/release")))
    assert reason is not None and "not a ref this sandbox may push" in reason


def test_tag_rule_holds_even_if_a_pattern_would_match() -> None:
    # parse_policy refuses a refs/tags/ pattern without allow_tags; a rule built by
    # hand still cannot push tags.
    repo = RepoRule("https://h.example/o/r", "h.example", "/o/r", "write", ("refs/*",), max_refs=5)
    ((_, reason),) = check_push(repo, push(create("refs/tags/v1")))
    assert reason is not None and "allow_tags" in reason


def test_more_refs_than_max_refs_refuses_them_all() -> None:
    refs = [f"refs/heads/sandbox/{i}" for i in range(4)]
    verdicts = check_push(APP, push(*(create(r) for r in refs)))
    assert [ref for ref, _ in verdicts] == refs
    assert {reason for _, reason in verdicts} == {
        "this push updates 4 refs; the policy allows at most 3 per push (max_refs)"
    }
    assert push_allowed(check_push(APP, push(*(create(r) for r in refs[:3]))))


def test_a_read_only_repository_refuses_every_ref() -> None:
    verdicts = check_push(LIB, push(create("refs/heads/sandbox/x")))
    assert verdicts == [
        ("refs/heads/sandbox/x", 'the repository is read-only for this sandbox (access = "read")')
    ]


def test_the_probe_has_nothing_to_refuse() -> None:
    verdicts = check_push(APP, push())
    assert verdicts == [] and push_allowed(verdicts)


def test_results_when_refused() -> None:
    verdicts = check_push(APP, push(create("refs/heads/sandbox/ok"), update("refs/heads/main")))
    assert not push_allowed(verdicts)
    results = results_when_refused(verdicts)
    assert results[0] == (
        "refs/heads/sandbox/ok",
        "not pushed: another ref in this push was refused",
    )
    assert results[1] == verdicts[1]
    assert all(reason for _, reason in results)


# --- a small gateway in front of a real git http-backend, driven by real git ---------

HOST = "git.example"
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


class MiniGateway(http.server.BaseHTTPRequestHandler):
    """What the git gateway does with these modules, minus credentials and audit:
    `http://127.0.0.1:port/<host>/<repo>/...` is routed, checked and, when allowed,
    handed to `git http-backend` serving `upstream/<host>/<repo>.git`."""

    protocol_version = "HTTP/1.1"
    upstream: Path
    strip_sideband = False
    seen_pushes: list[PushRequest]

    def do_GET(self) -> None:
        self.handle_git()

    def do_POST(self) -> None:
        self.handle_git()

    def log_message(self, *args: object) -> None:
        pass

    def refuse(self, status: int, reason: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        self.close_connection = True
        self.wfile.write(response(status, reason, "req-test", extra_headers=headers))

    def answer(self, status: int, content_type: str, payload: bytes) -> None:
        self.close_connection = True
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(payload)

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while size := int(self.rfile.readline().strip(), 16):
                data += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return data
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def handle_git(self) -> None:
        path, _, query = self.path.partition("?")
        host, _, rest = path[1:].partition("/")
        got = route(
            self.command,
            "/" + rest,
            query,
            self.headers.get("Content-Type"),
            self.headers.get("Git-Protocol"),
        )
        if isinstance(got, GitRefusal):
            self.refuse(got.status, got.reason, got.headers)
            return
        repo = find_repo(REPOS, host, got.repo_path)
        denied = check_access(repo, got.service, url=repo_url(host, got.repo_path))
        if denied is not None:
            self.refuse(denied.status, denied.reason)
            return
        assert repo is not None
        body = self.read_body() if got.kind == "rpc" else b""
        if got.service == "receive-pack" and got.kind == "rpc":
            parser = PushRequestParser()
            event = NEED_DATA
            for i in range(0, len(body), 7):  # as if it arrived in small pieces
                parser.feed(body[i : i + 7])
                if (event := parser.next_event()) is not NEED_DATA:
                    break
            if event is NEED_DATA:
                parser.feed(b"")
                event = parser.next_event()
            assert isinstance(event, PushRequest)
            self.seen_pushes.append(event)
            verdicts = check_push(repo, event)
            if not push_allowed(verdicts):
                report = report_status(
                    True,
                    results_when_refused(verdicts),
                    event.sideband,
                    message="sandgate refused this push (request id req-test)",
                )
                self.answer(200, got.response_content_type, report)
                return
        self.backend(got, repo, body)

    def backend(self, got: GitRoute, repo: RepoRule, body: bytes) -> None:
        target_path, _, target_query = upstream_target(got, repo).partition("?")
        env = {
            "PATH": os.environ["PATH"],
            "GIT_PROJECT_ROOT": str(self.upstream),
            "GIT_HTTP_EXPORT_ALL": "1",
            "GIT_CONFIG_NOSYSTEM": "1",
            "HOME": str(self.upstream),
            "REQUEST_METHOD": self.command,
            "PATH_INFO": f"/{repo.host}{target_path}",
            "QUERY_STRING": target_query,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_USER": "sandbox",
            "REMOTE_ADDR": "127.0.0.1",
        }
        if self.headers.get("Git-Protocol"):
            env["GIT_PROTOCOL"] = self.headers["Git-Protocol"]
        if self.headers.get("Content-Encoding"):
            env["HTTP_CONTENT_ENCODING"] = self.headers["Content-Encoding"]
        out = subprocess.run(
            ["git", "http-backend"], input=body, env=env, capture_output=True, check=True
        ).stdout
        head, _, payload = out.partition(b"\r\n\r\n")
        fields = dict(line.decode().split(":", 1) for line in head.split(b"\r\n") if b":" in line)
        status = int(fields.get("Status", "200").split()[0])
        content_type = fields.get("Content-type", fields.get("Content-Type", "")).strip()
        if self.strip_sideband and got.kind == "advertise":
            payload = without_sideband(payload)
        self.answer(status, content_type, payload)


def without_sideband(advertisement: bytes) -> bytes:
    """The advertisement with side-band-64k taken out of the capability list, so that
    git asks for a plain report-status."""
    out, pos = b"", 0
    while pos < len(advertisement):
        packet, pos = read_pkt(advertisement, pos)
        if isinstance(packet, bytes) and b"\0" in packet:
            packet = encode_pkt(packet.replace(b" side-band-64k", b""))
        else:
            packet = encode_pkt(packet) if isinstance(packet, bytes) else flush()
        out += packet
    return out


class GitWorld:
    def __init__(self, root: Path, port: int, handler: type[MiniGateway]) -> None:
        self.root = root
        self.base = f"http://127.0.0.1:{port}/{HOST}"
        self.handler = handler
        self.env = {
            "PATH": os.environ["PATH"],
            "HOME": str(root / "home"),
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_AUTHOR_NAME": "Sandbox",
            "GIT_AUTHOR_EMAIL": "sandbox@example.invalid",
            "GIT_COMMITTER_NAME": "Sandbox",
            "GIT_COMMITTER_EMAIL": "sandbox@example.invalid",
            "GIT_AUTHOR_DATE": "1700000000 +0000",
            "GIT_COMMITTER_DATE": "1700000000 +0000",
            "LC_ALL": "C",
        }

    def git(
        self, *args: str, cwd: Path | None = None, ok: bool = True
    ) -> subprocess.CompletedProcess:
        done = subprocess.run(
            ["git", *args], cwd=cwd or self.root, env=self.env, capture_output=True, text=True
        )
        if ok:
            assert done.returncode == 0, done.stderr
        return done

    def upstream_refs(self, repo: str) -> dict[str, str]:
        out = self.git(
            "-C", str(self.root / "upstream" / HOST / f"{repo}.git"), "show-ref", ok=False
        )
        return {ref: oid for oid, ref in (line.split() for line in out.stdout.splitlines())}


@pytest.fixture
def world(tmp_path: Path) -> Iterator[GitWorld]:
    handler = type(
        "Handler", (MiniGateway,), {"upstream": tmp_path / "upstream", "seen_pushes": []}
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        w = GitWorld(tmp_path, server.server_address[1], handler)
        (tmp_path / "home").mkdir()
        seed = tmp_path / "seed"
        w.git("init", "-q", "-b", "main", str(seed))
        (seed / "README").write_text("hello\n")
        w.git("add", "README", cwd=seed)
        w.git("commit", "-qm", "first", cwd=seed)
        for name in ("org/app", "org/lib"):
            bare = tmp_path / "upstream" / HOST / f"{name}.git"
            w.git("init", "-q", "--bare", "-b", "main", str(bare))
            w.git("-C", str(bare), "config", "http.receivepack", "true")
            w.git("push", "-q", str(bare), "main", cwd=seed)
        yield w
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@needs_git
@pytest.mark.parametrize("version", ["0", "1", "2"])
def test_real_clone_through_the_routes(world: GitWorld, version: str) -> None:
    world.git(
        "-c", f"protocol.version={version}", "clone", "-q", f"{world.base}/org/lib.git", "lib"
    )
    assert (world.root / "lib" / "README").read_text() == "hello\n"
    world.git("clone", "-q", f"{world.base}/ORG/App", "app")  # case and ".git" do not matter
    assert (world.root / "app" / "README").exists()


@needs_git
def test_real_clone_of_an_unlisted_repository_shows_why(world: GitWorld) -> None:
    done = world.git("clone", "-q", f"{world.base}/org/secret.git", "s", ok=False)
    assert done.returncode != 0
    assert (
        "remote: https://git.example/org/secret is not in this sandbox's list of repositories; "
        'add it to the policy: [[git.repos]] url = "https://git.example/org/secret"\n'
    ) in done.stderr
    assert "The requested URL returned error: 403" in done.stderr


@needs_git
def test_real_push_to_a_read_only_repository(world: GitWorld) -> None:
    world.git("clone", "-q", f"{world.base}/org/lib", "lib")
    done = world.git(
        "push", "origin", "main:refs/heads/sandbox/x", cwd=world.root / "lib", ok=False
    )
    assert done.returncode != 0
    assert "remote: https://git.example/org/lib is read-only for this sandbox" in done.stderr
    assert "The requested URL returned error: 403" in done.stderr
    assert "refs/heads/sandbox/x" not in world.upstream_refs("org/lib")


def commit(world: GitWorld, work: Path, name: str, content: bytes | str = "x\n") -> None:
    path = work / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    world.git("add", name, cwd=work)
    world.git("commit", "-qm", name, cwd=work)


@needs_git
def test_real_push_of_allowed_refs_reaches_upstream(world: GitWorld) -> None:
    work = world.root / "app"
    world.git("clone", "-q", f"{world.base}/org/app", str(work))
    commit(world, work, "a")
    world.git(
        "push", "-q", "origin", "HEAD:refs/heads/sandbox/one", "HEAD:refs/heads/feat-2", cwd=work
    )
    head = world.git("rev-parse", "HEAD", cwd=work).stdout.strip()
    refs = world.upstream_refs("org/app")
    assert refs["refs/heads/sandbox/one"] == refs["refs/heads/feat-2"] == head
    (pushed,) = world.handler.seen_pushes
    assert [u.ref for u in pushed.updates] == ["refs/heads/sandbox/one", "refs/heads/feat-2"]
    assert pushed.sideband and pushed.has_pack


@needs_git
@pytest.mark.parametrize("sideband", [True, False])
def test_real_push_with_a_refused_ref_is_reported_per_ref(world: GitWorld, sideband: bool) -> None:
    world.handler.strip_sideband = not sideband
    work = world.root / "app"
    world.git("clone", "-q", f"{world.base}/org/app", str(work))
    before = world.upstream_refs("org/app")
    commit(world, work, "b")
    done = world.git(
        "push", "origin", "HEAD:refs/heads/main", "HEAD:refs/heads/sandbox/two", cwd=work, ok=False
    )
    assert done.returncode == 1, done.stderr
    assert (
        "! [remote rejected] HEAD -> main (not a ref this sandbox may push (allowed: "
        "refs/heads/sandbox/*, refs/heads/feat-*, refs/heads/exact))"
    ) in done.stderr
    assert (
        "! [remote rejected] HEAD -> sandbox/two (not pushed: another ref in this push was refused)"
    ) in done.stderr
    shown = "remote: sandgate refused this push (request id req-test)" in done.stderr
    assert shown is sideband
    assert world.upstream_refs("org/app") == before
    (pushed,) = world.handler.seen_pushes
    assert pushed.sideband is sideband


@needs_git
def test_real_delete_is_refused_without_allow_delete(world: GitWorld) -> None:
    work = world.root / "app"
    world.git("clone", "-q", f"{world.base}/org/app", str(work))
    world.git("push", "-q", "origin", "HEAD:refs/heads/sandbox/gone", cwd=work)
    done = world.git("push", "origin", ":refs/heads/sandbox/gone", cwd=work, ok=False)
    assert "[remote rejected] sandbox/gone (deleting refs is not allowed" in done.stderr
    assert "refs/heads/sandbox/gone" in world.upstream_refs("org/app")
    deleted = world.handler.seen_pushes[-1]
    assert deleted.updates[0].is_delete and not deleted.has_pack


@needs_git
def test_real_large_push_sends_a_probe_first(world: GitWorld) -> None:
    work = world.root / "app"
    world.git("clone", "-q", f"{world.base}/org/app", str(work))
    commit(world, work, "big.bin", os.urandom(1536 * 1024))  # over http.postBuffer (1 MiB)
    world.git("push", "-q", "origin", "HEAD:refs/heads/sandbox/big", cwd=work)
    probe, pushed = world.handler.seen_pushes
    assert probe == PushRequest((), (), (), (), pack_offset=4)
    assert [u.ref for u in pushed.updates] == ["refs/heads/sandbox/big"]
    assert "refs/heads/sandbox/big" in world.upstream_refs("org/app")


@needs_git
def test_real_dumb_http_client_gets_the_501(world: GitWorld) -> None:
    world.env["GIT_SMART_HTTP"] = "0"  # git then asks for info/refs with no service
    done = world.git("ls-remote", f"{world.base}/org/app", ok=False)
    assert done.returncode != 0
    assert "remote: the dumb HTTP git protocol is not served" in done.stderr
    assert "The requested URL returned error: 501" in done.stderr
