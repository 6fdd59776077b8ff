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
  authenticated TLS connection and leaves the trust model to us).

Nothing here logs message contents or key material: log events carry the
peer address, the peer certificate fingerprint (public) and reason strings.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Callable
from typing import Any
from typing import Protocol as TypingProtocol

from prometheus_client import Counter, Gauge
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from perc_daemons.interfaces import ITunnelPeer
from perc_daemons.metrics import Metrics
from perc_daemons.protocol.tunnel import (
    MAX_BODY_LENGTH,
    Message,
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

#: Seconds a peer has to finish the TLS handshake before the connection is aborted.
HANDSHAKE_TIMEOUT = 10.0
#: Seconds the peer has to answer our TLS close_notify before the TCP connection is aborted.
CLOSE_TIMEOUT = 5.0
#: Seconds between two log events of the same rate-limited kind.
LOG_INTERVAL = 10.0

log = Logger()


def format_fingerprint(fingerprint: bytes | None) -> str:
    """``AA:BB:..`` (upper-case hex, as in SDP a=fingerprint), or ``-`` when unknown."""
    return fingerprint.hex(":").upper() if fingerprint else "-"


class RateLimitedLog:
    """Emits at most one event per ``key`` every ``interval`` seconds of ``clock``.

    The next event after a quiet interval carries ``suppressed``, the number
    of events dropped meanwhile.  Keys are reason labels (a small fixed set),
    so the state stays bounded.
    """

    def __init__(self, logger: Logger, clock: IReactorTime,
                 interval: float = LOG_INTERVAL) -> None:
        self._log = logger
        self._clock = clock
        self._interval = interval
        self._state: dict[str, tuple[float, int]] = {}

    def warn(self, key: str, format: str, **kwargs: Any) -> bool:
        """Log ``format`` at warn level unless ``key`` was logged recently; True if logged."""
        now = self._clock.seconds()
        last = self._state.get(key)
        if last is not None and now - last[0] < self._interval:
            self._state[key] = (last[0], last[1] + 1)
            return False
        suppressed = last[1] if last is not None else 0
        self._state[key] = (now, 0)
        if suppressed:
            format += " ({suppressed} similar events suppressed)"
        self._log.warn(format, suppressed=suppressed, log_key=key, **kwargs)
        return True


class TunnelMetrics:
    """The tunnel's Prometheus collectors in one daemon's registry (see :func:`tunnel_metrics`).

    * ``perc_tunnel_errors_total{reason}``: connections closed for a protocol error;
    * ``perc_tunnel_refused_total``: MD: TLS-authenticated KDs refused as not pinned;
    * ``perc_tunnel_kds_connected``: MD: pinned KD connections up;
    * ``perc_tunnel_mds_connected``: KD: tunnels to MDs up (version agreed).
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
    MD name the KD verified (KD end) or None (MD end).  ``up`` is set by the
    side when the tunnel is usable (MD: pinned; KD: version agreed).
    """

    def __init__(self, side: TunnelSide, *, clock: IReactorTime,
                 errors_log: RateLimitedLog, metrics: TunnelMetrics | None = None,
                 peer_name: str | None = None,
                 max_body_length: int = MAX_BODY_LENGTH,
                 handshake_timeout: float | None = None,
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
        self._handshake_timeout = (
            HANDSHAKE_TIMEOUT if handshake_timeout is None else handshake_timeout)
        self._close_timeout = CLOSE_TIMEOUT if close_timeout is None else close_timeout
        self._handshake_done = False
        self._timer: IDelayedCall | None = None
        self._lost_waiters: list[defer.Deferred[str]] = []

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

    def close(self, reason: str, *, quiet: bool = False) -> None:
        """Close this connection (TLS close_notify, then abort after a timeout).

        ``reason`` is logged (at info level unless ``quiet``: callers that
        already logged, rate-limited, pass ``quiet=True``) and handed to the
        side's ``link_lost``.  Data received afterwards is discarded.
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
        self._timer = self._clock.callLater(self._close_timeout, self._abort)
        self.transport.loseConnection()

    def fail(self, reason: str, detail: str) -> None:
        """Close for a protocol error: counted by ``reason``, logged (rate-limited)."""
        if self.closing_reason is not None or self.lost_reason is not None:
            return
        if self._metrics is not None:
            self._metrics.errors.labels(reason=reason).inc()
        self._errors_log.warn(
            reason, "tunnel {peer} ({fingerprint}): protocol error {reason}: {detail}",
            peer=self.peer_address, fingerprint=format_fingerprint(self.peer_fingerprint),
            reason=reason, detail=detail)
        self.close(f"{reason}: {detail}", quiet=True)

    # -- Protocol ---------------------------------------------------------------------

    def connectionMade(self) -> None:
        self._timer = self._clock.callLater(self._handshake_timeout, self._handshake_expired)

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: TLS is up; learn the peer certificate, tell the side."""
        self._handshake_done = True
        self._cancel_timer()
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
        text = self.closing_reason or _describe(reason)
        self.lost_reason = text
        waiters, self._lost_waiters = self._lost_waiters, []
        try:
            self.side.link_lost(self, text)
        finally:
            for d in waiters:
                d.callback(text)

    # -- internals --------------------------------------------------------------------

    def _deliver(self, messages: tuple[Message, ...] | list[Message]) -> None:
        for message in messages:
            if self.closing_reason is not None:
                return
            self.side.link_message(self, message)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _handshake_expired(self) -> None:
        self._timer = None
        self.fail("tunnel_handshake_timeout",
                  f"TLS handshake not completed within {self._handshake_timeout:g} s")

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
