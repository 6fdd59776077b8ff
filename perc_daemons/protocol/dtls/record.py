"""The DTLS 1.2 record layer (RFC 6347 section 4.1).

* framing: ``type(1) version(2) epoch(2) sequence_number(6) length(2) fragment``;
  a datagram may carry several records (section 4.1.1);
* AES-GCM record protection (RFC 5288 section 3, RFC 6347 section 4.1.2.1):
  nonce = 4-byte implicit IV || 8-byte explicit nonce (we send epoch || seq),
  AAD = epoch || seq || type || version || plaintext length;
* the anti-replay window (section 4.1.2.6), 64 records.

Invalid records are discarded silently (section 4.1.2.7): parsing stops at a
malformed header and AEAD failures return ``None``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM


class ContentType(IntEnum):
    CHANGE_CIPHER_SPEC = 20
    ALERT = 21
    HANDSHAKE = 22
    APPLICATION_DATA = 23
    ACK = 26  # RFC 9147 section 7, used under DTLS 1.2 for EKTKey (RFC 8870 section 5.2)


RECORD_HEADER_LENGTH = 13
MAX_PLAINTEXT_LENGTH = 1 << 14  # RFC 5246 section 6.2.1
MAX_CIPHERTEXT_LENGTH = MAX_PLAINTEXT_LENGTH + 2048  # section 6.2.3
EXPLICIT_NONCE_LENGTH = 8
TAG_LENGTH = 16
AEAD_OVERHEAD = EXPLICIT_NONCE_LENGTH + TAG_LENGTH
MAX_SEQUENCE_NUMBER = (1 << 48) - 1
REPLAY_WINDOW = 64

_HEADER = struct.Struct("!BHHHIH")  # type, version, epoch, seq (high 16), seq (low 32), length
_AAD = struct.Struct("!HHIBHH")  # epoch, seq high, seq low, type, version, length


@dataclass(frozen=True, slots=True)
class Record:
    content_type: int
    version: int
    epoch: int
    sequence_number: int
    fragment: bytes


def parse_records(datagram: bytes) -> list[Record]:
    """Split a datagram into records; a malformed header ends parsing (s4.1.2.7)."""
    records = []
    offset = 0
    size = len(datagram)
    while size - offset >= RECORD_HEADER_LENGTH:
        content_type, version, epoch, seq_high, seq_low, length = _HEADER.unpack_from(
            datagram, offset)
        offset += RECORD_HEADER_LENGTH
        if length > MAX_CIPHERTEXT_LENGTH or offset + length > size:
            break
        if version >> 8 != 0xFE:  # every DTLS version has major 254
            break
        records.append(Record(content_type, version, epoch, (seq_high << 32) | seq_low,
                              datagram[offset:offset + length]))
        offset += length
    return records


def encode_record(content_type: int, version: int, epoch: int, sequence_number: int,
                  fragment: bytes) -> bytes:
    return _HEADER.pack(content_type, version, epoch, sequence_number >> 32,
                        sequence_number & 0xFFFFFFFF, len(fragment)) + fragment


class GcmProtection:
    """AES-GCM protection of one direction of one epoch (RFC 5288, RFC 6347 s4.1.2.1)."""

    __slots__ = ("_aead", "_fixed_iv")

    def __init__(self, key: bytes, fixed_iv: bytes) -> None:
        self._aead = AESGCM(key)
        self._fixed_iv = fixed_iv

    def seal(self, content_type: int, version: int, epoch: int, sequence_number: int,
             plaintext: bytes) -> bytes:
        explicit = struct.pack("!HHI", epoch, sequence_number >> 32,
                               sequence_number & 0xFFFFFFFF)
        aad = _AAD.pack(epoch, sequence_number >> 32, sequence_number & 0xFFFFFFFF,
                        content_type, version, len(plaintext))
        return explicit + self._aead.encrypt(self._fixed_iv + explicit, plaintext, aad)

    def open(self, record: Record) -> bytes | None:
        """The plaintext, or None if the record does not authenticate."""
        fragment = record.fragment
        length = len(fragment) - AEAD_OVERHEAD
        if length < 0:
            return None
        seq = record.sequence_number
        aad = _AAD.pack(record.epoch, seq >> 32, seq & 0xFFFFFFFF, record.content_type,
                        record.version, length)
        try:
            return self._aead.decrypt(self._fixed_iv + fragment[:EXPLICIT_NONCE_LENGTH],
                                      fragment[EXPLICIT_NONCE_LENGTH:], aad)
        except InvalidTag:
            return None


class ReplayWindow:
    """RFC 6347 section 4.1.2.6: a sliding window over record sequence numbers."""

    __slots__ = ("_bits", "_max")

    def __init__(self) -> None:
        self._max = -1
        self._bits = 0

    def seen(self, sequence_number: int) -> bool:
        """True for a duplicate or a record older than the window."""
        delta = self._max - sequence_number
        if delta < 0:
            return False
        return delta >= REPLAY_WINDOW or bool((self._bits >> delta) & 1)

    def add(self, sequence_number: int) -> None:
        """Record an authenticated sequence number."""
        delta = sequence_number - self._max
        if delta > 0:
            self._bits = 1 if delta >= REPLAY_WINDOW else (
                ((self._bits << delta) | 1) & ((1 << REPLAY_WINDOW) - 1))
            self._max = sequence_number
        else:
            self._bits |= 1 << -delta
