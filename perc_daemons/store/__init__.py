"""The KMF's conference session database: model, rules and typed errors.

Two implementations of :class:`~perc_daemons.interfaces.IConferenceStore`
share what is here: :mod:`perc_daemons.store.sqlite` (embedded default, one
host) and :mod:`perc_daemons.store.redis` (several KMF/KD hosts).

Rules both follow:

- Conference states move SCHEDULED -> RUNNING -> ENDED, or SCHEDULED -> ENDED
  (cancelled before it started).  Asking for the state a conference is
  already in changes nothing; any other move is an :class:`InvalidTransition`.
  ENDED is final.
- Epochs are numbered from 1, one more than the last one ever given out.
- Ending a conference (``end()``, or ``set_state(..., ENDED)``) deletes every
  stored epoch key, the roster and its list of Media Distributors, keeps the
  conference (state ended), its invitations and the audit trail, and adds one
  "ended" audit event.  Ending it again changes nothing.  After that, anything
  that would add to it (``invite``, ``uninvite``, ``add_epoch``,
  ``record_admission``, ``set_roster``, ``add_media_distributor``,
  ``remove_media_distributor``) fails with :class:`ConferenceEnded`.
- A conference lists the Media Distributors that serve it by the tunnel
  address their KD tunnel listener acknowledged the conference with
  (draft-roach-perc-webrtc slides 4.1.1 steps 9-11): "host:port", checked and
  kept in canonical form by
  :func:`~perc_daemons.protocol.tunnel_address.check_tunnel_address`.  Adding
  and removing are idempotent, audited ("media-distributor-added",
  "media-distributor-removed", detail ``{"tunnel": ...}``) only when the list
  changes.  ``active_media_distributors()`` is the union of the lists of the
  conferences not ended: where a KD must keep a tunnel.
- ``set_roster`` keeps the roster of the newest epoch only: a roster of an
  older epoch than the one stored is ignored.  With it the KD reports whom it
  has admitted (identity and DTLS certificate fingerprint of every keyed
  association); ``admitted`` reads that back for the HTTPS key service.
- Invitations are idempotent: an audit event is added only when the invited
  set actually changes.
- Identities are stored in their normal form (ASCII lower case,
  :func:`~perc_daemons.protocol.identity.normalize_identity`): every
  identity argument goes through :func:`check_identity`, invited sets are
  normalised when read (data written before the rule matches too) and
  ``uninvite`` removes the identity in whatever case it was stored.
- A conference's policy (issue 14) is part of its record: the schedule
  (``starts_at``, ``ends_at``, ``early_start``, ``grace``), the periodic
  rekey (``rekey_interval``) and what a late joiner gets (``late_join``, one of
  :data:`LATE_JOIN_POLICIES`; ``late_joiners_get_earlier_epochs`` is its
  older boolean spelling: true unless "none").  ``update`` changes the
  policy or the title of a conference not ended and adds one "policy-changed" audit
  event with the changed fields (only when something changed).
- Only keys wrapped with the key-encryption key
  (:mod:`perc_daemons.kmf.kek`) are stored, and audit details never carry key
  material (:func:`check_audit_args` refuses detail members named like keys).
- The audit trail is hash-chained per conference
  (:mod:`perc_daemons.protocol.audit`): every record a store adds, in the
  same transaction as the change it records, continues the chain;
  ``audit_trail`` reads the records and the KMF's signed checkpoints
  (``add_audit_checkpoint``) in stored order.  ``append_audit`` adds what
  the KMF itself records (KD reports, keys delivered, policy changes), also
  after the conference has ended (the KD reports the leaves the end
  caused).  ``delete_audit_trail`` (retention) replaces an ended
  conference's trail by one ``trail-deleted`` record that continues the
  chain; ``expired_trails`` lists the ended conferences whose "ended"
  record is older than a time.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from perc_daemons.protocol.audit import canonical_json
from perc_daemons.protocol.identity import normalize_identity
from perc_daemons.protocol.tunnel_address import check_tunnel_address

__all__ = [
    "AUDIT_KINDS",
    "DEFAULT_EARLY_START",
    "DEFAULT_GRACE",
    "DEFAULT_REKEY_INTERVAL",
    "LATE_JOIN_POLICIES",
    "POLICY_FIELDS",
    "TRANSITIONS",
    "AuditEvent",
    "Conference",
    "ConferenceEnded",
    "ConferenceExists",
    "ConferenceNotFound",
    "ConferenceState",
    "EpochKey",
    "InvalidTransition",
    "ReportedAudit",
    "StoreError",
    "StoreUnavailable",
    "check_admitted",
    "check_audit_args",
    "check_conference_id",
    "check_identity",
    "schedule_status",
]


class ConferenceState(StrEnum):
    SCHEDULED = "scheduled"
    RUNNING = "running"
    ENDED = "ended"


#: Which states each state may move to (staying put is always a no-op).
TRANSITIONS: dict[ConferenceState, frozenset[ConferenceState]] = {
    ConferenceState.SCHEDULED: frozenset({ConferenceState.RUNNING, ConferenceState.ENDED}),
    ConferenceState.RUNNING: frozenset({ConferenceState.ENDED}),
    ConferenceState.ENDED: frozenset(),
}

#: The kinds of :class:`AuditEvent`.
#: The store's own: created, invited, uninvited, state, epoch, ended,
#: media-distributor-*; the KMF's: key-delivered, policy-changed; the KD's reports:
#: admitted, refused, left, epoch-started; retention: trail-deleted.
AUDIT_KINDS = frozenset({"created", "invited", "uninvited", "state", "epoch", "admitted", "ended",
                         "media-distributor-added", "media-distributor-removed",
                         "key-delivered", "policy-changed", "refused", "left", "epoch-started",
                         "trail-deleted"})
#: Detail members that would hold key material: refused at any depth.
KEY_LIKE = frozenset({"key", "keys", "ekt_key", "master_key", "master_salt", "salt", "secret",
                      "wrapped_key", "keying_material", "private_key"})
MAX_AUDIT_DETAIL = 16384

#: What an endpoint admitted after the conference's first epoch may decrypt
#: (seed draft-westerlund section 4.8): "none" -- nothing from before it joined
#: (its join starts a new epoch), "current" -- the epoch current when it joins
#: (no new epoch on join), "history" -- also every earlier epoch of this
#: conference, over the KMF's HTTPS key route (a recording becomes readable).
LATE_JOIN_POLICIES = ("none", "current", "history")
#: Seconds before ``starts_at`` from which endpoints are admitted and keys served.
DEFAULT_EARLY_START = 300.0
#: Seconds after ``ends_at`` at which the conference ends by itself.
DEFAULT_GRACE = 0.0
#: Seconds between two timed epochs (0: only membership changes start epochs).
DEFAULT_REKEY_INTERVAL = 0.0
#: The longest early start, grace or rekey interval: one day.
MAX_POLICY_SECONDS = 86400.0
#: The fields :meth:`IConferenceStore.update` may change.
POLICY_FIELDS = ("title", "starts_at", "ends_at", "early_start", "grace", "rekey_interval",
                 "late_join")

CONFERENCE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
IDENTITY = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
)
MAX_TITLE = 200
MAX_IDENTITY = 254
MAX_GROUP = 512


class StoreError(Exception):
    """Base class of the conference store's errors."""


class ConferenceExists(StoreError):
    """A conference with that id already exists."""


class ConferenceNotFound(StoreError):
    """No conference has that id."""


class ConferenceEnded(StoreError):
    """The conference has ended: nothing can be added to it any more."""


class InvalidTransition(StoreError):
    """A state change the rules forbid (see :data:`TRANSITIONS`)."""

    def __init__(self, conference_id: str, current: str, requested: str) -> None:
        self.conference_id = conference_id
        self.current = current
        self.requested = requested
        super().__init__(f"conference {conference_id!r}: cannot go from {current} to {requested}")


class StoreUnavailable(StoreError):
    """The database cannot be reached or used (connection, authentication, disk...).

    ``cause`` is the underlying exception (also chained as ``__cause__``).
    """

    def __init__(self, message: str, cause: BaseException | None = None) -> None:
        self.cause = cause
        super().__init__(message if cause is None else f"{message}: {cause}")
        self.__cause__ = cause


def check_conference_id(conference_id: object) -> str:
    """Return ``conference_id`` if it is a valid id, raise ValueError otherwise."""
    if not isinstance(conference_id, str) or not CONFERENCE_ID.fullmatch(conference_id):
        raise ValueError(
            f"conference id must be 1-64 characters of A-Z a-z 0-9 . _ -: {conference_id!r}"
        )
    return conference_id


def check_identity(identity: object) -> str:
    """The normal form of ``identity`` if it looks like "user@domain", else ValueError.

    The normal form (ASCII lower case) is :func:`normalize_identity`'s.
    """
    if (
        not isinstance(identity, str)
        or len(identity) > MAX_IDENTITY
        or not IDENTITY.fullmatch(identity)
    ):
        raise ValueError(f"identity must look like user@domain: {identity!r}")
    return normalize_identity(identity)


def _check_group(group: object) -> str:
    if (
        not isinstance(group, str)
        or not group
        or len(group) > MAX_GROUP
        or any(ord(c) < 0x20 or ord(c) == 0x7F for c in group)
    ):
        raise ValueError(f"LDAP group must be a non-empty printable string: {group!r}")
    return group


def _check_time(name: str, value: object, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of seconds: {value!r}")
    return float(value)


def _check_seconds(name: str, value: object) -> float:
    """A policy duration: a finite number of seconds, 0 to :data:`MAX_POLICY_SECONDS`."""
    seconds = _check_time(name, value)
    assert seconds is not None
    if not 0 <= seconds <= MAX_POLICY_SECONDS:
        raise ValueError(f"{name} must be 0-{MAX_POLICY_SECONDS:.0f} seconds: {value!r}")
    return seconds


def check_late_join(value: object) -> str:
    """``value`` if it is one of :data:`LATE_JOIN_POLICIES`, else ValueError."""
    if value not in LATE_JOIN_POLICIES:
        raise ValueError(f"late_join must be one of {', '.join(LATE_JOIN_POLICIES)}: "
                         f"{value!r}")
    return value  # type: ignore[return-value]


@dataclass(frozen=True)
class Conference:
    """A conference as the KMF knows it, with its policy (issue 14).

    ``invited`` holds identities ("user@domain"), ``invited_groups`` LDAP
    groups whose members are invited too.  ``media_distributors`` holds the
    tunnel addresses ("host:port", canonical form) of the Media Distributors
    serving it.

    Policy: nobody is admitted and no key is served before ``starts_at -
    early_start``; the conference ends by itself at ``ends_at + grace`` (no
    ``starts_at``/``ends_at``: no such bound).  ``rekey_interval`` seconds
    (0: off) is how often the KD starts an epoch although nobody joined or
    left.  ``late_join`` is one of :data:`LATE_JOIN_POLICIES`;
    ``late_joiners_get_earlier_epochs`` is its boolean spelling (true unless
    "none"): give either, the other follows (both: they must agree).
    """

    conference_id: str
    title: str
    initiator: str
    state: ConferenceState = ConferenceState.SCHEDULED
    invited: frozenset[str] = frozenset()
    invited_groups: frozenset[str] = frozenset()
    starts_at: float | None = None
    ends_at: float | None = None
    late_joiners_get_earlier_epochs: bool | None = None
    created_at: float = 0.0
    media_distributors: frozenset[str] = frozenset()
    early_start: float = DEFAULT_EARLY_START
    grace: float = DEFAULT_GRACE
    rekey_interval: float = DEFAULT_REKEY_INTERVAL
    late_join: str | None = None

    def __post_init__(self) -> None:
        check_conference_id(self.conference_id)
        if not isinstance(self.title, str) or len(self.title) > MAX_TITLE:
            raise ValueError(f"title must be a string of at most {MAX_TITLE} characters")
        object.__setattr__(self, "initiator", check_identity(self.initiator))
        object.__setattr__(self, "state", ConferenceState(self.state))
        if isinstance(self.invited, str) or isinstance(self.invited_groups, str):
            raise ValueError("invited and invited_groups must be collections, not strings")
        object.__setattr__(self, "invited", frozenset(map(check_identity, self.invited)))
        object.__setattr__(
            self, "invited_groups", frozenset(map(_check_group, self.invited_groups))
        )
        starts = _check_time("starts_at", self.starts_at, optional=True)
        ends = _check_time("ends_at", self.ends_at, optional=True)
        if starts is not None and ends is not None and ends < starts:
            raise ValueError("ends_at is before starts_at")
        object.__setattr__(self, "starts_at", starts)
        object.__setattr__(self, "ends_at", ends)
        flag = self.late_joiners_get_earlier_epochs
        if flag is not None and not isinstance(flag, bool):
            raise ValueError("late_joiners_get_earlier_epochs must be a bool")
        if self.late_join is None:
            late_join = "current" if flag else "none"
        else:
            late_join = check_late_join(self.late_join)
            if flag is not None and flag != (late_join != "none"):
                raise ValueError(f"late_joiners_get_earlier_epochs={flag} contradicts "
                                 f"late_join={late_join!r}")
        object.__setattr__(self, "late_join", late_join)
        object.__setattr__(self, "late_joiners_get_earlier_epochs", late_join != "none")
        for name in ("early_start", "grace", "rekey_interval"):
            object.__setattr__(self, name, _check_seconds(name, getattr(self, name)))
        object.__setattr__(self, "created_at", _check_time("created_at", self.created_at))
        if isinstance(self.media_distributors, str):
            raise ValueError("media_distributors must be a collection, not a string")
        object.__setattr__(self, "media_distributors",
                           frozenset(map(check_tunnel_address, self.media_distributors)))


@dataclass(frozen=True)
class EpochKey:
    """One EKT key epoch of a conference; ``wrapped_key`` is wrapped with the KEK."""

    conference_id: str
    epoch: int
    spi: int
    wrapped_key: bytes
    created_at: float

    def __repr__(self) -> str:
        return (
            f"EpochKey(conference_id={self.conference_id!r}, epoch={self.epoch}, "
            f"spi={self.spi}, wrapped_key=<{len(self.wrapped_key)} bytes>, "
            f"created_at={self.created_at!r})"
        )


@dataclass(frozen=True)
class AuditEvent:
    """One entry of a conference's audit trail.

    ``kind`` is one of :data:`AUDIT_KINDS`; ``detail`` is JSON data such as
    ``{"epoch": 3, "spi": 7}`` or ``{"ssrcs": [...], "epoch": 2}``, never key
    material.
    """

    conference_id: str
    time: float
    kind: str
    identity: str | None
    detail: dict[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class ReportedAudit:
    """Validated arguments of :meth:`IConferenceStore.append_audit`."""

    conference_id: str
    kind: str
    identity: str | None
    detail: dict[str, Any]
    now: float
    report_id: str | None = None


#: A KD's name of a reported event (``append_audit(report_id=)``, docs/API.md).
REPORT_ID = re.compile(r"[A-Za-z0-9_.:-]{1,80}")


def _key_like(value: Any, depth: int = 0) -> str | None:
    if depth > 8:
        return "(too deep)"
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str) or k.lower() in KEY_LIKE:
                return str(k)
            found = _key_like(v, depth + 1)
            if found is not None:
                return found
    elif isinstance(value, list):
        for v in value:
            found = _key_like(v, depth + 1)
            if found is not None:
                return found
    return None


def check_audit_args(conference_id: object, kind: object, identity: object, detail: object,
                     now: object, report_id: object = None) -> ReportedAudit:
    """Validate :meth:`IConferenceStore.append_audit` arguments (ValueError otherwise)."""
    cid = check_conference_id(conference_id)
    if report_id is not None and (not isinstance(report_id, str)
                                  or not REPORT_ID.fullmatch(report_id)):
        raise ValueError("report_id must be 1-80 characters of A-Z a-z 0-9 _ . : -")
    if kind not in AUDIT_KINDS:
        raise ValueError(f"unknown audit kind: {kind!r}")
    who = None if identity is None else check_identity(identity)
    if not isinstance(detail, dict):
        raise ValueError("audit detail must be a JSON object")
    found = _key_like(detail)
    if found is not None:
        raise ValueError(f"audit detail member {found!r} is not allowed (key material?)")
    try:
        text = canonical_json(detail)
    except (TypeError, ValueError, RecursionError) as e:
        raise ValueError(f"audit detail is not JSON data: {e}") from None
    if len(text) > MAX_AUDIT_DETAIL:
        raise ValueError(f"audit detail longer than {MAX_AUDIT_DETAIL} characters")
    return ReportedAudit(cid, str(kind), who, json.loads(text), check_now(now),
                         None if report_id is None else str(report_id))


def trail_deleted_detail(first_seq: int, last_seq: int, last_hash: str, records: int,
                         ended_at: float, retention: float) -> dict[str, Any]:
    """The detail of the ``trail-deleted`` record that replaces a trail (retention)."""
    return {"first_seq": first_seq, "last_seq": last_seq, "last_hash": last_hash,
            "records": records, "ended_at": float(ended_at), "retention": float(retention)}


def check_epoch_args(spi: object, wrapped_key: object, now: object) -> tuple[int, bytes, float]:
    """Validate :meth:`IConferenceStore.add_epoch` arguments (shared by the stores)."""
    if isinstance(spi, bool) or not isinstance(spi, int) or not 0 <= spi <= 0xFFFF:
        raise ValueError(f"spi must be an integer 0-65535: {spi!r}")
    if not isinstance(wrapped_key, bytes | bytearray) or not wrapped_key:
        raise ValueError("wrapped_key must be non-empty bytes")
    return spi, bytes(wrapped_key), _check_time("now", now)  # type: ignore[return-value]


def check_admission_args(
    identity: object, ssrcs: object, epoch: object, now: object
) -> tuple[str, list[int], int, float]:
    """Validate :meth:`IConferenceStore.record_admission` arguments."""
    identity = check_identity(identity)
    if isinstance(ssrcs, str | bytes) or not hasattr(ssrcs, "__iter__"):
        raise ValueError("ssrcs must be a collection of integers")
    out = []
    for s in ssrcs:  # type: ignore[attr-defined]
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= 0xFFFFFFFF:
            raise ValueError(f"SSRC must be a 32-bit unsigned integer: {s!r}")
        out.append(s)
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be a non-negative integer: {epoch!r}")
    return identity, out, epoch, _check_time("now", now)  # type: ignore[return-value]


def check_roster_args(epoch: object, signed_roster: object) -> tuple[int, str]:
    """Validate :meth:`IConferenceStore.set_roster` arguments."""
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be a non-negative integer: {epoch!r}")
    if not isinstance(signed_roster, str) or not signed_roster:
        raise ValueError("signed_roster must be a non-empty string (a compact JWS)")
    return epoch, signed_roster


def check_admitted(admitted: object) -> frozenset[tuple[str, bytes]]:
    """Validate :meth:`IConferenceStore.set_roster`'s ``admitted``: (identity, SHA-256
    certificate fingerprint) pairs."""
    if isinstance(admitted, str | bytes) or not hasattr(admitted, "__iter__"):
        raise ValueError("admitted must be a collection of (identity, fingerprint) pairs")
    out = set()
    for item in admitted:  # type: ignore[attr-defined]
        if not isinstance(item, tuple) or len(item) != 2:
            raise ValueError("admitted must be a collection of (identity, fingerprint) pairs")
        identity, fingerprint = item
        check_identity(identity)
        if not isinstance(fingerprint, bytes) or len(fingerprint) != 32:
            raise ValueError("an admitted fingerprint is a SHA-256 digest (32 bytes)")
        out.add((identity, fingerprint))
    return frozenset(out)


def admitted_json(admitted: frozenset[tuple[str, bytes]]) -> str:
    """The stored form of an admitted set: JSON [[identity, hex fingerprint], ...]."""
    return json.dumps(sorted([i, f.hex()] for i, f in admitted), separators=(",", ":"))


def admitted_set(stored: str | None) -> frozenset[tuple[str, bytes]]:
    """The admitted set of its stored form (:func:`admitted_json`)."""
    if not stored:
        return frozenset()
    return frozenset((i, bytes.fromhex(f)) for i, f in json.loads(stored))


def check_now(now: object) -> float:
    return _check_time("now", now)  # type: ignore[return-value]


def check_media_distributor_args(conference_id: object, tunnel: object,
                                 now: object) -> tuple[str, str, float]:
    """Validate :meth:`IConferenceStore.add_media_distributor` arguments: the tunnel
    address comes back in canonical form."""
    return check_conference_id(conference_id), check_tunnel_address(tunnel), check_now(now)


def policy_json(c: Conference) -> dict[str, Any]:
    """The policy fields of ``c`` (:data:`POLICY_FIELDS`) as JSON data."""
    return {name: getattr(c, name) for name in POLICY_FIELDS}


def schedule_status(c: Conference, now: float) -> str:
    """Where ``now`` falls in ``c``'s schedule: "not_started" (before ``starts_at -
    early_start``), "over" (at or after ``ends_at + grace``) or "open"."""
    if c.starts_at is not None and now < c.starts_at - c.early_start:
        return "not_started"
    if c.ends_at is not None and now >= c.ends_at + c.grace:
        return "over"
    return "open"


def ends_by_schedule_at(c: Conference) -> float | None:
    """When ``c`` ends by itself (``ends_at + grace``), None without ``ends_at``."""
    return None if c.ends_at is None else c.ends_at + c.grace


def check_update(current: Conference, changes: object) -> tuple[Conference, dict[str, Any]]:
    """``current`` with ``changes`` (a mapping of :data:`POLICY_FIELDS`) applied, checked
    as a new Conference, and the fields that actually changed.  ValueError otherwise."""
    if not isinstance(changes, dict):
        raise ValueError("changes must be a mapping of policy fields")
    unknown = set(changes) - set(POLICY_FIELDS)
    if unknown:
        raise ValueError("not a policy field: " + ", ".join(sorted(unknown)))
    updated = replace(current, late_joiners_get_earlier_epochs=None, **changes)
    changed = {name: getattr(updated, name) for name in POLICY_FIELDS
               if getattr(updated, name) != getattr(current, name)}
    return updated, changed


def policy_changed_detail(changed: dict[str, Any], by: str | None) -> tuple[str | None,
                                                                           dict[str, Any]]:
    """``(identity, detail)`` of a "policy-changed" record: ``changes`` (each field that
    changed, its new value) and ``by`` (who changed it: the admin token's subject, a
    user identity or an OAuth client id; absent if unknown).  The record's identity is
    ``by`` when it is a user's identity."""
    detail: dict[str, Any] = {"changes": dict(changed)}
    identity = None
    if by is not None:
        if not isinstance(by, str) or not 0 < len(by) <= 255:
            raise ValueError("by must be a token subject (1-255 characters)")
        detail["by"] = by
        try:
            identity = check_identity(by)
        except ValueError:
            identity = None
    return identity, detail


def created_detail(c: Conference) -> dict[str, Any]:
    """The detail of a conference's "created" audit event."""
    return {
        "title": c.title,
        "state": str(c.state),
        "invited": sorted(c.invited),
        "invited_groups": sorted(c.invited_groups),
        "starts_at": c.starts_at,
        "ends_at": c.ends_at,
        "late_joiners_get_earlier_epochs": c.late_joiners_get_earlier_epochs,
        "media_distributors": sorted(c.media_distributors),
        **policy_json(c),
    }
