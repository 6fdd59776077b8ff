"""Cascade links in the MD's media plane: two and three MediaPlanes wired by a simulated network.

:class:`Mesh` carries datagrams, with addresses, between MediaPlanes (one per
MD) and the endpoints that joined them, on a fake clock that jumps to the
planes' next link timer.  Endpoints are those of tests/unit/test_md_media.py:
real double-protected packets, keys as the KD would hand them to the MD
(outer halves only), EKT to learn each other's end-to-end keys.  The links
run real DTLS between the planes.  A real-UDP run of two MediaPlaneProtocols
is at the end.
"""

from __future__ import annotations

import gc
import heapq
import itertools
import random
import struct
import types
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from perc_daemons.md.media import MediaPlaneProtocol
from perc_daemons.md.plane import LEG_BYTES, LEG_COUNTERS, LINK_COUNTERS, MediaPlane
from perc_daemons.protocol import double
from perc_daemons.protocol.cascade import (
    CONNECTING,
    DOWN,
    UP,
    LinkDown,
    LinkTiming,
    LinkUp,
)
from perc_daemons.protocol.double import DoubleSender
from perc_daemons.protocol.dtls import certificate_fingerprint, generate_certificate
from perc_daemons.protocol.ekt import EktCipher, EktParameterSet, EktSender
from perc_daemons.protocol.rtp import RtcpPacket, SenderInfo, build_compound, sender_report
from perc_daemons.protocol.srtp import Profile
from perc_daemons.protocol.stun import BINDING_SUCCESS
from tests.unit.test_md_media import Collector, Endpoint, rtcp_rr

GCM128 = Profile.AEAD_AES_128_GCM
CERTS = {name: generate_certificate(f"md-{name}") for name in "ABC"}
ADDRESSES = {"A": ("192.0.2.1", 3478), "B": ("198.51.100.2", 3478), "C": ("203.0.113.3", 3478)}
TIMING = LinkTiming(consent_interval=1.0, consent_timeout=6.0, check_interval=0.25,
                    handshake_timeout=5.0, backoff_min=0.5, backoff_max=4.0,
                    rekey_interval=None, key_overlap=2.0, switch_delay=1.0)
Filter = Callable[[tuple, tuple, bytes], bool]


class Mesh:
    """Planes named "A", "B", "C" at ADDRESSES, endpoints at 10.0.0.x, one fake clock."""

    def __init__(self, names: str = "AB", timing: LinkTiming = TIMING, seed: int = 1,
                 latency: float = 0.0) -> None:
        self.rng = random.Random(seed)
        self.now = 0.0
        #: One-way delay of every datagram (0: delivered within the same instant).
        self.latency = latency
        self.planes: dict[str, MediaPlane] = {}
        self.events: list[tuple[float, str, Any, Any]] = []
        for i, name in enumerate(names):
            plane = MediaPlane(link_certificate=CERTS[name][0],
                               link_private_key=CERTS[name][1], link_timing=timing,
                               rng=random.Random(seed * 10 + i))
            plane.on_link = self._recorder(name)
            self.planes[name] = plane
        self.md_at = {ADDRESSES[name]: name for name in names}
        self.queue: list[tuple[float, int, bytes, tuple, tuple]] = []  # a heap
        self._order = itertools.count()
        self.wire: list[tuple[tuple, tuple, bytes]] = []
        self.inbox: dict[tuple, list[bytes]] = defaultdict(list)
        self.cut: set[frozenset[str]] = set()
        self.filter: Filter | None = None
        self.eps: dict[str, Endpoint] = {}
        self.home: dict[str, str] = {}
        self.params: dict[Any, EktParameterSet] = {}
        self.media_keys: list[Any] = []
        self.link_secrets: list[bytes] = []

    def _recorder(self, name: str) -> Callable[[Any, Any], None]:
        def on_link(link_id: Any, event: Any) -> None:
            self.events.append((self.now, name, link_id, event))
        return on_link

    # -- network ------------------------------------------------------------------------

    def emit(self, md: str, outputs: list[tuple[bytes, tuple]]) -> None:
        for data, destination in outputs:
            self.put(data, ADDRESSES[md], destination)

    def put(self, data: bytes, source: tuple, destination: tuple) -> None:
        heapq.heappush(self.queue, (self.now + self.latency, next(self._order), data, source,
                                    destination))

    def flush(self) -> None:
        """Deliver what has arrived by ``now`` (with no latency: everything, at once)."""
        steps = 0
        while self.queue and self.queue[0][0] <= self.now:
            _, _, data, source, destination = heapq.heappop(self.queue)
            steps += 1
            assert steps < 200_000, "forwarding loop"
            self.wire.append((source, destination, data))
            src_md, dst_md = self.md_at.get(source), self.md_at.get(destination)
            if src_md and dst_md and frozenset((src_md, dst_md)) in self.cut:
                continue
            if self.filter is not None and not self.filter(source, destination, data):
                continue
            if dst_md is not None:
                self.emit(dst_md, self.planes[dst_md].datagram_received(data, source, self.now))
            else:
                self.inbox[destination].append(data)

    def run(self, until: float) -> Mesh:
        self.flush()
        while True:
            timers = [t for plane in self.planes.values()
                      if (t := plane.next_timer()) is not None]
            arrival = self.queue[0][0] if self.queue else None
            soonest = min([*timers, arrival] if arrival is not None else timers, default=None)
            if soonest is None or soonest > until:
                self.now = max(self.now, until)
                self.flush()
                return self
            self.now = max(self.now, soonest)
            if timers and min(timers) <= self.now:
                for name, plane in self.planes.items():
                    self.emit(name, plane.poll(self.now))
            self.flush()

    def advance(self, seconds: float) -> Mesh:
        return self.run(self.now + seconds)

    # -- links and endpoints ---------------------------------------------------------------

    def link(self, link_id: str, group: Any, client: str, server: str,
             profile: int = GCM128) -> None:
        """Link ``client`` (asked to open it) to ``server``, as the provider API would."""
        uc, us = f"{link_id}{client}", f"{link_id}{server}"
        pc, ps = self.rng.randbytes(12).hex(), self.rng.randbytes(12).hex()
        self.link_secrets += [pc.encode(), ps.encode()]
        fp = {n: certificate_fingerprint(CERTS[n][0]) for n in (client, server)}
        self.emit(client, self.planes[client].add_link(
            link_id, group, role="client", local_ufrag=uc, local_pwd=pc, remote_ufrag=us,
            remote_pwd=ps, peer_address=ADDRESSES[server], peer_fingerprint=fp[server],
            profile=profile, now=self.now))
        self.emit(server, self.planes[server].add_link(
            link_id, group, role="server", local_ufrag=us, local_pwd=ps, remote_ufrag=uc,
            remote_pwd=pc, peer_address=None, peer_fingerprint=fp[client], profile=profile,
            now=self.now))
        self.flush()

    def params_for(self, group: Any) -> EktParameterSet:
        if group not in self.params:
            self.params[group] = EktParameterSet(
                key=self.rng.randbytes(16), cipher=EktCipher.AESKW_128,
                master_salt=self.rng.randbytes(12), spi=7, ttl=600)
        return self.params[group]

    def join(self, md: str, name: str, group: Any) -> Endpoint:
        address = (f"10.0.0.{len(self.eps) + 1}", 50000)
        ep = Endpoint(name, self.rng, self.params_for(group), address)
        self.eps[name], self.home[name] = ep, md
        plane = self.planes[md]
        plane.add_leg(name, ep.md_ufrag, ep.md_pwd, group=group, now=self.now)
        self.send(name, ep.stun())
        [answer] = self.take(name)
        assert answer[:2] == struct.pack("!H", BINDING_SUCCESS)
        keys = ep.media_keys()
        self.media_keys.append(keys)
        plane.install_keys(name, keys)
        return ep

    def send(self, name: str, datagram: bytes) -> None:
        self.put(datagram, self.eps[name].address, ADDRESSES[self.home[name]])
        self.flush()

    def media(self, name: str, seq: int, size: int = 200) -> tuple[bytes, bytes]:
        ep = self.eps[name]
        original = ep.rtp(seq, self.rng.randbytes(size))
        wire = ep.sender.protect(original, self.now)
        self.send(name, wire)
        return original, wire

    def take(self, name: str) -> list[bytes]:
        box = self.inbox[self.eps[name].address]
        out, box[:] = list(box), []
        return out

    def state(self, md: str, link_id: str) -> str:
        return self.planes[md].link_state(link_id)

    def of(self, md: str, kind: type) -> list[tuple[float, Any, Any]]:
        return [(t, link_id, e) for t, n, link_id, e in self.events
                if n == md and isinstance(e, kind)]


def outer_plaintext(context: Any, datagram: bytes) -> tuple[bytes, bytes]:
    """(outer plaintext, EKTField) of a double-protected datagram, under one hop's key."""
    end = len(datagram) - double.ekt_field_length(datagram)
    return context.unprotect(datagram[:end]), datagram[end:]


class CascadeTestCase(unittest.TestCase):
    def two_mds(self, **mesh: Any) -> Mesh:
        """MD A (a1, a2) linked to MD B (b1, b2), conference "conf"; A opened the link."""
        net = Mesh("AB", **mesh)
        net.link("L", "conf", "A", "B")
        net.advance(2.0)
        self.assertEqual((net.state("A", "L"), net.state("B", "L")), (UP, UP))
        for md, name in (("A", "a1"), ("A", "a2"), ("B", "b1"), ("B", "b2")):
            net.join(md, name, "conf")
        return net

    def assertReceived(self, net: Mesh, receivers: str | list[str], original: bytes,
                       wire: bytes, sender: str) -> None:
        """Each receiver got one copy; it decrypts to ``original``; the outer plaintext
        (RTP header, inner ciphertext, inner tag, OHB) and the EKTField are the sender's."""
        names = receivers.split() if isinstance(receivers, str) else receivers
        sent = outer_plaintext(net.eps[sender].keys.client_outer.context(), wire)
        for name in names:
            [data] = net.take(name)
            ep = net.eps[name]
            self.assertEqual(ep.receiver.unprotect(data, net.now).packet, original, name)
            self.assertEqual(outer_plaintext(ep.keys.server_outer.context(), data), sent, name)


class RelayAcrossLinkTests(CascadeTestCase):
    def test_media_crosses_both_ways_byte_identical(self) -> None:
        net = self.two_mds()
        for i in range(6):
            original, wire = net.media("a1", 100 + i)
            self.assertReceived(net, "a2 b1 b2", original, wire, "a1")
            original, wire = net.media("b2", 500 + i, size=1000)
            self.assertReceived(net, "a1 a2 b1", original, wire, "b2")
        self.assertEqual(net.take("a1") + net.take("b2"), [])
        link_a, link_b = net.planes["A"].leg("L"), net.planes["B"].leg("L")
        self.assertEqual((link_a.counters["rtp_out"], link_a.counters["rtp_in"]), (6, 6))
        self.assertEqual((link_b.counters["rtp_out"], link_b.counters["rtp_in"]), (6, 6))
        for plane in net.planes.values():
            self.assertEqual(sum(sum(leg.drops.values()) for leg in plane.legs()), 0)

    def test_link_counts_what_crossed_it_each_way(self) -> None:
        """A link's packets and bytes each way are what went over the wire between the
        two MDs (the SRTP/SRTCP inside the ChannelData frames); a packet the receiving
        MD refuses is a drop there, not media in; endpoint legs count the bytes sent to
        them only."""
        net = self.two_mds()
        first = len(net.wire)
        for i in range(5):
            net.media("a1", 100 + i, size=120 + i)
            net.media("b2", 500 + i, size=900)
        a2 = net.eps["a2"]
        net.send("a2", a2.rtcp_out.protect_rtcp(rtcp_rr(a2.ssrc, 3)))
        frames: dict[tuple[str, str, str], list[int]] = defaultdict(list)
        for source, destination, data in net.wire[first:]:
            if source in net.md_at and destination in net.md_at:
                inner = data[4:]  # ChannelData: channel, length (no padding between MDs)
                self.assertEqual(int.from_bytes(data[2:4], "big"), len(inner))
                kind = "rtcp" if 192 <= inner[1] <= 223 else "rtp"
                frames[(net.md_at[source], net.md_at[destination], kind)].append(len(inner))
        self.assertEqual({k: len(v) for k, v in frames.items()},
                         {("A", "B", "rtp"): 5, ("B", "A", "rtp"): 5, ("A", "B", "rtcp"): 1})
        link_a, link_b = net.planes["A"].leg("L"), net.planes["B"].leg("L")
        for leg, out, into in ((link_a, "AB", "BA"), (link_b, "BA", "AB")):
            for kind in ("rtp", "rtcp"):
                sent = frames.get((out[0], out[1], kind), [])
                received = frames.get((into[0], into[1], kind), [])
                self.assertEqual((leg.counters[f"{kind}_out"], leg.counters[f"{kind}_out_bytes"]),
                                 (len(sent), sum(sent)), (out, kind))
                self.assertEqual((leg.counters[f"{kind}_in"], leg.counters[f"{kind}_in_bytes"]),
                                 (len(received), sum(received)), (into, kind))
        self.assertGreater(link_b.counters["rtp_out_bytes"], 5 * 900)
        # one of A's packets altered on the way: B drops it (outer tag), counts no media
        held: list[bytes] = []

        def hold(source: tuple, destination: tuple, data: bytes) -> bool:
            if (source, destination) == (ADDRESSES["A"], ADDRESSES["B"]):
                held.append(data)
                return False
            return True

        net.filter = hold
        net.media("a1", 200)
        net.filter = None
        [frame] = held
        before = dict(link_b.counters)
        net.put(frame[:30] + bytes([frame[30] ^ 1]) + frame[31:], ADDRESSES["A"],
                ADDRESSES["B"])
        net.flush()
        self.assertEqual(link_b.drops["srtp_auth"], 1)
        self.assertEqual(link_b.counters, before)
        net.put(frame, ADDRESSES["A"], ADDRESSES["B"])  # the genuine one after all
        net.flush()
        self.assertEqual(link_b.counters["rtp_in"], before["rtp_in"] + 1)
        self.assertEqual(link_b.counters["rtp_in_bytes"],
                         before["rtp_in_bytes"] + len(frame) - 4)
        for plane in net.planes.values():
            for leg in plane.legs():
                if leg.link is None:
                    self.assertEqual(tuple(leg.counters), (*LEG_COUNTERS, *LEG_BYTES), leg)
                else:
                    self.assertEqual(tuple(leg.counters), LINK_COUNTERS, leg)

    def test_rtcp_crosses_hop_by_hop(self) -> None:
        net = self.two_mds()
        a1, b1 = net.eps["a1"], net.eps["b1"]
        sr = sender_report(a1.ssrc, SenderInfo(0x1122334455667788, 1234, 10, 1600))
        nack = RtcpPacket(205, struct.pack("!IIHH", a1.ssrc, b1.ssrc, 100, 0b101), count=1)
        pli = RtcpPacket(206, struct.pack("!II", a1.ssrc, b1.ssrc), count=1)
        fir = RtcpPacket(206, struct.pack("!IIIB3x", a1.ssrc, 0, b1.ssrc, 7), count=4)
        compound = build_compound([sr, nack, pli, fir])
        net.send("a1", a1.rtcp_out.protect_rtcp(compound))
        for name in ("a2", "b1", "b2"):
            [data] = net.take(name)
            self.assertEqual(net.eps[name].rtcp_in.unprotect_rtcp(data), compound)
        rr = rtcp_rr(b1.ssrc, 3)
        net.send("b1", b1.rtcp_out.protect_rtcp(rr))
        for name in ("a1", "a2", "b2"):
            [data] = net.take(name)
            self.assertEqual(net.eps[name].rtcp_in.unprotect_rtcp(data), rr)
        self.assertEqual(net.planes["B"].leg("L").counters["rtcp_in"], 1)
        self.assertEqual(net.planes["A"].leg("L").counters["rtcp_in"], 1)

    def test_seq_renumbering_stays_right_across_two_hops(self) -> None:
        """MD A keeps packets from the link, MD B others from b1: every receiver sees
        contiguous SEQs, and the OHB brings back the first original (RFC 8723 s4)."""
        net = self.two_mds()
        count = {"k": 0}
        net.planes["A"].should_forward = lambda src, dst, ssrc: not (
            dst == "L" and count["k"] % 3 == 2)
        net.planes["B"].should_forward = lambda src, dst, ssrc: not (
            dst == "b1" and count["k"] % 4 == 1)
        seqs: dict[str, list[int]] = {"b1": [], "b2": [], "a2": []}
        for k in range(24):
            count["k"] = k
            original, _ = net.media("a1", (65530 + k) & 0xFFFF)  # and across the SEQ wrap
            for name in seqs:
                for data in net.take(name):
                    seqs[name].append(int.from_bytes(data[2:4], "big"))
                    got = net.eps[name].receiver.unprotect(data, net.now)
                    self.assertEqual(got.packet, original, (name, k))
        expected = {"a2": 24, "b2": 16, "b1": 12}
        for name, got in seqs.items():
            self.assertEqual(len(got), expected[name], name)
            self.assertEqual(got, [(65530 + i) & 0xFFFF for i in range(len(got))], name)


class LoopTests(CascadeTestCase):
    def triangle(self) -> Mesh:
        """Three MDs linked in a cycle (the MD cannot know): A-B, B-C, C-A."""
        net = Mesh("ABC")
        net.link("AB", "conf", "A", "B")
        net.link("BC", "conf", "B", "C")
        net.link("CA", "conf", "C", "A")
        net.advance(2.0)
        for md, link_id in (("A", "AB"), ("B", "AB"), ("B", "BC"), ("C", "BC"),
                            ("C", "CA"), ("A", "CA")):
            self.assertEqual(net.state(md, link_id), UP)
        for md in "ABC":
            net.join(md, md.lower() + "1", "conf")
        return net

    def test_ssrc_from_two_neighbours_dropped_and_counted(self) -> None:
        net = self.triangle()
        for i in range(3):
            original, wire = net.media("a1", 10 + i)
            self.assertReceived(net, "b1 c1", original, wire, "a1")  # exactly one copy each
            self.assertEqual(net.take("a1"), [])
        drops = {md: sum(leg.drops["ssrc_from_other_leg"] for leg in plane.legs())
                 for md, plane in net.planes.items()}
        self.assertEqual(drops, {"A": 0, "B": 3, "C": 3})
        for plane in net.planes.values():  # never back where it came from
            for leg in plane.legs():
                self.assertNotIn(leg, leg.peers)
                self.assertEqual(len(leg.peers), 2)  # one endpoint or link less than 3
        # the copy that went round: dropped on the B-C link legs
        self.assertEqual(net.planes["B"].leg("BC").drops["ssrc_from_other_leg"], 3)
        self.assertEqual(net.planes["C"].leg("BC").drops["ssrc_from_other_leg"], 3)

    def test_owner_forgotten_when_its_leg_is_removed(self) -> None:
        net = self.triangle()
        original, wire = net.media("a1", 1)
        self.assertReceived(net, "b1 c1", original, wire, "a1")
        ssrc = net.eps["a1"].ssrc
        b = net.planes["B"]
        self.assertIs(b.leg("AB").owners[ssrc], b.leg("AB"))
        net.emit("B", b.remove_link("AB"))
        net.flush()
        self.assertNotIn(ssrc, b.leg("BC").owners)
        original, wire = net.media("a1", 2)  # now A-C-B, a tree
        self.assertReceived(net, "b1 c1", original, wire, "a1")
        self.assertIs(b.leg("BC").owners[ssrc], b.leg("BC"))
        a = net.planes["A"]
        self.assertIs(a.leg("a1").owners[ssrc], a.leg("a1"))
        a.remove_leg("a1")
        self.assertNotIn(ssrc, a.leg("CA").owners)

    def test_owner_forgotten_when_its_link_goes_down(self) -> None:
        """A-B fails: B forgets that a1's SSRC came over it, and takes it from C."""
        net = self.triangle()
        original, wire = net.media("a1", 10)
        self.assertReceived(net, "b1 c1", original, wire, "a1")
        net.cut.add(frozenset("AB"))
        net.advance(8.0)
        self.assertEqual(net.planes["B"].leg("AB").owned, set())
        self.assertNotEqual(net.state("B", "AB"), UP)
        for i in range(3):
            original, wire = net.media("a1", 11 + i)
            self.assertReceived(net, "b1 c1", original, wire, "a1")  # now by way of C
        # before the cut its copy was dropped (a1's SSRC was the A-B link's), now it counts
        self.assertEqual(net.planes["B"].leg("BC").counters["rtp_in"], 3)

    def test_two_local_endpoints_with_one_ssrc_are_left_alone(self) -> None:
        """Not a loop (a rejoining endpoint's old leg may linger): both are forwarded."""
        net = self.two_mds()
        twin = net.join("A", "a3", "conf")
        a1 = net.eps["a1"]
        twin.ssrc = a1.ssrc
        twin.sender = DoubleSender(twin.keys.client_outer.context(), EktSender(
            a1.ssrc, 16, net.params_for("conf"), 0.0, random_bytes=net.rng.randbytes))
        original, wire = net.media("a1", 1)
        self.assertReceived(net, "a2 a3 b1 b2", original, wire, "a1")
        original, wire = net.media("a3", 2)
        self.assertEqual(len(net.take("a2")), 1)
        self.assertEqual(len(net.take("b1")), 1)
        self.assertEqual(net.planes["A"].leg("a3").drops["ssrc_from_other_leg"], 0)


class LinkLifecycleTests(CascadeTestCase):
    def test_link_down_locals_go_on_then_up_again_without_endpoint_action(self) -> None:
        net = self.two_mds()
        first = net.of("A", LinkUp)[-1][2]
        net.cut.add(frozenset("AB"))
        net.advance(8.0)
        [(_, _, down_a)] = net.of("A", LinkDown)
        [(_, _, down_b)] = net.of("B", LinkDown)
        self.assertEqual((down_a.reason, down_b.reason), ("consent_timeout", "consent_timeout"))
        self.assertIn(net.state("A", "L"), (CONNECTING, DOWN))
        self.assertEqual(net.state("B", "L"), DOWN)
        self.assertFalse(net.planes["A"].leg("L").keyed)
        original, wire = net.media("a1", 40)
        self.assertReceived(net, "a2", original, wire, "a1")
        self.assertEqual(net.take("b1") + net.take("b2"), [])
        original, wire = net.media("b1", 80)
        self.assertReceived(net, "b2", original, wire, "b1")
        self.assertEqual(net.take("a1") + net.take("a2"), [])
        net.cut.clear()
        net.advance(8.0)
        self.assertEqual((net.state("A", "L"), net.state("B", "L")), (UP, UP))
        again = net.of("A", LinkUp)[-1][2]
        self.assertNotEqual(again.local_write_key, first.local_write_key)
        for i in range(3):
            original, wire = net.media("a1", 41 + i)
            self.assertReceived(net, "a2 b1 b2", original, wire, "a1")
            original, wire = net.media("b1", 81 + i)
            self.assertReceived(net, "a1 a2 b2", original, wire, "b1")

    def test_peer_md_restart_restores_media(self) -> None:
        """MD B restarts (a new plane, the provider re-adds link and participants)."""
        net = self.two_mds()
        old = net.planes["B"]
        net.planes["B"] = MediaPlane(link_certificate=CERTS["B"][0],
                                     link_private_key=CERTS["B"][1], link_timing=TIMING,
                                     rng=random.Random(77))
        net.planes["B"].on_link = net._recorder("B")
        server = old.link("L")
        net.planes["B"].add_link("L", "conf", role="server", local_ufrag=server.local_ufrag,
                                 local_pwd=server._local_key.decode(),
                                 remote_ufrag=server.remote_ufrag,
                                 remote_pwd=server._remote_key.decode(), peer_address=None,
                                 peer_fingerprint=certificate_fingerprint(CERTS["A"][0]),
                                 profile=GCM128, now=net.now)
        for name in ("b1", "b2"):
            ep = net.eps[name]
            net.planes["B"].add_leg(name, ep.md_ufrag, ep.md_pwd, group="conf", now=net.now)
            net.send(name, ep.stun())
            net.take(name)
            net.planes["B"].install_keys(name, ep.media_keys())
        net.advance(6.0)
        self.assertEqual(net.of("A", LinkDown)[-1][2].reason, "peer_restart")
        self.assertEqual((net.state("A", "L"), net.state("B", "L")), (UP, UP))
        original, wire = net.media("a1", 7)
        self.assertReceived(net, "a2 b1 b2", original, wire, "a1")

    def test_two_conferences_between_the_same_mds(self) -> None:
        """Two links share one 5-tuple: ChannelData numbers keep them apart."""
        net = Mesh("AB")
        net.link("L1", "c1", "A", "B")
        net.link("L2", "c2", "B", "A")  # the other MD asked to open this one
        net.advance(2.0)
        for md in "AB":
            for link_id in ("L1", "L2"):
                self.assertEqual(net.state(md, link_id), UP)
        a = net.planes["A"]
        self.assertNotEqual(a.link("L1").local_channel, a.link("L2").local_channel)
        for md, name, group in (("A", "a1", "c1"), ("A", "a2", "c2"),
                                ("B", "b1", "c1"), ("B", "b2", "c2")):
            net.join(md, name, group)
        for k in range(3):
            original, wire = net.media("a1", k)
            self.assertReceived(net, "b1", original, wire, "a1")
            original, wire = net.media("b2", k)
            self.assertReceived(net, "a2", original, wire, "b2")
            self.assertEqual(net.take("a2") + net.take("b2") + net.take("a1"), [])

    REKEY = LinkTiming(consent_interval=1.0, consent_timeout=6.0, check_interval=0.25,
                       handshake_timeout=5.0, backoff_min=0.5, backoff_max=4.0,
                       rekey_interval=2.5, key_overlap=2.0, switch_delay=1.5)

    def test_rekeys_keep_media_flowing(self) -> None:
        """Rekeys every 2.5 s with 30 ms one-way delay, the server's final flight of each
        lost once: packets sealed under the old keys are in flight when the new ones
        come up, both ways, the server is one flight ahead for a second, and all arrive."""
        for senders in (("a1", "b1"), ("a1",), ("b1",)):
            net = self.two_mds(timing=self.REKEY)
            net.latency = 0.03
            lost: list[float] = []

            def lose_final_flight(source: tuple, destination: tuple, data: bytes,
                                  net: Mesh = net, lost: list[float] = lost) -> bool:
                final = (source == ADDRESSES["B"] and data[0] >> 4 == 4
                         and data[4] == 20)  # a ChangeCipherSpec: the server's last flight
                if final and (not lost or net.now - lost[-1] > 2.0):
                    lost.append(net.now)
                    return False
                return True

            net.filter = lose_final_flight
            sent: dict[str, dict[int, bytes]] = {name: {} for name in senders}
            for k in range(500):  # 10 s of 50 packets/s from each sender
                for name in senders:
                    sent[name][k] = net.media(name, k)[0]
                net.advance(0.02)
            net.advance(1.0)
            self.assertGreaterEqual(len(lost), 3, senders)
            for name in senders:
                other = "b1" if name == "a1" else "a1"
                got = [net.eps[other].receiver.unprotect(d, net.now).packet
                       for d in net.take(other)]
                self.assertEqual(got, list(sent[name].values()), senders)
            for md in "AB":
                self.assertGreaterEqual(len(net.of(md, LinkUp)), 4, senders)
                self.assertEqual(net.of(md, LinkDown), [], senders)
                self.assertEqual(sum(net.planes[md].leg("L").drops.values()), 0, senders)

    def test_server_side_seals_with_new_keys_once_the_peer_does(self) -> None:
        net = self.two_mds(timing=self.REKEY)
        leg = net.planes["B"].leg("L")  # B is the link's server
        net.advance(0.6)  # up at 0, its first rekey at 2.5
        self.assertEqual(len(net.of("B", LinkUp)), 2)
        self.assertIsNotNone(leg.next_outbound)
        self.assertIsNotNone(leg.previous_inbound)
        old = leg.outbound
        net.media("a1", 1)  # A already seals with the new keys: proof for B
        self.assertIsNone(leg.next_outbound)
        self.assertIsNot(leg.outbound, old)
        net.advance(2.1)
        self.assertIsNone(leg.previous_inbound)  # retired after key_overlap
        # with nothing from A, B switches after switch_delay
        net.advance(0.5)
        self.assertIsNotNone(leg.next_outbound)
        net.advance(self.REKEY.switch_delay)
        self.assertIsNone(leg.next_outbound)

    def test_remove_link_sends_close_notify_and_forgets_it(self) -> None:
        net = self.two_mds()
        original, wire = net.media("a1", 1)
        self.assertReceived(net, "a2 b1 b2", original, wire, "a1")
        net.emit("A", net.planes["A"].remove_link("L"))
        net.flush()
        self.assertEqual(net.of("B", LinkDown)[-1][2].reason, "close_notify")
        self.assertRaises(KeyError, net.planes["A"].link_state, "L")
        self.assertNotIn("L", {leg.leg_id for leg in net.planes["A"].legs()})
        self.assertEqual({leg.leg_id for leg in net.planes["A"].leg("a1").peers}, {"a2"})
        self.assertEqual(net.planes["A"].remove_link("L"), [])
        original, wire = net.media("a1", 2)
        self.assertReceived(net, "a2", original, wire, "a1")
        self.assertEqual(net.take("b1"), [])
        self.assertIsNone(net.planes["A"].next_timer())


class PlaneApiTests(CascadeTestCase):
    def plane(self) -> MediaPlane:
        return MediaPlane(link_certificate=CERTS["A"][0], link_private_key=CERTS["A"][1],
                          link_timing=TIMING, rng=random.Random(3))

    def add(self, plane: MediaPlane, link_id: str = "L", **overrides: Any) -> Any:
        kwargs: dict[str, Any] = dict(
            role="client", local_ufrag="lu", local_pwd="lp", remote_ufrag="ru",
            remote_pwd="rp", peer_address=ADDRESSES["B"],
            peer_fingerprint=certificate_fingerprint(CERTS["B"][0]), profile=GCM128, now=0.0)
        kwargs.update(overrides)
        return plane.add_link(link_id, "conf", **kwargs)

    def test_add_link_refusals(self) -> None:
        plane = self.plane()
        [(check, to)] = self.add(plane)
        self.assertEqual((check[0], to), (0, ADDRESSES["B"]))  # the first check, unframed
        self.assertEqual(plane.link_state("L"), CONNECTING)
        self.assertRaises(ValueError, self.add, plane)  # the id is taken
        self.assertRaises(ValueError, self.add, plane, "M")  # the ufrag is taken
        plane.add_leg("ep", "epu", "eppwd")
        self.assertRaises(ValueError, self.add, plane, "M", local_ufrag="epu")
        for bad in ({"profile": 0x0009}, {"role": "relay"}, {"peer_address": None},
                    {"peer_fingerprint": b"x"}):
            self.assertRaises(ValueError, self.add, plane, "M", local_ufrag="mu", **bad)
        self.assertNotIn("M", {leg.leg_id for leg in plane.legs()})
        self.assertRaises(ValueError, self.add, MediaPlane(), "L")  # no certificate
        self.assertRaises(ValueError, plane.remove_leg, "L")
        self.assertRaises(ValueError, plane.install_keys, "L", object())
        self.assertEqual(plane.send_dtls("L", b"\x16x"), [])

    def test_links_keep_their_own_consent(self) -> None:
        plane = self.plane()
        self.add(plane)
        self.assertEqual(plane.expire(1000.0), [])
        self.assertEqual(plane.link_state("L"), CONNECTING)

    def test_timers(self) -> None:
        plane = MediaPlane()
        self.assertIsNone(plane.next_timer())
        self.assertEqual(plane.poll(5.0), [])
        plane = self.plane()
        self.add(plane)
        self.assertEqual(plane.next_timer(), TIMING.check_interval)
        out = plane.poll(TIMING.check_interval)
        self.assertEqual([d[0] for d, _ in out], [0])  # the next check
        self.assertGreater(plane.next_timer(), TIMING.check_interval)

    def test_channel_data_refusals_are_counted(self) -> None:
        net = self.two_mds()
        plane, leg = net.planes["B"], net.planes["B"].leg("L")
        channel = net.planes["B"].link("L").local_channel
        good = [d for s, _, d in net.wire if s == ADDRESSES["A"] and d[0] >> 4 == 4][-1]
        cases = [
            (good, ADDRESSES["C"], leg.drops, "wrong_address"),
            (struct.pack("!HH", channel, 100) + b"\x80" * 50, ADDRESSES["A"], leg.drops,
             "framing"),
            (struct.pack("!HH", channel, 0), ADDRESSES["A"], leg.drops, "framing"),
            (struct.pack("!HH", channel, 4) + b"\x42abc", ADDRESSES["A"], leg.drops,
             "unknown_kind"),
            (struct.pack("!HH", 0x4FFF if channel != 0x4FFF else 0x4FFE, 4) + b"\x80abc",
             ADDRESSES["A"], plane.drops, "unknown_channel"),
            (b"\x40", ADDRESSES["A"], plane.drops, "unknown_channel"),
        ]
        for data, source, where, reason in cases:
            before = where[reason]
            self.assertEqual(plane.datagram_received(data, source, net.now), [], reason)
            self.assertEqual(where[reason], before + 1, reason)
        # padding to a multiple of 4 (RFC 8656 s12.5) is accepted
        sealed = net.planes["A"].leg("L")
        self.assertTrue(sealed.keyed)
        self.assertEqual(plane.drops["unknown_transaction"], 0)
        plane.datagram_received(bytes.fromhex("0101000c2112a442") + bytes(24), ADDRESSES["A"],
                                net.now)
        self.assertEqual(plane.drops["unknown_transaction"], 1)


def _reachable_bytes(root: object, limit: int = 500_000) -> list[bytes]:
    """Every bytes/bytearray/str reachable from ``root`` (not through code objects)."""
    skip = (types.FunctionType, types.MethodType, types.BuiltinFunctionType, types.ModuleType,
            type, types.CodeType, types.FrameType)
    seen: set[int] = set()
    found: list[bytes] = []
    stack: list[object] = [root]
    while stack and len(seen) < limit:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, skip):
            continue
        seen.add(id(obj))
        if isinstance(obj, (bytes, bytearray)):
            found.append(bytes(obj))
            continue
        if isinstance(obj, str):
            found.append(obj.encode("utf-8", "surrogatepass"))
            continue
        stack.extend(gc.get_referents(obj))
        if hasattr(obj, "__slots__"):
            for cls in type(obj).__mro__:
                for slot in getattr(cls, "__slots__", ()):
                    value = getattr(obj, slot, None)
                    if value is not None:
                        stack.append(value)
    return found


class KeySearchTests(CascadeTestCase):
    def test_no_md_ever_holds_an_inner_or_ekt_key(self) -> None:
        """The audit of RFC 8871 s6.5 over two linked MDs: search everything each MD
        received (datagrams, MediaKeys, its links' keys) and everything reachable from
        its plane for every end-to-end key and salt and the EKT key."""
        timing = LinkTiming(consent_interval=1.0, consent_timeout=6.0, check_interval=0.25,
                            handshake_timeout=5.0, backoff_min=0.5, backoff_max=4.0,
                            rekey_interval=1.5, key_overlap=1.0, switch_delay=0.5)
        net = self.two_mds(timing=timing)
        for k in range(100):
            for name in ("a1", "b1", "b2"):
                net.media(name, k)
                ep = net.eps[name]
                net.send(name, ep.rtcp_out.protect_rtcp(rtcp_rr(ep.ssrc, k)))
            net.advance(0.05)
        for name in net.eps:
            net.take(name)
        secrets: list[tuple[str, bytes]] = []
        for name, ep in net.eps.items():
            k = ep.keys
            secrets += [(f"{name} client inner key", k.client_inner.key),
                        (f"{name} client inner salt", k.client_inner.salt),
                        (f"{name} server inner key", k.server_inner.key),
                        (f"{name} server inner salt", k.server_inner.salt),
                        (f"{name} e2e key", ep.sender.ekt._key_bytes),
                        (f"{name} e2e salt", ep.sender.ekt.salt_of(ep.sender.ekt._key_bytes))]
        for group, params in net.params.items():
            secrets += [(f"{group} EKT key", params.key), (f"{group} EKT salt", params.master_salt)]
        self.assertGreaterEqual(len(secrets), 4 * 6 + 2)
        haystacks: list[tuple[str, bytes]] = [
            (f"datagram {s}->{d}", data) for s, d, data in net.wire
            if s in net.md_at or d in net.md_at]
        for keys in net.media_keys:
            haystacks.append(("MediaKeys", b"".join((keys.client_write_key, keys.server_write_key,
                                                     keys.client_write_salt,
                                                     keys.server_write_salt))))
        link_keys = [e for _, _, _, e in net.events if isinstance(e, LinkUp)]
        self.assertGreaterEqual(len(link_keys), 10)  # several rekeys ran
        for event in link_keys:
            haystacks.append(("LinkUp", b"".join((event.local_write_key, event.local_write_salt,
                                                  event.remote_write_key,
                                                  event.remote_write_salt))))
        for md, plane in net.planes.items():
            plane.on_link = lambda *args: None  # not the test's own recorder
            haystacks += [(f"reachable from plane {md}", blob)
                          for blob in _reachable_bytes(plane)]
        self.assertGreater(len(haystacks), 2000)
        leaks = [(what, where) for what, secret in secrets for where, blob in haystacks
                 if secret in blob]
        self.assertEqual(leaks, [])
        # Positive controls: the same search finds what the MDs do hold.
        reachable = b"\x00".join(blob for where, blob in haystacks if where.startswith("reach"))
        for secret in net.link_secrets:  # the links' ice-pwds
            self.assertIn(secret, reachable)
        endpoint_state = b"\x00".join(_reachable_bytes(net.eps["a1"]))
        self.assertIn(net.eps["a1"].keys.client_inner.key, endpoint_state)
        outer = net.media_keys[0].client_write_key
        self.assertTrue(any(outer in blob for where, blob in haystacks if where == "MediaKeys"))


class RealUdpTests(unittest.TestCase):
    """Two MediaPlaneProtocols on loopback: the wrapper's callLater drives the links."""

    @defer.inlineCallbacks
    def test_two_mds_over_real_udp(self) -> None:
        timing = LinkTiming(consent_interval=0.5, consent_timeout=5.0, check_interval=0.1,
                            handshake_timeout=3.0, backoff_min=0.2, backoff_max=1.0,
                            rekey_interval=1.0, key_overlap=1.0, switch_delay=0.5)
        protocols, addresses, events = {}, {}, []
        for i, md in enumerate("AB"):
            plane = MediaPlane(link_certificate=CERTS[md][0], link_private_key=CERTS[md][1],
                               link_timing=timing, rng=random.Random(i))
            plane.on_link = lambda link_id, event, md=md: events.append((md, event))
            protocol = MediaPlaneProtocol(plane, reactor)
            port = reactor.listenUDP(0, protocol, interface="127.0.0.1")
            self.addCleanup(port.stopListening)
            protocols[md], addresses[md] = protocol, ("127.0.0.1", port.getHost().port)
        fp = {md: certificate_fingerprint(CERTS[md][0]) for md in "AB"}
        protocols["B"].add_link("L", "conf", role="server", local_ufrag="LB", local_pwd="pb",
                                remote_ufrag="LA", remote_pwd="pa", peer_address=None,
                                peer_fingerprint=fp["A"], profile=GCM128)
        protocols["A"].add_link("L", "conf", role="client", local_ufrag="LA", local_pwd="pa",
                                remote_ufrag="LB", remote_pwd="pb", peer_address=addresses["B"],
                                peer_fingerprint=fp["B"], profile=GCM128)
        rng = random.Random(5)
        params = EktParameterSet(key=rng.randbytes(16), cipher=EktCipher.AESKW_128,
                                 master_salt=rng.randbytes(12), spi=1, ttl=600)
        eps, sockets = {}, {}
        for md, name in (("A", "a"), ("B", "b")):
            collector = Collector()
            sock = reactor.listenUDP(0, collector, interface="127.0.0.1")
            self.addCleanup(sock.stopListening)
            ep = Endpoint(name, rng, params, ("127.0.0.1", sock.getHost().port))
            eps[name], sockets[name] = ep, (sock, collector)
            plane = protocols[md].plane
            plane.add_leg(name, ep.md_ufrag, ep.md_pwd, group="conf")
            waiting = collector.next()
            sock.write(ep.stun(), addresses[md])
            yield waiting
            plane.install_keys(name, ep.media_keys())
        for _ in range(100):
            if all(p.plane.link_state("L") == UP for p in protocols.values()):
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual([p.plane.link_state("L") for p in protocols.values()], [UP, UP])
        a, b = eps["a"], eps["b"]
        received = 0
        for seq in range(40):  # across a few rekeys (every second)
            original = a.rtp(seq, b"over real udp and a real link" * 5)
            waiting = sockets["b"][1].next()
            sockets["a"][0].write(a.sender.protect(original, seq * 0.05), addresses["A"])
            data = yield waiting
            self.assertEqual(b.receiver.unprotect(data, seq * 0.05).packet, original)
            received += 1
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(received, 40)
        ups = [e for md, e in events if isinstance(e, LinkUp)]
        self.assertGreaterEqual(len(ups), 4)  # the link came up and rekeyed on its own
        self.assertFalse([e for md, e in events if isinstance(e, LinkDown)])
        for protocol in protocols.values():
            protocol.remove_link("L")
        self.assertIsNone(protocols["A"].plane.next_timer())

