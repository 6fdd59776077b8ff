"""Type=notify for real: each daemon as a twistd process under an emulated systemd.

The test binds the ``$NOTIFY_SOCKET`` datagram socket (abstract and path
forms), with SO_PASSCRED so that each message's sender PID is known (the
units' NotifyAccess=main: only the twistd process counts), and checks:
READY=1 comes once the listeners are bound (connected to, or found taken,
the moment READY arrives), STATUS= names them, WATCHDOG=1 every half
``$WATCHDOG_USEC``, STOPPING=1 on SIGTERM; the KD sends no READY while its
KMF cannot be reached, and does once it can.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import struct
import sys
import tempfile
import uuid

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from perc_daemons.demo.stack import LocalStack, free_port
from tests.e2e.test_daemons import REPO, TWISTD, Daemon, DaemonTestBase

#: WATCHDOG_USEC given to the daemons: WATCHDOG=1 expected every 0.2 s.
WATCHDOG_USEC = 400_000
READY_TIMEOUT = 30.0


class NotifySocket:
    """What systemd listens on: a real AF_UNIX datagram socket; messages with their PID."""

    def __init__(self, abstract: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.directory = None
        if abstract:
            name = f"perc-notify-test-{uuid.uuid4()}"
            self.sock.bind("\0" + name)
            self.env_value = "@" + name
        else:  # short: AF_UNIX paths are limited to 107 bytes
            self.directory = tempfile.mkdtemp(prefix="perc-notify-")
            self.env_value = os.path.join(self.directory, "notify")
            self.sock.bind(self.env_value)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.setblocking(False)
        #: (reactor time, sender pid, {KEY: value}) in arrival order
        self.received: list[tuple[float, int, dict[str, str]]] = []

    def close(self) -> None:
        self.sock.close()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)

    def poll(self) -> None:
        while True:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(12))
            except BlockingIOError:
                return
            pid = -1
            for level, kind, value in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", value[:12])[0]
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.received.append((reactor.seconds(), pid, fields))

    def of(self, pid: int) -> list[tuple[float, dict[str, str]]]:
        self.poll()
        return [(at, fields) for at, sender, fields in self.received if sender == pid]

    def keys(self, pid: int) -> list[str]:
        return [key for _, fields in self.of(pid) for key in fields]

    @defer.inlineCallbacks
    def wait_for(self, pid: int, key: str, case, proto=None, timeout: float = READY_TIMEOUT):
        """The fields of the first message from ``pid`` with ``key`` (polled every 10 ms:
        the moment it arrives, give or take that)."""
        deadline = reactor.seconds() + timeout
        while True:
            for _, fields in self.of(pid):
                if key in fields:
                    return fields
            if proto is not None and not proto.running:
                case.fail(f"daemon exited before {key}:\n{proto.output()}")
            if reactor.seconds() > deadline:
                case.fail(f"no {key} from {pid} within {timeout} s: {self.of(pid)}"
                          + (f"\n{proto.output()}" if proto is not None else ""))
            yield task.deferLater(reactor, 0.01, lambda: None)


def listeners(status: str) -> dict[str, tuple[str, int]]:
    """``name host:port`` items of a READY's STATUS=."""
    return {m.group(1): (m.group(2).strip("[]"), int(m.group(3)))
            for m in re.finditer(r"([\w-]+) (\[[^\]]+\]|[\d.]+):(\d+)", status)}


def assert_bound(case, name: str, host: str, port: int) -> None:
    """TCP: a connection is accepted now; UDP (media): the port is taken."""
    if name == "md-media":
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, \
                case.assertRaises(OSError):
            s.bind((host, port))
        return
    with socket.create_connection((host, port), timeout=2):
        pass


@contextlib.contextmanager
def notify_environ(case, sock: NotifySocket):
    """``$NOTIFY_SOCKET`` and ``$WATCHDOG_USEC`` in os.environ while processes are spawned."""
    saved = dict(os.environ)
    os.environ.update(NOTIFY_SOCKET=sock.env_value, WATCHDOG_USEC=str(WATCHDOG_USEC))
    try:
        yield
    finally:
        for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC"):
            if key in saved:
                os.environ[key] = saved[key]
            else:
                os.environ.pop(key, None)


class NotifyDaemonTests(DaemonTestBase):
    """perc-kmf and perc-md: READY after binding, STATUS, WATCHDOG, STOPPING."""

    timeout = 90

    def spawn_notified(self, plugin: str, config_path: str, sock: NotifySocket) -> Daemon:
        proto = Daemon()
        env = dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED="1",
                   NOTIFY_SOCKET=sock.env_value, WATCHDOG_USEC=str(WATCHDOG_USEC))
        rundir = os.path.abspath(self.mktemp())
        os.mkdir(rundir)
        transport = reactor.spawnProcess(
            proto, sys.executable,
            [sys.executable, "-c", TWISTD, "--nodaemon", "--pidfile=", plugin,
             "--config", config_path], env=env, path=rundir)
        self.addCleanup(self.kill, proto, transport)
        return proto

    @defer.inlineCallbacks
    def notified_lifecycle(self, daemon: str, abstract: bool, expected: set[str]):
        sock = NotifySocket(abstract)
        self.addCleanup(sock.close)
        admin = free_port()
        path = self.write_config(f'[admin]\nbind = "127.0.0.1"\nport = {admin}\n'
                                 + self.extra_config(daemon))
        proto = self.spawn_notified(f"perc-{daemon}", path, sock)
        pid = proto.transport.pid
        ready = yield sock.wait_for(pid, "READY", self, proto)
        # at once, before anything else: every listener READY names is bound
        bound = listeners(ready["STATUS"])
        for name, (host, port) in bound.items():
            assert_bound(self, name, host, port)
        self.assertEqual(set(bound), expected, ready)
        self.assertEqual(bound["admin"], ("127.0.0.1", admin))
        self.assertTrue(ready["STATUS"].startswith(f"perc-{daemon} serving: "), ready)
        self.assertEqual(sock.keys(pid).count("READY"), 1)
        # keep-alives every half WATCHDOG_USEC, from the reactor
        start = reactor.seconds()
        yield task.deferLater(reactor, 1.0, lambda: None)
        beats = [at for at, fields in sock.of(pid) if "WATCHDOG" in fields and at >= start]
        self.assertGreaterEqual(len(beats), 3, sock.of(pid))
        self.assertLessEqual(len(beats), 7, sock.of(pid))
        # a stopped reactor sends none: SIGSTOP is a hung daemon as systemd sees it
        os.kill(pid, signal.SIGSTOP)
        sock.poll()
        yield task.deferLater(reactor, 0.3, lambda: None)
        sock.poll()
        count = len(sock.received)
        yield task.deferLater(reactor, 0.8, lambda: None)
        sock.poll()
        self.assertEqual(len(sock.received), count)
        os.kill(pid, signal.SIGCONT)
        os.kill(pid, signal.SIGTERM)
        stopping = yield sock.wait_for(pid, "STOPPING", self, timeout=10)
        self.assertEqual(stopping["STOPPING"], "1")
        exit_code, sig = yield self.wait_exit(proto)
        self.assertEqual((exit_code, sig), (None, signal.SIGTERM), proto.output())
        self.assertNotIn("Traceback", proto.output())
        self.assertIn(f"perc-{daemon}: told systemd it is ready", proto.output())
        after = sock.keys(pid)[sock.keys(pid).index("STOPPING"):]
        self.assertNotIn("WATCHDOG", after)
        self.assertNotIn("READY", after)
        # nobody else (a child process) sent anything
        self.assertEqual({sender for _, sender, _ in sock.received}, {pid})

    def test_kmf_abstract_socket(self):
        return self.notified_lifecycle("kmf", True, {"admin", "https"})

    def test_md_path_socket(self):
        return self.notified_lifecycle("md", False, {"admin", "md-media", "md-tunnel",
                                                     "md-api"})

    @defer.inlineCallbacks
    def test_nothing_without_notify_socket(self):
        """No NOTIFY_SOCKET: the daemon serves and logs no readiness message."""
        if os.environ.get("NOTIFY_SOCKET"):
            raise unittest.SkipTest("the tests run with a NOTIFY_SOCKET of their own")
        admin = free_port()
        path = self.write_config(f'[admin]\nbind = "127.0.0.1"\nport = {admin}\n')
        proto = self.spawn("perc-kd", path)
        yield self.wait_healthy(proto, admin)
        os.kill(proto.transport.pid, signal.SIGTERM)
        yield self.wait_exit(proto)
        self.assertNotIn("told systemd", proto.output())
        self.assertNotIn("systemd notification", proto.output())


class NotifyKdTests(DaemonTestBase):
    """perc-kd: READY only once its KMF answers."""

    timeout = 120

    @defer.inlineCallbacks
    def test_kd_ready_only_once_kmf_reachable(self):
        sock = NotifySocket(abstract=True)
        self.addCleanup(sock.close)
        stack = LocalStack(self.mktemp(), reactor, users=("alice",), static_mds=False)
        self.addCleanup(stack.stop_all)
        stack.prepare()
        # the KMF is not running yet: its port is known but nothing listens
        stack.ports.kmf_https = free_port()
        stack.ports.md_tunnel = free_port()
        with notify_environ(self, sock):
            started = stack.start("kd")  # spawned now, with the environment above
        yield started  # its /healthz answers
        kd = stack.children["kd"]
        pid = kd.transport.pid
        yield task.deferLater(reactor, 3.0, lambda: None)
        keys = sock.keys(pid)
        self.assertNotIn("READY", keys, sock.of(pid))
        self.assertGreaterEqual(keys.count("WATCHDOG"), 10, sock.of(pid))
        statuses = [fields["STATUS"] for _, fields in sock.of(pid) if "STATUS" in fields]
        self.assertEqual(statuses, [f"perc-kd: listening; waiting for the KMF at "
                                    f"{stack.kmf_url}"])
        # the KMF comes up (on the port the KD tries): READY follows
        yield stack.start("kmf")
        ready = yield sock.wait_for(pid, "READY", self, kd, timeout=60)
        self.assertIn("KMF event stream connected", kd.text())
        self.assertEqual(set(listeners(ready["STATUS"])), {"admin"}, ready)
        yield stack.stop("kd")
        stopping = yield sock.wait_for(pid, "STOPPING", self, timeout=10)
        self.assertEqual(stopping["STOPPING"], "1")
        self.assertEqual({sender for _, sender, _ in sock.received}, {pid})
