"""The KMF's audit routes and ``perc-admin audit`` against a real KMF over TLS (issue 14).

The KD reports through ``POST /v1/conferences/{id}/audit``; an operator
(``admin``) or an auditor (``auditor``, nothing else) reads the trail and
verifies it with the JWKS alone; ``perc-admin audit verify`` fails naming the
first bad record once somebody with write access to the SQLite file edits it,
and ``verify --file`` checks an export offline.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.trial import unittest

from perc_daemons.kmf import admin_cli
from perc_daemons.kmf.audit import AuditLog, check_report
from perc_daemons.protocol.audit import (
    AuditError,
    TrailBroken,
    export_lines,
    parse_export,
    parse_record,
    verify_trail,
)
from tests.unit import test_kmf_api
from tests.unit.test_kmf_api import ALICE, BOB

CID = "conf-1"
AID = "ab" * 16
FP = "cd" * 32


def reports(first: int = 0) -> list[dict]:
    t = 1_790_000_000.0
    return [
        {"id": f"kd-{first}", "time": t, "kind": "admitted", "identity": ALICE,
         "detail": {"association": AID, "fingerprint": FP, "md": "md1:9450", "epoch": 2,
                    "ssrcs": [1, 2]}},
        {"id": f"kd-{first + 1}", "time": t + 1, "kind": "refused", "identity": "eve@example.com",
         "detail": {"reason": "not_invited", "md": "md1:9450"}},
        {"id": f"kd-{first + 2}", "time": t + 2, "kind": "epoch-started",
         "detail": {"epoch": 2, "cause": "join", "causes": ["join"],
                    "members": [{"identity": ALICE, "association": AID}]}},
        {"id": f"kd-{first + 3}", "time": t + 3, "kind": "left", "identity": ALICE,
         "detail": {"reason": "close_notify", "association": AID}},
    ]


class KmfAuditTests(unittest.TestCase):
    timeout = 30

    setUp = test_kmf_api.KmfApiTests.setUp
    open_store = test_kmf_api.KmfApiTests.open_store
    token = test_kmf_api.KmfApiTests.token
    admin = test_kmf_api.KmfApiTests.admin
    kd = test_kmf_api.KmfApiTests.kd
    call = test_kmf_api.KmfApiTests.call
    ok = test_kmf_api.KmfApiTests.ok
    problem = test_kmf_api.KmfApiTests.problem

    def auditor(self) -> str:
        return self.token(["auditor"], subject="auditor@example.com")

    @defer.inlineCallbacks
    def conference_with_a_life(self):
        yield self.ok("POST", "/v1/conferences", 201, token=self.admin(),
                      body={"id": CID, "title": "t", "initiator": ALICE, "invited": [BOB]})
        yield self.ok("POST", f"/v1/conferences/{CID}/start", token=self.admin())
        _, body = yield self.ok("POST", f"/v1/conferences/{CID}/audit", token=self.kd(),
                                body={"events": reports()})
        self.assertEqual((body["recorded"], body["duplicates"]), (4, 0))
        yield self.ok("DELETE", f"/v1/conferences/{CID}/invitations/{BOB}", token=self.admin())
        yield self.ok("POST", f"/v1/conferences/{CID}/end", token=self.admin())

    @defer.inlineCallbacks
    def trail(self, token: str | None = None):
        _, body = yield self.ok("GET", f"/v1/conferences/{CID}/audit",
                                token=token or self.auditor())
        jwks = self.keys.jwks(self.now)
        records = [parse_record(r) for r in body["records"]]
        from perc_daemons.protocol.audit import parse_checkpoint
        checkpoints = [parse_checkpoint(c) for c in body["checkpoints"]]
        return records, checkpoints, jwks

    @defer.inlineCallbacks
    def test_kd_reports_and_the_end_are_in_a_signed_trail(self):
        yield self.conference_with_a_life()
        records, checkpoints, jwks = yield self.trail()
        self.assertEqual([r.kind for r in records],
                         ["created", "state", "epoch", "admitted", "refused", "epoch-started",
                          "left", "uninvited", "ended"])
        admitted = records[3]
        self.assertEqual((admitted.identity, admitted.detail["fingerprint"],
                          admitted.detail["association"], admitted.detail["md"],
                          admitted.detail["epoch"]), (ALICE, FP, AID, "md1:9450", 2))
        self.assertEqual(records[5].detail["cause"], "join")
        result = verify_trail(CID, records, checkpoints, jwks, issuer="https://example.com")
        self.assertEqual(result.signed_through, 9)  # signed at the end

    @defer.inlineCallbacks
    def test_a_batch_sent_again_is_recorded_once(self):
        yield self.conference_with_a_life()
        _, body = yield self.ok("POST", f"/v1/conferences/{CID}/audit", token=self.kd(),
                                body={"events": reports()})
        self.assertEqual((body["recorded"], body["duplicates"]), (0, 4))
        # after the end the KD still reports (the leaves the end caused), and it is signed
        leave = {**reports(10)[3], "detail": {"reason": "conference_ended", "association": AID}}
        _, body = yield self.ok("POST", f"/v1/conferences/{CID}/audit", token=self.kd(),
                                body={"events": [leave]})
        records, checkpoints, jwks = yield self.trail()
        self.assertEqual(records[-1].detail["reason"], "conference_ended")
        self.assertEqual(verify_trail(CID, records, checkpoints, jwks).unsigned, 0)

    @defer.inlineCallbacks
    def test_events_sent_again_to_another_kmf_are_recorded_once(self):
        """The ids are kept by the store: a KMF restarted, or another KMF of the same
        store, records an event it gets again (in another batch, as the KD's queue
        re-batches) once."""
        yield self.conference_with_a_life()
        other_kmf = AuditLog(self.store, self.keys, issuer="https://example.com",
                             clock=reactor)
        rebatched = [*reports()[2:], *reports(4)[:1]]
        self.assertEqual((yield other_kmf.report(CID, rebatched)), (1, 2))
        records, _, _ = yield self.trail()
        self.assertEqual([r.kind for r in records].count("admitted"), 2)
        self.assertEqual([r.kind for r in records].count("left"), 1)

    @defer.inlineCallbacks
    def test_scopes(self):
        yield self.conference_with_a_life()
        yield self.trail(self.admin())  # admin reads too
        for scopes in (["keys"], ["kd"], ["identity"]):
            yield self.problem("GET", f"/v1/conferences/{CID}/audit", 403,
                               "insufficient-scope", token=self.token(scopes))
        yield self.problem("GET", f"/v1/conferences/{CID}", 403, "insufficient-scope",
                           token=self.auditor())  # an auditor reads trails only
        yield self.problem("POST", f"/v1/conferences/{CID}/audit", 403, "insufficient-scope",
                           token=self.auditor(), body={"events": []})

    @defer.inlineCallbacks
    def test_a_bad_report_records_nothing(self):
        yield self.conference_with_a_life()
        before, _, _ = yield self.trail()
        bad = reports(20)
        bad[2]["detail"]["cause"] = "whim"
        yield self.problem("POST", f"/v1/conferences/{CID}/audit", 400, "invalid-request",
                           token=self.kd(), body={"events": bad})
        key = {**reports(30)[1], "detail": {"reason": "x", "key": "00" * 16}}
        yield self.problem("POST", f"/v1/conferences/{CID}/audit", 400, "invalid-request",
                           token=self.kd(), body={"events": [key]})
        yield self.problem("POST", "/v1/conferences/nope/audit", 404, "not-found",
                           token=self.kd(), body={"events": reports(40)})
        after, _, _ = yield self.trail()
        self.assertEqual(len(after), len(before))

    # -- perc-admin audit

    def admin_config(self) -> list[str]:
        token_file = os.path.join(self.dir, "token")
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.token(["auditor"], subject="auditor@example.com"))
        config = os.path.join(self.dir, "admin.toml")
        with open(config, "w") as f:
            f.write(f'url = "{self.base.replace("127.0.0.1", "localhost")}"\n'
                    f'ca_file = "{self.server_cert.cert_path}"\nissuer = "https://example.com"\n')
        return ["--config", config, "--token-file", token_file]

    @defer.inlineCallbacks
    def admin_cli(self, *argv: str):
        out, err = io.StringIO(), io.StringIO()
        status = yield defer.ensureDeferred(
            admin_cli.run([*argv], reactor, stdout=out, stderr=err))
        return status, out.getvalue(), err.getvalue()

    @defer.inlineCallbacks
    def test_perc_admin_show_verify_export_and_verify_file(self):
        yield self.conference_with_a_life()
        opts = self.admin_config()
        status, out, err = yield self.admin_cli("audit", "verify", CID, *opts)
        self.assertEqual(status, 0, err)
        self.assertIn("verified: 9 record(s) 1-9", out)
        status, out, err = yield self.admin_cli("audit", "show", CID, *opts)
        self.assertEqual(status, 0, err)
        self.assertIn("epoch-started", out)
        self.assertIn("close_notify", out)
        export = os.path.join(self.dir, "trail.jsonl")
        status, _, err = yield self.admin_cli("audit", "export", CID, "--jsonl",
                                              "--output", export, *opts)
        self.assertEqual(status, 0, err)
        with open(export) as f:
            lines = f.read().splitlines()
        self.assertEqual([json.loads(line)["type"] for line in lines].count("record"), 9)
        jwks = os.path.join(self.dir, "jwks.json")
        with open(jwks, "w") as f:
            json.dump(self.keys.jwks(self.now), f)
        status, out, err = yield self.admin_cli("audit", "verify", "--file", export,
                                                "--jwks", jwks)
        self.assertEqual(status, 0, err)
        self.assertIn("signed through record 9", out)
        # the export edited: record 4 names another certificate
        obj = json.loads(lines[3])
        obj["detail"]["fingerprint"] = "ee" * 32
        lines[3] = json.dumps(obj)
        with open(export, "w") as f:
            f.write("\n".join(lines) + "\n")
        status, _, err = yield self.admin_cli("audit", "verify", "--file", export,
                                              "--jwks", jwks)
        self.assertEqual(status, 1)
        self.assertIn("record 4", err)
        self.assertIn("edited", err)

    @defer.inlineCallbacks
    def test_perc_admin_verify_fails_on_an_edited_sqlite_file(self):
        """An attacker with the KMF's database file deletes the refusal of eve."""
        yield self.conference_with_a_life()
        db = sqlite3.connect(os.path.join(self.dir, "kmf.sqlite3"), isolation_level=None)
        db.execute("DELETE FROM audit WHERE kind = 'refused'")
        db.close()
        status, _, err = yield self.admin_cli("audit", "verify", CID, *self.admin_config())
        self.assertEqual(status, 1)
        self.assertIn("record 5", err)
        self.assertIn("missing", err)

    def test_usage(self):
        for argv in (["audit", "verify"], ["audit", "verify", "--file", "f"],
                     ["audit", "export", CID]):
            out, err = io.StringIO(), io.StringIO()
            self.assertEqual(admin_cli.main(argv, stdout=out, stderr=err), 2, argv)

    @defer.inlineCallbacks
    def test_retention_sweep_leaves_a_signed_deletion(self):
        yield self.conference_with_a_life()

        class Later:
            def seconds(self_) -> float:
                return reactor.seconds() + 7200

        log = AuditLog(self.store, self.keys, issuer="https://example.com", clock=Later(),
                       retention=3600)
        self.assertEqual((yield defer.ensureDeferred(log.sweep())), 1)
        records, checkpoints, jwks = yield self.trail()
        self.assertEqual([(r.seq, r.kind) for r in records], [(10, "trail-deleted")])
        self.assertEqual(records[0].detail["records"], 9)
        verify_trail(CID, records, checkpoints, jwks)
        self.assertEqual((yield defer.ensureDeferred(log.sweep())), 0)


class ParserPropertyTests(unittest.TestCase):
    """The export parser and the verifier on arbitrary input raise only their typed errors."""

    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8),
                                                                     inner, max_size=4),
        max_leaves=12)

    record_like = st.fixed_dictionaries(
        {"type": st.sampled_from(["record", "checkpoint", "x"])},
        optional={"conference": st.sampled_from(["c", CID]) | json_values,
                  "seq": st.integers(-2, 5) | json_values,
                  "time": st.floats() | json_values,
                  "kind": st.sampled_from(["created", "trail-deleted"]) | json_values,
                  "identity": st.none() | json_values, "detail": json_values,
                  "prev": st.sampled_from(["0" * 64, "a" * 64]) | json_values,
                  "hash": st.sampled_from(["0" * 64, "a" * 64]) | json_values,
                  "jws": st.text(max_size=30)})

    @settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(st.one_of(st.text(max_size=60), st.binary(max_size=60),
                              record_like.map(json.dumps)), max_size=6))
    def test_arbitrary_lines(self, lines):
        try:
            conference, records, checkpoints = parse_export(lines)
        except AuditError:
            return
        try:
            verify_trail(conference or CID, records, checkpoints, {"keys": []})
        except TrailBroken:
            pass

    @settings(deadline=None, max_examples=200)
    @given(json_values)
    def test_arbitrary_reports(self, event):
        try:
            check_report(event)
        except ValueError:
            pass

    def test_round_trip(self):
        from perc_daemons.protocol.audit import AuditRecord

        r1 = AuditRecord.chained(CID, 1, 1.5, "created", None, {"a": [1, 2.5]}, "0" * 64)
        r2 = AuditRecord.chained(CID, 2, 2.0, "ended", None, {}, r1.hash)
        conference, records, checkpoints = parse_export(export_lines([r1, r2], []))
        self.assertEqual((conference, records, checkpoints), (CID, [r1, r2], []))
