"""Tests for a=rid (RFC 8851 s10) and a=simulcast (RFC 8853 s5.1) in perc_daemons.protocol.sdp."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from perc_daemons.protocol.sdp import (
    Attribute,
    BadRid,
    BadSimulcast,
    MediaDescription,
    Rid,
    SdpAttributeError,
    SdpError,
    SdpOrderError,
    Simulcast,
    parse,
)
from tests.unit.test_sdp import MINIMAL, OFFER, answer, line_of, offer_with

FUZZ = settings(max_examples=300, deadline=None)

#: The offer's video section sending three simulcast encodings (RFC 8853 s6.1 shape).
SIMULCAST_LINES = (
    "a=rid:h send pt=96;max-width=1280;max-height=720\r\n"
    "a=rid:m send max-height=360;max-fps=15\r\n"
    "a=rid:l send max-height=180;max-bpp=0.5;custom\r\n"
    "a=simulcast:send h;m;~l\r\n"
)
SIMULCAST_OFFER = offer_with("a=rtpmap:96 VP8/90000\r\n",
                             "a=rtpmap:96 VP8/90000\r\n" + SIMULCAST_LINES)


def video_with(lines: str) -> str:
    """OFFER with ``lines`` (CRLF-terminated a= lines) added to its video section."""
    return offer_with("a=rtpmap:96 VP8/90000\r\n", "a=rtpmap:96 VP8/90000\r\n" + lines)


class RidTests(unittest.TestCase):
    def test_parse(self) -> None:
        video = parse(SIMULCAST_OFFER).media[1]
        self.assertEqual(video.rids(), [
            Rid("h", "send", ("96",), {"max-width": "1280", "max-height": "720"}),
            Rid("m", "send", (), {"max-height": "360", "max-fps": "15"}),
            Rid("l", "send", (), {"max-height": "180", "max-bpp": "0.5", "custom": ""}),
        ])
        self.assertEqual(video.simulcast(), Simulcast(send=(("h",), ("m",), ("l",)),
                                                      paused=frozenset({"l"})))
        self.assertEqual(parse(OFFER).media[1].rids(), [])
        self.assertIsNone(parse(OFFER).media[1].simulcast())

    def test_round_trip_byte_exact(self) -> None:
        self.assertEqual(parse(SIMULCAST_OFFER).serialize(), SIMULCAST_OFFER)
        for rid in parse(SIMULCAST_OFFER).media[1].rids():
            self.assertEqual(parse(video_with(f"a=rid:{rid.render()}\r\n")).media[1].rids(),
                             [rid])

    def test_bad_rid_lines_name_their_line(self) -> None:
        for bad in ("", "h", "h sendrecv", "h send ", "h  send", "h!x send", "x" * 256 + " send",
                    "h send pt=", "h send pt=96,", "h send max-height=big",
                    "h send max-height=720;max-height=360", "h send max-bpp=1",
                    "h send depend=a b", "h send a;;b", "h send =3", "h send pt=96;pt=97",
                    "h send max-width=1;pt=96"):
            text = video_with(f"a=rid:{bad}\r\n")
            e = self.assertRaises(BadRid, parse, text)
            self.assertEqual(e.line, line_of(text, "a=rid"), bad)
            self.assertEqual(e.reason, "sdp_bad_rid")
            self.assertIsInstance(e, SdpAttributeError)

    def test_rid_must_fit_its_section(self) -> None:
        # pt= must name formats of the m= line (RFC 8851 s4), a rid-id once per section
        self.assertRaises(BadRid, parse, video_with("a=rid:h send pt=111\r\n"))
        self.assertRaises(BadRid, parse, video_with("a=rid:h send\r\na=rid:h recv\r\n"))
        self.assertRaises(SdpOrderError, parse, MINIMAL + "a=rid:h send\r\n")
        self.assertEqual(parse(video_with("a=rid:h send pt=96,97\r\n")).media[1].rids(),
                         [Rid("h", "send", ("96", "97"))])


class SimulcastTests(unittest.TestCase):
    def test_parse_both_directions_and_alternatives(self) -> None:
        text = video_with("a=rid:1 send\r\na=rid:2 send\r\na=rid:3 send\r\n"
                          "a=rid:4 recv\r\na=rid:5 recv\r\n"
                          "a=simulcast:recv 4;~5 send 1,2;3\r\n")
        simulcast = parse(text).media[1].simulcast()
        self.assertEqual(simulcast, Simulcast(send=(("1", "2"), ("3",)), recv=(("4",), ("5",)),
                                              paused=frozenset({"5"})))
        assert simulcast is not None
        self.assertEqual(simulcast.rid_ids("send"), ["1", "2", "3"])
        self.assertEqual(simulcast.rid_ids("recv"), ["4", "5"])
        self.assertEqual(simulcast.reversed().send, simulcast.recv)
        self.assertEqual(simulcast.render(), "send 1,2;3 recv 4;~5")

    def test_bad_simulcast_lines(self) -> None:
        rids = "a=rid:h send\r\na=rid:m send\r\na=rid:r recv\r\n"
        for bad in ("", "send", "send h;m recv", "sendrecv h", "send h;m send h", "send h;;m",
                    "send h,", "send ~~h", "send h;h", "send h recv h", "send  h",
                    "send h recv r extra"):
            text = video_with(rids + f"a=simulcast:{bad}\r\n")
            e = self.assertRaises(BadSimulcast, parse, text)
            self.assertEqual(e.line, line_of(text, "a=simulcast"), bad)
            self.assertEqual(e.reason, "sdp_bad_simulcast")

    def test_simulcast_names_declared_rids_of_its_direction(self) -> None:
        # RFC 8853 s5.1: each rid-id is defined by an a=rid of the same direction
        rids = "a=rid:h send\r\na=rid:r recv\r\n"
        for bad in ("send h;x", "send r", "recv h", "send h recv x"):
            self.assertRaises(BadSimulcast, parse, video_with(rids + f"a=simulcast:{bad}\r\n"))
        self.assertRaises(SdpOrderError, parse,
                          video_with(rids + "a=simulcast:send h\r\na=simulcast:send h\r\n"))
        self.assertRaises(SdpOrderError, parse, MINIMAL + "a=simulcast:send h\r\n")

    def test_with_simulcast_builds_and_checks(self) -> None:
        video = parse(OFFER).media[1]
        rids = [Rid("h", "send", ("96",), {"max-height": "720"}), Rid("l", "send")]
        built = video.with_simulcast(rids, Simulcast(send=(("h",), ("l",))))
        self.assertEqual(built.rids(), rids)
        self.assertEqual(built.simulcast(), Simulcast(send=(("h",), ("l",))))
        self.assertEqual(built.get("simulcast"), Attribute("simulcast", "send h;l"))
        self.assertEqual(built.with_simulcast([], None).rids(), [])
        self.assertRaises(BadSimulcast, video.with_simulcast, rids, Simulcast(send=(("x",),)))
        self.assertRaises(BadRid, video.with_simulcast, [Rid("h", "send", ("5",))], None)
        self.assertRaises(BadRid, video.with_simulcast, [Rid("h h", "send")], None)


class AnswerMirrorsSimulcastTests(unittest.TestCase):
    def test_send_becomes_recv(self) -> None:
        a = answer(parse(SIMULCAST_OFFER))
        self.assertEqual(parse(a.serialize()), a)
        video = a.media[1]
        self.assertEqual([(r.id, r.direction, r.formats, r.params) for r in video.rids()], [
            ("h", "recv", ("96",), {"max-width": "1280", "max-height": "720"}),
            ("m", "recv", (), {"max-height": "360", "max-fps": "15"}),
            ("l", "recv", (), {"max-height": "180", "max-bpp": "0.5", "custom": ""}),
        ])
        self.assertEqual(video.simulcast(), Simulcast(recv=(("h",), ("m",), ("l",)),
                                                      paused=frozenset({"l"})))
        self.assertEqual(a.media[0].rids(), [])
        self.assertIsNone(a.media[0].simulcast())

    def test_recv_becomes_send(self) -> None:
        offer = parse(video_with("a=rid:r recv max-height=360\r\na=simulcast:recv r\r\n"))
        video = answer(offer).media[1]
        self.assertEqual(video.rids(), [Rid("r", "send", (), {"max-height": "360"})])
        self.assertEqual(video.simulcast(), Simulcast(send=(("r",),)))

    def test_rids_of_refused_formats_leave_the_answer(self) -> None:
        text = video_with("a=rid:v send pt=96\r\na=rid:x send pt=97\r\na=rid:b send pt=96,97\r\n"
                          "a=simulcast:send v;x,b\r\n")
        video = answer(parse(text), codecs=["VP8", "opus"]).media[1]
        self.assertEqual(video.formats, ("96",))
        self.assertEqual([(r.id, r.formats) for r in video.rids()], [("v", ("96",)),
                                                                     ("b", ("96",))])
        self.assertEqual(video.simulcast(), Simulcast(recv=(("v",), ("b",))))
        only_x = video_with("a=rid:x send pt=97\r\na=simulcast:send x\r\n")
        video = answer(parse(only_x), codecs=["VP8", "opus"]).media[1]
        self.assertEqual(video.rids(), [])
        self.assertIsNone(video.simulcast())


rid_ids = st.text(alphabet="abcxyzAZ019-_", min_size=1, max_size=6)
param_names = st.sampled_from(["max-width", "max-height", "max-fps", "max-br", "x-custom",
                               "depend"])


@st.composite
def rids(draw: st.DrawFn) -> Rid:
    params = {}
    for name in draw(st.lists(param_names, unique=True, max_size=4)):
        if name == "depend":
            params[name] = ",".join(draw(st.lists(rid_ids, min_size=1, max_size=3)))
        elif name == "x-custom":
            params[name] = draw(st.text(alphabet="abc =:<>", max_size=6))
        else:
            params[name] = str(draw(st.integers(0, 10**6)))
    formats = tuple(draw(st.lists(st.sampled_from(["96", "97"]), unique=True, max_size=2)))
    return Rid(draw(rid_ids), draw(st.sampled_from(["send", "recv"])), formats, params)


rid_chars = st.text(alphabet="hml~,;; abcsendrecv01-_", max_size=30)


class PropertyTests(unittest.TestCase):
    @FUZZ
    @given(rid_chars, rid_chars)
    def test_random_rid_and_simulcast_only_raise_sdp_errors(self, rid: str, sc: str) -> None:
        text = video_with(f"a=rid:{rid}\r\na=simulcast:{sc}\r\n")
        try:
            video = parse(text).media[1]
        except SdpError:
            return
        self.assertEqual(len(video.rids()), 1)
        self.assertIsNotNone(video.simulcast())
        self.assertEqual(parse(text).serialize(), text)

    @FUZZ
    @given(st.lists(rids(), max_size=4, unique_by=lambda r: r.id), st.data())
    def test_built_rids_round_trip_and_mirror(self, built: list[Rid], data: st.DataObject) -> None:
        sending = [r.id for r in built if r.direction == "send"]
        receiving = [r.id for r in built if r.direction == "recv"]
        simulcast = Simulcast(
            send=tuple((r,) for r in data.draw(st.permutations(sending))),
            recv=tuple((r,) for r in receiving),
        )
        offer = parse(OFFER)
        video: MediaDescription = offer.media[1].with_simulcast(
            built, simulcast if sending or receiving else None)
        offer = dataclasses.replace(offer, media=(offer.media[0], video))
        self.assertEqual(parse(offer.serialize()).media[1].rids(), built)
        mirrored = answer(parse(offer.serialize())).media[1]
        self.assertEqual(mirrored.rids(), [r.reversed() for r in built])
        if sending or receiving:
            self.assertEqual(mirrored.simulcast(), simulcast.reversed())
