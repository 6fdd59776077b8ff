"""The OAuth 2.0 client registry of the IdP/KMF (``/etc/perc/kmf-clients.toml``).

One table per client::

    [client.webapp]                 # client_id: 1-64 of A-Z a-z 0-9 . _ -
    type = "public"                 # user agents: no secret, PKCE required
    grant_types = ["authorization_code", "refresh_token"]
    redirect_uris = ["https://conf.example.com/cb", "http://127.0.0.1:8400/cb"]
    scopes = ["conference", "roster"]

    [client.room-101]
    type = "confidential"           # services, room systems
    secret_hash = "$argon2id$v=19$m=65536,t=3,p=4$..."
    grant_types = ["client_credentials"]
    scopes = ["conference"]

Rules: public clients have no secret and may use ``authorization_code`` and
``refresh_token`` only; confidential clients need an argon2id
``secret_hash`` and may also use ``client_credentials``.  A client with
``authorization_code`` needs at least one redirect URI; redirect URIs are
compared exactly (RFC 6749 s3.1.2, no pattern, no port wildcard) and must be
absolute ``https`` URIs, or ``http`` on a loopback IP literal
(``127.0.0.1``, ``[::1]``; RFC 8252 s7.3), without fragment nor userinfo.
The file must be a regular file with mode 0600 or 0640 at most (group read
only).  Problems raise :class:`ClientFileError` naming the file and the key.

Secrets are checked with argon2 (constant time in the secret); an unknown
client, or a public one presenting a secret, costs a verification against a
dummy hash, so timing does not reveal which client ids exist.
"""

from __future__ import annotations

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

from perc_daemons.config import ConfigError

__all__ = [
    "CONFIDENTIAL",
    "DEFAULT_PATH",
    "GRANT_TYPES",
    "PUBLIC",
    "Client",
    "ClientFileError",
    "ClientRegistry",
    "InvalidClient",
    "check_redirect_uri",
]

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
    if kind == CONFIDENTIAL and (not isinstance(secret_hash, str)
                                 or not secret_hash.startswith("$argon2id$")):
        raise ClientFileError(path, f"{where}.secret_hash",
                              "a confidential client needs an argon2id hash ($argon2id$...)")
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


class ClientRegistry:
    """The registered clients; build with :meth:`load` (or from :class:`Client` objects)."""

    def __init__(self, clients: Mapping[str, Client] | list[Client], *,
                 hasher: PasswordHasher | None = None, reactor: Any = None) -> None:
        items = clients.values() if isinstance(clients, Mapping) else clients
        self._clients = {c.client_id: c for c in items}
        self._hasher = hasher or PasswordHasher()
        self._dummy_hash = self._hasher.hash(secrets.token_hex(16))
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

    def __len__(self) -> int:
        return len(self._clients)

    def get(self, client_id: object) -> Client | None:
        return self._clients.get(client_id) if isinstance(client_id, str) else None

    def _verify(self, hash_: str, secret: str) -> bool:
        try:
            return self._hasher.verify(hash_, secret)
        except (VerifyMismatchError, InvalidHashError, VerificationError):
            return False

    def authenticate(self, client_id: object, secret: object) -> defer.Deferred[Client]:
        """The confidential :class:`Client` whose secret this is, or fail with InvalidClient."""
        return defer.Deferred.fromCoroutine(self._authenticate(client_id, secret))

    async def _authenticate(self, client_id: object, secret: object) -> Client:
        client = self.get(client_id)
        if not isinstance(secret, str) or not secret or len(secret) > _MAX_SECRET:
            raise InvalidClient("malformed secret")
        known = client is not None and client.secret_hash is not None
        hash_ = client.secret_hash if known else self._dummy_hash
        ok = await threads.deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), self._verify, hash_, secret)
        if not known or not ok:
            raise InvalidClient("unknown client or wrong secret")
        return client  # type: ignore[return-value]
