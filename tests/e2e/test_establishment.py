"""draft-roach conference establishment in one command, then the end reaching the MD.

A stack whose KD has no ``[tunnel] mds``: it learns the MD of a conference from
the KMF (slides 4.1.1 steps 7-11), as ``perc-admin conferences create --md``
arranges with the MD (perc-provider's requests) and the KMF.
"""

from __future__ import annotations

import io
import os

from twisted.internet import defer, reactor

from perc_daemons.demo.stack import sleep
from perc_daemons.kmf.admin_cli import run
from perc_daemons.protocol.dtls.crypto import format_fingerprint
from tests.e2e.conference_support import StackTestCase, wait_for


class EstablishmentTests(StackTestCase):
    static_mds = False
    create_conference = False
    tap = False
    conference = "weekly"

    async def admin(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        etc = os.path.join(self.stack.dir, "etc")
        code = await run([*argv, "--config", os.path.join(etc, "admin.toml"),
                          "--url", self.stack.kmf_url], reactor, stdout=out, stderr=err)
        return code, out.getvalue(), err.getvalue()

    async def test_one_command_sets_it_up_and_the_end_reaches_the_md(self) -> None:
        # the KD has no tunnel yet: nobody told it about an MD
        self.assertIn("connecting to the MDs the KMF names", self.stack.logs())
        code, out, err = await self.admin(
            "conferences", "create", "weekly", "--title", "Weekly", "--invite",
            "alice@localhost", "--invite", "bob@localhost", "--start",
            "--md", self.stack.md_url)
        self.assertEqual((code, err), (0, ""), out)
        tunnel = f"localhost:{self.stack.ports.md_tunnel}"
        self.assertRegex(out, r"(?m)^state: +running$")
        self.assertRegex(out, rf"(?m)^media distributors: +{tunnel}$")
        self.assertRegex(out, r"(?m)^kd connected to md: +yes$")
        md = await self.stack.md_conference("weekly")
        self.assertEqual(md["kd_fingerprint"], format_fingerprint(self.stack.kd_fingerprint))

        eps = await self.join("alice", "bob")
        await defer.gatherResults([ep.run_media(1.0) for ep in eps.values()],
                                  consumeErrors=True)

        def delivered() -> bool:
            return all(len(ep.received(other.ssrc)) >= 20
                       for ep in eps.values() for other in eps.values() if other is not ep)

        await wait_for(delivered, "alice and bob decrypted each other's media")

        # the end at the KMF ends the conference at the MD too (the KD's
        # ConferenceEnded), and the KD drops the tunnel no conference needs
        code, out, err = await self.admin("conferences", "end", "weekly")
        self.assertEqual((code, err), (0, ""), out)
        for _ in range(200):
            status, _ = await self.stack.request("GET", self.stack.md_url +
                                                 "/v1/conferences/weekly",
                                                 token=self.stack.provider_token)
            if status == 404:
                break
            await sleep(reactor, 0.05)
        self.assertEqual(status, 404, "the MD still has the ended conference")
        await wait_for(lambda: f"no conference is served by the MD at {tunnel}"
                       in self.stack.logs(), "the KD closed the unneeded tunnel")
