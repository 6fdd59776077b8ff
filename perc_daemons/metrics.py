"""Prometheus metrics for one daemon process.

prometheus_client is used (rather than hand-written exposition) because its
text format, escaping and process collectors are already right and
maintained.  Each daemon owns one :class:`Metrics` with its own registry, so
tests can run several daemons' services in one process.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from perc_daemons import __version__

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """A daemon's metric registry and the metrics every daemon has."""

    def __init__(self, daemon: str) -> None:
        self.daemon = daemon
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        info = Info("perc_build", "perc-daemons build information", registry=self.registry)
        info.info({"daemon": daemon, "version": __version__})
        self.dropped_input = Counter(
            "perc_dropped_input",
            "Inputs (packets, frames, requests) dropped as malformed, by reason",
            ["reason"],
            registry=self.registry,
        )

    def exposition(self) -> bytes:
        """The registry in the Prometheus text exposition format."""
        return generate_latest(self.registry)
