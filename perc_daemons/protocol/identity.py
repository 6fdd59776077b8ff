"""RFC 8827 identity assertions as compact JWS (ES256), sans-I/O.

What is here:

* :func:`format_fingerprints` / :func:`parse_fingerprint`: RFC 8122
  fingerprint values (upper-case hex pairs joined with colons);
* :func:`create_assertion`: what the IdP returns for
  ``POST /v1/identity/assertions``: the RFC 8827 §7.6 JSON text
  ``{"idp":{"domain":...,"protocol":...},"assertion":"<JWS>"}``;
* :func:`encode_sdp_identity` / :func:`decode_sdp_identity`: the base64
  value of the session-level SDP ``a=identity:`` attribute (§7.4.1);
* :class:`JwksIdentityVerifier`, the :class:`~perc_daemons.interfaces.IIdentityVerifier`
  used by the KD, checking an assertion against the IdP's JWKS;
* JOSE helpers shared with :mod:`perc_daemons.kmf.tokens` and
  :mod:`perc_daemons.kmf.roster`: :func:`public_jwk`, :func:`parse_jwks`,
  :func:`decode_es256`.

Project decisions (DESIGN.md "Identity assertions"): the opaque RFC 8827
assertion is a compact JWS, ES256 only, header ``typ`` ``perc-identity+jwt``
and the signing key's ``kid``.  Its claims are ``iss`` ``https://<idp
domain>``, ``sub`` the identity, ``aud`` (a conference id or ``kd``), ``iat``,
``exp``, ``jti`` and ``contents``: the RFC 8827 §7.4 fingerprint JSON string,
returned unchanged as the "contents" of the verification result would be in a
browser.  Third-party IdPs (RFC 8827 §8.1 rule 2) are not supported: the
identity's domain must equal the IdP domain.  An assertion issued in the
future beyond the leeway is refused as :class:`ExpiredAssertion` (outside its
validity period).

Nothing here reads a clock: every time is an explicit ``now`` in seconds.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import re
import secrets
from collections.abc import Iterable, Mapping
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from perc_daemons.protocol.errors import ProtocolError
from perc_daemons.protocol.jose import (
    b64url_encode,
    decode_es256,
    numeric_claim,
    parse_jwks,
    signing_key,
    strict_json_loads,
)

__all__ = [
    "IDENTITY_TYP",
    "MAX_ASSERTION_LENGTH",
    "BadSignature",
    "ExpiredAssertion",
    "FingerprintNotAsserted",
    "ForeignIdentity",
    "IdentityError",
    "JwksIdentityVerifier",
    "MalformedAssertion",
    "UntrustedIdp",
    "WrongAudience",
    "create_assertion",
    "decode_sdp_identity",
    "encode_sdp_identity",
    "format_fingerprints",
    "normalize_identity",
    "parse_fingerprint",
    "split_identity",
]

#: JWS ``typ`` header of an identity assertion.
IDENTITY_TYP = "perc-identity+jwt"
#: Longest assertion JSON text (and JWS) accepted, in characters.
MAX_ASSERTION_LENGTH = 16384

_SHA256_LENGTH = 32
_HEX_PAIRS = re.compile(r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2})*")
_PERCENT = re.compile(r"%(..)?")


# --- errors ---------------------------------------------------------------


class IdentityError(ProtocolError):
    """An identity assertion that must not be trusted."""

    reason = "identity_error"


class MalformedAssertion(IdentityError):
    """Not RFC 8827 JSON, not a compact JWS, or missing/ill-typed claims."""

    reason = "identity_malformed"


class UntrustedIdp(IdentityError):
    """``idp.domain`` is not a trusted IdP, or ``iss`` does not match it."""

    reason = "identity_untrusted_idp"


class BadSignature(IdentityError):
    """Signature invalid, algorithm not ES256, or ``kid`` not in the JWKS."""

    reason = "identity_bad_signature"


class ExpiredAssertion(IdentityError):
    """``exp`` has passed (or ``iat`` lies in the future) beyond the leeway."""

    reason = "identity_expired"


class WrongAudience(IdentityError):
    """``aud`` is not the audience the verifier is checking for."""

    reason = "identity_wrong_audience"


class ForeignIdentity(IdentityError):
    """The identity's domain is not the IdP's (RFC 8827 §8.1), or is ill-formed."""

    reason = "identity_foreign"


class FingerprintNotAsserted(IdentityError):
    """The DTLS certificate in use is not among the asserted sha-256 fingerprints."""

    reason = "identity_fingerprint_not_asserted"




# --- small codecs -----------------------------------------------------------






def format_fingerprints(digests: Iterable[bytes]) -> list[dict[str, str]]:
    """RFC 8122 ``sha-256`` fingerprint objects for RFC 8827 §7.4."""
    result = []
    for digest in digests:
        if not isinstance(digest, bytes) or len(digest) != _SHA256_LENGTH:
            raise ValueError("a sha-256 fingerprint is 32 bytes")
        result.append({"algorithm": "sha-256", "digest": digest.hex(":").upper()})
    return result


def parse_fingerprint(text: str) -> bytes:
    """Bytes of an RFC 8122 fingerprint ``AA:BB:...``; raises ValueError."""
    if not isinstance(text, str) or not _HEX_PAIRS.fullmatch(text):
        raise ValueError("not an RFC 8122 fingerprint")
    return bytes.fromhex(text.replace(":", ""))


def encode_sdp_identity(assertion_json: str) -> str:
    """The ``a=identity:`` value: base64 of the UTF-8 assertion JSON (§7.4.1)."""
    return base64.b64encode(assertion_json.encode("utf-8")).decode("ascii")


def decode_sdp_identity(value: str | bytes) -> str:
    """The assertion JSON text of an ``a=identity:`` value.

    Raises :class:`MalformedAssertion`; the JSON itself is not checked here.
    """
    if isinstance(value, str):
        try:
            value = value.encode("ascii")
        except UnicodeEncodeError:
            raise MalformedAssertion("a=identity is not base64") from None
    if not isinstance(value, bytes) or len(value) > MAX_ASSERTION_LENGTH * 4 // 3 + 4:
        raise MalformedAssertion("a=identity is not base64 or too long")
    try:
        text = base64.b64decode(value, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise MalformedAssertion("a=identity is not base64 of UTF-8 text") from None
    return text


def normalize_identity(identity: object) -> str:
    """The one form in which identities are stored, compared, signed and logged.

    An identity (RFC 8827 s8.1 ``user@domain``) is ASCII -- an
    internationalised domain in its A-label form (RFC 5890), ``%40``/``%25``
    escapes in the user part -- and its normal form is the whole string in
    ASCII lower case: ``Bob@Example.COM`` is ``bob@example.com``.  Both parts
    are folded: the domain is case-insensitive anyway (RFC 4343), and the
    KMF's login back-ends already treat user names so (file, LDAP, OIDC),
    so two identities differing only in case would be one person.
    Non-ASCII text raises ValueError rather than being folded by Unicode
    rules (which differ from what directories do, and admit confusables).
    Syntax is not checked here (:func:`split_identity`,
    ``perc_daemons.store.check_identity``); docs/API.md "Identities".
    """
    if not isinstance(identity, str) or not identity.isascii():
        raise ValueError(f"an identity is ASCII text (IDNA domains as xn--): {identity!r}")
    return identity.lower()


def split_identity(identity: str) -> tuple[str, str]:
    """``(user, domain)`` of an RFC 8827 §8.1 identity, user still percent-encoded.

    Raises ValueError when the string has no single unescaped '@', an empty
    part, or a percent-escape other than ``%40`` / ``%25``.
    """
    if not isinstance(identity, str) or identity.count("@") != 1:
        raise ValueError("an identity is user@domain with one unescaped '@'")
    user, domain = identity.split("@")
    if not user or not domain:
        raise ValueError("empty user or domain")
    for match in _PERCENT.finditer(user):
        if match.group(1) is None or match.group(1).upper() not in ("40", "25"):
            raise ValueError("only '@' and '%' may be percent-encoded in the user part")
    return user, domain


def _normalize_domain(domain: Any) -> str | None:
    """Domain for comparison (RFC 5890 label equivalence), or None if ill-formed."""
    if not isinstance(domain, str) or not domain or len(domain) > 253:
        return None
    if any(c in domain for c in "/\\@:% \t\r\n"):
        return None
    try:
        ascii_form = domain.encode("idna").decode("ascii")
    except UnicodeError:
        return None
    return ascii_form.lower().rstrip(".") or None


# --- JOSE helpers (ES256 only) ---------------------------------------------












# --- creating assertions (IdP side) ----------------------------------------


def create_assertion(
    keys: Any,
    *,
    idp_domain: str,
    protocol: str = "default",
    identity: str,
    fingerprints: list[bytes],
    audience: str,
    now: float,
    lifetime: int = 120,
) -> str:
    """The RFC 8827 §7.6 assertion JSON text binding ``identity`` to ``fingerprints``.

    ``keys`` is a :class:`~perc_daemons.kmf.signing.SigningKeys` (its active
    key signs) or a ``(kid, private_key)`` tuple.  ``identity`` must be in
    ``idp_domain`` (RFC 8827 §8.1) with '@' and '%' of the user part
    percent-encoded; it is asserted in its :func:`normalize_identity` form.
    Raises ValueError for arguments that would make an assertion no
    verifier accepts.
    """
    kid, private_key = signing_key(keys)
    identity = normalize_identity(identity)
    domain = _normalize_domain(idp_domain)
    if domain is None:
        raise ValueError(f"bad IdP domain {idp_domain!r}")
    _user, identity_domain = split_identity(identity)
    if _normalize_domain(identity_domain) != domain:
        raise ValueError("the identity must be in the IdP's domain")
    if not isinstance(protocol, str) or "/" in protocol or "\\" in protocol:
        raise ValueError("the IdP protocol may not contain '/' or '\\'")
    if not fingerprints:
        raise ValueError("at least one fingerprint is needed")
    if not isinstance(audience, str) or not audience:
        raise ValueError("audience must be a non-empty string")
    if lifetime <= 0:
        raise ValueError("lifetime must be positive")
    contents = json.dumps(
        {"fingerprint": format_fingerprints(fingerprints)}, separators=(",", ":")
    )
    issued_at = int(now)
    claims = {
        "iss": f"https://{idp_domain}",
        "sub": identity,
        "aud": audience,
        "iat": issued_at,
        "exp": issued_at + int(lifetime),
        "jti": b64url_encode(secrets.token_bytes(16)),
        "contents": contents,
    }
    token = jwt.encode(
        claims, private_key, algorithm="ES256", headers={"kid": kid, "typ": IDENTITY_TYP}
    )
    return json.dumps(
        {"idp": {"domain": idp_domain, "protocol": protocol or "default"}, "assertion": token},
        separators=(",", ":"),
    )


# --- verifying assertions (KD side) ----------------------------------------


class JwksIdentityVerifier:
    """Verifies RFC 8827 assertions of trusted IdP domains with the IdP's JWKS.

    ``trusted_domains`` are the IdP domains whose assertions are accepted;
    ``jwks`` is the JWKS document published at ``/.well-known/jwks.json``
    (replace it with :meth:`update_jwks` when the IdP rotates keys).
    ``leeway`` (seconds) absorbs clock skew on ``exp`` and ``iat``.
    """

    def __init__(
        self, trusted_domains: str | Iterable[str], jwks: Mapping[str, Any], *, leeway: float = 10
    ) -> None:
        if isinstance(trusted_domains, str):
            trusted_domains = [trusted_domains]
        normalized = set()
        for domain in trusted_domains:
            n = _normalize_domain(domain)
            if n is None:
                raise ValueError(f"bad IdP domain {domain!r}")
            normalized.add(n)
        if not normalized:
            raise ValueError("at least one trusted IdP domain is needed")
        self._trusted = frozenset(normalized)
        self._leeway = float(leeway)
        self._keys: dict[str, ec.EllipticCurvePublicKey] = {}
        self.update_jwks(jwks)

    def __repr__(self) -> str:
        return (
            f"<JwksIdentityVerifier domains={sorted(self._trusted)} kids={sorted(self._keys)}>"
        )

    def update_jwks(self, jwks: Mapping[str, Any]) -> None:
        """Replace the verification keys; raises :class:`InvalidJwks` (keeping the old ones)."""
        self._keys = parse_jwks(jwks)

    def verify(self, assertion: str | bytes, audience: str, fingerprint: bytes, now: float) -> str:
        """The identity asserted by ``assertion`` (RFC 8827 JSON text); see IIdentityVerifier."""
        idp_domain, token = self._parse_outer(assertion)
        try:
            _header, claims = decode_es256(
                token,
                self._keys,
                typ=IDENTITY_TYP,
                audience=audience,
                required=("iss", "sub", "aud", "iat", "exp", "contents"),
            )
            issued_at = numeric_claim(claims, "iat")
            expires_at = numeric_claim(claims, "exp")
        except (jwt.InvalidAlgorithmError, jwt.InvalidSignatureError) as e:
            raise BadSignature(str(e)) from None
        except jwt.InvalidAudienceError:
            raise WrongAudience(f"assertion is not for audience {audience!r}") from None
        except (jwt.PyJWTError, ValueError) as e:
            raise MalformedAssertion(f"bad assertion JWS: {e}") from None
        if claims["iss"] != f"https://{idp_domain}":
            raise UntrustedIdp("iss does not match idp.domain")
        if expires_at <= now - self._leeway:
            raise ExpiredAssertion("assertion has expired")
        if issued_at > now + self._leeway:
            raise ExpiredAssertion("assertion is not valid yet")
        try:
            identity = normalize_identity(claims["sub"])
            _user, identity_domain = split_identity(identity)
        except ValueError as e:
            raise ForeignIdentity(f"ill-formed identity: {e}") from None
        if _normalize_domain(identity_domain) != _normalize_domain(idp_domain):
            raise ForeignIdentity("identity is not in the IdP's domain")
        if not self._covers(claims["contents"], fingerprint):
            raise FingerprintNotAsserted("DTLS certificate is not among the asserted ones")
        return identity

    def _parse_outer(self, assertion: Any) -> tuple[str, str]:
        """``(idp domain, JWS)`` of the RFC 8827 JSON, checking the domain is trusted."""
        if isinstance(assertion, bytes):
            try:
                assertion = assertion.decode("utf-8")
            except UnicodeDecodeError:
                raise MalformedAssertion("assertion is not UTF-8") from None
        if not isinstance(assertion, str) or len(assertion) > MAX_ASSERTION_LENGTH:
            raise MalformedAssertion("assertion must be JSON text of bounded length")
        try:
            outer = strict_json_loads(assertion)
        except ValueError:
            raise MalformedAssertion("assertion is not JSON") from None
        if not isinstance(outer, dict):
            raise MalformedAssertion("assertion is not a JSON object")
        idp = outer.get("idp")
        token = outer.get("assertion")
        if not isinstance(idp, dict) or not isinstance(token, str):
            raise MalformedAssertion('assertion needs "idp" and "assertion" members')
        domain = idp.get("domain")
        protocol = idp.get("protocol", "default")
        if not isinstance(domain, str) or not isinstance(protocol, str):
            raise MalformedAssertion("idp.domain and idp.protocol must be strings")
        if "/" in protocol or "\\" in protocol:
            raise MalformedAssertion("idp.protocol may not contain '/' or '\\'")
        if _normalize_domain(domain) not in self._trusted:
            raise UntrustedIdp("idp.domain is not a trusted IdP")
        return domain, token

    @staticmethod
    def _covers(contents: Any, fingerprint: Any) -> bool:
        """Whether the fingerprint JSON ``contents`` lists the sha-256 ``fingerprint``."""
        if not isinstance(contents, str):
            raise MalformedAssertion("contents must be the fingerprint JSON string")
        try:
            parsed = strict_json_loads(contents)
        except ValueError:
            raise MalformedAssertion("contents is not JSON") from None
        entries = parsed.get("fingerprint") if isinstance(parsed, dict) else None
        if not isinstance(entries, list) or not entries:
            raise MalformedAssertion("contents has no fingerprint list")
        if not isinstance(fingerprint, bytes):
            raise FingerprintNotAsserted("no certificate fingerprint presented")
        found = False
        for entry in entries:
            if not isinstance(entry, dict):
                raise MalformedAssertion("a fingerprint entry is not an object")
            algorithm, digest = entry.get("algorithm"), entry.get("digest")
            if not isinstance(algorithm, str) or not isinstance(digest, str):
                raise MalformedAssertion("a fingerprint entry needs algorithm and digest")
            if algorithm.lower() != "sha-256":
                continue
            try:
                asserted = parse_fingerprint(digest)
            except ValueError:
                raise MalformedAssertion("a sha-256 digest is not RFC 8122 hex") from None
            if len(asserted) != _SHA256_LENGTH:
                raise MalformedAssertion("a sha-256 digest is not 32 bytes")
            # Constant time per entry, and every entry is compared.
            found |= hmac.compare_digest(asserted, fingerprint)
        return found
