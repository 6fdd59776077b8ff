"""The three daemons as real twistd processes: start, /healthz, SIGHUP, SIGTERM; bad configs."""

from __future__ import annotations

import os
import signal
import socket
import sys

import treq
from twisted.internet import defer, error, reactor, ssl, task
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TWISTD = "from twisted.scripts.twistd import run; run()"
START_TIMEOUT = 20.0
EXIT_TIMEOUT = 10.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_error(failure):
    """gatherResults fails with FirstError: report the failure inside it."""
    failure.trap(defer.FirstError)
    return failure.value.subFailure


class Daemon(ProcessProtocol):
    """Collects a child's output; ``ended`` fires with (exit code, signal)."""

    def __init__(self) -> None:
        self.stdout = b""
        self.stderr = b""
        self.ended: defer.Deferred = defer.Deferred()
        self.running = True

    def outReceived(self, data: bytes) -> None:
        self.stdout += data

    def errReceived(self, data: bytes) -> None:
        self.stderr += data

    def processEnded(self, reason) -> None:
        self.running = False
        self.ended.callback((reason.value.exitCode, reason.value.signal))

    def output(self) -> str:
        return (self.stdout + self.stderr).decode(errors="replace")


class DaemonTestBase(unittest.TestCase):
    """Spawning and watching daemons (no tests of its own)."""

    timeout = 60

    def setUp(self) -> None:
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.pool.closeCachedConnections)

    def write_config(self, text: str) -> str:
        path = os.path.abspath(self.mktemp()) + ".toml"
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def spawn(self, plugin: str, config_path: str) -> Daemon:
        proto = Daemon()
        env = dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
        rundir = os.path.abspath(self.mktemp())
        os.mkdir(rundir)
        transport = reactor.spawnProcess(
            proto, sys.executable,
            [sys.executable, "-c", TWISTD, "--nodaemon", "--pidfile=", plugin,
             "--config", config_path],
            env=env, path=rundir,
        )
        self.addCleanup(self.kill, proto, transport)
        return proto

    @defer.inlineCallbacks
    def kill(self, proto: Daemon, transport):
        if proto.running:
            try:
                transport.signalProcess("KILL")
            except error.ProcessExitedAlready:
                pass
            yield proto.ended

    def wait_exit(self, proto: Daemon) -> defer.Deferred:
        d = defer.Deferred()
        proto.ended.addCallback(lambda result: d.callback(result) if not d.called else None)
        return d.addTimeout(EXIT_TIMEOUT, reactor)

    @defer.inlineCallbacks
    def get(self, url: str):
        response = yield treq.get(url, pool=self.pool, timeout=2)
        body = yield treq.content(response)
        return response.code, body

    @defer.inlineCallbacks
    def wait_healthy(self, proto: Daemon, port: int):
        url = f"http://127.0.0.1:{port}/healthz"
        deadline = reactor.seconds() + START_TIMEOUT
        while True:
            if not proto.running:
                self.fail(f"daemon exited before serving /healthz:\n{proto.output()}")
            try:
                code, body = yield self.get(url)
            except (error.ConnectError, error.TimeoutError, defer.CancelledError):
                code = None
            if code == 200:
                return body
            if reactor.seconds() > deadline:
                self.fail(f"/healthz not 200 within {START_TIMEOUT}s (last {code}):\n"
                          f"{proto.output()}")
            yield task.deferLater(reactor, 0.1, lambda: None)

    def extra_config(self, daemon: str) -> str:
        """What a daemon needs beyond [admin] to start in a test (state in a temp dir)."""
        if daemon == "md":
            # As the package's postinst does: a self-signed certificate when none exists.
            from perc_daemons.tls import generate_self_signed

            state = os.path.abspath(self.mktemp())
            generate_self_signed(f"{state}/md.crt", f"{state}/md.key")
            return (f'\n[api]\nbind = "127.0.0.1"\nport = 0\n'
                    f'certificate = "{state}/md.crt"\nprivate_key = "{state}/md.key"\n'
                    f'provider_token_file = "{state}/md-provider.token"\n'
                    f'[media]\nbind = "127.0.0.1"\nport = 0\n'
                    f'[tunnel]\nbind = "127.0.0.1"\nport = 0\n'
                    f'[state]\nfile = "{state}/md-state.json"\n')
        if daemon != "kmf":
            return ""
        state = os.path.abspath(self.mktemp())
        return (f'\n[https]\nbind = "127.0.0.1"\nport = {free_port()}\n'
                f'certificate = "{state}/tls/kmf.crt"\nprivate_key = "{state}/tls/kmf.key"\n'
                f'dev_self_signed = true\n'
                f'[store]\nsqlite_path = "{state}/kmf.sqlite3"\n'
                f'[keys]\nkek_file = "{state}/kmf.kek"\nsigning_dir = "{state}/signing"\n')

    @defer.inlineCallbacks
    def lifecycle(self, daemon: str):
        plugin = f"perc-{daemon}"
        port = free_port()
        extra = self.extra_config(daemon)
        path = self.write_config(f'[admin]\nbind = "127.0.0.1"\nport = {port}\n' + extra)
        proto = self.spawn(plugin, path)
        body = yield self.wait_healthy(proto, port)
        self.assertEqual(
            body, b'{"status": "ok", "daemon": "%s", "version": "0.1.0"}\n' % plugin.encode())
        code, metrics = yield self.get(f"http://127.0.0.1:{port}/metrics")
        self.assertEqual(code, 200)
        self.assertIn(b'perc_build_info{daemon="%s",version="0.1.0"} 1.0\n' % plugin.encode(),
                      metrics)
        if daemon == "kmf":
            https_port = int(extra.split("port = ")[1].split("\n")[0])
            yield self.wait_output(
                proto, f"perc-kmf HTTPS API listening on https://127.0.0.1:{https_port}/")
        if daemon == "md":
            for line in ("perc-md HTTPS conference API listening on https://127.0.0.1:",
                         "perc-md media (UDP) listening on 127.0.0.1:",
                         "perc-md tunnel listening on 127.0.0.1 port "):
                yield self.wait_output(proto, line)
        yield self.reloads(proto, path, port, extra)
        os.kill(proto.transport.pid, signal.SIGTERM)
        exit_code, sig = yield self.wait_exit(proto)
        output = proto.output()
        # After a clean shutdown twistd re-raises the signal that stopped it
        # (twisted.application.app._exitWithSignal), so the status is "killed
        # by SIGTERM", which systemd counts as a clean stop; never a crash code.
        self.assertEqual((exit_code, sig), (None, signal.SIGTERM), output)
        self.assertIn(
            f"{plugin} admin HTTP listening on http://127.0.0.1:{port}/ (/healthz, /metrics)",
            output)
        self.assertIn("Received SIGTERM, shutting down.", output)
        self.assertIn("Server Shut Down", output)
        self.assertNotIn("Traceback", output)
        self.assertEqual(proto.stderr, b"")

    @defer.inlineCallbacks
    def wait_output(self, proto: Daemon, text: str):
        deadline = reactor.seconds() + EXIT_TIMEOUT
        while text not in proto.output():
            if not proto.running or reactor.seconds() > deadline:
                self.fail(f"{text!r} not logged:\n{proto.output()}")
            yield task.deferLater(reactor, 0.05, lambda: None)

    @defer.inlineCallbacks
    def reloads(self, proto: Daemon, path: str, port: int, extra: str = ""):
        """SIGHUP (systemctl reload) re-checks the file and never stops the daemon."""
        os.kill(proto.transport.pid, signal.SIGHUP)
        yield self.wait_output(proto, f"reload: {path} is valid and unchanged")
        with open(path, "w", encoding="utf-8") as f:
            f.write("[admin]\nport = 'x'\n" + extra)
        os.kill(proto.transport.pid, signal.SIGHUP)
        yield self.wait_output(
            proto, f"reload refused, keeping the running configuration: {path}: admin.port: "
            "must be an integer, not str")
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"[admin]\nport = {port + 1 if port < 65535 else port - 1}\n" + extra)
        os.kill(proto.transport.pid, signal.SIGHUP)
        yield self.wait_output(proto, f"{path} changed admin.port; these take effect when the "
                               "daemon is restarted")
        yield self.wait_healthy(proto, port)  # still serving on the running port


class DaemonTests(DaemonTestBase):
    def test_lifecycle_all_daemons(self):
        """perc-md, perc-kd and perc-kmf, started concurrently."""
        return defer.gatherResults(
            [self.lifecycle(d) for d in ("md", "kd", "kmf")], consumeErrors=True,
        ).addErrback(first_error)

    @defer.inlineCallbacks
    def test_kmf_reload_takes_the_client_registry(self):
        """systemctl reload perc-kmf: clients added and removed in kmf-clients.toml take
        effect at once; a broken file keeps those in use."""
        from perc_daemons.kmf.clients import hash_client_secret, new_client_secret

        secrets_ = {name: new_client_secret() for name in ("ops-a", "ops-b")}

        def clients_file(*names: str) -> str:
            return "".join(f'[client.{n}]\ntype = "confidential"\n'
                           f'secret_hash = "{hash_client_secret(secrets_[n])}"\n'
                           'grant_types = ["client_credentials"]\nscopes = ["admin"]\n'
                           for n in names)

        clients = os.path.abspath(self.mktemp())
        with open(clients, "w") as f:
            f.write(clients_file("ops-a"))
        os.chmod(clients, 0o600)
        port = free_port()
        extra = self.extra_config("kmf") + f'[oauth]\nclients_file = "{clients}"\n'
        https_port = int(extra.split("port = ")[1].split("\n")[0])
        proto = self.spawn("perc-kmf", self.write_config(
            f'[admin]\nbind = "127.0.0.1"\nport = {port}\n' + extra))
        yield self.wait_healthy(proto, port)
        yield self.wait_output(proto, "perc-kmf HTTPS API listening")
        agent = self.agent_trusting(extra.split('certificate = "')[1].split('"')[0])

        @defer.inlineCallbacks
        def token_status(name: str):
            response = yield treq.post(
                f"https://127.0.0.1:{https_port}/oauth/token",
                data={"grant_type": "client_credentials", "scope": "admin"},
                auth=(name, secrets_[name]), timeout=5,
                agent=agent)
            yield treq.content(response)
            return response.code

        self.assertEqual([(yield token_status("ops-a")), (yield token_status("ops-b"))],
                         [200, 401])
        with open(clients, "w") as f:
            f.write(clients_file("ops-b"))
        os.kill(proto.transport.pid, signal.SIGHUP)
        yield self.wait_output(proto, f"OAuth clients reloaded from {clients}: 1 client(s); "
                                      "added ops-b, removed ops-a, changed none")
        self.assertEqual([(yield token_status("ops-a")), (yield token_status("ops-b"))],
                         [401, 200])
        with open(clients, "w") as f:
            f.write("[client.broken]\ntype = 'nonsense'\n")
        os.kill(proto.transport.pid, signal.SIGHUP)
        yield self.wait_output(proto, "OAuth clients not reloaded, keeping the 1 in use")
        self.assertEqual((yield token_status("ops-b")), 200)

    def agent_trusting(self, certificate: str):
        """An HTTPS agent trusting exactly ``certificate`` (the KMF's self-signed one)."""
        from twisted.web.client import Agent, BrowserLikePolicyForHTTPS

        with open(certificate, "rb") as f:
            root = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(f.read())])
        return Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(root), pool=self.pool)

    @defer.inlineCallbacks
    def config_error(self, plugin: str, path: str, expected_line: str):
        proto = self.spawn(plugin, path)
        exit_code, sig = yield self.wait_exit(proto)
        self.assertEqual((exit_code, sig), (2, None), proto.output())
        self.assertEqual(proto.stderr.decode(), expected_line + "\n")
        self.assertNotIn("Traceback", proto.output())
        self.assertEqual(proto.stdout, b"")

    def test_config_errors(self):
        """Bad type, unknown key and missing file: one line on stderr, exit status 2."""
        bad_type = self.write_config('[admin]\nport = "x"\n')
        unknown = self.write_config("[admin]\nport = 0\nprot = 1\n")
        missing = os.path.abspath(self.mktemp()) + ".toml"
        return defer.gatherResults([
            self.config_error(
                "perc-md", bad_type,
                f"perc-md: configuration error: {bad_type}: admin.port: "
                "must be an integer, not str"),
            self.config_error(
                "perc-kd", unknown,
                f"perc-kd: configuration error: {unknown}: admin.prot: "
                "unknown key (known: bind, port)"),
            self.config_error(
                "perc-kmf", missing,
                f"perc-kmf: configuration error: {missing}: file not found"),
        ], consumeErrors=True).addErrback(first_error)

    def test_kmf_file_errors(self):
        """perc-kmf: a missing certificate (no dev_self_signed) or an open key stops it."""
        state = os.path.abspath(self.mktemp())
        os.makedirs(state)
        cert, key = f"{state}/kmf.crt", f"{state}/kmf.key"
        missing = self.write_config(f'[https]\ncertificate = "{cert}"\nprivate_key = "{key}"\n')
        from perc_daemons.tls import generate_self_signed

        open_state = os.path.abspath(self.mktemp())
        generate_self_signed(f"{open_state}/kmf.crt", f"{open_state}/kmf.key")
        os.chmod(f"{open_state}/kmf.key", 0o644)
        too_open = self.write_config(
            f'[https]\ncertificate = "{open_state}/kmf.crt"\n'
            f'private_key = "{open_state}/kmf.key"\n')
        return defer.gatherResults([
            self.config_error(
                "perc-kmf", missing,
                f"perc-kmf: configuration error: {missing}: https.certificate: "
                f"{cert}: file not found"),
            self.config_error(
                "perc-kmf", too_open,
                f"perc-kmf: configuration error: {too_open}: https.private_key: "
                f"{open_state}/kmf.key: mode 0644 is too open: it must be 0600 or 0640 "
                f"(chmod 0600 {open_state}/kmf.key)"),
        ], consumeErrors=True).addErrback(first_error)

    def assert_cannot_listen(self, output: str, port: int, setting: str, config: str) -> None:
        """One line naming the address, the setting and the reason; no traceback."""
        lines = [line for line in output.splitlines() if "cannot listen" in line]
        self.assertEqual(len(lines), 1, output)
        self.assertIn(f"cannot listen on 127.0.0.1:{port} ({setting} in {config}): "
                      "Address already in use", lines[0])
        self.assertIn("exiting with status 3", lines[0])
        self.assertNotIn("Traceback", output)
        self.assertNotIn("CannotListenError", output)

    @defer.inlineCallbacks
    def test_admin_port_in_use(self):
        """A taken admin port stops start-up, status 3 (not restarted by the units)."""
        taken = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(taken.stopListening)
        port = taken.getHost().port
        config = self.write_config(f"[admin]\nport = {port}\n" + self.extra_config("md"))
        proto = self.spawn("perc-md", config)
        exit_code, sig = yield self.wait_exit(proto)
        self.assertEqual((exit_code, sig), (3, None), proto.output())
        self.assert_cannot_listen(proto.output(), port,
                                  f"[admin] bind = '127.0.0.1', port = {port}", config)

    @defer.inlineCallbacks
    def test_api_port_in_use(self):
        """The same for a listener after the admin one (the MD's HTTPS API)."""
        taken = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(taken.stopListening)
        port = taken.getHost().port
        extra = self.extra_config("md").replace('[api]\nbind = "127.0.0.1"\nport = 0\n',
                                                f'[api]\nbind = "127.0.0.1"\nport = {port}\n')
        config = self.write_config(f"[admin]\nport = {free_port()}\n" + extra)
        proto = self.spawn("perc-md", config)
        exit_code, sig = yield self.wait_exit(proto)
        self.assertEqual((exit_code, sig), (3, None), proto.output())
        self.assert_cannot_listen(proto.output(), port,
                                  f"[api] bind = '127.0.0.1', port = {port}", config)


class _Client(Protocol):
    """A TCP or TLS client recording what it got and when the server closed it."""

    def __init__(self) -> None:
        self.data = b""
        self.lost: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason=None) -> None:
        self.lost.callback(None)


class ConnectionLimitTests(DaemonTestBase):
    """perc-md's HTTPS API with short [connections] limits, against hand-written clients."""

    @defer.inlineCallbacks
    def test_md_api_closes_silent_and_idle_connections(self):
        admin = free_port()
        path = self.write_config(
            f'[admin]\nbind = "127.0.0.1"\nport = {admin}\n'
            "[connections]\nhandshake_timeout = 0.5\nidle_timeout = 1.0\n"
            + self.extra_config("md"))
        proto = self.spawn("perc-md", path)
        yield self.wait_healthy(proto, admin)
        line = "perc-md HTTPS conference API listening on https://127.0.0.1:"
        yield self.wait_output(proto, line)
        api = int(proto.output().split(line)[1].split("/")[0])
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", api)

        # Connects and never sends a ClientHello: closed by the handshake timeout.
        silent = yield endpoint.connect(Factory.forProtocol(_Client))
        yield silent.lost.addTimeout(EXIT_TIMEOUT, reactor)
        self.assertEqual(silent.data, b"")
        _, metrics = yield self.get(f"http://127.0.0.1:{admin}/metrics")
        self.assertIn(b'perc_connections_closed_total{listener="md-api",'
                      b'reason="handshake_timeout"} 1.0', metrics)

        # A real HTTPS client is served, then closed once idle (keep-alive).
        tls_endpoint = wrapClientTLS(ssl.CertificateOptions(), endpoint)  # self-signed MD
        client = yield tls_endpoint.connect(Factory.forProtocol(_Client))
        client.transport.write(b"GET /v1/conferences HTTP/1.1\r\nHost: localhost\r\n\r\n")
        yield client.lost.addTimeout(EXIT_TIMEOUT, reactor)
        self.assertTrue(client.data.startswith(b"HTTP/1.1 "), client.data[:100])
        self.assertEqual(client.data.count(b"HTTP/1.1 "), 1)
        self.assertNotIn("Traceback", proto.output())
