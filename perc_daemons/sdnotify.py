"""systemd's readiness protocol (sd_notify(3)): READY, STATUS, WATCHDOG, STOPPING.

A daemon run by a ``Type=notify`` unit finds ``$NOTIFY_SOCKET`` in its
environment: an ``AF_UNIX`` datagram socket, a file system path (``/run/...``)
or, with a leading ``@``, a name in Linux's abstract namespace.  Each message
is one datagram of newline-separated ``KEY=value`` assignments
(sd_notify(3), "Description"; systemd.service(5), ``Type=notify``):

* ``READY=1``: start-up is finished; ``systemctl start`` returns now;
* ``STATUS=...``: one line shown by ``systemctl status``;
* ``WATCHDOG=1``: the keep-alive a unit with ``WatchdogSec=`` expects at
  least every ``$WATCHDOG_USEC`` microseconds (sd_watchdog_enabled(3): half
  that interval is the recommended period; ``$WATCHDOG_PID``, when set, names
  the one process the watchdog is for);
* ``STOPPING=1``: shutdown has begun.

The protocol is these few lines, so no library is used: ``python-systemd``
needs libsystemd's headers to build inside the package's virtualenv, and the
PyPI ``sdnotify`` package is one unmaintained file that does what
:class:`Notifier` does.  Without ``$NOTIFY_SOCKET`` (a shell, twistd run by
hand, the tests) :func:`notifier_from_environ` gives None and nothing is sent.

:func:`format_message`, :func:`socket_address` and
:func:`watchdog_interval` are pure; :class:`Notifier` owns the socket;
:class:`NotifyService` (Twisted glue) decides when each message goes.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from twisted.application.service import IServiceCollection, Service
from twisted.internet import defer, task
from twisted.logger import Logger

log = Logger()

_KEY = re.compile(r"[A-Z][A-Z0-9_]*")


class NotifyError(ValueError):
    """``$NOTIFY_SOCKET`` or a message cannot be used (``reason`` says why)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def socket_address(value: str) -> str:
    """The ``AF_UNIX`` address ``$NOTIFY_SOCKET`` names (sd_notify(3)).

    ``@name`` is ``name`` in the abstract namespace (``"\\0name"`` for the
    socket module); an absolute path is itself.  Anything else (a relative
    path, systemd's ``vsock:`` form) raises :class:`NotifyError`.
    """
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    raise NotifyError("unsupported_address", f"NOTIFY_SOCKET={value!r} is neither an "
                      "absolute path nor @abstract")


def format_message(fields: Iterable[tuple[str, str]]) -> bytes:
    """One datagram: ``KEY=value`` lines.  A key is ``[A-Z][A-Z0-9_]*``; a value is one
    line (no line break of any kind: a STATUS= is one line of ``systemctl status``)."""
    lines = []
    for key, value in fields:
        if not _KEY.fullmatch(key) or (value and value.splitlines() != [value]):
            raise NotifyError("bad_field", f"{key!r}={value!r}")
        lines.append(f"{key}={value}")
    if not lines:
        raise NotifyError("empty", "a notification needs one field at least")
    return ("\n".join(lines) + "\n").encode("utf-8")


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between two WATCHDOG=1, or None when the unit has no watchdog.

    Half of ``$WATCHDOG_USEC`` (sd_watchdog_enabled(3)); None when that is
    unset or not a positive integer, or when ``$WATCHDOG_PID`` names another
    process than ``pid``.
    """
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) <= 0:
        return None
    owner = environ.get("WATCHDOG_PID", "")
    if owner and (not owner.isdigit() or int(owner) != pid):
        return None
    return int(usec) / 2e6


class Notifier:
    """Sends notifications to one ``AF_UNIX`` datagram address.

    A send that fails (systemd gone, socket full) is logged once and
    otherwise ignored: a daemon never stops serving because its supervisor
    did not listen.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._socket.setblocking(False)
        self._failed = False

    def notify(self, **fields: str) -> bool:
        """Send ``KEY=value`` for each keyword (in order); True if the datagram left."""
        data = format_message(fields.items())
        try:
            self._socket.sendto(data, self.address)
        except OSError as e:
            if not self._failed:
                log.warn("systemd notification not sent to {address!r}: {error}",
                         address=self.address, error=str(e))
                self._failed = True
            return False
        return True

    def close(self) -> None:
        self._socket.close()


def notifier_from_environ(environ: Mapping[str, str] | None = None) -> Notifier | None:
    """A :class:`Notifier` for ``$NOTIFY_SOCKET``, or None when it is unset (or unusable,
    which is logged)."""
    environ = os.environ if environ is None else environ
    value = environ.get("NOTIFY_SOCKET", "")
    if not value:
        return None
    try:
        return Notifier(socket_address(value))
    except NotifyError as e:
        log.warn("systemd notifications off: {error}", error=str(e))
        return None


def bound_addresses(top: Any) -> list[str]:
    """``name host:port`` of every listener bound under the service ``top``."""
    found: list[str] = []

    def walk(service: Any) -> None:
        port = getattr(service, "_listening", None) or getattr(service, "port", None)
        get_host = getattr(port, "getHost", None)
        if get_host is not None:
            address = get_host()
            host = getattr(address, "host", "")
            host = f"[{host}]" if ":" in host else host
            found.append(f"{service.name} {host}:{getattr(address, 'port', '')}")
        if IServiceCollection.providedBy(service):
            for child in service:
                walk(child)

    walk(top)
    return found


class NotifyService(Service):
    """When a daemon tells systemd what (module docstring); started by the daemon's top
    service once every listener is bound (:class:`~perc_daemons.daemon.DaemonService`).

    READY=1 goes once the reactor runs and every condition of :meth:`require`
    has fired, with a STATUS= naming the bound listeners; meanwhile STATUS=
    says what start-up waits for.  WATCHDOG=1 goes every half
    ``$WATCHDOG_USEC`` from a reactor timer, from the moment the reactor
    runs: a reactor that hangs stops them and systemd restarts the daemon.
    :meth:`stopService` sends STOPPING=1.  With no ``notifier`` nothing of
    this happens.
    """

    def __init__(self, daemon: str, reactor: Any, top: Any, *,
                 notifier: Notifier | None = None,
                 watchdog: float | None = None) -> None:
        self.setName("systemd-notify")
        self._daemon = daemon
        self._reactor = reactor
        self._top = top
        self.notifier = notifier
        self.watchdog = watchdog
        self._conditions: list[tuple[str, Callable[[], defer.Deferred[Any]]]] = []
        self._watchdog_loop: task.LoopingCall | None = None
        self._waiting: defer.Deferred[Any] | None = None
        #: True once READY=1 was sent.
        self.ready = False
        #: Where READY stands (also shown as STATUS= while starting).
        self.status = "starting"
        #: Said after the listeners in the STATUS= of READY (e.g. what cannot serve).
        self.note = ""

    @classmethod
    def from_environ(cls, daemon: str, reactor: Any, top: Any,
                     environ: Mapping[str, str] | None = None) -> NotifyService:
        environ = os.environ if environ is None else environ
        notifier = notifier_from_environ(environ)
        watchdog = watchdog_interval(environ, os.getpid()) if notifier is not None else None
        return cls(daemon, reactor, top, notifier=notifier, watchdog=watchdog)

    def require(self, waiting_for: str, condition: Callable[[], defer.Deferred[Any]]) -> None:
        """READY waits until ``condition()`` fires; ``waiting_for`` goes in STATUS= meanwhile
        (e.g. "the KMF at https://kmf:8443 to answer")."""
        self._conditions.append((waiting_for, condition))

    def set_status(self, status: str) -> None:
        """Send STATUS=``status`` (one line)."""
        self.status = status
        self._send(STATUS=" ".join(status.splitlines()))

    def _send(self, **fields: str) -> None:
        if self.notifier is not None:
            self.notifier.notify(**fields)

    def startService(self) -> None:
        super().startService()
        if self.notifier is not None:
            self._reactor.callWhenRunning(self._reactor_running)

    def _reactor_running(self) -> None:
        if not self.running:
            return
        if self.watchdog is not None:
            self._watchdog_loop = task.LoopingCall(self._send, WATCHDOG="1")
            self._watchdog_loop.clock = self._reactor
            self._watchdog_loop.start(self.watchdog, now=True)
        self._wait(list(self._conditions))

    def _wait(self, conditions: list[tuple[str, Callable[[], defer.Deferred[Any]]]]) -> None:
        if not self.running:
            return
        if not conditions:
            self._send_ready()
            return
        waiting_for, condition = conditions[0]
        self.set_status(f"perc-{self._daemon}: listening; waiting for {waiting_for}")
        d = self._waiting = defer.maybeDeferred(condition)

        def fired(_: object) -> None:
            self._waiting = None
            self._wait(conditions[1:])

        def failed(f: Any) -> None:
            if not f.check(defer.CancelledError):
                log.failure("perc-{daemon}: start-up condition failed: {what}", f,
                            daemon=self._daemon, what=waiting_for)
        d.addCallbacks(fired, failed)

    def _send_ready(self) -> None:
        self.ready = True
        listeners = ", ".join(bound_addresses(self._top)) or "no listeners"
        self.status = f"perc-{self._daemon} serving: {listeners}"
        if self.note:
            self.status += f"; {self.note}"
        self.status = " ".join(self.status.splitlines())
        self._send(READY="1", STATUS=self.status)
        log.info("perc-{daemon}: told systemd it is ready ({status})",
                 daemon=self._daemon, status=self.status)

    def stopService(self) -> None:
        super().stopService()
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.cancel()
        if self._watchdog_loop is not None and self._watchdog_loop.running:
            self._watchdog_loop.stop()
        self._watchdog_loop = None
        self._send(STOPPING="1", STATUS=f"perc-{self._daemon} stopping")
