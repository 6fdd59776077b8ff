"""ParticipantSession as an SFU's endpoint: simulcast and audio-level sending, repair, feedback.

The sessions run against the real MediaPlane and KeyDistributorCore of
:mod:`tests.unit.test_participant` (:class:`Net`), in memory, explicit time.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from typing import Any

from twisted.trial import unittest

from perc_daemons.protocol import extensions, feedback, sdp
from perc_daemons.protocol.extensions import FrameMarks
from perc_daemons.protocol.participant import (
    EXTMAP_IDS,
    KeyframeRequested,
    MediaReceived,
    RtcpReceived,
    SpeakerHintReceived,
    build_offer,
    new_ice_credentials,
    new_tls_id,
)
from perc_daemons.protocol.rtp import PSFB, RTPFB, RtcpPacket, build_compound, receiver_report
from perc_daemons.protocol.srtp import hop_protect_rtcp
from tests.unit.test_participant import HOLD, MD_ADDR, Net, Participant

AUDIO_LEVEL, MID, RID, FRAME_MARKING = (EXTMAP_IDS[u] for u in (
    extensions.AUDIO_LEVEL_URI, extensions.MID_URI, extensions.RID_URI,
    extensions.FRAME_MARKING_URI))
KEY_START = FrameMarks(True, True, True, False, False, 0, None, None)
DELTA = FrameMarks(True, True, False, False, False, 0, None, None)


def video_ssrcs() -> list[int]:
    return [int.from_bytes(os.urandom(4), "big") for _ in range(3)]


def is_rtp(data: bytes) -> bool:
    return len(data) > 1 and 128 <= data[0] <= 191 and not 192 <= data[1] <= 223


def is_rtcp(data: bytes) -> bool:
    return len(data) > 1 and 128 <= data[0] <= 191 and 192 <= data[1] <= 223


def seq_of(data: bytes) -> int:
    return struct.unpack_from("!H", data, 2)[0]


def ssrc_of(data: bytes) -> int:
    return struct.unpack_from("!I", data, 8)[0]


def drop_audio_level(answer: sdp.SessionDescription) -> sdp.SessionDescription:
    """An MD whose answer turns audio levels off: it keeps every a=extmap but id 1."""
    media = tuple(m.with_attributes("extmap", [a.value for a in m.get_all("extmap")
                                               if not (a.value or "").startswith("1 ")])
                  for m in answer.media)
    return dataclasses.replace(answer, media=media)


class OfferTests(unittest.TestCase):
    def offer(self, **kw: Any) -> sdp.SessionDescription:
        ufrag, pwd = new_ice_credentials()
        return sdp.parse(build_offer(assertion_json='{"a": 1}', fingerprint=os.urandom(32),
                                     tls_id=new_tls_id(), ice_ufrag=ufrag, ice_pwd=pwd,
                                     ssrc=0xA0D10, cname="alice", **kw))

    def test_simulcast_offer(self) -> None:
        offer = self.offer(video_ssrcs=[11, 12, 13])
        self.assertEqual(offer.bundle, ("0", "1"))
        audio, video = offer.media
        self.assertEqual((audio.media, audio.mid, audio.formats), ("audio", "0", ("0",)))
        self.assertEqual((video.media, video.mid, video.formats), ("video", "1", ("96",)))
        self.assertEqual([(e.id, e.uri) for e in audio.extmaps()],
                         [(1, extensions.AUDIO_LEVEL_URI), (2, extensions.MID_URI)])
        self.assertEqual([(e.id, e.uri) for e in video.extmaps()],
                         [(2, extensions.MID_URI), (3, extensions.RID_URI),
                          (4, extensions.REPAIRED_RID_URI), (5, extensions.FRAME_MARKING_URI)])
        self.assertEqual([(r.id, r.direction, r.params["max-height"]) for r in video.rids()],
                         [("h", "send", "720"), ("m", "send", "360"), ("l", "send", "180")])
        self.assertEqual(video.simulcast(), sdp.Simulcast(send=(("h",), ("m",), ("l",))))
        self.assertEqual([a.value for a in video.get_all("rtcp-fb")],
                         ["96 nack", "96 nack pli", "96 ccm fir", "96 goog-remb"])
        self.assertEqual(audio.ssrcs(), [0xA0D10])
        self.assertEqual(video.ssrcs(), [11, 12, 13])
        self.assertEqual(video.tls_id, audio.tls_id)
        self.assertEqual(video.fingerprints(), audio.fingerprints())

    def test_without_audio_level_and_without_video(self) -> None:
        [audio] = self.offer(audio_level=False).media
        self.assertEqual([e.uri for e in audio.extmaps()], [extensions.MID_URI])
        [audio] = self.offer().media
        self.assertEqual([e.id for e in audio.extmaps()], [1, 2])
        one = self.offer(video_ssrcs=[11]).media[1]  # one video SSRC: no simulcast
        self.assertEqual((one.rids(), one.simulcast(), one.ssrcs()), ([], None, [11]))

    def test_bad_video_parameters(self) -> None:
        for bad in ({"video_ssrcs": [1, 2, 3, 4]}, {"video_ssrcs": [0xA0D10]},
                    {"video_ssrcs": [5, 5]}, {"video_ssrcs": [1 << 32]},
                    {"video_ssrcs": [5], "kind": "video"}):
            self.assertRaises(ValueError, self.offer, **bad)


class SimulcastSendingTests(unittest.TestCase):
    def setUp(self) -> None:
        self.net = Net(self)
        self.videos = video_ssrcs()
        self.a = self.net.join("alice", video_ssrcs=self.videos)
        self.b = self.net.join("bob")

    def send(self, p: Participant, **kw: Any) -> bytes:
        self.net.advance(0.01)
        return self.net.send(p, kw.pop("payload", b"\x55" * 160), **kw)

    def test_every_ssrc_sends_with_its_payload_type_and_extensions(self) -> None:
        a, b = self.a, self.b
        self.assertEqual(a.session.sending_ssrcs, (a.ssrc, *self.videos))
        self.assertEqual(a.session.video_ssrcs, tuple(self.videos))
        audio = self.send(a, audio_level=25)
        self.assertEqual(extensions.find_extension(audio, MID), b"0")
        self.assertEqual(extensions.audio_level(extensions.find_extension(audio, AUDIO_LEVEL)),
                         (25, True))
        self.assertIsNone(extensions.find_extension(audio, RID))
        silent = self.send(a, audio_level=127)
        self.assertEqual(extensions.audio_level(extensions.find_extension(silent, AUDIO_LEVEL)),
                         (127, False))
        wires = {}
        for ssrc in self.videos:
            wires[ssrc] = self.send(a, ssrc=ssrc, payload=b"\x90" * 1200, marker=True,
                                    frame_marks=KEY_START, audio_level=3, keyframe=True)
        for ssrc, rid in zip(self.videos, "hml", strict=True):
            wire = wires[ssrc]
            self.assertEqual(ssrc_of(wire), ssrc)
            self.assertEqual(wire[1] & 0x7F, 96)
            self.assertEqual(extensions.find_extension(wire, MID), b"1")
            self.assertEqual(extensions.stream_id(extensions.find_extension(wire, RID)), rid)
            self.assertTrue(extensions.is_keyframe_start(
                extensions.find_extension(wire, FRAME_MARKING)))
            self.assertIsNone(extensions.find_extension(wire, AUDIO_LEVEL))  # video: none
        # what the MD relayed to bob still carries them, and everything decrypts
        relayed = [d for d in b.inbox if is_rtp(d) and ssrc_of(d) == self.videos[2]]
        self.assertEqual(extensions.find_extension(relayed[0], RID), b"l")
        got = [e for e in b.of(MediaReceived)]
        self.assertEqual([(e.ssrc, e.payload_type) for e in got],
                         [(a.ssrc, 0), (a.ssrc, 0), *((v, 96) for v in self.videos)])
        self.assertEqual(got[-1].payload, b"\x90" * 1200)
        counts = a.session.sent_counts()
        self.assertEqual({s: c["packets"] for s, c in counts.items()},
                         {a.ssrc: 2, **dict.fromkeys(self.videos, 1)})
        self.assertEqual(a.session.packets_sent, 5)
        self.assertRaises(ValueError, a.session.send_media, b"x", timestamp=0, now=self.net.now,
                          ssrc=b.ssrc)
        self.assertRaises(ValueError, a.session.send_media, b"x", timestamp=0, now=self.net.now,
                          audio_level=128)

    def test_every_ssrc_is_rekeyed_on_a_new_ekt_key(self) -> None:
        a, b = self.a, self.b
        params = self.net.install_epoch()
        self.net.advance(HOLD + 0.05)
        for ssrc in a.session.sending_ssrcs:
            self.send(a, ssrc=ssrc, keyframe=True)
        # each SSRC's newest key came in a FullEKTField under the new EKTKey, and decrypted
        latest = {e.ssrc: e.spi for e in b.of(MediaReceived)}
        self.assertEqual(latest, dict.fromkeys(a.session.sending_ssrcs, params.spi))
        self.assertEqual(b.session.stats[self.videos[0]].decrypt_failures, 0)

    def test_the_answer_decides_which_extensions_go_out(self) -> None:
        net = Net(self)
        a = net.join("alice", video_ssrcs=self.videos, edit_answer=drop_audio_level)
        net.join("bob")
        net.advance(0.01)
        wire = net.send(a, b"\x00" * 160, audio_level=10)
        self.assertIsNone(extensions.find_extension(wire, AUDIO_LEVEL))
        self.assertEqual(extensions.find_extension(wire, MID), b"0")

    def test_a_rejected_video_section_leaves_only_the_audio_ssrc(self) -> None:
        def reject_video(answer: sdp.SessionDescription) -> sdp.SessionDescription:
            audio, video = answer.media
            rejected = sdp.MediaDescription("video", 0, video.proto, video.formats,
                                            attributes=(sdp.Attribute("mid", "1"),))
            return dataclasses.replace(answer, media=(audio, rejected)).with_bundle(["0"])

        net = Net(self)
        a = net.join("alice", video_ssrcs=self.videos, edit_answer=reject_video)
        self.assertEqual((a.session.sending_ssrcs, a.session.video_ssrcs), ((a.ssrc,), ()))
        self.assertRaises(ValueError, a.session.send_media, b"x", timestamp=0, now=net.now,
                          ssrc=self.videos[0])


class OuterSequenceTests(unittest.TestCase):
    def test_an_md_withholding_and_renumbering_shows_no_loss(self) -> None:
        net = Net(self)
        a, b = net.join("alice"), net.join("bob")
        withhold = {"on": False}
        net.plane.should_forward = lambda src, dst, ssrc: not withhold["on"]
        sent = []
        for i in range(12):
            withhold["on"] = 4 <= i < 8
            net.advance(0.02)
            sent.append(seq_of(net.send(a, f"frame {i}".encode())))
        net.advance(1.0)  # any NACK would be due long before
        got = b.media_from(a)
        self.assertEqual([m.sequence for m in got], sent[:4] + sent[8:])  # the originals
        outer = [m.outer_sequence for m in got]
        self.assertEqual(outer, [(outer[0] + i) & 0xFFFF for i in range(8)])  # no gap
        stats = b.session.stats[a.ssrc]
        self.assertEqual((stats.packets, stats.lost, stats.nacked), (8, 0, 0))
        self.assertEqual(b.session.nacks_sent, 0)


class RepairTests(unittest.TestCase):
    def setUp(self) -> None:
        self.net = Net(self)
        self.a, self.b = self.net.join("alice"), self.net.join("bob")
        self.nack_times: list[float] = []
        self.resent: list[bytes] = []

    def lose(self, losses: set[int], *, every_copy: bool = False) -> None:
        """Lose alice's RTP packets with these (0-based) indices on the way to the MD."""
        count = {"n": 0}
        lost: set[bytes] = set()

        def network(data: bytes, src: Any, dst: Any) -> bytes | None:
            if src == self.b.address and is_rtcp(data):
                self.nack_times.append(self.net.now)
            if src == self.a.address and dst == MD_ADDR and is_rtp(data):
                if data in lost:
                    self.resent.append(data)
                    return None if every_copy else data
                index = count["n"]
                count["n"] += 1
                if index in losses:
                    lost.add(data)
                    return None
            return data

        self.net.filter = network

    def test_a_gap_is_nacked_and_the_retransmission_recovers_it(self) -> None:
        a, b, net = self.a, self.b, self.net
        self.lose({2})
        for i in range(6):
            net.advance(0.02)
            net.send(a, f"frame {i}".encode())
        net.advance(1.0)
        self.assertEqual([m.payload for m in b.media_from(a)],
                         [f"frame {i}".encode() for i in (0, 1, 3, 2, 4, 5)])
        stats = b.session.stats[a.ssrc]
        self.assertEqual((stats.packets, stats.lost, stats.nacked, stats.recovered),
                         (6, 0, 1, 1))
        self.assertEqual(a.session.retransmitted, 1)
        self.assertEqual(a.session.sent_counts()[a.ssrc]["retransmitted"], 1)
        self.assertEqual(len(self.resent), 1)  # the very datagram first sent
        self.assertEqual(len(self.nack_times), 1)  # bob's one NACK compound
        nacks = [feedback.parse_feedback(p) for e in a.of(RtcpReceived) for p in e.packets]
        [nack] = [f for f in nacks if f is not None and f.kind == "nack"]
        self.assertEqual((nack.sender_ssrc, nack.media_ssrcs), (b.ssrc, (a.ssrc,)))

    def test_retried_twice_then_given_up(self) -> None:
        a, b, net = self.a, self.b, self.net
        self.lose({1}, every_copy=True)
        for i in range(3):
            net.advance(0.005)
            net.send(a, f"frame {i}".encode())
        detected = net.now
        for _ in range(100):
            net.advance(0.005)
        self.assertEqual(len(self.nack_times), 3)
        offsets = [round(t - detected, 3) for t in self.nack_times]
        self.assertEqual(offsets, [0.01, 0.06, 0.11])
        self.assertEqual(len(self.resent), 3)  # alice answered each, the network lost them
        stats = b.session.stats[a.ssrc]
        self.assertEqual((stats.lost, stats.nacked, stats.recovered), (1, 1, 0))
        self.assertEqual(b.session.nacks_sent, 3)

    def test_a_nack_for_numbers_no_longer_kept_resends_nothing(self) -> None:
        a, b, net = self.a, self.b, self.net
        first = seq_of(net.send(a, b"first"))
        for i in range(512):
            a.session.send_media(b"x", timestamp=i, now=net.now)  # never sent out
        compound = build_compound([receiver_report(b.ssrc),
                                   feedback.build_nack(b.ssrc, a.ssrc, [first])])
        out = a.session.datagram_received(
            hop_protect_rtcp(net.plane.leg(a.aid).outbound, compound), net.now)
        self.assertEqual((out, a.session.retransmitted), ([], 0))
        last = (first + 512) & 0xFFFF
        compound = build_compound([receiver_report(b.ssrc),
                                   feedback.build_nack(b.ssrc, a.ssrc, [last, first])])
        out = a.session.datagram_received(
            hop_protect_rtcp(net.plane.leg(a.aid).outbound, compound), net.now)
        self.assertEqual([seq_of(d) for d in out], [last])


class FeedbackTests(unittest.TestCase):
    def setUp(self) -> None:
        self.net = Net(self)
        self.videos = video_ssrcs()
        self.a = self.net.join("alice", video_ssrcs=self.videos)
        self.b = self.net.join("bob")

    def from_md(self, p: Participant, *packets: Any) -> list[bytes]:
        """RTCP the MD itself sends ``p`` (sealed with its outbound hop key for p's leg)."""
        compound = build_compound([receiver_report(0x4D44), *packets])
        return self.net.deliver(p, hop_protect_rtcp(self.net.plane.leg(p.aid).outbound,
                                                    compound))

    def test_pli_and_fir_request_a_key_frame_of_that_ssrc(self) -> None:
        a, b, net = self.a, self.b, self.net
        net.send(a, b"\x90" * 100, ssrc=self.videos[1])
        net.send_from(b, [b.session.send_rtcp(now=net.now, pli_ssrc=self.videos[1])])
        net.send_from(b, [b.session.send_rtcp(now=net.now, fir_ssrc=self.videos[2])])
        net.send_from(b, [b.session.send_rtcp(now=net.now, pli_ssrc=b.ssrc)])  # not alice's
        net.run()
        self.assertEqual(a.of(KeyframeRequested), [KeyframeRequested(self.videos[1], "pli"),
                                                   KeyframeRequested(self.videos[2], "fir")])
        # the same FIR command again is not a new request (RFC 5104 s4.3.1.2); a new one is
        fir = feedback.build_fir(0x4D44, [(self.videos[0], 7)])
        self.from_md(a, fir)
        self.from_md(a, fir)
        self.from_md(a, feedback.build_fir(0x4D44, [(self.videos[0], 8)]))
        self.assertEqual(a.of(KeyframeRequested)[2:],
                         [KeyframeRequested(self.videos[0], "fir")] * 2)

    def test_remb_goes_with_the_receiver_report(self) -> None:
        a, b, net = self.a, self.b, self.net
        for ssrc in a.session.sending_ssrcs:
            net.send(a, b"\x90" * 100, ssrc=ssrc)
        net.send_from(b, [b.session.send_rtcp(now=net.now, remb=800_000)])
        net.run()
        parsed = [feedback.parse_feedback(p) for e in a.of(RtcpReceived) for p in e.packets]
        [remb] = [f for f in parsed if f is not None and f.kind == "remb"]
        self.assertEqual(set(remb.media_ssrcs), set(a.session.sending_ssrcs))
        self.assertLessEqual(remb.bitrate, 800_000)
        self.assertGreater(remb.bitrate, 790_000)
        self.assertEqual(a.session.remb_received, remb.bitrate)
        self.assertRaises(ValueError, b.session.send_rtcp, now=net.now, remb=-1)

    def test_speaker_hints_are_events(self) -> None:
        b = self.b
        hint = feedback.SpeakerHint(5, (self.a.ssrc, 77))
        self.from_md(b, feedback.build_speaker_hint(0x4D44, hint))
        self.assertEqual(b.of(SpeakerHintReceived), [SpeakerHintReceived(5, (self.a.ssrc, 77))])

    def test_malformed_feedback_is_dropped_and_counted(self) -> None:
        a = self.a
        empty_nack = RtcpPacket(RTPFB, struct.pack("!II", 1, a.ssrc), count=1)
        pli_with_fci = RtcpPacket(PSFB, struct.pack("!III", 1, self.videos[0], 9), count=1)
        self.assertEqual(self.from_md(a, empty_nack, pli_with_fci), [])
        self.assertEqual(a.session.drops["rtcp_feedback_malformed"], 2)
        self.assertEqual(a.of(KeyframeRequested), [])
        self.assertEqual(len(a.of(RtcpReceived)), 1)  # the compound itself was delivered

