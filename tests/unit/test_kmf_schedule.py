"""perc_daemons.kmf.schedule: conferences end by themselves at ends_at + grace (issue 14).

A real SQLite store and a real KmfApi on a fake clock; the timers are
rebuilt from the store as at a KMF start.
"""

from __future__ import annotations

import os

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from perc_daemons.kmf.api import KmfApi
from perc_daemons.kmf.kek import KeyEncryptionKey
from perc_daemons.kmf.schedule import MAX_TIMER, ScheduleTimers
from perc_daemons.kmf.signing import SigningKeys
from perc_daemons.store import Conference, ConferenceState
from perc_daemons.store.sqlite import SqliteConferenceStore

T0 = 1_700_000_000.0


class ScheduleTimersTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.clock = task.Clock()
        self.clock.advance(T0)
        self.store = yield SqliteConferenceStore.open(os.path.join(self.dir, "kmf.sqlite3"))
        self.addCleanup(self.store.close)
        self.api = KmfApi(store=self.store,
                          kek=KeyEncryptionKey.generate(os.path.join(self.dir, "kek")),
                          keys=SigningKeys.create(os.path.join(self.dir, "signing"), T0),
                          idp_domain="example.com", issuer="https://example.com",
                          clock=self.clock)
        self.events: list[tuple[str, dict]] = []
        self.api.events.subscribe(lambda _id, kind, data: self.events.append((kind, data)))

    @defer.inlineCallbacks
    def running(self, cid: str, **policy):
        yield self.store.create(Conference(cid, "t", "alice@example.com", created_at=T0,
                                           **policy))
        yield self.store.set_state(cid, ConferenceState.RUNNING, T0)
        yield self.api._add_epoch(cid)

    def timers(self) -> ScheduleTimers:
        timers = ScheduleTimers(self.api, self.clock)
        timers.startService()
        self.addCleanup(timers.stopService)
        return timers

    @defer.inlineCallbacks
    def settle(self):
        for _ in range(50):  # the SQLite thread pool answers in real time
            yield task.deferLater(reactor, 0.01, lambda: None)

    @defer.inlineCallbacks
    def test_ends_at_plus_grace_from_the_stored_record(self):
        """Armed at start-up from the store (a KMF restart): ends exactly as
        POST .../end does (keys wiped, conference-ended with cause schedule)."""
        yield self.running("conf-1", ends_at=T0 + 60, grace=30.0)
        yield self.running("open-ended")
        timers = self.timers()
        yield self.settle()
        self.assertEqual((len(timers), timers.due_at("conf-1")), (1, T0 + 90))
        self.clock.advance(89)
        yield self.settle()
        self.assertIs((yield self.store.get("conf-1")).state, ConferenceState.RUNNING)
        self.clock.advance(1)
        yield self.settle()
        self.assertIs((yield self.store.get("conf-1")).state, ConferenceState.ENDED)
        self.assertEqual((yield self.store.epochs("conf-1")), [])
        self.assertIn(("conference-ended", {"conference": "conf-1", "cause": "schedule"}),
                      self.events)
        self.assertIs((yield self.store.get("open-ended")).state, ConferenceState.RUNNING)
        self.assertEqual(len(timers), 0)

    @defer.inlineCallbacks
    def test_a_restart_after_the_end_time_ends_at_once(self):
        yield self.running("conf-1", ends_at=T0 - 600)
        self.timers()
        yield self.settle()
        self.clock.advance(0)
        yield self.settle()
        self.assertIs((yield self.store.get("conf-1")).state, ConferenceState.ENDED)

    @defer.inlineCallbacks
    def test_an_update_rearms_and_a_far_timer_checks_again(self):
        """Moving ends_at (PATCH) moves the timer; a timer beyond MAX_TIMER fires early,
        finds the end not due and re-arms; an ended conference has no timer."""
        timers = self.timers()
        yield self.settle()
        yield self.running("conf-1", ends_at=T0 + 10 * MAX_TIMER)
        conference = yield self.store.get("conf-1")
        self.api._changed(conference)
        self.assertEqual(timers.due_at("conf-1"), T0 + MAX_TIMER)
        self.clock.advance(MAX_TIMER)
        yield self.settle()
        self.assertEqual(timers.due_at("conf-1"), T0 + 2 * MAX_TIMER)
        updated = yield self.store.update("conf-1", {"ends_at": T0 + MAX_TIMER + 5},
                                          self.clock.seconds())
        self.api._changed(updated)
        self.assertEqual(timers.due_at("conf-1"), T0 + MAX_TIMER + 5)
        self.clock.advance(5)
        yield self.settle()
        self.assertIs((yield self.store.get("conf-1")).state, ConferenceState.ENDED)
        self.assertIsNone(timers.due_at("conf-1"))

    @defer.inlineCallbacks
    def test_waits_for_the_store_and_retries(self):
        """The timers wait for the store (a Redis store connects after start-up) and are
        loaded again while it does not answer: a conference still ends on time."""
        from perc_daemons.kmf.schedule import LOAD_RETRY
        from perc_daemons.store import StoreUnavailable

        yield self.running("conf-1", ends_at=T0 + 60)
        ready: defer.Deferred[None] = defer.Deferred()
        real_list = self.store.list
        calls = []

        def flaky_list(*args, **kwargs):
            calls.append(self.clock.seconds())
            if len(calls) == 1:
                return defer.fail(StoreUnavailable("not yet"))
            return real_list(*args, **kwargs)

        self.store.list = flaky_list
        timers = ScheduleTimers(self.api, self.clock, ready=lambda: ready)
        timers.startService()
        self.addCleanup(timers.stopService)
        yield self.settle()
        self.assertEqual((calls, len(timers)), ([], 0))  # not before the store is ready
        ready.callback(None)
        yield self.settle()
        self.assertEqual((len(calls), len(timers)), (1, 0))  # refused: tried again later
        self.flushLoggedErrors(StoreUnavailable)
        self.clock.advance(LOAD_RETRY)
        yield self.settle()
        self.assertEqual((len(calls), timers.due_at("conf-1")), (2, T0 + 60))
