"""The three-host layout of docs/DEPLOYMENT.md, executable: three perc-md on hosts of their own.

Each MD is a real ``twistd perc-md`` in a network namespace of its own (a
host), run with ``ip netns exec``; the namespaces are joined by veth pairs
to a bridge in the root namespace, which holds perc-kmf, perc-kd and the
endpoints (the enterprise host).  Every address is the test's own: a free
/24 of 198.18.0.0/15 (RFC 2544 benchmarking), ``.1`` on the bridge and
``.2``-``.4`` for the MDs.  Each MD binds its namespace's address for its API,
KD tunnel, media (advertised) and admin listener (the stack checks its
/healthz from the root namespace), with a certificate from the site CA
naming that address (an IP SAN); the KD and the endpoints reach it by that
address only.

The chain md (host a) - md2 (b) - md3 (c) as tests/e2e/test_cascade.py
builds it (``perc-admin conferences create --md`` x3, ``perc-provider links
create`` md -> md2 -> md3): alice on a, bob on b, carol and erin on c; media
among all four decrypts byte-identical, and the veths' packet counters show
it crossed them: into and out of each host at least the media its endpoints
sent and received, and between the hosts (frames the bridge forwarded from
one veth to another, not up to the root namespace) at least what each link
had to carry.

The test skips, saying why, where a namespace, veth or bridge cannot be made
(``ip netns add`` is tried, not the uid) or the bridge does not pass frames
between them.  Namespaces, veths and bridge are removed whatever happens, any
process left in a namespace killed first; the MDs also run under ``setpriv
--pdeathsig KILL`` so that none outlives the test process.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

from twisted.internet import defer, reactor
from twisted.logger import Logger
from twisted.trial.unittest import SkipTest

from perc_daemons.demo.stack import MdHost, sleep
from tests.e2e.cascade_support import CHAIN, CascadeChainMixin, heard_from, wait_hearing
from tests.e2e.conference_support import RecordingEndpoint, StackTestCase
from tests.e2e.test_conference import MIN_DELIVERY

#: Who joins through which MD.
PLACES = {"alice": "md", "bob": "md2", "carol": "md3", "erin": "md3"}
#: The MDs' hosts (namespace suffixes), in chain order.
HOSTS = {"md": "a", "md2": "b", "md3": "c"}
#: Where the test's /24 is taken from (RFC 2544 benchmarking range).
RANGE = ipaddress.ip_network("198.18.0.0/15")
#: Seconds of media from every endpoint.
MEDIA_SECONDS = 2.0


class NetworkUnavailable(Exception):
    """A namespace, veth or bridge could not be made here."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``ip ARGS`` (iproute2); NetworkUnavailable naming the command if ``check`` and
    it failed."""
    try:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NetworkUnavailable(f"ip {' '.join(args)}: {e}") from None
    if check and done.returncode != 0:
        raise NetworkUnavailable(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done


class Hosts:
    """Three namespaces ``perc-<pid>-a/b/c``, each with a veth pair to bridge
    ``perc<pid>br`` in the root namespace (``perc<pid>a`` ... are the root ends)."""

    def __init__(self) -> None:
        tag = str(os.getpid())
        self.namespaces = {md: f"perc-{tag}-{h}" for md, h in HOSTS.items()}
        self.veths = {md: f"perc{tag}{h}" for md, h in HOSTS.items()}
        self.bridge = f"perc{tag}br"
        self.made: list[tuple[str, str]] = []  # ("netns" | "link", name), in making order
        self.address: dict[str, str] = {}
        self.root_address = ""

    # --- making and removing ------------------------------------------------------------

    def make(self) -> None:
        """The namespaces, bridge and veths with their addresses, or NetworkUnavailable
        (after removing whatever was made)."""
        try:
            if shutil.which("ip") is None:
                raise NetworkUnavailable("no `ip` command (iproute2 is not installed)")
            first = next(iter(self.namespaces.values()))
            _ip("netns", "add", first)  # the probe: root or CAP_SYS_ADMIN, netns support
            self.made.append(("netns", first))
            subnet = self._free_subnet()
            hosts = subnet.hosts()
            self.root_address = str(next(hosts))
            for md, namespace in self.namespaces.items():
                self.address[md] = str(next(hosts))
                if namespace != first:
                    _ip("netns", "add", namespace)
                    self.made.append(("netns", namespace))
            _ip("link", "add", self.bridge, "type", "bridge")
            self.made.append(("link", self.bridge))
            _ip("addr", "add", f"{self.root_address}/{subnet.prefixlen}", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for md, namespace in self.namespaces.items():
                veth = self.veths[md]
                _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0",
                    "netns", namespace)
                self.made.append(("link", veth))
                _ip("link", "set", veth, "master", self.bridge, "up")
                _ip("-n", namespace, "addr", "add",
                    f"{self.address[md]}/{subnet.prefixlen}", "dev", "eth0")
                _ip("-n", namespace, "link", "set", "eth0", "up")
                _ip("-n", namespace, "link", "set", "lo", "up")
            for opener, acceptor in CHAIN:
                self._probe(opener, acceptor)
        except BaseException:
            self.remove()
            raise

    def _free_subnet(self) -> ipaddress.IPv4Network:
        """A /24 of :data:`RANGE` no address or route of this host overlaps (the
        process id picks where to start looking, so that parallel runs differ)."""
        taken = []
        for args in (("-j", "-4", "addr", "show"), ("-j", "-4", "route", "show", "table", "all")):
            for entry in json.loads(_ip(*args).stdout or "[]"):
                for item in entry.get("addr_info", [entry]):
                    text = item.get("local") or item.get("dst")
                    if text and text != "default":
                        prefix = item.get("prefixlen")
                        text = f"{text}/{prefix}" if prefix is not None else text
                        taken.append(ipaddress.ip_network(text, strict=False))
        subnets = list(RANGE.subnets(new_prefix=24))
        start = os.getpid() % len(subnets)
        for subnet in subnets[start:] + subnets[:start]:
            if not any(subnet.overlaps(t) for t in taken if t.version == 4):
                return subnet
        raise NetworkUnavailable(f"every /24 of {RANGE} is in use here")

    def _probe(self, source: str, target: str) -> None:
        """A TCP connection from ``source``'s namespace to a closed port of ``target``'s
        address is refused (the bridge passes frames between them), not timed out."""
        code = ("import socket, sys\n"
                "try:\n"
                f"    socket.create_connection(({self.address[target]!r}, 9), timeout=3)\n"
                "except ConnectionRefusedError:\n"
                "    sys.exit(0)\n"
                "except OSError as e:\n"
                "    sys.exit(str(e))\n")
        done = _ip("netns", "exec", self.namespaces[source], sys.executable, "-I", "-S",
                   "-c", code, check=False)
        if done.returncode != 0:
            raise NetworkUnavailable(
                f"host {HOSTS[source]} cannot reach host {HOSTS[target]} over bridge "
                f"{self.bridge} ({done.stderr.strip()}): frames between veths dropped "
                "(br_netfilter with an iptables FORWARD policy of DROP?)")

    def kill_processes(self) -> list[int]:
        """SIGKILL whatever still runs in the namespaces (only what this test started
        there: the namespaces are its own); their pids."""
        killed = []
        for kind, name in self.made:
            if kind != "netns":
                continue
            for line in _ip("netns", "pids", name, check=False).stdout.split():
                try:
                    os.kill(int(line), signal.SIGKILL)
                    killed.append(int(line))
                except (ValueError, ProcessLookupError):
                    pass
        return killed

    def remove(self) -> list[int]:
        """Kill what runs inside, delete veths (both ends), namespaces and bridge; check
        that none is left (RuntimeError).  The pids killed."""
        if not self.made:
            return []
        killed = self.kill_processes()
        for kind, name in reversed(self.made):
            if kind == "link":
                _ip("link", "del", name, check=False)
        for kind, name in reversed(self.made):
            if kind == "netns":
                _ip("netns", "del", name, check=False)
        listed = _ip("netns", "list", check=False).stdout.split()
        left = [name for kind, name in self.made if (
            name in listed if kind == "netns"
            else _ip("link", "show", name, check=False).returncode == 0)]
        self.made = []
        if left:
            raise RuntimeError(f"left behind: {left}")
        return killed

    # --- for the stack and the endpoints ------------------------------------------------

    def md_hosts(self) -> dict[str, MdHost]:
        """Each MD's :class:`MdHost`: its address, run inside its namespace (and killed
        when the test process dies: ``setpriv --pdeathsig``, where there is setpriv)."""
        ip = shutil.which("ip") or "ip"
        setpriv = shutil.which("setpriv")
        guard = (setpriv, "--pdeathsig", "KILL") if setpriv else ()
        return {md: MdHost(self.address[md], (ip, "netns", "exec", namespace, *guard))
                for md, namespace in self.namespaces.items()}

    def counters(self) -> dict[str, dict[str, int]]:
        """Packets per root-side veth (``tx``: into the namespace, ``rx``: out of it)
        and on the bridge device (``rx``: passed up to the root namespace)."""
        out = {}
        for name in (*self.veths.values(), self.bridge):
            stats = json.loads(_ip("-j", "-s", "link", "show", "dev", name).stdout)[0]
            stats = stats.get("stats64", stats.get("stats"))
            out[name] = {"rx": int(stats["rx"]["packets"]), "tx": int(stats["tx"]["packets"])}
        return out


class CascadeHostsTests(CascadeChainMixin, StackTestCase):
    timeout = 120
    conference = "hosts"

    async def setUp(self) -> None:
        self.net = Hosts()
        try:
            self.net.make()
        except NetworkUnavailable as e:
            raise SkipTest(f"no network namespaces here: {e} (this test makes three, "
                           "with veths and a bridge: root or CAP_SYS_ADMIN/CAP_NET_ADMIN "
                           "and iproute2)") from None
        # Cleanups run before tearDown in some trial versions, after it in others:
        # either way _close stops the daemons first, then removes the namespaces.
        self._closed = False
        self.addCleanup(self._close)
        await super().setUp()

    async def tearDown(self) -> None:
        await self._close()

    async def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if hasattr(self, "stack"):
                await super().tearDown()
        finally:
            killed = self.net.remove()
            if killed:
                sys.stderr.write(f"\nkilled processes left in the namespaces: {killed}\n")

    def stack_options(self) -> dict[str, Any]:
        return {"md_hosts": self.net.md_hosts()}

    def endpoint(self, user: str, source: Any = None, *, md: str = "md",
                 **kwargs: Any) -> RecordingEndpoint:
        # the endpoints' media socket on the root namespace's address on the bridge
        kwargs.setdefault("bind", (self.net.root_address, 0))
        return super().endpoint(user, source, md=md, **kwargs)

    async def md_info(self, md: str) -> Mapping[str, Any]:
        status, body = await self.stack.request("GET", self.stack.md_api_url(md) + "/v1/md",
                                                token=self.stack.provider_token)
        self.assertEqual(status, 200, body)
        return body

    async def test_chain_over_three_hosts(self) -> None:
        stack, net = self.stack, self.net
        started = reactor.seconds()
        figures: dict[str, Any] = {"addresses": dict(net.address), "root": net.root_address}
        # --- the conference on the three hosts' MDs, linked md -> md2 -> md3 ----------
        out = await self.create_chain(PLACES, title="Three hosts")
        for md, address in net.address.items():
            self.assertIn(f"{address}:{stack.md_tunnel_port(md)}", out)  # what the KMF keeps
            self.assertTrue(stack.md_api_url(md).startswith(f"https://{address}:"))
            info = await self.md_info(md)
            self.assertEqual(info["media"]["host"], address, md)
            self.assertEqual(info["tunnel"]["host"], address, md)
        fingerprints = {md: (await self.md_info(md))["fingerprint"] for md in stack.md_names}
        for opener, acceptor in CHAIN:
            # the opener sends to the acceptor's host address (the accepting half learns
            # the opener's from its checks and lists no "peer")
            peers = {(link["peer_fingerprint"], (link["peer"] or {}).get("host"))
                     for link in await self.links(opener) if link["role"] == "client"}
            self.assertEqual(peers, {(fingerprints[acceptor], net.address[acceptor])}, opener)
            self.assertIn(fingerprints[opener], {link["peer_fingerprint"] for link in
                                                 await self.links(acceptor)}, acceptor)
        kd_log = stack.children["kd"].text()
        for md in stack.md_names:
            self.assertIn(f"tunnel up: md {stack.md_tunnel_address(md)}", kd_log)
        figures["chain up (s)"] = round(reactor.seconds() - started, 1)

        # --- alice on a, bob on b, carol and erin on c: media among all four ----------
        eps = await self.join_places(PLACES)
        await self.same_epoch(*eps.values())
        before = net.counters()
        since = reactor.seconds()
        await defer.gatherResults([ep.run_media(MEDIA_SECONDS) for ep in eps.values()],
                                  consumeErrors=True)
        sent = {user: len(ep.rtp_sent(after=since)) for user, ep in eps.items()}
        for user, count in sent.items():
            self.assertGreater(count, 25 * MEDIA_SECONDS, f"{user} sent too little")
        await wait_hearing(list(eps.values()), "every receiver decrypted most of each "
                           "sender's packets across the hosts",
                           by=int(MIN_DELIVERY * min(sent.values())), since=since)
        await sleep(reactor, 0.3)  # whatever is still in flight
        after = net.counters()
        self.assert_byte_identical(eps)
        for user, ep in eps.items():
            self.assertEqual(ep.decrypt_failures(), [], f"{user}: decrypt failures")
            self.assertEqual(ep.unattributed_decrypt_failures, 0, user)
        heard = {(r, s): heard_from(eps[r], eps[s], since) for r in eps for s in eps if r != s}
        figures["decrypted (receiver<-sender)"] = {f"{r}<-{s}": n for (r, s), n in heard.items()}
        figures["sent"] = sent

        # --- it crossed the veths ---------------------------------------------------------
        delta = {name: {k: after[name][k] - before[name][k] for k in ("rx", "tx")}
                 for name in after}
        figures["veth packets during the media"] = delta
        for md, veth in net.veths.items():
            local = [u for u, m in PLACES.items() if m == md]
            remote = [u for u in PLACES if u not in local]
            # into the host: its endpoints' media, and each remote sender's at least once
            into = (sum(sent[s] for s in local)
                    + sum(max(heard[r, s] for r in local) for s in remote))
            # out of it: what its endpoints decrypted, and its senders' toward the others
            out_of = (sum(heard[r, s] for r in local for s in PLACES if s != r)
                      + sum(max(heard[r, s] for r in remote) for s in local))
            self.assertGreaterEqual(delta[veth]["tx"], into, f"into host {HOSTS[md]}")
            self.assertGreaterEqual(delta[veth]["rx"], out_of, f"out of host {HOSTS[md]}")
        # host to host: what left a namespace and was not passed up to the root one
        between = sum(delta[v]["rx"] for v in net.veths.values()) - delta[net.bridge]["rx"]
        order = list(stack.md_names)
        position = {user: order.index(md) for user, md in PLACES.items()}
        needed = 0
        for s in PLACES:  # each sender's packets over each hop, once per direction
            for hop in range(len(order) - 1):
                beyond = [r for r in PLACES if r != s and
                          (position[r] > hop if position[s] <= hop else position[r] <= hop)]
                needed += max((heard[r, s] for r in beyond), default=0)
        figures["host to host (packets, needed)"] = (between, needed)
        self.assertGreater(needed, 0)
        self.assertGreaterEqual(between, needed, "the links' media did not go host to host")
        figures["elapsed (s)"] = round(reactor.seconds() - started, 1)
        Logger().info("cascade over three hosts: {figures}",
                      figures=figures)  # in _trial_temp/test.log
