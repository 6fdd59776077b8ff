"""The KMF's audit trail: what it records, checkpoints, the KD's reports, retention.

Issue 14, "Audit trail".  The records and their hash chain are
:mod:`perc_daemons.protocol.audit`'s; the stores chain every record they add
(created, invited, uninvited, state, epoch, ended, media-distributor-*, and
``policy-changed`` in the transaction of the change, with the token subject
that made it).  :class:`AuditLog` adds what only the KMF's routes see
(``key-delivered``: an EKT key served over HTTPS with the Encryption-Key
header) and what the KD reports (:data:`KD_KINDS`), signs a
checkpoint (JWS with the KMF's JWKS keys) every ``checkpoint_every``
records and whenever a conference ends, and deletes the trails of
conferences ended more than ``retention`` seconds ago, leaving a signed
``trail-deleted`` record.

KD reports (``POST /v1/conferences/{id}/audit``, scope ``kd``) are
``{"events": [{"id", "time", "kind", "identity", "detail"}, ...]}``; each
kind's detail is checked by :func:`check_report`.  ``id`` is the KD's
unique name of the event, kept by the store beside the record: an event
the KD sends again (its answer was lost, the KMF restarted, another KMF of
the same store got it, in another batch) is recorded once.  ``time`` is the KD's clock, kept as
``detail.reported_at``; the record's own time is the KMF's.

Nothing here carries key material: details name epochs, SPIs, fingerprints
of certificates and association ids, never a key (the store refuses
members named like keys).

Not done here: the routes' HTTP plumbing (:mod:`perc_daemons.kmf.api`) and
the verification (:func:`perc_daemons.protocol.audit.verify_trail`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

from perc_daemons.protocol.audit import AuditRecord, sign_checkpoint
from perc_daemons.store import REPORT_ID, ConferenceNotFound, check_identity

__all__ = ["CAUSES", "KD_KINDS", "LEAVE_REASONS", "AuditLog", "ReportError", "check_report"]

#: What the KD reports.
KD_KINDS = frozenset({"admitted", "refused", "left", "epoch-started"})
#: Why an epoch started: a member joined (rekey on join), left (or was removed),
#: the conference's rekey interval elapsed, or someone asked (an epoch the KD did not
#: start, e.g. ``POST /epochs`` by an admin, installed from the KMF's event).
CAUSES = ("join", "leave", "timer", "manual")
#: Documented leave reasons (any slug is accepted, these are the KD's).
LEAVE_REASONS = ("close_notify", "consent_timeout", "md_leave", "conference_deleted",
                 "md_disconnect", "uninvited", "conference_ended", "peer_alert", "timeout",
                 "dtls_error")
MAX_REPORTS = 500
DEFAULT_CHECKPOINT_EVERY = 32
_SLUG = re.compile(r"[a-z0-9_]{1,64}")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TEXT = 200

log = Logger()


class ReportError(ValueError):
    """A KD report that is not one of the documented shapes (400)."""


def _hex(value: object, pattern: re.Pattern[str], name: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ReportError(f"{name} must be lower-case hex ({pattern.pattern})")
    return value


def _int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**53:
        raise ReportError(f"{name} must be a non-negative integer")
    return value


def _slug(value: object, name: str) -> str:
    if not isinstance(value, str) or not _SLUG.fullmatch(value):
        raise ReportError(f"{name} must be a slug ([a-z0-9_]{{1,64}})")
    return value


def _text(value: object, name: str) -> str:
    if not isinstance(value, str) or len(value) > _TEXT:
        raise ReportError(f"{name} must be a string of at most {_TEXT} characters")
    return value


def _identity(value: object) -> str:
    try:
        return check_identity(value)
    except ValueError as e:
        raise ReportError(str(e)) from None


def _only(detail: dict[str, Any], allowed: set[str], kind: str) -> None:
    unknown = set(detail) - allowed
    if unknown:
        raise ReportError(f"{kind}: unknown detail member(s): {', '.join(sorted(unknown))}")


def check_report(event: object) -> tuple[str, str, str | None, dict[str, Any], float]:
    """``(id, kind, identity, detail, reported_at)`` of one KD report, or ReportError.

    * ``admitted``: identity; ``association`` (32 hex), ``fingerprint`` (SHA-256 of
      the DTLS certificate, 64 hex), ``md`` (tunnel address or name), ``epoch``
      (of the first key it got), optional ``ssrcs``.
    * ``refused``: identity if known; ``reason`` (slug, e.g. ``not_invited``,
      ``dtls_wrong_certificate``), optional ``association``, ``fingerprint``,
      ``md``, ``text`` (a sentence).
    * ``left``: identity; ``reason`` (slug, :data:`LEAVE_REASONS`),
      ``association``, optional ``md``.
    * ``epoch-started``: ``epoch``, ``cause`` (:data:`CAUSES`), ``causes`` (all
      that were due, coalesced), ``members`` ([{identity, association}]: who got
      its key).
    """
    if not isinstance(event, dict):
        raise ReportError("each event is a JSON object")
    _only(event, {"id", "time", "kind", "identity", "detail"}, "event")
    report_id = event.get("id")
    if not isinstance(report_id, str) or not REPORT_ID.fullmatch(report_id):
        raise ReportError("id must be 1-80 characters of A-Z a-z 0-9 _ . : -")
    when = event.get("time")
    if isinstance(when, bool) or not isinstance(when, int | float) or not 0 <= when < 1e11:
        raise ReportError("time must be seconds since the epoch")
    kind = event.get("kind")
    if kind not in KD_KINDS:
        raise ReportError(f"kind must be one of {', '.join(sorted(KD_KINDS))}")
    raw = event.get("detail", {})
    if not isinstance(raw, dict):
        raise ReportError("detail must be a JSON object")
    who = event.get("identity")
    identity = None if who is None else _identity(who)
    detail: dict[str, Any] = {}
    if kind == "admitted":
        _only(raw, {"association", "fingerprint", "md", "epoch", "ssrcs"}, kind)
        if identity is None:
            raise ReportError("admitted: identity is required")
        detail = {"association": _hex(raw.get("association"), _HEX32, "association"),
                  "fingerprint": _hex(raw.get("fingerprint"), _HEX64, "fingerprint"),
                  "md": _text(raw.get("md", ""), "md"),
                  "epoch": _int(raw.get("epoch"), "epoch")}
        ssrcs = raw.get("ssrcs", [])
        if not isinstance(ssrcs, list) or len(ssrcs) > 64:
            raise ReportError("ssrcs must be a list of at most 64")
        detail["ssrcs"] = [_int(s, "ssrc") for s in ssrcs]
    elif kind == "refused":
        _only(raw, {"reason", "association", "fingerprint", "md", "text"}, kind)
        detail = {"reason": _slug(raw.get("reason"), "reason")}
        if "association" in raw:
            detail["association"] = _hex(raw["association"], _HEX32, "association")
        if "fingerprint" in raw:
            detail["fingerprint"] = _hex(raw["fingerprint"], _HEX64, "fingerprint")
        for name in ("md", "text"):
            if name in raw:
                detail[name] = _text(raw[name], name)
    elif kind == "left":
        _only(raw, {"reason", "association", "md"}, kind)
        if identity is None:
            raise ReportError("left: identity is required")
        detail = {"reason": _slug(raw.get("reason"), "reason"),
                  "association": _hex(raw.get("association"), _HEX32, "association")}
        if "md" in raw:
            detail["md"] = _text(raw["md"], "md")
    else:  # epoch-started
        _only(raw, {"epoch", "cause", "causes", "members"}, kind)
        cause = raw.get("cause")
        causes = raw.get("causes", [cause])
        if cause not in CAUSES or not isinstance(causes, list) or not causes or any(
                c not in CAUSES for c in causes):
            raise ReportError(f"cause and causes must be of {', '.join(CAUSES)}")
        members = raw.get("members")
        if not isinstance(members, list) or len(members) > 10_000:
            raise ReportError("members must be a list of at most 10000")
        listed = []
        for m in members:
            if not isinstance(m, dict) or set(m) != {"identity", "association"}:
                raise ReportError('each member is {"identity": ..., "association": ...}')
            listed.append({"identity": _identity(m["identity"]),
                           "association": _hex(m["association"], _HEX32, "association")})
        detail = {"epoch": _int(raw.get("epoch"), "epoch"), "cause": cause,
                  "causes": sorted(set(causes), key=CAUSES.index), "members": listed}
    detail["reported_at"] = float(when)
    return report_id, str(kind), identity, detail, float(when)


class AuditLog:
    """Records the KMF's own events, signs checkpoints, applies retention.

    ``store`` is the conference store, ``keys`` the KMF's SigningKeys,
    ``clock`` gives ``seconds()``.  ``retention`` 0 keeps trails forever.
    """

    def __init__(self, store: Any, keys: Any, *, issuer: str, clock: Any,
                 checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
                 retention: float = 0.0,
                 on_record: Callable[[AuditRecord], None] | None = None) -> None:
        if checkpoint_every < 1:
            raise ValueError("checkpoint_every must be at least 1")
        self.store = store
        self.keys = keys
        self.issuer = issuer
        self.clock = clock
        self.checkpoint_every = checkpoint_every
        self.retention = float(retention)
        self.on_record = on_record

    async def record(self, conference_id: str, kind: str, identity: str | None,
                     detail: dict[str, Any]) -> AuditRecord:
        """Chain one record of the KMF's own (``key-delivered``)."""
        record = await self.store.append_audit(conference_id, kind, identity, detail,
                                               self.clock.seconds())
        assert record is not None  # no report id: always added
        if self.on_record is not None:
            self.on_record(record)
        await self.checkpoint(conference_id)
        return record

    async def key_delivered(self, conference_id: str, *, identity: str, epoch: int, spi: int,
                            recipient: str, certificate: str | None) -> AuditRecord:
        """An EKT key served over HTTPS (Encryption-Key): to whom, which epoch; no key."""
        detail: dict[str, Any] = {"epoch": epoch, "spi": spi, "recipient": recipient}
        if certificate is not None:
            detail["certificate"] = certificate  # the token's x5t#S256 binding
        try:
            who: str | None = check_identity(identity)
        except ValueError:
            who, detail["client"] = None, identity[:_TEXT]
        return await self.record(conference_id, "key-delivered", who, detail)

    async def report(self, conference_id: str, events: list[Any]) -> tuple[int, int]:
        """Record a KD's batch; ``(recorded, duplicates)``.  ReportError for any bad
        event (nothing of the batch is recorded then)."""
        if not isinstance(events, list) or len(events) > MAX_REPORTS:
            raise ReportError(f"events must be a list of at most {MAX_REPORTS}")
        checked = [check_report(e) for e in events]
        recorded = duplicates = 0
        for report_id, kind, identity, detail, _ in checked:
            record = await self.store.append_audit(conference_id, kind, identity, detail,
                                                   self.clock.seconds(), report_id=report_id)
            if record is None:  # the store has this event already
                duplicates += 1
                continue
            recorded += 1
            if self.on_record is not None:
                self.on_record(record)
        if recorded:
            # after the end nothing else will come: sign what the KD reported then
            conference = await self.store.get(conference_id)
            await self.checkpoint(conference_id, force=str(conference.state) == "ended")
        return recorded, duplicates

    async def checkpoint(self, conference_id: str, *, force: bool = False) -> bool:
        """Sign the conference's newest record if ``checkpoint_every`` records (or, with
        ``force``, any) came after the last checkpoint.  True if one was added."""
        last, mark = await self.store.audit_tail(conference_id)
        if last is None or last.seq <= mark:
            return False
        if not force and last.seq - mark < self.checkpoint_every and last.kind != "ended":
            return False
        checkpoint = sign_checkpoint(self.keys, issuer=self.issuer, record=last,
                                     now=self.clock.seconds())
        await self.store.add_audit_checkpoint(checkpoint)
        return True

    async def sweep(self) -> int:
        """Delete the trails of conferences ended more than ``retention`` seconds ago
        (0: never); each leaves a signed ``trail-deleted`` record.  Returns how many."""
        if self.retention <= 0:
            return 0
        now = self.clock.seconds()
        deleted = 0
        for cid in await self.store.expired_trails(now - self.retention):
            try:
                record = await self.store.delete_audit_trail(cid, self.retention, now)
            except ConferenceNotFound:
                continue
            if record is None:
                continue
            await self.checkpoint(cid, force=True)
            log.info("audit trail of {conference} deleted ({records} records; retention "
                     "{retention:.0f} s)", conference=cid,
                     records=record.detail.get("records"), retention=self.retention)
            deleted += 1
        return deleted
