"""The Twisted side of the MD's media plane: one UDP port for a sans-I/O :class:`MediaPlane`.

Everything about datagrams (demultiplexing, ICE-lite, relaying, consent) is in
:mod:`perc_daemons.md.plane`; this module only writes its outputs to the
socket and runs its clock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import error, task
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import DatagramProtocol

from perc_daemons.md.plane import DEFAULT_CONSENT_TIMEOUT, LegId, MediaPlane, Output

__all__ = ["MediaPlaneProtocol"]


class MediaPlaneProtocol(DatagramProtocol):
    """Twisted UDP wrapper of a :class:`MediaPlane`.

    ``on_expired(leg_ids)`` is called with the legs removed by each consent
    check (every ``expire_interval`` seconds) when any were.
    """

    def __init__(self, plane: MediaPlane, clock: IReactorTime | None = None, *,
                 expire_interval: float = 1.0,
                 consent_timeout: float = DEFAULT_CONSENT_TIMEOUT,
                 on_expired: Callable[[list[LegId]], object] | None = None) -> None:
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[assignment]
        self.plane = plane
        self.clock = clock
        self.expire_interval = expire_interval
        self.consent_timeout = consent_timeout
        self.on_expired = on_expired
        self._expiry: task.LoopingCall | None = None

    def startProtocol(self) -> None:
        self._expiry = task.LoopingCall(self._expire)
        self._expiry.clock = self.clock
        self._expiry.start(self.expire_interval, now=False)

    def stopProtocol(self) -> None:
        if self._expiry is not None and self._expiry.running:
            self._expiry.stop()
        self._expiry = None

    def _expire(self) -> None:
        gone = self.plane.expire(self.clock.seconds(), self.consent_timeout)
        if gone and self.on_expired is not None:
            self.on_expired(gone)

    def _write(self, outputs: Output) -> None:
        transport = self.transport
        if transport is None:
            return
        for data, address in outputs:
            try:
                transport.write(data, address)  # type: ignore[attr-defined]
            except (OSError, error.MessageLengthError):
                # One receiver's refusal (full buffer, too large for its path) must not
                # cost the others their copy.
                self.plane.send_failed(address)

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self._write(self.plane.datagram_received(datagram, addr, self.clock.seconds()))

    def send_dtls(self, leg_id: LegId, data: bytes) -> None:
        """Send a DTLS record from the KD to the leg's endpoint."""
        self._write(self.plane.send_dtls(leg_id, data))
