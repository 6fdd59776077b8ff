"""``perc-admin audit``: read, verify and export a conference's tamper-evident trail.

::

    perc-admin audit show CONF                 the records, verified first
    perc-admin audit verify CONF               exit 1 naming the first bad record
    perc-admin audit export CONF --jsonl [--output F]
    perc-admin audit verify --file F --jwks URL-or-FILE

The remote forms read ``GET /v1/conferences/{id}/audit`` (scope ``auditor``
or ``admin``) and the KMF's ``/.well-known/jwks.json``; ``verify --file``
checks an export (one JSON object per line, the records with their hashes
and the checkpoints, :func:`perc_daemons.protocol.audit.export_lines`)
offline with a JWKS file, or one fetched from a URL.  Verification is
:func:`~perc_daemons.protocol.audit.verify_trail`: an edited, deleted,
inserted or reordered record, a checkpoint whose signature does not verify
and a trail cut after a checkpoint all fail, naming the first bad record.

A checkpoint signed with a key since pruned from the KMF's JWKS (keys leave it
``max_token_lifetime`` after their rotation) no longer verifies with today's
JWKS: an auditor keeps the JWKS documents seen over time and gives each file
with ``--jwks`` (repeatable; the keys are merged).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any
from urllib.parse import quote, urlsplit

from perc_daemons.cli import ApiClient, Io, OperationError, Parser, UsageError, table, time_text
from perc_daemons.protocol.audit import (
    AuditError,
    AuditRecord,
    Checkpoint,
    TrailBroken,
    VerifiedTrail,
    export_lines,
    parse_checkpoint,
    parse_export,
    parse_record,
    verify_trail,
)

__all__ = ["add_parser", "check_args", "is_local", "remote", "verify_file"]

MAX_EXPORT = 1 << 30


def add_parser(groups: Any, command: Any) -> None:
    """The ``audit`` command group of perc-admin (``command(sub, name, help)`` adds one)."""
    audit = groups.add_parser("audit", help="conference audit trails").add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=Parser)
    command(audit, "show", "fetch, verify and show a conference's audit trail"
            ).add_argument("id")
    p = command(audit, "verify", "verify a conference's audit trail (exit 1 naming the "
                "first bad record), from the KMF or from an export file")
    p.add_argument("id", nargs="?", help="the conference (from the export with --file)")
    p.add_argument("--file", metavar="F", help="verify this export (JSON lines) offline")
    p.add_argument("--jwks", action="append", default=[], metavar="URL-or-FILE",
                   help="with --file: the KMF's JWKS (https:// URL or file; repeatable)")
    p = command(audit, "export", "export a conference's audit trail for a SIEM")
    p.add_argument("id")
    p.add_argument("--jsonl", action="store_true", required=True,
                   help="one JSON object per line: records with their hashes, checkpoints")
    p.add_argument("--output", metavar="F", help="write to a new file F (mode 0600)")


def check_args(args: argparse.Namespace) -> None:
    """Usage errors of the audit commands."""
    if args.action == "verify":
        if args.file is None and args.id is None:
            raise UsageError("audit verify: give CONF, or --file F --jwks URL-or-FILE")
        if args.file is not None and not args.jwks:
            raise UsageError("audit verify --file needs --jwks URL-or-FILE")
        if args.file is None and args.jwks:
            raise UsageError("audit verify CONF uses the KMF's JWKS; --jwks goes with --file")


def is_local(args: argparse.Namespace) -> bool:
    """``verify --file`` with JWKS files only needs no network."""
    return (args.action == "verify" and args.file is not None
            and not any(is_url(j) for j in args.jwks))


def _conference(value: str) -> str:
    return quote(value, safe="")


def _parse_trail(body: Any, conference: str) -> tuple[list[AuditRecord], list[Checkpoint]]:
    if not isinstance(body, dict) or not isinstance(body.get("records"), list) \
            or not isinstance(body.get("checkpoints"), list):
        raise OperationError("bad response from the KMF", "no audit trail in the answer")
    entries = body["records"] + body["checkpoints"]
    if not all(isinstance(e, dict) for e in entries):
        raise OperationError("bad response from the KMF", "an entry is not a JSON object")
    try:
        records = [parse_record(r, i + 1) for i, r in enumerate(body["records"])]
        checkpoints = [parse_checkpoint(c, i + 1) for i, c in enumerate(body["checkpoints"])]
    except AuditError as e:
        raise OperationError("bad response from the KMF", str(e)) from None
    return records, checkpoints


def _verified(conference: str, records: list[AuditRecord], checkpoints: list[Checkpoint],
              jwks: Any, issuer: str | None) -> VerifiedTrail:
    try:
        return verify_trail(conference, records, checkpoints, jwks, issuer=issuer)
    except TrailBroken as e:
        raise OperationError(f"audit trail of {conference} does not verify ({e.reason})",
                             str(e)) from None


def _summary(result: VerifiedTrail) -> str:
    unsigned = (f"; records {result.last_seq - result.unsigned + 1}-{result.last_seq} not yet "
                f"covered by a checkpoint" if result.unsigned else "")
    return (f"verified: {result.records} record(s) {result.first_seq}-{result.last_seq}, "
            f"{result.checkpoints} checkpoint(s), signed through record "
            f"{result.signed_through}{unsigned}")


def _summary_json(result: VerifiedTrail) -> dict[str, Any]:
    return {"conference": result.conference, "verified": True, "records": result.records,
            "first_seq": result.first_seq, "last_seq": result.last_seq,
            "checkpoints": result.checkpoints, "signed_through": result.signed_through,
            "unsigned": result.unsigned}


def _detail_text(detail: dict[str, Any]) -> str:
    text = json.dumps(detail, separators=(",", ":"), ensure_ascii=False, sort_keys=True)
    return text if len(text) <= 100 else text[:97] + "..."


async def remote(client: ApiClient, args: argparse.Namespace, io: Io, issuer: str) -> None:
    """``audit show|verify|export CONF`` against the KMF."""
    body = await client.call("GET", f"/v1/conferences/{_conference(args.id)}/audit")
    records, checkpoints = _parse_trail(body, args.id)
    if args.action == "export":
        lines = export_lines(records, checkpoints)
        if args.output:
            fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write("".join(line + "\n" for line in lines))
        else:
            io.stdout.write("".join(line + "\n" for line in lines))
        return
    jwks = await client.call("GET", "/.well-known/jwks.json")
    result = _verified(args.id, records, checkpoints, jwks, issuer)
    if args.action == "verify":
        io.emit(_summary_json(result), _summary(result) + "\n")
        return
    rows = [(str(r.seq), time_text(r.time), r.kind, r.identity or "-", _detail_text(r.detail))
            for r in records]
    io.emit({**_summary_json(result), "trail": [r.to_json() for r in records],
             "checkpoints": [c.to_json() for c in checkpoints]},
            table(("SEQ", "TIME", "KIND", "IDENTITY", "DETAIL"), rows) + _summary(result) + "\n")


def _read_jwks_file(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise UsageError(f"--jwks {path}: {e.strerror or e}") from None
    except ValueError:
        raise UsageError(f"--jwks {path}: not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise UsageError(f"--jwks {path}: not a JWKS ({{\"keys\": [...]}})")
    return data


def is_url(value: str) -> bool:
    return value.startswith("https://")


async def fetch_jwks(reactor: Any, url: str, trust: Any) -> dict[str, Any]:
    parts = urlsplit(url)
    client = ApiClient(reactor, f"{parts.scheme}://{parts.netloc}", trust)
    try:
        body = await client.call("GET", parts.path + (f"?{parts.query}" if parts.query else ""))
    finally:
        await client.close()
    if not isinstance(body, dict):
        raise OperationError("bad JWKS", f"{url} did not answer a JWKS")
    return body


def verify_file(args: argparse.Namespace, io: Io, fetched: list[dict[str, Any]]) -> None:
    """``audit verify --file F --jwks ...``: ``fetched`` holds the JWKS of the URLs given."""
    keys: list[Any] = []
    for source in args.jwks:
        if not is_url(source):
            keys += _read_jwks_file(source)["keys"]
    for jwks in fetched:
        keys += jwks.get("keys", []) if isinstance(jwks.get("keys"), list) else []
    try:
        if os.path.getsize(args.file) > MAX_EXPORT:
            raise UsageError(f"--file {args.file}: larger than {MAX_EXPORT} bytes")
        with open(args.file, "rb") as f:
            conference, records, checkpoints = parse_export(f)
    except OSError as e:
        raise UsageError(f"--file {args.file}: {e.strerror or e}") from None
    except AuditError as e:
        raise OperationError(f"{args.file} is not an audit export", str(e)) from None
    wanted = args.id or conference
    if wanted is None:
        raise OperationError(f"{args.file} is empty", "no records to verify")
    result = _verified(wanted, records, checkpoints, {"keys": keys}, None)
    io.emit(_summary_json(result), _summary(result) + "\n")
