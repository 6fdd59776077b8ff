"""The reference Endpoint's SFU behaviour: audio levels, talking, simulcast, feedback, stats.

The Endpoint's session is a real ParticipantSession keyed through the real
MediaPlane and KeyDistributorCore of :mod:`tests.unit.test_participant`;
what it writes to its UDP port is recorded (the MD address is the Net's
invented one) and handed to the Net's MD.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor, task
from twisted.trial import unittest

from perc_daemons.endpoint import cli
from perc_daemons.endpoint.client import Endpoint
from perc_daemons.endpoint.media import QUIET_FRAMES, SimulcastVideo, ToneSource
from perc_daemons.protocol import extensions, feedback
from perc_daemons.protocol.participant import EXTMAP_IDS, KeyframeRequested, MediaReceived
from perc_daemons.protocol.participant import RtcpReceived as _Rtcp
from perc_daemons.protocol.rtp import build_compound, receiver_report
from perc_daemons.protocol.srtp import hop_protect_rtcp
from tests.unit.test_participant import Net

AUDIO_LEVEL = EXTMAP_IDS[extensions.AUDIO_LEVEL_URI]
RID = EXTMAP_IDS[extensions.RID_URI]
FRAME_MARKING = EXTMAP_IDS[extensions.FRAME_MARKING_URI]


class EndpointSfuTests(unittest.TestCase):
    def setUp(self) -> None:
        self.endpoint = Endpoint(reactor, kmf_url="https://127.0.0.1:1", md_url="https://127.0.0.1:2",
                                 ca="unused", conference_id="conf-1", user="alice",
                                 password="x", video="simulcast", bandwidth=600_000,
                                 video_source=SimulcastVideo(keyframe_every=8),
                                 receive={"last_n": 2, "max_height": 360})
        self.net = Net(self)
        self.a = self.net.join("alice", video_ssrcs=self.endpoint.video_ssrcs)
        self.b = self.net.join("bob")
        self.endpoint.session = self.a.session
        self.endpoint.ssrc = self.a.ssrc
        self.port = self.endpoint._port = _Port()
        self.endpoint.reactor = _At(self.net)

    def relay(self, datagram: bytes) -> None:
        self.net.send_from(self.a, [datagram])
        self.net.run()

    def test_audio_carries_its_level_and_room_noise_when_not_talking(self) -> None:
        tone = ToneSource(440, amplitude=0.3)
        loud = self.endpoint.send_frame(tone.next_frame())
        self.assertIn(extensions.audio_level(extensions.find_extension(loud, AUDIO_LEVEL)),
                      ((13, True), (14, True)))
        self.endpoint.talking = False
        quiet = self.endpoint.send_frame(tone.next_frame())
        level, voice = extensions.audio_level(extensions.find_extension(quiet, AUDIO_LEVEL))
        self.assertEqual(voice, False)
        self.assertTrue(55 <= level <= 65, level)  # a quiet room, not digital silence
        self.relay(loud)
        self.relay(quiet)
        got = [e.payload for e in self.b.media_from(self.a)]
        self.assertIn(got[1], QUIET_FRAMES)
        self.assertNotIn(got[0], QUIET_FRAMES)

    def test_simulcast_frames_on_their_ssrcs_and_key_frames_on_request(self) -> None:
        endpoint, video = self.endpoint, self.endpoint.video_source
        assert video is not None
        sent = []
        for encoding, frame in video.next_frames():
            sent.append(endpoint.send_frame(frame, ssrc=endpoint.video_ssrcs[encoding]))
        self.assertEqual([extensions.find_extension(d, RID) for d in sent], [b"h", b"m", b"l"])
        self.assertTrue(all(extensions.is_keyframe_start(extensions.find_extension(
            d, FRAME_MARKING)) for d in sent))
        for d in sent:
            self.relay(d)
        self.assertEqual({e.ssrc for e in self.b.of(MediaReceived)}, set(endpoint.video_ssrcs))
        # bob asks for a key frame of m: its next frame (index 2) is one, h's (index 1) not
        self.net.send_from(self.b, [self.b.session.send_rtcp(
            now=self.net.now, pli_ssrc=endpoint.video_ssrcs[1])])
        self.net.run()
        for event in self.a.of(KeyframeRequested):  # the Net collected alice's events
            endpoint._event(event)
        self.assertEqual(endpoint.keyframe_requests, {endpoint.video_ssrcs[1]: 1})
        [(_, h1)] = video.next_frames()
        [(_, h2), (_, m2)] = video.next_frames()
        self.assertEqual((h1.keyframe, h2.keyframe, m2.keyframe), (False, False, True))
        m_wire = endpoint.send_frame(m2, ssrc=endpoint.video_ssrcs[1])
        self.assertTrue(extensions.is_keyframe_start(
            extensions.find_extension(m_wire, FRAME_MARKING)))
        stats = endpoint.stats()
        json.dumps(stats)
        self.assertEqual({s["ssrc"]: s["packets"] for s in stats["sent_ssrcs"]},
                         {self.a.ssrc: 0, endpoint.video_ssrcs[0]: 1,
                          endpoint.video_ssrcs[1]: 2, endpoint.video_ssrcs[2]: 1})
        self.assertEqual(stats["keyframe_requests"], [{"ssrc": endpoint.video_ssrcs[1],
                                                       "count": 1}])
        self.assertEqual(stats["video_ssrcs"], endpoint.video_ssrcs)

    def test_rtcp_tick_sends_an_rr_with_the_remb(self) -> None:
        self.net.send(self.b, b"\x00" * 160)
        self.endpoint._rtcp_tick()
        [datagram] = [d for d in self.port.written if 192 <= d[1] <= 223]
        self.relay(datagram)
        parsed = [feedback.parse_feedback(p) for e in self.b.of(_Rtcp) for p in e.packets]
        [remb] = [f for f in parsed if f is not None and f.kind == "remb"]
        self.assertEqual(remb.media_ssrcs, (self.b.ssrc,))
        self.assertTrue(590_000 < remb.bitrate <= 600_000)

    def test_speaker_hints_are_recorded(self) -> None:
        hint = feedback.build_speaker_hint(1, feedback.SpeakerHint(3, (self.b.ssrc,)))
        rtcp = hop_protect_rtcp(self.net.plane.leg(self.a.aid).outbound,
                                build_compound([receiver_report(1), hint]))
        self.endpoint.offer_at = self.net.now
        self.a.session.datagram_received(rtcp, self.net.now)
        self.endpoint._drain()
        self.assertEqual(self.endpoint.speaker_hints,
                         [{"at": 0.0, "sequence": 3, "speakers": [self.b.ssrc]}])
        self.assertEqual(self.endpoint.stats()["speaker_hints"], 1)

    def test_via_a_relay(self) -> None:
        """With ``via`` every datagram goes to the relay, and only the relay's come in."""
        relay = ("127.0.0.1", 40000)
        self.endpoint.via = relay
        self.assertEqual(self.endpoint.media_peer, relay)
        self.endpoint.send_frame(ToneSource(440).next_frame())
        self.assertEqual(self.port.to, [relay])
        caught: list[bytes] = []  # what the MD sends alice, before her session sees it

        def catch(data: bytes, src: object, dst: object) -> bytes | None:
            if dst == self.a.address:
                caught.append(data)
                return None
            return data

        self.net.filter = catch
        self.net.send(self.b, b"\x01" * 160)
        self.net.filter = None
        [datagram] = caught
        self.endpoint._datagram(datagram, tuple(self.a.session.md_address))
        self.assertEqual(self.endpoint.foreign_datagrams, 1)  # the MD itself: not our path
        self.endpoint._datagram(datagram, relay)
        self.assertEqual(self.endpoint.foreign_datagrams, 1)
        self.assertEqual(self.endpoint.senders[self.b.ssrc].packets, 1)
        self.endpoint.via = None
        self.assertEqual(self.endpoint.media_peer, tuple(self.a.session.md_address))

    def test_bad_parameters(self) -> None:
        for bad in ({"video": "svc"}, {"video": "simulcast", "kind": "video"},
                    {"bandwidth": -1}, {"rtcp_interval": 0}):
            self.assertRaises(ValueError, Endpoint, reactor, kmf_url="https://x", md_url="https://y",
                              ca="c", conference_id="c", user="u", password="p", **bad)


class _Port:
    """The Endpoint's UDP port: what it writes, in order (all to the MD's address)."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.to: list[tuple[str, int]] = []

    def write(self, datagram: bytes, address: tuple[str, int]) -> None:
        self.written.append(datagram)
        self.to.append(tuple(address))


class _At:
    """The Net's clock as the Endpoint's reactor clock (seconds only)."""

    def __init__(self, net: Net) -> None:
        self.net = net
        self.timers = task.Clock()  # the session's timers: scheduled, never run here

    def seconds(self) -> float:
        return self.net.now

    def callLater(self, delay: float, f: Any, *args: Any) -> Any:
        return self.timers.callLater(delay, f, *args)


class CliTests(unittest.TestCase):
    def test_sfu_flags(self) -> None:
        base = ["--ca", "ca", "--conference", "c", "--user", "alice"]
        args = cli.parse_args([*base, "--simulcast", "--no-audio-level", "--last-n", "3",
                               "--max-height", "360", "--bandwidth", "500000"])
        self.assertTrue(args.simulcast)
        self.assertFalse(args.audio_level)
        self.assertEqual(args.keyframe_every, 60)
        self.assertEqual(cli.receive_preferences(args),
                         {"last_n": 3, "max_height": 360, "max_bitrate": 500000})
        args = cli.parse_args(base)
        self.assertTrue(args.audio_level)
        self.assertEqual((args.keyframe_every, cli.receive_preferences(args)), (30, None))
        self.assertRaises(cli.UsageError, cli.parse_args, [*base, "--simulcast", "--video"])
        self.assertRaises(cli.UsageError, cli.parse_args,
                          [*base, "--simulcast", "--keyframe-every", "30"])
