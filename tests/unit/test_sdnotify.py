"""perc_daemons.sdnotify: the sd_notify messages, addresses, watchdog period, the service."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import uuid

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, task
from twisted.trial import unittest

from perc_daemons import sdnotify
from perc_daemons.sdnotify import (
    Notifier,
    NotifyError,
    NotifyService,
    format_message,
    notifier_from_environ,
    socket_address,
    watchdog_interval,
)


class Receiver:
    """A real AF_UNIX datagram socket standing in for systemd's notify socket."""

    def __init__(self, case: unittest.TestCase, abstract: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        case.addCleanup(self.sock.close)
        if abstract:
            name = f"perc-test-{uuid.uuid4()}"
            self.sock.bind("\0" + name)
            self.env_value = "@" + name
        else:
            # a short directory: AF_UNIX paths are limited to 107 bytes
            directory = tempfile.mkdtemp(prefix="perc-notify-")
            case.addCleanup(shutil.rmtree, directory, True)
            path = os.path.join(directory, "notify")
            self.sock.bind(path)
            self.env_value = path
        self.sock.setblocking(False)

    def messages(self) -> list[dict[str, str]]:
        out = []
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return out
            out.append(dict(line.split("=", 1) for line in data.decode().splitlines()))


class PureTests(unittest.TestCase):
    def test_addresses(self) -> None:
        self.assertEqual(socket_address("@perc/notify"), "\0perc/notify")
        self.assertEqual(socket_address("/run/systemd/notify"), "/run/systemd/notify")
        for bad in ("relative/path", "@", "vsock:2:1234", ""):
            with self.assertRaises(NotifyError) as raised:
                socket_address(bad)
            self.assertEqual(raised.exception.reason, "unsupported_address")

    def test_format(self) -> None:
        self.assertEqual(format_message([("READY", "1"), ("STATUS", "serving: a b")]),
                         b"READY=1\nSTATUS=serving: a b\n")
        for bad in ([], [("STATUS", "two\nlines")], [("ready", "1")], [("A=B", "1")]):
            with self.assertRaises(NotifyError):
                format_message(bad)

    @settings(deadline=None, max_examples=200)
    @given(st.lists(st.tuples(st.text(max_size=8), st.text(max_size=20)), max_size=4))
    def test_format_raises_only_its_error(self, fields) -> None:
        try:
            data = format_message(fields)
        except NotifyError:
            return
        self.assertEqual(data.decode().splitlines(), [f"{k}={v}" for k, v in fields])

    def test_watchdog_interval(self) -> None:
        self.assertIsNone(watchdog_interval({}, 10))
        self.assertEqual(watchdog_interval({"WATCHDOG_USEC": "30000000"}, 10), 15.0)
        self.assertEqual(watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "10"},
                                           10), 15.0)
        self.assertIsNone(watchdog_interval({"WATCHDOG_USEC": "30000000",
                                             "WATCHDOG_PID": "11"}, 10))
        for bad in ("0", "-5", "x", ""):
            self.assertIsNone(watchdog_interval({"WATCHDOG_USEC": bad}, 10))


class NotifierTests(unittest.TestCase):
    def test_path_and_abstract(self) -> None:
        for abstract in (False, True):
            receiver = Receiver(self, abstract)
            notifier = notifier_from_environ({"NOTIFY_SOCKET": receiver.env_value})
            assert notifier is not None
            self.addCleanup(notifier.close)
            self.assertTrue(notifier.notify(READY="1", STATUS="up"))
            self.assertEqual(receiver.messages(), [{"READY": "1", "STATUS": "up"}])

    def test_unset_or_unusable(self) -> None:
        self.assertIsNone(notifier_from_environ({}))
        self.assertIsNone(notifier_from_environ({"NOTIFY_SOCKET": ""}))
        self.assertIsNone(notifier_from_environ({"NOTIFY_SOCKET": "vsock:2:9"}))

    def test_nobody_listening_is_not_fatal(self) -> None:
        notifier = Notifier(os.path.join(tempfile.gettempdir(), f"perc-none-{uuid.uuid4()}"))
        self.addCleanup(notifier.close)
        self.assertFalse(notifier.notify(READY="1"))
        self.assertFalse(notifier.notify(READY="1"))
        self.assertEqual(len(self.flushLoggedErrors()), 0)


class FakeRunningReactor(task.Clock):
    """A Clock whose reactor is running (callWhenRunning calls at once)."""

    def callWhenRunning(self, f, *args, **kwargs):
        return f(*args, **kwargs)


class ServiceTests(unittest.TestCase):
    def service(self, environ: dict[str, str]) -> tuple[NotifyService, FakeRunningReactor]:
        clock = FakeRunningReactor()
        service = NotifyService.from_environ("kd", clock, top=None, environ=environ)
        self.addCleanup(lambda: service.notifier and service.notifier.close())
        return service, clock

    def test_ready_waits_for_conditions_watchdog_and_stopping(self) -> None:
        receiver = Receiver(self, abstract=True)
        service, clock = self.service({"NOTIFY_SOCKET": receiver.env_value,
                                       "WATCHDOG_USEC": "2000000"})
        self.assertEqual(service.watchdog, 1.0)
        kmf: defer.Deferred[None] = defer.Deferred()
        service.require("the KMF", lambda: kmf)
        service.startService()
        self.assertEqual(receiver.messages(), [
            {"WATCHDOG": "1"}, {"STATUS": "perc-kd: listening; waiting for the KMF"}])
        clock.advance(1.0)
        clock.advance(1.0)
        self.assertEqual(receiver.messages(), [{"WATCHDOG": "1"}] * 2)
        self.assertFalse(service.ready)
        kmf.callback(None)
        self.assertTrue(service.ready)
        self.assertEqual(receiver.messages(), [
            {"READY": "1", "STATUS": "perc-kd serving: no listeners"}])
        service.stopService()
        self.assertEqual(receiver.messages(), [{"STOPPING": "1",
                                                "STATUS": "perc-kd stopping"}])
        clock.advance(5.0)
        self.assertEqual(receiver.messages(), [])  # no watchdog after STOPPING

    def test_stopped_while_waiting_never_ready(self) -> None:
        receiver = Receiver(self, abstract=False)
        service, _clock = self.service({"NOTIFY_SOCKET": receiver.env_value})
        self.assertIsNone(service.watchdog)
        kmf: defer.Deferred[None] = defer.Deferred()
        service.require("the KMF", lambda: kmf)
        service.startService()
        service.stopService()
        self.assertTrue(kmf.called)  # cancelled
        self.assertFalse(service.ready)
        messages = receiver.messages()
        self.assertNotIn("READY", {key for m in messages for key in m})
        self.assertEqual(messages[-1]["STOPPING"], "1")

    def test_nothing_without_notify_socket(self) -> None:
        service, clock = self.service({"WATCHDOG_USEC": "1000000"})
        self.assertIsNone(service.notifier)
        self.assertIsNone(service.watchdog)
        sent = []
        self.patch(sdnotify.Notifier, "notify", lambda *a, **k: sent.append(k))
        service.startService()
        clock.advance(10)
        service.stopService()
        self.assertEqual(sent, [])
        self.assertEqual(clock.getDelayedCalls(), [])
