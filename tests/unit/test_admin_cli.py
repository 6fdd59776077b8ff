"""perc-admin against a real perc-kmf HTTPS API on loopback (real TLS, tokens, SQLite).

Remote commands run through :func:`admin_cli.run` (the reactor is trial's);
local commands through :func:`admin_cli.main` on real files.  The
client-credentials path talks to a small ``/oauth/token`` resource here that
implements the documented contract and mints real admin tokens.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
from typing import Any
from urllib.parse import parse_qs, unquote_plus

from argon2 import PasswordHasher
from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web import resource, server

from perc_daemons import config as config_module
from perc_daemons import tls
from perc_daemons.cli import ApiClient, trust_root
from perc_daemons.kmf import admin_cli
from perc_daemons.kmf.admin_cli import OperationError, run
from perc_daemons.kmf.api import KmfApi, kmf_site
from perc_daemons.kmf.auth.file import read_users
from perc_daemons.kmf.kek import KeyEncryptionKey
from perc_daemons.kmf.signing import SigningKeys
from perc_daemons.kmf.tokens import issue_access_token
from perc_daemons.protocol.jose import b64url_decode, b64url_encode
from perc_daemons.protocol.roster import sign_roster
from perc_daemons.store import ConferenceNotFound, ConferenceState
from perc_daemons.store.sqlite import SqliteConferenceStore

DOMAIN = "example.com"
ISSUER = "https://example.com"
ALICE = "alice@example.com"
BOB = "bob@example.com"
CAROL = "carol@example.com"
CLIENT_ID = "ops cli:1"
CLIENT_SECRET = "s3cr%t:with/odd chars+é"


def write_private(path: str, text: str, mode: int = 0o600) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


class TokenEndpoint(resource.Resource):
    """``POST /oauth/token`` as documented: client_secret_basic, client_credentials, admin."""

    isLeaf = True

    def __init__(self, mint) -> None:
        super().__init__()
        self.mint = mint
        self.requests: list[dict[str, Any]] = []
        #: the scopes the client is registered with
        self.scopes = {"admin"}

    def render_POST(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        header = (request.getHeader(b"authorization") or b"").decode("latin-1")
        body = request.content.read().decode("ascii")
        self.requests.append({"authorization": header, "body": body,
                              "content_type": request.getHeader(b"content-type")})
        kind, _, encoded = header.partition(" ")
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode(
                "ascii").partition(":")
        except ValueError:
            user = password = ""
        if kind != "Basic" or (unquote_plus(user), unquote_plus(password)) != (
                CLIENT_ID, CLIENT_SECRET):
            request.setResponseCode(401)
            request.setHeader(b"www-authenticate", b'Basic realm="perc-kmf"')
            return json.dumps({"error": "invalid_client",
                               "error_description": "client authentication failed"}).encode()
        form = parse_qs(body, strict_parsing=True)
        if form.get("grant_type") != ["client_credentials"] or len(form.get("scope", [])) != 1:
            request.setResponseCode(400)
            return json.dumps({"error": "invalid_request"}).encode()
        scope = form["scope"][0]
        if scope not in self.scopes:
            request.setResponseCode(400)
            return json.dumps({"error": "invalid_scope",
                               "error_description": "scope not allowed for this client"}
                              ).encode()
        return json.dumps({"access_token": self.mint(scope), "token_type": "Bearer",
                           "expires_in": 300}).encode()


class Root(resource.Resource):
    """The real API, plus the token endpoint under /oauth."""

    def __init__(self, api: KmfApi, token: TokenEndpoint) -> None:
        super().__init__()
        self.api = api
        self.token = token

    def getChildWithDefault(self, path: bytes, request: server.Request):
        return self.token if path == b"oauth" else self.api


class AdminCliTests(unittest.TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.cert = os.path.join(self.dir, "kmf.crt")
        tls.generate_self_signed(self.cert, os.path.join(self.dir, "kmf.key"))
        self.now = reactor.seconds()
        self.signing_dir = os.path.join(self.dir, "signing")
        self.keys = SigningKeys.create(self.signing_dir, self.now)
        kek = KeyEncryptionKey.generate(os.path.join(self.dir, "kek"))
        self.store = yield SqliteConferenceStore.open(os.path.join(self.dir, "kmf.sqlite3"))
        self.addCleanup(self.store.close)
        api = KmfApi(store=self.store, kek=kek, keys=self.keys, idp_domain=DOMAIN,
                     issuer=ISSUER, clock=reactor)
        self.token_endpoint = TokenEndpoint(lambda scope: self.token([scope]))
        site = kmf_site(api)
        site.resource = Root(api, self.token_endpoint)
        context = tls.server_context_factory(self.cert, os.path.join(self.dir, "kmf.key"))
        self.port = reactor.listenSSL(0, site, context, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.url = f"https://127.0.0.1:{self.port.getHost().port}"
        self.admin_token = self.token(["admin"])
        self.token_file = write_private(os.path.join(self.dir, "token"), self.admin_token + "\n")
        self.config = self.write_config(url=self.url, ca_file=self.cert, issuer=ISSUER)

    # --- helpers -------------------------------------------------------------------------

    def token(self, scopes: list[str], subject: str = "perc-admin") -> str:
        # Subject as the KMF's client-credentials grant sets it: the client id.
        return issue_access_token(self.keys, issuer=ISSUER, subject=subject, audience=ISSUER,
                                  client_id="perc-admin", scopes=scopes, now=self.now)

    def write_config(self, name: str = "admin.toml", **values: Any) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            for key, value in values.items():
                f.write(f"{key} = {json.dumps(value)}\n")
        return path

    @defer.inlineCallbacks
    def cli(self, *argv: str, config: str | None = "default", token: bool = True):
        out, err = io.StringIO(), io.StringIO()
        extra = ["--config", self.config if config == "default" else config] if config else []
        if token:
            extra += ["--token-file", self.token_file]
        code = yield defer.ensureDeferred(run([*argv, *extra], reactor, stdout=out,
                                              stderr=err))
        self.assertNotIn(self.admin_token, out.getvalue() + err.getvalue())
        self.assertNotIn("Traceback", err.getvalue())
        return code, out.getvalue(), err.getvalue()

    @defer.inlineCallbacks
    def raw_post(self, path: str, body: Any):
        """POST ``body`` as JSON with the admin token, past the CLI: (status, JSON body)."""
        client = ApiClient(reactor, self.url,
                                     trust_root(self.cert, self.config))
        self.addCleanup(lambda: defer.ensureDeferred(client.close()))
        code, content = yield defer.ensureDeferred(client.raw(
            "POST", path, headers={"Authorization": f"Bearer {self.admin_token}",
                                   "Content-Type": "application/json"},
            data=json.dumps(body).encode()))
        return code, json.loads(content)

    @defer.inlineCallbacks
    def ok_json(self, *argv: str):
        code, out, err = yield self.cli(*argv, "--json")
        self.assertEqual((code, err), (0, ""))
        return json.loads(out)

    @defer.inlineCallbacks
    def running(self, cid: str = "conf-1"):
        yield self.ok_json("conferences", "create", cid, "--title", "Weekly", "--invite", ALICE)
        started = yield self.ok_json("conferences", "start", cid)
        return started

    @defer.inlineCallbacks
    def put_roster(self, cid: str, members: list[dict[str, Any]]):
        client = ApiClient(reactor, self.url, trust_root(self.cert, "test"))
        client.token = self.token(["kd"], subject="kd-1@example.com")
        try:
            body = yield defer.ensureDeferred(client.call(
                "PUT", f"/v1/conferences/{cid}/roster", {"epoch": 1, "members": members}))
        finally:
            yield defer.ensureDeferred(client.close())
        return body

    def local(self, *argv: str, getpass=None) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = admin_cli.main(list(argv), stdout=out, stderr=err, getpass=getpass)
        self.assertNotIn("Traceback", err.getvalue())
        return code, out.getvalue(), err.getvalue()

    # --- conferences -----------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_create_shows_a_table(self):
        code, out, err = yield self.cli(
            "conferences", "create", "conf-1", "--title", "Weekly sync", "--invite", ALICE,
            "--invite", BOB, "--group", "ops", "--late-joiners-get-earlier-epochs")
        self.assertEqual((code, err), (0, ""))
        lines = dict(line.split(":", 1) for line in out.splitlines())
        self.assertEqual(lines["id"].strip(), "conf-1")
        self.assertEqual(lines["title"].strip(), "Weekly sync")
        self.assertEqual(lines["state"].strip(), "scheduled")
        self.assertEqual(lines["invited"].strip(), f"{ALICE}, {BOB}")
        self.assertEqual(lines["groups"].strip(), "ops")
        self.assertEqual(lines["late joiners get earlier epochs"].strip(), "yes")
        stored = yield self.store.get("conf-1")
        self.assertEqual(stored.invited, frozenset({ALICE, BOB}))
        self.assertEqual(stored.invited_groups, frozenset({"ops"}))
        self.assertTrue(stored.late_joiners_get_earlier_epochs)
        self.assertEqual(stored.initiator, ALICE)  # the first --invite

    @defer.inlineCallbacks
    def test_policy_options_create_update_and_show(self):
        """Issue 14: the schedule, rekey interval and late-join policy are set at create,
        changed with update, shown by show (table and JSON)."""
        created = yield self.ok_json(
            "conferences", "create", "conf-1", "--title", "t", "--invite", ALICE,
            "--starts-at", "2030-01-01T10:00:00Z", "--ends-at", "1893495600",
            "--early-start", "600", "--rekey-interval", "900", "--late-join", "history")
        self.assertEqual((created["starts_at"], created["ends_at"], created["early_start"],
                          created["rekey_interval"], created["late_join"], created["grace"]),
                         (1893492000.0, 1893495600.0, 600.0, 900.0, "history", 0.0))
        updated = yield self.ok_json("conferences", "update", "conf-1", "--grace", "30",
                                     "--ends-at", "none", "--late-join", "none")
        self.assertEqual((updated["grace"], updated["ends_at"], updated["late_join"],
                          updated["rekey_interval"]), (30.0, None, "none", 900.0))
        code, out, err = yield self.cli("conferences", "show", "conf-1")
        lines = {k.strip(): v.strip() for k, v in
                 (line.split(":", 1) for line in out.splitlines())}
        self.assertEqual((lines["late join"], lines["grace"], lines["rekey interval"],
                          lines["early start"]), ("none", "30 s", "900 s", "600 s"))
        stored = yield self.store.get("conf-1")
        self.assertEqual((stored.grace, stored.ends_at), (30.0, None))
        for bad in (["--late-join", "all"], ["--starts-at", "2030-01-01T10:00:00"],
                    ["--grace", "soon"]):
            code, out, err = yield self.cli("conferences", "update", "conf-1", *bad)
            self.assertEqual((code, out), (2, ""), err)
        code, out, err = yield self.cli("conferences", "update", "conf-1")
        self.assertEqual((code, out), (2, ""))
        self.assertIn("nothing to change", err)
        code, out, err = yield self.cli("conferences", "update", "conf-1",
                                        "--rekey-interval", "-1")
        self.assertEqual((code, out), (1, ""))
        self.assertIn("Invalid request (400)", err)

    @defer.inlineCallbacks
    def test_create_names_its_owner(self):
        """The admin client is not a user: the owner is --initiator (invited too)."""
        created = yield self.ok_json("conferences", "create", "conf-1", "--title", "t",
                                     "--initiator", CAROL, "--invite", ALICE)
        self.assertEqual((created["initiator"], created["invited"]), (CAROL, [ALICE, CAROL]))
        code, out, err = yield self.cli("conferences", "create", "conf-2", "--title", "t")
        self.assertEqual((code, out), (2, ""))
        self.assertIn("--initiator user@domain", err)
        code, out, err = yield self.cli("conferences", "create", "conf-2", "--title", "t",
                                        "--initiator", "perc-admin")
        self.assertEqual((code, out), (1, ""))
        self.assertIn("Invalid request (400)", err)

    @defer.inlineCallbacks
    def test_forwarding_settings_need_an_md(self):
        """--last-n and the other forwarding settings are the MD's: refused without --md,
        before anything is created at the KMF."""
        for extra in (["--last-n", "2"], ["--no-audio-levels"], ["--forwarding", "all"]):
            code, out, err = yield self.cli("conferences", "create", "conf-1", "--title", "t",
                                            "--invite", ALICE, *extra)
            self.assertEqual((code, out), (2, ""), extra)
            self.assertIn("settings at the MD: give --md", err)
        yield self.assertFailure(self.store.get("conf-1"), ConferenceNotFound)

    @defer.inlineCallbacks
    def test_kmf_refuses_a_client_token_as_owner(self):
        """Without "initiator" the KMF would take the client id: a clear 400 instead."""
        code, body = yield self.raw_post("/v1/conferences", {"id": "c-1", "title": "t"})
        self.assertEqual(code, 400)
        self.assertIn("initiator", body["detail"])
        self.assertIn("'perc-admin' is a client, not a user", body["detail"])

    @defer.inlineCallbacks
    def test_list_table_and_state_filter(self):
        yield self.running("conf-1")
        yield self.ok_json("conferences", "create", "conf-2", "--title", "Später",
                           "--initiator", ALICE)
        code, out, err = yield self.cli("conferences", "list")
        self.assertEqual((code, err), (0, ""))
        lines = out.splitlines()
        self.assertEqual(lines[0].split(), ["ID", "STATE", "TITLE", "INITIATOR", "INVITED",
                                            "CREATED"])
        self.assertTrue(set(lines[1]) <= {"-", " "})
        self.assertEqual([line.split()[:2] for line in lines[2:]],
                         [["conf-1", "running"], ["conf-2", "scheduled"]])
        self.assertIn("Sp\\xe4ter", out)  # plain ASCII
        out.encode("ascii")
        # aligned: every column starts at the same offset in every row
        state_column = lines[0].index("STATE")
        self.assertTrue(all(line[state_column - 2:state_column] == "  " for line in lines[2:]))
        listed = yield self.ok_json("conferences", "list", "--state", "running")
        self.assertEqual([c["id"] for c in listed["conferences"]], ["conf-1"])
        code, out, _ = yield self.cli("conferences", "list", "--state", "ended")
        self.assertEqual((code, out), (0, "no conferences\n"))

    @defer.inlineCallbacks
    def test_show_invite_uninvite_start_end(self):
        yield self.ok_json("conferences", "create", "conf-1", "--title", "Weekly",
                           "--initiator", CAROL)
        shown = yield self.ok_json("conferences", "show", "conf-1")
        self.assertEqual((shown["state"], shown["epoch"], shown["invited"]),
                         ("scheduled", None, [CAROL]))
        invited = yield self.ok_json("conferences", "invite", "conf-1", ALICE, BOB)
        self.assertEqual(invited["invited"], [ALICE, BOB, CAROL])
        left = yield self.ok_json("conferences", "uninvite", "conf-1", ALICE)
        self.assertEqual(left["invited"], [BOB, CAROL])
        self.assertEqual((yield self.store.get("conf-1")).invited, frozenset({BOB, CAROL}))
        code, out, _ = yield self.cli("conferences", "start", "conf-1")
        self.assertEqual(code, 0)
        self.assertIn("state:", out)
        self.assertRegex(out, r"(?m)^epoch: +1$")
        self.assertRegex(out, r"(?m)^state: +running$")
        ended = yield self.ok_json("conferences", "end", "conf-1")
        self.assertEqual(ended["state"], "ended")
        self.assertIs((yield self.store.get("conf-1")).state, ConferenceState.ENDED)

    @defer.inlineCallbacks
    def test_json_anywhere(self):
        yield self.running("conf-1")
        out, err = io.StringIO(), io.StringIO()
        code = yield defer.ensureDeferred(run(
            ["--json", "--config", self.config, "conferences", "show", "conf-1",
             "--token-file", self.token_file], reactor, stdout=out, stderr=err))
        self.assertEqual((code, err.getvalue()), (0, ""))
        self.assertEqual(json.loads(out.getvalue())["epoch"], 1)

    @defer.inlineCallbacks
    def test_unknown_conference_is_status_1_with_problem(self):
        code, out, err = yield self.cli("conferences", "show", "nope")
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(err, "perc-admin: Not found (404): no such conference\n")
        yield self.ok_json("conferences", "create", "conf-1", "--title", "x", "--invite", ALICE)
        code, _, err = yield self.cli("conferences", "create", "conf-1", "--title", "x",
                                      "--invite", ALICE)
        self.assertEqual(code, 1)
        self.assertIn("Conference exists (409)", err)
        code, _, err = yield self.cli("conferences", "invite", "conf-1", "not an identity")
        self.assertEqual(code, 1)
        self.assertIn("Invalid request (400)", err)

    @defer.inlineCallbacks
    def test_token_refused(self):
        self.token_file = write_private(os.path.join(self.dir, "kd-token"),
                                        self.token(["kd"]))
        code, out, err = yield self.cli("conferences", "list")
        self.assertEqual((code, out), (1, ""))
        self.assertIn("Insufficient scope (403)", err)

    # --- roster ----------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_roster_show_verified(self):
        yield self.running("conf-1")
        code, _, err = yield self.cli("roster", "show", "conf-1")
        self.assertEqual(code, 1)
        self.assertIn("No roster (404)", err)
        yield self.put_roster("conf-1", [{"identity": BOB, "ssrcs": [7, 0xDEADBEEF]},
                                         {"identity": ALICE, "ssrcs": [1]}])
        code, out, err = yield self.cli("roster", "show", "conf-1")
        self.assertEqual((code, err), (0, ""))
        self.assertRegex(out, r"(?m)^epoch: +1$")
        self.assertRegex(out, r"(?m)^signature: +verified")
        self.assertRegex(out, rf"(?m)^{ALICE} +0x00000001$")
        self.assertRegex(out, rf"(?m)^{BOB} +0x00000007 0xdeadbeef$")
        data = yield self.ok_json("roster", "show", "conf-1")
        self.assertEqual(data["members"], [{"identity": ALICE, "ssrcs": [1]},
                                           {"identity": BOB, "ssrcs": [7, 0xDEADBEEF]}])
        self.assertEqual((data["conference"], data["epoch"], data["verified"]),
                         ("conf-1", 1, True))

    @defer.inlineCallbacks
    def test_tampered_roster_refused(self):
        yield self.running("conf-1")
        put = yield self.put_roster("conf-1", [{"identity": ALICE, "ssrcs": [1]}])
        header, payload, signature = put["roster"].split(".")
        claims = json.loads(b64url_decode(payload))
        claims["members"].append({"identity": "mallory@example.com", "ssrcs": [666]})
        tampered = ".".join([header, b64url_encode(json.dumps(claims).encode()), signature])
        yield self.store.set_roster("conf-1", 1, tampered)
        code, out, err = yield self.cli("roster", "show", "conf-1")
        self.assertEqual((code, out), (1, ""))
        self.assertIn("perc-admin: roster not verified, not shown", err)
        self.assertNotIn("mallory", err)
        # signed, but by a key the KMF does not publish
        foreign = SigningKeys.create(os.path.join(self.dir, "foreign"), self.now)
        forged = sign_roster(foreign, issuer=ISSUER, conference_id="conf-1", epoch=1,
                             members=[("mallory@example.com", [666])], now=self.now)
        yield self.store.set_roster("conf-1", 1, forged)
        code, out, err = yield self.cli("roster", "show", "conf-1", "--json")
        self.assertEqual((code, out), (1, ""))
        self.assertIn("roster not verified", err)

    @defer.inlineCallbacks
    def test_roster_wrong_issuer_refused(self):
        yield self.running("conf-1")
        yield self.put_roster("conf-1", [{"identity": ALICE, "ssrcs": [1]}])
        config = self.write_config("other.toml", url=self.url, ca_file=self.cert)
        # default issuer: https://127.0.0.1, not the KMF's https://example.com
        code, out, err = yield self.cli("roster", "show", "conf-1", config=config)
        self.assertEqual((code, out), (1, ""))
        self.assertIn("roster not verified", err)

    # --- client credentials ----------------------------------------------------------------

    def test_token_request_encoding(self):
        headers, body = admin_cli.token_request(CLIENT_ID, CLIENT_SECRET)
        self.assertEqual(headers["Content-Type"], "application/x-www-form-urlencoded")
        self.assertEqual(base64.b64decode(headers["Authorization"].removeprefix("Basic ")),
                         b"ops+cli%3A1:s3cr%25t%3Awith%2Fodd+chars%2B%C3%A9")
        self.assertEqual(body, b"grant_type=client_credentials&scope=admin")

    def test_token_response_parsing(self):
        ok = json.dumps({"access_token": "t0k", "token_type": "bearer", "expires_in": 60})
        self.assertEqual(admin_cli.parse_token_response(200, ok.encode()), "t0k")
        error = json.dumps({"error": "invalid_scope", "error_description": "no admin"})
        e = self.assertRaises(OperationError, admin_cli.parse_token_response, 400,
                              error.encode())
        self.assertEqual((e.title, e.detail), ("token request refused: invalid_scope (400)",
                                               "no admin"))
        self.assertRaises(OperationError, admin_cli.parse_token_response, 200,
                          json.dumps({"access_token": "t", "token_type": "DPoP"}).encode())
        self.assertRaises(OperationError, admin_cli.parse_token_response, 200, b"{}")
        self.assertRaises(OperationError, admin_cli.parse_token_response, 502, b"<html>")

    @defer.inlineCallbacks
    def test_client_credentials(self):
        secret = write_private(os.path.join(self.dir, "secret"), CLIENT_SECRET + "\n")
        config = self.write_config("cc.toml", url=self.url, ca_file=self.cert,
                                   client_id=CLIENT_ID, client_secret_file=secret)
        code, out, err = yield self.cli("conferences", "create", "c-1", "--title", "t",
                                        "--initiator", ALICE,
                                        "--json", config=config, token=False)
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(json.loads(out)["id"], "c-1")
        [request] = self.token_endpoint.requests
        self.assertEqual(request["content_type"], b"application/x-www-form-urlencoded")
        self.assertEqual(request["body"], "grant_type=client_credentials&scope=admin")
        self.assertEqual(request["authorization"], "Basic " + base64.b64encode(
            b"ops+cli%3A1:s3cr%25t%3Awith%2Fodd+chars%2B%C3%A9").decode())
        self.assertNotIn("s3cr", out + err)
        # a wrong secret: the RFC 6749 error, status 1
        write_private(secret, "wrong")
        code, out, err = yield self.cli("conferences", "list", config=config, token=False)
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(err, "perc-admin: token request refused: invalid_client (401): "
                              "client authentication failed\n")

    @defer.inlineCallbacks
    def test_an_auditor_only_client_reads_trails(self):
        """A client registered with the ``auditor`` scope only: ``audit`` commands fall back
        to an auditor token (the admin one is refused invalid_scope); others do not."""
        secret = write_private(os.path.join(self.dir, "secret"), CLIENT_SECRET + "\n")
        config = self.write_config("cc.toml", url=self.url, ca_file=self.cert,
                                   client_id=CLIENT_ID, client_secret_file=secret,
                                   issuer=ISSUER)
        code, _, err = yield self.cli("conferences", "create", "c-1", "--title", "t",
                                      "--initiator", ALICE, config=config, token=False)
        self.assertEqual((code, err), (0, ""))
        self.token_endpoint.scopes = {"auditor"}
        self.token_endpoint.requests.clear()
        code, out, err = yield self.cli("audit", "verify", "c-1", config=config, token=False)
        self.assertEqual((code, err), (0, ""))
        self.assertIn("verified: 1 record(s)", out)
        self.assertEqual([r["body"] for r in self.token_endpoint.requests],
                         ["grant_type=client_credentials&scope=admin",
                          "grant_type=client_credentials&scope=auditor"])
        code, out, err = yield self.cli("conferences", "list", config=config, token=False)
        self.assertEqual(code, 1)
        self.assertIn("invalid_scope", err)

    # --- configuration errors --------------------------------------------------------------

    @defer.inlineCallbacks
    def test_bad_config_is_status_2(self):
        missing = os.path.join(self.dir, "missing.toml")
        code, out, err = yield self.cli("conferences", "list", config=missing)
        self.assertEqual((code, out), (2, ""))
        self.assertEqual(err, f"perc-admin: {missing}: file not found\n")
        bad = self.write_config("bad.toml", url=self.url, colour="blue")
        code, _, err = yield self.cli("conferences", "list", config=bad)
        self.assertEqual(code, 2)
        self.assertIn(f"{bad}: colour: unknown key", err)
        http = self.write_config("http.toml", url="http://127.0.0.1:1")
        code, _, err = yield self.cli("conferences", "list", config=http)
        self.assertEqual(code, 2)
        self.assertIn(f"{http}: url: must be an https:// URL", err)
        no_client = self.write_config("noclient.toml", url=self.url, ca_file=self.cert)
        code, _, err = yield self.cli("conferences", "list", config=no_client, token=False)
        self.assertEqual(code, 2)
        self.assertIn(f"{no_client}: client_id: not set", err)
        not_pem = self.write_config("notpem.toml", url=self.url, ca_file=self.token_file)
        code, _, err = yield self.cli("conferences", "list", config=not_pem)
        self.assertEqual(code, 2)
        self.assertIn("ca_file", err)
        self.assertNotIn(self.admin_token, err)

    @defer.inlineCallbacks
    def test_readable_token_file_refused(self):
        os.chmod(self.token_file, 0o644)
        code, out, err = yield self.cli("conferences", "list")
        self.assertEqual((code, out), (2, ""))
        self.assertIn("mode 0644 is too open: it must be 0600", err)

    @defer.inlineCallbacks
    def test_untrusted_certificate_is_status_1(self):
        other = os.path.join(self.dir, "other.crt")
        tls.generate_self_signed(other, os.path.join(self.dir, "other.key"))
        config = self.write_config("untrusted.toml", url=self.url, ca_file=other,
                                   issuer=ISSUER)
        code, out, err = yield self.cli("conferences", "list", config=config)
        self.assertEqual((code, out), (1, ""))
        self.assertIn("no response from", err)
        self.assertIn("certificate", err.lower())

    def test_usage_errors_are_status_2(self):
        for argv in (["conferences"], ["conferences", "list", "--state", "bogus"],
                     ["conferences", "create", "c-1"], ["frobnicate"]):
            code, out, err = self.local(*argv)
            self.assertEqual((code, out), (2, ""), argv)
            self.assertTrue(err.startswith("perc-admin"), err)

    # --- local: users ----------------------------------------------------------------------

    def test_users(self):
        users = os.path.join(self.dir, "users.jsonl")
        password = write_private(os.path.join(self.dir, "pw"), "correct horse\n")
        code, out, err = self.local("users", "add", "Alice", "--users-file", users,
                                    "--password-file", password)
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out, f"user alice: added ({users})\n")
        record = read_users(users)["alice"]
        self.assertTrue(PasswordHasher().verify(record.hash, "correct horse"))
        self.assertFalse(record.disabled)
        self.assertEqual(os.stat(users).st_mode & 0o777, 0o600)

        code, out, err = self.local("users", "add", "alice", "--users-file", users,
                                    "--password-file", password)
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(err, "perc-admin: users add alice failed: user 'alice' exists\n")

        answers = iter(["battery staple", "battery staple"])
        code, out, err = self.local("users", "passwd", "alice", "--users-file", users,
                                    "--json", getpass=lambda prompt: next(answers))
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(json.loads(out), {"user": "alice", "result": "password changed",
                                           "file": users})
        self.assertTrue(PasswordHasher().verify(read_users(users)["alice"].hash,
                                                "battery staple"))
        answers = iter(["one", "two"])
        code, _, err = self.local("users", "passwd", "alice", "--users-file", users,
                                  getpass=lambda prompt: next(answers))
        self.assertEqual(code, 1)
        self.assertIn("passwords do not match", err)
        self.assertTrue(PasswordHasher().verify(read_users(users)["alice"].hash,
                                                "battery staple"))

        self.assertEqual(self.local("users", "disable", "alice", "--users-file", users)[0], 0)
        self.assertTrue(read_users(users)["alice"].disabled)
        self.assertEqual(self.local("users", "enable", "alice", "--users-file", users)[0], 0)
        self.assertFalse(read_users(users)["alice"].disabled)

        code, _, err = self.local("users", "disable", "bob", "--users-file", users)
        self.assertEqual(code, 1)
        self.assertIn("no user 'bob'", err)
        code, _, err = self.local("users", "add", "bad name!", "--users-file", users,
                                  "--password-file", password)
        self.assertEqual(code, 2)
        code, _, err = self.local("users", "add", "carol", "--users-file", users,
                                  "--password-file", os.path.join(self.dir, "nope"))
        self.assertEqual(code, 2)
        self.assertIn("--password-file", err)
        self.assertNotIn("correct horse", err)
        self.assertEqual(set(read_users(users)), {"alice"})

    def test_users_file_from_kmf_config(self):
        if "users_file" not in config_module.SCHEMAS["kmf"].get("auth", {}):
            raise unittest.SkipTest("kmf.toml has no [auth] users_file yet")
        users = os.path.join(self.dir, "from-kmf.jsonl")
        kmf = os.path.join(self.dir, "kmf-users.toml")
        with open(kmf, "w") as f:
            f.write(f'[auth]\nusers_file = "{users}"\n')
        password = write_private(os.path.join(self.dir, "pw"), "pw\n")
        code, _, err = self.local("users", "add", "dave", "--kmf-config", kmf,
                                    "--password-file", password)
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(set(read_users(users)), {"dave"})

    # --- local: client secrets -------------------------------------------------------------

    @defer.inlineCallbacks
    def test_clients_new_secret_and_hash(self):
        from perc_daemons.kmf.clients import Client, ClientRegistry, InvalidClient

        path = os.path.join(self.dir, "kd-client.secret")
        code, out, err = self.local("clients", "new-secret", "--secret-file", path)
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        with open(path) as f:
            secret = f.read().strip()
        self.assertEqual(len(secret), 43)
        self.assertNotIn(secret, out)
        match = re.fullmatch(r'secret_hash = "(\$sha256\$[A-Za-z0-9_-]{43})"\n', out)
        self.assertIsNotNone(match, out)
        # the hash is the form the KMF checks, and it checks this secret
        registry = ClientRegistry([Client("kd", "confidential", frozenset({"client_credentials"}),
                                          (), frozenset({"kd"}), match[1])])
        self.assertEqual((yield registry.authenticate("kd", secret)).client_id, "kd")
        with self.assertRaises(InvalidClient):
            yield registry.authenticate("kd", secret[:-1] + "x")
        self.assertEqual(registry.slow_verifications, 0)
        # hash: the same line from the file; JSON too
        code, out2, err = self.local("clients", "hash", "--secret-file", path, "--json")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(json.loads(out2), {"secret_hash": match[1], "secret_file": path})
        # never over an existing file; short secrets and readable files refused
        code, _, err = self.local("clients", "new-secret", "--secret-file", path)
        self.assertEqual(code, 1)
        self.assertIn("exists", err)
        with open(path) as f:
            self.assertEqual(f.read().strip(), secret)
        short = write_private(os.path.join(self.dir, "short.secret"), "s3cret-only-24-chars-xxx\n")
        code, out, err = self.local("clients", "hash", "--secret-file", short)
        self.assertEqual((code, out), (1, ""))
        self.assertIn("at least 43 characters", err)
        self.assertIn("clients new-secret", err)
        self.assertNotIn("s3cret", err)
        readable = write_private(os.path.join(self.dir, "open.secret"), secret + "\n", 0o644)
        code, _, err = self.local("clients", "hash", "--secret-file", readable)
        self.assertEqual(code, 2)
        code, _, err = self.local("clients", "hash")
        self.assertEqual(code, 2)

    # --- local: keys -----------------------------------------------------------------------

    def test_keys_rotate(self):
        kmf = os.path.join(self.dir, "kmf.toml")
        with open(kmf, "w") as f:
            f.write(f'[keys]\nsigning_dir = "{self.signing_dir}"\n')
        old = self.keys.active.kid
        code, out, err = self.local("keys", "rotate", "--kmf-config", kmf, "--json")
        self.assertEqual((code, err), (0, ""))
        result = json.loads(out)
        reloaded = SigningKeys.load(self.signing_dir)
        self.assertEqual(result["kid"], reloaded.active.kid)
        self.assertEqual(result["retired"], old)
        self.assertNotEqual(result["kid"], old)
        self.assertIsNotNone(next(i for i in reloaded.infos if i.kid == old).retired_at)
        code, out, _ = self.local("keys", "rotate", "--kmf-config", kmf)
        self.assertEqual(code, 0)
        self.assertIn(SigningKeys.load(self.signing_dir).active.kid, out)

    def test_keys_rotate_errors(self):
        bad = os.path.join(self.dir, "bad-kmf.toml")
        with open(bad, "w") as f:
            f.write('[keys]\nsigning_dir = "relative"\n')
        code, out, err = self.local("keys", "rotate", "--kmf-config", bad)
        self.assertEqual((code, out), (2, ""))
        self.assertIn(f"{bad}: keys.signing_dir: must be an absolute path", err)
        empty = os.path.join(self.dir, "empty-kmf.toml")
        with open(empty, "w") as f:
            f.write(f'[keys]\nsigning_dir = "{self.dir}/no-such-dir"\n')
        code, out, err = self.local("keys", "rotate", "--kmf-config", empty)
        self.assertEqual((code, out), (1, ""))
        self.assertIn("keys rotate failed", err)
