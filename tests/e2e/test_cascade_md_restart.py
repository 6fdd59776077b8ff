"""The middle MD of a cascade killed (SIGKILL) and started again (issue 12), real twistd.

The chain ``md - md2 - md3`` as in test_cascade.py: alice on md, bob on md2
(the middle), carol and erin on md3.  perc-md2 is killed with SIGKILL while
everyone sends media, and started again with the same configuration:

* while it is down, carol and erin (both on md3) keep hearing each other;
* the restarted md2 has the conference and both links again from its state
  file (md/state.py), with no provider call; the links come up (md2 opens
  the one to md3, md re-opens the one to md2 when its consent check finds
  md2's association gone);
* alice, carol and erin then hear each other again across md2 **without
  rejoining** (same association, no rejoin recorded);
* bob, whose hop-by-hop keys died with md2, joins again by himself (the KD
  forgets his association when md2's listing lacks it, rekeys the others,
  and the next roster omits him) and is heard by all and hears all.
"""

from __future__ import annotations

import io
import os
import signal
from typing import Any

from twisted.internet import defer, reactor
from twisted.logger import Logger

from perc_daemons.demo.stack import sleep
from perc_daemons.kmf.admin_cli import run as admin_run
from perc_daemons.md.provider_cli import run as provider_run
from tests.e2e.conference_support import RecordingEndpoint, StackTestCase, wait_for

#: Who joins through which MD.
PLACES = {"alice": "md", "bob": "md2", "carol": "md3", "erin": "md3"}
MEDIA_SECONDS = 90.0


class MiddleMdRestartTests(StackTestCase):
    static_mds = False
    create_conference = False
    tap = False
    extra_mds = 2
    conference = "chainrestart"
    timeout = 150

    async def cli(self, run: Any, *argv: str, config: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = await run([*argv, "--config", os.path.join(self.stack.dir, "etc", config)],
                         reactor, stdout=out, stderr=err)
        return code, out.getvalue(), err.getvalue()

    async def link_states(self, md: str) -> list[tuple[str, str]]:
        status, body = await self.stack.request(
            "GET", self.stack.md_api_url(md) + f"/v1/conferences/{self.conference}/links",
            token=self.stack.provider_token)
        if status != 200:
            return []
        return [(link["id"], link["state"]) for link in body["links"]]

    async def wait_links_up(self, expected: dict[str, int], timeout: float = 30.0
                            ) -> dict[str, list[tuple[str, str]]]:
        states: dict[str, list[tuple[str, str]]] = {}
        deadline = reactor.seconds() + timeout
        while True:
            for md in expected:
                states[md] = await self.link_states(md)
            if all([s for _, s in states[md]] == ["up"] * n for md, n in expected.items()):
                return states
            self.assertLess(reactor.seconds(), deadline, f"links not up: {states}")
            await sleep(reactor, 0.1)

    async def test_middle_md_killed_and_restarted(self) -> None:
        stack, cid = self.stack, self.conference
        code, out, err = await self.cli(
            admin_run, "conferences", "create", cid, "--title", "Chain restart",
            *(a for user in PLACES for a in ("--invite", f"{user}@localhost")),
            "--start", *(a for md in stack.md_names for a in ("--md", stack.md_api_url(md))),
            "--url", stack.kmf_url, config="admin.toml")
        self.assertEqual((code, err), (0, ""), out)
        for opener, acceptor in (("md", "md2"), ("md2", "md3")):
            code, out, err = await self.cli(
                provider_run, "links", "create", cid, "--url", stack.md_api_url(opener),
                "--to", stack.md_api_url(acceptor), config="provider.toml")
            self.assertEqual((code, err), (0, ""), out)
        expected = {"md": 1, "md2": 2, "md3": 1}
        before = await self.wait_links_up(expected)

        eps: dict[str, RecordingEndpoint] = {}
        for user, md in PLACES.items():
            eps.update(await self.join(user, md=md))
        await self.same_epoch(*eps.values())
        associations = {user: ep.joined.association for user, ep in eps.items()}
        sending = [ep.run_media(MEDIA_SECONDS) for ep in eps.values()]
        alice, bob, carol, erin = (eps[u] for u in ("alice", "bob", "carol", "erin"))

        def hearing(since: float, pairs: list[tuple[RecordingEndpoint, RecordingEndpoint]],
                    at_least: int = 25) -> bool:
            return all(len(receiver.received(sender.ssrc, since=since)) >= at_least
                       for receiver, sender in pairs)

        everyone = [(r, s) for r in eps.values() for s in eps.values() if r is not s]
        start = reactor.seconds()
        await wait_for(lambda: hearing(start, everyone), "everyone hears everyone")

        # --- md2 killed ---------------------------------------------------------------
        killed_at = reactor.seconds()
        await stack.stop("md2", signal.SIGKILL)
        await sleep(reactor, 2.0)
        down = reactor.seconds()
        await wait_for(lambda: hearing(down, [(carol, erin), (erin, carol)]),
                       "carol and erin, both on md3, hear each other while md2 is down")
        self.assertEqual(len(carol.received(alice.ssrc, since=down + 0.5)), 0,
                         "alice reached carol with md2 down")

        # --- md2 started again: conference and links from its state file -----------------
        await stack.start("md2")
        started_at = reactor.seconds()
        status, body = await stack.request("GET", stack.md_api_url("md2")
                                           + f"/v1/conferences/{cid}",
                                           token=stack.provider_token)
        self.assertEqual((status, body.get("participants")), (200, []), body)
        after = await self.wait_links_up(expected, timeout=40.0)
        self.assertEqual(after, before, "the links came back with other ids")
        links_up_at = reactor.seconds()
        across = [(r, s) for r in (alice, carol, erin) for s in (alice, carol, erin)
                  if r is not s]
        await wait_for(lambda: hearing(links_up_at, across),
                       "alice, carol and erin hear each other across md2 again", timeout=30)
        flowing_at = reactor.seconds()
        for user in ("alice", "carol", "erin"):
            self.assertEqual(eps[user].joined.association, associations[user], user)
            self.assertEqual(eps[user].rejoins, [], f"{user} rejoined")

        # --- bob, whose keys died with md2, joins again by himself --------------------
        await wait_for(lambda: bob.joined is not None  # None while the rejoin runs
                       and bob.joined.association != associations["bob"]
                       and any(r["outcome"] == "ok" for r in bob.rejoins),
                       "bob rejoined through the restarted md2", timeout=40)
        rejoined_at = reactor.seconds()
        bob_pairs = [(bob, s) for s in (alice, carol, erin)] + [
            (r, bob) for r in (alice, carol, erin)]
        await wait_for(lambda: hearing(rejoined_at, bob_pairs),
                       "bob hears and is heard again", timeout=30)
        settled = reactor.seconds()
        await wait_for(lambda: hearing(settled, everyone, at_least=10),
                       "everyone hears everyone again")
        for ep in eps.values():
            self.assertIsNone(ep.closed_reason, ep.label)
            self.assertEqual(ep.decrypt_failures(since=settled + 0.5), [], ep.label)
        for ep in eps.values():
            ep.stop_media()
        await defer.gatherResults(sending, consumeErrors=True)
        Logger().info(
            "md2 restart figures: links up {links:.1f} s after the start, media across md2 "
            "{media:.1f} s after the start, bob rejoined {bob:.1f} s after the start; "
            "outage {outage:.1f} s (kill to media across)",
            links=links_up_at - started_at, media=flowing_at - started_at,
            bob=rejoined_at - started_at, outage=flowing_at - killed_at)
