"""A service that owns one listening port, and the limits every listener applies (Twisted glue).

twistd calls ``startService`` synchronously and ignores its result: a
failure left in a Deferred (as ``endpoint.listen`` returns) would let a
daemon run on without its listener.  So subclasses listen directly in
:meth:`ListeningService.startService` and a port that cannot be bound stops
start-up, as ``strports.service`` does.

Every listener of the three daemons (MD HTTPS API and tunnel port, KMF
HTTPS, the admin HTTP ports) wraps its factory in a :class:`ConnectionGuard`
with the daemon's :class:`ConnectionLimits` (``[connections]`` in
etc/perc/*.toml):

* **per-address cap**: a connection from an address (IPv6: its /64) that
  already has ``max_per_address`` open on this listener is aborted at once,
  before TLS or HTTP sees a byte, logged (rate-limited) and counted in
  ``perc_connections_closed_total{listener, reason="address_limit"}``;
* **handshake timeout**: a connection that has not completed its TLS
  handshake (plain HTTP: has not been answered a first request) within
  ``handshake_timeout`` seconds of connecting is aborted
  (``reason="handshake_timeout"``): a client that connects and sends
  nothing, or half a ClientHello, holds nothing for long;
* **idle timeout**: an HTTP listener's ``Site.timeOut`` is
  ``idle_timeout``: Twisted closes a connection that receives nothing for
  that long while no request is being handled (keep-alive, or a request
  that stopped half-way); a request being answered (an SSE stream) is not
  idle.  The tunnel port's idle check is the tunnel's own liveness
  Ping/Pong (:mod:`perc_daemons.md.tunnel`), which knows what an idle
  tunnel is.

``perc_connections_open{listener}`` gauges the connections each listener
holds.  Nothing here logs more than addresses and reasons.
"""

from __future__ import annotations

import ipaddress
import weakref
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Gauge
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IListeningPort,
    IOpenSSLContextFactory,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.web import http, server
from zope.interface import implementer

from perc_daemons.metrics import Metrics

log = Logger()

#: Seconds between two log events of the same rate-limited kind.
LOG_INTERVAL = 10.0


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


@dataclass(frozen=True)
class ConnectionLimits:
    """A daemon's ``[connections]``: what each of its listeners tolerates (module docstring)."""

    handshake_timeout: float = 10.0
    idle_timeout: float = 60.0
    max_per_address: int = 64

    def __post_init__(self) -> None:
        if not (self.handshake_timeout > 0 and self.idle_timeout > 0
                and self.max_per_address > 0):
            raise ValueError("connection limits must be positive")

    @classmethod
    def from_config(cls, cfg: Any) -> ConnectionLimits:
        """The ``[connections]`` section of a validated configuration."""
        section = cfg.connections
        return cls(handshake_timeout=section.handshake_timeout,
                   idle_timeout=section.idle_timeout,
                   max_per_address=section.max_per_address)


def address_key(host: str) -> str:
    """What the per-address cap counts: the IPv4 address, or the IPv6 /64."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host  # a UNIX socket path or the like: counted as it is
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class ConnectionMetrics:
    """``perc_connections_closed_total{listener,reason}``, ``perc_connections_open{listener}``."""

    def __init__(self, metrics: Metrics) -> None:
        self.closed = Counter(
            "perc_connections_closed",
            "Connections closed by a listener's limits, by listener and reason "
            "(address_limit, handshake_timeout)", ["listener", "reason"],
            registry=metrics.registry)
        self.open = Gauge("perc_connections_open", "Open connections, by listener",
                          ["listener"], registry=metrics.registry)


_METRICS: weakref.WeakKeyDictionary[Metrics, ConnectionMetrics] = weakref.WeakKeyDictionary()


def connection_metrics(metrics: Metrics) -> ConnectionMetrics:
    """The :class:`ConnectionMetrics` of ``metrics``, registered once per registry."""
    found = _METRICS.get(metrics)
    if found is None:
        found = _METRICS[metrics] = ConnectionMetrics(metrics)
    return found


class _Refused(Protocol):
    """Stands in for the application on a connection over the per-address cap."""

    def connectionMade(self) -> None:
        self.transport.abortConnection()


@implementer(IHandshakeListener)
class GuardedConnection(ProtocolWrapper):
    """One admitted connection: handshake timer, per-address bookkeeping, handshake relay."""

    factory: ConnectionGuard

    def __init__(self, factory: ConnectionGuard, wrapped: IProtocol, key: str) -> None:
        super().__init__(factory, wrapped)
        self._key = key
        self._timer: IDelayedCall | None = None

    def makeConnection(self, transport: Any) -> None:
        self._timer = self.factory.clock.callLater(self.factory.limits.handshake_timeout,
                                                   self._handshake_expired)
        super().makeConnection(transport)

    def handshakeCompleted(self) -> None:
        """TLS is up (IHandshakeListener, from the TLS layer below): the timer ends."""
        self._passed()
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def write(self, data: bytes) -> None:
        if not self.factory.tls:
            self._passed()  # plain HTTP: the first request is being answered
        super().write(data)

    def writeSequence(self, data: Any) -> None:
        if not self.factory.tls:
            self._passed()
        super().writeSequence(data)

    def connectionLost(self, reason: Any) -> None:
        self._passed()
        self.factory.release(self._key)
        super().connectionLost(reason)

    def _passed(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _handshake_expired(self) -> None:
        self._timer = None
        self.factory.closed("handshake_timeout", self._key,
                            "{what}: closed a connection from {address}: no {stage} within "
                            "{seconds:g} s", stage="TLS handshake" if self.factory.tls
                            else "complete request",
                            seconds=self.factory.limits.handshake_timeout)
        self.transport.abortConnection()


class ConnectionGuard(WrappingFactory):
    """Wraps a listener's factory with :class:`ConnectionLimits` (module docstring).

    ``listener`` names it in logs and metrics; ``tls`` says whether it sits
    inside a TLS layer (pass the guard to ``listenSSL``: the handshake ends
    with ``handshakeCompleted``) or serves plain HTTP.  An HTTP factory
    (``twisted.web`` Site) gets ``timeOut = idle_timeout``.
    """

    protocol = GuardedConnection  # type: ignore[assignment]
    noisy = False

    def __init__(self, wrapped: IProtocolFactory, *, listener: str, limits: ConnectionLimits,
                 clock: IReactorTime, metrics: Metrics | None, tls: bool,
                 what: str | None = None) -> None:
        super().__init__(wrapped)
        self.listener = listener
        self.limits = limits
        self.clock = clock
        self.tls = tls
        self.what = what or listener
        self._metrics = connection_metrics(metrics) if metrics is not None else None
        self._log = RateLimitedLog(log, clock)
        self._open: dict[str, int] = {}
        if isinstance(wrapped, http.HTTPFactory):
            wrapped.timeOut = limits.idle_timeout

    def open_from(self, host: str) -> int:
        """Connections currently open from ``host``'s address (or /64)."""
        return self._open.get(address_key(host), 0)

    def buildProtocol(self, addr: IAddress) -> IProtocol | None:  # type: ignore[override]
        key = address_key(getattr(addr, "host", str(addr)))
        if self._open.get(key, 0) >= self.limits.max_per_address:
            self.closed("address_limit", key, "{what}: refused a connection from {address}: "
                        "{limit} already open from there", limit=self.limits.max_per_address)
            return _Refused()
        inner = self.wrappedFactory.buildProtocol(addr)
        if inner is None:
            return None
        self._open[key] = self._open.get(key, 0) + 1
        if self._metrics is not None:
            self._metrics.open.labels(listener=self.listener).inc()
        return self.protocol(self, inner, key)

    def release(self, key: str) -> None:
        count = self._open.get(key, 0) - 1
        if count > 0:
            self._open[key] = count
        else:
            self._open.pop(key, None)
        if self._metrics is not None:
            self._metrics.open.labels(listener=self.listener).dec()

    def closed(self, reason: str, key: str, format: str, **kwargs: Any) -> None:
        """Count and log (rate-limited per reason) a connection the limits closed."""
        if self._metrics is not None:
            self._metrics.closed.labels(listener=self.listener, reason=reason).inc()
        self._log.warn(reason, format, what=self.what, address=key, reason=reason, **kwargs)


class ListeningService(Service):
    """Listens in :meth:`startService`, logs the address, stops listening on stop."""

    log = Logger()

    def __init__(self, name: str) -> None:
        self.port: IListeningPort | None = None
        self.setName(name)

    def listen(self) -> IListeningPort:
        """Bind the port (subclasses); may raise CannotListenError."""
        raise NotImplementedError

    def listening(self, address: IAddress) -> None:
        """Called with the bound address (subclasses log it)."""

    def startService(self) -> None:
        super().startService()
        try:
            self.port = self.listen()
        except BaseException:
            self.running = 0
            raise
        self.listening(self.port.getHost())

    def stopService(self) -> defer.Deferred | None:  # type: ignore[override]
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return defer.maybeDeferred(port.stopListening)
        return None


def url_host(host: str) -> str:
    """``host`` as it goes in a URL (IPv6 literals in brackets)."""
    return f"[{host}]" if ":" in host else host


class HttpsService(ListeningService):
    """An HTTPS listener on ``bind:port`` serving ``site``; logs ``what`` and its URL.

    Connections are guarded by ``limits`` (:class:`ConnectionGuard`, counted
    in ``metrics`` under the service ``name``).
    """

    def __init__(self, reactor: Any, name: str, what: str, bind: str, port: int,
                 site: server.Site, context_factory: IOpenSSLContextFactory, *,
                 limits: ConnectionLimits | None = None,
                 metrics: Metrics | None = None) -> None:
        super().__init__(name)
        self._reactor = reactor
        self._what = what
        self._bind = bind
        self._port_number = port
        self.site = site
        self._context_factory = context_factory
        self.guard = ConnectionGuard(site, listener=name, limits=limits or ConnectionLimits(),
                                     clock=reactor, metrics=metrics, tls=True, what=what)

    def listen(self) -> IListeningPort:
        return self._reactor.listenSSL(self._port_number, self.guard, self._context_factory,
                                       interface=self._bind)

    def listening(self, address: Any) -> None:
        self.log.info("{what} listening on https://{host}:{port}/", what=self._what,
                      host=url_host(address.host), port=address.port)
