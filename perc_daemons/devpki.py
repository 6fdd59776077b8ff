"""A development PKI: one CA and ECDSA P-256 leaf certificates, for ``make demo`` and tests.

Never for production: the CA key sits next to the certificates.  What it makes
is what the daemons expect from an enterprise PKI:

* ``ca.crt`` / ``ca.key``: a self-signed CA (basicConstraints CA:TRUE,
  pathlen 0, keyCertSign), valid ``days`` days;
* per leaf ``<name>.crt`` / ``<name>.key``: an end-entity certificate with
  the given DNS names and IP addresses as subjectAltName, extended key usage
  serverAuth *and* clientAuth (the KD's certificate is the client side of the
  tunnel, the DTLS server and the answer signer), digitalSignature.

Every file is PEM; keys are written unencrypted with mode 0600 (the daemons
refuse anything more open).  ``python -m perc_daemons.devpki DIR NAME=DNS,...``
issues from the command line.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["DevPki", "Issued"]


@dataclass(frozen=True)
class Issued:
    """Paths of one issued leaf: certificate (PEM) and private key (PEM, 0600)."""

    certificate: Path
    private_key: Path


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class DevPki:
    """A CA in ``directory`` (created with its key on first use) that issues leaves."""

    def __init__(self, directory: str | os.PathLike[str], *, days: int = 30,
                 now: datetime.datetime | None = None) -> None:
        self.directory = Path(directory)
        self.days = days
        self._now = now
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ca_certificate_path = self.directory / "ca.crt"
        ca_key_path = self.directory / "ca.key"
        if self.ca_certificate_path.exists() and ca_key_path.exists():
            self._ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
            self.ca_certificate = x509.load_pem_x509_certificate(
                self.ca_certificate_path.read_bytes())
            return
        self._ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "perc-daemons dev CA")])
        start = self.now()
        public = self._ca_key.public_key()
        self.ca_certificate = (
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
            .sign(self._ca_key, hashes.SHA256())
        )
        _write_private(ca_key_path, _pem_key(self._ca_key))  # type: ignore[arg-type]
        self.ca_certificate_path.write_bytes(
            self.ca_certificate.public_bytes(serialization.Encoding.PEM))

    def now(self) -> datetime.datetime:
        return self._now or datetime.datetime.now(datetime.UTC)

    def issue(self, name: str, dns_names: Sequence[str] = (),
              ip_addresses: Sequence[str] = ()) -> Issued:
        """A leaf ``<name>.crt``/``<name>.key`` for these names (replaced if present)."""
        if not dns_names and not ip_addresses:
            raise ValueError("a leaf needs at least one DNS name or IP address")
        key = ec.generate_private_key(ec.SECP256R1())
        san: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
        san += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
        start = self.now()
        common_name = dns_names[0] if dns_names else ip_addresses[0]
        ca_public = self.ca_certificate.public_key()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.ca_certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start - datetime.timedelta(hours=1))
            .not_valid_after(start + datetime.timedelta(days=self.days))
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
                ca_public), critical=False)  # type: ignore[arg-type]
            .sign(self._ca_key, hashes.SHA256())  # type: ignore[arg-type]
        )
        issued = Issued(self.directory / f"{name}.crt", self.directory / f"{name}.key")
        _write_private(issued.private_key, _pem_key(key))
        issued.certificate.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        return issued


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2:
        print("usage: python -m perc_daemons.devpki DIR NAME=DNS_OR_IP[,...] ...",
              file=sys.stderr)
        return 2
    pki = DevPki(args[0])
    for spec in args[1:]:
        name, _, names = spec.partition("=")
        dns: list[str] = []
        ips: list[str] = []
        for n in filter(None, names.split(",")):
            try:
                ipaddress.ip_address(n)
                ips.append(n)
            except ValueError:
                dns.append(n)
        issued = pki.issue(name, dns, ips)
        print(f"{issued.certificate} {issued.private_key}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
