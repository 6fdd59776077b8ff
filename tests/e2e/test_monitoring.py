"""Every metric the shipped alerting rules and Grafana dashboard name is exported,
under that exact name, by a running daemon of the kind (job) the expression names:
the three daemons of a LocalStack, as twistd processes, scraped on /metrics."""

from __future__ import annotations

import treq
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conference_support import StackTestCase
from tests.unit.test_monitoring import used_metrics

#: Series Prometheus makes itself, not the daemons.
SYNTHETIC = frozenset({"up"})

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created", ""),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "info": ("_info",),
}


def exported_names(text: str) -> set[str]:
    """The series names an exposition has, from its families (with or without samples)."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


class ExportedMetricsTests(StackTestCase):
    tap = False
    create_conference = False
    timeout = 120

    async def test_rules_and_dashboard_use_only_exported_metrics(self) -> None:
        exported: dict[str, set[str]] = {}
        for daemon in ("kmf", "kd", "md"):
            url = f"http://127.0.0.1:{self.stack.admin_port(daemon)}/metrics"
            response = await treq.get(url, pool=self.stack.pool, timeout=5)
            self.assertEqual(response.code, 200)
            exported[f"perc-{daemon}"] = exported_names((await treq.content(response)).decode())
        used = used_metrics()
        self.assertGreater(len(used), 30)
        missing = []
        for name, jobs in sorted(used.items()):
            if name in SYNTHETIC:
                continue
            having = {job for job, names in exported.items() if name in names}
            if not having:
                missing.append(f"{name}: exported by no daemon")
            elif jobs - having:
                missing.append(f"{name}: not exported by {sorted(jobs - having)} "
                               f"(only {sorted(having)})")
        self.assertEqual(missing, [])
