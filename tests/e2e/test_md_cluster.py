"""Two perc-md processes of one host as one MD (issue 12: "the provider API places a new
participant on the least-loaded process and links the processes a conference spans").

md and md2 are real twistd children with ``[cluster] processes`` naming
both (md/cluster.py), as ``perc-md.service`` and ``perc-md@2.service``
would run them.  One ``perc-admin conferences create --md <md>`` creates the
conference on both processes (md's ``GET /v1/md`` lists its cluster) and
registers both tunnels at the KMF, so the KD connects to each.  Then four
endpoints all join through md's URL, as they would through the one address
the provider hands out:

* the joins are spread: two on each process (fewest participants wins, md
  on a tie), those sent to md2 by a 307 to its own join URL;
* the processes are linked once, by the conference's hub (one link in all,
  up at both ends);
* every endpoint decrypts every other's media, byte-identical, across the
  link or not;
* a join at md2's URL is placed too (any process places), a leave goes to
  the process holding the participant (its list empties), and the end at
  the KMF ends the conference on both.
"""

from __future__ import annotations

import io
import os
from typing import Any

from twisted.internet import defer, reactor
from twisted.logger import Logger

from perc_daemons.demo.stack import sleep
from perc_daemons.kmf.admin_cli import run as admin_run
from tests.e2e.conference_support import RecordingEndpoint, StackTestCase, wait_for
from tests.e2e.test_conference import MIN_DELIVERY

USERS = ("alice", "bob", "carol", "erin")


class MdClusterTests(StackTestCase):
    static_mds = False
    create_conference = False
    tap = False
    extra_mds = 1
    cluster = True
    conference = "spread"
    timeout = 120

    async def cli(self, run: Any, *argv: str, config: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = await run([*argv, "--config", os.path.join(self.stack.dir, "etc", config)],
                         reactor, stdout=out, stderr=err)
        return code, out.getvalue(), err.getvalue()

    async def md_get(self, md: str, path: str) -> tuple[int, Any]:
        return await self.stack.request("GET", self.stack.md_api_url(md) + path,
                                        token=self.stack.provider_token)

    async def participants(self, md: str) -> set[str]:
        status, body = await self.md_get(md, f"/v1/conferences/{self.conference}")
        self.assertEqual(status, 200, body)
        return {p["association"] for p in body["participants"]}

    async def test_joins_spread_over_the_processes(self) -> None:
        stack, cid = self.stack, self.conference
        _, info = await self.md_get("md", "/v1/md")
        self.assertEqual(info["cluster"], [stack.md_api_url("md"), stack.md_api_url("md2")])
        # --- one --md: the conference on both processes, the KD connected to each ------
        code, out, err = await self.cli(
            admin_run, "conferences", "create", cid, "--title", "Spread",
            *(a for user in USERS for a in ("--invite", f"{user}@localhost")),
            "--start", "--md", stack.md_api_url("md"), "--url", stack.kmf_url,
            config="admin.toml")
        self.assertEqual((code, err), (0, ""), out)
        for md in stack.md_names:
            self.assertIn(f"localhost:{stack.md_tunnel_port(md)}", out)
        self.assertEqual(out.count("kd connected to md"), 2, out)

        # --- four joins through md's URL: two on each process --------------------------
        eps: dict[str, RecordingEndpoint] = {}
        for user in USERS:
            eps.update(await self.join(user, md="md"))
        await self.same_epoch(*eps.values())
        at = {md: await self.participants(md) for md in stack.md_names}
        self.assertEqual({md: len(a) for md, a in at.items()}, {"md": 2, "md2": 2}, at)
        placed = {user: next(md for md, a in at.items() if ep.joined.association in a)
                  for user, ep in eps.items()}
        for user, ep in eps.items():  # the reference endpoint followed the 307
            self.assertEqual(ep.joined.md_url, stack.md_api_url(placed[user]), user)
        self.assertEqual(placed, {"alice": "md", "bob": "md2", "carol": "md", "erin": "md2"})
        # --- one link, made by the hub, up at both ends ------------------------------------
        links: dict[str, list[dict[str, Any]]] = {}

        async def linked() -> bool:
            for md in stack.md_names:
                _, body = await self.md_get(md, f"/v1/conferences/{cid}/links")
                links[md] = body["links"]
            return all([link["state"] for link in links[md]] == ["up"]
                       for md in stack.md_names)

        deadline = reactor.seconds() + 20
        while not await linked():
            self.assertLess(reactor.seconds(), deadline, f"link not up: {links}")
            await sleep(reactor, 0.1)
        self.assertEqual(sorted(link["role"] for md in links for link in links[md]),
                         ["client", "server"])

        # --- media among all four, across the link or not ---------------------------------
        await defer.gatherResults([ep.run_media(2.0) for ep in eps.values()],
                                  consumeErrors=True)
        sent = {user: ep.sent_payloads(ep.source) for user, ep in eps.items()}

        def delivered() -> bool:
            return all(len({e.sequence for e in ep.received(other.ssrc)})
                       >= MIN_DELIVERY * len(sent[o])
                       for ep in eps.values() for o, other in eps.items() if other is not ep)

        await wait_for(delivered, "every receiver decrypted each sender's packets")
        got: dict[str, dict[str, int]] = {}
        for user, ep in eps.items():
            self.assertEqual(ep.decrypt_failures(), [], user)
            senders = {other.ssrc: o for o, other in eps.items() if o != user}
            for event in ep.received():
                self.assertEqual(event.payload,
                                 sent[senders[event.ssrc]].get((event.ssrc, event.sequence)),
                                 f"{user}: #{event.sequence} of {senders[event.ssrc]} differs")
            got[user] = {senders[s]: len({e.sequence for e in ep.received(s)})
                         for s in senders}
        for md in stack.md_names:  # what crossed the link, both ways
            _, body = await self.md_get(md, f"/v1/conferences/{cid}/links")
            links[md] = body["links"]
        crossed = {md: (links[md][0]["rtp_in"], links[md][0]["rtp_out"])
                   for md in stack.md_names}
        for md, (rtp_in, rtp_out) in crossed.items():
            self.assertGreater(rtp_in, 50, f"{md} received little over the link")
            self.assertGreater(rtp_out, 50, f"{md} sent little over the link")

        # --- a join at md2's URL is placed too; a leave goes where the participant is ------
        before_late = await self.participants("md2")
        late = self.endpoint("alice", md="md2", label="alice-2")
        await late.join()
        now = {md: await self.participants(md) for md in stack.md_names}
        self.assertEqual(sum(len(a) for a in now.values()), 5, now)
        self.assertIn(late.joined.association, now["md"] | now["md2"])
        where = "md" if late.joined.association in now["md"] else "md2"
        self.assertEqual(late.joined.md_url, stack.md_api_url(where))
        association = late.joined.association
        await late.leave()
        self.assertNotIn(association, await self.participants(where))
        erin = eps["erin"].joined.association
        await eps["erin"].leave()
        self.assertNotIn(erin, await self.participants("md2"))
        self.assertEqual(await self.participants("md2"), before_late - {erin})

        # --- the end at the KMF ends it on both processes -----------------------------
        code, out, err = await self.cli(admin_run, "conferences", "end", cid,
                                        "--url", stack.kmf_url, config="admin.toml")
        self.assertEqual((code, err), (0, ""), out)
        gone: dict[str, int] = {}

        async def ended() -> bool:
            for md in stack.md_names:
                gone[md], _ = await self.md_get(md, f"/v1/conferences/{cid}")
            return set(gone.values()) == {404}

        deadline = reactor.seconds() + 20
        while not await ended():
            self.assertLess(reactor.seconds(), deadline, f"not ended everywhere: {gone}")
            await sleep(reactor, 0.1)
        Logger().info("cluster figures: placed {placed}, decrypted {got}, link {crossed}",
                      placed=placed, got=got, crossed=crossed)
