"""Benchmark: how long a periodic rekey takes to reach a whole conference (issue 14).

One :class:`~perc_daemons.demo.stack.LocalStack` (perc-kmf, perc-kd, perc-md
as twistd children on loopback), one conference of ``--endpoints`` (20)
reference :class:`~perc_daemons.endpoint.client.Endpoint` s that all send pinned PCMU-
sized payloads every 20 ms, each on its own clock at a pinned phase spread over the 20
ms (real endpoints are not synchronised; twenty sending at the same instant would queue
380 copies at once in this one process), real double SRTP (RFC 8723), and receive one
another. Once every endpoint hears every other, the conference's ``rekey_interval`` is
set to ``--interval`` seconds (``PATCH``): the KD then starts an epoch on that timer,
with nobody joining or leaving, and ``--epochs`` of them are measured.

Per timed epoch, every time on the machine's one wall clock (the KD's from
its ``[logging] format = "json"`` lines, microsecond ``time``; the endpoints'
from this process's reactor):

* ``t0``: the KD's "timed rekey" event (its timer fired: the KD starts the
  epoch); ``kmf``: its "epoch N started at the KMF" event (after the
  invitation re-check and ``POST .../epochs``); ``sent``: its "epoch N
  installed ... sent to M member(s)" event (after ``POST .../keys``: the
  EKTKey went to every member, one DTLS record each through the tunnel);
* per endpoint: ``ekt``, its EKTKey arrived (EktKeyInstalled); ``switch``,
  its first packet protected under the new epoch's key (its EktSender's
  old-key hold of 250 ms, RFC 8870 s4.3.1, over:
  :meth:`~perc_daemons.protocol.participant.ParticipantSession.sending_spi`);
  ``heard``, for each other endpoint, the first of its packets decrypted
  with a key announced under the new SPI (``MediaReceived.key_spi``).

An endpoint is done when it has switched and heard every other endpoint
under the new key; the epoch's **rekey time** is from ``t0`` to the last
endpoint done.  Printed: p50 / p95 / max over the epochs, and the same
split into its stages (each from the previous stage's last event), against
the goal (<= 300 ms for 20 endpoints, the 250 ms hold included).  The
floor: the hold starts at the first packet after the EKTKey (0-20 ms) and
ends at the first packet after 250 ms (260 ms later at 20 ms packets), so
260-280 ms before the KMF round trips, the KD and the network.
``--baseline`` (default 2) endpoints in a conference of their own on the
same daemons, measured the same way first: what does not grow with the
conference's size.  The exit status is 0 either way (a measurement).

Load: every endpoint lives in this one process.  Its media socket is read
every :data:`DRAIN` (2 ms) with recvmmsg(2) (``bench/mmsg.py``): no Python
object per datagram that is only counted.  So that the generator does not
decrypt 19 x 20 x 50 packets/s, a receiver decrypts one datagram
in ``--decrypt-every`` (and every one with a FullEKTField while the
sender's new key is not learnt), but every datagram of a sender it has not yet heard under the
newest EKTKey it holds from :data:`WATCH_AFTER` (220 ms) after it learnt
that sender's new key (the sender's hold runs 250 ms from its first
FullEKTField; at once if the receiver learnt it more than 60 ms after its
own EKTKey came, when it may have missed the first ones): the switch is
decrypted in full, the held-key packets before it are not.  Decrypting the
whole hold instead (19 x 20 x 50 packets/s) saturates the generator and
delays what it measures by tens of ms; a switch seen late only makes the
figure larger.
The generator's CPU share is printed; near 100 % it, not the daemons, is
the limit.

Usage: python bench/rekey.py [--endpoints 20] [--epochs 8] [--interval 3]
       [--baseline 2] [--decrypt-every 25] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet import defer, task

from bench.mmsg import SLOT, Batch, sockaddr_key
from perc_daemons.demo.stack import KD_NAME, LocalStack, sleep
from perc_daemons.endpoint.client import Endpoint
from perc_daemons.endpoint.media import MediaFrame
from perc_daemons.protocol.ekt import FULL_EKT_TYPE
from perc_daemons.protocol.participant import EktKeyInstalled, MediaReceived

SEED = 8870
PTIME = 0.020  # one frame per endpoint every 20 ms (PCMU)
PAYLOAD = 160
HOLD = 0.250  # RFC 8870 s4.3.1, EktSender's old_key_hold
GOAL = 0.300
DRAIN = 0.002  # the media sockets are read this often (recvmmsg)
#: A receiver decrypts every packet of a sender from this long after it learnt the
#: sender's new key until one decrypts under it: the sender's hold runs 250 ms from its
#: first FullEKTField, which it repeats on its next two packets (RFC 8870 s4.6).
WATCH_AFTER = 0.220
STAGES = ("kmf", "sent", "ekt", "switch", "heard")
STAGE_TEXT = {
    "kmf": "timer -> epoch started at the KMF (invitation re-check, POST epochs)",
    "sent": "-> KD sent the EKTKeys (POST keys, one DTLS record per member)",
    "ekt": "-> last endpoint holds the EKTKey",
    "switch": "-> last endpoint sends under it (old-key hold)",
    "heard": "-> last endpoint heard everyone under it",
}
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))]


def process_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def own_cpu() -> float:
    t = os.times()
    return t.user + t.system


class TimedEndpoint(Endpoint):
    """The reference endpoint, timing its EKTKeys, its send switches and what it heard
    under each EKT SPI; the lighter receive mode spares only senders already heard
    under the newest EKTKey it holds."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ekt_at: dict[int, float] = {}  # SPI -> EktKeyInstalled
        self.switch_at: dict[int, float] = {}  # SPI -> first packet sent under it
        self.heard_at: dict[tuple[int, int], float] = {}  # (SPI, sender SSRC) -> first
        self.pending: set[int] = set()  # senders not yet heard under the newest SPI
        #: pending sender -> from when its packets are all decrypted (its new key learnt)
        self.learnt_at: dict[int, float] = {}
        self.others: set[int] = set()
        self.every = 1
        self._reader: tuple[Batch, int, Any, int] | None = None
        self._sending_spi: int | None = None

    def _event(self, event: Any) -> None:
        now = self.now()
        if isinstance(event, EktKeyInstalled):
            self.ekt_at.setdefault(event.spi, now)
            self.pending = set(self.others)
            self.learnt_at.clear()
        elif isinstance(event, MediaReceived) and event.key_spi is not None:
            self.heard_at.setdefault((event.key_spi, event.ssrc), now)
            newest = self.epochs_installed[-1] if self.epochs_installed else None
            if event.key_spi == newest:
                self.pending.discard(event.ssrc)
            elif (event.spi == newest and event.ssrc in self.pending
                  and event.ssrc not in self.learnt_at):
                # its FullEKTField under the new EKTKey: it switches 250 ms after its first
                # (WATCH_AFTER from now), unless we missed the first ones (then watch now)
                early = now - self.ekt_at.get(newest, now) < 0.060
                self.learnt_at[event.ssrc] = now + (WATCH_AFTER if early else 0.0)
        super()._event(event)

    def wants(self, ssrc: int, full: bool) -> bool:
        """Whether an RTP datagram of ``ssrc`` is to be decrypted (``full``: it carries a
        FullEKTField: decrypted while the sender's new key is not learnt)."""
        self._light_count += 1
        if ssrc in self.pending:
            if full and ssrc not in self.learnt_at:
                return True
            learnt = self.learnt_at.get(ssrc)
            if learnt is not None and self.now() >= learnt:
                return True
        return self._light_count % self.every == 0

    def attach(self, batch: Batch) -> None:
        """Read the media socket with recvmmsg(2) in :meth:`drain` from now on."""
        assert self.session is not None and self._port is not None
        self._port.stopReading()
        md = tuple(self.session.md_address)
        self._reader = (batch, self._port.socket.fileno(), md, sockaddr_key(*md))

    def drain(self) -> None:
        """Every datagram waiting: RTP from the MD decrypted if :meth:`wants` (or with a
        FullEKTField), else only counted; everything else to the endpoint."""
        if self._reader is None or self.session is None:
            return
        batch, fd, md, key = self._reader
        data, offsets, size = batch.data, batch.offsets, batch.size
        receive = self._datagram
        while n := batch.recv(fd):
            sources, lengths, words = batch.unpack(n)
            for off, length, word, source in zip(offsets, lengths, words, sources,
                                                 strict=False):
                if source == key:
                    if (length > 12 and 0x80000000 <= word < 0xC0000000
                            and not 0xC0 <= (word >> 16) & 0xFF <= 0xDF
                            and not self.wants(int.from_bytes(data[off + 8:off + 12], "big"),
                                               data[off + length - 1] == FULL_EKT_TYPE)):
                        continue
                    receive(bytes(data[off:off + length]), md)
                else:
                    receive(bytes(data[off:off + length]), batch.source(off // SLOT))
            if n < size:
                break

    def send_pinned(self, frame: MediaFrame) -> None:
        if self.send_frame(frame) is None or self.session is None:
            return
        spi = self.session.sending_spi()
        if spi != self._sending_spi:
            self._sending_spi = spi
            if spi is not None:
                self.switch_at.setdefault(spi, self.now())


class Pinned:
    """One endpoint's frames: pinned random payloads, RTP timestamp + 160 each."""

    def __init__(self, rng: random.Random) -> None:
        self.payloads = [rng.randbytes(PAYLOAD) for _ in range(50)]
        self.timestamp = rng.getrandbits(32)
        self.count = 0

    def next(self) -> MediaFrame:
        self.count += 1
        self.timestamp = (self.timestamp + PAYLOAD) & 0xFFFFFFFF
        return MediaFrame(self.payloads[self.count % 50], self.timestamp,
                          marker=self.count == 1)


@dataclass
class Epoch:
    spi: int
    epoch: int
    t0: float
    kmf: float
    sent: float
    members: int
    ekt: list[float] = field(default_factory=list)
    switch: list[float] = field(default_factory=list)
    done: list[float] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    transit: list[float] = field(default_factory=list)  # sender switch -> heard, per pair

    def stages(self) -> dict[str, float]:
        """Seconds of each stage (from the previous stage's last event)."""
        marks = {"kmf": self.kmf, "sent": self.sent, "ekt": max(self.ekt),
                 "switch": max(self.switch), "heard": max(self.done)}
        out, last = {}, self.t0
        for name in STAGES:
            out[name] = marks[name] - last
            last = marks[name]
        return out

    @property
    def total(self) -> float:
        return max(self.done) - self.t0


def kd_events(text: str) -> list[dict[str, Any]]:
    """The KD's JSON log lines about epochs, with ``at`` (POSIX seconds)."""
    events = []
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        message = record.get("message", "")
        if not isinstance(message, str) or ("epoch" not in message and "rekey" not in message):
            continue
        record["at"] = datetime.strptime(record["time"], "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()
        events.append(record)
    return events


def timed_epochs(events: list[dict[str, Any]], conference: str) -> list[dict[str, Any]]:
    """Per timed epoch of ``conference``: t0, kmf, sent, epoch, spi, members."""
    out = []
    timer_at: float | None = None
    current: dict[str, Any] | None = None
    for record in events:
        if record.get("conference") != conference:
            continue
        message = record["message"]
        if message.startswith("timed rekey of"):
            timer_at = record["at"]
        elif " started at the KMF" in message and "timer" in record.get("cause", ""):
            if timer_at is not None:
                current = {"t0": timer_at, "kmf": record["at"], "epoch": int(record["epoch"])}
            timer_at = None
        elif " installed (SPI" in message and current is not None and int(
                record["epoch"]) == current["epoch"]:
            current.update(sent=record["at"], spi=int(record["spi"]),
                           members=int(record["members"]))
            out.append(current)
            current = None
    return out


async def patch(stack: LocalStack, conference: str, token: str, body: dict[str, Any]) -> None:
    code, answer = await stack.request("PATCH", f"{stack.kmf_url}/v1/conferences/{conference}",
                                       token=token, body=body)
    if code != 200:
        raise RuntimeError(f"PATCH {conference}: {code} {answer}")


async def run_conference(reactor: Any, stack: LocalStack, conference: str,
                         users: list[str], args: argparse.Namespace, epochs: int,
                         out: Any) -> tuple[list[Epoch], float, float]:
    """Join ``users``, send, turn the timer on, measure ``epochs`` timed epochs.
    (epochs, generator CPU share, wall seconds measured)."""
    await stack.create_conference(conference, users)
    await stack.wait_for_kd(conference)
    rng = random.Random(f"{SEED}-{conference}")
    endpoints: list[TimedEndpoint] = []
    frames: dict[int, Pinned] = {}
    batch = Batch(64)
    drain: task.LoopingCall | None = None

    # Each endpoint sends on its own 20 ms clock, at a pinned phase spread over the
    # period: real endpoints are not synchronised, and twenty sending in the same
    # instant would queue 380 copies at once in this one process.
    loops: list[task.LoopingCall] = []
    starts: list[Any] = []

    def sender(ep: TimedEndpoint) -> None:
        def tick(count: int) -> None:
            for _ in range(min(count, 5)):
                if ep.ready_at is not None:
                    ep.send_pinned(frames[id(ep)].next())

        loop = task.LoopingCall.withCount(tick)
        loop.clock = reactor
        loops.append(loop)
        phase = (len(loops) - 1) * PTIME / args.endpoints
        starts.append(reactor.callLater(phase, loop.start, PTIME, False))

    try:
        for user in users:
            ep = TimedEndpoint(reactor, kmf_url=stack.kmf_url, md_url=stack.md_url,
                               ca=stack.ca_path, conference_id=conference, user=user,
                               password=stack.password, kd_names=[KD_NAME], label=user,
                               roster_interval=3600.0, decrypt_every=1,
                               receive_buffer=2 << 20)
            frames[id(ep)] = Pinned(rng)
            await ep.join()
            endpoints.append(ep)
            sender(ep)
        ssrcs = {ep.ssrc for ep in endpoints}
        for ep in endpoints:
            ep.others = ssrcs - {ep.ssrc}
        deadline = reactor.seconds() + 20
        while reactor.seconds() < deadline and not all(
                ep.others <= {s for s, st in ep.senders.items() if st.packets}
                for ep in endpoints):
            await sleep(reactor, 0.05)
        await sleep(reactor, 1.0)  # the joins' epochs settled
        for ep in endpoints:
            ep.every = args.decrypt_every
            ep.attach(batch)
            if ep.session is not None:  # what it does not decrypt is no loss to NACK
                ep.session.nack = False
        drain = task.LoopingCall(lambda: [ep.drain() for ep in endpoints])
        drain.clock = reactor
        drain.start(DRAIN, now=True)
        out.write(f"  {conference}: {len(endpoints)} endpoints joined and hear one another; "
                  f"rekey_interval {args.interval:g} s\n")
        out.flush()
        token = await stack.admin_token()
        cpu0, wall0 = own_cpu(), reactor.seconds()
        await patch(stack, conference, token, {"rekey_interval": args.interval})
        deadline = reactor.seconds() + epochs * (args.interval + 2) + 10
        found: list[dict[str, Any]] = []
        while reactor.seconds() < deadline:
            await sleep(reactor, 0.5)
            found = timed_epochs(kd_events(stack.children["kd"].text()), conference)
            if len(found) >= epochs and all(
                    r["spi"] in ep.switch_at for r in found[:epochs] for ep in endpoints):
                await sleep(reactor, 0.5)
                break
        await patch(stack, conference, token, {"rekey_interval": 0})
        cpu, wall = own_cpu() - cpu0, reactor.seconds() - wall0
    finally:
        for call in starts:
            if call.active():
                call.cancel()
        for loop in loops:
            if loop.running:
                loop.stop()
        if drain is not None and drain.running:
            drain.stop()
        await defer.DeferredList([ep.leave() for ep in endpoints], consumeErrors=True)
    measured = []
    for record in found[:epochs]:
        e = Epoch(record["spi"], record["epoch"], record["t0"], record["kmf"], record["sent"],
                  record["members"])
        spi = e.spi
        for ep in endpoints:
            heard = [ep.heard_at.get((spi, s)) for s in sorted(ep.others)]
            if spi not in ep.ekt_at or spi not in ep.switch_at or None in heard:
                e.missing.append(ep.label)
                continue
            e.ekt.append(ep.ekt_at[spi])
            e.switch.append(ep.switch_at[spi])
            e.done.append(max([ep.switch_at[spi], *heard]))  # type: ignore[list-item]
            for sender in endpoints:
                if sender is not ep and spi in sender.switch_at:
                    e.transit.append(ep.heard_at[(spi, sender.ssrc)] - sender.switch_at[spi])
        measured.append(e)
    return measured, cpu / wall if wall else float("nan"), wall


def report(name: str, epochs: list[Epoch], out: Any) -> float | None:
    complete = [e for e in epochs if not e.missing and e.done]
    for e in epochs:
        if e.missing:
            out.write(f"  epoch {e.epoch} (SPI {e.spi}): incomplete at "
                      f"{', '.join(e.missing)}\n")
    if not complete:
        out.write(f"{name}: no complete epoch measured\n")
        return None
    totals = [e.total for e in complete]
    out.write(f"{name}: {len(complete)} timed epochs of {complete[0].members} members: rekey "
              f"time p50 {percentile(totals, 0.5) * 1e3:.0f} ms, p95 "
              f"{percentile(totals, 0.95) * 1e3:.0f} ms, max {max(totals) * 1e3:.0f} ms\n")
    out.write(f"  {'stage (ms)':66s} {'p50':>5s} {'p95':>5s} {'max':>5s}\n")
    for stage in STAGES:
        values = [e.stages()[stage] for e in complete]
        out.write(f"  {STAGE_TEXT[stage]:66s} {percentile(values, 0.5) * 1e3:5.0f} "
                  f"{percentile(values, 0.95) * 1e3:5.0f} {max(values) * 1e3:5.0f}\n")
    transit = [t for e in complete for t in e.transit]
    out.write(f"  a sender's switch -> a receiver's first packet under the new key, over "
              f"{len(transit)} pairs: p50 {percentile(transit, 0.5) * 1e3:.1f} ms, p95 "
              f"{percentile(transit, 0.95) * 1e3:.1f} ms, max {max(transit) * 1e3:.1f} ms\n")
    buckets: dict[int, int] = {}
    for t in transit:
        buckets[int(t * 1e3 // 10) * 10] = buckets.get(int(t * 1e3 // 10) * 10, 0) + 1
    out.write("    by 10 ms: " + ", ".join(f"{k}-{k + 10}: {v}" for k, v in sorted(buckets.items()))
              + "\n")
    spread = [max(e.ekt) - min(e.ekt) for e in complete]
    out.write(f"  EKTKey spread (first to last endpoint): p50 "
              f"{statistics.median(spread) * 1e3:.1f} ms, max {max(spread) * 1e3:.1f} ms\n")
    return percentile(totals, 0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--endpoints", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=8, help="timed epochs measured")
    parser.add_argument("--interval", type=float, default=3.0, help="rekey_interval (s)")
    parser.add_argument("--baseline", type=int, default=2,
                        help="endpoints of the baseline conference (0: none)")
    parser.add_argument("--decrypt-every", type=int, default=25,
                        help="receivers decrypt one datagram in N once a sender is heard "
                             "under the newest EKTKey")
    parser.add_argument("--keep", metavar="DIR", help="keep the stack's directory (logs) here")
    args = parser.parse_args()
    if args.endpoints < 2 or args.epochs < 1 or args.interval < 1:
        parser.error("need 2 endpoints, 1 epoch and an interval of at least 1 s")
    out = sys.stdout
    out.write(f"perc-daemons rekey benchmark: {args.endpoints} endpoints sending every "
              f"{PTIME * 1e3:.0f} ms, {args.epochs} timed epochs {args.interval:g} s apart, "
              f"baseline {args.baseline} endpoints (python {sys.version.split()[0]}, "
              f"{os.cpu_count()} CPUs)\n")
    out.flush()
    directory = args.keep or tempfile.mkdtemp(prefix="perc-bench-rekey-")
    users = [f"u{i:03d}" for i in range(max(args.endpoints, args.baseline))]

    async def run(reactor: Any) -> None:
        stack = LocalStack(directory, reactor, users=users,
                           settings={"kd": {"logging": {"format": "json"}}})
        try:
            stack.prepare()
            await stack.start_all()
            results = []
            if args.baseline >= 2:
                results.append(("baseline", await run_conference(
                    reactor, stack, "rekey-baseline", users[:args.baseline], args,
                    max(3, args.epochs // 2), out)))
            cpu_kd0 = process_cpu(stack.children["kd"].transport.pid)
            cpu_md0 = process_cpu(stack.children["md"].transport.pid)
            results.append(("conference", await run_conference(
                reactor, stack, "rekey", users[:args.endpoints], args, args.epochs, out)))
            kd_cpu = process_cpu(stack.children["kd"].transport.pid) - cpu_kd0
            md_cpu = process_cpu(stack.children["md"].transport.pid) - cpu_md0
        finally:
            await stack.stop_all()
        out.write("\n")
        p50 = None
        for name, (epochs, load, _wall) in results:
            p50 = report(name, epochs, out)
            out.write(f"  generator (this process) CPU while measuring: {load:.0%} of a "
                      "core\n")
        wall = results[-1][1][2]
        out.write(f"over the conference's joins and measurement: KD CPU {kd_cpu:.2f} s, MD CPU "
                  f"{md_cpu:.1f} s (measurement {wall:.0f} s)\n")
        switch = (int(HOLD / PTIME + 1e-9) + 1) * PTIME  # the first tick past the hold
        out.write(f"floor: the switch is the first packet after the {HOLD * 1e3:.0f} ms hold, "
                  f"{switch * 1e3:.0f} ms after the first packet announcing the key, which "
                  f"is 0-{PTIME * 1e3:.0f} ms after the EKTKey: {switch * 1e3:.0f}-"
                  f"{(switch + PTIME) * 1e3:.0f} ms plus the KMF, KD and network\n")
        verdict = "n/a" if p50 is None else ("PASS" if p50 <= GOAL else "MISS")
        out.write(f"goal: rekey time <= {GOAL * 1e3:.0f} ms for {args.endpoints} endpoints "
                  f"(p50): {verdict}\n")

    try:
        task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
