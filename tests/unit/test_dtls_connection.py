"""DtlsConnection end to end: our client against our server over a simulated network.

The :class:`Network` below is the whole test harness: it moves datagrams
between two sans-I/O connections with seeded loss, reordering and
duplication, lets a test tamper with datagrams in flight, and advances a fake
clock to the earliest retransmission timer when nothing is in flight.  A hard
step cap turns a livelock into a failure instead of a hang.
"""

from __future__ import annotations

import itertools
import os
import random
import struct
from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from perc_daemons.protocol.double import (
    DoubleReceiver,
    DoubleSender,
    Relay,
    split_keying_material,
)
from perc_daemons.protocol.dtls import (
    ApplicationDataReceived,
    ConnectionClosed,
    DtlsConfiguration,
    DtlsConnection,
    EktKeyAcknowledged,
    EktKeyReceived,
    HandshakeComplete,
    Role,
    certificate_fingerprint,
    generate_certificate,
)
from perc_daemons.protocol.dtls import connection as connection_module
from perc_daemons.protocol.dtls.alerts import AlertDescription, AlertLevel, BadCertificate
from perc_daemons.protocol.dtls.crypto import peer_public_key
from perc_daemons.protocol.dtls.handshake import (
    DTLS_1_0,
    DTLS_1_2,
    CipherSuite,
    HandshakeFragment,
    HandshakeType,
    HelloVerifyRequest,
    NamedGroup,
    SignatureScheme,
    encode_alert,
    parse_handshake_fragments,
)
from perc_daemons.protocol.dtls.record import (
    MAX_CIPHERTEXT_LENGTH,
    ContentType,
    encode_record,
    parse_records,
)
from perc_daemons.protocol.ekt import EktCipher, EktParameterSet, EktReceiver, EktSender
from perc_daemons.protocol.rtp import RtpPacket
from perc_daemons.protocol.srtp import Profile

# Key generation costs: one certificate per role, shared by every test.
CLIENT_CERT, CLIENT_KEY = generate_certificate("endpoint-a")
SERVER_CERT, SERVER_KEY = generate_certificate("key-distributor")
OTHER_CERT, OTHER_KEY = generate_certificate("endpoint-b")
CLIENT_FP = certificate_fingerprint(CLIENT_CERT)
SERVER_FP = certificate_fingerprint(SERVER_CERT)
OTHER_FP = certificate_fingerprint(OTHER_CERT)

P128 = Profile.DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM
P256 = Profile.DOUBLE_AEAD_AES_256_GCM_AEAD_AES_256_GCM
MATERIAL_LENGTH = {P128: 112, P256: 176, Profile.AEAD_AES_128_GCM: 56,
                   Profile.AEAD_AES_256_GCM: 88}
SUITES = (CipherSuite.ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
          CipherSuite.ECDHE_ECDSA_WITH_AES_256_GCM_SHA384)
GROUPS = (NamedGroup.X25519, NamedGroup.SECP256R1)
CLIENT_ESI = b"C" * 20 + b"lient-tls-id"
SERVER_ESI = b"S" * 24 + b"erver-tls-id"
COOKIE_SECRET = b"z" * 32


def client_config(**kwargs) -> DtlsConfiguration:
    kwargs.setdefault("expected_peer_fingerprint", SERVER_FP)
    return DtlsConfiguration(CLIENT_CERT, CLIENT_KEY, **kwargs)


def server_config(**kwargs) -> DtlsConfiguration:
    kwargs.setdefault("expected_peer_fingerprint", CLIENT_FP)
    return DtlsConfiguration(SERVER_CERT, SERVER_KEY, **kwargs)


def ekt_params(cipher: EktCipher = EktCipher.AESKW_128, spi: int = 1) -> EktParameterSet:
    return EktParameterSet(key=os.urandom(cipher.key_length), cipher=cipher,
                           master_salt=os.urandom(12), spi=spi, ttl=3600)


# -- wire inspection --------------------------------------------------------------------

records = parse_records


def handshake_fragments(datagram: bytes) -> list[HandshakeFragment]:
    """The handshake fragments of a datagram's plaintext (epoch 0) records."""
    out = []
    for record in records(datagram):
        if record.content_type == ContentType.HANDSHAKE and record.epoch == 0:
            out.extend(parse_handshake_fragments(record.fragment))
    return out


def has_record(datagram: bytes, content_type: int, epoch: int | None = None) -> bool:
    return any(r.content_type == content_type and (epoch is None or r.epoch == epoch)
               for r in records(datagram))


def decrypt(conn: DtlsConnection, datagram: bytes) -> list[tuple[int, bytes]]:
    """(content type, plaintext) of the epoch-1 records, opened with ``conn``'s read keys."""
    protection = conn._read_protection
    assert protection is not None
    return [(r.content_type, protection.open(r)) for r in records(datagram) if r.epoch == 1]


# -- the simulated network --------------------------------------------------------------

Tamper = Callable[[DtlsConnection, bytes], list[bytes]]


class Network:
    """Two connections, one fake clock, a lossy datagram path between them."""

    def __init__(self, client: DtlsConnection, server: DtlsConnection, *, seed: int = 0,
                 loss: float = 0.0, reorder: float = 0.0, duplicate: float = 0.0,
                 tamper: Tamper | None = None, max_steps: int = 5000) -> None:
        self.client, self.server = client, server
        self.peer = {client: server, server: client}
        self.rng = random.Random(seed)
        self.loss, self.reorder, self.duplicate = loss, reorder, duplicate
        self.tamper = tamper
        self.max_steps = max_steps
        self.steps = 0
        self.now = 0.0
        self.queue: list[tuple[DtlsConnection, bytes]] = []  # (destination, datagram)
        self.sent: list[tuple[float, DtlsConnection, bytes]] = []  # as emitted, before loss
        self.events: dict[DtlsConnection, list[tuple[float, object]]] = {client: [], server: []}

    def start(self) -> Network:
        self.client.connect(self.now)
        self.collect()
        return self

    def collect(self) -> None:
        for conn in (self.client, self.server):
            while (event := conn.next_event()) is not None:
                self.events[conn].append((self.now, event))
        for src in (self.client, self.server):
            for datagram in src.datagrams_to_send(self.now):
                self.sent.append((self.now, src, datagram))
                for out in self.tamper(src, datagram) if self.tamper else [datagram]:
                    if self.rng.random() < self.loss:
                        continue
                    copies = 2 if self.rng.random() < self.duplicate else 1
                    self.queue.extend([(self.peer[src], out)] * copies)

    def deliver(self, destination: DtlsConnection, datagram: bytes) -> None:
        destination.receive_datagram(datagram, self.now)
        self.collect()

    def poke(self, destination: DtlsConnection, datagram: bytes) -> list[bytes]:
        """Deliver one datagram by hand; return the answer instead of queueing it."""
        destination.receive_datagram(datagram, self.now)
        answer = destination.datagrams_to_send(self.now)
        self.collect()
        return answer

    def step(self) -> bool:
        """Deliver one datagram, or fire the earliest timer; False when idle."""
        self.collect()
        self.steps += 1
        if self.steps > self.max_steps:
            raise AssertionError(f"no progress after {self.max_steps} steps (livelock?)")
        if self.queue:
            index = 0
            if self.reorder and self.rng.random() < self.reorder:
                index = self.rng.randrange(len(self.queue))
            self.deliver(*self.queue.pop(index))
            return True
        timers = [t for t in (self.client.get_timer(), self.server.get_timer()) if t is not None]
        if not timers:
            return False
        self.now = max(self.now, min(timers))
        for conn in (self.client, self.server):
            timer = conn.get_timer()
            if timer is not None and timer <= self.now:
                conn.handle_timer(self.now)
        self.collect()
        return True

    def run(self, until: Callable[[], bool] | None = None) -> Network:
        while until is None or not until():
            if not self.step():
                break
        return self

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def of(self, conn: DtlsConnection, kind: type) -> list:
        return [e for _, e in self.events[conn] if isinstance(e, kind)]

    def times(self, conn: DtlsConnection, kind: type) -> list[float]:
        return [t for t, e in self.events[conn] if isinstance(e, kind)]

    def sent_by(self, conn: DtlsConnection) -> list[tuple[float, bytes]]:
        return [(t, d) for t, src, d in self.sent if src is conn]


def pair(client_cfg: DtlsConfiguration | None = None,
         server_cfg: DtlsConfiguration | None = None, **network) -> Network:
    client = DtlsConnection(Role.CLIENT, client_cfg or client_config())
    server = DtlsConnection(Role.SERVER, server_cfg or server_config())
    return Network(client, server, **network).start()


class DtlsTestCase(unittest.TestCase):
    def assertConnected(self, net: Network) -> tuple[HandshakeComplete, HandshakeComplete]:
        for conn in (net.client, net.server):
            self.assertEqual(net.of(conn, ConnectionClosed), [])
            self.assertEqual(len(net.of(conn, HandshakeComplete)), 1)
            self.assertTrue(conn.is_connected)
        (c,), (s,) = net.of(net.client, HandshakeComplete), net.of(net.server, HandshakeComplete)
        self.assertEqual(c.keying_material, s.keying_material)
        self.assertEqual((c.srtp_profile, c.cipher_suite, c.ekt_cipher),
                         (s.srtp_profile, s.cipher_suite, s.ekt_cipher))
        self.assertEqual((c.peer_fingerprint, s.peer_fingerprint), (SERVER_FP, CLIENT_FP))
        return c, s

    def assertAppData(self, net: Network) -> None:
        """Application data flows both ways over a lossless path."""
        net.loss = net.duplicate = net.reorder = 0.0
        before_s = len(net.of(net.server, ApplicationDataReceived))
        before_c = len(net.of(net.client, ApplicationDataReceived))
        net.client.send_application_data(b"ping from the endpoint")
        net.server.send_application_data(b"pong from the KD")
        net.run()
        self.assertEqual([e.data for e in net.of(net.server, ApplicationDataReceived)][before_s:],
                         [b"ping from the endpoint"])
        self.assertEqual([e.data for e in net.of(net.client, ApplicationDataReceived)][before_c:],
                         [b"pong from the KD"])

    def assertFailed(self, net: Network, failing: DtlsConnection, alert: int) -> None:
        """``failing`` sent the fatal ``alert``; its peer received it; nobody completed."""
        other = net.peer[failing]
        self.assertEqual([(e.alert, e.by_peer) for e in net.of(failing, ConnectionClosed)],
                         [(alert, False)])
        self.assertEqual([(e.alert, e.by_peer) for e in net.of(other, ConnectionClosed)],
                         [(alert, True)])
        for conn in (net.client, net.server):
            self.assertEqual(net.of(conn, HandshakeComplete), [])
            self.assertFalse(conn.is_connected)
            self.assertIsNone(conn.get_timer())


# -- 1. the handshake matrix ------------------------------------------------------------

class HandshakeMatrixTests(DtlsTestCase):
    """Every suite x group x SRTP profile: the client offers all, the server picks one."""

    def check(self, suite: int, group: int, profile: int) -> None:
        # The client offers everything, the server's preference (a single value) wins.
        net = pair(client_config(external_session_id=CLIENT_ESI,
                                 expected_peer_external_session_id=SERVER_ESI,
                                 cipher_suites=list(reversed(SUITES)),
                                 groups=list(reversed(GROUPS)),
                                 srtp_profiles=[0x0001, P256, P128, Profile.AEAD_AES_256_GCM,
                                                Profile.AEAD_AES_128_GCM]),
                   server_config(external_session_id=SERVER_ESI,
                                 expected_peer_external_session_id=CLIENT_ESI,
                                 cipher_suites=[suite], groups=[group],
                                 srtp_profiles=[0x0002, profile])).run()
        self.assertEqual(net.now, 0.0)  # lossless: no retransmission was needed
        c, s = self.assertConnected(net)
        self.assertEqual((c.srtp_profile, c.cipher_suite, c.ekt_cipher), (profile, suite, None))
        self.assertEqual(len(c.keying_material), MATERIAL_LENGTH[profile])
        self.assertEqual(c.keying_material,
                         net.client.export_keying_material(b"EXTRACTOR-dtls_srtp",
                                                           MATERIAL_LENGTH[profile]))
        self.assertEqual((c.peer_certificate, s.peer_certificate), (SERVER_CERT, CLIENT_CERT))
        self.assertEqual((c.peer_external_session_id, s.peer_external_session_id),
                         (SERVER_ESI, CLIENT_ESI))
        self.assertEqual(net.client.export_keying_material(b"EXPERIMENTAL-x", 40, b"ctx"),
                         net.server.export_keying_material(b"EXPERIMENTAL-x", 40, b"ctx"))
        # The group really used: the ServerKeyExchange on the wire names it (RFC 8422 s5.4).
        (ske,) = [f for _, d in net.sent_by(net.server) for f in handshake_fragments(d)
                  if f.msg_type == HandshakeType.SERVER_KEY_EXCHANGE]
        self.assertEqual((ske.body[0], int.from_bytes(ske.body[1:3], "big")), (3, group))
        self.assertAppData(net)
        # Larger than one record: split by the sender, delivered in order.
        big = os.urandom(3000)
        net.client.send_application_data(big)
        net.run()
        received = b"".join(e.data for e in net.of(net.server, ApplicationDataReceived)[1:])
        self.assertEqual(received, big)
        self.assertTrue(all(len(d) <= 1200 for _, _, d in net.sent))

    def test_server_without_external_session_id_gets_clients(self) -> None:
        net = pair(client_config(external_session_id=CLIENT_ESI),
                   server_config(expected_peer_external_session_id=CLIENT_ESI)).run()
        c, s = self.assertConnected(net)
        self.assertEqual((c.peer_external_session_id, s.peer_external_session_id),
                         (None, CLIENT_ESI))


def _matrix_test(suite: int, group: int, profile: int):
    def test(self: HandshakeMatrixTests) -> None:
        self.check(suite, group, profile)
    return test


for _suite in SUITES:
    for _group in GROUPS:
        for _profile in MATERIAL_LENGTH:
            setattr(HandshakeMatrixTests,
                    f"test_{_suite.name.lower()}_{_group.name.lower()}_{_profile:04x}",
                    _matrix_test(_suite, _group, _profile))


# -- 2. EKTKey and its ACK (RFC 8870 s5.2) ----------------------------------------------

class EktKeyTests(DtlsTestCase):
    def ekt_pair(self, cipher: EktCipher, profile: int, **network) -> Network:
        net = pair(client_config(ekt_ciphers=[cipher], srtp_profiles=[profile]),
                   server_config(ekt_ciphers=[cipher], srtp_profiles=[profile]),
                   **network).run()
        c, _s = self.assertConnected(net)
        self.assertEqual((c.ekt_cipher, c.srtp_profile), (cipher, profile))
        return net

    def check_ekt(self, cipher: EktCipher, profile: int) -> None:
        net = self.ekt_pair(cipher, profile)
        first, second = ekt_params(cipher, spi=10), ekt_params(cipher, spi=11)
        net.server.send_ekt_key(first, net.now)
        net.run()
        self.assertEqual([e.params for e in net.of(net.client, EktKeyReceived)], [first])
        self.assertEqual(net.of(net.server, EktKeyAcknowledged), [EktKeyAcknowledged(10)])
        self.assertIsNone(net.server.get_timer())  # acknowledged: no more retransmissions
        self.assertEqual(net.now, 0.0)
        net.advance(30.0)  # a rekey, later, over the same association
        net.server.send_ekt_key(second, net.now)
        net.run()
        self.assertEqual([e.params for e in net.of(net.client, EktKeyReceived)], [first, second])
        self.assertEqual([e.spi for e in net.of(net.server, EktKeyAcknowledged)], [10, 11])
        self.assertEqual(net.now, 30.0)
        self.assertAppData(net)

    def test_aeskw_128(self) -> None:
        self.check_ekt(EktCipher.AESKW_128, P128)

    def test_aeskw_256(self) -> None:
        self.check_ekt(EktCipher.AESKW_256, P256)

    def test_lost_ack_retransmits_and_client_reacks_once(self) -> None:
        dropped = []

        def drop_first_ack(src: DtlsConnection, datagram: bytes) -> list[bytes]:
            if src.role is Role.CLIENT and has_record(datagram, ContentType.ACK) and not dropped:
                dropped.append(datagram)
                return []
            return [datagram]

        net = self.ekt_pair(EktCipher.AESKW_128, P128, tamper=drop_first_ack)
        params = ekt_params(spi=77)
        net.advance(1.0)
        net.server.send_ekt_key(params, net.now)
        net.run()
        self.assertEqual(len(dropped), 1)
        # The EKTKey went out twice: at t=1 and on the timer at t=2 (initial_retransmit 1 s).
        ekt_sends = [t for t, d in net.sent_by(net.server) if t >= 1.0
                     and has_record(d, ContentType.HANDSHAKE, epoch=1)]
        self.assertEqual(ekt_sends, [1.0, 2.0])
        acks = [t for t, d in net.sent_by(net.client) if has_record(d, ContentType.ACK)]
        self.assertEqual(acks, [1.0, 2.0])
        self.assertEqual([e.params for e in net.of(net.client, EktKeyReceived)], [params])
        self.assertEqual(net.of(net.server, EktKeyAcknowledged), [EktKeyAcknowledged(77)])
        self.assertEqual(net.times(net.server, EktKeyAcknowledged), [2.0])
        self.assertIsNone(net.server.get_timer())

    def test_rekey_while_the_first_key_is_lost(self) -> None:
        """The client delivers in order: an unacknowledged EKTKey must be resent with the new."""
        lost = []

        def drop_first_ekt(src: DtlsConnection, datagram: bytes) -> list[bytes]:
            if src.role is Role.SERVER and src.is_connected and src._ekt_pending and not lost:
                lost.append(datagram)
                return []
            return [datagram]

        net = self.ekt_pair(EktCipher.AESKW_128, P128, tamper=drop_first_ekt)
        first, second = ekt_params(spi=1), ekt_params(spi=2)
        net.server.send_ekt_key(first, net.now)
        net.collect()
        self.assertEqual(len(lost), 1)
        net.server.send_ekt_key(second, net.now)
        net.run()
        self.assertEqual([e.params for e in net.of(net.client, EktKeyReceived)], [first, second])
        self.assertEqual(net.of(net.server, EktKeyAcknowledged), [EktKeyAcknowledged(2)])
        self.assertIsNone(net.server.get_timer())

    def test_ekt_key_sent_while_the_servers_finished_is_lost(self) -> None:
        """The resent final flight is not an EKTKey transmission: the ACK settles it at once."""
        dropped = []

        def drop_first_final_flight(src: DtlsConnection, datagram: bytes) -> list[bytes]:
            if (src.role is Role.SERVER and has_record(datagram, ContentType.CHANGE_CIPHER_SPEC)
                    and not dropped):
                dropped.append(datagram)
                return []
            return [datagram]

        net = pair(client_config(ekt_ciphers=[1]), server_config(ekt_ciphers=[1]),
                   tamper=drop_first_final_flight)
        net.run(until=lambda: net.server.is_connected)
        self.assertFalse(net.client.is_connected)
        net.run(until=lambda: not net.queue)
        net.advance(0.5)
        params = ekt_params(spi=5)
        net.server.send_ekt_key(params, net.now)  # its timer: t=1.5
        net.run()  # the client's flight 5 timer (t=1) brings back the server's Finished
        self.assertConnected(net)
        self.assertEqual([e.params for e in net.of(net.client, EktKeyReceived)], [params])
        self.assertEqual(net.times(net.server, EktKeyAcknowledged), [1.0])
        ekt_sends = [t for t, d in net.sent_by(net.server)
                     if has_record(d, ContentType.HANDSHAKE, epoch=1)
                     and not has_record(d, ContentType.CHANGE_CIPHER_SPEC)]
        self.assertEqual(ekt_sends, [0.5])  # acknowledged before its first retransmission

    def test_ack_stays_within_the_mtu_over_many_rekeys(self) -> None:
        net = self.ekt_pair(EktCipher.AESKW_128, P128)
        for spi in range(200):
            net.server.send_ekt_key(ekt_params(spi=spi), net.now)
            net.run()
        self.assertEqual([e.spi for e in net.of(net.server, EktKeyAcknowledged)],
                         list(range(200)))
        self.assertLessEqual(max(len(d) for _, d in net.sent_by(net.client)), 1200)

    def test_api_misuse(self) -> None:
        net = self.ekt_pair(EktCipher.AESKW_128, P128)
        self.assertRaises(ValueError, net.server.send_ekt_key,
                          ekt_params(EktCipher.AESKW_256), 0.0)
        self.assertRaises(RuntimeError, net.client.send_ekt_key, ekt_params(), 0.0)
        plain = pair().run()
        self.assertRaises(RuntimeError, plain.server.send_ekt_key, ekt_params(), 0.0)
        fresh = DtlsConnection(Role.CLIENT, client_config())
        self.assertRaises(RuntimeError, fresh.send_application_data, b"x")
        self.assertRaises(RuntimeError, fresh.export_keying_material, b"label", 10)


# -- 3. exported keys drive the double transform ----------------------------------------

class DoubleTransformTests(DtlsTestCase):
    def test_endpoint_md_endpoint(self) -> None:
        """A -> MD -> B with keys from two real handshakes with the KD and one EKTKey."""
        kd_params = EktParameterSet(key=os.urandom(16), cipher=EktCipher.AESKW_128,
                                    master_salt=os.urandom(12), spi=0x1234, ttl=600)
        legs = {}
        for name, cert, key in (("a", CLIENT_CERT, CLIENT_KEY), ("b", OTHER_CERT, OTHER_KEY)):
            fingerprint = certificate_fingerprint(cert)
            net = pair(DtlsConfiguration(cert, key, srtp_profiles=[P128], ekt_ciphers=[1],
                                         expected_peer_fingerprint=SERVER_FP),
                       server_config(srtp_profiles=[P128], ekt_ciphers=[1],
                                     expected_peer_fingerprint=fingerprint)).run()
            (endpoint,) = net.of(net.client, HandshakeComplete)
            (kd,) = net.of(net.server, HandshakeComplete)
            self.assertEqual(kd.peer_fingerprint, fingerprint)
            net.server.send_ekt_key(kd_params, net.now)
            net.run()
            (received,) = net.of(net.client, EktKeyReceived)
            self.assertEqual(received.params, kd_params)
            endpoint_keys = split_keying_material(P128, endpoint.keying_material)
            kd_keys = split_keying_material(P128, kd.keying_material)
            for half in ("client_inner", "client_outer", "server_inner", "server_outer"):
                mine, theirs = getattr(endpoint_keys, half), getattr(kd_keys, half)
                self.assertEqual((mine.key, mine.salt), (theirs.key, theirs.salt))
            legs[name] = (endpoint_keys, kd_keys, received.params)
        a_keys, a_kd_keys, a_params = legs["a"]
        b_keys, b_kd_keys, b_params = legs["b"]
        self.assertNotEqual(a_keys.client_outer.key, b_keys.client_outer.key)

        ssrc = 0x0A0B0C0D
        sender = DoubleSender(a_keys.client_outer.context(), EktSender(ssrc, 16, a_params, 0.0))
        md_from_a = a_kd_keys.client_outer.session(inbound=True)  # MD: outer halves only
        md_to_b = b_kd_keys.server_outer.session(inbound=False)
        ekt_b = EktReceiver(16)
        ekt_b.add_parameter_set(b_params, 0.0)
        receiver = DoubleReceiver(b_keys.server_outer.context(), ekt_b)
        for i in range(5):
            payload = os.urandom(160)
            original = RtpPacket.parse(struct.pack("!BBHII", 0x80, 111, 1000 + i, 960 * i, ssrc)
                                       + payload).serialize()
            wire = sender.protect(original, i * 0.02)
            self.assertNotIn(payload, wire)
            relay = Relay()
            relay.open(wire, md_from_a)
            self.assertNotIn(payload, relay.plaintext)  # the MD cannot read the media
            relay.edit(seq=40000 + i)
            got = receiver.unprotect(relay.seal(md_to_b), i * 0.02)
            self.assertEqual(got.payload, payload)
            self.assertEqual(got.packet, original)
            self.assertEqual(got.outer_seq, 40000 + i)


# -- 4. reliability ---------------------------------------------------------------------

class ReliabilityTests(DtlsTestCase):
    SEEDS = range(10)

    def lossy(self, seeds=SEEDS, **network) -> None:
        for seed in seeds:
            net = pair(client_config(ekt_ciphers=[1]), server_config(ekt_ciphers=[1]),
                       seed=seed, **network).run()
            self.assertConnected(net)
            params = ekt_params(spi=seed)
            net.server.send_ekt_key(params, net.now)
            net.run()
            self.assertEqual([e.params for e in net.of(net.client, EktKeyReceived)], [params])
            self.assertEqual(net.of(net.server, EktKeyAcknowledged), [EktKeyAcknowledged(seed)])
            self.assertAppData(net)

    def test_loss(self) -> None:
        self.lossy(loss=0.25)

    def test_reordering(self) -> None:
        self.lossy(reorder=0.5)

    def test_duplication(self) -> None:
        self.lossy(duplicate=0.3)

    def test_everything_at_once_with_cookies(self) -> None:
        for seed in self.SEEDS:
            net = pair(server_cfg=server_config(cookie_secret=b"k" * 32), seed=seed,
                       loss=0.2, reorder=0.3, duplicate=0.2).run()
            self.assertConnected(net)

    def test_cookie_exchange(self) -> None:
        net = pair(server_cfg=server_config(cookie_secret=os.urandom(32))).run()
        self.assertConnected(net)
        (hvr,) = [f for _, d in net.sent_by(net.server) for f in handshake_fragments(d)
                  if f.msg_type == HandshakeType.HELLO_VERIFY_REQUEST]
        hellos = [f for _, d in net.sent_by(net.client) for f in handshake_fragments(d)
                  if f.msg_type == HandshakeType.CLIENT_HELLO]
        self.assertEqual([h.message_seq for h in hellos], [0, 1])
        cookie = hvr.body[3:]
        self.assertEqual((hvr.body[2], len(cookie)), (32, 32))
        self.assertIn(cookie, hellos[1].body)
        self.assertNotIn(cookie, hellos[0].body)

    def test_small_mtu_fragments(self) -> None:
        for seed, loss in ((0, 0.0), (1, 0.2), (2, 0.2), (3, 0.2), (4, 0.2)):
            net = pair(client_config(mtu=200, ekt_ciphers=[2], srtp_profiles=[P256]),
                       server_config(mtu=200, ekt_ciphers=[2], srtp_profiles=[P256],
                                     cookie_secret=b"c" * 32),
                       seed=seed, loss=loss).run()
            c, _s = self.assertConnected(net)
            self.assertEqual(len(c.keying_material), 176)
            self.assertLessEqual(max(len(d) for _, _, d in net.sent), 200)
            certificates = [f for _, d in net.sent_by(net.server) for f in handshake_fragments(d)
                            if f.msg_type == HandshakeType.CERTIFICATE]
            self.assertGreater(max(f.fragment_offset for f in certificates), 0)  # fragmented
            params = ekt_params(EktCipher.AESKW_256, spi=seed)
            net.server.send_ekt_key(params, net.now)
            net.run()
            self.assertEqual([e.params for e in net.of(net.client, EktKeyReceived)], [params])
            self.assertAppData(net)
            big = os.urandom(1000)
            net.server.send_application_data(big)
            net.run()
            self.assertEqual(b"".join(e.data for e in net.of(net.client, ApplicationDataReceived)
                                      [1:]), big)
            self.assertLessEqual(max(len(d) for _, _, d in net.sent), 200)

    def client_alone(self, **config) -> Network:
        net = pair(client_config(**config), loss=1.0, max_steps=200)
        net.run()
        return net

    def test_retransmission_backoff(self) -> None:
        net = self.client_alone()  # initial 1 s, max 60 s
        times = [t for t, _ in net.sent_by(net.client)]
        self.assertEqual(times[:7], [0.0, 1.0, 3.0, 7.0, 15.0, 31.0, 63.0])
        self.assertEqual(times[7] - times[6], 60.0)

    def test_retransmission_backoff_capped_then_give_up(self) -> None:
        net = self.client_alone(initial_retransmit=1.0, max_retransmit=4.0)
        sent = net.sent_by(net.client)
        times = [t for t, _ in sent]
        limit = connection_module._MAX_RETRANSMISSIONS
        self.assertEqual(len(times), 1 + limit)
        self.assertEqual([b - a for a, b in itertools.pairwise(times)],
                         [1.0, 2.0] + [4.0] * (limit - 2))
        # The same ClientHello each time, in fresh records.
        hellos = {handshake_fragments(d)[0].encode() for _, d in sent}
        self.assertEqual(len(hellos), 1)
        self.assertEqual([records(d)[0].sequence_number for _, d in sent], list(range(1 + limit)))
        (closed,) = net.of(net.client, ConnectionClosed)
        self.assertEqual((closed.alert, closed.by_peer), (None, False))
        self.assertEqual(net.times(net.client, ConnectionClosed), [times[-1] + 4.0])
        self.assertIsNone(net.client.get_timer())
        self.assertFalse(net.client.is_connected)


# -- 5. failures ------------------------------------------------------------------------

class NegotiationFailureTests(DtlsTestCase):
    def test_wrong_fingerprint_at_client(self) -> None:
        net = pair(client_config(expected_peer_fingerprint=OTHER_FP)).run()
        self.assertFailed(net, net.client, AlertDescription.BAD_CERTIFICATE)

    def test_wrong_fingerprint_at_server(self) -> None:
        net = pair(server_cfg=server_config(expected_peer_fingerprint=OTHER_FP)).run()
        self.assertFailed(net, net.server, AlertDescription.BAD_CERTIFICATE)

    def test_no_common_srtp_profile(self) -> None:
        net = pair(client_config(srtp_profiles=[Profile.AEAD_AES_128_GCM]),
                   server_config(srtp_profiles=[P128, P256])).run()
        self.assertFailed(net, net.server, AlertDescription.HANDSHAKE_FAILURE)

    def test_no_common_ekt_cipher(self) -> None:
        net = pair(client_config(ekt_ciphers=[1]), server_config(ekt_ciphers=[2])).run()
        self.assertFailed(net, net.server, AlertDescription.HANDSHAKE_FAILURE)

    def test_client_requires_ekt_server_has_none(self) -> None:
        net = pair(client_config(ekt_ciphers=[1]), server_config()).run()
        self.assertFailed(net, net.client, AlertDescription.HANDSHAKE_FAILURE)

    def test_external_session_id_mismatch_at_server(self) -> None:
        net = pair(client_config(external_session_id=CLIENT_ESI),
                   server_config(expected_peer_external_session_id=SERVER_ESI)).run()
        self.assertFailed(net, net.server, AlertDescription.HANDSHAKE_FAILURE)

    def test_external_session_id_mismatch_at_client(self) -> None:
        net = pair(client_config(external_session_id=CLIENT_ESI,
                                 expected_peer_external_session_id=CLIENT_ESI),
                   server_config(external_session_id=SERVER_ESI)).run()
        self.assertFailed(net, net.client, AlertDescription.HANDSHAKE_FAILURE)

    def test_tampered_flight_4_is_detected(self) -> None:
        """A MITM reorders CertificateRequest.signature_algorithms: still parses, still
        acceptable to the client, but the transcripts differ: decrypt_error."""
        rewritten = []
        original = (struct.pack("!H", SignatureScheme.ECDSA_SECP256R1_SHA256)
                    + struct.pack("!H", SignatureScheme.ECDSA_SECP384R1_SHA384))

        def rewrite(src: DtlsConnection, datagram: bytes) -> list[bytes]:
            if src.role is not Role.SERVER:
                return [datagram]
            out = b""
            for r in records(datagram):
                fragment = r.fragment
                if r.content_type == ContentType.HANDSHAKE and r.epoch == 0 and \
                        parse_handshake_fragments(fragment)[0].msg_type == \
                        HandshakeType.CERTIFICATE_REQUEST:
                    self.assertIn(original, fragment)
                    fragment = fragment.replace(original, original[2:] + original[:2])
                    rewritten.append(r.sequence_number)
                out += encode_record(r.content_type, r.version, r.epoch, r.sequence_number,
                                     fragment)
            return [out]

        net = pair(tamper=rewrite).run()
        self.assertEqual(len(rewritten), 1)
        # The client signed the altered transcript: the server's CertificateVerify check fails.
        self.assertFailed(net, net.server, AlertDescription.DECRYPT_ERROR)


class RecordLayerTests(DtlsTestCase):
    def test_flipped_bit_in_epoch_1_record_dropped(self) -> None:
        flipped = []

        def flip_finished(src: DtlsConnection, datagram: bytes) -> list[bytes]:
            # Client flight 5: its only epoch-1 record is the Finished, last in the datagram.
            if src.role is Role.CLIENT and has_record(datagram, ContentType.HANDSHAKE, 1) \
                    and not flipped:
                flipped.append(datagram)
                return [datagram[:-5] + bytes([datagram[-5] ^ 0x04]) + datagram[-4:]]
            return [datagram]

        net = pair(tamper=flip_finished).run()
        self.assertEqual(len(flipped), 1)
        self.assertConnected(net)
        # Completed only through the client's retransmission at t=1.
        self.assertEqual(net.times(net.server, HandshakeComplete), [1.0])
        self.assertEqual(net.times(net.client, HandshakeComplete), [1.0])

        # Application data with a bad tag: not delivered, association unharmed.
        net.client.send_application_data(b"corrupted")
        (datagram,) = net.client.datagrams_to_send(net.now)
        self.assertEqual(net.poke(net.server, datagram[:-1] + bytes([datagram[-1] ^ 1])), [])
        self.assertEqual(net.of(net.server, ApplicationDataReceived), [])
        self.assertEqual(len(net.events[net.server]), 1)  # still only HandshakeComplete
        self.assertTrue(net.server.is_connected)
        self.assertAppData(net)

    def test_replayed_application_data_dropped(self) -> None:
        net = pair().run()
        net.client.send_application_data(b"once")
        (datagram,) = net.client.datagrams_to_send(net.now)
        for _ in range(3):
            net.deliver(net.server, datagram)
        self.assertEqual([e.data for e in net.of(net.server, ApplicationDataReceived)],
                         [b"once"])

    def test_truncated_and_overlong_records_dropped(self) -> None:
        mangled = []

        def mangle(src: DtlsConnection, datagram: bytes) -> list[bytes]:
            # Before every real datagram: truncations of it, and its last record
            # claiming one byte more than the datagram holds.
            last = records(datagram)[-1]
            head = datagram[:len(datagram) - len(last.fragment) - 13]
            overlong = head + encode_record(last.content_type, last.version, last.epoch,
                                            last.sequence_number, last.fragment)[:11] + \
                struct.pack("!H", len(last.fragment) + 1) + last.fragment
            fakes = [datagram[:-1], datagram[:len(datagram) // 2], datagram[:12], overlong]
            mangled.extend(fakes)
            return [*fakes, datagram]

        net = pair(tamper=mangle).run()
        self.assertGreater(len(mangled), 8)
        self.assertConnected(net)
        self.assertEqual(net.now, 0.0)  # no retransmission was needed
        self.assertAppData(net)

    def test_truncated_client_hello_leaves_server_untouched(self) -> None:
        client = DtlsConnection(Role.CLIENT, client_config())
        server = DtlsConnection(Role.SERVER, server_config())
        client.connect(0.0)
        (hello,) = client.datagrams_to_send(0.0)
        header = hello[:11]
        for fake in (hello[:n] for n in range(len(hello))):
            server.receive_datagram(fake, 0.0)
        server.receive_datagram(header + struct.pack("!H", len(hello) - 12) + hello[13:], 0.0)
        # Oversized: a syntactically complete record longer than 2^14 + 2048.
        body = hello[13:] + bytes(MAX_CIPHERTEXT_LENGTH + 1 - len(hello[13:]))
        server.receive_datagram(header + struct.pack("!H", len(body)) + body, 0.0)
        self.assertIsNone(server.next_event())
        self.assertEqual(server.datagrams_to_send(0.0), [])
        self.assertEqual(server._state.name, "SERVER_WAIT_HELLO")
        server.receive_datagram(hello, 0.0)
        self.assertNotEqual(server.datagrams_to_send(0.0), [])
        self.assertEqual(server._state.name, "SERVER_WAIT_CERTIFICATE")

    def test_oversized_application_record_dropped(self) -> None:
        net = pair().run()
        net.client.send_application_data(b"x")
        (datagram,) = net.client.datagrams_to_send(net.now)
        (r,) = records(datagram)
        fragment = r.fragment + bytes(MAX_CIPHERTEXT_LENGTH + 1 - len(r.fragment))
        net.deliver(net.server, encode_record(r.content_type, r.version, r.epoch,
                                              r.sequence_number, fragment))
        self.assertEqual(net.events[net.server][1:], [])
        self.assertTrue(net.server.is_connected)
        self.assertAppData(net)

    def test_spoofed_client_hello_does_not_lock_out_the_client(self) -> None:
        """A forged ClientHello with the highest record number leaves no replay state."""
        server = DtlsConnection(Role.SERVER, server_config(cookie_secret=os.urandom(32)))
        attacker = DtlsConnection(Role.CLIENT, client_config())
        attacker.connect(0.0)
        (hello,) = attacker.datagrams_to_send(0.0)
        (r,) = records(hello)
        server.receive_datagram(encode_record(r.content_type, r.version, 0, 2**48 - 1,
                                              r.fragment), 0.0)
        self.assertEqual(len(server.datagrams_to_send(0.0)), 1)  # HelloVerifyRequest
        net = Network(DtlsConnection(Role.CLIENT, client_config()), server).start().run()
        self.assertConnected(net)
        self.assertEqual(net.now, 0.0)

    def test_client_hello_flood_with_cookies_keeps_no_state(self) -> None:
        server = DtlsConnection(Role.SERVER, server_config(cookie_secret=os.urandom(32)))
        cookies = set()
        for _ in range(1000):
            attacker = DtlsConnection(Role.CLIENT, client_config())
            attacker.connect(0.0)
            (hello,) = attacker.datagrams_to_send(0.0)
            server.receive_datagram(hello, 0.0)
            answer = server.datagrams_to_send(0.0)
            self.assertEqual(len(answer), 1)
            (record,) = records(answer[0])
            self.assertEqual(record.sequence_number, records(hello)[0].sequence_number)
            (fragment,) = parse_handshake_fragments(record.fragment)
            self.assertEqual(fragment.msg_type, HandshakeType.HELLO_VERIFY_REQUEST)
            cookies.add(fragment.body)
            self.assertIsNone(server.next_event())
        self.assertEqual(len(cookies), 1000)  # bound to each ClientHello
        self.assertEqual(server._state.name, "SERVER_WAIT_HELLO")
        self.assertIsNone(server._key_share)
        self.assertIsNone(server.get_timer())
        self.assertEqual(server._transcript, bytearray())
        self.assertEqual(server._reassembler.next_seq, 0)
        net = Network(DtlsConnection(Role.CLIENT, client_config()), server).start().run()
        self.assertConnected(net)

    def test_wrong_cookie_gets_a_new_hello_verify_request(self) -> None:
        tampered = []

        def forge_cookie(src: DtlsConnection, datagram: bytes) -> list[bytes]:
            fragments = handshake_fragments(datagram)
            if src.role is Role.CLIENT and fragments and fragments[0].message_seq == 1:
                tampered.append(datagram)
                # The cookie starts after record, handshake header, version, random, session_id.
                datagram = datagram[:61] + bytes([datagram[61] ^ 1]) + datagram[62:]
            return [datagram]

        net = pair(server_cfg=server_config(cookie_secret=b"a" * 32), tamper=forge_cookie).run()
        self.assertEqual(len(tampered), 1)
        self.assertConnected(net)
        self.assertEqual(net.now, 0.0)
        server_messages = [(f.msg_type, f.message_seq) for _, d in net.sent_by(net.server)
                           for f in handshake_fragments(d)]
        # The forged cookie got a second HelloVerifyRequest, the next ClientHello the handshake.
        self.assertEqual(server_messages[:3], [(HandshakeType.HELLO_VERIFY_REQUEST, 0),
                                               (HandshakeType.HELLO_VERIFY_REQUEST, 1),
                                               (HandshakeType.SERVER_HELLO, 2)])


class PostHandshakeTests(DtlsTestCase):
    def test_client_hello_after_handshake_refused(self) -> None:
        net = pair().run()
        fresh = DtlsConnection(Role.CLIENT, client_config())
        fresh.connect(0.0)
        (hello,) = handshake_fragments(fresh.datagrams_to_send(0.0)[0])
        renegotiation = HandshakeFragment(hello.msg_type, hello.length,
                                          net.client._next_send_seq, 0, hello.body)
        # No public API sends a handshake message in epoch 1: use the record layer directly.
        net.client._send_record(ContentType.HANDSHAKE, renegotiation.encode())
        (datagram,) = net.client.datagrams_to_send(net.now)
        (answer,) = net.poke(net.server, datagram)
        self.assertEqual(decrypt(net.client, answer),
                         [(ContentType.ALERT, bytes([AlertLevel.WARNING,
                                                     AlertDescription.NO_RENEGOTIATION]))])
        net.deliver(net.client, answer)
        self.assertTrue(net.server.is_connected and net.client.is_connected)
        self.assertEqual(len(net.events[net.server]), 1)  # only HandshakeComplete
        self.assertEqual(len(net.events[net.client]), 1)
        self.assertAppData(net)

    def test_hello_request_refused(self) -> None:
        net = pair().run()
        request = HandshakeFragment(HandshakeType.HELLO_REQUEST, 0, net.server._next_send_seq,
                                    0, b"")
        net.server._send_record(ContentType.HANDSHAKE, request.encode())
        (datagram,) = net.server.datagrams_to_send(net.now)
        (answer,) = net.poke(net.client, datagram)
        self.assertEqual(decrypt(net.server, answer),
                         [(ContentType.ALERT, bytes([AlertLevel.WARNING,
                                                     AlertDescription.NO_RENEGOTIATION]))])
        net.deliver(net.server, answer)
        self.assertTrue(net.server.is_connected and net.client.is_connected)
        self.assertAppData(net)

    def test_close(self) -> None:
        net = pair().run()
        net.client.close()
        (notify,) = net.client.datagrams_to_send(net.now)
        self.assertEqual(decrypt(net.server, notify),
                         [(ContentType.ALERT, bytes([AlertLevel.WARNING,
                                                     AlertDescription.CLOSE_NOTIFY]))])
        (answer,) = net.poke(net.server, notify)
        self.assertEqual(net.of(net.client, ConnectionClosed)[0].alert, 0)
        self.assertFalse(net.of(net.client, ConnectionClosed)[0].by_peer)
        (closed,) = net.of(net.server, ConnectionClosed)
        self.assertEqual((closed.alert, closed.by_peer), (0, True))
        self.assertEqual(decrypt(net.client, answer),
                         [(ContentType.ALERT, bytes([AlertLevel.WARNING,
                                                     AlertDescription.CLOSE_NOTIFY]))])
        net.deliver(net.client, answer)  # the closed side ignores it
        self.assertEqual(len(net.of(net.client, ConnectionClosed)), 1)
        for conn in (net.client, net.server):
            self.assertFalse(conn.is_connected)
            self.assertRaises(RuntimeError, conn.send_application_data, b"late")
            conn.close()  # idempotent
            self.assertEqual(conn.datagrams_to_send(net.now), [])
        self.assertEqual(len(net.of(net.server, ConnectionClosed)), 1)


# -- 6. random input --------------------------------------------------------------------

_content_types = st.sampled_from([20, 21, 22, 23, 26, 0, 99])
_handshake_payload = st.builds(
    lambda t, seq, body: HandshakeFragment(t, len(body), seq, 0, body).encode(),
    st.sampled_from([0, 1, 2, 3, 11, 12, 13, 14, 15, 16, 20, 26, 200]),
    st.integers(0, 5), st.binary(max_size=300),
)
_record = st.builds(
    lambda ctype, version, epoch, seq, payload: encode_record(ctype, version, epoch, seq, payload),
    _content_types, st.sampled_from([0xFEFD, 0xFEFF, 0xFEFC]), st.integers(0, 2),
    st.integers(0, 40), st.one_of(st.binary(max_size=200), _handshake_payload),
)


def _capture(cookies: bool) -> list[bytes]:
    """Every datagram of one real handshake with EKT and external_session_id."""
    net = pair(client_config(ekt_ciphers=[1], external_session_id=CLIENT_ESI),
               server_config(ekt_ciphers=[1], external_session_id=SERVER_ESI,
                             cookie_secret=COOKIE_SECRET if cookies else None)).run()
    net.server.send_ekt_key(ekt_params(), net.now)
    net.run()
    return [d for _, _, d in net.sent]


def _mutate(datagram: bytes, flips: list[tuple[int, int]], cut: int | None) -> bytes:
    data = bytearray(datagram)
    for position, mask in flips:
        data[position % len(data)] ^= mask
    return bytes(data if cut is None else data[:cut % (len(data) + 1)])


_mutated = st.builds(_mutate, st.sampled_from(_capture(True) + _capture(False)),
                     st.lists(st.tuples(st.integers(0, 4000), st.integers(1, 255)), max_size=3),
                     st.none() | st.integers(0, 4000))
garbage = st.one_of(
    st.binary(max_size=400),
    st.lists(_record, min_size=1, max_size=3).map(b"".join),
    _mutated,
)
FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


class RandomInputTests(DtlsTestCase):
    def assertOnlyClosed(self, conn: DtlsConnection) -> None:
        events = []
        while (event := conn.next_event()) is not None:
            events.append(event)
        self.assertTrue(all(isinstance(e, ConnectionClosed) for e in events), events)
        self.assertLessEqual(len(events), 1)
        if events:
            self.assertFalse(conn.is_connected)

    @FUZZ
    @given(st.lists(garbage, max_size=6), st.booleans())
    def test_fresh_server(self, datagrams: list[bytes], cookies: bool) -> None:
        server = DtlsConnection(Role.SERVER,
                                server_config(cookie_secret=COOKIE_SECRET if cookies else None))
        for datagram in datagrams:
            server.receive_datagram(datagram, 0.0)
            server.datagrams_to_send(0.0)
            server.handle_timer(5.0)
        self.assertOnlyClosed(server)

    @FUZZ
    @given(st.lists(garbage, max_size=6))
    def test_fresh_client(self, datagrams: list[bytes]) -> None:
        # Accepts the captured server's flight 4 up to its signature over our random.
        client = DtlsConnection(Role.CLIENT, client_config(expected_peer_fingerprint=None,
                                                           ekt_ciphers=[1],
                                                           external_session_id=CLIENT_ESI))
        client.connect(0.0)
        for datagram in datagrams:
            client.receive_datagram(datagram, 0.1)
            client.datagrams_to_send(0.1)
        self.assertOnlyClosed(client)

    @FUZZ
    @given(st.lists(st.tuples(st.booleans(), garbage), max_size=4))
    def test_connected_pair(self, injections: list[tuple[bool, bytes]]) -> None:
        net = pair().run()
        baseline = {conn: len(net.events[conn]) for conn in (net.client, net.server)}
        for to_server, datagram in injections:
            destination = net.server if to_server else net.client
            destination.receive_datagram(datagram, net.now)
            net.run()
        for conn in (net.client, net.server):
            later = [e for _, e in net.events[conn][baseline[conn]:]]
            self.assertTrue(all(isinstance(e, ConnectionClosed) for e in later), later)
        if net.client.is_connected and net.server.is_connected:
            self.assertAppData(net)

    @FUZZ
    @given(st.lists(st.tuples(st.integers(0, 12), st.booleans(), garbage), max_size=4),
           st.integers(0, 2**16))
    def test_garbage_during_the_handshake(self, injections, seed: int) -> None:
        net = pair(client_config(ekt_ciphers=[1]),
                   server_config(ekt_ciphers=[1], cookie_secret=b"q" * 32), seed=seed)
        pending = sorted(injections, key=lambda item: item[0])
        step = 0
        while True:
            while pending and pending[0][0] <= step:
                _, to_server, datagram = pending.pop(0)
                net.deliver(net.server if to_server else net.client, datagram)
            if not net.step():
                break
            step += 1
        closed = net.of(net.client, ConnectionClosed) + net.of(net.server, ConnectionClosed)
        if not closed:
            self.assertConnected(net)
            self.assertAppData(net)
        else:
            self.assertFalse(net.client.is_connected and net.server.is_connected)


class UnauthenticatedInputTests(DtlsTestCase):
    """Forged plaintext records can neither close nor confuse an association."""

    def test_forged_epoch_0_records_after_the_switch_are_ignored(self) -> None:
        net = pair().run()
        forged = [
            encode_record(ContentType.ALERT, DTLS_1_2, 0, 900, encode_alert(
                AlertLevel.FATAL, AlertDescription.HANDSHAKE_FAILURE)),
            encode_record(ContentType.HANDSHAKE, DTLS_1_2, 0, 901, b"\x01\x00"),  # malformed
            encode_record(ContentType.CHANGE_CIPHER_SPEC, DTLS_1_2, 0, 902, b"\x07"),
            encode_record(ContentType.APPLICATION_DATA, DTLS_1_2, 0, 903, b"plaintext"),
        ]
        for conn in (net.client, net.server):
            before = list(net.events[conn])
            for datagram in forged:
                net.deliver(conn, datagram)
            self.assertEqual(net.events[conn], before)
            self.assertTrue(conn.is_connected)
        self.assertAppData(net)

    def test_spoofed_records_before_the_cookie_leave_the_server_untouched(self) -> None:
        server = DtlsConnection(Role.SERVER, server_config(cookie_secret=COOKIE_SECRET))
        spoofed = [
            encode_record(ContentType.ALERT, DTLS_1_2, 0, 1, encode_alert(
                AlertLevel.FATAL, AlertDescription.DECODE_ERROR)),
            encode_record(ContentType.CHANGE_CIPHER_SPEC, DTLS_1_2, 0, 2, b"\x09"),
            encode_record(ContentType.HANDSHAKE, DTLS_1_2, 0, 3, b"\x01\x00\x00"),
            encode_record(ContentType.HANDSHAKE, DTLS_1_2, 1, 4, os.urandom(40)),
        ]
        for datagram in spoofed:
            server.receive_datagram(datagram, 0.0)
        self.assertIsNone(server.next_event())
        self.assertEqual(server.datagrams_to_send(0.0), [])
        self.assertEqual(server._state.name, "SERVER_WAIT_HELLO")
        self.assertEqual(server._early_records, [])
        net = Network(DtlsConnection(Role.CLIENT, client_config()), server).start().run()
        self.assertConnected(net)

    def test_endless_hello_verify_requests_end_the_handshake(self) -> None:
        client = DtlsConnection(Role.CLIENT, client_config())
        client.connect(0.0)
        for message_seq in range(4):
            (hello,) = client.datagrams_to_send(0.0)
            self.assertEqual(handshake_fragments(hello)[0].message_seq, message_seq)
            body = HelloVerifyRequest(DTLS_1_0, os.urandom(32)).encode()
            fragment = HandshakeFragment(HandshakeType.HELLO_VERIFY_REQUEST, len(body),
                                         message_seq, 0, body)
            client.receive_datagram(encode_record(ContentType.HANDSHAKE, DTLS_1_0, 0,
                                                  message_seq, fragment.encode()), 0.0)
        closed = client.next_event()
        self.assertIsInstance(closed, ConnectionClosed)
        self.assertEqual((closed.alert, closed.by_peer),
                         (AlertDescription.HANDSHAKE_FAILURE, False))
        self.assertIn("HelloVerifyRequests", closed.reason)


class PeerCertificateParsingTests(unittest.TestCase):
    @settings(max_examples=300, deadline=None)
    @given(st.integers(0, len(CLIENT_CERT) - 1), st.integers(1, 255), st.integers(0, 40))
    def test_mutated_certificates_are_bad_certificates(self, position: int, xor: int,
                                                       cut: int) -> None:
        """Whatever the DER holds, the answer is a key or BadCertificate (never a crash)."""
        der = bytearray(CLIENT_CERT)
        der[position] ^= xor
        der = bytes(der[:len(der) - cut])
        try:
            key = peer_public_key(der)
        except BadCertificate:
            return
        self.assertEqual(key.curve.name, "secp256r1")


class FinishedTests(DtlsTestCase):
    def test_tampered_finished_is_a_decrypt_error(self) -> None:
        """A Finished whose verify_data is wrong (resealed with the record keys, so only
        the Finished check can notice) ends the handshake with decrypt_error (51)."""
        tampered = []

        def flip_verify_data(src: DtlsConnection, datagram: bytes) -> list[bytes]:
            if src.role is not Role.CLIENT or tampered:
                return [datagram]
            out = b""
            for record in records(datagram):
                if record.epoch == 1 and record.content_type == ContentType.HANDSHAKE:
                    protection = src._write_protection
                    plain = bytearray(protection.open(record))
                    self.assertEqual(plain[0], HandshakeType.FINISHED)
                    plain[-1] ^= 0x01
                    tampered.append(record.sequence_number)
                    fragment = protection.seal(record.content_type, record.version, 1,
                                               record.sequence_number, bytes(plain))
                    out += encode_record(record.content_type, record.version, 1,
                                         record.sequence_number, fragment)
                else:
                    out += encode_record(record.content_type, record.version, record.epoch,
                                         record.sequence_number, record.fragment)
            return [out]

        net = pair(tamper=flip_verify_data).run()
        self.assertEqual(len(tampered), 1)
        self.assertFailed(net, net.server, AlertDescription.DECRYPT_ERROR)
