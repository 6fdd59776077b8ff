"""Tests for perc_daemons.kmf.auth: file, LDAP and OIDC back-ends, chain, rate limiter.

Each back-end runs against a real counterpart: a real user file on disk, an
ldaptor LDAP server on loopback (plain, StartTLS, LDAPS), and an OpenID
provider's JWKS served by a Twisted web server with real EC and RSA keys.
"""

from __future__ import annotations

import base64
import datetime
import hmac
import json
import os
import stat
import time
from hashlib import sha256

import jwt
from argon2 import PasswordHasher, extract_parameters
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from ldaptor import inmemory, interfaces
from ldaptor.protocols import pureldap
from ldaptor.protocols.ldap import ldaperrors, ldapserver
from twisted.internet import defer, protocol, reactor, ssl, task
from twisted.protocols.policies import WrappingFactory
from twisted.python import components
from twisted.trial import unittest
from twisted.web import resource, server
from zope.interface.verify import verifyObject

from perc_daemons.interfaces import IAuthenticator
from perc_daemons.kmf.auth import (
    AuthenticationFailed,
    AuthenticatorChain,
    BackendUnavailable,
    IdToken,
    LoginRateLimiter,
    RateLimited,
    UnknownUser,
    UnsupportedCredentials,
    UsernamePassword,
    authenticate_limited,
    make_identity,
    split_identity,
)
from perc_daemons.kmf.auth import file as authfile
from perc_daemons.kmf.auth.file import FileAuthenticator
from perc_daemons.kmf.auth.ldap import LdapAuthenticator, escape_filter_value
from perc_daemons.kmf.auth.oidc import OidcAuthenticator

# Cheap argon2id parameters so the tests stay fast; production uses the defaults.
FAST = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
STRONGER = PasswordHasher(time_cost=2, memory_cost=2048, parallelism=1)


class CountingHasher(PasswordHasher):
    """A PasswordHasher that records which hashes it verified."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.verified: list[str] = []

    def verify(self, hash, password):
        self.verified.append(hash)
        return super().verify(hash, password)


# -- helpers: servers on loopback that tests can shut down cleanly ----------


class Tracking(WrappingFactory):
    """Wraps a server factory and can close every connection it accepted."""

    def __init__(self, wrapped):
        super().__init__(wrapped)
        self.lost: dict[object, defer.Deferred] = {}

    def registerProtocol(self, p):
        super().registerProtocol(p)
        self.lost[p] = defer.Deferred()

    def unregisterProtocol(self, p):
        super().unregisterProtocol(p)
        self.lost.pop(p).callback(None)

    def close_all(self) -> defer.Deferred:
        pending = list(self.lost.values())
        for p in list(self.lost):
            p.transport.abortConnection()
        return defer.gatherResults(pending)


def listen(test: unittest.TestCase, factory, tls_options=None):
    """Listen on 127.0.0.1 (a free port); cleanup closes the port and connections."""
    tracking = Tracking(factory)
    if tls_options is None:
        port = reactor.listenTCP(0, tracking, interface="127.0.0.1")
    else:
        port = reactor.listenSSL(0, tracking, tls_options, interface="127.0.0.1")

    async def stop():
        await port.stopListening()
        await tracking.close_all()

    test.addCleanup(lambda: defer.Deferred.fromCoroutine(stop()))
    return port.getHost().port


def make_tls():
    """A CA and a server certificate for localhost: (server options, CA certificate)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "perc test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(1)
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(2)
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = (cert.public_bytes(serialization.Encoding.PEM)
           + key.private_bytes(serialization.Encoding.PEM,
                               serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption()))
    options = ssl.PrivateCertificate.loadPEM(pem).options()
    return options, ca.public_bytes(serialization.Encoding.PEM)


# -- credentials, errors, identities -----------------------------------------


class CredentialTests(unittest.TestCase):
    def test_repr_hides_secrets(self):
        self.assertNotIn("hunter2", repr(UsernamePassword("alice", "hunter2")))
        self.assertIn("alice", repr(UsernamePassword("alice", "hunter2")))
        self.assertNotIn("eyJsecret", repr(IdToken("eyJsecret", nonce="n0nce")))
        self.assertNotIn("n0nce", repr(IdToken("eyJsecret", nonce="n0nce")))

    def test_uniform_message(self):
        for exc in (AuthenticationFailed("wrong password for alice"), UnknownUser("nobody"),
                    BackendUnavailable("ldap down"), AuthenticationFailed()):
            self.assertEqual(str(exc), "invalid credentials")
            self.assertEqual(exc.args, ("invalid credentials",))
        self.assertEqual(AuthenticationFailed("why").reason, "why")

    def test_identity_percent_encoding(self):
        self.assertEqual(make_identity("Alice", "Example.COM"), "alice@example.com")
        self.assertEqual(make_identity("a@b%c", "example.com"), "a%40b%25c@example.com")
        self.assertEqual(make_identity("%40", "example.com"), "%2540@example.com")
        for user in ("alice", "a@b%c", "%40", "100%", "o'neil+tag"):
            self.assertEqual(split_identity(make_identity(user, "example.com")),
                             (user, "example.com"))
        self.assertRaises(ValueError, make_identity, "", "example.com")
        self.assertRaises(ValueError, make_identity, "a", "b@c")
        # a directory or provider name outside the identity rule cannot sign in
        error = self.assertRaises(AuthenticationFailed, make_identity, "J\u00f6rg",
                                  "example.com")
        self.assertIn("ASCII", error.reason)


# -- local user file -----------------------------------------------------------


class UserFileAdminTests(unittest.TestCase):
    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "users.jsonl")

    def lines(self):
        with open(self.path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def test_add_writes_argon2id_json_lines_mode_0600(self):
        authfile.add_user(self.path, "Alice", "correct horse", hasher=FAST)
        authfile.add_user(self.path, "bob", "battery staple", hasher=FAST)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        rows = self.lines()
        self.assertEqual([r["user"] for r in rows], ["alice", "bob"])
        self.assertTrue(all(r["hash"].startswith("$argon2id$") for r in rows))
        self.assertEqual([r["disabled"] for r in rows], [False, False])
        self.assertNotIn("correct horse", open(self.path).read())
        self.assertTrue(FAST.verify(rows[0]["hash"], "correct horse"))

    def owner(self, path: str) -> tuple[int, int, int]:
        st = os.stat(path)
        return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)

    def test_root_writes_the_file_for_the_directory_owner(self):
        """perc-admin users add run as root: perc-kmf (the directory's owner) can read it."""
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root (CI runs as root)")
        os.chown(self.dir, 4242, 4343)
        authfile.add_user(self.path, "alice", "pw", hasher=FAST)
        self.assertEqual(self.owner(self.path), (4242, 4343, 0o600))
        self.assertEqual(self.owner(self.path + ".lock"), (4242, 4343, 0o600))
        # what earlier versions left: a root-owned file in perc's directory
        os.chown(self.path, 0, 0)
        os.chown(self.path + ".lock", 0, 0)
        authfile.set_password(self.path, "alice", "pw2")
        self.assertEqual(self.owner(self.path), (4242, 4343, 0o600))
        self.assertEqual(self.owner(self.path + ".lock"), (4242, 4343, 0o600))
        # in a root-owned directory of the daemon's group: readable by that group
        other = os.path.join(self.dir, "etc")
        os.mkdir(other)
        os.chown(other, 0, 4343)
        authfile.add_user(os.path.join(other, "users.jsonl"), "bob", "pw", hasher=FAST)
        self.assertEqual(self.owner(os.path.join(other, "users.jsonl")), (0, 4343, 0o640))

    def test_default_hasher_is_argon2id_rfc9106(self):
        authfile.add_user(self.path, "alice", "pw")
        params = extract_parameters(self.lines()[0]["hash"])
        self.assertEqual(params.type.name, "ID")
        self.assertGreaterEqual(params.memory_cost, 65536)
        self.assertGreaterEqual(params.time_cost, 3)

    def test_add_refuses_existing_user_any_case(self):
        authfile.add_user(self.path, "alice", "pw1", hasher=FAST)
        before = open(self.path).read()
        self.assertRaises(authfile.UserExists, authfile.add_user, self.path, "ALICE", "pw2",
                          hasher=FAST)
        self.assertEqual(open(self.path).read(), before)

    def test_username_and_password_rules(self):
        for bad in ("", "a" * 65, "a@b", "a%b", "a b", "ä", "a/b", "a\n", "../x"):
            self.assertRaises(authfile.UserFileError, authfile.add_user, self.path, bad, "pw",
                              hasher=FAST)
        authfile.add_user(self.path, "a" * 64, "pw", hasher=FAST)
        authfile.add_user(self.path, "A.b_c-9", "pw", hasher=FAST)
        self.assertRaises(authfile.UserFileError, authfile.add_user, self.path, "x", "",
                          hasher=FAST)
        self.assertRaises(authfile.UserFileError, authfile.add_user, self.path, "x",
                          "p" * 1025, hasher=FAST)
        self.assertEqual(sorted(r["user"] for r in self.lines()), ["a.b_c-9", "a" * 64])

    def test_passwd_disable_enable_and_unknown(self):
        authfile.add_user(self.path, "alice", "old", hasher=FAST)
        authfile.set_password(self.path, "alice", "new", hasher=FAST)
        self.assertTrue(FAST.verify(self.lines()[0]["hash"], "new"))
        authfile.disable_user(self.path, "ALICE")
        self.assertTrue(self.lines()[0]["disabled"])
        authfile.enable_user(self.path, "alice")
        self.assertFalse(self.lines()[0]["disabled"])
        for op in (authfile.disable_user, authfile.enable_user):
            self.assertRaises(authfile.NoSuchUser, op, self.path, "bob")
        self.assertRaises(authfile.NoSuchUser, authfile.set_password, self.path, "bob", "x",
                          hasher=FAST)

    def test_writes_replace_the_file_atomically(self):
        authfile.add_user(self.path, "alice", "pw", hasher=FAST)
        inode = os.stat(self.path).st_ino
        before = open(self.path).read()

        real_replace = os.replace

        def broken_replace(src, dst):
            raise OSError("disk full")

        self.patch(os, "replace", broken_replace)
        self.assertRaises(OSError, authfile.add_user, self.path, "bob", "pw", hasher=FAST)
        self.assertEqual(open(self.path).read(), before)  # untouched
        self.assertEqual(sorted(os.listdir(self.dir)), ["users.jsonl", "users.jsonl.lock"])
        self.patch(os, "replace", real_replace)
        authfile.add_user(self.path, "bob", "pw", hasher=FAST)
        self.assertNotEqual(os.stat(self.path).st_ino, inode)  # a new file, renamed in
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_rewrite_tightens_mode(self):
        authfile.add_user(self.path, "alice", "pw", hasher=FAST)
        os.chmod(self.path, 0o644)
        authfile.disable_user(self.path, "alice")
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_read_rejects_malformed_lines(self):
        for text in ("not json\n", '{"user": "a@b", "hash": "$argon2id$x"}\n',
                     '{"user": "a", "hash": "plain"}\n', '["a"]\n',
                     '{"user": "a", "hash": "$argon2id$x", "disabled": "no"}\n',
                     '{"user": "a", "hash": "$argon2id$x"}\n'
                     '{"user": "A", "hash": "$argon2id$y"}\n'):
            with open(self.path, "w") as f:
                f.write(text)
            self.assertRaises(authfile.UserFileError, authfile.read_users, self.path)
        os.unlink(self.path)
        self.assertEqual(authfile.read_users(self.path), {})


class FileAuthenticatorTests(unittest.TestCase):
    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "users.jsonl")
        authfile.add_user(self.path, "alice", "alice-pw", hasher=FAST)
        authfile.add_user(self.path, "bob", "bob-pw", hasher=FAST)
        self.hasher = CountingHasher(time_cost=1, memory_cost=1024, parallelism=1)
        self.auth = FileAuthenticator(self.path, "Example.com", hasher=self.hasher)

    def login(self, user, password):
        return self.auth.authenticate(UsernamePassword(user, password))

    def test_interface(self):
        self.assertTrue(verifyObject(IAuthenticator, self.auth))
        self.assertEqual(self.auth.name, "file")

    async def test_success_and_case_insensitive_name(self):
        self.assertEqual(await self.login("alice", "alice-pw"), "alice@example.com")
        self.assertEqual(await self.login("ALICE", "alice-pw"), "alice@example.com")

    async def test_wrong_password_is_not_unknown_user(self):
        with self.assertRaises(AuthenticationFailed) as cm:
            await self.login("alice", "bob-pw")
        self.assertNotIsInstance(cm.exception, UnknownUser)
        self.assertNotIn("bob-pw", repr(cm.exception) + cm.exception.reason)

    async def test_unknown_user_does_the_same_work(self):
        with self.assertRaises(UnknownUser):
            await self.login("mallory", "alice-pw")
        with self.assertRaises(AuthenticationFailed):
            await self.login("alice", "wrong")
        self.assertEqual(len(self.hasher.verified), 2)  # one argon2 verify each
        dummy, real = self.hasher.verified
        self.assertNotEqual(dummy, real)
        self.assertEqual(extract_parameters(dummy), extract_parameters(real))

    async def test_malformed_username_and_password(self):
        with self.assertRaises(UnknownUser):
            await self.login("alice@example.com", "alice-pw")
        for password in ("", "x" * 1025):
            with self.assertRaises(AuthenticationFailed) as cm:
                await self.login("alice", password)
            self.assertNotIsInstance(cm.exception, UnknownUser)

    async def test_disabled_user(self):
        authfile.disable_user(self.path, "alice")
        with self.assertRaises(AuthenticationFailed) as cm:
            await self.login("alice", "alice-pw")
        self.assertNotIsInstance(cm.exception, UnknownUser)  # a chain must stop here
        self.assertIn("disabled", cm.exception.reason)
        authfile.enable_user(self.path, "alice")
        self.assertEqual(await self.login("alice", "alice-pw"), "alice@example.com")

    async def test_file_changed_while_running(self):
        self.assertEqual(await self.login("alice", "alice-pw"), "alice@example.com")
        authfile.set_password(self.path, "alice", "new-pw", hasher=FAST)
        authfile.add_user(self.path, "carol", "carol-pw", hasher=FAST)
        with self.assertRaises(AuthenticationFailed):
            await self.login("alice", "alice-pw")
        self.assertEqual(await self.login("alice", "new-pw"), "alice@example.com")
        self.assertEqual(await self.login("carol", "carol-pw"), "carol@example.com")

    async def test_in_place_edit_with_same_mtime_and_size(self):
        await self.login("bob", "bob-pw")
        st = os.stat(self.path)
        text = open(self.path).read()
        rows = [json.loads(line) for line in text.splitlines()]
        rows[1]["disabled"] = True
        edited = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows)
        edited = edited.ljust(len(text) - 1) + "\n"  # same size
        self.assertEqual(len(edited), len(text))
        with open(self.path, "r+") as f:  # same inode
            f.write(edited)
        os.utime(self.path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime
        with self.assertRaises(AuthenticationFailed):
            await self.login("bob", "bob-pw")

    async def test_corrupt_file_fails_closed_until_fixed(self):
        good = open(self.path).read()
        with open(self.path, "a") as f:
            f.write("{broken\n")
        with self.assertRaises(BackendUnavailable):
            await self.login("alice", "alice-pw")
        with open(self.path, "w") as f:
            f.write(good)
        self.assertEqual(await self.login("alice", "alice-pw"), "alice@example.com")

    async def test_missing_file_has_no_users(self):
        os.unlink(self.path)
        with self.assertRaises(UnknownUser):
            await self.login("alice", "alice-pw")

    async def test_unsupported_credentials(self):
        with self.assertRaises(UnsupportedCredentials):
            await self.auth.authenticate(IdToken("x.y.z"))

    async def test_rehash_outdated_parameters(self):
        auth = FileAuthenticator(self.path, "example.com", hasher=STRONGER)
        self.assertTrue(STRONGER.check_needs_rehash(authfile.read_users(self.path)["bob"].hash))
        self.assertEqual(await auth.authenticate(UsernamePassword("bob", "bob-pw")),
                         "bob@example.com")
        users = authfile.read_users(self.path)
        self.assertFalse(STRONGER.check_needs_rehash(users["bob"].hash))
        self.assertTrue(STRONGER.check_needs_rehash(users["alice"].hash))  # untouched
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(await auth.authenticate(UsernamePassword("bob", "bob-pw")),
                         "bob@example.com")

    async def test_rehash_failure_does_not_fail_login(self):
        auth = FileAuthenticator(self.path, "example.com", hasher=STRONGER)
        self.patch(authfile, "_update", lambda path, change: (_ for _ in ()).throw(
            PermissionError("read-only")))
        self.assertEqual(await auth.authenticate(UsernamePassword("bob", "bob-pw")),
                         "bob@example.com")


# -- LDAP ---------------------------------------------------------------------

BASE = "dc=example,dc=com"


class _LdapServerFactory(protocol.ServerFactory):
    def __init__(self, root, tls_options=None):
        self.root = root
        self.tls_options = tls_options
        self.binds: list[tuple[str, bytes]] = []
        self.filters: list[object] = []
        self.search_requires_bind = False
        self.tls_started = 0
        self.connections = 0


components.registerAdapter(lambda f: f.root, _LdapServerFactory, interfaces.IConnectedLDAPEntry)


class _LdapServer(ldapserver.LDAPServer):
    """ldaptor's server, plus: a record of binds and filters, unauthenticated binds
    accepted (as some servers do), an optional bind-before-search rule, StartTLS."""

    def connectionMade(self):
        super().connectionMade()
        self.factory.connections += 1

    def handle_LDAPBindRequest(self, request, controls, reply):
        dn = request.dn.decode() if isinstance(request.dn, bytes) else request.dn
        self.factory.binds.append((dn, request.auth))
        if dn and not request.auth:  # RFC 4513 5.1.2 unauthenticated bind: "succeeds"
            return pureldap.LDAPBindResponse(resultCode=0)
        return super().handle_LDAPBindRequest(request, controls, reply)

    def handle_LDAPSearchRequest(self, request, controls, reply):
        self.factory.filters.append(request.filter)
        if self.factory.search_requires_bind and self.boundUser is None:
            raise ldaperrors.LDAPInsufficientAccessRights("bind first")
        return super().handle_LDAPSearchRequest(request, controls, reply)

    def extendedRequest_startTLS(self, data, reply):
        if self.factory.tls_options is None:
            raise ldaperrors.LDAPProtocolError("no TLS here")
        reply(pureldap.LDAPExtendedResponse(resultCode=0,
                                            responseName=pureldap.LDAPStartTLSResponse.oid))
        self.transport.startTLS(self.factory.tls_options)
        self.factory.tls_started += 1

    extendedRequest_startTLS.oid = pureldap.LDAPStartTLSRequest.oid


def make_directory():
    root = inmemory.ReadOnlyInMemoryLDAPEntry(dn=BASE, attributes={"dc": ["example"]})
    people = root.addChild("ou=people", {"objectClass": ["organizationalUnit"],
                                         "ou": ["people"]})
    groups = root.addChild("ou=groups", {"objectClass": ["organizationalUnit"],
                                         "ou": ["groups"]})
    root.addChild("cn=svc", {"objectClass": ["person"], "cn": ["svc"],
                             "userPassword": ["svc-secret"]})

    def person(uid, password, **attrs):
        attributes = {"objectClass": ["inetOrgPerson"], "uid": [uid],
                      "userPassword": [password]}
        attributes.update(attrs)
        people.addChild(f"uid={uid}", attributes)

    person("alice", "alice-secret", mail=["alice@example.com"],
           memberOf=[f"cn=admins,ou=groups,{BASE}"])
    person("alicia", "alicia-secret", mail=["alicia@example.com"])
    person("bob", "bob-secret", mail=["Bob@Example.com"])
    person("carol", "carol-secret", mail=["carol@elsewhere.org"])
    person("dave", "dave-secret")  # no mail
    person("ext@partner", "ext-secret", mail=["ext@example.com"])
    groups.addChild("cn=eng", {"objectClass": ["groupOfNames"], "cn": ["eng"],
                               "member": [f"uid=alice,ou=people,{BASE}"]})
    groups.addChild("cn=all", {"objectClass": ["groupOfNames"], "cn": ["all"],
                               "member": [f"uid=alice,ou=people,{BASE}",
                                          f"uid=bob,ou=people,{BASE}"]})
    groups.addChild("cn=ops", {"objectClass": ["posixGroup"], "cn": ["ops"],
                               "memberUid": ["bob"]})
    return root


class LdapTestMixin:
    def start_ldap(self, tls_options=None, listen_tls=False):
        factory = _LdapServerFactory(make_directory(), tls_options)
        factory.protocol = _LdapServer
        port = listen(self, factory, tls_options if listen_tls else None)
        return factory, port

    def ldap(self, port, **kw):
        kw.setdefault("domain", "example.com")
        kw.setdefault("timeout", 5)
        return LdapAuthenticator("127.0.0.1", port, f"ou=people,{BASE}", **kw)


class LdapTests(LdapTestMixin, unittest.TestCase):
    def setUp(self):
        self.server, self.port = self.start_ldap()
        self.auth = self.ldap(self.port, group_base_dn=f"ou=groups,{BASE}")

    def login(self, user, password, auth=None):
        return (auth or self.auth).authenticate(UsernamePassword(user, password))

    def test_interface(self):
        self.assertTrue(verifyObject(IAuthenticator, self.auth))
        self.assertEqual(self.auth.name, "ldap")

    async def test_success(self):
        self.assertEqual(await self.login("alice", "alice-secret"), "alice@example.com")
        self.assertEqual(self.server.binds, [(f"uid=alice,ou=people,{BASE}", b"alice-secret")])
        self.assertEqual(await self.login("bob", "bob-secret"), "bob@example.com")

    async def test_wrong_password(self):
        with self.assertRaises(AuthenticationFailed) as cm:
            await self.login("alice", "bob-secret")
        self.assertNotIsInstance(cm.exception, (UnknownUser, BackendUnavailable))

    async def test_unknown_user_costs_a_bind_too(self):
        with self.assertRaises(UnknownUser):
            await self.login("mallory", "alice-secret")
        self.assertEqual(len(self.server.binds), 1)
        dn, password = self.server.binds[0]
        self.assertTrue(dn.endswith(f",ou=people,{BASE}"))
        self.assertNotIn("uid=", dn)
        self.assertTrue(password)  # a real credential check, not an unauthenticated bind

    async def test_empty_password_never_binds(self):
        # This server lets an unauthenticated bind "succeed"; we must not send one.
        with self.assertRaises(AuthenticationFailed) as cm:
            await self.login("alice", "")
        self.assertNotIsInstance(cm.exception, UnknownUser)
        self.assertEqual(self.server.binds, [])
        self.assertEqual(self.server.connections, 0)

    async def test_filter_injection_is_escaped(self):
        # Unescaped, "ali*" would match uid=alice only and log in as alice.
        with self.assertRaises(UnknownUser):
            await self.login("ali*", "alice-secret")
        sent = self.server.filters[-1]
        self.assertIsInstance(sent, pureldap.LDAPFilter_equalityMatch)
        self.assertEqual(sent.assertionValue.value, b"ali*")
        for username in ("*", ")(uid=*", "alice)(|(uid=*", "\\2a", "alice\x00"):
            with self.assertRaises(UnknownUser):
                await self.login(username, "alice-secret")
            sent = self.server.filters[-1]
            self.assertIsInstance(sent, pureldap.LDAPFilter_equalityMatch)
            self.assertEqual(sent.assertionValue.value, username.encode())
        self.assertEqual(escape_filter_value("a*(b)\\\x00"), r"a\2a\28b\29\5c\00")

    async def test_injection_into_compound_filter(self):
        auth = self.ldap(self.port, user_filter="(&(objectClass=inetOrgPerson)(uid={username}))")
        self.assertEqual(await self.login("alice", "alice-secret", auth), "alice@example.com")
        with self.assertRaises(UnknownUser):
            await self.login("ali*", "alice-secret", auth)
        with self.assertRaises(UnknownUser):
            await self.login("x)(uid=alice", "alice-secret", auth)

    async def test_service_bind(self):
        self.server.search_requires_bind = True
        with self.assertRaises(BackendUnavailable):  # anonymous search refused
            await self.login("alice", "alice-secret")
        auth = self.ldap(self.port, bind_dn=f"cn=svc,{BASE}", bind_password="svc-secret")
        self.server.binds.clear()
        self.assertEqual(await self.login("alice", "alice-secret", auth), "alice@example.com")
        self.assertEqual(self.server.binds, [(f"cn=svc,{BASE}", b"svc-secret"),
                                             (f"uid=alice,ou=people,{BASE}", b"alice-secret")])
        bad = self.ldap(self.port, bind_dn=f"cn=svc,{BASE}", bind_password="nope")
        with self.assertRaises(BackendUnavailable):
            await self.login("alice", "alice-secret", bad)

    async def test_identity_from_uid_percent_encoded(self):
        auth = self.ldap(self.port, identity_attribute=None, domain="Corp.Example")
        self.assertEqual(await self.login("dave", "dave-secret", auth), "dave@corp.example")
        self.assertEqual(await self.login("ext@partner", "ext-secret", auth),
                         "ext%40partner@corp.example")

    async def test_identity_attribute_rules(self):
        with self.assertRaises(AuthenticationFailed) as cm:  # mail outside the domain
            await self.login("carol", "carol-secret")
        self.assertNotIsInstance(cm.exception, UnknownUser)
        anywhere = self.ldap(self.port, domain=None)
        self.assertEqual(await self.login("carol", "carol-secret", anywhere),
                         "carol@elsewhere.org")
        with self.assertRaises(AuthenticationFailed):  # no mail at all
            await self.login("dave", "dave-secret", anywhere)

    async def test_groups(self):
        self.assertEqual(await self.auth.groups("alice"), {"eng", "all", "admins"})
        self.assertEqual(await self.auth.groups("bob@example.com"), {"all", "ops"})
        self.assertEqual(await self.auth.groups("mallory"), set())
        self.assertEqual(await self.auth.groups("*"), set())
        by_uid = self.ldap(self.port, identity_attribute=None,
                           group_base_dn=f"ou=groups,{BASE}")
        self.assertEqual(await by_uid.groups("bob@example.com"), {"all", "ops"})
        self.assertEqual(await by_uid.groups("bob@other.org"), set())

    async def test_server_unreachable(self):
        # A port where nothing listens: a fresh listener, stopped at once.
        p = reactor.listenTCP(0, protocol.ServerFactory(), interface="127.0.0.1")
        closed = p.getHost().port
        await p.stopListening()
        with self.assertRaises(BackendUnavailable):
            await self.login("alice", "alice-secret", self.ldap(closed))

    async def test_timeout(self):
        port = listen(self, protocol.Factory.forProtocol(protocol.Protocol))  # never answers
        started = time.monotonic()
        with self.assertRaises(BackendUnavailable) as cm:
            await self.login("alice", "alice-secret", self.ldap(port, timeout=0.3))
        self.assertIn("timed out", cm.exception.reason)
        self.assertLess(time.monotonic() - started, 3)

    async def test_unsupported_credentials(self):
        with self.assertRaises(UnsupportedCredentials):
            await self.auth.authenticate(IdToken("a.b.c"))

    def test_configuration_checks(self):
        self.assertRaises(ValueError, self.ldap, 1, user_filter="(uid=alice)")
        self.assertRaises(ValueError, self.ldap, 1, user_filter="(uid={username}")
        self.assertRaises(ValueError, self.ldap, 1, identity_attribute=None, domain=None)
        self.assertRaises(ValueError, self.ldap, 1, bind_dn="cn=svc", bind_password="")
        self.assertRaises(ValueError, self.ldap, 1, tls="yes")


class LdapTlsTests(LdapTestMixin, unittest.TestCase):
    def setUp(self):
        self.tls_options, self.ca_pem = make_tls()

    async def test_starttls(self):
        server, port = self.start_ldap(self.tls_options)
        auth = self.ldap(port, tls="starttls", tls_trust_root=self.ca_pem,
                         tls_hostname="localhost")
        self.assertEqual(await auth.authenticate(UsernamePassword("alice", "alice-secret")),
                         "alice@example.com")
        self.assertEqual(server.tls_started, 1)

    async def test_starttls_untrusted_certificate(self):
        server, port = self.start_ldap(self.tls_options)
        _, other_ca = make_tls()
        auth = self.ldap(port, tls="starttls", tls_trust_root=other_ca,
                         tls_hostname="localhost")
        with self.assertRaises(BackendUnavailable):
            await auth.authenticate(UsernamePassword("alice", "alice-secret"))
        self.assertEqual(server.binds, [])  # the password never went out

    async def test_starttls_refused_by_server(self):
        server, port = self.start_ldap(None)
        auth = self.ldap(port, tls="starttls", tls_trust_root=self.ca_pem,
                         tls_hostname="localhost")
        with self.assertRaises(BackendUnavailable):
            await auth.authenticate(UsernamePassword("alice", "alice-secret"))
        self.assertEqual(server.binds, [])

    async def test_ldaps(self):
        server, port = self.start_ldap(self.tls_options, listen_tls=True)
        auth = self.ldap(port, tls="ldaps", tls_trust_root=self.ca_pem, tls_hostname="localhost")
        self.assertEqual(await auth.authenticate(UsernamePassword("bob", "bob-secret")),
                         "bob@example.com")
        self.assertEqual(server.connections, 1)
        wrong_name = self.ldap(port, tls="ldaps", tls_trust_root=self.ca_pem,
                               tls_hostname="ldap.example.com")
        with self.assertRaises(BackendUnavailable):
            await wrong_name.authenticate(UsernamePassword("bob", "bob-secret"))


# -- OpenID Connect --------------------------------------------------------------

ISSUER = "https://idp.example.com"
CLIENT = "perc-kmf"

EC1 = ec.generate_private_key(ec.SECP256R1())
EC2 = ec.generate_private_key(ec.SECP256R1())
EC_EVIL = ec.generate_private_key(ec.SECP256R1())
RSA1 = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_jwk(private_key, kid, **extra):
    pub = private_key.public_key()
    if isinstance(pub, ec.EllipticCurvePublicKey):
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(pub))
    else:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(pub))
    jwk.update(kid=kid, use="sig", **extra)
    return jwk


class JwksResource(resource.Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.keys = [public_jwk(EC1, "ec1"), public_jwk(RSA1, "rsa1", alg="RS256")]
        self.requests = 0
        self.status = 200

    def render_GET(self, request):
        self.requests += 1
        request.setResponseCode(self.status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"keys": self.keys}).encode()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class OidcTestMixin:
    def start_oidc(self):
        self.jwks = JwksResource()
        root = resource.Resource()
        root.putChild(b"jwks.json", self.jwks)
        port = listen(self, server.Site(root))
        self.jwks_url = f"http://127.0.0.1:{port}/jwks.json"
        self.clock = task.Clock()
        self.clock.advance(time.time())

    def oidc(self, **kw):
        kw.setdefault("clock", self.clock)
        kw.setdefault("timeout", 5)
        return OidcAuthenticator(ISSUER, CLIENT, self.jwks_url, **kw)

    def claims(self, **over):
        now = int(self.clock.seconds())
        claims = {"iss": ISSUER, "aud": CLIENT, "sub": "248289761001",
                  "email": "alice@example.com", "email_verified": True,
                  "iat": now, "exp": now + 300}
        claims.update(over)
        return {k: v for k, v in claims.items() if v is not None}

    def token(self, key=EC1, kid="ec1", alg="ES256", **over):
        headers = {"kid": kid} if kid is not None else {}
        return jwt.encode(self.claims(**over), key, algorithm=alg, headers=headers)


class OidcTests(OidcTestMixin, unittest.TestCase):
    def setUp(self):
        self.start_oidc()
        self.auth = self.oidc()

    def check(self, token, nonce=None, auth=None):
        return (auth or self.auth).authenticate(IdToken(token, nonce=nonce))

    async def refused(self, token, reason_part=None, **kw):
        with self.assertRaises(AuthenticationFailed) as cm:
            await self.check(token, **kw)
        self.assertEqual(str(cm.exception), "invalid credentials")
        if reason_part is not None:
            self.assertIn(reason_part, cm.exception.reason)
        return cm.exception

    def test_interface(self):
        self.assertTrue(verifyObject(IAuthenticator, self.auth))
        self.assertEqual(self.auth.name, "oidc")

    async def test_valid_es256_and_rs256(self):
        self.assertEqual(await self.check(self.token()), "alice@example.com")
        self.assertEqual(await self.check(self.token(RSA1, "rsa1", "RS256",
                                                     email="Bob@Example.COM")),
                         "bob@example.com")
        self.assertEqual(self.jwks.requests, 1)  # cached

    async def test_expired_and_not_yet_valid(self):
        now = int(self.clock.seconds())
        await self.refused(self.token(exp=now - 31, iat=now - 600), "expired")
        self.assertEqual(await self.check(self.token(exp=now - 29, iat=now - 600)),
                         "alice@example.com")  # within the leeway
        await self.refused(self.token(nbf=now + 120), "not yet valid")
        await self.refused(self.token(iat=now + 120, exp=now + 600), "future")
        await self.refused(self.token(exp=None), "exp")
        await self.refused(self.token(iat=None), "iat")
        await self.refused(self.token(exp="tomorrow"))
        await self.refused(self.token(exp=True))
        header, _, _ = self.token().split(".")
        body = json.dumps(self.claims()).replace(f'"exp": {now + 300}', '"exp": NaN')
        self.assertIn("NaN", body)
        signing_input = f"{header}.{b64url(body.encode())}".encode()
        algorithm = jwt.algorithms.ECAlgorithm(jwt.algorithms.ECAlgorithm.SHA256)
        nan = f"{signing_input.decode()}.{b64url(algorithm.sign(signing_input, EC1))}"
        await self.refused(nan, "exp is not a number")
        token = self.token()
        self.assertEqual(await self.check(token), "alice@example.com")
        self.clock.advance(301 + 30)
        await self.refused(token, "expired")

    async def test_wrong_audience_issuer_azp(self):
        await self.refused(self.token(aud="someone-else"), "Audience")
        await self.refused(self.token(aud=None), "aud")
        await self.refused(self.token(iss="https://evil.example"), "Issuer")
        await self.refused(self.token(aud=[CLIENT, "other"]), "azp")
        self.assertEqual(await self.check(self.token(aud=[CLIENT, "other"], azp=CLIENT)),
                         "alice@example.com")
        await self.refused(self.token(azp="other"), "azp")

    async def test_bad_signature(self):
        await self.refused(self.token(key=EC_EVIL, kid="ec1"), "Signature")
        header, payload, sig = self.token().split(".")
        tampered = json.loads(base64.urlsafe_b64decode(payload + "=="))
        tampered["email"] = "mallory@example.com"
        await self.refused(".".join([header, b64url(json.dumps(tampered).encode()), sig]))
        await self.refused("not-a-token", "malformed")

    async def test_algorithm_confusion_and_none(self):
        pem = EC1.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        for alg in ("HS256", "none"):
            header = b64url(json.dumps({"alg": alg, "kid": "ec1", "typ": "JWT"}).encode())
            body = b64url(json.dumps(self.claims()).encode())
            signing_input = f"{header}.{body}".encode()
            sig = b64url(hmac.new(pem, signing_input, sha256).digest()) if alg != "none" else ""
            await self.refused(f"{header}.{body}.{sig}", "not allowed")
        # An RS256 header naming the EC key
        await self.refused(self.token(RSA1, "ec1", "RS256"), "not for RS256")
        # Allowed algorithms are configurable: RS256 only refuses ES256.
        await self.refused(self.token(), "not allowed", auth=self.oidc(algorithms=("RS256",)))
        self.assertRaises(ValueError, self.oidc, algorithms=("HS256",))
        self.assertRaises(ValueError, self.oidc, algorithms=())

    async def test_unknown_kid_refetches_once(self):
        self.assertEqual(await self.check(self.token()), "alice@example.com")
        self.assertEqual(self.jwks.requests, 1)
        self.jwks.keys.append(public_jwk(EC2, "ec2"))
        self.assertEqual(await self.check(self.token(EC2, "ec2", email="carol@example.com")),
                         "carol@example.com")
        self.assertEqual(self.jwks.requests, 2)
        # Bogus kids: at most one refetch per refetch_interval.
        self.clock.advance(61)
        for i in range(5):
            await self.refused(self.token(EC_EVIL, f"bogus{i}"), "no key")
        self.assertEqual(self.jwks.requests, 3)
        self.clock.advance(61)
        await self.refused(self.token(EC_EVIL, "bogus"), "no key")
        self.assertEqual(self.jwks.requests, 4)

    async def test_key_rotation(self):
        old = self.token()
        self.assertEqual(await self.check(old), "alice@example.com")
        self.jwks.keys = [public_jwk(EC2, "ec2")]  # the provider rotates
        self.assertEqual(await self.check(self.token(EC2, "ec2")), "alice@example.com")
        await self.refused(old, "no key")  # ec1 is gone after the refetch
        self.assertEqual(self.jwks.requests, 2)

    async def test_jwks_ttl_and_stale_cache(self):
        await self.check(self.token())
        await self.check(self.token())
        self.assertEqual(self.jwks.requests, 1)
        self.clock.advance(3601)
        self.jwks.status = 503
        # Refresh fails: the cached keys still verify.
        self.assertEqual(await self.check(self.token()), "alice@example.com")
        self.assertEqual(self.jwks.requests, 2)
        self.jwks.status = 200
        self.clock.advance(3601)
        self.assertEqual(await self.check(self.token()), "alice@example.com")
        self.assertEqual(self.jwks.requests, 3)

    async def test_provider_down_without_cache(self):
        self.jwks.status = 500
        with self.assertRaises(BackendUnavailable):
            await self.check(self.token())
        self.jwks.keys = [{"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"}]
        self.jwks.status = 200
        self.clock.advance(61)
        with self.assertRaises(BackendUnavailable):  # no usable (asymmetric) keys
            await self.check(self.token())

    async def test_oversized_jwks_refused(self):
        self.jwks.keys.append({"kty": "oct", "k": "A" * (300 * 1024), "kid": "pad"})
        with self.assertRaises(BackendUnavailable) as cm:
            await self.check(self.token())
        self.assertIn("larger than", cm.exception.reason)

    async def test_token_without_kid(self):
        self.jwks.keys = [public_jwk(EC1, "ec1")]
        self.assertEqual(await self.check(self.token(kid=None)), "alice@example.com")
        self.jwks.keys.append(public_jwk(EC2, "ec2"))
        self.clock.advance(3601)
        await self.refused(self.token(kid=None), "no key")  # ambiguous

    async def test_claim_mapping_and_domain(self):
        strict = self.oidc(domain="Example.com")
        self.assertEqual(await self.check(self.token(), auth=strict), "alice@example.com")
        await self.refused(self.token(email="alice@evil.example"), "outside", auth=strict)
        await self.refused(self.token(email_verified=False), "verified")
        await self.refused(self.token(email_verified=None), "verified")
        await self.refused(self.token(email=None), "no email")
        by_name = self.oidc(claim="preferred_username", domain="example.com")
        self.assertEqual(await self.check(self.token(preferred_username="a@b%c@example.com"),
                                          auth=by_name), "a%40b%25c@example.com")
        self.assertEqual(await self.check(self.token(preferred_username="dave"), auth=by_name),
                         "dave@example.com")
        no_domain = self.oidc(claim="sub")
        await self.refused(self.token(), "no domain", auth=no_domain)

    async def test_nonce(self):
        token = self.token(nonce="n-0S6_WzA2Mj")
        self.assertEqual(await self.check(token, nonce="n-0S6_WzA2Mj"), "alice@example.com")
        await self.refused(token, "nonce", nonce="other")
        await self.refused(self.token(), "nonce", nonce="n-0S6_WzA2Mj")

    async def test_unsupported_credentials(self):
        with self.assertRaises(UnsupportedCredentials):
            await self.auth.authenticate(UsernamePassword("alice", "pw"))

    def test_jwks_url_must_be_https_off_loopback(self):
        self.assertRaises(ValueError, OidcAuthenticator, ISSUER, CLIENT,
                          "http://idp.example.com/jwks.json")
        OidcAuthenticator(ISSUER, CLIENT, "https://idp.example.com/jwks.json")


# -- the chain -------------------------------------------------------------------


class _Fake:
    name = "fake"

    def __init__(self, result):
        self.result = result
        self.calls = 0

    def authenticate(self, credentials):
        self.calls += 1
        if isinstance(self.result, BaseException):
            return defer.fail(self.result)
        return defer.succeed(self.result)


class ChainTests(LdapTestMixin, OidcTestMixin, unittest.TestCase):
    def setUp(self):
        directory = self.mktemp()
        os.makedirs(directory)
        self.path = os.path.join(directory, "users.jsonl")
        authfile.add_user(self.path, "alice", "file-pw", hasher=FAST)
        authfile.add_user(self.path, "root", "root-pw", hasher=FAST)
        authfile.disable_user(self.path, "root")
        self.ldap_server, ldap_port = self.start_ldap()
        self.start_oidc()
        self.file_auth = FileAuthenticator(self.path, "local.example.com", hasher=FAST)
        self.chain = AuthenticatorChain([self.file_auth, self.ldap(ldap_port), self.oidc()])

    def login(self, user, password):
        return self.chain.authenticate(UsernamePassword(user, password))

    def test_interface(self):
        self.assertTrue(verifyObject(IAuthenticator, self.chain))
        self.assertEqual(self.chain.name, "chain")

    async def test_file_user_first(self):
        self.assertEqual(await self.login("alice", "file-pw"), "alice@local.example.com")
        self.assertEqual(self.ldap_server.connections, 0)

    async def test_unknown_to_file_then_ldap(self):
        self.assertEqual(await self.login("bob", "bob-secret"), "bob@example.com")
        self.assertEqual(await self.login("ext@partner", "ext-secret"), "ext@example.com")

    async def test_wrong_password_in_file_stops(self):
        # LDAP's alice has this password, but the file knows alice: stop there.
        with self.assertRaises(AuthenticationFailed) as cm:
            await self.login("alice", "alice-secret")
        self.assertIs(type(cm.exception), AuthenticationFailed)
        self.assertEqual(self.ldap_server.connections, 0)
        self.assertIn("file: wrong password", cm.exception.reason)

    async def test_id_token_goes_to_oidc(self):
        self.assertEqual(await self.chain.authenticate(IdToken(self.token())),
                         "alice@example.com")

    async def test_uniform_failures(self):
        attempts = [
            UsernamePassword("mallory", "whatever-pw"),  # unknown everywhere
            UsernamePassword("alice", "wrong-pw"),  # file: wrong password
            UsernamePassword("root", "root-pw"),  # file: disabled
            UsernamePassword("bob", "wrong-pw"),  # ldap: wrong password
            UsernamePassword("bob", ""),  # empty password
            UsernamePassword("carol", "carol-secret"),  # ldap: mail outside domain
            IdToken(self.token(aud="other")),
            IdToken("garbage"),
        ]
        reasons = set()
        for credentials in attempts:
            with self.assertRaises(AuthenticationFailed) as cm:
                await self.chain.authenticate(credentials)
            e = cm.exception
            self.assertIs(type(e), AuthenticationFailed)
            self.assertEqual((str(e), e.args), ("invalid credentials", ("invalid credentials",)))
            self.assertTrue(e.reason)
            password = getattr(credentials, "password", None)
            if password:
                self.assertNotIn(password, e.reason + repr(e))
            reasons.add(e.reason)
        self.assertEqual(len(reasons), len(attempts))  # the logs can tell them apart

    async def test_backend_unavailable_fails_closed(self):
        dead = _Fake(BackendUnavailable("ldap: timed out"))
        later = _Fake("bob@example.com")
        chain = AuthenticatorChain([dead, later])
        with self.assertRaises(AuthenticationFailed) as cm:
            await chain.authenticate(UsernamePassword("bob", "pw"))
        self.assertIs(type(cm.exception), AuthenticationFailed)
        self.assertEqual(later.calls, 0)
        buggy = AuthenticatorChain([_Fake(KeyError("bug")), later])
        with self.assertRaises(AuthenticationFailed):
            await buggy.authenticate(UsernamePassword("bob", "pw"))
        self.assertEqual(later.calls, 0)
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    async def test_unsupported_everywhere(self):
        chain = AuthenticatorChain([self.file_auth])
        with self.assertRaises(UnsupportedCredentials):
            await chain.authenticate(IdToken(self.token()))
        with self.assertRaises(UnsupportedCredentials):
            await AuthenticatorChain([]).authenticate(UsernamePassword("a", "b"))

    def test_failure_delay(self):
        clock = task.Clock()
        chain = AuthenticatorChain([_Fake(UnknownUser("x")), _Fake(AuthenticationFailed("y"))],
                                   failure_delay=0.5, clock=clock)
        d = chain.authenticate(UsernamePassword("a", "b"))
        self.assertNoResult(d)
        clock.advance(0.49)
        self.assertNoResult(d)
        clock.advance(0.02)
        f = self.failureResultOf(d, AuthenticationFailed)
        self.assertEqual(f.value.reason, "fake: x; fake: y")
        ok = AuthenticatorChain([_Fake("a@b")], failure_delay=0.5, clock=clock)
        self.assertEqual(self.successResultOf(ok.authenticate(UsernamePassword("a", "b"))),
                         "a@b")


# -- rate limiting --------------------------------------------------------------------


class RateLimiterTests(unittest.TestCase):
    def test_per_user(self):
        rl = LoginRateLimiter(user_limit=5, address_limit=100, window=900)
        for i in range(5):
            rl.check("alice", f"10.0.0.{i}", 1000 + i)
            rl.record_failure("alice", f"10.0.0.{i}", 1000 + i)
        with self.assertRaises(RateLimited) as cm:
            rl.check("Alice", "10.9.9.9", 1010)  # any address, any case
        self.assertEqual(cm.exception.scope, "user")
        self.assertEqual(cm.exception.retry_after, 1000 + 900 - 1010)
        rl.check("bob", "10.9.9.9", 1010)  # other users unaffected

    def test_per_address(self):
        rl = LoginRateLimiter(user_limit=5, address_limit=20, window=900)
        for i in range(20):
            rl.record_failure(f"user{i}", "192.0.2.7", 1000)
        with self.assertRaises(RateLimited) as cm:
            rl.check("fresh", "192.0.2.7", 1001)
        self.assertEqual(cm.exception.scope, "address")
        rl.check("fresh", "192.0.2.8", 1001)
        rl.check(None, "192.0.2.8", 1001)

    def test_ipv6_counted_per_prefix(self):
        rl = LoginRateLimiter(address_limit=3, window=900)
        for i in range(3):
            rl.record_failure(None, f"2001:db8:1:2::{i + 1}", 0)
        self.assertRaises(RateLimited, rl.check, None, "2001:db8:1:2:ffff::1", 1)
        rl.check(None, "2001:db8:1:3::1", 1)
        for _ in range(3):
            rl.record_failure(None, "::ffff:198.51.100.1", 0)
        self.assertRaises(RateLimited, rl.check, None, "198.51.100.1", 1)

    def test_sliding_window_expiry(self):
        rl = LoginRateLimiter(user_limit=3, window=60)
        for t in (0, 10, 20):
            rl.record_failure("alice", None, t)
        self.assertRaises(RateLimited, rl.check, "alice", None, 59)
        rl.check("alice", None, 60)  # the failure at 0 left the window
        rl.record_failure("alice", None, 60)
        with self.assertRaises(RateLimited) as cm:
            rl.check("alice", None, 61)
        self.assertEqual(cm.exception.retry_after, 10 + 60 - 61)
        rl.check("alice", None, 200)

    def test_success_clears_user_not_address(self):
        rl = LoginRateLimiter(user_limit=2, address_limit=3, window=60)
        rl.record_failure("alice", "192.0.2.1", 0)
        rl.record_failure("alice", "192.0.2.1", 1)
        self.assertRaises(RateLimited, rl.check, "alice", "192.0.2.2", 2)
        rl.record_success("alice", "192.0.2.2", 3)
        rl.check("alice", "192.0.2.2", 4)
        rl.record_failure("mallory", "192.0.2.1", 5)
        rl.record_success("mallory", "192.0.2.1", 6)
        self.assertRaises(RateLimited, rl.check, "bob", "192.0.2.1", 7)

    def test_bounded_memory(self):
        rl = LoginRateLimiter(user_limit=5, address_limit=5, window=100, max_keys=10)
        for i in range(1000):
            rl.record_failure(f"user{i}", f"10.{i // 256}.{i % 256}.1", i * 0.001)
            self.assertLessEqual(max(rl.tracked), 10)
        for _ in range(1000):
            rl.record_failure("alice", None, 50)
        self.assertEqual(len(rl._users._entries["alice"]), 5)  # per-key bound
        # Expired entries go before live ones.
        rl = LoginRateLimiter(user_limit=2, window=100, max_keys=3)
        rl.record_failure("old1", None, 0)
        rl.record_failure("old2", None, 0)
        for t in (200, 201):
            rl.record_failure("victim", None, t)
        rl.record_failure("new", None, 202)
        self.assertRaises(RateLimited, rl.check, "victim", None, 203)
        self.assertEqual(rl.tracked[0], 2)

    def test_invalid_configuration(self):
        self.assertRaises(ValueError, LoginRateLimiter, user_limit=0)
        self.assertRaises(ValueError, LoginRateLimiter, window=0)
        self.assertRaises(ValueError, LoginRateLimiter, max_keys=0)


class AuthenticateLimitedTests(unittest.TestCase):
    def setUp(self):
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "users.jsonl")
        authfile.add_user(path, "alice", "alice-pw", hasher=FAST)
        self.hasher = CountingHasher(time_cost=1, memory_cost=1024, parallelism=1)
        self.chain = AuthenticatorChain([FileAuthenticator(path, "example.com",
                                                           hasher=self.hasher)])
        self.clock = task.Clock()
        self.limiter = LoginRateLimiter(user_limit=3, address_limit=10, window=60)

    def attempt(self, user, password, address="192.0.2.1"):
        return authenticate_limited(self.chain, self.limiter, UsernamePassword(user, password),
                                    address, self.clock)

    async def test_lockout_and_recovery(self):
        for _ in range(3):
            with self.assertRaises(AuthenticationFailed):
                await self.attempt("alice", "guess", address="192.0.2.9")
        verified = len(self.hasher.verified)
        with self.assertRaises(RateLimited) as cm:
            await self.attempt("alice", "alice-pw")  # right password, still refused
        self.assertEqual(len(self.hasher.verified), verified)  # not even tried
        self.assertEqual(cm.exception.retry_after, 60)
        self.clock.advance(60)
        self.assertEqual(await self.attempt("alice", "alice-pw"), "alice@example.com")

    async def test_unknown_users_count_too(self):
        for _ in range(3):
            with self.assertRaises(AuthenticationFailed):
                await self.attempt("nobody", "guess")
        with self.assertRaises(RateLimited):  # same answer as for an existing user
            await self.attempt("nobody", "guess")

    async def test_concurrent_attempts_counted_before_evaluation(self):
        """40 concurrent wrong passwords, one address: limits 5 per user, 20 per address.

        Checking, then awaiting the back-end, then recording the failure let
        all 40 be evaluated; each attempt must count before it is evaluated.
        """
        async def flood(user_of):
            limiter = LoginRateLimiter(user_limit=5, address_limit=20, window=900)
            self.hasher.verified.clear()
            attempts = [authenticate_limited(self.chain, limiter,
                                             UsernamePassword(user_of(i), f"guess-{i}"),
                                             "192.0.2.1", self.clock) for i in range(40)]
            results = await defer.DeferredList(attempts, consumeErrors=True)
            outcomes = sorted(type(f.value).__name__ for ok, f in results if not ok)
            self.assertEqual(len(outcomes), 40)
            return outcomes, len(self.hasher.verified)

        outcomes, verified = await flood(lambda i: "alice")
        self.assertEqual(outcomes, ["AuthenticationFailed"] * 5 + ["RateLimited"] * 35)
        self.assertEqual(verified, 5)
        outcomes, verified = await flood(lambda i: f"user{i}")
        self.assertEqual(outcomes, ["AuthenticationFailed"] * 20 + ["RateLimited"] * 20)
        self.assertEqual(verified, 20)

    async def test_success_takes_its_attempt_back(self):
        limiter = LoginRateLimiter(user_limit=3, address_limit=3, window=60)
        for _ in range(5):  # successes do not use up the address's allowance
            self.assertEqual(await authenticate_limited(
                self.chain, limiter, UsernamePassword("alice", "alice-pw"), "192.0.2.1",
                self.clock), "alice@example.com")
        self.assertEqual(limiter.tracked, (0, 0))

    async def test_id_tokens_limited_per_address(self):
        chain = AuthenticatorChain([_Fake(AuthenticationFailed("bad token"))])
        limiter = LoginRateLimiter(address_limit=2, window=60)
        for _ in range(2):
            with self.assertRaises(AuthenticationFailed):
                await authenticate_limited(chain, limiter, IdToken("t"), "192.0.2.1", self.clock)
        with self.assertRaises(RateLimited):
            await authenticate_limited(chain, limiter, IdToken("t"), "192.0.2.1", self.clock)


class PackageTests(unittest.TestCase):
    def test_exports(self):
        import perc_daemons.kmf.auth as package

        for name in package.__all__:
            self.assertTrue(hasattr(package, name), name)
