"""Shared TLS glue: server contexts from PEM files, key-file checks, dev certificates.

:func:`server_context_factory` builds the context of an HTTPS listener:
TLS 1.2 and 1.3 only, ECDHE with AEAD ciphers only, no compression, no
renegotiation.  With ``request_client_certificate`` the server asks for a
client certificate but neither requires one nor checks it against a CA: the
certificate a PERC endpoint presents is its self-signed DTLS certificate, and
what matters is that its SHA-256 matches the ``cnf`` of the access token
(:func:`peer_certificate_der` gives the routes its DER; the TLS handshake
proves possession of its private key).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLContextFactory
from zope.interface import implementer

__all__ = [
    "PRIVATE_FORBIDDEN",
    "SERVER_CIPHERS",
    "ServerContextFactory",
    "TlsFileError",
    "check_private_key_file",
    "check_private_stat",
    "generate_self_signed",
    "peer_certificate_der",
    "read_private_file",
    "read_secret_line",
    "server_context_factory",
]

#: TLS 1.2 suites (TLS 1.3 suites are all AEAD and left at OpenSSL's default).
SERVER_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20"


class TlsFileError(Exception):
    """A key, certificate or secret file is missing, unreadable, malformed or too open."""


#: Permission bits a private file (key, secret) must not have: 0640 at most.
PRIVATE_FORBIDDEN = 0o037


def check_private_stat(path: str, st: os.stat_result,
                       forbidden: int = PRIVATE_FORBIDDEN) -> None:
    """Refuse (:class:`TlsFileError`) a private file's ``st`` that is not a regular
    file owned by us or root without the ``forbidden`` mode bits.

    Cheap (no I/O): a cache of a secret runs it on every use, so that a
    ``chmod`` or ``chown`` after the file was read is noticed at once.
    """
    if not stat.S_ISREG(st.st_mode):
        raise TlsFileError("not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & forbidden:
        allowed = "0600 or 0640" if forbidden == PRIVATE_FORBIDDEN else "0600"
        raise TlsFileError(f"mode {mode:04o} is too open: it must be {allowed} "
                           f"(chmod 0600 {path})")
    if st.st_uid not in (os.geteuid(), 0):
        raise TlsFileError(f"owned by uid {st.st_uid}, not by this user "
                           f"(uid {os.geteuid()}) or root")


def check_private_key_file(path: str) -> None:
    """Refuse a key file that is not a regular file owned by us or root with mode <= 0640."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise TlsFileError("file not found") from None
    except OSError as e:
        raise TlsFileError(e.strerror or str(e)) from None
    check_private_stat(path, st, PRIVATE_FORBIDDEN)


def read_private_file(path: str, *, max_size: int = 65536,
                      forbidden: int = PRIVATE_FORBIDDEN) -> bytes:
    """The bytes of a private file (a key or a secret), checked on the open descriptor.

    A regular file (no symlink followed), owned by us or root, without the
    ``forbidden`` permission bits (default: more than 0640), at most
    ``max_size`` bytes; else :class:`TlsFileError` with the reason.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY)
    except FileNotFoundError:
        raise TlsFileError("file not found") from None
    except OSError as e:
        raise TlsFileError(e.strerror or str(e)) from None
    try:
        st = os.fstat(fd)
        check_private_stat(path, st, forbidden)
        if st.st_size > max_size:
            raise TlsFileError(f"larger than {max_size} bytes")
        data = b""
        while len(data) <= max_size:
            chunk = os.read(fd, max_size + 1 - len(data))
            if not chunk:
                break
            data += chunk
        if len(data) > max_size:
            raise TlsFileError(f"larger than {max_size} bytes")
        return data
    finally:
        os.close(fd)


def read_secret_line(path: str, *, forbidden: int = PRIVATE_FORBIDDEN) -> str:
    """The first line of a private file, stripped: a password, token or client secret."""
    data = read_private_file(path, forbidden=forbidden)
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise TlsFileError("not UTF-8 text") from None
    secret = lines[0].strip() if lines else ""
    if not secret:
        raise TlsFileError("empty")
    return secret


@implementer(IOpenSSLContextFactory)
class ServerContextFactory:
    """A ``getContext()`` provider for ``listenSSL`` holding one prepared context."""

    def __init__(self, context: SSL.Context) -> None:
        self._context = context

    def getContext(self) -> SSL.Context:
        return self._context


def _accept_any(connection: SSL.Connection, certificate: crypto.X509, errno: int,
                depth: int, ok: int) -> bool:
    # The client certificate is self-signed on purpose (DTLS certificate):
    # possession is proved by the handshake, the binding by the token's cnf.
    return True


def server_context_factory(certificate_path: str, private_key_path: str, *,
                           request_client_certificate: bool = False) -> ServerContextFactory:
    """The TLS 1.2+ server context of ``certificate_path`` (PEM chain) and its key.

    Raises :class:`TlsFileError` naming the problem when a file cannot be
    used or the key does not belong to the certificate.
    """
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE
                        | SSL.OP_NO_RENEGOTIATION | SSL.OP_SINGLE_ECDH_USE)
    context.set_cipher_list(SERVER_CIPHERS)
    try:
        context.use_certificate_chain_file(certificate_path)
    except SSL.Error as e:
        raise TlsFileError(f"certificate {certificate_path}: not a usable PEM "
                           f"certificate chain ({e})") from None
    try:
        context.use_privatekey_file(private_key_path)
    except SSL.Error as e:
        if "mismatch" in str(e):
            raise TlsFileError(f"private key {private_key_path} does not match certificate "
                               f"{certificate_path}") from None
        raise TlsFileError(f"private key {private_key_path}: not a usable PEM key ({e})"
                           ) from None
    try:
        context.check_privatekey()
    except SSL.Error:
        raise TlsFileError(f"private key {private_key_path} does not match certificate "
                           f"{certificate_path}") from None
    if request_client_certificate:
        context.set_verify(SSL.VERIFY_PEER, _accept_any)
        # OpenSSL refuses resumption of client-authenticated sessions without one.
        context.set_session_id(b"perc-daemons")
    return ServerContextFactory(context)


def peer_certificate_der(transport: object) -> bytes | None:
    """DER of the certificate the TLS peer presented on ``transport``, or None."""
    get = getattr(transport, "getPeerCertificate", None)
    if get is None:
        return None
    certificate = get()
    if certificate is None:
        return None
    return certificate.to_cryptography().public_bytes(serialization.Encoding.DER)


def _write_new(path: str, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def generate_self_signed(certificate_path: str, private_key_path: str, *,
                         names: tuple[str, ...] = ("localhost",),
                         addresses: tuple[str, ...] = ("127.0.0.1", "::1"),
                         days: int = 365) -> None:
    """Write a new self-signed P-256 certificate (0644) and its key (0600); never overwrites.

    For development and tests only.  Fails with FileExistsError when either exists.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else
                                            addresses[0])])
    san = [x509.DNSName(n) for n in names] + [
        x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    for path in (certificate_path, private_key_path):
        if os.path.lexists(path):
            raise FileExistsError(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o755, exist_ok=True)
    _write_new(private_key_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()), 0o600)
    _write_new(certificate_path, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
