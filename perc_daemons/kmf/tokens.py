"""OAuth 2.0 access tokens as JWTs (RFC 9068 profile, ES256), with certificate binding.

:func:`issue_access_token` signs a token with the active key of
:class:`~perc_daemons.kmf.signing.SigningKeys`; :func:`verify_access_token`
checks one against those keys or a published JWKS.  Header ``typ`` is
``at+jwt`` (``application/at+jwt`` is accepted too, RFC 9068 §4) with the
key's ``kid``; claims are ``iss``, ``sub``, ``aud``, ``exp``, ``iat``,
``jti`` (random, 128 bits), ``client_id``, ``scope`` (space-separated) and,
when the client proved possession of its DTLS certificate, ``cnf``
``{"x5t#S256": base64url(SHA-256(certificate DER))}`` (RFC 8705 §3.1): such a
token is refused with any other certificate, or with none.

Revocation (RFC 7009) is a list of revoked ``jti`` values kept by the KMF's
grant store until each token's ``exp``; :func:`unverified_jti` reads the
``jti`` of a token cheaply to look it up (the token is verified anyway).

PyJWT checks the signature (ES256 only: never ``none`` nor HS*), ``iss``,
``aud`` and required claims; ``exp``/``iat``/``nbf`` are checked here against
the explicit ``now`` (PyJWT would read the wall clock).  Replaying a bearer
token is allowed (RFC 6750).  Nothing here reads a clock.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt

from perc_daemons.kmf.signing import SigningKeys
from perc_daemons.protocol.jose import (
    InvalidJwks,
    b64url_decode,
    b64url_encode,
    decode_es256,
    numeric_claim,
    verification_keys,
)

__all__ = [
    "ACCESS_TOKEN_TYP",
    "AccessToken",
    "CertificateMismatch",
    "ExpiredToken",
    "InsufficientScope",
    "InvalidToken",
    "TokenError",
    "WrongAudience",
    "WrongIssuer",
    "certificate_thumbprint",
    "issue_access_token",
    "unverified_jti",
    "verify_access_token",
]

ACCESS_TOKEN_TYP = "at+jwt"
_ACCEPTED_TYPS = ("at+jwt", "application/at+jwt")
_REQUIRED = ("iss", "sub", "aud", "exp", "iat", "jti", "client_id")
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")  # RFC 6749 §3.3
_CNF_MEMBER = "x5t#S256"


class TokenError(Exception):
    """An access token that must be refused (maps to HTTP 401/403)."""


class InvalidToken(TokenError):
    """Malformed, bad signature, unknown kid, wrong typ, alg not ES256, not yet valid."""


class ExpiredToken(TokenError):
    """``exp`` has passed (beyond the leeway)."""


class WrongAudience(TokenError):
    """``aud`` does not name this resource server."""


class WrongIssuer(TokenError):
    """``iss`` is not the expected authorization server."""


class InsufficientScope(TokenError):
    """A required scope is missing (HTTP 403 ``insufficient_scope``)."""


class CertificateMismatch(TokenError):
    """The token is bound (``cnf``) to another certificate, or none was presented."""


@dataclass(frozen=True)
class AccessToken:
    """The verified content of an access token."""

    subject: str
    client_id: str
    scopes: frozenset[str]
    expires_at: float
    jti: str
    #: SHA-256 of the bound certificate's DER (``cnf``), or None for a plain bearer token.
    thumbprint: bytes | None = None


def certificate_thumbprint(certificate_der: bytes) -> bytes:
    """SHA-256 of a DER certificate: what ``cnf`` ``x5t#S256`` carries (base64url)."""
    return hashlib.sha256(certificate_der).digest()


def _check_scopes(scopes: Iterable[str]) -> list[str]:
    result: list[str] = []
    for scope in scopes:
        if not isinstance(scope, str) or not _SCOPE_TOKEN.fullmatch(scope):
            raise ValueError(f"bad scope token {scope!r}")
        if scope not in result:
            result.append(scope)
    return result


def issue_access_token(
    keys: SigningKeys,
    *,
    issuer: str,
    subject: str,
    audience: str | list[str],
    client_id: str,
    scopes: list[str],
    now: float,
    lifetime: int = 300,
    certificate_thumbprint: bytes | None = None,
    jti: str | None = None,
) -> str:
    """A signed RFC 9068 access token (compact JWS).

    ``certificate_thumbprint`` is the SHA-256 digest of the client's DTLS
    certificate (DER) whose possession it proved; the token then works only
    with that certificate.  ``lifetime`` may not exceed the keys'
    ``max_token_lifetime`` (a retired key must outlive its tokens).
    """
    active = keys.active
    max_lifetime = getattr(keys, "max_token_lifetime", None)
    if lifetime <= 0 or (max_lifetime is not None and lifetime > max_lifetime):
        raise ValueError(f"lifetime must be in (0, {max_lifetime}] seconds")
    for name, value in (("issuer", issuer), ("subject", subject), ("client_id", client_id)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string")
    if not audience or not isinstance(audience, str | list):
        raise ValueError("audience must be a non-empty string or list")
    issued_at = int(now)
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": subject,
        "aud": audience,
        "iat": issued_at,
        "exp": issued_at + int(lifetime),
        "jti": jti if jti is not None else b64url_encode(secrets.token_bytes(16)),
        "client_id": client_id,
        "scope": " ".join(_check_scopes(scopes)),
    }
    if certificate_thumbprint is not None:
        if not isinstance(certificate_thumbprint, bytes) or len(certificate_thumbprint) != 32:
            raise ValueError("certificate_thumbprint is a 32-byte SHA-256 digest")
        claims["cnf"] = {_CNF_MEMBER: b64url_encode(certificate_thumbprint)}
    return jwt.encode(
        claims,
        active.private_key,
        algorithm="ES256",
        headers={"kid": active.kid, "typ": ACCESS_TOKEN_TYP},
    )


def unverified_jti(token: str) -> str | None:
    """The ``jti`` claim of a compact JWS, without verifying it; None if it has none.

    Only for looking the token up on the revocation list: whatever it says
    matters only if the token then verifies.
    """
    if not isinstance(token, str) or len(token) > 8192 or token.count(".") != 2:
        return None
    try:
        claims = json.loads(b64url_decode(token.split(".")[1]))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    jti = claims.get("jti") if isinstance(claims, dict) else None
    return jti if isinstance(jti, str) and 0 < len(jti) <= 256 else None


def _bound_thumbprint(claims: Mapping[str, Any]) -> bytes | None:
    if "cnf" not in claims:
        return None
    cnf = claims["cnf"]
    if not isinstance(cnf, dict) or not isinstance(cnf.get(_CNF_MEMBER), str):
        raise InvalidToken("cnf must carry x5t#S256")
    try:
        thumbprint = b64url_decode(cnf[_CNF_MEMBER])
    except ValueError:
        raise InvalidToken("cnf x5t#S256 is not base64url") from None
    if len(thumbprint) != 32:
        raise InvalidToken("cnf x5t#S256 is not a SHA-256 digest")
    return thumbprint


def verify_access_token(
    token: str | bytes,
    jwks_or_keys: SigningKeys | Mapping[str, Any],
    *,
    issuer: str,
    audience: str,
    now: float,
    required_scopes: Iterable[str] = (),
    presented_certificate: bytes | None = None,
    leeway: float = 0,
    require_certificate_binding: bool = False,
) -> AccessToken:
    """The verified :class:`AccessToken`, or a :class:`TokenError` subclass.

    ``jwks_or_keys`` is the issuer's :class:`SigningKeys` or its JWKS document.
    ``presented_certificate`` is the DER of the client certificate of this
    connection (TLS or DTLS); a token with ``cnf`` needs it to match.  With
    ``require_certificate_binding`` a token without ``cnf`` is refused too.
    """
    try:
        public_keys = verification_keys(jwks_or_keys, now)
    except InvalidJwks as e:
        raise InvalidToken(f"unusable JWKS: {e}") from None
    try:
        _header, claims = decode_es256(
            token,
            public_keys,
            typ=_ACCEPTED_TYPS,
            audience=audience,
            issuer=issuer,
            required=_REQUIRED,
        )
        issued_at = numeric_claim(claims, "iat")
        expires_at = numeric_claim(claims, "exp")
        not_before = numeric_claim(claims, "nbf") if "nbf" in claims else None
    except jwt.InvalidAudienceError:
        raise WrongAudience(f"token is not for {audience!r}") from None
    except jwt.InvalidIssuerError:
        raise WrongIssuer("token is from another issuer") from None
    except (jwt.PyJWTError, ValueError) as e:
        raise InvalidToken(str(e)) from None
    for name in ("sub", "client_id", "jti"):
        if not isinstance(claims[name], str) or not claims[name]:
            raise InvalidToken(f"claim {name!r} must be a non-empty string")
    scope = claims.get("scope", "")
    if not isinstance(scope, str):
        raise InvalidToken("scope must be a string")
    thumbprint = _bound_thumbprint(claims)

    if expires_at <= now - leeway:
        raise ExpiredToken("token has expired")
    if issued_at > now + leeway or (not_before is not None and not_before > now + leeway):
        raise InvalidToken("token is not valid yet")

    scopes = frozenset(scope.split())
    missing = set(required_scopes) - scopes
    if missing:
        raise InsufficientScope(f"missing scope(s): {' '.join(sorted(missing))}")

    if thumbprint is not None:
        if presented_certificate is None:
            raise CertificateMismatch("token is bound to a certificate; none presented")
        if not hmac.compare_digest(certificate_thumbprint(presented_certificate), thumbprint):
            raise CertificateMismatch("token is bound to another certificate")
    elif require_certificate_binding:
        raise CertificateMismatch("a certificate-bound token is required")

    return AccessToken(
        subject=claims["sub"],
        client_id=claims["client_id"],
        scopes=scopes,
        expires_at=expires_at,
        jti=claims["jti"],
        thumbprint=thumbprint,
    )
