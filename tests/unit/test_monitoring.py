"""monitoring/: the Prometheus rules and the Grafana dashboard parse, and the metric
names their expressions use are read right (tests/e2e/test_monitoring.py checks that
the running daemons export each one)."""

from __future__ import annotations

import json
import os
import re

import yaml
from twisted.trial import unittest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RULES = os.path.join(REPO, "monitoring", "perc-daemons.rules.yml")
DASHBOARD = os.path.join(REPO, "monitoring", "perc-daemons.dashboard.json")

#: PromQL words that are not metric names (aggregations, modifiers, set operators).
_WORDS = frozenset({
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "group", "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "bool", "offset", "inf", "nan"})
_NAME = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> dict[str, set[str]]:
    """The metric names ``expr`` selects, each with the ``job`` values its selectors
    pin (``job="perc-kd"``; ``job=~"perc-(kmf|kd|md)"`` pins the alternatives)."""
    found: dict[str, set[str]] = {}
    text = re.sub(r"\[[^\]]*\]", " ", expr)  # range selectors, subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)",
                  r" \1 ", text)
    pattern = re.compile(r'"(?:[^"\\]|\\.)*"|\{[^}]*\}|[A-Za-z_:][A-Za-z0-9_:]*|.', re.S)
    tokens = [m.group(0) for m in pattern.finditer(text)]
    for i, token in enumerate(tokens):
        if not _NAME.fullmatch(token) or token.lower() in _WORDS:
            continue
        rest = [t for t in tokens[i + 1:] if not t.isspace()]
        if rest and rest[0] == "(":
            continue  # a function
        jobs: set[str] = set()
        if rest and rest[0].startswith("{"):
            selector = rest[0]
            exact = re.search(r'\bjob\s*=\s*"([^"]*)"', selector)
            regex = re.search(r'\bjob\s*=~\s*"([^"]*)"', selector)
            if exact:
                jobs.add(exact.group(1))
            elif regex:
                jobs.update(j for j in ("perc-kmf", "perc-kd", "perc-md")
                            if re.fullmatch(regex.group(1), j))
        found.setdefault(token, set()).update(jobs)
    return found


def rule_expressions() -> list[str]:
    with open(RULES, encoding="utf-8") as f:
        rules = yaml.safe_load(f)
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def dashboard_expressions() -> list[str]:
    with open(DASHBOARD, encoding="utf-8") as f:
        dashboard = json.load(f)
    exprs = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            exprs.append(target["expr"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":  # label_values(metric, label)
            exprs.append(variable["query"]["query"].split("(", 1)[1].split(",")[0])
    return exprs


def used_metrics() -> dict[str, set[str]]:
    """Every metric name the rules and the dashboard use, with the jobs they pin."""
    used: dict[str, set[str]] = {}
    for expr in rule_expressions() + dashboard_expressions():
        for name, jobs in metric_names(expr).items():
            used.setdefault(name, set()).update(jobs)
    return used


class MetricNamesTests(unittest.TestCase):
    def test_names_and_jobs_of_an_expression(self):
        self.assertEqual(
            metric_names('sum by (instance, reason) (rate(perc_kd_dtls_refusals_total'
                         '{job="perc-kd", reason!="x"}[5m])) / on (instance) group_left '
                         'sum(up{job=~"perc-(kmf|md)"}) > 0.2 and process_open_fds'),
            {"perc_kd_dtls_refusals_total": {"perc-kd"}, "up": {"perc-kmf", "perc-md"},
             "process_open_fds": set()})
        self.assertEqual(metric_names(
            'histogram_quantile(0.95, sum by (le) (rate(x_bucket{a="$instance"}'
            '[$__rate_interval])))'), {"x_bucket": set()})


class RulesTests(unittest.TestCase):
    def test_every_rule_is_an_alert_an_operator_can_read(self):
        with open(RULES, encoding="utf-8") as f:
            rules = yaml.safe_load(f)
        names = []
        for group in rules["groups"]:
            self.assertTrue(group["name"].startswith("perc-"))
            for rule in group["rules"]:
                self.assertLessEqual(set(rule), {"alert", "expr", "for", "labels",
                                                 "annotations"}, rule)
                names.append(rule["alert"])
                self.assertIn(rule["labels"]["severity"], {"critical", "warning", "info"})
                self.assertTrue(rule["annotations"]["summary"])
                self.assertTrue(metric_names(rule["expr"]), rule["alert"])
                if "for" in rule:
                    self.assertRegex(rule["for"], r"^[0-9]+[smh]$")
        self.assertEqual(len(names), len(set(names)), "alert names repeat")

    def test_the_alerts_the_operations_guide_names(self):
        alerts = {rule["alert"] for group in yaml.safe_load(open(RULES, encoding="utf-8"))
                  ["groups"] for rule in group["rules"]}
        self.assertLessEqual(
            {"PercDaemonDown", "PercKmfHighErrorRate", "PercKmfSlowRequests",
             "PercKdRefusalsSpike", "PercKdRekeyFailing", "PercKdTunnelToMdDown",
             "PercMdNoKdTunnel", "PercMdMediaDrops", "PercMdUdpSocketDrops",
             "PercMdCascadeLinkDown"}, alerts)


class DashboardTests(unittest.TestCase):
    def test_panels(self):
        with open(DASHBOARD, encoding="utf-8") as f:
            dashboard = json.load(f)
        self.assertEqual(dashboard["uid"], "perc-daemons")
        ids = [panel["id"] for panel in dashboard["panels"]]
        self.assertEqual(len(ids), len(set(ids)))
        rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
        self.assertEqual(rows, ["Overview", "perc-kmf", "perc-kd", "perc-md"])
        for panel in dashboard["panels"]:
            if panel["type"] == "row":
                continue
            self.assertTrue(panel["targets"], panel["title"])
            for target in panel["targets"]:
                self.assertEqual(target["datasource"]["uid"], "${datasource}")
                self.assertTrue(metric_names(target["expr"]), target["expr"])
