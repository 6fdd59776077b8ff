"""Placement over one host's perc-md processes (md/cluster.py): two real perc-md services
(HTTPS APIs, UDP media ports on loopback) naming each other in ``[cluster] processes``."""

from __future__ import annotations

import json
import os

import treq
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from perc_daemons import config
from perc_daemons.demo.stack import free_port
from perc_daemons.devpki import DevPki
from perc_daemons.md.service import md_service
from tests.unit.test_md_links import KD_FP, TOKEN, write_private

CONFERENCE = "weekly"


class ClusterConfigTests(unittest.TestCase):
    def check(self, processes: list, port: int = 9443) -> config.ConfigError:
        with self.assertRaises(config.ConfigError) as raised:
            config.validate("md", "/etc/perc/md.toml", {
                "api": {"port": port}, "cluster": {"processes": processes}})
        self.assertEqual(raised.exception.key, "cluster.processes")
        return raised.exception

    def test_refusals(self) -> None:
        self.assertIn("two or more", self.check(["https://localhost:9443"]).reason)
        self.assertIn("port 9443 twice",
                      self.check(["https://a:9443", "https://b:9443"]).reason)
        self.assertIn("with the port", self.check(["https://a", "https://b:9444"]).reason)
        self.assertIn("URLs", self.check(["http://a:9443", "https://b:9444"]).reason)
        self.assertIn("none on its [api] port 9445",
                      self.check(["https://a:9443", "https://a:9444"], port=9445).reason)

    def test_accepted(self) -> None:
        cfg = config.validate("md", "/etc/perc/md.toml", {
            "api": {"port": 9444},
            "cluster": {"processes": ["https://md.example.net:9443",
                                      "https://md.example.net:9444"]}})
        self.assertEqual(len(cfg.cluster.processes), 2)


class PlacementTests(unittest.TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        pki = DevPki(os.path.join(self.dir, "pki"))
        self.ca = str(pki.ca_certificate_path)
        self.token = write_private(os.path.join(self.dir, "md-provider.token"), TOKEN + "\n")
        self.ports = [free_port(), free_port()]
        self.urls = [f"https://localhost:{port}" for port in self.ports]
        self.leaf = pki.issue("md", ["localhost"], ["127.0.0.1"])
        self.mds = [self.start_md(i) for i in range(2)]
        for md in self.mds:
            md.conferences.create(CONFERENCE, bytes.fromhex(KD_FP.replace(":", "")))
        from twisted.internet import ssl
        from twisted.web.client import Agent, BrowserLikePolicyForHTTPS

        with open(self.ca, "rb") as f:
            trust = ssl.Certificate.loadPEM(f.read())
        self.agent = Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trust))

    def start_md(self, index: int):
        cfg = config.validate("md", os.path.join(self.dir, f"md{index}.toml"), {
            "admin": {"bind": "127.0.0.1", "port": 0},
            "api": {"bind": "127.0.0.1", "port": self.ports[index],
                    "certificate": str(self.leaf.certificate),
                    "private_key": str(self.leaf.private_key),
                    "provider_token_file": self.token},
            "media": {"bind": "127.0.0.1", "port": 0},
            "tunnel": {"bind": "127.0.0.1", "port": 0},
            "state": {"file": os.path.join(self.dir, f"md{index}-state.json")},
            "cluster": {"processes": self.urls, "ca_file": self.ca},
        })
        md = md_service(cfg, reactor)
        md.startService()
        self.addCleanup(lambda: md.running and md.stopService())
        return md

    @defer.inlineCallbacks
    def post_join(self, index: int, query: str = ""):
        response = yield treq.post(
            f"{self.urls[index]}/v1/conferences/{CONFERENCE}/participants{query}",
            data=json.dumps({"offer": "v=0\r\n"}).encode(),
            headers={"Content-Type": "application/json"}, agent=self.agent,
            allow_redirects=False)
        body = yield treq.content(response)
        return response.code, response.headers.getRawHeaders(b"location", [b""])[0], body

    @defer.inlineCallbacks
    def get(self, index: int, path: str):
        response = yield treq.get(self.urls[index] + path, agent=self.agent,
                                  headers={"Authorization": f"Bearer {TOKEN}"})
        return response.code, json.loads((yield treq.content(response)))

    @defer.inlineCallbacks
    def test_md_info_names_the_cluster_and_load(self):
        code, info = yield self.get(0, "/v1/md")
        self.assertEqual(code, 200)
        self.assertEqual(info["cluster"], self.urls)
        self.assertEqual(info["load"], {"participants": 0, "conferences": 1})

    @defer.inlineCallbacks
    def test_tie_stays_here(self):
        code, location, _ = yield self.post_join(0)
        self.assertNotEqual(code, 307)  # joined here (refused later: no KD, bad offer)
        self.assertEqual(location, b"")
        self.assertEqual(self.mds[0].cluster.placed, {"here": 1, "elsewhere": 0})

    @defer.inlineCallbacks
    def test_busier_process_redirects_and_the_hub_links_once(self):
        a = self.mds[0]
        a.cluster._local_load = lambda: 3  # three participants here, none at B
        code, location, body = yield self.post_join(0)
        self.assertEqual(code, 307, body)
        self.assertEqual(location.decode(), f"{self.urls[1]}/v1/conferences/{CONFERENCE}"
                                            "/participants?placed=1")
        self.assertEqual(json.loads(body), {"placed": self.urls[1]})
        # a star around the conference's hub: one link, the hub its opener
        roles = []
        for index in (0, 1):
            _, listed = yield self.get(index, f"/v1/conferences/{CONFERENCE}/links")
            roles.append([link["role"] for link in listed["links"]])
        hub = a.cluster.hub(CONFERENCE, self.urls)
        self.assertEqual(roles[self.urls.index(hub)], ["client"])
        self.assertEqual(roles[1 - self.urls.index(hub)], ["server"])
        # the next join: B still shows none, but one was sent there: 1 < 3, B again,
        # and no second link
        code, _, _ = yield self.post_join(0)
        self.assertEqual(code, 307)
        for index in (0, 1):
            _, listed = yield self.get(index, f"/v1/conferences/{CONFERENCE}/links")
            self.assertEqual(len(listed["links"]), 1)
        # joins sent to B count as its load: at 3 each, a tie stays here
        code, _, _ = yield self.post_join(0)
        self.assertEqual(code, 307)
        code, _, _ = yield self.post_join(0)
        self.assertNotEqual(code, 307)
        self.assertEqual(a.cluster.placed, {"here": 1, "elsewhere": 3})

    @defer.inlineCallbacks
    def test_placed_join_is_not_placed_again(self):
        self.mds[1].cluster._local_load = lambda: 5
        code, _, _ = yield self.post_join(1, "?placed=1")
        self.assertNotEqual(code, 307)
        self.assertEqual(self.mds[1].cluster.placed, {"here": 0, "elsewhere": 0})

    @defer.inlineCallbacks
    def test_unreachable_or_not_hosting_is_skipped(self):
        a = self.mds[0]
        a.cluster._local_load = lambda: 3
        self.mds[1].conferences.delete(CONFERENCE)  # B does not host it
        code, _, _ = yield self.post_join(0)
        self.assertNotEqual(code, 307)
        yield self.mds[1].stopService()  # B gone
        yield task.deferLater(reactor, 0, lambda: None)
        code, _, _ = yield self.post_join(0)
        self.assertNotEqual(code, 307)
        self.assertEqual(a.cluster.placed, {"here": 2, "elsewhere": 0})
