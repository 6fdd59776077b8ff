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
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import math
from collections.abc import Sequence
from urllib.parse import urlsplit

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
        document = json.loads(b"".join(chunks))
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

