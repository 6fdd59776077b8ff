"""A certificate authority that issues the daemons' certificates (``perc-admin setup``).

What the daemons expect from an enterprise PKI, and what
:class:`CertificateAuthority` makes when a site has none of its own:

* the CA: self-signed, basicConstraints CA:TRUE with pathlen 0, keyUsage
  keyCertSign and cRLSign, ECDSA P-256;
* per daemon a leaf: ECDSA P-256 (the KD's key must be P-256: it signs
  answers with ES256 and is the DTLS server key, RFC 8827 s5.6), the given
  DNS names and IP addresses as subjectAltName (the KMF's and MD's HTTPS
  names, the KD's name the endpoints check in signed answers), extended key
  usage serverAuth and clientAuth (the KD's certificate is the TLS client
  of the RFC 9185 tunnel, the DTLS server and the answer signer).

Keys are PEM PKCS#8, unencrypted: the daemons read them unattended, and the
files are protected by owner and mode instead (:mod:`perc_daemons.site_setup`).
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CertificateAuthority", "PkiError", "chains_to", "pem_key"]


class PkiError(Exception):
    """A CA certificate or key that cannot issue (wrong kind, mismatched, unreadable)."""


def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    """``key`` as unencrypted PEM PKCS#8."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _now(now: datetime.datetime | None) -> datetime.datetime:
    return now or datetime.datetime.now(datetime.UTC)


@dataclass(frozen=True)
class CertificateAuthority:
    """A CA certificate with its private key: :meth:`create` or :meth:`load`, then :meth:`issue`."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, common_name: str, *, days: int,
               now: datetime.datetime | None = None) -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        start = _now(now)
        public = key.public_key()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start - datetime.timedelta(hours=1))
            .not_valid_after(start + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(certificate, key)

    @classmethod
    def load(cls, certificate_pem: bytes, key_pem: bytes) -> CertificateAuthority:
        """The CA of these PEM files; PkiError unless the key is its EC key and it is a CA."""
        try:
            certificate = x509.load_pem_x509_certificate(certificate_pem)
        except ValueError as e:
            raise PkiError(f"not a PEM certificate: {e}") from None
        try:
            key = serialization.load_pem_private_key(key_pem, None)
        except (ValueError, TypeError) as e:
            raise PkiError(f"not an unencrypted PEM private key: {e}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError("the CA key must be an EC key (ECDSA)")
        if key.public_key().public_numbers() != certificate.public_key().public_numbers():
            raise PkiError("the key does not belong to the certificate")
        try:
            basic = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            basic = None
        if basic is None or not basic.ca:
            raise PkiError("the certificate is not a CA certificate (basicConstraints CA:TRUE)")
        return cls(certificate, key)

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return pem_key(self.key)

    def issue(self, dns_names: Sequence[str] = (), ip_addresses: Sequence[str] = (), *,
              days: int, now: datetime.datetime | None = None) -> tuple[bytes, bytes]:
        """A new leaf for these names: (certificate PEM, private key PEM)."""
        if not dns_names and not ip_addresses:
            raise ValueError("a leaf needs at least one DNS name or IP address")
        key = ec.generate_private_key(ec.SECP256R1())
        san: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
        san += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
        start = _now(now)
        end = min(start + datetime.timedelta(days=days), self.certificate.not_valid_after_utc)
        common_name = dns_names[0] if dns_names else ip_addresses[0]
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start - datetime.timedelta(hours=1))
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=False, crl_sign=False,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return certificate.public_bytes(serialization.Encoding.PEM), pem_key(key)


def chains_to(leaf_pem: bytes, ca_bundle_pem: bytes) -> bool:
    """Whether the first certificate of ``leaf_pem`` verifies under one in ``ca_bundle_pem``.

    Checked with OpenSSL (pyOpenSSL's X509Store), as the daemons' TLS does;
    names are not checked here.
    """
    from OpenSSL import crypto

    try:
        leaf = crypto.load_certificate(crypto.FILETYPE_PEM, leaf_pem)
        store = crypto.X509Store()
        for block in ca_bundle_pem.split(b"-----END CERTIFICATE-----")[:-1]:
            store.add_cert(crypto.load_certificate(
                crypto.FILETYPE_PEM, block + b"-----END CERTIFICATE-----\n"))
        rest = [crypto.load_certificate(crypto.FILETYPE_PEM, b + b"-----END CERTIFICATE-----\n")
                for b in leaf_pem.split(b"-----END CERTIFICATE-----")[1:-1]]
        crypto.X509StoreContext(store, leaf, rest).verify_certificate()
    except (crypto.Error, crypto.X509StoreContextError, ValueError):
        return False
    return True
