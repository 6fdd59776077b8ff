"""LDAP back-end: search for the user, then a simple bind as that entry (ldaptor).

Per login: connect (plain, StartTLS or LDAPS), bind as the service account
(or stay anonymous), search ``base_dn`` with ``user_filter`` (the username
escaped per RFC 4515), require exactly one entry, then bind as that entry's
DN with the password on the same connection, and close.

* An empty password is refused before anything is sent: a DN with an empty
  password is an "unauthenticated bind" (RFC 4513 section 5.1.2) that some
  servers answer with success.
* When no entry matches, a bind to a DN that does not exist is made anyway,
  so unknown and known users cost the same round trips.
* Identity: the ``identity_attribute`` value (e.g. ``mail``, whose domain
  must equal ``domain`` when that is set), or with ``identity_attribute=None``
  the entry's ``username_attribute`` value ``@domain``.
* :meth:`LdapAuthenticator.groups` returns the names (``group_attribute``,
  e.g. ``cn``) of the groups whose ``group_filter`` matches the user, plus the
  first RDN value of each ``memberOf`` DN.
"""

from __future__ import annotations

import secrets

from ldaptor import ldapfilter
from ldaptor.protocols import pureldap
from ldaptor.protocols.ldap import distinguishedname, ldapclient, ldaperrors, ldapsyntax
from twisted.internet import defer, protocol
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.logger import Logger
from zope.interface import implementer

from perc_daemons.interfaces import IAuthenticator
from perc_daemons.kmf.auth import (
    AuthenticationFailed,
    BackendUnavailable,
    UnknownUser,
    UnsupportedCredentials,
    UsernamePassword,
    make_identity,
    split_identity,
)

log = Logger()

TLS_MODES = ("none", "starttls", "ldaps")
MAX_USERNAME_CHARS = 256
MAX_PASSWORD_BYTES = 1024

_FILTER_ESCAPES = {"\\": r"\5c", "*": r"\2a", "(": r"\28", ")": r"\29", "\0": r"\00"}


def escape_filter_value(value: str) -> str:
    """Escape an assertion value for an LDAP filter string (RFC 4515 section 3)."""
    return "".join(_FILTER_ESCAPES.get(c, c) for c in value)


def _text(value: object) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _values(entry: ldapsyntax.LDAPEntry, attribute: str) -> list[str]:
    for key in entry.keys():
        if _text(key).lower() == attribute.lower():
            return sorted(_text(v) for v in entry[key])
    return []


class _Client(ldapclient.LDAPClient):
    """An LDAPClient that tells when its connection is gone."""

    def __init__(self) -> None:
        super().__init__()
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        super().connectionLost(reason)
        if not self.lost.called:
            self.lost.callback(None)


@implementer(IAuthenticator)
class LdapAuthenticator:
    """:class:`UsernamePassword` checked against an LDAP directory."""

    name = "ldap"

    def __init__(
        self,
        host: str,
        port: int,
        base_dn: str,
        *,
        domain: str | None = None,
        bind_dn: str | None = None,
        bind_password: str | None = None,
        user_filter: str = "(uid={username})",
        username_attribute: str = "uid",
        identity_attribute: str | None = "mail",
        group_base_dn: str | None = None,
        group_filter: str = "(|(member={dn})(uniqueMember={dn})(memberUid={username}))",
        group_attribute: str = "cn",
        tls: str = "none",
        tls_trust_root: Certificate | bytes | None = None,
        tls_hostname: str | None = None,
        timeout: float = 10.0,
        reactor=None,
    ) -> None:
        if "{username}" not in user_filter:
            raise ValueError("user_filter must contain {username}")
        try:  # fail at start-up, not at the first login
            ldapfilter.parseFilter(user_filter.replace("{username}", "x"))
            ldapfilter.parseFilter(group_filter.replace("{dn}", "x").replace("{username}", "x"))
        except ldapfilter.InvalidLDAPFilter as e:
            raise ValueError(f"invalid LDAP filter: {e}") from None
        if identity_attribute is None and not domain:
            raise ValueError("identity_attribute=None needs a domain")
        if (bind_dn is None) != (bind_password is None) or bind_password == "":
            raise ValueError("bind_dn and a non-empty bind_password go together")
        if tls not in TLS_MODES:
            raise ValueError(f"tls must be one of {TLS_MODES}")
        self.host, self.port = host, port
        self.base_dn = base_dn
        self.domain = domain.lower() if domain else None
        self._bind_dn, self._bind_password = bind_dn, bind_password
        self.user_filter = user_filter
        self.username_attribute = username_attribute
        self.identity_attribute = identity_attribute
        self.group_base_dn = group_base_dn or base_dn
        self.group_filter = group_filter
        self.group_attribute = group_attribute
        self.tls = tls
        if isinstance(tls_trust_root, bytes):
            tls_trust_root = Certificate.loadPEM(tls_trust_root)
        self._trust_root = tls_trust_root
        self._tls_hostname = tls_hostname or host
        self.timeout = timeout
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor

    # -- connection ------------------------------------------------------

    def _tls_options(self):
        return optionsForClientTLS(self._tls_hostname, trustRoot=self._trust_root)

    async def _connect(self) -> _Client:
        endpoint = HostnameEndpoint(self._reactor, self.host, self.port, timeout=self.timeout)
        if self.tls == "ldaps":
            endpoint = wrapClientTLS(self._tls_options(), endpoint)
        client = await connectProtocol(endpoint, _Client())
        try:
            if self.tls == "starttls":
                await client.startTLS(self._tls_options())
            if self._bind_dn is not None:
                await client.bind(self._bind_dn, self._bind_password)
        except BaseException:
            await self._close(client)
            raise
        return client

    async def _close(self, client: _Client) -> None:
        if client.transport is not None and client.connected:
            try:
                client.unbind()  # sends UnbindRequest and closes
            except Exception:
                client.transport.abortConnection()
        await client.lost

    def _run(self, coro) -> defer.Deferred:
        """Run an LDAP conversation with the overall timeout; errors become BackendUnavailable."""

        async def guarded():
            try:
                return await coro
            except AuthenticationFailed:
                raise
            except defer.CancelledError:
                raise BackendUnavailable("ldap: timed out") from None
            except ldaperrors.LDAPException as e:
                raise BackendUnavailable(f"ldap: {type(e).__name__}: {e}") from None
            except Exception as e:
                raise BackendUnavailable(f"ldap: {type(e).__name__}: {e}") from None

        d = defer.Deferred.fromCoroutine(guarded())
        d.addTimeout(self.timeout, self._reactor,
                     onTimeoutCancel=lambda _r, _t: defer.fail(
                         BackendUnavailable("ldap: timed out")))
        return d

    async def _search(self, client: _Client, base: str, filter_text: str,
                      attributes: list[str], limit: int = 0) -> list[ldapsyntax.LDAPEntry]:
        base_entry = ldapsyntax.LDAPEntry(client, base)
        return await base_entry.search(
            filterObject=ldapfilter.parseFilter(filter_text),
            attributes=attributes,
            scope=pureldap.LDAP_SCOPE_wholeSubtree,
            sizeLimit=limit,
            sizeLimitIsNonFatal=True,
        )

    # -- IAuthenticator ----------------------------------------------------

    def authenticate(self, credentials: object) -> defer.Deferred[str]:
        if not isinstance(credentials, UsernamePassword):
            return defer.fail(UnsupportedCredentials(type(credentials).__name__))
        username, password = credentials.username, credentials.password
        if not isinstance(username, str) or not username or len(username) > MAX_USERNAME_CHARS:
            return defer.fail(UnknownUser("malformed username"))
        if not isinstance(password, str) or not password:
            # Never bind with an empty password: it would be an unauthenticated bind.
            return defer.fail(AuthenticationFailed("empty password"))
        if len(password.encode("utf-8")) > MAX_PASSWORD_BYTES:
            return defer.fail(AuthenticationFailed("password too long"))
        return self._run(self._authenticate(username, password))

    def _attributes(self) -> list[str]:
        attrs = [self.username_attribute]
        if self.identity_attribute:
            attrs.append(self.identity_attribute)
        return attrs

    async def _authenticate(self, username: str, password: str) -> str:
        client = await self._connect()
        try:
            filter_text = self.user_filter.replace("{username}", escape_filter_value(username))
            entries = await self._search(client, self.base_dn, filter_text,
                                         self._attributes(), limit=2)
            if len(entries) != 1:
                # Same round trips as a real user: bind to a DN that cannot exist.
                dummy = f"cn=perc-no-such-user-{secrets.token_hex(8)},{self.base_dn}"
                try:
                    await client.bind(dummy, password)
                except ldaperrors.LDAPException:
                    pass
                what = "no entry" if not entries else "several entries"
                raise UnknownUser(f"{what} for {username!r}")
            entry = entries[0]
            dn = entry.dn.getText()
            try:
                await client.bind(dn, password)
            except ldaperrors.LDAPInvalidCredentials:
                raise AuthenticationFailed(f"wrong password for {dn}") from None
            return self._identity(entry)
        finally:
            await self._close(client)

    def _identity(self, entry: ldapsyntax.LDAPEntry) -> str:
        dn = entry.dn.getText()
        if self.identity_attribute:
            values = _values(entry, self.identity_attribute)
            if len(values) != 1:
                raise AuthenticationFailed(
                    f"{dn}: needs exactly one {self.identity_attribute}, has {len(values)}")
            user, sep, domain = values[0].rpartition("@")
            if not sep:
                if self.domain is None:
                    raise AuthenticationFailed(f"{dn}: {self.identity_attribute} has no domain")
                user, domain = values[0], self.domain
            if self.domain is not None and domain.lower() != self.domain:
                raise AuthenticationFailed(f"{dn}: identity outside {self.domain}")
            return make_identity(user, domain)
        values = _values(entry, self.username_attribute)
        if len(values) != 1:
            raise AuthenticationFailed(f"{dn}: needs exactly one {self.username_attribute}")
        assert self.domain is not None
        return make_identity(values[0], self.domain)

    # -- groups --------------------------------------------------------------

    def groups(self, identity_or_username: str) -> defer.Deferred[set[str]]:
        """Names of the groups the user belongs to (empty if the user is unknown)."""
        return self._run(self._groups(identity_or_username))

    def _lookup_filter(self, who: str) -> str:
        if "@" in who:
            user, domain = split_identity(who)
            if self.identity_attribute:
                value = f"{user}@{domain}"
                return f"({self.identity_attribute}={escape_filter_value(value)})"
            if domain.lower() != self.domain:
                raise UnknownUser(f"{who!r} is outside {self.domain}")
            return f"({self.username_attribute}={escape_filter_value(user)})"
        return self.user_filter.replace("{username}", escape_filter_value(who))

    async def _groups(self, who: str) -> set[str]:
        try:
            filter_text = self._lookup_filter(who)
        except (UnknownUser, ValueError):
            return set()
        client = await self._connect()
        try:
            entries = await self._search(
                client, self.base_dn, filter_text,
                [self.username_attribute, "memberOf"], limit=2)
            if len(entries) != 1:
                return set()
            entry = entries[0]
            dn = entry.dn.getText()
            names: set[str] = set()
            for group_dn in _values(entry, "memberOf"):
                try:
                    rdn = distinguishedname.DistinguishedName(group_dn).split()[0]
                except Exception:
                    log.warn("ldap: ignoring memberOf {dn!r}", dn=group_dn)
                    continue
                names.add(_text(rdn.split()[0].value))
            uid = (_values(entry, self.username_attribute) or [""])[0]
            group_filter = (self.group_filter.replace("{dn}", escape_filter_value(dn))
                            .replace("{username}", escape_filter_value(uid)))
            for group in await self._search(client, self.group_base_dn, group_filter,
                                            [self.group_attribute]):
                names.update(_values(group, self.group_attribute))
            return names
        finally:
            await self._close(client)
