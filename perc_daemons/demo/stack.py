"""A whole PERC deployment on loopback: perc-kmf, perc-kd and perc-md as real twistd children.

Used by ``make demo`` (:mod:`perc_daemons.demo.conference`), the end-to-end
tests and ``bench/conference.py``.  :class:`LocalStack` writes, in one
directory:

* ``etc/``: what ``perc-admin setup`` makes on a real host
  (:mod:`perc_daemons.site_setup`): a CA and certificates for the KMF and
  the MD (``localhost``, 127.0.0.1, ::1) and the KD (``kd.localhost``), the
  OAuth client registry (``perc-endpoint`` public with PKCE, ``kd`` and
  ``perc-admin`` confidential), the KD's and perc-admin's client secrets, the
  MD's conference-provider token, admin.toml and provider.toml;
* ``kmf/``: the KMF's state (SQLite store, key-encryption key, signing
  keys) and a user file (cheap argon2id: development only);
* ``kmf.toml``, ``kd.toml``, ``md.toml``;

then runs each daemon with ``twistd --nodaemon perc-<name> --config ...``
and waits for its ``/healthz``.  Every port is 0 at the first start (the
daemon binds a free one, so parallel stacks never race for a port); the
ports each daemon logs are read back into :attr:`LocalStack.ports` and
written into its configuration, so a restart comes back on the same ones.
With ``tap=True`` the KD reaches the MD through a
:class:`~perc_daemons.demo.tap.TunnelTap`, which records every byte the MD
was sent over the tunnel (:attr:`LocalStack.tap`; every MD's, extra ones
too, in :attr:`LocalStack.taps`).  ``settings`` adds configuration keys the stack
does not set itself (daemon -> section -> key -> value, e.g.
``{"kd": {"tunnel": {"liveness_interval": 0.5}}}``).
:meth:`LocalStack.start_kd_copy` runs a second perc-kd with the KD's
certificate, key and KMF client (a replacement KD, or someone holding a copy
of the KD's key).
``extra_mds=N`` adds N more perc-md processes, "md2" ... (``etc/md2.toml``,
its own ports in :attr:`LocalStack.md_ports`, its own certificate
``etc/tls/md2.crt`` from the site CA so that a cascade link between two MDs
pins one of them, not any; the MD's provider token is shared: one provider),
started after "md" and before the KD; :meth:`LocalStack.md_api_url` names
their conference APIs.  With ``static_mds`` the KD's ``[tunnel] mds`` lists
every MD (through its tap with ``tap=True``); without, the KD connects to
the MDs the KMF names for each conference, and no tap sees those tunnels.
``settings`` of "md" apply to "md" only: give "md2" its own.
``cluster=True`` makes the MDs one host's processes (md.toml ``[cluster]
processes``, md/cluster.py): their API ports are chosen before they start,
every MD lists all of them, and a join at any one is placed on the least
loaded.
``md_hosts`` puts MDs on hosts of their own (the e2e test of the three-host
layout, tests/e2e/test_cascade_hosts.py, runs them in network namespaces):
per MD name an :class:`MdHost`, the address it binds every listener to
(``[admin]``, ``[api]``, ``[tunnel]``, ``[media]`` bind and ``[media]
advertise``: the stack checks its /healthz from where it runs) and names in
its URLs and tunnel address (:meth:`LocalStack.md_api_url`,
:meth:`LocalStack.md_tunnel_address`), a certificate from the site CA naming
that address (``etc/tls/<name>-<address>.crt``), and the command its
``twistd`` is run under (e.g. ``ip netns exec NAME``).  Without it every MD
is on loopback and named ``localhost``.

Nothing here is fit for production: the CA key sits beside the certificates.
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import re
import secrets
import signal
import socket
import sys
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import treq
from argon2 import PasswordHasher
from twisted.internet import defer, error, ssl, task
from twisted.internet.protocol import ProcessProtocol
from twisted.web.client import Agent, HTTPConnectionPool, ResponseNeverReceived
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from perc_daemons.devpki import DevPki, Issued
from perc_daemons.kmf.auth.file import add_user
from perc_daemons.protocol import jsontext
from perc_daemons.protocol.dtls.crypto import certificate_fingerprint, format_fingerprint
from perc_daemons.site_setup import (
    ADMIN_CLIENT,
    KD_CLIENT,
    SetupOptions,
    setup,
)

TWISTD = "from twisted.scripts.twistd import run; run()"
DOMAIN = "localhost"
KD_NAME = "kd.localhost"
#: argon2id made cheap: the demo's users are throw-away.
CHEAP_HASH = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


class StackError(Exception):
    """A daemon did not start, stopped, or answered what it should not."""


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A currently free loopback port (TCP by default, ``socket.SOCK_DGRAM`` for UDP)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_line(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.readline().strip()


def _write_private(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def sleep(reactor: Any, seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


@implementer(IPolicyForHTTPS)
class TrustPolicy:
    """HTTPS to the stack: the dev CA as the only trust root, optional client certificate."""

    def __init__(self, ca_pem: bytes, client_pem: bytes | None = None) -> None:
        self._trust = ssl.Certificate.loadPEM(ca_pem)
        self._client = ssl.PrivateCertificate.loadPEM(client_pem) if client_pem else None

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        kwargs: dict[str, Any] = {"trustRoot": self._trust}
        if self._client is not None:
            kwargs["clientCertificate"] = self._client
        return ssl.optionsForClientTLS(hostname.decode("ascii"), **kwargs)


class Child(ProcessProtocol):
    """One daemon process: its output, and ``ended`` firing with (exit code, signal)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.output = bytearray()
        self.ended: defer.Deferred = defer.Deferred()
        self.running = True

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.running = False
        self.ended.callback((reason.value.exitCode, reason.value.signal))

    def text(self) -> str:
        return self.output.decode(errors="replace")


@dataclass
class Ports:
    """The daemons' ports: 0 until the daemon has started and logged the one it bound."""

    kmf_admin: int = 0
    kmf_https: int = 0
    kd_admin: int = 0
    md_admin: int = 0
    md_api: int = 0
    md_tunnel: int = 0
    md_media: int = 0


@dataclass
class MdPorts:
    """An extra MD's ports (``LocalStack(extra_mds=...)``), as :class:`Ports` has the first's."""

    admin: int = 0
    api: int = 0
    tunnel: int = 0
    media: int = 0


@dataclass(frozen=True)
class MdHost:
    """Where an MD runs off the stack's loopback (``LocalStack(md_hosts=...)``).

    ``address``: an IP address of that host, which the MD binds and
    advertises, its certificate names, and the stack and the KD reach it at;
    ``command``: what its ``twistd`` command line is prefixed with to run
    there (e.g. ``("ip", "netns", "exec", "perc-1-a")``; empty: run as is).
    """

    address: str
    command: tuple[str, ...] = ()

    @property
    def url_host(self) -> str:
        """The address as a URL's or ``host:port``'s host (an IPv6 one bracketed)."""
        return f"[{self.address}]" if ":" in self.address else self.address


#: Per daemon: Ports field -> the log line announcing it (the port is group 1).
_PORT_LINES = {
    "kmf": {"kmf_admin": r"perc-kmf admin HTTP listening on http://[^/]+:(\d+)/",
            "kmf_https": r"perc-kmf HTTPS API listening on https://[^/]+:(\d+)/"},
    "kd": {"kd_admin": r"perc-kd admin HTTP listening on http://[^/]+:(\d+)/"},
    "md": {"md_admin": r"perc-md admin HTTP listening on http://[^/]+:(\d+)/",
           "md_api": r"perc-md HTTPS conference API listening on https://[^/]+:(\d+)/",
           "md_media": r"perc-md media \(UDP\) listening on \S+?:(\d+),",
           "md_tunnel": r"perc-md tunnel listening on \S+ port (\d+) "},
}


class LocalStack:
    """See the module docstring.  ``users`` get ``password``; all are in ``DOMAIN``."""

    def __init__(self, directory: str, reactor: Any, *,
                 users: Iterable[str] = ("alice", "bob", "carol", "dave"),
                 password: str | None = None, tap: bool = False, static_mds: bool = True,
                 python: str = sys.executable, consent_timeout: int = 30,
                 settings: dict[str, dict[str, dict[str, Any]]] | None = None,
                 extra_mds: int = 0, cluster: bool = False,
                 md_hosts: Mapping[str, MdHost] | None = None) -> None:
        self.dir = os.path.abspath(directory)
        self.reactor = reactor
        self.python = python
        self.users = list(users)
        self.password = password or secrets.token_urlsafe(12)
        self.ports = Ports()
        #: The extra MDs ("md2", "md3", ...) and their ports, in start order.
        self.md_ports: dict[str, MdPorts] = {f"md{i}": MdPorts()
                                             for i in range(2, 2 + extra_mds)}
        self.cluster = cluster
        if cluster:  # each process lists every one's API URL: fixed before they start
            self.ports.md_api = free_port()
            for extra in self.md_ports.values():
                extra.api = free_port()
        #: MDs on hosts of their own (module docstring); the others are on loopback.
        self.md_hosts = dict(md_hosts or {})
        unknown = set(self.md_hosts) - {"md", *self.md_ports}
        if unknown:
            raise StackError(f"md_hosts names no MD of the stack: {sorted(unknown)}")
        if tap and "md" in self.md_hosts:
            raise StackError("the tunnel tap listens on loopback: no tap with md_hosts['md']")
        self.consent_timeout = consent_timeout
        self.settings = settings or {}
        self.copies: dict[str, int] = {}  # start_kd_copy label -> its admin port
        self.tap_enabled = tap
        self.static_mds = static_mds
        self.tap: Any = None
        #: MD name -> its TunnelTap (``tap=True``); ``tap`` is ``taps["md"]``.
        self.taps: dict[str, Any] = {}
        self.children: dict[str, Child] = {}
        self.earlier: list[Child] = []  # daemons that were restarted: their earlier runs
        self.kd_secret = self.admin_secret = self.provider_token = ""  # prepare() reads them
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self._admin_token: str | None = None

    # --- files ----------------------------------------------------------------------

    @property
    def kmf_url(self) -> str:
        return f"https://localhost:{self.ports.kmf_https}"

    @property
    def md_url(self) -> str:
        return self.md_api_url("md")

    @property
    def md_names(self) -> tuple[str, ...]:
        """Every MD of the stack: "md", then the extra ones ("md2", ...)."""
        return ("md", *self.md_ports)

    def md_host(self, name: str = "md") -> str:
        """How URLs and tunnel addresses name MD ``name``'s host: its :class:`MdHost`
        address, else ``localhost``."""
        host = self.md_hosts.get(name)
        return host.url_host if host is not None else "localhost"

    def md_api_url(self, name: str = "md") -> str:
        """The conference API of MD ``name`` ("md", "md2", ...)."""
        port = self.ports.md_api if name == "md" else self.md_ports[name].api
        return f"https://{self.md_host(name)}:{port}"

    def md_tunnel_port(self, name: str = "md") -> int:
        """The KD tunnel port of MD ``name``."""
        return self.ports.md_tunnel if name == "md" else self.md_ports[name].tunnel

    def md_tunnel_address(self, name: str = "md") -> str:
        """MD ``name``'s KD tunnel as ``host:port`` (what the KMF records, what the KD
        connects to)."""
        return f"{self.md_host(name)}:{self.md_tunnel_port(name)}"

    def identity(self, user: str) -> str:
        return f"{user}@{DOMAIN}"

    def prepare(self) -> None:
        """Write the site's files (``perc-admin setup``), state, users and the configs."""
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        etc = os.path.join(self.dir, "etc")
        os.makedirs(etc, mode=0o700, exist_ok=True)
        # What an admin runs first on a real host: CA, certificates, OAuth clients,
        # secrets (as the daemons' user: the current one).
        setup(SetupOptions(etc_dir=etc, user=pwd.getpwuid(os.geteuid()).pw_name,
                           domain=DOMAIN, host_names=("localhost",)))
        tls_dir = Path(etc, "tls")
        self.ca_path = str(tls_dir / "ca.crt")
        with open(self.ca_path, "rb") as f:
            self.ca_pem = f.read()
        self.kmf_cert, self.md_cert, self.kd_cert = (
            Issued(tls_dir / f"{name}.crt", tls_dir / f"{name}.key")
            for name in ("kmf", "md", "kd"))
        # Each extra MD its own certificate from the site CA (as perc-admin setup
        # would make on its own host): a cascade link pins one MD, not any of them.
        self.md_certs = {"md": self.md_cert}
        for name in self.md_ports:
            issued = Issued(tls_dir / f"{name}.crt", tls_dir / f"{name}.key")
            if not issued.certificate.exists() or not issued.private_key.exists():
                issued = DevPki(tls_dir).issue(name, ["localhost"], ["127.0.0.1", "::1"])
            self.md_certs[name] = issued
        # An MD on a host of its own: a certificate naming that host's address (the
        # KD, the endpoints and the provider reach it by that address).
        for name, host in self.md_hosts.items():
            label = f"{name}-{host.address}"
            issued = Issued(tls_dir / f"{label}.crt", tls_dir / f"{label}.key")
            if not issued.certificate.exists() or not issued.private_key.exists():
                issued = DevPki(tls_dir).issue(label, [], [host.address])
            self.md_certs[name] = issued
        kd_der = ssl.Certificate.loadPEM(self.kd_cert.certificate.read_bytes()).dump()
        self.kd_fingerprint = certificate_fingerprint(kd_der)
        self.kd_secret = _first_line(os.path.join(etc, "kd-client.secret"))
        self.admin_secret = _first_line(os.path.join(etc, "admin-client.secret"))
        self.provider_token = _first_line(os.path.join(etc, "md-provider.token"))
        kmf = os.path.join(self.dir, "kmf")
        os.makedirs(kmf, mode=0o700, exist_ok=True)
        users_file = os.path.join(kmf, "users.jsonl")
        if not os.path.exists(users_file):
            for user in self.users:
                add_user(users_file, user, self.password, hasher=CHEAP_HASH)
        self._files = {"kmf": kmf, "clients": os.path.join(etc, "kmf-clients.toml"),
                       "users": users_file,
                       "provider_token": os.path.join(etc, "md-provider.token"),
                       "kd_secret": os.path.join(etc, "kd-client.secret")}
        self.configs = {name: os.path.join(etc, f"{name}.toml")
                        for name in ("kmf", "md", "kd", *self.md_ports)}

    def _render(self, name: str) -> str:
        """``<name>.toml`` with the ports known so far (0: the daemon picks one)."""
        p, f = self.ports, self._files
        if name == "kmf":
            return (f'[admin]\nbind = "127.0.0.1"\nport = {p.kmf_admin}\n'
                    f'[https]\nbind = "127.0.0.1"\nport = {p.kmf_https}\n'
                    f'certificate = "{self.kmf_cert.certificate}"\n'
                    f'private_key = "{self.kmf_cert.private_key}"\n'
                    f'[idp]\ndomain = "{DOMAIN}"\n'
                    f'[store]\nsqlite_path = "{f["kmf"]}/kmf.sqlite3"\n'
                    f'[keys]\nkek_file = "{f["kmf"]}/kmf.kek"\n'
                    f'signing_dir = "{f["kmf"]}/signing"\n'
                    f'[oauth]\nclients_file = "{f["clients"]}"\n'
                    f'[auth]\nusers_file = "{f["users"]}"\n')
        if name == "md":
            return self._render_md(name, MdPorts(p.md_admin, p.md_api, p.md_tunnel,
                                                 p.md_media), self.md_certs["md"])
        if name in self.md_ports:
            return self._render_md(name, self.md_ports[name], self.md_certs[name])
        if not p.md_tunnel or not p.kmf_https:
            raise StackError("perc-kd is started after perc-kmf and perc-md")
        # static_mds=False: the KD learns its MDs from the KMF, per conference
        tunnels = [f"localhost:{self.taps[md].port}" if md in self.taps
                   else self.md_tunnel_address(md) for md in self.md_names]
        mds = json.dumps(tunnels if self.static_mds else [])
        return (f'[admin]\nbind = "127.0.0.1"\nport = {p.kd_admin}\n'
                f'[tunnel]\nmds = {mds}\n'
                f'certificate = "{self.kd_cert.certificate}"\n'
                f'private_key = "{self.kd_cert.private_key}"\n'
                f'ca_file = "{self.ca_path}"\n'
                f'[kmf]\nurl = "{self.kmf_url}"\nca_file = "{self.ca_path}"\n'
                f'client_id = "{KD_CLIENT}"\n'
                f'client_secret_file = "{f["kd_secret"]}"\n'
                f'[idp]\ndomain = "{DOMAIN}"\n')

    def _render_md(self, name: str, p: MdPorts, cert: Issued) -> str:
        """MD ``name``'s ``.toml``: ports ``p``, ``cert`` for its API, tunnel and links,
        its state file (conferences and links kept across a restart) in the stack dir;
        on a host of its own (:class:`MdHost`) every listener on that address."""
        host = self.md_hosts.get(name)
        bind = host.address if host is not None else "127.0.0.1"
        advertise = f'advertise = "{host.address}"\n' if host is not None else ""
        return (f'[admin]\nbind = "{bind}"\nport = {p.admin}\n'
                f'[api]\nbind = "{bind}"\nport = {p.api}\n'
                f'certificate = "{cert.certificate}"\n'
                f'private_key = "{cert.private_key}"\n'
                f'provider_token_file = "{self._files["provider_token"]}"\n'
                f'[media]\nbind = "{bind}"\nport = {p.media}\n{advertise}'
                f'consent_timeout = {self.consent_timeout}\n'
                f'[tunnel]\nbind = "{bind}"\nport = {p.tunnel}\n'
                f'kd_fingerprints = ["{format_fingerprint(self.kd_fingerprint)}"]\n'
                f'[state]\nfile = "{os.path.join(self.dir, name + "-state.json")}"\n'
                + (f'[cluster]\nprocesses = {json.dumps(self._process_urls())}\n'
                   f'ca_file = "{self.ca_path}"\n' if self.cluster else ""))

    def _process_urls(self) -> list[str]:
        return [self.md_api_url(md) for md in self.md_names]

    def _with_settings(self, name: str, text: str) -> str:
        """``text`` with the :attr:`settings` of daemon ``name`` added to their sections."""
        for section, values in self.settings.get(name, {}).items():
            lines = "".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items())
            header = f"[{section}]\n"
            if header in text:
                text = text.replace(header, header + lines, 1)
            else:
                text += header + lines
        return text

    def _write_config(self, name: str) -> None:
        with open(self.configs[name], "w", encoding="utf-8") as f:
            f.write(self._with_settings(name, self._render(name)))

    def _learn_ports(self, name: str, child: Child) -> bool:
        """Read the ports ``child`` logged into :attr:`ports` (an extra MD's into
        :attr:`md_ports`); True once all are known."""
        text = child.text()
        ports: Any = self.ports
        lines = _PORT_LINES.get(name)
        if name in self.md_ports:
            ports = self.md_ports[name]
            lines = {key.removeprefix("md_"): pattern
                     for key, pattern in _PORT_LINES["md"].items()}
        assert lines is not None, name
        for field_name, pattern in lines.items():
            if not getattr(ports, field_name):
                match = re.search(pattern, text)
                if match is None:
                    return False
                setattr(ports, field_name, int(match.group(1)))
        return True

    # --- processes ------------------------------------------------------------------

    def admin_host(self, name: str) -> str:
        """The address daemon ``name``'s admin listener is bound to."""
        host = self.md_hosts.get(name)
        return host.url_host if host is not None else "127.0.0.1"

    def admin_port(self, name: str) -> int:
        if name in self.copies:
            return self.copies[name]
        if name in self.md_ports:
            return self.md_ports[name].admin
        return {"kmf": self.ports.kmf_admin, "kd": self.ports.kd_admin,
                "md": self.ports.md_admin}[name]

    def start(self, name: str) -> defer.Deferred:
        """Spawn ``perc-<name>`` and wait until its /healthz answers 200."""
        self._write_config(name)  # ports learnt at the first start are kept for restarts
        daemon = "md" if name in self.md_ports else name
        d = self._spawn(name, daemon, self.configs[name], lambda child: self._learn_ports(
            name, child))

        def written(child: Child) -> Child:
            self._write_config(name)  # the file says where it listens (perc-admin doctor)
            return child
        return d.addCallback(written)

    def start_kd_copy(self, label: str = "kd-copy") -> defer.Deferred:
        """Another perc-kd with this KD's certificate, key and KMF client, connecting
        straight to the MD's tunnel port: ``children[label]`` (stop it with ``stop(label)``).

        What the MD sees is a second connection with the pinned KD certificate: a
        replacement KD, or someone holding a copy of the KD's key.
        """
        config = os.path.join(self.dir, f"{label}.toml")
        text = self._with_settings("kd", self._render("kd"))
        text = re.sub(r"(\[admin\]\nbind = \S+\nport = )\d+", r"\g<1>0", text, count=1)
        text = re.sub(r'mds = \[[^\]\n]*\]',
                      f'mds = ["{self.md_tunnel_address("md")}"]', text, count=1)
        with open(config, "w", encoding="utf-8") as f:
            f.write(text)
        self.copies[label] = 0

        def learn(child: Child) -> bool:
            match = re.search(_PORT_LINES["kd"]["kd_admin"], child.text())
            if match is not None:
                self.copies[label] = int(match.group(1))
            return match is not None

        return self._spawn(label, "kd", config, learn)

    @defer.inlineCallbacks
    def _spawn(self, name: str, daemon: str, config: str, learn: Any):
        """Run ``twistd perc-<daemon> --config <config>`` as ``children[name]``; wait for
        ``learn(child)`` (its ports logged) and its /healthz."""
        if name in self.children and self.children[name].running:
            raise StackError(f"perc-{name} is already running")
        if name in self.children:  # a restart: keep the earlier run's output for logs()
            self.earlier.append(self.children[name])
        child = Child(name)
        self.children[name] = child
        rundir = os.path.join(self.dir, f"run-{name}")
        os.makedirs(rundir, exist_ok=True)
        repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        pythonpath = os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, PYTHONPATH=pythonpath, PYTHONUNBUFFERED="1")
        host = self.md_hosts.get(name)
        argv = [*(host.command if host is not None else ()), self.python, "-c", TWISTD,
                "--nodaemon", "--pidfile=", f"perc-{daemon}", "--config", config]
        self.reactor.spawnProcess(child, argv[0], argv, env=env, path=rundir)
        deadline = self.reactor.seconds() + START_TIMEOUT
        while True:
            if not child.running:
                raise StackError(f"perc-{name} exited during start-up:\n{child.text()}")
            if learn(child):
                url = f"http://{self.admin_host(name)}:{self.admin_port(name)}/healthz"
                try:
                    response = yield treq.get(url, pool=self.pool, timeout=2)
                    yield treq.content(response)
                    if response.code == 200:
                        return child
                except (error.ConnectError, error.TimeoutError, defer.CancelledError,
                        ResponseNeverReceived):
                    pass
            if self.reactor.seconds() > deadline:
                raise StackError(f"perc-{name} not healthy within {START_TIMEOUT:.0f} s:\n"
                                 f"{child.text()}")
            yield sleep(self.reactor, 0.05)

    @defer.inlineCallbacks
    def start_all(self):
        """KMF, MD (and the tap), the extra MDs, then KD; fires when the KD's tunnel
        to the MD is up."""
        yield self.start("kmf")
        yield self.start("md")
        for name in self.md_ports:
            yield self.start(name)
        if self.tap_enabled and not self.taps:
            from perc_daemons.demo.tap import TunnelTap

            for name in self.md_names:  # each tap shows the KD its MD's certificate
                cert = self.md_certs[name]
                tap = self.taps[name] = TunnelTap(
                    self.reactor, upstream_port=self.md_tunnel_port(name), ca_pem=self.ca_pem,
                    server_pem=cert.certificate.read_bytes() + cert.private_key.read_bytes(),
                    client_pem=(self.kd_cert.certificate.read_bytes()
                                + self.kd_cert.private_key.read_bytes()))
                tap.listen()
            self.tap = self.taps["md"]
        yield self.start("kd")

    @defer.inlineCallbacks
    def stop(self, name: str, sig: int = signal.SIGTERM):
        """Signal the daemon and wait for it; fires with (exit code, signal)."""
        child = self.children.get(name)
        if child is None or not child.running:
            return None
        try:
            child.transport.signalProcess({signal.SIGTERM: "TERM",
                                           signal.SIGKILL: "KILL"}.get(sig, sig))
        except error.ProcessExitedAlready:
            pass
        timeout = self.reactor.callLater(STOP_TIMEOUT, self._kill, child)
        result = yield child.ended
        if timeout.active():
            timeout.cancel()
        return result

    @defer.inlineCallbacks
    def restart(self, name: str, sig: int = signal.SIGTERM):
        """:meth:`stop` then :meth:`start` again: same configuration, ports and state."""
        yield self.stop(name, sig)
        child = yield self.start(name)
        return child

    def _kill(self, child: Child) -> None:
        if child.running:
            try:
                child.transport.signalProcess("KILL")
            except error.ProcessExitedAlready:
                pass

    @defer.inlineCallbacks
    def stop_all(self):
        """Stop every daemon (KDs first) and the tap; close HTTP connections."""
        for name in ("kd", *self.copies, *reversed(self.md_ports), "md", "kmf"):
            yield self.stop(name)
        for tap in self.taps.values():
            yield tap.close()
        yield self.pool.closeCachedConnections()

    # --- HTTPS ----------------------------------------------------------------------

    @defer.inlineCallbacks
    def request(self, method: str, url: str, *, token: str | None = None,
                body: Any = None, form: dict[str, str] | None = None,
                basic: tuple[str, str] | None = None, timeout: float = 10.0):
        """One HTTPS request to the stack; fires with (status, parsed JSON or bytes)."""
        agent = Agent(self.reactor, contextFactory=TrustPolicy(self.ca_pem), pool=self.pool)
        headers: dict[str, str] = {}
        data = None
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if basic is not None:
            q = urllib.parse.quote_plus
            raw = f"{q(basic[0])}:{q(basic[1])}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()
        if form is not None:
            data = urllib.parse.urlencode(form).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        elif body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        response = yield treq.request(method, url, headers=headers, data=data, agent=agent,
                                      timeout=timeout, allow_redirects=False)
        content = yield treq.content(response)
        kind = (response.headers.getRawHeaders("content-type") or [""])[0]
        parsed: Any = content
        if "json" in kind and content:
            parsed = jsontext.loads(content)
        return response.code, parsed

    @defer.inlineCallbacks
    def _expect(self, status: int, method: str, url: str, **kwargs: Any):
        code, body = yield self.request(method, url, **kwargs)
        if code != status:
            raise StackError(f"{method} {url}: {code} (expected {status}): {body!r:.500}")
        return body

    @defer.inlineCallbacks
    def admin_token(self):
        if self._admin_token is None:
            body = yield self._expect(200, "POST", self.kmf_url + "/oauth/token",
                                      form={"grant_type": "client_credentials",
                                            "scope": "admin"},
                                      basic=(ADMIN_CLIENT, self.admin_secret))
            self._admin_token = body["access_token"]
        return self._admin_token

    @defer.inlineCallbacks
    def create_conference(self, conference_id: str, invited: Sequence[str], *,
                          late_joiners_get_earlier_epochs: bool = False,
                          md_settings: Mapping[str, Any] | None = None, at_md: bool = True,
                          policy: Mapping[str, Any] | None = None):
        """At the KMF (create, invite, start) and at the MD (with the KD fingerprint and
        ``md_settings``, as :meth:`create_md_conference`); ``at_md`` False: the KMF part
        alone (the MD part left to e.g. ``perc-provider conferences create``); ``policy``:
        more members of the KMF's create body (``starts_at``, ``rekey_interval``, ...)."""
        token = yield self.admin_token()
        yield self._expect(201, "POST", self.kmf_url + "/v1/conferences", token=token, body={
            "id": conference_id, "title": f"demo {conference_id}",
            "initiator": self.identity(invited[0]),
            "invited": [self.identity(u) for u in invited],
            "late_joiners_get_earlier_epochs": late_joiners_get_earlier_epochs,
            **(policy or {})})
        yield self._expect(200, "POST", self.kmf_url + f"/v1/conferences/{conference_id}/start",
                           token=token)
        if not at_md:
            return None
        md = yield self.create_md_conference(conference_id, settings=md_settings)
        return md

    @defer.inlineCallbacks
    def create_md_conference(self, conference_id: str, md: str = "md", *,
                             settings: Mapping[str, Any] | None = None):
        """The MD part of :meth:`create_conference` alone (e.g. after an MD restart), at
        MD ``md``; ``settings`` are the conference's forwarding members (``forwarding``,
        ``last_n``, ``audio_levels``, ``audio_top_k``: docs/API.md)."""
        body = yield self._expect(201, "POST", self.md_api_url(md) + "/v1/conferences",
                                token=self.provider_token,
                                body={"id": conference_id,
                                      "kd_fingerprint": format_fingerprint(self.kd_fingerprint),
                                      **(settings or {})})
        return body

    @defer.inlineCallbacks
    def end_conference(self, conference_id: str):
        token = yield self.admin_token()
        yield self._expect(200, "POST", self.kmf_url + f"/v1/conferences/{conference_id}/end",
                           token=token)

    @defer.inlineCallbacks
    def md_conference(self, conference_id: str, md: str = "md"):
        """The conference at MD ``md`` (its participants, whether the KD is connected)."""
        body = yield self._expect(200, "GET",
                                  self.md_api_url(md) + f"/v1/conferences/{conference_id}",
                                  token=self.provider_token)
        return body

    @defer.inlineCallbacks
    def md_links(self, conference_id: str, md: str = "md"):
        """The conference's cascade links at MD ``md`` (state, counters)."""
        body = yield self._expect(200, "GET",
                                  self.md_api_url(md) + f"/v1/conferences/{conference_id}/links",
                                  token=self.provider_token)
        return list(body["links"])

    @defer.inlineCallbacks
    def md_info(self, md: str = "md"):
        """``GET /v1/md`` of MD ``md``: its fingerprint, media and tunnel addresses."""
        body = yield self._expect(200, "GET", self.md_api_url(md) + "/v1/md",
                                  token=self.provider_token)
        return body

    @defer.inlineCallbacks
    def wait_for_kd(self, conference_id: str, timeout: float = 20.0, md: str = "md"):
        """Until MD ``md`` reports the conference's KD tunnel connected."""
        deadline = self.reactor.seconds() + timeout
        while True:
            body = yield self.md_conference(conference_id, md)
            if body.get("kd_connected"):
                return body
            if self.reactor.seconds() > deadline:
                raise StackError(f"the KD did not connect to {md} within {timeout:.0f} s:\n"
                                 + self.logs())
            yield sleep(self.reactor, 0.05)

    def logs(self) -> str:
        earlier = [f"--- perc-{child.name} (earlier run) ---\n{child.text()}"
                   for child in self.earlier]
        return "\n".join(earlier + [f"--- perc-{name} ---\n{child.text()}"
                                     for name, child in self.children.items()])
