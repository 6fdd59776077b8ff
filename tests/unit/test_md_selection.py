"""The MD as a selective forwarding unit: a real MediaPlane with a Selection, real double SRTP.

Every packet is protected by a real :class:`DoubleSender` (inner end-to-end
layer, outer hop-by-hop layer, EKTField) and every forwarded one opened by a
real :class:`DoubleReceiver` with the receiver's keys: what a receiver gets
decrypts, its outer sequence numbers have no gaps, and the OHB gives back
the sender's original SEQ (RFC 8723 s4, s5.3).
"""

from __future__ import annotations

import itertools
import random
import struct
import uuid
from collections.abc import Iterable

from twisted.trial import unittest

from perc_daemons.md.plane import MediaPlane
from perc_daemons.protocol import double
from perc_daemons.protocol.double import DoubleReceiver, DoubleSender, split_keying_material
from perc_daemons.protocol.ekt import EktCipher, EktParameterSet, EktReceiver, EktSender
from perc_daemons.protocol.extensions import (
    add_extensions,
    encode_audio_level,
    encode_frame_marks,
    encode_stream_id,
)
from perc_daemons.protocol.feedback import (
    build_nack,
    build_pli,
    build_remb,
    parse_feedback,
    parse_speaker_hint,
)
from perc_daemons.protocol.rtp import (
    APP,
    PSFB,
    RR,
    RTPFB,
    SR,
    ReportBlock,
    RtpPacket,
    SenderInfo,
    build_compound,
    parse_compound,
    parse_report_blocks,
    receiver_report,
    sender_report,
)
from perc_daemons.protocol.selection import Selection, SelectionPolicy, StreamPlan
from perc_daemons.protocol.srtp import LAYER_KEY_LENGTH, Profile
from perc_daemons.protocol.tunnel import MediaKeys
from tests.unit.test_md_media import binding_request

P128 = Profile.DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM
LEVEL, MID, RID, MARKS = 1, 2, 3, 5
PLAN = StreamPlan(audio_level_id=LEVEL, mid_id=MID, rid_id=RID, frame_marking_id=MARKS,
                  audio_mids=frozenset({"0"}), video_mids=frozenset({"1"}),
                  rid_heights={"h": 720, "m": 360, "l": 180})
LAYERS = ("l", "m", "h")
GROUP = "conf"
SIZES = {"l": 300, "m": 600, "h": 1100}


class Sender:
    """One SSRC of an endpoint: its own EKT sender and inner key, the endpoint's outer key."""

    def __init__(self, ssrc: int, outer: object, params: EktParameterSet,
                 rng: random.Random) -> None:
        self.ssrc = ssrc
        ekt = EktSender(ssrc, 16, params, 0.0, random_bytes=rng.randbytes)
        self.double = DoubleSender(outer, ekt)  # type: ignore[arg-type]
        self.seq = rng.randrange(1 << 16)
        self.sent: dict[int, bytes] = {}  # seq -> original packet


class Participant:
    """An endpoint with an audio SSRC and three simulcast SSRCs (l, m, h)."""

    def __init__(self, name: str, index: int, rng: random.Random,
                 params: EktParameterSet) -> None:
        self.name = name
        self.address = ("192.0.2.7", 41000 + index)
        self.keys = split_keying_material(P128, rng.randbytes(double.exporter_length(P128)))
        self.md_ufrag, self.md_pwd = f"md{name}", f"pwd-{name}-0123456789abcdef"
        outer = self.keys.client_outer.context()
        self.rtcp_out = self.keys.client_outer.context()
        self.audio = Sender(rng.getrandbits(32), outer, params, rng)
        self.video = {rid: Sender(rng.getrandbits(32), outer, params, rng) for rid in LAYERS}
        ekt = EktReceiver(LAYER_KEY_LENGTH[P128])
        ekt.add_parameter_set(params, 0.0)
        self.recv_outer = self.keys.server_outer.context()
        self.receiver = DoubleReceiver(self.recv_outer, ekt)
        #: SSRC -> outer SEQs received, in order; and the original packets decrypted
        self.outer: dict[int, list[int]] = {}
        self.got: dict[int, list[bytes]] = {}
        self.rtcp: list[object] = []
        #: SSRCs of ours a PLI asked a key frame of (a real sender's answer: the next frame)
        self.pli: set[int] = set()

    def media_keys(self) -> MediaKeys:
        k = self.keys
        return MediaKeys(uuid.uuid4().bytes, int(P128), b"", k.client_outer.key, k.server_outer.key,
                         k.client_outer.salt, k.server_outer.salt)

    def packet(self, sender: Sender, *, level: int | None = None, rid: str | None = None,
               keyframe: bool = False, size: int = 200) -> tuple[bytes, bytes]:
        seq = sender.seq
        sender.seq = (seq + 1) & 0xFFFF
        original = RtpPacket.parse(struct.pack("!BBHII", 0x80, 96 if rid else 0, seq,
                                               seq * 3000, sender.ssrc)
                                   + bytes([seq & 0xFF]) * size).serialize()
        elements = [(MID, encode_stream_id("1" if rid else "0"))]
        if level is not None:
            elements.append((LEVEL, encode_audio_level(level, level < 127)))
        if rid is not None:
            elements.append((RID, encode_stream_id(rid)))
            elements.append((MARKS, encode_frame_marks(start=True, end=True,
                                                       independent=keyframe)))
        original = add_extensions(original, elements)
        sender.sent[seq] = original
        return original, sender.double.protect(original, 0.0, keyframe=keyframe)

    def take(self, data: bytes) -> None:
        """A datagram from the MD: RTP decrypted (both layers) and recorded, RTCP parsed."""
        if 192 <= data[1] <= 223:
            packets = parse_compound(self.recv_outer.unprotect_rtcp(data), strict_first=False)
            self.rtcp.extend(packets)
            for packet in packets:
                item = parse_feedback(packet) if packet.packet_type == PSFB else None
                if item is not None and item.kind == "pli":
                    self.pli.update(item.media_ssrcs)
            return
        got = self.receiver.unprotect(data, 0.0)
        self.outer.setdefault(got.ssrc, []).append(got.outer_seq)
        self.got.setdefault(got.ssrc, []).append(got.packet)

    def video_ssrcs(self) -> set[int]:
        return {s.ssrc for s in self.video.values()}


class Conference:
    """A plane with one selective group of participants, a clock, and the wire between."""

    def __init__(self, names: str = "abc", policy: SelectionPolicy | None = None,
                 seed: int = 13) -> None:
        self.rng = random.Random(seed)
        self.params = EktParameterSet(key=self.rng.randbytes(16), cipher=EktCipher.AESKW_128,
                                      master_salt=self.rng.randbytes(12), spi=3, ttl=3600)
        self.plane = MediaPlane()
        self.selection = Selection(policy or SelectionPolicy(), rng=self.rng)
        self.plane.set_selection(GROUP, self.selection)
        self.now = 0.0
        self.eps: dict[str, Participant] = {}
        self.by_address: dict[tuple[str, int], Participant] = {}
        #: (receiver name, SSRC, outer SEQ) lost on the way from the MD to the receiver
        self.lose: set[tuple[str, int, int]] = set()
        for i, name in enumerate(names):
            self.add(name, i)

    def add(self, name: str, index: int) -> Participant:
        ep = Participant(name, index, self.rng, self.params)
        self.eps[name] = ep
        self.by_address[ep.address] = ep
        self.plane.add_leg(name, ep.md_ufrag, ep.md_pwd, group=GROUP, plan=PLAN)
        self.plane.datagram_received(binding_request(ep.md_ufrag, "x", ep.md_pwd), ep.address,
                                     self.now)
        self.plane.install_keys(name, ep.media_keys())
        self.deliver([])
        return ep

    def deliver(self, out: Iterable[tuple[bytes, tuple[str, int]]]) -> None:
        for data, address in out:
            if data[0] <= 3:
                continue  # STUN answers
            ep = self.by_address[address]
            key = (ep.name, int.from_bytes(data[8:12], "big"), (data[2] << 8) | data[3])
            if not 192 <= data[1] <= 223 and key in self.lose:
                self.lose.discard(key)
                continue
            ep.take(data)

    def send(self, name: str, wire: bytes) -> None:
        self.deliver(self.plane.datagram_received(wire, self.eps[name].address, self.now))
        self.tick(0.0)

    def tick(self, dt: float) -> None:
        self.now += dt
        timer = self.plane.next_timer()
        while timer is not None and timer <= self.now:
            self.deliver(self.plane.poll(self.now))
            nxt = self.plane.next_timer()
            if nxt == timer:
                break
            timer = nxt

    def frame(self, *, keyframe: bool = False, talking: Iterable[str] = (),
              layers: Iterable[str] = LAYERS) -> None:
        """One 20 ms step: every participant sends audio (level about 10 when talking,
        else room noise about 80: real microphones are never digitally silent) and one
        packet of each video layer (l, m, h: 300, 600, 1100 bytes, some 140, 260 and
        460 kbit/s)."""
        talkers = set(talking)
        for name, ep in self.eps.items():
            level = (8 if name in talkers else 78) + self.rng.randrange(5)
            self.send(name, ep.packet(ep.audio, level=level)[1])
            for rid in layers:
                sender = ep.video[rid]
                asked = sender.ssrc in ep.pli
                ep.pli.discard(sender.ssrc)
                self.send(name, ep.packet(sender, rid=rid, keyframe=keyframe or asked,
                                          size=SIZES[rid])[1])
        self.tick(0.02)

    def rtcp(self, name: str, packets: list[object]) -> None:
        ep = self.eps[name]
        self.send(name, ep.rtcp_out.protect_rtcp(build_compound(packets)))  # type: ignore[arg-type]


def gap_free(seqs: list[int]) -> bool:
    return all((b - a) & 0xFFFF == 1 for a, b in itertools.pairwise(seqs))


class LayerTests(unittest.TestCase):
    def test_one_layer_per_source_from_its_key_frame(self) -> None:
        c = Conference()
        a, b = c.eps["a"], c.eps["b"]
        c.frame()  # no key frame yet: no video anywhere, audio everywhere
        self.assertEqual(set(b.got) & a.video_ssrcs(), set())
        self.assertIn(a.audio.ssrc, b.got)
        # the MD asked each sender for a key frame of the layer receivers need, once
        plis = [p for p in a.rtcp if getattr(p, "packet_type", None) == PSFB]
        self.assertEqual([parse_feedback(p).media_ssrcs for p in plis],  # type: ignore[union-attr]
                         [(a.video["h"].ssrc,)])
        for _ in range(6):
            c.frame()  # the first with a key frame of h (the PLI's answer)
        self.assertEqual(set(b.got) & a.video_ssrcs(), {a.video["h"].ssrc})
        seqs = b.outer[a.video["h"].ssrc]
        self.assertEqual(len(seqs), 6)
        self.assertTrue(gap_free(seqs))
        self.assertEqual(len(plis), 1)
        # the receiver got the sender's packets, both layers removed, from the key frame on
        sent = a.video["h"].sent
        self.assertEqual(b.got[a.video["h"].ssrc], [sent[s] for s in sorted(sent)][-6:])

    def test_max_height_picks_the_layer(self) -> None:
        c = Conference()
        c.selection.set_receive("b", max_height=360)
        a, b = c.eps["a"], c.eps["b"]
        c.frame()
        c.frame()
        self.assertEqual(set(b.got) & a.video_ssrcs(), {a.video["m"].ssrc})
        self.assertEqual(set(c.eps["c"].got) & a.video_ssrcs(), {a.video["h"].ssrc})

    def test_remb_moves_down_at_a_key_frame_without_gaps(self) -> None:
        c = Conference("ab")
        a, b = c.eps["a"], c.eps["b"]
        for _ in range(60):  # over a second: the layers' rates are measured
            c.frame()
        h, m = a.video["h"].ssrc, a.video["m"].ssrc
        self.assertEqual(set(b.got) & a.video_ssrcs(), {h})
        # 300 kbit/s: m (about 260 kbit/s) fits, h (about 460) does not
        c.rtcp("b", [receiver_report(b.audio.ssrc), build_remb(b.audio.ssrc, 300_000, [h])])
        self.assertNotIn(m, b.got)  # waiting for a key frame of m: h goes on
        count_h = len(b.got[h])
        c.frame()  # m's key frame, asked for by the MD
        c.frame()
        self.assertEqual(len(b.got[h]), count_h)
        self.assertEqual(len(b.got[m]), 2)
        for ssrc in (h, m):
            self.assertTrue(gap_free(b.outer[ssrc]))
        # back up again: h resumes with its numbering continued (no gap in its view)
        c.rtcp("b", [build_remb(b.audio.ssrc, 10_000_000, [h])])
        c.frame()
        self.assertEqual(len(b.got[h]), count_h + 1)
        self.assertTrue(gap_free(b.outer[h]))
        self.assertEqual(b.got[h][-1], a.video["h"].sent[(a.video["h"].seq - 1) & 0xFFFF])


class PliTests(unittest.TestCase):
    def test_receivers_plis_aggregated(self) -> None:
        c = Conference("abcd")
        a = c.eps["a"]
        c.frame()
        c.frame()
        c.tick(1.0)
        a.rtcp.clear()
        h = a.video["h"].ssrc
        for name in "bcd":
            c.rtcp(name, [receiver_report(c.eps[name].audio.ssrc),
                          build_pli(c.eps[name].audio.ssrc, h)])
        plis = [parse_feedback(p) for p in a.rtcp if getattr(p, "packet_type", None) == PSFB]
        self.assertEqual([(p.kind, p.media_ssrcs, p.sender_ssrc) for p in plis],  # type: ignore[union-attr]
                         [("pli", (h,), c.selection.ssrc)])
        c.tick(1.0)
        c.rtcp("b", [build_pli(c.eps["b"].audio.ssrc, h)])
        self.assertEqual(sum(1 for p in a.rtcp if getattr(p, "packet_type", None) == PSFB), 2)


class RtcpTests(unittest.TestCase):
    def test_rr_terminated_sr_passed_on_without_blocks(self) -> None:
        c = Conference()
        a = c.eps["a"]
        block = ReportBlock(c.eps["b"].audio.ssrc, 3, 4, 5, 6, 7, 8)
        sr = sender_report(a.audio.ssrc, SenderInfo(1 << 40, 1234, 10, 2000), [block])
        c.rtcp("a", [sr])
        c.rtcp("a", [receiver_report(a.audio.ssrc, [block])])
        for name in "bc":
            got = c.eps[name].rtcp
            self.assertEqual([p.packet_type for p in got], [SR])  # type: ignore[attr-defined]
            self.assertEqual(got[0].count, 0)  # type: ignore[attr-defined]
            self.assertEqual(got[0].body[:24], sr.body[:24])  # type: ignore[attr-defined]

    def test_the_md_reports_what_it_received_per_hop(self) -> None:
        """The MD's own RR to a sender (its receivers' RRs end at the MD): this hop's
        loss per SSRC, and LSR/DLSR from the sender's last SR."""
        c = Conference("ab")
        a = c.eps["a"]
        c.frame()
        sr = sender_report(a.audio.ssrc, SenderInfo(0x1122334455667788, 1234, 10, 2000))
        c.rtcp("a", [sr])
        for i in range(40):
            if i % 10 == 5:
                a.audio.seq = (a.audio.seq + 1) & 0xFFFF  # lost before the MD
            c.frame()
        c.tick(1.0)
        reports = [p for p in a.rtcp if getattr(p, "packet_type", 0) == RR]
        self.assertTrue(reports)
        self.assertEqual(reports[-1].ssrc, c.selection.ssrc)  # type: ignore[attr-defined]
        blocks = {b.ssrc: b for b in parse_report_blocks(reports[-1])}  # type: ignore[arg-type]
        audio = blocks[a.audio.ssrc]
        self.assertEqual(audio.cumulative_lost, 4)
        self.assertEqual(audio.highest_sequence & 0xFFFF, (a.audio.seq - 1) & 0xFFFF)
        self.assertEqual(audio.last_sr, 0x33445566)
        self.assertGreater(audio.delay_since_last_sr, 0)
        self.assertEqual(blocks[a.video["h"].ssrc].cumulative_lost, 0)

    def test_rtcp_of_a_forward_all_group_relayed_as_before(self) -> None:
        c = Conference()
        c.plane.set_selection(GROUP, None)
        a = c.eps["a"]
        rr = receiver_report(a.audio.ssrc, [ReportBlock(1, 2, 3, 4, 5, 6, 7)])
        c.rtcp("a", [rr])
        self.assertEqual([p.packet_type for p in c.eps["b"].rtcp], [RR])  # type: ignore[attr-defined]


class NackTests(unittest.TestCase):
    def setUp(self) -> None:
        self.c = Conference("ab")
        self.c.selection.set_receive("b", max_height=360)
        for _ in range(6):
            self.c.frame()
        self.a, self.b = self.c.eps["a"], self.c.eps["b"]

    def test_nack_answered_from_the_md_history(self) -> None:
        m = self.a.video["m"].ssrc
        nxt = (self.b.outer[m][-1] + 1) & 0xFFFF
        lost = [(nxt + 1) & 0xFFFF, (nxt + 3) & 0xFFFF]
        self.c.lose.update(("b", m, s) for s in lost)
        for _ in range(5):
            self.c.frame()
        seqs = self.b.outer[m]
        self.assertFalse(gap_free(seqs))
        before = len(self.b.got[m])
        self.a.rtcp.clear()
        self.c.rtcp("b", [receiver_report(self.b.audio.ssrc),
                          build_nack(self.b.audio.ssrc, m, lost)])
        self.assertEqual(len(self.b.got[m]), before + 2)
        self.assertEqual(self.b.outer[m][-2:], lost)
        self.assertEqual(sorted(self.b.outer[m]), sorted(
            (self.b.outer[m][0] + i) & 0xFFFF for i in range(len(self.b.outer[m]))))
        # the very packets the sender sent (both layers decrypted by the receiver)
        sent = self.a.video["m"].sent
        for packet in self.b.got[m][-2:]:
            self.assertEqual(packet, sent[(packet[2] << 8) | packet[3]])
        # answered by the MD: nothing went to the sender
        self.assertEqual([p for p in self.a.rtcp if getattr(p, "packet_type", 0) == RTPFB], [])
        view = self.c.selection.receiver_view("b")
        self.assertEqual((view["nacks_received"], view["retransmitted"]), (1, 2))

    def test_nack_in_the_receivers_numbering_after_a_switch(self) -> None:
        """Back on a layer after a while on another: the receiver's numbering of it goes
        on without a gap, so it is offset from the sender's by what was withheld; a NACK
        of the first packet after the switch gets that very packet (the key frame)."""
        m, low = self.a.video["m"].ssrc, self.a.video["l"].ssrc
        self.c.selection.set_receive("b", max_height=180)
        for _ in range(4):
            self.c.frame()
        self.assertIn(low, self.b.got)
        resumed = (self.b.outer[m][-1] + 1) & 0xFFFF
        self.c.lose.add(("b", m, resumed))
        self.c.tick(0.6)  # past the last PLI's interval: the MD asks for m's key frame
        self.c.selection.set_receive("b", max_height=360)
        for _ in range(4):
            self.c.frame()
        self.assertEqual(self.b.outer[m][-3], (resumed + 1) & 0xFFFF)  # the key frame lost
        self.c.rtcp("b", [build_nack(self.b.audio.ssrc, m, [resumed])])
        self.assertEqual(self.b.outer[m][-1], resumed)
        got = self.b.got[m][-1]
        keyframe = (self.b.got[m][-4][2] << 8 | self.b.got[m][-4][3]) + 1  # after the last
        self.assertEqual(got, self.a.video["m"].sent[(got[2] << 8) | got[3]])
        self.assertNotEqual((got[2] << 8) | got[3], keyframe & 0xFFFF)  # packets withheld
        self.assertTrue(gap_free(sorted(self.b.outer[m][-5:])))

    def test_nack_of_what_the_md_never_got_goes_upstream_in_the_senders_numbering(self) -> None:
        """A packet lost between the sender and the MD: a gap in the receiver's numbering
        too (only what the MD withholds is renumbered); the NACK goes to the sender."""
        m = self.a.video["m"].ssrc
        upstream = self.a.video["m"].seq
        self.a.video["m"].seq = (upstream + 1) & 0xFFFF  # never sent: lost on the way
        self.c.frame()
        seqs = self.b.outer[m]
        gap = (seqs[-2] + 1) & 0xFFFF
        self.assertEqual((seqs[-1] - seqs[-2]) & 0xFFFF, 2)
        self.a.rtcp.clear()
        self.c.rtcp("b", [build_nack(self.b.audio.ssrc, m, [gap])])
        nacks = [parse_feedback(p) for p in self.a.rtcp
                 if getattr(p, "packet_type", 0) == RTPFB]
        self.assertEqual([(n.media_ssrcs, n.seqs, n.sender_ssrc) for n in nacks],  # type: ignore[union-attr]
                         [((m,), (upstream,), self.c.selection.ssrc)])
        view = self.c.selection.receiver_view("b")
        self.assertEqual((view["nacks_forwarded"], view["retransmitted"]), (1, 0))

class SpeakerTests(unittest.TestCase):
    def talk(self, c: Conference, who: str, seconds: float) -> None:
        for _ in range(int(seconds / 0.02)):
            c.frame(talking=[who], keyframe=True)

    def test_last_n_follows_the_dominant_speaker(self) -> None:
        c = Conference("abc", SelectionPolicy(last_n=1))
        a, b, cc = c.eps["a"], c.eps["b"], c.eps["c"]
        self.talk(c, "a", 2.0)
        self.assertEqual(c.selection.dominant(), "a")
        c_sources = {ssrc for ssrc in cc.got if ssrc in a.video_ssrcs() | b.video_ssrcs()}
        self.assertEqual(c_sources, {a.video["h"].ssrc})
        for ep in (b, cc):
            ep.got.clear()
        self.talk(c, "b", 3.0)
        self.assertEqual(c.selection.dominant(), "b")
        recent = {ssrc for ssrc in cc.got if ssrc in a.video_ssrcs() | b.video_ssrcs()}
        self.assertIn(b.video["h"].ssrc, recent)
        cc.got.clear()
        c.frame(talking=["b"], keyframe=True)
        self.assertEqual({s for s in cc.got if s in a.video_ssrcs() | b.video_ssrcs()},
                         {b.video["h"].ssrc})
        # a (no longer in the last 1 for c) still gets b, and b gets a (its last-1)
        hints = [parse_speaker_hint(p) for p in cc.rtcp if getattr(p, "packet_type", 0) == APP]
        self.assertEqual([h.speakers[0] for h in hints if h is not None][-1], b.audio.ssrc)

    def test_audio_levels_off_means_join_order(self) -> None:
        c = Conference("abc", SelectionPolicy(last_n=1, audio_levels=False))
        a, b, cc = c.eps["a"], c.eps["b"], c.eps["c"]
        self.talk(c, "b", 2.0)
        self.assertIsNone(c.selection.dominant())
        self.assertEqual({s for s in cc.got if s in a.video_ssrcs() | b.video_ssrcs()},
                         {a.video["h"].ssrc})
        self.assertEqual([p for p in cc.rtcp if getattr(p, "packet_type", 0) == APP], [])

    def test_audio_top_k(self) -> None:
        c = Conference("abcd", SelectionPolicy(audio_top_k=1))
        self.talk(c, "a", 1.0)
        d = c.eps["d"]
        d.got.clear()
        c.frame(talking=["a"])
        audio = {c.eps[n].audio.ssrc for n in "abc"}
        self.assertEqual(set(d.got) & audio, {c.eps["a"].audio.ssrc})


class LeaveTests(unittest.TestCase):
    def test_a_source_that_leaves_is_forgotten(self) -> None:
        c = Conference()
        c.frame(keyframe=True)
        a = c.eps["a"]
        c.plane.remove_leg("a")
        c.tick(0.1)
        self.assertNotIn("a", [x["source"] for x in c.selection.receiver_view("b")["layers"]])
        for ssrc in a.video_ssrcs():
            self.assertNotIn(ssrc, c.plane.leg("b").muted)
        c.frame()  # b and c go on
        self.assertIn(c.eps["b"].audio.ssrc, c.eps["c"].got)
