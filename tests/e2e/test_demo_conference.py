"""``make demo``: the whole local conference runs, every check holds, nothing is left running."""

from __future__ import annotations

import os
import re
import sys

from twisted.internet import utils
from twisted.trial import unittest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class ConferenceDemoTests(unittest.TestCase):
    timeout = 120

    async def test_demo(self) -> None:
        env = dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
        out, err, code = await utils.getProcessOutputAndValue(
            sys.executable, ["-m", "perc_daemons.demo.conference", "--seconds", "2"],
            env=env, path=REPO)
        text = out.decode() + err.decode()
        self.assertEqual(code, 0, text[-5000:])
        checks = re.search(r"^(\d+) of (\d+) checks passed\.$", text, re.M)
        self.assertIsNotNone(checks, text[-3000:])
        self.assertEqual(checks.group(1), checks.group(2))
        self.assertGreaterEqual(int(checks.group(2)), 15)
        self.assertNotIn("FAILED", text)
        self.assertIn("dave refused", text)
        pids = [int(p) for p in re.findall(r"^  perc-\w+ running, pid (\d+)$", text, re.M)]
        self.assertEqual(len(pids), 3, text[:2000])
        for pid in pids:  # nothing left running
            self.assertFalse(os.path.exists(f"/proc/{pid}") and _alive(pid), pid)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
