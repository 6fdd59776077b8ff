"""What the three twistd plugins share: ``--config`` handling and the base service.

A plugin module (``perc_daemons.md.service`` etc.) defines ``Options`` as a
subclass of :class:`DaemonOptions` and ``makeService`` building on
:func:`base_service`.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from collections.abc import Callable

from twisted.application.service import MultiService, Service
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage

from perc_daemons import config as config_module
from perc_daemons.admin import AdminService
from perc_daemons.listening import ConnectionLimits
from perc_daemons.metrics import Metrics
from perc_daemons.sdnotify import NotifyService

#: Exit status for configuration errors (as documented in README and the units).
EXIT_CONFIG = 2
#: Exit status when a listener cannot bind its address (taken, or not on this
#: host): like a configuration error, restarting does not fix it (the units'
#: RestartPreventExitStatus=).
EXIT_CANNOT_LISTEN = 3


class DaemonOptions(usage.Options):
    """``--config PATH`` (repeatable); the files are loaded and validated while options
    are parsed.

    Given twice or more, a key of a later file replaces the same key of an
    earlier one (:func:`~perc_daemons.config.load_layers`): the shared
    ``/etc/perc/md.toml`` and one process's ``/etc/perc/md@2.toml``.  On a
    bad file the daemon prints one line naming the file, key and reason and
    exits with status 2, before twistd daemonises or opens logs.
    """

    daemon = ""  # "md", "kd" or "kmf": set by subclasses

    def __init__(self) -> None:
        super().__init__()
        self["config"] = f"/etc/perc/{self.daemon}.toml"
        self["configs"] = []

    def opt_config(self, path: str) -> None:
        """Configuration file (TOML) [default: /etc/perc/<daemon>.toml]; repeatable, later
        files override keys of earlier ones."""
        self["configs"].append(path)
        self["config"] = self["configs"][0]

    opt_c = opt_config

    def postOptions(self) -> None:
        try:
            self.loaded = config_module.load_layers(self.daemon,
                                                    self["configs"] or [self["config"]])
        except config_module.ConfigError as e:
            sys.stderr.write(f"perc-{self.daemon}: configuration error: {e}\n")
            sys.stderr.flush()
            raise SystemExit(EXIT_CONFIG) from None
        self._install_log_observer()

    def _install_log_observer(self) -> None:
        """Make ``[logging]`` twistd's log observer (unless twistd was told another)."""
        parent = getattr(self, "parent", None)
        if parent is None or parent.get("logger") or parent.get("logfile") not in (None, "-") \
                or parent.get("syslog"):
            return
        from perc_daemons import logs

        logs.configure(f"perc-{self.daemon}", format=self.loaded.logging.format,
                       level=self.loaded.logging.level)
        # twistd imports the observer factory by name, after these options
        parent["logger"] = "perc_daemons.logs.configured_observer"


class ConfigReloader(Service):
    """Handles SIGHUP (``systemctl reload``): re-reads and checks the configuration.

    Without a handler SIGHUP would end the daemon.  The configuration file
    itself is not applied live: a reload validates it and reports (a broken
    file is logged and the running configuration kept; changed keys are
    logged as taking effect at the next restart).  Files a daemon can take
    live (the KMF's client registry) register a hook with :meth:`add_hook`;
    each hook runs on every reload, logs its own outcome and must not raise.
    """

    log = Logger()

    def __init__(self, daemon: str, cfg: config_module.Config, reactor) -> None:
        self._daemon = daemon
        self._running_config = cfg
        self._reactor = reactor
        self._previous_handler = None
        self._hooks: list[Callable[[], object]] = []
        self.setName("config-reloader")

    def add_hook(self, hook: Callable[[], object]) -> None:
        """Run ``hook()`` on every reload, after the configuration check."""
        self._hooks.append(hook)

    def startService(self) -> None:
        super().startService()
        self._previous_handler = signal.signal(signal.SIGHUP, self._on_sighup)

    def stopService(self) -> None:
        super().stopService()
        if self._previous_handler is not None:
            signal.signal(signal.SIGHUP, self._previous_handler)
            self._previous_handler = None

    def _on_sighup(self, signum: int, frame: object) -> None:
        self._reactor.callFromThread(self.reload)

    def reload(self) -> list[str]:
        """Check the configuration file again and run the hooks; returns the changed keys."""
        changed = self._check_config()
        for hook in self._hooks:
            hook()
        return changed

    def _check_config(self) -> list[str]:
        path = ", ".join(self._running_config.paths)
        try:
            new = config_module.load_layers(self._daemon, self._running_config.paths)
        except config_module.ConfigError as e:
            self.log.error("perc-{daemon}: reload refused, keeping the running "
                           "configuration: {error}", daemon=self._daemon, error=str(e))
            return []
        changed = [f"{section}.{key}" for section in new for key in new[section]
                   if new[section][key] != self._running_config[section][key]]
        if changed:
            self.log.warn("perc-{daemon}: {path} changed {keys}; these take effect when the "
                          "daemon is restarted", daemon=self._daemon, path=path,
                          keys=", ".join(changed))
        else:
            self.log.info("perc-{daemon}: reload: {path} is valid and unchanged",
                          daemon=self._daemon, path=path)
        return changed


def listener_setting(cfg: config_module.Config, error: CannotListenError
                     ) -> tuple[str, str]:
    """The ``[section] bind/port`` of ``cfg`` that ``error`` is about, and its port key
    ("section.port"); ``("", "")`` if none matches."""
    for section in cfg:
        values = cfg[section]
        if "bind" in values and "port" in values and values["port"] == error.port \
                and values["bind"] == (error.interface or values["bind"]):
            return (f"[{section}] bind = {values['bind']!r}, port = {values['port']}",
                    f"{section}.port")
    return "", ""


def cannot_listen_message(daemon: str, cfg: config_module.Config,
                          error: CannotListenError) -> str:
    """One line: the address, the setting of ``cfg`` that names it, and why."""
    cause = error.socketError
    number = getattr(cause, "errno", None)
    if number is None and getattr(cause, "args", None) and isinstance(cause.args[0], int):
        number = cause.args[0]
    reason = os.strerror(number) if isinstance(number, int) else str(cause)
    hint = {errno.EADDRINUSE: "another process holds it (ss -ltnup shows which)",
            errno.EADDRNOTAVAIL: "no interface of this host has that address",
            errno.EACCES: "ports below 1024 need privileges the units do not grant"
            }.get(number, "")
    setting, key = listener_setting(cfg, error)
    where = f" ({setting} in {cfg.origin(key)})" if setting else \
        f" (see {', '.join(cfg.paths)})"
    host = f"[{error.interface}]" if ":" in (error.interface or "") else error.interface
    return (f"perc-{daemon}: cannot listen on {host or '*'}:{error.port}{where}: {reason}"
            + (f"; {hint}" if hint else "") + f"; exiting with status {EXIT_CANNOT_LISTEN}")


class DaemonService(MultiService):
    """The top service of a daemon: a listener that cannot bind ends start-up.

    twistd would print the CannotListenError's traceback and exit with status
    1, which systemd restarts every RestartSec for ever; instead the daemon
    logs one line naming the address and the setting and exits with status
    :data:`EXIT_CANNOT_LISTEN`, which the units do not restart on.

    ``notify`` (a :class:`~perc_daemons.sdnotify.NotifyService`, set by
    :func:`base_service`) is started once every child started, i.e. once
    every listener is bound (they bind in ``startService``), and stopped
    before the children, so that STOPPING=1 is the first thing shutdown does.
    """

    log = Logger()

    def __init__(self, daemon: str, cfg: config_module.Config) -> None:
        super().__init__()
        self._daemon = daemon
        self._cfg = cfg
        self.notify: NotifyService | None = None

    def startService(self) -> None:
        try:
            super().startService()
        except CannotListenError as e:
            message = cannot_listen_message(self._daemon, self._cfg, e)
            self.log.critical("{message}", message=message, interface=e.interface, port=e.port)
            raise SystemExit(EXIT_CANNOT_LISTEN) from None
        if self.notify is not None:
            self.notify.startService()

    def stopService(self):  # type: ignore[no-untyped-def]
        if self.notify is not None and self.notify.running:
            self.notify.stopService()
        return super().stopService()


def base_service(daemon: str, cfg: config_module.Config, reactor=None) -> MultiService:
    """The MultiService every daemon starts from: metrics, the admin listener and the
    systemd notifications (``notify``; conditions READY waits for are added
    with ``top.notify.require``).

    The returned service has ``metrics`` set, for the daemon's own parts,
    ``reloader`` (the :class:`ConfigReloader`, for reload hooks) and
    ``limits``, the :class:`~perc_daemons.listening.ConnectionLimits` of
    ``[connections]`` for every listener of the daemon.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    top = DaemonService(daemon, cfg)
    top.notify = NotifyService.from_environ(daemon, reactor, top)
    top.metrics = Metrics(f"perc-{daemon}")  # type: ignore[attr-defined]
    top.limits = ConnectionLimits.from_config(cfg)  # type: ignore[attr-defined]
    AdminService(reactor, f"perc-{daemon}", cfg.admin.bind, cfg.admin.port,
                 top.metrics,  # type: ignore[attr-defined]
                 limits=top.limits).setServiceParent(top)  # type: ignore[attr-defined]
    top.reloader = ConfigReloader(daemon, cfg, reactor)  # type: ignore[attr-defined]
    top.reloader.setServiceParent(top)  # type: ignore[attr-defined]
    return top
