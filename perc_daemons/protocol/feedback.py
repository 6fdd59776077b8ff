"""Sans-I/O RTCP feedback an SFU sends and reads, and the MD's speaker hint.

* The common feedback format of RFC 4585 §6.1: V=2, P, FMT in the count
  field, PT RTPFB (205) or PSFB (206), then the SSRC of the packet sender,
  the SSRC of the media source and the Feedback Control Information (FCI).
* Generic NACK, RFC 4585 §6.2.1 (RTPFB FMT 1): FCI of 32-bit PID + BLP
  pairs; :func:`nack_fci` packs any set of sequence numbers (modulo 2^16)
  into the fewest pairs, :func:`nack_seqs` unpacks them.
* Picture Loss Indication, RFC 4585 §6.3.1 (PSFB FMT 1): no FCI.
* Full Intra Request, RFC 5104 §4.3.1 (PSFB FMT 4): media source SSRC 0,
  FCI entries of SSRC, 8-bit command sequence number, 24 reserved bits.
* Receiver Estimated Max Bitrate, draft-alvestrand-rmcat-remb-03 §2.2: an
  application layer feedback message (RFC 4585 §6.4, PSFB FMT 15), media
  source SSRC 0, FCI "REMB", 8-bit number of SSRCs, 6-bit exponent and
  18-bit mantissa (bitrate = mantissa * 2^exp bits/s), the SSRCs.
* The MD's speaker hint to its clients: an APP packet (RFC 3550 §6.7),
  subtype 1, name "PERC", data: 32-bit sequence, 32-bit count, that many
  audio SSRCs, the dominant speaker first.
* :func:`strip_report_blocks`: an SR (or RR) without its report blocks
  (RFC 3550 §6.4.1), for an MD that forwards a sender's SR but not what it
  says about other streams.

Every parser raises :class:`FeedbackError` (and nothing else) for
malformed input and returns None for messages that are not its own.
Nothing imports Twisted, reads a clock or touches a socket. Not here:
RTCP compound framing and SR/RR layouts (protocol/rtp.py), and the other
feedback messages (SLI, RPSI, TMMBR, transport-cc), which parse to None.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from perc_daemons.protocol.errors import ProtocolError
from perc_daemons.protocol.rtp import (
    APP,
    PSFB,
    PSFB_FIR,
    PSFB_PLI,
    RR,
    RTPFB,
    RTPFB_NACK,
    SR,
    RtcpPacket,
)

__all__ = [
    "PSFB_AFB",
    "REMB_IDENTIFIER",
    "SPEAKER_HINT_NAME",
    "SPEAKER_HINT_SUBTYPE",
    "Feedback",
    "FeedbackError",
    "SpeakerHint",
    "build_fir",
    "build_nack",
    "build_pli",
    "build_remb",
    "build_speaker_hint",
    "nack_fci",
    "nack_seqs",
    "parse_feedback",
    "parse_speaker_hint",
    "strip_report_blocks",
]

#: RFC 4585 §6.4: application layer feedback (the FMT that carries REMB).
PSFB_AFB = 15
#: draft-alvestrand-rmcat-remb-03 §2.2: the FCI's unique identifier.
REMB_IDENTIFIER = b"REMB"
#: The speaker hint's APP name and subtype (RFC 3550 §6.7).
SPEAKER_HINT_NAME = b"PERC"
SPEAKER_HINT_SUBTYPE = 1

_SEQ_MOD = 0x10000
_BLP_SPAN = 16  # RFC 4585 §6.2.1: BLP covers PID+1 .. PID+16
_MANTISSA_BITS = 18
_MAX_MANTISSA = (1 << _MANTISSA_BITS) - 1
_MAX_EXPONENT = 63
_SR_FIXED = 4 + 20  # RFC 3550 §6.4.1: sender SSRC, then sender info
_RR_FIXED = 4

_TWO_U32 = struct.Struct("!II")
_PAIR = struct.Struct("!HH")
_FIR_ENTRY = struct.Struct("!IB3x")


class FeedbackError(ProtocolError):
    """A malformed or unbuildable RTCP feedback or speaker hint packet
    (RFC 4585 §6, RFC 5104 §4.3.1, draft-alvestrand-rmcat-remb-03, RFC 3550 §6.7)."""

    reason = "feedback_malformed"


def _u32(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0xFFFFFFFF:
        raise FeedbackError(f"{name} {value!r} is not a 32-bit value")
    return value


def _payload(packet: RtcpPacket) -> bytes:
    """The body without its padding octets (RFC 3550 §6.4.1)."""
    body = packet.body
    if not packet.padding:
        return body
    if not body or not 1 <= body[-1] <= len(body):
        raise FeedbackError("RTCP P bit set but the body does not end in a valid padding count")
    return body[: len(body) - body[-1]]


# --------------------------------------------------------------------------
# Generic NACK (RFC 4585 §6.2.1)
# --------------------------------------------------------------------------


def _cover(offsets: list[int], start: int) -> tuple[list[tuple[int, int]], int]:
    """Greedy PID/BLP cover of sorted circular offsets, cutting the circle before
    ``offsets[start]``: the ``(PID offset, BLP)`` pairs, and which of them holds
    ``offsets[0]``."""
    n = len(offsets)
    pairs: list[tuple[int, int]] = []
    lead = 0
    i = 0
    while i < n:
        index = (start + i) % n
        pid = offsets[index]
        if index == 0:
            lead = len(pairs)
        blp = 0
        i += 1
        while i < n:
            index = (start + i) % n
            delta = (offsets[index] - pid) % _SEQ_MOD
            if delta > _BLP_SPAN:
                break
            if index == 0:
                lead = len(pairs)
            blp |= 1 << (delta - 1)
            i += 1
        pairs.append((pid, blp))
    return pairs, lead


def nack_fci(seqs: Iterable[int]) -> bytes:
    """Pack RTP sequence numbers into Generic NACK FCI (RFC 4585 §6.2.1).

    Each 32-bit entry is a PID (a lost packet) and a BLP whose bit i marks
    PID+i+1 lost. Sequence numbers are taken modulo 2^16 and duplicates
    ignored; the pairs are the fewest that cover them on the 16-bit circle
    (so 65535, 0, 1 share one pair), in circular order starting with the
    pair that holds the first sequence number given (the oldest, for a
    caller that lists losses in order). No sequence numbers: ``b""``.
    Raises :class:`FeedbackError` for a non-integer.
    """
    unique: list[int] = []
    seen: set[int] = set()
    for seq in seqs:
        if not isinstance(seq, int) or isinstance(seq, bool):
            raise FeedbackError(f"sequence number {seq!r} is not an int")
        seq &= 0xFFFF
        if seq not in seen:
            seen.add(seq)
            unique.append(seq)
    if not unique:
        return b""
    base = unique[0]
    offsets = sorted((seq - base) % _SEQ_MOD for seq in unique)  # offsets[0] == 0
    n = len(offsets)
    # A point after a gap of more than 16 cannot share a pair with the point
    # before it, so some fewest cover has a PID there, and the greedy cover
    # cut there is optimal.
    start = None
    if offsets[0] + _SEQ_MOD - offsets[-1] > _BLP_SPAN:
        start = 0
    else:
        for i in range(1, n):
            if offsets[i] - offsets[i - 1] > _BLP_SPAN:
                start = i
                break
    if start is not None:
        pairs, lead = _cover(offsets, start)
    else:
        # Dense all around (4096 or more numbers): a fewest cover's pair over
        # offset 0 can start at one of the points within 16 before it.
        candidates = [0] + [i for i in range(n - 1, 0, -1)
                            if _SEQ_MOD - offsets[i] <= _BLP_SPAN]
        pairs, lead = min((_cover(offsets, c) for c in candidates), key=lambda c: len(c[0]))
    pairs = pairs[lead:] + pairs[:lead]  # the pair holding the first number given leads
    return b"".join(_PAIR.pack((pid + base) % _SEQ_MOD, blp) for pid, blp in pairs)


def nack_seqs(fci: bytes) -> list[int]:
    """The sequence numbers in Generic NACK FCI (RFC 4585 §6.2.1), pair by pair,
    each PID then its BLP bits from PID+1 to PID+16 (modulo 2^16), the first
    occurrence of each kept. Raises :class:`FeedbackError` unless the FCI is
    a whole number of 4-byte pairs (``b""`` gives ``[]``)."""
    if len(fci) % 4:
        raise FeedbackError(f"Generic NACK FCI of {len(fci)} bytes is not whole PID/BLP pairs")
    out: list[int] = []
    seen: set[int] = set()
    for pid, blp in _PAIR.iter_unpack(fci):
        if pid not in seen:
            seen.add(pid)
            out.append(pid)
        bit = 0
        while blp:
            if blp & 1:
                seq = (pid + bit + 1) & 0xFFFF
                if seq not in seen:
                    seen.add(seq)
                    out.append(seq)
            blp >>= 1
            bit += 1
    return out


def build_nack(sender_ssrc: int, media_ssrc: int, seqs: Iterable[int]) -> RtcpPacket:
    """A Generic NACK (RFC 4585 §6.2.1; RTPFB, FMT 1) for lost ``seqs`` of
    ``media_ssrc``, in the fewest PID/BLP pairs (:func:`nack_fci`). Raises
    :class:`FeedbackError` for no sequence numbers (the FCI holds at least
    one pair) or an SSRC that is not 32-bit."""
    head = _TWO_U32.pack(_u32("sender SSRC", sender_ssrc), _u32("media SSRC", media_ssrc))
    fci = nack_fci(seqs)
    if not fci:
        raise FeedbackError("a Generic NACK needs at least one sequence number")
    if len(fci) + 8 > 0xFFFF * 4:
        raise FeedbackError(f"Generic NACK FCI of {len(fci)} bytes exceeds one RTCP packet")
    return RtcpPacket(RTPFB, head + fci, count=RTPFB_NACK)


# --------------------------------------------------------------------------
# PLI, FIR, REMB (RFC 4585 §6.3.1, RFC 5104 §4.3.1, draft-alvestrand-rmcat-remb-03)
# --------------------------------------------------------------------------


def build_pli(sender_ssrc: int, media_ssrc: int) -> RtcpPacket:
    """A Picture Loss Indication (RFC 4585 §6.3.1; PSFB, FMT 1, no FCI)."""
    head = _TWO_U32.pack(_u32("sender SSRC", sender_ssrc), _u32("media SSRC", media_ssrc))
    return RtcpPacket(PSFB, head, count=PSFB_PLI)


def build_fir(sender_ssrc: int, entries: Sequence[tuple[int, int]]) -> RtcpPacket:
    """A Full Intra Request (RFC 5104 §4.3.1; PSFB, FMT 4).

    The media source SSRC is 0 (§4.3.1.2); each ``(ssrc, seq_nr)`` entry is
    the SSRC asked for a decoder refresh and the 8-bit command sequence
    number (the same for a repetition, +1 for a new request, §4.3.1.1),
    then 24 reserved zero bits. Raises :class:`FeedbackError` for no
    entries or out-of-range fields.
    """
    if not entries:
        raise FeedbackError("a FIR needs at least one FCI entry")
    parts = [_TWO_U32.pack(_u32("sender SSRC", sender_ssrc), 0)]
    for entry in entries:
        if not isinstance(entry, tuple) or len(entry) != 2:
            raise FeedbackError(f"FIR entry {entry!r} is not an (ssrc, seq nr) pair")
        ssrc, seq = entry
        if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq <= 255:
            raise FeedbackError(f"FIR command sequence number {seq!r} is outside 0..255")
        parts.append(_FIR_ENTRY.pack(_u32("FIR SSRC", ssrc), seq))
    body = b"".join(parts)
    if len(body) > 0xFFFF * 4:
        raise FeedbackError(f"FIR of {len(entries)} entries exceeds one RTCP packet")
    return RtcpPacket(PSFB, body, count=PSFB_FIR)


def _remb_fields(bitrate: int) -> tuple[int, int]:
    """(exponent, mantissa): the largest mantissa * 2^exp not above ``bitrate``,
    with the smallest exponent whose mantissa fits 18 bits."""
    exponent = max(0, bitrate.bit_length() - _MANTISSA_BITS)
    if exponent > _MAX_EXPONENT:
        return _MAX_EXPONENT, _MAX_MANTISSA
    return exponent, bitrate >> exponent


def build_remb(sender_ssrc: int, bitrate: int, ssrcs: Sequence[int]) -> RtcpPacket:
    """A REMB (draft-alvestrand-rmcat-remb-03 §2.2; PSFB, FMT 15, media SSRC 0).

    ``bitrate`` (bits/s) is sent as the largest mantissa * 2^exp not above it
    (18-bit mantissa, the smallest 6-bit exponent that fits; a bitrate past
    (2^18-1) * 2^63 is sent as that maximum); ``ssrcs`` are the streams the
    estimate applies to (at most 255). Raises :class:`FeedbackError` for a
    negative bitrate, too many SSRCs or fields out of range.
    """
    if not isinstance(bitrate, int) or isinstance(bitrate, bool) or bitrate < 0:
        raise FeedbackError(f"REMB bitrate {bitrate!r} is not a non-negative int")
    if len(ssrcs) > 255:
        raise FeedbackError(f"REMB of {len(ssrcs)} SSRCs exceeds 255")
    exponent, mantissa = _remb_fields(bitrate)
    parts = [
        _TWO_U32.pack(_u32("sender SSRC", sender_ssrc), 0),
        REMB_IDENTIFIER,
        struct.pack("!BBH", len(ssrcs), (exponent << 2) | (mantissa >> 16), mantissa & 0xFFFF),
    ]
    parts.extend(struct.pack("!I", _u32("REMB SSRC", ssrc)) for ssrc in ssrcs)
    return RtcpPacket(PSFB, b"".join(parts), count=PSFB_AFB)


# --------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Feedback:
    """A parsed feedback message.

    ``kind``: ``"nack"``, ``"pli"``, ``"fir"`` or ``"remb"``. ``media_ssrcs``:
    the media source SSRC for nack and pli, the FCI entries' SSRCs for fir,
    the SSRC list for remb. ``seqs``: the lost sequence numbers for nack
    (:func:`nack_seqs` order), the command sequence numbers for fir
    (parallel to ``media_ssrcs``). ``bitrate``: remb's, bits/s.
    """

    kind: str
    sender_ssrc: int
    media_ssrcs: tuple[int, ...]
    seqs: tuple[int, ...] = ()
    bitrate: int = 0


def parse_feedback(packet: RtcpPacket) -> Feedback | None:
    """Parse a Generic NACK, PLI, FIR or REMB (RFC 4585 §6.1-6.3, RFC 5104
    §4.3.1, draft-alvestrand-rmcat-remb-03 §2.2).

    None for other packet types, other FMTs, and application layer feedback
    (FMT 15) that is not REMB. Raises :class:`FeedbackError` for a message
    of one of these four kinds without its 8 bytes of SSRCs, with FCI that
    is not whole entries (none at all for NACK and FIR, any for PLI), a REMB
    whose SSRC count disagrees with its length, or bad padding. The FIR and
    REMB media source SSRC and the FIR reserved bits are ignored, as RFC
    5104 §4.3.1.2 asks of receivers.
    """
    packet_type = packet.packet_type
    fmt = packet.count
    if packet_type == RTPFB:
        if fmt != RTPFB_NACK:
            return None
    elif packet_type == PSFB:
        if fmt not in (PSFB_PLI, PSFB_FIR, PSFB_AFB):
            return None
    else:
        return None
    body = _payload(packet)
    size = len(body)
    if packet_type == PSFB and fmt == PSFB_AFB and body[8:12] != REMB_IDENTIFIER:
        return None  # some other application layer feedback
    if size < 8:
        raise FeedbackError(f"feedback message of {size} bytes has no sender and media SSRCs")
    sender, media = _TWO_U32.unpack_from(body)
    fci = body[8:]
    if packet_type == RTPFB:
        if not fci or len(fci) % 4:
            raise FeedbackError(f"Generic NACK FCI of {len(fci)} bytes is not 1 or more pairs")
        return Feedback("nack", sender, (media,), tuple(nack_seqs(fci)))
    if fmt == PSFB_PLI:
        if fci:
            raise FeedbackError(f"PLI with {len(fci)} bytes of FCI (RFC 4585 §6.3.1: none)")
        return Feedback("pli", sender, (media,))
    if fmt == PSFB_FIR:
        if not fci or len(fci) % 8:
            raise FeedbackError(f"FIR FCI of {len(fci)} bytes is not 1 or more 8-byte entries")
        entries = list(_FIR_ENTRY.iter_unpack(fci))
        return Feedback("fir", sender, tuple(e[0] for e in entries), tuple(e[1] for e in entries))
    if len(fci) < 8:
        raise FeedbackError(f"REMB FCI of {len(fci)} bytes is shorter than 8")
    count, high, low = struct.unpack_from("!BBH", fci, 4)
    if len(fci) != 8 + 4 * count:
        raise FeedbackError(f"REMB announces {count} SSRCs in {len(fci)} bytes of FCI")
    mantissa = ((high & 0x03) << 16) | low
    ssrcs = struct.unpack_from(f"!{count}I", fci, 8)
    return Feedback("remb", sender, ssrcs, bitrate=mantissa << (high >> 2))


# --------------------------------------------------------------------------
# Speaker hint (RFC 3550 §6.7 APP)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class SpeakerHint:
    """The MD's speaker hint: a sequence number (a client keeps the newest)
    and the audio SSRCs of the current speakers, the dominant one first."""

    sequence: int
    speakers: tuple[int, ...]


def build_speaker_hint(sender_ssrc: int, hint: SpeakerHint) -> RtcpPacket:
    """The speaker hint as an APP packet (RFC 3550 §6.7): subtype 1, name "PERC",
    data: 32-bit sequence, 32-bit count, ``count`` SSRCs. Raises
    :class:`FeedbackError` for fields that are not 32-bit or too many speakers."""
    speakers = tuple(hint.speakers)
    body = b"".join((
        struct.pack("!I", _u32("sender SSRC", sender_ssrc)),
        SPEAKER_HINT_NAME,
        struct.pack("!II", _u32("speaker hint sequence", hint.sequence), len(speakers)),
        *(struct.pack("!I", _u32("speaker SSRC", ssrc)) for ssrc in speakers),
    ))
    if len(body) > 0xFFFF * 4:
        raise FeedbackError(f"speaker hint of {len(speakers)} SSRCs exceeds one RTCP packet")
    return RtcpPacket(APP, body, count=SPEAKER_HINT_SUBTYPE)


def parse_speaker_hint(packet: RtcpPacket) -> SpeakerHint | None:
    """The speaker hint of an APP packet (RFC 3550 §6.7) with subtype 1 and name
    "PERC"; None for any other packet. Raises :class:`FeedbackError` when
    ours but its data is not a sequence, a count and that many SSRCs, or its
    padding is bad."""
    if packet.packet_type != APP or packet.count != SPEAKER_HINT_SUBTYPE:
        return None
    body = _payload(packet)
    if body[4:8] != SPEAKER_HINT_NAME:
        return None
    if len(body) < 16:
        raise FeedbackError(f"speaker hint of {len(body)} bytes has no sequence and count")
    sequence, count = _TWO_U32.unpack_from(body, 8)
    if len(body) != 16 + 4 * count:
        raise FeedbackError(f"speaker hint announces {count} SSRCs in {len(body)} bytes")
    return SpeakerHint(sequence, struct.unpack_from(f"!{count}I", body, 16))


# --------------------------------------------------------------------------
# SR / RR without report blocks (RFC 3550 §6.4)
# --------------------------------------------------------------------------


def strip_report_blocks(packet: RtcpPacket) -> RtcpPacket:
    """An SR (RFC 3550 §6.4.1) with only its sender SSRC and sender info: RC 0,
    no report blocks, no profile-specific extensions, no padding. An RR
    (§6.4.2) likewise keeps only its SSRC. Raises :class:`FeedbackError` for
    other packet types or a body too short for the fixed part."""
    if packet.packet_type == SR:
        fixed = _SR_FIXED
    elif packet.packet_type == RR:
        fixed = _RR_FIXED
    else:
        raise FeedbackError(f"RTCP packet type {packet.packet_type} is neither SR nor RR")
    body = _payload(packet)
    if len(body) < fixed:
        raise FeedbackError(f"RTCP packet type {packet.packet_type} of {len(body)} bytes "
                            f"is shorter than its {fixed}-byte fixed part")
    return RtcpPacket(packet.packet_type, body[:fixed], count=0)
