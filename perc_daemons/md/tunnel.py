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

**One registered tunnel per KD certificate.**  Anyone holding a copy of a
pinned KD's certificate and key can connect; they must not be able to make
the genuine KD's tunnel silently useless, and a genuine KD that restarted
must take over promptly.  So a second connection of a KD that already has
an up tunnel is held (TLS up, nothing sent to it, nothing accepted from it)
while the MD Pings the registered tunnel (our private liveness, 0xF3/0xF4,
docs/PROTOCOL.md):

* the registered tunnel answers: the newcomer is refused (closed, counted
  ``perc_tunnel_duplicates_total{outcome="refused"}``, logged rate-limited);
  the KD that holds the tunnel keeps it;
* it does not answer within ``liveness_timeout``, or is gone (a restarted
  KD's old connection): it is closed and the newcomer registered in its
  place (``outcome="replaced"``).

Refusing rather than replacing is deliberate: with replace-newest, two
holders of one certificate (an attacker with a stolen copy, or two KDs
misconfigured with the same one) would take the tunnel from each other at
every reconnection; here the live holder keeps it and the other is told no
at each attempt, visibly on both sides.  A stolen key still lets its holder
be the KD whenever the genuine one is not connected: the remedy is a new KD
certificate and the old fingerprint unpinned.  Nothing is ever open and
registered-looking without being the one tunnel the MD uses: only the
registered tunnel gets SupportedProfiles, the handler's ``tunnel_up``
(hence the ``Associations`` listing) and answers to its Pings, so a KD
whose tunnel is not (or no longer) the MD's notices from its own liveness
check and reconnects.  Every registered tunnel is also Pinged every
``liveness_interval`` seconds, so one whose KD vanished is closed after at
most ``liveness_interval + liveness_timeout``.
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
from perc_daemons.listening import ConnectionGuard, ConnectionLimits
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
    ``max_body_length`` bounds a frame body (RFC 9185 allows 65535).  Each
    registered tunnel is Pinged ``liveness_interval`` seconds after its last
    Pong and closed when a Pong is ``liveness_timeout`` seconds late; a
    newer connection of the same KD waits at most that long for the check
    (module docstring).  ``limits`` (the daemon's ``[connections]``) bound
    the TLS handshake and the connections per address
    (:class:`~perc_daemons.listening.ConnectionGuard`, listener ``md-tunnel``).
    """

    def __init__(self, reactor: IReactorSSL, *, bind: str, port: int, certificate: str,
                 private_key: str, is_trusted_kd: Callable[[bytes], bool],
                 handler: ITunnelHandler, metrics: Metrics | None,
                 max_body_length: int = MAX_BODY_LENGTH,
                 liveness_interval: float = 15.0, liveness_timeout: float = 5.0,
                 limits: ConnectionLimits | None = None) -> None:
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
        if not (liveness_interval > 0 and liveness_timeout > 0):
            raise ValueError("liveness interval and timeout must be positive")
        self._liveness = (liveness_interval, liveness_timeout)
        self._limits = limits or ConnectionLimits()
        self._guard_metrics = metrics
        self._listening: IListeningPort | None = None
        self._connections: set[TunnelLink] = set()
        #: KD fingerprint -> its one registered (up) tunnel, in registration order.
        self._registered: dict[bytes, TunnelLink] = {}
        #: KD fingerprint -> a newer connection waiting on the registered one's Pong.
        self._challengers: dict[bytes, TunnelLink] = {}
        self.setName("md-tunnel")

    # -- public -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port listened on (the bound one after start, e.g. for port 0)."""
        if self._listening is not None:
            return self._listening.getHost().port  # type: ignore[attr-defined,no-any-return]
        return self._port_number

    def peers(self) -> list[ITunnelPeer]:
        """The registered KD tunnels (one per KD certificate), oldest first."""
        return list(self._registered.values())

    def peer_for(self, fingerprint: bytes) -> ITunnelPeer | None:
        """The registered tunnel of the KD whose certificate SHA-256 is ``fingerprint``."""
        link = self._registered.get(fingerprint)
        return link if link is not None and link.is_open else None

    # -- Service ------------------------------------------------------------------------

    def startService(self) -> None:
        # Listen synchronously so that a port we cannot bind stops start-up
        # (see perc_daemons.listening).
        super().startService()
        try:
            guard = ConnectionGuard(LinkFactory(self._build_link), listener="md-tunnel",
                                    limits=self._limits, clock=self._clock,
                                    metrics=self._guard_metrics, tls=True,
                                    what="perc-md tunnel")
            self._listening = self._reactor.listenSSL(
                self._port_number, guard, self._context_factory, interface=self.bind)
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
        # No setup timeout of its own: the listener's guard bounds the TLS handshake,
        # pinning is immediate, and a held duplicate waits at most liveness_timeout.
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
        registered = self._registered.get(fingerprint)
        if registered is None:
            self._register(link)
        elif fingerprint in self._challengers:
            self._refuse_duplicate(link, registered, "another connection of this KD "
                                   "is already waiting for it")
        else:
            # Held, nothing sent: is the registered tunnel still answering?
            self._challengers[fingerprint] = link
            log.info("tunnel from kd {peer} ({fingerprint}): this KD already has a tunnel "
                     "from {registered}: checking that it answers",
                     peer=link.peer_address, fingerprint=format_fingerprint(fingerprint),
                     registered=registered.peer_address)
            registered.probe().addCallback(self._checked, link, registered)

    def _checked(self, answered: bool, link: TunnelLink, registered: TunnelLink) -> None:
        """The registered tunnel's answer to the Ping a newer connection ``link`` caused."""
        fingerprint = link.peer_fingerprint
        assert fingerprint is not None
        if self._challengers.get(fingerprint) is link:
            del self._challengers[fingerprint]
        if not link.is_open:
            return  # the newcomer left meanwhile
        current = self._registered.get(fingerprint)
        if current is not None:
            # It answered (or, not reachable, another tunnel got registered meanwhile).
            self._refuse_duplicate(link, current, "the KD's registered tunnel answers")
            return
        if self._metrics is not None:
            self._metrics.duplicates.labels(outcome="replaced").inc()
        log.warn("tunnel from kd {peer} ({fingerprint}) replaces the one from {registered}: "
                 "{reason}", peer=link.peer_address, fingerprint=format_fingerprint(fingerprint),
                 registered=registered.peer_address,
                 reason=registered.lost_reason or "it did not answer")
        self._register(link)

    def _refuse_duplicate(self, link: TunnelLink, registered: TunnelLink, why: str) -> None:
        if self._metrics is not None:
            self._metrics.duplicates.labels(outcome="refused").inc()
        self._errors_log.warn(
            "tunnel_duplicate_kd",
            "tunnel from {peer}: refused KD certificate {fingerprint}: {why} (registered "
            "tunnel from {registered}); a copy of this KD's key may be in other hands",
            peer=link.peer_address, fingerprint=format_fingerprint(link.peer_fingerprint),
            why=why, registered=registered.peer_address)
        link.close("another live tunnel holds this KD certificate", quiet=True)

    def _register(self, link: TunnelLink) -> None:
        fingerprint = link.peer_fingerprint
        assert fingerprint is not None and fingerprint not in self._registered
        link.mark_up()
        self._registered[fingerprint] = link
        if self._metrics is not None:
            self._metrics.kds_connected.inc()
        link.send(SupportedProfiles(MD_PROFILES))
        link.start_liveness(*self._liveness)
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
        fingerprint = link.peer_fingerprint
        if fingerprint is not None and self._challengers.get(fingerprint) is link:
            del self._challengers[fingerprint]
        if not link.up:
            return
        link.up = False
        if fingerprint is not None and self._registered.get(fingerprint) is link:
            del self._registered[fingerprint]
        if self._metrics is not None:
            self._metrics.kds_connected.dec()
        log.info("tunnel from kd down: {peer} ({fingerprint}): {reason}",
                 peer=link.peer_address, fingerprint=format_fingerprint(link.peer_fingerprint),
                 reason=reason)
        call_handler("tunnel_down", self.handler.tunnel_down, link, reason)
