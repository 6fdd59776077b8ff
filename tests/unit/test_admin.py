"""perc_daemons.admin: /healthz and /metrics over a real TCP listener on loopback."""

from __future__ import annotations

import json

import treq
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import CannotListenError, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import capturedLogs, formatEvent
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from perc_daemons import __version__
from perc_daemons.admin import AdminService
from perc_daemons.metrics import Metrics


class AdminServiceTests(unittest.TestCase):
    def setUp(self) -> None:
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.pool.closeCachedConnections)
        self.healthy = True

    def start(self, daemon: str = "perc-md") -> AdminService:
        self.metrics = Metrics(daemon)
        service = AdminService(reactor, daemon, "127.0.0.1", 0, self.metrics,
                               is_healthy=lambda: self.healthy)
        with capturedLogs() as events:
            service.startService()
        self.addCleanup(service.stopService)
        self.assertTrue(service.running)
        self.assertIsNotNone(service.port)
        self.port = service.port.getHost().port
        self.assertNotEqual(self.port, 0)
        self.log_lines = [formatEvent(e) for e in events]
        return service

    @defer.inlineCallbacks
    def get(self, path: str, method: str = "GET"):
        response = yield treq.request(method, f"http://127.0.0.1:{self.port}{path}",
                                      pool=self.pool, timeout=5)
        body = yield treq.content(response)
        content_type = response.headers.getRawHeaders(b"content-type", [b""])[0].decode()
        return response.code, content_type, body

    def test_logs_listening_address(self) -> None:
        self.start("perc-kd")
        self.assertIn(
            f"perc-kd admin HTTP listening on http://127.0.0.1:{self.port}/ (/healthz, /metrics)",
            self.log_lines,
        )

    @defer.inlineCallbacks
    def test_healthz_ok(self):
        self.start("perc-kmf")
        code, content_type, body = yield self.get("/healthz")
        self.assertEqual(code, 200)
        self.assertEqual(content_type, "application/json")
        self.assertEqual(json.loads(body),
                         {"status": "ok", "daemon": "perc-kmf", "version": __version__})
        self.assertEqual(__version__, "0.1.0")

    @defer.inlineCallbacks
    def test_healthz_unhealthy(self):
        self.start()
        self.healthy = False
        code, content_type, body = yield self.get("/healthz")
        self.assertEqual(code, 503)
        self.assertEqual(content_type, "application/json")
        self.assertEqual(json.loads(body),
                         {"status": "unavailable", "daemon": "perc-md", "version": "0.1.0"})
        # The callback is asked on every request.
        self.healthy = True
        code, _, body = yield self.get("/healthz")
        self.assertEqual((code, json.loads(body)["status"]), (200, "ok"))

    @defer.inlineCallbacks
    def test_healthz_post_not_allowed(self):
        self.start()
        code, _, _ = yield self.get("/healthz", method="POST")
        self.assertEqual(code, 405)

    @defer.inlineCallbacks
    def test_metrics(self):
        self.start()
        code, content_type, body = yield self.get("/metrics")
        self.assertEqual(code, 200)
        self.assertEqual(content_type, "text/plain; version=0.0.4; charset=utf-8")
        self.assertTrue(content_type.startswith("text/plain; version="), content_type)
        self.assertIn("charset=utf-8", content_type)
        lines = body.decode().splitlines()
        self.assertIn('perc_build_info{daemon="perc-md",version="0.1.0"} 1.0', lines)
        self.assertIn("# TYPE perc_build_info gauge", lines)
        self.assertIn("# TYPE process_cpu_seconds_total counter", lines)
        self.assertTrue(any(line.startswith("process_cpu_seconds_total ") for line in lines))
        self.assertFalse(any(line.startswith("perc_dropped_input_total{") for line in lines))

    @defer.inlineCallbacks
    def test_metrics_dropped_input(self):
        self.start()
        self.metrics.dropped_input.labels(reason="x").inc()
        self.metrics.dropped_input.labels(reason="x").inc()
        self.metrics.dropped_input.labels(reason="short-header").inc()
        _, _, body = yield self.get("/metrics")
        lines = body.decode().splitlines()
        self.assertIn('perc_dropped_input_total{reason="x"} 2.0', lines)
        self.assertIn('perc_dropped_input_total{reason="short-header"} 1.0', lines)
        self.metrics.dropped_input.labels(reason="x").inc()
        _, _, body = yield self.get("/metrics")
        self.assertIn('perc_dropped_input_total{reason="x"} 3.0', body.decode().splitlines())

    def test_registries_are_separate(self) -> None:
        md, kd = Metrics("perc-md"), Metrics("perc-kd")
        md.dropped_input.labels(reason="x").inc()
        self.assertIn(b'perc_dropped_input_total{reason="x"} 1.0', md.exposition()[0])
        self.assertNotIn(b"perc_dropped_input_total{", kd.exposition()[0])
        self.assertIn(b'perc_build_info{daemon="perc-kd",version="0.1.0"} 1.0',
                      kd.exposition()[0])

    @defer.inlineCallbacks
    def test_unknown_path(self):
        self.start()
        for path in ("/", "/nope", "/metricsx"):
            code, _, _ = yield self.get(path)
            self.assertEqual(code, 404, path)

    @defer.inlineCallbacks
    def test_stop_closes_port(self):
        service = self.start()
        code, _, _ = yield self.get("/healthz")
        self.assertEqual(code, 200)
        yield service.stopService()
        self.assertFalse(service.running)
        self.assertIsNone(service.port)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port, timeout=5)
        yield self.assertFailure(endpoint.connect(Factory.forProtocol(Protocol)),
                                 ConnectionRefusedError)

    def test_port_in_use_raises(self) -> None:
        taken = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(taken.stopListening)
        number = taken.getHost().port
        service = AdminService(reactor, "perc-md", "127.0.0.1", number, Metrics("perc-md"))
        error = self.assertRaises(CannotListenError, service.startService)
        self.assertEqual((error.interface, error.port), ("127.0.0.1", number))
        self.assertFalse(service.running)
        self.assertIsNone(service.port)
        self.assertIsNone(service.stopService())
