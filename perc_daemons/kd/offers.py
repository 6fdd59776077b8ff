"""The KD's checks of a SignAnswer (RFC 9185 s5.3), sans-I/O.

The MD forwards each endpoint offer, verbatim, with its draft answer.  Before
the KD admits anybody it needs, from the offer alone:

* exactly one ``sha-256`` certificate fingerprint (RFC 8122), the same in
  every accepted m= section: the DTLS client certificate it will require;
* one ``a=tls-id`` (RFC 8842), the same in every accepted m= section: the
  external_session_id the ClientHello must carry (RFC 8844);
* the SSRCs of ``a=ssrc`` (RFC 5576), for the roster;
* the session-level ``a=identity`` assertion (RFC 8827 s5), whose ``aud``
  names the conference (read unverified here, to know which conference to
  check the assertion for; :func:`verify_identity` then checks it with the
  IdP's JWKS, audience included).

"Accepted" sections of the offer are those the MD can relay
(:func:`~perc_daemons.protocol.sdp.unrelayable`): a browser's data channel
section is not looked at.  From the draft answer: it answers every offered
m= section, accepts only sections the MD can relay and lists no rejected
one in its BUNDLE group (RFC 8843 s7.3.3: the KD does not sign an answer
promising a data channel to the endpoint), and every accepted m= section
carries the KD's own fingerprint (else the MD is answering for some other
DTLS server); the KD sets every accepted section's ``a=tls-id`` to its own
before signing.

Failures are :class:`OfferRejected` carrying the SignAnswerAck status and a
short reason for the MD (which shows it to the endpoint): never a key, never
the assertion itself.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from dataclasses import dataclass
from typing import Any

from perc_daemons.protocol import jsontext, sdp
from perc_daemons.protocol.identity import (
    ExpiredAssertion,
    FingerprintNotAsserted,
    ForeignIdentity,
    IdentityError,
    JwksIdentityVerifier,
    MalformedAssertion,
    UntrustedIdp,
    WrongAudience,
    decode_sdp_identity,
)
from perc_daemons.protocol.tunnel import REFUSAL_CODE, SIGN_STATUS_BAD_OFFER, SIGN_STATUS_REFUSED

__all__ = [
    "OfferFacts",
    "OfferRejected",
    "finish_answer",
    "inspect_offer",
    "verify_identity",
]


class OfferRejected(Exception):
    """A SignAnswer the KD refuses: ``status`` (SIGN_STATUS_*), a machine-readable
    ``code`` (:data:`REFUSAL_CODE`: ``not_invited``, ``not_started``, ...) and a short
    ``reason`` sentence; :attr:`text` -- what the SignAnswerAck carries -- is
    ``"<code>: <reason>"``."""

    def __init__(self, status: int, reason: str, code: str | None = None) -> None:
        if code is None:
            code = "bad_offer" if status == SIGN_STATUS_BAD_OFFER else "refused"
        if not REFUSAL_CODE.fullmatch(code):
            raise ValueError(f"not a refusal code: {code!r}")
        self.status = status
        self.code = code
        self.reason = reason
        super().__init__(reason)

    @property
    def text(self) -> str:
        return f"{self.code}: {self.reason}"


def _bad(reason: str) -> OfferRejected:
    return OfferRejected(SIGN_STATUS_BAD_OFFER, reason)


def _refused(reason: str, code: str) -> OfferRejected:
    return OfferRejected(SIGN_STATUS_REFUSED, reason, code)


@dataclass(frozen=True)
class OfferFacts:
    """What the KD needs from an endpoint's offer."""

    #: The assertion's ``aud`` (unverified until :func:`verify_identity`).
    conference_id: str
    #: The RFC 8827 assertion JSON text (do not log it).
    assertion: str
    #: The ``kid`` of the assertion's JWS header (to refresh the JWKS on an unknown one).
    kid: str | None
    #: SHA-256 of the endpoint's DTLS certificate.
    fingerprint: bytes
    #: The endpoint's a=tls-id.
    tls_id: str
    ssrcs: tuple[int, ...]

    def __repr__(self) -> str:
        return (f"OfferFacts(conference_id={self.conference_id!r}, kid={self.kid!r}, "
                f"tls_id={self.tls_id!r}, ssrcs={self.ssrcs!r})")


def _b64url_json(segment: str) -> Any:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        return jsontext.loads(raw)
    except (binascii.Error, ValueError):  # JsonError is a ValueError
        return None


def _unverified_jws(assertion: str) -> tuple[str | None, str]:
    """``(kid, aud)`` of the assertion's JWS, read without checking anything."""
    try:
        outer = jsontext.loads(assertion)
    except jsontext.JsonError:
        raise _bad("identity assertion is not JSON") from None
    token = outer.get("assertion") if isinstance(outer, dict) else None
    if not isinstance(token, str) or token.count(".") != 2:
        raise _bad("identity assertion holds no JWS")
    header_b64, payload_b64, _ = token.split(".")
    header = _b64url_json(header_b64)
    payload = _b64url_json(payload_b64)
    if not isinstance(header, dict) or not isinstance(payload, dict):
        raise _bad("identity assertion JWS is malformed")
    aud = payload.get("aud")
    if not isinstance(aud, str) or not aud:
        raise _bad("identity assertion names no conference (aud)")
    kid = header.get("kid")
    return (kid if isinstance(kid, str) else None), aud


def _accepted(description: sdp.SessionDescription) -> list[sdp.MediaDescription]:
    return [m for m in description.media if m.port != 0]


def _relayable(offer: sdp.SessionDescription) -> list[sdp.MediaDescription]:
    return [m for m in offer.media if sdp.unrelayable(m) is None]


#: What a WebRTC client without PERC support is told (issue 10 item 15).
PERC_REQUIRED = ("PERC is required (RFC 8871): the endpoint must send an identity assertion "
                 "(a=identity, RFC 8827) and a=tls-id (RFC 8842), and support DTLS-SRTP with "
                 "a DOUBLE protection profile (RFC 8723) and EKT (RFC 8870)")


def inspect_offer(offer_sdp: str) -> OfferFacts:
    """The facts of an offer, or :class:`OfferRejected` (BAD_OFFER / REFUSED)."""
    try:
        offer = sdp.parse(offer_sdp)
    except sdp.SdpError as e:
        raise _bad(f"offer is not usable SDP: {e.message}") from None
    accepted = _relayable(offer)
    if not accepted:
        raise _bad("offer has no m= section the MD can relay")
    missing = [name for name, absent in (("a=identity", offer.identity is None),
                                         ("a=tls-id", any(m.tls_id is None for m in accepted)))
               if absent]
    if missing:
        # A plain WebRTC offer: say what PERC needs, not only what is missing.
        text = f"{PERC_REQUIRED}; this offer has no {' and no '.join(missing)}"
        raise _refused(text, "not_perc") if "a=identity" in missing else _bad(text)
    digests: set[bytes] = set()
    for media in accepted:
        sha256 = {d for algorithm, d in offer.fingerprints_for(media) if algorithm == "sha-256"}
        if len(sha256) != 1:
            raise _bad("offer needs exactly one sha-256 fingerprint")
        digests |= sha256
    if len(digests) != 1:
        raise _bad("offer needs exactly one sha-256 fingerprint")
    tls_ids = {m.tls_id for m in accepted}
    if len(tls_ids) != 1 or None in tls_ids:
        raise _bad("offer needs one a=tls-id")
    ssrcs = tuple(dict.fromkeys(s for m in accepted for s in m.ssrcs()))
    encoded = offer.identity
    assert encoded is not None  # checked above
    try:
        assertion = decode_sdp_identity(encoded)
    except MalformedAssertion:
        raise _bad("a=identity is not a base64 assertion") from None
    kid, audience = _unverified_jws(assertion)
    [tls_id] = tls_ids
    [fingerprint] = digests
    return OfferFacts(audience, assertion, kid, fingerprint, str(tls_id), ssrcs)


def verify_identity(verifier: JwksIdentityVerifier, facts: OfferFacts, now: float) -> str:
    """The identity the offer's assertion proves, or :class:`OfferRejected` (REFUSED)."""
    try:
        return verifier.verify(facts.assertion, facts.conference_id, facts.fingerprint, now)
    except ExpiredAssertion:
        raise _refused("identity assertion expired or not yet valid", "assertion_expired") from None
    except FingerprintNotAsserted:
        raise _refused("identity assertion is for another DTLS certificate",
                       "wrong_certificate") from None
    except UntrustedIdp:
        raise _refused("identity assertion is from an untrusted IdP", "untrusted_idp") from None
    except ForeignIdentity:
        raise _refused("identity is not in the IdP's domain", "foreign_identity") from None
    except WrongAudience:
        raise _refused("identity assertion is for another conference", "wrong_conference") from None
    except MalformedAssertion:
        raise _bad("identity assertion is malformed") from None
    except IdentityError:
        raise _refused("identity assertion signature is not valid", "bad_assertion") from None


def finish_answer(draft_sdp: str, offer_sdp: str, *, kd_fingerprint: bytes,
                  kd_tls_id: str) -> sdp.SessionDescription:
    """The MD's draft answer with the KD's tls-id in every accepted m= section.

    BAD_OFFER if the draft does not parse, does not answer each offered m=
    section (in order, same mids), accepts none, accepts one the MD cannot
    relay or keeps a rejected one in its BUNDLE group, or an accepted
    section's fingerprint is not the KD's certificate's.
    """
    try:
        draft = sdp.parse(draft_sdp)
    except sdp.SdpError as e:
        raise _bad(f"draft answer is not usable SDP: {e.message}") from None
    try:
        offer = sdp.parse(offer_sdp)
    except sdp.SdpError as e:
        raise _bad(f"offer is not usable SDP: {e.message}") from None
    if [m.mid for m in draft.media] != [m.mid for m in offer.media]:
        raise _bad("draft answer does not answer every offered m= section")
    if not _accepted(draft):
        raise _bad("draft answer accepts no m= section")
    accepted_mids = {m.mid for m in _accepted(draft)}
    if not set(draft.bundle or ()) <= accepted_mids:
        raise _bad("draft answer keeps a rejected m= section in its BUNDLE group")
    media: list[sdp.MediaDescription] = []
    for m, offered in zip(draft.media, offer.media, strict=True):
        if m.port == 0:
            media.append(m)
            continue
        reason = sdp.unrelayable(offered)
        if reason is not None:
            raise _bad(f"draft answer accepts mid {offered.mid}, which the MD cannot "
                       f"relay: {reason}")
        if draft.fingerprints_for(m) != [("sha-256", kd_fingerprint)]:
            raise _bad("answer fingerprint is not this KD")
        try:
            media.append(m.with_tls_id(kd_tls_id))
        except sdp.SdpError as e:  # our own tls-id: cannot happen
            raise ValueError(f"bad KD tls-id: {e.message}") from None
    return dataclasses.replace(draft, media=tuple(media))
