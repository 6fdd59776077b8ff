"""A cascade link (perc_daemons.protocol.cascade) against OpenSSL, in each role.

The peer MD is :class:`OpenSslMd`: pyOpenSSL's DTLS 1.2 over memory BIOs
(:class:`~tests.interop.openssl_peer.OpenSSLPeer`) behind a few lines of STUN
written here (the Binding checks and answers of a link, their CHANNEL-NUMBER,
and the association tag, which it takes from OpenSSL's own exporter).  The
keys of our LinkUp must be OpenSSL's ``EXTRACTOR-dtls_srtp`` output split as
RFC 5764 section 4.2 says, and SRTP under them byte for byte what libsrtp
(pylibsrtp) makes with OpenSSL's keys.  Lossless, on a fake clock: OpenSSL
needs no timer.
"""

from __future__ import annotations

import hashlib
import os
import struct

from pylibsrtp import Policy, Session
from twisted.trial import unittest

from perc_daemons.protocol.cascade import (
    ATTR_ASSOCIATION_TAG,
    ATTR_CHANNEL_NUMBER,
    CLIENT,
    SERVER,
    TAG_LABEL,
    TAG_LENGTH,
    UP,
    CascadeLink,
    LinkDown,
    LinkTiming,
    LinkUp,
)
from perc_daemons.protocol.dtls import generate_certificate
from perc_daemons.protocol.rtp import RtpPacket
from perc_daemons.protocol.srtp import Profile, SrtpContext
from perc_daemons.protocol.stun import (
    ATTR_ICE_CONTROLLING,
    ATTR_PRIORITY,
    ATTR_USERNAME,
    BINDING_REQUEST,
    BINDING_SUCCESS,
    StunMessage,
    check_fingerprint,
    check_integrity,
)
from tests.interop import openssl_clock
from tests.interop.link import (
    HANDSHAKE_HELLO_VERIFY_REQUEST,
    FakeClock,
    plaintext_handshake_messages,
)
from tests.interop.openssl_peer import OpenSSLPeer

OURS = ("192.0.2.10", 40000)
THEIRS = ("198.51.100.20", 40000)
TIMING = LinkTiming(consent_interval=1.0, consent_timeout=6.0, check_interval=0.25,
                    handshake_timeout=5.0, backoff_min=0.5, backoff_max=4.0,
                    rekey_interval=None)
OPENSSL_PROFILE = {Profile.AEAD_AES_128_GCM: "SRTP_AEAD_AES_128_GCM",
                   Profile.AEAD_AES_256_GCM: "SRTP_AEAD_AES_256_GCM"}
LIBSRTP_PROFILE = {Profile.AEAD_AES_128_GCM: Policy.SRTP_PROFILE_AEAD_AES_128_GCM,
                   Profile.AEAD_AES_256_GCM: Policy.SRTP_PROFILE_AEAD_AES_256_GCM}
US_UFRAG, US_PWD = "ourUfrag", "our-ice-pwd-0123456789"
THEM_UFRAG, THEM_PWD = "osUf", "os-pwd-9876543210"


class OpenSslMd:
    """The other MD: OpenSSL for DTLS, STUN as a link's peer does it."""

    CHANNEL = 0x4777

    def __init__(self, role: str, clock: FakeClock, srtp: str) -> None:
        self.role = role
        self.dtls = OpenSSLPeer(role, srtp_profiles=srtp, clock=clock)
        self.out: list[bytes] = []
        self.received_dtls: list[bytes] = []
        self.checked = False  # client: a check of ours was answered
        self.checks_answered = 0
        self.peer_channel: int | None = None
        #: client: when to send the next check (started by the test)
        self.next_check: float | None = None

    def tag(self) -> bytes | None:
        if not self.dtls.handshake_done:
            return None
        return self.dtls.export_keying_material(TAG_LABEL, TAG_LENGTH)

    def receive(self, datagram: bytes) -> None:
        if datagram[0] > 3:
            self.received_dtls.append(datagram)
            self.dtls.feed(datagram)
            return
        assert check_fingerprint(datagram)
        message = StunMessage.parse(datagram)
        channel = message.get(ATTR_CHANNEL_NUMBER)
        self.peer_channel = int.from_bytes(channel[:2], "big")
        if message.message_type == BINDING_REQUEST:  # we are the link's server
            assert message.get(ATTR_USERNAME) == f"{THEM_UFRAG}:{US_UFRAG}".encode()
            assert check_integrity(datagram, THEM_PWD.encode())
            attributes = [(ATTR_CHANNEL_NUMBER, struct.pack("!HH", self.CHANNEL, 0))]
            if (tag := self.tag()) is not None:
                attributes.append((ATTR_ASSOCIATION_TAG, tag))
            self.out.append(StunMessage(BINDING_SUCCESS, message.transaction_id,
                                        attributes).encode(integrity_key=THEM_PWD.encode()))
            self.checks_answered += 1
        else:  # our check, answered by the CascadeLink server
            assert message.message_type == BINDING_SUCCESS
            assert check_integrity(datagram, US_PWD.encode())
            self.checked = True

    def check(self) -> None:
        """As the link's client: a Binding request to the CascadeLink."""
        attributes = [(ATTR_USERNAME, f"{US_UFRAG}:{THEM_UFRAG}".encode()),
                      (ATTR_PRIORITY, b"\x6e\x00\x01\xff"),
                      (ATTR_ICE_CONTROLLING, os.urandom(8)),
                      (ATTR_CHANNEL_NUMBER, struct.pack("!HH", self.CHANNEL, 0))]
        if (tag := self.tag()) is not None:
            attributes.append((ATTR_ASSOCIATION_TAG, tag))
        self.out.append(StunMessage(BINDING_REQUEST, os.urandom(12), attributes).encode(
            integrity_key=US_PWD.encode()))

    def transmit(self) -> list[bytes]:
        out, self.out = self.out, []
        if self.role == SERVER or self.checked:  # a client speaks DTLS once checked
            out += self.dtls.pump()
        return out


class CascadeInteropTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = FakeClock(1000.0)
        openssl_clock.use_fake_time(self, required=False)

    def pair(self, our_role: str, profile: int = Profile.AEAD_AES_128_GCM,
             openssl_srtp: str | None = None, pin: bytes | None = None
             ) -> tuple[CascadeLink, OpenSslMd]:
        peer_role = SERVER if our_role == CLIENT else CLIENT
        peer = OpenSslMd(peer_role, self.clock, openssl_srtp or OPENSSL_PROFILE[profile])
        certificate, key = generate_certificate("md-under-test")
        self.our_certificate = certificate
        link = CascadeLink(
            our_role, local_ufrag=US_UFRAG, local_pwd=US_PWD, remote_ufrag=THEM_UFRAG,
            remote_pwd=THEM_PWD, certificate=certificate, private_key=key,
            peer_fingerprint=pin or peer.dtls.fingerprint, profile=profile,
            local_channel=0x4123, now=self.clock.now,
            peer_address=THEIRS if our_role == CLIENT else None, timing=TIMING)
        self.events: list[tuple[float, object]] = []
        return link, peer

    def drive(self, link: CascadeLink, peer: OpenSslMd, until: float) -> None:
        end = self.clock.now + until
        while True:
            moved = True
            while moved:
                moved = False
                for datagram in link.datagrams_to_send(self.clock.now):
                    peer.receive(datagram)
                    moved = True
                for datagram in peer.transmit():
                    link.receive(datagram, THEIRS, self.clock.now)
                    moved = True
                while (event := link.next_event()) is not None:
                    self.events.append((self.clock.now, event))
            timers = [t for t in (link.next_timer(), peer.next_check) if t is not None]
            if not timers or min(timers) > end:
                self.clock.now = end
                return
            self.clock.advance_to(min(timers))
            link.handle_timer(self.clock.now)
            if peer.next_check is not None and self.clock.now >= peer.next_check:
                peer.check()  # OpenSSL's side (the link's client) keeps its consent too
                peer.next_check = self.clock.now + 1.0

    def assertInterop(self, link: CascadeLink, peer: OpenSslMd, profile: int) -> None:
        ups = [e for _, e in self.events if isinstance(e, LinkUp)]
        self.assertEqual(len(ups), 1, self.events)
        self.assertEqual([e for _, e in self.events if isinstance(e, LinkDown)], [])
        self.assertEqual(link.state, UP)
        self.assertIsNone(peer.dtls.error)
        self.assertTrue(peer.dtls.handshake_done)
        up = ups[0]
        self.assertEqual(peer.dtls.selected_srtp_profile(), profile)
        self.assertEqual(peer.dtls.peer_certificate_der(), self.our_certificate)
        n = 16 if profile == Profile.AEAD_AES_128_GCM else 32
        material = peer.dtls.export_srtp_keying_material(2 * (n + 12))
        client = (material[:n], material[2 * n:2 * n + 12])
        server = (material[n:2 * n], material[2 * n + 12:])
        mine, theirs = (client, server) if link.role == CLIENT else (server, client)
        self.assertEqual((up.local_write_key, up.local_write_salt), mine)
        self.assertEqual((up.remote_write_key, up.remote_write_salt), theirs)
        # SRTP byte for byte: libsrtp with OpenSSL's keys, our SRTP layer with LinkUp's.
        packet = RtpPacket(payload_type=96, sequence_number=4321, timestamp=99, ssrc=0xCAFE,
                           payload=b"cascade interop" * 20).serialize()
        for (key, salt), ours in ((mine, (up.local_write_key, up.local_write_salt)),
                                  (theirs, (up.remote_write_key, up.remote_write_salt))):
            libsrtp = Session(Policy(key=key + salt, ssrc_type=Policy.SSRC_ANY_OUTBOUND,
                                     srtp_profile=LIBSRTP_PROFILE[profile]))
            sealed = libsrtp.protect(packet)
            self.assertEqual(sealed, SrtpContext(*ours).protect(packet))
            self.assertNotIn(packet[12:], sealed)
        # the association tag is an exporter value both sides compute alike
        self.assertIsNotNone(peer.tag())
        self.assertEqual(link._tag, peer.tag())
        self.assertEqual(peer.peer_channel, 0x4123)
        self.assertEqual(link.remote_channel, OpenSslMd.CHANNEL)

    def test_our_client_openssl_server_128(self) -> None:
        self.client_case(Profile.AEAD_AES_128_GCM)

    def test_our_client_openssl_server_256(self) -> None:
        self.client_case(Profile.AEAD_AES_256_GCM)

    def client_case(self, profile: int) -> None:
        link, peer = self.pair(CLIENT, profile)
        self.drive(link, peer, 30.0)  # up at once, then consent for 30 s
        self.assertInterop(link, peer, profile)
        self.assertGreater(peer.checks_answered, 20)

    def test_openssl_client_our_server_128(self) -> None:
        self.server_case(Profile.AEAD_AES_128_GCM)

    def test_openssl_client_our_server_256(self) -> None:
        self.server_case(Profile.AEAD_AES_256_GCM)

    def server_case(self, profile: int) -> None:
        link, peer = self.pair(SERVER, profile)
        peer.next_check = self.clock.now
        self.drive(link, peer, 30.0)
        self.assertInterop(link, peer, profile)
        self.assertEqual(link.peer_address, THEIRS)
        # OpenSSL answered our HelloVerifyRequest (stateless cookie, RFC 6347 s4.2.1)
        first = plaintext_handshake_messages(peer.received_dtls[0])
        self.assertEqual([t for t, _ in first], [HANDSHAKE_HELLO_VERIFY_REQUEST])
        self.assertEqual(link.counters["handshakes"], 1)

    def test_openssl_with_another_certificate_is_refused(self) -> None:
        other, _ = generate_certificate("not-the-peer")
        link, peer = self.pair(CLIENT, pin=hashlib.sha256(other).digest())
        self.drive(link, peer, 3.0)
        [down] = [e for _, e in self.events if isinstance(e, LinkDown)]
        self.assertEqual(down.reason, "dtls_wrong_certificate")
        self.assertFalse([e for _, e in self.events if isinstance(e, LinkUp)])
        self.assertFalse(peer.dtls.handshake_done)

    def test_openssl_server_without_our_profile(self) -> None:
        """OpenSSL completes without use_srtp when it has none of ours; our client refuses."""
        link, peer = self.pair(CLIENT, Profile.AEAD_AES_128_GCM,
                               openssl_srtp="SRTP_AEAD_AES_256_GCM")
        self.drive(link, peer, 3.0)
        [down] = [e for _, e in self.events if isinstance(e, LinkDown)]
        self.assertEqual(down.reason, "dtls_handshake_failure")
        self.assertFalse([e for _, e in self.events if isinstance(e, LinkUp)])

    def test_openssl_client_offering_another_profile_is_refused(self) -> None:
        link, peer = self.pair(SERVER, Profile.AEAD_AES_128_GCM,
                               openssl_srtp="SRTP_AEAD_AES_256_GCM")
        peer.next_check = self.clock.now
        self.drive(link, peer, 3.0)
        [down] = [e for _, e in self.events if isinstance(e, LinkDown)]
        self.assertEqual(down.reason, "dtls_no_srtp_profile")
        self.assertIsNotNone(peer.dtls.error)
        self.assertIn((2, 40), peer.dtls.alerts_received)  # fatal handshake_failure
