"""The control protocol's frames and request schemas (runner/control.py): pure."""

from __future__ import annotations

import json
import struct

import pytest

from runner import control
from runner.control import FrameReader, ProtocolError, validate, validate_signal


def frame(obj) -> bytes:
    data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return struct.pack("!I", len(data)) + data


def test_frames_round_trip_in_pieces():
    data = control.encode({"op": "ping"}) + control.encode({"op": "list"})
    reader = FrameReader()
    out = []
    for i in range(len(data)):  # one byte at a time
        out += reader.feed(data[i : i + 1])
    assert out == [{"op": "ping"}, {"op": "list"}]
    assert reader.pending == 0


@pytest.mark.parametrize(
    "raw, message",
    [
        (struct.pack("!I", control.MAX_FRAME + 1), "over the"),
        (frame(b"\xff\xfe"), "not UTF-8"),
        (frame(b"{not json"), "not JSON"),
        (frame([1, 2]), "JSON object, not list"),
        (frame(b'{"op": NaN}'), "not JSON"),
    ],
)
def test_bad_frames_are_named(raw, message):
    with pytest.raises(ProtocolError, match=message) as info:
        FrameReader().feed(raw)
    assert info.value.code == "bad_request"


def test_encode_refuses_oversize():
    with pytest.raises(ProtocolError):
        control.encode({"op": "x" * control.MAX_FRAME})


@pytest.mark.parametrize(
    "request_, message",
    [
        ({}, 'needs "op"'),
        ({"op": 3}, 'needs "op"'),
        ({"op": "shutdown"}, "unknown op 'shutdown'"),
        ({"op": "list", "all": True}, "unknown field"),
        ({"op": "inspect"}, "'id' is required"),
        ({"op": "inspect", "id": "ABCDEF12"}, "not a sandbox id"),
        ({"op": "inspect", "id": 12345678}, "expected a string, got integer"),
        ({"op": "destroy", "ids": []}, "at least one"),
        ({"op": "destroy", "ids": "1a2b3c4d"}, "expected a list"),
        ({"op": "create", "memory": True}, "expected an integer, got boolean"),
        ({"op": "create", "memory": "1G"}, "expected an integer, got string"),
        ({"op": "create", "memory": 5}, "not in"),
        ({"op": "create", "cpus": -1}, "not in"),
        ({"op": "create", "workspace": "relative/dir"}, "absolute path"),
        ({"op": "create", "ro": ["/ok", "rel"]}, "'rel': must be an absolute path"),
        ({"op": "create", "env": {"A=B": "x"}}, "bad variable name"),
        ({"op": "create", "env": {"A": 1}}, "expected a string"),
        ({"op": "create", "user": "a\0b"}, "NUL"),
        ({"op": "create", "policy": "p", "policy_toml": ""}, "not both"),
        ({"op": "exec", "id": "1a2b3c4d"}, "'argv' is required"),
        ({"op": "exec", "id": "1a2b3c4d", "argv": []}, "must name a command"),
        ({"op": "run", "argv": ["true"], "keep": "yes"}, "expected true or false"),
        ({"op": "logs", "id": "1a2b3c4d", "tail": -1}, "not in"),
        ({"op": "signal", "signal": 2}, "unknown op 'signal'"),
    ],
)
def test_bad_requests_are_named(request_, message):
    with pytest.raises(ProtocolError, match=message):
        validate(request_)


def test_good_requests_pass_and_null_means_absent():
    assert validate({"op": "ping"}) == ("ping", {})
    op, fields = validate(
        {
            "op": "run",
            "argv": ["sh", "-c", "true"],
            "env": {"A": "1"},
            "allow": ["example.com:443"],
            "memory": 1 << 30,
            "cpus": 0.5,
            "timeout": 30,
            "user": None,
        }
    )
    assert op == "run" and "user" not in fields and fields["cpus"] == 0.5


def test_signal_frames():
    assert validate_signal({"op": "signal", "signal": 2}) == 2
    for bad in ({"op": "signal", "signal": 0}, {"op": "signal"}, {"op": "exec", "signal": 2}):
        with pytest.raises(ProtocolError):
            validate_signal(bad)


def test_error_answers_have_a_known_code():
    assert control.error("not_found", "x") == {
        "ok": False,
        "error": {"code": "not_found", "message": "x"},
    }
    assert ProtocolError("bad").to_json()["error"]["code"] == "bad_request"
