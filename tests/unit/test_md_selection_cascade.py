"""Selective forwarding across a cascade link: two real MediaPlanes linked by their own
DTLS-SRTP (tests/unit/test_md_cascade.py's Mesh), each with its conference's Selection.

Each MD selects for its own endpoints; the senders behind a link are told by the
peer MD's stream announcements (RTCP APP "PERC" subtype 2), so a receiver on one
MD gets the layer it asked for of a sender on the other, from a key frame that
the PLI crossing the link asked for; NACKs are answered by the first MD that
holds the packet.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from perc_daemons.protocol.cascade import UP
from perc_daemons.protocol.feedback import build_nack, parse_feedback
from perc_daemons.protocol.rtp import APP, PSFB, RTPFB, RtcpPacket, build_compound
from perc_daemons.protocol.selection import (
    ANNOUNCE_SUBTYPE,
    Selection,
    SelectionError,
    SelectionPolicy,
    StreamEntry,
    build_announcements,
    parse_announcement,
)
from perc_daemons.protocol.stun import BINDING_SUCCESS
from tests.unit.test_md_cascade import ADDRESSES, CascadeTestCase, Mesh
from tests.unit.test_md_media import binding_request
from tests.unit.test_md_selection import LAYERS, PLAN, SIZES, Participant, gap_free

GROUP = "conf"


class SfuMesh(Mesh):
    """Mesh's planes and link, a Selection per plane, participants sending simulcast."""

    def __init__(self, policy: SelectionPolicy | None = None) -> None:
        super().__init__("AB")
        self.selections = {}
        for name, plane in self.planes.items():
            selection = Selection(policy or SelectionPolicy(), rng=random.Random(name))
            plane.set_selection(GROUP, selection)
            self.selections[name] = selection
        self.people: dict[str, Participant] = {}
        self.lose_on_link: set[tuple[int, int]] = set()  # (SSRC, SEQ) dropped from A to B
        self.filter = self._lossy

    def _lossy(self, source: tuple, destination: tuple, data: bytes) -> bool:
        if source == ADDRESSES["A"] and destination == ADDRESSES["B"] and 64 <= data[0] <= 79:
            inner = data[4:]
            if 128 <= inner[0] <= 191 and not 192 <= inner[1] <= 223:
                key = (int.from_bytes(inner[8:12], "big"), (inner[2] << 8) | inner[3])
                if key in self.lose_on_link:
                    self.lose_on_link.discard(key)
                    return False
        return True

    def enter(self, md: str, name: str) -> Participant:
        ep = Participant(name, len(self.people), self.rng, self.params_for(GROUP))
        ep.address = (f"10.0.1.{len(self.people) + 1}", 50000)
        self.people[name] = ep
        plane = self.planes[md]
        plane.add_leg(name, ep.md_ufrag, ep.md_pwd, group=GROUP, now=self.now, plan=PLAN)
        self.put(binding_request(ep.md_ufrag, "x", ep.md_pwd), ep.address, ADDRESSES[md])
        self.flush()
        [answer] = self.inbox.pop(ep.address)
        assert answer[:2] == BINDING_SUCCESS.to_bytes(2, "big")
        plane.install_keys(name, ep.media_keys())
        self.home[name] = md
        return ep

    def deliver(self) -> None:
        for ep in self.people.values():
            for data in self.inbox.pop(ep.address, []):
                ep.take(data)

    def send(self, name: str, datagram: bytes) -> None:  # type: ignore[override]
        ep = self.people[name]
        self.put(datagram, ep.address, ADDRESSES[self.home[name]])
        self.flush()

    def rtcp(self, name: str, packets: list[RtcpPacket]) -> None:
        ep = self.people[name]
        self.send(name, ep.rtcp_out.protect_rtcp(build_compound(packets)))
        self.deliver()

    def frame(self, talking: tuple[str, ...] = ()) -> None:
        """20 ms: audio from everyone (a level), a packet of each layer (a key frame
        where a PLI asked for one)."""
        for name, ep in self.people.items():
            level = (8 if name in talking else 78) + self.rng.randrange(5)
            self.send(name, ep.packet(ep.audio, level=level)[1])
            for rid in LAYERS:
                sender = ep.video[rid]
                asked = sender.ssrc in ep.pli
                ep.pli.discard(sender.ssrc)
                self.send(name, ep.packet(sender, rid=rid, keyframe=asked, size=SIZES[rid])[1])
        self.advance(0.02)
        self.deliver()


class CascadeSelectionTests(CascadeTestCase):
    def mesh(self, policy: SelectionPolicy | None = None) -> SfuMesh:
        net = SfuMesh(policy)
        net.link("L", GROUP, "A", "B")
        net.advance(2.0)
        self.assertEqual((net.state("A", "L"), net.state("B", "L")), (UP, UP))
        for md, name in (("A", "a1"), ("A", "a2"), ("B", "b1"), ("B", "b2")):
            net.enter(md, name)
        return net

    def video_from(self, receiver: Participant, sender: Participant) -> set[int]:
        return set(receiver.got) & sender.video_ssrcs()

    def test_a_receiver_behind_the_link_gets_the_layer_it_asked_for(self) -> None:
        net = self.mesh()
        net.selections["B"].set_receive("b2", max_height=360)
        for _ in range(12):
            net.frame()
        a1, a2, b1, b2 = (net.people[n] for n in ("a1", "a2", "b1", "b2"))
        self.assertEqual(self.video_from(b1, a1), {a1.video["h"].ssrc})
        self.assertEqual(self.video_from(b2, a1), {a1.video["m"].ssrc})
        self.assertEqual(self.video_from(a2, b1), {b1.video["h"].ssrc})
        for receiver in (a1, a2, b1, b2):
            for ssrc, seqs in receiver.outer.items():
                self.assertTrue(gap_free(seqs), (receiver.name, ssrc))
        # B knows A's senders from A's announcement, as A knows B's
        sources = {s.key for s in net.selections["B"]._sources.values()}
        self.assertEqual(len(sources), 4)
        # the link carries each layer once, whatever B's receivers choose: B selects
        link_out = net.planes["A"].leg("L").counters["rtp_out"]
        self.assertGreaterEqual(link_out, 2 * 12 * 4 - 8)

    def test_a_pli_for_a_layer_crosses_the_link_once(self) -> None:
        net = self.mesh()
        for _ in range(6):
            net.frame()
        a1, b1, b2 = net.people["a1"], net.people["b1"], net.people["b2"]
        net.advance(1.0)
        a1.rtcp.clear()
        h = a1.video["h"].ssrc
        from perc_daemons.protocol.feedback import build_pli
        net.rtcp("b1", [build_pli(b1.audio.ssrc, h)])
        net.rtcp("b2", [build_pli(b2.audio.ssrc, h)])
        plis = [parse_feedback(p) for p in a1.rtcp if p.packet_type == PSFB]
        self.assertEqual([(p.kind, p.media_ssrcs) for p in plis], [("pli", (h,))])
        # from A's selection (A aggregates what B asked for), not from b1
        self.assertEqual(plis[0].sender_ssrc, net.selections["A"].ssrc)

    def test_last_n_follows_a_speaker_on_the_other_md(self) -> None:
        net = self.mesh(SelectionPolicy(last_n=1))
        for _ in range(50):
            net.frame()  # everyone quiet: each source's noise floor
        for _ in range(100):
            net.frame(talking=("b1",))
        a2, b1 = net.people["a2"], net.people["b1"]
        self.assertEqual(net.selections["A"].dominant(), ("L", net.selections["B"]._sources[
            "b1"].tag))
        self.assertEqual(net.selections["B"].dominant(), "b1")
        a2.got.clear()
        for _ in range(5):
            net.frame(talking=("b1",))
        others = set().union(*(p.video_ssrcs() for n, p in net.people.items() if n != "a2"))
        self.assertEqual(set(a2.got) & others, {b1.video["h"].ssrc})
        hints = [p for p in a2.rtcp if p.packet_type == APP]
        self.assertTrue(hints)

    def test_loss_on_the_link_repaired_by_the_sending_md(self) -> None:
        net = self.mesh()
        for _ in range(8):
            net.frame()
        a1, b1 = net.people["a1"], net.people["b1"]
        h = a1.video["h"].ssrc
        lost = a1.video["h"].seq  # the next packet of h: dropped between A and B
        net.lose_on_link.add((h, lost))
        for _ in range(3):
            net.frame()
        seqs = b1.outer[h]
        self.assertFalse(gap_free(seqs))
        missing = (seqs[-3] + 1) & 0xFFFF  # b1's numbering (here: the sender's)
        a1.rtcp.clear()
        net.rtcp("b1", [build_nack(b1.audio.ssrc, h, [missing])])
        self.assertEqual(b1.outer[h][-1], missing)
        self.assertEqual(b1.got[h][-1], a1.video["h"].sent[lost])
        # B had not got it: it asked A (in A's numbering), A answered from its history
        self.assertEqual(net.selections["B"].receiver_view("b1")["nacks_forwarded"], 1)
        self.assertEqual(net.selections["A"].receiver_view("L")["retransmitted"], 1)
        self.assertEqual([p for p in a1.rtcp if p.packet_type == RTPFB], [])

    def test_a_sender_that_leaves_is_forgotten_behind_the_link(self) -> None:
        net = self.mesh()
        for _ in range(4):
            net.frame()
        net.planes["A"].remove_leg("a1")
        net.people.pop("a1")
        net.advance(0.1)
        keys = {s.key for s in net.selections["B"]._sources.values()}
        self.assertEqual(len(keys), 3)


class AnnouncementCodecTests(CascadeTestCase):
    entries = st.lists(st.builds(
        StreamEntry, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
        st.sampled_from(["audio", "video"]), st.one_of(st.none(), st.integers(1, 255)),
        st.one_of(st.none(), st.integers(1, 255)), st.one_of(st.none(), st.integers(1, 65535)),
        st.one_of(st.none(), st.from_regex(r"[A-Za-z0-9_-]{1,16}", fullmatch=True))),
        max_size=120)

    @settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
    @given(entries, st.integers(0, 2**32 - 1))
    def test_round_trip(self, entries: list[StreamEntry], generation: int) -> None:
        packets = build_announcements(7, generation, entries)
        parsed = [parse_announcement(p) for p in packets]
        self.assertEqual([e for a in parsed for e in a.entries], entries)  # type: ignore[union-attr]
        self.assertEqual({(a.generation, a.parts) for a in parsed},  # type: ignore[union-attr]
                         {(generation, len(packets))})

    @settings(deadline=None, max_examples=300)
    @given(st.binary(max_size=200))
    def test_any_body_parses_or_is_refused(self, data: bytes) -> None:
        body = (b"\x00\x00\x00\x07PERC" + data)
        body += b"\x00" * (-len(body) % 4)
        try:
            parse_announcement(RtcpPacket(APP, body, count=ANNOUNCE_SUBTYPE))
        except SelectionError:
            pass

    def test_not_ours_is_none(self) -> None:
        self.assertIsNone(parse_announcement(RtcpPacket(APP, b"\x00" * 4 + b"ABCD",
                                                        count=ANNOUNCE_SUBTYPE)))
        self.assertIsNone(parse_announcement(RtcpPacket(APP, b"\x00" * 4 + b"PERC", count=1)))
