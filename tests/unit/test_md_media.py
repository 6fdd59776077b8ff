"""The MD media plane: ICE-lite, DTLS hand-off, HBH relay of SRTP/SRTCP, consent expiry."""

from __future__ import annotations

import os
import random
import socket
import struct
import uuid

from twisted.internet import defer, reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial import unittest

from perc_daemons.md.conferences import MdConferences
from perc_daemons.md.media import MediaPlaneProtocol
from perc_daemons.md.plane import MediaPlane
from perc_daemons.md.service import MediaService
from perc_daemons.protocol import double
from perc_daemons.protocol.double import DoubleReceiver, DoubleSender, split_keying_material
from perc_daemons.protocol.ekt import EktCipher, EktParameterSet, EktReceiver, EktSender
from perc_daemons.protocol.errors import ProtocolError
from perc_daemons.protocol.rtp import (
    RtcpPacket,
    RtpPacket,
    SenderInfo,
    build_compound,
    sender_report,
)
from perc_daemons.protocol.srtp import LAYER_KEY_LENGTH, Profile
from perc_daemons.protocol.stun import (
    ATTR_ICE_CONTROLLING,
    ATTR_PRIORITY,
    ATTR_USERNAME,
    ATTR_XOR_MAPPED_ADDRESS,
    BINDING_ERROR,
    BINDING_REQUEST,
    BINDING_SUCCESS,
    StunMessage,
    check_fingerprint,
    check_integrity,
    decode_xor_mapped_address,
)
from perc_daemons.protocol.tunnel import MediaKeys

P128 = Profile.DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM
P256 = Profile.DOUBLE_AEAD_AES_256_GCM_AEAD_AES_256_GCM


def binding_request(md_ufrag: str, ep_ufrag: str, pwd: str, tid: bytes | None = None) -> bytes:
    tid = tid or os.urandom(12)
    message = StunMessage(BINDING_REQUEST, tid, [
        (ATTR_USERNAME, f"{md_ufrag}:{ep_ufrag}".encode()),
        (ATTR_PRIORITY, struct.pack("!I", 0x6E001EFF)),
        (ATTR_ICE_CONTROLLING, os.urandom(8)),
    ])
    return message.encode(integrity_key=pwd.encode())


def rtcp_rr(ssrc: int, n: int) -> bytes:
    block = struct.pack("!IIIIII", 0xB0B0B0B0, n, 1000 + n, 3, 4, 5)
    return struct.pack("!BBHI", 0x81, 201, 7, ssrc) + block


class Endpoint:
    """One endpoint: its DTLS-SRTP keys with the KD, an address, its send/receive sides."""

    def __init__(self, name: str, rng: random.Random, params: EktParameterSet,
                 address: tuple[str, int], profile: Profile = P128) -> None:
        self.name = name
        self.profile = profile
        self.keys = split_keying_material(profile,
                                          rng.randbytes(double.exporter_length(profile)))
        self.address = address
        self.md_ufrag, self.md_pwd = f"md{name}", f"pwd-{name}-0123456789abcdef"
        self.ufrag = f"ep{name}"
        self.ssrc = rng.getrandbits(32)
        key_length = LAYER_KEY_LENGTH[profile]
        ekt_sender = EktSender(self.ssrc, key_length, params, 0.0, random_bytes=rng.randbytes)
        self.sender = DoubleSender(self.keys.client_outer.context(), ekt_sender)
        ekt = EktReceiver(key_length)
        ekt.add_parameter_set(params, 0.0)
        self.receiver = DoubleReceiver(self.keys.server_outer.context(), ekt)
        self.rtcp_out = self.keys.client_outer.context()
        self.rtcp_in = self.keys.server_outer.context()

    def media_keys(self) -> MediaKeys:
        """What the KD sends the MD: outer halves only (RFC 9185, RFC 8723)."""
        k = self.keys
        return MediaKeys(uuid.uuid4().bytes, int(self.profile), b"",
                         k.client_outer.key, k.server_outer.key,
                         k.client_outer.salt, k.server_outer.salt)

    def stun(self, tid: bytes | None = None, pwd: str | None = None) -> bytes:
        return binding_request(self.md_ufrag, self.ufrag, pwd or self.md_pwd, tid)

    def rtp(self, seq: int, payload: bytes) -> bytes:
        return RtpPacket.parse(struct.pack("!BBHII", 0x80, 111, seq, seq * 960, self.ssrc)
                               + payload).serialize()


class Fixture:
    def __init__(self, names: str = "abc", seed: int = 1,
                 groups: dict[str, str] | None = None, profile: Profile = P128) -> None:
        self.rng = random.Random(seed)
        wide = profile == P256
        self.params = EktParameterSet(
            key=self.rng.randbytes(32 if wide else 16),
            cipher=EktCipher.AESKW_256 if wide else EktCipher.AESKW_128,
            master_salt=self.rng.randbytes(12), spi=7, ttl=600)
        self.dtls: list[tuple[object, bytes]] = []
        self.plane = MediaPlane(on_dtls=lambda leg, data: self.dtls.append((leg, data)))
        self.eps = {}
        for i, name in enumerate(names):
            ep = Endpoint(name, self.rng, self.params, ("192.0.2.1", 40000 + i), profile)
            self.eps[name] = ep
            self.plane.add_leg(name, ep.md_ufrag, ep.md_pwd,
                               group=(groups or {}).get(name))

    def connect(self, now: float = 0.0) -> None:
        for name, ep in self.eps.items():
            out = self.plane.datagram_received(ep.stun(), ep.address, now)
            assert len(out) == 1 and out[0][1] == ep.address
            assert out[0][0][:2] == struct.pack("!H", BINDING_SUCCESS)
            self.plane.install_keys(name, ep.media_keys())


class StunTests(unittest.TestCase):
    def test_check_answered_with_mapped_address_and_integrity(self) -> None:
        f = Fixture()
        a = f.eps["a"]
        tid = os.urandom(12)
        out = f.plane.datagram_received(a.stun(tid), a.address, 5.0)
        self.assertEqual(len(out), 1)
        response, to = out[0]
        self.assertEqual(to, a.address)
        message = StunMessage.parse(response)
        self.assertEqual((message.message_type, message.transaction_id), (BINDING_SUCCESS, tid))
        self.assertEqual(decode_xor_mapped_address(message.get(ATTR_XOR_MAPPED_ADDRESS), tid),
                         a.address)
        self.assertTrue(check_integrity(response, a.md_pwd.encode()))
        self.assertFalse(check_integrity(response, f.eps["b"].md_pwd.encode()))
        self.assertTrue(check_fingerprint(response))
        leg = f.plane.leg("a")
        self.assertEqual((leg.address, leg.last_consent, leg.counters["stun_in"]),
                         (a.address, 5.0, 1))

    def test_wrong_password_gets_401_and_no_binding(self) -> None:
        f = Fixture()
        a = f.eps["a"]
        out = f.plane.datagram_received(a.stun(pwd="not-the-password"), a.address, 1.0)
        self.assertEqual(len(out), 1)
        self.assertEqual(StunMessage.parse(out[0][0]).message_type, BINDING_ERROR)
        leg = f.plane.leg("a")
        self.assertIsNone(leg.address)
        self.assertEqual(leg.drops["stun_rejected"], 1)

    def test_unknown_ufrag_and_junk_stun_dropped(self) -> None:
        f = Fixture()
        a = f.eps["a"]
        self.assertEqual(f.plane.datagram_received(
            binding_request("nobody", "x", a.md_pwd), a.address, 0.0), [])
        self.assertEqual(f.plane.drops["unknown_ufrag"], 1)
        self.assertEqual(f.plane.datagram_received(b"\x00\x01\x00\x00junk", a.address, 0.0), [])
        self.assertEqual(f.plane.drops["stun_malformed"], 1)


class RelayTests(unittest.TestCase):
    def setUp(self) -> None:
        self.f = Fixture()
        self.f.connect()
        self.a, self.b, self.c = (self.f.eps[n] for n in "abc")

    def test_rtp_relayed_to_each_other_leg(self) -> None:
        for i in range(5):
            original = self.a.rtp(100 + i, self.f.rng.randbytes(300))
            wire = self.a.sender.protect(original, i * 0.02)
            out = self.f.plane.datagram_received(wire, self.a.address, 1.0)
            self.assertEqual(sorted(to for _, to in out), sorted([self.b.address,
                                                                   self.c.address]))
            for data, to in out:
                receiver = self.b if to == self.b.address else self.c
                got = receiver.receiver.unprotect(data, i * 0.02)
                self.assertEqual(got.packet, original)
                self.assertNotIn(original[12:], data)
        self.assertEqual(self.f.plane.leg("a").counters["rtp_in"], 5)
        self.assertEqual(self.f.plane.leg("b").counters["rtp_out"], 5)

    def test_selective_forwarding_hook(self) -> None:
        seen = []

        def only_b(src, dst, ssrc):
            seen.append((src, dst, ssrc))
            return dst == "b"
        self.f.plane.should_forward = only_b
        wire = self.a.sender.protect(self.a.rtp(1, b"x" * 50), 0.0)
        out = self.f.plane.datagram_received(wire, self.a.address, 0.0)
        self.assertEqual([to for _, to in out], [self.b.address])
        self.assertEqual(sorted(seen), [("a", "b", self.a.ssrc), ("a", "c", self.a.ssrc)])

    def test_rtcp_relayed_hop_by_hop(self) -> None:
        rr = rtcp_rr(self.a.ssrc, 1)
        out = self.f.plane.datagram_received(self.a.rtcp_out.protect_rtcp(rr),
                                             self.a.address, 0.0)
        self.assertEqual(len(out), 2)
        for data, to in out:
            receiver = self.b if to == self.b.address else self.c
            self.assertEqual(receiver.rtcp_in.unprotect_rtcp(data), rr)
        self.assertEqual(self.f.plane.leg("a").counters["rtcp_in"], 1)

    def test_rtcp_feedback_compound_passes_through(self) -> None:
        """SR, then RTPFB NACK, PSFB PLI and FIR (RFC 4585, RFC 5104) in one compound."""
        media = self.b.ssrc
        sr = sender_report(self.a.ssrc, SenderInfo(0x1122334455667788, 1234, 10, 1600))
        nack = RtcpPacket(205, struct.pack("!IIHH", self.a.ssrc, media, 100, 0b101), count=1)
        pli = RtcpPacket(206, struct.pack("!II", self.a.ssrc, media), count=1)
        fir = RtcpPacket(206, struct.pack("!IIIB3x", self.a.ssrc, 0, media, 7), count=4)
        compound = build_compound([sr, nack, pli, fir])
        out = self.f.plane.datagram_received(self.a.rtcp_out.protect_rtcp(compound),
                                             self.a.address, 0.0)
        self.assertEqual(len(out), 2)
        for data, to in out:
            receiver = self.b if to == self.b.address else self.c
            self.assertEqual(receiver.rtcp_in.unprotect_rtcp(data), compound)

    def assertDropped(self, data: bytes, address, where: dict, reason: str) -> None:
        before = where[reason]
        self.assertEqual(self.f.plane.datagram_received(data, address, 0.0), [])
        self.assertEqual(where[reason], before + 1)

    def test_bad_tag_replay_junk_unknown_address(self) -> None:
        drops = self.f.plane.leg("a").drops
        wire = bytearray(self.a.sender.protect(self.a.rtp(7, b"y" * 80), 0.0))
        bad = bytes(wire[:30]) + bytes((wire[30] ^ 1,)) + bytes(wire[31:])
        self.assertDropped(bad, self.a.address, drops, "srtp_auth")
        self.assertDropped(bytes(wire), ("192.0.2.99", 5), self.f.plane.drops,
                           "unknown_address")
        self.assertEqual(len(self.f.plane.datagram_received(bytes(wire), self.a.address, 0)), 2)
        self.assertDropped(bytes(wire), self.a.address, drops, "srtp_replay")
        self.assertDropped(b"\x90\x00" + bytes(range(200, 239)) + b"\x00", self.a.address, drops,
                           "srtp_malformed")
        self.assertDropped(b"\x80\x01\x00", self.a.address, drops, "srtp_malformed")
        self.assertDropped(b"\x80\x60\x00\x01\xff", self.a.address, drops, "ekt_malformed")
        self.assertDropped(b"\x42hello", self.a.address, drops, "unknown_kind")
        self.assertDropped(b"", self.a.address, self.f.plane.drops, "empty")
        rr = bytearray(self.a.rtcp_out.protect_rtcp(rtcp_rr(self.a.ssrc, 2)))
        rr[10] ^= 0x80
        self.assertDropped(bytes(rr), self.a.address, drops, "srtp_auth")
        self.assertEqual(self.f.plane.leg("a").counters["rtp_in"], 1)

    def test_unkeyed_leg_dropped(self) -> None:
        f = Fixture("ab")
        a = f.eps["a"]
        f.plane.datagram_received(a.stun(), a.address, 0.0)
        wire = a.sender.protect(a.rtp(1, b"z" * 20), 0.0)
        self.assertEqual(f.plane.datagram_received(wire, a.address, 0.0), [])
        self.assertEqual(f.plane.leg("a").drops["not_keyed"], 1)

    def test_removed_leg_neither_sends_nor_receives(self) -> None:
        self.f.plane.remove_leg("c")
        wire = self.a.sender.protect(self.a.rtp(1, b"q" * 20), 0.0)
        out = self.f.plane.datagram_received(wire, self.a.address, 0.0)
        self.assertEqual([to for _, to in out], [self.b.address])
        self.assertEqual(self.f.plane.datagram_received(self.c.sender.protect(
            self.c.rtp(1, b"q"), 0.0), self.c.address, 0.0), [])
        self.assertEqual(self.f.plane.drops["unknown_address"], 1)

    def test_non_double_media_keys_refused(self) -> None:
        mk = self.a.media_keys()
        single = MediaKeys(mk.association_id, int(Profile.AEAD_AES_128_GCM), b"",
                           mk.client_write_key, mk.server_write_key,
                           mk.client_write_salt, mk.server_write_salt)
        self.assertRaises(ValueError, self.f.plane.install_keys, "a", single)


class GroupTests(unittest.TestCase):
    """Legs forward only within their group (conference) on the shared port."""

    def setUp(self) -> None:
        self.f = Fixture("abcde", groups={"a": "c1", "b": "c1", "c": "c1",
                                          "d": "c2", "e": "c2"})
        self.f.connect()

    def relay(self, name: str, seq: int = 1) -> list:
        ep = self.f.eps[name]
        wire = ep.sender.protect(ep.rtp(seq, b"g" * 40), 0.0)
        return sorted(to for _, to in self.f.plane.datagram_received(wire, ep.address, 0.0))

    def addresses(self, names: str) -> list:
        return sorted(self.f.eps[n].address for n in names)

    def test_two_groups_isolated(self) -> None:
        self.assertEqual(self.relay("a"), self.addresses("bc"))
        self.assertEqual(self.relay("d"), self.addresses("e"))
        e = self.f.eps["e"]
        out = self.f.plane.datagram_received(
            e.rtcp_out.protect_rtcp(rtcp_rr(e.ssrc, 1)), e.address, 0.0)
        self.assertEqual([to for _, to in out], [self.f.eps["d"].address])
        self.assertEqual(self.f.plane.leg("c").counters["rtp_out"], 1)
        self.assertEqual(self.f.plane.leg("d").counters["rtp_out"], 0)
        self.assertEqual(sorted(self.f.plane.groups()), ["c1", "c2"])

    def test_peers_follow_membership_keys_and_addresses(self) -> None:
        plane = self.f.plane
        self.assertEqual({leg.leg_id for leg in plane.leg("a").peers}, {"b", "c"})
        plane.remove_leg("b")
        self.assertEqual({leg.leg_id for leg in plane.leg("a").peers}, {"c"})
        self.assertEqual(self.relay("a", 2), self.addresses("c"))
        # A new leg of c2 counts once keyed and addressed, not before.
        f = Fixture("x", seed=9)
        x = f.eps["x"]
        plane.add_leg("x", x.md_ufrag, x.md_pwd, group="c2")
        self.assertEqual({leg.leg_id for leg in plane.leg("d").peers}, {"e"})
        x.address = ("192.0.2.7", 5000)
        plane.datagram_received(x.stun(), x.address, 0.0)
        self.assertEqual({leg.leg_id for leg in plane.leg("d").peers}, {"e"})
        plane.install_keys("x", x.media_keys())
        self.assertEqual({leg.leg_id for leg in plane.leg("d").peers}, {"e", "x"})
        self.assertEqual({leg.leg_id for leg in plane.leg("x").peers}, {"d", "e"})
        self.assertEqual(self.relay("d", 3), sorted([self.f.eps["e"].address, x.address]))
        # The last leg of a group gone: the group is forgotten.
        for name in ("d", "e", "x"):
            plane.remove_leg(name)
        self.assertEqual(sorted(plane.groups()), ["c1"])

    def test_address_taken_over_by_another_group(self) -> None:
        plane = self.f.plane
        e = self.f.eps["e"]
        # Leg a (c1) authenticates from e's address: e (c2) loses it, and d stops sending to it.
        plane.datagram_received(self.f.eps["a"].stun(), e.address, 0.0)
        self.assertIsNone(plane.leg("e").address)
        self.assertEqual(plane.leg("d").peers, ())
        self.assertEqual(self.relay("d"), [])


class DtlsAndConsentTests(unittest.TestCase):
    def test_dtls_to_tunnel_and_back(self) -> None:
        f = Fixture()
        f.connect()
        record = b"\x16\xfe\xfd" + os.urandom(30)
        self.assertEqual(f.plane.datagram_received(record, f.eps["b"].address, 0.0), [])
        self.assertEqual(f.dtls, [("b", record)])
        self.assertEqual(f.plane.datagram_received(record, ("192.0.2.50", 1), 0.0), [])
        self.assertEqual(len(f.dtls), 1)
        self.assertEqual(f.plane.send_dtls("c", b"\x16reply"), [(b"\x16reply",
                                                                 f.eps["c"].address)])

    def test_send_dtls_before_address_known(self) -> None:
        f = Fixture("a")
        self.assertEqual(f.plane.send_dtls("a", b"\x16x"), [])
        self.assertEqual(f.plane.leg("a").drops["no_address"], 1)

    def test_expire_removes_silent_keeps_refreshed(self) -> None:
        f = Fixture()
        f.connect(now=0.0)
        a = f.eps["a"]
        self.assertEqual(f.plane.expire(20.0), [])
        f.plane.datagram_received(a.stun(), a.address, 25.0)
        self.assertEqual(sorted(f.plane.expire(30.0)), ["b", "c"])
        self.assertEqual([leg.leg_id for leg in f.plane.legs()], ["a"])
        self.assertEqual(f.plane.expire(54.9), [])
        self.assertEqual(f.plane.expire(55.0), ["a"])

    def test_leg_never_checked_expires_after_timeout_from_first_pass(self) -> None:
        f = Fixture("a")
        self.assertEqual(f.plane.expire(100.0, consent_timeout=5.0), [])
        self.assertEqual(f.plane.expire(104.0, consent_timeout=5.0), [])
        self.assertEqual(f.plane.expire(105.0, consent_timeout=5.0), ["a"])


class Collector(DatagramProtocol):
    def __init__(self) -> None:
        self.waiting: list[defer.Deferred] = []
        self.received: list[bytes] = []

    def datagramReceived(self, datagram, addr) -> None:
        self.received.append(datagram)
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            d.callback(datagram)

    def next(self) -> defer.Deferred:
        d = defer.Deferred()
        self.waiting.append(d)
        return d.addTimeout(5, reactor)


class UdpTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_real_sockets(self) -> None:
        rng = random.Random(5)
        params = EktParameterSet(key=rng.randbytes(16), cipher=EktCipher.AESKW_128,
                                 master_salt=rng.randbytes(12), spi=1, ttl=600)
        expired = []
        plane = MediaPlane()
        protocol = MediaPlaneProtocol(plane, reactor, expire_interval=0.05,
                                      consent_timeout=30.0, on_expired=expired.append)
        port = reactor.listenUDP(0, protocol, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        md = ("127.0.0.1", port.getHost().port)
        eps, sockets = {}, {}
        for name in "ab":
            collector = Collector()
            sock = reactor.listenUDP(0, collector, interface="127.0.0.1")
            self.addCleanup(sock.stopListening)
            ep = Endpoint(name, rng, params, ("127.0.0.1", sock.getHost().port))
            eps[name], sockets[name] = ep, (sock, collector)
            plane.add_leg(name, ep.md_ufrag, ep.md_pwd)
            tid = os.urandom(12)
            waiting = collector.next()
            sock.write(ep.stun(tid), md)
            response = yield waiting
            self.assertEqual(StunMessage.parse(response).message_type, BINDING_SUCCESS)
            self.assertEqual(decode_xor_mapped_address(
                StunMessage.parse(response).get(ATTR_XOR_MAPPED_ADDRESS), tid), ep.address)
            plane.install_keys(name, ep.media_keys())
        a, b = eps["a"], eps["b"]
        original = a.rtp(9, b"over real udp" * 10)
        waiting = sockets["b"][1].next()
        sockets["a"][0].write(a.sender.protect(original, 0.0), md)
        data = yield waiting
        self.assertEqual(b.receiver.unprotect(data, 0.0).packet, original)
        waiting = sockets["b"][1].next()
        protocol.send_dtls("b", b"\x16dtls-from-kd")
        self.assertEqual((yield waiting), b"\x16dtls-from-kd")
        self.assertEqual(sockets["a"][1].received[1:], [])  # A got only its STUN answer
        # The LoopingCall runs: with a zero timeout every leg lapses.
        protocol.consent_timeout = 0.0
        d = defer.Deferred()
        reactor.callLater(0.3, d.callback, None)
        yield d
        self.assertEqual(sorted(leg for batch in expired for leg in batch), ["a", "b"])
        self.assertEqual(plane.legs(), [])


class SelectiveForwardingTests(unittest.TestCase):
    """Packets kept from one receiver: its SEQ is renumbered, the original in the OHB."""

    def setUp(self) -> None:
        self.f = Fixture()
        self.f.connect()
        self.a, self.b, self.c = (self.f.eps[n] for n in "abc")

    def test_gap_hidden_by_seq_rewrite_recorded_in_ohb(self) -> None:
        # keep every third packet of a's from b; c gets everything unchanged
        self.f.plane.should_forward = lambda src, dst, ssrc: not (
            dst == "b" and self.sent % 3 == 2)
        seqs_b = []
        for self.sent in range(12):
            original = self.a.rtp(1000 + self.sent, self.f.rng.randbytes(100))
            wire = self.a.sender.protect(original, self.sent * 0.02)
            out = dict((to, data) for data, to in
                       self.f.plane.datagram_received(wire, self.a.address, 1.0))
            self.assertIn(self.c.address, out)
            got_c = self.c.receiver.unprotect(out[self.c.address], self.sent * 0.02)
            self.assertEqual(got_c.packet, original)
            if self.sent % 3 == 2:
                self.assertNotIn(self.b.address, out)
                continue
            data = out[self.b.address]
            seqs_b.append(int.from_bytes(data[2:4], "big"))  # the SEQ b's jitter buffer sees
            got_b = self.b.receiver.unprotect(data, self.sent * 0.02)
            self.assertEqual(got_b.packet, original)  # original SEQ restored from the OHB
        self.assertEqual(seqs_b, list(range(1000, 1000 + len(seqs_b))))
        self.assertEqual(self.f.plane.leg("b").skipped, {self.a.ssrc: 4})
        self.assertEqual(self.f.plane.leg("c").skipped, {})

    def test_a_senders_gaps_go_with_it(self) -> None:
        self.f.plane.should_forward = lambda src, dst, ssrc: dst != "b"
        for name in "ac":
            ep = self.f.eps[name]
            self.f.plane.datagram_received(ep.sender.protect(ep.rtp(1, b"g" * 10), 0.0),
                                           ep.address, 0.0)
        self.assertEqual(self.f.plane.leg("b").skipped, {self.a.ssrc: 1, self.c.ssrc: 1})
        self.f.plane.remove_leg("a")
        self.assertEqual(self.f.plane.leg("b").skipped, {self.c.ssrc: 1})


# Payload sizes for the size sweeps: every size across pylibsrtp's 1500-byte buffer limits
# (protect refused above 1356 bytes, unprotect above 1500), coarser steps from the
# smallest packet to beyond a 9000-byte jumbo frame, and on to the largest IPv4 datagram.
SWEEP = sorted({*range(0, 1280, 37), *range(1280, 1620), *range(1620, 9300, 53),
                *range(9300, 65400, 4099), *range(65440, 65470)})
MAX_IPV4_DATAGRAM = 65507  # 65535 - 20 (IPv4 header) - 8 (UDP header)


def app_packet(ssrc: int, data: bytes) -> bytes:
    """An RTCP APP packet (RFC 3550 s6.7) carrying ``data`` (a multiple of 4 bytes)."""
    return struct.pack("!BBHI4s", 0x80, 204, 2 + len(data) // 4, ssrc, b"PERC") + data


class LargePacketTests(unittest.TestCase):
    """Every SRTP/SRTCP datagram a UDP socket can deliver is relayed (issue 10, item 9).

    pylibsrtp copies packets into a fixed 1500-byte buffer; the relay must still take
    MTU-sized and jumbo-frame packets, through the same libsrtp sessions, byte for byte
    what our own SRTP layer (:class:`~perc_daemons.protocol.srtp.SrtpContext`) produces.
    """

    def sweep_rtp(self, profile: Profile) -> None:
        f = Fixture(profile=profile, seed=int(profile))
        f.connect()
        a, b, c = (f.eps[n] for n in "abc")
        # What the MD should produce, computed with our own layer code.
        from_a = a.keys.client_outer.context()
        to = {b.address: b.keys.server_outer.context(), c.address: c.keys.server_outer.context()}
        # c misses every seventh packet (selective forwarding): its copies are renumbered,
        # the original SEQ recorded in the OHB, two bytes longer than b's.
        f.plane.should_forward = lambda src, dst, ssrc: not (dst == "c" and seq % 7 == 3)
        gap = 0
        for seq, size in enumerate(SWEEP):
            original = a.rtp(seq, f.rng.randbytes(size))
            wire = a.sender.protect(original, seq * 0.02)
            if len(wire) > MAX_IPV4_DATAGRAM - 2:  # c's renumbered copy must fit too
                break
            largest = len(wire)
            out = dict((address, data) for data, address in
                       f.plane.datagram_received(wire, a.address, seq * 0.02))
            end = len(wire) - double.ekt_field_length(wire)
            plain = from_a.unprotect(wire[:end])
            expected = {b.address: to[b.address].protect(plain) + wire[end:]}
            if seq % 7 == 3:
                gap += 1
            else:
                edited = double.Relay()
                edited.packet = plain
                if gap:
                    edited.edit(seq=(seq - gap) & 0xFFFF)
                expected[c.address] = to[c.address].protect(edited.packet) + wire[end:]
            self.assertEqual(out, expected, f"{len(wire)}-byte datagram")
            for receiver in (b, c):
                if receiver.address in out:
                    got = receiver.receiver.unprotect(out[receiver.address], seq * 0.02)
                    self.assertEqual(got.packet, original)
        self.assertGreater(largest, MAX_IPV4_DATAGRAM - 100)
        self.assertEqual(f.plane.leg("a").counters["rtp_in"], seq)
        self.assertEqual(sum(sum(f.plane.leg(n).drops.values()) for n in "abc"), 0)

    def test_rtp_of_every_size_relayed_byte_identical_128(self) -> None:
        self.sweep_rtp(P128)

    def test_rtp_of_every_size_relayed_byte_identical_256(self) -> None:
        self.sweep_rtp(P256)

    def sweep_rtcp(self, profile: Profile) -> None:
        f = Fixture(profile=profile, seed=int(profile))
        f.connect()
        a, b, c = (f.eps[n] for n in "abc")
        to = {b.address: b.keys.server_outer.context(), c.address: c.keys.server_outer.context()}
        for size in SWEEP:
            rtcp = app_packet(a.ssrc, f.rng.randbytes(size & ~3))
            wire = a.rtcp_out.protect_rtcp(rtcp)
            if len(wire) > MAX_IPV4_DATAGRAM:
                break
            out = dict((address, data) for data, address in
                       f.plane.datagram_received(wire, a.address, 0.0))
            self.assertEqual(out, {address: context.protect_rtcp(rtcp)
                                   for address, context in to.items()}, f"{len(wire)} bytes")
            self.assertEqual(b.rtcp_in.unprotect_rtcp(out[b.address]), rtcp)
        self.assertEqual(f.plane.leg("a").counters["rtcp_in"], f.plane.leg("c").counters[
            "rtcp_out"])
        self.assertGreater(f.plane.leg("c").counters["rtcp_out"], len(SWEEP) - 5)

    def test_rtcp_of_every_size_relayed_byte_identical_128(self) -> None:
        self.sweep_rtcp(P128)

    def test_rtcp_of_every_size_relayed_byte_identical_256(self) -> None:
        self.sweep_rtcp(P256)

    def test_junk_of_any_size_is_counted_never_raised(self) -> None:
        """A sender (or a spoofer of its address) sends garbage up to the largest datagram."""
        f = Fixture()
        f.connect()
        a = f.eps["a"]
        drops = f.plane.leg("a").drops
        for size in (*SWEEP, 65535):
            for first in (b"\x80\x60", b"\x80\xc8"):  # RTP, RTCP
                junk = first + f.rng.randbytes(size) + b"\x00"
                self.assertEqual(f.plane.datagram_received(junk, a.address, 0.0), [])
        self.assertEqual(sum(drops.values()), 2 * (len(SWEEP) + 1))
        relay = double.Relay()
        self.assertRaises(ProtocolError, relay.open, b"\x80" * 70_000 + b"\x00",
                          f.plane.leg("a").inbound)
        relay.packet = a.rtp(1, bytes(70_000))
        self.assertRaises(ProtocolError, relay.seal, f.plane.leg("b").outbound)

    @defer.inlineCallbacks
    def test_jumbo_datagrams_over_the_md_media_port(self) -> None:
        """The daemon's media port (MediaService) reads any datagram whole, and a datagram
        the socket refuses toward one receiver still reaches the others."""
        rng = random.Random(9000)
        params = EktParameterSet(key=rng.randbytes(16), cipher=EktCipher.AESKW_128,
                                 master_salt=rng.randbytes(12), spi=1, ttl=600)
        plane = MediaPlane()
        protocol = MediaPlaneProtocol(plane, reactor)
        service = MediaService(reactor, "127.0.0.1", 0, protocol,
                               MdConferences(plane, reactor, media_host="127.0.0.1"))
        service.startService()
        self.addCleanup(service.stopService)
        md = ("127.0.0.1", service.port.getHost().port)
        eps, sockets = {}, {}
        for name in "abc":
            collector = Collector()
            sock = reactor.listenUDP(0, collector, interface="127.0.0.1", maxPacketSize=65535)
            self.addCleanup(sock.stopListening)
            ep = Endpoint(name, rng, params, ("127.0.0.1", sock.getHost().port))
            eps[name], sockets[name] = ep, (sock, collector)
            plane.add_leg(name, ep.md_ufrag, ep.md_pwd)
            waiting = collector.next()
            sock.write(ep.stun(), md)
            yield waiting
            plane.install_keys(name, ep.media_keys())
        a, b, c = (eps[n] for n in "abc")

        def send(seq: int, size: int) -> tuple[bytes, bytes, defer.Deferred]:
            original = a.rtp(seq, rng.randbytes(size))
            wire = a.sender.protect(original, seq * 0.02, keyframe=True)  # a FullEKTField
            waiting = sockets["c"][1].next()
            sockets["a"][0].write(wire, md)
            return original, wire, waiting

        # A jumbo frame's worth of media (beyond Twisted's default 8192-byte reads).
        original, wire, waiting = send(1, 9000)
        self.assertEqual(c.receiver.unprotect((yield waiting), 0.02).packet, original)
        self.assertEqual(b.receiver.unprotect(sockets["b"][1].received[-1], 0.02).packet,
                         original)
        # b misses one packet: its next copy is renumbered and two bytes longer...
        plane.should_forward = lambda src, dst, ssrc: dst != "b"
        _, _, waiting = send(2, 100)
        yield waiting
        plane.should_forward = lambda src, dst, ssrc: True
        # ... so a largest IPv4 datagram, relayed, is too large for b's copy only.
        size = MAX_IPV4_DATAGRAM - (len(wire) - 9000)
        original, wire, waiting = send(3, size)
        self.assertEqual(len(wire), MAX_IPV4_DATAGRAM)
        data = yield waiting
        self.assertEqual(len(data), MAX_IPV4_DATAGRAM)
        self.assertEqual(c.receiver.unprotect(data, 0.06).packet, original)
        self.assertEqual(plane.leg("b").drops["send_failed"], 1)
        self.assertEqual(plane.leg("b").counters["rtp_out"], 2)

    def test_media_port_receive_buffer(self) -> None:
        """[media] receive_buffer sizes the port's SO_RCVBUF (0: the kernel's default); a
        size the kernel caps (net.core.rmem_max) is logged as a warning."""
        with open("/proc/sys/net/core/rmem_max") as f:
            rmem_max = int(f.read())
        with open("/proc/sys/net/core/rmem_default") as f:
            rmem_default = int(f.read())
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for wanted in (0, min(1 << 20, rmem_max), rmem_max + 4096):
            del events[:]
            plane = MediaPlane()
            service = MediaService(reactor, "127.0.0.1", 0, MediaPlaneProtocol(plane, reactor),
                                   MdConferences(plane, reactor, media_host="127.0.0.1"),
                                   receive_buffer=wanted)
            service.startService()
            try:
                got = service.port.socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            finally:
                service.stopService()
            # Linux keeps twice the size set (its bookkeeping), capped at rmem_max
            self.assertEqual(got, rmem_default if not wanted else 2 * min(wanted, rmem_max))
            warned = [e for e in events if e.get("log_level") == LogLevel.warn
                      and "receive_buffer" in e.get("log_format", "")]
            self.assertEqual(len(warned), int(wanted > rmem_max), wanted)
            listening = [e for e in events if "media (UDP) listening" in e.get("log_format", "")]
            self.assertEqual([e["got"] for e in listening], [got // 2 if wanted else got])
