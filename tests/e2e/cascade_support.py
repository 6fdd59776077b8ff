"""The cascade chain ``md - md2 - md3`` for end-to-end tests (issue 12), as test_cascade builds it.

:class:`CascadeChainMixin` goes before
:class:`~tests.e2e.conference_support.StackTestCase` in a test class's bases;
it sets the stack up for a cascade (two extra perc-md processes, no static
``[tunnel] mds``: the KD connects to the MDs the KMF names; no conference
made by the fixture; no tap) and gives:

* :meth:`~CascadeChainMixin.create_chain`: ``perc-admin conferences create
  --start`` with one ``--md`` per MD (the KMF records each MD's tunnel
  address: draft-roach-perc-webrtc 4.1.1 step 11), then ``perc-provider
  links create`` md -> md2 and md2 -> md3, until every link is up at both
  ends (docs/PROTOCOL.md "Cascade links"; RFC 8871 s4.5.1: the KD does not
  facilitate links);
* :meth:`~CascadeChainMixin.join_places`: endpoints joining through the MD
  each user is placed at, checked against every MD's participant list;
* queries of the MDs (:meth:`~CascadeChainMixin.md_conference_at`,
  :meth:`~CascadeChainMixin.kd_connected_at`) and of the KD
  (:meth:`~CascadeChainMixin.kd_members`);
  (:meth:`~CascadeChainMixin.wait_members`), waiting until the KD is
  connected (or not) at every MD (:meth:`~CascadeChainMixin.wait_kd_connected`);
* media checks across the links: :func:`heard_from` / :func:`wait_hearing`
  (every receiver decrypted more from every sender),
  :meth:`~CascadeChainMixin.assert_steady` (one epoch, and no decrypt failure
  while every receiver decrypts more from every sender),
  :meth:`~CascadeChainMixin.assert_byte_identical` (what each receiver
  decrypted is what the sender sent: only the outer layer is replaced per
  hop, RFC 8723 s5.2), :func:`flowing_at` (when media flowed among all on
  associations made after a moment: after a restart, the rejoins);
* :meth:`~CascadeChainMixin.assert_rosters`: every member's KD-signed roster
  verifies and lists exactly the members' SSRCs.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import treq
from twisted.internet import reactor

from perc_daemons.demo.stack import sleep
from perc_daemons.kmf.admin_cli import run as admin_run
from perc_daemons.md.provider_cli import run as provider_run
from perc_daemons.protocol.participant import MediaReceived
from tests.e2e.conference_support import RecordingEndpoint, rtp_header, wait_for

__all__ = ["CHAIN", "CascadeChainMixin", "flowing_at", "heard_from", "wait_hearing"]

#: The links of the chain, (opener: the DTLS client, acceptor).
CHAIN = (("md", "md2"), ("md2", "md3"))
#: Links each MD has once the chain is up.
LINKS_PER_MD = {"md": 1, "md2": 2, "md3": 1}
#: How long to wait for something that should happen (never asserted).
DEADLINE = 20.0
#: Past the old-key hold of RFC 8870 s4.3.1 (250 ms), with margin.
HOLD = 0.5


def heard_from(receiver: RecordingEndpoint, sender: RecordingEndpoint,
               since: float | None = None) -> int:
    """Distinct sequence numbers of ``sender`` that ``receiver`` decrypted (at or after
    ``since``)."""
    return len({e.sequence for e in receiver.received(sender.ssrc, since=since)})


async def wait_hearing(endpoints: Sequence[RecordingEndpoint], what: str, *, by: int = 25,
                       since: float | None = None, timeout: float = DEADLINE) -> None:
    """Until every endpoint decrypted ``by`` packets (at or after ``since``) from every
    other one."""
    def done() -> bool:
        return all(heard_from(r, s, since) >= by for r in endpoints for s in endpoints
                   if r is not s)

    def counts() -> str:
        return ", ".join(f"{r.label}<-{s.label}: {heard_from(r, s, since)}"
                         for r in endpoints for s in endpoints if r is not s)

    try:
        await wait_for(done, what, timeout=timeout)
    except AssertionError as e:
        raise AssertionError(f"{e} ({counts()})") from None


def flowing_at(eps: Mapping[str, RecordingEndpoint], since: float) -> float | None:
    """When every endpoint had decrypted, on its first association keyed after ``since``,
    a packet every other one sent on its own such association: the latest of those first
    receptions (None: not yet).

    An association keyed after ``since`` is one made after it (a rejoin, a join) when
    no KD that holds the earlier ones sends keys after ``since`` (a restarted KD)."""
    keyed_at = {}
    for user, ep in eps.items():
        keyed = ep.installed(since=since)
        if not keyed:
            return None
        keyed_at[user] = keyed[0][0]
    latest = since
    for receiver, r in eps.items():
        for sender, s in eps.items():
            if r is s:
                continue
            sequences = {rtp_header(d).sequence for d in s.rtp_sent(after=keyed_at[sender])}
            first = next((t for t, e in r.events
                          if t >= keyed_at[receiver] and isinstance(e, MediaReceived)
                          and e.ssrc == s.ssrc and e.sequence in sequences), None)
            if first is None:
                return None
            latest = max(latest, first)
    return latest


class CascadeChainMixin:
    """The chain md - md2 - md3 (module docstring); mix in before StackTestCase."""

    static_mds = False
    create_conference = False
    tap = False
    extra_mds = 2
    conference = "chain"

    stack: Any  # from StackTestCase
    join: Any
    same_epoch: Any
    assertEqual: Any
    assertIn: Any
    assertIsNotNone: Any
    assertLess: Any

    # --- the command-line tools -------------------------------------------------------

    async def cli(self, run: Any, *argv: str, config: str) -> tuple[int, str, str]:
        """One ``perc-admin`` / ``perc-provider`` run (``config`` in the stack's etc/)."""
        out, err = io.StringIO(), io.StringIO()
        code = await run([*argv, "--config", os.path.join(self.stack.dir, "etc", config)],
                         reactor, stdout=out, stderr=err)
        return code, out.getvalue(), err.getvalue()

    async def link(self, opener: str, acceptor: str) -> tuple[int, str, str]:
        """``perc-provider links create`` at ``opener`` (the DTLS client) to ``acceptor``."""
        return await self.cli(provider_run, "links", "create", self.conference,
                              "--url", self.stack.md_api_url(opener),
                              "--to", self.stack.md_api_url(acceptor),
                              config="provider.toml")

    async def links(self, md: str) -> list[dict[str, Any]]:
        status, body = await self.stack.request(
            "GET", self.stack.md_api_url(md) + f"/v1/conferences/{self.conference}/links",
            token=self.stack.provider_token)
        self.assertEqual(status, 200, body)
        return list(body["links"])

    async def create_chain(self, invited: Iterable[str], title: str = "Chain",
                           options: Sequence[str] = ()) -> str:
        """The conference on all three MDs (one ``perc-admin`` command: the KD connects
        to each; ``options`` more of its options, e.g. ``--last-n``), linked md -> md2
        -> md3, every link up; perc-admin's output."""
        stack = self.stack
        code, out, err = await self.cli(
            admin_run, "conferences", "create", self.conference, "--title", title,
            *(a for user in invited for a in ("--invite", f"{user}@localhost")), *options,
            "--start", *(a for md in stack.md_names for a in ("--md", stack.md_api_url(md))),
            "--url", stack.kmf_url, config="admin.toml")
        self.assertEqual((code, err), (0, ""), out)
        for md in stack.md_names:
            self.assertIn(stack.md_tunnel_address(md), out)
        self.assertEqual(out.count("kd connected to md"), len(stack.md_names), out)
        for opener, acceptor in CHAIN:
            code, link_out, err = await self.link(opener, acceptor)
            self.assertEqual((code, err), (0, ""), link_out)
        await self.wait_links_up()
        return out

    async def wait_links_up(self, timeout: float = DEADLINE) -> None:
        """Until every MD reports all its links of the chain "up"."""
        states: dict[str, list[str]] = {}

        async def all_up() -> bool:
            for md in self.stack.md_names:
                states[md] = [link["state"] for link in await self.links(md)]
            return all(states[md] == ["up"] * n for md, n in LINKS_PER_MD.items())

        deadline = reactor.seconds() + timeout
        while not await all_up():
            self.assertLess(reactor.seconds(), deadline, f"links not up: {states}")
            await sleep(reactor, 0.1)

    # --- endpoints --------------------------------------------------------------------

    async def join_places(self, places: Mapping[str, str]) -> dict[str, RecordingEndpoint]:
        """Each user joins through its MD (recorded NoiseSource); then each MD lists
        exactly the associations of the users placed there."""
        eps: dict[str, RecordingEndpoint] = {}
        for user, md in places.items():
            eps.update(await self.join(user, md=md))
        await self.assert_participants(eps, places)
        return eps

    async def assert_participants(self, eps: Mapping[str, RecordingEndpoint],
                                  places: Mapping[str, str]) -> None:
        """Every MD's participants are the current associations of the users placed there."""
        for md in self.stack.md_names:
            _, body = await self.md_conference_at(md)
            here = {ep.joined.association for user, ep in eps.items()
                    if places[user] == md and ep.joined is not None}
            self.assertEqual({p["association"] for p in body["participants"]}, here, md)

    # --- the daemons' state -----------------------------------------------------------

    async def md_conference_at(self, md: str) -> tuple[int, Any]:
        """``GET /v1/conferences/{conference}`` at MD ``md``: (status, body)."""
        return await self.stack.request(
            "GET", self.stack.md_api_url(md) + f"/v1/conferences/{self.conference}",
            token=self.stack.provider_token)

    async def kd_connected_at(self) -> dict[str, bool]:
        """Per MD: does it report the conference's KD tunnel connected?"""
        connected = {}
        for md in self.stack.md_names:
            status, body = await self.md_conference_at(md)
            self.assertEqual(status, 200, body)
            connected[md] = bool(body.get("kd_connected"))
        return connected

    async def wait_kd_connected(self, connected: bool = True,
                                timeout: float = DEADLINE) -> None:
        """Until every MD reports the KD tunnel connected (``connected``) or none does."""
        seen: dict[str, bool] = {}

        async def done() -> bool:
            seen.update(await self.kd_connected_at())
            return set(seen.values()) == {connected}

        deadline = reactor.seconds() + timeout
        while not await done():
            self.assertLess(reactor.seconds(), deadline,
                            f"kd_connected is not {connected} at every MD: {seen}\n"
                            + self.stack.logs()[-4000:])
            await sleep(reactor, 0.05)

    async def kd_members(self) -> float:
        """The KD's ``perc_kd_members`` gauge (keyed associations it knows)."""
        url = f"http://127.0.0.1:{self.stack.ports.kd_admin}/metrics"
        response = await treq.get(url, pool=self.stack.pool, timeout=5)
        text = (await treq.content(response)).decode()
        match = re.search(r"^perc_kd_members (\S+)$", text, re.M)
        self.assertIsNotNone(match, text[:2000])
        assert match is not None
        return float(match.group(1))

    async def wait_members(self, count: int, timeout: float = DEADLINE) -> None:
        """Until the KD counts ``count`` keyed members."""
        seen: list[float] = []

        async def done() -> bool:
            seen.append(await self.kd_members())
            return seen[-1] == count

        deadline = reactor.seconds() + timeout
        while not await done():
            self.assertLess(reactor.seconds(), deadline,
                            f"perc-kd has {seen[-1]} members, not {count}")
            await sleep(reactor, 0.1)

    async def assert_rosters(self, eps: Mapping[str, RecordingEndpoint]) -> None:
        """Every endpoint's KD-signed roster verifies (``check_roster``) and lists
        exactly the SSRCs of ``eps``."""
        ssrcs = {ep.ssrc for ep in eps.values()}
        for user, ep in eps.items():
            self.assertEqual(await ep.check_roster(), [], ep.stats())
            assert ep.roster is not None
            self.assertEqual({s for m in ep.roster.members for s in m.ssrcs}, ssrcs, user)

    # --- media ------------------------------------------------------------------------

    async def assert_steady(self, eps: Mapping[str, RecordingEndpoint], what: str,
                            by: int = 25) -> int:
        """Every endpoint holds the same newest EKT key; from a moment past its hold on,
        every one decrypts ``by`` more packets from every other, still under that key,
        and none fails to decrypt.  The key's SPI."""
        members = list(eps.values())
        spi = await self.same_epoch(*members)
        await sleep(reactor, HOLD)
        since = reactor.seconds()
        await wait_hearing(members, f"{what}: every receiver decrypts every sender",
                           since=since, by=by)
        self.assertEqual({ep.current_spi for ep in members}, {spi},
                         f"{what}: a new epoch during the steady state")
        for user, ep in eps.items():
            self.assertEqual(ep.decrypt_failures(since=since), [], f"{what}: {user}")
            self.assertEqual({e.spi for e in ep.received(since=since)}, {spi},
                             f"{what}: {user}")
        return spi

    def assert_byte_identical(self, eps: Mapping[str, RecordingEndpoint]) -> None:
        """Everything each endpoint decrypted is, byte for byte, what its sender sent
        with that sequence number, and came from another member."""
        sent = {user: ep.sent_payloads(ep.source) for user, ep in eps.items()}
        for user, ep in eps.items():
            senders = {other.ssrc: o for o, other in eps.items() if o != user}
            for event in ep.received():
                self.assertIn(event.ssrc, senders, f"{user} decrypted an unknown SSRC")
                sender = senders[event.ssrc]
                expected = sent[sender].get((event.ssrc, event.sequence))
                self.assertIsNotNone(expected, f"{user}: {sender} never sent "
                                               f"{event.sequence}")
                self.assertEqual(event.payload, expected,
                                 f"{user}: payload of {sender} #{event.sequence} differs")
