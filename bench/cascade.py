"""Benchmark: one conference on one perc-md process against the same load on two cascaded ones.

The MD is single-threaded Python: one process forwards on one core.  Two
cascaded MD processes (RFC 8871 s4.5.1: a conference over two MDs, linked
MD to MD with their own DTLS-SRTP) can use two.  One run, one
:class:`~perc_daemons.demo.stack.LocalStack` with a second perc-md process
(``extra_mds=1``: perc-kmf, perc-kd, perc-md "md" and "md2" as twistd
children on loopback), three parts:

1. **Capacity, side by side.**  Two conferences with the same endpoints and
   rates: "one MD" puts ``--senders`` S + ``--receivers`` R endpoints on md;
   "cascade" (on md and md2, one link made with ``perc-provider links
   create`` as ``tests/e2e/test_cascade.py`` does) puts half the senders and
   half the receivers on each, so each MD forwards about half the copies
   plus the hop.  Every packet goes to every other endpoint (fan-out
   S + R - 1) in both.  The per-sender rate steps up (``--start-rate``,
   times ``--step``), one config after the other at each rate so that
   background load hits both alike, until a step loses more than ``--loss``
   (a failed step is run once more before it counts); then ``--refine``
   bisection steps between the last rate passed and the first failed.  A
   step passes when the loss is at most ``--loss`` *and* the generator
   really offered at least 97 % of the rate (otherwise the generator, not
   the MDs, was the limit).
2. **Summary**: the highest forwarded packets/s each config sustained and
   their ratio (target of issue 12: >= 1.7), the MD CPU per forwarded
   packet in each, and an estimate of what the cascade would forward with a
   core per MD process.
3. **The cost of one hop** at a moderate load (``--hop-rate``, one sender):
   conference "hop" (md + md2, linked): the sender and one receiver on md,
   one receiver on md2; conference "direct" (md only): the same three
   endpoints all on md.  The windows alternate (``--hop-rounds``).  One-way
   latency p50/p99 of the receiver on md (no hop) and on md2 (one hop) of
   the same packets, and the MD CPU per sent packet of both layouts: the
   difference is what one hop adds; md2's CPU per packet it received over
   the link (counted by ``perc_md_link_datagrams_total``) is the receiving
   MD's cost of a hop (open the outer layer, re-seal for its receiver, send).

Load: every endpoint is the reference
:class:`~perc_daemons.endpoint.client.Endpoint` (OAuth log-in, signed
answer, ICE, DTLS with the KD through its MD, EKT; conferences let late
joiners have the current epoch, so joins do not rekey) and every packet is
real double SRTP (RFC 8723: inner end-to-end layer, outer hop-by-hop layer,
EKTField) carrying the send time (CLOCK_MONOTONIC).  They all live in this
one process.  In part 1 the receivers use a lighter reading than the
endpoint's own (Twisted's per-datagram path would cost the generator about
as much CPU as the MD spends forwarding): every ``--drain`` seconds each
receiver's socket is read until empty; every RTP datagram is counted, and
those whose RTP sequence number is a multiple of ``--decrypt-every`` (and
all with a FullEKTField, so keys are learnt, and all STUN/RTCP) go through
the endpoint's own receive path, both layers decrypted.  By default
(``--reader mmsg``, Linux) a socket is read with recvmmsg(2) through ctypes,
up to ``--batch`` datagrams per system call into preallocated buffers
(``bench/mmsg.py``), and a datagram is counted from its length, source
and first four bytes unpacked as ints, a bytes object being built only for
those that go to the endpoint; ``--reader old`` (and the fallback where
recvmmsg is unavailable, said in the first line of the output) reads one
datagram per recvfrom(2) as a bytes object.  Both count the same datagrams
and hand the same ones on (``tests/unit/test_bench_readers.py``); the
batches make the generator cheaper per datagram, not different.  The
summary gives the generator's CPU per datagram received: reading, the
sampled decrypts and its two senders' protect-and-send.  Two losses are
printed: ``loss`` (RTP datagrams that did not arrive: offered x fan-out
copies expected) and ``dec loss`` (the sampled sequence numbers: decrypt
successes against what the senders sent with such a number, x fan-out).
Decrypt failures are counted and printed (there should be none).  In part
3 every packet is decrypted on arrival (the endpoint's normal path).

What the 2-core machine limits: the load generator shares the two cores
with the MD processes.  The one-MD config needs one core for md plus what
the generator takes; the cascade needs two cores for md and md2 *plus* the
generator, so on two cores its measured gain is capped below 2x by the
generator's share, not by the MDs; the "core" columns (CPU seconds per
second, so 100 % is one core and the machine has 200 %) show it, including
``other``: CPU used on the machine during the window by processes that are
not part of the bench (not md, md2, the generator, nor the stack's perc-kmf and
perc-kd: other jobs; the figures are noisy when it is high).
``drops`` are datagrams the kernel dropped for a full socket buffer, at the
MDs' media ports (an MD not keeping up) or at the receivers (the generator
not keeping up), and ``queue`` what waited in those sockets at the end of
the window (kernel bytes, some 2.3 kB per datagram), from /proc/net/udp: a
step's loss is what did not arrive *within* the window, so a backlog that
grows (an MD, or the generator, held off its core) counts as loss, and the
queue columns say where it was.  The estimate "with a core
per MD" assumes CPU per forwarded packet stays as measured: forwarded/s
divided by the busiest MD's core share.  The MDs' media ports have
``[media] receive_buffer`` (4 MiB by default, capped by net.core.rmem_max;
the size each got is printed): with the kernel's default of 208 KiB (some
90 datagrams of this size) an MD held off its core for a few tens of
milliseconds, by the generator, the other MD or other jobs, drops at its
socket while its core share is well below 100 %, and the cascade, with
three busy processes on two cores, suffers most.  The ``md`` drops show
when the loss comes from there.

How to read it: compare the two configs row by row (same rate: same
offered load), then the summary's ratio; look at the core columns to see
who used the cores (a config whose MDs are not near 100 % while loss rises
was starved, e.g. by the generator or "other").  For the hop: the added
latency is the md2 row minus the md row of the same packets; the added CPU
is per packet crossing the link.  CPU time comes from /proc/<pid>/stat
(utime + stime, 10 ms ticks): use windows of seconds.  The exit status is 0
either way (a measurement, not a test).

Usage: python bench/cascade.py [--senders S] [--receivers R] [--size BYTES]
       [--seconds N] [--loss FRACTION] [--start-rate PPS] [--step FACTOR]
       [--max-rate PPS] [--refine N] [--decrypt-every N] [--drain SECONDS]
       [--reader mmsg|old] [--batch N] [--hop-rate PPS]
       [--hop-seconds N] [--hop-rounds N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import io
import math
import os
import random
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import treq
from twisted.internet import defer, task

from bench.conference import Frames, Latency, Pacer, own_cpu, percentile, process_cpu
from bench.mmsg import SLOT, Batch, Unavailable, sockaddr_key
from perc_daemons.demo.stack import KD_NAME, LocalStack, sleep
from perc_daemons.endpoint.client import Endpoint
from perc_daemons.kmf.admin_cli import run as admin_run
from perc_daemons.md.provider_cli import run as provider_run
from perc_daemons.protocol.ekt import FULL_EKT_TYPE

SEED = 8871
WARMUP_RATE = 20.0  # packets/s per sender while checking every receiver hears every sender
RECEIVE_BUFFER = 4 << 20  # net.core.rmem_max of the machine this was written on
SETTLE = 1.0
OFFERED_MIN = 0.97  # of the target rate: below, the generator was the limit
JOINS_AT_ONCE = 4
TARGET_RATIO = 1.7
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


# --- measuring ---------------------------------------------------------------------------


def machine_busy() -> float:
    """CPU seconds spent on the machine, all CPUs (not idle, not iowait)."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / _CLK_TCK


def udp_drops(ports: set[int]) -> tuple[int, int]:
    """(datagrams dropped for a full receive buffer, bytes queued now), summed over the UDP
    sockets on ``ports`` (/proc/net/udp: ``drops``, and ``rx_queue``, in kernel bytes)."""
    drops = queued = 0
    with open("/proc/net/udp", encoding="ascii") as f:
        next(f)
        for line in f:
            parts = line.split()
            if int(parts[1].rsplit(":", 1)[1], 16) in ports:
                drops += int(parts[-1])
                queued += int(parts[4].split(":")[1], 16)
    return drops, queued


def cpu(pid: int) -> float:
    user, system = process_cpu(pid)
    return user + system


def metrics(text: str, conference: str) -> dict[str, float]:
    """``conference``'s forwarding counters in one MD's /metrics text: participants'
    ``rtp_out`` ("endpoints"), ``rtp_in`` ("from_endpoints"), links' ``rtp_out`` and
    ``rtp_in`` ("link_out", "link_in")."""
    names = {("perc_md_participant_datagrams_total", "rtp_out"): "endpoints",
             ("perc_md_participant_datagrams_total", "rtp_in"): "from_endpoints",
             ("perc_md_link_datagrams_total", "rtp_out"): "link_out",
             ("perc_md_link_datagrams_total", "rtp_in"): "link_in"}
    out = dict.fromkeys(names.values(), 0.0)
    for line in text.splitlines():
        if not line.startswith("perc_md_") or "{" not in line:
            continue
        name, rest = line.split("{", 1)
        labels_text, value = rest.rsplit("} ", 1)
        labels = dict(_LABEL.findall(labels_text))
        key = names.get((name, labels.get("kind", "")))
        if key is not None and labels.get("conference") == conference:
            out[key] += float(value)
    return out


def read_recvfrom(recvfrom: Any, md: tuple[str, int], every: int,
                  receive: Callable[[bytes, Any], object]) -> int:
    """Read a socket (its ``recvfrom``) until empty, one recvfrom(2) per datagram: the RTP
    datagrams from ``md`` are counted (the number is returned); those whose sequence number
    is a multiple of ``every`` or that end with a FullEKTField (RFC 8870 s4.1), and every
    other datagram (STUN, DTLS, RTCP; not from ``md``), are handed as they came to
    ``receive(data, addr)`` (the endpoint's own receive path)."""
    rtp = 0
    while True:
        try:
            data, addr = recvfrom(65536)
        except BlockingIOError:
            break
        except OSError:  # e.g. ECONNREFUSED reported on the socket: nothing to read
            continue
        if addr != md:
            receive(data, addr)  # the endpoint counts foreign datagrams
            continue
        if len(data) > 12 and 128 <= data[0] <= 191 and not 192 <= data[1] <= 223:
            rtp += 1
            if ((data[2] << 8) | data[3]) % every and data[-1] != FULL_EKT_TYPE:
                continue
        receive(data, addr)
    return rtp


def read_mmsg(batch: Batch, fd: int, md: tuple[str, int], key: int, every: int,
              receive: Callable[[bytes, Any], object]) -> int:
    """:func:`read_recvfrom` with recvmmsg(2): up to a batch of datagrams per system call,
    classified from the ints :meth:`~bench.mmsg.Batch.unpack` gives (``key`` is
    ``sockaddr_key(*md)``): byte 0 (V=2: 128..191) is ``word >> 24``, byte 1 (RTCP PT
    192..223) ``word >> 16 & 0xFF``, the sequence number ``word & 0xFFFF``; bytes objects
    only for what goes to ``receive``.  It stops at a batch that is not full: what arrives
    after that waits for the next call."""
    data, offsets, size = batch.data, batch.offsets, batch.size
    rtp = 0
    while n := batch.recv(fd):
        sources, lengths, words = batch.unpack(n)
        # offsets has a slot for every datagram of a full batch, the others n entries
        for off, length, word, source in zip(offsets, lengths, words, sources, strict=False):
            if source != key:  # the endpoint counts foreign datagrams
                receive(bytes(data[off:off + length]), batch.source(off // SLOT))
                continue
            if (length > 12 and 0x80000000 <= word < 0xC0000000
                    and not 0xC0 <= (word >> 16) & 0xFF <= 0xDF):
                rtp += 1
                if (word & 0xFFFF) % every and data[off + length - 1] != FULL_EKT_TYPE:
                    continue
            receive(bytes(data[off:off + length]), md)
        if n < size:
            break
    return rtp


class Sink:
    """The lighter reading of one endpoint's media socket (see the module docstring):
    :func:`read_mmsg` with a :class:`~bench.mmsg.Batch` (``--reader mmsg``), else
    :func:`read_recvfrom` (``--reader old``).  Both count the same datagrams and hand the
    same ones, as bytes, to the endpoint's own receive path."""

    def __init__(self, every: int, batch: Batch | None = None) -> None:
        self.ep: Endpoint | None = None  # set once joined
        self.every = every
        self.batch = batch
        self.rtp = 0  # RTP datagrams counted
        self.decrypted = 0  # sampled sequence numbers that passed both layers
        self.attached = False

    def on_media(self, event: Any, now: float) -> None:
        if (event.sequence & 0xFFFF) % self.every == 0:
            self.decrypted += 1

    def attach(self) -> None:
        assert self.ep is not None and self.ep.session is not None
        port = self.ep._port
        port.stopReading()  # this socket is read by drain() now, not by the reactor
        md = tuple(self.ep.session.md_address)
        receive, every = self.ep._datagram, self.every
        # what is not decrypted is a gap to the session, not a loss: no NACKs for it
        self.ep.session.nack = every == 1
        if self.batch is None:
            recvfrom = port.socket.recvfrom
            self._read = lambda: read_recvfrom(recvfrom, md, every, receive)
        else:
            batch, fd, key = self.batch, port.socket.fileno(), sockaddr_key(*md)
            self._read = lambda: read_mmsg(batch, fd, md, key, every, receive)
        self.attached = True

    def detach(self) -> None:
        self.drain()
        self.ep._port.startReading()
        self.attached = False

    def drain(self) -> None:
        self.rtp += self._read()


def decrypt_failures(endpoints: list[Endpoint]) -> int:
    return (sum(s.decrypt_failures for ep in endpoints for s in ep.senders.values())
            + sum(ep.unattributed_decrypt_failures for ep in endpoints))


@dataclass
class Step:
    """One measured window of one config at one per-sender rate."""

    config: str
    rate: float
    seconds: float = 0.0
    sent: int = 0
    sample_sent: int = 0
    fanout: int = 1
    received: int = 0
    decrypted: int = 0
    endpoints: float = 0.0  # copies to endpoints, every MD (its counters)
    link: float = 0.0  # copies over the link (md -> md2 and back)
    cpu: dict[str, float] = field(default_factory=dict)  # md, md2, gen, other
    md_drops: int = 0
    rx_drops: int = 0
    md_queue: int = 0  # bytes waiting in the MDs' media sockets at the window's end
    rx_queue: int = 0  # and in the receivers' sockets
    failures: int = 0
    senders: int = 1
    loss_limit: float = 0.01
    retry: bool = False

    @property
    def offered_pps(self) -> float:
        return self.sent / self.seconds

    @property
    def forwarded_pps(self) -> float:
        return self.endpoints / self.seconds

    @property
    def loss(self) -> float:
        expected = self.sent * self.fanout
        return max(0.0, 1 - self.received / expected) if expected else 0.0

    @property
    def sample_loss(self) -> float:
        expected = self.sample_sent * self.fanout
        return max(0.0, 1 - self.decrypted / expected) if expected else 0.0

    @property
    def offered_ok(self) -> bool:
        return self.offered_pps >= OFFERED_MIN * self.rate * self.senders

    @property
    def ok(self) -> bool:
        return (self.offered_ok and self.loss <= self.loss_limit
                and self.sample_loss <= self.loss_limit and not self.failures)

    def share(self, name: str) -> float:
        return self.cpu.get(name, 0.0) / self.seconds

    @property
    def gen_us_per_received(self) -> float:
        return self.cpu.get("gen", 0.0) / self.received * 1e6 if self.received else float("nan")

    @property
    def md_us_per_forwarded(self) -> float:
        md_cpu = self.cpu.get("md", 0.0) + self.cpu.get("md2", 0.0)
        return md_cpu / self.endpoints * 1e6 if self.endpoints else float("nan")


# --- the stack, its conferences, the endpoints ------------------------------------------


class Bench:
    def __init__(self, reactor: Any, args: argparse.Namespace, directory: str,
                 batch: Batch | None) -> None:
        self.reactor = reactor
        self.args = args
        self.batch = batch  # the receivers' recvmmsg(2) buffers, None: recvfrom(2)
        total = args.senders + args.receivers
        self.users = {"one": [f"a{i:03d}" for i in range(total)],
                      "cascade": [f"b{i:03d}" for i in range(total)],
                      "direct": ["d0", "d1", "d2"], "hop": ["h0", "h1", "h2"]}
        self.stack = LocalStack(directory, reactor,
                                users=[u for users in self.users.values() for u in users],
                                static_mds=False, extra_mds=1)
        self.filler = random.Random(SEED).randbytes(args.size - 8)
        self.endpoints: dict[str, list[Endpoint]] = {}
        self.sinks: dict[str, list[Sink]] = {}
        self.pacers: dict[str, Pacer] = {}
        self.sample_sent = dict.fromkeys(self.users, 0)
        self.wire = 0
        self.pids: dict[str, int] = {}
        self.hop_latency: dict[str, list[Latency]] = {}

    async def cli(self, run: Any, *argv: str, config: str) -> str:
        out, err = io.StringIO(), io.StringIO()
        code = await run([*argv, "--config", os.path.join(self.stack.dir, "etc", config)],
                         self.reactor, stdout=out, stderr=err)
        if code:
            raise RuntimeError(f"{' '.join(argv[:3])}: exit {code}: {err.getvalue()}"
                               f"{out.getvalue()}")
        return out.getvalue()

    async def conference(self, cid: str, mds: list[str]) -> None:
        """At the KMF (invited, started) and at each MD of ``mds``; md -> md2 linked."""
        stack = self.stack
        await self.cli(admin_run, "conferences", "create", cid, "--title", cid,
                       *(a for user in self.users[cid]
                         for a in ("--invite", stack.identity(user))),
                       "--late-joiners-get-earlier-epochs", "--start",
                       *(a for md in mds for a in ("--md", stack.md_api_url(md))),
                       "--url", stack.kmf_url, config="admin.toml")
        if len(mds) < 2:
            return
        await self.cli(provider_run, "links", "create", cid, "--url", stack.md_api_url("md"),
                       "--to", stack.md_api_url("md2"), config="provider.toml")
        deadline = self.reactor.seconds() + 20
        while True:
            states = []
            for md in mds:
                _, body = await stack.request(
                    "GET", stack.md_api_url(md) + f"/v1/conferences/{cid}/links",
                    token=stack.provider_token)
                states += [link["state"] for link in body["links"]]
            if states == ["up", "up"]:
                return
            if self.reactor.seconds() > deadline:
                raise RuntimeError(f"{cid}: link not up: {states}")
            await sleep(self.reactor, 0.1)

    async def join(self, cid: str, places: list[str], senders: int,
                   on_media: list[Any]) -> list[Endpoint]:
        """Endpoints of ``cid``, the i-th through MD ``places[i]``; the first ``senders``
        send (paced by ``self.pacers[cid]``)."""
        stack = self.stack
        endpoints = [Endpoint(self.reactor, kmf_url=stack.kmf_url,
                              md_url=stack.md_api_url(md), ca=stack.ca_path, conference_id=cid,
                              user=user, password=stack.password, kd_names=[KD_NAME],
                              kind="video", roster_interval=3600.0, on_media=callback,
                              receive_buffer=RECEIVE_BUFFER, rejoin=False, label=user)
                     for user, md, callback in zip(self.users[cid], places, on_media,
                                                   strict=True)]
        self.endpoints[cid] = endpoints
        semaphore = defer.DeferredSemaphore(JOINS_AT_ONCE)
        await defer.gatherResults([semaphore.run(ep.join) for ep in endpoints],
                                  consumeErrors=True)
        pacer = self.pacers[cid] = Pacer(self.reactor, WARMUP_RATE)
        every = self.args.decrypt_every
        for ep in endpoints[:senders]:
            frames = Frames(self.filler)

            def send(ep: Endpoint = ep, frames: Frames = frames) -> None:
                datagram = ep.send_frame(frames.next())
                if datagram is not None:
                    self.wire = min(self.wire, len(datagram)) if self.wire else len(datagram)
                    if ((datagram[2] << 8) | datagram[3]) % every == 0:
                        self.sample_sent[cid] += 1

            pacer.add(send)
        # every endpoint decrypts from every sender before anything is measured
        pacer.start()
        ssrcs = {ep.ssrc for ep in endpoints[:senders]}
        deadline = self.reactor.seconds() + 10
        while not all(ssrcs - {ep.ssrc} <= {s for s, st in ep.senders.items() if st.packets}
                      for ep in endpoints):
            if self.reactor.seconds() > deadline:
                raise RuntimeError(f"{cid}: not every endpoint decrypts every sender")
            await sleep(self.reactor, 0.05)
        pacer.stop()
        return endpoints

    async def counters(self, cid: str) -> dict[str, float]:
        total: dict[str, float] = {}
        for name, port in (("md", self.stack.ports.md_admin),
                           ("md2", self.stack.md_ports["md2"].admin)):
            response = await treq.get(f"http://127.0.0.1:{port}/metrics", pool=self.stack.pool,
                                      timeout=10)
            for key, value in metrics((await treq.content(response)).decode(), cid).items():
                total[f"{name}.{key}"] = value
        return total

    def cpu_snapshot(self) -> dict[str, float]:
        snapshot = {name: cpu(pid) for name, pid in self.pids.items()}
        snapshot["gen"] = own_cpu()
        snapshot["machine"] = machine_busy()
        return snapshot

    @staticmethod
    def cpu_used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        used = {name: after[name] - before[name] for name in before}
        ours = sum(v for k, v in used.items() if k != "machine")
        used["other"] = max(0.0, used.pop("machine") - ours)
        return used

    # --- part 1: capacity ------------------------------------------------------------------

    async def step(self, cid: str, rate: float, retry: bool = False) -> Step:
        args = self.args
        endpoints, sinks, pacer = self.endpoints[cid], self.sinks[cid], self.pacers[cid]
        md_ports = {self.stack.ports.md_media, self.stack.md_ports["md2"].media}
        rx_ports = {ep._port.getHost().port for ep in endpoints}
        for sink in sinks:
            sink.attach()
        drain = task.LoopingCall(lambda: [sink.drain() for sink in sinks])
        drain.clock = self.reactor
        drain.start(args.drain, now=True)
        pacer.set_rate(rate)
        pacer.start()
        try:
            await sleep(self.reactor, SETTLE)
            c0 = await self.counters(cid)
            cpu0, t0, s0 = self.cpu_snapshot(), self.reactor.seconds(), pacer.sent
            q0, r0, d0 = self.sample_sent[cid], sum(s.rtp for s in sinks), sum(
                s.decrypted for s in sinks)
            (m0, _), (x0, _), f0 = udp_drops(md_ports), udp_drops(rx_ports), decrypt_failures(
                endpoints)
            await sleep(self.reactor, args.seconds)
            cpu1, t1, s1 = self.cpu_snapshot(), self.reactor.seconds(), pacer.sent
            q1, r1, d1 = self.sample_sent[cid], sum(s.rtp for s in sinks), sum(
                s.decrypted for s in sinks)
            (m1, mq), (x1, xq), f1 = udp_drops(md_ports), udp_drops(rx_ports), decrypt_failures(
                endpoints)
            c1 = await self.counters(cid)
        finally:
            pacer.stop()
            await sleep(self.reactor, 0.3)  # what is in flight arrives
            drain.stop()
            for sink in sinks:
                sink.detach()
        used = self.cpu_used(cpu0, cpu1)
        diff = {k: c1[k] - c0[k] for k in c0}
        return Step(config=cid, rate=rate, seconds=t1 - t0, sent=s1 - s0,
                    sample_sent=q1 - q0, fanout=len(endpoints) - 1, received=r1 - r0,
                    decrypted=d1 - d0, endpoints=diff["md.endpoints"] + diff["md2.endpoints"],
                    link=diff["md.link_out"] + diff["md2.link_out"],
                    cpu={k: used[k] for k in ("md", "md2", "gen", "other")},
                    md_drops=m1 - m0, rx_drops=x1 - x0, md_queue=mq, rx_queue=xq,
                    failures=f1 - f0,
                    senders=args.senders, loss_limit=args.loss, retry=retry)

    async def capacity(self, out: Any) -> list[Step]:
        args = self.args
        steps: list[Step] = []

        async def run(cid: str, rate: float) -> Step:
            step = await self.step(cid, rate)
            steps.append(step)
            print_step(step, out)
            if not step.ok:  # once more: one window can be unlucky on a shared machine
                step = await self.step(cid, rate, retry=True)
                steps.append(step)
                print_step(step, out)
            return step

        print_header(out)
        rate = args.start_rate
        alive = ["one", "cascade"]
        passed: dict[str, float] = {}
        failed: dict[str, float] = {}
        while alive and rate <= args.max_rate:
            for cid in list(alive):
                step = await run(cid, rate)
                if step.ok:
                    passed[cid] = rate
                else:
                    failed[cid] = rate
                    alive.remove(cid)
            rate *= args.step
        for _ in range(args.refine):
            for cid in ("one", "cascade"):
                if cid not in passed or cid not in failed:
                    continue
                mid = math.sqrt(passed[cid] * failed[cid])
                step = await run(cid, round(mid))
                if step.ok:
                    passed[cid] = mid
                else:
                    failed[cid] = mid
        return steps

    # --- part 3: one hop ---------------------------------------------------------------------

    async def hop(self) -> dict[str, Any]:
        args = self.args
        latencies = self.hop_latency
        figures: dict[str, Any] = {cid: {"sent": 0, "md": 0.0, "md2": 0.0, "gen": 0.0,
                                         "other": 0.0, "seconds": 0.0, "link_in": 0.0,
                                         "failures": 0}
                                   for cid in ("direct", "hop")}
        for _ in range(args.hop_rounds):
            for cid in ("direct", "hop"):
                pacer = self.pacers[cid]
                endpoints = self.endpoints[cid]
                pacer.set_rate(args.hop_rate)  # from now: no catching up on the pause
                pacer.start()
                await sleep(self.reactor, SETTLE)
                c0 = await self.counters(cid)
                cpu0, t0, s0 = self.cpu_snapshot(), self.reactor.seconds(), pacer.sent
                f0 = decrypt_failures(endpoints)
                for latency in latencies[cid]:
                    latency.on = True
                await sleep(self.reactor, args.hop_seconds)
                for latency in latencies[cid]:
                    latency.on = False
                cpu1, t1, s1 = self.cpu_snapshot(), self.reactor.seconds(), pacer.sent
                f1 = decrypt_failures(endpoints)
                c1 = await self.counters(cid)
                pacer.stop()
                await sleep(self.reactor, 0.2)
                used = self.cpu_used(cpu0, cpu1)
                fig = figures[cid]
                fig["sent"] += s1 - s0
                fig["seconds"] += t1 - t0
                fig["link_in"] += c1["md2.link_in"] - c0["md2.link_in"]
                fig["failures"] += f1 - f0
                for name in ("md", "md2", "gen", "other"):
                    fig[name] += used[name]
        figures["latency"] = {cid: [lat.samples for lat in pair]
                              for cid, pair in latencies.items()}
        return figures

    # --- the run -----------------------------------------------------------------------------

    async def run(self, out: Any) -> None:
        args, stack = self.args, self.stack
        half = [("md" if i % 2 == 0 else "md2") for i in range(args.senders)] + [
            ("md" if i % 2 == 0 else "md2") for i in range(args.receivers)]
        total = args.senders + args.receivers
        try:
            stack.prepare()
            await stack.start_all()
            self.pids = {name: stack.children[name].transport.pid
                         for name in ("md", "md2", "kmf", "kd")}
            buffers = [re.search(r"receive buffer (\d+) bytes", stack.children[md].text())
                       for md in ("md", "md2")]
            out.write("media port receive buffers: md "
                      + ", md2 ".join(m.group(1) if m else "?" for m in buffers) + " bytes\n")
            for cid, mds in (("one", ["md"]), ("cascade", ["md", "md2"]),
                             ("direct", ["md"]), ("hop", ["md", "md2"])):
                await self.conference(cid, mds)
            for cid, places in (("one", ["md"] * total), ("cascade", half)):
                sinks = [Sink(args.decrypt_every, self.batch) for _ in range(total)]
                endpoints = await self.join(cid, places, args.senders,
                                            [sink.on_media for sink in sinks])
                for sink, ep in zip(sinks, endpoints, strict=True):
                    sink.ep = ep
                self.sinks[cid] = sinks
            self.hop_latency = {cid: [Latency(), Latency()] for cid in ("direct", "hop")}
            # direct: the sender and both receivers on md; hop: the second receiver on md2
            for cid, places in (("direct", ["md", "md", "md"]), ("hop", ["md", "md", "md2"])):
                record = self.hop_latency[cid]
                await self.join(cid, places, 1, [lambda e, now: None,
                                                 lambda e, now, r=record[0]: r.record(e.payload),
                                                 lambda e, now, r=record[1]: r.record(e.payload)])
            out.write(f"{total * 2 + 6} endpoints joined; smallest wire datagram {self.wire} "
                      "bytes\n\n")
            out.flush()
            steps = await self.capacity(out)
            report_capacity(steps, args, out)
            out.flush()
            hop = await self.hop()
            report_hop(hop, args, out)
        finally:
            for pacer in self.pacers.values():
                pacer.stop()
            await sleep(self.reactor, 0.2)
            await defer.DeferredList([ep.leave() for eps in self.endpoints.values()
                                      for ep in eps], consumeErrors=True)
            await stack.stop_all()


# --- report --------------------------------------------------------------------------------

NAMES = {"one": "one MD", "cascade": "cascade"}


def print_header(out: Any) -> None:
    out.write(f"{'config':8s} {'rate/snd':>8s} {'offered/s':>9s} {'forwarded/s':>11s} "
              f"{'link/s':>7s} {'loss':>6s} {'dec loss':>8s} {'md':>5s} {'md2':>5s} "
              f"{'gen':>5s} {'other':>5s} {'drops md/rx':>13s} {'queue kB md/rx':>14s}\n")
    out.flush()


def print_step(step: Step, out: Any) -> None:
    verdict = "ok" if step.ok else ("gen" if not step.offered_ok else "LOSS")
    if step.failures:
        verdict = f"{step.failures} DECRYPT FAILURES"
    out.write(f"{NAMES[step.config]:8s} {step.rate:8.0f} {step.offered_pps:9.0f} "
              f"{step.forwarded_pps:11.0f} {step.link / step.seconds:7.0f} "
              f"{step.loss:6.2%} {step.sample_loss:8.2%} {step.share('md'):5.0%} "
              f"{step.share('md2'):5.0%} {step.share('gen'):5.0%} {step.share('other'):5.0%} "
              f"{step.md_drops:>6d}/{step.rx_drops:<6d} {step.md_queue // 1024:>6d}/"
              f"{step.rx_queue // 1024:<7d} {verdict}"
              f"{' (again)' if step.retry else ''}\n")
    out.flush()


def report_capacity(steps: list[Step], args: argparse.Namespace, out: Any) -> None:
    best: dict[str, Step | None] = {}
    for cid in NAMES:
        passing = [s for s in steps if s.config == cid and s.ok]
        best[cid] = max(passing, key=lambda s: s.forwarded_pps, default=None)
    out.write(f"\nhighest load sustained at <= {args.loss:.0%} loss (both measures), the "
              f"generator offering >= {OFFERED_MIN:.0%} of the rate:\n")
    for cid, name in NAMES.items():
        step = best[cid]
        if step is None:
            out.write(f"  {name:8s}: no step passed\n")
            continue
        mds = (f"md {step.share('md'):.0%}" if cid == "one"
               else f"md {step.share('md'):.0%} + md2 {step.share('md2'):.0%}")
        out.write(f"  {name:8s}: {step.forwarded_pps:7.0f} forwarded packets/s "
                  f"({step.rate:.0f} packets/s per sender; cores: {mds}, generator "
                  f"{step.share('gen'):.0%}, other {step.share('other'):.0%}); MD CPU "
                  f"{step.md_us_per_forwarded:.2f} us per forwarded packet"
                  f"{' (link hop included)' if cid == 'cascade' else ''}; generator CPU "
                  f"{step.gen_us_per_received:.2f} us per datagram received (its sends and "
                  "sampled decrypts included)\n")
    one, cascade = best["one"], best["cascade"]
    if one is None or cascade is None:
        return
    ratio = cascade.forwarded_pps / one.forwarded_pps
    out.write(f"ratio (cascade / one MD forwarded packets/s): {ratio:.2f}; target >= "
              f"{TARGET_RATIO:g}: {'PASS' if ratio >= TARGET_RATIO else 'MISS'}\n")
    # with a core per MD process: scale each config by its busiest MD's core share
    one_core = one.forwarded_pps / max(one.share("md"), 1e-9)
    two_cores = cascade.forwarded_pps / max(cascade.share("md"), cascade.share("md2"), 1e-9)
    out.write(f"estimate with a core per MD process (the generator elsewhere): one MD "
              f"{one_core:.0f}/s, cascade {two_cores:.0f}/s, ratio {two_cores / one_core:.2f} "
              "(forwarded/s over the busiest MD's core share, at those steps)\n")
    out.write(f"the generator shares the {os.cpu_count()} cores: at those steps md, md2 and "
              f"the generator used {one.share('md') + one.share('gen'):.0%} (one MD) and "
              f"{cascade.share('md') + cascade.share('md2') + cascade.share('gen'):.0%} "
              f"(cascade) of the {os.cpu_count() * 100}%\n")


def report_hop(hop: dict[str, Any], args: argparse.Namespace, out: Any) -> None:
    out.write(f"\none hop: one sender on md at {args.hop_rate:g} packets/s, {args.hop_rounds} "
              f"x {args.hop_seconds:g} s per layout, every packet decrypted on arrival\n")
    lat = hop["latency"]

    def text(samples: list[int]) -> str:
        if not samples:
            return "-"
        return (f"{percentile(samples, 0.5) / 1e3:6.0f} / {percentile(samples, 0.99) / 1e3:6.0f}"
                f"  ({len(samples)} samples)")

    out.write(f"  {'latency p50 / p99 us':>40s}\n")
    out.write(f"  {'direct: receiver 1 on md':30s} {text(lat['direct'][0])}\n")
    out.write(f"  {'direct: receiver 2 on md':30s} {text(lat['direct'][1])}\n")
    out.write(f"  {'hop: receiver on md (no hop)':30s} {text(lat['hop'][0])}\n")
    out.write(f"  {'hop: receiver on md2 (1 hop)':30s} {text(lat['hop'][1])}\n")
    near, far = lat["hop"]
    if near and far:
        out.write(f"  added by one hop (same packets): p50 "
                  f"{(percentile(far, 0.5) - percentile(near, 0.5)) / 1e3:+.0f} us, p99 "
                  f"{(percentile(far, 0.99) - percentile(near, 0.99)) / 1e3:+.0f} us\n")
    direct, linked = hop["direct"], hop["hop"]
    for fig in (direct, linked):
        fig["per_sent"] = {name: fig[name] / fig["sent"] * 1e6 if fig["sent"] else float("nan")
                           for name in ("md", "md2")}
    d, h = direct["per_sent"], linked["per_sent"]
    out.write(f"  MD CPU per sent packet: direct md {d['md']:.1f} + md2 (idle) {d['md2']:.1f} us "
              f"(1 in, 2 copies to endpoints); hop md {h['md']:.1f} + md2 {h['md2']:.1f} us "
              f"(md: 1 in, 1 copy + 1 over the link; md2: 1 from the link, 1 copy)\n")
    added = h["md"] + h["md2"] - d["md"] - d["md2"]
    per_link = linked["md2"] / linked["link_in"] * 1e6 if linked["link_in"] else float("nan")
    out.write(f"  CPU added by one hop: {added:.1f} us per packet crossing it (both MDs); "
              f"md2 {per_link:.1f} us per packet it got over the link "
              f"({linked['link_in']:.0f} packets: open, re-seal for its receiver, send)\n")
    out.write(f"  sent: direct {direct['sent'] / direct['seconds']:.0f}/s, hop "
              f"{linked['sent'] / linked['seconds']:.0f}/s\n")
    gen = (direct["gen"] + linked["gen"]) / (direct["seconds"] + linked["seconds"])
    other = (direct["other"] + linked["other"]) / (direct["seconds"] + linked["seconds"])
    out.write(f"  generator {gen:.0%} of a core, other {other:.0%}; decrypt failures "
              f"{direct['failures'] + linked['failures']}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--senders", type=int, default=2)
    parser.add_argument("--receivers", type=int, default=30)
    parser.add_argument("--size", type=int, default=1200, help="RTP payload bytes")
    parser.add_argument("--seconds", type=float, default=3.0, help="window per step")
    parser.add_argument("--loss", type=float, default=0.01, help="loss a step may have")
    parser.add_argument("--start-rate", type=float, default=400.0,
                        help="first per-sender rate (packets/s)")
    parser.add_argument("--step", type=float, default=1.25, help="rate factor per step")
    parser.add_argument("--max-rate", type=float, default=8000.0)
    parser.add_argument("--refine", type=int, default=2, help="bisection steps per config")
    parser.add_argument("--decrypt-every", type=int, default=16,
                        help="decrypt the sequence numbers that are multiples of N (1: all)")
    parser.add_argument("--drain", type=float, default=0.004,
                        help="seconds between two reads of the receivers' sockets")
    parser.add_argument("--reader", choices=("mmsg", "old"), default="mmsg",
                        help="part 1 receivers: recvmmsg(2) batches (Linux; else old) or "
                        "one recvfrom(2) per datagram")
    parser.add_argument("--batch", type=int, default=64,
                        help="datagrams per recvmmsg(2) call")
    parser.add_argument("--hop-rate", type=float, default=2000.0)
    parser.add_argument("--hop-seconds", type=float, default=5.0)
    parser.add_argument("--hop-rounds", type=int, default=2)
    parser.add_argument("--keep", metavar="DIR", help="keep the stack's directory (logs) here")
    args = parser.parse_args()
    if args.senders < 2 or args.receivers < 2:
        parser.error("need at least two senders and two receivers (half on each MD)")
    if args.size < 16 or args.step <= 1 or args.decrypt_every < 1 or args.batch < 1:
        parser.error("--size >= 16, --step > 1, --decrypt-every >= 1, --batch >= 1")
    out = sys.stdout
    batch = None
    reader = "recvfrom(2), one datagram per call (--reader old)"
    if args.reader == "mmsg":
        try:
            batch = Batch(args.batch)
            reader = f"recvmmsg(2), up to {args.batch} datagrams per call"
        except Unavailable as e:
            reader = f"recvfrom(2), one datagram per call: --reader mmsg unavailable ({e})"
    fanout = args.senders + args.receivers - 1
    out.write(f"perc-daemons cascade benchmark: {args.senders} senders x {args.receivers} "
              f"receivers (fan-out {fanout}), {args.size}-byte payload, {args.seconds:g} s per "
              f"step, loss <= {args.loss:.0%}, receivers decrypt 1 sequence number in "
              f"{args.decrypt_every}, read with {reader} (python {sys.version.split()[0]}, "
              f"{os.cpu_count()} CPUs; "
              f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())})\n"
              "one MD: every endpoint on md; cascade: half the senders and half the receivers "
              "on each of md and md2, linked.  Cores: CPU s per s (100% = one core); the "
              "generator (this process) shares the cores with the MDs\n")
    out.flush()
    directory = args.keep or tempfile.mkdtemp(prefix="perc-bench-cascade-")

    async def run(reactor: Any) -> None:
        await Bench(reactor, args, directory, batch).run(out)

    try:
        task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
