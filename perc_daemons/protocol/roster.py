"""The signed conference roster: per epoch, the admitted identities and their SSRCs.

:func:`sign_roster` makes a compact JWS (ES256, header ``typ``
``perc-roster+jwt`` and ``kid``) with claims ``iss``, ``conference``,
``epoch``, ``iat`` and ``members``: ``[{"identity": ..., "ssrcs": [...]}]``
sorted by identity, SSRCs ascending, so equal rosters sign equal payloads.
Endpoints check it with :func:`verify_roster` against the JWKS: the MD may
carry a roster but cannot forge one, nor replay an older epoch's roster to an
endpoint that passes the epoch it already knows as ``min_epoch``.  An SSRC
may belong to one member only.  Nothing here reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jwt

from perc_daemons.protocol.errors import ProtocolError
from perc_daemons.protocol.identity import normalize_identity
from perc_daemons.protocol.jose import (
    InvalidJwks,
    decode_es256,
    numeric_claim,
    signing_key,
    verification_keys,
)

__all__ = [
    "ROSTER_TYP",
    "DuplicateSsrc",
    "InvalidRoster",
    "Roster",
    "RosterError",
    "RosterMember",
    "StaleRoster",
    "WrongConference",
    "sign_roster",
    "verify_roster",
]

ROSTER_TYP = "perc-roster+jwt"
_MAX_EPOCH = (1 << 63) - 1


class RosterError(ProtocolError):
    """A roster that must not be trusted."""

    reason = "roster_error"


class InvalidRoster(RosterError):
    """Malformed, bad signature, unknown kid, wrong issuer, or issued in the future."""

    reason = "roster_invalid"


class WrongConference(RosterError):
    """The roster is for another conference."""

    reason = "roster_wrong_conference"


class StaleRoster(RosterError):
    """The roster's epoch is older than the one already known (a replay)."""

    reason = "roster_stale"


class DuplicateSsrc(RosterError):
    """Two members claim the same SSRC (or one member lists it twice)."""

    reason = "roster_duplicate_ssrc"


@dataclass(frozen=True)
class RosterMember:
    identity: str
    ssrcs: tuple[int, ...]


@dataclass(frozen=True)
class Roster:
    conference_id: str
    epoch: int
    issued_at: float
    members: tuple[RosterMember, ...]

    def identity_of(self, ssrc: int) -> str | None:
        """The member sending with ``ssrc``, or None."""
        for member in self.members:
            if ssrc in member.ssrcs:
                return member.identity
        return None


def _is_ssrc(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 32


def _members(members: Any) -> tuple[RosterMember, ...]:
    """Checked, canonically ordered members; raises ValueError or DuplicateSsrc."""
    result = []
    seen: set[int] = set()
    identities: set[str] = set()
    for identity, ssrcs in members:
        if not isinstance(identity, str) or not identity:
            raise ValueError("identity must be a non-empty string")
        identity = normalize_identity(identity)
        if identity in identities:
            raise ValueError(f"identity {identity!r} appears twice")
        identities.add(identity)
        if not isinstance(ssrcs, list | tuple) or not all(_is_ssrc(s) for s in ssrcs):
            raise ValueError("ssrcs must be a list of 32-bit unsigned integers")
        for ssrc in ssrcs:
            if ssrc in seen:
                raise DuplicateSsrc(f"SSRC {ssrc:#010x} appears twice")
            seen.add(ssrc)
        result.append(RosterMember(identity, tuple(sorted(ssrcs))))
    return tuple(sorted(result, key=lambda m: m.identity))


def sign_roster(
    keys: Any,
    *,
    issuer: str,
    conference_id: str,
    epoch: int,
    members: list[tuple[str, list[int]]],
    now: float,
) -> str:
    """The roster of ``epoch`` signed with the active key (compact JWS).

    Raises ValueError for bad arguments and :class:`DuplicateSsrc`.
    """
    if not isinstance(epoch, int) or isinstance(epoch, bool) or not 0 <= epoch <= _MAX_EPOCH:
        raise ValueError("epoch must be a non-negative integer")
    if not isinstance(conference_id, str) or not conference_id:
        raise ValueError("conference_id must be a non-empty string")
    checked = _members(members)
    claims = {
        "iss": issuer,
        "conference": conference_id,
        "epoch": epoch,
        "iat": int(now),
        "members": [{"identity": m.identity, "ssrcs": list(m.ssrcs)} for m in checked],
    }
    kid, private_key = signing_key(keys)
    headers = {"kid": kid, "typ": ROSTER_TYP}
    return jwt.encode(claims, private_key, algorithm="ES256", headers=headers)


def verify_roster(
    token: str | bytes,
    jwks: Any,
    *,
    issuer: str,
    conference_id: str,
    now: float,
    min_epoch: int | None = None,
    leeway: float = 10,
) -> Roster:
    """The verified :class:`Roster`, or a :class:`RosterError` subclass.

    ``min_epoch`` is the newest epoch the caller already knows: an older
    roster is refused as :class:`StaleRoster` (the same epoch is accepted).
    """
    try:
        public_keys = verification_keys(jwks, now)
    except InvalidJwks as e:
        raise InvalidRoster(f"unusable JWKS: {e}") from None
    try:
        _header, claims = decode_es256(
            token,
            public_keys,
            typ=ROSTER_TYP,
            issuer=issuer,
            required=("iss", "conference", "epoch", "iat", "members"),
        )
        issued_at = numeric_claim(claims, "iat")
    except (jwt.PyJWTError, ValueError) as e:
        raise InvalidRoster(str(e)) from None
    if issued_at > now + leeway:
        raise InvalidRoster("roster issued in the future")
    if claims["conference"] != conference_id:
        raise WrongConference("roster is for another conference")
    epoch = claims["epoch"]
    if not isinstance(epoch, int) or isinstance(epoch, bool) or not 0 <= epoch <= _MAX_EPOCH:
        raise InvalidRoster("epoch must be a non-negative integer")
    if min_epoch is not None and epoch < min_epoch:
        raise StaleRoster(f"roster epoch {epoch} is older than {min_epoch}")
    entries = claims["members"]
    if not isinstance(entries, list):
        raise InvalidRoster("members must be a list")
    pairs = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise InvalidRoster("a member must be an object")
        pairs.append((entry.get("identity"), entry.get("ssrcs")))
    try:
        members = _members(pairs)
    except ValueError as e:
        raise InvalidRoster(str(e)) from None
    return Roster(conference_id, epoch, issued_at, members)
