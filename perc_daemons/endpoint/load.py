"""Running endpoints: one (``perc-endpoint``) or N in one process (``perc-endpoint --load N``).

:func:`run_endpoints` starts each :class:`~perc_daemons.endpoint.client.Endpoint`
``ramp`` seconds after the previous one, and for each: join, media for
``duration`` seconds, final roster check, leave.  Failures of one endpoint
never stop the others; each ends as a :class:`Outcome` (statistics plus the
error that stopped it, if any).  :func:`summary` aggregates them for the
statistics JSON (join times: min, median, 95th percentile, max).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger

from perc_daemons.endpoint.client import Endpoint
from perc_daemons.endpoint.media import MediaSource

__all__ = ["Outcome", "run_endpoint", "run_endpoints", "summary"]

log = Logger()


@dataclass
class Outcome:
    """How one endpoint's run ended."""

    endpoint: Endpoint
    error: BaseException | None = None

    @property
    def failures(self) -> list[str]:
        problems = self.endpoint.all_failures()
        if self.error is not None:
            problems.insert(0, f"{type(self.error).__name__}: {self.error}")
        return problems

    @property
    def ok(self) -> bool:
        return not self.failures

    def as_json(self) -> dict[str, Any]:
        data = self.endpoint.stats()
        data["error"] = (f"{type(self.error).__name__}: {self.error}"
                         if self.error is not None else None)
        data["failures"] = self.failures
        data["ok"] = self.ok
        return data


async def run_endpoint(endpoint: Endpoint, duration: float,
                       source: MediaSource | None = None) -> Outcome:
    """join, media, roster check, leave: the outcome (never raises for the endpoint's errors)."""
    outcome = Outcome(endpoint)
    try:
        await endpoint.join()
        await endpoint.run_media(duration, source)
        await endpoint.check_roster()
    except Exception as e:  # recorded, reported: one endpoint must not stop the others
        outcome.error = e
        log.warn("{label}: {error}", label=endpoint.label, error=f"{type(e).__name__}: {e}")
    finally:
        try:
            await endpoint.leave()
        except Exception as e:
            if outcome.error is None:
                outcome.error = e
    return outcome


async def run_endpoints(reactor: Any, endpoints: Sequence[Endpoint], duration: float, *,
                        ramp: float = 0.0,
                        source_for: Callable[[int], MediaSource | None] | None = None
                        ) -> list[Outcome]:
    """Run all ``endpoints``, the i-th starting ``i * ramp`` seconds late."""

    async def one(index: int, endpoint: Endpoint) -> Outcome:
        if index and ramp > 0:
            await task.deferLater(reactor, index * ramp, lambda: None)
        source = source_for(index) if source_for is not None else None
        return await run_endpoint(endpoint, duration, source)

    results = await defer.gatherResults(
        [defer.ensureDeferred(one(i, e)) for i, e in enumerate(endpoints)])
    return list(results)


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def summary(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """Totals over ``outcomes`` for the statistics JSON."""
    joined = [o for o in outcomes if o.endpoint.ready_at is not None]
    join_times = [o.endpoint.stats()["join_time"] for o in outcomes]
    times = [t for t in join_times if t is not None]
    senders = [s for o in outcomes for s in o.endpoint.senders.values()]
    result: dict[str, Any] = {
        "endpoints": len(outcomes),
        "joined": len(joined),
        "ok": sum(1 for o in outcomes if o.ok),
        "failed": sum(1 for o in outcomes if not o.ok),
        "sent_packets": sum(o.endpoint.sent_packets for o in outcomes),
        "received_packets": sum(s.packets for s in senders),
        "losses": sum(max(0, s.lost) for s in senders),
        "decrypt_failures": sum(s.decrypt_failures for s in senders)
        + sum(o.endpoint.unattributed_decrypt_failures for o in outcomes),
        "join_time": None,
    }
    if times:
        result["join_time"] = {"min": min(times), "median": statistics.median(times),
                               "p95": _percentile(times, 0.95), "max": max(times)}
    return result
