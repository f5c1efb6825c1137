"""gateway/credentials.py: root-only files, GitHub App JWTs, per-sandbox installation
tokens with an injected clock and a fake API, and redaction of every secret."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from gateway.audit import REDACTED
from gateway.credentials import (
    CredentialError,
    CredentialStore,
    FetchResponse,
    GitHubApp,
    TokenCredential,
    app_scope,
    basic_authorization,
    check_credentials,
    load_credential,
    make_jwt,
)
from gateway.policy import parse_policy

HOST = "github.com"
T0 = 1_800_000_000.0


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _write(path: Path, text: str | bytes, mode: int = 0o600) -> Path:
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    path.chmod(mode)
    return path


@pytest.fixture
def creds(tmp_path) -> Path:
    d = tmp_path / "credentials"
    d.mkdir(mode=0o700)
    return d


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _repos(*entries: tuple[str, str]):
    lines = []
    for url, access in entries:
        lines += ["[[git.repos]]", f'url = "{url}"', f'access = "{access}"']
        if access == "write":
            lines += ["[git.repos.push]", 'refs = ["refs/heads/sandbox/*"]']
    return parse_policy("\n".join(lines)).repos


# --- token files ---------------------------------------------------------------------------


def test_a_token_file_is_basic_x_access_token(creds) -> None:
    _write(creds / f"{HOST}.token", "  ghs_abc123\n")
    cred = load_credential(str(creds), HOST)
    assert cred == TokenCredential(HOST, str(creds / f"{HOST}.token"), "ghs_abc123")
    header = basic_authorization("ghs_abc123")
    assert base64.b64decode(header.removeprefix("Basic ")) == b"x-access-token:ghs_abc123"


def test_no_directory_or_no_file_means_no_credential(creds, tmp_path) -> None:
    assert load_credential(str(tmp_path / "missing"), HOST) is None
    assert load_credential(str(creds), HOST) is None
    assert load_credential(None, HOST) is None


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o610, 0o601])
def test_a_token_file_others_can_touch_is_refused(creds, mode) -> None:
    path = _write(creds / f"{HOST}.token", "secret-value-123", mode)
    with pytest.raises(CredentialError) as info:
        load_credential(str(creds), HOST)
    message = str(info.value)
    assert str(path) in message and f"chmod 600 {path}" in message
    assert "secret-value-123" not in message
    assert check_credentials(str(creds), [HOST]) == [message]


def test_a_symlinked_or_foreign_token_file_is_refused(creds, tmp_path) -> None:
    target = _write(tmp_path / "elsewhere", "tok")
    (creds / f"{HOST}.token").symlink_to(target)
    with pytest.raises(CredentialError, match="symbolic link"):
        load_credential(str(creds), HOST)
    (creds / f"{HOST}.token").unlink()
    path = _write(creds / f"{HOST}.token", "tok")
    if os.geteuid() == 0:
        os.chown(path, 12345, -1)
        with pytest.raises(CredentialError, match="owned by uid 12345"):
            load_credential(str(creds), HOST)


def test_a_group_writable_directory_is_refused(creds) -> None:
    _write(creds / f"{HOST}.token", "tok")
    creds.chmod(0o770)
    with pytest.raises(CredentialError, match="chmod 700"):
        load_credential(str(creds), HOST)


@pytest.mark.parametrize("content", ["", "\n", "two words", "a\nb", "caf\u00e9"])
def test_a_token_file_holds_one_printable_token(creds, content) -> None:
    _write(creds / f"{HOST}.token", content)
    with pytest.raises(CredentialError) as info:
        load_credential(str(creds), HOST)
    assert content.strip() == "" or content not in str(info.value)


def test_one_credential_per_host(creds) -> None:
    _write(creds / f"{HOST}.token", "tok")
    _write(creds / f"{HOST}.github-app.toml", "app_id = 1")
    with pytest.raises(CredentialError, match="keep one credential per host"):
        load_credential(str(creds), HOST)


def test_host_names_cannot_walk_out_of_the_directory(creds) -> None:
    for host in ("../etc/passwd", "a/b", ".hidden", ""):
        with pytest.raises(CredentialError):
            load_credential(str(creds), host)


# --- GitHub App configuration -------------------------------------------------------------


def test_a_github_app_file(creds) -> None:
    key = _write(creds / "app.pem", "x")
    _write(
        creds / f"{HOST}.github-app.toml",
        f'app_id = 42\ninstallation_id = "7"\nprivate_key = "{key}"\n',
    )
    cred = load_credential(str(creds), HOST)
    assert cred == GitHubApp(
        HOST, str(creds / f"{HOST}.github-app.toml"), 42, 7, str(key), "https://api.github.com"
    )


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('app_id = 1\ninstallation_id = 2\nprivate_key = "k.pem"', "absolute path"),
        ('app_id = 1\ninstallation_id = 0\nprivate_key = "/k.pem"', "installation_id"),
        ('app_id = true\ninstallation_id = 2\nprivate_key = "/k.pem"', "app_id"),
        ('app_id = 1\ninstallation_id = 2\nprivate_key = "/k"\nextra = 1', "unknown key"),
        ('app_id = 1\ninstallation_id = 2\nprivate_key = "/k"\napi_url = "http://x"', "api_url"),
        ('app_id = 1\ninstallation_id = 2\nprivate_key = "/k"\napi_url = "https://u@x"', "api_url"),
        ("app_id = ", "not valid TOML"),
    ],
)
def test_a_bad_github_app_file_says_what_is_wrong(creds, text, match) -> None:
    _write(creds / f"{HOST}.github-app.toml", text)
    with pytest.raises(CredentialError, match=match):
        load_credential(str(creds), HOST)


# --- JWT ------------------------------------------------------------------------------------


def test_the_jwt_is_rs256_with_the_claims_github_wants(rsa_key) -> None:
    jwt = make_jwt(123456, _pem(rsa_key), T0)
    header_b64, claims_b64, sig_b64 = jwt.split(".")
    assert json.loads(_b64url_decode(header_b64)) == {"alg": "RS256", "typ": "JWT"}
    assert json.loads(_b64url_decode(claims_b64)) == {
        "iat": int(T0) - 60,
        "exp": int(T0) + 540,
        "iss": 123456,
    }
    assert "=" not in jwt
    rsa_key.public_key().verify(
        _b64url_decode(sig_b64),
        f"{header_b64}.{claims_b64}".encode(),
        padding.PKCS1v15(),
        hashes.SHA256(),
    )  # raises InvalidSignature otherwise
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(InvalidSignature):
        other.public_key().verify(
            _b64url_decode(sig_b64),
            f"{header_b64}.{claims_b64}".encode(),
            padding.PKCS1v15(),
            hashes.SHA256(),
        )


def test_the_jwt_needs_an_rsa_pem_key() -> None:
    with pytest.raises(CredentialError, match="RSA"):
        make_jwt(1, _pem(ec.generate_private_key(ec.SECP256R1())), T0)
    with pytest.raises(CredentialError, match="PEM"):
        make_jwt(1, b"not a key", T0)


# --- installation tokens: minting, caching, revoking --------------------------------------


class FakeGitHub:
    """The App API as the store sees it: every call recorded; tokens numbered."""

    def __init__(self, lifetime: float = 3600) -> None:
        self.calls: list[tuple[str, str, dict, bytes | None]] = []
        self.lifetime = lifetime
        self.clock = T0
        self.minted = 0
        self.status = 201

    async def fetch(self, method, url, headers, body) -> FetchResponse:
        self.calls.append((method, url, dict(headers), body))
        if method == "DELETE":
            return FetchResponse(204, b"")
        if self.status != 201:
            return FetchResponse(self.status, json.dumps({"message": "Bad credentials"}).encode())
        self.minted += 1
        expires = self.clock + self.lifetime
        from datetime import UTC, datetime

        stamp = datetime.fromtimestamp(expires, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        token = f"ghs_minted{self.minted}_{'x' * (self.minted * 7)}"
        return FetchResponse(201, json.dumps({"token": token, "expires_at": stamp}).encode())


@pytest.fixture
def app(creds, rsa_key) -> Path:
    key = _write(creds / "app.pem", _pem(rsa_key))
    _write(
        creds / f"{HOST}.github-app.toml",
        f'app_id = 99\ninstallation_id = 1234\nprivate_key = "{key}"\n'
        'api_url = "https://api.github.test/"\n',
    )
    return creds


def _auth_token(header: str) -> str:
    return base64.b64decode(header.removeprefix("Basic ")).decode().split(":", 1)[1]


def test_an_installation_token_is_minted_narrowed_and_cached_until_five_minutes_before_expiry(
    app, rsa_key
) -> None:
    api = FakeGitHub()
    store = CredentialStore(str(app), clock=lambda: api.clock)
    repos = _repos(
        ("https://github.com/org/app", "write"),
        ("https://github.com/org/lib", "read"),
        ("https://gitlab.test/org/other", "read"),
    )

    async def auth(sandbox="sb1"):
        return await store.authorization(sandbox, HOST, repos, api.fetch)

    first = asyncio.run(auth())
    assert _auth_token(first) == "ghs_minted1_xxxxxxx"
    method, url, headers, body = api.calls[0]
    assert (method, url) == ("POST", "https://api.github.test/app/installations/1234/access_tokens")
    assert json.loads(body) == {
        "repositories": ["app", "lib"],
        "permissions": {"contents": "write"},
    }
    assert headers["Accept"] == "application/vnd.github+json"
    jwt = headers["Authorization"].removeprefix("Bearer ")
    h, c, s = jwt.split(".")
    rsa_key.public_key().verify(
        _b64url_decode(s), f"{h}.{c}".encode(), padding.PKCS1v15(), hashes.SHA256()
    )
    assert json.loads(_b64url_decode(c))["iss"] == 99

    # Cached: until 5 minutes before expires_at (3600 s), not a second longer.
    api.clock = T0 + 3600 - 301
    assert asyncio.run(auth()) == first and api.minted == 1
    api.clock = T0 + 3600 - 300
    second = asyncio.run(auth())
    assert api.minted == 2 and _auth_token(second) == "ghs_minted2_" + "x" * 14

    # Per sandbox: another sandbox gets its own token.
    assert _auth_token(asyncio.run(auth("sb2"))).startswith("ghs_minted3_")

    # Removal revokes the sandbox's current token with that token itself.
    asyncio.run(store.release("sb1", api.fetch))
    method, url, headers, body = api.calls[-1]
    assert (method, url, body) == ("DELETE", "https://api.github.test/installation/token", None)
    assert headers["Authorization"] == "token ghs_minted2_" + "x" * 14
    asyncio.run(store.release("sb1", api.fetch))  # nothing left: no second call
    assert sum(1 for c in api.calls if c[0] == "DELETE") == 1


def test_a_read_only_sandbox_asks_for_read(app) -> None:
    api = FakeGitHub()
    store = CredentialStore(str(app), clock=lambda: api.clock)
    repos = _repos(("https://github.com/org/lib", "read"))
    asyncio.run(store.authorization("sb", HOST, repos, api.fetch))
    assert json.loads(api.calls[0][3])["permissions"] == {"contents": "read"}
    assert app_scope(repos, HOST) == (("lib",), "read")


def test_concurrent_requests_mint_once(app) -> None:
    api = FakeGitHub()
    store = CredentialStore(str(app), clock=lambda: api.clock)
    repos = _repos(("https://github.com/org/lib", "read"))

    async def many():
        return await asyncio.gather(
            *(store.authorization("sb", HOST, repos, api.fetch) for _ in range(5))
        )

    assert len(set(asyncio.run(many()))) == 1 and api.minted == 1


def test_api_errors_name_the_problem_and_no_secret(app) -> None:
    api = FakeGitHub()
    api.status = 401
    store = CredentialStore(str(app), clock=lambda: api.clock)
    repos = _repos(("https://github.com/org/lib", "read"))
    with pytest.raises(CredentialError) as info:
        asyncio.run(store.authorization("sb", HOST, repos, api.fetch))
    assert "HTTP 401: Bad credentials" in str(info.value)
    jwt = api.calls[0][2]["Authorization"].removeprefix("Bearer ")
    assert jwt not in str(info.value)

    async def failing(method, url, headers, body):
        raise OSError(f"connection reset while sending {headers[0][1]}")

    with pytest.raises(CredentialError) as info:
        asyncio.run(store.authorization("sb", HOST, repos, failing))
    assert "Bearer" in str(info.value) and REDACTED in str(info.value)
    assert ".ey" not in str(info.value)  # no piece of the JWT


# --- redaction -------------------------------------------------------------------------------


def test_every_secret_the_store_holds_is_redacted_whatever_its_shape(app, creds) -> None:
    api = FakeGitHub()
    store = CredentialStore(str(creds), clock=lambda: api.clock)
    repos = _repos(("https://github.com/org/lib", "read"))
    header = asyncio.run(store.authorization("sb", HOST, repos, api.fetch))
    minted = _auth_token(header)
    jwt = api.calls[0][2]["Authorization"].removeprefix("Bearer ")
    # A token file for another host, in a shape no prefix rule would guess: 3 characters.
    _write(creds / "git.test.token", "q7Z")
    file_header = asyncio.run(store.authorization("sb", "git.test", repos, api.fetch))
    secrets = store.secrets()
    assert {minted, jwt, "q7Z", header, file_header} <= secrets

    text = (
        f"token={minted} jwt={jwt} header='{header}' short=q7Z "
        f"b64={header.removeprefix('Basic ')} file={file_header}"
    )
    out = store.redact(text)
    for secret in (minted, jwt, "q7Z", header.removeprefix("Basic "), file_header):
        assert secret not in out
    assert out.count(REDACTED) >= 6 and out.startswith("token=" + REDACTED)

    asyncio.run(store.release("sb", api.fetch))
    assert minted not in store.secrets() and jwt not in store.secrets()
    assert "q7Z" in store.secrets()  # file tokens stay known while the gateway runs
