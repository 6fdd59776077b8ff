"""Load and validate the daemons' TOML configuration (/etc/perc/<daemon>.toml).

Every key has a documented default (see etc/perc/*.toml, which a test keeps in
step with :data:`SCHEMAS`).  Any problem stops start-up with a
:class:`ConfigError` naming the file, the dotted key and the reason; the
daemons turn it into one line on stderr and exit status 2.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from perc_daemons.protocol.tunnel_address import TunnelAddressError, check_tunnel_address


class ConfigError(Exception):
    """A configuration problem: which file, which key, and why."""

    def __init__(self, path: str, key: str, reason: str) -> None:
        self.path = path
        self.key = key
        self.reason = reason
        where = f"{path}: {key}: " if key else f"{path}: "
        super().__init__(where + reason)


@dataclass(frozen=True)
class Setting:
    """One configuration key: its type, default and an optional extra check.

    ``check`` returns ``None`` when the value is acceptable, otherwise the
    reason it is not.
    """

    kind: type
    default: Any
    doc: str
    check: Callable[[Any], str | None] | None = None


def _port(value: int) -> str | None:
    return None if 0 <= value <= 65535 else "must be a TCP/UDP port number, 0-65535"


def _ip_address(value: str) -> str | None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return "must be an IPv4 or IPv6 address"
    return None


def _admin_section(port: int) -> dict[str, Setting]:
    return {
        "bind": Setting(
            str,
            "127.0.0.1",
            "Address of the admin HTTP listener (/healthz, /metrics). Keep it on loopback.",
            _ip_address,
        ),
        "port": Setting(int, port, "TCP port of the admin HTTP listener (0 picks a free port).",
                        _port),
    }


def _connections_section() -> dict[str, Setting]:
    """``[connections]``: the limits every listener of the daemon applies
    (perc_daemons.listening.ConnectionLimits)."""
    return {
        "handshake_timeout": Setting(
            float, 10.0, "Seconds a connection has to complete its TLS handshake (plain HTTP: "
            "its first request) before it is closed.", _positive),
        "idle_timeout": Setting(
            float, 60.0, "Seconds an HTTP connection may stay open receiving nothing "
            "while no request is handled.", _positive),
        "max_per_address": Setting(
            int, 64, "Connections one address (IPv6: one /64) may have open on each "
            "listener; more are closed at once.", _positive),
    }


def _logging_section() -> dict[str, Setting]:
    """``[logging]``: where and what the daemon logs (perc_daemons.logs)."""
    return {
        "format": Setting(str, "auto", "\"journal\" (fields, via journald's socket), "
                          "\"json\" or \"text\" lines on stdout, or \"auto\" (journal when "
                          "run by systemd).", _one_of("auto", "journal", "json", "text")),
        "level": Setting(str, "info", "Least severe level logged: debug (adds HTTP access "
                         "lines), info, warn, error.", _one_of("debug", "info", "warn", "error")),
    }


def _absolute_path(value: str) -> str | None:
    return None if value.startswith("/") else "must be an absolute path"


def _optional_absolute_path(value: str) -> str | None:
    return None if value == "" else _absolute_path(value)


def _one_of(*choices: str) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        return None if value in choices else "must be one of " + ", ".join(
            repr(c) for c in choices)
    return check


def _domain(value: str) -> str | None:
    label = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    if len(value) <= 253 and re.fullmatch(rf"{label}(?:\.{label})*", value):
        return None
    return "must be a DNS domain name"


def _issuer(value: str) -> str | None:
    if value == "" or (value.startswith("https://") and len(value) > 8
                       and not any(c in value for c in " \t\r\n?#")):
        return None
    return 'must be "" (https://<idp.domain>) or an https:// URL without query or fragment'


def _positive(value: int) -> str | None:
    return None if value > 0 else "must be positive"


def _policy_seconds(value: float) -> str | None:
    return None if 0 <= value <= 86400 else "must be 0-86400 seconds"


def _non_negative(value: int) -> str | None:
    return None if value >= 0 else "must not be negative"


def _url_or_empty(value: str) -> str | None:
    if value == "" or (value.startswith("https://") and len(value) > 8
                       and not any(c in value for c in " \t\r\n?#")):
        return None
    return 'must be "" or an https:// URL without query or fragment'


AUTH_BACKENDS = ("file", "ldap", "oidc")


def _auth_backends(value: list) -> str | None:
    if not value:
        return "must name at least one back-end"
    known = ", ".join(repr(b) for b in AUTH_BACKENDS)
    for name in value:
        if not isinstance(name, str):
            return "must be a list of strings"
        if name not in AUTH_BACKENDS:
            return f"unknown back-end {name!r} (known: {known})"
    if len(set(value)) != len(value):
        return "must not name a back-end twice"
    return None


def _ldap_filter(*placeholders: str) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        missing = [p for p in placeholders if "{" + p + "}" not in value]
        if missing:
            return "must contain {" + missing[0] + "}"
        if not (value.startswith("(") and value.endswith(")")):
            return "must be an LDAP filter in parentheses"
        return None
    return check


def _attribute_or_empty(value: str) -> str | None:
    if value == "" or re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*", value):
        return None
    return "must be an LDAP attribute name"


def _attribute(value: str) -> str | None:
    return "must be an LDAP attribute name" if value == "" else _attribute_or_empty(value)


def _domain_or_empty(value: str) -> str | None:
    return None if value == "" else _domain(value)


def _jwks_url(value: str) -> str | None:
    if value == "" or (value.startswith(("https://", "http://")) and len(value) > 8
                       and not any(c in value for c in " \t\r\n#")):
        return None
    return 'must be "" or an https:// URL (http:// only on loopback) without fragment'


def _process_urls(value: list) -> str | None:
    """``[cluster] processes``: https://host:port URLs (distinct ports), none or two or more."""
    from urllib.parse import urlsplit

    ports = set()
    for item in value:
        if not isinstance(item, str) or _url_or_empty(item) is not None or item == "":
            return 'must be a list of https://host:port URLs (the processes\' [api])'
        parts = urlsplit(item)
        try:
            port = parts.port
        except ValueError:
            port = None
        if port is None or parts.path not in ("", "/"):
            return f"{item!r}: must be https://host:port with the port and no path"
        if port in ports:
            return f"port {port} twice: each process has its own [api] port"
        ports.add(port)
    if len(value) == 1:
        return "must name every process, this one included (two or more), or none"
    return None


def _sha256_fingerprints(value: list) -> str | None:
    for item in value:
        if not isinstance(item, str) or not re.fullmatch(r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){31}",
                                                         item):
            return 'must be a list of SHA-256 fingerprints "AA:BB:..." (32 hex pairs)'
    return None


def _liveness_settings() -> dict[str, Setting]:
    """``[tunnel]`` keys of both tunnel ends: our Ping/Pong check (docs/PROTOCOL.md)."""
    return {
        "liveness_interval": Setting(float, 15.0, "Seconds between a Pong and the next Ping "
                                     "on an up tunnel.", _positive),
        "liveness_timeout": Setting(float, 5.0, "Seconds a Ping may go unanswered before "
                                    "the tunnel is closed.", _positive),
    }


def _replay_window(value: int) -> str | None:
    return None if 64 <= value <= 32767 else "must be 64-32767 packets"


def _advertise(value: str) -> str | None:
    return None if value == "" else _ip_address(value)


_MD_SCHEMA: dict[str, dict[str, Setting]] = {
    "admin": _admin_section(9461),
    "logging": _logging_section(),
    "connections": _connections_section(),
    "api": {
        "bind": Setting(str, "0.0.0.0", "Address of the HTTPS conference API listener.",
                        _ip_address),
        "port": Setting(int, 9443, "TCP port of the HTTPS conference API (0 picks a free port).",
                        _port),
        "certificate": Setting(str, "/etc/perc/tls/md.crt",
                               "PEM certificate chain of the API and the tunnel (server first).",
                               _absolute_path),
        "private_key": Setting(str, "/etc/perc/tls/md.key",
                               "PEM private key of the certificate; mode 0600 or 0640.",
                               _absolute_path),
        "provider_token_file": Setting(
            str, "/etc/perc/md-provider.token",
            "File holding the conference provider's bearer token (mode 0600/0640); "
            "missing: conference creation and deletion answer 503.", _absolute_path),
        "join_timeout": Setting(int, 10, "Seconds a join waits for the KD's signed answer "
                                "(504 beyond).", _positive),
    },
    "media": {
        "bind": Setting(str, "0.0.0.0", "Address of the shared UDP media port.", _ip_address),
        "port": Setting(int, 9470, "UDP media port of every conference (0 picks a free port).",
                        _port),
        "advertise": Setting(str, "", "Address put into the answers' ICE candidates "
                             "(\"\" = bind, or 127.0.0.1 when bind is a wildcard).",
                             _advertise),
        "consent_timeout": Setting(int, 30, "Seconds without a valid STUN check before a "
                                   "participant is dropped (RFC 7675).", _positive),
        "replay_window": Setting(int, 128, "SRTP replay window of the hop-by-hop sessions, "
                                 "packets.", _replay_window),
        "receive_buffer": Setting(int, 4 << 20, "SO_RCVBUF of the media port, bytes (0: the "
                                  "kernel's default; the kernel caps it at "
                                  "net.core.rmem_max).", _non_negative),
    },
    "tunnel": {
        "bind": Setting(str, "0.0.0.0", "Address of the KD tunnel listener (TLS 1.3).",
                        _ip_address),
        "port": Setting(int, 9450, "TCP port of the KD tunnel listener (0 picks a free port).",
                        _port),
        "kd_fingerprints": Setting(list, [], "SHA-256 fingerprints of KD certificates trusted "
                                   "for every conference.", _sha256_fingerprints),
        **_liveness_settings(),
    },
    "cluster": {
        "processes": Setting(list, [], "API URLs of every perc-md process of this host that "
                             "shares conferences, this one included (the one on its [api] "
                             "port); the same list in every process.", _process_urls),
        "ca_file": Setting(str, "/etc/perc/tls/ca.crt", "CA certificate(s) the processes' "
                           "API certificates chain to.", _absolute_path),
    },
    "state": {
        "file": Setting(str, "/var/lib/perc/md-state.json",
                        "JSON file keeping the conferences and cascade links across a "
                        "restart (no keys, no participants).", _absolute_path),
    },
}


_KMF_SCHEMA: dict[str, dict[str, Setting]] = {
    "admin": _admin_section(9463),
    "logging": _logging_section(),
    "connections": _connections_section(),
    "https": {
        "bind": Setting(str, "0.0.0.0", "Address of the HTTPS API listener.", _ip_address),
        "port": Setting(int, 8443, "TCP port of the HTTPS API listener (0 picks a free port).",
                        _port),
        "certificate": Setting(str, "/etc/perc/tls/kmf.crt",
                               "PEM certificate chain of the HTTPS listener (server first).",
                               _absolute_path),
        "private_key": Setting(str, "/etc/perc/tls/kmf.key",
                               "PEM private key of the certificate; mode 0600 or 0640.",
                               _absolute_path),
        "dev_self_signed": Setting(
            bool, False,
            "Development only: create a self-signed certificate and key at the paths above "
            "when both are missing.", None),
        "max_body": Setting(int, 65536, "Largest accepted request body, in bytes (413 beyond).",
                            _positive),
    },
    "idp": {
        "domain": Setting(str, "localhost", "Identity domain of the IdP (user@domain).",
                          _domain),
        "issuer": Setting(str, "", "Issuer and audience of access tokens.", _issuer),
    },
    "store": {
        "backend": Setting(str, "sqlite", "Conference store: sqlite or redis.",
                           _one_of("sqlite", "redis")),
        "sqlite_path": Setting(str, "/var/lib/perc/kmf.sqlite3", "SQLite database file.",
                               _absolute_path),
        "redis_host": Setting(str, "127.0.0.1", "Redis server host name or address."),
        "redis_port": Setting(int, 6379, "Redis server port.", _port),
        "redis_password_file": Setting(str, "", "File holding the Redis password.",
                                       _optional_absolute_path),
        "redis_tls": Setting(bool, False, "Connect to Redis over TLS (system CAs)."),
        "redis_namespace": Setting(str, "perc", "Prefix of every Redis key."),
    },
    "keys": {
        "kek_file": Setting(str, "/var/lib/perc/kmf.kek",
                            "Key-encryption key file (created on first start).",
                            _absolute_path),
        "signing_dir": Setting(str, "/var/lib/perc/signing",
                               "Directory of the ES256 signing keys (created on first start).",
                               _absolute_path),
        "ekt_cipher": Setting(str, "AESKW_256", "EKT cipher of new epoch keys.",
                              _one_of("AESKW_128", "AESKW_256")),
    },
    "conferences": {
        "early_start": Setting(float, 300.0, "Seconds before starts_at from which endpoints "
                               "are admitted and keys served (new conferences' default).",
                               _policy_seconds),
        "grace": Setting(float, 0.0, "Seconds after ends_at at which a conference ends by "
                         "itself (new conferences' default).", _policy_seconds),
        "rekey_interval": Setting(float, 0.0, "Seconds between timed epochs, 0 = off (new "
                                  "conferences' default).", _policy_seconds),
        "late_join": Setting(str, "none", "What a late joiner may decrypt: none, current or "
                             "history (new conferences' default).",
                             _one_of("none", "current", "history")),
    },
    "audit": {
        "retention": Setting(int, 31_536_000, "Seconds an ended conference's audit trail "
                             "is kept (then deleted, leaving a signed trail-deleted record); "
                             "0 keeps trails forever.", _non_negative),
        "checkpoint_every": Setting(int, 32, "Records between two signed checkpoints of a "
                                    "trail (also signed at the end).", _positive),
        "sweep_interval": Setting(int, 3600, "Seconds between two retention sweeps.",
                                  _positive),
    },
    "oauth": {
        "clients_file": Setting(str, "/etc/perc/kmf-clients.toml",
                                "OAuth client registry (missing: no clients).", _absolute_path),
        "public_url": Setting(str, "", "Base URL of the OAuth endpoints (\"\" = the issuer).",
                              _url_or_empty),
        "access_token_lifetime": Setting(int, 300, "Access token lifetime, seconds.",
                                         _positive),
        "refresh_token_lifetime": Setting(int, 86400, "Refresh token lifetime, seconds.",
                                          _positive),
        "code_lifetime": Setting(int, 60, "Authorization code lifetime, seconds.", _positive),
        "form_lifetime": Setting(int, 600, "Validity of a login form, seconds.", _positive),
        "client_failure_limit": Setting(int, 20, "Failed client authentications per client "
                                        "id per window.", _positive),
        "client_address_failure_limit": Setting(int, 20, "Failed client authentications per "
                                                "address per window.", _positive),
        "client_failure_window": Setting(int, 60, "Failed client authentication window, "
                                         "seconds.", _positive),
    },
    "auth": {
        "backends": Setting(list, ["file"], "User authentication back-ends, in order.",
                            _auth_backends),
        "users_file": Setting(str, "/var/lib/perc/users.jsonl", "Local user file.",
                              _absolute_path),
        "user_limit": Setting(int, 5, "Failed logins per user per window.", _positive),
        "address_limit": Setting(int, 20, "Failed logins per address per window.", _positive),
        "window": Setting(int, 900, "Failed-login window, seconds.", _positive),
        "failure_delay_ms": Setting(int, 1000, "Minimum time before a failed login answers, ms.",
                                    _non_negative),
    },
    # Nested tables: [auth.ldap] is TOML for the key "ldap" of [auth].
    "auth.ldap": {
        "host": Setting(str, "", "LDAP server host name or address (needed for \"ldap\")."),
        "port": Setting(int, 0, "LDAP server port (0: 389, or 636 with tls = \"ldaps\").",
                        _port),
        "base_dn": Setting(str, "", "Subtree searched for users (needed for \"ldap\")."),
        "bind_dn": Setting(str, "", "Service account DN (\"\" = anonymous search)."),
        "bind_password_file": Setting(str, "", "File holding the service account password.",
                                      _optional_absolute_path),
        "user_filter": Setting(str, "(uid={username})", "Filter finding a user's entry.",
                               _ldap_filter("username")),
        "identity_attribute": Setting(str, "mail",
                                      "Attribute holding the identity (\"\" = uid@domain).",
                                      _attribute_or_empty),
        "tls": Setting(str, "starttls", "Transport security: none, starttls or ldaps.",
                       _one_of("none", "starttls", "ldaps")),
        "tls_ca_file": Setting(str, "", "PEM CA certificate of the server (\"\" = system CAs).",
                               _optional_absolute_path),
        "group_base_dn": Setting(str, "", "Subtree searched for groups (\"\" = base_dn)."),
        "group_filter": Setting(str, "(|(member={dn})(uniqueMember={dn})(memberUid={username}))",
                                "Filter finding a user's groups.", _ldap_filter()),
        "group_attribute": Setting(str, "cn", "Attribute naming a group.", _attribute),
    },
    "auth.oidc": {
        "issuer": Setting(str, "", "Issuer of the provider's ID tokens (needed for \"oidc\").",
                          _issuer),
        "audience": Setting(str, "", "Our client_id at the provider (needed for \"oidc\")."),
        "jwks_url": Setting(str, "", "URL of the provider's JWKS (needed for \"oidc\").",
                            _jwks_url),
        "claim": Setting(str, "email", "ID token claim holding the identity.",
                         _attribute),
        "domain": Setting(str, "", "Only identities in this domain (\"\" = [idp] domain).",
                          _domain_or_empty),
        "name": Setting(str, "OpenID Connect",
                        "Provider name on the login page (\"Sign in with <name>\")."),
        "authorization_endpoint": Setting(str, "", "Provider's authorization endpoint "
                                          "(\"\" = no sign-in at the provider).", _jwks_url),
        "token_endpoint": Setting(str, "", "Provider's token endpoint.", _jwks_url),
        "client_secret_file": Setting(str, "", "File holding our client secret at the provider.",
                                      _optional_absolute_path),
    },
}


def _kmf_cross_checks(sections: Mapping[str, Mapping[str, Any]]) -> tuple[str, str] | None:
    """Rules spanning keys: ``(dotted key, reason)`` of the first broken one."""
    backends = sections["auth"]["backends"]
    if "ldap" in backends:
        ldap = sections["auth.ldap"]
        for key in ("host", "base_dn"):
            if not ldap[key]:
                return f"auth.ldap.{key}", 'is required when [auth] backends names "ldap"'
        if bool(ldap["bind_dn"]) != bool(ldap["bind_password_file"]):
            key = "bind_password_file" if ldap["bind_dn"] else "bind_dn"
            return f"auth.ldap.{key}", "bind_dn and bind_password_file go together"
    if "oidc" in backends:
        oidc = sections["auth.oidc"]
        for key in ("issuer", "audience", "jwks_url"):
            if not oidc[key]:
                return f"auth.oidc.{key}", 'is required when [auth] backends names "oidc"'
        login = ("authorization_endpoint", "token_endpoint", "client_secret_file")
        if any(oidc[key] for key in login):
            for key in login:
                if not oidc[key]:
                    return (f"auth.oidc.{key}", "authorization_endpoint, token_endpoint and "
                            "client_secret_file go together")
    return None

def _md_list(value: list) -> str | None:
    """``["host:port", ...]``: MD tunnel addresses (:mod:`.protocol.tunnel_address`)."""
    seen = set()
    for item in value:
        try:
            address = check_tunnel_address(item)
        except TunnelAddressError as e:
            return str(e)
        if address in seen:
            return "must not name an MD twice"
        seen.add(address)
    return None


def _https_url(value: str) -> str | None:
    if (value.startswith("https://") and len(value) > 8
            and not any(c in value for c in " \t\r\n?#")):
        return None
    return "must be an https:// URL without query or fragment"


def _client_id(value: str) -> str | None:
    if re.fullmatch(r"[A-Za-z0-9._-]{1,64}", value):
        return None
    return "must be 1-64 of A-Z a-z 0-9 . _ -"


_KD_SCHEMA: dict[str, dict[str, Setting]] = {
    "admin": _admin_section(9462),
    "logging": _logging_section(),
    "connections": _connections_section(),
    "tunnel": {
        "mds": Setting(list, [], 'Media Distributors to keep a tunnel to, as "host:port" '
                       "(a DNS name, IPv4 or [IPv6] address, connected to and checked "
                       "against the MD's certificate).",
                       _md_list),
        "certificate": Setting(str, "/etc/perc/tls/kd.crt",
                               "PEM certificate chain of the KD (ECDSA P-256, leaf first): "
                               "tunnel client, DTLS server and answer signing certificate.",
                               _absolute_path),
        "private_key": Setting(str, "/etc/perc/tls/kd.key",
                               "PEM private key of the certificate; mode 0600 or 0640.",
                               _absolute_path),
        "ca_file": Setting(str, "/etc/perc/tls/ca.crt",
                           "PEM CA certificate(s) the MDs' certificates must chain to.",
                           _absolute_path),
        **_liveness_settings(),
    },
    "kmf": {
        "url": Setting(str, "https://localhost:8443", "Base URL of the KMF's HTTPS API.",
                       _https_url),
        "ca_file": Setting(str, "/etc/perc/tls/ca.crt",
                           "PEM CA certificate(s) the KMF's certificate must chain to.",
                           _absolute_path),
        "client_id": Setting(str, "kd", "OAuth client id of this KD at the KMF.", _client_id),
        "client_secret_file": Setting(str, "/etc/perc/kd-client.secret",
                                      "File holding the OAuth client secret (one line).",
                                      _absolute_path),
    },
    "idp": {
        "domain": Setting(str, "localhost",
                          "Identity domain whose assertions (signed with the KMF's JWKS) "
                          "are accepted.", _domain),
    },
}

#: Per daemon: section -> key -> Setting.  Later features add their sections here.
SCHEMAS: dict[str, dict[str, dict[str, Setting]]] = {
    "md": _MD_SCHEMA,
    "kd": _KD_SCHEMA,
    "kmf": _KMF_SCHEMA,
}

def _md_cross_checks(sections: Mapping[str, Mapping[str, Any]]) -> tuple[str, str] | None:
    from urllib.parse import urlsplit

    processes = sections["cluster"]["processes"]
    port = sections["api"]["port"]
    if processes and not any(urlsplit(url).port == port for url in processes):
        return ("cluster.processes", f"no URL is this process's (none on its [api] port "
                                     f"{port}): list every process, this one included")
    return None


#: Per daemon: checks spanning several keys, run after every key is valid.
CROSS_CHECKS: dict[str, Callable[[Mapping[str, Mapping[str, Any]]], tuple[str, str] | None]] = {
    "kmf": _kmf_cross_checks,
    "md": _md_cross_checks,
}


class Section(Mapping[str, Any]):
    """Read-only view of one validated section, with attribute access."""

    def __init__(self, values: dict[str, Any]) -> None:
        self._values = values

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(key) from None

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


class Config(Section):
    """A daemon's validated configuration: ``config.admin.port``, and its ``path``.

    Loaded from several files (:func:`load_layers`: a shared file, then one
    per process), ``paths`` lists them in order, ``path`` is the first, and
    :meth:`origin` names the file that set a key.
    """

    def __init__(self, path: str, sections: dict[str, Section], *,
                 paths: tuple[str, ...] = (), origins: Mapping[str, str] | None = None
                 ) -> None:
        super().__init__(sections)
        self.path = path
        self.paths = paths or (path,)
        self._origins = dict(origins or {})

    def origin(self, key: str) -> str:
        """The file that set ``key`` ("section.key"); the first file for a default."""
        return self._origins.get(key, self.path)


def _type_name(kind: type) -> str:
    return {str: "a string", int: "an integer", bool: "true or false", float: "a number",
            list: "a list"}.get(kind, kind.__name__)


def _flatten(schema: Mapping[str, Any], path: str, raw: Mapping[str, Any]) -> dict[str, dict]:
    """``raw`` with nested tables lifted: ``{"auth": {"ldap": {..}}}`` -> ``"auth.ldap"``."""
    top = sorted(name for name in schema if "." not in name)
    flat: dict[str, dict] = {}
    for section_name, section_value in raw.items():
        if section_name not in schema or "." in section_name:
            raise ConfigError(path, section_name,
                              f"unknown section (known: {', '.join(top)})")
        if not isinstance(section_value, dict):
            raise ConfigError(path, section_name, "must be a table ([section])")
        flat.setdefault(section_name, {})
        for key, value in section_value.items():
            nested = f"{section_name}.{key}"
            if nested in schema:
                if not isinstance(value, dict):
                    raise ConfigError(path, nested, f"must be a table ([{nested}])")
                flat[nested] = value
                continue
            if key not in schema[section_name]:
                known = sorted(list(schema[section_name]) + [
                    name.rpartition(".")[2] for name in schema
                    if name.rpartition(".")[0] == section_name])
                raise ConfigError(path, nested, f"unknown key (known: {', '.join(known)})")
            flat[section_name][key] = value
    for section_name, values in flat.items():
        for key in values:
            if key not in schema[section_name]:
                known = ", ".join(sorted(schema[section_name]))
                raise ConfigError(path, f"{section_name}.{key}", f"unknown key (known: {known})")
    return flat


def validate(daemon: str, path: str, raw: Mapping[str, Any]) -> Config:
    """Check ``raw`` (parsed TOML) against the daemon's schema, filling defaults.

    A nested table such as ``[auth.ldap]`` is the section ``"auth.ldap"``
    (``config["auth.ldap"].host``); its keys are named ``auth.ldap.host`` in errors.
    """
    return _validate_flat(daemon, path, _flatten(SCHEMAS[daemon], path, raw))


def _validate_flat(daemon: str, path: str, flat: Mapping[str, Mapping[str, Any]], *,
                   paths: tuple[str, ...] = (), origins: Mapping[str, str] | None = None
                   ) -> Config:
    origins = origins or {}

    def error(key: str, reason: str) -> ConfigError:
        return ConfigError(origins.get(key, path), key, reason)

    schema = SCHEMAS[daemon]
    sections: dict[str, Section] = {}
    for section_name, settings in schema.items():
        given = flat.get(section_name, {})
        values: dict[str, Any] = {}
        for key, setting in settings.items():
            value = given.get(key, setting.default)
            # A number of seconds may be written `10` as well as `10.0`.
            if setting.kind is float and type(value) is int:
                value = float(value)
            # bool is a subclass of int: refuse `port = true`.
            if not isinstance(value, setting.kind) or (
                setting.kind is not bool and isinstance(value, bool)
            ):
                raise error(
                    f"{section_name}.{key}",
                    f"must be {_type_name(setting.kind)}, not {type(value).__name__}",
                )
            if setting.check is not None:
                reason = setting.check(value)
                if reason is not None:
                    raise error(f"{section_name}.{key}", f"{reason} (got {value!r})")
            values[key] = value
        sections[section_name] = Section(values)
    cross = CROSS_CHECKS.get(daemon)
    if cross is not None:
        problem = cross(sections)
        if problem is not None:
            raise error(*problem)
    return Config(path, sections, paths=paths, origins=origins)


def load_layers(daemon: str, paths: Sequence[str]) -> Config:
    """Read ``paths`` in order, a key in a later file replacing the same key in an earlier
    one, then validate the result; an error names the file that set the key.

    How several processes of one daemon share a file (``/etc/perc/md.toml``)
    and each adds its own (``/etc/perc/md@2.toml``: its ports and state file;
    the ``perc-md@.service`` template unit passes both).
    """
    if len(paths) == 1:
        return load(daemon, paths[0])
    schema = SCHEMAS[daemon]
    merged: dict[str, dict[str, Any]] = {}
    origins: dict[str, str] = {}
    for path in paths:
        for section, values in _flatten(schema, path, _read(path)).items():
            merged.setdefault(section, {}).update(values)
            for key in values:
                origins[f"{section}.{key}"] = path
    return _validate_flat(daemon, paths[0], merged, paths=tuple(paths), origins=origins)


def _read(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(path, "", "file not found") from None
    except PermissionError:
        raise ConfigError(path, "", "permission denied") from None
    except IsADirectoryError:
        raise ConfigError(path, "", "is a directory, not a file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, "", f"invalid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(path, "", "not UTF-8 text") from None


def load(daemon: str, path: str) -> Config:
    """Read and validate ``path`` for ``daemon`` ("md", "kd" or "kmf")."""
    return validate(daemon, path, _read(path))
