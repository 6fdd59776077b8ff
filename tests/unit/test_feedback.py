"""Tests for perc_daemons.protocol.feedback (RFC 4585 NACK/PLI, RFC 5104 FIR,
draft-alvestrand-rmcat-remb-03 REMB, the APP speaker hint, SR/RR report block removal)."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from perc_daemons.protocol import rtp
from perc_daemons.protocol.errors import ProtocolError
from perc_daemons.protocol.feedback import (
    PSFB_AFB,
    Feedback,
    FeedbackError,
    SpeakerHint,
    build_fir,
    build_nack,
    build_pli,
    build_remb,
    build_speaker_hint,
    nack_fci,
    nack_seqs,
    parse_feedback,
    parse_speaker_hint,
    strip_report_blocks,
)
from perc_daemons.protocol.rtp import (
    APP,
    PSFB,
    RR,
    RTPFB,
    SR,
    ReportBlock,
    RtcpError,
    RtcpPacket,
    SenderInfo,
)

FUZZ = settings(max_examples=300, deadline=None)
GENERATED = settings(max_examples=200, deadline=None)

SENDER = 0x12345678
MEDIA = 0x23456789

# Hand-assembled from the RFC figures (the same layouts libwebrtc's rtcp_packet
# unit tests use, with their SSRCs):
# RFC 4585 s6.2.1: FMT 1, PT 205, length 3; PID 0, BLP 0x8085 = PID+1, +3, +8, +16.
NACK_0_1_3_8_16 = bytes.fromhex("81cd0003" "12345678" "23456789" "00008085")
# RFC 4585 s6.3.1: FMT 1, PT 206, length 2, no FCI.
PLI = bytes.fromhex("81ce0002" "12345678" "23456789")
# RFC 5104 s4.3.1: FMT 4, PT 206, length 4, media SSRC 0; SSRC, seq nr 0x13, reserved.
FIR = bytes.fromhex("84ce0004" "12345678" "00000000" "23456789" "13000000")
# remb-03 s2.2: FMT 15, PT 206, length 7, media SSRC 0, "REMB", 3 SSRCs, exponent 1,
# mantissa 0x3fb93 (bitrate 522022), three SSRCs.
REMB = bytes.fromhex(
    "8fce0007" "12345678" "00000000" "52454d42" "0307fb93" "23456789" "2345678a" "2345678b"
)
# The same with exponent 0, mantissa 122754 and two SSRCs.
REMB_EXP0 = bytes.fromhex(
    "8fce0006" "fa17fa17" "00000000" "52454d42" "0201df82" "02d03702" "04a76747"
)


def packet(data: bytes) -> RtcpPacket:
    (parsed,) = rtp.parse_compound(data, strict_first=False)
    return parsed


def fewest_pairs(seqs: list[int]) -> int:
    """The fewest PID/BLP pairs for a set of sequence numbers, by brute force: the
    greedy cover of the circle cut before each of the numbers in turn (some fewest
    cover has a PID at a number, and the greedy cover of a line is the fewest)."""
    points = sorted({s % 65536 for s in seqs})
    best = len(points)
    for cut in points:
        count, pid = 0, None
        for p in sorted(points, key=lambda p: (p - cut) % 65536):
            if pid is None or (p - pid) % 65536 > 16:
                count, pid = count + 1, p
        best = min(best, count)
    return best


class NackFciTests(unittest.TestCase):
    def test_rfc4585_pair(self) -> None:
        self.assertEqual(nack_fci([0, 1, 3, 8, 16]), NACK_0_1_3_8_16[12:])
        self.assertEqual(nack_seqs(NACK_0_1_3_8_16[12:]), [0, 1, 3, 8, 16])

    def test_pairs_split_after_16(self) -> None:
        self.assertEqual(nack_fci([100, 116, 117]),
                         struct.pack("!HHHH", 100, 0x8000, 117, 0))

    def test_wraparound(self) -> None:
        # 65534 .. 1 share a pair: BLP bits 0-2 for 65535, 0, 1; 20 gets its own.
        self.assertEqual(nack_fci([0xFFFE, 0xFFFF, 0, 1, 20]),
                         struct.pack("!HHHH", 0xFFFE, 0x0007, 20, 0))
        self.assertEqual(nack_seqs(nack_fci([0xFFFE, 0xFFFF, 0, 1, 20])),
                         [0xFFFE, 0xFFFF, 0, 1, 20])

    def test_modulo_and_duplicates(self) -> None:
        # 65535 is within 16 before 5 and 6: one pair at 65535 (bits 5 and 6).
        self.assertEqual(nack_fci([65536 + 5, 5, 6, -1]), struct.pack("!HH", 0xFFFF, 0x0060))
        self.assertEqual(nack_fci([]), b"")
        self.assertEqual(nack_seqs(b""), [])

    def test_fewest_even_when_the_first_given_is_mid_run(self) -> None:
        # 0..10 with 5 first: one pair at PID 0 (5 is in it, so it leads), not two.
        self.assertEqual(nack_fci([5, *range(11)]), struct.pack("!HH", 0, 0x03FF))
        # Across the wrap: 65530 .. 5 given from 3 on; one pair at 65530.
        seqs = [3, 4, 5, *range(65530, 65536), 0, 1, 2]
        self.assertEqual(nack_fci(seqs), struct.pack("!HH", 65530, 0x07FF))

    def test_fewest_when_no_gap_exceeds_16(self) -> None:
        # Every number but 0: 65535 = 17 * 3855, so 3855 pairs (each holds at most 17)
        # and only the cover starting at 1 reaches it. Cut at the first given, 2, a
        # greedy cover needs 3856 (1 is left over); the gaps (at most 2) give no cut.
        seqs = [2, *(s for s in range(1, 65536) if s != 2)]
        fci = nack_fci(seqs)
        self.assertEqual(len(fci), 4 * 3855)
        self.assertEqual(fci[:4], struct.pack("!HH", 1, 0xFFFF))  # the pair holding 2 leads
        self.assertEqual(sorted(nack_seqs(fci)), list(range(1, 65536)))

    def test_refused(self) -> None:
        self.assertRaises(FeedbackError, nack_fci, [1, "2"])
        self.assertRaises(FeedbackError, nack_fci, [1.0])
        self.assertRaises(FeedbackError, nack_fci, [True])
        self.assertRaises(FeedbackError, nack_seqs, b"\x00\x01\x02")


class BuildTests(unittest.TestCase):
    def test_nack(self) -> None:
        built = build_nack(SENDER, MEDIA, [0, 1, 3, 8, 16])
        self.assertEqual(built.serialize(), NACK_0_1_3_8_16)
        self.assertEqual(parse_feedback(built),
                         Feedback("nack", SENDER, (MEDIA,), (0, 1, 3, 8, 16)))

    def test_pli(self) -> None:
        self.assertEqual(build_pli(SENDER, MEDIA).serialize(), PLI)
        self.assertEqual(parse_feedback(packet(PLI)), Feedback("pli", SENDER, (MEDIA,)))

    def test_fir(self) -> None:
        self.assertEqual(build_fir(SENDER, [(MEDIA, 0x13)]).serialize(), FIR)
        self.assertEqual(parse_feedback(packet(FIR)), Feedback("fir", SENDER, (MEDIA,), (0x13,)))
        two = build_fir(SENDER, [(1, 255), (2, 0)])
        self.assertEqual(parse_feedback(two), Feedback("fir", SENDER, (1, 2), (255, 0)))

    def test_remb(self) -> None:
        ssrcs = [0x23456789, 0x2345678A, 0x2345678B]
        self.assertEqual(build_remb(SENDER, 522022, ssrcs).serialize(), REMB)
        self.assertEqual(parse_feedback(packet(REMB)),
                         Feedback("remb", SENDER, tuple(ssrcs), bitrate=522022))
        self.assertEqual(build_remb(0xFA17FA17, 122754, [0x02D03702, 0x04A76747]).serialize(),
                         REMB_EXP0)
        self.assertEqual(parse_feedback(packet(REMB_EXP0)).bitrate, 122754)

    def test_remb_rounds_down(self) -> None:
        # 2^18 needs exponent 1; 2^18 + 1 is not representable, 2^18 is.
        for bitrate, sent in [(0, 0), (262143, 262143), (262144, 262144), (262145, 262144),
                              (1_000_001, 1_000_000), (0x3FB93 << 30 | 0x3FFFFFFF, 0x3FB93 << 30)]:
            with self.subTest(bitrate=bitrate):
                self.assertEqual(parse_feedback(build_remb(1, bitrate, [])).bitrate, sent)
        # Past (2^18 - 1) * 2^63: the largest value the fields hold.
        self.assertEqual(parse_feedback(build_remb(1, 1 << 90, [])).bitrate, 0x3FFFF << 63)

    def test_builders_refuse(self) -> None:
        cases = [
            (build_nack, (SENDER, MEDIA, [])),
            (build_nack, (-1, MEDIA, [1])),
            (build_nack, (SENDER, 1 << 32, [1])),
            (build_pli, (SENDER, "x")),
            (build_fir, (SENDER, [])),
            (build_fir, (SENDER, [(1, 256)])),
            (build_fir, (SENDER, [(1 << 32, 0)])),
            (build_fir, (SENDER, [(1,)])),
            (build_remb, (SENDER, -1, [])),
            (build_remb, (SENDER, 1.5, [])),
            (build_remb, (SENDER, 100, list(range(256)))),
            (build_remb, (SENDER, 100, [1 << 32])),
            (build_speaker_hint, (SENDER, SpeakerHint(1 << 32, ()))),
            (build_speaker_hint, (SENDER, SpeakerHint(0, (-1,)))),
        ]
        for build, args in cases:
            with self.subTest(build=build.__name__, args=args):
                self.assertRaises(FeedbackError, build, *args)


class ParseFeedbackTests(unittest.TestCase):
    def test_not_ours(self) -> None:
        others = [
            RtcpPacket(RTPFB, bytes(12), count=15),  # transport-cc
            RtcpPacket(RTPFB, bytes(4), count=3),  # TMMBR, even if short
            RtcpPacket(PSFB, bytes(12), count=2),  # SLI
            RtcpPacket(PSFB, bytes(8) + b"ABCD" + bytes(4), count=PSFB_AFB),  # other AFB
            RtcpPacket(PSFB, bytes(8), count=PSFB_AFB),
            rtp.receiver_report(1),
            RtcpPacket(APP, bytes(8), count=1),
        ]
        for other in others:
            with self.subTest(other=other):
                self.assertIsNone(parse_feedback(other))

    def test_padding_is_removed(self) -> None:
        padded = RtcpPacket(PSFB, PLI[4:] + b"\x00\x00\x00\x04", count=1, padding=True)
        self.assertEqual(parse_feedback(padded), Feedback("pli", SENDER, (MEDIA,)))

    def test_duplicate_nack_numbers_once(self) -> None:
        fci = struct.pack("!HHHH", 10, 0x0001, 11, 0x0001)  # 10, 11; then 11 again, 12
        nack = RtcpPacket(RTPFB, PLI[4:] + fci, count=1)
        self.assertEqual(parse_feedback(nack).seqs, (10, 11, 12))

    def test_malformed(self) -> None:
        cases = [
            RtcpPacket(RTPFB, bytes(4), count=1),  # no media SSRC
            RtcpPacket(RTPFB, bytes(8), count=1),  # NACK without FCI
            RtcpPacket(RTPFB, bytes(10), count=1, raw=b""),  # half a pair
            RtcpPacket(PSFB, bytes(4), count=1),
            RtcpPacket(PSFB, bytes(12), count=1),  # PLI with FCI
            RtcpPacket(PSFB, bytes(8), count=4),  # FIR without entries
            RtcpPacket(PSFB, bytes(12), count=4),  # half an entry
            RtcpPacket(PSFB, bytes(8) + b"REMB", count=15),  # no count/bitrate
            RtcpPacket(PSFB, REMB[4:-4], count=15),  # announces 3 SSRCs, holds 2
            RtcpPacket(PSFB, REMB[4:] + bytes(4), count=15),  # holds 4
            RtcpPacket(PSFB, PLI[4:] + b"\x00\x00\x00\x09", count=1, padding=True, raw=b""),
            RtcpPacket(PSFB, b"", count=1, padding=True, raw=b""),
        ]
        for bad in cases:
            with self.subTest(bad=bad):
                self.assertRaises(FeedbackError, parse_feedback, bad)


class SpeakerHintTests(unittest.TestCase):
    def test_layout(self) -> None:
        built = build_speaker_hint(SENDER, SpeakerHint(7, (0xA, 0xB)))
        # RFC 3550 s6.7: V=2 subtype 1, PT 204, length 6 (7 words); SSRC, "PERC", seq, count, SSRCs.
        self.assertEqual(
            built.serialize(),
            bytes.fromhex("81cc0006" "12345678") + b"PERC"
            + bytes.fromhex("00000007" "00000002" "0000000a" "0000000b"),
        )
        self.assertEqual(parse_speaker_hint(built), SpeakerHint(7, (0xA, 0xB)))
        self.assertEqual(parse_speaker_hint(build_speaker_hint(1, SpeakerHint(0, ()))),
                         SpeakerHint(0, ()))

    def test_not_ours(self) -> None:
        for other in (RtcpPacket(APP, struct.pack("!I", 1) + b"PERC" + bytes(8), count=2),
                      RtcpPacket(APP, struct.pack("!I", 1) + b"perc" + bytes(8), count=1),
                      RtcpPacket(APP, bytes(4), count=1),
                      build_pli(1, 2)):
            self.assertIsNone(parse_speaker_hint(other))

    def test_malformed(self) -> None:
        head = struct.pack("!I", 1) + b"PERC"
        for body in (head, head + bytes(4), head + struct.pack("!II", 0, 2) + bytes(4),
                     head + struct.pack("!II", 0, 0) + bytes(4)):
            with self.subTest(body=body.hex()):
                self.assertRaises(FeedbackError, parse_speaker_hint,
                                  RtcpPacket(APP, body, count=1))


class StripReportBlocksTests(unittest.TestCase):
    def test_sr(self) -> None:
        info = SenderInfo(0x83AA7E80_00000000, 3000, 10, 12000)
        block = ReportBlock(5, 12, -3, 70000, 33, 0x12345678, 6553)
        sr = rtp.sender_report(SENDER, info, [block, block._replace(ssrc=6)])
        sr.body += b"ext!"  # a profile-specific extension goes too
        stripped = strip_report_blocks(sr)
        self.assertEqual(stripped.serialize(), rtp.sender_report(SENDER, info).serialize())
        self.assertEqual((stripped.count, len(stripped.body)), (0, 24))
        self.assertEqual(rtp.parse_sender_info(stripped), info)

    def test_rr(self) -> None:
        rr = rtp.receiver_report(SENDER, [ReportBlock(5, 0, 0, 0, 0, 0, 0)])
        self.assertEqual(strip_report_blocks(rr).serialize(), bytes.fromhex("80c9000112345678"))

    def test_refused(self) -> None:
        for bad in (build_pli(1, 2), RtcpPacket(SR, bytes(20)), RtcpPacket(RR, b"")):
            self.assertRaises(FeedbackError, strip_report_blocks, bad)


# --------------------------------------------------------------------------
# Hypothesis
# --------------------------------------------------------------------------

u32 = st.integers(0, 0xFFFFFFFF)
# Sequence numbers in runs near a random base (so that pairs share and wrap), or anywhere.
seq_lists = st.one_of(
    st.tuples(st.integers(0, 0xFFFF), st.lists(st.integers(-40, 40), min_size=1, max_size=30))
    .map(lambda t: [t[0] + d for d in t[1]]),
    st.lists(st.integers(-70000, 140000), min_size=1, max_size=20),
)
fmts = st.one_of(st.sampled_from([1, 4, 15]), st.integers(0, 31))
random_feedback = st.builds(
    lambda pt, fmt, body, pad: RtcpPacket(pt, body, count=fmt, padding=pad, raw=b""),
    st.sampled_from([RTPFB, PSFB, APP, SR, RR, 202, 203]),
    fmts,
    st.one_of(
        st.binary(max_size=64),
        st.tuples(st.binary(min_size=8, max_size=8), st.integers(0, 4),
                  st.binary(max_size=24)).map(
            lambda t: t[0] + b"REMB" + bytes((t[1],)) + t[2]),
        st.tuples(st.binary(min_size=4, max_size=4), st.integers(0, 4),
                  st.binary(max_size=24)).map(
            lambda t: t[0] + b"PERC" + struct.pack("!II", 0, t[1]) + t[2]),
    ),
    st.booleans(),
)


class PropertyTests(unittest.TestCase):
    """Builders round-trip; any packet parses or raises FeedbackError only."""

    @FUZZ
    @given(seq_lists)
    def test_nack_fci_is_fewest_and_round_trips(self, seqs: list[int]) -> None:
        fci = nack_fci(seqs)
        decoded = nack_seqs(fci)
        self.assertEqual(sorted(decoded), sorted({s % 65536 for s in seqs}))
        self.assertEqual(len(decoded), len(set(decoded)))
        self.assertEqual(len(fci) // 4, fewest_pairs(seqs))
        # The pairs run in circular order from the first, and the first holds seqs[0].
        start = decoded[0]
        distances = [(s - start) % 65536 for s in decoded]
        self.assertEqual(distances, sorted(distances))
        self.assertIn(seqs[0] % 65536, nack_seqs(fci[:4]))

    @FUZZ
    @given(u32, u32, seq_lists)
    def test_nack_round_trip(self, sender: int, media: int, seqs: list[int]) -> None:
        parsed = parse_feedback(packet(build_nack(sender, media, seqs).serialize()))
        self.assertEqual((parsed.kind, parsed.sender_ssrc, parsed.media_ssrcs),
                         ("nack", sender, (media,)))
        self.assertEqual(set(parsed.seqs), {s % 65536 for s in seqs})

    @FUZZ
    @given(u32, st.lists(st.tuples(u32, st.integers(0, 255)), min_size=1, max_size=8))
    def test_fir_round_trip(self, sender: int, entries: list[tuple[int, int]]) -> None:
        parsed = parse_feedback(packet(build_fir(sender, entries).serialize()))
        self.assertEqual(parsed, Feedback("fir", sender, tuple(e[0] for e in entries),
                                          tuple(e[1] for e in entries)))

    @FUZZ
    @given(u32, st.one_of(st.integers(0, 1 << 40), st.integers(0, 1 << 82)),
           st.lists(u32, max_size=8))
    def test_remb_round_trip(self, sender: int, bitrate: int, ssrcs: list[int]) -> None:
        built = build_remb(sender, bitrate, ssrcs)
        parsed = parse_feedback(packet(built.serialize()))
        self.assertEqual((parsed.kind, parsed.sender_ssrc, parsed.media_ssrcs),
                         ("remb", sender, tuple(ssrcs)))
        sent = parsed.bitrate
        exponent = built.body[13] >> 2
        mantissa = sent >> exponent
        self.assertLessEqual(sent, bitrate)
        self.assertLess(mantissa, 1 << 18)
        if bitrate < 0x3FFFF << 63:
            # The largest representable value not above the bitrate, smallest exponent.
            self.assertGreater((mantissa + 1) << exponent, bitrate)
            if exponent:
                self.assertGreaterEqual(bitrate >> (exponent - 1), 1 << 18)
        self.assertEqual(build_remb(sender, sent, ssrcs).serialize(), built.serialize())

    @FUZZ
    @given(u32, u32)
    def test_pli_round_trip(self, sender: int, media: int) -> None:
        self.assertEqual(parse_feedback(packet(build_pli(sender, media).serialize())),
                         Feedback("pli", sender, (media,)))

    @FUZZ
    @given(u32, u32, st.lists(u32, max_size=10))
    def test_speaker_hint_round_trip(self, sender: int, seq: int, speakers: list[int]) -> None:
        hint = SpeakerHint(seq, tuple(speakers))
        built = packet(build_speaker_hint(sender, hint).serialize())
        self.assertEqual(built.ssrc, sender)
        self.assertEqual(parse_speaker_hint(built), hint)
        self.assertIsNone(parse_feedback(built))

    @FUZZ
    @given(random_feedback)
    def test_parsers_on_random_packets(self, candidate: RtcpPacket) -> None:
        for parse in (parse_feedback, parse_speaker_hint, strip_report_blocks):
            try:
                result = parse(candidate)
            except FeedbackError:
                continue
            if isinstance(result, Feedback):
                self.assertIn(result.kind, ("nack", "pli", "fir", "remb"))
                self.assertIn(candidate.packet_type, (RTPFB, PSFB))
            elif isinstance(result, RtcpPacket):
                self.assertEqual(result.count, 0)
                self.assertEqual(len(result.serialize()), 4 + (24 if result.packet_type == SR
                                                               else 4))

    @FUZZ
    @given(st.binary(max_size=80))
    def test_parsers_on_random_compounds(self, data: bytes) -> None:
        try:
            packets = rtp.parse_compound(data, strict_first=False)
        except RtcpError:
            return
        for candidate in packets:
            for parse in (parse_feedback, parse_speaker_hint, strip_report_blocks):
                try:
                    parse(candidate)
                except FeedbackError:
                    pass

    def test_error_is_typed(self) -> None:
        self.assertTrue(issubclass(FeedbackError, ProtocolError))
        self.assertEqual(FeedbackError.reason, "feedback_malformed")
