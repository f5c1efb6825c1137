"""The control protocol between the CLI and `sandgate serve` (pure: no I/O).

Over the Unix socket /run/sandgate/control.sock, each message either way is a frame:
a 4-byte big-endian length, then that many bytes of UTF-8 JSON holding one object
(at most MAX_FRAME bytes). A connection carries one request; the daemon answers with
one or more frames and closes it. docs/usage/control-protocol.md is the reference.

Requests: {"op": OP, ...fields}. Every field is checked against OPS (type, bounds,
required) before anything happens; an unknown op or field, a wrong type, a bad value
is answered {"ok": false, "error": {"code": "bad_request", "message": ...}} and
nothing changes. Answers: {"ok": true, ...} or {"ok": false, "error": {code, message}}.

exec and run pass the caller's stdin, stdout and stderr with the request frame
(SCM_RIGHTS, exactly 3 descriptors): the command writes to the caller's terminal or
pipes directly, nothing is relayed. While it runs the caller may send
{"op": "signal", "signal": N}; the last frame is {"ok": true, "event": "exit",
"exit_code": N, ...}.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAX_FRAME = 1 << 20
HEADER = struct.Struct("!I")
PROTOCOL_VERSION = 1

ERROR_CODES = ("bad_request", "forbidden", "not_found", "conflict", "failed", "unavailable")

_SANDBOX_ID = re.compile(r"[0-9a-f]{8}")


class ProtocolError(Exception):
    """A frame or request that breaks the protocol; `code` is one of ERROR_CODES."""

    def __init__(self, message: str, code: str = "bad_request") -> None:
        super().__init__(message)
        self.code = code

    def to_json(self) -> dict[str, Any]:
        return {"ok": False, "error": {"code": self.code, "message": str(self)}}


def encode(message: dict[str, Any]) -> bytes:
    data = json.dumps(message, sort_keys=True, separators=(",", ":")).encode()
    if len(data) > MAX_FRAME:
        raise ProtocolError(f"message of {len(data)} bytes is over the {MAX_FRAME}-byte limit")
    return HEADER.pack(len(data)) + data


class FrameReader:
    """Bytes in, messages out (sans-IO). Raises ProtocolError on a bad frame."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        out = []
        while len(self._buf) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buf)
            if length > MAX_FRAME:
                raise ProtocolError(f"frame of {length} bytes is over the {MAX_FRAME}-byte limit")
            if len(self._buf) < HEADER.size + length:
                break
            body = bytes(self._buf[HEADER.size : HEADER.size + length])
            del self._buf[: HEADER.size + length]
            out.append(decode(body))
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)


def decode(body: bytes) -> dict[str, Any]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"frame is not UTF-8: {exc.reason} at byte {exc.start}") from exc
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except ValueError as exc:
        raise ProtocolError(f"frame is not JSON: {exc}") from exc
    except RecursionError:
        raise ProtocolError("frame is JSON nested too deeply") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"a message is a JSON object, not {type(value).__name__}")
    return value


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


# --- request schemas ---------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    kind: str  # str, int, bool, number, strings, env, id, ids
    required: bool = False
    low: float | None = None
    high: float | None = None
    max_len: int = 4096
    max_items: int = 256
    check: Callable[[Any], str | None] | None = None  # a message when the value is bad


def _absolute(value: str) -> str | None:
    return None if value.startswith("/") else "must be an absolute path"


def _signal_number(value: int) -> str | None:
    return None if 1 <= value <= 64 else "must be a signal number in 1..64"


_SANDBOX_FIELDS: dict[str, Field] = {
    "policy": Field("str", max_len=128),  # a named policy in the daemon's policies directory
    "policy_toml": Field("str", max_len=256 * 1024),  # a policy file's text
    "policy_origin": Field("str", max_len=1024),  # its file name, for error messages
    "allow": Field("strings"),
    "allow_cidr": Field("strings"),
    "repos": Field("strings"),
    "resolve": Field("strings"),
    "user": Field("str", max_len=256),
    "workspace": Field("str", check=_absolute),
    "ro": Field("strings", check=lambda v: _all(v, _absolute)),
    "rw": Field("strings", check=lambda v: _all(v, _absolute)),
    "env": Field("env"),
    "workdir": Field("str", check=_absolute),
    "memory": Field("int", low=1 << 20, high=1 << 50),
    "pids": Field("int", low=1, high=1 << 22),
    "cpus": Field("number", low=0.01, high=4096),
    "timeout": Field("number", low=0.001, high=365 * 86400),
}

_EXEC_FIELDS: dict[str, Field] = {
    "argv": Field("strings", required=True, max_items=4096, max_len=128 * 1024),
    "env": Field("env"),
    "workdir": Field("str", check=_absolute),
}

OPS: dict[str, dict[str, Field]] = {
    "ping": {},
    "create": dict(_SANDBOX_FIELDS),
    "run": {**_SANDBOX_FIELDS, **_EXEC_FIELDS, "keep": Field("bool")},
    "exec": {"id": Field("id", required=True), **_EXEC_FIELDS},
    "list": {},
    "inspect": {"id": Field("id", required=True)},
    "destroy": {"ids": Field("ids", required=True)},
    "logs": {
        "id": Field("id", required=True),
        "follow": Field("bool"),
        "tail": Field("int", low=0, high=1_000_000),
    },
    "reload": {"apply_to_running": Field("bool")},
}
# Ops that pass the caller's stdio descriptors with the request.
STDIO_OPS = frozenset({"exec", "run"})


def _all(values: list[str], check: Callable[[str], str | None]) -> str | None:
    for v in values:
        problem = check(v)
        if problem:
            return f"{v!r}: {problem}"
    return None


def _type_name(value: object) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


def _check_str(name: str, value: object, spec: Field) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"{name}: expected a string, got {_type_name(value)}")
    if "\0" in value:
        raise ProtocolError(f"{name}: contains a NUL byte")
    if len(value) > spec.max_len:
        raise ProtocolError(f"{name}: longer than {spec.max_len} characters")
    return value


def _check_field(name: str, value: object, spec: Field) -> object:
    kind = spec.kind
    if kind == "str":
        value = _check_str(name, value, spec)
    elif kind == "bool":
        if not isinstance(value, bool):
            raise ProtocolError(f"{name}: expected true or false, got {_type_name(value)}")
    elif kind in ("int", "number"):
        ok = isinstance(value, int) if kind == "int" else isinstance(value, int | float)
        if isinstance(value, bool) or not ok:
            want = "an integer" if kind == "int" else "a number"
            raise ProtocolError(f"{name}: expected {want}, got {_type_name(value)}")
        if (spec.low is not None and value < spec.low) or (
            spec.high is not None and value > spec.high
        ):
            raise ProtocolError(f"{name}: {value} is not in {spec.low:g}..{spec.high:g}")
    elif kind in ("strings", "ids"):
        if not isinstance(value, list):
            raise ProtocolError(f"{name}: expected a list of strings, got {_type_name(value)}")
        if len(value) > spec.max_items:
            raise ProtocolError(f"{name}: more than {spec.max_items} items")
        for i, item in enumerate(value):
            _check_str(f"{name}[{i}]", item, spec)
            if kind == "ids" and not _SANDBOX_ID.fullmatch(item):
                raise ProtocolError(f"{name}[{i}]: {item!r} is not a sandbox id (8 hex digits)")
        if kind == "ids" and not value:
            raise ProtocolError(f"{name}: name at least one sandbox")
    elif kind == "id":
        value = _check_str(name, value, spec)
        if not _SANDBOX_ID.fullmatch(value):
            raise ProtocolError(f"{name}: {value!r} is not a sandbox id (8 hex digits)")
    elif kind == "env":
        if not isinstance(value, dict):
            raise ProtocolError(f"{name}: expected an object of strings, got {_type_name(value)}")
        if len(value) > spec.max_items:
            raise ProtocolError(f"{name}: more than {spec.max_items} variables")
        for key, item in value.items():
            if not key or "=" in key or "\0" in key:
                raise ProtocolError(f"{name}: bad variable name {key!r}")
            _check_str(f"{name}.{key}", item, spec)
    else:  # pragma: no cover - a schema bug
        raise AssertionError(kind)
    if spec.check is not None:
        problem = spec.check(value)
        if problem:
            raise ProtocolError(f"{name}: {problem}")
    return value


def validate(message: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(op, fields) of a well-formed request, or ProtocolError naming what is wrong."""
    op = message.get("op")
    if not isinstance(op, str):
        raise ProtocolError('a request needs "op", a string: one of ' + ", ".join(sorted(OPS)))
    schema = OPS.get(op)
    if schema is None:
        raise ProtocolError(f"unknown op {op!r}: expected one of {', '.join(sorted(OPS))}")
    fields = {k: v for k, v in message.items() if k != "op"}
    unknown = sorted(set(fields) - set(schema))
    if unknown:
        raise ProtocolError(f"{op}: unknown field(s) {', '.join(map(repr, unknown))}")
    for name, spec in schema.items():
        if name not in fields:
            if spec.required:
                raise ProtocolError(f"{op}: {name!r} is required")
            continue
        if fields[name] is None and not spec.required:
            del fields[name]
            continue
        fields[name] = _check_field(name, fields[name], spec)
    if "policy" in fields and "policy_toml" in fields:
        raise ProtocolError(f"{op}: give 'policy' (a name) or 'policy_toml' (a text), not both")
    if op in ("exec", "run") and not fields.get("argv"):
        raise ProtocolError(f"{op}: 'argv' must name a command")
    return op, fields


def validate_signal(message: dict[str, Any]) -> int:
    """The signal number of a {"op": "signal", "signal": N} frame sent during exec."""
    if message.get("op") != "signal" or set(message) != {"op", "signal"}:
        raise ProtocolError('while a command runs, only {"op": "signal", "signal": N} is accepted')
    return int(_check_field("signal", message["signal"], Field("int", check=_signal_number)))


def error(code: str, message: str) -> dict[str, Any]:
    assert code in ERROR_CODES
    return {"ok": False, "error": {"code": code, "message": message}}
