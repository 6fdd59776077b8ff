"""Shared helpers for the end-to-end conference tests (real daemons, real endpoints).

* :class:`StackTestCase`: a trial ``TestCase`` whose async ``setUp`` starts a
  :class:`~perc_daemons.demo.stack.LocalStack` (perc-kmf, perc-md and perc-kd
  as real ``twistd`` children, with the recording tunnel tap) in a fresh
  temporary directory and creates conference :attr:`StackTestCase.conference`
  with :attr:`StackTestCase.invited` invited.  ``tearDown`` makes every
  endpoint created with :meth:`StackTestCase.endpoint` leave, stops every
  daemon and the tap, and, when the test did not pass, writes
  ``stack.logs()`` to ``<stack dir>/stack-logs.txt`` and its tail to stderr.
  Class attributes to override: ``users``, ``invited``, ``conference``,
  ``late_joiners_get_earlier_epochs``, ``tap``, ``static_mds``, ``create_conference``
  (False: no conference is created), ``settings`` (extra configuration keys,
  see :class:`~perc_daemons.demo.stack.LocalStack`), ``extra_mds`` (more perc-md
  processes, "md2"...: ``endpoint(..., md=)`` and ``join(..., md=)`` pick one),
  ``cluster`` (the MDs are one host's processes: joins placed on the least loaded),
  ``timeout``; :meth:`StackTestCase.stack_options` gives the stack more
  keyword arguments (``md_hosts``).
* :class:`RecordingEndpoint`: the reference endpoint, recording every
  datagram it wrote to the MD with its send time (:attr:`~RecordingEndpoint.sent`),
  every session event with its time (:attr:`~RecordingEndpoint.events`) and
  every offer it POSTed (:attr:`~RecordingEndpoint.offers`).
  :meth:`~RecordingEndpoint.inject` hands datagrams to its session as if the
  MD had sent them and returns the events they produced;
  :attr:`~RecordingEndpoint.media_keys` is the MediaKeys the KD sent the MD
  for it (the outer halves of its DTLS-SRTP keys, RFC 9185), as the
  endpoint derived them.
* :class:`RecordingSource`: wraps a media source and records the frames it
  produced (RTP timestamp -> payload).  :class:`NoiseSource`: PCMU-sized
  random payloads (every payload distinct, so comparisons are meaningful).
* :class:`ColludingMd`: what an MD that kept the hop-by-hop keys could do
  with them: the outer keys the tap saw in MediaKeys (or, where no tap sees
  the tunnel, the endpoints' own :attr:`~RecordingEndpoint.media_keys`), by
  association (the UUID string of the MD's join response), remove a sender's outer layer and
  re-apply a receiver's, optionally editing or tampering in between.
* :func:`rtp_header`, :func:`is_rtp`, :func:`full_ekt_spi`,
  :func:`wait_for`, :func:`secret_forms`, :func:`leaks`: small tools.
"""

from __future__ import annotations

import base64
import os
import sys
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import reactor
from twisted.trial import unittest

from perc_daemons.demo.stack import KD_NAME, LocalStack, sleep
from perc_daemons.endpoint.client import Endpoint
from perc_daemons.endpoint.media import MediaFrame, MediaSource
from perc_daemons.protocol.double import (
    DOUBLE_PROFILES,
    Profile,
    Relay,
    split_keying_material,
)
from perc_daemons.protocol.ekt import FULL_EKT_TYPE, FullEktField, ekt_field_length
from perc_daemons.protocol.participant import (
    DecryptFailed,
    EktKeyInstalled,
    MediaReceived,
)
from perc_daemons.protocol.srtp import libsrtp_session
from perc_daemons.protocol.tunnel import MediaKeys

__all__ = [
    "NO_KEY_REASONS",
    "ColludingMd",
    "NoiseSource",
    "RecordingEndpoint",
    "RecordingSource",
    "RtpHeader",
    "StackTestCase",
    "assert_undecryptable",
    "full_ekt_spi",
    "is_rtp",
    "leaks",
    "rtp_header",
    "secret_forms",
    "wait_for",
]

#: Why a receiver cannot open a packet an MD re-sealed for it from an epoch it was not
#: admitted to: the EKT SPI unknown, or the inner layer refused.  Not
#: :data:`perc_daemons.protocol.participant.NO_KEY_REASONS` (a member's expected
#: misses: held-back and expired keys), which it overlaps.
NO_KEY_REASONS = {"ekt_unknown_spi", "e2e_auth", "e2e_key_unknown"}

#: How long the helpers wait for something that should happen (not a timing assertion).
DEADLINE = 20.0
#: LocalStack start-ups tried when a port was taken between choosing and binding it.
START_ATTEMPTS = 3


# --- small tools ----------------------------------------------------------------------------


def is_rtp(datagram: bytes) -> bool:
    """An RTP (not RTCP) datagram by RFC 7983 s7 / RFC 5761 s4 demultiplexing."""
    return (len(datagram) >= 12 and 128 <= datagram[0] <= 191
            and not 192 <= datagram[1] <= 223)


@dataclass(frozen=True)
class RtpHeader:
    ssrc: int
    sequence: int
    timestamp: int
    marker: bool
    payload_type: int


def rtp_header(datagram: bytes) -> RtpHeader:
    """The (clear) fixed RTP header of an SRTP datagram (RFC 3550 s5.1)."""
    return RtpHeader(ssrc=int.from_bytes(datagram[8:12], "big"),
                     sequence=int.from_bytes(datagram[2:4], "big"),
                     timestamp=int.from_bytes(datagram[4:8], "big"),
                     marker=bool(datagram[1] & 0x80), payload_type=datagram[1] & 0x7F)


def full_ekt_spi(datagram: bytes) -> int | None:
    """The SPI of the datagram's FullEKTField (RFC 8870 s4.1), None for a short one."""
    if not datagram or datagram[-1] != FULL_EKT_TYPE:
        return None
    return FullEktField.decode(datagram[len(datagram) - ekt_field_length(datagram):]).spi


async def wait_for(predicate: Callable[[], object], what: str,
                   timeout: float = DEADLINE, interval: float = 0.05) -> None:
    """Poll ``predicate`` until true; AssertionError naming ``what`` after ``timeout`` s."""
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        await sleep(reactor, interval)


def assert_undecryptable(case: unittest.TestCase, receiver: RecordingEndpoint,
                         datagrams: Sequence[bytes], sender: RecordingEndpoint,
                         what: str) -> list[DecryptFailed]:
    """Hand ``datagrams`` (``sender``'s packets re-sealed for ``receiver`` with its hop
    keys) to ``receiver``: none decrypts, each fails attributed to ``sender`` (so the
    outer layer verified) for want of the key (:data:`NO_KEY_REASONS`, among them
    ``ekt_unknown_spi``: an epoch it never got).  The failures."""
    events = receiver.inject(datagrams)
    case.assertEqual([e for e in events if isinstance(e, MediaReceived)], [], what)
    failures = [e for e in events if isinstance(e, DecryptFailed)]
    case.assertEqual(len(failures), len(datagrams), events)
    case.assertEqual({e.ssrc for e in failures}, {sender.ssrc},
                     f"a failure not attributed to {sender.label}: the outer layer did "
                     "not verify")
    reasons = {e.reason for e in failures}
    case.assertLessEqual(reasons, NO_KEY_REASONS, reasons)
    case.assertIn("ekt_unknown_spi", reasons)
    return failures


def _b64_windows(secret: bytes, alphabet: str) -> list[bytes]:
    """The base64 characters determined by ``secret`` alone, at each of the 3 alignments.

    Found in a longer base64 text, one of these is a substring whatever bytes
    surround the secret.
    """
    out = []
    n = len(secret)
    for offset in range(3):
        text = base64.b64encode(b"\0" * offset + secret + b"\0\0")
        if alphabet == "url":
            text = text.replace(b"+", b"-").replace(b"/", b"_")
        first = -(-8 * offset // 6)  # first character made of secret bits only
        last = (8 * (offset + n)) // 6  # one past the last such character
        out.append(text[first:last])
    return out


def secret_forms(secret: bytes) -> list[bytes]:
    """How a key could appear in bytes or text: raw, hex (lower, upper, colon
    separated), base64 and base64url (any alignment, padded or not)."""
    forms = [secret, secret.hex().encode(), secret.hex().upper().encode(),
             ":".join(f"{b:02X}" for b in secret).encode(),
             ":".join(f"{b:02x}" for b in secret).encode()]
    forms += _b64_windows(secret, "std") + _b64_windows(secret, "url")
    return [f for f in dict.fromkeys(forms) if f]


def leaks(secrets: Iterable[tuple[str, bytes]], haystacks: Iterable[tuple[str, bytes]]
          ) -> list[str]:
    """Which (label, secret) appear, in any :func:`secret_forms`, in which haystack."""
    stacks = list(haystacks)
    found = []
    for label, secret in secrets:
        for form in secret_forms(secret):
            for where, data in stacks:
                if form in data:
                    found.append(f"{label} ({len(secret)} bytes) as {form[:12]!r}... in {where}")
    return found


# --- media sources --------------------------------------------------------------------------


class NoiseSource:
    """PCMU-sized (160-byte) random payloads, 50 per second, RTP timestamp +160 each."""

    kind = "audio"
    interval = 0.02

    def __init__(self) -> None:
        self.timestamp = int.from_bytes(os.urandom(4), "big")
        self.frames = 0

    def next_frame(self) -> MediaFrame:
        frame = MediaFrame(os.urandom(160), self.timestamp, marker=self.frames == 0)
        self.timestamp = (self.timestamp + 160) & 0xFFFFFFFF
        self.frames += 1
        return frame


class RecordingSource:
    """A :class:`~perc_daemons.endpoint.media.MediaSource` wrapper recording what it produced.

    :attr:`frames` lists every frame in order; :attr:`by_timestamp` maps
    each RTP timestamp to its payload (join with the sent datagrams' RTP
    headers to get sequence -> payload: see
    :meth:`RecordingEndpoint.sent_payloads`).
    """

    def __init__(self, source: MediaSource) -> None:
        self.source = source
        self.kind = source.kind
        self.interval = source.interval
        self.frames: list[MediaFrame] = []
        self.by_timestamp: dict[int, bytes] = {}

    def next_frame(self) -> MediaFrame | None:
        frame = self.source.next_frame()
        if frame is not None:
            self.frames.append(frame)
            self.by_timestamp[frame.timestamp] = frame.payload
        return frame


# --- the endpoint ---------------------------------------------------------------------------


class RecordingEndpoint(Endpoint):
    """The reference endpoint, recording what it sent and what its session reported.

    * :attr:`sent`: ``(reactor time, datagram)`` of every datagram written to
      the MD (STUN, DTLS, SRTP);
    * :attr:`events`: ``(reactor time, event)`` of every session event
      (:class:`MediaReceived`, :class:`DecryptFailed`, :class:`EktKeyInstalled`, ...);
    * :attr:`offers`: every SDP offer POSTed to the MD, verbatim.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.sent: list[tuple[float, bytes]] = []
        self.events: list[tuple[float, Any]] = []
        self.offers: list[str] = []
        self.media_keys: MediaKeys | None = None
        self._md_client: Any = None
        kwargs.setdefault("audit_secrets", True)
        super().__init__(*args, **kwargs)

    # The MD client is created inside join(): wrap its join() to see the offer.
    @property  # type: ignore[override]
    def md(self) -> Any:
        return self._md_client

    @md.setter
    def md(self, client: Any) -> None:
        if client is not None:
            original = client.join

            async def join(conference_id: str, offer: str, **options: Any) -> Any:
                self.offers.append(offer)
                return await original(conference_id, offer, **options)

            client.join = join
        self._md_client = client

    async def _connect(self, session: Any) -> None:
        # What the KD sends the MD for this association (RFC 9185 MediaKeys): the
        # outer halves of the keys the handshake exported, taken as it completes.
        complete = session._handshake_complete

        def handshake_complete(event: Any) -> None:
            if event.srtp_profile in DOUBLE_PROFILES and self.joined is not None:
                keys = split_keying_material(Profile(event.srtp_profile),
                                             event.keying_material)
                self.media_keys = MediaKeys(
                    association_id=uuid.UUID(self.joined.association).bytes,
                    protection_profile=event.srtp_profile, mki=b"",
                    client_write_key=keys.client_outer.key,
                    server_write_key=keys.server_outer.key,
                    client_write_salt=keys.client_outer.salt,
                    server_write_salt=keys.server_outer.salt)
            complete(event)

        session._handshake_complete = handshake_complete
        await super()._connect(session)

    def _send(self, datagrams: Sequence[bytes]) -> None:
        if self._port is not None and self.session is not None:
            now = self.now()
            self.sent.extend((now, bytes(d)) for d in datagrams)
        super()._send(datagrams)

    def _event(self, event: Any) -> None:
        self.events.append((self.now(), event))
        super()._event(event)

    # --- queries -----------------------------------------------------------------------

    def rtp_sent(self, after: float | None = None, before: float | None = None
                 ) -> list[bytes]:
        """The SRTP datagrams sent, in order, optionally within (after, before) times."""
        return [d for t, d in self.sent if is_rtp(d)
                and (after is None or t > after) and (before is None or t < before)]

    def sent_payloads(self, source: RecordingSource) -> dict[tuple[int, int], bytes]:
        """``(ssrc, sequence) -> payload`` of every RTP datagram sent from ``source``."""
        out = {}
        for datagram in self.rtp_sent():
            header = rtp_header(datagram)
            payload = source.by_timestamp.get(header.timestamp)
            if payload is not None:
                out[(header.ssrc, header.sequence)] = payload
        return out

    def received(self, ssrc: int | None = None, since: float | None = None
                 ) -> list[MediaReceived]:
        return [e for t, e in self.events if isinstance(e, MediaReceived)
                and (ssrc is None or e.ssrc == ssrc) and (since is None or t >= since)]

    def decrypt_failures(self, since: float | None = None) -> list[DecryptFailed]:
        return [e for t, e in self.events if isinstance(e, DecryptFailed)
                and (since is None or t >= since)]

    def installed(self, since: float | None = None) -> list[tuple[float, int]]:
        """``(time, SPI)`` of every EktKeyInstalled (optionally at or after ``since``)."""
        return [(t, e.spi) for t, e in self.events if isinstance(e, EktKeyInstalled)
                and (since is None or t >= since)]

    @property
    def current_spi(self) -> int | None:
        return self.epochs_installed[-1] if self.epochs_installed else None

    # --- actions -----------------------------------------------------------------------

    def inject(self, datagrams: Iterable[bytes]) -> list[Any]:
        """Hand ``datagrams`` to the session as if from the MD; the events they produced."""
        assert self.session is not None, "not joined"
        first = len(self.events)
        for datagram in datagrams:
            self._datagram(datagram, self.media_peer)
        return [e for _, e in self.events[first:]]

    def stop_media(self) -> None:
        """Stop a running :meth:`run_media` now (its Deferred then fires)."""
        self._stop_sending()


# --- the colluding MD -----------------------------------------------------------------------


class ColludingMd:
    """An MD that kept the hop-by-hop keys the KD gave it (RFC 9185 MediaKeys, via the tap).

    ``association`` arguments are the MD's association UUID strings (as in
    :attr:`~perc_daemons.endpoint.md.JoinResponse.association`).  The outer
    layer is plain RFC 7714 SRTP in libsrtp sessions, one inbound per sender
    (its ``client_write`` key) and one outbound per receiver (its
    ``server_write`` key), kept across calls like the real MD keeps them: the
    packet index (ROC) is estimated from the sequence numbers seen, so open
    a sender's datagrams in order from its first one, and seal for a
    receiver in order from the first one the real MD would have delivered to
    it (or renumber with ``seq=``).
    """

    def __init__(self, tap: Any = None, *,
                 endpoints: Iterable[RecordingEndpoint] = ()) -> None:
        self.tap = tap
        self.endpoints = list(endpoints)
        self._inbound: dict[str, Any] = {}
        self._outbound: dict[str, Any] = {}

    def media_keys(self, association: str) -> MediaKeys:
        """The (last) MediaKeys the MD was sent for ``association``."""
        wanted = uuid.UUID(association).bytes
        for endpoint in self.endpoints:
            if endpoint.media_keys is not None and (
                    endpoint.media_keys.association_id == wanted):
                return endpoint.media_keys
        if self.tap is None:
            raise KeyError(f"no endpoint with association {association} has MediaKeys")
        found = [m for m in self.tap.messages_to_md()
                 if isinstance(m, MediaKeys) and m.association_id == wanted]
        if not found:
            raise KeyError(f"no MediaKeys for association {association} in the tap")
        return found[-1]

    def hop_keys(self) -> list[bytes]:
        """Every outer key and salt in every MediaKeys the MD was sent."""
        return [k for m in self.tap.messages_to_md() if isinstance(m, MediaKeys)
                for k in (m.client_write_key, m.client_write_salt,
                          m.server_write_key, m.server_write_salt)]

    def open(self, sender: str, datagram: bytes) -> Relay:
        """The sender's outer layer removed (RFC 8723 s5.2): a :class:`Relay` holding
        the packet (header, inner ciphertext, inner tag, OHB) and the EKTField."""
        session = self._inbound.get(sender)
        if session is None:
            keys = self.media_keys(sender)
            session = self._inbound[sender] = libsrtp_session(
                keys.client_write_key, keys.client_write_salt, inbound=True)
        relay = Relay()
        relay.open(datagram, session)
        return relay

    def seal(self, relay: Relay, receiver: str) -> bytes:
        """The receiver's outer layer applied, the EKTField appended."""
        session = self._outbound.get(receiver)
        if session is None:
            keys = self.media_keys(receiver)
            session = self._outbound[receiver] = libsrtp_session(
                keys.server_write_key, keys.server_write_salt, inbound=False)
        return relay.seal(session)

    def forward(self, datagram: bytes, sender: str, receiver: str, *,
                seq: int | None = None, tamper: Callable[[Relay], None] | None = None
                ) -> bytes:
        """:meth:`open`, optionally renumber SEQ (original kept in the OHB,
        :meth:`Relay.edit`) and ``tamper(relay)`` (edit ``relay.packet`` /
        ``relay.ekt_field``), then :meth:`seal`."""
        relay = self.open(sender, datagram)
        if seq is not None:
            relay.edit(seq=seq)
        if tamper is not None:
            tamper(relay)
        return self.seal(relay, receiver)


# --- the stack fixture ----------------------------------------------------------------------


class StackTestCase(unittest.TestCase):
    """A fresh LocalStack per test (see the module docstring)."""

    timeout = 60
    users: Sequence[str] = ("alice", "bob", "carol", "dave", "erin")
    invited: Sequence[str] = ("alice", "bob", "carol", "erin")
    conference = "e2e"
    late_joiners_get_earlier_epochs = False
    tap = True
    static_mds = True
    create_conference = True
    settings: dict[str, dict[str, dict[str, Any]]] = {}
    extra_mds = 0
    cluster = False

    async def setUp(self) -> None:
        self.endpoints: list[RecordingEndpoint] = []
        for attempt in range(1, START_ATTEMPTS + 1):
            self.stack = LocalStack(self.mktemp(), reactor, users=self.users, tap=self.tap,
                                    static_mds=self.static_mds, settings=self.settings,
                                    extra_mds=self.extra_mds, cluster=self.cluster,
                                    **self.stack_options())
            try:
                self.stack.prepare()
                await self.stack.start_all()
                break
            except Exception:
                await self.stack.stop_all()
                # LocalStack picks free ports before the daemons bind them: another
                # process (tests running in parallel) may take one in between.
                if "Address already in use" not in self.stack.logs() or (
                        attempt == START_ATTEMPTS):
                    self._dump_logs("setUp failed")
                    raise
                sys.stderr.write(f"\nport taken meanwhile, starting the stack again "
                                 f"(attempt {attempt + 1})\n")
        try:
            if self.create_conference:
                await self.stack.create_conference(
                    self.conference, list(self.invited),
                    late_joiners_get_earlier_epochs=self.late_joiners_get_earlier_epochs,
                    policy=self.conference_policy())
                await self.stack.wait_for_kd(self.conference)
        except BaseException:
            self._dump_logs("setUp failed")
            await self.stack.stop_all()
            raise

    def conference_policy(self) -> dict[str, Any]:
        """More members of the KMF conference (docs/API.md "Policy"), e.g. ``starts_at``."""
        return {}

    def stack_options(self) -> dict[str, Any]:
        """More keyword arguments of the :class:`LocalStack` (e.g. ``md_hosts``)."""
        return {}

    async def tearDown(self) -> None:
        try:
            for endpoint in self.endpoints:
                try:
                    await endpoint.leave()
                except Exception as e:  # the MD may be gone: keep stopping everything
                    sys.stderr.write(f"{endpoint.label}: leave failed: {e}\n")
        finally:
            await self.stack.stop_all()
            if not getattr(self, "_passed", True):
                self._dump_logs(f"{self.id()} failed")

    def _dump_logs(self, why: str) -> None:
        text = self.stack.logs()
        path = os.path.join(self.stack.dir, "stack-logs.txt")
        try:
            os.makedirs(self.stack.dir, exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError:
            path = "(not written)"
        sys.stderr.write(f"\n=== {why}: daemon logs (all of them in {path}) ===\n"
                         f"{text[-8000:]}\n=== end of daemon logs ===\n")

    # --- endpoints ----------------------------------------------------------------------

    def endpoint(self, user: str, source: MediaSource | None = None, *, md: str = "md",
                 **kwargs: Any) -> RecordingEndpoint:
        """A RecordingEndpoint for ``user`` in the conference, joining through MD ``md``
        ("md", or an extra one: "md2", ...), left in tearDown."""
        stack = self.stack
        endpoint = RecordingEndpoint(
            reactor, kmf_url=stack.kmf_url, md_url=stack.md_api_url(md), ca=stack.ca_path,
            conference_id=kwargs.pop("conference_id", self.conference), user=user,
            password=stack.password, kd_names=[KD_NAME], source=source,
            label=kwargs.pop("label", user), **kwargs)
        self.endpoints.append(endpoint)
        return endpoint

    async def join(self, *users: str, recording: bool = True, md: str = "md"
                   ) -> dict[str, RecordingEndpoint]:
        """Join ``users`` through MD ``md`` one after the other, each with a recorded
        :class:`NoiseSource` (``endpoint.source``); then wait until all hold the same
        newest EKT key."""
        joined = {}
        for user in users:
            source = RecordingSource(NoiseSource()) if recording else None
            endpoint = self.endpoint(user, source, md=md)
            await endpoint.join()
            joined[user] = endpoint
        await self.same_epoch(*joined.values())
        return joined

    async def same_epoch(self, *endpoints: RecordingEndpoint) -> int:
        """Wait until every endpoint's newest EKT key is the same one; its SPI."""
        await wait_for(lambda: len({e.current_spi for e in endpoints}) == 1,
                       "the endpoints hold the same newest EKT key")
        spi = endpoints[0].current_spi
        assert spi is not None
        return spi

    async def md_participants(self) -> list[dict[str, Any]]:
        body = await self.stack.md_conference(self.conference)
        return list(body.get("participants", []))
