"""perc-kd restarted under a conference cascaded over three perc-md processes (issue 12).

The chain ``md - md2 - md3`` as test_cascade builds it
(:class:`~tests.e2e.cascade_support.CascadeChainMixin`), alice on md, bob
on md2, carol on md3, media among all three.  Then perc-kd stops gracefully
and starts again, knowing nothing: no ``[tunnel] mds``, no association.  It
recovers as it does for one MD (tests.e2e.test_conference_faults
``KdRestartTests``):

* it learns all three MDs again from the KMF's conference record
  (``GET /v1/media-distributors`` when its event stream connects) and
  reconnects to each; every MD reports it connected;
* each MD lists its associations on the new tunnel (``Associations``,
  docs/PROTOCOL.md); the KD, holding none of them, starts an epoch without
  them and reports a roster that omits them; each endpoint, orphaned, joins
  again by itself (``OrphanWatch``) at the MD it was on;
* meanwhile the MDs keep forwarding with the hop-by-hop keys they have
  (RFC 8871 s4: the KD is not on the media path);
* after the rejoins media flows among all three again, byte-identical
  (only the outer layer is replaced per hop, RFC 8723 s5.2), with no
  decrypt failure in the steady state; a new member (erin, on md2) is
  admitted and keyed, the KD counts the members right, every roster
  verifies, and bob leaving rekeys every remaining member on every MD
  without him (RFC 8871 s6).

The time from the KD's start to media flowing again among all three (every
receiver decrypting, on its new association, what every sender sent on its
new one) goes to the test log with the other figures; no time is asserted.

:class:`MiddleMdRestartTests`: the middle MD killed (SIGKILL) and started
again, alice on md, bob on md2, carol and erin on md3:

* while it is down, carol and erin (both on md3) keep hearing each other;
* the restarted md2 has the conference and both links again from its state
  file (md/state.py), same ids, with no provider call; the links come up
  (md2 opens the one to md3; md re-opens the one to md2 when its consent
  check finds md2's association gone);
* alice, carol and erin then hear each other across md2 again **without
  rejoining** (same association, no rejoin recorded);
* bob, whose hop-by-hop keys died with md2, joins again by himself (the KD
  forgets his association when md2's listing lacks it, rekeys the others,
  and the next roster omits him), and is heard by all and hears all.
"""

from __future__ import annotations

import re
import signal
from typing import Any

from twisted.internet import defer, reactor
from twisted.logger import Logger

from perc_daemons.demo.stack import sleep
from tests.e2e.cascade_support import CascadeChainMixin, flowing_at, wait_hearing
from tests.e2e.conference_support import RecordingEndpoint, StackTestCase, wait_for
from tests.e2e.test_conference_faults import rejoined, stop_gracefully

#: Who joins through which MD before the restart.
PLACES = {"alice": "md", "bob": "md2", "carol": "md3"}
#: Where everyone is for the middle-MD restart: two on md3, to hear each other meanwhile.
MD_RESTART_PLACES = {"alice": "md", "bob": "md2", "carol": "md3", "erin": "md3"}
#: The member who joins after the restart, and where.
LATE, LATE_MD = "erin", "md2"
MEDIA_SECONDS = 300.0  # "until stopped": stop_media() / leave() end it
DEADLINE = 30.0  # generous: waiting, never asserted


class KdRestartCascadeTests(CascadeChainMixin, StackTestCase):
    timeout = 120

    async def test_kd_restart_recovers_every_md(self) -> None:
        """perc-kd restarted: it reconnects to md, md2 and md3, the members rejoin by
        themselves, media flows among all three again, a joiner is keyed and a leave
        rekeys every MD's members without the leaver."""
        stack, cid = self.stack, self.conference
        started = reactor.seconds()
        figures: dict[str, Any] = {}
        await self.create_chain([*PLACES, LATE])
        eps = await self.join_places(PLACES)
        everyone = dict(eps)  # eps: the members; everyone: whoever ever joined
        await self.same_epoch(*eps.values())
        sending = [ep.run_media(MEDIA_SECONDS) for ep in eps.values()]
        try:
            await wait_hearing(list(eps.values()), "media among all three across the links")
            for user, ep in eps.items():
                self.assertEqual(ep.decrypt_failures(), [], f"{user} before the restart")
            await self.wait_members(3)
            old = {user: ep.joined.association for user, ep in eps.items()}

            # --- perc-kd stops: the MDs keep forwarding with the hop keys they have ---
            await stop_gracefully(self, stack, "kd")
            await self.wait_kd_connected(False)
            await wait_hearing(list(eps.values()), "media while perc-kd is down",
                               since=reactor.seconds())

            # --- perc-kd starts again: all three MDs, learnt from the KMF -----------
            restart_at = reactor.seconds()
            await stack.start("kd")
            figures["kd healthy (s)"] = round(reactor.seconds() - restart_at, 2)
            await self.wait_kd_connected(True)
            figures["kd connected at every MD (s)"] = round(reactor.seconds() - restart_at, 2)
            kd_log = stack.children["kd"].text()  # this run's output only
            self.assertIn("no [tunnel] mds configured: connecting to the MDs the KMF names",
                          kd_log)
            for md in stack.md_names:
                address = f"localhost:{stack.md_tunnel_port(md)}"
                self.assertIn(f"perc-kd: connecting to the MD at {address}", kd_log)
                self.assertIn(f"tunnel up: md {address}", kd_log)

            # --- each MD lists its association: an epoch without it; all rejoin ------
            await wait_for(lambda: all(rejoined(ep) for ep in eps.values()),
                           f"all three rejoined by themselves: "
                           f"{[ep.rejoins for ep in eps.values()]}", timeout=DEADLINE)
            kd_log = stack.children["kd"].text()
            for md in stack.md_names:
                address = re.escape(f"localhost:{stack.md_tunnel_port(md)}")
                self.assertRegex(kd_log, rf"md {address} forwards for 1 association\(s\) "
                                         rf"of {cid} this KD does not know")
            for user, ep in eps.items():
                self.assertEqual([r["outcome"] for r in ep.rejoins], ["ok"], ep.rejoins)
                self.assertEqual(ep.rejoins[0]["old_association"], old[user])
                self.assertNotEqual(ep.joined.association, old[user], user)
                self.assertIsNone(ep.closed_reason, user)
            figures["rejoined, keyed (s after kd start)"] = {
                user: round(ep.installed(since=restart_at)[0][0] - restart_at, 2)
                for user, ep in eps.items()}
            await self.assert_participants(eps, PLACES)  # the orphaned ones are gone

            # --- media among all three again --------------------------------------
            flowing: list[float | None] = [None]

            def media_again() -> bool:
                flowing[0] = flowing_at(eps, restart_at)
                return flowing[0] is not None

            await wait_for(media_again, "every receiver decrypts every sender, both on "
                                        "their new associations", timeout=DEADLINE)
            assert flowing[0] is not None
            figures["kd start to media among all three (s)"] = round(
                flowing[0] - restart_at, 2)
            await self.assert_steady(eps, "after the restart")
            self.assert_byte_identical(eps)
            await self.wait_members(3)
            await self.assert_rosters(eps)

            # --- a new member, keyed by the new KD ----------------------------------
            eps.update(await self.join(LATE, md=LATE_MD))
            erin = everyone[LATE] = eps[LATE]
            self.assertTrue(erin.profile.startswith("DOUBLE"), erin.profile)
            sending.append(erin.run_media(MEDIA_SECONDS))
            places = {**PLACES, LATE: LATE_MD}
            await self.assert_participants(eps, places)
            await self.assert_steady(eps, f"with {LATE}")
            self.assertEqual(erin.rejoins, [])
            await self.wait_members(4)
            await self.assert_rosters(eps)

            # --- bob leaves at md2: every MD's members rekeyed without him ----------
            bob = eps.pop("bob")
            bob_spis = set(bob.epochs_installed)
            left_at = reactor.seconds()
            await bob.leave()
            await wait_for(lambda: all(ep.installed(since=left_at) for ep in eps.values()),
                           "every remaining member, on every MD, gets a new epoch",
                           timeout=DEADLINE)
            new_spi = await self.same_epoch(*eps.values())
            self.assertNotIn(new_spi, bob_spis)
            self.assertEqual(await self.assert_steady(eps, "after bob left"), new_spi)
            self.assertEqual(set(bob.epochs_installed), bob_spis)
            await self.wait_members(3)
            await self.assert_participants(eps, places)  # md2: erin only
            await self.assert_rosters(eps)
            self.assert_byte_identical(everyone)
            for ep in everyone.values():
                self.assertEqual(ep.failures, [], ep.stats())
        finally:
            for ep in everyone.values():
                ep.stop_media()
            await defer.gatherResults(sending, consumeErrors=True)
        figures["decrypted"] = {
            user: {o: len({e.sequence for e in ep.received(other.ssrc)})
                   for o, other in everyone.items() if other is not ep}
            for user, ep in everyone.items()}
        figures["rejoin connect (s)"] = {user: ep.rejoins[0]["connect_time"]
                                         for user, ep in everyone.items() if ep.rejoins}
        figures["elapsed (s)"] = round(reactor.seconds() - started, 1)
        Logger().info("cascade KD restart figures: {figures}", figures=figures)


class MiddleMdRestartTests(CascadeChainMixin, StackTestCase):
    """perc-md2, the middle of the chain, killed with SIGKILL and started again."""

    conference = "chainrestart"
    timeout = 150

    async def link_ids(self) -> dict[str, list[str]]:
        return {md: [link["id"] for link in await self.links(md)]
                for md in self.stack.md_names}

    async def test_middle_md_killed_and_restarted(self) -> None:
        """perc-md2 killed and started again (module docstring, last part)."""
        stack, cid = self.stack, self.conference
        await self.create_chain(MD_RESTART_PLACES, title="Chain restart")
        before = await self.link_ids()
        eps = await self.join_places(MD_RESTART_PLACES)
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
        await self.wait_links_up(timeout=40.0)
        self.assertEqual(await self.link_ids(), before, "the links came back with other ids")
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
