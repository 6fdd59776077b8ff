"""LDAP back-ends in the KMF: [auth.ldap]/[auth.oidc] configuration and group invitations.

The HTTP tests run the real KMF API over TLS on loopback (the set-up of
:mod:`tests.unit.test_kmf_api`) with a real ldaptor LDAP server (the
in-memory directory of :mod:`tests.unit.test_auth`): alice is in the groups
eng, all and admins; bob in all and ops; alicia in none.
"""

from __future__ import annotations

import os

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from perc_daemons import config, tls
from perc_daemons.kmf import service
from perc_daemons.kmf.api import GroupCache, KmfApi, kmf_site
from perc_daemons.kmf.auth import BackendUnavailable
from perc_daemons.kmf.auth.file import FileAuthenticator
from perc_daemons.kmf.auth.ldap import LdapAuthenticator
from perc_daemons.kmf.auth.oidc import OidcAuthenticator
from tests.unit import test_kmf_api
from tests.unit.test_auth import BASE, LdapTestMixin
from tests.unit.test_kmf_api import ALICE, BOB, DOMAIN, ISSUER, MAX_BODY, Cert

ALICIA = "alicia@example.com"
DIRECT = "direct@example.com"  # invited by name, not in the directory
OIDC = {"issuer": "https://idp.example.org", "audience": "perc-kmf",
        "jwks_url": "https://idp.example.org/jwks.json"}


def ldap_settings(port: int, **extra: object) -> dict[str, object]:
    settings: dict[str, object] = {"host": "127.0.0.1", "port": port, "tls": "none",
                                   "base_dn": f"ou=people,{BASE}",
                                   "group_base_dn": f"ou=groups,{BASE}"}
    settings.update(extra)
    return settings


class ConfigTests(LdapTestMixin, unittest.TestCase):
    """[auth] backends with "ldap"/"oidc", the [auth.ldap] and [auth.oidc] tables."""

    def write(self, content: str) -> str:
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(content)
        return path

    def assertConfigError(self, content: str, key: str, reason: str) -> None:
        path = self.write(content)
        error = self.assertRaises(config.ConfigError, config.load, "kmf", path)
        self.assertEqual((error.path, error.key, error.reason), (path, key, reason))
        self.assertEqual(str(error), f"{path}: {key}: {reason}")

    def test_nested_tables_load(self):
        path = self.write(
            '[auth]\nbackends = ["oidc", "ldap", "file"]\n'
            '[auth.ldap]\nhost = "ldap.example.com"\nbase_dn = "ou=people,dc=example,dc=com"\n'
            'tls = "ldaps"\ngroup_attribute = "ou"\n'
            '[auth.oidc]\nissuer = "https://idp.example.org"\naudience = "perc-kmf"\n'
            'jwks_url = "https://idp.example.org/jwks.json"\nclaim = "sub"\n')
        cfg = config.load("kmf", path)
        self.assertEqual(cfg.auth.backends, ["oidc", "ldap", "file"])
        ldap = cfg["auth.ldap"]
        self.assertEqual((ldap.host, ldap.port, ldap.tls, ldap.group_attribute, ldap.bind_dn),
                         ("ldap.example.com", 0, "ldaps", "ou", ""))
        self.assertEqual(ldap.group_filter,
                         "(|(member={dn})(uniqueMember={dn})(memberUid={username}))")
        self.assertEqual((cfg["auth.oidc"].claim, cfg["auth.oidc"].domain), ("sub", ""))
        # the "auth" section holds its own keys only
        self.assertNotIn("ldap", cfg.auth)

    def test_backends_built_in_configured_order(self):
        users = os.path.abspath(self.mktemp())
        for order in (["oidc", "ldap", "file"], ["file", "ldap"], ["ldap", "oidc"]):
            cfg = config.validate("kmf", "kmf.toml", {
                "auth": {"backends": order, "users_file": users,
                         "ldap": ldap_settings(389), "oidc": OIDC}})
            backends = service.auth_backends(cfg, reactor)
            kinds = {"file": FileAuthenticator, "ldap": LdapAuthenticator,
                     "oidc": OidcAuthenticator}
            self.assertEqual([type(b) for b in backends], [kinds[n] for n in order])
            chain = service.authorization_server(cfg, None, ISSUER, reactor).authenticator
            self.assertEqual([type(b) for b in chain.backends], [kinds[n] for n in order])
        ldap = next(b for b in backends if isinstance(b, LdapAuthenticator))
        self.assertEqual((ldap.host, ldap.port, ldap.domain, ldap.identity_attribute),
                         ("127.0.0.1", 389, "localhost", "mail"))
        self.assertEqual(ldap.group_base_dn, f"ou=groups,{BASE}")
        oidc = next(b for b in backends if isinstance(b, OidcAuthenticator))
        self.assertEqual((oidc.issuer, oidc.audience, oidc.claim, oidc.domain),
                         ("https://idp.example.org", "perc-kmf", "email", "localhost"))

    def test_default_ports(self):
        for tls_mode, port in (("none", 389), ("starttls", 389), ("ldaps", 636)):
            cfg = config.validate("kmf", "kmf.toml", {"auth": {
                "backends": ["ldap"], "ldap": ldap_settings(0, tls=tls_mode)}})
            self.assertEqual(service.ldap_authenticator(cfg, reactor).port, port)

    def test_errors_name_file_key_and_reason(self):
        ldap = '[auth]\nbackends = ["ldap"]\n[auth.ldap]\nhost = "h"\nbase_dn = "dc=x"\n'
        self.assertConfigError(ldap + 'hots = "x"\n', "auth.ldap.hots",
                               "unknown key (known: base_dn, bind_dn, bind_password_file, "
                               "group_attribute, group_base_dn, group_filter, host, "
                               "identity_attribute, port, tls, tls_ca_file, user_filter)")
        self.assertConfigError(ldap + 'tls = "ssl"\n', "auth.ldap.tls",
                               "must be one of 'none', 'starttls', 'ldaps' (got 'ssl')")
        self.assertConfigError(ldap + "port = 70000\n", "auth.ldap.port",
                               "must be a TCP/UDP port number, 0-65535 (got 70000)")
        self.assertConfigError(ldap + 'port = "389"\n', "auth.ldap.port",
                               "must be an integer, not str")
        self.assertConfigError(ldap + 'user_filter = "(uid=x)"\n', "auth.ldap.user_filter",
                               "must contain {username} (got '(uid=x)')")
        self.assertConfigError(ldap + 'bind_password_file = "pw"\nbind_dn = "cn=svc"\n',
                               "auth.ldap.bind_password_file",
                               "must be an absolute path (got 'pw')")
        self.assertConfigError(ldap + 'bind_dn = "cn=svc"\n', "auth.ldap.bind_password_file",
                               "bind_dn and bind_password_file go together")
        self.assertConfigError('[auth]\nbackends = ["ldap"]\n[auth.ldap]\nhost = "h"\n',
                               "auth.ldap.base_dn",
                               'is required when [auth] backends names "ldap"')
        self.assertConfigError('[auth]\nbackends = ["file", "ldap"]\n', "auth.ldap.host",
                               'is required when [auth] backends names "ldap"')
        self.assertConfigError('[auth]\nbackends = ["oidc"]\n[auth.oidc]\n'
                               'issuer = "https://i.example"\naudience = "a"\n',
                               "auth.oidc.jwks_url",
                               'is required when [auth] backends names "oidc"')
        self.assertConfigError('[auth.oidc]\nissuer = "http://i.example"\n', "auth.oidc.issuer",
                               'must be "" (https://<idp.domain>) or an https:// URL without '
                               "query or fragment (got 'http://i.example')")
        self.assertConfigError('[auth]\nbackends = ["file", "kerberos"]\n', "auth.backends",
                               "unknown back-end 'kerberos' (known: 'file', 'ldap', 'oidc') "
                               "(got ['file', 'kerberos'])")
        self.assertConfigError("[auth]\nldap = 1\n", "auth.ldap",
                               "must be a table ([auth.ldap])")
        self.assertConfigError("[auth]\nkerberos = 1\n", "auth.kerberos",
                               "unknown key (known: address_limit, backends, failure_delay_ms, "
                               "ldap, oidc, user_limit, users_file, window)")
        self.assertConfigError("[auth.oidc.extra]\nx = 1\n", "auth.oidc.extra",
                               "unknown key (known: audience, authorization_endpoint, claim, "
                               "client_secret_file, domain, issuer, jwks_url, name, "
                               "token_endpoint)")
        self.assertConfigError("[nope]\n", "nope",
                               "unknown section (known: admin, audit, auth, conferences, "
                               "connections, https, idp, keys, logging, oauth, store)")

    def test_ldap_settings_unused_without_the_backend(self):
        cfg = config.load("kmf", self.write('[auth.ldap]\nhost = "h"\n'))
        self.assertEqual(cfg["auth.ldap"].host, "h")
        self.assertEqual([type(b) for b in service.auth_backends(cfg, reactor)],
                         [FileAuthenticator])

    def ldap_config(self, **extra: object) -> config.Config:
        return config.validate("kmf", "kmf.toml", {"auth": {
            "backends": ["ldap"], "ldap": ldap_settings(self.ldap_port, **extra)}})

    def password_file(self, content: str, mode: int) -> str:
        path = os.path.abspath(self.mktemp())
        with open(path, "w", encoding="utf-8") as f:
            f.write(content)
        os.chmod(path, mode)
        return path

    def service_error(self, cfg: config.Config, key: str) -> str:
        error = self.assertRaises(config.ConfigError, service.ldap_authenticator, cfg, reactor)
        self.assertEqual((error.path, error.key), ("kmf.toml", key))
        return error.reason

    async def test_bind_password_file(self):
        self.server, self.ldap_port = self.start_ldap()
        self.server.search_requires_bind = True
        key = "auth.ldap.bind_password_file"
        for mode in (0o644, 0o604, 0o660):
            path = self.password_file("svc-secret\n", mode)
            reason = self.service_error(self.ldap_config(bind_dn=f"cn=svc,{BASE}",
                                                         bind_password_file=path), key)
            self.assertEqual(reason, f"{path}: mode {mode:04o} is too open: it must be "
                                     f"0600 or 0640 (chmod 0600 {path})")
        missing = os.path.abspath(self.mktemp())
        self.assertEqual(self.service_error(self.ldap_config(
            bind_dn=f"cn=svc,{BASE}", bind_password_file=missing), key),
            f"{missing}: file not found")
        empty = self.password_file("\n", 0o600)
        self.assertEqual(self.service_error(self.ldap_config(
            bind_dn=f"cn=svc,{BASE}", bind_password_file=empty), key),
            f"{empty}: the file is empty")
        for mode in (0o600, 0o640):
            path = self.password_file("svc-secret\n", mode)
            ldap = service.ldap_authenticator(
                self.ldap_config(bind_dn=f"cn=svc,{BASE}", bind_password_file=path), reactor)
            self.server.binds.clear()
            # the service account (password from the file) binds before the search
            self.assertEqual(await ldap.groups(BOB), {"all", "ops"})
            self.assertEqual(self.server.binds, [(f"cn=svc,{BASE}", b"svc-secret")])

    def test_bad_filters_and_ca_file(self):
        self.ldap_port = 389
        self.assertEqual(self.service_error(self.ldap_config(user_filter="(&(uid={username})"),
                                            "auth.ldap.user_filter"),
                         "not a valid LDAP filter (got '(&(uid={username})')")
        self.assertEqual(self.service_error(self.ldap_config(group_filter="(|(member={dn})"),
                                            "auth.ldap.group_filter"),
                         "not a valid LDAP filter (got '(|(member={dn})')")
        error = self.assertRaises(config.ConfigError, self.ldap_config,
                                  group_filter="member={dn}")
        self.assertEqual((error.key, error.reason),
                         ("auth.ldap.group_filter",
                          "must be an LDAP filter in parentheses (got 'member={dn}')"))
        not_pem = self.password_file("hello\n", 0o644)
        self.assertEqual(self.service_error(self.ldap_config(tls_ca_file=not_pem),
                                            "auth.ldap.tls_ca_file"),
                         f"{not_pem}: not a PEM certificate")
        missing = os.path.abspath(self.mktemp())
        self.assertEqual(self.service_error(self.ldap_config(tls_ca_file=missing),
                                            "auth.ldap.tls_ca_file"),
                         f"{missing}: No such file or directory")

    def test_service_wires_group_cache_only_with_ldap(self):
        directory = os.path.abspath(self.mktemp())
        base = {
            "admin": {"port": 0},
            "https": {"port": 0, "dev_self_signed": True,
                      "certificate": os.path.join(directory, "kmf.crt"),
                      "private_key": os.path.join(directory, "kmf.key")},
            "store": {"sqlite_path": os.path.join(directory, "kmf.sqlite3")},
            "keys": {"kek_file": os.path.join(directory, "kek"),
                     "signing_dir": os.path.join(directory, "signing")},
            "oauth": {"clients_file": os.path.join(directory, "clients.toml")},
        }
        top = service.kmf_service(config.validate("kmf", "kmf.toml", base), reactor)
        self.assertIsNone(top.api.groups)
        with_ldap = dict(base, auth={"backends": ["file", "ldap"], "ldap": ldap_settings(389)})
        top = service.kmf_service(config.validate("kmf", "kmf.toml", with_ldap), reactor)
        self.assertIsInstance(top.api.groups, GroupCache)
        self.assertEqual(top.api.groups.ttl, 60.0)
        [ldap] = [b for b in top.api.oauth.authenticator.backends
                  if isinstance(b, LdapAuthenticator)]
        self.assertEqual(top.api.groups._lookup, ldap.groups)


class GroupCacheTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.calls: list[str] = []
        self.pending: list[defer.Deferred] = []

    def lookup(self, identity: str) -> defer.Deferred:
        self.calls.append(identity)
        d: defer.Deferred = defer.Deferred()
        self.pending.append(d)
        return d

    def test_cached_for_ttl_and_shared(self):
        cache = GroupCache(self.lookup, clock=self.clock, ttl=60, max_entries=10)
        first, second = cache.groups(BOB), cache.groups(BOB)
        self.assertEqual(self.calls, [BOB])  # concurrent look-ups share one query
        self.pending.pop().callback({"Ops", "all"})
        self.assertEqual(self.successResultOf(first), frozenset({"ops", "all"}))
        self.assertEqual(self.successResultOf(second), frozenset({"ops", "all"}))
        self.clock.advance(59)
        self.assertEqual(self.successResultOf(cache.groups(BOB)), frozenset({"ops", "all"}))
        self.assertEqual(self.calls, [BOB])
        self.clock.advance(1)
        d = cache.groups(BOB)
        self.assertEqual(self.calls, [BOB, BOB])
        self.pending.pop().callback(set())
        self.assertEqual(self.successResultOf(d), frozenset())

    def test_failures_not_cached(self):
        cache = GroupCache(self.lookup, clock=self.clock)
        d1, d2 = cache.groups(BOB), cache.groups(BOB)
        self.pending.pop().errback(BackendUnavailable("down"))
        self.failureResultOf(d1, BackendUnavailable)
        self.failureResultOf(d2, BackendUnavailable)
        d = cache.groups(BOB)
        self.assertEqual(len(self.calls), 2)
        self.pending.pop().callback({"ops"})
        self.assertEqual(self.successResultOf(d), frozenset({"ops"}))

    def test_bounded(self):
        cache = GroupCache(lambda i: defer.succeed({i}), clock=self.clock, max_entries=3)
        for n in range(5):
            self.successResultOf(cache.groups(f"u{n}@example.com"))
        self.assertEqual(len(cache), 3)
        self.assertEqual(list(cache._entries), [f"u{n}@example.com" for n in (2, 3, 4)])
        self.assertRaises(ValueError, GroupCache, self.lookup, clock=self.clock, ttl=0)
        self.assertRaises(ValueError, GroupCache, self.lookup, clock=self.clock,
                          max_entries=0)


class GroupInvitationTests(LdapTestMixin, unittest.TestCase):
    """The key service and roster admit members of invited LDAP groups."""

    timeout = 20

    # the HTTPS client and token helpers of the KMF API tests
    # (through the module: a TestCase bound to a name here would be collected again)
    open_store = test_kmf_api.KmfApiTests.open_store
    token = test_kmf_api.KmfApiTests.token
    admin = test_kmf_api.KmfApiTests.admin
    call = test_kmf_api.KmfApiTests.call
    ok = test_kmf_api.KmfApiTests.ok
    problem = test_kmf_api.KmfApiTests.problem
    parse_key = test_kmf_api.KmfApiTests.parse_key
    admit = test_kmf_api.KmfApiTests.admit
    kd = test_kmf_api.KmfApiTests.kd

    async def setUp(self):
        self.ldap_server, ldap_port = self.start_ldap()
        cfg = config.validate("kmf", "kmf.toml", {
            "idp": {"domain": DOMAIN},
            "auth": {"backends": ["file", "ldap"], "ldap": ldap_settings(ldap_port)}})
        self.ldap = service.ldap_authenticator(cfg, reactor)
        await test_kmf_api.KmfApiTests.setUp(self)
        self.api.groups = GroupCache(self.ldap.groups, clock=reactor)

    def bound(self, subject: str, scope: str = "keys") -> str:
        return self.token([scope], subject=subject, bound_to=self.alice_cert)

    async def conference(self, groups: list[str], invited: list[str] = (DIRECT,),
                         cid: str = "conf-g", admit: bool = True) -> str:
        await self.ok("POST", "/v1/conferences", 201, token=self.admin(),
                      body={"id": cid, "title": "Groups", "invited": list(invited),
                            "invited_groups": groups})
        await self.ok("POST", f"/v1/conferences/{cid}/start", token=self.admin())
        # The key service also wants the KD to have admitted the caller: report
        # everyone these tests use as admitted, so that invitation decides.
        if admit:
            await self.admit(1, [(who, self.alice_cert)
                                 for who in (ALICE, BOB, DIRECT, ALICIA)], cid=cid)
        return f"/v1/conferences/{cid}"

    async def test_sweep_publishes_withdrawal_when_a_group_member_leaves_the_group(self):
        """Issue 10 item 1: removal from an invited group reaches the KD (an
        invitation-withdrawn event) once the group cache refreshes."""
        clock = task.Clock()
        directory = {BOB: {"ops"}, ALICE: {"eng"}, ALICIA: {"Ops"}}
        self.api.groups = GroupCache(lambda who: defer.succeed(directory.get(who, set())),
                                     clock=clock, ttl=60)
        await self.conference(["ops", "eng"])
        seen = []
        self.api.events.subscribe(lambda _id, kind, data: seen.append((kind, data)))
        self.assertEqual(await self.api.sweep_invitations(), 0)
        directory[BOB] = {"sales"}  # bob leaves ops
        self.assertEqual(await self.api.sweep_invitations(), 0)  # cached: not seen yet
        clock.advance(60)
        self.assertEqual(await self.api.sweep_invitations(), 1)
        self.assertEqual(seen, [("invitation-withdrawn",
                                 {"conference": "conf-g", "identity": BOB})])

    async def test_group_member_gets_the_key(self):
        path = await self.conference(["ops"])
        response, body = await self.ok("POST", path + "/keys", token=self.bound(BOB))
        keyid, key = self.parse_key(response)
        self.assertEqual((keyid, len(key), body["epoch"]), ("conf-g/1", 32, 1))
        [stored] = await self.store.epochs("conf-g")
        self.assertEqual(key, self.kek.unwrap(stored.wrapped_key, conference_id="conf-g",
                                              epoch=1))

    async def test_non_member_refused(self):
        path = await self.conference(["ops"])
        for who in (ALICE, ALICIA, "mallory@example.com"):
            response, _ = await self.problem("POST", path + "/keys", 403, "not-invited",
                                             token=self.bound(who))
            self.assertIsNone(response.headers.getRawHeaders("encryption-key"))

    async def test_directly_invited_still_admitted(self):
        path = await self.conference(["ops"])
        connections = self.ldap_server.connections
        response, _ = await self.ok("POST", path + "/keys", token=self.bound(DIRECT))
        self.assertEqual(self.parse_key(response)[0], "conf-g/1")
        self.assertEqual(self.ldap_server.connections, connections)  # no directory look-up
        # and alice, invited by name to a conference inviting no group
        path = await self.conference([], invited=[ALICE], cid="conf-d")
        await self.ok("POST", path + "/keys", token=self.bound(ALICE))
        await self.problem("POST", path + "/keys", 403, "not-invited", token=self.bound(BOB))
        self.assertEqual(self.ldap_server.connections, connections)

    async def test_group_names_case_insensitive_and_memberof(self):
        path = await self.conference(["ENG", "Admins"])
        await self.ok("POST", path + "/keys", token=self.bound(ALICE))  # eng, memberOf admins
        await self.problem("POST", path + "/keys", 403, "not-invited", token=self.bound(BOB))
        path = await self.conference(["admins"], cid="conf-m")
        await self.ok("POST", path + "/keys", token=self.bound(ALICE))  # memberOf only

    async def test_lookups_cached(self):
        path = await self.conference(["ops"])
        await self.ok("POST", path + "/keys", token=self.bound(BOB))
        connections = self.ldap_server.connections
        self.assertGreaterEqual(connections, 1)
        for _ in range(3):
            await self.ok("POST", path + "/keys", token=self.bound(BOB))
        self.assertEqual(self.ldap_server.connections, connections)

    async def test_without_ldap_groups_are_not_honoured(self):
        path = await self.conference(["ops"])
        self.api.groups = None
        await self.problem("POST", path + "/keys", 403, "not-invited", token=self.bound(BOB))

    async def test_directory_down_is_503(self):
        path = await self.conference(["ops"])
        self.api.groups = GroupCache(lambda identity: defer.fail(BackendUnavailable("down")),
                                     clock=reactor)
        await self.problem("POST", path + "/keys", 503, "directory-unavailable",
                           token=self.bound(BOB))
        await self.ok("POST", path + "/keys", token=self.bound(DIRECT))

    async def test_roster_honours_groups(self):
        path = await self.conference(["ops"], admit=False)
        await self.problem("GET", path + "/roster", 404, "no-roster", token=self.bound(BOB))
        await self.problem("GET", path + "/roster", 403, "not-invited",
                           token=self.bound(ALICIA))

    async def test_service_api_with_real_wiring(self):
        """KmfApi as kmf_service builds it: groups from the configured LDAP back-end."""
        api = KmfApi(store=self.store, kek=self.kek, keys=self.keys, idp_domain=DOMAIN,
                     issuer=ISSUER, clock=reactor,
                     groups=GroupCache(self.ldap.groups, clock=reactor))
        server_cert = Cert(self.dir, "server2")
        context = tls.server_context_factory(server_cert.cert_path, server_cert.key_path,
                                             request_client_certificate=True)
        port = reactor.listenSSL(0, kmf_site(api, max_body=MAX_BODY), context,
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        path = await self.conference(["all"])
        self.base = f"https://127.0.0.1:{port.getHost().port}"
        self.server_cert = server_cert
        for who in (ALICE, BOB):
            await self.ok("POST", path + "/keys", token=self.bound(who))
        await self.problem("POST", path + "/keys", 403, "not-invited", token=self.bound(ALICIA))
