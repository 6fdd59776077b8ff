"""Tests for perc_daemons.protocol.rtp (RFC 3550, RFC 8285, RFC 5761, RFC 7983)."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from perc_daemons.protocol import rtp
from perc_daemons.protocol.errors import ProtocolError
from perc_daemons.protocol.rtp import (
    BYE,
    ONE_BYTE_PROFILE,
    PSFB,
    RR,
    SDES,
    SR,
    TWO_BYTE_PROFILE,
    ReportBlock,
    RtcpError,
    RtcpPacket,
    RtpError,
    RtpPacket,
    SenderInfo,
)

FUZZ = settings(max_examples=300, deadline=None)
GENERATED = settings(max_examples=200, deadline=None)

# RFC 7714 §16.1.1 / §16.2.1 example plaintext packet.
RFC7714_HEADER = bytes.fromhex("8040f17b8041f8d35501a0b2")
RFC7714_PAYLOAD = b"Gallia est omnis divisa in partes tres"
RFC7714 = RFC7714_HEADER + RFC7714_PAYLOAD

# V=2, CC=2, M=1, PT=96, seq 1, ts 2, ssrc 3, CSRCs 0x11111111, 0x22222222.
CSRC_PACKET = bytes.fromhex("82e0000100000002000000031111111122222222") + b"payload"
# V=2, P=1, PT=0, 5 payload bytes then 3 padding octets (last counts itself).
PADDED_PACKET = bytes.fromhex("a00000070000000800000009") + b"hello" + b"\x00\x00\x03"
# Padding octets need not be zero; only the last is meaningful.
ODD_PADDED_PACKET = bytes.fromhex("a00000070000000800000009") + b"hi" + b"\xaa\xbb\x03"
# One-byte form: id1 len1, padding byte, padding byte, id2 len2, padding
# byte, then id 15 (stop) followed by bytes that must be ignored.
ONE_BYTE_DATA = bytes.fromhex("10aa000021bbcc00f0112233")
ONE_BYTE_PACKET = bytes.fromhex("906f123400000064deadbeefbede0003") + ONE_BYTE_DATA + b"media"
# Two-byte form, appbits 3: id1 len0, padding, id15 len3 "abc", id200 len1,
# then zero padding.
TWO_BYTE_DATA = bytes.fromhex("0100000f03616263c801ff00")
TWO_BYTE_PACKET = bytes.fromhex("90080001000000020000000310030003") + TWO_BYTE_DATA + b"xyz"
# Non-RFC 8285 profile: raw extension data only.
GENERIC_DATA = b"\x01\x02\x03\x04\x05\x06\x07\x08"
GENERIC_PACKET = bytes.fromhex("900800010000000200000003abcd0002") + GENERIC_DATA + b"p"
# Everything at once: CSRC, one-byte extension, marker, padding.
EVERYTHING_PACKET = (
    bytes.fromhex("b1e1fffffffffffffffffffecafebabebede000130010203")
    + b"body"
    + b"\x00\x00\x00\x04"
)


class FixedHeaderTests(unittest.TestCase):
    """RFC 3550 §5.1 fixed header, fast helpers."""

    def test_rfc7714_packet(self) -> None:
        self.assertEqual(rtp.parse_fixed_header(RFC7714), (0, 64, 0xF17B, 0x8041F8D3, 0x5501A0B2))
        self.assertEqual(rtp.header_length(RFC7714), 12)
        packet = RtpPacket.parse(RFC7714)
        self.assertEqual(packet.version, 2)
        self.assertFalse(packet.marker)
        self.assertEqual(packet.payload_type, 64)
        self.assertEqual(packet.sequence_number, 0xF17B)
        self.assertEqual(packet.timestamp, 0x8041F8D3)
        self.assertEqual(packet.ssrc, 0x5501A0B2)
        self.assertEqual(packet.csrcs, [])
        self.assertFalse(packet.padding)
        self.assertFalse(packet.extension)
        self.assertIsNone(packet.extensions)
        self.assertIsNone(packet.extension_profile)
        self.assertEqual(packet.payload, RFC7714_PAYLOAD)
        self.assertEqual(packet.serialize(), RFC7714)

    def test_marker_and_csrcs(self) -> None:
        self.assertEqual(rtp.parse_fixed_header(CSRC_PACKET), (1, 96, 1, 2, 3))
        self.assertEqual(rtp.header_length(CSRC_PACKET), 20)
        packet = RtpPacket.parse(CSRC_PACKET)
        self.assertTrue(packet.marker)
        self.assertEqual(packet.csrcs, [0x11111111, 0x22222222])
        self.assertEqual(packet.payload, b"payload")
        self.assertEqual(packet.serialize(), CSRC_PACKET)

    def test_buffer_types(self) -> None:
        for kind in (bytes, bytearray, memoryview):
            data = kind(EVERYTHING_PACKET)
            self.assertEqual(rtp.header_length(data), 24)
            self.assertEqual(rtp.parse_fixed_header(data), (1, 97, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFE))
            self.assertEqual(RtpPacket.parse(data).serialize(), EVERYTHING_PACKET)
            self.assertTrue(rtp.is_rtcp(kind(bytes.fromhex("80c80000"))))

    def test_header_length_all_samples(self) -> None:
        expected = {
            RFC7714: 12,
            CSRC_PACKET: 20,
            PADDED_PACKET: 12,
            ODD_PADDED_PACKET: 12,
            ONE_BYTE_PACKET: 12 + 4 + 12,
            TWO_BYTE_PACKET: 12 + 4 + 12,
            GENERIC_PACKET: 12 + 4 + 8,
            EVERYTHING_PACKET: 12 + 4 + 4 + 4,
        }
        for packet, length in expected.items():
            self.assertEqual(rtp.header_length(packet), length)

    def test_header_only_packet(self) -> None:
        data = bytes.fromhex("900000010000000200000003bede0000")
        self.assertEqual(rtp.header_length(data), 16)
        packet = RtpPacket.parse(data)
        self.assertEqual(packet.payload, b"")
        self.assertEqual(packet.extensions, [])
        self.assertEqual(packet.serialize(), data)


class MalformedRtpTests(unittest.TestCase):
    """Malformed RTP raises RtpError with a message, never a builtin error."""

    def assertRejected(self, data: bytes, fragment: str, header_ok: bool = False) -> None:
        """Header errors fail every API; errors past the header only fail parse.

        replace_extensions looks at the header only: it discards the old
        block and copies payload and padding untouched.
        """
        calls = [RtpPacket.parse]
        if not header_ok:
            calls.append(rtp.header_length)
            calls.append(lambda d: rtp.replace_extensions(d, [(1, b"x")]))
        else:
            self.assertGreaterEqual(rtp.header_length(data), 12)
            self.assertIsInstance(rtp.replace_extensions(data, None), bytes)
        for call in calls:
            error = self.assertRaises(RtpError, call, data)
            self.assertIsInstance(error, ProtocolError)
            self.assertEqual(error.reason, "rtp_malformed")
            self.assertIn(fragment, str(error))

    def test_truncated_fixed_header(self) -> None:
        for size in range(12):
            self.assertRejected(RFC7714[:size], "shorter than the 12-byte")
            error = self.assertRaises(RtpError, rtp.parse_fixed_header, RFC7714[:size])
            self.assertIn("shorter than the 12-byte", str(error))

    def test_bad_version(self) -> None:
        for version in (0, 1, 3):
            data = bytes((version << 6,)) + RFC7714[1:]
            self.assertRejected(data, f"version is {version}")
            error = self.assertRaises(RtpError, rtp.parse_fixed_header, data)
            self.assertIn("not 2", str(error))

    def test_csrc_count_past_end(self) -> None:
        data = bytes((0x8F,)) + RFC7714[1:12] + b"\x00" * 8
        self.assertRejected(data, "runs past")
        self.assertRejected(CSRC_PACKET[:19], "runs past")

    def test_extension_header_truncated(self) -> None:
        data = bytes((0x90,)) + RFC7714[1:12] + b"\xbe\xde"
        self.assertRejected(data, "extension header")

    def test_extension_length_past_end(self) -> None:
        data = bytes((0x90,)) + RFC7714[1:12] + b"\xbe\xde\x00\x02" + b"\x10\xaa\x00\x00"
        self.assertRejected(data, "runs past")
        self.assertRejected(ONE_BYTE_PACKET[: 12 + 4 + 11], "runs past")

    def test_padding_count_zero(self) -> None:
        data = PADDED_PACKET[:-1] + b"\x00"
        self.assertRejected(data, "padding count is 0", header_ok=True)

    def test_padding_count_oversized(self) -> None:
        data = PADDED_PACKET[:-1] + bytes((5 + 3 + 1,))
        self.assertRejected(data, "exceeds", header_ok=True)
        # Exactly the payload area is fine: all of it is padding.
        packet = RtpPacket.parse(PADDED_PACKET[:-1] + b"\x08")
        self.assertEqual(packet.payload, b"")
        self.assertEqual(packet.padding_length, 8)

    def test_padding_bit_without_bytes(self) -> None:
        self.assertRejected(PADDED_PACKET[:12], "no octets follow", header_ok=True)

    def test_one_byte_element_past_block(self) -> None:
        data = bytes((0x90,)) + RFC7714[1:12] + b"\xbe\xde\x00\x01" + b"\x13\xaa\xbb\xcc"
        self.assertRejected(data, "runs past the 4-byte extension block", header_ok=True)
        self.assertEqual(rtp.header_length(data), 20)

    def test_two_byte_element_past_block(self) -> None:
        data = bytes((0x90,)) + RFC7714[1:12] + b"\x10\x00\x00\x01" + b"\x01\x05\xaa\xbb"
        self.assertRejected(data, "runs past", header_ok=True)

    def test_two_byte_element_without_length(self) -> None:
        data = bytes((0x90,)) + RFC7714[1:12] + b"\x10\x00\x00\x01" + b"\x00\x00\x00\x05"
        self.assertRejected(data, "no length byte", header_ok=True)

    def test_parse_extensions_other_profile(self) -> None:
        error = self.assertRaises(RtpError, rtp.parse_extensions, 0xABCD, b"")
        self.assertIn("not an RFC 8285 profile", str(error))
        error = self.assertRaises(RtpError, rtp.parse_extensions, 0x1010, b"")
        self.assertIn("0x1010", str(error))


class PaddingTests(unittest.TestCase):
    """RFC 3550 §5.1 padding."""

    def test_padding_kept(self) -> None:
        packet = RtpPacket.parse(PADDED_PACKET)
        self.assertTrue(packet.padding)
        self.assertEqual(packet.padding_length, 3)
        self.assertEqual(packet.payload, b"hello")
        self.assertEqual(packet.serialize(), PADDED_PACKET)

    def test_nonzero_padding_octets_kept(self) -> None:
        packet = RtpPacket.parse(ODD_PADDED_PACKET)
        self.assertEqual(packet.padding_data, b"\xaa\xbb\x03")
        self.assertEqual(packet.payload, b"hi")
        self.assertEqual(packet.serialize(), ODD_PADDED_PACKET)

    def test_padding_synthesized(self) -> None:
        packet = RtpPacket(payload=b"abc", padding_length=5)
        data = packet.serialize()
        self.assertEqual(data[0] & 0x20, 0x20)
        self.assertEqual(data[-5:], b"\x00\x00\x00\x00\x05")
        # Inconsistent padding_data is replaced rather than trusted.
        packet.padding_data = b"\x01\x02"
        self.assertEqual(packet.serialize(), data)
        packet.padding_length = 0
        self.assertEqual(packet.serialize()[0] & 0x20, 0)
        self.assertEqual(packet.serialize()[-3:], b"abc")


class ExtensionTests(unittest.TestCase):
    """RFC 8285 header extensions."""

    def test_one_byte_with_padding_and_stop(self) -> None:
        self.assertEqual(
            rtp.parse_extensions(ONE_BYTE_PROFILE, ONE_BYTE_DATA),
            [(1, b"\xaa"), (2, b"\xbb\xcc")],
        )
        packet = RtpPacket.parse(ONE_BYTE_PACKET)
        self.assertTrue(packet.extension)
        self.assertEqual(packet.extension_profile, ONE_BYTE_PROFILE)
        self.assertEqual(packet.extensions, [(1, b"\xaa"), (2, b"\xbb\xcc")])
        self.assertEqual(packet.extension_data, ONE_BYTE_DATA)
        self.assertEqual(packet.payload, b"media")
        self.assertEqual(packet.payload_type, 0x6F)
        self.assertEqual(packet.serialize(), ONE_BYTE_PACKET)

    def test_id15_stop_ignores_garbage(self) -> None:
        # After id 15 even an element that would run past the block is ignored.
        self.assertEqual(
            rtp.parse_extensions(ONE_BYTE_PROFILE, b"\x10\x01\xff\x00"), [(1, b"\x01")]
        )
        self.assertEqual(rtp.parse_extensions(ONE_BYTE_PROFILE, b"\xf0"), [])

    def test_two_byte(self) -> None:
        expected = [(1, b""), (15, b"abc"), (200, b"\xff")]
        self.assertEqual(rtp.parse_extensions(0x1003, TWO_BYTE_DATA), expected)
        packet = RtpPacket.parse(TWO_BYTE_PACKET)
        self.assertEqual(packet.extension_profile, 0x1003)
        self.assertEqual(packet.extensions, expected)
        self.assertEqual(packet.payload, b"xyz")
        self.assertEqual(packet.serialize(), TWO_BYTE_PACKET)

    def test_generic_profile(self) -> None:
        packet = RtpPacket.parse(GENERIC_PACKET)
        self.assertEqual(packet.extension_profile, 0xABCD)
        self.assertEqual(packet.extensions, [])
        self.assertEqual(packet.extension_data, GENERIC_DATA)
        self.assertEqual(packet.payload, b"p")
        self.assertEqual(packet.serialize(), GENERIC_PACKET)
        packet.extension_data = b"\x00" * 4
        self.assertEqual(rtp.header_length(packet.serialize()), 20)
        packet.extension_data = b"\x00" * 5
        error = self.assertRaises(RtpError, packet.serialize)
        self.assertIn("multiple of 4", str(error))

    def test_build_one_byte(self) -> None:
        block = rtp.build_extension_block([(1, b"\xaa"), (14, b"x" * 16)])
        self.assertEqual(block[:4], b"\xbe\xde\x00\x05")
        self.assertEqual(block[4:6], b"\x10\xaa")
        self.assertEqual(block[6], 0xEF)
        self.assertEqual(block[7:23], b"x" * 16)
        self.assertEqual(block[23:], b"\x00")
        self.assertEqual(len(block) % 4, 0)

    def test_build_two_byte_when_needed(self) -> None:
        for elements in ([(15, b"a")], [(1, b"")], [(1, b"y" * 17)], [(255, b"z" * 255)]):
            block = rtp.build_extension_block(elements)
            self.assertEqual(block[:2], b"\x10\x00")
            self.assertEqual(len(block) % 4, 0)
            words = struct.unpack("!H", block[2:4])[0]
            self.assertEqual(len(block), 4 + 4 * words)
            self.assertEqual(rtp.parse_extensions(TWO_BYTE_PROFILE, block[4:]), elements)
        self.assertEqual(rtp.build_extension_block([(1, b"")]), b"\x10\x00\x00\x01\x01\x00\x00\x00")

    def test_build_empty(self) -> None:
        self.assertEqual(rtp.build_extension_block([]), b"")

    def test_build_rejects_unencodable(self) -> None:
        for elements in ([(0, b"a")], [(256, b"a")], [(1, b"a" * 256)], [(-1, b"")]):
            error = self.assertRaises(RtpError, rtp.build_extension_block, elements)
            self.assertIn("extension element", str(error))

    def test_modified_extensions_rebuilt(self) -> None:
        packet = RtpPacket.parse(ONE_BYTE_PACKET)
        packet.extensions = [(3, b"\x01\x02\x03")]
        data = packet.serialize()
        self.assertEqual(data[12:20], b"\xbe\xde\x00\x01\x32\x01\x02\x03")
        reparsed = RtpPacket.parse(data)
        self.assertEqual(reparsed.extensions, [(3, b"\x01\x02\x03")])
        self.assertEqual(reparsed.payload, b"media")
        packet.extensions = []
        self.assertEqual(packet.serialize()[12:16], b"\xbe\xde\x00\x00")
        packet.extensions = None
        packet.extension_profile = None
        self.assertEqual(packet.serialize()[0] & 0x10, 0)
        self.assertEqual(packet.serialize()[12:], b"media")

    def test_serialize_rejects_bad_fields(self) -> None:
        cases = [
            {"payload_type": 128},
            {"sequence_number": 0x10000},
            {"timestamp": -1},
            {"ssrc": 1 << 32},
            {"csrcs": [0] * 16},
            {"csrcs": [1 << 32]},
            {"padding_length": 256},
            {"extensions": [(0, b"x")]},
            {"extension_profile": 0xABCD, "extension_data": b"\x00" * 3},
            {"extension_profile": 0x10000},
        ]
        for kwargs in cases:
            error = self.assertRaises(RtpError, RtpPacket(**kwargs).serialize)
            self.assertTrue(str(error))


class ReplaceExtensionsTests(unittest.TestCase):
    """replace_extensions keeps everything but the block byte-identical."""

    def test_add(self) -> None:
        out = rtp.replace_extensions(RFC7714, [(5, b"\x01\x02")])
        self.assertEqual(out[0], RFC7714[0] | 0x10)
        self.assertEqual(out[1:12], RFC7714[1:12])
        self.assertEqual(out[12:20], b"\xbe\xde\x00\x01\x51\x01\x02\x00")
        self.assertEqual(out[20:], RFC7714_PAYLOAD)
        self.assertEqual(RtpPacket.parse(out).extensions, [(5, b"\x01\x02")])

    def test_remove(self) -> None:
        for elements in (None, []):
            out = rtp.replace_extensions(ONE_BYTE_PACKET, elements)
            self.assertEqual(out, bytes((0x80,)) + ONE_BYTE_PACKET[1:12] + b"media")
        self.assertEqual(rtp.replace_extensions(RFC7714, None), RFC7714)

    def test_change_keeps_csrcs_and_padding(self) -> None:
        out = rtp.replace_extensions(EVERYTHING_PACKET, [(200, b"long")])
        self.assertEqual(out[0], EVERYTHING_PACKET[0])
        self.assertEqual(out[1:16], EVERYTHING_PACKET[1:16])
        self.assertEqual(out[16:24], b"\x10\x00\x00\x02\xc8\x04lo")
        self.assertEqual(out[24:28], b"ng\x00\x00")
        self.assertEqual(out[28:], EVERYTHING_PACKET[24:])
        packet = RtpPacket.parse(out)
        self.assertEqual(packet.extensions, [(200, b"long")])
        self.assertEqual(packet.csrcs, [0xCAFEBABE])
        self.assertEqual(packet.payload, b"body")
        self.assertEqual(packet.padding_length, 4)

    def test_input_types(self) -> None:
        for kind in (bytearray, memoryview):
            out = rtp.replace_extensions(kind(CSRC_PACKET), [(1, b"a")])
            self.assertIsInstance(out, bytes)
            self.assertEqual(out, rtp.replace_extensions(CSRC_PACKET, [(1, b"a")]))

    def test_unencodable_elements(self) -> None:
        error = self.assertRaises(RtpError, rtp.replace_extensions, RFC7714, [(0, b"a")])
        self.assertIn("1..255", str(error))


def sdes_cname(ssrc: int, cname: bytes) -> RtcpPacket:
    item = struct.pack("!IBB", ssrc, 1, len(cname)) + cname + b"\x00"
    item += b"\x00" * (-len(item) % 4)
    return RtcpPacket(SDES, item, count=1)


class RtcpTests(unittest.TestCase):
    """RFC 3550 §6.1 compound packets, §6.4 SR/RR, A.2 validity checks."""

    info = SenderInfo(0xE8F0_1234_8000_0000, 160_000, 50, 8000)
    block = ReportBlock(0x5501A0B2, 26, -3, 0x0001_F17B, 42, 0x1234_8000, 65536)

    def compound(self) -> tuple[list[RtcpPacket], bytes]:
        packets = [
            rtp.sender_report(0x11223344, self.info, [self.block]),
            sdes_cname(0x11223344, b"alice@example"),
            RtcpPacket(BYE, struct.pack("!I", 0x11223344), count=1),
        ]
        return packets, rtp.build_compound(packets)

    def test_sr_sdes_bye_round_trip(self) -> None:
        packets, data = self.compound()
        self.assertEqual(data[:4], b"\x81\xc8\x00\x0c")
        parsed = rtp.parse_compound(data)
        self.assertEqual([p.packet_type for p in parsed], [SR, SDES, BYE])
        self.assertEqual(parsed, packets)
        self.assertEqual([p.ssrc for p in parsed], [0x11223344] * 3)
        self.assertEqual(rtp.build_compound(parsed), data)
        self.assertEqual(b"".join(p.raw for p in parsed), data)
        self.assertEqual(rtp.parse_sender_info(parsed[0]), self.info)
        self.assertEqual(rtp.parse_report_blocks(parsed[0]), [self.block])

    def test_rr_alone(self) -> None:
        data = rtp.receiver_report(0xDEADBEEF).serialize()
        self.assertEqual(data, bytes.fromhex("80c90001deadbeef"))
        (packet,) = rtp.parse_compound(data)
        self.assertEqual(packet.packet_type, RR)
        self.assertEqual(packet.count, 0)
        self.assertEqual(packet.ssrc, 0xDEADBEEF)
        self.assertEqual(packet.version, 2)
        self.assertEqual(rtp.parse_report_blocks(packet), [])
        with_block = rtp.receiver_report(1, [self.block]).serialize()
        self.assertEqual(rtp.parse_report_blocks(rtp.parse_compound(with_block)[0]), [self.block])

    def test_pli_alone(self) -> None:
        data = bytes.fromhex("81ce00020000000100000002")
        error = self.assertRaises(RtcpError, rtp.parse_compound, data)
        self.assertIn("not SR or RR", str(error))
        (packet,) = rtp.parse_compound(data, strict_first=False)
        self.assertEqual((packet.packet_type, packet.count, packet.ssrc), (PSFB, 1, 1))
        self.assertEqual(packet.body, bytes.fromhex("0000000100000002"))
        self.assertEqual(packet.serialize(), data)

    def test_empty_body_has_no_ssrc(self) -> None:
        (packet,) = rtp.parse_compound(bytes.fromhex("80cb0000"), strict_first=False)
        self.assertIsNone(packet.ssrc)
        self.assertEqual(packet.body, b"")

    def test_padding_on_last(self) -> None:
        data = bytes.fromhex("a0c900020000000700000004")
        (packet,) = rtp.parse_compound(data)
        self.assertTrue(packet.padding)
        self.assertEqual(packet.padding_length, 4)
        self.assertEqual(packet.ssrc, 7)
        self.assertEqual(rtp.build_compound([packet]), data)

    def assertRejected(self, data: bytes, fragment: str, strict_first: bool = True) -> None:
        error = self.assertRaises(RtcpError, rtp.parse_compound, data, strict_first)
        self.assertIsInstance(error, ProtocolError)
        self.assertEqual(error.reason, "rtcp_malformed")
        self.assertIn(fragment, str(error))

    def test_empty(self) -> None:
        self.assertRejected(b"", "empty")

    def test_length_past_end(self) -> None:
        _, data = self.compound()
        self.assertRejected(data[:-4], "runs past")
        self.assertRejected(bytes.fromhex("80c90002deadbeef"), "runs past")

    def test_truncated_header(self) -> None:
        _, data = self.compound()
        self.assertRejected(data + b"\x80\xc9\x00", "truncated")

    def test_padding_on_non_last(self) -> None:
        packets, _ = self.compound()
        padded_rr = bytes.fromhex("a0c900020000000700000004")
        self.assertRejected(padded_rr + packets[1].serialize(), "non-last")
        packets[0].padding = True
        packets[0].body += b"\x00\x00\x00\x04"
        error = self.assertRaises(RtcpError, rtp.build_compound, packets)
        self.assertIn("last packet", str(error))

    def test_bad_padding_count(self) -> None:
        self.assertRejected(bytes.fromhex("a0c9000100000000"), "padding count 0")
        self.assertRejected(bytes.fromhex("a0c9000100000005"), "padding count 5")
        self.assertRejected(bytes.fromhex("a0c90000"), "no body")
        # Padding eating into the mandatory SSRC of an RR.
        self.assertRejected(bytes.fromhex("a0c9000100000004"), "needs 4 body bytes")

    def test_bad_version(self) -> None:
        _, data = self.compound()
        self.assertRejected(b"\x40" + data[1:], "version 1")
        rr = rtp.receiver_report(1).serialize()
        self.assertRejected(rr + b"\xc1" + data[1:4], "version 3")

    def test_report_count_past_body(self) -> None:
        self.assertRejected(bytes.fromhex("82c90001deadbeef"), "count 2")
        sr = rtp.sender_report(1, self.info).serialize()
        self.assertRejected(bytes((0x81,)) + sr[1:], "needs 48 body bytes")

    def test_build_rejects(self) -> None:
        self.assertRaises(RtcpError, rtp.build_compound, [])
        for kwargs in ({"count": 32}, {"padding": True}):
            error = self.assertRaises(RtcpError, RtcpPacket, RR, b"\x00" * 4, **kwargs)
            self.assertTrue(str(error))
        self.assertRaises(RtcpError, RtcpPacket, 300, b"")
        error = self.assertRaises(RtcpError, RtcpPacket, RR, b"\x00" * 5)
        self.assertIn("multiple of 4", str(error))
        self.assertRaises(RtcpError, rtp.receiver_report, 1 << 32)
        bad = self.block._replace(cumulative_lost=1 << 23)
        self.assertRaises(RtcpError, rtp.receiver_report, 1, [bad])

    def test_layout_helpers_reject_wrong_type(self) -> None:
        bye = RtcpPacket(BYE, b"\x00" * 4, count=1)
        self.assertRaises(RtcpError, rtp.parse_sender_info, bye)
        self.assertRaises(RtcpError, rtp.parse_report_blocks, bye)
        short = RtcpPacket(SR, b"\x00" * 4)
        self.assertRaises(RtcpError, rtp.parse_sender_info, short)


class DemuxTests(unittest.TestCase):
    """RFC 5761 §4 and RFC 7983 §7."""

    def test_is_rtcp(self) -> None:
        for second, expected in ((191, False), (192, True), (200, True), (223, True), (224, False)):
            self.assertEqual(rtp.is_rtcp(bytes((0x80, second, 0, 1))), expected)
        self.assertFalse(rtp.is_rtcp(RFC7714))
        self.assertFalse(rtp.is_rtcp(b"\x80"))
        self.assertFalse(rtp.is_rtcp(b""))

    def test_classify_first_byte(self) -> None:
        ranges = [
            (range(0, 4), "stun"),
            (range(16, 20), "zrtp"),
            (range(20, 64), "dtls"),
            (range(64, 80), "turn"),
            (range(128, 192), "rtp"),
        ]
        expected = dict.fromkeys(range(256), "unknown")
        for values, kind in ranges:
            for value in values:
                expected[value] = kind
        self.assertEqual({b: rtp.classify_first_byte(b) for b in range(256)}, expected)
        self.assertEqual(rtp.classify_first_byte(-1), "unknown")
        self.assertEqual(rtp.classify_first_byte(256), "unknown")


# --------------------------------------------------------------------------
# Hypothesis
# --------------------------------------------------------------------------

# Random bytes with the version bits forced to 2 half of the time, so the
# deeper code paths are reached.
rtp_ish = st.one_of(
    st.binary(max_size=80),
    st.binary(min_size=1, max_size=80).map(lambda b: bytes(((b[0] & 0x3F) | 0x80,)) + b[1:]),
)
SAMPLES = [
    RFC7714,
    CSRC_PACKET,
    PADDED_PACKET,
    ODD_PADDED_PACKET,
    ONE_BYTE_PACKET,
    TWO_BYTE_PACKET,
    GENERIC_PACKET,
    EVERYTHING_PACKET,
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid sample packet with a few bytes overwritten and maybe truncated."""
    data = bytearray(draw(st.sampled_from(SAMPLES)))
    for _ in range(draw(st.integers(0, 3))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))])


any_rtp = st.one_of(rtp_ish, mutated())

element_values = st.binary(max_size=20)
any_elements = st.lists(st.tuples(st.integers(0, 260), element_values), max_size=4)
one_byte_elements = st.lists(
    st.tuples(st.integers(1, 14), st.binary(min_size=1, max_size=16)), max_size=5
)
two_byte_elements = st.lists(
    st.tuples(st.integers(1, 255), st.binary(max_size=255)), min_size=1, max_size=4
)
profiles = st.one_of(st.just(ONE_BYTE_PROFILE), st.integers(0x1000, 0x100F), st.integers(0, 0xFFFF))


def rtcp_chunk() -> st.SearchStrategy[bytes]:
    return st.tuples(
        st.integers(0, 255).map(lambda b: b if b % 4 == 0 else (b & 0x3F) | 0x80),
        st.one_of(st.sampled_from([SR, RR, SDES, BYE, 204, 205, PSFB]), st.integers(0, 255)),
        st.integers(0, 12).flatmap(lambda words: st.binary(min_size=4 * words, max_size=4 * words)),
        st.integers(-1, 1),
    ).map(lambda t: bytes((t[0], t[1])) + struct.pack("!H", max(0, len(t[2]) // 4 + t[3])) + t[2])


rtcp_ish = st.one_of(st.binary(max_size=80), st.lists(rtcp_chunk(), max_size=4).map(b"".join))


@st.composite
def rtp_packets(draw: st.DrawFn) -> RtpPacket:
    kind = draw(st.sampled_from(["none", "one", "two", "generic", "empty"]))
    profile = None
    extensions = None
    data = b""
    if kind == "one":
        extensions = draw(one_byte_elements)
    elif kind == "two":
        extensions = draw(two_byte_elements)
    elif kind == "empty":
        extensions = []
    elif kind == "generic":
        profile = draw(
            st.integers(0, 0xFFFF).filter(lambda p: p != ONE_BYTE_PROFILE and p >> 4 != 0x100)
        )
        extensions = []
        data = draw(st.integers(0, 8).flatmap(lambda n: st.binary(min_size=4 * n, max_size=4 * n)))
    return RtpPacket(
        payload_type=draw(st.integers(0, 127)),
        sequence_number=draw(st.integers(0, 0xFFFF)),
        timestamp=draw(st.integers(0, 0xFFFFFFFF)),
        ssrc=draw(st.integers(0, 0xFFFFFFFF)),
        marker=draw(st.booleans()),
        csrcs=draw(st.lists(st.integers(0, 0xFFFFFFFF), max_size=15)),
        extension_profile=profile,
        extensions=extensions,
        extension_data=data,
        payload=draw(st.binary(max_size=64)),
        padding_length=draw(st.integers(0, 255)),
        padding_data=draw(st.binary(max_size=4)),
    )


def semantic(packet: RtpPacket) -> tuple[object, ...]:
    return (
        packet.marker,
        packet.payload_type,
        packet.sequence_number,
        packet.timestamp,
        packet.ssrc,
        packet.csrcs,
        packet.extension,
        packet.extensions,
        packet.payload,
        packet.padding_length,
    )


class PropertyTests(unittest.TestCase):
    """Random input succeeds or raises RtpError/RtcpError only."""

    @FUZZ
    @given(any_rtp)
    def test_header_length(self, data: bytes) -> None:
        try:
            length = rtp.header_length(data)
        except RtpError as error:
            self.assertTrue(str(error))
            return
        self.assertTrue(12 <= length <= len(data))
        self.assertEqual(length % 4, 0)

    @FUZZ
    @given(any_rtp)
    def test_parse_fixed_header(self, data: bytes) -> None:
        try:
            marker, pt, seq, ts, ssrc = rtp.parse_fixed_header(data)
        except RtpError:
            self.assertTrue(len(data) < 12 or data[0] >> 6 != 2)
            return
        self.assertEqual((marker << 7) | pt, data[1])
        self.assertEqual(struct.pack("!HII", seq, ts, ssrc), data[2:12])

    @FUZZ
    @given(any_rtp)
    def test_parse_serialize_exact(self, data: bytes) -> None:
        """serialize(parse(x)) == x for every accepted x."""
        try:
            packet = RtpPacket.parse(data)
        except RtpError:
            return
        self.assertEqual(packet.serialize(), data)
        self.assertEqual(
            rtp.header_length(data) + len(packet.payload) + packet.padding_length, len(data)
        )
        self.assertEqual(
            rtp.parse_fixed_header(data),
            (
                int(packet.marker),
                packet.payload_type,
                packet.sequence_number,
                packet.timestamp,
                packet.ssrc,
            ),
        )

    @FUZZ
    @given(profiles, st.binary(max_size=40))
    def test_parse_extensions(self, profile: int, data: bytes) -> None:
        try:
            elements = rtp.parse_extensions(profile, data)
        except RtpError:
            return
        for ident, value in elements:
            self.assertTrue(1 <= ident <= 255)
            self.assertLessEqual(len(value), 255)
        # Canonical re-encoding parses back to the same elements.
        block = rtp.build_extension_block(elements)
        if elements:
            built_profile = struct.unpack("!H", block[:2])[0]
            self.assertEqual(rtp.parse_extensions(built_profile, block[4:]), elements)
        else:
            self.assertEqual(block, b"")

    @FUZZ
    @given(rtcp_ish, st.booleans())
    def test_parse_compound(self, data: bytes, strict: bool) -> None:
        try:
            packets = rtp.parse_compound(data, strict_first=strict)
        except RtcpError:
            return
        self.assertTrue(packets)
        self.assertEqual(b"".join(p.raw for p in packets), data)
        self.assertEqual(rtp.build_compound(packets), data)
        if strict:
            self.assertIn(packets[0].packet_type, (SR, RR))
        for packet in packets:
            if packet.packet_type in (SR, RR):
                self.assertEqual(len(rtp.parse_report_blocks(packet)), packet.count)

    @FUZZ
    @given(any_rtp, st.one_of(st.none(), any_elements))
    def test_replace_extensions(
        self, data: bytes, elements: list[tuple[int, bytes]] | None
    ) -> None:
        try:
            out = rtp.replace_extensions(data, elements)
        except RtpError:
            return
        self.assertEqual(out[0] & 0xEF, data[0] & 0xEF)
        self.assertEqual(out[1:12], data[1:12])
        tail = len(data) - rtp.header_length(data)
        self.assertEqual(out[len(out) - tail :], data[len(data) - tail :])
        self.assertEqual(len(out) - tail, rtp.header_length(out))
        block = out[12 + 4 * (out[0] & 0x0F) : len(out) - tail]
        if elements:
            self.assertEqual(block, rtp.build_extension_block(elements))
        else:
            self.assertEqual(block, b"")
            self.assertEqual(out[0] & 0x10, 0)

    @GENERATED
    @given(rtp_packets())
    def test_generated_round_trip(self, packet: RtpPacket) -> None:
        """parse(serialize(p)) equals p field-wise; then bytes are stable."""
        data = packet.serialize()
        parsed = RtpPacket.parse(data)
        self.assertEqual(semantic(parsed), semantic(packet))
        if packet.extension_profile is not None:
            self.assertEqual(parsed.extension_profile, packet.extension_profile)
            self.assertEqual(parsed.extension_data, packet.extension_data)
        self.assertEqual(parsed.serialize(), data)
        self.assertEqual(RtpPacket.parse(data), parsed)
        self.assertEqual(
            rtp.header_length(data), len(data) - len(packet.payload) - packet.padding_length
        )

    @GENERATED
    @given(rtp_packets(), st.one_of(st.none(), one_byte_elements, two_byte_elements))
    def test_generated_replace(
        self, packet: RtpPacket, elements: list[tuple[int, bytes]] | None
    ) -> None:
        data = packet.serialize()
        out = rtp.replace_extensions(data, elements)
        parsed = RtpPacket.parse(out)
        self.assertEqual(parsed.extensions, elements or None)
        packet.extensions = elements or None
        packet.extension_profile = None
        self.assertEqual(semantic(parsed), semantic(packet))
