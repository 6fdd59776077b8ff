"""Our sans-I/O DTLS 1.2 engine against OpenSSL (pyOpenSSL over memory BIOs).

Skipped until perc_daemons.protocol.dtls exports the engine.  Everything runs
on a fake clock through tests/interop/link.py; OpenSSL's own timers follow
that clock through tests/interop/openssl_clock.py.
"""

from __future__ import annotations

import hashlib
import os

from twisted.trial import unittest

from tests.interop import openssl_clock
from tests.interop.link import (
    HANDSHAKE_CLIENT_HELLO,
    HANDSHAKE_HELLO_VERIFY_REQUEST,
    EngineEndpoint,
    FakeClock,
    OpenSSLEndpoint,
    client_hello_cookie,
    hello_verify_request_cookie,
    plaintext_handshake_messages,
    run_handshake,
)
from tests.interop.openssl_peer import (
    CLIENT,
    SERVER,
    OpenSSLPeer,
)

try:
    from perc_daemons.protocol.dtls import (
        DtlsConfiguration,
        DtlsConnection,
        Role,
        certificate_fingerprint,
        generate_certificate,
    )
except ImportError:
    DtlsConnection = None

SKIP = "DTLS engine not written yet" if DtlsConnection is None else None

ALERT_HANDSHAKE_FAILURE = 40
ALERT_BAD_CERTIFICATE = 42
FATAL = 2

AES128_GCM_SHA256 = ("ECDHE-ECDSA-AES128-GCM-SHA256", 0xC02B)
AES256_GCM_SHA384 = ("ECDHE-ECDSA-AES256-GCM-SHA384", 0xC02C)
SRTP_128_GCM = ("SRTP_AEAD_AES_128_GCM", 0x0007, 56)
SRTP_256_GCM = ("SRTP_AEAD_AES_256_GCM", 0x0008, 88)

LOSSY_SEEDS = (1, 2, 3, 4, 5)
IMPAIRMENT = {"loss": 0.2, "reorder": 0.2, "duplicate": 0.1}


def make_engine(
    role,
    *,
    mtu: int = 1200,
    srtp_profiles=(0x0007, 0x0008),
    expected_peer_fingerprint: bytes | None = None,
    cookie_secret: bytes | None = None,
):
    """(EngineEndpoint, our certificate DER)."""
    certificate, private_key = generate_certificate()
    config = DtlsConfiguration(
        certificate=certificate,
        private_key=private_key,
        srtp_profiles=list(srtp_profiles),
        ekt_ciphers=[],
        expected_peer_fingerprint=expected_peer_fingerprint,
        external_session_id=None,
        mtu=mtu,
        initial_retransmit=1.0,
        max_retransmit=60.0,
        cookie_secret=cookie_secret,
    )
    connection = DtlsConnection(role, config)
    return EngineEndpoint(connection, client=role == Role.CLIENT, mtu=mtu), certificate


def handshake_bodies(link, sender: str, msg_type: int) -> list[bytes]:
    return [
        body
        for name, datagram in link.transcript
        if name == sender
        for t, body in plaintext_handshake_messages(datagram)
        if t == msg_type
    ]


class InteropTestCase(unittest.TestCase):
    skip = SKIP

    def setUp(self):
        self.clock = FakeClock(1000.0)
        # Lossless tests do not need it (no timer should fire), so do not skip.
        self.fake_openssl_time = openssl_clock.use_fake_time(self, required=False)

    def pair(self, engine_role: str, *, openssl=None, engine=None, expect_fingerprint=True):
        """Our endpoint in engine_role ("client"/"server") and an OpenSSLPeer opposite."""
        openssl = dict(openssl or {})
        engine = dict(engine or {})
        theirs = OpenSSLPeer(
            SERVER if engine_role == CLIENT else CLIENT, clock=self.clock, **openssl
        )
        if expect_fingerprint:
            engine.setdefault("expected_peer_fingerprint", theirs.fingerprint)
        role = Role.CLIENT if engine_role == CLIENT else Role.SERVER
        ours, our_certificate = make_engine(role, **engine)
        return ours, our_certificate, theirs

    def handshake(self, engine_role, ours, theirs, **impairment):
        theirs_endpoint = OpenSSLEndpoint(theirs)
        if engine_role == CLIENT:
            return run_handshake(ours, theirs_endpoint, clock=self.clock, **impairment)
        return run_handshake(theirs_endpoint, ours, clock=self.clock, **impairment)

    def assert_interop(
        self, ours, our_certificate, theirs, link, *, profile=0x0007, length=56, suite=None
    ):
        self.assertIsNone(ours.closed, link.describe())
        self.assertIsNone(theirs.error, link.describe())
        self.assertIsNotNone(ours.handshake, link.describe())
        self.assertTrue(theirs.handshake_done, link.describe())
        done = ours.handshake
        # SRTP profile and keys
        self.assertEqual(done.srtp_profile, profile)
        self.assertEqual(theirs.selected_srtp_profile(), profile)
        self.assertEqual(len(done.keying_material), length)
        self.assertEqual(done.keying_material, theirs.export_srtp_keying_material(length))
        # The general exporter, with and without a context
        for context in (None, b"", b"perc interop context"):
            self.assertEqual(
                ours.connection.export_keying_material(b"EXPORTER-perc-interop", 40, context),
                theirs.export_keying_material(b"EXPORTER-perc-interop", 40, context),
                context,
            )
        # Cipher suite
        self.assertEqual(done.cipher_suite, theirs.cipher_suite())
        if suite is not None:
            self.assertEqual(done.cipher_suite, suite)
        # Certificates and fingerprints, both ways
        self.assertEqual(done.peer_certificate, theirs.certificate_der)
        self.assertEqual(done.peer_fingerprint, theirs.fingerprint)
        self.assertEqual(certificate_fingerprint(theirs.certificate_der), theirs.fingerprint)
        self.assertEqual(theirs.peer_certificate_der(), our_certificate)
        self.assertEqual(theirs.peer_fingerprint(), hashlib.sha256(our_certificate).digest())
        # No EKT or tls-id with OpenSSL
        self.assertIsNone(done.ekt_cipher)
        self.assertIsNone(done.peer_external_session_id)
        # Application data, both ways (unreliable: delivered without impairment)
        link.flush()  # stragglers (held-back duplicates) first: must be ignored
        self.assertIsNone(ours.closed, link.describe())
        ours.connection.send_application_data(b"from the engine")
        theirs.send(b"from openssl")
        link.flush()
        self.assertEqual(theirs.received, [b"from the engine"])
        self.assertEqual(ours.received, [b"from openssl"])
        self.assertIsNone(ours.closed)
        self.assertIsNone(theirs.error)

    def establish(self, engine_role, *, openssl=None, engine=None, **impairment):
        ours, our_certificate, theirs = self.pair(engine_role, openssl=openssl, engine=engine)
        link = self.handshake(engine_role, ours, theirs, **impairment)
        return ours, our_certificate, theirs, link


class MatrixTests(InteropTestCase):
    """Both roles x both suites x both GCM profiles (test methods added below)."""

    def check(self, engine_role, suite, srtp):
        cipher_name, suite_code = suite
        profile_name, profile, length = srtp
        ours, certificate, theirs, link = self.establish(
            engine_role, openssl={"ciphers": cipher_name, "srtp_profiles": profile_name}
        )
        self.assert_interop(
            ours, certificate, theirs, link, profile=profile, length=length, suite=suite_code
        )


def _add_matrix() -> None:
    for engine_role in (CLIENT, SERVER):
        for suite in (AES128_GCM_SHA256, AES256_GCM_SHA384):
            for srtp in (SRTP_128_GCM, SRTP_256_GCM):
                name = f"test_engine_{engine_role}_{suite[0]}_{srtp[0]}".lower().replace("-", "_")

                def test(self, engine_role=engine_role, suite=suite, srtp=srtp):
                    self.check(engine_role, suite, srtp)

                test.__name__ = name
                setattr(MatrixTests, name, test)


_add_matrix()


class NegotiationTests(InteropTestCase):
    def test_engine_client_offers_both_profiles_server_picks_its_own(self):
        for name, profile, length in (SRTP_128_GCM, SRTP_256_GCM):
            ours, certificate, theirs, link = self.establish(
                CLIENT, openssl={"srtp_profiles": f"{name}"}, engine={"srtp_profiles": [8, 7]}
            )
            self.assert_interop(ours, certificate, theirs, link, profile=profile, length=length)

    def test_engine_server_follows_its_own_profile_preference(self):
        # Server picks; with an OpenSSL client offering both, ours decides.
        ours, certificate, theirs, link = self.establish(
            SERVER,
            openssl={"srtp_profiles": "SRTP_AEAD_AES_128_GCM:SRTP_AEAD_AES_256_GCM"},
            engine={"srtp_profiles": [0x0008, 0x0007]},
        )
        self.assert_interop(ours, certificate, theirs, link, profile=0x0008, length=88)

    def test_no_srtp_at_all(self):
        for role in (CLIENT, SERVER):
            ours, _, theirs, link = self.establish(
                role, openssl={"srtp_profiles": None}, engine={"srtp_profiles": []}
            )
            self.assertIsNotNone(ours.handshake, link.describe())
            self.assertTrue(theirs.handshake_done)
            self.assertIsNone(ours.handshake.srtp_profile)
            self.assertEqual(ours.handshake.keying_material, b"")
            self.assertIsNone(theirs.selected_srtp_profile())

    def test_groups_engine_client(self):
        # OpenSSL's server picks the group; both lists need P-256 for the certificates.
        for groups, preference, expected in (
            ("P-256", False, "secp256r1"),
            ("X25519:P-256", True, "x25519"),
        ):
            ours, certificate, theirs, link = self.establish(
                CLIENT, openssl={"groups": groups, "server_preference": preference}
            )
            self.assert_interop(ours, certificate, theirs, link)
            self.assertEqual(theirs.group_name(), expected)

    def test_groups_engine_server(self):
        # None: OpenSSL's default list (x25519, P-256, x448, P-521, P-384): the
        # engine must skip groups it does not know.
        for groups, allowed in (
            ("P-256", {"secp256r1"}),
            ("X25519:P-256", {"x25519", "secp256r1"}),
            ("P-256:X25519", {"x25519", "secp256r1"}),
            (None, {"x25519", "secp256r1"}),
        ):
            ours, certificate, theirs, link = self.establish(SERVER, openssl={"groups": groups})
            self.assert_interop(ours, certificate, theirs, link)
            self.assertIn(theirs.group_name(), allowed, groups)

    def test_without_expected_fingerprint(self):
        for role in (CLIENT, SERVER):
            ours, certificate, theirs = self.pair(role, expect_fingerprint=False)
            link = self.handshake(role, ours, theirs)
            self.assert_interop(ours, certificate, theirs, link)

    def test_one_record_per_openssl_datagram(self):
        for role in (CLIENT, SERVER):
            ours, certificate, theirs, link = self.establish(role, openssl={"pack": False})
            self.assert_interop(ours, certificate, theirs, link)

    def test_openssl_close_notify(self):
        for role in (CLIENT, SERVER):
            ours, _, theirs, link = self.establish(role)
            theirs.close()
            link.flush()
            self.assertIsNotNone(ours.closed, link.describe())
            self.assertIn(ours.closed.alert, (None, 0))

    def test_engine_close_notify(self):
        for role in (CLIENT, SERVER):
            ours, _, theirs, link = self.establish(role)
            ours.connection.close()
            link.flush()
            self.assertTrue(theirs.closed, link.describe())
            self.assertIsNone(theirs.error)


class ImpairedNetworkTests(InteropTestCase):
    def setUp(self):
        super().setUp()
        openssl_clock.use_fake_time(self)  # skip if OpenSSL cannot retransmit on fake time

    def check(self, role, seeds, *, openssl=None, engine=None):
        lost = 0
        for seed in seeds:
            try:
                ours, certificate, theirs, link = self.establish(
                    role, openssl=openssl, engine=engine, seed=seed, **IMPAIRMENT
                )
                self.assert_interop(ours, certificate, theirs, link)
            except AssertionError as e:
                raise self.failureException(f"seed {seed}: {e}") from e
            lost += link.stats["lost"]
        self.assertGreater(lost, 0, "the seeds lost nothing: pick others")

    def test_engine_client_lossy(self):
        self.check(CLIENT, LOSSY_SEEDS)

    def test_engine_server_lossy(self):
        self.check(SERVER, LOSSY_SEEDS)

    def test_engine_client_lossy_small_mtu(self):
        self.check(CLIENT, LOSSY_SEEDS[:3], openssl={"mtu": 256}, engine={"mtu": 200})

    def test_engine_server_lossy_small_mtu(self):
        self.check(SERVER, LOSSY_SEEDS[:3], openssl={"mtu": 256}, engine={"mtu": 200})

    def test_engine_server_lossy_with_cookies(self):
        self.check(SERVER, LOSSY_SEEDS[:3], engine={"cookie_secret": os.urandom(32)})

    def test_engine_client_lossy_against_cookie_server(self):
        self.check(CLIENT, LOSSY_SEEDS[:3], openssl={"cookie": True})

    def test_engine_retransmits_on_its_own_timer(self):
        # Heavy loss: the engine's own retransmission timer must fire and recover.
        for role in (CLIENT, SERVER):
            ours, certificate, theirs = self.pair(role)
            link = self.handshake(role, ours, theirs, seed=11, loss=0.5)
            self.assert_interop(ours, certificate, theirs, link)
            self.assertGreater(link.stats[f"timer:{ours.name}"], 0, link.stats)


class MtuTests(InteropTestCase):
    """Our MTU 200 (OpenSSL refuses < 256 on a memory BIO, so it gets 256)."""

    def test_small_mtu(self):
        for role in (CLIENT, SERVER):
            ours, certificate, theirs, link = self.establish(
                role, openssl={"mtu": 256}, engine={"mtu": 200}
            )
            self.assert_interop(ours, certificate, theirs, link)
            ours_sent = [d for name, d in link.transcript if name == ours.name]
            theirs_sent = [d for name, d in link.transcript if name != ours.name]
            self.assertLessEqual(max(map(len, ours_sent)), 200)
            self.assertLessEqual(max(map(len, theirs_sent)), 256)
            # A certificate flight cannot fit in 200 bytes: the engine fragmented.
            self.assertGreater(sum(map(len, ours_sent)), 2 * 200)

    def test_large_mtu_both_sides(self):
        for role in (CLIENT, SERVER):
            ours, certificate, theirs, link = self.establish(
                role, openssl={"mtu": 1400}, engine={"mtu": 1400}
            )
            self.assert_interop(ours, certificate, theirs, link)
            self.assertLessEqual(ours.largest_datagram, 1400)


class FailureTests(InteropTestCase):
    def assert_refused(self, ours, theirs, link, alert):
        self.assertIsNone(ours.handshake, link.describe())
        self.assertIsNotNone(ours.closed, link.describe())
        self.assertEqual(ours.closed.alert, alert)
        self.assertFalse(theirs.handshake_done)
        self.assertIn((FATAL, alert), theirs.alerts_received)
        self.assertIsNotNone(theirs.error)

    def test_wrong_fingerprint(self):
        for role in (CLIENT, SERVER):
            ours, _, theirs, link = self.establish(
                role, engine={"expected_peer_fingerprint": bytes(32)}
            )
            self.assert_refused(ours, theirs, link, ALERT_BAD_CERTIFICATE)

    def test_fingerprint_of_another_certificate(self):
        other = OpenSSLPeer(CLIENT)
        for role in (CLIENT, SERVER):
            ours, _, theirs, link = self.establish(
                role, engine={"expected_peer_fingerprint": other.fingerprint}
            )
            self.assert_refused(ours, theirs, link, ALERT_BAD_CERTIFICATE)

    def test_no_common_srtp_profile_engine_client(self):
        # An OpenSSL server just leaves use_srtp out of its ServerHello: we decide.
        ours, _, theirs, link = self.establish(
            CLIENT,
            openssl={"srtp_profiles": "SRTP_AEAD_AES_256_GCM"},
            engine={"srtp_profiles": [0x0007]},
        )
        self.assert_refused(ours, theirs, link, ALERT_HANDSHAKE_FAILURE)

    def test_no_common_srtp_profile_engine_server(self):
        ours, _, theirs, link = self.establish(
            SERVER,
            openssl={"srtp_profiles": "SRTP_AEAD_AES_256_GCM"},
            engine={"srtp_profiles": [0x0007]},
        )
        self.assert_refused(ours, theirs, link, ALERT_HANDSHAKE_FAILURE)

    def test_no_common_cipher_suite(self):
        # The engine only speaks the two ECDSA GCM suites.
        ours, _, theirs, link = self.establish(
            SERVER, openssl={"ciphers": "ECDHE-ECDSA-CHACHA20-POLY1305"}
        )
        self.assert_refused(ours, theirs, link, ALERT_HANDSHAKE_FAILURE)


class CookieTests(InteropTestCase):
    def test_openssl_client_against_engine_server_with_cookie(self):
        ours, certificate, theirs, link = self.establish(
            SERVER, engine={"cookie_secret": os.urandom(32)}
        )
        self.assert_interop(ours, certificate, theirs, link)
        first = link.transcript[1]
        self.assertEqual(first[0], ours.name)
        self.assertEqual(
            [t for t, _ in plaintext_handshake_messages(first[1])],
            [HANDSHAKE_HELLO_VERIFY_REQUEST],
        )
        requests = handshake_bodies(link, ours.name, HANDSHAKE_HELLO_VERIFY_REQUEST)
        hellos = handshake_bodies(link, "openssl-client", HANDSHAKE_CLIENT_HELLO)
        self.assertEqual(len(requests), 1)
        cookie = hello_verify_request_cookie(requests[0])
        self.assertTrue(1 <= len(cookie) <= 255)
        self.assertEqual(client_hello_cookie(hellos[0]), b"")
        self.assertEqual(client_hello_cookie(hellos[1]), cookie)

    def test_cookie_depends_on_the_secret(self):
        cookies = []
        for secret in (b"a" * 32, b"b" * 32):
            ours, _, _, link = self.establish(SERVER, engine={"cookie_secret": secret})
            self.assertIsNotNone(ours.handshake, link.describe())
            requests = handshake_bodies(link, ours.name, HANDSHAKE_HELLO_VERIFY_REQUEST)
            cookies.append(hello_verify_request_cookie(requests[0]))
        self.assertNotEqual(cookies[0], cookies[1])

    def test_no_cookie_exchange_without_secret(self):
        ours, certificate, theirs, link = self.establish(SERVER)
        self.assert_interop(ours, certificate, theirs, link)
        self.assertEqual(handshake_bodies(link, ours.name, HANDSHAKE_HELLO_VERIFY_REQUEST), [])

    def test_engine_client_against_openssl_cookie_server(self):
        ours, certificate, theirs, link = self.establish(CLIENT, openssl={"cookie": True})
        self.assert_interop(ours, certificate, theirs, link)
        requests = handshake_bodies(link, "openssl-server", HANDSHAKE_HELLO_VERIFY_REQUEST)
        hellos = handshake_bodies(link, ours.name, HANDSHAKE_CLIENT_HELLO)
        self.assertEqual(len(requests), 1)
        self.assertEqual(client_hello_cookie(hellos[0]), b"")
        self.assertEqual(client_hello_cookie(hellos[1]), hello_verify_request_cookie(requests[0]))
        self.assertGreaterEqual(theirs.cookies_verified, 1)
