"""git's pkt-line framing and the head of a push (receive-pack) request, sans-IO.

This module owns what the git gateway reads in a push before it forwards anything:
the commands (which refs become which objects), the client's capabilities, shallow
lines and push options, up to the byte where the pack starts. `PushRequestParser`
takes the request body in pieces of any size (bytes in) and produces one
`PushRequest` (event out) or raises `PktLineError`; it never buffers the pack.
It also renders what the gateway answers: `report_status` in git's report-status
format, inside side-band-64k packets when the client asked for them, so that
`git push` prints the gateway's reasons next to each refused ref.

The grammar (gitprotocol-common(5), gitprotocol-pack(5)), and the choices made where
it leaves one:

- A pkt-line is a 4-hex-digit length that counts itself, then the payload. Upper- and
  lower-case hex digits are accepted (git's own reader accepts both); anything else
  is an error. The longest packet is 65520 bytes.
- "0000" is a flush-pkt. "0001" (delim) and "0002" (response-end) belong to protocol
  v2, which has no push: `read_pkt` returns them, a push request refuses them.
  "0003" means nothing and is always an error.
- "0004" (an empty data packet) is valid framing, but git never sends one ("SHOULD
  NOT"), and no line of a push request may be empty (a command, a shallow line and a
  push option all have at least one character), so in a push request it is an error.
- A trailing LF is stripped from every line, as receivers MUST; git itself sends
  commands and push options without one and shallow lines with one.
- update-requests = *shallow command-list [push-options] [pack]. The first command
  carries NUL and the capability list (git puts a space after the NUL: leading and
  repeated spaces between capabilities are ignored); no other line may hold a NUL.
  Shallow lines come before the first command only.
- Object ids are lower-case hex (git writes nothing else): 40 digits for SHA-1, 64
  for SHA-256, the same length on every line, and the length the `object-format`
  capability names (SHA-1 when it is absent). Both ids zero is neither a create nor
  a delete, and is refused; so is a ref named by two commands.
- Ref names follow `git check-ref-format`, must be under refs/ and valid UTF-8.
- Capabilities: only those a push client sends (`PUSH_CAPABILITIES`); anything else
  is refused rather than forwarded unread, since a capability can change what the
  receiving end does with the rest of the stream. The gateway should offer the
  client no others when it relays the upstream's advertisement.
- Signed pushes (push-cert) are refused: the commands would be inside a certificate.
- Push options (only after the `push-options` capability) are printable ASCII and
  spaces, one per line, ended by a flush.
- After the flush(es): the pack ("PACK" ...) when any command creates or updates a
  ref. When every command is a delete there is no pack, and nothing at all may
  follow; the same holds for a request with no command, which is what git sends
  as a probe ("0000") before a large push over HTTP. Such requests are complete
  only at the end of the body (`feed(b"")`), so nothing unread is ever forwarded.
- The head (everything before the pack) is at most `max_head` bytes (1 MiB: about
  ten thousand commands).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.http import NEED_DATA, Sentinel  # the same markers as the HTTP reader

MAX_PKT_LEN = 65520
"""The longest pkt-line, its 4 length digits included."""
MAX_PKT_PAYLOAD = MAX_PKT_LEN - 4
MAX_SIDEBAND_DATA = MAX_PKT_PAYLOAD - 1
"""side-band-64k: one byte names the channel, the rest is data."""
MAX_PUSH_HEAD = 1024 * 1024

FLUSH_PKT = b"0000"

OID_LENGTHS = {"sha1": 40, "sha256": 64}

# What a push client may ask for (git 2.39's send-pack sends report-status or
# report-status-v2, side-band-64k, quiet, atomic, push-options, object-format, agent,
# session-id; other clients also echo ofs-delta and delete-refs, which change nothing).
PUSH_CAPABILITIES = frozenset(
    {
        "report-status",
        "report-status-v2",
        "side-band-64k",
        "quiet",
        "atomic",
        "push-options",
        "ofs-delta",
        "delete-refs",
    }
)
PUSH_VALUE_CAPABILITIES = frozenset({"object-format", "agent", "session-id"})

SIDEBAND_DATA = 1
SIDEBAND_PROGRESS = 2
SIDEBAND_ERROR = 3

_HEX4 = re.compile(rb"[0-9a-fA-F]{4}")
_OID = re.compile(r"[0-9a-f]+")
_CAPABILITY = re.compile(r"([a-z0-9][a-z0-9-]*)(?:=([\x21-\x7e]+))?")
_PUSH_OPTION = re.compile(rb"[\x20-\x7e]+")
_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")


class PktLineError(ValueError):
    """The body is not a valid push request; nothing of it is forwarded. `offset` is
    where in the body the offending packet starts (None when it is about the whole
    body); the message says what was expected, quoting at most a ref name, a
    capability or four bytes."""

    def __init__(self, message: str, offset: int | None = None) -> None:
        self.message = message
        self.offset = offset
        super().__init__(message if offset is None else f"{message} (at byte {offset})")


class Special(enum.Enum):
    """The pkt-lines with no payload that mean something by their length alone."""

    FLUSH = 0
    DELIM = 1
    RESPONSE_END = 2


def read_pkt(buf: bytes | bytearray, pos: int = 0) -> tuple[bytes | Special, int] | None:
    """The packet starting at `buf[pos]` and the position after it, or None when `buf`
    does not hold all of it yet. PktLineError (offset relative to `buf`) when the
    length is not 4 hex digits or not a valid pkt-line length."""
    if len(buf) - pos < 4:
        return None
    head = bytes(buf[pos : pos + 4])
    if not _HEX4.fullmatch(head):
        raise PktLineError(f"a pkt-line starts with 4 hex digits, got {_show(head)}", offset=pos)
    length = int(head, 16)
    if length < 3:
        return Special(length), pos + 4
    if length == 3:
        raise PktLineError("pkt-line length 0003 is invalid (the length counts its 4 digits)", pos)
    if length > MAX_PKT_LEN:
        raise PktLineError(
            f"pkt-line length {length} is over the maximum of {MAX_PKT_LEN}", offset=pos
        )
    if len(buf) - pos < length:
        return None
    return bytes(buf[pos + 4 : pos + length]), pos + length


def _show(data: bytes) -> str:
    return repr(bytes(data))[1:]


# --- what a push asks for ----------------------------------------------------------


@dataclass(frozen=True)
class RefUpdate:
    """One command: `ref` goes from `old` to `new` (lower-case hex object ids; all
    zeros for "no object": a create has a zero `old`, a delete a zero `new`)."""

    old: str
    new: str
    ref: str

    @property
    def is_create(self) -> bool:
        return not self.old.strip("0")

    @property
    def is_delete(self) -> bool:
        return not self.new.strip("0")


@dataclass(frozen=True)
class PushRequest:
    """The head of a push: its commands in order, the capabilities as sent
    ("agent=git/2.39.5" keeps its value), shallow object ids, push options, and
    `pack_offset`, the byte in the body where the pack starts (the body's length
    when it has no pack)."""

    updates: tuple[RefUpdate, ...]
    capabilities: tuple[str, ...]
    shallow: tuple[str, ...]
    push_options: tuple[str, ...]
    pack_offset: int

    def capability(self, name: str) -> str | None:
        """The value of `name=value`, "" for a plain `name`, None when not sent."""
        return _capability_value(self.capabilities, name)

    @property
    def object_format(self) -> str:
        return self.capability("object-format") or "sha1"

    @property
    def sideband(self) -> bool:
        """The client reads the answer through side-band-64k."""
        return self.capability("side-band-64k") is not None

    @property
    def has_pack(self) -> bool:
        return any(not u.is_delete for u in self.updates)


class _State(enum.Enum):
    COMMANDS = "commands"
    OPTIONS = "push options"
    AFTER = "after the commands"
    DONE = "done"


class PushRequestParser:
    """The head of one push request body, h11 style: `feed(bytes)` (b"" at the end of
    the body), then `next_event()`, which returns NEED_DATA or the `PushRequest`.

    A request with a pack is complete as soon as "PACK" arrives, and the parser then
    wants no more bytes: the caller forwards what it fed (the head, and the pack from
    `pack_offset` on) and streams the rest itself. A request without a pack is
    complete only at the end of the body. Raises PktLineError.
    """

    def __init__(self, *, max_head: int = MAX_PUSH_HEAD) -> None:
        self._max_head = max_head
        self._buf = bytearray()
        self._base = 0  # body offset of self._buf[0]
        self._eof = False
        self._state = _State.COMMANDS
        self._updates: list[RefUpdate] = []
        self._refs: set[str] = set()
        self._caps: tuple[str, ...] = ()
        self._shallow: list[str] = []
        self._options: list[str] = []
        self._oid_len: int | None = None
        self._result: PushRequest | None = None
        self._error: PktLineError | None = None

    def feed(self, data: bytes) -> None:
        if self._state is _State.DONE:
            raise RuntimeError("the push request is complete; stream the rest yourself")
        if not data:
            self._eof = True
        elif self._eof:
            raise RuntimeError("data fed after the end of the body")
        else:
            self._buf += data

    def next_event(self) -> PushRequest | Sentinel:
        if self._error is not None:
            raise self._error
        try:
            return self._next_event()
        except PktLineError as e:
            self._error = e
            raise

    def _next_event(self) -> PushRequest | Sentinel:
        while self._result is None:
            if self._state is _State.AFTER:
                if not self._after():
                    return NEED_DATA
                continue
            offset = self._base
            try:
                pkt = read_pkt(self._buf)
            except PktLineError as e:
                raise PktLineError(e.message, offset) from None
            if pkt is None:
                self._need_more(offset)
                return NEED_DATA
            packet, end = pkt
            if offset + end > self._max_head:
                raise self._too_long()
            del self._buf[:end]
            self._base += end
            self._packet(packet, offset)
        return self._result

    # --- the states ------------------------------------------------------------------

    def _need_more(self, offset: int) -> None:
        """Before waiting: the body must not have ended, nor the head grown too long."""
        if len(self._buf) >= 4:
            declared = int(bytes(self._buf[:4]), 16)
            if offset + declared > self._max_head:
                raise self._too_long()
        if self._eof:
            if self._buf:
                raise PktLineError(
                    f"the body ends inside a pkt-line ({len(self._buf)} bytes of it arrived)",
                    offset,
                )
            where = {
                _State.COMMANDS: "the commands (no flush-pkt '0000' ended them)",
                _State.OPTIONS: "the push options (no flush-pkt '0000' ended them)",
            }[self._state]
            raise PktLineError(f"the body ends inside {where}", offset)

    def _too_long(self) -> PktLineError:
        return PktLineError(
            f"the commands of this push are longer than {self._max_head} bytes", None
        )

    def _packet(self, packet: bytes | Special, offset: int) -> None:
        if packet is Special.DELIM or packet is Special.RESPONSE_END:
            name = "delim-pkt (0001)" if packet is Special.DELIM else "response-end-pkt (0002)"
            raise PktLineError(
                f"{name} is protocol v2 framing; a push request (receive-pack) has none",
                offset,
            )
        if packet is Special.FLUSH:
            self._flush(offset)
            return
        assert isinstance(packet, bytes)
        if not packet:
            raise PktLineError(
                f"empty pkt-line (0004) in the {self._state.value}; git never sends one",
                offset,
            )
        line = packet[:-1] if packet.endswith(b"\n") else packet
        if self._state is _State.OPTIONS:
            self._push_option(line, offset)
        else:
            self._command_or_shallow(line, offset)

    def _flush(self, offset: int) -> None:
        if self._state is _State.COMMANDS:
            if self._shallow and not self._updates:
                self._check_oid_format(offset)
            wants_options = "push-options" in self._caps
            self._state = _State.OPTIONS if wants_options else _State.AFTER
        else:
            self._state = _State.AFTER

    def _command_or_shallow(self, line: bytes, offset: int) -> None:
        if line.startswith(b"shallow "):
            if self._updates:
                raise PktLineError("a shallow line after the commands (they come first)", offset)
            self._shallow.append(self._oid(line[len(b"shallow ") :], "shallow", offset))
            return
        if line == b"push-cert" or line.startswith(b"push-cert\0"):
            raise PktLineError(
                "signed pushes (git push --signed) are not supported through the gateway",
                offset,
            )
        command, nul, caps = line.partition(b"\0")
        if not self._updates:
            if not nul:
                raise PktLineError(
                    "the first command has no capability list (NUL and capabilities); "
                    "expected '<old-id> <new-id> <ref>\\0<capabilities>'",
                    offset,
                )
            self._caps = _capabilities(caps, offset)
        elif nul:
            raise PktLineError("a NUL in a command other than the first", offset)
        self._command(command, offset)

    def _command(self, command: bytes, offset: int) -> None:
        parts = command.split(b" ", 2)
        if len(parts) != 3:
            raise PktLineError(
                "a command is '<old-id> SP <new-id> SP <ref>', "
                f"got {len(parts)} space-separated field(s)",
                offset,
            )
        old = self._oid(parts[0], "old", offset)
        new = self._oid(parts[1], "new", offset)
        self._check_oid_format(offset)
        try:
            ref = parts[2].decode("utf-8")
        except UnicodeDecodeError:
            raise PktLineError("a ref name is not valid UTF-8", offset) from None
        why = ref_name_problem(ref)
        if why is not None:
            raise PktLineError(f"ref {ref!r}: {why}", offset)
        update = RefUpdate(old, new, ref)
        if update.is_create and update.is_delete:
            raise PktLineError(
                f"ref {ref!r}: both object ids are zero (neither a create nor a delete)", offset
            )
        if ref in self._refs:
            raise PktLineError(f"ref {ref!r} is named by more than one command", offset)
        self._refs.add(ref)
        self._updates.append(update)

    def _oid(self, text: bytes, what: str, offset: int) -> str:
        if len(text) not in (40, 64):
            raise PktLineError(
                f"{what} object id has {len(text)} characters; object ids are 40 "
                "(SHA-1) or 64 (SHA-256) hex digits",
                offset,
            )
        oid = text.decode("latin-1")
        if not _OID.fullmatch(oid):
            raise PktLineError(f"{what} object id is not lower-case hex", offset)
        if self._oid_len is None:
            self._oid_len = len(oid)
        elif len(oid) != self._oid_len:
            raise PktLineError(
                f"{what} object id has {len(oid)} hex digits where earlier ones had "
                f"{self._oid_len}; one push uses one object format",
                offset,
            )
        return oid

    def _check_oid_format(self, offset: int) -> None:
        named = _capability_value(self._caps, "object-format")
        fmt = named or "sha1"
        if self._oid_len is None or self._oid_len == OID_LENGTHS[fmt]:
            return
        hint = "" if named else "; SHA-256 needs the object-format=sha256 capability"
        raise PktLineError(
            f"object ids have {self._oid_len} hex digits, but the object format is {fmt} "
            f"({OID_LENGTHS[fmt]}){hint}",
            offset,
        )

    def _push_option(self, line: bytes, offset: int) -> None:
        if not _PUSH_OPTION.fullmatch(line):
            raise PktLineError(
                "a push option is printable ASCII and spaces (git push -o), one per line",
                offset,
            )
        self._options.append(line.decode("ascii"))

    def _after(self) -> bool:
        """True once the request is complete; False to wait for more bytes."""
        buf = self._buf
        offset = self._base
        if any(not u.is_delete for u in self._updates):
            if len(buf) < 4 and not self._eof:
                return False
            if buf[:4] != b"PACK":
                if not buf or b"PACK".startswith(buf):
                    raise PktLineError(
                        "the body ends before the pack; a push that creates or updates "
                        "refs carries one",
                        offset,
                    )
                raise PktLineError(
                    f"expected the pack ('PACK') after the commands, got {_show(buf[:4])}",
                    offset,
                )
            self._finish(offset)
            return True
        if buf:
            what = "a delete-only push" if self._updates else "a push with no commands"
            raise PktLineError(f"{what} has no pack, but more bytes follow the flush-pkt", offset)
        if not self._eof:
            return False
        self._finish(offset)
        return True

    def _finish(self, pack_offset: int) -> None:
        self._result = PushRequest(
            updates=tuple(self._updates),
            capabilities=self._caps,
            shallow=tuple(self._shallow),
            push_options=tuple(self._options),
            pack_offset=pack_offset,
        )
        self._state = _State.DONE
        self._buf = bytearray()


def _capability_value(caps: Sequence[str], name: str) -> str | None:
    for cap in caps:
        key, sep, value = cap.partition("=")
        if key == name:
            return value if sep else ""
    return None


def _capabilities(raw: bytes, offset: int) -> tuple[str, ...]:
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise PktLineError("the capability list is not ASCII", offset) from None
    caps = tuple(word for word in text.split(" ") if word)
    seen: set[str] = set()
    for cap in caps:
        m = _CAPABILITY.fullmatch(cap)
        if m is None:
            raise PktLineError(f"malformed capability {cap[:40]!r}", offset)
        name, value = m.groups()
        if name in seen:
            raise PktLineError(f"capability {name!r} is sent twice", offset)
        seen.add(name)
        if name in PUSH_VALUE_CAPABILITIES:
            if value is None:
                raise PktLineError(f"capability {name!r} needs a value ({name}=...)", offset)
        elif name in PUSH_CAPABILITIES:
            if value is not None:
                raise PktLineError(f"capability {name!r} takes no value", offset)
        elif name == "push-cert":
            raise PktLineError(
                "signed pushes (git push --signed) are not supported through the gateway",
                offset,
            )
        else:
            raise PktLineError(
                f"unknown push capability {name!r}; the gateway forwards only those it understands",
                offset,
            )
        if name == "object-format" and value not in OID_LENGTHS:
            raise PktLineError(f"unknown object format {value!r} (sha1 or sha256)", offset)
    if "report-status" in seen and "report-status-v2" in seen:
        raise PktLineError("both report-status and report-status-v2 are asked for", offset)
    return caps


def ref_name_problem(ref: str) -> str | None:
    """Why `ref` is not a full ref name `git check-ref-format` accepts under refs/, or
    None when it is one."""
    if not ref.startswith("refs/"):
        return "ref names start with 'refs/'"
    if ref.endswith("/"):
        return "a ref name does not end with '/'"
    if "//" in ref:
        return "a ref name has no empty component ('//')"
    if _REF_FORBIDDEN.search(ref):
        return (
            "a ref name has no control characters, spaces or any of "
            "'~', '^', ':', '?', '*', '[', '\\'"
        )
    if ".." in ref:
        return "a ref name has no '..'"
    if "@{" in ref:
        return "a ref name has no '@{'"
    if ref.endswith("."):
        return "a ref name does not end with '.'"
    for component in ref.split("/"):
        if component.startswith("."):
            return "no component of a ref name starts with '.'"
        if component.endswith(".lock"):
            return "no component of a ref name ends with '.lock'"
    return None


# --- what the gateway answers ------------------------------------------------------


def encode_pkt(data: bytes) -> bytes:
    """One data pkt-line. ValueError for empty data (a flush is `flush()`, and empty
    pkt-lines are not sent) or more than MAX_PKT_PAYLOAD bytes."""
    if not data:
        raise ValueError("an empty pkt-line is not sent; a flush-pkt is flush()")
    if len(data) > MAX_PKT_PAYLOAD:
        raise ValueError(f"{len(data)} bytes do not fit in one pkt-line ({MAX_PKT_PAYLOAD})")
    return b"%04x" % (len(data) + 4) + data


def flush() -> bytes:
    return FLUSH_PKT


def encode_sideband(channel: int, data: bytes) -> bytes:
    """`data` on side-band-64k `channel` (1 data, 2 progress, 3 error), split into as
    many pkt-lines as it needs."""
    if channel not in (SIDEBAND_DATA, SIDEBAND_PROGRESS, SIDEBAND_ERROR):
        raise ValueError(f"side-band channel {channel} (1, 2 or 3)")
    band = bytes([channel])
    return b"".join(
        encode_pkt(band + data[i : i + MAX_SIDEBAND_DATA])
        for i in range(0, len(data), MAX_SIDEBAND_DATA)
    )


def report_status(
    unpack_ok: bool,
    results: Sequence[tuple[str, str | None]],
    sideband: bool,
    *,
    unpack_error: str = "not unpacked",
    message: str | None = None,
) -> bytes:
    """A receive-pack result body in git's report-status format: `unpack ok` (or
    `unpack <unpack_error>`), then `ok <ref>` or `ng <ref> <reason>` per (ref, reason)
    in `results` (reason None is ok), then a flush. A refusal by policy is
    `unpack_ok=True` with ng lines, as when a pre-receive hook declines: `git push`
    then prints "! [remote rejected] <ref> (<reason>)" for each.

    With `sideband` (the client sent side-band-64k: `PushRequest.sideband`) the report
    travels on channel 1, `message` (if any) first on channel 2, which git prints as
    "remote: <line>", and a final flush ends the stream. Without side-band there is
    nowhere to show `message`, and it is dropped. The same format answers
    report-status-v2 (its option lines are optional).
    """
    if not results:
        raise ValueError("report-status names at least one ref")
    unpack = "ok" if unpack_ok else unpack_error
    lines = [f"unpack {unpack}"]
    for ref, reason in results:
        lines.append(f"ok {ref}" if reason is None else f"ng {ref} {reason}")
    for text in (unpack, *(ref for ref, _ in results), *(r for _, r in results if r is not None)):
        if not text or any(c in text for c in "\n\r\0"):
            raise ValueError(f"{text!r}: report-status lines hold no NUL, CR or LF, nor empties")
    report = b"".join(encode_pkt(line.encode("utf-8") + b"\n") for line in lines) + FLUSH_PKT
    if not sideband:
        return report
    out = b""
    if message:
        text = message if message.endswith("\n") else message + "\n"
        out += encode_sideband(SIDEBAND_PROGRESS, text.encode("utf-8"))
    return out + encode_sideband(SIDEBAND_DATA, report) + FLUSH_PKT
