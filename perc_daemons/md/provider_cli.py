"""``perc-provider``: the conference provider's command line for perc-md.

The provider runs the Media Distributors; this talks to an MD's HTTPS
conference API (docs/API.md, :mod:`perc_daemons.md.api`) with the provider
token::

    perc-provider conferences create ID (--kd-fingerprint FP | --kd-certificate FILE)
                  [--forwarding sfu|all] [--last-n N] [--no-audio-levels] [--audio-top-k K]
    perc-provider conferences show ID
    perc-provider conferences end ID
    perc-provider links create ID --to URL     (cascade: this MD opens, URL's accepts)
    perc-provider links list ID                (state; media packets and bytes each way)
    perc-provider links delete ID LINK

``create`` is steps 7-9 of draft-roach-perc-webrtc's conference
establishment (slides 4.1.1): the MD learns the fingerprint of the KD that
will connect for this conference (the SHA-256 of its certificate, given as
``AA:BB:...`` or read from the KD's certificate file) and answers with the
host and port of its KD tunnel listener, which the KD must be told (step
11: ``perc-admin conferences create --md`` does all of it in one command).
The forwarding options are the conference's settings at the MD (docs/API.md,
"POST /v1/conferences (MD)"): ``--forwarding all`` relays every packet to
every receiver; with ``sfu`` (the default) ``--last-n`` bounds the video
sources per receiver (the most recent speakers), ``--no-audio-levels``
leaves the RFC 6464 audio level out of the MD's answers (video then
follows join order) and ``--audio-top-k`` forwards the audio of only the K
most recent speakers.  Left out, the MD's defaults apply.
``show`` adds whether the KD's tunnel is up and the participants; ``end``
ends the conference at the MD (every participant dropped, the KD told).

Configuration (``/etc/perc/provider.toml`` or ``--config``; ``perc-admin
setup`` makes it), flat TOML keys:

* ``url``: the MD's conference API, default ``"https://localhost:9443"``;
* ``ca_file``: PEM certificate(s) to trust for it ("" = the system's CAs);
* ``token_file``: the provider token (the MD's ``[api] provider_token_file``;
  first line; mode 0600 or 0640).

``--url`` and ``--token-file`` override them; ``--json`` prints JSON.  Exit
status: 0 done, 1 the MD refused (problem title and detail on stderr), 2
usage or configuration error.  The token is never printed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import quote, urlsplit

from perc_daemons import tls
from perc_daemons.cli import (
    ApiClient,
    Io,
    OperationError,
    Parser,
    UsageError,
    check_https_url,
    check_optional_path,
    fields,
    load_flat_toml,
    report,
    table,
    time_text,
    trust_root,
    unexpected,
)
from perc_daemons.config import ConfigError
from perc_daemons.protocol.dtls.crypto import (
    certificate_fingerprint,
    format_fingerprint,
    parse_fingerprint,
)

__all__ = ["ProviderConfig", "add_forwarding_arguments", "forwarding_settings",
           "kd_fingerprint", "load_provider_config", "main", "run"]

PROG = "perc-provider"
DEFAULT_CONFIG = "/etc/perc/provider.toml"
DEFAULT_URL = "https://localhost:9443"


@dataclass(frozen=True)
class ProviderConfig:
    path: str
    url: str = DEFAULT_URL
    ca_file: str = ""
    token_file: str = ""


def _check_url(value: str) -> str | None:
    if urlsplit(value).path not in ("", "/"):
        return "must be an https:// URL without path, query or fragment"
    return check_https_url(value)


_KEYS = {"url": _check_url, "ca_file": check_optional_path, "token_file": check_optional_path}


def load_provider_config(path: str, *, required: bool) -> ProviderConfig:
    """The provider config at ``path``; a missing file is the defaults unless ``required``."""
    values = load_flat_toml(path, _KEYS, required=required)
    return ProviderConfig(path, **(values or {}))


def kd_fingerprint(certificate_path: str) -> str:
    """``AA:BB:...``, the SHA-256 of the first certificate in a PEM file (RFC 8122 s5)."""
    from twisted.internet import ssl

    try:
        with open(certificate_path, "rb") as f:
            pem = f.read()
        der = ssl.Certificate.loadPEM(pem).dump()
    except OSError as e:
        raise OperationError(f"cannot read {certificate_path}", e.strerror or str(e)) from None
    except Exception:
        raise OperationError(f"{certificate_path}: not a PEM certificate") from None
    return format_fingerprint(certificate_fingerprint(der))


def _fingerprint_arg(value: str) -> str:
    try:
        return format_fingerprint(parse_fingerprint(value))
    except ValueError:
        raise argparse.ArgumentTypeError(
            "must be a SHA-256 fingerprint, 32 hex pairs separated by colons") from None


def _conference_id(value: str) -> str:
    return quote(value, safe="")


# --- the MD API ----------------------------------------------------------------------------


async def md_client(config: ProviderConfig, reactor: Any, *, url: str | None = None,
                    token_file: str | None = None) -> ApiClient:
    """An :class:`ApiClient` of the MD with the provider token as its bearer token."""
    trust = trust_root(config.ca_file, config.path) if config.ca_file else None
    path = token_file or config.token_file
    if not path:
        raise ConfigError(config.path, "token_file", "not set (or use --token-file)")
    try:
        token = tls.read_secret_line(path, forbidden=0o027)
    except tls.TlsFileError as e:
        raise ConfigError(config.path if not token_file else path,
                          "token_file" if not token_file else "--token-file",
                          f"{path}: {e}") from None
    client = ApiClient(reactor, url or config.url, trust)
    client.token = token
    return client


def _count(minimum: int, meaning: str) -> Any:
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = minimum - 1
        if number < minimum:
            raise argparse.ArgumentTypeError(meaning)
        return number
    return parse


def add_forwarding_arguments(parser: argparse.ArgumentParser) -> None:
    """The conference's forwarding settings at the MD (``perc-provider`` and ``perc-admin``
    ``conferences create``); :func:`forwarding_settings` reads them back."""
    parser.add_argument("--forwarding", choices=("sfu", "all"),
                        help="sfu (the MD's default): the MD selects per receiver (last-N "
                             "speakers, simulcast layers, repair); all: every packet to "
                             "every receiver")
    parser.add_argument("--last-n", type=_count(-1, "must be -1 (every source) or a count"),
                        metavar="N",
                        help="sfu: video of at most N sources per receiver, the most recent "
                             "speakers first (-1, the default: every source)")
    parser.add_argument("--no-audio-levels", dest="audio_levels", action="store_false",
                        default=None,
                        help="sfu: leave the RFC 6464 audio level out of the MD's answers "
                             "(no speaker detection: video follows join order)")
    parser.add_argument("--audio-top-k", type=_count(0, "must be 0 (every sender) or a count"),
                        metavar="K",
                        help="sfu: audio of only the K most recent speakers (0, the default: "
                             "every sender's)")


def forwarding_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The ``POST /v1/conferences`` members the options of :func:`add_forwarding_arguments`
    give (only those given); UsageError for sfu options with ``--forwarding all``."""
    settings: dict[str, Any] = {}
    for name in ("forwarding", "last_n", "audio_levels", "audio_top_k"):
        value = getattr(args, name, None)
        if value is not None:
            settings[name] = value
    if settings.get("forwarding") == "all" and len(settings) > 1:
        raise UsageError("--last-n, --no-audio-levels and --audio-top-k go with "
                         "--forwarding sfu")
    return settings


async def create_md_conference(client: ApiClient, conference_id: str, fingerprint: str,
                               settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """``POST /v1/conferences`` (steps 7-9): the MD's answer, with its tunnel address.

    ``settings``: the conference's forwarding members (:func:`forwarding_settings`)."""
    body = await client.call("POST", "/v1/conferences",
                             {"id": conference_id, "kd_fingerprint": fingerprint,
                              **(settings or {})})
    if not isinstance(body, dict) or not isinstance(body.get("tunnel"), dict):
        raise OperationError("bad response from the MD", "no tunnel address")
    return body


def tunnel_address(md_conference: dict[str, Any]) -> str:
    """The ``host:port`` of the MD's KD tunnel listener in its conference answer."""
    tunnel = md_conference.get("tunnel") or {}
    host, port = tunnel.get("host"), tunnel.get("port")
    if not isinstance(host, str) or not host or not isinstance(port, int):
        raise OperationError("bad response from the MD", f"tunnel {tunnel!r}")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def md_conference_text(c: dict[str, Any]) -> str:
    media = c.get("media") or {}
    pairs = [("id", c.get("id")), ("kd fingerprint", c.get("kd_fingerprint")),
             ("kd tunnel", tunnel_address(c) if c.get("tunnel") else "-"),
             ("media", f"{media.get('host')}:{media.get('port')}" if media else "-")]
    if c.get("forwarding"):
        forwarding = c["forwarding"]
        if forwarding == "sfu":
            forwarding += (f" (last-n {c.get('last_n')}, audio levels "
                           f"{'on' if c.get('audio_levels') else 'off'}, audio top-k "
                           f"{c.get('audio_top_k')})")
        pairs.append(("forwarding", forwarding))
    if "kd_connected" in c:
        pairs.append(("kd connected", "yes" if c.get("kd_connected") else "no"))
    text = fields(pairs)
    participants = c.get("participants")
    if participants:
        text += "\n" + table(("ASSOCIATION", "STATE", "JOINED"),
                             [(p.get("association"), p.get("state"), time_text(p.get("joined_at")))
                              for p in participants])
    return text


# --- commands ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    s = argparse.SUPPRESS
    common.add_argument("--json", action="store_true", default=s,
                        help="print JSON instead of tables")
    common.add_argument("--config", default=s, metavar="FILE",
                        help=f"provider config (default {DEFAULT_CONFIG})")
    common.add_argument("--url", default=s, help="the MD's conference API (overrides the config)")
    common.add_argument("--token-file", default=s, metavar="FILE",
                        help="the provider token file (overrides the config)")
    parser = Parser(prog=PROG, parents=[common],
                    description="The conference provider's command line for perc-md.")
    groups = parser.add_subparsers(dest="category", required=True, metavar="COMMAND",
                                   parser_class=Parser)
    conf = groups.add_parser("conferences", help="conferences at the MD").add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=Parser)
    p = conf.add_parser("create", parents=[common], help="create a conference for a KD",
                        description="create a conference for a KD; prints the MD's tunnel "
                                    "address for that KD")
    p.add_argument("id")
    kd = p.add_mutually_exclusive_group(required=True)
    kd.add_argument("--kd-fingerprint", type=_fingerprint_arg, metavar="FP",
                    help="SHA-256 fingerprint of the KD's certificate (AA:BB:...)")
    kd.add_argument("--kd-certificate", metavar="FILE",
                    help="the KD's certificate (PEM), to take its fingerprint")
    add_forwarding_arguments(p)
    for name, help_ in (("show", "show a conference, its KD tunnel and participants"),
                        ("end", "end a conference at the MD")):
        conf.add_parser(name, parents=[common], help=help_, description=help_).add_argument("id")
    links = groups.add_parser("links", help="cascade links between MDs").add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=Parser)
    p = links.add_parser("create", parents=[common],
                         help="link a conference on this MD (it opens the link) to another MD",
                         description="link a conference on this MD (--url; it opens the link, "
                                     "as DTLS client) to the MD at --to (it accepts); the "
                                     "conference must exist on both")
    p.add_argument("id")
    p.add_argument("--to", required=True, type=_md_api_url, metavar="URL",
                   help="the other MD's conference API (same provider token and CA)")
    p.add_argument("--srtp-profile", default="AEAD_AES_128_GCM",
                   choices=("AEAD_AES_128_GCM", "AEAD_AES_256_GCM"),
                   help="the link's RFC 7714 profile: the conference's outer half")
    links.add_parser("list", parents=[common], help="a conference's links and their state",
                     description="a conference's links and their state").add_argument("id")
    p = links.add_parser("delete", parents=[common], help="remove a link at this MD",
                         description="remove a link at this MD")
    p.add_argument("id")
    p.add_argument("link")
    return parser


def _md_api_url(value: str) -> str:
    reason = _check_url(value)
    if reason is not None:
        raise argparse.ArgumentTypeError(reason)
    return value.rstrip("/")


def links_text(links: list[dict[str, Any]]) -> str:
    if not links:
        return "no links\n"
    def media(link: dict[str, Any], way: str) -> str:
        """SRTP + SRTCP packets (bytes) that crossed the link one way."""
        packets = link.get(f"rtp_{way}", 0) + link.get(f"rtcp_{way}", 0)
        size = link.get(f"rtp_{way}_bytes", 0) + link.get(f"rtcp_{way}_bytes", 0)
        return f"{packets} ({size} B)"

    rows = [(link.get("id"), link.get("role"), link.get("state"),
             (f"{link['peer']['host']}:{link['peer']['port']}" if link.get("peer") else "-"),
             link.get("peer_fingerprint", "")[:23] + "...", media(link, "in"),
             media(link, "out"), sum((link.get("drops") or {}).values()))
            for link in links]
    return table(("LINK", "ROLE", "STATE", "PEER", "PEER FINGERPRINT", "MEDIA IN", "MEDIA OUT",
                  "DROPPED"), rows)


async def create_link(opener: ApiClient, acceptor: ApiClient, conference_id: str,
                      profile: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both halves of a link (md/links.py): the acceptor's first, then the opener's."""
    path = f"/v1/conferences/{_conference_id(conference_id)}/links"
    opener_md = await opener.call("GET", "/v1/md")
    accepted = await acceptor.call("POST", path, {
        "role": "server", "peer_fingerprint": opener_md["fingerprint"],
        "srtp_profile": profile})
    try:
        opened = await opener.call("POST", path, {
            "role": "client", "peer": accepted["media"],
            "peer_fingerprint": accepted["fingerprint"],
            "peer_ice_ufrag": accepted["ice_ufrag"], "peer_ice_pwd": accepted["ice_pwd"],
            "srtp_profile": profile})
        accepted = await acceptor.call("PATCH", f"{path}/{quote(accepted['id'], safe='')}", {
            "peer_ice_ufrag": opened["ice_ufrag"], "peer_ice_pwd": opened["ice_pwd"]})
    except OperationError:  # leave nothing half made at the acceptor
        await acceptor.raw("DELETE", f"{path}/{quote(accepted['id'], safe='')}",
                           headers={"Authorization": f"Bearer {acceptor.token}"})
        raise
    return opened, accepted


_DEFAULTS = {"json": False, "config": None, "url": None, "token_file": None}


def _prepare(argv: Sequence[str] | None, stdout: IO[str] | None, stderr: IO[str] | None
             ) -> tuple[Io, argparse.Namespace | None, int]:
    io = Io(stdout or sys.stdout, stderr or sys.stderr, getpass=lambda prompt: "")
    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except UsageError as e:
        io.stderr.write(f"{e}\n")
        return io, None, 2
    except SystemExit as e:  # --help
        return io, None, int(e.code or 0)
    for name, default in _DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, default)
    if args.url is not None and _check_url(args.url) is not None:
        io.stderr.write(f"{PROG}: --url: {_check_url(args.url)}\n")
        return io, None, 2
    io.as_json = args.json
    return io, args, 0


async def _command(args: argparse.Namespace, io: Io, reactor: Any) -> None:
    config = load_provider_config(args.config or DEFAULT_CONFIG,
                                  required=args.config is not None)
    client = await md_client(config, reactor, url=args.url, token_file=args.token_file)
    try:
        path = f"/v1/conferences/{_conference_id(args.id)}"
        if args.category == "links":
            await _links(client, args, io, config, reactor)
        elif args.action == "create":
            settings = forwarding_settings(args)
            fingerprint = args.kd_fingerprint or kd_fingerprint(args.kd_certificate)
            body = await create_md_conference(client, args.id, fingerprint, settings)
            io.emit(body, md_conference_text(body)
                    + f"\nTell the KD: the conference's MD tunnel is {tunnel_address(body)}\n")
        elif args.action == "show":
            body = await client.call("GET", path)
            io.emit(body, md_conference_text(body))
        else:
            await client.call("DELETE", path)
            io.emit({"id": args.id, "ended": True}, f"conference {args.id}: ended at the MD\n")
    finally:
        await client.close()


async def _links(client: ApiClient, args: argparse.Namespace, io: Io, config: ProviderConfig,
                 reactor: Any) -> None:
    path = f"/v1/conferences/{_conference_id(args.id)}/links"
    if args.action == "create":
        other = await md_client(config, reactor, url=args.to, token_file=args.token_file)
        try:
            opened, accepted = await create_link(client, other, args.id, args.srtp_profile)
        finally:
            await other.close()
        io.emit({"opened": opened, "accepted": accepted},
                f"conference {args.id}: link {opened['id']} ({client.base}, opens it) -> "
                f"{accepted['id']} ({args.to} at {accepted['media']['host']}:"
                f"{accepted['media']['port']}, accepts it)\n")
    elif args.action == "list":
        body = await client.call("GET", path)
        io.emit(body, links_text(body.get("links", [])))
    else:
        await client.call("DELETE", f"{path}/{quote(args.link, safe='')}")
        io.emit({"id": args.id, "link": args.link, "deleted": True},
                f"conference {args.id}: link {args.link} removed\n")


async def run(argv: Sequence[str], reactor: Any, *, stdout: IO[str] | None = None,
              stderr: IO[str] | None = None) -> int:
    """Run one command with a running ``reactor``; the exit status."""
    io, args, status = _prepare(argv, stdout, stderr)
    if args is None:
        return status
    try:
        await _command(args, io, reactor)
    except (UsageError, ConfigError, OperationError) as e:
        return report(io, e, PROG)
    except Exception as e:  # never a traceback for the operator
        return unexpected(io, e, PROG)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The console script."""
    from twisted.internet import defer, task

    result: list[int] = []

    def go(reactor: Any) -> defer.Deferred[None]:
        async def command() -> None:
            result.append(await run(argv if argv is not None else sys.argv[1:], reactor))
        return defer.ensureDeferred(command())

    try:
        task.react(go)
    except SystemExit:  # react always exits; the status is ours
        pass
    return result[0] if result else 1


if __name__ == "__main__":
    sys.exit(main())
