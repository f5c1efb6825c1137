"""gateway.policy: the policy format, its errors (file:line: field: message), and decide()."""

from __future__ import annotations

import json
from ipaddress import ip_network
from pathlib import Path

import pytest

from gateway.policy import (
    DEFAULT_POLICY,
    GIB,
    MIB,
    AllowRule,
    Decision,
    DenyRule,
    EgressPolicy,
    HostPattern,
    Policy,
    PolicyError,
    PolicyErrors,
    ProcessLimits,
    RepoRule,
    Request,
    decide,
    load_policy,
    normalize_host,
    parse_allow_arg,
    parse_duration,
    parse_policy,
    parse_size,
    policy_summary,
    with_extra,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
EM = "\N{EM DASH}"

FULL = """\
# sandgate policy
[egress]
allow_cidrs = ["10.214.0.0/16", "fd12:3456::/48"]
max_body = "10M"
max_connections = 64
upload_budget = "1G"
rate = 20.0
burst = 40

[[egress.allow]]
host = "packages.example"
ports = [443]
methods = ["GET", "HEAD"]
max_body = "1M"

[[egress.allow]]
host = "*.packages.example"

[[egress.deny]]
host = "upload.packages.example"
ports = []

[limits]
memory = "2G"
pids = 512
cpus = 1.5
timeout = "30m"

[[git.repos]]
url = "https://github.com/org/repo"
access = "write"
[git.repos.push]
refs = ["refs/heads/sandbox/*"]
allow_delete = false
allow_tags = false
max_refs = 10
"""


def errors_of(text: str) -> list[PolicyError]:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "policy.toml")
    return list(info.value.errors)


def only_error(text: str) -> PolicyError:
    errors = errors_of(text)
    assert len(errors) == 1, [str(e) for e in errors]
    return errors[0]


def allow(host: str, **more: str) -> str:
    """A policy with one [[egress.allow]] rule; the host is on line 2."""
    lines = ["[[egress.allow]]", f'host = "{host}"']
    lines += [f"{key} = {value}" for key, value in more.items()]
    return "\n".join(lines) + "\n"


# --- the valid policy ----------------------------------------------------------------


def test_full_policy_parses_into_frozen_types() -> None:
    p = parse_policy(FULL, "policy.toml")
    assert p.name == "policy"
    assert p.source == "policy.toml"
    assert p.egress == EgressPolicy(
        allow=(
            AllowRule(HostPattern("packages.example", False), (443,), ("GET", "HEAD"), MIB, 0),
            AllowRule(HostPattern("*.packages.example", True), (80, 443), ("GET", "HEAD"), None, 1),
        ),
        deny=(DenyRule(HostPattern("upload.packages.example", False), (), 0),),
        allow_cidrs=(ip_network("10.214.0.0/16"), ip_network("fd12:3456::/48")),
        max_body=10 * MIB,
        max_connections=64,
        upload_budget=GIB,
        rate=20.0,
        burst=40,
    )
    assert p.limits == ProcessLimits(memory=2 * GIB, pids=512, cpus=1.5, timeout=1800.0)
    assert p.repos == (
        RepoRule(
            url="https://github.com/org/repo",
            host="github.com",
            path="/org/repo",
            access="write",
            refs=("refs/heads/sandbox/*",),
            allow_delete=False,
            allow_tags=False,
            max_refs=10,
        ),
    )
    with pytest.raises(AttributeError):
        p.name = "other"  # type: ignore[misc]
    assert hash(p)


def test_empty_policy_is_the_defaults() -> None:
    p = parse_policy("")
    assert p.egress == EgressPolicy() == DEFAULT_POLICY.egress
    assert p.limits == ProcessLimits()
    assert p.repos == ()
    assert (p.name, p.source) == ("inline", "<string>")


def test_name_override() -> None:
    assert parse_policy("", "/etc/sandgate/ci.toml").name == "ci"
    assert parse_policy("", "x.toml", name="build").name == "build"


def test_inline_tables_are_accepted() -> None:
    p = parse_policy('egress = { max_body = "1K", allow = [{ host = "a.example" }] }')
    assert p.egress.max_body == 1024
    assert p.egress.allow[0].host.text == "a.example"


def test_read_repo_defaults() -> None:
    p = parse_policy('[[git.repos]]\nurl = "https://git.example/a/b.git/"\n')
    assert p.repos == (RepoRule("https://git.example/a/b", "git.example", "/a/b", "read"),)


def test_unicode_host_in_a_rule_is_stored_as_its_a_label() -> None:
    p = parse_policy(allow("BÜCHER.example."))
    assert p.egress.allow[0].host.text == "xn--bcher-kva.example"


# --- error messages ------------------------------------------------------------------


def test_error_message_names_file_line_and_field() -> None:
    text = (
        "# sandgate policy\n"
        "[[egress.allow]]\n"
        'host = "a.example"\n'
        "\n"
        "[[egress.allow]]\n"
        'host = "b.example"\n'
        "ports = [443]\n"
        "\n"
        "\n"
        "[[egress.allow]]\n"
        "ports = [443]\n"
        'host = "*.*.com"\n'
    )
    err = only_error(text)
    assert str(err) == (
        f"policy.toml:12: egress.allow[2].host: '*.*.com' {EM} only a leading '*.' is allowed"
    )
    assert (err.path, err.line, err.field) == ("policy.toml", 12, "egress.allow[2].host")
    assert err.as_dict() == {
        "path": "policy.toml",
        "line": 12,
        "column": None,
        "field": "egress.allow[2].host",
        "message": f"'*.*.com' {EM} only a leading '*.' is allowed",
    }


def test_unknown_top_level_key() -> None:
    err = only_error("[egress]\n\n[egres]\nmax_body = 1\n")
    assert err.line == 3
    assert err.field == "egres"
    assert "unknown key 'egres'" in err.message
    assert "did you mean 'egress'?" in err.message
    assert "egress, limits, mounts, git" in err.message


def test_unknown_key_in_an_allow_rule() -> None:
    err = only_error(allow("a.example", hots='"b.example"'))
    assert str(err).startswith("policy.toml:3: egress.allow[0].hots: unknown key 'hots'")
    assert "host, ports, methods, max_body" in err.message


@pytest.mark.parametrize(
    ("where", "text"),
    [
        ("egress.maxbody", "[egress]\nmaxbody = 1\n"),
        ("egress.deny[0].methods", '[[egress.deny]]\nhost = "a.example"\nmethods = ["GET"]\n'),
        ("limits.memroy", '[limits]\nmemroy = "1G"\n'),
        ("git.token", '[git]\ntoken = "x"\n'),
        ("git.repos[0].acess", '[[git.repos]]\nurl = "https://g.example/a/b"\nacess = "read"\n'),
        (
            "git.repos[0].push.force",
            '[[git.repos]]\nurl = "https://g.example/a/b"\naccess = "write"\n'
            '[git.repos.push]\nrefs = ["refs/heads/x"]\nforce = true\n',
        ),
    ],
)
def test_unknown_keys_everywhere(where: str, text: str) -> None:
    err = only_error(text)
    assert err.field == where
    assert err.message.startswith("unknown key")
    assert err.line == text.count("\n")


@pytest.mark.parametrize(
    ("host", "why"),
    [
        ("*.*.com", "only a leading '*.' is allowed"),
        ("foo*.com", "only a leading '*.' is allowed"),
        ("*foo.com", "only a leading '*.' is allowed"),
        ("a.*.example", "only a leading '*.' is allowed"),
        ("*", "a bare '*'"),
        ("*.com", "a wildcard directly over a top-level domain"),
        ("*.", "empty host name"),
        ("10.0.0.1", "an IP address literal"),
        ("0x7f.1", "an IP address literal"),
        ("2130706433", "an IP address literal"),
        ("[::1]", "an IP address literal"),
        ("fe80::1%eth0", "an IP address literal"),
        ("a.123", "the last label is all digits"),
        ("", "empty host name"),
        ("a..example", "empty label"),
        (".a.example", "empty label"),
        ("a_b.example", "letters, digits and hyphens"),
        ("-a.example", "letters, digits and hyphens"),
        ("a-.example", "letters, digits and hyphens"),
        ("a b.example", "no whitespace"),
        ("a" * 64 + ".example", "labels of 1 to 63 characters"),
        (".".join(["a" * 63] * 4) + ".example", "longer than 253"),
        ("straße.example", "does not round-trip through IDNA"),
        ("xn--zz.example", "'xn--' label must be valid punycode"),
    ],
)
def test_bad_hosts(host: str, why: str) -> None:
    err = only_error(allow(host))
    assert err.field == "egress.allow[0].host"
    assert err.line == 2
    assert err.message.startswith(f"{host!r} {EM} ")
    assert why in err.message


def test_host_of_the_wrong_type_and_missing_host() -> None:
    err = only_error('[[egress.allow]]\nhost = ["a.example"]\n')
    assert err.message == "['a.example'] \N{EM DASH} expected a string, got an array"
    err = only_error("[[egress.allow]]\nports = [443]\n")
    assert (err.field, err.line, err.message) == (
        "egress.allow[0].host",
        1,
        "missing required key 'host'",
    )


@pytest.mark.parametrize(
    ("ports", "field", "why"),
    [
        ("[0]", "egress.allow[0].ports[0]", "0 \N{EM DASH} a port is 1 to 65535"),
        ("[443, 70000]", "egress.allow[0].ports[1]", "70000 \N{EM DASH} a port is 1 to 65535"),
        ("[443, 443]", "egress.allow[0].ports[1]", "443 \N{EM DASH} listed twice"),
        ('["443"]', "egress.allow[0].ports[0]", "expected a port number, got a string"),
        ("[true]", "egress.allow[0].ports[0]", "expected a port number, got a boolean"),
        ("443", "egress.allow[0].ports", "expected an array, got an integer"),
        ("[]", "egress.allow[0].ports", "empty: this rule would allow nothing"),
    ],
)
def test_bad_ports(ports: str, field: str, why: str) -> None:
    err = only_error(allow("a.example", ports=ports))
    assert (err.field, err.line) == (field, 3)
    assert why in err.message


@pytest.mark.parametrize(
    ("methods", "why"),
    [
        ('["FETCH"]', "'FETCH' \N{EM DASH} not a method the gateway forwards"),
        ('["TRACE"]', "'TRACE' \N{EM DASH} not a method the gateway forwards"),
        ('["get"]', "methods are case-sensitive; write 'GET'"),
        ('["CONNECT"]', "CONNECT is not listed"),
        ('["GET", "GET"]', "'GET' \N{EM DASH} listed twice"),
        ("[1]", "expected a method name, got an integer"),
    ],
)
def test_bad_methods(methods: str, why: str) -> None:
    err = only_error(allow("a.example", methods=methods))
    assert err.field.startswith("egress.allow[0].methods[")
    assert err.line == 3
    assert why in err.message


@pytest.mark.parametrize(
    ("key", "value", "why"),
    [
        ("max_body", '"10Q"', "'10Q' \N{EM DASH} not a size"),
        ("max_body", '"10 M"', "not a size"),
        ("max_body", '"-1"', "not a size"),
        ("max_body", "-1", "a size cannot be negative"),
        ("max_body", "1.5", "expected a size"),
        ("upload_budget", '"1g"', "not a size"),
        ("max_connections", "0", "must be at least 1"),
        ("max_connections", '"64"', "expected an integer, got a string"),
        ("burst", "true", "expected an integer, got a boolean"),
        ("rate", "0", "must be a finite number above 0"),
        ("rate", "nan", "must be a finite number above 0"),
        ("rate", "inf", "must be a finite number above 0"),
        ("rate", '"20"', "expected a number, got a string"),
        ("allow", '"a.example"', "expected an array of tables"),
        ("deny", "{}", "expected an array of tables"),
    ],
)
def test_bad_egress_values(key: str, value: str, why: str) -> None:
    err = only_error(f"[egress]\n{key} = {value}\n")
    assert (err.field, err.line) == (f"egress.{key}", 2)
    assert why in err.message


@pytest.mark.parametrize(
    ("cidr", "why"),
    [
        ('"10.214.0.1/16"', "has host bits set; did you mean '10.214.0.0/16'?"),
        ('"10.214.0.0/33"', "not a CIDR"),
        ('"mirror.example"', "not a CIDR"),
        ("10", "expected a CIDR string"),
        ('"0.0.0.0/0"', "it overlaps 0.0.0.0/8 (unspecified)"),
        ('"127.0.0.0/8"', "(loopback), which no policy can open"),
        ('"169.254.0.0/16"', "(link-local)"),
        ('"::/0"', "it overlaps ::/128 (unspecified)"),
        ('"fe80::/10"', "(link-local)"),
        ('"224.0.0.0/4"', "(multicast)"),
        ('"169.254.169.254/32"', "no policy can open"),
        ('"100.100.100.200/32"', "a cloud metadata endpoint"),
    ],
)
def test_bad_allow_cidrs(cidr: str, why: str) -> None:
    err = only_error(f"[egress]\nallow_cidrs = [{cidr}]\n")
    assert (err.field, err.line) == ("egress.allow_cidrs[0]", 2)
    assert why in err.message


def test_wide_ranges_holding_a_metadata_address_are_accepted() -> None:
    # 100.100.100.200 stays refused by gateway.addr; the range itself is legitimate.
    p = parse_policy('[egress]\nallow_cidrs = ["100.64.0.0/10", "fc00::/7"]\n')
    assert len(p.egress.allow_cidrs) == 2


def test_duplicates_are_errors() -> None:
    text = (
        "[egress]\n"
        'allow_cidrs = ["10.1.0.0/16", "10.1.0.0/16"]\n'
        "[[egress.allow]]\n"
        'host = "a.example"\n'
        "[[egress.allow]]\n"
        'host = "A.example."\n'
        "[[egress.deny]]\n"
        'host = "b.example"\n'
        "[[egress.deny]]\n"
        'host = "b.example"\n'
        "[[git.repos]]\n"
        'url = "https://g.example/o/r"\n'
        "[[git.repos]]\n"
        'url = "https://G.example/o/r.git"\n'
    )
    errors = errors_of(text)
    assert [(e.line, e.field) for e in errors] == [
        (2, "egress.allow_cidrs[1]"),
        (6, "egress.allow[1].host"),
        (10, "egress.deny[1].host"),
        (14, "git.repos[1].url"),
    ]
    assert "already named by egress.allow[0]; merge the two rules" in errors[1].message
    assert "already listed as git.repos[0]" in errors[3].message


def test_all_errors_are_collected_in_line_order() -> None:
    text = (
        "[limits]\n"
        'memory = "lots"\n'
        "[egress]\n"
        'max_body = "10Q"\n'
        "[[egress.allow]]\n"
        'host = "*.*.com"\n'
        "ports = [0]\n"
    )
    with pytest.raises(PolicyErrors) as info:
        parse_policy(text, "policy.toml")
    e = info.value
    assert [err.line for err in e.errors] == [2, 4, 6, 7]
    assert (e.line, e.field) == (2, "limits.memory")
    assert str(e).splitlines() == [str(err) for err in e.errors]
    assert str(e).splitlines()[0].startswith("policy.toml:2: limits.memory: 'lots'")
    assert isinstance(e, PolicyError)


def test_toml_syntax_error_has_line_and_column() -> None:
    err = only_error('[egress]\nmax_body = "10M"\nrate = \n')
    assert (err.line, err.column, err.field) == (3, 8, "")
    assert str(err) == "policy.toml:3:8: TOML syntax error: Invalid value"


def test_toml_duplicate_key_is_a_syntax_error() -> None:
    err = only_error("[egress]\nburst = 1\nburst = 2\n")
    assert err.line == 3
    assert "TOML syntax error" in err.message


@pytest.mark.parametrize(
    ("body", "field", "why"),
    [
        ('memory = "512"', "limits.memory", "less than 1M"),
        ('memory = "2X"', "limits.memory", "not a size"),
        ("pids = 0", "limits.pids", "must be at least 1"),
        ("pids = 1.5", "limits.pids", "expected an integer, got a float"),
        ("cpus = 0", "limits.cpus", "above 0"),
        ('cpus = "2"', "limits.cpus", "expected a number"),
        ('timeout = "30"', "limits.timeout", "not a duration"),
        ('timeout = "1d"', "limits.timeout", "not a duration"),
        ('timeout = "0s"', "limits.timeout", "must be longer than 0s"),
        ("timeout = -5", "limits.timeout", "non-negative"),
        ("timeout = 1979-05-27", "limits.timeout", "not a duration"),
    ],
)
def test_bad_limits(body: str, field: str, why: str) -> None:
    err = only_error(f"[limits]\n{body}\n")
    assert (err.field, err.line) == (field, 2)
    assert why in err.message


def test_limits_accept_plain_numbers() -> None:
    p = parse_policy("[limits]\nmemory = 1073741824\ntimeout = 90\ncpus = 2\n")
    assert p.limits == ProcessLimits(memory=GIB, pids=None, cpus=2.0, timeout=90.0)


REPO = '[[git.repos]]\nurl = "https://github.com/org/repo"\n'


@pytest.mark.parametrize(
    ("text", "field", "why"),
    [
        ("[[git.repos]]\naccess = 'read'\n", "git.repos[0].url", "missing required key 'url'"),
        ('[[git.repos]]\nurl = "http://g.example/o/r"\n', "git.repos[0].url", "https://"),
        ('[[git.repos]]\nurl = "git@g.example:o/r"\n', "git.repos[0].url", "https://"),
        ('[[git.repos]]\nurl = "https://u:p@g.example/o/r"\n', "git.repos[0].url", "credentials"),
        ('[[git.repos]]\nurl = "https://g.example:8443/o/r"\n', "git.repos[0].url", "no port"),
        ('[[git.repos]]\nurl = "https://g.example/o/r?x=1"\n', "git.repos[0].url", "no query"),
        ('[[git.repos]]\nurl = "https://g.example"\n', "git.repos[0].url", "the path must be"),
        ('[[git.repos]]\nurl = "https://g.example/o/../r"\n', "git.repos[0].url", "the path"),
        ('[[git.repos]]\nurl = "https://10.0.0.1/o/r"\n', "git.repos[0].url", "IP address"),
        (REPO + 'access = "admin"\n', "git.repos[0].access", "'read' or 'write'"),
        (REPO + 'access = "write"\n', "git.repos[0].access", "needs a [git.repos.push] table"),
        (REPO + '[git.repos.push]\nrefs = ["refs/heads/x"]\n', "git.repos[0].push", "need access"),
    ],
)
def test_bad_repos(text: str, field: str, why: str) -> None:
    err = only_error(text)
    assert err.field == field
    assert why in err.message
    assert err.line is not None


@pytest.mark.parametrize(
    ("refs", "why"),
    [
        ('["heads/main"]', "starts with 'refs/'"),
        ('["refs/heads/*/x"]', "at most one '*', in the last component"),
        ('["refs/heads/a*b*"]', "at most one '*'"),
        ('["refs/heads/a..b"]', "'..'"),
        ('["refs/heads/a b"]', "no spaces"),
        ('["refs/heads/x.lock"]', ".lock"),
        ('["refs/heads//x"]', "empty path component"),
        ('["refs/heads/x/"]', "empty path component"),
        ('["refs/tags/v*"]', "needs allow_tags = true"),
        ('["refs/heads/x", "refs/heads/x"]', "listed twice"),
        ("[]", "empty: name the refs"),
    ],
)
def test_bad_push_refs(refs: str, why: str) -> None:
    text = REPO + f'access = "write"\n[git.repos.push]\nrefs = {refs}\n'
    err = only_error(text)
    assert err.field.startswith("git.repos[0].push.refs")
    assert err.line == 5
    assert why in err.message


def test_push_refs_are_required_and_tags_need_allow_tags() -> None:
    err = only_error(REPO + 'access = "write"\n[git.repos.push]\nmax_refs = 3\n')
    assert err.field == "git.repos[0].push.refs"
    assert err.line == 4  # the [git.repos.push] header
    p = parse_policy(
        REPO + 'access = "write"\n[git.repos.push]\nrefs = ["refs/tags/v*"]\nallow_tags = true\n'
    )
    assert p.repos[0].refs == ("refs/tags/v*",)
    assert p.repos[0].allow_tags


def test_the_nth_array_table_is_located() -> None:
    text = (
        '[[git.repos]]\nurl = "https://g.example/a/b"\n'
        '[[git.repos]]\nurl = "https://g.example/a/c"\naccess = "write"\n'
        '[git.repos.push]\nrefs = ["refs/heads/ok", "bad"]\n'
    )
    err = only_error(text)
    assert (err.line, err.field) == (7, "git.repos[1].push.refs[1]")


def test_multiline_strings_do_not_confuse_the_locator() -> None:
    text = (
        "[[egress.allow]]\n"
        'host = "a.example"\n'
        '# host = "*.*.com" in a comment\n'
        "[[egress.allow]]\n"
        'host = """\n'
        'host = "x"\n'
        '"""\n'
    )
    err = only_error(text)
    assert (err.line, err.field) == (5, "egress.allow[1].host")


def test_invalid_policy_yields_no_policy_even_with_a_valid_part() -> None:
    with pytest.raises(PolicyError):
        parse_policy(FULL + "\n[limits.extra]\nx = 1\n")


# --- files ---------------------------------------------------------------------------


def test_load_policy_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "build.toml"
    path.write_text(FULL)
    p = load_policy(path)
    assert (p.name, p.source) == ("build", str(path))
    assert p == parse_policy(FULL, str(path))


def test_load_policy_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('[egress]\nmax_body = "10Q"\n')
    with pytest.raises(PolicyError, match=r"p\.toml:2: egress\.max_body: '10Q'"):
        load_policy(path)


def test_load_policy_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read the policy file: No such file"):
        load_policy(tmp_path / "absent.toml")


def test_load_policy_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_bytes(b"[egress]\n# caf\xe9\n")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert info.value.line == 2
    assert "not UTF-8" in str(info.value)


def test_every_example_policy_parses() -> None:
    examples = sorted(EXAMPLES.glob("*.toml"))
    assert {p.name for p in examples} >= {"minimal.toml", "packages.toml", "git.toml"}
    for path in examples:
        policy = load_policy(path)
        assert policy.name == path.stem
        json.dumps(policy_summary(policy))


def test_example_minimal_denies_everything() -> None:
    p = load_policy(EXAMPLES / "minimal.toml")
    assert p.egress.allow == ()
    assert not decide(p.egress, Request("CONNECT", "packages.example", 443)).allowed


def test_example_packages_means_what_its_comments_say() -> None:
    e = load_policy(EXAMPLES / "packages.toml").egress
    assert decide(e, Request("CONNECT", "packages.example", 443)).allowed
    assert decide(e, Request("CONNECT", "cdn.eu.packages.example", 443)).allowed
    assert not decide(e, Request("CONNECT", "upload.packages.example", 443)).allowed
    assert decide(e, Request("GET", "mirror.lan.packages.example", 80, 0)).allowed
    assert not decide(e, Request("POST", "mirror.lan.packages.example", 80, 10)).allowed
    assert not decide(e, Request("CONNECT", "mirror.lan.packages.example", 443)).allowed
    assert not decide(e, Request("GET", "packages.example", 80)).allowed


def test_example_git_has_one_writable_repo() -> None:
    repos = load_policy(EXAMPLES / "git.toml").repos
    assert [(r.url, r.access) for r in repos] == [
        ("https://github.com/example-org/app", "write"),
        ("https://github.com/example-org/shared-lib", "read"),
    ]
    assert repos[0].refs == ("refs/heads/sandbox/*",)


# --- hosts ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "normal"),
    [
        ("BÜCHER.example.", "xn--bcher-kva.example"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("XN--BCHER-KVA.Example", "xn--bcher-kva.example"),
        ("Packages.Example.", "packages.example"),
        ("deadbeef", "deadbeef"),
        ("1e100.example", "1e100.example"),
        ("0x7f.example", "0x7f.example"),
        ("a-b.c-d.example", "a-b.c-d.example"),
    ],
)
def test_normalize_host(given: str, normal: str) -> None:
    assert normalize_host(given) == normal


@pytest.mark.parametrize(
    "bad",
    [
        "",
        ".",
        "a..b",
        "a b",
        "a\tb",
        "127.0.0.1",
        "127.1",
        "[::1]",
        "::1",
        "a_b",
        "*.example",
        "\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.com",  # full-width letters
        "a\u3002example",
        "x" * 254,
    ],
)
def test_normalize_host_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match=EM):
        normalize_host(bad)


def test_host_pattern_matching() -> None:
    exact = HostPattern.parse("packages.example")
    wild = HostPattern.parse("*.Packages.Example.")
    assert wild == HostPattern("*.packages.example", True)
    assert str(wild) == "*.packages.example"
    assert exact.matches("packages.example")
    assert exact.matches("PACKAGES.example.")
    assert not exact.matches("a.packages.example")
    assert not wild.matches("packages.example")
    assert wild.matches("a.packages.example")
    assert wild.matches("a.b.packages.example")
    assert not wild.matches("apackages.example")
    assert not wild.matches("packages.example.evil.example")
    with pytest.raises(ValueError, match=r"'\*\.\*\.com' .* only a leading"):
        HostPattern.parse("*.*.com")


# --- sizes and durations -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [("0", 0), ("512", 512), ("10K", 10240), ("10M", 10 * MIB), ("1G", GIB), (7, 7)],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["10Q", "1.5M", "10k", "M", "", " 1", "1 ", True, -1])
def test_parse_size_rejects(bad: str | int) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("1.5h", 5400.0), (9, 9.0)]
)
def test_parse_duration(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["30", "1d", "m", "-5s", "1h30m", False, float("inf")])
def test_parse_duration_rejects(bad: str | float) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


# --- decide() ------------------------------------------------------------------------

MATRIX = parse_policy(
    """\
[egress]
max_body = "1K"

[[egress.allow]]
host = "packages.example"

[[egress.allow]]
host = "*.packages.example"
ports = [443, 8080]
methods = ["GET", "POST"]
max_body = "4K"

[[egress.allow]]
host = "*.cdn.packages.example"
ports = [443]

[[egress.allow]]
host = "api.example"
ports = [443]

[[egress.deny]]
host = "upload.packages.example"
ports = [443]

[[egress.deny]]
host = "*.internal.packages.example"
""",
    "matrix.toml",
).egress


@pytest.mark.parametrize(
    ("req", "allowed", "rule", "reason"),
    [
        # default ports {80, 443}: 443 only by CONNECT, 80 only by plain HTTP
        (Request("CONNECT", "packages.example", 443), True, "egress.allow[0]", "allowed by"),
        (Request("GET", "packages.example", 80), True, "egress.allow[0]", "allowed by"),
        (Request("HEAD", "packages.example", 80), True, "egress.allow[0]", "allowed by"),
        (
            Request("CONNECT", "packages.example", 80),
            False,
            "egress.allow[0]",
            "CONNECT to port 80",
        ),
        (
            Request("GET", "packages.example", 443),
            False,
            "egress.allow[0]",
            "plain HTTP to port 443",
        ),
        (Request("CONNECT", "packages.example", 22), False, "egress.allow[0]", "port 22 is not in"),
        (Request("POST", "packages.example", 80), False, "egress.allow[0]", "method POST"),
        (Request("get", "packages.example", 80), False, "egress.allow[0]", "method get"),
        # body sizes: the policy's max_body, or the rule's
        (Request("GET", "packages.example", 80, 1024), True, "egress.allow[0]", "allowed"),
        (
            Request("GET", "packages.example", 80, 1025),
            False,
            "egress.allow[0]",
            "exceeds max_body",
        ),
        (Request("POST", "a.packages.example", 8080, 4096), True, "egress.allow[1]", "allowed"),
        (Request("POST", "a.packages.example", 8080, 4097), False, "egress.allow[1]", "4097 bytes"),
        # wildcards: subdomains at any depth, never the apex
        (Request("CONNECT", "a.packages.example", 443), True, "egress.allow[1]", "allowed"),
        (Request("CONNECT", "a.b.packages.example", 8080), True, "egress.allow[1]", "allowed"),
        (Request("CONNECT", "a.packages.example", 80), False, "egress.allow[1]", "port 80 is not"),
        (Request("CONNECT", "xpackages.example", 443), False, "default-deny", "not in the allow"),
        # the most specific rule decides
        (Request("CONNECT", "x.cdn.packages.example", 443), True, "egress.allow[2]", "allowed"),
        (Request("CONNECT", "x.cdn.packages.example", 8080), False, "egress.allow[2]", "port 8080"),
        (Request("CONNECT", "cdn.packages.example", 8080), True, "egress.allow[1]", "allowed"),
        # deny wins, on its ports (none listed: all)
        (Request("CONNECT", "upload.packages.example", 443), False, "egress.deny[0]", "denied by"),
        (Request("POST", "upload.packages.example", 8080), True, "egress.allow[1]", "allowed"),
        (Request("GET", "a.internal.packages.example", 8080), False, "egress.deny[1]", "denied"),
        (Request("CONNECT", "internal.packages.example", 443), True, "egress.allow[1]", "allowed"),
        # not allowed at all
        (Request("CONNECT", "other.example", 443), False, "default-deny", 'host = "other.example"'),
        (Request("CONNECT", "example", 443), False, "default-deny", "not in the allowlist"),
        (Request("CONNECT", "93.184.216.34", 443), False, "default-deny", "IP address"),
        (Request("CONNECT", "0x7f.1", 443), False, "default-deny", "IP address"),
        (Request("CONNECT", "[::1]", 443), False, "default-deny", "IP address"),
        (Request("CONNECT", "packages.example", 0), False, "default-deny", "not a valid TCP port"),
        (Request("GET", "api.example", 80), False, "egress.allow[3]", "port 80 is not in"),
    ],
)
def test_decide_matrix(req: Request, allowed: bool, rule: str, reason: str) -> None:
    d = decide(MATRIX, req)
    assert (d.allowed, d.rule) == (allowed, rule), d
    assert reason in d.reason


def test_decision_carries_the_body_limit_for_plain_http_only() -> None:
    assert decide(MATRIX, Request("GET", "packages.example", 80)).max_body == 1024
    assert decide(MATRIX, Request("GET", "a.packages.example", 8080)).max_body == 4096
    assert decide(MATRIX, Request("CONNECT", "packages.example", 443)).max_body is None
    assert decide(MATRIX, Request("CONNECT", "nowhere.example", 443)).max_body is None


def test_unknown_host_reason_says_how_to_allow_it() -> None:
    d = decide(MATRIX, Request("CONNECT", "mirror.example", 443))
    assert d == Decision(
        False,
        "default-deny",
        'host not in the allowlist; add [[egress.allow]] host = "mirror.example"',
    )


def test_default_policy_denies_everything() -> None:
    assert DEFAULT_POLICY.egress.allow == ()
    assert DEFAULT_POLICY.repos == ()
    assert DEFAULT_POLICY.source is None
    for req in [
        Request("CONNECT", "packages.example", 443),
        Request("GET", "packages.example", 80),
        Request("GET", "localhost", 80),
    ]:
        d = decide(DEFAULT_POLICY.egress, req)
        assert not d.allowed
        assert d.rule == "default-deny"


# --- command-line additions ----------------------------------------------------------


@pytest.mark.parametrize(
    ("arg", "host", "wildcard", "ports"),
    [
        ("packages.example", "packages.example", False, (80, 443)),
        ("Packages.Example:443", "packages.example", False, (443,)),
        ("*.packages.example:8443,443", "*.packages.example", True, (443, 8443)),
        ("bücher.example:80", "xn--bcher-kva.example", False, (80,)),
    ],
)
def test_parse_allow_arg(arg: str, host: str, wildcard: bool, ports: tuple[int, ...]) -> None:
    rule = parse_allow_arg(arg)
    assert rule.host == HostPattern(host, wildcard)
    assert rule.ports == ports
    assert rule.methods == ("GET", "HEAD")
    assert rule.max_body is None
    assert rule.name == "--allow[0]"


@pytest.mark.parametrize(
    ("arg", "why"),
    [
        ("", "empty host name"),
        ("packages.example:", "'' is not a port"),
        ("packages.example:0", "'0' is not a port"),
        ("packages.example:70000", "'70000' is not a port"),
        ("packages.example:https", "'https' is not a port"),
        ("packages.example:443,", "'' is not a port"),
        ("packages.example:+443", "'+443' is not a port"),
        ("packages.example:443,443", "port 443 is listed twice"),
        ("*.*.com:443", "only a leading '*.'"),
        ("*.com", "top-level domain"),
        ("10.0.0.1:443", "IP address literal"),
        ("[::1]:443", "IP address literals are not allowed"),
        ("::1", "IP address literals are not allowed"),
    ],
)
def test_parse_allow_arg_rejects(arg: str, why: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_allow_arg(arg)
    assert str(info.value).startswith(f"--allow {arg!r}")
    assert why in str(info.value)


def test_with_extra_adds_rules_and_ranges_for_one_run() -> None:
    base = parse_policy(allow("packages.example", ports="[443]"), "p.toml")
    p = with_extra(
        base,
        allow=[parse_allow_arg("packages.example:8443"), parse_allow_arg("mirror.example")],
        allow_cidrs=["10.214.0.0/16", ip_network("10.215.0.0/16"), "10.214.0.0/16"],
    )
    assert [r.name for r in p.egress.allow] == ["egress.allow[0]", "--allow[0]", "--allow[1]"]
    assert p.egress.allow_cidrs == (ip_network("10.214.0.0/16"), ip_network("10.215.0.0/16"))
    assert base.egress.allow_cidrs == ()  # the original is untouched
    # equal specificity: the file rule and the --allow rule for one host both apply
    assert decide(p.egress, Request("CONNECT", "packages.example", 443)).rule == "egress.allow[0]"
    assert decide(p.egress, Request("CONNECT", "packages.example", 8443)).rule == "--allow[0]"
    d = decide(p.egress, Request("CONNECT", "packages.example", 9000))
    assert (d.allowed, d.rule) == (False, "egress.allow[0]")
    assert decide(p.egress, Request("CONNECT", "mirror.example", 443)).rule == "--allow[1]"


@pytest.mark.parametrize("cidr", ["127.0.0.0/8", "0.0.0.0/0", "10.0.0.1/8", "nonsense"])
def test_with_extra_rejects_bad_ranges(cidr: str) -> None:
    with pytest.raises(ValueError, match="allow_cidrs"):
        with_extra(DEFAULT_POLICY, allow_cidrs=[cidr])
    with pytest.raises(ValueError):
        with_extra(DEFAULT_POLICY, allow_cidrs=[ip_network("::/0")])


# --- summary -------------------------------------------------------------------------


def test_policy_summary_is_json_and_says_what_is_reachable() -> None:
    summary = policy_summary(parse_policy(FULL, "policy.toml"))
    assert json.loads(json.dumps(summary)) == summary
    egress = summary["egress"]
    assert egress["default"] == "deny"
    assert egress["allow"][0] == {
        "rule": "egress.allow[0]",
        "host": "packages.example",
        "subdomains_only": False,
        "connect_ports": [443],
        "http_ports": [],
        "http_methods": ["GET", "HEAD"],
        "http_max_body": MIB,
    }
    assert egress["allow"][1]["connect_ports"] == [443]
    assert egress["allow"][1]["http_ports"] == [80]
    assert egress["allow"][1]["http_max_body"] == 10 * MIB
    assert egress["deny"] == [
        {"rule": "egress.deny[0]", "host": "upload.packages.example", "ports": "all"}
    ]
    assert egress["allow_cidrs"] == ["10.214.0.0/16", "fd12:3456::/48"]
    assert summary["limits"] == {"memory": 2 * GIB, "pids": 512, "cpus": 1.5, "timeout": 1800.0}
    assert summary["git"]["repos"] == [
        {
            "url": "https://github.com/org/repo",
            "access": "write",
            "push": {
                "refs": ["refs/heads/sandbox/*"],
                "allow_delete": False,
                "allow_tags": False,
                "max_refs": 10,
            },
        }
    ]


def test_default_policy_summary() -> None:
    summary = policy_summary(DEFAULT_POLICY)
    assert summary["name"] == "default"
    assert summary["source"] is None
    assert summary["egress"]["allow"] == []
    assert summary["git"]["repos"] == []


def test_policy_type_is_exported() -> None:
    assert isinstance(DEFAULT_POLICY, Policy)


# --- [mounts] ----------------------------------------------------------------------


def test_mounts_lists_absolute_paths():
    from gateway.policy import parse_policy

    policy = parse_policy('[mounts]\nro = ["/srv/cache"]\nrw = ["/srv/out"]\n')
    assert policy.mounts.ro == ("/srv/cache",) and policy.mounts.rw == ("/srv/out",)


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ('ro = ["relative"]', "mounts.ro[0]", "absolute"),
        ("rw = [3]", "mounts.rw[0]", "expected a path"),
        ('ro = ["/a"]\nrw = ["/a/"]', "mounts.rw[0]", "already listed"),
        ('ro = "/a"', "mounts.ro", "expected an array"),
        ('tmp = ["/a"]', "mounts.tmp", "unknown key"),
    ],
)
def test_mounts_errors_name_the_field(body, field, message):
    from gateway.policy import PolicyError, parse_policy

    with pytest.raises(PolicyError) as err:
        parse_policy(f"[mounts]\n{body}\n", "p.toml")
    assert err.value.field == field and message in str(err.value)
