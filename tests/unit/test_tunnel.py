"""Tests for perc_daemons.protocol.tunnel (RFC 9185 MD <-> KD tunnel codec)."""

from __future__ import annotations

import itertools
import uuid

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from perc_daemons.protocol.errors import ProtocolError
from perc_daemons.protocol.tunnel import (
    DISCONNECT_CONFERENCE_DELETED,
    DISCONNECT_CONSENT_TIMEOUT,
    DISCONNECT_LEAVE,
    DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM,
    DOUBLE_AEAD_AES_256_GCM_AEAD_AES_256_GCM,
    HEADER_LENGTH,
    MAX_ASSOCIATIONS,
    MAX_BODY_LENGTH,
    MAX_CONFERENCE_ID_LENGTH,
    MAX_SDP_LENGTH,
    REASONS_ANNOUNCEMENT,
    SIGN_STATUS_OK,
    SIGN_STATUS_REFUSED,
    AssociationEntry,
    Associations,
    BadAssociationId,
    ConferenceEnded,
    DecoderFailed,
    EndpointDisconnect,
    FrameTooLarge,
    Liveness,
    LivenessTimeout,
    MalformedFrame,
    MediaKeys,
    MessageType,
    Ping,
    Pong,
    SignAnswer,
    SignAnswerAck,
    SupportedProfiles,
    TunnelDecoder,
    TunneledDtls,
    TunnelError,
    UnexpectedPong,
    UnknownMessageType,
    UnsupportedProtocolVersion,
    UnsupportedVersion,
    decode_message,
    is_uuid4,
    new_association_id,
)

RFC_EXAMPLE = bytes.fromhex("0100070000040009000A")
AID = bytes.fromhex("0f1e2d3c4b5a4978a7b6c5d4e3f20110")  # version 4, variant 10
AID2 = uuid.UUID("12345678-1234-4234-9234-123456789abc").bytes

CLIENT_KEY = bytes(range(0x10, 0x20))
SERVER_KEY = bytes(range(0x20, 0x30))
CLIENT_SALT = bytes(range(0x30, 0x3C))
SERVER_SALT = bytes(range(0x40, 0x4C))


def media_keys(profile: int = DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM, **kw: bytes) -> MediaKeys:
    fields = dict(association_id=AID, protection_profile=profile, mki=b"",
                  client_write_key=CLIENT_KEY, server_write_key=SERVER_KEY,
                  client_write_salt=CLIENT_SALT, server_write_salt=SERVER_SALT)
    fields.update(kw)
    return MediaKeys(**fields)


def samples() -> list:
    return [
        SupportedProfiles((0x0009, 0x000A)),
        SupportedProfiles((0x0007,)),
        UnsupportedVersion(0),
        UnsupportedVersion(255),
        media_keys(),
        media_keys(mki=b"\x01\x02\x03\x04"),
        TunneledDtls(AID, b"\x16\xfe\xfd" + bytes(50)),
        TunneledDtls(AID2, b"x"),
        EndpointDisconnect(AID),
        SignAnswer(AID, "conf-1", "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\n", "v=0\r\ns=é☃\r\n"),
        SignAnswer(AID2, "é" * 127, "o", "a"),
        SignAnswerAck(AID, SIGN_STATUS_OK, "v=0\r\na=identity:abc\r\n"),
        SignAnswerAck(AID2, SIGN_STATUS_REFUSED, ""),
        SignAnswerAck(AID2, 0xFFFF, "fingerprint mismatch"),
        Associations(),
        Associations(((AID, "conf-1"), (AID2, "é☃" + "x" * 250))),
        Ping(0),
        Ping(2**64 - 1),
        Pong(7),
        ConferenceEnded("conf-1"),
        ConferenceEnded("é" * 127 + "x"),  # 255 bytes
    ]


def frame(msg_type: int, body: bytes) -> bytes:
    return bytes((msg_type,)) + len(body).to_bytes(2, "big") + body


def feed_all(decoder: TunnelDecoder, chunks) -> list:
    out: list = []
    for chunk in chunks:
        out.extend(decoder.feed(chunk))
    return out


class WorkedExampleTests(unittest.TestCase):
    def test_encode_rfc9185_section7(self) -> None:
        msg = SupportedProfiles((DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM,
                                 DOUBLE_AEAD_AES_256_GCM_AEAD_AES_256_GCM))
        self.assertEqual(msg.encode(), RFC_EXAMPLE)

    def test_decode_rfc9185_section7(self) -> None:
        expected = SupportedProfiles((0x0009, 0x000A))
        self.assertEqual(decode_message(RFC_EXAMPLE[0], RFC_EXAMPLE[3:]), expected)
        self.assertEqual(TunnelDecoder().feed(RFC_EXAMPLE), [expected])

    def test_profile_constants(self) -> None:
        self.assertEqual(DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM, 0x0009)
        self.assertEqual(DOUBLE_AEAD_AES_256_GCM_AEAD_AES_256_GCM, 0x000A)
        self.assertEqual([int(t) for t in MessageType],
                         [0x01, 0x02, 0x03, 0x04, 0x05, 0xF0, 0xF1, 0xF2, 0xF3, 0xF4, 0xF5])


class EncodingTests(unittest.TestCase):
    def test_round_trip_every_message(self) -> None:
        for msg in samples():
            data = msg.encode()
            self.assertEqual(data[0], msg.msg_type, msg)
            self.assertEqual(int.from_bytes(data[1:3], "big"), len(data) - 3, msg)
            self.assertEqual(decode_message(data[0], data[3:]), msg)
            self.assertEqual(TunnelDecoder().feed(data), [msg])

    def test_media_keys_layout_double_outer_halves(self) -> None:
        msg = media_keys(mki=b"\xAA")
        body = (AID + b"\x00\x09" + b"\x01\xAA" + b"\x10" + CLIENT_KEY + b"\x10"
                + SERVER_KEY + b"\x0c" + CLIENT_SALT + b"\x0c" + SERVER_SALT)
        self.assertEqual(msg.encode(), frame(0x03, body))
        decoded = decode_message(0x03, body)
        self.assertEqual(decoded.protection_profile, 0x0009)
        self.assertEqual((decoded.client_write_key, decoded.server_write_key),
                         (CLIENT_KEY, SERVER_KEY))
        self.assertEqual((decoded.client_write_salt, decoded.server_write_salt),
                         (CLIENT_SALT, SERVER_SALT))
        self.assertEqual(decoded.mki, b"\xAA")

    def test_media_keys_double_256_outer_halves(self) -> None:
        msg = media_keys(DOUBLE_AEAD_AES_256_GCM_AEAD_AES_256_GCM,
                         client_write_key=bytes(range(32)),
                         server_write_key=bytes(range(32, 64)))
        self.assertEqual(decode_message(0x03, msg.encode()[3:]), msg)
        self.assertEqual(len(msg.encode()), 3 + 16 + 2 + 1 + 2 * 33 + 2 * 13)

    def test_media_keys_repr_hides_keys_and_salts(self) -> None:
        msg = media_keys()
        for text in (repr(msg), str(msg), repr([msg])):
            for secret in (CLIENT_KEY, SERVER_KEY, CLIENT_SALT, SERVER_SALT):
                self.assertNotIn(secret.hex(), text)
                self.assertNotIn(repr(secret), text)
                self.assertNotIn(secret[:4].hex(), text)
        self.assertIn(str(uuid.UUID(bytes=AID)), repr(msg))
        self.assertIn("0x0009", repr(msg))

    def test_other_byte_layouts(self) -> None:
        self.assertEqual(UnsupportedVersion(3).encode(), b"\x02\x00\x01\x03")
        self.assertEqual(EndpointDisconnect(AID).encode(), b"\x05\x00\x10" + AID)
        self.assertEqual(TunneledDtls(AID, b"ab").encode(),
                         b"\x04\x00\x14" + AID + b"\x00\x02ab")
        self.assertEqual(SignAnswer(AID, "c1", "o", "é").encode(),
                         b"\xf0\x00\x1a" + AID + b"\x02c1\x00\x01o\x00\x02\xc3\xa9")
        for bad in ("", "x" * 256):
            with self.assertRaises(MalformedFrame):
                SignAnswer(AID, bad, "o", "a")
        # a conference id that is not UTF-8 on the wire
        frame = b"\xf0\x00\x18" + AID + b"\x01\xff\x00\x01o\x00\x01a"
        with self.assertRaises(MalformedFrame):
            TunnelDecoder().feed(frame)
        self.assertEqual(SignAnswerAck(AID, 2, "no").encode(),
                         b"\xf1\x00\x16" + AID + b"\x00\x02\x00\x02no")
        self.assertEqual(Associations().encode(), b"\xf2\x00\x02\x00\x00")
        self.assertEqual(Associations([(AID, "c1"), (AID2, "é")]).encode(),
                         b"\xf2\x00\x28\x00\x02" + AID + b"\x02c1" + AID2 + b"\x02\xc3\xa9")

    def test_largest_messages_fit_a_frame(self) -> None:
        big = "a" * MAX_SDP_LENGTH
        longest_cid = "c" * MAX_CONFERENCE_ID_LENGTH
        data = SignAnswer(AID, longest_cid, big, big).encode()
        self.assertLessEqual(len(data), HEADER_LENGTH + MAX_BODY_LENGTH)
        self.assertEqual(TunnelDecoder().feed(data), [SignAnswer(AID, longest_cid, big, big)])
        dtls = TunneledDtls(AID, bytes(MAX_BODY_LENGTH - 18))
        self.assertEqual(len(dtls.encode()), HEADER_LENGTH + MAX_BODY_LENGTH)
        self.assertEqual(TunnelDecoder().feed(dtls.encode()), [dtls])
        many = SupportedProfiles(tuple(range((MAX_BODY_LENGTH - 3) // 2)))
        self.assertEqual(TunnelDecoder().feed(many.encode()), [many])
        longest = Associations([(new_association_id(), "é" * (MAX_CONFERENCE_ID_LENGTH // 2)
                                 + "x") for _ in range(MAX_ASSOCIATIONS)])
        data = longest.encode()
        self.assertLessEqual(len(data), HEADER_LENGTH + MAX_BODY_LENGTH)
        self.assertEqual(TunnelDecoder().feed(data), [longest])
        self.assertEqual(MAX_ASSOCIATIONS, 240)

    def test_sign_answer_ack_accessors(self) -> None:
        self.assertEqual(SignAnswerAck(AID, SIGN_STATUS_OK, "v=0").signed_answer, "v=0")
        refused = SignAnswerAck(AID, SIGN_STATUS_REFUSED, "bad identity")
        self.assertFalse(refused.ok)
        self.assertIsNone(refused.signed_answer)


class ValidationTests(unittest.TestCase):
    def test_supported_profiles_bounds(self) -> None:
        self.assertRaises(MalformedFrame, SupportedProfiles, ())
        self.assertRaises(MalformedFrame, SupportedProfiles, (0x10000,))
        self.assertRaises(MalformedFrame, SupportedProfiles, (-1,))
        self.assertRaises(MalformedFrame, SupportedProfiles,
                          tuple(range((MAX_BODY_LENGTH - 3) // 2 + 1)))
        self.assertEqual(SupportedProfiles([9, 10]).profiles, (9, 10))

    def test_supported_profiles_decode_errors(self) -> None:
        self.assertRaises(MalformedFrame, decode_message, 0x01, b"\x00\x00\x00")  # empty list
        self.assertRaises(MalformedFrame, decode_message, 0x01, b"\x00\x00\x03\x00\x09\x00")
        self.assertRaises(MalformedFrame, decode_message, 0x01, b"\x00\x00\x01\x00")
        with self.assertRaises(UnsupportedProtocolVersion) as cm:
            decode_message(0x01, b"\x01\x00\x04\x00\x09\x00\x0a")
        self.assertEqual(cm.exception.version, 1)

    def test_media_keys_lengths(self) -> None:
        for name in ("client_write_key", "server_write_key",
                     "client_write_salt", "server_write_salt"):
            self.assertRaises(MalformedFrame, media_keys, **{name: b""})
            self.assertRaises(MalformedFrame, media_keys, **{name: bytes(256)})
            msg = media_keys(**{name: bytes(255)})
            self.assertEqual(decode_message(0x03, msg.encode()[3:]), msg)
        self.assertRaises(MalformedFrame, media_keys, mki=bytes(256))
        self.assertEqual(media_keys(mki=bytes(255)).mki, bytes(255))
        self.assertRaises(MalformedFrame, media_keys, profile=0x10000)
        zero_key = AID + b"\x00\x09\x00\x00\x01k\x01s\x01t"
        self.assertRaises(MalformedFrame, decode_message, 0x03, zero_key)

    def test_empty_tunneled_dtls(self) -> None:
        self.assertRaises(MalformedFrame, TunneledDtls, AID, b"")
        self.assertRaises(MalformedFrame, decode_message, 0x04, AID + b"\x00\x00")
        decoder = TunnelDecoder()
        self.assertRaises(MalformedFrame, decoder.feed, frame(0x04, AID + b"\x00\x00"))

    def test_bad_association_ids(self) -> None:
        v1 = uuid.uuid1().bytes
        bad_variant = bytearray(AID)
        bad_variant[8] &= 0x3F
        v5 = uuid.uuid5(uuid.NAMESPACE_DNS, "perc.example").bytes
        for bad in (v1, bytes(bad_variant), v5):
            self.assertFalse(is_uuid4(bad))
            self.assertRaises(BadAssociationId, EndpointDisconnect, bad)
            self.assertRaises(BadAssociationId, decode_message, 0x05, bad)
            self.assertRaises(BadAssociationId, decode_message, 0x04, bad + b"\x00\x01x")
            self.assertRaises(BadAssociationId, TunnelDecoder().feed, frame(0x05, bad))
        self.assertRaises(BadAssociationId, EndpointDisconnect, AID[:15])
        self.assertRaises(BadAssociationId, EndpointDisconnect, AID + b"\x00")
        self.assertRaises(TypeError, EndpointDisconnect, str(uuid.uuid4()))

    def test_association_id_helpers(self) -> None:
        ids = {new_association_id() for _ in range(50)}
        self.assertEqual(len(ids), 50)
        for aid in ids:
            self.assertEqual(len(aid), 16)
            self.assertTrue(is_uuid4(aid))
            self.assertEqual(uuid.UUID(bytes=aid).version, 4)
        self.assertTrue(is_uuid4(AID))
        self.assertFalse(is_uuid4(AID[:15]))
        self.assertFalse(is_uuid4(str(uuid.UUID(bytes=AID))))

    def test_unknown_types(self) -> None:
        for msg_type in (0x00, 0x06, 0x7F, 0xEF, 0xF6, 0xFF):
            with self.assertRaises(UnknownMessageType) as cm:
                decode_message(msg_type, b"")
            self.assertEqual(cm.exception.msg_type, msg_type)
            self.assertRaises(UnknownMessageType, TunnelDecoder().feed,
                              bytes((msg_type,)) + b"\x00\x00")

    def test_truncated_bodies(self) -> None:
        for msg in samples():
            body = msg.encode()[3:]
            for cut in range(len(body)):
                with self.assertRaises(MalformedFrame, msg=f"{msg!r} cut at {cut}"):
                    decode_message(msg.msg_type, body[:cut])
                self.assertRaises(MalformedFrame, TunnelDecoder().feed,
                                  frame(msg.msg_type, body[:cut]))

    def test_trailing_bytes(self) -> None:
        for msg in samples():
            body = msg.encode()[3:]
            # EndpointDisconnect's one private reason byte is not trailing (below)
            extra = b"\x00\x00" if isinstance(msg, EndpointDisconnect) else b"\x00"
            self.assertRaises(MalformedFrame, decode_message, msg.msg_type, body + extra)
            self.assertRaises(MalformedFrame, TunnelDecoder().feed,
                              frame(msg.msg_type, body + extra))

    def test_endpoint_disconnect_reason(self) -> None:
        """Our private extension: one byte after the uuid, only when there is a reason."""
        self.assertEqual(EndpointDisconnect(AID, DISCONNECT_CONSENT_TIMEOUT).encode(),
                         b"\x05\x00\x11" + AID + b"\x01")
        self.assertEqual(decode_message(0x05, AID), EndpointDisconnect(AID, None))
        self.assertEqual(EndpointDisconnect(AID).encode(), b"\x05\x00\x10" + AID)
        names = {code: EndpointDisconnect(AID, code).reason_name for code in range(256)}
        self.assertEqual({c: n for c, n in names.items() if n is not None},
                         {1: "consent_timeout", 2: "md_leave", 3: "conference_deleted"})
        self.assertEqual((DISCONNECT_LEAVE, DISCONNECT_CONFERENCE_DELETED), (2, 3))
        self.assertIsNone(EndpointDisconnect(AID).reason_name)
        # an unknown reason is passed through (the KD reads it as none)
        self.assertEqual(decode_message(0x05, AID + b"\xc8"), EndpointDisconnect(AID, 200))
        for bad in (-1, 256):
            self.assertRaises(MalformedFrame, EndpointDisconnect, AID, bad)
        self.assertRaises(TypeError, EndpointDisconnect, AID, "1")
        self.assertRaises(TypeError, EndpointDisconnect, AID, True)
        # the KD's announcement is an RFC 9185 EndpointDisconnect of a reserved v4 UUID
        self.assertTrue(is_uuid4(REASONS_ANNOUNCEMENT))
        self.assertEqual(EndpointDisconnect(REASONS_ANNOUNCEMENT).encode(),
                         b"\x05\x00\x10" + REASONS_ANNOUNCEMENT)

    def test_sign_messages_text(self) -> None:
        self.assertRaises(MalformedFrame, SignAnswer, AID, "c", "", "v=0")
        self.assertRaises(MalformedFrame, SignAnswer, AID, "c", "v=0", "")
        self.assertRaises(MalformedFrame, SignAnswer, AID, "c", "a" * (MAX_SDP_LENGTH + 1), "v")
        self.assertRaises(MalformedFrame, SignAnswer, AID, "c", "\ud800", "v")
        self.assertRaises(MalformedFrame, SignAnswer, AID, "\ud800", "v", "v")
        self.assertRaises(MalformedFrame, SignAnswerAck, AID, SIGN_STATUS_OK, "")
        self.assertRaises(MalformedFrame, SignAnswerAck, AID, 0x10000, "x")
        bad_utf8 = AID + b"\x00\x01\xff\x00\x01v"
        self.assertRaises(MalformedFrame, decode_message, 0xF0, bad_utf8)
        empty_ok = AID + b"\x00\x00\x00\x00"
        self.assertRaises(MalformedFrame, decode_message, 0xF1, empty_ok)

    def test_associations_bounds(self) -> None:
        self.assertEqual(Associations([[AID, "c"]]).entries, (AssociationEntry(AID, "c"),))
        self.assertEqual(Associations([(AID, "c")]).entries[0].conference_id, "c")
        self.assertRaises(MalformedFrame, Associations, [(AID, "")])
        self.assertRaises(MalformedFrame, Associations,
                          [(AID, "x" * (MAX_CONFERENCE_ID_LENGTH + 1))])
        self.assertRaises(MalformedFrame, Associations, [(AID, "é" * 128)])  # 256 bytes
        self.assertRaises(MalformedFrame, Associations, [(AID, "\ud800")])
        self.assertRaises(MalformedFrame, Associations, [(AID, "a"), (AID, "b")])
        self.assertRaises(BadAssociationId, Associations, [(uuid.uuid1().bytes, "c")])
        self.assertRaises(BadAssociationId, Associations, [(AID[:15], "c")])
        self.assertRaises(TypeError, Associations, [(AID, b"c")])
        self.assertRaises(TypeError, Associations, [(str(uuid.UUID(bytes=AID)), "c")])
        self.assertRaises(TypeError, Associations, [(AID, "c", "extra")])
        self.assertRaises(TypeError, Associations, [AID])
        too_many = [(new_association_id(), "c") for _ in range(MAX_ASSOCIATIONS + 1)]
        self.assertRaises(MalformedFrame, Associations, too_many)
        self.assertEqual(len(Associations(too_many[:-1]).entries), MAX_ASSOCIATIONS)

    def test_associations_decode_errors(self) -> None:
        entry = AID + b"\x01c"
        self.assertEqual(decode_message(0xF2, b"\x00\x01" + entry),
                         Associations([(AID, "c")]))
        self.assertRaises(MalformedFrame, decode_message, 0xF2, b"\x00\x02" + entry)
        self.assertRaises(MalformedFrame, decode_message, 0xF2, b"\x00\x01" + AID + b"\x00")
        self.assertRaises(MalformedFrame, decode_message, 0xF2, b"\x00\x01" + AID + b"\x01\xff")
        self.assertRaises(MalformedFrame, decode_message, 0xF2, b"\x00\x02" + entry + entry)
        bad = bytearray(entry)
        bad[6] = 0x14  # version 1
        self.assertRaises(BadAssociationId, decode_message, 0xF2, b"\x00\x01" + bytes(bad))
        # A count above the bound is refused before any entry is read.
        count = (MAX_ASSOCIATIONS + 1).to_bytes(2, "big")
        self.assertRaises(MalformedFrame, decode_message, 0xF2, count)
        self.assertRaises(MalformedFrame, TunnelDecoder().feed, frame(0xF2, count))

    def test_errors_are_typed_protocol_errors(self) -> None:
        classes = (MalformedFrame, UnknownMessageType, FrameTooLarge, BadAssociationId,
                   UnsupportedProtocolVersion, DecoderFailed, LivenessTimeout, UnexpectedPong)
        reasons = set()
        for cls in classes:
            self.assertTrue(issubclass(cls, TunnelError))
            self.assertTrue(issubclass(cls, ProtocolError))
            reasons.add(cls.reason)
        self.assertEqual(len(reasons | {TunnelError.reason}), len(classes) + 1)


class PingPongTests(unittest.TestCase):
    def test_layout(self) -> None:
        self.assertEqual(Ping(0x0102030405060708).encode(),
                         b"\xf3\x00\x08\x01\x02\x03\x04\x05\x06\x07\x08")
        self.assertEqual(Pong(1).encode(), b"\xf4\x00\x08" + bytes(7) + b"\x01")
        self.assertEqual(decode_message(0xF4, bytes(7) + b"\x01"), Pong(1))

    def test_bounds(self) -> None:
        for cls in (Ping, Pong):
            self.assertRaises(MalformedFrame, cls, -1)
            self.assertRaises(MalformedFrame, cls, 2**64)
            self.assertRaises(TypeError, cls, True)
            self.assertRaises(MalformedFrame, decode_message, cls.msg_type, bytes(7))
            self.assertRaises(MalformedFrame, decode_message, cls.msg_type, bytes(9))


class LivenessTests(unittest.TestCase):
    def test_ping_every_interval_after_the_last_answer(self) -> None:
        live = Liveness(interval=15.0, timeout=5.0, now=100.0)
        self.assertEqual(live.deadline, 115.0)
        self.assertIsNone(live.poll(114.9))
        self.assertFalse(live.waiting)
        self.assertEqual(live.poll(115.0), Ping(1))
        self.assertTrue(live.waiting)
        self.assertEqual(live.deadline, 120.0)
        self.assertIsNone(live.poll(119.0))
        live.pong(Pong(1), 117.0)
        self.assertFalse(live.waiting)
        self.assertEqual(live.deadline, 132.0)
        self.assertEqual(live.poll(132.0), Ping(2))

    def test_late_pong_is_a_timeout(self) -> None:
        live = Liveness(interval=1.0, timeout=2.0, now=0.0)
        self.assertEqual(live.poll(1.0), Ping(1))
        with self.assertRaises(LivenessTimeout) as cm:
            live.poll(3.0)
        self.assertEqual(cm.exception.reason, "tunnel_liveness_timeout")
        self.assertIn("2 s", str(cm.exception))

    def test_probe_pings_at_once_unless_one_is_in_flight(self) -> None:
        live = Liveness(interval=15.0, timeout=5.0, now=0.0)
        self.assertEqual(live.probe(1.0), Ping(1))
        self.assertEqual(live.deadline, 6.0)
        self.assertIsNone(live.probe(2.0))  # the first one's due time holds
        self.assertEqual(live.deadline, 6.0)
        self.assertRaises(LivenessTimeout, live.poll, 6.0)

    def test_pong_must_answer_the_ping_in_flight(self) -> None:
        live = Liveness(interval=1.0, timeout=1.0, now=0.0)
        self.assertRaises(UnexpectedPong, live.pong, Pong(1), 0.5)  # none in flight
        live.poll(1.0)
        self.assertRaises(UnexpectedPong, live.pong, Pong(2), 1.5)
        self.assertTrue(live.waiting)
        live.pong(Pong(1), 1.5)
        self.assertRaises(UnexpectedPong, live.pong, Pong(1), 1.6)  # answered already

    def test_bad_parameters(self) -> None:
        self.assertRaises(ValueError, Liveness, 0.0, 1.0, 0.0)
        self.assertRaises(ValueError, Liveness, 1.0, -1.0, 0.0)


class DecoderTests(unittest.TestCase):
    def stream(self) -> tuple[bytes, list]:
        messages = samples()
        return b"".join(m.encode() for m in messages), messages

    def test_split_at_every_byte_boundary(self) -> None:
        data, messages = self.stream()
        for cut in range(len(data) + 1):
            decoder = TunnelDecoder()
            self.assertEqual(feed_all(decoder, [data[:cut], data[cut:]]), messages,
                             f"cut at {cut}")
            self.assertEqual(decoder.buffered, 0)

    def test_one_byte_at_a_time(self) -> None:
        data, messages = self.stream()
        decoder = TunnelDecoder()
        got = []
        for i in range(len(data)):
            got.extend(decoder.feed(data[i:i + 1]))
            self.assertEqual(decoder.buffered + len(b"".join(m.encode() for m in got)), i + 1)
        self.assertEqual(got, messages)

    def test_several_frames_in_one_chunk(self) -> None:
        data, messages = self.stream()
        decoder = TunnelDecoder()
        self.assertEqual(decoder.feed(data + RFC_EXAMPLE[:5]),
                         [*messages])
        self.assertEqual(decoder.buffered, 5)
        self.assertEqual(decoder.feed(RFC_EXAMPLE[5:] + RFC_EXAMPLE),
                         [SupportedProfiles((9, 10))] * 2)
        self.assertEqual(decoder.feed(b""), [])

    def test_empty_feed_and_bytearray_input(self) -> None:
        decoder = TunnelDecoder()
        self.assertEqual(decoder.feed(b""), [])
        self.assertEqual(decoder.feed(bytearray(RFC_EXAMPLE)), [SupportedProfiles((9, 10))])
        self.assertEqual(decoder.feed(memoryview(RFC_EXAMPLE)), [SupportedProfiles((9, 10))])

    def test_oversized_length_rejected_before_buffering(self) -> None:
        decoder = TunnelDecoder(max_body_length=1024)
        with self.assertRaises(FrameTooLarge) as cm:
            decoder.feed(b"\x04\xff\xff")
        self.assertEqual((cm.exception.length, cm.exception.limit), (65535, 1024))
        self.assertEqual(decoder.buffered, 0)
        self.assertTrue(decoder.failed)

    def test_oversized_length_split_header(self) -> None:
        decoder = TunnelDecoder(max_body_length=1024)
        self.assertEqual(decoder.feed(b"\x04\x04"), [])
        self.assertRaises(FrameTooLarge, decoder.feed, b"\x01")  # 1025

    def test_limit_boundary(self) -> None:
        msg = TunneledDtls(AID, bytes(1024 - 18))
        self.assertEqual(TunnelDecoder(max_body_length=1024).feed(msg.encode()), [msg])
        too_big = TunneledDtls(AID, bytes(1024 - 17))
        self.assertRaises(FrameTooLarge, TunnelDecoder(max_body_length=1024).feed,
                          too_big.encode())
        self.assertRaises(ValueError, TunnelDecoder, MAX_BODY_LENGTH + 1)
        self.assertRaises(ValueError, TunnelDecoder, -1)

    def test_buffering_is_bounded(self) -> None:
        decoder = TunnelDecoder(max_body_length=1024)
        data = b"".join(TunneledDtls(AID, bytes(1000)).encode() for _ in range(200))
        self.assertEqual(len(decoder.feed(data + data[:1010])), 200)
        self.assertEqual(decoder.buffered, 1010)
        self.assertLessEqual(len(decoder._buffer), 1024)

    def test_refuses_input_after_error(self) -> None:
        decoder = TunnelDecoder()
        self.assertRaises(UnknownMessageType, decoder.feed, b"\x99\x00\x00")
        self.assertRaises(DecoderFailed, decoder.feed, RFC_EXAMPLE)
        self.assertRaises(DecoderFailed, decoder.feed, b"")
        malformed = TunnelDecoder()
        self.assertRaises(MalformedFrame, malformed.feed, frame(0x02, b""))
        self.assertRaises(DecoderFailed, malformed.feed, RFC_EXAMPLE)

    def test_messages_before_error_are_kept_on_the_error(self) -> None:
        decoder = TunnelDecoder()
        with self.assertRaises(UnknownMessageType) as cm:
            decoder.feed(RFC_EXAMPLE + EndpointDisconnect(AID).encode() + b"\x06\x00\x00")
        self.assertEqual(cm.exception.messages,
                         (SupportedProfiles((9, 10)), EndpointDisconnect(AID)))


class ConferenceEndedTests(unittest.TestCase):
    def test_layout(self) -> None:
        self.assertEqual(ConferenceEnded("conf-1").encode(), b"\xf5\x00\x07\x06conf-1")
        self.assertEqual(ConferenceEnded("été").encode(),
                         b"\xf5\x00\x06\x05" + "été".encode())
        self.assertEqual(decode_message(0xF5, b"\x01c"), ConferenceEnded("c"))
        self.assertEqual(MessageType(0xF5), MessageType.CONFERENCE_ENDED)
        longest = ConferenceEnded("x" * MAX_CONFERENCE_ID_LENGTH)
        self.assertEqual(len(longest.encode()), 3 + 1 + MAX_CONFERENCE_ID_LENGTH)
        self.assertEqual(TunnelDecoder().feed(longest.encode()), [longest])

    def test_bounds(self) -> None:
        # Empty, too long (in bytes, not characters), not encodable: as the other
        # conference ids of the tunnel (SignAnswer, Associations).
        self.assertRaises(MalformedFrame, ConferenceEnded, "")
        self.assertRaises(MalformedFrame, ConferenceEnded, "x" * (MAX_CONFERENCE_ID_LENGTH + 1))
        self.assertRaises(MalformedFrame, ConferenceEnded, "é" * 128)  # 256 bytes
        self.assertRaises(MalformedFrame, ConferenceEnded, "\ud800")
        self.assertRaises(TypeError, ConferenceEnded, b"conf-1")
        self.assertRaises(TypeError, ConferenceEnded, None)

    def test_decode_errors(self) -> None:
        for body in (b"", b"\x00", b"\x02c", b"\x01\xff", b"\x02\xc3", b"\x01c\x00",
                     b"\x03\xed\xa0\x80"):  # a UTF-8-encoded surrogate is not UTF-8
            with self.assertRaises(MalformedFrame, msg=body):
                decode_message(0xF5, body)
            self.assertRaises(MalformedFrame, TunnelDecoder().feed, frame(0xF5, body))


# -- property tests -------------------------------------------------------------------

uuid4s = st.binary(min_size=16, max_size=16).map(
    lambda b: uuid.UUID(bytes=b, version=4).bytes)
sdp = st.text(min_size=1, max_size=40)
opaque = st.binary(min_size=1, max_size=255)
messages = st.one_of(
    st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=8).map(
        lambda p: SupportedProfiles(tuple(p))),
    st.integers(0, 255).map(UnsupportedVersion),
    st.builds(MediaKeys, uuid4s, st.integers(0, 0xFFFF), st.binary(max_size=255),
              opaque, opaque, opaque, opaque),
    st.builds(TunneledDtls, uuid4s, st.binary(min_size=1, max_size=300)),
    st.builds(EndpointDisconnect, uuid4s),
    st.builds(EndpointDisconnect, uuid4s, st.integers(0, 255)),
    st.builds(SignAnswer, uuid4s, st.text(min_size=1, max_size=60), sdp, sdp),
    st.builds(SignAnswerAck, uuid4s, st.just(SIGN_STATUS_OK), sdp),
    st.builds(SignAnswerAck, uuid4s, st.integers(1, 0xFFFF), st.text(max_size=40)),
    st.dictionaries(uuid4s, st.text(min_size=1, max_size=20), max_size=6).map(
        lambda entries: Associations(tuple(entries.items()))),
    st.integers(0, 2**64 - 1).map(Ping),
    st.integers(0, 2**64 - 1).map(Pong),
    st.text(min_size=1, max_size=63).map(ConferenceEnded),
)
pieces = st.lists(st.one_of(messages.map(lambda m: m.encode()), st.binary(max_size=40)),
                  max_size=8)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


class PropertyTests(unittest.TestCase):
    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(messages, max_size=8), st.lists(st.integers(0, 10**6), max_size=10))
    def test_valid_streams_round_trip_in_any_chunking(self, msgs, cuts) -> None:
        data = b"".join(m.encode() for m in msgs)
        decoder = TunnelDecoder()
        got = feed_all(decoder, chunked(data, cuts))
        self.assertEqual(got, msgs)
        self.assertEqual(decoder.buffered, 0)
        for msg in got:
            self.assertEqual(decode_message(msg.msg_type, msg.encode()[3:]), msg)

    @settings(max_examples=400, deadline=None)
    @given(st.binary(max_size=300))
    def test_conference_ended_garbage_decodes_or_is_malformed(self, body) -> None:
        """Any body under 0xF5 is a ConferenceEnded that re-encodes to it, or refused."""
        try:
            message = decode_message(0xF5, body)
        except MalformedFrame:
            return
        self.assertIsInstance(message, ConferenceEnded)
        self.assertEqual(message.encode(), frame(0xF5, body))

    @settings(max_examples=400, deadline=None)
    @given(st.binary(max_size=40))
    def test_endpoint_disconnect_garbage_decodes_or_is_refused(self, body) -> None:
        """Any body under 0x05 is an EndpointDisconnect (uuid, optional reason byte) that
        re-encodes to it, or a typed tunnel error; nothing else."""
        try:
            message = decode_message(0x05, body)
        except (MalformedFrame, BadAssociationId):
            self.assertFalse(len(body) in (16, 17) and is_uuid4(body[:16]))
            return
        self.assertIsInstance(message, EndpointDisconnect)
        self.assertIn(len(body), (16, 17))
        self.assertEqual(message.reason, body[16] if len(body) == 17 else None)
        self.assertEqual(message.encode(), frame(0x05, body))

    @settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(pieces, st.lists(st.integers(0, 10**6), max_size=10), st.integers(0, 400))
    def test_random_streams_give_messages_or_tunnel_error(self, parts, cuts, limit) -> None:
        data = b"".join(parts)
        decoder = TunnelDecoder(max_body_length=limit)
        got: list = []
        error = None
        for chunk in chunked(data, cuts):
            try:
                got.extend(decoder.feed(chunk))
            except TunnelError as exc:  # any other exception fails the test
                got.extend(exc.messages)
                error = exc
                break
            self.assertLessEqual(decoder.buffered, HEADER_LENGTH + limit)
        consumed = b"".join(m.encode() for m in got)
        self.assertEqual(data[:len(consumed)], consumed)
        if error is None:
            self.assertEqual(len(consumed) + decoder.buffered, len(data))
        else:
            self.assertRaises(DecoderFailed, decoder.feed, b"")
