"""The short fuzz run of ``make check``: 10^4 mutated inputs per target (tests/fuzz).

Each target gets its own test, fed with a fixed seed so that a failure
reproduces; the full run (10^6 per target) is ``make fuzz``.  The harness
itself is tested on a parser with a planted bug.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

from twisted.trial import unittest

from tests.fuzz import harness
from tests.fuzz.harness import Bench, Mutator, Seed, Target
from tests.fuzz.targets import TARGETS

#: Inputs per target in ``make check`` (the brief of issue 10: 10^4).
SHORT_RUN = 10_000
SEED = 10


class _Planted(Exception):
    """The typed refusal of the planted parser."""


def _planted_parse(data: bytes) -> bool:
    """A length-prefixed parser whose length check is off by one (a planted bug)."""
    if len(data) < 2:
        raise _Planted("short")
    (length,) = struct.unpack_from("!H", data)
    if length > len(data) - 1:  # should be len(data) - 2
        raise _Planted("length")
    body = data[2:2 + length]
    return body[length - 1] != 0xFF if length else True  # IndexError when length overruns


PLANTED = Target("planted", (_Planted,),
                 lambda: Bench([Seed(b"\x00\x03abc", ((0, 2),))], _planted_parse))


class HarnessTests(unittest.TestCase):
    def test_finds_and_saves_the_planted_bug(self) -> None:
        crash_dir = Path(self.mktemp())
        lines: list[str] = []
        result = harness.run_target(PLANTED, 2000, seed=1, crash_dir=crash_dir,
                                    out=lines.append)
        self.assertEqual([f.kind for f in result.findings], ["IndexError"])
        finding = result.findings[0]
        self.assertIn("test_fuzz.py", finding.location)
        self.assertGreater(finding.count, 1)  # deduplicated by type and line
        data = bytes.fromhex(Path(finding.path).read_text())
        self.assertRaises(IndexError, _planted_parse, data)
        self.assertEqual(result.seeds_accepted, 1)
        self.assertGreater(result.accepted, 0)
        self.assertGreater(result.refused, 0)
        self.assertIn("reproduce with", "\n".join(lines))

    def test_typed_refusals_are_not_findings(self) -> None:
        def parse(data: bytes) -> bool:
            raise _Planted("never accepted")

        target = Target("refusing", (_Planted,), lambda: Bench([Seed(b"x")], parse))
        result = harness.run_target(target, 100, crash_dir=self.mktemp(), out=lambda _: None)
        self.assertEqual((result.findings, result.refused, result.accepted), ([], 100, 0))

    def test_mutations_are_deterministic(self) -> None:
        seeds = [Seed(bytes(range(40)), ((3, 2),)), Seed(b"a=b\r\n" * 5)]

        def inputs(seed: int) -> list[bytes]:
            mutator = Mutator(random.Random(seed), seeds, [b"\r\n", b"\xc2\xb2"])
            return [mutator.next()[0] for _ in range(200)]

        self.assertEqual(inputs(1), inputs(1))
        self.assertNotEqual(inputs(1), inputs(2))
        self.assertGreater(len(set(inputs(1))), 150)

    def test_length_fields_are_edited(self) -> None:
        mutator = Mutator(random.Random(3), [Seed(bytes(8), ((2, 2),))])
        values = set()
        for _ in range(400):
            data = bytearray(bytes(8))
            mutator.length_field(data, mutator.seeds[0])
            values.add(int.from_bytes(data[2:4], "big"))
        self.assertTrue({1, 0xFFFF, 4}.issubset(values))  # 4: the bytes after the field


def _short_run(name: str):  # type: ignore[no-untyped-def]
    def test(self: unittest.TestCase) -> None:
        result = harness.run_target(TARGETS[name], SHORT_RUN, seed=SEED,
                                    crash_dir=self.mktemp(), out=lambda _: None)
        report = "\n".join(f"{f.kind} at {f.location}: {f.message} ({f.count}x); input "
                           f"{f.input_hex}\n{f.traceback}" for f in result.findings)
        self.assertEqual(result.findings, [], report)
        self.assertEqual(result.inputs, SHORT_RUN)

    test.__doc__ = f"{SHORT_RUN} mutated inputs to {name}: no untyped exception."
    return test


class ShortFuzzRun(unittest.TestCase):
    """One test per target of tests.fuzz.targets."""


for _name in TARGETS:
    setattr(ShortFuzzRun, "test_" + _name.replace(".", "_"), _short_run(_name))
