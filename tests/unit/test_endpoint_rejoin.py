"""The reference endpoint notices it was orphaned and joins again (module docstring, step 9).

* :class:`~perc_daemons.endpoint.client.OrphanWatch`, the pure rule: a
  verified roster of a newer epoch than the one that last listed us, without
  us, for a grace period and one more roster, with no EKTKey meanwhile;
* the same rule fed by rosters a KD-scoped client PUTs at a real perc-kmf
  (over real HTTPS), through :meth:`Endpoint._refresh_roster`;
* the KMF login renewed with the kept password when the token is refused or
  about to expire, and the identity assertion reused only while young.

The rejoin itself, against real daemons, is in tests/e2e/test_conference_faults.py
(KdRestartTests).
"""

from __future__ import annotations

import os

from twisted.internet import defer, reactor
from twisted.trial import unittest

from perc_daemons.endpoint.client import (
    ASSERTION_MAX_AGE,
    AnswerRejected,
    Endpoint,
    IdentityMismatch,
    OrphanWatch,
    _worth_retrying,
)
from perc_daemons.endpoint.https import ClientTlsPolicy, HttpsClient
from perc_daemons.endpoint.kmf import KmfClient, LoginFailed
from perc_daemons.endpoint.md import JoinRefused
from perc_daemons.kmf.tokens import issue_access_token
from tests.unit.test_endpoint_kmf import ALICE, CONFERENCE, ISSUER, PASSWORD, KmfFixture

BOB = "bob@localhost"


class OrphanWatchTests(unittest.TestCase):
    """The rule alone: epochs, listed or not, EKTKeys and times in; orphaned or not out."""

    def test_listed_rosters_never_orphan(self) -> None:
        watch = OrphanWatch(grace=1.0)
        watch.associated(None)
        for now, epoch in enumerate(range(1, 6)):
            self.assertFalse(watch.roster(epoch, True, float(now)))
        self.assertEqual(watch.baseline, 5)

    def test_newer_roster_without_us_orphans_after_grace_and_one_more_roster(self) -> None:
        watch = OrphanWatch(grace=1.0)
        watch.associated(None)
        self.assertFalse(watch.roster(3, True, 0.0))
        self.assertFalse(watch.roster(4, False, 10.0))  # suspected
        self.assertFalse(watch.roster(4, False, 10.5))  # not for a second yet
        self.assertTrue(watch.roster(4, False, 11.0))

    def test_grace_needs_another_roster_too(self) -> None:
        watch = OrphanWatch(grace=1.0)
        watch.associated(2)
        self.assertFalse(watch.roster(3, False, 0.0))
        self.assertTrue(watch.roster(3, False, 30.0))  # one more fetch, long after

    def test_first_roster_without_us_may_predate_our_join(self) -> None:
        """Never listed and no roster known at join: the first one becomes the baseline."""
        watch = OrphanWatch(grace=0.0)
        watch.associated(None)
        self.assertFalse(watch.roster(7, False, 0.0))
        self.assertFalse(watch.roster(7, False, 5.0))  # the same epoch: says nothing
        self.assertFalse(watch.roster(8, True, 6.0))  # our join's roster
        self.assertFalse(watch.roster(9, False, 20.0))
        self.assertTrue(watch.roster(9, False, 21.0))

    def test_old_or_same_epoch_without_us_says_nothing(self) -> None:
        watch = OrphanWatch(grace=0.0)
        watch.associated(5)
        for now in range(10):
            self.assertFalse(watch.roster(5, False, float(now)))
            self.assertFalse(watch.roster(4, False, float(now)))
        self.assertIsNone(watch.suspected_at)

    def test_ektkey_explains_the_omission(self) -> None:
        """The KD sends an epoch's EKTKey before it reports the roster: a key during the
        suspicion, or just before the omitting roster, means the KD still holds us."""
        watch = OrphanWatch(grace=1.0)
        watch.associated(1)
        self.assertFalse(watch.roster(2, False, 0.0))
        watch.key_installed(0.5)
        self.assertIsNone(watch.suspected_at)
        self.assertFalse(watch.roster(2, False, 1.0))  # the key is fresh: wait for its roster
        self.assertFalse(watch.roster(3, True, 1.2))
        # Later, without any key: a newer roster without us orphans.
        self.assertFalse(watch.roster(4, False, 10.0))
        self.assertTrue(watch.roster(4, False, 12.0))

    def test_listed_again_clears_the_suspicion(self) -> None:
        watch = OrphanWatch(grace=1.0)
        watch.associated(1)
        self.assertFalse(watch.roster(2, False, 0.0))
        self.assertFalse(watch.roster(3, True, 0.5))
        self.assertFalse(watch.roster(4, False, 5.0))  # a new suspicion starts here
        self.assertFalse(watch.roster(4, False, 5.5))
        self.assertTrue(watch.roster(4, False, 6.0))

    def test_new_association_resets(self) -> None:
        """After a rejoin the baseline is the newest roster known, the one without us."""
        watch = OrphanWatch(grace=0.0)
        watch.associated(1)
        self.assertFalse(watch.roster(2, False, 0.0))
        watch.associated(2)
        self.assertFalse(watch.roster(2, False, 1.0))
        self.assertIsNone(watch.suspected_at)

    def test_bad_arguments(self) -> None:
        with self.assertRaises(ValueError):
            OrphanWatch(grace=-1)
        with self.assertRaises(ValueError):
            OrphanWatch(confirmations=-1)


class RetryTests(unittest.TestCase):
    def test_worth_retrying(self) -> None:
        self.assertTrue(_worth_retrying(JoinRefused(503, "KD not connected")))
        self.assertTrue(_worth_retrying(JoinRefused(504, "KD did not answer")))
        self.assertFalse(_worth_retrying(JoinRefused(403, "Refused", "not invited")))
        self.assertFalse(_worth_retrying(AnswerRejected("AnswerMismatch")))
        self.assertFalse(_worth_retrying(IdentityMismatch("someone else")))
        self.assertFalse(_worth_retrying(LoginFailed("Invalid username or password.")))
        self.assertTrue(_worth_retrying(ConnectionRefusedError()))


class RecordingRejoins(Endpoint):
    """An endpoint whose rejoin only records why (the real one is in the e2e tests)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rejoin_reasons: list[str] = []

    def _start_rejoin(self, reason: str) -> None:
        if self._may_rejoin():
            self.rejoin_reasons.append(reason)


class EndpointKmfRejoinTests(KmfFixture, unittest.TestCase):
    """The endpoint's KMF side of a rejoin against a real perc-kmf over HTTPS."""

    def endpoint(self, cls: type[Endpoint] = Endpoint, **kwargs) -> Endpoint:
        ep = cls(reactor, kmf_url=self.url, md_url="https://localhost:9", ca=os.path.join(
            self.dir, "pki", "ca.crt"), conference_id=CONFERENCE, user=ALICE,
            password=PASSWORD, **kwargs)
        ep.kmf = KmfClient(reactor, self.url, ca=self.ca, certificate=self.certificate)
        self.addCleanup(ep.kmf.close)
        return ep

    async def put_roster(self, epoch: int, members: list[tuple[str, list[int]]]) -> None:
        if not hasattr(self, "kd"):
            self.kd = HttpsClient(reactor, self.url, ClientTlsPolicy(self.ca))
            self.addCleanup(self.kd.close)
        token = issue_access_token(
            self.keys, issuer=ISSUER, subject="kd-1@localhost", audience=ISSUER,
            client_id="kd-1", scopes=["kd"], now=reactor.seconds(), lifetime=300)
        code, body, _ = await self.kd.json(
            "PUT", f"/v1/conferences/{CONFERENCE}/roster",
            {"epoch": epoch, "members": [{"identity": i, "ssrcs": s} for i, s in members]},
            token=token)
        self.assertEqual(code, 200, body)

    @defer.inlineCallbacks
    def test_login_renewed_when_the_token_is_refused(self):
        ep = self.endpoint()
        yield defer.ensureDeferred(ep._login())
        self.assertEqual((ep.identity, ep.logins), (ALICE, 1))
        first = yield defer.ensureDeferred(ep._identity_assertion())
        # Young enough: reused without asking the KMF.
        again = yield defer.ensureDeferred(ep._identity_assertion())
        self.assertIs(again, first)
        # Too old: a new one; the KMF refuses the token (401): signed in again.
        ep._assertion = (reactor.seconds() - ASSERTION_MAX_AGE - 1, first)
        ep.kmf._token = "not-a-token"
        renewed = yield defer.ensureDeferred(ep._identity_assertion())
        self.assertNotEqual(renewed, first)
        self.assertEqual(ep.logins, 2)
        self.assertEqual(ep.identity, ALICE)

    @defer.inlineCallbacks
    def test_login_renewed_before_the_token_expires(self):
        ep = self.endpoint()
        yield defer.ensureDeferred(ep._login())
        ep.kmf.token_expires_at = reactor.seconds() + 1
        yield defer.ensureDeferred(ep._identity_assertion())
        self.assertEqual(ep.logins, 2)
        self.assertGreater(ep.kmf.token_expires_at, reactor.seconds() + 60)

    @defer.inlineCallbacks
    def test_renewed_login_must_keep_the_identity(self):
        ep = self.endpoint()
        yield defer.ensureDeferred(ep._login())
        ep.identity = BOB  # as if the first login had been bob's
        with self.assertRaises(IdentityMismatch):
            yield defer.ensureDeferred(ep._login())

    @defer.inlineCallbacks
    def test_roster_without_us_starts_a_rejoin(self):
        """Rosters a KD PUTs at the KMF, fetched and verified by the endpoint: a newer one
        without our SSRC, still without it a second later, starts a rejoin."""
        yield self.running_conference(invited=(ALICE, BOB))  # epoch 1 started
        for spi in (8, 9):  # epochs 2 and 3
            yield self.store.add_epoch(CONFERENCE, spi, bytes([spi]) * 40, reactor.seconds())
        ep = self.endpoint(RecordingRejoins, orphan_grace=0.0)
        yield defer.ensureDeferred(ep._login())
        ep.session = object()  # type: ignore[assignment]  # as if connected and ready
        ep.ready_at = reactor.seconds()
        ep.orphans.associated(None)
        yield defer.ensureDeferred(self.put_roster(1, [(ALICE, [ep.ssrc]), (BOB, [7])]))
        yield defer.ensureDeferred(ep._refresh_roster())
        self.assertEqual(ep.orphans.baseline, 1)
        # Another member's SSRC under our identity (a second device) does not list us.
        yield defer.ensureDeferred(self.put_roster(2, [(ALICE, [ep.ssrc ^ 1]), (BOB, [7])]))
        yield defer.ensureDeferred(ep._refresh_roster())
        self.assertEqual(ep.rejoin_reasons, [])  # suspected only
        yield defer.ensureDeferred(ep._refresh_roster())
        self.assertEqual(len(ep.rejoin_reasons), 1, ep.rejoin_reasons)
        self.assertIn("epoch 2", ep.rejoin_reasons[0])
        # Not after the session was closed by the KD (keys revoked), nor after leaving.
        ep.rejoin_reasons.clear()
        ep.closed_reason = "close_notify from the KD: keys revoked"
        yield defer.ensureDeferred(self.put_roster(3, [(BOB, [7])]))
        for _ in range(2):
            yield defer.ensureDeferred(ep._refresh_roster())
        ep.closed_reason, ep._leaving = None, True
        for _ in range(2):
            yield defer.ensureDeferred(ep._refresh_roster())
        self.assertEqual(ep.rejoin_reasons, [])
