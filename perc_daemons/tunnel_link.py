"""One end of the MD<->KD tunnel connection: RFC 9185 frames over TLS 1.3 (Twisted glue).

:class:`TunnelLink` is the :class:`~twisted.internet.protocol.Protocol` of
both ends (:mod:`perc_daemons.md.tunnel`, the TLS server, and
:mod:`perc_daemons.kd.tunnel`, the TLS client).  It only moves bytes:

* received application data goes through a
  :class:`~perc_daemons.protocol.tunnel.TunnelDecoder` (RFC 9185 §6.1 framing;
  the length is checked before any body is buffered) and every decoded
  message to its :class:`TunnelSide` (the MD's or the KD's logic);
* a :class:`~perc_daemons.protocol.tunnel.TunnelError` (or a protocol error
  the side reports with :meth:`TunnelLink.fail`) closes *this* connection
  only, increments ``perc_tunnel_errors_total{reason}`` and logs the reason,
  rate-limited (:class:`RateLimitedLog`) so that a flood of bad peers logs
  once per interval;
* :meth:`TunnelLink.send` writes ``message.encode()``;
  :meth:`TunnelLink.close` sends the TLS close_notify and aborts the TCP
  connection if the peer does not complete the TLS shutdown in time;
* once the TLS handshake is done (``IHandshakeListener.handshakeCompleted``)
  :attr:`TunnelLink.peer_fingerprint` is the SHA-256 of the peer
  certificate's DER, which the MD pins (RFC 9185 §5.2 asks for a mutually
  authenticated TLS connection and leaves the trust model to us);
* the side calls :meth:`TunnelLink.mark_up` when the tunnel is usable (MD:
  the KD is pinned and this is its registered tunnel; KD: SupportedProfiles
  accepted).  A link built with a ``setup_timeout`` is failed
  (``tunnel_handshake_timeout``) if that does not happen in time;
* :meth:`TunnelLink.start_liveness` runs our private keepalive
  (:class:`~perc_daemons.protocol.tunnel.Liveness`, Ping/Pong 0xF3/0xF4,
  docs/PROTOCOL.md): Pings are answered here on an up link, never handed to
  the side; a missing Pong fails the link (``tunnel_liveness_timeout``) and
  aborts the TCP connection at once, since a peer that does not answer will
  not answer a close_notify either.  :meth:`TunnelLink.probe` asks now
  (the MD checks a registered tunnel before it lets another connection of the
  same KD replace it).

Nothing here logs message contents or key material: log events carry the
peer address, the peer certificate fingerprint (public) and reason strings.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Callable
from typing import Protocol as TypingProtocol

from prometheus_client import Counter, Gauge
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from perc_daemons.interfaces import ITunnelPeer
from perc_daemons.listening import LOG_INTERVAL, RateLimitedLog
from perc_daemons.metrics import Metrics
from perc_daemons.protocol.tunnel import (
    MAX_BODY_LENGTH,
    Liveness,
    Message,
    Ping,
    Pong,
    TunnelDecoder,
    TunnelError,
)
from perc_daemons.tls import peer_certificate_der

__all__ = [
    "CLOSE_TIMEOUT",
    "HANDSHAKE_TIMEOUT",
    "LOG_INTERVAL",
    "LinkFactory",
    "RateLimitedLog",
    "TunnelLink",
    "TunnelMetrics",
    "TunnelSide",
    "call_handler",
    "format_fingerprint",
    "tunnel_metrics",
]

#: KD: seconds from the TCP connection to an up tunnel (TLS handshake, then the MD's
#: SupportedProfiles) before the connection is failed and tried again.
HANDSHAKE_TIMEOUT = 10.0
#: Seconds the peer has to answer our TLS close_notify before the TCP connection is aborted.
CLOSE_TIMEOUT = 5.0

log = Logger()


def format_fingerprint(fingerprint: bytes | None) -> str:
    """``AA:BB:..`` (upper-case hex, as in SDP a=fingerprint), or ``-`` when unknown."""
    return fingerprint.hex(":").upper() if fingerprint else "-"


class TunnelMetrics:
    """The tunnel's Prometheus collectors in one daemon's registry (see :func:`tunnel_metrics`).

    * ``perc_tunnel_errors_total{reason}``: connections closed for a protocol error;
    * ``perc_tunnel_refused_total``: MD: TLS-authenticated KDs refused as not pinned;
    * ``perc_tunnel_kds_connected``: MD: pinned KD connections up;
    * ``perc_tunnel_mds_connected``: KD: tunnels to MDs up (version agreed);
    * ``perc_tunnel_duplicates_total{outcome}``: MD: connections of a KD that
      already had a registered tunnel: ``refused`` (that tunnel answered its
      Ping) or ``replaced`` (it did not, or was gone).
    """

    def __init__(self, metrics: Metrics) -> None:
        registry = metrics.registry
        self.errors = Counter(
            "perc_tunnel_errors", "Tunnel connections closed for a protocol error, by reason",
            ["reason"], registry=registry)
        self.refused = Counter(
            "perc_tunnel_refused",
            "Tunnel connections refused because the KD certificate is not pinned",
            registry=registry)
        self.kds_connected = Gauge(
            "perc_tunnel_kds_connected", "Key Distributor tunnel connections up (MD)",
            registry=registry)
        self.mds_connected = Gauge(
            "perc_tunnel_mds_connected", "Tunnels to Media Distributors up (KD)",
            registry=registry)
        self.duplicates = Counter(
            "perc_tunnel_duplicates",
            "Connections of a KD that already had a tunnel, by outcome (refused, replaced)",
            ["outcome"], registry=registry)


_METRICS: weakref.WeakKeyDictionary[Metrics, TunnelMetrics] = weakref.WeakKeyDictionary()


def tunnel_metrics(metrics: Metrics) -> TunnelMetrics:
    """The :class:`TunnelMetrics` of ``metrics``, registered once per registry.

    A KD has one tunnel client per MD sharing the daemon's Metrics, and a
    registry refuses a second collector of the same name.
    """
    found = _METRICS.get(metrics)
    if found is None:
        found = _METRICS[metrics] = TunnelMetrics(metrics)
    return found


class TunnelSide(TypingProtocol):
    """What a :class:`TunnelLink` reports to (the MD's or the KD's tunnel logic)."""

    def link_handshake_completed(self, link: TunnelLink) -> None:
        """TLS is up and ``link.peer_fingerprint`` is set."""

    def link_message(self, link: TunnelLink, message: Message) -> None:
        """One decoded message (while the link is not closing)."""

    def link_error(self, link: TunnelLink, error: TunnelError) -> None:
        """The decoder refused the stream; called just before the link closes."""

    def link_lost(self, link: TunnelLink, reason: str) -> None:
        """The connection is gone (our close reason, or what the transport said)."""


@implementer(ITunnelPeer, IHandshakeListener)
class TunnelLink(Protocol):
    """One tunnel connection: TLS application bytes <-> RFC 9185 messages.

    ``peer_fingerprint`` is None until the TLS handshake completes, then the
    SHA-256 (32 bytes) of the peer certificate's DER.  ``peer_name`` is the
    MD's tunnel address ``host:port`` (KD end: how the KD tells MDs apart; the
    certificate name it verified may be shared by several MDs of one host) or
    None (MD end).  ``up`` is set by the
    side when the tunnel is usable (MD: pinned; KD: version agreed).
    """

    def __init__(self, side: TunnelSide, *, clock: IReactorTime,
                 errors_log: RateLimitedLog, metrics: TunnelMetrics | None = None,
                 peer_name: str | None = None,
                 max_body_length: int = MAX_BODY_LENGTH,
                 setup_timeout: float | None = None,
                 close_timeout: float | None = None) -> None:
        self.side = side
        self.peer_fingerprint: bytes | None = None
        self.peer_name = peer_name
        self.up = False
        self.closing_reason: str | None = None
        self.lost_reason: str | None = None
        self._clock = clock
        self._errors_log = errors_log
        self._metrics = metrics
        self._decoder = TunnelDecoder(max_body_length)
        self._setup_timeout = setup_timeout
        self._close_timeout = CLOSE_TIMEOUT if close_timeout is None else close_timeout
        self._handshake_done = False
        self._timer: IDelayedCall | None = None
        self._lost_waiters: list[defer.Deferred[str]] = []
        self._liveness: Liveness | None = None
        self._liveness_timer: IDelayedCall | None = None
        self._probe_waiters: list[defer.Deferred[bool]] = []

    def __repr__(self) -> str:
        return (f"<TunnelLink peer={self.peer_name or self.peer_address} "
                f"fingerprint={format_fingerprint(self.peer_fingerprint)} up={self.up}>")

    # -- state ------------------------------------------------------------------------

    @property
    def peer_address(self) -> str:
        """``host:port`` of the TCP peer, for logs."""
        transport = self.transport
        if transport is None:
            return "-"
        address = transport.getPeer()
        host, port = getattr(address, "host", None), getattr(address, "port", None)
        return f"{host}:{port}" if host is not None else str(address)

    @property
    def is_open(self) -> bool:
        """Whether messages can still be sent (connected and not closing)."""
        return bool(self.connected) and self.closing_reason is None

    def mark_up(self) -> None:
        """The side found the tunnel usable: ``up`` is set, the setup timeout ends."""
        self.up = True
        self._cancel_timer()

    def start_liveness(self, interval: float, timeout: float) -> None:
        """Ping every ``interval`` s after the last Pong; fail if one is ``timeout`` s late."""
        self._liveness = Liveness(interval, timeout, self._clock.seconds())
        self._schedule_liveness()

    def probe(self) -> defer.Deferred[bool]:
        """Fires True when the peer answers a Ping (sent now unless one is in flight),
        False if the connection is gone first (a late Pong fails it)."""
        if self.lost_reason is not None:
            return defer.succeed(False)
        d: defer.Deferred[bool] = defer.Deferred()
        self._probe_waiters.append(d)
        if self._liveness is not None and self.is_open:
            ping = self._liveness.probe(self._clock.seconds())
            if ping is not None:
                self.send(ping)
                self._schedule_liveness()
        return d

    def when_lost(self) -> defer.Deferred[str]:
        """Fires with the close reason once the connection is gone."""
        if self.lost_reason is not None:
            return defer.succeed(self.lost_reason)
        d: defer.Deferred[str] = defer.Deferred()
        self._lost_waiters.append(d)
        return d

    # -- ITunnelPeer ------------------------------------------------------------------

    def send(self, message: Message) -> None:
        """Frame and write ``message`` (dropped, with a debug event, once closing)."""
        if not self.is_open:
            log.debug("tunnel {peer}: {type} not sent, connection closing",
                      peer=self.peer_address, type=type(message).__name__)
            return
        self.transport.write(message.encode())

    def close(self, reason: str, *, quiet: bool = False, abort: bool = False) -> None:
        """Close this connection (TLS close_notify, then abort after a timeout).

        ``reason`` is logged (at info level unless ``quiet``: callers that
        already logged, rate-limited, pass ``quiet=True``) and handed to the
        side's ``link_lost``.  Data received afterwards is discarded.  With
        ``abort`` the TCP connection is aborted at once (a peer that stopped
        answering will not complete a TLS shutdown).
        """
        if self.closing_reason is not None or self.lost_reason is not None:
            return
        self.closing_reason = reason
        if not quiet:
            log.info("tunnel {peer} ({fingerprint}): closing: {reason}",
                     peer=self.peer_address,
                     fingerprint=format_fingerprint(self.peer_fingerprint), reason=reason)
        if self.transport is None:
            return
        self._cancel_timer()
        self._cancel_liveness()
        self.transport.loseConnection()
        if abort:
            self._abort()
        else:
            self._timer = self._clock.callLater(self._close_timeout, self._abort)

    def fail(self, reason: str, detail: str, *, abort: bool = False) -> None:
        """Close for a protocol error: counted by ``reason``, logged (rate-limited)."""
        if self.closing_reason is not None or self.lost_reason is not None:
            return
        if self._metrics is not None:
            self._metrics.errors.labels(reason=reason).inc()
        self._errors_log.warn(
            reason, "tunnel {peer} ({fingerprint}): protocol error {reason}: {detail}",
            peer=self.peer_address, fingerprint=format_fingerprint(self.peer_fingerprint),
            reason=reason, detail=detail)
        self.close(f"{reason}: {detail}", quiet=True, abort=abort)

    # -- Protocol ---------------------------------------------------------------------

    def connectionMade(self) -> None:
        if self._setup_timeout is not None:
            self._timer = self._clock.callLater(self._setup_timeout, self._setup_expired)

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: TLS is up; learn the peer certificate, tell the side."""
        self._handshake_done = True
        # A failed service_identity check aborts the transport inside the
        # handshake, and Twisted still reports completion: ignore that.
        if self.transport is None or self.transport.disconnecting:
            return
        der = peer_certificate_der(self.transport)
        if der is None:
            self.fail("tunnel_no_peer_certificate", "the peer presented no certificate")
            return
        self.peer_fingerprint = hashlib.sha256(der).digest()
        self.side.link_handshake_completed(self)

    def dataReceived(self, data: bytes) -> None:
        if self.closing_reason is not None:
            return
        if not self._handshake_done:  # TLS delivers no data before; be strict anyway
            self.fail("tunnel_early_data", "data before the TLS handshake completed")
            return
        try:
            messages = self._decoder.feed(data)
        except TunnelError as error:
            self._deliver(error.messages)
            if self.closing_reason is None:
                self.side.link_error(self, error)
                self.fail(error.reason, str(error))
            return
        self._deliver(messages)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._cancel_timer()
        self._cancel_liveness()
        text = self.closing_reason or _describe(reason)
        self.lost_reason = text
        waiters, self._lost_waiters = self._lost_waiters, []
        probes, self._probe_waiters = self._probe_waiters, []
        try:
            self.side.link_lost(self, text)
        finally:
            for d in waiters:
                d.callback(text)
            for probe in probes:
                probe.callback(False)

    # -- internals --------------------------------------------------------------------

    def _deliver(self, messages: tuple[Message, ...] | list[Message]) -> None:
        for message in messages:
            if self.closing_reason is not None:
                return
            if isinstance(message, Ping | Pong):
                self._liveness_message(message)
            else:
                self.side.link_message(self, message)

    def _liveness_message(self, message: Ping | Pong) -> None:
        """Ping: answered at once on an up tunnel.  Pong: must answer our Ping in flight."""
        if not self.up:
            self.fail("tunnel_unexpected_message",
                      f"{type(message).__name__} before the tunnel was up")
            return
        if isinstance(message, Ping):
            self.send(Pong(message.nonce))
            return
        if self._liveness is None:
            self.fail("tunnel_unexpected_pong", "Pong without a Ping")
            return
        try:
            self._liveness.pong(message, self._clock.seconds())
        except TunnelError as error:
            self.fail(error.reason, str(error))
            return
        self._schedule_liveness()
        probes, self._probe_waiters = self._probe_waiters, []
        for probe in probes:
            probe.callback(True)

    def _schedule_liveness(self) -> None:
        self._cancel_liveness()
        if self._liveness is not None and self.is_open:
            delay = max(0.0, self._liveness.deadline - self._clock.seconds())
            self._liveness_timer = self._clock.callLater(delay, self._liveness_due)

    def _cancel_liveness(self) -> None:
        if self._liveness_timer is not None:
            if self._liveness_timer.active():
                self._liveness_timer.cancel()
            self._liveness_timer = None

    def _liveness_due(self) -> None:
        self._liveness_timer = None
        if self._liveness is None or not self.is_open:
            return
        try:
            ping = self._liveness.poll(self._clock.seconds())
        except TunnelError as error:
            self.fail(error.reason, str(error), abort=True)
            return
        if ping is not None:
            self.send(ping)
        self._schedule_liveness()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _setup_expired(self) -> None:
        self._timer = None
        what = "tunnel not up" if self._handshake_done else "TLS handshake not completed"
        self.fail("tunnel_handshake_timeout", f"{what} within {self._setup_timeout:g} s")

    def _abort(self) -> None:
        self._timer = None
        if self.transport is not None and self.lost_reason is None:
            self.transport.abortConnection()


def _describe(reason: Failure | None) -> str:
    """A short text for a transport's connectionLost reason (no key material in it)."""
    if reason is None:
        return "connection lost"
    value = reason.value
    message = reason.getErrorMessage()
    name = type(value).__name__
    return f"{name}: {message}" if message and message != name else name


HandlerCall = Callable[..., object]


def call_handler(what: str, function: HandlerCall, *args: object) -> None:
    """Call a handler method; a bug in the handler is logged, not fatal to the tunnel."""
    try:
        function(*args)
    except Exception:
        log.failure("tunnel handler {what} raised", what=what)


class LinkFactory(Factory):
    """Builds each connection's :class:`TunnelLink` with ``build()`` (the MD's server,
    the KD's client)."""

    noisy = False

    def __init__(self, build: Callable[[], TunnelLink]) -> None:
        self._build = build

    def buildProtocol(self, addr: object) -> TunnelLink:
        return self._build()
