"""DTLS 1.2 handshake messages, extensions and handshake framing (sans-I/O).

* Handshake header, fragmentation and reassembly: RFC 6347 §4.2.2, §4.2.3;
  the transcript form of a message: RFC 6347 §4.2.6.
* HelloVerifyRequest and the DTLS ClientHello cookie: RFC 6347 §4.2.1.
* Handshake messages: RFC 5246 §7.4; ECDHE_ECDSA key exchange: RFC 8422 §5.4,
  §5.7; DigitallySigned: RFC 5246 §4.7.
* Extensions: RFC 5246 §7.4.1.4 (framing, signature_algorithms §7.4.1.4.1),
  RFC 8422 §5.1 (supported_groups, ec_point_formats), RFC 5764 §4.1.1
  (use_srtp), RFC 7627 §5.1 (extended_master_secret), RFC 5746 §3.2
  (renegotiation_info), RFC 8870 §5.2.1 (supported_ekt_ciphers), RFC 8844
  §4.3 (external_session_id).
* Alert and ACK bodies: RFC 5246 §7.2, RFC 9147 §7.

Decoders are strict: every length prefix is checked against its bounds and
against the bytes available, and trailing bytes are refused. Malformed input
raises :class:`~perc_daemons.protocol.dtls.alerts.DecodeError`; well-formed
but forbidden values raise
:class:`~perc_daemons.protocol.dtls.alerts.IllegalParameter`. Nothing else
escapes a decoder. Numeric fields decode to plain ints (the enums below name
the values we use; peers send many others). Encoders given values that do not
fit their wire format raise :class:`~perc_daemons.protocol.dtls.alerts.DtlsError`
(alert internal_error), never ValueError or struct.error.

Nothing here imports Twisted, reads a clock, touches a socket or logs.
"""

from __future__ import annotations

import struct
from bisect import bisect_left
from dataclasses import dataclass
from enum import IntEnum
from typing import Self

from perc_daemons.protocol.dtls.alerts import DecodeError, DtlsError, IllegalParameter

__all__ = [
    "DTLS_1_0",
    "DTLS_1_2",
    "HANDSHAKE_HEADER_LENGTH",
    "MAX_HANDSHAKE_MESSAGE",
    "RANDOM_LENGTH",
    "Certificate",
    "CertificateRequest",
    "CertificateVerify",
    "CipherSuite",
    "ClientCertificateType",
    "ClientHello",
    "ClientKeyExchange",
    "ECCurveType",
    "ECPointFormat",
    "ExtensionType",
    "Finished",
    "HandshakeFragment",
    "HandshakeType",
    "HelloVerifyRequest",
    "NamedGroup",
    "Reassembler",
    "ServerHello",
    "ServerHelloDone",
    "ServerKeyExchange",
    "SignatureScheme",
    "decode_ack",
    "decode_alert",
    "decode_ec_point_formats",
    "decode_ekt_cipher_server",
    "decode_ekt_ciphers_client",
    "decode_empty",
    "decode_external_session_id",
    "decode_renegotiation_info",
    "decode_signature_algorithms",
    "decode_supported_groups",
    "decode_use_srtp",
    "encode_ack",
    "encode_alert",
    "encode_ec_point_formats",
    "encode_ekt_cipher_server",
    "encode_ekt_ciphers_client",
    "encode_external_session_id",
    "encode_renegotiation_info",
    "encode_signature_algorithms",
    "encode_supported_groups",
    "encode_use_srtp",
    "find_extension",
    "fragment_message",
    "full_message",
    "parse_handshake_fragments",
]

DTLS_1_2 = 0xFEFD
DTLS_1_0 = 0xFEFF
#: msg_type(1) length(3) message_seq(2) fragment_offset(3) fragment_length(3).
HANDSHAKE_HEADER_LENGTH = 12
RANDOM_LENGTH = 32
#: Largest handshake message we accept from a peer (its ``length`` field).
MAX_HANDSHAKE_MESSAGE = 65536
#: Messages further than this ahead of ``next_seq`` are dropped, not buffered.
MAX_SEQ_AHEAD = 16
#: Finished.verify_data length for every TLS 1.2 suite we use (RFC 5246 §7.4.9).
VERIFY_DATA_LENGTH = 12
#: session_id<0..32> (RFC 5246 §7.4.1.2).
MAX_SESSION_ID_LENGTH = 32

_UINT8 = 0xFF
_UINT16 = 0xFFFF
_UINT24 = 0xFFFFFF


class HandshakeType(IntEnum):
    """RFC 5246 §7.4, RFC 6347 §4.2.2, RFC 8870 §5.2.2 (ekt_key)."""

    HELLO_REQUEST = 0
    CLIENT_HELLO = 1
    SERVER_HELLO = 2
    HELLO_VERIFY_REQUEST = 3
    CERTIFICATE = 11
    SERVER_KEY_EXCHANGE = 12
    CERTIFICATE_REQUEST = 13
    SERVER_HELLO_DONE = 14
    CERTIFICATE_VERIFY = 15
    CLIENT_KEY_EXCHANGE = 16
    FINISHED = 20
    EKT_KEY = 26


class ExtensionType(IntEnum):
    """IANA TLS ExtensionType values used by DTLS-SRTP with EKT."""

    SUPPORTED_GROUPS = 10  # RFC 8422 §5.1.1
    EC_POINT_FORMATS = 11  # RFC 8422 §5.1.2
    SIGNATURE_ALGORITHMS = 13  # RFC 5246 §7.4.1.4.1
    USE_SRTP = 14  # RFC 5764 §4.1.1
    EXTENDED_MASTER_SECRET = 23  # RFC 7627 §5.1
    SUPPORTED_EKT_CIPHERS = 39  # RFC 8870 §5.2.1
    EXTERNAL_SESSION_ID = 56  # RFC 8844 §4.3
    RENEGOTIATION_INFO = 0xFF01  # RFC 5746 §3.2


class CipherSuite(IntEnum):
    ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 = 0xC02B  # RFC 5289
    ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 = 0xC02C  # RFC 5289
    EMPTY_RENEGOTIATION_INFO_SCSV = 0x00FF  # RFC 5746 §3.3


class NamedGroup(IntEnum):
    """RFC 8422 §5.1.1."""

    SECP256R1 = 23
    SECP384R1 = 24
    X25519 = 29


class SignatureScheme(IntEnum):
    """TLS 1.2 SignatureAndHashAlgorithm (hash, signature) as one uint16.

    RFC 5246 §7.4.1.4.1; the values coincide with RFC 8446 §4.2.3 names.
    """

    ECDSA_SECP256R1_SHA256 = 0x0403
    ECDSA_SECP384R1_SHA384 = 0x0503
    ECDSA_SHA1 = 0x0203
    RSA_PKCS1_SHA256 = 0x0401
    RSA_PSS_RSAE_SHA256 = 0x0804


class ClientCertificateType(IntEnum):
    """RFC 8422 §5.5."""

    ECDSA_SIGN = 64


class ECCurveType(IntEnum):
    """RFC 8422 §5.4 (only named_curve remains allowed)."""

    NAMED_CURVE = 3


class ECPointFormat(IntEnum):
    """RFC 8422 §5.1.2."""

    UNCOMPRESSED = 0


# ---------------------------------------------------------------------------
# Reading and writing primitives


class _Reader:
    """A cursor over ``data`` whose every failure is a :class:`DecodeError`."""

    __slots__ = ("_data", "_pos", "_what")

    def __init__(self, data: bytes, what: str) -> None:
        self._data = bytes(data)
        self._pos = 0
        self._what = what

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def take(self, count: int, field: str) -> bytes:
        start = self._pos
        end = start + count
        if end > len(self._data):
            raise DecodeError(
                f"{self._what}: {field} needs {count} bytes, {self.remaining} remain"
            )
        self._pos = end
        return self._data[start:end]

    def uint(self, size: int, field: str) -> int:
        return int.from_bytes(self.take(size, field), "big")

    def vector(self, length_size: int, minimum: int, maximum: int, field: str) -> bytes:
        """An opaque ``field<minimum..maximum>`` with a ``length_size``-byte prefix."""
        length = self.uint(length_size, f"{field} length")
        if not minimum <= length <= maximum:
            raise DecodeError(
                f"{self._what}: {field} length {length} is outside {minimum}..{maximum}"
            )
        return self.take(length, field)

    def finish(self) -> None:
        if self.remaining:
            raise DecodeError(f"{self._what}: {self.remaining} trailing bytes")


def _check_uint(value: int, maximum: int, field: str) -> int:
    if not isinstance(value, int) or not 0 <= value <= maximum:
        raise DtlsError(f"cannot encode {field} {value!r}: outside 0..{maximum}")
    return value


def _uint(value: int, size: int, field: str) -> bytes:
    try:
        return value.to_bytes(size, "big")  # OverflowError for negative or too large
    except (OverflowError, AttributeError):
        _check_uint(value, (1 << (8 * size)) - 1, field)
        raise


def _vector(data: bytes, length_size: int, minimum: int, maximum: int, field: str) -> bytes:
    """Encode ``opaque field<minimum..maximum>``."""
    if not minimum <= len(data) <= maximum:
        raise DtlsError(
            f"cannot encode {field} of {len(data)} bytes: outside {minimum}..{maximum}"
        )
    return len(data).to_bytes(length_size, "big") + bytes(data)


def _uint16_list(values: list[int], field: str) -> bytes:
    return b"".join(_uint(value, 2, field) for value in values)


def _uint8_list(values: list[int], field: str) -> bytes:
    return b"".join(_uint(value, 1, field) for value in values)


def _parse_uint16_list(data: bytes, what: str, field: str) -> list[int]:
    if len(data) % 2:
        raise DecodeError(f"{what}: {field} of {len(data)} bytes is not a list of uint16")
    return [value for (value,) in struct.iter_unpack(">H", data)]


def _check_random(random: bytes) -> bytes:
    if len(random) != RANDOM_LENGTH:
        raise DtlsError(f"cannot encode a Random of {len(random)} bytes (RFC 5246 §7.4.1.2)")
    return bytes(random)


# ---------------------------------------------------------------------------
# Handshake framing (RFC 6347 §4.2.2, §4.2.3)

_UINT24 = (1 << 24) - 1
# msg_type|length (4), message_seq (2), fragment_offset|fragment_length (6)
_HEADER = struct.Struct("!IHHI")

@dataclass(frozen=True, slots=True)
class HandshakeFragment:
    """One DTLS handshake header and the fragment of the body it carries.

    ``length`` is the whole message's body length; ``body`` holds the bytes
    ``fragment_offset .. fragment_offset + len(body)`` of it (RFC 6347 §4.2.2).
    """

    msg_type: int
    length: int
    message_seq: int
    fragment_offset: int
    body: bytes

    def encode(self) -> bytes:
        """The 12-byte handshake header followed by the fragment bytes."""
        msg_type, length, offset, size = (self.msg_type, self.length, self.fragment_offset,
                                          len(self.body))
        if not (0 <= msg_type <= 0xFF and 0 <= length <= _UINT24 and 0 <= offset <= _UINT24
                and size <= _UINT24 and 0 <= self.message_seq <= 0xFFFF):
            _uint(msg_type, 1, "msg_type")
            _uint(length, 3, "length")
            _uint(self.message_seq, 2, "message_seq")
            _uint(offset, 3, "fragment_offset")
            _uint(size, 3, "fragment_length")
        return _HEADER.pack((msg_type << 24) | length, self.message_seq, offset >> 8,
                            ((offset & 0xFF) << 24) | size) + bytes(self.body)


def _check_fragment(fragment: HandshakeFragment) -> None:
    if fragment.length > MAX_HANDSHAKE_MESSAGE:
        raise DecodeError(
            f"handshake message length {fragment.length} exceeds {MAX_HANDSHAKE_MESSAGE}"
        )
    end = fragment.fragment_offset + len(fragment.body)
    if fragment.fragment_offset < 0 or end > fragment.length:
        raise DecodeError(
            f"handshake fragment {fragment.fragment_offset}..{end} lies outside "
            f"the {fragment.length}-byte message (RFC 6347 §4.2.3)"
        )


def parse_handshake_fragments(data: bytes) -> list[HandshakeFragment]:
    """Split a handshake record's payload into its fragments (RFC 6347 §4.2.2).

    A record may carry several handshake messages or fragments (§4.2.3); the
    payload must consist of whole fragments. Raises :class:`DecodeError` for
    an empty payload, a truncated header or fragment, a fragment that does
    not lie within its message, or a message longer than
    :data:`MAX_HANDSHAKE_MESSAGE`.
    """
    if not data:
        raise DecodeError("empty handshake record")
    reader = _Reader(data, "handshake record")
    fragments = []
    while reader.remaining:
        msg_type = reader.uint(1, "msg_type")
        length = reader.uint(3, "length")
        message_seq = reader.uint(2, "message_seq")
        fragment_offset = reader.uint(3, "fragment_offset")
        fragment_length = reader.uint(3, "fragment_length")
        body = reader.take(fragment_length, "fragment")
        fragment = HandshakeFragment(msg_type, length, message_seq, fragment_offset, body)
        _check_fragment(fragment)
        fragments.append(fragment)
    return fragments


def fragment_message(
    msg_type: int, message_seq: int, body: bytes, max_fragment: int
) -> list[HandshakeFragment]:
    """Split a message body into contiguous fragments of at most ``max_fragment`` bytes.

    RFC 6347 §4.2.3; an empty body gives one empty fragment.
    """
    if max_fragment < 1:
        raise DtlsError(f"max_fragment {max_fragment} must be at least 1")
    body = bytes(body)
    _check_uint(len(body), _UINT24, "handshake message length")
    if not body:
        return [HandshakeFragment(msg_type, 0, message_seq, 0, b"")]
    return [
        HandshakeFragment(
            msg_type, len(body), message_seq, offset, body[offset : offset + max_fragment]
        )
        for offset in range(0, len(body), max_fragment)
    ]


def full_message(msg_type: int, message_seq: int, body: bytes) -> bytes:
    """The message as one unfragmented handshake message (RFC 6347 §4.2.6).

    This header-plus-body form (fragment_offset 0, fragment_length = length)
    is what enters the handshake transcript hash, however the message was
    actually fragmented on the wire.
    """
    return HandshakeFragment(msg_type, len(body), message_seq, 0, bytes(body)).encode()


class _PartialMessage:
    __slots__ = ("buffer", "length", "msg_type", "ranges")

    def __init__(self, msg_type: int, length: int) -> None:
        self.msg_type = msg_type
        self.length = length
        self.buffer = bytearray(length)
        #: Sorted, disjoint, non-adjacent [start, end) ranges received so far.
        self.ranges: list[tuple[int, int]] = []

    @property
    def complete(self) -> bool:
        return self.ranges == [(0, self.length)] or self.length == 0

    def add(self, offset: int, data: bytes, message_seq: int) -> None:
        """Store ``data`` at ``offset``; bytes already held must agree with it.

        The ranges touching ``offset..end`` are found by bisection, so a peer
        sending many tiny fragments costs O(log n) per fragment to locate.
        """
        end = offset + len(data)
        if offset == end:
            return
        ranges = self.ranges
        first = bisect_left(ranges, offset, key=_range_stop)
        last = first
        new_start, new_end = offset, end
        while last < len(ranges) and ranges[last][0] <= end:
            start, stop = ranges[last]
            low, high = max(start, offset), min(stop, end)
            if low < high and self.buffer[low:high] != data[low - offset : high - offset]:
                raise IllegalParameter(
                    f"handshake message {message_seq}: overlapping fragments disagree "
                    f"on bytes {low}..{high}"
                )
            new_start, new_end = min(start, new_start), max(stop, new_end)
            last += 1
        self.buffer[offset:end] = data
        ranges[first:last] = [(new_start, new_end)]


def _range_stop(item: tuple[int, int]) -> int:
    return item[1]


class Reassembler:
    """Buffers handshake fragments and releases whole messages in order.

    RFC 6347 §4.2.2 (next_receive_seq) and §4.2.3 (reassembly, overlapping
    fragments). Messages with ``message_seq < next_seq`` are retransmissions
    of what was already delivered: they are discarded and flagged in
    :attr:`saw_retransmission` (the caller then retransmits its last flight,
    §4.2.4, and resets the flag). Messages more than 16 ahead of
    ``next_seq`` are dropped. Every buffered message reserves its whole
    declared ``length``; more than ``max_buffered`` such bytes in total is a
    :class:`DecodeError`. Fragments of one message that disagree on
    msg_type, length or overlapping bytes raise :class:`IllegalParameter`.
    """

    def __init__(self, max_buffered: int = 131072) -> None:
        self.max_buffered = max_buffered
        self._next_seq = 0
        self._messages: dict[int, _PartialMessage] = {}
        self._buffered = 0
        self._saw_retransmission = False

    @property
    def next_seq(self) -> int:
        """The message_seq of the next message :meth:`pop` delivers."""
        return self._next_seq

    @next_seq.setter
    def next_seq(self, value: int) -> None:
        self._next_seq = value
        for seq in [seq for seq in self._messages if seq < value]:
            self._buffered -= self._messages.pop(seq).length

    @property
    def saw_retransmission(self) -> bool:
        """True once a fragment of an already delivered message arrived."""
        return self._saw_retransmission

    @saw_retransmission.setter
    def saw_retransmission(self, value: bool) -> None:
        self._saw_retransmission = value

    @property
    def buffered(self) -> int:
        """Bytes currently reserved for undelivered messages."""
        return self._buffered

    def add(self, fragment: HandshakeFragment) -> None:
        _check_fragment(fragment)
        seq = fragment.message_seq
        if seq < self._next_seq:
            self._saw_retransmission = True
            return
        if seq - self._next_seq > MAX_SEQ_AHEAD:
            return
        message = self._messages.get(seq)
        if message is None:
            if self._buffered + fragment.length > self.max_buffered:
                raise DecodeError(
                    f"handshake message {seq} of {fragment.length} bytes would exceed "
                    f"the {self.max_buffered}-byte reassembly buffer"
                )
            message = _PartialMessage(fragment.msg_type, fragment.length)
            self._messages[seq] = message
            self._buffered += fragment.length
        elif message.msg_type != fragment.msg_type or message.length != fragment.length:
            raise IllegalParameter(
                f"handshake message {seq}: fragment of type {fragment.msg_type} length "
                f"{fragment.length} contradicts type {message.msg_type} length {message.length}"
            )
        message.add(fragment.fragment_offset, bytes(fragment.body), seq)

    def pop(self) -> tuple[int, int, bytes] | None:
        """``(msg_type, message_seq, body)`` of the next complete message, or None."""
        seq = self._next_seq
        message = self._messages.get(seq)
        if message is None or not message.complete:
            return None
        del self._messages[seq]
        self._buffered -= message.length
        self._next_seq = seq + 1
        return message.msg_type, seq, bytes(message.buffer)


# ---------------------------------------------------------------------------
# Extensions framing (RFC 5246 §7.4.1.4)


def _encode_extensions(extensions: list[tuple[int, bytes]]) -> bytes:
    if not extensions:
        return b""
    seen: set[int] = set()
    block = bytearray()
    for ext_type, data in extensions:
        if ext_type in seen:
            raise DtlsError(f"cannot encode extension {ext_type} twice (RFC 5246 §7.4.1.4)")
        seen.add(ext_type)
        block += _uint(ext_type, 2, "extension_type")
        block += _vector(data, 2, 0, _UINT16, "extension_data")
    return _vector(bytes(block), 2, 0, _UINT16, "extensions")


def _decode_extensions(reader: _Reader, what: str) -> list[tuple[int, bytes]]:
    """The optional trailing ``Extension extensions<0..2^16-1>`` of a hello."""
    if not reader.remaining:
        return []
    block = _Reader(reader.vector(2, 0, _UINT16, "extensions"), f"{what} extensions")
    extensions: list[tuple[int, bytes]] = []
    seen: set[int] = set()
    while block.remaining:
        ext_type = block.uint(2, "extension_type")
        data = block.vector(2, 0, _UINT16, f"extension {ext_type} data")
        if ext_type in seen:
            raise DecodeError(f"{what}: extension {ext_type} appears twice (RFC 5246 §7.4.1.4)")
        seen.add(ext_type)
        extensions.append((ext_type, data))
    return extensions


def find_extension(extensions: list[tuple[int, bytes]], ext_type: int) -> bytes | None:
    """The extension_data of ``ext_type``, or None if it is absent."""
    for candidate, data in extensions:
        if candidate == ext_type:
            return data
    return None


# ---------------------------------------------------------------------------
# Handshake messages (RFC 5246 §7.4, RFC 6347 §4.2.1, RFC 8422 §5)


@dataclass(frozen=True, slots=True)
class ClientHello:
    """RFC 5246 §7.4.1.2 with the DTLS cookie after session_id (RFC 6347 §4.2.1).

    A present but empty extensions block decodes to ``[]`` and is not
    re-encoded, so that one encoding is not canonical.
    """

    version: int
    random: bytes
    session_id: bytes
    cookie: bytes
    cipher_suites: list[int]
    compression_methods: list[int]
    extensions: list[tuple[int, bytes]]

    def encode(self) -> bytes:
        return b"".join(
            (
                _uint(self.version, 2, "client_version"),
                _check_random(self.random),
                _vector(self.session_id, 1, 0, MAX_SESSION_ID_LENGTH, "session_id"),
                _vector(self.cookie, 1, 0, _UINT8, "cookie"),
                _vector(
                    _uint16_list(self.cipher_suites, "cipher suite"),
                    2, 2, 0xFFFE, "cipher_suites",
                ),
                _vector(
                    _uint8_list(self.compression_methods, "compression method"),
                    1, 1, _UINT8, "compression_methods",
                ),
                _encode_extensions(self.extensions),
            )
        )

    @classmethod
    def decode(cls, body: bytes) -> Self:
        reader = _Reader(body, "ClientHello")
        version = reader.uint(2, "client_version")
        random = reader.take(RANDOM_LENGTH, "random")
        session_id = reader.vector(1, 0, MAX_SESSION_ID_LENGTH, "session_id")
        cookie = reader.vector(1, 0, _UINT8, "cookie")
        suites = _parse_uint16_list(
            reader.vector(2, 2, 0xFFFE, "cipher_suites"), "ClientHello", "cipher_suites"
        )
        compression = list(reader.vector(1, 1, _UINT8, "compression_methods"))
        extensions = _decode_extensions(reader, "ClientHello")
        reader.finish()
        return cls(version, random, session_id, cookie, suites, compression, extensions)


@dataclass(frozen=True, slots=True)
class ServerHello:
    """RFC 5246 §7.4.1.3 (unchanged in DTLS 1.2).

    A present but empty extensions block decodes to ``[]`` and is not
    re-encoded, so that one encoding is not canonical.
    """

    version: int
    random: bytes
    session_id: bytes
    cipher_suite: int
    compression_method: int
    extensions: list[tuple[int, bytes]]

    def encode(self) -> bytes:
        return b"".join(
            (
                _uint(self.version, 2, "server_version"),
                _check_random(self.random),
                _vector(self.session_id, 1, 0, MAX_SESSION_ID_LENGTH, "session_id"),
                _uint(self.cipher_suite, 2, "cipher_suite"),
                _uint(self.compression_method, 1, "compression_method"),
                _encode_extensions(self.extensions),
            )
        )

    @classmethod
    def decode(cls, body: bytes) -> Self:
        reader = _Reader(body, "ServerHello")
        version = reader.uint(2, "server_version")
        random = reader.take(RANDOM_LENGTH, "random")
        session_id = reader.vector(1, 0, MAX_SESSION_ID_LENGTH, "session_id")
        cipher_suite = reader.uint(2, "cipher_suite")
        compression_method = reader.uint(1, "compression_method")
        extensions = _decode_extensions(reader, "ServerHello")
        reader.finish()
        return cls(version, random, session_id, cipher_suite, compression_method, extensions)


@dataclass(frozen=True, slots=True)
class HelloVerifyRequest:
    """RFC 6347 §4.2.1: server_version then ``opaque cookie<0..2^8-1>``."""

    version: int
    cookie: bytes

    def encode(self) -> bytes:
        return _uint(self.version, 2, "server_version") + _vector(
            self.cookie, 1, 0, _UINT8, "cookie"
        )

    @classmethod
    def decode(cls, body: bytes) -> Self:
        reader = _Reader(body, "HelloVerifyRequest")
        version = reader.uint(2, "server_version")
        cookie = reader.vector(1, 0, _UINT8, "cookie")
        reader.finish()
        return cls(version, cookie)


@dataclass(frozen=True, slots=True)
class Certificate:
    """RFC 5246 §7.4.2: ``ASN.1Cert certificate_list<0..2^24-1>``, each <1..2^24-1>.

    The certificates are DER bytes, sender's own certificate first.
    """

    certificates: list[bytes]

    def encode(self) -> bytes:
        chain = b"".join(
            _vector(cert, 3, 1, _UINT24, "ASN.1Cert") for cert in self.certificates
        )
        return _vector(chain, 3, 0, _UINT24, "certificate_list")

    @classmethod
    def decode(cls, body: bytes) -> Self:
        reader = _Reader(body, "Certificate")
        chain = _Reader(reader.vector(3, 0, _UINT24, "certificate_list"), "Certificate")
        reader.finish()
        certificates = []
        while chain.remaining:
            certificates.append(chain.vector(3, 1, _UINT24, "ASN.1Cert"))
        return cls(certificates)


def _encode_signed(signature_scheme: int, signature: bytes) -> bytes:
    """TLS 1.2 DigitallySigned (RFC 5246 §4.7, §7.4.1.4.1)."""
    return _uint(signature_scheme, 2, "SignatureAndHashAlgorithm") + _vector(
        signature, 2, 0, _UINT16, "signature"
    )


def _decode_signed(reader: _Reader) -> tuple[int, bytes]:
    scheme = reader.uint(2, "SignatureAndHashAlgorithm")
    return scheme, reader.vector(2, 0, _UINT16, "signature")


@dataclass(frozen=True, slots=True)
class ServerKeyExchange:
    """ECDHE_ECDSA ServerKeyExchange (RFC 8422 §5.4).

    ServerECDHParams (curve_type named_curve(3), NamedCurve, ECPoint
    public<1..2^8-1>) followed by a TLS 1.2 DigitallySigned signature over
    ``client_random + server_random + params()``.
    """

    named_group: int
    public_key: bytes
    signature_scheme: int
    signature: bytes

    def params(self) -> bytes:
        """The ServerECDHParams encoding, the signed part of the message."""
        return (
            bytes((ECCurveType.NAMED_CURVE,))
            + _uint(self.named_group, 2, "named_curve")
            + _vector(self.public_key, 1, 1, _UINT8, "ECPoint")
        )

    def encode(self) -> bytes:
        return self.params() + _encode_signed(self.signature_scheme, self.signature)

    @classmethod
    def decode(cls, body: bytes) -> Self:
        reader = _Reader(body, "ServerKeyExchange")
        curve_type = reader.uint(1, "curve_type")
        if curve_type != ECCurveType.NAMED_CURVE:
            raise IllegalParameter(
                f"ServerKeyExchange curve_type {curve_type} is not named_curve(3) (RFC 8422 §5.4)"
            )
        named_group = reader.uint(2, "named_curve")
        public_key = reader.vector(1, 1, _UINT8, "ECPoint")
        scheme, signature = _decode_signed(reader)
        reader.finish()
        return cls(named_group, public_key, scheme, signature)


@dataclass(frozen=True, slots=True)
class CertificateRequest:
    """RFC 5246 §7.4.4.

    ``ClientCertificateType certificate_types<1..2^8-1>``,
    ``SignatureAndHashAlgorithm supported_signature_algorithms<2..2^16-2>``,
    ``DistinguishedName certificate_authorities<0..2^16-1>`` (each <1..2^16-1>).
    """

    certificate_types: list[int]
    signature_schemes: list[int]
    authorities: list[bytes]

    def encode(self) -> bytes:
        authorities = b"".join(
            _vector(name, 2, 1, _UINT16, "DistinguishedName") for name in self.authorities
        )
        return (
            _vector(
                _uint8_list(self.certificate_types, "certificate type"),
                1, 1, _UINT8, "certificate_types",
            )
            + _vector(
                _uint16_list(self.signature_schemes, "signature scheme"),
                2, 2, 0xFFFE, "supported_signature_algorithms",
            )
            + _vector(authorities, 2, 0, _UINT16, "certificate_authorities")
        )

    @classmethod
    def decode(cls, body: bytes) -> Self:
        what = "CertificateRequest"
        reader = _Reader(body, what)
        types = list(reader.vector(1, 1, _UINT8, "certificate_types"))
        schemes = _parse_uint16_list(
            reader.vector(2, 2, 0xFFFE, "supported_signature_algorithms"),
            what, "supported_signature_algorithms",
        )
        names = _Reader(reader.vector(2, 0, _UINT16, "certificate_authorities"), what)
        reader.finish()
        authorities = []
        while names.remaining:
            authorities.append(names.vector(2, 1, _UINT16, "DistinguishedName"))
        return cls(types, schemes, authorities)


@dataclass(frozen=True, slots=True)
class ServerHelloDone:
    """RFC 5246 §7.4.5: an empty body."""

    def encode(self) -> bytes:
        return b""

    @classmethod
    def decode(cls, body: bytes) -> Self:
        _Reader(body, "ServerHelloDone").finish()
        return cls()


@dataclass(frozen=True, slots=True)
class ClientKeyExchange:
    """ECDHE ClientKeyExchange: ``ECPoint ecdh_Yc<1..2^8-1>`` (RFC 8422 §5.7)."""

    public_key: bytes

    def encode(self) -> bytes:
        return _vector(self.public_key, 1, 1, _UINT8, "ECPoint")

    @classmethod
    def decode(cls, body: bytes) -> Self:
        reader = _Reader(body, "ClientKeyExchange")
        public_key = reader.vector(1, 1, _UINT8, "ECPoint")
        reader.finish()
        return cls(public_key)


@dataclass(frozen=True, slots=True)
class CertificateVerify:
    """RFC 5246 §7.4.8: a DigitallySigned over the handshake messages."""

    signature_scheme: int
    signature: bytes

    def encode(self) -> bytes:
        return _encode_signed(self.signature_scheme, self.signature)

    @classmethod
    def decode(cls, body: bytes) -> Self:
        reader = _Reader(body, "CertificateVerify")
        scheme, signature = _decode_signed(reader)
        reader.finish()
        return cls(scheme, signature)


@dataclass(frozen=True, slots=True)
class Finished:
    """RFC 5246 §7.4.9: ``opaque verify_data[12]`` for every suite we use."""

    verify_data: bytes

    def encode(self) -> bytes:
        if len(self.verify_data) != VERIFY_DATA_LENGTH:
            raise DtlsError(f"cannot encode verify_data of {len(self.verify_data)} bytes")
        return bytes(self.verify_data)

    @classmethod
    def decode(cls, body: bytes) -> Self:
        if len(body) != VERIFY_DATA_LENGTH:
            raise DecodeError(
                f"Finished of {len(body)} bytes, verify_data is {VERIFY_DATA_LENGTH}"
            )
        return cls(bytes(body))


# ---------------------------------------------------------------------------
# Extension bodies


def encode_use_srtp(profiles: list[int], mki: bytes = b"") -> bytes:
    """UseSRTPData (RFC 5764 §4.1.1).

    ``SRTPProtectionProfile SRTPProtectionProfiles<2..2^16-1>`` (uint16 each)
    then ``opaque srtp_mki<0..255>``. The server's answer uses the same
    format with exactly one profile (§4.1.1); checking that is the caller's.
    """
    return _vector(
        _uint16_list(profiles, "SRTP protection profile"), 2, 2, 0xFFFE, "SRTPProtectionProfiles"
    ) + _vector(mki, 1, 0, _UINT8, "srtp_mki")


def decode_use_srtp(data: bytes) -> tuple[list[int], bytes]:
    """``(profiles, mki)`` from UseSRTPData (RFC 5764 §4.1.1)."""
    what = "use_srtp"
    reader = _Reader(data, what)
    profiles = _parse_uint16_list(
        reader.vector(2, 2, _UINT16, "SRTPProtectionProfiles"), what, "SRTPProtectionProfiles"
    )
    mki = reader.vector(1, 0, _UINT8, "srtp_mki")
    reader.finish()
    return profiles, mki


def encode_supported_groups(groups: list[int]) -> bytes:
    """``NamedCurve named_curve_list<2..2^16-1>`` (RFC 8422 §5.1.1)."""
    return _vector(_uint16_list(groups, "named group"), 2, 2, 0xFFFE, "named_curve_list")


def decode_supported_groups(data: bytes) -> list[int]:
    what = "supported_groups"
    reader = _Reader(data, what)
    groups = _parse_uint16_list(
        reader.vector(2, 2, _UINT16, "named_curve_list"), what, "named_curve_list"
    )
    reader.finish()
    return groups


def encode_ec_point_formats(formats: list[int]) -> bytes:
    """``ECPointFormat ec_point_format_list<1..2^8-1>`` (RFC 8422 §5.1.2)."""
    return _vector(_uint8_list(formats, "EC point format"), 1, 1, _UINT8, "ec_point_format_list")


def decode_ec_point_formats(data: bytes) -> list[int]:
    reader = _Reader(data, "ec_point_formats")
    formats = list(reader.vector(1, 1, _UINT8, "ec_point_format_list"))
    reader.finish()
    return formats


def encode_signature_algorithms(schemes: list[int]) -> bytes:
    """``supported_signature_algorithms<2..2^16-2>`` (RFC 5246 §7.4.1.4.1)."""
    return _vector(
        _uint16_list(schemes, "signature scheme"), 2, 2, 0xFFFE, "supported_signature_algorithms"
    )


def decode_signature_algorithms(data: bytes) -> list[int]:
    what = "signature_algorithms"
    reader = _Reader(data, what)
    schemes = _parse_uint16_list(
        reader.vector(2, 2, 0xFFFE, "supported_signature_algorithms"),
        what, "supported_signature_algorithms",
    )
    reader.finish()
    return schemes


def encode_renegotiation_info(data: bytes = b"") -> bytes:
    """``opaque renegotiated_connection<0..255>`` (RFC 5746 §3.2); empty initially."""
    return _vector(data, 1, 0, _UINT8, "renegotiated_connection")


def decode_renegotiation_info(data: bytes) -> bytes:
    reader = _Reader(data, "renegotiation_info")
    connection = reader.vector(1, 0, _UINT8, "renegotiated_connection")
    reader.finish()
    return connection


def decode_empty(data: bytes) -> None:
    """Check an extension whose extension_data must be empty.

    E.g. extended_master_secret (RFC 7627 §5.1).
    """
    if data:
        raise DecodeError(f"extension data of {len(data)} bytes where none is allowed")


def encode_ekt_ciphers_client(ciphers: list[int]) -> bytes:
    """ClientHello ``EKTCipherType supported_ciphers<1..255>`` (RFC 8870 §5.2.1)."""
    return _vector(_uint8_list(ciphers, "EKT cipher"), 1, 1, _UINT8, "supported_ciphers")


def decode_ekt_ciphers_client(data: bytes) -> list[int]:
    reader = _Reader(data, "supported_ekt_ciphers")
    ciphers = list(reader.vector(1, 1, _UINT8, "supported_ciphers"))
    reader.finish()
    return ciphers


def encode_ekt_cipher_server(cipher: int) -> bytes:
    """ServerHello ``EKTCipherType selected_cipher``: one byte (RFC 8870 §5.2.1)."""
    return _uint(cipher, 1, "EKT cipher")


def decode_ekt_cipher_server(data: bytes) -> int:
    if len(data) != 1:
        raise DecodeError(
            f"supported_ekt_ciphers in ServerHello of {len(data)} bytes, selected_cipher is 1"
        )
    return data[0]


def encode_external_session_id(session_id: bytes) -> bytes:
    """``opaque session_id<20..255>`` (RFC 8844 §4.3)."""
    return _vector(session_id, 1, 20, _UINT8, "external session_id")


def decode_external_session_id(data: bytes) -> bytes:
    reader = _Reader(data, "external_session_id")
    session_id = reader.vector(1, 20, _UINT8, "session_id")
    reader.finish()
    return session_id


# ---------------------------------------------------------------------------
# Alert and ACK record bodies


def encode_alert(level: int, description: int) -> bytes:
    """An Alert record body: level(1), description(1) (RFC 5246 §7.2)."""
    return _uint(level, 1, "alert level") + _uint(description, 1, "alert description")


def decode_alert(data: bytes) -> tuple[int, int]:
    """``(level, description)``; values are not checked here (RFC 5246 §7.2)."""
    if len(data) != 2:
        raise DecodeError(f"alert of {len(data)} bytes, not 2")
    return data[0], data[1]


def encode_ack(record_numbers: list[tuple[int, int]]) -> bytes:
    """``RecordNumber record_numbers<0..2^16-1>``; (epoch, sequence_number) uint64 each.

    RFC 9147 §7.
    """
    body = b"".join(
        _uint(epoch, 8, "epoch") + _uint(seq, 8, "sequence_number")
        for epoch, seq in record_numbers
    )
    return _vector(body, 2, 0, _UINT16, "record_numbers")


def decode_ack(data: bytes) -> list[tuple[int, int]]:
    reader = _Reader(data, "ACK")
    body = reader.vector(2, 0, _UINT16, "record_numbers")
    reader.finish()
    if len(body) % 16:
        raise DecodeError(f"ACK record_numbers of {len(body)} bytes is not a multiple of 16")
    return list(struct.iter_unpack(">QQ", body))
