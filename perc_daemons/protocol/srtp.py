"""SRTP and SRTCP with AEAD_AES_128_GCM and AEAD_AES_256_GCM (RFC 7714).

One :class:`SrtpContext` holds one master key and salt (one direction of
one hop) and a per-SSRC stream state for any number of SSRCs, like a libsrtp
session with an "any SSRC" policy.  It implements:

* session key derivation with the AES-CM PRF of RFC 3711 section 4.3.3
  (AES-128 master keys) or the AES_256_CM_PRF of RFC 6188 section 3
  (AES-256 master keys), key derivation rate 0, with the 96-bit GCM master
  salt padded on the right with 16 zero bits (RFC 7714 erratum 4938, as
  libsrtp does);
* the RTP and RTCP IVs of RFC 7714 sections 8.1 and 9.1;
* packet index estimation from the sequence number (RFC 3711 section 3.3.1
  and appendix A) with the same start-up rule as libsrtp, and an ROC that can
  be supplied from outside (EKT, RFC 8870 section 4.3.2), applied to the next
  authenticated packet as libsrtp's ``srtp_set_stream_roc`` does;
* the replay list of RFC 3711 section 3.3.2 (sliding window, default 128
  packets), also applied when protecting so that a (key, IV) pair is never
  used twice;
* SRTCP with the E bit and 31-bit SRTCP index (RFC 7714 section 9.2/9.3;
  RFC 3711 section 3.4).

The double transform (:mod:`perc_daemons.protocol.double`) drives the
lower-level :meth:`SrtpContext.seal` / :meth:`SrtpContext.open` with its own
additional authenticated data, so the code here is shared by the inner and
the outer layer.  Tests check every operation byte for byte against libsrtp
(pylibsrtp), in both directions.

Keys: the derived session keys are produced into ``bytearray`` buffers,
handed to the AEAD objects and then overwritten; :meth:`SrtpContext.close`
drops the AEAD objects.  Python gives no stronger guarantee than that.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable
from enum import IntEnum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pylibsrtp import Error as LibSrtpError
from pylibsrtp import Policy, Session
from pylibsrtp._binding import ffi as _libsrtp_ffi

from perc_daemons.protocol.errors import ProtocolError
from perc_daemons.protocol.rtp import header_info


class SrtpError(ProtocolError):
    """An SRTP/SRTCP packet that cannot be protected or unprotected."""

    reason = "srtp_error"


class MalformedSrtp(SrtpError):
    """Too short, or not an RTP/RTCP packet at all."""

    reason = "srtp_malformed"


class AuthenticationFailed(SrtpError):
    """The AEAD tag did not verify (wrong key, tampered, or wrong layer)."""

    reason = "srtp_auth"


class ReplayError(SrtpError):
    """The packet index was seen before or is older than the replay window."""

    reason = "srtp_replay"


class KeyLifetimeExceeded(SrtpError):
    """The 2^48 SRTP / 2^31 SRTCP packet limit of one master key is reached."""

    reason = "srtp_key_lifetime"


class ContextClosed(SrtpError):
    """The context was closed (its keys forgotten) and cannot be used again."""

    reason = "srtp_closed"


class _ClosedAead:
    """Stands in for the AEAD objects after :meth:`SrtpContext.close`."""

    def encrypt(self, *args: object) -> bytes:
        raise ContextClosed("SRTP context is closed")

    decrypt = encrypt


_CLOSED = _ClosedAead()


class Profile(IntEnum):
    """SRTP protection profiles (RFC 5764 registry) that this project uses."""

    AEAD_AES_128_GCM = 0x0007
    AEAD_AES_256_GCM = 0x0008
    DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM = 0x0009
    DOUBLE_AEAD_AES_256_GCM_AEAD_AES_256_GCM = 0x000A


#: Single-layer master key length per profile; the double profiles list the
#: length of one half (RFC 8723 section 5).
LAYER_KEY_LENGTH = {
    Profile.AEAD_AES_128_GCM: 16,
    Profile.AEAD_AES_256_GCM: 32,
    Profile.DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM: 16,
    Profile.DOUBLE_AEAD_AES_256_GCM_AEAD_AES_256_GCM: 32,
}
SALT_LENGTH = 12  # RFC 7714 section 12
TAG_LENGTH = 16  # RFC 7714 section 7: 16-octet tags only
SRTCP_TRAILER_LENGTH = 4  # E flag + 31-bit SRTCP index
DEFAULT_REPLAY_WINDOW = 128
MIN_REPLAY_WINDOW = 64  # RFC 3711 section 3.3.2

# Key derivation labels, RFC 3711 section 4.3.2 (GCM needs no auth key).
LABEL_RTP_ENCRYPTION = 0x00
LABEL_RTP_SALT = 0x02
LABEL_RTCP_ENCRYPTION = 0x03
LABEL_RTCP_SALT = 0x05

_MAX_INDEX = (1 << 48) - 1
_MAX_SRTCP_INDEX = (1 << 31) - 1
_RTCP_SSRC = struct.Struct("!I")


def derive_key(master_key: bytes | bytearray, master_salt: bytes | bytearray, label: int,
               length: int) -> bytearray:
    """The SRTP PRF (RFC 3711 section 4.3.1-4.3.3; RFC 6188 section 3), rate 0.

    ``x = (label << 48) XOR master_salt`` over 112 bits, then the AES-CM key
    stream from ``IV = x * 2^16`` under the master key (AES-128 or AES-256 by
    the key's length).  A 12-byte (GCM) salt is padded on the right with two
    zero bytes first (RFC 7714 erratum 4938).
    """
    if len(master_key) not in (16, 32):
        raise ValueError("SRTP master key must be 16 or 32 bytes")
    if len(master_salt) == SALT_LENGTH:
        salt = bytes(master_salt) + b"\x00\x00"
    elif len(master_salt) == 14:
        salt = bytes(master_salt)
    else:
        raise ValueError("SRTP master salt must be 12 (GCM) or 14 bytes")
    x = (label << 48) ^ int.from_bytes(salt, "big")
    iv = (x << 16).to_bytes(16, "big")
    encryptor = Cipher(algorithms.AES(bytes(master_key)), modes.CTR(iv)).encryptor()
    # update_into writes the key stream straight into a buffer we can wipe later
    # (it needs block_size - 1 spare bytes).
    out = bytearray(length + 15)
    written = encryptor.update_into(bytes(length), out)
    encryptor.finalize()
    del out[written:]
    return out


def _wipe(buffer: bytearray) -> None:
    buffer[:] = bytes(len(buffer))


class _Stream:
    """Per-SSRC state: highest authenticated packet index and the replay bitmap.

    Bit ``i`` of ``window`` records that index ``max_index - i`` was seen.
    ``pending_roc`` is an ROC learnt from outside, applied to the next packet.
    """

    __slots__ = ("max_index", "pending_roc", "window")

    def __init__(self) -> None:
        self.max_index = 0
        self.window = 0
        self.pending_roc: int | None = None


class _RtcpStream:
    """Per-SSRC SRTCP state: next index to send and the receive replay list."""

    __slots__ = ("max_index", "next_index", "window")

    def __init__(self) -> None:
        self.next_index = 1  # libsrtp sends index 1 first
        self.max_index = 0
        self.window = 0


class SrtpContext:
    """SRTP/SRTCP AEAD-AES-GCM state for one master key (one direction of a hop).

    ``master_key`` is 16 bytes (AEAD_AES_128_GCM) or 32 bytes
    (AEAD_AES_256_GCM), ``master_salt`` 12 bytes.  Streams are created for each
    SSRC on first use.
    """

    __slots__ = ("_mask", "_rtcp", "_rtcp_aead", "_rtcp_salt", "_rtp_aead", "_rtp_salt",
                 "_streams", "replay_window")

    def __init__(self, master_key: bytes | bytearray, master_salt: bytes | bytearray, *,
                 replay_window: int = DEFAULT_REPLAY_WINDOW) -> None:
        if len(master_key) not in (16, 32):
            raise ValueError(f"SRTP master key must be 16 or 32 bytes, not {len(master_key)}")
        if len(master_salt) != SALT_LENGTH:
            raise ValueError(f"SRTP master salt must be 12 bytes, not {len(master_salt)}")
        if replay_window < MIN_REPLAY_WINDOW:
            raise ValueError(f"replay window must be at least {MIN_REPLAY_WINDOW}")
        n = len(master_key)
        keys = (derive_key(master_key, master_salt, LABEL_RTP_ENCRYPTION, n),
                derive_key(master_key, master_salt, LABEL_RTP_SALT, SALT_LENGTH),
                derive_key(master_key, master_salt, LABEL_RTCP_ENCRYPTION, n),
                derive_key(master_key, master_salt, LABEL_RTCP_SALT, SALT_LENGTH))
        try:
            self._install(*keys, replay_window=replay_window)
        finally:
            for buffer in keys:
                _wipe(buffer)

    @classmethod
    def from_session_keys(cls, rtp_key: bytes | bytearray, rtp_salt: bytes | bytearray,
                          rtcp_key: bytes | bytearray, rtcp_salt: bytes | bytearray, *,
                          replay_window: int = DEFAULT_REPLAY_WINDOW) -> SrtpContext:
        """A context from already-derived session keys and salts.

        RFC 7714's test vectors (sections 16 and 17) are given this way.
        """
        self = cls.__new__(cls)
        if len(rtp_key) not in (16, 32) or len(rtcp_key) not in (16, 32):
            raise ValueError("SRTP session keys must be 16 or 32 bytes")
        if len(rtp_salt) != SALT_LENGTH or len(rtcp_salt) != SALT_LENGTH:
            raise ValueError("SRTP session salts must be 12 bytes")
        if replay_window < MIN_REPLAY_WINDOW:
            raise ValueError(f"replay window must be at least {MIN_REPLAY_WINDOW}")
        self._install(rtp_key, rtp_salt, rtcp_key, rtcp_salt, replay_window=replay_window)
        return self

    def _install(self, rtp_key: bytes | bytearray, rtp_salt: bytes | bytearray,
                 rtcp_key: bytes | bytearray, rtcp_salt: bytes | bytearray, *,
                 replay_window: int) -> None:
        self._rtp_aead: AESGCM | None = AESGCM(rtp_key)
        self._rtcp_aead: AESGCM | None = AESGCM(rtcp_key)
        self._rtp_salt = int.from_bytes(rtp_salt, "big")
        self._rtcp_salt = int.from_bytes(rtcp_salt, "big")
        self.replay_window = replay_window
        self._mask = (1 << replay_window) - 1
        self._streams: dict[int, _Stream] = {}
        self._rtcp: dict[int, _RtcpStream] = {}

    def __repr__(self) -> str:  # never show key material
        return f"<SrtpContext streams={len(self._streams)} replay_window={self.replay_window}>"

    def close(self) -> None:
        """Forget the keys and all stream state; the context is unusable after."""
        self._rtp_aead = self._rtcp_aead = _CLOSED  # type: ignore[assignment]
        self._rtp_salt = self._rtcp_salt = 0
        self._streams.clear()
        self._rtcp.clear()

    # -- packet index (RFC 3711 section 3.3.1, appendix A) -------------------------

    def set_roc(self, ssrc: int, roc: int) -> None:
        """Use ``roc`` for the next packet of ``ssrc`` (e.g. learnt from EKT).

        The stream restarts from that packet, like libsrtp's
        ``srtp_set_stream_roc``; the state changes only once a packet
        authenticates.
        """
        stream = _Stream()
        stream.pending_roc = roc & 0xFFFFFFFF
        self._streams[ssrc] = stream

    def roc(self, ssrc: int) -> int:
        """The ROC of the highest packet index seen for ``ssrc`` (0 if none)."""
        stream = self._streams.get(ssrc)
        if stream is None:
            return 0
        if stream.pending_roc is not None:
            return stream.pending_roc
        return stream.max_index >> 16

    def estimate_roc(self, ssrc: int, seq: int) -> int:
        """The ROC that the next packet of ``ssrc`` with ``seq`` would use."""
        stream = self._streams.get(ssrc)
        if stream is None:
            return 0
        return self._check(stream, seq) >> 16

    def _check(self, stream: _Stream, seq: int) -> int:
        """Estimate the packet index for ``seq`` and apply the replay list."""
        if stream.pending_roc is not None:
            return (stream.pending_roc << 16) | seq
        max_index = stream.max_index
        if max_index <= 0x8000:
            index = seq  # start-up: ROC 0 (as libsrtp's srtp_rdbx_estimate_index)
        else:
            s_l = max_index & 0xFFFF
            roc = max_index >> 16
            if s_l < 0x8000:
                index = (((roc - 1) << 16) | seq) if seq - s_l > 0x8000 else ((roc << 16) | seq)
            elif s_l - 0x8000 > seq:
                index = ((roc + 1) << 16) | seq
                if index > _MAX_INDEX:
                    raise KeyLifetimeExceeded("SRTP packet index would exceed 2^48")
            else:
                index = (roc << 16) | seq
        delta = max_index - index
        if delta >= 0:
            if delta >= self.replay_window:
                raise ReplayError("packet index older than the replay window")
            if (stream.window >> delta) & 1:
                raise ReplayError("packet index already seen")
        return index

    def _commit(self, stream: _Stream, index: int) -> None:
        """Record an authenticated index (RFC 3711 section 3.3.2)."""
        if stream.pending_roc is not None:
            stream.pending_roc = None
            stream.max_index = index
            stream.window = 1
            return
        delta = index - stream.max_index
        if delta > 0:
            stream.window = 1 if delta >= self.replay_window else (
                ((stream.window << delta) | 1) & self._mask)
            stream.max_index = index
        else:
            stream.window |= 1 << -delta

    # -- SRTP (RFC 7714 section 8) ---------------------------------------------------

    def seal(self, ssrc: int, seq: int, aad: bytes | memoryview,
             plaintext: bytes | bytearray | memoryview) -> bytes:
        """AEAD-encrypt one RTP payload: returns ciphertext || 16-byte tag.

        ``aad`` is the RTP header the tag covers (RFC 7714 section 8.2).  The
        index is estimated from ``seq`` and recorded, so the same index is
        never sealed twice under this key.
        """
        stream = self._streams.get(ssrc)
        if stream is None:
            stream = self._streams[ssrc] = _Stream()
        index = self._check(stream, seq)
        out = self._rtp_aead.encrypt(  # type: ignore[union-attr]
            (((ssrc << 48) | index) ^ self._rtp_salt).to_bytes(12, "big"), plaintext, aad)
        self._commit(stream, index)
        return out

    def open(self, ssrc: int, seq: int, aad: bytes | memoryview,
             ciphertext: bytes | bytearray | memoryview) -> bytes:
        """AEAD-decrypt one RTP payload (ciphertext || tag) and record its index.

        Raises :class:`ReplayError` before decrypting a replayed index and
        :class:`AuthenticationFailed` when the tag does not verify (the stream
        state is then left unchanged, and a new SSRC is not remembered).
        """
        if len(ciphertext) < TAG_LENGTH:
            raise MalformedSrtp("SRTP payload shorter than the AEAD tag")
        stream = self._streams.get(ssrc)
        new = stream is None
        if new:
            stream = _Stream()
        index = self._check(stream, seq)
        try:
            out = self._rtp_aead.decrypt(  # type: ignore[union-attr]
                (((ssrc << 48) | index) ^ self._rtp_salt).to_bytes(12, "big"), ciphertext, aad)
        except InvalidTag:
            raise AuthenticationFailed("SRTP authentication failed") from None
        if new:
            self._streams[ssrc] = stream
        self._commit(stream, index)
        return out

    def protect(self, packet: bytes) -> bytes:
        """RTP packet → SRTP packet (header in the clear, payload encrypted)."""
        h, seq, ssrc = header_info(packet)
        header = packet[:h]
        return header + self.seal(ssrc, seq, header, packet[h:])

    def unprotect(self, packet: bytes) -> bytes:
        """SRTP packet → RTP packet; raises an :class:`SrtpError` subclass."""
        h, seq, ssrc = header_info(packet)
        header = packet[:h]
        return header + self.open(ssrc, seq, header, packet[h:])

    # -- SRTCP (RFC 7714 section 9, RFC 3711 section 3.4) ----------------------------

    def protect_rtcp(self, packet: bytes, *, encrypt: bool = True) -> bytes:
        """RTCP compound packet → SRTCP packet.

        With ``encrypt`` (the E bit) everything after the first 8 octets is
        encrypted; without it the whole packet is only authenticated
        (RFC 7714 section 9.3).  The SRTCP index counts per sender SSRC.
        """
        if len(packet) < 8 or packet[0] >> 6 != 2:
            raise MalformedSrtp("RTCP packet shorter than 8 octets or not version 2")
        (ssrc,) = _RTCP_SSRC.unpack_from(packet, 4)
        stream = self._rtcp.get(ssrc)
        if stream is None:
            stream = self._rtcp[ssrc] = _RtcpStream()
        index = stream.next_index
        if index > _MAX_SRTCP_INDEX:
            raise KeyLifetimeExceeded("SRTCP index would exceed 2^31")
        trailer = ((0x80000000 if encrypt else 0) | index).to_bytes(4, "big")
        iv = (((ssrc << 48) | index) ^ self._rtcp_salt).to_bytes(12, "big")
        aead = self._rtcp_aead
        if encrypt:
            sealed = aead.encrypt(iv, packet[8:], packet[:8] + trailer)  # type: ignore[union-attr]
            out = packet[:8] + sealed + trailer
        else:
            tag = aead.encrypt(iv, b"", packet + trailer)  # type: ignore[union-attr]
            out = packet + tag + trailer
        stream.next_index = index + 1
        return out

    def unprotect_rtcp(self, packet: bytes) -> bytes:
        """SRTCP packet → RTCP compound packet; replay-checked by SRTCP index."""
        if len(packet) < 8 + TAG_LENGTH + SRTCP_TRAILER_LENGTH or packet[0] >> 6 != 2:
            raise MalformedSrtp("SRTCP packet too short or not version 2")
        (ssrc,) = _RTCP_SSRC.unpack_from(packet, 4)
        trailer = packet[-4:]
        word = int.from_bytes(trailer, "big")
        encrypted = word >> 31
        index = word & _MAX_SRTCP_INDEX
        stream = self._rtcp.get(ssrc)
        new_stream = stream is None
        if stream is None:
            stream = _RtcpStream()
        delta = stream.max_index - index
        if delta >= 0:
            if delta >= self.replay_window:
                raise ReplayError("SRTCP index older than the replay window")
            if (stream.window >> delta) & 1:
                raise ReplayError("SRTCP index already seen")
        iv = (((ssrc << 48) | index) ^ self._rtcp_salt).to_bytes(12, "big")
        aead = self._rtcp_aead
        body = packet[:-4]
        try:
            if encrypted:
                plain = aead.decrypt(iv, body[8:], body[:8] + trailer)  # type: ignore[union-attr]
                out = body[:8] + plain
            else:
                aead.decrypt(iv, body[-TAG_LENGTH:], body[:-TAG_LENGTH] + trailer)  # type: ignore[union-attr]
                out = body[:-TAG_LENGTH]
        except InvalidTag:
            raise AuthenticationFailed("SRTCP authentication failed") from None
        if new_stream:
            self._rtcp[ssrc] = stream
        if delta < 0:
            shift = -delta
            stream.window = 1 if shift >= self.replay_window else (
                ((stream.window << shift) | 1) & self._mask)
            stream.max_index = index
        else:
            stream.window |= 1 << delta
        return out


# -- libsrtp, for hops where a single GCM layer suffices --------------------------------

_LIBSRTP_PROFILES = {16: Policy.SRTP_PROFILE_AEAD_AES_128_GCM,
                     32: Policy.SRTP_PROFILE_AEAD_AES_256_GCM}

#: The largest UDP datagram (RFC 768 length field): a hop session takes any packet up to it.
MAX_DATAGRAM = 65535
# What libsrtp may append beyond the packet: SRTCP index + tag + MKI (pylibsrtp's
# SRTP_MAX_SRTCP_TRAILER_LEN, the larger of its two trailers).
_LIBSRTP_TRAILER = 4 + 16 + 128


def libsrtp_session(master_key: bytes, master_salt: bytes, *, inbound: bool,
                    replay_window: int = DEFAULT_REPLAY_WINDOW) -> Session:
    """A libsrtp (pylibsrtp) session for one direction of one hop, any SSRC.

    The media relay uses these for the outer layer (RFC 8723 section 5.2),
    which is plain RFC 7714 SRTP: libsrtp does it in C, in place.  Tests check
    that libsrtp and :class:`SrtpContext` produce and accept the same bytes.
    Use it through :func:`hop_protect` and the three functions beside it (or
    :class:`~perc_daemons.protocol.double.Relay`): they take packets of any
    size and raise only :class:`SrtpError`.
    """
    if len(master_key) not in _LIBSRTP_PROFILES or len(master_salt) != SALT_LENGTH:
        raise ValueError("SRTP master key must be 16 or 32 bytes and the salt 12 bytes")
    if replay_window < MIN_REPLAY_WINDOW:
        raise ValueError(f"replay window must be at least {MIN_REPLAY_WINDOW}")
    policy = Policy(key=bytes(master_key) + bytes(master_salt),
                    ssrc_type=Policy.SSRC_ANY_INBOUND if inbound else Policy.SSRC_ANY_OUTBOUND,
                    srtp_profile=_LIBSRTP_PROFILES[len(master_key)])
    policy.window_size = replay_window
    # An MD answering a NACK re-seals, for a receiver, a packet it sent that receiver
    # under the same index (perc_daemons.protocol.selection): the very same plaintext
    # again, so the same ciphertext under the same GCM nonce, not a nonce reuse.
    policy.allow_repeat_tx = not inbound
    return Session(policy)


def libsrtp_error(error: LibSrtpError) -> SrtpError:
    """The typed error for a libsrtp failure (its only detail is the message)."""
    message = str(error)
    if message.startswith("authentication"):
        return AuthenticationFailed(f"SRTP authentication failed (libsrtp: {message})")
    if message.startswith("replay"):
        return ReplayError(f"SRTP replay (libsrtp: {message})")
    return MalformedSrtp(f"libsrtp refused the packet: {message}")


class _Scratch(threading.local):
    """One buffer per thread for packets beyond pylibsrtp's own (allocated on first use)."""

    def __init__(self) -> None:
        self.cdata = _libsrtp_ffi.new("char[]", MAX_DATAGRAM + _LIBSRTP_TRAILER)
        self.buffer = _libsrtp_ffi.buffer(self.cdata)


_scratch = _Scratch()


def libsrtp_large(session: Session, operation: Callable[[Session, bytes], bytes],
                  packet: bytes) -> bytes:
    """``operation(session, packet)`` for a packet pylibsrtp's buffer cannot take.

    pylibsrtp copies every packet into a fixed 1500-byte buffer and refuses
    (``ValueError``) what does not fit with its trailer: protect above 1356
    bytes, unprotect above 1500.  Real senders go up to the path MTU (jumbo
    frames: 9000).  The session's own C state must still do the work, so that
    one packet index, replay list and SRTCP index cover every packet of an
    SSRC whatever its size (RFC 3711 sections 3.3.1, 3.3.2 and 3.4: another
    context for large packets would repeat (SSRC, index) pairs, hence GCM
    nonces, under the same key).  So libsrtp runs in place on a larger
    buffer, lent to the session for this one call.  Raises only
    :class:`SrtpError`.
    """
    if len(packet) > MAX_DATAGRAM:
        raise MalformedSrtp(f"{len(packet)} bytes: larger than a UDP datagram")
    if not hasattr(session, "_cdata") or not hasattr(session, "_buffer"):
        raise MalformedSrtp(f"this pylibsrtp cannot take packets of {len(packet)} bytes")
    saved = session._cdata, session._buffer
    scratch = _scratch
    session._cdata, session._buffer = scratch.cdata, scratch.buffer
    try:
        return operation(session, packet)
    except LibSrtpError as e:
        raise libsrtp_error(e) from None
    except (TypeError, ValueError) as e:
        raise MalformedSrtp(f"libsrtp refused the packet: {e}") from None
    finally:
        session._cdata, session._buffer = saved


def _hop(session: Session, operation: Callable[[Session, bytes], bytes],
         packet: bytes) -> bytes:
    try:
        return operation(session, packet)
    except LibSrtpError as e:
        raise libsrtp_error(e) from None
    except ValueError:  # beyond pylibsrtp's buffer
        return libsrtp_large(session, operation, packet)
    except TypeError as e:
        raise MalformedSrtp(f"libsrtp refused the packet: {e}") from None


def hop_protect(session: Session, packet: bytes) -> bytes:
    """RTP → SRTP with a hop's libsrtp session, any size; raises only :class:`SrtpError`."""
    return _hop(session, Session.protect, packet)


def hop_unprotect(session: Session, packet: bytes) -> bytes:
    """SRTP → RTP with a hop's libsrtp session, any size; raises only :class:`SrtpError`."""
    return _hop(session, Session.unprotect, packet)


def hop_protect_rtcp(session: Session, packet: bytes) -> bytes:
    """RTCP → SRTCP with a hop's libsrtp session, any size; raises only :class:`SrtpError`."""
    return _hop(session, Session.protect_rtcp, packet)


def hop_unprotect_rtcp(session: Session, packet: bytes) -> bytes:
    """SRTCP → RTCP with a hop's libsrtp session, any size; raises only :class:`SrtpError`."""
    return _hop(session, Session.unprotect_rtcp, packet)
