"""The OAuth endpoints of perc-kmf over real HTTPS: browser login with PKCE, tokens, errors.

Same TLS set-up as :mod:`tests.unit.test_kmf_api` (generated server
certificate, self-signed client "DTLS" certificates), a real SQLite grant
store, a local user file and an in-memory client registry (argon2 made cheap).
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import re
import secrets
import urllib.parse

import treq
from argon2 import PasswordHasher
from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool

from perc_daemons import config, tls
from perc_daemons.kmf import service
from perc_daemons.kmf.api import KmfApi, kmf_site
from perc_daemons.kmf.auth import AuthenticatorChain, LoginRateLimiter
from perc_daemons.kmf.auth.file import FileAuthenticator, add_user
from perc_daemons.kmf.clients import Client, ClientAuthLimiter, ClientRegistry, hash_client_secret
from perc_daemons.kmf.kek import KeyEncryptionKey
from perc_daemons.kmf.oauth import AuthorizationServer
from perc_daemons.kmf.signing import SigningKeys
from perc_daemons.kmf.tokens import issue_access_token
from perc_daemons.store import StoreUnavailable
from perc_daemons.store.grants_redis import RedisGrantStore
from perc_daemons.store.grants_sqlite import SqliteGrantStore
from perc_daemons.store.sqlite import SqliteConferenceStore
from tests.unit.test_kmf_api import Cert, Policy
from tests.unit.test_store import REDIS_SERVER, RedisServer

FAST = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
DOMAIN = "example.com"
ISSUER = "https://example.com"
REDIRECT = "https://app.example.org/cb"
PASSWORD = "correct horse battery"
ADMIN_ID = "perc:admin"  # ':' must be percent-encoded in HTTP Basic (RFC 6749 s2.3.1)
ADMIN_SECRET = "s3cr:et%/+ é" + "-0123456789" * 4  # a $sha256$ entry: >= 43 characters
LEGACY_ID = "legacy"
LEGACY_SECRET = "short, from an earlier version"  # an argon2id entry
STATE = "st<\"&'>ate"
VERIFIER = "v" * 20 + "-._~" + "A1b2C3d4e5F6g7H8i9J0k"
CHALLENGE = base64.urlsafe_b64encode(hashlib.sha256(VERIFIER.encode()).digest()
                                     ).rstrip(b"=").decode()
HIDDEN = re.compile(r'<input type="hidden" name="([a-z_]+)" value="([^"]*)">')
FORM = "application/x-www-form-urlencoded"
LOGIN_COOKIE = "__Host-perc-login"


def hidden_fields(page: str) -> dict[str, str]:
    """The hidden inputs of a login page (the first form's, when there are several)."""
    fields: dict[str, str] = {}
    for name, value in HIDDEN.findall(page):
        fields.setdefault(name, html.unescape(value))
    return fields


def basic(client_id: str, secret: str) -> str:
    quote = urllib.parse.quote_plus
    pair = f"{quote(client_id)}:{quote(secret)}".encode()
    return "Basic " + base64.b64encode(pair).decode()


class OAuthHttpTests(unittest.TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.server_cert = Cert(self.dir, "server")
        self.alice_cert = Cert(self.dir, "alice-dtls")
        self.other_cert = Cert(self.dir, "other-dtls")
        now = reactor.seconds()
        self.keys = SigningKeys.create(os.path.join(self.dir, "signing"), now)
        kek = KeyEncryptionKey.generate(os.path.join(self.dir, "kek"))
        db = os.path.join(self.dir, "kmf.sqlite3")
        self.store = yield SqliteConferenceStore.open(db)
        self.addCleanup(self.store.close)
        self.grants = yield SqliteGrantStore.open(db)  # the same file, as in the daemon
        self.addCleanup(self.grants.close)
        users = os.path.join(self.dir, "users.jsonl")
        add_user(users, "alice", PASSWORD, hasher=FAST)
        clients = ClientRegistry([
            Client("webapp", "public", frozenset({"authorization_code", "refresh_token"}),
                   (REDIRECT,), frozenset({"identity", "keys"})),
            Client(ADMIN_ID, "confidential", frozenset({"client_credentials"}), (),
                   frozenset({"admin"}), hash_client_secret(ADMIN_SECRET)),
            Client(LEGACY_ID, "confidential", frozenset({"client_credentials"}), (),
                   frozenset({"admin"}), FAST.hash(LEGACY_SECRET)),
        ], hasher=FAST)
        authenticator = AuthenticatorChain(
            [FileAuthenticator(users, DOMAIN, hasher=FAST, reactor=reactor)], clock=reactor)
        self.limiter = LoginRateLimiter(user_limit=3, address_limit=50, window=60)
        self.oauth = AuthorizationServer(clients, self.grants, self.keys, authenticator,
                                         self.limiter, issuer=ISSUER, audience=ISSUER)
        self.api = KmfApi(store=self.store, kek=kek, keys=self.keys, idp_domain=DOMAIN,
                          issuer=ISSUER, clock=reactor, oauth=self.oauth,
                          public_url="https://kmf.example.com:8443")
        context = tls.server_context_factory(self.server_cert.cert_path,
                                             self.server_cert.key_path,
                                             request_client_certificate=True)
        self.port = reactor.listenSSL(0, kmf_site(self.api), context, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.base = f"https://127.0.0.1:{self.port.getHost().port}"
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.pool.closeCachedConnections)

    # --- helpers ------------------------------------------------------------------

    @defer.inlineCallbacks
    def call(self, method, path, *, form=None, raw=None, content_type=FORM, headers=None,
             cert="alice", base=None):
        client_cert = self.alice_cert if cert == "alice" else cert
        agent = Agent(reactor, contextFactory=Policy(self.server_cert, client_cert),
                      pool=self.pool)
        headers = dict(headers or {})
        # the browser's cookie jar, for the login form's cookie: sent with every request
        jar = self.__dict__.setdefault("jar", {})
        sent = "; ".join(f"{k}={v}" for k, v in jar.items())
        if sent:
            headers["Cookie"] = "; ".join(c for c in (headers.get("Cookie"), sent) if c)
        data = raw
        if form is not None:
            data = urllib.parse.urlencode(form).encode()
        if data is not None:
            headers["Content-Type"] = content_type
        response = yield treq.request(method, (base or self.base) + path, headers=headers,
                                      data=data, agent=agent, allow_redirects=False)
        content = yield treq.content(response)
        for cookie in response.headers.getRawHeaders("set-cookie") or []:
            name, _, rest = cookie.partition("=")
            if name == LOGIN_COOKIE:
                jar[name] = rest.split(";")[0]
        return response, content

    def header(self, response, name):
        values = response.headers.getRawHeaders(name)
        return values[0] if values else None

    def authorize_query(self, **overrides):
        params = {"response_type": "code", "client_id": "webapp", "redirect_uri": REDIRECT,
                  "scope": "identity keys", "state": STATE, "code_challenge": CHALLENGE,
                  "code_challenge_method": "S256"}
        params.update(overrides)
        return "/oauth/authorize?" + urllib.parse.urlencode(
            {k: v for k, v in params.items() if v is not None})

    @defer.inlineCallbacks
    def login_form(self, **overrides):
        response, content = yield self.call("GET", self.authorize_query(**overrides))
        self.assertEqual(response.code, 200, content)
        page = content.decode("utf-8")
        return response, page, hidden_fields(page)

    @defer.inlineCallbacks
    def submit(self, fields, username="alice", password=PASSWORD):
        form = dict(fields, username=username, password=password)
        return (yield self.call("POST", "/oauth/authorize", form=form))

    @defer.inlineCallbacks
    def code(self):
        _, _, fields = yield self.login_form()
        response, content = yield self.submit(fields)
        self.assertEqual(response.code, 302, content)
        location = self.header(response, "location")
        self.assertTrue(location.startswith(REDIRECT + "?"), location)
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(location).query))
        return query

    @defer.inlineCallbacks
    def token(self, form, *, status=200, headers=None, cert="alice", raw=None,
              content_type=FORM):
        response, content = yield self.call("POST", "/oauth/token", form=form, raw=raw,
                                            headers=headers, cert=cert,
                                            content_type=content_type)
        self.assertEqual(response.code, status, content)
        self.assertEqual(self.header(response, "content-type"), "application/json")
        self.assertEqual(self.header(response, "cache-control"), "no-store")
        self.assertEqual(self.header(response, "pragma"), "no-cache")
        return response, json.loads(content)

    @defer.inlineCallbacks
    def user_tokens(self):
        query = yield self.code()
        _, body = yield self.token({"grant_type": "authorization_code", "client_id": "webapp",
                                    "code": query["code"], "redirect_uri": REDIRECT,
                                    "code_verifier": VERIFIER})
        return body

    def refresh(self, refresh_token, status=200):
        return self.token({"grant_type": "refresh_token", "client_id": "webapp",
                           "refresh_token": refresh_token}, status=status)

    @defer.inlineCallbacks
    def uses(self, access_token, base=None):
        """The statuses of the resources an access token opens (identity, keys, admin)."""
        auth = {"Authorization": "Bearer " + access_token}
        body = json.dumps({"fingerprints": [self.alice_cert.fingerprint],
                           "audience": "kd"}).encode()
        codes = []
        for method, path, raw in (("POST", "/v1/identity/assertions", body),
                                  ("POST", "/v1/conferences/none/keys", None),
                                  ("GET", "/v1/conferences", None)):
            response, _ = yield self.call(method, path, raw=raw, headers=auth,
                                          content_type="application/json", base=base)
            if response.code == 401:
                self.assertIn('error="invalid_token"',
                              self.header(response, "www-authenticate"))
            codes.append(response.code)
        return codes

    @defer.inlineCallbacks
    def introspect(self, access_token, base=None):
        response, content = yield self.call(
            "POST", "/oauth/introspect", headers={"Authorization": basic(ADMIN_ID, ADMIN_SECRET)},
            form={"token": access_token}, base=base)
        self.assertEqual(response.code, 200, content)
        return json.loads(content)

    def assertError(self, body, error):
        self.assertEqual(body["error"], error, body)
        self.assertEqual(set(body) - {"error", "error_description"}, set())

    # --- the browser flow -----------------------------------------------------------

    @defer.inlineCallbacks
    def test_browser_pkce_flow(self):
        response, page, fields = yield self.login_form()
        self.assertEqual(self.header(response, "content-type"), "text/html; charset=utf-8")
        csp = self.header(response, "content-security-policy")
        self.assertIn("default-src 'none'", csp)
        self.assertIn("form-action 'self'", csp)
        self.assertEqual(self.header(response, "x-frame-options"), "DENY")
        self.assertEqual(self.header(response, "cache-control"), "no-store")
        for external in ("<script", "<link", "src=", "<style"):
            self.assertNotIn(external, page)
        self.assertNotIn(STATE, page)  # escaped
        self.assertIn(html.escape(STATE, quote=True), page)
        self.assertEqual(fields["state"], STATE)
        self.assertEqual(fields["code_challenge"], CHALLENGE)
        self.assertIn("csrf_token", fields)
        self.assertIn('name="username"', page)
        self.assertIn('type="password" name="password"', page)
        response, content = yield self.submit(fields)
        self.assertEqual(response.code, 302, content)
        location = urllib.parse.urlsplit(self.header(response, "location"))
        self.assertEqual(f"{location.scheme}://{location.netloc}{location.path}", REDIRECT)
        query = dict(urllib.parse.parse_qsl(location.query))
        self.assertEqual((query["state"], query["iss"]), (STATE, ISSUER))
        # the code, exchanged with the verifier from alice's certificate
        _, tokens = yield self.token({"grant_type": "authorization_code", "client_id": "webapp",
                                      "code": query["code"], "redirect_uri": REDIRECT,
                                      "code_verifier": VERIFIER})
        self.assertEqual((tokens["token_type"], tokens["scope"]), ("Bearer", "identity keys"))
        self.assertIn("refresh_token", tokens)
        # the access token is bound to that certificate and names alice
        path = "/v1/identity/assertions"
        body = json.dumps({"fingerprints": [self.alice_cert.fingerprint],
                           "audience": "kd"}).encode()
        auth = {"Authorization": "Bearer " + tokens["access_token"]}
        response, content = yield self.call("POST", path, raw=body, headers=auth,
                                            content_type="application/json")
        self.assertEqual(response.code, 201, content)
        response, content = yield self.call("POST", path, raw=body, headers=auth,
                                            content_type="application/json",
                                            cert=self.other_cert)
        self.assertEqual(response.code, 401, content)
        # a code works once
        _, body = yield self.token({"grant_type": "authorization_code", "client_id": "webapp",
                                    "code": query["code"], "redirect_uri": REDIRECT,
                                    "code_verifier": VERIFIER}, status=400)
        self.assertError(body, "invalid_grant")

    @defer.inlineCallbacks
    def test_wrong_verifier_refused(self):
        query = yield self.code()
        _, body = yield self.token({"grant_type": "authorization_code", "client_id": "webapp",
                                    "code": query["code"], "redirect_uri": REDIRECT,
                                    "code_verifier": "w" * 43}, status=400)
        self.assertError(body, "invalid_grant")

    @defer.inlineCallbacks
    def test_refresh_rotation_and_reuse(self):
        first = yield self.user_tokens()
        _, second = yield self.refresh(first["refresh_token"])
        self.assertNotEqual(second["refresh_token"], first["refresh_token"])
        self.assertNotEqual(second["access_token"], first["access_token"])
        # reusing the rotated token fails and revokes the family
        _, body = yield self.refresh(first["refresh_token"], status=400)
        self.assertError(body, "invalid_grant")
        _, body = yield self.refresh(second["refresh_token"], status=400)
        self.assertError(body, "invalid_grant")

    @defer.inlineCallbacks
    def test_client_credentials_admin(self):
        _, body = yield self.token({"grant_type": "client_credentials"}, cert=None,
                                   headers={"Authorization": basic(ADMIN_ID, ADMIN_SECRET)})
        self.assertEqual(body["scope"], "admin")
        self.assertNotIn("refresh_token", body)
        response, content = yield self.call(
            "GET", "/v1/conferences", cert=None,
            headers={"Authorization": "Bearer " + body["access_token"]})
        self.assertEqual(response.code, 200, content)
        self.assertEqual(json.loads(content), {"conferences": []})

    @defer.inlineCallbacks
    def test_legacy_argon2id_client_still_accepted(self):
        _, body = yield self.token({"grant_type": "client_credentials"}, cert=None,
                                   headers={"Authorization": basic(LEGACY_ID, LEGACY_SECRET)})
        self.assertEqual(body["scope"], "admin")
        self.assertEqual(self.oauth.clients.slow_verifications, 1)

    @defer.inlineCallbacks
    def test_failed_client_authentication_rate_limited(self):
        self.oauth.clients.limiter = ClientAuthLimiter(client_limit=50, address_limit=3,
                                                       window=60)
        for _ in range(3):
            yield self.token({"grant_type": "client_credentials"}, cert=None, status=401,
                             headers={"Authorization": basic(ADMIN_ID, "wrong")})
        for path in ("/oauth/token", "/oauth/introspect", "/oauth/revoke"):
            response, content = yield self.call(
                "POST", path, cert=None, headers={"Authorization": basic(ADMIN_ID, "wrong")},
                form={"grant_type": "client_credentials", "token": "x"})
            self.assertEqual(response.code, 429, (path, content))
            self.assertGreater(int(self.header(response, "retry-after")), 0)
            self.assertEqual(json.loads(content)["error"], "invalid_client")
        # the right secret still works from that address
        yield self.token({"grant_type": "client_credentials"}, cert=None,
                         headers={"Authorization": basic(ADMIN_ID, ADMIN_SECRET)})

    @defer.inlineCallbacks
    def test_bogus_token_requests_leave_tokens_and_keys_served(self):
        """A flood of bogus /oauth/token requests: cheap refusals, real requests served.

        16 loops fire bad client credentials (wrong secrets for the real admin
        client, unknown ids) from 127.0.0.2 as fast as the KMF answers them;
        while they run, the admin client gets a token, creates and starts a
        conference, and alice gets its key, from 127.0.0.1.
        """
        self.oauth.clients.limiter = ClientAuthLimiter(client_limit=10, address_limit=10,
                                                       window=60)
        tokens = yield self.user_tokens()
        flood_pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(flood_pool.closeCachedConnections)
        flood_agent = Agent(reactor, contextFactory=Policy(self.server_cert, None),
                            pool=flood_pool, bindAddress=("127.0.0.2", 0))
        bogus = [basic(ADMIN_ID, "wrong"), basic(ADMIN_ID, ADMIN_SECRET[:-1] + "!"),
                 basic("nobody", ADMIN_SECRET), basic(ADMIN_ID, secrets.token_urlsafe(32))]
        body = urllib.parse.urlencode({"grant_type": "client_credentials"}).encode()
        codes: list[int] = []
        stop = []

        @defer.inlineCallbacks
        def flood(i):
            while not stop:
                response = yield treq.post(
                    self.base + "/oauth/token", data=body, agent=flood_agent,
                    headers={"Authorization": bogus[(i + len(codes)) % len(bogus)],
                             "Content-Type": FORM})
                yield treq.content(response)
                codes.append(response.code)

        floods = [flood(i) for i in range(16)]
        try:
            while 429 not in codes:  # the flood is at the limit
                yield task.deferLater(reactor, 0.01, lambda: None)
            before = len(codes)
            _, admin = yield self.token({"grant_type": "client_credentials"}, cert=None,
                                        headers={"Authorization": basic(ADMIN_ID, ADMIN_SECRET)})
            bearer = {"Authorization": "Bearer " + admin["access_token"]}
            response, content = yield self.call(
                "POST", "/v1/conferences", cert=None, headers=bearer,
                content_type="application/json", raw=json.dumps(
                    {"id": "c-1", "title": "t", "initiator": f"ops@{DOMAIN}",
                     "invited": [f"alice@{DOMAIN}"]}).encode())
            self.assertEqual(response.code, 201, content)
            response, content = yield self.call("POST", "/v1/conferences/c-1/start",
                                                cert=None, headers=bearer)
            self.assertEqual(response.code, 200, content)
            # the KD reports alice admitted (its own token: not what is measured here)
            kd = issue_access_token(self.keys, issuer=ISSUER, subject="kd", audience=ISSUER,
                                    client_id="kd", scopes=["kd"], now=reactor.seconds())
            response, content = yield self.call(
                "PUT", "/v1/conferences/c-1/roster", cert=None,
                headers={"Authorization": "Bearer " + kd}, content_type="application/json",
                raw=json.dumps({"epoch": 1, "members": [{
                    "identity": f"alice@{DOMAIN}", "ssrcs": [1],
                    "fingerprints": [self.alice_cert.fingerprint]}]}).encode())
            self.assertEqual(response.code, 200, content)
            response, content = yield self.call(
                "POST", "/v1/conferences/c-1/keys",
                headers={"Authorization": "Bearer " + tokens["access_token"]})
            self.assertEqual(response.code, 200, content)
            self.assertIn('keyid="c-1/1"', self.header(response, "encryption-key"))
            during = len(codes) - before
            self.assertEqual(stop, [])
        finally:
            stop.append(True)
            yield defer.DeferredList(floods)
        self.assertGreater(during, 0)  # bogus requests were answered meanwhile
        self.assertEqual(set(codes), {401, 429})
        self.assertEqual(self.oauth.clients.slow_verifications, 0)  # never the slow path

    @defer.inlineCallbacks
    def test_wrong_client_secret(self):
        for auth in (basic(ADMIN_ID, "wrong"), basic("nobody", ADMIN_SECRET),
                     "Basic !!!not-base64", "Bearer abc"):
            response, body = yield self.token({"grant_type": "client_credentials"},
                                              status=401, headers={"Authorization": auth})
            self.assertError(body, "invalid_client")
            self.assertTrue(self.header(response, "www-authenticate").startswith("Basic "))
        # unencoded id ("perc:admin" splits at the wrong colon)
        raw = base64.b64encode(f"{ADMIN_ID}:{ADMIN_SECRET}".encode()).decode()
        yield self.token({"grant_type": "client_credentials"}, status=401,
                         headers={"Authorization": "Basic " + raw})
        # a public client cannot use client_credentials; secrets never in the body
        _, body = yield self.token({"grant_type": "client_credentials", "client_id": "webapp"},
                                   status=400)
        self.assertError(body, "unauthorized_client")
        _, body = yield self.token({"grant_type": "client_credentials", "client_id": ADMIN_ID,
                                    "client_secret": ADMIN_SECRET}, status=400)
        self.assertError(body, "invalid_request")

    @defer.inlineCallbacks
    def test_revoke_then_refresh_fails(self):
        tokens = yield self.user_tokens()
        response, content = yield self.call(
            "POST", "/oauth/revoke", form={"token": tokens["refresh_token"],
                                           "token_type_hint": "refresh_token",
                                           "client_id": "webapp"})
        self.assertEqual((response.code, content), (200, b""))
        _, body = yield self.refresh(tokens["refresh_token"], status=400)
        self.assertError(body, "invalid_grant")
        # unknown tokens: still 200; a request without a token is malformed
        response, _ = yield self.call("POST", "/oauth/revoke",
                                      form={"token": "nope", "client_id": "webapp"})
        self.assertEqual(response.code, 200)
        response, content = yield self.call("POST", "/oauth/revoke", form={"client_id": "webapp"})
        self.assertEqual(response.code, 400)
        self.assertError(json.loads(content), "invalid_request")

    @defer.inlineCallbacks
    def test_revoked_access_token_refused_everywhere(self):
        """RFC 7009: a revoked access token opens nothing and introspects inactive."""
        tokens = yield self.user_tokens()
        _, admin = yield self.token({"grant_type": "client_credentials"}, cert=None,
                                    headers={"Authorization": basic(ADMIN_ID, ADMIN_SECRET)})
        self.assertEqual((yield self.uses(tokens["access_token"])), [201, 404, 403])
        self.assertEqual((yield self.uses(admin["access_token"]))[2], 200)
        # another client's token is not revoked (ignored, 200)
        response, _ = yield self.call("POST", "/oauth/revoke",
                                      headers={"Authorization": basic(ADMIN_ID, ADMIN_SECRET)},
                                      form={"token": tokens["access_token"]})
        self.assertEqual(response.code, 200)
        self.assertEqual((yield self.uses(tokens["access_token"])), [201, 404, 403])
        for form, headers, token in (
                ({"token": tokens["access_token"], "token_type_hint": "access_token",
                  "client_id": "webapp"}, None, tokens["access_token"]),
                ({"token": admin["access_token"]},
                 {"Authorization": basic(ADMIN_ID, ADMIN_SECRET)}, admin["access_token"])):
            response, content = yield self.call("POST", "/oauth/revoke", form=form,
                                                headers=headers)
            self.assertEqual((response.code, content), (200, b""))
            self.assertEqual((yield self.uses(token)), [401, 401, 401])
            self.assertEqual((yield self.introspect(token)), {"active": False})
        # the refresh token still works, and its new access token is not revoked
        _, fresh = yield self.refresh(tokens["refresh_token"])
        self.assertEqual((yield self.uses(fresh["access_token"])), [201, 404, 403])
        self.assertTrue((yield self.introspect(fresh["access_token"]))["active"])

    @defer.inlineCallbacks
    def test_revocation_list_unavailable_fails_closed(self):
        _, admin = yield self.token({"grant_type": "client_credentials"}, cert=None,
                                    headers={"Authorization": basic(ADMIN_ID, ADMIN_SECRET)})
        yield self.grants.close()
        response, content = yield self.call(
            "GET", "/v1/conferences", cert=None,
            headers={"Authorization": "Bearer " + admin["access_token"]})
        self.assertEqual(response.code, 503, content)
        self.assertEqual(json.loads(content)["type"], "urn:perc:problem:store-unavailable")
        self.assertEqual(len(self.flushLoggedErrors(StoreUnavailable)), 1)

    @defer.inlineCallbacks
    def test_introspection(self):
        tokens = yield self.user_tokens()
        admin = {"Authorization": basic(ADMIN_ID, ADMIN_SECRET)}
        response, content = yield self.call("POST", "/oauth/introspect", headers=admin,
                                            form={"token": tokens["access_token"]})
        self.assertEqual(response.code, 200, content)
        self.assertEqual(self.header(response, "cache-control"), "no-store")
        body = json.loads(content)
        self.assertEqual((body["active"], body["sub"], body["client_id"], body["scope"]),
                         (True, f"alice@{DOMAIN}", "webapp", "identity keys"))
        self.assertEqual(body["cnf"]["x5t#S256"], base64.urlsafe_b64encode(
            self.alice_cert.digest).rstrip(b"=").decode())
        response, content = yield self.call("POST", "/oauth/introspect", headers=admin,
                                            form={"token": "garbage"})
        self.assertEqual(json.loads(content), {"active": False})
        response, content = yield self.call("POST", "/oauth/introspect",
                                            form={"token": tokens["access_token"]})
        self.assertEqual(response.code, 401)
        self.assertError(json.loads(content), "invalid_client")
        self.assertIsNotNone(self.header(response, "www-authenticate"))

    @defer.inlineCallbacks
    def test_metadata(self):
        response, content = yield self.call("GET", "/.well-known/oauth-authorization-server",
                                            cert=None)
        self.assertEqual(response.code, 200)
        meta = json.loads(content)
        base = "https://kmf.example.com:8443"
        self.assertEqual(meta["issuer"], ISSUER)
        self.assertEqual(meta["authorization_endpoint"], base + "/oauth/authorize")
        self.assertEqual(meta["token_endpoint"], base + "/oauth/token")
        self.assertEqual(meta["revocation_endpoint"], base + "/oauth/revoke")
        self.assertEqual(meta["introspection_endpoint"], base + "/oauth/introspect")
        self.assertEqual(meta["jwks_uri"], base + "/.well-known/jwks.json")
        self.assertEqual(meta["code_challenge_methods_supported"], ["S256"])
        self.assertEqual(sorted(meta["grant_types_supported"]),
                         ["authorization_code", "client_credentials", "refresh_token"])
        self.assertEqual(meta["token_endpoint_auth_methods_supported"],
                         ["client_secret_basic", "none"])
        self.assertEqual(meta["response_types_supported"], ["code"])
        self.assertIn("identity", meta["scopes_supported"])

    # --- authorization errors -----------------------------------------------------------

    @defer.inlineCallbacks
    def test_untrusted_client_or_redirect_shows_error_page(self):
        for overrides in ({"redirect_uri": "https://evil.example/cb"}, {"client_id": "nobody"},
                          {"redirect_uri": None}):
            response, content = yield self.call("GET", self.authorize_query(**overrides))
            self.assertEqual(response.code, 400, content)
            self.assertIsNone(self.header(response, "location"))
            self.assertEqual(self.header(response, "content-type"), "text/html; charset=utf-8")
            self.assertNotIn(b"evil.example", content)
            self.assertNotIn(b"<form", content)

    @defer.inlineCallbacks
    def test_other_request_errors_redirect(self):
        for overrides, error in (({"code_challenge": None}, "invalid_request"),
                                 ({"code_challenge_method": "plain"}, "invalid_request"),
                                 ({"response_type": "token"}, "unsupported_response_type"),
                                 ({"scope": "admin"}, "invalid_scope")):
            response, content = yield self.call("GET", self.authorize_query(**overrides))
            self.assertEqual(response.code, 302, (overrides, content))
            location = self.header(response, "location")
            self.assertTrue(location.startswith(REDIRECT + "?"), location)
            query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(location).query))
            self.assertEqual((query["error"], query["state"]), (error, STATE))

    @defer.inlineCallbacks
    def test_wrong_password_is_uniform(self):
        _, _, fields = yield self.login_form()
        request = {n: v for n, v in fields.items() if n != "csrf_token"}
        pages = []
        for username, password in (("alice", "wrong"), ("mallory", PASSWORD)):
            response, content = yield self.submit(fields, username, password)
            self.assertEqual(response.code, 200, content)
            self.assertIsNone(self.header(response, "location"))
            page = content.decode()
            self.assertIn("Invalid username or password.", page)
            pages.append(re.sub(r'name="csrf_token" value="[^"]*"', "", page))
            self.assertEqual(HIDDEN.findall(page)[:-1],
                             [(n, html.escape(v)) for n, v in request.items()])
            fields = hidden_fields(page)  # the form shown again, with a new token
        self.assertEqual(pages[0], pages[1])

    @defer.inlineCallbacks
    def test_csrf_token_required(self):
        _, _, fields = yield self.login_form()
        request = {k: v for k, v in fields.items() if k != "csrf_token"}
        issued, nonce, mac = fields["csrf_token"].split(".")
        binding = self.jar[LOGIN_COOKIE]
        stale = self.api._form_token(request, int(reactor.seconds()) - self.api.form_lifetime
                                     - 10, nonce, binding)
        for bad in (request, dict(fields, csrf_token=f"{issued}.{nonce}.{mac[:-2]}AA"),
                    dict(fields, csrf_token=f"{int(issued) - 1}.{nonce}.{mac}"),
                    dict(fields, csrf_token=f"{issued}.{'A' * 22}.{mac}"),
                    dict(fields, csrf_token=f"{issued}.{mac}"),  # the old format
                    dict(fields, scope="identity"),  # signed for other parameters
                    dict(fields, csrf_token=stale),
                    # str.isdigit() but not int(): found next to the same bug in SDP
                    dict(fields, csrf_token=f"\u00b2{issued}.{mac}")):
            response, content = yield self.submit(bad)
            self.assertEqual(response.code, 403, content)
            self.assertIsNone(self.header(response, "location"))
        # ... and the untouched form still works
        response, _ = yield self.submit(fields)
        self.assertEqual(response.code, 302)

    @defer.inlineCallbacks
    def test_login_form_cookie(self):
        response, _, fields = yield self.login_form()
        [cookie] = response.headers.getRawHeaders("set-cookie")
        name, _, rest = cookie.partition("=")
        value, *attributes = [a.strip() for a in rest.split(";")]
        self.assertEqual(name, LOGIN_COOKIE)
        self.assertRegex(value, r"^[A-Za-z0-9_-]{22}$")
        self.assertEqual(sorted(a.split("=")[0].lower() for a in attributes),
                         ["httponly", "max-age", "path", "samesite", "secure"])  # no Domain
        self.assertIn("Path=/", attributes)
        self.assertIn("SameSite=Lax", attributes)
        self.assertEqual(self.header(response, "referrer-policy"), "same-origin")
        # the browser keeps its binding: a second form (another tab) shares it
        response, _, second = yield self.login_form()
        self.assertIn(f"{LOGIN_COOKIE}={value};", self.header(response, "set-cookie"))
        response, _ = yield self.submit(fields)
        self.assertEqual(response.code, 302)
        response, _ = yield self.submit(second)
        self.assertEqual(response.code, 302)

    @defer.inlineCallbacks
    def test_login_form_is_single_use(self):
        _, _, fields = yield self.login_form()
        response, _ = yield self.submit(fields, password="wrong")  # used, even refused
        self.assertEqual(response.code, 200)
        for password in ("wrong", PASSWORD):
            response, content = yield self.submit(fields, password=password)
            self.assertEqual(response.code, 403, content)
            self.assertIn(b"already been used", content)
            self.assertIsNone(self.header(response, "location"))
        # concurrent replays of one form: one is evaluated
        _, _, fields = yield self.login_form()
        answers = yield defer.gatherResults([self.submit(fields) for _ in range(5)])
        self.assertEqual(sorted(response.code for response, _ in answers), [302] + [403] * 4)
        # the OIDC button's form shares the token: used by a password login, it is refused
        _, _, fields = yield self.login_form()
        response, _ = yield self.submit(fields)
        self.assertEqual(response.code, 302)
        response, _ = yield self.call("POST", "/oauth/authorize",
                                      form=dict(fields, login="oidc"))
        self.assertEqual(response.code, 403)

    @defer.inlineCallbacks
    def test_login_form_bound_to_the_browser(self):
        _, _, fields = yield self.login_form()
        binding = self.jar.pop(LOGIN_COOKIE)
        response, content = yield self.submit(fields)  # no cookie
        self.assertEqual(response.code, 403, content)
        self.assertIn(b"needs cookies", content)
        for other in ("B" * 22, "short", binding[:-1] + ("A" if binding[-1] != "A" else "B")):
            self.jar[LOGIN_COOKIE] = other  # another browser's (or a forged) cookie
            response, content = yield self.submit(fields)
            self.assertEqual(response.code, 403, content)
            self.assertIsNone(self.header(response, "location"))
        self.jar[LOGIN_COOKIE] = binding  # refusals did not use the form up
        response, _ = yield self.submit(fields)
        self.assertEqual(response.code, 302)

    @defer.inlineCallbacks
    def test_login_form_refuses_cross_origin_posts(self):
        port = self.port.getHost().port
        for origin in ("https://evil.example", "null", f"http://127.0.0.1:{port}",
                       f"https://127.0.0.1:{port + 1}", "https://kmf.example.com",
                       "https://kmf.example.com:8443.evil.example", "garbage"):
            _, _, fields = yield self.login_form()
            response, content = yield self.call(
                "POST", "/oauth/authorize", headers={"Origin": origin},
                form=dict(fields, username="alice", password=PASSWORD))
            self.assertEqual(response.code, 403, (origin, content))
            self.assertIn(b"from another site", content)
            self.assertIsNone(self.header(response, "location"))
            response, _ = yield self.submit(fields)  # the refusal did not use the form up
            self.assertEqual(response.code, 302, origin)
        # the KMF's own origins: public_url's, and the one the browser connected to
        for origin in ("https://kmf.example.com:8443", "https://KMF.example.com:8443",
                       f"https://127.0.0.1:{port}"):
            _, _, fields = yield self.login_form()
            response, content = yield self.call(
                "POST", "/oauth/authorize", headers={"Origin": origin},
                form=dict(fields, username="alice", password=PASSWORD))
            self.assertEqual(response.code, 302, (origin, content))

    @defer.inlineCallbacks
    def test_rate_limit(self):
        _, _, fields = yield self.login_form()
        for _ in range(3):
            response, content = yield self.submit(fields, password="wrong")
            self.assertEqual(response.code, 200)
            fields = hidden_fields(content.decode())
        response, content = yield self.submit(fields)  # even the right password now
        self.assertEqual(response.code, 429, content)
        self.assertIsNone(self.header(response, "location"))
        self.assertGreater(int(self.header(response, "retry-after")), 0)

    @defer.inlineCallbacks
    def test_concurrent_wrong_passwords_counted_before_evaluation(self):
        """40 concurrent wrong passwords from one address: 5 per user, 20 per address."""
        self.oauth.rate_limiter = LoginRateLimiter(user_limit=5, address_limit=20, window=900)
        forms = []
        for _ in range(80):
            _, _, fields = yield self.login_form()
            forms.append(fields)
        for users, evaluated in ((["alice"] * 40, 5), ([f"user{i}" for i in range(40)], 15)):
            answers = yield defer.gatherResults([
                self.submit(forms.pop(), user, "wrong") for user in users])
            codes = sorted(response.code for response, _ in answers)
            self.assertEqual(codes, [200] * evaluated + [429] * (40 - evaluated))
            for response, _ in answers:
                self.assertIsNone(self.header(response, "location"))

    # --- token endpoint errors -------------------------------------------------------------

    @defer.inlineCallbacks
    def test_token_request_errors(self):
        _, body = yield self.token({"grant_type": "password", "client_id": "webapp",
                                    "username": "alice", "password": PASSWORD}, status=400)
        self.assertError(body, "unsupported_grant_type")
        _, body = yield self.token({"client_id": "webapp"}, status=400)
        self.assertError(body, "invalid_request")
        for raw, content_type in ((b'{"grant_type": "client_credentials"}', "application/json"),
                                  (b"grant_type=refresh_token&grant_type=refresh_token"
                                   b"&client_id=webapp", FORM),
                                  (b"grant_type=refresh_token&client_id=web%FFapp", FORM),
                                  (b"grant_type=refresh_token\xff&client_id=webapp", FORM),
                                  (b"grant_type&&=", FORM)):
            _, body = yield self.token(None, raw=raw, content_type=content_type, status=400)
            self.assertError(body, "invalid_request")
        response, _ = yield self.call("GET", "/oauth/token")
        self.assertEqual(response.code, 405)

    @defer.inlineCallbacks
    def test_no_clients_file_means_invalid_client(self):
        """The daemon's wiring: a missing clients file leaves no clients."""
        cfg = config.validate("kmf", "test.toml", {
            "oauth": {"clients_file": os.path.join(self.dir, "absent.toml")},
            "auth": {"users_file": os.path.join(self.dir, "users.jsonl")}})
        server = service.authorization_server(cfg, self.keys, ISSUER, reactor)
        self.assertEqual(len(server.clients), 0)
        self.api.oauth = server
        _, body = yield self.token({"grant_type": "refresh_token", "client_id": "webapp",
                                    "refresh_token": "x"}, status=401)
        self.assertError(body, "invalid_client")


class SharedRedisTests(unittest.TestCase):
    """Two KMFs sharing a real redis-server (and, behind one name, their form secret)."""

    timeout = 30
    call = OAuthHttpTests.call
    header = OAuthHttpTests.header
    authorize_query = OAuthHttpTests.authorize_query
    login_form = OAuthHttpTests.login_form
    submit = OAuthHttpTests.submit
    code = OAuthHttpTests.code
    token = OAuthHttpTests.token
    user_tokens = OAuthHttpTests.user_tokens
    uses = OAuthHttpTests.uses
    introspect = OAuthHttpTests.introspect

    @defer.inlineCallbacks
    def setUp(self):
        if not os.access(REDIS_SERVER, os.X_OK):
            raise unittest.SkipTest(f"{REDIS_SERVER} not installed")
        yield OAuthHttpTests.setUp(self)  # KMF "a"; its grants are moved to Redis below
        redis_dir = os.path.join(self.dir, "redis")
        os.makedirs(redis_dir)
        self.redis = RedisServer(redis_dir)
        self.addCleanup(lambda: self.redis.stop())
        yield self.redis.start()
        self.bases = []
        for name in ("a", "b"):
            grants = RedisGrantStore("127.0.0.1", self.redis.port, password=self.redis.password,
                                     namespace="shared", connect_timeout=3, timeout=5)
            self.addCleanup(grants.close)
            yield grants.connect()
            if name == "a":
                self.oauth.grants = grants
                self.bases.append(self.base)
                continue
            oauth = AuthorizationServer(self.oauth.clients, grants, self.keys,
                                        self.oauth.authenticator, self.limiter, issuer=ISSUER,
                                        audience=ISSUER)
            api = KmfApi(store=self.store, kek=self.api.kek, keys=self.keys, idp_domain=DOMAIN,
                         issuer=ISSUER, clock=reactor, oauth=oauth,
                         public_url="https://kmf.example.com:8443",
                         form_secret=self.api.form_secret)
            context = tls.server_context_factory(self.server_cert.cert_path,
                                                 self.server_cert.key_path,
                                                 request_client_certificate=True)
            port = reactor.listenSSL(0, kmf_site(api), context, interface="127.0.0.1")
            self.addCleanup(port.stopListening)
            self.bases.append(f"https://127.0.0.1:{port.getHost().port}")

    @defer.inlineCallbacks
    def test_revoked_at_one_kmf_refused_at_the_other(self):
        a, b = self.bases
        tokens = yield self.user_tokens()  # from KMF a
        self.assertEqual((yield self.uses(tokens["access_token"], base=b)), [201, 404, 403])
        self.assertTrue((yield self.introspect(tokens["access_token"], base=b))["active"])
        response, _ = yield self.call("POST", "/oauth/revoke", base=a,
                                      form={"token": tokens["access_token"],
                                            "client_id": "webapp"})
        self.assertEqual(response.code, 200)
        for base in (b, a):
            self.assertEqual((yield self.uses(tokens["access_token"], base=base)),
                             [401, 401, 401])
            self.assertEqual((yield self.introspect(tokens["access_token"], base=base)),
                             {"active": False})

    @defer.inlineCallbacks
    def test_login_form_used_at_one_kmf_refused_at_the_other(self):
        a, b = self.bases
        _, _, fields = yield self.login_form()  # shown by KMF a
        form = dict(fields, username="alice", password=PASSWORD)
        response, _ = yield self.call("POST", "/oauth/authorize", form=form, base=b)
        self.assertEqual(response.code, 302)  # one secret: b accepts a's form ...
        for base in (a, b):  # ... once
            response, content = yield self.call("POST", "/oauth/authorize", form=form,
                                                base=base)
            self.assertEqual(response.code, 403, content)
            self.assertIn(b"already been used", content)
        _, _, fields = yield self.login_form()
        form = dict(fields, username="alice", password=PASSWORD)
        answers = yield defer.gatherResults([
            self.call("POST", "/oauth/authorize", form=form, base=base) for base in (a, b) * 3])
        self.assertEqual(sorted(response.code for response, _ in answers), [302] + [403] * 5)
