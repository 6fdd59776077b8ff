"""The admin HTTP listener every daemon runs: ``/healthz`` and ``/metrics``.

It binds to loopback by default (``[admin] bind``); operators scrape it
locally or through their own proxy.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from twisted.internet.interfaces import IListeningPort, IReactorTCP
from twisted.web import resource, server

from perc_daemons import __version__
from perc_daemons.listening import ConnectionGuard, ConnectionLimits, ListeningService
from perc_daemons.logs import AccessLogSite
from perc_daemons.metrics import Metrics


class HealthResource(resource.Resource):
    """``GET /healthz``: 200 with a JSON status while the daemon is serving."""

    isLeaf = True

    def __init__(self, daemon: str, is_healthy: Callable[[], bool]) -> None:
        super().__init__()
        self._daemon = daemon
        self._is_healthy = is_healthy

    def render_GET(self, request: server.Request) -> bytes:
        healthy = self._is_healthy()
        request.setResponseCode(200 if healthy else 503)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        body = {"status": "ok" if healthy else "unavailable", "daemon": self._daemon,
                "version": __version__}
        return json.dumps(body).encode() + b"\n"


class MetricsResource(resource.Resource):
    """``GET /metrics``: the Prometheus text exposition of the daemon's registry."""

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: server.Request) -> bytes:
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        body, content_type = self._metrics.exposition(accept)
        request.setHeader(b"content-type", content_type.encode())
        return body


def admin_site(daemon: str, metrics: Metrics, is_healthy: Callable[[], bool]) -> server.Site:
    root = resource.Resource()
    root.putChild(b"healthz", HealthResource(daemon, is_healthy))
    root.putChild(b"metrics", MetricsResource(metrics))
    site = AccessLogSite(root)
    site.displayTracebacks = False
    site.noisy = False
    return site


class AdminService(ListeningService):
    """Listens for admin HTTP on ``bind:port`` and logs the address it got.

    A taken port stops start-up (see :mod:`perc_daemons.listening`);
    connections are guarded by ``limits`` (listener ``admin`` in the metrics).
    """

    def __init__(self, reactor: IReactorTCP, daemon: str, bind: str, port: int,
                 metrics: Metrics, is_healthy: Callable[[], bool] = lambda: True, *,
                 limits: ConnectionLimits | None = None) -> None:
        super().__init__("admin")
        self._reactor = reactor
        self._daemon = daemon
        self._bind = bind
        self._port_number = port
        self._site = admin_site(daemon, metrics, is_healthy)
        self.guard = ConnectionGuard(self._site, listener="admin",
                                     limits=limits or ConnectionLimits(),
                                     clock=reactor,  # type: ignore[arg-type]
                                     metrics=metrics, tls=False, what=f"{daemon} admin HTTP")

    def listen(self) -> IListeningPort:
        # listenTCP handles IPv6 interfaces too (as TCP6ServerEndpoint does).
        return self._reactor.listenTCP(self._port_number, self.guard, interface=self._bind)

    def listening(self, address) -> None:
        self.log.info(
            "{daemon} admin HTTP listening on http://{host}:{port}/ (/healthz, /metrics)",
            daemon=self._daemon, host=address.host, port=address.port,
        )
