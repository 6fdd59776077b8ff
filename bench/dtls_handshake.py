"""Benchmark: server-side CPU per full DTLS 1.2 handshake, ours vs OpenSSL, in one run.

Both servers face the same client, OpenSSL (pyOpenSSL over memory BIOs), with
the same parameters: ECDSA P-256 certificates on both sides (mutual
authentication, as WebRTC does), TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
X25519, use_srtp SRTP_AEAD_AES_128_GCM, extended master secret, no cookie
exchange.  Only the CPU time spent inside the server's calls is counted
(time.process_time around them), so the client's cost is left out.  It
prints handshakes per second of server CPU for each and the ratio (ours ÷
OpenSSL's).  Target (issue 4): ratio <= 2.

Usage: python bench/dtls_handshake.py [--handshakes N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography import x509
from OpenSSL import SSL, crypto

from perc_daemons.protocol.dtls import (
    DtlsConfiguration,
    DtlsConnection,
    HandshakeComplete,
    Role,
    generate_certificate,
)

DTLS_1_2 = 0xFEFD


def openssl_context(certificate: bytes, key) -> SSL.Context:
    context = SSL.Context(SSL.DTLS_METHOD)
    context.set_min_proto_version(DTLS_1_2)
    context.set_cipher_list(b"ECDHE-ECDSA-AES128-GCM-SHA256")
    context.use_certificate(crypto.X509.from_cryptography(
        x509.load_der_x509_certificate(certificate)))
    context.use_privatekey(crypto.PKey.from_cryptography_key(key))
    context.set_tlsext_use_srtp(b"SRTP_AEAD_AES_128_GCM")
    context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, lambda *args: True)
    return context


def pump(connection: SSL.Connection) -> list[bytes]:
    try:
        connection.do_handshake()
    except SSL.WantReadError:
        pass
    out = []
    while True:
        try:
            out.append(connection.bio_read(65536))
        except SSL.WantReadError:
            return out


class OursServer:
    def __init__(self, config: DtlsConfiguration) -> None:
        self.connection = DtlsConnection(Role.SERVER, config)
        self.done = False

    def feed(self, datagrams: list[bytes]) -> list[bytes]:
        for datagram in datagrams:
            self.connection.receive_datagram(datagram, 0.0)
        while (event := self.connection.next_event()) is not None:
            if isinstance(event, HandshakeComplete):
                self.done = True
            else:
                raise RuntimeError(f"unexpected event {event}")
        return self.connection.datagrams_to_send(0.0)


class OpenSSLServer:
    def __init__(self, context: SSL.Context) -> None:
        self.connection = SSL.Connection(context, None)
        self.connection.set_accept_state()

    @property
    def done(self) -> bool:
        return not pump_pending(self.connection)

    def feed(self, datagrams: list[bytes]) -> list[bytes]:
        for datagram in datagrams:
            self.connection.bio_write(datagram)
        return pump(self.connection)


def pump_pending(connection: SSL.Connection) -> bool:
    try:
        connection.do_handshake()
        return False
    except SSL.WantReadError:
        return True


def handshake(make_server, client_context: SSL.Context) -> float:
    """One full handshake; returns the server's CPU seconds."""
    client = SSL.Connection(client_context, None)
    client.set_connect_state()
    to_server = pump(client)
    server_cpu = 0.0
    server = None
    for _ in range(20):
        start = time.process_time()
        if server is None:
            server = make_server()
        to_client = server.feed(to_server)
        server_cpu += time.process_time() - start
        for datagram in to_client:
            client.bio_write(datagram)
        to_server = pump(client)
        if not to_server and not pump_pending(client):
            start = time.process_time()
            server.feed([])
            server_cpu += time.process_time() - start
            if server.done:
                return server_cpu
    raise RuntimeError("handshake did not complete")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--handshakes", type=int, default=200)
    args = parser.parse_args()
    server_certificate, server_key = generate_certificate("server")
    client_certificate, client_key = generate_certificate("client")
    client_context = openssl_context(client_certificate, client_key)
    server_context = openssl_context(server_certificate, server_key)
    ours_config = DtlsConfiguration(server_certificate, server_key, srtp_profiles=[0x0007],
                                    cipher_suites=[0xC02B], groups=[29])
    n = args.handshakes
    print(f"DTLS 1.2 full handshakes, server CPU only, {n} each "
          f"(OpenSSL {SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()}, "
          f"python {sys.version.split()[0]})")
    for _ in range(5):  # warm up both
        handshake(lambda: OursServer(ours_config), client_context)
        handshake(lambda: OpenSSLServer(server_context), client_context)
    ours = sum(handshake(lambda: OursServer(ours_config), client_context) for _ in range(n))
    theirs = sum(handshake(lambda: OpenSSLServer(server_context), client_context)
                 for _ in range(n))
    print(f"ours:    {n / ours:7.1f} handshakes/s ({ours / n * 1e3:6.2f} ms CPU each)")
    print(f"OpenSSL: {n / theirs:7.1f} handshakes/s ({theirs / n * 1e3:6.2f} ms CPU each)")
    print(f"ratio (ours / OpenSSL CPU per handshake): {ours / theirs:.2f}")


if __name__ == "__main__":
    main()
