"""perc-md's state file (md/state.py): the codec, atomic replacement, typed refusals of a
bad file, and a perc-md service that will not start on one."""

from __future__ import annotations

import io
import json
import os
import sys

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.trial import unittest

from perc_daemons import config
from perc_daemons.devpki import DevPki
from perc_daemons.md.service import md_service
from perc_daemons.md.state import (
    SavedConference,
    SavedLink,
    SavedState,
    StateError,
    StateFile,
    decode,
    encode,
)

FP = bytes(range(32))
STATE = SavedState(
    conferences=(SavedConference("weekly", FP, 1700000000.5),
                 SavedConference("board", bytes(32), 1700000001.0)),
    links=(SavedLink("4b0f0c1e-0000-4000-8000-000000000001", "weekly", "client",
                     bytes(reversed(FP)), "AEAD_AES_128_GCM", 1700000002.0,
                     ("192.0.2.7", 9470), "abcdefgh", "p" * 24, "ijklmnop", "q" * 24, True),
           SavedLink("4b0f0c1e-0000-4000-8000-000000000002", "weekly", "server", FP,
                     "AEAD_AES_256_GCM", 1700000003.0, None, "rstuvwxy", "r" * 24, "", "",
                     False)))


class CodecTests(unittest.TestCase):
    def test_round_trip(self) -> None:
        self.assertEqual(decode(encode(STATE)), STATE)
        self.assertEqual(decode(encode(SavedState())), SavedState())

    def test_refusals_are_typed_and_say_why(self) -> None:
        good = json.loads(encode(STATE))
        cases = {
            b"\xff\xfe": "not JSON",
            b"{": "not JSON",
            b"[]": "not a version 1",
            json.dumps({**good, "version": 2}).encode(): "not a version 1",
            json.dumps({**good, "links": [{"link_id": "x"}]}).encode(): "malformed entry",
            json.dumps({**good, "conferences": [{**good["conferences"][0],
                                                 "kd_fingerprint": "zz"}]}).encode():
                "malformed entry",
            json.dumps({**good, "conferences": good["conferences"][1:]}).encode():
                "which the file does not hold",
        }
        for data, reason in cases.items():
            with self.assertRaises(StateError, msg=data) as raised:
                decode(data)
            self.assertIn(reason, str(raised.exception))

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=400))
    def test_any_bytes_decode_or_state_error(self, data: bytes) -> None:
        try:
            decode(data)
        except StateError:
            pass

    @settings(max_examples=200, deadline=None)
    @given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                        lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=12), inner, max_size=5),
                        max_leaves=20))
    def test_any_json_decodes_or_state_error(self, value: object) -> None:
        body = {"version": 1, "conferences": value, "links": value}
        try:
            decode(json.dumps(body).encode())
        except StateError:
            pass


class FileTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "md-state.json")

    def test_missing_is_empty(self) -> None:
        self.assertEqual(StateFile(self.path).load(), SavedState())

    def test_save_replaces_atomically_with_mode_0600(self) -> None:
        file = StateFile(self.path)
        os.umask(old := os.umask(0))  # whatever the umask, the file is 0600
        try:
            file.save(STATE)
        finally:
            os.umask(old)
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o600)
        self.assertEqual(file.load(), STATE)
        inode = os.stat(self.path).st_ino
        file.save(SavedState())
        self.assertNotEqual(os.stat(self.path).st_ino, inode)  # a new file renamed over
        self.assertEqual(file.load(), SavedState())
        self.assertEqual(sorted(os.listdir(self.dir)), ["md-state.json"])  # no temp left

    def test_unwritable_directory(self) -> None:
        file = StateFile(os.path.join(self.dir, "missing", "md-state.json"))
        with self.assertRaises(StateError) as raised:
            file.save(STATE)
        self.assertIn("cannot be written", str(raised.exception))


class StartUpTests(unittest.TestCase):
    """A perc-md with a corrupt state file stops start-up naming the file (status 2)."""

    def test_corrupt_file_stops_start_up(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        pki = DevPki(os.path.join(directory, "pki"))
        leaf = pki.issue("md", ["localhost"], ["127.0.0.1"])
        state = os.path.join(directory, "md-state.json")
        with open(state, "w") as f:
            f.write('{"version": 1, "conferences": [{"conference_id": "x"}], "links": []}')
        cfg = config.validate("md", os.path.join(directory, "md.toml"), {
            "admin": {"bind": "127.0.0.1", "port": 0},
            "api": {"bind": "127.0.0.1", "port": 0, "certificate": str(leaf.certificate),
                    "private_key": str(leaf.private_key),
                    "provider_token_file": os.path.join(directory, "token")},
            "media": {"bind": "127.0.0.1", "port": 0},
            "tunnel": {"bind": "127.0.0.1", "port": 0},
            "state": {"file": state},
        })
        md = md_service(cfg, reactor)
        stderr, sys.stderr = sys.stderr, io.StringIO()
        try:
            with self.assertRaises(SystemExit) as raised:
                md.startService()
            message = sys.stderr.getvalue()
        finally:
            sys.stderr = stderr
            md.stopService()
        self.assertEqual(raised.exception.code, 2)
        self.assertIn(f"state.file: {state}: malformed entry", message)
        self.assertIn("move it away", message)
        with open(state) as f:  # never discarded
            self.assertIn('"conference_id": "x"', f.read())
