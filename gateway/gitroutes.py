"""Which git smart-HTTP requests the gateway serves, and the per-repository rules,
as pure functions (no I/O).

This module owns the decisions of the git gateway before and after the push head is
parsed: `route` says whether a request is one of the three smart-HTTP endpoints (or
why not, as an HTTP status and a reason), `find_repo` finds the policy's entry for
a repository, `check_access` holds it to read or write access, and `check_push` holds
each ref of a parsed push (gateway/pktline.py) to the repository's push rules.

The choices made where git leaves one:

- The served endpoints are exactly `GET <repo>/info/refs?service=git-upload-pack` (or
  git-receive-pack; that one query parameter and nothing else), `POST
  <repo>/git-upload-pack` with Content-Type application/x-git-upload-pack-request
  and `POST <repo>/git-receive-pack` with application/x-git-receive-pack-request.
  Git LFS (`<repo>/info/lfs...`) and the dumb HTTP protocol (`<repo>/HEAD`,
  `<repo>/objects/...`, `<repo>/info/packs`, info/refs without a service) are 501,
  with a message saying what to do instead; other paths are 404, a wrong method 405,
  a wrong or missing Content-Type 415 (the request is well-formed HTTP; its media
  type is what is wrong).
- Paths are plain: `/`-separated segments of letters, digits, '.', '_' and '-' (what a
  policy's repository URL may hold), at most 1024 characters. Git never
  percent-encodes such a path, so any '%' is refused (400) rather than decoded:
  decoding is where "%2e%2e" and "%2f" turn into traversal. So are '\\', control and
  non-ASCII bytes, '//', and '.' or '..' segments.
- `/org/repo` and `/org/repo.git` are one repository (`repo_path` "/org/repo"); only
  one ".git" is removed.
- Git-Protocol may be absent, `version=1` or `version=2` (what git sends), else 400.
- Repository paths are compared case-insensitively (hosts are normalised): GitHub,
  GitLab and Gitea treat owner and name that way, so a sandbox that writes
  "Org/Repo" means the repository the policy calls "org/repo". So that this cannot
  reach a different repository on a case-sensitive server, the gateway forwards
  the policy's spelling (`upstream_target`), never the request's. An exact-case
  match wins; two entries that differ only in case and match neither exactly are
  ambiguous, and the repository counts as not listed.
- Ref patterns: an exact ref, or one '*' in the last component, which matches any
  run of characters (possibly none) other than '/': "refs/heads/sandbox/*" matches
  refs/heads/sandbox/fix but not refs/heads/sandbox/a/b (list
  "refs/heads/sandbox/a/*" for those).
- A push is forwarded only when every ref is allowed (`push_allowed`); otherwise the
  allowed refs are reported as not pushed (`results_when_refused`), as an atomic
  push would. A push that names more than max_refs refs is refused as a whole. A
  push with no commands (git's probe before a large push) has nothing to refuse.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.pktline import PushRequest, RefUpdate
from gateway.policy import RepoRule, normalize_host

MAX_PATH = 1024
SERVICES = ("upload-pack", "receive-pack")
GIT_PROTOCOL_VERSIONS = ("version=1", "version=2")

_PATH_CHARS = re.compile(r"[A-Za-z0-9._/-]*")
_PRINTABLE_ASCII = re.compile(r"[\x21-\x7e]*")

LFS_HELP = (
    "Git LFS is not served by the sandgate git gateway. Fetch LFS objects outside the "
    "sandbox (or set GIT_LFS_SKIP_SMUDGE=1 to clone without them); pushing LFS "
    "objects from a sandbox is not possible."
)
DUMB_HELP = (
    "the dumb HTTP git protocol is not served by the sandgate git gateway; only smart "
    "HTTP passes (any git since 1.6.6 speaks it: make sure GIT_SMART_HTTP is not 0)."
)
NOT_FOUND_HELP = (
    "not a git smart-HTTP endpoint; the gateway serves <repo>/info/refs?service=..., "
    "<repo>/git-upload-pack and <repo>/git-receive-pack"
)


@dataclass(frozen=True)
class GitRoute:
    """A request to one of the smart-HTTP endpoints of repository `repo_path`
    ("/org/repo", no ".git"): `service` "upload-pack" (fetch, clone) or
    "receive-pack" (push); `kind` "advertise" (GET info/refs) or "rpc" (the POST)."""

    repo_path: str
    service: str
    kind: str

    @property
    def request_content_type(self) -> str | None:
        """What the client's POST carries (None for the GET)."""
        return f"application/x-git-{self.service}-request" if self.kind == "rpc" else None

    @property
    def response_content_type(self) -> str:
        """What the upstream must answer with for the exchange to be smart HTTP."""
        if self.kind == "advertise":
            return f"application/x-git-{self.service}-advertisement"
        return f"application/x-git-{self.service}-result"


@dataclass(frozen=True)
class GitRefusal:
    """A git request the gateway answers itself: `status` and `reason` for
    gateway.http.response() (text/plain, which git prints as "remote: ..." lines
    for a refused info/refs), `rule` names the check for the audit log, `headers`
    go with the answer (Allow for a 405)."""

    status: int
    reason: str
    rule: str
    headers: tuple[tuple[str, str], ...] = ()


def route(
    method: str, path: str, query: str, content_type: str | None, git_protocol: str | None
) -> GitRoute | GitRefusal:
    """The smart-HTTP endpoint a request is for, or why it is refused.

    `path` is the raw (not percent-decoded) path after whatever prefix the gateway
    uses to name the host, e.g. "/org/repo.git/info/refs"; `query` the raw query
    without '?' ("" when there is none); `content_type` and `git_protocol` the
    Content-Type and Git-Protocol headers (None when absent).
    """
    bad = _path_problem(path)
    if bad is not None:
        return GitRefusal(400, bad, "git.path")
    segments = path[1:].split("/")
    endpoint = _endpoint(segments, query)
    if isinstance(endpoint, GitRefusal):
        return endpoint
    repo_segments, service, kind = endpoint
    repo_path = _repo_path(repo_segments)
    if repo_path is None:
        return GitRefusal(400, "the path names no repository before the git endpoint", "git.path")
    expected_method = "GET" if kind == "advertise" else "POST"
    if method != expected_method:
        what = "info/refs" if kind == "advertise" else f"git-{service}"
        return GitRefusal(
            405,
            f"{what} takes {expected_method}, not {method[:20]}",
            "git.method",
            (("Allow", expected_method),),
        )
    if kind == "advertise":
        if query not in ("service=git-upload-pack", "service=git-receive-pack"):
            return GitRefusal(
                400,
                "info/refs takes exactly one query parameter: service=git-upload-pack or "
                "service=git-receive-pack",
                "git.query",
            )
    else:
        if query:
            return GitRefusal(400, f"git-{service} takes no query string", "git.query")
        expected_type = f"application/x-git-{service}-request"
        if content_type is None or content_type.strip().lower() != expected_type:
            return GitRefusal(
                415, f"git-{service} takes Content-Type: {expected_type}", "git.content-type"
            )
    if git_protocol is not None and git_protocol not in GIT_PROTOCOL_VERSIONS:
        return GitRefusal(
            400, "the Git-Protocol header may only be version=1 or version=2", "git.protocol"
        )
    return GitRoute(repo_path, service, kind)


def _path_problem(path: str) -> str | None:
    if len(path) > MAX_PATH:
        return f"the path is longer than {MAX_PATH} characters"
    if not _PRINTABLE_ASCII.fullmatch(path):
        return "the path holds control characters, spaces or non-ASCII bytes"
    if "%" in path:
        return (
            "percent-encoding in a git path: repository paths are plain letters, digits, "
            "'.', '_' and '-', which git never encodes"
        )
    if "\\" in path:
        return "a backslash in the path"
    if not path.startswith("/"):
        return "the path does not start with '/'"
    if "//" in path:
        return "an empty segment ('//') in the path"
    if any(s in (".", "..") for s in path.split("/")):
        return "a '.' or '..' segment in the path"
    if not _PATH_CHARS.fullmatch(path):
        return "the path holds characters other than letters, digits, '.', '_', '-' and '/'"
    return None


def _endpoint(segments: list[str], query: str) -> tuple[list[str], str, str] | GitRefusal:
    """(repository segments, service, kind) of a well-formed path, or its refusal."""
    for i in range(1, len(segments) - 1):
        if segments[i] == "info" and segments[i + 1] == "lfs":
            return GitRefusal(501, LFS_HELP, "git.lfs")
    if segments[-2:] == ["info", "refs"] and len(segments) > 2:
        if not query:
            return GitRefusal(501, DUMB_HELP, "git.dumb-http")
        service = query.removeprefix("service=git-")
        service = service if service in SERVICES else "upload-pack"
        return segments[:-2], service, "advertise"
    if segments[-1] in ("git-upload-pack", "git-receive-pack") and len(segments) > 1:
        return segments[:-1], segments[-1].removeprefix("git-"), "rpc"
    if len(segments) > 1 and (
        segments[-1] == "HEAD"
        or segments[-2:] == ["info", "packs"]
        or any(s == "objects" for s in segments[1:-1])
    ):
        return GitRefusal(501, DUMB_HELP, "git.dumb-http")
    return GitRefusal(404, NOT_FOUND_HELP, "git.not-found")


def _repo_path(segments: list[str]) -> str | None:
    if not segments:
        return None
    last = segments[-1].removesuffix(".git")
    if last in ("", ".", ".."):
        return None
    return "/" + "/".join([*segments[:-1], last])


# --- the repository and its rules ----------------------------------------------------


def repo_url(host: str, repo_path: str) -> str:
    """The policy's spelling of a repository ("https://github.com/org/repo")."""
    return f"https://{host}{repo_path}"


def find_repo(repos: Sequence[RepoRule], host: str, repo_path: str) -> RepoRule | None:
    """The policy entry for `repo_path` on `host`, or None (see the module docstring
    for how case is compared)."""
    try:
        host = normalize_host(host)
    except ValueError:
        return None
    on_host = [r for r in repos if r.host == host]
    for rule in on_host:
        if rule.path == repo_path:
            return rule
    folded = repo_path.lower()
    matches = [r for r in on_host if r.path.lower() == folded]
    return matches[0] if len(matches) == 1 else None


def upstream_target(route: GitRoute, repo: RepoRule) -> str:
    """The path and query to request upstream: the policy's spelling of the
    repository (with ".git", which every common forge accepts), never the client's."""
    if route.kind == "advertise":
        return f"{repo.path}.git/info/refs?service=git-{route.service}"
    return f"{repo.path}.git/git-{route.service}"


def check_access(
    repo: RepoRule | None, service: str, *, url: str | None = None
) -> GitRefusal | None:
    """None when the sandbox may use `service` on `repo` (None: not in its list), or
    the 403. `url` names the requested repository in the refusal (`repo_url`)."""
    if service not in SERVICES:
        raise ValueError(f"unknown git service {service!r}")
    if repo is None:
        name = url or "this repository"
        return GitRefusal(
            403,
            f"{name} is not in this sandbox's list of repositories; add it to the policy: "
            f'[[git.repos]] url = "{url or "https://host/org/repo"}"',
            "git.repos",
        )
    if service == "receive-pack" and repo.access != "write":
        return GitRefusal(
            403,
            f'{repo.url} is read-only for this sandbox (access = "read"); pushing needs '
            'access = "write" and a [git.repos.push] table naming the refs',
            "git.repos.access",
        )
    return None


def ref_matches(pattern: str, ref: str) -> bool:
    """Whether `ref` is `pattern`, or matches its one '*' (within one component)."""
    prefix, star, suffix = pattern.partition("*")
    if not star:
        return ref == pattern
    if len(ref) < len(prefix) + len(suffix):
        return False
    if not (ref.startswith(prefix) and ref.endswith(suffix)):
        return False
    return "/" not in ref[len(prefix) : len(ref) - len(suffix)]


def check_push(repo: RepoRule, push: PushRequest) -> list[tuple[str, str | None]]:
    """A verdict per ref of `push`, in its order: (ref, None) when allowed, (ref,
    reason) when refused. The reasons are one line each, for report-status."""
    updates = push.updates
    if repo.access != "write":
        reason = 'the repository is read-only for this sandbox (access = "read")'
        return [(u.ref, reason) for u in updates]
    if len(updates) > repo.max_refs:
        reason = (
            f"this push updates {len(updates)} refs; the policy allows at most "
            f"{repo.max_refs} per push (max_refs)"
        )
        return [(u.ref, reason) for u in updates]
    return [(u.ref, _ref_refusal(repo, u)) for u in updates]


def _ref_refusal(repo: RepoRule, update: RefUpdate) -> str | None:
    if update.ref.startswith("refs/tags/") and not repo.allow_tags:
        return "pushing tags is not allowed for this repository (allow_tags = false)"
    if update.is_delete and not repo.allow_delete:
        return "deleting refs is not allowed for this repository (allow_delete = false)"
    if not any(ref_matches(pattern, update.ref) for pattern in repo.refs):
        return "not a ref this sandbox may push (allowed: " + ", ".join(repo.refs) + ")"
    return None


def push_allowed(verdicts: Sequence[tuple[str, str | None]]) -> bool:
    """The push may be forwarded: every ref is allowed."""
    return all(reason is None for _, reason in verdicts)


def results_when_refused(
    verdicts: Sequence[tuple[str, str | None]],
) -> list[tuple[str, str]]:
    """The report for a push that is not forwarded: the refused refs with their
    reasons, the allowed ones as not pushed because of the others."""
    return [
        (ref, reason or "not pushed: another ref in this push was refused")
        for ref, reason in verdicts
    ]
