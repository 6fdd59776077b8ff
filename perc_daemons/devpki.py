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

from perc_daemons.pki import CertificateAuthority

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
            self.ca = CertificateAuthority.load(self.ca_certificate_path.read_bytes(),
                                                 ca_key_path.read_bytes())
        else:
            self.ca = CertificateAuthority.create("perc-daemons dev CA", days=days,
                                                   now=self.now())
            _write_private(ca_key_path, self.ca.key_pem)
            self.ca_certificate_path.write_bytes(self.ca.certificate_pem)
        self.ca_certificate = self.ca.certificate

    def now(self) -> datetime.datetime:
        return self._now or datetime.datetime.now(datetime.UTC)

    def issue(self, name: str, dns_names: Sequence[str] = (),
              ip_addresses: Sequence[str] = ()) -> Issued:
        """A leaf ``<name>.crt``/``<name>.key`` for these names (replaced if present)."""
        certificate, key = self.ca.issue(dns_names, ip_addresses, days=self.days,
                                          now=self.now())
        issued = Issued(self.directory / f"{name}.crt", self.directory / f"{name}.key")
        _write_private(issued.private_key, key)
        issued.certificate.write_bytes(certificate)
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
