"""perc_http_requests_total / perc_http_request_duration_seconds of a JsonApi,
served by a real Site on loopback and asked by a real HTTP client."""

from __future__ import annotations

import re

import treq
from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web import server
from twisted.web.client import HTTPConnectionPool

from perc_daemons.metrics import Metrics
from perc_daemons.problems import JsonApi, Problem, Response, route_label


class Api(JsonApi):
    def __init__(self) -> None:
        super().__init__()
        self._routes = [
            (re.compile(r"/v1/things/(?P<thing>[^/]+)"), {b"GET": self.show}),
            (re.compile(r"/v1/broken"), {b"POST": self.broken}),
        ]

    async def show(self, request, thing: str) -> Response:
        if thing == "missing":
            raise Problem(404, "not-found", "Not found", "no such thing")
        return Response(200, {"thing": thing})

    async def broken(self, request) -> Response:
        raise RuntimeError("the store went away")


class HttpMetricsTests(unittest.TestCase):
    def setUp(self) -> None:
        self.metrics = Metrics("perc-test")
        self.now = [100.0]
        api = Api()
        api.measure(self.metrics, "test", clock=lambda: self.now[0])
        self.port = reactor.listenTCP(0, server.Site(api), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.pool.closeCachedConnections)
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"

    @defer.inlineCallbacks
    def ask(self, method: str, path: str) -> defer.Deferred:
        response = yield treq.request(method, self.base + path, pool=self.pool)
        yield treq.content(response)
        return response.code

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)

    @defer.inlineCallbacks
    def test_counted_by_route_method_and_status(self):
        self.flushLoggedErrors()
        codes = []
        for method, path in [("GET", "/v1/things/a"), ("GET", "/v1/things/b"),
                             ("GET", "/v1/things/missing"), ("POST", "/v1/broken"),
                             ("DELETE", "/v1/broken"), ("GET", "/nowhere")]:
            codes.append((yield self.ask(method, path)))
        self.assertEqual(codes, [200, 200, 404, 500, 405, 404])
        self.flushLoggedErrors(RuntimeError)
        thing = "/v1/things/{thing}"
        total = "perc_http_requests_total"
        self.assertEqual(self.sample(total, api="test", route=thing, method="GET",
                                     status="200"), 2.0)
        self.assertEqual(self.sample(total, api="test", route=thing, method="GET",
                                     status="404"), 1.0)
        self.assertEqual(self.sample(total, api="test", route="/v1/broken", method="POST",
                                     status="500"), 1.0)
        self.assertEqual(self.sample(total, api="test", route="/v1/broken", method="DELETE",
                                     status="405"), 1.0)
        self.assertEqual(self.sample(total, api="test", route="unmatched", method="GET",
                                     status="404"), 1.0)
        self.assertEqual(self.sample("perc_http_request_duration_seconds_count", api="test",
                                     route=thing), 3.0)

    @defer.inlineCallbacks
    def test_duration_from_dispatch_to_the_last_byte(self):
        now = self.now

        class Slow(Api):
            async def show(inner, request, thing: str) -> Response:
                now[0] += 0.3  # 300 ms pass in the handler
                return Response(200, {"thing": thing})

        api = Slow()
        api.measure(self.metrics, "slow", clock=lambda: now[0])
        port = reactor.listenTCP(0, server.Site(api), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        response = yield treq.get(f"http://127.0.0.1:{port.getHost().port}/v1/things/x",
                                  pool=self.pool)
        yield treq.content(response)
        bucket = "perc_http_request_duration_seconds_bucket"
        labels = {"api": "slow", "route": "/v1/things/{thing}"}
        self.assertEqual(self.sample(bucket, le="0.25", **labels), 0.0)
        self.assertEqual(self.sample(bucket, le="0.5", **labels), 1.0)
        self.assertAlmostEqual(self.sample("perc_http_request_duration_seconds_sum",
                                           **labels), 0.3, places=6)

    def test_route_label(self):
        self.assertEqual(route_label(re.compile(r"/v1/conferences/(?P<conference_id>[^/]+)/keys")),
                         "/v1/conferences/{conference_id}/keys")
        self.assertEqual(route_label(re.compile(r"/\.well-known/jwks\.json")),
                         "/.well-known/jwks.json")
