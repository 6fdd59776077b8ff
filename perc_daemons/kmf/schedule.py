"""Conferences that end by themselves: one timer per conference at ``ends_at + grace``.

Issue 14 ("Schedule"): at ``ends_at`` plus the conference's ``grace`` the
KMF ends the conference exactly as ``perc-admin conferences end`` does
(:meth:`~perc_daemons.kmf.api.KmfApi.end_conference`, cause "schedule": the
stored keys wiped, ``conference-ended`` to the KDs, which revoke every
endpoint's key and end the conference at the MDs).  The timers live in this
process only; they are rebuilt from the stored ``ends_at`` of every
conference not ended when the service starts (:meth:`ScheduleTimers.load`),
so a restart, even one across the end time, ends the conference (at once if
the time has passed).  Several KMFs sharing a store each keep the timers:
ending is idempotent, and each KMF tells its own KDs.

The admission side of the schedule (nobody before ``starts_at -
early_start``) needs no timer: the KMF checks it on every invitation and key
request (:func:`perc_daemons.store.schedule_status`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from perc_daemons.store import Conference, ConferenceState, ends_by_schedule_at

__all__ = ["ScheduleTimers"]

#: callLater takes any delay, but a wall-clock step is better met by checking again:
#: a timer further away than this re-arms itself when it fires.
MAX_TIMER = 3600.0
#: Seconds between two attempts to load the timers while the store does not answer.
LOAD_RETRY = 10.0


class ScheduleTimers(Service):
    """Keeps one timer per conference with an ``ends_at``; ends it when due."""

    log = Logger()

    def __init__(self, api: Any, clock: IReactorTime,
                 ready: Callable[[], defer.Deferred[None]] | None = None) -> None:
        self.api = api
        self.clock = clock
        #: Fires once the store can be read (StoreService.when_ready); None: at once.
        self._ready = ready
        self._loading: IDelayedCall | None = None
        self._timers: dict[str, IDelayedCall] = {}
        self._ending: set[defer.Deferred[Any]] = set()
        self.setName("schedule")

    def __len__(self) -> int:
        return len(self._timers)

    def due_at(self, conference_id: str) -> float | None:
        timer = self._timers.get(conference_id)
        return None if timer is None else timer.getTime()

    def startService(self) -> None:
        super().startService()
        self.api.on_conference = self.arm
        ready = self._ready() if self._ready is not None else defer.succeed(None)
        ready.addCallback(lambda _: self._load())

    def _load(self) -> None:
        """Arm the timers from the store; tried again every 10 s until it answers (the
        store may be briefly unavailable at start: a conference must still end on time)."""
        self._loading = None
        if not self.running:
            return
        d = defer.ensureDeferred(self.load())

        def failed(f: Any) -> None:
            self.log.failure("perc-kmf: schedule timers not loaded (again in "
                             f"{LOAD_RETRY:.0f} s)", f)
            if self.running:
                self._loading = self.clock.callLater(LOAD_RETRY, self._load)

        d.addErrback(failed)

    def stopService(self) -> defer.Deferred[None]:  # type: ignore[override]
        super().stopService()
        self.api.on_conference = None
        if self._loading is not None and self._loading.active():
            self._loading.cancel()
        self._loading = None
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        return defer.DeferredList(list(self._ending), consumeErrors=True).addCallback(
            lambda _: None)

    async def load(self) -> int:
        """Arm a timer for every stored conference not ended; how many have one."""
        conferences = await self.api.store.list()
        for conference in conferences:
            self.arm(conference)
        if self._timers:
            self.log.info("perc-kmf: {count} conference(s) end by schedule",
                          count=len(self._timers))
        return len(self._timers)

    def arm(self, conference: Conference) -> None:
        """(Re)arm ``conference``'s timer from its record (none if ended or no end)."""
        cid = conference.conference_id
        old = self._timers.pop(cid, None)
        if old is not None and old.active():
            old.cancel()
        when = ends_by_schedule_at(conference)
        if when is None or conference.state is ConferenceState.ENDED or not self.running:
            return
        delay = max(0.0, when - self.clock.seconds())
        self._timers[cid] = self.clock.callLater(min(delay, MAX_TIMER), self._fire, cid)

    def _fire(self, cid: str) -> None:
        self._timers.pop(cid, None)
        d = defer.ensureDeferred(self._end_if_due(cid))
        self._ending.add(d)
        d.addErrback(lambda f: self.log.failure(
            "perc-kmf: conference {conference} not ended by schedule (retrying in 10 s)", f,
            conference=cid))
        d.addErrback(lambda _: self._retry(cid))
        d.addBoth(lambda _: self._ending.discard(d))

    def _retry(self, cid: str) -> None:
        if self.running and cid not in self._timers:
            self._timers[cid] = self.clock.callLater(10.0, self._fire, cid)

    async def _end_if_due(self, cid: str) -> None:
        conference = await self.api.store.get(cid)
        when = ends_by_schedule_at(conference)
        if conference.state is ConferenceState.ENDED or when is None:
            return
        if when > self.clock.seconds():
            self.arm(conference)  # moved later meanwhile, or a long timer's leg
            return
        self.log.info("perc-kmf: conference {conference} ends by schedule (ends_at "
                      "{ends_at}, grace {grace} s)", conference=cid,
                      ends_at=conference.ends_at, grace=conference.grace)
        await self.api.end_conference(cid, "schedule")
