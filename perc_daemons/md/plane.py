"""The Media Distributor's media plane: one UDP port, many endpoint legs, many conferences.

:class:`MediaPlane` is sans-I/O: datagrams, addresses and an explicit ``now``
in, datagrams to send out.  The Twisted wrapper is
:class:`~perc_daemons.md.media.MediaPlaneProtocol` (``transport.write`` for
each output, a ``LoopingCall`` for consent expiry, a ``callLater`` on
:meth:`MediaPlane.next_timer` for cascade links).

Per datagram, demultiplexed by its first byte (RFC 7983 section 7):

* STUN (0-3): an ICE-lite Binding responder (RFC 8445 section 7.3).  The MD's
  ufrag in USERNAME (``"<md ufrag>:<endpoint ufrag>"``) picks the leg, whose
  ice-pwd checks MESSAGE-INTEGRITY (:func:`~perc_daemons.protocol.stun.answer_binding_request`).
  A successful check binds the leg to the datagram's source address (learnt
  here: the MD is ICE-lite and never sends checks) and refreshes consent
  (RFC 7675).  A check naming a cascade link's ufrag goes to that link, and a
  Binding response to the link that has the transaction outstanding.
* DTLS (20-63) from a leg's address: handed to ``on_dtls(leg_id, data)``, the
  tunnel to the KD; the KD's records come back through :meth:`MediaPlane.send_dtls`.
* RTP (128-191, not RTCP) from a keyed leg: outer layer removed with the leg's
  inbound session (:class:`~perc_daemons.protocol.double.Relay`), re-applied
  with every other keyed leg's outbound session, EKTField carried through
  (RFC 8723 section 5.2).  ``should_forward(src_leg, dst_leg, ssrc)`` is the
  selective-forwarding hook; after it has kept packets of an SSRC from a
  receiver, that receiver's later packets of the SSRC are renumbered to close
  the gap, the original SEQ recorded in the OHB (RFC 8723 section 4), so its
  jitter buffer sees no loss and the end-to-end tag still verifies.
* RTCP: hop-by-hop only (RFC 8723 section 6): unprotect with the sender's
  inbound session, protect for each other keyed leg.
* TURN ChannelData (64-79): a cascade link's DTLS, SRTP and SRTCP (below).

Datagrams of any size up to 65535 bytes are relayed (the daemon's port reads
them whole): what pylibsrtp's 1500-byte buffer cannot take goes through the
same libsrtp session on a larger buffer
(:func:`~perc_daemons.protocol.srtp.libsrtp_large`).  A packet that cannot
be sealed for, or sent to, one receiver is counted on that receiver's leg
(``seal_failed``, ``send_failed``) and still goes to the others.

Conferences share the port: each leg belongs to a *group* (the conference
id; ``None`` is a group too) and media only ever goes to keyed legs of the
sender's group.  One shared UDP port rather than one socket per conference:
a single firewall rule and a single advertised candidate serve every
conference, and the demultiplexing it needs (ICE ufrag for STUN, then the
learnt 5-tuple for everything else) is already required for ICE-lite
(RFC 8445 section 7.3) whatever the number of sockets.  Per-conference
sockets would add port management and file descriptors and isolate
nothing more: a leg is only ever addressed by its authenticated 5-tuple.
The hot path does no group lookup: every membership, key or address change
recomputes, per leg, the tuple of the other keyed, addressed legs of its
group (:attr:`Leg.peers`), and a packet is sealed once per element.

Cascade links (RFC 8871 section 4.5.1; :mod:`perc_daemons.protocol.cascade`):
a link is one more kind of leg of its group, toward another MD, keyed by
the two MDs' own DTLS-SRTP with the single RFC 7714 profile of the outer
half (:class:`~perc_daemons.protocol.cascade.LinkUp`; the KD is not
involved).  While it is up it is a keyed peer like any other: a packet from
a local endpoint goes to the local receivers and every link of the group, a
packet from a link to the local receivers and every *other* link
(:attr:`Leg.peers` never holds the source), the outer layer alone removed
and re-applied per hop.  While it is down the group's local legs go on
exchanging media; when it is up again, with new keys, media crosses again.
Every datagram of a link but STUN is framed as TURN ChannelData with the
channel number the receiving MD gave the link (several links between two
MDs share one 5-tuple): :attr:`Leg.frame` is that header's first half, and
``_by_channel`` finds the link of an incoming one.  After a rekey the link's
previous inbound session stays accepted for ``key_overlap`` seconds; the
client side (which completes the handshake last, when the server already
holds the new keys) seals with the new keys at once, the server side once a
packet under the new keys arrives or ``switch_delay`` has passed.

A conference's MDs must form a tree.  Where the MD cannot know the shape, a
loop shows as packets of one SSRC from two neighbours: the first leg that
brings an SSRC into a group owns it (``owners``, shared by the group's legs;
forgotten when that leg goes or its link goes down), and packets of it from
another leg are dropped and counted (``ssrc_from_other_leg``) when either
of the two is a link.  Two endpoint legs with one SSRC are left alone, as
before (a rejoining endpoint keeps its SSRC, and its old leg may linger
until consent expiry).

Anything malformed, unauthenticated, replayed, from an unknown address or of
an unknown kind is dropped and counted: per leg in ``Leg.drops`` (reasons in
:data:`LEG_DROP_REASONS`), or in ``MediaPlane.drops`` when no leg can be
named (:data:`PLANE_DROP_REASONS`).  Every leg counts its datagrams
(:data:`LEG_COUNTERS`); a link also the bytes of the media it took in and
sent out (:data:`LINK_COUNTERS`: what crossed it each way).  Counter dicts
are built when a leg is created; the per-packet path only increments
existing keys and never logs.

The keys come from the KD (RFC 9185 MediaKeys): ``client_write`` (what the
endpoint protects with) keys the leg's inbound libsrtp session,
``server_write`` the outbound one.  With DOUBLE profiles those are the outer
halves only; the MD never holds an inner (end-to-end) key.  A link's keys
are the MDs' own.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Hashable
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from perc_daemons.protocol.cascade import (
    CHANNEL_MAX,
    CHANNEL_MIN,
    CLIENT,
    CascadeLink,
    LinkEvent,
    LinkTiming,
    LinkUp,
)
from perc_daemons.protocol.double import DOUBLE_PROFILES, Relay
from perc_daemons.protocol.errors import ProtocolError
from perc_daemons.protocol.feedback import parse_feedback, strip_report_blocks
from perc_daemons.protocol.rtp import APP, PSFB, RR, RTPFB, SR, build_compound, parse_compound
from perc_daemons.protocol.selection import (
    Retransmit,
    Selection,
    StreamPlan,
    parse_announcement,
)
from perc_daemons.protocol.srtp import (
    Session,
    hop_protect_rtcp,
    hop_unprotect_rtcp,
    libsrtp_session,
)
from perc_daemons.protocol.stun import (
    ATTR_USERNAME,
    BINDING_ERROR,
    BINDING_SUCCESS,
    StunError,
    StunMessage,
    answer_binding_request,
    is_stun,
    parse_username,
)
from perc_daemons.protocol.tunnel import MediaKeys

__all__ = [
    "DEFAULT_CONSENT_TIMEOUT",
    "LEG_BYTES",
    "LEG_COUNTERS",
    "LEG_DROP_REASONS",
    "LINK_BYTES",
    "LINK_COUNTERS",
    "PLANE_DROP_REASONS",
    "Leg",
    "MediaPlane",
    "leg_label",
]

Address = tuple[Any, ...]
Output = list[tuple[bytes, Address]]
LegId = Hashable

DEFAULT_CONSENT_TIMEOUT = 30.0  # RFC 7675 section 5.1

#: Per-leg traffic counters (received / sent datagrams).
LEG_COUNTERS = ("stun_in", "dtls_in", "dtls_out", "rtp_in", "rtp_out", "rtcp_in", "rtcp_out")

#: Per-leg byte counters: the SRTP and SRTCP bytes sent to the leg (what its receiver
#: was given; a link's without the 4-byte ChannelData header).
LEG_BYTES = ("rtp_out_bytes", "rtcp_out_bytes")

#: A cascade link's byte counters: :data:`LEG_BYTES` and the bytes of the SRTP and
#: SRTCP packets it took in (authenticated), so one MD's ``*_out_bytes`` is its
#: peer's ``*_in_bytes`` when nothing is lost on the way.
LINK_BYTES = (*LEG_BYTES, "rtp_in_bytes", "rtcp_in_bytes")

#: Every counter of a link.
LINK_COUNTERS = (*LEG_COUNTERS, *LINK_BYTES)

#: Per-leg drop reasons.
LEG_DROP_REASONS = (
    "not_keyed",        # SRTP/SRTCP before install_keys (a link: while it is down)
    "srtp_auth",        # outer tag did not verify
    "srtp_replay",      # replayed index (libsrtp replay window)
    "srtp_malformed",   # libsrtp refused the packet / too short
    "ekt_malformed",    # EKTField framing
    "malformed",        # any other ProtocolError
    "seal_failed",      # could not protect toward this (receiving) leg
    "send_failed",      # the socket refused the datagram for this leg (e.g. EAGAIN, EMSGSIZE)
    "stun_rejected",    # a check for this leg answered with an error (e.g. 401)
    "stun_malformed",   # a check for this leg that could not be parsed
    "unknown_kind",     # ZRTP, TURN channel data or an unassigned first byte
    "no_address",       # send_dtls (a link: its output) before the leg's address is known
    "ssrc_from_other_leg",  # an SSRC another leg brought into the group first (loops)
    "wrong_address",    # a link's ChannelData from other than the link's peer address
    "framing",          # a link's ChannelData whose length does not match
)

#: Drops that cannot be attributed to a leg.
PLANE_DROP_REASONS = ("empty", "unknown_address", "unknown_ufrag", "stun_malformed",
                      "unknown_channel", "unknown_transaction", "send_failed")

_REASON = {
    "srtp_auth": "srtp_auth",
    "srtp_replay": "srtp_replay",
    "srtp_malformed": "srtp_malformed",
    "ekt_malformed_field": "ekt_malformed",
    "ekt_unknown_type": "ekt_malformed",
}

_SUCCESS_PREFIX = BINDING_SUCCESS.to_bytes(2, "big")
_RESPONSES = (BINDING_SUCCESS, BINDING_ERROR)


def leg_label(leg_id: LegId) -> str:
    """A leg id as text: an endpoint's (its association's 16 bytes) as the UUID; a
    sender behind a cascade link (link id, tag) as ``<link>/<tag in hex>``."""
    if isinstance(leg_id, bytes) and len(leg_id) == 16:
        return str(uuid.UUID(bytes=leg_id))
    if isinstance(leg_id, tuple) and len(leg_id) == 2 and isinstance(leg_id[1], int):
        return f"{leg_label(leg_id[0])}/{leg_id[1]:08x}"
    return str(leg_id)


def _drop_reason(error: ProtocolError) -> str:
    return _REASON.get(error.reason, "malformed")


def _no_dtls(leg_id: LegId, data: bytes) -> None:
    return None


def _no_link_event(link_id: LegId, event: LinkEvent) -> None:
    return None


def _forward_all(src: LegId, dst: LegId, ssrc: int) -> bool:
    return True


class Leg:
    """One leg: an endpoint's, or a cascade link's (``link`` set).

    ICE credentials, learnt address, hop-by-hop sessions, counters.
    """

    __slots__ = ("_pwd", "address", "channel", "counters", "drops", "frame", "group",
                 "inbound", "last_consent", "leg_id", "link", "muted", "next_outbound",
                 "outbound", "owned", "owners", "peers", "plan", "previous_inbound",
                 "retire_at", "selection", "skipped", "switch_at", "ufrag", "withheld")

    def __init__(self, leg_id: LegId, ufrag: str, pwd: str, now: float | None,
                 group: Hashable = None) -> None:
        self.leg_id = leg_id
        self.ufrag = ufrag
        self._pwd = pwd
        #: The conference this leg belongs to: media goes only to its keyed peers.
        self.group = group
        #: The other keyed legs of ``group`` with a known address (recomputed on change).
        self.peers: tuple[Leg, ...] = ()
        #: sender SSRC -> packets the selective-forwarding hook kept from this leg;
        #: empty (and never consulted) while everything is forwarded.
        self.skipped: dict[int, int] = {}
        #: SSRCs of this leg's packets the hook kept from some receiver: their entries
        #: in the receivers' ``skipped`` go when this leg does.
        self.withheld: set[int] = set()
        #: SSRCs not forwarded to this leg: its group's
        #: :class:`~perc_daemons.protocol.selection.Selection` changes it.
        self.muted: set[int] = set()
        #: The group's selection (None: every packet to every peer, RTCP relayed).
        self.selection: Selection | None = None
        #: What the endpoint's offer said of its streams (for the selection).
        self.plan: StreamPlan | None = None
        #: The group's SSRC -> the leg that brought it first (one dict per group).
        self.owners: dict[int, Leg] = {}
        #: The SSRCs this leg owns in ``owners``.
        self.owned: set[int] = set()
        self.address: Address | None = None
        self.inbound: Session | None = None
        self.outbound: Session | None = None
        #: Time of the last valid STUN check (or of creation / first expire() pass).
        self.last_consent = now
        self.counters = dict.fromkeys((*LEG_COUNTERS, *LEG_BYTES), 0)
        self.drops = dict.fromkeys(LEG_DROP_REASONS, 0)
        # cascade links only (None for endpoint legs)
        #: The link's :class:`~perc_daemons.protocol.cascade.CascadeLink`.
        self.link: CascadeLink | None = None
        #: The peer's channel number for this link (:attr:`frame` as an int).
        self.channel: int | None = None
        #: First two bytes of the ChannelData header for this leg; None: no framing.
        self.frame: bytes | None = None
        #: After a rekey: the previous inbound session, accepted until ``retire_at``.
        self.previous_inbound: Session | None = None
        self.retire_at: float | None = None
        #: After a rekey (server side): the new outbound session, used from ``switch_at``
        #: or from the first packet under the new inbound keys.
        self.next_outbound: Session | None = None
        self.switch_at: float | None = None

    @property
    def keyed(self) -> bool:
        return self.inbound is not None

    def __repr__(self) -> str:  # never show the ice-pwd
        kind = "link" if self.link is not None else "leg"
        return (f"<Leg {kind} {self.leg_id!r} group={self.group!r} ufrag={self.ufrag!r} "
                f"address={self.address!r}>")


class MediaPlane:
    """Sans-I/O media plane of the MD (see the module docstring).

    ``link_certificate`` (DER) and ``link_private_key`` (EC P-256) are the MD's
    own, for its cascade links' DTLS; ``link_timing`` their clocks; ``rng``
    the randomness of links and channel numbers (a ``SystemRandom`` by
    default).  ``on_link(link_id, event)`` is called with each
    :class:`~perc_daemons.protocol.cascade.LinkUp` /
    :class:`~perc_daemons.protocol.cascade.LinkDown`, after the plane has
    applied it (from inside :meth:`datagram_received`, :meth:`poll` or
    :meth:`add_link`: it must not add or remove links itself).
    """

    def __init__(
        self,
        *,
        on_dtls: Callable[[LegId, bytes], object] = _no_dtls,
        should_forward: Callable[[LegId, LegId, int], bool] = _forward_all,
        replay_window: int = 128,
        link_certificate: bytes | None = None,
        link_private_key: ec.EllipticCurvePrivateKey | None = None,
        link_timing: LinkTiming | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.on_dtls = on_dtls
        self.should_forward = should_forward
        self.on_link: Callable[[LegId, LinkEvent], object] = _no_link_event
        self.replay_window = replay_window
        self.link_certificate = link_certificate
        self.link_private_key = link_private_key
        self.link_timing = link_timing or LinkTiming()
        self._rng = rng or random.SystemRandom()
        self.drops = dict.fromkeys(PLANE_DROP_REASONS, 0)
        self._legs: dict[LegId, Leg] = {}
        self._by_ufrag: dict[str, Leg] = {}
        self._by_address: dict[Address, Leg] = {}
        self._groups: dict[Hashable, list[Leg]] = {}
        self._owners: dict[Hashable, dict[int, Leg]] = {}
        self._links: dict[LegId, Leg] = {}
        self._by_channel: dict[int, Leg] = {}
        self._client_links: list[Leg] = []
        self._next_timer: float | None = None
        self._timers_dirty = False
        self._relay = Relay()
        self._selections: dict[Hashable, Selection] = {}

    # -- legs ----------------------------------------------------------------------------

    def add_leg(self, leg_id: LegId, ice_ufrag: str, ice_pwd: str, *,
                group: Hashable = None, now: float | None = None,
                plan: StreamPlan | None = None) -> Leg:
        """Expect an endpoint: its checks carry ``ice_ufrag`` (ours) and ``ice_pwd``.

        The leg exchanges media only with keyed legs of the same ``group``
        (a conference id).  The consent clock starts at ``now`` if given,
        otherwise at the first :meth:`expire` that sees the leg.
        """
        if not ice_pwd:
            raise ValueError("ice-pwd must be non-empty")
        self._check_new(leg_id, ice_ufrag)
        leg = Leg(leg_id, ice_ufrag, ice_pwd, now, group)
        leg.plan = plan
        self._enter(leg)
        # Not keyed yet: no other leg's peers change until install_keys / _bind.
        return leg

    def _check_new(self, leg_id: LegId, ufrag: str) -> None:
        if leg_id in self._legs:
            raise ValueError(f"leg {leg_id!r} already exists")
        if not ufrag or ":" in ufrag:
            raise ValueError("ice-ufrag must be non-empty without ':'")
        if ufrag in self._by_ufrag:
            raise ValueError(f"ice-ufrag {ufrag!r} is already in use")

    def _enter(self, leg: Leg) -> None:
        self._legs[leg.leg_id] = leg
        self._by_ufrag[leg.ufrag] = leg
        self._groups.setdefault(leg.group, []).append(leg)
        leg.owners = self._owners.setdefault(leg.group, {})
        selection = self._selections.get(leg.group)
        if selection is not None:
            self._select(leg, selection)

    def _select(self, leg: Leg, selection: Selection) -> None:
        leg.selection = selection
        if leg.link is None:  # a link's senders are announced by its peer
            selection.add_source(leg.leg_id, leg.plan)
        selection.add_receiver(leg.leg_id, leg.muted, leg.skipped, link=leg.link is not None)
        self._timers_dirty = True

    def set_selection(self, group: Hashable, selection: Selection | None) -> None:
        """Make ``group`` selective (:mod:`~perc_daemons.protocol.selection`), or not (None).

        Legs already in the group are handed to it.  Without one a group
        forwards every packet to every peer and relays RTCP as it came.
        """
        old = self._selections.pop(group, None)
        for leg in self._groups.get(group, ()):
            if old is not None:
                old.remove(leg.leg_id)
            leg.selection = None
            leg.muted.clear()
        if selection is not None:
            self._selections[group] = selection
            for leg in self._groups.get(group, ()):
                self._select(leg, selection)
        self._timers_dirty = True

    def selection(self, group: Hashable) -> Selection | None:
        return self._selections.get(group)

    def leg(self, leg_id: LegId) -> Leg:
        return self._legs[leg_id]

    def legs(self) -> list[Leg]:
        """Every leg, endpoints' and links'."""
        return list(self._legs.values())

    def install_keys(self, leg_id: LegId, media_keys: MediaKeys) -> None:
        """Key the leg's hop sessions from RFC 9185 MediaKeys (outer halves).

        May be called again (rekey): the old sessions are replaced.
        """
        leg = self._legs[leg_id]
        if leg.link is not None:
            raise ValueError(f"{leg_id!r} is a cascade link: its keys are its own")
        if media_keys.protection_profile not in {int(p) for p in DOUBLE_PROFILES}:
            raise ValueError(
                f"protection profile 0x{media_keys.protection_profile:04x} is not DOUBLE")
        inbound = libsrtp_session(media_keys.client_write_key, media_keys.client_write_salt,
                                  inbound=True, replay_window=self.replay_window)
        outbound = libsrtp_session(media_keys.server_write_key, media_keys.server_write_salt,
                                   inbound=False, replay_window=self.replay_window)
        leg.inbound, leg.outbound = inbound, outbound
        self._rebuild(leg.group)

    def remove_leg(self, leg_id: LegId) -> Leg | None:
        """Forget an endpoint's leg (its sessions, address and credentials); returns it, or None.

        Nothing of it stays in the plane's tables nor in the other legs, except
        one thing by design: the per-SSRC stream state that the other legs'
        outbound libsrtp sessions created for its SSRCs (some 270 bytes each),
        which lives as long as the receiving leg's key.  That state is what
        keeps (SSRC, packet index) and (SSRC, SRTCP index), the GCM nonces, from
        repeating under the receiver's key (RFC 3711 s3.3.1, s3.4; RFC 7714
        s8.1, s9.1) when the SSRC is heard again: an endpoint rejoining with
        the same SSRC continues its sequence numbers (RFC 3550 s5.1), and a
        fresh stream would also restart the SRTCP index at 1.
        """
        leg = self._legs.get(leg_id)
        if leg is None:
            return None
        if leg.link is not None:
            raise ValueError(f"{leg_id!r} is a cascade link: remove_link() closes it")
        if leg.address is not None and self._by_address.get(leg.address) is leg:
            del self._by_address[leg.address]
        self._forget(leg)
        return leg

    def _forget(self, leg: Leg) -> None:
        """Take ``leg`` out of every table and of its group's legs."""
        del self._legs[leg.leg_id]
        self._by_ufrag.pop(leg.ufrag, None)
        leg.inbound = leg.outbound = leg.previous_inbound = leg.next_outbound = None
        gone = leg.withheld | leg.owned
        self._disown(leg)
        if leg.selection is not None:
            leg.selection.remove(leg.leg_id)
            leg.selection = None
            self._timers_dirty = True
        members = self._groups.get(leg.group, [])
        if leg in members:
            members.remove(leg)
        if not members:
            self._groups.pop(leg.group, None)
            self._owners.pop(leg.group, None)
        for other in members:  # its SSRCs' gaps: a later packet of them is just newer
            for ssrc in gone:
                other.skipped.pop(ssrc, None)
        leg.peers = ()
        self._rebuild(leg.group)

    @staticmethod
    def _disown(leg: Leg) -> None:
        owners = leg.owners
        for ssrc in leg.owned:
            if owners.get(ssrc) is leg:
                del owners[ssrc]
        leg.owned.clear()

    def groups(self) -> dict[Hashable, list[Leg]]:
        """Group -> its legs, links included (a copy)."""
        return {group: list(legs) for group, legs in self._groups.items()}

    def _rebuild(self, group: Hashable) -> None:
        """Recompute :attr:`Leg.peers` of every leg of ``group`` (off the packet path)."""
        members = self._groups.get(group, ())
        keyed = [leg for leg in members if leg.inbound is not None and leg.address is not None]
        for leg in members:
            leg.peers = tuple(other for other in keyed if other is not leg)

    def _bind(self, leg: Leg, address: Address) -> None:
        if leg.address == address:
            return
        if leg.address is not None and self._by_address.get(leg.address) is leg:
            del self._by_address[leg.address]
        previous = self._by_address.get(address)
        if previous is not None and previous is not leg:
            previous.address = None  # the address moved to another (authenticated) leg
            if previous.group != leg.group:
                self._rebuild(previous.group)
        leg.address = address
        self._by_address[address] = leg
        self._rebuild(leg.group)

    # -- cascade links -------------------------------------------------------------------

    def add_link(self, link_id: LegId, group: Hashable, *, role: str, local_ufrag: str,
                 local_pwd: str, remote_ufrag: str, remote_pwd: str,
                 peer_address: Address | None, peer_fingerprint: bytes, profile: int,
                 now: float) -> Output:
        """A cascade link of ``group`` toward another MD; returns the datagrams to send now.

        ``role`` is ``"client"`` for the MD asked to open the link (it sends
        checks to ``peer_address`` and is the DTLS client), ``"server"`` for
        the other (``peer_address`` None: learnt from the peer's check).
        ``peer_fingerprint`` is the SHA-256 of the peer MD's certificate;
        ``profile`` 0x0007 or 0x0008 (the outer half of the conference's
        DOUBLE profile: :data:`~perc_daemons.protocol.cascade.LINK_PROFILE_FOR`).
        Raises ValueError for a taken id or ufrag or bad parameters.
        """
        if self.link_certificate is None or self.link_private_key is None:
            raise ValueError("the plane has no link certificate and key")
        self._check_new(link_id, local_ufrag)
        if len(self._by_channel) > CHANNEL_MAX - CHANNEL_MIN:
            raise ValueError("every ChannelData number is taken")
        channel = self._free_channel()
        link = CascadeLink(
            role, local_ufrag=local_ufrag, local_pwd=local_pwd, remote_ufrag=remote_ufrag,
            remote_pwd=remote_pwd, certificate=self.link_certificate,
            private_key=self.link_private_key, peer_fingerprint=peer_fingerprint,
            profile=profile, local_channel=channel, now=now, peer_address=peer_address,
            timing=self.link_timing, rng=self._rng)
        leg = Leg(link_id, local_ufrag, "", None, group)
        leg.link = link
        leg.counters = dict.fromkeys(LINK_COUNTERS, 0)
        leg.address = peer_address
        self._enter(leg)
        self._links[link_id] = leg
        self._by_channel[channel] = leg
        if role == CLIENT:
            self._client_links.append(leg)
        return self._drive(leg, now)

    def _free_channel(self) -> int:
        taken = self._by_channel
        for _ in range(16):
            channel = self._rng.randint(CHANNEL_MIN, CHANNEL_MAX)
            if channel not in taken:
                return channel
        return next(c for c in range(CHANNEL_MIN, CHANNEL_MAX + 1) if c not in taken)

    def remove_link(self, link_id: LegId) -> Output:
        """Close a link (close_notify to the peer) and forget it; unknown ids: nothing."""
        leg = self._links.pop(link_id, None)
        if leg is None:
            return []
        link = leg.link
        assert link is not None
        link.close()
        out = self._frame_output(leg, link.datagrams_to_send(0.0))
        del self._by_channel[link.local_channel]
        if leg in self._client_links:
            self._client_links.remove(leg)
        self._forget(leg)
        self._timers_dirty = True
        return out

    def link(self, link_id: LegId) -> CascadeLink:
        """The link's state machine (its ``state``, ``counters``, ``last_failure``)."""
        link = self._links[link_id].link
        assert link is not None
        return link

    def link_state(self, link_id: LegId) -> str:
        """``"connecting"``, ``"up"`` or ``"down"``; KeyError for an unknown link."""
        return self.link(link_id).state

    def poll(self, now: float) -> Output:
        """Run the links' and selections' timers that are due; returns the datagrams to send."""
        out: Output = []
        for selection in list(self._selections.values()):
            timer = selection.next_timer()
            if timer is not None and now >= timer:
                out += self._selected(selection.poll(now))
        for leg in list(self._links.values()):
            link = leg.link
            assert link is not None
            timer = link.next_timer()
            if timer is not None and now >= timer:
                link.handle_timer(now)
                out += self._drive(leg, now)
            if leg.switch_at is not None and now >= leg.switch_at:
                self._switch_outbound(leg)
            if leg.retire_at is not None and now >= leg.retire_at:
                leg.previous_inbound = leg.retire_at = None
        self._timers_dirty = True
        return out

    def next_timer(self) -> float | None:
        """When :meth:`poll` should next run (None: no link or selection has a timer)."""
        for selection in self._selections.values():
            if selection.timers_changed:
                selection.timers_changed = False
                self._timers_dirty = True
        if self._timers_dirty:
            times = [t for t in (s.next_timer() for s in self._selections.values())
                     if t is not None]
            for leg in self._links.values():
                timer = leg.link.next_timer()  # type: ignore[union-attr]
                times += [t for t in (timer, leg.switch_at, leg.retire_at) if t is not None]
            self._next_timer = min(times) if times else None
            self._timers_dirty = False
        return self._next_timer

    def _drive(self, leg: Leg, now: float) -> Output:
        """After a link took input or time: apply its events, send its datagrams."""
        link = leg.link
        assert link is not None
        while (event := link.next_event()) is not None:
            if isinstance(event, LinkUp):
                self._link_up(leg, event, now)
            else:
                self._link_down(leg)
            self.on_link(leg.leg_id, event)
        if link.peer_address != leg.address:
            leg.address = link.peer_address
            self._rebuild(leg.group)
        if link.remote_channel != leg.channel:
            leg.channel = link.remote_channel
            leg.frame = None if leg.channel is None else leg.channel.to_bytes(2, "big")
        self._timers_dirty = True
        return self._frame_output(leg, link.datagrams_to_send(now))

    @staticmethod
    def _frame_output(leg: Leg, datagrams: list[bytes]) -> Output:
        out: Output = []
        address, frame = leg.address, leg.frame
        for datagram in datagrams:
            if address is None:
                leg.drops["no_address"] += 1
            elif datagram[0] <= 3:  # STUN goes unframed
                out.append((datagram, address))
            elif frame is None:
                leg.drops["no_address"] += 1
            else:
                out.append((b"".join((frame, len(datagram).to_bytes(2, "big"), datagram)),
                            address))
                leg.counters["dtls_out"] += 1
        return out

    def _link_up(self, leg: Leg, event: LinkUp, now: float) -> None:
        inbound = libsrtp_session(event.remote_write_key, event.remote_write_salt,
                                  inbound=True, replay_window=self.replay_window)
        outbound = libsrtp_session(event.local_write_key, event.local_write_salt,
                                   inbound=False, replay_window=self.replay_window)
        if leg.inbound is None:
            leg.inbound, leg.outbound = inbound, outbound
            leg.previous_inbound = leg.next_outbound = leg.retire_at = leg.switch_at = None
            self._rebuild(leg.group)
            if leg.selection is not None:  # the peer learns our senders now
                leg.selection.link_up(leg.leg_id)
            return
        # A rekey, or the peer came back faster than the link could notice it left.
        leg.previous_inbound, leg.inbound = leg.inbound, inbound
        leg.retire_at = now + self.link_timing.key_overlap
        if leg.link.role == CLIENT:  # type: ignore[union-attr]
            leg.outbound, leg.next_outbound, leg.switch_at = outbound, None, None
        else:
            leg.next_outbound = outbound
            leg.switch_at = now + self.link_timing.switch_delay

    def _link_down(self, leg: Leg) -> None:
        leg.inbound = leg.outbound = leg.previous_inbound = leg.next_outbound = None
        leg.retire_at = leg.switch_at = None
        self._disown(leg)
        self._rebuild(leg.group)

    @staticmethod
    def _switch_outbound(leg: Leg) -> None:
        if leg.next_outbound is not None:
            leg.outbound = leg.next_outbound
        leg.next_outbound = leg.switch_at = None

    def _link_input(self, leg: Leg, data: bytes, address: Address, now: float) -> Output:
        leg.link.receive(data, address, now)  # type: ignore[union-attr]
        return self._drive(leg, now)

    # -- datagrams -----------------------------------------------------------------------

    def datagram_received(self, data: bytes, address: Address, now: float) -> Output:
        """Process one datagram from ``address``; returns ``[(datagram, address)]`` to send."""
        if not data:
            self.drops["empty"] += 1
            return []
        b = data[0]
        if b <= 3:
            return self._stun(data, address, now)
        if 64 <= b <= 79:
            return self._channel_data(data, address, now)
        leg = self._by_address.get(address)
        if leg is None:
            self.drops["unknown_address"] += 1
            return []
        if 128 <= b <= 191:
            if len(data) > 1 and 192 <= data[1] <= 223:
                return self._rtcp(leg, data, now)
            return self._rtp(leg, data, now)
        if 20 <= b <= 63:
            leg.counters["dtls_in"] += 1
            self.on_dtls(leg.leg_id, data)
            return []
        leg.drops["unknown_kind"] += 1
        return []

    def _channel_data(self, data: bytes, address: Address, now: float) -> Output:
        """A link's datagram in TURN ChannelData framing (RFC 8656 section 12.4)."""
        leg = self._by_channel.get((data[0] << 8) | data[1]) if len(data) > 1 else None
        if leg is None:
            endpoint = self._by_address.get(address)
            if endpoint is not None:  # an endpoint's TURN channel data: not for us
                endpoint.drops["unknown_kind"] += 1
            else:
                self.drops["unknown_channel"] += 1
            return []
        if address != leg.address:
            leg.drops["wrong_address"] += 1
            return []
        size = len(data) - 4
        length = ((data[2] << 8) | data[3]) if size >= 0 else 0
        if not length or not 0 <= size - length <= 3:  # up to 3 padding bytes
            leg.drops["framing"] += 1
            return []
        inner = data[4:4 + length]
        b = inner[0]
        if 128 <= b <= 191:
            # bytes counted here, not in _rtp/_rtcp: nothing more per endpoint packet
            counters = leg.counters
            if length > 1 and 192 <= inner[1] <= 223:
                kind, size, handle = "rtcp_in", "rtcp_in_bytes", self._rtcp
            else:
                kind, size, handle = "rtp_in", "rtp_in_bytes", self._rtp
            accepted = counters[kind]
            out = handle(leg, inner, now)
            if counters[kind] != accepted:
                counters[size] += length
            return out
        if 20 <= b <= 63:
            leg.counters["dtls_in"] += 1
            return self._link_input(leg, inner, address, now)
        leg.drops["unknown_kind"] += 1
        return []

    def _stun(self, data: bytes, address: Address, now: float) -> Output:
        if not is_stun(data):
            leg = self._by_address.get(address)
            if leg is None:
                self.drops["stun_malformed"] += 1
            else:
                leg.drops["stun_malformed"] += 1
            return []
        try:
            message = StunMessage.parse(data)
            username = message.get(ATTR_USERNAME)
            local = parse_username(username)[0] if username is not None else None
        except StunError:
            self.drops["stun_malformed"] += 1
            return []
        if message.message_type in _RESPONSES:
            tid = message.transaction_id
            for link_leg in self._client_links:
                if link_leg.link.expects(tid):  # type: ignore[union-attr]
                    link_leg.counters["stun_in"] += 1
                    return self._link_input(link_leg, data, address, now)
            self.drops["unknown_transaction"] += 1
            return []
        leg = self._by_ufrag.get(local) if local is not None else None
        if leg is None:
            self.drops["unknown_ufrag"] += 1
            return []
        leg.counters["stun_in"] += 1
        if leg.link is not None:
            return self._link_input(leg, data, address, now)
        try:
            answer = answer_binding_request(data, local_ufrag=leg.ufrag,
                                            local_pwd=leg._pwd, source=address[:2])
        except StunError:
            leg.drops["stun_malformed"] += 1
            return []
        if answer is None:  # indications, responses: nothing to do
            return []
        if answer[:2] == _SUCCESS_PREFIX:
            leg.last_consent = now
            self._bind(leg, address)
        else:
            leg.drops["stun_rejected"] += 1
        return [(answer, address)]

    def _rtp(self, src: Leg, data: bytes, now: float) -> Output:
        inbound = src.inbound
        if inbound is None:
            src.drops["not_keyed"] += 1
            return []
        relay = self._relay
        try:
            relay.open(data, inbound)
        except ProtocolError as e:
            if not self._open_previous(src, data, e):
                return []
        else:
            if src.next_outbound is not None:  # the peer seals with the new keys
                self._switch_outbound(src)
        packet = relay.packet
        ssrc = int.from_bytes(packet[8:12], "big")
        owner = src.owners.get(ssrc)
        if owner is not src:
            if owner is None:
                src.owners[ssrc] = src
                src.owned.add(ssrc)
            elif src.link is not None or owner.link is not None:
                src.drops["ssrc_from_other_leg"] += 1
                return []
        src.counters["rtp_in"] += 1
        selection = src.selection
        chosen = (selection.rtp(src.leg_id, ssrc, packet, relay.ekt_field, now)
                  if selection is not None else None)
        should_forward = self.should_forward
        selective = should_forward is not _forward_all  # no call per receiver otherwise
        out: Output = []
        src_id = src.leg_id
        for dst in src.peers:
            muted = dst.muted
            if muted and ssrc in muted:
                # A stream may start at any SEQ: what a selection withholds is a gap to
                # hide only after the receiver's first packet of the SSRC (``skipped``
                # holds it from then on), so a layer first given late is not renumbered.
                skipped = dst.skipped
                if ssrc in skipped:
                    skipped[ssrc] += 1
                continue
            if selective and not should_forward(src_id, dst.leg_id, ssrc):
                skipped = dst.skipped
                skipped[ssrc] = skipped.get(ssrc, 0) + 1
                src.withheld.add(ssrc)
                continue
            skipped = dst.skipped
            if selection is not None:
                gap = skipped.get(ssrc)
                if gap is None:  # goes when src does (_forget: its owned SSRCs)
                    skipped[ssrc] = 0
            else:
                gap = skipped.get(ssrc) if skipped else None
            try:
                if gap:
                    # Hide the packets this receiver did not get: renumber, recording
                    # the original SEQ in the OHB (RFC 8723 section 5.2).
                    try:
                        relay.edit(seq=(((packet[2] << 8) | packet[3]) - gap) & 0xFFFF)
                        datagram = relay.seal(dst.outbound)  # type: ignore[arg-type]
                    finally:
                        relay.packet = packet  # the next receivers get it unedited
                else:
                    datagram = relay.seal(dst.outbound)  # type: ignore[arg-type]
            except ProtocolError:
                dst.drops["seal_failed"] += 1
                continue
            counters = dst.counters
            counters["rtp_out"] += 1
            counters["rtp_out_bytes"] += len(datagram)
            frame = dst.frame
            if frame is not None:  # a link: TURN ChannelData
                datagram = b"".join((frame, len(datagram).to_bytes(2, "big"), datagram))
            out.append((datagram, dst.address))  # type: ignore[arg-type]
        if chosen:
            out += self._selected(chosen)
        return out

    def _selected(self, items: list[Any]) -> Output:
        """A selection's RTCP and retransmissions, sealed for their legs (off the hot path)."""
        out: Output = []
        relay = self._relay
        for item in items:
            dst = self._legs.get(item.leg_id)
            if dst is None or dst.outbound is None or dst.address is None:
                continue
            try:
                if type(item) is Retransmit:
                    relay.packet, relay.ekt_field = item.packet, item.ekt_field
                    if item.seq != (item.packet[2] << 8) | item.packet[3]:
                        relay.edit(seq=item.seq)
                    datagram = relay.seal(dst.outbound)
                    kind = "rtp"
                else:
                    datagram = hop_protect_rtcp(dst.outbound, item.plain)
                    kind = "rtcp"
            except ProtocolError:
                dst.drops["seal_failed"] += 1
                continue
            counters = dst.counters
            counters[kind + "_out"] += 1
            counters[kind + "_out_bytes"] += len(datagram)
            if dst.frame is not None:
                datagram = b"".join((dst.frame, len(datagram).to_bytes(2, "big"), datagram))
            out.append((datagram, dst.address))
        return out

    def _open_previous(self, src: Leg, data: bytes, error: ProtocolError) -> bool:
        """After a rekey, a packet the new inbound keys refuse may be under the old ones."""
        previous = src.previous_inbound
        if previous is not None and error.reason == "srtp_auth":
            try:
                self._relay.open(data, previous)
                return True
            except ProtocolError as e:
                error = e
        src.drops[_drop_reason(error)] += 1
        return False

    def _rtcp(self, src: Leg, data: bytes, now: float) -> Output:
        inbound = src.inbound
        if inbound is None:
            src.drops["not_keyed"] += 1
            return []
        try:
            plain = hop_unprotect_rtcp(inbound, data)
        except ProtocolError as e:
            previous = src.previous_inbound
            if previous is None or e.reason != "srtp_auth":
                src.drops[_drop_reason(e)] += 1
                return []
            try:
                plain = hop_unprotect_rtcp(previous, data)
            except ProtocolError as e2:
                src.drops[_drop_reason(e2)] += 1
                return []
        else:
            if src.next_outbound is not None:
                self._switch_outbound(src)
        if len(plain) < 8:
            src.drops["malformed"] += 1
            return []
        ssrc = int.from_bytes(plain[4:8], "big")
        owner = src.owners.get(ssrc)
        if owner is not src:
            if owner is None:
                src.owners[ssrc] = src
                src.owned.add(ssrc)
            elif src.link is not None or owner.link is not None:
                src.drops["ssrc_from_other_leg"] += 1
                return []
        src.counters["rtcp_in"] += 1
        selection = src.selection
        chosen = None
        if selection is not None:
            plain, chosen = self._terminate_rtcp(src, selection, plain, now)
            if not plain:
                return self._selected(chosen) if chosen else []
        should_forward = self.should_forward
        out: Output = []
        src_id = src.leg_id
        for dst in src.peers:
            if not should_forward(src_id, dst.leg_id, ssrc):
                continue
            try:
                datagram = hop_protect_rtcp(dst.outbound, plain)  # type: ignore[arg-type]
            except ProtocolError:
                dst.drops["seal_failed"] += 1
                continue
            dst.counters["rtcp_out"] += 1
            dst.counters["rtcp_out_bytes"] += len(datagram)
            frame = dst.frame
            if frame is not None:
                datagram = b"".join((frame, len(datagram).to_bytes(2, "big"), datagram))
            out.append((datagram, dst.address))  # type: ignore[arg-type]
        if chosen:
            out += self._selected(chosen)
        return out

    @staticmethod
    def _terminate_rtcp(src: Leg, selection: Selection, plain: bytes,
                        now: float) -> tuple[bytes, list[Any]]:
        """RTCP terminated per hop (RFC 8723 s6; :mod:`~perc_daemons.protocol.selection`).

        Receiver reports and feedback (NACK, PLI, FIR, REMB) are consumed
        (feedback by the selection), our own APP speaker hints are not taken
        from anyone; SR (without its report blocks), SDES, BYE and other APP
        go on to the peers.  Returns the compound to pass on (b"" for
        nothing) and the selection's output.
        """
        try:
            packets = parse_compound(plain, strict_first=False)
        except ProtocolError:
            src.drops["malformed"] += 1
            return b"", []
        onward = []
        chosen: list[Any] = []
        for packet in packets:
            kind = packet.packet_type
            if kind == RR:
                continue
            if kind == SR:
                onward.append(strip_report_blocks(packet) if packet.count else packet)
                if len(packet.body) >= 12:
                    selection.sender_report(int.from_bytes(packet.body[:4], "big"),
                                            int.from_bytes(packet.body[4:12], "big"), now)
            elif kind in (RTPFB, PSFB):
                try:
                    item = parse_feedback(packet)
                except ProtocolError:
                    src.drops["malformed"] += 1
                    continue
                if item is not None:
                    chosen += selection.feedback(src.leg_id, item, now)
            elif kind == APP and packet.body[4:8] == b"PERC":
                # ours: speaker hints go to endpoints only, stream announcements come
                # from a peer MD over a link (never from an endpoint)
                if src.link is None:
                    continue
                try:
                    announcement = parse_announcement(packet)
                except ProtocolError:
                    src.drops["malformed"] += 1
                    continue
                if announcement is not None:
                    selection.announced(src.leg_id, announcement, now)
            else:
                onward.append(packet)
        return (build_compound(onward) if onward else b""), chosen

    def send_failed(self, address: Address) -> None:
        """The socket refused a datagram for ``address``: counted on its leg.

        Links share their peer MD's address, so a refusal toward one is counted
        on the plane.
        """
        leg = self._by_address.get(address)
        if leg is not None:
            leg.drops["send_failed"] += 1
        else:
            self.drops["send_failed"] += 1

    def send_dtls(self, leg_id: LegId, data: bytes) -> Output:
        """A DTLS record from the KD (over the tunnel) for this leg's endpoint."""
        leg = self._legs.get(leg_id)
        if leg is None or leg.link is not None:
            return []
        if leg.address is None:
            leg.drops["no_address"] += 1
            return []
        leg.counters["dtls_out"] += 1
        return [(data, leg.address)]

    # -- consent -------------------------------------------------------------------------

    def expire(self, now: float, consent_timeout: float = DEFAULT_CONSENT_TIMEOUT) -> list[LegId]:
        """Remove endpoint legs with no valid STUN check for ``consent_timeout`` s (RFC 7675).

        Returns their ids: the caller tells the KD (EndpointDisconnect).  Links
        keep their own consent (they go down, and come back, by themselves).
        """
        gone = []
        for leg in list(self._legs.values()):
            if leg.link is not None:
                continue
            if leg.last_consent is None:
                leg.last_consent = now
            elif now - leg.last_consent >= consent_timeout:
                gone.append(leg.leg_id)
        for leg_id in gone:
            self.remove_leg(leg_id)
        return gone
