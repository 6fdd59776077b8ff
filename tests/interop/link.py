"""A sans-I/O network between two DTLS endpoints, on a fake clock.

:class:`Link` carries datagrams between two endpoints that implement the small
:class:`Endpoint` interface (adapters: :class:`EngineEndpoint` for our
``DtlsConnection``, :class:`OpenSSLEndpoint` for :class:`OpenSSLPeer`).
Delivery takes no time; when nothing is in flight the clock jumps to the
earliest timer.  Loss, reordering (a datagram either overtakes others in
flight or is held back 0.1-2 s, so it lands after a retransmission) and
duplication are drawn from a seeded ``random.Random``.  Every run is capped in
steps and in fake time: a broken engine raises :class:`LinkStalled` (an
AssertionError, so trial reports a failure) instead of hanging.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from typing import Protocol

from tests.interop.openssl_peer import OpenSSLPeer, split_records

CONTENT_CHANGE_CIPHER_SPEC = 20
CONTENT_ALERT = 21
CONTENT_HANDSHAKE = 22
CONTENT_APPLICATION_DATA = 23
HANDSHAKE_CLIENT_HELLO = 1
HANDSHAKE_HELLO_VERIFY_REQUEST = 3


class LinkStalled(AssertionError):
    """The endpoints did not get where they should within the step/time budget."""


class FakeClock:
    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance_to(self, when: float) -> None:
        self.now = max(self.now, when)


class Endpoint(Protocol):
    name: str

    def start(self, now: float) -> None: ...
    def receive(self, datagram: bytes, now: float) -> None: ...
    def transmit(self, now: float) -> list[bytes]: ...
    def next_timer(self, now: float) -> float | None: ...
    def on_timer(self, now: float) -> None: ...

    @property
    def complete(self) -> bool: ...
    @property
    def failed(self) -> bool: ...


class OpenSSLEndpoint:
    """Adapter for :class:`OpenSSLPeer` (give the peer the link's clock)."""

    def __init__(self, peer: OpenSSLPeer, name: str | None = None) -> None:
        self.peer = peer
        self.name = name or f"openssl-{peer.role}"

    def start(self, now: float) -> None:
        pass  # the first pump() sends the ClientHello

    def receive(self, datagram: bytes, now: float) -> None:
        self.peer.feed(datagram)

    def transmit(self, now: float) -> list[bytes]:
        return self.peer.pump()

    def next_timer(self, now: float) -> float | None:
        remaining = self.peer.timeout()
        return None if remaining is None else now + remaining

    def on_timer(self, now: float) -> None:
        self.peer.handle_timeout()

    @property
    def complete(self) -> bool:
        return self.peer.handshake_done

    @property
    def failed(self) -> bool:
        return self.peer.error is not None


class EngineEndpoint:
    """Adapter for ``perc_daemons.protocol.dtls.DtlsConnection``.

    Collects events, and checks that every datagram the engine sends is whole
    DTLS records and fits its MTU.
    """

    def __init__(self, connection, *, client: bool, mtu: int, name: str | None = None) -> None:
        from perc_daemons.protocol import dtls

        self._dtls = dtls
        self.connection = connection
        self.client = client
        self.mtu = mtu
        self.name = name or ("engine-client" if client else "engine-server")
        self.events: list[object] = []
        self.handshake = None  # the HandshakeComplete event
        self.closed = None  # the ConnectionClosed event
        self.received: list[bytes] = []
        self.ekt_keys: list[object] = []
        self.largest_datagram = 0

    def start(self, now: float) -> None:
        if self.client:
            self.connection.connect(now)

    def receive(self, datagram: bytes, now: float) -> None:
        self.connection.receive_datagram(datagram, now)
        self._drain_events()

    def transmit(self, now: float) -> list[bytes]:
        datagrams = self.connection.datagrams_to_send(now)
        for datagram in datagrams:
            if len(datagram) > self.mtu:
                raise AssertionError(
                    f"{self.name} sent a {len(datagram)}-byte datagram, MTU {self.mtu}"
                )
            try:
                split_records(datagram)
            except ValueError as e:
                raise AssertionError(f"{self.name} sent a malformed datagram: {e}") from e
            self.largest_datagram = max(self.largest_datagram, len(datagram))
        self._drain_events()
        return datagrams

    def next_timer(self, now: float) -> float | None:
        return self.connection.get_timer()

    def on_timer(self, now: float) -> None:
        self.connection.handle_timer(now)
        self._drain_events()

    def _drain_events(self) -> None:
        dtls = self._dtls
        while (event := self.connection.next_event()) is not None:
            self.events.append(event)
            if isinstance(event, dtls.HandshakeComplete):
                if self.handshake is not None:
                    raise AssertionError(f"{self.name}: second HandshakeComplete")
                if self.closed is not None:
                    raise AssertionError(f"{self.name}: HandshakeComplete after close")
                self.handshake = event
            elif isinstance(event, dtls.ConnectionClosed):
                self.closed = event
            elif isinstance(event, dtls.ApplicationDataReceived):
                self.received.append(event.data)
            elif isinstance(event, dtls.EktKeyReceived):
                self.ekt_keys.append(event)

    @property
    def complete(self) -> bool:
        return self.handshake is not None

    @property
    def failed(self) -> bool:
        return self.closed is not None


class Link:
    def __init__(
        self,
        a: Endpoint,
        b: Endpoint,
        *,
        clock: FakeClock,
        loss: float = 0.0,
        reorder: float = 0.0,
        duplicate: float = 0.0,
        seed: int = 0,
        max_steps: int = 5000,
        max_time: float = 300.0,
    ) -> None:
        self.endpoints = (a, b)
        self.clock = clock
        self.loss = loss
        self.reorder = reorder
        self.duplicate = duplicate
        self.random = random.Random(seed)
        self.max_steps = max_steps
        self.max_time = max_time
        self.started_at = clock.now
        self.steps = 0
        self.stats: Counter[str] = Counter()
        # Every datagram as sent, before impairment: (sender name, bytes).
        self.transcript: list[tuple[str, bytes]] = []
        self._in_flight: list[tuple[Endpoint, bytes]] = []
        self._held: list[tuple[float, Endpoint, bytes]] = []  # delayed: (due, to, bytes)

    def _peer(self, endpoint: Endpoint) -> Endpoint:
        a, b = self.endpoints
        return b if endpoint is a else a

    def _send(self, sender: Endpoint, datagram: bytes, impaired: bool) -> None:
        self.transcript.append((sender.name, datagram))
        self.stats["sent"] += 1
        to = self._peer(sender)
        if not impaired:
            self._in_flight.append((to, datagram))
            return
        rng = self.random
        if rng.random() < self.loss:
            self.stats["lost"] += 1
            return
        copies = 2 if rng.random() < self.duplicate else 1
        self.stats["duplicated"] += copies - 1
        for _ in range(copies):
            if rng.random() < self.reorder:
                self.stats["reordered"] += 1
                if rng.random() < 0.5 and self._in_flight:
                    self._in_flight.insert(rng.randrange(len(self._in_flight)), (to, datagram))
                else:
                    due = self.clock.now + rng.uniform(0.1, 2.0)
                    self._held.append((due, to, datagram))
            else:
                self._in_flight.append((to, datagram))

    def _budget(self) -> None:
        self.steps += 1
        if self.steps > self.max_steps:
            raise LinkStalled(f"more than {self.max_steps} steps; {self.describe()}")
        if self.clock.now - self.started_at > self.max_time:
            raise LinkStalled(f"more than {self.max_time} s of fake time; {self.describe()}")

    def describe(self) -> str:
        states = ", ".join(
            f"{e.name}: complete={e.complete} failed={e.failed}" for e in self.endpoints
        )
        return f"t={self.clock.now - self.started_at:.3f}s, {states}, {dict(self.stats)}"

    def run(self, until: Callable[[], bool], *, impaired: bool = True) -> None:
        """Shuttle datagrams until nothing is in flight and ``until()`` holds."""
        while True:
            for endpoint in self.endpoints:
                for datagram in endpoint.transmit(self.clock.now):
                    self._send(endpoint, datagram, impaired)
            if self._in_flight:
                to, datagram = self._in_flight.pop(0)
                self.stats["delivered"] += 1
                to.receive(datagram, self.clock.now)
                self._budget()
                continue
            if until():
                return
            deadlines = [(e.next_timer(self.clock.now), e) for e in self.endpoints]
            deadlines = [(t, e) for t, e in deadlines if t is not None]
            candidates = [t for t, _ in deadlines] + [due for due, _, _ in self._held]
            if not candidates:
                raise LinkStalled(f"deadlock: nothing in flight and no timer; {self.describe()}")
            self.clock.advance_to(min(candidates))
            now = self.clock.now
            for due, to, datagram in [h for h in self._held if h[0] <= now]:
                self._held.remove((due, to, datagram))
                self._in_flight.append((to, datagram))
            for deadline, endpoint in deadlines:
                if deadline <= now:
                    self.stats[f"timer:{endpoint.name}"] += 1
                    endpoint.on_timer(now)
            self._budget()

    def flush(self) -> None:
        """Deliver everything in flight (and whatever it provokes) without impairment."""
        for entry in sorted(self._held, key=lambda h: h[0]):
            self._in_flight.append((entry[1], entry[2]))
        self._held.clear()
        self.run(lambda: True, impaired=False)


def handshake_done_or_failed(a: Endpoint, b: Endpoint) -> Callable[[], bool]:
    return lambda: (a.complete and b.complete) or a.failed or b.failed


def run_handshake(
    client: Endpoint,
    server: Endpoint,
    *,
    clock: FakeClock,
    loss: float = 0.0,
    reorder: float = 0.0,
    duplicate: float = 0.0,
    seed: int = 0,
    max_steps: int = 5000,
    max_time: float = 300.0,
) -> Link:
    """Run a handshake until both sides complete or either fails; return the link.

    Raises :class:`LinkStalled` if that takes more than max_steps deliveries/timer
    firings or more than max_time seconds of fake time.
    """
    link = Link(
        client,
        server,
        clock=clock,
        loss=loss,
        reorder=reorder,
        duplicate=duplicate,
        seed=seed,
        max_steps=max_steps,
        max_time=max_time,
    )
    server.start(clock.now)
    client.start(clock.now)
    link.run(handshake_done_or_failed(client, server))
    return link


def plaintext_handshake_messages(datagram: bytes) -> list[tuple[int, bytes]]:
    """(msg_type, body fragment) of each epoch-0 handshake record in a datagram."""
    messages = []
    for record in split_records(datagram):
        epoch = int.from_bytes(record[3:5], "big")
        if record[0] == CONTENT_HANDSHAKE and epoch == 0 and len(record) >= 25:
            messages.append((record[13], record[25:]))
    return messages


def client_hello_cookie(body: bytes) -> bytes:
    """The cookie field of an (unfragmented) DTLS ClientHello body."""
    offset = 2 + 32  # client_version, random
    offset += 1 + body[offset]  # session_id
    return body[offset + 1 : offset + 1 + body[offset]]


def hello_verify_request_cookie(body: bytes) -> bytes:
    return body[3 : 3 + body[2]]
