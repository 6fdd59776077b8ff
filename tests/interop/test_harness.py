"""Self-checks of the interop harness: OpenSSL against OpenSSL through link.py.

These run today, without our engine, and prove that OpenSSLPeer, the fake
clock hook and the Link (loss, reordering, duplication, caps) work, and that
the openssl binaries start and print what test_openssl_binaries parses.
"""

from __future__ import annotations

import itertools
import shutil
import socket
import sys
import tempfile

from twisted.trial import unittest

from tests.interop import openssl_clock
from tests.interop.link import (
    HANDSHAKE_CLIENT_HELLO,
    HANDSHAKE_HELLO_VERIFY_REQUEST,
    FakeClock,
    Link,
    LinkStalled,
    OpenSSLEndpoint,
    client_hello_cookie,
    hello_verify_request_cookie,
    plaintext_handshake_messages,
    run_handshake,
)
from tests.interop.openssl_binaries import (
    OPENSSL,
    UdpDriver,
    free_udp_port,
    s_client,
    s_server,
)
from tests.interop.openssl_peer import (
    CLIENT,
    SERVER,
    OpenSSLPeer,
    split_records,
    write_pem_files,
)

LOSSY_SEEDS = (1, 2, 3, 4, 5, 6)


def openssl_pair(clock: FakeClock, **kwargs):
    server_kwargs = dict(kwargs)
    client_kwargs = {k: v for k, v in kwargs.items() if k != "cookie"}
    client = OpenSSLPeer(CLIENT, clock=clock, **client_kwargs)
    server = OpenSSLPeer(SERVER, clock=clock, **server_kwargs)
    return client, server


class OpenSSLToOpenSSLTests(unittest.TestCase):
    def setUp(self):
        openssl_clock.use_fake_time(self, required=False)

    def handshake(self, *, seed=0, loss=0.0, reorder=0.0, duplicate=0.0, **kwargs):
        clock = FakeClock(100.0)
        client, server = openssl_pair(clock, **kwargs)
        a, b = OpenSSLEndpoint(client), OpenSSLEndpoint(server)
        link = run_handshake(
            a, b, clock=clock, loss=loss, reorder=reorder, duplicate=duplicate, seed=seed
        )
        return client, server, link

    def assert_established(self, client, server, link, *, profile=0x0007, length=56):
        self.assertIsNone(client.error, link.describe())
        self.assertIsNone(server.error, link.describe())
        self.assertTrue(client.handshake_done and server.handshake_done, link.describe())
        self.assertEqual(client.selected_srtp_profile(), profile)
        self.assertEqual(server.selected_srtp_profile(), profile)
        client_keys = client.export_srtp_keying_material(length)
        self.assertEqual(len(client_keys), length)
        self.assertEqual(client_keys, server.export_srtp_keying_material(length))
        self.assertEqual(client.peer_fingerprint(), server.fingerprint)
        self.assertEqual(server.peer_fingerprint(), client.fingerprint)
        self.assertEqual(client.cipher_suite(), server.cipher_suite())
        # App data both ways (unreliable in DTLS: deliver without impairment).
        client.send(b"ping from client")
        server.send(b"pong from server")
        link.flush()
        self.assertEqual(server.received, [b"ping from client"])
        self.assertEqual(client.received, [b"pong from server"])
        # Every datagram respects OpenSSL's MTU and is whole records.
        for sender, datagram in link.transcript:
            split_records(datagram)
            peer = client if sender == "openssl-client" else server
            self.assertLessEqual(len(datagram), peer.datagram_limit, sender)

    def test_lossless(self):
        client, server, link = self.handshake()
        self.assert_established(client, server, link)
        self.assertEqual(client.cipher_suite(), 0xC02B)
        self.assertEqual(link.stats["lost"], 0)
        self.assertFalse([k for k in link.stats if k.startswith("timer:")], link.stats)
        # Over a memory BIO OpenSSL packs several records per datagram.
        self.assertTrue(any(len(split_records(d)) > 1 for _, d in link.transcript))

    def test_aes256_gcm_suite_and_profile(self):
        client, server, link = self.handshake(
            ciphers="ECDHE-ECDSA-AES256-GCM-SHA384", srtp_profiles="SRTP_AEAD_AES_256_GCM"
        )
        self.assert_established(client, server, link, profile=0x0008, length=88)
        self.assertEqual(client.cipher_suite(), 0xC02C)

    def test_groups(self):
        cases = (
            ("P-256", "P-256", "secp256r1"),
            ("X25519:P-256", "X25519:P-256", "x25519"),
            ("P-256:X25519", "X25519:P-256", "secp256r1"),  # OpenSSL server: client's order
            (None, None, "x25519"),  # OpenSSL's defaults
        )
        for client_groups, server_groups, name in cases:
            clock = FakeClock()
            client = OpenSSLPeer(CLIENT, clock=clock, groups=client_groups)
            server = OpenSSLPeer(SERVER, clock=clock, groups=server_groups)
            link = run_handshake(OpenSSLEndpoint(client), OpenSSLEndpoint(server), clock=clock)
            self.assert_established(client, server, link)
            self.assertEqual(client.group_name(), name, (client_groups, server_groups))

    def test_ecdsa_p256_certificates_need_p256_in_both_group_lists(self):
        # TLS 1.2 (RFC 8422 s5.1): the client's supported_groups also bound the
        # curve of the server's ECDSA certificate. An OpenSSL server finds no
        # usable suite if P-256 is missing, whatever the ECDHE group.
        clock = FakeClock()
        client = OpenSSLPeer(CLIENT, clock=clock, groups="X25519")
        server = OpenSSLPeer(SERVER, clock=clock, groups="X25519")
        run_handshake(OpenSSLEndpoint(client), OpenSSLEndpoint(server), clock=clock)
        self.assertIn("no shared cipher", str(server.error))
        self.assertIn((2, 40), client.alerts_received)
        # ... and an OpenSSL server checks a client's ECDSA certificate against
        # its own group list: without P-256 there, illegal_parameter.
        clock = FakeClock()
        client = OpenSSLPeer(CLIENT, clock=clock, groups="X25519:P-256")
        server = OpenSSLPeer(SERVER, clock=clock, groups="X25519")
        run_handshake(OpenSSLEndpoint(client), OpenSSLEndpoint(server), clock=clock)
        self.assertIn("wrong curve", str(server.error))
        self.assertIn((2, 47), client.alerts_received)

    def test_one_record_per_datagram(self):
        client, server, link = self.handshake(pack=False)
        self.assert_established(client, server, link)
        self.assertTrue(all(len(split_records(d)) == 1 for _, d in link.transcript))

    def test_mtu(self):
        client, server, link = self.handshake(mtu=1200)
        self.assert_established(client, server, link)
        self.assertGreater(max(len(d) for _, d in link.transcript), 256)
        self.assertRaises(ValueError, OpenSSLPeer, CLIENT, mtu=200)

    def test_lossy(self):
        openssl_clock.use_fake_time(self)
        for seed in LOSSY_SEEDS:
            client, server, link = self.handshake(seed=seed, loss=0.2, reorder=0.2, duplicate=0.1)
            self.assert_established(client, server, link)
            self.assertGreater(link.stats["lost"], 0, f"seed {seed}: {link.stats}")  # all do
            self.assertGreater(link.stats["duplicated"] + link.stats["reordered"], 0)

    def test_cookie_exchange(self):
        client, server, link = self.handshake(cookie=True)
        self.assert_established(client, server, link)
        # OpenSSL calls the verify callback twice (DTLSv1_listen, then accept).
        self.assertEqual(server.cookies_issued, 1)
        self.assertGreaterEqual(server.cookies_verified, 1)
        hvr = [
            body
            for sender, d in link.transcript
            if sender == "openssl-server"
            for t, body in plaintext_handshake_messages(d)
            if t == HANDSHAKE_HELLO_VERIFY_REQUEST
        ]
        hellos = [
            body
            for sender, d in link.transcript
            if sender == "openssl-client"
            for t, body in plaintext_handshake_messages(d)
            if t == HANDSHAKE_CLIENT_HELLO
        ]
        self.assertEqual(len(hvr), 1)
        self.assertEqual(client_hello_cookie(hellos[0]), b"")
        self.assertEqual(client_hello_cookie(hellos[1]), hello_verify_request_cookie(hvr[0]))
        self.assertEqual(len(hello_verify_request_cookie(hvr[0])), 16)

    def test_no_common_srtp_profile_openssl_server_goes_on_without(self):
        # What the engine will see from an OpenSSL server: no use_srtp in the
        # ServerHello and a completed handshake, so our client must decide.
        clock = FakeClock()
        client = OpenSSLPeer(CLIENT, clock=clock, srtp_profiles="SRTP_AEAD_AES_128_GCM")
        server = OpenSSLPeer(SERVER, clock=clock, srtp_profiles="SRTP_AEAD_AES_256_GCM")
        run_handshake(OpenSSLEndpoint(client), OpenSSLEndpoint(server), clock=clock)
        self.assertTrue(client.handshake_done and server.handshake_done)
        self.assertIsNone(client.selected_srtp_profile())
        self.assertIsNone(server.selected_srtp_profile())

    def test_alerts_are_recorded(self):
        clock = FakeClock()
        client = OpenSSLPeer(CLIENT, clock=clock, ciphers="ECDHE-ECDSA-AES256-GCM-SHA384")
        server = OpenSSLPeer(SERVER, clock=clock, ciphers="ECDHE-ECDSA-AES128-GCM-SHA256")
        run_handshake(OpenSSLEndpoint(client), OpenSSLEndpoint(server), clock=clock)
        self.assertIsNotNone(server.error)
        self.assertIsNotNone(client.error)
        self.assertIn((2, 40), server.alerts_sent)  # handshake_failure
        self.assertIn((2, 40), client.alerts_received)


class LinkTests(unittest.TestCase):
    def setUp(self):
        openssl_clock.use_fake_time(self, required=False)

    def test_openssl_timer_follows_fake_clock(self):
        """OpenSSL's own schedule: 1 s doubling to 60 s; 12 retransmissions, then it fails."""
        openssl_clock.use_fake_time(self)
        clock = FakeClock(50.0)
        peer = OpenSSLPeer(CLIENT, clock=clock)
        sent = [(clock.now, len(peer.pump()))]
        while peer.error is None:
            remaining = peer.timeout()
            self.assertIsNotNone(remaining)
            clock.now += remaining
            if peer.handle_timeout():
                sent.append((clock.now, len(peer.pump())))
        gaps = [round(b[0] - a[0], 3) for a, b in itertools.pairwise(sent)]
        self.assertEqual(gaps, [1, 2, 4, 8, 16, 32, 60, 60, 60, 60, 60, 60])
        self.assertEqual(clock.now - sent[-1][0], 60)  # the 13th timeout ends it
        self.assertIsNotNone(peer.error)
        self.assertTrue(peer.failed_state())

    def test_fake_clock_hook_available_on_linux(self):
        if not sys.platform.startswith("linux"):
            raise unittest.SkipTest("the hook is Linux-only")
        self.assertTrue(openssl_clock.install(), openssl_clock.UNAVAILABLE_REASON)
        clock = FakeClock(10_000.0)
        peer = OpenSSLPeer(CLIENT, clock=clock)
        peer.pump()
        clock.now += 0.75
        self.assertAlmostEqual(peer.timeout(), 0.25, places=3)
        # Uninstalled, OpenSSL is back on the wall clock whatever the fake clock says.
        openssl_clock.uninstall()
        peer = OpenSSLPeer(CLIENT, clock=clock)
        peer.pump()
        clock.now += 1000
        self.assertGreater(peer.timeout(), 0.5)
        self.assertFalse(peer.handle_timeout())
        self.assertTrue(openssl_clock.install())

    def test_stall_is_a_failure_not_a_hang(self):
        clock = FakeClock()
        client = OpenSSLEndpoint(OpenSSLPeer(CLIENT, clock=clock))
        server = OpenSSLEndpoint(OpenSSLPeer(SERVER, clock=clock))
        link = Link(client, server, clock=clock, loss=1.0, max_steps=50, max_time=30.0)
        self.assertRaises(LinkStalled, link.run, lambda: client.complete and server.complete)

    def test_seeded_impairment_is_deterministic(self):
        runs = []
        for _ in range(2):
            clock = FakeClock()
            client = OpenSSLEndpoint(OpenSSLPeer(CLIENT, clock=clock))
            server = OpenSSLEndpoint(OpenSSLPeer(SERVER, clock=clock))
            link = Link(client, server, clock=clock, loss=0.3, duplicate=0.3, reorder=0.3, seed=7)
            link._send(client, b"x" * 20, True)
            for i in range(40):
                link._send(client, bytes([i]) * 20, True)
            runs.append((dict(link.stats), [d for _, d in link._in_flight]))
        self.assertEqual(runs[0], runs[1])
        self.assertGreater(runs[0][0]["lost"], 0)


class OpenSSLBinaryTests(unittest.TestCase):
    """pyOpenSSL against the real openssl s_server / s_client over UDP."""

    timeout = 30

    def setUp(self):
        if OPENSSL is None:
            raise unittest.SkipTest("no openssl binary")
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, True)
        self.peer_certificate = OpenSSLPeer(CLIENT)  # just for a certificate
        self.cert, self.key = write_pem_files(
            directory, self.peer_certificate.certificate, self.peer_certificate.private_key
        )
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(self.sock.close)
        self.sock.bind(("127.0.0.1", 0))

    def test_pyopenssl_client_against_s_server(self):
        port = free_udp_port()
        server = s_server(
            port, self.cert, self.key, profile="SRTP_AEAD_AES_128_GCM", keymat_length=56
        )
        self.addCleanup(server.stop)
        server.wait_for("ACCEPT", 10)
        peer = OpenSSLPeer(CLIENT)
        driver = UdpDriver(OpenSSLEndpoint(peer), self.sock, ("127.0.0.1", port))
        driver.run(lambda: peer.handshake_done or peer.error is not None, 20)
        self.assertIsNone(peer.error)
        self.assertEqual(server.keying_material(10), peer.export_srtp_keying_material(56))
        self.assertEqual(server.srtp_profile(10), "SRTP_AEAD_AES_128_GCM")
        self.assertEqual(server.peer_certificate_der(10), peer.certificate_der)
        self.assertEqual(peer.peer_fingerprint(), self.peer_certificate.fingerprint)
        peer.send(b"hello s_server\n")
        server.write(b"hello peer\n")
        driver.run(lambda: bool(peer.received), 10)
        self.assertEqual(peer.received, [b"hello peer\n"])
        server.wait_for("hello s_server", 10)

    def test_s_client_against_pyopenssl_server(self):
        peer = OpenSSLPeer(SERVER, srtp_profiles="SRTP_AEAD_AES_256_GCM")
        port = self.sock.getsockname()[1]
        client = s_client(
            port, self.cert, self.key, profile="SRTP_AEAD_AES_256_GCM", keymat_length=88
        )
        self.addCleanup(client.stop)
        driver = UdpDriver(OpenSSLEndpoint(peer), self.sock)
        driver.run(lambda: peer.handshake_done or peer.error is not None, 20)
        self.assertIsNone(peer.error)
        self.assertEqual(client.keying_material(10), peer.export_srtp_keying_material(88))
        self.assertEqual(client.srtp_profile(10), "SRTP_AEAD_AES_256_GCM")
        self.assertEqual(client.peer_certificate_der(10), peer.certificate_der)
        self.assertEqual(peer.peer_fingerprint(), self.peer_certificate.fingerprint)
        client.write(b"hello peer\n")
        peer.send(b"hello s_client\n")
        driver.run(lambda: bool(peer.received), 10)
        self.assertEqual(peer.received, [b"hello peer\n"])
        client.wait_for("hello s_client", 10)
