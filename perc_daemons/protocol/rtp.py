"""Sans-I/O RTP and RTCP parsing and building.

* RTP fixed header, CSRC list, header extension and padding: RFC 3550 §5.1, §5.3.1.
* RTP header extension elements: RFC 8285 §4.2 (one-byte form, profile
  0xBEDE) and §4.3 (two-byte form, profile 0x100 in the upper 12 bits, the low
  4 bits being "appbits").
* RTCP common header and compound packets: RFC 3550 §6.1, §6.4.1, validity
  checks of Appendix A.2; reduced-size RTCP (RFC 5506) is accepted with
  ``strict_first=False``.
* RTP/RTCP and protocol demultiplexing: RFC 5761 §4, RFC 7983 §7.

Nothing here imports Twisted, reads a clock, touches a socket or logs.
Malformed input raises :class:`RtpError` or :class:`RtcpError`, never
IndexError, struct.error or ValueError.

:func:`header_length`, :func:`parse_fixed_header`, :func:`is_rtcp` and
:func:`classify_first_byte` are the media relay's per-packet fast path: they
create no objects beyond the ints (and tuple) they return.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from perc_daemons.protocol.errors import ProtocolError

__all__ = [
    "APP",
    "BYE",
    "ONE_BYTE_PROFILE",
    "PSFB",
    "PSFB_FIR",
    "PSFB_PLI",
    "RR",
    "RTCP_HEADER_LENGTH",
    "RTPFB",
    "RTPFB_NACK",
    "RTP_HEADER_LENGTH",
    "RTP_VERSION",
    "SDES",
    "SR",
    "TWO_BYTE_PROFILE",
    "ReportBlock",
    "RtcpError",
    "RtcpPacket",
    "RtpError",
    "RtpPacket",
    "SenderInfo",
    "build_compound",
    "build_extension_block",
    "classify_first_byte",
    "header_length",
    "is_rtcp",
    "parse_compound",
    "parse_extensions",
    "parse_fixed_header",
    "parse_report_blocks",
    "parse_sender_info",
    "receiver_report",
    "replace_extensions",
    "sender_report",
]

Buffer = bytes | bytearray | memoryview
Elements = list[tuple[int, bytes]]


class RtpError(ProtocolError):
    """A malformed or unbuildable RTP packet (RFC 3550 §5.1, RFC 8285)."""

    reason = "rtp_malformed"


class RtcpError(ProtocolError):
    """A malformed or unbuildable RTCP packet (RFC 3550 §6.1, §6.4, A.2)."""

    reason = "rtcp_malformed"


# --------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------

#: RFC 3550 §5.1: the version field V is 2.
RTP_VERSION = 2
#: RFC 3550 §5.1: fixed header up to and including the SSRC.
RTP_HEADER_LENGTH = 12
#: RFC 8285 §4.2: "defined by profile" value of the one-byte header form.
ONE_BYTE_PROFILE = 0xBEDE
#: RFC 8285 §4.3: two-byte form, 0x100 in the upper 12 bits (0x1000-0x100F);
#: the low 4 bits are "appbits".
TWO_BYTE_PROFILE = 0x1000
#: RFC 3550 §6.4.1: V/P/RC, PT, length.
RTCP_HEADER_LENGTH = 4

# RTCP packet types (RFC 3550 §12.1, RFC 4585 §6.1).
SR = 200
RR = 201
SDES = 202
BYE = 203
APP = 204
RTPFB = 205
PSFB = 206

# Feedback message types carried in the count field (RFC 4585 §6.2, §6.3;
# RFC 5104 §4.3.1).
RTPFB_NACK = 1
PSFB_PLI = 1
PSFB_FIR = 4

_MAX_CSRCS = 15
_MAX_EXTENSION_WORDS = 0xFFFF

_FIXED = struct.Struct("!BBHII")  # RFC 3550 §5.1 fixed header
_SEQ_SSRC = struct.Struct("!2xH4xI")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_EXT_HEADER = struct.Struct("!HH")  # RFC 3550 §5.3.1: profile, length in words
_RTCP_HEADER = struct.Struct("!BBH")  # RFC 3550 §6.4.1
_SENDER_INFO = struct.Struct("!QIII")  # RFC 3550 §6.4.1: NTP, RTP ts, counts
_REPORT_BLOCK = struct.Struct("!IIIIII")  # RFC 3550 §6.4.1: 24-byte block


def _is_rfc8285(profile: int) -> bool:
    return profile == ONE_BYTE_PROFILE or (profile & 0xFFF0) == TWO_BYTE_PROFILE


# --------------------------------------------------------------------------
# Fast path (media relay hot loop)
# --------------------------------------------------------------------------


def header_length(packet: Buffer) -> int:
    """Return the RTP header length: fixed header, CSRCs and extension block.

    RFC 3550 §5.1 (V, CC, X) and §5.3.1 (extension header: 16-bit profile
    then 16-bit length in 32-bit words, not counting the 4-byte extension
    header). Raises :class:`RtpError` unless V is 2 and the packet holds
    the whole header. The payload may be empty.
    """
    size = len(packet)
    if size < 12:
        raise RtpError(f"RTP packet of {size} bytes is shorter than the 12-byte fixed header")
    first = packet[0]
    if first >> 6 != 2:
        raise RtpError(f"RTP version is {first >> 6}, not 2")
    length = 12 + ((first & 0x0F) << 2)
    if first & 0x10:
        if size < length + 4:
            raise RtpError(f"RTP extension header at offset {length} runs past {size} bytes")
        length += 4 + ((packet[length + 2] << 10) | (packet[length + 3] << 2))
    if length > size:
        raise RtpError(f"RTP header of {length} bytes runs past the {size}-byte packet")
    return length


def header_info(packet: Buffer) -> tuple[int, int, int]:
    """Return ``(header_length, sequence_number, ssrc)`` in one pass.

    The same checks as :func:`header_length`; this is the SRTP layer's and
    the media relay's per-packet parse (RFC 3550 section 5.1).
    """
    length = header_length(packet)
    seq, ssrc = _SEQ_SSRC.unpack_from(packet)
    return length, seq, ssrc


def parse_fixed_header(packet: Buffer) -> tuple[int, int, int, int, int]:
    """Return ``(marker, payload_type, sequence_number, timestamp, ssrc)``.

    RFC 3550 §5.1 fixed header. Checks V is 2 and that the 12 fixed bytes
    are present (CSRCs and extension are not examined; see
    :func:`header_length`). Raises :class:`RtpError`.
    """
    if len(packet) < 12:
        raise RtpError(
            f"RTP packet of {len(packet)} bytes is shorter than the 12-byte fixed header"
        )
    first, second, seq, timestamp, ssrc = _FIXED.unpack_from(packet)
    if first >> 6 != 2:
        raise RtpError(f"RTP version is {first >> 6}, not 2")
    return second >> 7, second & 0x7F, seq, timestamp, ssrc


def is_rtcp(packet: Buffer) -> bool:
    """Whether a packet on an RTP/RTCP-multiplexed flow is RTCP.

    RFC 5761 §4: the second octet (marker bit plus payload type for RTP,
    packet type for RTCP) is in 192..223 for RTCP. Packets shorter than two
    bytes are not RTCP.
    """
    return len(packet) > 1 and 192 <= packet[1] <= 223


def classify_first_byte(b: int) -> str:
    """Demultiplex by first octet, RFC 7983 §7.

    Returns ``"stun"`` (0-3), ``"zrtp"`` (16-19), ``"dtls"`` (20-63),
    ``"turn"`` (64-79, TURN channel data), ``"rtp"`` (128-191, RTP or RTCP;
    see :func:`is_rtcp`) or ``"unknown"``.
    """
    if 128 <= b <= 191:
        return "rtp"
    if 0 <= b <= 3:
        return "stun"
    if 20 <= b <= 63:
        return "dtls"
    if 16 <= b <= 19:
        return "zrtp"
    if 64 <= b <= 79:
        return "turn"
    return "unknown"


# --------------------------------------------------------------------------
# RFC 8285 header extension elements
# --------------------------------------------------------------------------


def parse_extensions(profile: int, data: Buffer) -> Elements:
    """Parse RFC 8285 extension elements from an extension block's payload.

    ``data`` is the block after its 4-byte header. One-byte form (profile
    0xBEDE, RFC 8285 §4.2): a byte whose ID nibble is 0 is a padding byte
    and skipped on its own; ID 15 stops parsing and the rest is ignored;
    otherwise the length nibble is the value length minus one. Two-byte form
    (profile 0x1000-0x100F, RFC 8285 §4.3): an ID byte of 0 is a padding
    byte; otherwise a length byte (0-255) follows. An element running past
    ``data``, or any other profile, raises :class:`RtpError`.
    """
    size = len(data)
    elements: Elements = []
    offset = 0
    if profile == ONE_BYTE_PROFILE:
        while offset < size:
            byte = data[offset]
            ident = byte >> 4
            if ident == 0:
                offset += 1
                continue
            if ident == 15:
                break
            start = offset + 1
            offset = start + (byte & 0x0F) + 1
            if offset > size:
                raise RtpError(
                    f"RFC 8285 one-byte element id {ident} at offset {start - 1} "
                    f"runs past the {size}-byte extension block"
                )
            elements.append((ident, bytes(data[start:offset])))
        return elements
    if (profile & 0xFFF0) == TWO_BYTE_PROFILE:
        while offset < size:
            ident = data[offset]
            if ident == 0:
                offset += 1
                continue
            if offset + 1 >= size:
                raise RtpError(
                    f"RFC 8285 two-byte element id {ident} at offset {offset} "
                    f"has no length byte in the {size}-byte extension block"
                )
            start = offset + 2
            end = start + data[offset + 1]
            if end > size:
                raise RtpError(
                    f"RFC 8285 two-byte element id {ident} at offset {offset} "
                    f"runs past the {size}-byte extension block"
                )
            elements.append((ident, bytes(data[start:end])))
            offset = end
        return elements
    raise RtpError(f"extension profile {profile:#06x} is not an RFC 8285 profile")


def _build_elements(elements: Iterable[tuple[int, Buffer]]) -> tuple[int, bytes]:
    """Return ``(profile, unpadded element data)`` choosing the form (RFC 8285 §4)."""
    items = list(elements)
    one_byte = True
    for item in items:
        if not isinstance(item, tuple) or len(item) != 2:
            raise RtpError(f"extension element {item!r} is not an (id, value) pair")
        ident, value = item
        if not isinstance(ident, int) or not isinstance(value, bytes | bytearray | memoryview):
            raise RtpError(f"extension element {item!r} is not an (int, bytes) pair")
        if not 1 <= ident <= 255:
            raise RtpError(f"extension element id {ident} is outside 1..255 (RFC 8285 §4.3)")
        if len(value) > 255:
            raise RtpError(f"extension element id {ident} value of {len(value)} bytes exceeds 255")
        if ident > 14 or not 1 <= len(value) <= 16:
            one_byte = False
    parts: list[bytes] = []
    if one_byte:
        for ident, value in items:
            parts.append(bytes(((ident << 4) | (len(value) - 1),)))
            parts.append(bytes(value))
        return ONE_BYTE_PROFILE, b"".join(parts)
    for ident, value in items:
        parts.append(bytes((ident, len(value))))
        parts.append(bytes(value))
    return TWO_BYTE_PROFILE, b"".join(parts)


def _extension_block(profile: int, data: bytes) -> bytes:
    """Header (RFC 3550 §5.3.1) plus ``data`` zero-padded to 32 bits."""
    pad = -len(data) % 4
    words = (len(data) + pad) >> 2
    if words > _MAX_EXTENSION_WORDS:
        raise RtpError(f"extension block of {words} words exceeds 65535")
    return _EXT_HEADER.pack(profile, words) + data + b"\x00" * pad


def build_extension_block(elements: Sequence[tuple[int, Buffer]]) -> bytes:
    """Build a complete RFC 8285 extension block from ``(id, value)`` pairs.

    Returns the 4-byte extension header (profile, length in 32-bit words;
    RFC 3550 §5.3.1) and the elements, zero-padded to a 32-bit boundary.
    The one-byte form (RFC 8285 §4.2) is used when every id is 1..14 and
    every value 1..16 bytes, otherwise the two-byte form (§4.3, profile
    0x1000, ids 1..255, values 0..255 bytes). An empty list gives ``b""``.
    Raises :class:`RtpError` for elements neither form can carry.
    """
    if not elements:
        return b""
    profile, data = _build_elements(elements)
    return _extension_block(profile, data)


def replace_extensions(packet: Buffer, elements: Sequence[tuple[int, Buffer]] | None) -> bytes:
    """Return ``packet`` with its header extension block replaced.

    The new block is :func:`build_extension_block` of ``elements``; ``None``
    or ``[]`` removes the block. The X bit (RFC 3550 §5.1) is set to match;
    every other byte (fixed header, CSRCs, payload, padding) is unchanged.
    Raises :class:`RtpError` if the packet's header is malformed (see
    :func:`header_length`) or the elements cannot be encoded.
    """
    end = header_length(packet)
    first = packet[0]
    csrc_end = 12 + ((first & 0x0F) << 2)
    block = build_extension_block(elements) if elements else b""
    first = (first & 0xEF) | (0x10 if block else 0)
    return b"".join((bytes((first,)), packet[1:csrc_end], block, packet[end:]))


# --------------------------------------------------------------------------
# RTP packet object (endpoints and tests; not the relay's hot path)
# --------------------------------------------------------------------------


class RtpPacket:
    """A parsed RTP packet (RFC 3550 §5.1) for endpoints and tests.

    ``padding`` and ``extension`` are derived: the P bit is set iff
    ``padding_length > 0``, the X bit iff ``extension_profile`` or
    ``extensions`` is not None.

    Extensions: ``extension_profile`` is the 16-bit "defined by profile"
    field (None: no block); ``extensions`` the parsed RFC 8285 elements in
    order (``[]`` for other profiles; None: no block); ``extension_data``
    the raw block payload after its 4-byte header, as received.

    :meth:`serialize` writes ``extension_profile`` and ``extension_data``
    unchanged when ``extensions`` is None, when the profile is not RFC 8285
    and ``extensions`` is empty, or when the profile is RFC 8285 and
    ``extension_data`` still parses to ``extensions`` (so
    ``serialize(parse(x)) == x`` for every accepted ``x``). Otherwise it
    builds a fresh block from ``extensions`` as :func:`build_extension_block`
    does (form chosen from the elements, not from ``extension_profile``; an
    empty list gives an empty 0xBEDE block, keeping the X bit). ``padding_data`` likewise keeps the
    received padding octets; it is used when it is ``padding_length`` bytes
    ending in that count, otherwise zero octets plus the count are written.
    """

    __slots__ = (
        "csrcs",
        "extension_data",
        "extension_profile",
        "extensions",
        "marker",
        "padding_data",
        "padding_length",
        "payload",
        "payload_type",
        "sequence_number",
        "ssrc",
        "timestamp",
    )

    version = RTP_VERSION

    def __init__(
        self,
        *,
        payload_type: int = 0,
        sequence_number: int = 0,
        timestamp: int = 0,
        ssrc: int = 0,
        marker: bool = False,
        csrcs: list[int] | None = None,
        extension_profile: int | None = None,
        extensions: Elements | None = None,
        extension_data: bytes = b"",
        payload: bytes = b"",
        padding_length: int = 0,
        padding_data: bytes = b"",
    ) -> None:
        self.marker = marker
        self.payload_type = payload_type
        self.sequence_number = sequence_number
        self.timestamp = timestamp
        self.ssrc = ssrc
        self.csrcs: list[int] = [] if csrcs is None else csrcs
        self.extension_profile = extension_profile
        self.extensions = extensions
        self.extension_data = extension_data
        self.payload = payload
        self.padding_length = padding_length
        self.padding_data = padding_data

    @property
    def padding(self) -> bool:
        """The P bit (RFC 3550 §5.1)."""
        return self.padding_length > 0

    @property
    def extension(self) -> bool:
        """The X bit (RFC 3550 §5.1)."""
        return self.extension_profile is not None or self.extensions is not None

    @classmethod
    def parse(cls, data: Buffer) -> RtpPacket:
        """Parse a whole RTP packet (RFC 3550 §5.1, §5.3.1; RFC 8285).

        Padding (P bit): the last octet counts the padding octets including
        itself; a count of 0 or one larger than the space after the header
        raises :class:`RtpError`, as does any header error or a malformed
        RFC 8285 element.
        """
        end = header_length(data)
        first, second, seq, timestamp, ssrc = _FIXED.unpack_from(data)
        count = first & 0x0F
        csrc_end = 12 + (count << 2)
        csrcs = list(struct.unpack_from(f"!{count}I", data, 12)) if count else []
        profile: int | None = None
        extensions: Elements | None = None
        extension_data = b""
        if first & 0x10:
            profile = (data[csrc_end] << 8) | data[csrc_end + 1]
            extension_data = bytes(data[csrc_end + 4 : end])
            extensions = parse_extensions(profile, extension_data) if _is_rfc8285(profile) else []
        size = len(data)
        padding_length = 0
        padding_data = b""
        if first & 0x20:
            if size == end:
                raise RtpError("RTP P bit set but no octets follow the header")
            padding_length = data[size - 1]
            if padding_length == 0:
                raise RtpError("RTP padding count is 0 (RFC 3550 §5.1 counts itself)")
            if padding_length > size - end:
                raise RtpError(
                    f"RTP padding count {padding_length} exceeds the "
                    f"{size - end} bytes after the header"
                )
            padding_data = bytes(data[size - padding_length :])
        return cls(
            payload_type=second & 0x7F,
            sequence_number=seq,
            timestamp=timestamp,
            ssrc=ssrc,
            marker=bool(second & 0x80),
            csrcs=csrcs,
            extension_profile=profile,
            extensions=extensions,
            extension_data=extension_data,
            payload=bytes(data[end : size - padding_length]),
            padding_length=padding_length,
            padding_data=padding_data,
        )

    def _extension_bytes(self) -> bytes:
        profile = self.extension_profile
        elements = self.extensions
        if profile is None:
            if elements is None:
                return b""
            if not elements:
                return _EXT_HEADER.pack(ONE_BYTE_PROFILE, 0)
            return build_extension_block(elements)
        if not 0 <= profile <= 0xFFFF:
            raise RtpError(f"extension profile {profile} is outside 0..65535")
        data = bytes(self.extension_data)
        if elements is not None:
            if _is_rfc8285(profile):
                try:
                    current = parse_extensions(profile, data) == elements
                except RtpError:
                    current = False
                if not current:
                    if not elements:
                        return _EXT_HEADER.pack(ONE_BYTE_PROFILE, 0)
                    return build_extension_block(elements)
            elif elements:
                return build_extension_block(elements)
        if len(data) % 4:
            raise RtpError(f"extension data of {len(data)} bytes is not a multiple of 4")
        if len(data) >> 2 > _MAX_EXTENSION_WORDS:
            raise RtpError(f"extension data of {len(data)} bytes exceeds 65535 words")
        return _EXT_HEADER.pack(profile, len(data) >> 2) + data

    def serialize(self) -> bytes:
        """Encode the packet (RFC 3550 §5.1). Raises :class:`RtpError` for
        out-of-range fields."""
        if not 0 <= self.payload_type <= 127:
            raise RtpError(f"payload type {self.payload_type} is outside 0..127")
        if not 0 <= self.sequence_number <= 0xFFFF:
            raise RtpError(f"sequence number {self.sequence_number} is outside 0..65535")
        if not 0 <= self.timestamp <= 0xFFFFFFFF:
            raise RtpError(f"timestamp {self.timestamp} is not a 32-bit value")
        if not 0 <= self.ssrc <= 0xFFFFFFFF:
            raise RtpError(f"SSRC {self.ssrc} is not a 32-bit value")
        csrcs = self.csrcs
        if len(csrcs) > _MAX_CSRCS:
            raise RtpError(f"{len(csrcs)} CSRCs exceed the maximum of 15")
        for csrc in csrcs:
            if not 0 <= csrc <= 0xFFFFFFFF:
                raise RtpError(f"CSRC {csrc} is not a 32-bit value")
        pad = self.padding_length
        if not 0 <= pad <= 255:
            raise RtpError(f"padding length {pad} is outside 0..255")
        extension = self._extension_bytes()
        first = 0x80 | len(csrcs) | (0x10 if extension else 0) | (0x20 if pad else 0)
        second = (0x80 if self.marker else 0) | self.payload_type
        parts = [_FIXED.pack(first, second, self.sequence_number, self.timestamp, self.ssrc)]
        if csrcs:
            parts.append(struct.pack(f"!{len(csrcs)}I", *csrcs))
        parts.append(extension)
        parts.append(bytes(self.payload))
        if pad:
            padding = bytes(self.padding_data)
            if len(padding) != pad or padding[-1] != pad:
                padding = b"\x00" * (pad - 1) + bytes((pad,))
            parts.append(padding)
        return b"".join(parts)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RtpPacket):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self.__slots__)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"RtpPacket({fields})"


# --------------------------------------------------------------------------
# RTCP
# --------------------------------------------------------------------------


class RtcpPacket:
    """One RTCP packet of a compound packet (RFC 3550 §6.1, §6.4.1).

    ``count`` is the 5-bit RC/SC/FMT field, ``body`` everything after the
    4-byte common header (sender SSRC first, padding octets last when
    ``padding`` is set), ``raw`` the packet's bytes as received (or as built
    at construction). ``ssrc`` is read from ``body`` (None if it is empty).
    :meth:`serialize` always encodes the current fields.
    """

    __slots__ = ("body", "count", "packet_type", "padding", "raw")

    version = RTP_VERSION

    def __init__(
        self,
        packet_type: int,
        body: bytes = b"",
        *,
        count: int = 0,
        padding: bool = False,
        raw: bytes | None = None,
    ) -> None:
        self.packet_type = packet_type
        self.body = body
        self.count = count
        self.padding = padding
        self.raw = self.serialize() if raw is None else raw

    @property
    def ssrc(self) -> int | None:
        """Sender SSRC: the first 4 body bytes (RFC 3550 §6.4.1), or None."""
        if len(self.body) < 4:
            return None
        return _U32.unpack_from(self.body)[0]

    @property
    def padding_length(self) -> int:
        """Number of padding octets at the end of ``body`` (RFC 3550 §6.4.1)."""
        return self.body[-1] if self.padding and self.body else 0

    def serialize(self) -> bytes:
        """Encode the common header and body. Raises :class:`RtcpError`."""
        if not 0 <= self.count <= 31:
            raise RtcpError(f"RTCP count {self.count} is outside 0..31")
        if not 0 <= self.packet_type <= 255:
            raise RtcpError(f"RTCP packet type {self.packet_type} is outside 0..255")
        body = bytes(self.body)
        if len(body) % 4:
            raise RtcpError(f"RTCP body of {len(body)} bytes is not a multiple of 4")
        words = len(body) >> 2
        if words > 0xFFFF:
            raise RtcpError(f"RTCP body of {words} words exceeds 65535")
        if self.padding and (not body or not 1 <= body[-1] <= len(body)):
            raise RtcpError("RTCP P bit set but the body does not end in a valid padding count")
        first = 0x80 | (0x20 if self.padding else 0) | self.count
        return _RTCP_HEADER.pack(first, self.packet_type, words) + body

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RtcpPacket):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self.__slots__)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"RtcpPacket(packet_type={self.packet_type}, count={self.count}, "
            f"padding={self.padding}, body={self.body!r})"
        )


def _minimum_body(packet_type: int, count: int) -> int:
    """Body bytes an SR/RR needs for its fixed part and report blocks (§6.4)."""
    if packet_type == SR:
        return 4 + _SENDER_INFO.size + count * _REPORT_BLOCK.size
    if packet_type == RR:
        return 4 + count * _REPORT_BLOCK.size
    return 0


def parse_compound(data: Buffer, strict_first: bool = True) -> list[RtcpPacket]:
    """Split a compound RTCP packet (RFC 3550 §6.1) into its packets.

    Applies the RFC 3550 Appendix A.2 validity checks: every packet is
    version 2; the length fields (32-bit words minus one, §6.4.1) tile the
    data exactly; only the last packet may have the P bit, and its padding
    count is 1..body length; the first packet is SR or RR unless
    ``strict_first`` is false (RFC 5506 reduced-size RTCP). An SR or RR
    must also hold the report blocks its count announces (§6.4.1, §6.4.2).
    Empty data and every violation raise :class:`RtcpError`.
    """
    size = len(data)
    if size == 0:
        raise RtcpError("empty RTCP packet")
    packets: list[RtcpPacket] = []
    offset = 0
    while offset < size:
        if size - offset < 4:
            raise RtcpError(
                f"RTCP header at offset {offset} truncated ({size - offset} bytes left)"
            )
        first, packet_type, words = _RTCP_HEADER.unpack_from(data, offset)
        if first >> 6 != 2:
            raise RtcpError(f"RTCP packet at offset {offset} has version {first >> 6}, not 2")
        end = offset + 4 + (words << 2)
        if end > size:
            raise RtcpError(
                f"RTCP length field at offset {offset} ({words} words) runs past "
                f"the {size}-byte compound packet"
            )
        if not packets and strict_first and packet_type not in (SR, RR):
            raise RtcpError(f"first RTCP packet has type {packet_type}, not SR or RR")
        body = bytes(data[offset + 4 : end])
        padding = bool(first & 0x20)
        pad = 0
        if padding:
            if end != size:
                raise RtcpError(
                    f"RTCP P bit set on the non-last packet at offset {offset} (RFC 3550 §6.4.1)"
                )
            if not body:
                raise RtcpError("RTCP P bit set on a packet with no body")
            pad = body[-1]
            if pad == 0 or pad > len(body):
                raise RtcpError(f"RTCP padding count {pad} invalid for a {len(body)}-byte body")
        count = first & 0x1F
        needed = _minimum_body(packet_type, count)
        if needed > len(body) - pad:
            raise RtcpError(
                f"RTCP packet type {packet_type} with count {count} needs {needed} "
                f"body bytes, has {len(body) - pad}"
            )
        packets.append(
            RtcpPacket(
                packet_type,
                body,
                count=count,
                padding=padding,
                raw=bytes(data[offset:end]),
            )
        )
        offset = end
    return packets


def build_compound(packets: Sequence[RtcpPacket]) -> bytes:
    """Concatenate packets into a compound RTCP packet (RFC 3550 §6.1).

    Raises :class:`RtcpError` for an empty list or a P bit on any packet
    but the last. The first-packet-is-SR/RR rule is not enforced, so
    reduced-size RTCP (RFC 5506) can be built.
    """
    if not packets:
        raise RtcpError("a compound RTCP packet needs at least one packet")
    for packet in packets[:-1]:
        if packet.padding:
            raise RtcpError("only the last packet of a compound RTCP packet may be padded")
    return b"".join(packet.serialize() for packet in packets)


# --------------------------------------------------------------------------
# SR / RR layout (RFC 3550 §6.4.1, §6.4.2)
# --------------------------------------------------------------------------


class SenderInfo(NamedTuple):
    """SR sender information (RFC 3550 §6.4.1)."""

    ntp_timestamp: int  # 64-bit NTP timestamp (seconds << 32 | fraction)
    rtp_timestamp: int
    packet_count: int
    octet_count: int


class ReportBlock(NamedTuple):
    """One 24-byte reception report block (RFC 3550 §6.4.1)."""

    ssrc: int
    fraction_lost: int  # 8-bit fixed point, lost / expected * 256
    cumulative_lost: int  # signed 24-bit
    highest_sequence: int  # extended highest sequence number received
    jitter: int
    last_sr: int  # middle 32 bits of the last SR's NTP timestamp
    delay_since_last_sr: int  # units of 1/65536 s


def parse_sender_info(packet: RtcpPacket) -> SenderInfo:
    """Return an SR's sender information (RFC 3550 §6.4.1)."""
    if packet.packet_type != SR:
        raise RtcpError(f"RTCP packet type {packet.packet_type} is not SR")
    if len(packet.body) < 4 + _SENDER_INFO.size:
        raise RtcpError(f"SR body of {len(packet.body)} bytes has no sender info")
    return SenderInfo(*_SENDER_INFO.unpack_from(packet.body, 4))


def parse_report_blocks(packet: RtcpPacket) -> list[ReportBlock]:
    """Return the ``count`` report blocks of an SR or RR (RFC 3550 §6.4.1-2)."""
    if packet.packet_type == SR:
        offset = 4 + _SENDER_INFO.size
    elif packet.packet_type == RR:
        offset = 4
    else:
        raise RtcpError(f"RTCP packet type {packet.packet_type} is neither SR nor RR")
    body = packet.body
    if offset + packet.count * _REPORT_BLOCK.size > len(body) - packet.padding_length:
        raise RtcpError(f"RTCP body too short for {packet.count} report blocks")
    blocks = []
    for _ in range(packet.count):
        ssrc, lost, highest, jitter, lsr, dlsr = _REPORT_BLOCK.unpack_from(body, offset)
        cumulative = lost & 0xFFFFFF
        if cumulative & 0x800000:
            cumulative -= 0x1000000
        blocks.append(ReportBlock(ssrc, lost >> 24, cumulative, highest, jitter, lsr, dlsr))
        offset += _REPORT_BLOCK.size
    return blocks


def _pack_report_blocks(blocks: Sequence[ReportBlock]) -> bytes:
    if len(blocks) > 31:
        raise RtcpError(f"{len(blocks)} report blocks exceed the maximum of 31")
    parts = []
    for block in blocks:
        if not 0 <= block.fraction_lost <= 255:
            raise RtcpError(f"fraction lost {block.fraction_lost} is outside 0..255")
        if not -0x800000 <= block.cumulative_lost <= 0x7FFFFF:
            raise RtcpError(f"cumulative lost {block.cumulative_lost} is not a signed 24-bit value")
        try:
            parts.append(
                _REPORT_BLOCK.pack(
                    block.ssrc,
                    (block.fraction_lost << 24) | (block.cumulative_lost & 0xFFFFFF),
                    block.highest_sequence,
                    block.jitter,
                    block.last_sr,
                    block.delay_since_last_sr,
                )
            )
        except struct.error as exc:
            raise RtcpError(f"report block field out of range: {exc}") from None
    return b"".join(parts)


def sender_report(ssrc: int, info: SenderInfo, blocks: Sequence[ReportBlock] = ()) -> RtcpPacket:
    """Build an SR packet (RFC 3550 §6.4.1)."""
    try:
        head = _U32.pack(ssrc) + _SENDER_INFO.pack(*info)
    except struct.error as exc:
        raise RtcpError(f"sender report field out of range: {exc}") from None
    return RtcpPacket(SR, head + _pack_report_blocks(blocks), count=len(blocks))


def receiver_report(ssrc: int, blocks: Sequence[ReportBlock] = ()) -> RtcpPacket:
    """Build an RR packet (RFC 3550 §6.4.2)."""
    try:
        head = _U32.pack(ssrc)
    except struct.error as exc:
        raise RtcpError(f"receiver report SSRC out of range: {exc}") from None
    return RtcpPacket(RR, head + _pack_report_blocks(blocks), count=len(blocks))
