"""The Media Distributor's end of the KD tunnel: a TLS 1.3 server pinning KD certificates.

RFC 9185 §5.2 wants a mutually authenticated TLS connection and leaves the
trust model open.  Ours (DESIGN.md): the KD connects to the MD; at the TLS
layer the MD requires a client certificate from any issuer (the handshake
proves the KD holds its key), then pins it: the SHA-256 of the certificate's
DER must be a fingerprint the MD was given for a conference
(``is_trusted_kd``).  An unpinned KD is disconnected before any message is
sent to it or accepted from it.

A pinned KD gets SupportedProfiles (version 0, the two DOUBLE profiles of
RFC 8723) first (§5.5: the MD's first message sets the version), then the
handler's ``tunnel_up``.  From a KD, UnsupportedVersion (§6.3) and
SupportedProfiles are not for the handler: the first is logged and the
connection closed, the second is a protocol error.
"""

from __future__ import annotations

from collections.abc import Callable

from OpenSSL import SSL
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import (
    IListeningPort,
    IReactorSSL,
    IReactorTime,
)
from twisted.logger import Logger

from perc_daemons import tls
from perc_daemons.interfaces import ITunnelHandler, ITunnelPeer
from perc_daemons.metrics import Metrics
from perc_daemons.protocol.tunnel import (
    DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM,
    DOUBLE_AEAD_AES_256_GCM_AEAD_AES_256_GCM,
    MAX_BODY_LENGTH,
    Message,
    SupportedProfiles,
    TunnelError,
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

__all__ = ["MD_PROFILES", "MdTunnelServer", "md_tunnel_context_factory"]

#: What the MD offers in SupportedProfiles: DOUBLE 128 and DOUBLE 256 (RFC 8723 §5.1).
MD_PROFILES = (DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM, DOUBLE_AEAD_AES_256_GCM_AEAD_AES_256_GCM)

log = Logger()


def _accept_any_issuer(connection: SSL.Connection, certificate: object, errno: int,
                       depth: int, ok: int) -> bool:
    # Any issuer: trust comes from pinning the leaf's SHA-256 after the handshake.
    return True


def md_tunnel_context_factory(certificate: str, private_key: str) -> tls.ServerContextFactory:
    """The tunnel's TLS server context: TLS 1.3 only, a client certificate required.

    Raises :class:`~perc_daemons.tls.TlsFileError` when the key file is too
    open or either file is unusable.
    """
    tls.check_private_key_file(private_key)
    factory = tls.server_context_factory(certificate, private_key,
                                         request_client_certificate=True)
    context = factory.getContext()
    context.set_min_proto_version(SSL.TLS1_3_VERSION)
    context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _accept_any_issuer)
    return tls.ServerContextFactory(context)


class MdTunnelServer(Service):
    """Listens for KD tunnel connections (TLS 1.3) on ``bind``:``port``.

    ``certificate`` is the MD's PEM chain, ``private_key`` its PEM key (mode
    0600/0640).  ``is_trusted_kd(sha256_of_der) -> bool`` pins KDs.  The
    handler sees ``tunnel_up`` / ``tunnel_message`` / ``tunnel_down`` for
    pinned connections only (``tunnel_down`` follows every ``tunnel_up``).
    ``max_body_length`` bounds a frame body (RFC 9185 allows 65535).
    """

    def __init__(self, reactor: IReactorSSL, *, bind: str, port: int, certificate: str,
                 private_key: str, is_trusted_kd: Callable[[bytes], bool],
                 handler: ITunnelHandler, metrics: Metrics | None,
                 max_body_length: int = MAX_BODY_LENGTH) -> None:
        self._reactor = reactor
        self._clock: IReactorTime = reactor  # type: ignore[assignment]
        self.bind = bind
        self._port_number = port
        self._context_factory = md_tunnel_context_factory(str(certificate), str(private_key))
        self._is_trusted_kd = is_trusted_kd
        self.handler = handler
        self._metrics: TunnelMetrics | None = (
            tunnel_metrics(metrics) if metrics is not None else None)
        self._max_body_length = max_body_length
        self._errors_log = RateLimitedLog(log, self._clock)
        self._listening: IListeningPort | None = None
        self._connections: set[TunnelLink] = set()
        self._up: list[TunnelLink] = []
        self.setName("md-tunnel")

    # -- public -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port listened on (the bound one after start, e.g. for port 0)."""
        if self._listening is not None:
            return self._listening.getHost().port  # type: ignore[attr-defined,no-any-return]
        return self._port_number

    def peers(self) -> list[ITunnelPeer]:
        """The pinned KD connections that are up, oldest first."""
        return list(self._up)

    def peer_for(self, fingerprint: bytes) -> ITunnelPeer | None:
        """The newest up connection of the KD whose certificate SHA-256 is ``fingerprint``."""
        for link in reversed(self._up):
            if link.peer_fingerprint == fingerprint and link.is_open:
                return link
        return None

    # -- Service ------------------------------------------------------------------------

    def startService(self) -> None:
        # Listen synchronously so that a port we cannot bind stops start-up
        # (see perc_daemons.listening).
        super().startService()
        try:
            self._listening = self._reactor.listenSSL(
                self._port_number, LinkFactory(self._build_link), self._context_factory,
                interface=self.bind)
        except BaseException:
            self.running = 0
            raise
        log.info("perc-md tunnel listening on {bind} port {port} (TLS 1.3, KD pinning)",
                 bind=self.bind, port=self.port)

    def stopService(self) -> defer.Deferred[None]:  # type: ignore[override]
        """Stop listening and close every tunnel connection; fires when all are gone."""
        if not self.running:
            return defer.succeed(None)
        super().stopService()
        waits: list[defer.Deferred[object]] = []
        if self._listening is not None:
            listening, self._listening = self._listening, None
            waits.append(defer.maybeDeferred(listening.stopListening))
        for link in list(self._connections):
            waits.append(link.when_lost())
            link.close("md tunnel server stopping")
        d = defer.gatherResults(waits, consumeErrors=True)
        d.addCallback(lambda _: None)
        return d

    # -- TunnelSide ---------------------------------------------------------------------

    def _build_link(self) -> TunnelLink:
        link = TunnelLink(self, clock=self._clock, errors_log=self._errors_log,
                          metrics=self._metrics, max_body_length=self._max_body_length)
        self._connections.add(link)
        return link

    def link_handshake_completed(self, link: TunnelLink) -> None:
        fingerprint = link.peer_fingerprint
        assert fingerprint is not None
        try:
            trusted = bool(self._is_trusted_kd(fingerprint))
        except Exception:
            log.failure("is_trusted_kd raised; refusing the KD")
            trusted = False
        if not trusted:
            if self._metrics is not None:
                self._metrics.refused.inc()
            self._errors_log.warn(
                "tunnel_unpinned_kd",
                "tunnel from {peer}: refused KD certificate {fingerprint}: not pinned",
                peer=link.peer_address, fingerprint=format_fingerprint(fingerprint))
            link.close("KD certificate not pinned", quiet=True)
            return
        link.up = True
        self._up.append(link)
        if self._metrics is not None:
            self._metrics.kds_connected.inc()
        link.send(SupportedProfiles(MD_PROFILES))
        log.info("tunnel from kd up: {peer} ({fingerprint})",
                 peer=link.peer_address, fingerprint=format_fingerprint(fingerprint))
        call_handler("tunnel_up", self.handler.tunnel_up, link)

    def link_message(self, link: TunnelLink, message: Message) -> None:
        if not link.up:  # not reachable: nothing is read before pinning
            link.fail("tunnel_unexpected_message", "message before the KD was pinned")
        elif isinstance(message, UnsupportedVersion):
            link.fail("tunnel_kd_unsupported_version",
                      f"the KD does not speak tunnel version 0 (its highest is "
                      f"{message.highest_version})")
        elif isinstance(message, SupportedProfiles):
            link.fail("tunnel_unexpected_message", "SupportedProfiles from a KD")
        else:
            call_handler("tunnel_message", self.handler.tunnel_message, link, message)

    def link_error(self, link: TunnelLink, error: TunnelError) -> None:
        pass  # the link counts, logs and closes

    def link_lost(self, link: TunnelLink, reason: str) -> None:
        self._connections.discard(link)
        if not link.up:
            return
        link.up = False
        self._up.remove(link)
        if self._metrics is not None:
            self._metrics.kds_connected.dec()
        log.info("tunnel from kd down: {peer} ({fingerprint}): {reason}",
                 peer=link.peer_address, fingerprint=format_fingerprint(link.peer_fingerprint),
                 reason=reason)
        call_handler("tunnel_down", self.handler.tunnel_down, link, reason)
