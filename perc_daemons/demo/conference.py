"""A whole private conference on this machine: ``make demo``.

``python -m perc_daemons.demo.conference``.

What it does, with nothing simulated:

1. Makes a development PKI and configuration in a temporary directory and
   starts perc-kmf, perc-md and perc-kd as real ``twistd`` processes on
   loopback (:mod:`perc_daemons.demo.stack`).  The KD reaches the MD through
   a recording relay (:mod:`perc_daemons.demo.tap`) so that, at the end, we
   can show every byte the MD was sent over the tunnel.
2. Creates conference ``demo`` at the KMF (alice, bob and carol invited) and
   at the MD (with the KD's certificate fingerprint).
3. dave, who is not invited, tries to join: the KD refuses to sign his
   answer, so he gets no key and no media.
4. alice, bob and carol join through the reference endpoint
   (:mod:`perc_daemons.endpoint`): OAuth login, identity assertion for a
   fresh DTLS certificate, offer to the MD, KD-signed answer checked, ICE-lite,
   DTLS through the MD to the KD, EKTKey.  Each sends a tone (PCMU, 50
   packets/s) and decrypts the others'.
5. carol leaves: the KD starts a new epoch and gives its key to alice and
   bob only; they rotate their end-to-end keys.
6. The conference ends at the KMF: the KD revokes the keys (close_notify to
   every endpoint) and the MD drops the participants.
7. Prints who received what from whom, the epochs each saw, the roster
   check, and the proof about the MD: every tunnel message it was sent and a
   search of everything it was sent (tunnel, media datagrams, offers) for any
   end-to-end or EKT key the endpoints held.  Stops every daemon.

Exit status 0 when every check holds, 1 otherwise.  ``--keep DIR`` keeps the
generated directory (configuration, logs) there instead of a temporary one.
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer, task

from perc_daemons.demo.stack import DOMAIN, KD_NAME, LocalStack, StackError, sleep
from perc_daemons.endpoint.client import Endpoint, EndpointError
from perc_daemons.endpoint.media import ToneSource
from perc_daemons.protocol.tunnel import MediaKeys

CONFERENCE = "demo"
MEMBERS = (("alice", 440), ("bob", 660), ("carol", 880))
OUTSIDER = "dave"


class RecordingEndpoint(Endpoint):
    """The reference endpoint, keeping a copy of every datagram it sends to the MD."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("audit_secrets", True)  # the proof searches for every key
        super().__init__(*args, **kwargs)
        self.sent_datagrams: list[bytes] = []

    def _send(self, datagrams: Sequence[bytes]) -> None:
        self.sent_datagrams.extend(datagrams)
        super()._send(datagrams)


class Demo:
    def __init__(self, reactor: Any, directory: str, out: Any, *,
                 media_seconds: float = 3.0) -> None:
        self.reactor = reactor
        self.out = out
        self.media_seconds = media_seconds
        self.stack = LocalStack(directory, reactor, users=[m for m, _ in MEMBERS] + [OUTSIDER],
                                tap=True)
        self.checks: list[tuple[str, bool]] = []
        self.endpoints: dict[str, RecordingEndpoint] = {}

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def check(self, what: str, ok: bool) -> bool:
        self.checks.append((what, ok))
        self.say(f"  [{'ok' if ok else 'FAILED'}] {what}")
        return ok

    def endpoint(self, user: str, tone: int | None = None) -> RecordingEndpoint:
        stack = self.stack
        return RecordingEndpoint(
            self.reactor, kmf_url=stack.kmf_url, md_url=stack.md_url, ca=stack.ca_path,
            conference_id=CONFERENCE, user=user, password=stack.password,
            kd_names=[KD_NAME], source=ToneSource(tone) if tone else None, label=user)

    async def run(self) -> bool:
        stack = self.stack
        self.say("== 1. Starting perc-kmf, perc-md and perc-kd (twistd, loopback) ==")
        stack.prepare()
        await stack.start_all()
        for name in ("kmf", "md", "kd"):
            pid = stack.children[name].transport.pid
            self.say(f"  perc-{name} running, pid {pid}")
        self.say(f"  KMF {stack.kmf_url}  MD API {stack.md_url}  MD media udp/"
                 f"{stack.ports.md_media}  tunnel KD -> tap -> MD tcp/{stack.ports.md_tunnel}")

        self.say(f"\n== 2. Conference '{CONFERENCE}': alice, bob, carol invited ==")
        await stack.create_conference(CONFERENCE, [m for m, _ in MEMBERS])
        await stack.wait_for_kd(CONFERENCE)
        self.say("  created at the KMF (running) and at the MD; the KD's tunnel is up")

        self.say(f"\n== 3. {OUTSIDER}@{DOMAIN} (not invited) tries to join ==")
        outsider = self.endpoint(OUTSIDER)
        try:
            await outsider.join()
            self.check(f"{OUTSIDER} refused", False)
            await outsider.leave()
        except EndpointError as e:
            self.check(f"{OUTSIDER} refused: {e}", True)

        self.say("\n== 4. alice, bob and carol join and send tones ==")
        for user, tone in MEMBERS:
            ep = self.endpoint(user, tone)
            await ep.join()
            self.endpoints[user] = ep
            s = ep.stats()
            self.say(f"  {user:6s} joined: {s['profile']}, {s['ekt_cipher']}, connected in "
                     f"{s['connect_time'] * 1000:.0f} ms, association {s['association']}")
        running = [ep.run_media(self.media_seconds + 2.5) for u, ep in self.endpoints.items()
                   if u != "carol"]
        await self.endpoints["carol"].run_media(self.media_seconds)
        carol_secrets = list(self.endpoints["carol"].session.audit_secrets())

        self.say("\n== 5. carol leaves: new epoch for alice and bob only ==")
        carol_epochs = list(self.endpoints["carol"].epochs_installed)
        await self.endpoints["carol"].leave()
        await defer.gatherResults(running, consumeErrors=True)
        for user in ("alice", "bob"):
            ep = self.endpoints[user]
            later = [spi for spi in ep.epochs_installed if spi not in carol_epochs]
            self.check(f"{user} got a key carol never had (SPIs {ep.epochs_installed}, "
                       f"carol's {carol_epochs})", bool(later))
        for user in ("alice", "bob"):
            problems = await self.endpoints[user].check_roster()
            self.check(f"{user}: roster signed by the KMF, every decrypted SSRC is a member"
                       + (f" ({'; '.join(problems)})" if problems else ""), not problems)

        audit: list[tuple[str, bytes]] = [("carol", k) for k in carol_secrets]
        for user in ("alice", "bob"):
            audit += [(user, k) for k in self.endpoints[user].session.audit_secrets()]

        self.say("\n== 6. The conference ends at the KMF: keys revoked ==")
        await stack.end_conference(CONFERENCE)
        deadline = self.reactor.seconds() + 10
        while any(self.endpoints[u].closed_reason is None for u in ("alice", "bob")):
            if self.reactor.seconds() > deadline:
                break
            await sleep(self.reactor, 0.05)
        for user in ("alice", "bob"):
            reason = self.endpoints[user].closed_reason
            self.check(f"{user}: session closed by the KD ({reason})", reason is not None)
        for user in ("alice", "bob"):
            await self.endpoints[user].leave()

        self.summary(audit)
        return all(ok for _, ok in self.checks)

    def summary(self, audit: list[tuple[str, bytes]]) -> None:
        self.say("\n== 7. Who received what from whom ==")
        names = {ep.ssrc: user for user, ep in self.endpoints.items()}
        self.say(f"  {'receiver':8s} {'sender':8s} {'packets':>8s} {'lost':>5s} "
                 f"{'decrypt failures':>16s}  epochs (SPIs)")
        for user, ep in self.endpoints.items():
            for sender in ep.stats()["senders"]:
                name = names.get(sender["ssrc"], f"ssrc {sender['ssrc']:#x}")
                self.say(f"  {user:8s} {name:8s} {sender['packets']:8d} {sender['losses']:5d} "
                         f"{sender['decrypt_failures']:16d}  {sender['epochs_seen']}")
        for user, ep in self.endpoints.items():
            heard = {names.get(s["ssrc"]) for s in ep.stats()["senders"] if s["packets"]}
            others = {u for u, _ in MEMBERS if u != user}
            self.check(f"{user} decrypted media from {sorted(heard & others)}",
                       heard >= others)
            self.check(f"{user}: no decrypt failures", not ep.decrypt_failure_problem())

        self.say("\n== 8. What the MD was sent ==")
        tap = self.stack.tap
        messages = tap.messages_to_md()
        kinds = Counter(type(m).__name__ for m in messages)
        self.say(f"  over the tunnel: {len(tap.to_md)} bytes, "
                 + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
        media_keys = [m for m in messages if isinstance(m, MediaKeys)]
        hop_keys = {k for m in media_keys for k in (m.client_write_key, m.server_write_key)}
        datagrams = [d for ep in self.endpoints.values() for d in ep.sent_datagrams]
        self.say(f"  over UDP from the endpoints: {len(datagrams)} datagrams, "
                 f"{sum(map(len, datagrams))} bytes")
        offers = [ep.offer.encode() for ep in self.endpoints.values() if ep.offer]
        md_log = bytes(self.stack.children["md"].output)
        self.say(f"  over HTTPS: {len(offers)} offers; the MD's own log: {len(md_log)} bytes")
        haystacks = [bytes(tap.to_md), bytes(tap.to_kd), *datagrams, *offers]
        leaked = [(who, k) for who, k in audit
                  if any(k in h for h in haystacks) or _in_text(k, md_log)]
        self.check(f"the MD got hop-by-hop keys only: {len(media_keys)} MediaKeys "
                   f"(outer halves, {len(hop_keys)} keys)",
                   not any(k in hop_keys for _, k in audit))
        self.check(f"none of the {len(audit)} end-to-end and EKT keys the endpoints held "
                   "appears in anything the MD was sent or logged", not leaked)


def _in_text(key: bytes, text: bytes) -> bool:
    """``key`` in ``text`` raw, as hex or as base64/base64url (any alignment)."""
    forms = [key, key.hex().encode(), key.hex().upper().encode()]
    for shift in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            encoded = encode(b"\0" * shift + key)
            # drop the characters that depend on the padding bytes or the next byte
            forms.append(encoded[(shift * 4 + 2) // 3 + 1:-3])
    return any(form and form in text for form in forms)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m perc_daemons.demo.conference",
        description="Run a private PERC conference with real daemons on loopback.")
    parser.add_argument("--keep", metavar="DIR",
                        help="write the configuration and state here and keep it")
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="seconds of media before carol leaves (default 3)")
    args = parser.parse_args(argv)
    directory = args.keep or tempfile.mkdtemp(prefix="perc-demo-")
    result: dict[str, Any] = {}

    async def run(reactor: Any) -> None:
        demo = Demo(reactor, directory, sys.stdout, media_seconds=args.seconds)
        try:
            result["ok"] = await demo.run()
        except (StackError, EndpointError) as e:
            print(f"\ndemo failed: {e}", file=sys.stderr)
            print(demo.stack.logs()[-6000:], file=sys.stderr)
            result["ok"] = False
        finally:
            await demo.stack.stop_all()
            alive = [n for n, c in demo.stack.children.items() if c.running]
            print("\nStopped perc-kmf, perc-md and perc-kd"
                  + (f" (still running: {alive})" if alive else "") + ".")
        failed = [what for what, ok in demo.checks if not ok]
        print(f"{len(demo.checks) - len(failed)} of {len(demo.checks)} checks passed."
              if demo.checks else "")

    try:
        task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
    except SystemExit as e:
        if e.code not in (0, None):
            return int(e.code)
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
        else:
            print(f"Configuration, state and logs kept in {os.path.abspath(directory)}")
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    raise SystemExit(main())
