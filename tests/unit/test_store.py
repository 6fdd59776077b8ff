"""perc_daemons.store: one suite run against SQLite, Redis, and Redis over TLS.

The Redis stores talk to a real ``redis-server`` the test starts on a free
loopback port (password, append-only file in a temporary directory) and
kills afterwards.
"""

from __future__ import annotations

import base64
import datetime
import glob
import itertools
import os
import secrets
import socket
import sqlite3
import stat

import txredisapi
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from perc_daemons.interfaces import IConferenceStore
from perc_daemons.kmf.kek import KeyEncryptionKey
from perc_daemons.protocol.audit import record_hash
from perc_daemons.store import (
    DEFAULT_EARLY_START,
    DEFAULT_GRACE,
    DEFAULT_REKEY_INTERVAL,
    AuditEvent,
    Conference,
    ConferenceEnded,
    ConferenceExists,
    ConferenceNotFound,
    ConferenceState,
    EpochKey,
    InvalidTransition,
    StoreError,
    StoreUnavailable,
)
from perc_daemons.store.redis import RedisConferenceStore
from perc_daemons.store.sqlite import SCHEMA_VERSION, SqliteConferenceStore, prepare_path

REDIS_SERVER = "/usr/bin/redis-server"
T0 = 1_790_000_000.123456
MD1 = "md1.example.com:4443"
MD2 = "[2001:db8::2]:4443"
MD3 = "192.0.2.3:9444"

S = ConferenceState


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def conference(cid: str = "conf-1", **kw: object) -> Conference:
    fields: dict[str, object] = {
        "title": "Weekly sync",
        "initiator": "alice@example.com",
        "invited": frozenset({"bob@example.com", "carol@example.org"}),
        "invited_groups": frozenset({"cn=staff,ou=groups,dc=example,dc=com"}),
        "starts_at": T0 + 60,
        "ends_at": T0 + 3660,
        "created_at": T0,
    }
    fields.update(kw)
    return Conference(cid, **fields)  # type: ignore[arg-type]


# -- a real redis-server


class _Output(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.output = bytearray()
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.done = False

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: object) -> None:
        self.done = True
        self.ended.callback(None)


class _Ping(protocol.Protocol):
    """AUTH then PING; fires ``answered`` with what the server said."""

    def __init__(self, password: str) -> None:
        self.password = password
        self.answered: defer.Deferred[bytes] = defer.Deferred()
        self.buffer = b""

    def connectionMade(self) -> None:
        self.transport.write(
            f"AUTH {self.password}\r\nPING\r\n".encode()  # type: ignore[union-attr]
        )

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if self.buffer.count(b"\r\n") >= 2 and not self.answered.called:
            self.answered.callback(self.buffer)
            self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: object) -> None:
        if not self.answered.called:
            self.answered.callback(self.buffer)


class RedisServer:
    """redis-server on a free loopback port, data in ``directory``."""

    def __init__(self, directory: str, tls: dict[str, str] | None = None) -> None:
        self.directory = directory
        self.password = secrets.token_hex(16)
        self.port = free_port()
        self.tls = tls
        self.process: _Output | None = None
        self.transport = None

    def args(self) -> list[str]:
        args = [REDIS_SERVER, "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
                # every acknowledged write is on disk: the restart test kills -9
                "--appendfsync", "always",
                "--dir", self.directory, "--requirepass", self.password,
                "--logfile", "", "--loglevel", "warning"]
        if self.tls is None:
            return [*args, "--port", str(self.port)]
        return [*args, "--port", "0", "--tls-port", str(self.port),
                "--tls-cert-file", self.tls["cert"], "--tls-key-file", self.tls["key"],
                "--tls-ca-cert-file", self.tls["ca"], "--tls-auth-clients", "no"]

    @defer.inlineCallbacks
    def start(self):
        self.process = _Output()
        self.transport = reactor.spawnProcess(
            self.process, REDIS_SERVER, self.args(), env={}, path=self.directory
        )
        for _ in range(200):
            answer = yield self.ping()
            if b"+PONG" in answer:
                return
            if self.process.done:
                break
            yield task.deferLater(reactor, 0.025, lambda: None)
        raise RuntimeError(
            f"redis-server did not answer PING: {bytes(self.process.output)!r}"
        )

    @defer.inlineCallbacks
    def ping(self):
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port, timeout=1)
        if self.tls is not None:
            endpoint = wrapClientTLS(self.tls_options(), endpoint)
        try:
            proto = yield endpoint.connect(protocol.Factory.forProtocol(
                lambda: _Ping(self.password)))
        except Exception:
            return b""
        answer = yield proto.answered
        return answer

    def tls_options(self):
        assert self.tls is not None
        with open(self.tls["ca"], "rb") as f:
            ca = Certificate.loadPEM(f.read())
        return optionsForClientTLS("localhost", trustRoot=ca)

    def stop(self, signal: str = "KILL") -> defer.Deferred[None]:
        if self.process is None or self.process.done:
            return defer.succeed(None)
        self.transport.signalProcess(signal)  # type: ignore[union-attr]
        return self.process.ended


_TLS_FILES: dict[str, bytes] = {}


def tls_files(directory: str) -> dict[str, str]:
    """A CA, and a server certificate for localhost/127.0.0.1 it signed (made once)."""
    if not _TLS_FILES:
        now = datetime.datetime.now(datetime.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "perc test CA")])
        ca = (
            x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
            .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                         False, False), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        other_key = ec.generate_private_key(ec.SECP256R1())
        other_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "another CA")])
        other = (
            x509.CertificateBuilder().subject_name(other_name).issuer_name(other_name)
            .public_key(other_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(other_key, hashes.SHA256())
        )
        pem = serialization.Encoding.PEM
        _TLS_FILES.update(
            ca=ca.public_bytes(pem),
            cert=cert.public_bytes(pem),
            other_ca=other.public_bytes(pem),
            key=key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()),
        )
    paths = {}
    for name, data in _TLS_FILES.items():
        paths[name] = os.path.join(directory, f"{name}.pem")
        with open(paths[name], "wb") as f:
            f.write(data)
    os.chmod(paths["key"], 0o600)
    return paths


class ModelTests(unittest.TestCase):
    def test_conference_validation(self):
        self.assertEqual(conference().state, S.SCHEDULED)
        c = Conference("x", "t", "a@b.example", state="running", invited=["c@d.example"])
        self.assertIs(c.state, S.RUNNING)
        self.assertEqual(c.invited, frozenset({"c@d.example"}))
        self.assertFalse(c.late_joiners_get_earlier_epochs)
        for cid in ("", "a" * 65, "a/b", "a:b", "a b", "é", None):
            self.assertRaises(ValueError, conference, cid)
        Conference("a" * 64, "t", "a@b.example")
        for kw in ({"title": "t" * 201}, {"initiator": "alice"}, {"initiator": "a@"},
                   {"invited": frozenset({"bob"})}, {"invited": "bob@example.com"},
                   {"invited_groups": frozenset({""})}, {"state": "paused"},
                   {"starts_at": T0, "ends_at": T0 - 1}, {"created_at": float("nan")},
                   {"late_joiners_get_earlier_epochs": 1}, {"late_join": "all"},
                   {"late_join": "none", "late_joiners_get_earlier_epochs": True},
                   {"rekey_interval": -1}, {"early_start": float("inf")},
                   {"grace": 86401}, {"rekey_interval": True}):
            self.assertRaises(ValueError, conference, **kw)
        conference(title="t" * 200)

    def test_epoch_key_repr_hides_key(self):
        blob = bytes(range(48))
        text = repr(EpochKey("c", 2, 7, blob, T0))
        self.assertIn("48 bytes", text)
        self.assertIn("epoch=2", text)
        for form in (repr(blob), blob.hex(), base64.b64encode(blob).decode(), "\\x01\\x02"):
            self.assertNotIn(form, text)

    def test_errors(self):
        for cls in (ConferenceExists, ConferenceNotFound, ConferenceEnded, InvalidTransition,
                    StoreUnavailable):
            self.assertTrue(issubclass(cls, StoreError))
        cause = ConnectionRefusedError("refused")
        e = StoreUnavailable("Redis at h:1", cause)
        self.assertIs(e.cause, cause)
        self.assertIs(e.__cause__, cause)
        self.assertIn("refused", str(e))


# -- the shared suite


class StoreTestsMixin:
    """What every IConferenceStore must do.  Subclasses provide the store."""

    store: IConferenceStore
    kek: KeyEncryptionKey

    def open_store(self) -> defer.Deferred[IConferenceStore]:
        """Another store on the same data (and close it in cleanup)."""
        raise NotImplementedError

    def restart(self) -> defer.Deferred[None]:
        """Close ``self.store``, stop and start the back-end, reopen ``self.store``."""
        raise NotImplementedError

    def data_at_rest(self) -> bytes:
        """Every byte the back-end keeps on disk."""
        raise NotImplementedError

    def store_invitation_as_given(self, cid: str, identity: str) -> defer.Deferred[None]:
        """Write an invitation as a store before identity normalisation did: unchanged."""
        raise NotImplementedError

    @defer.inlineCallbacks
    def setUp(self):
        self.kek = KeyEncryptionKey(os.urandom(32))
        self.store = yield self.open_store()

    def wrapped(self, cid: str, epoch: int, key: bytes | None = None) -> bytes:
        return self.kek.wrap(key or os.urandom(16), conference_id=cid, epoch=epoch)

    @defer.inlineCallbacks
    def assertFails(self, d, exception):
        try:
            result = yield d
        except exception as e:
            return e
        self.fail(f"expected {exception.__name__}, got {result!r}")

    # conferences

    @defer.inlineCallbacks
    def test_policy_is_stored_and_updated_with_one_audit_event(self):
        """Issue 14: the policy fields round-trip, update changes only what it names,
        audits the changed fields once ("policy"), and refuses a bad or ended one."""
        c = conference(early_start=60.0, grace=30.0, rekey_interval=2.0, late_join="history")
        yield self.store.create(c)
        got = yield self.store.get("conf-1")
        self.assertEqual((got.early_start, got.grace, got.rekey_interval, got.late_join,
                          got.late_joiners_get_earlier_epochs),
                         (60.0, 30.0, 2.0, "history", True))
        updated = yield self.store.update("conf-1", {"rekey_interval": 900, "late_join": "none",
                                                     "ends_at": T0 + 7200}, T0 + 1)
        self.assertEqual((updated.rekey_interval, updated.late_join, updated.ends_at,
                          updated.late_joiners_get_earlier_epochs, updated.grace),
                         (900.0, "none", T0 + 7200, False, 30.0))
        self.assertEqual((yield self.store.get("conf-1")), updated)
        yield self.store.update("conf-1", {"rekey_interval": 900}, T0 + 2)  # no change
        yield self.store.update("conf-1", {"grace": 10}, T0 + 2, by="perc-admin")
        yield self.store.update("conf-1", {"grace": 20}, T0 + 2, by="Bob@Example.com")
        policy = [e for e in (yield self.store.audit("conf-1")) if e.kind == "policy-changed"]
        self.assertEqual([(e.identity, e.detail) for e in policy], [
            (None, {"changes": {"rekey_interval": 900.0, "late_join": "none",
                                "ends_at": T0 + 7200}}),
            (None, {"changes": {"grace": 10.0}, "by": "perc-admin"}),
            ("bob@example.com", {"changes": {"grace": 20.0}, "by": "Bob@Example.com"})])
        yield self.assertFails(self.store.update("conf-1", {"grace": 1}, T0 + 3, by=""),
                               ValueError)
        records, _ = yield self.store.audit_trail("conf-1")  # chained like any record
        for before, record in itertools.pairwise(records):
            self.assertEqual((record.prev, record.hash),
                             (before.hash, record_hash(record.body())))
        yield self.store.update("conf-1", {"grace": 30}, T0 + 3)
        for bad in ({"late_join": "all"}, {"rekey_interval": -1}, {"grace": 86401},
                    {"ends_at": T0}, {"state": "ended"}, {"invited": []}):
            yield self.assertFails(self.store.update("conf-1", bad, T0 + 3), ValueError)
        self.assertEqual((yield self.store.get("conf-1")), updated)
        yield self.assertFails(self.store.update("nope", {"grace": 1}, T0), ConferenceNotFound)
        yield self.store.end("conf-1", T0 + 4)
        yield self.assertFails(self.store.update("conf-1", {"grace": 1}, T0 + 5),
                               ConferenceEnded)

    def test_provides_interface(self):
        self.assertTrue(verifyObject(IConferenceStore, self.store))

    @defer.inlineCallbacks
    def test_create_and_get(self):
        c = conference(late_joiners_get_earlier_epochs=True, title="Réunion ☎")
        created = yield self.store.create(c)
        self.assertEqual(created, c)
        got = yield self.store.get("conf-1")
        self.assertEqual(got, c)
        self.assertIsInstance(got.state, ConferenceState)
        self.assertEqual(got.created_at, T0)  # exact, not rounded
        # numeric-looking strings stay strings (txredisapi converts them unless told not to)
        numeric = conference("007", title="0042", invited_groups=frozenset({"1.50", "12"}),
                             starts_at=10.0, ends_at=1e20, created_at=0.0)
        yield self.store.create(numeric)
        got = yield self.store.get("007")
        self.assertEqual(got, numeric)
        bare = Conference("bare", "", "dave@example.net", created_at=1.5)
        yield self.store.create(bare)
        got = yield self.store.get("bare")
        self.assertEqual(got, bare)
        self.assertIsNone(got.starts_at)

    @defer.inlineCallbacks
    def test_create_existing(self):
        yield self.store.create(conference())
        yield self.assertFails(
            self.store.create(conference(title="other", invited=frozenset())), ConferenceExists)
        got = yield self.store.get("conf-1")
        self.assertEqual(got, conference())
        events = yield self.store.audit("conf-1")
        self.assertEqual([e.kind for e in events], ["created"])

    @defer.inlineCallbacks
    def test_unknown_conference(self):
        s = self.store
        for d in [s.get("nope"), s.set_state("nope", S.RUNNING, T0),
                  s.invite("nope", "bob@example.com", T0),
                  s.uninvite("nope", "bob@example.com", T0),
                  s.add_epoch("nope", 1, b"x" * 40, T0), s.current_epoch("nope"),
                  s.epochs("nope"), s.record_admission("nope", "bob@example.com", [1], 1, T0),
                  s.audit("nope"), s.set_roster("nope", 1, "a.b.c"), s.roster("nope"),
                  s.add_media_distributor("nope", MD1, T0),
                  s.remove_media_distributor("nope", MD1, T0), s.media_distributors("nope"),
                  s.end("nope", T0)]:
            yield self.assertFails(d, ConferenceNotFound)
        listed = yield s.list()
        self.assertEqual(listed, [])

    @defer.inlineCallbacks
    def test_bad_arguments(self):
        yield self.store.create(conference())
        s = self.store
        for d in [s.get("bad/id"), s.invite("conf-1", "not-an-identity", T0),
                  s.add_epoch("conf-1", -1, b"x", T0), s.add_epoch("conf-1", 1, b"", T0),
                  s.record_admission("conf-1", "bob@example.com", [2**32], 1, T0),
                  s.set_state("conf-1", "paused", T0), s.list("paused")]:
            yield self.assertFails(d, ValueError)
        epochs = yield s.epochs("conf-1")
        self.assertEqual(epochs, [])

    @defer.inlineCallbacks
    def test_list(self):
        for cid in ["b", "a", "c-2", "c-10"]:
            yield self.store.create(conference(cid))
        yield self.store.set_state("b", S.RUNNING, T0)
        yield self.store.end("c-2", T0)
        every = yield self.store.list()
        self.assertEqual([c.conference_id for c in every], ["a", "b", "c-10", "c-2"])
        self.assertEqual(every[0], conference("a"))
        running = yield self.store.list(S.RUNNING)
        self.assertEqual([c.conference_id for c in running], ["b"])
        ended = yield self.store.list("ended")
        self.assertEqual([c.conference_id for c in ended], ["c-2"])
        scheduled = yield self.store.list(S.SCHEDULED)
        self.assertEqual([c.conference_id for c in scheduled], ["a", "c-10"])

    # states

    @defer.inlineCallbacks
    def test_state_transitions(self):
        yield self.store.create(conference())
        c = yield self.store.set_state("conf-1", S.RUNNING, T0 + 1)
        self.assertEqual(c, conference(state=S.RUNNING))
        c = yield self.store.set_state("conf-1", "running", T0 + 2)  # no-op
        self.assertIs(c.state, S.RUNNING)
        yield self.store.add_epoch("conf-1", 1, self.wrapped("conf-1", 1), T0 + 3)
        c = yield self.store.set_state("conf-1", S.ENDED, T0 + 4)
        self.assertIs(c.state, S.ENDED)
        self.assertEqual(c.invited, conference().invited)
        events = yield self.store.audit("conf-1")
        self.assertEqual(
            [(e.kind, e.time, e.detail) for e in events[1:]],
            [("state", T0 + 1, {"state": "running"}), ("epoch", T0 + 3, {"epoch": 1, "spi": 1}),
             ("ended", T0 + 4, {"epochs_wiped": 1})],
        )
        # ENDED behaves like end(): keys gone
        current = yield self.store.current_epoch("conf-1")
        self.assertIsNone(current)

    @defer.inlineCallbacks
    def test_invalid_transitions(self):
        yield self.store.create(conference("a"))
        yield self.store.set_state("a", S.RUNNING, T0)
        e = yield self.assertFails(self.store.set_state("a", S.SCHEDULED, T0), InvalidTransition)
        self.assertEqual((e.conference_id, e.current, e.requested), ("a", "running", "scheduled"))
        yield self.store.end("a", T0)
        for target in (S.SCHEDULED, S.RUNNING):
            e = yield self.assertFails(self.store.set_state("a", target, T0), InvalidTransition)
            self.assertEqual(e.current, "ended")
        c = yield self.store.set_state("a", S.ENDED, T0)  # already there: no-op
        self.assertIs(c.state, S.ENDED)
        # a scheduled conference can be cancelled
        yield self.store.create(conference("b"))
        c = yield self.store.set_state("b", S.ENDED, T0)
        self.assertIs(c.state, S.ENDED)
        events = yield self.store.audit("a")
        self.assertEqual([e.kind for e in events], ["created", "state", "ended"])

    # invitations

    @defer.inlineCallbacks
    def test_invite_uninvite_idempotent(self):
        yield self.store.create(conference(invited=frozenset()))
        for _ in range(2):
            yield self.store.invite("conf-1", "dave@example.net", T0 + 1)
        c = yield self.store.get("conf-1")
        self.assertEqual(c.invited, {"dave@example.net"})
        for _ in range(2):
            yield self.store.uninvite("conf-1", "dave@example.net", T0 + 2)
        yield self.store.uninvite("conf-1", "never@example.net", T0 + 3)
        c = yield self.store.get("conf-1")
        self.assertEqual(c.invited, frozenset())
        events = yield self.store.audit("conf-1")
        self.assertEqual(
            [(e.kind, e.identity, e.time) for e in events[1:]],
            [("invited", "dave@example.net", T0 + 1), ("uninvited", "dave@example.net", T0 + 2)],
        )

    @defer.inlineCallbacks
    def test_identities_are_stored_lower_case(self):
        yield self.store.create(conference(initiator="Alice@Example.COM",
                                           invited=frozenset({"BOB@EXAMPLE.COM"})))
        c = yield self.store.get("conf-1")
        self.assertEqual((c.initiator, c.invited), ("alice@example.com", {"bob@example.com"}))
        yield self.store.invite("conf-1", "Dave@Example.NET", T0 + 1)
        yield self.store.invite("conf-1", "dave@example.net", T0 + 2)  # the same: no event
        yield self.store.record_admission("conf-1", "DAVE@example.net", [5], 1, T0 + 3)
        yield self.store.uninvite("conf-1", "dave@EXAMPLE.net", T0 + 4)
        c = yield self.store.get("conf-1")
        self.assertEqual(c.invited, {"bob@example.com"})
        events = yield self.store.audit("conf-1")
        self.assertEqual([(e.kind, e.identity) for e in events[1:]],
                         [("invited", "dave@example.net"), ("admitted", "dave@example.net"),
                          ("uninvited", "dave@example.net")])

    @defer.inlineCallbacks
    def test_mixed_case_invitations_stored_before_normalisation_match(self):
        yield self.store.create(conference(invited=frozenset()))
        yield self.store_invitation_as_given("conf-1", "Erin@Example.ORG")
        c = yield self.store.get("conf-1")
        self.assertEqual(c.invited, {"erin@example.org"})
        yield self.store.invite("conf-1", "ERIN@example.org", T0 + 1)  # already: no event
        c = yield self.store.get("conf-1")
        self.assertEqual(c.invited, {"erin@example.org"})
        yield self.store.uninvite("conf-1", "erin@example.org", T0 + 2)
        c = yield self.store.get("conf-1")
        self.assertEqual(c.invited, frozenset())
        events = yield self.store.audit("conf-1")
        self.assertEqual([(e.kind, e.identity) for e in events[1:]],
                         [("uninvited", "erin@example.org")])

    # epochs

    @defer.inlineCallbacks
    def test_epochs(self):
        yield self.store.create(conference())
        current = yield self.store.current_epoch("conf-1")
        self.assertIsNone(current)
        blobs = [self.wrapped("conf-1", n) for n in (1, 2, 3)]
        made = []
        for n, blob in enumerate(blobs, 1):
            k = yield self.store.add_epoch("conf-1", 100 + n, blob, T0 + n)
            made.append(k)
        self.assertEqual(made, [EpochKey("conf-1", n, 100 + n, blobs[n - 1], T0 + n)
                                for n in (1, 2, 3)])
        current = yield self.store.current_epoch("conf-1")
        self.assertEqual(current, made[-1])
        stored = yield self.store.epochs("conf-1")
        self.assertEqual(stored, made)
        self.assertIsInstance(stored[0].wrapped_key, bytes)
        self.assertEqual(len(self.kek.unwrap(stored[1].wrapped_key, conference_id="conf-1",
                                             epoch=2)), 16)
        # each conference counts on its own
        yield self.store.create(conference("other"))
        k = yield self.store.add_epoch("other", 9, blobs[0], T0)
        self.assertEqual(k.epoch, 1)

    @defer.inlineCallbacks
    def test_concurrent_add_epoch(self):
        """50 add_epoch calls at once, from two store instances: epochs 1..50 exactly."""
        yield self.store.create(conference())
        other = yield self.open_store()
        blob = self.wrapped("conf-1", 0)
        made = yield defer.gatherResults(
            [(self.store if i % 2 else other).add_epoch("conf-1", i, blob, T0 + i)
             for i in range(50)]
        )
        self.assertEqual(sorted(k.epoch for k in made), list(range(1, 51)))
        stored = yield self.store.epochs("conf-1")
        self.assertEqual([k.epoch for k in stored], list(range(1, 51)))
        # the epoch each call was given is the one stored with its spi
        self.assertEqual({(k.epoch, k.spi) for k in stored}, {(k.epoch, k.spi) for k in made})
        events = yield self.store.audit("conf-1")
        self.assertEqual(sorted(e.detail["epoch"] for e in events if e.kind == "epoch"),
                         list(range(1, 51)))

    # end

    @defer.inlineCallbacks
    def test_end(self):
        yield self.store.create(conference())
        yield self.store.set_state("conf-1", S.RUNNING, T0)
        for n in (1, 2):
            yield self.store.add_epoch("conf-1", n, self.wrapped("conf-1", n), T0)
        yield self.store.set_roster("conf-1", 2, "h.p.s")
        yield self.store.end("conf-1", T0 + 10)
        epochs = yield self.store.epochs("conf-1")
        self.assertEqual(epochs, [])
        current = yield self.store.current_epoch("conf-1")
        self.assertIsNone(current)
        roster = yield self.store.roster("conf-1")
        self.assertIsNone(roster)
        c = yield self.store.get("conf-1")
        self.assertEqual(c, conference(state=S.ENDED))
        s = self.store
        for d in [s.add_epoch("conf-1", 3, self.wrapped("conf-1", 3), T0),
                  s.invite("conf-1", "eve@example.com", T0),
                  s.uninvite("conf-1", "bob@example.com", T0),
                  s.record_admission("conf-1", "bob@example.com", [5], 2, T0),
                  s.set_roster("conf-1", 3, "h.p.s")]:
            yield self.assertFails(d, ConferenceEnded)
        yield self.store.end("conf-1", T0 + 20)  # idempotent
        events = yield self.store.audit("conf-1")
        self.assertEqual([e.kind for e in events], ["created", "state", "epoch", "epoch", "ended"])
        self.assertEqual(events[-1], AuditEvent("conf-1", T0 + 10, "ended", None,
                                                {"epochs_wiped": 2}))
        c = yield self.store.get("conf-1")
        self.assertEqual(c.invited, conference().invited)

    # Media Distributors

    @defer.inlineCallbacks
    def test_media_distributors(self):
        """Idempotent, canonical, audited when the list changes; the active list is the
        union over the conferences not ended."""
        s = self.store
        yield s.create(conference())
        yield s.create(conference("conf-2"))
        self.assertEqual((yield s.media_distributors("conf-1")), [])
        self.assertEqual((yield s.active_media_distributors()), [])
        self.assertIs((yield s.add_media_distributor("conf-1", "MD1.Example.com:4443", T0 + 1)),
                      True)
        # the same address in another spelling is the same MD
        self.assertIs((yield s.add_media_distributor("conf-1", "md1.example.com:04443", T0 + 2)),
                      False)
        self.assertIs((yield s.add_media_distributor("conf-1", "[2001:DB8:0::2]:4443", T0 + 3)),
                      True)
        yield s.add_media_distributor("conf-2", MD1, T0 + 4)
        yield s.add_media_distributor("conf-2", MD3, T0 + 5)
        self.assertEqual((yield s.media_distributors("conf-1")), sorted([MD1, MD2]))
        self.assertEqual((yield s.media_distributors("conf-2")), sorted([MD1, MD3]))
        self.assertEqual((yield s.get("conf-1")).media_distributors, frozenset({MD1, MD2}))
        self.assertEqual([c.media_distributors for c in (yield s.list())],
                         [frozenset({MD1, MD2}), frozenset({MD1, MD3})])
        self.assertEqual((yield s.active_media_distributors()), sorted([MD1, MD2, MD3]))
        # removing it from one conference leaves it active for the other
        self.assertIs((yield s.remove_media_distributor("conf-1", "MD1.example.com:4443",
                                                        T0 + 6)), True)
        self.assertIs((yield s.remove_media_distributor("conf-1", MD1, T0 + 7)), False)
        self.assertEqual((yield s.media_distributors("conf-1")), [MD2])
        self.assertEqual((yield s.active_media_distributors()), sorted([MD1, MD2, MD3]))
        yield s.remove_media_distributor("conf-2", MD1, T0 + 8)
        self.assertEqual((yield s.active_media_distributors()), sorted([MD2, MD3]))
        events = yield s.audit("conf-1")
        self.assertEqual(events[1:], [
            AuditEvent("conf-1", T0 + 1, "media-distributor-added", None, {"tunnel": MD1}),
            AuditEvent("conf-1", T0 + 3, "media-distributor-added", None, {"tunnel": MD2}),
            AuditEvent("conf-1", T0 + 6, "media-distributor-removed", None, {"tunnel": MD1}),
        ])

    @defer.inlineCallbacks
    def test_media_distributor_bad_arguments(self):
        s = self.store
        yield s.create(conference())
        for bad in ("md1.example.com", "md1:0", "::1:4443", "[fe80::1%eth0]:1", "md_1:80",
                    "", None, 4443, b"md1:80", "a" * 300 + ":80"):
            for d in (s.add_media_distributor("conf-1", bad, T0),
                      s.remove_media_distributor("conf-1", bad, T0)):
                yield self.assertFails(d, ValueError)
        for d in (s.add_media_distributor("bad/id", MD1, T0),
                  s.add_media_distributor("conf-1", MD1, float("nan")),
                  s.media_distributors("bad/id")):
            yield self.assertFails(d, ValueError)
        self.assertEqual((yield s.media_distributors("conf-1")), [])
        self.assertEqual([e.kind for e in (yield s.audit("conf-1"))], ["created"])
        self.assertRaises(ValueError, conference, media_distributors=frozenset({"md1"}))
        self.assertRaises(ValueError, conference, media_distributors=MD1)

    @defer.inlineCallbacks
    def test_created_with_media_distributors(self):
        c = conference(media_distributors=frozenset({"MD1.example.com:4443", MD3}))
        self.assertEqual(c.media_distributors, frozenset({MD1, MD3}))
        self.assertEqual((yield self.store.create(c)), c)
        self.assertEqual((yield self.store.get("conf-1")), c)
        self.assertEqual((yield self.store.active_media_distributors()), sorted([MD1, MD3]))
        [created] = yield self.store.audit("conf-1")
        self.assertEqual(created.detail["media_distributors"], sorted([MD1, MD3]))

    @defer.inlineCallbacks
    def test_end_drops_media_distributors(self):
        """Ending (either way) deletes the conference's list and takes it out of the
        active list; nothing more can be added or removed."""
        s = self.store
        for cid in ("conf-1", "conf-2", "conf-3"):
            yield s.create(conference(cid))
            yield s.add_media_distributor(cid, MD1, T0)
        yield s.add_media_distributor("conf-1", MD2, T0)
        yield s.add_media_distributor("conf-2", MD3, T0)
        yield s.set_state("conf-1", S.RUNNING, T0)
        yield s.end("conf-1", T0 + 1)
        yield s.set_state("conf-2", S.ENDED, T0 + 1)  # cancelled before it started
        self.assertEqual((yield s.media_distributors("conf-1")), [])
        self.assertEqual((yield s.media_distributors("conf-2")), [])
        self.assertEqual((yield s.get("conf-1")).media_distributors, frozenset())
        self.assertEqual((yield s.active_media_distributors()), [MD1])  # conf-3's
        for d in (s.add_media_distributor("conf-1", MD3, T0 + 2),
                  s.add_media_distributor("conf-2", MD3, T0 + 2),
                  s.remove_media_distributor("conf-1", MD2, T0 + 2)):
            yield self.assertFails(d, ConferenceEnded)
        yield s.end("conf-1", T0 + 3)  # again: nothing changes
        self.assertEqual((yield s.active_media_distributors()), [MD1])
        self.assertEqual((yield s.audit("conf-1"))[-1],
                         AuditEvent("conf-1", T0 + 1, "ended", None, {"epochs_wiped": 0}))
        yield s.end("conf-3", T0 + 4)
        self.assertEqual((yield s.active_media_distributors()), [])

    @defer.inlineCallbacks
    def test_concurrent_media_distributor_changes(self):
        """Adds, removes and ends from two clients at once leave the active list equal
        to the union of the conferences' lists."""
        other = yield self.open_store()
        cids = [f"c{n}" for n in range(6)]
        for cid in cids:
            yield self.store.create(conference(cid))
        mds = [MD1, MD2, MD3]
        work = []
        for n, cid in enumerate(cids):
            for m, md in enumerate(mds):
                store = (self.store, other)[(n + m) % 2]
                work.append(store.add_media_distributor(cid, md, T0))
                if (n + m) % 3 == 0:
                    work.append(store.remove_media_distributor(cid, md, T0))
        work += [other.end("c0", T0), self.store.end("c3", T0)]
        # a change that comes after its conference's end is refused
        work = [d.addErrback(lambda f: f.trap(ConferenceEnded)) for d in work]
        yield defer.gatherResults(work, consumeErrors=True).addErrback(
            lambda f: f.value.subFailure)
        union = set()
        for cid in cids:
            union |= set((yield self.store.media_distributors(cid)))
        active = yield other.active_media_distributors()
        self.assertEqual(active, sorted(union))
        for cid in cids:
            yield self.store.end(cid, T0 + 1)
        self.assertEqual((yield other.active_media_distributors()), [])

    # audit and roster

    @defer.inlineCallbacks
    def test_audit_trail(self):
        c = conference(invited=frozenset({"bob@example.com"}), invited_groups=frozenset())
        yield self.store.create(c)
        yield self.store.invite("conf-1", "carol@example.org", T0 + 1)
        yield self.store.set_state("conf-1", S.RUNNING, T0 + 2)
        secret = os.urandom(16)
        blob = self.wrapped("conf-1", 1, secret)
        yield self.store.add_epoch("conf-1", 7, blob, T0 + 3)
        yield self.store.record_admission("conf-1", "bob@example.com", [0xFFFFFFFF, 1], 1, T0 + 4)
        yield self.store.record_admission("conf-1", "carol@example.org", [], 1, T0 + 5)
        yield self.store.uninvite("conf-1", "carol@example.org", T0 + 6)
        yield self.store.end("conf-1", T0 + 7)
        events = yield self.store.audit("conf-1")
        cid = "conf-1"
        self.assertEqual(events, [
            AuditEvent(cid, T0, "created", "alice@example.com", {
                "title": "Weekly sync", "state": "scheduled", "invited": ["bob@example.com"],
                "invited_groups": [], "starts_at": T0 + 60, "ends_at": T0 + 3660,
                "late_joiners_get_earlier_epochs": False, "media_distributors": [],
                "early_start": DEFAULT_EARLY_START,
                "grace": DEFAULT_GRACE, "rekey_interval": DEFAULT_REKEY_INTERVAL,
                "late_join": "none"}),
            AuditEvent(cid, T0 + 1, "invited", "carol@example.org", {}),
            AuditEvent(cid, T0 + 2, "state", None, {"state": "running"}),
            AuditEvent(cid, T0 + 3, "epoch", None, {"epoch": 1, "spi": 7}),
            AuditEvent(cid, T0 + 4, "admitted", "bob@example.com",
                       {"ssrcs": [0xFFFFFFFF, 1], "epoch": 1}),
            AuditEvent(cid, T0 + 5, "admitted", "carol@example.org", {"ssrcs": [], "epoch": 1}),
            AuditEvent(cid, T0 + 6, "uninvited", "carol@example.org", {}),
            AuditEvent(cid, T0 + 7, "ended", None, {"epochs_wiped": 1}),
        ])
        text = repr(events)
        for material in (secret, blob):
            for form in (material.hex(), base64.b64encode(material).decode(), repr(material)):
                self.assertNotIn(form, text)

    @defer.inlineCallbacks
    def test_roster(self):
        yield self.store.create(conference())
        roster = yield self.store.roster("conf-1")
        self.assertIsNone(roster)
        yield self.store.set_roster("conf-1", 1, "eyJhbGciOiJFUzI1NiJ9.e30.sig1")
        roster = yield self.store.roster("conf-1")
        self.assertEqual(roster, (1, "eyJhbGciOiJFUzI1NiJ9.e30.sig1"))
        yield self.store.set_roster("conf-1", 3, "h.p.sig3")
        yield self.store.set_roster("conf-1", 2, "h.p.sig2")  # older: ignored
        roster = yield self.store.roster("conf-1")
        self.assertEqual(roster, (3, "h.p.sig3"))
        yield self.store.set_roster("conf-1", 3, "h.p.sig3b")  # same epoch: replaced
        roster = yield self.store.roster("conf-1")
        self.assertEqual(roster, (3, "h.p.sig3b"))

    @defer.inlineCallbacks
    def test_admitted_kept_with_the_roster_and_wiped_at_the_end(self):
        fp_a, fp_b = os.urandom(32), os.urandom(32)
        yield self.store.create(conference())
        self.assertIsNone((yield self.store.admitted("conf-1")))
        yield self.store.set_roster("conf-1", 1, "h.p.s1")  # admitted defaults to nobody
        self.assertEqual((yield self.store.admitted("conf-1")), (1, frozenset()))
        yield self.store.set_roster("conf-1", 2, "h.p.s2",
                                    [("bob@example.com", fp_a), ("carol@example.com", fp_b)])
        self.assertEqual((yield self.store.admitted("conf-1")),
                         (2, frozenset({("bob@example.com", fp_a),
                                        ("carol@example.com", fp_b)})))
        # an older epoch's report changes neither the roster nor the admitted set
        yield self.store.set_roster("conf-1", 1, "h.p.old", [("eve@example.com", fp_a)])
        self.assertEqual((yield self.store.admitted("conf-1"))[0], 2)
        self.assertNotIn("eve@example.com",
                         {i for i, _ in (yield self.store.admitted("conf-1"))[1]})
        yield self.store.set_roster("conf-1", 3, "h.p.s3", [("carol@example.com", fp_b)])
        self.assertEqual((yield self.store.admitted("conf-1")),
                         (3, frozenset({("carol@example.com", fp_b)})))
        for bad in ([("carol@example.com", b"short")], [("no-at-sign", fp_a)], "x",
                    [("carol@example.com",)]):
            yield self.assertFails(self.store.set_roster("conf-1", 4, "h.p.s4", bad),
                                   ValueError)
        yield self.store.end("conf-1", T0 + 9)
        self.assertIsNone((yield self.store.admitted("conf-1")))

    # at rest

    @defer.inlineCallbacks
    def test_survives_restart(self):
        yield self.store.create(conference())
        yield self.store.create(conference("second", invited=frozenset()))
        yield self.store.set_state("conf-1", S.RUNNING, T0 + 1)
        yield self.store.invite("conf-1", "dave@example.net", T0 + 2)
        keys = [os.urandom(32) for _ in range(3)]
        for n, key in enumerate(keys, 1):
            yield self.store.add_epoch("conf-1", n, self.wrapped("conf-1", n, key), T0 + 3)
        yield self.store.record_admission("conf-1", "bob@example.com", [11, 12], 3, T0 + 4)
        yield self.store.set_roster("conf-1", 3, "h.p.s", [("bob@example.com", b"\x01" * 32)])
        yield self.store.add_media_distributor("conf-1", MD1, T0 + 4)
        yield self.store.add_media_distributor("second", MD2, T0 + 4)
        yield self.store.end("second", T0 + 5)
        before = yield self.snapshot()
        self.assertEqual(before["active"], [MD1])

        yield self.restart()

        after = yield self.snapshot()
        self.assertEqual(after, before)
        stored = yield self.store.epochs("conf-1")
        self.assertEqual(
            [self.kek.unwrap(k.wrapped_key, conference_id="conf-1", epoch=k.epoch)
             for k in stored], keys)
        # and it keeps counting where it was
        k = yield self.store.add_epoch("conf-1", 4, self.wrapped("conf-1", 4), T0 + 6)
        self.assertEqual(k.epoch, 4)

    @defer.inlineCallbacks
    def snapshot(self):
        out = {}
        listed = yield self.store.list()
        out["list"] = listed
        out["active"] = yield self.store.active_media_distributors()
        for c in listed:
            cid = c.conference_id
            out[cid] = (
                (yield self.store.get(cid)),
                (yield self.store.epochs(cid)),
                (yield self.store.current_epoch(cid)),
                (yield self.store.audit(cid)),
                (yield self.store.roster(cid)),
                (yield self.store.admitted(cid)),
                (yield self.store.media_distributors(cid)),
            )
        return out

    @defer.inlineCallbacks
    def test_no_key_in_clear_at_rest(self):
        yield self.store.create(conference())
        secret = os.urandom(16)
        blob = self.wrapped("conf-1", 1, secret)
        yield self.store.add_epoch("conf-1", 1, blob, T0)
        yield self.store.close()
        data = self.data_at_rest()
        # the wrapped key is there (so this looks in the right place) ...
        self.assertTrue(blob in data or base64.b64encode(blob) in data)
        # ... the key itself is not, in any usual encoding
        for form in (secret, secret.hex().encode(), base64.b64encode(secret)):
            self.assertNotIn(form, data)

    @defer.inlineCallbacks
    def test_closed(self):
        yield self.store.close()
        yield self.assertFails(self.store.get("conf-1"), StoreUnavailable)
        yield self.store.close()  # idempotent


class SqliteStoreTests(StoreTestsMixin, unittest.TestCase):
    def setUp(self):
        self.dir = self.mktemp()
        self.path = os.path.join(self.dir, "perc", "kmf.sqlite3")
        return super().setUp()

    @defer.inlineCallbacks
    def open_store(self):
        store = yield SqliteConferenceStore.open(self.path)
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

    def store_invitation_as_given(self, cid: str, identity: str) -> defer.Deferred[None]:
        with sqlite3.connect(self.path) as db:
            db.execute("INSERT INTO invited (conference_id, identity) VALUES (?, ?)",
                       (cid, identity))
        db.close()
        return defer.succeed(None)

    def test_file_modes(self):
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(self.path)).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        with sqlite3.connect(self.path) as db:
            self.assertEqual(db.execute("PRAGMA user_version").fetchone()[0], SCHEMA_VERSION)
            self.assertEqual(db.execute("PRAGMA journal_mode").fetchone()[0], "wal")

    def test_prepare_path_keeps_existing(self):
        path = os.path.join(self.mktemp(), "db")
        os.makedirs(os.path.dirname(path), mode=0o755)
        with open(path, "wb") as f:
            f.write(b"x")
        prepare_path(path)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"x")
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode), 0o755)

    @defer.inlineCallbacks
    def test_version_1_database_upgraded(self):
        """A KMF database of schema 1 (no admitted column) opens, keeps its roster,
        and reports nobody admitted until the KD reports again."""
        yield self.store.close()
        os.remove(self.path)
        for name in glob.glob(self.path + "-*"):
            os.remove(name)
        from perc_daemons.store.sqlite import _SCHEMA_V1
        with sqlite3.connect(self.path) as db:
            db.executescript(_SCHEMA_V1)
            db.execute("INSERT INTO conference VALUES ('conf-1', 't', 'alice@example.com',"
                       " 'running', NULL, NULL, 0, 1.0, 2)")
            db.execute("INSERT INTO roster VALUES ('conf-1', 2, 'h.p.s')")
            db.execute("PRAGMA user_version = 1")
        self.store = yield self.open_store()
        self.assertEqual((yield self.store.roster("conf-1")), (2, "h.p.s"))
        self.assertEqual((yield self.store.admitted("conf-1")), (2, frozenset()))
        with sqlite3.connect(self.path) as db:
            self.assertEqual(db.execute("PRAGMA user_version").fetchone()[0], SCHEMA_VERSION)

    @defer.inlineCallbacks
    def test_version_2_database_upgraded(self):
        """A KMF database made with the schema-2 DDL opens, gains the media_distributor
        table (version 3) and keeps everything it had."""
        yield self.store.close()
        os.remove(self.path)
        for name in glob.glob(self.path + "-*"):
            os.remove(name)
        from perc_daemons.store.sqlite import _SCHEMA_V1, _SCHEMA_V2
        with sqlite3.connect(self.path) as db:
            db.executescript(_SCHEMA_V1)
            db.executescript(_SCHEMA_V2)
            db.execute("INSERT INTO conference VALUES ('conf-1', 't', 'alice@example.com',"
                       " 'running', NULL, NULL, 0, 1.0, 2)")
            db.execute("INSERT INTO invited VALUES ('conf-1', 'bob@example.com')")
            db.execute("INSERT INTO roster VALUES ('conf-1', 2, 'h.p.s', '[]')")
            db.execute("PRAGMA user_version = 2")
            self.assertNotIn("media_distributor", [r[0] for r in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")])
        db.close()
        self.store = yield self.open_store()
        with sqlite3.connect(self.path) as db:
            self.assertEqual(db.execute("PRAGMA user_version").fetchone()[0], SCHEMA_VERSION)
            self.assertIn("media_distributor", [r[0] for r in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")])
        db.close()
        c = yield self.store.get("conf-1")
        self.assertEqual((c.invited, c.media_distributors),
                         (frozenset({"bob@example.com"}), frozenset()))
        self.assertEqual((yield self.store.roster("conf-1")), (2, "h.p.s"))
        self.assertIs((yield self.store.add_media_distributor("conf-1", MD1, T0)), True)
        self.assertEqual((yield self.store.active_media_distributors()), [MD1])

    @defer.inlineCallbacks
    def test_version_3_database_upgraded_with_policy(self):
        """A schema-3 database gains the policy columns (issue 14): the documented
        defaults, and late_join "current" where late_joiners_get_earlier_epochs was set."""
        yield self.store.close()
        os.remove(self.path)
        for name in glob.glob(self.path + "-*"):
            os.remove(name)
        from perc_daemons.store.sqlite import _SCHEMA_V1, _SCHEMA_V2, _SCHEMA_V3
        with sqlite3.connect(self.path) as db:
            for script in (_SCHEMA_V1, _SCHEMA_V2, _SCHEMA_V3):
                db.executescript(script)
            db.execute("INSERT INTO conference VALUES ('conf-1', 't', 'alice@example.com',"
                       " 'running', NULL, NULL, 0, 1.0, 2)")
            db.execute("INSERT INTO conference VALUES ('conf-2', 't', 'alice@example.com',"
                       " 'running', 5.0, 9.0, 1, 1.0, 0)")
            db.execute("PRAGMA user_version = 3")
        db.close()
        self.store = yield self.open_store()
        one = yield self.store.get("conf-1")
        two = yield self.store.get("conf-2")
        self.assertEqual((one.late_join, one.early_start, one.grace, one.rekey_interval),
                         ("none", DEFAULT_EARLY_START, DEFAULT_GRACE, DEFAULT_REKEY_INTERVAL))
        self.assertEqual((two.late_join, two.late_joiners_get_earlier_epochs, two.starts_at),
                         ("current", True, 5.0))
        with sqlite3.connect(self.path) as db:
            self.assertEqual(db.execute("PRAGMA user_version").fetchone()[0], SCHEMA_VERSION)
            with self.assertRaises(sqlite3.IntegrityError):
                db.execute("UPDATE conference SET late_join = 'all' WHERE id = 'conf-1'")
        db.close()

    @defer.inlineCallbacks
    def test_media_distributor_rows_go_with_their_conference(self):
        """No row outlives its conference: end deletes them, and so does deleting the
        conference row (a purge of old conferences, should one be written)."""
        for cid in ("conf-1", "conf-2"):
            yield self.store.create(conference(cid))
            yield self.store.add_media_distributor(cid, MD1, T0)
        yield self.store.end("conf-1", T0)

        def rows() -> list[tuple[str, str]]:
            with sqlite3.connect(self.path) as db:
                found = db.execute("SELECT conference_id, tunnel FROM media_distributor"
                                   " ORDER BY conference_id").fetchall()
            db.close()
            return found

        self.assertEqual(rows(), [("conf-2", MD1)])
        yield self.store.close()
        with sqlite3.connect(self.path) as db:
            db.execute("PRAGMA foreign_keys = ON")
            db.execute("DELETE FROM conference WHERE id = 'conf-2'")
        db.close()
        self.assertEqual(rows(), [])

    @defer.inlineCallbacks
    def test_newer_schema_refused(self):
        yield self.store.close()
        with sqlite3.connect(self.path) as db:
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        e = yield self.assertFails(SqliteConferenceStore.open(self.path), StoreError)
        self.assertIn("newer", str(e))

    @defer.inlineCallbacks
    def test_not_a_database(self):
        path = os.path.join(self.mktemp(), "junk")
        os.makedirs(os.path.dirname(path))
        with open(path, "wb") as f:
            f.write(b"this is not a database" * 100)
        e = yield self.assertFails(SqliteConferenceStore.open(path), StoreUnavailable)
        self.assertIn(path, str(e))
        self.assertIsInstance(e.cause, sqlite3.DatabaseError)

    @defer.inlineCallbacks
    def test_cannot_create_directory(self):
        blocker = os.path.join(self.mktemp())
        with open(blocker, "wb"):
            pass  # a file where the directory should be: fails even for root
        path = os.path.join(blocker, "sub", "db")
        e = yield self.assertFails(SqliteConferenceStore.open(path), StoreUnavailable)
        self.assertIn(path, str(e))
        self.assertIsInstance(e.cause, OSError)


class RedisStoreTestsBase(StoreTestsMixin):
    tls = False

    @defer.inlineCallbacks
    def setUp(self):
        if not os.access(REDIS_SERVER, os.X_OK):
            raise unittest.SkipTest(f"{REDIS_SERVER} not installed")
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.namespace = "t" + secrets.token_hex(4)
        self.server = RedisServer(self.dir, tls_files(self.dir) if self.tls else None)
        self.addCleanup(lambda: self.server.stop())
        yield self.server.start()
        yield super().setUp()

    def store_for(self, **kw):
        options = {"password": self.server.password, "namespace": self.namespace,
                   "connect_timeout": 3, "timeout": 5}
        if self.tls:
            options["tls"] = self.server.tls_options()
        options.update(kw)
        return RedisConferenceStore("127.0.0.1", self.server.port, **options)

    @defer.inlineCallbacks
    def open_store(self, **kw):
        store = self.store_for(**kw)
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
    def raw(self):
        options = {"password": self.server.password, "convertNumbers": False}
        if self.tls:
            options["ssl_context_factory"] = self.server.tls_options()
        conn = yield txredisapi.Connection("127.0.0.1", self.server.port, reconnect=False,
                                           **options)
        self.addCleanup(conn.disconnect)
        return conn

    @defer.inlineCallbacks
    def store_invitation_as_given(self, cid: str, identity: str):
        raw = yield self.raw()
        yield raw.sadd(f"{self.namespace}:conf:{cid}:invited", identity)

    @defer.inlineCallbacks
    def test_keys_namespaced(self):
        yield self.store.create(conference())
        yield self.store.add_epoch("conf-1", 1, self.wrapped("conf-1", 1), T0)
        yield self.store.set_roster("conf-1", 1, "h.p.s")
        raw = yield self.raw()
        keys = yield raw.keys("*")
        ns = self.namespace
        self.assertEqual(sorted(keys), sorted([
            f"{ns}:conferences", f"{ns}:conf:conf-1", f"{ns}:conf:conf-1:invited",
            f"{ns}:conf:conf-1:groups", f"{ns}:conf:conf-1:epochs", f"{ns}:conf:conf-1:audit",
            f"{ns}:conf:conf-1:roster", f"{ns}:audit-chained"]))
        # another namespace on the same server sees nothing
        other = yield self.open_store(namespace="elsewhere")
        listed = yield other.list()
        self.assertEqual(listed, [])

    @defer.inlineCallbacks
    def test_media_distributor_keys(self):
        """A conference's set and the shared counts; end leaves neither behind."""
        yield self.store.create(conference())
        yield self.store.create(conference("conf-2"))
        yield self.store.add_media_distributor("conf-1", MD1, T0)
        yield self.store.add_media_distributor("conf-2", MD1, T0)
        yield self.store.add_media_distributor("conf-2", MD2, T0)
        raw = yield self.raw()
        ns = self.namespace
        self.assertEqual(sorted((yield raw.smembers(f"{ns}:conf:conf-1:mds"))), [MD1])
        self.assertEqual((yield raw.hgetall(f"{ns}:media-distributors")),
                         {MD1: "2", MD2: "1"})
        yield self.store.end("conf-2", T0)
        self.assertEqual((yield raw.exists(f"{ns}:conf:conf-2:mds")), 0)
        self.assertEqual((yield raw.hgetall(f"{ns}:media-distributors")), {MD1: "1"})
        yield self.store.remove_media_distributor("conf-1", MD1, T0)
        self.assertEqual((yield raw.exists(f"{ns}:media-distributors")), 0)
        self.assertEqual((yield raw.exists(f"{ns}:conf:conf-1:mds")), 0)

    @defer.inlineCallbacks
    def test_reconnects_after_server_restart(self):
        """The same store object works again once Redis is back."""
        yield self.store.create(conference())
        yield self.server.stop("KILL")
        yield self.server.start()
        for _ in range(100):
            try:
                c = yield self.store.get("conf-1")
                break
            except StoreUnavailable:
                yield task.deferLater(reactor, 0.05, lambda: None)
        else:
            self.fail("the store did not reconnect")
        self.assertEqual(c, conference())
        k = yield self.store.add_epoch("conf-1", 1, self.wrapped("conf-1", 1), T0)
        self.assertEqual(k.epoch, 1)

    @defer.inlineCallbacks
    def test_unavailable_while_down(self):
        yield self.server.stop("KILL")
        store = self.store_for(connect_timeout=0.6)
        e = yield self.assertFails(store.connect(), StoreUnavailable)
        self.assertIn(f"127.0.0.1:{self.server.port}", str(e))
        self.assertIn("Connection refused", str(e))
        yield store.close()
        self.store.timeout = 0.3
        e = yield self.assertFails(self.store.get("conf-1"), StoreUnavailable)
        self.assertIn(f"127.0.0.1:{self.server.port}", str(e))

    @defer.inlineCallbacks
    def test_wrong_password(self):
        for password, error in (("wrong", "WRONGPASS"), (None, "NOAUTH")):
            for db in (0, 1):
                store = self.store_for(password=password, db=db)
                e = yield self.assertFails(store.connect(), StoreUnavailable)
                self.assertIn(error, str(e))
                yield store.close()
                yield self.assertFails(store.get("conf-1"), StoreUnavailable)

    @defer.inlineCallbacks
    def test_database_number(self):
        yield self.store.create(conference())
        other = yield self.open_store(db=3)
        listed = yield other.list()
        self.assertEqual(listed, [])
        yield other.create(conference("in-db-3"))
        listed = yield self.store.list()
        self.assertEqual([c.conference_id for c in listed], ["conf-1"])

    def test_bad_configuration(self):
        self.assertRaises(ValueError, RedisConferenceStore, namespace="a:b")
        self.assertRaises(ValueError, RedisConferenceStore, db=-1)

    @defer.inlineCallbacks
    def test_not_connected(self):
        e = yield self.assertFails(self.store_for().get("conf-1"), StoreUnavailable)
        self.assertIn("not connected", str(e))


class RedisStoreTests(RedisStoreTestsBase, unittest.TestCase):
    """Plain TCP with a password."""


class RedisTLSStoreTests(RedisStoreTestsBase, unittest.TestCase):
    """The same over TLS (redis-server --tls-port, server certificate from a test CA)."""

    tls = True

    @defer.inlineCallbacks
    def test_untrusted_server_certificate(self):
        other = Certificate.loadPEM(_TLS_FILES["other_ca"])
        store = self.store_for(tls=optionsForClientTLS("localhost", trustRoot=other),
                               connect_timeout=1)
        e = yield self.assertFails(store.connect(), StoreUnavailable)
        self.assertIn("certificate verify failed", str(e))

    @defer.inlineCallbacks
    def test_wrong_server_name(self):
        ca = Certificate.loadPEM(_TLS_FILES["ca"])
        store = self.store_for(tls=optionsForClientTLS("redis.example", trustRoot=ca),
                               connect_timeout=1)
        e = yield self.assertFails(store.connect(), StoreUnavailable)
        self.assertIn("redis.example", str(e))

    @defer.inlineCallbacks
    def test_plain_tcp_refused(self):
        store = self.store_for(tls=None, connect_timeout=1)
        yield self.assertFails(store.connect(), StoreUnavailable)

