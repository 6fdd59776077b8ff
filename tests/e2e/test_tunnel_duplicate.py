"""A second tunnel with the KD's certificate, and tunnels that stop answering (real twistd).

perc-kmf, perc-md and perc-kd run as real ``twistd`` children
(:class:`~perc_daemons.demo.stack.LocalStack`, no tap: the KD connects
straight to the MD).  The attacker holds a copy of the KD's certificate and
key; a "KD copy" is a second perc-kd process with them
(:meth:`~perc_daemons.demo.stack.LocalStack.start_kd_copy`), which is also
what a replacement KD looks like to the MD.  Orders of arrival and departure:

* the KD first, the attacker second, the attacker gone: the KD's tunnel keeps
  serving joins (before: the MD had registered the attacker's connection,
  and once it dropped every join answered 503 while the KD saw a healthy
  tunnel);
* a KD copy first, the KD second: the KD is refused while the copy answers,
  and takes over once the copy is gone;
* the KD hung (SIGSTOP) and a replacement started: the MD checks the hung
  KD's tunnel, it does not answer, the replacement takes over; the hung KD,
  resumed, finds its tunnel closed and is refused;
* the MD hung (SIGSTOP): the KD's liveness check closes its tunnel, and the
  KD is connected again once the MD resumes.

No timing is asserted: waits have generous deadlines.
"""

from __future__ import annotations

import re
import signal
from typing import Any

import treq
from twisted.internet import defer, reactor, ssl
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from perc_daemons.demo.stack import LocalStack, sleep
from tests.e2e.conference_support import StackTestCase, wait_for

TUNNEL_UP = "tunnel to md up"


@implementer(IHandshakeListener)
class KeyHolder(Protocol):
    """A TLS client presenting the KD's certificate to the MD's tunnel port; sends nothing."""

    def __init__(self) -> None:
        self.data = b""
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.greeted: defer.Deferred[None] = defer.Deferred()

    def handshakeCompleted(self) -> None:
        pass

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if not self.greeted.called:
            self.greeted.callback(None)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


async def hold_kd_key(stack: LocalStack) -> KeyHolder:
    """Connect to the MD's tunnel port with a copy of the KD's certificate and key."""
    kd = stack.kd_cert
    options = ssl.optionsForClientTLS(
        "localhost", trustRoot=ssl.Certificate.loadPEM(stack.ca_pem),
        clientCertificate=ssl.PrivateCertificate.loadPEM(
            kd.certificate.read_bytes() + kd.private_key.read_bytes()))
    endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1",
                                                         stack.ports.md_tunnel))
    return await endpoint.connect(Factory.forProtocol(KeyHolder))


async def metric(stack: LocalStack, daemon: str, sample: str) -> float:
    """The value of ``sample`` (``name{labels}`` as exposed) on ``daemon``'s /metrics, or 0."""
    url = f"http://127.0.0.1:{stack.admin_port(daemon)}/metrics"
    response = await treq.get(url, pool=stack.pool, timeout=5)
    text = (await treq.content(response)).decode()
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


async def wait_metric(stack: LocalStack, daemon: str, sample: str, at_least: float) -> None:
    values: list[float] = [0.0]

    async def check() -> bool:
        values[0] = await metric(stack, daemon, sample)
        return values[0] >= at_least

    deadline = reactor.seconds() + 30.0
    while not await check():
        if reactor.seconds() > deadline:
            raise AssertionError(f"perc-{daemon} {sample} = {values[0]}, not {at_least}+"
                                 f"\n{stack.logs()[-6000:]}")
        await sleep(reactor, 0.1)


REFUSED = 'perc_tunnel_duplicates_total{outcome="refused"}'
REPLACED = 'perc_tunnel_duplicates_total{outcome="replaced"}'


class DuplicateTunnelTests(StackTestCase):
    tap = False
    users = ("alice", "bob", "carol")
    invited = ("alice", "bob", "carol")
    timeout = 180

    async def test_attacker_with_the_kd_key_cannot_take_the_tunnel(self) -> None:
        """The KD first, the attacker second and then gone: joins keep working."""
        stack = self.stack
        attacker = await hold_kd_key(stack)
        await defer.DeferredList([attacker.greeted, attacker.lost], fireOnOneCallback=True)
        if not attacker.lost.called:
            attacker.transport.loseConnection()  # the attacker leaves on its own
        await attacker.lost
        alice = self.endpoint("alice")
        await alice.join()
        bob = self.endpoint("bob")
        await bob.join()
        await self.same_epoch(alice, bob)
        # The MD sent the attacker nothing (no SupportedProfiles, no Associations).
        self.assertEqual(attacker.data, b"")
        self.assertEqual(await metric(stack, "md", REFUSED), 1)
        self.assertEqual((await stack.md_conference(self.conference))["kd_connected"], True)

    async def test_kd_refused_while_a_copy_answers_then_takes_over(self) -> None:
        """A KD copy first, the KD second: refused until the copy is gone."""
        stack = self.stack
        await stack.stop("kd")
        await stack.start_kd_copy()
        await wait_for(lambda: TUNNEL_UP in stack.children["kd-copy"].text(),
                       "the KD copy's tunnel is up")
        await stack.start("kd")
        await wait_metric(stack, "md", REFUSED, 2)  # the KD tries again, and is refused again
        self.assertNotIn(TUNNEL_UP, stack.children["kd"].text())
        self.assertIn("closed by the MD before the tunnel was up", stack.children["kd"].text())

        await stack.stop("kd-copy")
        await wait_for(lambda: TUNNEL_UP in stack.children["kd"].text(),
                       "the KD's tunnel is up")
        await stack.wait_for_kd(self.conference)
        alice = self.endpoint("alice")
        await alice.join()  # keyed by the genuine KD: the copy is gone
        self.assertIsNotNone(alice.current_spi)

    async def test_replacement_kd_takes_over_from_a_hung_kd(self) -> None:
        """The KD hung, a replacement started: it takes over; the hung KD resumed is refused."""
        stack = self.stack
        hung = stack.children["kd"]
        hung.transport.signalProcess(signal.SIGSTOP)
        try:
            await stack.start_kd_copy("kd-new")
            await wait_for(lambda: TUNNEL_UP in stack.children["kd-new"].text(),
                           "the replacement KD's tunnel is up", timeout=30.0)
            self.assertEqual(await metric(stack, "md", REPLACED), 1)
            alice = self.endpoint("alice")
            await alice.join()
        finally:
            hung.transport.signalProcess(signal.SIGCONT)
        await wait_metric(stack, "md", REFUSED, 1)  # the old KD is back and is refused
        bob = self.endpoint("bob")
        await bob.join()
        await self.same_epoch(alice, bob)


class KdLivenessTests(StackTestCase):
    tap = False
    users = ("alice",)
    invited = ("alice",)
    timeout = 180
    settings = {"kd": {"tunnel": {"liveness_interval": 0.5, "liveness_timeout": 1.0}}}

    async def test_kd_reconnects_after_the_md_stopped_answering(self) -> None:
        stack = self.stack
        md = stack.children["md"]
        md.transport.signalProcess(signal.SIGSTOP)
        try:
            await wait_metric(stack, "kd", 'perc_tunnel_errors_total{reason='
                              '"tunnel_liveness_timeout"}', 1)
        finally:
            md.transport.signalProcess(signal.SIGCONT)
        await wait_for(lambda: stack.children["kd"].text().count(TUNNEL_UP) >= 2,
                       "the KD's tunnel is up again", timeout=60.0)
        await stack.wait_for_kd(self.conference)
        alice = self.endpoint("alice")
        await alice.join()
        self.assertIsNotNone(alice.current_spi)
