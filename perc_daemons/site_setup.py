"""``perc-admin setup``: the first run of one host, every file the daemons need.

After ``apt-get install perc-daemons`` the shipped configuration (etc/perc/)
names files that do not exist yet.  Run as root, :func:`setup` makes each
of them where the defaults look, with the owner and mode the daemons
require, and keeps every file that is already there (it is the site's):

==================================  ==========  ================================
file (under /etc/perc)              owner mode  what
==================================  ==========  ================================
``tls/ca.crt``                      root  0644  the site CA: the daemons and the
                                                endpoints trust it
``tls/ca.key``                      root  0600  its key (made here only; an
                                                imported CA's key is not kept)
``tls/{kmf,md,kd}.crt``             root  0644  the daemons' certificates, issued
                                                by the CA
``tls/{kmf,md,kd}.key``             perc  0640  their keys (group perc)
``kmf-clients.toml``                perc  0640  the KMF's OAuth clients:
                                                perc-endpoint, kd, perc-admin
``kd-client.secret``                perc  0640  the KD's client secret
``admin-client.secret``             root  0600  perc-admin's client secret
``admin.toml``                      perc  0640  perc-admin's configuration
``md-provider.token``               perc  0640  the MD's conference-provider token
``provider.toml``                   perc  0640  perc-provider's configuration
==================================  ==========  ================================

("perc 0640" is root:perc: readable by the daemons, writable by root.)
``roles`` limits it to the daemons this host runs: a conference provider's
MD host (``--roles md``) gets the CA (or imports its own), the MD's
certificate, the provider token and provider.toml, and nothing of the
enterprise's trust domain (no KD key, no KMF client secrets).

Certificates: with ``ca_certificate`` and ``ca_key`` given, the site's own
CA issues the leaves (its certificate becomes ``tls/ca.crt``; its key is used
and not written anywhere); otherwise a new CA is made (``tls/ca.key``, ten
years).  A leaf already in place is kept when it chains to ``tls/ca.crt``
(e.g. one the site's CA issued before); the self-signed certificates the
package's postinst made are replaced while they are unchanged; any other
certificate is kept and reported, since the daemons and endpoints trusting
``tls/ca.crt`` will refuse it.

Every file made here is recorded with its SHA-256 in
``/etc/perc/.generated-by-perc-daemons`` (as postinst records its own), so
that ``apt-get purge`` removes what the package made while it is unchanged
and nothing else.

Nothing here opens a socket: :func:`setup` returns what it did, one
:class:`Step` per file, and ``perc-admin`` prints them.
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import os
import pwd
import socket
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field

from perc_daemons.kmf.clients import ClientFileError, ClientRegistry, hash_client_secret
from perc_daemons.kmf.clients import new_client_secret as new_secret
from perc_daemons.pki import CertificateAuthority, PkiError, chains_to

__all__ = ["MANIFEST", "SetupError", "SetupOptions", "Step", "setup"]

#: sha256sum-format lines ("HEX  path relative to /etc/perc") of the files the
#: package made (postinst and perc-admin setup); read by postrm on purge.
MANIFEST = ".generated-by-perc-daemons"
CA_DAYS = 3650
LEAF_DAYS = 825
ENDPOINT_CLIENT = "perc-endpoint"
ENDPOINT_REDIRECT = "http://127.0.0.1/callback"
KD_CLIENT = "kd"
ADMIN_CLIENT = "perc-admin"


class SetupError(Exception):
    """Setup cannot go on (wrong user, unusable CA, a file it must read is broken)."""


@dataclass(frozen=True)
class SetupOptions:
    """What :func:`setup` makes; the defaults are the package's paths and names."""

    etc_dir: str = "/etc/perc"
    user: str = "perc"
    domain: str = "localhost"
    #: DNS names of this host in the KMF's and MD's certificates, besides
    #: localhost (default: the host's fully qualified name).
    host_names: Sequence[str] = ()
    ca_certificate: str = ""
    ca_key: str = ""
    #: The daemons this host runs: its files only.  An MD run by a conference
    #: provider gets no KD key, no KMF client secrets (other trust domain).
    roles: frozenset[str] = frozenset({"kmf", "kd", "md"})
    #: perc-md processes on this host (one per core): above 1, ``md@1.toml`` ...
    #: ``md@N.toml`` for ``perc-md@1.service`` ... (:func:`md_process_toml`).
    md_processes: int = 1


#: Process k of several perc-md processes adds (k - 1) * this to every default port.
MD_PROCESS_PORT_STEP = 100
MAX_MD_PROCESSES = 64


def md_process_ports(k: int) -> dict[str, int]:
    """The ports of perc-md process ``k`` (1, 2, ...): the defaults plus 100 per process."""
    step = (k - 1) * MD_PROCESS_PORT_STEP
    return {"admin": 9461 + step, "api": 9443 + step, "tunnel": 9450 + step,
            "media": 9470 + step}


def md_process_toml(k: int, processes: int, host: str) -> str:
    """``/etc/perc/md@k.toml``: what process ``k`` of ``processes`` sets beside md.toml."""
    ports = md_process_ports(k)
    urls = ", ".join(f'"https://{host}:{md_process_ports(i)["api"]}"'
                     for i in range(1, processes + 1))
    return (
        f"# /etc/perc/md@{k}.toml: perc-md process {k} of {processes} on this host (made by\n"
        "# perc-admin setup --md-processes). perc-md@%i.service reads /etc/perc/md.toml,\n"
        "# then this file: its keys replace md.toml's. Every process has its own ports\n"
        "# (the defaults plus 100 per process) and state file; [cluster] lists all of\n"
        "# them, the same in every file (docs/DEPLOYMENT.md, \"Several processes on one\n"
        "# host\").\n"
        f"[admin]\nport = {ports['admin']}\n"
        f"[api]\nport = {ports['api']}\n"
        f"[tunnel]\nport = {ports['tunnel']}\n"
        f"[media]\nport = {ports['media']}\n"
        f'[state]\nfile = "/var/lib/perc/md@{k}-state.json"\n'
        f"[cluster]\nprocesses = [{urls}]\n")


@dataclass(frozen=True)
class Step:
    """One file: ``made``, ``kept``, ``replaced`` or ``warning`` (with why)."""

    action: str
    path: str
    detail: str = ""


@dataclass
class _Owners:
    root_uid: int
    root_gid: int
    daemon_uid: int
    daemon_gid: int
    chown: bool


def _owners(user: str) -> _Owners:
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise SetupError(f"no user {user!r}: the package's postinst makes it (or pass --user)"
                         ) from None
    group = entry.pw_gid
    with contextlib.suppress(KeyError):
        group = grp.getgrnam(user).gr_gid
    if os.geteuid() == 0:
        return _Owners(0, 0, entry.pw_uid, group, True)
    if entry.pw_uid != os.geteuid():
        raise SetupError(f"run perc-admin setup as root (it gives files to {user!r})")
    # A developer's own tree: everything is theirs.
    return _Owners(entry.pw_uid, group, entry.pw_uid, group, False)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class _Site:
    options: SetupOptions
    owners: _Owners
    steps: list[Step] = field(default_factory=list)
    manifest: dict[str, str] = field(default_factory=dict)

    def path(self, relative: str) -> str:
        return os.path.join(self.options.etc_dir, relative)

    # --- files ---------------------------------------------------------------------------

    def read(self, relative: str) -> bytes | None:
        try:
            with open(self.path(relative), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise SetupError(f"{self.path(relative)}: {e.strerror or e}") from None

    def write(self, relative: str, data: bytes, *, private: str) -> None:
        """Write atomically; ``private``: "public" 0644, "daemon" root:perc 0640, "root" 0600."""
        path = self.path(relative)
        directory = os.path.dirname(path)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".")
        try:
            mode = {"public": 0o644, "daemon": 0o640, "root": 0o600}[private]
            os.fchmod(fd, mode)
            if self.owners.chown:
                gid = self.owners.daemon_gid if private == "daemon" else self.owners.root_gid
                os.fchown(fd, self.owners.root_uid, gid)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self.manifest[relative] = _sha256(data)

    def made_by_package(self, relative: str, data: bytes) -> bool:
        """Whether ``data`` is what the package recorded for ``relative`` (unchanged)."""
        return self.manifest.get(relative) == _sha256(data)

    def directory(self, relative: str) -> None:
        path = self.path(relative)
        os.makedirs(path, mode=0o750, exist_ok=True)
        if self.owners.chown:
            os.chown(path, self.owners.root_uid, self.owners.daemon_gid)
        os.chmod(path, 0o750)

    def note(self, action: str, relative: str, detail: str = "") -> None:
        self.steps.append(Step(action, self.path(relative), detail))

    # --- the manifest --------------------------------------------------------------------

    def load_manifest(self) -> None:
        data = self.read(MANIFEST) or b""
        for line in data.decode("utf-8", "replace").splitlines():
            digest, _, name = line.partition("  ")
            if len(digest) == 64 and name and not name.startswith("/"):
                self.manifest[name] = digest

    def save_manifest(self) -> None:
        text = "".join(f"{digest}  {name}\n" for name, digest in sorted(self.manifest.items())
                       if name != MANIFEST)
        digests = dict(self.manifest)
        self.write(MANIFEST, text.encode(), private="public")
        self.manifest = digests


def _host_names(options: SetupOptions) -> list[str]:
    names = list(options.host_names)
    if not names:
        fqdn = socket.getfqdn()
        if fqdn and fqdn != "localhost" and not fqdn.startswith("localhost."):
            names.append(fqdn)
    return list(dict.fromkeys([*names, "localhost"]))


def _ca(site: _Site) -> tuple[CertificateAuthority | None, bytes]:
    """The issuing CA (None when only its certificate is known) and the trusted bundle."""
    options = site.options
    if options.ca_certificate or options.ca_key:
        if not (options.ca_certificate and options.ca_key):
            raise SetupError("give --ca-certificate and --ca-key together")
        try:
            with open(options.ca_certificate, "rb") as f:
                certificate = f.read()
            with open(options.ca_key, "rb") as f:
                key = f.read()
        except OSError as e:
            raise SetupError(f"{e.filename}: {e.strerror}") from None
        try:
            ca = CertificateAuthority.load(certificate, key)
        except PkiError as e:
            raise SetupError(f"{options.ca_certificate}, {options.ca_key}: {e}") from None
        existing = site.read("tls/ca.crt")
        if existing is not None and existing != ca.certificate_pem and \
                not site.made_by_package("tls/ca.crt", existing):
            raise SetupError(f"{site.path('tls/ca.crt')} holds another CA; move it away to "
                             "import this one")
        if existing != ca.certificate_pem:
            site.write("tls/ca.crt", ca.certificate_pem, private="public")
            site.note("made", "tls/ca.crt", f"the CA of {options.ca_certificate}")
        else:
            site.note("kept", "tls/ca.crt")
        return ca, ca.certificate_pem
    bundle = site.read("tls/ca.crt")
    key = site.read("tls/ca.key")
    if bundle is not None and key is not None:
        try:
            ca = CertificateAuthority.load(bundle, key)
        except PkiError as e:
            raise SetupError(f"{site.path('tls/ca.key')}: {e}") from None
        site.note("kept", "tls/ca.crt")
        site.note("kept", "tls/ca.key")
        return ca, bundle
    if bundle is not None:
        site.note("kept", "tls/ca.crt", "no CA key here: certificates are not issued")
        return None, bundle
    ca = CertificateAuthority.create(f"perc-daemons CA of {_host_names(site.options)[0]}",
                                     days=CA_DAYS)
    site.write("tls/ca.key", ca.key_pem, private="root")
    site.write("tls/ca.crt", ca.certificate_pem, private="public")
    site.note("made", "tls/ca.key", "the site CA's key (root only): keep a copy offline")
    site.note("made", "tls/ca.crt", "the site CA: give it to endpoints (--ca)")
    return ca, ca.certificate_pem


def _leaf(site: _Site, ca: CertificateAuthority | None, bundle: bytes, name: str,
          dns_names: list[str], ip_addresses: list[str]) -> None:
    cert_rel, key_rel = f"tls/{name}.crt", f"tls/{name}.key"
    certificate, key = site.read(cert_rel), site.read(key_rel)
    if certificate is not None and key is not None:
        if chains_to(certificate, bundle):
            site.note("kept", cert_rel, "issued by tls/ca.crt")
            return
        package_made = site.made_by_package(cert_rel, certificate) and \
            site.made_by_package(key_rel, key)
        if not package_made or ca is None:
            site.note("warning", cert_rel, "kept, but it does not chain to tls/ca.crt: "
                      "whoever trusts tls/ca.crt refuses it; add its CA to tls/ca.crt "
                      "or replace it")
            return
        action = "replaced"
    elif certificate is not None or key is not None:
        site.note("warning", cert_rel if certificate is None else key_rel,
                  f"only one of {name}.crt and {name}.key is there: not touched")
        return
    else:
        action = "made"
    if ca is None:
        site.note("warning", cert_rel, "missing, and no CA key to issue it: install it")
        return
    new_certificate, new_key = ca.issue(dns_names, ip_addresses, days=LEAF_DAYS)
    site.write(key_rel, new_key, private="daemon")
    site.write(cert_rel, new_certificate, private="public")
    site.note(action, cert_rel, "for " + ", ".join([*dns_names, *ip_addresses]))


def _secret_file(site: _Site, relative: str, private: str) -> str:
    """The secret in ``relative``, made (256 bits) when missing."""
    data = site.read(relative)
    if data is not None:
        secret = data.decode("utf-8", "replace").strip()
        if secret:
            site.note("kept", relative)
            return secret
    secret = new_secret()
    site.write(relative, (secret + "\n").encode(), private=private)
    site.note("made", relative)
    return secret


_CLIENT_TEXT = {
    ENDPOINT_CLIENT: (f'[client.{ENDPOINT_CLIENT}]\n'
                      '# the reference endpoint and user agents: public, PKCE\n'
                      'type = "public"\n'
                      'grant_types = ["authorization_code", "refresh_token"]\n'
                      f'redirect_uris = ["{ENDPOINT_REDIRECT}"]\n'
                      'scopes = ["identity", "keys"]\n'),
    KD_CLIENT: (f'[client.{KD_CLIENT}]\n'
                '# perc-kd: its secret is /etc/perc/kd-client.secret\n'
                'type = "confidential"\n'
                'secret_hash = "{hash}"\n'
                'grant_types = ["client_credentials"]\n'
                'scopes = ["kd"]\n'),
    ADMIN_CLIENT: (f'[client.{ADMIN_CLIENT}]\n'
                   '# perc-admin: its secret is /etc/perc/admin-client.secret\n'
                   'type = "confidential"\n'
                   'secret_hash = "{hash}"\n'
                   'grant_types = ["client_credentials"]\n'
                   'scopes = ["admin"]\n'),
}

_CLIENTS_HEADER = """\
# /etc/perc/kmf-clients.toml: the OAuth 2.0 clients of perc-kmf (made by
# perc-admin setup). One [client.<id>] table per client:
#   type         "public" (no secret; authorization_code + PKCE) or "confidential"
#   secret_hash  confidential only: "$sha256$..." from perc-admin clients
#                new-secret --secret-file F (or clients hash --secret-file F)
#   grant_types  of authorization_code, refresh_token (public and confidential),
#                client_credentials (confidential only)
#   redirect_uris  authorization_code only: exact URIs
#   scopes       of identity, keys (users' clients), kd (perc-kd), admin (perc-admin)
# Mode 0640 root:perc. Changes take effect on systemctl reload perc-kmf.
"""


def _clients(site: _Site) -> None:
    relative = "kmf-clients.toml"
    existing = site.read(relative)
    known: set[str] = set()
    if existing is not None:
        try:
            registry = ClientRegistry.load(site.path(relative))
        except ClientFileError as e:
            raise SetupError(f"{e}; fix it, or move it away to have it made again") from None
        known = {cid for cid in (ENDPOINT_CLIENT, KD_CLIENT, ADMIN_CLIENT)
                 if registry.get(cid) is not None}
    added: list[str] = []
    text = existing.decode() if existing is not None else _CLIENTS_HEADER
    for cid, template in _CLIENT_TEXT.items():
        secret_file = {KD_CLIENT: ("kd-client.secret", "daemon"),
                       ADMIN_CLIENT: ("admin-client.secret", "root")}.get(cid)
        if cid in known:
            if secret_file is not None and site.read(secret_file[0]) is None:
                site.note("warning", secret_file[0],
                          f"missing, but client {cid!r} is registered with another secret: "
                          f"make one with perc-admin clients new-secret and put its "
                          f"secret_hash in {relative}")
            elif secret_file is not None:
                site.note("kept", secret_file[0])
            continue
        entry = template
        if secret_file is not None:
            secret = _secret_file(site, *secret_file)
            entry = template.replace("{hash}", hash_client_secret(secret))
        text += ("\n" if text and not text.endswith("\n\n") else "") + entry
        added.append(cid)
    if added:
        site.write(relative, text.encode(), private="daemon")
        site.note("made" if existing is None else "replaced", relative,
                  "clients " + ", ".join(added))
    else:
        site.note("kept", relative)


def _config_file(site: _Site, relative: str, text: str) -> None:
    if site.read(relative) is not None:
        site.note("kept", relative)
        return
    site.write(relative, text.encode(), private="daemon")
    site.note("made", relative)


def setup(options: SetupOptions) -> list[Step]:
    """Make what is missing (module docstring); returns one :class:`Step` per file."""
    owners = _owners(options.user)
    site = _Site(options, owners)
    if not os.path.isdir(options.etc_dir):
        raise SetupError(f"{options.etc_dir}: no such directory (is perc-daemons installed?)")
    roles = options.roles
    if set(roles) - {"kmf", "kd", "md"} or not roles:
        raise SetupError("roles are kmf, kd and md (got " + ", ".join(sorted(roles)) + ")")
    site.load_manifest()
    site.directory("tls")
    ca, bundle = _ca(site)
    hosts = _host_names(options)
    if "kmf" in roles:
        _leaf(site, ca, bundle, "kmf", hosts, ["127.0.0.1", "::1"])
    if "md" in roles:
        _leaf(site, ca, bundle, "md", hosts, ["127.0.0.1", "::1"])
    if "kd" in roles:
        _leaf(site, ca, bundle, "kd", [f"kd.{options.domain}"], [])
    if "kmf" in roles:
        _clients(site)
    elif "kd" in roles:
        _secret_file(site, "kd-client.secret", "daemon")
        site.note("warning", "kd-client.secret", "register it at the KMF: perc-admin clients "
                  "hash --secret-file this file, as client kd in kmf-clients.toml")
    etc = options.etc_dir
    if "md" in roles:
        _secret_file(site, "md-provider.token", "daemon")
        _config_file(site, "provider.toml", _provider_toml(etc))
        if not 1 <= options.md_processes <= MAX_MD_PROCESSES:
            raise SetupError(f"--md-processes must be 1-{MAX_MD_PROCESSES}")
        if options.md_processes > 1:
            for k in range(1, options.md_processes + 1):
                _config_file(site, f"md@{k}.toml",
                             md_process_toml(k, options.md_processes, hosts[0]))
    if "kmf" in roles:
        _config_file(site, "admin.toml", _admin_toml(etc, options.domain))
    site.save_manifest()
    return site.steps


def _admin_toml(etc: str, domain: str) -> str:
    return (
        "# /etc/perc/admin.toml: configuration of perc-admin (made by perc-admin setup).\n"
        "# The KMF's HTTPS API (kmf.toml [https]):\n"
        'url = "https://localhost:8443"\n'
        "# PEM CA certificate(s) the KMF's certificate chains to:\n"
        f'ca_file = "{etc}/tls/ca.crt"\n'
        "# perc-admin's OAuth client (kmf-clients.toml) and its secret (mode 0600):\n"
        f'client_id = "{ADMIN_CLIENT}"\n'
        f'client_secret_file = "{etc}/admin-client.secret"\n'
        "# The KMF's issuer (kmf.toml [idp] issuer, default https://<domain>), checked in\n"
        "# signed rosters:\n"
        f'issuer = "https://{domain}"\n'
        "# The KD's certificate: conferences create --md gives the MD its fingerprint.\n"
        f'kd_certificate = "{etc}/tls/kd.crt"\n'
        "# The conference provider's config (the MD's CA and provider token) that\n"
        "# conferences create --md uses:\n"
        f'provider_config = "{etc}/provider.toml"\n')


def _provider_toml(etc: str) -> str:
    return (
        "# /etc/perc/provider.toml: configuration of perc-provider, the conference\n"
        "# provider's command line for perc-md (made by perc-admin setup).\n"
        "# The MD's HTTPS conference API (md.toml [api]):\n"
        'url = "https://localhost:9443"\n'
        "# PEM CA certificate(s) the MD's certificate chains to:\n"
        f'ca_file = "{etc}/tls/ca.crt"\n'
        "# The provider token (md.toml [api] provider_token_file):\n"
        f'token_file = "{etc}/md-provider.token"\n')
