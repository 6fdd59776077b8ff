"""HTTPS plumbing shared by the endpoint's KMF and MD clients (treq over Twisted's Agent).

* :func:`load_ca` reads PEM CA certificate(s) (``--ca``): the trust roots of
  every HTTPS connection the endpoint makes *and* of the KD's signed answer
  (:func:`~perc_daemons.protocol.answer.verify_signed_answer`).
* :class:`ClientTlsPolicy` is an ``IPolicyForHTTPS`` checking the server's
  certificate against those roots and its name (DNS name or IP address,
  service_identity through ``optionsForClientTLS``), optionally presenting a
  TLS client certificate: the endpoint's DTLS certificate toward the KMF, so
  its access token is certificate-bound (RFC 8705 s3).
* :class:`HttpsClient` sends requests (no redirects followed, a timeout) and
  turns transport failures into :class:`ServiceUnavailable`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import error as net_error
from twisted.internet import ssl
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from perc_daemons.problems import parse_problem
from perc_daemons.protocol import jsontext

__all__ = [
    "REQUEST_TIMEOUT",
    "CaError",
    "ClientTlsPolicy",
    "EndpointError",
    "EndpointHttpError",
    "HttpsClient",
    "ServiceUnavailable",
    "load_ca",
    "problem_text",
]

REQUEST_TIMEOUT = 30.0
_PEM_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


class EndpointError(Exception):
    """Base of every failure of the reference endpoint (HTTP side and session side)."""


class EndpointHttpError(EndpointError):
    """Base of the endpoint's typed HTTP-side errors."""


class CaError(EndpointHttpError):
    """The CA file cannot be used."""


class ServiceUnavailable(EndpointHttpError):
    """The service could not be reached, did not answer, or its TLS certificate is untrusted."""


def load_ca(path: str) -> list[x509.Certificate]:
    """The PEM certificates of ``path`` (at least one); raises :class:`CaError`."""
    try:
        with open(path, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise CaError(f"{path}: {e.strerror or e}") from None
    blocks = _PEM_BLOCK.findall(pem)
    if not blocks:
        raise CaError(f"{path}: no PEM certificate")
    try:
        return [x509.load_pem_x509_certificate(block) for block in blocks]
    except ValueError as e:
        raise CaError(f"{path}: not a usable PEM certificate ({e})") from None


def _twisted_trust_root(certificates: Sequence[x509.Certificate]) -> Any:
    return ssl.trustRootFromCertificates([
        ssl.Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM))
        for c in certificates])


@implementer(IPolicyForHTTPS)
class ClientTlsPolicy:
    """Server certificate checked against ``ca`` and the URL's host; optional client cert.

    ``client_certificate`` is ``(DER certificate, EC private key)``; keys are
    never logged nor shown in ``repr``.
    """

    def __init__(self, ca: Sequence[x509.Certificate], *,
                 client_certificate: tuple[bytes, ec.EllipticCurvePrivateKey] | None = None
                 ) -> None:
        self._trust_root = _twisted_trust_root(ca)
        self._client: Any = None
        if client_certificate is not None:
            der, key = client_certificate
            pem = x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
            key_pem = key.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
            self._client = ssl.PrivateCertificate.loadPEM(pem + key_pem)

    def __repr__(self) -> str:
        return f"<ClientTlsPolicy client_certificate={self._client is not None}>"

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        kwargs: dict[str, Any] = {"trustRoot": self._trust_root}
        if self._client is not None:
            kwargs["clientCertificate"] = self._client
        return ssl.optionsForClientTLS(hostname.decode("idna"), **kwargs)


def _reason(failure: Any) -> str:
    value = getattr(failure, "value", failure)
    text = str(value) or type(value).__name__
    if "certificate verify failed" in text or "verify" in text.lower():
        return f"TLS certificate not trusted ({text})"
    return text


def problem_text(code: int, content: bytes) -> tuple[str, str]:
    """(title, detail) of an error answer (RFC 9457 or RFC 6749 s5.2) for messages."""
    problem = parse_problem(code, content)
    return problem.title, problem.detail


class HttpsClient:
    """Requests to one base URL with a :class:`ClientTlsPolicy`; never follows redirects."""

    def __init__(self, reactor: Any, base_url: str, policy: ClientTlsPolicy, *,
                 timeout: float = REQUEST_TIMEOUT) -> None:
        from twisted.web.client import Agent, HTTPConnectionPool

        self.reactor = reactor
        self.base = base_url.rstrip("/")
        self.timeout = timeout
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent(reactor, contextFactory=policy, pool=self.pool)

    def __repr__(self) -> str:
        return f"<HttpsClient {self.base}>"

    async def close(self) -> None:
        await self.pool.closeCachedConnections()

    async def request(self, method: str, path: str, *, headers: dict[str, str] | None = None,
                      data: bytes | None = None) -> tuple[int, Any, bytes]:
        """(status, response headers, body) of ``method`` on ``base + path``."""
        import treq
        from twisted.web import _newclient

        url = path if path.startswith("https://") else self.base + path
        try:
            response = await treq.request(method, url, headers=headers or {}, data=data,
                                          agent=self.agent, timeout=self.timeout,
                                          reactor=self.reactor, allow_redirects=False)
            content = await treq.content(response)
        except (net_error.ConnectError, net_error.DNSLookupError) as e:
            raise ServiceUnavailable(f"cannot connect to {self.base}: {e}") from None
        except (net_error.TimeoutError, net_error.ConnectionLost) as e:
            raise ServiceUnavailable(f"{self.base} did not answer: {e}") from None
        except _newclient.ResponseNeverReceived as e:
            reasons = "; ".join(_reason(f) for f in e.reasons)
            raise ServiceUnavailable(f"no response from {self.base}: {reasons}") from None
        except _newclient.RequestTransmissionFailed as e:
            reasons = "; ".join(_reason(f) for f in e.reasons)
            raise ServiceUnavailable(f"cannot send to {self.base}: {reasons}") from None
        return response.code, response.headers, content

    async def json(self, method: str, path: str, body: Any = None, *,
                   token: str | None = None) -> tuple[int, Any, bytes]:
        """A JSON request: (status, parsed JSON body or None, raw body)."""
        headers = {"Accept": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(body).encode("utf-8")
        code, _, content = await self.request(method, path, headers=headers, data=data)
        try:
            parsed = jsontext.loads(content) if content.strip() else None
        except jsontext.JsonError:
            parsed = None
        return code, parsed, content
