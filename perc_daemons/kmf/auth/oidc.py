"""OpenID Connect back-end: ID tokens of an upstream provider, checked against its JWKS.

* Signature: the provider's JWKS is fetched with treq (HTTPS; plain HTTP
  only for loopback hosts), kept for ``jwks_ttl`` seconds, and fetched again
  when a token names an unknown ``kid`` (at most once per
  ``refetch_interval`` seconds, so bogus kids cannot make us hammer the
  provider).  If a refresh fails the previous keys stay in use.  Only the
  configured ``algorithms`` are accepted (never ``none`` or HMAC), and a key
  whose JWK names an ``alg`` is used with that algorithm only.
* Claims: ``iss`` must equal ``issuer``; ``aud`` must contain ``audience``
  (our client_id) and, with several audiences, ``azp`` must be ours;
  ``exp``, ``iat`` (and ``nbf`` if present) are checked on ``clock`` with
  ``leeway`` seconds; the ``nonce`` must match when the credentials carry one.
* Identity: the value of ``claim``.  ``user@domain`` values keep their
  domain; other values get ``@domain``.  With ``domain`` set, identities in
  another domain are refused.  For the ``email`` claim ``email_verified`` must
  be true (``require_email_verified``), or anyone able to set an unverified
  address at the provider could claim that identity.

:class:`OidcLogin` is the relying-party half: it builds the authorization
request (code flow, PKCE S256, nonce) and exchanges the code at the token
endpoint for the ID token the authenticator then checks; the KMF's
``/oauth/authorize`` and ``/oauth/oidc/callback`` drive it.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import math
from collections.abc import Sequence
from urllib.parse import quote_plus, urlencode, urlsplit, urlunsplit

import jwt
import treq
from treq.client import HTTPClient
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.client import Agent
from zope.interface import implementer

from perc_daemons.interfaces import IAuthenticator
from perc_daemons.kmf.auth import (
    AuthenticationFailed,
    BackendUnavailable,
    IdToken,
    UnsupportedCredentials,
    make_identity,
)
from perc_daemons.protocol import jsontext

log = Logger()

MAX_JWKS_BYTES = 256 * 1024
MAX_TOKEN_CHARS = 16 * 1024
_FORBIDDEN_ALGORITHMS = {"none", "HS256", "HS384", "HS512"}


def _is_loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


class _TooLarge(Exception):
    pass


@implementer(IAuthenticator)
class OidcAuthenticator:
    """:class:`IdToken` credentials checked against an OpenID Connect provider."""

    name = "oidc"

    def __init__(
        self,
        issuer: str,
        audience: str,
        jwks_url: str,
        *,
        claim: str = "email",
        domain: str | None = None,
        algorithms: Sequence[str] = ("ES256", "RS256"),
        leeway: float = 30,
        require_email_verified: bool | None = None,
        jwks_ttl: float = 3600.0,
        refetch_interval: float = 60.0,
        timeout: float = 10.0,
        agent=None,
        reactor=None,
        clock=None,
    ) -> None:
        url = urlsplit(jwks_url)
        if url.scheme != "https" and not (url.scheme == "http" and _is_loopback(url.hostname)):
            raise ValueError("jwks_url must be https (plain http only on loopback)")
        bad = _FORBIDDEN_ALGORITHMS.intersection(algorithms)
        if bad or not algorithms:
            raise ValueError(f"algorithms must be asymmetric; refused: {sorted(bad)}")
        self.issuer, self.audience, self.jwks_url = issuer, audience, jwks_url
        self.claim = claim
        self.domain = domain.lower() if domain else None
        self.algorithms = tuple(algorithms)
        self.leeway = leeway
        self.require_email_verified = (claim == "email" if require_email_verified is None
                                       else require_email_verified)
        self.jwks_ttl, self.refetch_interval, self.timeout = jwks_ttl, refetch_interval, timeout
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self._clock = clock if clock is not None else reactor
        self._http = HTTPClient(agent if agent is not None else Agent(reactor))
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._fetched_at: float | None = None  # last successful fetch
        self._kid_refetch_at: float | None = None  # last refetch for an unknown kid
        self._waiters: list[defer.Deferred[None]] | None = None  # a fetch is running

    # -- JWKS ------------------------------------------------------------------

    async def _download(self) -> dict[str | None, jwt.PyJWK]:
        response = await self._http.get(self.jwks_url, headers={"Accept": ["application/json"]})
        chunks: list[bytes] = []
        size = 0

        def collect(data: bytes) -> None:
            nonlocal size
            size += len(data)
            if size > MAX_JWKS_BYTES:
                raise _TooLarge(f"JWKS larger than {MAX_JWKS_BYTES} bytes")
            chunks.append(data)

        await treq.collect(response, collect)  # read even an error body: frees the connection
        if response.code != 200:
            raise BackendUnavailable(f"oidc: JWKS fetch answered {response.code}")
        document = jsontext.loads(b"".join(chunks))
        keys: dict[str | None, jwt.PyJWK] = {}
        for jwk in document.get("keys", []):
            if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
                continue
            alg = jwk.get("alg")
            if alg is not None and alg not in self.algorithms:
                continue
            try:
                key = jwt.PyJWK(jwk)
            except (jwt.PyJWKError, jwt.InvalidKeyError, KeyError, ValueError, TypeError) as e:
                log.warn("oidc: ignoring JWK {kid}: {error}", kid=jwk.get("kid"), error=str(e))
                continue
            if key.algorithm_name not in self.algorithms:
                continue
            keys[jwk.get("kid")] = key
        if not keys:
            raise BackendUnavailable("oidc: JWKS has no usable keys")
        return keys

    async def _refresh(self) -> None:
        """Fetch the JWKS; concurrent callers share one fetch."""
        waiter: defer.Deferred[None] = defer.Deferred()
        if self._waiters is not None:
            self._waiters.append(waiter)
            return await waiter
        self._waiters = [waiter]
        error: BackendUnavailable | None = None
        try:
            d = defer.Deferred.fromCoroutine(self._download())
            d.addTimeout(self.timeout, self._reactor)
            self._keys = await d
            self._fetched_at = self._clock.seconds()
        except BackendUnavailable as e:
            error = e
        except Exception as e:
            error = BackendUnavailable(f"oidc: JWKS fetch failed: {e!r}")
        waiters, self._waiters = self._waiters, None
        for w in waiters:
            if error is None:
                w.callback(None)
            else:
                w.errback(error)
        await waiter

    async def _key(self, kid: str | None) -> jwt.PyJWK:
        now = self._clock.seconds()
        if self._fetched_at is None or now - self._fetched_at >= self.jwks_ttl:
            try:
                await self._refresh()
            except BackendUnavailable as e:
                if not self._keys:
                    raise
                log.warn("oidc: using cached JWKS: {reason}", reason=e.reason)
        key = self._lookup(kid)
        if key is None and (self._kid_refetch_at is None
                            or now - self._kid_refetch_at >= self.refetch_interval):
            self._kid_refetch_at = now
            try:
                await self._refresh()
            except BackendUnavailable as e:
                log.warn("oidc: JWKS refetch failed: {reason}", reason=e.reason)
            key = self._lookup(kid)
        if key is None:
            raise AuthenticationFailed(f"oidc: no key {kid!r} in the provider's JWKS")
        return key

    def _lookup(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None:
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)

    # -- IAuthenticator ------------------------------------------------------

    def authenticate(self, credentials: object) -> defer.Deferred[str]:
        if not isinstance(credentials, IdToken):
            return defer.fail(UnsupportedCredentials(type(credentials).__name__))
        return defer.Deferred.fromCoroutine(self._authenticate(credentials))

    async def _authenticate(self, credentials: IdToken) -> str:
        token = credentials.token
        if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
            raise AuthenticationFailed("oidc: malformed token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as e:
            raise AuthenticationFailed(f"oidc: malformed token: {e}") from None
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in self.algorithms:
            raise AuthenticationFailed(f"oidc: algorithm {alg!r} not allowed")
        if kid is not None and not isinstance(kid, str):
            raise AuthenticationFailed("oidc: malformed kid")
        key = await self._key(kid)
        if key.algorithm_name != alg:
            raise AuthenticationFailed(f"oidc: key {kid!r} is not for {alg}")
        try:
            claims = jwt.decode(
                token, key.key, algorithms=[alg], audience=self.audience, issuer=self.issuer,
                options={"require": ["iss", "aud", "exp", "iat"], "verify_exp": False,
                         "verify_nbf": False, "verify_iat": False},
            )
        except jwt.PyJWTError as e:
            raise AuthenticationFailed(f"oidc: {type(e).__name__}: {e}") from None
        self._check_times(claims)
        aud = claims["aud"]
        if isinstance(aud, list) and len(aud) > 1 and claims.get("azp") != self.audience:
            raise AuthenticationFailed("oidc: several audiences and azp is not ours")
        if "azp" in claims and claims["azp"] != self.audience:
            raise AuthenticationFailed("oidc: azp is not ours")
        if credentials.nonce is not None:
            nonce = claims.get("nonce")
            if not isinstance(nonce, str) or not hmac.compare_digest(
                    nonce.encode(), credentials.nonce.encode()):
                raise AuthenticationFailed("oidc: nonce mismatch")
        return self._identity(claims)

    def _check_times(self, claims: dict) -> None:
        now = self._clock.seconds()
        for name in ("exp", "iat", "nbf"):
            value = claims.get(name, 0)
            if (not isinstance(value, int | float) or isinstance(value, bool)
                    or not math.isfinite(value)):
                raise AuthenticationFailed(f"oidc: {name} is not a number")
        if claims["exp"] <= now - self.leeway:
            raise AuthenticationFailed("oidc: token expired")
        if claims["iat"] > now + self.leeway:
            raise AuthenticationFailed("oidc: token issued in the future")
        if "nbf" in claims and claims["nbf"] > now + self.leeway:
            raise AuthenticationFailed("oidc: token not yet valid")

    def _identity(self, claims: dict) -> str:
        value = claims.get(self.claim)
        if not isinstance(value, str) or not value:
            raise AuthenticationFailed(f"oidc: no {self.claim} claim")
        if self.require_email_verified and claims.get("email_verified") not in (True, "true"):
            raise AuthenticationFailed("oidc: email not verified")
        user, sep, domain = value.rpartition("@")
        if not sep:
            if self.domain is None:
                raise AuthenticationFailed(f"oidc: {self.claim} has no domain")
            user, domain = value, self.domain
        if not user or not domain:
            raise AuthenticationFailed(f"oidc: malformed {self.claim}")
        if self.domain is not None and domain.lower() != self.domain:
            raise AuthenticationFailed(f"oidc: {self.claim} outside {self.domain}")
        return make_identity(user, domain)



class TokenEndpointError(Exception):
    """The provider's token endpoint refused the code or could not be asked.

    ``transient`` is true for network failures, timeouts and 5xx answers.
    """

    def __init__(self, reason: str, *, transient: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient


MAX_TOKEN_RESPONSE_BYTES = 64 * 1024


class OidcLogin:
    """The relying-party side of the "oidc" back-end: sign-in at the upstream provider.

    The authorization code flow (OpenID Connect Core s3.1) with PKCE S256:
    :meth:`authorization_url` is where the browser is sent (``scope``,
    ``state``, ``nonce``, ``code_challenge``); :meth:`exchange` trades the
    returned code at ``token_endpoint`` (``client_secret_basic`` with the
    ``authenticator``'s audience as client id, RFC 6749 s2.3.1) for the ID
    token, which :meth:`authenticate` checks with the
    :class:`OidcAuthenticator` (signature, claims, nonce).  Endpoints must be
    https (plain http only on loopback hosts).
    """

    def __init__(self, authenticator: OidcAuthenticator, authorization_endpoint: str,
                 token_endpoint: str, client_secret: str, *, name: str = "OpenID Connect",
                 scope: str = "openid email", timeout: float = 10.0, agent=None,
                 reactor=None) -> None:
        for key, value in (("authorization_endpoint", authorization_endpoint),
                           ("token_endpoint", token_endpoint)):
            url = urlsplit(value)
            if not url.hostname or url.fragment or not (
                    url.scheme == "https" or (url.scheme == "http" and _is_loopback(url.hostname))):
                raise ValueError(f"{key} must be an https URL (plain http only on loopback)")
        if not client_secret:
            raise ValueError("client_secret is required")
        self.authenticator = authenticator
        self.client_id = authenticator.audience
        self.authorization_endpoint = authorization_endpoint
        self.token_endpoint = token_endpoint
        self._client_secret = client_secret
        self.name = name
        self.scope = scope
        self.timeout = timeout
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self._http = HTTPClient(agent if agent is not None else Agent(reactor))

    def authorization_url(self, redirect_uri: str, state: str, nonce: str,
                          code_challenge: str) -> str:
        params = urlencode([("response_type", "code"), ("client_id", self.client_id),
                            ("redirect_uri", redirect_uri), ("scope", self.scope),
                            ("state", state), ("nonce", nonce),
                            ("code_challenge", code_challenge),
                            ("code_challenge_method", "S256")])
        url = urlsplit(self.authorization_endpoint)
        query = f"{url.query}&{params}" if url.query else params
        return urlunsplit(url._replace(query=query))

    def exchange(self, code: str, redirect_uri: str, code_verifier: str) -> defer.Deferred[str]:
        """The ID token for ``code``, or fail with :class:`TokenEndpointError`."""
        d = defer.Deferred.fromCoroutine(self._exchange(code, redirect_uri, code_verifier))
        d.addTimeout(self.timeout, self._reactor)

        def failed(failure):
            if isinstance(failure.value, TokenEndpointError):
                return failure
            raise TokenEndpointError(f"token endpoint: {failure.value!r}", transient=True)

        return d.addErrback(failed)

    async def _exchange(self, code: str, redirect_uri: str, code_verifier: str) -> str:
        pair = f"{quote_plus(self.client_id)}:{quote_plus(self._client_secret)}".encode()
        body = urlencode([("grant_type", "authorization_code"), ("code", code),
                          ("redirect_uri", redirect_uri),
                          ("code_verifier", code_verifier)]).encode()
        response = await self._http.post(self.token_endpoint, data=body, headers={
            "Authorization": ["Basic " + base64.b64encode(pair).decode("ascii")],
            "Content-Type": ["application/x-www-form-urlencoded"],
            "Accept": ["application/json"]})
        chunks: list[bytes] = []
        size = 0

        def collect(data: bytes) -> None:
            nonlocal size
            size += len(data)
            if size > MAX_TOKEN_RESPONSE_BYTES:
                raise _TooLarge(f"token response larger than {MAX_TOKEN_RESPONSE_BYTES} bytes")
            chunks.append(data)

        try:
            await treq.collect(response, collect)
        except _TooLarge as e:
            raise TokenEndpointError(str(e)) from None
        try:
            document = jsontext.loads(b"".join(chunks))
        except jsontext.JsonError:
            document = None
        if response.code != 200:
            error = document.get("error") if isinstance(document, dict) else None
            raise TokenEndpointError(f"token endpoint answered {response.code} ({error})",
                                     transient=response.code >= 500)
        id_token = document.get("id_token") if isinstance(document, dict) else None
        if not isinstance(id_token, str) or not id_token:
            raise TokenEndpointError("token response without an id_token")
        return id_token

    def authenticate(self, id_token: str, nonce: str) -> defer.Deferred[str]:
        """The identity of ``id_token`` (which must carry ``nonce``)."""
        return self.authenticator.authenticate(IdToken(id_token, nonce=nonce))
