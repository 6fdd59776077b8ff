"""The Media Distributor <-> Key Distributor tunnel (RFC 9185), sans-I/O.

What is here:

* one frozen dataclass per tunnel message, each with ``encode()`` returning
  the whole frame ``msg_type (1) | length (2) | body`` (RFC 9185 §6.1, all
  big-endian);
* :func:`decode_message`, which turns one frame's type and body into a
  message;
* :class:`TunnelDecoder`, reassembly of frames from the TLS application-data
  byte stream, with bounded buffering;
* :func:`new_association_id` and :func:`is_uuid4` for the 16-byte
  association ids (RFC 9185 §6.1: ``opaque uuid[16]``, a version-4 UUID).

RFC 9185 messages (§6.2-§6.6), version 0x00:

==== ================== ========= ===============================================
type name               direction body
==== ================== ========= ===============================================
0x01 SupportedProfiles  MD -> KD  ``uint8 version``, ``profiles<2..2^16-1>``
0x02 UnsupportedVersion KD -> MD  ``uint8 highest_version``
0x03 MediaKeys          KD -> MD  uuid, profile (2), ``mki<0..255>``, client/server
                                  write keys and salts, each ``<1..255>``
0x04 TunneledDtls       both      uuid, ``dtls_message<1..2^16-1>``
0x05 EndpointDisconnect both      uuid [``uint8 reason``: our private extension]
==== ================== ========= ===============================================

EndpointDisconnect's private extension (ours; docs/PROTOCOL.md): why the
MD ended the association, one byte after the uuid
(:data:`DISCONNECT_CONSENT_TIMEOUT` 1, :data:`DISCONNECT_LEAVE` 2,
:data:`DISCONNECT_CONFERENCE_DELETED` 3; other values are passed through
and read as "no reason").  RFC 9185 decoders refuse the extra byte, so the
MD adds it only on a tunnel whose KD announced that it reads it: the KD
sends, on every tunnel up, an EndpointDisconnect of the reserved
association id :data:`REASONS_ANNOUNCEMENT` (a version-4 UUID no
association uses), which an MD that predates the extension ignores as an
association it does not have.

Private messages (ours, not in RFC 9185; DESIGN.md "Decisions", documented
in docs/PROTOCOL.md).  They carry the draft-roach-perc-webrtc answer signing
and use types from 0xF0 up.  Strings are UTF-8 with a 2-byte length prefix,
each at most :data:`MAX_SDP_LENGTH` bytes, so a frame always fits:

* **0xF0 SignAnswer** (MD -> KD): ``uuid association_id``,
  ``opaque offer_sdp<1..MAX_SDP_LENGTH>``,
  ``opaque answer_sdp<1..MAX_SDP_LENGTH>``.  The MD asks the KD to check the
  endpoint's offer (fingerprint, tls-id, identity) and sign the answer.
* **0xF1 SignAnswerAck** (KD -> MD): ``uuid association_id``,
  ``uint16 status``, ``opaque text<0..MAX_SDP_LENGTH>``.  With status
  :data:`SIGN_STATUS_OK` (0) ``text`` is the signed answer SDP and must not be
  empty; with any other status it is a human-readable reason (may be empty).
  Status values other than the named ones are passed through, not refused.
* **0xF2 Associations** (MD -> KD): ``uint16 count``, then ``count``
  entries of ``uuid association_id`` and ``opaque conference_id<1..255>``
  (1-byte length, UTF-8); ``count`` may be 0 and is at most
  :data:`MAX_ASSOCIATIONS`, so any message fits one frame; an association id
  appears at most once.  Sent on every tunnel (re)connection: the admitted
  participants of the conferences that name this KD, so that a KD that lost
  its state (restart) learns which members it can no longer reach.
* **0xF3 Ping** (either way): ``uint64 nonce``.  **0xF4 Pong** (either way):
  ``uint64 nonce``, the nonce of the Ping it answers.  RFC 9185 has no
  keepalive; ours is :class:`Liveness` (one Ping in flight at a time, a Pong
  due within a timeout).  Each side answers every Ping of an up tunnel at
  once; a Pong that answers no Ping in flight is a protocol error.
* **0xF5 ConferenceEnded** (KD -> MD): ``opaque conference_id<1..255>``
  (1-byte length, UTF-8, as in SignAnswer and Associations).  The KD sends it
  on every up tunnel when the KMF reports the conference ended, after the
  EndpointDisconnects of its associations; an MD ends a conference it hosts
  only if that tunnel's KD is the conference's, and ignores it otherwise.
  An MD that predates the type refuses it as any unknown type
  (:class:`UnknownMessageType`): that tunnel is closed and reconnected.

Validation is shared by construction and decoding: a message that could not
be encoded (a bad UUID, an empty profile list, a key of 0 or 256 bytes, a
body over 65535 bytes...) cannot be built, and raises the same typed
:class:`TunnelError` a peer sending it would get.  ``SupportedProfiles``
with a version other than :data:`PROTOCOL_VERSION` is refused with
:class:`UnsupportedProtocolVersion` (carrying the version) so that a KD can
answer with :class:`UnsupportedVersion` and close (§5.5).

Every :class:`TunnelError` means the tunnel connection is to be closed; the
decoder refuses all input after one.  Nothing here does I/O or reads a
clock.  Keys and salts never appear in a ``repr``.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from enum import IntEnum
from typing import ClassVar, NamedTuple

from perc_daemons.protocol.errors import ProtocolError

__all__ = [
    "ASSOCIATION_ID_LENGTH",
    "DISCONNECT_CONFERENCE_DELETED",
    "DISCONNECT_CONSENT_TIMEOUT",
    "DISCONNECT_LEAVE",
    "DISCONNECT_REASONS",
    "DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM",
    "DOUBLE_AEAD_AES_256_GCM_AEAD_AES_256_GCM",
    "HEADER_LENGTH",
    "MAX_ASSOCIATIONS",
    "MAX_BODY_LENGTH",
    "MAX_CONFERENCE_ID_LENGTH",
    "MAX_SDP_LENGTH",
    "PROTOCOL_VERSION",
    "REASONS_ANNOUNCEMENT",
    "REFUSAL_CODE",
    "SIGN_STATUS_BAD_OFFER",
    "SIGN_STATUS_INTERNAL_ERROR",
    "SIGN_STATUS_OK",
    "SIGN_STATUS_REFUSED",
    "SRTP_AEAD_AES_128_GCM",
    "SRTP_AEAD_AES_256_GCM",
    "AssociationEntry",
    "Associations",
    "BadAssociationId",
    "ConferenceEnded",
    "DecoderFailed",
    "EndpointDisconnect",
    "FrameTooLarge",
    "Liveness",
    "LivenessTimeout",
    "MalformedFrame",
    "MediaKeys",
    "Message",
    "MessageType",
    "Ping",
    "Pong",
    "SignAnswer",
    "SignAnswerAck",
    "SupportedProfiles",
    "TunnelDecoder",
    "TunnelError",
    "TunneledDtls",
    "UnexpectedPong",
    "UnknownMessageType",
    "UnsupportedProtocolVersion",
    "UnsupportedVersion",
    "decode_message",
    "is_uuid4",
    "new_association_id",
    "refusal_code",
]

#: The tunnel protocol version of RFC 9185.
PROTOCOL_VERSION = 0x00
#: ``msg_type (1) | length (2)``.
HEADER_LENGTH = 3
#: The largest body the 2-byte length field can express.
MAX_BODY_LENGTH = 0xFFFF
#: ``opaque uuid[16]``.
ASSOCIATION_ID_LENGTH = 16
#: Bound on each UTF-8 SDP string of our private messages (two always fit).
MAX_SDP_LENGTH = 32000
#: ``opaque conference_id<1..255>`` of :class:`SignAnswer`, :class:`Associations` and
#: :class:`ConferenceEnded` (UTF-8 bytes).
MAX_CONFERENCE_ID_LENGTH = 255
#: Entries of one :class:`Associations`: even with the longest conference ids,
#: ``2 + n * (16 + 1 + 255)`` bytes fit one body (240 entries, 65282 bytes).
MAX_ASSOCIATIONS = (MAX_BODY_LENGTH - 2) // (ASSOCIATION_ID_LENGTH + 1
                                             + MAX_CONFERENCE_ID_LENGTH)

#: EndpointDisconnect's private reason byte (MD -> KD, to a KD that announced it reads it).
DISCONNECT_CONSENT_TIMEOUT = 1  # no STUN consent check within the timeout (RFC 7675)
DISCONNECT_LEAVE = 2  # the endpoint left over the MD's HTTPS API
DISCONNECT_CONFERENCE_DELETED = 3  # the conference was deleted (provider DELETE, ConferenceEnded)
#: The reasons' names, as the KD records them (audit ``left`` reasons).
DISCONNECT_REASONS = {DISCONNECT_CONSENT_TIMEOUT: "consent_timeout",
                      DISCONNECT_LEAVE: "md_leave",
                      DISCONNECT_CONFERENCE_DELETED: "conference_deleted"}
#: The reserved association id of the KD's announcement "I read disconnect reasons"
#: (an EndpointDisconnect of it, KD -> MD, on every tunnel up).
REASONS_ANNOUNCEMENT = uuid.UUID("50455243-d15c-4e45-8000-726561736f6e").bytes

#: SRTP protection profile values (RFC 5764 registry, RFC 7714, RFC 8723).
SRTP_AEAD_AES_128_GCM = 0x0007
SRTP_AEAD_AES_256_GCM = 0x0008
DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM = 0x0009
DOUBLE_AEAD_AES_256_GCM_AEAD_AES_256_GCM = 0x000A

#: SignAnswerAck status codes (ours).
SIGN_STATUS_OK = 0
SIGN_STATUS_REFUSED = 1  # identity, fingerprint or policy check failed
SIGN_STATUS_BAD_OFFER = 2  # the offer or answer SDP could not be used
SIGN_STATUS_INTERNAL_ERROR = 3
#: A SignAnswerAck refusal's text starts with a machine-readable code and ": "
#: ("not_invited: not invited", "not_started: ..."; docs/PROTOCOL.md).
REFUSAL_CODE = re.compile(r"[a-z][a-z0-9_]{0,39}")


def refusal_code(text: str) -> str | None:
    """The machine-readable code a SignAnswerAck refusal's text starts with, if any."""
    code, sep, _ = text.partition(": ")
    return code if sep and REFUSAL_CODE.fullmatch(code) else None


class MessageType(IntEnum):
    SUPPORTED_PROFILES = 0x01
    UNSUPPORTED_VERSION = 0x02
    MEDIA_KEYS = 0x03
    TUNNELED_DTLS = 0x04
    ENDPOINT_DISCONNECT = 0x05
    SIGN_ANSWER = 0xF0  # private (ours)
    SIGN_ANSWER_ACK = 0xF1  # private (ours)
    ASSOCIATIONS = 0xF2  # private (ours)
    PING = 0xF3  # private (ours)
    PONG = 0xF4  # private (ours)
    CONFERENCE_ENDED = 0xF5  # private (ours)


# -- errors ----------------------------------------------------------------------


class TunnelError(ProtocolError):
    """Any tunnel protocol failure; the tunnel connection is to be closed.

    ``messages`` holds the messages :meth:`TunnelDecoder.feed` decoded from
    the same call before it hit the error (empty elsewhere).
    """

    reason = "tunnel_error"
    messages: tuple[Message, ...] = ()


class MalformedFrame(TunnelError):
    """A body that is truncated, has trailing bytes, or breaks a bound."""

    reason = "tunnel_malformed"


class UnknownMessageType(TunnelError):
    """A ``msg_type`` we do not implement."""

    reason = "tunnel_unknown_type"

    def __init__(self, msg_type: int) -> None:
        super().__init__(f"unknown tunnel message type 0x{msg_type:02x}")
        self.msg_type = msg_type


class FrameTooLarge(TunnelError):
    """A length field above the decoder's limit (refused before buffering)."""

    reason = "tunnel_frame_too_large"

    def __init__(self, length: int, limit: int) -> None:
        super().__init__(f"tunnel frame body of {length} bytes exceeds {limit}")
        self.length = length
        self.limit = limit


class BadAssociationId(TunnelError):
    """An association id that is not 16 bytes or not a version-4 UUID."""

    reason = "tunnel_bad_association_id"


class UnsupportedProtocolVersion(TunnelError):
    """SupportedProfiles with a version we do not speak (RFC 9185 §5.5)."""

    reason = "tunnel_unsupported_version"

    def __init__(self, version: int) -> None:
        super().__init__(f"unsupported tunnel protocol version {version}")
        self.version = version


class LivenessTimeout(TunnelError):
    """The peer did not answer our Ping in time (:class:`Liveness`)."""

    reason = "tunnel_liveness_timeout"


class UnexpectedPong(TunnelError):
    """A Pong that answers no Ping in flight."""

    reason = "tunnel_unexpected_pong"


class DecoderFailed(TunnelError):
    """Input fed to a decoder that has already raised a TunnelError."""

    reason = "tunnel_decoder_failed"


# -- association ids -------------------------------------------------------------


def new_association_id() -> bytes:
    """A fresh random association id: a version-4 UUID's 16 raw bytes."""
    return uuid.uuid4().bytes


def is_uuid4(value: object) -> bool:
    """Whether ``value`` is 16 bytes holding an RFC 4122 version-4 UUID."""
    return (
        isinstance(value, bytes)
        and len(value) == ASSOCIATION_ID_LENGTH
        and value[6] >> 4 == 4
        and value[8] & 0xC0 == 0x80
    )


def _check_association_id(value: object) -> None:
    if not isinstance(value, bytes):
        raise TypeError("association_id must be bytes")
    if not is_uuid4(value):
        raise BadAssociationId("association id is not a 16-byte version-4 UUID")


def _check_opaque(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, bytes):
        raise TypeError(f"{name} must be bytes")
    if not low <= len(value) <= high:
        raise MalformedFrame(f"{name} is {len(value)} bytes, not {low}..{high}")


def _check_uint(name: str, value: object, bits: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int")
    if not 0 <= value < 1 << bits:
        raise MalformedFrame(f"{name} {value} is not a uint{bits}")


def _check_text(name: str, value: object, low: int) -> bytes:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str")
    try:
        data = value.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates
        raise MalformedFrame(f"{name} is not encodable as UTF-8") from exc
    if not low <= len(data) <= MAX_SDP_LENGTH:
        raise MalformedFrame(f"{name} is {len(data)} bytes, not {low}..{MAX_SDP_LENGTH}")
    return data


def _frame(msg_type: int, body: bytes) -> bytes:
    if len(body) > MAX_BODY_LENGTH:
        raise MalformedFrame(f"tunnel message body of {len(body)} bytes is too long")
    return bytes((msg_type,)) + len(body).to_bytes(2, "big") + body


# -- body reader -------------------------------------------------------------------


class _Reader:
    """Cursor over one body; every shortfall is a MalformedFrame."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def take(self, n: int) -> bytes:
        end = self._pos + n
        if end > len(self._data):
            raise MalformedFrame("tunnel message body is truncated")
        chunk = self._data[self._pos:end]
        self._pos = end
        return chunk

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vector(self, length_size: int) -> bytes:
        return self.take(self.uint(length_size))

    def association_id(self) -> bytes:
        value = self.take(ASSOCIATION_ID_LENGTH)
        if not is_uuid4(value):
            raise BadAssociationId("association id is not a version-4 UUID")
        return value

    def text(self) -> str:
        try:
            return self.vector(2).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedFrame("tunnel message string is not UTF-8") from exc

    def conference_id(self) -> str:
        """``opaque conference_id<0..255>`` (1-byte length) as text; bounds are the
        message's to check (:func:`_check_conference_id`)."""
        try:
            return self.vector(1).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedFrame("conference id is not UTF-8") from exc

    def remaining(self) -> int:
        return len(self._data) - self._pos

    def end(self) -> None:
        if self._pos != len(self._data):
            raise MalformedFrame("trailing bytes after tunnel message body")


# -- messages ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SupportedProfiles:
    """MD -> KD, first on every tunnel: the SRTP profiles the MD supports."""

    msg_type: ClassVar[int] = MessageType.SUPPORTED_PROFILES

    profiles: tuple[int, ...]

    def __post_init__(self) -> None:
        profiles = tuple(self.profiles)
        object.__setattr__(self, "profiles", profiles)
        # <2..2^16-1> bytes of 2-byte values, and 3 + 2n must fit a body.
        if not 1 <= len(profiles) <= (MAX_BODY_LENGTH - 3) // 2:
            raise MalformedFrame(f"{len(profiles)} protection profiles is out of range")
        for profile in profiles:
            _check_uint("protection profile", profile, 16)

    def encode(self) -> bytes:
        listing = b"".join(p.to_bytes(2, "big") for p in self.profiles)
        body = bytes((PROTOCOL_VERSION,)) + len(listing).to_bytes(2, "big") + listing
        return _frame(self.msg_type, body)

    @classmethod
    def _decode(cls, r: _Reader) -> SupportedProfiles:
        version = r.uint(1)
        if version != PROTOCOL_VERSION:
            raise UnsupportedProtocolVersion(version)
        listing = r.vector(2)
        if len(listing) < 2 or len(listing) % 2:
            raise MalformedFrame("protection profile list length is empty or odd")
        return cls(tuple(int.from_bytes(listing[i:i + 2], "big")
                         for i in range(0, len(listing), 2)))


@dataclass(frozen=True, slots=True)
class UnsupportedVersion:
    """KD -> MD: the KD's highest version; the KD then closes (§5.5)."""

    msg_type: ClassVar[int] = MessageType.UNSUPPORTED_VERSION

    highest_version: int

    def __post_init__(self) -> None:
        _check_uint("highest_version", self.highest_version, 8)

    def encode(self) -> bytes:
        return _frame(self.msg_type, bytes((self.highest_version,)))

    @classmethod
    def _decode(cls, r: _Reader) -> UnsupportedVersion:
        return cls(r.uint(1))


@dataclass(frozen=True, slots=True, repr=False)
class MediaKeys:
    """KD -> MD: an association's HBH SRTP keys, straight after its handshake.

    With a DOUBLE profile (0x0009/0x000A) the keys and salts are the outer
    (hop-by-hop) halves only, while ``protection_profile`` still names the
    DOUBLE profile.  "client" is the endpoint, "server" the MD's side.
    """

    msg_type: ClassVar[int] = MessageType.MEDIA_KEYS

    association_id: bytes
    protection_profile: int
    mki: bytes
    client_write_key: bytes = field(repr=False)
    server_write_key: bytes = field(repr=False)
    client_write_salt: bytes = field(repr=False)
    server_write_salt: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_association_id(self.association_id)
        _check_uint("protection_profile", self.protection_profile, 16)
        _check_opaque("mki", self.mki, 0, 255)
        _check_opaque("client_write_key", self.client_write_key, 1, 255)
        _check_opaque("server_write_key", self.server_write_key, 1, 255)
        _check_opaque("client_write_salt", self.client_write_salt, 1, 255)
        _check_opaque("server_write_salt", self.server_write_salt, 1, 255)

    def __repr__(self) -> str:  # never show key material
        return (
            f"MediaKeys(association_id={uuid.UUID(bytes=self.association_id)}, "
            f"protection_profile=0x{self.protection_profile:04x}, "
            f"mki_length={len(self.mki)}, key_bits={len(self.client_write_key) * 8}, "
            f"salt_bits={len(self.client_write_salt) * 8})"
        )

    def encode(self) -> bytes:
        parts = [self.association_id, self.protection_profile.to_bytes(2, "big")]
        for value in (self.mki, self.client_write_key, self.server_write_key,
                      self.client_write_salt, self.server_write_salt):
            parts.append(bytes((len(value),)))
            parts.append(value)
        return _frame(self.msg_type, b"".join(parts))

    @classmethod
    def _decode(cls, r: _Reader) -> MediaKeys:
        return cls(
            association_id=r.association_id(),
            protection_profile=r.uint(2),
            mki=r.vector(1),
            client_write_key=r.vector(1),
            server_write_key=r.vector(1),
            client_write_salt=r.vector(1),
            server_write_salt=r.vector(1),
        )


@dataclass(frozen=True, slots=True)
class TunneledDtls:
    """Either way: one endpoint UDP payload (whole DTLS records)."""

    msg_type: ClassVar[int] = MessageType.TUNNELED_DTLS

    association_id: bytes
    dtls_message: bytes

    def __post_init__(self) -> None:
        _check_association_id(self.association_id)
        # <1..2^16-1>, and 16 + 2 + n must fit one body.
        _check_opaque("dtls_message", self.dtls_message, 1,
                      MAX_BODY_LENGTH - ASSOCIATION_ID_LENGTH - 2)

    def encode(self) -> bytes:
        body = (self.association_id + len(self.dtls_message).to_bytes(2, "big")
                + self.dtls_message)
        return _frame(self.msg_type, body)

    @classmethod
    def _decode(cls, r: _Reader) -> TunneledDtls:
        return cls(r.association_id(), r.vector(2))


@dataclass(frozen=True, slots=True)
class EndpointDisconnect:
    """Either way: the association has ended (RFC 9185 s5.4).

    ``reason`` is our private extension (module doc): one byte after the
    uuid saying why the MD ended it (:data:`DISCONNECT_REASONS`; unknown
    values are kept, for the receiver to read as none), None for the
    RFC 9185 message.  Send it only to a KD that announced it reads it
    (:data:`REASONS_ANNOUNCEMENT`).
    """

    msg_type: ClassVar[int] = MessageType.ENDPOINT_DISCONNECT

    association_id: bytes
    reason: int | None = None

    def __post_init__(self) -> None:
        _check_association_id(self.association_id)
        if self.reason is not None:
            _check_uint("reason", self.reason, 8)

    def encode(self) -> bytes:
        tail = b"" if self.reason is None else bytes((self.reason,))
        return _frame(self.msg_type, self.association_id + tail)

    @property
    def reason_name(self) -> str | None:
        """The reason as the KD records it, None without one (or an unknown one)."""
        return None if self.reason is None else DISCONNECT_REASONS.get(self.reason)

    @classmethod
    def _decode(cls, r: _Reader) -> EndpointDisconnect:
        aid = r.association_id()
        return cls(aid, r.uint(1) if r.remaining() else None)


@dataclass(frozen=True, slots=True)
class SignAnswer:
    """Ours (0xF0), MD -> KD: check this endpoint's offer, sign the answer.

    ``conference_id`` is the conference whose media group the MD will add the
    leg to (the one in the join URL): the KD refuses an offer whose identity
    assertion is for another conference (issue 10: a cross-conference join).
    """

    msg_type: ClassVar[int] = MessageType.SIGN_ANSWER

    association_id: bytes
    conference_id: str
    offer_sdp: str
    answer_sdp: str

    def __post_init__(self) -> None:
        _check_association_id(self.association_id)
        _check_conference_id(self.conference_id)
        _check_text("offer_sdp", self.offer_sdp, 1)
        _check_text("answer_sdp", self.answer_sdp, 1)

    def encode(self) -> bytes:
        conference = self.conference_id.encode("utf-8")
        offer = self.offer_sdp.encode("utf-8")
        answer = self.answer_sdp.encode("utf-8")
        body = (self.association_id + len(conference).to_bytes(1, "big") + conference
                + len(offer).to_bytes(2, "big") + offer
                + len(answer).to_bytes(2, "big") + answer)
        return _frame(self.msg_type, body)

    @classmethod
    def _decode(cls, r: _Reader) -> SignAnswer:
        aid = r.association_id()
        return cls(aid, r.conference_id(), r.text(), r.text())


@dataclass(frozen=True, slots=True)
class SignAnswerAck:
    """Ours (0xF1), KD -> MD: the signed answer, or a status and reason."""

    msg_type: ClassVar[int] = MessageType.SIGN_ANSWER_ACK

    association_id: bytes
    status: int
    text: str

    def __post_init__(self) -> None:
        _check_association_id(self.association_id)
        _check_uint("status", self.status, 16)
        _check_text("text", self.text, 1 if self.status == SIGN_STATUS_OK else 0)

    @property
    def ok(self) -> bool:
        return self.status == SIGN_STATUS_OK

    @property
    def signed_answer(self) -> str | None:
        return self.text if self.ok else None

    def encode(self) -> bytes:
        text = self.text.encode("utf-8")
        body = (self.association_id + self.status.to_bytes(2, "big")
                + len(text).to_bytes(2, "big") + text)
        return _frame(self.msg_type, body)

    @classmethod
    def _decode(cls, r: _Reader) -> SignAnswerAck:
        return cls(r.association_id(), r.uint(2), r.text())


class AssociationEntry(NamedTuple):
    """One entry of :class:`Associations`: an admitted participant's association."""

    association_id: bytes
    conference_id: str


def _check_conference_id(value: object) -> None:
    if not isinstance(value, str):
        raise TypeError("conference_id must be a str")
    try:
        data = value.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates
        raise MalformedFrame("conference_id is not encodable as UTF-8") from exc
    if not 1 <= len(data) <= MAX_CONFERENCE_ID_LENGTH:
        raise MalformedFrame(f"conference_id is {len(data)} bytes, not "
                             f"1..{MAX_CONFERENCE_ID_LENGTH}")


@dataclass(frozen=True, slots=True)
class Associations:
    """Ours (0xF2), MD -> KD: the admitted associations of the KD's conferences.

    Sent by the MD whenever the KD's tunnel comes up: one message, empty when
    there is nobody, or several when there are more than
    :data:`MAX_ASSOCIATIONS`.  ``entries`` are :class:`AssociationEntry` (or
    plain ``(association_id, conference_id)`` pairs, converted); an
    association id appears at most once per message.
    """

    msg_type: ClassVar[int] = MessageType.ASSOCIATIONS

    entries: tuple[AssociationEntry, ...] = ()

    def __post_init__(self) -> None:
        entries = []
        for entry in self.entries:
            if not isinstance(entry, tuple | list) or len(entry) != 2:
                raise TypeError("each entry is (association_id, conference_id)")
            entries.append(AssociationEntry(*entry))
        object.__setattr__(self, "entries", tuple(entries))
        if len(entries) > MAX_ASSOCIATIONS:
            raise MalformedFrame(f"{len(entries)} associations is more than "
                                 f"{MAX_ASSOCIATIONS}")
        seen: set[bytes] = set()
        for aid, conference_id in entries:
            _check_association_id(aid)
            _check_conference_id(conference_id)
            if aid in seen:
                raise MalformedFrame("an association id appears twice")
            seen.add(aid)

    def encode(self) -> bytes:
        parts = [len(self.entries).to_bytes(2, "big")]
        for aid, conference_id in self.entries:
            cid = conference_id.encode("utf-8")
            parts += [aid, bytes((len(cid),)), cid]
        return _frame(self.msg_type, b"".join(parts))

    @classmethod
    def _decode(cls, r: _Reader) -> Associations:
        count = r.uint(2)
        if count > MAX_ASSOCIATIONS:
            raise MalformedFrame(f"{count} associations is more than {MAX_ASSOCIATIONS}")
        entries = []
        for _ in range(count):
            aid = r.association_id()
            entries.append(AssociationEntry(aid, r.conference_id()))
        return cls(tuple(entries))


@dataclass(frozen=True, slots=True)
class _NonceMessage:
    """Ping and Pong: one ``uint64 nonce`` body."""

    msg_type: ClassVar[int]

    nonce: int

    def __post_init__(self) -> None:
        _check_uint("nonce", self.nonce, 64)

    def encode(self) -> bytes:
        return _frame(self.msg_type, self.nonce.to_bytes(8, "big"))

    @classmethod
    def _decode(cls, r: _Reader) -> _NonceMessage:
        return cls(r.uint(8))


@dataclass(frozen=True, slots=True)
class Ping(_NonceMessage):
    """Ours (0xF3), either way: is the other end still serving this tunnel?"""

    msg_type: ClassVar[int] = MessageType.PING


@dataclass(frozen=True, slots=True)
class Pong(_NonceMessage):
    """Ours (0xF4), either way: the answer to the Ping with the same nonce."""

    msg_type: ClassVar[int] = MessageType.PONG


@dataclass(frozen=True, slots=True)
class ConferenceEnded:
    """Ours (0xF5), KD -> MD: the conference has ended (at the KMF); end it here too.

    Sent on every up tunnel, after the EndpointDisconnects of the conference's
    associations: the KD does not know which MDs host the conference.  The MD
    acts on it only when the tunnel's KD is the conference's own.
    """

    msg_type: ClassVar[int] = MessageType.CONFERENCE_ENDED

    conference_id: str

    def __post_init__(self) -> None:
        _check_conference_id(self.conference_id)

    def encode(self) -> bytes:
        conference = self.conference_id.encode("utf-8")
        return _frame(self.msg_type, bytes((len(conference),)) + conference)

    @classmethod
    def _decode(cls, r: _Reader) -> ConferenceEnded:
        return cls(r.conference_id())


Message = (SupportedProfiles | UnsupportedVersion | MediaKeys | TunneledDtls
           | EndpointDisconnect | SignAnswer | SignAnswerAck | Associations | Ping | Pong
           | ConferenceEnded)

_DECODERS = {
    cls.msg_type: cls._decode
    for cls in (SupportedProfiles, UnsupportedVersion, MediaKeys, TunneledDtls,
                EndpointDisconnect, SignAnswer, SignAnswerAck, Associations, Ping, Pong,
                ConferenceEnded)
}


def decode_message(msg_type: int, body: bytes) -> Message:
    """Decode one frame's body; raises a :class:`TunnelError` subclass."""
    decode = _DECODERS.get(msg_type)
    if decode is None:
        raise UnknownMessageType(msg_type)
    reader = _Reader(bytes(body))
    message = decode(reader)
    reader.end()
    return message


# -- stream reassembly -------------------------------------------------------------


class TunnelDecoder:
    """Frames out of the tunnel's TLS byte stream.

    Holds at most one header or one partial body (``max_body_length``
    bytes); a length field above ``max_body_length`` or an unknown type is
    refused as soon as the 3-byte header is complete, before any of the body
    is buffered.  After any :class:`TunnelError` every further :meth:`feed`
    raises :class:`DecoderFailed`.
    """

    def __init__(self, max_body_length: int = MAX_BODY_LENGTH) -> None:
        if not 0 <= max_body_length <= MAX_BODY_LENGTH:
            raise ValueError(f"max_body_length must be 0..{MAX_BODY_LENGTH}")
        self._max_body = max_body_length
        self._buffer = bytearray()
        self._header: tuple[int, int] | None = None
        self._failed: TunnelError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a decoded message."""
        return len(self._buffer) + (HEADER_LENGTH if self._header is not None else 0)

    @property
    def failed(self) -> bool:
        return self._failed is not None

    def feed(self, data: bytes) -> list[Message]:
        """Messages completed by ``data``, in order."""
        if self._failed is not None:
            raise DecoderFailed("tunnel decoder already failed") from self._failed
        out: list[Message] = []
        try:
            self._feed(memoryview(data).cast("B"), out)
        except TunnelError as exc:
            self._failed = exc
            self._buffer = bytearray()
            self._header = None
            exc.messages = tuple(out)
            raise
        return out

    def _feed(self, view: memoryview, out: list[Message]) -> None:
        buf = self._buffer
        while True:
            if self._header is None:
                need = HEADER_LENGTH - len(buf)
                if len(view) < need:
                    buf += view
                    return
                buf += view[:need]
                view = view[need:]
                msg_type = buf[0]
                length = (buf[1] << 8) | buf[2]
                buf.clear()
                if length > self._max_body:
                    raise FrameTooLarge(length, self._max_body)
                if msg_type not in _DECODERS:
                    raise UnknownMessageType(msg_type)
                self._header = (msg_type, length)
            msg_type, length = self._header
            need = length - len(buf)
            if len(view) < need:
                buf += view
                return
            if buf:
                buf += view[:need]
                body = bytes(buf)
                buf.clear()
            else:
                body = bytes(view[:need])
            view = view[need:]
            self._header = None
            out.append(decode_message(msg_type, body))


# -- liveness ------------------------------------------------------------------------


class Liveness:
    """When to Ping the other end of an up tunnel, and when it has failed to answer.

    RFC 9185 has no keepalive: a tunnel whose other end has gone (a crashed
    host, a cut network) or no longer serves it (an MD that registered
    another connection with the same KD certificate) would look healthy
    forever.  Ours: a :class:`Ping` goes ``interval`` seconds after the tunnel
    came up or after the last answer, or at once on :meth:`probe`; its
    :class:`Pong` is due within ``timeout`` seconds, else :meth:`poll` raises
    :class:`LivenessTimeout` and the tunnel is to be closed.  At most one Ping
    is in flight; nonces count up from 1.

    Times are the caller's clock in seconds (``now``); the caller calls
    :meth:`poll` at :attr:`deadline` and sends what the methods return.
    """

    def __init__(self, interval: float, timeout: float, now: float) -> None:
        if not (interval > 0 and timeout > 0):
            raise ValueError("liveness interval and timeout must be positive")
        self.interval = interval
        self.timeout = timeout
        self._next_nonce = 1
        self._in_flight: int | None = None
        self._deadline = now + interval

    @property
    def deadline(self) -> float:
        """When :meth:`poll` has something to do: the next Ping, or the Pong's due time."""
        return self._deadline

    @property
    def waiting(self) -> bool:
        """Whether a Ping is in flight."""
        return self._in_flight is not None

    def poll(self, now: float) -> Ping | None:
        """The Ping due at ``now``, if any; raises :class:`LivenessTimeout` if a Pong is late."""
        if now < self._deadline:
            return None
        if self._in_flight is not None:
            raise LivenessTimeout(f"no Pong within {self.timeout:g} s")
        return self._ping(now)

    def probe(self, now: float) -> Ping | None:
        """Ask now: a Ping to send, or None when one is already in flight (its due time holds)."""
        if self._in_flight is not None:
            return None
        return self._ping(now)

    def pong(self, message: Pong, now: float) -> None:
        """The peer answered; :class:`UnexpectedPong` if no Ping with its nonce is in flight."""
        if self._in_flight is None or message.nonce != self._in_flight:
            raise UnexpectedPong(f"Pong {message.nonce} answers no Ping in flight")
        self._in_flight = None
        self._deadline = now + self.interval

    def _ping(self, now: float) -> Ping:
        nonce = self._next_nonce
        self._next_nonce = nonce + 1 if nonce < (1 << 64) - 1 else 1
        self._in_flight = nonce
        self._deadline = now + self.timeout
        return Ping(nonce)
