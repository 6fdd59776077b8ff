"""The OAuth 2.0 authorization server of the IdP/KMF: protocol logic, no HTTP.

:class:`AuthorizationServer` takes parsed request parameters and returns
results (a redirect URL, a token response dict, an introspection dict) or
fails with :class:`OAuthError`, which carries the RFC 6749 s5.2 ``error``
code, a description and the HTTP status the web layer should use.

Grants:

* ``authorization_code`` with PKCE (RFC 7636), ``S256`` only, for every
  client (OAuth 2.1): ``plain`` and a missing challenge are refused.  The
  code (256 random bits, one-time, ``code_lifetime`` seconds) is bound to the
  client, the redirect URI, the scopes, the user and the challenge.  Redirect
  URIs match registered ones exactly and are required in both requests.
* ``refresh_token``: rotated on every use (the store keeps a tombstone of the
  old one); presenting a rotated token again revokes its whole family (RFC
  9700 s4.14.2).  A refresh may narrow the scope of the access token, never
  widen it; the refresh token keeps its original scope (RFC 6749 s6).
* ``client_credentials``: confidential clients only; no refresh token.

Access tokens are RFC 9068 JWTs made by
:func:`~perc_daemons.kmf.tokens.issue_access_token`.  When the token request
came with a TLS client certificate (``client_certificate``, DER), the token
carries ``cnf`` ``x5t#S256`` of it (RFC 8705 s3.1); a refresh keeps the
binding of the original grant and is refused with another certificate.

Errors say little: every failure of a user login is :class:`LoginFailed`
("invalid credentials"), every bad code/verifier/redirect/refresh token is
``invalid_grant``.  Only SHA-256 hashes of codes and refresh tokens are stored.
Nothing here reads a clock: ``now`` is explicit.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import urllib.parse
from dataclasses import dataclass
from typing import Any

import jwt
from twisted.internet import defer
from twisted.logger import Logger

from perc_daemons.kmf.auth import (
    AuthenticationFailed,
    RateLimited,
    UnsupportedCredentials,
    UsernamePassword,
)
from perc_daemons.kmf.clients import (
    GRANT_TYPES,
    SCOPE_TOKEN,
    Client,
    ClientRateLimited,
    InvalidClient,
)
from perc_daemons.kmf.tokens import (
    CertificateMismatch,
    TokenError,
    certificate_thumbprint,
    issue_access_token,
    verify_access_token,
)
from perc_daemons.store.grant_errors import InvalidGrant, RefreshTokenReused, token_hash

__all__ = ["AuthorizationRequest", "AuthorizationServer", "ClientAuthRateLimited",
           "LoginFailed", "LoginRateLimited", "OAuthError"]

log = Logger()
#: Seconds between two log lines about rate-limited logins (the rest are counted).
RATE_LIMITED_LOG_INTERVAL = 60.0

_CHALLENGE = re.compile(r"[A-Za-z0-9_-]{43}")  # base64url of a SHA-256 digest, no padding
_VERIFIER = re.compile(r"[A-Za-z0-9._~-]{43,128}")  # RFC 7636 s4.1
_MAX_PARAM = 4096


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def add_query(uri: str, params: list[tuple[str, str]]) -> str:
    """``uri`` with ``params`` appended to its query (keeping the query it has)."""
    parts = urllib.parse.urlsplit(uri)
    extra = urllib.parse.urlencode(params)
    query = f"{parts.query}&{extra}" if parts.query else extra
    return urllib.parse.urlunsplit(parts._replace(query=query))


class OAuthError(Exception):
    """An RFC 6749 error response.

    ``error`` is the code (``invalid_request``, ``invalid_client``,
    ``invalid_grant``, ``unauthorized_client``, ``unsupported_grant_type``,
    ``invalid_scope``, ``unsupported_response_type``, ``access_denied``...),
    ``status`` the HTTP status.  For /authorize, ``redirect_uri`` is set when
    the error must be sent back to the client (:meth:`redirect_url`); when it
    is None the client or redirect URI could not be trusted and the error is
    shown to the user instead (RFC 6749 s4.1.2.1).
    """

    def __init__(self, error: str, description: str = "", status: int = 400, *,
                 redirect_uri: str | None = None, state: str | None = None,
                 issuer: str | None = None) -> None:
        super().__init__(f"{error}: {description}" if description else error)
        self.error = error
        self.description = description
        self.status = status
        self.redirect_uri = redirect_uri
        self.state = state
        self.issuer = issuer

    def response(self) -> dict[str, str]:
        """The JSON body of the error response (RFC 6749 s5.2)."""
        body = {"error": self.error}
        if self.description:
            body["error_description"] = self.description
        return body

    def redirect_url(self) -> str | None:
        """Where to send the user agent with the error, or None."""
        if self.redirect_uri is None:
            return None
        params = list(self.response().items())
        if self.state is not None:
            params.append(("state", self.state))
        if self.issuer is not None:
            params.append(("iss", self.issuer))  # RFC 9207
        return add_query(self.redirect_uri, params)


class LoginFailed(OAuthError):
    """The user's credentials were refused: show the login page again.

    Always "invalid credentials", whatever the cause (unknown user, wrong
    password, disabled account, back-end down).
    """

    def __init__(self) -> None:
        super().__init__("access_denied", "invalid credentials", 401)


class ClientAuthRateLimited(OAuthError):
    """Too many failed client authentications for this client id or address (429).

    ``error`` is ``invalid_client``: the client was not authenticated.
    """

    def __init__(self, retry_after: float) -> None:
        super().__init__("invalid_client", "too many failed client authentications; "
                         "try again later", 429)
        self.retry_after = retry_after


class LoginRateLimited(OAuthError):
    """Too many failed logins for this user or address; ``retry_after`` seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("access_denied", "too many failed logins; try again later", 429)
        self.retry_after = retry_after


def _invalid_grant(description: str = "invalid or expired grant") -> OAuthError:
    return OAuthError("invalid_grant", description)


def _param(params: dict[str, Any], name: str, required: bool = True) -> str | None:
    value = params.get(name)
    if value is None or value == "":
        if required:
            raise OAuthError("invalid_request", f"missing {name}")
        return None
    if not isinstance(value, str) or len(value) > _MAX_PARAM:
        raise OAuthError("invalid_request", f"bad {name}")
    return value


@dataclass
class AuthorizationRequest:
    """A validated authorization request, waiting for the user to be authenticated."""

    client: Client
    redirect_uri: str
    scopes: list[str]
    state: str | None
    code_challenge: str
    issuer: str

    def refuse(self, error: str, description: str) -> OAuthError:
        """An error to send back to the client's (validated) redirect URI."""
        return OAuthError(error, description, 302, redirect_uri=self.redirect_uri,
                          state=self.state, issuer=self.issuer)


class AuthorizationServer:
    """Authorization code + PKCE, refresh tokens, client credentials, revocation, introspection.

    ``clients`` is a :class:`~perc_daemons.kmf.clients.ClientRegistry`,
    ``grants`` an :class:`~perc_daemons.interfaces.IGrantStore`,
    ``signing_keys`` the :class:`~perc_daemons.kmf.signing.SigningKeys`,
    ``authenticator`` an :class:`~perc_daemons.interfaces.IAuthenticator`
    (usually an AuthenticatorChain) and ``rate_limiter`` a
    :class:`~perc_daemons.kmf.auth.LoginRateLimiter`.  ``audience`` is the
    ``aud`` of access tokens (the resource servers' name).  Every method
    returns a Deferred.
    """

    def __init__(self, clients: Any, grants: Any, signing_keys: Any, authenticator: Any,
                 rate_limiter: Any, *, issuer: str, audience: str | list[str] = "kmf",
                 access_token_lifetime: int = 300, refresh_token_lifetime: int = 86400,
                 code_lifetime: int = 60, random: Any = secrets) -> None:
        if not issuer:
            raise ValueError("issuer is required")
        for name, value in (("access_token_lifetime", access_token_lifetime),
                            ("refresh_token_lifetime", refresh_token_lifetime),
                            ("code_lifetime", code_lifetime)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive number of seconds")
        max_lifetime = getattr(signing_keys, "max_token_lifetime", None)
        if max_lifetime is not None and access_token_lifetime > max_lifetime:
            raise ValueError("access_token_lifetime exceeds the signing keys' max_token_lifetime")
        self.clients = clients
        self.grants = grants
        self.keys = signing_keys
        self.authenticator = authenticator
        self.rate_limiter = rate_limiter
        self.issuer = issuer
        self.audience = audience
        self.access_token_lifetime = access_token_lifetime
        self.refresh_token_lifetime = refresh_token_lifetime
        self.code_lifetime = code_lifetime
        self._random = random
        self._limited_logged_at = float("-inf")
        self._limited_suppressed = 0

    def _secret(self) -> str:
        return self._random.token_urlsafe(32)

    # -- scopes

    @staticmethod
    def _requested_scopes(scope: object, default: list[str]) -> list[str] | None:
        """The sorted scopes asked for, ``default`` when none; None when malformed."""
        if scope is None or scope == "":
            return sorted(set(default))
        if not isinstance(scope, str) or len(scope) > _MAX_PARAM:
            return None
        tokens = scope.split(" ")
        if not all(SCOPE_TOKEN.fullmatch(t) for t in tokens):
            return None
        return sorted(set(tokens))

    # -- /authorize

    def authorize(self, client_id: object, redirect_uri: object, response_type: object,
                  scope: object, state: object, code_challenge: object,
                  code_challenge_method: object, username: object, password: object,
                  source_address: str | None, now: float) -> defer.Deferred[str]:
        """Authenticate the user and return the client's redirect URL with ``code`` and ``state``.

        Fails with :class:`OAuthError` (``redirect_uri`` None for an unknown
        client or unregistered redirect URI, set otherwise), :class:`LoginFailed`
        or :class:`LoginRateLimited` (show the login page again).
        """
        return defer.Deferred.fromCoroutine(self._authorize(
            client_id, redirect_uri, response_type, scope, state, code_challenge,
            code_challenge_method, username, password, source_address, now))

    def check_request(self, client_id: object, redirect_uri: object, response_type: object,
                      scope: object, state: object, code_challenge: object,
                      code_challenge_method: object) -> AuthorizationRequest:
        """The validated authorization request (RFC 6749 s4.1.1 with PKCE), or OAuthError.

        The error's ``redirect_uri`` is None for an unknown client or
        unregistered redirect URI (show it to the user), set otherwise.
        """
        client: Client | None = self.clients.get(client_id)
        if client is None:
            raise OAuthError("invalid_request", "unknown client_id")
        if not isinstance(redirect_uri, str) or redirect_uri not in client.redirect_uris:
            raise OAuthError("invalid_request", "redirect_uri is not registered for this client")
        good_state = state if isinstance(state, str) and 0 < len(state) <= 1024 else None
        request = AuthorizationRequest(client, redirect_uri, [], good_state, "", self.issuer)
        refuse = request.refuse
        if state is not None and good_state is None:
            raise refuse("invalid_request", "bad state")
        if response_type != "code":
            raise refuse("unsupported_response_type", "only response_type=code is supported")
        if "authorization_code" not in client.grant_types:
            raise refuse("unauthorized_client", "client may not use authorization_code")
        scopes = self._requested_scopes(scope, sorted(client.scopes))
        if scopes is None or not set(scopes) <= client.scopes:
            raise refuse("invalid_scope", "scope not allowed for this client")
        if code_challenge is None or code_challenge == "":
            raise refuse("invalid_request", "PKCE code_challenge is required")
        if code_challenge_method != "S256":
            raise refuse("invalid_request", "code_challenge_method must be S256")
        if not isinstance(code_challenge, str) or not _CHALLENGE.fullmatch(code_challenge):
            raise refuse("invalid_request", "code_challenge must be a base64url SHA-256 digest")
        request.scopes, request.code_challenge = scopes, code_challenge
        return request

    async def _authorize(self, client_id: object, redirect_uri: object, response_type: object,
                         scope: object, state: object, code_challenge: object,
                         code_challenge_method: object, username: object, password: object,
                         source_address: str | None, now: float) -> str:
        request = self.check_request(client_id, redirect_uri, response_type, scope, state,
                                     code_challenge, code_challenge_method)
        subject = await self._login(username, password, source_address, now)
        return await self._issue_code(request, subject, now)

    def complete(self, request: AuthorizationRequest, subject: str,
                 now: float) -> defer.Deferred[str]:
        """Finish ``request`` (from :meth:`check_request`) for a user authenticated elsewhere.

        ``subject`` is the identity an external login (the upstream OpenID
        Connect provider) established.  Returns the client's redirect URL with
        ``code``, ``state`` and ``iss``, exactly as a password login does.
        """
        return defer.Deferred.fromCoroutine(self._issue_code(request, subject, now))

    async def _issue_code(self, request: AuthorizationRequest, subject: str, now: float) -> str:
        code = self._secret()
        grant = {"client_id": request.client.client_id, "redirect_uri": request.redirect_uri,
                 "scope": request.scopes, "sub": subject, "challenge": request.code_challenge,
                 "auth_time": now}
        await self.grants.save_code(token_hash(code), grant, now + self.code_lifetime)
        params = [("code", code)]
        if request.state is not None:
            params.append(("state", request.state))
        params.append(("iss", self.issuer))
        return add_query(request.redirect_uri, params)

    async def _login(self, username: object, password: object, address: str | None,
                     now: float) -> str:
        if not isinstance(username, str) or not isinstance(password, str) or not username:
            raise LoginFailed()
        user = "".join(c if c.isprintable() else "?" for c in username[:64])
        try:  # counted before it is evaluated: concurrent guesses count too
            self.rate_limiter.attempt(username, address, now)
        except RateLimited as e:
            if now - self._limited_logged_at >= RATE_LIMITED_LOG_INTERVAL:
                log.warn("login refused for {user} from {address}: too many failed logins "
                         "({suppressed} more such refusals not logged)", user=user,
                         address=address or "-", reason="rate_limited",
                         suppressed=self._limited_suppressed)
                self._limited_logged_at, self._limited_suppressed = now, 0
            else:
                self._limited_suppressed += 1
            raise LoginRateLimited(e.retry_after) from None
        try:
            identity = await defer.maybeDeferred(
                self.authenticator.authenticate, UsernamePassword(username, password))
        except (AuthenticationFailed, UnsupportedCredentials) as e:
            # A security event (fail2ban and the like match it): at most user_limit
            # per user and address_limit per address in a window, the limiter's.
            log.warn("login refused for {user} from {address}: {reason}", user=user,
                     address=address or "-",
                     reason=getattr(e, "reason", type(e).__name__))
            raise LoginFailed() from None
        self.rate_limiter.record_success(username, address, now)
        return identity

    # -- client authentication

    async def _client(self, client_id: object, client_auth: tuple[str, str] | None,
                      address: str | None = None) -> Client:
        if client_auth is not None:
            cid, secret = client_auth
            if client_id is not None and client_id != cid:
                raise OAuthError("invalid_request", "client_id differs from the authenticated one")
            try:
                return await self.clients.authenticate(cid, secret, address)
            except ClientRateLimited as e:
                raise ClientAuthRateLimited(e.retry_after) from None
            except InvalidClient:
                raise OAuthError("invalid_client", "client authentication failed", 401) from None
        client = self.clients.get(client_id)
        if client is None or client.confidential:
            raise OAuthError("invalid_client", "client authentication failed", 401)
        return client

    # -- /token

    def token(self, grant_type: object, params: dict[str, Any],
              client_auth: tuple[str, str] | None, client_certificate: bytes | None,
              now: float, *, source_address: str | None = None
              ) -> defer.Deferred[dict[str, Any]]:
        """The token response (RFC 6749 s5.1) for ``grant_type``, or fail with OAuthError.

        ``params`` are the other form parameters; ``client_auth`` the HTTP
        Basic credentials of a confidential client (public clients send
        ``client_id`` in ``params``); ``client_certificate`` the DER of the
        TLS client certificate of the request, if any; ``source_address`` the
        request's, for the limit on failed client authentications
        (:class:`ClientAuthRateLimited`, 429).
        """
        return defer.Deferred.fromCoroutine(
            self._token(grant_type, params, client_auth, client_certificate, now,
                        source_address))

    async def _token(self, grant_type: object, params: dict[str, Any],
                     client_auth: tuple[str, str] | None, client_certificate: bytes | None,
                     now: float, source_address: str | None) -> dict[str, Any]:
        client = await self._client(_param(params, "client_id", required=False), client_auth,
                                    source_address)
        if grant_type not in GRANT_TYPES:
            raise OAuthError("unsupported_grant_type", "unsupported grant_type")
        if grant_type not in client.grant_types:
            raise OAuthError("unauthorized_client", f"client may not use {grant_type}")
        thumbprint = (certificate_thumbprint(client_certificate)
                      if client_certificate is not None else None)
        if grant_type == "authorization_code":
            return await self._authorization_code(client, params, thumbprint, now)
        if grant_type == "refresh_token":
            return await self._refresh(client, params, thumbprint, now)
        return await self._client_credentials(client, params, thumbprint, now)

    def _access(self, client: Client, subject: str, scopes: list[str],
                thumbprint: bytes | None, now: float) -> dict[str, Any]:
        token = issue_access_token(
            self.keys, issuer=self.issuer, subject=subject, audience=self.audience,
            client_id=client.client_id, scopes=scopes, now=now,
            lifetime=self.access_token_lifetime, certificate_thumbprint=thumbprint)
        return {"access_token": token, "token_type": "Bearer",
                "expires_in": self.access_token_lifetime, "scope": " ".join(scopes)}

    def _refresh_grant(self, client: Client, family: str, subject: str, scopes: list[str],
                       thumbprint: bytes | None, auth_time: float, now: float
                       ) -> tuple[str, dict[str, Any], float]:
        expires_at = now + self.refresh_token_lifetime
        grant = {"family": family, "client_id": client.client_id, "sub": subject,
                 "scope": scopes, "cnf": None if thumbprint is None else _b64url(thumbprint),
                 "auth_time": auth_time, "exp": expires_at}
        return self._secret(), grant, expires_at

    async def _authorization_code(self, client: Client, params: dict[str, Any],
                                  thumbprint: bytes | None, now: float) -> dict[str, Any]:
        code = _param(params, "code")
        verifier = _param(params, "code_verifier")
        redirect_uri = _param(params, "redirect_uri")
        assert code is not None and verifier is not None
        grant = await self.grants.take_code(token_hash(code), now)  # one-time, even on failure
        if grant is None:
            raise _invalid_grant("authorization code unknown, used or expired")
        if grant.get("client_id") != client.client_id or grant.get("redirect_uri") != redirect_uri:
            raise _invalid_grant()
        computed = _b64url(hashlib.sha256(verifier.encode("ascii", "replace")).digest())
        if not _VERIFIER.fullmatch(verifier) or not hmac.compare_digest(
                computed.encode(), str(grant.get("challenge", "")).encode()):
            raise _invalid_grant("PKCE verification failed")
        scopes = list(grant["scope"])
        response = self._access(client, grant["sub"], scopes, thumbprint, now)
        if "refresh_token" in client.grant_types:
            token, rgrant, expires_at = self._refresh_grant(
                client, _b64url(self._random.token_bytes(16)), grant["sub"], scopes,
                thumbprint, grant.get("auth_time", now), now)
            await self.grants.save_refresh_token(token_hash(token), rgrant, expires_at)
            response["refresh_token"] = token
        return response

    async def _refresh(self, client: Client, params: dict[str, Any],
                       thumbprint: bytes | None, now: float) -> dict[str, Any]:
        token = _param(params, "refresh_token")
        assert token is not None
        old_hash = token_hash(token)
        current = await self.grants.refresh_token(old_hash, now)
        if current is None:
            # unknown, expired, revoked, or already rotated: rotating tells which,
            # and revokes the family on reuse
            try:
                await self.grants.rotate_refresh_token(
                    old_hash, token_hash(self._secret()), {"family": "-"}, now + 1, now)
            except RefreshTokenReused:
                log.warn("refresh token reused by {client}: family revoked",
                         client=client.client_id)
            except InvalidGrant:
                pass
            raise _invalid_grant()
        if current.get("client_id") != client.client_id:
            raise _invalid_grant()
        bound = _unb64url(current["cnf"]) if current.get("cnf") else None
        if bound is not None and thumbprint is not None and not hmac.compare_digest(
                bound, thumbprint):
            raise _invalid_grant("refresh token is bound to another certificate")
        granted = list(current["scope"])
        scopes = self._requested_scopes(params.get("scope"), granted)
        if scopes is None or not set(scopes) <= set(granted) or not set(scopes) <= client.scopes:
            raise OAuthError("invalid_scope", "scope exceeds the original grant")
        binding = bound if bound is not None else thumbprint
        new_token, new_grant, expires_at = self._refresh_grant(
            client, current["family"], current["sub"], granted, binding,
            current.get("auth_time", now), now)
        try:
            await self.grants.rotate_refresh_token(old_hash, token_hash(new_token), new_grant,
                                                   expires_at, now)
        except RefreshTokenReused:
            log.warn("refresh token reused by {client}: family revoked", client=client.client_id)
            raise _invalid_grant() from None
        except InvalidGrant:
            raise _invalid_grant() from None
        response = self._access(client, current["sub"], scopes, binding, now)
        response["refresh_token"] = new_token
        return response

    async def _client_credentials(self, client: Client, params: dict[str, Any],
                                  thumbprint: bytes | None, now: float) -> dict[str, Any]:
        if not client.confidential:
            raise OAuthError("unauthorized_client", "only confidential clients may do that")
        scopes = self._requested_scopes(params.get("scope"), sorted(client.scopes))
        if scopes is None or not set(scopes) <= client.scopes:
            raise OAuthError("invalid_scope", "scope not allowed for this client")
        return self._access(client, client.client_id, scopes, thumbprint, now)

    # -- /revoke (RFC 7009)

    def revoke(self, token: object, token_type_hint: object,
               client_auth: tuple[str, str] | None, now: float, *,
               client_id: str | None = None,
               source_address: str | None = None) -> defer.Deferred[None]:
        """Revoke a refresh token (and its whole family) or an access token; fires None (200).

        Public clients identify themselves with ``client_id``, confidential ones
        with ``client_auth``.  Unknown, expired, already revoked tokens and
        tokens of other clients are ignored (200, RFC 7009 s2.2).  An access
        token (a JWT that verifies) goes on the grant store's revocation list,
        keyed by its ``jti``, until its ``exp``: every resource of every KMF
        sharing the store then refuses it (:meth:`access_token_revoked`) and
        introspection calls it inactive.  Access tokens already issued from a
        revoked refresh token are not revoked with it (revoke them too).
        ``token_type_hint`` is only a hint and unknown values are ignored.
        """
        return defer.Deferred.fromCoroutine(
            self._revoke(token, token_type_hint, client_auth, now, client_id, source_address))

    async def _revoke(self, token: object, token_type_hint: object,
                      client_auth: tuple[str, str] | None, now: float,
                      client_id: str | None, source_address: str | None) -> None:
        client = await self._client(client_id, client_auth, source_address)
        if not isinstance(token, str) or not token or len(token) > _MAX_PARAM:
            raise OAuthError("invalid_request", "missing token")
        if token.count(".") == 2:
            claims = self._verified_claims(token, now)
            if claims is not None and claims.get("client_id") == client.client_id:
                await self.grants.revoke_access_token(token_hash(claims["jti"]),
                                                      claims["exp"], now)
                log.info("access token of {client} revoked", client=client.client_id)
            return None
        h = token_hash(token)
        grant = await self.grants.refresh_token(h, now)
        if grant is not None and grant.get("client_id") == client.client_id:
            await self.grants.revoke_refresh_token(h)
        return None

    # -- /introspect (RFC 7662)

    def introspect(self, token: object, client_auth: tuple[str, str] | None,
                   now: float, *, source_address: str | None = None
                   ) -> defer.Deferred[dict[str, Any]]:
        """RFC 7662 s2.2 response; only authenticated confidential clients may ask.

        Anything invalid, expired or revoked is ``{"active": false}``.  Access
        tokens are verified with the signing keys and looked up on the
        revocation list (a certificate-bound token is
        active: the caller checks the binding, ``cnf`` is returned); refresh
        tokens are active only when asked about by the client they belong to.
        """
        return defer.Deferred.fromCoroutine(
            self._introspect(token, client_auth, now, source_address))

    async def _introspect(self, token: object, client_auth: tuple[str, str] | None,
                          now: float, source_address: str | None) -> dict[str, Any]:
        if client_auth is None:
            raise OAuthError("invalid_client", "client authentication required", 401)
        client = await self._client(None, client_auth, source_address)
        inactive: dict[str, Any] = {"active": False}
        if not isinstance(token, str) or not token or len(token) > _MAX_PARAM:
            return inactive
        if token.count(".") == 2:
            claims = self._verified_claims(token, now)
            if claims is None or await self.grants.access_token_revoked(
                    token_hash(claims["jti"]), now):
                return inactive
            result = {"active": True, "token_type": "Bearer"}
            for name in ("scope", "client_id", "sub", "exp", "iat", "iss", "aud", "jti", "cnf"):
                if name in claims:
                    result[name] = claims[name]
            return result
        grant = await self.grants.refresh_token(token_hash(token), now)
        if grant is None or grant.get("client_id") != client.client_id:
            return inactive
        result = {"active": True, "token_type": "refresh_token", "client_id": grant["client_id"],
                  "sub": grant["sub"], "scope": " ".join(grant["scope"])}
        if grant.get("exp") is not None:
            result["exp"] = int(grant["exp"])
        return result

    def first_use(self, label: str, value: str, expires_at: float,
                  now: float) -> defer.Deferred[bool]:
        """Whether this is the first use of the one-time ``value`` (a login form's nonce, an
        OpenID Connect state) at any KMF sharing the grant store; kept until ``expires_at``."""
        return self.grants.use_once(token_hash(f"{label}\0{value}"), expires_at, now)

    def access_token_revoked(self, jti: str, now: float) -> defer.Deferred[bool]:
        """Whether the access token with this ``jti`` was revoked (one store look-up)."""
        return self.grants.access_token_revoked(token_hash(jti), now)

    def _verified_claims(self, token: str, now: float) -> dict[str, Any] | None:
        """The claims of an access token of ours that verifies (binding not checked), or None."""
        try:
            verify_access_token(token, self.keys, issuer=self.issuer,
                                audience=self._one_audience(), now=now)
        except CertificateMismatch:
            pass  # raised last: everything else was verified
        except TokenError:
            return None
        return jwt.decode(token, options={"verify_signature": False})

    def _one_audience(self) -> str:
        return self.audience if isinstance(self.audience, str) else self.audience[0]
