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
from perc_daemons.md.plane import LEG_DROP_REASONS, LINK_COUNTERS
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
        self.pki, self.token = pki, token
        self.mds = []
        for name in ("md-a", "md-b"):
            leaf = pki.issue(name, ["localhost"], ["127.0.0.1"])
            md = self.start_md(name, leaf)
            md.conferences.create("weekly", bytes.fromhex(KD_FP.replace(":", "")))
            self.mds.append(md)
        self.config = os.path.join(self.dir, "provider.toml")
        with open(self.config, "w") as f:
            f.write(f'ca_file = "{self.ca}"\ntoken_file = "{token}"\n')

    def start_md(self, name: str, leaf, *, api_port: int = 0, media_port: int = 0):
        """A perc-md service named ``name`` (its state file in the test dir), started."""
        cfg = config.validate("md", os.path.join(self.dir, f"{name}.toml"), {
            "admin": {"bind": "127.0.0.1", "port": 0},
            "api": {"bind": "127.0.0.1", "port": api_port,
                    "certificate": str(leaf.certificate),
                    "private_key": str(leaf.private_key), "provider_token_file": self.token},
            "media": {"bind": "127.0.0.1", "port": media_port},
            "tunnel": {"bind": "127.0.0.1", "port": 0},
            "state": {"file": os.path.join(self.dir, f"{name}-state.json")},
        })
        md = md_service(cfg, reactor)
        md.startService()
        self.addCleanup(lambda: md.running and md.stopService())
        md.url = f"https://localhost:{md.getServiceNamed('md-api').port.getHost().port}"
        md.leaf, md.name = leaf, name
        return md

    @defer.inlineCallbacks
    def restart(self, index: int):
        """Stop MD ``index`` and start it again on the same ports with the same state
        file, as systemd restarts perc-md; the new service replaces it in ``self.mds``."""
        old = self.mds[index]
        api_port = old.getServiceNamed("md-api").port.getHost().port
        media_port = old.conferences.media_port
        yield old.stopService()
        self.mds[index] = self.start_md(old.name, old.leaf, api_port=api_port,
                                        media_port=media_port)

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
        # what crossed it so far, each MD's view: the checks and the DTLS handshake
        # (over real UDP), the MDs' stream announcements (SRTCP, APP "PERC"; empty: no
        # senders yet), no media, nothing dropped
        listed = {}
        for name, md in (("a", a), ("b", b)):
            code, body, err = yield self.provider(md.url, "links", "list", "weekly")
            self.assertEqual(code, 0, err)
            [listed[name]] = body["links"]
            leg = md.conferences.plane.leg(listed[name]["id"])
            self.assertEqual({k: listed[name][k] for k in LINK_COUNTERS},
                             dict(leg.counters), name)
            self.assertEqual(listed[name]["drops"], dict.fromkeys(LEG_DROP_REASONS, 0), name)
            self.assertGreater(listed[name]["stun_in"], 0, name)
            self.assertGreater(listed[name]["dtls_in"], 0, name)
            self.assertGreater(listed[name]["dtls_out"], 0, name)
            for way in ("in", "out"):
                self.assertEqual(listed[name][f"rtp_{way}"], 0)
                self.assertEqual(listed[name][f"rtp_{way}_bytes"], 0)
                self.assertGreaterEqual(listed[name][f"rtcp_{way}"], 1)
        out, err = io.StringIO(), io.StringIO()
        code = yield defer.ensureDeferred(run(
            ["links", "list", "weekly", "--config", self.config, "--url", a.url], reactor,
            stdout=out, stderr=err))
        self.assertEqual(code, 0, err.getvalue())
        header, _, row = out.getvalue().splitlines()
        self.assertEqual(header.split()[-5:], ["MEDIA", "IN", "MEDIA", "OUT", "DROPPED"])
        self.assertTrue(row.startswith(listed["a"]["id"]), row)
        # no RTP yet: what crossed is the stream announcements (one more may have gone
        # each way since the listing above: one every 2 s)
        cells = row.split()[-7:]
        self.assertEqual((cells[2], cells[5], cells[6]), ("B)", "B)", "0"), row)
        for packets, way in ((cells[0], "in"), (cells[3], "out")):
            self.assertIn(int(packets) - listed["a"][f"rtcp_{way}"], (0, 1), row)

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
    def test_accepting_half_learns_its_peer_and_refuses_the_way_back(self):
        """Once up, B's accepting half lists A's media address (learnt from A's checks),
        and a link B -> A in the same conference would close a cycle of two: refused."""
        a, b = self.mds
        code, _, err = yield self.provider(a.url, "links", "create", "weekly", "--to", b.url)
        self.assertEqual(code, 0, err)
        yield self.wait_states(["up"])
        code, listed, err = yield self.provider(b.url, "links", "list", "weekly")
        self.assertEqual([link["peer"] for link in listed["links"]],
                         [{"host": "127.0.0.1", "port": a.conferences.media_port}])
        code, _, err = yield self.provider(b.url, "links", "create", "weekly", "--to", a.url)
        self.assertEqual(code, 1)
        self.assertIn("would close a cycle", err)
        self.assertEqual((yield self.states(a)), ["up"])  # the half made at A went again

    @defer.inlineCallbacks
    def test_restart_restores_conference_and_link(self):
        """A restarted MD (either end) has its conference and link again, with the same id,
        and the link comes up with no provider call: the saved state (md/state.py)."""
        a, b = self.mds
        code, body, err = yield self.provider(a.url, "links", "create", "weekly", "--to", b.url)
        self.assertEqual(code, 0, err)
        ids = [body["opened"]["id"], body["accepted"]["id"]]
        yield self.wait_states(["up"])
        for index in (1, 0):  # the accepting MD, then the opening one
            yield self.restart(index)
            restarted = self.mds[index]
            self.assertEqual([c.conference_id for c in restarted.conferences.conferences()],
                             ["weekly"])
            self.assertEqual(restarted.conferences.conference("weekly").kd_fingerprint,
                             bytes.fromhex(KD_FP.replace(":", "")))
            yield self.wait_states(["up"])
            for md, link_id in zip(self.mds, ids, strict=True):
                code, listed, err = yield self.provider(md.url, "links", "list", "weekly")
                self.assertEqual([link["id"] for link in listed["links"]], [link_id])
        # the state file holds no participant and is the MD's own (0600)
        path = os.path.join(self.dir, "md-b-state.json")
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        with open(path) as f:
            saved = json.load(f)
        self.assertEqual(sorted(saved), ["conferences", "links", "version"])
        # a deleted conference is not restored, nor its links
        self.mds[1].conferences.delete("weekly")
        yield self.restart(1)
        self.assertEqual(self.mds[1].conferences.conferences(), [])
        code, _, err = yield self.provider(self.mds[1].url, "links", "list", "weekly")
        self.assertEqual(code, 1)
        self.assertIn("(404)", err)

    @defer.inlineCallbacks
    def test_refusals(self):
        a, b = self.mds
        code, _, err = yield self.provider(a.url, "links", "list", "nope")
        self.assertEqual(code, 1)
        self.assertIn("(404)", err)
        code, _, err = yield self.provider(a.url, "links", "create", "nope", "--to", b.url)
        self.assertEqual(code, 1)
        self.assertIn("(404)", err)
