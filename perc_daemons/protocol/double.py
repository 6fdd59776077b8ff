"""The SRTP double transform of RFC 8723 (DOUBLE_AEAD_AES_128/256_GCM).

Three parties use it, each with only the keys it may hold:

* the sending endpoint (:class:`DoubleSender`): inner (end-to-end) AES-GCM over
  a synthetic packet without header extensions, then the original header back
  with an empty OHB, then outer (hop-by-hop) AES-GCM, then the EKTField
  (RFC 8723 section 5.1, RFC 8870 section 4.3.1);
* a Media Distributor (:class:`Relay`): outer layer off with the sender's HBH key, optional
  edits of PT, SEQ and marker recorded in the OHB and of RFC 8285 header
  extensions, outer layer on with each receiver's (or cascade link's) HBH
  key; the EKTField is carried through untouched (RFC 8723 section 5.2);
* the receiving endpoint (:class:`DoubleReceiver`): EKTField off and
  processed, outer off, OHB back into the header, inner off with the
  sender's key learnt from EKT (RFC 8723 section 5.3, RFC 8870 section 4.3.2).

RTCP is hop-by-hop only (RFC 8723 section 6): plain
:meth:`SrtpContext.protect_rtcp` with the outer key.

The keys: a double master key or salt is the inner half followed by the outer
half (RFC 8723 section 5); :func:`split_keying_material` splits the DTLS-SRTP
exporter output (RFC 5764 section 4.2) accordingly.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from perc_daemons.protocol.ekt import (
    FULL_EKT_TYPE,
    EktReceiver,
    EktSender,
    ExpiredEktKey,
    FullEktField,
    UnknownSpi,
    ekt_field_length,
)
from perc_daemons.protocol.errors import ProtocolError
from perc_daemons.protocol.rtp import (
    RTP_HEADER_LENGTH,
    build_extension_block,
    header_length,
)
from perc_daemons.protocol.srtp import (
    LAYER_KEY_LENGTH,
    SALT_LENGTH,
    TAG_LENGTH,
    AuthenticationFailed,
    LibSrtpError,
    MalformedSrtp,
    Profile,
    ReplayError,
    Session,
    SrtpContext,
    libsrtp_error,
    libsrtp_large,
    libsrtp_session,
)


class DoubleError(ProtocolError):
    """A packet the double transform cannot process."""

    reason = "double_error"


class MalformedOhb(DoubleError):
    """The Original Header Block is malformed (RFC 8723 section 4)."""

    reason = "ohb_malformed"


class UnknownSender(DoubleError):
    """No end-to-end key is known (yet) for the packet's SSRC."""

    reason = "e2e_key_unknown"


class InnerAuthenticationFailed(DoubleError):
    """The end-to-end (inner) tag did not verify: altered beyond what the OHB allows."""

    reason = "e2e_auth"


DOUBLE_PROFILES = (Profile.DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM,
                   Profile.DOUBLE_AEAD_AES_256_GCM_AEAD_AES_256_GCM)

# OHB Config octet, RFC 8723 section 4: R R R R B M P Q
OHB_SEQ = 0x01
OHB_PT = 0x02
OHB_MARKER = 0x04
OHB_MARKER_VALUE = 0x08
OHB_RESERVED = 0xF0
EMPTY_OHB = b"\x00"

_SEQ = struct.Struct("!H")
_FIRST_FOUR = struct.Struct("!BBH")
_MIN_DOUBLE_PAYLOAD = 2 * TAG_LENGTH + 1  # inner tag + OHB + outer tag
# Config octets the SEQ-only fast path of Relay.edit leaves to edit_ohb: SEQ
# already recorded, reserved bits, or B without M (malformed).
_SEQ_FAST_PATH_EXCLUDED = OHB_RESERVED | OHB_SEQ | OHB_MARKER_VALUE
_BYTE = [bytes((i,)) for i in range(256)]
_FIXED = struct.Struct("!BBHII")  # b0, b1, seq, timestamp, ssrc


# -- keys ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True, repr=False)
class LayerKeys:
    """One layer's master key and salt for one direction."""

    key: bytes
    salt: bytes

    def context(self, replay_window: int = 128) -> SrtpContext:
        """Our SRTP layer keyed with these (endpoints, inner layer)."""
        return SrtpContext(self.key, self.salt, replay_window=replay_window)

    def session(self, *, inbound: bool, replay_window: int = 128) -> Session:
        """A libsrtp session keyed with these (the MD's hop-by-hop legs)."""
        return libsrtp_session(self.key, self.salt, inbound=inbound,
                               replay_window=replay_window)

    def __repr__(self) -> str:  # never show key material
        return f"<LayerKeys {len(self.key) * 8}-bit>"


@dataclass(frozen=True, slots=True)
class DoubleKeys:
    """The four half-keys of a DTLS-SRTP association with a DOUBLE profile.

    "client" is the endpoint (DTLS client), "server" the KD speaking for the
    MD.  The MD receives only the two ``*_outer`` entries (RFC 8871 section
    6.2, RFC 9185 MediaKeys).
    """

    profile: Profile
    client_inner: LayerKeys
    client_outer: LayerKeys
    server_inner: LayerKeys
    server_outer: LayerKeys


def exporter_length(profile: Profile) -> int:
    """Bytes to export with "EXTRACTOR-dtls_srtp" (RFC 5764 section 4.2)."""
    key_length = LAYER_KEY_LENGTH[profile]
    layers = 2 if profile in DOUBLE_PROFILES else 1
    return 2 * layers * (key_length + SALT_LENGTH)


def split_keying_material(profile: Profile, material: bytes) -> DoubleKeys:
    """Split exporter output for a DOUBLE profile (RFC 5764 s4.2, RFC 8723 s5).

    Layout: client_write_key | server_write_key | client_write_salt |
    server_write_salt, each double key/salt being inner half then outer half.
    """
    if profile not in DOUBLE_PROFILES:
        raise ValueError(f"{profile!r} is not a DOUBLE profile")
    if len(material) != exporter_length(profile):
        raise ValueError(f"keying material must be {exporter_length(profile)} bytes")
    k = LAYER_KEY_LENGTH[profile]
    s = SALT_LENGTH
    client_key, server_key = material[:2 * k], material[2 * k:4 * k]
    client_salt, server_salt = material[4 * k:4 * k + 2 * s], material[4 * k + 2 * s:]
    return DoubleKeys(
        profile,
        client_inner=LayerKeys(client_key[:k], client_salt[:s]),
        client_outer=LayerKeys(client_key[k:], client_salt[s:]),
        server_inner=LayerKeys(server_key[:k], server_salt[:s]),
        server_outer=LayerKeys(server_key[k:], server_salt[s:]),
    )


# -- the Original Header Block (RFC 8723 section 4) ------------------------------------

def parse_ohb(payload: bytes | memoryview) -> tuple[int, int | None, int | None, int | None]:
    """Read the OHB backwards from the end of an outer plaintext.

    Returns ``(length, original_pt, original_seq, original_marker)``; fields
    the OHB does not record are ``None``.  The payload must also hold the
    16-byte inner tag before the OHB.
    """
    if not payload:
        raise MalformedOhb("no OHB: empty outer plaintext")
    config = payload[-1]
    if config & OHB_RESERVED:
        raise MalformedOhb(f"reserved OHB bits set (config 0x{config:02x})")
    if config & (OHB_MARKER | OHB_MARKER_VALUE) == OHB_MARKER_VALUE:
        raise MalformedOhb("OHB marker value set without the marker-present bit")
    length = 1
    seq = pt = marker = None
    if config & OHB_SEQ:
        length += 2
    if config & OHB_PT:
        length += 1
    if len(payload) < length + TAG_LENGTH:
        raise MalformedOhb("outer plaintext too short for the OHB and the inner tag")
    if config & OHB_SEQ:
        (seq,) = _SEQ.unpack_from(payload, len(payload) - 3)
    if config & OHB_PT:
        pt = payload[len(payload) - length]
        if pt > 0x7F:
            raise MalformedOhb(f"OHB payload type {pt} out of range")
    if config & OHB_MARKER:
        marker = 1 if config & OHB_MARKER_VALUE else 0
    return length, pt, seq, marker


def build_ohb(pt: int | None = None, seq: int | None = None, marker: int | None = None) -> bytes:
    """Encode an OHB recording the given original values (RFC 8723 section 4)."""
    config = 0
    out = b""
    if pt is not None:
        config |= OHB_PT
        out += bytes((pt,))
    if seq is not None:
        config |= OHB_SEQ
        out += _SEQ.pack(seq)
    if marker is not None:
        config |= OHB_MARKER | (OHB_MARKER_VALUE if marker else 0)
    return out + bytes((config,))


# -- sending endpoint (RFC 8723 section 5.1) -------------------------------------------

def protect(packet: bytes, inner: SrtpContext, outer: SrtpContext, ekt_field: bytes) -> bytes:
    """Double-protect one RTP packet and append ``ekt_field`` (RFC 8723 s5.1).

    Inner AES-GCM over the synthetic packet (X bit cleared, extensions
    removed), header restored, empty OHB appended, outer AES-GCM over that
    with the full header as AAD.
    """
    h = header_length(packet)
    b0, _b1, seq, _ts, ssrc = _FIXED.unpack_from(packet)
    base = 12 + 4 * (b0 & 0x0F)
    view = memoryview(packet)
    synthetic_header = bytes((b0 & 0xEF,)) + packet[1:base]
    inner_sealed = inner.seal(ssrc, seq, synthetic_header, view[h:])
    outer_sealed = outer.seal(ssrc, seq, view[:h], inner_sealed + EMPTY_OHB)
    return packet[:h] + outer_sealed + ekt_field


class DoubleSender:
    """An endpoint's send side for one SSRC: EKT schedule, inner and outer layers.

    ``outer`` is the endpoint's client_write outer context (from DTLS-SRTP
    with the KD); the inner key is the endpoint's own, chosen and announced
    by the :class:`EktSender` (RFC 8871 section 4.5.2).
    """

    def __init__(self, outer: SrtpContext, ekt: EktSender, *, replay_window: int = 128) -> None:
        self.outer = outer
        self.ekt = ekt
        self._replay_window = replay_window
        self._inner: dict[bytes, SrtpContext] = {}

    def protect(self, packet: bytes, now: float, *, keyframe: bool = False) -> bytes:
        header_length(packet)  # a well-formed RTP packet, or RtpError
        _b0, _b1, seq, _ts, ssrc = _FIXED.unpack_from(packet)
        if ssrc != self.ekt.ssrc:
            raise ValueError(f"packet SSRC 0x{ssrc:08x} is not this sender's")
        current = next(iter(self._inner.values()), None)
        roc = current.estimate_roc(ssrc, seq) if current is not None else 0
        key, field = self.ekt.next_packet(now, roc, keyframe)
        inner = self._inner.get(key)
        if inner is None:
            inner = SrtpContext(key, self.ekt.salt_of(key), replay_window=self._replay_window)
            inner.set_roc(ssrc, roc)
            for old in self._inner.values():
                old.close()
            self._inner = {key: inner}
        return protect(packet, inner, self.outer, field)


# -- Media Distributor (RFC 8723 section 5.2) ------------------------------------------

class Relay:
    """The Media Distributor's per-packet work (RFC 8723 section 5.2).

    Per received packet: :meth:`open` with the sending hop's inbound session,
    optionally :meth:`edit`, then :meth:`seal` once per receiver (endpoint leg
    or cascade link) with that hop's outbound session.  The hop sessions are
    libsrtp sessions (:func:`~perc_daemons.protocol.srtp.libsrtp_session`): the
    outer layer is plain RFC 7714 SRTP, done in C, for packets of any size up
    to a UDP datagram (those beyond pylibsrtp's 1500-byte buffer through
    :func:`~perc_daemons.protocol.srtp.libsrtp_large`, in the same session).
    :meth:`open` and :meth:`seal` raise nothing but
    :class:`~perc_daemons.protocol.errors.ProtocolError`: a packet that cannot
    be sealed for one receiver can still be sealed for the others.

    The MD holds only outer (hop-by-hop) keys: the inner ciphertext, inner
    tag, OHB originals and EKTField pass through without it being able to
    read or forge them.
    """

    __slots__ = ("ekt_field", "packet")

    def __init__(self) -> None:
        #: The current packet with the outer layer removed: RTP header,
        #: inner ciphertext || inner tag || OHB; and its EKTField.
        self.packet = b""
        self.ekt_field = b""

    @property
    def header(self) -> bytes:
        return self.packet[:header_length(self.packet)]

    @property
    def plaintext(self) -> bytes:
        """The outer plaintext: inner ciphertext || inner tag || OHB."""
        return self.packet[header_length(self.packet):]

    def open(self, packet: bytes, inbound: Session) -> None:
        """Strip and keep the EKTField, remove the outer layer with ``inbound``.

        Raises a :class:`~perc_daemons.protocol.errors.ProtocolError`
        (malformed, outer authentication, replay, EKT framing): drop the packet.
        """
        end = len(packet) - ekt_field_length(packet)
        try:
            plain = inbound.unprotect(packet[:end])
        except LibSrtpError as e:
            raise libsrtp_error(e) from None
        except ValueError:  # beyond pylibsrtp's buffer
            plain = libsrtp_large(inbound, Session.unprotect, packet[:end])
        if len(plain) < RTP_HEADER_LENGTH + TAG_LENGTH + 1:
            raise MalformedSrtp("too short for a double-protected payload")
        self.packet = plain
        self.ekt_field = packet[end:]

    def edit(self, pt: int | None = None, seq: int | None = None, marker: int | None = None,
             extensions: Sequence[tuple[int, bytes]] | None = None) -> None:
        """Change PT, SEQ, marker and/or header extensions, keeping the OHB right.

        See :func:`edit_ohb`.
        """
        packet = self.packet
        h = header_length(packet)
        n = len(packet)
        config = packet[n - 1]
        if (pt is None and marker is None and extensions is None and seq is not None
                and not config & _SEQ_FAST_PATH_EXCLUDED and n - h >= TAG_LENGTH + 3):
            # The common edit: SEQ renumbered, no SEQ recorded yet.  The current SEQ
            # goes into the OHB just before its Config octet (after any PT octet).
            if not 0 <= seq <= 0xFFFF:
                raise ValueError("sequence number must be 0-65535")
            if seq != (packet[2] << 8) | packet[3]:
                self.packet = b"".join((packet[:2], _SEQ.pack(seq), memoryview(packet)[4:n - 1],
                                        packet[2:4], _BYTE[config | OHB_SEQ]))
            return
        header, old_length, ohb = edit_ohb(packet[:h], packet[n - 4:], n - h, pt, seq, marker,
                                           extensions)
        self.packet = header + packet[h:n - old_length] + ohb

    def seal(self, outbound: Session) -> bytes:
        """The packet for one receiving hop: outer layer on, EKTField re-appended.

        ``outbound`` must never be keyed like the inbound session: RFC 8723
        section 5.2 forbids re-encrypting with the sender's key.
        """
        try:
            return outbound.protect(self.packet) + self.ekt_field
        except LibSrtpError as e:
            raise libsrtp_error(e) from None
        except ValueError:  # beyond pylibsrtp's buffer
            return libsrtp_large(outbound, Session.protect, self.packet) + self.ekt_field


def edit_ohb(header: bytes, tail: bytes | memoryview, length: int, pt: int | None = None,
             seq: int | None = None, marker: int | None = None,
             extensions: Sequence[tuple[int, bytes]] | None = None,
             ) -> tuple[bytes, int, bytes]:
    """Apply an MD's header changes and work out the new OHB (RFC 8723 s4, s5.2).

    ``tail`` is the end of the outer plaintext (its last 4 bytes, or all of it
    if shorter) and ``length`` the plaintext's length.  PT/SEQ/marker changes
    are reflected in the OHB as section 5.2 step 3 says: a field changed for
    the first time has its original (current) value added; a field already
    in the OHB keeps the first recorded original (cascaded MDs), and its
    entry is dropped when the new value equals that original.  ``extensions``
    replaces the RFC 8285 extension elements (``[]`` removes them); they are
    never in the OHB since the inner layer does not cover them.

    Returns ``(new_header, old_ohb_length, new_ohb)``.  It runs per relayed
    packet, so it is plain integer code (-1 meaning "not recorded").
    """
    t = len(tail)
    if length < TAG_LENGTH + 1 or t < 1:
        raise MalformedOhb("outer plaintext too short for the OHB and the inner tag")
    config = tail[t - 1]
    if config & OHB_RESERVED or config & 0x0C == OHB_MARKER_VALUE:
        raise MalformedOhb(f"invalid OHB config octet 0x{config:02x}")
    ohb_len = 1 + ((config & OHB_SEQ) << 1) + ((config & OHB_PT) >> 1)
    if length < ohb_len + TAG_LENGTH:
        raise MalformedOhb("outer plaintext too short for the OHB and the inner tag")
    o_seq = ((tail[t - 3] << 8) | tail[t - 2]) if config & OHB_SEQ else -1
    o_pt = tail[t - ohb_len] if config & OHB_PT else -1
    o_marker = ((config >> 3) & 1) if config & OHB_MARKER else -1
    b1 = header[1]
    cur_seq = (header[2] << 8) | header[3]
    if seq is not None and seq != cur_seq:
        if not 0 <= seq <= 0xFFFF:
            raise ValueError("sequence number must be 0-65535")
        if o_seq < 0:
            o_seq = cur_seq
        elif seq == o_seq:
            o_seq = -1
        cur_seq = seq
    if pt is not None and pt != b1 & 0x7F:
        if not 0 <= pt <= 0x7F:
            raise ValueError("payload type must be 0-127")
        if o_pt < 0:
            o_pt = b1 & 0x7F
        elif pt == o_pt:
            o_pt = -1
        b1 = (b1 & 0x80) | pt
    if marker is not None and (1 if marker else 0) != b1 >> 7:
        # A one-bit field changed back is its original again.
        o_marker = (b1 >> 7) if o_marker < 0 else -1
        b1 ^= 0x80
    if o_pt < 0 and o_seq < 0 and o_marker < 0:
        ohb = EMPTY_OHB
    else:
        config = 0
        ohb = b""
        if o_pt >= 0:
            config = OHB_PT
            ohb = _BYTE[o_pt]
        if o_seq >= 0:
            config |= OHB_SEQ
            ohb += _SEQ.pack(o_seq)
        if o_marker >= 0:
            config |= OHB_MARKER | (o_marker << 3)
        ohb += _BYTE[config]
    if extensions is None:
        return _FIRST_FOUR.pack(header[0], b1, cur_seq) + header[4:], ohb_len, ohb
    b0 = header[0]
    block = build_extension_block(list(extensions))
    b0 = (b0 | 0x10) if block else (b0 & 0xEF)
    rest = header[4:12 + 4 * (b0 & 0x0F)] + block
    return _FIRST_FOUR.pack(b0, b1, cur_seq) + rest, ohb_len, ohb



# -- receiving endpoint (RFC 8723 section 5.3) -----------------------------------------

@dataclass(frozen=True, slots=True)
class ReceivedPacket:
    """A double-decrypted packet.

    ``packet`` is the sender's original RTP packet (original PT, SEQ and
    marker restored from the OHB, followed by the payload), with the header
    extensions as received (not end-to-end protected).  ``outer_pt`` and
    ``outer_seq`` are what the MD delivered: use them for codec matching and
    playout order (RFC 8723 section 5.3).  ``key_spi`` is the SPI of the EKTKey
    under which the end-to-end key that decrypted it was announced (during a
    sender's old-key hold, RFC 8870 s4.3.1, the previous epoch's).
    """

    packet: bytes
    ssrc: int
    outer_pt: int
    outer_seq: int
    outer_marker: int
    header_length: int
    key_spi: int | None = None

    @property
    def payload(self) -> bytes:
        return self.packet[self.header_length:]


#: Senders remembered as "announced a key under an EKTKey we lack" at most.
_MAX_UNKEYED = 4096

#: End-to-end keys a receiver keeps per sender SSRC at most (see :class:`DoubleReceiver`).
KEPT_KEYS = 4
#: Seconds a sender's older key is still accepted once a newer one decrypted one of its
#: packets (the sender switched: its old-key hold, RFC 8870 s4.3.1, is over): late and
#: reordered packets.  After that a packet under it is refused: a departed member knows
#: it and could forge with it.  The clock starts at the switch *as this receiver sees
#: it*, so a receiver that stalls still decrypts the old-key packets queued before it.
OLD_KEY_ACCEPT = 1.0
#: ... and at the latest this long after a newer key was learnt, switch seen or not.
OLD_KEY_MAX = 10.0


class _InnerKey:
    """One learnt end-to-end key of a sender: its context, the SPI of the EKTKey it
    came under, and until when it is accepted (None: the newest, no limit)."""

    __slots__ = ("context", "retire_at", "spi")

    def __init__(self, context: SrtpContext, spi: int) -> None:
        self.context = context
        self.spi = spi
        self.retire_at: float | None = None


class DoubleReceiver:
    """An endpoint's receive side: outer layer, EKT key learning, inner layer.

    ``outer`` is the endpoint's server_write outer context (what the MD
    protects toward it).  For each sender SSRC it keeps the end-to-end keys
    it learnt: the newest, and older ones for :data:`OLD_KEY_ACCEPT` seconds
    after a newer one decrypted a packet of the sender (:data:`OLD_KEY_MAX`
    after a newer one was learnt at most; at most :data:`KEPT_KEYS` keys, never dropping the
    one that decrypted the sender's last packet), so packets sent
    under an older key during a rekey still decrypt (trial decryption, RFC
    8870 s4.3.2) and no longer.  More than two are needed: when epochs follow
    each other faster than a sender's 250 ms old-key hold (s4.3.1), it
    announces a key per epoch while its media stays on the key from before
    the first (issue 10: rekeys under churn).  The key that decrypted the
    sender's last packet is tried first, so steady state costs one attempt
    per packet.
    """

    def __init__(self, outer: SrtpContext | None, ekt: EktReceiver, *,
                 replay_window: int = 128) -> None:
        self.outer = outer
        self.ekt = ekt
        #: Called with each packet whose outer layer verified, that layer off (a capture).
        self.on_outer: Callable[[bytes, float], None] | None = None
        self._replay_window = replay_window
        self._inner: dict[int, list[_InnerKey]] = {}
        self._last_good: dict[int, _InnerKey] = {}
        #: ssrc -> EKT SPI of its newest FullEKTField, when we do not hold that EKTKey
        self._unkeyed: dict[int, int] = {}

    def forget(self, ssrc: int) -> None:
        """Drop the end-to-end keys learnt for ``ssrc`` (e.g. the sender left)."""
        self._last_good.pop(ssrc, None)
        self._unkeyed.pop(ssrc, None)
        for key in self._inner.pop(ssrc, ()):
            key.context.close()

    def close(self) -> None:
        for ssrc in list(self._inner):
            self.forget(ssrc)
        if self.outer is not None:
            self.outer.close()

    def _learn(self, ssrc: int, context: SrtpContext, now: float, spi: int) -> None:
        keys = self._inner.setdefault(ssrc, [])
        for older in keys:
            if older.retire_at is None:
                older.retire_at = now + OLD_KEY_MAX
        keys.insert(0, _InnerKey(context, spi))
        if len(keys) > KEPT_KEYS:
            # Drop the oldest key but the one in use: keys announced in between and
            # superseded before they protected anything are never used.
            last = self._last_good.get(ssrc)
            victim = next(k for k in reversed(keys) if k is not last)
            victim.context.close()
            keys.remove(victim)

    def _retire(self, ssrc: int, keys: list[_InnerKey], now: float) -> None:
        kept = [k for k in keys if k.retire_at is None or now < k.retire_at]
        if len(kept) != len(keys):
            for key in keys:
                if key not in kept:
                    key.context.close()
                    if self._last_good.get(ssrc) is key:
                        del self._last_good[ssrc]
            keys[:] = kept

    def unprotect(self, packet: bytes, now: float) -> ReceivedPacket:
        """Both layers off a datagram from the MD (RFC 8723 s5.3, RFC 8870 s4.3.2).

        With :attr:`on_outer` set, it is called with the packet as it is once the
        outer layer is off and verified (see :meth:`open_recorded`) and ``now``,
        before the rest.
        """
        if self.outer is None:
            raise ValueError("a DoubleReceiver without an outer context opens records only")
        n = ekt_field_length(packet)
        end = len(packet) - n
        h = header_length(packet)
        if end - h < _MIN_DOUBLE_PAYLOAD:
            raise MalformedSrtp("too short for a double-protected payload")
        view = memoryview(packet)
        # 1. outer layer with our own hop-by-hop key
        _b0, _b1, seq, _ts, ssrc = _FIXED.unpack_from(packet)
        plaintext = self.outer.open(ssrc, seq, view[:h], view[h:end])
        if self.on_outer is not None:
            self.on_outer(packet[:h] + plaintext + packet[end:], now)
        return self._end_to_end(packet, h, end, plaintext, now)

    def open_recorded(self, record: bytes, now: float) -> ReceivedPacket:
        """The end-to-end layer off a packet whose outer layer is already off.

        ``record`` is RTP header || inner ciphertext || inner tag || OHB ||
        EKTField: what a Media Distributor holds between its two outer
        operations (:attr:`Relay.packet` + :attr:`Relay.ekt_field`, RFC 8723
        s5.2), which is what a recording of the conference keeps
        (:mod:`perc_daemons.protocol.recording`).  The EKTField teaches the
        sender's key as in :meth:`unprotect`; ``now`` is the time the packet
        was received (old-key retirement counts from it).
        """
        n = ekt_field_length(record)
        end = len(record) - n
        h = header_length(record)
        if end - h < TAG_LENGTH + 1:
            raise MalformedSrtp("too short for an inner ciphertext and an OHB")
        return self._end_to_end(record, h, end, record[h:end], now)

    def _end_to_end(self, packet: bytes, h: int, end: int, plaintext: bytes,
                    now: float) -> ReceivedPacket:
        """Steps 2-4 of :meth:`unprotect`: ``plaintext`` is the outer plaintext of
        ``packet`` (header ``packet[:h]``, EKTField ``packet[end:]``)."""
        b0, b1, seq, _ts, ssrc = _FIXED.unpack_from(packet)
        view = memoryview(packet)
        # 2. EKT (the field is not covered by either tag; see RFC 8870 s4.3.2).
        # Extension types (3-254) are framed by their length and skipped (s4.1).
        if packet[-1] == FULL_EKT_TYPE:
            try:
                learned = self.ekt.process(ssrc, view[end:], now)
            except (UnknownSpi, ExpiredEktKey) as e:
                # s4.3.2 step 2: the packet fails.  The sender announced a key under
                # an EKTKey we do not hold (yet): until one of its FullEKTFields
                # works again, its packets are "no key" here, not integrity failures.
                self._unkeyed[ssrc] = FullEktField.decode(view[end:]).spi
                if len(self._unkeyed) > _MAX_UNKEYED:
                    self._unkeyed.pop(next(iter(self._unkeyed)))
                raise e
            self._unkeyed.pop(ssrc, None)
            if learned is not None:
                context = SrtpContext(learned.master_key, learned.master_salt,
                                      replay_window=self._replay_window)
                context.set_roc(ssrc, learned.roc)
                self._learn(ssrc, context, now, learned.spi)
        keys = self._inner.get(ssrc)
        if keys and any(k.retire_at is not None and now >= k.retire_at for k in keys):
            self._retire(ssrc, keys, now)
        if not keys:
            raise UnknownSender(f"no end-to-end key for SSRC 0x{ssrc:08x} yet")
        unkeyed = self._unkeyed.get(ssrc)
        # 3. OHB back into a synthetic header (X cleared, extensions removed)
        ohb_len, o_pt, o_seq, o_marker = parse_ohb(plaintext)
        orig_seq = seq if o_seq is None else o_seq
        orig_b1 = (((b1 >> 7) if o_marker is None else o_marker) << 7) | (
            (b1 & 0x7F) if o_pt is None else o_pt)
        base = 12 + 4 * (b0 & 0x0F)
        fixed_rest = packet[4:base]
        synthetic_header = bytes((b0 & 0xEF, orig_b1)) + _SEQ.pack(orig_seq) + fixed_rest
        inner = memoryview(plaintext)[:len(plaintext) - ohb_len]
        # 4. inner layer with the sender's end-to-end key: the one that worked last,
        #    then the others, newest first
        replayed: ReplayError | None = None
        last = self._last_good.get(ssrc)
        for key in (keys if last is None or last is keys[0]
                    else [last, *(k for k in keys if k is not last)]):
            try:
                payload = key.context.open(ssrc, orig_seq, synthetic_header, inner)
                break
            except AuthenticationFailed:
                continue
            except ReplayError as e:
                replayed = e
        else:
            if replayed is not None:
                raise replayed
            if unkeyed is not None:
                raise UnknownSender(f"SSRC 0x{ssrc:08x} moved to a key announced under EKT "
                                    f"SPI {unkeyed}, whose EKTKey we do not hold")
            raise InnerAuthenticationFailed("end-to-end authentication failed")
        if key is not last:
            self._last_good[ssrc] = key
            # the sender switched to this key: the older ones go soon
            deadline = now + OLD_KEY_ACCEPT
            for older in keys[keys.index(key) + 1:]:
                if older.retire_at is None or older.retire_at > deadline:
                    older.retire_at = deadline
        original = (bytes((b0, orig_b1)) + _SEQ.pack(orig_seq) + packet[4:h] + payload)
        return ReceivedPacket(original, ssrc, b1 & 0x7F, seq, b1 >> 7, h, key.spi)
