"""The fuzz targets: seeds from the project's own encoders, and what is fed where.

See :mod:`tests.fuzz.harness` for the design.  Each ``_build_*`` function
makes valid inputs with the project's encoders (and real keys) and returns a
:class:`~tests.fuzz.harness.Bench` whose ``parse`` runs one input through the
parser and the steps a daemon takes with what it accepted.  ``_attempt``
runs one step whose own typed refusal is expected (a target that tries
several parsers on one input).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import itertools
import json
import random
import struct
import tempfile
import uuid
import zlib
from collections.abc import Callable
from contextlib import contextmanager
from hashlib import sha1
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding

from perc_daemons.devpki import DevPki
from perc_daemons.kd import offers
from perc_daemons.md.plane import MediaPlane
from perc_daemons.protocol import answer as answer_module
from perc_daemons.protocol import (
    cascade,
    double,
    ekt,
    encryption_key,
    extensions,
    feedback,
    identity,
    jose,
    jsontext,
    recording,
    roster,
    rtp,
    sdp,
    selection,
    srtp,
    stun,
    tunnel,
)
from perc_daemons.protocol.dtls import connection as dtls_connection
from perc_daemons.protocol.dtls import handshake as hs
from perc_daemons.protocol.dtls import record as dtls_record
from perc_daemons.protocol.dtls.alerts import DtlsError
from perc_daemons.protocol.dtls.connection import DtlsConfiguration, DtlsConnection, Role
from perc_daemons.protocol.dtls.crypto import generate_certificate
from perc_daemons.protocol.dtls.handshake import HandshakeType, NamedGroup
from perc_daemons.protocol.errors import ProtocolError
from tests.fuzz.harness import Bench, Seed, Target
from tests.unit.test_sdp import BROWSER_OFFER, OFFER

__all__ = ["TARGETS"]

NOW = 1_700_000_000.0
#: Media time (EKT parameter sets are installed at 0 with a one-day ttl).
MEDIA_NOW = 10.0
_FAILED = object()


def _attempt(typed: type[BaseException] | tuple[type[BaseException], ...],
             fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, or :data:`_FAILED` when it refuses with ``typed``."""
    try:
        return fn(*args, **kwargs)
    except typed:
        return _FAILED


def _crc(data: bytes) -> int:
    return zlib.crc32(data)


# -- dictionaries --------------------------------------------------------------------------

_UNICODE_TRAPS = [c.encode() for c in (
    "\u00b2", "\u0663", "\uff11", "\u00a0", "\u2028", "\u0085", "\u200b", "\ufeff", "\u1680",
    "\U0001d7ce", "\u00bd", "\u2167", "\u0130", "\u017f", "\u212a")] + [
    b"\xc0\x80", b"\xed\xa0\x80", b"\xff", b"\xf4\x90\x80\x80", b"\x00"]

_JSON_TOKENS = [
    *_UNICODE_TRAPS,
    b'"', b"{", b"}", b"[", b"]", b",", b":", b"null", b"true", b"false", b"0", b"-0", b"-1",
    b"1.5", b"1e999", b"-1e999", b"1e308", b"9" * 400, b"1" + b"0" * 5000, b"NaN", b"Infinity",
    b'"\\ud800"', b'"\\u0000"', b'"\\"', b"\\", b"[" * 70, b"[" * 2000, b'{"a":' * 70,
    b'""', b'"exp"', b'"iat"', b'"sub"', b'"aud"', b'"iss"', b'"contents"', b'"fingerprint"',
    b'"algorithm"', b'"digest"', b'"kid"', b'"typ"', b'"alg"', b'"x5c"', b'"crit"', b'"b64"',
    b'"jwk"', b'"ES256"', b'"none"', b'"HS256"', b'"idp"', b'"domain"', b'"protocol"',
    b'"assertion"', b'"members"', b'"ssrcs"', b'"identity"', b'"epoch"', b'"conference"',
    b'"keys"', b'"kty"', b'"crv"', b'"EC"', b'"P-256"', b'"x"', b'"y"', b'"d"', b'"use"',
    b'"aid"', b'"cid"', b'"offer"', b'"answer"', b'"sha-256"', b'"sha-1"', b"4294967296",
    b"9223372036854775808", b"true,", b"[]", b"{}",
]

_SDP_TOKENS = [
    *_UNICODE_TRAPS,
    b"\r\n", b"\n", b"\r", b"a=", b"m=", b"c=", b"t=", b"b=", b"i=", b"k=", b"r=", b"z=", b"u=",
    b"e=", b"p=", b"o=", b"s=", b"v=", b"x=", b"A=", b":", b" ", b"  ", b"/", b"\t", b"=",
    b"a=setup:active\r\n", b"a=setup:passive\r\n", b"a=rtcp-mux\r\n", b"a=mid:9\r\n",
    b"a=group:BUNDLE 0 1 2\r\n", b"a=fingerprint:sha-256 ", b"sha-1 ", b"md5 ", b"a=tls-id:",
    b"a=ice-lite\r\n", b"a=identity:", b"a=rtpmap:", b"a=ssrc:", b"a=extmap:",
    b"a=candidate:", b" typ ", b"m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n",
    b"m=video 0 UDP/TLS/RTP/SAVPF 96\r\n",
    b"m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n", b"UDP/TLS/RTP/SAVP", b"RTP/AVP",
    b"0", b"9", b"65535", b"65536", b"4294967295", b"4294967296", b"127", b"128", b"255",
    b"4096", b"4351", b"99999999999999999999999", b"==", b"=", b"sendonly", b"recvonly",
    b"inactive", b"actpass", b"holdconn", b"AA:", b"0:", b"a=ice-ufrag:", b"a=ice-pwd:",
    b"/sendrecv", b"/2", b"/90000", b"opus", b"*",
]


# -- RTP / RTCP ------------------------------------------------------------------------------

SSRC = 0x5EED0001


def _rtp_packets() -> list[bytes]:
    rng = random.Random(3550)
    packets = [
        bytes.fromhex("8040f17b8041f8d35501a0b2") + b"Gallia est omnis divisa in partes tres",
        rtp.RtpPacket(payload_type=96, sequence_number=1, timestamp=3000, ssrc=SSRC,
                      payload=rng.randbytes(40)).serialize(),
        rtp.RtpPacket(payload_type=111, sequence_number=0xFFFF, timestamp=0xFFFFFFFF,
                      ssrc=SSRC, marker=True, csrcs=[1, 2, 0xFFFFFFFF],
                      payload=rng.randbytes(20)).serialize(),
        rtp.RtpPacket(payload_type=96, sequence_number=7, ssrc=SSRC,
                      extensions=[(1, b"\x30"), (3, b"0"), (14, rng.randbytes(16))],
                      payload=rng.randbytes(30)).serialize(),
        rtp.RtpPacket(payload_type=96, sequence_number=8, ssrc=SSRC,
                      extensions=[(1, b""), (200, rng.randbytes(20))],
                      payload=rng.randbytes(30), padding_length=4).serialize(),
        rtp.RtpPacket(payload_type=0, sequence_number=9, ssrc=SSRC, extension_profile=0x1234,
                      extension_data=rng.randbytes(8), payload=b"x").serialize(),
        rtp.RtpPacket(payload_type=0, sequence_number=10, ssrc=SSRC, csrcs=[5],
                      extensions=[(2, b"ab")], padding_length=255,
                      payload=b"").serialize(),
    ]
    return packets


def _rtp_fields(packet: bytes) -> tuple[tuple[int, int], ...]:
    fields = [(0, 1)]
    csrc_end = 12 + 4 * (packet[0] & 0x0F)
    if packet[0] & 0x10:
        fields += [(csrc_end, 2), (csrc_end + 2, 2)]
    if packet[0] & 0x20:
        fields.append((-1, 1))
    return tuple(fields)


def _rtcp_packets() -> list[bytes]:
    block = rtp.ReportBlock(SSRC, 12, -3, 70000, 33, 0x12345678, 6553)
    sr = rtp.sender_report(SSRC, rtp.SenderInfo(0x83AA7E80_00000000, 3000, 10, 12000), [block])
    rr = rtp.receiver_report(SSRC + 1, [block, block._replace(ssrc=7)])
    sdes = rtp.RtcpPacket(rtp.SDES, struct.pack("!I", SSRC) + b"\x01\x0auser@hostX" + bytes(4),
                          count=1)
    bye = rtp.RtcpPacket(rtp.BYE, struct.pack("!I", SSRC), count=1)
    pli = rtp.RtcpPacket(rtp.PSFB, struct.pack("!II", SSRC, SSRC + 1), count=rtp.PSFB_PLI)
    nack = rtp.RtcpPacket(rtp.RTPFB, struct.pack("!IIHH", SSRC, SSRC + 1, 17, 3),
                          count=rtp.RTPFB_NACK)
    padded = rtp.RtcpPacket(rtp.APP, b"name" + b"\x00\x00\x00\x04", count=0, padding=True)
    return [
        rtp.build_compound([sr, sdes]),
        rtp.build_compound([rr, sdes, bye]),
        rtp.build_compound([rr, pli, nack]),
        rtp.build_compound([sr, padded]),
        rtp.build_compound([pli]),
    ]


def _rtcp_fields(compound: bytes) -> tuple[tuple[int, int], ...]:
    fields = []
    offset = 0
    while offset + 4 <= len(compound):
        fields += [(offset, 1), (offset + 2, 2)]
        offset += 4 + 4 * int.from_bytes(compound[offset + 2:offset + 4], "big")
    return tuple(fields)


def _build_rtp() -> Bench:
    seeds = [Seed(p, _rtp_fields(p)) for p in _rtp_packets()]
    seeds += [Seed(c, _rtcp_fields(c)) for c in _rtcp_packets()]
    typed = (rtp.RtpError, rtp.RtcpError)

    def parse(data: bytes) -> bool:
        accepted = False
        if data:
            rtp.classify_first_byte(data[0])
        _attempt(typed, rtp.header_info, data)
        _attempt(typed, rtp.parse_fixed_header, data)
        if rtp.is_rtcp(data):
            for strict in (True, False):
                packets = _attempt(typed, rtp.parse_compound, data, strict)
                if packets is _FAILED:
                    continue
                accepted = True
                for packet in packets:
                    _ = packet.ssrc, packet.padding_length
                    if packet.packet_type == rtp.SR:
                        rtp.parse_sender_info(packet)
                    if packet.packet_type in (rtp.SR, rtp.RR):
                        rtp.parse_report_blocks(packet)
                assert rtp.build_compound(packets) == data, "RTCP does not re-encode"
        packet = _attempt(typed, rtp.RtpPacket.parse, data)
        if packet is not _FAILED:
            accepted = True
            assert packet.serialize() == data, "serialize(parse(x)) != x"
            assert rtp.RtpPacket.parse(packet.serialize()) == packet
            _attempt(typed, rtp.replace_extensions, data, [(1, b"\x07")])
            rtp.replace_extensions(data, None)
        return accepted

    return Bench(seeds, parse, max_size=2048)


# -- RTP header extension values and RTCP feedback (the SFU's reads) ----------------------

def _extension_packets() -> list[bytes]:
    rng = random.Random(8285)
    marks = extensions.encode_frame_marks(start=True, end=False, independent=True)
    scalable = extensions.encode_frame_marks(start=False, end=True, independent=False,
                                             base_layer=True, tid=2, lid=1, tl0picidx=200)
    level = extensions.encode_audio_level(30, True)
    packets = [
        rtp.RtpPacket(payload_type=111, sequence_number=1, ssrc=SSRC,
                      extensions=[(1, level), (2, extensions.encode_stream_id("0"))],
                      payload=rng.randbytes(20)).serialize(),
        rtp.RtpPacket(payload_type=96, sequence_number=2, ssrc=SSRC, marker=True,
                      extensions=[(2, b"1"), (3, extensions.encode_stream_id("h")), (5, marks)],
                      payload=rng.randbytes(40)).serialize(),
        rtp.RtpPacket(payload_type=96, sequence_number=3, ssrc=SSRC, csrcs=[7],
                      extensions=[(5, scalable), (3, b"m" * 20), (1, level + b"\x00")],
                      payload=rng.randbytes(30), padding_length=4).serialize(),
        rtp.RtpPacket(payload_type=0, sequence_number=4, ssrc=SSRC, extension_profile=0x1234,
                      extension_data=rng.randbytes(8), payload=b"x").serialize(),
    ]
    return [*packets, *_rtp_packets()[:2]]


_RTP_EXTENSION_DECODERS: dict[int, Callable[[bytes], Any]] = {
    1: extensions.audio_level, 2: extensions.media_id, 3: extensions.stream_id,
    4: extensions.stream_id, 5: extensions.frame_marks}


def _build_extensions() -> Bench:
    seeds = [Seed(p, _rtp_fields(p)) for p in _extension_packets()]
    typed = (extensions.ExtensionError,)

    def parse(data: bytes) -> bool:
        """find_extension for each id the reference endpoint offers (and some it does
        not), each value through its decoder, then add_extensions and a re-read."""
        found = {}
        for ident in (1, 2, 3, 4, 5, 14, 15, 200):
            value = _attempt(typed, extensions.find_extension, data, ident)
            if value is _FAILED:
                return False
            if value is not None:
                found[ident] = value
                decode = _RTP_EXTENSION_DECODERS.get(ident)
                if decode is not None:
                    _attempt(typed, decode, value)
                if ident == 5:
                    _attempt(typed, extensions.is_keyframe_start, value)
        edit = [(2, b"9"), (7, bytes((len(data) & 0xFF,)))]
        out = _attempt(typed, extensions.add_extensions, data, edit)
        if out is not _FAILED:
            for ident, value in edit:
                assert extensions.find_extension(out, ident) == value, "add_extensions lost"
            assert out[len(out) - (len(data) - rtp.header_length(data)):] == \
                data[rtp.header_length(data):], "add_extensions changed the payload"
        return True

    return Bench(seeds, parse, max_size=2048)


def _feedback_packets() -> list[bytes]:
    sr = rtp.sender_report(SSRC, rtp.SenderInfo(0x83AA7E80_00000000, 3000, 10, 12000),
                           [rtp.ReportBlock(SSRC + 1, 12, -3, 70000, 33, 0x12345678, 6553)])
    nack = feedback.build_nack(SSRC, SSRC + 1, [0xFFFE, 0xFFFF, 0, 1, 20, 21, 40])
    pli = feedback.build_pli(SSRC, SSRC + 1)
    fir = feedback.build_fir(SSRC, [(SSRC + 1, 3), (SSRC + 2, 255)])
    remb = feedback.build_remb(SSRC, 522022, [SSRC + 1, SSRC + 2])
    hint = feedback.build_speaker_hint(SSRC, feedback.SpeakerHint(9, (SSRC + 1, SSRC + 2)))
    padded = rtp.RtcpPacket(rtp.PSFB, pli.body + b"\x00\x00\x00\x04", count=rtp.PSFB_PLI,
                            padding=True)
    return [
        rtp.build_compound([sr, nack, pli]),
        rtp.build_compound([rtp.receiver_report(SSRC), fir, remb]),
        rtp.build_compound([hint]),
        rtp.build_compound([remb, padded]),
    ]


def _build_feedback() -> Bench:
    seeds = [Seed(c, _rtcp_fields(c)) for c in _feedback_packets()]
    typed = (feedback.FeedbackError, rtp.RtcpError)

    def parse(data: bytes) -> bool:
        """Reduced-size compounds split, then each packet through parse_feedback,
        parse_speaker_hint and strip_report_blocks; what parses is rebuilt and must
        parse to the same thing."""
        packets = _attempt(typed, rtp.parse_compound, data, False)
        if packets is _FAILED:
            return False
        for packet in packets:
            fb = _attempt(typed, feedback.parse_feedback, packet)
            if isinstance(fb, feedback.Feedback):
                if fb.kind == "nack":
                    again = feedback.build_nack(fb.sender_ssrc, fb.media_ssrcs[0], fb.seqs)
                    assert set(feedback.parse_feedback(again).seqs) == set(fb.seqs), "nack"
                elif fb.kind == "pli":
                    again = feedback.build_pli(fb.sender_ssrc, fb.media_ssrcs[0])
                    assert feedback.parse_feedback(again) == fb, "pli"
                elif fb.kind == "fir":
                    again = feedback.build_fir(fb.sender_ssrc, list(zip(fb.media_ssrcs,
                                                                        fb.seqs, strict=True)))
                    assert feedback.parse_feedback(again) == fb, "fir"
                else:
                    again = feedback.build_remb(fb.sender_ssrc, fb.bitrate, fb.media_ssrcs)
                    assert feedback.parse_feedback(again) == fb, "remb"
            hint = _attempt(typed, feedback.parse_speaker_hint, packet)
            if isinstance(hint, feedback.SpeakerHint):
                rebuilt = feedback.build_speaker_hint(packet.ssrc or 0, hint)
                assert feedback.parse_speaker_hint(rebuilt) == hint, "speaker hint"
            if packet.packet_type in (rtp.SR, rtp.RR):
                stripped = feedback.strip_report_blocks(packet)
                assert rtp.parse_compound(stripped.serialize(), False)[0].count == 0
        return True

    return Bench(seeds, parse, max_size=2048)


def _build_announcement() -> Bench:
    entries = [selection.StreamEntry(1, SSRC, "audio", 1, None, None, None),
               selection.StreamEntry(1, SSRC + 1, "video", None, 5, 720, "h"),
               selection.StreamEntry(2, SSRC + 2, "video", None, 5, None, "low-1_x")]
    seeds = [Seed(rtp.build_compound([p]), _rtcp_fields(rtp.build_compound([p])))
             for p in (*selection.build_announcements(SSRC, 3, entries),
                       *selection.build_announcements(SSRC, 4, []))]
    typed = (selection.SelectionError, rtp.RtcpError)

    def parse(data: bytes) -> bool:
        """A peer MD's stream announcement (APP "PERC" subtype 2): what parses is
        rebuilt and parses to the same entries."""
        packets = _attempt(typed, rtp.parse_compound, data, False)
        if packets is _FAILED:
            return False
        for packet in packets:
            found = _attempt(typed, selection.parse_announcement, packet)
            if isinstance(found, selection.Announcement):
                [again] = selection.build_announcements(0, found.generation,
                                                        list(found.entries))
                assert selection.parse_announcement(again).entries == found.entries
        return True

    return Bench(seeds, parse, max_size=2048)


def _build_capture() -> Bench:
    writer = recording.CaptureWriter("weekly-sync")
    packets = [bytes(range(40)), b"\x80" * 300, bytes(1200)]
    data = writer.header() + b"".join(writer.record(1.5 + i, p) for i, p in enumerate(packets))
    seeds = [Seed(data), Seed(writer.header())]
    typed = (recording.CaptureError,)

    def parse(data: bytes) -> bool:
        """A capture file (the late joiner's --history): what parses is written again
        byte for byte, and the SPIs of its records are read without error."""
        capture = _attempt(typed, recording.parse_capture, data)
        if not isinstance(capture, recording.Capture):
            return False
        again = recording.CaptureWriter(capture.conference_id)
        rebuilt = again.header() + b"".join(again.record(t, r) for t, r in capture.records)
        assert recording.parse_capture(rebuilt) == capture, "capture round trip"
        recording.capture_spis(capture.records)
        return True

    return Bench(seeds, parse, max_size=4096)


# -- SRTP -----------------------------------------------------------------------------------

_KEY16 = bytes(range(16))
_SALT12 = bytes(range(100, 112))


def _build_srtp() -> Bench:
    sender = srtp.SrtpContext(_KEY16, _SALT12)
    seeds = []
    for packet in _rtp_packets():
        protected = sender.protect(packet)
        seeds.append(Seed(protected, _rtp_fields(protected)))
    for compound in _rtcp_packets():
        for encrypt in (True, False):
            protected = sender.protect_rtcp(compound, encrypt=encrypt)
            seeds.append(Seed(protected, (*_rtcp_fields(compound)[:2], (-4, 4), (-4, 1))))
    receiver = srtp.SrtpContext(_KEY16, _SALT12)

    def parse(data: bytes) -> bool:
        if rtp.is_rtcp(data):
            return bool(receiver.unprotect_rtcp(data))
        return bool(receiver.unprotect(data))

    return Bench(seeds, parse, max_size=2048)


# -- the double transform (RFC 8723) ---------------------------------------------------------

_OUTER_KEY = bytes(range(32, 48))
_OUTER_SALT = bytes(range(48, 60))
_EKT_PARAMS = ekt.EktParameterSet(key=bytes(range(60, 76)), cipher=ekt.EktCipher.AESKW_128,
                                  master_salt=bytes(range(76, 88)), spi=7, ttl=86400)
_EKT_PARAMS_256 = ekt.EktParameterSet(key=bytes(range(90, 122)),
                                      cipher=ekt.EktCipher.AESKW_256,
                                      master_salt=bytes(range(76, 90)), spi=8, ttl=86400)


def _double_wire_packets() -> list[bytes]:
    """Double-protected packets with their EKTFields, as a DoubleSender sends them."""
    rng = random.Random(8723)
    sender = double.DoubleSender(
        srtp.SrtpContext(_OUTER_KEY, _OUTER_SALT),
        ekt.EktSender(SSRC, 16, _EKT_PARAMS, 0.0, random_bytes=rng.randbytes))
    out = []
    for i in range(8):
        packet = rtp.RtpPacket(payload_type=96 + (i % 2), sequence_number=100 + i,
                               timestamp=3000 * i, ssrc=SSRC, marker=i == 3,
                               csrcs=[9] if i == 5 else None,
                               extensions=[(1, b"\x10"), (2, rng.randbytes(3))] if i % 3 else None,
                               payload=rng.randbytes(20 + i)).serialize()
        out.append(sender.protect(packet, i * 0.05, keyframe=i == 6))
    return out


def _ekt_fields(data: bytes) -> tuple[tuple[int, int], ...]:
    if data and data[-1] == ekt.FULL_EKT_TYPE:
        return ((-3, 2), (-5, 2), (-7, 2), (-1, 1))
    return ((-1, 1),)


def _new_receiver() -> double.DoubleReceiver:
    receiver_ekt = ekt.EktReceiver(16)
    receiver_ekt.add_parameter_set(_EKT_PARAMS, 0.0)
    return double.DoubleReceiver(srtp.SrtpContext(_OUTER_KEY, _OUTER_SALT), receiver_ekt)


_RELAY_EDITS: list[dict[str, Any]] = [
    {}, {"seq": 4242}, {"pt": 111}, {"marker": 1}, {"pt": 0, "seq": 1, "marker": 0},
    {"extensions": [(1, b"\x07")]}, {"extensions": []},
    {"seq": 99, "extensions": [(5, b"x" * 20)]},
]


def _relay(data: bytes, inbound: Any) -> bool:
    """What the MD does with one packet: outer off, an edit, outer on (RFC 8723 s5.2)."""
    relay = double.Relay()
    if _attempt(ProtocolError, relay.open, data, inbound) is _FAILED:
        return False
    packet = relay.packet
    relay.edit(**_RELAY_EDITS[_crc(data) % len(_RELAY_EDITS)])
    relay.seal(srtp.libsrtp_session(_KEY16, _SALT12, inbound=False))  # no replay state
    relay.packet = packet
    relay.edit(seq=((packet[2] << 8) | packet[3]) ^ 0x55)  # the MD's renumbering fast path
    relay.seal(srtp.libsrtp_session(_KEY16, _SALT12, inbound=False))
    return True


def _build_double() -> Bench:
    seeds = [Seed(p, _ekt_fields(p) + _rtp_fields(p)[:3]) for p in _double_wire_packets()]
    receiver = _new_receiver()
    inbound = srtp.libsrtp_session(_OUTER_KEY, _OUTER_SALT, inbound=True)

    def parse(data: bytes) -> bool:
        accepted = _attempt(ProtocolError, receiver.unprotect, data, MEDIA_NOW) is not _FAILED
        return _relay(data, inbound) or accepted

    return Bench(seeds, parse, max_size=2048)


def _build_double_plain() -> Bench:
    """Mutate the outer plaintext (header, inner ciphertext, OHB, EKTField); re-seal outer."""
    opener = srtp.SrtpContext(_OUTER_KEY, _OUTER_SALT)
    seeds = []
    for wire in _double_wire_packets():
        n = ekt.ekt_field_length(wire)
        h, seq, ssrc = rtp.header_info(wire)
        end = len(wire) - n
        plain = wire[:h] + opener.open(ssrc, seq, wire[:h], wire[h:end]) + wire[end:]
        seeds.append(Seed(plain, ((-(n + 1), 1), *_ekt_fields(plain), *_rtp_fields(plain)[:3])))
    receiver = _new_receiver()
    for wire in _double_wire_packets():  # learn the sender's inner key
        receiver.unprotect(wire, 1.0)

    def seal(data: bytes) -> bytes:
        n = _attempt(ProtocolError, ekt.ekt_field_length, data)
        if n is _FAILED:
            return data
        packet, field = data[:len(data) - n], data[len(data) - n:]
        info = _attempt(ProtocolError, rtp.header_info, packet)
        if info is _FAILED:
            return data
        h, seq, ssrc = info
        sealer = srtp.SrtpContext(_OUTER_KEY, _OUTER_SALT)
        return packet[:h] + sealer.seal(ssrc, seq, packet[:h], packet[h:]) + field

    def parse(data: bytes) -> bool:
        wire = seal(data)
        receiver.outer = srtp.SrtpContext(_OUTER_KEY, _OUTER_SALT)  # no outer replay state
        accepted = _attempt(ProtocolError, receiver.unprotect, wire, MEDIA_NOW) is not _FAILED
        for ssrc in list(receiver._inner):  # keep the learnt keys, not their replay state
            for key in receiver._inner[ssrc]:
                key.context._streams.clear()
        inbound = srtp.libsrtp_session(_OUTER_KEY, _OUTER_SALT, inbound=True)
        return _relay(wire, inbound) or accepted

    return Bench(seeds, parse, max_size=2048)


# -- EKT ---------------------------------------------------------------------------------------

def _ekt_packets() -> list[bytes]:
    rng = random.Random(8870)
    sender = ekt.EktSender(SSRC, 16, _EKT_PARAMS, 0.0, random_bytes=rng.randbytes)
    header = rtp.RtpPacket(payload_type=96, ssrc=SSRC).serialize() + rng.randbytes(20)
    fields = [sender.next_packet(0.0, 0)[1], sender.next_packet(0.01, 5)[1]]
    sender.new_master_key(1.0)
    fields.append(sender.next_packet(1.0, 0xFFFFFFFF)[1])
    fields.append(ekt.SHORT_EKT_FIELD)
    fields.append(b"ext-data" + struct.pack("!HB", 8 + 3, 3))  # an ExtensionEKTField
    return [header + f for f in fields]


def _build_ekt() -> Bench:
    seeds = [Seed(p, _ekt_fields(p)) for p in _ekt_packets()]
    receiver = ekt.EktReceiver(16)
    receiver.add_parameter_set(_EKT_PARAMS, 0.0)

    def parse(data: bytes) -> bool:
        n = ekt.ekt_field_length(data)
        field = data[len(data) - n:]
        if field[-1] == ekt.FULL_EKT_TYPE:
            full = _attempt(ekt.EktError, ekt.FullEktField.decode, field)
            if full is not _FAILED:
                assert full.encode() == field, "FullEktField does not re-encode"
        receiver.process(SSRC, memoryview(field), MEDIA_NOW)
        return True

    return Bench(seeds, parse, max_size=1400)


def _build_ekt_plaintext() -> Bench:
    """Mutate the EKTPlaintext, wrap it with the EKTKey (AES-KW), have a receiver learn it."""
    rng = random.Random(4)
    seeds = [Seed(ekt.EktPlaintext(rng.randbytes(n), SSRC, roc).encode(), ((0, 1), (-8, 4)))
             for n, roc in ((16, 0), (32, 7), (1, 0xFFFFFFFF), (242, 1))]

    def parse(data: bytes) -> bool:
        plain = _attempt(ekt.EktError, ekt.EktPlaintext.decode, data)
        if plain is not _FAILED:
            assert plain.encode() == data, "EKTPlaintext does not re-encode"
        if not data or len(data) > 240:
            return plain is not _FAILED
        key_length, params = (16, _EKT_PARAMS) if _crc(data) & 4 else (32, _EKT_PARAMS_256)
        field = ekt.FullEktField(aes_key_wrap_with_padding(params.key, data), params.spi,
                                 _crc(data) % 3).encode()
        receiver = ekt.EktReceiver(key_length)
        receiver.add_parameter_set(params, 0.0)
        return receiver.process(SSRC, field, MEDIA_NOW) is not None

    return Bench(seeds, parse, max_size=512)


def _build_ekt_key() -> Bench:
    rng = random.Random(5)
    seeds = []
    for cipher, salt_length, spi, ttl in ((ekt.EktCipher.AESKW_128, 12, 1, 3600),
                                          (ekt.EktCipher.AESKW_256, 14, 0xFFFF, 0xFFFFFF),
                                          (ekt.EktCipher.AESKW_128, 256, 0, 0),
                                          (ekt.EktCipher.AESKW_256, 1, 9, 1)):
        params = ekt.EktParameterSet(key=rng.randbytes(cipher.key_length), cipher=cipher,
                                     master_salt=rng.randbytes(salt_length), spi=spi, ttl=ttl)
        body = ekt.encode_ekt_key(params)
        seeds.append(Seed(body, ((0, 2), (2 + cipher.key_length, 2))))

    def parse(data: bytes) -> bool:
        accepted = False
        for cipher in ekt.EktCipher:
            params = _attempt(ekt.EktError, ekt.decode_ekt_key, data, cipher)
            if params is not _FAILED:
                assert ekt.encode_ekt_key(params) == data, "EKTKey does not re-encode"
                repr(params)
                accepted = True
        return accepted

    return Bench(seeds, parse, max_size=1024)


# -- the RFC 9185 tunnel -----------------------------------------------------------------------

def _tunnel_messages() -> list[Any]:
    rng = random.Random(9185)

    def aid() -> bytes:
        return uuid.UUID(bytes=rng.randbytes(16), version=4).bytes

    return [
        tunnel.SupportedProfiles((tunnel.DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM,
                                  tunnel.SRTP_AEAD_AES_128_GCM)),
        tunnel.UnsupportedVersion(0),
        tunnel.MediaKeys(aid(), tunnel.DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM, b"",
                         rng.randbytes(16), rng.randbytes(16), rng.randbytes(12),
                         rng.randbytes(12)),
        tunnel.MediaKeys(aid(), 0x0008, b"\x01\x02", rng.randbytes(32), rng.randbytes(32),
                         rng.randbytes(12), rng.randbytes(12)),
        tunnel.TunneledDtls(aid(), rng.randbytes(60)),
        tunnel.EndpointDisconnect(aid()),
        tunnel.SignAnswer(aid(), "conf-1", "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\n",
                          "v=0\r\ns=\u00e9\r\n"),
        tunnel.SignAnswerAck(aid(), tunnel.SIGN_STATUS_OK, "v=0\r\n"),
        tunnel.SignAnswerAck(aid(), tunnel.SIGN_STATUS_REFUSED, ""),
        tunnel.Associations(((aid(), "conf-1"), (aid(), "\u00e9t\u00e9"))),
        tunnel.Associations(()),
        tunnel.ConferenceEnded("conf-1"),
        tunnel.ConferenceEnded("\u00e9t\u00e9"),
    ]


def _tunnel_fields(frame: bytes) -> list[tuple[int, int]]:
    fields = [(0, 1), (1, 2)]
    msg_type = frame[0]
    if msg_type == tunnel.MessageType.SUPPORTED_PROFILES:
        fields.append((4, 2))
    elif msg_type == tunnel.MessageType.MEDIA_KEYS:
        offset = 3 + 16 + 2
        while offset < len(frame):
            fields.append((offset, 1))
            offset += 1 + frame[offset]
    elif msg_type == tunnel.MessageType.TUNNELED_DTLS:
        fields.append((19, 2))
    elif msg_type == tunnel.MessageType.SIGN_ANSWER:
        fields += [(19, 2), (21 + int.from_bytes(frame[19:21], "big"), 2)]
    elif msg_type == tunnel.MessageType.SIGN_ANSWER_ACK:
        fields += [(19, 2), (21, 2)]
    elif msg_type == tunnel.MessageType.ASSOCIATIONS:
        fields += [(3, 2), (21, 1)]
    elif msg_type == tunnel.MessageType.CONFERENCE_ENDED:
        fields.append((3, 1))
    return fields


def _build_tunnel() -> Bench:
    frames = [m.encode() for m in _tunnel_messages()]
    seeds = [Seed(f, tuple(_tunnel_fields(f))) for f in frames]
    stream = b"".join(frames)
    fields: list[tuple[int, int]] = []
    offset = 0
    for frame in frames:
        fields += [(offset + o, s) for o, s in _tunnel_fields(frame)]
        offset += len(frame)
    seeds.append(Seed(stream, tuple(fields)))

    def parse(data: bytes) -> bool:
        decoder = tunnel.TunnelDecoder()
        crc = _crc(data)
        cuts = sorted({0, len(data), crc % (len(data) + 1), (crc >> 16) % (len(data) + 1)})
        messages = []
        for start, end in itertools.pairwise(cuts):
            messages += decoder.feed(data[start:end])
        for message in messages:
            repr(message)
        if decoder.buffered == 0:
            assert b"".join(m.encode() for m in messages) == data, "frames do not re-encode"
        return bool(messages)

    return Bench(seeds, parse, max_size=8192)


# -- STUN --------------------------------------------------------------------------------------

_UFRAG, _PWD = "mdUf", "mdPasswordmdPassword+/"
_SOURCE = ("192.0.2.1", 40000)


def _stun_messages() -> list[bytes]:
    rng = random.Random(8489)
    tid = rng.randbytes(12)
    key = _PWD.encode()
    request = [(stun.ATTR_USERNAME, f"{_UFRAG}:epUf".encode()),
               (stun.ATTR_PRIORITY, struct.pack("!I", 0x6E7F1EFF)),
               (stun.ATTR_ICE_CONTROLLING, rng.randbytes(8)),
               (stun.ATTR_USE_CANDIDATE, b"")]
    return [
        stun.StunMessage(stun.BINDING_REQUEST, tid, request).encode(integrity_key=key),
        stun.StunMessage(stun.BINDING_REQUEST, tid, [*request, (stun.ATTR_SOFTWARE, b"x" * 5),
                                                     (0x0003, b"\x00\x00\x00\x00")]
                         ).encode(integrity_key=key, pad_byte=0xAA),
        stun.StunMessage(stun.BINDING_REQUEST, tid, request[:1]).encode(),
        stun.StunMessage(stun.BINDING_REQUEST, tid, request).encode(integrity_key=key,
                                                                    fingerprint=False),
        stun.binding_success(stun.StunMessage(stun.BINDING_REQUEST, tid), _SOURCE, key),
        stun.binding_success(stun.StunMessage(stun.BINDING_REQUEST, tid), ("2001:db8::1", 5),
                             None),
        stun.binding_error(stun.StunMessage(stun.BINDING_REQUEST, tid), 420, "Unknown",
                           key, unknown=[0x0003, 0x0004]),
        stun.StunMessage(stun.BINDING_INDICATION, tid).encode(),
    ]


def _stun_fields(message: bytes) -> tuple[tuple[int, int], ...]:
    fields = [(2, 2), (0, 2)]
    offset = stun.HEADER_LENGTH
    while offset + 4 <= len(message):
        fields += [(offset, 2), (offset + 2, 2)]
        offset += 4 + ((int.from_bytes(message[offset + 2:offset + 4], "big") + 3) & ~3)
    return tuple(fields)


def _stun_parse(data: bytes) -> bool:
    key = _PWD.encode()
    stun.is_stun(data)
    stun.check_integrity(data, key)
    stun.check_fingerprint(data)
    message = _attempt(stun.StunError, stun.StunMessage.parse, data)
    if message is not _FAILED:
        _ = message.method, message.message_class
        decoders: dict[int, Callable[[bytes], Any]] = {
            stun.ATTR_XOR_MAPPED_ADDRESS: lambda v: stun.decode_xor_mapped_address(
                v, message.transaction_id),
            stun.ATTR_ERROR_CODE: stun.decode_error_code,
            stun.ATTR_UNKNOWN_ATTRIBUTES: stun.decode_unknown_attributes,
            stun.ATTR_USERNAME: stun.parse_username,
        }
        for attr_type, value in message.attributes:
            decode = decoders.get(attr_type)
            if decode is not None:
                _attempt(stun.StunError, decode, value)
    answer = stun.answer_binding_request(data, local_ufrag=_UFRAG, local_pwd=_PWD,
                                         source=_SOURCE)
    if answer is not None:
        stun.StunMessage.parse(answer)
        assert stun.check_fingerprint(answer), "our answer's FINGERPRINT does not verify"
    return True


def _build_stun() -> Bench:
    return Bench([Seed(m, _stun_fields(m)) for m in _stun_messages()], _stun_parse,
                 max_size=1500)


def _stun_fixup(data: bytes) -> bytes:
    """The message length, MESSAGE-INTEGRITY and FINGERPRINT made right again."""
    if len(data) < stun.HEADER_LENGTH:
        return data
    out = bytearray(data)
    out += bytes(-len(out) % 4)
    integrity = fingerprint = None
    offset = stun.HEADER_LENGTH
    while offset + 4 <= len(out):
        attr_type, length = struct.unpack_from("!HH", out, offset)
        if attr_type == stun.ATTR_MESSAGE_INTEGRITY and length == 20 and integrity is None:
            integrity = offset
        elif attr_type == stun.ATTR_FINGERPRINT and length == 4 and fingerprint is None:
            fingerprint = offset
        offset += 4 + ((length + 3) & ~3)
    if integrity is not None and integrity + 24 <= len(out):
        struct.pack_into("!H", out, 2, integrity + 24 - stun.HEADER_LENGTH)
        mac = hmac.new(_PWD.encode(), bytes(out[:integrity]), sha1).digest()
        out[integrity + 4:integrity + 24] = mac
    if fingerprint is not None and fingerprint + 8 <= len(out):
        struct.pack_into("!H", out, 2, fingerprint + 8 - stun.HEADER_LENGTH)
        crc = (zlib.crc32(bytes(out[:fingerprint])) ^ stun.FINGERPRINT_XOR) & 0xFFFFFFFF
        struct.pack_into("!I", out, fingerprint + 4, crc)
    struct.pack_into("!H", out, 2, (len(out) - stun.HEADER_LENGTH) & 0xFFFF)
    return bytes(out)


def _build_stun_signed() -> Bench:
    return Bench([Seed(m, _stun_fields(m)) for m in _stun_messages()],
                 lambda data: _stun_parse(_stun_fixup(data)), max_size=1500)


# -- SDP -----------------------------------------------------------------------------------------

_KD_FINGERPRINT = hashlib.sha256(b"kd certificate").digest()
_KD_TLS_ID = "KD-tls-id_0123456789+/"
_CANDIDATE = "1 1 udp 2130706431 127.0.0.1 40000 typ host"


def _make_answer(offer: sdp.SessionDescription) -> sdp.SessionDescription:
    return sdp.make_answer(offer, fingerprint=_KD_FINGERPRINT, tls_id="a" * 20,
                           ice_ufrag=_UFRAG, ice_pwd=_PWD, candidates=[_CANDIDATE])


def _build_sdp() -> Bench:
    answer = _make_answer(sdp.parse(OFFER)).serialize()
    texts = [OFFER, BROWSER_OFFER, OFFER.replace("\r\n", "\n"), answer,
             OFFER.replace("a=setup:actpass", "a=setup:active", 1)]
    seeds = [Seed(t.encode()) for t in texts]

    def parse(data: bytes) -> bool:
        description = sdp.parse(data)
        text = description.serialize()
        assert sdp.parse(text) == description, "parse(serialize(x)) != x"
        typed = sdp.SdpError
        _ = description.timing, description.ice_lite, description.identity
        description.groups()
        _ = description.bundle
        description.fingerprints()
        for media in description.media:
            sdp.unrelayable(media)
            media.fingerprints()
            _ = (media.setup, media.ice_ufrag, media.ice_pwd, media.tls_id, media.mid,
                 media.rtcp_mux, media.direction, media.connection)
            media.extmaps()
            media.candidates()
            media.rtpmaps()
            media.ssrcs()
            description.fingerprints_for(media)
            description.setup_for(media)
        draft = _attempt(typed, _make_answer, description)
        if draft is not _FAILED:
            draft_text = draft.serialize()
            assert sdp.parse(draft_text) == draft, "the answer does not parse back"
            _attempt(offers.OfferRejected, offers.finish_answer, draft_text, text,
                     kd_fingerprint=_KD_FINGERPRINT, kd_tls_id=_KD_TLS_ID)
        _attempt(offers.OfferRejected, offers.inspect_offer, text)
        return True

    return Bench(seeds, parse, dictionary=_SDP_TOKENS, max_size=8192)


# -- JOSE: identity assertions, rosters, JWKS --------------------------------------------------

_IDP = "idp.example"
_AUDIENCE = "conf-1"
_DTLS_FINGERPRINT = hashlib.sha256(b"endpoint certificate").digest()
_ISSUER = "https://kmf.example"


class _Jose:
    """An IdP/KMF key, its JWKS, and compact-JWS signing of arbitrary header and payload."""

    def __init__(self) -> None:
        self.kid = "key-1"
        self.key = ec.derive_private_key(0x5EED, ec.SECP256R1())
        other = ec.derive_private_key(0xD0C, ec.SECP256R1())
        self.jwks = {"keys": [
            {**jose.public_jwk(self.key.public_key()), "kid": self.kid, "use": "sig",
             "alg": "ES256"},
            {**jose.public_jwk(other.public_key()), "kid": "key-0"},
            {"kty": "RSA", "kid": "rsa", "n": "AQAB", "e": "AQAB"},
        ]}
        self.keys = jose.parse_jwks(self.jwks)
        self.verifier = identity.JwksIdentityVerifier(_IDP, self.jwks)

    def token(self, header: bytes, payload: bytes) -> str:
        signing_input = (jose.b64url_encode(header) + "." + jose.b64url_encode(payload))
        r, s = decode_dss_signature(self.key.sign(signing_input.encode(),
                                                  ec.ECDSA(hashes.SHA256())))
        return signing_input + "." + jose.b64url_encode(r.to_bytes(32, "big")
                                                        + s.to_bytes(32, "big"))

    def assertions(self) -> list[str]:
        out = []
        for fingerprints, user in (([_DTLS_FINGERPRINT], "alice"),
                                   ([b"\x01" * 32, _DTLS_FINGERPRINT], "b%40b")):
            out.append(identity.create_assertion(
                (self.kid, self.key), idp_domain=_IDP, identity=f"{user}@{_IDP}",
                fingerprints=fingerprints, audience=_AUDIENCE, now=NOW))
        return out

    def rosters(self) -> list[str]:
        return [roster.sign_roster((self.kid, self.key), issuer=_ISSUER,
                                   conference_id=_AUDIENCE, epoch=epoch, members=members,
                                   now=NOW)
                for epoch, members in ((3, [("alice@idp.example", [1, 2]),
                                            ("bob@idp.example", [0xFFFFFFFF])]),
                                       (0, []))]


def _split_token(token: str) -> tuple[bytes, bytes]:
    header, payload, _signature = token.split(".")
    return jose.b64url_decode(header), jose.b64url_decode(payload)


def _verify_assertion(j: _Jose, data: bytes | str) -> str:
    return j.verifier.verify(data, _AUDIENCE, _DTLS_FINGERPRINT, NOW)


def _build_identity() -> Bench:
    j = _Jose()
    seeds = [Seed(a.encode()) for a in j.assertions()]

    def parse(data: bytes) -> bool:
        _attempt(identity.IdentityError, identity.decode_sdp_identity, data)
        text = _attempt(UnicodeDecodeError, data.decode, "utf-8")
        if text is not _FAILED:
            _attempt(offers.OfferRejected, offers._unverified_jws, text)
        return bool(_verify_assertion(j, data))

    return Bench(seeds, parse, dictionary=_JSON_TOKENS, max_size=4096)


def _build_identity_claims() -> Bench:
    """Mutate the assertion's claims; sign them with the IdP's key."""
    j = _Jose()
    outer = json.loads(j.assertions()[0])
    header, _ = _split_token(outer["assertion"])
    seeds = [Seed(_split_token(json.loads(a)["assertion"])[1]) for a in j.assertions()]

    def parse(data: bytes) -> bool:
        assertion = json.dumps({"idp": outer["idp"], "assertion": j.token(header, data)})
        return bool(_verify_assertion(j, assertion))

    return Bench(seeds, parse, dictionary=_JSON_TOKENS, max_size=4096)


def _build_jose_header() -> Bench:
    """Mutate the JWS protected header; sign it with the IdP's key."""
    j = _Jose()
    header, payload = _split_token(json.loads(j.assertions()[0])["assertion"])
    roster_header, roster_payload = _split_token(j.rosters()[0])
    seeds = [Seed(header), Seed(roster_header)]
    idp = json.loads(j.assertions()[0])["idp"]

    def parse(data: bytes) -> bool:
        accepted = _attempt(jwt.PyJWTError, jose.decode_es256, j.token(data, roster_payload),
                            j.keys, typ=roster.ROSTER_TYP) is not _FAILED
        assertion = json.dumps({"idp": idp, "assertion": j.token(data, payload)})
        return _attempt(identity.IdentityError, _verify_assertion, j, assertion) is not _FAILED \
            or accepted

    return Bench(seeds, parse, dictionary=_JSON_TOKENS, max_size=4096)


def _build_jose_token() -> Bench:
    """Mutate compact JWS text (signatures mostly fail: the parsing before them is the point)."""
    j = _Jose()
    tokens = [json.loads(a)["assertion"] for a in j.assertions()] + j.rosters()
    seeds = [Seed(t.encode()) for t in tokens]
    tokens_alphabet = [b".", b"=", b"-", b"_", b"+", b"/", b"eyJ", b"e30", b"W10", b"..",
                       jose.b64url_encode(b'{"alg":"ES256","kid":"key-1","typ":"x"}').encode(),
                       jose.b64url_encode(b"[" * 1500).encode(),
                       jose.b64url_encode(b'{"alg":"none"}').encode()]

    def parse(data: bytes) -> bool:
        text = data.decode("latin-1")
        for part in text.split("."):
            raw = _attempt(ValueError, jose.b64url_decode, part)
            if raw is not _FAILED:
                _attempt(ValueError, jose.strict_json_loads, raw)
        accepted = False
        for typ in (identity.IDENTITY_TYP, roster.ROSTER_TYP):
            if _attempt(jwt.PyJWTError, jose.decode_es256, data, j.keys, typ=typ,
                        audience=_AUDIENCE if typ == identity.IDENTITY_TYP else None,
                        required=("iat",)) is not _FAILED:
                accepted = True
        return accepted

    return Bench(seeds, parse, dictionary=tokens_alphabet, max_size=4096)


def _roster_verify(j: _Jose, token: bytes | str) -> bool:
    result = roster.verify_roster(token, j.jwks, issuer=_ISSUER, conference_id=_AUDIENCE,
                                  now=NOW, min_epoch=0)
    result.identity_of(1)
    return True


def _build_roster() -> Bench:
    j = _Jose()
    return Bench([Seed(t.encode()) for t in j.rosters()], lambda data: _roster_verify(j, data),
                 max_size=4096)


def _build_roster_claims() -> Bench:
    j = _Jose()
    header, _ = _split_token(j.rosters()[0])
    seeds = [Seed(_split_token(t)[1]) for t in j.rosters()]
    return Bench(seeds, lambda data: _roster_verify(j, j.token(header, data)),
                 dictionary=_JSON_TOKENS, max_size=4096)


def _build_jwks() -> Bench:
    j = _Jose()
    seeds = [Seed(json.dumps(j.jwks).encode()),
             Seed(json.dumps({"keys": j.jwks["keys"][:1]}, indent=1).encode())]

    def parse(data: bytes) -> bool:
        document = jsontext.loads(data)
        keys = jose.parse_jwks(document)
        jose.verification_keys(document, NOW)
        verifier = identity.JwksIdentityVerifier(_IDP, j.jwks)
        verifier.update_jwks(document)
        return bool(keys)

    return Bench(seeds, parse, dictionary=_JSON_TOKENS, max_size=4096)


def _build_jsontext() -> Bench:
    j = _Jose()
    texts = [json.dumps(j.jwks), j.assertions()[0],
             json.dumps({"type": "about:blank", "title": "x", "status": 400, "a": [1, 2.5, None,
                                                                                 True, "\u00e9"]}),
             json.dumps([[[[{"a": {"b": []}}]]]])]
    seeds = [Seed(t.encode()) for t in texts]

    def parse(data: bytes) -> bool:
        accepted = False
        for unique in (False, True):
            if _attempt(jsontext.JsonError, jsontext.loads, data, unique_keys=unique,
                        max_depth=8) is not _FAILED:
                accepted = True
        text = _attempt(UnicodeDecodeError, data.decode, "utf-8")
        if text is not _FAILED:
            _attempt(jsontext.JsonError, jsontext.loads, text)
        return accepted

    return Bench(seeds, parse, dictionary=_JSON_TOKENS, max_size=8192)


def _build_encryption_key() -> Bench:
    seeds = [Seed(encryption_key.format_encryption_key(cid, epoch, key).encode())
             for cid, epoch, key in (("conf-1", 3, bytes(range(16))),
                                     ("conf-1", 3, b"\xff" * 32), ("conf-1", 3, b"\x00"))]

    def parse(data: bytes) -> bool:
        key = encryption_key.parse_encryption_key(data.decode("latin-1"), "conf-1", 3)
        return isinstance(key, bytes)

    return Bench(seeds, parse, dictionary=[b'"', b";", b" ", b"=", b"/", b"\t", b"\n",
                                           b'keyid="', b"aesgcm128=", b'usage="EKT"'],
                 max_size=512)


# -- signed answers ------------------------------------------------------------------------------

_KD_NAME = "kd.localhost"
_AID = uuid.UUID("12345678-1234-4234-9234-123456789abc").bytes


class _Answers:
    """A DevPki CA, a KD certificate, and answers signed by it."""

    def __init__(self) -> None:
        with tempfile.TemporaryDirectory() as directory:
            pki = DevPki(directory)
            issued = pki.issue("kd", [_KD_NAME])
            self.roots = [pki.ca_certificate]
            self.kd_der = x509.load_pem_x509_certificate(
                issued.certificate.read_bytes()).public_bytes(serialization.Encoding.DER)
            key = serialization.load_pem_private_key(issued.private_key.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        self.key = key
        fingerprint = hashlib.sha256(self.kd_der).digest()
        self.unsigned = sdp.make_answer(
            sdp.parse(OFFER), fingerprint=fingerprint, tls_id=_KD_TLS_ID, ice_ufrag=_UFRAG,
            ice_pwd=_PWD, candidates=[_CANDIDATE])
        self.now = float(int(datetime.datetime.now(datetime.UTC).timestamp()))
        self.signed = answer_module.sign_answer(
            self.unsigned, OFFER, association_id=_AID, conference_id=_AUDIENCE,
            identity="alice@idp.example", certificate_chain=[self.kd_der], private_key=key,
            now=self.now)
        token = sdp.parse(self.signed).get(answer_module.SIGNATURE_ATTRIBUTE).value
        self.header, self.claims = _split_token(token)

    def token(self, header: bytes, payload: bytes) -> str:
        signing_input = jose.b64url_encode(header) + "." + jose.b64url_encode(payload)
        r, s = decode_dss_signature(self.key.sign(signing_input.encode(),
                                                  ec.ECDSA(hashes.SHA256())))
        return signing_input + "." + jose.b64url_encode(r.to_bytes(32, "big")
                                                        + s.to_bytes(32, "big"))

    def signed_text(self, unsigned: sdp.SessionDescription, claims: bytes) -> str:
        return unsigned.with_attributes(answer_module.SIGNATURE_ATTRIBUTE,
                                        [self.token(self.header, claims)]).serialize()

    def verify(self, signed: str | bytes) -> bool:
        return bool(answer_module.verify_signed_answer(
            signed, OFFER, trust_roots=self.roots, kd_names=[_KD_NAME, "other.localhost"],
            now=self.now))


def _build_answer() -> Bench:
    a = _Answers()
    return Bench([Seed(a.signed.encode())], a.verify, dictionary=_SDP_TOKENS, max_size=8192)


def _build_answer_claims() -> Bench:
    """Mutate the signed answer's claims; sign them with the KD's key."""
    a = _Answers()
    return Bench([Seed(a.claims)], lambda data: a.verify(a.signed_text(a.unsigned, data)),
                 dictionary=_JSON_TOKENS, max_size=2048)


def _build_answer_sdp() -> Bench:
    """Mutate the answer SDP; sign claims that cover it (so the SDP checks are reached)."""
    a = _Answers()
    claims = json.loads(a.claims)

    def parse(data: bytes) -> bool:
        unsigned = _attempt(sdp.SdpError, sdp.parse, data)
        if unsigned is _FAILED:
            return a.verify(data)
        unsigned = unsigned.without(answer_module.SIGNATURE_ATTRIBUTE)
        digest = jose.b64url_encode(hashlib.sha256(unsigned.serialize().encode()).digest())
        payload = json.dumps({**claims, "answer": digest}).encode()
        return a.verify(a.signed_text(unsigned, payload))

    return Bench([Seed(a.unsigned.serialize().encode())], parse, dictionary=_SDP_TOKENS,
                 max_size=8192)


# -- DTLS -----------------------------------------------------------------------------------------

class _FixedOs:
    """``os.urandom`` for the DTLS connection module: the same bytes every time."""

    @staticmethod
    def urandom(n: int) -> bytes:
        stream = b"".join(hashlib.sha256(b"perc fuzz %d" % i).digest() for i in range(n // 32 + 1))
        return stream[:n]


_FIXED_KEYS: dict[int, tuple[Any, bytes]] = {}


class _FixedKeyShare(dtls_connection.KeyShare):
    """A KeyShare with one fixed private key per group (the replay must be exact)."""

    def __init__(self, group: int) -> None:
        if group not in (NamedGroup.SECP256R1, NamedGroup.X25519):
            super().__init__(group)  # raises the typed HandshakeFailure
            return
        if group not in _FIXED_KEYS:
            if group == NamedGroup.SECP256R1:
                private: Any = ec.derive_private_key(0xF00D, ec.SECP256R1())
                public = private.public_key().public_bytes(
                    serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
            else:
                private = x25519.X25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
                public = private.public_key().public_bytes(serialization.Encoding.Raw,
                                                           serialization.PublicFormat.Raw)
            _FIXED_KEYS[group] = (private, public)
        self.group = group
        self._private, self.public_bytes = _FIXED_KEYS[group]


_SIGNATURE_HASHES = {0x0403: hashes.SHA256, 0x0503: hashes.SHA384}


def _deterministic_sign(private_key: ec.EllipticCurvePrivateKey, scheme: int,
                        data: bytes) -> bytes:
    """RFC 6979 ECDSA, so that the transcript (and every Finished) replays exactly."""
    return private_key.sign(data, ec.ECDSA(_SIGNATURE_HASHES[scheme](),
                                           deterministic_signing=True))


@contextmanager
def _deterministic_dtls():
    """Make DtlsConnection's randomness fixed while a recorded conversation is replayed.

    The randoms, the ECDHE keys and the ECDSA signatures are the only
    non-deterministic inputs of the state machine; with them fixed, a
    recorded client (or server) flight is valid again for a fresh server
    (or client), so a mutated datagram can be delivered in any state.
    """
    saved = dtls_connection.os, dtls_connection.KeyShare, dtls_connection.sign
    dtls_connection.os = _FixedOs  # type: ignore[assignment]
    dtls_connection.KeyShare = _FixedKeyShare  # type: ignore[misc]
    dtls_connection.sign = _deterministic_sign
    try:
        yield
    finally:
        dtls_connection.os, dtls_connection.KeyShare, dtls_connection.sign = saved


_CERTIFICATES: list[tuple[bytes, ec.EllipticCurvePrivateKey]] = []
_EXTERNAL_SESSION_ID = b"tls-id-of-the-endpoint-0123"


def _dtls_configs() -> tuple[DtlsConfiguration, DtlsConfiguration]:
    if not _CERTIFICATES:
        when = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
        _CERTIFICATES.extend(generate_certificate(name, now=when) for name in ("ep", "kd"))
    (client_cert, client_key), (server_cert, server_key) = _CERTIFICATES
    client = DtlsConfiguration(client_cert, client_key,
                               ekt_ciphers=[ekt.EktCipher.AESKW_128, ekt.EktCipher.AESKW_256],
                               external_session_id=_EXTERNAL_SESSION_ID, mtu=600)
    server = DtlsConfiguration(server_cert, server_key, ekt_ciphers=[ekt.EktCipher.AESKW_128],
                               external_session_id=b"tls-id-of-the-kd-0123456",
                               expected_peer_external_session_id=_EXTERNAL_SESSION_ID,
                               cookie_secret=b"cookie secret", peer_id=b"192.0.2.1:40000",
                               mtu=600)
    return client, server


_EKT_KEYS = [ekt.EktParameterSet(key=bytes(range(i, i + 16)), cipher=ekt.EktCipher.AESKW_128,
                                 master_salt=bytes(range(i, i + 12)), spi=i, ttl=3600)
             for i in (1, 2)]

Script = list[tuple[Any, ...]]


def _record_dtls() -> tuple[Script, Script]:
    """A whole association, as ("recv", datagram, now) and local steps per side."""
    client_config, server_config = _dtls_configs()
    with _deterministic_dtls():
        client = DtlsConnection(Role.CLIENT, client_config)
        server = DtlsConnection(Role.SERVER, server_config)
        client_script: Script = [("connect", 0.0)]
        server_script: Script = []
        client.connect(0.0)

        def pump(now: float) -> None:
            moved = True
            while moved:
                moved = False
                for datagram in client.datagrams_to_send(now):
                    server_script.append(("recv", datagram, now))
                    server.receive_datagram(datagram, now)
                    moved = True
                for datagram in server.datagrams_to_send(now):
                    client_script.append(("recv", datagram, now))
                    client.receive_datagram(datagram, now)
                    moved = True

        pump(0.0)
        assert client.is_connected and server.is_connected
        for i, params in enumerate(_EKT_KEYS):
            server_script.append(("ekt", params, 1.0 + i))
            server.send_ekt_key(params, 1.0 + i)
            pump(1.0 + i)
        client_script.append(("app", b"ping", 3.0))
        client.send_application_data(b"ping")
        server_script.append(("app", b"pong", 3.0))
        server.send_application_data(b"pong")
        pump(3.0)
        client_script.append(("close", 4.0))
        client.close()
        pump(4.0)
    return client_script, server_script


def _dtls_datagram_fields(datagram: bytes, base: int = 0) -> list[tuple[int, int]]:
    """Record lengths, handshake lengths and hello vector lengths of one datagram."""
    fields: list[tuple[int, int]] = []
    offset = 0
    while offset + dtls_record.RECORD_HEADER_LENGTH <= len(datagram):
        content_type, epoch = datagram[offset], datagram[offset + 3:offset + 5]
        length = int.from_bytes(datagram[offset + 11:offset + 13], "big")
        fields += [(base + offset, 1), (base + offset + 11, 2)]
        start = offset + dtls_record.RECORD_HEADER_LENGTH
        if content_type == dtls_record.ContentType.HANDSHAKE and epoch == b"\x00\x00":
            f = start
            while f + hs.HANDSHAKE_HEADER_LENGTH <= start + length:
                fields += [(base + f, 1), (base + f + 1, 3), (base + f + 4, 2),
                           (base + f + 6, 3), (base + f + 9, 3)]
                body = f + hs.HANDSHAKE_HEADER_LENGTH
                if datagram[f] in (HandshakeType.CLIENT_HELLO, HandshakeType.SERVER_HELLO):
                    fields += _hello_fields(datagram, body, datagram[f], base)
                f = body + int.from_bytes(datagram[f + 9:f + 12], "big")
        offset = start + length
    return fields


def _hello_fields(data: bytes, at: int, msg_type: int, base: int) -> list[tuple[int, int]]:
    fields = []
    p = at + 2 + 32
    fields.append((base + p, 1))
    p += 1 + data[p]
    if msg_type == HandshakeType.CLIENT_HELLO:
        fields.append((base + p, 1))
        p += 1 + data[p]
        fields.append((base + p, 2))
        p += 2 + int.from_bytes(data[p:p + 2], "big")
        fields.append((base + p, 1))
        p += 1 + data[p]
    else:
        p += 3
    if p + 2 <= len(data):
        fields.append((base + p, 2))
        end = p + 2 + int.from_bytes(data[p:p + 2], "big")
        p += 2
        while p + 4 <= min(end, len(data)):
            fields += [(base + p, 2), (base + p + 2, 2), (base + p + 4, 2), (base + p + 4, 1)]
            p += 4 + int.from_bytes(data[p + 2:p + 4], "big")
    return fields


_DECODERS: dict[int, Callable[[bytes], Any]] = {
    HandshakeType.CLIENT_HELLO: hs.ClientHello.decode,
    HandshakeType.SERVER_HELLO: hs.ServerHello.decode,
    HandshakeType.HELLO_VERIFY_REQUEST: hs.HelloVerifyRequest.decode,
    HandshakeType.CERTIFICATE: hs.Certificate.decode,
    HandshakeType.SERVER_KEY_EXCHANGE: hs.ServerKeyExchange.decode,
    HandshakeType.CERTIFICATE_REQUEST: hs.CertificateRequest.decode,
    HandshakeType.SERVER_HELLO_DONE: hs.ServerHelloDone.decode,
    HandshakeType.CLIENT_KEY_EXCHANGE: hs.ClientKeyExchange.decode,
    HandshakeType.CERTIFICATE_VERIFY: hs.CertificateVerify.decode,
    HandshakeType.FINISHED: hs.Finished.decode,
}
_EXTENSION_DECODERS: dict[int, Callable[[bytes], Any]] = {
    hs.ExtensionType.SUPPORTED_GROUPS: hs.decode_supported_groups,
    hs.ExtensionType.EC_POINT_FORMATS: hs.decode_ec_point_formats,
    hs.ExtensionType.SIGNATURE_ALGORITHMS: hs.decode_signature_algorithms,
    hs.ExtensionType.USE_SRTP: hs.decode_use_srtp,
    hs.ExtensionType.EXTENDED_MASTER_SECRET: hs.decode_empty,
    hs.ExtensionType.RENEGOTIATION_INFO: hs.decode_renegotiation_info,
    hs.ExtensionType.EXTERNAL_SESSION_ID: hs.decode_external_session_id,
}


def _decode_handshake(msg_type: int, body: bytes) -> None:
    decode = _DECODERS.get(msg_type)
    if decode is None:
        if msg_type == ekt.EKT_KEY_HANDSHAKE_TYPE:
            for cipher in ekt.EktCipher:
                _attempt(ekt.EktError, ekt.decode_ekt_key, body, cipher)
        return
    message = _attempt(DtlsError, decode, body)
    if message is _FAILED:
        return
    encoded = message.encode()
    if getattr(message, "extensions", None) == [] and encoded + b"\x00\x00" == body:
        encoded = body  # the documented exception: an empty extensions block
    assert encoded == body, f"handshake message {msg_type} does not re-encode"
    for ext_type, data in getattr(message, "extensions", ()):
        decode_extension = _EXTENSION_DECODERS.get(ext_type)
        if decode_extension is not None:
            _attempt(DtlsError, decode_extension, data)
        elif ext_type == hs.ExtensionType.SUPPORTED_EKT_CIPHERS:
            _attempt(DtlsError, hs.decode_ekt_ciphers_client, data)
            _attempt(DtlsError, hs.decode_ekt_cipher_server, data)


def _build_dtls_records() -> Bench:
    """The record and handshake codecs on every datagram of a real association."""
    client_script, server_script = _record_dtls()
    datagrams = [step[1] for step in client_script + server_script if step[0] == "recv"]
    seeds = [Seed(d, tuple(_dtls_datagram_fields(d))) for d in datagrams]

    def parse(data: bytes) -> bool:
        records = dtls_record.parse_records(data)
        reassembler = hs.Reassembler(4096)
        for record in records:
            if record.content_type == dtls_record.ContentType.ALERT:
                _attempt(DtlsError, hs.decode_alert, record.fragment)
            elif record.content_type == dtls_record.ContentType.ACK:
                _attempt(DtlsError, hs.decode_ack, record.fragment)
            if record.content_type != dtls_record.ContentType.HANDSHAKE or record.epoch:
                continue
            fragments = _attempt(DtlsError, hs.parse_handshake_fragments, record.fragment)
            if fragments is _FAILED:
                continue
            for fragment in fragments:
                if fragment.fragment_offset == 0 and len(fragment.body) == fragment.length:
                    _decode_handshake(fragment.msg_type, fragment.body)
                if _attempt(DtlsError, reassembler.add, fragment) is _FAILED:
                    break
            while (message := reassembler.pop()) is not None:
                _decode_handshake(message[0], message[2])
        return bool(records)

    return Bench(seeds, parse, max_size=2048)


def _replay(role: Role, script: Script, slot: int, mutated: bytes) -> bool:
    """A fresh connection given the recorded steps, datagram ``slot`` replaced by ``mutated``.

    Nothing may escape: DtlsConnection turns every bad input into a dropped
    record or a ConnectionClosed event.  Accepted: the handshake completed.
    """
    client_config, server_config = _dtls_configs()
    with _deterministic_dtls():
        conn = DtlsConnection(role, client_config if role is Role.CLIENT else server_config)
        received = 0
        now = 0.0
        completed = False
        ekt_cipher = None  # as negotiated (HandshakeComplete)
        for step in script:
            kind, now = step[0], step[-1]
            if kind == "recv":
                conn.receive_datagram(mutated if received == slot else step[1], now)
                if received == slot:
                    conn.receive_datagram(step[1], now)  # and the original after it
                received += 1
            elif kind == "connect":
                conn.connect(now)
            elif kind == "ekt" and conn.is_connected and ekt_cipher == step[1].cipher:
                conn.send_ekt_key(step[1], now)
            elif kind == "app" and conn.is_connected:
                conn.send_application_data(step[1])
            elif kind == "close":
                conn.close()
            conn.datagrams_to_send(now)
            while (event := conn.next_event()) is not None:
                if isinstance(event, dtls_connection.HandshakeComplete):
                    completed, ekt_cipher = True, event.ekt_cipher
        for later in (now + 1.5, now + 100.0):
            timer = conn.get_timer()
            if timer is not None:
                conn.handle_timer(max(later, timer))
        conn.datagrams_to_send(now)
        while conn.next_event() is not None:
            pass
        return completed


def _build_dtls_engine(role: Role) -> Bench:
    client_script, server_script = _record_dtls()
    script = client_script if role is Role.CLIENT else server_script
    datagrams = [step[1] for step in script if step[0] == "recv"]
    seeds = [Seed(bytes((slot,)) + d, ((0, 1), *_dtls_datagram_fields(d, 1)))
             for slot, d in enumerate(datagrams)]

    def parse(data: bytes) -> bool:
        if not data:
            return False
        return _replay(role, script, data[0] % len(datagrams), data[1:])

    return Bench(seeds, parse, max_size=2048, pool=False)


# -- cascade links (protocol/cascade.py) and their place in the plane (md/plane.py) ---------------

class _SideOs:
    """``os.urandom`` for the DTLS module while a cascade link is recorded or replayed:
    one deterministic stream per side, so that one side replayed alone draws what it
    drew while recorded with its peer."""

    side = cascade.CLIENT
    counters: dict[str, int] = {}

    @classmethod
    def urandom(cls, n: int) -> bytes:
        i = cls.counters.get(cls.side, 0)
        cls.counters[cls.side] = i + 1
        stream = b"".join(hashlib.sha256(b"perc cascade %s %d %d" % (cls.side.encode(), i, j))
                          .digest() for j in range(n // 32 + 1))
        return stream[:n]


@contextmanager
def _cascade_dtls():
    """As :func:`_deterministic_dtls`, with a random stream per side (rekeys need fresh
    ClientHello randoms: the server takes the current association's again for a replay)."""
    saved = dtls_connection.os, dtls_connection.KeyShare, dtls_connection.sign
    dtls_connection.os = _SideOs  # type: ignore[assignment]
    dtls_connection.KeyShare = _FixedKeyShare  # type: ignore[misc]
    dtls_connection.sign = _deterministic_sign
    _SideOs.counters = {}
    try:
        yield
    finally:
        dtls_connection.os, dtls_connection.KeyShare, dtls_connection.sign = saved


_CLIENT_MD, _SERVER_MD, _ELSEWHERE = ("192.0.2.1", 3478), ("192.0.2.2", 3478), ("192.0.2.9", 9)
_CLIENT_PWD = "pwd-of-the-client-md-0123"
_LINK_TIMING = cascade.LinkTiming(consent_interval=1.0, consent_timeout=6.0,
                                  check_interval=0.25, handshake_timeout=5.0, backoff_min=0.5,
                                  backoff_max=2.0, rekey_interval=3.0, key_overlap=2.0,
                                  switch_delay=1.0)
_MD_CERTIFICATES: list[tuple[bytes, ec.EllipticCurvePrivateKey]] = []


def _md_certificates() -> list[tuple[bytes, ec.EllipticCurvePrivateKey]]:
    if not _MD_CERTIFICATES:
        when = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
        _MD_CERTIFICATES.extend(generate_certificate(name, now=when) for name in ("a", "b"))
    return _MD_CERTIFICATES


def _cascade_link(role: str, now: float = 0.0) -> cascade.CascadeLink:
    """The client MD's (ufrag mdA) or the server MD's (mdB, ice-pwd _PWD) end of one link."""
    (cert_a, key_a), (cert_b, key_b) = _md_certificates()
    client = role == cascade.CLIENT
    return cascade.CascadeLink(
        role, local_ufrag="mdA" if client else "mdB",
        local_pwd=_CLIENT_PWD if client else _PWD, remote_ufrag="mdB" if client else "mdA",
        remote_pwd=_PWD if client else _CLIENT_PWD, certificate=cert_a if client else cert_b,
        private_key=key_a if client else key_b,
        peer_fingerprint=hashlib.sha256(cert_b if client else cert_a).digest(),
        profile=srtp.Profile.AEAD_AES_128_GCM, local_channel=0x4A01 if client else 0x4B02,
        now=now, peer_address=_SERVER_MD if client else None, timing=_LINK_TIMING,
        rng=random.Random(1 if client else 2))


def _record_cascade() -> dict[str, Script]:
    """Both ends from the first check through a rekey to close_notify, as
    ("recv", datagram, source, now), ("timer", now) and ("close", now) per side."""
    scripts: dict[str, Script] = {cascade.CLIENT: [], cascade.SERVER: []}
    with _cascade_dtls():
        ends = {}
        for role in scripts:
            _SideOs.side = role
            ends[role] = _cascade_link(role)
        address = {cascade.CLIENT: _CLIENT_MD, cascade.SERVER: _SERVER_MD}

        def pump(now: float) -> None:
            moved = True
            while moved:
                moved = False
                for role, link in ends.items():
                    _SideOs.side = role
                    other = cascade.SERVER if role == cascade.CLIENT else cascade.CLIENT
                    for datagram in link.datagrams_to_send(now):
                        moved = True
                        scripts[other].append(("recv", datagram, address[role], now))
                        _SideOs.side = other
                        ends[other].receive(datagram, address[role], now)
                        _SideOs.side = role

        now = 0.0
        pump(now)
        while now < 4.0:
            now = min(t for t in (link.next_timer() for link in ends.values()) if t is not None)
            for role, link in ends.items():
                _SideOs.side = role
                scripts[role].append(("timer", now))
                link.handle_timer(now)
            pump(now)
        assert all(link.state == cascade.UP for link in ends.values())
        assert ends[cascade.CLIENT].counters["rekeys"] == 1
        _SideOs.side = cascade.CLIENT
        scripts[cascade.CLIENT].append(("close", now))
        ends[cascade.CLIENT].close()
        pump(now)
    return scripts


def _replay_cascade(role: str, script: Script, slot: int, mutated: bytes,
                    source: tuple[str, int] | None) -> bool:
    """A fresh link end given the recorded steps, datagram ``slot`` replaced by
    ``mutated`` (from ``source``, else from the peer) and then the original.
    Nothing may escape CascadeLink; accepted: a LinkUp came out."""
    with _cascade_dtls():
        _SideOs.side = role
        link = _cascade_link(role)
        received = 0
        up = False
        for step in script:
            kind, now = step[0], step[-1]
            if kind == "recv":
                if received == slot:
                    link.receive(mutated, source or step[2], now)
                link.receive(step[1], step[2], now)
                received += 1
            elif kind == "timer":
                link.handle_timer(now)
            else:
                link.close()
            link.datagrams_to_send(now)
            link.next_timer()
            while (event := link.next_event()) is not None:
                up |= isinstance(event, cascade.LinkUp)
        return up


def _link_fields(datagram: bytes, base: int) -> tuple[tuple[int, int], ...]:
    if datagram[0] <= 3:
        return tuple((base + offset, size) for offset, size in _stun_fields(datagram))
    return tuple(_dtls_datagram_fields(datagram, base))


def _build_cascade(role: str) -> Bench:
    script = _record_cascade()[role]
    datagrams = [step[1] for step in script if step[0] == "recv"]
    assert len(datagrams) < 64
    seeds = [Seed(bytes((slot,)) + d, ((0, 1), *_link_fields(d, 1)))
             for slot, d in enumerate(datagrams)]

    def parse(data: bytes) -> bool:
        """data[0]: the slot (low 6 bits), 0x40: from another address, 0x80: a STUN
        message re-signed with the link's ice-pwd (so the checks behind it are reached)."""
        if not data:
            return False
        mutated = data[1:]
        if data[0] & 0x80:
            mutated = _stun_fixup(mutated)
        return _replay_cascade(role, script, (data[0] & 0x3F) % len(datagrams), mutated,
                               _ELSEWHERE if data[0] & 0x40 else None)

    return Bench(seeds, parse, max_size=2048, pool=False)


class _LinkedPlanes:
    """Two MediaPlanes with one up link and an endpoint leg each, keyed as the KD would:
    the recorded datagrams of the link are the seeds of the plane's ChannelData path."""

    def __init__(self) -> None:
        (cert_a, key_a), (cert_b, key_b) = _md_certificates()
        timing = cascade.LinkTiming(rekey_interval=None)
        self._queue: list[tuple[bytes, tuple[str, int], Any]] = []
        self.planes = {
            _CLIENT_MD: MediaPlane(link_certificate=cert_a, link_private_key=key_a,
                                   link_timing=timing, rng=random.Random(1)),
            _SERVER_MD: MediaPlane(link_certificate=cert_b, link_private_key=key_b,
                                   link_timing=timing, rng=random.Random(2))}
        self.sent: list[bytes] = []
        fingerprint = {a: hashlib.sha256(c).digest() for a, c in ((_CLIENT_MD, cert_a),
                                                                   (_SERVER_MD, cert_b))}
        self.deliver(_CLIENT_MD, self.planes[_CLIENT_MD].add_link(
            "L", "conf", role=cascade.CLIENT, local_ufrag="mdA", local_pwd=_CLIENT_PWD,
            remote_ufrag="mdB", remote_pwd=_PWD, peer_address=_SERVER_MD,
            peer_fingerprint=fingerprint[_SERVER_MD], profile=srtp.Profile.AEAD_AES_128_GCM,
            now=MEDIA_NOW))
        self.deliver(_SERVER_MD, self.planes[_SERVER_MD].add_link(
            "L", "conf", role=cascade.SERVER, local_ufrag="mdB", local_pwd=_PWD,
            remote_ufrag="mdA", remote_pwd=_CLIENT_PWD, peer_address=None,
            peer_fingerprint=fingerprint[_CLIENT_MD], profile=srtp.Profile.AEAD_AES_128_GCM,
            now=MEDIA_NOW))
        self.flush()
        assert all(plane.link_state("L") == cascade.UP for plane in self.planes.values())
        rng = random.Random(8871)
        for address, name in ((_CLIENT_MD, "a"), (_SERVER_MD, "b")):
            keys = double.split_keying_material(
                double.Profile.DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM, rng.randbytes(112))
            plane = self.planes[address]
            plane.add_leg(name, f"ep{name}", "endpoint-pwd-0123456789", group="conf")
            ep_address = ("10.0.0.1" if name == "a" else "10.0.0.2", 5000)
            plane.datagram_received(stun.StunMessage(stun.BINDING_REQUEST, rng.randbytes(12), [
                (stun.ATTR_USERNAME, f"ep{name}:x".encode()),
                (stun.ATTR_PRIORITY, b"\x00\x00\x00\x01")]).encode(
                    integrity_key=b"endpoint-pwd-0123456789"), ep_address, MEDIA_NOW)
            plane.install_keys(name, tunnel.MediaKeys(
                uuid.UUID(int=rng.getrandbits(128), version=4).bytes, 0x0009, b"",
                keys.client_outer.key, keys.server_outer.key,
                keys.client_outer.salt, keys.server_outer.salt))
            if name == "a":
                sender = double.DoubleSender(keys.client_outer.context(), ekt.EktSender(
                    SSRC, 16, _EKT_KEYS[0], 0.0, random_bytes=rng.randbytes))
                for seq in range(4):
                    packet = rtp.RtpPacket(payload_type=96, sequence_number=seq, ssrc=SSRC,
                                           payload=rng.randbytes(60)).serialize()
                    self.deliver(address, plane.datagram_received(
                        sender.protect(packet, MEDIA_NOW), ep_address, MEDIA_NOW))
                rr = struct.pack("!BBHI", 0x81, 201, 7, SSRC) + bytes(24)
                self.deliver(address, plane.datagram_received(
                    keys.client_outer.context().protect_rtcp(rr), ep_address, MEDIA_NOW))
        self.flush()

    def deliver(self, source: tuple[str, int], outputs: list[tuple[bytes, Any]]) -> None:
        self._queue += [(data, source, to) for data, to in outputs]

    def flush(self) -> None:
        while self._queue:
            data, source, to = self._queue.pop(0)
            if to in self.planes:
                if source == _CLIENT_MD:
                    self.sent.append(data)
                self.deliver(to, self.planes[to].datagram_received(data, source, MEDIA_NOW))


def _build_plane_links() -> Bench:
    linked = _LinkedPlanes()
    server = linked.planes[_SERVER_MD]
    seeds = []
    for d in linked.sent:
        if d[0] <= 3:  # STUN
            seeds.append(Seed(d, _link_fields(d, 0)))
        elif 20 <= d[4] <= 63:  # ChannelData: channel, length, then DTLS ...
            seeds.append(Seed(d, ((0, 2), (2, 2), *_link_fields(d[4:], 4))))
        else:  # ... or SRTP / SRTCP
            seeds.append(Seed(d, ((0, 2), (2, 2))))
    assert any(d[0] >> 4 == 4 and d[4] >= 128 for d in linked.sent)  # media crossed

    def parse(data: bytes) -> bool:
        """One datagram from the client MD's address into the server MD's plane (its
        link and endpoint state persist between inputs, as a daemon's would).
        Accepted: the plane sent something (relayed, or answered)."""
        return bool(server.datagram_received(data, _CLIENT_MD, MEDIA_NOW))

    return Bench(seeds, parse, max_size=2048, pool=False)


# -- the list ------------------------------------------------------------------------------------

_PROTOCOL = (ProtocolError,)

TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("rtp", (rtp.RtpError, rtp.RtcpError), _build_rtp,
           "RTP packets, header fast path, RTCP compounds, SR/RR blocks"),
    Target("extensions", (extensions.ExtensionError,), _build_extensions,
           "RFC 8285 find_extension, audio level, frame marks, stream ids, add_extensions"),
    Target("feedback", (feedback.FeedbackError, rtp.RtcpError), _build_feedback,
           "RTCP NACK/PLI/FIR/REMB, the speaker hint, SR/RR report block removal"),
    Target("announcement", (selection.SelectionError, rtp.RtcpError), _build_announcement,
           "the MDs' stream announcements over cascade links (APP PERC subtype 2)"),
    Target("capture", (recording.CaptureError,), _build_capture,
           "perc-endpoint capture files (the late joiner's --history)"),
    Target("srtp", (srtp.SrtpError, rtp.RtpError), _build_srtp,
           "SrtpContext.unprotect / unprotect_rtcp of SRTP and SRTCP"),
    Target("double", _PROTOCOL, _build_double,
           "double-protected packets: DoubleReceiver.unprotect and the MD Relay", cost=2),
    Target("double.plain", _PROTOCOL, _build_double_plain,
           "outer plaintext mutated then re-sealed: OHB, EKTField, inner layer, relay", cost=4),
    Target("ekt", (ekt.EktError,), _build_ekt,
           "EKTField framing and EktReceiver.process"),
    Target("ekt.plaintext", (ekt.EktError,), _build_ekt_plaintext,
           "EKTPlaintext mutated then AES-KW wrapped: decode and key learning"),
    Target("ektkey", (ekt.EktError,), _build_ekt_key, "the DTLS EKTKey message body"),
    Target("tunnel", (tunnel.TunnelError,), _build_tunnel,
           "RFC 9185 tunnel frames through TunnelDecoder"),
    Target("stun", (stun.StunError,), _build_stun,
           "STUN parse, attribute decoders, ICE-lite answer_binding_request"),
    Target("stun.signed", (stun.StunError,), _build_stun_signed,
           "STUN with length, MESSAGE-INTEGRITY and FINGERPRINT fixed after mutation"),
    Target("sdp", (sdp.SdpError,), _build_sdp,
           "SDP parse, accessors, make_answer, the KD's inspect_offer/finish_answer", cost=3),
    Target("identity", (identity.IdentityError,), _build_identity,
           "RFC 8827 assertion JSON through JwksIdentityVerifier.verify", cost=2),
    Target("identity.claims", (identity.IdentityError,), _build_identity_claims,
           "assertion claims mutated then signed by the IdP key", cost=4),
    Target("jose", (identity.IdentityError,), _build_jose_header,
           "JWS protected header mutated then signed: decode_es256 and verify", cost=5),
    Target("jose.token", (), _build_jose_token,
           "compact JWS text: b64url_decode, strict_json_loads, decode_es256", cost=2),
    Target("roster", (roster.RosterError,), _build_roster, "signed roster tokens", cost=2),
    Target("roster.claims", (roster.RosterError,), _build_roster_claims,
           "roster claims mutated then signed", cost=4),
    Target("jwks", (jsontext.JsonError, jose.InvalidJwks), _build_jwks, "JWKS documents"),
    Target("jsontext", (), _build_jsontext, "jsontext.loads with its limits"),
    Target("encryption_key", (ValueError,), _build_encryption_key,
           "the KMF's Encryption-Key header"),
    Target("answer", (answer_module.AnswerError,), _build_answer,
           "signed answer SDP through verify_signed_answer", cost=6),
    Target("answer.claims", (answer_module.AnswerError,), _build_answer_claims,
           "signed answer claims mutated then signed by the KD key", cost=10),
    Target("answer.sdp", (answer_module.AnswerError,), _build_answer_sdp,
           "answer SDP mutated, claims re-signed to cover it", cost=10),
    Target("dtls.records", (), _build_dtls_records,
           "DTLS record, handshake, extension, alert and ACK codecs, reassembly"),
    Target("dtls.server", (), lambda: _build_dtls_engine(Role.SERVER),
           "a server DtlsConnection fed a recorded client with one datagram mutated", cost=20),
    Target("dtls.client", (), lambda: _build_dtls_engine(Role.CLIENT),
           "a client DtlsConnection fed a recorded server with one datagram mutated", cost=20),
    Target("cascade.server", (), lambda: _build_cascade(cascade.SERVER),
           "a cascade link's server end fed a recorded client MD, one datagram mutated",
           cost=40),
    Target("cascade.client", (), lambda: _build_cascade(cascade.CLIENT),
           "a cascade link's client end fed a recorded server MD, one datagram mutated",
           cost=40),
    Target("md.plane.link", (), _build_plane_links,
           "an MD plane with an up cascade link fed its peer MD's datagrams mutated", cost=2),
)}
