"""Signed SDP answers: the KD vouches for the answer the MD hands an endpoint, sans-I/O.

In PERC the endpoint runs DTLS-SRTP end to end with the Key Distributor
through the Media Distributor (RFC 8871 section 6; RFC 9185 tunnels it), so
the SDP answer the endpoint receives from the MD must carry the *KD's*
certificate fingerprint and ``a=tls-id``.  An MD that could rewrite the answer
could put its own fingerprint there and play KD (RFC 8871 section 8: the MD is
not trusted with keys).  draft-roach-perc-webrtc (DESIGN.md, join flow steps
4 and 5) has the KD sign the answer it agreed to; the endpoint checks that
signature against its enterprise CA and the configured KD name before it
trusts the fingerprint.

Format (project decision; contracts "Signed answer"): the signed answer is the
unsigned answer SDP with one extra session-level attribute, appended after
the other session-level attributes::

    a=perc-answer-signature:<compact JWS>

The JWS (RFC 7515 compact serialization) is ES256 only, with the protected
header ``{"alg": "ES256", "typ": "perc-answer+jwt", "x5c": [...]}`` where
``x5c`` (RFC 7515 section 4.1.6) is the KD's certificate chain, leaf first,
each entry *standard* base64 (not base64url) of the DER certificate, 1 to 4
entries.  Its claims::

    {"aid": "<association id, canonical UUID string>", "cid": "<conference id>",
     "sub": "<the endpoint's verified identity>",
     "offer": b64url(sha256(offer text as UTF-8, exactly as the endpoint sent it)),
     "answer": b64url(sha256(the answer SDP without the signature attribute,
                             serialized with CRLF line ends)),
     "iat": <seconds>, "exp": <seconds>}

:func:`verify_signed_answer` checks, in this order (first failure wins):

1. the SDP parses and carries exactly one session-level
   ``a=perc-answer-signature`` (none at media level):
   :class:`MalformedSignedAnswer`;
2. the JWS structure and header: ``typ``, ``alg`` (anything but ES256 is
   :class:`BadAnswerSignature`), no ``crit``/``b64``/``jku``/``jwk``/``x5u``,
   ``x5c`` with 1-4 parseable certificates: :class:`MalformedSignedAnswer`;
3. the leaf is an EC P-256 certificate that chains to ``trust_roots`` for one
   of ``kd_names`` (cryptography's RFC 5280 server verifier at time ``now``:
   validity, basic constraints, key usage, EKU serverAuth, SAN dNSName):
   :class:`UntrustedKd`;
4. the signature by the leaf's key: :class:`BadAnswerSignature`;
5. the claims are present and well-typed (:class:`MalformedSignedAnswer`);
   ``exp`` not passed and ``iat`` not in the future, with a leeway
   (:data:`LEEWAY`): :class:`ExpiredAnswer`;
6. the ``answer`` and ``offer`` hashes: :class:`AnswerMismatch`;
7. every accepted m= section (port not 0) has exactly one ``a=fingerprint``
   (media level, else session level), sha-256, equal to sha256(leaf DER);
   the accepted sections all carry one and the same ``a=tls-id`` (RFC 8842);
   there is at least one accepted section: :class:`AnswerMismatch`.

Nothing here reads a clock or does I/O: ``now`` (seconds since the epoch) is
a parameter.  Private keys never appear in a repr or an error message.
"""

from __future__ import annotations

import binascii
import datetime
import hashlib
import hmac
import math
import re
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from perc_daemons.protocol import sdp
from perc_daemons.protocol.errors import ProtocolError
from perc_daemons.protocol.jose import (
    MAX_JWS_LENGTH,
    b64url_decode,
    b64url_encode,
    strict_json_loads,
)
from perc_daemons.protocol.sdp import SessionDescription

__all__ = [
    "ANSWER_TYP",
    "LEEWAY",
    "MAX_CHAIN_LENGTH",
    "SIGNATURE_ATTRIBUTE",
    "AnswerError",
    "AnswerMismatch",
    "BadAnswerSignature",
    "ExpiredAnswer",
    "MalformedSignedAnswer",
    "UntrustedKd",
    "VerifiedAnswer",
    "sign_answer",
    "verify_pinned_answer",
    "verify_signed_answer",
]

#: The session-level SDP attribute carrying the compact JWS (appended last).
SIGNATURE_ATTRIBUTE = "perc-answer-signature"
#: JWS ``typ`` header of a signed answer.
ANSWER_TYP = "perc-answer+jwt"
#: Most certificates in ``x5c`` (leaf plus intermediates).
MAX_CHAIN_LENGTH = 4
#: Seconds of clock skew tolerated on ``exp`` and ``iat``.
LEEWAY = 30.0

# the signature may be empty here: "alg":"none" is refused as BadAnswerSignature
_JWS_RE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_REFUSED_HEADERS = frozenset({"crit", "b64", "jku", "jwk", "x5u"})
_SHA256_B64URL = re.compile(r"[A-Za-z0-9_-]{43}")
_CLAIMS = ("aid", "cid", "sub", "offer", "answer", "iat", "exp")


# --- errors ---------------------------------------------------------------


class AnswerError(ProtocolError):
    """A signed answer that must not be trusted."""

    reason = "answer_error"


class MalformedSignedAnswer(AnswerError):
    """Not SDP, no (or several) signature attributes, or a JWS/claims that do not parse."""

    reason = "answer_malformed"


class BadAnswerSignature(AnswerError):
    """The signature does not verify with the leaf's key, or ``alg`` is not ES256."""

    reason = "answer_bad_signature"


class UntrustedKd(AnswerError):
    """The leaf does not chain to a trust root for any of the KD names, or is not P-256."""

    reason = "answer_untrusted_kd"


class AnswerMismatch(AnswerError):
    """The signature does not cover this answer/offer, or the SDP does not name the KD."""

    reason = "answer_mismatch"


class ExpiredAnswer(AnswerError):
    """``exp`` has passed (or ``iat`` lies in the future) beyond the leeway."""

    reason = "answer_expired"


@dataclass(frozen=True)
class VerifiedAnswer:
    """What a valid signed answer vouches for."""

    #: The answer without the signature attribute.
    answer: SessionDescription
    #: 16 bytes (UUIDv4), as in the RFC 9185 tunnel.
    association_id: bytes
    conference_id: str
    #: The endpoint identity the KD admitted.
    identity: str
    #: The name of ``kd_names`` the leaf certificate was verified for.
    kd_name: str
    #: sha256 of the leaf's DER == every accepted m= section's a=fingerprint.
    kd_fingerprint: bytes
    #: The (single) a=tls-id of the accepted m= sections.
    kd_tls_id: str
    expires_at: float


# --- helpers ----------------------------------------------------------------


def _digest(data: bytes) -> str:
    return b64url_encode(hashlib.sha256(data).digest())


def _json_object(data: str | bytes, what: str) -> dict[str, Any]:
    """The JSON object of a base64url JWS segment (str) or of decoded bytes.

    Duplicate members, NaN and Infinity are refused; raises MalformedSignedAnswer.
    """
    try:
        raw = b64url_decode(data) if isinstance(data, str) else data
        value = strict_json_loads(raw.decode("utf-8"))
    except ValueError:
        raise MalformedSignedAnswer(f"the JWS {what} is not base64url JSON") from None
    if not isinstance(value, dict):
        raise MalformedSignedAnswer(f"the JWS {what} is not a JSON object")
    return value


def _is_p256(certificate: x509.Certificate) -> bool:
    try:
        key = certificate.public_key()
    except (ValueError, UnsupportedAlgorithm):  # an unknown or broken key type
        return False
    return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)


def _accepted_sections(answer: SessionDescription, fingerprint: bytes) -> str:
    """The common tls-id of the accepted m= sections, checking their fingerprints.

    Raises ValueError (or SdpError for a hand-built description).
    """
    tls_ids = set()
    accepted = 0
    for index, media in enumerate(answer.media):
        if media.port == 0:
            continue
        accepted += 1
        fingerprints = answer.fingerprints_for(media)
        if len(fingerprints) != 1 or fingerprints[0][0] != "sha-256":
            raise ValueError(f"m= section {index} needs exactly one sha-256 a=fingerprint")
        if not hmac.compare_digest(fingerprints[0][1], fingerprint):
            raise ValueError(f"m= section {index}: a=fingerprint is not the KD certificate's")
        tls_id = media.tls_id
        if tls_id is None:
            raise ValueError(f"m= section {index} has no a=tls-id")
        tls_ids.add(tls_id)
    if accepted == 0:
        raise ValueError("no accepted m= section")
    if len(tls_ids) != 1:
        raise ValueError("the accepted m= sections carry different a=tls-id values")
    return tls_ids.pop()


# --- signing (KD side) ------------------------------------------------------


def sign_answer(
    answer: SessionDescription,
    offer_sdp: str,
    *,
    association_id: bytes,
    conference_id: str,
    identity: str,
    certificate_chain: Sequence[bytes],
    private_key: ec.EllipticCurvePrivateKey,
    now: float,
    lifetime: int = 300,
) -> str:
    """The signed answer SDP text: ``answer`` plus ``a=perc-answer-signature``.

    ``answer`` is the unsigned answer (the KD's fingerprint and tls-id in every
    accepted m= section); ``offer_sdp`` the offer text exactly as the endpoint
    sent it; ``certificate_chain`` DER certificates, leaf first (the KD's own,
    whose key is ``private_key``, ECDSA P-256), at most
    :data:`MAX_CHAIN_LENGTH`.  Raises ValueError for arguments that would make
    an answer no verifier accepts: the attribute already present, an
    accepted section whose fingerprint is not sha256(leaf DER) or without the
    common tls-id, no accepted section, a key not matching the leaf.
    """
    if not isinstance(answer, SessionDescription):
        raise TypeError("answer must be a SessionDescription")
    if not isinstance(offer_sdp, str):
        raise TypeError("offer_sdp must be the offer text (str)")
    if answer.has(SIGNATURE_ATTRIBUTE) or any(m.has(SIGNATURE_ATTRIBUTE) for m in answer.media):
        raise ValueError(f"the answer already carries a={SIGNATURE_ATTRIBUTE}")
    if not isinstance(association_id, bytes) or len(association_id) != 16:
        raise ValueError("association_id must be 16 bytes")
    for name, value in (("conference_id", conference_id), ("identity", identity)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string")
    if not isinstance(private_key, ec.EllipticCurvePrivateKey) or not isinstance(
            private_key.curve, ec.SECP256R1):
        raise ValueError("ES256 needs an ECDSA P-256 private key")
    chain = list(certificate_chain)
    if not 1 <= len(chain) <= MAX_CHAIN_LENGTH or not all(isinstance(c, bytes) for c in chain):
        raise ValueError(f"certificate_chain must be 1-{MAX_CHAIN_LENGTH} DER certificates")
    leaf = x509.load_der_x509_certificate(chain[0])
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(*spki) != private_key.public_key().public_bytes(*spki):
        raise ValueError("the private key does not belong to the leaf certificate")
    if not isinstance(lifetime, int) or lifetime <= 0:
        raise ValueError("lifetime must be a positive number of seconds")
    _accepted_sections(answer, hashlib.sha256(chain[0]).digest())
    issued_at = int(now)
    claims = {
        "aid": str(uuid.UUID(bytes=association_id)),
        "cid": conference_id,
        "sub": identity,
        "offer": _digest(offer_sdp.encode("utf-8")),
        "answer": _digest(answer.serialize().encode("utf-8")),
        "iat": issued_at,
        "exp": issued_at + lifetime,
    }
    x5c = [binascii.b2a_base64(der, newline=False).decode("ascii") for der in chain]
    token = jwt.encode(claims, private_key, algorithm="ES256",
                       headers={"typ": ANSWER_TYP, "x5c": x5c})
    signed = answer.with_attributes(SIGNATURE_ATTRIBUTE, [token]).serialize()
    try:  # a hand-built description must survive the verifier's parse unchanged
        reparsed = sdp.parse(signed).without(SIGNATURE_ATTRIBUTE).serialize()
    except sdp.SdpError as e:
        raise ValueError(f"the signed answer would not parse: {e}") from None
    if reparsed != answer.serialize():
        raise ValueError("the answer does not survive parsing unchanged")
    return signed


# --- verifying (endpoint side) -------------------------------------------------


def _signature_token(signed: SessionDescription) -> str:
    found = signed.get_all(SIGNATURE_ATTRIBUTE)
    if len(found) != 1:
        raise MalformedSignedAnswer(
            f"expected exactly one session-level a={SIGNATURE_ATTRIBUTE}, found {len(found)}")
    if any(m.has(SIGNATURE_ATTRIBUTE) for m in signed.media):
        raise MalformedSignedAnswer(f"a={SIGNATURE_ATTRIBUTE} at media level")
    token = found[0].value
    if token is None or len(token) > MAX_JWS_LENGTH or not _JWS_RE.fullmatch(token):
        raise MalformedSignedAnswer(f"a={SIGNATURE_ATTRIBUTE} is not a compact JWS")
    return token


def _header_chain(token: str) -> list[x509.Certificate]:
    """The x5c certificates of the checked JWS header (leaf first)."""
    header = _json_object(token.split(".", 1)[0], "header")
    if header.get("alg") != "ES256":
        raise BadAnswerSignature("only ES256 is accepted")
    if header.get("typ") != ANSWER_TYP:
        raise MalformedSignedAnswer(f"the JWS typ is not {ANSWER_TYP}")
    refused = _REFUSED_HEADERS.intersection(header)
    if refused:
        raise MalformedSignedAnswer(f"unsupported JOSE header {sorted(refused)[0]}")
    x5c = header.get("x5c")
    if not isinstance(x5c, list) or not 1 <= len(x5c) <= MAX_CHAIN_LENGTH:
        raise MalformedSignedAnswer(f"x5c must list 1-{MAX_CHAIN_LENGTH} certificates")
    chain = []
    for entry in x5c:
        if not isinstance(entry, str):
            raise MalformedSignedAnswer("an x5c entry is not a string")
        try:
            der = binascii.a2b_base64(entry.encode("ascii"), strict_mode=True)
            chain.append(x509.load_der_x509_certificate(der))
        except (binascii.Error, UnicodeEncodeError, ValueError, x509.InvalidVersion):
            # InvalidVersion (a version other than v1-v3) is no ValueError.
            raise MalformedSignedAnswer("an x5c entry is not base64 of a DER certificate"
                                        ) from None
    return chain


def _trusted_name(chain: list[x509.Certificate], trust_roots: Sequence[x509.Certificate],
                  kd_names: Collection[str], now: float) -> str:
    """The first of ``kd_names`` (sorted) the chain verifies for; raises UntrustedKd."""
    leaf = chain[0]
    if not _is_p256(leaf):
        raise UntrustedKd("the KD certificate's key is not ECDSA P-256")
    try:
        when = datetime.datetime.fromtimestamp(now, datetime.UTC)
    except (OverflowError, OSError, ValueError):
        raise ValueError("now is out of range") from None
    builder = PolicyBuilder().store(Store(list(trust_roots))).time(when)
    for name in sorted(kd_names):
        try:
            verifier = builder.build_server_verifier(x509.DNSName(name))
            verifier.verify(leaf, chain[1:])
        except (VerificationError, ValueError, UnsupportedAlgorithm):
            continue
        return name
    raise UntrustedKd("the KD certificate is not trusted for any configured KD name")


def _claims(token: str, leaf: x509.Certificate) -> dict[str, Any]:
    """The claims of ``token`` after checking its signature with the leaf's key."""
    try:
        decoded = jwt.PyJWS().decode_complete(token, leaf.public_key(),  # type: ignore[arg-type]
                                              algorithms=["ES256"])
    except jwt.InvalidAlgorithmError:
        raise BadAnswerSignature("only ES256 is accepted") from None
    except jwt.InvalidSignatureError:
        raise BadAnswerSignature("the answer signature does not verify") from None
    except (jwt.PyJWTError, ValueError, TypeError) as e:
        raise MalformedSignedAnswer(f"bad answer JWS: {type(e).__name__}") from None
    payload = decoded.get("payload")
    if not isinstance(payload, bytes):
        raise MalformedSignedAnswer("the JWS payload is missing")
    return _json_object(payload, "payload")


def _number(claims: dict[str, Any], name: str) -> float:
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MalformedSignedAnswer(f"claim {name} must be a number")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise MalformedSignedAnswer(f"claim {name} must be finite")
    return number


def _check_claims(claims: dict[str, Any], now: float) -> tuple[bytes, float]:
    """(association id, exp) of well-formed, current claims."""
    missing = [name for name in _CLAIMS if name not in claims]
    if missing:
        raise MalformedSignedAnswer(f"claim {missing[0]} missing")
    for name in ("aid", "cid", "sub", "offer", "answer"):
        if not isinstance(claims[name], str) or not claims[name]:
            raise MalformedSignedAnswer(f"claim {name} must be a non-empty string")
    for name in ("offer", "answer"):
        if not _SHA256_B64URL.fullmatch(claims[name]):
            raise MalformedSignedAnswer(f"claim {name} is not a base64url sha-256 digest")
    try:
        aid = uuid.UUID(claims["aid"])
    except ValueError:
        aid = None
    if aid is None or str(aid) != claims["aid"]:
        raise MalformedSignedAnswer("claim aid is not a canonical UUID string")
    issued_at, expires_at = _number(claims, "iat"), _number(claims, "exp")
    if expires_at <= now - LEEWAY:
        raise ExpiredAnswer("the signed answer has expired")
    if issued_at > now + LEEWAY:
        raise ExpiredAnswer("the signed answer is not valid yet")
    return aid.bytes, expires_at


def verify_signed_answer(
    signed_answer: str,
    offer_sdp: str,
    *,
    trust_roots: Sequence[x509.Certificate],
    kd_names: Collection[str],
    now: float,
) -> VerifiedAnswer:
    """Check a signed answer against the offer it answers; see the module docstring.

    ``signed_answer`` is the SDP text (``str`` or UTF-8 ``bytes``) as received;
    ``offer_sdp`` the offer text exactly as sent; ``trust_roots`` the
    enterprise CA certificate(s); ``kd_names`` the DNS names a KD may have.
    Raises an :class:`AnswerError` subclass for anything untrustworthy, and
    ValueError/TypeError only for bad local arguments (no roots or names,
    ``offer_sdp`` not a str).  The caller checks that ``conference_id`` and
    ``association_id`` of the result are the ones it asked for.
    """
    if not trust_roots or not kd_names or isinstance(kd_names, str):
        raise ValueError("need at least one trust root and a collection of KD names")
    return _verify(signed_answer, offer_sdp, now,
                   lambda chain: _trusted_name(chain, trust_roots, kd_names, now))


def verify_pinned_answer(
    signed_answer: str,
    offer_sdp: str,
    *,
    kd_fingerprint: bytes,
    now: float,
) -> VerifiedAnswer:
    """As :func:`verify_signed_answer`, for the MD, which trusts no CA but pins the
    conference's KD certificate: step 3 becomes "the leaf is an EC P-256
    certificate whose SHA-256 fingerprint is ``kd_fingerprint``"
    (:class:`UntrustedKd` otherwise); ``kd_name`` of the result is empty.

    The MD checks with it, before it adds a leg to a conference's media
    group, that the KD signed this answer for that conference and
    association (issue 10: a cross-conference join).
    """
    if not isinstance(kd_fingerprint, bytes) or len(kd_fingerprint) != 32:
        raise ValueError("kd_fingerprint is a SHA-256 digest (32 bytes)")

    def pinned(chain: list[x509.Certificate]) -> str:
        leaf = chain[0]
        digest = hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).digest()
        if not hmac.compare_digest(digest, kd_fingerprint):
            raise UntrustedKd("the answer is not signed by the conference's KD")
        if not _is_p256(leaf):
            raise UntrustedKd("the KD certificate's key is not ECDSA P-256")
        return ""

    return _verify(signed_answer, offer_sdp, now, pinned)


def _verify(signed_answer: str, offer_sdp: str, now: float,
            trusted: Callable[[list[x509.Certificate]], str]) -> VerifiedAnswer:
    if not isinstance(offer_sdp, str):
        raise TypeError("offer_sdp must be the offer text (str)")
    if not isinstance(signed_answer, str | bytes):
        raise MalformedSignedAnswer("a signed answer is SDP text")
    try:
        signed = sdp.parse(signed_answer)
    except sdp.SdpError as e:
        raise MalformedSignedAnswer(f"the signed answer is not valid SDP: {e}") from None
    token = _signature_token(signed)
    chain = _header_chain(token)
    kd_name = trusted(chain)
    claims = _claims(token, chain[0])
    association_id, expires_at = _check_claims(claims, now)

    answer = signed.without(SIGNATURE_ATTRIBUTE)
    try:
        answer_digest = _digest(answer.serialize().encode("utf-8"))
        offer_digest = _digest(offer_sdp.encode("utf-8"))
    except (ValueError, UnicodeEncodeError):
        raise AnswerMismatch("the answer or offer cannot be encoded") from None
    if not hmac.compare_digest(answer_digest, claims["answer"]):
        raise AnswerMismatch("the signature does not cover this answer")
    if not hmac.compare_digest(offer_digest, claims["offer"]):
        raise AnswerMismatch("the signature does not cover this offer")
    leaf_der = chain[0].public_bytes(serialization.Encoding.DER)
    kd_fingerprint = hashlib.sha256(leaf_der).digest()
    try:
        tls_id = _accepted_sections(answer, kd_fingerprint)
    except (ValueError, sdp.SdpError) as e:
        raise AnswerMismatch(str(e)) from None
    return VerifiedAnswer(
        answer=answer,
        association_id=association_id,
        conference_id=claims["cid"],
        identity=claims["sub"],
        kd_name=kd_name,
        kd_fingerprint=kd_fingerprint,
        kd_tls_id=tls_id,
        expires_at=expires_at,
    )
