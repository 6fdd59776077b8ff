"""Selective forwarding under end-to-end encryption: what a PERC Media Distributor may choose.

The MD cannot read media (RFC 8871 s4.1, RFC 8723): it sees the RTP header,
the RFC 8285 header extensions (never covered by the inner layer, RFC 8723
s5.1) and hop-by-hop RTCP (RFC 8723 s6).  That is enough for what Jitsi
Videobridge, mediasoup and LiveKit do for their users:

* **Who speaks.**  The RFC 6464 client-to-mixer audio level of each audio
  packet feeds :class:`~perc_daemons.protocol.speaker.DominantSpeaker`; a
  change of dominant speaker is told to the receivers in an RTCP APP "PERC"
  speaker hint (:func:`~perc_daemons.protocol.feedback.build_speaker_hint`) —
  a hint from a semi-trusted MD, not a signed fact.  A conference may keep
  audio levels off (the MD then leaves the extension out of its answer, so
  endpoints do not send it; RFC 8871 s4.3): selection falls back to join
  order.
* **Last-N.**  Each receiver gets the video of the N sources that spoke most
  recently (the conference's ``last_n``, lowered per receiver on request;
  -1 = every source), and the audio of every sender, or of the ``audio_top_k``
  most recent speakers.
* **Simulcast layers.**  A source's encodings (one SSRC each, told apart by
  the RFC 8852 RID extension and ordered by the ``max-height`` of the
  offer's ``a=rid``, RFC 8851) are measured; per receiver the highest layer
  within its ``max_height`` whose rate fits in its bandwidth (the smaller of
  its REMB and its ``max_bitrate``), speakers first.  A switch happens only at
  a key frame of the new layer (frame-marking extension, I and S bits); the
  MD asks the source for one with a PLI, at most one per ``pli_interval`` per
  SSRC however many receivers wait.  Without frame marking the switch is
  immediate (the receiver's decoder then waits for a key frame itself).
* **Gap-free streams.**  What is withheld from a receiver is hidden from it by
  renumbering (the media plane's ``skipped`` counts, the original SEQ recorded
  in the OHB, RFC 8723 s4): its view of each SSRC has no gaps, and the
  end-to-end tag still verifies.  This module records, per receiver and
  SSRC, the renumbering offset in force from each switch on, so that a NACK
  in the receiver's numbering finds the original packet.
* **Repair.**  The last :data:`HISTORY` packets of each video SSRC are kept
  with only the outer layer removed (inner ciphertext, inner tag, OHB and
  EKTField untouched: no key needed).  A receiver's generic NACK (RFC 4585
  s6.2.1) is answered from there, the packet re-sealed for that receiver on
  its own SSRC and SEQ (a retransmission in the original stream rather than
  RTX, RFC 4588: no RTX SSRC to negotiate per hop, and the receiver's SRTP
  replay lists accept a packet they never got); what the MD does not hold
  goes upstream, in the sender's numbering.
* **RTCP terminated per hop.**  Receiver reports, REMB, NACK, PLI and FIR are
  consumed here; SR (without report blocks), SDES and BYE are passed on so
  that lip sync works; the MD originates its own PLI/NACK upstream and,
  every second, its own receiver report to each sending leg on what this
  hop received (sender SSRC :attr:`Selection.ssrc`, random per conference).

Cascade links (RFC 8871 s4.5.1) are receivers that get everything: each MD
selects for its own endpoints, from the same audio levels (every audio
packet crosses every link), so each side computes the same speakers; a
remote receiver's PLI or NACK reaches the source's MD hop by hop, answered
by the first MD that holds the packet.

Sans-I/O: packets, feedback and an explicit ``now`` in; the plane's
per-receiver ``muted`` sets changed in place, and :class:`SendRtcp` /
:class:`Retransmit` out.  The per-packet entry point, :meth:`Selection.rtp`,
does a dict lookup and a few integer operations for a known SSRC; anything
more (learning an SSRC, a pending switch, an audio level) only when needed.
"""

from __future__ import annotations

import math
import random
import re
import struct
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from perc_daemons.protocol.errors import ProtocolError
from perc_daemons.protocol.extensions import (
    AUDIO_LEVEL_URI,
    FRAME_MARKING_URI,
    MID_URI,
    RID_URI,
    audio_level,
    find_extension,
    is_keyframe_start,
    media_id,
    stream_id,
)
from perc_daemons.protocol.feedback import (
    SPEAKER_HINT_NAME,
    Feedback,
    SpeakerHint,
    build_nack,
    build_pli,
    build_speaker_hint,
)
from perc_daemons.protocol.rtp import (
    APP,
    ReportBlock,
    RtcpPacket,
    build_compound,
    receiver_report,
)
from perc_daemons.protocol.speaker import DominantSpeaker

__all__ = [
    "ANNOUNCE_INTERVAL",
    "HISTORY",
    "Announcement",
    "Retransmit",
    "Selection",
    "SelectionError",
    "SelectionPolicy",
    "SendRtcp",
    "StreamEntry",
    "StreamPlan",
    "build_announcements",
    "parse_announcement",
]

LegId = Hashable

#: Packets kept per video SSRC for NACK answers (a power of two): some 0.5 s of a
#: 1 Mbit/s layer of 1200-byte packets; NACKs beyond it go upstream.
HISTORY = 512
_MASK = HISTORY - 1
#: How far back (in the receiver's numbering) a NACK may reach into earlier segments.
_SEGMENTS_KEPT = 4
#: Seconds between two layer-rate measurements (and REMB-driven re-decisions).
RATE_INTERVAL = 1.0
#: A REMB that moves the estimate by less than this fraction changes nothing.
_REMB_HYSTERESIS = 0.1
#: How long an SSRC from a link waits for its announcement before it is forwarded as is.
UNANNOUNCED_GRACE = 2 * 2.0
#: How long a source's announced layers are waited for before choosing among those seen.
LAYERS_WAIT = 0.5
#: Unknown layer rate (no packet yet): counted as this in the budget (bits/s).
_UNMEASURED = 0.0


class SendRtcp(NamedTuple):
    """An RTCP compound (plaintext) the plane protects for ``leg_id`` and sends."""

    leg_id: LegId
    plain: bytes


class Retransmit(NamedTuple):
    """A cached packet (outer layer removed) to re-seal for ``leg_id`` as SEQ ``seq``."""

    leg_id: LegId
    packet: bytes
    ekt_field: bytes
    seq: int


Output = list[SendRtcp | Retransmit]


# -- stream announcements between MDs (RTCP APP "PERC", subtype 2) ------------------------

#: The APP subtype of a stream announcement (the speaker hint is 1).
ANNOUNCE_SUBTYPE = 2
#: Seconds between two announcements of the whole state over each link.
ANNOUNCE_INTERVAL = 2.0
#: Entries per APP packet (some 20 bytes each: one datagram well under any MTU).
_ENTRIES_PER_PART = 48
_ANNOUNCE_HEADER = struct.Struct("!IBBH")  # generation, part, parts, count
_ENTRY = struct.Struct("!IIBBBBH2x")  # tag, ssrc, kind, level id, marks id, rid length, height
_KINDS = ("audio", "video")
_RID = re.compile(rb"[A-Za-z0-9_-]+")  # RFC 8851 s10 rid-id


class SelectionError(ProtocolError):
    """A malformed stream announcement from a peer MD."""

    reason = "announcement_malformed"


class StreamEntry(NamedTuple):
    """One stream a peer MD forwards over a link: whose (``tag``), what, how to read it."""

    tag: int
    ssrc: int
    kind: str
    audio_level_id: int | None
    frame_marking_id: int | None
    height: int | None
    rid: str | None


class Announcement(NamedTuple):
    generation: int
    part: int
    parts: int
    entries: tuple[StreamEntry, ...]


def build_announcements(sender_ssrc: int, generation: int,
                        entries: Sequence[StreamEntry]) -> list[RtcpPacket]:
    """The APP packets (RFC 3550 s6.7, name "PERC", subtype 2) announcing ``entries``.

    Data: 32-bit generation, 8-bit part (from 0), 8-bit parts, 16-bit count,
    then per entry: tag, SSRC (32 bits each), kind (0 audio, 1 video), the
    audio level and frame marking extension ids (0: none), the RID's length,
    the layer height (16 bits, 0: unknown), 2 reserved bytes, the RID padded
    to 32 bits.  Nothing here is secret: it is what the header extensions
    tell the MD anyway (docs/PROTOCOL.md, "Selective forwarding").
    """
    chunks = [entries[i:i + _ENTRIES_PER_PART]
              for i in range(0, len(entries), _ENTRIES_PER_PART)] or [()]
    if len(chunks) > 255:
        raise ValueError("too many streams for one announcement")
    packets = []
    for part, chunk in enumerate(chunks):
        data = [struct.pack("!I", sender_ssrc), SPEAKER_HINT_NAME,
                _ANNOUNCE_HEADER.pack(generation & 0xFFFFFFFF, part, len(chunks), len(chunk))]
        for e in chunk:
            rid = (e.rid or "").encode("ascii")
            data.append(_ENTRY.pack(e.tag, e.ssrc, _KINDS.index(e.kind), e.audio_level_id or 0,
                                    e.frame_marking_id or 0, len(rid), e.height or 0))
            data.append(rid + b"\x00" * (-len(rid) % 4))
        packets.append(RtcpPacket(APP, b"".join(data), count=ANNOUNCE_SUBTYPE))
    return packets


def parse_announcement(packet: RtcpPacket) -> Announcement | None:
    """The announcement of an APP "PERC" subtype 2 packet; None for any other packet.

    Raises :class:`SelectionError` when it is one but malformed.
    """
    if packet.packet_type != APP or packet.count != ANNOUNCE_SUBTYPE:
        return None
    body = bytes(packet.body)
    if packet.padding and body:
        body = body[:len(body) - body[-1]]
    if body[4:8] != SPEAKER_HINT_NAME:
        return None
    if len(body) < 8 + _ANNOUNCE_HEADER.size:
        raise SelectionError("stream announcement too short for its header")
    generation, part, parts, count = _ANNOUNCE_HEADER.unpack_from(body, 8)
    if not part < parts:
        raise SelectionError(f"stream announcement part {part} of {parts}")
    offset = 8 + _ANNOUNCE_HEADER.size
    entries = []
    for _ in range(count):
        if offset + _ENTRY.size > len(body):
            raise SelectionError("stream announcement entry runs past the packet")
        tag, ssrc, kind, level, marks, rid_length, height = _ENTRY.unpack_from(body, offset)
        offset += _ENTRY.size
        end = offset + rid_length
        if kind > 1 or end > len(body):
            raise SelectionError("stream announcement entry of an unknown kind or cut short")
        rid = None
        if rid_length:
            raw = body[offset:end]
            if _RID.fullmatch(raw) is None:
                raise SelectionError("stream announcement RID is not an RFC 8851 rid-id")
            rid = raw.decode("ascii")
        offset = end + (-rid_length % 4)
        entries.append(StreamEntry(tag, ssrc, _KINDS[kind], level or None, marks or None,
                                   height or None, rid))
    if offset != len(body):
        raise SelectionError("stream announcement has bytes after its entries")
    return Announcement(generation, part, parts, tuple(entries))


class _Assembly:
    """The parts of the latest announcement generation from one link."""

    __slots__ = ("generation", "parts")

    def __init__(self) -> None:
        self.generation: int | None = None
        self.parts: dict[int, Announcement] = {}


@dataclass(frozen=True)
class StreamPlan:
    """What an endpoint's offer says about its streams (RFC 8285 ids, mids, rids).

    ``rid_heights`` maps a RID to the ``max-height`` of its ``a=rid``
    (RFC 8851 s5); ``audio_ssrcs``/``video_ssrcs`` are the ``a=ssrc`` of the
    audio and video sections (RFC 5576), where the offer lists them.
    """

    audio_level_id: int | None = None
    mid_id: int | None = None
    rid_id: int | None = None
    frame_marking_id: int | None = None
    audio_mids: frozenset[str] = frozenset()
    video_mids: frozenset[str] = frozenset()
    rid_heights: dict[str, int] = field(default_factory=dict)
    audio_ssrcs: frozenset[int] = frozenset()
    video_ssrcs: frozenset[int] = frozenset()

    @classmethod
    def from_offer(cls, offer: object) -> StreamPlan:
        """The plan of a parsed offer (:class:`~perc_daemons.protocol.sdp.SessionDescription`)."""
        ids: dict[str, int] = {}
        audio_mids: set[str] = set()
        video_mids: set[str] = set()
        heights: dict[str, int] = {}
        audio_ssrcs: set[int] = set()
        video_ssrcs: set[int] = set()
        for media in getattr(offer, "media", ()):
            if media.port == 0:
                continue
            for ext in media.extmaps():
                ids.setdefault(ext.uri, ext.id)
            mid = media.mid
            kind_mids, kind_ssrcs = ((audio_mids, audio_ssrcs) if media.media == "audio"
                                     else (video_mids, video_ssrcs))
            if mid is not None:
                kind_mids.add(mid)
            kind_ssrcs.update(media.ssrcs())
            rids = getattr(media, "rids", None)
            for rid in (rids() if rids is not None else ()):
                height = rid.params.get("max-height")
                if height is not None and height.isdigit():
                    heights[rid.id] = int(height)
        return cls(ids.get(AUDIO_LEVEL_URI), ids.get(MID_URI), ids.get(RID_URI),
                   ids.get(FRAME_MARKING_URI), frozenset(audio_mids), frozenset(video_mids),
                   heights, frozenset(audio_ssrcs), frozenset(video_ssrcs))


@dataclass(frozen=True)
class SelectionPolicy:
    """A conference's forwarding policy (the MD's conference settings)."""

    #: Video sources per receiver (-1: all).
    last_n: int = -1
    #: Whether the MD negotiates and uses RFC 6464 audio levels.
    audio_levels: bool = True
    #: Audio of only the K most recent speakers (0: every sender's).
    audio_top_k: int = 0
    #: At most one PLI per SSRC this often (seconds).
    pli_interval: float = 0.5
    #: A pending switch asks again after this long without a key frame.
    keyframe_wait: float = 1.0

    def __post_init__(self) -> None:
        if self.last_n < -1:
            raise ValueError("last_n must be -1 (all) or at least 0")
        if self.audio_top_k < 0:
            raise ValueError("audio_top_k must be 0 (all) or more")
        if not self.pli_interval > 0 or not self.keyframe_wait > 0:
            raise ValueError("pli_interval and keyframe_wait must be positive")


class _Stream:
    """One SSRC of a source: audio, or one video layer with its history."""

    __slots__ = ("base_seq", "bits", "cycles", "height", "index", "kind", "last_pli",
                 "last_sr", "last_sr_at", "max_seq", "packets", "prior_expected",
                 "prior_received", "rate", "received", "rid", "ring_ekt", "ring_packet",
                 "ring_seq", "source", "ssrc")

    def __init__(self, ssrc: int, source: _Source, kind: str, rid: str | None,
                 height: int | None) -> None:
        self.ssrc = ssrc
        self.source = source
        self.kind = kind
        self.rid = rid
        self.height = height
        self.index = 0
        self.bits = 0
        self.packets = 0
        self.rate = _UNMEASURED  # bits/s over the last RATE_INTERVAL
        self.last_pli = -math.inf
        # reception statistics of this hop, for the MD's own receiver reports (RFC 3550
        # s6.4.1, A.3): first and highest SEQ, wraps, packets, at the last report
        self.base_seq = self.max_seq = -1
        self.cycles = self.received = self.prior_expected = self.prior_received = 0
        self.last_sr = 0  # middle 32 bits of the NTP time of its last SR
        self.last_sr_at = 0.0
        if kind == "video":
            self.ring_packet: list[bytes | None] = [None] * HISTORY
            self.ring_ekt: list[bytes] = [b""] * HISTORY
            self.ring_seq: list[int] = [-1] * HISTORY


class _Source:
    """One sender: a local endpoint (``key`` = ``via`` = its leg id), or an endpoint
    behind a cascade link (``key`` = (link id, tag), ``via`` = the link's leg id)."""

    __slots__ = ("audio", "first_video", "joined", "key", "plan", "tag", "via", "video")

    def __init__(self, key: Hashable, via: LegId, tag: int, plan: StreamPlan,
                 joined: int) -> None:
        self.key = key
        self.via = via
        #: Its name in announcements over links (random for a local one).
        self.tag = tag
        self.plan = plan
        self.joined = joined
        self.audio: list[_Stream] = []
        self.video: list[_Stream] = []  # layers, lowest first
        self.first_video: float | None = None

    def complete(self, now: float) -> bool:
        """Every layer its offer announced seen (or :data:`LAYERS_WAIT` since the first):
        choosing earlier would switch a receiver up layer by layer as they appear."""
        if len(self.video) >= len(self.plan.rid_heights):
            return True
        return self.first_video is not None and now - self.first_video >= LAYERS_WAIT

    def sort_layers(self) -> None:
        self.video.sort(key=lambda s: (s.height if s.height is not None else 1 << 20, s.rate,
                                       s.ssrc))


class _Receiver:
    __slots__ = (
        "counters",
        "current",
        "last_n",
        "leg_id",
        "link",
        "max_bitrate",
        "max_height",
        "muted",
        "remb",
        "segments",
        "skipped",
        "target",
    )

    def __init__(self, leg_id: LegId, muted: set[int], skipped: dict[int, int],
                 link: bool) -> None:
        self.leg_id = leg_id
        self.muted = muted
        self.skipped = skipped
        self.link = link
        self.last_n: int | None = None
        self.max_height: int | None = None
        self.max_bitrate: int | None = None
        self.remb: int | None = None
        #: source leg id -> the video SSRC forwarded now (absent: none).
        self.current: dict[LegId, int] = {}
        #: source leg id -> the video SSRC waited for (a key frame of it).
        self.target: dict[LegId, int] = {}
        #: SSRC -> [(first SEQ in the receiver's numbering, offset)], newest last.
        self.segments: dict[int, list[tuple[int, int]]] = {}
        self.counters = dict.fromkeys(RECEIVER_COUNTERS, 0)


#: Per-receiver counters (metrics, GET participants).
RECEIVER_COUNTERS = ("nacks_received", "retransmitted", "nacks_forwarded", "plis_received",
                     "plis_requested", "layer_switches", "remb_bitrate")


class Selection:
    """One conference's selective forwarding state (see the module docstring).

    The media plane calls :meth:`add_source` / :meth:`add_receiver` for its
    legs (an endpoint leg is both, a link too), :meth:`rtp` for every
    packet it opened, :meth:`feedback` for RTCP feedback, :meth:`poll` at
    :meth:`next_timer`.  ``muted`` (per receiver, shared with the plane) is
    the set of SSRCs the plane must not forward to it.
    """

    def __init__(self, policy: SelectionPolicy | None = None, *,
                 rng: random.Random | None = None,
                 speaker: DominantSpeaker | None = None) -> None:
        self.policy = policy or SelectionPolicy()
        rng = rng or random.SystemRandom()
        self._rng = rng
        #: The MD's own SSRC in this conference's RTCP (PLI, NACK, speaker hints).
        self.ssrc = rng.getrandbits(32)
        self.speaker = speaker if speaker is not None else DominantSpeaker()
        self._sources: dict[LegId, _Source] = {}
        self._receivers: dict[LegId, _Receiver] = {}
        self._streams: dict[int, _Stream] = {}
        #: video SSRC -> receivers waiting for a key frame of it, with since when.
        self._pending: dict[int, dict[_Receiver, float]] = {}
        self._joins = 0
        self._next_rate = None  # type: float | None
        self._hint_sequence = 0
        #: link leg id -> the announcement being assembled from it
        self._links: dict[LegId, _Assembly] = {}
        self._announce_due = False
        self._next_announce: float | None = None
        #: SSRC from a link, not announced (yet) -> when first seen (inf: given up, forwarded)
        self._unannounced: dict[int, float] = {}
        self._generation = 0
        #: Set when :meth:`next_timer` may have changed (the plane reads and clears it).
        self.timers_changed = True
        self._dirty = False

    # -- legs ----------------------------------------------------------------------------

    def add_source(self, leg_id: LegId, plan: StreamPlan | None = None) -> None:
        """An endpoint leg that sends (its offer's plan).  A link's senders are
        announced by the MD on the other side (:meth:`announced`)."""
        if leg_id not in self._sources:
            self._joins += 1
            self._sources[leg_id] = _Source(leg_id, leg_id, self._rng.getrandbits(32),
                                            plan or StreamPlan(), self._joins)

    def add_receiver(self, leg_id: LegId, muted: set[int], skipped: dict[int, int], *,
                     link: bool = False) -> None:
        """A leg that receives: ``muted``/``skipped`` are the plane's own for it."""
        if leg_id in self._receivers:
            return
        receiver = _Receiver(leg_id, muted, skipped, link)
        self._receivers[leg_id] = receiver
        if link:
            self._links[leg_id] = _Assembly()
            self._announce_due = True
        if not link:  # video from the next decision on (poll, at once)
            muted.update(s for s, stream in self._streams.items()
                         if stream.kind == "video" and stream.source.via != leg_id)
        self._dirty = self.timers_changed = True

    def remove(self, leg_id: LegId) -> None:
        """The leg went: as a receiver, and every source it brought (an endpoint's
        own; a link's, the senders behind it)."""
        receiver = self._receivers.pop(leg_id, None)
        if receiver is not None:
            for waiting in self._pending.values():
                waiting.pop(receiver, None)
        if self._links.pop(leg_id, None) is not None:
            self._unannounced.clear()  # their links' packets come again if still linked
        for source in [s for s in self._sources.values() if s.via == leg_id]:
            self._drop_source(source)
        self._dirty = self.timers_changed = self._announce_due = True

    def _drop_source(self, source: _Source) -> None:
        del self._sources[source.key]
        self.speaker.remove(source.key)
        for stream in (*source.audio, *source.video):
            self._forget_stream(stream)
        for other in self._receivers.values():
            other.current.pop(source.key, None)
            other.target.pop(source.key, None)

    def _forget_stream(self, stream: _Stream) -> None:
        if self._streams.get(stream.ssrc) is stream:
            del self._streams[stream.ssrc]
        self._pending.pop(stream.ssrc, None)
        for other in self._receivers.values():
            other.muted.discard(stream.ssrc)
            other.segments.pop(stream.ssrc, None)

    def set_receive(self, leg_id: LegId, *, last_n: int | None = None,
                    max_height: int | None = None, max_bitrate: int | None = None) -> None:
        """A receiver's own wishes (join body or a later change); None: no limit."""
        receiver = self._receivers[leg_id]
        if last_n is not None and last_n < -1:
            raise ValueError("last_n must be -1 (all) or at least 0")
        for name, value in (("max_height", max_height), ("max_bitrate", max_bitrate)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive")
        receiver.last_n, receiver.max_height, receiver.max_bitrate = last_n, max_height, \
            max_bitrate
        self._dirty = self.timers_changed = True

    def receiver_view(self, leg_id: LegId) -> dict[str, object]:
        """What a receiver gets: per source (its leg id) the forwarded layer; its counters."""
        receiver = self._receivers[leg_id]
        layers = []
        for source_id, ssrc in receiver.current.items():
            stream = self._streams.get(ssrc)
            if stream is not None:
                layers.append({"source": source_id, "ssrc": ssrc, "rid": stream.rid,
                               "height": stream.height, "rate": round(stream.rate)})
        return {"layers": layers, "waiting": len(receiver.target),
                "last_n": receiver.last_n, "max_height": receiver.max_height,
                "max_bitrate": receiver.max_bitrate, **receiver.counters}

    def dominant(self) -> LegId | None:
        return self.speaker.dominant if self.policy.audio_levels else None

    # -- per packet ----------------------------------------------------------------------

    def rtp(self, leg_id: LegId, ssrc: int, packet: bytes, ekt_field: bytes,
            now: float) -> Output:
        """One packet the plane opened (outer layer removed) from ``leg_id``.

        Called before the plane forwards it: a switch this packet completes
        (a key frame) is in ``muted`` already.
        """
        stream = self._streams.get(ssrc)
        out: Output = []
        if stream is None:
            if leg_id in self._links:
                self._unannounced_from(ssrc, now)
                return out
            stream = self._learn(leg_id, ssrc, packet)
            if stream is None:
                return out
            if stream.kind == "video" and stream.source.first_video is None:
                stream.source.first_video = now
            if stream.kind == "video":  # a new layer: every receiver decides again
                ranked = self._ranked()
                for receiver in self._receivers.values():
                    out += self._decide(receiver, now, ranked)
        stream.bits += len(packet) << 3
        stream.packets += 1
        seq = (packet[2] << 8) | packet[3]
        top = stream.max_seq
        if top < 0:
            stream.base_seq = stream.max_seq = seq
        elif ((seq - top) & 0xFFFF) < 0x8000:  # ahead (RFC 3550 A.1, without probation)
            if seq < top:
                stream.cycles += 0x10000
            stream.max_seq = seq
        if stream.kind == "audio":
            if stream.source.plan.audio_level_id is not None and self.policy.audio_levels:
                self._audio_level(stream, packet, now)
            return out
        i = seq & _MASK
        stream.ring_packet[i] = packet
        stream.ring_ekt[i] = ekt_field
        stream.ring_seq[i] = seq
        if ssrc in self._pending:
            self._maybe_switch(stream, packet, seq)
        return out

    def _audio_level(self, stream: _Stream, packet: bytes, now: float) -> None:
        try:
            value = find_extension(packet, stream.source.plan.audio_level_id)  # type: ignore[arg-type]
            if value is not None:
                self.speaker.level(stream.source.key, audio_level(value)[0], now)
        except (ProtocolError, ValueError):
            return

    def _unannounced_from(self, ssrc: int, now: float) -> None:
        """An SSRC from a link before its announcement: held back from the endpoints
        (all its layers would reach them) for :data:`UNANNOUNCED_GRACE` seconds, then
        forwarded unselected (a peer that announces nothing: an MD forwarding all)."""
        if ssrc in self._unannounced:
            return
        self._unannounced[ssrc] = now
        for receiver in self._receivers.values():
            if not receiver.link:
                receiver.muted.add(ssrc)
        self.timers_changed = True

    def _learn(self, leg_id: LegId, ssrc: int, packet: bytes) -> _Stream | None:
        source = self._sources.get(leg_id)
        if source is None:
            return None
        plan = source.plan
        kind = "audio"
        rid = None
        try:
            if ssrc in plan.video_ssrcs:
                kind = "video"
            elif ssrc not in plan.audio_ssrcs and plan.mid_id is not None:
                value = find_extension(packet, plan.mid_id)
                if value is not None and media_id(value) in plan.video_mids:
                    kind = "video"
            if plan.rid_id is not None:
                value = find_extension(packet, plan.rid_id)
                if value is not None:
                    rid = stream_id(value)
                    kind = "video"
        except (ProtocolError, ValueError):
            pass
        stream = _Stream(ssrc, source, kind, rid,
                         plan.rid_heights.get(rid) if rid is not None else None)
        self._streams[ssrc] = stream
        if self._links:
            self._announce_due = self.timers_changed = True
        if kind == "audio":
            source.audio.append(stream)
            if self.policy.audio_top_k:
                self._dirty = self.timers_changed = True
            return stream
        source.video.append(stream)
        source.sort_layers()
        for receiver in self._receivers.values():
            if not receiver.link and receiver.leg_id != leg_id:
                receiver.muted.add(ssrc)
        return stream

    def _maybe_switch(self, stream: _Stream, packet: bytes, seq: int) -> None:
        marking = stream.source.plan.frame_marking_id
        if marking is not None:
            try:
                value = find_extension(packet, marking)
            except ProtocolError:
                return
            if value is None or not is_keyframe_start(value):
                return
        waiting = self._pending.pop(stream.ssrc)
        self.timers_changed = True
        source_id = stream.source.key
        ssrc = stream.ssrc
        for receiver in waiting:
            if receiver.target.get(source_id) != ssrc:
                continue
            del receiver.target[source_id]
            old = receiver.current.get(source_id)
            if old is not None:
                receiver.muted.add(old)
            receiver.muted.discard(ssrc)
            receiver.current[source_id] = ssrc
            receiver.counters["layer_switches"] += 1
            offset = receiver.skipped.get(ssrc, 0)
            segments = receiver.segments.setdefault(ssrc, [])
            segments.append(((seq - offset) & 0xFFFF, offset))
            del segments[:-_SEGMENTS_KEPT]

    # -- decisions -----------------------------------------------------------------------

    def _ranked(self) -> list[_Source]:
        """Sources, most relevant first: recent dominant speakers, then join order."""
        sources = sorted(self._sources.values(), key=lambda s: s.joined)
        if not self.policy.audio_levels:
            return sources
        order = self.speaker.recent(len(sources))
        rank = {key: i for i, key in enumerate(order)}
        return sorted(sources, key=lambda s: (rank.get(s.key, len(rank)), s.joined))

    def _decide(self, receiver: _Receiver, now: float,
                ranked: list[_Source] | None = None) -> Output:
        """Choose, for one receiver, each source's layer (or none) and the audio it gets."""
        if receiver.link:
            return []
        ranked = self._ranked() if ranked is None else ranked
        others = [s for s in ranked if s.via != receiver.leg_id]
        policy = self.policy
        top_k = policy.audio_top_k
        if top_k:
            for i, source in enumerate(others):
                for stream in source.audio:
                    if i < top_k:
                        receiver.muted.discard(stream.ssrc)
                    else:
                        receiver.muted.add(stream.ssrc)
        n = policy.last_n
        if receiver.last_n is not None and (n < 0 or 0 <= receiver.last_n < n):
            n = receiver.last_n
        video = [s for s in others if s.video]
        chosen = video if n < 0 else video[:n]
        budget = min((b for b in (receiver.remb, receiver.max_bitrate) if b is not None),
                     default=math.inf)
        out: Output = []
        for source in video:
            if not source.complete(now):
                continue  # decided once its layers are known (a later packet, or poll)
            pick = None
            if source in chosen:
                pick = self._layer_for(source, receiver.max_height, budget)
                if pick is not None:
                    budget -= pick.rate
            out += self._aim(receiver, source, pick, now)
        return out

    @staticmethod
    def _layer_for(source: _Source, max_height: int | None, budget: float) -> _Stream | None:
        layers = source.video
        allowed = [s for s in layers
                   if max_height is None or s.height is None or s.height <= max_height]
        if not allowed:
            allowed = layers[:1]
        for stream in reversed(allowed):
            if stream.rate <= budget:
                return stream
        return None if math.isfinite(budget) and allowed[0].rate > budget else allowed[0]

    def _aim(self, receiver: _Receiver, source: _Source, pick: _Stream | None,
             now: float) -> Output:
        source_id = source.key
        current = receiver.current.get(source_id)
        waited = receiver.target.pop(source_id, None)
        if waited is not None:
            self._pending.get(waited, {}).pop(receiver, None)
        if pick is None:
            if current is not None:
                receiver.muted.add(current)
                del receiver.current[source_id]
            return []
        if pick.ssrc == current:
            return []
        receiver.target[source_id] = pick.ssrc
        self._pending.setdefault(pick.ssrc, {})[receiver] = now
        self.timers_changed = True
        if source.plan.frame_marking_id is None:  # no way to see key frames: switch now
            self._switch_now(receiver, pick)
            return []
        return self._keyframe(pick, receiver, now)

    def _switch_now(self, receiver: _Receiver, stream: _Stream) -> None:
        self._pending.get(stream.ssrc, {}).pop(receiver, None)
        if not self._pending.get(stream.ssrc, True):
            del self._pending[stream.ssrc]
        source_id = stream.source.key
        receiver.target.pop(source_id, None)
        old = receiver.current.get(source_id)
        if old is not None:
            receiver.muted.add(old)
        receiver.muted.discard(stream.ssrc)
        receiver.current[source_id] = stream.ssrc
        receiver.counters["layer_switches"] += 1
        # its next packet's number is not known here: NACKs from before are not answered
        receiver.segments[stream.ssrc] = []

    def _keyframe(self, stream: _Stream, receiver: _Receiver | None, now: float) -> Output:
        """A PLI for ``stream`` to its source's leg, at most one per ``pli_interval``."""
        if receiver is not None:
            receiver.counters["plis_requested"] += 1
        if now - stream.last_pli < self.policy.pli_interval:
            return []
        stream.last_pli = now
        pli = build_pli(self.ssrc, stream.ssrc)
        return [SendRtcp(stream.source.via, build_compound([pli]))]

    # -- feedback ------------------------------------------------------------------------

    def feedback(self, leg_id: LegId, item: Feedback, now: float) -> Output:
        """RTCP feedback from a receiver (endpoint or link), consumed here (module docstring)."""
        receiver = self._receivers.get(leg_id)
        if receiver is None:
            return []
        kind = item.kind
        if kind == "nack":
            return self._nack(receiver, item, now)
        if kind in ("pli", "fir"):
            receiver.counters["plis_received"] += 1
            out: Output = []
            for ssrc in item.media_ssrcs:
                stream = self._streams.get(ssrc)
                if stream is not None and stream.source.via != leg_id:
                    out += self._keyframe(stream, receiver, now)
            return out
        if kind == "remb" and not receiver.link:
            previous = receiver.remb
            receiver.remb = item.bitrate
            receiver.counters["remb_bitrate"] = item.bitrate
            if previous is None or abs(item.bitrate - previous) > _REMB_HYSTERESIS * previous:
                return self._decide(receiver, now)
        return []

    @staticmethod
    def _original(receiver: _Receiver, ssrc: int, seq: int) -> int | None:
        """The sender's SEQ of what ``receiver`` got as ``seq`` (its numbering), or None.

        Exact or nothing: a retransmission re-seals under the receiver's key and
        that index, so it must be the very packet first sent under it (the same
        plaintext under the same GCM nonce, RFC 7714 s8.1).  The offsets in
        force are known from each switch on (:attr:`_Receiver.segments`); a
        number before the oldest one kept is not answered.
        """
        segments = receiver.segments.get(ssrc)
        if not segments:
            return None if receiver.skipped.get(ssrc) else seq
        after = None  # the start of the next (newer) segment
        for start, offset in reversed(segments):
            if (seq - start) & 0xFFFF < 0x8000 and (
                    after is None or 0 < (after - seq) & 0xFFFF < 0x8000):
                return (seq + offset) & 0xFFFF
            after = start
        return None

    def _nack(self, receiver: _Receiver, item: Feedback, now: float) -> Output:
        receiver.counters["nacks_received"] += 1
        out: Output = []
        for ssrc in item.media_ssrcs:
            stream = self._streams.get(ssrc)
            if stream is None or stream.source.via == receiver.leg_id:
                continue
            missing: list[int] = []
            for seq in item.seqs:
                original = self._original(receiver, ssrc, seq)
                if original is None:
                    continue
                i = original & _MASK
                packet = stream.ring_packet[i] if stream.kind == "video" else None
                if packet is not None and stream.ring_seq[i] == original:
                    out.append(Retransmit(receiver.leg_id, packet, stream.ring_ekt[i], seq))
                    receiver.counters["retransmitted"] += 1
                else:
                    missing.append(original)
            if missing:
                receiver.counters["nacks_forwarded"] += 1
                nack = build_nack(self.ssrc, ssrc, missing)
                out.append(SendRtcp(stream.source.via, build_compound([nack])))
        return out

    def sender_report(self, ssrc: int, ntp: int, now: float) -> None:
        """An SR of ``ssrc`` passed on: its NTP time for our reports' LSR/DLSR."""
        stream = self._streams.get(ssrc)
        if stream is not None:
            stream.last_sr = (ntp >> 16) & 0xFFFFFFFF
            stream.last_sr_at = now

    def _receiver_reports(self, now: float) -> Output:
        """The MD's own RR to each sending leg (RTCP terminated per hop, RFC 3550
        s6.4.2): what this hop received of each of its SSRCs, as an SFU reports it."""
        blocks: dict[LegId, list[ReportBlock]] = {}
        for source in self._sources.values():
            for stream in (*source.audio, *source.video):
                if stream.max_seq < 0:
                    continue
                highest = stream.cycles + stream.max_seq
                expected = highest - stream.base_seq + 1
                lost = expected - stream.packets
                interval = expected - stream.prior_expected
                got = stream.packets - stream.prior_received
                stream.prior_expected, stream.prior_received = expected, stream.packets
                fraction = (((interval - got) << 8) // interval
                            if interval > 0 and interval > got else 0)
                dlsr = (int((now - stream.last_sr_at) * 65536) & 0xFFFFFFFF
                        if stream.last_sr else 0)
                blocks.setdefault(source.via, []).append(ReportBlock(
                    stream.ssrc, min(fraction, 255), max(-0x800000, min(lost, 0x7FFFFF)),
                    highest & 0xFFFFFFFF, 0, stream.last_sr, dlsr))
        out: Output = []
        for via, items in blocks.items():
            for i in range(0, len(items), 31):
                report = receiver_report(self.ssrc, items[i:i + 31])
                out.append(SendRtcp(via, build_compound([report])))
        return out

    # -- cascade links -------------------------------------------------------------------

    def announced(self, link_id: LegId, announcement: Announcement, now: float) -> None:
        """A part of a peer MD's announcement over ``link_id``: once every part of its
        generation is in, the link's senders are exactly those it lists."""
        assembly = self._links.get(link_id)
        if assembly is None:
            return
        if assembly.generation != announcement.generation:
            assembly.generation, assembly.parts = announcement.generation, {}
        assembly.parts[announcement.part] = announcement
        if len(assembly.parts) < announcement.parts:
            return
        entries = [e for i in range(announcement.parts) for e in assembly.parts[i].entries]
        assembly.parts = {}
        self._apply(link_id, entries)

    def link_up(self, link_id: LegId) -> None:
        """A link (re)keyed: it gets the announcement at once, not at the next interval."""
        if link_id in self._links:
            self._announce_due = self.timers_changed = True

    def _apply(self, link_id: LegId, entries: list[StreamEntry]) -> None:
        changed = False
        listed: dict[Hashable, list[StreamEntry]] = {}
        for entry in entries:
            listed.setdefault((link_id, entry.tag), []).append(entry)
        for source in [s for s in self._sources.values() if s.via == link_id]:
            if source.key not in listed:
                self._drop_source(source)
                changed = True
        for key, items in listed.items():
            source = self._sources.get(key)
            plan = StreamPlan(
                audio_level_id=next((e.audio_level_id for e in items if e.kind == "audio"),
                                    None),
                frame_marking_id=next((e.frame_marking_id for e in items
                                       if e.kind == "video"), None))
            if source is None:
                self._joins += 1
                source = self._sources[key] = _Source(key, link_id, key[1], plan,  # type: ignore[index]
                                                      self._joins)
                changed = True
            elif source.plan != plan:
                source.plan = plan
            ssrcs = {e.ssrc for e in items}
            for stream in [*source.audio, *source.video]:
                if stream.ssrc not in ssrcs:
                    (source.audio if stream.kind == "audio" else source.video).remove(stream)
                    self._forget_stream(stream)
                    changed = True
            for entry in items:
                if self._unannounced.pop(entry.ssrc, None) is not None:
                    for receiver in self._receivers.values():
                        receiver.muted.discard(entry.ssrc)  # video: muted again below
                known = self._streams.get(entry.ssrc)
                if known is not None:
                    if known.source is source:
                        known.rid, known.height = entry.rid, entry.height
                    continue  # another neighbour's (a loop): the plane drops its packets
                stream = _Stream(entry.ssrc, source, entry.kind, entry.rid, entry.height)
                self._streams[entry.ssrc] = stream
                changed = True
                if entry.kind == "audio":
                    source.audio.append(stream)
                    continue
                source.video.append(stream)
                if source.first_video is None:
                    source.first_video = -math.inf  # its layers come announced together
                for receiver in self._receivers.values():
                    if not receiver.link:
                        receiver.muted.add(entry.ssrc)
            source.sort_layers()
        if changed:
            self._dirty = self.timers_changed = self._announce_due = True

    def _announcements(self, now: float) -> Output:
        """Every link gets the streams of every sender not behind it (a tree: each MD
        passes on what it learnt from its other links)."""
        self._announce_due = False
        self._next_announce = now + ANNOUNCE_INTERVAL
        self._generation += 1
        out: Output = []
        for link_id in self._links:
            entries = [
                StreamEntry(s.tag, stream.ssrc, stream.kind,
                            s.plan.audio_level_id if stream.kind == "audio" else None,
                            s.plan.frame_marking_id if stream.kind == "video" else None,
                            stream.height, stream.rid)
                for s in self._sources.values() if s.via != link_id
                for stream in (*s.audio, *s.video)]
            packets = build_announcements(self.ssrc, self._generation, entries)
            out += [SendRtcp(link_id, build_compound([p])) for p in packets]
        return out

    # -- time ----------------------------------------------------------------------------

    def next_timer(self) -> float | None:
        """When :meth:`poll` should run next (0.0: at once; None: nothing to do)."""
        if self._dirty or (self._announce_due and self._links):
            return 0.0
        times = [t for t in (self.speaker.next_timer(), self._next_rate) if t is not None]
        if self._links and self._next_announce is not None:
            times.append(self._next_announce)
        times += [s.first_video + LAYERS_WAIT for s in self._sources.values()
                  if s.first_video is not None and len(s.video) < len(s.plan.rid_heights)]
        wait = self.policy.keyframe_wait
        times += [min(waiting.values()) + wait for waiting in self._pending.values() if waiting]
        times += [seen + UNANNOUNCED_GRACE for seen in self._unannounced.values()
                  if seen != math.inf]
        return min(times) if times else None

    def poll(self, now: float) -> Output:
        """Speaker decisions, layer rates, re-decisions and re-asked key frames due by ``now``."""
        out: Output = []
        changed = self._dirty
        self._dirty = False
        self.timers_changed = True
        if self.policy.audio_levels and self.speaker.poll(now) is not None:
            changed = True
            out += self._hints()
        if self._next_rate is None:
            self._next_rate = now + RATE_INTERVAL
        elif now >= self._next_rate:
            elapsed = RATE_INTERVAL + (now - self._next_rate)
            for source in self._sources.values():
                for stream in source.video:
                    stream.rate = stream.bits / elapsed
                    stream.bits = 0
                source.sort_layers()
            self._next_rate = now + RATE_INTERVAL
            changed = True
            out += self._receiver_reports(now)
        if changed:
            ranked = self._ranked()
            for receiver in self._receivers.values():
                out += self._decide(receiver, now, ranked)
        if self._links and (self._announce_due or self._next_announce is None
                            or now >= self._next_announce):
            out += self._announcements(now)
        for ssrc, seen in self._unannounced.items():
            if now - seen >= UNANNOUNCED_GRACE:
                self._unannounced[ssrc] = math.inf
                for receiver in self._receivers.values():
                    receiver.muted.discard(ssrc)
        for ssrc, waiting in list(self._pending.items()):
            if not waiting:
                del self._pending[ssrc]
                continue
            oldest = min(waiting.values())
            if now - oldest >= self.policy.keyframe_wait:
                stream = self._streams[ssrc]
                out += self._keyframe(stream, None, now)
                for receiver in waiting:
                    waiting[receiver] = now
        return out

    def _hints(self) -> Output:
        """The speaker order, to every endpoint receiver (RTCP APP "PERC")."""
        self._hint_sequence = (self._hint_sequence + 1) & 0xFFFFFFFF
        speakers = tuple(s.audio[0].ssrc for s in self._ranked() if s.audio)
        if not speakers:
            return []
        plain = build_compound([build_speaker_hint(
            self.ssrc, SpeakerHint(self._hint_sequence, speakers))])
        return [SendRtcp(r.leg_id, plain) for r in self._receivers.values() if not r.link]
