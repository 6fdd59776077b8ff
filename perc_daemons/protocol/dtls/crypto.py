"""Cryptography for DTLS 1.2: PRF and key schedule, ECDHE, ECDSA, certificates.

* TLS 1.2 PRF P_hash (RFC 5246 section 5) with the suite's hash;
* extended master secret (RFC 7627 section 4), which we always require;
* key block for AEAD suites (RFC 5246 section 6.3, RFC 5288 section 3);
* Finished verify_data (RFC 5246 section 7.4.9);
* keying material exporter (RFC 5705 section 4), e.g. "EXTRACTOR-dtls_srtp";
* ephemeral ECDH over secp256r1 (uncompressed points, RFC 8422 section 5.4)
  and X25519 (RFC 8422 section 5.11);
* ECDSA signatures as TLS 1.2 DigitallySigned (RFC 5246 section 4.7);
* WebRTC-style self-signed ECDSA P-256 certificates and their SHA-256
  fingerprints (RFC 8122 section 5).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.x509.oid import NameOID

from perc_daemons.protocol.dtls.alerts import (
    BadCertificate,
    DecryptError,
    HandshakeFailure,
    IllegalParameter,
)
from perc_daemons.protocol.dtls.handshake import CipherSuite, NamedGroup, SignatureScheme


@dataclass(frozen=True, slots=True)
class SuiteParameters:
    """What a cipher suite fixes: PRF hash and AES-GCM key length (RFC 5289)."""

    hash_name: str
    key_length: int
    fixed_iv_length: int = 4  # RFC 5288 section 3: the implicit part of the nonce


SUITES = {
    CipherSuite.ECDHE_ECDSA_WITH_AES_128_GCM_SHA256: SuiteParameters("sha256", 16),
    CipherSuite.ECDHE_ECDSA_WITH_AES_256_GCM_SHA384: SuiteParameters("sha384", 32),
}

VERIFY_DATA_LENGTH = 12
MASTER_SECRET_LENGTH = 48


def prf(hash_name: str, secret: bytes, label: bytes, seed: bytes, length: int) -> bytes:
    """PRF(secret, label, seed) = P_<hash>(secret, label + seed) (RFC 5246 section 5)."""
    seed = label + seed
    out = bytearray()
    a = seed
    while len(out) < length:
        a = hmac.digest(secret, a, hash_name)
        out += hmac.digest(secret, a + seed, hash_name)
    return bytes(out[:length])


def extended_master_secret(hash_name: str, pre_master_secret: bytes,
                           session_hash: bytes) -> bytes:
    """RFC 7627 section 4: PRF(pms, "extended master secret", session_hash)[0..47]."""
    return prf(hash_name, pre_master_secret, b"extended master secret", session_hash,
               MASTER_SECRET_LENGTH)


def key_block(suite: SuiteParameters, master_secret: bytes, client_random: bytes,
              server_random: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """``(client_write_key, server_write_key, client_write_IV, server_write_IV)``.

    RFC 5246 section 6.3 with no MAC keys (AEAD), the IVs being the 4-byte
    implicit nonce parts of RFC 5288 section 3.
    """
    k, i = suite.key_length, suite.fixed_iv_length
    block = prf(suite.hash_name, master_secret, b"key expansion", server_random + client_random,
                2 * (k + i))
    return block[:k], block[k:2 * k], block[2 * k:2 * k + i], block[2 * k + i:]


def verify_data(hash_name: str, master_secret: bytes, label: bytes,
                handshake_hash: bytes) -> bytes:
    """Finished.verify_data (RFC 5246 section 7.4.9).

    ``label`` is b"client finished" or b"server finished".
    """
    return prf(hash_name, master_secret, label, handshake_hash, VERIFY_DATA_LENGTH)


def export_keying_material(hash_name: str, master_secret: bytes, client_random: bytes,
                           server_random: bytes, label: bytes, length: int,
                           context: bytes | None = None) -> bytes:
    """RFC 5705 section 4; DTLS-SRTP uses label "EXTRACTOR-dtls_srtp", no context."""
    seed = client_random + server_random
    if context is not None:
        if len(context) > 0xFFFF:
            raise ValueError("exporter context longer than 65535 bytes")
        seed += len(context).to_bytes(2, "big") + context
    return prf(hash_name, master_secret, label, seed, length)


# -- ECDHE (RFC 8422) ------------------------------------------------------------------

class KeyShare:
    """One side's ephemeral ECDH key for a named group."""

    def __init__(self, group: int) -> None:
        self.group = group
        if group == NamedGroup.SECP256R1:
            self._private: ec.EllipticCurvePrivateKey | x25519.X25519PrivateKey = (
                ec.generate_private_key(ec.SECP256R1()))
            self.public_bytes = self._private.public_key().public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        elif group == NamedGroup.X25519:
            self._private = x25519.X25519PrivateKey.generate()
            self.public_bytes = self._private.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        else:
            raise HandshakeFailure(f"unsupported group {group}")

    def shared_secret(self, peer_public: bytes) -> bytes:
        """The pre-master secret (RFC 8422 section 5.10); a bad point is illegal_parameter."""
        try:
            if self.group == NamedGroup.SECP256R1:
                if len(peer_public) != 65 or peer_public[0] != 4:
                    raise ValueError("not an uncompressed P-256 point")
                peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), peer_public)
                return self._private.exchange(ec.ECDH(), peer)  # type: ignore[call-arg]
            if len(peer_public) != 32:
                raise ValueError("X25519 public keys are 32 bytes")
            peer_x = x25519.X25519PublicKey.from_public_bytes(peer_public)
            return self._private.exchange(peer_x)  # type: ignore[arg-type]
        except ValueError as e:  # off-curve point, low-order X25519 point (all-zero secret)
            raise IllegalParameter(f"bad ECDH public key: {e}") from None


# -- signatures (RFC 5246 section 4.7, RFC 8422 section 5.10) ---------------------------

_SCHEME_CURVES = {
    SignatureScheme.ECDSA_SECP256R1_SHA256: ("secp256r1", hashes.SHA256),
    SignatureScheme.ECDSA_SECP384R1_SHA384: ("secp384r1", hashes.SHA384),
}


def signature_scheme_for(private_key: ec.EllipticCurvePrivateKey) -> int:
    """The ECDSA signature scheme our key signs with."""
    for scheme, (curve, _hash) in _SCHEME_CURVES.items():
        if private_key.curve.name == curve:
            return scheme
    raise ValueError(f"unsupported certificate key curve {private_key.curve.name}")


def sign(private_key: ec.EllipticCurvePrivateKey, scheme: int, data: bytes) -> bytes:
    _curve, hash_class = _SCHEME_CURVES[SignatureScheme(scheme)]
    return private_key.sign(data, ec.ECDSA(hash_class()))


def verify(public_key: ec.EllipticCurvePublicKey, scheme: int, signature: bytes,
           data: bytes) -> None:
    """Check a DigitallySigned; the scheme must fit the certificate's curve."""
    entry = _SCHEME_CURVES.get(scheme)  # type: ignore[call-overload]
    if entry is None or public_key.curve.name != entry[0]:
        raise IllegalParameter(f"signature scheme 0x{scheme:04x} does not fit the certificate")
    try:
        public_key.verify(signature, data, ec.ECDSA(entry[1]()))
    except InvalidSignature:
        raise DecryptError("signature did not verify") from None


# -- certificates (WebRTC style: self-signed, checked by fingerprint) -------------------

def generate_certificate(common_name: str = "perc-dtls", *, days: int = 30,
                         now: datetime.datetime | None = None,
                         ) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    """A self-signed ECDSA P-256 certificate (DER) and its key, as WebRTC endpoints make.

    ``now`` defaults to the current time: the one clock read in this package,
    made only when a key pair is created, never while processing input.
    """
    if now is None:
        now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(int.from_bytes(os.urandom(16), "big") >> 1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.DER), key


def certificate_fingerprint(certificate_der: bytes) -> bytes:
    """SHA-256 of the DER certificate: what SDP's a=fingerprint carries (RFC 8122 s5)."""
    return hashlib.sha256(certificate_der).digest()


def format_fingerprint(digest: bytes) -> str:
    """``AB:CD:...`` upper-case hex pairs, as in ``a=fingerprint:sha-256 ...``."""
    return ":".join(f"{b:02X}" for b in digest)


def parse_fingerprint(text: str) -> bytes:
    """The inverse of :func:`format_fingerprint` (case-insensitive)."""
    try:
        digest = bytes(int(part, 16) for part in text.strip().split(":"))
    except ValueError:
        raise ValueError(f"not a fingerprint: {text!r}") from None
    if len(digest) != 32:
        raise ValueError("a SHA-256 fingerprint has 32 bytes")
    return digest


def peer_public_key(certificate_der: bytes) -> ec.EllipticCurvePublicKey:
    """The ECDSA key of a peer certificate; anything else is a bad certificate."""
    try:
        certificate = x509.load_der_x509_certificate(certificate_der)
        key = certificate.public_key()
    except Exception as e:
        # Peer DER: cryptography raises ValueError, InvalidVersion,
        # UnsupportedAlgorithm, ...: all mean "not a usable certificate".
        raise BadCertificate(f"unreadable certificate: {type(e).__name__}: {e}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise BadCertificate("only ECDSA certificates are accepted")
    return key
