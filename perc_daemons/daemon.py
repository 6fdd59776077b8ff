"""What the three twistd plugins share: ``--config`` handling and the base service.

A plugin module (``perc_daemons.md.service`` etc.) defines ``Options`` as a
subclass of :class:`DaemonOptions` and ``makeService`` building on
:func:`base_service`.
"""

from __future__ import annotations

import sys

from twisted.application.service import MultiService
from twisted.python import usage

from perc_daemons import config as config_module
from perc_daemons.admin import AdminService
from perc_daemons.metrics import Metrics

#: Exit status for configuration errors (as documented in README and the units).
EXIT_CONFIG = 2


class DaemonOptions(usage.Options):
    """``--config PATH``; the file is loaded and validated while options are parsed.

    On a bad file the daemon prints one line naming the file, key and reason
    and exits with status 2, before twistd daemonises or opens logs.
    """

    daemon = ""  # "md", "kd" or "kmf": set by subclasses

    def __init__(self) -> None:
        super().__init__()
        self["config"] = f"/etc/perc/{self.daemon}.toml"

    def opt_config(self, path: str) -> None:
        """Configuration file (TOML) [default: /etc/perc/<daemon>.toml]."""
        self["config"] = path

    opt_c = opt_config

    def postOptions(self) -> None:
        try:
            self.loaded = config_module.load(self.daemon, self["config"])
        except config_module.ConfigError as e:
            sys.stderr.write(f"perc-{self.daemon}: configuration error: {e}\n")
            sys.stderr.flush()
            raise SystemExit(EXIT_CONFIG) from None


def base_service(daemon: str, cfg: config_module.Config, reactor=None) -> MultiService:
    """The MultiService every daemon starts from: metrics and the admin listener.

    The returned service has ``metrics`` set, for the daemon's own parts.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    top = MultiService()
    top.metrics = Metrics(f"perc-{daemon}")  # type: ignore[attr-defined]
    AdminService(reactor, f"perc-{daemon}", cfg.admin.bind, cfg.admin.port,
                 top.metrics).setServiceParent(top)  # type: ignore[attr-defined]
    return top
