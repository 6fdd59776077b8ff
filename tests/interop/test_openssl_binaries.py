"""Our DTLS engine against the real ``openssl s_server`` / ``s_client`` over UDP.

Real sockets on 127.0.0.1 and real (monotonic) time; each run is bounded by
UdpDriver's deadline and the processes are killed in cleanup.  The same
driver and output parsing are exercised today against pyOpenSSL in
test_harness.OpenSSLBinaryTests.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import tempfile
import time

from cryptography.hazmat.primitives import serialization
from twisted.trial import unittest

from tests.interop.openssl_binaries import (
    OPENSSL,
    UdpDriver,
    free_udp_port,
    s_client,
    s_server,
)
from tests.interop.openssl_peer import CIPHER_SUITES, make_certificate, write_pem_files
from tests.interop.test_dtls_openssl import SKIP, make_engine

try:
    from perc_daemons.protocol.dtls import Role
except ImportError:
    Role = None

HANDSHAKE_SECONDS = 20
OUTPUT_SECONDS = 10


class EngineAgainstOpenSSLBinaryTests(unittest.TestCase):
    skip = SKIP or (None if OPENSSL else "no openssl binary on PATH")

    def setUp(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, True)
        certificate, key = make_certificate("openssl-binary")
        self.binary_certificate = certificate.public_bytes(serialization.Encoding.DER)
        self.binary_fingerprint = hashlib.sha256(self.binary_certificate).digest()
        self.cert, self.key = write_pem_files(directory, certificate, key)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(self.sock.close)
        self.sock.bind(("127.0.0.1", 0))

    def engine(self, role, profiles):
        ours, our_certificate = make_engine(
            role, srtp_profiles=profiles, expected_peer_fingerprint=self.binary_fingerprint
        )
        ours.start(time.monotonic())
        return ours, our_certificate

    def check(self, ours, our_certificate, process, driver, *, profile_name, profile, length):
        driver.run(lambda: ours.complete or ours.failed, HANDSHAKE_SECONDS)
        self.assertIsNone(ours.closed, process.output)
        done = ours.handshake
        self.assertEqual(done.srtp_profile, profile)
        self.assertEqual(process.srtp_profile(OUTPUT_SECONDS), profile_name)
        self.assertEqual(len(done.keying_material), length)
        self.assertEqual(done.keying_material, process.keying_material(OUTPUT_SECONDS))
        self.assertIn(done.cipher_suite, CIPHER_SUITES.values())
        self.assertEqual(done.peer_certificate, self.binary_certificate)
        self.assertEqual(done.peer_fingerprint, self.binary_fingerprint)
        self.assertEqual(process.peer_certificate_der(OUTPUT_SECONDS), our_certificate)
        # Application data both ways: the binary echoes ours to stdout, sends its stdin.
        ours.connection.send_application_data(b"hello openssl binary\n")
        process.write(b"hello engine\n")
        driver.run(lambda: bool(ours.received) or ours.failed, OUTPUT_SECONDS)
        self.assertEqual(b"".join(ours.received), b"hello engine\n")
        process.wait_for("hello openssl binary", OUTPUT_SECONDS)

    def against_s_server(self, profile_name, profile, length, cipher):
        port = free_udp_port()
        server = s_server(
            port,
            self.cert,
            self.key,
            profile=profile_name,
            keymat_length=length,
            extra=["-cipher", cipher],
        )
        self.addCleanup(server.stop)
        server.wait_for("ACCEPT", OUTPUT_SECONDS)
        ours, our_certificate = self.engine(Role.CLIENT, [0x0007, 0x0008])
        driver = UdpDriver(ours, self.sock, ("127.0.0.1", port))
        self.check(
            ours,
            our_certificate,
            server,
            driver,
            profile_name=profile_name,
            profile=profile,
            length=length,
        )
        self.assertEqual(ours.handshake.cipher_suite, CIPHER_SUITES[cipher])

    def against_s_client(self, profile_name, profile, length):
        ours, our_certificate = self.engine(Role.SERVER, [profile])
        client = s_client(
            self.sock.getsockname()[1],
            self.cert,
            self.key,
            profile=profile_name,
            keymat_length=length,
        )
        self.addCleanup(client.stop)
        driver = UdpDriver(ours, self.sock)
        self.check(
            ours,
            our_certificate,
            client,
            driver,
            profile_name=profile_name,
            profile=profile,
            length=length,
        )

    def test_engine_client_s_server_aes_128_gcm(self):
        self.against_s_server("SRTP_AEAD_AES_128_GCM", 0x0007, 56, "ECDHE-ECDSA-AES128-GCM-SHA256")

    def test_engine_client_s_server_aes_256_gcm(self):
        self.against_s_server("SRTP_AEAD_AES_256_GCM", 0x0008, 88, "ECDHE-ECDSA-AES256-GCM-SHA384")

    def test_s_client_engine_server_aes_128_gcm(self):
        self.against_s_client("SRTP_AEAD_AES_128_GCM", 0x0007, 56)

    def test_s_client_engine_server_aes_256_gcm(self):
        self.against_s_client("SRTP_AEAD_AES_256_GCM", 0x0008, 88)
