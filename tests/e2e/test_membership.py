"""Only current members get keys (issue 10 items 1 and 2), with real daemons.

A real perc-kmf, perc-md and perc-kd (twistd) and reference endpoints, as in
:mod:`tests.e2e.test_conference`:

* withdrawing a participant's invitation while it is in the call closes its
  association at once (the KMF's invitation-withdrawn event reaches the KD),
  the others move to a new epoch without it, and it gets no later EKTKey:
  nothing sent after the uninvite is under a key it holds;
* a user invited to one conference cannot join another's media group with
  that conference's identity assertion (the MD names its conference in
  SignAnswer, the KD refuses the mismatch, the MD checks the signed answer),
  and a sender no roster of the conference names is reported as a failure by
  the reference endpoint, not counted away;
* the KMF's HTTPS key service (seed 1 section 6.3) serves the EKT key a member
  holds, used as a user agent would (after the join, its DTLS certificate as
  TLS client certificate), and nobody else: an invitee who never joined, a
  member who left and logs in again, the same identity from another
  certificate.
"""

from __future__ import annotations

import os
from urllib.parse import quote

from twisted.internet import defer, reactor

from perc_daemons.endpoint.https import load_ca
from perc_daemons.endpoint.kmf import KmfClient, KmfRefused
from perc_daemons.endpoint.md import JoinRefused, MdClient
from perc_daemons.protocol.dtls import certificate_fingerprint, generate_certificate
from perc_daemons.protocol.participant import (
    DecryptFailed,
    MediaReceived,
    build_offer,
    new_ice_credentials,
    new_tls_id,
)
from tests.e2e.conference_support import (
    ColludingMd,
    StackTestCase,
    full_ekt_spi,
    is_rtp,
    rtp_header,
    wait_for,
)


class MembershipTests(StackTestCase):

    async def _uninvite(self, user: str) -> None:
        token = await self.stack.admin_token()
        identity = quote(self.stack.identity(user), safe="")
        code, body = await self.stack.request(
            "DELETE", f"{self.stack.kmf_url}/v1/conferences/{self.conference}/invitations/"
                      f"{identity}", token=token)
        self.assertEqual(code, 200, body)

    async def _login(self, user: str, certificate: tuple[bytes, object] | None = None
                     ) -> KmfClient:
        der, key = certificate or generate_certificate(f"test {user}")
        client = KmfClient(reactor, self.stack.kmf_url, ca=load_ca(self.stack.ca_path),
                           certificate=(der, key))
        self.addCleanup(client.close)
        await client.login(user, self.stack.password)
        return client

    async def _key_when_admitted(self, client: KmfClient) -> tuple[int, bytes]:
        """The key service's answer once the KD's roster report names us (it follows
        the EKTKey by a KMF round trip)."""
        result: list[tuple[int, bytes]] = []

        async def ask() -> bool:
            try:
                result.append(await client.conference_key(self.conference))
            except KmfRefused as e:
                if e.status != 403 or "Not admitted" not in str(e):
                    raise
                return False
            return True

        deadline = reactor.seconds() + 10
        while not await ask():
            self.assertLess(reactor.seconds(), deadline, "never admitted by the key service")
            await wait_for(lambda: True, "a moment", timeout=0.2)
        return result[0]

    async def assertNotAdmitted(self, client: KmfClient) -> None:
        try:
            await client.conference_key(self.conference)
        except KmfRefused as e:
            self.assertEqual(e.status, 403, str(e))
            self.assertIn("Not admitted", str(e))
        else:
            self.fail("the key service answered a non-member")

    async def test_withdrawn_invitation_closes_the_member_and_rekeys_without_it(self) -> None:
        eps = await self.join("alice", "bob", "carol")
        alice, bob, carol = eps["alice"], eps["bob"], eps["carol"]
        sending = alice.run_media(30.0)
        await wait_for(lambda: len(carol.received(alice.ssrc)) >= 20,
                       "carol decrypts alice's media")
        carol_spis = set(carol.epochs_installed)
        carol_association = carol.joined.association
        uninvited_at = reactor.seconds()
        await self._uninvite("carol")
        # at once, without anyone else leaving: carol's session is closed by the KD ...
        await wait_for(lambda: carol.closed_reason is not None, "carol's session closed")
        # ... the MD drops her leg (EndpointDisconnect) ...
        await self._wait_leg_gone(carol_association)
        # ... and alice and bob move to a new epoch she never gets
        await wait_for(lambda: alice.installed(since=uninvited_at), "alice gets a new epoch")
        await self.same_epoch(alice, bob)
        rekeyed_at, new_spi = alice.installed(since=uninvited_at)[0]
        self.assertNotIn(new_spi, carol_spis)
        cut = rekeyed_at + 0.5  # past the old-key hold of RFC 8870 s4.3.1
        await wait_for(lambda: len(alice.rtp_sent(after=cut)) >= 25,
                       "alice sends under the new epoch")
        # a later rekey (bob leaves) reaches carol neither
        bob_left_at = reactor.seconds()
        await bob.leave()
        await wait_for(lambda: alice.installed(since=bob_left_at), "alice rekeyed again")
        await wait_for(lambda: len(alice.rtp_sent(after=alice.installed(
            since=bob_left_at)[0][0] + 0.5)) >= 10, "alice sends under the third epoch")
        alice.stop_media()
        await sending
        self.assertEqual(set(carol.epochs_installed), carol_spis, "carol got a later EKTKey")
        later = [d for t, d in alice.sent if is_rtp(d) and t > cut]
        spis = {full_ekt_spi(d) for d in later} - {None}
        self.assertTrue(spis, "no FullEKTField among alice's later packets")
        self.assertFalse(spis & carol_spis, "alice's later packets are under a key carol has")
        self.assertEqual([e for t, e in carol.events
                          if isinstance(e, MediaReceived) and t > cut], [],
                         "carol decrypted media sent after the uninvite")
        # she cannot come back: her join is refused, and the key service refuses her
        carol_again = self.endpoint("carol")
        with self.assertRaises(Exception) as refused:
            await carol_again.join()
        self.assertIn("not invited", str(refused.exception))
        self.assertIsNone(carol_again.session)

    async def _wait_leg_gone(self, association: str) -> None:
        deadline = reactor.seconds() + 15
        while any(p["association"] == association for p in await self.md_participants()):
            self.assertLess(reactor.seconds(), deadline, "the MD kept the leg")
            await wait_for(lambda: True, "a moment", timeout=0.2)

    async def test_key_service_serves_members_only(self) -> None:
        eps = await self.join("alice", "bob")
        alice, bob = eps["alice"], eps["bob"]
        # a member reads, over HTTPS with its DTLS certificate, the key it holds
        epoch, key = await self._key_when_admitted(alice.kmf)
        spi = alice.current_spi
        held = alice.session._ekt_params[spi]  # the EKTKey it got over DTLS
        self.assertEqual(key, held.key)
        # erin is invited but never joined (a colluding MD would let her listen unseen)
        erin = await self._login("erin")
        await self.assertNotAdmitted(erin)
        # alice's identity from another certificate: not the one she was admitted with
        alice_elsewhere = await self._login("alice")
        await self.assertNotAdmitted(alice_elsewhere)
        # bob leaves; the rest are rekeyed; bob logs in again with his old certificate
        left_at = reactor.seconds()
        bob_certificate = bob._certificate  # the DTLS certificate he was admitted with
        await bob.leave()
        await wait_for(lambda: alice.installed(since=left_at), "alice rekeyed")
        epoch2, key2 = await self._key_when_admitted(alice.kmf)
        self.assertGreater(epoch2, epoch)
        self.assertEqual(key2, alice.session._ekt_params[alice.current_spi].key)
        bob_again = await self._login("bob", bob_certificate)
        await self.assertNotAdmitted(bob_again)

    async def test_cross_conference_join_refused(self) -> None:
        """dave, invited only to "other", posts an offer with his "other" assertion to
        the MD's route for this conference: refused, no leg; at "other" it works."""
        await self.stack.create_conference("other", ["dave"])
        await self.stack.wait_for_kd("other")
        alice = (await self.join("alice"))["alice"]
        dave = await self._login("dave", certificate := generate_certificate("test dave"))
        assertion = await dave.assertion("other")
        md = MdClient(reactor, self.stack.md_url, ca=load_ca(self.stack.ca_path))
        self.addCleanup(md.close)

        def offer() -> str:
            ufrag, pwd = new_ice_credentials()
            return build_offer(assertion_json=assertion,
                               fingerprint=certificate_fingerprint(certificate[0]),
                               tls_id=new_tls_id(), ice_ufrag=ufrag, ice_pwd=pwd,
                               ssrc=int.from_bytes(os.urandom(4), "big"), cname="dave")

        error = await self.assertFailure(defer.ensureDeferred(md.join(self.conference,
                                                                      offer())), JoinRefused)
        self.assertEqual(error.status, 403, str(error))
        self.assertIn("for conference 'other'", error.detail, str(error))
        self.assertEqual([p["association"] for p in await self.md_participants()],
                         [alice.joined.association])
        # control: the same kind of offer at the conference it is for is admitted
        joined = await md.join("other", offer())
        await md.leave("other", joined)

    async def test_unknown_sender_in_the_conference_is_a_failure(self) -> None:
        """Packets from an SSRC that no roster of the conference lists (an intruder's
        leg, an MD injecting) are a failure at the receiver, not "no key"."""
        eps = await self.join("alice", "bob")
        alice, bob = eps["alice"], eps["bob"]
        await alice.run_media(1.0)
        await wait_for(lambda: bob.received(alice.ssrc), "bob decrypts alice")
        self.assertEqual(await bob.check_roster(), [])  # control: all senders known
        md = ColludingMd(self.stack.tap)
        sender, receiver = alice.joined.association, bob.joined.association
        datagrams = alice.rtp_sent()
        self.assertGreater(len(datagrams), 10)
        for datagram in datagrams[:-5]:  # the colluding MD saw what the MD saw
            md.forward(datagram, sender, receiver)
        stranger = (alice.ssrc ^ 0x5A5A5A5A) or 1

        def as_stranger(relay) -> None:
            packet = bytearray(relay.packet)
            packet[8:12] = stranger.to_bytes(4, "big")
            relay.packet = bytes(packet)

        seq = rtp_header(datagrams[-1]).sequence
        forged = [md.forward(d, sender, receiver, seq=(seq + 100 + n) & 0xFFFF,
                             tamper=as_stranger) for n, d in enumerate(datagrams[-5:])]
        events = bob.inject(forged)
        failures = [e for e in events if isinstance(e, DecryptFailed)]
        self.assertEqual({e.ssrc for e in failures}, {stranger}, events)
        problems = await bob.check_roster()
        self.assertTrue(any("unknown sender" in p and f"{stranger:#010x}" in p
                            for p in problems), problems)
        self.assertIn(problems[0], bob.failures)
