"""Dominant speaker identification (perc_daemons.protocol.speaker).

:class:`Room` plays scripted participants into a :class:`DominantSpeaker` as
20 ms RTP packets would bring their RFC 6464 levels (0 loudest, 127 silence),
and calls :meth:`~DominantSpeaker.poll` at every :meth:`~DominantSpeaker.next_timer`,
recording each change with the time of the decision that made it.
A talking participant's levels vary around -20..-35 dBov over a microphone
noise floor of -75 dBov, as a real one does.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from perc_daemons.protocol.errors import ProtocolError
from perc_daemons.protocol.speaker import (
    _IMMEDIATE,
    _LONG,
    _MEDIUM,
    AudioLevelOutOfRange,
    DominantSpeaker,
    InvalidTime,
)

PACKET = 0.02
SPEECH = (30, 25, 20, 35, 28)
NOISE = 75
SILENCE = 127

Script = Callable[[float, int], int | None]


def talking(*spans: tuple[float, float], quiet: int | None = NOISE) -> Script:
    """Speech levels during the [start, end) spans, else *quiet* (None: no packet)."""

    def level(t: float, k: int) -> int | None:
        if any(start <= t + 1e-9 < end for start, end in spans):
            return SPEECH[k % len(SPEECH)]
        return quiet

    return level


class Room:
    def __init__(self, detector: DominantSpeaker | None = None) -> None:
        self.detector = detector if detector is not None else DominantSpeaker()
        self.changes: list[tuple[float, Hashable]] = []
        self.k = 0

    def play(self, scripts: dict[Hashable, Script], until: float) -> Room:
        while (t := self.k * PACKET) < until - 1e-9:
            self.run_timers(t)
            for source, script in scripts.items():
                level = script(t, self.k)
                if level is not None:
                    self.detector.level(source, level, t)
            self.run_timers(t)
            self.k += 1
        return self

    def run_timers(self, now: float) -> None:
        detector = self.detector
        while (due := detector.next_timer()) is not None and due <= now + 1e-9:
            changed = detector.poll(due)
            if changed is not None:
                self.changes.append((round(due, 6), changed))

    @property
    def who(self) -> list[Hashable]:
        return [source for _, source in self.changes]


class Decisions(unittest.TestCase):
    def test_a_single_speaker_is_dominant_at_the_first_decision(self) -> None:
        room = Room().play({"A": talking((0, 1))}, 1)
        self.assertEqual(room.changes, [(0.0, "A")])
        self.assertEqual(room.detector.dominant, "A")

    def test_a_second_speaker_talking_for_two_seconds_takes_over_when_the_first_stops(self) -> None:
        room = Room().play({"A": talking((0, 2)), "B": talking((2, 4))}, 4)
        self.assertEqual(room.who, ["A", "B"])
        # When B's share of the last second outgrows A's: about half a second.
        self.assertEqual(room.changes[1][0], 2.7)

    def test_into_a_long_silence_a_few_hundred_ms_of_speech_take_over(self) -> None:
        room = Room().play({"A": talking((0, 1)), "B": talking((3.0, 5))}, 5)
        self.assertEqual(room.who, ["A", "B"])
        self.assertLessEqual(room.changes[1][0], 3.4)

    def test_talking_over_the_dominant_wins_at_its_first_pause(self) -> None:
        room = Room().play({"A": talking((0, 3)), "B": talking((1, 5))}, 5)
        # Decisions at 3.0 (A loud a moment ago), 3.3 (A quiet for 300 ms).
        self.assertEqual(room.changes, [(0.0, "A"), (3.3, "B")])

    def test_the_dominant_keeps_the_floor_while_talking(self) -> None:
        room = Room().play({"A": talking((0, 4)), "B": talking((1, 4))}, 4)
        self.assertEqual(room.who, ["A"])

    def test_a_100ms_cough_in_the_dominants_pause_does_not_take_over(self) -> None:
        # Every phase of the cough against the 300 ms decision grid.
        for phase in range(15):
            start = 2.0 + phase * PACKET
            room = Room().play({
                "A": talking((0, 2), (2.4, 4)),
                "B": talking((start, start + 0.1)),
            }, 4)
            self.assertEqual(room.who, ["A"], f"cough at {start}")

    def test_a_100ms_cough_over_the_dominants_speech_does_not_take_over(self) -> None:
        for phase in range(15):
            start = 2.0 + phase * PACKET
            room = Room().play({"A": talking((0, 4)), "B": talking((start, start + 0.1))}, 4)
            self.assertEqual(room.who, ["A"], f"cough at {start}")

    def test_a_burst_shorter_than_a_medium_block_never_wins_even_in_silence(self) -> None:
        for phase in range(15):
            start = 3.0 + phase * PACKET
            room = Room().play({"A": talking((0, 1)), "B": talking((start, start + 0.08))}, 5)
            self.assertEqual(room.who, ["A"], f"burst at {start}")

    def test_of_two_challengers_the_one_louder_on_the_medium_scale_wins(self) -> None:
        # Both start into A's silence at 2.0. At the decision of 2.1 neither
        # qualifies (B's newest level dips, C has no whole loud block); at 2.4
        # both do, B with 5 loud levels of the newest 5, C with 4.
        scripts = {
            "B": lambda t, k: NOISE if t < 2 or k == 104 else SPEECH[k % 5],
            "C": lambda t, k: NOISE if t < 2 or k in (103, 118) else SPEECH[k % 5],
        }
        for order in (("B", "C"), ("C", "B")):
            room = Room().play({"A": talking((0, 1))} | {s: scripts[s] for s in order}, 3)
            self.assertEqual(room.changes, [(0.0, "A"), (2.4, "B")], order)

    def test_the_noise_floor_rises_with_a_louder_room(self) -> None:
        # B's first level is quiet; then a hum that counts as speech against
        # that floor. The floor rises towards the hum (a geometric mean per
        # 15 s window), so when A stops after 100 s the hum does not win.
        room = Room().play({
            "A": talking((0, 100)),
            "B": lambda t, k: 110 if k == 0 else (40 if k % 2 else 42),
        }, 103)
        self.assertEqual(room.who, ["A"])

    def test_a_steady_hum_is_the_noise_floor_not_speech(self) -> None:
        # B's microphone sits at -40 dBov: loud enough to be "speech" if the
        # noise floor were not tracked (the same levels preceded by a quiet
        # floor do take over, below).
        hum = Room().play({"A": talking((0, 1)), "B": lambda t, k: 40 if k % 2 else 42}, 5)
        self.assertEqual(hum.who, ["A"])
        quiet_first = Room().play({
            "A": talking((0, 1)),
            "B": lambda t, k: NOISE if t < 2 else (40 if k % 2 else 42),
        }, 5)
        self.assertEqual(quiet_first.who, ["A", "B"])

    def test_silence_keeps_the_last_dominant(self) -> None:
        room = Room().play({"A": talking((0, 1), quiet=SILENCE),
                            "B": talking(quiet=SILENCE),
                            "C": talking((0, 0.5), quiet=SILENCE)}, 10)
        self.assertEqual(room.who, ["A"])
        self.assertEqual(room.detector.dominant, "A")

    def test_sources_that_stop_sending_fade_out_and_the_dominant_stays(self) -> None:
        # B says something while A talks, then stops sending (muted). Its last
        # loud levels must time out, or once A is quiet they would win.
        room = Room().play({
            "A": talking((0, 1)),
            "B": lambda t, k: NOISE if t < 0.4 else SPEECH[k % 5] if t < 0.6 else None,
        }, 4)
        self.assertEqual(room.who, ["A"])

    def test_a_challenger_quiet_at_the_decision_instant_does_not_take_over(self) -> None:
        # Immediate scale (C1): B talks for 2 s after A stops, but its newest
        # level before every decision (each 15th packet) is a dip.
        dips = Room().play({
            "A": talking((0, 2)),
            "B": lambda t, k: NOISE if t < 2 or (k + 1) % 15 == 0 else SPEECH[k % 5],
        }, 4)
        self.assertEqual(dips.who, ["A"])

    def test_a_dominant_loud_within_the_last_100ms_keeps_the_floor(self) -> None:
        # Medium scale (C2): after 1 s A is loud on every third packet only,
        # never at a decision instant and never for a whole 100 ms block; B
        # talks throughout and is louder on the immediate and long scales.
        room = Room().play({
            "A": lambda t, k: SPEECH[k % 5] if t < 1 or k % 3 == 0 else NOISE,
            "B": talking((1, 4)),
        }, 4)
        self.assertEqual(room.who, ["A"])

    def test_levels_from_unknown_sources_create_them(self) -> None:
        detector = DominantSpeaker()
        self.assertEqual(len(detector), 0)
        detector.level(0x1234, 20, 1.0)
        detector.level(("mid", "0"), SILENCE, 1.0)
        self.assertIn(0x1234, detector)
        self.assertIn(("mid", "0"), detector)
        self.assertEqual(len(detector), 2)
        self.assertCountEqual(detector.recent(5), [0x1234, ("mid", "0")])

    def test_a_late_level_is_ignored(self) -> None:
        room = Room().play({"A": talking((0, 1))}, 1)
        room.play({"B": talking(quiet=SILENCE)}, 1.5)
        # A loud level dated before A's last does not enter A's history.
        before = room.detector._sources["A"].levels.copy()
        room.detector.level("A", 0, 0.5)
        self.assertEqual(room.detector._sources["A"].levels, before)


class Scores(unittest.TestCase):
    def test_speech_activity_scores_are_jitsis(self) -> None:
        # ln C(n, v) + n ln 0.5 - ln lambda + lambda v, floored at 1e-10;
        # values worked out separately from N1 = 13, N2 = 5, N3 = 10 and lambda
        # 0.78, 24, 47.
        self.assertEqual(_IMMEDIATE[:4], (1e-10,) * 4)
        self.assertAlmostEqual(_IMMEDIATE[9], 4.8298, places=3)
        self.assertAlmostEqual(_IMMEDIATE[12], 3.1625, places=3)
        self.assertEqual(_MEDIUM[0], 1e-10)
        self.assertAlmostEqual(_MEDIUM[1], 18.9656, places=3)
        self.assertAlmostEqual(_MEDIUM[5], 113.3562, places=3)
        self.assertEqual(_LONG[0], 1e-10)
        self.assertAlmostEqual(_LONG[1], 38.5210, places=3)
        self.assertAlmostEqual(_LONG[10], 459.2184, places=3)


class Removal(unittest.TestCase):
    def test_removing_the_dominant_hands_dominance_on_at_the_next_decision(self) -> None:
        room = Room().play({"A": talking((0, 2)), "B": talking((0.5, 2)), "C": talking()}, 2)
        self.assertEqual(room.detector.dominant, "A")
        room.detector.remove("A")
        self.assertIsNone(room.detector.dominant)
        self.assertNotIn("A", room.detector)
        room.play({"B": talking((0.5, 3)), "C": talking()}, 2.4)
        # B talked most of the last second; it is the nominee and nobody beats it.
        self.assertEqual(room.changes[-1], (2.1, "B"))
        self.assertEqual(room.detector.recent(3), ["B", "C"])

    def test_removing_the_dominant_hands_dominance_to_the_previous_one(self) -> None:
        # C, the first source, is the nominee of the first decision (nobody
        # has spoken yet); then A, B and A again take over. When A leaves
        # with everybody quiet, the previous dominant (B), not the first
        # source (C), is the nominee and nobody challenges it.
        room = Room().play({
            "C": talking(),
            "A": talking((0.2, 1.5), (3.5, 5)),
            "B": talking((1.5, 3.5)),
        }, 6)
        self.assertEqual(room.changes, [(0.0, "C"), (0.3, "A"), (2.1, "B"), (4.2, "A")])
        self.assertEqual(room.detector.recent(3), ["A", "B", "C"])
        room.detector.remove("A")
        room.play({"C": talking(), "B": talking()}, 6.6)
        self.assertEqual(room.changes[-1], (6.0, "B"))
        self.assertEqual(room.detector.recent(3), ["B", "C"])

    def test_removing_unknown_or_the_last_source(self) -> None:
        detector = DominantSpeaker()
        detector.remove("nobody")
        detector.level("A", 20, 0.0)
        self.assertEqual(detector.poll(0.0), "A")
        detector.remove("A")
        self.assertIsNone(detector.dominant)
        self.assertIsNone(detector.next_timer())
        self.assertEqual(detector.recent(3), [])
        self.assertIsNone(detector.poll(10.0))

    def test_a_source_silent_for_the_idle_timeout_is_forgotten_unless_dominant(self) -> None:
        detector = DominantSpeaker(source_idle_timeout=2.0)
        room = Room(detector).play({"A": talking((0, 1)), "B": talking((0, 0.1), quiet=None)}, 1)
        self.assertIn("B", detector)
        room.play({"A": talking(quiet=None)}, 3)
        self.assertNotIn("B", detector)
        room.play({}, 6)
        self.assertIn("A", detector)
        self.assertEqual(detector.dominant, "A")


class Recent(unittest.TestCase):
    def test_recent_dominants_first_then_the_others_by_activity(self) -> None:
        room = Room().play({
            "A": talking((0, 1)),
            "B": talking((1, 3)),
            "C": talking((3, 5)),
            "D": lambda t, k: SPEECH[0] if t >= 5 and k % 3 == 0 else NOISE,  # murmurs
            "E": talking(),
        }, 5.5)
        self.assertEqual(room.who, ["A", "B", "C"])
        detector = room.detector
        self.assertEqual(detector.recent(5), ["C", "B", "A", "D", "E"])
        self.assertEqual(detector.recent(2), ["C", "B"])
        self.assertEqual(detector.recent(4), ["C", "B", "A", "D"])
        self.assertEqual(detector.recent(10), ["C", "B", "A", "D", "E"])
        self.assertEqual(detector.recent(0), [])
        detector.remove("B")
        self.assertEqual(detector.recent(5), ["C", "A", "D", "E"])

    def test_a_returning_dominant_moves_to_the_front_once(self) -> None:
        room = Room().play({"A": talking((0, 1), (3, 5)), "B": talking((1, 3))}, 5)
        self.assertEqual(room.who, ["A", "B", "A"])
        self.assertEqual(room.detector.recent(3), ["A", "B"])

    def test_others_without_recent_levels_rank_below_active_ones(self) -> None:
        detector = DominantSpeaker()
        detector.level("old", 90, 0.0)
        detector.level("old", 20, 0.02)
        detector.level("new", 90, 1.0)
        detector.level("new", 80, 1.02)
        # "old" spoke louder, but a second ago; "new" is above its floor now.
        self.assertEqual(detector.recent(2), ["new", "old"])


class Timing(unittest.TestCase):
    def test_next_timer_and_poll_with_explicit_times(self) -> None:
        detector = DominantSpeaker()
        self.assertIsNone(detector.next_timer())
        self.assertIsNone(detector.poll(5.0))
        detector.level("A", 20, 10.0)
        self.assertEqual(detector.next_timer(), 10.0)
        self.assertIsNone(detector.poll(9.5))
        self.assertIsNone(detector.dominant)
        self.assertEqual(detector.poll(10.0), "A")
        # Level timeouts every 40 ms, decisions every 300 ms.
        times = []
        while (due := detector.next_timer()) is not None and due < 10.65:
            times.append(round(due, 6))
            self.assertIsNone(detector.poll(due))
        self.assertEqual(times, [10.04, 10.08, 10.12, 10.16, 10.2, 10.24, 10.28,
                                 10.3, 10.32, 10.36, 10.4, 10.44, 10.48, 10.52,
                                 10.56, 10.6, 10.6, 10.64])

    def test_timers_stop_after_fifteen_seconds_without_levels_and_restart(self) -> None:
        detector = DominantSpeaker()
        detector.level("A", 20, 0.0)
        detector.level("B", 20, 0.0)
        last = 0.0
        while (due := detector.next_timer()) is not None and due < 100:
            detector.poll(due)
            last = due
        self.assertIsNone(detector.next_timer())
        self.assertTrue(15.0 <= last < 15.3 + 1e-6, last)
        self.assertEqual(detector.dominant, "A")
        detector.level("B", 30, 200.0)
        self.assertEqual(detector.next_timer(), 200.0)

    def test_a_late_poll_makes_one_decision_and_returns(self) -> None:
        detector = DominantSpeaker()
        for k in range(100):
            detector.level("A", SPEECH[k % 5], k * PACKET)
            detector.level("B", NOISE, k * PACKET)
        self.assertEqual(detector.poll(2.0), "A")
        self.assertGreater(detector.next_timer(), 2.0)

    def test_a_change_is_reported_once(self) -> None:
        room = Room().play({"A": talking((0, 2)), "B": talking((2, 4))}, 4)
        self.assertEqual(room.who.count("B"), 1)


class BadInput(unittest.TestCase):
    def test_levels_outside_0_to_127_raise_value_error(self) -> None:
        detector = DominantSpeaker()
        for bad in (-1, 128, 1000, 1.5, "20", None, True):
            with self.assertRaises(ValueError) as caught:
                detector.level("A", bad, 0.0)  # type: ignore[arg-type]
            self.assertIsInstance(caught.exception, AudioLevelOutOfRange)
            self.assertIsInstance(caught.exception, ProtocolError)
            self.assertEqual(caught.exception.reason, "audio_level_out_of_range")
        self.assertEqual(len(detector), 0)
        detector.level("A", 0, 0.0)
        detector.level("A", 127, 0.0)
        self.assertEqual(len(detector), 1)

    def test_non_finite_times_raise_value_error(self) -> None:
        detector = DominantSpeaker()
        for bad in (float("nan"), float("inf"), None):
            with self.assertRaises(InvalidTime):
                detector.level("A", 20, bad)  # type: ignore[arg-type]
            with self.assertRaises(ValueError):
                detector.poll(bad)  # type: ignore[arg-type]

    def test_bad_parameters(self) -> None:
        for kwargs in ({"decision_interval": 0}, {"level_idle_timeout": -1},
                       {"energy_alpha": 0}, {"idle_stop": float("nan")}):
            with self.assertRaises(ValueError):
                DominantSpeaker(**kwargs)


operations = st.lists(
    st.one_of(
        st.tuples(st.just("level"), st.integers(0, 5), st.integers(0, 127),
                  st.floats(0, 0.5)),
        st.tuples(st.just("poll"), st.just(0), st.just(0), st.floats(0, 2)),
        st.tuples(st.just("timers"), st.just(0), st.just(0), st.floats(0, 2)),
        st.tuples(st.just("remove"), st.integers(0, 5), st.just(0), st.just(0.0)),
    ),
    max_size=300,
)


class Properties(unittest.TestCase):
    @settings(max_examples=200, deadline=None)
    @given(operations, st.integers(0, 8))
    def test_random_level_streams_never_raise_and_keep_dominant_known(self, ops, n) -> None:
        detector = DominantSpeaker()
        now = 0.0
        for op, source, level, dt in ops:
            now += dt
            if op == "level":
                detector.level(source, level, now)
            elif op == "poll":
                changed = detector.poll(now)
                if changed is not None:
                    self.assertEqual(changed, detector.dominant)
            elif op == "timers":
                while (due := detector.next_timer()) is not None and due <= now:
                    detector.poll(due)
            else:
                detector.remove(source)
            if detector.dominant is not None:
                self.assertIn(detector.dominant, detector)
            recent = detector.recent(n)
            self.assertEqual(len(recent), min(n, len(detector)))
            self.assertEqual(len(set(recent)), len(recent))
            self.assertTrue(all(s in detector for s in recent))
            if detector.dominant is not None and n:
                self.assertEqual(recent[0], detector.dominant)
            timer = detector.next_timer()
            self.assertTrue(timer is None or len(detector) > 0)
