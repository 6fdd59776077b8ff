"""perc_daemons.protocol.jsontext: the one JSON reader, against deeply nested and oversized text.

The attacker is a peer that sends ``[`` x 30000 (or ``{"a":`` x 30000): an
endpoint posting to the MD's unauthenticated join route, a client of the
KMF, or a hostile server the KD and the endpoint talk to.  The reader must
refuse it with a typed error, never ``RecursionError``; the clients below
talk real HTTPS to a real hostile server on loopback.
"""

from __future__ import annotations

import json
import os

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from twisted.web import resource, server

from perc_daemons import tls
from perc_daemons.devpki import DevPki
from perc_daemons.endpoint.https import ClientTlsPolicy, HttpsClient, load_ca
from perc_daemons.kd.kmf_client import KmfClient, KmfUnavailable
from perc_daemons.problems import parse_problem
from perc_daemons.protocol.errors import ProtocolError
from perc_daemons.protocol.jose import strict_json_loads
from perc_daemons.protocol.jsontext import MAX_DEPTH, JsonError, loads

DEEP_ARRAYS = "[" * 30000
DEEP_OBJECTS = '{"a":' * 30000
DEEP_MIXED = '{"a":[' * 15000


class LoadsTests(unittest.TestCase):
    def test_deep_nesting_is_a_typed_error(self) -> None:
        for text in (DEEP_ARRAYS, DEEP_OBJECTS, DEEP_MIXED,
                     DEEP_ARRAYS + "]" * 30000, "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1)):
            for data in (text, text.encode()):
                error = self.assertRaises(JsonError, loads, data)
                self.assertIsInstance(error, ProtocolError)
                self.assertIsInstance(error, ValueError)
                self.assertIn("nested deeper than", str(error))
                self.assertNotIn("\n", str(error))

    def test_nesting_up_to_the_limit_is_read(self) -> None:
        text = "[" * MAX_DEPTH + "]" * MAX_DEPTH
        value = loads(text)
        for _ in range(MAX_DEPTH - 1):
            [value] = value
        self.assertEqual(value, [])

    def test_brackets_in_strings_do_not_count(self) -> None:
        text = json.dumps({"sdp": "[" * 5000 + "{" * 5000, "esc": '\\"[[[' * 100})
        self.assertEqual(loads(text)["sdp"], "[" * 5000 + "{" * 5000)

    def test_size_limit(self) -> None:
        self.assertEqual(loads(b"[1, 2]", max_size=6), [1, 2])
        error = self.assertRaises(JsonError, loads, b"[1,  2]", max_size=6)
        self.assertIn("larger than 6 bytes", str(error))

    def test_not_json(self) -> None:
        for data in (b'{"a":', b"\xff", b'{"a": NaN}', "[Infinity]", b"", "[1,]"):
            self.assertRaises(JsonError, loads, data)

    def test_duplicate_members_refused_on_demand(self) -> None:
        self.assertEqual(loads('{"a": 1, "a": 2}'), {"a": 2})
        self.assertRaises(JsonError, loads, '{"a": 1, "a": 2}', unique_keys=True)
        self.assertRaises(JsonError, strict_json_loads, '{"a": 1, "a": 2}')
        self.assertRaises(JsonError, strict_json_loads, DEEP_OBJECTS)

    def test_same_value_as_json(self) -> None:
        text = json.dumps({"a": [1, 2.5, None, True, "x\u00e9"], "b": {"c": []}})
        self.assertEqual(loads(text), json.loads(text))
        self.assertEqual(loads(text.encode()), json.loads(text))

    @given(st.text(alphabet='[]{}":,a1\\ ', max_size=200))
    def test_never_raises_anything_else(self, text: str) -> None:
        try:
            loads(text)
        except JsonError:
            pass

    def test_problem_of_a_deep_body(self) -> None:
        problem = parse_problem(502, DEEP_ARRAYS.encode())
        self.assertEqual((problem.slug, problem.title), ("", "HTTP 502"))


class HostileServer(resource.Resource):
    """A KMF/MD look-alike whose every JSON answer is nested 30000 deep."""

    isLeaf = True

    def render_POST(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        if request.path == b"/oauth/token" and self.good_token:
            return json.dumps({"access_token": "t0k", "token_type": "Bearer",
                               "expires_in": 300}).encode()
        return DEEP_ARRAYS.encode()

    good_token = False

    def render_GET(self, request: server.Request) -> int | bytes:
        if request.path != b"/v1/events":
            request.setHeader(b"content-type", b"application/json")
            return DEEP_OBJECTS.encode()
        request.setHeader(b"content-type", b"text/event-stream")
        request.write(f"event: epoch\ndata: {DEEP_ARRAYS}\n\n"
                      'event: epoch\ndata: {"conference": "c1", "epoch": 2}\n\n'.encode())
        return server.NOT_DONE_YET


class HostilePeerTests(unittest.TestCase):
    """The KD's and the endpoint's clients against a server answering deep JSON."""

    timeout = 20

    def setUp(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.pki = DevPki(os.path.join(directory, "pki"))
        issued = self.pki.issue("kmf", ["localhost"], ["127.0.0.1"])
        self.hostile = HostileServer()
        site = server.Site(self.hostile)
        context = tls.server_context_factory(str(issued.certificate), str(issued.private_key))
        port = reactor.listenSSL(0, site, context, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.url = f"https://localhost:{port.getHost().port}"
        self.secret = os.path.join(directory, "secret")
        fd = os.open(self.secret, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"kd-secret\n")
        os.close(fd)

    def kd_client(self) -> KmfClient:
        client = KmfClient(reactor, self.url, str(self.pki.ca_certificate_path), "kd",
                           self.secret)
        self.addCleanup(client.close)
        return client

    @defer.inlineCallbacks
    def test_kd_token_answer_too_deep_is_kmf_unavailable(self):
        error = yield self.assertFailure(defer.ensureDeferred(self.kd_client().token()),
                                         KmfUnavailable)
        self.assertIn("not JSON", str(error))

    @defer.inlineCallbacks
    def test_kd_api_answer_too_deep_is_kmf_unavailable(self):
        self.hostile.good_token = True
        yield self.assertFailure(defer.ensureDeferred(self.kd_client().jwks()), KmfUnavailable)

    @defer.inlineCallbacks
    def test_kd_event_too_deep_is_skipped_and_the_stream_goes_on(self):
        self.hostile.good_token = True
        seen: list[tuple[str, dict]] = []
        stream = self.kd_client().events(lambda kind, data: seen.append((kind, data)))
        self.addCleanup(stream.stop)
        for _ in range(1000):
            if seen:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(seen, [("epoch", {"conference": "c1", "epoch": 2})])
        self.assertTrue(stream.connected)

    @defer.inlineCallbacks
    def test_endpoint_answer_too_deep_is_no_json(self):
        http = HttpsClient(reactor, self.url,
                           ClientTlsPolicy(load_ca(str(self.pki.ca_certificate_path))))
        self.addCleanup(lambda: defer.ensureDeferred(http.close()))
        code, parsed, content = yield defer.ensureDeferred(http.json("GET", "/v1/anything"))
        self.assertEqual((code, parsed, len(content)), (200, None, len(DEEP_OBJECTS)))
