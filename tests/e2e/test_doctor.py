"""perc-admin doctor against a running stack made by perc-admin setup: all well, then
each kind of breakage it must name, with the fix."""

from __future__ import annotations

import io
import os
import pwd

from perc_daemons.doctor import diagnose
from perc_daemons.kmf import admin_cli
from tests.e2e.conference_support import StackTestCase

ME = pwd.getpwuid(os.geteuid()).pw_name


class DoctorTests(StackTestCase):
    create_conference = False

    def findings(self, status: str) -> list[tuple[str, str, str]]:
        etc = os.path.join(self.stack.dir, "etc")
        return [(f.what, f.detail, f.fix) for f in diagnose(etc, ME) if f.status == status]

    async def test_a_healthy_stack_then_what_breaks_it(self) -> None:
        etc = os.path.join(self.stack.dir, "etc")
        self.assertEqual(self.findings("fail"), [])
        ok = "\n".join(" ".join(f) for f in self.findings("ok"))
        for text in ("perc-kmf running", "perc-kd running", "perc-md running",
                     "the KD's view of the KMF: TLS verified",
                     "an endpoint's view of the MD: TLS verified",
                     "the KD's view of this MD's tunnel port: TLS verified",
                     "perc-kd's secret matches client 'kd'",
                     "perc-admin's secret matches client 'perc-admin'"):
            self.assertIn(text, ok)
        out, err = io.StringIO(), io.StringIO()
        code = admin_cli.main(["doctor", "--etc-dir", etc, "--user", ME], stdout=out,
                              stderr=err)
        self.assertEqual((code, err.getvalue()), (0, ""), out.getvalue())
        self.assertIn("0 problem(s)", out.getvalue())

        # a key made world-readable; a KD secret that is not the registered one
        key = os.path.join(etc, "tls", "md.key")
        os.chmod(key, 0o644)
        self.addCleanup(os.chmod, key, 0o640)
        secret = os.path.join(etc, "kd-client.secret")
        with open(secret) as f:
            good = f.read()
        self.addCleanup(self._write, secret, good)
        self._write(secret, "x" * 43 + "\n")
        failed = self.findings("fail")
        self.assertIn((key, "mode 0644 is too open for a private file", f"chmod 0640 {key}"),
                      failed)
        self.assertTrue(any(what == secret and "does not match client 'kd'" in detail
                            for what, detail, _ in failed), failed)
        code = admin_cli.main(["doctor", "--etc-dir", etc, "--user", ME, "--no-network"],
                              stdout=io.StringIO(), stderr=err)
        self.assertEqual(code, 1)
        self.assertIn("doctor found 2 problem(s)", err.getvalue())

        # a stopped daemon whose port another process took
        await self.stack.stop("md")
        import socket

        holder = socket.socket()
        holder.bind(("127.0.0.1", self.stack.ports.md_api))
        holder.listen()
        self.addCleanup(holder.close)
        failed = self.findings("fail")
        self.assertIn(("perc-md", f"[api] port {self.stack.ports.md_api} on 127.0.0.1 is held "
                       "by another process", "ss -ltnup shows which; stop it or change the "
                       "port"), failed)

    @staticmethod
    def _write(path: str, text: str) -> None:
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o640)
