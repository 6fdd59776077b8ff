"""Tests for perc_daemons.protocol.sdp (RFC 8866 subset, RFC 8842, RFC 8839, RFC 8827)."""

from __future__ import annotations

import base64
import json

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from perc_daemons.protocol import sdp
from perc_daemons.protocol.errors import ProtocolError
from perc_daemons.protocol.sdp import (
    Attribute,
    BadFingerprint,
    BadIceCredentials,
    BadIdentity,
    BadSetup,
    BadTlsId,
    ExtMap,
    Field,
    MediaDescription,
    OfferRefused,
    Origin,
    RtpMap,
    SdpAttributeError,
    SdpError,
    SdpMissingLine,
    SdpOrderError,
    SdpSyntaxError,
    SdpTooLarge,
    SessionDescription,
    SsrcAttribute,
    make_answer,
    parse,
)

FUZZ = settings(max_examples=300, deadline=None)

FP_OFFER = bytes(range(32))
FP_OFFER_TEXT = ":".join(f"{b:02X}" for b in FP_OFFER)
ASSERTION_JSON = json.dumps(
    {"idp": {"domain": "idp.example", "protocol": "default"}, "assertion": "eyJhbGciOi.x.y"}
)
IDENTITY = base64.b64encode(ASSERTION_JSON.encode()).decode()
TLS_ID = "abc3de65cddef001be82"

OFFER_LINES = [
    "v=0",
    "o=- 4611731400430051336 2 IN IP4 127.0.0.1",
    "s=-",
    "t=0 0",
    "a=group:BUNDLE 0 1",
    "a=extmap-allow-mixed",
    "a=msid-semantic: WMS stream",
    f"a=identity:{IDENTITY}",
    "m=audio 9 UDP/TLS/RTP/SAVPF 111 0",
    "c=IN IP4 0.0.0.0",
    "a=rtcp:9 IN IP4 0.0.0.0",
    "a=candidate:1467250027 1 udp 2122260223 192.0.2.1 46243 typ host generation 0",
    "a=candidate:842163049 1 udp 1686052607 198.51.100.7 46243 typ srflx"
    " raddr 192.0.2.1 rport 46243",
    "a=ice-ufrag:EsAw",
    "a=ice-pwd:bP+XJMM09aR8AiX1jdukzR6Y",
    "a=ice-options:trickle",
    f"a=fingerprint:sha-256 {FP_OFFER_TEXT}",
    "a=setup:actpass",
    f"a=tls-id:{TLS_ID}",
    "a=mid:0",
    "a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level",
    "a=extmap:3/sendrecv urn:ietf:params:rtp-hdrext:sdes:mid",
    "a=sendrecv",
    "a=msid:stream audio0",
    "a=rtcp-mux",
    "a=rtpmap:111 opus/48000/2",
    "a=rtcp-fb:111 transport-cc",
    "a=fmtp:111 minptime=10;useinbandfec=1",
    "a=ssrc:1001 cname:user@example",
    "a=ssrc:1001 msid:stream audio0",
    "m=video 9 UDP/TLS/RTP/SAVPF 96 97",
    "c=IN IP4 0.0.0.0",
    "b=AS:2000",
    "a=ice-ufrag:EsAw",
    "a=ice-pwd:bP+XJMM09aR8AiX1jdukzR6Y",
    f"a=fingerprint:sha-256 {FP_OFFER_TEXT}",
    "a=setup:actpass",
    f"a=tls-id:{TLS_ID}",
    "a=mid:1",
    "a=extmap:14 urn:ietf:params:rtp-hdrext:toffset",
    "a=sendonly",
    "a=rtcp-mux",
    "a=rtcp-rsize",
    "a=rtpmap:96 VP8/90000",
    "a=rtcp-fb:96 nack",
    "a=rtcp-fb:96 nack pli",
    "a=rtpmap:97 rtx/90000",
    "a=fmtp:97 apt=96",
    "a=ssrc-group:FID 2001 2002",
    "a=ssrc:2001 cname:user@example",
    "a=ssrc:2002 cname:user@example",
]
OFFER = "".join(line + "\r\n" for line in OFFER_LINES)
#: A browser's data channel section (RFC 8841), bundled with the media.
DATACHANNEL_LINES = [
    "m=application 9 UDP/DTLS/SCTP webrtc-datachannel",
    "c=IN IP4 0.0.0.0",
    "a=ice-ufrag:EsAw",
    "a=ice-pwd:bP+XJMM09aR8AiX1jdukzR6Y",
    f"a=fingerprint:sha-256 {FP_OFFER_TEXT}",
    "a=setup:actpass",
    "a=mid:2",
    "a=sctp-port:5000",
    "a=max-message-size:262144",
]
BROWSER_OFFER = OFFER.replace("a=group:BUNDLE 0 1", "a=group:BUNDLE 0 1 2") + "".join(
    line + "\r\n" for line in DATACHANNEL_LINES)

OUR_FP = bytes(range(100, 132))
OUR_TLS_ID = "KD-tls-id_0123456789+/"
OUR_UFRAG = "mdUf"
OUR_PWD = "mdPasswordmdPassword+/"
OUR_CANDIDATES = ["1 1 udp 2130706431 203.0.113.5 3478 typ host"]

MINIMAL = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"


def offer_with(old: str, new: str, count: int = -1) -> str:
    assert old in OFFER, old
    return OFFER.replace(old, new, count)


def line_of(text: str, prefix: str) -> int:
    for number, line in enumerate(text.split("\r\n"), 1):
        if line.startswith(prefix):
            return number
    raise AssertionError(prefix)


def answer(offer: SessionDescription, **overrides: object) -> SessionDescription:
    kwargs: dict[str, object] = {
        "fingerprint": OUR_FP,
        "tls_id": OUR_TLS_ID,
        "ice_ufrag": OUR_UFRAG,
        "ice_pwd": OUR_PWD,
        "candidates": OUR_CANDIDATES,
    }
    kwargs.update(overrides)
    return make_answer(offer, **kwargs)  # type: ignore[arg-type]


class ParseSerializeTests(unittest.TestCase):
    def test_offer_round_trip_byte_exact(self) -> None:
        parsed = parse(OFFER)
        self.assertEqual(parsed.serialize(), OFFER)
        self.assertEqual(parse(parsed.serialize()), parsed)

    def test_structure(self) -> None:
        d = parse(OFFER)
        self.assertEqual(
            d.origin, Origin("-", "4611731400430051336", "2", "IN", "IP4", "127.0.0.1")
        )
        self.assertEqual(d.session_name, "-")
        self.assertEqual(d.timing, (0, 0))
        self.assertEqual(d.version, 0)
        self.assertEqual([m.media for m in d.media], ["audio", "video"])
        audio, video = d.media
        self.assertEqual(audio.port, 9)
        self.assertIsNone(audio.port_count)
        self.assertEqual(audio.proto, "UDP/TLS/RTP/SAVPF")
        self.assertEqual(audio.formats, ("111", "0"))
        self.assertEqual(audio.connection, "IN IP4 0.0.0.0")
        self.assertEqual(video.fields, (Field("c", "IN IP4 0.0.0.0"), Field("b", "AS:2000")))
        # Unknown attributes kept verbatim, in order, value None vs "".
        self.assertEqual(d.attributes[1], Attribute("extmap-allow-mixed"))
        self.assertEqual(d.attributes[2], Attribute("msid-semantic", " WMS stream"))
        self.assertEqual(audio.get("ice-options"), Attribute("ice-options", "trickle"))
        self.assertEqual(audio.get("ice-options").line, line_of(OFFER, "a=ice-options"))

    def test_lf_input_parses_to_same(self) -> None:
        lf = OFFER.replace("\r\n", "\n")
        self.assertEqual(parse(lf), parse(OFFER))
        self.assertEqual(parse(lf).serialize(), OFFER)

    def test_bytes_input_and_missing_final_newline(self) -> None:
        self.assertEqual(parse(OFFER.encode()), parse(OFFER))
        self.assertEqual(parse(OFFER[:-2]), parse(OFFER))

    def test_empty_value_differs_from_no_value(self) -> None:
        with_empty = parse(MINIMAL + "a=foo:\r\n")
        without = parse(MINIMAL + "a=foo\r\n")
        self.assertEqual(with_empty.attributes, (Attribute("foo", ""),))
        self.assertEqual(without.attributes, (Attribute("foo"),))
        self.assertEqual(with_empty.serialize(), MINIMAL + "a=foo:\r\n")

    def test_optional_session_lines_in_order(self) -> None:
        text = (
            "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=x\r\ni=info\r\nu=http://x\r\ne=a@b\r\n"
            "e=c@d\r\np=+1\r\nc=IN IP4 0.0.0.0\r\nb=AS:1\r\nt=0 0\r\nr=1 2 3\r\nt=4 5\r\n"
            "z=0 0\r\nk=prompt\r\na=x\r\nm=audio 9/2 RTP/AVP 0\r\ni=m\r\nc=IN IP4 1.2.3.4\r\n"
            "c=IN IP4 1.2.3.5\r\nb=AS:1\r\nk=prompt\r\na=y\r\n"
        )
        d = parse(text)
        self.assertEqual(d.serialize(), text)
        self.assertEqual(d.media[0].port_count, 2)
        self.assertEqual([f.type for f in d.fields], list("iueepcbtrtzk"))

    def test_serialize_refuses_line_breaks(self) -> None:
        d = parse(MINIMAL).with_attributes("x", ["a\r\nm=audio"])
        self.assertRaises(ValueError, d.serialize)


class ParseErrorTests(unittest.TestCase):
    def assertSdpError(self, text: str, kind: type[SdpError], line: int | None) -> SdpError:
        e = self.assertRaises(kind, parse, text)
        self.assertEqual(e.line, line)
        self.assertIsInstance(e, ProtocolError)
        if line is not None:
            self.assertIn(f"line {line}", str(e))
        return e

    def test_missing_version(self) -> None:
        self.assertSdpError(MINIMAL.replace("v=0\r\n", ""), SdpMissingLine, 1)

    def test_missing_origin(self) -> None:
        self.assertSdpError("v=0\r\ns=-\r\nt=0 0\r\n", SdpMissingLine, 2)

    def test_missing_session_name(self) -> None:
        self.assertSdpError("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\nt=0 0\r\n", SdpMissingLine, 3)

    def test_missing_timing(self) -> None:
        self.assertSdpError("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\n", SdpMissingLine, 4)
        self.assertSdpError("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\na=x\r\n", SdpMissingLine, 4)

    def test_empty(self) -> None:
        self.assertSdpError("", SdpMissingLine, 1)

    def test_media_before_timing(self) -> None:
        text = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nm=audio 9 RTP/AVP 0\r\nt=0 0\r\n"
        self.assertSdpError(text, SdpOrderError, 4)

    def test_out_of_order_and_repeated(self) -> None:
        self.assertSdpError(MINIMAL + "c=IN IP4 0.0.0.0\r\n", SdpOrderError, 5)
        self.assertSdpError(MINIMAL.replace("s=-\r\n", "s=-\r\ns=x\r\n"), SdpOrderError, 4)
        self.assertSdpError(MINIMAL + "m=audio 9 RTP/AVP 0\r\na=x\r\nc=IN IP4 0.0.0.0\r\n",
                            SdpOrderError, 7)  # fmt: skip
        self.assertSdpError(MINIMAL + "m=audio 9 RTP/AVP 0\r\nt=0 0\r\n", SdpOrderError, 6)
        self.assertSdpError(MINIMAL.replace("t=0 0", "r=1 2 3\r\nt=0 0"), SdpOrderError, 4)

    def test_bad_line_syntax(self) -> None:
        self.assertSdpError(MINIMAL + "a = x\r\n", SdpSyntaxError, 5)
        self.assertSdpError(MINIMAL + "A=x\r\n", SdpSyntaxError, 5)
        self.assertSdpError(MINIMAL + "\r\n", SdpSyntaxError, 5)
        self.assertSdpError(MINIMAL + "x=unknown\r\n", SdpSyntaxError, 5)
        self.assertSdpError(MINIMAL + "a=\r\n", SdpSyntaxError, 5)
        self.assertSdpError(MINIMAL + "a=bad name:1\r\n", SdpSyntaxError, 5)
        self.assertSdpError(MINIMAL + "a=x\ry\r\n", SdpSyntaxError, 5)

    def test_bad_field_values(self) -> None:
        self.assertSdpError(MINIMAL.replace("v=0", "v=1"), SdpSyntaxError, 1)
        self.assertSdpError(MINIMAL.replace("- 1 1 IN", "- x 1 IN"), SdpSyntaxError, 2)
        self.assertSdpError(MINIMAL.replace("IN IP4 0.0.0.0", "IN IP4"), SdpSyntaxError, 2)
        self.assertSdpError(MINIMAL.replace("s=-", "s="), SdpSyntaxError, 3)
        self.assertSdpError(MINIMAL.replace("t=0 0", "t=0"), SdpSyntaxError, 4)
        for m in ("m=audio 9 RTP/AVP", "m=audio 70000 RTP/AVP 0", "m=audio x RTP/AVP 0"):
            self.assertSdpError(MINIMAL + m + "\r\n", SdpSyntaxError, 5)
        self.assertSdpError(MINIMAL + "m=audio 9 RTP/AVP 0\r\nb=AS\r\n", SdpSyntaxError, 6)

    def test_not_utf8(self) -> None:
        self.assertSdpError(MINIMAL.encode() + b"a=\xff\r\n", SdpSyntaxError, 5)  # type: ignore[arg-type]

    def test_limits(self) -> None:
        long_line = MINIMAL + "a=x:" + "y" * sdp.MAX_LINE_LENGTH + "\r\n"
        self.assertSdpError(long_line, SdpTooLarge, 5)
        many = MINIMAL + "a=x\r\n" * sdp.MAX_LINES
        self.assertSdpError(many, SdpTooLarge, sdp.MAX_LINES + 1)
        self.assertSdpError("a" * (sdp.MAX_SDP_LENGTH + 1), SdpTooLarge, None)
        # Just under the line limit is fine.
        parse(MINIMAL + "a=x:" + "y" * (sdp.MAX_LINE_LENGTH - 4) + "\r\n")


class AccessorTests(unittest.TestCase):
    def setUp(self) -> None:
        self.offer = parse(OFFER)
        self.audio, self.video = self.offer.media

    def test_fingerprints(self) -> None:
        self.assertEqual(self.audio.fingerprints(), [("sha-256", FP_OFFER)])
        self.assertEqual(self.offer.fingerprints(), [])
        self.assertEqual(self.offer.fingerprints_for(self.audio), [("sha-256", FP_OFFER)])
        session = parse(MINIMAL + "a=fingerprint:SHA-1 " + ":".join(["ab"] * 20) + "\r\n")
        bare = MediaDescription("audio", 9, "RTP/AVP", ("0",))
        self.assertEqual(session.fingerprints_for(bare), [("sha-1", b"\xab" * 20)])

    def test_bad_fingerprints(self) -> None:
        n = line_of(OFFER, "a=fingerprint")
        bad = [
            FP_OFFER_TEXT[:-3],  # 31 bytes
            FP_OFFER_TEXT + ":00",  # 33 bytes
            FP_OFFER_TEXT.replace("00", "0G"),
            FP_OFFER_TEXT.replace(":", "", 1),
            FP_OFFER_TEXT.replace("00", "+0"),
            "",
        ]
        for digest in bad:
            text = offer_with(f"sha-256 {FP_OFFER_TEXT}", f"sha-256 {digest}", 1)
            e = self.assertRaises(BadFingerprint, parse, text)
            self.assertEqual(e.line, n, digest)
        text = offer_with(f"sha-256 {FP_OFFER_TEXT}", "sha-1 " + ":".join(["00"] * 21), 1)
        self.assertEqual(self.assertRaises(BadFingerprint, parse, text).line, n)
        text = offer_with(f"sha-256 {FP_OFFER_TEXT}", FP_OFFER_TEXT, 1)
        self.assertEqual(self.assertRaises(BadFingerprint, parse, text).line, n)

    def test_fingerprint_setter(self) -> None:
        m = self.audio.with_fingerprints([("sha-256", OUR_FP)])
        self.assertEqual(m.fingerprints(), [("sha-256", OUR_FP)])
        self.assertEqual(len(m.get_all("fingerprint")), 1)
        self.assertRaises(BadFingerprint, self.audio.with_fingerprints, [("sha-256", b"x")])

    def test_setup(self) -> None:
        self.assertEqual(self.audio.setup, "actpass")
        self.assertIsNone(self.offer.setup)
        for value in ("actpass", "active", "passive", "holdconn"):
            self.assertEqual(self.audio.with_setup(value).setup, value)
        e = self.assertRaises(BadSetup, parse, offer_with("setup:actpass", "setup:server", 1))
        self.assertEqual(e.line, line_of(OFFER, "a=setup"))
        self.assertRaises(BadSetup, parse, offer_with("setup:actpass", "setup:ACTPASS", 1))
        self.assertRaises(BadSetup, self.audio.with_setup, "client")
        e = self.assertRaises(
            SdpOrderError, parse, offer_with("a=setup:actpass\r\n", "a=setup:actpass\r\n" * 2, 1)
        )
        self.assertEqual(e.line, line_of(OFFER, "a=setup") + 1)

    def test_tls_id(self) -> None:
        self.assertEqual(self.audio.tls_id, TLS_ID)
        n = line_of(OFFER, "a=tls-id")
        for bad in (
            "a" * 19,
            "a" * 256,
            TLS_ID[:-1] + "!",
            TLS_ID[:-1] + "=",
            TLS_ID[:-1] + ".",
            TLS_ID + " x",
        ):
            e = self.assertRaises(BadTlsId, parse, offer_with(TLS_ID, bad, 1))
            self.assertEqual(e.line, n, bad)
        for good in ("a" * 20, "a" * 255, "Az09+/-_" * 3):
            self.assertEqual(parse(offer_with(TLS_ID, good, 1)).media[0].tls_id, good)
        self.assertEqual(self.audio.with_tls_id(OUR_TLS_ID).tls_id, OUR_TLS_ID)
        self.assertRaises(BadTlsId, self.audio.with_tls_id, "short")
        e = self.assertRaises(SdpOrderError, parse, MINIMAL + f"a=tls-id:{TLS_ID}\r\n")
        self.assertEqual(e.line, 5)

    def test_ice_credentials(self) -> None:
        self.assertEqual(self.audio.ice_ufrag, "EsAw")
        self.assertEqual(self.audio.ice_pwd, "bP+XJMM09aR8AiX1jdukzR6Y")
        n = line_of(OFFER, "a=ice-ufrag")
        for bad in ("EsA", "Es-w", "E" * 257):
            e = self.assertRaises(
                BadIceCredentials, parse, offer_with("ufrag:EsAw", "ufrag:" + bad, 1)
            )
            self.assertEqual(e.line, n)
        for bad in ("bP+XJMM09aR8AiX1jdukz", "bP+XJMM09aR8AiX1jdukzR6_"):
            text = offer_with("pwd:bP+XJMM09aR8AiX1jdukzR6Y", "pwd:" + bad, 1)
            self.assertEqual(self.assertRaises(BadIceCredentials, parse, text).line, n + 1)
        m = self.audio.with_ice_credentials(OUR_UFRAG, OUR_PWD)
        self.assertEqual((m.ice_ufrag, m.ice_pwd), (OUR_UFRAG, OUR_PWD))
        self.assertRaises(BadIceCredentials, self.audio.with_ice_credentials, "ab", OUR_PWD)

    def test_ice_lite(self) -> None:
        self.assertFalse(self.offer.ice_lite)
        lite = parse(MINIMAL + "a=ice-lite\r\n")
        self.assertTrue(lite.ice_lite)
        self.assertFalse(lite.with_ice_lite(False).ice_lite)
        self.assertTrue(self.offer.with_ice_lite().ice_lite)
        self.assertRaises(SdpAttributeError, parse, MINIMAL + "a=ice-lite:yes\r\n")
        e = self.assertRaises(
            SdpOrderError, parse, MINIMAL + "m=audio 9 RTP/AVP 0\r\na=ice-lite\r\n"
        )
        self.assertEqual(e.line, 6)

    def test_candidates(self) -> None:
        self.assertEqual(self.audio.candidates(), [OFFER_LINES[11][12:], OFFER_LINES[12][12:]])
        self.assertEqual(self.video.candidates(), [])
        e = self.assertRaises(SdpAttributeError, parse, offer_with("typ host", "type host"))
        self.assertEqual(e.line, 12)
        m = self.video.with_candidates(OUR_CANDIDATES)
        self.assertEqual(m.candidates(), OUR_CANDIDATES)
        self.assertRaises(SdpAttributeError, self.video.with_candidates, ["1 1 udp"])

    def test_rtpmap(self) -> None:
        self.assertEqual(self.audio.rtpmaps(), {111: RtpMap(111, "opus", 48000, 2)})
        self.assertEqual(
            self.video.rtpmaps(),
            {96: RtpMap(96, "VP8", 90000, None), 97: RtpMap(97, "rtx", 90000, None)},
        )
        n = line_of(OFFER, "a=rtpmap:111")
        for bad in ("128 opus/48000", "111 opus", "111 opus/x", "x opus/48000", "111  opus/1"):
            text = offer_with("rtpmap:111 opus/48000/2", "rtpmap:" + bad)
            self.assertEqual(self.assertRaises(SdpAttributeError, parse, text).line, n, bad)
        self.assertRaises(SdpOrderError, parse, MINIMAL + "a=rtpmap:0 PCMU/8000\r\n")

    def test_ssrc(self) -> None:
        self.assertEqual(
            self.audio.ssrc_attributes(),
            [
                SsrcAttribute(1001, "cname", "user@example"),
                SsrcAttribute(1001, "msid", "stream audio0"),
            ],
        )
        self.assertEqual(self.audio.ssrcs(), [1001])
        self.assertEqual(self.video.ssrcs(), [2001, 2002])
        n = line_of(OFFER, "a=ssrc:1001 cname")
        for bad in ("4294967296 cname:x", "1001", "x cname:x", "1001 :x"):
            text = offer_with("ssrc:1001 cname:user@example", "ssrc:" + bad)
            self.assertEqual(self.assertRaises(SdpAttributeError, parse, text).line, n, bad)
        self.assertEqual(
            parse(offer_with("ssrc:1001 cname", "ssrc:4294967295 cname")).media[0].ssrcs(),
            [4294967295, 1001],
        )

    def test_extmap(self) -> None:
        self.assertEqual(
            self.audio.extmaps(),
            [
                ExtMap(1, "urn:ietf:params:rtp-hdrext:ssrc-audio-level"),
                ExtMap(3, "urn:ietf:params:rtp-hdrext:sdes:mid", "sendrecv"),
            ],
        )
        self.assertEqual(self.offer.extmaps(), [])
        n = line_of(OFFER, "a=extmap:1 ")
        for bad in ("0 urn:x", "256 urn:x", "1/sideways urn:x", "1", "x urn:x"):
            text = offer_with(
                "extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level", "extmap:" + bad
            )
            self.assertEqual(self.assertRaises(SdpAttributeError, parse, text).line, n, bad)
        ext = parse(MINIMAL + "a=extmap:4096/recvonly urn:x attr1 attr2\r\n").extmaps()
        self.assertEqual(ext, [ExtMap(4096, "urn:x", "recvonly", "attr1 attr2")])

    def test_mid_bundle_rtcp_mux(self) -> None:
        self.assertEqual([m.mid for m in self.offer.media], ["0", "1"])
        self.assertEqual(self.offer.bundle, ("0", "1"))
        self.assertEqual(self.offer.groups(), [("BUNDLE", ("0", "1"))])
        self.assertTrue(self.audio.rtcp_mux)
        self.assertFalse(self.audio.without("rtcp-mux").rtcp_mux)
        self.assertIsNone(parse(MINIMAL).bundle)
        self.assertEqual(self.offer.with_bundle(["1"]).bundle, ("1",))
        n = line_of(OFFER, "a=mid:0")
        self.assertEqual(
            self.assertRaises(SdpAttributeError, parse, offer_with("mid:0", "mid:a b")).line, n
        )
        self.assertEqual(
            self.assertRaises(SdpAttributeError, parse, offer_with("mid:0", "mid")).line, n
        )
        self.assertEqual(
            self.assertRaises(
                SdpAttributeError, parse, offer_with("rtcp-mux", "rtcp-mux:1", 1)
            ).line,
            line_of(OFFER, "a=rtcp-mux"),
        )
        self.assertRaises(SdpAttributeError, parse, offer_with("BUNDLE 0 1", "BUNDLE 0  1"))
        self.assertRaises(SdpOrderError, parse, offer_with("a=mid:0", "a=mid:0\r\na=mid:2"))
        self.assertRaises(SdpOrderError, parse, MINIMAL + "a=mid:0\r\n")
        self.assertRaises(
            SdpOrderError, parse, MINIMAL + "m=audio 9 RTP/AVP 0\r\na=group:BUNDLE 0\r\n"
        )
        self.assertEqual(self.video.direction, "sendonly")

    def test_identity(self) -> None:
        self.assertEqual(self.offer.identity, IDENTITY)
        self.assertEqual(
            json.loads(base64.b64decode(self.offer.identity)), json.loads(ASSERTION_JSON)
        )
        n = line_of(OFFER, "a=identity")
        for bad in ("", IDENTITY[:-1], IDENTITY + "=", "!!!!", IDENTITY[:-4] + "A=A="):
            text = offer_with(f"identity:{IDENTITY}", f"identity:{bad}")
            self.assertEqual(self.assertRaises(BadIdentity, parse, text).line, n, bad)
        with_ext = parse(offer_with(f"identity:{IDENTITY}", f"identity:{IDENTITY} a=b; c"))
        self.assertEqual(with_ext.identity, IDENTITY)
        self.assertIsNone(parse(MINIMAL).identity)
        self.assertEqual(parse(MINIMAL).with_identity(IDENTITY).identity, IDENTITY)
        self.assertRaises(BadIdentity, parse(MINIMAL).with_identity, "not base64!")
        self.assertRaises(
            SdpOrderError, parse, MINIMAL + f"m=audio 9 RTP/AVP 0\r\na=identity:{IDENTITY}\r\n"
        )

    def test_with_attributes_keeps_position(self) -> None:
        m = self.audio.with_setup("passive")
        self.assertEqual([a.name for a in m.attributes], [a.name for a in self.audio.attributes])
        self.assertEqual(m.get("setup"), Attribute("setup", "passive"))
        self.assertEqual(
            self.audio.with_attributes("new", ["1"]).attributes[-1], Attribute("new", "1")
        )


class AnswerTests(unittest.TestCase):
    def setUp(self) -> None:
        self.offer = parse(OFFER)

    def test_answer(self) -> None:
        a = answer(self.offer, origin=Origin("-", "42", "1", "IN", "IP4", "203.0.113.5"))
        self.assertEqual(parse(a.serialize()), a)
        self.assertTrue(a.ice_lite)
        self.assertEqual(a.bundle, ("0", "1"))
        self.assertEqual(a.origin.session_id, "42")
        self.assertIsNone(a.identity)
        self.assertEqual([m.mid for m in a.media], ["0", "1"])
        self.assertEqual([m.media for m in a.media], ["audio", "video"])
        for m, offered in zip(a.media, self.offer.media, strict=True):
            self.assertEqual(m.formats, offered.formats)
            self.assertEqual(m.proto, offered.proto)
            self.assertNotEqual(m.port, 0)
            self.assertEqual(m.setup, "passive")
            self.assertEqual(m.fingerprints(), [("sha-256", OUR_FP)])
            self.assertEqual(m.tls_id, OUR_TLS_ID)
            self.assertEqual((m.ice_ufrag, m.ice_pwd), (OUR_UFRAG, OUR_PWD))
            self.assertEqual(m.candidates(), OUR_CANDIDATES)
            self.assertTrue(m.rtcp_mux)
            self.assertEqual(m.rtpmaps(), offered.rtpmaps())
            self.assertEqual(m.extmaps(), offered.extmaps())
            self.assertEqual(m.ssrcs(), [])
        self.assertEqual(a.media[0].direction, "sendrecv")
        self.assertEqual(a.media[1].direction, "recvonly")
        self.assertEqual(a.media[1].get_all("fmtp"), [Attribute("fmtp", "97 apt=96")])

    def test_active_offer_gets_passive(self) -> None:
        offer = parse(offer_with("setup:actpass", "setup:active"))
        self.assertEqual([m.setup for m in answer(offer).media], ["passive", "passive"])

    def test_session_level_setup_and_fingerprint(self) -> None:
        text = offer_with("a=setup:actpass\r\n", "").replace(
            f"a=fingerprint:sha-256 {FP_OFFER_TEXT}\r\n", ""
        )
        text = text.replace(
            "a=group:", f"a=fingerprint:sha-256 {FP_OFFER_TEXT}\r\na=setup:actpass\r\na=group:"
        )
        a = answer(parse(text))
        self.assertEqual(a.media[0].setup, "passive")

    def test_refuses_passive_offer(self) -> None:
        offer = parse(offer_with("setup:actpass", "setup:passive"))
        e = self.assertRaises(OfferRefused, answer, offer)
        self.assertIsInstance(e, ProtocolError)
        self.assertIn("passive", str(e))
        for setup in ("holdconn",):
            self.assertRaises(
                OfferRefused, answer, parse(offer_with("setup:actpass", "setup:" + setup))
            )
        # Only one section passive is enough to refuse.
        self.assertRaises(
            OfferRefused, answer, parse(offer_with("setup:actpass", "setup:passive", 1))
        )

    def test_refuses_missing_setup_fingerprint_mid(self) -> None:
        self.assertRaises(OfferRefused, answer, parse(offer_with("a=setup:actpass\r\n", "")))
        no_fp = offer_with(f"a=fingerprint:sha-256 {FP_OFFER_TEXT}\r\n", "")
        self.assertRaises(OfferRefused, answer, parse(no_fp))
        self.assertRaises(OfferRefused, answer, parse(offer_with("a=mid:1\r\n", "")))

    def test_codec_filter_and_rejected_sections(self) -> None:
        a = answer(self.offer, codecs=["opus"])
        audio, video = a.media
        self.assertEqual(audio.formats, ("111",))
        self.assertEqual(video.port, 0)
        self.assertEqual(video.mid, "1")
        self.assertIsNone(video.setup)
        self.assertEqual(a.bundle, ("0",))
        self.assertEqual(parse(a.serialize()), a)
        v = answer(self.offer, codecs=["VP8", "rtx"]).media[1]
        self.assertEqual(v.formats, ("96", "97"))
        self.assertEqual(len(v.get_all("rtcp-fb")), 2)
        rejected = parse(offer_with("m=video 9 ", "m=video 0 "))
        a = answer(rejected)
        self.assertEqual(a.media[1].port, 0)
        self.assertEqual(a.bundle, ("0",))

    def test_browser_offer_data_channel_rejected_and_unbundled(self) -> None:
        # audio + video + data channel, all bundled: the MD cannot relay SCTP
        offer = parse(BROWSER_OFFER)
        a = answer(offer)
        self.assertEqual(parse(a.serialize()), a)
        self.assertEqual([(m.mid, m.media) for m in a.media],
                         [("0", "audio"), ("1", "video"), ("2", "application")])
        audio, video, data = a.media
        self.assertNotEqual(audio.port, 0)
        self.assertNotEqual(video.port, 0)
        self.assertEqual((data.port, data.proto, data.formats),
                         (0, "UDP/DTLS/SCTP", ("webrtc-datachannel",)))
        self.assertEqual(data.attributes, (Attribute("mid", "2"),))
        self.assertEqual(a.bundle, ("0", "1"))
        self.assertEqual(a.serialize().count("\r\nm="), 3)
        # the data channel offered first: the answerer-tagged section is the next one
        # (RFC 8843 s7.3.1) and the data channel still leaves the group
        first = parse(BROWSER_OFFER.replace("a=mid:2", "a=mid:9").replace(
            "a=group:BUNDLE 0 1 2", "a=group:BUNDLE 9 0 1"))
        self.assertEqual(answer(first).bundle, ("0", "1"))

    def test_sections_the_md_cannot_relay_are_rejected(self) -> None:
        for old, new, why in (
                ("m=video 9 UDP/TLS/RTP/SAVPF", "m=video 9 RTP/AVP", "not DTLS-SRTP"),
                ("m=video 9 UDP/TLS/RTP/SAVPF", "m=video 9 TCP/TLS/RTP/SAVPF", "not DTLS"),
                ("m=video 9 UDP/TLS/RTP/SAVPF 96 97", "m=text 9 UDP/TLS/RTP/SAVPF 96 97",
                 "not audio or video"),
                ("a=sendonly\r\na=rtcp-mux\r\n", "a=sendonly\r\n", "rtcp-mux")):
            a = answer(parse(offer_with(old, new)))
            self.assertEqual([m.port != 0 for m in a.media], [True, False], why)
            self.assertEqual(a.bundle, ("0",))
            self.assertIn(why, sdp.unrelayable(parse(offer_with(old, new)).media[1]))

    def test_offer_with_nothing_to_relay_is_refused(self) -> None:
        only_data = MINIMAL + "a=group:BUNDLE 2\r\n" + "".join(
            line + "\r\n" for line in DATACHANNEL_LINES)
        e = self.assertRaises(OfferRefused, answer, parse(only_data))
        self.assertIn("no m= section the MD can relay", str(e))
        self.assertIn("mid 2 (application UDP/DTLS/SCTP): m=application is not audio or video",
                      str(e))
        e = self.assertRaises(OfferRefused, answer, self.offer, codecs=["G722"])
        self.assertIn("mid 1 (video UDP/TLS/RTP/SAVPF): none of the MD's codecs", str(e))

    def test_no_ice_lite_and_no_bundle(self) -> None:
        a = answer(parse(offer_with("a=group:BUNDLE 0 1\r\n", "")), ice_lite=False)
        self.assertFalse(a.ice_lite)
        self.assertIsNone(a.bundle)

    def test_bad_local_parameters(self) -> None:
        self.assertRaises(ValueError, answer, self.offer, setup="active")
        self.assertRaises(ValueError, answer, self.offer, fingerprint=b"short")
        self.assertRaises(ValueError, answer, self.offer, tls_id="bad")
        self.assertRaises(ValueError, answer, self.offer, ice_ufrag="a")
        self.assertRaises(ValueError, answer, self.offer, ice_pwd="a")
        self.assertRaises(ValueError, answer, self.offer, candidates=["nope"])


# ----------------------------------------------------------------------------- hypothesis

tokens = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=8)
values = st.one_of(
    st.none(),
    st.text(
        alphabet=st.characters(blacklist_characters="\r\n\0", blacklist_categories=("Cs",)),
        max_size=20,
    ),
)
attributes = st.lists(
    st.builds(Attribute, tokens.filter(lambda t: t not in sdp._VALIDATORS), values), max_size=5
)
media_sections = st.builds(
    MediaDescription,
    media=tokens,
    port=st.integers(0, 65535),
    proto=st.sampled_from(["RTP/AVP", "UDP/TLS/RTP/SAVPF", "UDP/DTLS/SCTP"]),
    formats=st.lists(st.integers(0, 127).map(str), min_size=1, max_size=4).map(tuple),
    port_count=st.one_of(st.none(), st.integers(1, 9)),
    fields=st.lists(
        st.sampled_from([Field("c", "IN IP4 0.0.0.0"), Field("b", "AS:30")]), max_size=2
    ).map(lambda fs: tuple(sorted(fs, key=lambda f: "icbk".index(f.type)))),
    attributes=attributes.map(tuple),
)
descriptions = st.builds(
    SessionDescription,
    origin=st.builds(
        Origin,
        tokens,
        st.integers(0, 2**63).map(str),
        st.integers(0, 9).map(str),
        st.just("IN"),
        st.sampled_from(["IP4", "IP6"]),
        tokens,
    ),
    session_name=st.text(
        alphabet=st.characters(blacklist_characters="\r\n\0", blacklist_categories=("Cs",)),
        min_size=1,
        max_size=10,
    ),
    fields=st.lists(st.integers(0, 99), min_size=1, max_size=3).map(
        lambda ts: tuple(Field("t", f"{t} 0") for t in ts)
    ),
    attributes=attributes.map(tuple),
    media=st.lists(media_sections, max_size=3).map(tuple),
)


line_text = st.text(alphabet=st.characters(blacklist_characters="\r\n"), max_size=12)


def mutate(lines: list[str], data: st.DataObject) -> str:
    lines = list(lines)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(lines) - 1))
        op = data.draw(st.sampled_from(["drop", "dup", "swap", "edit", "truncate", "insert"]))
        if op == "drop" and len(lines) > 1:
            del lines[i]
        elif op == "dup":
            lines.insert(i, lines[i])
        elif op == "swap":
            j = data.draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "edit" and lines[i]:
            k = data.draw(st.integers(0, len(lines[i]) - 1))
            lines[i] = lines[i][:k] + data.draw(line_text) + lines[i][k + 1 :]
        elif op == "truncate":
            lines[i] = lines[i][: data.draw(st.integers(0, len(lines[i])))]
        elif op == "insert":
            lines.insert(i, data.draw(line_text))
    return "".join(line + "\r\n" for line in lines)


class PropertyTests(unittest.TestCase):
    @FUZZ
    @given(st.text(max_size=300))
    def test_random_text(self, text: str) -> None:
        try:
            d = parse(text)
        except SdpError:
            return
        self.assertIsInstance(d, SessionDescription)

    @FUZZ
    @given(st.binary(max_size=300))
    def test_random_bytes(self, data: bytes) -> None:
        try:
            parse(data)
        except SdpError:
            pass

    @FUZZ
    @given(st.data())
    def test_mutated_offer(self, data: st.DataObject) -> None:
        text = mutate(OFFER_LINES, data)
        try:
            d = parse(text)
        except SdpError as e:
            self.assertTrue(e.line is None or 1 <= e.line <= text.count("\n") + 1)
            return
        self.assertEqual(parse(d.serialize()), d)
        # Whatever parses keeps all its lines (no silent drops).
        self.assertEqual(d.serialize(), text)

    @FUZZ
    @given(descriptions)
    def test_round_trip(self, d: SessionDescription) -> None:
        text = d.serialize()
        self.assertEqual(parse(text), d)
        self.assertEqual(parse(text).serialize(), text)
