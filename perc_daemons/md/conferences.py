"""The MD's conferences and participants, and its end of the KD tunnels (ITunnelHandler).

What the Media Distributor knows of a conference is what it needs to forward
(RFC 8871 section 4, semi-trusted MD): the conference id, the SHA-256
fingerprint of the KD certificate the conference provider named for it, and
per participant an association id (RFC 9185 section 6.1), the ICE
credentials of its leg and a leave token.  It never sees an identity, an
inner (end-to-end) key or an EKT key.

Join (draft-roach-perc-webrtc flow, DESIGN.md "Join flow" steps 3-4):

1. the offer is parsed (:func:`~perc_daemons.protocol.sdp.parse`) and the MD
   drafts the answer (:func:`~perc_daemons.protocol.sdp.make_answer`): the
   conference's KD fingerprint, a random placeholder tls-id (the KD puts its
   own), fresh ICE credentials and one host candidate on the shared media
   port;
2. ``SignAnswer(aid, conference id, offer verbatim, draft)`` goes to the conference's KD
   over its tunnel (the peer whose certificate fingerprint is the
   conference's), and the join waits for the ``SignAnswerAck`` of that
   association id from that same peer, at most ``join_timeout`` seconds;
3. on OK the MD checks the signed answer (:func:`~perc_daemons.protocol.answer.
   verify_pinned_answer`: signed by the conference's pinned KD certificate,
   for this offer, this association and *this conference*, so that an
   identity admitted to another conference never joins this one's media
   group), then adds the leg to the media plane (group = conference id) and
   returns the KD's text verbatim.

Tunnel messages (RFC 9185 section 6): ``MediaKeys`` key the leg (outer
halves of a DOUBLE profile only; anything else is refused and the
association ended), ``TunneledDtls`` goes to the endpoint through the media
plane, ``EndpointDisconnect`` ends the participant, and ``ConferenceEnded``
(our private 0xF5, docs/PROTOCOL.md) ends the conference exactly as the
provider's ``DELETE /v1/conferences/{id}`` does (:meth:`MdConferences.delete`).
Every message must come from the KD of the association's conference: a KD
trusted for another conference cannot key, reach or end this one's
participants, nor end the conference.  The KD that ends a conference tells
every MD it has a tunnel to (it does not know which host it), so a
ConferenceEnded for a conference this MD does not have is ignored quietly;
one from another conference's KD is ignored, counted (``end_wrong_kd``) and
logged, rate-limited.  The conference's KD is the one whose fingerprint the
conference was created with, not any KD of ``[tunnel] kd_fingerprints``:
those may connect at any time, but are no more the KD of another KD's
conference than they are for its participants' messages.  DTLS from an
endpoint goes to its KD; consent expiry (RFC 7675), a leave and a conference
deletion send the KD ``EndpointDisconnect``, with the reason (our private
extension: consent_timeout, md_leave, conference_deleted; docs/PROTOCOL.md)
when that KD's tunnel announced it reads it.  A disconnect that cannot be
sent while the KD's tunnel is down is kept (bounded, without its reason) and
sent when it comes back, so the KD learns of every departure and rekeys (RFC 8871 section 6);
once no conference names that KD (and it is not pinned) it can no longer
connect, and its queue is dropped.  Nothing else of a participant outlives
it (see :meth:`~perc_daemons.md.plane.MediaPlane.remove_leg` for the one
exception, in the other legs' libsrtp sessions), and a leave of a participant
that is already gone is not an error.

When a tunnel goes down participants stay: the KD reconnects, and their legs
keep forwarding with the keys they have.  Joins waiting on that tunnel fail
(:class:`KdUnavailable`).  Whenever a KD's tunnel comes up, after the queued
disconnects, the MD sends it ``Associations`` (our private 0xF2, docs/PROTOCOL.md):
every admitted participant of the conferences that name that KD, split into
messages of at most :data:`~perc_daemons.protocol.tunnel.MAX_ASSOCIATIONS`
entries (one empty message when there are none).  A KD that restarted learns
from it which members it can no longer reach, starts an epoch without them
and reports a roster that omits them, so they rejoin.

Unexpected input is counted in :attr:`MdConferences.events` (names in
:data:`EVENTS`) and never logged per message; the one logged (a ConferenceEnded
from another conference's KD, an attempt to end a conference) is logged at
most once per :data:`~perc_daemons.listening.LOG_INTERVAL`.
"""

from __future__ import annotations

import base64
import dataclasses
import hmac
import secrets
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from perc_daemons.interfaces import ITunnelHandler, ITunnelPeer
from perc_daemons.listening import RateLimitedLog
from perc_daemons.md.plane import Leg, MediaPlane
from perc_daemons.protocol import sdp
from perc_daemons.protocol.answer import AnswerError, verify_pinned_answer
from perc_daemons.protocol.double import DOUBLE_PROFILES
from perc_daemons.protocol.dtls import format_fingerprint
from perc_daemons.protocol.extensions import AUDIO_LEVEL_URI
from perc_daemons.protocol.selection import Selection, SelectionPolicy, StreamPlan
from perc_daemons.protocol.tunnel import (
    DISCONNECT_CONFERENCE_DELETED,
    DISCONNECT_CONSENT_TIMEOUT,
    DISCONNECT_LEAVE,
    MAX_ASSOCIATIONS,
    REASONS_ANNOUNCEMENT,
    SIGN_STATUS_BAD_OFFER,
    SIGN_STATUS_OK,
    SIGN_STATUS_REFUSED,
    AssociationEntry,
    Associations,
    ConferenceEnded,
    EndpointDisconnect,
    MediaKeys,
    SignAnswer,
    SignAnswerAck,
    TunneledDtls,
    TunnelError,
    new_association_id,
)
from perc_daemons.store import check_conference_id

__all__ = [
    "EVENTS",
    "BadOffer",
    "Conference",
    "ConferenceConflict",
    "ConferenceError",
    "KdFailed",
    "KdRefused",
    "KdTimeout",
    "KdUnavailable",
    "LeaveRefused",
    "MdConferences",
    "Participant",
    "TooManyJoins",
    "UnknownConference",
    "UnknownParticipant",
]

#: Counted tunnel and plane events (``MdConferences.events``).
EVENTS = (
    "unknown_association",   # MediaKeys / TunneledDtls / EndpointDisconnect for no participant
    "wrong_kd",              # a message about an association from another conference's KD
    "keys_refused",          # MediaKeys with a non-DOUBLE profile or unusable keys
    "dtls_no_tunnel",        # endpoint DTLS while its KD's tunnel is down (dropped)
    "dtls_no_media",         # KD DTLS before the media port is up (dropped)
    "late_answer",           # SignAnswerAck after the join gave up (the KD is told to forget)
    "answer_refused",        # a signed answer not for this conference/association/offer
    "unexpected_message",    # a message the KD should not send (e.g. SignAnswer)
    "end_wrong_kd",          # ConferenceEnded from a KD that is not the conference's
    "disconnects_queued",    # EndpointDisconnect kept for a KD whose tunnel is down
    "disconnects_dropped",   # ... beyond MAX_QUEUED_DISCONNECTS
)

#: Joins waiting for a KD at once; beyond, joins answer 503 at once.
MAX_PENDING_JOINS = 1000
#: Disconnects kept per KD fingerprint while its tunnel is down.
MAX_QUEUED_DISCONNECTS = 10_000
_TLS_ID_PLACEHOLDER_BYTES = 24  # base64 -> 32 characters of [A-Za-z0-9+/]


# -- errors (the API maps each to an HTTP status) -----------------------------------


class ConferenceError(Exception):
    """Base of the refusals below; ``str()`` is a reason fit for a client."""


class UnknownConference(ConferenceError):
    """No conference with that id (404)."""


class UnknownParticipant(ConferenceError):
    pass


class ConferenceConflict(ConferenceError):
    """The conference exists with another KD fingerprint (409)."""


class LeaveRefused(ConferenceError):
    """The leave token does not match (403)."""


class BadOffer(ConferenceError):
    """The offer cannot be parsed or answered, or the KD said BAD_OFFER (400)."""


class KdUnavailable(ConferenceError):
    """No tunnel to the conference's KD, or it went down during the join (503)."""


class TooManyJoins(KdUnavailable):
    """:data:`MAX_PENDING_JOINS` joins are already waiting (503)."""


class KdRefused(ConferenceError):
    """The KD refused the participant; ``str()`` is its reason (403)."""


class KdTimeout(ConferenceError):
    """The KD did not answer within ``join_timeout`` (504)."""


class KdFailed(ConferenceError):
    """The KD answered with another status (502)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"the KD answered status {status}: {reason}" if reason
                         else f"the KD answered status {status}")
        self.status = status


# -- state --------------------------------------------------------------------------


@dataclass(eq=False)
class Participant:
    """One admitted endpoint: its association and leg (the plane's leg id is ``aid``)."""

    aid: bytes
    conference_id: str
    leave_token: str = field(repr=False)
    leg: Leg
    joined_at: float

    @property
    def association(self) -> str:
        return str(uuid.UUID(bytes=self.aid))

    @property
    def state(self) -> str:
        """``checking`` (no STUN check yet), ``connected`` (address known), ``keyed``."""
        if self.leg.inbound is not None:
            return "keyed"
        return "connected" if self.leg.address is not None else "checking"


#: How a conference forwards: ``sfu`` (a :class:`~perc_daemons.protocol.selection.Selection`:
#: last-N, simulcast layers, NACK/PLI at the MD, RTCP terminated per hop) or ``all``
#: (every packet to every receiver, RTCP relayed as it came).
FORWARDING = ("sfu", "all")


@dataclass(eq=False)
class Conference:
    conference_id: str
    kd_fingerprint: bytes
    created_at: float
    participants: dict[bytes, Participant] = field(default_factory=dict)
    forwarding: str = "sfu"
    policy: SelectionPolicy = field(default_factory=SelectionPolicy)


@dataclass(eq=False)
class _PendingJoin:
    conference_id: str
    peer: Any  # ITunnelPeer
    ufrag: str
    pwd: str = field(repr=False)
    waiter: defer.Deferred
    offer: str = field(repr=False)
    kd_fingerprint: bytes = field(repr=False)
    timer: IDelayedCall | None = None
    plan: StreamPlan | None = None
    receive: dict[str, int] | None = None


def _without_extension(answer: sdp.SessionDescription, uri: str) -> sdp.SessionDescription:
    """``answer`` without the ``a=extmap`` of ``uri`` (RFC 8285 s6: not negotiated, so
    the endpoint does not send it)."""
    media = tuple(dataclasses.replace(m, attributes=tuple(
        a for a in m.attributes
        if not (a.name == "extmap" and a.value is not None and uri in a.value.split()[1:2])))
        for m in answer.media)
    return dataclasses.replace(answer, media=media)


def _random_token(nbytes: int) -> str:
    """Random ``[A-Za-z0-9+/]`` text (ICE and tls-id safe)."""
    return base64.b64encode(secrets.token_bytes(nbytes)).decode("ascii").rstrip("=")


@implementer(ITunnelHandler)
class MdConferences:
    """Conference and participant state of one MD (see the module docstring).

    ``media`` is what sends DTLS to endpoints (a
    :class:`~perc_daemons.md.media.MediaPlaneProtocol`, set once it listens);
    ``media_host``/``media_port`` go into the answers' candidate.  The
    plane's ``on_dtls`` should be :meth:`dtls_from_endpoint` and the media
    protocol's ``on_expired`` :meth:`legs_expired`.
    """

    log = Logger()

    def __init__(self, plane: MediaPlane, clock: IReactorTime, *,
                 media_host: str, media_port: int = 0,
                 pinned_kd_fingerprints: Collection[bytes] = (),
                 join_timeout: float = 10.0) -> None:
        self.plane = plane
        self.clock = clock
        self.media_host = media_host
        self.media_port = media_port
        self.media: Any = None  # MediaPlaneProtocol
        self.pinned = frozenset(pinned_kd_fingerprints)
        self.join_timeout = join_timeout
        self.events = dict.fromkeys(EVENTS, 0)
        self._conferences: dict[str, Conference] = {}
        self._participants: dict[bytes, Participant] = {}
        self._kd_use: dict[bytes, int] = {}  # kd fingerprint -> conferences naming it
        self._peers: dict[bytes, Any] = {}  # kd fingerprint -> its registered ITunnelPeer
        self._pending: dict[bytes, _PendingJoin] = {}
        self._queued: dict[bytes, dict[bytes, None]] = {}  # kd fp -> aids to disconnect
        # kd fp -> its registered tunnel, once that KD announced it reads disconnect reasons
        self._reasons_read: dict[bytes, Any] = {}
        self._refusals_log = RateLimitedLog(self.log, clock)
        #: Called with the id of each conference deleted (by the provider or its KD).
        self.on_deleted: Callable[[str], None] | None = None
        #: Called after a conference was created or deleted (md/state.py saves then).
        self.on_changed: Callable[[], None] | None = None

    # -- queries ----------------------------------------------------------------------

    def is_trusted_kd(self, fingerprint: bytes) -> bool:
        """Whether a tunnel client with this certificate digest may connect."""
        return fingerprint in self.pinned or self._kd_use.get(fingerprint, 0) > 0

    def conference(self, conference_id: str) -> Conference:
        try:
            return self._conferences[conference_id]
        except KeyError:
            raise UnknownConference(f"no conference {conference_id!r}") from None

    def conferences(self) -> list[Conference]:
        return list(self._conferences.values())

    def participants(self) -> list[Participant]:
        return list(self._participants.values())

    def kd_connected(self, fingerprint: bytes) -> bool:
        return fingerprint in self._peers

    @property
    def pending_joins(self) -> int:
        return len(self._pending)

    @property
    def kd_tunnels(self) -> int:
        return len(self._peers)

    # -- conferences ------------------------------------------------------------------

    def create(self, conference_id: str, kd_fingerprint: bytes, *,
               created_at: float | None = None, forwarding: str = "sfu",
               policy: SelectionPolicy | None = None) -> tuple[Conference, bool]:
        """Add a conference; ``(conference, created)``.  Idempotent for the same KD.

        ``created_at`` is given when a restarted MD restores the conference
        (md/state.py).  ``forwarding`` (:data:`FORWARDING`) and ``policy``
        say how it forwards; an existing conference keeps its own.  Raises
        ValueError for a bad id, fingerprint or forwarding,
        :class:`ConferenceConflict` when the id exists with another KD.
        """
        check_conference_id(conference_id)
        if not isinstance(kd_fingerprint, bytes) or len(kd_fingerprint) != 32:
            raise ValueError("kd_fingerprint must be a SHA-256 digest")
        if forwarding not in FORWARDING:
            raise ValueError(f"forwarding must be one of {', '.join(FORWARDING)}")
        existing = self._conferences.get(conference_id)
        if existing is not None:
            if existing.kd_fingerprint != kd_fingerprint:
                raise ConferenceConflict(
                    f"conference {conference_id!r} exists with another KD fingerprint")
            return existing, False
        restored = created_at is not None
        conference = Conference(conference_id, kd_fingerprint,
                                created_at if restored else self.clock.seconds(),
                                forwarding=forwarding, policy=policy or SelectionPolicy())
        self._conferences[conference_id] = conference
        if forwarding == "sfu":
            self.plane.set_selection(conference_id, Selection(conference.policy))
        self._kd_use[kd_fingerprint] = self._kd_use.get(kd_fingerprint, 0) + 1
        self.log.info("perc-md: conference {conference} {how}, KD {kd}",
                      conference=conference_id, kd=format_fingerprint(kd_fingerprint),
                      how="restored" if restored else "created")
        if self.on_changed is not None:
            self.on_changed()
        return conference, True

    def delete(self, conference_id: str, *, by: str = "the provider") -> int:
        """End a conference: its KD is told of each participant; returns how many.

        The provider's ``DELETE`` and the KD's ``ConferenceEnded`` both end up
        here; ``by`` names who ended it, for the log.
        """
        conference = self.conference(conference_id)
        for aid, pending in list(self._pending.items()):
            if pending.conference_id == conference_id:
                self._fail_pending(aid, UnknownConference(
                    f"conference {conference_id!r} was deleted"))
        count = 0
        for aid in list(conference.participants):
            self._end(aid, tell_kd=True, reason=DISCONNECT_CONFERENCE_DELETED)
            count += 1
        del self._conferences[conference_id]
        self.plane.set_selection(conference_id, None)
        if self.on_deleted is not None:  # its cascade links (md/links.py)
            self.on_deleted(conference_id)
        fp = conference.kd_fingerprint
        self._kd_use[fp] -= 1
        if not self._kd_use[fp]:
            del self._kd_use[fp]
        self.log.info("perc-md: conference {conference} deleted by {by} ({count} "
                      "participants ended)", conference=conference_id, by=by, count=count)
        if self.on_changed is not None:
            self.on_changed()
        if not self.is_trusted_kd(fp):
            # It may not connect any more: its queued disconnects would wait forever (a
            # later conference naming it again gets them through Associations instead).
            self._queued.pop(fp, None)
            peer = self._peers.get(fp)
            if peer is not None:
                peer.close("no conference names this KD any more")
        return count

    # -- participants -----------------------------------------------------------------

    def join(self, conference_id: str, offer_text: str,
             receive: dict[str, int] | None = None) -> defer.Deferred:
        """Fires with ``(aid, signed answer text, leave token)``; fails with a ConferenceError.

        ``receive`` holds the receiver's wishes (``last_n``, ``max_height``,
        ``max_bitrate``: :meth:`~perc_daemons.protocol.selection.Selection.set_receive`).
        """
        try:
            return self._join(conference_id, offer_text, receive)
        except ConferenceError as e:
            return defer.fail(e)

    def _join(self, conference_id: str, offer_text: str,
              receive: dict[str, int] | None) -> defer.Deferred:
        conference = self.conference(conference_id)
        try:
            offer = sdp.parse(offer_text)
        except sdp.SdpError as e:
            raise BadOffer(f"the offer is not usable SDP: {e}") from None
        ufrag, pwd = _random_token(12), _random_token(24)
        candidate = f"1 1 udp 2130706431 {self.media_host} {self.media_port} typ host"
        try:
            draft = sdp.make_answer(offer, fingerprint=conference.kd_fingerprint,
                                    tls_id=_random_token(_TLS_ID_PLACEHOLDER_BYTES),
                                    ice_ufrag=ufrag, ice_pwd=pwd, candidates=[candidate])
        except sdp.SdpError as e:
            raise BadOffer(f"the offer cannot be answered: {e}") from None
        if not conference.policy.audio_levels:
            draft = _without_extension(draft, AUDIO_LEVEL_URI)
        plan = StreamPlan.from_offer(offer)
        if not conference.policy.audio_levels:
            plan = dataclasses.replace(plan, audio_level_id=None)
        peer = self._peers.get(conference.kd_fingerprint)
        if peer is None:
            raise KdUnavailable("the conference's KD is not connected")
        if len(self._pending) >= MAX_PENDING_JOINS:
            raise TooManyJoins("too many joins in progress")
        aid = new_association_id()
        try:
            message = SignAnswer(aid, conference_id, offer_text, draft.serialize())
        except TunnelError as e:
            raise BadOffer(f"the offer is too large: {e}") from None
        waiter: defer.Deferred = defer.Deferred()
        pending = _PendingJoin(conference_id, peer, ufrag, pwd, waiter, offer_text,
                               conference.kd_fingerprint, plan=plan, receive=receive)
        self._pending[aid] = pending
        pending.timer = self.clock.callLater(self.join_timeout, self._fail_pending, aid,
                                             KdTimeout("the KD did not answer in time"))
        peer.send(message)
        return waiter

    def _fail_pending(self, aid: bytes, error: ConferenceError) -> None:
        pending = self._pending.pop(aid, None)
        if pending is None:
            return
        if pending.timer is not None and pending.timer.active():
            pending.timer.cancel()
        pending.waiter.errback(error)

    def _answered(self, peer: Any, ack: SignAnswerAck) -> None:
        pending = self._pending.get(ack.association_id)
        if pending is None:
            if ack.ok:  # the KD admitted someone who is not coming: let it forget them
                self.events["late_answer"] += 1
                peer.send(EndpointDisconnect(ack.association_id))
            else:
                self.events["unknown_association"] += 1
            return
        if pending.peer is not peer:
            self.events["wrong_kd"] += 1
            return
        del self._pending[ack.association_id]
        if pending.timer is not None and pending.timer.active():
            pending.timer.cancel()
        aid = ack.association_id
        if ack.status == SIGN_STATUS_OK:
            refusal = self._answer_refusal(pending, aid, ack.text)
            if refusal is not None:
                self.events["answer_refused"] += 1
                self.log.warn("perc-md: the KD's answer for {association} cannot be used: "
                              "{reason}", association=str(uuid.UUID(bytes=aid)),
                              reason=refusal)
                peer.send(EndpointDisconnect(aid))
                pending.waiter.errback(KdFailed(SIGN_STATUS_OK, refusal))
                return
            conference = self._conferences[pending.conference_id]
            leg = self.plane.add_leg(aid, pending.ufrag, pending.pwd,
                                     group=pending.conference_id, now=self.clock.seconds(),
                                     plan=pending.plan)
            if pending.receive and leg.selection is not None:
                leg.selection.set_receive(aid, **pending.receive)
            participant = Participant(aid, pending.conference_id, secrets.token_urlsafe(32),
                                      leg, self.clock.seconds())
            conference.participants[aid] = participant
            self._participants[aid] = participant
            self.log.info("perc-md: {association} joined conference {conference}",
                          association=participant.association,
                          conference=pending.conference_id)
            pending.waiter.callback((aid, ack.text, participant.leave_token))
        elif ack.status == SIGN_STATUS_REFUSED:
            pending.waiter.errback(KdRefused(ack.text or "the KD refused the participant"))
        elif ack.status == SIGN_STATUS_BAD_OFFER:
            pending.waiter.errback(BadOffer(ack.text or "the KD could not use the offer"))
        else:
            pending.waiter.errback(KdFailed(ack.status, ack.text))

    def _answer_refusal(self, pending: _PendingJoin, aid: bytes, text: str) -> str | None:
        """Why the signed answer must not add a leg, or None (issue 10 item 3)."""
        try:
            verified = verify_pinned_answer(text, pending.offer,
                                            kd_fingerprint=pending.kd_fingerprint,
                                            now=self.clock.seconds())
        except AnswerError as e:
            return f"{e.reason}: {e}"
        if verified.conference_id != pending.conference_id:
            return (f"the answer is signed for conference {verified.conference_id!r}, "
                    f"not {pending.conference_id!r}")
        if verified.association_id != aid:
            return "the answer is signed for another association"
        return None

    def leave(self, conference_id: str, aid: bytes, leave_token: str) -> bool:
        """The endpoint leaves (token checked in constant time); its KD is told.

        Idempotent: a participant that is already gone (it left, the KD ended
        it, its consent lapsed, its conference was deleted) is not an error,
        and False is returned; nothing is kept of it to check a token against,
        and there is nothing left to remove.  Raises :class:`LeaveRefused`
        when the participant is here and the token is not its own.
        """
        conference = self._conferences.get(conference_id)
        participant = conference.participants.get(aid) if conference is not None else None
        if participant is None:
            return False
        if not hmac.compare_digest(leave_token.encode("utf-8", "replace"),
                                   participant.leave_token.encode("ascii")):
            raise LeaveRefused("the leave token does not match")
        self._end(aid, tell_kd=True, reason=DISCONNECT_LEAVE)
        self.log.info("perc-md: {association} left conference {conference}",
                      association=participant.association, conference=conference_id)
        return True

    def set_receive(self, conference_id: str, aid: bytes, leave_token: str,
                    receive: dict[str, int | None]) -> Leg:
        """The participant changes what it receives (its leave token authenticates it).

        Returns its leg.  Raises :class:`UnknownParticipant` (gone, or
        never here), :class:`LeaveRefused` for another token, ValueError for a
        bad value, :class:`ConferenceConflict` in a conference forwarding everything.
        """
        conference = self._conferences.get(conference_id)
        participant = conference.participants.get(aid) if conference is not None else None
        if participant is None:
            raise UnknownParticipant("no such participant")
        if not hmac.compare_digest(leave_token.encode("utf-8", "replace"),
                                   participant.leave_token.encode("ascii")):
            raise LeaveRefused("the participant's token does not match")
        selection = participant.leg.selection
        if selection is None:
            raise ConferenceConflict("the conference forwards everything to everyone")
        selection.set_receive(aid, **receive)  # type: ignore[arg-type]
        return participant.leg

    def _end(self, aid: bytes, *, tell_kd: bool,
             reason: int | None = None) -> Participant | None:
        participant = self._participants.pop(aid, None)
        if participant is None:
            return None
        self.plane.remove_leg(aid)
        conference = self._conferences.get(participant.conference_id)
        if conference is not None:
            conference.participants.pop(aid, None)
            if tell_kd:
                self._disconnect(conference.kd_fingerprint, aid, reason)
        return participant

    def _disconnect(self, fingerprint: bytes, aid: bytes, reason: int | None = None) -> None:
        """EndpointDisconnect to the KD, with ``reason`` (our private extension) if that
        KD's tunnel announced it reads it; queued (without reason) while it is down."""
        peer = self._peers.get(fingerprint)
        if peer is not None:
            if self._reasons_read.get(fingerprint) is not peer:
                reason = None
            peer.send(EndpointDisconnect(aid, reason))
            return
        queue = self._queued.setdefault(fingerprint, {})
        if len(queue) >= MAX_QUEUED_DISCONNECTS:
            self.events["disconnects_dropped"] += 1
            return
        queue[aid] = None
        self.events["disconnects_queued"] += 1

    # -- media plane callbacks --------------------------------------------------------

    def dtls_from_endpoint(self, leg_id: Any, data: bytes) -> None:
        """Plane ``on_dtls``: an endpoint's DTLS datagram goes to its KD."""
        participant = self._participants.get(leg_id)
        conference = (self._conferences.get(participant.conference_id)
                      if participant is not None else None)
        peer = self._peers.get(conference.kd_fingerprint) if conference is not None else None
        if peer is None:
            self.events["dtls_no_tunnel"] += 1
            return
        peer.send(TunneledDtls(leg_id, data))

    def legs_expired(self, leg_ids: list[Any]) -> None:
        """Media protocol ``on_expired``: consent lapsed (RFC 7675); the KD is told."""
        for aid in leg_ids:
            participant = self._end(aid, tell_kd=True, reason=DISCONNECT_CONSENT_TIMEOUT)
            if participant is not None:
                self.log.info("perc-md: {association} of conference {conference} lost "
                              "consent (no STUN check), disconnected",
                              association=participant.association,
                              conference=participant.conference_id)

    # -- ITunnelHandler ---------------------------------------------------------------

    def tunnel_up(self, peer: ITunnelPeer) -> None:
        fp = peer.peer_fingerprint
        self._peers[fp] = peer
        self.log.info("perc-md: KD {kd} connected", kd=format_fingerprint(fp))
        for aid in self._queued.pop(fp, {}):
            peer.send(EndpointDisconnect(aid))
        for message in self.associations_for(fp):
            peer.send(message)

    def associations_for(self, fingerprint: bytes) -> list[Associations]:
        """The ``Associations`` messages for the KD ``fingerprint``: its conferences'
        admitted participants, at most MAX_ASSOCIATIONS per message, the last one shorter."""
        entries = [AssociationEntry(aid, conference.conference_id)
                   for conference in self._conferences.values()
                   if conference.kd_fingerprint == fingerprint
                   for aid in conference.participants]
        # The last message has fewer than MAX_ASSOCIATIONS entries (possibly none): that
        # is how the KD knows the listing is complete.
        return [Associations(tuple(entries[i:i + MAX_ASSOCIATIONS]))
                for i in range(0, len(entries) + 1, MAX_ASSOCIATIONS)]

    def tunnel_down(self, peer: ITunnelPeer, reason: str) -> None:
        fp = peer.peer_fingerprint
        if self._reasons_read.get(fp) is peer:
            del self._reasons_read[fp]
        if self._peers.get(fp) is peer:
            del self._peers[fp]
            self.log.warn("perc-md: KD {kd} disconnected: {reason}",
                          kd=format_fingerprint(fp), reason=reason)
        for aid, pending in list(self._pending.items()):
            if pending.peer is peer:
                self._fail_pending(aid, KdUnavailable("the KD's tunnel closed during the join"))

    def tunnel_message(self, peer: ITunnelPeer, message: object) -> None:
        if isinstance(message, TunneledDtls):
            participant = self._from_kd(peer, message.association_id)
            if participant is None:
                return
            if self.media is None:
                self.events["dtls_no_media"] += 1
                return
            self.media.send_dtls(message.association_id, message.dtls_message)
        elif isinstance(message, MediaKeys):
            self._media_keys(peer, message)
        elif isinstance(message, EndpointDisconnect):
            if message.association_id == REASONS_ANNOUNCEMENT:
                # the KD reads our disconnect reasons (docs/PROTOCOL.md), on this tunnel
                if self._peers.get(peer.peer_fingerprint) is peer:
                    self._reasons_read[peer.peer_fingerprint] = peer
                return
            if message.association_id not in self._participants:
                return  # the KD's answer to our own EndpointDisconnect (RFC 9185 s5.4)
            if self._from_kd(peer, message.association_id) is not None:
                participant = self._end(message.association_id, tell_kd=False)
                if participant is not None:
                    self.log.info("perc-md: KD ended {association} of conference "
                                  "{conference}", association=participant.association,
                                  conference=participant.conference_id)
        elif isinstance(message, SignAnswerAck):
            self._answered(peer, message)
        elif isinstance(message, ConferenceEnded):
            self._conference_ended(peer, message.conference_id)
        else:
            self.events["unexpected_message"] += 1

    def _conference_ended(self, peer: ITunnelPeer, conference_id: str) -> None:
        """ConferenceEnded: end the conference as DELETE does, if ``peer`` is its KD."""
        conference = self._conferences.get(conference_id)
        if conference is None:
            return  # not hosted here: the KD tells every MD it is connected to
        if peer.peer_fingerprint != conference.kd_fingerprint:
            self.events["end_wrong_kd"] += 1
            self._refusals_log.warn(
                "md_end_wrong_kd",
                "perc-md: ConferenceEnded for conference {conference} from KD {kd}, which "
                "is not the conference's KD ({owner}): ignored",
                conference=conference_id, kd=format_fingerprint(peer.peer_fingerprint),
                owner=format_fingerprint(conference.kd_fingerprint))
            return
        self.delete(conference_id, by="its KD (ended at the KMF)")

    def _from_kd(self, peer: ITunnelPeer, aid: bytes) -> Participant | None:
        """The participant ``aid`` if ``peer`` is its conference's KD (else counted, None).

        An association this MD does not have (it restarted, or the endpoint left
        while the tunnel was down) is answered with EndpointDisconnect, so the KD
        forgets it and rekeys the others (RFC 9185 section 5.4).
        """
        participant = self._participants.get(aid)
        if participant is None:
            self.events["unknown_association"] += 1
            peer.send(EndpointDisconnect(aid))
            return None
        conference = self._conferences[participant.conference_id]
        if peer.peer_fingerprint != conference.kd_fingerprint:
            self.events["wrong_kd"] += 1
            return None
        return participant

    def _media_keys(self, peer: ITunnelPeer, keys: MediaKeys) -> None:
        participant = self._from_kd(peer, keys.association_id)
        if participant is None:
            return
        if keys.protection_profile not in _DOUBLE:
            reason = f"protection profile 0x{keys.protection_profile:04x} is not DOUBLE"
        else:
            try:
                self.plane.install_keys(keys.association_id, keys)
            except ValueError as e:
                reason = str(e)
            else:
                return
        # The MD relays only the outer layer of RFC 8723 DOUBLE; anything else
        # would make it hold end-to-end keys: end the association.
        self.events["keys_refused"] += 1
        self.log.warn("perc-md: MediaKeys for {association} refused ({reason}); "
                      "association ended", association=participant.association,
                      reason=reason)
        self._end(keys.association_id, tell_kd=False)
        peer.send(EndpointDisconnect(keys.association_id))


_DOUBLE = frozenset(int(p) for p in DOUBLE_PROFILES)

