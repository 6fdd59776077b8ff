"""A private conference end to end: real perc-kmf, perc-md and perc-kd (twistd), real endpoints.

Every test starts its own :class:`~perc_daemons.demo.stack.LocalStack` (see
:mod:`tests.e2e.conference_support`) with the recording tunnel tap, and
checks one PERC property (RFC 8871) against the running daemons:

* media among three endpoints decrypts byte for byte, both ways;
* an uninvited identity gets no answer, no key and no place in the roster;
* a token or an identity assertion cannot be moved to another certificate;
* a departed member cannot decrypt what is sent after it left, even with an
  MD that kept its hop-by-hop keys (forward secrecy of epochs, RFC 8871 s5.2);
* a late joiner cannot decrypt what was sent before it joined;
* an MD that alters media (payload, OHB, EKTField) is detected by receivers
  (RFC 8723 s5.3);
* nothing the MD was sent, nor its log, holds an end-to-end or EKT key.

The "colluding MD" (:class:`~tests.e2e.conference_support.ColludingMd`) uses
the outer keys the real MD got in MediaKeys (seen by the tap) to do exactly
what the MD could do with them, and feeds the result to a real session.
"""

from __future__ import annotations

import base64
import os

from twisted.internet import defer, reactor

from perc_daemons.demo.stack import sleep
from perc_daemons.endpoint.https import ClientTlsPolicy, HttpsClient, load_ca
from perc_daemons.endpoint.kmf import KmfClient
from perc_daemons.endpoint.md import JoinRefused, MdClient
from perc_daemons.protocol.dtls import (
    certificate_fingerprint,
    format_fingerprint,
    generate_certificate,
)
from perc_daemons.protocol.participant import (
    DecryptFailed,
    MediaReceived,
    build_offer,
    new_ice_credentials,
    new_tls_id,
)
from perc_daemons.protocol.rtp import header_length
from tests.e2e.conference_support import (
    NO_KEY_REASONS,
    ColludingMd,
    StackTestCase,
    assert_undecryptable,
    full_ekt_spi,
    is_rtp,
    leaks,
    rtp_header,
    wait_for,
)

#: Every receiver must have decrypted at least this share of each sender's packets.
MIN_DELIVERY = 0.9
#: Reasons a packet under an epoch the receiver never had is dropped for.


class ConferenceTests(StackTestCase):

    # --- 1 ----------------------------------------------------------------------------

    async def test_media_is_identical_after_decryption(self) -> None:
        """alice, bob and carol send at once; every decrypted payload is the one sent."""
        eps = await self.join("alice", "bob", "carol")
        await defer.gatherResults([ep.run_media(2.0) for ep in eps.values()],
                                  consumeErrors=True)
        sent = {user: ep.sent_payloads(ep.source) for user, ep in eps.items()}
        for user, ep in eps.items():
            self.assertGreater(len(sent[user]), 50, f"{user} sent too little")
            self.assertEqual(len(sent[user]), len(ep.rtp_sent()),
                             f"{user}: every SRTP datagram sent came from its source")

        def delivered() -> bool:
            return all(len({e.sequence for e in ep.received(other.ssrc)})
                       >= MIN_DELIVERY * len(sent[o])
                       for ep in eps.values() for o, other in eps.items() if other is not ep)

        await wait_for(delivered, f"every receiver decrypted {MIN_DELIVERY:.0%} of each "
                                  "sender's packets")
        await sleep(reactor, 0.3)  # whatever is still in flight
        for user, ep in eps.items():
            self.assertEqual(ep.decrypt_failures(), [], f"{user}: decrypt failures")
            self.assertEqual(ep.unattributed_decrypt_failures, 0)
            senders = {other.ssrc: o for o, other in eps.items() if o != user}
            for event in ep.received():
                self.assertIn(event.ssrc, senders, f"{user} decrypted an unknown SSRC")
                expected = sent[senders[event.ssrc]].get((event.ssrc, event.sequence))
                self.assertIsNotNone(expected, f"{user}: {senders[event.ssrc]} never sent "
                                               f"sequence {event.sequence}")
                self.assertEqual(event.payload, expected,
                                 f"{user}: payload of {senders[event.ssrc]} "
                                 f"#{event.sequence} differs")
            for ssrc, other in senders.items():
                got = {e.sequence for e in ep.received(ssrc)}
                self.assertGreaterEqual(len(got), MIN_DELIVERY * len(sent[other]),
                                        f"{user} got {len(got)} of {len(sent[other])} "
                                        f"packets from {other}")
                self.assertLessEqual(len(got), len(sent[other]))

    # --- 2 ----------------------------------------------------------------------------

    async def test_uninvited_identity_refused(self) -> None:
        """dave (not invited): 403 from the KD via the MD, no leg, no datagram, no roster entry."""
        alice = (await self.join("alice"))["alice"]
        dave = self.endpoint("dave")
        error = await self.assertFailure(dave.join(), JoinRefused)
        self.assertEqual(error.status, 403, str(error))
        self.assertIn("not invited", error.detail, str(error))
        self.assertEqual(dave.identity, "dave@localhost")  # he did sign in
        self.assertEqual(len(dave.offers), 1)  # and did offer
        self.assertIsNone(dave.joined)
        self.assertIsNone(dave.session)
        self.assertEqual(dave.sent, [], "dave sent a datagram")
        participants = await self.md_participants()
        self.assertEqual([p["association"] for p in participants], [alice.joined.association])
        bob = (await self.join("bob"))["bob"]
        participants = await self.md_participants()
        self.assertEqual(sorted(p["association"] for p in participants),
                         sorted([alice.joined.association, bob.joined.association]))
        for ep in (alice, bob):
            roster = await ep.kmf.verified_roster(self.conference, now=reactor.seconds())
            names = {m.identity for m in roster.members}
            self.assertEqual(names, {"alice@localhost", "bob@localhost"})
        self.assertEqual(dave.sent, [])

    # --- 3 ----------------------------------------------------------------------------

    async def _kmf_login(self, user: str) -> tuple[KmfClient, bytes, object]:
        der, key = generate_certificate(f"test {user}")
        client = KmfClient(reactor, self.stack.kmf_url, ca=load_ca(self.stack.ca_path),
                           certificate=(der, key))
        self.addCleanup(client.close)
        await client.login(user, self.stack.password)
        return client, der, key

    async def test_token_bound_to_certificate(self) -> None:
        """alice's token presented with another certificate gets no assertion (RFC 8705)."""
        alice, der_a, _ = await self._kmf_login("alice")
        self.assertIn("assertion", await alice.assertion(self.conference))  # control
        der_b, key_b = generate_certificate("test thief")
        thief = HttpsClient(reactor, self.stack.kmf_url,
                            ClientTlsPolicy(load_ca(self.stack.ca_path),
                                            client_certificate=(der_b, key_b)))
        self.addCleanup(thief.close)
        token = alice._token  # stolen
        self.assertIsNotNone(token)
        for der in (der_b, der_a):
            code, _, content = await thief.json(
                "POST", "/v1/identity/assertions",
                {"fingerprints": [format_fingerprint(certificate_fingerprint(der))],
                 "audience": self.conference}, token=token)
            self.assertEqual(code, 401, content[:500])
            self.assertIn(b"certificate binding", content)
            self.assertNotIn(b'"assertion"', content)

    async def test_assertion_for_another_certificate_refused(self) -> None:
        """An assertion for certificate A in an offer whose a=fingerprint is B's: 403."""
        alice, der_a, _ = await self._kmf_login("alice")
        assertion = await alice.assertion(self.conference)
        md = MdClient(reactor, self.stack.md_url, ca=load_ca(self.stack.ca_path))
        self.addCleanup(md.close)

        def offer(der: bytes) -> str:
            ufrag, pwd = new_ice_credentials()
            return build_offer(assertion_json=assertion, fingerprint=certificate_fingerprint(der),
                               tls_id=new_tls_id(), ice_ufrag=ufrag, ice_pwd=pwd,
                               ssrc=int.from_bytes(os.urandom(4), "big"), cname="test")

        der_b, _ = generate_certificate("test other")
        error = await self.assertFailure(
            defer.ensureDeferred(md.join(self.conference, offer(der_b))), JoinRefused)
        self.assertEqual(error.status, 403, str(error))
        self.assertIn("certificate", error.detail.lower(), str(error))
        self.assertEqual(await self.md_participants(), [])
        # control: the same assertion with its own certificate's fingerprint is accepted
        joined = await md.join(self.conference, offer(der_a))
        self.assertEqual([p["association"] for p in await self.md_participants()],
                         [joined.association])
        await md.leave(self.conference, joined)
        self.assertEqual(await self.md_participants(), [])

    # --- 4 ----------------------------------------------------------------------------

    async def test_departed_member_cannot_decrypt_later_media(self) -> None:
        """carol leaves at the MD but keeps her session; alice's later packets, even
        re-sealed for carol by an MD that kept the hop keys, do not decrypt for her."""
        eps = await self.join("alice", "bob", "carol")
        alice, bob, carol = eps["alice"], eps["bob"], eps["carol"]
        sending = alice.run_media(30.0)
        await wait_for(lambda: len(carol.received(alice.ssrc)) >= 20,
                       "carol decrypts alice's media")
        carol_spis = set(carol.epochs_installed)
        left_at = reactor.seconds()
        await carol.md.leave(self.conference, carol.joined)  # the MD only: session kept
        await wait_for(lambda: alice.installed(since=left_at), "alice gets a new epoch")
        rekeyed_at, new_spi = alice.installed(since=left_at)[0]
        self.assertNotIn(new_spi, carol_spis)
        cut = rekeyed_at + 0.5  # past the old-key hold of RFC 8870 s4.3.1 (250 ms)
        await wait_for(lambda: len(alice.rtp_sent(after=cut)) >= 25,
                       "alice sends under the new epoch")
        alice.stop_media()
        await sending
        self.assertTrue(carol.session.ready, "carol's session was ended")
        self.assertEqual(set(carol.epochs_installed), carol_spis)
        # the colluding MD: every alice datagram, in order (outer ROC tracking)
        md = ColludingMd(self.stack.tap)
        later = []
        for when, datagram in ((t, d) for t, d in alice.sent if is_rtp(d)):
            resealed = md.forward(datagram, alice.joined.association, carol.joined.association)
            if when > cut:
                later.append((datagram, resealed))
        self.assertGreaterEqual(len(later), 25)
        spis = {full_ekt_spi(d) for d, _ in later} - {None}
        self.assertTrue(spis, "no FullEKTField among alice's later packets")
        self.assertFalse(spis & set(carol.session.epochs_seen),
                         f"alice's later SPIs {spis} were installed at carol")
        self.assertFalse(spis & carol_spis)
        assert_undecryptable(self, carol, [r for _, r in later], alice,
                             "carol decrypted alice's media after leaving")
        # bob, still a member, decrypted alice's later packets
        self.assertTrue({e.sequence for e in bob.received(alice.ssrc)}
                        & {rtp_header(d).sequence for d, _ in later})

    # --- 5 ----------------------------------------------------------------------------

    async def test_late_joiner_cannot_decrypt_earlier_media(self) -> None:
        """Packets alice sent before erin joined, re-sealed for erin: none decrypts."""
        eps = await self.join("alice", "bob")
        alice, bob = eps["alice"], eps["bob"]
        await defer.gatherResults([alice.run_media(1.5), bob.run_media(1.5)],
                                  consumeErrors=True)
        recorded = alice.rtp_sent()
        early_spis = {full_ekt_spi(d) for d in recorded} - {None}
        self.assertTrue(early_spis)
        erin = (await self.join("erin"))["erin"]
        await self.same_epoch(alice, bob, erin)
        self.assertFalse(early_spis & set(erin.epochs_installed),
                         "erin was given an epoch in use before she joined")
        md = ColludingMd(self.stack.tap)
        resealed = [md.forward(d, alice.joined.association, erin.joined.association)
                    for d in recorded]
        events = erin.inject(resealed)
        self.assertEqual([e for e in events if isinstance(e, MediaReceived)], [])
        failures = [e for e in events if isinstance(e, DecryptFailed)]
        self.assertEqual(len(failures), len(recorded), events)
        self.assertEqual({e.ssrc for e in failures}, {alice.ssrc})
        reasons = {e.reason for e in failures}
        self.assertLessEqual(reasons, NO_KEY_REASONS, reasons)
        self.assertIn("ekt_unknown_spi", reasons)
        # control: what alice sends now, through the same path, decrypts for erin
        fresh = [alice.session.send_media(os.urandom(160), timestamp=i * 160,
                                          now=reactor.seconds()) for i in range(3)]
        await sleep(reactor, 0.4)  # alice's old-key hold ends (RFC 8870 s4.3.1)
        fresh += [alice.session.send_media(os.urandom(160), timestamp=(3 + i) * 160,
                                           keyframe=True, now=reactor.seconds())
                  for i in range(3)]
        events = erin.inject(md.forward(d, alice.joined.association, erin.joined.association)
                             for d in fresh)
        got = [e for e in events if isinstance(e, MediaReceived)]
        self.assertTrue(got, f"the control did not decrypt: {events}")
        self.assertEqual({e.ssrc for e in got}, {alice.ssrc})

    # --- 6 ----------------------------------------------------------------------------

    async def test_md_tampering_detected(self) -> None:
        """alice's packets altered by the MD (payload, OHB, EKTField) fail at bob."""
        eps = await self.join("alice", "bob")
        alice, bob = eps["alice"], eps["bob"]
        await alice.run_media(1.0)
        await wait_for(lambda: bob.received(alice.ssrc), "bob decrypts alice")
        md = ColludingMd(self.stack.tap)
        sender, receiver = alice.joined.association, bob.joined.association
        last = rtp_header(alice.rtp_sent()[-1]).sequence
        for datagram in alice.rtp_sent():  # the colluding MD has seen what the MD saw
            md.forward(datagram, sender, receiver)
        outer_seq = [last + 1000]

        def fresh(keyframe: bool = False) -> tuple[bytes, bytes]:
            payload = os.urandom(160)
            return payload, alice.session.send_media(payload, timestamp=0x1000,
                                                     keyframe=keyframe, now=reactor.seconds())

        def forward(datagram: bytes, tamper=None) -> list:
            outer_seq[0] = (outer_seq[0] + 1) & 0xFFFF  # fresh, original kept in the OHB
            resealed = md.forward(datagram, sender, receiver, seq=outer_seq[0], tamper=tamper)
            return bob.inject([resealed])

        def flip_inner(relay) -> None:
            packet = bytearray(relay.packet)
            packet[header_length(packet) + 7] ^= 0x04
            relay.packet = bytes(packet)

        def corrupt_ohb_seq(relay) -> None:
            packet = bytearray(relay.packet)
            self.assertEqual(packet[-1] & 0x01, 0x01, "SEQ not recorded in the OHB")
            original = int.from_bytes(packet[-3:-1], "big")
            packet[-3:-1] = ((original + 50) & 0xFFFF).to_bytes(2, "big")
            relay.packet = bytes(packet)

        def rewrite_seq_unrecorded(relay) -> None:
            packet = bytearray(relay.packet)  # SEQ changed, OHB left empty: a lie
            packet[-1] = 0x00
            packet[-3:-1] = b""
            relay.packet = bytes(packet)

        def flip_ekt(relay) -> None:
            field = bytearray(relay.ekt_field)
            self.assertEqual(field[-1], 0x02, "not a FullEKTField")
            field[0] ^= 0x01
            relay.ekt_field = bytes(field)

        def control(keyframe: bool = False) -> None:
            payload, datagram = fresh(keyframe)
            events = forward(datagram)
            self.assertEqual(len(events), 1, events)
            event = events[0]
            self.assertIsInstance(event, MediaReceived, events)
            self.assertEqual((event.ssrc, event.sequence, event.payload),
                             (alice.ssrc, rtp_header(datagram).sequence, payload))

        control()
        cases = [("inner payload bit", False, flip_inner, {"e2e_auth"}),
                 ("OHB original SEQ", False, corrupt_ohb_seq, {"e2e_auth"}),
                 ("SEQ rewritten, not recorded", False, rewrite_seq_unrecorded, {"e2e_auth"}),
                 ("EKTField bit", True, flip_ekt, {"ekt_unwrap_failed"})]
        for what, keyframe, tamper, reasons in cases:
            _, datagram = fresh(keyframe)
            events = forward(datagram, tamper)
            self.assertEqual(len(events), 1, f"{what}: {events}")
            event = events[0]
            self.assertIsInstance(event, DecryptFailed, f"{what}: {events}")
            self.assertEqual(event.ssrc, alice.ssrc, f"{what}: not attributed to alice")
            self.assertIn(event.reason, reasons, what)
        control(keyframe=True)
        self.assertEqual(bob.unattributed_decrypt_failures, 0)

    # --- 7 ----------------------------------------------------------------------------

    async def test_md_never_gets_an_inner_or_ekt_key(self) -> None:
        """Nothing the MD was sent, nor its log, holds any end-to-end or EKT key."""
        eps = await self.join("alice", "bob", "carol")
        alice, bob, carol = eps["alice"], eps["bob"], eps["carol"]
        running = [alice.run_media(3.0), bob.run_media(3.0)]
        await carol.run_media(1.0)
        left_at = reactor.seconds()
        await carol.leave()
        await wait_for(lambda: alice.installed(since=left_at) and bob.installed(since=left_at),
                       "alice and bob get a new epoch")
        await defer.gatherResults(running, consumeErrors=True)
        await wait_for(lambda: len(bob.received(alice.ssrc, since=left_at + 0.5)) > 10,
                       "bob decrypts alice under the new epoch")
        for ep in (alice, bob):
            await ep.leave()
        participants = await self.md_participants()
        self.assertEqual(participants, [])

        audit = [(f"{user}'s secret #{i}", secret) for user, ep in eps.items()
                 for i, secret in enumerate(ep.session.audit_secrets())]
        # inner keys and salts of three endpoints, epoch keys: plenty
        self.assertGreaterEqual(len(audit), 3 * 6)
        tap = self.stack.tap
        md_output = bytes(self.stack.children["md"].output)
        self.assertIn(b"perc", md_output.lower())  # it did log
        haystacks = [("the tunnel (KD to MD)", bytes(tap.to_md)),
                     ("the tunnel (MD to KD)", bytes(tap.to_kd)),
                     ("the MD's log output", md_output)]
        haystacks += [(f"a datagram from {user}", d) for user, ep in eps.items()
                      for _, d in ep.sent]
        haystacks += [(f"{user}'s offer", offer.encode()) for user, ep in eps.items()
                      for offer in ep.offers]
        rundir = os.path.join(self.stack.dir, "run-md")
        for name in os.listdir(rundir):
            path = os.path.join(rundir, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    haystacks.append((f"run-md/{name}", f.read()))
        self.assertEqual(sum(len(ep.offers) for ep in eps.values()), 3)
        self.assertGreater(sum(len(ep.sent) for ep in eps.values()), 200)
        self.assertEqual(leaks(audit, haystacks), [])
        # positive control: the same search finds the hop-by-hop keys the MD does get
        hop = ColludingMd(tap).hop_keys()
        self.assertGreaterEqual(len(hop), 3 * 4)
        for key in hop:
            self.assertTrue(leaks([("hop key", key)], [("the tunnel", bytes(tap.to_md))]))
        self.assertFalse({k for _, k in audit} & set(hop))
        # ... and an end-to-end key in any of the searched encodings, at any offset
        label, secret = audit[0]
        for offset in range(3):
            blob = os.urandom(offset) + secret + os.urandom(3)
            for text in (base64.b64encode(blob), base64.urlsafe_b64encode(blob).rstrip(b"="),
                         blob.hex().encode(), blob.hex().upper().encode()):
                self.assertTrue(leaks([(label, secret)], [("a synthetic leak", b"x" + text)]))
