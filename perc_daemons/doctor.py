"""``perc-admin doctor``: check one host's perc-daemons setup and say what to fix.

Run as root on the host (it reads what the daemons read).  Each check is a
:class:`Finding`, ``ok``, ``warn`` or ``fail`` with what to do:

* the three configuration files load (the daemons' own validation), and
  so does each perc-md process's ``md@N.toml`` over ``md.toml``
  (``perc-md@N.service``), all of them naming the same ``[cluster]``;
* every file they name exists and the daemons' user can read it (owner,
  group, mode and every directory on the way), private ones (keys, secrets,
  tokens) no more open than the daemons accept;
* certificates: the key belongs to the certificate, not expired (warning
  within 30 days), the KMF's and the MD's chain to the CA the KD and the
  endpoints trust and carry the names they are reached by, the KD's key is
  ECDSA P-256;
* the KD's and perc-admin's client secrets match their ``secret_hash`` in
  the KMF's client registry; the KD and the KMF agree on the identity
  domain;
* the network (unless ``network=False``): each daemon's ``/healthz`` (each
  perc-md process's where there are several), and
  when one is not running whether another process holds its ports; the
  KMF's HTTPS as the KD checks it (CA and host name), the MD's API as the
  endpoints do, and the MD's tunnel certificate as the KD checks it.

Nothing is changed.  The checks read the configuration as the daemons do
(:func:`perc_daemons.config.load`).
"""

from __future__ import annotations

import datetime
import grp
import os
import pwd
import socket
import ssl
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

from perc_daemons import config as config_module
from perc_daemons.cli import healthz_ok

__all__ = ["Finding", "diagnose"]

DAEMONS = ("kmf", "kd", "md")
EXPIRY_WARNING = datetime.timedelta(days=30)


@dataclass(frozen=True)
class Finding:
    status: str  # "ok", "warn" or "fail"
    what: str
    detail: str = ""
    fix: str = ""


@dataclass(frozen=True)
class _User:
    name: str
    uid: int
    gids: frozenset[int]


def _user(name: str) -> _User | None:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    gids = {entry.pw_gid} | {g.gr_gid for g in grp.getgrall() if name in g.gr_mem}
    return _User(name, entry.pw_uid, frozenset(gids))


def _can(user: _User, st: os.stat_result, bit: int) -> bool:
    """Whether ``user`` has permission ``bit`` (4 read, 1 search) by owner/group/other."""
    if user.uid == 0:
        return True
    if st.st_uid == user.uid:
        return bool(st.st_mode & (bit << 6))
    if st.st_gid in user.gids:
        return bool(st.st_mode & (bit << 3))
    return bool(st.st_mode & bit)


def _describe(st: os.stat_result) -> str:
    def name(getter, number):
        try:
            return getter(number)[0]
        except KeyError:
            return str(number)
    return (f"{name(pwd.getpwuid, st.st_uid)}:{name(grp.getgrgid, st.st_gid)} "
            f"{stat.S_IMODE(st.st_mode):04o}")


class _Doctor:
    def __init__(self, etc_dir: str, user: str, roles: frozenset[str]) -> None:
        self.roles = roles
        self.etc = etc_dir
        self.user = _user(user)
        self.user_name = user
        self.findings: list[Finding] = []
        self.configs: dict[str, config_module.Config] = {}
        #: perc-md@N -> its configuration (md.toml, then md@N.toml), when there are any
        self.md_processes: dict[str, config_module.Config] = {}

    def ca_file(self) -> str:
        """The CA the daemons' certificates are checked against: the KD's, else the site's."""
        kd = self.configs.get("kd")
        return kd.kmf.ca_file if kd is not None else os.path.join(self.etc, "tls", "ca.crt")

    def add(self, status: str, what: str, detail: str = "", fix: str = "") -> None:
        self.findings.append(Finding(status, what, detail, fix))

    # --- configuration -------------------------------------------------------------------

    def load_configs(self) -> None:
        if self.user is None:
            self.add("fail", f"user {self.user_name}", "does not exist",
                     "reinstall perc-daemons (its postinst makes the user)")
        for daemon in (d for d in DAEMONS if d in self.roles):
            path = os.path.join(self.etc, f"{daemon}.toml")
            try:
                self.configs[daemon] = config_module.load(daemon, path)
            except config_module.ConfigError as e:
                self.add("fail", path, str(e), "fix the key named; etc/perc/ documents each")
            else:
                self.add("ok", path, "valid")
        if "md" in self.roles and "md" in self.configs:
            self._load_md_processes()

    def _load_md_processes(self) -> None:
        """Each ``md@N.toml`` over md.toml, as ``perc-md@N.service`` reads them."""
        base = os.path.join(self.etc, "md.toml")
        try:
            names = sorted((n for n in os.listdir(self.etc)
                            if n.startswith("md@") and n.endswith(".toml")),
                           key=lambda n: (len(n), n))
        except OSError:
            return
        for name in names:
            path = os.path.join(self.etc, name)
            unit = f"perc-{name[:-len('.toml')]}"
            try:
                self.md_processes[unit] = config_module.load_layers("md", [base, path])
            except config_module.ConfigError as e:
                self.add("fail", path, str(e), "fix the key named; etc/perc/md.toml "
                         "documents each")
            else:
                self.add("ok", path, f"valid ({unit}, over md.toml)")
        clusters = {unit: tuple(c.cluster.processes) for unit, c in self.md_processes.items()}
        if len(set(clusters.values())) > 1:
            first = next(iter(clusters))
            for unit, processes in clusters.items():
                if processes != clusters[first]:
                    self.add("fail", os.path.join(self.etc, unit[len("perc-"):] + ".toml"),
                             f"[cluster] processes differs from {first}'s",
                             "every process must list the same processes, in the same order")

    # --- files ---------------------------------------------------------------------------

    def readable(self, path: str, *, private: bool, what: str) -> bool:
        """Whether the daemons' user can read ``path`` (and ``private`` is not too open)."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self.add("fail", path, f"missing ({what})",
                     "perc-admin setup makes it (or install your own)")
            return False
        except OSError as e:
            self.add("fail", path, e.strerror or str(e))
            return False
        user = self.user
        if user is not None:
            directory = os.path.dirname(os.path.abspath(path))
            while directory not in ("/", ""):
                dst = os.stat(directory)
                if not _can(user, dst, 1):
                    self.add("fail", path, f"{user.name} cannot reach it: {directory} is "
                             f"{_describe(dst)}", f"chmod g+x {directory} (group {user.name})")
                    return False
                directory = os.path.dirname(directory)
            if not _can(user, st, 4):
                self.add("fail", path, f"{user.name} cannot read it ({_describe(st)})",
                         f"chown root:{user.name} {path} && chmod 0640 {path}")
                return False
        mode = stat.S_IMODE(st.st_mode)
        if private and mode & 0o037:
            self.add("fail", path, f"mode {mode:04o} is too open for a private file",
                     f"chmod 0640 {path}")
            return False
        if private and user is not None and st.st_uid not in (0, user.uid):
            self.add("fail", path, f"owned by uid {st.st_uid}, not root or {user.name}",
                     f"chown root:{user.name} {path}")
            return False
        self.add("ok", path, what)
        return True

    def files(self) -> None:
        seen: set[str] = set()

        def check(path: str, private: bool, what: str) -> None:
            if path and path not in seen:
                seen.add(path)
                self.readable(path, private=private, what=what)

        kmf, kd, md = (self.configs.get(d) for d in DAEMONS)
        if kmf is not None:
            check(kmf.https.certificate, False, "KMF certificate")
            check(kmf.https.private_key, True, "KMF key")
            if os.path.exists(kmf.oauth.clients_file):
                check(kmf.oauth.clients_file, True, "OAuth client registry")
            else:
                self.add("fail", kmf.oauth.clients_file, "missing: no OAuth client can log in",
                         "perc-admin setup")
            if os.path.exists(kmf.auth.users_file):
                check(kmf.auth.users_file, True, "local users")
            elif "file" in kmf.auth.backends:
                self.add("warn", kmf.auth.users_file, "no local users yet",
                         "perc-admin users add NAME")
        if kd is not None:
            check(kd.tunnel.certificate, False, "KD certificate")
            check(kd.tunnel.private_key, True, "KD key")
            check(kd.tunnel.ca_file, False, "CA the MDs' certificates chain to")
            check(kd.kmf.ca_file, False, "CA the KMF's certificate chains to")
            check(kd.kmf.client_secret_file, True, "KD's KMF client secret")
        if md is not None:
            check(md.api.certificate, False, "MD certificate")
            check(md.api.private_key, True, "MD key")
            check(md.api.provider_token_file, True, "conference-provider token")

    # --- certificates --------------------------------------------------------------------

    def certificates(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives.asymmetric import ec

        from perc_daemons import tls
        from perc_daemons.pki import chains_to

        kmf, kd, md = (self.configs.get(d) for d in DAEMONS)
        ca_pem = b""
        if os.path.exists(self.ca_file()):
            with open(self.ca_file(), "rb") as f:
                ca_pem = f.read()
        now = datetime.datetime.now(datetime.UTC)
        leaves = []
        if kmf is not None:
            kmf_host = urlsplit(kd.kmf.url).hostname if kd is not None else "localhost"
            leaves.append(("KMF", kmf.https.certificate, kmf.https.private_key, kmf_host))
        if md is not None:
            leaves.append(("MD", md.api.certificate, md.api.private_key, None))
        if kd is not None:
            leaves.append(("KD", kd.tunnel.certificate, kd.tunnel.private_key, None))
        for name, cert_path, key_path, host in leaves:
            try:
                with open(cert_path, "rb") as f:
                    pem = f.read()
                certificate = x509.load_pem_x509_certificate(pem)
                tls.server_context_factory(cert_path, key_path)
            except OSError:
                continue  # reported with the files
            except (ValueError, tls.TlsFileError) as e:
                self.add("fail", cert_path, f"{name} certificate/key unusable: {e}",
                         "perc-admin setup replaces package-made ones; else reissue")
                continue
            left = certificate.not_valid_after_utc - now
            if left.total_seconds() <= 0:
                self.add("fail", cert_path, f"{name} certificate expired "
                         f"{certificate.not_valid_after_utc:%Y-%m-%d}", "issue a new one")
            elif left < EXPIRY_WARNING:
                self.add("warn", cert_path, f"{name} certificate expires in {left.days} days",
                         "issue a new one and restart the daemon")
            if ca_pem and name in ("KMF", "MD") and not chains_to(pem, ca_pem):
                self.add("fail", cert_path, f"{name} certificate does not chain to "
                         f"{self.ca_file()}: the KD and endpoints "
                         "refuse it", "issue it from that CA (perc-admin setup does)")
            if host is not None and not _names(certificate, host):
                self.add("fail", cert_path, f"{name} certificate is not for {host!r}, the "
                         "name the KD uses ([kmf] url of kd.toml)",
                         "reissue it with that name, or change the URL")
            if name == "KD":
                key = certificate.public_key()
                if not (isinstance(key, ec.EllipticCurvePublicKey)
                        and key.curve.name == "secp256r1"):
                    self.add("fail", cert_path, "the KD's key must be ECDSA P-256 (it signs "
                             "answers with ES256 and is the DTLS key)", "reissue it")
            self.add("ok", cert_path, f"{name} certificate valid until "
                     f"{certificate.not_valid_after_utc:%Y-%m-%d}")

    # --- secrets and agreement -----------------------------------------------------------

    def secrets(self) -> None:
        from perc_daemons import tls
        from perc_daemons.kmf.clients import ClientFileError, ClientRegistry, hash_client_secret

        kmf, kd = self.configs.get("kmf"), self.configs.get("kd")
        if kmf is None:
            return
        try:
            registry = ClientRegistry.load(kmf.oauth.clients_file)
        except ClientFileError as e:
            if os.path.exists(kmf.oauth.clients_file):
                self.add("fail", kmf.oauth.clients_file, str(e))
            return
        pairs = []
        if kd is not None:
            pairs.append((kd.kmf.client_id, kd.kmf.client_secret_file, "perc-kd"))
        admin = os.path.join(self.etc, "admin.toml")
        if os.path.exists(admin) and "kmf" in self.roles:
            from perc_daemons.kmf.admin_cli import load_admin_config

            try:
                config = load_admin_config(admin, required=True)
                if config.client_id:
                    pairs.append((config.client_id, config.client_secret_file, "perc-admin"))
            except config_module.ConfigError as e:
                self.add("fail", admin, str(e))
        for client_id, secret_file, who in pairs:
            client = registry.get(client_id)
            if client is None:
                self.add("fail", kmf.oauth.clients_file, f"no client {client_id!r} ({who})",
                         "perc-admin setup adds it")
                continue
            try:
                secret = tls.read_secret_line(secret_file)
            except (OSError, tls.TlsFileError):
                continue  # reported with the files
            if client.secret_hash != hash_client_secret(secret):
                self.add("fail", secret_file, f"{who}'s secret does not match client "
                         f"{client_id!r} in {kmf.oauth.clients_file}",
                         f"perc-admin clients hash --secret-file {secret_file}, and put "
                         "that secret_hash in the registry")
            else:
                self.add("ok", secret_file, f"{who}'s secret matches client {client_id!r}")
        if kd is not None and kd.idp.domain != kmf.idp.domain:
            self.add("fail", os.path.join(self.etc, "kd.toml"),
                     f"[idp] domain {kd.idp.domain!r} is not the KMF's {kmf.idp.domain!r}",
                     "set the same [idp] domain in kd.toml and kmf.toml")

    # --- network -------------------------------------------------------------------------

    def network(self, timeout: float) -> None:
        kmf, kd, md = (self.configs.get(d) for d in DAEMONS)
        # several perc-md processes (perc-md@N) run instead of perc-md
        mds = list(self.md_processes.items()) or [("perc-md", md)]
        units = [("perc-kmf", "kmf", kmf), ("perc-kd", "kd", kd)] + [
            (unit, "md", cfg) for unit, cfg in mds]
        for unit, daemon, cfg in units:
            if cfg is None:
                continue
            running = _healthz(cfg.admin.bind, cfg.admin.port, timeout)
            if running:
                self.add("ok", unit, f"running (/healthz on port {cfg.admin.port})")
                continue
            self.add("warn", unit, "not running (no /healthz on "
                     f"{cfg.admin.bind}:{cfg.admin.port})",
                     f"systemctl start {unit}; journalctl -u {unit} says why it stopped")
            for section, kind in _listeners(daemon):
                values = cfg[section]
                if values.port and _taken(values.bind, values.port, kind):
                    self.add("fail", unit, f"[{section}] port {values.port} on "
                             f"{values.bind} is held by another process",
                             "ss -ltnup shows which; stop it or change the port")
        if kd is not None and kmf is not None and os.path.exists(kd.kmf.ca_file):
            self.tls_check("the KD's view of the KMF", kd.kmf.url, kd.kmf.ca_file, timeout)
        for unit, cfg in mds:
            if cfg is None:
                continue
            who = "the MD" if unit == "perc-md" else unit
            tunnel_of = "this MD's " if unit == "perc-md" else f"{unit}'s "
            if os.path.exists(self.ca_file()):
                self.tls_check(f"an endpoint's view of {who}",
                               f"https://localhost:{cfg.api.port}", self.ca_file(), timeout)
            if kd is not None and os.path.exists(kd.tunnel.ca_file):
                # the MD's half of the tunnel handshake, as the KD checks it (the MD
                # then checks the KD's certificate against the conference's fingerprint)
                self.tls_check(f"the KD's view of {tunnel_of}tunnel port",
                               f"https://localhost:{cfg.tunnel.port}", kd.tunnel.ca_file,
                               timeout)

    def tls_check(self, what: str, url: str, ca_file: str, timeout: float) -> None:
        parts = urlsplit(url)
        host, port = parts.hostname or "localhost", parts.port or 443
        context = ssl.create_default_context(cafile=ca_file)
        try:
            with socket.create_connection((host, port), timeout=timeout) as raw, \
                    context.wrap_socket(raw, server_hostname=host):
                pass
        except ssl.SSLCertVerificationError as e:
            self.add("fail", url, f"{what}: certificate not trusted: {e.verify_message}",
                     f"its certificate must chain to {ca_file} and name {host}")
        except OSError as e:
            self.add("warn", url, f"{what}: cannot connect ({e.strerror or e})",
                     "is the daemon running? (systemctl status)")
        else:
            self.add("ok", url, f"{what}: TLS verified ({ca_file}, name {host})")


def _names(certificate, host: str) -> bool:
    import ipaddress

    from cryptography import x509

    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host.lower() in {n.lower() for n in san.get_values_for_type(x509.DNSName)}
    return address in san.get_values_for_type(x509.IPAddress)


def _listeners(daemon: str) -> Iterator[tuple[str, int]]:
    yield "admin", socket.SOCK_STREAM
    if daemon == "kmf":
        yield "https", socket.SOCK_STREAM
    if daemon == "md":
        yield "api", socket.SOCK_STREAM
        yield "tunnel", socket.SOCK_STREAM
        yield "media", socket.SOCK_DGRAM


def _taken(bind: str, port: int, kind: int) -> bool:
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    with socket.socket(family, kind) as s:
        try:
            s.bind((bind, port))
        except OSError:
            return True
    return False


def _healthz(bind: str, port: int, timeout: float) -> bool:
    host = "127.0.0.1" if bind in ("0.0.0.0", "") else ("::1" if bind == "::" else bind)
    return healthz_ok(host, port, timeout)


def diagnose(etc_dir: str = "/etc/perc", user: str = "perc", *, network: bool = True,
             timeout: float = 3.0, roles: frozenset[str] = frozenset(DAEMONS)
             ) -> list[Finding]:
    """Every check of the module docstring, in order, for the daemons in ``roles``."""
    doctor = _Doctor(etc_dir, user, roles)
    doctor.load_configs()
    doctor.files()
    doctor.certificates()
    doctor.secrets()
    if network:
        doctor.network(timeout)
    return doctor.findings
