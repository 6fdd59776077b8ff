"""Encrypted Key Transport for SRTP (RFC 8870), sans-I/O.

What is here:

* the EKTField codecs (RFC 8870 §4.1): ShortEKTField, FullEKTField, the
  EKTPlaintext inside it, and :func:`ekt_field_length` for the media relay's
  per-packet path (§4.3.2 step 1);
* the EKT cipher, AES Key Wrap with Padding (RFC 8870 §4.4.1, RFC 5649);
* the EKT parameter set (§4.2) and the DTLS ``ekt_key`` handshake message
  body that carries it (§5.2.2);
* :class:`EktSender`, the sender schedule of one SSRC (§4.3.1, §4.5, §4.6);
* :class:`EktReceiver`, key learning on the receive side (§4.3.2).

Project decisions (docs/PROTOCOL.md, DESIGN.md): EKT cipher wire values are
AESKW_128 = 1 and AESKW_256 = 2 (the §5.2.1 enum; 0 is reserved and refused).
The ``ekt_key`` vectors ``<1..256>`` take 2-byte length prefixes. With the
DOUBLE profiles (RFC 8723) the EKTField carries only the inner (end-to-end)
half key, 16 or 32 bytes; the ROC is the inner ROC; the salt is the first 12
bytes of the EKTKey's ``srtp_master_salt``.

Nothing here reads a clock: every time is an explicit ``now`` in seconds.
Keys are never logged or shown in a ``repr``.  Python cannot truly zeroise
``bytes``; key material owned by :class:`EktSender` is kept in ``bytearray``
objects that are overwritten when the key is discarded.
"""

from __future__ import annotations

import collections
import hmac
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap_with_padding,
    aes_key_wrap_with_padding,
)

from perc_daemons.protocol.errors import ProtocolError

__all__ = [
    "EKT_KEY_HANDSHAKE_TYPE",
    "FULL_EKT_TYPE",
    "INNER_SALT_LENGTH",
    "MAX_CIPHERTEXT_LENGTH",
    "MAX_MASTER_KEY_LENGTH",
    "REJECT_SSRC_MISMATCH",
    "REJECT_STALE_EPOCH",
    "SHORT_EKT_FIELD",
    "SHORT_EKT_TYPE",
    "BadEktPlaintext",
    "EktCipher",
    "EktCipherTooWeak",
    "EktEpochExhausted",
    "EktError",
    "EktKeyLengthMismatch",
    "EktKeyWrongLength",
    "EktParameterSet",
    "EktPlaintext",
    "EktReceiver",
    "EktSaltTooShort",
    "EktSender",
    "EktUnwrapFailed",
    "ExpiredEktKey",
    "FullEktField",
    "LearnedKey",
    "MalformedEktField",
    "MalformedEktKeyMessage",
    "UnknownEktCipher",
    "UnknownEktType",
    "UnknownSpi",
    "decode_ekt_key",
    "derive_master_salt",
    "ekt_field_length",
    "encode_ekt_key",
]

# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class EktError(ProtocolError):
    """Any EKT parsing or processing refusal (RFC 8870)."""

    reason = "ekt_error"


class MalformedEktField(EktError):
    """The EKTField does not parse (RFC 8870 §4.1): lengths or Length field wrong."""

    reason = "ekt_malformed_field"


class UnknownEktType(EktError):
    """Message type 1 (legacy), 255 (reserved) or not the type expected (RFC 8870 §4.1).

    An unknown type means: discard the whole EKT tag.
    """

    reason = "ekt_unknown_type"


class UnknownSpi(EktError):
    """No EKT parameter set has this SPI: an authentication failure (RFC 8870 §4.3.2 step 2)."""

    reason = "ekt_unknown_spi"


class EktUnwrapFailed(EktError):
    """AES-KWP unwrap failed (RFC 8870 §4.3.2 step 3): drop the packet."""

    reason = "ekt_unwrap_failed"


class BadEktPlaintext(EktError):
    """The unwrapped EKTPlaintext does not parse (RFC 8870 §4.1, §4.3.2 step 4)."""

    reason = "ekt_bad_plaintext"


class EktKeyLengthMismatch(EktError):
    """The carried master key has the wrong length (RFC 8870 §4.3.2 step 6): drop the packet."""

    reason = "ekt_key_length_mismatch"


class ExpiredEktKey(EktError):
    """The EKTKey's ekt_ttl has run out (RFC 8870 §4.3.2 last paragraph, §5.2.2)."""

    reason = "ekt_key_expired"


class MalformedEktKeyMessage(EktError):
    """The ekt_key handshake message body does not parse (RFC 8870 §5.2.2)."""

    reason = "ekt_key_message_malformed"


class EktKeyWrongLength(MalformedEktKeyMessage):
    """ekt_key_value length differs from the negotiated EKT cipher's key length (§4.4.1)."""

    reason = "ekt_key_message_key_length"


class UnknownEktCipher(EktError):
    """An EKTCipherType value other than aeskw_128(1) / aeskw_256(2) (RFC 8870 §5.2.1)."""

    reason = "ekt_unknown_cipher"


class EktSaltTooShort(EktError):
    """srtp_master_salt is shorter than the SRTP salt in use (RFC 8870 §4.3.2 step 4)."""

    reason = "ekt_salt_too_short"


class EktCipherTooWeak(EktError):
    """The EKT cipher key is shorter than the SRTP cipher key (RFC 8870 §6)."""

    reason = "ekt_cipher_too_weak"


class EktEpochExhausted(EktError):
    """The 16-bit epoch would wrap: a new EKTKey (new SPI) is needed (RFC 8870 §4.1 Epoch)."""

    reason = "ekt_epoch_exhausted"


#: :attr:`EktReceiver.rejected` label: SSRC inside the tag differs (§4.3.2 step 5).
REJECT_SSRC_MISMATCH = "ekt_ssrc_mismatch"
#: :attr:`EktReceiver.rejected` label: epoch not above the highest seen (§4.1 Epoch).
REJECT_STALE_EPOCH = "ekt_stale_epoch"

# ---------------------------------------------------------------------------
# Constants and the EKT cipher
# ---------------------------------------------------------------------------

SHORT_EKT_TYPE = 0
SHORT_EKT_FIELD = b"\x00"
FULL_EKT_TYPE = 2
_LEGACY_EKT_TYPE = 1
_RESERVED_EKT_TYPE = 255

#: Handshake message type of the DTLS ekt_key message (RFC 8870 §5.2.2, §7.4).
EKT_KEY_HANDSHAKE_TYPE = 26

#: SPI (2) + Epoch (2) + Length (2) + Message Type (1) (RFC 8870 §4.1 Figure 1).
_FULL_TRAILER = 7
MAX_CIPHERTEXT_LENGTH = 251  # EKTCiphertext = 1*251BYTE
MAX_MASTER_KEY_LENGTH = 242  # SRTPMasterKey = 1*242BYTE
_MIN_FULL_LENGTH = 1 + _FULL_TRAILER
_MAX_FULL_LENGTH = MAX_CIPHERTEXT_LENGTH + _FULL_TRAILER
_MIN_EXTENSION_LENGTH = 1 + 3  # ExtensionData = 1*1024BYTE, then Length (2) + type (1)
_MAX_EXTENSION_LENGTH = 1024 + 3
_RTP_HEADER_LENGTH = 12

#: SRTP master salt length of the (inner half of the) GCM / DOUBLE profiles (RFC 8723 §5).
INNER_SALT_LENGTH = 12

_VALID_MASTER_KEY_LENGTHS = (16, 32)
_U16 = struct.Struct("!H")
_FULL_TAIL = struct.Struct("!HHHB")  # SPI, Epoch, Length, Message Type
_PLAINTEXT_TAIL = struct.Struct("!II")  # SSRC, ROC


class EktCipher(IntEnum):
    """EKTCipherType (RFC 8870 §5.2.1 enum; §4.4.1 AES Key Wrap with Padding).

    The wire value 0 is ``reserved`` and refused (see module docstring).
    """

    AESKW_128 = 1
    AESKW_256 = 2

    @property
    def key_length(self) -> int:
        """The EKTKey length L in bytes (RFC 8870 §4.4.1 Table 1)."""
        return 16 if self is EktCipher.AESKW_128 else 32

    @classmethod
    def from_wire(cls, value: int) -> EktCipher:
        """Parse an EKTCipherType byte (RFC 8870 §5.2.1); raise :class:`UnknownEktCipher`."""
        try:
            return cls(value)
        except ValueError:
            raise UnknownEktCipher(f"unknown EKT cipher {value!r}") from None


# ---------------------------------------------------------------------------
# EKTField codecs (RFC 8870 §4.1)
# ---------------------------------------------------------------------------


def ekt_field_length(packet: bytes | bytearray | memoryview) -> int:
    """How many trailing bytes of an SRTP packet are its EKTField (RFC 8870 §4.1, §4.3.2 step 1).

    Looks only at the tail.  1 for a ShortEKTField; for a FullEKTField (type 2)
    or an ExtensionEKTField (types 3..254) the big-endian Length field in front
    of the type byte, which must leave at least an RTP header (12 bytes) before
    the field.  Raises :class:`UnknownEktType` for type 1 (legacy) and 255
    (reserved) and :class:`MalformedEktField` for anything that does not fit.
    """
    n = len(packet)
    if n == 0:
        raise MalformedEktField("empty packet")
    msg_type = packet[n - 1]
    if msg_type == 0:
        return 1
    if msg_type == _LEGACY_EKT_TYPE or msg_type == _RESERVED_EKT_TYPE:
        raise UnknownEktType(f"EKT message type {msg_type}")
    if n < 3:
        raise MalformedEktField("packet too short for an EKT Length field")
    length = (packet[n - 3] << 8) | packet[n - 2]
    if msg_type == FULL_EKT_TYPE:
        if length < _MIN_FULL_LENGTH or length > _MAX_FULL_LENGTH:
            raise MalformedEktField(f"FullEKTField Length {length}")
    elif length < _MIN_EXTENSION_LENGTH or length > _MAX_EXTENSION_LENGTH:
        raise MalformedEktField(f"ExtensionEKTField Length {length}")
    if length > n - _RTP_HEADER_LENGTH:
        raise MalformedEktField(f"EKT Length {length} leaves no RTP header in {n} bytes")
    return length


def _check_u16(name: str, value: int) -> None:
    if not 0 <= value <= 0xFFFF:
        raise ValueError(f"{name} {value!r} out of range 0..65535")


def _check_u32(name: str, value: int) -> None:
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"{name} {value!r} out of range 0..2^32-1")


@dataclass(frozen=True, slots=True)
class FullEktField:
    """FullEKTField = EKTCiphertext | SPI | Epoch | Length | 0x02 (RFC 8870 §4.1 Figure 1).

    Constructing one with out-of-range values raises ``ValueError`` (a local
    programming error); :meth:`decode` raises :class:`EktError` subclasses.
    """

    ciphertext: bytes
    spi: int
    epoch: int

    def __post_init__(self) -> None:
        if not isinstance(self.ciphertext, bytes):
            object.__setattr__(self, "ciphertext", bytes(self.ciphertext))
        if not 1 <= len(self.ciphertext) <= MAX_CIPHERTEXT_LENGTH:
            raise ValueError(f"EKTCiphertext length {len(self.ciphertext)} not in 1..251")
        _check_u16("SPI", self.spi)
        _check_u16("epoch", self.epoch)

    def encode(self) -> bytes:
        """The wire form, Length counting the whole field (RFC 8870 §4.1)."""
        return self.ciphertext + _FULL_TAIL.pack(
            self.spi, self.epoch, len(self.ciphertext) + _FULL_TRAILER, FULL_EKT_TYPE
        )

    @classmethod
    def decode(cls, field: bytes | bytearray | memoryview) -> FullEktField:
        """Parse exactly one FullEKTField (RFC 8870 §4.1); the Length must equal ``len(field)``."""
        n = len(field)
        if n == 0:
            raise MalformedEktField("empty EKTField")
        if field[n - 1] != FULL_EKT_TYPE:
            raise UnknownEktType(f"EKT message type {field[n - 1]} is not Full")
        if n < _MIN_FULL_LENGTH or n > _MAX_FULL_LENGTH:
            raise MalformedEktField(f"FullEKTField of {n} bytes")
        spi, epoch, length, _ = _FULL_TAIL.unpack_from(field, n - _FULL_TRAILER)
        if length != n:
            raise MalformedEktField(f"FullEKTField Length {length} but {n} bytes")
        return cls(bytes(field[: n - _FULL_TRAILER]), spi, epoch)


@dataclass(frozen=True, slots=True, repr=False)
class EktPlaintext:
    """EKTPlaintext = SRTPMasterKeyLength | SRTPMasterKey | SSRC | ROC (RFC 8870 §4.1)."""

    master_key: bytes
    ssrc: int
    roc: int

    def __post_init__(self) -> None:
        if not isinstance(self.master_key, bytes):
            object.__setattr__(self, "master_key", bytes(self.master_key))
        if not 1 <= len(self.master_key) <= MAX_MASTER_KEY_LENGTH:
            raise ValueError(f"SRTP master key length {len(self.master_key)} not in 1..242")
        _check_u32("SSRC", self.ssrc)
        _check_u32("ROC", self.roc)

    def __repr__(self) -> str:
        return (
            f"EktPlaintext(key_length={len(self.master_key)}, "
            f"ssrc={self.ssrc:#010x}, roc={self.roc})"
        )

    def encode(self) -> bytes:
        """The plaintext octets fed to the EKT cipher (RFC 8870 §4.1)."""
        return (
            bytes((len(self.master_key),))
            + self.master_key
            + _PLAINTEXT_TAIL.pack(self.ssrc, self.roc)
        )

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> EktPlaintext:
        """Parse an unwrapped EKTPlaintext (RFC 8870 §4.1, §4.3.2 step 4); exact length only."""
        n = len(data)
        if n < 1 + 1 + _PLAINTEXT_TAIL.size:
            raise BadEktPlaintext(f"EKTPlaintext of {n} bytes")
        key_length = data[0]
        if not 1 <= key_length <= MAX_MASTER_KEY_LENGTH:
            raise BadEktPlaintext(f"SRTPMasterKeyLength {key_length}")
        if n != 1 + key_length + _PLAINTEXT_TAIL.size:
            raise BadEktPlaintext(f"EKTPlaintext of {n} bytes for a {key_length}-byte key")
        ssrc, roc = _PLAINTEXT_TAIL.unpack_from(data, 1 + key_length)
        return cls(bytes(data[1 : 1 + key_length]), ssrc, roc)


# ---------------------------------------------------------------------------
# EKT parameter set and the ekt_key handshake message (RFC 8870 §4.2, §5.2.2)
# ---------------------------------------------------------------------------

_MAX_TTL = (1 << 24) - 1


@dataclass(frozen=True, slots=True, repr=False)
class EktParameterSet:
    """An EKT parameter set: EKTKey, EKT cipher, SRTP master salt, SPI (RFC 8870 §4.2).

    ``ttl`` is the ekt_ttl of the EKTKey message in seconds (§5.2.2).  Bad
    values raise ``ValueError``; :func:`decode_ekt_key` checks wire input first.
    The ``repr`` never shows the key or the salt.
    """

    key: bytes
    cipher: EktCipher
    master_salt: bytes
    spi: int
    ttl: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "cipher", EktCipher(self.cipher))
        if not isinstance(self.key, bytes):
            object.__setattr__(self, "key", bytes(self.key))
        if not isinstance(self.master_salt, bytes):
            object.__setattr__(self, "master_salt", bytes(self.master_salt))
        if len(self.key) != self.cipher.key_length:
            raise ValueError(
                f"EKTKey of {len(self.key)} bytes for {self.cipher.name} "
                f"(needs {self.cipher.key_length})"
            )
        if not 1 <= len(self.master_salt) <= 256:
            raise ValueError(f"SRTP master salt length {len(self.master_salt)} not in 1..256")
        _check_u16("SPI", self.spi)
        if not 0 <= self.ttl <= _MAX_TTL:
            raise ValueError(f"ekt_ttl {self.ttl!r} out of range 0..2^24-1")

    def __repr__(self) -> str:
        return f"EktParameterSet(spi={self.spi}, cipher={self.cipher.name}, ttl={self.ttl})"

    def wrap(self, plaintext: EktPlaintext) -> bytes:
        """EKTCiphertext = AES-KWP(EKTKey, EKTPlaintext) (RFC 8870 §4.4.1, RFC 5649).

        The output is ``8*ceil(M/8) + 8`` bytes (§4.4.1 states a wrong formula).
        Raises ``ValueError`` if it would exceed 251 bytes (keys over 231 bytes).
        """
        ciphertext = aes_key_wrap_with_padding(self.key, plaintext.encode())
        if len(ciphertext) > MAX_CIPHERTEXT_LENGTH:
            raise ValueError(f"EKTCiphertext of {len(ciphertext)} bytes exceeds 251")
        return ciphertext

    def unwrap(self, ciphertext: bytes | bytearray | memoryview) -> EktPlaintext:
        """Authenticate, decrypt and parse an EKTCiphertext (RFC 8870 §4.3.2 steps 3-4).

        Raises :class:`EktUnwrapFailed` or :class:`BadEktPlaintext`.
        """
        try:
            data = aes_key_unwrap_with_padding(self.key, bytes(ciphertext))
        except InvalidUnwrap:
            raise EktUnwrapFailed(f"EKTCiphertext does not unwrap under SPI {self.spi}") from None
        return EktPlaintext.decode(data)


#: HKDF ``info`` prefix of :func:`derive_master_salt`.
MASTER_SALT_INFO = b"perc-daemons EKT master salt|"


def derive_master_salt(key: bytes, conference_id: str, epoch: int, length: int = 12) -> bytes:
    """The SRTP master salt of a conference epoch's EKT parameter set (RFC 8870 §4.2).

    The KMF stores only the EKTKey of an epoch; every KD derives the same salt
    from it so that all of them hand out identical parameter sets:
    HKDF-SHA256 (RFC 5869) with ``ikm`` = the EKTKey, no salt, ``info`` =
    ``b"perc-daemons EKT master salt|" + conference_id + b"|" + str(epoch)``.
    Twelve bytes suit the AEAD (GCM) DOUBLE profiles (RFC 8723, RFC 7714).
    """
    if not isinstance(key, bytes | bytearray) or not key:
        raise ValueError("key must be non-empty bytes")
    if not isinstance(conference_id, str) or not conference_id:
        raise ValueError("conference_id must be a non-empty string")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
        raise ValueError("epoch must be a positive integer")
    if not 1 <= length <= 256:
        raise ValueError("length must be 1..256")
    info = MASTER_SALT_INFO + conference_id.encode() + b"|" + str(epoch).encode()
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(
        bytes(key))


def encode_ekt_key(params: EktParameterSet) -> bytes:
    """Body of the DTLS ekt_key(26) handshake message (RFC 8870 §5.2.2).

    ``opaque ekt_key_value<1..256>; opaque srtp_master_salt<1..256>;
    uint16 ekt_spi; uint24 ekt_ttl`` with 2-byte vector length prefixes.
    """
    return b"".join(
        (
            _U16.pack(len(params.key)),
            params.key,
            _U16.pack(len(params.master_salt)),
            params.master_salt,
            _U16.pack(params.spi),
            params.ttl.to_bytes(3, "big"),
        )
    )


def _read_vector(body: bytes | bytearray | memoryview, offset: int, name: str) -> tuple[bytes, int]:
    if len(body) < offset + 2:
        raise MalformedEktKeyMessage(f"ekt_key truncated in the {name} length")
    (length,) = _U16.unpack_from(body, offset)
    if not 1 <= length <= 256:
        raise MalformedEktKeyMessage(f"ekt_key {name} length {length} not in 1..256")
    start = offset + 2
    end = start + length
    if len(body) < end:
        raise MalformedEktKeyMessage(f"ekt_key truncated in {name}")
    return bytes(body[start:end]), end


def decode_ekt_key(body: bytes | bytearray | memoryview, cipher: EktCipher) -> EktParameterSet:
    """Parse an ekt_key(26) handshake message body (RFC 8870 §5.2.2).

    ``cipher`` is the EKT cipher negotiated in the handshake (§5.2.1); the key
    length must match it (:class:`EktKeyWrongLength`).  Anything malformed or
    trailing raises :class:`MalformedEktKeyMessage`.
    """
    cipher = EktCipher(cipher)
    key, offset = _read_vector(body, 0, "ekt_key_value")
    salt, offset = _read_vector(body, offset, "srtp_master_salt")
    if len(body) < offset + 5:
        raise MalformedEktKeyMessage("ekt_key truncated in ekt_spi/ekt_ttl")
    if len(body) != offset + 5:
        raise MalformedEktKeyMessage(f"{len(body) - offset - 5} trailing bytes after ekt_key")
    (spi,) = _U16.unpack_from(body, offset)
    ttl = int.from_bytes(body[offset + 2 : offset + 5], "big")
    if len(key) != cipher.key_length:
        raise EktKeyWrongLength(
            f"ekt_key_value of {len(key)} bytes for {cipher.name} (needs {cipher.key_length})"
        )
    return EktParameterSet(key=key, cipher=cipher, master_salt=salt, spi=spi, ttl=ttl)


def _check_params_for(params: EktParameterSet, key_length: int) -> None:
    """Checks tying a parameter set to the SRTP transform in use (RFC 8870 §4.3.2, §6)."""
    if len(params.master_salt) < INNER_SALT_LENGTH:
        raise EktSaltTooShort(
            f"SPI {params.spi}: srtp_master_salt of {len(params.master_salt)} bytes, "
            f"need {INNER_SALT_LENGTH}"
        )
    if params.cipher.key_length < key_length:
        raise EktCipherTooWeak(
            f"SPI {params.spi}: {params.cipher.name} is weaker than a {key_length}-byte SRTP key"
        )


def _check_key_length(key_length: int) -> None:
    if key_length not in _VALID_MASTER_KEY_LENGTHS:
        raise ValueError(f"SRTP (inner) master key length {key_length!r} is not 16 or 32")


def _wipe(buffer: bytearray | None) -> None:
    if buffer is not None:
        buffer[:] = bytes(len(buffer))


# ---------------------------------------------------------------------------
# Sender (RFC 8870 §4.3.1, §4.5, §4.6)
# ---------------------------------------------------------------------------


class EktSender:
    """EKT tags and packet keys for one sending SSRC (RFC 8870 §4.3.1, §4.5, §4.6).

    The sender draws its own (inner) SRTP master key.  After a new key, the
    first ``full_repeats`` packets carry a FullEKTField (§4.6 New sender /
    Rekey); then a Full tag goes out on every keyframe and at least every
    ``full_interval`` seconds (§4.6 New receiver); every other packet gets a
    ShortEKTField.  Once a replacement key has been sent in a Full tag, packets
    keep being protected with the old key for ``old_key_hold`` seconds
    (§4.3.1, last paragraph); the very first key is used at once.  The EKT
    parameter set stops being usable ``ttl`` seconds after it was installed
    (§4.3.2 last paragraph, §5.2.2): :meth:`next_packet` then raises
    :class:`ExpiredEktKey`.
    """

    def __init__(
        self,
        ssrc: int,
        key_length: int,
        params: EktParameterSet,
        now: float,
        *,
        full_repeats: int = 3,
        full_interval: float = 0.1,
        old_key_hold: float = 0.25,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        _check_u32("SSRC", ssrc)
        _check_key_length(key_length)
        _check_params_for(params, key_length)
        if full_repeats < 1:
            raise ValueError("full_repeats must be at least 1 (RFC 8870 §4.6)")
        if not full_interval > 0:
            raise ValueError("full_interval must be positive")
        if not old_key_hold >= 0:
            raise ValueError("old_key_hold must not be negative")
        self._ssrc = ssrc
        self._key_length = key_length
        self._full_repeats = full_repeats
        self._full_interval = full_interval
        self._old_key_hold = old_key_hold
        self._random_bytes = random_bytes

        self._params = params
        self._expires_at = now + params.ttl
        self._epoch = 0
        # The key announced in Full tags, and whether any packet carried it yet.
        self._key = self._draw_key()
        self._key_bytes = bytes(self._key)
        # A key goes with the salt of the EKTKey it is announced under (s4.3.2 step 4).
        self._key_salt = self.master_salt
        self._key_spi = params.spi
        self._key_sent = False
        # The key still protecting packets while receivers learn the new one.
        self._old_key: bytearray | None = None
        self._old_key_bytes: bytes | None = None
        self._old_key_salt = b""
        self._old_key_spi = params.spi
        self._hold_until: float | None = None
        self._full_remaining = full_repeats
        self._last_full_at: float | None = None
        self._cached_roc: int | None = None
        self._cached_field = b""

    # -- properties --------------------------------------------------------

    @property
    def ssrc(self) -> int:
        return self._ssrc

    @property
    def params(self) -> EktParameterSet:
        """The outbound EKT parameter set (RFC 8870 §4.3)."""
        return self._params

    @property
    def spi(self) -> int:
        return self._params.spi

    @property
    def epoch(self) -> int:
        """Keys already sent for this SSRC under the current EKTKey (RFC 8870 §4.1 Epoch)."""
        return self._epoch

    @property
    def current_key(self) -> bytes:
        """The newest master key: the one carried in Full tags (not always the packet key)."""
        return self._key_bytes

    @property
    def master_salt(self) -> bytes:
        """The SRTP (inner) master salt: first 12 bytes of the EKTKey salt (§4.3.2 step 4)."""
        return self._params.master_salt[:INNER_SALT_LENGTH]

    def salt_of(self, key: bytes) -> bytes:
        """The inner master salt that goes with ``key`` (one :meth:`next_packet` gave):
        the salt of the EKTKey under which it was announced, which is not the
        current one for the old key held across a rekey (issue 10: churn)."""
        if self._old_key_bytes is not None and hmac.compare_digest(key, self._old_key_bytes):
            return self._old_key_salt
        return self._key_salt

    @property
    def sending_spi(self) -> int:
        """The SPI of the EKTKey under which the key protecting packets now was announced:
        the previous one while the old-key hold of RFC 8870 s4.3.1 runs (as of the last
        :meth:`next_packet`: the hold ends at the first packet after it), else :attr:`spi`."""
        return self._old_key_spi if self._old_key_bytes is not None else self._params.spi

    @property
    def expires_at(self) -> float:
        """When the current EKT parameter set stops being usable (installation + ttl)."""
        return self._expires_at

    # -- key changes -------------------------------------------------------

    def rekey(self, params: EktParameterSet, now: float) -> None:
        """Install a new EKTKey; this always picks a new master key (RFC 8870 §4.5).

        The epoch restarts at 0 under the new SPI (§4.1 Epoch).  Installing the
        parameter set already in use again is a no-op; another set under the
        same SPI is refused with ``ValueError`` (§4.2: one SPI per set).
        """
        if params.spi == self._params.spi:
            if params == self._params:
                return
            raise ValueError(f"a different EKT parameter set under the same SPI {params.spi}")
        _check_params_for(params, self._key_length)
        self._params = params
        self._expires_at = now + params.ttl
        self._epoch = 0
        self._install_new_key(now)

    def new_master_key(self, now: float) -> None:
        """Pick a new master key under the same EKTKey: epoch + 1 (RFC 8870 §4.1 Epoch)."""
        if self._epoch >= 0xFFFF:
            raise EktEpochExhausted(f"epoch exhausted under SPI {self._params.spi}")
        self._epoch += 1
        self._install_new_key(now)

    def _draw_key(self) -> bytearray:
        key = bytearray(self._random_bytes(self._key_length))
        if len(key) != self._key_length:
            raise ValueError("random_bytes returned the wrong number of bytes")
        return key

    def _drop_old_key(self) -> None:
        _wipe(self._old_key)
        self._old_key = None
        self._old_key_bytes = None
        self._hold_until = None

    def _install_new_key(self, now: float) -> None:
        if self._hold_until is not None and now >= self._hold_until:
            self._drop_old_key()
        if self._key_sent and self._old_key is None:
            # Receivers decrypt with the current key: keep it for the hold, which
            # starts when the new key is first sent.
            self._old_key = self._key
            self._old_key_bytes = self._key_bytes
            self._old_key_salt = self._key_salt
            self._old_key_spi = self._key_spi
            self._hold_until = None
        else:
            # The current key was never sent, or announced but never protected media
            # (media stays on the old key): drop it.  A hold already running keeps
            # its deadline: epochs faster than the hold must not keep media on a key
            # a departed member knows (issue 10: rekeys under churn).
            _wipe(self._key)
        self._key = self._draw_key()
        self._key_bytes = bytes(self._key)
        self._key_salt = self.master_salt
        self._key_spi = self._params.spi
        self._key_sent = False
        self._full_remaining = self._full_repeats
        self._cached_roc = None
        self._cached_field = b""

    # -- per packet --------------------------------------------------------

    def next_packet(self, now: float, roc: int, keyframe: bool = False) -> tuple[bytes, bytes]:
        """(master key protecting this packet, EKTField to append) (RFC 8870 §4.3.1, §4.6).

        ``roc`` is the inner SRTP ROC of this packet.  Raises
        :class:`ExpiredEktKey` once the EKTKey's ttl has run out.
        """
        if now >= self._expires_at:
            raise ExpiredEktKey(f"EKTKey SPI {self._params.spi} expired")
        if self._full_remaining > 0:
            self._full_remaining -= 1
            full = True
        else:
            last = self._last_full_at
            full = keyframe or last is None or now - last >= self._full_interval
        if full:
            self._last_full_at = now
            if not self._key_sent:
                self._key_sent = True
                if self._old_key is not None and self._hold_until is None:
                    self._hold_until = now + self._old_key_hold
            if roc != self._cached_roc:
                _check_u32("ROC", roc)
                plaintext = EktPlaintext(self._key_bytes, self._ssrc, roc)
                self._cached_field = FullEktField(
                    self._params.wrap(plaintext), self._params.spi, self._epoch
                ).encode()
                self._cached_roc = roc
            field = self._cached_field
        else:
            field = SHORT_EKT_FIELD
        if self._hold_until is not None and now >= self._hold_until:
            self._drop_old_key()
        old = self._old_key_bytes
        return (old if old is not None else self._key_bytes), field

    def __repr__(self) -> str:
        return f"EktSender(ssrc={self._ssrc:#010x}, spi={self._params.spi}, epoch={self._epoch})"


# ---------------------------------------------------------------------------
# Receiver (RFC 8870 §4.3.2)
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, repr=False)
class LearnedKey:
    """A master key learned from a FullEKTField (RFC 8870 §4.3.2 step 6).

    With the DOUBLE transform it replaces the first (inner) half of the
    sender's master key; ``master_salt`` is the inner salt.  The sender keeps
    protecting media with its previous key for a while (§4.3.1), so callers
    should keep the previous key for trial decryption (§4.3.2).
    """

    ssrc: int
    master_key: bytes
    roc: int
    master_salt: bytes
    spi: int
    epoch: int

    def __repr__(self) -> str:
        return (
            f"LearnedKey(ssrc={self.ssrc:#010x}, roc={self.roc}, spi={self.spi}, "
            f"epoch={self.epoch})"
        )


@dataclass(slots=True)
class _InstalledSet:
    params: EktParameterSet
    expires_at: float
    salt: bytes


class EktReceiver:
    """Learns senders' master keys from EKT tags (RFC 8870 §4.3.2).

    Every parameter set given is kept (§4.3) until removed, each with its
    expiry (installation + ttl).  :meth:`process` returns a
    :class:`LearnedKey` when a tag brings a new key, ``None`` when there is
    nothing new, and raises an :class:`EktError` when the packet should be
    dropped or the tag discarded.  Every refusal is counted in
    :attr:`rejected` by reason.
    """

    def __init__(self, key_length: int) -> None:
        _check_key_length(key_length)
        self._key_length = key_length
        self._sets: dict[int, _InstalledSet] = {}
        # (spi, ssrc) -> (highest epoch, key learned at that epoch)
        self._state: dict[tuple[int, int], tuple[int, bytes]] = {}
        # ssrc -> (last accepted Full field, its spi): the §4.3.2 caching note
        self._last_field: dict[int, tuple[bytes, int]] = {}
        self.rejected: collections.Counter[str] = collections.Counter()

    @property
    def key_length(self) -> int:
        return self._key_length

    @property
    def spis(self) -> frozenset[int]:
        return frozenset(self._sets)

    def add_parameter_set(self, params: EktParameterSet, now: float) -> None:
        """Store an EKT parameter set, usable until ``now + ttl`` (RFC 8870 §4.3, §5.2.2).

        The same set again only refreshes its expiry.  A different set under a
        known SPI replaces it and forgets what was learned under that SPI.
        Raises :class:`EktSaltTooShort` / :class:`EktCipherTooWeak` if the set
        cannot serve this SRTP transform (§4.3.2 step 4, §6).
        """
        _check_params_for(params, self._key_length)
        existing = self._sets.get(params.spi)
        if existing is not None and existing.params != params:
            self.remove_parameter_set(params.spi)
        self._sets[params.spi] = _InstalledSet(
            params, now + params.ttl, params.master_salt[:INNER_SALT_LENGTH]
        )

    def remove_parameter_set(self, spi: int) -> bool:
        """Forget a parameter set and every key state learned under it; False if unknown."""
        if self._sets.pop(spi, None) is None:
            return False
        for key in [k for k in self._state if k[0] == spi]:
            del self._state[key]
        for ssrc in [s for s, (_, s_spi) in self._last_field.items() if s_spi == spi]:
            del self._last_field[ssrc]
        return True

    def purge_expired(self, now: float) -> list[int]:
        """Remove the parameter sets whose ttl has run out; return their SPIs."""
        expired = [spi for spi, entry in self._sets.items() if now >= entry.expires_at]
        for spi in expired:
            self.remove_parameter_set(spi)
        return expired

    def forget_ssrc(self, ssrc: int) -> None:
        """Drop the key state of a sender that left."""
        self._last_field.pop(ssrc, None)
        for key in [k for k in self._state if k[1] == ssrc]:
            del self._state[key]

    def process(
        self, packet_ssrc: int, field: bytes | bytearray | memoryview, now: float
    ) -> LearnedKey | None:
        """Handle the EKTField of one received SRTP packet (RFC 8870 §4.3.2).

        ``field`` is exactly the EKTField (see :func:`ekt_field_length`).
        Short tag, repeated tag, tag for another SSRC (step 5) or tag with a
        stale epoch (§4.1 Epoch) → ``None``.  Raises :class:`UnknownEktType`
        (discard the tag), :class:`MalformedEktField`, :class:`UnknownSpi`,
        :class:`ExpiredEktKey`, :class:`EktUnwrapFailed`,
        :class:`BadEktPlaintext` or :class:`EktKeyLengthMismatch` (drop the
        packet).
        """
        try:
            return self._process(packet_ssrc, field, now)
        except EktError as exc:
            self.rejected[exc.reason] += 1
            raise

    def _process(
        self, packet_ssrc: int, field: bytes | bytearray | memoryview, now: float
    ) -> LearnedKey | None:
        n = len(field)
        if n == 0:
            raise MalformedEktField("empty EKTField")
        msg_type = field[n - 1]
        if msg_type == SHORT_EKT_TYPE:
            if n != 1:
                raise MalformedEktField(f"ShortEKTField of {n} bytes")
            return None
        if msg_type != FULL_EKT_TYPE:
            raise UnknownEktType(f"EKT message type {msg_type}")

        cached = self._last_field.get(packet_ssrc)
        if cached is not None and cached[0] == field:
            entry = self._sets.get(cached[1])
            if entry is not None and now < entry.expires_at:
                return None  # §4.3.2: same tag as last time, nothing new

        parsed = FullEktField.decode(field)
        entry = self._sets.get(parsed.spi)
        if entry is None:
            raise UnknownSpi(f"unknown SPI {parsed.spi}")
        if now >= entry.expires_at:
            raise ExpiredEktKey(f"EKTKey SPI {parsed.spi} expired")
        plaintext = entry.params.unwrap(parsed.ciphertext)
        if plaintext.ssrc != packet_ssrc:
            self.rejected[REJECT_SSRC_MISMATCH] += 1
            return None
        if len(plaintext.master_key) != self._key_length:
            raise EktKeyLengthMismatch(
                f"{len(plaintext.master_key)}-byte master key, expected {self._key_length}"
            )
        state_key = (parsed.spi, packet_ssrc)
        state = self._state.get(state_key)
        if state is not None:
            seen_epoch, seen_key = state
            same_key = hmac.compare_digest(seen_key, plaintext.master_key)
            if parsed.epoch == seen_epoch and same_key:
                self._last_field[packet_ssrc] = (bytes(field), parsed.spi)
                return None  # a repeat (the ROC may have moved on)
            if parsed.epoch <= seen_epoch:
                self.rejected[REJECT_STALE_EPOCH] += 1
                return None
        self._state[state_key] = (parsed.epoch, plaintext.master_key)
        self._last_field[packet_ssrc] = (bytes(field), parsed.spi)
        return LearnedKey(
            ssrc=packet_ssrc,
            master_key=plaintext.master_key,
            roc=plaintext.roc,
            master_salt=entry.salt,
            spi=parsed.spi,
            epoch=parsed.epoch,
        )
