"""A mutation fuzzer for the sans-I/O parsers of :mod:`perc_daemons.protocol`.

Design (``make fuzz``; a short run is part of ``make check`` through
``tests/unit/test_fuzz.py``):

* **Targets** (:mod:`tests.fuzz.targets`): one per parser or per state of a
  state machine.  A :class:`Target` names the exceptions that are the
  parser's documented refusal (its *typed* errors: a
  :class:`~perc_daemons.protocol.errors.ProtocolError` subclass, or the
  ``ValueError`` subclass a module documents) and builds, once per run, a
  :class:`Bench`: the valid seed inputs, made with the project's own encoders
  (a packet protected by our SRTP, a real DTLS handshake between two
  :class:`~perc_daemons.protocol.dtls.DtlsConnection`, an answer signed by
  :func:`~perc_daemons.protocol.answer.sign_answer` ...), and a ``parse``
  callable that feeds one input through the parser (and the accessors and
  follow-up steps a daemon applies to what it accepted).  ``parse`` returns
  whether the input was accepted; it may check documented invariants (such
  as ``serialize(parse(x)) == x``) with ``assert``.  Where the real input is
  protected by a MAC or a signature, a *structured* target mutates the
  plaintext and has ``parse`` re-seal it with the known key, so that the
  mutations reach the code behind the check.  The DTLS state-machine targets
  replay a recorded association to a fresh connection with one datagram
  replaced by the mutated one (its first byte picks which), the
  connection's randomness fixed so that the recorded peer stays valid.
* **Mutators** (:class:`Mutator`): deterministic, from one
  :class:`random.Random` per target seeded with ``(seed, target name)``:
  bit flips, random and "interesting" bytes, truncation, extension,
  insertion and deletion of random bytes, duplicated chunks, edits of the
  length fields at the offsets each seed declares (and of 1-3 byte fields
  at random offsets) to 0, 1, the maximum, +-1, +-small and the remaining
  length, dictionary tokens (for text formats), and splicing two seeds.
  One to four of them are stacked per input.  Inputs a parser accepted go
  into a small pool that later inputs are also derived from, so that
  several mutations can add up while staying valid.
* **Runner** (:func:`run_target`, :func:`run`): feeds the seeds unmutated
  first (how many the parser accepts is a check of the harness), then ``n``
  inputs per target; it counts inputs per second and how many were refused
  with a typed error or accepted, and collects every other exception (``IndexError``,
  ``struct.error``, ``KeyError``, ``TypeError``, ``UnicodeDecodeError``,
  ``RecursionError``, ``AssertionError``, ``OverflowError`` ... : a bug),
  deduplicated by exception type and the innermost source line in
  ``perc_daemons`` (else the innermost line).  The first input of each is
  written as hex to ``<crash dir>/<target>-<type>-<file>-<line>.hex`` and
  printed with the command that reproduces it.  Inputs slower than
  ``slow_threshold`` seconds are reported too.  ``--jobs`` runs targets in
  parallel processes.  The exit status is 1 when any untyped exception was
  found.

Usage::

    python -m tests.fuzz [--inputs N] [--seed S] [--jobs J] [--crash-dir DIR]
                         [--target NAME ...] [--list]
    python -m tests.fuzz --target NAME --reproduce DIR/NAME-....hex
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import random
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.utils import CryptographyDeprecationWarning

__all__ = [
    "Bench",
    "Finding",
    "Mutator",
    "Seed",
    "Target",
    "TargetResult",
    "main",
    "run",
    "run_target",
]

_PACKAGE = os.sep + "perc_daemons" + os.sep
_REPO = Path(__file__).resolve().parent.parent.parent


@dataclass(frozen=True)
class Seed:
    """A valid input and the (offset, size) of its big-endian length fields.

    A negative offset counts from the end of the input.
    """

    data: bytes
    fields: tuple[tuple[int, int], ...] = ()


@dataclass
class Bench:
    """What a target needs at run time: its seeds and the parse callable."""

    seeds: list[Seed]
    parse: Callable[[bytes], object]
    dictionary: Sequence[bytes] = ()
    #: Longest input the mutators produce.
    max_size: int = 4096
    #: Whether accepted inputs feed later mutations (off for state machines
    #: that accept everything).
    pool: bool = True


@dataclass(frozen=True)
class Target:
    """One parser (or one parser state) to fuzz."""

    name: str
    #: The documented refusals: anything else escaping ``parse`` is a bug.
    typed: tuple[type[BaseException], ...]
    build: Callable[[], Bench]
    description: str = ""
    #: Relative cost per input, to start the slowest targets first with --jobs.
    cost: float = 1.0


@dataclass
class Finding:
    """One distinct untyped exception (or slow input) and its first input."""

    target: str
    kind: str
    location: str
    message: str
    input_hex: str
    path: str
    count: int = 1
    traceback: str = ""


@dataclass
class TargetResult:
    target: str
    inputs: int = 0
    seeds: int = 0
    seeds_accepted: int = 0
    seconds: float = 0.0
    setup_seconds: float = 0.0
    accepted: int = 0
    refused: int = 0
    slowest: float = 0.0
    findings: list[Finding] = field(default_factory=list)
    slow: list[Finding] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.inputs / self.seconds if self.seconds else 0.0

    @property
    def untyped(self) -> int:
        return sum(f.count for f in self.findings)


# -- mutators --------------------------------------------------------------------------

_INTERESTING_BYTES = (0x00, 0x01, 0x02, 0x03, 0x0F, 0x10, 0x7F, 0x80, 0x81, 0xC0, 0xFE, 0xFF)


class Mutator:
    """Deterministic mutations of a target's seeds (see the module docstring)."""

    def __init__(self, rng: random.Random, seeds: Sequence[Seed],
                 dictionary: Sequence[bytes] = (), max_size: int = 4096,
                 pool_size: int = 64) -> None:
        if not seeds:
            raise ValueError("a target needs at least one seed")
        self.rng = rng
        self.seeds = list(seeds)
        self.dictionary = list(dictionary)
        self.max_size = max_size
        self.pool: list[Seed] = []
        self.pool_size = pool_size
        self._ops: list[Callable[[bytearray, Seed], None]] = [
            self.flip_bits, self.flip_bits, self.random_bytes, self.interesting_byte,
            self.truncate, self.extend, self.insert, self.delete, self.duplicate,
            self.length_field, self.length_field, self.length_field, self.random_field,
            self.splice,
        ]
        if self.dictionary:
            self._ops += [self.token, self.token, self.token]

    def keep(self, data: bytes, origin: Seed) -> None:
        """Remember an accepted input (with its seed's fields) for later mutations."""
        if len(self.pool) < self.pool_size:
            self.pool.append(Seed(data, origin.fields))
        else:
            self.pool[self.rng.randrange(self.pool_size)] = Seed(data, origin.fields)

    def next(self) -> tuple[bytes, Seed]:
        """One mutated input and the seed (or pool entry) it came from."""
        rng = self.rng
        if self.pool and rng.random() < 0.25:
            base = rng.choice(self.pool)
        else:
            base = rng.choice(self.seeds)
        data = bytearray(base.data)
        for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
            rng.choice(self._ops)(data, base)
        del data[self.max_size:]
        return bytes(data), base

    # the operations: each edits ``data`` in place

    def _position(self, data: bytearray) -> int:
        return self.rng.randrange(len(data)) if data else 0

    def flip_bits(self, data: bytearray, base: Seed) -> None:
        if data:
            for _ in range(self.rng.choice((1, 1, 2, 4))):
                data[self._position(data)] ^= 1 << self.rng.randrange(8)

    def random_bytes(self, data: bytearray, base: Seed) -> None:
        if data:
            for _ in range(self.rng.choice((1, 1, 2, 4))):
                data[self._position(data)] = self.rng.randrange(256)

    def interesting_byte(self, data: bytearray, base: Seed) -> None:
        if data:
            data[self._position(data)] = self.rng.choice(_INTERESTING_BYTES)

    def truncate(self, data: bytearray, base: Seed) -> None:
        if not data:
            return
        choice = self.rng.random()
        if choice < 0.3:
            del data[len(data) - self.rng.randint(1, min(4, len(data))):]
        elif choice < 0.5:
            del data[:self.rng.randint(1, min(16, len(data)))]
        else:
            del data[self.rng.randrange(len(data)):]

    def extend(self, data: bytearray, base: Seed) -> None:
        count = self.rng.choice((1, 2, 4, 16, 64, 512))
        data += self.rng.randbytes(count) if self.rng.random() < 0.5 else bytes(count)

    def insert(self, data: bytearray, base: Seed) -> None:
        at = self.rng.randint(0, len(data))
        data[at:at] = self.rng.randbytes(self.rng.choice((1, 1, 2, 3, 4, 8, 16)))

    def delete(self, data: bytearray, base: Seed) -> None:
        if data:
            at = self._position(data)
            del data[at:at + self.rng.choice((1, 1, 2, 3, 4, 8, 16))]

    def duplicate(self, data: bytearray, base: Seed) -> None:
        if data:
            start = self._position(data)
            chunk = data[start:start + self.rng.choice((1, 2, 4, 8, 16, 64))]
            at = self.rng.randint(0, len(data))
            data[at:at] = chunk * self.rng.choice((1, 1, 2, 8))

    def _set_field(self, data: bytearray, offset: int, size: int) -> None:
        if offset < 0:
            offset += len(data)
        if offset < 0 or offset + size > len(data):
            return
        value = int.from_bytes(data[offset:offset + size], "big")
        top = (1 << (8 * size)) - 1
        rest = len(data) - offset - size
        small = self.rng.randint(2, 64)
        new = self.rng.choice((0, 1, top, top - 1, value + 1, value - 1, value + small,
                               value - small, rest, rest + 1, rest - 1, len(data),
                               value * 2, value // 2, top >> 1, (top >> 1) + 1,
                               self.rng.randrange(top + 1)))
        data[offset:offset + size] = (new & top).to_bytes(size, "big")

    def length_field(self, data: bytearray, base: Seed) -> None:
        if base.fields:
            self._set_field(data, *self.rng.choice(base.fields))
        else:
            self.random_field(data, base)

    def random_field(self, data: bytearray, base: Seed) -> None:
        if data:
            self._set_field(data, self._position(data), self.rng.choice((1, 2, 2, 3, 4)))

    def splice(self, data: bytearray, base: Seed) -> None:
        other = self.rng.choice(self.seeds).data
        if data and other:
            at = self.rng.randint(0, len(data))
            data[at:] = other[self.rng.randrange(len(other)):]

    def token(self, data: bytearray, base: Seed) -> None:
        token = self.rng.choice(self.dictionary)
        at = self.rng.randint(0, len(data))
        if self.rng.random() < 0.5:
            data[at:at] = token
        else:
            data[at:at + len(token)] = token


# -- the runner ---------------------------------------------------------------------------


def _location(exc: BaseException) -> str:
    """``file:line (function)`` of the innermost project frame (else the innermost)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?"
    chosen = frames[-1]
    for frame in reversed(frames):
        if _PACKAGE in frame.filename:
            chosen = frame
            break
    filename = chosen.filename
    try:
        filename = str(Path(filename).resolve().relative_to(_REPO))
    except ValueError:
        marker = "site-packages" + os.sep
        if marker in filename:
            filename = filename.split(marker, 1)[1]
    return f"{filename}:{chosen.lineno} ({chosen.name})"


def _file_name(target: str, kind: str, location: str) -> str:
    where = location.split(" ", 1)[0]
    stem, _, line = where.rpartition(":")
    stem = Path(stem).stem or "unknown"
    return f"{target}-{kind}-{stem}-{line}.hex"


def _message(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text[:200]


def run_target(target: Target, n: int, seed: int = 0,
               crash_dir: str | os.PathLike[str] = "fuzz-crashes", slow_threshold: float = 2.0,
               progress: float = 0.0, out: Callable[[str], None] = print) -> TargetResult:
    """Fuzz one target with ``n`` inputs; see the module docstring."""
    with warnings.catch_warnings():
        # Mutated certificates make cryptography warn about what it will refuse one day.
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        return _run_target(target, n, seed, crash_dir, slow_threshold, progress, out)


def _run_target(target: Target, n: int, seed: int, crash_dir: str | os.PathLike[str],
                slow_threshold: float, progress: float,
                out: Callable[[str], None]) -> TargetResult:
    result = TargetResult(target.name)
    started = time.perf_counter()
    bench = target.build()
    result.setup_seconds = time.perf_counter() - started
    mutator = Mutator(random.Random(f"{seed}:{target.name}"), bench.seeds, bench.dictionary,
                      bench.max_size)
    directory = Path(crash_dir)
    typed = target.typed
    parse = bench.parse
    keep = bench.pool
    seen: dict[tuple[str, str], Finding] = {}
    clock = time.perf_counter
    next_report = clock() + progress if progress else None
    # The seeds themselves first: a seed the parser refuses is a harness bug.
    inputs = [(s.data, s) for s in bench.seeds]
    result.seeds = len(inputs)
    begin = clock()
    for index in range(len(inputs) + n):
        if index < len(inputs):
            data, origin = inputs[index]
        else:
            data, origin = mutator.next()
        t0 = clock()
        try:
            accepted = parse(data)
        except typed:
            if index >= len(inputs):
                result.refused += 1
        except Exception as exc:  # every other exception is a finding
            kind = type(exc).__name__
            location = _location(exc)
            key = (kind, location)
            finding = seen.get(key)
            if finding is not None:
                finding.count += 1
            else:
                directory.mkdir(parents=True, exist_ok=True)
                path = directory / _file_name(target.name, kind, location)
                path.write_text(data.hex() + "\n")
                finding = Finding(target.name, kind, location, _message(exc), data.hex(),
                                  str(path), traceback="".join(traceback.format_exception(exc)))
                seen[key] = finding
                result.findings.append(finding)
                out(f"[{target.name}] untyped {kind} at {location}: {finding.message}\n"
                    f"    input ({len(data)} bytes) saved to {path}; reproduce with\n"
                    f"    python -m tests.fuzz --target {target.name} --reproduce {path}")
        else:
            if index < len(inputs):
                result.seeds_accepted += bool(accepted)
            elif accepted:
                result.accepted += 1
                if keep:
                    mutator.keep(data, origin)
        elapsed = clock() - t0
        if elapsed > result.slowest:
            result.slowest = elapsed
            if elapsed > slow_threshold:
                directory.mkdir(parents=True, exist_ok=True)
                path = directory / f"{target.name}-slow.hex"
                path.write_text(data.hex() + "\n")
                result.slow = [Finding(target.name, "slow", f"{elapsed:.2f} s", "", data.hex(),
                                       str(path))]
                out(f"[{target.name}] slow input: {elapsed:.2f} s, saved to {path}")
        if next_report is not None and clock() >= next_report:
            spent = clock() - begin
            out(f"[{target.name}] {index + 1}/{n} inputs, {(index + 1) / spent:,.0f}/s, "
                f"{len(result.findings)} untyped")
            next_report = clock() + progress
    result.inputs = n
    result.seconds = clock() - begin
    return result


def _run_one(args: tuple[str, int, int, str, float, float]) -> TargetResult:
    from tests.fuzz.targets import TARGETS  # in the worker process

    name, n, seed, crash_dir, slow, progress = args
    result = run_target(TARGETS[name], n, seed, crash_dir, slow, progress,
                        out=lambda line: print(line, flush=True))
    print(_row(result), flush=True)
    return result


def run(targets: Iterable[Target], n: int, *, seed: int = 0,
        crash_dir: str | os.PathLike[str] = "fuzz-crashes", jobs: int = 1,
        slow_threshold: float = 2.0, progress: float = 0.0,
        out: Callable[[str], None] = print) -> list[TargetResult]:
    """Fuzz every target; with ``jobs > 1`` targets run in parallel processes."""
    targets = list(targets)
    if jobs <= 1:
        results = []
        for target in targets:
            result = run_target(target, n, seed, crash_dir, slow_threshold, progress, out)
            out(_row(result))
            results.append(result)
        return results
    order = sorted(targets, key=lambda t: -t.cost)
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = {t.name: pool.submit(_run_one, (t.name, n, seed, str(crash_dir),
                                                  slow_threshold, progress)) for t in order}
        return [futures[t.name].result() for t in targets]


_HEADER = (f"{'target':<18} {'seeds':>7} {'inputs':>9} {'seconds':>8} {'inputs/s':>9} "
           f"{'accepted':>9} {'typed':>9} {'untyped':>8} {'slowest':>8}")


def _row(r: TargetResult) -> str:
    distinct = f"{r.untyped}/{len(r.findings)}" if r.findings else "0"
    seeds = f"{r.seeds_accepted}/{r.seeds}"
    return (f"{r.target:<18} {seeds:>7} {r.inputs:>9} {r.seconds:>8.1f} {r.rate:>9,.0f} "
            f"{r.accepted:>9} {r.refused:>9} {distinct:>8} {r.slowest * 1000:>6.1f}ms")


def summary(results: Sequence[TargetResult]) -> str:
    lines = [_HEADER]
    lines += [_row(r) for r in results]
    inputs = sum(r.inputs for r in results)
    seconds = sum(r.seconds for r in results)
    untyped = sum(r.untyped for r in results)
    distinct = sum(len(r.findings) for r in results)
    lines.append(f"{'total':<18} {'':>7} {inputs:>9} {seconds:>8.1f} "
                 f"{inputs / seconds if seconds else 0:>9,.0f} "
                 f"{sum(r.accepted for r in results):>9} {sum(r.refused for r in results):>9} "
                 f"{f'{untyped}/{distinct}' if distinct else '0':>8}")
    lines.append("(seeds: accepted/valid seeds, fed first; accepted, typed: mutated inputs the "
                 "parser took or refused with its typed error; untyped: exceptions/distinct; "
                 "seconds: wall time per target, summed)")
    return "\n".join(lines)


def reproduce(target: Target, path: str | os.PathLike[str]) -> int:
    """Feed one saved input again; print the traceback of an untyped exception."""
    data = bytes.fromhex(Path(path).read_text().strip())
    bench = target.build()
    try:
        accepted = bench.parse(data)
    except target.typed as exc:
        print(f"refused with the typed {type(exc).__name__}: {exc}")
        return 0
    except Exception:
        traceback.print_exc()
        return 1
    print("accepted" if accepted else "refused")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from tests.fuzz.targets import TARGETS

    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", "-n", type=int, default=10_000,
                        help="mutated inputs per target (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="mutation seed (default 0)")
    parser.add_argument("--jobs", "-j", type=int, default=1, help="parallel processes")
    parser.add_argument("--crash-dir", default="fuzz-crashes",
                        help="where reproducing inputs are written (default fuzz-crashes)")
    parser.add_argument("--target", "-t", action="append", default=[],
                        help="only this target (repeatable)")
    parser.add_argument("--slow", type=float, default=2.0,
                        help="report inputs slower than this many seconds (default 2)")
    parser.add_argument("--progress", type=float, default=0.0,
                        help="print progress every this many seconds (default never)")
    parser.add_argument("--list", action="store_true", help="list the targets and exit")
    parser.add_argument("--reproduce", metavar="HEXFILE",
                        help="feed one saved input to the --target")
    args = parser.parse_args(argv)
    if args.list:
        for target in TARGETS.values():
            print(f"{target.name:<18} {target.description}")
        return 0
    unknown = [name for name in args.target if name not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; see --list")
    if args.reproduce:
        if len(args.target) != 1:
            parser.error("--reproduce needs exactly one --target")
        return reproduce(TARGETS[args.target[0]], args.reproduce)
    chosen = [TARGETS[name] for name in args.target] if args.target else list(TARGETS.values())
    print(f"fuzzing {len(chosen)} targets, {args.inputs} inputs each, seed {args.seed}, "
          f"{args.jobs} job(s)", flush=True)
    if args.jobs <= 1:
        print(_HEADER, flush=True)
    started = time.perf_counter()
    results = run(chosen, args.inputs, seed=args.seed, crash_dir=args.crash_dir, jobs=args.jobs,
                  slow_threshold=args.slow, progress=args.progress,
                  out=lambda line: print(line, flush=True))
    print()
    print(summary(results))
    print(f"wall time {time.perf_counter() - started:.1f} s")
    findings = [f for r in results for f in r.findings]
    if findings:
        print(f"\n{len(findings)} distinct untyped exception(s):")
        for f in findings:
            print(f"  {f.target}: {f.kind} at {f.location} ({f.count}x) -> {f.path}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
