"""perc-kd's handler against a real KMF over HTTPS and real DTLS endpoints.

The KMF runs in-process as in :mod:`tests.unit.test_kmf_api` (real SQLite
store, signing keys, KEK, OAuth server with a confidential "kd" client), with
a DevPki certificate for "localhost"; the KD's certificate comes from the same
CA.  The KD handler is driven at its boundary: ``tunnel_message`` with real
tunnel messages from a recording ITunnelPeer (what the MD tunnel would be),
and the endpoints are real client :class:`DtlsConnection` objects whose
datagrams travel inside TunneledDtls.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import uuid
from typing import Any

import treq
from argon2 import PasswordHasher
from twisted.internet import defer, reactor, ssl, task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from zope.interface import implementer
from zope.interface.verify import verifyObject

from perc_daemons import config, tls
from perc_daemons.devpki import DevPki
from perc_daemons.interfaces import IKeySource, ITunnelHandler, ITunnelPeer
from perc_daemons.kd.associations import KeyDistributorCore
from perc_daemons.kd.kmf_client import KmfClient, KmfRefused, KmfUnavailable
from perc_daemons.kd.offers import PERC_REQUIRED, OfferRejected, finish_answer, inspect_offer
from perc_daemons.kd.service import KdHandler, KdService, load_credentials
from perc_daemons.kmf.api import KmfApi, kmf_site
from perc_daemons.kmf.auth import AuthenticatorChain, LoginRateLimiter
from perc_daemons.kmf.auth.file import FileAuthenticator, add_user
from perc_daemons.kmf.clients import Client, ClientRegistry
from perc_daemons.kmf.kek import KeyEncryptionKey
from perc_daemons.kmf.oauth import AuthorizationServer
from perc_daemons.kmf.signing import SigningKeys
from perc_daemons.kmf.tokens import issue_access_token
from perc_daemons.metrics import Metrics
from perc_daemons.protocol import sdp
from perc_daemons.protocol.answer import verify_signed_answer
from perc_daemons.protocol.dtls import (
    ConnectionClosed,
    DtlsConfiguration,
    DtlsConnection,
    EktKeyReceived,
    HandshakeComplete,
    Role,
    certificate_fingerprint,
    format_fingerprint,
    generate_certificate,
)
from perc_daemons.protocol.ekt import EktCipher, derive_master_salt
from perc_daemons.protocol.identity import create_assertion, encode_sdp_identity
from perc_daemons.protocol.participant import build_offer
from perc_daemons.protocol.roster import verify_roster
from perc_daemons.protocol.srtp import Profile
from perc_daemons.protocol.tunnel import (
    MAX_ASSOCIATIONS,
    REASONS_ANNOUNCEMENT,
    SIGN_STATUS_BAD_OFFER,
    SIGN_STATUS_OK,
    SIGN_STATUS_REFUSED,
    Associations,
    ConferenceEnded,
    EndpointDisconnect,
    MediaKeys,
    SignAnswer,
    SignAnswerAck,
    TunneledDtls,
    refusal_code,
)
from perc_daemons.store.grants_sqlite import SqliteGrantStore
from perc_daemons.store.sqlite import SqliteConferenceStore

FAST = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
DOMAIN = "example.com"
ISSUER = "https://example.com"
ALICE, BOB, CAROL = "alice@example.com", "bob@example.com", "carol@example.com"
KD_SECRET = "kd-secret-0123456789"
KD_TLS_ID = "kdTlsId-0123456789abcdefABCDEF"
CONF = "conf-1"
ENCRYPTION_KEY = re.compile(r'keyid="(?P<keyid>[^"]+)"; aesgcm128=(?P<key>[A-Za-z0-9_-]+); '
                            r'usage="EKT"')


@implementer(ITunnelPeer)
class RecordingPeer:
    """The MD end of a tunnel as the handler sees it: records what the KD sends."""

    peer_name = "localhost"

    def __init__(self) -> None:
        self.peer_fingerprint = b"\x01" * 32
        self.sent: list[Any] = []
        self.closed: str | None = None
        self.deliver: Any = None  # where TunneledDtls goes on (the endpoints)
        #: the KD's "I read disconnect reasons" announcements (kept out of ``sent``)
        self.announced = 0

    def send(self, message: Any) -> None:
        if isinstance(message, EndpointDisconnect) and (
                message.association_id == REASONS_ANNOUNCEMENT):
            self.announced += 1
            return
        self.sent.append(message)
        if self.deliver is not None and isinstance(message, TunneledDtls):
            self.deliver(message)

    def close(self, reason: str) -> None:
        self.closed = reason

    def of(self, kind: type, aid: bytes | None = None) -> list[Any]:
        return [m for m in self.sent if isinstance(m, kind)
                and (aid is None or m.association_id == aid)]


class Endpoint:
    """A WebRTC-like endpoint: DTLS certificate, offer, client DtlsConnection."""

    def __init__(self, name: str, identity: str, ssrc: int) -> None:
        self.name = name
        self.identity = identity
        self.ssrc = ssrc
        self.cert, self.key = generate_certificate(name)
        self.fingerprint = certificate_fingerprint(self.cert)
        self.tls_id = f"{name}-tls-id-0123456789"
        self.aid = uuid.uuid4().bytes
        self.conn: DtlsConnection | None = None
        self.events: list[Any] = []
        self.received: list[bytes] = []

    def offer(self, assertion_json: str) -> str:
        lines = [
            "v=0", "o=- 1 2 IN IP4 127.0.0.1", "s=-", "t=0 0", "a=group:BUNDLE 0",
            f"a=identity:{encode_sdp_identity(assertion_json)}",
            "m=audio 9 UDP/TLS/RTP/SAVPF 111", "c=IN IP4 0.0.0.0",
            "a=ice-ufrag:EsAw", "a=ice-pwd:bP+XJMM09aR8AiX1jdukzR6Y",
            f"a=fingerprint:sha-256 {format_fingerprint(self.fingerprint)}",
            "a=setup:actpass", f"a=tls-id:{self.tls_id}", "a=mid:0", "a=sendrecv",
            "a=rtcp-mux", "a=rtpmap:111 opus/48000/2", f"a=ssrc:{self.ssrc} cname:{self.name}",
        ]
        return "".join(line + "\r\n" for line in lines)

    def start(self, kd_fingerprint: bytes, kd_tls_id: str, *,
              srtp_profiles: list[int] | None = None) -> None:
        self.conn = DtlsConnection(Role.CLIENT, DtlsConfiguration(
            self.cert, self.key,
            srtp_profiles=srtp_profiles or [Profile.DOUBLE_AEAD_AES_256_GCM_AEAD_AES_256_GCM],
            ekt_ciphers=[EktCipher.AESKW_256], expected_peer_fingerprint=kd_fingerprint,
            external_session_id=self.tls_id.encode(),
            expected_peer_external_session_id=kd_tls_id.encode()))

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


def draft_answer(offer: str, kd_fingerprint: bytes) -> str:
    """What the MD makes (contract "MD HTTPS conference API")."""
    return sdp.make_answer(
        sdp.parse(offer), fingerprint=kd_fingerprint, tls_id="placeholder-tls-id-0000",
        ice_ufrag="mdUf", ice_pwd="mdPasswordmdPassword+/",
        candidates=["1 1 udp 2130706431 127.0.0.1 3478 typ host"]).serialize()


class KmfFixture:
    """A real KMF over HTTPS (certificate from ``pki``) with a "kd" OAuth client."""

    @classmethod
    @defer.inlineCallbacks
    def start(cls, case: unittest.TestCase, directory: str, pki: DevPki):
        self = cls()
        issued = pki.issue("kmf", ["localhost"], ["127.0.0.1"])
        self.now = reactor.seconds()
        self.keys = SigningKeys.create(os.path.join(directory, "signing"), self.now)
        kek = KeyEncryptionKey.generate(os.path.join(directory, "kek"))
        db = os.path.join(directory, "kmf.sqlite3")
        self.store = yield SqliteConferenceStore.open(db)
        case.addCleanup(self.store.close)
        grants = yield SqliteGrantStore.open(db)
        case.addCleanup(grants.close)
        users = os.path.join(directory, "users.jsonl")
        add_user(users, "nobody", "unused password", hasher=FAST)
        clients = ClientRegistry([
            Client("kd", "confidential", frozenset({"client_credentials"}), (),
                   frozenset({"kd"}), FAST.hash(KD_SECRET)),
        ], hasher=FAST)
        authenticator = AuthenticatorChain(
            [FileAuthenticator(users, DOMAIN, hasher=FAST, reactor=reactor)], clock=reactor)
        oauth = AuthorizationServer(clients, grants, self.keys, authenticator,
                                    LoginRateLimiter(user_limit=3, address_limit=50, window=60),
                                    issuer=ISSUER, audience=ISSUER)
        self.api = KmfApi(store=self.store, kek=kek, keys=self.keys, idp_domain=DOMAIN,
                          issuer=ISSUER, clock=reactor, oauth=oauth, keepalive=0.5)
        context = tls.server_context_factory(str(issued.certificate), str(issued.private_key),
                                             request_client_certificate=True)
        port = reactor.listenSSL(0, kmf_site(self.api), context, interface="127.0.0.1")
        case.addCleanup(port.stopListening)
        self.url = f"https://localhost:{port.getHost().port}"
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        case.addCleanup(self.pool.closeCachedConnections)
        with open(pki.ca_certificate_path, "rb") as f:
            self.agent = Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(
                ssl.Certificate.loadPEM(f.read())), pool=self.pool)
        return self

    def token(self, scope: str) -> str:
        return issue_access_token(self.keys, issuer=ISSUER, subject=f"{scope}@example.com",
                                  audience=ISSUER, client_id="test", scopes=[scope],
                                  now=reactor.seconds(), lifetime=300)

    @defer.inlineCallbacks
    def call(self, method: str, path: str, *, scope: str = "admin", body: Any = None,
             status: int = 200):
        headers = {"Authorization": f"Bearer {self.token(scope)}"}
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(body).encode()
        response = yield treq.request(method, self.url + path, headers=headers, data=data,
                                      agent=self.agent)
        content = yield treq.content(response)
        assert response.code == status, (response.code, content)
        return response, (json.loads(content) if content else None)

    @defer.inlineCallbacks
    def conference(self, cid: str = CONF, *, invited=(ALICE, BOB, CAROL), start: bool = True,
                   late_joiners: bool = True, **policy):
        yield self.call("POST", "/v1/conferences", status=201, body={
            "id": cid, "invited": list(invited),
            "late_joiners_get_earlier_epochs": late_joiners, **policy})
        if start:
            yield self.call("POST", f"/v1/conferences/{cid}/start")

    @defer.inlineCallbacks
    def current_key(self, cid: str = CONF):
        """(epoch, key) as the key service gives them to a KD."""
        response, body = yield self.call("POST", f"/v1/conferences/{cid}/keys", scope="kd")
        [header] = response.headers.getRawHeaders("encryption-key")
        key = ENCRYPTION_KEY.fullmatch(header).group("key")
        return body["epoch"], base64.urlsafe_b64decode(key + "=" * (-len(key) % 4))

    def assertion(self, identity: str, fingerprint: bytes, audience: str = CONF, *,
                  now: float | None = None) -> str:
        return create_assertion(self.keys, idp_domain=DOMAIN, identity=identity,
                                fingerprints=[fingerprint], audience=audience,
                                now=reactor.seconds() if now is None else now)


def answer_tls_id(ack: SignAnswerAck) -> str:
    """The KD's a=tls-id in a signed answer (the same in every accepted section)."""
    [tls_id] = {m.tls_id for m in sdp.parse(ack.signed_answer).media if m.port}
    return tls_id


@defer.inlineCallbacks
def wait_for(predicate, what: str, timeout: float = 10.0):
    """Poll ``predicate`` (no timing asserted: the deadline only ends a hung test)."""
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        yield task.deferLater(reactor, 0.01, lambda: None)


class KdHandlerTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.pki = DevPki(os.path.join(self.dir, "pki"))
        self.kmf = yield KmfFixture.start(self, self.dir, self.pki)
        self.secret_file = os.path.join(self.dir, "kd-client.secret")
        with open(self.secret_file, "w") as f:
            f.write(KD_SECRET + "\n")
        os.chmod(self.secret_file, 0o600)
        self.client = KmfClient(reactor, self.kmf.url, str(self.pki.ca_certificate_path), "kd",
                                self.secret_file)
        self.addCleanup(self.client.close)
        issued = self.pki.issue("kd", ["kd.localhost"])
        self.credentials = load_credentials(str(issued.certificate), str(issued.private_key))
        self.core = KeyDistributorCore(self.credentials.chain[0], self.credentials.private_key,
                                       os.urandom(32))
        self.metrics = Metrics("perc-kd")
        self.handler = KdHandler(reactor, core=self.core, kmf=self.client, idp_domain=DOMAIN,
                                 credentials=self.credentials, metrics=self.metrics)
        self.addCleanup(self.handler.stop)
        self.peer = RecordingPeer()
        self.peer.deliver = self.to_endpoint
        self.handler.tunnel_up(self.peer)
        self.endpoints: dict[bytes, Endpoint] = {}

    def test_interfaces(self) -> None:
        verifyObject(IKeySource, self.client)
        verifyObject(ITunnelHandler, self.handler)

    # --- helpers ----------------------------------------------------------------------

    def to_endpoint(self, message: TunneledDtls) -> None:
        ep = self.endpoints.get(message.association_id)
        if ep is not None and ep.conn is not None:
            ep.received.append(message.dtls_message)
            ep.conn.receive_datagram(message.dtls_message, reactor.seconds())

    def pump(self) -> None:
        """Move endpoint datagrams into the handler until nothing is left to move."""
        for _ in range(200):
            busy = False
            for ep in list(self.endpoints.values()):
                if ep.conn is None:
                    continue
                while (event := ep.conn.next_event()) is not None:
                    ep.events.append(event)
                for datagram in ep.conn.datagrams_to_send(reactor.seconds()):
                    busy = True
                    self.handler.tunnel_message(self.peer, TunneledDtls(ep.aid, datagram))
            if not busy:
                return
        raise AssertionError("no quiescence")

    @defer.inlineCallbacks
    def sign(self, ep: Endpoint, assertion: str | None = None, *, draft: str | None = None,
             conference: str | None = None):
        """SignAnswer as the MD sends it; ``conference`` (the MD's route) defaults to
        the one the assertion is for."""
        offer = ep.offer(assertion or self.kmf.assertion(ep.identity, ep.fingerprint))
        answer = draft or draft_answer(offer, self.credentials.fingerprint)
        if conference is None:
            conference = inspect_offer(offer).conference_id
        self.handler.tunnel_message(self.peer, SignAnswer(ep.aid, conference, offer, answer))
        yield wait_for(lambda: self.peer.of(SignAnswerAck, ep.aid), "SignAnswerAck")
        [ack] = self.peer.of(SignAnswerAck, ep.aid)
        return offer, ack

    @defer.inlineCallbacks
    def join(self, ep: Endpoint, assertion: str | None = None):
        offer, ack = yield self.sign(ep, assertion)
        self.assertEqual((ack.status, ack.ok), (SIGN_STATUS_OK, True), ack.text)
        self.endpoints[ep.aid] = ep
        ep.start(self.credentials.fingerprint, answer_tls_id(ack))
        ep.conn.connect(reactor.seconds())
        self.pump()
        return offer, ack

    @defer.inlineCallbacks
    def wait_key(self, ep: Endpoint, count: int):
        def arrived() -> bool:
            self.pump()
            return len(ep.of(EktKeyReceived)) >= count
        yield wait_for(arrived, f"EKTKey #{count} at {ep.name}")
        return ep.of(EktKeyReceived)[count - 1].params

    def assertRefused(self, ack: SignAnswerAck, status: int, reason: str, aid: bytes,
                      code: str | None = None) -> None:
        """Refused with ``status``, the text ``"<code>: <reason>"`` (issue 14: every
        refusal carries a machine-readable code), nothing kept for ``aid``."""
        self.assertIsNotNone(refusal_code(ack.text), ack.text)
        got_code, _, got_reason = ack.text.partition(": ")
        self.assertEqual((ack.status, got_reason), (status, reason.partition(": ")[2]
                                                    if refusal_code(reason) else reason))
        if code is not None:
            self.assertEqual(got_code, code)
        self.assertFalse(self.core.knows(aid))

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.metrics.registry.get_sample_value(name, labels or {}) or 0.0

    # --- SignAnswer ---------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_valid_offer_gets_a_signed_answer(self):
        yield self.kmf.conference()
        alice = Endpoint("alice", ALICE, 1111)
        offer, ack = yield self.sign(alice)
        self.assertEqual(ack.status, SIGN_STATUS_OK, ack.text)
        verified = verify_signed_answer(ack.signed_answer, offer,
                                        trust_roots=[self.pki.ca_certificate],
                                        kd_names=["kd.localhost"], now=reactor.seconds())
        self.assertEqual((verified.association_id, verified.conference_id, verified.identity),
                         (alice.aid, CONF, ALICE))
        self.assertEqual(verified.kd_fingerprint, self.credentials.fingerprint)
        self.assertEqual(len(verified.kd_tls_id), 32)
        self.assertTrue(self.core.knows(alice.aid))
        # RFC 8842 s5.3: a new tls-id for every new association, never repeated
        bob = Endpoint("bob", BOB, 2222)
        _, ack2 = yield self.sign(bob)
        self.assertNotEqual(answer_tls_id(ack2), verified.kd_tls_id)
        # The conference's epoch came from the KMF (started there by /start).
        epoch, key = yield self.kmf.current_key()
        self.assertEqual(self.core.epoch(CONF), epoch)
        self.assertEqual(self.core.current_params(CONF).key, key)
        self.assertEqual(self.sample("perc_kd_sign_answers_total", {"status": "ok"}), 2)

    @defer.inlineCallbacks
    def test_uninvited_is_refused(self):
        yield self.kmf.conference(invited=(ALICE,))
        bob = Endpoint("bob", BOB, 2222)
        _, ack = yield self.sign(bob)
        self.assertRefused(ack, SIGN_STATUS_REFUSED, "not_invited: not invited", bob.aid)
        self.assertEqual(self.sample("perc_kd_sign_answers_total", {"status": "refused"}), 1)

    @defer.inlineCallbacks
    def test_assertion_for_another_fingerprint_is_refused(self):
        yield self.kmf.conference()
        alice = Endpoint("alice", ALICE, 1111)
        other = certificate_fingerprint(generate_certificate("other")[0])
        _, ack = yield self.sign(alice, self.kmf.assertion(ALICE, other))
        self.assertRefused(ack, SIGN_STATUS_REFUSED,
                           "identity assertion is for another DTLS certificate", alice.aid)

    @defer.inlineCallbacks
    def test_expired_assertion_is_refused(self):
        yield self.kmf.conference()
        alice = Endpoint("alice", ALICE, 1111)
        old = self.kmf.assertion(ALICE, alice.fingerprint, now=reactor.seconds() - 3600)
        _, ack = yield self.sign(alice, old)
        self.assertRefused(ack, SIGN_STATUS_REFUSED,
                           "identity assertion expired or not yet valid", alice.aid)

    @defer.inlineCallbacks
    def test_assertion_for_another_conference_is_checked_there(self):
        yield self.kmf.conference()
        yield self.kmf.conference("conf-2", invited=(BOB,))
        alice = Endpoint("alice", ALICE, 1111)
        _, ack = yield self.sign(alice, self.kmf.assertion(ALICE, alice.fingerprint, "conf-2"))
        self.assertRefused(ack, SIGN_STATUS_REFUSED, "not_invited: not invited", alice.aid)
        carol = Endpoint("carol", CAROL, 3333)
        _, ack = yield self.sign(carol, self.kmf.assertion(CAROL, carol.fingerprint, "nope"))
        self.assertRefused(ack, SIGN_STATUS_REFUSED, "unknown_conference: unknown conference",
                           carol.aid)

    @defer.inlineCallbacks
    def test_offer_for_another_conference_than_the_mds_is_refused(self):
        """Issue 10 item 3: bob, invited to conf-2 only, posts his conf-2 assertion to
        the MD's route for conf-1: the KD refuses, whatever the invitations say."""
        yield self.kmf.conference()
        yield self.kmf.conference("conf-2", invited=(BOB,))
        bob = Endpoint("bob", BOB, 2222)
        _, ack = yield self.sign(bob, self.kmf.assertion(BOB, bob.fingerprint, "conf-2"),
                                 conference=CONF)
        self.assertRefused(ack, SIGN_STATUS_REFUSED,
                           f"the identity assertion is for conference 'conf-2', not {CONF!r}",
                           bob.aid)
        # and alice, invited to conf-1, cannot use her conf-1 assertion at conf-2's route
        alice = Endpoint("alice", ALICE, 1111)
        _, ack = yield self.sign(alice, conference="conf-2")
        self.assertEqual(ack.status, SIGN_STATUS_REFUSED)
        self.assertFalse(self.core.knows(alice.aid))

    @defer.inlineCallbacks
    def test_conference_not_running_is_refused(self):
        yield self.kmf.conference(start=False)
        alice = Endpoint("alice", ALICE, 1111)
        _, ack = yield self.sign(alice)
        self.assertRefused(ack, SIGN_STATUS_REFUSED, "conference not running", alice.aid)
        self.assertEqual(self.peer.of(ConferenceEnded), [])  # not started is not ended

    @defer.inlineCallbacks
    def test_draft_with_another_fingerprint_is_a_bad_offer(self):
        yield self.kmf.conference()
        alice = Endpoint("alice", ALICE, 1111)
        offer = alice.offer(self.kmf.assertion(ALICE, alice.fingerprint))
        _, ack = yield self.sign(alice, draft=draft_answer(offer, b"\x07" * 32))
        self.assertRefused(ack, SIGN_STATUS_BAD_OFFER, "answer fingerprint is not this KD",
                           alice.aid)

    @defer.inlineCallbacks
    def test_kmf_unreachable_is_an_internal_error(self):
        yield self.kmf.conference()
        os.remove(self.secret_file)
        alice = Endpoint("alice", ALICE, 1111)
        _, ack = yield self.sign(alice)
        self.assertRefused(ack, 3, "kmf_unavailable: key management service unavailable", alice.aid)
        self.assertEqual(
            self.sample("perc_kd_kmf_errors_total", {"operation": "sign_answer"}), 1)

    # --- DTLS, epochs, roster ---------------------------------------------------------

    @defer.inlineCallbacks
    def test_handshake_gives_media_keys_and_the_kmf_epoch_key(self):
        yield self.kmf.conference()
        alice = Endpoint("alice", ALICE, 1111)
        yield self.join(alice)
        [done] = alice.of(HandshakeComplete)
        self.assertEqual(done.srtp_profile, Profile.DOUBLE_AEAD_AES_256_GCM_AEAD_AES_256_GCM)
        [media_keys] = self.peer.of(MediaKeys, alice.aid)
        self.assertEqual(media_keys.protection_profile, done.srtp_profile)
        params = yield self.wait_key(alice, 1)
        epoch, key = yield self.kmf.current_key()
        self.assertEqual(params.key, key)
        self.assertEqual(params.master_salt, derive_master_salt(key, CONF, epoch))
        self.assertEqual(params.cipher, EktCipher.AESKW_256)
        # The roster the KD reports lists alice and her SSRC.
        yield wait_for(lambda: self.handler._jobs == {}, "roster PUT")
        _, roster = yield self.kmf.call("GET", f"/v1/conferences/{CONF}/roster", scope="kd")
        self.assertEqual(roster["epoch"], epoch)
        self.assertEqual(self.sample("perc_kd_members"), 1)

    @defer.inlineCallbacks
    def test_leave_starts_a_new_epoch_for_the_rest(self):
        yield self.kmf.conference()
        alice, bob = Endpoint("alice", ALICE, 1111), Endpoint("bob", BOB, 2222)
        for ep in (alice, bob):
            yield self.join(ep)
            yield self.wait_key(ep, 1)
        epoch1, _ = yield self.kmf.current_key()
        bob_datagrams = len(bob.received)
        self.handler.tunnel_message(self.peer, EndpointDisconnect(bob.aid))
        params = yield self.wait_key(alice, 2)
        epoch2, key2 = yield self.kmf.current_key()
        self.assertEqual(epoch2, epoch1 + 1)
        self.assertEqual(params.key, key2)
        self.assertEqual(self.core.epoch(CONF), epoch2)
        self.assertEqual(len(bob.received), bob_datagrams)  # never sent the new key
        self.assertEqual(len(bob.of(EktKeyReceived)), 1)
        yield wait_for(lambda: self.handler._jobs == {}, "roster PUT")
        _, body = yield self.kmf.call("GET", f"/v1/conferences/{CONF}/roster", scope="kd")
        self.assertEqual(body["epoch"], epoch2)
        claims = json.loads(base64.urlsafe_b64decode(
            body["roster"].split(".")[1] + "=" * (-len(body["roster"].split(".")[1]) % 4)))
        self.assertIn(ALICE, json.dumps(claims))
        self.assertNotIn(BOB, json.dumps(claims))
        self.assertIn("1111", json.dumps(claims))
        self.assertEqual(self.sample("perc_kd_epochs_started_total"), 1)

    @defer.inlineCallbacks
    def test_rekey_interval_starts_epochs_with_nobody_joining_or_leaving(self):
        """Issue 14: rekey_interval 0.3 s: epochs 2 and 3 reach both members although the
        membership never changes (cause "timer", with the invitation re-check); a policy
        event turning it off stops the timer."""
        yield self.kmf.conference(rekey_interval=0.3)
        started: list[tuple[int, frozenset[str]]] = []
        epoch_started = self.handler.epoch_started
        self.handler.epoch_started = lambda c, e, causes, n: (
            started.append((e, causes)), epoch_started(c, e, causes, n))
        alice, bob = Endpoint("alice", ALICE, 1111), Endpoint("bob", BOB, 2222)
        for ep in (alice, bob):
            yield self.join(ep)
            yield self.wait_key(ep, 1)
        self.assertIsNotNone(self.handler.rekey_due_at(CONF))
        for ep in (alice, bob):
            params = yield self.wait_key(ep, 3)
        epoch, key = yield self.kmf.current_key()
        self.assertGreaterEqual(epoch, 3)
        self.assertIn(key, [e.params.key for e in alice.of(EktKeyReceived)])
        self.assertEqual(started[:2], [(2, frozenset({"timer"})), (3, frozenset({"timer"}))])
        self.assertIsNotNone(params)
        # Bob's invitation is withdrawn without the event: the next timed round drops him
        yield self.kmf.store.uninvite(CONF, BOB, reactor.seconds())
        count = len(bob.of(EktKeyReceived))
        yield wait_for(lambda: not self.core.identities(CONF).count(BOB), "bob removed")
        yield wait_for(lambda: self.handler._jobs == {}, "rekey done")
        self.assertLessEqual(len(bob.of(EktKeyReceived)), count + 1)
        self.handler.kmf_event("policy", {"conference": CONF, "rekey_interval": 0,
                                          "late_join": "current"})
        self.assertIsNone(self.handler.rekey_due_at(CONF))

    @defer.inlineCallbacks
    def test_early_joiner_refused_not_started(self):
        """Before starts_at - early_start the KD refuses with the code not_started, and
        keeps nothing."""
        yield self.kmf.conference(starts_at=reactor.seconds() + 3600, early_start=60)
        alice = Endpoint("alice", ALICE, 1111)
        _, ack = yield self.sign(alice)
        self.assertRefused(ack, SIGN_STATUS_REFUSED, ack.text.partition(": ")[2], alice.aid,
                           code="not_started")
        self.assertRegex(ack.text, r"^not_started: the conference admits endpoints from "
                                   r"\d+ \(POSIX time\)$")
        self.assertEqual(self.core.epoch(CONF), 0)

    @defer.inlineCallbacks
    def test_joiner_without_earlier_epochs_gets_only_a_new_one(self):
        yield self.kmf.conference(late_joiners=False)
        alice = Endpoint("alice", ALICE, 1111)
        epoch1, key1 = yield self.kmf.current_key()  # started by /start
        yield self.join(alice)
        self.assertEqual(len(self.peer.of(MediaKeys, alice.aid)), 1)  # at once
        params = yield self.wait_key(alice, 1)
        epoch2, key2 = yield self.kmf.current_key()
        self.assertEqual(epoch2, epoch1 + 1)
        self.assertEqual(params.key, key2)
        self.assertNotIn(key1, [e.params.key for e in alice.of(EktKeyReceived)])

    @defer.inlineCallbacks
    def test_conference_ended_event_closes_its_associations(self):
        yield self.kmf.conference()
        alice = Endpoint("alice", ALICE, 1111)
        yield self.join(alice)
        yield self.wait_key(alice, 1)
        self.handler.start_events(min_delay=0.05, max_delay=0.5)
        yield wait_for(lambda: self.handler.events_connected, "event stream")
        # Two more MDs: one up (it hosts none of the conference's members), one down.
        md2, md3 = RecordingPeer(), RecordingPeer()
        md2.peer_name, md3.peer_name = "md2.example.com", "md3.example.com"
        for md in (md2, md3):
            self.handler.tunnel_up(md)
        self.handler.tunnel_down(md3, "connection lost")
        yield self.kmf.call("POST", f"/v1/conferences/{CONF}/end")
        yield wait_for(lambda: self.peer.of(ConferenceEnded), "ConferenceEnded")
        # The MD hears of each association first, then of the conference; every MD
        # whose tunnel is up hears of the conference (the KD does not know who hosts it).
        sent = [m for m in self.peer.sent if not isinstance(m, TunneledDtls)]
        self.assertEqual(sent[-2:], [EndpointDisconnect(alice.aid), ConferenceEnded(CONF)])
        self.pump()
        self.assertEqual(len(alice.of(ConnectionClosed)), 1)
        self.assertFalse(self.core.knows(alice.aid))
        self.assertIsNone(self.core.current_params(CONF))
        self.assertEqual(md2.sent, [ConferenceEnded(CONF)])
        self.assertEqual(md3.sent, [])

    @defer.inlineCallbacks
    def test_conference_found_ended_without_the_event_is_ended_at_the_mds(self):
        """No event stream (missed): the KMF's answers to the KD's next request for the
        conference show the end, and the MDs are told as for the event."""
        yield self.kmf.conference()
        yield self.kmf.conference("conf-2")
        alice, bob = Endpoint("alice", ALICE, 1111), Endpoint("bob", BOB, 2222)
        for ep in (alice, bob):
            yield self.join(ep)
            yield self.wait_key(ep, 1)
        yield self.kmf.call("POST", f"/v1/conferences/{CONF}/end")
        # bob leaves: the rekey's invitation check answers "ended".
        self.handler.tunnel_message(self.peer, EndpointDisconnect(bob.aid))
        yield wait_for(lambda: self.peer.of(ConferenceEnded), "ConferenceEnded")
        self.assertEqual(self.peer.of(ConferenceEnded), [ConferenceEnded(CONF)])
        self.assertFalse(self.core.knows(alice.aid))
        self.assertTrue(self.peer.of(EndpointDisconnect, alice.aid))
        # The last member of conf-2 leaves after its end: the epoch request gets 410.
        new_epoch_refused = {"operation": "new_epoch"}
        self.assertEqual(self.sample("perc_kd_kmf_errors_total", new_epoch_refused), 0)
        carol = Endpoint("carol", CAROL, 3333)
        yield self.join(carol, self.kmf.assertion(CAROL, carol.fingerprint, "conf-2"))
        yield self.wait_key(carol, 1)
        yield self.kmf.call("POST", "/v1/conferences/conf-2/end")
        self.handler.tunnel_message(self.peer, EndpointDisconnect(carol.aid))
        yield wait_for(lambda: len(self.peer.of(ConferenceEnded)) == 2, "ConferenceEnded")
        self.assertEqual(self.peer.of(ConferenceEnded)[-1], ConferenceEnded("conf-2"))
        self.assertEqual(self.sample("perc_kd_kmf_errors_total", new_epoch_refused), 1)
        self.assertEqual(self.core.conferences(), [])

    @defer.inlineCallbacks
    def test_sign_answer_for_an_ended_conference_ends_it_at_the_mds(self):
        """A KD that missed the end (it was down) learns it from a join the MD still
        lets through: REFUSED, then ConferenceEnded so that the MD drops it too."""
        yield self.kmf.conference()
        yield self.kmf.call("POST", f"/v1/conferences/{CONF}/end")
        alice = Endpoint("alice", ALICE, 1111)
        _, ack = yield self.sign(alice)
        self.assertRefused(ack, SIGN_STATUS_REFUSED, "conference not running", alice.aid)
        self.assertEqual(self.peer.sent, [ack, ConferenceEnded(CONF)])

    @defer.inlineCallbacks
    def test_dtls_refusal_is_logged_once_and_counted_by_reason(self):
        """Issue 10 item 15: a handshake without a DOUBLE profile is refused with a reason
        in the log (once) and in perc_kd_dtls_refusals_total."""
        yield self.kmf.conference()
        alice = Endpoint("alice", ALICE, 1111)
        _, ack = yield self.sign(alice)
        lines: list[str] = []

        def observe(event: dict) -> None:
            text = formatEvent(event)
            if "refused before admission" in text:
                lines.append(text)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        self.endpoints[alice.aid] = alice
        alice.start(self.credentials.fingerprint, answer_tls_id(ack),
                    srtp_profiles=[Profile.AEAD_AES_256_GCM])  # WebRTC without PERC
        alice.conn.connect(reactor.seconds())
        self.pump()
        self.assertTrue(self.peer.of(EndpointDisconnect, alice.aid))
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("dtls_no_srtp_profile", lines[0])
        self.assertIn(ALICE, lines[0])
        self.assertEqual(self.sample("perc_kd_dtls_refusals_total",
                                     {"reason": "dtls_no_srtp_profile"}), 1)
        self.assertEqual(alice.of(EktKeyReceived), [])

    # --- withdrawn invitations (issue 10 item 1) ----------------------------------------

    @defer.inlineCallbacks
    def test_invitation_withdrawn_event_closes_and_rekeys_without_them(self):
        yield self.kmf.conference()
        alice, bob = Endpoint("alice", ALICE, 1111), Endpoint("bob", BOB, 2222)
        for ep in (alice, bob):
            yield self.join(ep)
            yield self.wait_key(ep, 1)
        self.handler.start_events(min_delay=0.05, max_delay=0.5)
        yield wait_for(lambda: self.handler.events_connected, "event stream")
        yield self.kmf.call("DELETE", f"/v1/conferences/{CONF}/invitations/{BOB}")
        yield wait_for(lambda: self.peer.of(EndpointDisconnect, bob.aid), "EndpointDisconnect")
        self.pump()
        self.assertEqual(len(bob.of(ConnectionClosed)), 1)  # close_notify reached bob
        self.assertFalse(self.core.knows(bob.aid))
        params = yield self.wait_key(alice, 2)
        epoch2, key2 = yield self.kmf.current_key()
        self.assertEqual(params.key, key2)
        self.assertEqual(len(bob.of(EktKeyReceived)), 1)  # never the new epoch's key
        yield wait_for(lambda: self.handler._jobs == {}, "roster PUT")
        admitted = yield self.kmf.store.admitted(CONF)
        self.assertEqual(admitted, (epoch2, frozenset({(ALICE, alice.fingerprint)})))

    @defer.inlineCallbacks
    def test_rekey_rechecks_invitations_without_the_event(self):
        """Defence in depth: with no event stream (missed event, another KMF), the
        next epoch key still goes to nobody whose invitation was withdrawn."""
        yield self.kmf.conference()
        alice, bob, carol = (Endpoint("alice", ALICE, 1111), Endpoint("bob", BOB, 2222),
                             Endpoint("carol", CAROL, 3333))
        for ep in (alice, bob, carol):
            yield self.join(ep)
            yield self.wait_key(ep, 1)
        yield self.kmf.store.uninvite(CONF, BOB, reactor.seconds())  # behind the KD's back
        self.handler.tunnel_message(self.peer, EndpointDisconnect(carol.aid))  # a rekey
        params = yield self.wait_key(alice, 2)
        self.assertTrue(self.peer.of(EndpointDisconnect, bob.aid))
        self.pump()
        self.assertEqual(len(bob.of(ConnectionClosed)), 1)
        self.assertNotIn(params, [e.params for e in bob.of(EktKeyReceived)])
        self.assertEqual(self.core.epoch(CONF), 2)  # one epoch, not one per removal

    @defer.inlineCallbacks
    def test_joiner_uninvited_after_signing_gets_no_key(self):
        yield self.kmf.conference()
        bob = Endpoint("bob", BOB, 2222)
        _, ack = yield self.sign(bob)
        self.assertEqual(ack.status, SIGN_STATUS_OK)
        yield self.kmf.store.uninvite(CONF, BOB, reactor.seconds())
        self.endpoints[bob.aid] = bob
        bob.start(self.credentials.fingerprint, answer_tls_id(ack))
        bob.conn.connect(reactor.seconds())
        self.pump()
        yield wait_for(lambda: self.peer.of(EndpointDisconnect, bob.aid), "EndpointDisconnect")
        self.pump()
        self.assertEqual(bob.of(EktKeyReceived), [])
        self.assertFalse(self.core.knows(bob.aid))

    @defer.inlineCallbacks
    def test_roster_report_carries_the_admitted_certificates(self):
        yield self.kmf.conference()
        alice = Endpoint("alice", ALICE, 1111)
        yield self.join(alice)
        yield self.wait_key(alice, 1)
        yield wait_for(lambda: self.handler._jobs == {}, "roster PUT")
        self.assertEqual((yield self.kmf.store.admitted(CONF)),
                         (1, frozenset({(ALICE, alice.fingerprint)})))

    @defer.inlineCallbacks
    def test_unknown_and_foreign_associations(self):
        stray = uuid.uuid4().bytes
        self.handler.tunnel_message(self.peer, TunneledDtls(stray, b"\x16\xfe\xfd" + b"\0" * 20))
        self.assertEqual(self.peer.of(EndpointDisconnect), [EndpointDisconnect(stray)])
        yield self.kmf.conference()
        alice = Endpoint("alice", ALICE, 1111)
        yield self.sign(alice)
        other = RecordingPeer()
        other.peer_name = "md2.example.com"
        self.handler.tunnel_up(other)
        self.handler.tunnel_message(other, TunneledDtls(alice.aid, b"\x16\xfe\xfd"))
        self.assertEqual(other.sent, [EndpointDisconnect(alice.aid)])
        self.handler.tunnel_message(other, EndpointDisconnect(alice.aid))
        self.assertTrue(self.core.knows(alice.aid))  # only its own MD may end it

    @defer.inlineCallbacks
    def test_associations_survive_a_tunnel_reconnection(self):
        yield self.kmf.conference()
        alice = Endpoint("alice", ALICE, 1111)
        yield self.join(alice)
        yield self.wait_key(alice, 1)
        self.handler.tunnel_down(self.peer, "connection lost")
        self.assertTrue(self.core.knows(alice.aid))
        again = RecordingPeer()  # the same MD, a new TLS connection
        again.deliver = self.to_endpoint
        self.peer = again
        self.handler.tunnel_up(again)
        bob = Endpoint("bob", BOB, 2222)
        yield self.join(bob)
        yield self.wait_key(bob, 1)
        self.handler.tunnel_message(again, EndpointDisconnect(bob.aid))
        params = yield self.wait_key(alice, 2)  # the rekey reaches alice on the new tunnel
        _, key = yield self.kmf.current_key()
        self.assertEqual(params.key, key)


    # --- Associations (the MD's list on every tunnel up) --------------------------------

    @defer.inlineCallbacks
    def roster(self, cid: str = CONF):
        """The KMF's verified roster: (epoch, [(identity, ssrcs)])."""
        _, body = yield self.kmf.call("GET", f"/v1/conferences/{cid}/roster", scope="kd")
        roster = verify_roster(body["roster"], self.kmf.keys.jwks(reactor.seconds()),
                               issuer=ISSUER, conference_id=cid, now=reactor.seconds())
        return roster.epoch, [(m.identity, m.ssrcs) for m in roster.members]

    def restart(self) -> None:
        """A fresh KD (new core, new handler) on the same KMF; the MD keeps its state."""
        self.core = KeyDistributorCore(self.credentials.chain[0], self.credentials.private_key,
                                       os.urandom(32))
        self.handler = KdHandler(reactor, core=self.core, kmf=self.client, idp_domain=DOMAIN,
                                 credentials=self.credentials)
        self.addCleanup(self.handler.stop)
        self.peer = RecordingPeer()
        self.peer.deliver = self.to_endpoint
        self.handler.tunnel_up(self.peer)

    @defer.inlineCallbacks
    def test_restarted_kd_starts_an_epoch_none_of_the_unknown_members_get(self):
        yield self.kmf.conference()
        alice, bob = Endpoint("alice", ALICE, 1111), Endpoint("bob", BOB, 2222)
        for ep in (alice, bob):
            yield self.join(ep)
            yield self.wait_key(ep, 1)
        yield wait_for(lambda: self.handler._jobs == {}, "roster PUT")
        epoch1, _ = yield self.kmf.current_key()
        self.assertEqual((yield self.roster()), (epoch1, [(ALICE, (1111,)), (BOB, (2222,))]))
        self.restart()
        self.handler.tunnel_message(self.peer, Associations([(alice.aid, CONF),
                                                            (bob.aid, CONF)]))
        yield wait_for(lambda: self.core.epoch(CONF) == epoch1 + 1, "epoch N+1 installed")
        yield wait_for(lambda: self.handler._jobs == {}, "roster PUT")
        epoch2, key2 = yield self.kmf.current_key()
        self.assertEqual(epoch2, epoch1 + 1)
        self.assertEqual(self.core.current_params(CONF).key, key2)
        # Nobody it knows: the KMF takes an empty roster for the new epoch.
        self.assertEqual((yield self.roster()), (epoch2, []))
        # The unknown associations are neither disconnected nor sent anything.
        self.assertEqual(self.peer.sent, [])
        self.pump()
        self.assertEqual([len(ep.of(EktKeyReceived)) for ep in (alice, bob)], [1, 1])
        # Listed again (the tunnel flapped): no further epoch.
        self.handler.tunnel_message(self.peer, Associations([(alice.aid, CONF),
                                                            (bob.aid, CONF)]))
        self.assertEqual(self.handler._jobs, {})
        # A joiner after the restart gets only epochs alice and bob never had.
        carol = Endpoint("carol", CAROL, 3333)
        yield self.join(carol)
        params = yield self.wait_key(carol, 1)
        self.assertNotIn(params.key, [e.params.key for ep in (alice, bob)
                                      for e in ep.of(EktKeyReceived)])
        yield wait_for(lambda: self.handler._jobs == {}, "roster PUT")
        epoch3, members = yield self.roster()
        self.assertGreaterEqual(epoch3, epoch2)
        self.assertEqual(members, [(CAROL, (3333,))])

    @defer.inlineCallbacks
    def test_unknown_association_beside_known_members_rekeys_them(self):
        yield self.kmf.conference()
        alice = Endpoint("alice", ALICE, 1111)
        yield self.join(alice)
        yield self.wait_key(alice, 1)
        yield wait_for(lambda: self.handler._jobs == {}, "roster PUT")
        epoch1, _ = yield self.kmf.current_key()
        lost = uuid.uuid4().bytes
        self.handler.tunnel_message(self.peer, Associations([(alice.aid, CONF),
                                                            (lost, CONF)]))
        params = yield self.wait_key(alice, 2)
        epoch2, key2 = yield self.kmf.current_key()
        self.assertEqual((epoch2, params.key), (epoch1 + 1, key2))
        yield wait_for(lambda: self.handler._jobs == {}, "roster PUT")
        self.assertEqual((yield self.roster()), (epoch2, [(ALICE, (1111,))]))
        self.assertEqual(self.peer.of(EndpointDisconnect), [])
        self.assertTrue(self.core.knows(alice.aid))

    @defer.inlineCallbacks
    def test_known_associations_change_nothing(self):
        yield self.kmf.conference()
        alice, bob = Endpoint("alice", ALICE, 1111), Endpoint("bob", BOB, 2222)
        for ep in (alice, bob):
            yield self.join(ep)
            yield self.wait_key(ep, 1)
        yield wait_for(lambda: self.handler._jobs == {}, "roster PUT")
        epoch1, _ = yield self.kmf.current_key()
        sent = len(self.peer.sent)
        self.handler.tunnel_message(self.peer, Associations([(alice.aid, CONF),
                                                            (bob.aid, CONF)]))
        self.assertEqual(self.handler._jobs, {})
        self.assertEqual(len(self.peer.sent), sent)
        self.assertEqual((yield self.kmf.current_key())[0], epoch1)
        self.assertEqual(self.sample("perc_kd_epochs_started_total"), 0)

    @defer.inlineCallbacks
    def test_associations_the_md_no_longer_lists_leave(self):
        """A restarted MD lists none of the earlier members: they leave, the rest rekeys."""
        yield self.kmf.conference()
        alice, bob = Endpoint("alice", ALICE, 1111), Endpoint("bob", BOB, 2222)
        for ep in (alice, bob):
            yield self.join(ep)
            yield self.wait_key(ep, 1)
        yield wait_for(lambda: self.handler._jobs == {}, "roster PUT")
        epoch1, _ = yield self.kmf.current_key()
        self.handler.tunnel_down(self.peer, "connection lost")
        again = RecordingPeer()  # the MD came back without bob (say he never got his ack)
        again.deliver = self.to_endpoint
        self.peer = again
        self.handler.tunnel_up(again)
        # a full first message is not the end of the listing: nobody leaves yet
        self.handler.tunnel_message(again, Associations(
            [(alice.aid, CONF)] + [(uuid.uuid4().bytes, CONF)
                                   for _ in range(MAX_ASSOCIATIONS - 1)]))
        self.assertTrue(self.core.knows(bob.aid))
        self.handler.tunnel_message(again, Associations())  # the end of the listing
        self.assertFalse(self.core.knows(bob.aid))
        # (the filler entries, unknown here, start an epoch of their own too)
        yield self.wait_key(alice, 2)
        yield wait_for(lambda: self.handler._jobs == {}, "rekeys and roster PUT")
        self.pump()
        epoch2, key2 = yield self.kmf.current_key()
        self.assertGreater(epoch2, epoch1)
        self.assertEqual(alice.of(EktKeyReceived)[-1].params.key, key2)
        self.assertNotIn(key2, [e.params.key for e in bob.of(EktKeyReceived)])
        self.assertEqual((yield self.roster()), (epoch2, [(ALICE, (1111,))]))

    @defer.inlineCallbacks
    def test_associations_of_a_conference_unknown_at_the_kmf_are_forgotten(self):
        self.handler.tunnel_message(self.peer, Associations([(uuid.uuid4().bytes, "nope"),
                                                            (uuid.uuid4().bytes, "bad id!")]))
        self.assertEqual(self.core.conferences(), ["nope"])
        yield wait_for(lambda: self.handler._jobs == {}, "KMF refusal")
        self.assertEqual(self.core.conferences(), [])
        self.assertEqual(self.peer.sent, [])


class OfferTests(unittest.TestCase):
    """The pure SignAnswer checks (kd/offers.py)."""

    def setUp(self) -> None:
        self.ep = Endpoint("alice", ALICE, 1111)
        self.keys = ("kid-1", generate_private())
        self.assertion = create_assertion(self.keys, idp_domain=DOMAIN, identity=ALICE,
                                          fingerprints=[self.ep.fingerprint], audience=CONF,
                                          now=1000.0)

    def test_facts(self) -> None:
        facts = inspect_offer(self.ep.offer(self.assertion))
        self.assertEqual((facts.conference_id, facts.kid, facts.fingerprint, facts.tls_id,
                          facts.ssrcs),
                         (CONF, "kid-1", self.ep.fingerprint, self.ep.tls_id, (1111,)))
        self.assertNotIn("assertion", repr(facts))

    def rejected(self, offer: str) -> OfferRejected:
        return self.assertRaises(OfferRejected, inspect_offer, offer)

    def test_bad_offers(self) -> None:
        offer = self.ep.offer(self.assertion)
        self.assertEqual(self.rejected("v=0\r\n").status, SIGN_STATUS_BAD_OFFER)
        no_identity = re.sub(r"a=identity:[^\r]*\r\n", "", offer)
        self.assertEqual((self.rejected(no_identity).status, self.rejected(no_identity).reason),
                         (SIGN_STATUS_REFUSED, f"{PERC_REQUIRED}; this offer has no a=identity"))
        no_tls_id = re.sub(r"a=tls-id:[^\r]*\r\n", "", offer)
        self.assertEqual(self.rejected(no_tls_id).reason,
                         f"{PERC_REQUIRED}; this offer has no a=tls-id")
        # a plain WebRTC client's offer (no assertion, no tls-id): told that PERC is needed
        plain = re.sub(r"a=tls-id:[^\r]*\r\n", "", no_identity)
        refusal = self.rejected(plain)
        self.assertEqual(refusal.status, SIGN_STATUS_REFUSED)
        self.assertIn("PERC is required", refusal.reason)
        self.assertIn("DOUBLE", refusal.reason)
        self.assertIn("EKT", refusal.reason)
        self.assertIn("no a=identity and no a=tls-id", refusal.reason)
        two_fps = offer.replace("a=setup:actpass", "a=fingerprint:sha-256 "
                                + format_fingerprint(b"\x05" * 32) + "\r\na=setup:actpass")
        self.assertEqual(self.rejected(two_fps).reason,
                         "offer needs exactly one sha-256 fingerprint")
        bad_identity = offer.replace("a=identity:", "a=identity:e30")
        self.assertEqual(self.rejected(bad_identity).status, SIGN_STATUS_BAD_OFFER)

    def browser_offer(self) -> str:
        """The endpoint's offer as a browser makes it: plus a bundled data channel."""
        data = ["m=application 9 UDP/DTLS/SCTP webrtc-datachannel", "c=IN IP4 0.0.0.0",
                "a=ice-ufrag:EsAw", "a=ice-pwd:bP+XJMM09aR8AiX1jdukzR6Y",
                f"a=fingerprint:sha-256 {format_fingerprint(self.ep.fingerprint)}",
                "a=setup:actpass", "a=mid:1", "a=sctp-port:5000"]  # no a=tls-id
        offer = self.ep.offer(self.assertion).replace("a=group:BUNDLE 0",
                                                      "a=group:BUNDLE 0 1")
        return offer + "".join(line + "\r\n" for line in data)

    def test_browser_offer_data_channel_stays_rejected(self) -> None:
        offer = self.browser_offer()
        facts = inspect_offer(offer)  # the data channel is not looked at
        self.assertEqual((facts.tls_id, facts.ssrcs), (self.ep.tls_id, (1111,)))
        kd_fp = b"\x09" * 32
        answer = finish_answer(draft_answer(offer, kd_fp), offer, kd_fingerprint=kd_fp,
                               kd_tls_id=KD_TLS_ID)
        self.assertEqual([(m.mid, m.media, m.port, m.tls_id) for m in answer.media],
                         [("0", "audio", 9, KD_TLS_ID), ("1", "application", 0, None)])
        self.assertEqual(answer.bundle, ("0",))
        # an MD whose draft accepts the data channel, or keeps it bundled, is refused
        draft = sdp.parse(draft_answer(offer, kd_fp))
        audio = draft.media[0]
        accepts_data = dataclasses.replace(draft, media=(audio, dataclasses.replace(
            audio, media="application", proto="UDP/DTLS/SCTP", formats=("webrtc-datachannel",),
            attributes=tuple(a if a.name != "mid" else sdp.Attribute("mid", "1")
                             for a in audio.attributes))))
        error = self.assertRaises(OfferRejected, finish_answer, accepts_data.serialize(), offer,
                                  kd_fingerprint=kd_fp, kd_tls_id=KD_TLS_ID)
        self.assertEqual(error.status, SIGN_STATUS_BAD_OFFER)
        self.assertIn("accepts mid 1, which the MD cannot relay", error.reason)
        still_bundled = draft.with_bundle(["0", "1"])
        error = self.assertRaises(OfferRejected, finish_answer, still_bundled.serialize(),
                                  offer, kd_fingerprint=kd_fp, kd_tls_id=KD_TLS_ID)
        self.assertEqual(error.reason,
                         "draft answer keeps a rejected m= section in its BUNDLE group")
        only_data = offer.replace("m=audio 9", "m=audio 0")
        self.assertEqual(self.rejected(only_data).reason,
                         "offer has no m= section the MD can relay")

    def simulcast_offer(self) -> str:
        """The reference endpoint's offer: audio (mid 0) and simulcast video (mid 1), BUNDLEd."""
        return build_offer(assertion_json=self.assertion, fingerprint=self.ep.fingerprint,
                           tls_id=self.ep.tls_id, ice_ufrag="EsAw",
                           ice_pwd="bP+XJMM09aR8AiX1jdukzR6Y", ssrc=1111, cname="alice",
                           video_ssrcs=[2001, 2002, 2003])

    def test_simulcast_offer_rosters_every_ssrc(self) -> None:
        offer = self.simulcast_offer()
        facts = inspect_offer(offer)
        self.assertEqual(facts.ssrcs, (1111, 2001, 2002, 2003))
        kd_fp = b"\x09" * 32
        answer = finish_answer(draft_answer(offer, kd_fp), offer, kd_fingerprint=kd_fp,
                               kd_tls_id=KD_TLS_ID)
        self.assertEqual([(m.mid, m.media, m.tls_id) for m in answer.media],
                         [("0", "audio", KD_TLS_ID), ("1", "video", KD_TLS_ID)])
        self.assertEqual(answer.bundle, ("0", "1"))
        self.assertEqual([(r.id, r.direction) for r in answer.media[1].rids()],
                         [("h", "recv"), ("m", "recv"), ("l", "recv")])
        self.assertEqual(answer.media[1].simulcast(),
                         sdp.Simulcast(recv=(("h",), ("m",), ("l",))))

    def test_finish_answer(self) -> None:
        offer = self.ep.offer(self.assertion)
        kd_fp = b"\x09" * 32
        answer = finish_answer(draft_answer(offer, kd_fp), offer, kd_fingerprint=kd_fp,
                               kd_tls_id=KD_TLS_ID)
        self.assertEqual([m.tls_id for m in answer.media], [KD_TLS_ID])
        error = self.assertRaises(OfferRejected, finish_answer, draft_answer(offer, kd_fp),
                                  offer, kd_fingerprint=b"\x08" * 32, kd_tls_id=KD_TLS_ID)
        self.assertEqual((error.status, error.reason),
                         (SIGN_STATUS_BAD_OFFER, "answer fingerprint is not this KD"))


def generate_private():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


class KmfClientTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.pki = DevPki(os.path.join(self.dir, "pki"))
        self.kmf = yield KmfFixture.start(self, self.dir, self.pki)
        self.secret_file = os.path.join(self.dir, "secret")
        with open(self.secret_file, "w") as f:
            f.write(KD_SECRET)
        os.chmod(self.secret_file, 0o600)

    def client(self, secret_file: str | None = None, ca: str | None = None) -> KmfClient:
        client = KmfClient(reactor, self.kmf.url, ca or str(self.pki.ca_certificate_path),
                           "kd", secret_file or self.secret_file)
        self.addCleanup(client.close)
        return client

    @defer.inlineCallbacks
    def test_token_is_cached(self):
        client = self.client()
        first = yield defer.ensureDeferred(client.token())
        second = yield defer.ensureDeferred(client.token())
        self.assertIs(first, second)

    @defer.inlineCallbacks
    def test_epochs_and_keys(self):
        client = self.client()
        yield self.kmf.conference(start=True)
        started = yield defer.ensureDeferred(client.new_epoch(CONF))
        epoch, params = yield defer.ensureDeferred(client.current_key(CONF))
        self.assertEqual(epoch, started["epoch"])
        self.assertEqual(params.spi, started["spi"])
        self.assertNotIn(params.key.hex(), repr(params))
        yield self.kmf.conference("conf-2", start=False)
        error = yield self.assertFailure(defer.ensureDeferred(client.current_key("conf-2")),
                                         KmfRefused)
        self.assertEqual((error.status, error.slug), (409, "conference-not-running"))

    @defer.inlineCallbacks
    def test_readable_secret_file_refused(self):
        os.chmod(self.secret_file, 0o644)
        error = yield self.assertFailure(defer.ensureDeferred(self.client().token()),
                                         KmfUnavailable)
        self.assertIn("mode 0644 is too open", str(error))
        self.assertNotIn(KD_SECRET, str(error))

    @defer.inlineCallbacks
    def test_wrong_secret_missing_secret_untrusted_ca(self):
        wrong = os.path.join(self.dir, "wrong")
        with open(wrong, "w") as f:
            f.write("not the secret")
        os.chmod(wrong, 0o600)
        error = yield self.assertFailure(defer.ensureDeferred(self.client(wrong).token()),
                                         KmfRefused)
        self.assertEqual((error.status, error.slug), (401, "invalid_client"))
        self.assertNotIn("not the secret", str(error))
        missing = os.path.join(self.dir, "missing")
        error = yield self.assertFailure(defer.ensureDeferred(self.client(missing).token()),
                                         KmfUnavailable)
        self.assertIn("missing", str(error))
        other_ca = DevPki(os.path.join(self.dir, "other-pki"))
        yield self.assertFailure(
            defer.ensureDeferred(self.client(ca=str(other_ca.ca_certificate_path)).jwks()),
            KmfUnavailable)


class KdServiceStartTests(unittest.TestCase):
    """KdService with missing files still starts (the shipped default config)."""

    @defer.inlineCallbacks
    def test_default_config_starts_and_idles(self):
        cfg = config.validate("kd", "kd.toml", {})
        service = KdService(reactor, cfg, Metrics("perc-kd"))
        self.assertIsNone(service.handler)
        self.assertIn("/etc/perc/tls/kd.crt", service.problem)
        service.startService()
        yield service.stopService()

    @defer.inlineCallbacks
    def test_credentials_without_mds_idle(self):
        directory = os.path.abspath(self.mktemp())
        pki = DevPki(directory)
        issued = pki.issue("kd", ["kd.localhost"])
        cfg = config.validate("kd", "kd.toml", {"tunnel": {
            "certificate": str(issued.certificate), "private_key": str(issued.private_key),
            "ca_file": str(pki.ca_certificate_path)}})
        service = KdService(reactor, cfg, Metrics("perc-kd"))
        self.assertIsNotNone(service.handler)
        service.startService()
        yield service.stopService()


@implementer(ITunnelHandler)
class MdSide:
    """The MD's tunnel handler in the test: records what arrives from the KD."""

    def __init__(self) -> None:
        self.peer: Any = None
        self.received: list[Any] = []

    def tunnel_up(self, peer: Any) -> None:
        self.peer = peer

    def tunnel_message(self, peer: Any, message: Any) -> None:
        self.received.append(message)

    def tunnel_down(self, peer: Any, reason: str) -> None:
        if self.peer is peer:
            self.peer = None


class KdServiceTunnelTests(unittest.TestCase):
    """KdService from its configuration, through a real MdTunnelServer (TLS 1.3)."""

    timeout = 30

    @defer.inlineCallbacks
    def test_sign_answer_over_a_real_tunnel(self):
        from perc_daemons.md.tunnel import MdTunnelServer

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        pki = DevPki(os.path.join(directory, "pki"))
        kmf = yield KmfFixture.start(self, directory, pki)
        yield kmf.conference()
        secret_file = os.path.join(directory, "kd-client.secret")
        with open(secret_file, "w") as f:
            f.write(KD_SECRET)
        os.chmod(secret_file, 0o600)
        kd_issued = pki.issue("kd", ["kd.localhost"])
        md_issued = pki.issue("md", ["localhost"], ["127.0.0.1"])
        kd_fp = load_credentials(str(kd_issued.certificate),
                                 str(kd_issued.private_key)).fingerprint
        md_side = MdSide()
        server = MdTunnelServer(reactor, bind="127.0.0.1", port=0,
                                certificate=str(md_issued.certificate),
                                private_key=str(md_issued.private_key),
                                is_trusted_kd=lambda fp: fp == kd_fp, handler=md_side,
                                metrics=None)
        server.startService()
        self.addCleanup(server.stopService)
        cfg = config.validate("kd", "kd.toml", {
            "tunnel": {"mds": [f"localhost:{server.port}"],
                       "certificate": str(kd_issued.certificate),
                       "private_key": str(kd_issued.private_key),
                       "ca_file": str(pki.ca_certificate_path)},
            "kmf": {"url": kmf.url, "ca_file": str(pki.ca_certificate_path),
                    "client_secret_file": secret_file},
            "idp": {"domain": DOMAIN}})
        service = KdService(reactor, cfg, Metrics("perc-kd"))
        service.startService()
        self.addCleanup(service.stopService)
        yield wait_for(lambda: md_side.peer is not None, "tunnel up")
        alice = Endpoint("alice", ALICE, 1111)
        offer = alice.offer(kmf.assertion(ALICE, alice.fingerprint))
        md_side.peer.send(SignAnswer(alice.aid, CONF, offer, draft_answer(offer, kd_fp)))
        yield wait_for(lambda: len(md_side.received) >= 2, "SignAnswerAck")
        # first, on tunnel up: the KD reads the reasons of our EndpointDisconnects
        announcement, ack = md_side.received
        self.assertEqual(announcement, EndpointDisconnect(REASONS_ANNOUNCEMENT))
        self.assertEqual(ack.status, SIGN_STATUS_OK, ack.text)
        verified = verify_signed_answer(ack.signed_answer, offer,
                                        trust_roots=[pki.ca_certificate],
                                        kd_names=["kd.localhost"], now=reactor.seconds())
        self.assertEqual(verified.identity, ALICE)
        self.assertEqual(verified.kd_tls_id, answer_tls_id(ack))
        # The DTLS handshake through the tunnel ends with MediaKeys at the MD.
        alice.start(kd_fp, verified.kd_tls_id)
        alice.conn.connect(reactor.seconds())

        seen = [0]

        def step() -> bool:
            fresh, seen[0] = md_side.received[seen[0]:], len(md_side.received)
            for message in fresh:
                if isinstance(message, TunneledDtls):
                    alice.conn.receive_datagram(message.dtls_message, reactor.seconds())
            while (event := alice.conn.next_event()) is not None:
                alice.events.append(event)
            for datagram in alice.conn.datagrams_to_send(reactor.seconds()):
                md_side.peer.send(TunneledDtls(alice.aid, datagram))
            return bool(alice.of(EktKeyReceived))
        yield wait_for(step, "EKTKey through the tunnel")
        self.assertEqual(len([m for m in md_side.received if isinstance(m, MediaKeys)]), 1)
        _, key = yield kmf.current_key()
        self.assertEqual(alice.of(EktKeyReceived)[0].params.key, key)
        yield service.stopService()
