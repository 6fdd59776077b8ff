"""Cascade links (perc_daemons.protocol.cascade): two MDs' CascadeLinks on a simulated network.

:class:`LinkNet` moves datagrams between the two ends (each at its own
address), with seeded loss, a black hole, and a fake clock that jumps to the
earliest timer.  Real DTLS (our engine on both sides), real STUN, real SRTP
with the keys of LinkUp.  OpenSSL as the peer is in tests/interop/test_cascade_openssl.py.
"""

from __future__ import annotations

import itertools
import random
import struct
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from perc_daemons.protocol.cascade import (
    ATTR_ASSOCIATION_TAG,
    ATTR_CHANNEL_NUMBER,
    CLIENT,
    CONNECTING,
    DOWN,
    LINK_PROFILE_FOR,
    SERVER,
    UP,
    CascadeLink,
    LinkDown,
    LinkTiming,
    LinkUp,
    split_link_keys,
)
from perc_daemons.protocol.dtls import (
    DtlsConfiguration,
    DtlsConnection,
    Role,
    certificate_fingerprint,
    generate_certificate,
)
from perc_daemons.protocol.dtls.handshake import encode_alert
from perc_daemons.protocol.dtls.record import ContentType, encode_record
from perc_daemons.protocol.rtp import RtpPacket
from perc_daemons.protocol.srtp import Profile, SrtpContext, libsrtp_session
from perc_daemons.protocol.stun import (
    ATTR_ICE_CONTROLLING,
    ATTR_PRIORITY,
    ATTR_USERNAME,
    BINDING_REQUEST,
    BINDING_SUCCESS,
    StunMessage,
    check_integrity,
)

MD_A = generate_certificate("md-a")
MD_B = generate_certificate("md-b")
INTRUDER = generate_certificate("intruder")
FP_A, FP_B, FP_X = (certificate_fingerprint(c) for c, _ in (MD_A, MD_B, INTRUDER))
ADDR_A = ("192.0.2.10", 40000)
ADDR_B = ("198.51.100.20", 40000)
ELSEWHERE = ("203.0.113.66", 40000)
GCM128, GCM256 = Profile.AEAD_AES_128_GCM, Profile.AEAD_AES_256_GCM
FAST = LinkTiming(consent_interval=1.0, consent_timeout=6.0, check_interval=0.25,
                  handshake_timeout=5.0, backoff_min=0.5, backoff_max=4.0, rekey_interval=None)


def make_link(role: str, *, seed: int = 0, profile: int = GCM128, timing: LinkTiming = FAST,
              cert: tuple[bytes, Any] | None = None, pin: bytes | None = None,
              ufrags: tuple[str, str] | None = None, pwds: tuple[str, str] | None = None,
              channel: int | None = None, now: float = 0.0,
              peer_address: tuple[str, int] | None = ADDR_B) -> CascadeLink:
    """MD A is the client (asked to open the link), MD B the server."""
    ours, theirs = ("mdA", "mdB") if role == CLIENT else ("mdB", "mdA")
    pwd_a, pwd_b = "pwd-of-md-a-0123456789", "pwd-of-md-b-0123456789"
    local_pwd, remote_pwd = (pwd_a, pwd_b) if role == CLIENT else (pwd_b, pwd_a)
    if ufrags:
        ours, theirs = ufrags
    if pwds:
        local_pwd, remote_pwd = pwds
    certificate, key = cert or (MD_A if role == CLIENT else MD_B)
    return CascadeLink(
        role, local_ufrag=ours, local_pwd=local_pwd, remote_ufrag=theirs,
        remote_pwd=remote_pwd, certificate=certificate, private_key=key,
        peer_fingerprint=pin or (FP_B if role == CLIENT else FP_A), profile=profile,
        local_channel=channel or (0x4A01 if role == CLIENT else 0x4B02), now=now,
        peer_address=peer_address if role == CLIENT else None, timing=timing,
        rng=random.Random(seed))


Filter = Callable[[CascadeLink, bytes], bool]


class LinkNet:
    """Two link ends at ADDR_A / ADDR_B, datagrams delivered at once unless lost."""

    def __init__(self, client: CascadeLink, server: CascadeLink, *, seed: int = 0,
                 loss: float = 0.0, max_steps: int = 50_000) -> None:
        self.ends: dict[str, CascadeLink] = {"client": client, "server": server}
        self.address = {"client": ADDR_A, "server": ADDR_B}
        self.now = 0.0
        self.rng = random.Random(seed)
        self.loss = loss
        self.blackhole = False
        self.filter: Filter | None = None
        self.events: list[tuple[float, str, Any]] = []
        self.sent: list[tuple[float, str, bytes]] = []
        self.steps = 0
        self.max_steps = max_steps

    def name(self, link: CascadeLink) -> str:
        return next(n for n, end in self.ends.items() if end is link)

    def flush(self) -> None:
        moved = True
        while moved:
            moved = False
            for name, link in list(self.ends.items()):
                other = "server" if name == "client" else "client"
                for datagram in link.datagrams_to_send(self.now):
                    moved = True
                    self.sent.append((self.now, name, datagram))
                    self.steps += 1
                    assert self.steps < self.max_steps, "livelock"
                    if self.blackhole or (self.loss and self.rng.random() < self.loss):
                        continue
                    if self.filter is not None and not self.filter(link, datagram):
                        continue
                    self.ends[other].receive(datagram, self.address[name], self.now)
                self._collect(name, link)

    def _collect(self, name: str, link: CascadeLink) -> None:
        while (event := link.next_event()) is not None:
            self.events.append((self.now, name, event))

    def run(self, until: float) -> LinkNet:
        """Deliver and run timers up to fake time ``until``."""
        self.flush()
        while True:
            timers = [t for t in (end.next_timer() for end in self.ends.values())
                      if t is not None]
            if not timers or min(timers) > until:
                self.now = max(self.now, until)
                return self
            self.now = max(self.now, min(timers))
            for end in self.ends.values():
                end.handle_timer(self.now)
            self.flush()

    def of(self, name: str, kind: type) -> list[tuple[float, Any]]:
        return [(t, e) for t, n, e in self.events if n == name and isinstance(e, kind)]

    def keys(self, name: str) -> LinkUp:
        return self.of(name, LinkUp)[-1][1]

    def inject(self, name: str, datagram: bytes, source: tuple[str, int]) -> None:
        """A datagram from ``source`` to end ``name`` (an attacker's, say)."""
        self.ends[name].receive(datagram, source, self.now)
        self.flush()


def established(profile: int = GCM128, timing: LinkTiming = FAST, **network: Any) -> LinkNet:
    net = LinkNet(make_link(CLIENT, profile=profile, timing=timing, seed=1),
                  make_link(SERVER, profile=profile, timing=timing, seed=2), **network)
    return net.run(10.0)


def rtp(seq: int, ssrc: int = 0x11223344, payload: bytes = b"media over the link") -> bytes:
    return RtpPacket(payload_type=96, sequence_number=seq, timestamp=seq * 3000, ssrc=ssrc,
                     payload=payload).serialize()


class LinkTestCase(unittest.TestCase):
    def assertKeysPair(self, net: LinkNet, profile: int = GCM128) -> None:
        """Both ends up, each one's write keys the other's read keys, SRTP both ways."""
        client, server = net.keys("client"), net.keys("server")
        n = 16 if profile == GCM128 else 32
        for keys in (client, server):
            self.assertEqual(keys.profile, profile)
            self.assertEqual((len(keys.local_write_key), len(keys.remote_write_key)), (n, n))
            self.assertEqual((len(keys.local_write_salt), len(keys.remote_write_salt)), (12, 12))
        self.assertEqual((client.local_write_key, client.local_write_salt),
                         (server.remote_write_key, server.remote_write_salt))
        self.assertEqual((client.remote_write_key, client.remote_write_salt),
                         (server.local_write_key, server.local_write_salt))
        self.assertNotEqual(client.local_write_key, client.remote_write_key)
        # Our SRTP layer seals, libsrtp (as the plane uses it) opens, and back.
        packet = rtp(7)
        for writer, reader in ((client, server), (server, client)):
            sealed = SrtpContext(writer.local_write_key, writer.local_write_salt).protect(packet)
            session = libsrtp_session(reader.remote_write_key, reader.remote_write_salt,
                                      inbound=True)
            self.assertEqual(session.unprotect(sealed), packet)
        self.assertEqual(net.ends["client"].state, UP)
        self.assertEqual(net.ends["server"].state, UP)


class EstablishmentTests(LinkTestCase):
    def test_link_up_with_matching_keys_128(self) -> None:
        net = established(GCM128)
        self.assertKeysPair(net, GCM128)
        self.assertEqual(net.of("client", LinkDown) + net.of("server", LinkDown), [])
        client, server = net.ends["client"], net.ends["server"]
        self.assertEqual(server.peer_address, ADDR_A)
        self.assertEqual((client.remote_channel, server.remote_channel), (0x4B02, 0x4A01))
        self.assertEqual(client.counters["handshakes"], 1)
        self.assertEqual(server.counters["handshakes"], 1)

    def test_link_up_with_matching_keys_256(self) -> None:
        self.assertKeysPair(established(GCM256), GCM256)

    def test_up_within_a_second_and_consent_keeps_it_up(self) -> None:
        net = established()
        self.assertLess(net.of("client", LinkUp)[0][0], 0.01)  # no loss: no timer needed
        net.run(120.0)
        self.assertEqual(len(net.events), 2)  # the two LinkUps, nothing since
        checks = [t for t, name, d in net.sent if name == "client" and d[0] <= 3]
        gaps = [b - a for a, b in itertools.pairwise(checks[1:])]
        self.assertTrue(all(0.8 <= g <= 1.2 for g in gaps), gaps)  # RFC 7675 jitter
        self.assertGreater(len(set(round(g, 6) for g in gaps)), 10)

    def test_loss_and_retransmission(self) -> None:
        for seed in range(5):
            net = established(seed=seed, loss=0.3)
            net.run(40.0)
            self.assertKeysPair(net)

    def test_split_follows_rfc_5764(self) -> None:
        material = bytes(range(56))
        client = split_link_keys(GCM128, material, CLIENT)
        self.assertEqual(client.local_write_key, material[0:16])
        self.assertEqual(client.remote_write_key, material[16:32])
        self.assertEqual(client.local_write_salt, material[32:44])
        self.assertEqual(client.remote_write_salt, material[44:56])
        server = split_link_keys(GCM256, bytes(range(88)), SERVER)
        self.assertEqual(server.local_write_key, bytes(range(32, 64)))
        self.assertEqual(server.remote_write_salt, bytes(range(64, 76)))
        self.assertRaises(ValueError, split_link_keys, GCM128, bytes(88), CLIENT)
        self.assertNotIn(material[0:16].hex(), repr(client))

    def test_link_profile_for_the_outer_half(self) -> None:
        self.assertEqual(LINK_PROFILE_FOR[Profile.DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM],
                         GCM128)
        self.assertEqual(LINK_PROFILE_FOR[Profile.DOUBLE_AEAD_AES_256_GCM_AEAD_AES_256_GCM],
                         GCM256)

    def test_bad_parameters_refused(self) -> None:
        for kwargs in ({"profile": 0x0009}, {"profile": 0x0001}, {"channel": 0x3FFF},
                       {"ufrags": ("a:b", "c")}, {"pin": b"short"}, {"peer_address": None},
                       {"pwds": ("", "x")}):
            self.assertRaises(ValueError, make_link, CLIENT, **kwargs)
        self.assertRaises(ValueError, make_link, "listener")
        self.assertRaises(ValueError, LinkTiming, backoff_min=5.0, backoff_max=1.0)
        self.assertRaises(ValueError, LinkTiming, consent_interval=30.0)

    def test_checks_are_ice_checks_with_our_channel(self) -> None:
        client = make_link(CLIENT)
        [check] = client.datagrams_to_send(0.0)
        message = StunMessage.parse(check)
        self.assertEqual(message.message_type, BINDING_REQUEST)
        self.assertEqual(message.get(ATTR_USERNAME), b"mdB:mdA")
        self.assertTrue(check_integrity(check, b"pwd-of-md-b-0123456789"))
        self.assertIsNotNone(message.get(ATTR_ICE_CONTROLLING))
        self.assertIsNotNone(message.get(ATTR_PRIORITY))
        self.assertEqual(message.get(ATTR_CHANNEL_NUMBER), struct.pack("!HH", 0x4A01, 0))
        self.assertIsNone(message.get(ATTR_ASSOCIATION_TAG))
        self.assertTrue(client.expects(message.transaction_id))


class RefusalTests(LinkTestCase):
    def run_refused(self, client: CascadeLink, server: CascadeLink) -> LinkNet:
        net = LinkNet(client, server).run(30.0)
        self.assertEqual(net.of("client", LinkUp) + net.of("server", LinkUp), [])
        self.assertNotEqual(net.ends["client"].state, UP)
        self.assertNotEqual(net.ends["server"].state, UP)
        return net

    def test_client_refuses_a_server_with_another_certificate(self) -> None:
        net = self.run_refused(make_link(CLIENT), make_link(SERVER, cert=INTRUDER))
        [(_, down)] = net.of("client", LinkDown)  # announced once, retried with back-off
        self.assertEqual(down.reason, "dtls_wrong_certificate")
        self.assertGreater(net.ends["client"].counters["handshakes"], 3)
        self.assertEqual(net.ends["client"].last_failure[0], "dtls_wrong_certificate")

    def test_server_refuses_a_client_with_another_certificate(self) -> None:
        net = self.run_refused(make_link(CLIENT, cert=INTRUDER), make_link(SERVER))
        self.assertEqual(net.of("server", LinkDown)[0][1].reason, "dtls_wrong_certificate")
        self.assertEqual(net.of("client", LinkDown)[0][1].reason, "peer_alert")

    def test_another_profile_is_refused(self) -> None:
        net = self.run_refused(make_link(CLIENT, profile=GCM256), make_link(SERVER))
        self.assertEqual(net.of("server", LinkDown)[0][1].reason, "dtls_no_srtp_profile")
        self.assertEqual(net.of("client", LinkDown)[0][1].reason, "peer_alert")

    def test_a_peer_that_wants_ekt_gets_none(self) -> None:
        """Links carry no EKT: a client that requires it is answered without it, and fails."""
        client = make_link(CLIENT)
        client._config.ekt_ciphers = [1, 2]  # what an endpoint would offer the KD
        net = self.run_refused(client, make_link(SERVER))
        self.assertEqual(net.of("client", LinkDown)[0][1].reason, "dtls_handshake_failure")
        self.assertIn("EKT", net.of("client", LinkDown)[0][1].detail)
        self.assertEqual(net.of("server", LinkDown)[0][1].reason, "peer_alert")

    def test_wrong_credentials_get_no_answer(self) -> None:
        client = make_link(CLIENT, pwds=("pwd-of-md-a-0123456789", "not-the-password"))
        net = self.run_refused(client, make_link(SERVER))
        server = net.ends["server"]
        self.assertGreater(server.counters["stun_unauthenticated"], 10)
        self.assertEqual(server.counters["stun_out"], 0)  # never answered: no reflector
        self.assertIsNone(server.peer_address)
        self.assertEqual(net.of("client", LinkDown)[0][1].reason, "consent_timeout")
        other_ufrag = make_link(CLIENT, ufrags=("mdC", "mdB"))
        net = self.run_refused(other_ufrag, make_link(SERVER))
        self.assertGreater(net.ends["server"].counters["stun_unauthenticated"], 10)


class ConsentAndRecoveryTests(LinkTestCase):
    def test_consent_timeout_both_sides_then_back_off_and_back(self) -> None:
        net = established()
        first = net.keys("client")
        net.blackhole = True
        cut = net.now
        net.run(cut + 10.0)
        [(client_down, down)] = net.of("client", LinkDown)
        [(server_down, server_event)] = net.of("server", LinkDown)
        self.assertEqual((down.reason, server_event.reason),
                         ("consent_timeout", "consent_timeout"))
        # the last check answered before the cut, plus consent_timeout
        for at in (client_down, server_down):
            self.assertGreaterEqual(at, cut + FAST.consent_timeout - 1.2)
            self.assertLessEqual(at, cut + FAST.consent_timeout)
        self.assertEqual(net.ends["client"].state, CONNECTING)  # retrying (back-off)
        net.blackhole = False
        back_at = net.now
        net.run(40.0)
        self.assertKeysPair(net)
        [(up_at, _)] = [(t, e) for t, e in net.of("client", LinkUp) if t > back_at]
        self.assertLess(up_at - back_at, FAST.backoff_max + 0.5)
        self.assertNotEqual(net.keys("client").local_write_key, first.local_write_key)
        self.assertEqual(net.ends["server"].state, UP)

    def test_back_off_is_jittered_exponential_within_bounds(self) -> None:
        def attempts(seed: int) -> list[float]:
            client = make_link(CLIENT, seed=seed)
            net = LinkNet(client, make_link(SERVER))
            net.blackhole = True
            net.run(200.0)
            starts, last = [], -10.0
            for t, name, _ in net.sent:  # the first check after a silence
                if name == "client" and t - last > FAST.check_interval + 1e-9:
                    starts.append(t)
                last = t if name == "client" else last
            return starts

        starts = attempts(1)
        # An attempt: checks every check_interval for consent_timeout, then a pause.
        pauses = [b - a - FAST.consent_timeout for a, b in itertools.pairwise(starts)]
        self.assertGreater(len(pauses), 5)
        for i, pause in enumerate(pauses):
            ceiling = min(FAST.backoff_max, FAST.backoff_min * 2 ** (i + 1))
            self.assertGreaterEqual(pause, FAST.backoff_min - 1e-6)
            self.assertLessEqual(pause, ceiling + 1e-6)
        self.assertGreater(max(pauses[3:]), 2 * FAST.backoff_min)  # it does grow
        self.assertNotEqual(pauses, [b - a - FAST.consent_timeout for a, b in
                                     itertools.pairwise(attempts(2))])

    def test_client_restart_is_a_new_association_at_once(self) -> None:
        """MD A restarts (new port too): MD B takes the new association while still up."""
        net = established()
        before = net.keys("server")
        restart = net.now = net.now + 0.5
        net.ends["client"] = make_link(CLIENT, seed=99, now=net.now)
        net.address["client"] = ("192.0.2.10", 40001)
        net.run(restart + 10.0)
        self.assertEqual(net.of("server", LinkDown), [])
        self.assertEqual(len(net.of("server", LinkUp)), 2)
        self.assertLess(net.of("server", LinkUp)[1][0] - restart, 0.01)
        self.assertNotEqual(net.keys("server").remote_write_key, before.remote_write_key)
        self.assertKeysPair(net)
        server = net.ends["server"]
        self.assertEqual((server.peer_address, server.counters["address_moved"]),
                         (("192.0.2.10", 40001), 1))

    def test_server_restart_is_noticed_by_its_tag(self) -> None:
        """MD B restarts: its answers carry no association tag; MD A re-establishes."""
        net = established()
        restart = net.now = net.now + 0.5
        net.ends["server"] = make_link(SERVER, seed=98, now=net.now)
        net.run(restart + 10.0)
        [(down_at, down)] = net.of("client", LinkDown)
        self.assertEqual(down.reason, "peer_restart")
        self.assertLess(down_at - restart, FAST.consent_interval * 1.2 + 0.01)
        self.assertEqual(net.ends["client"].counters["tag_mismatch"], 1)
        self.assertKeysPair(net)
        self.assertLess(net.of("client", LinkUp)[-1][0] - down_at, FAST.backoff_max)

    def test_close_notify_takes_the_peer_down_at_once(self) -> None:
        net = established()
        net.ends["client"].close()
        net.flush()
        [(at, down)] = net.of("server", LinkDown)
        self.assertEqual((at, down.reason), (net.now, "close_notify"))
        self.assertEqual(net.ends["server"].state, DOWN)
        self.assertIsNone(net.ends["client"].next_timer())
        net.ends["client"].receive(b"\x16" * 40, ADDR_B, 3.0)  # a closed link takes nothing
        self.assertEqual(net.ends["client"].datagrams_to_send(3.0), [])


class RekeyTests(LinkTestCase):
    TIMING = LinkTiming(consent_interval=1.0, consent_timeout=6.0, check_interval=0.25,
                        handshake_timeout=5.0, backoff_min=0.5, backoff_max=4.0,
                        rekey_interval=10.0)

    def test_rekey_on_schedule_new_keys_no_down(self) -> None:
        net = established(timing=self.TIMING)
        net.run(35.0)
        for name in ("client", "server"):
            ups = net.of(name, LinkUp)
            self.assertEqual([round(t) for t, _ in ups], [0, 10, 20, 30])
            self.assertEqual(len({e.local_write_key for _, e in ups}), 4)
        self.assertEqual(net.of("client", LinkDown) + net.of("server", LinkDown), [])
        self.assertEqual(net.ends["client"].counters["rekeys"], 3)
        self.assertKeysPair(net)
        self.assertEqual(net.ends["client"].counters["tag_mismatch"], 0)

    def test_old_association_stays_while_the_rekey_runs(self) -> None:
        """The rekey's handshake stalls: the old keys stay, no LinkDown, a later retry."""
        net = LinkNet(make_link(CLIENT, timing=self.TIMING), make_link(SERVER, timing=self.TIMING))
        stall = {"on": False}

        def drop_dtls(src: CascadeLink, datagram: bytes) -> bool:
            return not (stall["on"] and 20 <= datagram[0] <= 63)

        net.filter = drop_dtls
        net.run(9.9)
        stall["on"] = True
        net.run(17.0)
        self.assertEqual(len(net.of("client", LinkUp)), 1)
        self.assertEqual(net.of("client", LinkDown) + net.of("server", LinkDown), [])
        self.assertEqual(net.ends["client"].state, UP)
        self.assertGreaterEqual(net.ends["client"].counters["handshake_failures"], 1)
        stall["on"] = False
        net.run(30.0)
        self.assertGreaterEqual(len(net.of("client", LinkUp)), 2)
        self.assertKeysPair(net)

    def test_rekey_under_loss(self) -> None:
        for seed in range(4):
            net = established(timing=self.TIMING, seed=seed, loss=0.2)
            net.run(60.0)
            self.assertGreaterEqual(len(net.of("client", LinkUp)), 4, seed)
            self.assertEqual(net.of("client", LinkDown), [], seed)
            self.assertKeysPair(net)


class OffPathAttackerTests(LinkTestCase):
    """An attacker who cannot see the link's traffic, sending from its own address or
    spoofing the peer's: nothing it sends moves the link."""

    def attacker_hello(self) -> bytes:
        conn = DtlsConnection(Role.CLIENT, DtlsConfiguration(
            INTRUDER[0], INTRUDER[1], srtp_profiles=[GCM128], ekt_ciphers=[]))
        conn.connect(0.0)
        return conn.datagrams_to_send(0.0)[0]

    def forged(self) -> list[bytes]:
        tid = bytes(12)
        guessed = StunMessage(BINDING_REQUEST, tid, [
            (ATTR_USERNAME, b"mdB:mdA"), (ATTR_PRIORITY, b"\x00\x00\x00\x01"),
            (ATTR_CHANNEL_NUMBER, struct.pack("!HH", 0x4EEE, 0))]).encode(
                integrity_key=b"a guessed password")
        response = StunMessage(BINDING_SUCCESS, bytes(range(12)), [
            (ATTR_CHANNEL_NUMBER, struct.pack("!HH", 0x4EEE, 0))]).encode(
                integrity_key=b"a guessed password")
        alert = encode_record(ContentType.ALERT, 0xFEFD, 0, 99, encode_alert(2, 40))
        close = encode_record(ContentType.ALERT, 0xFEFD, 0, 100, encode_alert(1, 0))
        forged_epoch1 = encode_record(ContentType.ALERT, 0xFEFD, 1, 5, bytes(26))
        return [guessed, response, self.attacker_hello(), alert, close, forged_epoch1,
                b"\x80" * 50, b"\x00\x01\x00\x00" + bytes(16)]

    def assertUnmoved(self, net: LinkNet, events_before: int, keys: LinkUp) -> None:
        self.assertEqual(len(net.events), events_before)
        self.assertIs(net.keys("client"), keys)
        for end in net.ends.values():
            self.assertEqual(end.state, UP)
        self.assertEqual(net.ends["server"].peer_address, ADDR_A)
        self.assertEqual(net.ends["server"].remote_channel, 0x4A01)
        self.assertEqual(net.ends["client"].remote_channel, 0x4B02)

    def test_injection_from_another_address_changes_nothing(self) -> None:
        net = established()
        before, keys = len(net.events), net.keys("client")
        for datagram in self.forged():
            for name in ("client", "server"):
                net.inject(name, datagram, ELSEWHERE)
        net.run(30.0)
        self.assertUnmoved(net, before, keys)
        server = net.ends["server"]
        self.assertEqual(server.counters["handshakes"], 1)
        self.assertGreater(server.counters["wrong_address"], 0)
        self.assertGreater(server.counters["stun_unauthenticated"], 0)
        self.assertEqual(server.counters["address_moved"], 0)

    def test_spoofing_the_peers_address_changes_nothing(self) -> None:
        """Sent with the bound address as source: a ClientHello only earns a stateless
        HelloVerifyRequest (to the real peer), alerts in the clear do not end the
        association, and nothing without the ice-pwd is answered."""
        net = established()
        before, keys = len(net.events), net.keys("client")
        for datagram in self.forged():
            net.inject("server", datagram, ADDR_A)
            net.inject("client", datagram, ADDR_B)
        net.run(30.0)
        self.assertUnmoved(net, before, keys)
        self.assertEqual(net.ends["server"].counters["handshakes"], 1)  # no state made

    def test_a_replayed_client_hello_of_the_current_association_is_ignored(self) -> None:
        net = established()
        hellos = [d for _, name, d in net.sent if name == "client" and d[0] == 22][:2]
        before, keys = len(net.events), net.keys("client")
        for hello in hellos:
            net.inject("server", hello, ADDR_A)
        net.run(30.0)
        self.assertUnmoved(net, before, keys)
        # both carry the current association's random (before and after the cookie)
        self.assertEqual(net.ends["server"].counters["dtls_duplicate_hello"], 2)

    def test_dtls_before_any_check_is_ignored(self) -> None:
        server = make_link(SERVER)
        server.receive(self.attacker_hello(), ADDR_A, 0.0)
        self.assertEqual(server.datagrams_to_send(0.0), [])
        self.assertEqual(server.counters["wrong_address"], 1)
        self.assertIsNone(server.next_timer())


_FIRST = st.sampled_from([0x00, 0x01, 0x16, 0x14, 0x15, 0x17, 0x80, 0x42, 0xFF])


class RandomInputTests(LinkTestCase):
    """Garbage into receive() never raises, whatever the link's state."""

    @settings(max_examples=150, deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(st.tuples(_FIRST, st.binary(max_size=300), st.booleans(),
                              st.sampled_from(["client", "server"])), max_size=12),
           st.integers(0, 3))
    def test_garbage_never_raises(self, inputs: list[tuple[int, bytes, bool, str]],
                                  stage: int) -> None:
        net = LinkNet(make_link(CLIENT), make_link(SERVER))
        net.run([0.0, 0.0001, 5.0, 10.0][stage])
        recorded = [d for _, _, d in net.sent]
        for first, body, from_peer, name in inputs:
            if recorded and body[:1] == b"\x00":  # sometimes a mutated real datagram
                base = bytearray(recorded[len(body) % len(recorded)])
                base[len(body) % len(base)] ^= first
                datagram = bytes(base)
            else:
                datagram = bytes((first,)) + body
            source = (ADDR_B if name == "client" else ADDR_A) if from_peer else ELSEWHERE
            net.ends[name].receive(datagram, source, net.now)
            for end in net.ends.values():
                end.datagrams_to_send(net.now)
                while end.next_event() is not None:
                    pass
        net.run(net.now + 20.0)  # and the link still works or recovers
        for end in net.ends.values():
            self.assertIn(end.state, (UP, CONNECTING, DOWN))
