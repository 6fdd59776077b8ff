"""Sans-I/O RTP header extension values an SFU reads: audio level, frame marks, stream ids.

The elements live in the RFC 8285 extension block (one-byte form, profile
0xBEDE, §4.2; two-byte form, profile 0x100x, §4.3), which the double
transform never covers with the inner layer (RFC 8723 §5.1), so a Media
Distributor can read them without the media keys:

* :func:`find_extension` returns one element's value straight from a packet.
  It is on the media relay's per-packet path: it walks the block in place
  with ints and creates nothing but the value it returns (no element list,
  unlike :func:`perc_daemons.protocol.rtp.parse_extensions`).
* Client-to-mixer audio level, RFC 6464 §3: :func:`audio_level`,
  :func:`encode_audio_level`.
* Frame marking, draft-ietf-avtext-framemarking-16 §3.1 (non-scalable
  streams, one byte ``S|E|I|D|0000``) and §3.2 (scalable streams: the same
  byte with ``B`` and a 3-bit ``TID``, then ``LID`` and ``TL0PICIDX``, the
  latter or both of which may be omitted): :func:`frame_marks`,
  :func:`encode_frame_marks`, :func:`is_keyframe_start`.
* RtpStreamId / RepairedRtpStreamId (RFC 8852 §3.1, §3.2; rid-id syntax of
  RFC 8851 §10) and MID (RFC 8843 §15.1): :func:`stream_id`,
  :func:`encode_stream_id`, and :func:`media_id` for the wider token syntax
  an SDP ``a=mid`` allows (RFC 8843 §9.1, RFC 5888 §4).
* :func:`add_extensions` merges elements into a packet's block (the MD adds
  or rewrites elements such as a MID; RFC 8723 §5.2 lets it edit extensions).

Deliberately not here: the a=extmap negotiation (protocol/sdp.py: the ids
are the offer's, never assumed) and any element the SFU does not read.
Nothing imports Twisted, reads a clock or touches a socket. Malformed input
raises :class:`ExtensionError` and nothing else.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

from perc_daemons.protocol.errors import ProtocolError
from perc_daemons.protocol.rtp import (
    ONE_BYTE_PROFILE,
    TWO_BYTE_PROFILE,
    RtpError,
    header_length,
    parse_extensions,
    replace_extensions,
)

__all__ = [
    "AUDIO_LEVEL_URI",
    "FRAME_MARKING_URI",
    "MID_URI",
    "REPAIRED_RID_URI",
    "RID_URI",
    "ExtensionError",
    "FrameMarks",
    "add_extensions",
    "audio_level",
    "encode_audio_level",
    "encode_frame_marks",
    "encode_stream_id",
    "find_extension",
    "frame_marks",
    "is_keyframe_start",
    "media_id",
    "stream_id",
]

#: RFC 6464 §4 (client-to-mixer audio level).
AUDIO_LEVEL_URI = "urn:ietf:params:rtp-hdrext:ssrc-audio-level"
#: RFC 8843 §15.1 (BUNDLE MID).
MID_URI = "urn:ietf:params:rtp-hdrext:sdes:mid"
#: RFC 8852 §3.1 (RtpStreamId).
RID_URI = "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id"
#: RFC 8852 §3.2 (RepairedRtpStreamId).
REPAIRED_RID_URI = "urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id"
#: draft-ietf-avtext-framemarking-16 §6.
FRAME_MARKING_URI = "urn:ietf:params:rtp-hdrext:framemarking"

# RFC 8851 §10: rid-id = 1*(alpha-numeric / "-" / "_").
_RID_RE = re.compile(rb"[A-Za-z0-9_-]+")
# RFC 5888 §4 / RFC 4566 §9 token (identification-tag of a=mid).
_TOKEN_RE = re.compile(rb"[!#$%&'*+\-.^_`{|}~0-9A-Za-z]+")
_MAX_STREAM_ID = 255  # RFC 8852 §3: at most 255 octets (two-byte form)


class ExtensionError(ProtocolError):
    """A malformed or unencodable header extension block or value (RFC 8285 and the
    element formats above)."""

    reason = "extension_malformed"


# --------------------------------------------------------------------------
# The block (RFC 8285)
# --------------------------------------------------------------------------


def find_extension(packet: bytes, ext_id: int) -> bytes | None:
    """Return the value of element ``ext_id`` in the RTP packet's RFC 8285 block.

    ``None`` when the X bit is clear (RFC 3550 §5.1), when the block's
    profile is not RFC 8285's (0xBEDE, §4.2, or 0x1000-0x100F, §4.3), or when
    no element has that id (an id the block's form cannot carry: 0 or 15 in
    the one-byte form, 0 or above 255 in the two-byte form, is never found).
    Padding bytes are skipped; in the one-byte form an id 15 ends the walk
    (§4.2). The first element with the id wins, and elements after it are
    not examined. Raises :class:`ExtensionError` when the packet is not
    version 2, its fixed header, CSRC list or extension header is truncated, the
    block's length field runs past the packet, or an element before the one
    sought runs past the block.
    """
    size = len(packet)
    if size < 12:
        raise ExtensionError(f"RTP packet of {size} bytes is shorter than the 12-byte header")
    first = packet[0]
    if first >> 6 != 2:
        raise ExtensionError(f"RTP version is {first >> 6}, not 2")
    offset = 12 + ((first & 0x0F) << 2)
    if not first & 0x10:
        if size < offset:
            raise ExtensionError(f"RTP CSRC list ending at {offset} runs past {size} bytes")
        return None
    if size < offset + 4:
        raise ExtensionError(f"RTP extension header at offset {offset} runs past {size} bytes")
    profile = (packet[offset] << 8) | packet[offset + 1]
    end = offset + 4 + ((packet[offset + 2] << 10) | (packet[offset + 3] << 2))
    if end > size:
        raise ExtensionError(f"RTP extension block ending at {end} runs past {size} bytes")
    offset += 4
    if profile == ONE_BYTE_PROFILE:
        while offset < end:
            byte = packet[offset]
            ident = byte >> 4
            if ident == 0:
                offset += 1
                continue
            if ident == 15:
                return None
            start = offset + 1
            offset = start + (byte & 0x0F) + 1
            if offset > end:
                raise ExtensionError(
                    f"RFC 8285 one-byte element id {ident} at offset {start - 1} "
                    f"runs past the extension block ending at {end}"
                )
            if ident == ext_id:
                return bytes(packet[start:offset])
        return None
    if (profile & 0xFFF0) == TWO_BYTE_PROFILE:
        while offset < end:
            ident = packet[offset]
            if ident == 0:
                offset += 1
                continue
            if offset + 1 >= end:
                raise ExtensionError(
                    f"RFC 8285 two-byte element id {ident} at offset {offset} "
                    f"has no length byte before the block's end at {end}"
                )
            start = offset + 2
            offset = start + packet[offset + 1]
            if offset > end:
                raise ExtensionError(
                    f"RFC 8285 two-byte element id {ident} at offset {start - 2} "
                    f"runs past the extension block ending at {end}"
                )
            if ident == ext_id:
                return bytes(packet[start:offset])
        return None
    return None


def add_extensions(packet: bytes, elements: Sequence[tuple[int, bytes]]) -> bytes:
    """Return ``packet`` with ``elements`` merged into its RFC 8285 extension block.

    An element whose id is already in the block replaces it in place (and
    any further elements with that id are dropped); the others are appended
    in the given order (a later pair with the same id replaces an earlier
    one). A packet without a block gets one and its X bit.
    The block is rebuilt as :func:`perc_daemons.protocol.rtp.build_extension_block`
    does: the one-byte form (RFC 8285 §4.2) when every id is 1-14 and every
    value 1-16 bytes, else the two-byte form (§4.3; a two-byte block's
    appbits are not kept), padding dropped. Every other byte of the packet
    is unchanged. Raises :class:`ExtensionError` for a malformed packet or
    block, a block with a non-RFC 8285 profile (it cannot be merged into), or
    elements neither form can carry. No elements: ``packet`` unchanged.
    """
    try:
        end = header_length(packet)
        if not elements:
            return bytes(packet)
        merged: list[tuple[int, bytes]] = []
        first = packet[0]
        if first & 0x10:
            offset = 12 + ((first & 0x0F) << 2)
            profile = (packet[offset] << 8) | packet[offset + 1]
            if profile != ONE_BYTE_PROFILE and (profile & 0xFFF0) != TWO_BYTE_PROFILE:
                raise ExtensionError(
                    f"extension profile {profile:#06x} is not RFC 8285's; cannot merge elements"
                )
            merged = parse_extensions(profile, packet[offset + 4 : end])
        updates: dict[int, bytes] = {}
        for item in elements:
            if not isinstance(item, tuple) or len(item) != 2:
                raise ExtensionError(f"extension element {item!r} is not an (id, value) pair")
            ident, value = item
            if not isinstance(ident, int) or not isinstance(value, bytes | bytearray | memoryview):
                raise ExtensionError(f"extension element {item!r} is not an (int, bytes) pair")
            updates[ident] = bytes(value)
        out: list[tuple[int, bytes]] = []
        replaced: set[int] = set()
        for ident, value in merged:
            if ident not in updates:
                out.append((ident, value))
            elif ident not in replaced:  # the first of duplicates takes the new value
                replaced.add(ident)
                out.append((ident, updates[ident]))
        out.extend((ident, value) for ident, value in updates.items() if ident not in replaced)
        return replace_extensions(packet, out)
    except RtpError as exc:
        raise ExtensionError(str(exc)) from None


# --------------------------------------------------------------------------
# Audio level (RFC 6464)
# --------------------------------------------------------------------------


def audio_level(value: bytes) -> tuple[int, bool]:
    """Return ``(level, voice)`` of a client-to-mixer audio level value (RFC 6464 §3).

    The first byte is the V bit (voice activity) then the 7-bit level in
    -dBov (0 the loudest, 127 digital silence). The one-byte header form
    carries exactly that byte; in the two-byte form §3 shows it followed by a
    padding byte, so a 2-byte value whose first byte is the level is
    accepted too. Other lengths raise :class:`ExtensionError`.
    """
    if not 1 <= len(value) <= 2:
        raise ExtensionError(f"audio level value of {len(value)} bytes is not 1 (or 2) bytes")
    byte = value[0]
    return byte & 0x7F, bool(byte & 0x80)


def encode_audio_level(level: int, voice: bool) -> bytes:
    """The one-byte audio level value (RFC 6464 §3): V bit, then ``level`` (0-127, -dBov)."""
    if not isinstance(level, int) or not 0 <= level <= 127:
        raise ExtensionError(f"audio level {level!r} is outside 0..127")
    return bytes(((0x80 if voice else 0) | level,))


# --------------------------------------------------------------------------
# Frame marking (draft-ietf-avtext-framemarking-16)
# --------------------------------------------------------------------------


class FrameMarks(NamedTuple):
    """A frame marking value (draft-ietf-avtext-framemarking-16 §3.1, §3.2).

    ``start``/``end``: first/last packet of the frame (S, E); ``independent``:
    the frame can be decoded without earlier frames (I, a keyframe);
    ``discardable`` (D); ``base_layer``: base layer sync (B); ``tid``: the
    temporal layer id (0-7); ``lid`` and ``tl0picidx``: layer id and
    temporal-layer-0 picture index (None when the value omits them).
    """

    start: bool
    end: bool
    independent: bool
    discardable: bool
    base_layer: bool
    tid: int
    lid: int | None
    tl0picidx: int | None


def frame_marks(value: bytes) -> FrameMarks:
    """Decode a frame marking value (draft-ietf-avtext-framemarking-16 §3).

    One byte ``S|E|I|D|B|TID(3)`` (§3.1, where B and TID are 0 for a
    non-scalable stream; §3.2 short form), optionally followed by ``LID``
    (one byte) and ``TL0PICIDX`` (one byte) (§3.2, L=1 and L=2). Other
    lengths raise :class:`ExtensionError`.
    """
    size = len(value)
    if not 1 <= size <= 3:
        raise ExtensionError(f"frame marking value of {size} bytes is not 1 to 3 bytes")
    byte = value[0]
    return FrameMarks(
        bool(byte & 0x80),
        bool(byte & 0x40),
        bool(byte & 0x20),
        bool(byte & 0x10),
        bool(byte & 0x08),
        byte & 0x07,
        value[1] if size > 1 else None,
        value[2] if size > 2 else None,
    )


def encode_frame_marks(
    *,
    start: bool,
    end: bool,
    independent: bool,
    discardable: bool = False,
    base_layer: bool = False,
    tid: int = 0,
    lid: int | None = None,
    tl0picidx: int | None = None,
) -> bytes:
    """Encode a frame marking value (draft-ietf-avtext-framemarking-16 §3.1, §3.2).

    One byte, plus ``lid`` when given, plus ``tl0picidx`` when given (which
    needs ``lid``: the draft omits TL0PICIDX, or both, never LID alone).
    Raises :class:`ExtensionError` for ``tid`` outside 0-7, ``lid`` or
    ``tl0picidx`` outside 0-255, or ``tl0picidx`` without ``lid``.
    """
    if not isinstance(tid, int) or not 0 <= tid <= 7:
        raise ExtensionError(f"frame marking TID {tid!r} is outside 0..7")
    byte = (
        (0x80 if start else 0)
        | (0x40 if end else 0)
        | (0x20 if independent else 0)
        | (0x10 if discardable else 0)
        | (0x08 if base_layer else 0)
        | tid
    )
    if lid is None:
        if tl0picidx is not None:
            raise ExtensionError("frame marking TL0PICIDX needs a LID")
        return bytes((byte,))
    if not isinstance(lid, int) or not 0 <= lid <= 255:
        raise ExtensionError(f"frame marking LID {lid!r} is outside 0..255")
    if tl0picidx is None:
        return bytes((byte, lid))
    if not isinstance(tl0picidx, int) or not 0 <= tl0picidx <= 255:
        raise ExtensionError(f"frame marking TL0PICIDX {tl0picidx!r} is outside 0..255")
    return bytes((byte, lid, tl0picidx))


def is_keyframe_start(value: bytes) -> bool:
    """Whether a frame marking value has S and I set: the first packet of an
    independent frame (draft-ietf-avtext-framemarking-16 §3.1), where a
    receiver switched to this stream can start. Raises :class:`ExtensionError`
    for a value :func:`frame_marks` refuses."""
    size = len(value)
    if not 1 <= size <= 3:
        raise ExtensionError(f"frame marking value of {size} bytes is not 1 to 3 bytes")
    return value[0] & 0xA0 == 0xA0


# --------------------------------------------------------------------------
# Stream ids (RFC 8852, RFC 8843)
# --------------------------------------------------------------------------


def stream_id(value: bytes) -> str:
    """Decode an RtpStreamId, RepairedRtpStreamId (RFC 8852 §3) or MID value.

    The value is the identifier's text, 1 to 255 octets (at most 16 in the
    one-byte header form; whatever is there is decoded), no terminator. It
    must match RFC 8851 §10 ``rid-id = 1*(alpha-numeric / "-" / "_")``;
    anything else raises :class:`ExtensionError`. A MID that uses the wider
    token syntax of ``a=mid`` needs :func:`media_id`.
    """
    if not 1 <= len(value) <= _MAX_STREAM_ID:
        raise ExtensionError(f"stream id of {len(value)} bytes is not 1 to 255 bytes")
    if not _RID_RE.fullmatch(value):
        raise ExtensionError(f"stream id {bytes(value)!r} is not an RFC 8851 rid-id")
    return bytes(value).decode("ascii")


def media_id(value: bytes) -> str:
    """Decode a MID value (RFC 8843 §15.1): 1 to 255 octets of an ``a=mid``
    identification-tag, an SDP token (RFC 5888 §4, RFC 4566 §9). Raises
    :class:`ExtensionError` otherwise."""
    if not 1 <= len(value) <= _MAX_STREAM_ID:
        raise ExtensionError(f"MID of {len(value)} bytes is not 1 to 255 bytes")
    if not _TOKEN_RE.fullmatch(value):
        raise ExtensionError(f"MID {bytes(value)!r} is not an SDP token")
    return bytes(value).decode("ascii")


def encode_stream_id(text: str) -> bytes:
    """Encode an RtpStreamId, RepairedRtpStreamId or MID value (RFC 8852 §3,
    RFC 8843 §15.1): the text's octets. Raises :class:`ExtensionError` unless
    ``text`` is 1 to 255 characters of an SDP token (which every RFC 8851
    rid-id is); elements of 17 bytes or more need the two-byte form."""
    if not isinstance(text, str):
        raise ExtensionError(f"stream id {text!r} is not a str")
    value = text.encode("utf-8")
    if not 1 <= len(value) <= _MAX_STREAM_ID or not _TOKEN_RE.fullmatch(value):
        raise ExtensionError(f"stream id {text!r} is not 1 to 255 token characters")
    return value
