"""Bogus token requests at line rate do not starve the KD (issue 10 item 8), real daemons.

Sixteen loops post ``/oauth/token`` with wrong secrets for the KD's and the
admin's client ids and with unknown client ids, from 127.0.0.2, as fast as
the real perc-kmf answers.  While they run: the KD's client (right secret)
gets a token, the admin client creates and starts a conference, and a
reference endpoint joins it (login, identity assertion, the KD's invitation
check and epoch key) and decrypts media.  Every bogus request is refused
(401, or 429 once the per-client and per-address failure limits are hit).
"""

from __future__ import annotations

import base64
import secrets
import urllib.parse

import treq
from twisted.internet import defer, reactor
from twisted.web.client import Agent, HTTPConnectionPool

from perc_daemons.demo.stack import ADMIN_CLIENT, KD_CLIENT, TrustPolicy
from tests.e2e.conference_support import StackTestCase, wait_for


def basic(client_id: str, secret: str) -> str:
    raw = f"{urllib.parse.quote_plus(client_id)}:{urllib.parse.quote_plus(secret)}".encode()
    return "Basic " + base64.b64encode(raw).decode()


class TokenFloodTests(StackTestCase):
    timeout = 120

    async def test_bogus_token_requests_leave_tokens_and_joins_served(self) -> None:
        stack = self.stack
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        agent = Agent(reactor, contextFactory=TrustPolicy(stack.ca_pem), pool=pool,
                      bindAddress=("127.0.0.2", 0))
        bogus = [basic(KD_CLIENT, "wrong"), basic(KD_CLIENT, stack.kd_secret[:-1] + "x"),
                 basic(ADMIN_CLIENT, secrets.token_urlsafe(32)),
                 basic("nobody", stack.kd_secret)]
        body = urllib.parse.urlencode({"grant_type": "client_credentials"}).encode()
        codes: list[int] = []
        stop: list[bool] = []

        async def flood(i: int) -> None:
            while not stop:
                response = await treq.post(
                    stack.kmf_url + "/oauth/token", data=body, agent=agent,
                    headers={"Authorization": bogus[(i + len(codes)) % len(bogus)],
                             "Content-Type": "application/x-www-form-urlencoded"})
                await treq.content(response)
                codes.append(response.code)

        floods = [defer.ensureDeferred(flood(i)) for i in range(16)]
        try:
            await wait_for(lambda: 429 in codes and len(codes) > 100, "the flood at its limit")
            before = len(codes)
            # the KD's client, with its right secret, gets a token
            code, answer = await stack.request("POST", stack.kmf_url + "/oauth/token",
                                               form={"grant_type": "client_credentials"},
                                               basic=(KD_CLIENT, stack.kd_secret))
            self.assertEqual(code, 200, answer)
            self.assertIn("access_token", answer)
            # a conference is made and a participant joins and hears another
            await stack.create_conference("flooded", ["alice", "bob"])
            await stack.wait_for_kd("flooded")
            alice = self.endpoint("alice", conference_id="flooded")
            bob = self.endpoint("bob", conference_id="flooded")
            await alice.join()
            await bob.join()
            await alice.run_media(0.5)
            await wait_for(lambda: bob.received(alice.ssrc), "bob decrypts alice")
            self.assertGreater(len(codes), before, "the flood stopped during the joins")
        finally:
            stop.append(True)
            await defer.gatherResults(floods, consumeErrors=True)
        self.assertEqual(set(codes) - {401, 429}, set(), "a bogus request was not refused")
        self.assertIn(401, codes)
