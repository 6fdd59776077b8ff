"""Tests for perc_daemons.protocol.ekt (RFC 8870 EKT, RFC 5649 AES-KWP)."""

from __future__ import annotations

import itertools
from collections.abc import Callable

from cryptography.hazmat.primitives.keywrap import (
    aes_key_unwrap_with_padding,
    aes_key_wrap_with_padding,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from perc_daemons.protocol import ekt
from perc_daemons.protocol.ekt import (
    FULL_EKT_TYPE,
    REJECT_SSRC_MISMATCH,
    REJECT_STALE_EPOCH,
    SHORT_EKT_FIELD,
    BadEktPlaintext,
    EktCipher,
    EktCipherTooWeak,
    EktEpochExhausted,
    EktError,
    EktKeyLengthMismatch,
    EktKeyWrongLength,
    EktParameterSet,
    EktPlaintext,
    EktReceiver,
    EktSaltTooShort,
    EktSender,
    EktUnwrapFailed,
    ExpiredEktKey,
    FullEktField,
    LearnedKey,
    MalformedEktField,
    MalformedEktKeyMessage,
    UnknownEktCipher,
    UnknownEktType,
    UnknownSpi,
    decode_ekt_key,
    ekt_field_length,
    encode_ekt_key,
)
from perc_daemons.protocol.errors import ProtocolError

SSRC = 0x11223344
OTHER_SSRC = 0x55667788
T0 = 1000.0
SALT = bytes(range(0xA0, 0xA0 + 14))  # longer than 12: only the first 12 are used


def make_params(
    spi: int = 7,
    key_byte: int = 0x42,
    cipher: EktCipher = EktCipher.AESKW_128,
    ttl: int = 3600,
    salt: bytes = SALT,
) -> EktParameterSet:
    return EktParameterSet(
        key=bytes([key_byte]) * cipher.key_length,
        cipher=cipher,
        master_salt=salt,
        spi=spi,
        ttl=ttl,
    )


def counting_random() -> Callable[[int], bytes]:
    """Deterministic 'random' keys: 01 01 ..., 02 02 ..., and so on."""
    counter = itertools.count(1)

    def draw(n: int) -> bytes:
        return bytes([next(counter) & 0xFF]) * n

    return draw


def rtp_packet(field: bytes, payload: bytes = b"p" * 20) -> bytes:
    return b"\x80\x60" + bytes(10) + payload + field


class KeyWrapVectorTests(unittest.TestCase):
    """RFC 5649 §6 vectors pin the AES-KWP primitive (RFC 8870 §4.4.1)."""

    KEK = bytes.fromhex("5840df6e29b02af1ab493b705bf16ea1ae8338f4dcc176a8")

    def test_20_octet_key(self) -> None:
        key = bytes.fromhex("c37b7e6492584340bed12207808941155068f738")
        wrapped = bytes.fromhex("138bdeaa9b8fa7fc61f97742e72248ee5ae6ae5360d1ae6a5f54f373fa543b6a")
        self.assertEqual(aes_key_wrap_with_padding(self.KEK, key), wrapped)
        self.assertEqual(aes_key_unwrap_with_padding(self.KEK, wrapped), key)

    def test_7_octet_key(self) -> None:
        key = bytes.fromhex("466f7250617369")
        wrapped = bytes.fromhex("afbeb0f07dfbf5419200f2ccb50bb24f")
        self.assertEqual(aes_key_wrap_with_padding(self.KEK, key), wrapped)
        self.assertEqual(aes_key_unwrap_with_padding(self.KEK, wrapped), key)


class LengthTests(unittest.TestCase):
    """DIGEST 2.2: sizes for the DOUBLE profiles' inner half keys."""

    def check(self, cipher: EktCipher, key_length: int, sizes: tuple[int, int, int]) -> None:
        params = make_params(cipher=cipher)
        plaintext = EktPlaintext(b"\x01" * key_length, SSRC, 5)
        ciphertext = params.wrap(plaintext)
        field = FullEktField(ciphertext, params.spi, 0).encode()
        self.assertEqual((len(plaintext.encode()), len(ciphertext), len(field)), sizes)
        self.assertEqual(field[-3:-1], sizes[2].to_bytes(2, "big"))
        self.assertEqual(field[-1], FULL_EKT_TYPE)

    def test_double_128(self) -> None:
        self.check(EktCipher.AESKW_128, 16, (25, 40, 47))
        field = FullEktField(bytes(40), 1, 0).encode()
        self.assertEqual(field[-3:-1], b"\x00\x2f")

    def test_double_256(self) -> None:
        self.check(EktCipher.AESKW_256, 32, (41, 56, 63))


class EktCipherTests(unittest.TestCase):
    def test_values(self) -> None:
        self.assertEqual(int(EktCipher.AESKW_128), 1)
        self.assertEqual(int(EktCipher.AESKW_256), 2)
        self.assertEqual(EktCipher.AESKW_128.key_length, 16)
        self.assertEqual(EktCipher.AESKW_256.key_length, 32)

    def test_from_wire(self) -> None:
        self.assertIs(EktCipher.from_wire(1), EktCipher.AESKW_128)
        self.assertIs(EktCipher.from_wire(2), EktCipher.AESKW_256)
        for value in (0, 3, 255):
            self.assertRaises(UnknownEktCipher, EktCipher.from_wire, value)


class FullEktFieldTests(unittest.TestCase):
    def test_round_trip(self) -> None:
        field = FullEktField(b"\xaa" * 40, 0x1234, 0x0506)
        wire = field.encode()
        self.assertEqual(wire, b"\xaa" * 40 + bytes.fromhex("1234 0506 002f 02"))
        self.assertEqual(FullEktField.decode(wire), field)
        self.assertEqual(FullEktField.decode(memoryview(wire)), field)

    def test_extremes(self) -> None:
        for size in (1, 251):
            field = FullEktField(b"\x01" * size, 0xFFFF, 0xFFFF)
            self.assertEqual(len(field.encode()), size + 7)
            self.assertEqual(FullEktField.decode(field.encode()), field)

    def test_constructor_rejects(self) -> None:
        self.assertRaises(ValueError, FullEktField, b"", 0, 0)
        self.assertRaises(ValueError, FullEktField, b"x" * 252, 0, 0)
        self.assertRaises(ValueError, FullEktField, b"x", 0x10000, 0)
        self.assertRaises(ValueError, FullEktField, b"x", 0, -1)

    def test_decode_rejects(self) -> None:
        wire = FullEktField(b"\xaa" * 40, 1, 2).encode()
        self.assertRaises(MalformedEktField, FullEktField.decode, b"")
        self.assertRaises(MalformedEktField, FullEktField.decode, wire[1:])  # Length 47, 46 bytes
        self.assertRaises(MalformedEktField, FullEktField.decode, b"\x00" + wire)
        self.assertRaises(
            MalformedEktField, FullEktField.decode, bytes.fromhex("0001 0002 0007 02")
        )
        self.assertRaises(UnknownEktType, FullEktField.decode, wire[:-1] + b"\x01")
        self.assertRaises(UnknownEktType, FullEktField.decode, wire[:-1] + b"\x00")
        self.assertRaises(
            MalformedEktField, FullEktField.decode, b"\x01" * 252 + b"\x00\x00\x01\x03\x02"
        )


class EktPlaintextTests(unittest.TestCase):
    def test_round_trip(self) -> None:
        plaintext = EktPlaintext(b"\x01\x02" * 8, 0xDEADBEEF, 0x00010002)
        wire = plaintext.encode()
        self.assertEqual(wire, b"\x10" + b"\x01\x02" * 8 + bytes.fromhex("deadbeef 00010002"))
        self.assertEqual(EktPlaintext.decode(wire), plaintext)

    def test_decode_rejects(self) -> None:
        wire = EktPlaintext(b"k" * 16, 1, 2).encode()
        self.assertRaises(BadEktPlaintext, EktPlaintext.decode, wire[:-1])
        self.assertRaises(BadEktPlaintext, EktPlaintext.decode, wire + b"\x00")
        self.assertRaises(BadEktPlaintext, EktPlaintext.decode, b"\x00" + bytes(8))
        self.assertRaises(BadEktPlaintext, EktPlaintext.decode, b"\xf3" + bytes(243 + 8))
        self.assertRaises(BadEktPlaintext, EktPlaintext.decode, b"")

    def test_repr_hides_key(self) -> None:
        text = repr(EktPlaintext(b"\xab" * 16, 1, 2))
        self.assertNotIn("ab", text.replace("EktPlaintext", ""))
        self.assertIn("key_length=16", text)


class EktFieldLengthTests(unittest.TestCase):
    def test_short(self) -> None:
        self.assertEqual(ekt_field_length(rtp_packet(SHORT_EKT_FIELD)), 1)
        self.assertEqual(ekt_field_length(b"\x00"), 1)

    def test_full(self) -> None:
        field = FullEktField(b"\xcc" * 40, 3, 0).encode()
        packet = rtp_packet(field)
        self.assertEqual(ekt_field_length(packet), 47)
        self.assertEqual(ekt_field_length(bytearray(packet)), 47)
        self.assertEqual(ekt_field_length(memoryview(packet)), 47)
        # The field may directly follow a bare 12-byte RTP header.
        self.assertEqual(ekt_field_length(bytes(12) + field), 47)

    def test_extension(self) -> None:
        self.assertEqual(ekt_field_length(rtp_packet(b"\x09\x00\x04\x03")), 4)
        self.assertEqual(ekt_field_length(rtp_packet(b"x" * 10 + b"\x00\x0d\xfe")), 13)
        self.assertRaises(MalformedEktField, ekt_field_length, rtp_packet(b"\x00\x03\x03"))

    def test_legacy_and_reserved_types(self) -> None:
        self.assertRaises(UnknownEktType, ekt_field_length, rtp_packet(b"\x00\x08\x01"))
        self.assertRaises(UnknownEktType, ekt_field_length, rtp_packet(b"\x00\x08\xff"))
        self.assertRaises(UnknownEktType, ekt_field_length, b"\x01")

    def test_too_short(self) -> None:
        self.assertRaises(MalformedEktField, ekt_field_length, b"")
        self.assertRaises(MalformedEktField, ekt_field_length, b"\x02")
        self.assertRaises(MalformedEktField, ekt_field_length, b"\x00\x02")
        # Full Length below 8 (no room for any ciphertext).
        self.assertRaises(MalformedEktField, ekt_field_length, rtp_packet(b"\x00\x07\x02"))

    def test_overlong_length(self) -> None:
        field = FullEktField(b"\xcc" * 40, 3, 0).encode()
        # Exactly 11 bytes before the field: no room for an RTP header.
        self.assertRaises(MalformedEktField, ekt_field_length, bytes(11) + field)
        self.assertRaises(MalformedEktField, ekt_field_length, rtp_packet(b"\xff\xff\x02"))
        # Full above 258 bytes is impossible even if the packet is big enough.
        self.assertRaises(MalformedEktField, ekt_field_length, bytes(400) + b"\x01\x03\x02")


class EktParameterSetTests(unittest.TestCase):
    def test_wrap_unwrap(self) -> None:
        params = make_params()
        plaintext = EktPlaintext(b"\x33" * 16, SSRC, 9)
        ciphertext = params.wrap(plaintext)
        self.assertEqual(len(ciphertext), 40)
        self.assertEqual(params.unwrap(ciphertext), plaintext)
        self.assertRaises(EktUnwrapFailed, make_params(key_byte=0x43).unwrap, ciphertext)
        self.assertRaises(EktUnwrapFailed, params.unwrap, ciphertext[:-1])
        self.assertRaises(EktUnwrapFailed, params.unwrap, b"")

    def test_unwrap_bad_plaintext(self) -> None:
        params = make_params()
        ciphertext = aes_key_wrap_with_padding(params.key, b"\x05abc")
        self.assertRaises(BadEktPlaintext, params.unwrap, ciphertext)

    def test_wrap_too_long(self) -> None:
        params = make_params()
        self.assertEqual(len(params.wrap(EktPlaintext(b"k" * 231, 1, 1))), 248)
        self.assertRaises(ValueError, params.wrap, EktPlaintext(b"k" * 232, 1, 1))

    def test_validation(self) -> None:
        self.assertRaises(ValueError, EktParameterSet, b"k" * 16, 0, SALT, 1, 1)
        self.assertRaises(ValueError, EktParameterSet, b"k" * 16, 3, SALT, 1, 1)
        self.assertRaises(ValueError, EktParameterSet, b"k" * 32, EktCipher.AESKW_128, SALT, 1, 1)
        self.assertRaises(ValueError, make_params, salt=b"")
        self.assertRaises(ValueError, make_params, salt=b"s" * 257)
        self.assertRaises(ValueError, make_params, spi=0x10000)
        self.assertRaises(ValueError, make_params, ttl=1 << 24)
        self.assertEqual(make_params(ttl=(1 << 24) - 1).ttl, 0xFFFFFF)

    def test_repr_hides_key_and_salt(self) -> None:
        params = make_params(spi=12, key_byte=0xAB, ttl=60, salt=b"\xcd" * 12)
        text = repr(params)
        self.assertEqual(text, "EktParameterSet(spi=12, cipher=AESKW_128, ttl=60)")


class EktKeyMessageTests(unittest.TestCase):
    def test_round_trip_128(self) -> None:
        params = make_params(spi=0x0102, key_byte=0x11, ttl=0x030405, salt=b"\x22" * 12)
        body = encode_ekt_key(params)
        self.assertEqual(
            body,
            b"\x00\x10" + b"\x11" * 16 + b"\x00\x0c" + b"\x22" * 12 + b"\x01\x02\x03\x04\x05",
        )
        self.assertEqual(decode_ekt_key(body, EktCipher.AESKW_128), params)

    def test_round_trip_256(self) -> None:
        params = make_params(cipher=EktCipher.AESKW_256, salt=b"s" * 256, ttl=0)
        body = encode_ekt_key(params)
        self.assertEqual(len(body), 2 + 32 + 2 + 256 + 5)
        self.assertEqual(decode_ekt_key(memoryview(body), EktCipher.AESKW_256), params)

    def test_truncated(self) -> None:
        body = encode_ekt_key(make_params())
        for cut in range(len(body)):
            self.assertRaises(
                MalformedEktKeyMessage, decode_ekt_key, body[:cut], EktCipher.AESKW_128
            )

    def test_trailing_bytes(self) -> None:
        body = encode_ekt_key(make_params())
        self.assertRaises(
            MalformedEktKeyMessage, decode_ekt_key, body + b"\x00", EktCipher.AESKW_128
        )

    def test_wrong_key_length(self) -> None:
        body = encode_ekt_key(make_params(cipher=EktCipher.AESKW_256))
        with self.assertRaises(EktKeyWrongLength) as caught:
            decode_ekt_key(body, EktCipher.AESKW_128)
        self.assertIsInstance(caught.exception, MalformedEktKeyMessage)
        body = encode_ekt_key(make_params())
        self.assertRaises(EktKeyWrongLength, decode_ekt_key, body, EktCipher.AESKW_256)

    def test_zero_and_oversized_vectors(self) -> None:
        tail = b"\x00\x0c" + b"s" * 12 + b"\x00\x01\x00\x00\x3c"
        self.assertRaises(
            MalformedEktKeyMessage, decode_ekt_key, b"\x00\x00" + tail, EktCipher.AESKW_128
        )
        big = b"\x01\x01" + b"k" * 257 + tail
        self.assertRaises(MalformedEktKeyMessage, decode_ekt_key, big, EktCipher.AESKW_128)
        no_salt = b"\x00\x10" + b"k" * 16 + b"\x00\x00" + b"\x00\x01\x00\x00\x3c"
        self.assertRaises(MalformedEktKeyMessage, decode_ekt_key, no_salt, EktCipher.AESKW_128)


class ErrorReasonTests(unittest.TestCase):
    def test_every_error_has_its_own_reason(self) -> None:
        classes = [
            value
            for value in vars(ekt).values()
            if isinstance(value, type) and issubclass(value, EktError)
        ]
        self.assertGreaterEqual(len(classes), 14)
        reasons = [cls.reason for cls in classes]
        self.assertEqual(len(set(reasons)), len(reasons))
        self.assertNotIn(ProtocolError.reason, reasons)
        for cls in classes:
            self.assertTrue(issubclass(cls, ProtocolError))


def unwrap_field(params: EktParameterSet, field: bytes) -> tuple[FullEktField, EktPlaintext]:
    parsed = FullEktField.decode(field)
    return parsed, params.unwrap(parsed.ciphertext)


class EktSenderTests(unittest.TestCase):
    def make(self, params: EktParameterSet | None = None, **kwargs: object) -> EktSender:
        return EktSender(
            SSRC, 16, params or make_params(), T0, random_bytes=counting_random(), **kwargs
        )

    def test_first_key_used_at_once(self) -> None:
        sender = self.make()
        self.assertEqual(sender.current_key, b"\x01" * 16)
        self.assertEqual((sender.spi, sender.epoch), (7, 0))
        self.assertEqual(sender.master_salt, SALT[:12])
        key, field = sender.next_packet(T0, roc=0)
        self.assertEqual(key, b"\x01" * 16)
        parsed, plaintext = unwrap_field(make_params(), field)
        self.assertEqual((parsed.spi, parsed.epoch), (7, 0))
        self.assertEqual(plaintext, EktPlaintext(b"\x01" * 16, SSRC, 0))

    def test_schedule(self) -> None:
        sender = self.make()
        kinds = []
        schedule = [
            # (time offset, keyframe, expected tag)
            (0.00, False, "F"),  # 3 Full tags after a new key
            (0.02, False, "F"),
            (0.04, False, "F"),
            (0.06, False, "S"),
            (0.10, False, "S"),  # 0.06 since the last Full
            (0.15, False, "F"),  # 0.11 >= 0.1
            (0.16, False, "S"),
            (0.17, True, "F"),  # keyframe
            (0.18, False, "S"),
            (0.275, False, "F"),  # 0.105 after the keyframe
            (0.28, False, "S"),
        ]
        for offset, keyframe, _ in schedule:
            _, field = sender.next_packet(T0 + offset, roc=0, keyframe=keyframe)
            kinds.append("F" if field[-1] == FULL_EKT_TYPE else "S")
            if field[-1] != FULL_EKT_TYPE:
                self.assertEqual(field, SHORT_EKT_FIELD)
        self.assertEqual(kinds, [expected for _, _, expected in schedule])

    def test_ciphertext_cached_per_roc(self) -> None:
        sender = self.make()
        _, first = sender.next_packet(T0, roc=3)
        _, second = sender.next_packet(T0 + 0.01, roc=3)
        _, third = sender.next_packet(T0 + 0.02, roc=4)
        self.assertIs(first, second)
        self.assertNotEqual(second, third)
        self.assertEqual(unwrap_field(make_params(), third)[1].roc, 4)

    def test_rekey_holds_old_key(self) -> None:
        sender = self.make()
        old_key = sender.current_key
        for i in range(5):
            sender.next_packet(T0 + i * 0.02, roc=0)
        new_params = make_params(spi=8, key_byte=0x99)
        sender.rekey(new_params, T0 + 1.0)
        self.assertEqual((sender.spi, sender.epoch), (8, 0))
        new_key = sender.current_key
        self.assertEqual(new_key, b"\x02" * 16)
        self.assertNotEqual(new_key, old_key)

        key, field = sender.next_packet(T0 + 1.01, roc=0)  # new key announced here
        self.assertEqual(key, old_key)
        parsed, plaintext = unwrap_field(new_params, field)
        self.assertEqual((parsed.spi, parsed.epoch, plaintext.master_key), (8, 0, new_key))
        key, field = sender.next_packet(T0 + 1.25, roc=0)
        self.assertEqual((key, field[-1]), (old_key, FULL_EKT_TYPE))
        key, field = sender.next_packet(T0 + 1.259, roc=0)
        self.assertEqual((key, field[-1]), (old_key, FULL_EKT_TYPE))
        key, field = sender.next_packet(T0 + 1.261, roc=0)
        self.assertEqual((key, field), (new_key, SHORT_EKT_FIELD))

    def test_sending_spi_is_the_old_ektkeys_until_the_hold_ends(self) -> None:
        sender = self.make()
        first_spi = sender.spi
        sender.next_packet(T0, roc=0)
        sender.rekey(make_params(spi=8, key_byte=0x99), T0 + 1.0)
        self.assertEqual(sender.sending_spi, first_spi)  # nothing sent under 8 yet
        sender.next_packet(T0 + 1.01, roc=0)  # announced: the hold runs to 1.26
        self.assertEqual(sender.sending_spi, first_spi)
        sender.next_packet(T0 + 1.259, roc=0)
        self.assertEqual(sender.sending_spi, first_spi)
        sender.next_packet(T0 + 1.261, roc=0)
        self.assertEqual(sender.sending_spi, 8)

    def test_old_key_buffer_is_wiped(self) -> None:
        sender = self.make()
        sender.next_packet(T0, roc=0)
        buffer = sender._key
        self.assertEqual(bytes(buffer), b"\x01" * 16)
        sender.new_master_key(T0 + 1)
        sender.next_packet(T0 + 1, roc=0)
        self.assertEqual(bytes(buffer), b"\x01" * 16)  # still in use during the hold
        sender.next_packet(T0 + 1.3, roc=0)
        self.assertEqual(bytes(buffer), bytes(16))

    def test_rekey_before_any_packet_has_no_hold(self) -> None:
        sender = self.make()
        sender.rekey(make_params(spi=9), T0 + 0.5)
        key, _ = sender.next_packet(T0 + 0.5, roc=0)
        self.assertEqual(key, b"\x02" * 16)

    def test_double_rekey_during_hold(self) -> None:
        sender = self.make()
        sender.next_packet(T0, roc=0)  # key 01 in use
        sender.rekey(make_params(spi=8), T0 + 1.0)
        key, _ = sender.next_packet(T0 + 1.0, roc=0)  # key 02 announced, 01 used
        self.assertEqual(key, b"\x01" * 16)
        sender.rekey(make_params(spi=9), T0 + 1.1)
        key, field = sender.next_packet(T0 + 1.1, roc=0)  # key 03 announced
        self.assertEqual(key, b"\x01" * 16)
        self.assertEqual(unwrap_field(make_params(spi=9), field)[1].master_key, b"\x03" * 16)
        key, _ = sender.next_packet(T0 + 1.2, roc=0)
        self.assertEqual(key, b"\x01" * 16)
        # The hold counts from the first announcement (1.0), not the last: epochs
        # faster than the hold must not keep media on key 01, which a departed
        # member knows.
        key, _ = sender.next_packet(T0 + 1.26, roc=0)
        self.assertEqual(key, b"\x03" * 16)

    def test_epochs_faster_than_the_hold_do_not_starve_the_switch(self) -> None:
        sender = self.make()
        sender.next_packet(T0, roc=0)  # key 01 in use
        used = []
        for n in range(10):  # an epoch every 50 ms for half a second
            now = T0 + 1.0 + 0.05 * n
            sender.rekey(make_params(spi=8 + n), now)
            used.append(sender.next_packet(now, roc=0)[0])
        self.assertEqual(used[:5], [b"\x01" * 16] * 5)  # 1.0 .. 1.2: the hold
        self.assertNotIn(b"\x01" * 16, used[6:])  # from 1.3 on: never the old key

    def test_new_master_key(self) -> None:
        sender = self.make()
        sender.next_packet(T0, roc=0)
        sender.new_master_key(T0 + 5)
        self.assertEqual((sender.spi, sender.epoch), (7, 1))
        key, field = sender.next_packet(T0 + 5, roc=2)
        self.assertEqual(key, b"\x01" * 16)
        parsed, plaintext = unwrap_field(make_params(), field)
        self.assertEqual((parsed.epoch, plaintext.master_key, plaintext.roc), (1, b"\x02" * 16, 2))
        kinds = [sender.next_packet(T0 + 5 + d, roc=2)[1][-1] for d in (0.01, 0.02, 0.03)]
        self.assertEqual(kinds, [FULL_EKT_TYPE, FULL_EKT_TYPE, 0])
        self.assertEqual(sender.next_packet(T0 + 5.3, roc=2)[0], b"\x02" * 16)
        sender.rekey(make_params(spi=8), T0 + 6)
        self.assertEqual(sender.epoch, 0)

    def test_epoch_exhausted(self) -> None:
        sender = self.make()
        sender._epoch = 0xFFFF
        self.assertRaises(EktEpochExhausted, sender.new_master_key, T0)
        self.assertEqual(sender.epoch, 0xFFFF)

    def test_ttl_expiry(self) -> None:
        sender = self.make(make_params(ttl=10))
        self.assertEqual(sender.expires_at, T0 + 10)
        sender.next_packet(T0 + 9.99, roc=0)
        self.assertRaises(ExpiredEktKey, sender.next_packet, T0 + 10, 0)
        sender.rekey(make_params(spi=8, ttl=10), T0 + 10)
        _, field = sender.next_packet(T0 + 10, roc=0)
        self.assertEqual(FullEktField.decode(field).spi, 8)
        self.assertRaises(ExpiredEktKey, sender.next_packet, T0 + 20.5, 0)

    def test_rekey_same_spi(self) -> None:
        params = make_params()
        sender = self.make(params)
        sender.rekey(params, T0 + 1)  # the same EKTKey again: nothing happens
        self.assertEqual((sender.current_key, sender.epoch), (b"\x01" * 16, 0))
        self.assertRaises(ValueError, sender.rekey, make_params(key_byte=1), T0 + 1)

    def test_constructor_checks(self) -> None:
        params = make_params()
        self.assertRaises(ValueError, EktSender, SSRC, 20, params, T0)
        self.assertRaises(ValueError, EktSender, 1 << 32, 16, params, T0)
        self.assertRaises(ValueError, EktSender, SSRC, 16, params, T0, full_repeats=0)
        self.assertRaises(EktSaltTooShort, EktSender, SSRC, 16, make_params(salt=b"s" * 11), T0)
        self.assertRaises(EktCipherTooWeak, EktSender, SSRC, 32, params, T0)
        sender = EktSender(SSRC, 32, make_params(cipher=EktCipher.AESKW_256), T0)
        self.assertEqual(len(sender.current_key), 32)

    def test_repr_hides_key(self) -> None:
        sender = self.make()
        self.assertEqual(repr(sender), "EktSender(ssrc=0x11223344, spi=7, epoch=0)")


class EktReceiverTests(unittest.TestCase):
    def setUp(self) -> None:
        self.params = make_params()
        self.receiver = EktReceiver(16)
        self.receiver.add_parameter_set(self.params, T0)

    def field(
        self,
        key: bytes = b"\x05" * 16,
        ssrc: int = SSRC,
        roc: int = 0,
        epoch: int = 0,
        params: EktParameterSet | None = None,
    ) -> bytes:
        params = params or self.params
        ciphertext = params.wrap(EktPlaintext(key, ssrc, roc))
        return FullEktField(ciphertext, params.spi, epoch).encode()

    def test_learns_key(self) -> None:
        learned = self.receiver.process(SSRC, self.field(roc=3), T0 + 1)
        self.assertEqual(
            learned,
            LearnedKey(
                ssrc=SSRC, master_key=b"\x05" * 16, roc=3, master_salt=SALT[:12], spi=7, epoch=0
            ),
        )
        self.assertEqual(repr(learned), "LearnedKey(ssrc=0x11223344, roc=3, spi=7, epoch=0)")
        self.assertEqual(sum(self.receiver.rejected.values()), 0)

    def test_short(self) -> None:
        self.assertIsNone(self.receiver.process(SSRC, SHORT_EKT_FIELD, T0))
        self.assertRaises(MalformedEktField, self.receiver.process, SSRC, b"\x00\x00", T0)
        self.assertRaises(MalformedEktField, self.receiver.process, SSRC, b"", T0)

    def test_repeat_not_counted(self) -> None:
        field = self.field()
        self.assertIsNotNone(self.receiver.process(SSRC, field, T0))
        self.assertIsNone(self.receiver.process(SSRC, field, T0 + 0.1))
        self.assertIsNone(self.receiver.process(SSRC, memoryview(field), T0 + 0.2))
        # Same key and epoch, the sender's ROC moved on: still a repeat.
        self.assertIsNone(self.receiver.process(SSRC, self.field(roc=1), T0 + 0.3))
        self.assertEqual(sum(self.receiver.rejected.values()), 0)

    def test_repeat_fast_path_skips_unwrap(self) -> None:
        calls = []
        real_unwrap = EktParameterSet.unwrap

        def counting_unwrap(params: EktParameterSet, ciphertext: bytes) -> EktPlaintext:
            calls.append(ciphertext)
            return real_unwrap(params, ciphertext)

        self.patch(EktParameterSet, "unwrap", counting_unwrap)
        field = self.field()
        self.receiver.process(SSRC, field, T0)
        self.receiver.process(SSRC, field, T0)
        self.receiver.process(SSRC, field, T0)
        self.assertEqual(len(calls), 1)

    def test_wrong_ekt_key(self) -> None:
        other = make_params(key_byte=0x43)  # same SPI, different EKTKey
        self.assertRaises(
            EktUnwrapFailed, self.receiver.process, SSRC, self.field(params=other), T0
        )
        self.assertEqual(self.receiver.rejected, {"ekt_unwrap_failed": 1})

    def test_truncated_field(self) -> None:
        field = self.field()
        self.assertRaises(MalformedEktField, self.receiver.process, SSRC, field[1:], T0)
        self.assertRaises(MalformedEktField, self.receiver.process, SSRC, field[-5:], T0)
        self.assertEqual(self.receiver.rejected, {"ekt_malformed_field": 2})

    def test_wrong_type_byte(self) -> None:
        field = self.field()
        for type_byte in (b"\x01", b"\x03", b"\xff"):
            self.assertRaises(
                UnknownEktType, self.receiver.process, SSRC, field[:-1] + type_byte, T0
            )
        self.assertEqual(self.receiver.rejected, {"ekt_unknown_type": 3})

    def test_wrong_ssrc(self) -> None:
        self.assertIsNone(self.receiver.process(OTHER_SSRC, self.field(), T0))
        self.assertEqual(self.receiver.rejected, {REJECT_SSRC_MISMATCH: 1})
        # Nothing was learned for either SSRC.
        self.assertIsNotNone(self.receiver.process(SSRC, self.field(), T0))

    def test_unknown_spi(self) -> None:
        field = self.field(params=make_params(spi=99))
        self.assertRaises(UnknownSpi, self.receiver.process, SSRC, field, T0)
        self.assertEqual(self.receiver.rejected, {"ekt_unknown_spi": 1})

    def test_stale_epoch(self) -> None:
        self.assertIsNotNone(self.receiver.process(SSRC, self.field(epoch=3), T0))
        # Same epoch, different key: a rollback attempt.
        self.assertIsNone(self.receiver.process(SSRC, self.field(b"\x06" * 16, epoch=3), T0))
        # Lower epoch.
        self.assertIsNone(self.receiver.process(SSRC, self.field(b"\x07" * 16, epoch=2), T0))
        self.assertEqual(self.receiver.rejected, {REJECT_STALE_EPOCH: 2})
        learned = self.receiver.process(SSRC, self.field(b"\x08" * 16, epoch=4), T0)
        self.assertEqual((learned.master_key, learned.epoch), (b"\x08" * 16, 4))

    def test_epochs_are_per_spi(self) -> None:
        second = make_params(spi=8, key_byte=0x77)
        self.receiver.add_parameter_set(second, T0)
        self.assertIsNotNone(self.receiver.process(SSRC, self.field(epoch=5), T0))
        learned = self.receiver.process(SSRC, self.field(b"\x09" * 16, params=second), T0)
        self.assertEqual((learned.spi, learned.epoch, learned.master_key), (8, 0, b"\x09" * 16))

    def test_key_length_mismatch(self) -> None:
        field = self.field(key=b"\x05" * 32)
        self.assertRaises(EktKeyLengthMismatch, self.receiver.process, SSRC, field, T0)
        self.assertEqual(self.receiver.rejected, {"ekt_key_length_mismatch": 1})

    def test_bad_plaintext(self) -> None:
        ciphertext = aes_key_wrap_with_padding(self.params.key, b"\x10" + b"k" * 16 + b"ssrc")
        field = FullEktField(ciphertext, self.params.spi, 0).encode()
        self.assertRaises(BadEktPlaintext, self.receiver.process, SSRC, field, T0)

    def test_expiry(self) -> None:
        receiver = EktReceiver(16)
        receiver.add_parameter_set(make_params(ttl=5), T0)
        field = self.field()
        self.assertIsNotNone(receiver.process(SSRC, field, T0 + 4))
        # The fast path must not let an expired EKTKey through.
        self.assertRaises(ExpiredEktKey, receiver.process, SSRC, field, T0 + 5)
        self.assertEqual(receiver.rejected, {"ekt_key_expired": 1})
        self.assertEqual(receiver.purge_expired(T0 + 5), [7])
        self.assertRaises(UnknownSpi, receiver.process, SSRC, field, T0 + 5)

    def test_remove_parameter_set(self) -> None:
        field = self.field()
        self.assertIsNotNone(self.receiver.process(SSRC, field, T0))
        self.assertTrue(self.receiver.remove_parameter_set(7))
        self.assertFalse(self.receiver.remove_parameter_set(7))
        self.assertEqual(self.receiver.spis, frozenset())
        self.assertRaises(UnknownSpi, self.receiver.process, SSRC, field, T0)
        # Re-added: the state was forgotten, so the key is learned again.
        self.receiver.add_parameter_set(self.params, T0)
        self.assertIsNotNone(self.receiver.process(SSRC, field, T0))

    def test_replacing_a_set_forgets_its_state(self) -> None:
        self.assertIsNotNone(self.receiver.process(SSRC, self.field(epoch=4), T0))
        replacement = make_params(key_byte=0x55)
        self.receiver.add_parameter_set(replacement, T0 + 1)
        learned = self.receiver.process(SSRC, self.field(params=replacement), T0 + 1)
        self.assertEqual(learned.epoch, 0)

    def test_forget_ssrc(self) -> None:
        field = self.field(epoch=2)
        self.assertIsNotNone(self.receiver.process(SSRC, field, T0))
        self.receiver.forget_ssrc(SSRC)
        self.assertIsNotNone(self.receiver.process(SSRC, field, T0))

    def test_add_parameter_set_checks(self) -> None:
        self.assertRaises(
            EktSaltTooShort, self.receiver.add_parameter_set, make_params(salt=b"s" * 11), T0
        )
        receiver = EktReceiver(32)
        self.assertRaises(EktCipherTooWeak, receiver.add_parameter_set, make_params(), T0)
        self.assertRaises(ValueError, EktReceiver, 24)


class EndToEndTests(unittest.TestCase):
    def test_sender_to_receiver_across_rekey(self) -> None:
        params1 = make_params(spi=1, key_byte=0x01, cipher=EktCipher.AESKW_256)
        params2 = make_params(spi=2, key_byte=0x02, cipher=EktCipher.AESKW_256)
        sender = EktSender(SSRC, 32, params1, T0)
        receiver = EktReceiver(32)
        # The EKTKeys travel in ekt_key messages.
        receiver.add_parameter_set(decode_ekt_key(encode_ekt_key(params1), params1.cipher), T0)

        # Receiver's view: the keys it can decrypt with, by SPI/epoch.
        known: list[bytes] = []
        t = T0
        roc = 0
        learned_count = 0
        for _ in range(20):
            key, field = sender.next_packet(t, roc)
            packet = rtp_packet(field)
            tail = packet[-ekt_field_length(packet) :]
            learned = receiver.process(SSRC, memoryview(tail), t)
            if learned is not None:
                learned_count += 1
                known.append(learned.master_key)
            self.assertIn(key, known)
            t += 0.02
        self.assertEqual(learned_count, 1)
        self.assertEqual(known, [sender.current_key])

        receiver.add_parameter_set(decode_ekt_key(encode_ekt_key(params2), params2.cipher), t)
        first_key = sender.current_key
        sender.rekey(params2, t)
        roc = 1
        used = []
        for _ in range(30):
            key, field = sender.next_packet(t, roc)
            learned = receiver.process(SSRC, field, t)
            if learned is not None:
                self.assertEqual((learned.spi, learned.epoch, learned.roc), (2, 0, 1))
                known.append(learned.master_key)
            self.assertIn(key, known)
            used.append(key)
            t += 0.02
        self.assertEqual(known, [first_key, sender.current_key])
        self.assertNotEqual(first_key, sender.current_key)
        # 250 ms at 20 ms spacing: 13 packets on the old key, then the new one.
        self.assertEqual(used.count(first_key), 13)
        self.assertEqual(used[13:], [sender.current_key] * 17)

        sender.new_master_key(t)
        for _ in range(3):
            key, field = sender.next_packet(t, roc)
            learned = receiver.process(SSRC, field, t)
            if learned is not None:
                self.assertEqual((learned.spi, learned.epoch), (2, 1))
                known.append(learned.master_key)
            t += 0.02
        self.assertEqual(known[-1], sender.current_key)
        self.assertEqual(len(known), 3)
        self.assertEqual(sum(receiver.rejected.values()), 0)


PROPERTY = settings(max_examples=300, deadline=None)


def full_fields(spis: st.SearchStrategy[int]) -> st.SearchStrategy[bytes]:
    return st.builds(
        lambda ct, spi, epoch: FullEktField(ct, spi, epoch).encode(),
        st.binary(min_size=1, max_size=251),
        spis,
        st.integers(0, 0xFFFF),
    )


class PropertyTests(unittest.TestCase):
    @PROPERTY
    @given(st.binary(max_size=300))
    def test_ekt_field_length(self, packet: bytes) -> None:
        try:
            length = ekt_field_length(packet)
        except EktError:
            return
        self.assertGreaterEqual(length, 1)
        self.assertLessEqual(length, len(packet))
        if length > 1:
            self.assertEqual(int.from_bytes(packet[-3:-1], "big"), length)
            self.assertGreaterEqual(len(packet) - length, 12)

    @PROPERTY
    @given(st.one_of(st.binary(max_size=300), full_fields(st.integers(0, 0xFFFF))))
    def test_full_field_decode(self, data: bytes) -> None:
        try:
            field = FullEktField.decode(data)
        except EktError:
            return
        self.assertEqual(field.encode(), data)

    @PROPERTY
    @given(
        st.one_of(
            st.binary(max_size=300),
            st.builds(
                lambda key, ssrc, roc: EktPlaintext(key, ssrc, roc).encode(),
                st.binary(min_size=1, max_size=242),
                st.integers(0, 0xFFFFFFFF),
                st.integers(0, 0xFFFFFFFF),
            ),
        )
    )
    def test_plaintext_decode(self, data: bytes) -> None:
        try:
            plaintext = EktPlaintext.decode(data)
        except EktError:
            return
        self.assertEqual(plaintext.encode(), data)

    @PROPERTY
    @given(
        st.one_of(
            st.binary(max_size=600),
            st.builds(
                lambda cipher, salt, spi, ttl, key: encode_ekt_key(
                    EktParameterSet(key[: cipher.key_length], cipher, salt, spi, ttl)
                ),
                st.sampled_from(EktCipher),
                st.binary(min_size=1, max_size=256),
                st.integers(0, 0xFFFF),
                st.integers(0, (1 << 24) - 1),
                st.binary(min_size=32, max_size=32),
            ),
        ),
        st.sampled_from(EktCipher),
    )
    def test_decode_ekt_key(self, body: bytes, cipher: EktCipher) -> None:
        try:
            params = decode_ekt_key(body, cipher)
        except EktError:
            return
        self.assertEqual(params.cipher, cipher)
        self.assertEqual(encode_ekt_key(params), body)

    @PROPERTY
    @given(
        st.sampled_from([SSRC, OTHER_SSRC, 0]),
        st.one_of(
            st.binary(max_size=300),
            full_fields(st.sampled_from([7, 8, 9])),
            st.builds(
                lambda key, ssrc, roc, spi, epoch: FullEktField(
                    make_params(spi=spi).wrap(EktPlaintext(key, ssrc, roc)), spi, epoch
                ).encode(),
                st.one_of(st.binary(min_size=16, max_size=16), st.binary(min_size=1, max_size=231)),
                st.sampled_from([SSRC, OTHER_SSRC]),
                st.integers(0, 0xFFFFFFFF),
                st.sampled_from([7, 8, 9]),
                st.integers(0, 0xFFFF),
            ),
            st.builds(
                lambda payload, spi, epoch: FullEktField(
                    aes_key_wrap_with_padding(b"\x42" * 16, payload), spi, epoch
                ).encode(),
                st.binary(min_size=1, max_size=200),
                st.sampled_from([7, 8]),
                st.integers(0, 0xFFFF),
            ),
        ),
        st.floats(T0, T0 + 20),
    )
    def test_receiver_process(self, ssrc: int, field: bytes, now: float) -> None:
        receiver = EktReceiver(16)
        receiver.add_parameter_set(make_params(spi=7), T0)
        receiver.add_parameter_set(make_params(spi=8, ttl=10), T0)
        try:
            result = receiver.process(ssrc, field, now)
        except EktError as exc:
            self.assertIsInstance(exc, ProtocolError)
            self.assertEqual(receiver.rejected[exc.reason], 1)
            return
        if result is not None:
            self.assertEqual((result.ssrc, len(result.master_key)), (ssrc, 16))
            self.assertIsNone(receiver.process(ssrc, field, now))  # a repeat


class DeriveMasterSaltTests(unittest.TestCase):
    """derive_master_salt: HKDF-SHA256 as the contract spells it; every KD agrees."""

    def test_matches_hkdf_definition(self) -> None:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        key = bytes(range(32))
        expected = HKDF(algorithm=hashes.SHA256(), length=12, salt=None,
                        info=b"perc-daemons EKT master salt|conf-1|3").derive(key)
        self.assertEqual(ekt.derive_master_salt(key, "conf-1", 3), expected)
        self.assertEqual(len(ekt.derive_master_salt(key, "conf-1", 3, length=14)), 14)

    def test_depends_on_key_conference_and_epoch(self) -> None:
        key = b"k" * 16
        salts = {ekt.derive_master_salt(key, "conf-1", 1),
                 ekt.derive_master_salt(key, "conf-1", 2),
                 ekt.derive_master_salt(key, "conf-2", 1),
                 ekt.derive_master_salt(b"j" * 16, "conf-1", 1)}
        self.assertEqual(len(salts), 4)
        # conference "a|1" epoch 1 vs conference "a" epoch ... cannot collide: epoch is last.
        self.assertEqual(ekt.derive_master_salt(key, "conf-1", 1),
                         ekt.derive_master_salt(bytearray(key), "conf-1", 1))

    def test_bad_arguments(self) -> None:
        for args in ((b"", "c", 1), (b"k" * 16, "", 1), (b"k" * 16, "c", 0),
                     (b"k" * 16, "c", True)):
            self.assertRaises(ValueError, ekt.derive_master_salt, *args)
        self.assertRaises(ValueError, ekt.derive_master_salt, b"k" * 16, "c", 1, length=0)
