"""Sandbox policies: the TOML format, its strict validation, and the egress decision.

This module owns what a policy file may say and what it means. `parse_policy` turns
text into a frozen `Policy` or raises `PolicyError` (all the errors found, the first
one precise); an invalid policy yields no object at all, so it is never partly
applied. `decide` is the egress decision, a pure function over a parsed request and
the policy (stripe/smokescreen's acl shape); gateway/addr.py then classifies the
addresses a decided host resolves to. The only I/O here is `load_policy` reading the
file.

The meaning of a policy, where the format leaves a choice:

- Hosts are lower-cased, lose one trailing dot and are IDNA-encoded (IDNA 2003, the
  stdlib codec); a name that does not come back unchanged from an encode/decode round
  trip ("straße" becomes "strasse", full-width letters become ASCII) is rejected, so
  that what the sysadmin wrote is exactly what is matched.
- "*.example.com" matches every name below example.com, at any depth, and not
  example.com itself. A wildcard must be the whole first label, only once, and not
  directly over a single label ("*.com" would open a whole top-level domain; there
  is no public-suffix list here, so "*.co.uk" is not caught).
- IP address literals are not hosts: a rule cannot name one, and a request to one
  is denied. The gateway resolves names itself; to reach a LAN address, give it a
  name (/etc/hosts on the host) and list its range in `egress.allow_cidrs`.
- The most specific rule naming a host decides (an exact host beats a wildcard, a
  longer wildcard a shorter one); rules of equal specificity (a file rule and a
  `--allow` for the same host) each get a chance. Deny rules are checked first and
  always win.
- Ports: port 443 is reached only by CONNECT, port 80 only by plain (absolute-form)
  HTTP, any other listed port by both. CONNECT to 80 would carry plain HTTP past the
  method and body checks. Inside a CONNECT tunnel the gateway sees no methods or
  bodies: `methods` and `max_body` govern plain HTTP only; tunnels are held to the
  upload budget, rate and connection limits.
- A host pattern may appear once in egress.allow and once in egress.deny: two rules
  for one host make "which rule applied" ambiguous, so the second is an error.
- A repository with access = "write" must name the refs it may push
  ([git.repos.push] refs); there is no default that would open every branch.

Line numbers: tomllib reports positions only for syntax errors, so a small scanner
(`_Locator`) reads the raw text once, tracks table headers (counting each
[[array.of.tables]] so the Nth [[egress.allow]] becomes "egress.allow[N]") and the
line of every `key =`, and an error's field is looked up there, falling back to its
parent ("egress.allow[2].ports[1]" -> "egress.allow[2].ports" -> "egress.allow[2]").
Best effort: keys inside inline tables fall back to the enclosing key's line, and
multi-line strings are skipped only roughly.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path, PurePath
from typing import Any

from gateway.addr import never_allowed_overlap, parse_ip_literal

IPNetwork = IPv4Network | IPv6Network

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

DEFAULT_MAX_BODY = 10 * MIB
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_UPLOAD_BUDGET = 1 * GIB
DEFAULT_RATE = 20.0
DEFAULT_BURST = 40
DEFAULT_PORTS = (80, 443)
DEFAULT_METHODS = ("GET", "HEAD")
DEFAULT_MAX_REFS = 10

HTTP_PORT = 80
HTTPS_PORT = 443

# The plain-HTTP methods a rule may allow. CONNECT is implied by ports; TRACE is never
# forwarded (it echoes requests, credentials included).
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

_TOP_KEYS = ("egress", "limits", "mounts", "git")
_MOUNTS_KEYS = ("ro", "rw")
_EGRESS_KEYS = (
    "allow_cidrs",
    "max_body",
    "max_connections",
    "upload_budget",
    "rate",
    "burst",
    "allow",
    "deny",
)
_ALLOW_KEYS = ("host", "ports", "methods", "max_body")
_DENY_KEYS = ("host", "ports")
_LIMITS_KEYS = ("memory", "pids", "cpus", "timeout")
_GIT_KEYS = ("repos",)
_REPO_KEYS = ("url", "access", "push")
_PUSH_KEYS = ("refs", "allow_delete", "allow_tags", "max_refs")
_ACCESS = ("read", "write")

_SIZE = re.compile(r"([0-9]+)([KMGT]?)")
_SIZE_UNITS = {"": 1, "K": KIB, "M": MIB, "G": GIB, "T": 1024 * GIB}
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smh])")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600}
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")
_REPO_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?\[\\]")


# --- errors --------------------------------------------------------------------------


class PolicyError(Exception):
    """One thing wrong with a policy, placed as precisely as the file allows.

    `path` is the file (or "<string>"), `line`/`column` 1-based or None, `field` the
    dotted path of the offending value ("egress.allow[2].host", "" for syntax errors),
    `message` what is wrong and how to fix it. `errors` is (self,), so callers can
    always iterate `e.errors` whether they caught one error or several.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str = "<string>",
        line: int | None = None,
        column: int | None = None,
        field: str = "",
    ) -> None:
        self.message = message
        self.path = path
        self.line = line
        self.column = column
        self.field = field
        self.errors: tuple[PolicyError, ...] = (self,)
        super().__init__(self._format())

    def _format(self) -> str:
        where = self.path
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        return (
            f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-able, for `sandgate policy check --json`."""
        return {
            "path": self.path,
            "line": self.line,
            "column": self.column,
            "field": self.field,
            "message": self.message,
        }


class PolicyErrors(PolicyError):
    """Several things wrong with one policy. Reads as its first error (path, line,
    field, message); str() is every error, one per line; `errors` lists them all."""

    def __init__(self, errors: Sequence[PolicyError]) -> None:
        if not errors:
            raise ValueError("PolicyErrors needs at least one error")
        first = errors[0]
        super().__init__(
            first.message, path=first.path, line=first.line, column=first.column, field=first.field
        )
        self.errors = tuple(errors)
        self.args = ("\n".join(str(e) for e in self.errors),)

    def __str__(self) -> str:
        return str(self.args[0])


# --- hosts ---------------------------------------------------------------------------


def _normalize(host: object) -> str:
    """The canonical (ASCII, lower-case, no trailing dot) form of `host`; ValueError
    with an explanation (not repeating the host) when it is not a valid host name."""
    if not isinstance(host, str):
        raise ValueError(f"expected a string, got {_type_name(host)}")
    return _normalize_name(host)


# The gateway normalises the host of every request (its target and its Host header),
# and a sandbox asks for the same few names again and again: the IDNA round trip is
# most of a request's parsing time. Pure, so cached; bounded, and only valid names
# are kept (a ValueError is not cached), which are at most ~254 characters long.
@functools.lru_cache(maxsize=1024)
def _normalize_name(host: str) -> str:
    name = host.removesuffix(".")
    if not name:
        raise ValueError("empty host name")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise ValueError("host names contain no whitespace or control characters")
    try:
        is_ip = parse_ip_literal(name) is not None
    except ValueError:
        is_ip = True
    if is_ip:
        raise ValueError(
            "an IP address literal, not a host name; the gateway never lets a sandbox "
            "reach an address directly: give the address a name and list its range "
            "in egress.allow_cidrs"
        )
    lowered = name.lower()
    if any(not label for label in lowered.split(".")):
        raise ValueError("empty label (two dots in a row, or a leading dot)")
    try:
        ascii_form = lowered.encode("idna").decode("ascii")
        unicode_form = ascii_form.encode("ascii").decode("idna")
        round_trip = unicode_form.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError(
            "not a valid host name: labels of 1 to 63 characters, and any 'xn--' label "
            "must be valid punycode"
        ) from None
    if round_trip != ascii_form or (not lowered.isascii() and unicode_form != lowered):
        raise ValueError(
            f"does not round-trip through IDNA (it reads back as {unicode_form!r}); "
            "write the name as it is registered"
        )
    for label in ascii_form.split("."):
        if len(label) > 63:
            raise ValueError(f"label {label!r} is longer than 63 characters")
        if not _LABEL.fullmatch(label):
            raise ValueError(
                f"label {label!r}: host names are letters, digits and hyphens, "
                "with no hyphen at either end of a label"
            )
    if len(ascii_form) > 253:
        raise ValueError("longer than 253 characters")
    if ascii_form.rsplit(".", 1)[-1].isdigit():
        raise ValueError("the last label is all digits, so it reads as an IP address")
    return ascii_form


def normalize_host(host: str) -> str:
    """The canonical form every host is compared in: lower case, no trailing dot, IDNA
    A-labels ("BÜCHER.example." -> "xn--bcher-kva.example"). ValueError when `host` is
    not a valid host name, including when it is an IP address literal."""
    try:
        return _normalize(host)
    except ValueError as e:
        raise ValueError(f"{host!r} \N{EM DASH} {e}") from None


@dataclass(frozen=True)
class HostPattern:
    """An exact host ("packages.example") or a wildcard ("*.packages.example", which
    matches names below packages.example at any depth, never packages.example)."""

    text: str
    wildcard: bool

    @classmethod
    def parse(cls, text: str) -> HostPattern:
        """ValueError, naming `text`, when it is not a valid host or wildcard."""
        try:
            return _parse_pattern(text)
        except ValueError as e:
            raise ValueError(f"{text!r} \N{EM DASH} {e}") from None

    def matches(self, host: str) -> bool:
        host = host.lower().removesuffix(".")
        if self.wildcard:
            return host.endswith(self.text[1:])
        return host == self.text

    @property
    def specificity(self) -> tuple[int, int]:
        """Smaller is more specific: exact hosts first, then longer wildcards."""
        return (1 if self.wildcard else 0, -len(self.text))

    def __str__(self) -> str:
        return self.text


def _parse_pattern(text: object) -> HostPattern:
    if not isinstance(text, str):
        raise ValueError(f"expected a string, got {_type_name(text)}")
    if text == "*":
        raise ValueError("a bare '*' would allow every host; name the hosts")
    if "*" in text:
        if not text.startswith("*.") or "*" in text[2:]:
            raise ValueError("only a leading '*.' is allowed")
        domain = _normalize(text[2:])
        if "." not in domain:
            raise ValueError(
                "a wildcard directly over a top-level domain would open all of it; "
                "write '*.example.com'"
            )
        return HostPattern("*." + domain, wildcard=True)
    return HostPattern(_normalize(text), wildcard=False)


def _is_ip_literal(host: str) -> bool:
    try:
        return parse_ip_literal(host) is not None
    except ValueError:
        return True


# --- sizes and durations -------------------------------------------------------------


def parse_size(value: str | int) -> int:
    """Bytes: an integer, or "512", "10K", "10M", "1G", "1T" (binary multiples)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        m = _SIZE.fullmatch(value)
        if m:
            return int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    raise ValueError(
        'not a size: write bytes ("512") or a number with K, M, G or T '
        '(binary multiples: "10M" is 10 MiB)'
    )


def parse_duration(value: str | int | float) -> float:
    """Seconds: a number, or "30s", "5m", "1h" (also "1.5h")."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value) or value < 0:
            raise ValueError("a duration is a finite, non-negative number of seconds")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.fullmatch(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ValueError('not a duration: write a number with s, m or h ("30s", "5m", "1h")')


# --- the policy ----------------------------------------------------------------------


@dataclass(frozen=True)
class AllowRule:
    """One [[egress.allow]] entry. `ports` is sorted; `max_body` None means the
    policy's egress.max_body. `origin` and `index` name the rule in decisions and the
    audit log: "egress.allow[2]", or "--allow[0]" for one added on the command line."""

    host: HostPattern
    ports: tuple[int, ...] = DEFAULT_PORTS
    methods: tuple[str, ...] = DEFAULT_METHODS
    max_body: int | None = None
    index: int = 0
    origin: str = "egress.allow"

    @property
    def name(self) -> str:
        return f"{self.origin}[{self.index}]"

    @property
    def connect_ports(self) -> tuple[int, ...]:
        """Ports reachable by CONNECT: all listed but 80."""
        return tuple(p for p in self.ports if p != HTTP_PORT)

    @property
    def http_ports(self) -> tuple[int, ...]:
        """Ports reachable by plain HTTP: all listed but 443."""
        return tuple(p for p in self.ports if p != HTTPS_PORT)


@dataclass(frozen=True)
class DenyRule:
    """One [[egress.deny]] entry; empty `ports` means every port."""

    host: HostPattern
    ports: tuple[int, ...] = ()
    index: int = 0

    @property
    def name(self) -> str:
        return f"egress.deny[{self.index}]"


@dataclass(frozen=True)
class EgressPolicy:
    allow: tuple[AllowRule, ...] = ()
    deny: tuple[DenyRule, ...] = ()
    allow_cidrs: tuple[IPNetwork, ...] = ()
    max_body: int = DEFAULT_MAX_BODY
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    upload_budget: int = DEFAULT_UPLOAD_BUDGET
    rate: float = DEFAULT_RATE
    burst: int = DEFAULT_BURST


@dataclass(frozen=True)
class ProcessLimits:
    """[limits]: memory in bytes, timeout in seconds; None means the runner's default."""

    memory: int | None = None
    pids: int | None = None
    cpus: float | None = None
    timeout: float | None = None


@dataclass(frozen=True)
class ExtraMounts:
    """[mounts]: host paths bound into the sandbox at the same path (the runner checks
    them against the paths that never enter a sandbox when it plans the mounts)."""

    ro: tuple[str, ...] = ()
    rw: tuple[str, ...] = ()


@dataclass(frozen=True)
class RepoRule:
    """One [[git.repos]] entry. `url` is canonical ("https://host/org/repo", no
    trailing ".git" or "/"); `host` is normalised, `path` keeps its case ("/org/repo").
    A read-only repository has no refs and max_refs 0."""

    url: str
    host: str
    path: str
    access: str
    refs: tuple[str, ...] = ()
    allow_delete: bool = False
    allow_tags: bool = False
    max_refs: int = 0


@dataclass(frozen=True)
class Policy:
    """A whole, valid policy. `source` is the file it came from (None: built in)."""

    name: str
    source: str | None
    egress: EgressPolicy = EgressPolicy()
    limits: ProcessLimits = ProcessLimits()
    repos: tuple[RepoRule, ...] = ()
    mounts: ExtraMounts = ExtraMounts()


DEFAULT_POLICY = Policy(name="default", source=None)
"""Built in: no egress at all, no repositories, the default limits."""


# --- locating fields in the raw text -------------------------------------------------

_KEY_PART = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')"""
_HEADER_LINE = re.compile(
    rf"\s*(?P<open>\[\[?)\s*(?P<key>{_KEY_PART}(?:\s*\.\s*{_KEY_PART})*)\s*\]\]?\s*(?:#.*)?"
)
_KEY_LINE = re.compile(rf"\s*(?P<key>{_KEY_PART}(?:\s*\.\s*{_KEY_PART})*)\s*=")
_KEY_TOKEN = re.compile(r""""((?:[^"\\]|\\.)*)"|'([^']*)'|([A-Za-z0-9_-]+)""")
_LAST_SEGMENT = re.compile(r"(\[[0-9]+\]|\.[^.\[\]]*)$")


def _key_parts(key: str) -> list[str]:
    return [next(g for g in m.groups() if g is not None) for m in _KEY_TOKEN.finditer(key)]


class _Locator:
    """Best-effort map from a field path ("egress.allow[2].host") to its line."""

    def __init__(self, text: str) -> None:
        self.lines: dict[str, int] = {}
        counters: dict[str, int] = {}
        table = ""
        in_string: str | None = None
        for number, line in enumerate(text.splitlines(), start=1):
            if in_string is not None:
                if line.count(in_string) % 2 == 1:
                    in_string = None
                continue
            header = _HEADER_LINE.fullmatch(line)
            if header:
                table = self._table_path(
                    _key_parts(header.group("key")), header.group("open") == "[[", counters
                )
                self.lines.setdefault(table, number)
                continue
            key = _KEY_LINE.match(line)
            if key:
                path = ".".join([table, *_key_parts(key.group("key"))]).lstrip(".")
                self.lines.setdefault(path, number)
                rest = line[key.end() :]
                for quotes in ('"""', "'''"):
                    if rest.count(quotes) % 2 == 1:
                        in_string = quotes

    @staticmethod
    def _table_path(parts: list[str], is_array: bool, counters: dict[str, int]) -> str:
        resolved = ""
        for i, part in enumerate(parts):
            path = f"{resolved}.{part}" if resolved else part
            if is_array and i == len(parts) - 1:
                counters[path] = counters.get(path, -1) + 1
                resolved = f"{path}[{counters[path]}]"
            elif path in counters:
                resolved = f"{path}[{counters[path]}]"
            else:
                resolved = path
        return resolved

    def line_of(self, field_path: str) -> int | None:
        while field_path:
            if field_path in self.lines:
                return self.lines[field_path]
            m = _LAST_SEGMENT.search(field_path)
            if m is None:
                return None
            field_path = field_path[: m.start()]
        return None


# --- validation ----------------------------------------------------------------------


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date/time"


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


_MISSING = object()


class _Validator:
    """Walks the parsed TOML, collecting every error; builds values only to keep going
    (whatever it returns after an error is discarded)."""

    def __init__(self, text: str, source: str) -> None:
        self.source = source
        self.locator = _Locator(text)
        self.errors: list[PolicyError] = []

    def error(self, field_path: str, message: str) -> None:
        line = self.locator.line_of(field_path)
        self.errors.append(PolicyError(message, path=self.source, line=line, field=field_path))

    def bad_value(self, field_path: str, value: object, why: object) -> None:
        self.error(field_path, f"{value!r} \N{EM DASH} {why}")

    # generic shapes

    def table(self, value: object, where: str, keys: Sequence[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.error(where, f"expected a table, got {_type_name(value)}")
            return {}
        for key in value:
            if key not in keys:
                hint = difflib.get_close_matches(key, keys, n=1)
                also = f" (did you mean {hint[0]!r}?)" if hint else ""
                here = f"in {where}" if where else "at the top level"
                self.error(
                    _join(where, key),
                    f"unknown key {key!r}{also}; allowed {here}: {', '.join(keys)}",
                )
        return value

    def tables(self, value: object, where: str) -> list[Any]:
        if not isinstance(value, list):
            self.error(where, f"expected an array of tables ([[{where}]]), got {_type_name(value)}")
            return []
        return value

    def array(self, value: object, where: str) -> list[Any]:
        if not isinstance(value, list):
            self.error(where, f"expected an array, got {_type_name(value)}")
            return []
        return value

    def integer(self, t: dict[str, Any], key: str, where: str, default: int, low: int) -> int:
        value = t.get(key, _MISSING)
        if value is _MISSING:
            return default
        if not isinstance(value, int) or isinstance(value, bool):
            self.error(_join(where, key), f"expected an integer, got {_type_name(value)}")
        elif value < low:
            self.bad_value(_join(where, key), value, f"must be at least {low}")
        else:
            return value
        return default

    def number(self, t: dict[str, Any], key: str, where: str, default: float) -> float:
        value = t.get(key, _MISSING)
        if value is _MISSING:
            return default
        if not isinstance(value, int | float) or isinstance(value, bool):
            self.error(_join(where, key), f"expected a number, got {_type_name(value)}")
        elif not math.isfinite(value) or value <= 0:
            self.bad_value(_join(where, key), value, "must be a finite number above 0")
        else:
            return float(value)
        return default

    def boolean(self, t: dict[str, Any], key: str, where: str, default: bool) -> bool:
        value = t.get(key, _MISSING)
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            self.error(_join(where, key), f"expected true or false, got {_type_name(value)}")
            return default
        return value

    def size(self, t: dict[str, Any], key: str, where: str, default: int | None) -> int | None:
        value = t.get(key, _MISSING)
        if value is _MISSING:
            return default
        if not isinstance(value, str | int) or isinstance(value, bool):
            self.error(_join(where, key), f'expected a size such as "10M", got {_type_name(value)}')
            return default
        try:
            return parse_size(value)
        except ValueError as e:
            self.bad_value(_join(where, key), value, e)
            return default

    def duration(self, t: dict[str, Any], key: str, where: str) -> float | None:
        value = t.get(key, _MISSING)
        if value is _MISSING:
            return None
        try:
            seconds = parse_duration(value)
        except ValueError as e:
            self.bad_value(_join(where, key), value, e)
            return None
        if seconds <= 0:
            self.bad_value(_join(where, key), value, "must be longer than 0s")
            return None
        return seconds

    def string(self, t: dict[str, Any], key: str, where: str) -> str | None:
        value = t.get(key, _MISSING)
        if value is _MISSING:
            self.error(_join(where, key), f"missing required key {key!r}")
            return None
        if not isinstance(value, str):
            self.error(_join(where, key), f"expected a string, got {_type_name(value)}")
            return None
        return value

    # policy pieces

    def host(self, t: dict[str, Any], where: str) -> HostPattern | None:
        if "host" not in t:
            self.error(_join(where, "host"), "missing required key 'host'")
            return None
        try:
            return _parse_pattern(t["host"])
        except ValueError as e:
            self.bad_value(_join(where, "host"), t["host"], e)
            return None

    def ports(
        self, t: dict[str, Any], where: str, default: tuple[int, ...], allow_empty: bool
    ) -> tuple[int, ...]:
        if "ports" not in t:
            return default
        where = _join(where, "ports")
        found: list[int] = []
        for i, port in enumerate(self.array(t["ports"], where)):
            if not isinstance(port, int) or isinstance(port, bool):
                self.error(f"{where}[{i}]", f"expected a port number, got {_type_name(port)}")
            elif not 1 <= port <= 65535:
                self.bad_value(f"{where}[{i}]", port, "a port is 1 to 65535")
            elif port in found:
                self.bad_value(f"{where}[{i}]", port, "listed twice")
            else:
                found.append(port)
        if t["ports"] == [] and not allow_empty:
            self.error(where, "empty: this rule would allow nothing; list ports or drop the rule")
        return tuple(sorted(found))

    def methods(self, t: dict[str, Any], where: str) -> tuple[str, ...]:
        if "methods" not in t:
            return DEFAULT_METHODS
        where = _join(where, "methods")
        found: list[str] = []
        for i, method in enumerate(self.array(t["methods"], where)):
            at = f"{where}[{i}]"
            if not isinstance(method, str):
                self.error(at, f"expected a method name, got {_type_name(method)}")
            elif method == "CONNECT":
                self.bad_value(
                    at,
                    method,
                    "CONNECT is not listed: it is allowed to every port in ports but 80",
                )
            elif method not in METHODS and method.upper() in METHODS:
                self.bad_value(at, method, f"methods are case-sensitive; write {method.upper()!r}")
            elif method not in METHODS:
                self.bad_value(
                    at, method, f"not a method the gateway forwards: {', '.join(METHODS)}"
                )
            elif method in found:
                self.bad_value(at, method, "listed twice")
            else:
                found.append(method)
        return tuple(found)

    def cidrs(self, t: dict[str, Any], where: str) -> tuple[IPNetwork, ...]:
        if "allow_cidrs" not in t:
            return ()
        where = _join(where, "allow_cidrs")
        found: list[IPNetwork] = []
        for i, text in enumerate(self.array(t["allow_cidrs"], where)):
            at = f"{where}[{i}]"
            if not isinstance(text, str):
                self.error(
                    at, f'expected a CIDR string such as "10.0.0.0/16", got {_type_name(text)}'
                )
                continue
            try:
                net = _parse_cidr(text)
            except ValueError as e:
                self.bad_value(at, text, e)
                continue
            if net in found:
                self.bad_value(at, text, "listed twice")
            else:
                found.append(net)
        return tuple(found)

    def egress(self, raw: object) -> EgressPolicy:
        t = self.table(raw, "egress", _EGRESS_KEYS)
        defaults = EgressPolicy()
        allow: list[AllowRule] = []
        for i, item in enumerate(self.tables(t.get("allow", []), "egress.allow")):
            rule = self.allow_rule(item, i)
            if rule is not None:
                allow.append(rule)
        deny: list[DenyRule] = []
        for i, item in enumerate(self.tables(t.get("deny", []), "egress.deny")):
            rule = self.deny_rule(item, i)
            if rule is not None:
                deny.append(rule)
        self.no_duplicate_hosts(allow)
        self.no_duplicate_hosts(deny)
        return EgressPolicy(
            allow=tuple(allow),
            deny=tuple(deny),
            allow_cidrs=self.cidrs(t, "egress"),
            max_body=self.size(t, "max_body", "egress", defaults.max_body) or 0,
            max_connections=self.integer(
                t, "max_connections", "egress", defaults.max_connections, low=1
            ),
            upload_budget=self.size(t, "upload_budget", "egress", defaults.upload_budget) or 0,
            rate=self.number(t, "rate", "egress", defaults.rate),
            burst=self.integer(t, "burst", "egress", defaults.burst, low=1),
        )

    def allow_rule(self, raw: object, index: int) -> AllowRule | None:
        where = f"egress.allow[{index}]"
        t = self.table(raw, where, _ALLOW_KEYS)
        host = self.host(t, where)
        ports = self.ports(t, where, DEFAULT_PORTS, allow_empty=False)
        methods = self.methods(t, where)
        max_body = self.size(t, "max_body", where, None)
        if host is None:
            return None
        return AllowRule(host, ports, methods, max_body, index)

    def deny_rule(self, raw: object, index: int) -> DenyRule | None:
        where = f"egress.deny[{index}]"
        t = self.table(raw, where, _DENY_KEYS)
        host = self.host(t, where)
        ports = self.ports(t, where, (), allow_empty=True)
        if host is None:
            return None
        return DenyRule(host, ports, index)

    def no_duplicate_hosts(self, rules: Sequence[AllowRule | DenyRule]) -> None:
        first: dict[HostPattern, str] = {}
        for rule in rules:
            if rule.host in first:
                self.bad_value(
                    f"{rule.name}.host",
                    rule.host.text,
                    f"already named by {first[rule.host]}; merge the two rules",
                )
            else:
                first[rule.host] = rule.name

    def limits(self, raw: object) -> ProcessLimits:
        t = self.table(raw, "limits", _LIMITS_KEYS)
        memory = self.size(t, "memory", "limits", None)
        if memory is not None and memory < MIB:
            self.bad_value(
                "limits.memory", t["memory"], "less than 1M; sizes are bytes unless given K, M, G"
            )
        pids = self.integer(t, "pids", "limits", 0, low=1) or None
        cpus = self.number(t, "cpus", "limits", 0.0) or None
        return ProcessLimits(memory, pids, cpus, self.duration(t, "timeout", "limits"))

    def mounts(self, raw: object) -> ExtraMounts:
        t = self.table(raw, "mounts", _MOUNTS_KEYS)
        found: dict[str, tuple[str, ...]] = {}
        seen: dict[str, str] = {}
        for key in _MOUNTS_KEYS:
            paths: list[str] = []
            for i, path in enumerate(self.array(t.get(key, []), f"mounts.{key}")):
                at = f"mounts.{key}[{i}]"
                if not isinstance(path, str):
                    self.error(at, f'expected a path such as "/srv/cache", got {_type_name(path)}')
                elif not path.startswith("/") or "\0" in path or path != path.strip():
                    self.bad_value(at, path, "must be an absolute path")
                elif path.rstrip("/") in seen:
                    self.bad_value(at, path, f"already listed at {seen[path.rstrip('/')]}")
                else:
                    seen[path.rstrip("/")] = at
                    paths.append(path)
            found[key] = tuple(paths)
        return ExtraMounts(ro=found["ro"], rw=found["rw"])

    def git(self, raw: object) -> tuple[RepoRule, ...]:
        t = self.table(raw, "git", _GIT_KEYS)
        repos: list[RepoRule] = []
        seen: dict[str, str] = {}
        for i, item in enumerate(self.tables(t.get("repos", []), "git.repos")):
            repo = self.repo(item, f"git.repos[{i}]")
            if repo is None:
                continue
            if repo.url in seen:
                self.bad_value(
                    f"git.repos[{i}].url", repo.url, f"already listed as {seen[repo.url]}"
                )
            seen.setdefault(repo.url, f"git.repos[{i}]")
            repos.append(repo)
        return tuple(repos)

    def repo(self, raw: object, where: str) -> RepoRule | None:
        t = self.table(raw, where, _REPO_KEYS)
        url = self.string(t, "url", where)
        parsed = None
        if url is not None:
            try:
                parsed = _parse_repo_url(url)
            except ValueError as e:
                self.bad_value(_join(where, "url"), url, e)
        access = t.get("access", "read")
        if access not in _ACCESS:
            self.bad_value(_join(where, "access"), access, "access is 'read' or 'write'")
            access = "read"
        refs: tuple[str, ...] = ()
        allow_delete = allow_tags = False
        max_refs = 0
        if "push" in t:
            push_at = _join(where, "push")
            push = self.table(t["push"], push_at, _PUSH_KEYS)
            if access != "write":
                self.error(push_at, 'push rules need access = "write"')
            allow_delete = self.boolean(push, "allow_delete", push_at, False)
            allow_tags = self.boolean(push, "allow_tags", push_at, False)
            max_refs = self.integer(push, "max_refs", push_at, DEFAULT_MAX_REFS, low=1)
            refs = self.ref_patterns(push, push_at, allow_tags)
        elif access == "write":
            self.error(
                _join(where, "access"),
                "'write' needs a [git.repos.push] table naming the refs the sandbox may push, "
                'e.g. refs = ["refs/heads/sandbox/*"]',
            )
        if parsed is None:
            return None
        canonical, host, path = parsed
        return RepoRule(canonical, host, path, access, refs, allow_delete, allow_tags, max_refs)

    def ref_patterns(self, push: dict[str, Any], where: str, allow_tags: bool) -> tuple[str, ...]:
        if "refs" not in push:
            self.error(
                _join(where, "refs"),
                "missing required key 'refs' (e.g. [\"refs/heads/sandbox/*\"])",
            )
            return ()
        where = _join(where, "refs")
        found: list[str] = []
        for i, ref in enumerate(self.array(push["refs"], where)):
            at = f"{where}[{i}]"
            if not isinstance(ref, str):
                self.error(at, f"expected a ref pattern, got {_type_name(ref)}")
                continue
            try:
                _check_ref_pattern(ref)
            except ValueError as e:
                self.bad_value(at, ref, e)
                continue
            if ref.startswith("refs/tags/") and not allow_tags:
                self.bad_value(at, ref, "a tag pattern needs allow_tags = true")
            elif ref in found:
                self.bad_value(at, ref, "listed twice")
            else:
                found.append(ref)
        if isinstance(push["refs"], list) and not push["refs"]:
            self.error(where, 'empty: name the refs the sandbox may push, or use access = "read"')
        return tuple(found)


def _parse_cidr(text: str) -> IPNetwork:
    try:
        net = ip_network(text, strict=True)
    except ValueError as e:
        if "has host bits set" in str(e):
            loose = ip_network(text, strict=False)
            raise ValueError(f"has host bits set; did you mean '{loose}'?") from None
        raise ValueError('not a CIDR such as "10.214.0.0/16" or "fd12:3456::/48"') from None
    why = never_allowed_overlap(net)
    if why is not None:
        raise ValueError(why)
    return net


def _parse_repo_url(url: str) -> tuple[str, str, str]:
    """(canonical url, host, path) of an https repository URL."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != "https":
        raise ValueError("repositories are https:// URLs (https://host/org/repo)")
    authority, _, path = rest.partition("/")
    if any(c in rest for c in "?#"):
        raise ValueError("no query or fragment in a repository URL")
    if "@" in authority:
        raise ValueError("no credentials in a repository URL; the gateway injects them")
    if ":" in authority:
        raise ValueError("no port in a repository URL")
    host = _normalize(authority)
    path = path.rstrip("/").removesuffix(".git")
    segments = path.split("/")
    if not path or any(not _REPO_SEGMENT.fullmatch(s) or s in (".", "..") for s in segments):
        raise ValueError(
            "the path must be the repository (https://host/org/repo): segments of letters, "
            "digits, '.', '_' and '-'"
        )
    return f"https://{host}/{path}", host, f"/{path}"


def _check_ref_pattern(ref: str) -> None:
    """git check-ref-format's rules, plus at most one '*', in the last component."""
    if not ref.startswith("refs/"):
        raise ValueError("a ref pattern starts with 'refs/' (e.g. 'refs/heads/sandbox/*')")
    components = ref.split("/")
    if any(not c for c in components):
        raise ValueError("empty path component (a '//' or a trailing '/')")
    if _REF_FORBIDDEN.search(ref) or ".." in ref or "@{" in ref:
        raise ValueError("refs contain no spaces, control characters, '~^:?[\\', '..' or '@{'")
    if any(c.startswith(".") or c.endswith(".lock") for c in components) or ref.endswith("."):
        raise ValueError("no component starts with '.' or ends with '.lock', and no trailing '.'")
    if ref.count("*") > 1 or "*" in "/".join(components[:-1]):
        raise ValueError("at most one '*', in the last component ('refs/heads/sandbox/*')")


def parse_policy(text: str, source: str = "<string>", *, name: str | None = None) -> Policy:
    """The policy `text` describes, or PolicyError (PolicyErrors when there are several).

    `source` names the text in errors and becomes Policy.source; `name` defaults to
    the file name without its suffix ("inline" for "<string>")."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise _syntax_error(str(e), source) from None
    v = _Validator(text, source)
    top = v.table(raw, "", _TOP_KEYS)
    egress = v.egress(top.get("egress", {}))
    limits = v.limits(top.get("limits", {}))
    repos = v.git(top.get("git", {}))
    mounts = v.mounts(top.get("mounts", {}))
    if v.errors:
        errors = sorted(v.errors, key=lambda e: (e.line is None, e.line or 0))
        raise errors[0] if len(errors) == 1 else PolicyErrors(errors)
    if name is None:
        name = "inline" if source.startswith("<") else PurePath(source).stem
    return Policy(
        name=name, source=source, egress=egress, limits=limits, repos=repos, mounts=mounts
    )


_TOML_POSITION = re.compile(r"(?P<msg>.*?) \(at line (?P<line>[0-9]+), column (?P<col>[0-9]+)\)$")


def _syntax_error(message: str, source: str) -> PolicyError:
    m = _TOML_POSITION.fullmatch(message)
    if m is None:
        return PolicyError(f"TOML syntax error: {message}", path=source)
    return PolicyError(
        f"TOML syntax error: {m.group('msg')}",
        path=source,
        line=int(m.group("line")),
        column=int(m.group("col")),
    )


def load_policy(path: str | Path) -> Policy:
    """Read and parse a policy file; PolicyError when it cannot be read or is invalid."""
    return read_policy(path)[0]


def read_policy(path: str | Path) -> tuple[Policy, str]:
    """A policy file parsed, with its text (for a caller that passes the text on)."""
    source = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise PolicyError(f"cannot read the policy file: {e.strerror or e}", path=source) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise PolicyError("not UTF-8 text", path=source, line=line) from None
    return parse_policy(text, source), text


# --- command-line additions ----------------------------------------------------------

_PORT_TEXT = re.compile(r"[0-9]{1,5}")


def parse_allow_arg(arg: str) -> AllowRule:
    """A rule from `--allow HOST[:PORT[,PORT...]]`: "packages.example",
    "*.packages.example:443", "mirror.example:80,8080". Ports default to 80 and 443,
    methods to GET and HEAD. ValueError with a message naming the argument."""
    if arg.startswith("[") or arg.count(":") > 1:
        raise ValueError(f"--allow {arg!r}: IP address literals are not allowed; allow a host name")
    host_text, sep, port_text = arg.partition(":")
    try:
        host = _parse_pattern(host_text)
    except ValueError as e:
        raise ValueError(f"--allow {arg!r}: {host_text!r} \N{EM DASH} {e}") from None
    if not sep:
        return AllowRule(host, origin="--allow")
    ports: list[int] = []
    for text in port_text.split(","):
        if not _PORT_TEXT.fullmatch(text) or not 1 <= int(text) <= 65535:
            raise ValueError(f"--allow {arg!r}: {text!r} is not a port (1 to 65535)")
        if int(text) in ports:
            raise ValueError(f"--allow {arg!r}: port {text} is listed twice")
        ports.append(int(text))
    return AllowRule(host, tuple(sorted(ports)), origin="--allow")


def with_extra(
    policy: Policy,
    allow: Sequence[AllowRule] = (),
    allow_cidrs: Sequence[IPNetwork | str] = (),
) -> Policy:
    """`policy` plus command-line additions for one run. The added rules are named
    "--allow[0]", "--allow[1]", ... in their order; CIDRs are checked as in a file
    (ValueError) and appended unless already present."""
    egress = policy.egress
    added = tuple(replace(rule, origin="--allow", index=i) for i, rule in enumerate(allow))
    cidrs = list(egress.allow_cidrs)
    for item in allow_cidrs:
        net = item
        if isinstance(item, str):
            try:
                net = _parse_cidr(item)
            except ValueError as e:
                raise ValueError(f"allow_cidrs {item!r} \N{EM DASH} {e}") from None
        else:
            why = never_allowed_overlap(item)
            if why is not None:
                raise ValueError(f"allow_cidrs '{item}' \N{EM DASH} {why}")
        if net not in cidrs:
            cidrs.append(net)
    return replace(
        policy, egress=replace(egress, allow=egress.allow + added, allow_cidrs=tuple(cidrs))
    )


# --- the decision --------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """What the sandbox asked for. `method` is "CONNECT" or the plain-HTTP method;
    `host` is normalised (normalize_host); `body_size` is None when unknown (chunked)
    and for CONNECT."""

    method: str
    host: str
    port: int
    body_size: int | None = None


@dataclass(frozen=True)
class Decision:
    """`rule` names what decided ("egress.allow[0]", "egress.deny[1]", "--allow[0]",
    "default-deny"); `max_body` is the body limit the proxy enforces while streaming
    an allowed plain-HTTP request (None for CONNECT and denials)."""

    allowed: bool
    rule: str
    reason: str
    max_body: int | None = None


DEFAULT_DENY = "default-deny"


def decide(policy: EgressPolicy, req: Request) -> Decision:
    """Whether `req` may leave. Deny rules first (host and port), then the most
    specific allow rules (host, port, method, body size); otherwise default deny."""
    host = req.host
    if not 1 <= req.port <= 65535:
        return Decision(False, DEFAULT_DENY, f"port {req.port} is not a valid TCP port")
    if _is_ip_literal(host):
        return Decision(
            False,
            DEFAULT_DENY,
            f"{host} is an IP address; policies allow host names only, never addresses",
        )
    for deny in policy.deny:
        if deny.host.matches(host) and (not deny.ports or req.port in deny.ports):
            return Decision(False, deny.name, f"{host} is denied by {deny.name} ({deny.host})")
    matching = [rule for rule in policy.allow if rule.host.matches(host)]
    if not matching:
        return Decision(
            False,
            DEFAULT_DENY,
            f'host not in the allowlist; add [[egress.allow]] host = "{host}"',
        )
    best = min(rule.host.specificity for rule in matching)
    candidates = [rule for rule in matching if rule.host.specificity == best]
    refusals: list[str] = []
    for rule in candidates:
        refusal = _refusal(rule, req, policy.max_body)
        if refusal is None:
            if req.method == "CONNECT":
                return Decision(True, rule.name, f"allowed by {rule.name} ({rule.host})")
            limit = rule.max_body if rule.max_body is not None else policy.max_body
            return Decision(True, rule.name, f"allowed by {rule.name} ({rule.host})", limit)
        refusals.append(refusal)
    return Decision(False, candidates[0].name, refusals[0])


def _refusal(rule: AllowRule, req: Request, default_max_body: int) -> str | None:
    """Why `rule`, whose host matches, does not allow `req`; None when it does."""
    if req.port not in rule.ports:
        return f"port {req.port} is not in ports {list(rule.ports)} of {rule.name}"
    if req.method == "CONNECT":
        if req.port == HTTP_PORT:
            return (
                "CONNECT to port 80 is refused: send plain HTTP through the proxy so its "
                "method and body can be checked"
            )
        return None
    if req.port == HTTPS_PORT:
        return "plain HTTP to port 443 is refused: use https (CONNECT)"
    if req.method not in rule.methods:
        return f"method {req.method} is not in methods {list(rule.methods)} of {rule.name}"
    limit = rule.max_body if rule.max_body is not None else default_max_body
    if req.body_size is not None and req.body_size > limit:
        return f"body of {req.body_size} bytes exceeds max_body {limit} of {rule.name}"
    return None


# --- summary -------------------------------------------------------------------------


def policy_summary(policy: Policy) -> dict[str, Any]:
    """What a sandbox under `policy` may reach, as JSON-able data: for
    `sandgate policy check --json` and the in-sandbox "what am I allowed" API."""
    egress = policy.egress
    return {
        "name": policy.name,
        "source": policy.source,
        "egress": {
            "default": "deny",
            "allow": [_allow_summary(rule, egress.max_body) for rule in egress.allow],
            "deny": [
                {"rule": r.name, "host": r.host.text, "ports": list(r.ports) or "all"}
                for r in egress.deny
            ],
            "allow_cidrs": [str(net) for net in egress.allow_cidrs],
            "max_body": egress.max_body,
            "max_connections": egress.max_connections,
            "upload_budget": egress.upload_budget,
            "rate": egress.rate,
            "burst": egress.burst,
        },
        "limits": {
            "memory": policy.limits.memory,
            "pids": policy.limits.pids,
            "cpus": policy.limits.cpus,
            "timeout": policy.limits.timeout,
        },
        "mounts": {"ro": list(policy.mounts.ro), "rw": list(policy.mounts.rw)},
        "git": {"repos": [_repo_summary(repo) for repo in policy.repos]},
    }


def _allow_summary(rule: AllowRule, default_max_body: int) -> dict[str, Any]:
    return {
        "rule": rule.name,
        "host": rule.host.text,
        "subdomains_only": rule.host.wildcard,
        "connect_ports": list(rule.connect_ports),
        "http_ports": list(rule.http_ports),
        "http_methods": list(rule.methods),
        "http_max_body": rule.max_body if rule.max_body is not None else default_max_body,
    }


def _repo_summary(repo: RepoRule) -> dict[str, Any]:
    summary: dict[str, Any] = {"url": repo.url, "access": repo.access}
    if repo.access == "write":
        summary["push"] = {
            "refs": list(repo.refs),
            "allow_delete": repo.allow_delete,
            "allow_tags": repo.allow_tags,
            "max_refs": repo.max_refs,
        }
    return summary
