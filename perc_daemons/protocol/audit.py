"""The tamper-evident audit trail of a conference: record format, hash chain, checkpoints.

Issue 14 ("Audit trail"); the service provider keeps the record of who was
admitted, refused, keyed and removed (seed draft-westerlund-perc-webrtc-use-case
sections 3.2 and 4.5-4.9).  Sans-I/O: no clock, no store, no network.

Record
    One JSON object per event, hashed over its canonical JSON (keys sorted,
    no white space, ASCII only, see :func:`canonical_json`)::

        {"conference": "c1", "seq": 7, "time": 1700000000.5, "kind": "admitted",
         "identity": "alice@example.com", "detail": {...}, "prev": "<hex>"}

    ``seq`` counts the conference's records from 1; ``prev`` is the ``hash``
    (lower-case hex SHA-256) of record ``seq - 1``, or :data:`GENESIS` for
    record 1.  ``hash`` = SHA-256 of the canonical JSON of the record without
    ``hash``.  A changed field changes that record's hash; a deleted,
    inserted or reordered record breaks ``seq`` and ``prev`` of the next.
    ``detail`` never holds key material.

Checkpoint
    A compact JWS (ES256, the KMF's JWKS keys, ``typ``
    :data:`CHECKPOINT_TYP`) with claims ``{"iss", "conference", "seq",
    "hash", "iat"}``: the KMF vouches for the chain up to record ``seq``.
    Rewriting the whole chain after a record (recomputing every hash) is
    caught by the first checkpoint at or after it; deleting the tail is
    caught up to the last checkpoint.  Records after the last checkpoint are
    reported as not yet covered (the KMF signs every N records and at the
    end of the conference).

Retention
    When a trail is deleted (the KMF's ``[audit] retention``) one record of
    kind ``trail-deleted`` stays: ``seq`` and ``prev`` continue the deleted
    chain, its detail says how many records went and the last hash, and a
    checkpoint covers it.  A trail may start with such a record only.

Export (for a SIEM, and :func:`verify_trail` on the file)
    JSON lines: ``{"type": "record", <record>, "hash": ...}`` and
    ``{"type": "checkpoint", "conference", "seq", "hash", "jws"}``;
    :func:`parse_export` reads them back and raises only :class:`AuditError`.

Not done here: deciding what is recorded (``perc_daemons.kmf.audit``) and
keeping it (``perc_daemons.store``).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jwt

from perc_daemons.protocol.errors import ProtocolError
from perc_daemons.protocol.jose import (
    InvalidJwks,
    decode_es256,
    signing_key,
    verification_keys,
)

__all__ = [
    "CHECKPOINT_TYP",
    "GENESIS",
    "TRAIL_DELETED",
    "AuditError",
    "AuditRecord",
    "Checkpoint",
    "TrailBroken",
    "VerifiedTrail",
    "canonical_json",
    "export_lines",
    "parse_export",
    "record_hash",
    "sign_checkpoint",
    "verify_trail",
]

GENESIS = "0" * 64
CHECKPOINT_TYP = "perc-audit-checkpoint+jwt"
TRAIL_DELETED = "trail-deleted"
MAX_LINE = 1 << 20
_HEX = frozenset("0123456789abcdef")


class AuditError(ProtocolError):
    """An audit export that cannot be read (not JSON lines of records and checkpoints)."""

    reason = "audit_malformed"

    def __init__(self, message: str, *, line: int | None = None) -> None:
        self.line = line
        super().__init__(message if line is None else f"line {line}: {message}")


class TrailBroken(ProtocolError):
    """The trail does not verify.  ``seq`` is the first bad record (or the
    checkpoint's record), ``reason`` says how:

    ``edited`` (a record's hash does not match its content), ``missing``
    (a record is absent: deleted), ``out_of_order`` (inserted or reordered:
    ``seq`` or ``prev`` do not follow), ``foreign`` (a record of another
    conference), ``bad_checkpoint`` (a signature that does not verify, or a
    checkpoint of another conference), ``checkpoint_mismatch`` (the chain
    differs from what a checkpoint signed: rewritten), ``truncated`` (a
    checkpoint names a record past the end), ``unsigned_deletion`` (a
    ``trail-deleted`` record no checkpoint covers).
    """

    def __init__(self, reason: str, seq: int | None, message: str) -> None:
        self.reason = reason
        self.seq = seq
        where = "" if seq is None else f"record {seq}: "
        super().__init__(where + message)


def canonical_json(value: Any) -> str:
    """Sorted keys, no white space, ASCII only, no NaN: the bytes that are hashed."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)


@dataclass(frozen=True)
class AuditRecord:
    """One chained record (see the module doc)."""

    conference: str
    seq: int
    time: float
    kind: str
    identity: str | None
    detail: dict[str, Any] = field(hash=False)
    prev: str
    hash: str

    def body(self) -> dict[str, Any]:
        """The hashed fields."""
        return {"conference": self.conference, "seq": self.seq, "time": self.time,
                "kind": self.kind, "identity": self.identity, "detail": self.detail,
                "prev": self.prev}

    def to_json(self) -> dict[str, Any]:
        return {**self.body(), "hash": self.hash}

    @classmethod
    def chained(cls, conference: str, seq: int, time: float, kind: str,
                identity: str | None, detail: dict[str, Any], prev: str) -> AuditRecord:
        """The record with its hash computed."""
        body = {"conference": conference, "seq": seq, "time": float(time), "kind": kind,
                "identity": identity, "detail": detail, "prev": prev}
        return cls(conference, seq, float(time), kind, identity, detail, prev,
                   record_hash(body))


def record_hash(body: Mapping[str, Any]) -> str:
    """Hex SHA-256 of the canonical JSON of a record's hashed fields."""
    return hashlib.sha256(canonical_json(dict(body)).encode("ascii")).hexdigest()


@dataclass(frozen=True)
class Checkpoint:
    """A signed checkpoint as stored: the JWS, and the seq/hash it claims (unverified)."""

    conference: str
    seq: int
    hash: str
    jws: str

    def to_json(self) -> dict[str, Any]:
        return {"conference": self.conference, "seq": self.seq, "hash": self.hash,
                "jws": self.jws}


def sign_checkpoint(keys: Any, *, issuer: str, record: AuditRecord, now: float) -> Checkpoint:
    """A checkpoint over ``record`` (the chain up to it) signed with the active key."""
    kid, private_key = signing_key(keys)
    claims = {"iss": issuer, "conference": record.conference, "seq": record.seq,
              "hash": record.hash, "iat": int(now)}
    jws = jwt.encode(claims, private_key, algorithm="ES256",
                     headers={"kid": kid, "typ": CHECKPOINT_TYP})
    return Checkpoint(record.conference, record.seq, record.hash, jws)


@dataclass(frozen=True)
class VerifiedTrail:
    """What :func:`verify_trail` established."""

    conference: str
    records: int
    first_seq: int
    last_seq: int
    checkpoints: int
    #: the last record a valid checkpoint covers (0: none)
    signed_through: int

    @property
    def unsigned(self) -> int:
        """Records after the last checkpoint (not yet vouched for)."""
        return self.last_seq - max(self.signed_through, self.first_seq - 1)


def verify_trail(conference: str, records: Sequence[AuditRecord],
                 checkpoints: Iterable[Checkpoint], jwks: Any, *, now: float = 0.0,
                 issuer: str | None = None) -> VerifiedTrail:
    """Check the chain and every checkpoint; raise :class:`TrailBroken` at the first fault.

    ``jwks`` is a JWKS document (or the KMF's SigningKeys).  Records must be
    in stored order.  ``issuer``, when given, must be the checkpoints' ``iss``.
    """
    try:
        public_keys = verification_keys(jwks, now)
    except (InvalidJwks, AttributeError, TypeError) as e:
        raise TrailBroken("bad_checkpoint", None, f"unusable JWKS: {e}") from None
    by_seq: dict[int, AuditRecord] = {}
    present = {r.seq for r in records}
    prev: str | None = None
    expected: int | None = None
    for index, record in enumerate(records):
        if record.conference != conference:
            raise TrailBroken("foreign", record.seq,
                              f"belongs to conference {record.conference!r}")
        try:
            digest = record_hash(record.body())
        except (ValueError, RecursionError, TypeError):
            digest = ""
        if digest != record.hash:
            raise TrailBroken("edited", record.seq, "its hash does not match its content")
        if index == 0:
            if record.seq != 1 and record.kind != TRAIL_DELETED:
                raise TrailBroken("missing", 1, f"the trail starts at record {record.seq}")
            if record.seq == 1 and record.prev != GENESIS:
                raise TrailBroken("out_of_order", 1, "the first record does not start the chain")
        else:
            assert expected is not None
            if record.seq > expected and expected not in present:
                raise TrailBroken("missing", expected,
                                  f"absent (the next record is {record.seq})")
            if record.seq != expected or record.prev != prev:
                raise TrailBroken("out_of_order", record.seq,
                                  f"found where record {expected} should be" if
                                  record.seq != expected else
                                  "does not follow the record before it (prev)")
        by_seq[record.seq] = record
        prev = record.hash
        expected = record.seq + 1
    first = records[0].seq if records else 0
    last = records[-1].seq if records else 0
    signed = 0
    count = 0
    for checkpoint in sorted(checkpoints, key=lambda c: c.seq):
        count += 1
        try:
            _header, claims = decode_es256(checkpoint.jws, public_keys, typ=CHECKPOINT_TYP,
                                           issuer=issuer,
                                           required=("conference", "seq", "hash"))
        except jwt.PyJWTError as e:
            raise TrailBroken("bad_checkpoint", _int_or_none(checkpoint.seq),
                              f"checkpoint signature does not verify ({e})") from None
        seq, digest = claims.get("seq"), claims.get("hash")
        if claims.get("conference") != conference or not isinstance(seq, int) \
                or isinstance(seq, bool) or not isinstance(digest, str):
            raise TrailBroken("bad_checkpoint", _int_or_none(seq),
                              "checkpoint of another conference or malformed")
        if seq > last:
            raise TrailBroken("truncated", seq, f"a checkpoint covers it but the trail ends "
                              f"at record {last}")
        record = by_seq.get(seq)
        if record is None:
            continue  # before a retention deletion: the records are gone
        if record.hash != digest:
            raise TrailBroken("checkpoint_mismatch", seq,
                              "the chain up to here differs from what the KMF signed")
        signed = max(signed, seq)
    if records and records[0].kind == TRAIL_DELETED and signed < records[0].seq:
        raise TrailBroken("unsigned_deletion", records[0].seq,
                          "a trail deletion no checkpoint covers")
    return VerifiedTrail(conference, len(records), first, last, count, signed)


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# --- export -----------------------------------------------------------------------------


def export_lines(records: Iterable[AuditRecord], checkpoints: Iterable[Checkpoint]
                 ) -> list[str]:
    """JSON lines (no newline) of the records, each checkpoint after the record it covers."""
    by_seq: dict[int, list[Checkpoint]] = {}
    for c in checkpoints:
        by_seq.setdefault(c.seq, []).append(c)
    lines = []
    seen: set[int] = set()
    for r in records:
        lines.append(canonical_json({"type": "record", **r.to_json()}))
        seen.add(r.seq)
        for c in by_seq.get(r.seq, []):
            lines.append(canonical_json({"type": "checkpoint", **c.to_json()}))
    for seq in sorted(set(by_seq) - seen):  # checkpoints of deleted records
        for c in by_seq[seq]:
            lines.append(canonical_json({"type": "checkpoint", **c.to_json()}))
    return lines


def _field(obj: Mapping[str, Any], name: str, types: Any, line: int) -> Any:
    value = obj.get(name)
    if not isinstance(value, types) or isinstance(value, bool):
        raise AuditError(f"{name!r} missing or of the wrong type", line=line)
    return value


def _hex(value: str, name: str, line: int) -> str:
    if len(value) != 64 or not set(value) <= _HEX:
        raise AuditError(f"{name!r} must be 64 lower-case hex digits", line=line)
    return value


def parse_record(obj: Mapping[str, Any], line: int = 0) -> AuditRecord:
    """An :class:`AuditRecord` from its JSON object (``type`` ignored)."""
    seq = _field(obj, "seq", int, line)
    if seq < 1:
        raise AuditError("'seq' must be positive", line=line)
    time = _field(obj, "time", (int, float), line)
    if not math.isfinite(time):
        raise AuditError("'time' must be finite", line=line)
    identity = obj.get("identity")
    if identity is not None and not isinstance(identity, str):
        raise AuditError("'identity' must be a string or null", line=line)
    detail = _field(obj, "detail", dict, line)
    try:
        canonical_json(detail)
    except (ValueError, RecursionError):
        raise AuditError("'detail' cannot be hashed (NaN, infinity or too deep)",
                         line=line) from None
    return AuditRecord(
        conference=_field(obj, "conference", str, line), seq=seq, time=float(time),
        kind=_field(obj, "kind", str, line), identity=identity,
        detail=detail,
        prev=_hex(_field(obj, "prev", str, line), "prev", line),
        hash=_hex(_field(obj, "hash", str, line), "hash", line))


def parse_checkpoint(obj: Mapping[str, Any], line: int = 0) -> Checkpoint:
    seq = _field(obj, "seq", int, line)
    return Checkpoint(_field(obj, "conference", str, line), seq,
                      _hex(_field(obj, "hash", str, line), "hash", line),
                      _field(obj, "jws", str, line))


def parse_export(lines: Iterable[str | bytes]
                 ) -> tuple[str | None, list[AuditRecord], list[Checkpoint]]:
    """``(conference, records, checkpoints)`` of an export (:func:`export_lines`).

    Blank lines are skipped; anything else that is not a record or checkpoint
    line raises :class:`AuditError` naming the line.  ``conference`` is that
    of the first line (None for an empty export); lines of other conferences
    are kept for :func:`verify_trail` to refuse.
    """
    records: list[AuditRecord] = []
    checkpoints: list[Checkpoint] = []
    conference: str | None = None
    for number, raw in enumerate(lines, 1):
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise AuditError("not UTF-8", line=number) from None
        if len(raw) > MAX_LINE:
            raise AuditError("line too long", line=number)
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError):
            raise AuditError("not JSON", line=number) from None
        if not isinstance(obj, dict):
            raise AuditError("not a JSON object", line=number)
        kind = obj.get("type")
        if kind == "record":
            item: AuditRecord | Checkpoint = parse_record(obj, number)
            records.append(item)
        elif kind == "checkpoint":
            item = parse_checkpoint(obj, number)
            checkpoints.append(item)
        else:
            raise AuditError("'type' must be record or checkpoint", line=number)
        if conference is None:
            conference = item.conference
    return conference, records, checkpoints
