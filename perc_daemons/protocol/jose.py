"""The JOSE pieces perc-daemons uses: ES256 compact JWS and JWKS (RFC 7515-7518).

PyJWT does the signing and the signature check; this module pins what we
accept (ES256 only, a known kid, a given ``typ``, no ``crit``/``jku``/``jwk``
headers) and leaves time checks to callers with an explicit ``now`` (PyJWT
would read the wall clock).  Used by identity assertions, signed rosters and
the KMF's access tokens.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from perc_daemons.protocol import jsontext

#: Longest compact JWS accepted, in characters.
MAX_JWS_LENGTH = 16384


class InvalidJwks(ValueError):
    """A JWKS document that cannot be used (configuration or fetch error)."""


def b64url_encode(data: bytes) -> str:
    """Base64url without padding (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Strict base64url without padding; raises ValueError."""
    if not isinstance(text, str) or not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    if len(text) % 4 == 1:
        raise ValueError("bad base64url length")
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64url_encode(raw) != text:  # non-canonical trailing bits
        raise ValueError("non-canonical base64url")
    return raw



def strict_json_loads(text: str | bytes) -> Any:
    """:func:`jsontext.loads` refusing duplicate members too (RFC 7515 s5.2).

    Raises :class:`~perc_daemons.protocol.jsontext.JsonError` (a ValueError).
    """
    return jsontext.loads(text, unique_keys=True)


def public_jwk(public_key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    """The RFC 7518 §6.2 members of a P-256 public key: kty, crv, x, y."""
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1
    ):
        raise ValueError("ES256 needs a P-256 key")
    numbers = public_key.public_numbers()
    return {
        "crv": "P-256",
        "kty": "EC",
        "x": b64url_encode(numbers.x.to_bytes(32, "big")),
        "y": b64url_encode(numbers.y.to_bytes(32, "big")),
    }


def parse_jwks(jwks: Mapping[str, Any]) -> dict[str, ec.EllipticCurvePublicKey]:
    """``{kid: public key}`` of the ES256 signing keys of a JWKS document.

    Keys for other algorithms, curves or uses are skipped; an ES256 key that is
    ill-formed, private, lacks a kid or repeats one, or a JWKS without any
    ES256 key, raises :class:`InvalidJwks`.
    """
    if not isinstance(jwks, Mapping) or not isinstance(jwks.get("keys"), list):
        raise InvalidJwks('a JWKS is an object with a "keys" list')
    keys: dict[str, ec.EllipticCurvePublicKey] = {}
    for jwk in jwks["keys"]:
        if not isinstance(jwk, Mapping):
            raise InvalidJwks("a JWK is an object")
        if jwk.get("kty") != "EC" or jwk.get("alg", "ES256") != "ES256":
            continue
        if jwk.get("use", "sig") != "sig" or jwk.get("crv") != "P-256":
            continue
        kid = jwk.get("kid")
        if not isinstance(kid, str) or not kid:
            raise InvalidJwks("an ES256 JWK without a kid")
        if kid in keys:
            raise InvalidJwks(f"kid {kid!r} appears twice")
        if "d" in jwk:
            raise InvalidJwks(f"JWK {kid!r} holds a private key")
        try:
            x = b64url_decode(jwk.get("x"))
            y = b64url_decode(jwk.get("y"))
            if len(x) != 32 or len(y) != 32:
                raise ValueError("P-256 coordinates are 32 bytes")
            key = ec.EllipticCurvePublicNumbers(
                int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1()
            ).public_key()
        except ValueError as e:
            raise InvalidJwks(f"JWK {kid!r}: {e}") from None
        keys[kid] = key
    if not keys:
        raise InvalidJwks("the JWKS holds no ES256 signing key")
    return keys


def numeric_claim(payload: Mapping[str, Any], name: str) -> float:
    """A NumericDate claim as float; raises ``jwt.DecodeError`` if absent or not a number."""
    value = payload.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise jwt.DecodeError(f"claim {name!r} must be a number")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise jwt.DecodeError(f"claim {name!r} must be finite")
    return number


def decode_es256(
    token: Any,
    public_keys: Mapping[str, ec.EllipticCurvePublicKey],
    *,
    typ: str | tuple[str, ...],
    audience: str | None = None,
    issuer: str | None = None,
    required: Iterable[str] = (),
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(header, claims)`` of a compact JWS signed with ES256 by a key of ``public_keys``.

    PyJWT checks the signature, ``iss``, ``aud`` and the presence of
    ``required`` claims; times are left to the caller (PyJWT would read the
    wall clock).  Raises ``jwt.PyJWTError`` subclasses:
    InvalidAlgorithmError (alg not ES256), InvalidSignatureError (bad
    signature or unknown kid), InvalidAudienceError, InvalidIssuerError,
    and DecodeError / InvalidTokenError for anything malformed.
    """
    if isinstance(token, bytes):
        try:
            token = token.decode("ascii")
        except UnicodeDecodeError:
            raise jwt.DecodeError("token is not ASCII") from None
    if not isinstance(token, str) or len(token) > MAX_JWS_LENGTH:
        raise jwt.DecodeError("token must be a string of bounded length")
    header = jwt.get_unverified_header(token)
    if header.get("alg") != "ES256":
        raise jwt.InvalidAlgorithmError("only ES256 is accepted")
    typs = (typ,) if isinstance(typ, str) else typ
    if header.get("typ") not in typs:
        raise jwt.DecodeError("wrong typ header")
    if "crit" in header or "b64" in header or "jku" in header or "jwk" in header:
        raise jwt.DecodeError("unsupported JOSE header parameter")
    kid = header.get("kid")
    if not isinstance(kid, str) or kid not in public_keys:
        raise jwt.InvalidSignatureError("unknown kid")
    claims = jwt.decode(
        token,
        public_keys[kid],
        algorithms=["ES256"],
        audience=audience,
        issuer=issuer,
        options={
            "require": list(required),
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
        },
    )
    if not isinstance(claims, dict):
        raise jwt.DecodeError("claims must be a JSON object")
    return header, claims


def signing_key(keys: Any) -> tuple[str, ec.EllipticCurvePrivateKey]:
    """``(kid, private key)`` from a SigningKeys-like object or a tuple."""
    if isinstance(keys, tuple):
        kid, private_key = keys
    else:
        kid, private_key = keys.active.kid, keys.active.private_key
    if not isinstance(kid, str) or not isinstance(private_key, ec.EllipticCurvePrivateKey):
        raise TypeError("need (kid, EllipticCurvePrivateKey) or SigningKeys")
    return kid, private_key


def verification_keys(keys_or_jwks: Any, now: float) -> dict[str, ec.EllipticCurvePublicKey]:
    """``{kid: public key}`` from a JWKS document, or from an object with
    ``public_keys(now)`` (the KMF's SigningKeys).  Raises :class:`InvalidJwks`."""
    if isinstance(keys_or_jwks, Mapping):
        return parse_jwks(keys_or_jwks)
    return keys_or_jwks.public_keys(now)
