"""A DTLS 1.2 peer made of pyOpenSSL over memory BIOs: the interop oracle.

Measured with pyOpenSSL 26.4 / OpenSSL 4.0.3 (see also tests/interop/README.md):

* A memory BIO is a byte stream: ``bio_read`` returns a whole flight (several
  records, several intended datagrams) concatenated; datagram boundaries are
  NOT preserved.  OpenSSL sizes its handshake fragments so that the records it
  writes pack into datagrams of at most the MTU (it counts the bytes still
  pending in the BIO as the current datagram).  :meth:`OpenSSLPeer.pump`
  therefore splits the output into records and packs them greedily, in order,
  into datagrams of at most :attr:`datagram_limit` bytes, which reproduces
  OpenSSL's intended datagrams (several records per datagram).  ``pack=False``
  sends one record per datagram instead.
* Inbound, OpenSSL treats everything written to the BIO before the next
  read as one datagram (and drops the rest of it after a bad record), so
  :meth:`pump` writes one datagram and drives OpenSSL before writing the next.
* MTU: a memory BIO cannot be asked for the path MTU, so OpenSSL falls back to
  its minimum, 256 bytes: even the default handshake is fragmented.
  ``set_ciphertext_mtu`` is ignored unless ``OP_NO_QUERY_MTU`` is set, and
  values below 256 are refused (the handshake then fails with "Unexpected
  EOF").  So ``mtu`` must be None or >= 256.
* Groups: pyOpenSSL 26.4 has no ``Context.set_groups``; ``set_tmp_ecdh``
  takes one cryptography curve (no X25519).  Group lists go through
  ``SSL_CTX_set1_curves_list`` from the cryptography bindings that pyOpenSSL
  itself uses (``OpenSSL._util.lib``, private).  OpenSSL's default list
  in a DTLS 1.2 ClientHello is x25519, P-256, x448, P-384, P-521.
* Cookies: ``OP_COOKIE_EXCHANGE`` + the cookie callbacks + ``DTLSv1_listen``
  work over memory BIOs (``cookie=True``); after a successful listen the
  ClientHello is kept and ``do_handshake`` carries on.
* Timers: OpenSSL's DTLS timer runs on the wall clock.  With ``clock=`` every
  call into OpenSSL runs under :func:`openssl_clock.openssl_time`, so its
  timer follows the fake clock (if :func:`openssl_clock.available`).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import os
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from tests.interop.openssl_clock import openssl_time

try:  # private, but it is the very library pyOpenSSL calls
    from OpenSSL._util import lib as _lib
except ImportError:  # pragma: no cover
    _lib = None

CLIENT = "client"
SERVER = "server"

DTLS1_2_VERSION = 0xFEFD  # pyOpenSSL has no constant for it
SRTP_EXPORTER_LABEL = b"EXTRACTOR-dtls_srtp"
DEFAULT_CIPHERS = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384"
DEFAULT_GROUPS = "P-256:X25519"
MIN_MEMORY_BIO_MTU = 256  # OpenSSL's floor (and default) over a memory BIO

SRTP_PROFILES = {
    "SRTP_AES128_CM_SHA1_80": 0x0001,
    "SRTP_AES128_CM_SHA1_32": 0x0002,
    "SRTP_AEAD_AES_128_GCM": 0x0007,
    "SRTP_AEAD_AES_256_GCM": 0x0008,
}
SRTP_KEYING_MATERIAL_LENGTH = {0x0001: 60, 0x0002: 60, 0x0007: 56, 0x0008: 88}
CIPHER_SUITES = {
    "ECDHE-ECDSA-AES128-GCM-SHA256": 0xC02B,
    "ECDHE-ECDSA-AES256-GCM-SHA384": 0xC02C,
}

GROUPS_SETTABLE = _lib is not None and hasattr(_lib, "SSL_CTX_set1_curves_list")


def make_certificate(common_name: str = "openssl-peer"):
    """A self-signed ECDSA P-256 certificate: (cryptography cert, private key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    return certificate, key


def write_pem_files(directory: str, certificate, key) -> tuple[str, str]:
    """Write cert.pem / key.pem (0600) for the openssl binary; return their paths."""
    cert_path = os.path.join(directory, "cert.pem")
    key_path = os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return cert_path, key_path


def split_records(datagram: bytes) -> list[bytes]:
    """Split a datagram into DTLS records; ValueError if it is not whole records."""
    records = []
    offset = 0
    while offset < len(datagram):
        if len(datagram) - offset < 13:
            raise ValueError(f"truncated record header at offset {offset}")
        length = int.from_bytes(datagram[offset + 11 : offset + 13], "big")
        end = offset + 13 + length
        if end > len(datagram):
            raise ValueError(f"record at offset {offset} overruns the datagram")
        records.append(datagram[offset:end])
        offset = end
    return records


def pack_records(records: list[bytes], limit: int) -> list[bytes]:
    """Pack records, in order, into datagrams of at most limit bytes."""
    datagrams: list[bytes] = []
    current = b""
    for record in records:
        if current and len(current) + len(record) > limit:
            datagrams.append(current)
            current = b""
        current += record
    if current:
        datagrams.append(current)
    return datagrams


class OpenSSLPeer:
    """One DTLS 1.2 endpoint: pyOpenSSL ``SSL.Connection`` over memory BIOs.

    Sans-I/O like the engine: :meth:`feed` datagrams in, :meth:`pump` to
    process them and collect the datagrams to send.
    """

    def __init__(
        self,
        role: str,
        *,
        srtp_profiles: str | None = "SRTP_AEAD_AES_128_GCM",
        mtu: int | None = None,
        ciphers: str = DEFAULT_CIPHERS,
        groups: str | None = DEFAULT_GROUPS,
        cookie: bool = False,
        clock: Callable[[], float] | None = None,
        pack: bool = True,
        require_peer_certificate: bool = True,
        server_preference: bool = False,
    ) -> None:
        if role not in (CLIENT, SERVER):
            raise ValueError(f"role must be {CLIENT!r} or {SERVER!r}")
        if cookie and role != SERVER:
            raise ValueError("cookie exchange is a server option")
        if mtu is not None and mtu < MIN_MEMORY_BIO_MTU:
            raise ValueError(f"OpenSSL refuses an MTU below {MIN_MEMORY_BIO_MTU} on a memory BIO")
        self.role = role
        self.clock = clock
        self.pack = pack
        self.datagram_limit = mtu or MIN_MEMORY_BIO_MTU

        self.certificate, self.private_key = make_certificate(f"openssl-{role}")
        self.certificate_der = self.certificate.public_bytes(serialization.Encoding.DER)
        self.fingerprint = hashlib.sha256(self.certificate_der).digest()

        context = SSL.Context(SSL.DTLS_METHOD)
        context.set_min_proto_version(DTLS1_2_VERSION)
        context.set_max_proto_version(DTLS1_2_VERSION)
        context.set_cipher_list(ciphers.encode())
        context.use_certificate(self.certificate)
        context.use_privatekey(self.private_key)
        context.check_privatekey()
        if srtp_profiles:
            context.set_tlsext_use_srtp(srtp_profiles.encode())
        mode = SSL.VERIFY_PEER
        if require_peer_certificate:
            mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
        # Self-signed certificates are fine (WebRTC style): tests compare fingerprints.
        context.set_verify(mode, lambda *args: True)
        if groups is not None:
            self._set_groups(context, groups)
        if mtu is not None:
            context.set_options(SSL.OP_NO_QUERY_MTU)
        if server_preference:  # suite *and* ECDHE group in the server's order
            context.set_options(SSL.OP_CIPHER_SERVER_PREFERENCE)
        context.set_info_callback(self._info)
        self._listening = False
        if cookie:
            self._cookie_secret = os.urandom(32)
            context.set_options(SSL.OP_COOKIE_EXCHANGE)
            context.set_cookie_generate_callback(self._make_cookie)
            context.set_cookie_verify_callback(self._check_cookie)
            self._listening = True
        self.cookies_issued = 0
        self.cookies_verified = 0

        self.connection = SSL.Connection(context, None)
        if mtu is not None:
            self.connection.set_ciphertext_mtu(mtu)
        if role == CLIENT:
            self.connection.set_connect_state()
        else:
            self.connection.set_accept_state()

        self.handshake_done = False
        self.error: SSL.Error | None = None  # what ended the connection, if anything
        self.closed = False  # close_notify received
        self.received: list[bytes] = []  # application data
        self.alerts_received: list[tuple[int, int]] = []  # (level, description)
        self.alerts_sent: list[tuple[int, int]] = []
        self._inbox: list[bytes] = []

    # -- configuration helpers ------------------------------------------------------------

    @staticmethod
    def _set_groups(context: SSL.Context, groups: str) -> None:
        if GROUPS_SETTABLE:
            if _lib.SSL_CTX_set1_curves_list(context._context, groups.encode()) != 1:
                raise ValueError(f"OpenSSL refused groups {groups!r}")
        elif groups in ("P-256", "prime256v1", "secp256r1"):
            context.set_tmp_ecdh(ec.SECP256R1())
        else:  # pragma: no cover
            raise NotImplementedError("this pyOpenSSL cannot set a group list")

    def _cookie(self) -> bytes:
        # A real server binds the client address; a memory BIO has none.
        return hmac.new(self._cookie_secret, b"memory-bio-client", "sha256").digest()[:16]

    def _make_cookie(self, connection: SSL.Connection) -> bytes:
        self.cookies_issued += 1
        return self._cookie()

    def _check_cookie(self, connection: SSL.Connection, cookie: bytes) -> bool:
        ok = hmac.compare_digest(cookie, self._cookie())
        self.cookies_verified += ok
        return ok

    def _info(self, connection: SSL.Connection, where: int, ret: int) -> None:
        if where & SSL.SSL_CB_ALERT:
            alert = (ret >> 8, ret & 0xFF)
            if where & SSL.SSL_CB_READ:
                self.alerts_received.append(alert)
            else:
                self.alerts_sent.append(alert)

    def _now(self):
        return openssl_time(self.clock() if self.clock is not None else None)

    # -- datagrams -------------------------------------------------------------------------

    def feed(self, datagram: bytes) -> None:
        """Queue one received datagram; :meth:`pump` processes it."""
        self._inbox.append(bytes(datagram))

    def pump(self) -> list[bytes]:
        """Process queued datagrams (one at a time) and return the datagrams to send."""
        records: list[bytes] = []
        with self._now():
            if not self._inbox:
                self._drive()
                records += self._drain()
            while self._inbox:
                datagram = self._inbox.pop(0)
                if self.error is None and not self.closed:
                    self.connection.bio_write(datagram)
                    self._drive()
                records += self._drain()
        if not self.pack:
            return records
        return pack_records(records, self.datagram_limit)

    def _drain(self) -> list[bytes]:
        data = b""
        while True:
            try:
                chunk = self.connection.bio_read(65536)
            except SSL.WantReadError:
                break
            if not chunk:
                break
            data += chunk
        return split_records(data)

    def _drive(self) -> None:
        if self.error is not None or self.closed:
            return
        try:
            if self._listening:
                try:
                    self.connection.DTLSv1_listen()
                except SSL.WantReadError:
                    return  # a HelloVerifyRequest (or nothing) was written
                self._listening = False
            if not self.handshake_done:
                try:
                    self.connection.do_handshake()
                except SSL.WantReadError:
                    return
                self.handshake_done = True
            while True:
                try:
                    data = self.connection.recv(65536)
                except SSL.WantReadError:
                    return
                except SSL.ZeroReturnError:
                    self.closed = True
                    return
                self.received.append(data)
        except SSL.Error as e:
            self.error = e

    # -- application data, timers, shutdown -------------------------------------------------

    def send(self, data: bytes) -> None:
        """Send application data (one record); :meth:`pump` returns the datagram."""
        with self._now():
            self.connection.send(data)

    def close(self) -> None:
        """Send close_notify."""
        with self._now():
            try:
                self.connection.shutdown()
            except SSL.Error as e:
                self.error = e

    def timeout(self) -> float | None:
        """Seconds until OpenSSL wants handle_timeout(), or None (DTLSv1_get_timeout)."""
        if self.error is not None:
            return None
        with self._now():
            return self.connection.DTLSv1_get_timeout()

    def handle_timeout(self) -> bool:
        """DTLSv1_handle_timeout: retransmit if the timer expired; True if it did."""
        if self.error is not None:
            return False
        with self._now():
            try:
                return self.connection.DTLSv1_handle_timeout()
            except SSL.Error as e:
                # After 12 retransmissions OpenSSL gives up ("read timeout expired";
                # after a do_handshake() call pyOpenSSL reports it as WantReadError).
                if not isinstance(e, SSL.WantReadError) or self.failed_state():
                    self.error = e
                return False

    def failed_state(self) -> bool:
        return self.connection.get_state_string() == b"error"

    # -- results ---------------------------------------------------------------------------

    def export_keying_material(self, label: bytes, length: int, context: bytes | None = None):
        return self.connection.export_keying_material(label, length, context)

    def export_srtp_keying_material(self, length: int) -> bytes:
        return self.export_keying_material(SRTP_EXPORTER_LABEL, length)

    def selected_srtp_profile(self) -> int | None:
        name = self.connection.get_selected_srtp_profile()
        return SRTP_PROFILES[name.decode()] if name else None

    def cipher_suite(self) -> int | None:
        name = self.connection.get_cipher_name()
        return CIPHER_SUITES.get(name) if name else None

    def group_name(self) -> str | None:
        return self.connection.get_group_name()

    def peer_certificate_der(self) -> bytes | None:
        certificate = self.connection.get_peer_certificate(as_cryptography=True)
        if certificate is None:
            return None
        return certificate.public_bytes(serialization.Encoding.DER)

    def peer_fingerprint(self) -> bytes | None:
        der = self.peer_certificate_der()
        return hashlib.sha256(der).digest() if der is not None else None
