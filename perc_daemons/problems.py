"""RFC 9457 problem details for the daemons' HTTPS APIs (KMF, MD), and JSON bodies.

A handler raises :class:`Problem`; :func:`write_problem` renders it as
``application/problem+json`` with members ``type`` (``urn:perc:problem:<slug>``),
``title``, ``status`` and ``detail``.  :class:`LimitedRequest` stops buffering
a request body beyond the site's limit (the route then answers 413), and
:func:`read_json` enforces ``Content-Type: application/json`` (415) and
well-formed JSON objects (400).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.web import server

__all__ = [
    "PROBLEM_CONTENT_TYPE",
    "LimitedRequest",
    "Problem",
    "problem_body",
    "read_json",
    "write_problem",
]

PROBLEM_CONTENT_TYPE = b"application/problem+json"
TYPE_PREFIX = "urn:perc:problem:"


class Problem(Exception):
    """An HTTP error response (RFC 9457)."""

    def __init__(self, status: int, slug: str, title: str, detail: str = "",
                 headers: dict[bytes, bytes] | None = None) -> None:
        super().__init__(f"{status} {slug}: {detail or title}")
        self.status = status
        self.slug = slug
        self.title = title
        self.detail = detail
        self.headers = dict(headers or {})

    @property
    def type(self) -> str:
        return TYPE_PREFIX + self.slug


def problem_body(problem: Problem) -> dict[str, Any]:
    body: dict[str, Any] = {"type": problem.type, "title": problem.title,
                            "status": problem.status}
    if problem.detail:
        body["detail"] = problem.detail
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


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


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
        value = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise Problem(400, "malformed-json", "Malformed JSON", str(e)) from None
    if not isinstance(value, dict):
        raise Problem(400, "malformed-json", "Malformed JSON", "the body must be a JSON object")
    return value
