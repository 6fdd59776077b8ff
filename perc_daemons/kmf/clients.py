"""The OAuth 2.0 client registry of the IdP/KMF (``/etc/perc/kmf-clients.toml``).

One table per client::

    [client.webapp]                 # client_id: 1-64 of A-Z a-z 0-9 . _ -
    type = "public"                 # user agents: no secret, PKCE required
    grant_types = ["authorization_code", "refresh_token"]
    redirect_uris = ["https://conf.example.com/cb", "http://127.0.0.1:8400/cb"]
    scopes = ["conference", "roster"]

    [client.room-101]
    type = "confidential"           # services, room systems
    secret_hash = "$sha256$..."     # perc-admin clients new-secret / hash
    grant_types = ["client_credentials"]
    scopes = ["conference"]

Rules: public clients have no secret and may use ``authorization_code`` and
``refresh_token`` only; confidential clients need a ``secret_hash`` and may
also use ``client_credentials``.  A client with
``authorization_code`` needs at least one redirect URI; redirect URIs are
compared exactly (RFC 6749 s3.1.2, no pattern, no port wildcard) and must be
absolute ``https`` URIs, or ``http`` on a loopback IP literal
(``127.0.0.1``, ``[::1]``; RFC 8252 s7.3), without fragment nor userinfo.
The file must be a regular file with mode 0600 or 0640 at most (group read
only).  Problems raise :class:`ClientFileError` naming the file and the key.

Client secrets are machine-generated, at least 256 bits
(:func:`new_client_secret`: 32 random bytes, base64url), so a slow password
hash buys nothing against guessing and hands anyone who can reach the token
endpoint a denial-of-service lever (argon2id t=3, 64 MiB made about 10 token
requests per second saturate the KMF, wrong secrets and unknown ids included).
``secret_hash = "$sha256$<base64url SHA-256 of the secret>"``
(:func:`hash_client_secret`, which refuses secrets shorter than
:data:`MIN_SECRET_LENGTH` characters) is checked in the reactor with
:func:`hmac.compare_digest`: microseconds; a presented secret shorter than
that never matches.  An unknown client, or a public one presenting a secret,
is compared against a dummy digest, so timing does not tell which client ids
exist.  A leaked client file does not reveal secrets: inverting SHA-256 of a
256-bit random value is as hard as guessing it.

Migration: ``$argon2id$...`` entries made by earlier versions are still
accepted, verified in a thread as before; loading the file logs a warning for
each, and they should be re-hashed (``perc-admin clients hash --secret-file``
with the client's current secret, if it has at least 256 bits, or
``perc-admin clients new-secret``).  Their verification is what a flood can
still make expensive, so it is the one the rate limit below refuses to run.

Failed client authentications are limited (:class:`ClientAuthLimiter`, per
client id and per source address over a sliding window).  Beyond a limit a
wrong secret is answered :class:`ClientRateLimited` (429) instead of
:class:`InvalidClient`, and a legacy argon2id entry is not verified at all
(429 even for the right secret: re-hash it).  A correct secret of a
``$sha256$`` entry is always accepted, so a flood of bogus requests naming a
client cannot lock that client out.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import stat
import tomllib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from twisted.internet import defer, threads
from twisted.logger import Logger

from perc_daemons.config import ConfigError
from perc_daemons.kmf.auth import LoginRateLimiter, RateLimited

__all__ = [
    "CONFIDENTIAL",
    "DEFAULT_PATH",
    "GRANT_TYPES",
    "MIN_SECRET_LENGTH",
    "PUBLIC",
    "Client",
    "ClientAuthLimiter",
    "ClientFileError",
    "ClientRateLimited",
    "ClientRegistry",
    "InvalidClient",
    "check_redirect_uri",
    "hash_client_secret",
    "new_client_secret",
]

log = Logger()

DEFAULT_PATH = "/etc/perc/kmf-clients.toml"
PUBLIC = "public"
CONFIDENTIAL = "confidential"
GRANT_TYPES = frozenset({"authorization_code", "refresh_token", "client_credentials"})
_PUBLIC_GRANTS = frozenset({"authorization_code", "refresh_token"})
CLIENT_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]{1,128}")  # RFC 6749 s3.3
_FILE_FORBIDDEN = 0o037
_MAX_FILE = 1 << 20
_MAX_SECRET = 1024
#: The shortest secret a ``$sha256$`` entry accepts: 32 random bytes in base64url.
MIN_SECRET_LENGTH = 43
SHA256_PREFIX = "$sha256$"
ARGON2_PREFIX = "$argon2id$"
_SHA256_HASH = re.compile(re.escape(SHA256_PREFIX) + r"[A-Za-z0-9_-]{43}")
_known_grants = ", ".join(sorted(GRANT_TYPES))
_KEYS = frozenset({"type", "secret_hash", "grant_types", "redirect_uris", "scopes"})


class ClientFileError(ConfigError):
    """The client file is unusable: ``path``, ``key`` and ``reason`` say why."""


@dataclass(frozen=True)
class Client:
    """One registered OAuth client."""

    client_id: str
    type: str
    grant_types: frozenset[str]
    redirect_uris: tuple[str, ...]
    scopes: frozenset[str]
    secret_hash: str | None = None

    @property
    def confidential(self) -> bool:
        return self.type == CONFIDENTIAL

    def __repr__(self) -> str:
        return (f"Client({self.client_id!r}, {self.type}, grants={sorted(self.grant_types)}, "
                f"scopes={sorted(self.scopes)})")


def new_client_secret() -> str:
    """A new client secret: 32 random bytes (256 bits), base64url (43 characters)."""
    return secrets.token_urlsafe(32)


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


def hash_client_secret(secret: str) -> str:
    """The ``secret_hash`` of a client secret: ``$sha256$`` + base64url SHA-256.

    Raises ValueError for a secret shorter than :data:`MIN_SECRET_LENGTH`
    characters: only secrets of at least 256 bits (made by
    :func:`new_client_secret`) may be checked with a fast hash.
    """
    if not isinstance(secret, str) or len(secret) < MIN_SECRET_LENGTH:
        raise ValueError(f"a client secret needs at least {MIN_SECRET_LENGTH} characters "
                         "(32 random bytes, base64url)")
    if len(secret) > _MAX_SECRET or any(ord(c) < 0x20 or ord(c) == 0x7F for c in secret):
        raise ValueError(f"a client secret is at most {_MAX_SECRET} characters, without "
                         "control characters")
    return SHA256_PREFIX + base64.urlsafe_b64encode(_digest(secret)).rstrip(b"=").decode()


def check_redirect_uri(uri: object) -> str | None:
    """Why ``uri`` cannot be a registered redirect URI, or None if it can."""
    if not isinstance(uri, str) or not uri or len(uri) > 2048:
        return "must be a non-empty string of at most 2048 characters"
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in uri):
        return "must not contain spaces or control characters"
    try:
        parts = urllib.parse.urlsplit(uri)
        parts.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError as e:
        return f"not a URI: {e}"
    if parts.fragment or "#" in uri:
        return "must not have a fragment"
    if parts.username is not None or "@" in parts.netloc:
        return "must not carry user information"
    if not parts.hostname:
        return "must be absolute with a host"
    if parts.scheme == "https":
        return None
    if parts.scheme == "http":
        try:
            if ipaddress.ip_address(parts.hostname).is_loopback:
                return None
        except ValueError:
            pass
        return "http is allowed only on a loopback IP literal (127.0.0.1, [::1])"
    return "scheme must be https (or http on loopback)"


def _string_list(path: str, key: str, value: object) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ClientFileError(path, key, "must be a list of strings")
    return value


def _client(path: str, client_id: str, raw: object) -> Client:
    where = f"client.{client_id}"
    if not CLIENT_ID.fullmatch(client_id):
        raise ClientFileError(path, where, "client_id must be 1-64 of A-Z a-z 0-9 . _ -")
    if not isinstance(raw, dict):
        raise ClientFileError(path, where, "must be a table")
    for key in raw:
        if key not in _KEYS:
            raise ClientFileError(path, f"{where}.{key}",
                                  f"unknown key (known: {', '.join(sorted(_KEYS))})")
    kind = raw.get("type")
    if kind not in (PUBLIC, CONFIDENTIAL):
        raise ClientFileError(path, f"{where}.type", 'must be "public" or "confidential"')
    grants = _string_list(path, f"{where}.grant_types", raw.get("grant_types", []))
    if not grants:
        raise ClientFileError(path, f"{where}.grant_types", "must name at least one grant type")
    for g in grants:
        if g not in GRANT_TYPES:
            raise ClientFileError(path, f"{where}.grant_types",
                                  f"unknown grant type {g!r} (known: {_known_grants})")
    if kind == PUBLIC and not set(grants) <= _PUBLIC_GRANTS:
        raise ClientFileError(path, f"{where}.grant_types",
                              "a public client may only use authorization_code, refresh_token")
    secret_hash = raw.get("secret_hash")
    if kind == PUBLIC and secret_hash is not None:
        raise ClientFileError(path, f"{where}.secret_hash", "a public client has no secret")
    if kind == CONFIDENTIAL and not (isinstance(secret_hash, str) and (
            _SHA256_HASH.fullmatch(secret_hash) or secret_hash.startswith(ARGON2_PREFIX))):
        raise ClientFileError(path, f"{where}.secret_hash",
                              "a confidential client needs a hash made by perc-admin clients "
                              "new-secret or hash ($sha256$ and 43 base64url characters)")
    if kind == CONFIDENTIAL and secret_hash.startswith(ARGON2_PREFIX):
        log.warn("{path}: client {client_id} has an argon2id secret_hash: still accepted, but "
                 "every token request costs an argon2id verification; re-hash it with "
                 "'perc-admin clients hash' (or make a new secret with "
                 "'perc-admin clients new-secret')", path=path, client_id=client_id)
    uris = _string_list(path, f"{where}.redirect_uris", raw.get("redirect_uris", []))
    for uri in uris:
        reason = check_redirect_uri(uri)
        if reason is not None:
            raise ClientFileError(path, f"{where}.redirect_uris", f"{uri!r}: {reason}")
    if "authorization_code" in grants and not uris:
        raise ClientFileError(path, f"{where}.redirect_uris",
                              "authorization_code needs at least one redirect URI")
    scopes = _string_list(path, f"{where}.scopes", raw.get("scopes", []))
    for scope in scopes:
        if not SCOPE_TOKEN.fullmatch(scope):
            raise ClientFileError(path, f"{where}.scopes", f"bad scope token {scope!r}")
    return Client(client_id, kind, frozenset(grants), tuple(uris), frozenset(scopes),
                  secret_hash)


def _read(path: str) -> dict[str, Any]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ClientFileError(path, "", "file not found") from None
    except OSError as e:
        raise ClientFileError(path, "", e.strerror or str(e)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ClientFileError(path, "", "not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & _FILE_FORBIDDEN:
            raise ClientFileError(path, "", f"mode {mode:04o} is too open; use 0600 or 0640")
        if st.st_size > _MAX_FILE:
            raise ClientFileError(path, "", "too large")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(_MAX_FILE + 1)
    finally:
        os.close(fd)
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ClientFileError(path, "", "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ClientFileError(path, "", f"invalid TOML: {e}") from None


class InvalidClient(Exception):
    """Client authentication failed (unknown client, wrong secret, public client)."""


class ClientRateLimited(InvalidClient):
    """Too many failed authentications of this client id or from this address.

    ``retry_after`` seconds until the oldest failure leaves the window.
    """

    def __init__(self, retry_after: float) -> None:
        super().__init__("too many failed client authentications")
        self.retry_after = retry_after


class ClientAuthLimiter(LoginRateLimiter):
    """Failed client authentications per client id and per source address.

    The sliding windows of :class:`~perc_daemons.kmf.auth.LoginRateLimiter`
    (IPv6 per /64, bounded memory), keyed by client id instead of user name.
    """

    def __init__(self, *, client_limit: int = 20, address_limit: int = 20,
                 window: float = 60.0, max_keys: int = 100_000) -> None:
        super().__init__(user_limit=client_limit, address_limit=address_limit, window=window,
                         max_keys=max_keys)


class ClientRegistry:
    """The registered clients; build with :meth:`load` (or from :class:`Client` objects).

    ``hasher`` verifies legacy argon2id entries; ``limiter`` (default: a
    :class:`ClientAuthLimiter` with its defaults) limits failed
    authentications.  ``slow_verifications`` counts the argon2id
    verifications done (the expensive path).
    """

    def __init__(self, clients: Mapping[str, Client] | list[Client], *,
                 hasher: PasswordHasher | None = None, reactor: Any = None,
                 limiter: ClientAuthLimiter | None = None) -> None:
        items = clients.values() if isinstance(clients, Mapping) else clients
        self._clients = {c.client_id: c for c in items}
        self._hasher = hasher or PasswordHasher()
        self._dummy_digest = _digest(secrets.token_urlsafe(32))
        self.limiter = limiter if limiter is not None else ClientAuthLimiter()
        self.slow_verifications = 0
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor

    @classmethod
    def load(cls, path: str = DEFAULT_PATH, **kwargs: Any) -> ClientRegistry:
        raw = _read(path)
        for key in raw:
            if key != "client":
                raise ClientFileError(path, key, "unknown key (known: client)")
        table = raw.get("client", {})
        if not isinstance(table, dict):
            raise ClientFileError(path, "client", "must be a table of clients")
        return cls([_client(path, cid, value) for cid, value in table.items()], **kwargs)

    def reload(self, path: str) -> tuple[list[str], list[str], list[str]]:
        """Take the clients of ``path`` in place of the current ones, all at once.

        Returns the client ids (added, removed, changed).  A file that does
        not load raises :class:`ClientFileError` and changes nothing; the
        failure limits carry over.
        """
        fresh = ClientRegistry.load(path, reactor=self._reactor)._clients
        old = self._clients
        added = sorted(set(fresh) - set(old))
        removed = sorted(set(old) - set(fresh))
        changed = sorted(cid for cid in set(fresh) & set(old) if fresh[cid] != old[cid])
        self._clients = fresh
        return added, removed, changed

    def __len__(self) -> int:
        return len(self._clients)

    def get(self, client_id: object) -> Client | None:
        return self._clients.get(client_id) if isinstance(client_id, str) else None

    def _verify(self, hash_: str, secret: str) -> bool:
        try:
            return self._hasher.verify(hash_, secret)
        except (VerifyMismatchError, InvalidHashError, VerificationError):
            return False

    def _fast_match(self, secret_hash: str | None, secret: str) -> bool:
        """Constant-time comparison of SHA-256 digests (a dummy one for unknown clients)."""
        if secret_hash is not None and _SHA256_HASH.fullmatch(secret_hash):
            stored = base64.urlsafe_b64decode(secret_hash[len(SHA256_PREFIX):] + "=")
            known = True
        else:
            stored, known = self._dummy_digest, False
        equal = hmac.compare_digest(_digest(secret), stored)
        return known and equal and len(secret) >= MIN_SECRET_LENGTH

    def authenticate(self, client_id: object, secret: object,
                     address: str | None = None) -> defer.Deferred[Client]:
        """The confidential :class:`Client` whose secret this is, or fail with InvalidClient.

        ``address`` is the request's source address, for the rate limit
        (:class:`ClientRateLimited` when it or the client id must wait).
        """
        return defer.Deferred.fromCoroutine(self._authenticate(client_id, secret, address))

    def _refused(self, client_id: str | None, address: str | None, now: float) -> InvalidClient:
        """A failure: counted, and 429 rather than 401 beyond the limits."""
        try:
            self.limiter.attempt(client_id, address, now)
        except RateLimited as e:
            return ClientRateLimited(e.retry_after)
        return InvalidClient("unknown client or wrong secret")

    async def _authenticate(self, client_id: object, secret: object,
                            address: str | None) -> Client:
        now = self._reactor.seconds()
        client = self.get(client_id)
        key = client_id if isinstance(client_id, str) and len(client_id) <= 64 else None
        if not isinstance(secret, str) or not secret or len(secret) > _MAX_SECRET:
            raise self._refused(key, address, now)
        secret_hash = client.secret_hash if client is not None else None
        if secret_hash is None or not secret_hash.startswith(ARGON2_PREFIX):
            if self._fast_match(secret_hash, secret):
                return client  # type: ignore[return-value]
            raise self._refused(key, address, now)
        # A legacy argon2id entry: the expensive path, never run beyond the limits, and
        # counted before it runs so that concurrent requests cannot exceed them.
        try:
            self.limiter.attempt(key, address, now)
        except RateLimited as e:
            raise ClientRateLimited(e.retry_after) from None
        self.slow_verifications += 1
        ok = await threads.deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), self._verify, secret_hash, secret)
        if not ok:
            raise InvalidClient("unknown client or wrong secret")
        self.limiter.record_success(key, address, now)
        return client  # type: ignore[return-value]
