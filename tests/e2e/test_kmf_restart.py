"""perc-kmf restarts (real twistd, real SQLite or real redis-server): nothing is lost.

Each test starts the daemon as ``twistd perc-kmf`` on a state directory of its
own (generated server certificate, KEK, signing keys, OAuth client file with
argon2id secrets, user file), then over real HTTPS on loopback obtains an
admin token (``client_credentials``) and a certificate-bound user token (the
full PKCE browser flow), creates, invites, starts a conference and fetches
its key.  After SIGTERM and a new start on the same state (and, for Redis, a
restart of redis-server on the same directory) the conference, invitation,
epoch and the very same key are served, tokens and refresh tokens issued
before the restart still work, and the JWKS still verifies them.  With Redis
stopped under a running KMF the key service answers a 503 problem and
recovers when Redis is back.

:class:`Kmf` is also used by ``bench/kmf.py``.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import re
import secrets
import signal
import sys
import urllib.parse
from collections.abc import Callable
from typing import Any

import jwt
import treq
from argon2 import PasswordHasher
from twisted.internet import defer, error, reactor, task
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool

from perc_daemons.kmf.auth.file import add_user
from perc_daemons.kmf.clients import hash_client_secret
from tests.e2e.test_daemons import Daemon, free_port
from tests.unit.test_kmf_api import ENCRYPTION_KEY, Cert, Policy
from tests.unit.test_store import RedisServer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TWISTD = "from twisted.scripts.twistd import run; run()"
START_TIMEOUT = 20.0
EXIT_TIMEOUT = 10.0
REQUEST_TIMEOUT = 5.0
#: how long a request may wait while Redis is down (RedisConferenceStore.timeout is 10 s)
REDIS_DOWN_TIMEOUT = 15.0
#: argon2id made cheap for the tests (the daemon verifies with a hash's own parameters)
FAST = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
DOMAIN = "example.com"
ISSUER = f"https://{DOMAIN}"
ALICE = f"alice@{DOMAIN}"
PASSWORD = "correct horse battery"
ADMIN_ID = "perc-admin"
ADMIN_SECRET = "admin-" + "s3cret" * 7  # >= 43 characters: a $sha256$ entry
KD_ID = "perc-kd"
KD_SECRET = "kd-" + "s3cret" * 7
REDIRECT = "http://127.0.0.1:8400/cb"
VERIFIER = "v" * 20 + "-._~" + "A1b2C3d4e5F6g7H8i9J0k"
CHALLENGE = base64.urlsafe_b64encode(hashlib.sha256(VERIFIER.encode()).digest()
                                     ).rstrip(b"=").decode()
HIDDEN = re.compile(r'<input type="hidden" name="([a-z_]+)" value="([^"]*)">')
FORM = "application/x-www-form-urlencoded"
PROBLEM = "application/problem+json"


class KmfFailure(Exception):
    """The daemon or one of its answers is not what was expected."""


def basic(client_id: str, secret: str) -> str:
    quote = urllib.parse.quote_plus
    return "Basic " + base64.b64encode(f"{quote(client_id)}:{quote(secret)}".encode()).decode()


def sleep(seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


class Kmf:
    """A perc-kmf state directory and its configuration; runs it as a real twistd child.

    ``store`` is the TOML of the ``[store]`` table (default: SQLite in the
    state directory).  ``client_secret_hash`` makes the admin and KD clients'
    ``secret_hash`` (default the ``$sha256$`` form; ``PasswordHasher().hash``
    for a legacy argon2id entry).
    """

    def __init__(self, directory: str, *, store: str | None = None,
                 client_secret_hash: Callable[[str], str] = hash_client_secret,
                 pool: HTTPConnectionPool | None = None) -> None:
        self.dir = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.server_cert = Cert(directory, "server")
        self.alice_cert = Cert(directory, "alice-dtls")
        self.admin_port = free_port()
        self.https_port = free_port()
        self.base = f"https://127.0.0.1:{self.https_port}"
        users = os.path.join(directory, "users.jsonl")
        add_user(users, "alice", PASSWORD, hasher=FAST)
        clients = os.path.join(directory, "clients.toml")
        fd = os.open(clients, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(
                '[client.webapp]\ntype = "public"\n'
                'grant_types = ["authorization_code", "refresh_token"]\n'
                f'redirect_uris = ["{REDIRECT}"]\nscopes = ["identity", "keys"]\n\n'
                f'[client.{ADMIN_ID}]\ntype = "confidential"\n'
                f'secret_hash = "{client_secret_hash(ADMIN_SECRET)}"\n'
                'grant_types = ["client_credentials"]\nscopes = ["admin"]\n\n'
                f'[client.{KD_ID}]\ntype = "confidential"\n'
                f'secret_hash = "{client_secret_hash(KD_SECRET)}"\n'
                'grant_types = ["client_credentials"]\nscopes = ["kd"]\n')
        if store is None:
            store = f'sqlite_path = "{directory}/store/kmf.sqlite3"\n'
        self.config = os.path.join(directory, "kmf.toml")
        with open(self.config, "w", encoding="utf-8") as f:
            f.write(
                f'[admin]\nbind = "127.0.0.1"\nport = {self.admin_port}\n'
                f'[https]\nbind = "127.0.0.1"\nport = {self.https_port}\n'
                f'certificate = "{self.server_cert.cert_path}"\n'
                f'private_key = "{self.server_cert.key_path}"\n'
                f'[idp]\ndomain = "{DOMAIN}"\n'
                f'[store]\n{store}'
                f'[keys]\nkek_file = "{directory}/keys/kmf.kek"\n'
                f'signing_dir = "{directory}/keys/signing"\n'
                f'[oauth]\nclients_file = "{clients}"\n'
                f'[auth]\nusers_file = "{users}"\n')
        self.pool = pool if pool is not None else HTTPConnectionPool(reactor, persistent=False)
        self._health_pool = HTTPConnectionPool(reactor, persistent=False)
        self.proto: Daemon | None = None
        self.starts = 0

    # --- the process ----------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proto is not None and self.proto.running

    @defer.inlineCallbacks
    def start(self):
        """Spawn twistd; fires once /healthz answers and the store is ready."""
        if self.running:
            raise KmfFailure("already running")
        self.starts += 1
        rundir = os.path.join(self.dir, f"run{self.starts}")
        os.mkdir(rundir)
        self.proto = proto = Daemon()
        env = dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
        reactor.spawnProcess(
            proto, sys.executable,
            [sys.executable, "-c", TWISTD, "--nodaemon", "--pidfile=", "perc-kmf",
             "--config", self.config], env=env, path=rundir)
        deadline = reactor.seconds() + START_TIMEOUT
        url = f"http://127.0.0.1:{self.admin_port}/healthz"
        while True:
            if not proto.running:
                raise KmfFailure(f"perc-kmf exited during start-up:\n{proto.output()}")
            if ("perc-kmf conference store ready" in proto.output()
                    and "perc-kmf HTTPS API listening" in proto.output()):
                try:
                    response = yield treq.get(url, pool=self._health_pool, timeout=2)
                    yield treq.content(response)
                    if response.code == 200:
                        return
                except (error.ConnectError, error.TimeoutError, defer.CancelledError):
                    pass
            if reactor.seconds() > deadline:
                raise KmfFailure(f"perc-kmf not ready within {START_TIMEOUT}s:\n"
                                 f"{proto.output()}")
            yield sleep(0.05)

    @defer.inlineCallbacks
    def stop(self):
        """SIGTERM; fires with (exit code, signal) and the output of this run."""
        proto = self.proto
        if proto is None or not proto.running:
            raise KmfFailure("not running")
        yield self.pool.closeCachedConnections()
        os.kill(proto.transport.pid, signal.SIGTERM)
        result = yield _with_timeout(proto.ended, EXIT_TIMEOUT, "perc-kmf did not exit")
        return result, proto.output()

    @defer.inlineCallbacks
    def kill(self):
        """Cleanup: SIGKILL when still running; close the connection pools."""
        proto = self.proto
        if proto is not None and proto.running:
            try:
                proto.transport.signalProcess("KILL")
            except error.ProcessExitedAlready:
                pass
            yield proto.ended
        yield self.pool.closeCachedConnections()
        yield self._health_pool.closeCachedConnections()

    # --- HTTPS ----------------------------------------------------------------------

    @defer.inlineCallbacks
    def call(self, method: str, path: str, *, cert: Cert | None = None, token: str | None = None,
             form: dict[str, str] | None = None, body: Any = None,
             headers: dict[str, str] | None = None, timeout: float = REQUEST_TIMEOUT):
        """One request; fires with (response, content bytes)."""
        agent = Agent(reactor, contextFactory=Policy(self.server_cert, cert), pool=self.pool)
        headers = dict(headers or {})
        data = None
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if form is not None:
            data = urllib.parse.urlencode(form).encode()
            headers["Content-Type"] = FORM
        elif body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        response = yield treq.request(method, self.base + path, headers=headers, data=data,
                                      agent=agent, allow_redirects=False,
                                      timeout=timeout)
        content = yield treq.content(response)
        return response, content

    @defer.inlineCallbacks
    def json_call(self, method: str, path: str, status: int, **kwargs):
        response, content = yield self.call(method, path, **kwargs)
        if response.code != status:
            raise KmfFailure(f"{method} {path}: {response.code} (expected {status}): "
                             f"{content[:500]!r}")
        return json.loads(content) if content else None

    def admin_token(self) -> defer.Deferred:
        """Token response of client_credentials for the admin client (no certificate)."""
        return self.json_call("POST", "/oauth/token", 200, form={
            "grant_type": "client_credentials"},
            headers={"Authorization": basic(ADMIN_ID, ADMIN_SECRET)})

    @defer.inlineCallbacks
    def user_tokens(self, cert: Cert | None = None):
        """alice's token response through the PKCE browser flow, bound to ``cert``."""
        cert = cert or self.alice_cert
        query = urllib.parse.urlencode({
            "response_type": "code", "client_id": "webapp", "redirect_uri": REDIRECT,
            "scope": "identity keys", "state": "st", "code_challenge": CHALLENGE,
            "code_challenge_method": "S256"})
        response, page = yield self.call("GET", "/oauth/authorize?" + query, cert=cert)
        if response.code != 200:
            raise KmfFailure(f"login form: {response.code}: {page[:500]!r}")
        fields = {n: html.unescape(v) for n, v in HIDDEN.findall(page.decode("utf-8"))}
        cookies = [c.split(";")[0] for c in response.headers.getRawHeaders("set-cookie") or []]
        response, content = yield self.call(
            "POST", "/oauth/authorize", cert=cert, headers={"Cookie": "; ".join(cookies)},
            form=dict(fields, username="alice", password=PASSWORD))
        location = (response.headers.getRawHeaders("location") or [""])[0]
        if response.code != 302 or not location.startswith(REDIRECT + "?"):
            raise KmfFailure(f"login: {response.code} {location!r}: {content[:500]!r}")
        code = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(location).query))["code"]
        tokens = yield self.json_call("POST", "/oauth/token", 200, cert=cert, form={
            "grant_type": "authorization_code", "client_id": "webapp", "code": code,
            "redirect_uri": REDIRECT, "code_verifier": VERIFIER})
        return tokens

    @defer.inlineCallbacks
    def key(self, cid: str, token: str, cert: Cert | None = None,
            timeout: float = REQUEST_TIMEOUT):
        """POST the key service; fires with (status, Encryption-Key header, body)."""
        response, content = yield self.call("POST", f"/v1/conferences/{cid}/keys",
                                            cert=cert or self.alice_cert, token=token,
                                            timeout=timeout)
        header = (response.headers.getRawHeaders("encryption-key") or [None])[0]
        return response.code, header, content

    @defer.inlineCallbacks
    def admit(self, cid: str, epoch: int):
        """What a KD reports once it admitted alice (with her DTLS certificate) to ``epoch``:
        the key service then serves her."""
        kd = yield self.json_call("POST", "/oauth/token", 200, form={
            "grant_type": "client_credentials"},
            headers={"Authorization": basic(KD_ID, KD_SECRET)})
        fingerprint = ":".join(f"{b:02X}" for b in self.alice_cert.digest)
        yield self.json_call("PUT", f"/v1/conferences/{cid}/roster", 200,
                             token=kd["access_token"], body={
                                 "epoch": epoch, "members": [
                                     {"identity": ALICE, "ssrcs": [1],
                                      "fingerprints": [fingerprint]}]})

    @defer.inlineCallbacks
    def conference(self, cid: str, admin: str, invite: str = ALICE):
        """Create, invite ``invite``, start; fires with the started conference's JSON."""
        yield self.json_call("POST", "/v1/conferences", 201, token=admin,
                             body={"id": cid, "title": f"restart {cid}",
                                   "initiator": f"ops@{DOMAIN}"})
        yield self.json_call("POST", f"/v1/conferences/{cid}/invitations", 200, token=admin,
                             body={"identity": invite})
        started = yield self.json_call("POST", f"/v1/conferences/{cid}/start", 200,
                                       token=admin)
        return started


def _with_timeout(d: defer.Deferred, seconds: float, message: str) -> defer.Deferred:
    """A Deferred following ``d`` (not cancelling it) failing after ``seconds``."""
    result: defer.Deferred = defer.Deferred()

    def done(value):
        if not result.called:
            result.callback(value)
        return value

    d.addBoth(done)
    call = reactor.callLater(
        seconds, lambda: result.called or result.errback(KmfFailure(message)))
    result.addBoth(lambda value: (call.active() and call.cancel(), value)[1])
    return result


def verify_with_jwks(token: str, jwks: dict) -> dict:
    """The claims of ``token`` checked against a fetched JWKS (kid, ES256, iss, aud)."""
    kid = jwt.get_unverified_header(token)["kid"]
    keys = {k["kid"]: k for k in jwks["keys"]}
    key = jwt.PyJWK(keys[kid], algorithm="ES256")
    return jwt.decode(token, key.key, algorithms=["ES256"], audience=ISSUER, issuer=ISSUER)


class KmfRestartTests(unittest.TestCase):
    timeout = 60

    def make_kmf(self, **kwargs: Any) -> Kmf:
        kmf = Kmf(os.path.abspath(self.mktemp()), **kwargs)
        self.addCleanup(kmf.kill)
        return kmf

    @defer.inlineCallbacks
    def populate(self, kmf: Kmf, cid: str):
        """Everything a restart must keep; fires with what was seen."""
        admin = yield kmf.admin_token()
        started = yield kmf.conference(cid, admin["access_token"])
        self.assertEqual(started["state"], "running")
        self.assertEqual(started["epoch"], 1)
        user = yield kmf.user_tokens()
        self.assertIn("refresh_token", user)
        yield kmf.admit(cid, 1)
        status, header, content = yield kmf.key(cid, user["access_token"])
        self.assertEqual(status, 200, content)
        match = ENCRYPTION_KEY.fullmatch(header)
        self.assertIsNotNone(match, header)
        self.assertEqual(match["keyid"], f"{cid}/1")
        self.assertEqual(len(base64.urlsafe_b64decode(match["key"] + "==")), 32)
        jwks = yield kmf.json_call("GET", "/.well-known/jwks.json", 200)
        for token in (admin["access_token"], user["access_token"]):
            verify_with_jwks(token, jwks)
        conference = yield kmf.json_call("GET", f"/v1/conferences/{cid}", 200,
                                         token=admin["access_token"])
        return {"admin": admin["access_token"], "user": user, "header": header,
                "jwks": jwks, "conference": conference}

    @defer.inlineCallbacks
    def stop_cleanly(self, kmf: Kmf):
        (exit_code, sig), output = yield kmf.stop()
        # twistd re-raises the SIGTERM after a clean shutdown (see test_daemons)
        self.assertEqual((exit_code, sig), (None, signal.SIGTERM), output)
        self.assertIn("Server Shut Down", output)
        self.assertNotIn("Traceback", output)

    @defer.inlineCallbacks
    def check_kept(self, kmf: Kmf, cid: str, before: dict):
        """After a restart: the same conference, invitation, epoch, key, tokens, JWKS."""
        conference = yield kmf.json_call("GET", f"/v1/conferences/{cid}", 200,
                                         token=before["admin"])  # a pre-restart token
        self.assertEqual(conference, before["conference"])
        self.assertEqual(conference["state"], "running")
        self.assertIn(ALICE, conference["invited"])
        self.assertEqual(conference["epoch"], 1)
        status, header, content = yield kmf.key(cid, before["user"]["access_token"])
        self.assertEqual(status, 200, content)
        self.assertEqual(header, before["header"])  # the exact same EKT key
        jwks = yield kmf.json_call("GET", "/.well-known/jwks.json", 200)
        self.assertEqual(jwks, before["jwks"])
        claims = verify_with_jwks(before["user"]["access_token"], jwks)
        self.assertEqual(claims["sub"], ALICE)
        verify_with_jwks(before["admin"], jwks)
        # the refresh token (grant store) survived: it rotates, still bound to the cert
        refreshed = yield kmf.json_call("POST", "/oauth/token", 200, cert=kmf.alice_cert,
                                        form={"grant_type": "refresh_token",
                                              "client_id": "webapp",
                                              "refresh_token": before["user"]["refresh_token"]})
        status, header, _ = yield kmf.key(cid, refreshed["access_token"])
        self.assertEqual((status, header), (200, before["header"]))
        # and the conference goes on where it was: the next epoch is 2
        epoch = yield kmf.json_call("POST", f"/v1/conferences/{cid}/epochs", 201,
                                    token=before["admin"])
        self.assertEqual(epoch["epoch"], 2)
        yield kmf.admit(cid, 2)
        status, header, _ = yield kmf.key(cid, refreshed["access_token"])
        self.assertEqual(status, 200)
        self.assertTrue(header.startswith(f'keyid="{cid}/2"; '), header)
        self.assertNotEqual(header.split("aesgcm128=")[1], before["header"].split("aesgcm128=")[1])

    @defer.inlineCallbacks
    def test_sqlite_restart(self):
        """SQLite: SIGTERM and a new twistd on the same state directory lose nothing."""
        kmf = self.make_kmf()
        yield kmf.start()
        before = yield self.populate(kmf, "sqlite-restart")
        yield self.stop_cleanly(kmf)
        response = yield self.assertFailure(kmf.key("sqlite-restart", before["admin"]),
                                            error.ConnectError)
        self.assertIsNotNone(response)  # really down between the two runs
        yield kmf.start()
        yield self.check_kept(kmf, "sqlite-restart", before)
        yield self.stop_cleanly(kmf)

    @defer.inlineCallbacks
    def test_redis_restart(self):
        """Redis: restart the KMF and redis-server (same AOF directory); Redis down is 503."""
        redis_dir = os.path.abspath(self.mktemp())
        os.makedirs(redis_dir)
        redis = RedisServer(redis_dir)
        self.addCleanup(lambda: redis.stop())
        yield redis.start()
        password_file = os.path.join(redis_dir, "password")
        fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(redis.password + "\n")
        kmf = self.make_kmf(store=(
            f'backend = "redis"\nredis_host = "127.0.0.1"\nredis_port = {redis.port}\n'
            f'redis_password_file = "{password_file}"\n'
            f'redis_namespace = "perc-{secrets.token_hex(4)}"\n'))
        yield kmf.start()
        cid = "redis-restart"
        before = yield self.populate(kmf, cid)
        yield self.stop_cleanly(kmf)
        yield redis.stop("TERM")
        files = os.listdir(redis_dir)
        self.assertTrue({"appendonlydir", "appendonly.aof"} & set(files), files)
        yield redis.start()
        yield kmf.start()

        # Redis stopped under the running KMF: a 503 problem, no crash, then recovery
        yield redis.stop("TERM")
        # the store waits for a connection up to its operation timeout (10 s) first
        status, header, content = yield kmf.key(cid, before["user"]["access_token"],
                                                timeout=REDIS_DOWN_TIMEOUT)
        self.assertEqual(status, 503, content)
        self.assertIsNone(header)
        problem = json.loads(content)
        self.assertEqual(problem["status"], 503)
        self.assertEqual(problem["type"], "urn:perc:problem:store-unavailable")
        self.assertTrue(kmf.running)
        yield redis.start()
        deadline = reactor.seconds() + 10
        while True:
            status, header, content = yield kmf.key(cid, before["user"]["access_token"],
                                                    timeout=REDIS_DOWN_TIMEOUT)
            if status == 200 or reactor.seconds() > deadline:
                break
            self.assertEqual(status, 503, content)
            yield sleep(0.1)
        self.assertEqual((status, header), (200, before["header"]), content)

        yield self.check_kept(kmf, cid, before)
        (exit_code, sig), output = yield kmf.stop()
        self.assertEqual((exit_code, sig), (None, signal.SIGTERM), output)
