"""The reference PERC endpoint: Twisted glue around the sans-I/O ParticipantSession.

:class:`Endpoint` joins one conference the way DESIGN.md's join flow says:

1. a fresh self-signed DTLS certificate
   (:func:`~perc_daemons.protocol.dtls.generate_certificate`), also the TLS
   client certificate toward the KMF, so the access token is bound to it
   (RFC 8705 s3);
2. OAuth login at the KMF (authorization code + PKCE, :mod:`.kmf`);
3. an RFC 8827 identity assertion for the certificate's fingerprint, audience
   the conference id;
4. the offer (:func:`~perc_daemons.protocol.participant.build_offer`) POSTed
   to the MD; the KD-signed answer is verified
   (:func:`~perc_daemons.protocol.answer.verify_signed_answer`: chain to the
   CA, one of the configured KD names, offer and answer hashes) and must name
   our association, conference and identity, or no media is ever sent;
5. UDP to the MD's media address: ICE-lite connectivity checks, DTLS-SRTP
   with the KD through the MD (RFC 8871, RFC 9185), then waiting for the
   first EKTKey (RFC 8870 s5.2.2), with a timeout;
6. media from a source (:mod:`.media`) through
   :meth:`~perc_daemons.protocol.participant.ParticipantSession.send_media`
   (double encryption, RFC 8723), received media counted per sender SSRC
   and, when asked, written to one WAV file per sender;
7. the KD-signed roster from the KMF, verified with the KMF's JWKS, fetched
   at join, on every new EKT key and periodically; every SSRC we received
   packets from (decrypted or not) must belong to a roster member, else it is
   recorded as a failure (an unknown sender in the conference);
8. leave: close_notify to the KD (DTLS), then DELETE at the MD with the
   leave token;
9. as an SFU's participant (issue 13): ``video="simulcast"`` adds three
   simulcast video encodings (:class:`~perc_daemons.endpoint.media.SimulcastVideo`
   on :attr:`Endpoint.video_ssrcs`, frame marking on every packet, a PLI
   or FIR for one of them makes its next frame a key frame); every audio
   packet carries its RFC 6464 level (:func:`~perc_daemons.endpoint.media.audio_level`;
   :attr:`Endpoint.talking` False sends quiet-room noise, level about 60); an
   RR, with ``bandwidth`` a REMB, goes out every ``rtcp_interval``; the
   join body carries ``receive`` (``last_n``, ``max_height``,
   ``max_bitrate``); the MD's speaker hints are kept in
   :attr:`Endpoint.speaker_hints`;
10. rejoin when orphaned (:class:`OrphanWatch`): a verified roster of a newer
   epoch than the one that last listed us omits our SSRC, and no EKTKey
   explains it (a restarted perc-kd forgot our association: it rekeys and
   reports rosters without us).  The old session is dropped (its later
   events are ignored), its participant deleted at the MD, and a new
   association made: a fresh offer (same certificate and SSRC, new ICE
   credentials and tls-id; the identity assertion renewed when older than
   :data:`ASSERTION_MAX_AGE`, the KMF login renewed when the token is
   refused or about to expire), a newly verified answer, a new session on
   the same UDP port continuing our RTP sequence numbers.  Media keeps going
   (frames are dropped, counted in ``sent.not_ready``, while no session is
   ready); per sender statistics continue.  Failed attempts are retried with
   back-off, then recorded as a failure.  Never after ``leave()`` nor after
   the session was closed (a close_notify from the KD revokes the keys: the
   conference ended).

Every step fails with a typed error (:class:`JoinFailed` and subclasses,
:class:`~perc_daemons.endpoint.kmf.LoginFailed`,
:class:`~perc_daemons.endpoint.md.JoinRefused`, ...).  Tokens and keys are
never logged.  ``join()``, ``run_media(duration)``, ``check_roster()`` and
``leave()`` return Deferreds; ``stats()`` returns the statistics dict (JSON
ready) at any time.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet import defer, task
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from perc_daemons.endpoint.history import (
    CaptureFile,
    HistoryError,
    HistoryResult,
    decrypt_history,
)
from perc_daemons.endpoint.https import EndpointError, load_ca
from perc_daemons.endpoint.kmf import (
    DEFAULT_CLIENT_ID,
    DEFAULT_REDIRECT_URI,
    KmfClient,
    KmfRefused,
    LoginFailed,
)
from perc_daemons.endpoint.md import JoinRefused, JoinResponse, MdClient
from perc_daemons.endpoint.media import (
    QUIET_FRAMES,
    MediaFrame,
    MediaSource,
    SimulcastVideo,
    ToneSource,
    VideoSource,
    WavSinks,
    audio_level,
)
from perc_daemons.protocol.answer import AnswerError, VerifiedAnswer, verify_signed_answer
from perc_daemons.protocol.dtls import certificate_fingerprint, generate_certificate
from perc_daemons.protocol.ekt import FULL_EKT_TYPE
from perc_daemons.protocol.extensions import FrameMarks
from perc_daemons.protocol.identity import normalize_identity
from perc_daemons.protocol.participant import (
    NO_KEY_REASONS,
    Closed,
    Connected,
    DecryptFailed,
    EktKeyInstalled,
    KeyframeRequested,
    MediaReceived,
    NotReady,
    ParticipantSession,
    Refused,
    SenderStats,
    SpeakerHintReceived,
    build_offer,
    new_ice_credentials,
    new_tls_id,
)
from perc_daemons.protocol.roster import Roster, RosterError
from perc_daemons.protocol.srtp import LAYER_KEY_LENGTH, Profile

__all__ = [
    "DEFAULT_KD_NAMES",
    "AnswerRejected",
    "ConnectTimeout",
    "Endpoint",
    "EndpointError",
    "IdentityMismatch",
    "JoinFailed",
    "OrphanWatch",
    "SessionRefused",
    "login_name",
]

DEFAULT_KD_NAMES = ("kd.localhost",)
#: Most silence-compatible payloads: PCMU frames are 160 bytes; bigger ones are not audio.
_MAX_AUDIO_PAYLOAD = 480
_MAX_CATCH_UP = 5  # frames sent at once when the reactor was late
#: An identity assertion older than this (seconds) is not reused in a new offer (the
#: KMF's assertions live 120 s; the KD checks ``exp``).
ASSERTION_MAX_AGE = 60.0
#: The KMF login is renewed before a request when the token expires within this (seconds).
TOKEN_MARGIN = 30.0


class JoinFailed(EndpointError):
    """Joining failed at ``stage`` (login, assertion, offer, answer or connect)."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(f"{stage}: {message}")
        self.stage = stage
        self.message = message


class IdentityMismatch(JoinFailed):
    """The KMF signed us in as another identity than the one asked for."""

    def __init__(self, message: str) -> None:
        super().__init__("login", message)


class AnswerRejected(JoinFailed):
    """The MD's answer is not a valid KD-signed answer to our offer: no media is sent."""

    def __init__(self, message: str) -> None:
        super().__init__("answer", message)


class ConnectTimeout(JoinFailed):
    """ICE/DTLS did not complete, or no EKTKey arrived, in time."""

    def __init__(self, message: str) -> None:
        super().__init__("connect", message)


class SessionRefused(JoinFailed):
    """The session failed closed (no DOUBLE profile, no EKT, DTLS failure, closed)."""

    def __init__(self, message: str) -> None:
        super().__init__("connect", message)


def login_name(user: str) -> tuple[str, str | None]:
    """(name to sign in with, expected identity or None) of a ``--user`` value.

    ``alice@localhost`` signs in as ``alice`` and must come out as the
    identity ``alice@localhost``; a bare ``alice`` is sent as it is and the
    identity is whatever the KMF asserts.
    """
    if "@" in user:
        name, _, _domain = user.rpartition("@")
        return name, normalize_identity(user)
    return user, None


def sender_json(stats: SenderStats, identity: str | None,
                recording: str | None) -> dict[str, Any]:
    """One sender's statistics for ``stats()`` (losses never negative)."""
    return {"ssrc": stats.ssrc, "identity": identity, "packets": stats.packets,
            "bytes": stats.bytes, "losses": max(0, stats.lost),
            "decrypt_failures": stats.decrypt_failures, "no_key": stats.no_key,
            "nacked": stats.nacked, "recovered": stats.recovered,
            "epochs_seen": sorted(stats.epochs_seen), "recording": recording}


def frame_marks(frame: MediaFrame) -> FrameMarks:
    """The frame marking of a one-packet frame (draft-ietf-avtext-framemarking-16 s3.1):
    start and end of the frame, independent for a key frame."""
    return FrameMarks(True, True, frame.keyframe, False, False, 0, None, None)


class OrphanWatch:
    """When a verified roster says the KD no longer holds our association (pure rule).

    No clock, no I/O: the caller passes ``now``.  The rule: a roster for a
    newer epoch than :attr:`baseline` (the newest epoch whose roster listed
    our SSRC for our identity, or the newest roster known when the
    association became ready) that does not list us makes us *suspect*; we
    are *orphaned* when the omission persists for ``grace`` seconds and at
    least ``confirmations`` more roster fetches, without an EKTKey installed
    meanwhile.  The KD sends an epoch's EKTKey (RFC 8870 s5.2.2) before it
    reports that epoch's roster, so a key installed during the grace (or
    less than ``grace`` before the omitting roster arrived) explains a
    roster that is merely late: the suspicion is dropped.  A roster of the
    baseline epoch or older says nothing (it may predate our join).
    """

    def __init__(self, grace: float = 1.0, confirmations: int = 1) -> None:
        if grace < 0 or confirmations < 0:
            raise ValueError("grace and confirmations must not be negative")
        self.grace = grace
        self.confirmations = confirmations
        #: Newest epoch that listed us (or known when we became ready); None: none yet.
        self.baseline: int | None = None
        self.suspected_at: float | None = None
        self.omissions = 0
        self.last_key_at: float | None = None

    def __repr__(self) -> str:
        return (f"<OrphanWatch baseline={self.baseline} suspected_at={self.suspected_at} "
                f"omissions={self.omissions}>")

    def associated(self, epoch: int | None) -> None:
        """A (new) association is ready; ``epoch`` is the newest roster epoch known."""
        self.baseline = epoch
        self._clear()

    def key_installed(self, now: float) -> None:
        """An EKTKey arrived: the KD holds our association (for now)."""
        self.last_key_at = now
        self._clear()

    def _clear(self) -> None:
        self.suspected_at = None
        self.omissions = 0

    def roster(self, epoch: int, listed: bool, now: float) -> bool:
        """A verified roster of ``epoch`` that does or does not list us; True: orphaned."""
        if listed:
            if self.baseline is None or epoch > self.baseline:
                self.baseline = epoch
            self._clear()
            return False
        if self.baseline is None:  # the first roster seen may predate our join
            self.baseline = epoch
            return False
        if epoch <= self.baseline:
            return False
        if self.last_key_at is not None and now - self.last_key_at < self.grace:
            self._clear()  # a fresh key: the roster naming us is probably on its way
            return False
        if self.suspected_at is None:
            self.suspected_at, self.omissions = now, 0
            return False
        self.omissions += 1
        return (now - self.suspected_at >= self.grace
                and self.omissions >= self.confirmations)


class _MediaProtocol(DatagramProtocol):
    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.endpoint._datagram(datagram, addr)


class Endpoint:
    """One participant: ``join()``, ``run_media(duration)``, ``check_roster()``, ``leave()``.

    ``ca`` is the path of the CA certificate(s) trusted for the KMF's and the
    MD's HTTPS and for the KD's answer signature; ``kd_names`` the DNS names
    an answer-signing KD certificate may have.  ``kind`` is ``audio`` (PCMU)
    or ``video`` (VP8-like); ``source`` defaults to a 440 Hz tone or a 50 pps
    video source.  ``record_dir`` writes one WAV file per audio sender.
    ``capture`` writes every packet received, outer layer off, to that file (a
    recording kept as ciphertext); ``history`` decrypts such a file once joined,
    with the earlier epochs' keys if the conference's policy gives them
    (:mod:`.history`; WAVs under ``record_dir/history``, :attr:`history`).

    For load generation (``bench/conference.py``): ``decrypt_every=N`` (N > 1)
    is a lighter receive mode.  Every RTP datagram from the MD is counted per
    SSRC from its outer header in :attr:`relayed` (packets, bytes, losses
    from the sequence numbers; nothing is authenticated there), but only
    every N-th one, and every one ending in a FullEKTField (so that senders'
    keys are still learnt), goes through both layers; the rest are dropped
    unverified.  :attr:`senders` then counts the decrypted sample only, so
    its losses are meaningless.  ``on_media(event, now)`` is called with each
    decrypted :class:`~perc_daemons.protocol.participant.MediaReceived`.
    ``receive_buffer`` sets SO_RCVBUF of the media socket (bytes; the kernel
    caps it at net.core.rmem_max).

    SFU participation (module docstring, step 9): ``video="simulcast"``
    (with ``kind="audio"``) also sends ``video_source`` (default
    :class:`SimulcastVideo`) on three more SSRCs; ``audio_level`` False
    leaves the RFC 6464 extension out of the offer; ``bandwidth`` (bits/s)
    is the REMB sent with every RR (each ``rtcp_interval`` seconds);
    ``receive`` goes into the join body (``{"last_n", "max_height",
    "max_bitrate"}``, all optional); :meth:`set_receive` changes it later.

    ``via`` (host, port): a relay on the media path (a test's loss or delay
    proxy, a port forward).  Every media datagram (STUN, DTLS, SRTP, SRTCP)
    is sent there rather than to the answer's candidate, and datagrams from
    there are taken as the MD's (from nowhere else); the relay forwards them
    to and from the MD, which learns the relay's address from our checks
    (it is ICE-lite, RFC 8445 s7.3).  Nothing about the keys changes: the
    relay sees what any network hop sees.

    ``rejoin`` (default True) joins again when orphaned (see the module
    docstring, step 9): ``orphan_grace`` is :class:`OrphanWatch`'s grace,
    ``rejoin_attempts`` the attempts per rejoin, ``rejoin_delay`` the first
    back-off between them (doubling).  :attr:`rejoins` records each rejoin.
    """

    log = Logger()

    def __init__(self, reactor: Any, *, kmf_url: str, md_url: str, ca: str,
                 conference_id: str, user: str, password: str,
                 kd_names: Sequence[str] = DEFAULT_KD_NAMES, kind: str = "audio",
                 source: MediaSource | None = None, record_dir: str | None = None,
                 bind: tuple[str, int] = ("127.0.0.1", 0), connect_timeout: float = 15.0,
                 client_id: str = DEFAULT_CLIENT_ID, redirect_uri: str = DEFAULT_REDIRECT_URI,
                 issuer: str | None = None, roster_interval: float = 2.0,
                 roster_wait: float = 5.0, max_decrypt_failure_ratio: float = 0.05,
                 expect_senders: int = 0, label: str | None = None,
                 decrypt_every: int = 1,
                 on_media: Callable[[MediaReceived, float], object] | None = None,
                 receive_buffer: int | None = None, rejoin: bool = True,
                 orphan_grace: float = 1.0, rejoin_attempts: int = 4,
                 rejoin_delay: float = 1.0, audit_secrets: bool = False,
                 video: str | None = None, video_source: SimulcastVideo | None = None,
                 audio_level: bool = True, bandwidth: int | None = None,
                 receive: Mapping[str, int] | None = None,
                 rtcp_interval: float = 1.0, via: tuple[str, int] | None = None,
                 capture: str | None = None, history: str | None = None) -> None:
        if kind not in ("audio", "video"):
            raise ValueError("kind must be audio or video")
        if video not in (None, "simulcast"):
            raise ValueError("video must be None or 'simulcast'")
        if video is not None and kind != "audio":
            raise ValueError("video='simulcast' goes with kind='audio' (audio plus video)")
        if bandwidth is not None and bandwidth < 0:
            raise ValueError("bandwidth must be a non-negative bitrate (bits/s)")
        if not rtcp_interval > 0:
            raise ValueError("rtcp_interval must be positive")
        if decrypt_every < 1:
            raise ValueError("decrypt_every must be at least 1")
        self.reactor = reactor
        self.kmf_url, self.md_url, self.ca_path = kmf_url, md_url, ca
        self.conference_id = conference_id
        self.user = user
        self._password = password
        self.kd_names = tuple(kd_names)
        self.kind = kind
        self.source = source
        self.record_dir = record_dir
        #: A capture file to write (:mod:`.history`), a recording to decrypt once joined.
        self.capture_path = capture
        self.history_path = history
        self._capture: CaptureFile | None = None
        #: What decrypting ``history`` gave (None before / without it).
        self.history: HistoryResult | None = None
        self.bind = bind
        self.connect_timeout = connect_timeout
        self.client_id, self.redirect_uri, self.issuer = client_id, redirect_uri, issuer
        self.roster_interval = roster_interval
        self.roster_wait = roster_wait
        self.max_decrypt_failure_ratio = max_decrypt_failure_ratio
        self.expect_senders = expect_senders
        self.label = label or user
        self.decrypt_every = decrypt_every
        #: keep copies of every key for session.audit_secrets() (proofs only: demo, tests)
        self.audit_secrets = audit_secrets
        self.on_media = on_media
        self.receive_buffer = receive_buffer
        if rejoin_attempts < 1 or rejoin_delay < 0:
            raise ValueError("rejoin_attempts must be at least 1, rejoin_delay not negative")
        self.rejoin = rejoin
        self.rejoin_attempts = rejoin_attempts
        self.rejoin_delay = rejoin_delay
        self.video = video
        self.video_source = (video_source or SimulcastVideo()) if video is not None else None
        self.audio_level = audio_level
        self.bandwidth = bandwidth
        self.receive = dict(receive) if receive is not None else None
        self.rtcp_interval = rtcp_interval
        #: The relay media goes through (None: straight to the MD's candidate).
        self.via = (via[0], int(via[1])) if via is not None else None
        #: False: audio frames are sent as digital silence (RFC 6464 level 127).
        self.talking = True
        self._quiet = 0
        #: The MD's speaker hints: {"at", "sequence", "speakers"} (at: seconds from offer).
        self.speaker_hints: list[dict[str, Any]] = []
        #: PLI/FIR received per our SSRC.
        self.keyframe_requests: dict[int, int] = {}
        self._video_sending: task.LoopingCall | None = None
        self._rtcp_loop: task.LoopingCall | None = None
        # state
        self.kmf: KmfClient | None = None
        self.md: MdClient | None = None
        self.identity: str | None = None
        self.ssrc = secrets.randbits(32) or 1
        ssrcs = {self.ssrc}
        #: The simulcast video SSRCs (h, m, l), or none.
        self.video_ssrcs: list[int] = []
        while video is not None and len(self.video_ssrcs) < 3:
            candidate = secrets.randbits(32)
            if candidate and candidate not in ssrcs:
                ssrcs.add(candidate)
                self.video_ssrcs.append(candidate)
        #: Per sending SSRC: packets, bytes, retransmitted, summed over every session.
        self._sent_before: dict[int, dict[str, int]] = {}
        self.session: ParticipantSession | None = None
        self.answer: VerifiedAnswer | None = None
        self.joined: JoinResponse | None = None
        self._port: Any = None
        self._timer: Any = None
        self._ready: defer.Deferred[None] | None = None
        self._sending: task.LoopingCall | None = None
        self._roster_loop: task.LoopingCall | None = None
        self._roster_refresh: Any = None
        self._sinks: WavSinks | None = None
        self.profile: str | None = None
        self.ekt_cipher: str | None = None
        self.epochs_installed: list[int] = []
        self.senders: dict[int, SenderStats] = {}
        #: decrypt_every > 1: every RTP datagram per SSRC, from the outer header only.
        self.relayed: dict[int, SenderStats] = {}
        self._light_count = 0
        self.identities: dict[int, str] = {}  # SSRC -> identity, from every verified roster
        self.roster: Roster | None = None
        self.failures: list[str] = []
        self.closed_reason: str | None = None
        self.refused_reason: str | None = None
        self.unattributed_decrypt_failures = 0
        self.foreign_datagrams = 0
        self.sent_packets = 0
        self.sent_bytes = 0
        self.send_not_ready = 0
        self.offer_at: float | None = None
        self.offer: str | None = None  # the SDP offer sent to the MD (public)
        self.ready_at: float | None = None
        self.first_media_at: float | None = None
        self.left = False
        # rejoining (step 9)
        self.orphans = OrphanWatch(grace=orphan_grace)
        #: One record per rejoin: reason, when, attempts, outcome, new association.
        self.rejoins: list[dict[str, Any]] = []
        self.logins = 0
        self._rejoining: defer.Deferred[None] | None = None
        self._rejoin_wait: defer.Deferred[None] | None = None
        self._leaving = False
        self._ca: Sequence[Any] = ()
        self._certificate: tuple[bytes, Any] | None = None
        self._cname = secrets.token_urlsafe(12)
        self._assertion: tuple[float, str] | None = None

    def __repr__(self) -> str:
        return (f"<Endpoint {self.label} conference={self.conference_id!r} "
                f"ssrc={self.ssrc:#010x} ready={self.ready_at is not None}>")

    def now(self) -> float:
        return self.reactor.seconds()

    # --- join ------------------------------------------------------------------------------

    def join(self) -> defer.Deferred[None]:
        """Log in, assert, offer, verify the answer, connect; fires when keys are installed."""
        return defer.ensureDeferred(self._join())

    async def _join(self) -> None:
        self._ca = ca = load_ca(self.ca_path)
        der, key = generate_certificate(f"perc-endpoint {self.label}")
        self._certificate = (der, key)
        self.kmf = KmfClient(self.reactor, self.kmf_url, ca=ca, certificate=(der, key),
                             client_id=self.client_id, redirect_uri=self.redirect_uri,
                             issuer=self.issuer)
        self.md = MdClient(self.reactor, self.md_url, ca=ca)
        await self._login()
        if self.capture_path is not None and self._capture is None:
            try:
                self._capture = CaptureFile(self.capture_path, self.conference_id)
            except OSError as e:
                raise JoinFailed("capture", f"--capture {self.capture_path}: "
                                            f"{e.strerror or e}") from None
        session = await self._associate()
        if self.record_dir is not None:
            self._sinks = WavSinks(self.record_dir)
        self._port = self.reactor.listenUDP(self.bind[1], _MediaProtocol(self),
                                            interface=self.bind[0])
        if self.receive_buffer is not None:
            self._port.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF,
                                         self.receive_buffer)
        try:
            await self._connect(session)
        except (ConnectTimeout, SessionRefused):
            await self._abort()
            raise
        self.ready_at = self.now()
        self.log.info("{label}: connected ({profile}, {cipher}) in {seconds:.3f} s",
                      label=self.label, profile=self.profile, cipher=self.ekt_cipher,
                      seconds=self.ready_at - self.offer_at)
        self.orphans.associated(None)
        self._rtcp_loop = task.LoopingCall(self._rtcp_tick)
        self._rtcp_loop.clock = self.reactor
        self._rtcp_loop.start(self.rtcp_interval, now=False)
        await self._refresh_roster()
        self._roster_loop = task.LoopingCall(self._roster_tick)
        self._roster_loop.clock = self.reactor
        self._roster_loop.start(self.roster_interval, now=False)
        if self.history_path is not None:
            await self._decrypt_history(self.history_path)

    async def _decrypt_history(self, path: str) -> None:
        """The recording at ``path`` decrypted with the earlier epochs' keys (a
        failure recorded if the KMF refuses them: the conference's policy)."""
        assert self.kmf is not None and self.profile is not None
        try:
            self.history = await decrypt_history(
                self.kmf, self.conference_id, LAYER_KEY_LENGTH[Profile[self.profile]], path,
                self.record_dir)
        except (HistoryError, EndpointError) as e:
            self.failures.append(f"history not decrypted: {e}")
            self.log.warn("{label}: history not decrypted: {error}", label=self.label,
                          error=str(e))
            return
        self.log.info("{label}: history: {packets} of {records} recorded packets decrypted "
                      "with the keys of epochs {epochs}", label=self.label,
                      packets=sum(self.history.decrypted.values()),
                      records=self.history.records, epochs=self.history.epochs)

    async def _login(self) -> None:
        """Sign in at the KMF (again: the identity must stay the same)."""
        assert self.kmf is not None
        name, expected = login_name(self.user)
        await self.kmf.login(name, self._password)
        self.logins += 1
        subject = self.kmf.subject
        if self.identity is not None and subject != self.identity:
            raise IdentityMismatch(f"signed in again as {subject!r}, not {self.identity!r}")
        self.identity = subject
        if expected is not None and self.identity != expected:
            raise IdentityMismatch(f"signed in as {self.identity!r}, not {expected!r}")

    async def _with_token(self, call: Callable[[], Any]) -> Any:
        """``await call()`` with a valid KMF token: signs in again when it is about to
        expire or the KMF refuses it (401), with the kept password."""
        assert self.kmf is not None
        expires = self.kmf.token_expires_at
        if expires is not None and expires - self.now() < TOKEN_MARGIN:
            await self._login()
        try:
            return await call()
        except KmfRefused as e:
            if e.status != 401:
                raise
            self.log.info("{label}: the KMF refused our token ({error}): signing in again",
                          label=self.label, error=str(e))
        await self._login()
        return await call()

    async def _identity_assertion(self) -> str:
        """An RFC 8827 assertion for our certificate, reused while younger than
        :data:`ASSERTION_MAX_AGE`."""
        assert self.kmf is not None
        if self._assertion is not None and self.now() - self._assertion[0] < ASSERTION_MAX_AGE:
            return self._assertion[1]
        kmf = self.kmf
        assertion: str = await self._with_token(lambda: kmf.assertion(self.conference_id))
        self._assertion = (self.now(), assertion)
        return assertion

    async def _associate(self, initial_sequence: Mapping[int, int] | None = None
                         ) -> ParticipantSession:
        """Offer (our certificate and SSRC, fresh ICE credentials and tls-id), join at the
        MD, verify the signed answer: the session to connect (not started yet).

        Sets :attr:`offer`, :attr:`joined` and :attr:`answer`; an unusable answer
        deletes the participant at the MD again and raises :class:`AnswerRejected`.
        """
        assert self.md is not None and self._certificate is not None
        der, key = self._certificate
        assertion = await self._identity_assertion()
        ufrag, pwd = new_ice_credentials()
        tls_id = new_tls_id()
        offer = build_offer(assertion_json=assertion, fingerprint=certificate_fingerprint(der),
                            tls_id=tls_id, ice_ufrag=ufrag, ice_pwd=pwd, ssrc=self.ssrc,
                            cname=self._cname, kind=self.kind, video_ssrcs=self.video_ssrcs,
                            audio_level=self.audio_level)
        self.offer = offer
        if self.offer_at is None:  # the first offer: connect and join times count from here
            self.offer_at = self.now()
        if self.receive is None:
            self.joined = await self.md.join(self.conference_id, offer)
        else:
            self.joined = await self.md.join(self.conference_id, offer, receive=self.receive)
        try:
            self.answer = self._verify_answer(self.joined, offer, self._ca)
        except AnswerRejected:
            await self._forget_at_md()
            raise
        self.log.info("{label}: answer signed by {kd} for {identity}, association "
                      "{association}", label=self.label, kd=self.answer.kd_name,
                      identity=self.identity, association=self.joined.association)
        try:
            session = ParticipantSession(
                certificate=der, private_key=key, ssrc=self.ssrc, ice_ufrag=ufrag,
                ice_pwd=pwd, tls_id=tls_id, answer=self.answer,
                initial_sequence=initial_sequence, keep_audit_secrets=self.audit_secrets,
                video_ssrcs=self.video_ssrcs, nack=self.decrypt_every == 1)
        except ValueError as e:  # a signed answer we cannot use (no candidate, ...)
            await self._forget_at_md()
            raise AnswerRejected(f"unusable answer: {e}") from None
        if self._capture is not None:
            session.capture = self._capture.write
        return session

    async def _connect(self, session: ParticipantSession) -> None:
        """Make ``session`` current, start it, wait for its first EKTKey.

        Raises :class:`ConnectTimeout` or :class:`SessionRefused`; the caller
        cleans up (:meth:`_abort` or :meth:`_drop_session`).
        """
        self.session = session
        ready = self._ready = defer.Deferred()
        self._send(session.start(self.now()))
        self._after_input()
        ready.addTimeout(self.connect_timeout, self.reactor)
        try:
            await ready
        except defer.TimeoutError:
            raise ConnectTimeout(f"no connection and EKT key within {self.connect_timeout} s "
                                 f"(MD media address {session.md_address})") from None

    def _verify_answer(self, joined: JoinResponse, offer: str, ca: Sequence[Any]
                       ) -> VerifiedAnswer:
        try:
            verified = verify_signed_answer(joined.signed_answer, offer, trust_roots=ca,
                                            kd_names=self.kd_names, now=self.now())
        except AnswerError as e:
            raise AnswerRejected(f"{type(e).__name__}: {e}") from None
        if verified.association_id != joined.association_id:
            raise AnswerRejected("the signed answer is for another association")
        if verified.conference_id != self.conference_id:
            raise AnswerRejected("the signed answer is for another conference")
        if verified.identity != self.identity:
            raise AnswerRejected(f"the signed answer names {verified.identity!r}, "
                                 f"not {self.identity!r}")
        return verified

    async def _forget_at_md(self) -> None:
        if self.md is None or self.joined is None:
            return
        try:
            await self.md.leave(self.conference_id, self.joined)
        except Exception as e:
            self.log.warn("{label}: leaving the MD failed: {error}", label=self.label,
                          error=str(e))
        self.joined = None

    async def _abort(self) -> None:
        self._stop_timer()
        if self.session is not None:
            self._send(self.session.close(self.now()))
        await self._forget_at_md()
        await self._release()

    # --- rejoining (module docstring, step 9) ------------------------------------------------

    def _check_orphaned(self, roster: Roster) -> None:
        """Feed a verified roster to :attr:`orphans`; rejoin when it says we are orphaned."""
        session = self.session
        if (session is None or self.ready_at is None or self._rejoining is not None
                or self.identity is None):
            return
        listed = roster.identity_of(self.ssrc) == self.identity
        if self.orphans.roster(roster.epoch, listed, self.now()):
            self._start_rejoin(f"the roster of epoch {roster.epoch} does not list our SSRC "
                               f"{self.ssrc:#010x} for {self.identity}, and no EKTKey "
                               f"explains it: the KD no longer holds our association")

    def _may_rejoin(self) -> bool:
        return (self.rejoin and not self._leaving and not self.left
                and self.closed_reason is None and self.ready_at is not None)

    def _start_rejoin(self, reason: str) -> None:
        if not self._may_rejoin() or self._rejoining is not None:
            return
        record: dict[str, Any] = {
            "reason": reason, "at": self._elapsed(self.now()), "attempts": 0,
            "outcome": "pending", "errors": [],
            "old_association": self.joined.association if self.joined is not None else None,
            "association": None, "connect_time": None}
        self.rejoins.append(record)
        self.log.warn("{label}: orphaned, joining again (rejoin {count}): {reason}",
                      label=self.label, count=len(self.rejoins), reason=reason)
        rejoining = self._rejoining = defer.ensureDeferred(self._rejoin(record))

        def done(result: Any) -> None:
            if self._rejoining is rejoining:
                self._rejoining = None
            if isinstance(result, Failure):
                record["outcome"] = "failed"
                failure = f"rejoin failed: {result.getErrorMessage()}"
                self.failures.append(failure)
                self.log.failure("{label}: rejoin failed", result, label=self.label)

        rejoining.addBoth(done)

    async def _rejoin(self, record: dict[str, Any]) -> None:
        """Drop the orphaned session, then try new associations with back-off."""
        old = self.session
        self._drop_session()
        await self._forget_at_md()
        delay = self.rejoin_delay
        for attempt in range(1, self.rejoin_attempts + 1):
            if self._leaving:
                record["outcome"] = "abandoned (left)"
                return
            record["attempts"] = attempt
            started = self.now()
            try:
                # same SSRC: continue its sequence numbers (receivers' replay lists)
                session = await self._associate(
                    old.sequences if old is not None else None)
                if self._leaving:  # leave() deletes self.joined
                    record["outcome"] = "abandoned (left)"
                    return
                await self._connect(session)
            except Exception as e:
                if self._leaving:
                    record["outcome"] = "abandoned (left)"
                    return
                error = f"{type(e).__name__}: {e}"
                record["errors"].append(error)
                self.log.warn("{label}: rejoin attempt {attempt} failed: {error}",
                              label=self.label, attempt=attempt, error=error)
                self._drop_session()
                await self._forget_at_md()
                if (attempt == self.rejoin_attempts or not _worth_retrying(e)
                        or self.closed_reason is not None):
                    break
                self._rejoin_wait = task.deferLater(self.reactor, delay, lambda: None)
                try:
                    await self._rejoin_wait
                except defer.CancelledError:
                    record["outcome"] = "abandoned (left)"
                    return
                finally:
                    self._rejoin_wait = None
                delay *= 2
                continue
            record.update(outcome="ok", association=self.joined.association
                          if self.joined is not None else None,
                          connect_time=round(self.now() - started, 6))
            self.log.info("{label}: joined again as association {association} in "
                          "{seconds:.3f} s", label=self.label,
                          association=record["association"], seconds=self.now() - started)
            self.orphans.associated(self.roster.epoch if self.roster is not None else None)
            self._soon_refresh_roster()
            return
        record["outcome"] = "failed"
        self.failures.append(f"rejoin failed after {record['attempts']} attempt(s): "
                             f"{record['errors'][-1]}")
        self._stop_sending()

    def _drop_session(self) -> None:
        """Stop using the current session: close_notify to the KD (harmless when it forgot
        us), keys wiped; its later events are never read, so never counted."""
        session = self.session
        self._stop_timer()
        if session is not None:
            self._send(session.close(self.now()))
            for ssrc, counts in session.sent_counts().items():
                total = self._sent_before.setdefault(ssrc, dict.fromkeys(counts, 0))
                for name, value in counts.items():
                    total[name] += value
        self.session = None
        if self._ready is not None and not self._ready.called:
            self._ready.cancel()
        self._ready = None

    # --- datagrams and timers ---------------------------------------------------------------

    @property
    def media_peer(self) -> tuple[str, int] | None:
        """Where media goes and comes from: :attr:`via`, else the MD's candidate."""
        if self.via is not None:
            return self.via
        return tuple(self.session.md_address) if self.session is not None else None  # type: ignore[return-value]

    def _send(self, datagrams: Sequence[bytes]) -> None:
        if self._port is None or self.session is None:
            return
        peer = self.via or self.session.md_address
        for datagram in datagrams:
            self._port.write(datagram, peer)

    def _datagram(self, datagram: bytes, addr: Any) -> None:
        session = self.session
        if session is None:
            return
        host, port = addr[0], addr[1]
        if (host, port) != (self.via or tuple(session.md_address)):
            self.foreign_datagrams += 1
            return
        if (self.decrypt_every > 1 and len(datagram) >= 12 and 128 <= datagram[0] <= 191
                and not 192 <= datagram[1] <= 223 and self._light(datagram)):
            return
        self._send(session.datagram_received(datagram, self.now()))
        self._after_input()

    def _light(self, datagram: bytes) -> bool:
        """Lighter receive mode: count the RTP datagram; True if it is not to be decrypted."""
        ssrc = int.from_bytes(datagram[8:12], "big")
        stats = self.relayed.get(ssrc)
        if stats is None:
            stats = self.relayed[ssrc] = SenderStats(ssrc)
        stats.record((datagram[2] << 8) | datagram[3], len(datagram), self.now())
        self._light_count += 1
        return self._light_count % self.decrypt_every != 0 and datagram[-1] != FULL_EKT_TYPE

    def _after_input(self) -> None:
        self._drain()
        self._schedule()

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _schedule(self) -> None:
        self._stop_timer()
        if self.session is None:
            return
        when = self.session.next_timer()
        if when is None:
            return
        self._timer = self.reactor.callLater(max(0.0, when - self.now()), self._fire)

    def _fire(self) -> None:
        self._timer = None
        if self.session is None:
            return
        self._send(self.session.handle_timer(self.now()))
        self._after_input()

    def _drain(self) -> None:
        session = self.session
        if session is None:
            return
        while (event := session.next_event()) is not None:
            self._event(event)

    def _event(self, event: Any) -> None:
        now = self.now()
        if isinstance(event, MediaReceived):
            stats = self.senders.get(event.ssrc)
            if stats is None:
                stats = self.senders[event.ssrc] = SenderStats(event.ssrc)
            # RFC 8723 s5.3: loss on what the MD delivered (it may withhold and renumber)
            sequence = event.sequence if event.outer_sequence is None else event.outer_sequence
            stats.record(sequence, len(event.payload), now, event.spi)
            if self.first_media_at is None:
                self.first_media_at = now
            if self.on_media is not None:
                self.on_media(event, now)
            if self._sinks is not None and self._is_pcmu(event):
                self._sinks.write(event.ssrc, event.payload, event.timestamp)
        elif isinstance(event, DecryptFailed):
            if event.ssrc is None:
                self.unattributed_decrypt_failures += 1
            else:
                stats = self.senders.get(event.ssrc)
                if stats is None:
                    stats = self.senders[event.ssrc] = SenderStats(event.ssrc)
                if event.reason in NO_KEY_REASONS:  # sent under an epoch we never had
                    stats.no_key += 1
                else:
                    stats.decrypt_failures += 1
        elif isinstance(event, KeyframeRequested):
            self.keyframe_requests[event.ssrc] = self.keyframe_requests.get(event.ssrc, 0) + 1
            if self.video_source is not None and event.ssrc in self.video_ssrcs:
                self.video_source.request_keyframe(self.video_ssrcs.index(event.ssrc))
        elif isinstance(event, SpeakerHintReceived):
            self.speaker_hints.append({"at": self._elapsed(now), "sequence": event.sequence,
                                       "speakers": list(event.speakers)})
            del self.speaker_hints[:-1000]  # the newest thousand
        elif isinstance(event, EktKeyInstalled):
            self.epochs_installed.append(event.spi)
            self.orphans.key_installed(now)
            self.log.info("{label}: EKT key installed (SPI {spi})", label=self.label,
                          spi=event.spi)
            if self._ready is not None and not self._ready.called:
                self._ready.callback(None)
            elif self._roster_loop is not None:
                self._soon_refresh_roster()
        elif isinstance(event, Connected):
            self.profile = getattr(event.profile, "name", str(event.profile))
            self.ekt_cipher = getattr(event.ekt_cipher, "name", str(event.ekt_cipher))
        elif isinstance(event, Refused):
            self.refused_reason = str(event.reason)
            self.log.warn("{label}: session refused: {reason}", label=self.label,
                          reason=self.refused_reason)
            if self._ready is not None and not self._ready.called:
                self._ready.errback(SessionRefused(self.refused_reason))
            else:
                self.failures.append(f"session refused: {self.refused_reason}")
                self._stop_sending()
        elif isinstance(event, Closed):
            self.closed_reason = str(event.reason)
            self.log.info("{label}: session closed: {reason}", label=self.label,
                          reason=self.closed_reason)
            if self._ready is not None and not self._ready.called:
                self._ready.errback(SessionRefused(f"closed: {self.closed_reason}"))
            self._stop_sending()

    def _is_pcmu(self, event: Any) -> bool:
        payload_type = getattr(event, "payload_type", None)
        if payload_type is not None:
            return payload_type == 0
        return len(event.payload) <= _MAX_AUDIO_PAYLOAD

    # --- media -----------------------------------------------------------------------------

    def default_source(self) -> MediaSource:
        return ToneSource(440) if self.kind == "audio" else VideoSource()

    def run_media(self, duration: float, source: MediaSource | None = None
                  ) -> defer.Deferred[None]:
        """Send from ``source`` for ``duration`` seconds (receiving all along)."""
        return defer.ensureDeferred(self._run_media(duration, source))

    async def _run_media(self, duration: float, source: MediaSource | None) -> None:
        if (self.session is None and self._rejoining is None) or self.ready_at is None:
            raise EndpointError("not joined")
        source = source or self.source or self.default_source()
        if source.kind != self.kind:
            raise ValueError(f"a {source.kind} source in a {self.kind} session")

        def tick(count: int) -> None:
            for _ in range(min(count, _MAX_CATCH_UP)):
                frame = source.next_frame()
                if frame is None:
                    self._stop_sending()
                    return
                self.send_frame(frame)
            self._after_input()

        video = self.video_source
        if video is not None:
            def video_tick(count: int) -> None:
                for _ in range(min(count, _MAX_CATCH_UP)):
                    for encoding, frame in video.next_frames():
                        self.send_frame(frame, ssrc=self.video_ssrcs[encoding])
                self._after_input()

            self._video_sending = task.LoopingCall.withCount(video_tick)
            self._video_sending.clock = self.reactor
            self._video_sending.start(video.interval, now=True).addErrback(
                lambda failure: self.failures.append(
                    f"video sending failed: {failure.getErrorMessage()}"))
        sending = self._sending = task.LoopingCall.withCount(tick)
        sending.clock = self.reactor
        stop = self.reactor.callLater(duration, self._stop_sending)
        try:
            await sending.start(source.interval, now=True)
        finally:
            if stop.active():
                stop.cancel()
            self._sending = None
            self._stop_sending()
            self._video_sending = None

    def send_frame(self, frame: MediaFrame, *, ssrc: int | None = None) -> bytes | None:
        """Protect and send one frame now; the datagram sent, or None if not ready.

        ``ssrc`` is one of :attr:`video_ssrcs` for a simulcast video frame
        (default: our audio, or kind video, SSRC).  Audio frames carry their
        RFC 6464 level, and are quiet-room noise (level about 60, :data:`~perc_daemons.
        endpoint.media.QUIET_FRAMES`) while :attr:`talking` is False; video frames
        their frame marking.  For callers that pace media themselves
        (``bench/conference.py``); :meth:`run_media` uses it too.
        """
        session = self.session
        if session is None:
            if self._rejoining is None:
                raise EndpointError("not joined")
            self.send_not_ready += 1  # between two associations
            return None
        if ssrc is not None and ssrc not in session.sending_ssrcs:
            self.send_not_ready += 1  # a video SSRC the answer did not accept
            return None
        payload = frame.payload
        if ssrc is None and self.kind == "audio":
            if not self.talking:
                self._quiet = (self._quiet + 1) % len(QUIET_FRAMES)
                payload = QUIET_FRAMES[self._quiet]
            extras: dict[str, Any] = {"audio_level": audio_level(payload),
                                      "voice": self.talking}
        else:
            extras = {"frame_marks": frame_marks(frame)}
        try:
            datagram = session.send_media(payload, timestamp=frame.timestamp,
                                          marker=frame.marker, keyframe=frame.keyframe,
                                          now=self.now(), ssrc=ssrc, **extras)
        except NotReady:
            self.send_not_ready += 1
            return None
        self._send([datagram])
        self.sent_packets += 1
        self.sent_bytes += len(payload)
        return datagram

    def _rtcp_tick(self) -> None:
        """An RR (RFC 3550 s6.4.2), with ``bandwidth`` a REMB, every ``rtcp_interval``."""
        session = self.session
        if session is None or not session.ready:
            return
        try:
            self._send([session.send_rtcp(now=self.now(), remb=self.bandwidth)])
        except NotReady:
            return

    def _stop_sending(self) -> None:
        if self._sending is not None and self._sending.running:
            self._sending.stop()
        if self._video_sending is not None and self._video_sending.running:
            self._video_sending.stop()

    # --- roster ----------------------------------------------------------------------------

    def _roster_tick(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._refresh_roster())

    def _soon_refresh_roster(self) -> None:
        if self._roster_refresh is not None and self._roster_refresh.active():
            return
        self._roster_refresh = self.reactor.callLater(0.5, self._roster_tick)

    async def _refresh_roster(self) -> Roster | None:
        """Fetch and verify the roster; merge its SSRC -> identity map (failures recorded)."""
        if self.kmf is None:
            return None
        min_epoch = self.roster.epoch if self.roster is not None else None
        kmf = self.kmf
        try:
            roster: Roster = await self._with_token(lambda: kmf.verified_roster(
                self.conference_id, now=self.now(), min_epoch=min_epoch))
        except KmfRefused as e:
            if e.status == 404:  # no roster reported yet
                return None
            self.log.warn("{label}: roster refused: {error}", label=self.label, error=str(e))
            return None
        except RosterError as e:
            failure = f"roster not verified: {type(e).__name__}: {e}"
            if failure not in self.failures:
                self.failures.append(failure)
            return None
        except Exception as e:  # the KMF unreachable for a moment: try again later
            self.log.warn("{label}: roster fetch failed: {error}", label=self.label,
                          error=str(e))
            return None
        for member in roster.members:
            for ssrc in member.ssrcs:
                known = self.identities.get(ssrc)
                if known is not None and known != member.identity:
                    self.failures.append(f"SSRC {ssrc:#010x} moved from {known} to "
                                         f"{member.identity}")
                self.identities[ssrc] = member.identity
        if self.roster is not None and roster.epoch < self.roster.epoch:
            return self.roster  # two fetches crossed: keep the newer
        self.roster = roster
        self._check_orphaned(roster)
        return roster

    def _roster_problems(self) -> list[str]:
        problems = []
        for ssrc, stats in sorted(self.senders.items()):
            if ssrc in self.identities:
                continue
            if stats.packets:
                problems.append(f"decrypted media from SSRC {ssrc:#010x}, which no "
                                f"verified roster lists")
            elif stats.no_key or stats.decrypt_failures:
                # Packets in our conference from a sender no roster of it names: an
                # intruder's leg (a cross-conference join) or an MD injecting; never
                # counted away as "no key" (issue 10 item 3).
                problems.append(f"unknown sender in the conference: SSRC {ssrc:#010x} "
                                f"sent {stats.no_key + stats.decrypt_failures} packet(s) "
                                f"no verified roster accounts for")
        if self.roster is None:
            problems.append("no verified roster")
        elif self.roster.identity_of(self.ssrc) != self.identity:
            problems.append(f"the roster (epoch {self.roster.epoch}) does not list our SSRC "
                            f"{self.ssrc:#010x} for {self.identity}")
        return problems

    def check_roster(self) -> defer.Deferred[list[str]]:
        """Final roster check: problems (also recorded as failures); waits ``roster_wait``."""
        return defer.ensureDeferred(self._check_roster())

    async def _check_roster(self) -> list[str]:
        deadline = self.now() + self.roster_wait
        await self._refresh_roster()
        while self._roster_problems() and self.now() < deadline:
            await task.deferLater(self.reactor, 0.5, lambda: None)
            await self._refresh_roster()
        problems = self._roster_problems()
        for problem in problems:
            if problem not in self.failures:
                self.failures.append(problem)
        return problems

    # --- leave -----------------------------------------------------------------------------

    def set_receive(self, receive: Mapping[str, int]) -> defer.Deferred[dict[str, Any]]:
        """What we receive from now on (``last_n``, ``max_height``, ``max_bitrate``; a key
        left out: no limit), PATCHed at the MD and kept for a rejoin; fires with the
        MD's receive view (:meth:`~perc_daemons.endpoint.md.MdClient.set_receive`)."""
        return defer.ensureDeferred(self._set_receive(dict(receive)))

    async def _set_receive(self, receive: dict[str, int]) -> dict[str, Any]:
        if self.md is None or self.joined is None:
            raise EndpointError("not joined")
        view = await self.md.set_receive(self.conference_id, self.joined, receive)
        self.receive = receive
        return view

    def leave(self) -> defer.Deferred[None]:
        """close_notify to the KD, DELETE at the MD; releases sockets and connections."""
        return defer.ensureDeferred(self._leave())

    async def _leave(self) -> None:
        self._leaving = True
        self._stop_sending()
        if self._roster_loop is not None and self._roster_loop.running:
            self._roster_loop.stop()
        if self._rtcp_loop is not None and self._rtcp_loop.running:
            self._rtcp_loop.stop()
        if self._roster_refresh is not None and self._roster_refresh.active():
            self._roster_refresh.cancel()
        rejoining = self._rejoining
        if rejoining is not None:  # let it stop at its next step; then clean up here
            if self._rejoin_wait is not None:
                self._rejoin_wait.cancel()
            if self._ready is not None and not self._ready.called:
                self._ready.errback(SessionRefused("leaving"))
            await rejoining
        self._stop_timer()
        if self.session is not None and not self.left:
            self._send(self.session.close(self.now()))
        if self.joined is not None:
            try:
                await self.md.leave(self.conference_id, self.joined)  # type: ignore[union-attr]
                self.left = True
            except Exception as e:
                self.failures.append(f"leave: {e}")
            self.joined = None
        await self._release()

    async def _release(self) -> None:
        self._stop_timer()
        if self._rtcp_loop is not None and self._rtcp_loop.running:
            self._rtcp_loop.stop()
        if self._port is not None:
            port, self._port = self._port, None
            await defer.maybeDeferred(port.stopListening)
        if self._sinks is not None:
            self._sinks.close()
        if self._capture is not None:
            self._capture.close()
        for client in (self.kmf, self.md):
            if client is not None:
                await client.close()

    # --- statistics ------------------------------------------------------------------------

    def _elapsed(self, at: float | None) -> float | None:
        """Seconds from the first offer to ``at``."""
        if at is None or self.offer_at is None:
            return None
        return round(at - self.offer_at, 6)

    def decrypt_failure_problem(self) -> str | None:
        failed = self.unattributed_decrypt_failures + sum(
            s.decrypt_failures for s in self.senders.values())
        received = sum(s.packets for s in self.senders.values())
        if failed and failed > self.max_decrypt_failure_ratio * (failed + received):
            return (f"{failed} decrypt failures for {received} decrypted packets (more than "
                    f"{self.max_decrypt_failure_ratio:.0%})")
        return None

    def all_failures(self) -> list[str]:
        """Everything that makes this run a failure (exit status 1)."""
        problems = list(self.failures)
        decrypt = self.decrypt_failure_problem()
        if decrypt is not None:
            problems.append(decrypt)
        heard = sum(1 for s in self.senders.values() if s.packets)
        if heard < self.expect_senders:
            problems.append(f"heard {heard} senders, expected {self.expect_senders}")
        return problems

    def sent_ssrcs(self) -> list[dict[str, int]]:
        """Per sending SSRC: packets, bytes and NACK retransmissions, over every session."""
        totals = {ssrc: dict(counts) for ssrc, counts in self._sent_before.items()}
        if self.session is not None:
            for ssrc, counts in self.session.sent_counts().items():
                total = totals.setdefault(ssrc, dict.fromkeys(counts, 0))
                for name, value in counts.items():
                    total[name] += value
        return [{"ssrc": ssrc, **counts} for ssrc, counts in sorted(totals.items())]

    def stats(self) -> dict[str, Any]:
        """The statistics as a JSON-ready dict."""
        recordings = self._sinks.paths() if self._sinks is not None else {}

        elapsed = self._elapsed
        return {
            "label": self.label,
            "identity": self.identity,
            "conference": self.conference_id,
            "association": self.joined.association if self.joined is not None else None,
            "kd": self.answer.kd_name if self.answer is not None else None,
            "ssrc": self.ssrc,
            "kind": self.kind,
            "profile": self.profile,
            "ekt_cipher": self.ekt_cipher,
            "connect_time": elapsed(self.ready_at),
            "join_time": elapsed(self.first_media_at),
            "sent": {"packets": self.sent_packets, "bytes": self.sent_bytes,
                     "not_ready": self.send_not_ready},
            "video": self.video,
            "video_ssrcs": list(self.video_ssrcs),
            "sent_ssrcs": self.sent_ssrcs(),
            "keyframe_requests": [{"ssrc": ssrc, "count": n}
                                  for ssrc, n in sorted(self.keyframe_requests.items())],
            "speaker_hints": len(self.speaker_hints),
            "last_speaker_hint": self.speaker_hints[-1] if self.speaker_hints else None,
            "epochs_installed": list(self.epochs_installed),
            "senders": [sender_json(s, self.identities.get(ssrc), recordings.get(ssrc))
                        for ssrc, s in sorted(self.senders.items())],
            "relayed": [sender_json(s, self.identities.get(ssrc), None)
                        for ssrc, s in sorted(self.relayed.items())],
            "unattributed_decrypt_failures": self.unattributed_decrypt_failures,
            "foreign_datagrams": self.foreign_datagrams,
            "roster": ({"epoch": self.roster.epoch, "verified": True,
                        "members": [{"identity": m.identity, "ssrcs": list(m.ssrcs)}
                                    for m in self.roster.members]}
                       if self.roster is not None else None),
            "closed_reason": self.closed_reason,
            "left": self.left,
            "rejoins": [dict(r, errors=list(r["errors"])) for r in self.rejoins],
            "capture": ({"path": self._capture.path, "records": self._capture.records}
                        if self._capture is not None else None),
            "history": self.history.as_json() if self.history is not None else None,
            "failures": self.all_failures(),
        }


def _worth_retrying(error: Exception) -> bool:
    """False for refusals another attempt cannot change (403 from the KD, a bad answer,
    another identity, refused credentials)."""
    if isinstance(error, JoinRefused):
        return error.status != 403
    return not isinstance(error, AnswerRejected | IdentityMismatch | LoginFailed)


def record_subdir(record_dir: str | None, index: int, total: int) -> str | None:
    """Where endpoint ``index`` of ``total`` records (a subdirectory under --load)."""
    if record_dir is None or total == 1:
        return record_dir
    return os.path.join(record_dir, f"endpoint-{index:03d}")
