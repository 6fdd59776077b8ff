"""The hash-chained audit trail in both conference stores (issue 14, "Audit trail").

Each store appends, reads back and verifies the chain; then an attacker with
write access to the store (the SQLite file, the Redis keys) edits a field,
deletes a record, swaps two, rewrites the chain after a record, cuts the tail
or forges a checkpoint, and :func:`verify_trail` names the first bad record.
The Redis store computes SHA-256 in Lua: every Redis record verifying in
Python is the check that the two agree (details of every length across the
64-byte block boundaries included).
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import sqlite3

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import defer
from twisted.trial import unittest

from perc_daemons.protocol.audit import (
    CHECKPOINT_TYP,
    GENESIS,
    TRAIL_DELETED,
    AuditRecord,
    Checkpoint,
    TrailBroken,
    canonical_json,
    record_hash,
    sign_checkpoint,
    verify_trail,
)
from perc_daemons.protocol.jose import public_jwk
from perc_daemons.store import ConferenceNotFound, check_audit_args
from perc_daemons.store.sqlite import SqliteConferenceStore
from tests.unit.test_store import REDIS_SERVER, T0, RedisServer, conference

KID = "k1"
KEY = ec.generate_private_key(ec.SECP256R1())
JWKS = {"keys": [{**public_jwk(KEY.public_key()), "kid": KID, "alg": "ES256", "use": "sig"}]}
ISSUER = "https://kmf.example.com"


def sign(record: AuditRecord, key: ec.EllipticCurvePrivateKey = KEY) -> Checkpoint:
    return sign_checkpoint((KID, key), issuer=ISSUER, record=record, now=T0)


class AuditStoreMixin:
    """Shared by both stores: ``self.store`` and the raw-access helpers below."""

    def raw_records(self) -> defer.Deferred[list[dict]]:
        """The stored records of conf-1 as JSON objects, in stored order."""
        raise NotImplementedError

    def write_raw(self, records: list[dict]) -> defer.Deferred[None]:
        """Replace conf-1's stored records by ``records`` (an attacker at the store)."""
        raise NotImplementedError

    def forge_checkpoint(self, checkpoint: Checkpoint) -> defer.Deferred[None]:
        """Overwrite the stored checkpoint of ``checkpoint.seq``."""
        raise NotImplementedError

    @defer.inlineCallbacks
    def trail(self):
        records, checkpoints = yield self.store.audit_trail("conf-1")
        return records, checkpoints

    @defer.inlineCallbacks
    def verify(self):
        records, checkpoints = yield self.trail()
        return verify_trail("conf-1", records, checkpoints, JWKS, issuer=ISSUER)

    @defer.inlineCallbacks
    def broken(self):
        try:
            yield self.verify()
        except TrailBroken as e:
            return e
        self.fail("the tampered trail verified")

    @defer.inlineCallbacks
    def populate(self):
        """A conference's life: 9 records, checkpoints after records 4 and 9."""
        s = self.store
        yield s.create(conference("conf-1"))
        yield s.invite("conf-1", "dave@example.net", T0 + 1)
        yield s.set_state("conf-1", "running", T0 + 2)
        yield s.add_epoch("conf-1", 7, b"wrapped", T0 + 3)
        r4 = yield s.append_audit("conf-1", "admitted", "bob@example.com",
                                  {"fingerprint": "ab" * 32, "md": "md1:4443",
                                   "association": "00" * 16, "epoch": 1}, T0 + 4)
        yield s.add_audit_checkpoint(sign(r4))
        yield s.append_audit("conf-1", "refused", "eve@example.com",
                             {"reason": "not_invited"}, T0 + 5)
        yield s.uninvite("conf-1", "bob@example.com", T0 + 6)
        yield s.append_audit("conf-1", "left", "bob@example.com",
                             {"reason": "uninvited", "association": "00" * 16}, T0 + 7)
        yield s.end("conf-1", T0 + 8)
        records, _ = yield self.trail()
        yield s.add_audit_checkpoint(sign(records[-1]))

    # -- append and verify

    @defer.inlineCallbacks
    def test_every_record_continues_the_chain(self):
        yield self.populate()
        records, checkpoints = yield self.trail()
        self.assertEqual([r.kind for r in records],
                         ["created", "invited", "state", "epoch", "admitted", "refused",
                          "uninvited", "left", "ended"])
        self.assertEqual([r.seq for r in records], list(range(1, 10)))
        self.assertEqual(records[0].prev, GENESIS)
        for before, after in itertools.pairwise(records):
            self.assertEqual(after.prev, before.hash)
        for r in records:
            self.assertEqual(r.hash, record_hash(r.body()))
        self.assertEqual(records[3].detail, {"epoch": 1, "spi": 7})
        self.assertEqual(records[8].detail, {"epochs_wiped": 1})
        self.assertEqual([c.seq for c in checkpoints], [5, 9])
        result = yield self.verify()
        self.assertEqual((result.records, result.signed_through, result.unsigned), (9, 9, 0))
        # the legacy view is the same events
        events = yield self.store.audit("conf-1")
        self.assertEqual([e.kind for e in events], [r.kind for r in records])

    @defer.inlineCallbacks
    def test_details_of_every_length_hash_as_python_does(self):
        """Record texts crossing the SHA-256 padding and block boundaries (55/56/64)."""
        yield self.store.create(conference("conf-1"))
        for n in range(0, 140, 3):
            yield self.store.append_audit("conf-1", "refused", None,
                                          {"reason": "x" * n, "n": n, "é": "☎"}, T0 + n)
        result = yield self.verify()
        self.assertEqual(result.records, 48)

    @defer.inlineCallbacks
    def test_reports_after_the_end_are_chained(self):
        yield self.store.create(conference("conf-1"))
        yield self.store.end("conf-1", T0 + 1)
        record = yield self.store.append_audit(
            "conf-1", "left", "bob@example.com", {"reason": "conference_ended"}, T0 + 2)
        self.assertEqual(record.seq, 3)
        yield self.verify()

    @defer.inlineCallbacks
    def test_append_refuses_key_material_and_unknown_conferences(self):
        yield self.store.create(conference("conf-1"))
        for detail in ({"key": "00"}, {"x": [{"ekt_key": 1}]}, {"n": float("nan")}):
            with self.assertRaises(ValueError):
                yield self.store.append_audit("conf-1", "refused", None, detail, T0)
        with self.assertRaises(ValueError):
            yield self.store.append_audit("conf-1", "no-such-kind", None, {}, T0)
        with self.assertRaises(ConferenceNotFound):
            yield self.store.append_audit("conf-2", "refused", None, {}, T0)

    @defer.inlineCallbacks
    def test_a_report_id_is_recorded_once(self):
        """A KD's event id is kept beside its record: the same id again (sequentially or
        at the same time, as from two KMFs of one store) adds nothing; the id is not
        in the hashed record; another conference's id space is its own."""
        s = self.store
        yield s.create(conference("conf-1"))
        yield s.create(conference("conf-2"))
        detail = {"reason": "close_notify", "association": "00" * 16}
        first = yield s.append_audit("conf-1", "left", "bob@example.com", detail, T0 + 1,
                                     report_id="kd1-7")
        self.assertIsNotNone(first)
        again = yield s.append_audit("conf-1", "left", "bob@example.com", detail, T0 + 2,
                                     report_id="kd1-7")
        self.assertIsNone(again)
        both = yield defer.gatherResults([
            s.append_audit("conf-1", "refused", None, {"reason": "x"}, T0 + 3,
                           report_id="kd1-8") for _ in range(2)])
        self.assertEqual(sum(r is not None for r in both), 1)
        other = yield s.append_audit("conf-2", "left", "bob@example.com", detail, T0 + 4,
                                     report_id="kd1-7")
        self.assertIsNotNone(other)
        records, _ = yield self.trail()
        self.assertEqual([r.kind for r in records], ["created", "left", "refused"])
        self.assertEqual(records[1], first)
        self.assertNotIn("kd1-7", json.dumps([r.to_json() for r in records]))
        yield self.verify()
        for bad in ("", "x" * 81, "a b", 7):
            with self.assertRaises(ValueError):
                yield s.append_audit("conf-1", "refused", None, {"reason": "x"}, T0 + 5,
                                     report_id=bad)

    @defer.inlineCallbacks
    def test_tail(self):
        yield self.populate()
        last, mark = yield self.store.audit_tail("conf-1")
        self.assertEqual((last.seq, last.kind, mark), (9, "ended", 9))

    # -- the attacker at the store

    @defer.inlineCallbacks
    def test_edited_field_names_the_record(self):
        yield self.populate()
        raw = yield self.raw_records()
        raw[5]["detail"]["reason"] = "dtls_wrong_certificate"  # record 6
        yield self.write_raw(raw)
        e = yield self.broken()
        self.assertEqual((e.reason, e.seq), ("edited", 6))

    @defer.inlineCallbacks
    def test_edited_identity_names_the_record(self):
        yield self.populate()
        raw = yield self.raw_records()
        raw[4]["identity"] = "mallory@example.com"
        yield self.write_raw(raw)
        e = yield self.broken()
        self.assertEqual((e.reason, e.seq), ("edited", 5))

    @defer.inlineCallbacks
    def test_deleted_record(self):
        yield self.populate()
        raw = yield self.raw_records()
        del raw[6]  # record 7 (the uninvitation)
        yield self.write_raw(raw)
        e = yield self.broken()
        self.assertEqual((e.reason, e.seq), ("missing", 7))

    @defer.inlineCallbacks
    def test_swapped_records(self):
        yield self.populate()
        raw = yield self.raw_records()
        raw[5], raw[6] = raw[6], raw[5]
        yield self.write_raw(raw)
        e = yield self.broken()
        self.assertEqual((e.reason, e.seq), ("out_of_order", 7))

    @defer.inlineCallbacks
    def test_inserted_record(self):
        yield self.populate()
        raw = yield self.raw_records()
        fake = AuditRecord.chained("conf-1", 3, T0 + 2.5, "admitted", "mallory@example.com",
                                   {}, raw[1]["hash"])
        raw.insert(2, fake.to_json())
        yield self.write_raw(raw)
        e = yield self.broken()
        self.assertEqual((e.reason, e.seq), ("out_of_order", 3))

    @defer.inlineCallbacks
    def test_rewritten_chain_is_caught_by_the_checkpoint(self):
        """The attacker edits record 6 and recomputes every hash after it: the chain is
        consistent, but the signed checkpoint of record 9 is not."""
        yield self.populate()
        raw = yield self.raw_records()
        raw[5]["detail"]["reason"] = "edited"
        prev = raw[4]["hash"]
        for obj in raw[5:]:
            obj["prev"] = prev
            obj["hash"] = prev = record_hash({k: v for k, v in obj.items() if k != "hash"})
        yield self.write_raw(raw)
        e = yield self.broken()
        self.assertEqual((e.reason, e.seq), ("checkpoint_mismatch", 9))

    @defer.inlineCallbacks
    def test_cut_tail_is_caught_by_the_checkpoint(self):
        yield self.populate()
        raw = yield self.raw_records()
        yield self.write_raw(raw[:7])
        e = yield self.broken()
        self.assertEqual((e.reason, e.seq), ("truncated", 9))

    @defer.inlineCallbacks
    def test_forged_checkpoint(self):
        yield self.populate()
        records, _ = yield self.trail()
        yield self.forge_checkpoint(sign(records[8], ec.generate_private_key(ec.SECP256R1())))
        e = yield self.broken()
        self.assertEqual((e.reason, e.seq), ("bad_checkpoint", 9))

    @defer.inlineCallbacks
    def test_checkpoint_of_another_conference(self):
        yield self.populate()
        records, _ = yield self.trail()
        claims = {"iss": ISSUER, "conference": "conf-2", "seq": 9, "hash": records[8].hash,
                  "iat": 0}
        jws = jwt.encode(claims, KEY, algorithm="ES256",
                         headers={"kid": KID, "typ": CHECKPOINT_TYP})
        yield self.forge_checkpoint(Checkpoint("conf-1", 9, records[8].hash, jws))
        e = yield self.broken()
        self.assertEqual((e.reason, e.seq), ("bad_checkpoint", 9))

    # -- retention

    @defer.inlineCallbacks
    def test_retention_leaves_a_signed_deletion_record(self):
        yield self.populate()
        self.assertEqual((yield self.store.expired_trails(T0 + 8)), [])
        self.assertEqual((yield self.store.expired_trails(T0 + 9)), ["conf-1"])
        before, _ = yield self.trail()
        record = yield self.store.delete_audit_trail("conf-1", 86400.0, T0 + 100)
        self.assertEqual((record.kind, record.seq, record.prev), (TRAIL_DELETED, 10,
                                                                   before[-1].hash))
        self.assertEqual(record.detail, {"first_seq": 1, "last_seq": 9,
                                         "last_hash": before[-1].hash, "records": 9,
                                         "ended_at": T0 + 8, "retention": 86400.0})
        e = yield self.broken()
        self.assertEqual((e.reason, e.seq), ("unsigned_deletion", 10))
        yield self.store.add_audit_checkpoint(sign(record))
        result = yield self.verify()
        self.assertEqual((result.records, result.first_seq, result.signed_through), (1, 10, 10))
        self.assertEqual((yield self.store.expired_trails(T0 + 1000)), [])
        self.assertIsNone((yield self.store.delete_audit_trail("conf-1", 1.0, T0 + 200)))

    @defer.inlineCallbacks
    def test_running_conference_trail_is_not_deleted(self):
        yield self.store.create(conference("conf-1"))
        self.assertIsNone((yield self.store.delete_audit_trail("conf-1", 1.0, T0 + 9)))
        self.assertEqual(len((yield self.trail())[0]), 1)


class SqliteAuditTests(AuditStoreMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.path = os.path.join(self.mktemp(), "kmf.sqlite3")
        self.store = yield SqliteConferenceStore.open(self.path)
        self.addCleanup(lambda: self.store.close())

    def _db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, isolation_level=None)

    def raw_records(self):
        db = self._db()
        rows = db.execute("SELECT number, time, kind, identity, detail, prev, hash FROM audit"
                          " WHERE conference_id = 'conf-1' ORDER BY seq").fetchall()
        db.close()
        return defer.succeed([{"conference": "conf-1", "seq": r[0], "time": r[1],
                               "kind": r[2], "identity": r[3], "detail": json.loads(r[4]),
                               "prev": r[5], "hash": r[6]} for r in rows])

    def write_raw(self, records):
        db = self._db()
        db.execute("DROP INDEX audit_chain")  # the attacker may drop constraints too
        db.execute("DELETE FROM audit WHERE conference_id = 'conf-1'")
        for r in records:
            db.execute("INSERT INTO audit (conference_id, time, kind, identity, detail, number,"
                       " prev, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       ("conf-1", r["time"], r["kind"], r["identity"],
                        canonical_json(r["detail"]), r["seq"], r["prev"], r["hash"]))
        db.close()
        return defer.succeed(None)

    def forge_checkpoint(self, checkpoint):
        db = self._db()
        db.execute("UPDATE audit_checkpoint SET jws = ? WHERE conference_id = ? AND seq = ?",
                   (checkpoint.jws, checkpoint.conference, checkpoint.seq))
        db.close()
        return defer.succeed(None)

    @defer.inlineCallbacks
    def test_version_3_trail_is_chained_on_upgrade(self):
        """A schema-3 database's audit rows (no chain) are chained, in their order,
        when the store opens it."""
        yield self.store.close()
        for name in glob.glob(self.path + "*"):
            os.remove(name)
        from perc_daemons.store.sqlite import _SCHEMA_V1, _SCHEMA_V2, _SCHEMA_V3
        db = self._db()
        for script in (_SCHEMA_V1, _SCHEMA_V2, _SCHEMA_V3):
            db.executescript(script)
        db.execute("INSERT INTO conference VALUES ('conf-1', 't', 'alice@example.com',"
                   " 'running', NULL, NULL, 0, 1.0, 1)")
        db.execute("INSERT INTO audit (conference_id, time, kind, identity, detail) VALUES"
                   " ('conf-1', 1.0, 'created', 'alice@example.com', '{\"title\":\"t\"}'),"
                   " ('conf-1', 2.5, 'epoch', NULL, '{\"spi\":3, \"epoch\":1}')")
        db.execute("PRAGMA user_version = 3")
        db.close()
        self.store = yield SqliteConferenceStore.open(self.path)
        yield self.store.append_audit("conf-1", "refused", None, {"reason": "x"}, 3.0)
        records, _ = yield self.trail()
        self.assertEqual([(r.seq, r.kind) for r in records],
                         [(1, "created"), (2, "epoch"), (3, "refused")])
        verify_trail("conf-1", records, [], JWKS)


class RedisAuditTests(AuditStoreMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        if not os.access(REDIS_SERVER, os.X_OK):
            raise unittest.SkipTest(f"{REDIS_SERVER} not installed")
        from tests.unit.test_store import RedisStoreTestsBase
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.namespace = "t" + os.urandom(4).hex()
        self.server = RedisServer(self.dir)
        self.addCleanup(lambda: self.server.stop())
        yield self.server.start()
        self.tls = False
        self.store = RedisStoreTestsBase.store_for(self)
        self.addCleanup(lambda: self.store.close())
        yield self.store.connect()
        self.conn = yield RedisStoreTestsBase.raw(self)

    @property
    def key(self) -> str:
        return f"{self.namespace}:conf:conf-1:audit"

    @defer.inlineCallbacks
    def raw_records(self):
        entries = yield self.conn.lrange(self.key, 0, -1)
        return [json.loads(e) for e in entries]

    @defer.inlineCallbacks
    def write_raw(self, records):
        yield self.conn.delete(self.key)
        for r in records:
            yield self.conn.rpush(self.key, json.dumps(r))

    @defer.inlineCallbacks
    def forge_checkpoint(self, checkpoint):
        yield self.conn.hset(f"{self.namespace}:conf:conf-1:audit-checkpoints",
                             str(checkpoint.seq),
                             json.dumps({"hash": checkpoint.hash, "jws": checkpoint.jws}))

    @defer.inlineCallbacks
    def test_legacy_entries_are_chained_on_connect(self):
        """Entries of the unchained layout ({"t", "k", "i", "d"}) are chained, in order,
        by the first store that connects."""
        yield self.store.create(conference("conf-1"))
        yield self.conn.delete(self.key, f"{self.namespace}:audit-chained")
        for entry in ({"t": 1.0, "k": "created", "i": "alice@example.com", "d": {"a": 1}},
                      {"t": 2.0, "k": "epoch", "i": None, "d": {"spi": 3, "epoch": 1}}):
            yield self.conn.rpush(self.key, json.dumps(entry))
        from tests.unit.test_store import RedisStoreTestsBase
        other = RedisStoreTestsBase.store_for(self)
        self.addCleanup(other.close)
        yield other.connect()
        yield other.append_audit("conf-1", "refused", None, {"reason": "x"}, 3.0)
        records, _ = yield other.audit_trail("conf-1")
        self.assertEqual([(r.seq, r.kind) for r in records],
                         [(1, "created"), (2, "epoch"), (3, "refused")])
        verify_trail("conf-1", records, [], JWKS)


class AuditArgsTests(unittest.TestCase):
    def test_detail_is_normalised_json(self):
        args = check_audit_args("c", "refused", "Bob@Example.com", {"b": 1, "a": [1.5]}, 1)
        self.assertEqual((args.identity, args.detail, args.now),
                         ("bob@example.com", {"a": [1.5], "b": 1}, 1.0))
