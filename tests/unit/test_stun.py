"""Tests for perc_daemons.protocol.stun (RFC 8489, RFC 8445, RFC 5769, RFC 7983).

The three sample messages are the RFC 5769 §2.1-§2.3 test vectors
(short-term credentials: username "evtj:h6vY", password
"VOkJxbRl1RmTxUk/WvJxBt"). Their padding bytes are 0x20, so byte-exact
re-encoding uses ``pad_byte=0x20``; since MESSAGE-INTEGRITY and FINGERPRINT
cover the padding, a typo in these constants would also fail the integrity
and fingerprint checks.
"""

from __future__ import annotations

import ipaddress
import os
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from perc_daemons.protocol import stun
from perc_daemons.protocol.errors import ProtocolError
from perc_daemons.protocol.stun import (
    ATTR_ERROR_CODE,
    ATTR_FINGERPRINT,
    ATTR_ICE_CONTROLLED,
    ATTR_ICE_CONTROLLING,
    ATTR_MESSAGE_INTEGRITY,
    ATTR_PRIORITY,
    ATTR_SOFTWARE,
    ATTR_UNKNOWN_ATTRIBUTES,
    ATTR_USE_CANDIDATE,
    ATTR_USERNAME,
    ATTR_XOR_MAPPED_ADDRESS,
    BINDING_ERROR,
    BINDING_INDICATION,
    BINDING_REQUEST,
    BINDING_SUCCESS,
    StunAttributeError,
    StunAttributeOrderError,
    StunError,
    StunFingerprintError,
    StunLengthError,
    StunMessage,
    StunNotStunError,
)

FUZZ = settings(max_examples=300, deadline=None)
GENERATED = settings(max_examples=150, deadline=None)

# RFC 5769 §2.1 Sample Request.
RFC5769_REQUEST = bytes.fromhex(
    "000100582112a442b7e7a701bc34d686fa87dfae"
    "80220010" "5354554e207465737420636c69656e74"
    "00240004" "6e0001ff"
    "80290008" "932ff9b151263b36"
    "00060009" "6576746a3a68367659202020"
    "000800149aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a2"
    "80280004e57a3bcf"
)
# RFC 5769 §2.2 Sample IPv4 Response (192.0.2.1 port 32853).
RFC5769_IPV4_RESPONSE = bytes.fromhex(
    "0101003c2112a442b7e7a701bc34d686fa87dfae"
    "8022000b7465737420766563746f7220"
    "002000080001a147e112a643"
    "000800142b91f599fd9e90c38c7489f92af9ba53f06be7d7"
    "80280004c07d4c96"
)
# RFC 5769 §2.3 Sample IPv6 Response (2001:db8:1234:5678:11:2233:4455:6677 port 32853).
RFC5769_IPV6_RESPONSE = bytes.fromhex(
    "010100482112a442b7e7a701bc34d686fa87dfae"
    "8022000b7465737420766563746f7220"
    "002000140002a1470113a9faa5d3f179bc25f4b5bed2b9d9"
    "00080014a382954e4be67bf11784c97c8292c275bfe3ed41"
    "80280004c8fb0b4c"
)
RFC5769_TID = bytes.fromhex("b7e7a701bc34d686fa87dfae")
RFC5769_KEY = b"VOkJxbRl1RmTxUk/WvJxBt"

LOCAL_UFRAG = "mdUf"
LOCAL_PWD = "md-password-0123456789ab"
REMOTE_UFRAG = "peer"
SOURCE_V4 = ("198.51.100.7", 50123)
SOURCE_V6 = ("2001:db8::42", 61000)


def make_request(
    *,
    username: bytes | None = b"mdUf:peer",
    pwd: str | None = LOCAL_PWD,
    priority: bool = True,
    extra: list[tuple[int, bytes]] | None = None,
    fingerprint: bool = True,
    tid: bytes = b"\x01" * 12,
) -> bytes:
    attributes: list[tuple[int, bytes]] = []
    if username is not None:
        attributes.append((ATTR_USERNAME, username))
    if priority:
        attributes.append((ATTR_PRIORITY, struct.pack("!I", 0x6E0001FF)))
    attributes.append((ATTR_ICE_CONTROLLING, b"\x00" * 7 + b"\x09"))
    attributes.append((ATTR_USE_CANDIDATE, b""))
    attributes.extend(extra or [])
    key = None if pwd is None else pwd.encode("utf-8")
    return StunMessage(BINDING_REQUEST, tid, attributes).encode(
        integrity_key=key, fingerprint=fingerprint
    )


def answer(datagram: bytes, source: tuple[str, int] = SOURCE_V4) -> bytes | None:
    return stun.answer_binding_request(
        datagram, local_ufrag=LOCAL_UFRAG, local_pwd=LOCAL_PWD, source=source
    )


def header(message_type: int, length: int, cookie: int = stun.MAGIC_COOKIE) -> bytes:
    return struct.pack("!HHI", message_type, length, cookie) + RFC5769_TID


class Rfc5769VectorTests(unittest.TestCase):
    def test_request_parses(self) -> None:
        message = StunMessage.parse(RFC5769_REQUEST)
        self.assertEqual(message.message_type, BINDING_REQUEST)
        self.assertEqual(message.method, 0x001)
        self.assertEqual(message.message_class, 0)
        self.assertEqual(message.transaction_id, RFC5769_TID)
        self.assertEqual(
            [t for t, _ in message.attributes],
            [ATTR_SOFTWARE, ATTR_PRIORITY, ATTR_ICE_CONTROLLED, ATTR_USERNAME,
             ATTR_MESSAGE_INTEGRITY, ATTR_FINGERPRINT],
        )
        self.assertEqual(message.get(ATTR_SOFTWARE), b"STUN test client")
        self.assertEqual(message.get(ATTR_PRIORITY), struct.pack("!I", 0x6E0001FF))
        self.assertEqual(message.get(ATTR_ICE_CONTROLLED), bytes.fromhex("932ff9b151263b36"))
        self.assertEqual(message.get(ATTR_USERNAME), b"evtj:h6vY")
        self.assertEqual(stun.parse_username(message.get(ATTR_USERNAME)), ("evtj", "h6vY"))

    def test_integrity_and_fingerprint(self) -> None:
        for vector in (RFC5769_REQUEST, RFC5769_IPV4_RESPONSE, RFC5769_IPV6_RESPONSE):
            self.assertTrue(stun.is_stun(vector))
            self.assertTrue(stun.check_integrity(vector, RFC5769_KEY))
            self.assertFalse(stun.check_integrity(vector, RFC5769_KEY + b"x"))
            self.assertFalse(stun.check_integrity(vector, b""))
            self.assertTrue(stun.check_fingerprint(vector))

    def test_byte_exact_reencoding(self) -> None:
        for vector in (RFC5769_REQUEST, RFC5769_IPV4_RESPONSE, RFC5769_IPV6_RESPONSE):
            message = StunMessage.parse(vector)
            self.assertEqual(
                [t for t, _ in message.attributes[-2:]],
                [ATTR_MESSAGE_INTEGRITY, ATTR_FINGERPRINT],
            )
            stripped = StunMessage(
                message.message_type, message.transaction_id, message.attributes[:-2]
            )
            self.assertEqual(stripped.encode(integrity_key=RFC5769_KEY, pad_byte=0x20), vector)
            # Verbatim re-serialisation (no new MI/FP) is also byte-exact.
            self.assertEqual(message.encode(fingerprint=False, pad_byte=0x20), vector)

    def test_zero_padding_reencoding_still_verifies(self) -> None:
        message = StunMessage.parse(RFC5769_REQUEST)
        stripped = StunMessage(message.message_type, message.transaction_id,
                               message.attributes[:-2])
        encoded = stripped.encode(integrity_key=RFC5769_KEY)
        self.assertNotEqual(encoded, RFC5769_REQUEST)  # padding differs: 0x00 vs 0x20
        self.assertEqual(len(encoded), len(RFC5769_REQUEST))
        self.assertTrue(stun.check_integrity(encoded, RFC5769_KEY))
        self.assertTrue(stun.check_fingerprint(encoded))
        self.assertEqual(StunMessage.parse(encoded).attributes[:-2], message.attributes[:-2])

    def test_ipv4_response_mapped_address(self) -> None:
        message = StunMessage.parse(RFC5769_IPV4_RESPONSE)
        self.assertEqual(message.message_type, BINDING_SUCCESS)
        self.assertEqual(message.message_class, 2)
        self.assertEqual(message.get(ATTR_SOFTWARE), b"test vector")
        value = message.get(ATTR_XOR_MAPPED_ADDRESS)
        self.assertEqual(stun.decode_xor_mapped_address(value, RFC5769_TID),
                         ("192.0.2.1", 32853))
        self.assertEqual(stun.xor_mapped_address("192.0.2.1", 32853, RFC5769_TID), value)

    def test_ipv6_response_mapped_address(self) -> None:
        message = StunMessage.parse(RFC5769_IPV6_RESPONSE)
        value = message.get(ATTR_XOR_MAPPED_ADDRESS)
        host = "2001:db8:1234:5678:11:2233:4455:6677"
        self.assertEqual(stun.decode_xor_mapped_address(value, RFC5769_TID), (host, 32853))
        self.assertEqual(stun.xor_mapped_address(host, 32853, RFC5769_TID), value)
        self.assertEqual(
            stun.xor_mapped_address(ipaddress.IPv6Address(host), 32853, RFC5769_TID), value
        )

    def test_responder_answers_rfc5769_request(self) -> None:
        response = stun.answer_binding_request(
            RFC5769_REQUEST, local_ufrag="evtj", local_pwd=RFC5769_KEY.decode(),
            source=("192.0.2.1", 32853),
        )
        message = StunMessage.parse(response)
        self.assertEqual(message.message_type, BINDING_SUCCESS)
        self.assertEqual(message.transaction_id, RFC5769_TID)
        # Same XOR-MAPPED-ADDRESS bytes as the RFC's own IPv4 response.
        self.assertEqual(message.get(ATTR_XOR_MAPPED_ADDRESS),
                         StunMessage.parse(RFC5769_IPV4_RESPONSE).get(ATTR_XOR_MAPPED_ADDRESS))
        self.assertTrue(stun.check_integrity(response, RFC5769_KEY))
        self.assertTrue(stun.check_fingerprint(response))


class IsStunTests(unittest.TestCase):
    def test_rejects_other_protocols(self) -> None:
        rtp = bytes([0x80, 0x60]) + bytes(18) + b"payload!"
        dtls = bytes([22, 0xFE, 0xFD]) + bytes(30)
        for datagram in (b"", b"\x00" * 19, rtp, dtls, RFC5769_REQUEST[:-1],
                         RFC5769_REQUEST + b"\x00\x00\x00\x00"):
            self.assertFalse(stun.is_stun(datagram), datagram)

    def test_rejects_bad_cookie_and_length(self) -> None:
        self.assertTrue(stun.is_stun(header(BINDING_REQUEST, 0)))
        self.assertFalse(stun.is_stun(header(BINDING_REQUEST, 0, cookie=0x2112A443)))
        self.assertFalse(stun.is_stun(header(BINDING_REQUEST, 4)))
        self.assertFalse(stun.is_stun(header(BINDING_REQUEST, 2) + b"\x00\x00"))
        self.assertFalse(stun.is_stun(header(0x4001, 0)))  # first byte 0x40 > 3

    def test_accepts_bytearray_and_memoryview(self) -> None:
        self.assertTrue(stun.is_stun(bytearray(RFC5769_REQUEST)))
        self.assertTrue(stun.is_stun(memoryview(RFC5769_REQUEST)))
        self.assertEqual(StunMessage.parse(memoryview(RFC5769_REQUEST)),
                         StunMessage.parse(RFC5769_REQUEST))


class StrictParseTests(unittest.TestCase):
    def test_header_errors(self) -> None:
        self.assertRaises(StunNotStunError, StunMessage.parse, b"\x00\x01")
        self.assertRaises(StunNotStunError, StunMessage.parse, header(0x8001, 0))
        self.assertRaises(StunNotStunError, StunMessage.parse, header(0x0401, 0))
        self.assertEqual(StunMessage.parse(header(0x03FF, 0)).message_type, 0x03FF)
        self.assertRaises(StunNotStunError, StunMessage.parse, header(1, 0, cookie=0))

    def test_length_errors(self) -> None:
        self.assertRaises(StunLengthError, StunMessage.parse, header(1, 2) + b"\x00\x00")
        self.assertRaises(StunLengthError, StunMessage.parse, header(1, 8) + bytes(4))
        self.assertRaises(StunLengthError, StunMessage.parse, RFC5769_REQUEST + bytes(4))
        self.assertRaises(StunLengthError, StunMessage.parse, RFC5769_REQUEST[:-4])

    def test_attribute_overruns(self) -> None:
        # Value longer than the message.
        body = struct.pack("!HH", ATTR_SOFTWARE, 8) + b"abcd"
        self.assertRaises(StunAttributeError, StunMessage.parse, header(1, 8) + body)
        # One byte too long for its 4-byte slot. (Since the message length and
        # every offset are multiples of 4, a value that fits always has room
        # for its padding, so there is no separate "padding overruns" case.)
        body = struct.pack("!HH", ATTR_SOFTWARE, 5) + b"abcd"
        self.assertRaises(StunAttributeError, StunMessage.parse, header(1, 8) + body)
        # Exactly fitting with padding is fine.
        body = struct.pack("!HH", ATTR_SOFTWARE, 5) + b"abcde\xff\xff\xff"
        message = StunMessage.parse(header(1, 12) + body)
        self.assertEqual(message.attributes, [(ATTR_SOFTWARE, b"abcde")])

    def test_fingerprint_must_be_last(self) -> None:
        body = (struct.pack("!HHI", ATTR_FINGERPRINT, 4, 0)
                + struct.pack("!HH", ATTR_SOFTWARE, 0))
        self.assertRaises(StunAttributeOrderError, StunMessage.parse,
                          header(1, len(body)) + body)
        twice = struct.pack("!HHI", ATTR_FINGERPRINT, 4, 0) * 2
        self.assertRaises(StunAttributeOrderError, StunMessage.parse,
                          header(1, len(twice)) + twice)

    def test_only_fingerprint_after_integrity(self) -> None:
        mi = struct.pack("!HH", ATTR_MESSAGE_INTEGRITY, 20) + bytes(20)
        body = mi + struct.pack("!HH", ATTR_SOFTWARE, 0)
        self.assertRaises(StunAttributeOrderError, StunMessage.parse,
                          header(1, len(body)) + body)
        self.assertRaises(StunAttributeOrderError, StunMessage.parse,
                          header(1, 2 * len(mi)) + mi + mi)
        ok = mi + struct.pack("!HHI", ATTR_FINGERPRINT, 4, 0)
        self.assertEqual(len(StunMessage.parse(header(1, len(ok)) + ok).attributes), 2)

    def test_integrity_and_fingerprint_lengths(self) -> None:
        body = struct.pack("!HH", ATTR_MESSAGE_INTEGRITY, 16) + bytes(16)
        self.assertRaises(StunAttributeError, StunMessage.parse, header(1, 20) + body)
        body = struct.pack("!HH", ATTR_FINGERPRINT, 8) + bytes(8)
        self.assertRaises(StunAttributeError, StunMessage.parse, header(1, 12) + body)

    def test_checks_on_malformed_return_false(self) -> None:
        self.assertFalse(stun.check_integrity(b"garbage", RFC5769_KEY))
        self.assertFalse(stun.check_fingerprint(RFC5769_REQUEST[:-1]))
        # Well-formed but without the attribute in question.
        plain = StunMessage(BINDING_REQUEST, RFC5769_TID).encode(fingerprint=False)
        self.assertFalse(stun.check_integrity(plain, b""))
        self.assertFalse(stun.check_fingerprint(plain))

    def test_error_reasons_are_distinct(self) -> None:
        classes = [StunError, StunNotStunError, StunLengthError, StunAttributeError,
                   StunAttributeOrderError, StunFingerprintError]
        for cls in classes:
            self.assertTrue(issubclass(cls, ProtocolError))
            self.assertTrue(issubclass(cls, StunError))
        reasons = [cls.reason for cls in classes]
        self.assertEqual(len(set(reasons)), len(reasons))
        self.assertNotIn(ProtocolError.reason, reasons)


class EncodeTests(unittest.TestCase):
    def test_programming_errors(self) -> None:
        self.assertRaises(ValueError, StunMessage(1, b"short").encode)
        self.assertRaises(ValueError, StunMessage(0x0400, RFC5769_TID).encode)
        self.assertRaises(ValueError, StunMessage(1, RFC5769_TID).encode, pad_byte=256)
        parsed = StunMessage.parse(RFC5769_REQUEST)
        self.assertRaises(ValueError, parsed.encode)  # would add a second FINGERPRINT
        self.assertRaises(ValueError, parsed.encode, integrity_key=b"k", fingerprint=False)

    def test_layout(self) -> None:
        encoded = StunMessage(BINDING_INDICATION, RFC5769_TID, [(0x8022, b"abc")]).encode(
            fingerprint=False
        )
        expected = header(BINDING_INDICATION, 8) + bytes.fromhex("80220003616263") + b"\x00"
        self.assertEqual(encoded, expected)
        self.assertEqual(StunMessage.parse(encoded).message_class, 1)

    @GENERATED
    @given(
        st.lists(
            st.tuples(
                st.integers(0, 0xFFFF).filter(
                    lambda t: t not in (ATTR_MESSAGE_INTEGRITY, ATTR_FINGERPRINT)
                ),
                st.binary(max_size=40),
            ),
            max_size=8,
        ),
        st.binary(min_size=12, max_size=12),
        st.binary(max_size=32),
    )
    def test_round_trip(self, attributes, tid, key) -> None:
        message = StunMessage(BINDING_REQUEST, tid, attributes)
        encoded = message.encode(integrity_key=key)
        self.assertTrue(stun.is_stun(encoded))
        parsed = StunMessage.parse(encoded)
        self.assertEqual(parsed.transaction_id, tid)
        self.assertEqual(parsed.attributes[:-2], attributes)
        self.assertTrue(stun.check_integrity(encoded, key))
        self.assertFalse(stun.check_integrity(encoded, key + b"!"))
        self.assertTrue(stun.check_fingerprint(encoded))


class AttributeHelperTests(unittest.TestCase):
    @GENERATED
    @given(
        st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)),
        st.integers(0, 0xFFFF),
        st.binary(min_size=12, max_size=12),
    )
    def test_xor_mapped_address_round_trip(self, address, port, tid) -> None:
        value = stun.xor_mapped_address(str(address), port, tid)
        self.assertEqual(len(value), 8 if address.version == 4 else 20)
        self.assertEqual(value[1], 1 if address.version == 4 else 2)
        self.assertEqual(stun.decode_xor_mapped_address(value, tid), (str(address), port))

    def test_xor_mapped_address_is_xored(self) -> None:
        value = stun.xor_mapped_address("0.0.0.0", 0, RFC5769_TID)
        self.assertEqual(value, bytes.fromhex("000121122112a442"))
        value = stun.xor_mapped_address("::", 0, RFC5769_TID)
        self.assertEqual(value[4:], struct.pack("!I", stun.MAGIC_COOKIE) + RFC5769_TID)

    def test_xor_mapped_address_errors(self) -> None:
        self.assertRaises(ValueError, stun.xor_mapped_address, "1.2.3.4", 65536, RFC5769_TID)
        self.assertRaises(ValueError, stun.xor_mapped_address, "1.2.3.4", 1, b"x")
        self.assertRaises(ValueError, stun.xor_mapped_address, "not-an-ip", 1, RFC5769_TID)
        decode = stun.decode_xor_mapped_address
        self.assertRaises(StunAttributeError, decode, b"\x00\x01", RFC5769_TID)
        self.assertRaises(StunAttributeError, decode, bytes.fromhex("0003a147e112a643"),
                          RFC5769_TID)
        self.assertRaises(StunAttributeError, decode, bytes.fromhex("0001a147e112a6"),
                          RFC5769_TID)
        self.assertRaises(StunAttributeError, decode, bytes.fromhex("0002a147e112a643"),
                          RFC5769_TID)

    def test_error_code(self) -> None:
        value = stun.error_code(420, "Unknown Attribute")
        self.assertEqual(value[:4], b"\x00\x00\x04\x14")
        self.assertEqual(stun.decode_error_code(value), (420, "Unknown Attribute"))
        self.assertRaises(ValueError, stun.error_code, 200, "x")
        self.assertRaises(StunAttributeError, stun.decode_error_code, b"\x00\x00\x04")
        self.assertRaises(StunAttributeError, stun.decode_error_code, b"\x00\x00\x02\x00")
        self.assertRaises(StunAttributeError, stun.decode_error_code, b"\x00\x00\x04\x64")
        self.assertRaises(StunAttributeError, stun.decode_error_code, b"\x00\x00\x04\x00\xff")

    def test_unknown_attributes(self) -> None:
        self.assertEqual(stun.unknown_attributes([0x0031, 0x7FFF]), b"\x00\x31\x7f\xff")
        self.assertEqual(stun.decode_unknown_attributes(b"\x00\x31\x7f\xff"), [0x31, 0x7FFF])
        self.assertRaises(StunAttributeError, stun.decode_unknown_attributes, b"\x00")

    def test_parse_username(self) -> None:
        self.assertEqual(stun.parse_username(b"mdUf:peer"), ("mdUf", "peer"))
        for bad in (b"nocolon", b":peer", b"mdUf:", b"a:b:c", b"\xff:peer", b""):
            self.assertRaises(StunAttributeError, stun.parse_username, bad)


class ResponderTests(unittest.TestCase):
    def assertError(self, response: bytes | None, code: int, *, protected: bool) -> StunMessage:
        self.assertIsNotNone(response)
        message = StunMessage.parse(response)
        self.assertEqual(message.message_type, BINDING_ERROR)
        self.assertEqual(message.transaction_id, b"\x01" * 12)
        self.assertEqual(stun.decode_error_code(message.get(ATTR_ERROR_CODE))[0], code)
        self.assertTrue(stun.check_fingerprint(response))
        has_mi = message.get(ATTR_MESSAGE_INTEGRITY) is not None
        self.assertEqual(has_mi, protected)
        if protected:
            self.assertTrue(stun.check_integrity(response, LOCAL_PWD.encode()))
        return message

    def test_good_request_ipv4(self) -> None:
        tid = os.urandom(12)
        response = answer(make_request(tid=tid), SOURCE_V4)
        message = StunMessage.parse(response)
        self.assertEqual(message.message_type, BINDING_SUCCESS)
        self.assertEqual(message.transaction_id, tid)
        self.assertEqual(
            stun.decode_xor_mapped_address(message.get(ATTR_XOR_MAPPED_ADDRESS), tid), SOURCE_V4
        )
        self.assertEqual([t for t, _ in message.attributes],
                         [ATTR_XOR_MAPPED_ADDRESS, ATTR_MESSAGE_INTEGRITY, ATTR_FINGERPRINT])
        self.assertTrue(stun.check_integrity(response, LOCAL_PWD.encode()))
        self.assertFalse(stun.check_integrity(response, b"other"))
        self.assertTrue(stun.check_fingerprint(response))

    def test_good_request_ipv6(self) -> None:
        response = answer(make_request(), SOURCE_V6)
        message = StunMessage.parse(response)
        self.assertEqual(message.message_type, BINDING_SUCCESS)
        self.assertEqual(
            stun.decode_xor_mapped_address(message.get(ATTR_XOR_MAPPED_ADDRESS), b"\x01" * 12),
            SOURCE_V6,
        )
        self.assertTrue(stun.check_integrity(response, LOCAL_PWD.encode()))

    def test_wrong_password_is_401(self) -> None:
        self.assertError(answer(make_request(pwd="wrong-password")), 401, protected=False)

    def test_wrong_ufrag_is_401(self) -> None:
        # Documented choice: an unknown ufrag is an authentication failure (RFC 8489 §9.1.3).
        self.assertError(answer(make_request(username=b"other:peer")), 401, protected=False)
        self.assertError(answer(make_request(username=b"mdUfX:peer")), 401, protected=False)
        self.assertError(answer(make_request(username=b"mdUf")), 401, protected=False)

    def test_missing_username_is_400(self) -> None:
        self.assertError(answer(make_request(username=None)), 400, protected=False)

    def test_missing_integrity_is_400(self) -> None:
        self.assertError(answer(make_request(pwd=None)), 400, protected=False)

    def test_missing_priority_or_fingerprint_is_protected_400(self) -> None:
        self.assertError(answer(make_request(priority=False)), 400, protected=True)
        self.assertError(answer(make_request(fingerprint=False)), 400, protected=True)

    def test_unknown_comprehension_required_is_420(self) -> None:
        response = answer(make_request(extra=[(0x0031, b"x"), (0x7FF0, b"")]))
        message = self.assertError(response, 420, protected=True)
        self.assertEqual(
            stun.decode_unknown_attributes(message.get(ATTR_UNKNOWN_ATTRIBUTES)),
            [0x0031, 0x7FF0],
        )
        # Unknown comprehension-optional attributes are ignored.
        response = answer(make_request(extra=[(0xC057, b"\x00\x01\x00\x0a")]))
        self.assertEqual(StunMessage.parse(response).message_type, BINDING_SUCCESS)

    def test_tampered_bytes_are_refused(self) -> None:
        request = bytearray(make_request())
        request[25] ^= 0x01  # inside the USERNAME value
        self.assertRaises(StunFingerprintError, answer, bytes(request))
        # An attacker who also recomputes FINGERPRINT still fails integrity.
        tampered = StunMessage.parse(bytes(request))
        resealed = StunMessage(tampered.message_type, tampered.transaction_id,
                               tampered.attributes[:-1]).encode()
        self.assertTrue(stun.check_fingerprint(resealed))
        self.assertError(answer(resealed), 401, protected=False)

    def test_tampered_rfc5769_request(self) -> None:
        # Bytes 0..99 are covered by MESSAGE-INTEGRITY; 104..107 are the CRC.
        for position in (0, 3, 8, 21, 30, 50, 70, 90, 99, 104, 107):
            tampered = bytearray(RFC5769_REQUEST)
            tampered[position] ^= 0x01
            self.assertFalse(stun.check_fingerprint(bytes(tampered)), position)
            self.assertEqual(stun.check_integrity(bytes(tampered), RFC5769_KEY),
                             position >= 100, position)
        # FINGERPRINT's type turned into ICE-CONTROLLED: now after MESSAGE-INTEGRITY.
        tampered = bytearray(RFC5769_REQUEST)
        tampered[101] ^= 0x01
        self.assertRaises(StunAttributeOrderError, StunMessage.parse, bytes(tampered))
        self.assertFalse(stun.check_integrity(bytes(tampered), RFC5769_KEY))

    def test_non_requests_get_none(self) -> None:
        indication = StunMessage(BINDING_INDICATION, b"\x01" * 12).encode()
        self.assertIsNone(answer(indication))
        self.assertIsNone(answer(RFC5769_IPV4_RESPONSE))
        other_method = StunMessage(0x0003, b"\x01" * 12).encode()  # TURN Allocate
        self.assertIsNone(answer(other_method))

    def test_non_stun_raises(self) -> None:
        self.assertRaises(StunNotStunError, answer, b"\x80\x60" + bytes(30))
        self.assertRaises(StunLengthError, answer, make_request() + b"\x00")

    def test_response_builders_require_binding_request(self) -> None:
        response = StunMessage.parse(RFC5769_IPV4_RESPONSE)
        self.assertRaises(ValueError, stun.binding_success, response, SOURCE_V4, None)
        self.assertRaises(ValueError, stun.binding_error, response, 400, "Bad Request")

    def test_binding_success_without_key(self) -> None:
        request = StunMessage.parse(make_request())
        response = stun.binding_success(request, SOURCE_V4, None)
        self.assertIsNone(StunMessage.parse(response).get(ATTR_MESSAGE_INTEGRITY))
        self.assertTrue(stun.check_fingerprint(response))


class FuzzTests(unittest.TestCase):
    def _all(self, data: bytes) -> None:
        flag = stun.is_stun(data)
        self.assertIsInstance(flag, bool)
        try:
            StunMessage.parse(data)
        except StunError:
            parsed = False
        else:
            parsed = True
        if parsed:
            self.assertTrue(flag)
        self.assertIsInstance(stun.check_integrity(data, b"k"), bool)
        self.assertIsInstance(stun.check_fingerprint(data), bool)
        try:
            result = answer(data)
        except StunError:
            return
        self.assertTrue(result is None or stun.is_stun(result))

    @FUZZ
    @given(st.binary(max_size=200))
    def test_random_bytes(self, data: bytes) -> None:
        self._all(data)

    @FUZZ
    @given(st.integers(0, 0x03FF), st.binary(max_size=30).map(lambda b: b + bytes(-len(b) % 4)),
           st.binary(max_size=60))
    def test_random_bodies_behind_valid_headers(self, message_type, body, noise) -> None:
        # Make the attribute walker (not the header check) see the random data.
        data = header(message_type, len(body + noise) // 4 * 4) + (body + noise)[
            : len(body + noise) // 4 * 4
        ]
        self.assertTrue(stun.is_stun(data))
        self._all(data)

    @FUZZ
    @given(st.integers(0, len(RFC5769_REQUEST) - 1), st.integers(1, 255))
    def test_mutated_rfc5769_request(self, position, mask) -> None:
        data = bytearray(RFC5769_REQUEST)
        data[position] ^= mask
        data = bytes(data)
        self._all(data)
        self.assertFalse(stun.check_integrity(data, RFC5769_KEY) and
                         stun.check_fingerprint(data))
