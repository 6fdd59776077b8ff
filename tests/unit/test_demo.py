"""The protocol demo (perc_daemons.demo.protocol): `make demo` until the daemons exist."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys

from twisted.trial import unittest

from perc_daemons.demo import protocol

FRAME_1 = "Hello from A: PERC demo frame 1"


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = protocol.main(list(argv))
    return status, out.getvalue(), err.getvalue()


def sections(output: str) -> dict[str, str]:
    """Title -> text, split at the '== ... ==' and '-- ... --' headings."""
    result: dict[str, list[str]] = {"(preamble)": []}
    current = "(preamble)"
    for line in output.splitlines():
        if line[:3] in ("== ", "-- "):
            current = line[3:-3]
            result[current] = []
        else:
            result[current].append(line)
    return {title: "\n".join(lines) for title, lines in result.items()}


class DemoTests(unittest.TestCase):
    def check_run(self, *argv: str) -> str:
        status, output, errors = run(*argv)
        self.assertEqual((status, errors), (0, ""))
        lines = output.splitlines()
        self.assertTrue(lines[-1].startswith("demo OK: "), lines[-1])
        self.assertTrue(output.isascii())
        self.assertLessEqual(max(len(line) for line in lines), 100)

        parts = sections(output)
        counts = {title: text.count(FRAME_1) for title, text in parts.items()}
        plain = [t for t in counts if t.startswith("2.1 ")]
        decrypted = [t for t in counts if t.startswith(("2.5 B decrypts", "2.9 C decrypts"))]
        self.assertEqual((len(plain), len(decrypted)), (1, 2))
        for title in plain + decrypted:
            self.assertEqual(counts[title], 1, title)
        self.assertEqual(output.count(FRAME_1), 3)
        md_sections = [t for t in counts if "MD" in t]
        self.assertGreaterEqual(len(md_sections), 6)
        for title in md_sections:
            self.assertEqual(counts[title], 0, title)

        self.assertIn("EKTField byte-identical to what A sent", output)
        for outcome in ("AuthenticationFailed", "InnerAuthenticationFailed", "ReplayError",
                        "UnknownSpi"):
            self.assertIn(f"{outcome}", output)
        return output

    def key_table(self, output: str) -> dict[str, list[str]]:
        lines = output.splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("  party "))
        self.assertTrue(lines[start].startswith("  party  E2E key of A  EKT key  "))
        return {line.split()[0]: line.split()[1:] for line in lines[start + 1:start + 7]}

    def test_seed_1_profile_128(self) -> None:
        output = self.check_run("--seed", "1")
        self.assertIn("DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM", output)
        table = self.key_table(output)
        self.assertEqual(sorted(table), ["A", "B", "C", "KD", "MD1", "MD2"])
        for md in ("MD1", "MD2"):
            self.assertEqual(table[md][:2], ["-", "-"], md)  # no E2E key, no EKT key
            self.assertIn("holds", table[md][2:])
        for endpoint in ("A", "B", "C"):
            self.assertEqual(table[endpoint][:2], ["holds", "holds"], endpoint)
        self.assertEqual(table["MD1"], ["-", "-", "holds", "holds", "holds", "-"])
        self.assertEqual(table["MD2"], ["-", "-", "-", "-", "holds", "holds"])

    def test_seed_2_profile_256(self) -> None:
        output = self.check_run("--seed", "2", "--profile", "256")
        self.assertIn("DOUBLE_AEAD_AES_256_GCM_AEAD_AES_256_GCM", output)
        self.assertIn("AESKW_256", output)

    def test_same_seed_same_output(self) -> None:
        first = self.check_run("--seed", "1")
        self.assertEqual(self.check_run("--seed", "1"), first)
        self.assertNotEqual(self.check_run("--seed", "3"), first)

    def test_without_seed_keys_are_random(self) -> None:
        first, second = self.check_run(), self.check_run()
        self.assertIn("os.urandom", first)
        self.assertNotEqual(first, second)

    def test_quiet_prints_only_the_summary(self) -> None:
        status, output, _ = run("--seed", "1", "--quiet")
        self.assertEqual(status, 0)
        self.assertEqual(len(output.splitlines()), 1)
        self.assertTrue(output.startswith("demo OK: double AES-128-GCM; "))

    def test_a_failed_check_exits_1(self) -> None:
        class TamperingRelay(protocol.Relay):
            """An MD whose header edits also flip a payload bit."""

            __slots__ = ()

            def edit(self, *args, **kwargs) -> None:
                super().edit(*args, **kwargs)
                h = protocol.header_length(self.packet)
                self.packet = self.packet[:h] + bytes((self.packet[h] ^ 1,)) + self.packet[h + 1:]

        self.patch(protocol, "Relay", TamperingRelay)
        status, output, errors = run("--seed", "1")
        self.assertEqual(status, 1)
        self.assertNotIn("demo OK", output)
        self.assertIn("demo FAILED in \"2.9 C decrypts", errors)
        self.assertIn("InnerAuthenticationFailed", errors)

    def test_runs_as_a_module(self) -> None:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=root)
        result = subprocess.run(
            [sys.executable, "-m", "perc_daemons.demo.protocol", "--seed", "1", "--quiet"],
            capture_output=True, text=True, env=env, cwd=root, check=False)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, run("--seed", "1", "--quiet")[1])
