"""gateway/pktline.py with plain bytes: real pushes captured from git 2.39 parse to
what git meant, fed whole or a byte at a time; every malformed body is refused with
a message that says what is wrong; report-status is byte for byte what git sends.

The captures: `git push` over HTTP to `git http-backend` (serving bare repositories
with http.receivepack on), with the POST bodies saved as they arrived. Author and
committer dates were fixed, so the object ids are reproducible.
"""

from __future__ import annotations

import random

import pytest

from gateway.pktline import (
    MAX_PKT_LEN,
    MAX_PKT_PAYLOAD,
    MAX_SIDEBAND_DATA,
    NEED_DATA,
    PktLineError,
    PushRequest,
    PushRequestParser,
    RefUpdate,
    Special,
    encode_pkt,
    encode_sideband,
    flush,
    read_pkt,
    ref_name_problem,
    report_status,
)

# --- captured from git 2.39.5 --------------------------------------------------------

# git push origin main (to an empty repository)
CREATE_MAIN = (
    b"00af"
    b"0000000000000000000000000000000000000000 "
    b"96041287bf6f7dbf01e1ef1463da0c3b1758bbf2 refs/heads/main\x00 "
    b"report-status-v2 side-band-64k quiet object-format=sha1 agent=git/2.39.5"
    b"0000"
    + bytes.fromhex(
        "5041434b00000002000000039a08789c2b294a4d5530b03437b3343548364c4b494a4e3235323136"
        "4d343136b634343630344f4a33303149324e34b548e34a2c2dc9c82f520851b0297148ad48cc2dc8"
        "49d54bcecfb5533034378002056d10c90514cdcd2c2949254a31577e5e2a1700a8ff265dad01789c"
        "33343030333151486438c768a6caccbde2f64ab6ef61d3eae7cd593cc5cd0b007f110a7e36789ccb"
        "48cdc9c9e70200084b021faedfa1da6564a526246a3785b47f8b0a6f3184e8"
    )
)

# git push origin main feature v1
UPDATE_BRANCH_AND_TAG = (
    b"00af"
    b"96041287bf6f7dbf01e1ef1463da0c3b1758bbf2 "
    b"214f76c51e3292b7972b21cb9f30924184b105e1 refs/heads/main\x00 "
    b"report-status-v2 side-band-64k quiet object-format=sha1 agent=git/2.39.5"
    b"0068"
    b"0000000000000000000000000000000000000000 "
    b"214f76c51e3292b7972b21cb9f30924184b105e1 refs/heads/feature"
    b"0062"
    b"0000000000000000000000000000000000000000 "
    b"214f76c51e3292b7972b21cb9f30924184b105e1 refs/tags/v1"
    b"0000"
    + bytes.fromhex(
        "5041434b00000002000000039a0b789c8d8a510a42211000ff3d85ff41b8baea0a111da20bb8ba52"
        "d0eb3d64a38e5f4107683ee663189d22d6d5e6c511532cdd638b05905a11823c420f48c882318564"
        "b63ae5aeb62487e029f34823771e0e046400a6d0ab6b812147621eded4875ed669cff6a02779d565"
        "bbc9beadcbd142763fecee6bf3a9cb5555fe9a8d3e57f30663c93461ad01789c3334303033315148"
        "647039f2c79249f4c761b6bd85afb5145e1baa36fb1e02008e030afc3a789ccb48cdc9c9e72a29cf"
        "e7020014e403834cdf0050a9cb3956eac765e9adbfd1c4ef780536"
    )
)

# git push origin :feature
DELETE_ONLY = (
    b"00b2"
    b"214f76c51e3292b7972b21cb9f30924184b105e1 "
    b"0000000000000000000000000000000000000000 refs/heads/feature\x00 "
    b"report-status-v2 side-band-64k quiet object-format=sha1 agent=git/2.39.5"
    b"0000"
)

# git push --atomic -o ci.skip -o 'topic=x y' origin main:refs/heads/sandbox/one
ATOMIC_WITH_OPTIONS = (
    b"00ca"
    b"0000000000000000000000000000000000000000 "
    b"e0dcbb8353cf416f266aef7e4e6139e18daec0f0 refs/heads/sandbox/one\x00 "
    b"report-status-v2 side-band-64k quiet atomic push-options "
    b"object-format=sha1 agent=git/2.39.5"
    b"0000"
    b"000bci.skip"
    b"000dtopic=x y"
    b"0000"
    + bytes.fromhex(
        "5041434b00000002000000039c0b789c8d8e410ac2301045f73945f6826426992601291ec20b64d2"
        "09158c2d61048f6f050fe05bfcc5e32f9e0e111b1770c235d592a901d7162120132fa91d6a12499e"
        "12d162f632e4a91621b4385502f19891638ec8089573f32e638014181c0998f2d2751bf6662f7a95"
        "77e9fb43ce75ebb385e87ed8d377cd61fb5d55fe3a1b5d8f6cf30126753549ad01789c3334303033"
        "3151486470bf18e590d0c15ccdf977c3eefda29fe72b4f7e5508008b440bb1b001789ccb48cdc9c9"
        "e72a2907e28ca2d4542e00328105a58d3995d9bbf9215b85bac0b6645e4afc54c32db7"
    )
)

# git push (a SHA-256 repository) main
SHA256_CREATE = (
    b"00e1"
    b"0000000000000000000000000000000000000000000000000000000000000000 "
    b"b66771dfb835251d46c1328c0708eac023a7c332206433e213c21bfac470441b "
    b"refs/heads/main\x00 report-status-v2 side-band-64k quiet "
    b"object-format=sha256 agent=git/2.39.5"
    b"0000"
    + bytes.fromhex(
        "5041434b0000000200000003920a789c8d8a410a02310c45f73d45f682349d69d301193c841768d3"
        "04056b6588e0f11dc103f8e1bdc5e3db260249aafa25b0524b5959034bad9970e286b233cdaa9e63"
        "205ca806254ebe61426c73ce514a74e565d7b1c1054e769677e9cfbb1c79f41590fc6f70f8daedb5"
        "dfcce4afb31b0f711f51202e51a902789c012900d6ff3130303634342061002cf8d83d9ee29543b3"
        "4a87727421fdecb7e3f3a183d337639025de576db9ebb470bf148336789ccb48cdc9c9e70200084b"
        "021f342d37b90170614a2dc15ff91a04a8d8259e9d5e4d6188032e66d8ce93850aca"
    )
)

# from a clone --depth 1: git push origin HEAD:refs/heads/sandbox/shallow2
SHALLOW_CREATE = (
    b"0035shallow 214f76c51e3292b7972b21cb9f30924184b105e1\n"
    b"00bb"
    b"0000000000000000000000000000000000000000 "
    b"345f2e777096042f92ecee3416b01fd72eb37c30 refs/heads/sandbox/shallow2\x00 "
    b"report-status-v2 side-band-64k quiet object-format=sha1 agent=git/2.39.5"
    b"0000"
    + bytes.fromhex(
        "5041434b0000000200000003940c789c8d8b410ac2301045f73945f6826426492701110fe10532e9"
        "2f155a5b6a448fafa207f02fdee2f17edb004b4821394082780fe65ea238eefabe32c32756756988"
        "eacd5a365c9b650a837435123c6756c9c2ca54350fde650e9482928b2053ee6d5c367bb68776c2b3"
        "cceb847d5de6a32571bfd9dd87e66de74b6bf82b36b7b14cd3f2f89ecc0b10583787aa03789c3334"
        "303033315148647039f2c79249f4c761b6bd85afb5145e1baa36fb1e328448263144543fdb72f8a7"
        "fde4239d0704a577854e13a9523b0d006df2170532789cabe0020000fc0083c459fbdcbf535dd65f"
        "3a5c56ef9d0692e5d92849"
    )
)

# a 3 MB push (sent chunked after the probe): its head and the pack's first 32 bytes
BIG_PUSH_HEAD = (
    b"00b6"
    b"0000000000000000000000000000000000000000 "
    b"33d4b154c6d4328611eee62cf25294f378218c16 refs/heads/sandbox/big\x00 "
    b"report-status-v2 side-band-64k quiet object-format=sha1 agent=git/2.39.5"
    b"0000" + bytes.fromhex("5041434b00000002000000039a0b789c8d8a4d0ac2301046f73945f682e4679a")
)

# what git POSTs first when a push is over http.postBuffer
PROBE = b"0000"

# git receive-pack's answer to CREATE_MAIN
REPLY_OK = b"002e\x01000eunpack ok\n0017ok refs/heads/main\n00000000"

# its answer when a pre-receive hook printed 'hook says no' and exited 1
REPLY_HOOK_DECLINED = (
    b"0012\x02hook says no\n"
    b"0073"
    b"\x01000eunpack ok\n002eng refs/heads/x pre-receive hook declined\n002eng "
    b"refs/heads/y pre-receive hook declined\n0000"
    b"0000"
)


ZERO = "0" * 40
A = "a" * 40
B = "b" * 40
CAPS = b"report-status side-band-64k object-format=sha1 agent=git/2.39.5"


def pkt(text: bytes | str) -> bytes:
    return encode_pkt(text.encode() if isinstance(text, str) else text)


def command(old: str, new: str, ref: str, caps: bytes | None = None) -> bytes:
    line = f"{old} {new} {ref}".encode()
    return pkt(line if caps is None else line + b"\0" + caps)


def body(*lines: bytes, pack: bool = True) -> bytes:
    """Commands (the first with CAPS unless it already has a NUL), a flush, a pack."""
    return b"".join(lines) + flush() + (b"PACK\x00\x00\x00\x02\x00\x00\x00\x00" if pack else b"")


def parse(raw: bytes, step: int | None = None, *, end: bool = True, **kw) -> PushRequest:
    """The PushRequest of `raw`, fed whole or `step` bytes at a time, then (if `end`
    and the parser still wants data) the end of the body."""
    parser = PushRequestParser(**kw)
    pieces = [raw] if step is None else [raw[i : i + step] for i in range(0, len(raw), step)]
    event = NEED_DATA
    for piece in pieces:
        parser.feed(piece)
        event = parser.next_event()
        if event is not NEED_DATA:
            return event
    if end:
        parser.feed(b"")
        event = parser.next_event()
    assert event is not NEED_DATA
    return event


def malformed(raw: bytes, match: str, **kw) -> PktLineError:
    """`raw` is refused with `match` in the message, fed whole and byte by byte."""
    with pytest.raises(PktLineError, match=match) as whole:
        parse(raw, **kw)
    with pytest.raises(PktLineError, match=match) as bytewise:
        parse(raw, step=1, **kw)
    assert str(whole.value) == str(bytewise.value)
    return whole.value


# --- real pushes ---------------------------------------------------------------------

CAPTURED = {
    "create": CREATE_MAIN,
    "update+tag": UPDATE_BRANCH_AND_TAG,
    "delete": DELETE_ONLY,
    "atomic+options": ATOMIC_WITH_OPTIONS,
    "sha256": SHA256_CREATE,
    "shallow": SHALLOW_CREATE,
    "big": BIG_PUSH_HEAD,
    "probe": PROBE,
}
GIT_CAPS = ("report-status-v2", "side-band-64k", "quiet", "object-format=sha1", "agent=git/2.39.5")


def test_create_main() -> None:
    req = parse(CREATE_MAIN)
    assert req == PushRequest(
        updates=(RefUpdate(ZERO, "96041287bf6f7dbf01e1ef1463da0c3b1758bbf2", "refs/heads/main"),),
        capabilities=GIT_CAPS,
        shallow=(),
        push_options=(),
        pack_offset=179,
    )
    assert CREATE_MAIN[179:183] == b"PACK"
    assert req.updates[0].is_create and not req.updates[0].is_delete
    assert req.sideband and req.has_pack and req.object_format == "sha1"
    assert req.capability("agent") == "git/2.39.5"
    assert req.capability("quiet") == ""
    assert req.capability("atomic") is None


def test_update_branch_and_tag() -> None:
    req = parse(UPDATE_BRANCH_AND_TAG)
    new = "214f76c51e3292b7972b21cb9f30924184b105e1"
    assert req.updates == (
        RefUpdate("96041287bf6f7dbf01e1ef1463da0c3b1758bbf2", new, "refs/heads/main"),
        RefUpdate(ZERO, new, "refs/heads/feature"),
        RefUpdate(ZERO, new, "refs/tags/v1"),
    )
    update = req.updates[0]
    assert not update.is_create and not update.is_delete
    assert req.pack_offset == UPDATE_BRANCH_AND_TAG.index(b"PACK") == 381


def test_delete_only_has_no_pack_and_ends_with_the_body() -> None:
    req = parse(DELETE_ONLY)
    assert req.updates == (
        RefUpdate("214f76c51e3292b7972b21cb9f30924184b105e1", ZERO, "refs/heads/feature"),
    )
    assert req.updates[0].is_delete and not req.has_pack
    assert req.pack_offset == len(DELETE_ONLY)
    parser = PushRequestParser()
    parser.feed(DELETE_ONLY)
    assert parser.next_event() is NEED_DATA  # more could follow until the body ends
    parser.feed(b"")
    assert parser.next_event() == req


def test_atomic_push_with_options() -> None:
    req = parse(ATOMIC_WITH_OPTIONS)
    assert req.push_options == ("ci.skip", "topic=x y")
    assert req.capability("atomic") == "" and req.capability("push-options") == ""
    assert req.updates[0].ref == "refs/heads/sandbox/one"
    assert req.pack_offset == ATOMIC_WITH_OPTIONS.index(b"PACK")


def test_sha256_push() -> None:
    req = parse(SHA256_CREATE)
    assert req.object_format == "sha256"
    (update,) = req.updates
    assert update.old == "0" * 64 and update.is_create
    assert update.new == "b66771dfb835251d46c1328c0708eac023a7c332206433e213c21bfac470441b"


def test_shallow_push() -> None:
    req = parse(SHALLOW_CREATE)
    assert req.shallow == ("214f76c51e3292b7972b21cb9f30924184b105e1",)
    assert req.updates[0].ref == "refs/heads/sandbox/shallow2"


def test_big_push_is_complete_at_the_pack_without_the_rest() -> None:
    parser = PushRequestParser()
    parser.feed(BIG_PUSH_HEAD)  # no end of body: the 3 MB pack is still on its way
    req = parser.next_event()
    assert isinstance(req, PushRequest)
    assert req.pack_offset == 186
    with pytest.raises(RuntimeError):
        parser.feed(b"more of the pack")


def test_probe_before_a_large_push() -> None:
    assert parse(PROBE) == PushRequest((), (), (), (), pack_offset=4)


@pytest.mark.parametrize("name", CAPTURED)
def test_captures_fed_in_any_pieces_give_the_same_request(name: str) -> None:
    raw = CAPTURED[name]
    expected = parse(raw)
    assert parse(raw, step=1) == expected
    rng = random.Random(name)
    parser = PushRequestParser()
    pos, event = 0, NEED_DATA
    while event is NEED_DATA and pos < len(raw):
        size = rng.randint(1, 40)
        parser.feed(raw[pos : pos + size])
        pos += size
        event = parser.next_event()
    if event is NEED_DATA:
        parser.feed(b"")
        event = parser.next_event()
    assert event == expected


# --- hand-made valid bodies ----------------------------------------------------------


def test_trailing_lf_is_optional_everywhere() -> None:
    with_lf = body(
        pkt(f"shallow {B}\n"),
        pkt(f"{ZERO} {A} refs/heads/x\0".encode() + CAPS + b" push-options\n"),
        pkt(f"{ZERO} {A} refs/heads/y\n"),
        flush(),
        pkt("opt\n"),
    )
    without = body(
        pkt(f"shallow {B}"),
        pkt(f"{ZERO} {A} refs/heads/x\0".encode() + CAPS + b" push-options"),
        pkt(f"{ZERO} {A} refs/heads/y"),
        flush(),
        pkt("opt"),
    )
    a, b = parse(with_lf), parse(without)
    assert (a.updates, a.capabilities, a.shallow, a.push_options) == (
        b.updates,
        b.capabilities,
        b.shallow,
        b.push_options,
    )
    assert a.push_options == ("opt",)


def test_upper_case_length_digits_are_accepted() -> None:
    packet = next(
        p
        for n in range(100, 120)
        if (p := pkt(f"{ZERO} {A} refs/heads/{'x' * n}\0".encode() + CAPS))[:4].upper() != p[:4]
    )
    req = parse(body(packet[:4].upper() + packet[4:]))
    assert req.updates[0].ref.startswith("refs/heads/xxx")


def test_capability_list_without_a_leading_space() -> None:
    req = parse(body(command(ZERO, A, "refs/heads/x", b"report-status  side-band-64k")))
    assert req.capabilities == ("report-status", "side-band-64k")


def test_first_command_may_have_an_empty_capability_list() -> None:
    req = parse(body(command(ZERO, A, "refs/heads/x", b"")))
    assert req.capabilities == () and not req.sideband


def test_non_ascii_utf8_ref_names_pass() -> None:
    req = parse(body(command(ZERO, A, "refs/heads/caf\u00e9", CAPS)))
    assert req.updates[0].ref == "refs/heads/caf\u00e9"


def test_shallow_lines_with_no_command() -> None:
    req = parse(pkt(f"shallow {A}\n") + flush())
    assert req.shallow == (A,) and req.updates == ()


def test_the_head_limit() -> None:
    raw = body(command(ZERO, A, "refs/heads/x", CAPS))
    assert parse(raw, max_head=len(raw) - 12).updates  # the pack does not count
    malformed(raw, "longer than 100 bytes", max_head=100)


def test_a_packet_declared_past_the_limit_is_refused_before_it_arrives() -> None:
    parser = PushRequestParser(max_head=1000)
    parser.feed(b"fff0" + b"x" * 10)
    with pytest.raises(PktLineError, match="longer than 1000 bytes"):
        parser.next_event()


def test_an_error_stays() -> None:
    parser = PushRequestParser()
    parser.feed(b"00zz")
    with pytest.raises(PktLineError) as first:
        parser.next_event()
    with pytest.raises(PktLineError) as again:
        parser.next_event()
    assert again.value is first.value


def test_feeding_after_the_end_is_a_programming_error() -> None:
    parser = PushRequestParser()
    parser.feed(b"")
    with pytest.raises(RuntimeError):
        parser.feed(b"0000")


# --- malformed bodies ----------------------------------------------------------------

FIRST = command(ZERO, A, "refs/heads/x", CAPS)


def with_options(*options: bytes) -> bytes:
    first = command(ZERO, A, "refs/heads/x", CAPS + b" push-options")
    return body(first + flush() + b"".join(options))


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        pytest.param(b"00zz" + b"x" * 40, "4 hex digits", id="bad-hex"),
        pytest.param(b"+0a3" + b"x" * 40, "4 hex digits", id="sign-in-length"),
        pytest.param(b" 0a3" + b"x" * 40, "4 hex digits", id="space-in-length"),
        pytest.param(b"0003", "0003 is invalid", id="length-3"),
        pytest.param(b"fff1" + b"x" * 65600, "over the maximum of 65520", id="too-long"),
        pytest.param(b"ffff", "over the maximum", id="length-ffff"),
        pytest.param(FIRST[:50], r"ends inside a pkt-line \(50 bytes", id="truncated-packet"),
        pytest.param(b"00", r"ends inside a pkt-line \(2 bytes", id="truncated-length"),
        pytest.param(FIRST, "ends inside the commands", id="no-flush"),
        pytest.param(b"", "ends inside the commands", id="empty-body"),
        pytest.param(b"0004" + FIRST, r"empty pkt-line \(0004\)", id="empty-packet"),
        pytest.param(b"0001" + FIRST, "delim-pkt.*protocol v2", id="delim"),
        pytest.param(FIRST + b"0002", "response-end-pkt.*protocol v2", id="response-end"),
        pytest.param(
            body(command(ZERO, "a" * 39, "refs/heads/x", CAPS)),
            "new object id has 39 characters",
            id="oid-39",
        ),
        pytest.param(
            body(command(ZERO + "0", A, "refs/heads/x", CAPS)),
            "old object id has 41 characters",
            id="oid-41",
        ),
        pytest.param(
            body(command(ZERO, "g" * 40, "refs/heads/x", CAPS)), "not lower-case hex", id="non-hex"
        ),
        pytest.param(
            body(command(ZERO, "A" * 40, "refs/heads/x", CAPS)), "not lower-case hex", id="upper"
        ),
        pytest.param(
            body(FIRST, command(ZERO, "a" * 64, "refs/heads/y")),
            "64 hex digits where earlier ones had 40",
            id="mixed-oid-lengths",
        ),
        pytest.param(
            body(pkt(f"shallow {'a' * 64}"), FIRST),
            "40 hex digits where earlier ones had 64",
            id="shallow-other-length",
        ),
        pytest.param(
            body(command("0" * 64, "a" * 64, "refs/heads/x", b"report-status")),
            "object format is sha1.*object-format=sha256 capability",
            id="sha256-without-object-format",
        ),
        pytest.param(
            body(command("0" * 64, "a" * 64, "refs/heads/x", b"")),
            "object format is sha1",
            id="sha256-with-empty-capabilities",
        ),
        pytest.param(
            body(command(ZERO, A, "refs/heads/x", b"object-format=sha256")),
            r"40 hex digits, but the object format is sha256 \(64\)",
            id="sha1-ids-sha256-format",
        ),
        pytest.param(
            body(pkt(f"shallow {A}"), command("0" * 64, "a" * 64, "r", b"object-format=sha256")),
            "64 hex digits where earlier ones had 40",
            id="shallow-sha1-commands-sha256",
        ),
        pytest.param(
            body(pkt(f"shallow {A}"), command(ZERO, A, "refs/heads/x", b"object-format=sha256")),
            "object format is sha256",
            id="shallow-sha1-format-sha256",
        ),
        pytest.param(
            body(command(ZERO, A, "refs/heads/x", b"object-format=md5")),
            "unknown object format 'md5'",
            id="unknown-object-format",
        ),
        pytest.param(
            body(command(ZERO, A, "refs/heads/x")),
            "first command has no capability list",
            id="first-without-nul",
        ),
        pytest.param(
            body(FIRST, command(ZERO, A, "refs/heads/y", b"quiet")),
            "NUL in a command other than the first",
            id="second-with-nul",
        ),
        pytest.param(
            body(FIRST, pkt(f"shallow {B}")), "shallow line after the commands", id="late-shallow"
        ),
        pytest.param(
            body(pkt(f"shallow {B}x"), FIRST), "shallow object id has 41", id="shallow-bad-oid"
        ),
        pytest.param(
            FIRST + flush() + pkt("ci.skip") + flush() + b"PACK",
            r"expected the pack \('PACK'\) after the commands, got '000b'",
            id="options-without-capability",
        ),
        pytest.param(
            command(B, ZERO, "refs/heads/x", CAPS) + flush() + pkt("ci.skip") + flush(),
            "delete-only push has no pack, but more bytes follow",
            id="options-without-capability-delete",
        ),
        pytest.param(
            FIRST + flush() + b"JUNKJUNK", r"expected the pack.*got 'JUNK'", id="garbage-for-pack"
        ),
        pytest.param(FIRST + flush() + b"PAC", "ends before the pack", id="short-pack"),
        pytest.param(FIRST + flush(), "ends before the pack", id="missing-pack"),
        pytest.param(
            command(B, ZERO, "refs/heads/x", CAPS) + flush() + b"PACK",
            "delete-only push has no pack, but more bytes follow",
            id="pack-after-deletes",
        ),
        pytest.param(flush() + b"x", "push with no commands has no pack", id="data-after-probe"),
        pytest.param(
            with_options(pkt("a\tb")),
            "printable ASCII",
            id="option-with-tab",
        ),
        pytest.param(
            with_options(pkt("caf\u00e9")),
            "printable ASCII",
            id="option-non-ascii",
        ),
        pytest.param(
            command(ZERO, A, "refs/heads/x", CAPS + b" push-options") + flush() + pkt("o"),
            "ends inside the push options",
            id="options-without-flush",
        ),
        pytest.param(
            with_options(b"0004"),
            r"empty pkt-line \(0004\) in the push options",
            id="empty-option",
        ),
        pytest.param(
            body(FIRST, command(B, A, "refs/heads/x")),
            "named by more than one command",
            id="duplicate-ref",
        ),
        pytest.param(
            body(command(ZERO, ZERO, "refs/heads/x", CAPS)),
            "both object ids are zero",
            id="zero-to-zero",
        ),
        pytest.param(
            body(pkt(f"{ZERO} {A}\0".encode() + CAPS)), "got 2 space-separated", id="no-ref"
        ),
        pytest.param(
            body(command(ZERO, A, "refs/heads/x", b"report-status frobnicate")),
            "unknown push capability 'frobnicate'",
            id="unknown-capability",
        ),
        pytest.param(
            body(command(ZERO, A, "refs/heads/x", b"quiet quiet")),
            "'quiet' is sent twice",
            id="capability-twice",
        ),
        pytest.param(
            body(command(ZERO, A, "refs/heads/x", b"quiet=1")),
            "'quiet' takes no value",
            id="capability-with-value",
        ),
        pytest.param(
            body(command(ZERO, A, "refs/heads/x", b"agent")),
            r"'agent' needs a value",
            id="agent-without-value",
        ),
        pytest.param(
            body(command(ZERO, A, "refs/heads/x", b"Report-Status")),
            "malformed capability",
            id="capability-upper-case",
        ),
        pytest.param(
            body(command(ZERO, A, "refs/heads/x", b"report-status\tquiet")),
            "malformed capability",
            id="capability-tab",
        ),
        pytest.param(
            body(command(ZERO, A, "refs/heads/x", "agent=caf\u00e9".encode())),
            "capability list is not ASCII",
            id="capability-non-ascii",
        ),
        pytest.param(
            body(command(ZERO, A, "refs/heads/x", b"report-status report-status-v2")),
            "both report-status and report-status-v2",
            id="both-report-statuses",
        ),
        pytest.param(
            body(command(ZERO, A, "refs/heads/x", b"report-status push-cert=1234-abc")),
            "signed pushes",
            id="push-cert-capability",
        ),
        pytest.param(
            body(pkt(b"push-cert\0report-status\n"), pkt("certificate version 0.1\n")),
            "signed pushes",
            id="push-cert-line",
        ),
        pytest.param(
            body(pkt(f"{ZERO} {A} ".encode() + b"refs/heads/\xff\0" + CAPS)),
            "not valid UTF-8",
            id="ref-not-utf8",
        ),
    ],
)
def test_malformed_bodies(raw: bytes, match: str) -> None:
    malformed(raw, match)


def test_errors_say_where() -> None:
    second_at = len(FIRST)
    e = malformed(body(FIRST, command(ZERO, "g" * 40, "refs/heads/y")), "not lower-case hex")
    assert e.offset == second_at
    assert str(e).endswith(f"(at byte {second_at})")


@pytest.mark.parametrize(
    ("ref", "rule"),
    [
        ("heads/main", "start with 'refs/'"),
        ("HEAD", "start with 'refs/'"),
        ("refs/heads/a..b", "'..'"),
        ("refs/heads/a b", "spaces"),
        ("refs/heads/a\tb", "control characters"),
        ("refs/heads/a\x7fb", "control characters"),
        ("refs/heads/a\x01b", "control characters"),
        ("refs/heads/a~1", "'~'"),
        ("refs/heads/a^", "'\\^'"),
        ("refs/heads/a:b", "':'"),
        ("refs/heads/a?", "'\\?'"),
        ("refs/heads/a*", "'\\*'"),
        ("refs/heads/a[b", "'\\['"),
        ("refs/heads/a\\b", "'\\\\'"),
        ("refs/heads/a@{1}", "'@\\{'"),
        ("refs/heads/.hidden", "starts with '.'"),
        ("refs/.heads/x", "starts with '.'"),
        ("refs/heads/x.lock", "ends with '.lock'"),
        ("refs/heads/x.lock/y", "ends with '.lock'"),
        ("refs/heads/x/", "end with '/'"),
        ("refs/heads/x.", "end with '.'"),
        ("refs/heads//x", "'//'"),
    ],
)
def test_bad_ref_names(ref: str, rule: str) -> None:
    problem = ref_name_problem(ref)
    assert problem is not None
    e = malformed(body(command(ZERO, A, ref, CAPS)), "ref .*: .*" + rule)
    assert problem in e.message


@pytest.mark.parametrize(
    "ref",
    [
        "refs/heads/main",
        "refs/heads/sandbox/feature-1",
        "refs/tags/v1.0",
        "refs/heads/a.b",
        "refs/heads/x@y",
        "refs/heads/@",
        "refs/heads/a.lockx",
        "refs/for/main%topic=x",
        "refs/heads/caf\u00e9",
    ],
)
def test_good_ref_names(ref: str) -> None:
    assert ref_name_problem(ref) is None


# --- framing -------------------------------------------------------------------------


def test_read_pkt() -> None:
    assert read_pkt(b"0000") == (Special.FLUSH, 4)
    assert read_pkt(b"0001") == (Special.DELIM, 4)
    assert read_pkt(b"0002") == (Special.RESPONSE_END, 4)
    assert read_pkt(b"0004") == (b"", 4)  # valid framing; push parsing refuses it
    assert read_pkt(b"0006a\nrest") == (b"a\n", 6)
    assert read_pkt(b"xx0005a", 2) == (b"a", 7)
    assert read_pkt(b"0006a") is None
    assert read_pkt(b"000") is None
    assert read_pkt(b"000A" + b"x" * 6) == (b"x" * 6, 10)
    full = b"fff0" + b"y" * MAX_PKT_PAYLOAD
    assert read_pkt(full) == (b"y" * MAX_PKT_PAYLOAD, MAX_PKT_LEN)


def test_encode_pkt_and_flush() -> None:
    assert encode_pkt(b"a\n") == b"0006a\n"
    assert encode_pkt(b"a") == b"0005a"
    assert encode_pkt(b"foobar\n") == b"000bfoobar\n"
    assert flush() == b"0000"
    assert encode_pkt(b"z" * MAX_PKT_PAYLOAD)[:4] == b"fff0"
    with pytest.raises(ValueError):
        encode_pkt(b"")
    with pytest.raises(ValueError):
        encode_pkt(b"z" * (MAX_PKT_PAYLOAD + 1))


def test_encode_sideband_splits_long_data() -> None:
    data = bytes(range(256)) * 600  # 153600 bytes: three packets
    out = encode_sideband(1, data)
    pos, got = 0, b""
    while pos < len(out):
        packet, pos = read_pkt(out, pos)
        assert packet[:1] == b"\x01" and len(packet) <= MAX_SIDEBAND_DATA + 1
        got += packet[1:]
    assert got == data
    with pytest.raises(ValueError):
        encode_sideband(4, b"x")


# --- report-status -------------------------------------------------------------------


def test_report_status_is_what_receive_pack_sends() -> None:
    assert report_status(True, [("refs/heads/main", None)], sideband=True) == REPLY_OK


def test_report_status_with_a_message_and_refusals_is_what_a_declining_hook_gives() -> None:
    results = [
        ("refs/heads/x", "pre-receive hook declined"),
        ("refs/heads/y", "pre-receive hook declined"),
    ]
    got = report_status(True, results, sideband=True, message="hook says no")
    assert got == REPLY_HOOK_DECLINED


def test_report_status_without_sideband() -> None:
    got = report_status(True, [("refs/heads/a", None), ("refs/heads/b", "no")], False)
    assert got == b"000eunpack ok\n0014ok refs/heads/a\n0017ng refs/heads/b no\n0000"
    assert report_status(True, [("refs/heads/a", None)], False, message="lost") == (
        b"000eunpack ok\n0014ok refs/heads/a\n0000"
    )


def test_report_status_unpack_error_and_utf8_reasons() -> None:
    got = report_status(False, [("refs/heads/a", "r\u00e9fus\u00e9")], False)
    assert got.startswith(b"0018unpack not unpacked\n")
    assert "ng refs/heads/a r\u00e9fus\u00e9\n".encode() in got
    got = report_status(False, [("refs/heads/a", "x")], False, unpack_error="bad pack")
    assert got == b"0014unpack bad pack\n0016ng refs/heads/a x\n0000"


@pytest.mark.parametrize(
    "results",
    [
        [],
        [("refs/heads/a", "two\nlines")],
        [("refs/heads/a", "")],
        [("refs/heads/a\n", None)],
        [("", None)],
    ],
)
def test_report_status_refuses_what_would_break_the_format(results: list) -> None:
    with pytest.raises(ValueError):
        report_status(True, results, True)
