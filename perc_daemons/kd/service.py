"""twistd plugin module for perc-kd: the Key Distributor (RFC 8871 s4.5, RFC 9185).

:class:`KdService` keeps one tunnel to each configured MD
(:class:`~perc_daemons.kd.tunnel.KdTunnelClient`) and one
:class:`~perc_daemons.kd.associations.KeyDistributorCore`; :class:`KdHandler`
is the glue between them and the KMF (:class:`~perc_daemons.kd.kmf_client.KmfClient`):

* SignAnswer: the offer is checked (:mod:`perc_daemons.kd.offers`), its
  identity assertion verified with the KMF's JWKS, the invitation asked of the
  KMF (invited and running, else REFUSED), the conference's current epoch key
  fetched (started at the KMF if it has none) and installed, the association
  expected in the core, and the MD's draft answer finished (KD tls-id) and
  signed (:func:`perc_daemons.protocol.answer.sign_answer`).  Any failure
  answers REFUSED / BAD_OFFER / INTERNAL_ERROR with a short reason and
  leaves nothing behind.
* TunneledDtls / EndpointDisconnect go to the core; its output goes back on
  the tunnel the association came from.  A timer drives the core's DTLS
  retransmissions.
* Rekeys: after every core call the due conferences (a leave; a join when the
  conference does not let late joiners have earlier epochs) get a new epoch
  at the KMF (``POST epochs`` then ``POST keys``), which is installed (EKTKey
  to every member) and reported with ``PUT roster``.  Work is serialised per
  conference; requests arriving meanwhile coalesce into one more round.  A
  KMF that cannot be reached is retried with back-off.
* Periodic rekey (issue 14): a conference whose KMF policy has a
  ``rekey_interval`` (learnt from the invitation answer of each SignAnswer
  and from the KMF's ``policy`` event) gets a new epoch that many seconds
  after its last one although nobody joined or left -- the same round as a
  membership rekey, with its re-check of every recipient's invitation --
  unless nobody is keyed.  Every epoch this KD starts is reported to
  :meth:`KdHandler.epoch_started` and to the KMF's audit trail with its
  causes ("join", "leave", "timer", "manual").
* KMF events (SSE): ``conference-ended`` closes the conference's
  associations (EndpointDisconnect to the MD); ``epoch`` newer than ours (an
  epoch another KD started) is fetched and installed.  After a reconnection
  every known conference is re-checked, as events may have been missed.
* MDs: besides ``[tunnel] mds``, the KD keeps a tunnel to each MD the KMF
  names for a conference that has not ended (draft-roach-perc-webrtc slides
  4.1.1 step 11: the MD's tunnel address, recorded at the KMF by
  ``perc-admin conferences create --md``): the ``media-distributor`` event
  adds one, and the KMF's whole list (``GET /v1/media-distributors``, fetched
  whenever the event stream connects and after a conference ends) adds the
  missing ones and closes the tunnels no conference needs any more.
* A conference that has ended at the KMF (the event; a 410 to an epoch, key
  or roster request; ``ended`` from an invitation check; a SignAnswer for it)
  is also ended at the MDs: after those EndpointDisconnects, ConferenceEnded
  (our 0xF5, docs/PROTOCOL.md) goes on every up tunnel, since the KD does
  not know which MDs host the conference (the provider created it there).
  Each MD ends it only if this KD is the conference's KD there.  A
  conference merely unknown to the KMF or not started (404/409) is forgotten
  here, but not ended at the MDs.
* Associations belong to the MD they came from (by its configured name), not
  to one TLS connection: when a tunnel drops they are kept (the MD keeps
  forwarding with the keys it has, and sends the disconnects that happened
  meanwhile when the tunnel is back); output for them meanwhile is dropped,
  and DTLS retransmission re-delivers an unacknowledged EKTKey once the
  tunnel to that MD is up again.
* Associations (our 0xF2, sent by the MD on every tunnel up): entries the
  core knows need nothing.  A conference with associations the KD does not
  know (it restarted, or lost them) has members the KD cannot reach: they
  still forward media through the MD with the old epoch's key.  The KD
  registers the conference if needed (rekey on join until the next
  SignAnswer brings the KMF's policy), starts a new epoch at the KMF that
  only the members it knows get (possibly none), and reports a roster of
  those members (possibly empty); the endpoints the newer roster omits
  rejoin.  No EndpointDisconnect is sent for the unknown ones, so their
  media keeps flowing until they do.  Each unknown association triggers this
  once per MD (until it disconnects), so a flapping tunnel does not rekey
  again and again.

* Audit (issue 14): admissions, refusals (SignAnswer and DTLS), leaves and the
  epochs this KD installs (with their cause: ``join``, ``leave``, ``manual``
  for an epoch it did not start, ``timer`` for whatever schedules
  ``_schedule(conference, new_epoch=True, cause="timer")``) are reported to the
  KMF's trail through :class:`~perc_daemons.kd.audit.AuditReporter`, which
  queues and retries on its own: keying never waits for it.

Start-up: a missing or unusable certificate/key means the KD cannot serve:
it logs that and runs only the admin listener (so a fresh install starts).
With no ``[tunnel] mds`` it waits for the KMF to name MDs.  A missing KMF
client secret is logged and retried (the file is read whenever a token is
needed).  Under systemd (``Type=notify``) the KD is READY once its KMF event
stream has connected (:meth:`KdHandler.when_kmf_reachable`); a KD that
cannot serve is READY at once, saying so in its STATUS.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import Counter, Gauge
from twisted.application.service import MultiService
from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import implementer

from perc_daemons import config as config_module
from perc_daemons import tls
from perc_daemons.daemon import DaemonOptions, base_service
from perc_daemons.interfaces import ITunnelHandler, ITunnelPeer
from perc_daemons.kd.associations import (
    Admitted,
    EpochError,
    KeyDistributorCore,
    Left,
    TunnelMessage,
)
from perc_daemons.kd.audit import AuditReporter
from perc_daemons.kd.kmf_client import KmfClient, KmfError, KmfEventStream, KmfRefused
from perc_daemons.kd.offers import OfferRejected, finish_answer, inspect_offer, verify_identity
from perc_daemons.metrics import Metrics
from perc_daemons.protocol.answer import sign_answer
from perc_daemons.protocol.dtls import certificate_fingerprint, format_fingerprint
from perc_daemons.protocol.identity import JwksIdentityVerifier
from perc_daemons.protocol.jose import InvalidJwks, parse_jwks
from perc_daemons.protocol.sdp import new_tls_id
from perc_daemons.protocol.tunnel import (
    MAX_ASSOCIATIONS,
    REASONS_ANNOUNCEMENT,
    SIGN_STATUS_BAD_OFFER,
    SIGN_STATUS_INTERNAL_ERROR,
    SIGN_STATUS_OK,
    SIGN_STATUS_REFUSED,
    Associations,
    ConferenceEnded,
    EndpointDisconnect,
    SignAnswer,
    SignAnswerAck,
    TunneledDtls,
    TunnelError,
)
from perc_daemons.protocol.tunnel_address import TunnelAddressError, parse_tunnel_address
from perc_daemons.store import check_conference_id

__all__ = ["KdCredentials", "KdHandler", "KdService", "Options", "load_credentials",
           "makeService"]

log = Logger()

STATUS_NAMES = {SIGN_STATUS_OK: "ok", SIGN_STATUS_REFUSED: "refused",
                SIGN_STATUS_BAD_OFFER: "bad_offer", SIGN_STATUS_INTERNAL_ERROR: "internal_error"}
#: Shortest time between two JWKS fetches caused by an unknown kid, seconds.
JWKS_REFRESH_INTERVAL = 10.0
#: Back-off of KMF work that failed, seconds.
RETRY_MIN, RETRY_MAX = 1.0, 30.0
#: Unknown associations remembered per MD (so each triggers one new epoch only).
MAX_LOST_ASSOCIATIONS = 100_000


class Options(DaemonOptions):
    daemon = "kd"
    synopsis = "[--config /etc/perc/kd.toml]"


# --- credentials ----------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class KdCredentials:
    """The KD's one certificate chain (DER, leaf first) and its P-256 key."""

    chain: tuple[bytes, ...]
    private_key: ec.EllipticCurvePrivateKey

    @property
    def fingerprint(self) -> bytes:
        return certificate_fingerprint(self.chain[0])

    def __repr__(self) -> str:
        return f"<KdCredentials {format_fingerprint(self.fingerprint)}>"


def load_credentials(certificate_path: str, private_key_path: str) -> KdCredentials:
    """Read and check the KD certificate chain and key; raises :class:`tls.TlsFileError`."""
    try:
        with open(certificate_path, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise tls.TlsFileError(f"{certificate_path}: {e.strerror or e}") from None
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise tls.TlsFileError(f"{certificate_path}: no PEM certificate") from None
    try:
        tls.check_private_key_file(private_key_path)
    except tls.TlsFileError as e:
        raise tls.TlsFileError(f"{private_key_path}: {e}") from None
    try:
        with open(private_key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), None)
    except (OSError, ValueError, TypeError):
        raise tls.TlsFileError(f"{private_key_path}: not a readable unencrypted PEM "
                               "private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
            key.curve, ec.SECP256R1):
        raise tls.TlsFileError(f"{private_key_path}: the KD key must be ECDSA P-256")
    leaf_public = certificates[0].public_key()
    if leaf_public.public_bytes(serialization.Encoding.DER,
                                serialization.PublicFormat.SubjectPublicKeyInfo) != \
            key.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo):
        raise tls.TlsFileError(f"{private_key_path}: does not match {certificate_path}")
    chain = tuple(c.public_bytes(serialization.Encoding.DER) for c in certificates)
    return KdCredentials(chain, key)


# --- metrics ----------------------------------------------------------------------------


class KdMetrics:
    def __init__(self, metrics: Metrics, core: KeyDistributorCore) -> None:
        registry = metrics.registry
        Gauge("perc_kd_associations", "DTLS associations the KD knows (expected or keyed)",
              registry=registry).set_function(core.association_count)
        Gauge("perc_kd_members", "Keyed conference members",
              registry=registry).set_function(core.member_count)
        self.epochs = Counter("perc_kd_epochs_started", "Epochs started at the KMF by this KD",
                              registry=registry)
        self.sign_answers = Counter("perc_kd_sign_answers", "SignAnswer requests by outcome",
                                    ["status"], registry=registry)
        self.kmf_errors = Counter("perc_kd_kmf_errors", "Failed KMF requests by operation",
                                  ["operation"], registry=registry)
        self.dtls_refusals = Counter(
            "perc_kd_dtls_refusals", "Associations that ended before admission, by reason "
            "(dtls_no_srtp_profile: no DOUBLE profile, dtls_no_ekt, dtls_wrong_tls_id, "
            "dtls_wrong_certificate, no_dtls, timeout, peer_alert, kd_check, ...)",
            ["reason"], registry=registry)


# --- the handler ------------------------------------------------------------------------


@dataclass
class _Job:
    """Pending KMF work of one conference."""

    new_epoch: bool = False
    sync: bool = False
    roster: bool = False
    grant: bool = False
    running: bool = False
    #: why the pending new epoch is due (audit: join, leave, timer, manual)
    causes: set[str] = field(default_factory=set)

    def due(self) -> bool:
        return self.new_epoch or self.sync or self.roster or self.grant


@implementer(ITunnelHandler)
class KdHandler:
    """Tunnel messages in, core and KMF work, tunnel messages out (see the module doc)."""

    def __init__(self, reactor: Any, *, core: KeyDistributorCore, kmf: KmfClient,
                 idp_domain: str, credentials: KdCredentials,
                 metrics: Metrics | None = None, audit: AuditReporter | None = None) -> None:
        self.reactor = reactor
        self.audit = audit if audit is not None else AuditReporter(reactor, kmf,
                                                                   metrics=metrics)
        self._md_of: dict[bytes, str] = {}  # keyed association -> its MD (for its leave)
        self.core = core
        self.kmf = kmf
        self.idp_domain = idp_domain
        self.credentials = credentials
        self.metrics = KdMetrics(metrics, core) if metrics is not None else None
        # MDs by their tunnels' peer_name (the tunnel address "host:port")
        self._peers: dict[str, ITunnelPeer] = {}  # MD name -> its up tunnel
        self._owner: dict[bytes, str] = {}  # association -> MD name
        self._signing: set[bytes] = set()
        # MD name -> associations listed since its tunnel came up (the listing is
        # complete at its first message shorter than MAX_ASSOCIATIONS)
        self._listing: dict[str, set[bytes]] = {}
        # MD name -> association -> conference: listed by that MD's Associations,
        # unknown here, already answered with a new epoch.
        self._lost: dict[str, dict[bytes, str]] = {}
        self._jobs: dict[str, _Job] = {}
        # conference -> rekey_interval (KMF policy, seconds) and its timer
        self._rekey_intervals: dict[str, float] = {}
        self._rekey_timers: dict[str, Any] = {}
        self._running: set[defer.Deferred[None]] = set()  # KMF work in progress
        self._sleeps: set[defer.Deferred[Any]] = set()
        self._timer: Any = None
        self._verifier: JwksIdentityVerifier | None = None
        self._kids: frozenset[str] = frozenset()
        self._jwks_fetched_at: float | None = None
        self._events: KmfEventStream | None = None
        self._connections = 0
        self._reachable: list[defer.Deferred[None]] = []
        self._stopped = False
        #: Called with the MD tunnel addresses the KMF names (a list and whether it
        #: is complete): a new conference's MD (event), or all of them (on connect).
        self.on_media_distributors: Callable[[list[str], bool], None] | None = None

    def __repr__(self) -> str:
        return f"<KdHandler peers={len(self._peers)} {self.core!r}>"

    # -- lifecycle -------------------------------------------------------------------

    def start_events(self, *, min_delay: float = 0.5, max_delay: float = 30.0) -> None:
        """Follow the KMF's events (conference-ended, invitation-withdrawn, epoch)."""
        if self._events is None:
            self._events = self.kmf.events(self.kmf_event, min_delay=min_delay,
                                           max_delay=max_delay,
                                           on_connected=self._events_connected)

    def stop(self) -> defer.Deferred[None]:
        """Stop following events and starting KMF work; fires when work in progress is done."""
        self._stopped = True
        if self._events is not None:
            self._events.stop()
            self._events = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        for conference in list(self._rekey_timers):
            self._cancel_rekey(conference)
        for d in list(self._sleeps):
            d.cancel()
        running = defer.DeferredList([*self._running, self.audit.stop()], consumeErrors=True)
        return running.addCallback(lambda _: None)

    def when_kmf_reachable(self) -> defer.Deferred[None]:
        """Fires once the KMF's event stream has connected (at once if it has): the KMF
        answers this KD's credentials, which is what systemd's READY=1 waits for."""
        if self._connections:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred(lambda d: self._reachable.remove(d))
        self._reachable.append(d)
        return d

    @property
    def events_connected(self) -> bool:
        return self._events is not None and self._events.connected

    # -- ITunnelHandler ----------------------------------------------------------------

    def tunnel_up(self, peer: ITunnelPeer) -> None:
        self._peers[str(peer.peer_name)] = peer
        self._listing.pop(str(peer.peer_name), None)  # its Associations listing starts over
        # we read the reason of the MD's EndpointDisconnects (docs/PROTOCOL.md); an MD that
        # predates it ignores this as an association it does not have
        peer.send(EndpointDisconnect(REASONS_ANNOUNCEMENT))
        log.info("tunnel up: md {md}", md=peer.peer_name)

    def tunnel_down(self, peer: ITunnelPeer, reason: str) -> None:
        name = str(peer.peer_name)
        if self._peers.get(name) is peer:
            del self._peers[name]
        kept = sum(1 for owner in self._owner.values() if owner == name)
        log.info("tunnel down: md {md} ({reason}); its {count} association(s) are kept",
                 md=name, reason=reason, count=kept)

    def _live(self, peer: ITunnelPeer) -> bool:
        return self._peers.get(str(peer.peer_name)) is peer

    def tunnel_message(self, peer: ITunnelPeer, message: Any) -> None:
        if isinstance(message, TunneledDtls):
            self._tunneled_dtls(peer, message)
        elif isinstance(message, EndpointDisconnect):
            self._endpoint_disconnect(peer, message)
        elif isinstance(message, SignAnswer):
            d = defer.ensureDeferred(self._sign_answer(peer, message))
            d.addErrback(lambda f: log.failure("SignAnswer handling failed", f))
        elif isinstance(message, Associations):
            self._associations(peer, message)
        else:
            log.warn("md {md} sent {kind}, which only a KD sends: ignored",
                     md=peer.peer_name, kind=type(message).__name__)

    # -- DTLS --------------------------------------------------------------------------

    def _tunneled_dtls(self, peer: ITunnelPeer, message: TunneledDtls) -> None:
        aid = message.association_id
        owner = self._owner.get(aid)
        if owner is not None and owner != peer.peer_name:
            # Another MD's association: not this MD's to drive.
            peer.send(EndpointDisconnect(aid))
            return
        out = self.core.tunneled_dtls(aid, message.dtls_message, self.reactor.seconds())
        self._send(out, peer)
        self._after_core()

    def _endpoint_disconnect(self, peer: ITunnelPeer, message: EndpointDisconnect) -> None:
        aid = message.association_id
        self._lost.get(str(peer.peer_name), {}).pop(aid, None)
        if self._owner.get(aid) != peer.peer_name:
            return
        self._owner.pop(aid, None)
        conference = self.core.conference_of(aid)
        reason = message.reason_name or "md_disconnect"
        self._send(self.core.endpoint_disconnect(aid, self.reactor.seconds(), reason), peer)
        log.info("association {association} of {conference} left ({reason})",
                 association=_aid(aid), conference=conference, reason=reason)
        self._after_core()

    def _associations(self, peer: ITunnelPeer, message: Associations) -> None:
        """The MD's admitted associations: start an epoch without the ones unknown here.

        The listing of one tunnel-up ends with a message of fewer than
        MAX_ASSOCIATIONS entries; then the associations this KD holds for that
        MD and the MD did not list (it restarted, or never got our
        SignAnswerAck) are gone: they leave, which rekeys the others.
        """
        name = str(peer.peer_name)
        listing = self._listing.setdefault(name, set())
        listing.update(aid for aid, _ in message.entries)
        if len(message.entries) < MAX_ASSOCIATIONS:
            del self._listing[name]
            gone = [aid for aid, owner in self._owner.items()
                    if owner == name and aid not in listing and aid not in self._signing]
            for aid in gone:
                log.info("md {md} no longer has association {association}: it leaves",
                         md=name, association=_aid(aid))
                self._endpoint_disconnect(peer, EndpointDisconnect(aid))
        lost = self._lost.setdefault(name, {})
        unknown: dict[str, int] = {}
        bad = 0
        for aid, conference in message.entries:
            if self.core.conference_of(aid) == conference or aid in lost:
                continue
            try:
                check_conference_id(conference)
            except ValueError:
                bad += 1
                continue
            unknown[conference] = unknown.get(conference, 0) + 1
            if len(lost) < MAX_LOST_ASSOCIATIONS:
                lost[aid] = conference
        if bad:
            log.warn("md {md} listed {count} association(s) with an invalid conference id: "
                     "ignored", md=name, count=bad)
        for conference, count in unknown.items():
            log.info("md {md} forwards for {count} association(s) of {conference} this KD "
                     "does not know (restart?): starting an epoch without them, their "
                     "endpoints must rejoin", md=name, count=count, conference=conference)
            if conference not in self.core.conferences():
                # The KMF's policy comes with the next SignAnswer.
                self.core.set_policy(conference, rekey_on_join=True)
            self._schedule(conference, new_epoch=True, cause="leave")

    def _send(self, out: Iterable[TunnelMessage], default: ITunnelPeer | None) -> None:
        for message in out:
            aid = message.association_id
            owner = self._owner.get(aid)
            peer = self._peers.get(owner) if owner is not None else default
            if isinstance(message, EndpointDisconnect):
                self._owner.pop(aid, None)
            if peer is not None and self._live(peer):
                peer.send(message)

    def _after_core(self) -> None:
        for refusal in self.core.take_refusals():
            # once per association: each ends once (issue 10 item 15)
            log.warn("association {association} of {identity} in {conference} refused "
                     "before admission: {cause} ({detail})",
                     association=_aid(refusal.association_id), identity=refusal.identity,
                     conference=refusal.conference_id, cause=refusal.cause,
                     detail=refusal.detail)
            if self.metrics is not None:
                self.metrics.dtls_refusals.labels(refusal.cause).inc()
            detail = {"reason": _slug(refusal.cause), "association": refusal.association_id.hex(),
                      "text": refusal.detail[:200]}
            md = self._owner.get(refusal.association_id)
            if md is not None:
                detail["md"] = md
            self.audit.report(refusal.conference_id, "refused", refusal.identity, detail)
        for event in self.core.take_audit_events():
            self._report_membership(event)
        for conference, causes in self.core.take_rekeys_with_causes():
            self._schedule(conference, new_epoch=True, causes=causes)
        for conference in self.core.take_roster_updates():
            self._schedule(conference, roster=True)
        for conference in self.core.take_grants():
            self._schedule(conference, grant=True)
        self._reschedule_timer()

    def _report_membership(self, event: Admitted | Left) -> None:
        aid = event.association_id
        if isinstance(event, Admitted):
            md = self._owner.get(aid, "")
            self._md_of[aid] = md
            self.audit.report(event.conference_id, "admitted", event.identity, {
                "association": aid.hex(), "fingerprint": event.fingerprint.hex(), "md": md,
                "epoch": event.epoch, "ssrcs": list(event.ssrcs)})
        else:
            detail = {"reason": _slug(event.reason), "association": aid.hex()}
            md = self._md_of.pop(aid, None)
            if md:
                detail["md"] = md
            self.audit.report(event.conference_id, "left", event.identity, detail)

    def _report_epoch(self, conference: str, epoch: int, causes: Iterable[str]) -> None:
        order = ("leave", "join", "timer", "manual")
        due = sorted(set(causes) or {"manual"}, key=order.index)
        self.audit.report(conference, "epoch-started", None, {
            "epoch": epoch, "cause": due[0], "causes": due,
            "members": [{"identity": identity, "association": aid.hex()}
                        for identity, aid in self.core.members(conference)]})

    def _reschedule_timer(self) -> None:
        when = None if self._stopped else self.core.next_timer()
        if self._timer is not None and self._timer.active():
            if when is not None and self._timer.getTime() == when:
                return
            self._timer.cancel()
        self._timer = None
        if when is not None:
            self._timer = self.reactor.callLater(max(0.0, when - self.reactor.seconds()),
                                                 self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._send(self.core.handle_timers(self.reactor.seconds()), None)
        self._after_core()

    # -- SignAnswer --------------------------------------------------------------------

    async def _verifier_for(self, kid: str | None) -> JwksIdentityVerifier:
        now = self.reactor.seconds()
        stale = kid not in self._kids and (
            self._jwks_fetched_at is None or now - self._jwks_fetched_at >= JWKS_REFRESH_INTERVAL)
        if self._verifier is None or stale:
            self._jwks_fetched_at = now
            jwks = await self.kmf.jwks()
            try:
                kids = frozenset(parse_jwks(jwks))
                if self._verifier is None:
                    self._verifier = JwksIdentityVerifier(self.idp_domain, jwks)
                else:
                    self._verifier.update_jwks(jwks)
            except InvalidJwks as e:
                if self._verifier is None:
                    raise KmfError(f"the KMF's JWKS is unusable: {e}") from None
                log.warn("the KMF's JWKS is unusable, keeping the old keys: {error}", error=e)
            else:
                self._kids = kids
        assert self._verifier is not None
        return self._verifier

    async def _ensure_epoch(self, conference: str) -> None:
        """The conference's current KMF epoch installed in the core (started if none)."""
        if self.core.current_params(conference) is not None:
            return
        try:
            epoch, params = await self.kmf.current_key(conference)
        except KmfRefused as e:
            if e.slug != "no-epoch":
                raise
            await self.kmf.new_epoch(conference)
            if self.metrics is not None:
                self.metrics.epochs.inc()
            epoch, params = await self.kmf.current_key(conference)
        if epoch > self.core.epoch(conference):
            self._install(conference, epoch, params, {"join"})

    def _install(self, conference: str, epoch: int, params: Any,
                 causes: Iterable[str] = ()) -> None:
        try:
            out = self.core.install_epoch(conference, epoch, params, self.reactor.seconds())
        except EpochError as e:
            log.warn("epoch {epoch} of {conference} not installed: {error}",
                     epoch=epoch, conference=conference, error=str(e))
            return
        log.info("epoch {epoch} of {conference} installed (SPI {spi}); sent to "
                 "{members} member(s)", epoch=epoch, conference=conference, spi=params.spi,
                 members=len(self.core.roster(conference)))
        self._send(out, None)
        self._arm_rekey(conference)  # the interval counts from the newest epoch
        self._report_epoch(conference, epoch, causes)
        self._after_core()

    # -- periodic rekey (issue 14) -----------------------------------------------------

    def set_rekey_interval(self, conference: str, interval: float) -> None:
        """The conference's KMF ``rekey_interval`` (seconds, 0 = off): (re)arm its timer."""
        interval = float(interval) if isinstance(interval, int | float) else 0.0
        if interval <= 0:
            self._rekey_intervals.pop(conference, None)
            self._cancel_rekey(conference)
            return
        if self._rekey_intervals.get(conference) != interval:
            self._rekey_intervals[conference] = interval
            self._arm_rekey(conference)

    def rekey_due_at(self, conference: str) -> float | None:
        timer = self._rekey_timers.get(conference)
        return None if timer is None or not timer.active() else timer.getTime()

    def _cancel_rekey(self, conference: str) -> None:
        timer = self._rekey_timers.pop(conference, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _arm_rekey(self, conference: str) -> None:
        self._cancel_rekey(conference)
        interval = self._rekey_intervals.get(conference)
        if interval is None or self._stopped or conference not in self.core.conferences():
            return
        self._rekey_timers[conference] = self.reactor.callLater(
            interval, self._rekey_timer_fired, conference)

    def _rekey_timer_fired(self, conference: str) -> None:
        self._rekey_timers.pop(conference, None)
        if conference not in self.core.conferences():
            return
        if not self.core.roster(conference):
            self._arm_rekey(conference)  # nobody holds the key: nothing to bound
            return
        log.info("timed rekey of {conference} (rekey_interval {interval:.0f} s)",
                 conference=conference, interval=self._rekey_intervals.get(conference, 0.0))
        self._schedule(conference, new_epoch=True, cause="timer")

    def epoch_started(self, conference: str, epoch: int, causes: frozenset[str],
                      members: int) -> None:
        """Hook: this KD started ``epoch`` of ``conference`` at the KMF, for ``causes``
        ("join", "leave", "timer", "manual"; empty: a first epoch or a withdrawn
        invitation), ``members`` keyed members before it.  Logged (the audit report goes
        from :meth:`_report_epoch`)."""
        log.info("epoch {epoch} of {conference} started at the KMF (cause: {cause}; "
                 "{members} member(s))", epoch=epoch, conference=conference,
                 cause=",".join(sorted(causes)) or "other", members=members)

    async def _sign_answer(self, peer: ITunnelPeer, message: SignAnswer) -> None:
        aid = message.association_id
        conference: str | None = None
        identity: str | None = None
        ended = False  # the KMF says the conference has ended: end it at the MDs after
        try:
            if self.core.knows(aid) or aid in self._signing:
                raise OfferRejected(SIGN_STATUS_BAD_OFFER, "association id already in use",
                                    "association_in_use")
            self._signing.add(aid)
            facts = inspect_offer(message.offer_sdp)
            conference = facts.conference_id
            if message.conference_id != conference:
                # The MD would add the leg to another conference's media group than
                # the one the identity assertion is for (issue 10: cross-conference).
                raise OfferRejected(SIGN_STATUS_REFUSED,
                                    f"the identity assertion is for conference "
                                    f"{conference!r}, not {message.conference_id!r}",
                                    "wrong_conference")
            verifier = await self._verifier_for(facts.kid)
            identity = verify_identity(verifier, facts, self.reactor.seconds())
            try:
                invitation = await self.kmf.invitation(conference, identity)
            except KmfRefused as e:
                if e.status == 404:
                    raise OfferRejected(SIGN_STATUS_REFUSED, "unknown conference",
                                        "unknown_conference") from None
                raise
            if not invitation["invited"]:
                raise OfferRejected(SIGN_STATUS_REFUSED, "not invited", "not_invited")
            if invitation["state"] != "running":
                ended = invitation["state"] == "ended"
                raise OfferRejected(SIGN_STATUS_REFUSED, "conference not running",
                                    "conference_ended" if ended else "not_running")
            schedule = invitation.get("schedule", "open")
            if schedule == "not_started":
                opens = invitation.get("admission_opens_at")
                raise OfferRejected(SIGN_STATUS_REFUSED, "the conference admits endpoints "
                                    + (f"from {opens:.0f} (POSIX time)"
                                       if isinstance(opens, int | float) else "later"),
                                    "not_started")
            if schedule == "over":
                ended = True  # the KMF ends it at its next key request, or by its timer
                raise OfferRejected(SIGN_STATUS_REFUSED, "the conference's end time has "
                                    "passed", "conference_ended")
            try:
                await self._ensure_epoch(conference)
            except KmfRefused as e:
                if e.status in (409, 410):
                    ended = e.status == 410
                    raise OfferRejected(SIGN_STATUS_REFUSED, "conference not running",
                                        "conference_ended" if ended else "not_running"
                                        ) from None
                if e.slug == "not-started":
                    raise OfferRejected(SIGN_STATUS_REFUSED, "the conference has not "
                                        "started", "not_started") from None
                raise
            kd_tls_id = new_tls_id()  # one per association (RFC 8842 s5.3)
            answer = finish_answer(message.answer_sdp, message.offer_sdp,
                                   kd_fingerprint=self.credentials.fingerprint,
                                   kd_tls_id=kd_tls_id)
            signed = sign_answer(answer, message.offer_sdp, association_id=aid,
                                 conference_id=conference, identity=identity,
                                 certificate_chain=list(self.credentials.chain),
                                 private_key=self.credentials.private_key,
                                 now=self.reactor.seconds())
            if not self._live(peer):
                log.info("SignAnswer {association}: the tunnel went down meanwhile",
                         association=_aid(aid))
                return
            late_join = invitation.get("late_join")
            if late_join not in ("none", "current", "history"):  # a KMF without issue 14
                late_join = ("current" if invitation.get("late_joiners_get_earlier_epochs")
                             else "none")
            self.core.set_policy(conference, rekey_on_join=late_join == "none")
            self.core.expect(aid, conference, identity, facts.fingerprint,
                             facts.tls_id.encode("ascii"), facts.ssrcs,
                             kd_tls_id=kd_tls_id.encode("ascii"),
                             now=self.reactor.seconds())
            self._owner[aid] = str(peer.peer_name)
            self.set_rekey_interval(conference, invitation.get("rekey_interval", 0.0))
            self._reschedule_timer()  # the expectation expires unless the endpoint connects
            ack = SignAnswerAck(aid, SIGN_STATUS_OK, signed)
            log.info("SignAnswer {association}: {identity} admitted to {conference}",
                     association=_aid(aid), identity=identity, conference=conference)
        except OfferRejected as e:
            ack = SignAnswerAck(aid, e.status, e.text)
            self._report_refusal(message, peer, conference, identity, e.code, e.reason)
            log.warn("SignAnswer {association}: {outcome} ({reason}); identity {identity}, "
                     "conference {conference}", association=_aid(aid),
                     outcome=STATUS_NAMES[e.status], reason=e.reason, identity=identity,
                     conference=conference)
        except KmfError as e:
            if self.metrics is not None:
                self.metrics.kmf_errors.labels("sign_answer").inc()
            ack = SignAnswerAck(aid, SIGN_STATUS_INTERNAL_ERROR,
                                "kmf_unavailable: key management service unavailable")
            self._report_refusal(message, peer, conference, identity, "kmf_unavailable",
                                 "key management service unavailable")
            log.warn("SignAnswer {association}: KMF problem: {error}; identity {identity}, "
                     "conference {conference}", association=_aid(aid), error=str(e),
                     identity=identity, conference=conference)
        except Exception:
            ack = SignAnswerAck(aid, SIGN_STATUS_INTERNAL_ERROR, "internal_error: internal error")
            log.failure("SignAnswer {association}: internal error", association=_aid(aid))
        finally:
            self._signing.discard(aid)
        if self.metrics is not None:
            self.metrics.sign_answers.labels(STATUS_NAMES[ack.status]).inc()
        if self._live(peer):
            peer.send(ack)
        if ended and conference is not None:
            # An MD still hosts a conference the KMF has ended (this KD missed the
            # event, e.g. it was not running then): end it there too.
            log.info("SignAnswer {association}: conference {conference} has ended at the "
                     "KMF", association=_aid(aid), conference=conference)
            self.end_conference(conference)

    def _report_refusal(self, message: SignAnswer, peer: ITunnelPeer, conference: str | None,
                        identity: str | None, reason: str, text: str) -> None:
        conference = conference or message.conference_id
        try:
            check_conference_id(conference)
        except ValueError:
            return  # no trail to put it in
        self.audit.report(conference, "refused", identity, {
            "reason": reason, "association": message.association_id.hex(),
            "md": str(peer.peer_name), "text": text[:200]})

    # -- KMF work per conference -------------------------------------------------------

    def _schedule(self, conference: str, *, new_epoch: bool = False, sync: bool = False,
                  roster: bool = False, grant: bool = False, cause: str | None = None,
                  causes: Iterable[str] = ()) -> None:
        """Queue KMF work; ``cause``/``causes`` say why a new epoch is due (audit)."""
        if self._stopped:
            return
        job = self._jobs.setdefault(conference, _Job())
        job.new_epoch |= new_epoch
        if new_epoch:
            job.causes.update(causes)
            if cause is not None:
                job.causes.add(cause)
        job.sync |= sync
        job.roster |= roster
        job.grant |= grant
        if not job.running:
            job.running = True
            d = defer.ensureDeferred(self._run(conference, job))
            d.addErrback(lambda f: log.failure("KMF work for {conference} failed", f,
                                               conference=conference))
            self._running.add(d)
            d.addBoth(lambda _: self._running.discard(d))

    async def _run(self, conference: str, job: _Job) -> None:
        delay = RETRY_MIN
        try:
            while job.due() and not self._stopped:
                new, sync, roster, grant = job.new_epoch, job.sync, job.roster, job.grant
                job.new_epoch = job.sync = job.roster = job.grant = False
                operation = ("new_epoch" if new else "sync" if sync else
                             "grant" if grant else "roster")
                try:
                    await self._round(conference, job, new, sync, roster, grant)
                except KmfRefused as e:
                    if self.metrics is not None:
                        self.metrics.kmf_errors.labels(operation).inc()
                    if e.status == 410:
                        log.info("conference {conference} has ended at the KMF",
                                 conference=conference)
                        self.end_conference(conference)
                        return
                    if e.status in (404, 409) and self.core.epoch(conference) == 0:
                        # Only an MD's Associations named it; nothing to keep.
                        log.info("conference {conference} is not running at the KMF "
                                 "({error}): forgotten", conference=conference,
                                 error=str(e))
                        self.end_conference(conference, ended=False)
                        return
                    log.warn("KMF refused {operation} for {conference}: {error}",
                             operation=operation, conference=conference, error=str(e))
                except KmfError as e:
                    if self.metrics is not None:
                        self.metrics.kmf_errors.labels(operation).inc()
                    job.new_epoch |= new
                    job.sync |= sync
                    job.roster |= roster
                    job.grant |= grant
                    log.warn("KMF {operation} for {conference} failed: {error}; retrying in "
                             "{delay:.0f} s", operation=operation, conference=conference,
                             error=str(e), delay=delay)
                    if not await self._sleep(delay):
                        return
                    delay = min(delay * 2, RETRY_MAX)
        finally:
            job.running = False
            if self._jobs.get(conference) is job and not job.due():
                del self._jobs[conference]

    async def _round(self, conference: str, job: _Job, new: bool, sync: bool, roster: bool,
                     grant: bool) -> None:
        if conference not in self.core.conferences():
            return  # ended meanwhile
        if new or sync or grant:
            # Membership is checked where a key leaves: every recipient of this
            # round's key must still be invited (issue 10; the KMF's
            # invitation-withdrawn event is the fast path, this the guarantee).
            if not await self._recheck_invitations(conference):
                return
            new |= job.new_epoch  # a withdrawn member made a rekey due: this one
            job.new_epoch = False
        # This epoch's causes, taken now: those that come while the KMF starts it are
        # the next epoch's (job.new_epoch again); given back for a retry if it fails.
        causes: set[str] = set()
        if new:
            causes, job.causes = job.causes, set()
        installed = False
        try:
            if new:
                started = await self.kmf.new_epoch(conference)
                if self.metrics is not None:
                    self.metrics.epochs.inc()
                self.epoch_started(conference, started["epoch"], frozenset(causes),
                                   len(self.core.roster(conference)))
            if new or sync:
                epoch, params = await self.kmf.current_key(conference)
                if conference not in self.core.conferences():
                    return
                if epoch > self.core.epoch(conference):
                    # an epoch this KD did not start (another KD's, an admin's): manual
                    self._install(conference, epoch, params, causes if new else {"manual"})
                    installed = True
        except BaseException:
            if not installed:
                job.causes |= causes
            raise
        if grant and not installed:
            self._send(self.core.grant(conference, self.reactor.seconds()), None)
            self._after_core()
        roster |= job.roster
        job.roster = False
        if (new or roster or installed) and self.core.epoch(conference) > 0:
            epoch = self.core.epoch(conference)
            members = self.core.roster(conference)
            await self.kmf.put_roster(conference, epoch, members,
                                      self.core.admitted(conference))
            log.info("roster of {conference} for epoch {epoch}: {count} member(s)",
                     conference=conference, epoch=epoch, count=len(members))

    async def _recheck_invitations(self, conference: str) -> bool:
        """Close the associations of every identity no longer invited; False if the
        conference has ended (then it is ended here too)."""
        identities = self.core.identities(conference)
        if not identities:
            return True
        state, invited = await self.kmf.invitation_check(conference, identities)
        if conference not in self.core.conferences():
            return False
        if state == "ended":
            log.info("conference {conference} has ended at the KMF", conference=conference)
            self.end_conference(conference)
            return False
        for identity in identities:
            if identity not in invited:
                self.remove_identity(conference, identity, "no longer invited")
        return True

    def remove_identity(self, conference: str, identity: str, reason: str) -> None:
        """Close ``identity``'s associations in the conference (close_notify,
        EndpointDisconnect to the MD); a new epoch follows if it was keyed."""
        out = self.core.remove_identity(conference, identity, self.reactor.seconds())
        if out:
            log.info("{identity} removed from {conference} ({reason}): {count} "
                     "association(s) closed", identity=identity, conference=conference,
                     reason=reason, count=sum(isinstance(m, EndpointDisconnect) for m in out))
        self._send(out, None)
        self._after_core()

    async def _sleep(self, delay: float) -> bool:
        d = task.deferLater(self.reactor, delay, lambda: None)
        self._sleeps.add(d)
        try:
            await d
        except defer.CancelledError:
            return False
        finally:
            self._sleeps.discard(d)
        return not self._stopped

    # -- KMF events --------------------------------------------------------------------

    def kmf_event(self, kind: str, data: dict[str, Any]) -> None:
        conference = data.get("conference")
        if not isinstance(conference, str):
            return
        if kind == "conference-ended":
            if conference in self.core.conferences():
                log.info("KMF: conference {conference} ended", conference=conference)
            self.end_conference(conference)
            self._fetch_media_distributors()  # its MDs may be needed no more
        elif kind == "media-distributor":
            tunnel = data.get("tunnel")
            if isinstance(tunnel, str) and self.on_media_distributors is not None:
                log.info("KMF: conference {conference} is served by the MD at {tunnel}",
                         conference=conference, tunnel=tunnel)
                self.on_media_distributors([tunnel], False)
        elif kind == "invitation-withdrawn":
            identity = data.get("identity")
            if isinstance(identity, str) and conference in self.core.conferences():
                self.remove_identity(conference, identity, "invitation withdrawn")
        elif kind == "policy":
            if conference in self.core.conferences():
                late_join = data.get("late_join")
                if late_join in ("none", "current", "history"):
                    self.core.set_policy(conference, rekey_on_join=late_join == "none")
                self.set_rekey_interval(conference, data.get("rekey_interval", 0.0))
        elif kind == "epoch":
            epoch = data.get("epoch")
            if (conference in self.core.conferences() and isinstance(epoch, int)
                    and epoch > self.core.epoch(conference)):
                self._schedule(conference, sync=True)

    def _fetch_media_distributors(self) -> None:
        """Ask the KMF for every conference's MDs (complete list) in the background."""
        if self.on_media_distributors is None or self._stopped:
            return

        async def fetch() -> None:
            try:
                addresses = await self.kmf.media_distributors()
            except KmfError as e:  # unreachable, or a KMF without the route
                log.warn("KMF: media distributor list not fetched: {error}", error=str(e))
                return
            if self.on_media_distributors is not None and not self._stopped:
                self.on_media_distributors(addresses, True)

        d = defer.ensureDeferred(fetch())
        self._running.add(d)
        d.addBoth(lambda _: self._running.discard(d))

    def _events_connected(self) -> None:
        self._fetch_media_distributors()
        self._connections += 1
        reachable, self._reachable = self._reachable, []
        for d in reachable:
            d.callback(None)
        if self._connections > 1:  # events may have been missed: check every conference
            for conference in self.core.conferences():
                self._schedule(conference, sync=True)

    def end_conference(self, conference: str, *, ended: bool = True) -> None:
        """Close the conference's associations (EndpointDisconnect each) and wipe its keys.

        ``ended`` (it has ended at the KMF): then every MD with an up tunnel is
        sent ConferenceEnded too, after those EndpointDisconnects.
        """
        self._jobs.pop(conference, None)
        self._rekey_intervals.pop(conference, None)
        self._cancel_rekey(conference)
        for lost in self._lost.values():
            for aid in [a for a, c in lost.items() if c == conference]:
                del lost[aid]
        out = self.core.end_conference(conference, self.reactor.seconds())
        self._send(out, None)
        if ended:
            self._conference_ended_at_mds(conference)
        self._after_core()

    def _conference_ended_at_mds(self, conference: str) -> None:
        """ConferenceEnded on every up tunnel: which MDs host it is not known here."""
        try:
            message = ConferenceEnded(conference)
        except TunnelError as e:  # not a conference id the KMF hands out
            log.warn("conference {conference!r} ended, but cannot be named in "
                     "ConferenceEnded: {error}", conference=conference, error=str(e))
            return
        peers = [peer for peer in self._peers.values() if self._live(peer)]
        for peer in peers:
            peer.send(message)
        log.info("conference {conference} ended: told {count} MD(s)",
                 conference=conference, count=len(peers))


def _slug(text: str) -> str:
    """A machine-readable reason from a cause or a refusal's sentence."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:64] or "unknown"


def _aid(association_id: bytes) -> str:
    return str(uuid.UUID(bytes=association_id))


# --- the service --------------------------------------------------------------------------


class KdService(MultiService):
    """The KD: tunnels to the configured MDs, the core, the KMF client (module doc)."""

    def __init__(self, reactor: Any, cfg: config_module.Config,
                 metrics: Metrics | None = None) -> None:
        super().__init__()
        self.setName("kd")
        self.reactor = reactor
        self.cfg = cfg
        self.kmf = KmfClient(reactor, cfg.kmf.url, cfg.kmf.ca_file, cfg.kmf.client_id,
                             cfg.kmf.client_secret_file)
        self.handler: KdHandler | None = None
        self.problem: str | None = None
        try:
            credentials = load_credentials(cfg.tunnel.certificate, cfg.tunnel.private_key)
        except tls.TlsFileError as e:
            self.problem = f"KD certificate/key: {e}"
            return
        core = KeyDistributorCore(credentials.chain[0], credentials.private_key,
                                  os.urandom(32))
        self.handler = KdHandler(reactor, core=core, kmf=self.kmf,
                                 idp_domain=cfg.idp.domain, credentials=credentials,
                                 metrics=metrics)
        self._metrics = metrics
        #: "host:port" -> its tunnel client: ``[tunnel] mds`` (kept for ever) and the
        #: MDs the KMF names for conferences (dropped when no conference needs them).
        self.md_clients: dict[str, Any] = {}
        self._static = set(cfg.tunnel.mds)
        for item in cfg.tunnel.mds:
            problem = self._add_md(item)
            if problem is not None:
                self.problem = problem
        self.handler.on_media_distributors = self.media_distributors

    def _add_md(self, address: str) -> str | None:
        """Start a tunnel client to the MD at ``host:port``; a problem text, or None."""
        from perc_daemons.kd.tunnel import KdTunnelClient

        if address in self.md_clients:
            return None
        try:
            parsed = parse_tunnel_address(address)
        except TunnelAddressError as e:
            return f"tunnel to md {address!r}: {e}"
        try:
            client = KdTunnelClient(self.reactor, host=parsed.host, port=parsed.port,
                                    name=parsed.host,
                                    ca_certificate=self.cfg.tunnel.ca_file,
                                    certificate=self.cfg.tunnel.certificate,
                                    private_key=self.cfg.tunnel.private_key,
                                    handler=self.handler, metrics=self._metrics,
                                    liveness_interval=self.cfg.tunnel.liveness_interval,
                                    liveness_timeout=self.cfg.tunnel.liveness_timeout)
        except tls.TlsFileError as e:
            return f"tunnel to md {address}: {e}"
        self.md_clients[address] = client
        client.setServiceParent(self)  # started now if the KD is running
        return None

    def media_distributors(self, addresses: list[str], complete: bool) -> None:
        """Connect to the MDs the KMF names; with the ``complete`` list, drop the others
        (those no conference needs any more; ``[tunnel] mds`` stay)."""
        for address in addresses:
            if address not in self.md_clients:
                problem = self._add_md(address)
                if problem is None:
                    log.info("perc-kd: connecting to the MD at {address}", address=address)
                else:
                    log.error("perc-kd: {problem}", problem=problem)
        if complete:
            for address in sorted(set(self.md_clients) - set(addresses) - self._static):
                client = self.md_clients.pop(address)
                log.info("perc-kd: no conference is served by the MD at {address} any "
                         "more: tunnel closed", address=address)
                client.disownServiceParent()

    def startService(self) -> None:
        super().startService()
        if self.handler is None:
            log.error("perc-kd cannot serve: {problem}; only /healthz and /metrics run "
                      "(install the certificate and key, then restart)", problem=self.problem)
            return
        if self.problem is not None:
            log.error("perc-kd: {problem}", problem=self.problem)
        log.info("perc-kd: certificate {fingerprint}",
                 fingerprint=format_fingerprint(self.handler.credentials.fingerprint))
        if not self.cfg.tunnel.mds:
            log.info("perc-kd: no [tunnel] mds configured: connecting to the MDs the KMF "
                     "names for conferences")
        if not os.path.exists(self.cfg.kmf.client_secret_file):
            log.error("perc-kd: KMF client secret file {path} is missing; retrying until "
                      "it appears", path=self.cfg.kmf.client_secret_file)
        self.handler.start_events()

    def stopService(self) -> defer.Deferred[None]:  # type: ignore[override]
        d = defer.maybeDeferred(super().stopService)
        if self.handler is not None:
            stopped = self.handler.stop()
            d.addBoth(lambda _: stopped)
        d.addBoth(lambda _: self.kmf.close())
        return d


def makeService(options: Options) -> MultiService:
    from twisted.internet import reactor

    top = base_service("kd", options.loaded, reactor)
    kd = KdService(reactor, options.loaded, top.metrics)  # type: ignore[attr-defined]
    kd.setServiceParent(top)
    notify = top.notify  # type: ignore[attr-defined]
    if kd.handler is not None:  # READY=1 (Type=notify) once the KMF answers
        notify.require(f"the KMF at {options.loaded.kmf.url}", kd.handler.when_kmf_reachable)
    else:  # as the module docstring says: a fresh install starts, serving /healthz only
        notify.note = f"cannot serve: {kd.problem}"
    return top
