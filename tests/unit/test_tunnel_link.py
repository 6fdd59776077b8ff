"""The MD<->KD tunnel glue over real TLS 1.3 on loopback (RFC 9185).

Real reactor, real certificates from :class:`~perc_daemons.devpki.DevPki`:
a :class:`~perc_daemons.kd.tunnel.KdTunnelClient` against a
:class:`~perc_daemons.md.tunnel.MdTunnelServer`, plus hand-written raw TLS
peers where a misbehaving or outdated other end is needed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer, reactor, ssl, task
from twisted.internet.defer import DeferredQueue
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from perc_daemons import tunnel_link
from perc_daemons.devpki import DevPki, Issued
from perc_daemons.interfaces import ITunnelHandler, ITunnelPeer
from perc_daemons.kd.tunnel import KdTunnelClient
from perc_daemons.listening import ConnectionLimits, RateLimitedLog
from perc_daemons.md.tunnel import MD_PROFILES, MdTunnelServer, md_tunnel_context_factory
from perc_daemons.metrics import Metrics
from perc_daemons.protocol.tunnel import (
    SIGN_STATUS_OK,
    SIGN_STATUS_REFUSED,
    EndpointDisconnect,
    MediaKeys,
    Ping,
    Pong,
    SignAnswer,
    SignAnswerAck,
    SupportedProfiles,
    TunneledDtls,
    UnsupportedVersion,
    new_association_id,
)
from perc_daemons.tls import TlsFileError
from perc_daemons.tunnel_link import TunnelLink


def fingerprint_of(issued: Issued) -> bytes:
    certificate = x509.load_pem_x509_certificate(issued.certificate.read_bytes())
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).digest()


@implementer(ITunnelHandler)
class Recorder:
    """An ITunnelHandler that queues what it is told, for the test to wait on."""

    def __init__(self) -> None:
        self.ups: DeferredQueue[Any] = DeferredQueue()
        self.messages: DeferredQueue[Any] = DeferredQueue()
        self.downs: DeferredQueue[Any] = DeferredQueue()
        self.up_count = 0
        self.message_count = 0

    def tunnel_up(self, peer: ITunnelPeer) -> None:
        self.up_count += 1
        self.ups.put(peer)

    def tunnel_message(self, peer: ITunnelPeer, message: object) -> None:
        self.message_count += 1
        self.messages.put((peer, message))

    def tunnel_down(self, peer: ITunnelPeer, reason: str) -> None:
        self.downs.put((peer, reason))


@implementer(IHandshakeListener)
class RawPeer(Protocol):
    """A bare TLS peer: records what it gets, sends what it is told."""

    def __init__(self, greeting: bytes = b"") -> None:
        self.greeting = greeting
        self.data = b""
        self.handshake_done = False
        self.first_data: defer.Deferred[bytes] = defer.Deferred()
        self.reason: BaseException | None = None
        self._lost_waiters: list[defer.Deferred[BaseException]] = []

    def handshakeCompleted(self) -> None:
        self.handshake_done = True
        if self.greeting:
            self.transport.write(self.greeting)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if not self.first_data.called:
            self.first_data.callback(self.data)

    def when_lost(self) -> defer.Deferred[BaseException]:
        if self.reason is not None:
            return defer.succeed(self.reason)
        d: defer.Deferred[BaseException] = defer.Deferred()
        self._lost_waiters.append(d)
        return d

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.reason = reason.value
        waiters, self._lost_waiters = self._lost_waiters, []
        for d in waiters:
            d.callback(self.reason)


def loaded_private(issued: Issued) -> ssl.PrivateCertificate:
    return ssl.PrivateCertificate.loadPEM(
        issued.certificate.read_bytes() + issued.private_key.read_bytes())


class TunnelTestBase(unittest.TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.pki = DevPki(Path(self.mktemp()))
        self.md_cert = self.pki.issue("md", ["localhost"], ["127.0.0.1"])
        self.kd_cert = self.pki.issue("kd", ["kd.localhost"])
        self.kd2_cert = self.pki.issue("kd2", ["kd2.localhost"])
        self.trusted = {fingerprint_of(self.kd_cert), fingerprint_of(self.kd2_cert)}
        self.md_handler = Recorder()
        self.kd_handler = Recorder()
        self.md_metrics = Metrics("md")
        self.kd_metrics = Metrics("kd")

    def start_md(self, port: int = 0, certificate: Issued | None = None,
                 **kwargs: Any) -> MdTunnelServer:
        certificate = certificate or self.md_cert
        server = MdTunnelServer(
            reactor, bind="127.0.0.1", port=port, certificate=str(certificate.certificate),
            private_key=str(certificate.private_key), is_trusted_kd=self.trusted.__contains__,
            handler=self.md_handler, metrics=self.md_metrics, **kwargs)
        server.startService()
        self.addCleanup(server.stopService)
        return server

    def start_kd(self, port: int, certificate: Issued | None = None, name: str = "localhost",
                 ca: Path | None = None, handler: Recorder | None = None,
                 min_delay: float = 0.05, **kwargs: Any) -> KdTunnelClient:
        certificate = certificate or self.kd_cert
        client = KdTunnelClient(
            reactor, host="127.0.0.1", port=port, name=name,
            ca_certificate=str(ca or self.pki.ca_certificate_path),
            certificate=str(certificate.certificate), private_key=str(certificate.private_key),
            handler=handler or self.kd_handler, metrics=self.kd_metrics,
            min_delay=min_delay, max_delay=max(1.0, min_delay), **kwargs)
        client.startService()
        self.addCleanup(client.stopService)
        return client

    def raw_client(self, port: int, options: Any) -> defer.Deferred[RawPeer]:
        endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", port))
        d = endpoint.connect(Factory.forProtocol(RawPeer))

        def connected(peer: RawPeer) -> RawPeer:
            def cleanup() -> defer.Deferred[BaseException]:
                if peer.reason is None:
                    peer.transport.abortConnection()
                return peer.when_lost()

            self.addCleanup(cleanup)
            return peer

        return d.addCallback(connected)

    def raw_kd(self, port: int, certificate: Issued) -> defer.Deferred[RawPeer]:
        """A TLS 1.3 client presenting ``certificate`` that checks the MD properly."""
        return self.raw_client(port, ssl.optionsForClientTLS(
            "localhost", trustRoot=ssl.Certificate.loadPEM(
                self.pki.ca_certificate_path.read_bytes()),
            clientCertificate=loaded_private(certificate)))

    def sample(self, metrics: Metrics, name: str, **labels: str) -> float:
        return metrics.registry.get_sample_value(name, labels) or 0.0


def media_keys() -> MediaKeys:
    return MediaKeys(association_id=new_association_id(), protection_profile=0x0009,
                     mki=b"", client_write_key=bytes(range(16)),
                     server_write_key=bytes(range(16, 32)), client_write_salt=bytes(12),
                     server_write_salt=b"\x01" * 12)


class TunnelUpTests(TunnelTestBase):
    @defer.inlineCallbacks
    def test_up_and_messages_both_ways(self):
        md = self.start_md()
        kd = self.start_kd(md.port)
        kd_peer = yield kd.when_up()
        md_peer = yield self.md_handler.ups.get()
        self.assertIs(kd.peer, kd_peer)
        verifyObject(ITunnelPeer, kd_peer)
        verifyObject(ITunnelPeer, md_peer)
        self.assertIsInstance(md_peer, TunnelLink)
        self.assertEqual(md_peer.peer_fingerprint, fingerprint_of(self.kd_cert))
        self.assertIsNone(md_peer.peer_name)
        self.assertEqual(kd_peer.peer_fingerprint, fingerprint_of(self.md_cert))
        self.assertEqual(kd_peer.peer_name, f"127.0.0.1:{md.port}")  # the KD's key for it
        self.assertEqual(md.peers(), [md_peer])
        self.assertIs(md.peer_for(fingerprint_of(self.kd_cert)), md_peer)
        self.assertIsNone(md.peer_for(fingerprint_of(self.kd2_cert)))
        self.assertEqual(self.sample(self.md_metrics, "perc_tunnel_kds_connected"), 1)
        self.assertEqual(self.sample(self.kd_metrics, "perc_tunnel_mds_connected"), 1)

        aid = new_association_id()
        to_md = [media_keys(), TunneledDtls(aid, b"\x16\xfe\xfd" + bytes(300)),
                 EndpointDisconnect(aid),
                 SignAnswerAck(aid, SIGN_STATUS_OK, "v=0\r\n" + "a=x\r\n" * 2000),
                 SignAnswerAck(aid, SIGN_STATUS_REFUSED, "not invited")]
        to_kd = [TunneledDtls(aid, bytes(range(256)) * 200),
                 SignAnswer(aid, "conf-1", "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\n", "v=0\r\n"),
                 EndpointDisconnect(aid)]
        for message in to_md:
            kd_peer.send(message)
        for message in to_kd:
            md_peer.send(message)
        for expected in to_md:
            peer, message = yield self.md_handler.messages.get()
            self.assertIs(peer, md_peer)
            self.assertEqual(message, expected)
        for expected in to_kd:
            peer, message = yield self.kd_handler.messages.get()
            self.assertIs(peer, kd_peer)
            self.assertEqual(message, expected)
        # SupportedProfiles is consumed by the KD's tunnel logic, not handed on.
        self.assertEqual(self.kd_handler.message_count, len(to_kd))

        md_peer.close("test done")
        (peer, reason), (kd_down_peer, _) = yield defer.gatherResults(
            [self.md_handler.downs.get(), self.kd_handler.downs.get()])
        self.assertIs(peer, md_peer)
        self.assertEqual(reason, "test done")
        self.assertIs(kd_down_peer, kd_peer)
        self.assertEqual(md.peers(), [])
        self.assertEqual(self.sample(self.md_metrics, "perc_tunnel_kds_connected"), 0)

    @defer.inlineCallbacks
    def test_md_greets_with_supported_profiles(self):
        md = self.start_md()
        raw = yield self.raw_kd(md.port, self.kd2_cert)
        data = yield raw.first_data
        self.assertEqual(data, SupportedProfiles(MD_PROFILES).encode())
        self.assertEqual(data, b"\x01\x00\x07\x00\x00\x04\x00\x09\x00\x0a")
        peer = yield self.md_handler.ups.get()
        self.assertEqual(peer.peer_fingerprint, fingerprint_of(self.kd2_cert))

    @defer.inlineCallbacks
    def test_reconnects_after_md_restart(self):
        md = self.start_md()
        port = md.port
        kd = self.start_kd(port)
        first = yield kd.when_up()
        yield self.md_handler.ups.get()
        yield md.stopService()
        peer, _ = yield self.kd_handler.downs.get()
        self.assertIs(peer, first)
        self.assertIsNone(kd.peer)
        md2 = self.start_md(port=port)
        second = yield kd.when_up()
        self.assertIsNot(second, first)
        md_peer = yield self.md_handler.ups.get()
        self.assertIs(md2.peer_for(fingerprint_of(self.kd_cert)), md_peer)
        aid = new_association_id()
        second.send(EndpointDisconnect(aid))
        _, message = yield self.md_handler.messages.get()
        self.assertEqual(message, EndpointDisconnect(aid))


class RefusalTests(TunnelTestBase):
    @defer.inlineCallbacks
    def test_unpinned_kd_refused(self):
        md = self.start_md()
        rogue = self.pki.issue("rogue", ["rogue.localhost"])
        kd = self.start_kd(md.port, certificate=rogue, min_delay=5.0)
        link = yield kd.when_connected()
        reason = yield link.when_lost()
        self.assertNotIn("Verification", reason)
        # TLS itself worked: the KD checked the MD, then the MD hung up on it.
        self.assertEqual(link.peer_fingerprint, fingerprint_of(self.md_cert))
        self.assertFalse(link.up)
        self.assertEqual(link._decoder.buffered, 0)
        self.assertEqual(self.md_handler.up_count, 0)
        self.assertEqual(self.kd_handler.up_count, 0)
        self.assertEqual(self.kd_handler.message_count, 0)
        self.assertEqual(md.peers(), [])
        self.assertEqual(self.sample(self.md_metrics, "perc_tunnel_refused_total"), 1)

    @defer.inlineCallbacks
    def test_unpinned_raw_kd_gets_nothing(self):
        md = self.start_md()
        rogue = self.pki.issue("rogue", ["rogue.localhost"])
        raw = yield self.raw_kd(md.port, rogue)
        raw.transport.write(EndpointDisconnect(new_association_id()).encode())
        yield raw.when_lost()
        self.assertEqual(raw.data, b"")
        self.assertEqual(self.md_handler.up_count, 0)
        self.assertEqual(self.md_handler.message_count, 0)

    @defer.inlineCallbacks
    def test_md_certificate_with_wrong_name_refused(self):
        other = self.pki.issue("other", ["other.example"])
        md = self.start_md(certificate=other)
        kd = self.start_kd(md.port, min_delay=5.0)
        link = yield kd.when_connected()
        reason = yield link.when_lost()
        self.assertIn("VerificationError", reason)
        self.assertIsNone(link.peer_fingerprint)
        self.assertEqual(self.kd_handler.up_count, 0)
        self.assertIsNone(kd.peer)

    @defer.inlineCallbacks
    def test_md_certificate_from_another_ca_refused(self):
        other_pki = DevPki(Path(self.mktemp()))
        foreign = other_pki.issue("md", ["localhost"], ["127.0.0.1"])
        md = self.start_md(certificate=foreign)
        kd = self.start_kd(md.port, min_delay=5.0)
        link = yield kd.when_connected()
        reason = yield link.when_lost()
        self.assertIn("certificate verify failed", reason)
        self.assertIsNone(link.peer_fingerprint)
        self.assertEqual(self.kd_handler.up_count, 0)
        self.assertEqual(self.md_handler.up_count, 0)

    @defer.inlineCallbacks
    def test_tls12_client_refused(self):
        md = self.start_md()
        private = loaded_private(self.kd_cert)
        options = ssl.CertificateOptions(
            privateKey=private.privateKey.original, certificate=private.original,
            lowerMaximumSecurityTo=ssl.TLSVersion.TLSv1_2)
        raw = yield self.raw_client(md.port, options)
        reason = yield raw.when_lost()
        self.assertFalse(raw.handshake_done)
        self.assertIn("version", str(reason))
        self.assertEqual(raw.data, b"")
        self.assertEqual(self.md_handler.up_count, 0)

    @defer.inlineCallbacks
    def test_client_without_certificate_refused(self):
        md = self.start_md()
        raw = yield self.raw_client(md.port, ssl.optionsForClientTLS(
            "localhost", trustRoot=ssl.Certificate.loadPEM(
                self.pki.ca_certificate_path.read_bytes())))
        yield raw.when_lost()
        self.assertEqual(raw.data, b"")
        self.assertEqual(self.md_handler.up_count, 0)

    @defer.inlineCallbacks
    def test_two_mds_on_one_host(self):
        """Tunnels to two MD processes on one host (one certificate name) side by side in
        one parent service, as the KD's (cascaded MDs, issue 12): their service names
        differ, and so do their peers' names (the KD's handler keeps MDs by them)."""
        from twisted.application.service import MultiService

        mds = [self.start_md(), self.start_md()]
        parent = MultiService()
        clients = []
        for md in mds:
            client = KdTunnelClient(
                reactor, host="localhost", port=md.port, name="localhost",
                ca_certificate=str(self.pki.ca_certificate_path),
                certificate=str(self.kd_cert.certificate),
                private_key=str(self.kd_cert.private_key),
                handler=self.kd_handler, metrics=None, min_delay=0.05, max_delay=1.0)
            client.setServiceParent(parent)
            clients.append(client)
        parent.startService()
        self.addCleanup(parent.stopService)
        self.assertEqual(len({client.name for client in clients}), 2)
        peers = yield defer.gatherResults([client.when_up() for client in clients])
        self.assertEqual([md.peers() != [] for md in mds], [True, True])
        self.assertEqual([peer.peer_name for peer in peers],
                         [f"localhost:{md.port}" for md in mds])

    def test_open_key_file_refused(self):
        self.md_cert.private_key.chmod(0o644)
        with self.assertRaises(TlsFileError):
            MdTunnelServer(reactor, bind="127.0.0.1", port=0,
                           certificate=str(self.md_cert.certificate),
                           private_key=str(self.md_cert.private_key),
                           is_trusted_kd=self.trusted.__contains__, handler=self.md_handler,
                           metrics=None)
        self.kd_cert.private_key.chmod(0o644)
        with self.assertRaises(TlsFileError):
            KdTunnelClient(reactor, host="127.0.0.1", port=1, name="localhost",
                           ca_certificate=str(self.pki.ca_certificate_path),
                           certificate=str(self.kd_cert.certificate),
                           private_key=str(self.kd_cert.private_key),
                           handler=self.kd_handler, metrics=None)


class BadPeerTests(TunnelTestBase):
    """A misbehaving KD loses its own connection only; the good KD keeps working."""

    @defer.inlineCallbacks
    def bad_kd(self, payload: bytes, reason: str, **server_options: Any):
        md = self.start_md(**server_options)
        kd = self.start_kd(md.port)
        good = yield kd.when_up()
        good_md_side = yield self.md_handler.ups.get()

        raw = yield self.raw_kd(md.port, self.kd2_cert)
        yield raw.first_data
        bad_md_side = yield self.md_handler.ups.get()
        self.assertEqual(bad_md_side.peer_fingerprint, fingerprint_of(self.kd2_cert))
        raw.transport.write(payload)
        yield raw.when_lost()
        peer, why = yield self.md_handler.downs.get()
        self.assertIs(peer, bad_md_side)
        self.assertTrue(why.startswith(reason), why)
        self.assertEqual(self.sample(self.md_metrics, "perc_tunnel_errors_total",
                                     reason=reason), 1)
        self.assertEqual(md.peers(), [good_md_side])

        aid = new_association_id()
        good.send(TunneledDtls(aid, b"still here"))
        _, message = yield self.md_handler.messages.get()
        self.assertEqual(message, TunneledDtls(aid, b"still here"))
        good_md_side.send(EndpointDisconnect(aid))
        _, message = yield self.kd_handler.messages.get()
        self.assertEqual(message, EndpointDisconnect(aid))
        self.assertEqual(self.md_handler.message_count, 1)

    def test_malformed_frame(self):
        # EndpointDisconnect whose body is 3 bytes instead of a 16-byte uuid.
        return self.bad_kd(b"\x05\x00\x03abc", "tunnel_malformed")

    def test_unknown_type(self):
        return self.bad_kd(b"\x99\x00\x00", "tunnel_unknown_type")

    def test_oversized_length_refused_before_body(self):
        # Only the header is sent: the length alone is enough to close.
        return self.bad_kd(b"\x04\xff\xff", "tunnel_frame_too_large", max_body_length=4096)

    def test_supported_profiles_from_kd(self):
        return self.bad_kd(SupportedProfiles((0x0009,)).encode(), "tunnel_unexpected_message")

    def test_unsupported_version_from_kd(self):
        return self.bad_kd(UnsupportedVersion(0).encode(), "tunnel_kd_unsupported_version")

    def test_pong_that_answers_no_ping(self):
        return self.bad_kd(Pong(5).encode(), "tunnel_unexpected_pong")

    @defer.inlineCallbacks
    def test_messages_before_bad_frame_are_delivered(self):
        md = self.start_md()
        raw = yield self.raw_kd(md.port, self.kd2_cert)
        yield raw.first_data
        aid = new_association_id()
        raw.transport.write(EndpointDisconnect(aid).encode() + b"\x99\x00\x00")
        yield raw.when_lost()
        _, message = yield self.md_handler.messages.get()
        self.assertEqual(message, EndpointDisconnect(aid))


class TimeoutTests(TunnelTestBase):
    @defer.inlineCallbacks
    def test_close_aborts_when_peer_never_answers_close_notify(self):
        self.patch(tunnel_link, "CLOSE_TIMEOUT", 0.05)
        md = self.start_md()
        raw = yield self.raw_kd(md.port, self.kd2_cert)
        yield raw.first_data
        md_peer = yield self.md_handler.ups.get()
        raw.transport.transport.pauseProducing()  # never reads our close_notify
        md_peer.close("going away")
        peer, reason = yield self.md_handler.downs.get()
        self.assertIs(peer, md_peer)
        self.assertEqual(reason, "going away")
        self.assertEqual(md.peers(), [])

    @defer.inlineCallbacks
    def test_silent_connection_dropped_after_handshake_timeout(self):
        md = self.start_md(limits=ConnectionLimits(handshake_timeout=0.05))
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", md.port)
        raw = yield endpoint.connect(Factory.forProtocol(RawPeer))  # plain TCP, no TLS
        reason = yield raw.when_lost()
        self.assertIsNotNone(reason)
        self.assertEqual(self.sample(self.md_metrics, "perc_connections_closed_total",
                                     listener="md-tunnel", reason="handshake_timeout"), 1)
        self.assertEqual(self.md_handler.up_count, 0)
        self.assertEqual(md._connections, set())

    @defer.inlineCallbacks
    def test_kd_gives_up_on_an_md_that_never_sends_supported_profiles(self):
        self.patch(tunnel_link, "HANDSHAKE_TIMEOUT", 0.3)
        connections: list[RawPeer] = []

        class MuteMdFactory(Factory):
            def buildProtocol(self, addr: object) -> RawPeer:
                peer = RawPeer()
                connections.append(peer)
                return peer

        port = reactor.listenSSL(0, MuteMdFactory(), md_tunnel_context_factory(
            str(self.md_cert.certificate), str(self.md_cert.private_key)),
            interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        kd = self.start_kd(port.getHost().port, min_delay=5.0)
        link = yield kd.when_connected()
        reason = yield link.when_lost()
        self.assertIn("tunnel not up within 0.3 s", reason)
        self.assertEqual(self.sample(self.kd_metrics, "perc_tunnel_errors_total",
                                     reason="tunnel_handshake_timeout"), 1)
        yield kd.stopService()
        for connection in connections:
            yield connection.when_lost()


class KdVersionTests(TunnelTestBase):
    @defer.inlineCallbacks
    def raw_md(self, greeting: bytes):
        """A TLS 1.3 server with the MD's certificate that greets with ``greeting``."""
        connections: list[RawPeer] = []
        first: defer.Deferred[RawPeer] = defer.Deferred()

        class RawMdFactory(Factory):
            def buildProtocol(self, addr: object) -> RawPeer:
                peer = RawPeer(greeting)
                connections.append(peer)
                if not first.called:
                    first.callback(peer)
                return peer

        port = reactor.listenSSL(0, RawMdFactory(), md_tunnel_context_factory(
            str(self.md_cert.certificate), str(self.md_cert.private_key)),
            interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        kd = self.start_kd(port.getHost().port, min_delay=5.0)
        peer = yield first
        yield peer.when_lost()
        yield kd.stopService()
        for other in connections:
            yield other.when_lost()
        return peer

    @defer.inlineCallbacks
    def test_unsupported_version_answered_and_closed(self):
        # SupportedProfiles with version byte 1 (RFC 9185 §5.5).
        peer = yield self.raw_md(b"\x01\x00\x05\x01\x00\x02\x00\x09")
        self.assertEqual(peer.data, UnsupportedVersion(0).encode())
        self.assertEqual(peer.data, b"\x02\x00\x01\x00")
        self.assertEqual(self.kd_handler.up_count, 0)
        self.assertEqual(self.sample(self.kd_metrics, "perc_tunnel_errors_total",
                                     reason="tunnel_unsupported_version"), 1)

    @defer.inlineCallbacks
    def test_no_double_profile_refused(self):
        peer = yield self.raw_md(SupportedProfiles((0x0007, 0x0008)).encode())
        self.assertEqual(peer.data, b"")
        self.assertEqual(self.kd_handler.up_count, 0)
        self.assertEqual(self.sample(self.kd_metrics, "perc_tunnel_errors_total",
                                     reason="tunnel_no_double_profile"), 1)

    @defer.inlineCallbacks
    def test_message_before_supported_profiles_refused(self):
        peer = yield self.raw_md(EndpointDisconnect(new_association_id()).encode())
        self.assertEqual(peer.data, b"")
        self.assertEqual(self.kd_handler.up_count, 0)
        self.assertEqual(self.kd_handler.message_count, 0)


def first_of(*ds: defer.Deferred[Any]) -> defer.Deferred[Any]:
    """Fires when the first of ``ds`` does (the others keep running)."""
    return defer.DeferredList(list(ds), fireOnOneCallback=True, consumeErrors=True)


def wait_until(predicate: Any, interval: float = 0.02) -> defer.Deferred[None]:
    """Polls ``predicate`` on the reactor until it is true (the test's timeout bounds it)."""
    @defer.inlineCallbacks
    def poll():
        while not predicate():
            yield task.deferLater(reactor, interval, lambda: None)
    return poll()


PING_HEADER = b"\xf3\x00\x08"


class DuplicateKdTests(TunnelTestBase):
    """A second connection presenting a pinned KD's certificate (docs/PROTOCOL.md).

    The attacker holds a copy of the KD's certificate and key; the genuine
    KD's tunnel must neither be taken over while it answers nor become
    silently useless, and a genuine KD that restarted must take over.
    """

    @defer.inlineCallbacks
    def test_attacker_with_the_kd_key_refused_while_the_kd_tunnel_answers(self):
        md = self.start_md()
        kd = self.start_kd(md.port)
        genuine = yield kd.when_up()
        md_side = yield self.md_handler.ups.get()

        attacker = yield self.raw_kd(md.port, self.kd_cert)
        yield first_of(attacker.first_data, attacker.when_lost())
        # Refused before anything was sent to it: no SupportedProfiles, no Associations.
        self.assertEqual(attacker.data, b"")
        yield attacker.when_lost()
        self.assertEqual(self.md_handler.up_count, 1)
        self.assertEqual(md.peers(), [md_side])
        self.assertIs(md.peer_for(fingerprint_of(self.kd_cert)), md_side)
        self.assertEqual(self.sample(self.md_metrics, "perc_tunnel_duplicates_total",
                                     outcome="refused"), 1)
        self.assertEqual(self.sample(self.md_metrics, "perc_tunnel_kds_connected"), 1)
        # The attacker has gone: the genuine tunnel is still the registered one, both ways.
        self.assertEqual(len(self.md_handler.downs.pending), 0)
        self.assertIs(kd.peer, genuine)
        aid = new_association_id()
        genuine.send(EndpointDisconnect(aid))
        peer, message = yield self.md_handler.messages.get()
        self.assertIs(peer, md_side)
        self.assertEqual(message, EndpointDisconnect(aid))
        md_side.send(TunneledDtls(aid, b"to the kd"))
        _, message = yield self.kd_handler.messages.get()
        self.assertEqual(message, TunneledDtls(aid, b"to the kd"))

    @defer.inlineCallbacks
    def test_kd_refused_while_an_answering_attacker_holds_the_tunnel_then_takes_over(self):
        md = self.start_md()
        attacker_handler = Recorder()
        attacker = self.start_kd(md.port, handler=attacker_handler)
        yield attacker.when_up()
        attacker_md_side = yield self.md_handler.ups.get()

        kd = self.start_kd(md.port)  # the genuine KD, second
        yield wait_until(lambda: self.sample(
            self.md_metrics, "perc_tunnel_duplicates_total", outcome="refused") >= 2)
        self.assertIsNone(kd.peer)
        self.assertEqual(md.peers(), [attacker_md_side])
        self.assertEqual(self.md_handler.up_count, 1)

        yield attacker.stopService()  # the attacker leaves: the KD's next attempt gets in
        genuine = yield kd.when_up()
        md_side = yield self.md_handler.ups.get()
        self.assertEqual(md.peers(), [md_side])
        genuine.send(EndpointDisconnect(new_association_id()))
        peer, _ = yield self.md_handler.messages.get()
        self.assertIs(peer, md_side)

    @defer.inlineCallbacks
    def test_restarted_kd_replaces_its_old_connection_that_no_longer_answers(self):
        md = self.start_md(liveness_interval=30.0, liveness_timeout=0.3)
        old = yield self.raw_kd(md.port, self.kd_cert)  # up, then never answers again
        yield old.first_data
        old_md_side = yield self.md_handler.ups.get()

        kd = self.start_kd(md.port)
        yield kd.when_up()
        md_side = yield self.md_handler.ups.get()
        self.assertIsNot(md_side, old_md_side)
        self.assertEqual(md.peers(), [md_side])
        peer, reason = yield self.md_handler.downs.get()
        self.assertIs(peer, old_md_side)
        self.assertTrue(reason.startswith("tunnel_liveness_timeout"), reason)
        yield old.when_lost()
        self.assertIn(PING_HEADER, old.data)  # it was asked
        self.assertEqual(self.sample(self.md_metrics, "perc_tunnel_duplicates_total",
                                     outcome="replaced"), 1)
        self.assertEqual(self.sample(self.md_metrics, "perc_tunnel_kds_connected"), 1)

    @defer.inlineCallbacks
    def test_newcomer_registered_as_soon_as_the_old_connection_goes(self):
        md = self.start_md(liveness_interval=600.0, liveness_timeout=600.0)
        old = yield self.raw_kd(md.port, self.kd_cert)
        yield old.first_data
        yield self.md_handler.ups.get()

        kd = self.start_kd(md.port)
        yield wait_until(lambda: PING_HEADER in old.data)  # the MD checks the old one
        self.assertIsNone(kd.peer)
        old.transport.abortConnection()  # e.g. the kernel closing a killed KD's socket
        yield kd.when_up()  # long before the 600 s liveness timeout
        md_side = yield self.md_handler.ups.get()
        self.assertEqual(md.peers(), [md_side])


class LivenessTests(TunnelTestBase):
    @defer.inlineCallbacks
    def test_pings_answered_both_ways_keep_the_tunnel_up(self):
        md = self.start_md(liveness_interval=0.05, liveness_timeout=0.2)
        kd = self.start_kd(md.port, liveness_interval=0.05, liveness_timeout=0.2)
        peer = yield kd.when_up()
        md_side = yield self.md_handler.ups.get()
        yield task.deferLater(reactor, 1.0, lambda: None)  # many Ping rounds
        self.assertIs(kd.peer, peer)
        self.assertEqual(md.peers(), [md_side])
        self.assertEqual((len(self.md_handler.downs.pending),
                          len(self.kd_handler.downs.pending)), (0, 0))
        self.assertEqual(self.md_handler.message_count + self.kd_handler.message_count, 0)
        self.assertTrue(md_side.is_open and peer.is_open)

    @defer.inlineCallbacks
    def test_md_closes_a_registered_tunnel_that_stops_answering(self):
        md = self.start_md(liveness_interval=0.1, liveness_timeout=0.2)
        raw = yield self.raw_kd(md.port, self.kd_cert)
        yield raw.first_data
        md_side = yield self.md_handler.ups.get()
        peer, reason = yield self.md_handler.downs.get()
        self.assertIs(peer, md_side)
        self.assertTrue(reason.startswith("tunnel_liveness_timeout"), reason)
        yield raw.when_lost()
        self.assertEqual(raw.data, SupportedProfiles(MD_PROFILES).encode() + Ping(1).encode())
        self.assertEqual(md.peers(), [])
        self.assertEqual(self.sample(self.md_metrics, "perc_tunnel_errors_total",
                                     reason="tunnel_liveness_timeout"), 1)

    @defer.inlineCallbacks
    def test_kd_reconnects_when_the_md_stops_serving_its_tunnel(self):
        # An MD that greets, then never answers: gone, or serving another connection.
        connections: list[RawPeer] = []

        class SilentMdFactory(Factory):
            def buildProtocol(self, addr: object) -> RawPeer:
                peer = RawPeer(SupportedProfiles(MD_PROFILES).encode())
                connections.append(peer)
                return peer

        port = reactor.listenSSL(0, SilentMdFactory(), md_tunnel_context_factory(
            str(self.md_cert.certificate), str(self.md_cert.private_key)),
            interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        kd = self.start_kd(port.getHost().port, liveness_interval=0.1, liveness_timeout=0.2)
        first = yield kd.when_up()
        peer, reason = yield self.kd_handler.downs.get()
        self.assertIs(peer, first)
        self.assertTrue(reason.startswith("tunnel_liveness_timeout"), reason)
        second = yield kd.when_up()  # connected again
        self.assertIsNot(second, first)
        self.assertIn(Ping(1).encode(), connections[0].data)
        self.assertEqual(self.sample(self.kd_metrics, "perc_tunnel_errors_total",
                                     reason="tunnel_liveness_timeout"), 1)
        yield kd.stopService()
        for connection in connections:
            yield connection.when_lost()


class RateLimitedLogTests(unittest.TestCase):
    def test_once_per_interval_with_suppressed_count(self):
        from twisted.internet.task import Clock
        from twisted.logger import Logger

        events: list[dict[str, Any]] = []
        clock = Clock()
        limited = RateLimitedLog(Logger(observer=events.append), clock, interval=10.0)
        self.assertTrue(limited.warn("tunnel_malformed", "bad {n}", n=1))
        for n in range(5):
            self.assertFalse(limited.warn("tunnel_malformed", "bad {n}", n=n))
        self.assertTrue(limited.warn("other", "other"))
        clock.advance(10.0)
        self.assertTrue(limited.warn("tunnel_malformed", "bad {n}", n=9))
        self.assertEqual([e.get("suppressed") for e in events], [0, 0, 5])
