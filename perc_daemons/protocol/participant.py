"""The reference endpoint's session with a PERC conference, sans-I/O (RFC 8871).

One :class:`ParticipantSession` is one endpoint in one conference: it talks
to the Media Distributor's ICE-lite address only, and through it, end to end,
to the Key Distributor.  Bytes and an explicit ``now`` in, datagrams (all for
:attr:`ParticipantSession.md_address`) and events out; no sockets, no clock,
no Twisted.  The UDP glue must hand in only datagrams that came from
``md_address`` (RFC 8445 section 7.2.5.2.1: a connected socket does it).

What it does, in order:

1. ICE (RFC 8445 section 7.2, full agent, controlling, facing an ICE-lite
   MD): a STUN Binding request with USERNAME ``"<md ufrag>:<our ufrag>"``,
   PRIORITY, ICE-CONTROLLING, USE-CANDIDATE, MESSAGE-INTEGRITY under the MD's
   ice-pwd and FINGERPRINT, retransmitted after 0.5 s, doubling, seven
   transmissions at most (RFC 8489 section 6.2.1).  A response counts only if
   its transaction id is one we sent and its FINGERPRINT and
   MESSAGE-INTEGRITY (the MD's ice-pwd) verify (RFC 8489 sections 6.3.3,
   9.1.4).  Then consent freshness (RFC 7675): a new check every
   ``consent_interval`` seconds (randomised by +-20 %, section 5.1); without
   a success for ``consent_timeout`` seconds the session ends.
2. DTLS-SRTP with the KD (RFC 5764, RFC 8842, RFC 8844, RFC 9185): client
   role, the KD's certificate fingerprint and tls-id from the *verified*
   signed answer, ours in the offer.  The handshake must negotiate a DOUBLE
   profile (RFC 8723) and an EKT cipher (RFC 8870 section 5.2.1) at least as
   strong as the SRTP cipher (section 6), otherwise the session is refused
   for good (fail closed).
3. Media: the exporter output is split (RFC 8723 section 5); the outer halves
   key the hop to and from the MD, the inner keys come from EKT.  The first
   EKTKey (RFC 8870 section 5.2.2) creates our :class:`EktSender` (which
   draws our end-to-end key), every later one rotates it
   (:meth:`EktSender.rekey`, section 4.5); every EKTKey is kept for
   receiving until its ttl runs out (section 4.3.2, 5.2.2).  RTP goes out
   through :class:`DoubleSender` and comes in through
   :class:`DoubleReceiver`; RTCP is hop-by-hop only (RFC 8723 section 6).
   Several sending SSRCs: the audio one (``ssrc``) and up to three video
   ones (``video_ssrcs``, simulcast encodings h/m/l, RFC 8853), each with
   its own :class:`EktSender` and :class:`DoubleSender`, all rekeyed on
   every new EKTKey.  The header extensions written (RFC 8285: MID,
   RtpStreamId, RFC 6464 audio level, frame marking) are the ones the
   verified *answer* kept, with its ids; they stay outside the inner layer
   (RFC 8723 s5.1), so the MD can read them.
4. Repair and feedback (RFC 4585, :mod:`perc_daemons.protocol.repair`):
   the last 512 datagrams per sending SSRC are kept and sent again, as
   they are, for a generic NACK; a PLI or FIR for one of our SSRCs is a
   :class:`KeyframeRequested` event.  Receiving, loss is counted on the
   *outer* sequence number (RFC 8723 s5.3: what the MD delivered; an MD
   that withholds and renumbers shows no loss), gaps become NACKs after a
   10 ms reorder wait, retried twice 50 ms apart, given up after 500 ms
   (:meth:`ParticipantSession.handle_timer`).  :meth:`~ParticipantSession.send_rtcp`
   adds REMB (draft-alvestrand-rmcat-remb-03) when asked; speaker hints
   (RTCP APP "PERC") are :class:`SpeakerHintReceived` events.
5. A close_notify from the KD (keys revoked), our own :meth:`close`, a DTLS
   failure after the handshake or lost consent end the session: every key
   is dropped (contexts closed), no media goes in or out afterwards.

Received datagrams are demultiplexed by their first byte (RFC 7983 section
7).  Nothing received ever raises: anything malformed, unauthenticated,
replayed or unexpected is dropped and counted in
:attr:`ParticipantSession.drops` by reason; media failures also produce a
:class:`DecryptFailed` event.

Keys never appear in a repr or an event.  :meth:`ParticipantSession.audit_secrets`
exists only for the "the MD never held an inner key" proof (tests, demo).
"""

from __future__ import annotations

import base64
import hmac
import os
import struct
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum, auto

from cryptography.hazmat.primitives.asymmetric import ec

from perc_daemons.protocol import extensions, sdp
from perc_daemons.protocol.answer import VerifiedAnswer
from perc_daemons.protocol.double import (
    DOUBLE_PROFILES,
    DoubleReceiver,
    DoubleSender,
    split_keying_material,
)
from perc_daemons.protocol.dtls import (
    ConnectionClosed,
    DtlsConfiguration,
    DtlsConnection,
    EktKeyReceived,
    HandshakeComplete,
    Role,
)
from perc_daemons.protocol.dtls.alerts import AlertDescription
from perc_daemons.protocol.dtls.crypto import format_fingerprint
from perc_daemons.protocol.ekt import (
    FULL_EKT_TYPE,
    EktCipher,
    EktError,
    EktParameterSet,
    EktReceiver,
    EktSender,
    ExpiredEktKey,
    FullEktField,
    LearnedKey,
    ekt_field_length,
)
from perc_daemons.protocol.errors import ProtocolError
from perc_daemons.protocol.extensions import FrameMarks
from perc_daemons.protocol.feedback import (
    Feedback,
    FeedbackError,
    build_fir,
    build_nack,
    build_remb,
    parse_feedback,
    parse_speaker_hint,
)
from perc_daemons.protocol.identity import encode_sdp_identity
from perc_daemons.protocol.repair import NackTracker, SendHistory
from perc_daemons.protocol.rtp import (
    APP,
    PSFB,
    PSFB_PLI,
    RTPFB,
    ReportBlock,
    RtcpPacket,
    RtpPacket,
    build_compound,
    header_info,
    parse_compound,
    parse_fixed_header,
    receiver_report,
)
from perc_daemons.protocol.sdp import new_tls_id
from perc_daemons.protocol.srtp import (
    LAYER_KEY_LENGTH,
    AuthenticationFailed,
    MalformedSrtp,
    Profile,
    SrtpContext,
)
from perc_daemons.protocol.stun import (
    ATTR_ICE_CONTROLLING,
    ATTR_MESSAGE_INTEGRITY,
    ATTR_PRIORITY,
    ATTR_USE_CANDIDATE,
    ATTR_USERNAME,
    BINDING_REQUEST,
    StunError,
    StunMessage,
    check_fingerprint,
    check_integrity,
    is_stun,
)

__all__ = [
    "DEFAULT_EKT_CIPHERS",
    "DEFAULT_PROFILES",
    "NO_KEY_REASONS",
    "Closed",
    "Connected",
    "DecryptFailed",
    "EktKeyInstalled",
    "Event",
    "KeyframeRequested",
    "MediaReceived",
    "NotReady",
    "ParticipantSession",
    "Refused",
    "RtcpReceived",
    "SenderStats",
    "SpeakerHintReceived",
    "build_offer",
    "new_ice_credentials",
    "new_tls_id",
]

DEFAULT_PROFILES = (Profile.DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM,
                    Profile.DOUBLE_AEAD_AES_256_GCM_AEAD_AES_256_GCM)
DEFAULT_EKT_CIPHERS = (EktCipher.AESKW_128, EktCipher.AESKW_256)

#: Offer media kinds: (m= media, payload type, rtpmap value).
_KINDS = {
    "audio": ("audio", 0, "0 PCMU/8000"),
    "video": ("video", 96, "96 VP8/90000"),
}
_PROTO = "UDP/TLS/RTP/SAVPF"
#: The header extension ids we offer (SFU_SPEC; the MD reads them from the offer).
EXTMAP_IDS = {
    extensions.AUDIO_LEVEL_URI: 1,
    extensions.MID_URI: 2,
    extensions.RID_URI: 3,
    extensions.REPAIRED_RID_URI: 4,
    extensions.FRAME_MARKING_URI: 5,
}
#: Simulcast encodings, highest first: (rid-id, max-width, max-height) (RFC 8851 s5).
SIMULCAST_LAYERS = (("h", 1280, 720), ("m", 640, 360), ("l", 320, 180))
#: RFC 4585 s4.2 / RFC 5104 s7.1 feedback we offer for video (goog-remb: REMB draft s2).
_VIDEO_FEEDBACK = ("nack", "nack pli", "ccm fir", "goog-remb")

# STUN client timing (RFC 8489 section 6.2.1: RTO, Rc = 7, Rm = 16).
_STUN_RTO = 0.5
_STUN_MAX_TRANSMISSIONS = 7
_STUN_LAST_WAIT = 16 * _STUN_RTO
_MAX_PENDING_TRANSACTIONS = 16
#: RFC 7675 section 5.1: consent expires after 30 s without a response.
DEFAULT_CONSENT_TIMEOUT = 30.0
#: PRIORITY of a peer-reflexive candidate, component 1 (RFC 8445 section 5.1.2).
_PRFLX_PRIORITY = (110 << 24) | (65535 << 8) | 255

# RFC 3550 appendix A.1
_MAX_DROPOUT = 3000
_MAX_MISORDER = 100
_SEQ_MOD = 1 << 16

_RTP_MAX = 0xFFFFFFFF


#: DecryptFailed reasons meaning "no key for this packet" (RFC 8870 s4.3.2: an SPI or a
#: sender key we were not given), as opposed to an integrity failure with a key we hold.
NO_KEY_REASONS = frozenset({"ekt_unknown_spi", "e2e_key_unknown", "ekt_key_expired",
                            "e2e_key_held_back"})
#: A sender keeps protecting with its previous key this long after announcing a new one
#: (RFC 8870 s4.3.1: 250 ms), plus network jitter: until then a receiver that only
#: learned the new key (it joined in this epoch) cannot decrypt, by design.
_OLD_KEY_GRACE = 0.5


class NotReady(ProtocolError):
    """Media cannot be sent (yet, or any more): no DTLS keys, no EKTKey, refused or closed."""

    reason = "not_ready"


# -- events ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Connected:
    """DTLS-SRTP with the KD is done, DOUBLE profile and EKT negotiated (RFC 8870 s5.2.1)."""

    profile: Profile
    ekt_cipher: EktCipher


@dataclass(frozen=True)
class EktKeyInstalled:
    """An EKTKey arrived and is in use (RFC 8870 s5.2.2).

    ``epoch_index`` is its position in :attr:`ParticipantSession.epochs_seen`
    (0 for the first EKTKey of the session).
    """

    spi: int
    epoch_index: int


@dataclass(frozen=True)
class MediaReceived:
    """One RTP packet that passed both layers (RFC 8723 s5.3).

    ``sequence``, ``timestamp``, ``marker`` and ``payload_type`` are the
    sender's originals (the OHB restored); ``outer_sequence`` is the number
    the MD delivered it with (RFC 8723 s5.3: for playout order and loss;
    it differs when the MD withheld packets and renumbered); ``spi`` is the
    SPI of the EKTKey under which this sender's newest end-to-end key
    arrived, ``key_spi`` that of the key which decrypted this packet (they
    differ during the sender's old-key hold, RFC 8870 s4.3.1).
    """

    ssrc: int
    sequence: int
    timestamp: int
    marker: bool
    payload: bytes = field(repr=False)
    spi: int | None
    payload_type: int
    outer_sequence: int | None = None
    key_spi: int | None = None


@dataclass(frozen=True)
class DecryptFailed:
    """A media datagram was dropped.

    ``ssrc`` is set when the failure is attributable to a sender: the outer
    (hop-by-hop) layer authenticated, so the MD vouches for the header, and
    then EKT, the OHB or the end-to-end layer failed, or the MD replayed it.
    ``reason`` is the drop reason (a :attr:`ProtocolError.reason`).
    """

    ssrc: int | None
    reason: str


@dataclass(frozen=True)
class Refused:
    """The session will never carry media: DTLS failed, or it gave no DOUBLE profile or EKT."""

    reason: str


@dataclass(frozen=True)
class Closed:
    """The session ended (close_notify: keys revoked; local close; consent lost).

    Every key has been dropped.
    """

    reason: str


@dataclass(frozen=True)
class RtcpReceived:
    """A compound RTCP packet from the MD hop (hop-by-hop only, RFC 8723 s6)."""

    ssrc: int
    packets: tuple[RtcpPacket, ...]


@dataclass(frozen=True)
class KeyframeRequested:
    """A PLI (RFC 4585 s6.3.1) or FIR (RFC 5104 s4.3.1) asked for a key frame on our ``ssrc``.

    ``kind`` is "pli" or "fir".  A FIR repeating the last command sequence
    number for the SSRC is not reported again (RFC 5104 s4.3.1.2).
    """

    ssrc: int
    kind: str = "pli"


@dataclass(frozen=True)
class SpeakerHintReceived:
    """The MD's speaker hint (RTCP APP "PERC" subtype 1): audio SSRCs, dominant first."""

    sequence: int
    speakers: tuple[int, ...]


Event = (Connected | EktKeyInstalled | MediaReceived | DecryptFailed | Refused | Closed
         | RtcpReceived | KeyframeRequested | SpeakerHintReceived)


# -- statistics ------------------------------------------------------------------------


@dataclass(eq=False)
class SenderStats:
    """Reception statistics of one remote SSRC.

    ``packets``/``bytes`` count delivered packets and payload octets;
    ``lost`` is expected minus received from the sequence numbers recorded
    (a session records the outer ones, what the MD delivered, RFC 8723
    s5.3), extended as in RFC 3550 appendix A.1 and A.3; ``nacked`` the
    numbers requested by NACK, ``recovered`` those of them that came;
    ``decrypt_failures`` the failures attributable to this SSRC (see
    :class:`DecryptFailed`); ``epochs_seen`` the SPIs of the FullEKTFields
    of its delivered packets; ``first_time``/``last_time`` the ``now`` of the
    first and last delivered packet.
    """

    ssrc: int
    packets: int = 0
    bytes: int = 0
    decrypt_failures: int = 0
    #: Packets under a key we were never given (:data:`NO_KEY_REASONS`): sent before we
    #: joined or after we left; expected around membership changes, not an integrity failure.
    no_key: int = 0
    nacked: int = 0
    recovered: int = 0
    epochs_seen: set[int] = field(default_factory=set)
    first_time: float | None = None
    last_time: float | None = None
    _base_seq: int = field(default=0, repr=False)
    _max_seq: int = field(default=-1, repr=False)
    _cycles: int = field(default=0, repr=False)
    _bad_seq: int = field(default=_SEQ_MOD + 1, repr=False)
    _received: int = field(default=0, repr=False)
    _expected_prior: int = field(default=0, repr=False)
    _received_prior: int = field(default=0, repr=False)

    @property
    def extended_max(self) -> int:
        """The extended highest sequence number received (RFC 3550 A.1)."""
        return self._cycles + max(self._max_seq, 0)

    @property
    def expected(self) -> int:
        if self._max_seq < 0:
            return 0
        return self.extended_max - self._base_seq + 1

    @property
    def lost(self) -> int:
        """Cumulative packets lost (RFC 3550 A.3); duplicates can make it negative."""
        return self.expected - self._received

    def _init_seq(self, seq: int) -> None:
        self._base_seq = seq
        self._max_seq = seq
        self._bad_seq = _SEQ_MOD + 1
        self._cycles = 0
        self._received = 0
        self._expected_prior = 0
        self._received_prior = 0

    def update_seq(self, seq: int) -> bool:
        """RFC 3550 A.1 ``update_seq`` without probation (packets are authenticated).

        False when the packet is a large jump not (yet) taken as a restart;
        it is then not counted as received.
        """
        if self._max_seq < 0:
            self._init_seq(seq)
        else:
            udelta = (seq - self._max_seq) % _SEQ_MOD
            if udelta < _MAX_DROPOUT:
                if seq < self._max_seq:
                    self._cycles += _SEQ_MOD
                self._max_seq = seq
            elif udelta <= _SEQ_MOD - _MAX_MISORDER:
                if seq == self._bad_seq:
                    self._init_seq(seq)  # two in sequence: the sender restarted
                else:
                    self._bad_seq = (seq + 1) % _SEQ_MOD
                    return False
            # else: duplicate or reordered, counted below
        self._received += 1
        return True

    def record(self, seq: int, size: int, now: float, spi: int | None = None) -> None:
        """One packet of ``size`` payload octets delivered (``spi``: its FullEKTField's)."""
        self.update_seq(seq)
        self.packets += 1
        self.bytes += size
        if self.first_time is None:
            self.first_time = now
        self.last_time = now
        if spi is not None:
            self.epochs_seen.add(spi)

    def report_block_values(self) -> tuple[int, int, int]:
        """(fraction lost, cumulative lost, extended highest seq) for an RR (RFC 3550 A.3)."""
        expected = self.expected
        expected_interval = expected - self._expected_prior
        received_interval = self._received - self._received_prior
        self._expected_prior, self._received_prior = expected, self._received
        lost_interval = expected_interval - received_interval
        fraction = 0 if expected_interval <= 0 or lost_interval <= 0 else (
            (lost_interval << 8) // expected_interval)
        cumulative = max(-0x800000, min(self.lost, 0x7FFFFF))
        return min(fraction, 255), cumulative, self.extended_max & 0xFFFFFFFF

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly copy."""
        return {"ssrc": self.ssrc, "packets": self.packets, "bytes": self.bytes,
                "lost": self.lost, "decrypt_failures": self.decrypt_failures,
                "no_key": self.no_key, "nacked": self.nacked, "recovered": self.recovered,
                "epochs_seen": sorted(self.epochs_seen), "first_time": self.first_time,
                "last_time": self.last_time}


# -- offer -------------------------------------------------------------------------------


def new_ice_credentials() -> tuple[str, str]:
    """A fresh (ice-ufrag, ice-pwd): 48 and 144 random bits in ice-chars (RFC 8839 s5.4)."""
    ufrag = base64.b64encode(os.urandom(6)).decode("ascii")
    pwd = base64.b64encode(os.urandom(18)).decode("ascii")
    return ufrag, pwd


def _check_ssrc(ssrc: int, what: str = "ssrc") -> None:
    if not isinstance(ssrc, int) or not 0 <= ssrc <= _RTP_MAX:
        raise ValueError(f"{what} must be a 32-bit unsigned integer")


def build_offer(*, assertion_json: str, fingerprint: bytes, tls_id: str, ice_ufrag: str,
                ice_pwd: str, ssrc: int, cname: str, kind: str = "audio",
                video_ssrcs: Sequence[int] = (), audio_level: bool = True) -> str:
    """The endpoint's SDP offer (canonical, CRLF), BUNDLEd m= sections.

    Session level: ``a=identity`` (RFC 8827 s5, the base64 assertion JSON),
    ``a=group:BUNDLE``.  The first m= section, ``a=mid:0``, sends ``ssrc``
    (``audio``: PCMU, PT 0, ``a=extmap`` 1 audio level (RFC 6464, unless
    ``audio_level`` is False) and 2 MID (RFC 8843); ``video``: VP8, PT 96,
    extmap 2 MID and 5 frame marking).  With ``video_ssrcs`` (audio only)
    a second section, ``a=mid:1``, VP8 PT 96, extmap 2 MID, 3 RtpStreamId,
    4 RepairedRtpStreamId (declared only), 5 frame marking, one
    ``a=ssrc`` per SSRC and, for two or three SSRCs, simulcast: ``a=rid:h``,
    ``m``, ``l`` ``send`` with max-width/max-height 1280x720, 640x360,
    320x180 (RFC 8851), in that order, and ``a=simulcast:send h;m;l`` (RFC
    8853 s5.1).  Video sections offer ``a=rtcp-fb`` nack, nack pli, ccm fir
    and goog-remb, audio nack (RFC 4585 s4.2).  Every section carries
    ``c=IN IP4 0.0.0.0``, ``a=sendrecv``, the ICE credentials (RFC 8839),
    ``a=fingerprint:sha-256`` of our DTLS certificate (RFC 8122),
    ``a=setup:actpass`` (RFC 5763: the answerer makes us the DTLS client),
    ``a=tls-id`` (RFC 8842), ``a=rtcp-mux`` (RFC 5761), the rtpmap and
    ``a=ssrc:<ssrc> cname:<cname>`` (RFC 5576).  Raises ValueError for a
    parameter that would not make a valid offer.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {sorted(_KINDS)}")
    if len(fingerprint) != 32:
        raise ValueError("fingerprint must be a SHA-256 digest (32 bytes)")
    _check_ssrc(ssrc)
    video_ssrcs = tuple(video_ssrcs)
    for v in video_ssrcs:
        _check_ssrc(v, "video_ssrcs")
    if len(video_ssrcs) > len(SIMULCAST_LAYERS):
        raise ValueError(f"at most {len(SIMULCAST_LAYERS)} video SSRCs (simulcast h, m, l)")
    if len(set(video_ssrcs) | {ssrc}) != len(video_ssrcs) + 1:
        raise ValueError("every SSRC must be different")
    if video_ssrcs and kind != "audio":
        raise ValueError("video_ssrcs go with an audio first section (kind='audio')")
    if not cname or any(c.isspace() for c in cname) or not cname.isprintable():
        raise ValueError("cname must be non-empty printable text without whitespace")
    session_id = int.from_bytes(os.urandom(7), "big")
    transport = (
        sdp.Attribute("ice-ufrag", ice_ufrag),
        sdp.Attribute("ice-pwd", ice_pwd),
        sdp.Attribute("fingerprint", "sha-256 " + format_fingerprint(fingerprint)),
        sdp.Attribute("setup", "actpass"),
        sdp.Attribute("tls-id", tls_id),
        sdp.Attribute("rtcp-mux"),
    )

    def extmaps(uris: Sequence[str]) -> list[sdp.Attribute]:
        return [sdp.Attribute("extmap", f"{EXTMAP_IDS[uri]} {uri}") for uri in uris]

    def section(media_kind: str, mid: str, uris: Sequence[str], ssrcs: Sequence[int],
                extra: Sequence[sdp.Attribute] = ()) -> sdp.MediaDescription:
        media, pt, rtpmap = _KINDS[media_kind]
        feedback = _VIDEO_FEEDBACK if media_kind == "video" else ("nack",)
        attributes = (
            sdp.Attribute("mid", mid), sdp.Attribute("sendrecv"), *transport,
            *extmaps(uris), sdp.Attribute("rtpmap", rtpmap),
            *(sdp.Attribute("rtcp-fb", f"{pt} {f}") for f in feedback), *extra,
            *(sdp.Attribute("ssrc", f"{s} cname:{cname}") for s in ssrcs),
        )
        return sdp.MediaDescription(media, 9, _PROTO, (str(pt),),
                                    fields=(sdp.Field("c", "IN IP4 0.0.0.0"),),
                                    attributes=attributes)

    if kind == "audio":
        first_uris = ([extensions.AUDIO_LEVEL_URI] if audio_level else []) + [
            extensions.MID_URI]
    else:
        first_uris = [extensions.MID_URI, extensions.FRAME_MARKING_URI]
    sections = [section(kind, "0", first_uris, [ssrc])]
    if video_ssrcs:
        video = section("video", "1", [extensions.MID_URI, extensions.RID_URI,
                                       extensions.REPAIRED_RID_URI,
                                       extensions.FRAME_MARKING_URI], video_ssrcs)
        if len(video_ssrcs) > 1:
            layers = SIMULCAST_LAYERS[:len(video_ssrcs)]
            video = video.with_simulcast(
                [sdp.Rid(rid, "send", (), {"max-width": str(w), "max-height": str(h)})
                 for rid, w, h in layers],
                sdp.Simulcast(send=tuple((rid,) for rid, _w, _h in layers)))
        sections.append(video)
    description = sdp.SessionDescription(
        sdp.Origin(session_id=str(session_id), session_version="1"),
        attributes=(sdp.Attribute("identity", encode_sdp_identity(assertion_json)),
                    sdp.Attribute("group", " ".join(["BUNDLE", *(m.mid or "" for m in sections)]))),
        media=tuple(sections),
    )
    text = description.serialize()
    try:
        sdp.parse(text)  # every PERC attribute validated as a receiver will
    except sdp.SdpError as e:
        raise ValueError(f"offer parameters make invalid SDP: {e}") from None
    return text


# -- the session -------------------------------------------------------------------------


class _State(Enum):
    NEW = auto()
    CHECKING = auto()  # ICE: waiting for the first Binding success
    HANDSHAKING = auto()  # DTLS with the KD
    CONNECTED = auto()  # DTLS done, waiting for the first EKTKey
    READY = auto()
    REFUSED = auto()
    CLOSED = auto()


_TERMINAL = (_State.REFUSED, _State.CLOSED)


class _AuditingEktReceiver(EktReceiver):
    """An :class:`EktReceiver` that reports each learned key to its session."""

    def __init__(self, key_length: int, session: ParticipantSession) -> None:
        super().__init__(key_length)
        self._session = session

    def process(self, packet_ssrc: int, field: bytes | bytearray | memoryview,
                now: float) -> LearnedKey | None:
        learned = super().process(packet_ssrc, field, now)
        if learned is not None:
            self._session._learned(learned, now)
        return learned


class _Stream:
    """One sending SSRC: its payload type, header extensions, keys, sequence and history."""

    __slots__ = ("audio_level_id", "bytes", "ekt", "elements", "frame_marking_id", "history",
                 "kind", "last_fir", "packets", "payload_type", "retransmitted", "sender",
                 "sequence", "ssrc")

    def __init__(self, ssrc: int, kind: str, payload_type: int, sequence: int,
                 ids: Mapping[str, int], mid: str | None, rid: str | None) -> None:
        self.ssrc = ssrc
        self.kind = kind
        self.payload_type = payload_type
        self.sequence = sequence
        #: (id, value) of the elements on every packet: MID, RtpStreamId (RFC 8843, 8852)
        elements = []
        if mid is not None and (ident := ids.get(extensions.MID_URI)) is not None:
            elements.append((ident, extensions.encode_stream_id(mid)))
        if rid is not None and (ident := ids.get(extensions.RID_URI)) is not None:
            elements.append((ident, extensions.encode_stream_id(rid)))
        self.elements: tuple[tuple[int, bytes], ...] = tuple(elements)
        self.audio_level_id = ids.get(extensions.AUDIO_LEVEL_URI) if kind == "audio" else None
        self.frame_marking_id = (ids.get(extensions.FRAME_MARKING_URI) if kind == "video"
                                 else None)
        self.history = SendHistory()
        self.ekt: EktSender | None = None
        self.sender: DoubleSender | None = None
        self.last_fir: int | None = None
        self.packets = 0
        self.bytes = 0
        self.retransmitted = 0


def _negotiated_ids(media: sdp.MediaDescription) -> dict[str, int]:
    """URI -> id of the answer's ``a=extmap`` lines (RFC 8285 s5; inactive ones left out)."""
    return {e.uri: e.id for e in media.extmaps() if e.direction != "inactive"}


def _first_host_candidate(candidates: Sequence[str]) -> tuple[str, int] | None:
    for candidate in candidates:
        fields = candidate.split(" ")
        # foundation component transport priority address port "typ" type ...
        if (len(fields) >= 8 and fields[1] == "1" and fields[2].lower() == "udp"
                and fields[6] == "typ" and fields[7] == "host" and fields[5].isdigit()
                and 0 < int(fields[5]) <= 0xFFFF):
            return fields[4], int(fields[5])
    return None


class ParticipantSession:
    """One endpoint's session: ICE with the MD, DTLS-SRTP with the KD, double media.

    See the module docstring.  ``answer`` is the verified signed answer
    (:func:`~perc_daemons.protocol.answer.verify_signed_answer`): the MD's ICE
    credentials and host candidate, the KD's fingerprint and tls-id come from
    it and from nothing else.  ``profiles``/``ekt_ciphers`` are what the DTLS
    ClientHello offers; whatever is offered, only a DOUBLE profile with an EKT
    cipher leads to media.  ``keep_audit_secrets`` keeps copies of every
    secret for :meth:`audit_secrets`, also after the session ended: for
    proofs only (the demo, tests), never in a real client.
    ``initial_sequence`` continues the RTP sequence numbers of an earlier
    session of the same SSRC (:attr:`next_sequence`; a mapping SSRC ->
    number, :attr:`sequences`, for several), so receivers' replay lists and
    loss counts go on (RFC 3550 s5.1, RFC 3711 s3.3.2).

    ``video_ssrcs`` are the SSRCs of the offer's video section (mid 1, the
    simulcast encodings h, m, l in that order; :func:`build_offer`): they
    send when the answer accepted that section (:attr:`sending_ssrcs`).
    ``ssrc`` sends with the payload type and extensions of the answer's
    section ``mid 0`` (or its first accepted one).
    """

    def __init__(self, *, certificate: bytes, private_key: ec.EllipticCurvePrivateKey,
                 ssrc: int, ice_ufrag: str, ice_pwd: str, tls_id: str,
                 answer: VerifiedAnswer, profiles: Sequence[int] = DEFAULT_PROFILES,
                 ekt_ciphers: Sequence[int] = DEFAULT_EKT_CIPHERS,
                 consent_interval: float = 5.0,
                 consent_timeout: float = DEFAULT_CONSENT_TIMEOUT,
                 replay_window: int = 128, keep_audit_secrets: bool = False,
                 initial_sequence: int | Mapping[int, int] | None = None,
                 video_ssrcs: Sequence[int] = (), nack: bool = True) -> None:
        if not isinstance(answer, VerifiedAnswer):
            raise TypeError("answer must be a VerifiedAnswer (verify_signed_answer)")
        _check_ssrc(ssrc)
        for v in video_ssrcs:
            _check_ssrc(v, "video_ssrcs")
        if len(set(video_ssrcs) | {ssrc}) != len(video_ssrcs) + 1:
            raise ValueError("every SSRC must be different")
        if len(video_ssrcs) > len(SIMULCAST_LAYERS):
            raise ValueError(f"at most {len(SIMULCAST_LAYERS)} video SSRCs")
        if not consent_interval > 0 or not consent_timeout > consent_interval:
            raise ValueError("need 0 < consent_interval < consent_timeout")
        if not profiles:
            raise ValueError("profiles must not be empty")
        try:  # the same syntax checks as in our offer
            sdp.MediaDescription("audio", 9, _PROTO, ("0",)).with_ice_credentials(
                ice_ufrag, ice_pwd).with_tls_id(tls_id)
        except sdp.SdpError as e:
            raise ValueError(f"bad ICE credentials or tls-id: {e.message}") from None
        description = answer.answer
        media = next((m for m in description.media if m.port != 0), None)
        if media is None:
            raise ValueError("the answer accepts no m= section")
        md_ufrag = media.ice_ufrag or description.ice_ufrag
        md_pwd = media.ice_pwd or description.ice_pwd
        if md_ufrag is None or md_pwd is None:
            raise ValueError("the answer has no ICE credentials")
        address = _first_host_candidate(media.candidates())
        if address is None:
            raise ValueError("the answer has no UDP host candidate for component 1")
        if not media.formats or not media.formats[0].isdigit() or int(media.formats[0]) > 127:
            raise ValueError("the answer's m= section has no RTP payload type")

        self.ssrc = ssrc
        #: The MD's ICE-lite address: every datagram the session returns goes there.
        self.md_address: tuple[str, int] = address
        accepted = {m.mid: m for m in description.media if m.port != 0}
        main = accepted.get("0", media)
        if not main.formats or not main.formats[0].isdigit() or int(main.formats[0]) > 127:
            raise ValueError("the answer's m= section has no RTP payload type")
        self.payload_type = int(main.formats[0])
        if isinstance(initial_sequence, Mapping):
            sequences = dict(initial_sequence)
        else:
            sequences = {} if initial_sequence is None else {ssrc: initial_sequence}

        def first_sequence(of: int) -> int:
            # Random unless continuing an earlier session of the same SSRC (RFC 3550 s5.1).
            given = sequences.get(of)
            return (int.from_bytes(os.urandom(2), "big") if given is None
                    else given % _SEQ_MOD)

        self._streams: dict[int, _Stream] = {ssrc: _Stream(
            ssrc, main.media, self.payload_type, first_sequence(ssrc), _negotiated_ids(main),
            main.mid, None)}
        video = accepted.get("1")
        if video_ssrcs and video is not None and video.media == "video" and video.formats \
                and video.formats[0].isdigit() and int(video.formats[0]) <= 127:
            ids = _negotiated_ids(video)
            kept_rids = {r.id for r in video.rids()}
            for index, v in enumerate(video_ssrcs):
                rid = SIMULCAST_LAYERS[index][0] if len(video_ssrcs) > 1 else None
                self._streams[v] = _Stream(v, "video", int(video.formats[0]),
                                           first_sequence(v), ids, video.mid,
                                           rid if rid in kept_rids else None)
        #: Our SSRCs that send: ``ssrc`` first, then the video ones the answer accepted.
        self.sending_ssrcs: tuple[int, ...] = tuple(self._streams)
        #: The video SSRCs that send (empty when the answer rejected the video section).
        self.video_ssrcs: tuple[int, ...] = self.sending_ssrcs[1:]
        self._answer = answer
        self._ice_ufrag = ice_ufrag
        self._md_username = f"{md_ufrag}:{ice_ufrag}".encode()
        self._md_key = md_pwd.encode("utf-8")
        self._tiebreaker = os.urandom(8)
        self._consent_interval = consent_interval
        self._consent_timeout = consent_timeout
        self._replay_window = replay_window
        self._dtls_config = DtlsConfiguration(
            certificate, private_key,
            srtp_profiles=[int(p) for p in profiles],
            ekt_ciphers=[int(c) for c in ekt_ciphers],
            expected_peer_fingerprint=answer.kd_fingerprint,
            external_session_id=tls_id.encode("ascii"),
            expected_peer_external_session_id=answer.kd_tls_id.encode("ascii"),
        )
        self._state = _State.NEW
        self._events: deque[Event] = deque()
        self._dtls: DtlsConnection | None = None
        # STUN
        self._transactions: OrderedDict[bytes, bytes] = OrderedDict()  # tid -> request
        self._check_tid: bytes | None = None  # the initial check being retransmitted
        self._transmissions = 0
        self._stun_timer: float | None = None
        self._last_consent: float | None = None
        # keys
        self._profile: Profile | None = None
        self._ekt_cipher: EktCipher | None = None
        self._send_outer: SrtpContext | None = None
        self._recv_outer: SrtpContext | None = None
        self._receiver: DoubleReceiver | None = None
        self._ekt_receiver: EktReceiver | None = None
        self._ekt_params: dict[int, EktParameterSet] = {}
        self._ekt_expiry: dict[int, float] = {}
        self._sender_spi: dict[int, int] = {}
        #: Called with each RTP packet whose outer layer verified, that layer off (RTP
        #: header, inner ciphertext, OHB, EKTField), and its arrival time: a capture
        #: (:mod:`perc_daemons.protocol.recording`).  Set before the handshake ends.
        self.capture: Callable[[bytes, float], None] | None = None
        self._first_key_at: dict[int, float] = {}  # SSRC -> when we learnt its first key
        self._keep_audit = keep_audit_secrets
        self._audit: dict[bytes, None] = {}
        #: SPIs of the EKTKeys received, in order.
        self.epochs_seen: list[int] = []
        #: Per remote SSRC reception statistics.
        self.stats: dict[int, SenderStats] = {}
        #: Dropped datagrams by reason.
        self.drops: dict[str, int] = {}
        self.packets_sent = 0
        self.bytes_sent = 0
        #: Datagrams sent again for a NACK (RFC 4585 s6.2.1), over all our SSRCs.
        self.retransmitted = 0
        #: SRTCP compounds carrying a generic NACK sent.
        self.nacks_sent = 0
        #: The bitrate of the newest REMB received from the MD (bits/s), or None.
        self.remb_received: int | None = None
        self._nacks: dict[int, NackTracker] = {}  # remote SSRC -> receive-side repair
        #: Whether gaps are NACKed (off for a receiver that decrypts only some packets:
        #: the others are gaps to it, not losses).
        self.nack = nack
        self._fir_commands: dict[int, int] = {}  # remote SSRC -> last FIR seq nr sent

    def __repr__(self) -> str:
        return (f"<ParticipantSession ssrc={self.ssrc:#010x} state={self._state.name} "
                f"md={self.md_address!r}>")

    # -- queries ----------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """DTLS done with a DOUBLE profile and EKT, an EKTKey received, not ended."""
        return self._state is _State.READY

    @property
    def state(self) -> str:
        return self._state.name.lower()

    @property
    def answer(self) -> VerifiedAnswer:
        return self._answer

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def next_timer(self) -> float | None:
        if self._state in _TERMINAL:
            return None
        timers = [t for t in (self._stun_timer,) if t is not None]
        if self._last_consent is not None:
            timers.append(self._last_consent + self._consent_timeout)
        if self._dtls is not None and (t := self._dtls.get_timer()) is not None:
            timers.append(t)
        timers.extend(self._ekt_expiry.values())
        if self._send_outer is not None:
            timers.extend(t for n in self._nacks.values() if (t := n.next_timer()) is not None)
        return min(timers) if timers else None

    @property
    def next_sequence(self) -> int:
        """The RTP sequence number of the next packet :meth:`send_media` makes for ``ssrc``."""
        return self._streams[self.ssrc].sequence

    @property
    def sequences(self) -> dict[int, int]:
        """The next RTP sequence number of each sending SSRC (for ``initial_sequence``)."""
        return {ssrc: stream.sequence for ssrc, stream in self._streams.items()}

    def sent_counts(self) -> dict[int, dict[str, int]]:
        """Per sending SSRC: packets and payload bytes sent, datagrams retransmitted."""
        return {ssrc: {"packets": st.packets, "bytes": st.bytes,
                       "retransmitted": st.retransmitted}
                for ssrc, st in self._streams.items()}

    def sending_spi(self, ssrc: int | None = None) -> int | None:
        """The SPI of the EKTKey under which the key protecting ``ssrc``'s (default
        :attr:`ssrc`) packets was announced, as of its last packet
        (:attr:`EktSender.sending_spi`); None before the first EKTKey."""
        stream = self._streams.get(self.ssrc if ssrc is None else ssrc)
        return None if stream is None or stream.ekt is None else stream.ekt.sending_spi

    def audit_secrets(self) -> list[bytes]:
        """Every inner (end-to-end) key and salt this session derived, drew or learned,
        and every EKTKey and its salt: for the "the MD never saw a key" proof only."""
        return list(self._audit)

    # -- ICE ----------------------------------------------------------------------------

    def start(self, now: float) -> list[bytes]:
        """The first connectivity check (RFC 8445 s7.2.4); call once."""
        if self._state is not _State.NEW:
            raise RuntimeError("start() is called once, on a new session")
        self._state = _State.CHECKING
        request, tid = self._binding_request()
        self._check_tid = tid
        self._transmissions = 1
        self._stun_timer = now + _STUN_RTO
        return [request]

    def _binding_request(self) -> tuple[bytes, bytes]:
        """A Binding request as the controlling agent, nominating at once (RFC 8445 s7.2)."""
        tid = os.urandom(12)
        message = StunMessage(BINDING_REQUEST, tid, [
            (ATTR_USERNAME, self._md_username),
            (ATTR_PRIORITY, struct.pack("!I", _PRFLX_PRIORITY)),
            (ATTR_ICE_CONTROLLING, self._tiebreaker),
            (ATTR_USE_CANDIDATE, b""),
        ])
        request = message.encode(integrity_key=self._md_key, fingerprint=True)
        self._transactions[tid] = request
        while len(self._transactions) > _MAX_PENDING_TRANSACTIONS:
            self._transactions.popitem(last=False)
        return request, tid

    def _stun(self, data: bytes, now: float) -> list[bytes]:
        if not is_stun(data):
            return self._drop("stun_malformed")
        try:
            message = StunMessage.parse(data)
        except StunError:
            return self._drop("stun_malformed")
        if message.method != 0x001 or message.message_class in (0, 1):
            return self._drop("stun_unexpected")  # an ICE-lite MD sends no checks
        if message.transaction_id not in self._transactions:
            return self._drop("stun_unknown_transaction")
        if not check_fingerprint(data):
            return self._drop("stun_fingerprint")
        if message.get(ATTR_MESSAGE_INTEGRITY) is None:
            return self._drop("stun_unauthenticated")
        if not check_integrity(data, self._md_key):
            return self._drop("stun_integrity")
        del self._transactions[message.transaction_id]
        if message.message_class == 3:
            return self._drop("stun_error_response")
        self._last_consent = now
        if self._state is not _State.CHECKING:
            return []  # consent refreshed (RFC 7675 s5.1)
        # Nominated (USE-CANDIDATE, RFC 8445 s8.1.1): DTLS can start (RFC 5763 s5).
        self._check_tid = None
        self._stun_timer = now + self._next_consent_delay()
        self._state = _State.HANDSHAKING
        self._dtls = DtlsConnection(Role.CLIENT, self._dtls_config)
        self._dtls.connect(now)
        return self._drain_dtls(now)

    def _next_consent_delay(self) -> float:
        """consent_interval randomised over [0.8, 1.2] of it (RFC 7675 s5.1)."""
        fraction = int.from_bytes(os.urandom(2), "big") / 0xFFFF
        return self._consent_interval * (0.8 + 0.4 * fraction)

    # -- input ----------------------------------------------------------------------------

    def datagram_received(self, data: bytes, now: float) -> list[bytes]:
        """One datagram from the MD; returns datagrams to send to it (RFC 7983 s7 demux)."""
        if self._state in _TERMINAL:
            return self._drop("closed")
        if not data:
            return self._drop("empty")
        self._purge_ekt(now)
        b = data[0]
        if b <= 3:
            if self._state is _State.NEW:
                return self._drop("not_started")
            return self._stun(bytes(data), now)
        if 20 <= b <= 63:
            if self._dtls is None:
                return self._drop("dtls_before_ice")
            self._dtls.receive_datagram(bytes(data), now)
            return self._drain_dtls(now)
        if 128 <= b <= 191:
            if len(data) > 1 and 192 <= data[1] <= 223:
                return self._rtcp(bytes(data))
            else:
                self._rtp(bytes(data), now)
            return []
        return self._drop("unknown_kind")  # ZRTP, TURN channels, unassigned

    def _drop(self, reason: str) -> list[bytes]:
        self.drops[reason] = self.drops.get(reason, 0) + 1
        return []

    def _stats(self, ssrc: int) -> SenderStats:
        stats = self.stats.get(ssrc)
        if stats is None:
            stats = self.stats[ssrc] = SenderStats(ssrc)
            self._nacks[ssrc] = NackTracker()
        return stats

    def _arrived(self, ssrc: int, outer_seq: int, now: float) -> None:
        """The MD delivered outer ``outer_seq`` of ``ssrc``: gaps and recoveries (RFC 4585)."""
        stats = self._stats(ssrc)
        if self.nack and self._nacks[ssrc].received(outer_seq, now):
            stats.recovered += 1

    def _rtp(self, data: bytes, now: float) -> None:
        receiver = self._receiver
        if receiver is None or self._recv_outer is None:
            self._drop("not_keyed")
            return
        # Framing and the outer replay list first: what fails here is not
        # attributable to a sender (nothing authenticated the header yet).
        try:
            ekt_length = ekt_field_length(data)
            _h, seq, ssrc = header_info(data)
            self._recv_outer.estimate_roc(ssrc, seq)
        except ProtocolError as e:
            self._media_failure(None, e.reason)
            return
        try:
            received = receiver.unprotect(data, now)
        except (MalformedSrtp, AuthenticationFailed) as e:
            self._media_failure(None, e.reason)
            return
        except ProtocolError as e:
            # The outer layer authenticated: EKT, OHB, end-to-end layer or an
            # MD replay (RFC 8723 s5.3, RFC 8870 s4.3.2).
            reason = e.reason
            if (reason == "e2e_auth" and not self._stats(ssrc).packets
                    and now - self._first_key_at.get(ssrc, -_OLD_KEY_GRACE) < _OLD_KEY_GRACE):
                # Nothing from this sender decrypted yet, and we learnt its key just now:
                # it still protects with the previous epoch's key we were never given.
                reason = "e2e_key_held_back"
            self._arrived(ssrc, seq, now)  # it came: no NACK for it
            self._media_failure(ssrc, reason)
            return
        marker, pt, original_seq, timestamp, _ssrc = parse_fixed_header(received.packet)
        payload = received.payload
        spi = None
        if data[-1] == FULL_EKT_TYPE:
            try:
                spi = FullEktField.decode(data[len(data) - ekt_length:]).spi
            except EktError:  # pragma: no cover - processed above already
                pass
        outer_seq = received.outer_seq
        self._arrived(ssrc, outer_seq, now)
        self._stats(ssrc).record(outer_seq, len(payload), now, spi)
        self._events.append(MediaReceived(
            ssrc=ssrc, sequence=original_seq, timestamp=timestamp, marker=bool(marker),
            payload=payload, spi=self._sender_spi.get(ssrc), payload_type=pt,
            outer_sequence=outer_seq, key_spi=received.key_spi))

    def _media_failure(self, ssrc: int | None, reason: str) -> None:
        self._drop(reason)
        if ssrc is not None:
            stats = self._stats(ssrc)
            if reason in NO_KEY_REASONS:
                stats.no_key += 1
            else:
                stats.decrypt_failures += 1
        self._events.append(DecryptFailed(ssrc, reason))

    def _rtcp(self, data: bytes) -> list[bytes]:
        if self._recv_outer is None:
            return self._drop("not_keyed")
        try:
            plain = self._recv_outer.unprotect_rtcp(data)
            packets = parse_compound(plain, strict_first=False)
        except ProtocolError as e:
            return self._drop("rtcp_" + e.reason)
        ssrc = packets[0].ssrc
        if ssrc is None:
            return self._drop("rtcp_no_ssrc")
        self._events.append(RtcpReceived(ssrc, tuple(packets)))
        out: list[bytes] = []
        for packet in packets:
            try:
                if packet.packet_type in (RTPFB, PSFB):
                    feedback = parse_feedback(packet)
                    if feedback is not None:
                        out += self._feedback(feedback)
                elif packet.packet_type == APP:
                    hint = parse_speaker_hint(packet)
                    if hint is not None:
                        self._events.append(SpeakerHintReceived(hint.sequence,
                                                                tuple(hint.speakers)))
            except FeedbackError as e:
                self._drop("rtcp_" + e.reason)
        return out

    def _feedback(self, feedback: Feedback) -> list[bytes]:
        """A NACK resends from the history; PLI/FIR ask for a key frame (RFC 4585, 5104)."""
        if feedback.kind == "nack":
            stream = self._streams.get(feedback.media_ssrcs[0]) if feedback.media_ssrcs \
                else None
            if stream is None or self._state is not _State.READY:
                return []
            out = [d for seq in feedback.seqs if (d := stream.history.get(seq)) is not None]
            stream.retransmitted += len(out)
            self.retransmitted += len(out)
            return out
        if feedback.kind == "pli":
            for ssrc in feedback.media_ssrcs[:1]:
                if ssrc in self._streams:
                    self._events.append(KeyframeRequested(ssrc, "pli"))
        elif feedback.kind == "fir":
            for ssrc, command in zip(feedback.media_ssrcs, feedback.seqs, strict=False):
                stream = self._streams.get(ssrc)
                if stream is not None and stream.last_fir != command:
                    stream.last_fir = command
                    self._events.append(KeyframeRequested(ssrc, "fir"))
        elif feedback.kind == "remb":
            self.remb_received = feedback.bitrate
        return []

    def _learned(self, learned: LearnedKey, now: float) -> None:
        """A sender's new end-to-end key arrived in a FullEKTField (RFC 8870 s4.3.2)."""
        self._first_key_at.setdefault(learned.ssrc, now)
        self._sender_spi[learned.ssrc] = learned.spi
        self._remember(learned.master_key, learned.master_salt)

    def _remember(self, *secrets: bytes) -> None:
        if self._keep_audit:
            for secret in secrets:
                self._audit[bytes(secret)] = None

    # -- DTLS -----------------------------------------------------------------------------

    def _drain_dtls(self, now: float) -> list[bytes]:
        dtls = self._dtls
        assert dtls is not None
        while (event := dtls.next_event()) is not None:
            if self._state in _TERMINAL:
                continue
            if isinstance(event, HandshakeComplete):
                self._handshake_complete(event)
            elif isinstance(event, EktKeyReceived):
                self._ekt_key(event.params, now)
            elif isinstance(event, ConnectionClosed):
                self._dtls_closed(event)
        return dtls.datagrams_to_send(now)

    def _refuse(self, reason: str) -> None:
        """Fail closed, for good (RFC 8871 s4.5.1: media only under PERC keys)."""
        self._state = _State.REFUSED
        self._wipe()
        if self._dtls is not None:
            self._dtls.close()  # close_notify: the KD forgets the association
        self._events.append(Refused(reason))

    def _handshake_complete(self, event: HandshakeComplete) -> None:
        if self._state is not _State.HANDSHAKING:
            return
        profile = event.srtp_profile
        if profile is None or profile not in DOUBLE_PROFILES:
            name = "none" if profile is None else f"0x{profile:04x}"
            self._refuse(f"negotiated SRTP profile {name} is not DOUBLE (RFC 8723)")
            return
        if event.ekt_cipher is None:
            self._refuse("no EKT cipher negotiated (RFC 8870 s5.2.1)")
            return
        profile = Profile(profile)
        try:
            cipher = EktCipher.from_wire(event.ekt_cipher)
        except EktError:
            self._refuse(f"unknown EKT cipher {event.ekt_cipher}")
            return
        if cipher.key_length < LAYER_KEY_LENGTH[profile]:
            self._refuse(f"{cipher.name} is weaker than {profile.name} (RFC 8870 s6)")
            return
        # DtlsConnection checked both before deriving keys; checked again here.
        if not hmac.compare_digest(event.peer_fingerprint, self._answer.kd_fingerprint):
            self._refuse("the KD certificate is not the signed answer's")
            return
        if event.peer_external_session_id != self._answer.kd_tls_id.encode("ascii"):
            self._refuse("the KD tls-id is not the signed answer's")
            return
        keys = split_keying_material(profile, event.keying_material)
        self._profile, self._ekt_cipher = profile, cipher
        window = self._replay_window
        self._send_outer = keys.client_outer.context(window)
        self._recv_outer = keys.server_outer.context(window)
        self._ekt_receiver = _AuditingEktReceiver(LAYER_KEY_LENGTH[profile], self)
        self._receiver = DoubleReceiver(self._recv_outer, self._ekt_receiver,
                                        replay_window=window)
        self._receiver.on_outer = self.capture
        # The inner halves of the DTLS keys are not used (EKT supplies the
        # end-to-end keys) but are secrets all the same.
        self._remember(keys.client_inner.key, keys.client_inner.salt,
                       keys.server_inner.key, keys.server_inner.salt)
        self._state = _State.CONNECTED
        self._events.append(Connected(profile, cipher))

    def _ekt_key(self, params: EktParameterSet, now: float) -> None:
        """An EKTKey (RFC 8870 s5.2.2): keep it for receiving, (re)key our sender (s4.5)."""
        if self._state not in (_State.CONNECTED, _State.READY):
            return
        assert self._ekt_receiver is not None and self._profile is not None
        known = self._ekt_params.get(params.spi)
        if known is not None and known != params:
            self._drop("ekt_key_spi_reused")  # RFC 8870 s4.2: one set per SPI
            return
        try:
            self._ekt_receiver.add_parameter_set(params, now)
        except EktError as e:
            self._refuse(f"unusable EKTKey SPI {params.spi}: {e}")
            return
        self._ekt_expiry[params.spi] = now + params.ttl
        if known is not None:
            return  # the same key again: only its expiry is refreshed
        self._ekt_params[params.spi] = params
        self._remember(params.key, params.master_salt)
        for stream in self._streams.values():
            if stream.ekt is None:
                assert self._send_outer is not None
                stream.ekt = EktSender(stream.ssrc, LAYER_KEY_LENGTH[self._profile], params,
                                       now)
                stream.sender = DoubleSender(self._send_outer, stream.ekt,
                                             replay_window=self._replay_window)
            else:
                stream.ekt.rekey(params, now)
            self._remember(stream.ekt.current_key, stream.ekt.master_salt)
        self.epochs_seen.append(params.spi)
        self._state = _State.READY
        self._events.append(EktKeyInstalled(params.spi, len(self.epochs_seen) - 1))

    def _purge_ekt(self, now: float) -> None:
        expired = [spi for spi, at in self._ekt_expiry.items() if now >= at]
        if not expired:
            return
        if self._ekt_receiver is not None:
            self._ekt_receiver.purge_expired(now)
        for spi in expired:
            del self._ekt_expiry[spi]

    def _dtls_closed(self, event: ConnectionClosed) -> None:
        if self._state in (_State.NEW, _State.CHECKING, _State.HANDSHAKING):
            self._state = _State.REFUSED
            self._wipe()
            self._events.append(Refused(f"DTLS handshake with the KD failed: {event.reason}"))
            return
        if event.by_peer and event.alert == AlertDescription.CLOSE_NOTIFY:
            reason = "close_notify from the KD: keys revoked"
        else:
            reason = f"DTLS association ended: {event.reason}"
        self._end(reason)

    def _end(self, reason: str) -> None:
        self._state = _State.CLOSED
        self._wipe()
        self._events.append(Closed(reason))

    def _wipe(self) -> None:
        """Drop every key: contexts closed, parameter sets removed.

        :class:`DoubleSender` and :class:`EktSender` have no close method: our
        own inner key and its context go with the last reference to them.
        """
        if self._receiver is not None:
            self._receiver.close()  # inner contexts and the receive outer context
        if self._ekt_receiver is not None:
            for spi in self._ekt_receiver.spis:
                self._ekt_receiver.remove_parameter_set(spi)
        for context in (self._send_outer, self._recv_outer):
            if context is not None:
                context.close()
        self._send_outer = self._recv_outer = None
        self._receiver = self._ekt_receiver = None
        for stream in self._streams.values():
            stream.sender = stream.ekt = None
            stream.history.clear()
        self._nacks.clear()
        self._ekt_params.clear()
        self._ekt_expiry.clear()
        self._sender_spi.clear()
        self._stun_timer = None
        self._transactions.clear()

    # -- timers ---------------------------------------------------------------------------

    def handle_timer(self, now: float) -> list[bytes]:
        """Retransmit, check consent, drive DTLS and expire EKTKeys as due."""
        if self._state in _TERMINAL:
            return []
        out: list[bytes] = []
        self._purge_ekt(now)
        if self._last_consent is not None and now >= self._last_consent + self._consent_timeout:
            self._end("consent expired (RFC 7675 s5.1): no STUN response")
            return []
        if self._stun_timer is not None and now >= self._stun_timer:
            if self._state is _State.CHECKING:
                out += self._retransmit_check(now)
            else:
                request, _tid = self._binding_request()
                out.append(request)
                self._stun_timer = now + self._next_consent_delay()
        if self._state in _TERMINAL:
            return out
        dtls = self._dtls
        if dtls is not None and (timer := dtls.get_timer()) is not None and now >= timer:
            dtls.handle_timer(now)
            out += self._drain_dtls(now)
        if self._state in _TERMINAL:
            return out
        return out + self._send_nacks(now)

    def _send_nacks(self, now: float) -> list[bytes]:
        """One SRTCP compound with the generic NACKs now due (RFC 4585 s6.2.1), if any."""
        context = self._send_outer
        if context is None:
            return []
        nacks = []
        for ssrc, tracker in self._nacks.items():
            seqs = tracker.due(now)
            self.stats[ssrc].nacked = tracker.nacked
            if seqs:
                nacks.append(build_nack(self.ssrc, ssrc, seqs))
        if not nacks:
            return []
        self.nacks_sent += 1
        # RFC 4585 s3.1: a compound starts with a report; an empty RR (our counters
        # for the interval reports of send_rtcp are left alone)
        return [context.protect_rtcp(build_compound([receiver_report(self.ssrc, []), *nacks]))]

    def _retransmit_check(self, now: float) -> list[bytes]:
        tid = self._check_tid
        request = self._transactions.get(tid) if tid is not None else None
        if request is None or self._transmissions >= _STUN_MAX_TRANSMISSIONS:
            self._state = _State.REFUSED
            self._wipe()
            self._events.append(Refused("ICE failed: no authenticated Binding response"))
            return []
        self._transmissions += 1
        if self._transmissions == _STUN_MAX_TRANSMISSIONS:
            self._stun_timer = now + _STUN_LAST_WAIT
        else:
            self._stun_timer = now + _STUN_RTO * (1 << (self._transmissions - 1))
        return [request]  # same transaction id (RFC 8489 s6.2.1)

    # -- output ----------------------------------------------------------------------------

    def send_media(self, payload: bytes, *, timestamp: int, marker: bool = False,
                   keyframe: bool = False, now: float, ssrc: int | None = None,
                   audio_level: int | None = None, voice: bool | None = None,
                   frame_marks: FrameMarks | None = None) -> bytes:
        """One double-protected RTP datagram for the MD (RFC 8723 s5.1, RFC 8870 s4.3.1).

        ``ssrc`` (default :attr:`ssrc`) is one of :attr:`sending_ssrcs`; the
        payload type is its answered m= section's, the sequence number its
        next (random start, RFC 3550 s5.1).  Header extensions, where the
        answer kept their ``a=extmap``: MID on every packet, RtpStreamId on
        simulcast video, ``audio_level`` (RFC 6464 -dBov, 0-127; ``voice``
        defaults to level < 127) on audio, ``frame_marks`` on video (an
        extension the answer dropped, or the other kind's, is not written).
        ``keyframe`` sends a FullEKTField (RFC 8870 s4.6).  The datagram is
        kept for NACKs (:mod:`~perc_daemons.protocol.repair`).  Raises
        :class:`NotReady` unless :attr:`ready`, or when the EKTKey in use has
        expired; ValueError for an SSRC not ours or bad values.
        """
        stream = self._streams.get(self.ssrc if ssrc is None else ssrc)
        if stream is None:
            raise ValueError(f"SSRC {ssrc!r} is not one of ours that sends")
        sender = stream.sender
        if self._state is not _State.READY or sender is None:
            raise NotReady(f"no media in state {self._state.name.lower()}")
        if not 0 <= timestamp <= _RTP_MAX:
            raise ValueError("timestamp must be a 32-bit unsigned integer")
        packet = RtpPacket(payload_type=stream.payload_type, sequence_number=stream.sequence,
                           timestamp=timestamp, ssrc=stream.ssrc, marker=marker,
                           payload=bytes(payload)).serialize()
        elements = list(stream.elements)
        try:
            if audio_level is not None and stream.audio_level_id is not None:
                elements.append((stream.audio_level_id, extensions.encode_audio_level(
                    audio_level, audio_level < 127 if voice is None else voice)))
            if frame_marks is not None and stream.frame_marking_id is not None:
                elements.append((stream.frame_marking_id,
                                 extensions.encode_frame_marks(**frame_marks._asdict())))
            if elements:
                packet = extensions.add_extensions(packet, elements)
        except extensions.ExtensionError as e:
            raise ValueError(f"bad header extension value: {e}") from None
        try:
            wire = sender.protect(packet, now, keyframe=keyframe)
        except ExpiredEktKey:
            raise NotReady("the EKTKey in use has expired (RFC 8870 s5.2.2)") from None
        stream.history.add(stream.sequence, wire)
        stream.sequence = (stream.sequence + 1) % _SEQ_MOD
        stream.packets += 1
        stream.bytes += len(payload)
        self.packets_sent += 1
        self.bytes_sent += len(payload)
        return wire

    def send_rtcp(self, *, now: float, pli_ssrc: int | None = None,
                  remb: int | None = None, fir_ssrc: int | None = None) -> bytes:
        """One SRTCP datagram: a receiver report of every remote SSRC (RFC 3550 s6.4.2,
        at most 31), with ``pli_ssrc`` a Picture Loss Indication for it (RFC 4585
        s6.3.1), with ``fir_ssrc`` a Full Intra Request for it (RFC 5104 s4.3.1, a
        new command sequence number each time), with ``remb`` (bits/s) a REMB for
        the SSRCs we receive (draft-alvestrand-rmcat-remb-03 s2.2).  Hop-by-hop
        only (RFC 8723 s6).  Jitter, LSR and DLSR are 0."""
        context = self._send_outer
        if self._state not in (_State.CONNECTED, _State.READY) or context is None:
            raise NotReady(f"no RTCP in state {self._state.name.lower()}")
        blocks = []
        for ssrc, stats in list(self.stats.items())[:31]:
            fraction, cumulative, highest = stats.report_block_values()
            blocks.append(ReportBlock(ssrc, fraction, cumulative, highest, 0, 0, 0))
        packets = [receiver_report(self.ssrc, blocks)]
        if pli_ssrc is not None:
            _check_ssrc(pli_ssrc, "pli_ssrc")
            packets.append(RtcpPacket(PSFB, struct.pack("!II", self.ssrc, pli_ssrc),
                                      count=PSFB_PLI))
        if fir_ssrc is not None:
            _check_ssrc(fir_ssrc, "fir_ssrc")
            command = self._fir_commands[fir_ssrc] = (self._fir_commands.get(fir_ssrc, -1)
                                                      + 1) % 256
            packets.append(build_fir(self.ssrc, [(fir_ssrc, command)]))
        if remb is not None:
            if not isinstance(remb, int) or remb < 0:
                raise ValueError("remb must be a non-negative bitrate in bits/s")
            packets.append(build_remb(self.ssrc, remb, list(self.stats)[:255]))
        return context.protect_rtcp(build_compound(packets))

    def close(self, now: float) -> list[bytes]:
        """End the session: close_notify to the KD, every key dropped, :class:`Closed`."""
        if self._state in _TERMINAL:
            return []
        out: list[bytes] = []
        dtls = self._dtls
        self._end("closed locally")
        if dtls is not None:
            dtls.close()
            while dtls.next_event() is not None:
                pass
            out = dtls.datagrams_to_send(now)
        return out
