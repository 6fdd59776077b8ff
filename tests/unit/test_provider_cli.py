"""perc-provider against a real perc-md HTTPS conference API on loopback (real TLS)."""

from __future__ import annotations

import io
import json
import os

from twisted.internet import defer, reactor
from twisted.trial import unittest

from perc_daemons import config
from perc_daemons.devpki import DevPki
from perc_daemons.md.provider_cli import kd_fingerprint, run
from perc_daemons.md.service import md_service

TOKEN = "provider-token-0123456789abcdef"


def write_private(path: str, text: str, mode: int = 0o600) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


class ProviderCliTests(unittest.TestCase):
    timeout = 20

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        pki = DevPki(os.path.join(self.dir, "pki"))
        self.ca = str(pki.ca_certificate_path)
        md = pki.issue("md", ["localhost"], ["127.0.0.1"])
        self.kd_cert = str(pki.issue("kd", ["kd.localhost"]).certificate)
        self.other_kd_cert = str(pki.issue("kd2", ["kd.localhost"]).certificate)
        self.token = write_private(os.path.join(self.dir, "md-provider.token"), TOKEN + "\n")
        cfg = config.validate("md", os.path.join(self.dir, "md.toml"), {
            "admin": {"bind": "127.0.0.1", "port": 0},
            "api": {"bind": "127.0.0.1", "port": 0, "certificate": str(md.certificate),
                    "private_key": str(md.private_key), "provider_token_file": self.token},
            "media": {"bind": "127.0.0.1", "port": 0},
            "tunnel": {"bind": "127.0.0.1", "port": 0},
            "state": {"file": os.path.join(self.dir, "md-state.json")},
        })
        self.md = md_service(cfg, reactor)
        self.md.startService()
        self.addCleanup(self.md.stopService)
        port = self.md.getServiceNamed("md-api").port.getHost().port
        self.url = f"https://localhost:{port}"
        self.config = self.write_config(url=self.url, ca_file=self.ca, token_file=self.token)

    def write_config(self, name: str = "provider.toml", **values: str) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.writelines(f"{key} = {json.dumps(value)}\n" for key, value in values.items())
        return path

    @defer.inlineCallbacks
    def cli(self, *argv: str, config: str | None = None):
        out, err = io.StringIO(), io.StringIO()
        code = yield defer.ensureDeferred(run(
            [*argv, "--config", config or self.config], reactor, stdout=out, stderr=err))
        self.assertNotIn(TOKEN, out.getvalue() + err.getvalue())
        self.assertNotIn("Traceback", err.getvalue())
        return code, out.getvalue(), err.getvalue()

    @defer.inlineCallbacks
    def test_create_show_end(self):
        code, out, err = yield self.cli("conferences", "create", "weekly", "--kd-certificate",
                                        self.kd_cert)
        self.assertEqual((code, err), (0, ""))
        fingerprint = kd_fingerprint(self.kd_cert)
        tunnel = f"localhost:{self.md.tunnel.port}"
        self.assertRegex(out, rf"(?m)^kd fingerprint: +{fingerprint}$")
        self.assertRegex(out, rf"(?m)^kd tunnel: +{tunnel}$")
        self.assertIn(f"Tell the KD: the conference's MD tunnel is {tunnel}", out)
        self.assertIn("weekly", [c.conference_id for c in self.md.conferences.conferences()])
        # the same again is fine (idempotent), another KD for it is not
        code, out, _ = yield self.cli("conferences", "create", "weekly", "--kd-fingerprint",
                                      fingerprint.lower(), "--json")
        self.assertEqual((code, json.loads(out)["tunnel"]["port"]), (0, self.md.tunnel.port))
        code, out, err = yield self.cli("conferences", "create", "weekly", "--kd-certificate",
                                        self.other_kd_cert)
        self.assertEqual((code, out), (1, ""))
        self.assertIn("(409)", err)

        code, out, err = yield self.cli("conferences", "show", "weekly")
        self.assertEqual((code, err), (0, ""))
        self.assertRegex(out, r"(?m)^kd connected: +no$")
        code, out, err = yield self.cli("conferences", "end", "weekly")
        self.assertEqual((code, out, err), (0, "conference weekly: ended at the MD\n", ""))
        self.assertNotIn("weekly", [c.conference_id for c in self.md.conferences.conferences()])
        code, out, err = yield self.cli("conferences", "show", "weekly")
        self.assertEqual((code, out), (1, ""))
        self.assertIn("(404)", err)

    @defer.inlineCallbacks
    def test_create_with_forwarding_settings(self):
        """--last-n, --no-audio-levels, --audio-top-k and --forwarding become the
        conference's settings at the MD; left out, the MD's defaults."""
        code, out, err = yield self.cli("conferences", "create", "sfu", "--kd-certificate",
                                        self.kd_cert, "--last-n", "2", "--no-audio-levels",
                                        "--audio-top-k", "3")
        self.assertEqual((code, err), (0, ""))
        self.assertRegex(out, r"(?m)^forwarding: +sfu \(last-n 2, audio levels off, "
                              r"audio top-k 3\)$")
        conference = self.md.conferences.conference("sfu")
        self.assertEqual(conference.forwarding, "sfu")
        self.assertEqual((conference.policy.last_n, conference.policy.audio_levels,
                          conference.policy.audio_top_k), (2, False, 3))
        code, out, err = yield self.cli("conferences", "create", "all", "--kd-certificate",
                                        self.kd_cert, "--forwarding", "all", "--json")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(json.loads(out)["forwarding"], "all")
        self.assertEqual(self.md.conferences.conference("all").forwarding, "all")
        code, out, err = yield self.cli("conferences", "create", "plain", "--kd-certificate",
                                        self.kd_cert, "--json")
        self.assertEqual((code, err), (0, ""))
        body = json.loads(out)
        self.assertEqual((body["forwarding"], body["last_n"], body["audio_levels"],
                          body["audio_top_k"]), ("sfu", -1, True, 0))

    @defer.inlineCallbacks
    def test_forwarding_usage_errors(self):
        for extra, message in ((["--last-n", "-2"], "must be -1 (every source) or a count"),
                               (["--last-n", "two"], "must be -1 (every source) or a count"),
                               (["--audio-top-k", "-1"], "must be 0 (every sender) or a count"),
                               (["--forwarding", "some"], "invalid choice"),
                               (["--forwarding", "all", "--last-n", "2"],
                                "go with --forwarding sfu")):
            code, out, err = yield self.cli("conferences", "create", "x", "--kd-certificate",
                                            self.kd_cert, *extra)
            self.assertEqual((code, out), (2, ""), extra)
            self.assertIn(message, err, extra)
        self.assertEqual(self.md.conferences.conferences(), [])

    @defer.inlineCallbacks
    def test_refusals(self):
        wrong = write_private(os.path.join(self.dir, "wrong.token"), "not-the-token\n")
        code, out, err = yield self.cli("conferences", "show", "x", "--token-file", wrong)
        self.assertEqual((code, out), (1, ""))
        self.assertIn("Forbidden (403): wrong provider token", err)
        # the MD's certificate is not trusted without the CA
        untrusting = self.write_config("untrusting.toml", url=self.url, token_file=self.token)
        code, _, err = yield self.cli("conferences", "show", "x", config=untrusting)
        self.assertEqual(code, 1)
        self.assertIn("TLS certificate not trusted", err)

    @defer.inlineCallbacks
    def test_usage_and_configuration_errors(self):
        code, _, err = yield self.cli("conferences", "create", "x", "--kd-fingerprint", "AB:CD")
        self.assertEqual(code, 2)
        self.assertIn("must be a SHA-256 fingerprint", err)
        code, _, err = yield self.cli("conferences", "create", "x")
        self.assertEqual(code, 2)
        open_token = write_private(os.path.join(self.dir, "open.token"), TOKEN + "\n", 0o644)
        code, _, err = yield self.cli("conferences", "show", "x", "--token-file", open_token)
        self.assertEqual(code, 2)
        self.assertIn("0644", err)
        bad = self.write_config("bad.toml", url="http://localhost:1", token_file=self.token)
        code, _, err = yield self.cli("conferences", "show", "x", config=bad)
        self.assertEqual(code, 2)
        self.assertIn("bad.toml: url: must be an https:// URL", err)
        code, _, err = yield self.cli("conferences", "show", "x",
                                      config=os.path.join(self.dir, "missing.toml"))
        self.assertEqual(code, 2)
        self.assertIn("file not found", err)
