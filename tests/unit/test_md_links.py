"""Cascade links through the provider API: two real perc-md services (HTTPS API, UDP media
ports on loopback) linked by perc-provider, up, listed, removed; the refusals."""

from __future__ import annotations

import io
import json
import os
import re

import treq
from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from perc_daemons import config
from perc_daemons.devpki import DevPki
from perc_daemons.md.provider_cli import run
from perc_daemons.md.service import md_service

TOKEN = "provider-token-0123456789abcdef"
KD_FP = ":".join(["AB"] * 32)


def write_private(path: str, text: str) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


class MdLinkApiTests(unittest.TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        pki = DevPki(os.path.join(self.dir, "pki"))
        self.ca = str(pki.ca_certificate_path)
        token = write_private(os.path.join(self.dir, "md-provider.token"), TOKEN + "\n")
        self.mds = []
        for name in ("md-a", "md-b"):
            leaf = pki.issue(name, ["localhost"], ["127.0.0.1"])
            cfg = config.validate("md", os.path.join(self.dir, f"{name}.toml"), {
                "admin": {"bind": "127.0.0.1", "port": 0},
                "api": {"bind": "127.0.0.1", "port": 0, "certificate": str(leaf.certificate),
                        "private_key": str(leaf.private_key), "provider_token_file": token},
                "media": {"bind": "127.0.0.1", "port": 0},
                "tunnel": {"bind": "127.0.0.1", "port": 0},
            })
            md = md_service(cfg, reactor)
            md.startService()
            self.addCleanup(md.stopService)
            md.url = f"https://localhost:{md.getServiceNamed('md-api').port.getHost().port}"
            md.conferences.create("weekly", bytes.fromhex(KD_FP.replace(":", "")))
            self.mds.append(md)
        self.config = os.path.join(self.dir, "provider.toml")
        with open(self.config, "w") as f:
            f.write(f'ca_file = "{self.ca}"\ntoken_file = "{token}"\n')

    @defer.inlineCallbacks
    def provider(self, url: str, *argv: str):
        out, err = io.StringIO(), io.StringIO()
        code = yield defer.ensureDeferred(run(
            [*argv, "--config", self.config, "--url", url, "--json"], reactor, stdout=out,
            stderr=err))
        self.assertNotIn("Traceback", err.getvalue())
        return code, json.loads(out.getvalue()) if out.getvalue() else None, err.getvalue()

    @defer.inlineCallbacks
    def states(self, md):
        code, body, err = yield self.provider(md.url, "links", "list", "weekly")
        self.assertEqual(code, 0, err)
        return [link["state"] for link in body["links"]]

    @defer.inlineCallbacks
    def wait_states(self, want: list[str]):
        for _ in range(200):
            got = []
            for md in self.mds:
                got.append((yield self.states(md)))
            if got == [want, want]:
                return
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.fail(f"link states {got}, not {want} on both MDs")

    @defer.inlineCallbacks
    def test_link_up_listed_and_removed(self):
        a, b = self.mds
        code, body, err = yield self.provider(a.url, "links", "create", "weekly", "--to", b.url)
        self.assertEqual(code, 0, err)
        opened, accepted = body["opened"], body["accepted"]
        self.assertEqual((opened["role"], accepted["role"]), ("client", "server"))
        # each pins the other's certificate
        self.assertEqual(opened["peer_fingerprint"], accepted["fingerprint"])
        self.assertEqual(accepted["peer_fingerprint"], opened["fingerprint"])
        self.assertEqual(opened["peer"], {"host": "127.0.0.1",
                                          "port": b.conferences.media_port})
        yield self.wait_states(["up"])
        self.assertEqual(len(a.conferences.plane.groups()["weekly"]), 1)  # the link leg

        # each end's counters of the link in /metrics, labelled by conference and link id
        for md, link in ((a, opened), (b, accepted)):
            admin = md.getServiceNamed("admin").port.getHost().port
            response = yield treq.get(f"http://127.0.0.1:{admin}/metrics",
                                      pool=HTTPConnectionPool(reactor, persistent=False))
            text = yield response.text()
            counters = {m["kind"]: float(m["value"]) for m in re.finditer(
                r'^perc_md_link_datagrams_total\{conference="weekly",kind="(?P<kind>\w+)",'
                rf'link="{link["id"]}"\}} (?P<value>\S+)$', text, re.M)}
            self.assertEqual(set(counters), {"stun_in", "dtls_in", "dtls_out", "rtp_in",
                                             "rtp_out", "rtcp_in", "rtcp_out"}, text)
            self.assertGreater(counters["dtls_in"], 0)  # the handshake went over it
            self.assertGreater(counters["dtls_out"], 0)
            self.assertIn(f'perc_md_link_dropped_total{{conference="weekly",'
                          f'link="{link["id"]}",reason="srtp_auth"}} 0.0', text)

        # a second link to the same MD in this conference would close a cycle
        code, _, err = yield self.provider(a.url, "links", "create", "weekly", "--to", b.url)
        self.assertEqual(code, 1)
        self.assertIn("(409)", err)
        self.assertIn("would close a cycle", err)
        self.assertEqual((yield self.states(b)), ["up"])  # the half made at B went again

        # removing A's half takes the link down at B too (B waits for A to reopen it)
        code, _, err = yield self.provider(a.url, "links", "delete", "weekly", opened["id"])
        self.assertEqual(code, 0, err)
        self.assertEqual((yield self.states(a)), [])
        for _ in range(200):
            if (yield self.states(b)) == ["down"]:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual((yield self.states(b)), ["down"])
        # deleting the conference removes its links
        b.conferences.delete("weekly")
        self.assertEqual(b.conferences.plane.groups().get("weekly", []), [])

    @defer.inlineCallbacks
    def test_refusals(self):
        a, b = self.mds
        code, _, err = yield self.provider(a.url, "links", "list", "nope")
        self.assertEqual(code, 1)
        self.assertIn("(404)", err)
        code, _, err = yield self.provider(a.url, "links", "create", "nope", "--to", b.url)
        self.assertEqual(code, 1)
        self.assertIn("(404)", err)
