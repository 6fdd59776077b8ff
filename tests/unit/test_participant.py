"""ParticipantSession against a real MediaPlane and a real KeyDistributorCore, in memory.

Three (or two) endpoint sessions, the MD's sans-I/O media plane and the KD's
association core exchange real datagrams and real RFC 9185 tunnel messages
through a small loop (UDP addresses are invented tuples), with explicit time.
Answers are signed by the KD (DevPki certificate) and verified as the
endpoint does.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import struct
from collections import deque
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from perc_daemons.devpki import DevPki
from perc_daemons.kd.associations import KeyDistributorCore
from perc_daemons.md.plane import MediaPlane
from perc_daemons.protocol import sdp
from perc_daemons.protocol.answer import VerifiedAnswer, sign_answer, verify_signed_answer
from perc_daemons.protocol.double import Relay, build_ohb
from perc_daemons.protocol.dtls import (
    ConnectionClosed,
    DtlsConfiguration,
    DtlsConnection,
    HandshakeComplete,
    Role,
    certificate_fingerprint,
    generate_certificate,
)
from perc_daemons.protocol.ekt import EktCipher, EktParameterSet, FullEktField
from perc_daemons.protocol.errors import ProtocolError
from perc_daemons.protocol.identity import decode_sdp_identity
from perc_daemons.protocol.participant import (
    Closed,
    Connected,
    DecryptFailed,
    EktKeyInstalled,
    MediaReceived,
    NotReady,
    ParticipantSession,
    Refused,
    RtcpReceived,
    build_offer,
    new_ice_credentials,
    new_tls_id,
)
from perc_daemons.protocol.rtp import PSFB, RR, header_length, parse_report_blocks
from perc_daemons.protocol.srtp import Profile
from perc_daemons.protocol.stun import (
    ATTR_ICE_CONTROLLING,
    ATTR_PRIORITY,
    ATTR_USE_CANDIDATE,
    ATTR_USERNAME,
    BINDING_SUCCESS,
    StunMessage,
    answer_binding_request,
    binding_success,
    check_fingerprint,
    check_integrity,
    xor_mapped_address,
)
from perc_daemons.protocol.tunnel import (
    EndpointDisconnect,
    MediaKeys,
    TunneledDtls,
    new_association_id,
)

T0 = 1_700_000_000.0
CONF = "conf-1"
KD_NAME = "kd.localhost"
MD_ADDR = ("198.51.100.7", 5000)
P128 = Profile.DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM
P256 = Profile.DOUBLE_AEAD_AES_256_GCM_AEAD_AES_256_GCM
GCM128 = Profile.AEAD_AES_128_GCM
HOLD = 0.25  # EktSender's default old_key_hold (RFC 8870 s4.3.1)


class Participant:
    """One endpoint: its session and everything it produced."""

    def __init__(self, name: str, aid: bytes, address: tuple[str, int],
                 session: ParticipantSession, offer: str, md_ufrag: str, md_pwd: str) -> None:
        self.name = name
        self.aid = aid
        self.address = address
        self.session = session
        self.offer = offer
        self.md_ufrag = md_ufrag
        self.md_pwd = md_pwd
        self.events: list[Any] = []
        self.inbox: list[bytes] = []

    @property
    def ssrc(self) -> int:
        return self.session.ssrc

    def collect(self) -> None:
        while (event := self.session.next_event()) is not None:
            self.events.append(event)

    def of(self, kind: type) -> list[Any]:
        self.collect()
        return [e for e in self.events if isinstance(e, kind)]

    def media_from(self, other: Participant) -> list[MediaReceived]:
        return [e for e in self.of(MediaReceived) if e.ssrc == other.ssrc]


class RawKd:
    """A KD stand-in: one plain DtlsConnection server per association, no policy."""

    def __init__(self, certificate: bytes, private_key: Any, **config: Any) -> None:
        self.certificate = certificate
        self.private_key = private_key
        self.config = config
        self.expected: dict[bytes, tuple[bytes, bytes, bytes]] = {}
        self.connections: dict[bytes, DtlsConnection] = {}
        self.events: list[Any] = []

    def expect(self, aid: bytes, conference: str, identity: str, fingerprint: bytes,
               tls_id: bytes, ssrcs: object = (), *, kd_tls_id: bytes) -> None:
        self.expected[aid] = (fingerprint, tls_id, kd_tls_id)

    def tunneled_dtls(self, aid: bytes, data: bytes, now: float) -> list[Any]:
        connection = self.connections.get(aid)
        if connection is None:
            fingerprint, tls_id, kd_tls_id = self.expected[aid]
            connection = self.connections[aid] = DtlsConnection(Role.SERVER, DtlsConfiguration(
                self.certificate, self.private_key, expected_peer_fingerprint=fingerprint,
                external_session_id=kd_tls_id,
                expected_peer_external_session_id=tls_id, **self.config))
        connection.receive_datagram(data, now)
        while (event := connection.next_event()) is not None:
            self.events.append(event)
        return [TunneledDtls(aid, d) for d in connection.datagrams_to_send(now)]

    def take_grants(self) -> list[str]:
        return []  # a bare DTLS server: it sends no EKTKey of its own accord

    def next_timer(self) -> float | None:
        timers = [t for c in self.connections.values() if (t := c.get_timer()) is not None]
        return min(timers) if timers else None

    def handle_timers(self, now: float) -> list[Any]:
        out: list[Any] = []
        for aid, connection in self.connections.items():
            if (t := connection.get_timer()) is not None and now >= t:
                connection.handle_timer(now)
                out += [TunneledDtls(aid, d) for d in connection.datagrams_to_send(now)]
        return out


class Net:
    """KD core + MD media plane + endpoint sessions, wired in memory."""

    def __init__(self, test: unittest.TestCase, *, cipher: EktCipher = EktCipher.AESKW_128,
                 raw_kd: dict[str, Any] | None = None) -> None:
        self.now = T0
        pki = DevPki(test.mktemp(), now=datetime.datetime.fromtimestamp(T0, datetime.UTC))
        issued = pki.issue("kd", [KD_NAME])
        certificate = x509.load_pem_x509_certificate(issued.certificate.read_bytes())
        self.kd_der = certificate.public_bytes(serialization.Encoding.DER)
        self.kd_key = serialization.load_pem_private_key(issued.private_key.read_bytes(), None)
        self.kd_fingerprint = hashlib.sha256(self.kd_der).digest()
        self.roots = [pki.ca_certificate]
        self.cipher = cipher
        self.kd: Any
        if raw_kd is None:
            self.kd = KeyDistributorCore(self.kd_der, self.kd_key,  # type: ignore[arg-type]
                                         os.urandom(32))
        else:
            self.kd = RawKd(self.kd_der, self.kd_key, **raw_kd)
        self.plane = MediaPlane(on_dtls=self._on_dtls)
        self.queue: deque[tuple[bytes, tuple[str, int], tuple[str, int]]] = deque()
        self.to_kd: deque[tuple[bytes, bytes]] = deque()
        #: Every RFC 9185 tunnel message between the MD and the KD, encoded.
        self.tunnel_log: list[bytes] = []
        self.media_keys: list[MediaKeys] = []
        #: Every datagram the MD received.
        self.md_datagrams: list[bytes] = []
        self.participants: list[Participant] = []
        self.by_address: dict[tuple[str, int], Participant] = {}
        #: (data, src, dst) -> data to deliver, or None to lose it.
        self.filter: Callable[[bytes, tuple[str, int], tuple[str, int]], bytes | None] | None
        self.filter = None
        self.epoch = 0
        self.params: dict[int, EktParameterSet] = {}
        if raw_kd is None:
            self.install_epoch()

    # -- the KD and the MD -------------------------------------------------------------

    def install_epoch(self, ttl: int = 3600) -> EktParameterSet:
        self.epoch += 1
        params = EktParameterSet(key=os.urandom(self.cipher.key_length), cipher=self.cipher,
                                 master_salt=os.urandom(12), spi=100 + self.epoch, ttl=ttl)
        self.params[self.epoch] = params
        self.from_kd(self.kd.install_epoch(CONF, self.epoch, params, self.now))
        self.run()
        return params

    def _on_dtls(self, aid: bytes, data: bytes) -> None:
        self.tunnel_log.append(TunneledDtls(aid, data).encode())
        self.to_kd.append((aid, data))

    def from_kd(self, messages: list[Any]) -> None:
        """What the MD does with each tunnel message from the KD."""
        for message in messages:
            self.tunnel_log.append(message.encode())
            if isinstance(message, MediaKeys):
                self.media_keys.append(message)
                self.plane.install_keys(message.association_id, message)
            elif isinstance(message, TunneledDtls):
                for data, address in self.plane.send_dtls(message.association_id,
                                                          message.dtls_message):
                    self.queue.append((data, MD_ADDR, address))  # type: ignore[arg-type]
            elif isinstance(message, EndpointDisconnect):
                self.plane.remove_leg(message.association_id)

    def md_disconnect(self, p: Participant) -> None:
        """The MD tells the KD the endpoint left (and, colluding, keeps relaying to it)."""
        message = EndpointDisconnect(p.aid)
        self.tunnel_log.append(message.encode())
        answer = self.kd.endpoint_disconnect(p.aid, self.now)
        # colluding: it ignores the KD's EndpointDisconnect and keeps the leg
        self.from_kd([m for m in answer if not isinstance(m, EndpointDisconnect)])
        self.run()

    # -- endpoints -------------------------------------------------------------------------

    def make(self, name: str, *, kind: str = "audio", video_ssrcs: Any = (),
             audio_level: bool = True,
             edit_answer: Callable[[sdp.SessionDescription], sdp.SessionDescription]
             | None = None, **options: Any) -> Participant:
        """Offer, MD draft answer, KD signature, endpoint verification: a new session.

        ``video_ssrcs`` and ``audio_level`` go to :func:`build_offer` (and the
        former to the session); ``edit_answer`` changes the MD's draft answer
        (e.g. an MD that drops an ``a=extmap``) before the KD signs it.
        """
        options.setdefault("keep_audit_secrets", True)
        certificate, key = generate_certificate(name)
        fingerprint = certificate_fingerprint(certificate)
        ufrag, pwd = new_ice_credentials()
        tls_id = new_tls_id()
        ssrc = int.from_bytes(os.urandom(4), "big")
        identity = f"{name}@example.org"
        offer = build_offer(assertion_json=json.dumps({"idp": "test", "name": identity}),
                            fingerprint=fingerprint, tls_id=tls_id, ice_ufrag=ufrag,
                            ice_pwd=pwd, ssrc=ssrc, cname=name, kind=kind,
                            video_ssrcs=video_ssrcs, audio_level=audio_level)
        # MD: the draft answer, with a placeholder tls-id
        md_ufrag, md_pwd = new_ice_credentials()
        aid = new_association_id()
        draft = sdp.make_answer(
            sdp.parse(offer), fingerprint=self.kd_fingerprint, tls_id=new_tls_id(),
            ice_ufrag=md_ufrag, ice_pwd=md_pwd,
            candidates=[f"1 1 udp 2130706431 {MD_ADDR[0]} {MD_ADDR[1]} typ host"])
        if edit_answer is not None:
            draft = edit_answer(draft)
        # KD: its own tls-id for this association in every accepted section, admit, sign
        kd_tls_id = new_tls_id()
        answer = sdp.SessionDescription(
            draft.origin, draft.session_name, draft.fields, draft.attributes,
            tuple(m.with_tls_id(kd_tls_id) if m.port else m for m in draft.media))
        self.kd.expect(aid, CONF, identity, fingerprint, tls_id.encode(), [ssrc, *video_ssrcs],
                       kd_tls_id=kd_tls_id.encode())
        signed = sign_answer(answer, offer, association_id=aid, conference_id=CONF,
                             identity=identity, certificate_chain=[self.kd_der],
                             private_key=self.kd_key, now=self.now)  # type: ignore[arg-type]
        self.plane.add_leg(aid, md_ufrag, md_pwd, group=CONF, now=self.now)
        # endpoint
        verified = verify_signed_answer(signed, offer, trust_roots=self.roots,
                                        kd_names=[KD_NAME], now=self.now)
        session = ParticipantSession(certificate=certificate, private_key=key, ssrc=ssrc,
                                     ice_ufrag=ufrag, ice_pwd=pwd, tls_id=tls_id,
                                     answer=verified, video_ssrcs=video_ssrcs, **options)
        n = len(self.participants) + 1
        p = Participant(name, aid, (f"192.0.2.{n}", 40000 + n), session, offer,
                        md_ufrag, md_pwd)
        self.participants.append(p)
        self.by_address[p.address] = p
        return p

    def join(self, name: str, **options: Any) -> Participant:
        p = self.make(name, **options)
        self.send_from(p, p.session.start(self.now))
        self.run()
        return p

    def send_from(self, p: Participant, datagrams: list[bytes]) -> None:
        for data in datagrams:
            self.queue.append((data, p.address, MD_ADDR))

    def deliver(self, p: Participant, data: bytes) -> list[bytes]:
        p.inbox.append(data)
        out = p.session.datagram_received(data, self.now)
        p.collect()
        return out

    def send(self, p: Participant, payload: bytes, timestamp: int = 0, **kw: Any) -> bytes:
        wire = p.session.send_media(payload, timestamp=timestamp, now=self.now, **kw)
        self.send_from(p, [wire])
        self.run()
        return wire

    def run(self) -> None:
        for _ in range(100_000):
            if self.queue:
                data, src, dst = self.queue.popleft()
                if self.filter is not None:
                    filtered = self.filter(data, src, dst)
                    if filtered is None:
                        continue
                    data = filtered
                if dst == MD_ADDR:
                    self.md_datagrams.append(data)
                    for out, address in self.plane.datagram_received(data, src, self.now):
                        self.queue.append((out, MD_ADDR, address))  # type: ignore[arg-type]
                else:
                    p = self.by_address[dst]
                    self.send_from(p, self.deliver(p, data))
            elif self.to_kd:
                aid, data = self.to_kd.popleft()
                self.from_kd(self.kd.tunneled_dtls(aid, data, self.now))
            elif grants := self.kd.take_grants():
                # the KD service's step: invitations re-checked, then the current key
                for conference in grants:
                    self.from_kd(self.kd.grant(conference, self.now))
            else:
                return
        raise AssertionError("the network never went quiet")

    def advance(self, seconds: float) -> None:
        """Move time on, firing every timer that falls due on the way."""
        end = self.now + seconds
        for _ in range(10_000):
            timers = [t for p in self.participants if (t := p.session.next_timer()) is not None]
            if (t := self.kd.next_timer()) is not None:
                timers.append(t)
            due = [t for t in timers if t <= end]
            if not due:
                self.now = end
                return
            self.now = max(self.now, min(due))
            for p in self.participants:
                timer = p.session.next_timer()
                if timer is not None and timer <= self.now:
                    self.send_from(p, p.session.handle_timer(self.now))
                    p.collect()
            self.from_kd(self.kd.handle_timers(self.now))
            self.run()
        raise AssertionError("timers never settled")


def three(test: unittest.TestCase, **options: Any) -> tuple[Net, Participant, Participant,
                                                            Participant]:
    net = Net(test, **options)
    a, b, c = (net.join(name) for name in ("alice", "bob", "carol"))
    return net, a, b, c


def payload(sender: Participant, i: int) -> bytes:
    return f"{sender.name} frame {i} ".encode() * 5


# -- the offer ------------------------------------------------------------------------------


class OfferTests(unittest.TestCase):
    def offer(self, kind: str = "audio") -> tuple[str, bytes]:
        fingerprint = os.urandom(32)
        ufrag, pwd = new_ice_credentials()
        text = build_offer(assertion_json='{"a": 1}', fingerprint=fingerprint,
                           tls_id=new_tls_id(), ice_ufrag=ufrag, ice_pwd=pwd,
                           ssrc=0xDEADBEEF, cname="alice", kind=kind)
        return text, fingerprint

    def test_audio_offer_parses_and_is_answerable(self) -> None:
        text, fingerprint = self.offer()
        self.assertTrue(text.endswith("\r\n"))
        offer = sdp.parse(text)
        self.assertEqual(offer.serialize(), text)
        self.assertEqual(decode_sdp_identity(offer.identity), '{"a": 1}')
        self.assertEqual(offer.bundle, ("0",))
        [media] = offer.media
        self.assertEqual((media.media, media.port, media.proto, media.formats),
                         ("audio", 9, "UDP/TLS/RTP/SAVPF", ("0",)))
        self.assertEqual(media.rtpmaps()[0].encoding, "PCMU")
        self.assertEqual(media.connection, "IN IP4 0.0.0.0")
        self.assertEqual((media.mid, media.direction, media.setup), ("0", "sendrecv", "actpass"))
        self.assertTrue(media.rtcp_mux)
        self.assertEqual(media.fingerprints(), [("sha-256", fingerprint)])
        self.assertEqual(media.ssrcs(), [0xDEADBEEF])
        answer = sdp.make_answer(offer, fingerprint=os.urandom(32), tls_id=new_tls_id(),
                                 ice_ufrag="abcd", ice_pwd="p" * 22,
                                 candidates=["1 1 udp 1 203.0.113.1 5000 typ host"])
        self.assertEqual(answer.media[0].port, 9)
        self.assertEqual(answer.media[0].formats, ("0",))

    def test_video_offer(self) -> None:
        text, _ = self.offer("video")
        [media] = sdp.parse(text).media
        self.assertEqual((media.media, media.formats), ("video", ("96",)))
        self.assertEqual(media.rtpmaps()[96].encoding, "VP8")
        self.assertEqual(media.rtpmaps()[96].clock_rate, 90000)

    def test_bad_parameters(self) -> None:
        good = dict(assertion_json="{}", fingerprint=os.urandom(32), tls_id=new_tls_id(),
                    ice_ufrag="abcd", ice_pwd="p" * 22, ssrc=1, cname="x")
        for change in ({"kind": "text"}, {"fingerprint": b"x"}, {"ssrc": 1 << 32},
                       {"cname": "two words"}, {"cname": ""}, {"tls_id": "short"},
                       {"ice_pwd": "short"}):
            self.assertRaises(ValueError, build_offer, **{**good, **change})  # type: ignore[arg-type]

    def test_credentials(self) -> None:
        ufrag, pwd = new_ice_credentials()
        self.assertNotEqual(new_ice_credentials(), (ufrag, pwd))
        tls_id = new_tls_id()
        media = sdp.MediaDescription("audio", 9, "x", ("0",))
        media.with_ice_credentials(ufrag, pwd).with_tls_id(tls_id)  # valid syntax
        self.assertGreaterEqual(len(pwd), 22)
        self.assertNotEqual(new_tls_id(), tls_id)


# -- ICE / STUN -------------------------------------------------------------------------------


class StunTests(unittest.TestCase):
    def setUp(self) -> None:
        self.net = Net(self)
        self.p = self.net.make("alice")
        self.session = self.p.session

    def test_md_address_and_payload_type_from_the_answer(self) -> None:
        self.assertEqual(self.session.md_address, MD_ADDR)
        self.assertEqual(self.session.payload_type, 0)

    def test_binding_request(self) -> None:
        [request] = self.session.start(T0)
        message = StunMessage.parse(request)
        ufrag = sdp.parse(self.p.offer).media[0].ice_ufrag
        self.assertEqual(message.get(ATTR_USERNAME), f"{self.p.md_ufrag}:{ufrag}".encode())
        self.assertIsNotNone(message.get(ATTR_PRIORITY))
        self.assertEqual(len(message.get(ATTR_ICE_CONTROLLING) or b""), 8)
        self.assertEqual(message.get(ATTR_USE_CANDIDATE), b"")
        self.assertTrue(check_integrity(request, self.p.md_pwd.encode()))
        self.assertTrue(check_fingerprint(request))
        # The MD's own responder accepts it.
        response = answer_binding_request(request, local_ufrag=self.p.md_ufrag,
                                          local_pwd=self.p.md_pwd, source=self.p.address)
        self.assertEqual(StunMessage.parse(response).message_type, BINDING_SUCCESS)

    def test_retransmission_then_ice_failure(self) -> None:
        [request] = self.session.start(T0)
        sent = [T0]
        while (timer := self.session.next_timer()) is not None:
            out = self.session.handle_timer(timer)
            if out:
                self.assertEqual(out, [request])  # same transaction (RFC 8489 s6.2.1)
                sent.append(timer)
        self.assertEqual([t - T0 for t in sent], [0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5])
        [refused] = self.p.of(Refused)
        self.assertIn("ICE", refused.reason)
        self.assertRaises(NotReady, self.session.send_media, b"x", timestamp=0, now=T0 + 40)

    def test_only_authenticated_responses_for_our_transactions_count(self) -> None:
        [request] = self.session.start(T0)
        parsed = StunMessage.parse(request)
        wrong_key = binding_success(parsed, self.p.address, b"not the MD's ice-pwd")
        self.assertEqual(self.session.datagram_received(wrong_key, T0 + 0.1), [])
        self.assertEqual(self.session.drops, {"stun_integrity": 1})
        other = StunMessage(parsed.message_type, os.urandom(12), parsed.attributes[:1])
        foreign = binding_success(other, self.p.address, self.p.md_pwd.encode())
        self.assertEqual(self.session.datagram_received(foreign, T0 + 0.1), [])
        unprotected = binding_success(parsed, self.p.address, None)
        self.assertEqual(self.session.datagram_received(unprotected, T0 + 0.1), [])
        no_fingerprint = StunMessage(BINDING_SUCCESS, parsed.transaction_id, [
            (0x0020, xor_mapped_address("192.0.2.1", 4000, parsed.transaction_id))]).encode(
            integrity_key=self.p.md_pwd.encode(), fingerprint=False)
        self.assertEqual(self.session.datagram_received(no_fingerprint, T0 + 0.1), [])
        self.assertEqual(self.session.datagram_received(request, T0 + 0.1), [])  # a request
        self.assertEqual(self.session.drops, {
            "stun_integrity": 1, "stun_unknown_transaction": 1, "stun_unauthenticated": 1,
            "stun_fingerprint": 1, "stun_unexpected": 1})
        self.assertEqual(self.session.state, "checking")
        # The right response starts DTLS: a ClientHello (content type 22).
        good = binding_success(parsed, self.p.address, self.p.md_pwd.encode())
        [client_hello] = self.session.datagram_received(good, T0 + 0.2)
        self.assertEqual(client_hello[0], 22)
        self.assertEqual(self.session.state, "handshaking")
        # The same response again: its transaction is done.
        self.assertEqual(self.session.datagram_received(good, T0 + 0.3), [])
        self.assertEqual(self.session.drops["stun_unknown_transaction"], 2)

    def test_constructor_refuses_an_unverified_answer(self) -> None:
        answer = self.session.answer
        certificate, key = generate_certificate("x")
        kwargs = dict(certificate=certificate, private_key=key, ssrc=1, ice_ufrag="abcd",
                      ice_pwd="p" * 22, tls_id=new_tls_id())
        self.assertRaises(TypeError, ParticipantSession, answer=answer.answer, **kwargs)
        rejected = sdp.SessionDescription(answer.answer.origin, media=tuple(
            sdp.MediaDescription(m.media, 0, m.proto, m.formats) for m in answer.answer.media))
        forged = VerifiedAnswer(rejected, answer.association_id, CONF, "x", KD_NAME,
                                answer.kd_fingerprint, answer.kd_tls_id, answer.expires_at)
        self.assertRaises(ValueError, ParticipantSession, answer=forged, **kwargs)


# -- the conference ----------------------------------------------------------------------------


class ConferenceTests(unittest.TestCase):
    def test_all_connect_and_get_the_epoch_key(self) -> None:
        net, *people = three(self)
        spi = net.params[1].spi
        for p in people:
            self.assertEqual(p.of(Connected), [Connected(P128, EktCipher.AESKW_128)])
            self.assertEqual(p.of(EktKeyInstalled), [EktKeyInstalled(spi, 0)])
            self.assertTrue(p.session.ready)
            self.assertEqual(p.session.epochs_seen, [spi])
            self.assertEqual(p.of(Refused) + p.of(Closed) + p.of(DecryptFailed), [])
            self.assertTrue(net.plane.leg(p.aid).keyed)
        self.assertEqual(len(net.kd.members(CONF)), 3)

    def test_no_key_copies_unless_asked(self) -> None:
        net = Net(self)
        p = net.join("alice", keep_audit_secrets=False)
        self.assertTrue(p.session.ready)
        net.send(p, b"x" * 20, timestamp=0)
        self.assertEqual(p.session.audit_secrets(), [])

    def test_initial_sequence_continues_an_earlier_session(self) -> None:
        net = Net(self)
        p = net.join("alice", initial_sequence=0xFFFF)
        self.assertEqual(p.session.next_sequence, 0xFFFF)
        for expected in (0xFFFF, 0):
            wire = net.send(p, b"x" * 20, timestamp=0)
            self.assertEqual(struct.unpack_from("!H", wire, 2)[0], expected)
        self.assertEqual(p.session.next_sequence, 1)

    def test_media_both_ways_is_byte_identical(self) -> None:
        net, a, b, c = three(self)
        people = (a, b, c)
        first_seq = {}
        for i in range(5):
            for p in people:
                net.advance(0.02)
                wire = net.send(p, payload(p, i), timestamp=160 * i, marker=i == 0)
                first_seq.setdefault(p.name, struct.unpack_from("!H", wire, 2)[0])
        for receiver in people:
            for sender in people:
                got = receiver.media_from(sender)
                if receiver is sender:
                    self.assertEqual(got, [])
                    continue
                self.assertEqual([m.payload for m in got], [payload(sender, i) for i in range(5)])
                self.assertEqual([m.timestamp for m in got], [160 * i for i in range(5)])
                self.assertEqual([m.marker for m in got], [True] + [False] * 4)
                self.assertEqual([m.sequence for m in got],
                                 [(first_seq[sender.name] + i) & 0xFFFF for i in range(5)])
                self.assertEqual({m.payload_type for m in got}, {0})
                self.assertEqual({m.spi for m in got}, {net.params[1].spi})
                stats = receiver.session.stats[sender.ssrc]
                self.assertEqual((stats.packets, stats.lost, stats.decrypt_failures),
                                 (5, 0, 0))
                self.assertEqual(stats.bytes, sum(len(payload(sender, i)) for i in range(5)))
                self.assertEqual(stats.epochs_seen, {net.params[1].spi})
                self.assertLess(stats.first_time, stats.last_time)
            self.assertEqual(receiver.of(DecryptFailed), [])
        # Each sequence number starts at random: not all three start at the same value.
        self.assertEqual(a.session.packets_sent, 5)

    def test_video_payload_type(self) -> None:
        net = Net(self)
        a, v = net.join("alice"), net.join("victor", kind="video")
        self.assertEqual(v.session.payload_type, 96)
        net.send(v, b"\x90" * 1200, timestamp=3000, marker=True, keyframe=True)
        net.send(a, b"\xff" * 160)
        [frame] = a.media_from(v)
        self.assertEqual((frame.payload_type, frame.payload, frame.marker), (96, b"\x90" * 1200,
                                                                               True))
        self.assertEqual(v.media_from(a)[0].payload_type, 0)

    def test_256_bit_profile(self) -> None:
        net = Net(self, cipher=EktCipher.AESKW_256)
        a, b = net.join("alice"), net.join("bob")
        self.assertEqual(a.of(Connected), [Connected(P256, EktCipher.AESKW_256)])
        net.send(a, b"hello")
        self.assertEqual([m.payload for m in b.media_from(a)], [b"hello"])

    def test_send_media_before_ready(self) -> None:
        net = Net(self)
        p = net.make("alice")
        self.assertRaises(NotReady, p.session.send_media, b"x", timestamp=0, now=net.now)
        self.assertTrue(issubclass(NotReady, ProtocolError))
        net.send_from(p, p.session.start(net.now))
        self.assertRaises(NotReady, p.session.send_media, b"x", timestamp=0, now=net.now)
        self.assertRaises(NotReady, p.session.send_rtcp, now=net.now)
        net.run()
        self.assertTrue(p.session.ready)
        self.assertRaises(ValueError, p.session.send_media, b"x", timestamp=-1, now=net.now)

    def test_loss_from_sequence_gaps(self) -> None:
        net = Net(self)
        a, b = net.join("alice"), net.join("bob")
        count = {"n": 0}

        def lose_third(data: bytes, src: Any, dst: Any) -> bytes | None:
            if dst == b.address and 128 <= data[0] <= 191:
                count["n"] += 1
                if count["n"] in (3, 6):
                    return None
            return data

        net.filter = lose_third
        for i in range(10):
            net.advance(0.02)
            net.send(a, payload(a, i))
        stats = b.session.stats[a.ssrc]
        self.assertEqual((stats.packets, stats.lost), (8, 2))
        self.assertEqual(stats.as_dict()["lost"], 2)

    def test_rtcp_receiver_report_and_pli(self) -> None:
        net, a, b, c = three(self)
        net.send(b, b"from bob")
        net.send(c, b"from carol")
        wire = a.session.send_rtcp(now=net.now, pli_ssrc=b.ssrc)
        net.send_from(a, [wire])
        net.run()
        for p in (b, c):
            [rtcp] = p.of(RtcpReceived)
            self.assertEqual(rtcp.ssrc, a.ssrc)
            report, pli = rtcp.packets
            self.assertEqual((report.packet_type, pli.packet_type), (RR, PSFB))
            self.assertEqual({r.ssrc for r in parse_report_blocks(report)}, {b.ssrc, c.ssrc})
            self.assertEqual(pli.body[4:8], struct.pack("!I", b.ssrc))

    def test_consent_keeps_the_session_and_its_loss_ends_it(self) -> None:
        net = Net(self)
        a, b = net.join("alice"), net.join("bob")
        net.advance(60.0)
        self.assertTrue(a.session.ready)
        self.assertGreaterEqual(net.plane.leg(a.aid).last_consent, net.now - 6.0)
        net.send(a, b"still here")
        self.assertEqual([m.payload for m in b.media_from(a)], [b"still here"])
        # The MD stops answering alice.
        net.filter = lambda data, src, dst: None if dst == a.address else data
        net.advance(31.0)
        [closed] = a.of(Closed)
        self.assertIn("consent", closed.reason)
        self.assertFalse(a.session.ready)
        self.assertRaises(NotReady, a.session.send_media, b"x", timestamp=0, now=net.now)
        self.assertTrue(b.session.ready)


class RekeyTests(unittest.TestCase):
    def test_leave_rekeys_and_locks_the_departed_out(self) -> None:
        net, a, b, c = three(self)
        for i in range(3):
            for p in (a, b, c):
                net.advance(0.02)
                net.send(p, payload(p, i))
        old_spi = net.params[1].spi
        carol_knew = set(c.session.audit_secrets())
        # carol leaves: the MD tells the KD, but (colluding) keeps relaying to her
        net.md_disconnect(c)
        self.assertEqual(net.kd.take_rekeys(), [CONF])
        new = net.install_epoch()
        for p in (a, b):
            self.assertEqual(p.of(EktKeyInstalled)[-1], EktKeyInstalled(new.spi, 1))
            self.assertEqual(p.session.epochs_seen, [old_spi, new.spi])
        self.assertEqual(c.session.epochs_seen, [old_spi])
        self.assertEqual(len(c.of(EktKeyInstalled)), 1)

        start = net.now
        sent_at: dict[bytes, float] = {}
        for i in range(3, 13):
            for p in (a, b):
                net.advance(0.05)
                sent_at[payload(p, i)] = net.now
                net.send(p, payload(p, i))
        for receiver, sender in ((a, b), (b, a)):
            got = receiver.media_from(sender)
            self.assertEqual([m.payload for m in got], [payload(sender, i) for i in range(13)])
            self.assertEqual(receiver.session.stats[sender.ssrc].epochs_seen,
                             {old_spi, new.spi})
            self.assertEqual(got[-1].spi, new.spi)
            self.assertEqual(receiver.of(DecryptFailed), [])
        # carol got every one of those datagrams; after the 250 ms hold none decrypts
        late = {text for text, t in sent_at.items() if t > start + 0.05 + HOLD + 0.01}
        self.assertGreater(len(late), 10)
        decrypted = {m.payload for m in c.of(MediaReceived)}
        self.assertEqual(decrypted & late, set())
        failures = c.of(DecryptFailed)
        self.assertGreaterEqual(len(failures), len(late))
        self.assertEqual({f.ssrc for f in failures}, {a.ssrc, b.ssrc})
        self.assertLessEqual({f.reason for f in failures},
                             {"ekt_unknown_spi", "e2e_auth", "e2e_key_unknown"})
        self.assertIn("ekt_unknown_spi", {f.reason for f in failures})
        # Everyone rotated its inner key: the new ones reached the others, not carol.
        for p, other in ((a, b), (b, a)):
            fresh = set(p.session.audit_secrets()) & set(other.session.audit_secrets())
            self.assertTrue(fresh - carol_knew - set(c.session.audit_secrets()))
        self.assertNotIn(new.key, c.session.audit_secrets())

    def test_joiner_during_the_senders_old_key_hold_counts_no_failure(self) -> None:
        """RFC 8870 s4.3.1: after a new EKTKey a sender protects with its old key for
        250 ms; a member who joined in the new epoch cannot decrypt those packets (by
        design), and they are "no key", not integrity failures."""
        net = Net(self)
        a, b = net.join("alice"), net.join("bob")
        net.send(a, b"epoch 1")
        net.install_epoch()  # alice rotates her key but holds the old one for 250 ms
        d = net.join("dave")  # gets the new epoch only
        held = [net.send(a, f"held {i}".encode(), keyframe=i == 0) for i in range(3)]
        self.assertTrue(held)
        failures = [f for f in d.of(DecryptFailed) if f.ssrc == a.ssrc]
        self.assertEqual({f.reason for f in failures}, {"e2e_key_held_back"})
        net.advance(HOLD + 0.05)
        net.send(a, b"after the hold", keyframe=True)
        self.assertEqual(d.media_from(a)[-1].payload, b"after the hold")
        stats = d.session.stats[a.ssrc]
        self.assertEqual((stats.decrypt_failures, stats.no_key), (0, len(failures)))
        self.assertEqual(b.of(DecryptFailed), [])  # bob had the old key: nothing lost

    def test_ekt_keys_expire(self) -> None:
        net = Net(self)
        a, b = net.join("alice"), net.join("bob")
        net.md_disconnect(b)  # nobody left to rekey for, but the epoch is stale
        net.kd.take_rekeys()
        short = net.install_epoch(ttl=20)
        self.assertEqual(a.session.epochs_seen, [net.params[1].spi, short.spi])
        net.advance(10.0)
        net.send(a, b"in time")
        net.advance(15.0)
        self.assertTrue(a.session.ready)  # DTLS and consent are fine ...
        # ... but media under an expired EKTKey is refused (RFC 8870 s5.2.2)
        self.assertRaises(NotReady, a.session.send_media, b"late", timestamp=0, now=net.now)

    def test_local_close_makes_a_rekey_due(self) -> None:
        net, _a, _b, c = three(self)
        net.send_from(c, c.session.close(net.now))
        net.run()
        self.assertEqual(c.of(Closed), [Closed("closed locally")])
        self.assertEqual([identity for identity, _ in net.kd.members(CONF)],
                         ["alice@example.org", "bob@example.org"])
        self.assertEqual(net.kd.take_rekeys(), [CONF])
        self.assertEqual(c.session.close(net.now), [])


class AttackTests(unittest.TestCase):
    def setUp(self) -> None:
        self.net, self.a, self.b, self.c = three(self)
        self.net.send(self.a, b"warm-up", keyframe=True)

    def relay(self, wire: bytes, tamper: Callable[[Relay], None]) -> None:
        """The MD opens alice's packet with her hop key, tampers, seals it toward bob."""
        relay = Relay()
        relay.open(wire, self.net.plane.leg(self.a.aid).inbound)  # type: ignore[arg-type]
        tamper(relay)
        self.net.deliver(self.b, relay.seal(self.net.plane.leg(self.b.aid).outbound))  # type: ignore[arg-type]

    def attempt(self, tamper: Callable[[Relay], None], keyframe: bool = False) -> DecryptFailed:
        before = len(self.b.of(MediaReceived))
        wire = self.a.session.send_media(b"secret words", timestamp=0, now=self.net.now,
                                         keyframe=keyframe)
        self.relay(wire, tamper)
        self.assertEqual(len(self.b.of(MediaReceived)), before)
        return self.b.of(DecryptFailed)[-1]

    def test_md_tampering_is_detected_end_to_end(self) -> None:
        def payload_bit(r: Relay) -> None:
            h = header_length(r.packet)
            r.packet = r.packet[:h] + bytes((r.packet[h] ^ 1,)) + r.packet[h + 1:]

        def fake_original_seq(r: Relay) -> None:
            seq = struct.unpack_from("!H", r.packet, 2)[0]
            r.packet = r.packet[:-1] + build_ohb(seq=(seq + 7) & 0xFFFF)

        def fake_original_pt(r: Relay) -> None:
            r.packet = r.packet[:-1] + build_ohb(pt=8)

        def reserved_ohb(r: Relay) -> None:
            r.packet = r.packet[:-1] + b"\xf0"

        def ekt_ciphertext(r: Relay) -> None:
            r.ekt_field = bytes((r.ekt_field[0] ^ 0x40,)) + r.ekt_field[1:]

        def ekt_spi(r: Relay) -> None:
            field = FullEktField.decode(r.ekt_field)
            r.ekt_field = FullEktField(field.ciphertext, 999, field.epoch).encode()

        cases = [(payload_bit, False, "e2e_auth"), (fake_original_seq, False, "e2e_auth"),
                 (fake_original_pt, False, "e2e_auth"), (reserved_ohb, False, "ohb_malformed"),
                 (ekt_ciphertext, True, "ekt_unwrap_failed"), (ekt_spi, True, "ekt_unknown_spi")]
        for tamper, keyframe, reason in cases:
            self.assertEqual(self.attempt(tamper, keyframe), DecryptFailed(self.a.ssrc, reason),
                             tamper.__name__)
        # A rewritten SPI names a key b does not have: indistinguishable from media of an
        # epoch b was never given, it counts as "no key", every other case as a failure.
        stats = self.b.session.stats[self.a.ssrc]
        self.assertEqual((stats.decrypt_failures, stats.no_key), (len(cases) - 1, 1))
        # An honest relay of the next packet still works.
        self.relay(self.a.session.send_media(b"honest", timestamp=0, now=self.net.now),
                   lambda r: None)
        self.assertEqual(self.b.of(MediaReceived)[-1].payload, b"honest")

    def test_md_cannot_replay_through_the_inner_layer(self) -> None:
        wire = self.a.session.send_media(b"once", timestamp=0, now=self.net.now)
        relay = Relay()
        relay.open(wire, self.net.plane.leg(self.a.aid).inbound)  # type: ignore[arg-type]
        self.net.deliver(self.b, relay.seal(self.net.plane.leg(self.b.aid).outbound))  # type: ignore[arg-type]
        # Same inner packet, renumbered outside (the OHB keeps the original SEQ).
        seq = struct.unpack_from("!H", relay.packet, 2)[0]
        relay.edit(seq=(seq + 1000) & 0xFFFF)
        self.net.deliver(self.b, relay.seal(self.net.plane.leg(self.b.aid).outbound))  # type: ignore[arg-type]
        self.assertEqual([m.payload for m in self.b.media_from(self.a)].count(b"once"), 1)
        self.assertEqual(self.b.of(DecryptFailed), [DecryptFailed(self.a.ssrc, "srtp_replay")])

    def test_network_tampering_fails_the_outer_layer(self) -> None:
        def flip(data: bytes, src: Any, dst: Any) -> bytes | None:
            if dst == self.b.address and 128 <= data[0] <= 191:
                return data[:20] + bytes((data[20] ^ 1,)) + data[21:]
            return data

        self.net.filter = flip
        self.net.send(self.a, b"tampered in transit")
        self.assertEqual(self.b.of(DecryptFailed), [DecryptFailed(None, "srtp_auth")])
        self.assertEqual(self.b.session.stats[self.a.ssrc].decrypt_failures, 0)
        # And a replayed datagram is dropped before any key is tried.
        self.net.filter = None
        accepted = [d for d in self.b.inbox if 128 <= d[0] <= 191][-2]
        self.net.deliver(self.b, accepted)
        self.assertEqual(self.b.of(DecryptFailed)[-1], DecryptFailed(None, "srtp_replay"))

    def test_the_md_never_holds_an_inner_key(self) -> None:
        net, a, b, c = self.net, self.a, self.b, self.c
        for i in range(4):
            for p in (a, b, c):
                net.advance(0.05)
                net.send(p, payload(p, i))
        net.md_disconnect(c)
        net.kd.take_rekeys()
        net.install_epoch()
        for i in range(4, 10):
            for p in (a, b):
                net.advance(0.05)
                net.send(p, payload(p, i))
        secrets = set()
        for p in (a, b, c):
            secrets |= set(p.session.audit_secrets())
        for params in net.params.values():
            self.assertIn(params.key, secrets)
            self.assertIn(params.master_salt, secrets)
        self.assertGreater(len(secrets), 20)
        seen_by_md = net.tunnel_log + net.md_datagrams
        self.assertGreater(len(net.tunnel_log), 30)
        for secret in secrets:
            self.assertGreaterEqual(len(secret), 12)
            for blob in seen_by_md:
                self.assertNotIn(secret, blob)
        # The check can see a key: the outer (hop-by-hop) keys do reach the MD.
        self.assertEqual(len(net.media_keys), 3)
        for keys in net.media_keys:
            self.assertTrue(any(keys.client_write_key in blob for blob in net.tunnel_log))
            self.assertTrue(any(keys.server_write_salt in blob for blob in net.tunnel_log))


class RefusalTests(unittest.TestCase):
    def connect(self, raw_kd: dict[str, Any], **options: Any) -> tuple[Net, Participant]:
        net = Net(self, raw_kd=raw_kd)
        p = net.join("alice", **options)
        net.advance(5.0)
        return net, p

    def assertRefused(self, p: Participant, text: str) -> None:
        [refused] = p.of(Refused)
        self.assertIn(text, refused.reason)
        self.assertEqual(p.of(Connected), [])
        self.assertFalse(p.session.ready)
        self.assertRaises(NotReady, p.session.send_media, b"x", timestamp=0, now=T0 + 10)
        self.assertIsNone(p.session.next_timer())
        self.assertEqual(p.session.datagram_received(b"\x80" * 40, T0 + 10), [])
        self.assertEqual(p.session.audit_secrets(), [])

    def test_kd_without_a_double_profile(self) -> None:
        net, p = self.connect({"srtp_profiles": [GCM128], "ekt_ciphers": [EktCipher.AESKW_128]})
        self.assertRefused(p, "DTLS handshake with the KD failed")
        self.assertIsInstance(net.kd.events[-1], ConnectionClosed)
        self.assertFalse([e for e in net.kd.events if isinstance(e, HandshakeComplete)])

    def test_plain_gcm_negotiated_is_refused(self) -> None:
        net, p = self.connect({"srtp_profiles": [GCM128], "ekt_ciphers": [EktCipher.AESKW_128]},
                              profiles=(P128, GCM128))
        self.assertRefused(p, "not DOUBLE")
        [done] = [e for e in net.kd.events if isinstance(e, HandshakeComplete)]
        self.assertEqual(done.srtp_profile, GCM128)
        # the session told the KD it is done (close_notify)
        self.assertIsInstance(net.kd.events[-1], ConnectionClosed)
        self.assertEqual(net.kd.events[-1].reason, "peer sent close_notify")

    def test_kd_without_ekt(self) -> None:
        _net, p = self.connect({"srtp_profiles": [P128], "ekt_ciphers": []})
        self.assertRefused(p, "DTLS handshake with the KD failed")

    def test_no_ekt_negotiated_is_refused(self) -> None:
        _net, p = self.connect({"srtp_profiles": [P128], "ekt_ciphers": []}, ekt_ciphers=())
        self.assertRefused(p, "no EKT")

    def test_close_notify_from_the_kd(self) -> None:
        net, a, b, c = three(self)
        net.send(a, b"before")
        old = b.inbox[-1]
        net.from_kd(net.kd.end_conference(CONF, net.now))
        net.run()
        for p in (a, b, c):
            self.assertEqual(p.of(Closed), [Closed("close_notify from the KD: keys revoked")])
            self.assertFalse(p.session.ready)
            self.assertRaises(NotReady, p.session.send_media, b"x", timestamp=0, now=net.now)
            self.assertRaises(NotReady, p.session.send_rtcp, now=net.now)
            self.assertIsNone(p.session.next_timer())
            self.assertEqual(p.session.handle_timer(net.now + 100), [])
        received = len(b.of(MediaReceived))
        self.assertEqual(b.session.datagram_received(old, net.now), [])
        self.assertEqual(len(b.of(MediaReceived)), received)
        self.assertEqual(b.session.drops["closed"], 1)
        self.assertEqual(b.session.close(net.now), [])


class RobustnessTests(unittest.TestCase):
    def test_arbitrary_datagrams_never_raise(self) -> None:
        net = Net(self)
        a, b = net.join("alice"), net.join("bob")
        for i in range(4):
            net.send(b, payload(b, i), keyframe=i == 0)
        fresh = net.make("carol")
        checking = net.make("dave")
        checking.session.start(net.now)
        real = list(a.inbox)
        self.assertTrue(any(d[0] <= 3 for d in real) and any(20 <= d[0] <= 63 for d in real))
        sessions = (a.session, fresh.session, checking.session)

        def mutate(args: tuple[bytes, int, int]) -> bytes:
            data, index, value = args
            index %= len(data)
            return data[:index] + bytes((value,)) + data[index + 1:]

        datagrams = st.one_of(
            st.binary(max_size=300),
            st.tuples(st.sampled_from([0, 1, 3, 16, 20, 22, 23, 63, 64, 128, 144, 191, 255]),
                      st.binary(max_size=300)).map(lambda t: bytes((t[0],)) + t[1]),
            st.tuples(st.sampled_from(real), st.integers(0, 2000), st.integers(0, 255))
            .map(mutate),
            st.tuples(st.sampled_from(real), st.integers(0, 400)).map(lambda t: t[0][:t[1]]),
            st.sampled_from(real),
        )

        @settings(max_examples=400, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(data=datagrams)
        def check(data: bytes) -> None:
            for session in sessions:
                out = session.datagram_received(data, net.now)
                self.assertIsInstance(out, list)

        check()
        # alice still works after all that
        self.assertTrue(a.session.ready)
        net.send(b, b"after the storm")
        self.assertEqual(a.media_from(b)[-1].payload, b"after the storm")
