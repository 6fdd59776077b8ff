"""perc_daemons.kmf.oauth and kmf.clients: real keys, real user file, real SQLite grants."""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import urllib.parse
from pathlib import Path

from argon2 import PasswordHasher
from twisted.internet import defer
from twisted.logger import capturedLogs
from twisted.trial import unittest

from perc_daemons.config import ConfigError
from perc_daemons.kmf.auth import LoginRateLimiter
from perc_daemons.kmf.auth.file import FileAuthenticator, add_user
from perc_daemons.kmf.clients import (
    MIN_SECRET_LENGTH,
    Client,
    ClientAuthLimiter,
    ClientFileError,
    ClientRateLimited,
    ClientRegistry,
    InvalidClient,
    check_redirect_uri,
    hash_client_secret,
    new_client_secret,
)
from perc_daemons.kmf.oauth import (
    AuthorizationServer,
    LoginFailed,
    LoginRateLimited,
    OAuthError,
)
from perc_daemons.kmf.signing import SigningKeys
from perc_daemons.kmf.tokens import (
    CertificateMismatch,
    certificate_thumbprint,
    verify_access_token,
)
from perc_daemons.store.grants_sqlite import SqliteGrantStore

T0 = 1_800_000_000.0
ISSUER = "https://idp.example.com"
FAST = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
PASSWORD = "correct horse battery staple"
ROOM_SECRET = "room-secret-" + "x" * 32  # a $sha256$ entry: at least 43 characters
RS_SECRET = "rs-secret-" + "y" * 20  # a legacy argon2id entry
WEB_CB = "https://conf.example.com/cb?tenant=a"
CERT = b"0\x82\x01\x00 the client's DTLS certificate"
OTHER_CERT = b"0\x82\x01\x00 another certificate"

CLIENTS = """
[client.web]
type = "public"
grant_types = ["authorization_code", "refresh_token"]
redirect_uris = ["{web_cb}", "http://127.0.0.1:8400/cb"]
scopes = ["conference", "roster"]

[client.other-web]
type = "public"
grant_types = ["authorization_code", "refresh_token"]
redirect_uris = ["https://other.example.com/cb"]
scopes = ["conference"]

[client.room-101]
type = "confidential"
secret_hash = "{room_hash}"
grant_types = ["client_credentials"]
scopes = ["conference", "media"]

[client.rs]
type = "confidential"
secret_hash = "{rs_hash}"
grant_types = ["client_credentials"]
scopes = []
"""


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    return verifier, b64(hashlib.sha256(verifier.encode()).digest())


def write_file(path: str, text: str, mode: int = 0o600) -> str:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


class ClientRegistryTests(unittest.TestCase):
    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)

    def write(self, text: str, mode: int = 0o600) -> str:
        return write_file(os.path.join(self.dir, "kmf-clients.toml"), text, mode)

    def good(self) -> str:
        return CLIENTS.format(web_cb=WEB_CB, room_hash=hash_client_secret(ROOM_SECRET),
                              rs_hash=FAST.hash(RS_SECRET))

    def test_load(self):
        with capturedLogs() as events:
            registry = ClientRegistry.load(self.write(self.good(), 0o640), hasher=FAST)
        # the legacy argon2id entry (and only it) is accepted with a warning to re-hash it
        warnings = [e for e in events if "argon2id" in e.get("log_format", "")]
        self.assertEqual([e["client_id"] for e in warnings], ["rs"])
        self.assertEqual(len(registry), 4)
        web = registry.get("web")
        self.assertFalse(web.confidential)
        self.assertEqual(web.redirect_uris, (WEB_CB, "http://127.0.0.1:8400/cb"))
        self.assertTrue(registry.get("room-101").confidential)
        self.assertIsNone(registry.get("nobody"))
        self.assertNotIn("argon2", repr(registry.get("room-101")))

    def assertFileError(self, text: str, key: str, mode: int = 0o600) -> ClientFileError:
        with self.assertRaises(ClientFileError) as cm:
            ClientRegistry.load(self.write(text, mode), hasher=FAST)
        self.assertEqual(cm.exception.key, key)
        self.assertIsInstance(cm.exception, ConfigError)
        self.assertIn(os.path.join(self.dir, "kmf-clients.toml"), str(cm.exception))
        return cm.exception

    def test_mode_too_open(self):
        e = self.assertFileError(self.good(), "", 0o644)
        self.assertIn("0644", e.reason)
        self.assertFileError(self.good(), "", 0o660)

    def test_bad_files(self):
        web = '[client.web]\ntype = "public"\ngrant_types = ["authorization_code"]\n'
        cases = [
            ("[client.web]\ntype = 'public'\ncolour = 1\n", "client.web.colour"),
            ('[client.web]\ntype = "secret"\n', "client.web.type"),
            (web + 'secret_hash = "$argon2id$x"\nredirect_uris = ["https://a/cb"]\n',
             "client.web.secret_hash"),
            ('[client.s]\ntype = "confidential"\ngrant_types = ["client_credentials"]\n'
             'secret_hash = "$sha256$abc"\n', "client.s.secret_hash"),
            ('[client.s]\ntype = "confidential"\ngrant_types = ["client_credentials"]\n'
             'secret_hash = "plain-secret"\n', "client.s.secret_hash"),
            (web, "client.web.redirect_uris"),
            (web + 'redirect_uris = ["http://a.example.com/cb"]\n', "client.web.redirect_uris"),
            (web + 'redirect_uris = ["https://a/cb#frag"]\n', "client.web.redirect_uris"),
            ('[client.web]\ntype = "public"\ngrant_types = ["client_credentials"]\n',
             "client.web.grant_types"),
            ('[client.s]\ntype = "confidential"\ngrant_types = ["client_credentials"]\n',
             "client.s.secret_hash"),
            ('[client.s]\ntype = "confidential"\ngrant_types = ["implicit"]\n',
             "client.s.grant_types"),
            ('[client."a b"]\ntype = "public"\n', "client.a b"),
            ("colour = 1\n", "colour"),
            ("[client.web\n", ""),
        ]
        for text, key in cases:
            self.assertFileError(text, key)

    def test_missing_file(self):
        with self.assertRaises(ClientFileError):
            ClientRegistry.load(os.path.join(self.dir, "absent.toml"))

    def test_redirect_uri_rules(self):
        for ok in ("https://a.example/cb", "http://127.0.0.1:1234/cb", "http://[::1]/cb",
                   "https://a.example/cb?x=1"):
            self.assertIsNone(check_redirect_uri(ok), ok)
        for bad in ("http://localhost/cb", "ftp://a/cb", "/relative", "https://u@a/cb",
                    "https://a/c b", "https://a:99999/cb", "", None):
            self.assertIsNotNone(check_redirect_uri(bad), bad)

    def test_secret_hash(self):
        secret = new_client_secret()
        self.assertEqual(len(secret), MIN_SECRET_LENGTH)
        self.assertEqual(len(base64.urlsafe_b64decode(secret + "=")), 32)
        self.assertNotEqual(secret, new_client_secret())
        made = hash_client_secret(secret)
        self.assertEqual(made, "$sha256$" + b64(hashlib.sha256(secret.encode()).digest()))
        self.assertEqual(hash_client_secret(ROOM_SECRET + " é"),
                         "$sha256$" + b64(hashlib.sha256((ROOM_SECRET + " é").encode())
                                          .digest()))
        for bad in (secret[:-1], "", "x" * 42, ROOM_SECRET + "\n", "x" * 1025, None):
            self.assertRaises(ValueError, hash_client_secret, bad)

    @defer.inlineCallbacks
    def test_authenticate(self):
        registry = ClientRegistry.load(self.write(self.good()), hasher=FAST)
        client = yield registry.authenticate("room-101", ROOM_SECRET)
        self.assertEqual(client.client_id, "room-101")
        for cid, secret in (("room-101", "wrong"), ("room-101", ROOM_SECRET[:-1]),
                            ("nobody", ROOM_SECRET), ("web", ROOM_SECRET), ("room-101", ""),
                            ("room-101", None), ("rs", ROOM_SECRET)):
            with self.assertRaises(InvalidClient):
                yield registry.authenticate(cid, secret)
        self.assertEqual(registry.slow_verifications, 1)  # rs only: a legacy argon2id entry
        # the migration path: the legacy entry still works, through argon2id
        client = yield registry.authenticate("rs", RS_SECRET)
        self.assertEqual((client.client_id, registry.slow_verifications), ("rs", 2))
        # the fast path is synchronous: no thread, no reactor turn
        d = registry.authenticate("room-101", ROOM_SECRET)
        self.assertEqual(self.successResultOf(d).client_id, "room-101")
        self.failureResultOf(registry.authenticate("nobody", ROOM_SECRET), InvalidClient)
        self.failureResultOf(registry.authenticate("room-101", "x" * 60), InvalidClient)
        # even a secret matching the dummy digest does not make an unknown client
        registry._dummy_digest = hashlib.sha256(b"dummy" * 10).digest()
        for cid in ("nobody", "web"):
            self.failureResultOf(registry.authenticate(cid, "dummy" * 10), InvalidClient)
        # a $sha256$ entry never matches a short secret, even if someone hashed one
        short = Client("short", "confidential", frozenset({"client_credentials"}), (),
                       frozenset(), "$sha256$" + b64(hashlib.sha256(b"short").digest()))
        self.failureResultOf(ClientRegistry([short]).authenticate("short", "short"),
                             InvalidClient)

    @defer.inlineCallbacks
    def test_failed_authentications_are_limited(self):
        limiter = ClientAuthLimiter(client_limit=3, address_limit=5, window=60)
        registry = ClientRegistry.load(self.write(self.good()), hasher=FAST, limiter=limiter)
        a, b = "192.0.2.1", "198.51.100.7"
        for _ in range(3):
            self.failureResultOf(registry.authenticate("room-101", "wrong", a), InvalidClient)
        f = self.failureResultOf(registry.authenticate("room-101", "wrong", b),
                                 ClientRateLimited)
        self.assertGreater(f.value.retry_after, 0)
        # the right secret of a $sha256$ entry is never refused: a flood naming the
        # client cannot lock it out
        self.assertEqual(self.successResultOf(
            registry.authenticate("room-101", ROOM_SECRET, b)).client_id, "room-101")
        # per address: unknown client ids count too
        for i in range(5):
            self.failureResultOf(registry.authenticate(f"nobody-{i}", "x", "203.0.113.9"),
                                 InvalidClient)
        self.failureResultOf(registry.authenticate("other", "x", "203.0.113.9"),
                             ClientRateLimited)
        self.failureResultOf(registry.authenticate("other", "x", "203.0.113.10"),
                             InvalidClient)
        # a legacy argon2id entry: concurrent wrong secrets are counted before they are
        # verified, and beyond the limit nothing is verified, not even the right secret
        results = yield defer.DeferredList(
            [registry.authenticate("rs", f"wrong-{i}", f"192.0.2.{10 + i}") for i in range(10)],
            consumeErrors=True)
        refused = sorted(type(f.value).__name__ for _, f in results)
        self.assertEqual(refused, ["ClientRateLimited"] * 7 + ["InvalidClient"] * 3)
        self.assertEqual(registry.slow_verifications, 3)
        with self.assertRaises(ClientRateLimited):
            yield registry.authenticate("rs", RS_SECRET, "192.0.2.99")
        self.assertEqual(registry.slow_verifications, 3)


class OAuthTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        base = Path(self.mktemp())
        base.mkdir()
        self.keys = SigningKeys.create(base / "signing", T0, max_token_lifetime=600)
        users = str(base / "users")
        add_user(users, "alice", PASSWORD, hasher=FAST)
        add_user(users, "bob", PASSWORD, hasher=FAST)
        self.authenticator = FileAuthenticator(users, "example.com", hasher=FAST)
        text = CLIENTS.format(web_cb=WEB_CB, room_hash=hash_client_secret(ROOM_SECRET),
                              rs_hash=FAST.hash(RS_SECRET))
        self.clients = ClientRegistry.load(write_file(str(base / "clients.toml"), text),
                                           hasher=FAST)
        self.grants = yield SqliteGrantStore.open(str(base / "db" / "kmf.sqlite3"))
        self.addCleanup(self.grants.close)
        self.limiter = LoginRateLimiter(user_limit=3, address_limit=10, window=60)
        self.server = AuthorizationServer(
            self.clients, self.grants, self.keys, self.authenticator, self.limiter,
            issuer=ISSUER, audience="kmf", access_token_lifetime=300,
            refresh_token_lifetime=3600, code_lifetime=60)

    # helpers

    def authorize(self, **kw):
        args = {"client_id": "web", "redirect_uri": WEB_CB, "response_type": "code",
                "scope": "conference roster", "state": "st-123", "code_challenge": None,
                "code_challenge_method": "S256", "username": "alice", "password": PASSWORD,
                "source_address": "192.0.2.7", "now": T0}
        args.update(kw)
        return self.server.authorize(**args)

    @defer.inlineCallbacks
    def get_code(self, **kw):
        verifier, challenge = pkce()
        kw.setdefault("code_challenge", challenge)
        url = yield self.authorize(**kw)
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
        return query["code"][0], verifier, url

    def redeem(self, code, verifier, *, client_id="web", redirect_uri=WEB_CB, cert=None,
               now=T0 + 1, client_auth=None):
        params = {"code": code, "code_verifier": verifier, "redirect_uri": redirect_uri,
                  "client_id": client_id}
        return self.server.token("authorization_code", params, client_auth, cert, now)

    def refresh(self, token, *, client_id="web", scope=None, cert=None, now=T0 + 10):
        params = {"refresh_token": token, "client_id": client_id}
        if scope is not None:
            params["scope"] = scope
        return self.server.token("refresh_token", params, None, cert, now)

    def verify(self, token, now=T0 + 2, cert=None):
        return verify_access_token(token, self.keys, issuer=ISSUER, audience="kmf", now=now,
                                   presented_certificate=cert)

    @defer.inlineCallbacks
    def assertOAuthError(self, d, error, status=400):
        try:
            result = yield d
        except OAuthError as e:
            self.assertEqual((e.error, e.status), (error, status), str(e))
            return e
        self.fail(f"expected {error}, got {result!r}")

    @defer.inlineCallbacks
    def tokens(self, **kw):
        code, verifier, _ = yield self.get_code()
        response = yield self.redeem(code, verifier, **kw)
        return response

    # authorization code + PKCE

    @defer.inlineCallbacks
    def test_full_flow_with_rotation_and_reuse(self):
        code, verifier, url = yield self.get_code()
        parts = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qs(parts.query)
        self.assertEqual(url.split("?")[0], WEB_CB.split("?")[0])
        self.assertEqual(query["tenant"], ["a"])  # the registered query is kept
        self.assertEqual(query["state"], ["st-123"])
        self.assertEqual(query["iss"], [ISSUER])

        first = yield self.redeem(code, verifier)
        self.assertEqual(first["token_type"], "Bearer")
        self.assertEqual(first["expires_in"], 300)
        self.assertEqual(first["scope"], "conference roster")
        at = self.verify(first["access_token"])
        self.assertEqual((at.subject, at.client_id), ("alice@example.com", "web"))
        self.assertEqual(at.scopes, {"conference", "roster"})
        self.assertIsNone(at.thumbprint)

        second = yield self.refresh(first["refresh_token"], now=T0 + 100)
        self.assertNotEqual(second["refresh_token"], first["refresh_token"])
        self.assertEqual(self.verify(second["access_token"], T0 + 101).subject,
                         "alice@example.com")
        third = yield self.refresh(second["refresh_token"], now=T0 + 200)

        # the first refresh token again: reuse -> the family is revoked
        yield self.assertOAuthError(self.refresh(first["refresh_token"], now=T0 + 300),
                                    "invalid_grant")
        yield self.assertOAuthError(self.refresh(third["refresh_token"], now=T0 + 301),
                                    "invalid_grant")

    @defer.inlineCallbacks
    def test_code_is_one_time(self):
        code, verifier, _ = yield self.get_code()
        yield self.redeem(code, verifier)
        yield self.assertOAuthError(self.redeem(code, verifier), "invalid_grant")

    @defer.inlineCallbacks
    def test_wrong_verifier_burns_the_code(self):
        code, verifier, _ = yield self.get_code()
        yield self.assertOAuthError(self.redeem(code, pkce()[0]), "invalid_grant")
        yield self.assertOAuthError(self.redeem(code, verifier), "invalid_grant")

    @defer.inlineCallbacks
    def test_verifier_must_be_well_formed(self):
        code, _, _ = yield self.get_code(code_challenge=b64(hashlib.sha256(b"s").digest()))
        yield self.assertOAuthError(self.redeem(code, "s"), "invalid_grant")
        yield self.assertOAuthError(self.redeem(code, ""), "invalid_request")

    @defer.inlineCallbacks
    def test_expired_code(self):
        code, verifier, _ = yield self.get_code()
        yield self.assertOAuthError(self.redeem(code, verifier, now=T0 + 60), "invalid_grant")

    @defer.inlineCallbacks
    def test_redirect_mismatch_at_token(self):
        code, verifier, _ = yield self.get_code()
        yield self.assertOAuthError(
            self.redeem(code, verifier, redirect_uri="http://127.0.0.1:8400/cb"), "invalid_grant")

    @defer.inlineCallbacks
    def test_code_of_another_client(self):
        code, verifier, _ = yield self.get_code()
        yield self.assertOAuthError(
            self.redeem(code, verifier, client_id="other-web",
                        redirect_uri="https://other.example.com/cb"), "invalid_grant")
        yield self.assertOAuthError(self.redeem(code, verifier), "invalid_grant")  # burnt

    @defer.inlineCallbacks
    def test_plain_and_missing_challenge(self):
        _, challenge = pkce()
        e = yield self.assertOAuthError(
            self.authorize(code_challenge=challenge, code_challenge_method="plain"),
            "invalid_request", 302)
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(e.redirect_url()).query)
        self.assertEqual(query["error"], ["invalid_request"])
        self.assertEqual(query["state"], ["st-123"])
        yield self.assertOAuthError(
            self.authorize(code_challenge=challenge, code_challenge_method=None),
            "invalid_request", 302)
        yield self.assertOAuthError(self.authorize(code_challenge=None), "invalid_request", 302)
        yield self.assertOAuthError(self.authorize(code_challenge="short"), "invalid_request",
                                    302)

    @defer.inlineCallbacks
    def test_untrusted_client_or_redirect_not_redirected(self):
        _, challenge = pkce()
        for kw in ({"client_id": "nobody"}, {"redirect_uri": "https://conf.example.com/cb"},
                   {"redirect_uri": "https://evil.example/cb"}):
            e = yield self.assertOAuthError(self.authorize(code_challenge=challenge, **kw),
                                            "invalid_request")
            self.assertIsNone(e.redirect_url())

    @defer.inlineCallbacks
    def test_authorize_refusals_redirected(self):
        _, challenge = pkce()
        yield self.assertOAuthError(self.authorize(code_challenge=challenge, scope="admin"),
                                    "invalid_scope", 302)
        yield self.assertOAuthError(self.authorize(code_challenge=challenge, response_type="token"),
                                    "unsupported_response_type", 302)

    @defer.inlineCallbacks
    def test_default_scope_is_the_clients(self):
        code, verifier, _ = yield self.get_code(scope=None)
        response = yield self.redeem(code, verifier)
        self.assertEqual(response["scope"], "conference roster")

    # logins

    @defer.inlineCallbacks
    def test_uniform_login_errors(self):
        _, challenge = pkce()
        errors = []
        for user, password in (("alice", "wrong"), ("nobody", PASSWORD), ("bad name!", "x"),
                               ("alice", "")):
            with self.assertRaises(LoginFailed) as cm:
                yield self.authorize(code_challenge=challenge, username=user, password=password)
            errors.append((cm.exception.response(), cm.exception.status,
                           cm.exception.redirect_url()))
        self.assertEqual(len(set(map(repr, errors))), 1, errors)
        self.assertEqual(errors[0][0]["error_description"], "invalid credentials")

    @defer.inlineCallbacks
    def test_rate_limited_after_bad_passwords(self):
        _, challenge = pkce()
        with capturedLogs() as events:
            for _ in range(3):
                with self.assertRaises(LoginFailed):
                    yield self.authorize(code_challenge=challenge, password="wrong")
            with self.assertRaises(LoginRateLimited) as cm:  # even with the right password
                yield self.authorize(code_challenge=challenge)
            with self.assertRaises(LoginRateLimited):
                yield self.authorize(code_challenge=challenge)
        # security events: warnings with the user and address as fields; the second
        # refusal by the limiter within a minute is counted, not logged
        refused = [e for e in events if "login refused" in e["log_format"]]
        self.assertEqual([(e["log_level"].name, e["user"], e["address"], e["reason"])
                          for e in refused],
                         [("warn", "alice", "192.0.2.7", "wrong password for alice")] * 3
                         + [("warn", "alice", "192.0.2.7", "rate_limited")])
        self.assertNotIn(PASSWORD, repr(events))
        self.assertEqual(cm.exception.status, 429)
        self.assertGreater(cm.exception.retry_after, 0)
        # another user from the same address still may; and alice after the window
        yield self.authorize(code_challenge=challenge, username="bob")
        yield self.authorize(code_challenge=challenge, now=T0 + 61)

    # client authentication and grant types

    @defer.inlineCallbacks
    def test_client_credentials(self):
        response = yield self.server.token("client_credentials", {"scope": "media"},
                                           ("room-101", ROOM_SECRET), None, T0)
        self.assertNotIn("refresh_token", response)
        at = self.verify(response["access_token"], T0 + 1)
        self.assertEqual((at.subject, at.client_id, at.scopes), ("room-101", "room-101",
                                                                 {"media"}))
        yield self.assertOAuthError(
            self.server.token("client_credentials", {"scope": "roster"},
                              ("room-101", ROOM_SECRET), None, T0), "invalid_scope")

    @defer.inlineCallbacks
    def test_wrong_client_secret(self):
        for auth in (("room-101", "wrong"), ("nobody", ROOM_SECRET), ("web", "x")):
            yield self.assertOAuthError(
                self.server.token("client_credentials", {}, auth, None, T0), "invalid_client",
                401)
        # a confidential client cannot pose as public
        yield self.assertOAuthError(
            self.server.token("client_credentials", {"client_id": "room-101"}, None, None, T0),
            "invalid_client", 401)

    @defer.inlineCallbacks
    def test_public_client_credentials_refused(self):
        yield self.assertOAuthError(
            self.server.token("client_credentials", {"client_id": "web"}, None, None, T0),
            "unauthorized_client")
        yield self.assertOAuthError(
            self.server.token("password", {"client_id": "web"}, None, None, T0),
            "unsupported_grant_type")
        yield self.assertOAuthError(
            self.server.token("authorization_code", {"client_id": "room-101"},
                              ("room-101", ROOM_SECRET), None, T0), "unauthorized_client")

    # refresh

    @defer.inlineCallbacks
    def test_scope_narrowing_and_widening(self):
        first = yield self.tokens()
        yield self.assertOAuthError(self.refresh(first["refresh_token"],
                                                 scope="conference media"), "invalid_scope")
        narrow = yield self.refresh(first["refresh_token"], scope="conference")
        self.assertEqual(self.verify(narrow["access_token"], T0 + 11).scopes, {"conference"})
        # the refresh token keeps the original scope
        again = yield self.refresh(narrow["refresh_token"], now=T0 + 20)
        self.assertEqual(again["scope"], "conference roster")

    @defer.inlineCallbacks
    def test_refresh_cannot_add_scopes_the_client_has(self):
        code, verifier, _ = yield self.get_code(scope="conference")
        first = yield self.redeem(code, verifier)
        yield self.assertOAuthError(self.refresh(first["refresh_token"],
                                                 scope="conference roster"), "invalid_scope")
        again = yield self.refresh(first["refresh_token"])
        self.assertEqual(again["scope"], "conference")

    @defer.inlineCallbacks
    def test_client_credentials_never_for_public_clients(self):
        # even a registry built in code (no file checks) cannot give it to a public client
        web = Client("w", "public", frozenset({"client_credentials"}), (), frozenset({"a"}))
        self.server.clients = ClientRegistry([web], hasher=FAST)
        yield self.assertOAuthError(
            self.server.token("client_credentials", {"client_id": "w"}, None, None, T0),
            "unauthorized_client")

    @defer.inlineCallbacks
    def test_refresh_token_of_another_client(self):
        first = yield self.tokens()
        yield self.assertOAuthError(self.refresh(first["refresh_token"], client_id="other-web"),
                                    "invalid_grant")
        yield self.refresh(first["refresh_token"])  # not rotated by the refusal

    @defer.inlineCallbacks
    def test_refresh_token_expires(self):
        first = yield self.tokens()
        yield self.assertOAuthError(self.refresh(first["refresh_token"], now=T0 + 1 + 3600),
                                    "invalid_grant")
        yield self.assertOAuthError(self.refresh("garbage"), "invalid_grant")

    # certificate binding

    @defer.inlineCallbacks
    def test_certificate_binding(self):
        first = yield self.tokens(cert=CERT)
        at = self.verify(first["access_token"], cert=CERT)
        self.assertEqual(at.thumbprint, certificate_thumbprint(CERT))
        self.assertRaises(CertificateMismatch, self.verify, first["access_token"],
                          cert=OTHER_CERT)
        self.assertRaises(CertificateMismatch, self.verify, first["access_token"])
        # refresh keeps the binding, with or without the certificate ...
        second = yield self.refresh(first["refresh_token"])
        self.assertEqual(self.verify(second["access_token"], T0 + 11, CERT).thumbprint,
                         certificate_thumbprint(CERT))
        # ... and is refused with another one
        yield self.assertOAuthError(self.refresh(second["refresh_token"], cert=OTHER_CERT,
                                                 now=T0 + 20), "invalid_grant")

    @defer.inlineCallbacks
    def test_client_credentials_bound(self):
        response = yield self.server.token("client_credentials", {},
                                           ("room-101", ROOM_SECRET), CERT, T0)
        self.verify(response["access_token"], T0, CERT)
        self.assertRaises(CertificateMismatch, self.verify, response["access_token"], T0,
                          OTHER_CERT)

    # revocation

    @defer.inlineCallbacks
    def test_revoke_then_refresh_fails(self):
        first = yield self.tokens()
        second = yield self.refresh(first["refresh_token"])
        # revoking by another client changes nothing (and still answers 200)
        yield self.server.revoke(second["refresh_token"], "refresh_token", None, T0 + 11,
                                 client_id="other-web")
        yield self.refresh(second["refresh_token"], now=T0 + 12)
        self.assertIsNone((yield self.server.revoke(second["refresh_token"], None, None,
                                                    T0 + 13, client_id="web")))
        yield self.assertOAuthError(self.refresh(second["refresh_token"], now=T0 + 14),
                                    "invalid_grant")
        # the whole family went: the access token is not revocable, but no new ones
        self.assertIsNone((yield self.grants.refresh_token(
            hashlib.sha256(first["refresh_token"].encode()).digest(), T0 + 14)))

    @defer.inlineCallbacks
    def test_revoke_family(self):
        first = yield self.tokens()
        second = yield self.refresh(first["refresh_token"])
        yield self.server.revoke(second["refresh_token"], "refresh_token", None, T0 + 11,
                                 client_id="web")
        yield self.assertOAuthError(self.refresh(second["refresh_token"], now=T0 + 12),
                                    "invalid_grant")
        # unknown tokens, access tokens, garbage: 200 all the same
        for token in ("garbage", second["access_token"], second["refresh_token"]):
            yield self.server.revoke(token, "access_token", None, T0 + 13, client_id="web")
        yield self.assertOAuthError(
            self.server.revoke("x", None, ("room-101", "wrong"), T0), "invalid_client", 401)

    # introspection

    @defer.inlineCallbacks
    def test_introspection(self):
        first = yield self.tokens(cert=CERT)
        rs = ("rs", RS_SECRET)
        info = yield self.server.introspect(first["access_token"], rs, T0 + 2)
        self.assertTrue(info["active"])
        self.assertEqual((info["sub"], info["client_id"], info["scope"]),
                         ("alice@example.com", "web", "conference roster"))
        self.assertEqual((info["iat"], info["exp"]), (int(T0 + 1), int(T0 + 1) + 300))
        self.assertEqual(info["cnf"], {"x5t#S256": b64(certificate_thumbprint(CERT))})
        # expired, garbage, tampered
        for token, now in ((first["access_token"], T0 + 301), ("garbage", T0),
                           ("a.b.c", T0), (first["access_token"][:-4] + "AAAA", T0 + 2), ("", T0)):
            self.assertEqual((yield self.server.introspect(token, rs, now)), {"active": False})
        # refresh tokens: not to another client; inactive once revoked
        self.assertEqual((yield self.server.introspect(first["refresh_token"], rs, T0 + 2)),
                         {"active": False})
        yield self.server.revoke(first["refresh_token"], None, None, T0 + 3, client_id="web")
        self.assertEqual((yield self.server.introspect(first["refresh_token"], rs, T0 + 4)),
                         {"active": False})

    @defer.inlineCallbacks
    def test_introspection_needs_confidential_client(self):
        first = yield self.tokens()
        for auth in (None, ("rs", "wrong"), ("web", "")):
            yield self.assertOAuthError(
                self.server.introspect(first["access_token"], auth, T0 + 2), "invalid_client",
                401)

    @defer.inlineCallbacks
    def test_refresh_token_introspected_by_its_client(self):
        # a confidential client with refresh tokens: its own refresh token is active
        text = CLIENTS.format(web_cb=WEB_CB, room_hash=hash_client_secret(ROOM_SECRET),
                              rs_hash=FAST.hash(RS_SECRET)).replace(
            '[client.rs]\ntype = "confidential"',
            '[client.rs]\ntype = "confidential"\nredirect_uris = ["https://rs.example/cb"]'
        ).replace('grant_types = ["client_credentials"]\nscopes = []',
                  'grant_types = ["authorization_code", "refresh_token"]\nscopes = ["x"]')
        path = write_file(os.path.join(self.mktemp() + "c.toml"), text)
        self.server.clients = ClientRegistry.load(path, hasher=FAST)
        verifier, challenge = pkce()
        url = yield self.authorize(client_id="rs", redirect_uri="https://rs.example/cb",
                                   scope="x", code_challenge=challenge)
        code = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["code"][0]
        rs = ("rs", RS_SECRET)
        response = yield self.redeem(code, verifier, client_id=None,
                                     redirect_uri="https://rs.example/cb", client_auth=rs)
        info = yield self.server.introspect(response["refresh_token"], rs, T0 + 2)
        self.assertEqual((info["active"], info["sub"], info["scope"], info["exp"]),
                         (True, "alice@example.com", "x", int(T0 + 1 + 3600)))

    def test_configuration_checked(self):
        with self.assertRaises(ValueError):
            AuthorizationServer(self.clients, self.grants, self.keys, self.authenticator,
                                self.limiter, issuer=ISSUER, access_token_lifetime=3600)
