"""bench/sfu.py's pure helpers: the talk schedule, the pinned simulcast source, the /metrics
reader and the counting readers of a receiver's socket.

The readers are run on real UDP sockets on loopback, as
``tests/unit/test_bench_readers.py`` does: one mix of datagrams (RTP from the
"MD" with and without a FullEKTField, RTCP, STUN, DTLS, too short to be
RTP, empty, the largest UDP/IPv4 datagram, and RTP from another address) is
read once with ``count_recvfrom`` and once with ``count_mmsg`` (a batch
size that splits the mix): both must count the RTP datagrams from the MD
(RFC 3550 s5.1, not RTCP: RFC 5761 s4) and hand every other datagram, with
its source, to the receive path, never an RTP one from the MD.
"""

from __future__ import annotations

import select
import socket

from twisted.trial import unittest

from bench.mmsg import Batch, Unavailable, sockaddr_key
from bench.sfu import (
    LAYERS,
    PinnedSimulcast,
    count_mmsg,
    count_recvfrom,
    participant_metrics,
    talkers,
    video_pps,
)
from perc_daemons.protocol.ekt import FULL_EKT_TYPE

END = b"\x01\x01end"  # STUN-like, from the MD, sent last


def rtp(sequence: int, size: int, last: int) -> bytes:
    return bytes([0x80, 0xE0, sequence >> 8, sequence & 0xFF]) + bytes(size - 5) + bytes([last])


class TalkersTests(unittest.TestCase):
    def test_segments_cycle(self) -> None:
        schedule = ((0,), (0, 1), (2,))
        self.assertEqual(talkers(schedule, 2.0, 0.0), {0})
        self.assertEqual(talkers(schedule, 2.0, 1.99), {0})
        self.assertEqual(talkers(schedule, 2.0, 2.0), {0, 1})
        self.assertEqual(talkers(schedule, 2.0, 5.5), {2})
        self.assertEqual(talkers(schedule, 2.0, 6.0), {0})  # the cycle starts again
        self.assertEqual(talkers(schedule, 2.0, 6.0 * 1000 + 2.5), {0, 1})
        self.assertEqual(talkers((), 2.0, 3.0), frozenset())


class PinnedSimulcastTests(unittest.TestCase):
    def test_frames_packets_and_key_frames(self) -> None:
        video = PinnedSimulcast(keyframe_every=8)
        frames = [video.next_frames() for _ in range(8)]
        packets = {e: 0 for e in range(3)}
        for index, due in enumerate(frames):
            encodings = [e for e, _ in due]
            expected = [e for e in range(3) if index % (1, 2, 4)[e] == 0]
            self.assertEqual(sorted(set(encodings)), expected)
            for e in expected:
                mine = [f for enc, f in due if enc == e]
                self.assertEqual(len(mine), LAYERS[e]["packets"])
                self.assertEqual({len(f.payload) for f in mine}, {LAYERS[e]["size"]})
                self.assertEqual(len({f.timestamp for f in mine}), 1)  # one frame
                self.assertEqual([f.marker for f in mine],
                                 [False] * (len(mine) - 1) + [True])  # marker on the last
                self.assertEqual({f.keyframe for f in mine}, {index == 0})
                packets[e] += len(mine)
        self.assertEqual(packets, {0: 8 * LAYERS[0]["packets"], 1: 4 * LAYERS[1]["packets"],
                                   2: 2 * LAYERS[2]["packets"]})
        self.assertEqual(video.frames, [8, 4, 2])
        self.assertEqual(video.keyframes, [1, 1, 1])
        # a key frame on request, for one encoding only (a PLI for its SSRC)
        video.request_keyframe(1)
        due = video.next_frames()  # index 8: all three, and a periodic key frame
        self.assertTrue(all(f.keyframe for _, f in due))
        video.next_frames()  # index 9: h only
        video.request_keyframe(1)
        due = video.next_frames()  # index 10: h and m, m a key frame
        self.assertEqual({e: f.keyframe for e, f in due}, {0: False, 1: True})
        # the timestamp steps with the frame index on the 90 kHz clock
        a = PinnedSimulcast()
        first = a.next_frames()[0][1].timestamp
        second = a.next_frames()[0][1].timestamp
        self.assertEqual((second - first) & 0xFFFFFFFF, 3000)

    def test_pinned_payloads(self) -> None:
        a, b = PinnedSimulcast(), PinnedSimulcast()
        self.assertEqual([f.payload for _, f in a.next_frames()],
                         [f.payload for _, f in b.next_frames()])

    def test_video_rate(self) -> None:
        self.assertEqual(video_pps(1.0), 30 * 3 + 15 * 1 + 7.5 * 1)
        self.assertEqual(video_pps(2.0), 2 * video_pps(1.0))


METRICS = """\
# HELP perc_md_participant_datagrams_total Datagrams of a participant's leg, by kind (in/out)
# TYPE perc_md_participant_datagrams_total counter
perc_md_participant_datagrams_total{conference="sfu",association="a1",kind="rtp_in"} 10.0
perc_md_participant_datagrams_total{conference="sfu",association="a1",kind="rtp_out"} 20.0
perc_md_participant_datagrams_total{conference="sfu",association="a1",kind="stun_in"} 3.0
perc_md_participant_datagrams_total{conference="all",association="b1",kind="rtp_out"} 99.0
perc_md_participant_bytes_total{conference="sfu",association="a1",kind="rtp_out_bytes"} 2.5e+04
perc_md_receiver_feedback_total{conference="sfu",association="a1",kind="layer_switches"} 4.0
perc_md_receiver_feedback_total{conference="sfu",association="a2",kind="plis_requested"} 2.0
perc_md_receiver_layer_height{conference="sfu",association="a1",source="leg-x",rid="h"} 720.0
perc_md_receiver_layer_height{conference="sfu",association="a1",source="leg-y",rid="m"} 360.0
perc_md_link_datagrams_total{conference="sfu",link="l1",kind="rtp_out"} 7.0
perc_md_conferences 2.0
"""


class MetricsTests(unittest.TestCase):
    def test_per_association_of_one_conference(self) -> None:
        got = participant_metrics(METRICS, "sfu")
        self.assertEqual(set(got), {"a1", "a2"})
        a1 = got["a1"]
        self.assertEqual((a1["rtp_in"], a1["rtp_out"], a1["rtp_out_bytes"],
                          a1["layer_switches"], a1["plis_requested"]),
                         (10.0, 20.0, 25000.0, 4.0, 0.0))
        self.assertEqual(a1["heights"], {"leg-x": 720.0, "leg-y": 360.0})
        self.assertEqual(got["a2"]["plis_requested"], 2.0)
        self.assertEqual(got["a2"]["rtp_out"], 0.0)  # absent: 0
        self.assertEqual(participant_metrics(METRICS, "all")["b1"]["rtp_out"], 99.0)
        self.assertEqual(participant_metrics(METRICS, "none"), {})


class CountingReadersTests(unittest.TestCase):
    def setUp(self) -> None:
        self.sockets: list[socket.socket] = []
        self.receiver = self.udp()
        self.receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.receiver.setblocking(False)
        self.md, self.other = self.udp(), self.udp()
        self.md_address = self.md.getsockname()
        self.other_address = self.other.getsockname()

    def tearDown(self) -> None:
        for s in self.sockets:
            s.close()

    def udp(self) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        self.sockets.append(s)
        return s

    def mix(self) -> tuple[list[tuple[socket.socket, bytes]], int, list[tuple[bytes, tuple]]]:
        """(what to send, RTP datagrams from the MD, what the receive path is to get)."""
        md, other = self.md_address, self.other_address
        sends: list[tuple[socket.socket, bytes]] = []
        count, handed = 0, []

        def add(sock: socket.socket, data: bytes, counted: bool) -> None:
            nonlocal count
            sends.append((sock, data))
            count += counted
            if not counted:
                handed.append((data, md if sock is self.md else other))

        for sequence in range(230, 380):
            add(self.md, rtp(sequence, 200 + sequence * 3,
                             FULL_EKT_TYPE if sequence % 7 == 3 else 0), True)
            if sequence % 20 == 5:
                add(self.md, bytes([0x81, 200]) + bytes(26), False)  # RTCP SR
                add(self.md, bytes([0x81, 206]) + bytes(10), False)  # RTCP PSFB (a PLI)
                add(self.md, b"\x00\x01\x00\x00" + bytes(16), False)  # STUN request
                add(self.md, bytes([22, 0xFE, 0xFD]) + bytes(40), False)  # DTLS
                add(self.md, rtp(sequence + 1, 12, 0), False)  # header only: not RTP
                add(self.md, b"", False)
                add(self.other, rtp(sequence + 2, 300, 0), False)  # foreign source
        add(self.md, rtp(65530, 65507, 0), True)  # the largest
        add(self.md, END, False)
        return sends, count, handed

    def read(self, reader: object) -> tuple[int, list[tuple[bytes, tuple]]]:
        sends, _, _ = self.mix()
        to = self.receiver.getsockname()
        for sock, data in sends:
            sock.sendto(data, to)
        got: list[tuple[bytes, tuple]] = []
        count = 0
        for _ in range(100):  # until the last one sent is read (loopback: almost at once)
            count += reader(lambda data, addr: got.append((data, tuple(addr))))
            if got and got[-1][0] == END:
                break
            select.select([self.receiver], [], [], 0.1)
        return count, got

    def test_both_readers_count_rtp_and_hand_on_the_rest(self) -> None:
        try:
            batch = Batch(16)  # the mix is some 220 datagrams: many batches, one not full
        except Unavailable as e:
            raise unittest.SkipTest(str(e)) from e
        _, expected_count, expected = self.mix()
        md = self.md_address
        old = self.read(lambda receive: count_recvfrom(self.receiver.recvfrom, md, receive))
        new = self.read(lambda receive: count_mmsg(batch, self.receiver.fileno(), md,
                                                   sockaddr_key(*md), receive))
        self.assertEqual(expected_count, 151)
        self.assertEqual(old[0], expected_count)
        self.assertEqual(new[0], expected_count)
        self.assertEqual(old[1], expected)
        self.assertEqual(new[1], expected)
