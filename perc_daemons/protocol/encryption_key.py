"""The ``Encryption-Key`` header of the KMF's key service (seed 1 section 6.3).

draft-thomson-http-encryption-02 section 4 ``parameter`` syntax, as the KMF
sends it::

    Encryption-Key: keyid="<conference>/<epoch>"; aesgcm128=<base64url EKT key>; usage="EKT"

``keyid`` is a quoted-string (it contains ``/``); the key is base64url without
padding.  Shared by the KD (which fetches epoch keys) and the reference
endpoint (a user agent reading its key over HTTPS).
"""

from __future__ import annotations

import re

from perc_daemons.protocol.jose import b64url_decode, b64url_encode

__all__ = ["format_encryption_key", "parse_encryption_key"]

_ENCRYPTION_KEY = re.compile(
    r'\s*keyid="(?P<keyid>[^"]*)"\s*;\s*aesgcm128=(?P<key>[A-Za-z0-9_-]+)\s*;'
    r'\s*usage="EKT"\s*')


def parse_encryption_key(header: str, conference_id: str, epoch: int) -> bytes:
    """The EKT key of an ``Encryption-Key`` header for ``conference_id``/``epoch``;
    raises ValueError for anything else."""
    match = _ENCRYPTION_KEY.fullmatch(header)
    if match is None:
        raise ValueError("malformed Encryption-Key header")
    if match.group("keyid") != f"{conference_id}/{epoch}":
        raise ValueError("Encryption-Key keyid is not this conference and epoch")
    try:
        return b64url_decode(match.group("key"))
    except ValueError as e:
        raise ValueError(f"Encryption-Key key: {e}") from None


def format_encryption_key(conference_id: str, epoch: int, key: bytes) -> str:
    """The header value the KMF sends for ``key`` of ``conference_id``/``epoch``."""
    return f'keyid="{conference_id}/{epoch}"; aesgcm128={b64url_encode(key)}; usage="EKT"'
