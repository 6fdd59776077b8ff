"""``perc-admin``: the operator's command line for perc-kmf.

Remote commands talk to the KMF's HTTPS API (``[https]`` of kmf.toml) with an
``admin`` access token::

    perc-admin conferences create ID --title T [--initiator user@domain]
                                     [--invite user@domain ...] [--group G ...]
                                     [--late-joiners-get-earlier-epochs]
                                     [POLICY OPTIONS]
                                     [--start] [--md URL ...] [--forwarding sfu|all]
                                     [--last-n N] [--no-audio-levels] [--audio-top-k K]
    perc-admin conferences list [--state scheduled|running|ended]
    perc-admin conferences update ID [--title T] [POLICY OPTIONS]
    perc-admin conferences show|start|end ID

POLICY OPTIONS (docs/API.md "Policy"; defaults from [conferences] of kmf.toml):
``--starts-at``/``--ends-at`` TIME (ISO 8601 with a zone, or POSIX seconds;
``none`` clears it with update), ``--early-start``/``--grace``/
``--rekey-interval`` SECONDS, ``--late-join none|current|history``.
    perc-admin conferences invite|uninvite ID IDENTITY...
    perc-admin roster show ID
    perc-admin audit show|verify ID
    perc-admin audit export ID --jsonl [--output F]
    perc-admin audit verify --file F --jwks URL-or-FILE   (offline, see kmf/audit_cli.py)

Local commands change files on the KMF's host (run them as root or the daemon's user)::

    perc-admin setup [--domain D] [--host-name N ...] [--ca-certificate F --ca-key F]
    perc-admin doctor [--no-network]
    perc-admin devstack up|down|status [--dir DIR]
    perc-admin users add|passwd NAME [--password-file F]
    perc-admin users disable|enable NAME
    perc-admin keys rotate
    perc-admin clients new-secret --secret-file F
    perc-admin clients hash --secret-file F

``clients new-secret`` writes a new confidential client secret (32 random
bytes, base64url) to a new file (mode 0600) and ``clients hash`` reads one;
both print the ``secret_hash = "$sha256$..."`` line to put in the client's
table of the KMF's client file (kmf-clients.toml).  ``hash`` refuses secrets
shorter than 43 characters (256 bits): client secrets are checked with a fast
hash, which is only safe for secrets nobody can guess.

The token comes from ``--token-file`` (a ready access token), or from the
KMF's ``POST /oauth/token`` with the client-credentials grant (scope
``admin``) and the client of the admin config file (``/etc/perc/admin.toml``
or ``--config``), flat TOML keys:

* ``url``: the KMF, default ``"https://localhost:8443"``;
* ``ca_file``: PEM certificate(s) to trust for it ("" = the system's CAs);
* ``client_id``, ``client_secret_file`` (mode 0600);
* ``issuer``: the KMF's ``[idp] issuer``, checked in signed rosters;
  "" means ``https://<host of url>``;
* ``kd_certificate``: the KD's certificate, whose fingerprint ``conferences
  create --md`` gives the MD (default ``/etc/perc/tls/kd.crt``);
* ``provider_config``: the conference provider's config (perc-provider's:
  the MD's URL, CA and provider token) that ``--md`` uses (default
  ``/etc/perc/provider.toml``).

``conferences create ID ... --md URL`` carries out the conference
establishment of draft-roach-perc-webrtc (slides 4.1.1 steps 7-11) in one
command: it creates the conference at the KMF (and starts it with
``--start``), creates it at the MD with the KD's fingerprint (steps 7-9),
records the MD's tunnel address at the KMF, which tells the KD (steps 10-11),
and waits until the MD reports the KD's tunnel up (``--wait`` seconds, 0 not
to wait).  A conference ended at the KMF is then ended at the MD by the KD.
``--forwarding``, ``--last-n``, ``--no-audio-levels`` and ``--audio-top-k``
are the conference's forwarding settings at each ``--md`` (as
``perc-provider conferences create`` takes them).

``roster show`` verifies the roster with the KMF's JWKS and refuses to print
one that does not verify.  ``--json`` (anywhere on the line) prints JSON
instead of tables.  Exit status: 0 done, 1 the KMF or the operation refused
(problem title and detail on stderr), 2 usage or configuration error.
Secrets and tokens are never printed.
"""

from __future__ import annotations

import argparse
import base64
import getpass as getpass_module
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import quote, quote_plus, urlencode, urlsplit

from perc_daemons import config as config_module
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
    read_secret_file,
    report,
    table,
    time_text,
    trust_root,
    unexpected,
)
from perc_daemons.config import ConfigError
from perc_daemons.kmf import audit_cli
from perc_daemons.protocol import jsontext

__all__ = ["AdminConfig", "OperationError", "fetch_client_token", "load_admin_config", "main",
           "run", "token_request"]

DEFAULT_CONFIG = "/etc/perc/admin.toml"
DEFAULT_KMF_CONFIG = "/etc/perc/kmf.toml"
DEFAULT_USERS_FILE = "/var/lib/perc/users.jsonl"
DEFAULT_URL = "https://localhost:8443"
DEFAULT_KD_CERTIFICATE = "/etc/perc/tls/kd.crt"
_STATES = ("scheduled", "running", "ended")


# --- configuration ------------------------------------------------------------------------


@dataclass(frozen=True)
class AdminConfig:
    path: str
    url: str = DEFAULT_URL
    ca_file: str = ""
    client_id: str = ""
    client_secret_file: str = ""
    issuer: str = ""
    kd_certificate: str = ""
    provider_config: str = ""

    @property
    def effective_issuer(self) -> str:
        return self.issuer or f"https://{urlsplit(self.url).hostname}"


def _roles(value: str) -> frozenset[str]:
    roles = frozenset(r.strip() for r in value.split(",") if r.strip())
    if not roles or roles - {"kmf", "kd", "md"}:
        raise argparse.ArgumentTypeError("a comma-separated list of kmf, kd, md")
    return roles


def _md_url(value: str) -> str:
    reason = check_https_url(value)
    if reason is not None:
        raise argparse.ArgumentTypeError(reason)
    return value


_ADMIN_KEYS: dict[str, Callable[[str], str | None]] = {
    "url": check_https_url,
    "ca_file": check_optional_path,
    "client_id": lambda v: None,
    "client_secret_file": check_optional_path,
    "issuer": lambda v: (None if v == "" or check_https_url(v) is None
                         else "must be an https:// URL"),
    "kd_certificate": check_optional_path,
    "provider_config": check_optional_path,
}


def load_admin_config(path: str, *, required: bool) -> AdminConfig:
    """The admin config at ``path``; a missing file is defaults unless ``required``."""
    values = load_flat_toml(path, _ADMIN_KEYS, required=required)
    return AdminConfig(path, **(values or {}))


# --- HTTP -----------------------------------------------------------------------------------


# --- client credentials (POST /oauth/token) ---------------------------------------------------


def token_request(client_id: str, client_secret: str,
                  scope: str = "admin") -> tuple[dict[str, str], bytes]:
    """Headers and body of the RFC 6749 s4.4 token request, client_secret_basic (s2.3.1)."""
    userpass = f"{quote_plus(client_id, safe='')}:{quote_plus(client_secret, safe='')}"
    headers = {
        "Authorization": "Basic " + base64.b64encode(userpass.encode("ascii")).decode("ascii"),
        "Content-Type": "application/x-www-form-urlencoded",
        "Accept": "application/json",
    }
    body = urlencode({"grant_type": "client_credentials", "scope": scope}).encode("ascii")
    return headers, body


def parse_token_response(code: int, content: bytes) -> str:
    """The access token of a token response; OperationError for an RFC 6749 s5.2 error."""
    try:
        body = jsontext.loads(content)
    except jsontext.JsonError:
        body = None
    if code != 200:
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            description = body.get("error_description")
            raise OperationError(f"token request refused: {body['error']} ({code})",
                                 description if isinstance(description, str) else "",
                                 status=code)
        raise OperationError(f"token request failed (HTTP {code})", status=code)
    if (not isinstance(body, dict) or not isinstance(body.get("access_token"), str)
            or not body["access_token"]):
        raise OperationError("bad token response", "no access_token")
    if str(body.get("token_type", "")).lower() != "bearer":
        raise OperationError("bad token response",
                             f"token_type {body.get('token_type')!r} is not Bearer")
    return body["access_token"]


async def fetch_client_token(client: ApiClient, client_id: str, client_secret: str,
                             scope: str = "admin") -> str:
    """An access token (``admin`` by default) from the KMF's token endpoint (client
    credentials)."""
    headers, body = token_request(client_id, client_secret, scope)
    code, content = await client.raw("POST", "/oauth/token", headers=headers, data=body)
    return parse_token_response(code, content)


async def _audit_token(client: ApiClient, client_id: str, client_secret: str) -> str:
    """``audit`` commands: an ``admin`` token, else (a client registered with the
    ``auditor`` scope only, for an auditor who may read trails and nothing else) an
    ``auditor`` one."""
    try:
        return await fetch_client_token(client, client_id, client_secret)
    except OperationError as e:
        if "invalid_scope" not in str(e):
            raise
        return await fetch_client_token(client, client_id, client_secret, "auditor")


# --- output ----------------------------------------------------------------------------------


def conference_text(c: dict[str, Any], extra: Sequence[tuple[str, Any]] = ()) -> str:
    pairs = [
        ("id", c.get("id")),
        ("title", c.get("title")),
        ("state", c.get("state")),
        ("initiator", c.get("initiator")),
        ("invited", ", ".join(c.get("invited") or []) or "-"),
        ("groups", ", ".join(c.get("invited_groups") or []) or "-"),
        ("late joiners get earlier epochs",
         "yes" if c.get("late_joiners_get_earlier_epochs") else "no"),
        ("late join", c.get("late_join", "-")),
        ("starts at", time_text(c.get("starts_at"))),
        ("ends at", time_text(c.get("ends_at"))),
        ("early start", _seconds_text(c.get("early_start"))),
        ("grace", _seconds_text(c.get("grace"))),
        ("rekey interval", "off" if c.get("rekey_interval") == 0
         else _seconds_text(c.get("rekey_interval"))),
        ("created at", time_text(c.get("created_at"))),
    ]
    if "epoch" in c:
        pairs.append(("epoch", c["epoch"]))
    if c.get("media_distributors"):
        pairs.append(("media distributors", ", ".join(c["media_distributors"])))
    return fields([*pairs, *extra])


def _seconds_text(value: Any) -> str:
    return "-" if not isinstance(value, int | float) else f"{value:g} s"


def _time_argument(value: str) -> float | None:
    """``--starts-at``/``--ends-at``: ISO 8601 with a zone, POSIX seconds, or none."""
    import datetime

    if value.lower() == "none":
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a time (ISO 8601 with a zone, or POSIX seconds): {value!r}") from None
    if when.tzinfo is None:
        raise argparse.ArgumentTypeError(f"give the time zone (e.g. Z or +02:00): {value!r}")
    return when.timestamp()


def _policy_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--starts-at", type=_time_argument, default=argparse.SUPPRESS,
                   metavar="TIME", help="nobody is admitted before TIME - early start")
    p.add_argument("--ends-at", type=_time_argument, default=argparse.SUPPRESS,
                   metavar="TIME", help="the conference ends by itself at TIME + grace")
    for name, help_ in (("early-start", "admission opens this long before --starts-at"),
                        ("grace", "the conference ends this long after --ends-at"),
                        ("rekey-interval", "a new epoch this often (0: off)")):
        p.add_argument(f"--{name}", type=float, default=argparse.SUPPRESS,
                       metavar="SECONDS", help=help_)
    p.add_argument("--late-join", choices=("none", "current", "history"),
                   default=argparse.SUPPRESS,
                   help="what a late joiner may decrypt (history: earlier epochs too)")


def _policy_body(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in ("starts_at", "ends_at", "early_start",
                                                   "grace", "rekey_interval", "late_join")
            if hasattr(args, name)}


def conferences_text(body: dict[str, Any]) -> str:
    rows = [(c.get("id"), c.get("state"), c.get("title"), c.get("initiator"),
             len(c.get("invited") or []), time_text(c.get("created_at")))
            for c in body.get("conferences", [])]
    if not rows:
        return "no conferences\n"
    return table(("ID", "STATE", "TITLE", "INITIATOR", "INVITED", "CREATED"), rows)


# --- command line ----------------------------------------------------------------------------


_GLOBAL_DEFAULTS: dict[str, Any] = {
    "json": False, "config": None, "token_file": None, "url": None, "kmf_config": None,
    "users_file": None,
}


def _global_options() -> argparse.ArgumentParser:
    # SUPPRESS: the value given before or after the subcommand is kept, not reset.
    common = Parser(add_help=False)
    s = argparse.SUPPRESS
    common.add_argument("--json", action="store_true", default=s,
                        help="print JSON instead of tables")
    common.add_argument("--config", default=s, metavar="FILE",
                        help=f"admin config (default {DEFAULT_CONFIG})")
    common.add_argument("--token-file", default=s, metavar="FILE",
                        help="file holding a ready admin access token (mode 0600)")
    common.add_argument("--url", default=s, help="the KMF's URL (overrides the config)")
    common.add_argument("--kmf-config", default=s, metavar="FILE",
                        help=f"perc-kmf config for local commands (default {DEFAULT_KMF_CONFIG})")
    common.add_argument("--users-file", default=s, metavar="FILE",
                        help=f"local user file (default {DEFAULT_USERS_FILE})")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _global_options()
    parser = Parser(prog="perc-admin", parents=[common],
                     description="Operate a perc-kmf: conferences, rosters, users, keys, "
                                 "client secrets.")
    groups = parser.add_subparsers(dest="category", required=True, metavar="COMMAND",
                                   parser_class=Parser)

    def command(sub: Any, name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=help_, description=help_)

    conf = groups.add_parser("conferences", help="manage conferences").add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=Parser)
    p = command(conf, "create", "create a conference")
    p.add_argument("id")
    p.add_argument("--title", required=True)
    p.add_argument("--initiator", metavar="IDENTITY",
                   help="the conference's owner, user@domain (invited too); default: the "
                        "first --invite")
    p.add_argument("--invite", action="append", default=[], metavar="IDENTITY")
    p.add_argument("--group", action="append", default=[])
    p.add_argument("--late-joiners-get-earlier-epochs", action="store_true",
                   help="the same as --late-join current")
    _policy_arguments(p)
    p.add_argument("--start", action="store_true", help="start it too")
    p.add_argument("--md", metavar="URL", type=_md_url, action="append", default=[],
                   help="the MD's conference API: create it there for our KD and have the KD "
                        "connect (draft-roach conference establishment); repeat for each MD "
                        "of a cascaded conference")
    p.add_argument("--wait", type=float, default=20.0, metavar="SECONDS",
                   help="with --md: how long to wait for the KD's tunnel (0: do not wait)")
    from perc_daemons.md.provider_cli import add_forwarding_arguments

    add_forwarding_arguments(p)  # with --md: the conference's settings at each MD
    p = command(conf, "update", "change a conference's policy or title")
    p.add_argument("id")
    p.add_argument("--title", default=argparse.SUPPRESS)
    _policy_arguments(p)
    p = command(conf, "list", "list conferences")
    p.add_argument("--state", choices=_STATES)
    for name, help_ in (("show", "show a conference"), ("start", "start a conference"),
                        ("end", "end a conference")):
        command(conf, name, help_).add_argument("id")
    for name, help_ in (("invite", "invite identities"), ("uninvite", "withdraw invitations")):
        p = command(conf, name, help_)
        p.add_argument("id")
        p.add_argument("identities", nargs="+", metavar="IDENTITY")

    roster = groups.add_parser("roster", help="conference rosters").add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=Parser)
    command(roster, "show", "fetch, verify and show the signed roster").add_argument("id")
    audit_cli.add_parser(groups, command)

    users = groups.add_parser("users", help="local user file").add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=Parser)
    for name, help_ in (("add", "add a user"), ("passwd", "set a user's password")):
        p = command(users, name, help_)
        p.add_argument("name")
        p.add_argument("--password-file", metavar="FILE",
                       help="read the password from the first line of FILE")
    for name, help_ in (("disable", "disable a user"), ("enable", "enable a user")):
        command(users, name, help_).add_argument("name")

    keys = groups.add_parser("keys", help="signing keys").add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=Parser)
    command(keys, "rotate", "make a new signing key, retire the active one")

    clients = groups.add_parser("clients", help="OAuth client secrets").add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=Parser)
    p = command(clients, "new-secret", "write a new client secret to a new file (mode 0600) "
                "and print its secret_hash")
    p.add_argument("--secret-file", required=True, metavar="FILE",
                   help="the file to create (it must not exist)")
    p = command(clients, "hash", "print the secret_hash of the client secret in a file "
                "(at least 43 characters)")
    p.add_argument("--secret-file", required=True, metavar="FILE",
                   help="file holding the secret on its first line (mode 0600)")

    p = command(groups, "setup", "first run of this host: make the CA, certificates, OAuth "
                "clients, secrets and configuration files the daemons need (as root)")
    p.set_defaults(action="setup")
    p.add_argument("--etc-dir", default="/etc/perc", metavar="DIR",
                   help="the configuration directory")
    p.add_argument("--user", default="perc", help="the daemons' user (group readers of keys)")
    p.add_argument("--domain", default="localhost",
                   help="the identity domain ([idp] domain of kmf.toml and kd.toml); the KD's "
                        "certificate is for kd.DOMAIN")
    p.add_argument("--host-name", action="append", default=[], dest="host_names",
                   metavar="NAME", help="DNS name of this host for the KMF's and MD's "
                                        "certificates (repeatable; default: its FQDN), "
                                        "besides localhost")
    p.add_argument("--ca-certificate", default="", metavar="FILE",
                   help="the site CA's certificate, to issue from it instead of a new CA")
    p.add_argument("--ca-key", default="", metavar="FILE",
                   help="that CA's private key (read, not copied)")
    p.add_argument("--roles", default="kmf,kd,md", type=_roles, metavar="ROLES",
                   help="the daemons this host runs, e.g. md on a provider's MD host "
                        "(default kmf,kd,md)")
    p.add_argument("--md-processes", type=int, default=1, metavar="N",
                   help="perc-md processes on this host, one per core (default 1): above "
                        "1, md@1.toml ... md@N.toml for perc-md@1 ... perc-md@N, each with "
                        "its own ports (+100 per process), all listed in [cluster] by the "
                        "first --host-name (the name endpoints reach the MD by)")

    p = command(groups, "doctor", "check this host's configuration, certificates, "
                "permissions, ports and the daemons' reachability, and print what to fix")
    p.set_defaults(action="doctor")
    p.add_argument("--etc-dir", default="/etc/perc", metavar="DIR",
                   help="the configuration directory")
    p.add_argument("--user", default="perc", help="the daemons' user")
    p.add_argument("--no-network", action="store_true",
                   help="only the files: no /healthz, port or TLS checks")
    p.add_argument("--roles", default="kmf,kd,md", type=_roles, metavar="ROLES",
                   help="the daemons this host runs (default kmf,kd,md)")

    devstack = groups.add_parser(
        "devstack", help="a persistent local stack for development (fixed ports)"
    ).add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=Parser)
    for name, help_ in (("up", "make (first time) and start the stack; print its "
                               "credentials"),
                        ("down", "stop the stack's daemons (files are kept)"),
                        ("status", "which of the stack's daemons run")):
        command(devstack, name, help_).add_argument(
            "--dir", default=".devstack", help="the stack's directory (default .devstack)")
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    args = build_parser().parse_args(list(argv))
    for name, default in _GLOBAL_DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, default)
    if args.category == "audit":
        audit_cli.check_args(args)
    return args


# --- remote commands -------------------------------------------------------------------------


async def _remote(args: argparse.Namespace, io: Io, reactor: Any) -> None:
    config = load_admin_config(args.config or DEFAULT_CONFIG, required=args.config is not None)
    url = args.url or config.url
    if args.url is not None and check_https_url(url) is not None:
        raise UsageError(f"--url: {check_https_url(url)}")
    trust = trust_root(config.ca_file, config.path) if config.ca_file else None
    if args.category == "audit" and args.action == "verify" and args.file is not None:
        fetched = [await audit_cli.fetch_jwks(reactor, j, trust)
                   for j in args.jwks if audit_cli.is_url(j)]
        audit_cli.verify_file(args, io, fetched)
        return
    token = None
    if args.token_file is not None:
        token = read_secret_file(args.token_file, args.token_file, "--token-file")
    else:
        for key in ("client_id", "client_secret_file"):
            if not getattr(config, key):
                raise ConfigError(config.path, key, "not set (or use --token-file)")
        secret = read_secret_file(config.client_secret_file, config.path, "client_secret_file")
    client = ApiClient(reactor, url, trust)
    try:
        if token is None:
            fetch = _audit_token if args.category == "audit" else fetch_client_token
            token = await fetch(client, config.client_id, secret)
        client.token = token
        await _REMOTE[(args.category, args.action)](client, args, io, config)
    finally:
        await client.close()


def _cid(value: str) -> str:
    return quote(value, safe="")


def _owner_and_invited(args: argparse.Namespace) -> tuple[str, list[str]]:
    """The conference's owner (``--initiator``, else the first ``--invite``) and the
    invited identities, the owner first: the owner takes part, so is invited."""
    owner = args.initiator or (args.invite[0] if args.invite else "")
    if not owner:
        raise UsageError("conferences create: name the conference's owner with --initiator "
                         "user@domain (or invite someone with --invite: the first is the owner)")
    invited = list(dict.fromkeys([owner, *args.invite]))
    return owner, invited


async def _create(client: ApiClient, args: argparse.Namespace, io: Io, config: AdminConfig
                  ) -> None:
    from perc_daemons.md.provider_cli import forwarding_settings

    owner, invited = _owner_and_invited(args)
    settings = forwarding_settings(args)
    if settings and not args.md:
        raise UsageError("conferences create: --forwarding, --last-n, --no-audio-levels and "
                         "--audio-top-k are settings at the MD: give --md")
    body = {"id": args.id, "title": args.title, "initiator": owner, "invited": invited,
            "invited_groups": args.group, **_policy_body(args)}
    if args.late_joiners_get_earlier_epochs:
        if body.get("late_join", "current") != "current":
            raise UsageError("conferences create: --late-joiners-get-earlier-epochs is "
                             "--late-join current")
        body["late_join"] = "current"
    created = await client.call("POST", "/v1/conferences", body)
    cid = _cid(args.id)
    if args.start:
        created = await client.call("POST", f"/v1/conferences/{cid}/start")
    extra: list[tuple[str, Any]] = []
    for md_url in await _md_processes(client, config, args.md):
        created, more = await _establish_at_md(client, args, config, md_url)
        extra += more
    io.emit(created, conference_text(created, extra))


async def _update(client: ApiClient, args: argparse.Namespace, io: Io, config: AdminConfig
                  ) -> None:
    body = _policy_body(args)
    if hasattr(args, "title"):
        body["title"] = args.title
    if not body:
        raise UsageError("conferences update: nothing to change (give --title or a policy "
                         "option)")
    updated = await client.call("PATCH", f"/v1/conferences/{_cid(args.id)}", body)
    io.emit(updated, conference_text(updated))


async def _md_processes(client: ApiClient, config: AdminConfig, md_urls: list[str]
                        ) -> list[str]:
    """``--md`` URLs, each followed by the other perc-md processes of its host that share
    its conferences (its ``GET /v1/md`` ``cluster``, md.toml ``[cluster] processes``):
    the conference is made on every one, and the KD told of each one's tunnel."""
    from perc_daemons.md import provider_cli

    if not md_urls:
        return []
    provider = provider_cli.load_provider_config(
        config.provider_config or provider_cli.DEFAULT_CONFIG,
        required=bool(config.provider_config))
    seen: dict[str, None] = {}
    for md_url in md_urls:
        seen.setdefault(md_url.rstrip("/"), None)
        md = await provider_cli.md_client(provider, client.reactor, url=md_url)
        try:
            info = await md.call("GET", "/v1/md")
        finally:
            await md.close()
        cluster = info.get("cluster") if isinstance(info, dict) else None
        for process in cluster or []:
            if isinstance(process, str):
                seen.setdefault(process.rstrip("/"), None)
    return list(seen)


async def _establish_at_md(client: ApiClient, args: argparse.Namespace, config: AdminConfig,
                           md_url: str) -> tuple[dict[str, Any], list[tuple[str, Any]]]:
    """Steps 7-11 of draft-roach's conference establishment for the MD at ``md_url``."""
    from perc_daemons.md import provider_cli

    provider = provider_cli.load_provider_config(
        config.provider_config or provider_cli.DEFAULT_CONFIG,
        required=bool(config.provider_config))
    fingerprint = provider_cli.kd_fingerprint(config.kd_certificate or DEFAULT_KD_CERTIFICATE)
    md = await provider_cli.md_client(provider, client.reactor, url=md_url)
    try:
        md_conference = await provider_cli.create_md_conference(
            md, args.id, fingerprint, provider_cli.forwarding_settings(args))
        tunnel = provider_cli.tunnel_address(md_conference)
        created = await client.call("POST", f"/v1/conferences/{_cid(args.id)}/"
                                    "media-distributors", {"tunnel": tunnel})
        extra: list[tuple[str, Any]] = [("md", f"{md_url} (KD tunnel {tunnel})")]
        if args.wait > 0:
            await _wait_for_kd(md, args.id, args.wait)
            extra.append(("kd connected to md", "yes"))
    finally:
        await md.close()
    return created, extra


async def _wait_for_kd(md: ApiClient, conference_id: str, timeout: float) -> None:
    """Until the MD reports the conference's KD tunnel up (step 14), or OperationError."""
    from twisted.internet import task

    deadline = md.reactor.seconds() + timeout
    while True:
        body = await md.call("GET", f"/v1/conferences/{_cid(conference_id)}")
        if isinstance(body, dict) and body.get("kd_connected"):
            return
        if md.reactor.seconds() >= deadline:
            raise OperationError(
                f"conference {conference_id} is set up, but the KD has not connected to the "
                f"MD within {timeout:g} s",
                "see perc-kd's log (journalctl -u perc-kd) and perc-admin doctor")
        await task.deferLater(md.reactor, 0.2, lambda: None)


async def _list(client: ApiClient, args: argparse.Namespace, io: Io, config: AdminConfig
                ) -> None:
    path = "/v1/conferences" + (f"?state={args.state}" if args.state else "")
    body = await client.call("GET", path)
    io.emit(body, conferences_text(body))


def _simple(method: str, suffix: str):
    async def run(client: ApiClient, args: argparse.Namespace, io: Io, config: AdminConfig
                  ) -> None:
        body = await client.call(method, f"/v1/conferences/{_cid(args.id)}{suffix}")
        io.emit(body, conference_text(body))
    return run


async def _invite(client: ApiClient, args: argparse.Namespace, io: Io, config: AdminConfig
                  ) -> None:
    body = None
    for identity in args.identities:
        body = await client.call("POST", f"/v1/conferences/{_cid(args.id)}/invitations",
                                 {"identity": identity})
    io.emit(body, conference_text(body))


async def _uninvite(client: ApiClient, args: argparse.Namespace, io: Io, config: AdminConfig
                    ) -> None:
    body = None
    for identity in args.identities:
        body = await client.call(
            "DELETE", f"/v1/conferences/{_cid(args.id)}/invitations/{quote(identity, safe='')}")
    io.emit(body, conference_text(body))


async def _roster(client: ApiClient, args: argparse.Namespace, io: Io, config: AdminConfig
                  ) -> None:
    from perc_daemons.protocol.roster import RosterError, verify_roster

    got = await client.call("GET", f"/v1/conferences/{_cid(args.id)}/roster")
    jwks = await client.call("GET", "/.well-known/jwks.json")
    if not isinstance(got, dict) or not isinstance(got.get("roster"), str):
        raise OperationError("bad response from the KMF", "no roster in the answer")
    try:
        roster = verify_roster(got["roster"], jwks, issuer=config.effective_issuer,
                               conference_id=args.id, now=client.reactor.seconds())
    except RosterError as e:
        raise OperationError("roster not verified, not shown", str(e)) from None
    if got.get("epoch") != roster.epoch:
        raise OperationError("roster not verified, not shown",
                             f"the KMF says epoch {got.get('epoch')!r}, the signed roster "
                             f"{roster.epoch}")
    data = {"conference": roster.conference_id, "epoch": roster.epoch,
            "issued_at": roster.issued_at, "verified": True,
            "members": [{"identity": m.identity, "ssrcs": list(m.ssrcs)}
                        for m in roster.members]}
    text = fields([("conference", roster.conference_id), ("epoch", roster.epoch),
                   ("issued at", time_text(roster.issued_at)),
                   ("signature", "verified with the KMF's JWKS")])
    rows = [(m.identity, " ".join(f"{s:#010x}" for s in m.ssrcs) or "-")
            for m in roster.members]
    text += "\n" + (table(("IDENTITY", "SSRCS"), rows) if rows else "no members\n")
    io.emit(data, text)


_REMOTE: dict[tuple[str, str], Callable[..., Any]] = {
    ("conferences", "create"): _create,
    ("conferences", "list"): _list,
    ("conferences", "show"): _simple("GET", ""),
    ("conferences", "update"): _update,
    ("conferences", "start"): _simple("POST", "/start"),
    ("conferences", "end"): _simple("POST", "/end"),
    ("conferences", "invite"): _invite,
    ("conferences", "uninvite"): _uninvite,
    ("roster", "show"): _roster,
    ("audit", "show"): lambda client, args, io, config: audit_cli.remote(
        client, args, io, config.effective_issuer),
    ("audit", "verify"): lambda client, args, io, config: audit_cli.remote(
        client, args, io, config.effective_issuer),
    ("audit", "export"): lambda client, args, io, config: audit_cli.remote(
        client, args, io, config.effective_issuer),
}


# --- local commands --------------------------------------------------------------------------


def _kmf_config(args: argparse.Namespace) -> config_module.Config | None:
    path = args.kmf_config or DEFAULT_KMF_CONFIG
    if args.kmf_config is None and not os.path.exists(path):
        return None
    return config_module.load("kmf", path)


def _users_file(args: argparse.Namespace) -> str:
    if args.users_file is not None:
        return args.users_file
    kmf = _kmf_config(args)
    # kmf.toml's [auth] users_file, where this version of the schema has it.
    if kmf is not None and isinstance(kmf.get("auth", {}).get("users_file"), str):
        return kmf["auth"]["users_file"]
    return DEFAULT_USERS_FILE


def _new_password(args: argparse.Namespace, io: Io) -> str:
    if args.password_file is not None:
        try:
            with open(args.password_file, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(args.password_file, "--password-file",
                              getattr(e, "strerror", None) or str(e)) from None
        if not lines or not lines[0]:
            raise ConfigError(args.password_file, "--password-file", "empty")
        return lines[0]
    first = io.getpass(f"New password for {args.name}: ")
    if io.getpass("Again: ") != first:
        raise OperationError("passwords do not match", "nothing changed")
    return first


def _users(args: argparse.Namespace, io: Io) -> None:
    from perc_daemons.kmf.auth import file as user_file

    path = _users_file(args)
    try:
        name = user_file.normalize_username(args.name)
    except ValueError as e:
        raise UsageError(f"perc-admin: {e}") from None
    try:
        if args.action == "add":
            user_file.add_user(path, name, _new_password(args, io))
            done = "added"
        elif args.action == "passwd":
            password = _new_password(args, io)
            user_file.set_password(path, name, password)
            done = "password changed"
        elif args.action == "disable":
            user_file.disable_user(path, name)
            done = "disabled"
        else:
            user_file.enable_user(path, name)
            done = "enabled"
    except user_file.UserFileError as e:
        raise OperationError(f"users {args.action} {name} failed", str(e)) from None
    except OSError as e:
        raise OperationError(f"users {args.action} {name} failed",
                             f"{path}: {e.strerror or e}") from None
    io.emit({"user": name, "result": done, "file": path}, f"user {name}: {done} ({path})\n")


def _keys_rotate(args: argparse.Namespace, io: Io) -> None:
    from perc_daemons.kmf.signing import SigningKeyError, SigningKeys

    kmf = _kmf_config(args)
    if kmf is None:
        raise ConfigError(DEFAULT_KMF_CONFIG, "", "file not found (use --kmf-config)")
    directory = kmf["keys"]["signing_dir"]
    try:
        keys = SigningKeys.load(directory)
        retired = keys.active.kid
        kid = keys.rotate(time.time())
    except SigningKeyError as e:
        raise OperationError("keys rotate failed", str(e)) from None
    except OSError as e:
        raise OperationError("keys rotate failed", f"{directory}: {e.strerror or e}") from None
    io.emit({"kid": kid, "retired": retired, "signing_dir": directory},
            f"new signing key {kid} (retired {retired}); perc-kmf uses it on its next "
            "key refresh\n")


def _clients(args: argparse.Namespace, io: Io) -> None:
    from perc_daemons.kmf.clients import hash_client_secret, new_client_secret

    path = args.secret_file
    if args.action == "new-secret":
        secret = new_client_secret()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise OperationError("clients new-secret failed",
                                 f"{path}: {e.strerror or e}") from None
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(secret + "\n")
    else:
        secret = read_secret_file(path, path, "--secret-file")
    try:
        secret_hash = hash_client_secret(secret)
    except ValueError as e:
        raise OperationError("clients hash failed", f"{path}: {e}; make a new one with "
                             "perc-admin clients new-secret") from None
    io.emit({"secret_hash": secret_hash, "secret_file": path},
            f'secret_hash = "{secret_hash}"\n')


_NEXT_STEPS = """
Next:
  systemctl restart perc-kmf perc-md perc-kd     # they run with the new files
  perc-admin users add alice            # and the other participants
  perc-admin conferences create weekly --title "Weekly" --invite alice@{domain} \\
      --invite bob@{domain} --md https://localhost:9443
  perc-endpoint --ca {etc}/tls/ca.crt --conference weekly --user alice --tone 440
Endpoints trust {etc}/tls/ca.crt (copy it to them); docs/OPERATIONS.md has the rest.
"""


_MD_PROCESSES_NEXT = """
{n} perc-md processes: run them instead of perc-md:
  systemctl disable --now perc-md
  systemctl enable --now $(printf 'perc-md@%s ' $(seq 1 {n}))
Open UDP 9470, 9570, ... (one media port per process) to endpoints and other MDs.
"""


def _setup(args: argparse.Namespace, io: Io) -> None:
    from perc_daemons.site_setup import SetupError, SetupOptions, setup

    options = SetupOptions(etc_dir=args.etc_dir, user=args.user, domain=args.domain,
                           host_names=tuple(args.host_names),
                           ca_certificate=args.ca_certificate, ca_key=args.ca_key,
                           roles=args.roles, md_processes=args.md_processes)
    try:
        steps = setup(options)
    except SetupError as e:
        raise OperationError("setup failed", str(e)) from None
    except OSError as e:
        raise OperationError("setup failed", f"{e.filename}: {e.strerror or e}") from None
    width = max(len(step.path) for step in steps)
    lines = [f"{step.action:<9}{step.path:<{width}}  {step.detail}".rstrip() for step in steps]
    io.emit({"steps": [{"action": s.action, "path": s.path, "detail": s.detail}
                       for s in steps]},
            "\n".join(lines) + "\n" + _NEXT_STEPS.format(domain=args.domain, etc=args.etc_dir)
            + (_MD_PROCESSES_NEXT.format(n=args.md_processes) if args.md_processes > 1
               else ""))


def _doctor(args: argparse.Namespace, io: Io) -> None:
    from perc_daemons.doctor import diagnose

    findings = diagnose(args.etc_dir, args.user, network=not args.no_network,
                        roles=args.roles)
    lines = []
    for f in findings:
        label = {"ok": "ok", "warn": "warn", "fail": "FAIL"}[f.status]
        lines.append(f"{label:<6}{f.what}: {f.detail}" if f.detail else f"{label:<6}{f.what}")
        if f.fix and f.status != "ok":
            lines.append(f"      fix: {f.fix}")
    failed = sum(f.status == "fail" for f in findings)
    warned = sum(f.status == "warn" for f in findings)
    lines.append(f"{failed} problem(s), {warned} warning(s)")
    io.emit({"findings": [vars(f) for f in findings]}, "\n".join(lines) + "\n")
    if failed:
        raise OperationError(f"doctor found {failed} problem(s)", "see FAIL lines above")


def _devstack(args: argparse.Namespace, io: Io) -> None:
    from perc_daemons.demo import devstack

    try:
        if args.action == "up":
            io.emit({"dir": os.path.abspath(args.dir), "up": True}, devstack.up(args.dir))
        elif args.action == "down":
            done = devstack.down(args.dir)
            io.emit({"dir": os.path.abspath(args.dir), "down": done}, "\n".join(done) + "\n")
        else:
            states = devstack.status(args.dir)
            io.emit({"daemons": [{"name": s.name, "pid": s.pid, "healthy": s.healthy}
                                 for s in states]},
                    "\n".join(s.text for s in states) + "\n")
            if not all(s.healthy for s in states):
                raise OperationError("the devstack is not (all) running",
                                     f"perc-admin devstack up --dir {args.dir}")
    except devstack.DevstackError as e:
        raise OperationError(f"devstack {args.action} failed", str(e)) from None


def _local(args: argparse.Namespace, io: Io) -> None:
    if args.category == "devstack":
        _devstack(args, io)
    elif args.category == "doctor":
        _doctor(args, io)
    elif args.category == "setup":
        _setup(args, io)
    elif args.category == "users":
        _users(args, io)
    elif args.category == "clients":
        _clients(args, io)
    elif args.category == "audit":
        audit_cli.verify_file(args, io, [])
    else:
        _keys_rotate(args, io)


# --- entry points ----------------------------------------------------------------------------


def _prepare(argv: Sequence[str] | None, stdout: IO[str] | None, stderr: IO[str] | None,
             getpass: Callable[[str], str] | None
             ) -> tuple[Io, argparse.Namespace | None, int]:
    io = Io(stdout or sys.stdout, stderr or sys.stderr, getpass or getpass_module.getpass)
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        io.stderr.write(f"{e}\n")
        return io, None, 2
    except SystemExit as e:  # --help
        return io, None, int(e.code or 0)
    io.as_json = args.json
    return io, args, 0


def is_local(args: argparse.Namespace) -> bool:
    if args.category == "audit":
        return audit_cli.is_local(args)
    return args.category in ("users", "keys", "clients", "setup", "doctor", "devstack")


async def run(argv: Sequence[str], reactor: Any, *, stdout: IO[str] | None = None,
              stderr: IO[str] | None = None, getpass: Callable[[str], str] | None = None
              ) -> int:
    """Run one command with a running ``reactor``; the exit status."""
    io, args, status = _prepare(argv, stdout, stderr, getpass)
    if args is None:
        return status
    try:
        if is_local(args):
            _local(args, io)
        else:
            await _remote(args, io, reactor)
    except (UsageError, ConfigError, OperationError) as e:
        return report(io, e, "perc-admin")
    except Exception as e:  # never a traceback for the operator
        return unexpected(io, e, "perc-admin")
    return 0


def main(argv: Sequence[str] | None = None, *, stdout: IO[str] | None = None,
         stderr: IO[str] | None = None, getpass: Callable[[str], str] | None = None) -> int:
    """The console script: the exit status (the wrapper exits with it)."""
    io, args, status = _prepare(argv, stdout, stderr, getpass)
    if args is None:
        return status
    if is_local(args):
        try:
            _local(args, io)
        except (UsageError, ConfigError, OperationError) as e:
            return report(io, e, "perc-admin")
        except Exception as e:
            return unexpected(io, e, "perc-admin")
        return 0

    from twisted.internet import defer, task

    result: list[int] = []

    def go(reactor: Any) -> defer.Deferred[None]:
        async def remote() -> None:
            try:
                await _remote(args, io, reactor)
                result.append(0)
            except (UsageError, ConfigError, OperationError) as e:
                result.append(report(io, e, "perc-admin"))
            except Exception as e:
                result.append(unexpected(io, e, "perc-admin"))
        return defer.ensureDeferred(remote())

    try:
        task.react(go)
    except SystemExit:  # react always exits; the status is ours
        pass
    if not result:
        io.stderr.write("perc-admin: internal error\n")
        return 1
    return result[0]


if __name__ == "__main__":
    sys.exit(main())
