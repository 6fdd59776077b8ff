"""IGrantStore: one suite against SQLite and a real redis-server (with password)."""

from __future__ import annotations

import glob
import os
import secrets
import time

from twisted.internet import defer
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from perc_daemons.interfaces import IGrantStore
from perc_daemons.store import StoreUnavailable
from perc_daemons.store.grant_errors import InvalidGrant, RefreshTokenReused, token_hash
from perc_daemons.store.grants_redis import RedisGrantStore
from perc_daemons.store.grants_sqlite import SqliteGrantStore
from tests.unit.test_store import REDIS_SERVER, RedisServer

# Near the real clock: Redis also expires keys on its own clock.  Set again by each
# test's setUp: taken once at import, a slow suite outlived the 60 s expiries.
T0 = float(int(time.time()))


def h() -> bytes:
    return token_hash(secrets.token_urlsafe(32))


class GrantStoreTestsMixin:
    store: IGrantStore

    def open_store(self) -> defer.Deferred[IGrantStore]:
        raise NotImplementedError

    def restart(self) -> defer.Deferred[None]:
        raise NotImplementedError

    def data_at_rest(self) -> bytes:
        raise NotImplementedError

    @defer.inlineCallbacks
    def setUp(self):
        global T0
        T0 = float(int(time.time()))
        self.store = yield self.open_store()

    @defer.inlineCallbacks
    def assertFails(self, d, exception):
        try:
            result = yield d
        except exception as e:
            return e
        self.fail(f"expected {exception.__name__}, got {result!r}")

    def test_provides_interface(self):
        self.assertTrue(verifyObject(IGrantStore, self.store))

    @defer.inlineCallbacks
    def test_code_taken_once(self):
        code = h()
        grant = {"client_id": "web", "scope": ["a", "b"], "n": 1.5}
        yield self.store.save_code(code, grant, T0 + 60)
        self.assertEqual((yield self.store.take_code(code, T0 + 1)), grant)
        self.assertIsNone((yield self.store.take_code(code, T0 + 2)))
        self.assertIsNone((yield self.store.take_code(h(), T0 + 2)))

    @defer.inlineCallbacks
    def test_code_expired(self):
        code = h()
        yield self.store.save_code(code, {"x": 1}, T0 + 60)
        self.assertIsNone((yield self.store.take_code(code, T0 + 60)))
        self.assertIsNone((yield self.store.take_code(code, T0)))  # and gone

    @defer.inlineCallbacks
    def test_concurrent_take_code(self):
        code = h()
        yield self.store.save_code(code, {"x": 1}, T0 + 60)
        other = yield self.open_store()
        results = yield defer.gatherResults(
            [s.take_code(code, T0) for s in (self.store, other, self.store, other)])
        self.assertEqual(sorted(results, key=lambda r: r is None), [{"x": 1}, None, None, None])

    @defer.inlineCallbacks
    def test_bad_arguments(self):
        yield self.assertFails(self.store.save_code(b"short", {}, T0), ValueError)
        yield self.assertFails(self.store.save_code(h(), {"x": object()}, T0), ValueError)
        yield self.assertFails(self.store.save_code(h(), [], T0), ValueError)
        yield self.assertFails(self.store.save_refresh_token(h(), {"no": "family"}, T0),
                               ValueError)
        yield self.assertFails(self.store.take_code(h(), float("nan")), ValueError)

    @defer.inlineCallbacks
    def test_refresh_rotation_and_reuse(self):
        t1, t2, t3 = h(), h(), h()
        g1 = {"family": "fam1", "client_id": "web", "n": 1}
        yield self.store.save_refresh_token(t1, g1, T0 + 600)
        self.assertEqual((yield self.store.refresh_token(t1, T0)), g1)
        old = yield self.store.rotate_refresh_token(t1, t2, {"family": "ignored", "n": 2},
                                                    T0 + 700, T0 + 10)
        self.assertEqual(old, g1)
        self.assertIsNone((yield self.store.refresh_token(t1, T0 + 11)))
        self.assertEqual((yield self.store.refresh_token(t2, T0 + 11)),
                         {"family": "fam1", "n": 2})
        yield self.store.rotate_refresh_token(t2, t3, {"family": "fam1", "n": 3},
                                              T0 + 800, T0 + 20)
        # t1 again: reuse -> the whole family (t3 included) is revoked
        yield self.assertFails(self.store.rotate_refresh_token(t1, h(), {"family": "fam1"},
                                                               T0 + 900, T0 + 30),
                               RefreshTokenReused)
        for t in (t1, t2, t3):
            self.assertIsNone((yield self.store.refresh_token(t, T0 + 31)))
        yield self.assertFails(self.store.rotate_refresh_token(t3, h(), {"family": "fam1"},
                                                               T0 + 900, T0 + 32),
                               InvalidGrant)

    @defer.inlineCallbacks
    def test_other_families_untouched(self):
        a1, a2, b1 = h(), h(), h()
        yield self.store.save_refresh_token(a1, {"family": "A"}, T0 + 600)
        yield self.store.save_refresh_token(b1, {"family": "B"}, T0 + 600)
        yield self.store.rotate_refresh_token(a1, a2, {"family": "A"}, T0 + 600, T0)
        yield self.assertFails(self.store.rotate_refresh_token(a1, h(), {"family": "A"},
                                                               T0 + 600, T0), RefreshTokenReused)
        self.assertEqual((yield self.store.refresh_token(b1, T0)), {"family": "B"})

    @defer.inlineCallbacks
    def test_refresh_expired_and_unknown(self):
        t1 = h()
        yield self.store.save_refresh_token(t1, {"family": "f"}, T0 + 600)
        self.assertIsNone((yield self.store.refresh_token(t1, T0 + 600)))
        yield self.assertFails(self.store.rotate_refresh_token(t1, h(), {"family": "f"},
                                                               T0 + 900, T0 + 600), InvalidGrant)
        yield self.assertFails(self.store.rotate_refresh_token(h(), h(), {"family": "f"},
                                                               T0 + 900, T0), InvalidGrant)

    @defer.inlineCallbacks
    def test_revoke_family(self):
        t1, t2, other = h(), h(), h()
        yield self.store.save_refresh_token(t1, {"family": "f"}, T0 + 600)
        yield self.store.save_refresh_token(other, {"family": "g"}, T0 + 600)
        yield self.store.rotate_refresh_token(t1, t2, {"family": "f"}, T0 + 600, T0)
        yield self.store.revoke_refresh_token(t1)  # the tombstone revokes the family too
        self.assertIsNone((yield self.store.refresh_token(t2, T0)))
        yield self.assertFails(self.store.rotate_refresh_token(t2, h(), {"family": "f"},
                                                               T0 + 600, T0), InvalidGrant)
        yield self.store.revoke_refresh_token(t1)  # idempotent
        yield self.store.revoke_refresh_token(h())
        self.assertEqual((yield self.store.refresh_token(other, T0)), {"family": "g"})

    @defer.inlineCallbacks
    def test_access_token_revocation_list(self):
        jti, other = h(), h()
        self.assertFalse((yield self.store.access_token_revoked(jti, T0)))
        yield self.store.revoke_access_token(jti, T0 + 300, T0)
        yield self.store.revoke_access_token(jti, T0 + 300, T0 + 1)  # idempotent
        self.assertTrue((yield self.store.access_token_revoked(jti, T0 + 2)))
        self.assertFalse((yield self.store.access_token_revoked(other, T0 + 2)))
        # another connection (another KMF on the same store) sees it too
        peer = yield self.open_store()
        self.assertTrue((yield peer.access_token_revoked(jti, T0 + 299)))
        # listed until the token's own expiry, which refuses it from then on anyway
        self.assertFalse((yield peer.access_token_revoked(jti, T0 + 300)))
        yield self.store.revoke_access_token(other, T0 + 10, T0 + 20)  # already expired
        self.assertFalse((yield self.store.access_token_revoked(other, T0 + 20)))
        yield self.restart()
        self.assertTrue((yield self.store.access_token_revoked(jti, T0 + 3)))
        yield self.assertFails(self.store.revoke_access_token(b"short", T0, T0), ValueError)
        yield self.assertFails(self.store.access_token_revoked(jti, float("inf")), ValueError)

    @defer.inlineCallbacks
    def test_use_once(self):
        key, other = h(), h()
        self.assertTrue((yield self.store.use_once(key, T0 + 60, T0)))
        self.assertFalse((yield self.store.use_once(key, T0 + 60, T0 + 1)))
        self.assertTrue((yield self.store.use_once(other, T0 + 60, T0 + 1)))
        peer = yield self.open_store()  # another KMF on the same store
        self.assertFalse((yield peer.use_once(key, T0 + 60, T0 + 2)))
        fresh = h()
        results = yield defer.gatherResults(
            [s.use_once(fresh, T0 + 60, T0) for s in (self.store, peer, self.store, peer)])
        self.assertEqual(sorted(results), [False, False, False, True])
        yield self.restart()
        self.assertFalse((yield self.store.use_once(key, T0 + 60, T0 + 3)))
        yield self.assertFails(self.store.use_once(b"short", T0, T0), ValueError)

    @defer.inlineCallbacks
    def test_concurrent_rotation(self):
        t1 = h()
        yield self.store.save_refresh_token(t1, {"family": "f"}, T0 + 600)
        other = yield self.open_store()
        n1, n2 = h(), h()
        results = yield defer.DeferredList(
            [self.store.rotate_refresh_token(t1, n1, {"family": "f"}, T0 + 600, T0),
             other.rotate_refresh_token(t1, n2, {"family": "f"}, T0 + 600, T0)],
            consumeErrors=True)
        wins = [r for ok, r in results if ok]
        losses = [r for ok, r in results if not ok]
        self.assertEqual(wins, [{"family": "f"}])
        self.assertEqual(len(losses), 1)
        losses[0].trap(RefreshTokenReused)
        for t in (t1, n1, n2):
            self.assertIsNone((yield self.store.refresh_token(t, T0)))

    @defer.inlineCallbacks
    def test_survives_restart(self):
        code, t1, t2 = h(), h(), h()
        yield self.store.save_code(code, {"c": 1}, T0 + 60)
        yield self.store.save_refresh_token(t1, {"family": "f", "r": 1}, T0 + 600)
        yield self.store.rotate_refresh_token(t1, t2, {"family": "f", "r": 2}, T0 + 600, T0)
        yield self.restart()
        self.assertEqual((yield self.store.refresh_token(t2, T0)), {"family": "f", "r": 2})
        yield self.assertFails(self.store.rotate_refresh_token(t1, h(), {"family": "f"},
                                                               T0 + 600, T0), RefreshTokenReused)
        self.assertEqual((yield self.store.take_code(code, T0)), {"c": 1})

    @defer.inlineCallbacks
    def test_only_hashes_at_rest(self):
        code = secrets.token_urlsafe(32)
        token = secrets.token_urlsafe(32)
        yield self.store.save_code(token_hash(code), {"c": 1}, T0 + 60)
        yield self.store.save_refresh_token(token_hash(token), {"family": "f"}, T0 + 600)
        yield self.store.close()
        data = self.data_at_rest()
        self.assertTrue(token_hash(token) in data or token_hash(token).hex().encode() in data)
        self.assertNotIn(code.encode(), data)
        self.assertNotIn(token.encode(), data)

    @defer.inlineCallbacks
    def test_closed(self):
        yield self.store.close()
        yield self.assertFails(self.store.take_code(h(), T0), StoreUnavailable)


class SqliteGrantStoreTests(GrantStoreTestsMixin, unittest.TestCase):
    def setUp(self):
        self.path = os.path.join(self.mktemp(), "kmf.sqlite3")
        return super().setUp()

    @defer.inlineCallbacks
    def open_store(self):
        store = yield SqliteGrantStore.open(self.path)
        self.addCleanup(store.close)
        return store

    @defer.inlineCallbacks
    def restart(self):
        yield self.store.close()
        self.store = yield self.open_store()

    def data_at_rest(self) -> bytes:
        data = b""
        for name in glob.glob(self.path + "*"):
            with open(name, "rb") as f:
                data += f.read()
        return data

    @defer.inlineCallbacks
    def test_shares_file_with_conference_store(self):
        from perc_daemons.store.sqlite import SqliteConferenceStore

        conferences = yield SqliteConferenceStore.open(self.path)
        self.addCleanup(conferences.close)
        self.assertEqual((yield conferences.list()), [])
        t = h()
        yield self.store.save_refresh_token(t, {"family": "f"}, T0 + 60)
        self.assertEqual((yield self.store.refresh_token(t, T0)), {"family": "f"})


class RedisGrantStoreTests(GrantStoreTestsMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        if not os.access(REDIS_SERVER, os.X_OK):
            raise unittest.SkipTest(f"{REDIS_SERVER} not installed")
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.server = RedisServer(self.dir)
        self.addCleanup(lambda: self.server.stop())
        yield self.server.start()
        yield super().setUp()

    @defer.inlineCallbacks
    def open_store(self, **kw):
        options = {"password": self.server.password, "namespace": "tgrants",
                   "connect_timeout": 3, "timeout": 5, **kw}
        store = RedisGrantStore("127.0.0.1", self.server.port, **options)
        self.addCleanup(store.close)
        yield store.connect()
        return store

    @defer.inlineCallbacks
    def restart(self):
        yield self.store.close()
        yield self.server.stop("KILL")
        yield self.server.start()
        self.store = yield self.open_store()

    def data_at_rest(self) -> bytes:
        data = b""
        for name in glob.glob(os.path.join(self.dir, "appendonlydir", "*")):
            with open(name, "rb") as f:
                data += f.read()
        return data

    @defer.inlineCallbacks
    def test_wrong_password(self):
        yield self.assertFails(self.open_store(password="wrong"), StoreUnavailable)
