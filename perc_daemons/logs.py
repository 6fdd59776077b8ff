"""Where the daemons' log events go: the journal as fields, or one line each.

Every event is a :mod:`twisted.logger` event: a format string and its fields
(``log.warn("login refused for {user} from {address}", user=..., ...)``).
:func:`observer` (``[logging]`` of each daemon's TOML, installed as twistd's
log observer by :class:`~perc_daemons.daemon.DaemonOptions`) writes them:

* ``format = "journal"``: to systemd-journald's native socket
  (``/run/systemd/journal/socket``, the protocol of systemd's
  ``sd_journal_sendv``), one journal entry per event with ``MESSAGE``,
  ``PRIORITY`` (syslog levels: critical 2, error 3, warn 4, info 6, debug 7),
  ``SYSLOG_IDENTIFIER`` (perc-md, ...), ``PERC_NAMESPACE`` (the logger's
  namespace, e.g. ``perc.access``) and one ``PERC_<FIELD>`` per field of the
  event whose value is text or a number: ``journalctl -u perc-kmf
  PERC_ADDRESS=192.0.2.7`` finds every event about that address, ``-o
  verbose`` shows the fields.  An entry the socket refuses (too large) goes
  out as text on stdout instead;
* ``format = "json"``: one JSON object per line on stdout (``time``, ISO 8601
  with microseconds so that events of several daemons can be ordered,
  ``level``, ``namespace``, ``message`` and the same fields), for collectors
  other than journald;
* ``format = "text"``: one line per event on stdout, as twistd writes them;
* ``format = "auto"`` (the default): ``journal`` when stdout is the journal
  (systemd's ``JOURNAL_STREAM`` names stdout's device and inode, as
  systemd.exec(5) documents) and the socket is there, else ``text``.

``level`` drops events below it.  HTTP access lines (namespace
``perc.access``: :class:`AccessLogSite`) are at debug, so they are off by
default and apart from the daemon's own events when on; security events
(refused logins, forged tokens, refused joins) are at warning.

Field values are escaped to one line and at most :data:`MAX_FIELD` bytes;
no event carries a key, secret or token (the callers' rule, see
docs/SECURITY.md), so nothing here needs to redact.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import sys
from collections.abc import Callable
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
)
from twisted.web import server
from zope.interface import implementer

__all__ = ["MAX_FIELD", "AccessLogSite", "JournalObserver", "observer"]

JOURNAL_SOCKET = "/run/systemd/journal/socket"
MAX_FIELD = 4096
_PRIORITY = {LogLevel.critical: 2, LogLevel.error: 3, LogLevel.warn: 4, LogLevel.info: 6,
             LogLevel.debug: 7}
_LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn,
           "error": LogLevel.error, "critical": LogLevel.critical}
_FIELD_NAME = re.compile(r"[^A-Z0-9_]")
#: twisted.logger's own keys, and the legacy-log ones: not fields of the event.
_SKIP = {"format", "message", "time", "system", "isError", "why", "failure", "printed"}


def _level(event: dict[str, Any]) -> LogLevel:
    level = event.get("log_level")
    return level if level in _PRIORITY else LogLevel.info


def event_fields(event: dict[str, Any]) -> dict[str, str]:
    """The event's own fields as text (``log_*`` and private keys left out)."""
    fields: dict[str, str] = {}
    for key, value in event.items():
        if key.startswith(("log_", "_")) or key in _SKIP:
            continue
        if isinstance(value, bool) or value is None:
            text = str(value).lower()
        elif isinstance(value, (str, int, float)):
            text = str(value)
        else:
            continue  # objects: their text is in the message if the format wants it
        fields[key] = text[:MAX_FIELD]
    return fields


def _message(event: dict[str, Any]) -> str:
    text = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        text += "\n" + failure.getTraceback()
    return text


def _journal_field(name: str, value: str) -> bytes:
    """One field of the journal's native protocol (systemd's journal-native docs)."""
    data = value.encode("utf-8", "replace")
    key = name.encode("ascii")
    if b"\n" in data:
        return key + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return key + b"=" + data + b"\n"


def _journal_name(key: str) -> str:
    name = "PERC_" + _FIELD_NAME.sub("_", key.upper())
    return name[:64]


@implementer(ILogObserver)
class JournalObserver:
    """Each event as one journal entry of fields (module docstring); text as fallback."""

    def __init__(self, identifier: str, *, path: str = JOURNAL_SOCKET,
                 fallback: Callable[[dict[str, Any]], None] | None = None) -> None:
        self._identifier = identifier
        self._path = path
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._fallback = fallback

    def entry(self, event: dict[str, Any]) -> bytes:
        parts = [_journal_field("MESSAGE", _message(event)),
                 _journal_field("PRIORITY", str(_PRIORITY.get(_level(event), 6))),
                 _journal_field("SYSLOG_IDENTIFIER", self._identifier)]
        namespace = event.get("log_namespace")
        if isinstance(namespace, str):
            parts.append(_journal_field("PERC_NAMESPACE", namespace))
        for key, value in event_fields(event).items():
            parts.append(_journal_field(_journal_name(key), value))
        return b"".join(parts)

    def __call__(self, event: dict[str, Any]) -> None:
        try:
            self._socket.sendto(self.entry(event), self._path)
        except OSError:
            if self._fallback is not None:
                self._fallback(event)


def _text_observer(stream: IO[str]) -> Callable[[dict[str, Any]], None]:
    def write(event: dict[str, Any]) -> None:
        text = formatEventAsClassicLogText(event)
        if text:
            stream.write(text)
            stream.flush()
    return write


def _json_observer(stream: IO[str]) -> Callable[[dict[str, Any]], None]:
    def write(event: dict[str, Any]) -> None:
        record = {"time": formatTime(event.get("log_time"), "%Y-%m-%dT%H:%M:%S.%f%z"),
                  "level": _level(event).name, "namespace": event.get("log_namespace"),
                  "message": _message(event), **event_fields(event)}
        stream.write(json.dumps(record, ensure_ascii=True, default=str) + "\n")
        stream.flush()
    return write


def stdout_is_journal(stream: IO[str], environ: dict[str, str] | None = None) -> bool:
    """Whether ``stream`` is systemd's journal stream (``JOURNAL_STREAM=dev:ino``)."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


def observer(identifier: str, *, format: str = "auto", level: str = "info",
             stream: IO[str] | None = None, journal_socket: str = JOURNAL_SOCKET
             ) -> ILogObserver:
    """The daemon's log observer for ``[logging] format`` and ``level`` (module doc)."""
    out = stream if stream is not None else sys.__stdout__
    assert out is not None
    text = _text_observer(out)
    if format == "auto":
        journal = stdout_is_journal(out) and os.path.exists(journal_socket)
        format = "journal" if journal else "text"
    sink: Callable[[dict[str, Any]], None]
    if format == "journal":
        sink = JournalObserver(identifier, path=journal_socket, fallback=text)
    elif format == "json":
        sink = _json_observer(out)
    else:
        sink = text
    predicate = LogLevelFilterPredicate(defaultLogLevel=_LEVELS[level])
    return FilteringLogObserver(sink, [predicate])


_configured: dict[str, str] = {"identifier": "perc", "format": "auto", "level": "info"}


def configure(identifier: str, *, format: str, level: str) -> None:
    """What :func:`configured_observer` makes (set from ``[logging]`` at start-up)."""
    _configured.update(identifier=identifier, format=format, level=level)


def configured_observer() -> ILogObserver:
    """twistd's ``--logger`` factory: :func:`observer` as :func:`configure` set it."""
    return observer(_configured["identifier"], format=_configured["format"],
                    level=_configured["level"])


class AccessLogSite(server.Site):
    """A Site whose access lines are debug events of namespace ``perc.access``.

    Twisted's Site writes a combined-log line per request at info; here the
    fields go into the event (``method``, ``path`` without the query string,
    which may carry OAuth parameters, ``status``, ``bytes``, ``address``,
    ``user_agent``) and the line is shown only at ``[logging] level = "debug"``.
    """

    def log(self, request: server.Request) -> None:
        agent = request.getHeader(b"user-agent") or b""
        address = request.getClientAddress()
        _ACCESS.debug("{method} {path} {status} {bytes} from {address}",
                      method=request.method.decode("latin-1"),
                      path=request.path.decode("latin-1")[:512],
                      status=request.code, bytes=request.sentLength,
                      address=getattr(address, "host", "-"),
                      user_agent=agent.decode("latin-1")[:256])


_ACCESS = Logger(namespace="perc.access")


def quiet_pool(reactor: Any, *, persistent: bool) -> Any:
    """An HTTPConnectionPool whose connection factories do not log "Starting factory"
    and "Stopping factory" lines at info for every outgoing HTTP connection."""
    from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory

    class QuietFactory(_HTTP11ClientFactory):
        noisy = False

    pool = HTTPConnectionPool(reactor, persistent=persistent)
    pool._factory = QuietFactory
    return pool
