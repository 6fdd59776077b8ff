"""The KD's HTTPS client of the KMF (perc_daemons.kmf.api routes, scope ``kd``).

:class:`KmfClient` talks to one KMF over HTTPS (treq), trusting only the
configured CA certificate(s) and checking the URL's host name against the
KMF's certificate (service_identity, RFC 6125).  It authenticates with an
OAuth 2.0 client credentials grant (RFC 6749 s4.4, HTTP Basic client
authentication s2.3.1, scope ``kd``); the access token is cached until 30 s
before it expires and dropped when the KMF answers 401.  The client secret is
read from its file whenever a token is needed, so installing the file later
needs no restart.

Failures are typed: :class:`KmfUnavailable` (connection, timeout, 5xx,
unusable response, missing secret file) and :class:`KmfRefused` (a 4xx with
its RFC 9457 problem ``type`` slug and ``detail``).  Neither the secret, the
token nor any key is ever logged or shown in an exception.

:meth:`KmfClient.events` follows ``GET /v1/events`` (Server-Sent Events,
WHATWG HTML s9.2) and reconnects with jittered exponential back-off.
"""

from __future__ import annotations

import base64
import json
import random
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any

import treq
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer, error, ssl
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.http_headers import Headers
from zope.interface import implementer

from perc_daemons import tls
from perc_daemons.interfaces import IKeySource
from perc_daemons.logs import quiet_pool
from perc_daemons.problems import parse_problem
from perc_daemons.protocol import jsontext
from perc_daemons.protocol.dtls.crypto import format_fingerprint
from perc_daemons.protocol.ekt import EktCipher, EktParameterSet, derive_master_salt
from perc_daemons.protocol.encryption_key import parse_encryption_key

__all__ = [
    "EKT_TTL",
    "KmfClient",
    "KmfError",
    "KmfEventStream",
    "KmfRefused",
    "KmfUnavailable",
    "SseParser",
]

#: ekt_ttl (RFC 8870 s5.2.2) of the parameter sets built from KMF keys, seconds.
EKT_TTL = 86400
#: Seconds before expiry at which a cached access token is replaced.
TOKEN_MARGIN = 30.0
#: Timeout of one ordinary request, seconds.
REQUEST_TIMEOUT = 10.0
#: Largest response body read, bytes.
MAX_RESPONSE = 1 << 20

class KmfError(Exception):
    """The KMF could not do what the KD asked."""


class KmfUnavailable(KmfError):
    """No usable answer: connection refused, timeout, TLS failure, 5xx, bad body."""


class KmfRefused(KmfError):
    """A 4xx answer; ``slug`` is the problem type's last part (``no-epoch`` etc.)."""

    def __init__(self, status: int, slug: str, detail: str) -> None:
        self.status = status
        self.slug = slug
        self.detail = detail
        super().__init__(f"KMF refused ({status} {slug}): {detail}")


def _load_trust_root(path: str) -> Any:
    with open(path, "rb") as f:
        pem = f.read()
    certificates = x509.load_pem_x509_certificates(pem)
    return ssl.trustRootFromCertificates([
        ssl.Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM))
        for c in certificates])


class SseParser:
    """Incremental ``text/event-stream`` parser: bytes in, ``(event, data)`` out."""

    def __init__(self, max_buffer: int = 1 << 20) -> None:
        self._buffer = b""
        self._event = ""
        self._data: list[str] = []
        self._max = max_buffer

    def feed(self, chunk: bytes) -> list[tuple[str, str]]:
        self._buffer += chunk
        if len(self._buffer) > self._max:
            raise ValueError("event stream line too long")
        out: list[tuple[str, str]] = []
        while True:
            cut = min((i for i in (self._buffer.find(b"\n"), self._buffer.find(b"\r"))
                       if i >= 0), default=-1)
            if cut < 0:
                return out
            line = self._buffer[:cut].decode("utf-8", errors="replace")
            skip = 2 if self._buffer[cut:cut + 2] == b"\r\n" else 1
            self._buffer = self._buffer[cut + skip:]
            if line == "":
                if self._data:
                    out.append((self._event or "message", "\n".join(self._data)))
                self._event, self._data = "", []
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
            if name == "event":
                self._event = value
            elif name == "data":
                self._data.append(value)


class _StreamBody(Protocol):
    def __init__(self, stream: KmfEventStream) -> None:
        self._stream = stream
        self._parser = SseParser()
        self.done: defer.Deferred[str] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        try:
            events = self._parser.feed(data)
        except ValueError as e:
            self.transport.stopProducing()  # type: ignore[union-attr]
            if not self.done.called:
                self.done.callback(str(e))
            return
        for kind, text in events:
            self._stream.dispatch(kind, text)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.done.called:
            self.done.callback("stream ended")


class KmfEventStream:
    """``GET /v1/events``, kept open: ``callback(kind, data)`` per event; :meth:`stop`."""

    log = Logger()

    def __init__(self, client: KmfClient, callback: Callable[[str, dict[str, Any]], None], *,
                 min_delay: float = 0.5, max_delay: float = 30.0,
                 on_connected: Callable[[], None] | None = None) -> None:
        self._client = client
        self._callback = callback
        self._min_delay = min_delay
        self._max_delay = max_delay
        self._on_connected = on_connected
        self._delay = min_delay
        self._running = False
        self._pending: defer.Deferred[Any] | None = None
        self._body: _StreamBody | None = None
        self._retry: Any = None
        self.connected = False

    def start(self) -> None:
        if not self._running:
            self._running = True
            self._connect()

    def stop(self) -> None:
        self._running = False
        self.connected = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._pending is not None:
            self._pending.cancel()
        if self._body is not None and self._body.transport is not None:
            self._body.transport.stopProducing()

    def dispatch(self, kind: str, text: str) -> None:
        try:
            data = jsontext.loads(text)
        except jsontext.JsonError:
            self.log.warn("KMF event {kind!r} with a body that is not JSON: ignored", kind=kind)
            return
        if not isinstance(data, dict):
            return
        try:
            self._callback(kind, data)
        except Exception:
            self.log.failure("KMF event handler failed on {kind!r}", kind=kind)

    def _connect(self) -> None:
        self._retry = None
        d = defer.ensureDeferred(self._follow())
        self._pending = d
        d.addErrback(lambda f: f.trap(defer.CancelledError))

    async def _follow(self) -> None:
        reason = "stream ended"
        try:
            response = await self._client.open_events()
            self._pending = None
            if not self._running:
                response.original.deliverBody(Protocol())
                return
            self.connected = True
            self._delay = self._min_delay
            self.log.info("KMF event stream connected")
            if self._on_connected is not None:
                self._on_connected()
            body = _StreamBody(self)
            self._body = body
            response.original.deliverBody(body)
            reason = await body.done
            self._body = None
        except defer.CancelledError:
            return
        except KmfError as e:
            reason = str(e)
        finally:
            self.connected = False
        if not self._running:
            return
        delay = self._delay * random.uniform(0.8, 1.2)
        self._delay = min(self._delay * 2, self._max_delay)
        self.log.warn("KMF event stream: {reason}; reconnecting in {delay:.1f} s",
                      reason=reason, delay=delay)
        self._retry = self._client.reactor.callLater(delay, self._connect)


@implementer(IKeySource)
class KmfClient:
    """HTTPS client of the KMF for the KD: token, invitations, epochs, keys, roster, events."""

    log = Logger()

    def __init__(self, reactor: Any, base_url: str, ca_certificate_path: str, client_id: str,
                 client_secret_file: str, *, timeout: float = REQUEST_TIMEOUT) -> None:
        if not base_url.startswith("https://"):
            raise ValueError("the KMF URL must be https://")
        self.reactor = reactor
        self.base_url = base_url.rstrip("/")
        self.ca_certificate_path = ca_certificate_path
        self.client_id = client_id
        self.client_secret_file = client_secret_file
        self.timeout = timeout
        self._agent: Agent | None = None
        self._pool = quiet_pool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 4
        # Drop idle connections before the KMF does ([connections] idle_timeout, 60 s by
        # default), so that a request is not sent on one the KMF is just closing.
        self._pool.cachedConnectionTimeout = 30
        self._stream_pool = quiet_pool(reactor, persistent=False)
        self._token: str | None = None
        self._token_expires = 0.0
        self._token_waiters: list[defer.Deferred[str]] | None = None

    def __repr__(self) -> str:
        return f"<KmfClient {self.base_url} client_id={self.client_id!r}>"

    def close(self) -> defer.Deferred[None]:
        """Close cached connections (for stopService and tests)."""
        return defer.gatherResults([self._pool.closeCachedConnections(),
                                    self._stream_pool.closeCachedConnections()]
                                   ).addCallback(lambda _: None)

    # -- plumbing --------------------------------------------------------------------

    def _get_agent(self, pool: HTTPConnectionPool) -> Agent:
        try:
            root = _load_trust_root(self.ca_certificate_path)
        except (OSError, ValueError) as e:
            raise KmfUnavailable(f"KMF CA file {self.ca_certificate_path}: "
                                 f"{getattr(e, 'strerror', None) or e}") from None
        return Agent(self.reactor, contextFactory=BrowserLikePolicyForHTTPS(root), pool=pool)

    def _secret(self) -> str:
        try:
            return tls.read_secret_line(self.client_secret_file)
        except tls.TlsFileError as e:
            raise KmfUnavailable(f"client secret file {self.client_secret_file}: {e}") from None

    async def _send(self, method: str, path: str, *, headers: dict[str, str],
                    data: bytes | None = None, pool: HTTPConnectionPool | None = None,
                    timeout: float | None = None, stream: bool = False) -> Any:
        agent = self._get_agent(pool or self._pool)
        try:
            response = await treq.request(
                method, self.base_url + path, headers=Headers(
                    {k: [v] for k, v in headers.items()}),
                data=data, agent=agent, timeout=None if stream else (timeout or self.timeout),
                unbuffered=stream, allow_redirects=False)
        except defer.CancelledError:
            raise
        except Exception as e:
            raise KmfUnavailable(f"{method} {path}: {_describe(e)}") from None
        return response

    async def _read(self, response: Any, what: str) -> bytes:
        try:
            body = await treq.content(response)
        except Exception as e:
            raise KmfUnavailable(f"{what}: reading the response: {_describe(e)}") from None
        if len(body) > MAX_RESPONSE:
            raise KmfUnavailable(f"{what}: response too large")
        return body

    @staticmethod
    def _problem(status: int, body: bytes) -> tuple[str, str]:
        problem = parse_problem(status, body)
        return problem.slug, problem.detail[:200]

    async def _call(self, method: str, path: str, *, body: Any = None,
                    expect: tuple[int, ...] = (200,)) -> tuple[Any, Any]:
        """``(response, parsed JSON)`` of an authorised call; one retry after a 401."""
        for attempt in (1, 2):
            token = await self.token()
            headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
            data = None
            if body is not None:
                headers["Content-Type"] = "application/json"
                data = json.dumps(body).encode()
            response = await self._send(method, path, headers=headers, data=data)
            content = await self._read(response, f"{method} {path}")
            if response.code == 401 and attempt == 1:
                self._token = None  # revoked, or the KMF's keys changed: new token
                continue
            return self._check(method, path, response, content, expect)
        raise AssertionError("unreachable")

    def _check(self, method: str, path: str, response: Any, content: bytes,
               expect: tuple[int, ...]) -> tuple[Any, Any]:
        if response.code in expect:
            if not content:
                return response, None
            try:
                return response, jsontext.loads(content, max_size=MAX_RESPONSE)
            except jsontext.JsonError:
                raise KmfUnavailable(f"{method} {path}: answer is not JSON") from None
        slug, detail = self._problem(response.code, content)
        if 400 <= response.code < 500:
            raise KmfRefused(response.code, slug or "error", detail)
        raise KmfUnavailable(f"{method} {path}: HTTP {response.code} {slug}".rstrip())

    # -- OAuth -----------------------------------------------------------------------

    async def token(self) -> str:
        """An access token with scope ``kd`` (client credentials, RFC 6749 s4.4)."""
        if self._token is not None and self.reactor.seconds() < self._token_expires:
            return self._token
        waiter: defer.Deferred[str] = defer.Deferred()
        if self._token_waiters is not None:  # a request is under way: share it
            self._token_waiters.append(waiter)
            return await waiter
        self._token_waiters = [waiter]

        def done(result: Any) -> None:
            waiters, self._token_waiters = self._token_waiters or [], None
            for w in waiters:
                if isinstance(result, Failure):
                    w.errback(result)
                else:
                    w.callback(result)
        defer.ensureDeferred(self._fetch_token()).addBoth(done)
        return await waiter

    async def _fetch_token(self) -> str:
        secret = self._secret()
        quote = urllib.parse.quote_plus
        userpass = f"{quote(self.client_id, safe='')}:{quote(secret, safe='')}"
        headers = {
            "Authorization": "Basic " + base64.b64encode(userpass.encode()).decode("ascii"),
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json",
        }
        data = urllib.parse.urlencode({"grant_type": "client_credentials",
                                       "scope": "kd"}).encode("ascii")
        started = self.reactor.seconds()
        response = await self._send("POST", "/oauth/token", headers=headers, data=data)
        content = await self._read(response, "POST /oauth/token")
        _, body = self._check("POST", "/oauth/token", response, content, (200,))
        token = body.get("access_token") if isinstance(body, dict) else None
        lifetime = body.get("expires_in", 60) if isinstance(body, dict) else 60
        if not isinstance(token, str) or not token:
            raise KmfUnavailable("POST /oauth/token: no access_token in the answer")
        if isinstance(lifetime, bool) or not isinstance(lifetime, int | float):
            lifetime = 60
        self._token = token
        self._token_expires = started + max(0.0, float(lifetime) - TOKEN_MARGIN)
        self.log.info("KMF access token obtained for client {client_id} "
                      "(valid {lifetime} s)", client_id=self.client_id, lifetime=lifetime)
        return token

    # -- API -------------------------------------------------------------------------

    @staticmethod
    def _cid(conference_id: str) -> str:
        return urllib.parse.quote(conference_id, safe="")

    async def invitation(self, conference_id: str, identity: str) -> dict[str, Any]:
        """``GET .../invitations/{identity}``: invited, state, late_joiners_get_earlier_epochs."""
        _, body = await self._call(
            "GET", f"/v1/conferences/{self._cid(conference_id)}/invitations/"
                   f"{urllib.parse.quote(identity, safe='')}")
        if (not isinstance(body, dict) or not isinstance(body.get("invited"), bool)
                or not isinstance(body.get("state"), str)):
            raise KmfUnavailable("invitation answer is malformed")
        return body

    async def new_epoch(self, conference_id: str) -> dict[str, Any]:
        """``POST .../epochs``: start the conference's next epoch; ``{"epoch", "spi", ...}``."""
        _, body = await self._call(
            "POST", f"/v1/conferences/{self._cid(conference_id)}/epochs", expect=(201,))
        if not isinstance(body, dict) or not isinstance(body.get("epoch"), int):
            raise KmfUnavailable("epoch answer is malformed")
        return body

    async def current_key(self, conference_id: str) -> tuple[int, EktParameterSet]:
        """``POST .../keys``: the current epoch and its EKT parameter set.

        The key comes from the ``Encryption-Key`` header, the cipher from
        ``ekt_cipher``, the SPI from the body, the master salt from
        :func:`derive_master_salt`; ``ttl`` is :data:`EKT_TTL`.
        """
        response, body = await self._call(
            "POST", f"/v1/conferences/{self._cid(conference_id)}/keys")
        try:
            epoch, spi = body["epoch"], body["spi"]
            if body.get("conference") != conference_id:
                raise ValueError("answer is for another conference")
            if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
                raise ValueError("bad epoch")
            cipher = EktCipher[body["ekt_cipher"]]
            [header] = response.headers.getRawHeaders(b"encryption-key")
            key = parse_encryption_key(header.decode("latin-1"), conference_id, epoch)
            params = EktParameterSet(key=key, cipher=cipher,
                                     master_salt=derive_master_salt(key, conference_id, epoch),
                                     spi=spi, ttl=EKT_TTL)
        except (KeyError, TypeError, ValueError) as e:
            # Never echo the header: it holds the key.
            raise KmfUnavailable(f"key answer is malformed ({type(e).__name__})") from None
        return epoch, params

    async def put_roster(self, conference_id: str, epoch: int,
                         members: Sequence[tuple[str, Sequence[int]]],
                         admitted: Sequence[tuple[str, bytes]] = ()) -> dict[str, Any]:
        """``PUT .../roster``: the keyed members and their SSRCs for ``epoch``, with the
        certificate fingerprints each identity was admitted with (``admitted``)."""
        fingerprints: dict[str, list[str]] = {}
        for identity, fingerprint in admitted:
            fingerprints.setdefault(identity, []).append(format_fingerprint(fingerprint))
        _, body = await self._call(
            "PUT", f"/v1/conferences/{self._cid(conference_id)}/roster",
            body={"epoch": epoch, "members": [
                {"identity": identity, "ssrcs": list(ssrcs),
                 "fingerprints": fingerprints.get(identity, [])}
                for identity, ssrcs in members]})
        return body if isinstance(body, dict) else {}

    async def post_audit(self, conference_id: str,
                         events: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """``POST .../audit``: a batch of the KD's audit reports (docs/API.md)."""
        _, body = await self._call(
            "POST", f"/v1/conferences/{self._cid(conference_id)}/audit",
            body={"events": list(events)})
        return body if isinstance(body, dict) else {}

    async def invitation_check(self, conference_id: str,
                               identities: Sequence[str]) -> tuple[str, frozenset[str]]:
        """``POST .../invitation-check``: the conference's state and which of
        ``identities`` are still invited."""
        _, body = await self._call(
            "POST", f"/v1/conferences/{self._cid(conference_id)}/invitation-check",
            body={"identities": list(identities)})
        if (not isinstance(body, dict) or not isinstance(body.get("state"), str)
                or not isinstance(body.get("invited"), list)
                or not all(isinstance(i, str) for i in body["invited"])):
            raise KmfUnavailable("invitation check answer is malformed")
        return body["state"], frozenset(body["invited"])

    async def media_distributors(self) -> list[str]:
        """``GET /v1/media-distributors``: the ``host:port`` tunnel addresses of the MDs
        serving conferences that have not ended (draft-roach slides 4.1.1 step 11)."""
        _, body = await self._call("GET", "/v1/media-distributors")
        items = body.get("media_distributors") if isinstance(body, dict) else None
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise KmfUnavailable("media distributor list is malformed")
        return items

    async def jwks(self) -> dict[str, Any]:
        """``GET /.well-known/jwks.json`` (public)."""
        response = await self._send("GET", "/.well-known/jwks.json",
                                    headers={"Accept": "application/json"})
        content = await self._read(response, "GET /.well-known/jwks.json")
        _, body = self._check("GET", "/.well-known/jwks.json", response, content, (200,))
        if not isinstance(body, dict):
            raise KmfUnavailable("JWKS is not a JSON object")
        return body

    async def open_events(self) -> Any:
        """The response of ``GET /v1/events``, its body not read yet."""
        for attempt in (1, 2):
            token = await self.token()
            response = await self._send(
                "GET", "/v1/events", pool=self._stream_pool, stream=True,
                headers={"Authorization": f"Bearer {token}", "Accept": "text/event-stream"})
            if response.code == 200:
                return response
            content = await self._read(response, "GET /v1/events")
            if response.code == 401 and attempt == 1:
                self._token = None
                continue
            self._check("GET", "/v1/events", response, content, (200,))
        raise KmfUnavailable("GET /v1/events: refused")

    def events(self, callback: Callable[[str, dict[str, Any]], None], *,
               min_delay: float = 0.5, max_delay: float = 30.0,
               on_connected: Callable[[], None] | None = None) -> KmfEventStream:
        """Follow the KMF's events (started at once); ``.stop()`` ends it."""
        stream = KmfEventStream(self, callback, min_delay=min_delay, max_delay=max_delay,
                                on_connected=on_connected)
        stream.start()
        return stream


def _describe(e: BaseException) -> str:
    """A short reason for a transport failure, without any secret."""
    if isinstance(e, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, error.DNSLookupError):
        return "host name not found"
    if isinstance(e, defer.TimeoutError | error.TimeoutError):
        return "timed out"
    text = str(e) or type(e).__name__
    for inner in getattr(e, "reasons", None) or ():
        value = getattr(inner, "value", None)
        if value is not None:
            text = f"{type(value).__name__}: {value}"
            break
    return text[:300]
