"""The KD's audit reports to the KMF: queued, batched, retried, never in keying's way.

Issue 14, "Audit trail".  The KD alone sees admissions (the DTLS handshake
finished with the signalled certificate, and the first EKT key sent),
refusals (a SignAnswer refused, a handshake failed), leaves (close_notify,
the MD's EndpointDisconnect, an invitation withdrawn, the conference ended)
and the epochs it starts (why, and who got the key).  :class:`AuditReporter`
keeps them in a bounded queue and sends them in batches per conference
(``POST /v1/conferences/{id}/audit``, :meth:`KmfClient.post_audit`) from a
loop of its own, so a KMF that is down or slow delays the reports, never an
admission or a rekey.  A batch the KMF could not take (connection, timeout,
5xx) is sent again after a back-off (doubling from ``min_delay`` to
``max_delay``), in order, with the same event ids (the KMF records an id
once).  A batch the KMF refuses (4xx: the conference is unknown, a report
it does not accept) is dropped and counted, as is anything that would grow
the queue past ``max_queue`` (the oldest go first).  Counters:
``perc_kd_audit_reports{outcome=queued|sent|dropped_full|refused}``,
``perc_kd_audit_retries``, gauge ``perc_kd_audit_queue``.

Never key material: an event names identities, certificate fingerprints,
association ids, epochs, SPIs not even.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger

from perc_daemons.kd.kmf_client import KmfError, KmfRefused

__all__ = ["AuditReporter", "Report"]

log = Logger()

DEFAULT_MAX_QUEUE = 10_000
BATCH = 100


@dataclass(frozen=True)
class Report:
    """One event for the conference's trail (docs/API.md, POST .../audit)."""

    conference: str
    kind: str
    identity: str | None
    detail: dict[str, Any] = field(hash=False)
    time: float = 0.0
    id: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "time": self.time, "kind": self.kind,
                "identity": self.identity, "detail": self.detail}


class AuditReporter:
    """The queue and its sending loop (see the module doc)."""

    def __init__(self, reactor: Any, kmf: Any, *, metrics: Any = None,
                 max_queue: int = DEFAULT_MAX_QUEUE, min_delay: float = 0.5,
                 max_delay: float = 30.0) -> None:
        self.reactor = reactor
        self.kmf = kmf
        self.max_queue = max_queue
        self.min_delay = min_delay
        self.max_delay = max_delay
        self._queue: deque[Report] = deque()
        self._prefix = os.urandom(6).hex()  # ids unique across restarts of this KD
        self._ids = itertools.count(1)
        self._running: defer.Deferred[None] | None = None
        self._sleep: defer.Deferred[Any] | None = None
        self._stopped = False
        self.counts = {"queued": 0, "sent": 0, "dropped_full": 0, "refused": 0, "retries": 0}
        self._metrics = None
        if metrics is not None:
            from prometheus_client import Counter, Gauge

            registry = metrics.registry
            self._metrics = (
                Counter("perc_kd_audit_reports", "Audit reports by outcome (queued, sent, "
                        "dropped_full: the queue was full, refused: the KMF refused them)",
                        ["outcome"], registry=registry),
                Counter("perc_kd_audit_retries", "Audit batches sent again after a KMF "
                        "failure", registry=registry))
            Gauge("perc_kd_audit_queue", "Audit reports waiting for the KMF",
                  registry=registry).set_function(lambda: len(self._queue))

    def __len__(self) -> int:
        return len(self._queue)

    def _count(self, outcome: str, n: int = 1) -> None:
        self.counts[outcome] += n
        if self._metrics is not None and n:
            if outcome == "retries":
                self._metrics[1].inc(n)
            else:
                self._metrics[0].labels(outcome).inc(n)

    def report(self, conference: str, kind: str, identity: str | None,
               detail: dict[str, Any]) -> None:
        """Queue one event (returns at once; sent by the loop)."""
        if self._stopped:
            return
        self._queue.append(Report(conference, kind, identity, dict(detail),
                                  self.reactor.seconds(), f"{self._prefix}-{next(self._ids)}"))
        self._count("queued")
        while len(self._queue) > self.max_queue:
            dropped = self._queue.popleft()
            self._count("dropped_full")
            log.warn("audit queue full: report {kind} of {conference} dropped",
                     kind=dropped.kind, conference=dropped.conference)
        self.report_pending()

    def _ran(self, _: object) -> None:
        self._running = None
        if self._queue and not self._stopped:
            self.report_pending()

    def report_pending(self) -> None:
        """Start the sending loop unless it runs."""
        if self._running is None and self._queue and not self._stopped:
            self._running = defer.ensureDeferred(self._run())
            self._running.addErrback(lambda f: log.failure("audit reporting failed", f))
            self._running.addBoth(self._ran)

    def _batch(self) -> list[Report]:
        """The oldest reports of the conference at the head of the queue, in order."""
        head = self._queue[0].conference
        return list(itertools.islice((r for r in self._queue if r.conference == head), BATCH))

    def _remove(self, sent: Iterable[Report]) -> None:
        gone = {id(r) for r in sent}
        self._queue = deque(r for r in self._queue if id(r) not in gone)

    async def _run(self) -> None:
        delay = self.min_delay
        while self._queue and not self._stopped:
            batch = self._batch()
            try:
                await self.kmf.post_audit(batch[0].conference, [r.to_json() for r in batch])
            except KmfRefused as e:
                self._remove(batch)
                self._count("refused", len(batch))
                log.warn("KMF refused {count} audit report(s) of {conference}: {error}",
                         count=len(batch), conference=batch[0].conference, error=str(e))
            except KmfError as e:
                self._count("retries")
                log.warn("audit reports of {conference} not sent: {error}; retrying in "
                         "{delay:.1f} s", conference=batch[0].conference, error=str(e),
                         delay=delay)
                self._sleep = task.deferLater(self.reactor, delay, lambda: None)
                try:
                    await self._sleep
                except defer.CancelledError:
                    return
                finally:
                    self._sleep = None
                delay = min(delay * 2, self.max_delay)
                continue
            else:
                self._remove(batch)
                self._count("sent", len(batch))
            delay = self.min_delay

    def stop(self) -> defer.Deferred[None]:
        """Stop sending (what is queued is lost, and says so in the log)."""
        self._stopped = True
        if self._sleep is not None:
            self._sleep.cancel()
        if self._queue:
            log.warn("{count} audit report(s) not sent at stop", count=len(self._queue))
        running = self._running
        return defer.succeed(None) if running is None else running.addBoth(lambda _: None)
