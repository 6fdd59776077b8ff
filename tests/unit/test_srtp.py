"""SRTP/SRTCP AEAD-GCM: RFC vectors and byte-for-byte agreement with libsrtp."""

from __future__ import annotations

import random
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from pylibsrtp import Error as LibSrtpError
from pylibsrtp import Policy, Session
from twisted.trial import unittest

from perc_daemons.protocol.errors import ProtocolError
from perc_daemons.protocol.srtp import (
    LABEL_RTP_ENCRYPTION,
    LABEL_RTP_SALT,
    AuthenticationFailed,
    ContextClosed,
    MalformedSrtp,
    ReplayError,
    SrtpContext,
    SrtpError,
    derive_key,
)


def h(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


# RFC 7714 section 16 common inputs (values copied from the RFC via DIGEST.md 8.1).
RTP_PACKET = h("8040f17b 8041f8d3 5501a0b2 47616c6c 69612065 7374206f 6d6e6973 20646976"
               "69736120 696e2070 61727465 73207472 6573")
SALT = h("51756964 2070726f 2071756f")
KEY_128 = bytes(range(16))
KEY_256 = bytes(range(32))
RTCP_PACKET = h("81c8000d 4d617273 4e545031 4e545032 52545020 0000042a 0000e930 4c756e61"
                "deadbeef deadbeef deadbeef deadbeef deadbeef")


def session_context(key: bytes) -> SrtpContext:
    return SrtpContext.from_session_keys(key, SALT, key, SALT)


class Rfc7714VectorTests(unittest.TestCase):
    """RFC 7714 sections 16 and 17 (session keys given directly, no KDF)."""

    def test_rtp_128_encrypt(self) -> None:
        expected = h("8040f17b 8041f8d3 5501a0b2 f24de3a3 fb34de6c acba861c 9d7e4bca be633bd5"
                     "0d294e6f 42a5f47a 51c7d19b 36de3adf 8833899d 7f27beb1 6a9152cf 765ee439"
                     "0cce")
        self.assertEqual(session_context(KEY_128).protect(RTP_PACKET), expected)
        self.assertEqual(session_context(KEY_128).unprotect(expected), RTP_PACKET)

    def test_rtp_256_encrypt(self) -> None:
        expected = h("8040f17b 8041f8d3 5501a0b2 32b1de78 a822fe12 ef9f78fa 332e33aa b1801238"
                     "9a58e2f3 b50b2a02 76ffae0f 1ba63799 b87b7aa3 db36dfff d6b0f9bb 7878d7a7"
                     "6c13")
        self.assertEqual(session_context(KEY_256).protect(RTP_PACKET), expected)
        self.assertEqual(session_context(KEY_256).unprotect(expected), RTP_PACKET)

    def test_rtcp_128_encrypt(self) -> None:
        expected = h("81c8000d 4d617273 63e94885 dcdab67c a727d766 2f6b7e99 7ff5c0f7 6c06f32d"
                     "c676a5f1 730d6fda 4ce09b46 86303ded 0bb9275b c84aa458 96cf4d2f c5abf872"
                     "45d9eade 800005d4")
        sender = session_context(KEY_128)
        # The vector uses SRTCP index 0x5d4: send 0x5d3 packets first (index starts at 1).
        for _ in range(0x5D3):
            sender.protect_rtcp(RTCP_PACKET)
        self.assertEqual(sender.protect_rtcp(RTCP_PACKET), expected)
        self.assertEqual(session_context(KEY_128).unprotect_rtcp(expected), RTCP_PACKET)

    def test_rtcp_256_decrypt(self) -> None:
        packet = h("81c8000d 4d617273 d50ae4d1 f5ce5d30 4ba297e4 7d470c28 2c3ece5d bffe0a50"
                   "a2eaa5c1 110555be 8415f658 c61de047 6f1b6fad 1d1eb30c 4446839f 57ff6f6c"
                   "b26ac3be 800005d4")
        self.assertEqual(session_context(KEY_256).unprotect_rtcp(packet), RTCP_PACKET)

    def test_rtcp_128_authentication_only(self) -> None:
        expected = RTCP_PACKET + h("841dd968 3dd78ec9 2ae58790 125f62b3 000005d4")
        sender = session_context(KEY_128)
        for _ in range(0x5D3):
            sender.protect_rtcp(RTCP_PACKET, encrypt=False)
        self.assertEqual(sender.protect_rtcp(RTCP_PACKET, encrypt=False), expected)
        self.assertEqual(session_context(KEY_128).unprotect_rtcp(expected), RTCP_PACKET)

    def test_rtcp_256_authentication_only(self) -> None:
        packet = RTCP_PACKET + h("91db4afb feee5a97 8fab4393 ed2615fe 000005d4")
        self.assertEqual(session_context(KEY_256).unprotect_rtcp(packet), RTCP_PACKET)
        tampered = bytearray(packet)
        tampered[20] ^= 1
        self.assertRaises(AuthenticationFailed, session_context(KEY_256).unprotect_rtcp,
                          bytes(tampered))


class KeyDerivationTests(unittest.TestCase):
    def test_rfc3711_b3(self) -> None:
        key = h("E1F97A0D3E018BE0D64FA32C06DE4139")
        salt = h("0EC675AD498AFEEBB6960B3AABE6")
        self.assertEqual(bytes(derive_key(key, salt, LABEL_RTP_ENCRYPTION, 16)),
                         h("C61E7A93744F39EE10734AFE3FF7A087"))
        self.assertEqual(bytes(derive_key(key, salt, LABEL_RTP_SALT, 14)),
                         h("30CBBC08863D8C85D49DB34A9AE1"))
        auth = h("CEBE321F6FF7716B6FD4AB49AF256A15 6D38BAA48F0A0ACF3C34E2359E6CDBCE"
                 "E049646C43D9327AD175578EF7227098 6371C10C9A369AC2F94A8C5FBCDDDC25"
                 "6D6E919A48B610EF17C2041E47403576 6B68642C59BBFC2F34DB60DBDFB2")
        self.assertEqual(bytes(derive_key(key, salt, 0x01, 94)), auth)

    def test_rfc6188_aes256_prf(self) -> None:
        key = h("f0f04914b513f2763a1b1fa130f10e29 98f6f6e43e4309d1e622a0e332b9f1b6")
        salt = h("3b04803de51ee7c96423ab5b78d2")
        self.assertEqual(bytes(derive_key(key, salt, LABEL_RTP_ENCRYPTION, 32)),
                         h("5ba1064e30ec51613cad926c5a28ef73 1ec7fb397f70a960653caf06554cd8c4"))
        self.assertEqual(bytes(derive_key(key, salt, LABEL_RTP_SALT, 14)),
                         h("fa31791685ca444a9e07c6c64e93"))
        self.assertEqual(bytes(derive_key(key, salt, 0x01, 20)),
                         h("fd9c32d39ed5fbb5a9dc96b30818454d1313dc05"))

    def test_gcm_salt_is_padded_with_zero_bits(self) -> None:
        """Erratum 4938: a 96-bit salt acts as the 112-bit salt with 16 zero bits."""
        key = bytes(range(16))
        self.assertEqual(derive_key(key, SALT, LABEL_RTP_ENCRYPTION, 16),
                         derive_key(key, SALT + b"\x00\x00", LABEL_RTP_ENCRYPTION, 16))
        self.assertNotEqual(derive_key(key, SALT, LABEL_RTP_ENCRYPTION, 16),
                            derive_key(key, SALT + b"\x00\x01", LABEL_RTP_ENCRYPTION, 16))


PROFILES = [(16, Policy.SRTP_PROFILE_AEAD_AES_128_GCM),
            (32, Policy.SRTP_PROFILE_AEAD_AES_256_GCM)]


def libsrtp(key: bytes, salt: bytes, profile: int, outbound: bool) -> Session:
    kind = Policy.SSRC_ANY_OUTBOUND if outbound else Policy.SSRC_ANY_INBOUND
    return Session(Policy(key=key + salt, ssrc_type=kind, srtp_profile=profile))


def rtp_packets(rng: random.Random, count: int, first_seq: int, ssrc: int) -> list[bytes]:
    """Varied RTP packets: CSRCs, RFC 8285 extensions, padding, marker, wrap-around."""
    out = []
    for i in range(count):
        seq = (first_seq + i) & 0xFFFF
        cc = i % 3
        ext = i % 4 == 1
        pad = i % 5 == 2
        b0 = 0x80 | (0x20 if pad else 0) | (0x10 if ext else 0) | cc
        b1 = (0x80 if i % 7 == 0 else 0) | 96
        header = struct.pack("!BBHII", b0, b1, seq, 1000 + 960 * i, ssrc)
        header += b"".join(struct.pack("!I", 0x1000 + c) for c in range(cc))
        if ext:
            header += h("bede 0001") + bytes((0x10, i & 0xFF, 0, 0))
        payload = rng.randbytes(rng.randrange(1, 300))
        if pad:
            payload += b"\x00\x00\x00\x04"
        out.append(header + payload)
    return out


class LibSrtpAgreementTests(unittest.TestCase):
    """Our layer and libsrtp produce and accept the same bytes, both directions."""

    def test_protect_identical_to_libsrtp(self) -> None:
        rng = random.Random(7714)
        for key_length, profile in PROFILES:
            key, salt = rng.randbytes(key_length), rng.randbytes(12)
            ours = SrtpContext(key, salt)
            theirs = libsrtp(key, salt, profile, outbound=True)
            # Start near the top of the sequence space to cross a ROC increment.
            for packet in rtp_packets(rng, 200, 65450, 0xCAFE0001):
                self.assertEqual(ours.protect(packet), theirs.protect(packet))
            self.assertEqual(ours.roc(0xCAFE0001), 1)

    def test_libsrtp_protect_our_unprotect(self) -> None:
        rng = random.Random(1)
        for key_length, profile in PROFILES:
            key, salt = rng.randbytes(key_length), rng.randbytes(12)
            sender = libsrtp(key, salt, profile, outbound=True)
            receiver = SrtpContext(key, salt)
            for packet in rtp_packets(rng, 150, 65500, 0x1234):
                self.assertEqual(receiver.unprotect(sender.protect(packet)), packet)

    def test_our_protect_libsrtp_unprotect(self) -> None:
        rng = random.Random(2)
        for key_length, profile in PROFILES:
            key, salt = rng.randbytes(key_length), rng.randbytes(12)
            sender = SrtpContext(key, salt)
            receiver = libsrtp(key, salt, profile, outbound=False)
            for packet in rtp_packets(rng, 150, 65500, 0x5678):
                self.assertEqual(receiver.unprotect(sender.protect(packet)), packet)

    def test_reordered_arrival_across_wrap(self) -> None:
        """Index estimation (RFC 3711 appendix A) matches libsrtp on reordering."""
        rng = random.Random(3)
        key, salt = rng.randbytes(16), rng.randbytes(12)
        sender = libsrtp(key, salt, Policy.SRTP_PROFILE_AEAD_AES_128_GCM, outbound=True)
        packets = rtp_packets(rng, 120, 65480, 0x42)
        protected = [sender.protect(p) for p in packets]
        order = list(range(len(packets)))
        for i in range(0, len(order) - 4, 5):  # swap neighbours within small windows
            order[i], order[i + 3] = order[i + 3], order[i]
        receiver = SrtpContext(key, salt)
        for i in order:
            self.assertEqual(receiver.unprotect(protected[i]), packets[i])

    def test_rtcp_both_directions(self) -> None:
        rng = random.Random(4)
        for key_length, profile in PROFILES:
            key, salt = rng.randbytes(key_length), rng.randbytes(12)
            ours_out, theirs_out = SrtpContext(key, salt), libsrtp(key, salt, profile, True)
            ours_in, theirs_in = SrtpContext(key, salt), libsrtp(key, salt, profile, False)
            for i in range(20):
                packet = RTCP_PACKET[:-4] + struct.pack("!I", i)
                ours = ours_out.protect_rtcp(packet)
                self.assertEqual(ours, theirs_out.protect_rtcp(packet))
                self.assertEqual(theirs_in.unprotect_rtcp(ours), packet)
                self.assertEqual(ours_in.unprotect_rtcp(ours), packet)

    def test_replay_rejected_like_libsrtp(self) -> None:
        key, salt = bytes(16), bytes(range(12))
        sender = SrtpContext(key, salt)
        packets = [sender.protect(p) for p in rtp_packets(random.Random(5), 3, 10, 9)]
        ours = SrtpContext(key, salt)
        theirs = libsrtp(key, salt, Policy.SRTP_PROFILE_AEAD_AES_128_GCM, False)
        for packet in packets:
            ours.unprotect(packet)
            theirs.unprotect(packet)
        self.assertRaises(ReplayError, ours.unprotect, packets[1])
        self.assertRaises(LibSrtpError, theirs.unprotect, packets[1])


class ReplayWindowTests(unittest.TestCase):
    def setUp(self) -> None:
        self.key, self.salt = bytes(range(16)), bytes(12)
        sender = SrtpContext(self.key, self.salt)
        self.packets = {seq: sender.protect(struct.pack("!BBHII", 0x80, 0, seq, 0, 7) + b"x")
                        for seq in range(0, 400)}

    def test_window_size_default_and_configurable(self) -> None:
        receiver = SrtpContext(self.key, self.salt)
        receiver.unprotect(self.packets[300])
        receiver.unprotect(self.packets[300 - 127])  # inside the 128-packet window
        self.assertRaises(ReplayError, receiver.unprotect, self.packets[300 - 128])
        wide = SrtpContext(self.key, self.salt, replay_window=256)
        wide.unprotect(self.packets[300])
        wide.unprotect(self.packets[300 - 255])
        self.assertRaises(ReplayError, wide.unprotect, self.packets[300 - 256])
        self.assertRaises(ValueError, SrtpContext, self.key, self.salt, replay_window=32)

    def test_failed_authentication_leaves_state_unchanged(self) -> None:
        receiver = SrtpContext(self.key, self.salt)
        forged = bytearray(self.packets[5])
        forged[-1] ^= 0x40
        self.assertRaises(AuthenticationFailed, receiver.unprotect, bytes(forged))
        self.assertEqual(receiver.unprotect(self.packets[5])[12:], b"x")

    def test_sender_refuses_to_reuse_an_index(self) -> None:
        sender = SrtpContext(self.key, self.salt)
        packet = struct.pack("!BBHII", 0x80, 0, 1, 0, 7) + b"a"
        sender.protect(packet)
        self.assertRaises(ReplayError, sender.protect, packet[:-1] + b"b")

    def test_large_jump_does_not_grow_state(self) -> None:
        receiver = SrtpContext(self.key, self.salt)
        receiver.unprotect(self.packets[1])
        receiver.unprotect(self.packets[399])
        self.assertEqual(receiver.roc(7), 0)

    def test_roc_from_outside(self) -> None:
        """An ROC learnt from EKT applies to the next packet (libsrtp pending ROC)."""
        sender = SrtpContext(self.key, self.salt)
        sender.set_roc(7, 5)
        packet = sender.protect(struct.pack("!BBHII", 0x80, 0, 40000, 0, 7) + b"late")
        self.assertEqual(sender.roc(7), 5)
        fresh = SrtpContext(self.key, self.salt)
        self.assertRaises(AuthenticationFailed, fresh.unprotect, packet)  # assumes ROC 0
        joined = SrtpContext(self.key, self.salt)
        joined.set_roc(7, 5)
        self.assertEqual(joined.unprotect(packet)[12:], b"late")
        self.assertEqual(joined.roc(7), 5)

    def test_close_forgets_keys(self) -> None:
        context = SrtpContext(self.key, self.salt)
        context.close()
        packet = struct.pack("!BBHII", 0x80, 0, 1, 0, 7)
        self.assertRaises(ContextClosed, context.protect, packet)
        self.assertRaises(ContextClosed, context.unprotect, packet + bytes(16))
        self.assertRaises(ContextClosed, context.protect_rtcp, RTCP_PACKET)
        self.assertNotIn(self.key.hex(), repr(context))


class MalformedInputTests(unittest.TestCase):
    def setUp(self) -> None:
        self.context = SrtpContext(bytes(16), bytes(12))

    def test_short_packets(self) -> None:
        self.assertRaises(ProtocolError, self.context.unprotect, b"\x80\x00")
        header = struct.pack("!BBHII", 0x80, 0, 1, 0, 7)
        self.assertRaises(MalformedSrtp, self.context.unprotect, header + bytes(15))
        self.assertRaises(MalformedSrtp, self.context.unprotect_rtcp, RTCP_PACKET[:20])
        self.assertRaises(MalformedSrtp, self.context.protect_rtcp, b"\x81\xc8\x00")

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=200))
    def test_random_bytes(self, data: bytes) -> None:
        for operation in (self.context.unprotect, self.context.unprotect_rtcp):
            try:
                operation(data)
            except ProtocolError:
                pass
        try:
            self.context.protect(data)
        except ProtocolError as e:
            self.assertNotIsInstance(e, AuthenticationFailed)

    @settings(max_examples=200, deadline=None)
    @given(st.integers(0, 0xFFFF), st.binary(min_size=1, max_size=64), st.integers(0, 40))
    def test_bit_flips_detected(self, seq: int, payload: bytes, position: int) -> None:
        sender = SrtpContext(bytes(range(16)), bytes(12))
        receiver = SrtpContext(bytes(range(16)), bytes(12))
        packet = sender.protect(struct.pack("!BBHII", 0x80, 1, seq, 2, 3) + payload)
        flipped = bytearray(packet)
        flipped[position % len(packet)] ^= 0x01
        with self.assertRaises(SrtpError):
            receiver.unprotect(bytes(flipped))
