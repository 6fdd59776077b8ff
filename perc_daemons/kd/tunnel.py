"""The Key Distributor's end of the MD tunnel: a reconnecting TLS 1.3 client.

The KD connects to each MD (DESIGN.md; RFC 9185 §5.2 leaves the direction
open) presenting its one certificate as TLS client certificate (the MD pins
its SHA-256), and verifies the MD's certificate against the enterprise CA and
the MD's name with service_identity (Twisted's ``optionsForClientTLS``).

The MD speaks first (§5.5): SupportedProfiles.  With version 0 and a DOUBLE
profile (RFC 8723) among the profiles the tunnel is up and the handler's
``tunnel_up`` is called; with another version the KD answers
UnsupportedVersion(0) and closes (§5.5).  Any other message before that is a
protocol error, and a tunnel not up within
:data:`~perc_daemons.tunnel_link.HANDSHAKE_TIMEOUT` of the TCP connection
(TLS, then SupportedProfiles: an MD holds a second connection of a KD while
it checks the first one, see :mod:`perc_daemons.md.tunnel`) is dropped and
tried again.  The connection is re-established with jittered exponential
back-off (Twisted's ``ClientService`` and ``backoffPolicy``).

An up tunnel is Pinged every ``liveness_interval`` seconds after the last
Pong (our private liveness, 0xF3/0xF4, docs/PROTOCOL.md; RFC 9185 has no
keepalive): a Pong ``liveness_timeout`` seconds late means the MD is gone or
no longer serves this connection (it registered another one with this
certificate), and the tunnel is closed and connected again.
"""

from __future__ import annotations

import random
from pathlib import Path

from OpenSSL import SSL
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet import defer, ssl
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.logger import Logger

from perc_daemons import tls, tunnel_link
from perc_daemons.interfaces import ITunnelHandler, ITunnelPeer
from perc_daemons.metrics import Metrics
from perc_daemons.protocol.double import DOUBLE_PROFILES
from perc_daemons.protocol.tunnel import (
    MAX_BODY_LENGTH,
    PROTOCOL_VERSION,
    Message,
    SupportedProfiles,
    TunnelError,
    UnsupportedProtocolVersion,
    UnsupportedVersion,
)
from perc_daemons.tunnel_link import (
    LinkFactory,
    RateLimitedLog,
    TunnelLink,
    TunnelMetrics,
    call_handler,
    format_fingerprint,
    tunnel_metrics,
)

__all__ = ["KdTunnelClient", "kd_tunnel_client_creator"]

log = Logger()

_PEM_CERTIFICATE_END = b"-----END CERTIFICATE-----"


def _pem_certificates(path: str) -> list[bytes]:
    """Each PEM certificate block of ``path``, in order."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise tls.TlsFileError(f"{path}: {e.strerror or e}") from None
    blocks = []
    for chunk in data.split(_PEM_CERTIFICATE_END)[:-1]:
        start = chunk.find(b"-----BEGIN CERTIFICATE-----")
        if start >= 0:
            blocks.append(chunk[start:] + _PEM_CERTIFICATE_END + b"\n")
    if not blocks:
        raise tls.TlsFileError(f"{path}: no PEM certificate")
    return blocks


def kd_tunnel_client_creator(name: str, ca_certificate: str, certificate: str,
                             private_key: str) -> object:
    """The client TLS connection creator: TLS 1.3, client certificate, MD checked.

    ``ca_certificate`` is a PEM file of trusted CA certificate(s),
    ``certificate`` the KD's PEM chain (leaf first) and ``private_key`` its
    PEM key (mode 0600/0640).  Raises :class:`~perc_daemons.tls.TlsFileError`.
    """
    tls.check_private_key_file(private_key)
    try:
        roots = [ssl.Certificate.loadPEM(pem) for pem in _pem_certificates(ca_certificate)]
        chain = _pem_certificates(certificate)
        key_pem = Path(private_key).read_bytes()
        client = ssl.PrivateCertificate.loadPEM(chain[0] + key_pem)
        extra_chain = [ssl.Certificate.loadPEM(pem).original for pem in chain[1:]]
        return ssl.optionsForClientTLS(
            name,
            trustRoot=ssl.trustRootFromCertificates(roots),
            clientCertificate=client,
            extraCertificateOptions={
                "raiseMinimumTo": ssl.TLSVersion.TLSv1_3,
                "extraCertChain": extra_chain,
            },
        )
    except tls.TlsFileError:
        raise
    except (SSL.Error, ssl.VerifyError, ValueError, OSError) as e:
        raise tls.TlsFileError(f"tunnel client certificate {certificate} / key "
                               f"{private_key} unusable: {e}") from None


class KdTunnelClient(Service):
    """Keeps one tunnel to the MD at ``host``:``port`` whose certificate names ``name``.

    ``.peer`` is the up tunnel (an ITunnelPeer) or None; :meth:`when_up`
    fires with it.  Reconnection delays grow from ``min_delay`` to
    ``max_delay`` seconds (factor 2) plus a random jitter of up to
    ``min_delay``.  ``liveness_interval`` and ``liveness_timeout`` (seconds)
    drive the Ping/Pong check of the up tunnel (module docstring).
    """

    def __init__(self, reactor: IReactorTCP, *, host: str, port: int, name: str,
                 ca_certificate: str, certificate: str, private_key: str,
                 handler: ITunnelHandler, metrics: Metrics | None,
                 min_delay: float = 0.5, max_delay: float = 30.0,
                 max_body_length: int = MAX_BODY_LENGTH,
                 liveness_interval: float = 15.0, liveness_timeout: float = 5.0) -> None:
        if not 0 < min_delay <= max_delay:
            raise ValueError("need 0 < min_delay <= max_delay")
        if not (liveness_interval > 0 and liveness_timeout > 0):
            raise ValueError("liveness interval and timeout must be positive")
        self._liveness = (liveness_interval, liveness_timeout)
        self._clock: IReactorTime = reactor  # type: ignore[assignment]
        self.host = host
        self.port = port
        #: The MD's name checked in its certificate (``.name`` is the Service's name).
        self.md_name = name
        #: How the KD tells its MDs apart (the tunnel links' ``peer_name``): the tunnel
        #: address, as the KMF names MDs; not the certificate name, which several MD
        #: processes on one host share (cascaded MDs, issue 12).
        self.md_address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.handler = handler
        self._metrics: TunnelMetrics | None = (
            tunnel_metrics(metrics) if metrics is not None else None)
        self._max_body_length = max_body_length
        self._errors_log = RateLimitedLog(log, self._clock)
        creator = kd_tunnel_client_creator(name, str(ca_certificate), str(certificate),
                                           str(private_key))
        endpoint = wrapClientTLS(creator, HostnameEndpoint(reactor, host, port))
        self._client = ClientService(
            endpoint, LinkFactory(self._build_link),
            retryPolicy=backoffPolicy(initialDelay=min_delay, maxDelay=max_delay, factor=2.0,
                                      jitter=lambda: random.random() * min_delay),
            clock=self._clock)
        self.peer: ITunnelPeer | None = None
        self._links: set[TunnelLink] = set()
        self._up_waiters: list[defer.Deferred[ITunnelPeer]] = []
        # the address: several MDs on one host (cascaded MD processes) are siblings
        # in the KD's MultiService, which refuses two children of the same name
        self.setName(f"kd-tunnel-{self.md_address}")

    def when_up(self) -> defer.Deferred[ITunnelPeer]:
        """Fires with the peer once a tunnel is up (at once if one is)."""
        if self.peer is not None:
            return defer.succeed(self.peer)
        d: defer.Deferred[ITunnelPeer] = defer.Deferred()
        self._up_waiters.append(d)
        return d

    def when_connected(self) -> defer.Deferred[TunnelLink]:
        """Fires with the next (or current) TCP connection's link, before TLS is checked."""
        return self._client.whenConnected()  # type: ignore[no-any-return]

    # -- Service ------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        log.info("tunnel to md {name} at {host} port {port}: connecting",
                 name=self.md_name, host=self.host, port=self.port)
        self._client.startService()

    def stopService(self) -> defer.Deferred[None]:  # type: ignore[override]
        """Stop reconnecting and close the tunnel; fires once the connection is gone."""
        if not self.running:
            return defer.succeed(None)
        super().stopService()
        waits: list[defer.Deferred[object]] = []
        for link in list(self._links):
            waits.append(link.when_lost())
            link.close("kd tunnel client stopping")
        waits.append(self._client.stopService())
        d = defer.gatherResults(waits, consumeErrors=True)
        d.addCallback(lambda _: None)
        return d

    # -- TunnelSide ---------------------------------------------------------------------

    def _build_link(self) -> TunnelLink:
        link = TunnelLink(self, clock=self._clock, errors_log=self._errors_log,
                          metrics=self._metrics, peer_name=self.md_address,
                          max_body_length=self._max_body_length,
                          setup_timeout=tunnel_link.HANDSHAKE_TIMEOUT)
        self._links.add(link)
        return link

    def link_handshake_completed(self, link: TunnelLink) -> None:
        log.debug("tunnel to md {name} at {host} port {port}: TLS up, MD {fingerprint}",
                  name=self.md_name, host=self.host, port=self.port,
                  fingerprint=format_fingerprint(link.peer_fingerprint))

    def link_message(self, link: TunnelLink, message: Message) -> None:
        if link.up:
            if isinstance(message, SupportedProfiles | UnsupportedVersion):
                link.fail("tunnel_unexpected_message",
                          f"{type(message).__name__} after the tunnel was up")
            else:
                call_handler("tunnel_message", self.handler.tunnel_message, link, message)
            return
        if not isinstance(message, SupportedProfiles):
            link.fail("tunnel_unexpected_message",
                      f"{type(message).__name__} before SupportedProfiles")
            return
        if not any(profile in DOUBLE_PROFILES for profile in message.profiles):
            link.fail("tunnel_no_double_profile",
                      "the MD supports no DOUBLE SRTP protection profile")
            return
        link.mark_up()
        link.start_liveness(*self._liveness)
        self.peer = link
        if self._metrics is not None:
            self._metrics.mds_connected.inc()
        log.info("tunnel to md up: {name} at {host} port {port} ({fingerprint})",
                 name=self.md_name, host=self.host, port=self.port,
                 fingerprint=format_fingerprint(link.peer_fingerprint))
        call_handler("tunnel_up", self.handler.tunnel_up, link)
        waiters, self._up_waiters = self._up_waiters, []
        for d in waiters:
            if self.peer is link:
                d.callback(link)
            else:  # the handler closed it again: wait for the next one
                self._up_waiters.append(d)

    def link_error(self, link: TunnelLink, error: TunnelError) -> None:
        if isinstance(error, UnsupportedProtocolVersion) and not link.up:
            # RFC 9185 §5.5: answer with our highest version, then close.
            link.send(UnsupportedVersion(PROTOCOL_VERSION))

    def link_lost(self, link: TunnelLink, reason: str) -> None:
        self._links.discard(link)
        if not link.up:
            if link.peer_fingerprint is not None and link.closing_reason is None:
                # TLS worked both ways, then the MD hung up before SupportedProfiles.
                reason += (" (closed by the MD before the tunnel was up: is this KD's "
                           "certificate pinned there, or does another live tunnel use it?)")
            log.info("tunnel to md {name} at {host} port {port} failed: {reason}",
                     name=self.md_name, host=self.host, port=self.port, reason=reason)
            return
        link.up = False
        if self.peer is link:
            self.peer = None
        if self._metrics is not None:
            self._metrics.mds_connected.dec()
        log.info("tunnel to md down: {name} at {host} port {port}: {reason}",
                 name=self.md_name, host=self.host, port=self.port, reason=reason)
        call_handler("tunnel_down", self.handler.tunnel_down, link, reason)
