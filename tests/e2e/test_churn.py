"""Rekeys under churn (issue 10 item 17), with real daemons.

Two members stay in the call and send throughout while others join and leave
on top of each other, so that the KD starts several epochs a second (the
conference rekeys on every join and every leave).  A member that holds the
keys must decrypt every packet it receives: the assertion is zero decrypt
failures at every endpoint.  Packets under a key a receiver was never given
(sent before it joined, during a sender's old-key hold, or under an epoch
whose EKTKey had not reached it yet) are counted apart as "no key"; they are
reported, not failures.
"""

from __future__ import annotations

import sys
from collections import Counter

from twisted.internet import defer, reactor, task

from perc_daemons.protocol.participant import NO_KEY_REASONS, DecryptFailed
from tests.e2e.conference_support import RecordingEndpoint, StackTestCase

#: Churners, one starting every SPACING seconds, each in the call STAY seconds.
CHURNERS = 36
SPACING = 0.3
STAY = (1.2, 2.4)


class ChurnTests(StackTestCase):
    timeout = 180
    users = ("alice", "bob", "carol", "dave", "erin")
    invited = ("alice", "bob", "carol", "dave", "erin")

    async def _churner(self, n: int) -> RecordingEndpoint:
        await task.deferLater(reactor, n * SPACING, lambda: None)
        user = ("carol", "dave", "erin", "alice", "bob")[n % 5]
        endpoint = self.endpoint(user, label=f"churn-{n}-{user}")
        await endpoint.join()
        stay = STAY[0] + (STAY[1] - STAY[0]) * ((n * 7919) % 13) / 12
        await endpoint.run_media(stay)
        await endpoint.leave()
        return endpoint

    async def test_no_decrypt_failure_under_churn(self) -> None:
        stayers = await self.join("alice", "bob", recording=False)
        total = CHURNERS * SPACING + STAY[1] + 1.0
        media = [defer.ensureDeferred(e.run_media(total)) for e in stayers.values()]
        epochs_before = len(stayers["alice"].epochs_installed)
        started = reactor.seconds()
        churners = await defer.gatherResults(
            [defer.ensureDeferred(self._churner(n)) for n in range(CHURNERS)],
            consumeErrors=True)
        await defer.gatherResults(media)
        elapsed = reactor.seconds() - started
        epochs = len(stayers["alice"].epochs_installed) - epochs_before
        everyone = list(stayers.values()) + list(churners)
        received = sum(s.packets for e in everyone for s in e.senders.values())
        failures = {e.label: sum(s.decrypt_failures for s in e.senders.values())
                    + e.unattributed_decrypt_failures for e in everyone}
        no_key = sum(s.no_key for e in everyone for s in e.senders.values())
        failed = sum(failures.values())
        reasons = Counter(e.reason for endpoint in everyone for _, e in endpoint.events
                          if isinstance(e, DecryptFailed))
        sys.stderr.write(
            f"\nchurn: {CHURNERS} churners over {elapsed:.1f} s, {epochs} epochs "
            f"({epochs / elapsed:.1f}/s) at a stayer; {received} packets decrypted, "
            f"{failed} decrypt failures ({failed / max(1, received + failed):.3%}), "
            f"{no_key} no-key; by reason {dict(reasons)}\n")
        if failed:
            sys.stderr.write(self._explain(everyone, started))
        self.assertGreaterEqual(epochs / elapsed, 2.0, "not enough churn to mean anything")
        self.assertEqual({k: v for k, v in failures.items() if v}, {},
                         "members that hold the keys failed to decrypt")
        for endpoint in stayers.values():
            heard = {s.ssrc for s in endpoint.senders.values() if s.packets}
            self.assertGreaterEqual(len(heard), CHURNERS // 2, endpoint.label)

    @staticmethod
    def _explain(everyone: list[RecordingEndpoint], t0: float) -> str:
        """Who failed to decrypt whom, when, next to the EKT keys each installed."""
        by_ssrc = {e.ssrc: e for e in everyone}
        lines = ["decrypt failures (time from start, receiver <- sender: reason):"]
        for endpoint in everyone:
            for t, event in endpoint.events:
                if isinstance(event, DecryptFailed) and event.reason not in NO_KEY_REASONS:
                    sender = by_ssrc.get(event.ssrc)
                    lines.append(f"  {t - t0:7.3f} {endpoint.label} <- "
                                 f"{sender.label if sender else event.ssrc}: {event.reason}")
                    if len(lines) > 40:
                        break
        for endpoint in everyone:
            installs = " ".join(f"{t - t0:.3f}:{spi}" for t, spi in endpoint.installed())
            lines.append(f"  {endpoint.label} installed {installs}")
        return "\n".join(lines) + "\n"
