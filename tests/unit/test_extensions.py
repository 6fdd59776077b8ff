"""Tests for perc_daemons.protocol.extensions (RFC 8285 elements an SFU reads:
RFC 6464 audio level, draft-ietf-avtext-framemarking-16, RFC 8852 / RFC 8843 stream ids)."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from perc_daemons.protocol import rtp
from perc_daemons.protocol.errors import ProtocolError
from perc_daemons.protocol.extensions import (
    AUDIO_LEVEL_URI,
    FRAME_MARKING_URI,
    MID_URI,
    REPAIRED_RID_URI,
    RID_URI,
    ExtensionError,
    FrameMarks,
    add_extensions,
    audio_level,
    encode_audio_level,
    encode_frame_marks,
    encode_stream_id,
    find_extension,
    frame_marks,
    is_keyframe_start,
    media_id,
    stream_id,
)
from perc_daemons.protocol.rtp import RtpError, RtpPacket
from tests.unit.test_rtp import (
    CSRC_PACKET,
    GENERIC_PACKET,
    ONE_BYTE_PACKET,
    RFC7714,
    TWO_BYTE_PACKET,
    any_rtp,
    rtp_packets,
)

FUZZ = settings(max_examples=300, deadline=None)
GENERATED = settings(max_examples=200, deadline=None)

# V=2 X=1, PT 96, seq 1, ts 2, SSRC 3; 0xBEDE block of one word: id 1 L=0 value
# 0x9e (V=1, level 30: RFC 6464 s3's one-byte form), id 5 L=0 value 0xa0
# (framemarking S=1 I=1); payload "vp8".
AUDIO_AND_MARKS = bytes.fromhex("90600001000000020000000" "3bede0001109e50a0") + b"vp8"
# The same values in the two-byte form (profile 0x1000): id 1 len 2 "9e 00" (the
# level, then RFC 6464's pad byte), id 5 len 3 "a9 02 07" (S I B TID=1, LID 2,
# TL0PICIDX 7), id 3 len 1 "h": three words.
TWO_BYTE_VALUES = (
    bytes.fromhex("9060000100000002000000031000" "0003" "01029e00" "0503a90207" "030168")
    + b"vp8"
)


def first_element(data: bytes, ident: int) -> bytes | str | None:
    """What find_extension should return, through rtp.py's full parse: the first
    element with the id, None, or "error" for a malformed header or block."""
    try:
        end = rtp.header_length(data)
    except RtpError:
        return "error"
    if not data[0] & 0x10:
        return None
    offset = 12 + 4 * (data[0] & 0x0F)
    profile = struct.unpack_from("!H", data, offset)[0]
    if profile != rtp.ONE_BYTE_PROFILE and profile >> 4 != 0x100:
        return None
    try:
        elements = rtp.parse_extensions(profile, data[offset + 4 : end])
    except RtpError:
        return "error"
    return next((value for i, value in elements if i == ident), None)


class ConstantsTests(unittest.TestCase):
    def test_uris(self) -> None:
        self.assertEqual(AUDIO_LEVEL_URI, "urn:ietf:params:rtp-hdrext:ssrc-audio-level")
        self.assertEqual(MID_URI, "urn:ietf:params:rtp-hdrext:sdes:mid")
        self.assertEqual(RID_URI, "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id")
        self.assertEqual(
            REPAIRED_RID_URI, "urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id"
        )
        self.assertEqual(FRAME_MARKING_URI, "urn:ietf:params:rtp-hdrext:framemarking")

    def test_error_is_typed(self) -> None:
        self.assertTrue(issubclass(ExtensionError, ProtocolError))
        self.assertEqual(ExtensionError.reason, "extension_malformed")


class FindExtensionTests(unittest.TestCase):
    def test_one_byte_form(self) -> None:
        # test_rtp's sample: id 1 "aa", padding, id 2 "bbcc", padding, then id 15 (stop).
        self.assertEqual(find_extension(ONE_BYTE_PACKET, 1), b"\xaa")
        self.assertEqual(find_extension(ONE_BYTE_PACKET, 2), b"\xbb\xcc")
        self.assertIsNone(find_extension(ONE_BYTE_PACKET, 3))
        self.assertIsNone(find_extension(ONE_BYTE_PACKET, 15))
        self.assertIsNone(find_extension(ONE_BYTE_PACKET, 0))
        self.assertEqual(find_extension(AUDIO_AND_MARKS, 1), b"\x9e")
        self.assertEqual(find_extension(AUDIO_AND_MARKS, 5), b"\xa0")

    def test_one_byte_stop_id_hides_what_follows(self) -> None:
        # id 15 ends the walk (RFC 8285 s4.2): the "id 1" after it is not an element.
        packet = bytes.fromhex("900000010000000200000003bede0001f0100000")
        self.assertIsNone(find_extension(packet, 1))

    def test_two_byte_form(self) -> None:
        # test_rtp's sample: id 1 len 0, padding, id 15 "abc", id 200 "ff", appbits 3.
        self.assertEqual(find_extension(TWO_BYTE_PACKET, 1), b"")
        self.assertEqual(find_extension(TWO_BYTE_PACKET, 15), b"abc")
        self.assertEqual(find_extension(TWO_BYTE_PACKET, 200), b"\xff")
        self.assertIsNone(find_extension(TWO_BYTE_PACKET, 2))
        self.assertIsNone(find_extension(TWO_BYTE_PACKET, 300))
        self.assertEqual(find_extension(TWO_BYTE_VALUES, 1), b"\x9e\x00")
        self.assertEqual(find_extension(TWO_BYTE_VALUES, 5), b"\xa9\x02\x07")
        self.assertEqual(find_extension(TWO_BYTE_VALUES, 3), b"h")

    def test_no_block_or_other_profile(self) -> None:
        self.assertIsNone(find_extension(RFC7714, 1))
        self.assertIsNone(find_extension(CSRC_PACKET, 1))
        self.assertIsNone(find_extension(GENERIC_PACKET, 1))

    def test_after_csrcs(self) -> None:
        packet = RtpPacket(ssrc=3, csrcs=[7, 8], extensions=[(4, b"xyz")],
                           payload=b"p").serialize()
        self.assertEqual(find_extension(packet, 4), b"xyz")

    def test_first_of_duplicates(self) -> None:
        packet = bytes.fromhex("900000010000000200000003bede0001" "1011" "1022")
        self.assertEqual(find_extension(packet, 1), b"\x11")

    def test_element_found_before_a_malformed_one(self) -> None:
        # id 1 "11", then id 2 claiming 16 bytes in a one-word block: the walk stops at id 1.
        packet = bytes.fromhex("900000010000000200000003bede0001" "1011" "2f00")
        self.assertEqual(find_extension(packet, 1), b"\x11")
        self.assertRaises(ExtensionError, find_extension, packet, 2)
        self.assertRaises(ExtensionError, find_extension, packet, 3)

    def test_malformed(self) -> None:
        cases = [
            b"",
            AUDIO_AND_MARKS[:11],
            b"\x50" + AUDIO_AND_MARKS[1:],  # version 1
            AUDIO_AND_MARKS[:14],  # extension header cut
            AUDIO_AND_MARKS[:18],  # block cut
            bytes.fromhex("820000010000000200000003"),  # two CSRCs missing, no X bit
            bytes.fromhex("900000010000000200000003" "10000001" "0105aabb"),  # past block
            bytes.fromhex("900000010000000200000003" "10000001" "000000" "07"),  # no length
        ]
        for data in cases:
            with self.subTest(data=data.hex()):
                self.assertRaises(ExtensionError, find_extension, data, 7)


class AudioLevelTests(unittest.TestCase):
    def test_rfc6464_one_byte(self) -> None:
        self.assertEqual(audio_level(b"\x9e"), (30, True))
        self.assertEqual(audio_level(b"\x7f"), (127, False))
        self.assertEqual(audio_level(b"\x80"), (0, True))

    def test_two_byte_padded_form(self) -> None:
        self.assertEqual(audio_level(find_extension(TWO_BYTE_VALUES, 1) or b""), (30, True))

    def test_bad_lengths(self) -> None:
        self.assertRaises(ExtensionError, audio_level, b"")
        self.assertRaises(ExtensionError, audio_level, b"\x01\x02\x03")

    def test_encode(self) -> None:
        self.assertEqual(encode_audio_level(30, True), b"\x9e")
        self.assertEqual(encode_audio_level(127, False), b"\x7f")
        for bad in (-1, 128, 1.5):
            self.assertRaises(ExtensionError, encode_audio_level, bad, False)


class FrameMarksTests(unittest.TestCase):
    def test_non_scalable_short_form(self) -> None:
        # s3.1: S|E|I|D then four zero bits.
        self.assertEqual(frame_marks(b"\xa0"),
                         FrameMarks(True, False, True, False, False, 0, None, None))
        self.assertEqual(frame_marks(b"\x50"),
                         FrameMarks(False, True, False, True, False, 0, None, None))
        self.assertTrue(is_keyframe_start(b"\xa0"))
        self.assertTrue(is_keyframe_start(b"\xe0"))
        self.assertFalse(is_keyframe_start(b"\x20"))  # I but not S
        self.assertFalse(is_keyframe_start(b"\x80"))  # S but not I

    def test_scalable_long_forms(self) -> None:
        # s3.2: S|E|I|D|B|TID(3), LID, TL0PICIDX (L=2), or TL0PICIDX omitted (L=1).
        self.assertEqual(frame_marks(b"\xa9\x02\x07"),
                         FrameMarks(True, False, True, False, True, 1, 2, 7))
        self.assertEqual(frame_marks(b"\x4f\xff"),
                         FrameMarks(False, True, False, False, True, 7, 255, None))
        self.assertTrue(is_keyframe_start(b"\xa9\x02\x07"))

    def test_encode(self) -> None:
        self.assertEqual(encode_frame_marks(start=True, end=False, independent=True), b"\xa0")
        self.assertEqual(
            encode_frame_marks(start=True, end=False, independent=True, base_layer=True, tid=1,
                               lid=2, tl0picidx=7),
            b"\xa9\x02\x07")
        self.assertEqual(
            encode_frame_marks(start=False, end=True, independent=False, discardable=True,
                               tid=7, lid=0),
            b"\x57\x00")

    def test_encode_refuses(self) -> None:
        base = {"start": True, "end": True, "independent": True}
        for extra in ({"tid": 8}, {"tid": -1}, {"lid": 256}, {"lid": 1, "tl0picidx": 256},
                      {"tl0picidx": 3}):
            with self.subTest(extra=extra):
                self.assertRaises(ExtensionError, encode_frame_marks, **base, **extra)

    def test_bad_lengths(self) -> None:
        for value in (b"", b"\xa0\x00\x00\x00"):
            self.assertRaises(ExtensionError, frame_marks, value)
            self.assertRaises(ExtensionError, is_keyframe_start, value)


class StreamIdTests(unittest.TestCase):
    def test_rids(self) -> None:
        self.assertEqual(stream_id(b"h"), "h")
        self.assertEqual(stream_id(b"Hi-res_2"), "Hi-res_2")
        self.assertEqual(stream_id(b"x" * 255), "x" * 255)
        self.assertEqual(stream_id(find_extension(TWO_BYTE_VALUES, 3) or b""), "h")

    def test_refused(self) -> None:
        for value in (b"", b"x" * 256, b"a.b", b"a b", b"h\x00", b"\xc3\xa9", b"\xff"):
            with self.subTest(value=value):
                self.assertRaises(ExtensionError, stream_id, value)

    def test_media_id_token(self) -> None:
        self.assertEqual(media_id(b"0"), "0")
        self.assertEqual(media_id(b"audio.1"), "audio.1")
        for value in (b"", b"a b", b"\xff", b"x" * 256):
            self.assertRaises(ExtensionError, media_id, value)

    def test_encode(self) -> None:
        self.assertEqual(encode_stream_id("m"), b"m")
        self.assertEqual(encode_stream_id("video.1"), b"video.1")
        for bad in ("", "x" * 256, "a b", "é", b"h"):
            with self.subTest(bad=bad):
                self.assertRaises(ExtensionError, encode_stream_id, bad)


class AddExtensionsTests(unittest.TestCase):
    def test_adds_a_block(self) -> None:
        out = add_extensions(RFC7714, [(2, b"1"), (3, b"h")])
        self.assertTrue(out[0] & 0x10)
        self.assertEqual(out[1:12], RFC7714[1:12])
        # 0xBEDE, 1 word: id 2 L=0 "1", id 3 L=0 "h".
        self.assertEqual(out[12:20], bytes.fromhex("bede0001") + b"\x201\x30h")
        self.assertEqual(out[20:], RFC7714[12:])

    def test_replaces_by_id_in_place(self) -> None:
        out = add_extensions(AUDIO_AND_MARKS, [(5, b"\x50"), (2, b"0")])
        self.assertEqual(out[12:20], bytes.fromhex("bede0002") + b"\x10\x9e\x50\x50")
        self.assertEqual(out[20:24], b"\x200\x00\x00")
        self.assertEqual(out[24:], b"vp8")

    def test_drops_duplicates_of_a_replaced_id(self) -> None:
        packet = bytes.fromhex("900000010000000200000003bede0001" "1011" "1022")
        out = add_extensions(packet, [(1, b"\x33")])
        self.assertEqual(out[12:], bytes.fromhex("bede0001" "1033" "0000"))

    def test_switches_to_two_byte_form(self) -> None:
        out = add_extensions(AUDIO_AND_MARKS, [(3, b"r" * 17)])
        self.assertEqual(struct.unpack_from("!H", out, 12)[0], rtp.TWO_BYTE_PROFILE)
        self.assertEqual(find_extension(out, 1), b"\x9e")
        self.assertEqual(find_extension(out, 3), b"r" * 17)
        self.assertTrue(out.endswith(b"vp8"))

    def test_keeps_csrcs_and_padding(self) -> None:
        packet = RtpPacket(ssrc=9, csrcs=[1, 2], payload=b"data", padding_length=3).serialize()
        out = add_extensions(packet, [(4, b"\x01\x02")])
        parsed = RtpPacket.parse(out)
        self.assertEqual((parsed.csrcs, parsed.extensions, parsed.payload, parsed.padding_length),
                         ([1, 2], [(4, b"\x01\x02")], b"data", 3))

    def test_no_elements(self) -> None:
        self.assertEqual(add_extensions(AUDIO_AND_MARKS, []), AUDIO_AND_MARKS)
        self.assertEqual(add_extensions(GENERIC_PACKET, []), GENERIC_PACKET)

    def test_refused(self) -> None:
        cases = [
            (GENERIC_PACKET, [(1, b"x")]),  # not an RFC 8285 profile
            (AUDIO_AND_MARKS[:18], [(1, b"x")]),  # truncated block
            (RFC7714, [(0, b"x")]),
            (RFC7714, [(256, b"x")]),
            (RFC7714, [(1, b"x" * 256)]),
            (RFC7714, [(1, "text")]),
            (RFC7714, [(1,)]),
            (RFC7714, ["x"]),
            (bytes.fromhex("900000010000000200000003bede0001" "2f00"), [(1, b"x")]),
        ]
        for packet, elements in cases:
            with self.subTest(elements=elements):
                self.assertRaises(ExtensionError, add_extensions, packet, elements)


# --------------------------------------------------------------------------
# Hypothesis
# --------------------------------------------------------------------------

ids = st.integers(0, 260)
rid_text = st.text(alphabet="abcXYZ019-_", min_size=1, max_size=255)
new_elements = st.lists(
    st.one_of(
        st.tuples(st.integers(1, 14), st.binary(min_size=1, max_size=16)),
        st.tuples(st.integers(1, 255), st.binary(max_size=40)),
    ),
    max_size=4,
)


class PropertyTests(unittest.TestCase):
    """Random input succeeds or raises ExtensionError only; encoders round-trip."""

    @FUZZ
    @given(any_rtp, ids)
    def test_find_extension_agrees_with_the_full_parse(self, data: bytes, ident: int) -> None:
        expected = first_element(data, ident)
        try:
            value = find_extension(data, ident)
        except ExtensionError:
            self.assertEqual(expected, "error")
            return
        if expected == "error":  # the walk stopped at the element, before the fault
            self.assertIsInstance(value, bytes)
            self.assertRaises(RtpError, RtpPacket.parse, data)
        else:
            self.assertEqual(value, expected)

    @GENERATED
    @given(rtp_packets())
    def test_find_extension_on_built_packets(self, packet: RtpPacket) -> None:
        data = packet.serialize()
        elements = dict(reversed(RtpPacket.parse(data).extensions or []))
        for ident in range(0, 257):
            self.assertEqual(find_extension(data, ident), elements.get(ident))

    @FUZZ
    @given(st.binary(max_size=4))
    def test_value_decoders_on_random_bytes(self, value: bytes) -> None:
        for decode in (audio_level, frame_marks, is_keyframe_start, stream_id, media_id):
            try:
                decode(value)
            except ExtensionError:
                pass

    @FUZZ
    @given(st.integers(0, 127), st.booleans())
    def test_audio_level_round_trip(self, level: int, voice: bool) -> None:
        value = encode_audio_level(level, voice)
        self.assertEqual(audio_level(value), (level, voice))
        self.assertEqual(audio_level(value + b"\x00"), (level, voice))

    @FUZZ
    @given(st.booleans(), st.booleans(), st.booleans(), st.booleans(), st.booleans(),
           st.integers(0, 7), st.one_of(st.none(), st.integers(0, 255)),
           st.one_of(st.none(), st.integers(0, 255)))
    def test_frame_marks_round_trip(self, s: bool, e: bool, i: bool, d: bool, b: bool,
                                    tid: int, lid: int | None, tl0: int | None) -> None:
        if lid is None:
            tl0 = None
        value = encode_frame_marks(start=s, end=e, independent=i, discardable=d,
                                   base_layer=b, tid=tid, lid=lid, tl0picidx=tl0)
        self.assertEqual(frame_marks(value), FrameMarks(s, e, i, d, b, tid, lid, tl0))
        self.assertEqual(is_keyframe_start(value), s and i)
        self.assertEqual(encode_frame_marks(**frame_marks(value)._asdict()), value)

    @FUZZ
    @given(st.binary(min_size=1, max_size=3))
    def test_frame_marks_bytes_round_trip(self, value: bytes) -> None:
        self.assertEqual(encode_frame_marks(**frame_marks(value)._asdict()), value)

    @FUZZ
    @given(rid_text)
    def test_stream_id_round_trip(self, text: str) -> None:
        self.assertEqual(stream_id(encode_stream_id(text)), text)
        self.assertEqual(media_id(encode_stream_id(text)), text)

    @FUZZ
    @given(any_rtp, new_elements)
    def test_add_extensions(self, data: bytes, elements: list[tuple[int, bytes]]) -> None:
        try:
            out = add_extensions(data, elements)
        except ExtensionError:
            return
        if not elements:
            self.assertEqual(out, data)
            return
        added = dict(elements)
        for ident, value in added.items():
            self.assertEqual(find_extension(out, ident), value)
        before = RtpPacket.parse(data) if _parses(data) else None
        if before is not None:
            after = RtpPacket.parse(out)
            self.assertEqual((after.payload, after.padding_length, after.csrcs),
                             (before.payload, before.padding_length, before.csrcs))
            kept = [(i, v) for i, v in before.extensions or [] if i not in added]
            self.assertEqual([(i, v) for i, v in after.extensions if i not in added], kept)


def _parses(data: bytes) -> bool:
    try:
        RtpPacket.parse(data)
    except RtpError:
        return False
    return True
