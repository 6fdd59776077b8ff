"""The Media Distributor's media plane: one UDP port, many endpoint legs, many conferences.

:class:`MediaPlane` is sans-I/O: datagrams, addresses and an explicit ``now``
in, datagrams to send out.  The Twisted wrapper is
:class:`~perc_daemons.md.media.MediaPlaneProtocol` (``transport.write`` for
each output, a ``LoopingCall`` for consent expiry).

Per datagram, demultiplexed by its first byte (RFC 7983 section 7):

* STUN (0-3): an ICE-lite Binding responder (RFC 8445 section 7.3).  The MD's
  ufrag in USERNAME (``"<md ufrag>:<endpoint ufrag>"``) picks the leg, whose
  ice-pwd checks MESSAGE-INTEGRITY (:func:`~perc_daemons.protocol.stun.answer_binding_request`).
  A successful check binds the leg to the datagram's source address (learnt
  here: the MD is ICE-lite and never sends checks) and refreshes consent
  (RFC 7675).
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

Anything malformed, unauthenticated, replayed, from an unknown address or of
an unknown kind is dropped and counted: per leg in ``Leg.drops`` (reasons in
:data:`LEG_DROP_REASONS`), or in ``MediaPlane.drops`` when no leg can be
named (:data:`PLANE_DROP_REASONS`).  Counter dicts are built when a leg is
created; the per-packet path only increments existing keys and never logs.

The keys come from the KD (RFC 9185 MediaKeys): ``client_write`` (what the
endpoint protects with) keys the leg's inbound libsrtp session,
``server_write`` the outbound one.  With DOUBLE profiles those are the outer
halves only; the MD never holds an inner (end-to-end) key.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

from perc_daemons.protocol.double import DOUBLE_PROFILES, Relay
from perc_daemons.protocol.errors import ProtocolError
from perc_daemons.protocol.srtp import (
    Session,
    hop_protect_rtcp,
    hop_unprotect_rtcp,
    libsrtp_session,
)
from perc_daemons.protocol.stun import (
    ATTR_USERNAME,
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
    "LEG_COUNTERS",
    "LEG_DROP_REASONS",
    "PLANE_DROP_REASONS",
    "Leg",
    "MediaPlane",
]

Address = tuple[Any, ...]
Output = list[tuple[bytes, Address]]
LegId = Hashable

DEFAULT_CONSENT_TIMEOUT = 30.0  # RFC 7675 section 5.1

#: Per-leg traffic counters (received / sent datagrams).
LEG_COUNTERS = ("stun_in", "dtls_in", "dtls_out", "rtp_in", "rtp_out", "rtcp_in", "rtcp_out")

#: Per-leg drop reasons.
LEG_DROP_REASONS = (
    "not_keyed",        # SRTP/SRTCP before install_keys
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
    "no_address",       # send_dtls before the leg's address is known
)

#: Drops that cannot be attributed to a leg.
PLANE_DROP_REASONS = ("empty", "unknown_address", "unknown_ufrag", "stun_malformed")

_REASON = {
    "srtp_auth": "srtp_auth",
    "srtp_replay": "srtp_replay",
    "srtp_malformed": "srtp_malformed",
    "ekt_malformed_field": "ekt_malformed",
    "ekt_unknown_type": "ekt_malformed",
}

_SUCCESS_PREFIX = BINDING_SUCCESS.to_bytes(2, "big")


def _drop_reason(error: ProtocolError) -> str:
    return _REASON.get(error.reason, "malformed")


def _no_dtls(leg_id: LegId, data: bytes) -> None:
    return None


def _forward_all(src: LegId, dst: LegId, ssrc: int) -> bool:
    return True


class Leg:
    """One endpoint's leg: ICE credentials, learnt address, hop-by-hop sessions, counters."""

    __slots__ = ("_pwd", "address", "counters", "drops", "group", "inbound", "last_consent",
                 "leg_id", "outbound", "peers", "skipped", "ufrag", "withheld")

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
        self.address: Address | None = None
        self.inbound: Session | None = None
        self.outbound: Session | None = None
        #: Time of the last valid STUN check (or of creation / first expire() pass).
        self.last_consent = now
        self.counters = dict.fromkeys(LEG_COUNTERS, 0)
        self.drops = dict.fromkeys(LEG_DROP_REASONS, 0)

    @property
    def keyed(self) -> bool:
        return self.inbound is not None

    def __repr__(self) -> str:  # never show the ice-pwd
        return (f"<Leg {self.leg_id!r} group={self.group!r} ufrag={self.ufrag!r} "
                f"address={self.address!r}>")


class MediaPlane:
    """Sans-I/O media plane of the MD (see the module docstring)."""

    def __init__(
        self,
        *,
        on_dtls: Callable[[LegId, bytes], object] = _no_dtls,
        should_forward: Callable[[LegId, LegId, int], bool] = _forward_all,
        replay_window: int = 128,
    ) -> None:
        self.on_dtls = on_dtls
        self.should_forward = should_forward
        self.replay_window = replay_window
        self.drops = dict.fromkeys(PLANE_DROP_REASONS, 0)
        self._legs: dict[LegId, Leg] = {}
        self._by_ufrag: dict[str, Leg] = {}
        self._by_address: dict[Address, Leg] = {}
        self._groups: dict[Hashable, list[Leg]] = {}
        self._relay = Relay()

    # -- legs ----------------------------------------------------------------------------

    def add_leg(self, leg_id: LegId, ice_ufrag: str, ice_pwd: str, *,
                group: Hashable = None, now: float | None = None) -> Leg:
        """Expect an endpoint: its checks carry ``ice_ufrag`` (ours) and ``ice_pwd``.

        The leg exchanges media only with keyed legs of the same ``group``
        (a conference id).  The consent clock starts at ``now`` if given,
        otherwise at the first :meth:`expire` that sees the leg.
        """
        if leg_id in self._legs:
            raise ValueError(f"leg {leg_id!r} already exists")
        if not ice_ufrag or ":" in ice_ufrag or not ice_pwd:
            raise ValueError("ice-ufrag must be non-empty without ':' and ice-pwd non-empty")
        if ice_ufrag in self._by_ufrag:
            raise ValueError(f"ice-ufrag {ice_ufrag!r} is already in use")
        leg = Leg(leg_id, ice_ufrag, ice_pwd, now, group)
        self._legs[leg_id] = leg
        self._by_ufrag[ice_ufrag] = leg
        self._groups.setdefault(group, []).append(leg)
        # Not keyed yet: no other leg's peers change until install_keys / _bind.
        return leg

    def leg(self, leg_id: LegId) -> Leg:
        return self._legs[leg_id]

    def legs(self) -> list[Leg]:
        return list(self._legs.values())

    def install_keys(self, leg_id: LegId, media_keys: MediaKeys) -> None:
        """Key the leg's hop sessions from RFC 9185 MediaKeys (outer halves).

        May be called again (rekey): the old sessions are replaced.
        """
        leg = self._legs[leg_id]
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
        """Forget a leg (its sessions, address and credentials); returns it, or None.

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
        leg = self._legs.pop(leg_id, None)
        if leg is None:
            return None
        self._by_ufrag.pop(leg.ufrag, None)
        if leg.address is not None and self._by_address.get(leg.address) is leg:
            del self._by_address[leg.address]
        leg.inbound = leg.outbound = None
        members = self._groups.get(leg.group, [])
        if leg in members:
            members.remove(leg)
        if not members:
            self._groups.pop(leg.group, None)
        for other in members:  # its SSRCs' gaps: a later packet of them is just newer
            for ssrc in leg.withheld:
                other.skipped.pop(ssrc, None)
        leg.peers = ()
        self._rebuild(leg.group)
        return leg

    def groups(self) -> dict[Hashable, list[Leg]]:
        """Group -> its legs (a copy)."""
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

    # -- datagrams -----------------------------------------------------------------------

    def datagram_received(self, data: bytes, address: Address, now: float) -> Output:
        """Process one datagram from ``address``; returns ``[(datagram, address)]`` to send."""
        if not data:
            self.drops["empty"] += 1
            return []
        b = data[0]
        if b <= 3:
            return self._stun(data, address, now)
        leg = self._by_address.get(address)
        if leg is None:
            self.drops["unknown_address"] += 1
            return []
        if 128 <= b <= 191:
            if len(data) > 1 and 192 <= data[1] <= 223:
                return self._rtcp(leg, data)
            return self._rtp(leg, data)
        if 20 <= b <= 63:
            leg.counters["dtls_in"] += 1
            self.on_dtls(leg.leg_id, data)
            return []
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
            username = StunMessage.parse(data).get(ATTR_USERNAME)
            local = parse_username(username)[0] if username is not None else None
        except StunError:
            self.drops["stun_malformed"] += 1
            return []
        leg = self._by_ufrag.get(local) if local is not None else None
        if leg is None:
            self.drops["unknown_ufrag"] += 1
            return []
        leg.counters["stun_in"] += 1
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

    def _rtp(self, src: Leg, data: bytes) -> Output:
        inbound = src.inbound
        if inbound is None:
            src.drops["not_keyed"] += 1
            return []
        relay = self._relay
        try:
            relay.open(data, inbound)
        except ProtocolError as e:
            src.drops[_drop_reason(e)] += 1
            return []
        src.counters["rtp_in"] += 1
        packet = relay.packet
        ssrc = int.from_bytes(packet[8:12], "big")
        should_forward = self.should_forward
        selective = should_forward is not _forward_all  # no call per receiver otherwise
        out: Output = []
        src_id = src.leg_id
        for dst in src.peers:
            if selective and not should_forward(src_id, dst.leg_id, ssrc):
                skipped = dst.skipped
                skipped[ssrc] = skipped.get(ssrc, 0) + 1
                src.withheld.add(ssrc)
                continue
            try:
                if dst.skipped and (gap := dst.skipped.get(ssrc)):
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
            out.append((datagram, dst.address))  # type: ignore[arg-type]
            dst.counters["rtp_out"] += 1
        return out

    def _rtcp(self, src: Leg, data: bytes) -> Output:
        inbound = src.inbound
        if inbound is None:
            src.drops["not_keyed"] += 1
            return []
        try:
            plain = hop_unprotect_rtcp(inbound, data)
        except ProtocolError as e:
            src.drops[_drop_reason(e)] += 1
            return []
        if len(plain) < 8:
            src.drops["malformed"] += 1
            return []
        src.counters["rtcp_in"] += 1
        ssrc = int.from_bytes(plain[4:8], "big")
        should_forward = self.should_forward
        out: Output = []
        src_id = src.leg_id
        for dst in src.peers:
            if not should_forward(src_id, dst.leg_id, ssrc):
                continue
            try:
                out.append((hop_protect_rtcp(dst.outbound, plain), dst.address))  # type: ignore[arg-type]
            except ProtocolError:
                dst.drops["seal_failed"] += 1
                continue
            dst.counters["rtcp_out"] += 1
        return out

    def send_failed(self, address: Address) -> None:
        """The socket refused a datagram for ``address``: counted on its leg."""
        leg = self._by_address.get(address)
        if leg is not None:
            leg.drops["send_failed"] += 1

    def send_dtls(self, leg_id: LegId, data: bytes) -> Output:
        """A DTLS record from the KD (over the tunnel) for this leg's endpoint."""
        leg = self._legs.get(leg_id)
        if leg is None:
            return []
        if leg.address is None:
            leg.drops["no_address"] += 1
            return []
        leg.counters["dtls_out"] += 1
        return [(data, leg.address)]

    # -- consent -------------------------------------------------------------------------

    def expire(self, now: float, consent_timeout: float = DEFAULT_CONSENT_TIMEOUT) -> list[LegId]:
        """Remove legs with no valid STUN check for ``consent_timeout`` s (RFC 7675).

        Returns their ids: the caller tells the KD (EndpointDisconnect).
        """
        gone = []
        for leg in list(self._legs.values()):
            if leg.last_consent is None:
                leg.last_consent = now
            elif now - leg.last_consent >= consent_timeout:
                gone.append(leg.leg_id)
        for leg_id in gone:
            self.remove_leg(leg_id)
        return gone
