"""``perc-endpoint``: the reference PERC endpoint (and load generator) on the command line.

::

    perc-endpoint --kmf https://localhost:8443 --md https://localhost:9443 --ca ca.crt \\
        --conference ID --user alice@localhost --password-file F \\
        [--kd-name kd.localhost] [--duration 10] \\
        [--audio-wav in.wav | --tone 440 | --video [--rate 50] [--keyframe-every 30]] \\
        [--simulcast] [--no-audio-level] [--last-n N] [--max-height H] [--bandwidth BPS] \\
        [--record-dir DIR] [--capture FILE] [--history FILE] [--stats-json out.json]
        [--load N ...]

The password comes from the first line of ``--password-file`` or from the
``PERC_PASSWORD`` environment variable (never from the command line).

``--load N`` runs N endpoints in this process, the i-th (1-based) starting
``--ramp`` seconds after the previous one.  Users: either ``--users-file F``
(one ``USER [PASSWORD]`` per line, whitespace-separated, ``#`` comments; a
line without password uses the shared one; the first N lines are used) or a
``--user`` pattern containing ``{i}`` (``--user 'user{i}@localhost'``:
user1@localhost ... userN@localhost, all with the shared password).  Each
endpoint sends a different tone (``--tone`` + 20 Hz per index) or the same
WAV/video; ``--record-dir`` gets one subdirectory per endpoint.

A recording kept as ciphertext (issue 14, seed draft-westerlund s4.8):
``--capture FILE`` writes every packet received with the hop-by-hop layer
off (inner ciphertext, OHB, EKTField: what the provider's side may hold);
``--history FILE``, on an endpoint that joins later, decrypts it once
admitted with the earlier epochs' EKT keys (``POST .../keys?epoch=N``),
which the KMF gives only under the conference's ``late_join = "history"``
policy, and writes its audio to ``--record-dir``/history; under another
policy the KMF refuses them (403 history-not-allowed), nothing is
decrypted, and the exit status is 1.

For an MD that forwards selectively (an SFU, issue 13): ``--simulcast``
sends, beside the audio, three simulcast video encodings (RFC 8853: h, m, l
at 30, 15 and 7.5 packets/s, ``--keyframe-every`` a multiple of 4 there);
``--no-audio-level`` leaves the RFC 6464 audio level out of the offer;
``--last-n``, ``--max-height`` and ``--bandwidth`` go into the join's
``receive`` preferences (``last_n``, ``max_height``, ``max_bitrate``), and
``--bandwidth`` is also the REMB sent with each receiver report.

Exit status: 0 every endpoint joined, sent and verified its roster; 1 a
failure (login or join refused, answer not verified, no connection, decrypt
failures above ``--max-decrypt-failures``, an SSRC no verified roster lists,
fewer senders than ``--expect-senders``); 2 usage or file errors.  The
statistics JSON (``--stats-json``, ``-`` for stdout) holds, per endpoint, its
sent packets, join time (offer POST to first decrypted packet) and per sender
SSRC: identity from the roster, packets, bytes, losses, decrypt failures and
the EKT SPIs (epochs) seen.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import IO, Any
from urllib.parse import urlsplit

from perc_daemons.endpoint.https import CaError, load_ca

__all__ = ["UsageError", "build_parser", "main", "parse_args", "read_users"]

DEFAULT_KMF = "https://localhost:8443"
DEFAULT_MD = "https://localhost:9443"
PASSWORD_ENV = "PERC_PASSWORD"


class UsageError(Exception):
    """A bad command line or unusable input file: exit status 2."""


class _Parser(argparse.ArgumentParser):
    output: IO[str] | None = None

    def error(self, message: str) -> Any:  # argparse would exit; we report status 2
        raise UsageError(f"{self.prog}: {message}")

    def _print_message(self, message: str, file: IO[str] | None = None) -> None:
        if message:
            (self.output or file or sys.stderr).write(message)


def _https_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme != "https" or not parts.hostname or parts.query or parts.fragment:
        raise argparse.ArgumentTypeError(f"{value!r} is not an https:// URL")
    return value.rstrip("/")


def _positive(kind: type) -> Any:
    def check(value: str) -> Any:
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
        if number <= 0:
            raise argparse.ArgumentTypeError(f"{value!r} must be positive")
        return number
    return check


def _non_negative(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value!r} must not be negative")
    return number


def _bind(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep:
        return value, 0
    try:
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad port in {value!r}") from None
    if not 0 <= number < 65536:
        raise argparse.ArgumentTypeError(f"bad port in {value!r}")
    return host.strip("[]"), number


def build_parser(output: IO[str] | None = None) -> argparse.ArgumentParser:
    p = _Parser(prog="perc-endpoint", description=__doc__.split("\n\n")[0],
                epilog=("Users under --load: --users-file F (lines 'USER [PASSWORD]') or a "
                        "--user pattern with {i} (1..N). Exit status: 0 success, 1 failure "
                        "(join refused, answer not verified, decrypt failures, roster "
                        "mismatch), 2 usage error."),
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.output = output
    p.add_argument("--kmf", type=_https_url, default=DEFAULT_KMF, help="the IdP/KMF base URL")
    p.add_argument("--md", type=_https_url, default=DEFAULT_MD,
                   help="the MD's conference API base URL")
    p.add_argument("--ca", required=True,
                   help="PEM CA certificate(s): trusted for the KMF, the MD and the KD's "
                        "answer signature")
    p.add_argument("--conference", required=True, help="the conference id")
    p.add_argument("--user", help="USER or USER@DOMAIN (the identity expected); with --load "
                                  "a pattern containing {i}")
    p.add_argument("--password-file",
                   help=f"first line is the password (else ${PASSWORD_ENV})")
    p.add_argument("--kd-name", action="append", dest="kd_names", metavar="NAME",
                   help="DNS name the answer-signing KD certificate must have (repeatable; "
                        "default kd.localhost)")
    p.add_argument("--duration", type=_non_negative, default=10.0,
                   help="seconds of media after joining")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--audio-wav", metavar="WAV",
                        help="send this WAV file (any rate/width/channels) as PCMU, looped")
    source.add_argument("--tone", type=_positive(float), metavar="HZ",
                        help="send a sine tone as PCMU (the default, 440 Hz)")
    source.add_argument("--video", action="store_true",
                        help="send 1200-byte VP8-like packets instead of audio")
    p.add_argument("--rate", type=_positive(float), default=50.0,
                   help="video packets per second")
    p.add_argument("--keyframe-every", type=_positive(int), default=None,
                   help="a video key frame every N packets (default 30; with --simulcast "
                        "every N frames, a multiple of 4, default 60)")
    p.add_argument("--simulcast", action="store_true",
                   help="also send three simulcast video encodings (h, m, l; RFC 8853)")
    p.add_argument("--no-audio-level", dest="audio_level", action="store_false",
                   help="do not offer the RFC 6464 audio level header extension")
    p.add_argument("--last-n", type=_positive(int), metavar="N",
                   help="receive preference: video of the N most recent speakers")
    p.add_argument("--max-height", type=_positive(int), metavar="H",
                   help="receive preference: video at most H pixels high")
    p.add_argument("--bandwidth", type=_positive(int), metavar="BPS",
                   help="receive bandwidth (bits/s): the REMB sent and the join's max_bitrate")
    p.add_argument("--record-dir", help="write each audio sender to DIR/ssrc-XXXXXXXX.wav")
    p.add_argument("--capture", metavar="FILE",
                   help="write every packet received, its hop-by-hop layer off, to FILE: a "
                        "recording kept as ciphertext (readable only with the epochs' keys)")
    p.add_argument("--history", metavar="FILE",
                   help="once joined, decrypt the recording FILE (made with --capture) with "
                        "the earlier epochs' keys, if the conference's late_join policy is "
                        "history; audio to DIR/history/ with --record-dir")
    p.add_argument("--stats-json", metavar="FILE", help="write statistics JSON here ('-': "
                                                        "stdout)")
    p.add_argument("--load", type=_positive(int), default=1, metavar="N",
                   help="run N endpoints in this process")
    p.add_argument("--users-file", help="with --load: lines 'USER [PASSWORD]'")
    p.add_argument("--ramp", type=_non_negative, default=0.2,
                   help="with --load: seconds between two endpoints' joins")
    p.add_argument("--bind", type=_bind, default=("127.0.0.1", 0), metavar="HOST[:PORT]",
                   help="local UDP address for media (port 0 = any; any port under --load)")
    p.add_argument("--connect-timeout", type=_positive(float), default=15.0,
                   help="seconds for ICE + DTLS + the first EKT key")
    p.add_argument("--max-decrypt-failures", type=_non_negative, default=0.05,
                   metavar="RATIO", help="tolerated decrypt failures / received packets")
    p.add_argument("--expect-senders", type=int, default=0, metavar="N",
                   help="fail when fewer distinct senders were heard")
    p.add_argument("--client-id", default="perc-endpoint", help="the KMF's OAuth public client")
    p.add_argument("--redirect-uri", default="http://127.0.0.1/callback",
                   help="the client's registered redirect URI")
    p.add_argument("--issuer", help="the KMF's issuer (default: its RFC 8414 metadata)")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    return p


def parse_args(argv: Sequence[str], output: IO[str] | None = None) -> argparse.Namespace:
    args = build_parser(output).parse_args(list(argv))
    if args.load > 1 and args.bind[1] != 0:
        raise UsageError("perc-endpoint: --bind with a fixed port cannot be used with --load")
    if args.users_file is None:
        if not args.user:
            raise UsageError("perc-endpoint: --user is required (or --users-file)")
        if args.load > 1 and "{i}" not in args.user:
            raise UsageError("perc-endpoint: with --load, --user must contain {i} "
                             "(or use --users-file)")
    if args.kd_names is None:
        args.kd_names = ["kd.localhost"]
    if args.simulcast and args.video:
        raise UsageError("perc-endpoint: --simulcast sends audio plus video; not with --video")
    if args.load > 1 and (args.capture or args.history):
        raise UsageError("perc-endpoint: --capture and --history are for one endpoint, not "
                         "--load")
    if args.keyframe_every is None:
        args.keyframe_every = 60 if args.simulcast else 30
    if args.simulcast and args.keyframe_every % 4:
        raise UsageError("perc-endpoint: with --simulcast, --keyframe-every must be a "
                         "multiple of 4 (all three encodings send on those frames)")
    return args


def receive_preferences(args: argparse.Namespace) -> dict[str, int] | None:
    """The join body's ``receive`` of ``--last-n``/``--max-height``/``--bandwidth``, or None."""
    receive = {name: value for name, value in (("last_n", args.last_n),
                                               ("max_height", args.max_height),
                                               ("max_bitrate", args.bandwidth))
               if value is not None}
    return receive or None


def _first_line(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            line = f.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"perc-endpoint: {what} {path}: "
                         f"{getattr(e, 'strerror', None) or e}") from None
    if not line:
        raise UsageError(f"perc-endpoint: {what} {path} is empty")
    return line


def shared_password(args: argparse.Namespace, environ: dict[str, str]) -> str | None:
    if args.password_file is not None:
        return _first_line(args.password_file, "--password-file")
    return environ.get(PASSWORD_ENV) or None


def read_users(args: argparse.Namespace, password: str | None) -> list[tuple[str, str]]:
    """The (user, password) of each of the ``--load`` endpoints."""
    if args.users_file is not None:
        try:
            with open(args.users_file, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"perc-endpoint: --users-file {args.users_file}: "
                             f"{getattr(e, 'strerror', None) or e}") from None
        users = []
        for number, line in enumerate(lines, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            parts = text.split(None, 1)
            own = parts[1] if len(parts) == 2 else password
            if own is None:
                raise UsageError(f"perc-endpoint: {args.users_file}:{number}: no password "
                                 f"(and neither --password-file nor ${PASSWORD_ENV})")
            users.append((parts[0], own))
        if len(users) < args.load:
            raise UsageError(f"perc-endpoint: {args.users_file} lists {len(users)} users, "
                             f"--load wants {args.load}")
        return users[:args.load]
    if password is None:
        raise UsageError(f"perc-endpoint: no password: use --password-file or ${PASSWORD_ENV}")
    if args.load == 1:
        return [(args.user, password)]
    return [(args.user.replace("{i}", str(i)), password) for i in range(1, args.load + 1)]


def _check_files(args: argparse.Namespace) -> None:
    try:
        load_ca(args.ca)
    except CaError as e:
        raise UsageError(f"perc-endpoint: --ca {e}") from None
    if args.audio_wav is not None:
        from perc_daemons.endpoint.media import read_wav_8k_mono
        try:
            if not read_wav_8k_mono(args.audio_wav):
                raise ValueError(f"{args.audio_wav}: no audio")
        except (OSError, ValueError) as e:
            raise UsageError(f"perc-endpoint: --audio-wav {e}") from None


def _source_factory(args: argparse.Namespace) -> Any:
    from perc_daemons.endpoint.media import ToneSource, VideoSource, WavSource

    def source(index: int) -> Any:
        if args.video:
            return VideoSource(rate=args.rate, keyframe_every=args.keyframe_every)
        if args.audio_wav is not None:
            return WavSource(args.audio_wav)
        return ToneSource(min(3900.0, (args.tone or 440.0) + 20.0 * index))
    return source


def _line(data: dict[str, Any]) -> str:
    who = data.get("identity") or data.get("label")
    if not data["ok"]:
        return f"{who}: FAILED: " + "; ".join(data["failures"])
    join = data.get("join_time")
    join_text = f"{join:.3f} s" if isinstance(join, float) else "no media received"
    senders = data["senders"]
    received = sum(s["packets"] for s in senders)
    lost = sum(s["losses"] for s in senders)
    failed = sum(s["decrypt_failures"] for s in senders)
    history = data.get("history")
    history_text = "" if not history else (
        f"; history: {sum(s['packets'] for s in history['decrypted'])} of "
        f"{history['records']} recorded packets decrypted (earlier epochs "
        f"{', '.join(map(str, sorted(history['epochs']))) or 'none'})")
    return (f"{who}: OK: join time {join_text}, sent {data['sent']['packets']} packets, "
            f"received {received} from {len(senders)} senders ({lost} lost, {failed} "
            f"decrypt failures), roster epoch "
            f"{(data.get('roster') or {}).get('epoch')}{history_text}")


async def run(args: argparse.Namespace, users: list[tuple[str, str]], reactor: Any,
              stdout: IO[str], stderr: IO[str]) -> int:
    """Run the endpoints; writes statistics; the exit status."""
    from twisted.internet import defer

    from perc_daemons.endpoint.client import Endpoint, record_subdir
    from perc_daemons.endpoint.load import run_endpoints, summary
    from perc_daemons.endpoint.media import SimulcastVideo

    endpoints = [
        Endpoint(reactor, kmf_url=args.kmf, md_url=args.md, ca=args.ca,
                 conference_id=args.conference, user=user, password=password,
                 kd_names=args.kd_names, kind="video" if args.video else "audio",
                 record_dir=record_subdir(args.record_dir, i, len(users)), bind=args.bind,
                 connect_timeout=args.connect_timeout, client_id=args.client_id,
                 redirect_uri=args.redirect_uri, issuer=args.issuer,
                 max_decrypt_failure_ratio=args.max_decrypt_failures,
                 expect_senders=args.expect_senders,
                 label=user if len(users) == 1 else f"{i + 1}:{user}",
                 video="simulcast" if args.simulcast else None,
                 video_source=(SimulcastVideo(keyframe_every=args.keyframe_every)
                               if args.simulcast else None),
                 audio_level=args.audio_level, bandwidth=args.bandwidth,
                 receive=receive_preferences(args), capture=args.capture,
                 history=args.history)
        for i, (user, password) in enumerate(users)]

    def interrupted() -> Any:  # Ctrl-C: still say goodbye to the MD and the KD
        # leave() also covers an endpoint between two associations (rejoining)
        return defer.gatherResults([e.leave() for e in endpoints], consumeErrors=True)

    trigger = reactor.addSystemEventTrigger("before", "shutdown", interrupted)
    try:
        outcomes = await run_endpoints(reactor, endpoints, args.duration, ramp=args.ramp,
                                       source_for=_source_factory(args))
    finally:
        reactor.removeSystemEventTrigger(trigger)
    per_endpoint = [o.as_json() for o in outcomes]
    report: dict[str, Any] = (per_endpoint[0] if len(per_endpoint) == 1 else
                              {"summary": summary(outcomes), "endpoints": per_endpoint})
    for data in per_endpoint:
        stderr.write(_line(data) + "\n")
    if len(outcomes) > 1:
        total = summary(outcomes)
        stderr.write(f"{total['ok']}/{total['endpoints']} endpoints OK, join time "
                     f"{total['join_time']}\n")
    if args.stats_json is not None:
        text = json.dumps(report, indent=2, sort_keys=True) + "\n"
        if args.stats_json == "-":
            stdout.write(text)
        else:
            try:
                with open(args.stats_json, "w", encoding="utf-8") as f:
                    f.write(text)
            except OSError as e:
                stderr.write(f"perc-endpoint: --stats-json {args.stats_json}: "
                             f"{e.strerror or e}\n")
                return 1
    return 0 if all(o.ok for o in outcomes) else 1


def _start_logging(verbose: bool, stderr: IO[str]) -> None:
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    predicate = LogLevelFilterPredicate(LogLevel.info if verbose else LogLevel.warn)
    observer = FilteringLogObserver(textFileLogObserver(stderr), [predicate])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def main(argv: Sequence[str] | None = None, *, stdout: IO[str] | None = None,
         stderr: IO[str] | None = None, environ: dict[str, str] | None = None) -> int:
    """The console script: the exit status."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    env = dict(os.environ if environ is None else environ)
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv, out)
        users = read_users(args, shared_password(args, env))
        _check_files(args)
    except UsageError as e:
        err.write(f"{e}\n")
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)

    from twisted.internet import defer, task

    _start_logging(args.verbose, err)
    result: list[int] = []

    def go(reactor: Any) -> Any:
        async def body() -> None:
            try:
                result.append(await run(args, users, reactor, out, err))
            except Exception as e:  # never a traceback for the operator
                err.write(f"perc-endpoint: unexpected error: {type(e).__name__}: {e}\n")
                result.append(1)
        return defer.ensureDeferred(body())

    try:
        task.react(go)
    except SystemExit:
        pass
    return result[0] if result else 1


if __name__ == "__main__":
    sys.exit(main())
