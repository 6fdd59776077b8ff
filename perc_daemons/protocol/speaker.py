"""Dominant speaker identification from RTP audio levels, for the MD's SFU.

:class:`DominantSpeaker` implements the algorithm of I. Volfin and I. Cohen,
"Dominant Speaker Identification for Multipoint Videoconferencing" (IEEE
27th Convention of Electrical and Electronics Engineers in Israel, 2012), in
the form Jitsi Videobridge runs it (``DominantSpeakerIdentification`` in
jitsi-utils, formerly libjitsi): same constants, same scores, same decision
rule, same noise-floor tracking and level timeouts. It is sans-I/O: audio
levels and an explicit ``now`` (seconds, any monotonic origin) go in,
decisions come out of :meth:`DominantSpeaker.poll`, and
:meth:`DominantSpeaker.next_timer` says when to call it next. No clock, no
reactor, no logging.

Input
-----
Levels are RFC 6464 section 3 client-to-mixer audio levels: 0..127, the level
in -dBov, so 0 is the loudest and 127 silence. Like Jitsi, the detector works
on ``127 - level`` (0 = silence, 127 = loudest); the voice activity bit is not
used. A source is any hashable (the MD uses the sender's audio SSRC); a level
from an unknown source creates it, :meth:`DominantSpeaker.remove` forgets it.

The three time scales
---------------------
Each source keeps its last 50 levels (one a packet, so one second of 20 ms
packets). A level below the source's noise floor plus 10 counts as silence,
and the rest are cut into 13 sub-bands of 10 steps (``N1``). Then, at each
decision:

* **immediate** (the newest level): how loud the source is right now;
* **medium** (the newest 5 levels, 100 ms): how many of them are "loud", i.e.
  above sub-band 7 (a level above about -47 dBov and clear of the noise
  floor);
* **long** (all 10 blocks of 5 levels, one second): how many of the 100 ms
  blocks were loud throughout.

Each count becomes a speech activity score, the log-likelihood ratio of a
binomial model of active sub-units (p = 0.5) against an exponential prior
(lambda 0.78, 24 and 47 for the three scales), floored at 1e-10.

The decision
------------
Every 300 ms a challenger replaces the dominant speaker only if, on all three
scales at once, the log of its score over the dominant's exceeds ``C1 = 3``
(immediate), ``C2 = 2`` (medium) and ``C3 = 0`` (long); among several such
challengers the one with the largest medium margin wins. With Jitsi's score
tables that means, for a user:

* the dominant speaker keeps the floor while they talk: a challenger cannot
  win while the dominant has had a loud packet in the last 100 ms (medium),
  nor while the dominant is loud right now (immediate);
* when the dominant pauses for 100 ms, a challenger who is talking right now
  takes over if they had more loud 100 ms blocks than the dominant in the last
  second (long). So someone who has talked over the dominant for a second
  takes over at the first decision after the dominant's first 100 ms pause;
  someone who starts as the dominant stops takes over about half a second
  later (when their share of the last second outgrows the dominant's); into a
  silence of a second or more, 100 to 400 ms of speech is enough (the first
  decision once a whole loud block is in and they are still talking);
* a cough (one burst of 100 ms or less) is at most one loud block: it does not
  take the floor from anyone with a loud block in the last second, and a burst
  shorter than 100 ms never wins. In a room silent for a whole second, a 100
  ms burst of 20 ms packets wins only if it ends exactly at a decision (once
  in 15 phases; a 200 ms one in 6 of 15): silence has no floor to defend;
* silence changes nothing: the last dominant speaker stays dominant (Jitsi's
  optional switch to "silence" is not implemented) until a challenger wins or
  the source is removed.

Noise floor and timeouts
------------------------
Per source, the minimum non-silent level is the noise floor: it drops at once
to any lower level, and rises slowly, to the geometric mean of the floor and
the lowest level of a window of 750 levels (15 s of 20 ms packets) that never
went below it. So a steady hum or a noisy microphone does not count as speech.
A source that sent no level for 40 ms gets a silent level every 40 ms (muted,
discontinuous transmission or packet loss fades out instead of freezing); a
non-dominant source silent for an hour is forgotten. Levels older than the
source's last one are ignored. After 15 s without any level the timers stop
(:meth:`~DominantSpeaker.next_timer` is None) until the next level.

Privacy
-------
To do this the MD learns who speaks when, from the audio level header
extension, which the double transform leaves readable to it (RFC 6464 section
5, RFC 8723: header extensions are not covered by the inner layer). RFC 8871
section 4.3 lets the MD see this metadata: it is semi-trusted, trusted to
forward media and not to read it. The speaker hint it sends to the endpoints
(RTCP APP "PERC") is the MD's opinion, not a signed fact: an endpoint may use
it to pick video, but must not treat it as proof of who spoke.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable

from perc_daemons.protocol.errors import ProtocolError

__all__ = [
    "AudioLevelOutOfRange",
    "DominantSpeaker",
    "InvalidTime",
    "SpeakerError",
]

#: The highest (loudest) level after the RFC 6464 level is turned around.
MAX_LEVEL = 127

#: Sub-bands of the level range evaluated for immediate activity (Jitsi ``N1``),
#: and the width of one, in level steps.
N1 = 13
N1_SUBUNIT = (MAX_LEVEL + N1 - 1) // N1  # 10

#: Levels in one medium block (``N2``) and medium blocks in the long interval (``N3``).
N2 = 5
N3 = 10

#: The level history of a source: one long interval of levels.
HISTORY = N2 * N3

#: A level is "loud" for the medium score above this sub-band; a medium block
#: is "loud" for the long score with more loud levels than this.
MEDIUM_THRESHOLD = 7
LONG_THRESHOLD = 4

#: The floor of every speech activity score (Jitsi ``MIN_SPEECH_ACTIVITY_SCORE``):
#: positive, as scores are divided and their logarithm taken.
MIN_SCORE = 1e-10

#: Levels watched before the noise floor may rise (15 s of 20 ms packets).
MIN_LEVEL_WINDOW = 15 * 1000 // 20


def _score(active: int, total: int, lam: float) -> float:
    """The speech activity score of *active* of *total* sub-units (p = 0.5)."""
    score = (
        math.log(math.comb(total, active))
        + total * math.log(0.5)
        - math.log(lam)
        + lam * active
    )
    return max(score, MIN_SCORE)


_IMMEDIATE = tuple(_score(v, N1, 0.78) for v in range(N1 + 1))
_MEDIUM = tuple(_score(v, N2, 24.0) for v in range(N2 + 1))
_LONG = tuple(_score(v, N3, 47.0) for v in range(N3 + 1))


class SpeakerError(ProtocolError, ValueError):
    """Input the dominant speaker identification cannot take."""

    reason = "speaker_input_invalid"


class AudioLevelOutOfRange(SpeakerError):
    """A level that is not an integer 0..127 (RFC 6464 section 3)."""

    reason = "audio_level_out_of_range"


class InvalidTime(SpeakerError):
    """A ``now`` that is not a finite number."""

    reason = "time_invalid"


def _check_time(now: float) -> float:
    if isinstance(now, bool) or not isinstance(now, (int, float)) or not math.isfinite(now):
        raise InvalidTime(f"time {now!r} is not a finite number")
    return float(now)


class _Source:
    """What the detector keeps of one source (Jitsi's ``Speaker``)."""

    __slots__ = (
        "energy",
        "last_level_time",
        "levels",
        "min_level",
        "next_min_count",
        "next_min_level",
        "order",
    )

    def __init__(self, now: float, order: int) -> None:
        self.last_level_time = now
        #: Turned-around levels (0 = silence), newest first.
        self.levels: deque[int] = deque(maxlen=HISTORY)
        #: The noise floor; 0 while none is known.
        self.min_level = 0
        self.next_min_level = 0
        self.next_min_count = 0
        #: Exponentially smoothed level above the noise floor, for recent().
        self.energy = 0.0
        self.order = order

    def push(self, level: int) -> int:
        """Record a turned-around level; return it, or 0 if it is within the noise floor."""
        self.levels.appendleft(level)
        self._update_min_level(level)
        return level if level >= self.min_level + N1_SUBUNIT else 0

    def _update_min_level(self, level: int) -> None:
        if level == 0:
            return
        if self.min_level == 0 or level < self.min_level:
            self.min_level = level
            self.next_min_level = 0
            self.next_min_count = 0
            return
        if self.next_min_level == 0 or level < self.next_min_level:
            self.next_min_level = level
        self.next_min_count += 1
        if self.next_min_count >= MIN_LEVEL_WINDOW:
            # The geometric mean raises the floor slowly: it tracks a minimum.
            self.min_level = min(MAX_LEVEL, int(math.sqrt(self.min_level * self.next_min_level)))
            self.next_min_level = 0
            self.next_min_count = 0

    def scores(self) -> tuple[float, float, float]:
        """The immediate, medium and long speech activity scores now."""
        floor = self.min_level + N1_SUBUNIT
        immediate = medium = longs = loud = 0
        for i, level in enumerate(self.levels):
            band = level // N1_SUBUNIT if level >= floor else 0
            if i == 0:
                immediate = band
            if band > MEDIUM_THRESHOLD:
                loud += 1
            if i % N2 == N2 - 1:
                if i == N2 - 1:
                    medium = loud
                if loud > LONG_THRESHOLD:
                    longs += 1
                loud = 0
        if len(self.levels) < N2:
            medium = loud
        return _IMMEDIATE[immediate], _MEDIUM[medium], _LONG[longs]


class DominantSpeaker:
    """Who is speaking in a conference, from the senders' audio levels.

    Feed every RFC 6464 level with :meth:`level`; call :meth:`poll` at
    :meth:`next_timer` (or later); read :attr:`dominant` and :meth:`recent`.
    The parameters default to Jitsi's values (see the module docstring).
    """

    def __init__(
        self,
        *,
        decision_interval: float = 0.3,
        c1: float = 3.0,
        c2: float = 2.0,
        c3: float = 0.0,
        level_idle_timeout: float = 0.04,
        source_idle_timeout: float = 3600.0,
        idle_stop: float = 15.0,
        energy_alpha: float = 0.5,
        energy_expire: float = 0.15,
    ) -> None:
        """Set the timing and thresholds.

        *decision_interval*: seconds between decisions. *c1*, *c2*, *c3*: the
        margins (natural log of the score ratio) a challenger must exceed on
        the immediate, medium and long scales. *level_idle_timeout*: a source
        without a level for this long gets a silent level at each such tick.
        *source_idle_timeout*: a non-dominant source without a level for this
        long is forgotten. *idle_stop*: with no level at all for this long the
        timers stop until the next level. *energy_alpha* and *energy_expire*:
        the smoothing of the level used to order non-dominant sources in
        :meth:`recent`, and how long after its last level a source still
        counts as active there.
        """
        for name, value in (("decision_interval", decision_interval),
                            ("level_idle_timeout", level_idle_timeout),
                            ("source_idle_timeout", source_idle_timeout),
                            ("idle_stop", idle_stop)):
            if not value > 0:
                raise ValueError(f"{name} must be positive, not {value!r}")
        if not 0 < energy_alpha <= 1:
            raise ValueError(f"energy_alpha must be in (0, 1], not {energy_alpha!r}")
        self.decision_interval = decision_interval
        self.c1, self.c2, self.c3 = c1, c2, c3
        self.level_idle_timeout = level_idle_timeout
        self.source_idle_timeout = source_idle_timeout
        self.idle_stop = idle_stop
        self.energy_alpha = energy_alpha
        self.energy_expire = energy_expire
        self._sources: dict[Hashable, _Source] = {}
        self._dominant: Hashable | None = None
        #: Sources that have been dominant, least recently dominant first.
        self._history: dict[Hashable, None] = {}
        self._next_decision: float | None = None
        self._next_idle: float | None = None
        self._last_level = -math.inf
        self._now = -math.inf
        self._created = 0

    @property
    def dominant(self) -> Hashable | None:
        """The dominant source, or None before the first decision or after its removal."""
        return self._dominant

    def __len__(self) -> int:
        return len(self._sources)

    def __contains__(self, source: object) -> bool:
        return source in self._sources

    def level(self, source: Hashable, level: int, now: float) -> None:
        """Take an RFC 6464 level (0 loudest .. 127 silence) of *source* at *now*.

        Raises :class:`AudioLevelOutOfRange` (a ValueError) for anything but
        an integer 0..127. A level older than the source's last is ignored.
        """
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= MAX_LEVEL:
            raise AudioLevelOutOfRange(f"audio level {level!r} is not an integer 0..127")
        now = _check_time(now)
        record = self._sources.get(source)
        if record is None:
            record = self._sources[source] = _Source(now, self._created)
            self._created += 1
        elif now < record.last_level_time:
            return
        record.last_level_time = now
        cooked = record.push(MAX_LEVEL - level)
        alpha = self.energy_alpha
        record.energy = alpha * cooked + (1 - alpha) * record.energy
        self._now = max(self._now, now)
        self._last_level = max(self._last_level, now)
        if self._next_decision is None:
            # Start deciding now, as Jitsi's decision maker does when it starts.
            self._next_decision = now
            self._next_idle = now + self.level_idle_timeout

    def remove(self, source: Hashable) -> None:
        """Forget *source* (its participant left); unknown sources are ignored.

        If it was dominant, :attr:`dominant` is None until the next decision
        hands dominance to another source.
        """
        if self._sources.pop(source, None) is None:
            return
        self._history.pop(source, None)
        if self._dominant == source:
            self._dominant = None
        if not self._sources:
            self._next_decision = self._next_idle = None

    def next_timer(self) -> float | None:
        """When :meth:`poll` has work next, or None while there is none."""
        if self._next_decision is None or self._next_idle is None:
            return None
        return min(self._next_decision, self._next_idle)

    def poll(self, now: float) -> Hashable | None:
        """Run the level timeouts and decisions due by *now*, in time order.

        Returns the new dominant source if it changed, else None. A late call
        catches up: at most one decision for all the missed ones, and no more
        silent levels than fill a history.
        """
        now = _check_time(now)
        self._now = max(self._now, now)
        before = self._dominant
        if self._next_decision is not None and self._next_decision < now - self.decision_interval:
            self._next_decision = now
        lag = HISTORY * self.level_idle_timeout
        if self._next_idle is not None and self._next_idle < now - lag:
            self._next_idle = now - lag
        while self._next_decision is not None and self._next_idle is not None:
            if self._next_idle <= self._next_decision and self._next_idle <= now:
                tick = self._next_idle
                self._timeout_levels(tick)
                self._next_idle = tick + self.level_idle_timeout
            elif self._next_decision <= now:
                tick = self._next_decision
                self._decide()
                self._next_decision = tick + self.decision_interval
                if tick - self._last_level >= self.idle_stop:
                    self._next_decision = self._next_idle = None
            else:
                break
        return self._dominant if self._dominant != before else None

    def recent(self, n: int) -> list[Hashable]:
        """The *n* most recent distinct dominant sources, most recent first,
        then the other sources by recent energy (so ``min(n, len(self))`` of them).

        A source counts as active for ``energy_expire`` seconds after its
        last level; ties go to the most recent level, then the oldest source.
        """
        if n <= 0:
            return []
        result = list(reversed(self._history))[:n]
        if len(result) < n:
            horizon = self._now - self.energy_expire
            others = [(s, r) for s, r in self._sources.items() if s not in self._history]
            others.sort(key=lambda item: (
                -(item[1].energy if item[1].last_level_time >= horizon else 0.0),
                -item[1].last_level_time,
                item[1].order,
            ))
            result.extend(s for s, _ in others[: n - len(result)])
        return result

    def _timeout_levels(self, now: float) -> None:
        for source, record in list(self._sources.items()):
            idle = now - record.last_level_time
            if idle > self.source_idle_timeout and source != self._dominant:
                self.remove(source)
            elif idle > self.level_idle_timeout:
                record.push(0)

    def _decide(self) -> None:
        if not self._sources:
            return
        incumbent = self._dominant
        if incumbent is None:
            # No dominant (start, or it left): nominate the first of recent(),
            # and let the others challenge the nominee (a lone source wins).
            incumbent = self.recent(1)[0]
        base = self._sources[incumbent].scores()
        winner, best = incumbent, self.c2
        for source, record in self._sources.items():
            if source == incumbent:
                continue
            immediate, medium, long = record.scores()
            m1 = math.log(immediate / base[0])
            m2 = math.log(medium / base[1])
            m3 = math.log(long / base[2])
            if m1 > self.c1 and m2 > self.c2 and m3 > self.c3 and m2 > best:
                winner, best = source, m2
        self._make_dominant(winner)

    def _make_dominant(self, source: Hashable) -> None:
        self._dominant = source
        self._history.pop(source, None)
        self._history[source] = None
