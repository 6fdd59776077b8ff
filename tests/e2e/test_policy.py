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
  epoch k holds no key of the epochs after it, and with the keys she holds
  opens none of a sender's packets after it (fed to her with the outer layer
  off, as an MD that kept the hop keys could);
* late join (seed draft-westerlund s4.8): a member's capture of what it
  received, outer layer off (``--capture``), is decrypted by an endpoint
  that joins afterwards (``--history``) under ``late_join = "history"``,
  byte for byte what the sender sent in those epochs, WAV included; under
  the default the KMF refuses the earlier epochs' keys (403
  ``history-not-allowed``) and nothing of the recording opens.
"""

from __future__ import annotations

import os
import time
import wave
from typing import Any

from twisted.internet import defer, reactor

from perc_daemons.endpoint.kmf import KmfRefused
from perc_daemons.endpoint.md import JoinRefused
from perc_daemons.endpoint.media import ulaw_decode
from perc_daemons.protocol.errors import ProtocolError
from perc_daemons.protocol.recording import HistoryDecryptor, capture_spis, parse_capture
from perc_daemons.protocol.rtp import parse_fixed_header
from perc_daemons.protocol.srtp import LAYER_KEY_LENGTH, Profile
from tests.e2e.conference_support import (
    ColludingMd,
    StackTestCase,
    full_ekt_spi,
    is_rtp,
    rtp_header,
    wait_for,
)


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


# --- late-join history (seed draft-westerlund s4.8) ------------------------------------------


class _RecordingCase(_PolicyCase):
    """alice talks, bob captures what he receives (a recording kept as ciphertext, with
    his hop-by-hop layer off) and leaves; carol joins afterwards with that recording."""

    timeout = 90
    TALK = 5.0

    async def record_then_join_late(self) -> tuple[Any, Any, Any, str]:
        alice = (await self.join("alice"))["alice"]
        capture = os.path.join(self.stack.dir, "bob.perccap")
        bob = self.endpoint("bob", capture=capture)
        await bob.join()
        await self.same_epoch(alice, bob)
        await alice.run_media(self.TALK)
        await wait_for(lambda: bob.received(alice.ssrc), "bob heard alice")
        await bob.leave()  # the capture is closed: the recording is complete
        carol = self.endpoint("carol", history=capture,
                              record_dir=os.path.join(self.stack.dir, "carol"))
        await carol.join()
        return alice, bob, carol, capture


class LateJoinHistoryTests(_RecordingCase):
    late_joiners_get_earlier_epochs = True  # the flag's old name for "not none"

    def conference_policy(self) -> dict[str, Any]:
        return {"late_join": "history", "rekey_interval": 2}

    async def test_a_late_joiner_decrypts_what_was_said_before_it_joined(self) -> None:
        alice, bob, carol, capture = await self.record_then_join_late()
        history = carol.history
        self.assertIsNotNone(history, carol.failures)
        self.assertEqual(carol.failures, [])
        with open(capture, "rb") as f:
            records = parse_capture(f.read()).records
        spis = capture_spis(records)
        self.assertGreaterEqual(len(spis), 2, "the recording spans one epoch only")
        self.assertFalse(set(carol.epochs_installed) & spis,
                         "carol was given a recorded epoch's key over DTLS")
        self.assertEqual(history.missing_spis, [])
        self.assertGreaterEqual(len(history.epochs), 2)
        # everything bob decrypted live, carol decrypts from the recording, byte for byte
        heard = {(e.ssrc, e.sequence): e.payload for e in bob.received(alice.ssrc)}
        got = {(ssrc, seq): payload for ssrc, seq, payload in history.packets}
        self.assertEqual({k: got.get(k) for k in heard}, heard)
        sent = alice.sent_payloads(alice.source)
        self.assertEqual({k: sent.get(k) for k in got}, got)
        self.assertGreaterEqual(len(got), 0.9 * self.TALK / 0.02)
        self.assertEqual(history.failures, {})
        # and the WAV of what alice said: every payload, in order, decoded
        path = history.recordings[alice.ssrc]
        self.assertEqual(os.path.dirname(path), os.path.join(self.stack.dir, "carol",
                                                             "history"))
        with wave.open(path, "rb") as w:
            frames = w.readframes(w.getnframes())
        ordered = [payload for ssrc, _, payload in history.packets if ssrc == alice.ssrc]
        self.assertEqual(frames[:len(ordered[0]) * 2], ulaw_decode(ordered[0]).tobytes())
        self.assertGreaterEqual(len(frames), 2 * sum(map(len, ordered)))


class LateJoinDefaultTests(_RecordingCase):
    TALK = 2.0

    async def test_under_the_default_a_late_joiner_decrypts_nothing(self) -> None:
        alice, bob, carol, capture = await self.record_then_join_late()
        self.assertIsNone(carol.history)
        [failure] = carol.all_failures()
        self.assertIn("history not decrypted", failure)
        self.assertIn("403 history-not-allowed", failure)
        self.assertFalse(os.path.exists(os.path.join(self.stack.dir, "carol", "history")))
        # the KMF's answer itself, for each recorded epoch
        assert carol.kmf is not None
        current, params = await carol.kmf.epoch_parameters(self.conference)
        with self.assertRaises(KmfRefused) as caught:
            await carol.kmf.epoch_parameters(self.conference, current - 1)
        self.assertEqual((caught.exception.status, caught.exception.slug),
                         (403, "history-not-allowed"))
        # with the one key carol has (the current epoch's), nothing recorded opens
        with open(capture, "rb") as f:
            records = parse_capture(f.read()).records
        self.assertNotIn(params.spi, capture_spis(records))
        assert carol.profile is not None
        decryptor = HistoryDecryptor(LAYER_KEY_LENGTH[Profile[carol.profile]], [params])
        self.assertEqual(list(decryptor.decrypt(records)), [])
        self.assertEqual(sum(decryptor.failures.values()), len(records))
        self.assertTrue(bob.received(alice.ssrc), "bob heard nothing: the test proves nothing")


class DepartedMemberTests(_PolicyCase):
    timeout = 90

    def conference_policy(self) -> dict[str, Any]:
        return {"rekey_interval": 2}

    async def test_a_departed_member_with_epoch_k_cannot_open_epoch_k_plus_1(self) -> None:
        """carol leaves holding epoch k's EKTKey (and every earlier one she was given);
        alice's packets, fed to her with the outer layer off (by an MD that kept the hop
        keys, or a recording), open under epoch k and not after it."""
        eps = await self.join("alice", "bob", "carol")
        alice, carol = eps["alice"], eps["carol"]
        sending = alice.run_media(12.0)
        await wait_for(lambda: len(carol.received(alice.ssrc)) >= 50, "carol hears alice")
        assert carol.session is not None and carol.profile is not None
        held = list(carol.session._ekt_params.values())  # what she takes with her
        left_at = reactor.seconds()
        await carol.leave()
        await wait_for(lambda: len(alice.installed(since=left_at)) >= 2,
                       "two epochs after carol left (leave, timer)", timeout=20)
        cut = alice.installed(since=left_at)[0][0] + 0.5  # past RFC 8870's old-key hold
        await wait_for(lambda: len(alice.rtp_sent(after=cut)) >= 50, "alice sends on")
        alice.stop_media()
        await sending
        md = ColludingMd(endpoints=eps.values())
        records, sent_at = [], {}
        for when, datagram in alice.sent:
            if not is_rtp(datagram):
                continue
            try:
                relay = md.open(alice.joined.association, datagram)
            except ProtocolError:  # a NACK retransmission: a replay to the outer layer
                continue
            records.append((when, relay.packet + relay.ekt_field))
            sent_at[rtp_header(datagram).sequence] = when
        decryptor = HistoryDecryptor(LAYER_KEY_LENGTH[Profile[carol.profile]], held)
        opened = [(sent_at[parse_fixed_header(p.packet)[2]], p)
                  for _, p in decryptor.decrypt(records)]
        self.assertGreaterEqual(len([t for t, _ in opened if t < left_at]), 50,
                                "carol's keys open nothing: the test proves nothing")
        self.assertEqual([t for t, _ in opened if t > cut], [],
                         "carol opened alice's packets of an epoch after she left")
        later = [r for t, r in records if t > cut]
        self.assertGreaterEqual(len(later), 50)
        self.assertFalse(capture_spis([(0.0, r) for r in later]) & {p.spi for p in held})
