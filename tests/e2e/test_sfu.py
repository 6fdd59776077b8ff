"""perc-md as a selective forwarding unit, end to end (issue 13): real daemons, real endpoints.

One perc-md; every endpoint sends PCMU audio with its RFC 6464 level and
three simulcast video encodings (RFC 8853: h, m, l at a=rid max-height
720/360/180) with frame marking, and receives through the MD's selection
(:mod:`perc_daemons.protocol.selection`).  The conferences are made at the
MD with ``perc-provider conferences create`` and its forwarding options
(``--last-n``, ``--no-audio-levels``), as a provider would.

* :class:`LastNTests`: six endpoints, ``last_n`` 2.  Three of them talk in
  turn (about 2 s each); every receiver then gets the video of exactly the
  two most recent dominant speakers other than itself, at the layer its
  ``max_height`` allows (360: "m", none: "h"), and after a PATCH of its
  ``max_height`` to 180 one receiver moves to "l", the first "l" packet a
  key frame.  Every receiver: no decrypt failure, no gap in the outer
  sequence of any SSRC it got (RFC 8723 s5.3: what is withheld is
  renumbered away), speaker hints naming the talker first.
* :class:`RepairTests`: a UDP relay between the MD and one receiver drops
  every 10th video datagram toward it; the receiver's generic NACKs
  (RFC 4585 s6.2.1) are answered by the MD from its history (the packet
  re-sealed on the same SSRC and SEQ), so that the receiver's loss after
  repair is nil.
* :class:`JoinOrderTests`: ``--no-audio-levels``: the MD's answer has no
  audio level extmap, the endpoints send none, video follows join order
  however loud someone is, and no speaker hint is sent.

Each class is one test on one stack (trial has no class-level fixture:
:class:`~tests.e2e.conference_support.StackTestCase` starts a stack per
test).  Each prints a short summary of what every receiver got.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import treq
from twisted.internet import defer, reactor
from twisted.internet.protocol import DatagramProtocol

from perc_daemons.demo.stack import sleep
from perc_daemons.md.provider_cli import run as provider_run
from perc_daemons.protocol.extensions import AUDIO_LEVEL_URI, MID_URI, find_extension
from perc_daemons.protocol.participant import EXTMAP_IDS, MediaReceived
from tests.e2e.cascade_support import CascadeChainMixin
from tests.e2e.conference_support import (
    RecordingEndpoint,
    StackTestCase,
    is_rtp,
    rtp_header,
    wait_for,
)

#: The simulcast layers, in the order of Endpoint.video_ssrcs.
LAYERS = ("h", "m", "l")
#: RTP extension ids the reference endpoint offers (the MD reads them from the offer).
AUDIO_LEVEL_ID, MID_ID = EXTMAP_IDS[AUDIO_LEVEL_URI], EXTMAP_IDS[MID_URI]
#: A REMB well above two "h" layers (some 300 kbit/s each): the budget never binds.
BANDWIDTH = 5_000_000
#: Seconds each talker talks.
TURN = 2.0
#: Seconds of the window in which what each receiver gets is counted.
WINDOW = 1.5


def is_keyframe(payload: bytes) -> bool:
    """A VP8 key frame (RFC 7741 s4.3: the frame tag's P bit clear) after the
    one-byte payload descriptor the reference video source writes."""
    return len(payload) > 1 and not payload[1] & 0x01


class SfuCase(StackTestCase):
    """A stack with one MD and a conference made by ``perc-provider conferences create``
    with :attr:`forwarding_options`."""

    users = ("alice", "bob", "carol", "dave", "erin", "frank")
    invited = users
    create_conference = False
    tap = False
    timeout = 120
    forwarding_options: tuple[str, ...] = ()
    #: Instead of perc-provider: the settings through LocalStack.create_conference.
    md_settings: dict[str, Any] | None = None

    async def setUp(self) -> None:
        await super().setUp()
        try:
            self.created_out = ""
            await self.stack.create_conference(self.conference, list(self.invited),
                                               md_settings=self.md_settings,
                                               at_md=self.md_settings is not None)
            if self.md_settings is None:
                code, out, err = await self.provider(
                    "conferences", "create", self.conference,
                    "--kd-certificate", str(self.stack.kd_cert.certificate),
                    *self.forwarding_options)
                self.assertEqual((code, err), (0, ""), out)
                self.created_out = out
            await self.stack.wait_for_kd(self.conference)
        except BaseException:
            self._dump_logs("setUp failed")
            await self.stack.stop_all()
            raise

    async def provider(self, *argv: str) -> tuple[int, str, str]:
        """One ``perc-provider`` run against the stack's MD."""
        out, err = io.StringIO(), io.StringIO()
        code = await provider_run(
            [*argv, "--url", self.stack.md_api_url(),
             "--config", os.path.join(self.stack.dir, "etc", "provider.toml")],
            reactor, stdout=out, stderr=err)
        return code, out.getvalue(), err.getvalue()

    # --- endpoints ----------------------------------------------------------------------

    #: user -> the MD it joins through (default "md")
    places: Mapping[str, str] = {}

    async def join_all(self, users: Iterable[str], **options: Any
                       ) -> dict[str, RecordingEndpoint]:
        """Each user joins (audio + simulcast video) through its MD (:attr:`places`), one
        after the other; then all hold the same newest EKT key.  ``options[user]`` are
        that user's Endpoint options."""
        eps = {}
        for user in users:
            ep = self.endpoint(user, video="simulcast", bandwidth=BANDWIDTH,
                               md=self.places.get(user, "md"), **options.get(user, {}))
            ep.talking = False
            await ep.join()
            eps[user] = ep
        await self.same_epoch(*eps.values())
        return eps

    @staticmethod
    def layer_map(eps: Mapping[str, RecordingEndpoint]) -> dict[int, tuple[str, str]]:
        """Video SSRC -> (sender, layer)."""
        return {ssrc: (user, LAYERS[i]) for user, ep in eps.items()
                for i, ssrc in enumerate(ep.video_ssrcs)}

    @staticmethod
    def start_media(eps: Mapping[str, RecordingEndpoint]) -> defer.Deferred:
        """Every endpoint sends until :meth:`stop_media` (a minute at most)."""
        return defer.gatherResults([ep.run_media(60.0) for ep in eps.values()],
                                   consumeErrors=True)

    @staticmethod
    async def stop_media(eps: Mapping[str, RecordingEndpoint], running: defer.Deferred
                         ) -> None:
        for ep in eps.values():
            ep.stop_media()
        await running
        await sleep(reactor, 0.3)  # what is in flight, and the last repairs

    def video_in(self, ep: RecordingEndpoint, layers: Mapping[int, tuple[str, str]],
                 since: float, until: float) -> dict[tuple[str, str], int]:
        """(sender, layer) -> video packets ``ep`` decrypted between the two times."""
        counts: dict[tuple[str, str], int] = {}
        for t, event in ep.events:
            if (since <= t < until and isinstance(event, MediaReceived)
                    and event.ssrc in layers):
                key = layers[event.ssrc]
                counts[key] = counts.get(key, 0) + 1
        return counts

    # --- the MD's view ------------------------------------------------------------------

    async def md_views(self, eps: Mapping[str, RecordingEndpoint]) -> dict[str, Any]:
        """Per user, its MD's receive view of its participant (GET conference at every
        MD), with each forwarded layer's source as the sending user (a sender behind a
        cascade link is named by the link and its tag: matched by its SSRC)."""
        participants = []
        for md in self.stack.md_names:
            status, body = await self.stack.request(
                "GET", self.stack.md_api_url(md) + f"/v1/conferences/{self.conference}",
                token=self.stack.provider_token)
            self.assertEqual(status, 200, body)
            participants += body["participants"]
        users = {ep.joined.association: user for user, ep in eps.items()}
        users.update({str(ssrc): user for user, ep in eps.items()
                      for ssrc in ep.video_ssrcs})
        views = {}
        for participant in participants:
            user = users.get(participant["association"])
            if user is None or "receive" not in participant:
                continue
            view = dict(participant["receive"])
            view["layers"] = {users.get(layer["source"], users.get(str(layer["ssrc"]))):
                              layer["rid"] for layer in view["layers"]}
            views[user] = view
        return views

    async def wait_layers(self, eps: Mapping[str, RecordingEndpoint],
                          expected: Mapping[str, Mapping[str, str]], what: str) -> None:
        """Until the MD forwards to each user exactly ``expected[user]`` (source -> rid)."""
        seen: dict[str, Any] = {}

        async def done() -> bool:
            seen.update(await self.md_views(eps))
            return all(seen.get(user, {}).get("layers") == dict(layers)
                       and not seen[user]["waiting"] for user, layers in expected.items())

        deadline = reactor.seconds() + 15.0
        while not await done():
            if reactor.seconds() > deadline:
                raise AssertionError(f"{what}: the MD forwards "
                                     f"{ {u: v.get('layers') for u, v in seen.items()} }, "
                                     f"expected {dict(expected)}")
            await sleep(reactor, 0.1)

    async def md_metrics(self) -> str:
        url = f"http://127.0.0.1:{self.stack.ports.md_admin}/metrics"
        response = await treq.get(url, pool=self.stack.pool, timeout=5)
        return (await treq.content(response)).decode()

    # --- checks every receiver passes ---------------------------------------------------

    def assert_clean(self, eps: Mapping[str, RecordingEndpoint]) -> None:
        """No decrypt failure (inner tag or otherwise) and no gap in the outer sequence of
        any SSRC any receiver got (its SenderStats loss)."""
        for user, ep in eps.items():
            self.assertEqual(ep.decrypt_failures(), [], f"{user}: decrypt failures")
            self.assertEqual(ep.unattributed_decrypt_failures, 0, user)
            self.assertEqual(ep.failures, [], user)
            for ssrc, stats in ep.senders.items():
                self.assertEqual(stats.decrypt_failures, 0, f"{user} <- {ssrc:#x}")
                self.assertEqual(stats.lost, 0, f"{user} <- {ssrc:#x}: "
                                                f"{stats.as_dict()}")

    def summary(self, title: str, eps: Mapping[str, RecordingEndpoint],
                rows: Mapping[str, str]) -> None:
        lines = [f"\n--- {self.id().rsplit('.', 1)[-1]}: {title} ---"]
        for user, ep in eps.items():
            audio = sum(1 for s in ep.senders if s not in self.layer_map(eps))
            hints = ep.speaker_hints
            first = (self.user_of_audio(eps, hints[-1]["speakers"][0])
                     if hints and hints[-1]["speakers"] else "-")
            lost = sum(s.lost for s in ep.senders.values())
            lines.append(f"{user:6} {rows.get(user, '')}; audio from {audio}; lost {lost}; "
                         f"decrypt failures {len(ep.decrypt_failures())}; "
                         f"hints {len(hints)} (last first: {first})")
        print("\n".join(lines))

    @staticmethod
    def user_of_audio(eps: Mapping[str, RecordingEndpoint], ssrc: int) -> str:
        return next((user for user, ep in eps.items() if ep.ssrc == ssrc), f"{ssrc:#x}")


class LastNTests(SfuCase):
    conference = "sfu-last-n"
    forwarding_options = ("--last-n", "2")

    async def test_last_two_speakers_at_each_receivers_layer(self) -> None:
        """Video of exactly the 2 most recent speakers, at each receiver's layer; a PATCH
        moves one to "l" at a key frame; no decrypt failure, no gap, hints name the talker."""
        self.assertRegex(self.created_out, r"(?m)^forwarding: +sfu \(last-n 2, audio levels "
                                           r"on, audio top-k 0\)$")
        await self.last_two_speakers("last_n 2, talkers frank -> alice -> carol")

    async def last_two_speakers(self, title: str) -> None:
        """The body of the last-N check (one MD, or a cascade: :attr:`places`)."""
        eps = await self.join_all(self.users, bob={"receive": {"max_height": 360}})
        for user, ep in eps.items():
            uris = {ext.uri for m in ep.answer.answer.media for ext in m.extmaps()}
            self.assertIn(AUDIO_LEVEL_URI, uris, f"{user}: the answer kept the audio level")
        layers = self.layer_map(eps)
        running = self.start_media(eps)
        talkers = ("frank", "alice", "carol")
        try:
            await sleep(reactor, 0.5)
            for previous, talker in zip((None, *talkers[:-1]), talkers, strict=True):
                if previous is not None:
                    eps[previous].talking = False
                eps[talker].talking = True
                await sleep(reactor, TURN)
            # carol talks on: the two most recent speakers are carol and alice, and for
            # those two the other one and frank
            expected_sources = {user: ("carol", "frank") if user == "alice" else
                                ("alice", "frank") if user == "carol" else ("carol", "alice")
                                for user in eps}
            layer = {user: "m" if user == "bob" else "h" for user in eps}
            expected = {user: {source: layer[user] for source in sources}
                        for user, sources in expected_sources.items()}
            await self.wait_layers(eps, expected, "after three talkers")
            start = reactor.seconds()
            await sleep(reactor, WINDOW)
            end = reactor.seconds()
            got = {user: self.video_in(ep, layers, start, end) for user, ep in eps.items()}
            views = await self.md_views(eps)

            # bob: at most 180 pixels high from now on
            bob = eps["bob"]
            before = views["bob"]["layer_switches"]
            patched_at = reactor.seconds()
            view = await bob.set_receive({"max_height": 180})
            self.assertEqual(view["max_height"], 180, view)
            self.assertEqual(bob.receive, {"max_height": 180})
            await self.wait_layers(eps, {"bob": {"carol": "l", "alice": "l"}},
                                   "bob after the PATCH")
            await sleep(reactor, 1.5)  # some ten packets of l (7.5 per second)
        finally:
            await self.stop_media(eps, running)

        for user in eps:
            want = {(source, layer[user]) for source in expected_sources[user]}
            self.assertEqual(set(got[user]), want, f"{user} got video {got[user]}")
            for key, count in got[user].items():
                rate = 30 if key[1] == "h" else 15  # packets per second of the layer
                self.assertGreaterEqual(count, 0.7 * rate * WINDOW, f"{user} <- {key}")
                self.assertLessEqual(count, 1.3 * rate * WINDOW + 2, f"{user} <- {key}")
            self.assertEqual(views[user]["layers"], expected[user], user)
            self.assertEqual(views[user]["remb_bitrate"], BANDWIDTH, user)

        # bob's switch: m until the first l packet, a key frame, then l only
        after = (await self.md_views(eps))["bob"]
        switch: dict[str, tuple[int, int]] = {}  # source -> (l packets, PLIs for its l)
        switch_time = 0.0
        self.assertEqual(after["layer_switches"] - before, 2, after)
        self.assertEqual(after["max_height"], 180)
        for source in ("alice", "carol"):
            sequence = [(layers[e.ssrc][1], e.payload) for t, e in bob.events
                        if t >= patched_at and isinstance(e, MediaReceived)
                        and layers.get(e.ssrc, ("",))[0] == source]
            names = [name for name, _ in sequence]
            self.assertIn("l", names, f"bob got no l layer of {source}")
            first = names.index("l")
            self.assertLessEqual(set(names[:first]), {"m"}, source)
            self.assertNotIn("m", names[first:], f"bob got {source}'s m after its l")
            self.assertTrue(is_keyframe(sequence[first][1]),
                            f"bob's first l packet of {source} is not a key frame")
            self.assertGreater(names.count("l"), 5, source)
            l_ssrc = eps[source].video_ssrcs[LAYERS.index("l")]
            switch[source] = (names.count("l"), eps[source].keyframe_requests.get(l_ssrc, 0))
            first_at = next(t for t, e in bob.events if t >= patched_at
                            and isinstance(e, MediaReceived) and e.ssrc == l_ssrc)
            switch_time = max(switch_time, first_at - patched_at)

        # speaker hints: frank, then alice, then carol first; the last names all six
        for user, ep in eps.items():
            firsts = [self.user_of_audio(eps, h["speakers"][0]) for h in ep.speaker_hints
                      if h["speakers"]]
            self.assertTrue(firsts, f"{user} got no speaker hint")
            turns = [name for i, name in enumerate(firsts) if i == 0 or firsts[i - 1] != name]
            self.assertEqual(turns[-3:], list(talkers), f"{user}: hints {turns}")
            self.assertEqual(len(ep.speaker_hints[-1]["speakers"]), 6, user)
        self.assert_clean(eps)
        rows = {user: "video " + ", ".join(f"{s}/{lay} {n}" for (s, lay), n
                                           in sorted(got[user].items()))
                + f" in {WINDOW} s" for user in eps}
        rows["bob"] += ("; after max_height 180: "
                        + ", ".join(f"{s}/{r} {switch[s][0]} (first a key frame)"
                                    for s, r in sorted(after["layers"].items()))
                        + f", in {switch_time:.1f} s; the MD asked for "
                          f"{after['plis_requested'] - views['bob']['plis_requested']} key "
                          f"frame(s), the l senders got "
                        + ", ".join(f"{s} {switch[s][1]}" for s in sorted(switch))
                        + " PLI/FIR")
        self.summary(title, eps, rows)


class LossProxy(DatagramProtocol):
    """A UDP relay between one endpoint and the MD that drops every ``every``-th video
    datagram toward the endpoint (its first transmission; a retransmission, the same
    SSRC and SEQ again, always passes)."""

    def __init__(self, md: tuple[str, int], video_ssrcs: set[int], every: int = 10) -> None:
        self.md = md
        self.video_ssrcs = video_ssrcs
        self.every = every
        self.endpoint: tuple[str, int] | None = None
        self.seen: set[tuple[int, int]] = set()
        self.video = self.dropped = self.retransmissions = self.relayed = 0

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        addr = (addr[0], addr[1])
        if addr != self.md:
            self.endpoint = addr
            self.transport.write(datagram, self.md)
            return
        if self.endpoint is None:
            return
        if is_rtp(datagram):
            header = rtp_header(datagram)
            if header.ssrc in self.video_ssrcs:
                key = (header.ssrc, header.sequence)
                if key in self.seen:
                    self.retransmissions += 1
                else:
                    self.seen.add(key)
                    self.video += 1
                    if self.video % self.every == 0:
                        self.dropped += 1
                        return
        self.relayed += 1
        self.transport.write(datagram, self.endpoint)


class RepairTests(SfuCase):
    users = ("alice", "bob", "carol")
    conference = "sfu-repair"
    md_settings = {"last_n": 2}

    async def test_nacks_answered_by_the_md(self) -> None:
        """Every 10th video datagram to carol is lost on the way; the MD answers her NACKs
        from its history and her loss after repair is nil."""
        body = await self.stack.md_conference(self.conference)
        self.assertEqual((body["forwarding"], body["last_n"], body["audio_levels"]),
                         ("sfu", 2, True))
        media = (await self.stack.md_info())["media"]
        md_address = (media["host"], media["port"])
        proxy = LossProxy(md_address, set())
        port = reactor.listenUDP(0, proxy, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        eps = await self.join_all(self.users, carol={"via": ("127.0.0.1",
                                                             port.getHost().port)})
        carol = eps["carol"]
        self.assertEqual(tuple(carol.session.md_address), md_address)
        proxy.video_ssrcs.update(ssrc for user in ("alice", "bob")
                                 for ssrc in eps[user].video_ssrcs)
        layers = self.layer_map(eps)
        running = self.start_media(eps)
        try:
            await wait_for(lambda: proxy.dropped >= 30, "the proxy dropped 30 video datagrams")
        finally:
            await self.stop_media(eps, running)

        views = await self.md_views(eps)
        view = views["carol"]
        stats = carol.session.stats
        video = {ssrc: s for ssrc, s in carol.senders.items() if ssrc in layers}
        nacked = sum(stats[ssrc].nacked for ssrc in video)
        recovered = sum(stats[ssrc].recovered for ssrc in video)
        lost = sum(s.lost for s in video.values())
        self.assertEqual({layers[ssrc] for ssrc in video},
                         {("alice", "h"), ("bob", "h")}, "carol's video")
        self.assertGreaterEqual(proxy.dropped, 30)
        # each lost packet asked for (but one at a stream's very end: no later packet
        # shows the gap), and each came
        self.assertGreaterEqual(nacked, proxy.dropped - 2, "carol's NACKs")
        self.assertLessEqual(nacked, proxy.dropped, "carol's NACKs")
        self.assertEqual(recovered, nacked, "each came")
        self.assertEqual(lost, 0, {layers[s]: v.as_dict() for s, v in video.items()})
        self.assertGreaterEqual(view["retransmitted"], nacked, view)
        self.assertEqual(proxy.retransmissions, view["retransmitted"], view)
        self.assertLessEqual(view["nacks_forwarded"], 2, view)  # nothing fell out of history
        self.assertGreater(view["nacks_received"], 0, view)
        for user in ("alice", "bob"):  # a clean path: nothing to repair
            self.assertEqual(views[user]["retransmitted"], 0, user)
            self.assertEqual(views[user]["nacks_received"], 0, user)
        metrics = await self.md_metrics()
        match = re.search(r'^perc_md_receiver_feedback_total\{[^}]*association="'
                          + carol.joined.association + r'"[^}]*kind="retransmitted"[^}]*\} '
                          r'(\S+)$', metrics, re.M)
        self.assertIsNotNone(match, metrics[-3000:])
        assert match is not None
        self.assertEqual(float(match.group(1)), view["retransmitted"])
        self.assert_clean(eps)
        rows = {user: "video " + ", ".join(sorted(f"{layers[s][0]}/{layers[s][1]} "
                                                  f"{eps[user].senders[s].packets}"
                                                  for s in eps[user].senders if s in layers))
                for user in eps}
        rows["carol"] += (f"; proxy dropped {proxy.dropped} of {proxy.video}, passed "
                          f"{proxy.retransmissions} retransmissions; NACKed {nacked}, "
                          f"recovered {recovered}; MD: nacks {view['nacks_received']}, "
                          f"retransmitted {view['retransmitted']}, forwarded upstream "
                          f"{view['nacks_forwarded']}")
        self.summary("a lossy path to carol", eps, rows)


class JoinOrderTests(SfuCase):
    users = ("alice", "bob", "carol", "dave")
    conference = "sfu-join-order"
    forwarding_options = ("--last-n", "2", "--no-audio-levels")

    async def test_without_audio_levels_video_follows_join_order(self) -> None:
        """No audio level in the answer nor on the wire; dave talks, yet every receiver
        gets the video of the first two joiners other than itself; no speaker hint."""
        self.assertRegex(self.created_out, r"(?m)^forwarding: +sfu \(last-n 2, audio levels "
                                           r"off, audio top-k 0\)$")
        eps = await self.join_all(self.users)
        for user, ep in eps.items():
            self.assertIn(AUDIO_LEVEL_URI, ep.offer, f"{user} offered the audio level")
            uris = {ext.uri for m in ep.answer.answer.media for ext in m.extmaps()}
            self.assertNotIn(AUDIO_LEVEL_URI, uris, f"{user}: the MD's answer")
        layers = self.layer_map(eps)
        eps["dave"].talking = True
        running = self.start_media(eps)
        expected = {user: {source: "h" for source in [u for u in self.users if u != user][:2]}
                    for user in eps}
        try:
            await sleep(reactor, 1.0)
            await self.wait_layers(eps, expected, "join order")
            start = reactor.seconds()
            await sleep(reactor, WINDOW)
            end = reactor.seconds()
        finally:
            await self.stop_media(eps, running)
        got = {user: self.video_in(ep, layers, start, end) for user, ep in eps.items()}
        for user, ep in eps.items():
            self.assertEqual(set(got[user]), set(expected[user].items()),
                             f"{user} got video {got[user]}")
            self.assertEqual(ep.speaker_hints, [], f"{user} got speaker hints")
            audio = [d for d in ep.rtp_sent() if rtp_header(d).ssrc == ep.ssrc]
            self.assertGreater(len(audio), 50, user)
            self.assertEqual([d for d in audio if find_extension(d, AUDIO_LEVEL_ID)], [],
                             f"{user} sent an audio level")
            self.assertEqual(len([d for d in audio if find_extension(d, MID_ID) == b"0"]),
                             len(audio), f"{user}: every audio packet names its MID")
        self.assert_clean(eps)
        rows = {user: "video " + ", ".join(f"{s}/{lay} {n}" for (s, lay), n
                                           in sorted(got[user].items())) + f" in {WINDOW} s"
                for user in eps}
        self.summary("audio levels off, dave talking", eps, rows)


class CascadeLastNTests(CascadeChainMixin, LastNTests):
    """The same six endpoints and checks over the chain md - md2 - md3 (RFC 8871
    s4.5.1): two endpoints on each MD, the talkers on the two ends, the receiver of
    "m" (then "l") in the middle.  Each MD selects for its own endpoints; the senders
    behind a link are told by the peer MD's stream announcements, so a receiver on
    md2 gets the layer it asked for of a sender on md3, from a key frame that the
    PLI crossing the link asked for."""

    conference = "sfu-chain"
    places = {"alice": "md", "dave": "md", "bob": "md2", "erin": "md2",
              "carol": "md3", "frank": "md3"}
    timeout = 150

    async def setUp(self) -> None:
        await StackTestCase.setUp(self)
        try:
            self.created_out = await self.create_chain(self.invited,
                                                       options=("--last-n", "2"))
        except BaseException:
            self._dump_logs("setUp failed")
            await self.stack.stop_all()
            raise

    async def test_last_two_speakers_at_each_receivers_layer(self) -> None:
        """As over one MD, each receiver on whichever MD; every MD forwards per its own
        endpoints' choices, and every link carries each sender's layers once."""
        await self.last_two_speakers("last_n 2 over md - md2 - md3, talkers frank (md3) "
                                     "-> alice (md) -> carol (md3)")
        for md in self.stack.md_names:
            for link in await self.links(md):
                self.assertEqual(link["drops"].get("ssrc_from_other_leg", 0), 0, link)

