"""Upstream git credentials: read from a root-only directory, injected by the gateway,
never seen by a sandbox.

This module owns which credential the git gateway sends to a git host, and every
secret it ever holds. The directory (`GatewayConfig.credentials_dir`, CLI
`sandgate run --credentials DIR`, default /etc/sandgate/credentials) holds at most one
of these per git host (the host as the policy spells it: lower case, IDNA):

- `<host>.token`: the file's content (surrounding whitespace removed) is a token,
  sent as HTTP Basic `x-access-token:<token>` (the user name GitHub documents for
  installation and fine-grained tokens; GitLab and Gitea accept any user name with a
  personal access token).
- `<host>.github-app.toml`: a GitHub App installation:

      app_id = 123456                    # or the app's client id, "Iv1...": the JWT's iss
      installation_id = 7890123
      private_key = "/etc/sandgate/credentials/app.pem"   # absolute path, root-only
      api_url = "https://api.github.com"                  # the default; GHES: https://HOST/api/v3

  For each sandbox the gateway mints an RS256 JWT (iat now-60s, exp now+540s, iss
  app_id), asks `POST {api_url}/app/installations/{installation_id}/access_tokens`
  for an installation token narrowed to the repository names the sandbox's policy
  lists on that host (the last path segment: the installation's account owns them)
  with `contents: read`, or `write` when any of them is write; caches it for that
  sandbox until 5 minutes before its `expires_at`; and revokes it (`DELETE
  {api_url}/installation/token`) when the sandbox is removed, best effort.

No file for a host: requests go upstream without credentials (public repositories).
Files are opened without following symlinks and must be regular files owned by the
gateway's user (root) with no permission bits for group or others; the directory
must not be writable by group or others. Anything else is a `CredentialError` naming
the file and the fix (`chmod 600 FILE`); the credential is then not used at all.

Secrets never leave this module except as the Authorization header value the gateway
sends upstream: `CredentialStore.secrets()` lists every one it holds (tokens, their
Basic encodings, JWTs, installation tokens) so that callers pass every text they log
or show through `redact` (gateway.audit.redact: by value, whatever a token's length
or prefix). Error messages built here never quote a secret, and API error bodies are
redacted before they are quoted.

The only I/O here is reading files; HTTP calls go through a `Fetch` the gateway
supplies (its resolver, address checks and TLS trust), and time through a `clock`,
so the logic is testable without a network.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import json
import logging
import os
import re
import stat
import time
import tomllib
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from gateway.audit import redact as _redact
from gateway.policy import RepoRule

log = logging.getLogger("sandgate.credentials")

DEFAULT_CREDENTIALS_DIR = "/etc/sandgate/credentials"
DEFAULT_API_URL = "https://api.github.com"
TOKEN_USERNAME = "x-access-token"
JWT_BACKDATE = 60  # GitHub's advice: allow for clock drift
JWT_LIFETIME = 540  # under GitHub's 10-minute maximum
REFRESH_MARGIN = 300  # an installation token is replaced 5 minutes before it expires
MAX_TOKEN_FILE = 16 * 1024
MAX_API_RESPONSE = 1024 * 1024

_TOKEN = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces: safe in a header
_HOST_FILE_NAME = re.compile(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?")
_APP_KEYS = frozenset({"app_id", "installation_id", "private_key", "api_url"})


class CredentialError(Exception):
    """A credential cannot be used; the message names the file or host and the fix,
    and never holds a secret."""


@dataclass(frozen=True)
class FetchResponse:
    status: int
    body: bytes


Fetch = Callable[[str, str, Sequence[tuple[str, str]], bytes | None], Awaitable[FetchResponse]]
"""fetch(method, url, headers, body) -> FetchResponse: one HTTPS request, made by the
gateway through its resolver, address checks and TLS trust. Raises on failure."""


@dataclass(frozen=True)
class TokenCredential:
    host: str
    path: str
    token: str


@dataclass(frozen=True)
class GitHubApp:
    host: str
    path: str
    app_id: int | str
    installation_id: int
    private_key_path: str
    api_url: str


Credential = TokenCredential | GitHubApp


def basic_authorization(token: str, username: str = TOKEN_USERNAME) -> str:
    """The Authorization header value for `token` (HTTP Basic)."""
    raw = f"{username}:{token}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def make_jwt(app_id: int | str, private_key_pem: bytes, now: float) -> str:
    """An RS256 JWT for a GitHub App: iat now-60s, exp now+540s, iss app_id."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    try:
        key = serialization.load_pem_private_key(private_key_pem, password=None)
    except (ValueError, TypeError):
        raise CredentialError(
            "the GitHub App private key is not an unencrypted PEM private key"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise CredentialError("the GitHub App private key is not an RSA key (RS256 needs one)")
    header = {"alg": "RS256", "typ": "JWT"}
    claims = {"iat": int(now) - JWT_BACKDATE, "exp": int(now) + JWT_LIFETIME, "iss": app_id}
    signing_input = (
        _b64url(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + _b64url(json.dumps(claims, separators=(",", ":")).encode())
    )
    signature = key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
    return signing_input + "." + _b64url(signature)


# --- files -------------------------------------------------------------------------


def read_private_file(path: str, *, max_size: int = MAX_TOKEN_FILE) -> bytes:
    """The content of a root-only file, or CredentialError: not followed through a
    symlink, a regular file, owned by this process's user, no group/other bits."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise CredentialError(f"{path} does not exist") from None
    except OSError as e:
        if e.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink
            raise CredentialError(
                f"{path} is a symbolic link; credentials are plain files"
            ) from None
        raise CredentialError(f"cannot open {path}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        _check_private(path, st, "file")
        if st.st_size > max_size:
            raise CredentialError(f"{path} is larger than {max_size} bytes")
        chunks = []
        while data := os.read(fd, max_size + 1):
            chunks.append(data)
            if sum(map(len, chunks)) > max_size:
                raise CredentialError(f"{path} is larger than {max_size} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _check_private(path: str, st: os.stat_result, what: str) -> None:
    if what == "file" and not stat.S_ISREG(st.st_mode):
        raise CredentialError(f"{path} is not a regular file")
    if st.st_uid != os.geteuid():
        raise CredentialError(
            f"{path} is owned by uid {st.st_uid}, not by the gateway's user "
            f"(uid {os.geteuid()}); run: chown root: {path}"
        )
    if what == "file" and st.st_mode & 0o077:
        raise CredentialError(
            f"{path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"credentials must be root-only: run: chmod 600 {path}"
        )
    if what == "directory" and st.st_mode & 0o022:
        raise CredentialError(
            f"the credentials directory {path} is writable by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 700 {path}"
        )


def load_credential(directory: str | None, host: str) -> Credential | None:
    """The credential configured for `host` (a normalised host name), None when the
    directory or the host's files do not exist, or CredentialError."""
    if directory is None:
        return None
    if not _HOST_FILE_NAME.fullmatch(host) or ".." in host:
        raise CredentialError(f"{host!r} is not a host name a credentials file can be named by")
    try:
        dir_st = os.stat(directory)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CredentialError(f"cannot read {directory}: {e.strerror or e}") from None
    if not stat.S_ISDIR(dir_st.st_mode):
        raise CredentialError(f"the credentials directory {directory} is not a directory")
    token_path = os.path.join(directory, f"{host}.token")
    app_path = os.path.join(directory, f"{host}.github-app.toml")
    present = [p for p in (token_path, app_path) if os.path.lexists(p)]
    if not present:
        return None
    _check_private(directory, dir_st, "directory")
    if len(present) == 2:
        raise CredentialError(
            f"both {token_path} and {app_path} exist; keep one credential per host"
        )
    if present[0] == token_path:
        return TokenCredential(host, token_path, _parse_token(token_path))
    return _parse_app(host, app_path)


def _parse_token(path: str) -> str:
    raw = read_private_file(path)
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise CredentialError(f"{path} is not ASCII text (a token)") from None
    if not token:
        raise CredentialError(f"{path} is empty; it should hold the token")
    if not _TOKEN.fullmatch(token):
        raise CredentialError(
            f"{path} should hold one token: printable characters, no spaces or line breaks"
        )
    return token


def _parse_app(host: str, path: str) -> GitHubApp:
    raw = read_private_file(path)
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise CredentialError(f"{path}: not valid TOML: {e}") from None
    unknown = sorted(set(data) - _APP_KEYS)
    if unknown:
        raise CredentialError(
            f"{path}: unknown key(s) {', '.join(unknown)}; expected {', '.join(sorted(_APP_KEYS))}"
        )
    app_id = data.get("app_id")
    if isinstance(app_id, bool) or not (
        (isinstance(app_id, int) and app_id > 0)
        or (isinstance(app_id, str) and _TOKEN.fullmatch(app_id))
    ):
        raise CredentialError(f"{path}: app_id is the App's id (a number) or its client id")
    installation = data.get("installation_id")
    if isinstance(installation, str) and installation.isdigit():
        installation = int(installation)
    if isinstance(installation, bool) or not isinstance(installation, int) or installation <= 0:
        raise CredentialError(f"{path}: installation_id is the installation's number")
    key_path = data.get("private_key")
    if not isinstance(key_path, str) or not os.path.isabs(key_path):
        raise CredentialError(f"{path}: private_key is the absolute path of the App's PEM key")
    api_url = data.get("api_url", DEFAULT_API_URL)
    if not isinstance(api_url, str) or not re.fullmatch(
        r"https://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~/-]*)?", api_url
    ):
        raise CredentialError(
            f"{path}: api_url is an https:// URL without credentials, query or fragment "
            f"(default {DEFAULT_API_URL})"
        )
    return GitHubApp(host, path, app_id, installation, key_path, api_url.rstrip("/"))


def check_credentials(directory: str | None, hosts: Iterable[str]) -> list[str]:
    """Load (and so check) the credential of every host; the problems found, one
    message each (an empty list when every host is usable). For a pre-flight."""
    problems = []
    for host in sorted(set(hosts)):
        try:
            cred = load_credential(directory, host)
            if isinstance(cred, GitHubApp):
                read_private_file(cred.private_key_path, max_size=MAX_API_RESPONSE)
        except CredentialError as e:
            problems.append(str(e))
    return problems


# --- per-sandbox tokens --------------------------------------------------------------


@dataclass
class InstallationToken:
    token: str
    expires_at: float  # epoch seconds
    api_url: str
    scope: tuple[tuple[str, ...], str]  # (repository names, permission) it was minted for

    def fresh(self, now: float) -> bool:
        return now < self.expires_at - REFRESH_MARGIN


@dataclass
class _SandboxCredentials:
    tokens: dict[str, InstallationToken] = field(default_factory=dict)  # by host
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    secrets: set[str] = field(default_factory=set)


def app_scope(repos: Collection[RepoRule], host: str) -> tuple[tuple[str, ...], str]:
    """(repository names, contents permission) to ask GitHub for: the last path
    segment of every repository the sandbox lists on `host`, and "write" when any of
    them is write."""
    on_host = [r for r in repos if r.host == host]
    names = tuple(sorted({r.path.rsplit("/", 1)[-1] for r in on_host}))
    permission = "write" if any(r.access == "write" for r in on_host) else "read"
    return names, permission


class CredentialStore:
    """Credentials for every sandbox of one gateway. `clock` is time.time (injected
    by tests). Use from one event loop."""

    def __init__(self, directory: str | None, *, clock: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self._clock = clock
        self._sandboxes: dict[str, _SandboxCredentials] = {}
        self._file_secrets: set[str] = set()

    # --- what the gateway asks ---------------------------------------------------

    async def authorization(
        self, sandbox_id: str, host: str, repos: Collection[RepoRule], fetch: Fetch
    ) -> str | None:
        """The Authorization header value for requests of `sandbox_id` to `host`, or
        None (no credential configured: anonymous). Raises CredentialError."""
        cred = load_credential(self.directory, host)
        if cred is None:
            return None
        if isinstance(cred, TokenCredential):
            header = basic_authorization(cred.token)
            self._file_secrets.update((cred.token, header, header.split(" ", 1)[1]))
            return header
        state = self._sandboxes.setdefault(sandbox_id, _SandboxCredentials())
        lock = state.locks.setdefault(host, asyncio.Lock())
        async with lock:
            scope = app_scope(repos, host)
            current = state.tokens.get(host)
            if current is None or current.scope != scope or not current.fresh(self._clock()):
                current = await self._mint(state, cred, scope, fetch)
                state.tokens[host] = current
        header = basic_authorization(current.token)
        state.secrets.update((header, header.split(" ", 1)[1]))
        return header

    async def release(self, sandbox_id: str, fetch: Fetch) -> None:
        """Revoke the sandbox's installation tokens (best effort, logged) and forget
        its secrets."""
        state = self._sandboxes.pop(sandbox_id, None)
        if state is None:
            return
        for host, tok in state.tokens.items():
            try:
                resp = await fetch(
                    "DELETE",
                    f"{tok.api_url}/installation/token",
                    [
                        ("Authorization", f"token {tok.token}"),
                        ("Accept", "application/vnd.github+json"),
                    ],
                    None,
                )
                if resp.status == 204:
                    log.info("sandbox %s: revoked its installation token for %s", sandbox_id, host)
                else:
                    log.warning(
                        "sandbox %s: revoking its installation token for %s: HTTP %d",
                        sandbox_id,
                        host,
                        resp.status,
                    )
            except Exception as e:  # best effort: the token expires within the hour anyway
                log.warning(
                    "sandbox %s: revoking its installation token for %s failed: %s",
                    sandbox_id,
                    host,
                    self.redact(f"{type(e).__name__}: {e}", extra=state.secrets),
                )

    def secrets(self) -> set[str]:
        """Every secret this store holds or has handed out (for redaction)."""
        found = set(self._file_secrets)
        for state in self._sandboxes.values():
            found |= state.secrets
        return found

    def redact(self, text: str, *, extra: Iterable[str] = ()) -> str:
        return _redact(text, self.secrets() | set(extra))

    # --- GitHub App ----------------------------------------------------------------

    async def _mint(
        self,
        state: _SandboxCredentials,
        app: GitHubApp,
        scope: tuple[tuple[str, ...], str],
        fetch: Fetch,
    ) -> InstallationToken:
        key = read_private_file(app.private_key_path, max_size=MAX_API_RESPONSE)
        now = self._clock()
        jwt = make_jwt(app.app_id, key, now)
        state.secrets.add(jwt)
        names, permission = scope
        body = json.dumps({"repositories": list(names), "permissions": {"contents": permission}})
        url = f"{app.api_url}/app/installations/{app.installation_id}/access_tokens"
        what = f"minting a GitHub App installation token for {app.host}"
        try:
            resp = await fetch(
                "POST",
                url,
                [
                    ("Authorization", f"Bearer {jwt}"),
                    ("Accept", "application/vnd.github+json"),
                    ("Content-Type", "application/json"),
                    ("X-GitHub-Api-Version", "2022-11-28"),
                ],
                body.encode(),
            )
        except Exception as e:
            raise CredentialError(
                self.redact(f"{what}: {type(e).__name__}: {e}", extra=state.secrets)
            ) from None
        data = _json_object(resp.body)
        if resp.status != 201:
            message = data.get("message") if isinstance(data, dict) else None
            detail = f": {str(message)[:200]}" if message else ""
            raise CredentialError(
                self.redact(f"{what}: HTTP {resp.status}{detail}", extra=state.secrets)
            )
        token = data.get("token") if isinstance(data, dict) else None
        expires = data.get("expires_at") if isinstance(data, dict) else None
        if not isinstance(token, str) or not _TOKEN.fullmatch(token):
            raise CredentialError(f"{what}: the answer holds no usable token")
        state.secrets.add(token)
        expires_at = _parse_time(expires)
        if expires_at is None:
            raise CredentialError(f"{what}: the answer has no valid expires_at")
        return InstallationToken(token, expires_at, app.api_url, scope)


def _json_object(body: bytes) -> object:
    with contextlib.suppress(ValueError, UnicodeDecodeError):
        return json.loads(body.decode("utf-8"))
    return None


def _parse_time(value: object) -> float | None:
    """Epoch seconds of an RFC 3339 time ("2026-01-01T00:00:00Z"), or None."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return None
    return parsed.timestamp()
