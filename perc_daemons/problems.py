"""The daemons' HTTPS API plumbing (KMF, MD): routes, JSON bodies, RFC 9457 problems.

:class:`JsonApi` is the resource both APIs derive from: a route table of
path patterns and per-method coroutines returning a :class:`Response`.

A handler raises :class:`Problem`; :func:`write_problem` renders it as
``application/problem+json`` with members ``type`` (``urn:perc:problem:<slug>``),
``title``, ``status`` and ``detail``.  :class:`LimitedRequest` stops buffering
a request body beyond the site's limit (the route then answers 413), and
:func:`read_json` enforces ``Content-Type: application/json`` (415) and
well-formed JSON objects (400, also for nesting beyond
:data:`~perc_daemons.protocol.jsontext.MAX_DEPTH`: :func:`jsontext.loads`).
"""

from __future__ import annotations

import json
import re
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from prometheus_client import Counter, Histogram
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server

from perc_daemons.metrics import Metrics
from perc_daemons.protocol import jsontext

__all__ = [
    "PROBLEM_CONTENT_TYPE",
    "JsonApi",
    "LimitedRequest",
    "Problem",
    "Response",
    "Routes",
    "problem_body",
    "read_json",
    "write_problem",
]

PROBLEM_CONTENT_TYPE = b"application/problem+json"
TYPE_PREFIX = "urn:perc:problem:"


class Problem(Exception):
    """An HTTP error response (RFC 9457)."""

    def __init__(self, status: int, slug: str, title: str, detail: str = "",
                 headers: dict[bytes, bytes] | None = None,
                 extensions: dict[str, Any] | None = None) -> None:
        super().__init__(f"{status} {slug}: {detail or title}")
        self.status = status
        self.slug = slug
        self.title = title
        self.detail = detail
        self.headers = dict(headers or {})
        #: RFC 9457 s3.2 extension members, e.g. ``{"reason": "not_started"}``.
        self.extensions = dict(extensions or {})

    @property
    def type(self) -> str:
        return TYPE_PREFIX + self.slug


def problem_body(problem: Problem) -> dict[str, Any]:
    body: dict[str, Any] = {"type": problem.type, "title": problem.title,
                            "status": problem.status}
    if problem.detail:
        body["detail"] = problem.detail
    for name, value in problem.extensions.items():
        body.setdefault(name, value)
    return body


def write_problem(request: server.Request, problem: Problem) -> None:
    """Answer ``request`` with ``problem`` and finish it."""
    request.setResponseCode(problem.status)
    for name, value in problem.headers.items():
        request.setHeader(name, value)
    request.setHeader(b"content-type", PROBLEM_CONTENT_TYPE)
    request.setHeader(b"cache-control", b"no-store")
    request.write(json.dumps(problem_body(problem)).encode() + b"\n")
    request.finish()


class LimitedRequest(server.Request):
    """A request that keeps at most ``channel.site.max_body`` bytes of its body.

    Beyond that the rest is discarded and ``body_too_large`` is set; the
    resource answers 413 rather than reading a truncated body.
    """

    body_too_large = False
    _received = 0

    def _limit(self) -> int:
        site = getattr(self.channel, "site", None)
        return getattr(site, "max_body", 65536)

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self._limit():
            self.body_too_large = True
            length = 0  # buffer nothing (never a temporary file)
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_too_large:
            return
        self._received += len(data)
        if self._received > self._limit():
            self.body_too_large = True
            self.content.seek(0)
            self.content.truncate()
            return
        super().handleContentChunk(data)


def read_json(request: server.Request) -> dict[str, Any]:
    """The request body as a JSON object, or a :class:`Problem` (413, 415, 400)."""
    if getattr(request, "body_too_large", False):
        raise Problem(413, "body-too-large", "Request body too large",
                      f"the body may be at most {request.channel.site.max_body} bytes")
    content_type = (request.getHeader(b"content-type") or b"").decode("latin-1")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise Problem(415, "unsupported-media-type", "Unsupported media type",
                      "the body must be application/json",
                      headers={b"accept-post": b"application/json"})
    request.content.seek(0)
    raw = request.content.read()
    try:
        value = jsontext.loads(raw)
    except jsontext.JsonError as e:
        raise Problem(400, "malformed-json", "Malformed JSON", str(e)) from None
    if not isinstance(value, dict):
        raise Problem(400, "malformed-json", "Malformed JSON", "the body must be a JSON object")
    return value


@dataclass
class Response:
    status: int = 200
    body: Any = None  # JSON-serialisable, bytes written as they are, or None for no body
    headers: dict[bytes, Any] | None = None  # bytes, or a list of bytes for several values


Handler = Callable[..., Awaitable["Response | None"]]
Routes = list[tuple[re.Pattern[str], dict[bytes, Handler]]]


#: Methods counted by name; any other is ``method="other"`` (bounded label values).
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def route_label(pattern: re.Pattern[str]) -> str:
    """A route pattern as a metric label: named groups as ``{name}``.

    ``/v1/conferences/(?P<conference_id>[^/]+)/keys`` -> ``/v1/conferences/{conference_id}/keys``
    """
    text = re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", pattern.pattern)
    return text.replace("\\", "")


class HttpMetrics:
    """``perc_http_requests_total{api,route,method,status}`` and
    ``perc_http_request_duration_seconds{api,route}`` (a histogram) of a :class:`JsonApi`.

    ``route`` is the route's pattern (:func:`route_label`) or ``unmatched`` (404s),
    ``status`` the HTTP status code or ``disconnected`` (the client went away
    first); the duration runs from the request's dispatch to its last byte.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.requests = Counter(
            "perc_http_requests", "HTTP API requests answered, by API, route, method and status",
            ["api", "route", "method", "status"], registry=metrics.registry)
        self.duration = Histogram(
            "perc_http_request_duration_seconds",
            "HTTP API request duration, from dispatch to the last byte, by API and route",
            ["api", "route"], registry=metrics.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))


_HTTP_METRICS: weakref.WeakKeyDictionary[Metrics, HttpMetrics] = weakref.WeakKeyDictionary()


def http_metrics(metrics: Metrics) -> HttpMetrics:
    """The :class:`HttpMetrics` of ``metrics``, registered once per registry."""
    found = _HTTP_METRICS.get(metrics)
    if found is None:
        found = _HTTP_METRICS[metrics] = HttpMetrics(metrics)
    return found


class JsonApi(resource.Resource):
    """Dispatches ``_routes`` (pattern, {method: coroutine}); answers JSON or a problem.

    A handler gets the request and the pattern's named groups (percent-decoded)
    and returns a :class:`Response`, or None when it wrote the response itself
    (streams); :meth:`prepare` runs before it.  HEAD is served by GET.  An
    exception becomes a problem through :meth:`problem_for`, which subclasses
    extend for their own errors.
    """

    isLeaf = True
    log = Logger()
    _routes: Routes = []
    #: Set by :meth:`measure`: requests counted and timed per route.
    _http_metrics: HttpMetrics | None = None
    _api_name = ""
    _clock: Callable[[], float] = staticmethod(time.monotonic)

    def measure(self, metrics: Metrics, api: str,
                clock: Callable[[], float] = time.monotonic) -> None:
        """Count and time every request in ``metrics`` with label ``api="<api>"``
        (:class:`HttpMetrics`)."""
        self._http_metrics = http_metrics(metrics)
        self._api_name = api
        self._clock = clock  # type: ignore[assignment]

    def render(self, request: server.Request) -> int:
        if self._http_metrics is not None:
            started = self._clock()
            route = self._route_of(request)
            method = request.method.decode("latin-1")
            request.notifyFinish().addBoth(
                lambda result: self._observe(request, route, method, started, result))
        return self._render(request)

    def _route_of(self, request: server.Request) -> str:
        path = request.path.decode("latin-1")
        if len(path) > 1 and path.endswith("/"):
            path = path[:-1]
        for pattern, _ in self._routes:
            if pattern.fullmatch(path) is not None:
                return route_label(pattern)
        return "unmatched"

    def _observe(self, request: server.Request, route: str, method: str, started: float,
                 result: object) -> None:
        metrics = self._http_metrics
        assert metrics is not None
        status = "disconnected" if isinstance(result, Failure) else str(request.code)
        if method not in _METHODS:
            method = "other"
        metrics.requests.labels(self._api_name, route, method, status).inc()
        metrics.duration.labels(self._api_name, route).observe(
            max(0.0, self._clock() - started))

    def _render(self, request: server.Request) -> int:
        path = request.path.decode("latin-1")
        if len(path) > 1 and path.endswith("/"):
            path = path[:-1]
        for pattern, methods in self._routes:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            method = request.method
            if method == b"HEAD" and b"GET" in methods:
                method = b"GET"
            handler = methods.get(method)
            if handler is None:
                write_problem(request, Problem(
                    405, "method-not-allowed", "Method not allowed",
                    f"{request.method.decode('latin-1')} is not allowed here",
                    headers={b"allow": b", ".join(sorted(methods))}))
                return server.NOT_DONE_YET
            args = {k: unquote(v) for k, v in match.groupdict().items()}
            d = defer.ensureDeferred(self._handle(request, handler, args))
            d.addCallbacks(lambda response: self._respond(request, response),
                           lambda f: self._fail(request, f))
            return server.NOT_DONE_YET
        write_problem(request, Problem(404, "not-found", "Not found", "no such resource"))
        return server.NOT_DONE_YET

    async def _handle(self, request: server.Request, handler: Handler,
                      args: dict[str, str]) -> Response | None:
        await self.prepare(request)
        return await handler(request, **args)

    async def prepare(self, request: server.Request) -> None:
        """Runs before the route's handler; what it raises answers the request.

        Subclasses look up here what their (synchronous) checks need, such as
        the revocation of the request's bearer token.
        """

    def _respond(self, request: server.Request, response: Response | None) -> None:
        if response is None or request.finished or getattr(request, "_disconnected", False):
            return  # streamed, or the client went away
        request.setResponseCode(response.status)
        request.setHeader(b"cache-control", b"no-store")
        for name, value in (response.headers or {}).items():
            if isinstance(value, list):  # several values (Set-Cookie)
                for one in value:
                    request.responseHeaders.addRawHeader(name, one)
            else:
                request.setHeader(name, value)
        if isinstance(response.body, bytes):
            request.write(response.body)
        elif response.body is not None:
            if not request.responseHeaders.hasHeader(b"content-type"):
                request.setHeader(b"content-type", b"application/json")
            request.write(json.dumps(response.body).encode() + b"\n")
        request.finish()

    def _fail(self, request: server.Request, failure: Failure) -> None:
        if request.finished or getattr(request, "_disconnected", False):
            return
        write_problem(request, self.problem_for(request, failure))

    def problem_for(self, request: server.Request, failure: Failure) -> Problem:
        """The problem answering ``failure``: a Problem as it is, anything else a 500."""
        if isinstance(failure.value, Problem):
            return failure.value
        self.log.failure("{method} {path} failed", failure,
                         method=request.method.decode("latin-1"),
                         path=request.path.decode("latin-1"))
        return Problem(500, "internal-error", "Internal server error")


@dataclass(frozen=True)
class ProblemText:
    """What a client can say about an error answer: slug, title and detail."""

    slug: str
    title: str
    detail: str


def parse_problem(status: int, content: bytes) -> ProblemText:
    """An RFC 9457 problem, an RFC 6749 s5.2 OAuth error, or any other body, for messages.

    ``slug`` is the last part of the problem ``type`` (or the OAuth ``error``),
    empty when the body is neither; ``title`` falls back to ``HTTP <status>``.
    """
    try:
        body = jsontext.loads(content)
    except jsontext.JsonError:
        body = None
    if not isinstance(body, dict):
        return ProblemText("", f"HTTP {status}", "")

    def text(name: str) -> str:
        value = body.get(name)
        return value if isinstance(value, str) else ""

    if text("error") and not text("type"):  # RFC 6749 s5.2
        return ProblemText(text("error"), text("error"), text("error_description"))
    return ProblemText(text("type").rpartition(":")[2], text("title") or f"HTTP {status}",
                       text("detail"))
