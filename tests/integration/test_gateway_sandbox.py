"""The egress gateway end to end: `sandgate run` a real sandbox and talk to the world
from inside it, with curl, Python's urllib, pip and raw sockets, through both
endpoints (the TCP proxy on the veth host end and /run/sandgate/gateway.sock).

The world is one network namespace at 10.214.N.2 (gateway_fixtures.upstream_servers)
with recording HTTP, HTTPS (a test CA), echo and sink servers; every name a sandbox
uses is made up under .test and pinned with --resolve, so no real name is ever looked
up. Names that resolve to refused addresses (loopback, metadata, ...) are checked
offline against gateway.addr first, so a broken classifier fails the test before the
gateway could dial anything outside the test namespaces.

Several checks share one sandbox run (a Python script inside prints one JSON object)
to keep the suite fast; the upstream is shared by the whole module, and each test
looks at what changed on it during its own run.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, ip_address, ip_network
from pathlib import Path

import pytest

from gateway.addr import AddressRefused, resolve_and_check
from gateway.policy import Request, decide, parse_allow_arg, parse_policy
from tests.integration.gateway_fixtures import (
    PACKAGE,
    SANDBOX_CLIENT,
    WHEEL_NAME,
    Counts,
    SeenRequest,
    Upstream,
    upstream_servers,
)
from tests.testca import TestCA, make_test_ca

pytestmark = pytest.mark.root

SANDGATE = os.path.join(os.path.dirname(sys.executable), "sandgate")
POOL = IPv4Network("10.213.0.0/16")
UPSTREAM_CIDR = "10.214.0.0/16"

PROXY_SECRET = "pr0xy-S3cret-7f3a9c"
AUTH_SECRET = "auth-T0ken-51be02d4"
URL_SECRET = "urlpass-9d0c4e21"
SECRETS = (
    PROXY_SECRET,
    AUTH_SECRET,
    URL_SECRET,
    base64.b64encode(f"puser:{PROXY_SECRET}".encode()).decode(),
    base64.b64encode(f"user:{URL_SECRET}".encode()).decode(),
)
SECRET_ENV = {"PROXY_SECRET": PROXY_SECRET, "AUTH_SECRET": AUTH_SECRET, "URL_SECRET": URL_SECRET}


# --- the module's world ----------------------------------------------------------------


@dataclass(frozen=True)
class World:
    share: Path  # bound read-only into every sandbox: ca.pem, sgclient.py
    ca: TestCA
    up: Upstream

    @property
    def addr(self) -> str:
        return str(self.up.addr)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[World]:
    share = tmp_path_factory.mktemp("gwshare")
    share.chmod(0o755)  # the sandbox's unprivileged user reads it
    keys = tmp_path_factory.mktemp("gwkeys")
    ca = make_test_ca(share, keys, ["upstream.test", "alt.upstream.test"])
    client = share / "sgclient.py"
    client.write_text(SANDBOX_CLIENT)
    client.chmod(0o644)
    with upstream_servers(ca) as up:
        yield World(share, ca, up)


def _remove_kept(state: Path) -> None:
    for record in (state / "sandboxes").glob("*.json"):
        subprocess.run(
            [SANDGATE, "rm", "--state-dir", str(state), record.stem],
            capture_output=True,
            check=False,
            timeout=60,
        )


@pytest.fixture
def state(tmp_path) -> Iterator[Path]:
    state_dir = tmp_path / "state"
    yield state_dir
    _remove_kept(state_dir)  # nothing should be there; a crash may leave one


# --- running a script in a sandbox -----------------------------------------------------


@dataclass
class Run:
    rc: int
    out: dict  # the JSON object the script printed
    stdout: str
    stderr: str
    summary: dict  # sandgate's --json result line
    audit: list[dict]
    audit_text: str

    def audit_for(self, request_id: str | None) -> dict:
        found = [r for r in self.audit if r["request_id"] == request_id]
        assert len(found) == 1, f"{len(found)} audit lines for request id {request_id!r}"
        return found[0]


def _check_names_pinned(policy_text: str | None, allow: Sequence[str], pins: Mapping) -> None:
    """Every host the sandbox may reach resolves through --resolve, never through the
    host's resolver; and every pinned address outside the test ranges is one the
    gateway refuses (checked here, offline, before any sandbox could try it)."""
    rules = list(parse_policy(policy_text).egress.allow) if policy_text else []
    rules += [parse_allow_arg(a) for a in allow]
    for rule in rules:
        assert not rule.host.wildcard, f"{rule.host}: wildcards could reach unpinned names"
        assert rule.host.text in pins, f"{rule.host} is allowed but not pinned with --resolve"
    test_nets = (POOL, ip_network(UPSTREAM_CIDR))
    for name, addrs in pins.items():
        ips = [ip_address(a) for a in addrs.split(",")]
        if all(ip.version == 4 and any(ip in net for net in test_nets) for ip in ips):
            continue
        with pytest.raises(AddressRefused):
            resolve_and_check(
                name,
                80,
                resolver=lambda _h, _p, ips=ips: ips,
                self_addrs={POOL, "127.0.0.1"},
                allow_cidrs=[UPSTREAM_CIDR],
            )


def sandbox_run(
    world: World,
    workdir: Path,
    script: str,
    *,
    name: str = "run",
    policy: str | None = None,
    pins: Mapping[str, str] | None = None,
    allow: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    timeout: float = 90,
) -> Run:
    """`sandgate run` /usr/bin/python3 -c SCRIPT in a fresh sandbox that trusts the test
    CA and can import sgclient; the script's last stdout line is JSON."""
    pins = dict(pins or {})
    _check_names_pinned(policy, allow, pins)
    audit = workdir / f"{name}-audit.jsonl"
    args = [SANDGATE, "run", "--state-dir", str(workdir / "state"), "--json"]
    args += ["--audit-log", str(audit), "--ro", str(world.share)]
    args += ["--allow-cidr", UPSTREAM_CIDR]
    if policy is not None:
        path = workdir / f"{name}.toml"
        path.write_text(policy)
        args += ["--policy", str(path)]
    for host in allow:
        args += ["--allow", host]
    for host, addr in pins.items():
        args += ["--resolve", f"{host}={addr}"]
    ca = str(world.ca.ca_cert)
    full_env = {
        "PYTHONPATH": str(world.share),
        "PYTHONDONTWRITEBYTECODE": "1",
        "CA": ca,
        "SSL_CERT_FILE": ca,
        "REQUESTS_CA_BUNDLE": ca,
        "PIP_CERT": ca,
        "UPSTREAM": world.addr,
        **(env or {}),
    }
    for key, value in full_env.items():
        args += ["-e", f"{key}={value}"]
    args += ["--", "python3", "-c", script]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    summary_lines = [ln for ln in proc.stderr.splitlines() if ln.startswith('{"')]
    summary = json.loads(summary_lines[-1]) if summary_lines else {}
    assert proc.returncode == 0, f"sandbox run failed ({proc.returncode}):\n{proc.stderr}"
    out_lines = proc.stdout.strip().splitlines()
    assert out_lines, f"the script printed nothing:\n{proc.stderr}"
    audit_text = audit.read_text() if audit.exists() else ""
    return Run(
        proc.returncode,
        json.loads(out_lines[-1]),
        proc.stdout,
        proc.stderr,
        summary,
        [json.loads(line) for line in audit_text.splitlines()],
        audit_text,
    )


def policy_toml(*rules: str, **egress: object) -> str:
    """An [egress] table (values as TOML literals) plus [[egress.allow]] blocks."""
    settings: dict[str, object] = {"rate": 1000, "burst": 1000, **egress}
    lines = ["[egress]", *(f"{k} = {v}" for k, v in settings.items())]
    for rule in rules:
        lines += ["[[egress.allow]]", rule.strip()]
    return "\n".join(lines) + "\n"


UPSTREAM_RULE = """
host = "upstream.test"
ports = [80, 443, 7000, 7001]
methods = ["GET", "HEAD", "POST"]
"""


def since(world: World, before: dict[str, Counts]) -> dict[str, Counts]:
    """What each upstream server saw since `before` (differences)."""
    now = world.up.counts()
    return {
        k: Counts(
            now[k].connections - before[k].connections,
            now[k].bytes - before[k].bytes,
            now[k].requests - before[k].requests,
        )
        for k in now
    }


def new_requests(world: World, before: dict[str, Counts]) -> list[SeenRequest]:
    return world.up.http.requests_since(before["http"]) + world.up.https.requests_since(
        before["https"]
    )


# --- 1. allowed traffic, every kind of client, both endpoints --------------------------

ALLOWED_SCRIPT = r"""
import os, ssl, sys, urllib.error, urllib.request
from sgclient import *

CA = os.environ["CA"]
SECRET, AUTH = os.environ["PROXY_SECRET"], os.environ["AUTH_SECRET"]
r = {}

def code(res):
    return {"rc": res["rc"], "code": res["stdout"][-3:], "stderr": res["stderr"][-500:]}

# curl, proxy from the environment (http_proxy / https_proxy): credentials for the
# proxy and headers that claim to come from proxies, all of which must be dropped.
r["curl_http"] = code(run(
    "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-U", f"puser:{SECRET}",
    "-H", "X-Forwarded-For: 203.0.113.9", "-H", "Forwarded: for=203.0.113.9",
    "-H", "Via: 1.1 elsewhere", "-H", "X-Forwarded-Host: evil.test",
    "-H", f"Authorization: Bearer {AUTH}", "-H", "X-End-To-End: kept",
    "http://upstream.test/curl-http?q=1"))
r["curl_https"] = code(run(
    "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", CA,
    "-U", f"puser:{SECRET}", "https://upstream.test/curl-https"))

def urlopen(url, opener=None):
    try:
        with (opener or urllib.request.build_opener()).open(url, timeout=15) as resp:
            return {"status": resp.status, "body": resp.read().decode()}
    except urllib.error.HTTPError as e:
        return {"status": e.code, "body": e.read().decode()}
    except Exception as e:
        return {"status": None, "body": repr(e)}

# Python's urllib: proxies from the environment, CA from SSL_CERT_FILE.
r["py_http"] = urlopen("http://upstream.test/py-http")
r["py_https"] = urlopen("https://upstream.test/py-https")

# A pip-style client: the proxy from PIP_PROXY, the CA from REQUESTS_CA_BUNDLE.
proxy = os.environ["PIP_PROXY"]
ctx = ssl.create_default_context(cafile=os.environ["REQUESTS_CA_BUNDLE"])
opener = urllib.request.build_opener(
    urllib.request.ProxyHandler({"http": proxy, "https": proxy}),
    urllib.request.HTTPSHandler(context=ctx),
)
r["pipstyle"] = urlopen("https://upstream.test/simple/somepkg/", opener)

# pip itself (the host's, under /usr): PIP_PROXY and PIP_CERT, a PEP 503 index.
if run(sys.executable, "-m", "pip", "--version")["rc"] == 0:
    res = run(sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
              "--disable-pip-version-check", "--index-url", "https://upstream.test/simple/",
              "-d", "/tmp/dl", "somepkg", timeout=120)
    r["pip"] = {"rc": res["rc"], "stderr": res["stderr"][-1500:],
                "files": sorted(os.listdir("/tmp/dl")) if os.path.isdir("/tmp/dl") else []}

# Raw absolute-form over TCP, then the same over the Unix socket (curl 7.88 does not
# speak to a proxy over a Unix socket: --unix-socket sends origin-form, so raw it is).
r["raw_tcp_http"] = get("http://upstream.test/raw-tcp")
r["unix_http"] = get("http://upstream.test/unix-http", "Proxy-Authorization: Basic eA==",
                     unix=True)
s, head = tunnel("upstream.test:443", unix=True)
r["unix_connect"] = head["status"]
r["unix_https"] = https_get(s, "upstream.test", "/unix-https", CA) if s else head
s, head = tunnel("upstream.test:443")
r["tcp_connect_alt_san"] = https_get(s, "alt.upstream.test", "/alt-san", CA) if s else head
emit(r)
"""


def test_allowed_requests_pass_rebuilt_through_both_endpoints(world, tmp_path, state):
    before = world.up.counts()
    run = sandbox_run(
        world,
        tmp_path,
        ALLOWED_SCRIPT,
        policy=policy_toml(UPSTREAM_RULE, allow_cidrs=f'["{UPSTREAM_CIDR}"]'),
        pins={"upstream.test": world.addr},
        env=SECRET_ENV,
        timeout=150,
    )
    r = run.out
    assert r["curl_http"] == {"rc": 0, "code": "200", "stderr": ""}, r["curl_http"]
    assert r["curl_https"] == {"rc": 0, "code": "200", "stderr": ""}, r["curl_https"]
    assert r["py_http"] == {"status": 200, "body": "upstream ok /py-http\n"}
    assert r["py_https"] == {"status": 200, "body": "upstream ok /py-https\n"}
    assert r["pipstyle"]["status"] == 200 and WHEEL_NAME in r["pipstyle"]["body"]
    assert "pip" in r, "pip is not available inside the sandbox (python3 -m pip)"
    assert r["pip"]["rc"] == 0, r["pip"]["stderr"]
    assert r["pip"]["files"] == [WHEEL_NAME]
    for key in ("raw_tcp_http", "unix_http", "unix_https", "tcp_connect_alt_san"):
        assert r[key]["status"] == 200, (key, r[key])
    assert r["unix_connect"] == 200

    seen = {req.target.split("?")[0]: req for req in new_requests(world, before)}
    # Every request arrived origin-form, as HTTP/1.1, with the target's Host.
    for path in ("/curl-http", "/py-http", "/raw-tcp", "/unix-http"):
        req = seen[path]
        assert not req.tls and req.version == "HTTP/1.1"
        assert req.target.startswith("/"), req.target
        assert req.header("Host") == ["upstream.test"]
        assert req.header("Connection") == ["close"]
        for dropped in ("Proxy-Authorization", "Proxy-Connection", "Forwarded", "Via"):
            assert req.header(dropped) == [], (path, dropped, req.headers)
        assert not [k for k, _ in req.headers if k.lower().startswith("x-forwarded-")]
    curl = seen["/curl-http"]
    assert curl.target == "/curl-http?q=1"
    assert curl.header("Authorization") == [f"Bearer {AUTH_SECRET}"]  # end to end: kept
    assert curl.header("X-End-To-End") == ["kept"]
    for path in ("/curl-https", "/py-https", f"/simple/{PACKAGE}/", "/unix-https", "/alt-san"):
        assert seen[path].tls, path
        assert seen[path].header("Proxy-Authorization") == []
    assert seen[f"/packages/{WHEEL_NAME}"].tls  # pip fetched the wheel

    # One audit line per connection, all allowed, the Unix ones marked as such.
    assert all(a["decision"] == "allow" for a in run.audit), run.audit
    assert len({a["request_id"] for a in run.audit}) == len(run.audit)
    assert {a["addr"] for a in run.audit} == {world.addr}
    unix = [a for a in run.audit if a["endpoint"] == "unix"]
    assert sorted((a["method"], a["port"]) for a in unix) == [("CONNECT", 443), ("GET", 80)]
    plain = [a for a in run.audit if a["method"] == "GET"]
    assert {a["path"] for a in plain} >= {"/curl-http?q=***", "/py-http", "/raw-tcp", "/unix-http"}
    assert all(a["status"] == 200 and a["bytes_down"] > 0 for a in run.audit)


# --- 2. every kind of denial: status, request id, audit line ---------------------------

# Names the denial test pins to addresses the gateway must refuse: name -> (--resolve
# answer, the class the audit line must name, the address its reason must quote).
# "self" is filled in with the host end of the upstream veth (the host's own address).
REFUSED_ADDRESSES = {
    # 127.0.0.1 is on the host's lo: the gateway's own address ("self") comes first.
    "loop": ("127.0.0.1", "self", "127.0.0.1"),
    "loop2": ("127.0.0.2", "loopback", "127.0.0.2"),
    "zero": ("0.0.0.0", "unspecified", "0.0.0.0"),
    "meta": ("169.254.169.254", "metadata", "169.254.169.254"),
    "meta6": ("fd00:ec2::254", "metadata", "fd00:ec2::254"),
    "linklocal": ("169.254.1.1", "link-local", "169.254.1.1"),
    "mapped": ("::ffff:10.0.0.1", "private", "10.0.0.1"),
    "private": ("192.168.1.1", "private", "192.168.1.1"),
    "cgnat": ("100.64.0.1", "cgnat", "100.64.0.1"),
    "v6loop": ("::1", "loopback", "::1"),
    "nat64": ("64:ff9b::a00:1", "nat64", "10.0.0.1"),
    "mixed": ("{upstream},127.0.0.2", "loopback", "127.0.0.2"),  # all answers must pass
    "self": ("{host_end}", "self", "{host_end}"),
}

LITERALS = ("2130706433", "0x7f.1", "0177.0.0.1", "127.1", "[::1]", "[::ffff:127.0.0.1]")

DENIALS_SCRIPT = r"""
import json, os
from sgclient import *

UP = os.environ["UPSTREAM"]
r = {}
r["host"] = get("http://notallowed.test/x")
r["host_curl"] = run("curl", "-sS", "-i", "http://notallowed.test/curl")
r["host_curl_https"] = run("curl", "-sS", "https://notallowed.test/", "--cacert", os.environ["CA"])
r["deny_rule"] = get("http://blocked.test/")
r["port"] = get("http://upstream.test:8080/")
r["port_connect"] = tunnel("upstream.test:22")[1]
r["connect_80"] = tunnel("upstream.test:80")[1]
r["plain_443"] = get("http://upstream.test:443/")
r["method"] = get("http://getonly.test/post", method="POST", body=b"x")
r["trace"] = get("http://upstream.test/trace", method="TRACE")
r["max_body"] = get("http://upstream.test/big", method="POST", body=b"x" * 2048)
r["max_body_chunked"] = exchange(
    b"POST http://upstream.test/bigc HTTP/1.1\r\nHost: upstream.test\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n800\r\n" + b"x" * 2048 + b"\r\n0\r\n\r\n")
for name in json.loads(os.environ["REFUSED_NAMES"]):
    r["addr_" + name] = get(f"http://{name}.test/")
r["addr_meta_connect"] = tunnel("meta.test:443")[1]
for lit in json.loads(os.environ["LITERALS"]) + [UP]:
    r["literal " + lit] = get(f"http://{lit}/")
    r["literal_connect " + lit] = tunnel(f"{lit}:443")[1]
r["control"] = get("http://upstream.test/after-denials")
emit(r)
"""

DENIALS_POLICY = (
    policy_toml(
        UPSTREAM_RULE.replace('"POST"]', '"POST"]\nmax_body = 1024'),
        'host = "getonly.test"\nports = [80]',
        *(f'host = "{n}.test"\nports = [80, 443]' for n in REFUSED_ADDRESSES),
        allow_cidrs=f'["{UPSTREAM_CIDR}"]',
    )
    + '[[egress.deny]]\nhost = "blocked.test"\n'
)


def test_each_denial_has_its_status_request_id_and_audit_line(world, tmp_path, state):
    before = world.up.counts()
    fill = {"upstream": world.addr, "host_end": str(world.up.host_addr)}
    refused = {
        name: tuple(x.format(**fill) for x in spec) for name, spec in REFUSED_ADDRESSES.items()
    }
    pins = {"upstream.test": world.addr, "getonly.test": world.addr}
    pins.update({f"{name}.test": spec[0] for name, spec in refused.items()})
    egress = parse_policy(DENIALS_POLICY).egress
    for literal in LITERALS:  # offline first: the policy refuses every one of them
        host = literal.strip("[]")
        assert not decide(egress, Request("GET", host, 80)).allowed
        assert not decide(egress, Request("CONNECT", host, 443)).allowed
    run = sandbox_run(
        world,
        tmp_path,
        DENIALS_SCRIPT,
        policy=DENIALS_POLICY,
        pins=pins,
        env={"LITERALS": json.dumps(LITERALS), "REFUSED_NAMES": json.dumps(list(refused))},
    )
    r = run.out

    def denied(key: str, status: int, rule: str) -> dict:
        resp = r[key]
        assert resp["status"] == status, (key, resp)
        line = run.audit_for(resp["request_id"])
        assert (line["decision"], line["rule"], line["status"]) == ("deny", rule, status), line
        assert f"rule: {rule}" in resp["body"] and resp["request_id"] in resp["body"]
        assert resp["headers"]["connection"] == "close"
        return line

    line = denied("host", 403, "default-deny")
    assert (line["host"], line["port"], line["method"]) == ("notallowed.test", 80, "GET")
    assert "--allow notallowed.test:80" in r["host"]["body"]  # how to allow it
    assert r["host_curl"]["rc"] == 0 and r["host_curl"]["stdout"].startswith("HTTP/1.1 403")
    assert r["host_curl_https"]["rc"] == 56 and "403" in r["host_curl_https"]["stderr"]
    denied("deny_rule", 403, "egress.deny[0]")
    assert "port 8080 is not in ports" in denied("port", 403, "egress.allow[0]")["reason"]
    denied("port_connect", 403, "egress.allow[0]")
    assert "CONNECT to port 80" in denied("connect_80", 403, "egress.allow[0]")["reason"]
    assert "plain HTTP to port 443" in denied("plain_443", 403, "egress.allow[0]")["reason"]
    assert "method POST" in denied("method", 403, "egress.allow[1]")["reason"]
    denied("trace", 403, "egress.allow[0]")
    assert "exceeds max_body 1024" in denied("max_body", 413, "egress.allow[0]")["reason"]
    denied("max_body_chunked", 413, "egress.allow[0]")

    for name, (_, klass, addr) in refused.items():
        line = denied(f"addr_{name}", 403, f"address.{klass}")
        assert addr in line["reason"] and line["addr"] is None, line
    line = denied("addr_meta_connect", 403, "address.metadata")
    assert (line["method"], line["port"]) == ("CONNECT", 443)
    # (Python 3.11 writes ::ffff:10.0.0.1 as ::ffff:a00:1; 3.13 keeps the dotted quad.)
    assert run.audit_for(r["addr_mapped"]["request_id"])["reason"].startswith("IPv4-mapped ::ffff:")

    literals = [k for k in r if k.startswith("literal")]
    assert len(literals) == 2 * (len(LITERALS) + 1)
    for key in literals:
        line = denied(key, 403, "default-deny")
        assert "is an IP address" in line["reason"], line
    # Even a literal inside --allow-cidr is refused: policies allow names, never addresses.
    assert run.audit_for(r[f"literal {world.addr}"]["request_id"])["host"] == world.addr

    assert r["control"]["status"] == 200
    assert [q.target for q in new_requests(world, before)] == ["/after-denials"]
    assert since(world, before)["http"].connections == 1
    assert all(c.connections == 0 for k, c in since(world, before).items() if k != "http")


RATE_SCRIPT = r"""
from sgclient import *
emit({"statuses": [get(f"http://upstream.test/rate{i}") for i in range(4)]})
"""


def test_rate_limit_is_429(world, tmp_path, state):
    before = world.up.counts()
    policy = policy_toml(UPSTREAM_RULE, rate=1, burst=2)
    run = sandbox_run(
        world, tmp_path, RATE_SCRIPT, policy=policy, pins={"upstream.test": world.addr}
    )
    responses = run.out["statuses"]
    assert [x["status"] for x in responses[:2]] == [200, 200]
    assert responses[3]["status"] == 429, responses
    line = run.audit_for(responses[3]["request_id"])
    assert (line["rule"], line["status"], line["decision"]) == ("egress.rate", 429, "deny")
    assert "rule: egress.rate" in responses[3]["body"]
    ok = sum(x["status"] == 200 for x in responses)
    assert since(world, before)["http"].requests == ok


CAP_AND_BUDGET_SCRIPT = r"""
import time
from sgclient import *

r = {}
t1, h1 = tunnel("upstream.test:7000")
t2, h2 = tunnel("upstream.test:7000")
r["open"] = [h1["status"], h2["status"]]
t1.sendall(b"ping")
r["echo"] = t1.recv(16).decode()
r["third"] = tunnel("upstream.test:7000")[1]
r["plain_at_cap"] = get("http://upstream.test/at-cap")
# "Why was I denied" still answers at the cap (the API is served before the cap check).
r["api_at_cap"] = exchange(b"GET /_sandgate/v1/denials HTTP/1.1\r\nHost: sandgate\r\n\r\n",
                           unix=True)
t1.close(); t2.close()
r["after_close"] = None
for _ in range(50):
    s, head = tunnel("upstream.test:7000")
    if s is not None:
        s.close()
        r["after_close"] = 200
        break
    time.sleep(0.1)
time.sleep(0.3)

# Upload budget (64 KiB for the sandbox's life): a POST declaring more is refused
# before anything is dialed; a tunnel that uploads more is cut.
r["big_post"] = get("http://upstream.test/upload", method="POST", body=b"x" * 100_000)
s, head = tunnel("upstream.test:7001")
r["sink_connect"] = head["status"]
sent, error = 0, None
try:
    for _ in range(64):
        s.sendall(b"y" * 16384)
        sent += 16384
    s.shutdown(socket.SHUT_WR)
    s.settimeout(5)
    r["sink_eof"] = s.recv(10) == b""
except OSError as e:
    error = type(e).__name__
r["sink_sent"], r["sink_error"] = sent, error
s.close()
emit(r)
"""


def test_connection_cap_and_upload_budget(world, tmp_path, state):
    before = world.up.counts()
    policy = policy_toml(UPSTREAM_RULE, max_connections=2, upload_budget='"64K"')
    run = sandbox_run(
        world, tmp_path, CAP_AND_BUDGET_SCRIPT, policy=policy, pins={"upstream.test": world.addr}
    )
    r = run.out
    assert r["open"] == [200, 200] and r["echo"] == "ping"
    for key in ("third", "plain_at_cap"):
        assert r[key]["status"] == 429, r[key]
        line = run.audit_for(r[key]["request_id"])
        assert (line["rule"], line["status"]) == ("egress.max_connections", 429)
    assert r["api_at_cap"]["status"] == 200
    at_cap = json.loads(r["api_at_cap"]["body"])["denials"]
    assert [d["request_id"] for d in at_cap] == [
        r["third"]["request_id"],
        r["plain_at_cap"]["request_id"],
    ]
    assert r["after_close"] == 200, "a connection slot did not come back after closing"

    assert r["big_post"]["status"] == 429, r["big_post"]
    line = run.audit_for(r["big_post"]["request_id"])
    assert (line["rule"], line["status"], line["bytes_up"]) == ("egress.upload_budget", 429, 0)
    assert line["addr"] is None  # refused on its Content-Length, before dialing
    assert "upload_budget" in r["big_post"]["body"]
    assert not [q for q in new_requests(world, before) if q.target == "/upload"]

    # The tunnel to the sink was opened, then cut when the budget ran out.
    assert r["sink_connect"] == 200
    assert r["sink_error"] is not None or r.get("sink_eof") is True, r
    cut = [a for a in run.audit if a["port"] == 7001]
    assert len(cut) == 1 and cut[0]["rule"] == "egress.upload_budget", cut
    assert cut[0]["decision"] == "deny" and cut[0]["status"] == 200
    deadline = time.monotonic() + 3  # the sink's thread may still be reading the last bytes
    while since(world, before)["sink"].bytes < cut[0]["bytes_up"] and time.monotonic() < deadline:
        time.sleep(0.02)
    sink = since(world, before)["sink"]
    assert sink.connections == 1 and sink.bytes <= 64 * 1024, sink
    assert sink.bytes == cut[0]["bytes_up"]
    assert sum(a["bytes_up"] for a in run.audit) <= 64 * 1024


# --- 3. malformed requests, raw from inside: 400 and nothing reaches the upstream ------


def _raw(line: str, *headers: str, body: bytes = b"", host: str | None = "upstream.test") -> bytes:
    head = [line, *([f"Host: {host}"] if host else []), *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def _u(case: str) -> str:
    return f"http://upstream.test/m/{case}"


CHUNKED = "Transfer-Encoding: chunked"
MALFORMED: dict[str, tuple[bytes, int]] = {
    "cl_and_te": (
        _raw(f"POST {_u('cl_and_te')} HTTP/1.1", "Content-Length: 5", CHUNKED, body=b"0\r\n\r\n"),
        400,
    ),
    "two_content_lengths": (
        _raw(
            f"POST {_u('two_cl')} HTTP/1.1",
            "Content-Length: 5",
            "Content-Length: 5",
            body=b"hello",
        ),
        400,
    ),
    "content_length_list": (
        _raw(f"POST {_u('cl_list')} HTTP/1.1", "Content-Length: 5, 5", body=b"hello"),
        400,
    ),
    "te_not_chunked": (
        _raw(
            f"POST {_u('te_gzip')} HTTP/1.1",
            "Transfer-Encoding: gzip, chunked",
            body=b"5\r\nhello\r\n0\r\n\r\n",
        ),
        400,
    ),
    "te_twice": (
        _raw(f"POST {_u('te_twice')} HTTP/1.1", CHUNKED, CHUNKED, body=b"0\r\n\r\n"),
        400,
    ),
    "te_in_http10": (
        _raw(f"POST {_u('te10')} HTTP/1.0", CHUNKED, body=b"0\r\n\r\n"),
        400,
    ),
    "bad_chunk_size": (
        _raw(f"POST {_u('chunk_size')} HTTP/1.1", CHUNKED, body=b"zz\r\nhello\r\n0\r\n\r\n"),
        400,
    ),
    "chunk_extension": (
        _raw(f"POST {_u('chunk_ext')} HTTP/1.1", CHUNKED, body=b"5;a=b\r\nhello\r\n0\r\n\r\n"),
        400,
    ),
    "bad_chunk_ending": (
        _raw(f"POST {_u('chunk_end')} HTTP/1.1", CHUNKED, body=b"5\r\nhelloXX0\r\n\r\n"),
        400,
    ),
    "chunked_trailer": (
        _raw(f"POST {_u('trailer')} HTTP/1.1", CHUNKED, body=b"5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n"),
        400,
    ),
    "bare_cr": (
        f"GET {_u('bare_cr')} HTTP/1.1\r\nHost: upstream.test\rX-A: 1\r\n\r\n".encode(),
        400,
    ),
    "bare_lf": (f"GET {_u('bare_lf')} HTTP/1.1\nHost: upstream.test\n\n".encode(), 400),
    "nul_byte": (_raw(f"GET {_u('nul')} HTTP/1.1", "X-A: a\x00b"), 400),
    "control_byte": (_raw(f"GET {_u('ctl')} HTTP/1.1", "X-A: a\x01b"), 400),
    "folded_header": (_raw(f"GET {_u('folded')} HTTP/1.1", "X-A: a", "  b"), 400),
    "space_before_colon": (_raw(f"GET {_u('space')} HTTP/1.1", "X-A : b"), 400),
    "duplicate_host": (_raw(f"GET {_u('dup_host')} HTTP/1.1", "Host: upstream.test"), 400),
    "host_mismatch": (_raw(f"GET {_u('mismatch')} HTTP/1.1", host="other.test"), 400),
    "host_port_mismatch": (
        _raw(f"GET {_u('mismatch_port')} HTTP/1.1", host="upstream.test:81"),
        400,
    ),
    "missing_host": (_raw(f"GET {_u('no_host')} HTTP/1.1", host=None), 400),
    "long_request_line": (_raw(f"GET {_u('long')}{'a' * 9000} HTTP/1.1"), 400),
    "too_many_headers": (
        _raw(f"GET {_u('many')} HTTP/1.1", *(f"X-H{i}: v" for i in range(101))),
        400,
    ),
    "huge_header_block": (_raw(f"GET {_u('huge')} HTTP/1.1", "X-Big: " + "b" * 40_000), 400),
    "connection_authorization": (
        _raw(f"GET {_u('conn_auth')} HTTP/1.1", "Authorization: x", "Connection: Authorization"),
        400,
    ),
    "connection_host": (_raw(f"GET {_u('conn_host')} HTTP/1.1", "Connection: close, Host"), 400),
    "connection_content_length": (
        _raw(
            f"POST {_u('conn_cl')} HTTP/1.1",
            "Content-Length: 5",
            "Connection: Content-Length",
            body=b"hello",
        ),
        400,
    ),
    "userinfo_in_url": (
        _raw("GET http://u:p@upstream.test/m/userinfo HTTP/1.1"),
        400,
    ),
    "https_absolute_form": (_raw("GET https://upstream.test/m/https HTTP/1.1"), 400),
    "origin_form_on_tcp": (_raw("GET /m/origin HTTP/1.1"), 400),
    "fragment": (_raw(f"GET {_u('frag')}#x HTTP/1.1"), 400),
    "two_spaces": (_raw(f"GET  {_u('spaces')} HTTP/1.1"), 400),
    "connect_with_body": (
        _raw("CONNECT upstream.test:443 HTTP/1.1", "Content-Length: 5", host="upstream.test:443")
        + b"hello",
        400,
    ),
    "http_2_0": (_raw(f"GET {_u('h2')} HTTP/2.0"), 505),
    "upgrade": (_raw(f"GET {_u('ws')} HTTP/1.1", "Connection: Upgrade", "Upgrade: websocket"), 501),
}

MALFORMED_SCRIPT = r"""
import base64, json, os
from sgclient import *

cases = json.loads(os.environ["CASES"])
r = {name: exchange(base64.b64decode(raw)) for name, raw in cases.items()}
r["_control"] = get("http://upstream.test/m/control")
emit(r)
"""


@dataclass(frozen=True)
class MalformedRun:
    run: Run
    before: dict[str, Counts]
    delta: dict[str, Counts]
    requests: list[SeenRequest]


@pytest.fixture(scope="module")
def malformed(world, tmp_path_factory) -> Iterator[MalformedRun]:
    """Every malformed case, each on its own connection, in ONE sandbox run."""
    workdir = tmp_path_factory.mktemp("malformed")
    cases = {name: base64.b64encode(raw).decode() for name, (raw, _) in MALFORMED.items()}
    before = world.up.counts()
    try:
        run = sandbox_run(
            world,
            workdir,
            MALFORMED_SCRIPT,
            policy=policy_toml(UPSTREAM_RULE),
            pins={"upstream.test": world.addr},
            env={"CASES": json.dumps(cases)},
        )
        yield MalformedRun(run, before, since(world, before), new_requests(world, before))
    finally:
        _remove_kept(workdir / "state")


def test_malformed_control_request_passes(malformed):
    """The same sandbox, policy and target do work: the refusals are the parser's."""
    assert malformed.run.out["_control"]["status"] == 200
    assert [q.target for q in malformed.requests] == ["/m/control"]
    # The upstream saw exactly one connection (the control) and no byte of any case.
    assert malformed.delta["http"].connections == 1
    assert all(
        c.connections == 0 and c.bytes == 0 for k, c in malformed.delta.items() if k != "http"
    )
    assert malformed.delta["http"].bytes == len(
        b"GET /m/control HTTP/1.1\r\nHost: upstream.test\r\nConnection: close\r\n\r\n"
    )


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_request_is_refused_and_reaches_nothing(malformed, case):
    expected = MALFORMED[case][1]
    resp = malformed.run.out[case]
    assert resp["status"] == expected, resp
    line = malformed.run.audit_for(resp["request_id"])
    assert (line["decision"], line["rule"], line["status"]) == ("deny", "http.malformed", expected)
    assert line["addr"] is None and line["bytes_up"] == 0, line
    assert f"request id: {resp['request_id']}" in resp["body"]
    assert not [q for q in malformed.requests if q.target != "/m/control"], malformed.requests
    assert malformed.delta["http"].connections <= 1


# --- 4. secrets never reach the audit log ------------------------------------------------

SECRETS_SCRIPT = r"""
import base64, os
from sgclient import *

P, A, U = os.environ["PROXY_SECRET"], os.environ["AUTH_SECRET"], os.environ["URL_SECRET"]
CA = os.environ["CA"]
pa = "Proxy-Authorization: Basic " + base64.b64encode(f"puser:{P}".encode()).decode()
au = f"Authorization: Bearer {A}"
r = {}
curl = ("curl", "-sS", "-i", "-U", f"puser:{P}", "-H", au, "--cacert", CA)
r["curl_http"] = run(*curl, "http://upstream.test/s-http")
r["curl_https"] = run(*curl, "https://upstream.test/s-https")
r["curl_denied"] = run(*curl, "http://notallowed.test/s-denied")
r["curl_denied_https"] = run(*curl, "https://notallowed.test/s-denied")
r["curl_url_password"] = run("curl", "-sS", "-i", f"http://user:{U}@upstream.test/s-url")
r["curl_url_password_denied"] = run("curl", "-sS", "-i", f"http://user:{U}@notallowed.test/")
r["raw_userinfo"] = get(f"http://user:{U}@upstream.test/s-raw", pa, au)
r["raw_userinfo_connect"] = tunnel(f"user:{U}@upstream.test:443", pa)[1]
r["raw_denied"] = get("http://notallowed.test/s-raw", pa, au)
r["raw_denied_unix"] = get("http://notallowed.test/s-unix", pa, au, unix=True)
r["raw_allowed_unix"] = get("http://upstream.test/s-unix", pa, au, unix=True)
r["raw_connect_denied"] = tunnel("notallowed.test:443", pa)[1]
r["raw_nul_auth"] = get("http://upstream.test/s-nul", au + "\x00")
r["raw_conn_auth"] = get("http://upstream.test/s-conn", au, "Connection: Authorization")
r["raw_host_secret"] = exchange(
    f"GET http://upstream.test/s-host HTTP/1.1\r\nHost: {U}.test\r\n{au}\r\n\r\n".encode())
r["raw_bad_auth_line"] = exchange(
    f"GET http://upstream.test/s-bad HTTP/1.1\r\nHost: upstream.test\r\nAuthorization : {A}\r\n\r\n"
    .encode())
r["raw_denials_api"] = exchange(
    b"GET /_sandgate/v1/denials HTTP/1.1\r\nHost: sandgate\r\n\r\n", unix=True)
emit(r)
"""


def test_audit_log_never_holds_credentials(world, tmp_path, state):
    before = world.up.counts()
    run = sandbox_run(
        world,
        tmp_path,
        SECRETS_SCRIPT,
        policy=policy_toml(UPSTREAM_RULE),
        pins={"upstream.test": world.addr},
        env=SECRET_ENV,
    )
    r = run.out
    assert r["curl_http"]["stdout"].startswith("HTTP/1.1 200")
    assert "HTTP/1.1 200" in r["curl_https"]["stdout"]
    assert r["curl_url_password"]["stdout"].startswith("HTTP/1.1 200")
    assert r["curl_denied"]["stdout"].startswith("HTTP/1.1 403")
    assert r["curl_denied_https"]["rc"] == 56
    assert r["raw_allowed_unix"]["status"] == 200
    for key, status in (
        ("raw_userinfo", 400),
        ("raw_userinfo_connect", 400),
        ("raw_denied", 403),
        ("raw_denied_unix", 403),
        ("raw_connect_denied", 403),
        ("raw_nul_auth", 400),
        ("raw_conn_auth", 400),
        ("raw_host_secret", 400),
        ("raw_bad_auth_line", 400),
    ):
        assert r[key]["status"] == status, (key, r[key])
        run.audit_for(r[key]["request_id"])
    assert len(run.audit) >= 15

    for secret in SECRETS:
        assert secret not in run.audit_text, f"the audit log holds {secret!r}"
        # Nor does anything the gateway said to the sandbox (refusal bodies).
        for key in r:
            if key.startswith("raw"):
                assert secret not in json.dumps(r[key]), (key, secret)
    # The credential meant for the upstream got there; the proxy's never did.
    seen = {q.target: q for q in new_requests(world, before)}
    assert seen["/s-http"].header("Authorization") == [f"Bearer {AUTH_SECRET}"]
    assert all(q.header("Proxy-Authorization") == [] for q in seen.values())


# --- 5. one sandbox cannot use another's endpoint --------------------------------------

HOLDER_SCRIPT = r"""
import sys
from sgclient import *
own = get("http://upstream.test/holder")
print(f"{gateway_addr()[0]} {own['status']}", flush=True)
sys.stdin.readline()
emit({"own": own["status"]})
"""

PROBER_SCRIPT = r"""
import errno, os, socket
from sgclient import *
other = os.environ["OTHER_GW"]
r = {}
for port in (3128, 80):
    try:
        s = socket.create_connection((other, port), timeout=2)
        s.sendall(b"GET http://upstream.test/stolen HTTP/1.1\r\nHost: upstream.test\r\n\r\n")
        r[f"direct_{port}"] = "connected: " + repr(s.recv(100))
        s.close()
    except OSError as e:
        r[f"direct_{port}"] = f"{type(e).__name__} {errno.errorcode.get(e.errno, e.errno)}"
r["via_own_literal"] = tunnel(f"{other}:3128")[1]
r["via_own_name"] = get("http://othergw.test:3128/")
r["own"] = get("http://upstream.test/prober")
emit(r)
"""


UNREACHABLE = (
    "ENETUNREACH",
    "EHOSTUNREACH",
    "ECONNREFUSED",
    "None",
    "ETIMEDOUT",
    "EACCES",
    "EPERM",
)


def test_a_sandbox_cannot_reach_another_sandboxs_gateway(world, tmp_path, state):
    pins = {"upstream.test": world.addr}
    policy = policy_toml(UPSTREAM_RULE)
    _check_names_pinned(policy, (), pins)
    holder_dir = tmp_path / "holder"
    holder_dir.mkdir()
    args = [SANDGATE, "run", "--state-dir", str(state), "--json"]
    args += ["--audit-log", str(holder_dir / "audit.jsonl"), "--ro", str(world.share)]
    args += ["--allow-cidr", UPSTREAM_CIDR, "--resolve", f"upstream.test={world.addr}"]
    (holder_dir / "p.toml").write_text(policy)
    args += ["--policy", str(holder_dir / "p.toml"), "-e", f"PYTHONPATH={world.share}"]
    holder = subprocess.Popen(
        [*args, "--", "python3", "-c", HOLDER_SCRIPT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready: list[str] = []
        reader = threading.Thread(target=lambda: ready.append(holder.stdout.readline()))
        reader.start()
        reader.join(30)
        assert ready and ready[0].strip(), "the holder sandbox did not start"
        other_gw, own_status = ready[0].split()
        assert own_status == "200"  # B's gateway is up and serving B
        assert ip_address(other_gw) in POOL

        prober = sandbox_run(
            world,
            tmp_path,
            PROBER_SCRIPT,
            name="prober",
            policy=policy_toml(UPSTREAM_RULE, 'host = "othergw.test"\nports = [3128]'),
            pins={"upstream.test": world.addr, "othergw.test": other_gw},
            env={"OTHER_GW": other_gw},
        )
    finally:
        _, err = holder.communicate("\n", timeout=30)
    assert holder.returncode == 0, err
    r = prober.out
    # A's packets to B's host end die in A's own netns/firewall: no route, or dropped.
    # (Seen here: "OSError ENETUNREACH": A's netns has no route beyond its own /31.)
    for port in (3128, 80):
        assert not r[f"direct_{port}"].startswith("connected"), r
        assert r[f"direct_{port}"].split()[-1] in UNREACHABLE, r
    # Nor can A ask its own gateway to dial B's: a literal is refused, and a name for
    # that address is the gateway's own (every sandbox's TCP listener is "self").
    assert r["via_own_literal"]["status"] == 403
    assert r["via_own_name"]["status"] == 403
    line = prober.audit_for(r["via_own_name"]["request_id"])
    assert line["rule"] == "address.self", line
    assert r["own"]["status"] == 200
    # B's gateway never saw a request from A: its audit holds only B's own.
    b_audit = [json.loads(x) for x in (holder_dir / "audit.jsonl").read_text().splitlines()]
    assert [a["path"] for a in b_audit] == ["/holder"], b_audit


# --- 6. the in-sandbox API: Unix socket only ---------------------------------------------

API_SCRIPT = r"""
import json
from sgclient import *
r = {}
r["denied"] = get("http://notallowed.test/api-denied")
paths = (("policy", "/_sandgate/v1/policy"), ("denials", "/_sandgate/v1/denials"))
for name, path in paths:
    raw = exchange(f"GET {path} HTTP/1.1\r\nHost: sandgate\r\n\r\n".encode(), unix=True)
    r[name] = raw
    r[name + "_json"] = json.loads(raw["body"]) if raw["status"] == 200 else None
for name, path in paths:
    r[name + "_tcp_origin"] = exchange(f"GET {path} HTTP/1.1\r\nHost: sandgate\r\n\r\n".encode())
    r[name + "_tcp_absolute"] = get(f"http://sandgate{path}")
    r[name + "_unix_absolute"] = get(f"http://sandgate{path}", unix=True)
r["post"] = exchange(b"POST /_sandgate/v1/policy HTTP/1.1\r\nHost: sandgate\r\n"
                     b"Content-Length: 0\r\n\r\n", unix=True)
r["unknown"] = exchange(b"GET /_sandgate/v1/nothing HTTP/1.1\r\nHost: sandgate\r\n\r\n", unix=True)
r["curl_hint"] = run("curl", "-sS", "--unix-socket", "/run/sandgate/gateway.sock",
                     "http://sandgate/_sandgate/v1/policy")
r["denials_again"] = json.loads(exchange(
    b"GET /_sandgate/v1/denials HTTP/1.1\r\nHost: sandgate\r\n\r\n", unix=True)["body"])
emit(r)
"""


def test_in_sandbox_api_answers_on_the_unix_socket_only(world, tmp_path, state):
    run = sandbox_run(
        world,
        tmp_path,
        API_SCRIPT,
        policy=policy_toml(UPSTREAM_RULE),
        pins={"upstream.test": world.addr},
    )
    r = run.out
    denied_id = r["denied"]["request_id"]
    assert r["denied"]["status"] == 403 and denied_id

    assert r["policy"]["status"] == 200
    assert r["policy"]["headers"]["content-type"] == "application/json"
    egress = r["policy_json"]["egress"]
    assert [a["host"] for a in egress["allow"]] == ["upstream.test"]
    assert egress["allow"][0]["connect_ports"] == [443, 7000, 7001]
    assert egress["allow"][0]["http_ports"] == [80, 7000, 7001]
    assert egress["allow_cidrs"] == [UPSTREAM_CIDR] and egress["default"] == "deny"
    assert json.loads(r["curl_hint"]["stdout"]) == r["policy_json"]

    denials = r["denials_json"]["denials"]
    assert [d["request_id"] for d in denials] == [denied_id]
    assert denials[0]["host"] == "notallowed.test" and denials[0]["rule"] == "default-deny"
    assert denials[0] == run.audit_for(denied_id)

    for name in ("policy", "denials"):
        # Over TCP, origin-form is malformed for a forward proxy, and absolute-form names
        # a host ("sandgate") that the policy does not allow.
        assert r[f"{name}_tcp_origin"]["status"] == 400
        assert "this is a forward proxy" in r[f"{name}_tcp_origin"]["body"]
        assert r[f"{name}_tcp_absolute"]["status"] == 403
        assert r[f"{name}_unix_absolute"]["status"] == 403
    assert r["post"]["status"] == 405 and r["unknown"]["status"] == 404
    # The API's own calls are not egress: not audited, not denials; the TCP attempts are.
    unix = [(a["host"], a["status"]) for a in run.audit if a["endpoint"] == "unix"]
    assert unix == [("sandgate", 403), ("sandgate", 403)], unix  # the absolute-form two
    ids = {d["request_id"] for d in r["denials_again"]["denials"]}
    assert denied_id in ids and ids == {
        a["request_id"] for a in run.audit if a["decision"] != "allow"
    }
