"""Benchmark: perc-md as a selective forwarding unit against forwarding everything, side by side.

One run, one :class:`~perc_daemons.demo.stack.LocalStack` (perc-kmf, perc-kd,
perc-md as twistd children on loopback), two conferences on the same MD
process with the same ``--participants`` P endpoints each (10 by default)
and the same media:

* **sfu**: ``"forwarding": "sfu"``, ``"last_n": --last-n`` (3): each receiver
  gets every other participant's audio and the video of the ``last_n`` most
  recent speakers (RFC 6464 levels through the dominant speaker detector),
  one simulcast layer each, the highest within its ``max_height``; the
  receivers of ``--limited`` (the last three by default) join with
  ``"receive": {"max_height": 360}``, so they get the m layer (RFC 8851
  ``max-height`` 360) where the others get h (720).  Switches wait for a key
  frame (frame marking, I+S), which the MD asks for with a PLI.
* **sfu-1**: ``"forwarding": "sfu"``, ``"last_n": -1``, no ``max_height``:
  every source's audio and its h layer to every receiver.  Its fan-out is
  close to all's, so against all it shows what selection costs per
  forwarded packet when both forward about as much.
* **all**: ``"forwarding": "all"``: every packet to every other participant
  (fan-out P - 1), RTCP relayed as it came.

Media, pinned, the same in both: every participant is a reference
:class:`~perc_daemons.endpoint.client.Endpoint` with ``video="simulcast"``
(OAuth log-in, signed answer, ICE, DTLS with the KD through the MD, EKT;
the conferences let late joiners have the current epoch, so joins do not
rekey) sending real double SRTP (RFC 8723) on four SSRCs: PCMU audio every
20 ms with its RFC 6464 level (a pinned 440 Hz tone while talking,
quiet-room noise otherwise, :attr:`Endpoint.talking`), and three simulcast
encodings of a 30 frame/s source (:class:`PinnedSimulcast`): h every frame
in :data:`LAYERS` ``packets`` packets, m every second frame, l every fourth,
each packet of a pinned payload size, key frames every ``--keyframe-every``
frames and on request (PLI/FIR).  ``--scale`` multiplies every packet rate
(audio and video) to load the MD more.  Who talks follows :data:`SCHEDULE`
(one or two talkers, ``--segment`` seconds per entry) on each conference's
own media clock, which runs only while its media is on: both conferences go
through the same talk pattern.

Windows: the configs take turns (``--rounds`` x sfu, sfu-1, all, a
``--seconds`` window each after ``SETTLE`` seconds of media), so that other
load on the machine hits both alike; only the config being measured sends.
Per window, from perc-md's /metrics (read just outside the CPU window):
per receiver ``rtp_out`` and ``rtp_out_bytes`` (what the MD sent each
receiver), ``rtp_in`` (what it accepted from the endpoints), layer switches,
PLIs, NACKs and retransmissions; CPU from /proc/<pid>/stat (utime + stime,
10 ms ticks: windows of several seconds): perc-md's per packet it received
and per packet it forwarded, the generator's (this process), and ``other``:
CPU used on the machine by processes that are not part of the bench (not
perc-md, perc-kmf, perc-kd nor this process: other jobs; noisy when high).
``drops`` are datagrams the kernel dropped for a full socket buffer at the
MD's media port or at the receivers (/proc/net/udp).  Before and after the
windows the MD's CPU is read over a window with no media at all (the
endpoints' RTCP and consent checks, the selections' timers): the summary
also gives the per-packet figures net of it.

The load generator shares the machine's cores with the MD and is kept
cheap: of each conference's receivers only ``--decrypting`` (by default one
that takes every layer and one limited to 360) go through the endpoint's
own receive path, every packet decrypted through both layers (their
decrypt failures and their outer sequence gaps are counted: the MD's
renumbering must leave none); the others' sockets are read every
``--drain`` seconds with recvmmsg(2) (``bench/mmsg.py``; ``--reader old``:
one recvfrom(2) per datagram) and their RTP only counted
(:func:`count_mmsg`), everything else (STUN, RTCP: speaker hints, PLIs for
their own video) handed to the endpoint.  Sampling whole receivers rather
than one packet in N (as ``bench/cascade.py`` does) keeps the endpoints'
NACK trackers (RFC 4585) honest: a receiver that saw one packet in N would
ask for the other N-1, and the MD would retransmit them.  ``loss`` is what
the MD sent the receivers and they did not get within the window; ``in
loss`` what the generator sent and the MD did not accept.

The target (issue 13): selection costs at most 15 % more MD CPU per
forwarded packet than forwarding everything (ratio sfu / all <= 1.15).
Both configs open every packet they receive (the same packets) and the sfu
forwards fewer copies, so its per-forwarded figure carries the per-received
work over fewer copies; the per-received column shows that part, and sfu-1
against all the selection's own cost at a comparable fan-out.  Bytes
saved: what a receiver is sent per second, sfu against all.  The exit
status is 0 either way (a measurement, not a test).

Usage: python bench/sfu.py [--participants P] [--last-n N] [--limited I,J,..]
       [--decrypting I,J,..] [--seconds N] [--rounds N] [--scale F]
       [--segment SECONDS] [--keyframe-every FRAMES] [--drain SECONDS]
       [--reader mmsg|old] [--batch N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import treq
from twisted.internet import defer, task

from bench.cascade import cpu, machine_busy, udp_drops
from bench.conference import Pacer, own_cpu
from bench.mmsg import SLOT, Batch, Unavailable, sockaddr_key
from perc_daemons.demo.stack import KD_NAME, LocalStack, sleep
from perc_daemons.endpoint.client import Endpoint
from perc_daemons.endpoint.media import MediaFrame, SimulcastVideo, ToneSource
from perc_daemons.protocol.dtls.crypto import format_fingerprint

SEED = 8871
RECEIVE_BUFFER = 4 << 20
SETTLE = 1.5  # seconds of media before a window opens (speaker, layers, rates settle)
JOINS_AT_ONCE = 4
TARGET_RATIO = 1.15
AUDIO_RATE = 50.0  # PCMU frames per second (20 ms)
VIDEO_RATE = 30.0  # frame indices per second (h every one, m every 2nd, l every 4th)
#: The simulcast encodings in :class:`SimulcastVideo` order (h, m, l): packets per frame
#: and payload bytes per packet (pinned; h is some 0.8 Mbit/s, m 0.13, l 0.03).
LAYERS = ({"rid": "h", "packets": 3, "size": 1100},
          {"rid": "m", "packets": 1, "size": 1100},
          {"rid": "l", "packets": 1, "size": 500})
#: Who talks, one entry per segment, cycled (participant indices): one or two at a time.
SCHEDULE: tuple[tuple[int, ...], ...] = ((0,), (0, 1), (1,), (2,), (3,), (3, 4), (4,),
                                         (5,), (0,), (2, 5))
#: The conferences, in the order their windows take turns: the user name prefix of each.
CONFIGS = {"sfu": "s", "sfu-1": "n", "all": "a"}
_LABEL = re.compile(r'(\w+)="([^"]*)"')


# --- pure helpers ----------------------------------------------------------------------------


def talkers(schedule: Sequence[Sequence[int]], segment: float, t: float) -> frozenset[int]:
    """Who talks at media time ``t`` (seconds) of a schedule of ``segment``-second entries,
    cycled."""
    if not schedule:
        return frozenset()
    return frozenset(schedule[int(t // segment) % len(schedule)])


class PinnedSimulcast(SimulcastVideo):
    """:class:`SimulcastVideo` with pinned payloads and several packets per frame.

    The same frame schedule (h every frame index, m every second, l every
    fourth; key frames on all three every ``keyframe_every`` indices and on
    :meth:`request_keyframe` for one), but each encoding's frame is
    ``layers[e]["packets"]`` packets of ``layers[e]["size"]`` bytes of one
    pinned filler (no per-byte work: the generator stays cheap), one RTP
    timestamp per frame, the marker on its last packet.
    """

    def __init__(self, *, layers: Sequence[dict[str, Any]] = LAYERS, rate: float = VIDEO_RATE,
                 keyframe_every: int = 120, seed: int = SEED) -> None:
        super().__init__(rate=rate, keyframe_every=keyframe_every,
                         size=max(16, *(layer["size"] for layer in layers)),
                         encodings=len(layers))
        self.layers = tuple(dict(layer) for layer in layers)
        filler = random.Random(seed).randbytes(self.size)
        self._payloads = [filler[:layer["size"]] for layer in self.layers]

    def _packets(self, encoding: int, keyframe: bool, timestamp: int) -> list[MediaFrame]:
        payload, packets = self._payloads[encoding], self.layers[encoding]["packets"]
        return [MediaFrame(payload, timestamp, marker=p == packets - 1, keyframe=keyframe)
                for p in range(packets)]


#: The /metrics families read per participant (name, kind label) -> our key.
_PARTICIPANT_METRICS = {
    ("perc_md_participant_datagrams_total", "rtp_in"): "rtp_in",
    ("perc_md_participant_datagrams_total", "rtp_out"): "rtp_out",
    ("perc_md_participant_datagrams_total", "rtcp_in"): "rtcp_in",
    ("perc_md_participant_datagrams_total", "rtcp_out"): "rtcp_out",
    ("perc_md_participant_bytes_total", "rtp_out_bytes"): "rtp_out_bytes",
    ("perc_md_receiver_feedback_total", "layer_switches"): "layer_switches",
    ("perc_md_receiver_feedback_total", "plis_requested"): "plis_requested",
    ("perc_md_receiver_feedback_total", "nacks_received"): "nacks_received",
    ("perc_md_receiver_feedback_total", "retransmitted"): "retransmitted",
}
PARTICIPANT_KEYS = tuple(_PARTICIPANT_METRICS.values())


def participant_metrics(text: str, conference: str) -> dict[str, dict[str, Any]]:
    """Per association of ``conference`` in one MD's /metrics text: the counters of
    :data:`PARTICIPANT_KEYS` (absent ones 0; the sfu-only ones are absent in "all") and
    ``heights``, the forwarded layer per source (``perc_md_receiver_layer_height``:
    source label -> height)."""
    out: dict[str, dict[str, Any]] = {}
    for line in text.splitlines():
        if not line.startswith("perc_md_") or "{" not in line:
            continue
        name, rest = line.split("{", 1)
        labels_text, value = rest.rsplit("} ", 1)
        labels = dict(_LABEL.findall(labels_text))
        if labels.get("conference") != conference or "association" not in labels:
            continue
        entry = out.get(labels["association"])
        if entry is None:
            entry = out[labels["association"]] = {**dict.fromkeys(PARTICIPANT_KEYS, 0.0),
                                                  "heights": {}}
        if name == "perc_md_receiver_layer_height":
            entry["heights"][labels.get("source", "")] = float(value)
            continue
        key = _PARTICIPANT_METRICS.get((name, labels.get("kind", "")))
        if key is not None:
            entry[key] += float(value)
    return out


def count_recvfrom(recvfrom: Any, md: tuple[str, int],
                   receive: Callable[[bytes, Any], object]) -> int:
    """Read a socket (its ``recvfrom``) until empty, one recvfrom(2) per datagram: RTP
    datagrams from ``md`` (RFC 3550 s5.1 header, not RTCP, RFC 5761 s4) are counted, the
    number returned; every other datagram (STUN, DTLS, RTCP, too short, from elsewhere) is
    handed as it came to ``receive(data, addr)`` (the endpoint's own receive path)."""
    rtp = 0
    while True:
        try:
            data, addr = recvfrom(65536)
        except BlockingIOError:
            break
        except OSError:  # e.g. ECONNREFUSED reported on the socket: nothing to read
            continue
        if (addr == md and len(data) > 12 and 128 <= data[0] <= 191
                and not 192 <= data[1] <= 223):
            rtp += 1
            continue
        receive(data, addr)
    return rtp


def count_mmsg(batch: Batch, fd: int, md: tuple[str, int], key: int,
               receive: Callable[[bytes, Any], object]) -> int:
    """:func:`count_recvfrom` with recvmmsg(2) (``key`` is ``sockaddr_key(*md)``): an RTP
    datagram is counted from its length, source and first word alone; bytes objects only
    for what goes to ``receive``.  Stops at a batch that is not full."""
    data, offsets, size = batch.data, batch.offsets, batch.size
    rtp = 0
    while n := batch.recv(fd):
        sources, lengths, words = batch.unpack(n)
        for off, length, word, source in zip(offsets, lengths, words, sources, strict=False):
            if (source == key and length > 12 and 0x80000000 <= word < 0xC0000000
                    and not 0xC0 <= (word >> 16) & 0xFF <= 0xDF):
                rtp += 1
                continue
            receive(bytes(data[off:off + length]),
                    md if source == key else batch.source(off // SLOT))
        if n < size:
            break
    return rtp


# --- the load ------------------------------------------------------------------------------


class Counter:
    """The counting reading of one endpoint's media socket (module docstring)."""

    def __init__(self, ep: Endpoint, batch: Batch | None) -> None:
        self.ep = ep
        self.batch = batch
        self.rtp = 0

    def attach(self) -> None:
        ep = self.ep
        assert ep.session is not None
        port = ep._port
        port.stopReading()  # this socket is read by drain() now, not by the reactor
        md = tuple(ep.session.md_address)
        receive = ep._datagram
        if self.batch is None:
            recvfrom = port.socket.recvfrom
            self._read = lambda: count_recvfrom(recvfrom, md, receive)
        else:
            batch, fd, key = self.batch, port.socket.fileno(), sockaddr_key(*md)
            self._read = lambda: count_mmsg(batch, fd, md, key, receive)

    def detach(self) -> None:
        self.drain()
        self.ep._port.startReading()

    def drain(self) -> None:
        self.rtp += self._read()


class Media:
    """One conference's pinned media: audio and simulcast video from every participant,
    paced, with :data:`SCHEDULE` deciding who talks on the conference's own media clock."""

    def __init__(self, reactor: Any, endpoints: list[Endpoint], args: argparse.Namespace
                 ) -> None:
        self.reactor = reactor
        self.endpoints = endpoints
        self.args = args
        self.clock = 0.0  # media seconds before the current run
        self.started: float | None = None
        self.sent = 0  # RTP datagrams
        self.sent_bytes = 0
        self.audio = Pacer(reactor, AUDIO_RATE * args.scale)
        self.video = Pacer(reactor, VIDEO_RATE * args.scale)
        tone = ToneSource(440)
        frames = [tone.next_frame() for _ in range(50)]
        for ep in endpoints:
            source = ep.video_source
            assert isinstance(source, PinnedSimulcast)
            state = {"n": 0, "ts": random.Random(ep.ssrc).getrandbits(32)}

            def audio(ep: Endpoint = ep, state: dict[str, int] = state) -> None:
                n = state["n"] = state["n"] + 1
                frame = frames[n % len(frames)]
                state["ts"] = (state["ts"] + 160) & 0xFFFFFFFF
                self._count(ep.send_frame(MediaFrame(frame.payload, state["ts"])))

            def video(ep: Endpoint = ep, source: PinnedSimulcast = source) -> None:
                ssrcs = ep.video_ssrcs
                for encoding, frame in source.next_frames():
                    self._count(ep.send_frame(frame, ssrc=ssrcs[encoding]))

            self.audio.add(audio)
            self.video.add(video)
        self._talk = task.LoopingCall(self._update_talkers)
        self._talk.clock = reactor

    def _count(self, datagram: bytes | None) -> None:
        if datagram is not None:
            self.sent += 1
            self.sent_bytes += len(datagram)

    def media_time(self) -> float:
        started = self.started
        return self.clock + (self.reactor.seconds() - started if started is not None else 0.0)

    def _update_talkers(self) -> None:
        now = talkers(SCHEDULE, self.args.segment, self.media_time())
        for i, ep in enumerate(self.endpoints):
            ep.talking = i in now

    def start(self) -> None:
        self.started = self.reactor.seconds()
        self._update_talkers()
        for pacer in (self.audio, self.video):
            pacer.set_rate(pacer.rate)  # from now: no catching up on the pause
            pacer.start()
        self._talk.start(0.05, now=True)

    def stop(self) -> None:
        for pacer in (self.audio, self.video):
            pacer.stop()
        if self._talk.running:
            self._talk.stop()
        if self.started is not None:
            self.clock = self.media_time()
            self.started = None


@dataclass
class Window:
    """One measured window of one config."""

    config: str
    seconds: float = 0.0
    sent: int = 0
    sent_bytes: int = 0
    receivers: int = 0
    md: dict[str, float] = field(default_factory=dict)  # summed participant counters
    limited: dict[str, float] = field(default_factory=dict)  # ... of the limited receivers
    #: over the whole run of the media (settling, window, what was in flight after):
    run_sent: float = 0.0  # RTP datagrams the MD sent the receivers
    run_received: int = 0  # ... and the receivers got (counted, decrypted or failed)
    run_offered: int = 0  # RTP datagrams the generator sent
    run_in: float = 0.0  # ... and the MD accepted
    decrypted: int = 0  # of which passed both layers (decrypting receivers)
    decrypt_failures: int = 0
    gaps: int = 0  # outer sequence gaps seen by the decrypting receivers
    cpu: dict[str, float] = field(default_factory=dict)  # md, gen, other
    md_drops: int = 0
    rx_drops: int = 0

    def per_receiver(self, key: str) -> float:
        return self.md.get(key, 0.0) / self.receivers / self.seconds

    def share(self, name: str) -> float:
        return self.cpu.get(name, 0.0) / self.seconds


def merge(windows: list[Window]) -> Window:
    """The windows of one config summed (per-second figures then average over them all)."""
    total = Window(windows[0].config, receivers=windows[0].receivers)
    for w in windows:
        total.seconds += w.seconds
        total.sent += w.sent
        total.sent_bytes += w.sent_bytes
        total.run_sent += w.run_sent
        total.run_in += w.run_in
        for name in ("run_received", "run_offered", "decrypted", "decrypt_failures", "gaps",
                     "md_drops", "rx_drops"):
            setattr(total, name, getattr(total, name) + getattr(w, name))
        for target, source in ((total.md, w.md), (total.limited, w.limited),
                               (total.cpu, w.cpu)):
            for k, v in source.items():
                target[k] = target.get(k, 0.0) + v
    return total


# --- the stack, the conferences, the run ----------------------------------------------------


class Bench:
    def __init__(self, reactor: Any, args: argparse.Namespace, directory: str,
                 batch: Batch | None) -> None:
        self.reactor = reactor
        self.args = args
        self.batch = batch
        self.users = {cid: [f"{prefix}{i:02d}" for i in range(args.participants)]
                      for cid, prefix in CONFIGS.items()}
        self.stack = LocalStack(directory, reactor,
                                users=[u for users in self.users.values() for u in users])
        self.endpoints: dict[str, list[Endpoint]] = {}
        self.counters: dict[str, list[Counter]] = {}
        self.media: dict[str, Media] = {}
        self.pids: dict[str, int] = {}

    async def conference(self, cid: str) -> None:
        """At the KMF (invited, started, late joiners get the current epoch), then at the MD
        with its forwarding settings, as ``LocalStack.create_conference`` does."""
        stack = self.stack
        token = await stack.admin_token()
        users = self.users[cid]
        await stack._expect(201, "POST", stack.kmf_url + "/v1/conferences", token=token, body={
            "id": cid, "title": f"bench {cid}", "initiator": stack.identity(users[0]),
            "invited": [stack.identity(u) for u in users],
            "late_joiners_get_earlier_epochs": True})
        await stack._expect(200, "POST", stack.kmf_url + f"/v1/conferences/{cid}/start",
                            token=token)
        settings: dict[str, Any] = {
            "sfu": {"forwarding": "sfu", "last_n": self.args.last_n},
            "sfu-1": {"forwarding": "sfu", "last_n": -1},
            "all": {"forwarding": "all"}}[cid]
        body = await stack._expect(201, "POST", stack.md_url + "/v1/conferences",
                                   token=stack.provider_token,
                                   body={"id": cid, **settings, "kd_fingerprint":
                                         format_fingerprint(stack.kd_fingerprint)})
        for key, value in settings.items():
            if body.get(key) != value:
                raise RuntimeError(f"{cid}: the MD says {key} {body.get(key)!r}, not {value!r}")
        await stack.wait_for_kd(cid)

    async def join(self, cid: str) -> list[Endpoint]:
        stack, args = self.stack, self.args
        endpoints = []
        for i, user in enumerate(self.users[cid]):
            receive = ({"max_height": 360} if cid == "sfu" and i in args.limited else None)
            endpoints.append(Endpoint(
                self.reactor, kmf_url=stack.kmf_url, md_url=stack.md_url, ca=stack.ca_path,
                conference_id=cid, user=user, password=stack.password, kd_names=[KD_NAME],
                kind="audio", video="simulcast",
                video_source=PinnedSimulcast(keyframe_every=args.keyframe_every),
                roster_interval=3600.0, receive_buffer=RECEIVE_BUFFER, rejoin=False,
                label=user, receive=receive))
        self.endpoints[cid] = endpoints
        semaphore = defer.DeferredSemaphore(JOINS_AT_ONCE)
        await defer.gatherResults([semaphore.run(ep.join) for ep in endpoints],
                                  consumeErrors=True)
        media = self.media[cid] = Media(self.reactor, endpoints, args)
        # every endpoint decrypts every other's audio before anything is measured
        media.start()
        audio = {ep.ssrc for ep in endpoints}
        deadline = self.reactor.seconds() + 15
        while not all(audio - {ep.ssrc} <= {s for s, st in ep.senders.items() if st.packets}
                      for ep in endpoints):
            if self.reactor.seconds() > deadline:
                raise RuntimeError(f"{cid}: not every endpoint decrypts every sender's audio")
            await sleep(self.reactor, 0.1)
        media.stop()
        self.counters[cid] = [Counter(ep, self.batch) for i, ep in enumerate(endpoints)
                              if i not in args.decrypting]
        return endpoints

    async def scrape(self, cid: str) -> dict[str, dict[str, Any]]:
        response = await treq.get(f"http://127.0.0.1:{self.stack.ports.md_admin}/metrics",
                                  pool=self.stack.pool, timeout=10)
        return participant_metrics((await treq.content(response)).decode(), cid)

    def cpu_snapshot(self) -> dict[str, float]:
        snapshot = {name: cpu(pid) for name, pid in self.pids.items()}
        snapshot["gen"] = own_cpu()
        snapshot["machine"] = machine_busy()
        return snapshot

    def received(self, cid: str) -> int:
        """RTP datagrams the receivers of ``cid`` got: counted, decrypted or failed."""
        decrypted, failures, _ = self.decrypting_state(cid)
        return sum(c.rtp for c in self.counters[cid]) + decrypted + failures

    def decrypting_state(self, cid: str) -> tuple[int, int, int]:
        """(decrypted, decrypt failures, outer sequence gaps) of the decrypting receivers."""
        eps = [ep for i, ep in enumerate(self.endpoints[cid]) if i in self.args.decrypting]
        decrypted = sum(s.packets for ep in eps for s in ep.senders.values())
        failures = (sum(s.decrypt_failures for ep in eps for s in ep.senders.values())
                    + sum(ep.unattributed_decrypt_failures for ep in eps))
        gaps = sum(max(0, s.lost) for ep in eps for s in ep.senders.values())
        return decrypted, failures, gaps

    async def window(self, cid: str) -> Window:
        args = self.args
        media, counters, endpoints = self.media[cid], self.counters[cid], self.endpoints[cid]
        md_ports = {self.stack.ports.md_media}
        rx_ports = {ep._port.getHost().port for ep in endpoints}
        # loss over the whole run of the media (what the MD sent that never arrived),
        # from counters read while nothing is in flight
        p0, q0, o0 = await self.scrape(cid), self.received(cid), media.sent
        for counter in counters:
            counter.attach()
        drain = task.LoopingCall(lambda: [c.drain() for c in counters])
        drain.clock = self.reactor
        drain.start(args.drain, now=True)
        media.start()
        try:
            await sleep(self.reactor, SETTLE)
            m0 = await self.scrape(cid)
            cpu0, t0, s0, b0 = self.cpu_snapshot(), self.reactor.seconds(), media.sent, \
                media.sent_bytes
            d0, f0, g0 = self.decrypting_state(cid)
            (x0, _), (y0, _) = udp_drops(md_ports), udp_drops(rx_ports)
            await sleep(self.reactor, args.seconds)
            cpu1, t1, s1, b1 = self.cpu_snapshot(), self.reactor.seconds(), media.sent, \
                media.sent_bytes
            d1, f1, g1 = self.decrypting_state(cid)
            (x1, _), (y1, _) = udp_drops(md_ports), udp_drops(rx_ports)
            m1 = await self.scrape(cid)
        finally:
            media.stop()
            await sleep(self.reactor, 0.3)  # what is in flight arrives
            drain.stop()
            for counter in counters:
                counter.detach()
        p1, q1, o1 = await self.scrape(cid), self.received(cid), media.sent
        used = {name: cpu1[name] - cpu0[name] for name in cpu0}
        ours = sum(v for k, v in used.items() if k != "machine")
        used["other"] = max(0.0, used.pop("machine") - ours)
        associations = {ep.joined.association: i for i, ep in enumerate(endpoints)
                        if ep.joined is not None}

        def deltas(m0: dict[str, dict[str, Any]], m1: dict[str, dict[str, Any]],
                   only: frozenset[int] | None = None) -> dict[str, float]:
            total = dict.fromkeys(PARTICIPANT_KEYS, 0.0)
            for association, after in m1.items():
                i = associations.get(association)
                if i is None or (only is not None and i not in only):
                    continue
                before = m0.get(association, {})
                for key in PARTICIPANT_KEYS:
                    total[key] += after[key] - before.get(key, 0.0)
            return total

        run = deltas(p0, p1)
        return Window(cid, seconds=t1 - t0, sent=s1 - s0, sent_bytes=b1 - b0,
                      receivers=len(endpoints), md=deltas(m0, m1),
                      limited=deltas(m0, m1, args.limited),
                      run_sent=run["rtp_out"], run_received=q1 - q0,
                      run_offered=o1 - o0, run_in=run["rtp_in"],
                      decrypted=d1 - d0,
                      decrypt_failures=f1 - f0, gaps=g1 - g0,
                      cpu={k: used[k] for k in ("md", "gen", "other")},
                      md_drops=x1 - x0, rx_drops=y1 - y0)

    async def idle(self) -> float:
        """The MD's CPU s per s over a window with no media in any conference."""
        await sleep(self.reactor, 0.5)
        c0, t0 = cpu(self.pids["md"]), self.reactor.seconds()
        await sleep(self.reactor, self.args.seconds)
        return (cpu(self.pids["md"]) - c0) / (self.reactor.seconds() - t0)

    async def layers(self, cid: str) -> dict[float, int]:
        """How many (receiver, source) pairs get which layer height now (sfu)."""
        heights: dict[float, int] = {}
        for entry in (await self.scrape(cid)).values():
            for height in entry["heights"].values():
                heights[height] = heights.get(height, 0) + 1
        return heights

    async def run(self, out: Any) -> None:
        args, stack = self.args, self.stack
        try:
            stack.prepare()
            await stack.start_all()
            self.pids = {name: stack.children[name].transport.pid
                         for name in ("md", "kmf", "kd")}
            buffer = re.search(r"receive buffer (\d+) bytes", stack.children["md"].text())
            out.write(f"media port receive buffer: {buffer.group(1) if buffer else '?'} "
                      "bytes\n")
            for cid in CONFIGS:
                await self.conference(cid)
                await self.join(cid)
            out.write(f"{len(CONFIGS) * args.participants} endpoints joined; each sends "
                      f"{AUDIO_RATE * args.scale:g} audio + "
                      f"{video_pps(args.scale):g} video packets/s\n")
            idle = [await self.idle()]
            out.write(f"MD with no media: {idle[0]:.1%} of a core\n\n")
            out.flush()
            print_header(out)
            windows: dict[str, list[Window]] = {cid: [] for cid in CONFIGS}
            heights: dict[float, int] = {}
            for r in range(args.rounds):
                for cid in CONFIGS:
                    w = await self.window(cid)
                    windows[cid].append(w)
                    print_window(w, r + 1, out)
                    if cid == "sfu" and r == args.rounds - 1:
                        heights = await self.layers("sfu")
            idle.append(await self.idle())
            out.write(f"MD with no media, after the windows: {idle[1]:.1%} of a core\n")
            report(windows, heights, sum(idle) / len(idle), args, out)
        finally:
            for media in self.media.values():
                media.stop()
            await sleep(self.reactor, 0.2)
            await defer.DeferredList([ep.leave() for eps in self.endpoints.values()
                                      for ep in eps], consumeErrors=True)
            await stack.stop_all()


def video_pps(scale: float) -> float:
    """Video packets per second of one participant (every encoding of :data:`LAYERS`)."""
    return sum(VIDEO_RATE * scale / d * layer["packets"]
               for d, layer in zip(SimulcastVideo.DIVISORS, LAYERS, strict=True))


# --- report --------------------------------------------------------------------------------


def _us(cpu_seconds: float, count: float) -> float:
    return cpu_seconds / count * 1e6 if count else math.nan


def _loss(expected: float, got: float) -> float:
    return max(0.0, 1 - got / expected) if expected else 0.0


def print_header(out: Any) -> None:
    out.write(f"{'config':6s} {'rnd':>3s} {'sent/s':>7s} {'in/s':>7s} {'fwd/s':>7s} "
              f"{'pkt/s/rcv':>9s} {'kbit/s/rcv':>10s} {'us/in':>6s} {'us/fwd':>6s} "
              f"{'md':>5s} {'gen':>5s} {'other':>5s} {'in loss':>7s} {'loss':>6s} "
              f"{'drops md/rx':>11s} {'dec':>6s} {'fail':>4s} {'gaps':>4s} {'switch':>6s} "
              f"{'pli':>4s} {'nack':>4s}\n")
    out.flush()


def print_window(w: Window, rnd: int | str, out: Any) -> None:
    md, secs = w.md, w.seconds
    cpu_md = w.cpu.get("md", 0.0)
    out.write(f"{w.config:6s} {rnd!s:>3s} {w.sent / secs:7.0f} {md['rtp_in'] / secs:7.0f} "
              f"{md['rtp_out'] / secs:7.0f} {w.per_receiver('rtp_out'):9.1f} "
              f"{w.per_receiver('rtp_out_bytes') * 8 / 1e3:10.1f} "
              f"{_us(cpu_md, md['rtp_in']):6.1f} {_us(cpu_md, md['rtp_out']):6.2f} "
              f"{w.share('md'):5.0%} {w.share('gen'):5.0%} {w.share('other'):5.0%} "
              f"{_loss(w.run_offered, w.run_in):7.2%} {_loss(w.run_sent, w.run_received):6.2%} "
              f"{w.md_drops:>5d}/{w.rx_drops:<5d} {w.decrypted:6d} {w.decrypt_failures:4d} "
              f"{w.gaps:4d} {md['layer_switches']:6.0f} {md['plis_requested']:4.0f} "
              f"{md['nacks_received']:4.0f}\n")
    out.flush()


def report(windows: dict[str, list[Window]], heights: dict[float, int], idle: float,
           args: argparse.Namespace, out: Any) -> None:
    """The summary: the issue's ratio, the selection's cost at a comparable fan-out, the
    bytes saved, loss and who used the cores.  ``idle`` is the MD's CPU s per s with no
    media at all (the endpoints' RTCP and consent checks, the selections' timers)."""
    totals = {cid: merge(ws) for cid, ws in windows.items() if ws}
    if set(totals) != set(CONFIGS):
        return
    out.write(f"\nall {args.rounds} windows of each config together:\n")
    for cid in CONFIGS:
        print_window(totals[cid], "sum", out)
    sfu, every = totals["sfu"], totals["all"]

    def per(w: Window, key: str, net: bool = False) -> float:
        used = w.cpu.get("md", 0.0) - (idle * w.seconds if net else 0.0)
        return _us(used, w.md[key])

    def copies(w: Window) -> float:
        return w.md["rtp_out"] / max(w.md["rtp_in"], 1.0)

    ratio = per(sfu, "rtp_out") / per(every, "rtp_out")
    out.write(f"\nMD CPU per forwarded packet: sfu {per(sfu, 'rtp_out'):.2f} us, all "
              f"{per(every, 'rtp_out'):.2f} us; ratio sfu/all {ratio:.2f}; target <= "
              f"{TARGET_RATIO:.2f}: {'PASS' if ratio <= TARGET_RATIO else 'MISS'}\n")
    out.write(f"  per received packet: sfu {per(sfu, 'rtp_in'):.1f} us, all "
              f"{per(every, 'rtp_in'):.1f} us: the same packets in, but sfu forwards "
              f"{copies(sfu):.2f} copies of each and all {copies(every):.2f}, so what every "
              "received packet costs (epoll, recvfrom, Twisted, the outer layer opened) is "
              "spread over fewer copies in sfu\n")
    if "sfu-1" in totals:
        one = totals["sfu-1"]
        r1 = per(one, "rtp_out") / per(every, "rtp_out")
        out.write(f"  selection at a comparable fan-out: sfu-1 (last_n -1, no max_height: one "
                  f"layer of every source, {copies(one):.2f} copies) {per(one, 'rtp_out'):.2f} "
                  f"us per forwarded packet, ratio sfu-1/all {r1:.2f} (target <= "
                  f"{TARGET_RATIO:.2f}, like for like: "
                  f"{'PASS' if r1 <= TARGET_RATIO else 'MISS'}); per received packet "
                  f"{per(one, 'rtp_in'):.1f} us against {per(every, 'rtp_in'):.1f}\n")
        # CPU = a * received + b * forwarded, fitted over the three configs' totals: what
        # a received packet costs whatever its fan-out, and what one more copy costs
        rows = [(totals[c].md["rtp_in"], totals[c].md["rtp_out"], totals[c].cpu.get("md", 0.0))
                for c in CONFIGS]
        sxx = sum(x * x for x, _, _ in rows)
        sxy = sum(x * y for x, y, _ in rows)
        syy = sum(y * y for _, y, _ in rows)
        sxc = sum(x * c for x, _, c in rows)
        syc = sum(y * c for _, y, c in rows)
        det = sxx * syy - sxy * sxy
        if det:
            a = (sxc * syy - syc * sxy) / det
            b = (syc * sxx - sxc * sxy) / det
            out.write(f"  fitted over the three configs: {a * 1e6:.1f} us per received packet "
                      f"(reactor wake-up, recvfrom, outer layer opened, selection) + "
                      f"{b * 1e6:.2f} us per copy forwarded (sealed and sent)\n")
    out.write(f"  net of the MD's idle CPU ({idle:.1%} of a core with no media: RTCP, "
              f"consent, timers): per forwarded packet sfu {per(sfu, 'rtp_out', True):.2f}, "
              + (f"sfu-1 {per(totals['sfu-1'], 'rtp_out', True):.2f}, " if "sfu-1" in totals
                 else "")
              + f"all {per(every, 'rtp_out', True):.2f} us; ratio sfu/all "
              f"{per(sfu, 'rtp_out', True) / per(every, 'rtp_out', True):.2f}\n")
    out.write("MD core for the same offered load: "
              + ", ".join(f"{cid} {totals[cid].share('md'):.0%}" for cid in CONFIGS)
              + f" ({every.md['rtp_in'] / every.seconds:.0f} packets/s in)\n")
    kbit = {cid: totals[cid].per_receiver("rtp_out_bytes") * 8 / 1e3 for cid in CONFIGS}
    out.write(f"bytes per receiver: sfu {kbit['sfu']:.0f} kbit/s, all {kbit['all']:.0f} kbit/s: "
              f"{1 - kbit['sfu'] / kbit['all']:.0%} saved ({kbit['all'] - kbit['sfu']:.0f} "
              "kbit/s per receiver)")
    nlim = len([i for i in args.limited if i < args.participants])
    if nlim and nlim < args.participants:
        lim = sfu.limited.get("rtp_out_bytes", 0.0) / nlim / sfu.seconds * 8 / 1e3
        rest = ((sfu.md["rtp_out_bytes"] - sfu.limited.get("rtp_out_bytes", 0.0))
                / (args.participants - nlim) / sfu.seconds * 8 / 1e3)
        out.write(f"; in sfu the receivers with max_height 360 get {lim:.0f} kbit/s, the "
                  f"others {rest:.0f} kbit/s")
    if "sfu-1" in kbit:
        out.write(f"; sfu-1 {kbit['sfu-1']:.0f} kbit/s")
    out.write("\n")
    if heights:
        out.write("sfu layers forwarded at the end (receiver x source pairs by height): "
                  + ", ".join(f"{h:.0f}: {n}" for h, n in sorted(heights.items(), reverse=True))
                  + "\n")
    out.write("loss (of what the MD sent the receivers): "
              + ", ".join(f"{cid} {_loss(w.run_sent, w.run_received):.2%}"
                          for cid, w in totals.items())
              + "; in loss (sent, not accepted by the MD): "
              + ", ".join(f"{cid} {_loss(w.run_offered, w.run_in):.2%}"
                          for cid, w in totals.items())
              + "; decrypt failures: "
              + ", ".join(f"{cid} {w.decrypt_failures}" for cid, w in totals.items())
              + "; outer sequence gaps (decrypting receivers): "
              + ", ".join(f"{cid} {w.gaps}" for cid, w in totals.items())
              + f"; NACKs at the MD: {sum(w.md['nacks_received'] for w in totals.values()):.0f}"
              f", retransmitted {sum(w.md['retransmitted'] for w in totals.values()):.0f}\n")
    seconds = sum(w.seconds for w in totals.values())
    gen = sum(w.cpu.get("gen", 0.0) for w in totals.values()) / seconds
    other = sum(w.cpu.get("other", 0.0) for w in totals.values()) / seconds
    out.write(f"the generator (this process) used {gen:.0%} of a core and other jobs "
              f"{other:.0%} of the {os.cpu_count() * 100}% during the windows: it shares the "
              f"cores with the MD (receivers {sorted(args.decrypting)} decrypt everything, "
              "the others only count)\n")


def _indices(text: str) -> frozenset[int]:
    return frozenset(int(v) for v in text.split(",") if v.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--participants", type=int, default=10)
    parser.add_argument("--last-n", type=int, default=3, help="the sfu conference's last_n")
    parser.add_argument("--limited", type=_indices, default=frozenset({7, 8, 9}),
                        help="participants that join the sfu with max_height 360")
    parser.add_argument("--decrypting", type=_indices, default=frozenset({6, 9}),
                        help="participants whose every packet is decrypted (the others count)")
    parser.add_argument("--seconds", type=float, default=5.0, help="window per config and round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiplies every packet rate (audio 50/s, video 30 frames/s)")
    parser.add_argument("--segment", type=float, default=2.0,
                        help="seconds per entry of the talk schedule")
    parser.add_argument("--keyframe-every", type=int, default=120,
                        help="periodic key frame every N frame indices (multiple of 4)")
    parser.add_argument("--drain", type=float, default=0.004,
                        help="seconds between two reads of the counting receivers' sockets")
    parser.add_argument("--reader", choices=("mmsg", "old"), default="mmsg")
    parser.add_argument("--batch", type=int, default=64, help="datagrams per recvmmsg(2)")
    parser.add_argument("--keep", metavar="DIR", help="keep the stack's directory (logs) here")
    args = parser.parse_args()
    if args.participants < 3 or args.last_n < -1 or args.rounds < 1 or args.scale <= 0:
        parser.error("--participants >= 3, --last-n >= -1, --rounds >= 1, --scale > 0")
    if args.keyframe_every < 4 or args.keyframe_every % 4:
        parser.error("--keyframe-every must be a positive multiple of 4")
    out = sys.stdout
    batch = None
    reader = "recvfrom(2), one datagram per call (--reader old)"
    if args.reader == "mmsg":
        try:
            batch = Batch(args.batch)
            reader = f"recvmmsg(2), up to {args.batch} datagrams per call"
        except Unavailable as e:
            reader = f"recvfrom(2), one datagram per call: --reader mmsg unavailable ({e})"
    layers = ", ".join(f"{layer['rid']} {VIDEO_RATE * args.scale / d:g} frames/s x "
                       f"{layer['packets']} x {layer['size']} B"
                       for d, layer in zip(SimulcastVideo.DIVISORS, LAYERS, strict=True))
    out.write(f"perc-daemons SFU benchmark: {args.participants} participants per conference, "
              f"each sending audio ({AUDIO_RATE * args.scale:g} packets/s, 160 B PCMU with "
              f"its level) and simulcast video ({layers}); sfu: last_n {args.last_n}, "
              f"receivers {sorted(args.limited)} max_height 360; all: every packet to "
              f"everyone; {args.rounds} x {args.seconds:g} s windows per config, alternated "
              f"(python {sys.version.split()[0]}, {os.cpu_count()} CPUs; load average "
              f"{' '.join(f'{v:.2f}' for v in os.getloadavg())})\n"
              f"the load generator (this process) shares the cores with the MD: receivers "
              f"{sorted(args.decrypting)} decrypt every packet, the others count their RTP "
              f"read with {reader}, no decryption.  Columns per window: per second; "
              "pkt/s/rcv and kbit/s/rcv: what the MD sent each receiver; us/in, us/fwd: MD "
              "CPU per packet received, forwarded; md, gen, other: CPU s per s (100% = one "
              "core); loss: sent by the MD, not received; dec/fail/gaps: decrypting "
              "receivers; switch/pli/nack: the MD's selection counters\n")
    out.flush()
    directory = args.keep or tempfile.mkdtemp(prefix="perc-bench-sfu-")

    async def run(reactor: Any) -> None:
        await Bench(reactor, args, directory, batch).run(out)

    try:
        task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
