"""perc_daemons.logs: journal fields over a real AF_UNIX socket, JSON and text lines,
levels, access lines at debug; and a real perc-kd under twistd with [logging]."""

from __future__ import annotations

import datetime
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile

import treq
from twisted.internet import defer, reactor
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial import unittest
from twisted.web import resource
from twisted.web.client import HTTPConnectionPool

from perc_daemons import logs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_entry(data: bytes) -> dict[str, str]:
    """The fields of one journal-native datagram (both the KEY=value and binary forms)."""
    fields: dict[str, str] = {}
    while data:
        line, _, rest = data.partition(b"\n")
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key.decode()] = value.decode()
            data = rest
        else:
            (length,) = struct.unpack("<Q", rest[:8])
            fields[line.decode()] = rest[8:8 + length].decode()
            assert rest[8 + length:9 + length] == b"\n"
            data = rest[9 + length:]
    return fields


def event(level: LogLevel, format: str, namespace: str = "perc.test", **fields) -> dict:
    return {"log_level": level, "log_format": format, "log_namespace": namespace,
            "log_time": 1_800_000_000.0, **fields}


class JournalTests(unittest.TestCase):
    def setUp(self) -> None:
        # AF_UNIX paths are short (108 bytes): a directory of its own under /tmp
        directory = tempfile.mkdtemp(prefix="perc-journal-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.path = os.path.join(directory, "journal.sock")
        self.journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.journal.bind(self.path)
        self.journal.settimeout(5)
        self.addCleanup(self.journal.close)

    def test_an_event_is_one_entry_of_fields(self):
        observer = logs.JournalObserver("perc-kmf", path=self.path)
        observer(event(LogLevel.warn, "login refused for {user} from {address}: {reason}",
                       user="mallory", address="192.0.2.7", reason="bad password",
                       attempts=3, ok=False, ignored=object()))
        fields = parse_entry(self.journal.recv(65536))
        self.assertEqual(fields.pop("MESSAGE"),
                         "login refused for mallory from 192.0.2.7: bad password")
        self.assertEqual(fields, {
            "PRIORITY": "4", "SYSLOG_IDENTIFIER": "perc-kmf", "PERC_NAMESPACE": "perc.test",
            "PERC_USER": "mallory", "PERC_ADDRESS": "192.0.2.7", "PERC_REASON": "bad password",
            "PERC_ATTEMPTS": "3", "PERC_OK": "false"})

    def test_multiline_values_use_the_binary_form(self):
        observer = logs.JournalObserver("perc-md", path=self.path)
        observer(event(LogLevel.error, "two\nlines {detail}", detail="a\nb" + "x" * 5000))
        fields = parse_entry(self.journal.recv(65536))
        self.assertEqual(fields["PRIORITY"], "3")
        self.assertTrue(fields["MESSAGE"].startswith("two\nlines a\nb"))
        self.assertEqual(len(fields["PERC_DETAIL"]), logs.MAX_FIELD)  # cut to the limit

    def test_no_socket_falls_back_to_text(self):
        out = io.StringIO()
        observer = logs.observer("perc-kd", format="journal", level="info", stream=out,
                                 journal_socket=self.path + ".missing")
        observer(event(LogLevel.info, "hello {name}", name="kd"))
        self.assertIn("[perc.test#info] hello kd", out.getvalue())

    def test_auto_is_journal_only_when_stdout_is_the_journal_stream(self):
        with open(os.path.join(os.path.dirname(self.path), "stdout"), "w") as stream:
            st = os.fstat(stream.fileno())
            self.assertTrue(logs.stdout_is_journal(
                stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}))
            self.assertFalse(logs.stdout_is_journal(
                stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}))
            self.assertFalse(logs.stdout_is_journal(stream, {}))
            self.assertFalse(logs.stdout_is_journal(stream, {"JOURNAL_STREAM": "junk"}))


class LinesTests(unittest.TestCase):
    def test_json_lines_carry_the_fields(self):
        out = io.StringIO()
        observer = logs.observer("perc-md", format="json", level="info", stream=out)
        observer(event(LogLevel.warn, "refused {association}", association="a-1",
                       log_time=1_800_000_000.25))
        record = json.loads(out.getvalue())
        self.assertEqual((record["level"], record["namespace"], record["message"],
                          record["association"]), ("warn", "perc.test", "refused a-1", "a-1"))
        # to the microsecond (events of several daemons can be ordered)
        when = datetime.datetime.strptime(record["time"], "%Y-%m-%dT%H:%M:%S.%f%z")
        self.assertEqual(when.timestamp(), 1_800_000_000.25)

    def test_level_filters(self):
        out = io.StringIO()
        observer = logs.observer("perc-md", format="text", level="warn", stream=out)
        observer(event(LogLevel.info, "not shown"))
        observer(event(LogLevel.debug, "not shown either"))
        observer(event(LogLevel.error, "shown"))
        self.assertEqual(out.getvalue().count("\n"), 1)
        self.assertIn("shown", out.getvalue())


class AccessLogTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_access_lines_are_debug_events_without_the_query(self):
        root = resource.Resource()
        leaf = resource.Resource()
        leaf.isLeaf = True
        leaf.render_GET = lambda request: b"ok"  # type: ignore[method-assign]
        root.putChild(b"authorize", leaf)
        site = logs.AccessLogSite(root)
        site.noisy = False
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        seen: list[dict] = []
        observer = seen.append
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        response = yield treq.get(
            f"http://127.0.0.1:{port.getHost().port}/authorize?state=s3cret&code=c0de",
            headers={"User-Agent": "probe/1"}, pool=pool)
        yield treq.content(response)
        access = [e for e in seen if e.get("log_namespace") == "perc.access"]
        self.assertEqual(len(access), 1)
        [e] = access
        self.assertEqual(e["log_level"], LogLevel.debug)
        self.assertEqual((e["method"], e["path"], e["status"], e["address"], e["user_agent"]),
                         ("GET", "/authorize", 200, "127.0.0.1", "probe/1"))
        everything = json.dumps([logs.event_fields(x) for x in seen], default=str)
        self.assertNotIn("s3cret", everything)
        self.assertNotIn("c0de", everything)


class DaemonLoggingTests(unittest.TestCase):
    def test_twistd_uses_the_configured_format_and_level(self):
        """perc-kd with [logging] format = "json", level = "warn": JSON lines, no info."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        config = os.path.join(directory, "kd.toml")
        with open(config, "w") as f:
            f.write('[admin]\nbind = "127.0.0.1"\nport = 0\n'
                    '[logging]\nformat = "json"\nlevel = "warn"\n'
                    f'[tunnel]\ncertificate = "{directory}/missing.crt"\n'
                    f'private_key = "{directory}/missing.key"\n')
        # it serves until stopped: SIGTERM after 4 s, then read what it logged
        result = subprocess.run(
            ["timeout", "-s", "TERM", "4", sys.executable, "-c",
             "from twisted.scripts.twistd import run; run()", "--nodaemon", "--pidfile=",
             "perc-kd", "--config", config],
            cwd=directory, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True,
            text=True, timeout=30)
        lines = [json.loads(line) for line in result.stdout.splitlines()]
        self.assertTrue(lines, result.stdout + result.stderr)
        self.assertEqual({line["level"] for line in lines} - {"warn", "error", "critical"},
                         set(), lines)
        self.assertTrue(any("cannot serve" in line["message"] for line in lines), lines)

