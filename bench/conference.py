"""Benchmark: a real perc-md process forwarding one conference, next to a plain UDP relay.

One run, two parts, the same load:

* perc-md: a :class:`~perc_daemons.demo.stack.LocalStack` (perc-kmf, perc-md,
  perc-kd as twistd children on loopback, dev PKI), one conference with
  S + R invited users, S senders and R receivers joined one after the other
  with the reference :class:`~perc_daemons.endpoint.client.Endpoint` (OAuth,
  signed answer, ICE, DTLS with the KD through the MD, EKT) while the
  senders already send 50 packets/s.  Then every sender sends ``--rate``
  video-like packets/s (``--size`` bytes of payload, double-protected,
  RFC 8723) and the window of ``--seconds`` is measured.  As in the MD,
  each packet goes to every other leg: fan-out S + R - 1.
* baseline: ``bench/udp_relay.py`` (plain Twisted UDP, no crypto, the same
  fan-out) as a separate process, S + R plain UDP sockets, the same offered
  packets/s of datagrams as large as the MD run's wire datagrams.

Measured over the window, for each: offered (sent) packets/s, forwarded
packets/s (perc-md: ``perc_md_participant_datagrams_total{kind="rtp_out"}``
from its /metrics; the relay: its own counter), the relay process's CPU
(utime + stime from /proc/<pid>/stat) per forwarded packet and as a share of
one core, loss (copies expected at the receivers, offered x fan-out, that
did not arrive), and the latency from the sender's clock read just before it
protects a packet to the receiver's, just after it decrypted it
(CLOCK_MONOTONIC, in the payload), p50/p99 over a sample.  Join time is
offer POST -> first decrypted packet (``Endpoint.stats()["join_time"]``) of
each endpoint that joined while another sender was already sending; the
endpoints join one at a time.  By default a join starts a new epoch
(the KMF's late_joiners_get_earlier_epochs false): the joiner's first key
is the next epoch's, and senders keep protecting with their old key for
250 ms after announcing the new one (RFC 8870 s4.3.1), so a join cannot
take less than that; ``--no-rekey-on-join`` measures the other policy.

Load: all endpoints live in this one process (the machine this was written
on has two cores: one for the relay under test, one for the load; more load
processes would only compete with the relay).  Receivers use the
endpoint's lighter receive mode (``decrypt_every``): every datagram is
counted from its outer header, one in ``--decrypt-every`` (and every one
with a FullEKTField) is decrypted through both layers; latency comes from
those.  The load process's own CPU share is printed: near 100 % the
generator, not the relay, is the limit, and the "one core would forward"
figure (1 / CPU per forwarded packet) is the relay's capacity estimate.

Targets (issue text): >= 50 000 forwarded packets/s on one core, <= 2x the
baseline's CPU per forwarded packet, join <= 100 ms (judged on the median;
the max is printed).  Every target is printed PASS or MISS; the exit status
is 0 either way (a measurement, not a test).  CPU time is read in clock
ticks (10 ms): use windows of seconds.

Usage: python bench/conference.py [--senders S] [--receivers R] [--rate PPS]
       [--seconds N] [--size BYTES] [--decrypt-every N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import treq
from twisted.internet import defer, task
from twisted.internet.protocol import DatagramProtocol, ProcessProtocol

from perc_daemons.demo.stack import KD_NAME, LocalStack, free_port, sleep
from perc_daemons.endpoint.client import Endpoint
from perc_daemons.endpoint.media import MediaFrame

SEED = 8871
CONFERENCE = "bench"
WARMUP_RATE = 50.0  # packets/s per sender while endpoints join (video-like)
SETTLE = 1.0  # seconds at the target rate before the window opens
TICK = 0.002  # pacing interval
RECEIVE_BUFFER = 2 << 20
TARGET_FORWARDED = 50_000
TARGET_RATIO = 2.0
TARGET_JOIN = 0.100
_STAMP = struct.Struct("!Q")
_CLK_TCK = os.sysconf("SC_CLK_TCK")



def _heard(ep: Endpoint) -> set[int]:
    """SSRCs ``ep`` decrypted a packet from (a failed decrypt also makes a stats entry)."""
    return {ssrc for ssrc, stats in ep.senders.items() if stats.packets}

def process_cpu(pid: int) -> tuple[float, float]:
    """(utime, stime) of ``pid`` in seconds (all its threads)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / _CLK_TCK, int(fields[12]) / _CLK_TCK


def own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))]


class Latency:
    """Send -> receive samples (ns), recorded only while ``on``."""

    def __init__(self) -> None:
        self.on = False
        self.samples: list[int] = []

    def record(self, payload: bytes) -> None:
        if self.on:
            self.samples.append(time.monotonic_ns() - _STAMP.unpack_from(payload)[0])


class Pacer:
    """Sends from every sender at ``rate`` packets/s each, ticking every TICK seconds.

    A stalled tick is made up for, at most 20 ms worth per tick; what is
    sent is counted, so the offered rate reported is the one achieved.
    """

    def __init__(self, reactor: Any, rate: float) -> None:
        self.reactor = reactor
        self.senders: list[list[Any]] = []  # [send, start, sent]
        self.sent = 0
        self.set_rate(rate)
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = reactor

    def add(self, send: Callable[[], object]) -> None:
        self.senders.append([send, self.reactor.seconds(), 0])

    def set_rate(self, rate: float) -> None:
        self.rate = rate
        self.cap = max(1, int(rate * 0.02))
        now = self.reactor.seconds()
        for s in self.senders:
            s[1], s[2] = now, 0

    def start(self) -> None:
        self._loop.start(TICK, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def _tick(self) -> None:
        now = self.reactor.seconds()
        rate, cap = self.rate, self.cap
        for s in self.senders:
            n = min(int((now - s[1]) * rate) - s[2], cap)
            if n <= 0:
                continue
            send = s[0]
            for _ in range(n):
                send()
            s[2] += n
            self.sent += n


@dataclass
class Window:
    """What one measured window gave."""

    seconds: float = 0.0
    sent: int = 0
    forwarded: float = 0.0
    cpu: float = 0.0
    system_cpu: float = 0.0
    load_cpu: float = 0.0
    received: int = 0
    fanout: int = 1
    latency: list[int] = field(default_factory=list)
    decrypt_failures: int = 0

    @property
    def offered_pps(self) -> float:
        return self.sent / self.seconds

    @property
    def forwarded_pps(self) -> float:
        return self.forwarded / self.seconds

    @property
    def us_per_packet(self) -> float:
        return self.cpu / self.forwarded * 1e6 if self.forwarded else float("nan")

    @property
    def loss(self) -> float:
        expected = self.sent * self.fanout
        return max(0.0, 1 - self.received / expected) if expected else 0.0

    def latency_text(self) -> str:
        if not self.latency:
            return "        -"
        return (f"{percentile(self.latency, 0.5) / 1e3:5.0f} / "
                f"{percentile(self.latency, 0.99) / 1e3:5.0f}")


async def measure(reactor: Any, seconds: float, pid: int, forwarded: Callable[[], Any],
                  received: Callable[[], int], pacer: Pacer, latency: Latency,
                  fanout: int, failures: Callable[[], int] = lambda: 0) -> Window:
    f0 = await forwarded()
    d0, (u0, k0), l0, r0 = failures(), process_cpu(pid), own_cpu(), received()
    s0, t0 = pacer.sent, reactor.seconds()
    latency.on = True
    await sleep(reactor, seconds)
    latency.on = False
    t1, s1, r1, l1 = reactor.seconds(), pacer.sent, received(), own_cpu()
    (u1, k1), d1 = process_cpu(pid), failures()
    f1 = await forwarded()
    return Window(seconds=t1 - t0, sent=s1 - s0, forwarded=f1 - f0, cpu=u1 + k1 - u0 - k0,
                  system_cpu=k1 - k0, load_cpu=l1 - l0, received=r1 - r0, fanout=fanout,
                  latency=latency.samples, decrypt_failures=d1 - d0)


# --- perc-md ------------------------------------------------------------------------------


class Frames:
    """A sender's frames: the send time (CLOCK_MONOTONIC ns) then a pinned filler."""

    def __init__(self, filler: bytes) -> None:
        self.filler = filler
        self.timestamp = 0
        self.step = 1800  # 90 kHz clock, 50 frames/s

    def next(self) -> MediaFrame:
        self.timestamp = (self.timestamp + self.step) & 0xFFFFFFFF
        return MediaFrame(_STAMP.pack(time.monotonic_ns()) + self.filler, self.timestamp,
                          marker=True)


async def md_run(reactor: Any, args: argparse.Namespace, directory: str, out: Any
                 ) -> tuple[Window, list[float], list[float], int]:
    """The perc-md part: (window, join times, connect times, wire datagram size)."""
    total = args.senders + args.receivers
    users = [f"u{i:03d}" for i in range(total)]
    stack = LocalStack(directory, reactor, users=users)
    filler = random.Random(SEED).randbytes(args.size - _STAMP.size)
    latency = Latency()
    endpoints: list[Endpoint] = []
    pacer = Pacer(reactor, WARMUP_RATE)
    wire = [0]
    timed: list[Endpoint] = []  # joined while another sender was sending
    try:
        stack.prepare()
        await stack.start_all()
        await stack.create_conference(CONFERENCE, users,
                                      late_joiners_get_earlier_epochs=args.no_rekey_on_join)
        await stack.wait_for_kd(CONFERENCE)
        pacer.start()
        for i, user in enumerate(users):
            ep = Endpoint(reactor, kmf_url=stack.kmf_url, md_url=stack.md_url,
                          ca=stack.ca_path, conference_id=CONFERENCE, user=user,
                          password=stack.password, kd_names=[KD_NAME], kind="video",
                          roster_interval=3600.0, decrypt_every=1,  # joins: decrypt all
                          on_media=lambda event, now: latency.record(event.payload),
                          receive_buffer=RECEIVE_BUFFER, label=user)
            await ep.join()
            endpoints.append(ep)
            # One join at a time, each until its first decrypted packet: every join
            # (with rekeying) starts a new epoch; overlapping ones would be measured
            # as one another's delay.
            others = {e.ssrc for e in endpoints[:args.senders]} - {ep.ssrc}
            if others:
                timed.append(ep)
            deadline = reactor.seconds() + 5
            while (others and not others <= _heard(ep)
                   and reactor.seconds() < deadline):
                await sleep(reactor, 0.01)
            if i < args.senders:
                frames = Frames(filler)

                def send(ep: Endpoint = ep, frames: Frames = frames) -> None:
                    datagram = ep.send_frame(frames.next())
                    if datagram is not None:
                        wire[0] = len(datagram)

                pacer.add(send)
        sender_ssrcs = {ep.ssrc for ep in endpoints[:args.senders]}
        deadline = reactor.seconds() + 5
        while reactor.seconds() < deadline and not all(
                sender_ssrcs - {ep.ssrc} <= _heard(ep) for ep in endpoints):
            await sleep(reactor, 0.05)
        await sleep(reactor, 0.5)  # the last epoch's old keys retired (RFC 8870 s4.3.1)
        joins = [ep.stats()["join_time"] for ep in timed]
        connects = [ep.stats()["connect_time"] for ep in timed]
        for ep in endpoints:  # the lighter receive mode, for the measured window only
            ep.decrypt_every = args.decrypt_every
            if ep.session is not None:  # what it does not decrypt is no loss to NACK
                ep.session.nack = args.decrypt_every == 1
        pacer.set_rate(args.rate)
        await sleep(reactor, SETTLE)
        metrics_url = f"http://127.0.0.1:{stack.ports.md_admin}/metrics"

        async def forwarded() -> float:
            response = await treq.get(metrics_url, pool=stack.pool, timeout=10)
            text = (await treq.content(response)).decode()
            return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("perc_md_participant_datagrams_total{")
                       and 'kind="rtp_out"' in line)

        def received() -> int:
            if args.decrypt_every > 1:
                return sum(s.packets for ep in endpoints for s in ep.relayed.values())
            return sum(s.packets for ep in endpoints for s in ep.senders.values())

        def failures() -> int:
            return (sum(s.decrypt_failures for ep in endpoints for s in ep.senders.values())
                    + sum(ep.unattributed_decrypt_failures for ep in endpoints))

        window = await measure(reactor, args.seconds, stack.children["md"].transport.pid,
                               forwarded, received, pacer, latency, total - 1, failures)
        pacer.stop()
        return (window, [t for t in joins if t is not None],
                [t for t in connects if t is not None], wire[0])
    finally:
        pacer.stop()
        await sleep(reactor, 0.2)
        results = await defer.DeferredList([ep.leave() for ep in endpoints],
                                           consumeErrors=True)
        del results
        await stack.stop_all()


# --- baseline -------------------------------------------------------------------------------


class RelayChild(ProcessProtocol):
    def __init__(self) -> None:
        self.output = bytearray()
        self.listening: defer.Deferred = defer.Deferred()
        self.ended: defer.Deferred = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if b"listening on" in self.output and not self.listening.called:
            self.listening.callback(None)

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        if not self.listening.called:
            self.listening.errback(RuntimeError(
                f"udp_relay.py exited: {self.output.decode(errors='replace')}"))
        self.ended.callback(None)


class PlainEndpoint(DatagramProtocol):
    """A baseline endpoint: counts datagrams, samples latency one in ``every``."""

    def __init__(self, latency: Latency, every: int) -> None:
        self.latency = latency
        self.every = every
        self.received = 0
        self.replies: list[defer.Deferred] = []

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        if len(datagram) >= _STAMP.size and datagram[:2] not in (b"OK", b'{"'):
            self.received += 1
            if self.received % self.every == 0:
                self.latency.record(datagram)
        elif self.replies:
            self.replies.pop(0).callback(datagram)

    def ask(self, message: bytes, address: tuple[str, int]) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.replies.append(d)
        self.transport.write(message, address)
        return d.addTimeout(5, self.transport.reactor)


async def baseline_run(reactor: Any, args: argparse.Namespace, wire_size: int) -> Window:
    total = args.senders + args.receivers
    port = free_port(socket.SOCK_DGRAM)
    address = ("127.0.0.1", port)
    child = RelayChild()
    script = str(Path(__file__).resolve().parent / "udp_relay.py")
    process = reactor.spawnProcess(child, sys.executable,
                                   [sys.executable, script, "--port", str(port)],
                                   env=dict(os.environ))
    latency = Latency()
    pacer = Pacer(reactor, args.rate)
    ports = []
    try:
        await child.listening
        protocols = [PlainEndpoint(latency, args.decrypt_every) for _ in range(total)]
        for protocol in protocols:
            p = reactor.listenUDP(0, protocol, interface="127.0.0.1")
            p.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            ports.append(p)
            await protocol.ask(b"REGISTER", address)
        filler = random.Random(SEED).randbytes(max(0, wire_size - _STAMP.size))
        for protocol in protocols[:args.senders]:
            def send(write: Any = protocol.transport.write) -> None:
                write(_STAMP.pack(time.monotonic_ns()) + filler, address)

            pacer.add(send)
        pacer.start()
        await sleep(reactor, SETTLE)
        control = protocols[-1]

        async def forwarded() -> float:
            reply = await control.ask(b"STATS", address)
            return float(json.loads(reply)["forwarded"])

        window = await measure(reactor, args.seconds, process.pid, forwarded,
                               lambda: sum(p.received for p in protocols), pacer, latency,
                               total - 1)
        return window
    finally:
        pacer.stop()
        for p in ports:
            await defer.maybeDeferred(p.stopListening)
        try:
            process.signalProcess("TERM")
        except Exception:  # already gone
            pass
        await child.ended


# --- report --------------------------------------------------------------------------------


def report(args: argparse.Namespace, md: Window, base: Window, joins: list[float],
           connects: list[float], wire: int, out: Any) -> None:
    out.write(f"\n{'':22s} {'offered/s':>9s} {'forwarded/s':>11s} {'CPU us/fwd':>10s} "
              f"{'(sys)':>6s} {'core':>5s} {'1 core fwd/s':>12s} {'lat p50/p99 us':>14s} "
              f"{'loss':>6s} {'load core':>9s}\n")
    for name, w in (("perc-md", md), ("udp relay (baseline)", base)):
        out.write(f"{name:22s} {w.offered_pps:9.0f} {w.forwarded_pps:11.0f} "
                  f"{w.us_per_packet:10.2f} {w.system_cpu / w.forwarded * 1e6:6.2f} "
                  f"{w.cpu / w.seconds:5.0%} "
                  f"{1e6 / w.us_per_packet:12.0f} {w.latency_text():>14s} {w.loss:6.2%} "
                  f"{w.load_cpu / w.seconds:9.0%}\n")
    ratio = md.us_per_packet / base.us_per_packet
    out.write(f"ratio (perc-md / baseline CPU per forwarded packet): {ratio:.2f}\n")
    join_p50 = statistics.median(joins) if joins else float("nan")
    if joins:
        out.write(f"join (offer -> first decrypted packet) over {len(joins)} endpoints: "
                  f"p50 {join_p50 * 1e3:.0f} ms, max {max(joins) * 1e3:.0f} ms"
                  + (f"; offer -> keys installed p50 {statistics.median(connects) * 1e3:.0f} ms"
                     if connects else "") + "\n")
    else:
        out.write("join: no endpoint received media\n")
    out.write(f"latency samples: perc-md {len(md.latency)}, baseline {len(base.latency)}; "
              f"wire datagram {wire} bytes; decrypt failures in the window: "
              f"{md.decrypt_failures}\n")

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    out.write("targets:\n")
    out.write(f"  forwarded >= {TARGET_FORWARDED} packets/s on one core: "
              f"{verdict(md.forwarded_pps >= TARGET_FORWARDED and md.cpu <= md.seconds)} "
              f"({md.forwarded_pps:.0f}/s measured at {md.cpu / md.seconds:.0%} of a core; "
              f"one core would forward ~{1e6 / md.us_per_packet:.0f}/s)\n")
    out.write(f"  CPU per packet <= {TARGET_RATIO:g}x baseline: {verdict(ratio <= TARGET_RATIO)} "
              f"({ratio:.2f}x)\n")
    out.write(f"  join <= {TARGET_JOIN * 1e3:.0f} ms (p50): {verdict(join_p50 <= TARGET_JOIN)} "
              f"(p50 {join_p50 * 1e3:.0f} ms, max {max(joins, default=float('nan')) * 1e3:.0f} "
              "ms)\n")
    if not args.no_rekey_on_join:
        out.write("    (every join starts an epoch: senders keep their previous key 250 ms, RFC "
                  "8870 s4.3.1, which a joiner never gets; --no-rekey-on-join measures a "
                  "conference that lets late joiners have the current epoch)\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--senders", type=int, default=2)
    parser.add_argument("--receivers", type=int, default=6)
    parser.add_argument("--rate", type=float, default=1000.0, help="packets/s per sender")
    parser.add_argument("--seconds", type=float, default=4.0, help="measured window")
    parser.add_argument("--size", type=int, default=1200, help="RTP payload bytes")
    parser.add_argument("--decrypt-every", type=int, default=16,
                        help="receivers decrypt one datagram in N (1: all)")
    parser.add_argument("--no-rekey-on-join", action="store_true",
                        help="conference with late_joiners_get_earlier_epochs: a join "
                        "starts no new epoch")
    parser.add_argument("--keep", metavar="DIR", help="keep the stack's directory (logs) here")
    args = parser.parse_args()
    if args.senders < 1 or args.receivers < 0 or args.senders + args.receivers < 2:
        parser.error("need at least one sender and two endpoints")
    if args.size < 16:
        parser.error("--size must be at least 16")
    fanout = args.senders + args.receivers - 1
    out = sys.stdout
    out.write(f"perc-daemons conference benchmark: {args.senders} senders x "
              f"{args.receivers} receivers (fan-out {fanout}), {args.rate:g} packets/s per "
              f"sender of {args.size}-byte payload, {args.seconds:g} s window, receivers "
              f"decrypt 1 in {args.decrypt_every}"
              f"{', no rekey on join' if args.no_rekey_on_join else ''} "
              f"(python {sys.version.split()[0]}, {os.cpu_count()} CPUs)\n")
    out.flush()
    directory = args.keep or tempfile.mkdtemp(prefix="perc-bench-")

    async def run(reactor: Any) -> None:
        md, joins, connects, wire = await md_run(reactor, args, directory, out)
        base = await baseline_run(reactor, args, wire)
        report(args, md, base, joins, connects, wire, out)

    try:
        task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
