"""The KMF HTTPS API through real TLS on loopback, with real tokens, keys and SQLite.

The server certificate is a generated one the client trusts explicitly; each
client presents a self-signed "DTLS" certificate as its TLS client certificate,
and access tokens are minted with the real signer (bound to one certificate
with ``cnf`` where the route wants that).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from typing import Any

import treq
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer, reactor, ssl, task
from twisted.internet.protocol import Protocol
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from perc_daemons import tls
from perc_daemons.kmf.api import KmfApi, kmf_site
from perc_daemons.kmf.kek import KeyEncryptionKey
from perc_daemons.kmf.signing import SigningKeys
from perc_daemons.kmf.tokens import issue_access_token
from perc_daemons.protocol.dtls.crypto import format_fingerprint
from perc_daemons.protocol.identity import JwksIdentityVerifier
from perc_daemons.protocol.roster import verify_roster
from perc_daemons.store import ConferenceState
from perc_daemons.store.sqlite import SqliteConferenceStore

DOMAIN = "example.com"
ISSUER = "https://example.com"
ALICE = "alice@example.com"
BOB = "bob@example.com"
CAROL = "carol@example.com"
MAX_BODY = 4096
PROBLEM = "application/problem+json"
ENCRYPTION_KEY = re.compile(
    r'keyid="(?P<keyid>[^"]+)"; aesgcm128=(?P<key>[A-Za-z0-9_-]+); usage="EKT"')


class Cert:
    """A generated certificate and key on disk (server) or in memory (client)."""

    def __init__(self, directory: str, name: str) -> None:
        self.cert_path = os.path.join(directory, f"{name}.crt")
        self.key_path = os.path.join(directory, f"{name}.key")
        tls.generate_self_signed(self.cert_path, self.key_path)
        with open(self.cert_path, "rb") as f:
            self.cert_pem = f.read()
        with open(self.key_path, "rb") as f:
            self.key_pem = f.read()
        self.der = x509.load_pem_x509_certificate(self.cert_pem).public_bytes(
            serialization.Encoding.DER)
        self.digest = hashlib.sha256(self.der).digest()
        self.fingerprint = self.digest.hex(":").upper()


@implementer(IPolicyForHTTPS)
class Policy:
    def __init__(self, server: Cert, client: Cert | None) -> None:
        kwargs: dict[str, Any] = {"trustRoot": ssl.Certificate.loadPEM(server.cert_pem)}
        if client is not None:
            kwargs["clientCertificate"] = ssl.PrivateCertificate.loadPEM(
                client.cert_pem + client.key_pem)
        self._options = ssl.optionsForClientTLS("localhost", **kwargs)

    def creatorForNetloc(self, hostname: bytes, port: int):
        return self._options


class StreamReader(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason) -> None:
        self.done.callback(None)


class KmfApiTests(unittest.TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.server_cert = Cert(self.dir, "server")
        self.alice_cert = Cert(self.dir, "alice-dtls")
        self.other_cert = Cert(self.dir, "other-dtls")
        self.now = reactor.seconds()
        self.keys = SigningKeys.create(os.path.join(self.dir, "signing"), self.now)
        self.kek = KeyEncryptionKey.generate(os.path.join(self.dir, "kek"))
        self.store = yield self.open_store()
        self.addCleanup(self.store.close)
        self.api = KmfApi(store=self.store, kek=self.kek, keys=self.keys, idp_domain=DOMAIN,
                          issuer=ISSUER, clock=reactor, keepalive=0.05)
        context = tls.server_context_factory(self.server_cert.cert_path,
                                             self.server_cert.key_path,
                                             request_client_certificate=True)
        self.port = reactor.listenSSL(0, kmf_site(self.api, max_body=MAX_BODY), context,
                                      interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.base = f"https://127.0.0.1:{self.port.getHost().port}"
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.pool.closeCachedConnections)

    def open_store(self):
        return SqliteConferenceStore.open(os.path.join(self.dir, "kmf.sqlite3"))

    # --- helpers ----------------------------------------------------------------

    def token(self, scopes: list[str], *, subject: str = ALICE, bound_to: Cert | None = None,
              keys: SigningKeys | None = None, now: float | None = None,
              lifetime: int = 300) -> str:
        return issue_access_token(
            keys or self.keys, issuer=ISSUER, subject=subject, audience=ISSUER,
            client_id="client-1", scopes=scopes, now=self.now if now is None else now,
            lifetime=lifetime,
            certificate_thumbprint=bound_to.digest if bound_to is not None else None)

    def alice(self, scope: str = "keys") -> str:
        return self.token([scope], bound_to=self.alice_cert)

    def admin(self) -> str:
        return self.token(["admin"], subject="admin@example.com")

    def kd(self) -> str:
        return self.token(["kd"], subject="kd-1@example.com")

    @defer.inlineCallbacks
    def call(self, method: str, path: str, *, token: str | None = None, body: Any = None,
             raw: bytes | None = None, content_type: str = "application/json",
             cert: Cert | str | None = "alice"):
        client_cert = self.alice_cert if cert == "alice" else cert
        agent = Agent(reactor, contextFactory=Policy(self.server_cert, client_cert),
                      pool=self.pool)
        headers = {}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
        if data is not None:
            headers["Content-Type"] = content_type
        response = yield treq.request(method, self.base + path, headers=headers, data=data,
                                      agent=agent)
        content = yield treq.content(response)
        return response, content

    @defer.inlineCallbacks
    def ok(self, method: str, path: str, status: int = 200, **kwargs):
        response, content = yield self.call(method, path, **kwargs)
        self.assertEqual(response.code, status, content)
        if content:
            self.assertEqual(response.headers.getRawHeaders("content-type")[0].split(";")[0],
                             "application/json")
            return response, json.loads(content)
        return response, None

    @defer.inlineCallbacks
    def problem(self, method: str, path: str, status: int, slug: str, **kwargs):
        response, content = yield self.call(method, path, **kwargs)
        self.assertEqual(response.code, status, content)
        self.assertEqual(response.headers.getRawHeaders("content-type"), [PROBLEM])
        body = json.loads(content)
        self.assertEqual(body["type"], f"urn:perc:problem:{slug}", body)
        self.assertEqual(body["status"], status)
        self.assertIsInstance(body["title"], str)
        self.assertTrue(body["title"])
        return response, body

    @defer.inlineCallbacks
    def running_conference(self, cid: str = "conf-1", invited: tuple[str, ...] = (ALICE,)):
        yield self.ok("POST", "/v1/conferences", 201, token=self.admin(),
                      body={"id": cid, "title": "Weekly", "invited": list(invited)})
        _, started = yield self.ok("POST", f"/v1/conferences/{cid}/start", token=self.admin())
        return started

    @defer.inlineCallbacks
    def admit(self, epoch: int, members: list[tuple[str, Cert]], cid: str = "conf-1"):
        """What the KD reports once it has admitted ``members`` over DTLS."""
        yield self.ok("PUT", f"/v1/conferences/{cid}/roster", token=self.kd(), body={
            "epoch": epoch, "members": [
                {"identity": who, "ssrcs": [n + 1],
                 "fingerprints": [format_fingerprint(cert.digest)]}
                for n, (who, cert) in enumerate(members)]})

    def parse_key(self, response) -> tuple[str, bytes]:
        [header] = response.headers.getRawHeaders("encryption-key")
        match = ENCRYPTION_KEY.fullmatch(header)
        self.assertIsNotNone(match, header)
        key = match.group("key")
        return match.group("keyid"), base64.urlsafe_b64decode(key + "=" * (-len(key) % 4))

    # --- JWKS ---------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_jwks(self):
        response, content = yield self.call("GET", "/.well-known/jwks.json", cert=None)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"),
                         ["application/jwk-set+json"])
        jwks = json.loads(content)
        self.assertEqual(jwks, self.keys.jwks(self.now))
        self.assertEqual([k["kid"] for k in jwks["keys"]], [self.keys.active.kid])
        self.assertNotIn("d", jwks["keys"][0])

    # --- identity assertions ------------------------------------------------------

    @defer.inlineCallbacks
    def test_identity_assertion(self):
        other = "11:" * 31 + "22"
        _, body = yield self.ok(
            "POST", "/v1/identity/assertions", 201, token=self.alice("identity"),
            body={"fingerprints": [other, self.alice_cert.fingerprint], "audience": "kd"})
        self.assertEqual(body["idp"], {"domain": DOMAIN, "protocol": "default"})
        verifier = JwksIdentityVerifier(DOMAIN, self.keys.jwks(self.now))
        identity = verifier.verify(json.dumps(body), "kd", self.alice_cert.digest,
                                   reactor.seconds())
        self.assertEqual(identity, ALICE)
        # a conference id is an audience too
        _, body = yield self.ok(
            "POST", "/v1/identity/assertions", 201, token=self.alice("identity"),
            body={"fingerprints": [self.alice_cert.fingerprint], "audience": "conf-9"})
        self.assertEqual(verifier.verify(json.dumps(body), "conf-9", self.alice_cert.digest,
                                         reactor.seconds()), ALICE)

    @defer.inlineCallbacks
    def test_identity_assertion_token_errors(self):
        path = "/v1/identity/assertions"
        body = {"fingerprints": [self.alice_cert.fingerprint], "audience": "kd"}
        response, problem = yield self.problem("POST", path, 401, "unauthorized", body=body)
        self.assertEqual(response.headers.getRawHeaders("www-authenticate"),
                         ['Bearer realm="perc-kmf"'])
        # a plain bearer token (no cnf) is not enough here
        _, problem = yield self.problem("POST", path, 401, "unauthorized", body=body,
                                        token=self.token(["identity"]))
        self.assertIn("certificate", problem["detail"])
        # bound to another certificate
        response, problem = yield self.problem(
            "POST", path, 401, "unauthorized", body=body,
            token=self.token(["identity"], bound_to=self.other_cert))
        self.assertIn("another certificate", problem["detail"])
        self.assertIn('error="invalid_token"',
                      response.headers.getRawHeaders("www-authenticate")[0])
        # bound, but no client certificate presented
        _, problem = yield self.problem("POST", path, 401, "unauthorized", body=body,
                                        token=self.alice("identity"), cert=None)
        self.assertIn("none presented", problem["detail"])
        # expired
        _, problem = yield self.problem(
            "POST", path, 401, "unauthorized", body=body,
            token=self.token(["identity"], bound_to=self.alice_cert, now=self.now - 600))
        self.assertIn("expired", problem["detail"])
        # forged: signed by a key the KMF does not have
        forger = SigningKeys.create(os.path.join(self.dir, "forger"), self.now)
        yield self.problem("POST", path, 401, "unauthorized", body=body,
                           token=self.token(["identity"], bound_to=self.alice_cert,
                                            keys=forger))
        # tampered payload
        head, payload, signature = self.alice("identity").split(".")
        yield self.problem("POST", path, 401, "unauthorized", body=body,
                           token=f"{head}.{payload[:-2]}AA.{signature}")
        yield self.problem("POST", path, 401, "unauthorized", body=body, token="not-a-jwt")
        # wrong scope
        response, problem = yield self.problem("POST", path, 403, "insufficient-scope",
                                               body=body, token=self.alice("keys"))
        self.assertIn('error="insufficient_scope"',
                      response.headers.getRawHeaders("www-authenticate")[0])

    @defer.inlineCallbacks
    def test_identity_assertion_body_errors(self):
        path = "/v1/identity/assertions"
        token = self.alice("identity")
        # the presented certificate is not among the fingerprints
        yield self.problem(
            "POST", path, 403, "fingerprint-not-presented", token=token,
            body={"fingerprints": [self.other_cert.fingerprint], "audience": "kd"})
        for bad in ({"fingerprints": [], "audience": "kd"},
                    {"fingerprints": ["zz"], "audience": "kd"},
                    {"fingerprints": ["AA:BB"], "audience": "kd"},
                    {"fingerprints": [self.alice_cert.fingerprint], "audience": ""},
                    {"fingerprints": [self.alice_cert.fingerprint]},
                    {"fingerprints": self.alice_cert.fingerprint, "audience": "kd"}):
            yield self.problem("POST", path, 400, "invalid-request", token=token, body=bad)
        yield self.problem("POST", path, 400, "malformed-json", token=token, raw=b'{"a":')
        yield self.problem("POST", path, 400, "malformed-json", token=token, raw=b"[1]")
        yield self.problem("POST", path, 400, "malformed-json", token=token, raw=b"\xff")
        yield self.problem("POST", path, 400, "malformed-json", token=token, raw=b'{"a":NaN}')
        # nesting deeper than the parser's stack: 400, not a 500 with a traceback
        for raw in (b"[" * (MAX_BODY - 1), b'{"a":[' * (MAX_BODY // 6)):
            _, problem = yield self.problem("POST", path, 400, "malformed-json", token=token,
                                            raw=raw)
            self.assertIn("nested deeper than", problem["detail"])
            yield self.problem("POST", "/v1/conferences", 400, "malformed-json",
                               token=self.admin(), raw=raw)
        yield self.problem("POST", path, 415, "unsupported-media-type", token=token,
                           raw=b"{}", content_type="text/plain")
        yield self.problem("POST", path, 413, "body-too-large", token=token,
                           body={"fingerprints": ["AA"] * MAX_BODY, "audience": "kd"})
        # an identity outside the IdP's domain gets no assertion
        yield self.problem(
            "POST", path, 403, "foreign-identity",
            token=self.token(["identity"], subject="eve@elsewhere.org",
                             bound_to=self.alice_cert),
            body={"fingerprints": [self.alice_cert.fingerprint], "audience": "kd"})

    # --- conferences ----------------------------------------------------------------

    @defer.inlineCallbacks
    def test_conference_lifecycle(self):
        admin = self.admin()
        response, created = yield self.ok(
            "POST", "/v1/conferences", 201, token=admin,
            body={"id": "conf-1", "title": "Weekly", "invited": [ALICE],
                  "invited_groups": ["cn=staff,dc=example,dc=com"], "starts_at": 100,
                  "ends_at": 200, "late_joiners_get_earlier_epochs": True})
        self.assertEqual(response.headers.getRawHeaders("location"), ["/v1/conferences/conf-1"])
        self.assertEqual(created["state"], "scheduled")
        self.assertEqual(created["initiator"], "admin@example.com")
        self.assertEqual(created["invited_groups"], ["cn=staff,dc=example,dc=com"])
        self.assertIs(created["late_joiners_get_earlier_epochs"], True)
        yield self.problem("POST", "/v1/conferences", 409, "conference-exists", token=admin,
                           body={"id": "conf-1", "title": "again"})
        for bad in ({"title": "no id"}, {"id": "bad id!"}, {"id": "c2", "invited": ["x"]},
                    {"id": "c2", "invited": "alice@example.com"},
                    {"id": "c2", "starts_at": 10, "ends_at": 5},
                    {"id": "c2", "surprise": 1}):
            yield self.problem("POST", "/v1/conferences", 400, "invalid-request", token=admin,
                               body=bad)
        _, listed = yield self.ok("GET", "/v1/conferences", token=admin)
        self.assertEqual([c["id"] for c in listed["conferences"]], ["conf-1"])
        _, listed = yield self.ok("GET", "/v1/conferences?state=running", token=admin)
        self.assertEqual(listed["conferences"], [])
        yield self.problem("GET", "/v1/conferences?state=nope", 400, "invalid-request",
                           token=admin)
        _, shown = yield self.ok("GET", "/v1/conferences/conf-1", token=admin)
        self.assertEqual(shown["epoch"], None)
        yield self.problem("GET", "/v1/conferences/nope", 404, "not-found", token=admin)
        # invitations
        _, shown = yield self.ok("POST", "/v1/conferences/conf-1/invitations", token=admin,
                                 body={"identity": BOB})
        self.assertEqual(shown["invited"], [ALICE, BOB])
        yield self.problem("POST", "/v1/conferences/conf-1/invitations", 400,
                           "invalid-request", token=admin, body={"identity": "bob"})
        _, shown = yield self.ok("DELETE", f"/v1/conferences/conf-1/invitations/{BOB}",
                                 token=admin)
        self.assertEqual(shown["invited"], [ALICE])
        yield self.problem("DELETE", "/v1/conferences/nope/invitations/" + BOB, 404,
                           "not-found", token=admin)
        # start: RUNNING with a first epoch
        _, started = yield self.ok("POST", "/v1/conferences/conf-1/start", token=admin)
        self.assertEqual((started["state"], started["epoch"]), ("running", 1))
        _, again = yield self.ok("POST", "/v1/conferences/conf-1/start", token=admin)
        self.assertEqual(again["epoch"], 1)
        epochs = yield self.store.epochs("conf-1")
        self.assertEqual([e.epoch for e in epochs], [1])
        # end
        _, ended = yield self.ok("POST", "/v1/conferences/conf-1/end", token=admin)
        self.assertEqual(ended["state"], "ended")
        self.assertEqual((yield self.store.epochs("conf-1")), [])
        yield self.problem("POST", "/v1/conferences/conf-1/start", 409, "invalid-transition",
                           token=admin)
        yield self.problem("POST", "/v1/conferences/conf-1/invitations", 410,
                           "conference-ended", token=admin, body={"identity": BOB})
        yield self.problem("POST", "/v1/conferences/nope/end", 404, "not-found", token=admin)

    @defer.inlineCallbacks
    def test_admin_routes_need_admin_scope(self):
        for method, path in (("GET", "/v1/conferences"), ("POST", "/v1/conferences"),
                             ("GET", "/v1/conferences/c"), ("POST", "/v1/conferences/c/start"),
                             ("POST", "/v1/conferences/c/end"),
                             ("POST", "/v1/conferences/c/invitations"),
                             ("DELETE", f"/v1/conferences/c/invitations/{BOB}"),
                             ("POST", "/v1/conferences/c/media-distributors"),
                             ("DELETE", "/v1/conferences/c/media-distributors/md1:4443")):
            yield self.problem(method, path, 401, "unauthorized", body={})
            yield self.problem(method, path, 403, "insufficient-scope", token=self.kd(),
                               body={})

    @defer.inlineCallbacks
    def test_unknown_route_and_method(self):
        yield self.problem("GET", "/v1/nothing", 404, "not-found")
        response, _ = yield self.problem("DELETE", "/v1/conferences", 405,
                                         "method-not-allowed", token=self.admin())
        self.assertEqual(response.headers.getRawHeaders("allow"), ["GET, POST"])

    # --- key service ------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_key_service(self):
        yield self.running_conference()
        yield self.admit(1, [(ALICE, self.alice_cert)])
        response, body = yield self.ok("POST", "/v1/conferences/conf-1/keys",
                                       token=self.alice())
        self.assertEqual(response.headers.getRawHeaders("cache-control"), ["no-store"])
        keyid, key = self.parse_key(response)
        self.assertEqual(keyid, "conf-1/1")
        [stored] = yield self.store.epochs("conf-1")
        self.assertEqual(key, self.kek.unwrap(stored.wrapped_key, conference_id="conf-1",
                                              epoch=1))
        self.assertEqual(len(key), 32)
        self.assertEqual(body, {"conference": "conf-1", "epoch": 1, "spi": stored.spi,
                                "ekt_cipher": "AESKW_256"})
        self.assertNotIn(base64.urlsafe_b64encode(key).rstrip(b"=").decode(),
                         json.dumps(body))
        # the KD (client credentials, scope kd) gets it too, without a bound token
        response, _ = yield self.ok("POST", "/v1/conferences/conf-1/keys", token=self.kd(),
                                    cert=None)
        self.assertEqual(self.parse_key(response), ("conf-1/1", key))
        # a new epoch (KD) changes the key
        _, epoch = yield self.ok("POST", "/v1/conferences/conf-1/epochs", 201, token=self.kd())
        self.assertEqual((epoch["epoch"], epoch["spi"]), (2, (stored.spi + 1) & 0xFFFF))
        # not before the KD reports whom it admitted to epoch 2
        yield self.problem("POST", "/v1/conferences/conf-1/keys", 403, "not-admitted",
                           token=self.alice())
        yield self.admit(2, [(ALICE, self.alice_cert)])
        response, _ = yield self.ok("POST", "/v1/conferences/conf-1/keys", token=self.alice())
        keyid2, key2 = self.parse_key(response)
        self.assertEqual(keyid2, "conf-1/2")
        self.assertNotEqual(key2, key)
        current = yield self.store.current_epoch("conf-1")
        self.assertEqual(key2, self.kek.unwrap(current.wrapped_key, conference_id="conf-1",
                                               epoch=2))

    @defer.inlineCallbacks
    def test_key_service_refusals(self):
        yield self.running_conference(invited=(BOB,))
        path = "/v1/conferences/conf-1/keys"
        _, problem = yield self.problem("POST", path, 403, "not-invited", token=self.alice())
        self.assertEqual(problem["detail"], "this identity is not invited to the conference")
        yield self.problem("POST", path, 401, "unauthorized")
        # keys scope needs a bound token
        yield self.problem("POST", path, 401, "unauthorized", token=self.token(["keys"]))
        yield self.problem("POST", path, 401, "unauthorized",
                           token=self.token(["keys"], subject=BOB, bound_to=self.other_cert))
        yield self.problem("POST", path, 403, "insufficient-scope", token=self.alice("identity"))
        yield self.problem("POST", "/v1/conferences/nope/keys", 404, "not-found",
                           token=self.alice())
        yield self.problem("POST", "/v1/conferences/no%20pe/keys", 404, "not-found",
                           token=self.alice())
        # scheduled, not yet running
        yield self.ok("POST", "/v1/conferences", 201, token=self.admin(),
                      body={"id": "later", "invited": [ALICE]})
        yield self.problem("POST", "/v1/conferences/later/keys", 409, "conference-not-running",
                           token=self.alice())
        yield self.problem("POST", "/v1/conferences/later/epochs", 409,
                           "conference-not-running", token=self.kd())
        yield self.problem("POST", "/v1/conferences/conf-1/epochs", 403, "insufficient-scope",
                           token=self.alice())
        # Bob is invited: works once admitted, from his certificate only
        bob = self.token(["keys"], subject=BOB, bound_to=self.other_cert)
        yield self.problem("POST", path, 403, "not-admitted", token=bob, cert=self.other_cert)
        yield self.admit(1, [(BOB, self.other_cert)])
        yield self.ok("POST", path, token=bob, cert=self.other_cert)

    @defer.inlineCallbacks
    def test_key_service_only_for_admitted_members(self):
        """Issue 10 item 2: invited is not enough; the KD must have admitted the
        identity, with the certificate the token is bound to, to the current epoch."""
        yield self.running_conference(invited=(ALICE, BOB))
        path = "/v1/conferences/conf-1/keys"
        bob = self.token(["keys"], subject=BOB, bound_to=self.other_cert)
        # an invitee who never joined (absent from the roster) gets nothing
        yield self.admit(1, [(ALICE, self.alice_cert)])
        _, problem = yield self.problem("POST", path, 403, "not-admitted", token=bob,
                                        cert=self.other_cert)
        self.assertIn("current member", problem["detail"])
        yield self.ok("POST", path, token=self.alice())
        # admitted with another certificate: a token bound to this one gets nothing
        bob_as_alice_cert = self.token(["keys"], subject=BOB, bound_to=self.alice_cert)
        yield self.admit(1, [(ALICE, self.alice_cert), (BOB, self.other_cert)])
        yield self.problem("POST", path, 403, "not-admitted", token=bob_as_alice_cert)
        yield self.ok("POST", path, token=bob, cert=self.other_cert)
        # Alice leaves: the KD starts epoch 2 without her; logging in again gets her nothing
        yield self.ok("POST", "/v1/conferences/conf-1/epochs", 201, token=self.kd())
        yield self.admit(2, [(BOB, self.other_cert)])
        fresh = self.token(["keys"], bound_to=self.alice_cert, now=self.now - 1)
        yield self.problem("POST", path, 403, "not-admitted", token=fresh)
        response, _ = yield self.ok("POST", path, token=bob, cert=self.other_cert)
        self.assertEqual(self.parse_key(response)[0], "conf-1/2")
        # an old epoch's report cannot bring her back
        yield self.admit(1, [(ALICE, self.alice_cert)])
        yield self.problem("POST", path, 403, "not-admitted", token=fresh)

    @defer.inlineCallbacks
    def test_key_service_refuses_a_member_of_another_conference(self):
        """Alice, invited to and admitted in conf-1, asks for conf-2's key: refused."""
        yield self.running_conference(invited=(ALICE,))
        yield self.running_conference("conf-2", invited=(BOB,))
        yield self.admit(1, [(ALICE, self.alice_cert)])
        yield self.ok("POST", "/v1/conferences/conf-1/keys", token=self.alice())
        yield self.problem("POST", "/v1/conferences/conf-2/keys", 403,
                                        "not-invited", token=self.alice())
        # even if conf-2 invited her, she is not admitted there
        yield self.ok("POST", "/v1/conferences/conf-2/invitations", token=self.admin(),
                      body={"identity": ALICE})
        yield self.problem("POST", "/v1/conferences/conf-2/keys", 403, "not-admitted",
                           token=self.alice())

    @defer.inlineCallbacks
    def test_roster_fingerprints_are_checked(self):
        yield self.running_conference(invited=(ALICE,))
        path = "/v1/conferences/conf-1/roster"
        for fingerprints in (["zz"], "AB:CD", [format_fingerprint(b"\x01" * 20)],
                             [format_fingerprint(b"\x01" * 32)] * 17):
            yield self.problem("PUT", path, 400, "invalid-request", token=self.kd(), body={
                "epoch": 1, "members": [{"identity": ALICE, "ssrcs": [1],
                                         "fingerprints": fingerprints}]})
        yield self.problem("PUT", path, 400, "invalid-request", token=self.kd(), body={
            "epoch": 1, "members": [{"identity": ALICE, "ssrcs": [1], "extra": 1}]})

    @defer.inlineCallbacks
    def test_invitation_check(self):
        yield self.running_conference(invited=(ALICE,))
        path = "/v1/conferences/conf-1/invitation-check"
        _, body = yield self.ok("POST", path, token=self.kd(),
                                body={"identities": [ALICE, BOB, ALICE]})
        self.assertEqual(body, {"conference": "conf-1", "state": "running",
                                "invited": [ALICE], "not_invited": [BOB]})
        yield self.problem("POST", path, 403, "insufficient-scope", token=self.alice())
        yield self.problem("POST", path, 400, "invalid-request", token=self.kd(),
                           body={"identities": ["not an identity"]})
        yield self.problem("POST", path, 400, "invalid-request", token=self.kd(),
                           body={"identities": "x"})
        yield self.problem("POST", "/v1/conferences/nope/invitation-check", 404, "not-found",
                           token=self.kd(), body={"identities": []})

    @defer.inlineCallbacks
    def test_uninvite_publishes_invitation_withdrawn(self):
        seen = []
        self.api.events.subscribe(lambda _id, kind, data: seen.append((kind, data)))
        yield self.running_conference(invited=(ALICE, BOB))
        seen.clear()
        yield self.ok("DELETE", f"/v1/conferences/conf-1/invitations/{BOB}",
                      token=self.admin())
        self.assertEqual(seen, [("invitation-withdrawn",
                                 {"conference": "conf-1", "identity": BOB})])
        # a scheduled conference has nobody to remove
        yield self.ok("POST", "/v1/conferences", 201, token=self.admin(),
                      body={"id": "later", "invited": [ALICE]})
        seen.clear()
        yield self.ok("DELETE", f"/v1/conferences/later/invitations/{ALICE}",
                      token=self.admin())
        self.assertEqual(seen, [])

    @defer.inlineCallbacks
    def test_end_wipes_keys_and_refuses_key_requests(self):
        yield self.running_conference()
        yield self.admit(1, [(ALICE, self.alice_cert)])
        yield self.ok("POST", "/v1/conferences/conf-1/keys", token=self.alice())
        yield self.ok("POST", "/v1/conferences/conf-1/end", token=self.admin())
        self.assertEqual((yield self.store.epochs("conf-1")), [])
        self.assertIsNone((yield self.store.current_epoch("conf-1")))
        conference = yield self.store.get("conf-1")
        self.assertIs(conference.state, ConferenceState.ENDED)
        yield self.problem("POST", "/v1/conferences/conf-1/keys", 410,
                           "conference-ended", token=self.alice())
        yield self.problem("POST", "/v1/conferences/conf-1/keys", 410, "conference-ended",
                           token=self.kd())
        yield self.problem("POST", "/v1/conferences/conf-1/epochs", 410, "conference-ended",
                           token=self.kd())

    # --- policy (issue 14) ------------------------------------------------------------

    @defer.inlineCallbacks
    def test_policy_defaults_create_update_and_show(self):
        """The policy is part of the record: defaults from [conferences], set at create,
        changed with PATCH (the KDs get the ``policy`` event), shown by GET."""
        self.api.policy_defaults = {"early_start": 120.0, "grace": 5.0, "rekey_interval": 900.0,
                                    "late_join": "current"}
        seen = self.events_seen()
        _, body = yield self.ok("POST", "/v1/conferences", 201, token=self.admin(),
                                body={"id": "conf-1", "invited": [ALICE]})
        self.assertEqual({k: body[k] for k in ("early_start", "grace", "rekey_interval",
                                               "late_join", "late_joiners_get_earlier_epochs")},
                         {"early_start": 120.0, "grace": 5.0, "rekey_interval": 900.0,
                          "late_join": "current", "late_joiners_get_earlier_epochs": True})
        _, body = yield self.ok("POST", "/v1/conferences", 201, token=self.admin(),
                                body={"id": "conf-2", "late_joiners_get_earlier_epochs": False,
                                      "rekey_interval": 2})
        self.assertEqual((body["late_join"], body["rekey_interval"]), ("none", 2.0))
        _, body = yield self.ok("PATCH", "/v1/conferences/conf-1", token=self.admin(),
                                body={"late_join": "history", "rekey_interval": 0,
                                      "ends_at": self.now + 3600})
        self.assertEqual((body["late_join"], body["rekey_interval"], body["grace"]),
                         ("history", 0.0, 5.0))
        _, shown = yield self.ok("GET", "/v1/conferences/conf-1", token=self.admin())
        self.assertEqual((shown["late_join"], shown["ends_at"]), ("history", self.now + 3600))
        self.assertEqual(seen[-1], ("policy", {
            "conference": "conf-1", "title": "", "starts_at": None, "ends_at": self.now + 3600,
            "early_start": 120.0, "grace": 5.0, "rekey_interval": 0.0, "late_join": "history"}))
        # the trail says what changed and who changed it (the token's subject)
        records, _ = yield self.store.audit_trail("conf-1")
        changed = [r for r in records if r.kind == "policy-changed"]
        self.assertEqual([(r.identity, r.detail) for r in changed], [(
            "admin@example.com",
            {"changes": {"late_join": "history", "rekey_interval": 0.0,
                         "ends_at": self.now + 3600},
             "by": "admin@example.com"})])
        for bad in ({"late_join": "everything"}, {"rekey_interval": -5}, {"state": "ended"},
                    {"ends_at": "tomorrow"}):
            yield self.problem("PATCH", "/v1/conferences/conf-1", 400, "invalid-request",
                               token=self.admin(), body=bad)
        yield self.problem("POST", "/v1/conferences", 400, "invalid-request", token=self.admin(),
                           body={"id": "conf-3", "late_join": "none",
                                 "late_joiners_get_earlier_epochs": True})
        yield self.problem("PATCH", "/v1/conferences/conf-1", 403, "insufficient-scope",
                           token=self.kd(), body={"grace": 1})
        yield self.problem("PATCH", "/v1/conferences/nope", 404, "not-found",
                           token=self.admin(), body={"grace": 1})
        yield self.ok("POST", "/v1/conferences/conf-2/end", token=self.admin())
        yield self.problem("PATCH", "/v1/conferences/conf-2", 410, "conference-ended",
                           token=self.admin(), body={"grace": 1})

    @defer.inlineCallbacks
    def test_no_key_and_no_admission_before_the_early_start_window(self):
        """Before starts_at - early_start: 403 not-started on every key route, and the
        invitation answer tells the KD ``schedule: not_started``; in the window: served."""
        yield self.ok("POST", "/v1/conferences", 201, token=self.admin(), body={
            "id": "conf-1", "invited": [ALICE], "starts_at": self.now + 1000,
            "early_start": 300})
        yield self.ok("POST", "/v1/conferences/conf-1/start", token=self.admin())
        for method, path, token in (("POST", "keys", self.kd()), ("POST", "epochs", self.kd()),
                                    ("POST", "keys", self.alice())):
            _, problem = yield self.problem(method, f"/v1/conferences/conf-1/{path}", 403,
                                            "not-started", token=token)
            self.assertIn("300 s before it starts", problem["detail"])
        _, invitation = yield self.ok("GET", f"/v1/conferences/conf-1/invitations/{ALICE}",
                                      token=self.kd())
        self.assertEqual((invitation["schedule"], invitation["admission_opens_at"]),
                         ("not_started", self.now + 700))
        yield self.ok("PATCH", "/v1/conferences/conf-1", token=self.admin(),
                      body={"early_start": 1200})
        _, invitation = yield self.ok("GET", f"/v1/conferences/conf-1/invitations/{ALICE}",
                                      token=self.kd())
        self.assertEqual(invitation["schedule"], "open")
        yield self.ok("POST", "/v1/conferences/conf-1/keys", token=self.kd(), cert=None)

    @defer.inlineCallbacks
    def test_a_key_route_after_the_end_time_ends_the_conference(self):
        """Past ends_at + grace (the timer not fired yet, e.g. a KMF just restarted): the
        key route ends the conference as perc-admin would, and answers 410."""
        yield self.running_conference()
        seen = self.events_seen()
        yield self.ok("PATCH", "/v1/conferences/conf-1", token=self.admin(),
                      body={"ends_at": self.now - 10, "grace": 5})
        yield self.problem("POST", "/v1/conferences/conf-1/keys", 410, "conference-ended",
                           token=self.kd())
        self.assertEqual((yield self.store.epochs("conf-1")), [])
        self.assertIn(("conference-ended", {"conference": "conf-1", "cause": "schedule"}), seen)

    @defer.inlineCallbacks
    def test_earlier_epochs_only_under_the_history_policy(self):
        """?epoch=N: under late_join "history" an admitted member gets any earlier epoch's
        key of this conference (logged through history_key_delivered); under "none" or
        "current" 403 history-not-allowed; never to a non-member, never a future epoch."""
        delivered = []
        self.api.history_key_delivered = lambda *args: delivered.append(args)
        yield self.running_conference(invited=(ALICE, BOB))
        for _ in range(2):
            yield self.ok("POST", "/v1/conferences/conf-1/epochs", 201, token=self.kd())
        yield self.admit(3, [(ALICE, self.alice_cert)])
        path = "/v1/conferences/conf-1/keys?epoch=1"
        _, problem = yield self.problem("POST", path, 403, "history-not-allowed",
                                        token=self.alice())
        self.assertIn("'none'", problem["detail"])
        yield self.ok("PATCH", "/v1/conferences/conf-1", token=self.admin(),
                      body={"late_join": "current"})
        yield self.problem("POST", path, 403, "history-not-allowed", token=self.alice())
        yield self.ok("PATCH", "/v1/conferences/conf-1", token=self.admin(),
                      body={"late_join": "history"})
        stored = {e.epoch: e for e in (yield self.store.epochs("conf-1"))}
        for epoch in (1, 2, 3):
            response, body = yield self.ok("POST", f"/v1/conferences/conf-1/keys?epoch={epoch}",
                                           token=self.alice())
            keyid, key = self.parse_key(response)
            self.assertEqual((keyid, body["epoch"], body["spi"]),
                             (f"conf-1/{epoch}", epoch, stored[epoch].spi))
            self.assertEqual(key, self.kek.unwrap(stored[epoch].wrapped_key,
                                                  conference_id="conf-1", epoch=epoch))
        self.assertEqual(delivered, [("conf-1", ALICE, self.alice_cert.digest, e)
                                     for e in (1, 2, 3)])
        yield self.problem("POST", "/v1/conferences/conf-1/keys?epoch=4", 404, "unknown-epoch",
                           token=self.alice())
        for bad in ("0", "-1", "x", "1.0"):
            yield self.problem("POST", f"/v1/conferences/conf-1/keys?epoch={bad}", 400,
                               "invalid-request", token=self.alice())
        # Bob is invited but not admitted: nothing, history or not
        bob = self.token(["keys"], subject=BOB, bound_to=self.other_cert)
        yield self.problem("POST", path, 403, "not-admitted", token=bob, cert=self.other_cert)
        self.assertEqual(len(delivered), 3)

    @defer.inlineCallbacks
    def test_earlier_epochs_refused_to_everyone_but_a_current_member(self):
        """?epoch=N under "history" is checked as the current key is, at the moment it
        leaves: an outsider, an uninvited user, a member of another conference, a
        departed member, a token bound to another certificate and whatever the MD holds
        (no KMF token at all, or one signed by another issuer) get nothing."""
        yield self.running_conference(invited=(ALICE, BOB))
        yield self.running_conference("conf-2", invited=(CAROL,))
        for cid in ("conf-1", "conf-2"):
            yield self.ok("PATCH", f"/v1/conferences/{cid}", token=self.admin(),
                          body={"late_join": "history"})
        yield self.ok("POST", "/v1/conferences/conf-1/epochs", 201, token=self.kd())
        yield self.admit(2, [(ALICE, self.alice_cert), (BOB, self.other_cert)])
        yield self.admit(1, [(CAROL, self.other_cert)], cid="conf-2")
        path = "/v1/conferences/conf-1/keys?epoch=1"
        yield self.ok("POST", path, token=self.alice())  # the member: yes
        # outsider and colluding MD: no token, an unbound one, another issuer's
        yield self.problem("POST", path, 401, "unauthorized")
        yield self.problem("POST", path, 401, "unauthorized", token=self.token(["keys"]))
        other_keys = SigningKeys.create(os.path.join(self.dir, "other-signing"), self.now)
        yield self.problem("POST", path, 401, "unauthorized",
                           token=self.token(["keys"], bound_to=self.alice_cert,
                                            keys=other_keys))
        # uninvited
        dave = self.token(["keys"], subject="dave@example.com", bound_to=self.other_cert)
        yield self.problem("POST", path, 403, "not-invited", token=dave, cert=self.other_cert)
        # a member of another conference (admitted there, same certificate)
        carol = self.token(["keys"], subject=CAROL, bound_to=self.other_cert)
        yield self.ok("POST", "/v1/conferences/conf-2/keys?epoch=1", token=carol,
                      cert=self.other_cert)
        yield self.problem("POST", path, 403, "not-invited", token=carol, cert=self.other_cert)
        # Alice's token bound to another certificate
        yield self.problem("POST", path, 403, "not-admitted",
                           token=self.token(["keys"], bound_to=self.other_cert),
                           cert=self.other_cert)
        # Alice departs: epoch 3 without her; epoch 1 is history she cannot have any more
        yield self.ok("POST", "/v1/conferences/conf-1/epochs", 201, token=self.kd())
        yield self.admit(3, [(BOB, self.other_cert)])
        yield self.problem("POST", path, 403, "not-admitted", token=self.alice())
        bob = self.token(["keys"], subject=BOB, bound_to=self.other_cert)
        yield self.ok("POST", path, token=bob, cert=self.other_cert)

    # --- Media Distributors (draft-roach-perc-webrtc slides 4.1.1 steps 9-11) ---------

    def events_seen(self) -> list[tuple[str, dict]]:
        seen: list[tuple[str, dict]] = []
        self.addCleanup(self.api.events.subscribe(
            lambda _id, kind, data: seen.append((kind, data))))
        return seen

    @defer.inlineCallbacks
    def test_media_distributors(self):
        seen = self.events_seen()
        admin = self.admin()
        _, created = yield self.ok("POST", "/v1/conferences", 201, token=admin,
                                   body={"id": "conf-1", "invited": [ALICE]})
        self.assertEqual(created["media_distributors"], [])
        path = "/v1/conferences/conf-1/media-distributors"
        _, body = yield self.ok("POST", path, token=admin, body={"tunnel": "MD1.example.com:4443"})
        self.assertEqual(body["media_distributors"], ["md1.example.com:4443"])
        self.assertEqual({k: v for k, v in body.items() if k != "media_distributors"},
                         {k: v for k, v in created.items() if k != "media_distributors"})
        self.assertEqual(seen, [("media-distributor", {"conference": "conf-1",
                                                       "tunnel": "md1.example.com:4443"})])
        _, body = yield self.ok("POST", path, token=admin, body={"tunnel": "[2001:DB8::2]:4443"})
        self.assertEqual(body["media_distributors"], ["[2001:db8::2]:4443",
                                                      "md1.example.com:4443"])
        # adding it again changes nothing, and tells the KDs again
        _, again = yield self.ok("POST", path, token=admin,
                                 body={"tunnel": "md1.example.com:4443"})
        self.assertEqual(again, body)
        self.assertEqual([kind for kind, _ in seen], ["media-distributor"] * 3)
        _, shown = yield self.ok("GET", "/v1/conferences/conf-1", token=admin)
        self.assertEqual(shown["media_distributors"], body["media_distributors"])
        _, listed = yield self.ok("GET", "/v1/conferences", token=admin)
        self.assertEqual(listed["conferences"][0]["media_distributors"],
                         body["media_distributors"])
        yield self.running_conference("conf-2")
        yield self.ok("POST", "/v1/conferences/conf-2/media-distributors", token=admin,
                      body={"tunnel": "192.0.2.3:9444"})
        _, active = yield self.ok("GET", "/v1/media-distributors", token=self.kd())
        self.assertEqual(active, {"media_distributors": [
            "192.0.2.3:9444", "[2001:db8::2]:4443", "md1.example.com:4443"]})
        # remove, by the address percent-encoded in the path (idempotent)
        for _ in range(2):
            _, body = yield self.ok("DELETE", path + "/%5B2001%3Adb8%3A%3A2%5D%3A4443",
                                    token=admin)
            self.assertEqual(body["media_distributors"], ["md1.example.com:4443"])
        _, body = yield self.ok("DELETE", path + "/MD1.example.com:4443", token=admin)
        self.assertEqual(body["media_distributors"], [])
        _, active = yield self.ok("GET", "/v1/media-distributors", token=self.kd())
        self.assertEqual(active, {"media_distributors": ["192.0.2.3:9444"]})
        # conf-2's start publishes its first epoch; removals publish nothing
        self.assertEqual([kind for kind, _ in seen],
                         ["media-distributor"] * 3 + ["epoch", "media-distributor"])

    @defer.inlineCallbacks
    def test_media_distributor_bad_addresses(self):
        seen = self.events_seen()
        admin = self.admin()
        yield self.ok("POST", "/v1/conferences", 201, token=admin, body={"id": "conf-1"})
        path = "/v1/conferences/conf-1/media-distributors"
        for bad in ({}, {"tunnel": None}, {"tunnel": 4443}, {"tunnel": ["md1:1"]},
                    {"tunnel": "md1.example.com"}, {"tunnel": "md1:0"}, {"tunnel": "md1:65536"},
                    {"tunnel": "::1:4443"}, {"tunnel": "[fe80::1%eth0]:4443"},
                    {"tunnel": "md_1:80"}, {"tunnel": "https://md1:80"},
                    {"tunnel": "a" * 300 + ":80"}, {"tunnel": "md1:80", "extra": 1}):
            _, problem = yield self.problem("POST", path, 400, "invalid-request", token=admin,
                                            body=bad)
            self.assertTrue(problem["detail"])
        for bad in ("md1.example.com", "md1:0", "%3A%3A1%3A4443", "md1%0A:80", "%5B%3A%3A1%5D"):
            yield self.problem("DELETE", f"{path}/{bad}", 400, "invalid-request", token=admin)
        yield self.problem("POST", path, 400, "malformed-json", token=admin, raw=b'{"tunnel":')
        yield self.problem("POST", path, 415, "unsupported-media-type", token=admin,
                           raw=b'{"tunnel": "md1:80"}', content_type="text/plain")
        # unknown conference (a good address): 404
        yield self.problem("POST", "/v1/conferences/nope/media-distributors", 404, "not-found",
                           token=admin, body={"tunnel": "md1:80"})
        yield self.problem("POST", "/v1/conferences/no%20pe/media-distributors", 404,
                           "not-found", token=admin, body={"tunnel": "md1:80"})
        yield self.problem("DELETE", "/v1/conferences/nope/media-distributors/md1:80", 404,
                           "not-found", token=admin)
        self.assertEqual(seen, [])
        self.assertEqual((yield self.store.media_distributors("conf-1")), [])
        self.assertEqual([e.kind for e in (yield self.store.audit("conf-1"))], ["created"])

    @defer.inlineCallbacks
    def test_an_endpoint_or_a_kd_cannot_point_the_kds_at_an_md(self):
        """Who is not an administrator (an invited endpoint, with its bound token; a
        KD; no token at all) cannot add an MD, which the KDs would connect to and
        whose certificate would then be the one they trust with the conference."""
        seen = self.events_seen()
        yield self.running_conference(invited=(ALICE,))
        path = "/v1/conferences/conf-1/media-distributors"
        body = {"tunnel": "evil.example.net:4443"}
        yield self.problem("POST", path, 401, "unauthorized", body=body)
        for token in (self.alice("keys"), self.alice("identity"), self.kd(),
                      self.token(["keys", "identity", "kd"], bound_to=self.alice_cert)):
            yield self.problem("POST", path, 403, "insufficient-scope", token=token, body=body)
            yield self.problem("DELETE", path + "/evil.example.net:4443", 403,
                               "insufficient-scope", token=token)
        yield self.problem("DELETE", path + "/evil.example.net:4443", 401, "unauthorized")
        self.assertEqual([kind for kind, _ in seen], ["epoch"])
        self.assertEqual((yield self.store.media_distributors("conf-1")), [])
        # the KDs' list is for KDs: neither an administrator nor an endpoint reads it
        yield self.problem("GET", "/v1/media-distributors", 401, "unauthorized")
        for token in (self.admin(), self.alice("keys"), self.alice("identity")):
            yield self.problem("GET", "/v1/media-distributors", 403, "insufficient-scope",
                               token=token)

    @defer.inlineCallbacks
    def test_media_distributors_of_an_ended_conference(self):
        """An ended conference takes no MD and drops its own from the KDs' list."""
        admin = self.admin()
        for cid in ("conf-1", "conf-2"):
            yield self.running_conference(cid)
        yield self.ok("POST", "/v1/conferences/conf-1/media-distributors", token=admin,
                      body={"tunnel": "md1.example.com:4443"})
        yield self.ok("POST", "/v1/conferences/conf-2/media-distributors", token=admin,
                      body={"tunnel": "md2.example.com:4443"})
        _, ended = yield self.ok("POST", "/v1/conferences/conf-1/end", token=admin)
        self.assertEqual(ended["media_distributors"], [])
        _, active = yield self.ok("GET", "/v1/media-distributors", token=self.kd())
        self.assertEqual(active, {"media_distributors": ["md2.example.com:4443"]})
        seen = self.events_seen()
        yield self.problem("POST", "/v1/conferences/conf-1/media-distributors", 410,
                           "conference-ended", token=admin, body={"tunnel": "md3:4443"})
        yield self.problem("DELETE", "/v1/conferences/conf-1/media-distributors/md3:4443", 410,
                           "conference-ended", token=admin)
        self.assertEqual(seen, [])
        yield self.ok("POST", "/v1/conferences/conf-2/end", token=admin)
        _, active = yield self.ok("GET", "/v1/media-distributors", token=self.kd())
        self.assertEqual(active, {"media_distributors": []})

    @defer.inlineCallbacks
    def test_media_distributor_event_on_the_stream(self):
        """What the KD sees on GET /v1/events when an MD is added."""
        yield self.ok("POST", "/v1/conferences", 201, token=self.admin(), body={"id": "conf-1"})
        agent = Agent(reactor, contextFactory=Policy(self.server_cert, None), pool=self.pool)
        response = yield treq.get(self.base + "/v1/events", agent=agent,
                                  headers={"Authorization": f"Bearer {self.kd()}"})
        self.assertEqual(response.code, 200)
        reader = StreamReader()
        response.deliverBody(reader)
        yield self.wait_for(lambda: len(self.api.events) == 1)
        yield self.ok("POST", "/v1/conferences/conf-1/media-distributors", token=self.admin(),
                      body={"tunnel": "[::1]:4443"})
        yield self.wait_for(lambda: b"event: media-distributor" in reader.data)
        [event] = [block for block in reader.data.decode().split("\n\n") if "event:" in block]
        self.assertRegex(event, r'^id: \d+\nevent: media-distributor\n'
                         r'data: \{"conference": "conf-1", "tunnel": "\[::1\]:4443"\}$')
        reader.transport.stopProducing()
        yield reader.done

    # --- roster ---------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_roster(self):
        yield self.running_conference(invited=(ALICE, BOB))
        path = "/v1/conferences/conf-1/roster"
        yield self.problem("GET", path, 404, "no-roster", token=self.kd())
        members = [{"identity": BOB, "ssrcs": [7, 3]}, {"identity": ALICE, "ssrcs": [1]}]
        _, put = yield self.ok("PUT", path, token=self.kd(),
                               body={"epoch": 1, "members": members})
        roster = verify_roster(put["roster"], self.keys.jwks(self.now), issuer=ISSUER,
                               conference_id="conf-1", now=reactor.seconds())
        self.assertEqual(roster.epoch, 1)
        self.assertEqual([(m.identity, m.ssrcs) for m in roster.members],
                         [(ALICE, (1,)), (BOB, (3, 7))])
        _, got = yield self.ok("GET", path, token=self.alice())
        self.assertEqual(got, {"conference": "conf-1", "epoch": 1, "roster": put["roster"]})
        _, got = yield self.ok("GET", path, token=self.admin())
        self.assertEqual(got["roster"], put["roster"])
        # refusals
        yield self.problem("GET", path, 403, "not-invited",
                           token=self.token(["keys"], subject="eve@example.com",
                                            bound_to=self.alice_cert))
        yield self.problem("PUT", path, 403, "insufficient-scope", token=self.admin(),
                           body={"epoch": 1, "members": members})
        yield self.problem("PUT", path, 409, "unknown-epoch", token=self.kd(),
                           body={"epoch": 2, "members": members})
        for bad in ({"epoch": 0, "members": []}, {"epoch": True, "members": []},
                    {"epoch": 1, "members": {}}, {"epoch": 1, "members": [{"identity": ALICE}]},
                    {"epoch": 1, "members": [{"identity": ALICE, "ssrcs": [1]},
                                             {"identity": BOB, "ssrcs": [1]}]},
                    {"epoch": 1, "members": [{"identity": ALICE, "ssrcs": [-1]}]}):
            yield self.problem("PUT", path, 400, "invalid-request", token=self.kd(), body=bad)
        yield self.problem("PUT", path, 415, "unsupported-media-type", token=self.kd(),
                           raw=b"{}", content_type="application/x-www-form-urlencoded")
        yield self.problem("GET", "/v1/conferences/nope/roster", 404, "not-found",
                           token=self.kd())
        # ended: roster wiped, no new one
        yield self.ok("POST", "/v1/conferences/conf-1/end", token=self.admin())
        yield self.problem("GET", path, 404, "no-roster", token=self.kd())
        yield self.problem("PUT", path, 410, "conference-ended", token=self.kd(),
                           body={"epoch": 1, "members": members})

    # --- events -----------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_events(self):
        yield self.problem("GET", "/v1/events", 403, "insufficient-scope", token=self.admin())
        yield self.running_conference()
        agent = Agent(reactor, contextFactory=Policy(self.server_cert, None), pool=self.pool)
        response = yield treq.get(self.base + "/v1/events", agent=agent,
                                  headers={"Authorization": f"Bearer {self.kd()}"})
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"),
                         ["text/event-stream; charset=utf-8"])
        reader = StreamReader()
        response.deliverBody(reader)
        yield self.wait_for(lambda: len(self.api.events) == 1)
        yield self.ok("POST", "/v1/conferences/conf-1/epochs", 201, token=self.kd())
        yield self.ok("POST", "/v1/conferences/conf-1/end", token=self.admin())
        yield self.wait_for(lambda: b"event: conference-ended" in reader.data
                            and b": keep-alive" in reader.data)
        events = [block for block in reader.data.decode().split("\n\n")
                  if "event:" in block]
        self.assertEqual(len(events), 2, reader.data)
        self.assertRegex(events[0], r'^id: \d+\nevent: epoch\n'
                         r'data: \{"conference": "conf-1", "epoch": 2, "spi": \d+\}$')
        self.assertRegex(events[1], r'^id: \d+\nevent: conference-ended\n'
                         r'data: \{"conference": "conf-1", "cause": "admin"\}$')
        reader.transport.stopProducing()
        yield reader.done
        yield self.wait_for(lambda: len(self.api.events) == 0)

    @defer.inlineCallbacks
    def wait_for(self, condition, limit: float = 5.0):
        deadline = reactor.seconds() + limit
        while not condition():
            if reactor.seconds() > deadline:
                self.fail("condition not met in time")
            yield task.deferLater(reactor, 0.01, lambda: None)


class TlsContextTests(unittest.TestCase):
    def test_key_file_checks(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        cert = Cert(directory, "s")
        self.assertEqual(os.stat(cert.key_path).st_mode & 0o777, 0o600)
        tls.check_private_key_file(cert.key_path)
        os.chmod(cert.key_path, 0o640)
        tls.check_private_key_file(cert.key_path)
        os.chmod(cert.key_path, 0o644)
        error = self.assertRaises(tls.TlsFileError, tls.check_private_key_file, cert.key_path)
        self.assertIn("mode 0644 is too open", str(error))
        error = self.assertRaises(tls.TlsFileError, tls.check_private_key_file,
                                  cert.key_path + ".missing")
        self.assertEqual(str(error), "file not found")
        self.assertRaises(FileExistsError, tls.generate_self_signed, cert.cert_path,
                          cert.key_path + "2")

    def test_mismatched_key_refused(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        a, b = Cert(directory, "a"), Cert(directory, "b")
        error = self.assertRaises(tls.TlsFileError, tls.server_context_factory,
                                  a.cert_path, b.key_path)
        self.assertIn("does not match", str(error))
        with open(os.path.join(directory, "junk.crt"), "w") as f:
            f.write("junk")
        self.assertRaises(tls.TlsFileError, tls.server_context_factory,
                          os.path.join(directory, "junk.crt"), a.key_path)
