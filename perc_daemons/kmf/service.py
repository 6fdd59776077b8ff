"""twistd plugin module for perc-kmf (see the package docstring for its role).

The service runs the admin listener (/healthz, /metrics) and the HTTPS API of
:mod:`perc_daemons.kmf.api` over the conference store of ``[store]``.

Start-up (in ``makeService``, before anything listens) checks and prepares
the files of the configuration; any problem is one line naming the file, key
and reason, exit status 2:

- ``[keys] kek_file`` is created (32 random bytes, mode 0600) when missing,
  and its directory (0700) with it; an existing one must be mode 0600/0640.
- ``[keys] signing_dir``: its first ES256 key is created when the directory
  is missing or holds no ``index.json``; otherwise the keys are loaded.
- ``[https] certificate`` and ``private_key`` must exist (the key mode
  0600/0640), unless ``dev_self_signed = true`` and both are missing: then a
  self-signed development certificate is written there.  A production KMF
  never silently invents a certificate its clients would not trust.
- ``[store]``: the SQLite file (and its 0700 directory) is created; Redis is
  connected at start and the daemon stops if that fails.  The OAuth grant
  store (codes, refresh tokens) uses the same back-end: tables in the same
  SQLite file, or keys under the same Redis namespace.
- ``[oauth] clients_file`` is loaded (a missing file means no clients: every
  OAuth request is then refused as ``invalid_client``; a bad file is a
  configuration error).  ``[auth]`` builds the login back-ends in the order
  of ``backends`` (the local user file; ``[auth.ldap]``, whose
  ``bind_password_file`` must be mode 0600/0640 and ``tls_ca_file`` a PEM
  certificate; ``[auth.oidc]``, whose ``client_secret_file`` must be mode
  0600/0640 when its endpoints enable sign-in at the provider) and the
  failed-login rate limiter.  With an
  LDAP back-end the API also honours conferences' ``invited_groups``.
"""

from __future__ import annotations

import os
import secrets
import sys
from typing import Any

from ldaptor import ldapfilter
from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet import defer, ssl
from twisted.logger import Logger
from twisted.python.failure import Failure

from perc_daemons import config as config_module
from perc_daemons import tls
from perc_daemons.daemon import EXIT_CONFIG, DaemonOptions, base_service
from perc_daemons.kmf.api import GroupCache, KmfApi, kmf_site
from perc_daemons.kmf.audit import AuditLog
from perc_daemons.kmf.auth import AuthenticatorChain, LoginRateLimiter
from perc_daemons.kmf.auth.file import FileAuthenticator
from perc_daemons.kmf.auth.ldap import LdapAuthenticator
from perc_daemons.kmf.auth.oidc import OidcAuthenticator, OidcLogin
from perc_daemons.kmf.clients import ClientAuthLimiter, ClientFileError, ClientRegistry
from perc_daemons.kmf.kek import KeyEncryptionKey, KeyFileError
from perc_daemons.kmf.oauth import AuthorizationServer
from perc_daemons.kmf.schedule import ScheduleTimers
from perc_daemons.kmf.signing import INDEX_NAME, SigningKeyError, SigningKeys
from perc_daemons.listening import HttpsService
from perc_daemons.protocol.ekt import EktCipher
from perc_daemons.store import StoreUnavailable
from perc_daemons.store.grants_sqlite import SqliteGrantStore
from perc_daemons.store.sqlite import SqliteConferenceStore, prepare_path


class Options(DaemonOptions):
    daemon = "kmf"
    synopsis = "[--config /etc/perc/kmf.toml]"


def _error(cfg: config_module.Config, key: str, reason: str) -> config_module.ConfigError:
    return config_module.ConfigError(cfg.origin(key), key, reason)


def load_kek(cfg: config_module.Config) -> KeyEncryptionKey:
    path = cfg["keys"].kek_file
    try:
        if not os.path.lexists(path):
            parent = os.path.dirname(path)
            if not os.path.isdir(parent):
                os.makedirs(parent, mode=0o700, exist_ok=True)
            return KeyEncryptionKey.generate(path)
        return KeyEncryptionKey.load(path)
    except KeyFileError as e:
        raise _error(cfg, "keys.kek_file", str(e)) from None
    except OSError as e:
        raise _error(cfg, "keys.kek_file", f"{path}: {e.strerror or e}") from None


def load_signing_keys(cfg: config_module.Config, now: float) -> SigningKeys:
    directory = cfg["keys"].signing_dir
    try:
        if not os.path.exists(os.path.join(directory, INDEX_NAME)):
            parent = os.path.dirname(directory)
            if not os.path.isdir(parent):
                os.makedirs(parent, mode=0o700, exist_ok=True)
            return SigningKeys.create(directory, now)
        return SigningKeys.load(directory)
    except SigningKeyError as e:
        raise _error(cfg, "keys.signing_dir", str(e)) from None
    except OSError as e:
        raise _error(cfg, "keys.signing_dir", f"{directory}: {e.strerror or e}") from None


def tls_context(cfg: config_module.Config) -> tls.ServerContextFactory:
    https = cfg.https
    cert, key = https.certificate, https.private_key
    if https.dev_self_signed and not os.path.lexists(cert) and not os.path.lexists(key):
        try:
            tls.generate_self_signed(cert, key)
        except OSError as e:
            raise _error(cfg, "https.certificate",
                         f"{cert}: cannot create a development certificate: "
                         f"{e.strerror or e}") from None
    if not os.path.exists(cert):
        raise _error(cfg, "https.certificate", f"{cert}: file not found")
    try:
        tls.check_private_key_file(key)
    except tls.TlsFileError as e:
        raise _error(cfg, "https.private_key", f"{key}: {e}") from None
    try:
        return tls.server_context_factory(cert, key, request_client_certificate=True)
    except tls.TlsFileError as e:
        name = "https.private_key" if str(e).startswith("private key") else "https.certificate"
        raise _error(cfg, name, str(e)) from None


class PendingGrantStore:
    """Stands for the grant store until it is open: every operation fails (503)."""

    def __getattr__(self, name: str) -> Any:
        def unavailable(*args: Any, **kwargs: Any) -> defer.Deferred:
            return defer.fail(StoreUnavailable("the grant store is not open yet"))
        return unavailable

    def close(self) -> defer.Deferred:
        return defer.succeed(None)


class GrantStoreHolder:
    """The grant store, once its probe has opened it; closed at stop."""

    def __init__(self, server: AuthorizationServer | None = None) -> None:
        self.server = server
        self.store: Any = PendingGrantStore()

    def opened(self, store: Any) -> Any:
        self.store = store
        if self.server is not None:
            self.server.grants = store
        return store

    def close(self) -> defer.Deferred:
        return defer.maybeDeferred(self.store.close)


def open_store(cfg: config_module.Config, grants: GrantStoreHolder | None = None):
    """The configured store (not yet checked to be usable) and its readiness probe.

    The probe also opens the OAuth grant store on the same back-end into
    ``grants`` when given.
    """
    store_cfg = cfg.store
    if store_cfg.backend == "sqlite":
        path = store_cfg.sqlite_path
        try:
            prepare_path(path)
        except OSError as e:
            raise _error(cfg, "store.sqlite_path", f"{path}: {e.strerror or e}") from None
        store = SqliteConferenceStore(path)

        def probe() -> defer.Deferred:
            d = store.list()
            if grants is not None:
                d.addCallback(lambda _: SqliteGrantStore.open(path)).addCallback(grants.opened)
            return d.addCallback(lambda _: store)

        return store, probe
    from perc_daemons.store.grants_redis import RedisGrantStore
    from perc_daemons.store.redis import RedisConferenceStore

    password = None
    if store_cfg.redis_password_file:
        pw_path = store_cfg.redis_password_file
        try:
            tls.check_private_key_file(pw_path)
            with open(pw_path, encoding="utf-8") as f:
                password = f.read().strip()
        except (tls.TlsFileError, OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise _error(cfg, "store.redis_password_file", f"{pw_path}: {reason}") from None
    kwargs = {"password": password, "namespace": store_cfg.redis_namespace,
              "tls": True if store_cfg.redis_tls else None}
    try:
        store = RedisConferenceStore(store_cfg.redis_host, store_cfg.redis_port, **kwargs)
        grant_store = RedisGrantStore(store_cfg.redis_host, store_cfg.redis_port, **kwargs)
    except ValueError as e:
        raise _error(cfg, "store.redis_namespace", str(e)) from None
    if grants is None:
        return store, store.connect

    def probe() -> defer.Deferred:
        d = store.connect()
        d.addCallback(lambda _: grant_store.connect()).addCallback(grants.opened)
        return d.addCallback(lambda _: store)

    return store, probe


def _read_secret_file(cfg: config_module.Config, key: str, path: str) -> str:
    """The first line of a password file that must be mode 0600/0640."""
    try:
        tls.check_private_key_file(path)
        with open(path, encoding="utf-8") as f:
            secret = f.readline().strip()
    except (tls.TlsFileError, OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise _error(cfg, key, f"{path}: {reason}") from None
    if not secret:
        raise _error(cfg, key, f"{path}: the file is empty")
    return secret


def ldap_authenticator(cfg: config_module.Config, reactor: Any) -> LdapAuthenticator:
    """The ``[auth.ldap]`` back-end; its files are read now (errors name the key)."""
    ldap = cfg["auth.ldap"]
    password = None
    if ldap.bind_password_file:
        password = _read_secret_file(cfg, "auth.ldap.bind_password_file",
                                     ldap.bind_password_file)
    trust_root = None
    if ldap.tls_ca_file:
        path = ldap.tls_ca_file
        try:
            with open(path, "rb") as f:
                trust_root = ssl.Certificate.loadPEM(f.read())
        except OSError as e:
            raise _error(cfg, "auth.ldap.tls_ca_file", f"{path}: {e.strerror or e}") from None
        except Exception:
            raise _error(cfg, "auth.ldap.tls_ca_file",
                         f"{path}: not a PEM certificate") from None
    for key, placeholders in (("user_filter", ("{username}",)),
                              ("group_filter", ("{dn}", "{username}"))):
        text = ldap[key]
        for placeholder in placeholders:
            text = text.replace(placeholder, "x")
        try:
            ldapfilter.parseFilter(text)
        except ldapfilter.InvalidLDAPFilter:
            raise _error(cfg, f"auth.ldap.{key}",
                         f"not a valid LDAP filter (got {ldap[key]!r})") from None
    port = ldap.port or (636 if ldap.tls == "ldaps" else 389)
    try:
        return LdapAuthenticator(
            ldap.host, port, ldap.base_dn, domain=cfg.idp.domain,
            bind_dn=ldap.bind_dn or None, bind_password=password,
            user_filter=ldap.user_filter,
            identity_attribute=ldap.identity_attribute or None,
            group_base_dn=ldap.group_base_dn or None, group_filter=ldap.group_filter,
            group_attribute=ldap.group_attribute, tls=ldap.tls,
            tls_trust_root=trust_root, reactor=reactor)
    except ValueError as e:  # the checks above and in config leave little to get here
        raise _error(cfg, "auth.ldap", str(e)) from None


def oidc_authenticator(cfg: config_module.Config, reactor: Any) -> OidcAuthenticator:
    """The ``[auth.oidc]`` back-end."""
    oidc = cfg["auth.oidc"]
    try:
        return OidcAuthenticator(oidc.issuer, oidc.audience, oidc.jwks_url, claim=oidc.claim,
                                 domain=oidc.domain or cfg.idp.domain, reactor=reactor)
    except ValueError as e:
        key = "jwks_url" if "jwks_url" in str(e) else "issuer"
        raise _error(cfg, f"auth.oidc.{key}", str(e)) from None


def oidc_login(cfg: config_module.Config, backends: list[Any],
               reactor: Any) -> OidcLogin | None:
    """Sign-in at the ``[auth.oidc]`` provider, when its endpoints are configured."""
    oidc = cfg["auth.oidc"]
    authenticator = next((b for b in backends if isinstance(b, OidcAuthenticator)), None)
    if authenticator is None or not oidc.authorization_endpoint:
        return None
    secret = _read_secret_file(cfg, "auth.oidc.client_secret_file", oidc.client_secret_file)
    try:
        return OidcLogin(authenticator, oidc.authorization_endpoint, oidc.token_endpoint,
                         secret, name=oidc.name, reactor=reactor)
    except ValueError as e:
        key = "token_endpoint" if "token_endpoint" in str(e) else "authorization_endpoint"
        raise _error(cfg, f"auth.oidc.{key}", str(e)) from None


def auth_backends(cfg: config_module.Config, reactor: Any) -> list[Any]:
    """The back-ends of ``[auth] backends``, in that order."""
    auth = cfg.auth
    backends: list[Any] = []
    for name in auth.backends:
        if name == "file":
            backends.append(FileAuthenticator(auth.users_file, cfg.idp.domain, reactor=reactor))
        elif name == "ldap":
            backends.append(ldap_authenticator(cfg, reactor))
        elif name == "oidc":
            backends.append(oidc_authenticator(cfg, reactor))
        else:  # the configuration check refuses other names
            raise _error(cfg, "auth.backends", f"unknown back-end {name!r}")
    return backends


def authorization_server(cfg: config_module.Config, keys: SigningKeys, issuer: str,
                         reactor: Any, backends: list[Any] | None = None) -> AuthorizationServer:
    """The OAuth server of ``[oauth]`` and ``[auth]`` (grants attached when the store opens).

    ``backends`` defaults to :func:`auth_backends`.
    """
    oauth, auth = cfg.oauth, cfg.auth
    path = oauth.clients_file
    client_limiter = ClientAuthLimiter(client_limit=oauth.client_failure_limit,
                                       address_limit=oauth.client_address_failure_limit,
                                       window=float(oauth.client_failure_window))
    try:
        clients = ClientRegistry.load(path, reactor=reactor, limiter=client_limiter)
    except ClientFileError as e:
        if e.key != "" or e.reason != "file not found":
            raise
        Logger().warn("perc-kmf: no OAuth client file {path}: no clients configured",
                      path=path)
        clients = ClientRegistry([], reactor=reactor, limiter=client_limiter)
    if backends is None:
        backends = auth_backends(cfg, reactor)
    limiter = LoginRateLimiter(user_limit=auth.user_limit, address_limit=auth.address_limit,
                               window=float(auth.window))
    try:
        return AuthorizationServer(
            clients, PendingGrantStore(), keys,
            AuthenticatorChain(backends, failure_delay=auth.failure_delay_ms / 1000,
                               clock=reactor),
            limiter, issuer=issuer, audience=issuer,
            access_token_lifetime=oauth.access_token_lifetime,
            refresh_token_lifetime=oauth.refresh_token_lifetime,
            code_lifetime=oauth.code_lifetime)
    except ValueError as e:
        raise _error(cfg, "oauth.access_token_lifetime", str(e)) from None


class StoreService(Service):
    """Checks the store at start (stopping the daemon if unusable); closes it at stop."""

    log = Logger()

    def __init__(self, reactor, store, probe, grants: GrantStoreHolder | None = None) -> None:
        self._reactor = reactor
        self.store = store
        self._probe = probe
        self.grants = grants
        #: True once the store answered at start (a Redis store connects first).
        self.ready = False
        self._waiting: list[defer.Deferred[None]] = []
        self.setName("store")

    def when_ready(self) -> defer.Deferred[None]:
        """Fires once the store is usable (at once if it is): what reads it at start-up
        (the schedule timers) waits for this."""
        if self.ready:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append(d)
        return d

    def startService(self) -> None:
        super().startService()

        def ready(_: object) -> None:
            self.log.info("perc-kmf conference store ready: {store!r}", store=self.store)
            self.ready = True
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)

        def failed(f: Failure) -> None:
            self.log.critical("perc-kmf conference store unusable, stopping: {error}",
                              error=f.getErrorMessage())
            if self._reactor.running:
                self._reactor.stop()

        defer.maybeDeferred(self._probe).addCallbacks(ready, failed)

    def stopService(self) -> defer.Deferred:  # type: ignore[override]
        super().stopService()
        d = defer.maybeDeferred(self.store.close)
        if self.grants is not None:
            grants = self.grants
            d.addBoth(lambda _: grants.close())
        return d


#: How often the daemon looks for keys rotated by another process (perc-admin).
KEY_REFRESH_INTERVAL = 10.0


def refresh_signing_keys(keys: SigningKeys) -> bool:
    """Pick up ``perc-admin keys rotate`` (another process rewrote the key index).

    A failed reload keeps the keys in use and is logged; it never stops the timer.
    """
    try:
        changed = keys.refresh()
    except SigningKeyError as e:
        Logger().error("perc-kmf: signing keys not reloaded, keeping those in use: {error}",
                       error=str(e))
        return False
    if changed:
        Logger().info("perc-kmf: signing keys reloaded, active key {kid}", kid=keys.active.kid)
    return changed


def reload_clients(clients: ClientRegistry, path: str) -> bool:
    """``systemctl reload perc-kmf``: take the client registry ``path`` as it is now.

    A file that does not load is logged and the clients in use are kept.
    """
    try:
        added, removed, changed = clients.reload(path)
    except ClientFileError as e:
        Logger().error("perc-kmf: OAuth clients not reloaded, keeping the {count} in use: "
                       "{error}", count=len(clients), error=str(e))
        return False
    Logger().info("perc-kmf: OAuth clients reloaded from {path}: {count} client(s); added "
                  "{added}, removed {removed}, changed {changed}", path=path,
                  count=len(clients), added=", ".join(added) or "none",
                  removed=", ".join(removed) or "none", changed=", ".join(changed) or "none")
    return True


def _sweep_audit(audit: AuditLog, store: StoreService) -> defer.Deferred[None] | None:
    if not store.ready:  # the first sweep at start-up, before a Redis store connected
        return None
    d = defer.ensureDeferred(audit.sweep())
    d.addErrback(lambda f: Logger().failure("perc-kmf: audit retention sweep failed", f))
    return d.addCallback(lambda _: None)


def _sweep_invitations(api: KmfApi) -> defer.Deferred[None]:
    d = defer.ensureDeferred(api.sweep_invitations())
    d.addErrback(lambda f: Logger().failure("perc-kmf: invitation sweep failed", f))
    return d.addCallback(lambda _: None)


def kmf_service(cfg: config_module.Config, reactor=None) -> MultiService:
    """The whole daemon; raises ConfigError for unusable files."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    context = tls_context(cfg)
    kek = load_kek(cfg)
    keys = load_signing_keys(cfg, reactor.seconds())
    issuer = cfg.idp.issuer or f"https://{cfg.idp.domain}"
    backends = auth_backends(cfg, reactor)
    oauth = authorization_server(cfg, keys, issuer, reactor, backends)
    login = oidc_login(cfg, backends, reactor)
    ldap = next((b for b in backends if isinstance(b, LdapAuthenticator)), None)
    groups = GroupCache(ldap.groups, clock=reactor) if ldap is not None else None
    grants = GrantStoreHolder(oauth)
    store, probe = open_store(cfg, grants)
    top = base_service("kmf", cfg, reactor)
    top.reloader.add_hook(  # type: ignore[attr-defined]
        lambda: reload_clients(oauth.clients, cfg.oauth.clients_file))
    refresher = TimerService(KEY_REFRESH_INTERVAL, refresh_signing_keys, keys)
    refresher.clock = reactor
    refresher.setName("signing-key-refresh")
    refresher.setServiceParent(top)
    # stopped in reverse order: the listener first, then the store
    store_service = StoreService(reactor, store, probe, grants)
    store_service.setServiceParent(top)
    # systemd's READY=1 (Type=notify) once the listeners are bound and the store answers
    top.notify.require("the conference store", store_service.when_ready)  # type: ignore[attr-defined]
    audit = AuditLog(store, keys, issuer=issuer, clock=reactor,
                     checkpoint_every=cfg.audit.checkpoint_every,
                     retention=cfg.audit.retention)
    api = KmfApi(store=store, kek=kek, keys=keys, idp_domain=cfg.idp.domain, issuer=issuer,
                 clock=reactor, ekt_cipher=EktCipher[cfg["keys"].ekt_cipher], oauth=oauth,
                 public_url=cfg.oauth.public_url or None,
                 form_secret=secrets.token_bytes(32), form_lifetime=cfg.oauth.form_lifetime,
                 groups=groups, oidc_login=login, audit=audit,
                 policy_defaults=dict(cfg["conferences"]))
    api.measure(top.metrics, "kmf")  # type: ignore[attr-defined]
    top.api = api  # type: ignore[attr-defined]
    # conferences end by themselves at ends_at + grace (timers rebuilt from the store)
    ScheduleTimers(api, reactor, ready=store_service.when_ready).setServiceParent(top)
    if cfg.audit.retention > 0:
        retention = TimerService(cfg.audit.sweep_interval, _sweep_audit, audit,
                                 store_service)
        retention.clock = reactor
        retention.setName("audit-retention")
        retention.setServiceParent(top)
    if groups is not None:
        # Removal from an invited LDAP group reaches the KD once the cache refreshes.
        sweeper = TimerService(groups.ttl, _sweep_invitations, api)
        sweeper.clock = reactor
        sweeper.setName("invitation-sweep")
        sweeper.setServiceParent(top)
    HttpsService(reactor, "https", "perc-kmf HTTPS API", cfg.https.bind, cfg.https.port,
                 kmf_site(api, max_body=cfg.https.max_body), context,
                 limits=top.limits, metrics=top.metrics,  # type: ignore[attr-defined]
                 ).setServiceParent(top)
    return top


def makeService(options: Options) -> MultiService:
    try:
        return kmf_service(options.loaded)
    except config_module.ConfigError as e:
        sys.stderr.write(f"perc-kmf: configuration error: {e}\n")
        sys.stderr.flush()
        raise SystemExit(EXIT_CONFIG) from None
