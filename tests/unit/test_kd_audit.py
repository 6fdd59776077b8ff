"""The KD's audit reports reach the KMF's trail (issue 14), and a KMF outage loses none.

With a real KMF over HTTPS and the KD handler of test_kd_service: joins,
a refusal, a leave and an uninvitation end up in the verified trail as the
endpoints saw them (identity, certificate fingerprint, association, epoch,
cause, members).  Then the reporter alone against a KMF that is not
listening: reports queue, the batches are retried with back-off (counted),
and once the KMF listens they are all recorded, in order, once.
"""

from __future__ import annotations

import os
import socket

from twisted.internet import defer, reactor
from twisted.trial import unittest

from perc_daemons import tls
from perc_daemons.kd.audit import AuditReporter
from perc_daemons.kd.kmf_client import KmfClient
from perc_daemons.kmf.api import kmf_site
from perc_daemons.metrics import Metrics
from perc_daemons.protocol.audit import verify_trail
from perc_daemons.protocol.tunnel import (
    DISCONNECT_CONFERENCE_DELETED,
    DISCONNECT_CONSENT_TIMEOUT,
    DISCONNECT_LEAVE,
    REASONS_ANNOUNCEMENT,
    EndpointDisconnect,
    SignAnswerAck,
)
from tests.unit import test_kd_service as kds
from tests.unit.test_kd_service import ALICE, BOB, CAROL, CONF, KD_SECRET, Endpoint, wait_for


class KdAuditTests(unittest.TestCase):
    timeout = 60

    setUp = kds.KdHandlerTests.setUp
    to_endpoint = kds.KdHandlerTests.to_endpoint
    pump = kds.KdHandlerTests.pump
    sign = kds.KdHandlerTests.sign
    join = kds.KdHandlerTests.join
    wait_key = kds.KdHandlerTests.wait_key
    sample = kds.KdHandlerTests.sample

    @defer.inlineCallbacks
    def trail(self):
        records, checkpoints = yield self.kmf.store.audit_trail(CONF)
        verify_trail(CONF, records, checkpoints, self.kmf.keys.jwks(reactor.seconds()))
        return records

    @defer.inlineCallbacks
    def test_joins_refusal_leave_and_uninvite_are_in_the_trail(self):
        yield self.kmf.conference(invited=(ALICE, BOB), late_joiners=False)
        alice, bob = Endpoint("alice", ALICE, 1111), Endpoint("bob", BOB, 2222)
        yield self.join(alice)
        yield self.wait_key(alice, 1)
        yield self.join(bob)
        yield self.wait_key(bob, 1)
        carol = Endpoint("carol", CAROL, 3333)
        _, ack = yield self.sign(carol)  # not invited
        self.assertIsInstance(ack, SignAnswerAck)
        # bob's consent lapsed at the MD, which says so (EndpointDisconnect's reason)
        self.handler.tunnel_message(self.peer,
                                    EndpointDisconnect(bob.aid, DISCONNECT_CONSENT_TIMEOUT))
        yield self.wait_key(alice, 3)
        self.handler.start_events(min_delay=0.05, max_delay=0.5)
        yield wait_for(lambda: self.handler.events_connected, "event stream")
        yield self.kmf.call("DELETE", f"/v1/conferences/{CONF}/invitations/{ALICE}")
        yield wait_for(lambda: not self.core.knows(alice.aid), "alice removed")

        def reported() -> bool:
            return len(self.handler.audit) == 0 and not self.handler._jobs

        yield wait_for(reported, "reports sent")
        records = yield self.trail()
        kd = [r for r in records if r.kind in ("admitted", "refused", "left", "epoch-started")]
        seen = [(r.kind, r.identity, r.detail.get("reason") or r.detail.get("cause"))
                for r in kd]
        self.assertEqual(seen, [
            ("epoch-started", None, "join"),   # the first SignAnswer: epoch 1, nobody keyed
            ("epoch-started", None, "join"),   # alice's first key: a new epoch (no history)
            ("admitted", ALICE, None),
            ("epoch-started", None, "join"),   # bob joins
            ("admitted", BOB, None),
            ("refused", CAROL, "not_invited"),
            ("left", BOB, "consent_timeout"),
            ("epoch-started", None, "leave"),
            ("left", ALICE, "uninvited"),
            ("epoch-started", None, "leave"),
        ])
        admitted = {r.identity: r.detail for r in kd if r.kind == "admitted"}
        self.assertEqual(admitted[ALICE]["fingerprint"], alice.fingerprint.hex())
        self.assertEqual(admitted[ALICE]["association"], alice.aid.hex())
        self.assertEqual(admitted[BOB]["ssrcs"], [2222])
        epochs = [r.detail for r in kd if r.kind == "epoch-started"]
        numbers = [e["epoch"] for e in epochs]
        self.assertEqual(numbers, sorted(set(numbers)))  # each epoch once, in order
        self.assertEqual([[m["identity"] for m in e["members"]] for e in epochs],
                         [[], [ALICE], [ALICE, BOB], [ALICE], []])
        for e, admission in ((epochs[1], admitted[ALICE]), (epochs[2], admitted[BOB])):
            self.assertEqual(admission["epoch"], e["epoch"])
        self.assertEqual(self.sample("perc_kd_audit_reports_total", {"outcome": "sent"}),
                         len(kd))

    @defer.inlineCallbacks
    def test_the_mds_disconnect_reason_is_the_leave_reason(self):
        """The MD's EndpointDisconnect reason (our private byte) is the recorded leave
        reason; none, or one this KD does not know, is ``md_disconnect``; the KD
        announced on tunnel up that it reads them."""
        self.assertEqual(self.peer.announced, 1)
        users = [("alice", ALICE, 1111), ("bob", BOB, 2222), ("carol", CAROL, 3333)]
        yield self.kmf.conference(invited=[u[1] for u in users], late_joiners=False)
        eps = [Endpoint(*u) for u in users]
        for ep in eps:
            yield self.join(ep)
            yield self.wait_key(ep, 1)
        for ep, reason in zip(eps, (DISCONNECT_LEAVE, 200, None), strict=True):
            self.handler.tunnel_message(self.peer, EndpointDisconnect(ep.aid, reason))
        yield wait_for(lambda: not any(self.core.knows(ep.aid) for ep in eps), "all gone")
        # the conference deleted at the MD: a member's leave says so
        dave = Endpoint("dave", ALICE, 4444)
        yield self.join(dave)
        yield self.wait_key(dave, 1)
        self.handler.tunnel_message(self.peer,
                                    EndpointDisconnect(dave.aid, DISCONNECT_CONFERENCE_DELETED))

        def reported() -> bool:
            return len(self.handler.audit) == 0 and not self.handler._jobs

        yield wait_for(reported, "reports sent")
        records = yield self.trail()
        self.assertEqual([(r.identity, r.detail["reason"]) for r in records
                          if r.kind == "left"],
                         [(ALICE, "md_leave"), (BOB, "md_disconnect"), (CAROL, "md_disconnect"),
                          (ALICE, "conference_deleted")])
        self.assertNotIn(REASONS_ANNOUNCEMENT.hex(), str([r.detail for r in records]))

    @defer.inlineCallbacks
    def test_a_leave_while_the_kmf_starts_an_epoch_is_the_next_epochs_cause(self):
        """bob leaves; while the KMF starts the epoch without him, carol leaves too: the
        epoch after is hers, with its cause (leave), not an unexplained "manual"."""
        users = [("alice", ALICE, 1111), ("bob", BOB, 2222), ("carol", CAROL, 3333)]
        yield self.kmf.conference(invited=[u[1] for u in users], late_joiners=False)
        alice, bob, carol = eps = [Endpoint(*u) for u in users]
        for ep in eps:
            yield self.join(ep)
            yield self.wait_key(ep, 1)
        real = self.handler.kmf.new_epoch
        during: list[str] = []

        async def new_epoch(conference: str):  # the real KMF; carol leaves meanwhile
            if not during:
                during.append(conference)
                self.handler.tunnel_message(self.peer, EndpointDisconnect(carol.aid))
            return await real(conference)

        self.handler.kmf.new_epoch = new_epoch
        self.handler.tunnel_message(self.peer, EndpointDisconnect(bob.aid))
        yield wait_for(lambda: during, "bob's rekey started")

        def reported() -> bool:
            return (len(self.handler.audit) == 0 and not self.handler._jobs
                    and not self.core.knows(carol.aid))

        yield wait_for(reported, "reports sent")
        records = yield self.trail()
        after = [r for r in records if r.kind in ("left", "epoch-started")][-4:]
        self.assertEqual([(r.kind, r.identity, r.detail.get("reason") or r.detail["causes"])
                          for r in after],
                         [("left", BOB, "md_disconnect"), ("left", CAROL, "md_disconnect"),
                          ("epoch-started", None, ["leave"]),
                          ("epoch-started", None, ["leave"])])
        self.assertEqual([[m["identity"] for m in r.detail["members"]] for r in after[2:]],
                         [[ALICE], [ALICE]])
        self.assertNotIn("manual", [r.detail["cause"] for r in records
                                    if r.kind == "epoch-started"])
        del alice


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ReporterOutageTests(unittest.TestCase):
    timeout = 60
    to_endpoint = kds.KdHandlerTests.to_endpoint

    @defer.inlineCallbacks
    def setUp(self):
        yield kds.KdHandlerTests.setUp(self)
        yield self.handler.stop()  # only the reporter is under test here
        yield self.kmf.conference()
        self.port_number = free_port()
        self.down = KmfClient(reactor, f"https://localhost:{self.port_number}",
                              str(self.pki.ca_certificate_path), "kd", self.secret_file)
        self.addCleanup(self.down.close)

    def listen(self):
        issued = self.pki.issue("kmf2", ["localhost"], ["127.0.0.1"])
        context = tls.server_context_factory(str(issued.certificate), str(issued.private_key),
                                             request_client_certificate=True)
        port = reactor.listenSSL(self.port_number, kmf_site(self.kmf.api), context,
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)

    @defer.inlineCallbacks
    def test_kmf_down_then_up_loses_nothing(self):
        self.assertTrue(KD_SECRET)
        metrics = Metrics("perc-kd-audit")
        reporter = AuditReporter(reactor, self.down, metrics=metrics, min_delay=0.05,
                                 max_delay=0.2)
        self.addCleanup(reporter.stop)
        for n in range(150):  # two batches
            reporter.report(CONF, "refused", None, {"reason": "no_dtls", "text": str(n)})
        yield wait_for(lambda: reporter.counts["retries"] >= 3, "retries while down")
        self.assertEqual(len(reporter), 150)
        self.listen()
        yield wait_for(lambda: len(reporter) == 0, "reports delivered")
        records, _ = yield self.kmf.store.audit_trail(CONF)
        texts = [r.detail["text"] for r in records if r.kind == "refused"]
        self.assertEqual(texts, [str(n) for n in range(150)])
        self.assertEqual(reporter.counts["sent"], 150)
        registry = metrics.registry
        self.assertEqual(registry.get_sample_value("perc_kd_audit_reports_total",
                                                   {"outcome": "sent"}), 150)
        self.assertGreaterEqual(registry.get_sample_value("perc_kd_audit_retries_total"), 3)

    @defer.inlineCallbacks
    def test_full_queue_drops_the_oldest_and_counts(self):
        reporter = AuditReporter(reactor, self.down, max_queue=5, min_delay=0.05,
                                 max_delay=0.1)
        self.addCleanup(reporter.stop)
        for n in range(8):
            reporter.report(CONF, "refused", None, {"reason": "x", "text": str(n)})
        self.assertEqual((len(reporter), reporter.counts["dropped_full"]), (5, 3))
        yield wait_for(lambda: reporter.counts["retries"] >= 1, "a failed attempt")
        self.listen()
        yield wait_for(lambda: len(reporter) == 0, "reports delivered")
        records, _ = yield self.kmf.store.audit_trail(CONF)
        self.assertEqual([r.detail["text"] for r in records if r.kind == "refused"],
                         ["3", "4", "5", "6", "7"])

    @defer.inlineCallbacks
    def test_refused_batch_is_dropped_and_counted(self):
        reporter = AuditReporter(reactor, self.client, min_delay=0.05)
        self.addCleanup(reporter.stop)
        reporter.report("no-such-conference", "refused", None, {"reason": "x"})
        reporter.report(CONF, "refused", None, {"reason": "y"})
        yield wait_for(lambda: len(reporter) == 0, "reports handled")
        self.assertEqual((reporter.counts["refused"], reporter.counts["sent"]), (1, 1))
        self.assertTrue(os.path.exists(self.secret_file))
