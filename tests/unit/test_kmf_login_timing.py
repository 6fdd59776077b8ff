"""perc-kmf's login answers hide which back-end refused a user (issue 5: no
user enumeration through timing): the chain's failure delay comes from
[auth] failure_delay_ms."""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.trial import unittest

from perc_daemons import config
from perc_daemons.kmf.service import authorization_server
from perc_daemons.kmf.signing import SigningKeys

NOW = 1_800_000_000.0


class FailureDelayTests(unittest.TestCase):
    def server(self, **auth):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        raw = {"auth": {"users_file": os.path.join(directory, "users.jsonl"), **auth},
               "oauth": {"clients_file": os.path.join(directory, "no-clients.toml")}}
        cfg = config.validate("kmf", os.path.join(directory, "kmf.toml"), raw)
        keys = SigningKeys.create(os.path.join(directory, "signing"), NOW)
        return authorization_server(cfg, keys, "https://localhost", reactor)

    def test_default_delay_is_one_second(self) -> None:
        self.assertEqual(self.server().authenticator.failure_delay, 1.0)

    def test_configured_delay(self) -> None:
        self.assertEqual(self.server(failure_delay_ms=250).authenticator.failure_delay, 0.25)

    def test_negative_delay_refused(self) -> None:
        with self.assertRaises(config.ConfigError) as caught:
            self.server(failure_delay_ms=-1)
        self.assertEqual(caught.exception.key, "auth.failure_delay_ms")
        self.assertIn("must not be negative", caught.exception.reason)
