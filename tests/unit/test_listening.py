"""Connection limits of every listener (perc_daemons.listening), over real TLS on loopback.

An :class:`~perc_daemons.listening.HttpsService` (the MD API's and the KMF's
listener) and an :class:`~perc_daemons.admin.AdminService` (plain HTTP) on
the real reactor with short configured limits, against hand-written TCP and
TLS clients: one that connects and sends nothing, one that sends half a
ClientHello, an idle keep-alive HTTPS client, and more connections from one
address than the cap allows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from OpenSSL import SSL
from twisted.internet import defer, reactor, ssl, task
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web import resource, server
from zope.interface import implementer

from perc_daemons import tls
from perc_daemons.admin import AdminService
from perc_daemons.devpki import DevPki
from perc_daemons.listening import ConnectionLimits, HttpsService, address_key
from perc_daemons.metrics import Metrics

REQUEST = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"


@implementer(IHandshakeListener)
class Client(Protocol):
    """A TCP or TLS client that records what it gets and when it was closed."""

    def __init__(self) -> None:
        self.data = b""
        self.handshake_done = False
        self.reason: BaseException | None = None
        self.lost_at: float | None = None
        self._lost: list[defer.Deferred[None]] = []
        self._data: list[tuple[bytes, defer.Deferred[None]]] = []

    def handshakeCompleted(self) -> None:
        self.handshake_done = True

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        for waiting in list(self._data):
            if waiting[0] in self.data:
                self._data.remove(waiting)
                waiting[1].callback(None)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.reason = reason.value
        self.lost_at = reactor.seconds()
        waiters, self._lost = self._lost, []
        for d in waiters:
            d.callback(None)

    def when_lost(self) -> defer.Deferred[None]:
        if self.reason is not None:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._lost.append(d)
        return d

    def when_received(self, marker: bytes) -> defer.Deferred[None]:
        if marker in self.data:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._data.append((marker, d))
        return d

    def responses(self) -> int:
        return self.data.count(b"HTTP/1.1 200")


class Hello(resource.Resource):
    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:
        return b"hello"


def half_client_hello() -> bytes:
    """The first half of a real TLS ClientHello (from an OpenSSL memory-BIO client)."""
    connection = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
    connection.set_connect_state()
    try:
        connection.do_handshake()
    except SSL.WantReadError:
        pass
    hello = connection.bio_read(65536)
    assert hello[0] == 0x16 and len(hello) > 100, hello[:8]
    return hello[:len(hello) // 2]


def sleep(seconds: float) -> defer.Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


class ListenerTestBase(unittest.TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.pki = DevPki(Path(self.mktemp()))
        self.cert = self.pki.issue("server", ["localhost"], ["127.0.0.1"])
        self.metrics = Metrics("test")
        self.clients: list[Client] = []

    def start_https(self, **limits: Any) -> int:
        site = server.Site(Hello())
        context = tls.server_context_factory(str(self.cert.certificate),
                                             str(self.cert.private_key))
        service = HttpsService(reactor, "md-api", "test HTTPS", "127.0.0.1", 0, site, context,
                               limits=ConnectionLimits(**limits), metrics=self.metrics)
        service.startService()
        self.addCleanup(service.stopService)
        assert service.port is not None
        return service.port.getHost().port  # type: ignore[no-any-return]

    def start_admin(self, **limits: Any) -> int:
        service = AdminService(reactor, "perc-test", "127.0.0.1", 0, self.metrics,
                               limits=ConnectionLimits(**limits))
        service.startService()
        self.addCleanup(service.stopService)
        assert service.port is not None
        return service.port.getHost().port  # type: ignore[no-any-return]

    @defer.inlineCallbacks
    def connect(self, port: int, *, use_tls: bool):
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        if use_tls:
            endpoint = wrapClientTLS(ssl.optionsForClientTLS(
                "localhost", trustRoot=ssl.Certificate.loadPEM(
                    self.pki.ca_certificate_path.read_bytes())), endpoint)
        client = yield endpoint.connect(Factory.forProtocol(Client))
        self.clients.append(client)

        def cleanup() -> defer.Deferred[None]:
            if client.reason is None:
                client.transport.abortConnection()
            return client.when_lost()

        self.addCleanup(cleanup)
        return client

    @defer.inlineCallbacks
    def request(self, client: Client, request: bytes = REQUEST):
        before = client.responses()
        client.transport.write(request)
        yield wait_until(lambda: client.responses() > before or client.reason is not None)
        self.assertEqual(client.responses(), before + 1, client.data)

    def closed(self, listener: str, reason: str) -> float:
        return self.metrics.registry.get_sample_value(
            "perc_connections_closed_total", {"listener": listener, "reason": reason}) or 0.0

    def open_gauge(self, listener: str) -> float:
        return self.metrics.registry.get_sample_value(
            "perc_connections_open", {"listener": listener}) or 0.0


@defer.inlineCallbacks
def wait_until(predicate: Any, interval: float = 0.01):
    while not predicate():
        yield sleep(interval)


class HandshakeTimeoutTests(ListenerTestBase):
    @defer.inlineCallbacks
    def test_https_client_that_sends_nothing_is_closed(self):
        port = self.start_https(handshake_timeout=0.5)
        silent = yield self.connect(port, use_tls=False)  # TCP only: no ClientHello
        connected_at = reactor.seconds()
        yield silent.when_lost()
        self.assertGreaterEqual(silent.lost_at - connected_at, 0.4)  # by the timer
        self.assertEqual(silent.data, b"")
        self.assertEqual(self.closed("md-api", "handshake_timeout"), 1)
        self.assertEqual(self.open_gauge("md-api"), 0)

    @defer.inlineCallbacks
    def test_https_client_that_sends_half_a_client_hello_is_closed(self):
        port = self.start_https(handshake_timeout=0.5)
        slow = yield self.connect(port, use_tls=False)
        slow.transport.write(half_client_hello())
        yield slow.when_lost()
        self.assertEqual(slow.data, b"")  # the server never got a whole ClientHello
        self.assertEqual(self.closed("md-api", "handshake_timeout"), 1)

    @defer.inlineCallbacks
    def test_completed_handshake_is_not_timed_out(self):
        port = self.start_https(handshake_timeout=0.3, idle_timeout=30.0)
        client = yield self.connect(port, use_tls=True)
        yield self.request(client)
        self.assertTrue(client.handshake_done)
        yield sleep(0.6)
        self.assertIsNone(client.reason)
        yield self.request(client)
        self.assertEqual(self.closed("md-api", "handshake_timeout"), 0)

    @defer.inlineCallbacks
    def test_admin_http_client_that_sends_no_request_is_closed(self):
        port = self.start_admin(handshake_timeout=0.5)
        silent = yield self.connect(port, use_tls=False)
        silent.transport.write(b"GET /healthz HTTP/1.1\r\n")  # and never the rest
        yield silent.when_lost()
        self.assertEqual(silent.data, b"")
        self.assertEqual(self.closed("admin", "handshake_timeout"), 1)
        client = yield self.connect(port, use_tls=False)
        yield self.request(client, HEALTHZ)


class IdleTimeoutTests(ListenerTestBase):
    @defer.inlineCallbacks
    def test_idle_keep_alive_https_connection_is_closed(self):
        port = self.start_https(idle_timeout=0.5)
        client = yield self.connect(port, use_tls=True)
        yield self.request(client)
        yield self.request(client)  # keep-alive: the same connection serves a second one
        answered_at = reactor.seconds()
        yield client.when_lost()
        self.assertGreaterEqual(client.lost_at - answered_at, 0.4)
        self.assertEqual(client.responses(), 2)

    @defer.inlineCallbacks
    def test_idle_keep_alive_admin_connection_is_closed(self):
        port = self.start_admin(idle_timeout=0.5)
        client = yield self.connect(port, use_tls=False)
        yield self.request(client, HEALTHZ)
        yield client.when_lost()
        self.assertEqual(client.responses(), 1)


class AddressCapTests(ListenerTestBase):
    @defer.inlineCallbacks
    def test_connection_over_the_cap_is_closed_at_once(self):
        port = self.start_https(max_per_address=3, handshake_timeout=30.0)
        held = []
        for _ in range(3):
            client = yield self.connect(port, use_tls=True)
            yield self.request(client)
            held.append(client)
        self.assertEqual(self.open_gauge("md-api"), 3)

        excess = yield self.connect(port, use_tls=True)
        yield excess.when_lost()
        self.assertFalse(excess.handshake_done)
        self.assertEqual(excess.data, b"")
        self.assertEqual(self.closed("md-api", "address_limit"), 1)
        # Closed at once, not by the handshake timer (30 s): the test's timeout shows it.

        for client in held:  # the admitted ones keep working
            yield self.request(client)
        held[0].transport.loseConnection()
        yield held[0].when_lost()
        yield wait_until(lambda: self.open_gauge("md-api") == 2)
        again = yield self.connect(port, use_tls=True)  # room again
        yield self.request(again)
        self.assertEqual(self.closed("md-api", "address_limit"), 1)

    @defer.inlineCallbacks
    def test_admin_cap(self):
        port = self.start_admin(max_per_address=1)
        first = yield self.connect(port, use_tls=False)
        yield self.request(first, HEALTHZ)
        second = yield self.connect(port, use_tls=False)
        yield second.when_lost()
        self.assertEqual(second.data, b"")
        self.assertEqual(self.closed("admin", "address_limit"), 1)
        yield self.request(first, HEALTHZ)

    def test_address_key(self):
        self.assertEqual(address_key("192.0.2.7"), "192.0.2.7")
        self.assertEqual(address_key("::ffff:192.0.2.7"), "192.0.2.7")
        self.assertEqual(address_key("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64")
        self.assertEqual(address_key("2001:db8:1:2:ffff::9"), "2001:db8:1:2::/64")
        self.assertNotEqual(address_key("2001:db8:1:3::1"), address_key("2001:db8:1:2::1"))

    def test_limits_must_be_positive(self):
        self.assertRaises(ValueError, ConnectionLimits, handshake_timeout=0)
        self.assertRaises(ValueError, ConnectionLimits, max_per_address=0)
