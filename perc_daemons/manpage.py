"""Manual pages for the command-line tools, made from their argparse parsers.

``python -m perc_daemons.manpage perc-admin`` prints ``perc-admin(1)`` in
roff; the Debian build installs the pages of :data:`TOOLS` (debian/rules), so
they always say what ``--help`` says.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Callable, Sequence

from perc_daemons import __version__

#: tool -> (parser factory, one-line summary, extra sections)
TOOLS: dict[str, tuple[Callable[[], argparse.ArgumentParser], str, dict[str, str]]] = {}


def _admin_parser() -> argparse.ArgumentParser:
    from perc_daemons.kmf.admin_cli import build_parser

    return build_parser()


def _endpoint_parser() -> argparse.ArgumentParser:
    from perc_daemons.endpoint.cli import build_parser

    return build_parser()


def _provider_parser() -> argparse.ArgumentParser:
    from perc_daemons.md.provider_cli import build_parser

    return build_parser()


TOOLS["perc-admin"] = (_admin_parser, "operate a perc-kmf: conferences, rosters, users, keys, "
                                      "client secrets", {
    "EXIT STATUS": "0 on success, 1 when the KMF refused or could not be reached, "
                   "2 for usage and configuration errors.",
    "FILES": "Made by perc-admin setup (root-owned; \"perc\" = group perc may read): "
             "/etc/perc/tls/ca.crt (0644, the CA the daemons and endpoints trust), "
             "/etc/perc/tls/ca.key (0600, its key, when setup made the CA), "
             "/etc/perc/tls/{kmf,md,kd}.crt (0644) and .key (perc 0640), "
             "/etc/perc/kmf-clients.toml (perc 0640, the KMF's OAuth clients), "
             "/etc/perc/kd-client.secret (perc 0640), /etc/perc/admin-client.secret (0600), "
             "/etc/perc/admin.toml (perc 0640, this tool's configuration), "
             "/etc/perc/md-provider.token (perc 0640), /etc/perc/provider.toml (perc 0640), "
             "/etc/perc/.generated-by-perc-daemons (what the package made, for purge). "
             "Shipped: /etc/perc/{kmf,kd,md}.toml (every key documented). "
             "State: /var/lib/perc (the KMF's database, key-encryption key, signing keys, "
             "users.jsonl). See /usr/share/doc/perc-daemons/OPERATIONS.md.gz and /etc/perc/README.",
})
TOOLS["perc-provider"] = (_provider_parser, "the conference provider's command line for "
                                            "perc-md", {
    "EXIT STATUS": "0 on success, 1 when the MD refused or could not be reached, "
                   "2 for usage and configuration errors.",
    "FILES": "/etc/perc/provider.toml, /etc/perc/md-provider.token",
})
TOOLS["perc-endpoint"] = (_endpoint_parser, "the reference PERC endpoint and load generator", {
    "EXIT STATUS": "0 on success; 1 when joining was refused, the answer was not signed by "
                   "the KD, too many packets failed to decrypt or the roster did not match; "
                   "2 for usage errors.",
})


def _roff(text: str) -> str:
    """Escape text for roff: backslashes, and a leading dot or quote."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + line) if line[:1] in (".", "'") else line
                     for line in text.splitlines())


def _options(parser: argparse.ArgumentParser) -> list[str]:
    lines: list[str] = []
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) or not action.option_strings:
            continue
        if action.help == argparse.SUPPRESS:
            continue
        flags = ", ".join(action.option_strings)
        if action.nargs != 0:
            flags += " " + formatter._format_args(action, action.dest.upper())
        lines += [".TP", f"\\fB{_roff(flags)}\\fR",
                  _roff(formatter._expand_help(action) if action.help else "")]
    return lines


def _commands(parser: argparse.ArgumentParser, prefix: str) -> list[str]:
    lines: list[str] = []
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {a.dest: a.help or "" for a in action._choices_actions}
        for name, sub in action.choices.items():
            full = f"{prefix} {name}".strip()
            nested = _commands(sub, full)
            if nested:
                lines += nested
                continue
            lines += [".TP", f"\\fB{_roff(full)}\\fR", _roff(helps.get(name, "")), ".br",
                      _roff(_usage(sub))]
    return lines


def _usage(parser: argparse.ArgumentParser) -> str:
    """The usage line, unwrapped (roff fills lines itself)."""
    return " ".join(parser.format_usage().removeprefix("usage: ").split())


def render(tool: str, *, date: datetime.date | None = None) -> str:
    """``tool``'s manual page in roff."""
    factory, summary, sections = TOOLS[tool]
    parser = factory()
    if date is None:  # reproducible builds: the date of the release (debian/changelog)
        epoch = os.environ.get("SOURCE_DATE_EPOCH")
        date = (datetime.datetime.fromtimestamp(int(epoch), datetime.UTC).date() if epoch
                else datetime.date.today())
    usage = _usage(parser)
    out = [f'.TH {tool.upper()} 1 "{date.isoformat()}" "perc-daemons {__version__}" '
           '"perc-daemons manual"',
           ".SH NAME", f"{_roff(tool)} \\- {_roff(summary)}",
           ".SH SYNOPSIS", _roff(usage),
           ".SH DESCRIPTION", _roff(parser.description or summary)]
    if parser.epilog:
        out += [".PP", _roff(parser.epilog)]
    commands = _commands(parser, "")
    if commands:
        out += [".SH COMMANDS", *commands]
    out += [".SH OPTIONS", *_options(parser)]
    for title, text in sections.items():
        out += [f".SH {title}", _roff(text)]
    out += [".SH SEE ALSO", "perc-md, perc-kd and perc-kmf (twistd plugins); "
            "/usr/share/doc/perc-daemons/"]
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0] not in TOOLS:
        print(f"usage: python -m perc_daemons.manpage {{{','.join(TOOLS)}}}", file=sys.stderr)
        return 2
    sys.stdout.write(render(args[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
