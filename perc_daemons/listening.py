"""A service that owns one listening port (shared Twisted glue).

twistd calls ``startService`` synchronously and ignores its result: a
failure left in a Deferred (as ``endpoint.listen`` returns) would let a
daemon run on without its listener.  So subclasses listen directly in
:meth:`ListeningService.startService` and a port that cannot be bound stops
start-up, as ``strports.service`` does.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IAddress, IListeningPort
from twisted.logger import Logger


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
