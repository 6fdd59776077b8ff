"""Sans-I/O STUN codec and ICE-lite Binding responder.

* Message header, attribute TLVs, MESSAGE-INTEGRITY, FINGERPRINT,
  XOR-MAPPED-ADDRESS, USERNAME, ERROR-CODE, UNKNOWN-ATTRIBUTES: RFC 8489
  §5, §14, §6.3 (processing), §9.1 (short-term credentials).
* ICE attributes PRIORITY, USE-CANDIDATE, ICE-CONTROLLED, ICE-CONTROLLING and
  the short-term credential rules (USERNAME ``"<receiver ufrag>:<sender
  ufrag>"``, key = the receiver's ice-pwd as UTF-8): RFC 8445 §7.
* Consent freshness (RFC 7675) uses plain Binding requests, so it is answered
  by :func:`answer_binding_request` like any connectivity check.
* Demultiplexing by first byte: RFC 7983 §7.

Nothing here imports Twisted, reads a clock, touches a socket or logs.
Malformed input raises a :class:`StunError` subclass, never IndexError,
struct.error, UnicodeDecodeError or ValueError. (Encoders, which only see
values built by this process, raise ValueError for programming errors.)

Padding bytes are accepted with any value on input (RFC 8489 §14: "the
padding bits MUST be ignored"); :meth:`StunMessage.encode` writes zeros
unless ``pad_byte`` says otherwise. Message types whose first byte is above 3
are refused as not STUN, matching :func:`is_stun` and RFC 7983.
"""

from __future__ import annotations

import hmac
import ipaddress
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from hashlib import sha1

from perc_daemons.protocol.errors import ProtocolError

__all__ = [
    "ATTR_ERROR_CODE",
    "ATTR_FINGERPRINT",
    "ATTR_ICE_CONTROLLED",
    "ATTR_ICE_CONTROLLING",
    "ATTR_MESSAGE_INTEGRITY",
    "ATTR_PRIORITY",
    "ATTR_SOFTWARE",
    "ATTR_UNKNOWN_ATTRIBUTES",
    "ATTR_USERNAME",
    "ATTR_USE_CANDIDATE",
    "ATTR_XOR_MAPPED_ADDRESS",
    "BINDING_ERROR",
    "BINDING_INDICATION",
    "BINDING_REQUEST",
    "BINDING_SUCCESS",
    "FINGERPRINT_XOR",
    "HEADER_LENGTH",
    "MAGIC_COOKIE",
    "StunAttributeError",
    "StunAttributeOrderError",
    "StunError",
    "StunFingerprintError",
    "StunLengthError",
    "StunMessage",
    "StunNotStunError",
    "answer_binding_request",
    "binding_error",
    "binding_success",
    "check_fingerprint",
    "check_integrity",
    "decode_error_code",
    "decode_unknown_attributes",
    "decode_xor_mapped_address",
    "error_code",
    "is_stun",
    "parse_username",
    "unknown_attributes",
    "xor_mapped_address",
]

MAGIC_COOKIE = 0x2112A442
_COOKIE_BYTES = struct.pack("!I", MAGIC_COOKIE)
HEADER_LENGTH = 20
FINGERPRINT_XOR = 0x5354554E

# Message types (method Binding = 0x001, RFC 8489 §5, §18.2).
BINDING_REQUEST = 0x0001
BINDING_INDICATION = 0x0011
BINDING_SUCCESS = 0x0101
BINDING_ERROR = 0x0111

# Attribute types (RFC 8489 §18.3, RFC 8445 §16.1).
ATTR_XOR_MAPPED_ADDRESS = 0x0020
ATTR_USERNAME = 0x0006
ATTR_MESSAGE_INTEGRITY = 0x0008
ATTR_ERROR_CODE = 0x0009
ATTR_UNKNOWN_ATTRIBUTES = 0x000A
ATTR_PRIORITY = 0x0024
ATTR_USE_CANDIDATE = 0x0025
ATTR_SOFTWARE = 0x8022
ATTR_FINGERPRINT = 0x8028
ATTR_ICE_CONTROLLED = 0x8029
ATTR_ICE_CONTROLLING = 0x802A

_MI_LENGTH = 20
#: RFC 8489 leaves 14 bits for the type, but on a port shared with DTLS and
#: SRTP, RFC 7983 §7 only classifies first bytes 0..3 as STUN, so the parser
#: and encoder keep to that too (all defined methods fit: 0x001..0x00C).
_MAX_MESSAGE_TYPE = 0x03FF
_FP_LENGTH = 4
_FAMILY_IPV4 = 0x01
_FAMILY_IPV6 = 0x02

#: Comprehension-required (type < 0x8000) attributes the ICE-lite responder
#: understands in a Binding request; any other one gets a 420 (RFC 8489 §6.3.1).
_UNDERSTOOD_IN_REQUEST = frozenset(
    {ATTR_USERNAME, ATTR_MESSAGE_INTEGRITY, ATTR_PRIORITY, ATTR_USE_CANDIDATE}
)


class StunError(ProtocolError):
    """Malformed or unacceptable STUN input."""

    reason = "stun_error"


class StunNotStunError(StunError):
    """Too short, top two bits set or wrong magic cookie: not a STUN message."""

    reason = "stun_not_stun"


class StunLengthError(StunError):
    """The header length is not a multiple of 4 or disagrees with the datagram."""

    reason = "stun_bad_length"


class StunAttributeError(StunError):
    """An attribute overruns the message or has an impossible value."""

    reason = "stun_bad_attribute"


class StunAttributeOrderError(StunError):
    """FINGERPRINT not last, or something other than FINGERPRINT after
    MESSAGE-INTEGRITY."""

    reason = "stun_bad_attribute_order"


class StunFingerprintError(StunError):
    """FINGERPRINT present but wrong (corrupted or not really STUN)."""

    reason = "stun_bad_fingerprint"


def _pad4(n: int) -> int:
    return (n + 3) & ~3


def is_stun(datagram: bytes) -> bool:
    """Cheap RFC 7983 / RFC 8489 §5 test; never raises for bytes-like input."""
    if len(datagram) < HEADER_LENGTH or datagram[0] > 3:
        return False
    if datagram[4:8] != _COOKIE_BYTES:
        return False
    length = (datagram[2] << 8) | datagram[3]
    return length % 4 == 0 and length + HEADER_LENGTH == len(datagram)


def _walk(datagram: bytes) -> tuple[int, bytes, list[tuple[int, bytes, int]]]:
    """Validate framing; return (type, transaction id, [(type, value, offset)])."""
    data = bytes(datagram)
    if len(data) < HEADER_LENGTH:
        raise StunNotStunError("shorter than a STUN header")
    message_type, length = struct.unpack_from("!HH", data, 0)
    if message_type > _MAX_MESSAGE_TYPE:
        raise StunNotStunError("first byte above 3 (RFC 7983 §7)")
    if data[4:8] != _COOKIE_BYTES:
        raise StunNotStunError("wrong magic cookie")
    if length % 4:
        raise StunLengthError(f"message length {length} is not a multiple of 4")
    if length + HEADER_LENGTH != len(data):
        raise StunLengthError(
            f"message length {length} but {len(data) - HEADER_LENGTH} bytes follow the header"
        )
    attributes: list[tuple[int, bytes, int]] = []
    offset = HEADER_LENGTH
    seen_integrity = False
    seen_fingerprint = False
    while offset < len(data):
        # offset and len(data) are multiples of 4, so the 4-byte header fits.
        attr_type, attr_length = struct.unpack_from("!HH", data, offset)
        end = offset + 4 + attr_length
        if offset + 4 + _pad4(attr_length) > len(data):
            raise StunAttributeError(
                f"attribute 0x{attr_type:04x} of length {attr_length} overruns the message"
            )
        if seen_fingerprint:
            raise StunAttributeOrderError("attribute after FINGERPRINT")
        if seen_integrity and attr_type != ATTR_FINGERPRINT:
            raise StunAttributeOrderError(
                f"attribute 0x{attr_type:04x} after MESSAGE-INTEGRITY"
            )
        if attr_type == ATTR_MESSAGE_INTEGRITY:
            if attr_length != _MI_LENGTH:
                raise StunAttributeError(f"MESSAGE-INTEGRITY of length {attr_length}")
            seen_integrity = True
        elif attr_type == ATTR_FINGERPRINT:
            if attr_length != _FP_LENGTH:
                raise StunAttributeError(f"FINGERPRINT of length {attr_length}")
            seen_fingerprint = True
        attributes.append((attr_type, data[offset + 4 : end], offset))
        offset += 4 + _pad4(attr_length)
    return message_type, data[8:20], attributes


@dataclass
class StunMessage:
    """One STUN message. ``attributes`` holds (type, unpadded value) in wire
    order, including MESSAGE-INTEGRITY and FINGERPRINT when parsed."""

    message_type: int
    transaction_id: bytes
    attributes: list[tuple[int, bytes]] = field(default_factory=list)

    @classmethod
    def parse(cls, datagram: bytes) -> StunMessage:
        """Strictly parse one datagram. Does not verify MESSAGE-INTEGRITY or
        FINGERPRINT values: see :func:`check_integrity` / :func:`check_fingerprint`."""
        message_type, transaction_id, walked = _walk(datagram)
        return cls(message_type, transaction_id, [(t, v) for t, v, _ in walked])

    @property
    def method(self) -> int:
        t = self.message_type
        return (t & 0x000F) | ((t & 0x00E0) >> 1) | ((t & 0x3E00) >> 2)

    @property
    def message_class(self) -> int:
        """0 request, 1 indication, 2 success response, 3 error response."""
        return ((self.message_type >> 4) & 1) | ((self.message_type >> 7) & 2)

    def get(self, attr_type: int) -> bytes | None:
        """Value of the first attribute of ``attr_type`` (RFC 8489 §14: later
        duplicates are ignored), or None."""
        for t, v in self.attributes:
            if t == attr_type:
                return v
        return None

    def encode(
        self,
        *,
        integrity_key: bytes | None = None,
        fingerprint: bool = True,
        pad_byte: int = 0,
    ) -> bytes:
        """Serialise ``attributes`` verbatim, then append MESSAGE-INTEGRITY
        (HMAC-SHA1 under ``integrity_key``) and FINGERPRINT as asked."""
        if not 0 <= self.message_type <= _MAX_MESSAGE_TYPE:
            raise ValueError(f"message type 0x{self.message_type:x} out of range")
        if len(self.transaction_id) != 12:
            raise ValueError("transaction id must be 12 bytes")
        if not 0 <= pad_byte <= 0xFF:
            raise ValueError("pad_byte must be a byte value")
        types = [t for t, _ in self.attributes]
        if integrity_key is not None and ATTR_MESSAGE_INTEGRITY in types:
            raise ValueError("attributes already contain MESSAGE-INTEGRITY")
        if fingerprint and ATTR_FINGERPRINT in types:
            raise ValueError("attributes already contain FINGERPRINT")
        body = bytearray()
        for attr_type, value in self.attributes:
            if not 0 <= attr_type <= 0xFFFF or len(value) > 0xFFFF:
                raise ValueError(f"attribute 0x{attr_type:x} out of range")
            body += struct.pack("!HH", attr_type, len(value)) + value
            body += bytes([pad_byte]) * (_pad4(len(value)) - len(value))
        head = struct.pack("!H", self.message_type)
        tail = _COOKIE_BYTES + self.transaction_id
        if integrity_key is not None:
            length = len(body) + 4 + _MI_LENGTH
            mac = hmac.new(
                integrity_key, head + struct.pack("!H", length) + tail + body, sha1
            ).digest()
            body += struct.pack("!HH", ATTR_MESSAGE_INTEGRITY, _MI_LENGTH) + mac
        if fingerprint:
            length = len(body) + 4 + _FP_LENGTH
            crc = _crc(head + struct.pack("!H", length) + tail + body)
            body += struct.pack("!HHI", ATTR_FINGERPRINT, _FP_LENGTH, crc)
        if len(body) > 0xFFFF:
            raise ValueError("message too long")
        return head + struct.pack("!H", len(body)) + tail + bytes(body)


def _crc(data: bytes) -> int:
    return (zlib.crc32(data) ^ FINGERPRINT_XOR) & 0xFFFFFFFF


def check_integrity(datagram: bytes, key: bytes) -> bool:
    """True iff ``datagram`` is well-formed and its MESSAGE-INTEGRITY is the
    HMAC-SHA1 under ``key`` (RFC 8489 §14.5). Compared in constant time."""
    try:
        _, _, walked = _walk(datagram)
    except StunError:
        return False
    for attr_type, value, offset in walked:
        if attr_type == ATTR_MESSAGE_INTEGRITY:
            data = bytes(datagram)
            length = offset + 4 + _MI_LENGTH - HEADER_LENGTH
            signed = data[:2] + struct.pack("!H", length) + data[4:offset]
            return hmac.compare_digest(hmac.new(key, signed, sha1).digest(), value)
    return False


def check_fingerprint(datagram: bytes) -> bool:
    """True iff ``datagram`` is well-formed and ends with a correct FINGERPRINT."""
    try:
        _, _, walked = _walk(datagram)
    except StunError:
        return False
    if not walked or walked[-1][0] != ATTR_FINGERPRINT:
        return False
    _, value, offset = walked[-1]
    return struct.unpack("!I", value)[0] == _crc(bytes(datagram)[:offset])


def xor_mapped_address(
    host: str | ipaddress.IPv4Address | ipaddress.IPv6Address, port: int, transaction_id: bytes
) -> bytes:
    """XOR-MAPPED-ADDRESS value (RFC 8489 §14.2)."""
    address = ipaddress.ip_address(host)
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port} out of range")
    if len(transaction_id) != 12:
        raise ValueError("transaction id must be 12 bytes")
    family = _FAMILY_IPV4 if address.version == 4 else _FAMILY_IPV6
    mask = (_COOKIE_BYTES + transaction_id)[: len(address.packed)]
    xored = bytes(a ^ b for a, b in zip(address.packed, mask, strict=True))
    return struct.pack("!BBH", 0, family, port ^ (MAGIC_COOKIE >> 16)) + xored


def decode_xor_mapped_address(value: bytes, transaction_id: bytes) -> tuple[str, int]:
    """Inverse of :func:`xor_mapped_address`; returns (host, port)."""
    if len(value) < 4:
        raise StunAttributeError("XOR-MAPPED-ADDRESS too short")
    if len(transaction_id) != 12:
        raise StunAttributeError("transaction id must be 12 bytes")
    _, family, xport = struct.unpack_from("!BBH", value, 0)
    size = {_FAMILY_IPV4: 4, _FAMILY_IPV6: 16}.get(family)
    if size is None:
        raise StunAttributeError(f"XOR-MAPPED-ADDRESS family 0x{family:02x}")
    if len(value) != 4 + size:
        raise StunAttributeError(f"XOR-MAPPED-ADDRESS of length {len(value)}")
    mask = (_COOKIE_BYTES + bytes(transaction_id))[:size]
    packed = bytes(a ^ b for a, b in zip(value[4:], mask, strict=True))
    return str(ipaddress.ip_address(packed)), xport ^ (MAGIC_COOKIE >> 16)


def error_code(code: int, reason: str) -> bytes:
    """ERROR-CODE value (RFC 8489 §14.8)."""
    if not 300 <= code <= 699:
        raise ValueError(f"error code {code} out of range")
    phrase = reason.encode("utf-8")
    if len(phrase) > 763:
        raise ValueError("reason phrase too long")
    return struct.pack("!HBB", 0, code // 100, code % 100) + phrase


def decode_error_code(value: bytes) -> tuple[int, str]:
    """Inverse of :func:`error_code`; returns (code, reason)."""
    if len(value) < 4:
        raise StunAttributeError("ERROR-CODE too short")
    klass, number = value[2] & 0x07, value[3]
    if not 3 <= klass <= 6 or number > 99:
        raise StunAttributeError(f"ERROR-CODE class {klass} number {number}")
    try:
        reason = value[4:].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StunAttributeError("ERROR-CODE reason is not UTF-8") from exc
    return klass * 100 + number, reason


def unknown_attributes(types: Iterable[int]) -> bytes:
    """UNKNOWN-ATTRIBUTES value (RFC 8489 §14.9)."""
    return b"".join(struct.pack("!H", t) for t in types)


def decode_unknown_attributes(value: bytes) -> list[int]:
    if len(value) % 2:
        raise StunAttributeError("UNKNOWN-ATTRIBUTES of odd length")
    return [t for (t,) in struct.iter_unpack("!H", value)]


def parse_username(value: bytes) -> tuple[str, str]:
    """Split an ICE USERNAME ``b"<receiver ufrag>:<sender ufrag>"``.

    Returns (local, remote) from the receiver's point of view. ice-chars
    (RFC 8839 §5.4) contain no colon, so exactly one is required.
    """
    try:
        text = bytes(value).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StunAttributeError("USERNAME is not UTF-8") from exc
    local, sep, remote = text.partition(":")
    if not sep or not local or not remote or ":" in remote:
        raise StunAttributeError("USERNAME is not <ufrag>:<ufrag>")
    return local, remote


def _require_binding_request(request: StunMessage) -> None:
    if request.message_type != BINDING_REQUEST:
        raise ValueError("not a Binding request")


def binding_success(
    request: StunMessage,
    source: tuple[str, int],
    integrity_key: bytes | None,
) -> bytes:
    """Binding success response carrying XOR-MAPPED-ADDRESS = ``source``, with
    MESSAGE-INTEGRITY (if ``integrity_key``) and FINGERPRINT."""
    _require_binding_request(request)
    host, port = source
    tid = request.transaction_id
    response = StunMessage(
        BINDING_SUCCESS, tid, [(ATTR_XOR_MAPPED_ADDRESS, xor_mapped_address(host, port, tid))]
    )
    return response.encode(integrity_key=integrity_key)


def binding_error(
    request: StunMessage,
    code: int,
    reason: str,
    integrity_key: bytes | None = None,
    *,
    unknown: Iterable[int] = (),
) -> bytes:
    """Binding error response with ERROR-CODE (and UNKNOWN-ATTRIBUTES for 420).

    Per RFC 8489 §9.1.3 a 400 for missing credentials and every 401 carry no
    MESSAGE-INTEGRITY: pass ``integrity_key=None`` for those.
    """
    _require_binding_request(request)
    attributes = [(ATTR_ERROR_CODE, error_code(code, reason))]
    unknown = list(unknown)
    if unknown:
        attributes.append((ATTR_UNKNOWN_ATTRIBUTES, unknown_attributes(unknown)))
    response = StunMessage(BINDING_ERROR, request.transaction_id, attributes)
    return response.encode(integrity_key=integrity_key)


def answer_binding_request(
    datagram: bytes,
    *,
    local_ufrag: str,
    local_pwd: str,
    source: tuple[str, int],
) -> bytes | None:
    """ICE-lite answer to one received datagram (RFC 8445 §7.3, RFC 7675).

    Returns the response datagram to send back to ``source``, or None when
    nothing must be sent (any message other than a Binding request, e.g.
    indications and responses). Raises a :class:`StunError` for malformed
    messages and :class:`StunFingerprintError` when a FINGERPRINT is present
    but wrong (tampered or corrupted): drop those silently.

    Order of checks (RFC 8489 §6.3, §9.1.3):

    1. no USERNAME or no MESSAGE-INTEGRITY: 400, unprotected;
    2. USERNAME not ``"<local_ufrag>:<remote ufrag>"`` (including a wrong
       ufrag): 401, unprotected -- RFC 8489 treats an unknown username as an
       authentication failure, so a wrong ufrag gets 401 and not silence;
    3. MESSAGE-INTEGRITY not valid under ``local_pwd``: 401, unprotected;
    4. no FINGERPRINT or no PRIORITY (both mandatory in ICE checks): 400,
       protected;
    5. unknown comprehension-required attributes: 420 with
       UNKNOWN-ATTRIBUTES, protected;
    6. otherwise a success response with XOR-MAPPED-ADDRESS, protected.

    Role conflicts (ICE-CONTROLLED from the peer) are not detected: an ICE-lite
    agent is always controlled and leaves them to the full agent.
    """
    message_type, transaction_id, walked = _walk(datagram)
    if message_type != BINDING_REQUEST:
        return None
    request = StunMessage(message_type, transaction_id, [(t, v) for t, v, _ in walked])
    types = {t for t, _, _ in walked}
    if ATTR_FINGERPRINT in types and not check_fingerprint(datagram):
        raise StunFingerprintError("FINGERPRINT mismatch")
    username = request.get(ATTR_USERNAME)
    if username is None or ATTR_MESSAGE_INTEGRITY not in types:
        return binding_error(request, 400, "Bad Request")
    try:
        local, _ = parse_username(username)
    except StunAttributeError:
        return binding_error(request, 401, "Unauthenticated")
    if local != local_ufrag:
        return binding_error(request, 401, "Unauthenticated")
    key = local_pwd.encode("utf-8")
    if not check_integrity(datagram, key):
        return binding_error(request, 401, "Unauthenticated")
    if ATTR_FINGERPRINT not in types or ATTR_PRIORITY not in types:
        return binding_error(request, 400, "Bad Request", key)
    unknown = sorted(t for t in types if t < 0x8000 and t not in _UNDERSTOOD_IN_REQUEST)
    if unknown:
        return binding_error(request, 420, "Unknown Attribute", key, unknown=unknown)
    return binding_success(request, source, key)
