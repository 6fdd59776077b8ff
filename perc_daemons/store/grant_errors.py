"""Typed errors and argument checks shared by the OAuth grant stores.

Both :mod:`perc_daemons.store.grants_sqlite` and
:mod:`perc_daemons.store.grants_redis` implement
:class:`~perc_daemons.interfaces.IGrantStore` with the same rules:

- Codes and refresh tokens are known only by their SHA-256 digest (32 bytes,
  see :func:`token_hash`); grants are JSON objects.
- Expiry is enforced on read against the caller's ``now``: an expired code or
  token is as good as unknown.
- A refresh token's grant carries its ``family`` (a non-empty string): every
  token rotated from one original refresh token belongs to the same family.
  Rotation puts the successor in the old token's family (whatever
  ``new_grant["family"]`` says) and keeps the old one as a "rotated"
  tombstone until its own expiry, so presenting it again is recognised as
  reuse: the whole family is then deleted and :class:`RefreshTokenReused`
  raised.  Revoking any token of a family deletes the whole family.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

__all__ = [
    "GrantError",
    "InvalidGrant",
    "RefreshTokenReused",
    "check_grant",
    "check_hash",
    "token_hash",
]


class GrantError(Exception):
    """Base class of the grant stores' refusals."""


class InvalidGrant(GrantError):
    """The refresh token is unknown, expired or revoked."""


class RefreshTokenReused(GrantError):
    """An already-rotated refresh token was presented: its family is now revoked."""


def token_hash(token: str) -> bytes:
    """The SHA-256 digest under which a code or token is stored."""
    return hashlib.sha256(token.encode("utf-8")).digest()


def check_hash(value: object) -> bytes:
    if not isinstance(value, bytes) or len(value) != 32:
        raise ValueError("a code or token hash is a 32-byte SHA-256 digest")
    return value


def check_time(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of seconds: {value!r}")
    return float(value)


def check_grant(grant: object, family: bool = False) -> str:
    """``grant`` as compact JSON (``family`` removed when ``family`` is true)."""
    if not isinstance(grant, dict):
        raise ValueError("a grant is a dict")
    if family:
        fam = grant.get("family")
        if not isinstance(fam, str) or not fam or len(fam) > 128:
            raise ValueError("a refresh token's grant needs a 'family' string")
        grant = {k: v for k, v in grant.items() if k != "family"}
    try:
        return json.dumps(grant, separators=(",", ":"), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"grant is not JSON-serialisable: {e}") from None


def load_grant(text: str, family: str | None = None) -> dict[str, Any]:
    grant = json.loads(text)
    if family is not None:
        grant["family"] = family
    return grant
