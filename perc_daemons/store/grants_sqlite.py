"""OAuth grants (authorization codes, refresh tokens, revoked access tokens) in SQLite.

:class:`SqliteGrantStore` implements :class:`~perc_daemons.interfaces.IGrantStore`
with the rules of :mod:`perc_daemons.store.grant_errors`.  It may share the
conference store's file (default ``/var/lib/perc/kmf.sqlite3``): its tables
(``oauth_code``, ``oauth_refresh``, ``oauth_revoked``: the revoked access
tokens' ``jti`` hashes, ``oauth_used``: one-time values already used) are
created with ``IF NOT EXISTS`` and it leaves ``PRAGMA user_version`` to the
conference store.  Same plumbing as
:mod:`perc_daemons.store.sqlite`: adbapi with one connection, WAL,
``synchronous=FULL``, ``secure_delete``, every operation one transaction
(``BEGIN IMMEDIATE`` for writes, so two processes on one file serialise).
Expired rows are purged by the writes that know the time (``take_code``,
``rotate_refresh_token``, ``revoke_access_token``, ``use_once``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

from twisted.enterprise import adbapi
from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from perc_daemons.interfaces import IGrantStore
from perc_daemons.store import StoreError, StoreUnavailable
from perc_daemons.store.grant_errors import (
    GrantError,
    InvalidGrant,
    RefreshTokenReused,
    check_grant,
    check_hash,
    check_time,
    load_grant,
)
from perc_daemons.store.sqlite import DEFAULT_PATH, _on_connect, prepare_path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS oauth_code (
    hash BLOB PRIMARY KEY,
    grant_json TEXT NOT NULL,
    expires_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS oauth_refresh (
    hash BLOB PRIMARY KEY,
    family TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('live', 'rotated')),
    grant_json TEXT NOT NULL,
    expires_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS oauth_refresh_by_family ON oauth_refresh (family);
CREATE TABLE IF NOT EXISTS oauth_revoked (
    hash BLOB PRIMARY KEY,
    expires_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS oauth_used (
    hash BLOB PRIMARY KEY,
    expires_at REAL NOT NULL
) WITHOUT ROWID;
"""


def _create(txn: Any) -> None:
    txn.execute("BEGIN IMMEDIATE")
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            txn.execute(statement)


@implementer(IGrantStore)
class SqliteGrantStore:
    """:class:`~perc_daemons.interfaces.IGrantStore` in one SQLite file; use :meth:`open`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._pool = adbapi.ConnectionPool(
            "sqlite3", path, check_same_thread=False, isolation_level=None,
            cp_min=1, cp_max=1, cp_openfun=_on_connect,
        )
        self._closed = False

    @classmethod
    def open(cls, path: str = DEFAULT_PATH) -> defer.Deferred[SqliteGrantStore]:
        """Prepare ``path`` (0700 directory, 0600 file), create the tables, fire with the store."""
        try:
            prepare_path(path)
        except OSError as e:
            return defer.fail(StoreUnavailable(f"cannot create {path}", e))
        store = cls(path)

        def failed(f: Failure) -> Failure:
            store._closed = True
            store._pool.close()
            return f

        d = store._pool.runInteraction(_create).addErrback(store._map)
        return d.addCallbacks(lambda _: store, failed)

    def __repr__(self) -> str:
        return f"<SqliteGrantStore {self.path}>"

    def _map(self, f: Failure) -> Failure:
        if f.check(StoreError, GrantError, ValueError):
            return f
        if f.check(sqlite3.Error):
            return Failure(StoreUnavailable(f"SQLite database {self.path}", f.value))
        return f

    def _run(self, check: Callable[[], Any], interaction: Callable[..., Any]
             ) -> defer.Deferred[Any]:
        if self._closed:
            return defer.fail(StoreUnavailable(f"SQLite database {self.path} is closed"))
        try:
            args = check()
        except ValueError:
            return defer.fail()
        return self._pool.runInteraction(interaction, *args).addErrback(self._map)

    # -- IGrantStore

    def save_code(self, code_hash: bytes, grant: dict[str, Any],
                  expires_at: float) -> defer.Deferred[None]:
        def txn_save(txn: Any, h: bytes, text: str, exp: float) -> None:
            txn.execute("BEGIN IMMEDIATE")
            txn.execute("INSERT INTO oauth_code (hash, grant_json, expires_at) VALUES (?, ?, ?)",
                        (h, text, exp))

        return self._run(
            lambda: (check_hash(code_hash), check_grant(grant),
                     check_time("expires_at", expires_at)),
            txn_save)

    def take_code(self, code_hash: bytes, now: float) -> defer.Deferred[dict[str, Any] | None]:
        def txn_take(txn: Any, h: bytes, when: float) -> dict[str, Any] | None:
            txn.execute("BEGIN IMMEDIATE")
            row = txn.execute("DELETE FROM oauth_code WHERE hash = ? RETURNING grant_json,"
                              " expires_at", (h,)).fetchone()
            txn.execute("DELETE FROM oauth_code WHERE expires_at <= ?", (when,))
            if row is None or row[1] <= when:
                return None
            return load_grant(row[0])

        return self._run(lambda: (check_hash(code_hash), check_time("now", now)), txn_take)

    def save_refresh_token(self, token_hash: bytes, grant: dict[str, Any],
                           expires_at: float) -> defer.Deferred[None]:
        def txn_save(txn: Any, h: bytes, family: str, text: str, exp: float) -> None:
            txn.execute("BEGIN IMMEDIATE")
            txn.execute("INSERT INTO oauth_refresh (hash, family, state, grant_json, expires_at)"
                        " VALUES (?, ?, 'live', ?, ?)", (h, family, text, exp))

        def check() -> tuple[Any, ...]:
            text = check_grant(grant, family=True)
            return (check_hash(token_hash), grant["family"], text,
                    check_time("expires_at", expires_at))

        return self._run(check, txn_save)

    def rotate_refresh_token(self, old_hash: bytes, new_hash: bytes, new_grant: dict[str, Any],
                             expires_at: float, now: float) -> defer.Deferred[dict[str, Any]]:
        def check() -> tuple[Any, ...]:
            return (check_hash(old_hash), check_hash(new_hash),
                    check_grant(new_grant, family=True), check_time("expires_at", expires_at),
                    check_time("now", now))

        def txn_rotate(txn: Any, old: bytes, new: bytes, text: str, exp: float,
                       when: float) -> dict[str, Any]:
            txn.execute("BEGIN IMMEDIATE")
            row = txn.execute("SELECT family, state, grant_json, expires_at FROM oauth_refresh"
                              " WHERE hash = ?", (old,)).fetchone()
            if row is None or row[3] <= when:
                raise InvalidGrant("unknown or expired refresh token")
            family, state, old_text, _ = row
            if state == "rotated":
                txn.execute("DELETE FROM oauth_refresh WHERE family = ?", (family,))
                # returned, not raised: raising would roll the revocation back
                return {"__reused__": family}
            txn.execute("UPDATE oauth_refresh SET state = 'rotated' WHERE hash = ?", (old,))
            txn.execute("INSERT INTO oauth_refresh (hash, family, state, grant_json, expires_at)"
                        " VALUES (?, ?, 'live', ?, ?)", (new, family, text, exp))
            txn.execute("DELETE FROM oauth_refresh WHERE expires_at <= ?", (when,))
            return load_grant(old_text, family)

        def reused(grant: dict[str, Any]) -> dict[str, Any]:
            if "__reused__" in grant:
                raise RefreshTokenReused(f"refresh token reused: family {grant['__reused__']}"
                                         " revoked")
            return grant

        return self._run(check, txn_rotate).addCallback(reused)

    def revoke_refresh_token(self, token_hash: bytes) -> defer.Deferred[None]:
        def txn_revoke(txn: Any, h: bytes) -> None:
            txn.execute("BEGIN IMMEDIATE")
            txn.execute("DELETE FROM oauth_refresh WHERE family IN"
                        " (SELECT family FROM oauth_refresh WHERE hash = ?)", (h,))

        return self._run(lambda: (check_hash(token_hash),), txn_revoke)

    def refresh_token(self, token_hash: bytes, now: float
                      ) -> defer.Deferred[dict[str, Any] | None]:
        def txn_get(txn: Any, h: bytes, when: float) -> dict[str, Any] | None:
            txn.execute("BEGIN")
            row = txn.execute("SELECT family, grant_json FROM oauth_refresh WHERE hash = ?"
                              " AND state = 'live' AND expires_at > ?", (h, when)).fetchone()
            return None if row is None else load_grant(row[1], row[0])

        return self._run(lambda: (check_hash(token_hash), check_time("now", now)), txn_get)

    def revoke_access_token(self, jti_hash: bytes, expires_at: float,
                            now: float) -> defer.Deferred[None]:
        def txn_revoke(txn: Any, h: bytes, exp: float, when: float) -> None:
            txn.execute("BEGIN IMMEDIATE")
            txn.execute("INSERT INTO oauth_revoked (hash, expires_at) VALUES (?, ?)"
                        " ON CONFLICT (hash) DO UPDATE SET expires_at ="
                        " max(expires_at, excluded.expires_at)", (h, exp))
            txn.execute("DELETE FROM oauth_revoked WHERE expires_at <= ?", (when,))

        return self._run(lambda: (check_hash(jti_hash), check_time("expires_at", expires_at),
                                  check_time("now", now)), txn_revoke)

    def access_token_revoked(self, jti_hash: bytes, now: float) -> defer.Deferred[bool]:
        def txn_get(txn: Any, h: bytes, when: float) -> bool:
            row = txn.execute("SELECT 1 FROM oauth_revoked WHERE hash = ? AND expires_at > ?",
                              (h, when)).fetchone()
            return row is not None

        return self._run(lambda: (check_hash(jti_hash), check_time("now", now)), txn_get)

    def use_once(self, key_hash: bytes, expires_at: float, now: float) -> defer.Deferred[bool]:
        def txn_use(txn: Any, h: bytes, exp: float, when: float) -> bool:
            txn.execute("BEGIN IMMEDIATE")
            txn.execute("DELETE FROM oauth_used WHERE expires_at <= ?", (when,))
            cursor = txn.execute("INSERT INTO oauth_used (hash, expires_at) VALUES (?, ?)"
                                 " ON CONFLICT (hash) DO NOTHING", (h, exp))
            return cursor.rowcount == 1

        return self._run(lambda: (check_hash(key_hash), check_time("expires_at", expires_at),
                                  check_time("now", now)), txn_use)

    def close(self) -> defer.Deferred[None]:
        """Close the connection (idempotent)."""
        if not self._closed:
            self._closed = True
            self._pool.close()
        return defer.succeed(None)
