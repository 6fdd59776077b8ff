"""A service that owns one listening port (shared Twisted glue).

twistd calls ``startService`` synchronously and ignores its result: a
failure left in a Deferred (as ``endpoint.listen`` returns) would let a
daemon run on without its listener.  So subclasses listen directly in
:meth:`ListeningService.startService` and a port that cannot be bound stops
start-up, as ``strports.service`` does.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IAddress, IListeningPort, IOpenSSLContextFactory
from twisted.logger import Logger
from twisted.web import server


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
    """An HTTPS listener on ``bind:port`` serving ``site``; logs ``what`` and its URL."""

    def __init__(self, reactor: Any, name: str, what: str, bind: str, port: int,
                 site: server.Site, context_factory: IOpenSSLContextFactory) -> None:
        super().__init__(name)
        self._reactor = reactor
        self._what = what
        self._bind = bind
        self._port_number = port
        self.site = site
        self._context_factory = context_factory

    def listen(self) -> IListeningPort:
        return self._reactor.listenSSL(self._port_number, self.site, self._context_factory,
                                       interface=self._bind)

    def listening(self, address: Any) -> None:
        self.log.info("{what} listening on https://{host}:{port}/", what=self._what,
                      host=url_host(address.host), port=address.port)
