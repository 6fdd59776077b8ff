"""The embedded conference store: one SQLite file (default ``/var/lib/perc/kmf.sqlite3``).

Used when no Redis is configured.  Queries run in Twisted's adbapi thread
pool with a single connection (one writer, so no "database is locked" races
inside the daemon); every operation is one transaction (``BEGIN IMMEDIATE``
for writes, so another process writing the same file waits instead of
interleaving).  WAL journal, ``synchronous=FULL`` (a committed epoch
survives a power cut), foreign keys on.  The schema is created on open and
versioned with ``PRAGMA user_version``.

Use :meth:`SqliteConferenceStore.open`, which also creates the directory
(0700) and the file (0600) when they are missing.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from collections.abc import Callable
from typing import Any

from twisted.enterprise import adbapi
from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from perc_daemons.interfaces import IConferenceStore
from perc_daemons.protocol.audit import (
    GENESIS,
    TRAIL_DELETED,
    AuditRecord,
    Checkpoint,
    canonical_json,
)
from perc_daemons.store import (
    TRANSITIONS,
    AuditEvent,
    Conference,
    ConferenceEnded,
    ConferenceExists,
    ConferenceNotFound,
    ConferenceState,
    EpochKey,
    InvalidTransition,
    ReportedAudit,
    StoreError,
    StoreUnavailable,
    admitted_json,
    admitted_set,
    check_admission_args,
    check_admitted,
    check_audit_args,
    check_conference_id,
    check_epoch_args,
    check_identity,
    check_media_distributor_args,
    check_now,
    check_roster_args,
    check_update,
    created_detail,
    policy_changed_detail,
    trail_deleted_detail,
)

DEFAULT_PATH = "/var/lib/perc/kmf.sqlite3"

_SCHEMA_V1 = """
CREATE TABLE conference (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    initiator TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('scheduled', 'running', 'ended')),
    starts_at REAL,
    ends_at REAL,
    late_joiners_get_earlier_epochs INTEGER NOT NULL,
    created_at REAL NOT NULL,
    last_epoch INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE invited (
    conference_id TEXT NOT NULL REFERENCES conference (id) ON DELETE CASCADE,
    identity TEXT NOT NULL,
    PRIMARY KEY (conference_id, identity)
) WITHOUT ROWID;
CREATE TABLE invited_group (
    conference_id TEXT NOT NULL REFERENCES conference (id) ON DELETE CASCADE,
    grp TEXT NOT NULL,
    PRIMARY KEY (conference_id, grp)
) WITHOUT ROWID;
CREATE TABLE epoch (
    conference_id TEXT NOT NULL REFERENCES conference (id) ON DELETE CASCADE,
    epoch INTEGER NOT NULL,
    spi INTEGER NOT NULL,
    wrapped_key BLOB NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (conference_id, epoch)
) WITHOUT ROWID;
CREATE TABLE audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    conference_id TEXT NOT NULL REFERENCES conference (id) ON DELETE CASCADE,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    identity TEXT,
    detail TEXT NOT NULL
);
CREATE INDEX audit_by_conference ON audit (conference_id, seq);
CREATE TABLE roster (
    conference_id TEXT PRIMARY KEY REFERENCES conference (id) ON DELETE CASCADE,
    epoch INTEGER NOT NULL,
    signed_roster TEXT NOT NULL
);
"""

# v2: who the KD admitted with the roster (identity, certificate fingerprint)
_SCHEMA_V2 = """
ALTER TABLE roster ADD COLUMN admitted TEXT NOT NULL DEFAULT '[]'
"""

# v3: the Media Distributors serving each conference, by tunnel address (canonical form)
_SCHEMA_V3 = """
CREATE TABLE media_distributor (
    conference_id TEXT NOT NULL REFERENCES conference (id) ON DELETE CASCADE,
    tunnel TEXT NOT NULL,
    PRIMARY KEY (conference_id, tunnel)
) WITHOUT ROWID;
CREATE INDEX media_distributor_by_tunnel ON media_distributor (tunnel)
"""

# v4: each conference's policy (issue 14): schedule windows, periodic rekey, late-join
# history ("current" for the conferences created with late_joiners_get_earlier_epochs)
_SCHEMA_V4 = """
ALTER TABLE conference ADD COLUMN early_start REAL NOT NULL DEFAULT 300.0;
ALTER TABLE conference ADD COLUMN grace REAL NOT NULL DEFAULT 0.0;
ALTER TABLE conference ADD COLUMN rekey_interval REAL NOT NULL DEFAULT 0.0;
ALTER TABLE conference ADD COLUMN late_join TEXT NOT NULL DEFAULT 'none'
    CHECK (late_join IN ('none', 'current', 'history'));
UPDATE conference SET late_join = 'current' WHERE late_joiners_get_earlier_epochs != 0
"""
# v5: the audit trail is hash-chained per conference (number, prev, hash; see
# perc_daemons.protocol.audit) with the KMF's signed checkpoints beside it.  Rows
# written before are chained when the schema is upgraded (_chain_unchained).
_SCHEMA_V5 = """
ALTER TABLE audit ADD COLUMN number INTEGER;
ALTER TABLE audit ADD COLUMN prev TEXT;
ALTER TABLE audit ADD COLUMN hash TEXT;
CREATE UNIQUE INDEX audit_chain ON audit (conference_id, number);
CREATE TABLE audit_checkpoint (
    conference_id TEXT NOT NULL REFERENCES conference (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL,
    jws TEXT NOT NULL,
    PRIMARY KEY (conference_id, seq)
) WITHOUT ROWID
"""

# v6: a KD's name of each event it reported, beside the record (not hashed): a report
# sent again (its answer was lost, another KMF got it) is recorded once.
_SCHEMA_V6 = """
ALTER TABLE audit ADD COLUMN report_id TEXT;
CREATE UNIQUE INDEX audit_report ON audit (conference_id, report_id)
    WHERE report_id IS NOT NULL
"""

_MIGRATIONS = (_SCHEMA_V1, _SCHEMA_V2, _SCHEMA_V3, _SCHEMA_V4, _SCHEMA_V5, _SCHEMA_V6)
SCHEMA_VERSION = len(_MIGRATIONS)
#: the schema version from which audit rows are chained
_CHAINED_FROM = _MIGRATIONS.index(_SCHEMA_V5) + 1

_CONFERENCE_COLUMNS = (
    "id, title, initiator, state, starts_at, ends_at, late_joiners_get_earlier_epochs, created_at,"
    " early_start, grace, rekey_interval, late_join"
)


def prepare_path(path: str) -> None:
    """Create ``path``'s directory (0700) and an empty ``path`` (0600) if missing.

    An existing directory or file is left as it is.
    """
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        os.makedirs(parent, mode=0o700, exist_ok=True)
        os.chmod(parent, 0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, stat.S_IRUSR | stat.S_IWUSR)
    finally:
        os.close(fd)


def _on_connect(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA busy_timeout = 5000")
    # deleted epoch keys are overwritten with zeros, not left in free pages
    conn.execute("PRAGMA secure_delete = ON")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode.lower() not in ("wal", "memory"):
        raise sqlite3.OperationalError(f"cannot switch to WAL journal (got {mode})")
    conn.execute("PRAGMA synchronous = FULL")


def _migrate(txn: Any, path: str) -> None:
    txn.execute("BEGIN IMMEDIATE")
    version = txn.execute("PRAGMA user_version").fetchone()[0]
    if version == SCHEMA_VERSION:
        return
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path}: schema version {version} is newer than this program's ({SCHEMA_VERSION})"
        )
    for script in _MIGRATIONS[version:]:
        for statement in script.split(";"):
            if statement.strip():
                txn.execute(statement)
    if version < _CHAINED_FROM:
        _chain_unchained(txn)
    txn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _chain_unchained(txn: Any) -> None:
    """Chain the audit rows written before the trail was hash-chained, in their order."""
    rows = txn.execute(
        "SELECT seq, conference_id, time, kind, identity, detail FROM audit"
        " WHERE hash IS NULL ORDER BY seq"
    ).fetchall()
    for seq, cid, when, kind, identity, detail in rows:
        record = _chained(txn, cid, when, kind, identity, json.loads(detail))
        txn.execute("UPDATE audit SET number = ?, prev = ?, hash = ?, detail = ? WHERE seq = ?",
                    (record.seq, record.prev, record.hash, canonical_json(record.detail), seq))


def _tail(txn: Any, conference_id: str) -> tuple[int, str]:
    row = txn.execute(
        "SELECT number, hash FROM audit WHERE conference_id = ? AND hash IS NOT NULL"
        " ORDER BY number DESC LIMIT 1", (conference_id,)
    ).fetchone()
    return (0, GENESIS) if row is None else (row[0], row[1])


def _chained(txn: Any, conference_id: str, now: float, kind: str, identity: str | None,
             detail: dict[str, Any]) -> AuditRecord:
    number, prev = _tail(txn, conference_id)
    return AuditRecord.chained(conference_id, number + 1, now, kind, identity, detail, prev)


def _insert(txn: Any, record: AuditRecord, report_id: str | None = None) -> AuditRecord:
    txn.execute(
        "INSERT INTO audit (conference_id, time, kind, identity, detail, number, prev, hash,"
        " report_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (record.conference, record.time, record.kind, record.identity,
         canonical_json(record.detail), record.seq, record.prev, record.hash, report_id),
    )
    return record


def _audit(txn: Any, conference_id: str, now: float, kind: str, identity: str | None,
           detail: dict[str, Any]) -> AuditRecord:
    """Append the next record of the conference's chain (in the caller's transaction)."""
    return _insert(txn, _chained(txn, conference_id, now, kind, identity, detail))


def _record(row: tuple[Any, ...], conference_id: str) -> AuditRecord:
    number, when, kind, identity, detail, prev, digest = row
    return AuditRecord(conference_id, number, when, kind, identity, json.loads(detail), prev,
                       digest)


_RECORD_COLUMNS = "number, time, kind, identity, detail, prev, hash"


def _state(txn: Any, conference_id: str) -> ConferenceState:
    row = txn.execute("SELECT state FROM conference WHERE id = ?", (conference_id,)).fetchone()
    if row is None:
        raise ConferenceNotFound(conference_id)
    return ConferenceState(row[0])


def _open_state(txn: Any, conference_id: str) -> None:
    if _state(txn, conference_id) is ConferenceState.ENDED:
        raise ConferenceEnded(conference_id)


def _conference(txn: Any, row: tuple[Any, ...]) -> Conference:
    cid = row[0]
    invited = txn.execute("SELECT identity FROM invited WHERE conference_id = ?", (cid,))
    invited = frozenset(r[0] for r in invited.fetchall())
    groups = txn.execute("SELECT grp FROM invited_group WHERE conference_id = ?", (cid,))
    groups = frozenset(r[0] for r in groups.fetchall())
    return Conference(
        conference_id=cid,
        title=row[1],
        initiator=row[2],
        state=ConferenceState(row[3]),
        invited=invited,
        invited_groups=groups,
        starts_at=row[4],
        ends_at=row[5],
        created_at=row[7],
        media_distributors=frozenset(_media_distributors(txn, cid)),
        early_start=row[8],
        grace=row[9],
        rekey_interval=row[10],
        late_join=row[11],
    )


def _media_distributors(txn: Any, conference_id: str) -> list[str]:
    rows = txn.execute(
        "SELECT tunnel FROM media_distributor WHERE conference_id = ? ORDER BY tunnel",
        (conference_id,),
    )
    return [r[0] for r in rows.fetchall()]


def _get(txn: Any, conference_id: str) -> Conference:
    row = txn.execute(
        f"SELECT {_CONFERENCE_COLUMNS} FROM conference WHERE id = ?", (conference_id,)
    ).fetchone()
    if row is None:
        raise ConferenceNotFound(conference_id)
    return _conference(txn, row)


def _end(txn: Any, conference_id: str, now: float) -> None:
    if _state(txn, conference_id) is ConferenceState.ENDED:
        return
    wiped = txn.execute(
        "SELECT count(*) FROM epoch WHERE conference_id = ?", (conference_id,)
    ).fetchone()[0]
    txn.execute("DELETE FROM epoch WHERE conference_id = ?", (conference_id,))
    txn.execute("DELETE FROM roster WHERE conference_id = ?", (conference_id,))
    txn.execute("DELETE FROM media_distributor WHERE conference_id = ?", (conference_id,))
    txn.execute("UPDATE conference SET state = 'ended' WHERE id = ?", (conference_id,))
    _audit(txn, conference_id, now, "ended", None, {"epochs_wiped": wiped})


def _epoch(conference_id: str, row: tuple[Any, ...]) -> EpochKey:
    return EpochKey(conference_id, row[0], row[1], bytes(row[2]), row[3])


@implementer(IConferenceStore)
class SqliteConferenceStore:
    """:class:`~perc_daemons.interfaces.IConferenceStore` in one SQLite file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._pool = adbapi.ConnectionPool(
            "sqlite3",
            path,
            check_same_thread=False,
            isolation_level=None,  # transactions are begun explicitly
            cp_min=1,
            cp_max=1,
            cp_openfun=_on_connect,
        )
        self._closed = False
        self._ready: Failure | bool = False
        self._waiting: list[defer.Deferred[None]] = []
        self._pool.runInteraction(_migrate, path).addBoth(self._opened)

    @classmethod
    def open(cls, path: str = DEFAULT_PATH) -> defer.Deferred[SqliteConferenceStore]:
        """Prepare ``path`` (see :func:`prepare_path`) and open it once the schema is ready."""
        try:
            prepare_path(path)
        except OSError as e:
            return defer.fail(StoreUnavailable(f"cannot create {path}", e))
        store = cls(path)

        def failed(f: Failure) -> Failure:
            store._pool.close()
            return f

        return store._when_ready().addCallbacks(lambda _: store, failed)

    def __repr__(self) -> str:
        return f"<SqliteConferenceStore {self.path}>"

    # -- plumbing

    def _opened(self, result: object) -> None:
        if isinstance(result, Failure):
            self._ready = self._map(result)
        else:
            self._ready = True
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            if self._ready is True:
                d.callback(None)
            else:
                d.errback(self._ready)

    def _when_ready(self) -> defer.Deferred[None]:
        if self._ready is True:
            return defer.succeed(None)
        if isinstance(self._ready, Failure):
            return defer.fail(self._ready)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append(d)
        return d

    def _map(self, f: Failure) -> Failure:
        if f.check(StoreError, ValueError):
            return f
        if f.check(sqlite3.Error):
            return Failure(StoreUnavailable(f"SQLite database {self.path}", f.value))
        return f

    def _run(self, interaction: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        if self._closed:
            return defer.fail(StoreUnavailable(f"SQLite database {self.path} is closed"))
        d = self._when_ready()
        d.addCallback(lambda _: self._pool.runInteraction(interaction, *args))
        return d.addErrback(self._map)

    @staticmethod
    def _checked(check: Callable[[], Any], run: Callable[[Any], defer.Deferred[Any]]
                 ) -> defer.Deferred[Any]:
        try:
            args = check()
        except ValueError:
            return defer.fail()
        return run(args)

    # -- IConferenceStore

    def create(self, conference: Conference) -> defer.Deferred[Conference]:
        if not isinstance(conference, Conference):
            return defer.fail(TypeError("create() takes a Conference"))

        def txn_create(txn: Any) -> Conference:
            txn.execute("BEGIN IMMEDIATE")
            c = conference
            if txn.execute("SELECT 1 FROM conference WHERE id = ?", (c.conference_id,)).fetchone():
                raise ConferenceExists(c.conference_id)
            txn.execute(
                f"INSERT INTO conference ({_CONFERENCE_COLUMNS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (c.conference_id, c.title, c.initiator, str(c.state), c.starts_at, c.ends_at,
                 int(bool(c.late_joiners_get_earlier_epochs)), c.created_at, c.early_start,
                 c.grace, c.rekey_interval, c.late_join),
            )
            txn.executemany(
                "INSERT INTO invited (conference_id, identity) VALUES (?, ?)",
                [(c.conference_id, i) for i in sorted(c.invited)],
            )
            txn.executemany(
                "INSERT INTO invited_group (conference_id, grp) VALUES (?, ?)",
                [(c.conference_id, g) for g in sorted(c.invited_groups)],
            )
            txn.executemany(
                "INSERT INTO media_distributor (conference_id, tunnel) VALUES (?, ?)",
                [(c.conference_id, t) for t in sorted(c.media_distributors)],
            )
            _audit(txn, c.conference_id, c.created_at, "created", c.initiator, created_detail(c))
            return c

        return self._run(txn_create)

    def get(self, conference_id: str) -> defer.Deferred[Conference]:
        def txn_get(txn: Any, cid: str) -> Conference:
            txn.execute("BEGIN")
            return _get(txn, cid)

        return self._checked(lambda: check_conference_id(conference_id),
                             lambda cid: self._run(txn_get, cid))

    def list(self, state: ConferenceState | str | None = None) -> defer.Deferred[list[Conference]]:
        try:
            wanted = None if state is None else ConferenceState(state)
        except ValueError:
            return defer.fail()

        def txn_list(txn: Any) -> list[Conference]:
            txn.execute("BEGIN")
            if wanted is None:
                rows = txn.execute(f"SELECT {_CONFERENCE_COLUMNS} FROM conference ORDER BY id")
            else:
                rows = txn.execute(
                    f"SELECT {_CONFERENCE_COLUMNS} FROM conference WHERE state = ? ORDER BY id",
                    (str(wanted),),
                )
            return [_conference(txn, row) for row in rows.fetchall()]

        return self._run(txn_list)

    def set_state(self, conference_id: str, state: ConferenceState | str,
                  now: float) -> defer.Deferred[Conference]:
        def check() -> tuple[str, ConferenceState, float]:
            return check_conference_id(conference_id), ConferenceState(state), check_now(now)

        def txn_set_state(txn: Any, args: tuple[str, ConferenceState, float]) -> Conference:
            cid, target, when = args
            txn.execute("BEGIN IMMEDIATE")
            current = _state(txn, cid)
            if current is not target:
                if target not in TRANSITIONS[current]:
                    raise InvalidTransition(cid, current, target)
                if target is ConferenceState.ENDED:
                    _end(txn, cid, when)
                else:
                    txn.execute("UPDATE conference SET state = ? WHERE id = ?", (str(target), cid))
                    _audit(txn, cid, when, "state", None, {"state": str(target)})
            return _get(txn, cid)

        return self._checked(check, lambda args: self._run(txn_set_state, args))

    def update(self, conference_id: str, changes: dict[str, Any],
               now: float, by: str | None = None) -> defer.Deferred[Conference]:
        def check() -> tuple[str, dict[str, Any], float]:
            policy_changed_detail({}, by)
            return check_conference_id(conference_id), dict(changes), check_now(now)

        def txn_update(txn: Any, args: tuple[str, dict[str, Any], float]) -> Conference:
            cid, wanted, when = args
            txn.execute("BEGIN IMMEDIATE")
            _open_state(txn, cid)
            updated, changed = check_update(_get(txn, cid), wanted)
            if changed:
                txn.execute(
                    "UPDATE conference SET title = ?, starts_at = ?, ends_at = ?,"
                    " early_start = ?, grace = ?, rekey_interval = ?, late_join = ?,"
                    " late_joiners_get_earlier_epochs = ? WHERE id = ?",
                    (updated.title, updated.starts_at, updated.ends_at, updated.early_start,
                     updated.grace, updated.rekey_interval, updated.late_join,
                     int(bool(updated.late_joiners_get_earlier_epochs)), cid),
                )
                _audit(txn, cid, when, "policy-changed", *policy_changed_detail(changed, by))
            return updated

        return self._checked(check, lambda args: self._run(txn_update, args))

    def _invitation(self, conference_id: str, identity: str, now: float,
                    add: bool) -> defer.Deferred[None]:
        def check() -> tuple[str, str, float]:
            return check_conference_id(conference_id), check_identity(identity), check_now(now)

        def txn_invitation(txn: Any, args: tuple[str, str, float]) -> None:
            cid, who, when = args
            txn.execute("BEGIN IMMEDIATE")
            _open_state(txn, cid)
            # lower(): rows written before identities were normalised (ASCII, as the rule)
            if add:
                cur = txn.execute(
                    "INSERT INTO invited (conference_id, identity) SELECT ?, ? WHERE NOT EXISTS"
                    " (SELECT 1 FROM invited WHERE conference_id = ? AND lower(identity) = ?)",
                    (cid, who, cid, who),
                )
            else:
                cur = txn.execute(
                    "DELETE FROM invited WHERE conference_id = ? AND lower(identity) = ?",
                    (cid, who),
                )
            if cur.rowcount:
                _audit(txn, cid, when, "invited" if add else "uninvited", who, {})

        return self._checked(check, lambda args: self._run(txn_invitation, args))

    def invite(self, conference_id: str, identity: str, now: float) -> defer.Deferred[None]:
        return self._invitation(conference_id, identity, now, True)

    def uninvite(self, conference_id: str, identity: str, now: float) -> defer.Deferred[None]:
        return self._invitation(conference_id, identity, now, False)

    def add_epoch(self, conference_id: str, spi: int, wrapped_key: bytes,
                  now: float) -> defer.Deferred[EpochKey]:
        def check() -> tuple[str, int, bytes, float]:
            return (check_conference_id(conference_id), *check_epoch_args(spi, wrapped_key, now))

        def txn_add_epoch(txn: Any, args: tuple[str, int, bytes, float]) -> EpochKey:
            cid, spi_, blob, when = args
            txn.execute("BEGIN IMMEDIATE")
            _open_state(txn, cid)
            txn.execute("UPDATE conference SET last_epoch = last_epoch + 1 WHERE id = ?", (cid,))
            epoch = txn.execute(
                "SELECT last_epoch FROM conference WHERE id = ?", (cid,)
            ).fetchone()[0]
            txn.execute(
                "INSERT INTO epoch (conference_id, epoch, spi, wrapped_key, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (cid, epoch, spi_, blob, when),
            )
            _audit(txn, cid, when, "epoch", None, {"epoch": epoch, "spi": spi_})
            return EpochKey(cid, epoch, spi_, blob, when)

        return self._checked(check, lambda args: self._run(txn_add_epoch, args))

    def current_epoch(self, conference_id: str) -> defer.Deferred[EpochKey | None]:
        def txn_current(txn: Any, cid: str) -> EpochKey | None:
            txn.execute("BEGIN")
            _state(txn, cid)
            row = txn.execute(
                "SELECT epoch, spi, wrapped_key, created_at FROM epoch"
                " WHERE conference_id = ? ORDER BY epoch DESC LIMIT 1",
                (cid,),
            ).fetchone()
            return None if row is None else _epoch(cid, row)

        return self._checked(lambda: check_conference_id(conference_id),
                             lambda cid: self._run(txn_current, cid))

    def epochs(self, conference_id: str) -> defer.Deferred[list[EpochKey]]:
        def txn_epochs(txn: Any, cid: str) -> list[EpochKey]:
            txn.execute("BEGIN")
            _state(txn, cid)
            rows = txn.execute(
                "SELECT epoch, spi, wrapped_key, created_at FROM epoch"
                " WHERE conference_id = ? ORDER BY epoch",
                (cid,),
            ).fetchall()
            return [_epoch(cid, row) for row in rows]

        return self._checked(lambda: check_conference_id(conference_id),
                             lambda cid: self._run(txn_epochs, cid))

    def record_admission(self, conference_id: str, identity: str, ssrcs: Any, epoch: int,
                         now: float) -> defer.Deferred[None]:
        def check() -> tuple[str, str, list[int], int, float]:
            return (check_conference_id(conference_id),
                    *check_admission_args(identity, ssrcs, epoch, now))

        def txn_admission(txn: Any, args: tuple[str, str, list[int], int, float]) -> None:
            cid, who, ssrc_list, ep, when = args
            txn.execute("BEGIN IMMEDIATE")
            _open_state(txn, cid)
            _audit(txn, cid, when, "admitted", who, {"ssrcs": ssrc_list, "epoch": ep})

        return self._checked(check, lambda args: self._run(txn_admission, args))

    def audit(self, conference_id: str) -> defer.Deferred[list[AuditEvent]]:
        def txn_audit(txn: Any, cid: str) -> list[AuditEvent]:
            txn.execute("BEGIN")
            _state(txn, cid)
            rows = txn.execute(
                "SELECT time, kind, identity, detail FROM audit WHERE conference_id = ?"
                " ORDER BY seq",
                (cid,),
            ).fetchall()
            return [AuditEvent(cid, r[0], r[1], r[2], json.loads(r[3])) for r in rows]

        return self._checked(lambda: check_conference_id(conference_id),
                             lambda cid: self._run(txn_audit, cid))

    def append_audit(self, conference_id: str, kind: str, identity: str | None,
                     detail: dict[str, Any], now: float, report_id: str | None = None
                     ) -> defer.Deferred[AuditRecord | None]:
        def txn_append(txn: Any, args: ReportedAudit) -> AuditRecord | None:
            txn.execute("BEGIN IMMEDIATE")
            cid = args.conference_id
            _state(txn, cid)
            if args.report_id is not None and txn.execute(
                    "SELECT 1 FROM audit WHERE conference_id = ? AND report_id = ?",
                    (cid, args.report_id)).fetchone() is not None:
                return None  # recorded already
            record = _chained(txn, cid, args.now, args.kind, args.identity, args.detail)
            return _insert(txn, record, args.report_id)

        return self._checked(
            lambda: check_audit_args(conference_id, kind, identity, detail, now, report_id),
            lambda args: self._run(txn_append, args))

    def audit_trail(self, conference_id: str
                    ) -> defer.Deferred[tuple[list[AuditRecord], list[Checkpoint]]]:
        def txn_trail(txn: Any, cid: str) -> tuple[list[AuditRecord], list[Checkpoint]]:
            txn.execute("BEGIN")
            _state(txn, cid)
            rows = txn.execute(
                f"SELECT {_RECORD_COLUMNS} FROM audit WHERE conference_id = ? ORDER BY seq",
                (cid,)).fetchall()
            marks = txn.execute(
                "SELECT seq, hash, jws FROM audit_checkpoint WHERE conference_id = ?"
                " ORDER BY seq", (cid,)).fetchall()
            return ([_record(r, cid) for r in rows],
                    [Checkpoint(cid, m[0], m[1], m[2]) for m in marks])

        return self._checked(lambda: check_conference_id(conference_id),
                             lambda cid: self._run(txn_trail, cid))

    def audit_tail(self, conference_id: str
                   ) -> defer.Deferred[tuple[AuditRecord | None, int]]:
        def txn_tail(txn: Any, cid: str) -> tuple[AuditRecord | None, int]:
            txn.execute("BEGIN")
            _state(txn, cid)
            row = txn.execute(
                f"SELECT {_RECORD_COLUMNS} FROM audit WHERE conference_id = ?"
                " ORDER BY number DESC LIMIT 1", (cid,)).fetchone()
            mark = txn.execute("SELECT max(seq) FROM audit_checkpoint WHERE conference_id = ?",
                               (cid,)).fetchone()[0]
            return (None if row is None else _record(row, cid)), mark or 0

        return self._checked(lambda: check_conference_id(conference_id),
                             lambda cid: self._run(txn_tail, cid))

    def add_audit_checkpoint(self, checkpoint: Checkpoint) -> defer.Deferred[None]:
        if not isinstance(checkpoint, Checkpoint):
            return defer.fail(TypeError("add_audit_checkpoint() takes a Checkpoint"))

        def txn_checkpoint(txn: Any, c: Checkpoint) -> None:
            txn.execute("BEGIN IMMEDIATE")
            _state(txn, c.conference)
            txn.execute("INSERT INTO audit_checkpoint (conference_id, seq, hash, jws)"
                        " VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                        (c.conference, c.seq, c.hash, c.jws))

        return self._checked(lambda: (check_conference_id(checkpoint.conference), checkpoint)[1],
                             lambda c: self._run(txn_checkpoint, c))

    def expired_trails(self, ended_before: float) -> defer.Deferred[list[str]]:
        def txn_expired(txn: Any, before: float) -> list[str]:
            txn.execute("BEGIN")
            rows = txn.execute(
                "SELECT DISTINCT c.id FROM conference AS c JOIN audit AS a"
                " ON a.conference_id = c.id AND a.kind = 'ended'"
                " WHERE c.state = 'ended' AND a.time < ? ORDER BY c.id", (before,)).fetchall()
            return [r[0] for r in rows]

        return self._checked(lambda: check_now(ended_before),
                             lambda before: self._run(txn_expired, before))

    def delete_audit_trail(self, conference_id: str, retention: float,
                           now: float) -> defer.Deferred[AuditRecord | None]:
        def txn_delete(txn: Any, args: tuple[str, float, float]) -> AuditRecord | None:
            cid, keep, when = args
            txn.execute("BEGIN IMMEDIATE")
            if _state(txn, cid) is not ConferenceState.ENDED:
                return None
            rows = txn.execute(
                f"SELECT {_RECORD_COLUMNS} FROM audit WHERE conference_id = ? ORDER BY number",
                (cid,)).fetchall()
            records = [_record(r, cid) for r in rows]
            ended = [r.time for r in records if r.kind == "ended"]
            if not ended or not records or records[-1].kind == TRAIL_DELETED:
                return None
            txn.execute("DELETE FROM audit WHERE conference_id = ?", (cid,))
            txn.execute("DELETE FROM audit_checkpoint WHERE conference_id = ?", (cid,))
            last = records[-1]
            detail = trail_deleted_detail(records[0].seq, last.seq, last.hash, len(records),
                                          ended[-1], keep)
            return _insert(txn, AuditRecord.chained(cid, last.seq + 1, when, TRAIL_DELETED,
                                                    None, detail, last.hash))

        return self._checked(
            lambda: (check_conference_id(conference_id), check_now(retention), check_now(now)),
            lambda args: self._run(txn_delete, args))

    def set_roster(self, conference_id: str, epoch: int, signed_roster: str,
                   admitted: Any = ()) -> defer.Deferred[None]:
        def check() -> tuple[str, int, str, str]:
            return (check_conference_id(conference_id), *check_roster_args(epoch, signed_roster),
                    admitted_json(check_admitted(admitted)))

        def txn_set_roster(txn: Any, args: tuple[str, int, str, str]) -> None:
            cid, ep, jws, who = args
            txn.execute("BEGIN IMMEDIATE")
            _open_state(txn, cid)
            txn.execute(
                "INSERT INTO roster (conference_id, epoch, signed_roster, admitted)"
                " VALUES (?, ?, ?, ?)"
                " ON CONFLICT (conference_id) DO UPDATE"
                " SET epoch = excluded.epoch, signed_roster = excluded.signed_roster,"
                " admitted = excluded.admitted"
                " WHERE excluded.epoch >= roster.epoch",
                (cid, ep, jws, who),
            )

        return self._checked(check, lambda args: self._run(txn_set_roster, args))

    def roster(self, conference_id: str) -> defer.Deferred[tuple[int, str] | None]:
        def txn_roster(txn: Any, cid: str) -> tuple[int, str] | None:
            txn.execute("BEGIN")
            _state(txn, cid)
            row = txn.execute(
                "SELECT epoch, signed_roster FROM roster WHERE conference_id = ?", (cid,)
            ).fetchone()
            return None if row is None else (row[0], row[1])

        return self._checked(lambda: check_conference_id(conference_id),
                             lambda cid: self._run(txn_roster, cid))

    def admitted(self, conference_id: str
                 ) -> defer.Deferred[tuple[int, frozenset[tuple[str, bytes]]] | None]:
        def txn_admitted(txn: Any, cid: str) -> tuple[int, frozenset[tuple[str, bytes]]] | None:
            txn.execute("BEGIN")
            _state(txn, cid)
            row = txn.execute(
                "SELECT epoch, admitted FROM roster WHERE conference_id = ?", (cid,)
            ).fetchone()
            return None if row is None else (row[0], admitted_set(row[1]))

        return self._checked(lambda: check_conference_id(conference_id),
                             lambda cid: self._run(txn_admitted, cid))

    def _media_distributor(self, conference_id: str, tunnel: str, now: float,
                           add: bool) -> defer.Deferred[bool]:
        def txn_media_distributor(txn: Any, args: tuple[str, str, float]) -> bool:
            cid, address, when = args
            txn.execute("BEGIN IMMEDIATE")
            _open_state(txn, cid)
            if add:
                cur = txn.execute(
                    "INSERT INTO media_distributor (conference_id, tunnel) VALUES (?, ?)"
                    " ON CONFLICT DO NOTHING",
                    (cid, address),
                )
            else:
                cur = txn.execute(
                    "DELETE FROM media_distributor WHERE conference_id = ? AND tunnel = ?",
                    (cid, address),
                )
            if not cur.rowcount:
                return False
            kind = "media-distributor-added" if add else "media-distributor-removed"
            _audit(txn, cid, when, kind, None, {"tunnel": address})
            return True

        return self._checked(lambda: check_media_distributor_args(conference_id, tunnel, now),
                             lambda args: self._run(txn_media_distributor, args))

    def add_media_distributor(self, conference_id: str, tunnel: str,
                              now: float) -> defer.Deferred[bool]:
        return self._media_distributor(conference_id, tunnel, now, True)

    def remove_media_distributor(self, conference_id: str, tunnel: str,
                                 now: float) -> defer.Deferred[bool]:
        return self._media_distributor(conference_id, tunnel, now, False)

    def media_distributors(self, conference_id: str) -> defer.Deferred[list[str]]:
        def txn_media_distributors(txn: Any, cid: str) -> list[str]:
            txn.execute("BEGIN")
            _state(txn, cid)
            return _media_distributors(txn, cid)

        return self._checked(lambda: check_conference_id(conference_id),
                             lambda cid: self._run(txn_media_distributors, cid))

    def active_media_distributors(self) -> defer.Deferred[list[str]]:
        def txn_active(txn: Any) -> list[str]:
            txn.execute("BEGIN")
            rows = txn.execute(
                "SELECT DISTINCT m.tunnel FROM media_distributor AS m"
                " JOIN conference AS c ON c.id = m.conference_id"
                " WHERE c.state != 'ended' ORDER BY m.tunnel"
            ).fetchall()
            return sorted(r[0] for r in rows)

        return self._run(txn_active)

    def end(self, conference_id: str, now: float) -> defer.Deferred[None]:
        def check() -> tuple[str, float]:
            return check_conference_id(conference_id), check_now(now)

        def txn_end(txn: Any, args: tuple[str, float]) -> None:
            txn.execute("BEGIN IMMEDIATE")
            _end(txn, *args)

        return self._checked(check, lambda args: self._run(txn_end, args))

    def close(self) -> defer.Deferred[None]:
        """Wait for the schema work to finish, then close the connection (idempotent)."""
        if self._closed:
            return defer.succeed(None)
        self._closed = True
        d = self._when_ready()
        d.addErrback(lambda _: None)
        d.addCallback(lambda _: self._pool.close())
        return d

