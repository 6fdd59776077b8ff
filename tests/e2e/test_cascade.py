"""One conference across three cascaded perc-md processes (issue 12), real twistd children.

The chain ``md - md2 - md3``: ``perc-admin conferences create --start --md``
once per MD (the KD, with no ``[tunnel] mds``, connects to every MD the KMF
names), then ``perc-provider links create`` md -> md2 and md2 -> md3 (each
MD pins the other's certificate; RFC 8871 s4.5.1: the KD does not
facilitate), alice on md, bob on md2 (the middle), carol and erin on md3.

One stack for every scenario (each start costs seconds): media among all
four byte-identical after decryption (only the outer layer is replaced per
hop, RFC 8723 s5.2), a second link to the same peer refused as a cycle,
carol leaving at md3 rekeys every member on every MD and cannot decrypt
what alice sends after it even re-sealed for her by an MD that kept the
hop-by-hop keys, and the end at the KMF reaches all three MDs.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.logger import Logger

from perc_daemons.demo.stack import sleep
from perc_daemons.kmf.admin_cli import run as admin_run
from tests.e2e.cascade_support import CHAIN, CascadeChainMixin
from tests.e2e.conference_support import (
    ColludingMd,
    StackTestCase,
    assert_undecryptable,
    full_ekt_spi,
    is_rtp,
    rtp_header,
    wait_for,
)
from tests.e2e.test_conference import MIN_DELIVERY

#: Who joins through which MD.
PLACES = {"alice": "md", "bob": "md2", "carol": "md3", "erin": "md3"}


class CascadeTests(CascadeChainMixin, StackTestCase):
    timeout = 120

    async def test_chain_of_three(self) -> None:
        stack, cid = self.stack, self.conference
        started = reactor.seconds()
        # --- the conference on three MDs, one command ------------------------------
        code, out, err = await self.cli(
            admin_run, "conferences", "create", cid, "--title", "Chain",
            *(a for user in PLACES for a in ("--invite", f"{user}@localhost")),
            "--start", *(a for md in stack.md_names for a in ("--md", stack.md_api_url(md))),
            "--url", stack.kmf_url, config="admin.toml")
        self.assertEqual((code, err), (0, ""), out)
        for md in stack.md_names:
            self.assertIn(stack.md_tunnel_address(md), out)
        self.assertEqual(out.count("kd connected to md"), 3, out)

        # --- links md -> md2 -> md3 --------------------------------------------------
        for opener, acceptor in CHAIN:
            code, out, err = await self.link(opener, acceptor)
            self.assertEqual((code, err), (0, ""), out)
        # a second link md -> md2 would close a cycle: refused, nothing left behind
        code, out, err = await self.link("md", "md2")
        self.assertEqual(code, 1, out + err)
        self.assertIn("cycle", err)
        await self.wait_links_up()
        # each MD pins its neighbour's own certificate (one each from the site CA)
        fingerprints = {}
        for md in stack.md_names:
            _, body = await stack.request("GET", stack.md_api_url(md) + "/v1/md",
                                          token=stack.provider_token)
            fingerprints[md] = body["fingerprint"]
        self.assertEqual(len(set(fingerprints.values())), 3)
        self.assertEqual({link["peer_fingerprint"] for link in await self.links("md2")},
                         {fingerprints["md"], fingerprints["md3"]})

        # --- endpoints at both ends and in the middle -----------------------------------
        eps = await self.join_places(PLACES)
        await self.same_epoch(*eps.values())

        # --- media among all four, byte-identical after decryption ---------------------
        await defer.gatherResults([ep.run_media(2.0) for ep in eps.values()],
                                  consumeErrors=True)
        sent = {user: ep.sent_payloads(ep.source) for user, ep in eps.items()}
        for user, ep in eps.items():
            self.assertGreater(len(sent[user]), 50, f"{user} sent too little")
            self.assertEqual(len(sent[user]), len(ep.rtp_sent()))

        def delivered() -> bool:
            return all(len({e.sequence for e in ep.received(other.ssrc)})
                       >= MIN_DELIVERY * len(sent[o])
                       for ep in eps.values() for o, other in eps.items() if other is not ep)

        await wait_for(delivered, f"every receiver decrypted {MIN_DELIVERY:.0%} of each "
                                  "sender's packets across the links")
        await sleep(reactor, 0.3)  # whatever is still in flight
        self.figures: dict[str, Any] = {}
        for user, ep in eps.items():
            self.assertEqual(ep.decrypt_failures(), [], f"{user}: decrypt failures")
            self.assertEqual(ep.unattributed_decrypt_failures, 0, user)
            senders = {other.ssrc: o for o, other in eps.items() if o != user}
            for event in ep.received():
                self.assertIn(event.ssrc, senders, f"{user} decrypted an unknown SSRC")
                expected_payload = sent[senders[event.ssrc]].get((event.ssrc, event.sequence))
                self.assertIsNotNone(expected_payload, f"{user}: {senders[event.ssrc]} "
                                                       f"never sent {event.sequence}")
                self.assertEqual(event.payload, expected_payload,
                                 f"{user}: payload of {senders[event.ssrc]} "
                                 f"#{event.sequence} differs")
            got = {}
            for ssrc, other in senders.items():
                got[other] = len({e.sequence for e in ep.received(ssrc)})
                self.assertGreaterEqual(got[other], MIN_DELIVERY * len(sent[other]),
                                        f"{user} got {got[other]} of {len(sent[other])} "
                                        f"from {other}")
                self.assertLessEqual(got[other], len(sent[other]))
            self.figures[user] = (len(sent[user]), got)

        # --- carol (far end) leaves; what alice sends after is not hers ---------------
        alice, bob, carol, erin = (eps[u] for u in ("alice", "bob", "carol", "erin"))
        sending = alice.run_media(30.0)
        await wait_for(lambda: len(carol.received(alice.ssrc)) >= len(sent["alice"]) + 20,
                       "carol decrypts alice's media again")
        carol_spis = set(carol.epochs_installed)
        left_at = reactor.seconds()
        await carol.md.leave(cid, carol.joined)  # at md3 only: her session is kept
        others = (alice, bob, erin)
        await wait_for(lambda: all(ep.installed(since=left_at) for ep in others),
                       "every remaining member, on every MD, gets a new epoch")
        new_spi = await self.same_epoch(*others)
        self.assertNotIn(new_spi, carol_spis)
        rekeyed_at = alice.installed(since=left_at)[0][0]
        cut = rekeyed_at + 0.5  # past the old-key hold of RFC 8870 s4.3.1 (250 ms)
        await wait_for(lambda: len(alice.rtp_sent(after=cut)) >= 25,
                       "alice sends under the new epoch")
        alice.stop_media()
        await sending
        await sleep(reactor, 0.3)
        self.assertTrue(carol.session.ready, "carol's session was ended")
        self.assertEqual(set(carol.epochs_installed), carol_spis)
        later_seqs = {rtp_header(d).sequence for d in alice.rtp_sent(after=cut)}
        self.assertFalse({e.sequence for e in carol.received(alice.ssrc)} & later_seqs,
                         "md3 still delivered alice's later media to carol")
        for ep in (bob, erin):  # the middle and carol's own MD still get it
            got = {e.sequence for e in ep.received(alice.ssrc)} & later_seqs
            self.assertGreaterEqual(len(got), MIN_DELIVERY * len(later_seqs), ep.label)
            self.assertEqual(ep.decrypt_failures(since=cut), [], ep.label)
            # alice uses the new key as soon as it reaches her (RFC 8870 s4.5); a
            # receiver the KD reaches a moment later drops those few packets
            during = ep.decrypt_failures(since=left_at)
            self.assertEqual({(e.ssrc, e.reason) for e in during} - {
                (alice.ssrc, "ekt_unknown_spi")}, set(), ep.label)
            self.assertLess(len(during), 10, ep.label)
            self.figures[f"{ep.label} drops at the rekey"] = len(during)
        # an MD that kept the hop keys (md3 holds carol's) re-seals alice's later
        # packets for carol: the outer layer verifies, the inner does not
        md = ColludingMd(endpoints=eps.values())
        later = []
        for when, datagram in ((t, d) for t, d in alice.sent if is_rtp(d)):
            resealed = md.forward(datagram, alice.joined.association, carol.joined.association)
            if when > cut:
                later.append((datagram, resealed))
        self.assertGreaterEqual(len(later), 25)
        spis = {full_ekt_spi(d) for d, _ in later} - {None}
        self.assertTrue(spis, "no FullEKTField among alice's later packets")
        self.assertFalse(spis & set(carol.session.epochs_seen))
        assert_undecryptable(self, carol, [r for _, r in later], alice,
                             "carol decrypted alice's media after leaving")

        # --- the end at the KMF reaches every MD ---------------------------------------
        code, out, err = await self.cli(admin_run, "conferences", "end", cid,
                                        "--url", stack.kmf_url, config="admin.toml")
        self.assertEqual((code, err), (0, ""), out)
        gone: dict[str, int] = {}

        async def ended() -> bool:
            for md in stack.md_names:
                gone[md], _ = await stack.request(
                    "GET", stack.md_api_url(md) + f"/v1/conferences/{cid}",
                    token=stack.provider_token)
            return set(gone.values()) == {404}

        deadline = reactor.seconds() + 20
        while not await ended():
            self.assertLess(reactor.seconds(), deadline, f"not ended at every MD: {gone}")
            await sleep(reactor, 0.1)
        self.figures["elapsed"] = round(reactor.seconds() - started, 1)
        Logger().info("cascade figures (sent, decrypted per sender): {figures}",
                      figures=self.figures)  # in _trial_temp/test.log
