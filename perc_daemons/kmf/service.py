"""twistd plugin module for perc-kmf (see the package docstring for its role).

Today the service runs the admin listener (/healthz, /metrics); the daemon's
own protocol work is added by later milestones (see README).
"""

from __future__ import annotations

from twisted.application.service import MultiService

from perc_daemons.daemon import DaemonOptions, base_service


class Options(DaemonOptions):
    daemon = "kmf"
    synopsis = "[--config /etc/perc/kmf.toml]"


def makeService(options: Options) -> MultiService:
    return base_service("kmf", options.loaded)
