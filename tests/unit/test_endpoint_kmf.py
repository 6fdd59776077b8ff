"""The endpoint's KMF client against a real perc-kmf API with OAuth, over real HTTPS.

The KMF listens on loopback with a certificate from a development CA
(:class:`~perc_daemons.devpki.DevPki`); its client file registers the public
client ``perc-endpoint`` and its user file has alice.  The endpoint logs in
with a fresh DTLS certificate as TLS client certificate (authorization code +
PKCE through the HTML form), gets an identity assertion and fetches the roster
a KD-scoped token has put.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import uuid

import jwt
from argon2 import PasswordHasher
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer, reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.trial import unittest
from twisted.web import resource
from twisted.web import server as server_module

from perc_daemons import tls
from perc_daemons.devpki import DevPki
from perc_daemons.endpoint import cli
from perc_daemons.endpoint.client import AnswerRejected, ConnectTimeout, Endpoint
from perc_daemons.endpoint.https import ClientTlsPolicy, HttpsClient, ServiceUnavailable, load_ca
from perc_daemons.endpoint.kmf import (
    KmfClient,
    KmfRefused,
    LoginFailed,
    parse_login_form,
    pkce_pair,
)
from perc_daemons.endpoint.md import JoinRefused
from perc_daemons.kmf.api import KmfApi, kmf_site
from perc_daemons.kmf.auth import AuthenticatorChain, LoginRateLimiter
from perc_daemons.kmf.auth.file import FileAuthenticator, add_user
from perc_daemons.kmf.clients import ClientRegistry
from perc_daemons.kmf.kek import KeyEncryptionKey
from perc_daemons.kmf.oauth import AuthorizationServer
from perc_daemons.kmf.signing import SigningKeys
from perc_daemons.kmf.tokens import issue_access_token
from perc_daemons.protocol import sdp
from perc_daemons.protocol.answer import sign_answer
from perc_daemons.protocol.dtls import certificate_fingerprint, generate_certificate
from perc_daemons.protocol.identity import JwksIdentityVerifier, decode_sdp_identity
from perc_daemons.protocol.participant import new_tls_id
from perc_daemons.protocol.roster import InvalidRoster, verify_roster
from perc_daemons.store import Conference, ConferenceState
from perc_daemons.store.grants_sqlite import SqliteGrantStore
from perc_daemons.store.sqlite import SqliteConferenceStore

FAST = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
DOMAIN = "localhost"
ISSUER = "https://localhost"
ALICE = "alice@localhost"
PASSWORD = "correct horse battery"
CONFERENCE = "conf-1"
CLIENTS = """\
[client.perc-endpoint]
type = "public"
grant_types = ["authorization_code", "refresh_token"]
redirect_uris = ["http://127.0.0.1/callback"]
scopes = ["identity", "keys"]
"""


class KmfFixture:
    """A real KMF with OAuth over HTTPS on loopback (``self.url``), CA in ``self.dir/pki``."""

    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        pki = DevPki(os.path.join(self.dir, "pki"))
        server = pki.issue("kmf", ["localhost"], ["127.0.0.1"])
        self.ca = load_ca(str(pki.ca_certificate_path))
        now = reactor.seconds()
        self.keys = SigningKeys.create(os.path.join(self.dir, "signing"), now)
        kek = KeyEncryptionKey.generate(os.path.join(self.dir, "kek"))
        db = os.path.join(self.dir, "kmf.sqlite3")
        self.store = yield SqliteConferenceStore.open(db)
        self.addCleanup(self.store.close)
        grants = yield SqliteGrantStore.open(db)
        self.addCleanup(grants.close)
        users = os.path.join(self.dir, "users.jsonl")
        add_user(users, "alice", PASSWORD, hasher=FAST)
        clients_path = os.path.join(self.dir, "kmf-clients.toml")
        fd = os.open(clients_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(CLIENTS)
        clients = ClientRegistry.load(clients_path, hasher=FAST)
        authenticator = AuthenticatorChain(
            [FileAuthenticator(users, DOMAIN, hasher=FAST, reactor=reactor)], clock=reactor)
        oauth = AuthorizationServer(clients, grants, self.keys, authenticator,
                                    LoginRateLimiter(user_limit=20, address_limit=50, window=60),
                                    issuer=ISSUER, audience=ISSUER)
        self.api = KmfApi(store=self.store, kek=kek, keys=self.keys, idp_domain=DOMAIN,
                          issuer=ISSUER, clock=reactor, oauth=oauth)
        context = tls.server_context_factory(str(server.certificate), str(server.private_key),
                                             request_client_certificate=True)
        self.port = reactor.listenSSL(0, kmf_site(self.api), context, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.url = f"https://localhost:{self.port.getHost().port}"
        self.certificate = generate_certificate("perc-endpoint-test")
        self.fingerprint = certificate_fingerprint(self.certificate[0])

    def client(self, certificate=None) -> KmfClient:
        client = KmfClient(reactor, self.url, ca=self.ca,
                           certificate=certificate or self.certificate)
        self.addCleanup(client.close)
        return client

    @defer.inlineCallbacks
    def running_conference(self, invited=(ALICE,)):
        now = reactor.seconds()
        yield self.store.create(Conference(conference_id=CONFERENCE, title="Weekly",
                                           initiator="admin@localhost",
                                           invited=frozenset(invited), created_at=now))
        yield self.store.set_state(CONFERENCE, ConferenceState.RUNNING, now)
        yield self.store.add_epoch(CONFERENCE, 7, b"\x00" * 40, now)



class EndpointKmfTests(KmfFixture, unittest.TestCase):
    # --- login ---------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_login_gives_certificate_bound_token(self):
        client = self.client()
        self.assertFalse(client.logged_in)
        yield defer.ensureDeferred(client.login("alice", PASSWORD))
        self.assertTrue(client.logged_in)
        self.assertEqual(client.subject, ALICE)
        token = client._token
        claims = jwt.decode(token, options={"verify_signature": False})
        self.assertEqual(claims["cnf"]["x5t#S256"], base64.urlsafe_b64encode(
            hashlib.sha256(self.certificate[0]).digest()).rstrip(b"=").decode())
        self.assertEqual(set(claims["scope"].split()), {"identity", "keys"})
        self.assertEqual(claims["client_id"], "perc-endpoint")
        self.assertNotIn(token, repr(client))

    @defer.inlineCallbacks
    def test_wrong_password_is_login_failed(self):
        client = self.client()
        for username, password in (("alice", "wrong"), ("mallory", PASSWORD)):
            with self.assertRaises(LoginFailed) as raised:
                yield defer.ensureDeferred(client.login(username, password))
            self.assertEqual(raised.exception.message, "Invalid username or password.")
        self.assertFalse(client.logged_in)

    @defer.inlineCallbacks
    def test_unknown_client_is_refused(self):
        client = self.client()
        client.client_id = "nobody"
        with self.assertRaises(KmfRefused) as raised:
            yield defer.ensureDeferred(client.login("alice", PASSWORD))
        self.assertEqual(raised.exception.status, 400)
        self.assertIn("unknown client_id", raised.exception.detail)

    @defer.inlineCallbacks
    def test_untrusted_server_certificate(self):
        other = DevPki(os.path.join(self.dir, "other-pki"))
        other.issue("x", ["localhost"])
        client = KmfClient(reactor, self.url, ca=load_ca(str(other.ca_certificate_path)),
                           certificate=self.certificate)
        self.addCleanup(client.close)
        with self.assertRaises(ServiceUnavailable) as raised:
            yield defer.ensureDeferred(client.login("alice", PASSWORD))
        self.assertIn("not trusted", str(raised.exception))

    # --- identity assertion ------------------------------------------------------------

    @defer.inlineCallbacks
    def test_assertion_verifies_for_the_certificate(self):
        client = self.client()
        yield defer.ensureDeferred(client.login("alice", PASSWORD))
        assertion = yield defer.ensureDeferred(client.assertion(CONFERENCE))
        self.assertNotIn(" ", assertion)  # compact, as the SDP a=identity carries it
        self.assertEqual(json.loads(assertion)["idp"]["domain"], DOMAIN)
        jwks = yield defer.ensureDeferred(client.jwks())
        verifier = JwksIdentityVerifier(DOMAIN, jwks)
        identity = verifier.verify(assertion, audience=CONFERENCE, fingerprint=self.fingerprint,
                                   now=reactor.seconds())
        self.assertEqual(identity, ALICE)
        # the SDP encoding round-trips
        from perc_daemons.protocol.identity import encode_sdp_identity
        self.assertEqual(decode_sdp_identity(encode_sdp_identity(assertion)), assertion)

    @defer.inlineCallbacks
    def test_token_is_useless_from_another_certificate(self):
        client = self.client()
        yield defer.ensureDeferred(client.login("alice", PASSWORD))
        thief = self.client(generate_certificate("thief"))
        thief._token = client._token
        with self.assertRaises(KmfRefused) as raised:
            yield defer.ensureDeferred(thief.assertion(CONFERENCE))
        self.assertEqual(raised.exception.status, 401)

    # --- roster --------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_roster_fetch_and_verify(self):
        yield self.running_conference()
        kd_token = issue_access_token(
            self.keys, issuer=ISSUER, subject="kd-1@localhost", audience=ISSUER,
            client_id="kd-1", scopes=["kd"], now=reactor.seconds(), lifetime=300)
        kd = HttpsClient(reactor, self.url, ClientTlsPolicy(self.ca))
        self.addCleanup(kd.close)
        members = [{"identity": ALICE, "ssrcs": [0x1234]},
                   {"identity": "bob@localhost", "ssrcs": [7, 3]}]
        code, body, _ = yield defer.ensureDeferred(kd.json(
            "PUT", f"/v1/conferences/{CONFERENCE}/roster", {"epoch": 1, "members": members},
            token=kd_token))
        self.assertEqual(code, 200, body)
        client = self.client()
        yield defer.ensureDeferred(client.login("alice", PASSWORD))
        epoch, signed = yield defer.ensureDeferred(client.roster(CONFERENCE))
        self.assertEqual((epoch, signed), (1, body["roster"]))
        roster = yield defer.ensureDeferred(
            client.verified_roster(CONFERENCE, now=reactor.seconds()))
        self.assertEqual(roster.epoch, 1)
        self.assertEqual(roster.identity_of(0x1234), ALICE)
        self.assertEqual(roster.identity_of(3), "bob@localhost")
        self.assertIsNone(roster.identity_of(99))
        # a roster signed by someone else does not verify with the KMF's JWKS
        other = SigningKeys.create(os.path.join(self.dir, "other-signing"), reactor.seconds())
        jwks = yield defer.ensureDeferred(client.jwks())
        from perc_daemons.protocol.roster import sign_roster
        forged = sign_roster(other, issuer=ISSUER, conference_id=CONFERENCE, epoch=2,
                             members=[("mallory@localhost", [0x1234])], now=reactor.seconds())
        with self.assertRaises(InvalidRoster):
            verify_roster(forged, jwks, issuer=ISSUER, conference_id=CONFERENCE,
                          now=reactor.seconds())

    @defer.inlineCallbacks
    def test_invitation_matches_the_login_whatever_the_case(self):
        # The admin invites ALICE@LOCALHOST; alice signs in as "alice" or "ALICE".
        yield self.running_conference(invited=("bob@localhost",))
        admin = HttpsClient(reactor, self.url, ClientTlsPolicy(self.ca))
        self.addCleanup(admin.close)
        admin_token = issue_access_token(
            self.keys, issuer=ISSUER, subject="admin@localhost", audience=ISSUER,
            client_id="admin", scopes=["admin", "kd"], now=reactor.seconds(), lifetime=300)
        invitations = f"/v1/conferences/{CONFERENCE}/invitations"
        code, body, _ = yield defer.ensureDeferred(admin.json(
            "POST", invitations, {"identity": "ALICE@LOCALHOST"}, token=admin_token))
        self.assertEqual(code, 200, body)
        self.assertEqual(sorted(body["invited"]), [ALICE, "bob@localhost"])
        code, body, _ = yield defer.ensureDeferred(admin.json(
            "PUT", f"/v1/conferences/{CONFERENCE}/roster",
            {"epoch": 1, "members": [{"identity": "Alice@Localhost", "ssrcs": [5]}]},
            token=admin_token))
        self.assertEqual(code, 200, body)
        for name in ("alice", "ALICE"):
            client = self.client()
            yield defer.ensureDeferred(client.login(name, PASSWORD))
            self.assertEqual(client.subject, ALICE)
            code, body, _ = yield defer.ensureDeferred(admin.json(
                "GET", f"{invitations}/{client.subject}", token=admin_token))
            self.assertEqual((code, body["identity"], body["invited"]), (200, ALICE, True))
            roster = yield defer.ensureDeferred(
                client.verified_roster(CONFERENCE, now=reactor.seconds()))
            self.assertEqual(roster.identity_of(5), ALICE)
        # the KD may ask in any case; uninviting in another case removes the invitation
        code, body, _ = yield defer.ensureDeferred(admin.json(
            "GET", f"{invitations}/aLiCe@LocalHost", token=admin_token))
        self.assertEqual((code, body["identity"], body["invited"]), (200, ALICE, True))
        code, body, _ = yield defer.ensureDeferred(admin.json(
            "DELETE", f"{invitations}/Alice@localhost", token=admin_token))
        self.assertEqual((code, body["invited"]), (200, ["bob@localhost"]))
        with self.assertRaises(KmfRefused) as raised:
            yield defer.ensureDeferred(client.roster(CONFERENCE))
        self.assertEqual(raised.exception.status, 403)
        audit = yield self.store.audit(CONFERENCE)
        self.assertEqual([(e.kind, e.identity) for e in audit if e.identity == ALICE],
                         [("invited", ALICE), ("uninvited", ALICE)])

    @defer.inlineCallbacks
    def test_roster_refused_when_not_invited(self):
        yield self.running_conference(invited=("bob@localhost",))
        client = self.client()
        yield defer.ensureDeferred(client.login("alice", PASSWORD))
        with self.assertRaises(KmfRefused) as raised:
            yield defer.ensureDeferred(client.roster(CONFERENCE))
        self.assertEqual(raised.exception.status, 403)


class LoginFormParsingTests(unittest.TestCase):
    def test_hidden_fields_and_alert(self):
        page = ('<form method="post" action="/oauth/authorize">'
                '<input type="hidden" name="oidc" value="1"><input type="hidden" name="login"'
                ' value="oidc"></form>'
                '<p role="alert">Invalid   username\n or password.</p>'
                '<form method="post" action="/oauth/authorize">'
                '<input type="hidden" name="state" value="a&amp;b&quot;">'
                '<input type="hidden" name="csrf_token" value="1.x">'
                '<input name="username"><input type="password" name="password"></form>')
        form, alerts, _ = parse_login_form(page)
        self.assertEqual(form.hidden, {"state": 'a&b"', "csrf_token": "1.x"})
        self.assertEqual(form.action, "/oauth/authorize")
        self.assertEqual(alerts, ["Invalid username or password."])
        self.assertEqual(parse_login_form("<p>no form</p>")[0], None)

    def test_pkce_pair(self):
        verifier, challenge = pkce_pair()
        self.assertTrue(43 <= len(verifier) <= 128)
        self.assertEqual(challenge, base64.urlsafe_b64encode(
            hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode())
        self.assertNotEqual(pkce_pair()[0], verifier)


class FakeMd(resource.Resource):
    """The MD's participant API, answering with an answer signed by ``kd`` (a test double of
    the MD+KD pair for the join steps before media: the real ones run in the e2e tests)."""

    isLeaf = True

    def __init__(self, kd_certificate: bytes, kd_key, media_port: int, *,
                 refuse: bool = False) -> None:
        super().__init__()
        self.kd_certificate, self.kd_key = kd_certificate, kd_key
        self.media_port = media_port
        self.refuse = refuse
        self.offers: list[str] = []
        self.bodies: list[dict] = []
        self.deletes: list[tuple[bytes, bytes | None]] = []

    def render_POST(self, request):
        body = json.loads(request.content.read())
        self.bodies.append(body)
        offer = body["offer"]
        self.offers.append(offer)
        request.setHeader(b"content-type", b"application/json")
        if self.refuse:
            request.setResponseCode(403)
            return json.dumps({"title": "Refused by the KD", "status": 403,
                               "detail": "not invited"}).encode()
        draft = sdp.make_answer(sdp.parse(offer), fingerprint=hashlib.sha256(
            self.kd_certificate).digest(), tls_id=new_tls_id(), ice_ufrag="mdufrag1",
            ice_pwd="m" * 24,
            candidates=[f"1 1 udp 2130706431 127.0.0.1 {self.media_port} typ host"])
        association = uuid.uuid4()
        signed = sign_answer(draft, offer, association_id=association.bytes,
                             conference_id=CONFERENCE, identity=ALICE,
                             certificate_chain=[self.kd_certificate], private_key=self.kd_key,
                             now=reactor.seconds())
        request.setResponseCode(201)
        return json.dumps({"association": str(association), "answer": signed,
                           "leave_token": "leave-secret"}).encode()

    def render_DELETE(self, request):
        self.deletes.append((request.path, request.getHeader(b"authorization")))
        request.setResponseCode(204)
        return b""


class Sink(DatagramProtocol):
    def __init__(self) -> None:
        self.datagrams: list[bytes] = []

    def datagramReceived(self, datagram, addr) -> None:
        self.datagrams.append(datagram)


class EndpointJoinTests(KmfFixture, unittest.TestCase):
    """Endpoint.join() through login, assertion, offer and answer verification."""

    def start_md(self, kd_name: str, *, refuse: bool = False, pki_dir: str = "pki",
                 **options):
        pki = DevPki(os.path.join(self.dir, pki_dir))
        kd = pki.issue("kd", [kd_name])
        der = x509.load_pem_x509_certificate(kd.certificate.read_bytes()).public_bytes(
            serialization.Encoding.DER)
        key = serialization.load_pem_private_key(kd.private_key.read_bytes(), None)
        self.sink = Sink()
        udp = reactor.listenUDP(0, self.sink, interface="127.0.0.1")
        self.addCleanup(udp.stopListening)
        self.md = FakeMd(der, key, udp.getHost().port, refuse=refuse)
        server = DevPki(os.path.join(self.dir, "pki")).issue("md", ["localhost"], ["127.0.0.1"])
        context = tls.server_context_factory(str(server.certificate), str(server.private_key))
        port = reactor.listenSSL(0, server_module.Site(self.md), context, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return Endpoint(reactor, kmf_url=self.url,
                        md_url=f"https://127.0.0.1:{port.getHost().port}",
                        ca=os.path.join(self.dir, "pki", "ca.crt"), conference_id=CONFERENCE,
                        user=ALICE, password=PASSWORD, kd_names=["kd.localhost"],
                        connect_timeout=1.0, **options)

    @defer.inlineCallbacks
    def test_answer_from_unexpected_kd_is_rejected(self):
        endpoint = self.start_md("kd.elsewhere")
        with self.assertRaises(AnswerRejected) as raised:
            yield endpoint.join()
        self.assertIn("UntrustedKd", str(raised.exception))
        self.assertEqual(len(self.md.offers), 1)
        self.assertIn("a=identity:", self.md.offers[0])
        self.assertEqual(len(self.md.deletes), 1)  # the MD is told at once
        self.assertEqual(self.md.deletes[0][1], b"Bearer leave-secret")
        self.assertEqual(self.sink.datagrams, [])  # nothing ever sent toward media
        yield endpoint.leave()

    @defer.inlineCallbacks
    def test_answer_signed_under_another_ca_is_rejected(self):
        endpoint = self.start_md("kd.localhost", pki_dir="rogue-pki")
        with self.assertRaises(AnswerRejected):
            yield endpoint.join()
        self.assertEqual(self.sink.datagrams, [])
        yield endpoint.leave()

    @defer.inlineCallbacks
    def test_refused_offer(self):
        endpoint = self.start_md("kd.localhost", refuse=True)
        with self.assertRaises(JoinRefused) as raised:
            yield endpoint.join()
        self.assertEqual((raised.exception.status, raised.exception.detail),
                         (403, "not invited"))
        yield endpoint.leave()

    @defer.inlineCallbacks
    def test_verified_answer_then_connect_timeout(self):
        """A valid answer: ICE checks go to the MD's candidate; nobody answers: timeout."""
        endpoint = self.start_md("kd.localhost")
        with self.assertRaises(ConnectTimeout):
            yield endpoint.join()
        self.assertEqual(endpoint.identity, ALICE)
        self.assertEqual(endpoint.answer.kd_name, "kd.localhost")
        self.assertTrue(self.sink.datagrams)
        self.assertTrue(all(d[0] in (0, 1) for d in self.sink.datagrams))  # STUN only
        self.assertEqual(len(self.md.deletes), 1)
        stats = endpoint.stats()
        self.assertEqual(stats["sent"]["packets"], 0)
        self.assertEqual(stats["identity"], ALICE)
        json.dumps(stats)
        yield endpoint.leave()

    @defer.inlineCallbacks
    def test_simulcast_offer_and_receive_preferences_in_the_join(self):
        receive = {"last_n": 2, "max_height": 360, "max_bitrate": 500_000}
        endpoint = self.start_md("kd.localhost", video="simulcast", receive=receive)
        with self.assertRaises(ConnectTimeout):
            yield endpoint.join()
        [body] = self.md.bodies
        self.assertEqual(body["receive"], receive)
        audio, video = sdp.parse(body["offer"]).media
        self.assertEqual((audio.ssrcs(), video.ssrcs()), ([endpoint.ssrc], endpoint.video_ssrcs))
        self.assertEqual(len(set(endpoint.video_ssrcs) | {endpoint.ssrc}), 4)
        yield endpoint.leave()
        plain = self.start_md("kd.localhost", audio_level=False)
        with self.assertRaises(ConnectTimeout):
            yield plain.join()
        self.assertNotIn("receive", self.md.bodies[-1])
        [audio] = sdp.parse(self.md.bodies[-1]["offer"]).media
        self.assertEqual([e.id for e in audio.extmaps()], [2])
        yield plain.leave()

    @defer.inlineCallbacks
    def test_cli_run_reports_a_refused_join(self):
        endpoint = self.start_md("kd.localhost", refuse=True)
        stats_path = os.path.join(self.dir, "stats.json")
        args = cli.parse_args(["--kmf", self.url, "--md", endpoint.md_url, "--ca",
                               endpoint.ca_path, "--conference", CONFERENCE, "--user", ALICE,
                               "--duration", "0", "--stats-json", stats_path])
        out, err = io.StringIO(), io.StringIO()
        status = yield defer.ensureDeferred(
            cli.run(args, [(ALICE, PASSWORD)], reactor, out, err))
        self.assertEqual(status, 1)
        with open(stats_path) as f:
            stats = json.load(f)
        self.assertFalse(stats["ok"])
        self.assertIn("not invited", stats["error"])
        self.assertIn("FAILED", err.getvalue())
        self.assertNotIn(PASSWORD, err.getvalue() + json.dumps(stats))


class CliUsageTests(unittest.TestCase):
    def run_main(self, argv, environ=None):
        out, err = io.StringIO(), io.StringIO()
        status = cli.main(argv, stdout=out, stderr=err, environ=environ or {})
        return status, out.getvalue(), err.getvalue()

    def ca_file(self):
        pki = DevPki(self.mktemp())
        pki.issue("x", ["localhost"])
        return str(pki.ca_certificate_path)

    def test_help(self):
        status, out, _ = self.run_main(["--help"])
        self.assertEqual(status, 0)
        for option in ("--kmf", "--md", "--ca", "--conference", "--password-file", "--load",
                       "--users-file", "--kd-name", "--tone", "--audio-wav", "--video",
                       "--record-dir", "--stats-json", "--simulcast", "--no-audio-level",
                       "--last-n", "--max-height", "--bandwidth", "--capture", "--history"):
            self.assertIn(option, out)

    def test_usage_errors_exit_2(self):
        ca = self.ca_file()
        base = ["--ca", ca, "--conference", CONFERENCE]
        for argv, environ, message in (
                (["--conference", CONFERENCE, "--user", ALICE], {"PERC_PASSWORD": "x"},
                 "--ca"),
                ([*base, "--user", ALICE], {}, "no password"),
                ([*base, "--user", ALICE, "--load", "3"], {"PERC_PASSWORD": "x"}, "{i}"),
                ([*base, "--user", ALICE, "--tone", "440", "--video"], {"PERC_PASSWORD": "x"},
                 "not allowed"),
                ([*base, "--user", ALICE, "--kmf", "http://localhost"], {"PERC_PASSWORD": "x"},
                 "https"),
                (["--ca", self.mktemp(), "--conference", CONFERENCE, "--user", ALICE],
                 {"PERC_PASSWORD": "x"}, "--ca"),
                ([*base, "--user", ALICE, "--audio-wav", self.mktemp()], {"PERC_PASSWORD": "x"},
                 "--audio-wav"),
                ([*base, "--user", "u{i}", "--load", "2", "--history", "f"],
                 {"PERC_PASSWORD": "x"}, "not --load")):
            status, _, err = self.run_main(argv, environ)
            self.assertEqual(status, 2, (argv, err))
            self.assertIn(message, err)

    def test_load_users(self):
        args = cli.parse_args(["--ca", "ca", "--conference", CONFERENCE, "--user",
                               "user{i}@localhost", "--load", "3"])
        self.assertEqual(cli.read_users(args, "pw"), [("user1@localhost", "pw"),
                                                      ("user2@localhost", "pw"),
                                                      ("user3@localhost", "pw")])
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("# users\nalice@localhost secret one\n\nbob@localhost\ncarol@localhost x\n")
        args = cli.parse_args(["--ca", "ca", "--conference", CONFERENCE, "--users-file", path,
                               "--load", "2"])
        self.assertEqual(cli.read_users(args, "shared"), [("alice@localhost", "secret one"),
                                                          ("bob@localhost", "shared")])
        args = cli.parse_args(["--ca", "ca", "--conference", CONFERENCE, "--users-file", path,
                               "--load", "4"])
        self.assertRaises(cli.UsageError, cli.read_users, args, "shared")

    def test_password_file_first_line(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("s3cret pass\nignored\n")
        args = cli.parse_args(["--ca", "ca", "--conference", CONFERENCE, "--user", ALICE,
                               "--password-file", path])
        self.assertEqual(cli.shared_password(args, {"PERC_PASSWORD": "env"}), "s3cret pass")
        args = cli.parse_args(["--ca", "ca", "--conference", CONFERENCE, "--user", ALICE])
        self.assertEqual(cli.shared_password(args, {"PERC_PASSWORD": "env"}), "env")
