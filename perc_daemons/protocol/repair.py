"""Packet repair for the reference endpoint, sans-I/O: send history and NACK scheduling.

Two small state machines, explicit ``now`` in, nothing else:

* :class:`SendHistory`: the last :data:`HISTORY_SIZE` wire datagrams of one
  sending SSRC by RTP sequence number, so that a generic NACK (RFC 4585
  s6.2.1) can be answered by sending the very same datagram again
  (retransmission in the original stream, not RTX; the MD's replay list
  takes it if the first copy never reached it, RFC 3711 s3.3.2);
* :class:`NackTracker`: the receive side for one remote SSRC.  It follows
  the *outer* sequence number (what the MD delivered, RFC 8723 s5.3: an MD
  that withholds packets of a stream renumbers the rest, so only real loss
  leaves a gap).  A gap's numbers wait :data:`REORDER_DELAY` for reordered
  packets, are then requested, retried at most :data:`MAX_RETRIES` times
  :data:`RETRY_INTERVAL` apart, and given up :data:`GIVE_UP` after the gap
  was seen.  A requested number that arrives later counts as recovered.

Not here: the RTCP wire format (:mod:`perc_daemons.protocol.feedback`), the
decision which SSRC a NACK is for (the session), RTX (RFC 4588).
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = [
    "GIVE_UP",
    "HISTORY_SIZE",
    "MAX_GAP",
    "MAX_RETRIES",
    "REORDER_DELAY",
    "RETRY_INTERVAL",
    "NackTracker",
    "SendHistory",
]

#: Datagrams kept per sending SSRC.
HISTORY_SIZE = 512
#: Seconds a missing number waits for a reordered packet before it is requested.
REORDER_DELAY = 0.010
#: Seconds between two requests of the same number.
RETRY_INTERVAL = 0.050
#: Requests after the first, at most.
MAX_RETRIES = 2
#: Seconds after the gap was seen when a number is given up.
GIVE_UP = 0.5
#: A jump of more than this many numbers is a restart or a resync, not loss: not requested.
MAX_GAP = 256

_SEQ_MOD = 1 << 16


class SendHistory:
    """The last ``size`` datagrams sent on one SSRC, by 16-bit sequence number."""

    def __init__(self, size: int = HISTORY_SIZE) -> None:
        if size < 1:
            raise ValueError("size must be at least 1")
        self.size = size
        self._datagrams: OrderedDict[int, bytes] = OrderedDict()

    def add(self, sequence: int, datagram: bytes) -> None:
        """Remember ``datagram`` as the one sent with ``sequence`` (the oldest goes)."""
        self._datagrams.pop(sequence, None)
        self._datagrams[sequence] = datagram
        if len(self._datagrams) > self.size:
            self._datagrams.popitem(last=False)

    def get(self, sequence: int) -> bytes | None:
        return self._datagrams.get(sequence)

    def __len__(self) -> int:
        return len(self._datagrams)

    def clear(self) -> None:
        self._datagrams.clear()


class _Missing:
    __slots__ = ("due", "sends", "since")

    def __init__(self, since: float) -> None:
        self.since = since
        self.due = since + REORDER_DELAY
        self.sends = 0


class NackTracker:
    """Gaps in one remote SSRC's outer sequence numbers, and when to request them.

    ``nacked`` counts numbers requested at least once, ``recovered`` those
    of them that arrived afterwards, ``given_up`` those dropped unrecovered
    (after :data:`GIVE_UP`, or when the stream jumped).
    """

    def __init__(self) -> None:
        self._highest: int | None = None  # extended (cycles counted)
        self._missing: dict[int, _Missing] = {}  # extended number -> state
        self.nacked = 0
        self.recovered = 0
        self.given_up = 0

    @property
    def pending(self) -> int:
        """Numbers currently missing (waiting, requested or about to be given up)."""
        return len(self._missing)

    def _extend(self, sequence: int) -> int:
        highest = self._highest
        assert highest is not None
        delta = (sequence - highest) % _SEQ_MOD
        return highest + delta if delta < _SEQ_MOD // 2 else highest + delta - _SEQ_MOD

    def received(self, sequence: int, now: float) -> bool:
        """A packet with outer ``sequence`` arrived; True if it was requested (recovered)."""
        if self._highest is None:
            self._highest = sequence
            return False
        number = self._extend(sequence)
        if number > self._highest:
            gap = number - self._highest - 1
            if gap > MAX_GAP:
                self.given_up += len(self._missing)
                self._missing.clear()
            else:
                for missing in range(self._highest + 1, number):
                    self._missing[missing] = _Missing(now)
            self._highest = number
            return False
        state = self._missing.pop(number, None)
        if state is not None and state.sends:
            self.recovered += 1
            return True
        return False

    def due(self, now: float) -> list[int]:
        """The 16-bit numbers to request now (each counted as one more request)."""
        out: list[int] = []
        for number, state in list(self._missing.items()):
            if now >= state.since + GIVE_UP:
                del self._missing[number]
                self.given_up += 1
            elif state.sends <= MAX_RETRIES and now >= state.due:
                out.append(number % _SEQ_MOD)
                if not state.sends:
                    self.nacked += 1
                state.sends += 1
                state.due = (now + RETRY_INTERVAL if state.sends <= MAX_RETRIES
                             else state.since + GIVE_UP)
        return out

    def next_timer(self) -> float | None:
        """When :meth:`due` has something to do, or None."""
        if not self._missing:
            return None
        return min(state.due for state in self._missing.values())
