"""A whole private conference over two cascaded Media Distributors: ``make demo``.

``python -m perc_daemons.demo.conference``.

What it does, with nothing simulated:

1. Makes a development PKI and configuration in a temporary directory and
   starts perc-kmf, two perc-md processes ("md" and "md2", each with its
   own certificate) and perc-kd as real ``twistd`` processes on loopback
   (:mod:`perc_daemons.demo.stack`).  The KD reaches each MD through a
   recording relay (:mod:`perc_daemons.demo.tap`) so that, at the end, we
   can show every byte each MD was sent over its tunnel.
2. Creates conference ``demo`` with the real command lines, run in this
   process: ``perc-admin conferences create`` at the KMF (alice, bob and
   carol invited), ``perc-provider conferences create`` on each MD (with the
   KD's certificate).
3. Links the two MDs for the conference: ``perc-provider links create``
   (RFC 8871 section 4.5.1: md opens a DTLS-SRTP association to md2, each
   pinning the other's certificate; the KD takes no part).
4. dave, who is not invited, tries to join: the KD refuses to sign his
   answer, so he gets no key and no media.
5. alice joins through md, bob and carol through md2, with the reference
   endpoint (:mod:`perc_daemons.endpoint`): OAuth login, identity assertion
   for a fresh DTLS certificate, offer to her MD, KD-signed answer checked,
   ICE-lite, DTLS through the MD to the KD, EKTKey.  Each sends a tone
   (PCMU, 50 packets/s) and decrypts the others': alice's packets reach bob
   and carol over the link, theirs reach her the other way, only the outer
   (hop-by-hop) layer replaced at each MD.
6. carol leaves: the KD starts a new epoch and gives its key to alice and
   bob only, on both MDs; they rotate their end-to-end keys.
7. What crossed the link, as each MD counted it (the provider API's link
   counters): packets and bytes each way, drops.
8. Who received what from whom, every decrypted payload compared with what
   its sender sent.
9. The conference ends at the KMF: the KD revokes the keys (close_notify to
   every endpoint) and both MDs drop the conference and its link.
10. The proof about the MDs, one by one: every tunnel message each was sent,
    and a search of everything each was sent or wrote (tunnel, media
    datagrams, offers, its log and its files) for any end-to-end or EKT key
    the endpoints held.  Then every daemon is stopped.

Exit status 0 when every check holds, 1 otherwise.  ``--keep DIR`` keeps the
generated directory (configuration, logs) there instead of a temporary one.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import shutil
import sys
import tempfile
import tomllib
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer, task

from perc_daemons.demo.stack import DOMAIN, KD_NAME, LocalStack, StackError, sleep
from perc_daemons.endpoint.client import Endpoint, EndpointError
from perc_daemons.endpoint.media import MediaFrame, ToneSource
from perc_daemons.kmf.admin_cli import run as admin_run
from perc_daemons.md.provider_cli import run as provider_run
from perc_daemons.protocol.participant import MediaReceived
from perc_daemons.protocol.tunnel import MediaKeys

CONFERENCE = "demo"
#: Who joins, with which tone, through which MD.
MEMBERS = (("alice", 440, "md"), ("bob", 660, "md2"), ("carol", 880, "md2"))
OUTSIDER = "dave"
MDS = ("md", "md2")


class RecordingEndpoint(Endpoint):
    """The reference endpoint, keeping a copy of every datagram it sends to its MD, of
    every payload it sent (by RTP sequence number) and of every payload it decrypted."""

    def __init__(self, *args: Any, md: str = "md", **kwargs: Any) -> None:
        kwargs.setdefault("audit_secrets", True)  # the proof searches for every key
        super().__init__(*args, **kwargs)
        self.md_name = md
        self.sent_datagrams: list[bytes] = []
        self.sent_payloads: dict[int, bytes] = {}  # RTP sequence number -> payload
        self.decrypted: list[MediaReceived] = []

    def _send(self, datagrams: Sequence[bytes]) -> None:
        self.sent_datagrams.extend(datagrams)
        super()._send(datagrams)

    def send_frame(self, frame: MediaFrame) -> bytes | None:
        datagram = super().send_frame(frame)
        if datagram is not None:  # the RTP header is in the clear (RFC 3711 s3.1)
            self.sent_payloads[int.from_bytes(datagram[2:4], "big")] = frame.payload
        return datagram

    def _event(self, event: Any) -> None:
        if isinstance(event, MediaReceived):
            self.decrypted.append(event)
        super()._event(event)


class Demo:
    def __init__(self, reactor: Any, directory: str, out: Any, *,
                 media_seconds: float = 3.0) -> None:
        self.reactor = reactor
        self.out = out
        self.media_seconds = media_seconds
        self.stack = LocalStack(directory, reactor, users=[m for m, _, _ in MEMBERS] + [OUTSIDER],
                                tap=True, extra_mds=len(MDS) - 1)
        self.checks: list[tuple[str, bool]] = []
        self.endpoints: dict[str, RecordingEndpoint] = {}
        self.outsider: RecordingEndpoint | None = None
        self.links: dict[str, dict[str, Any]] = {}  # MD -> its half of the link, at the end

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def check(self, what: str, ok: bool) -> bool:
        self.checks.append((what, ok))
        self.say(f"  [{'ok' if ok else 'FAILED'}] {what}")
        return ok

    def endpoint(self, user: str, tone: int | None = None, md: str = "md"
                 ) -> RecordingEndpoint:
        stack = self.stack
        return RecordingEndpoint(
            self.reactor, kmf_url=stack.kmf_url, md_url=stack.md_api_url(md), ca=stack.ca_path,
            conference_id=CONFERENCE, user=user, password=stack.password,
            kd_names=[KD_NAME], source=ToneSource(tone) if tone else None, label=user, md=md)

    async def cli(self, run: Callable[..., Any], *argv: str, config: str) -> str:
        """Run a perc-admin / perc-provider command in this process (shown as a shell
        line, ``--config etc/<config>`` added); its output."""
        prog = "perc-admin" if run is admin_run else "perc-provider"
        words = [os.path.basename(a) if a.startswith(self.stack.dir) else a for a in argv]
        groups: list[str] = []  # each option with its value
        for word in words:
            if groups and groups[-1].startswith("--") and " " not in groups[-1] \
                    and not word.startswith("--"):
                groups[-1] += " " + word
            else:
                groups.append(word)
        line = f"  $ {prog}"
        for group in groups:
            if len(line) + 1 + len(group) > 88:
                self.say(line + " \\")
                line = "     "
            line += " " + group
        self.say(line)
        out, err = io.StringIO(), io.StringIO()
        code = await run([*argv, "--config", os.path.join(self.stack.dir, "etc", config)],
                         self.reactor, stdout=out, stderr=err)
        if code != 0:
            raise StackError(f"{prog} {' '.join(argv)}: exit status {code}\n"
                             f"{out.getvalue()}{err.getvalue()}")
        return out.getvalue()

    async def run(self) -> bool:
        stack = self.stack
        self.say("== 1. Starting perc-kmf, two perc-md (md, md2) and perc-kd "
                 "(twistd, loopback) ==")
        stack.prepare()
        await stack.start_all()
        for name in ("kmf", *MDS, "kd"):
            daemon = f"perc-md ({name})" if name in MDS else f"perc-{name}"
            self.say(f"  {daemon:14s} running, pid {stack.children[name].transport.pid}")
        self.say(f"  KMF {stack.kmf_url}")
        for md in MDS:
            media = stack.ports.md_media if md == "md" else stack.md_ports[md].media
            self.say(f"  {md:3s}: API {stack.md_api_url(md)}, media udp/{media}, "
                     f"tunnel KD -> tap tcp/{stack.taps[md].port} -> {md} "
                     f"tcp/{stack.md_tunnel_port(md)}")

        members = [m for m, _, _ in MEMBERS]
        self.say(f"\n== 2. Conference '{CONFERENCE}': {', '.join(members)} invited, "
                 "at the KMF and on both MDs ==")
        self.say("  (the real command lines, run in this process, with the configuration "
                 "perc-admin setup made)")
        invites = [a for m in members for a in ("--invite", f"{m}@{DOMAIN}")]
        await self.cli(admin_run, "conferences", "create", CONFERENCE, "--title", "Demo",
                       *invites, "--start", "--url", stack.kmf_url, config="admin.toml")
        kd_cert = os.path.join(stack.dir, "etc", "tls", "kd.crt")
        for md in MDS:
            await self.cli(provider_run, "conferences", "create", CONFERENCE,
                           "--kd-certificate", kd_cert, "--url", stack.md_api_url(md),
                           config="provider.toml")
        for md in MDS:
            await stack.wait_for_kd(CONFERENCE, md=md)
        self.say("  the KD's tunnel is up to md and to md2")

        self.say("\n== 3. A cascade link md -> md2 for the conference (RFC 8871 s4.5.1; "
                 "no KD in it) ==")
        await self.cli(provider_run, "links", "create", CONFERENCE, "--url", stack.md_api_url("md"),
                       "--to", stack.md_api_url("md2"), config="provider.toml")
        await self.link_up()

        self.say(f"\n== 4. {OUTSIDER}@{DOMAIN} (not invited) tries to join through md ==")
        outsider = self.outsider = self.endpoint(OUTSIDER)
        try:
            await outsider.join()
            self.check(f"{OUTSIDER} refused", False)
            await outsider.leave()
        except EndpointError as e:
            self.check(f"{OUTSIDER} refused: {e}", True)

        self.say("\n== 5. alice joins through md, bob and carol through md2; each sends "
                 "a tone ==")
        for user, tone, md in MEMBERS:
            ep = self.endpoint(user, tone, md)
            await ep.join()
            self.endpoints[user] = ep
            s = ep.stats()
            self.say(f"  {user:6s} on {md:3s}: {s['profile']}, {s['ekt_cipher']}, connected in "
                     f"{s['connect_time'] * 1000:.0f} ms")
        await self.placement()
        running = [ep.run_media(self.media_seconds + 2.5) for u, ep in self.endpoints.items()
                   if u != "carol"]
        await self.endpoints["carol"].run_media(self.media_seconds)
        carol_secrets = list(self.endpoints["carol"].session.audit_secrets())

        self.say("\n== 6. carol leaves (at md2): a new epoch for alice (md) and bob (md2) "
                 "only ==")
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

        await sleep(self.reactor, 0.3)  # the last packets in flight
        await self.crossed_link()
        self.received()

        self.say("\n== 9. The conference ends at the KMF: keys revoked, both MDs drop it ==")
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
        await self.conference_gone()

        self.key_search(audit)
        return all(ok for _, ok in self.checks)

    async def link_up(self) -> None:
        """Until both halves of the link are up; show who pins whom."""
        stack = self.stack
        deadline = self.reactor.seconds() + 20
        while True:
            halves = {md: await stack.md_links(CONFERENCE, md) for md in MDS}
            if all([h["state"] for h in halves[md]] == ["up"] for md in MDS):
                break
            if self.reactor.seconds() > deadline:
                raise StackError(f"the link is not up within 20 s: {halves}\n{stack.logs()}")
            await sleep(self.reactor, 0.05)
        own = {md: (await stack.md_info(md))["fingerprint"] for md in MDS}
        (md_half,), (md2_half,) = halves["md"], halves["md2"]
        self.say(f"  up at both ends: md opened it (DTLS client, {md_half['srtp_profile']}), "
                 "md2 accepted it")
        self.say(f"  md  (certificate {own['md'][:23]}...) pins md2 as "
                 f"{md_half['peer_fingerprint'][:23]}...")
        self.say(f"  md2 (certificate {own['md2'][:23]}...) pins md  as "
                 f"{md2_half['peer_fingerprint'][:23]}...")
        self.check("each MD pins the other's own certificate (not any from the CA)",
                   md_half["peer_fingerprint"] == own["md2"]
                   and md2_half["peer_fingerprint"] == own["md"] and own["md"] != own["md2"])

    async def placement(self) -> None:
        """Each MD lists as participants exactly the endpoints that joined through it."""
        for md in MDS:
            body = await self.stack.md_conference(CONFERENCE, md)
            listed = {p["association"] for p in body["participants"]}
            here = {u: ep.joined.association for u, ep in self.endpoints.items()
                    if ep.md_name == md}
            self.check(f"{md}'s participants are who joined through it: "
                       f"{' and '.join(sorted(here)) or 'nobody'}", listed == set(here.values()))

    async def crossed_link(self) -> None:
        self.say("\n== 7. What crossed the link (each MD's count, provider API) ==")
        for md in MDS:
            (self.links[md],) = await self.stack.md_links(CONFERENCE, md)

        def media(link: dict[str, Any], way: str) -> tuple[int, int]:
            # RTP only: the RTCP over a link is hop by hop (SR passed on, and each MD's
            # own receiver reports and stream announcements), shown apart
            return link[f"rtp_{way}"], link[f"rtp_{way}_bytes"]

        sent_rtp = {md: sum(ep.sent_packets for ep in self.endpoints.values()
                            if ep.md_name == md) for md in MDS}
        for src, dst in (("md", "md2"), ("md2", "md")):
            out_packets, out_bytes = media(self.links[src], "out")
            in_packets, in_bytes = media(self.links[dst], "in")
            senders = [u for u, ep in self.endpoints.items() if ep.md_name == src]
            self.say(f"  {src:3s} -> {dst:3s}: {src} sent {out_packets} RTP packets, "
                     f"{out_bytes} bytes; {dst} took in {in_packets}, {in_bytes} bytes "
                     f"(and {self.links[src]['rtcp_out']} RTCP packets: SR, receiver "
                     f"reports, stream announcements)")
            took = "all" if in_packets == out_packets else f"{in_packets} of the {out_packets}"
            self.check(f"{src} -> {dst}: {' and '.join(senders)}'s media crossed "
                       f"({sent_rtp[src]} packets sent); {dst} took in {took} {src} sent",
                       0 < in_packets <= out_packets <= sent_rtp[src]
                       and in_packets >= 0.95 * out_packets and 0 < in_bytes <= out_bytes)
        for md in MDS:
            drops = {k: v for k, v in self.links[md]["drops"].items() if v}
            link = self.links[md]
            self.say(f"  {md:3s} dropped: "
                     + (", ".join(f"{n} {k}" for k, n in drops.items()) or "nothing")
                     + f"; the link's own DTLS: {link['dtls_in']} in, {link['dtls_out']} out; "
                     f"STUN: {link['stun_in']} in")

    def received(self) -> None:
        self.say("\n== 8. Who received what from whom ==")
        names = {ep.ssrc: user for user, ep in self.endpoints.items()}
        self.say(f"  {'receiver':11s} {'sender':11s} {'path':9s} {'packets':>7s} "
                 f"{'identical':>9s} {'lost':>4s} {'no key':>6s} {'failed':>6s}  epochs (SPIs)")
        for user, ep in self.endpoints.items():
            for sender in ep.stats()["senders"]:
                name = names.get(sender["ssrc"])
                if name is None:
                    self.say(f"  {user:11s} ssrc {sender['ssrc']:#x}: not a member")
                    continue
                other = self.endpoints[name]
                via = (other.md_name if other.md_name == ep.md_name
                       else f"{other.md_name} -> {ep.md_name}")
                got = [e for e in ep.decrypted if e.ssrc == sender["ssrc"]]
                same = sum(1 for e in got if other.sent_payloads.get(e.sequence) == e.payload)
                self.say(f"  {user + ' (' + ep.md_name + ')':11s} "
                         f"{name + ' (' + other.md_name + ')':11s} {via:9s} "
                         f"{len(got):7d} {same:9d} {sender['losses']:4d} {sender['no_key']:6d} "
                         f"{sender['decrypt_failures']:6d}  {sender['epochs_seen']}")
        self.say("  (packets: decrypted; identical: equal to what the sender sent with that "
                 "sequence\n   number; no key: sent under an epoch the receiver did not have "
                 "yet, at the rekey)")
        for user, ep in self.endpoints.items():
            others = {u for u, _, _ in MEMBERS if u != user}
            heard = {names.get(e.ssrc) for e in ep.decrypted} & others
            identical = all(self.endpoints[names[e.ssrc]].sent_payloads.get(e.sequence)
                            == e.payload for e in ep.decrypted if e.ssrc in names)
            self.check(f"{user} decrypted {' and '.join(sorted(heard)) or 'nobody'}, every "
                       "payload byte-identical to what was sent",
                       heard == others and identical
                       and all(e.ssrc in names for e in ep.decrypted))
            self.check(f"{user}: no decrypt failures", not ep.decrypt_failure_problem())

    async def conference_gone(self) -> None:
        """Until neither MD has the conference (the KD sent each ConferenceEnded)."""
        deadline = self.reactor.seconds() + 10
        status: dict[str, int] = {}
        while True:
            for md in MDS:
                status[md], _ = await self.stack.request(
                    "GET", self.stack.md_api_url(md) + f"/v1/conferences/{CONFERENCE}",
                    token=self.stack.provider_token)
            if set(status.values()) == {404} or self.reactor.seconds() > deadline:
                break
            await sleep(self.reactor, 0.05)
        self.check("md and md2 dropped the conference and its link (404 at both: "
                   f"{status})", set(status.values()) == {404})

    def key_search(self, audit: list[tuple[str, bytes]]) -> None:
        self.say(f"\n== 10. What each MD was sent and wrote, searched for the {len(audit)} "
                 "end-to-end and EKT keys ==")
        for md in MDS:
            tap = self.stack.taps[md]
            messages = tap.messages_to_md()
            kinds = Counter(type(m).__name__ for m in messages)
            endpoints = [ep for ep in (*self.endpoints.values(), self.outsider)
                         if ep is not None and ep.md_name == md]
            datagrams = [d for ep in endpoints for d in ep.sent_datagrams]
            offers = [ep.offer.encode() for ep in endpoints if ep.offer]
            log = bytes(self.stack.children[md].output)
            files = self.md_files(md)
            rundir = f"run-{md}/"
            written = [p for p, _ in files if os.path.relpath(p, self.stack.dir).startswith(
                rundir)]
            self.say(f"  {md}:")
            self.say(f"    tunnel from the KD: {len(tap.to_md)} bytes:\n      "
                     + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
            self.say(f"    tunnel to the KD: {len(tap.to_kd)} bytes")
            self.say(f"    UDP from {' and '.join(ep.label for ep in endpoints)}: "
                     f"{len(datagrams)} datagrams, {sum(map(len, datagrams))} bytes")
            self.say(f"    HTTPS: {len(offers)} offers, {sum(map(len, offers))} bytes")
            self.say(f"    its log: {len(log)} bytes")
            self.say(f"    files: {len(files)}, {sum(len(d) for _, d in files)} bytes: its "
                     f"configuration and what it names,\n      "
                     + ", ".join(os.path.relpath(p, self.stack.dir) for p, _ in files
                                 if p not in written)
                     + f";\n      in its working directory {rundir}: "
                     + (", ".join(os.path.basename(p) for p in written) or "nothing"))
            haystacks = [bytes(tap.to_md), bytes(tap.to_kd), b"\0".join(datagrams),
                         b"\0".join(offers), log, *(d for _, d in files)]
            media_keys = [m for m in messages if isinstance(m, MediaKeys)]
            hop_keys = {k for m in media_keys for k in (m.client_write_key, m.server_write_key)}
            found = all(_in_text(k, bytes(tap.to_md)) for k in hop_keys)
            self.check(f"{md} got hop-by-hop keys only: {len(media_keys)} MediaKeys "
                       f"(outer halves, {len(hop_keys)} keys, which the search below finds)",
                       bool(media_keys) and found and not any(k in hop_keys for _, k in audit))
            leaked = [who for who, k in audit if any(_in_text(k, h) for h in haystacks)]
            self.check(f"none of the {len(audit)} keys in any of it "
                       f"({sum(map(len, haystacks))} bytes, as raw, hex or base64)"
                       + (f": found {leaked}" if leaked else ""), not leaked)
        self.say("  not searched: what the MDs sent each other over the link (no tap there): "
                 "the\n  endpoints' packets above, their outer layer re-sealed with the "
                 "link's own keys")

    def md_files(self, md: str) -> list[tuple[str, bytes]]:
        """The MD's configuration, the files it names and everything in its working
        directory: what it could have written a key into."""
        config = self.stack.configs[md]
        with open(config, "rb") as f:
            parsed = tomllib.load(f)
        paths = [config] + [str(v) for section in parsed.values() if isinstance(section, dict)
                            for k, v in section.items()
                            if k.endswith(("_file", "certificate", "private_key"))]
        rundir = os.path.join(self.stack.dir, f"run-{md}")
        for top, _, names in os.walk(rundir):
            paths += [os.path.join(top, n) for n in sorted(names)]
        out = []
        for path in dict.fromkeys(paths):
            with open(path, "rb") as f:
                out.append((path, f.read()))
        return out


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
        description="Run a private PERC conference over two cascaded MDs with real daemons "
                    "on loopback.")
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
            print("\nStopped perc-kmf, perc-md (md, md2) and perc-kd"
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
