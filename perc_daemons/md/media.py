"""The Twisted side of the MD's media plane: one UDP port for a sans-I/O :class:`MediaPlane`.

Everything about datagrams (demultiplexing, ICE-lite, relaying, consent,
cascade links) is in :mod:`perc_daemons.md.plane`; this module only writes
its outputs to the socket and runs its clocks: a ``LoopingCall`` for the
endpoints' consent expiry, and one ``callLater`` at the plane's
:meth:`~perc_daemons.md.plane.MediaPlane.next_timer` for the links (checks,
retransmissions, timeouts, back-off, rekeys).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import task
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import DatagramProtocol

from perc_daemons.md.plane import DEFAULT_CONSENT_TIMEOUT, LegId, MediaPlane, Output

__all__ = ["MediaPlaneProtocol"]


class MediaPlaneProtocol(DatagramProtocol):
    """Twisted UDP wrapper of a :class:`MediaPlane`.

    ``on_expired(leg_ids)`` is called with the legs removed by each consent
    check (every ``expire_interval`` seconds) when any were.  Add and remove
    cascade links through :meth:`add_link` / :meth:`remove_link` here (or
    call :meth:`reschedule` after using the plane's): their datagrams go out
    and their timers run.
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
        self._link_call: IDelayedCall | None = None

    def startProtocol(self) -> None:
        self._expiry = task.LoopingCall(self._expire)
        self._expiry.clock = self.clock
        self._expiry.start(self.expire_interval, now=False)
        self.reschedule()

    def stopProtocol(self) -> None:
        if self._expiry is not None and self._expiry.running:
            self._expiry.stop()
        self._expiry = None
        if self._link_call is not None and self._link_call.active():
            self._link_call.cancel()
        self._link_call = None

    def add_link(self, link_id: LegId, group: Any, **parameters: Any) -> None:
        """:meth:`MediaPlane.add_link` now; its first datagrams are sent."""
        self._write(self.plane.add_link(link_id, group, now=self.clock.seconds(), **parameters))
        self.reschedule()

    def remove_link(self, link_id: LegId) -> None:
        """:meth:`MediaPlane.remove_link`; its close_notify is sent."""
        self._write(self.plane.remove_link(link_id))
        self.reschedule()

    def reschedule(self) -> None:
        """Make sure :meth:`MediaPlane.poll` runs by the plane's next link timer."""
        when = self.plane.next_timer()
        if when is None:
            return
        call = self._link_call
        if call is not None and call.active():
            # an earlier (or overdue: not run yet) poll is due anyway; a spurious one costs
            # nothing, a DelayedCall made again per datagram does
            if call.getTime() <= max(when, self.clock.seconds()):
                return
            call.cancel()
        self._link_call = self.clock.callLater(max(0.0, when - self.clock.seconds()),
                                               self._poll)

    def _poll(self) -> None:
        self._link_call = None
        self._write(self.plane.poll(self.clock.seconds()))
        self.reschedule()

    def _expire(self) -> None:
        gone = self.plane.expire(self.clock.seconds(), self.consent_timeout)
        if gone and self.on_expired is not None:
            self.on_expired(gone)

    def _write(self, outputs: Output) -> None:
        transport = self.transport
        if transport is None:
            return
        # The port's socket itself, not transport.write: Twisted's UDP write parses each
        # address again (is it an IP literal of the port's family?), some 1.5 us per
        # datagram, a sixth of what the MD spends per forwarded copy.  Every address
        # here is one recvfrom gave or a link's peer, checked to be an IP address.
        sendto = transport.socket.sendto  # type: ignore[attr-defined]
        for data, address in outputs:
            try:
                sendto(data, address)
            except ConnectionRefusedError:
                pass  # an earlier ICMP error, reported late (ignored as Twisted does)
            except OSError:
                # One receiver's refusal (full buffer, too large for its path: EMSGSIZE)
                # must not cost the others their copy.
                self.plane.send_failed(address)

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self._write(self.plane.datagram_received(datagram, addr, self.clock.seconds()))
        self.reschedule()  # O(1) unless a link's timers changed

    def send_dtls(self, leg_id: LegId, data: bytes) -> None:
        """Send a DTLS record from the KD to the leg's endpoint."""
        self._write(self.plane.send_dtls(leg_id, data))
