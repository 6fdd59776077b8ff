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
)
from prometheus_client.exposition import choose_encoder

from perc_daemons import __version__


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

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The registry as ``(body, content_type)`` in the format ``accept`` asks for.

        Plain text format 0.0.4 unless the scraper's Accept header asks for
        OpenMetrics (as prometheus_client's own server negotiates).
        """
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type
