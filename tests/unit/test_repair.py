"""Tests for perc_daemons.protocol.repair: send history and NACK scheduling (RFC 4585)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from perc_daemons.protocol.repair import (
    GIVE_UP,
    MAX_GAP,
    MAX_RETRIES,
    REORDER_DELAY,
    RETRY_INTERVAL,
    NackTracker,
    SendHistory,
)

PROPERTY = settings(max_examples=200, deadline=None)


class SendHistoryTests(unittest.TestCase):
    def test_keeps_the_last_size_datagrams(self) -> None:
        history = SendHistory(4)
        for seq in range(65533, 65536 + 3):
            history.add(seq % 65536, bytes([seq % 256]))
        self.assertEqual(len(history), 4)
        self.assertIsNone(history.get(65533))
        self.assertIsNone(history.get(65534))
        self.assertEqual(history.get(65535), bytes([255]))
        self.assertEqual(history.get(2), bytes([2]))
        history.add(65535, b"again")  # a number reused moves to the newest place
        history.add(3, b"3")
        self.assertEqual(history.get(65535), b"again")
        self.assertIsNone(history.get(0))
        history.clear()
        self.assertEqual(len(history), 0)
        self.assertRaises(ValueError, SendHistory, 0)


class NackTrackerTests(unittest.TestCase):
    def test_reorder_wait_then_request_retries_and_give_up(self) -> None:
        t = NackTracker()
        t.received(10, 0.0)
        t.received(13, 1.0)  # 11 and 12 missing
        self.assertEqual(t.next_timer(), 1.0 + REORDER_DELAY)
        self.assertEqual(t.due(1.0 + REORDER_DELAY / 2), [])
        self.assertFalse(t.received(11, 1.005))  # reordered, never requested: not recovered
        self.assertEqual(t.due(1.0 + REORDER_DELAY), [12])
        self.assertEqual(t.nacked, 1)
        times = [1.0 + REORDER_DELAY + RETRY_INTERVAL * i for i in range(1, MAX_RETRIES + 1)]
        for when in times:
            self.assertEqual(t.next_timer(), when)
            self.assertEqual(t.due(when), [12])
        self.assertEqual(t.next_timer(), 1.0 + GIVE_UP)  # no more requests
        self.assertEqual(t.due(1.0 + GIVE_UP - 0.001), [])
        self.assertEqual((t.due(1.0 + GIVE_UP), t.given_up, t.pending), ([], 1, 0))
        self.assertIsNone(t.next_timer())
        self.assertFalse(t.received(12, 2.0))  # too late: nothing pending any more
        self.assertEqual((t.nacked, t.recovered), (1, 0))

    def test_late_arrival_of_a_requested_number_is_recovered(self) -> None:
        t = NackTracker()
        t.received(65535, 0.0)
        t.received(1, 0.0)  # wraps: 0 missing
        self.assertEqual(t.due(REORDER_DELAY), [0])
        self.assertTrue(t.received(0, 0.03))
        self.assertEqual((t.recovered, t.pending, t.next_timer()), (1, 0, None))
        self.assertFalse(t.received(0, 0.04))  # a duplicate counts once

    def test_a_jump_is_not_loss(self) -> None:
        t = NackTracker()
        t.received(100, 0.0)
        t.received(102, 0.0)
        t.received(102 + MAX_GAP + 2, 0.0)
        self.assertEqual((t.pending, t.given_up), (0, 1))
        t.received(102 + MAX_GAP + 3, 0.0)
        self.assertEqual(t.due(1.0), [])

    @PROPERTY
    @given(st.lists(st.tuples(st.integers(0, 65535), st.floats(0, 0.2)), max_size=60),
           st.integers(0, 65535))
    def test_any_arrivals_request_each_number_at_most_three_times(
            self, arrivals: list[tuple[int, float]], start: int) -> None:
        t = NackTracker()
        now = 0.0
        requests: dict[int, int] = {}
        t.received(start, now)
        for seq, step in arrivals:
            now += step
            t.received((start + seq % 300) % 65536, now)
            for number in t.due(now):
                requests[number] = requests.get(number, 0) + 1
            timer = t.next_timer()
            self.assertTrue(timer is None or timer >= now - 1.0)
        for _ in range(30):
            now += RETRY_INTERVAL
            for number in t.due(now):
                requests[number] = requests.get(number, 0) + 1
        self.assertEqual((t.pending, t.next_timer()), (0, None))
        self.assertTrue(all(1 <= n <= 1 + MAX_RETRIES for n in requests.values()))
        self.assertLessEqual(t.recovered, t.nacked)
        self.assertEqual(t.nacked, len(requests))
