"""Conference policy (issue 14) with real daemons: schedule and periodic rekey.

A real perc-kmf, perc-md and perc-kd (twistd) and reference endpoints:

* before ``starts_at - early_start`` the KD refuses a join with the
  machine-readable reason ``not_started`` (the MD's 403 problem carries it);
  moving ``starts_at`` (``PATCH``) lets the same user in;
* a conference with ``ends_at`` ends by itself on time, as ``perc-admin
  conferences end`` does: every endpoint's session closed by the KD, the
  stored keys wiped, the conference gone from the MD;
* ``rekey_interval`` 2 s: three epochs with nobody joining or leaving, each
  reaching every member and used by the senders; a member that leaves after
  epoch k holds no key of the epochs after it.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import defer, reactor

from perc_daemons.endpoint.md import JoinRefused
from tests.e2e.conference_support import StackTestCase, full_ekt_spi, is_rtp, wait_for


class _PolicyCase(StackTestCase):
    users = ("alice", "bob", "carol")
    invited = ("alice", "bob", "carol")

    async def kmf(self, method: str, suffix: str = "", body: Any = None) -> dict[str, Any]:
        token = await self.stack.admin_token()
        code, answer = await self.stack.request(
            method, f"{self.stack.kmf_url}/v1/conferences/{self.conference}{suffix}",
            token=token, body=body)
        self.assertEqual(code, 200, answer)
        return answer


class EarlyJoinTests(_PolicyCase):
    def conference_policy(self) -> dict[str, Any]:
        return {"starts_at": time.time() + 3600, "early_start": 60}

    async def test_an_early_joiner_is_refused_not_started(self) -> None:
        alice = self.endpoint("alice")
        with self.assertRaises(JoinRefused) as caught:
            await alice.join()
        self.assertEqual(caught.exception.status, 403, caught.exception)
        self.assertRegex(caught.exception.detail, r"^not_started: the conference admits "
                                                  r"endpoints from \d+ \(POSIX time\)$")
        self.assertEqual(alice.sent, [])
        # the provider moves the start: the same user is admitted
        await self.kmf("PATCH", body={"starts_at": time.time()})
        eps = await self.join("alice")
        self.assertIsNotNone(eps["alice"].current_spi)


class EndOnTimeTests(_PolicyCase):
    ENDS_IN = 12.0

    def conference_policy(self) -> dict[str, Any]:
        return {"ends_at": time.time() + self.ENDS_IN, "grace": 0}

    async def test_the_conference_ends_on_time_with_endpoints_closed(self) -> None:
        ends_at = (await self.kmf("GET"))["ends_at"]
        eps = await self.join("alice", "bob")
        self.assertLess(time.time(), ends_at, "the join took longer than the test allows")
        await wait_for(lambda: all(ep.closed_reason is not None for ep in eps.values()),
                       "every endpoint's session closed by the KD", timeout=self.ENDS_IN + 10)
        closed_at = time.time()
        self.assertGreaterEqual(closed_at, ends_at)
        self.assertLess(closed_at - ends_at, 5.0, "ended late")
        shown = await self.kmf("GET")
        self.assertEqual((shown["state"], shown["epoch"]), ("ended", None))  # keys wiped

        async def md_gone() -> bool:
            code, _ = await self.stack.request(
                "GET", f"{self.stack.md_api_url('md')}/v1/conferences/{self.conference}",
                token=self.stack.provider_token)
            return code == 404

        deadline = reactor.seconds() + 10
        while not await md_gone():
            self.assertLess(reactor.seconds(), deadline, "the MD still has the conference")
            await defer.ensureDeferred(_sleep(0.1))
        for ep in eps.values():
            self.assertFalse(ep.session.ready, ep.label)


async def _sleep(seconds: float) -> None:
    from twisted.internet import task

    await task.deferLater(reactor, seconds, lambda: None)


class PeriodicRekeyTests(_PolicyCase):
    timeout = 90

    def conference_policy(self) -> dict[str, Any]:
        return {"rekey_interval": 2}

    async def test_three_timed_epochs_and_a_departed_member_holds_none_after(self) -> None:
        eps = await self.join("alice", "bob", "carol")
        alice, bob, carol = eps["alice"], eps["bob"], eps["carol"]
        sending = alice.run_media(40.0)
        start = reactor.seconds()
        start_spis = {ep.label: len(ep.epochs_installed) for ep in eps.values()}
        # three epochs, nobody joining or leaving
        await wait_for(lambda: all(len(ep.epochs_installed) >= start_spis[ep.label] + 3
                                   for ep in eps.values()),
                       "three timed epochs at every member", timeout=20)
        self.assertEqual(len(self.endpoints), 3)
        timed = alice.installed(since=start)[:3]
        for _, spi in timed:
            for ep in (bob, carol):
                self.assertIn(spi, ep.epochs_installed, ep.label)
        # the senders use them: bob and carol decrypt alice under each timed epoch
        await wait_for(lambda: {e.spi for e in carol.received(alice.ssrc)} >= {
            spi for _, spi in timed[:2]}, "carol decrypts alice under the timed epochs")
        self.assertGreaterEqual(timed[-1][0] - timed[0][0], 2 * 2 * 0.9)
        # carol leaves after epoch k: the next epochs (leave, timer) never reach her
        carol_spis = set(carol.epochs_installed)
        left_at = reactor.seconds()
        await carol.leave()
        await wait_for(lambda: len(alice.installed(since=left_at)) >= 2,
                       "two more epochs after carol left", timeout=20)
        cut = alice.installed(since=left_at)[0][0] + 0.5  # past RFC 8870's old-key hold
        await wait_for(lambda: len(alice.rtp_sent(after=cut)) >= 25, "alice sends on")
        alice.stop_media()
        await sending
        self.assertEqual(set(carol.epochs_installed), carol_spis, "carol got a later EKTKey")
        later = [d for t, d in alice.sent if is_rtp(d) and t > cut]
        spis = {full_ekt_spi(d) for d in later} - {None}
        self.assertTrue(spis, "no FullEKTField among alice's later packets")
        self.assertFalse(spis & carol_spis, "alice's later packets are under a key carol has")
        self.assertEqual(bob.decrypt_failures(since=cut), [])
