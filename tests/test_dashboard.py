"""deploy/grafana/gateway.json charts what the gateway exports: every PromQL expression names metrics and labels
that gateway/metrics.py's registry produces (read from the registry, never a copied list)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.metrics import Metrics, Probes

pytestmark = pytest.mark.unit  # no service: `pytest -m unit` runs these in seconds

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "gateway.json"
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
_FUNCTIONS = {"sum", "max", "min", "avg", "count", "rate", "irate", "increase", "histogram_quantile", "by", "without", "label_values"}
_ADDED_BY_PROMETHEUS = {"instance", "job", "le"}  # `le` is every histogram bucket's


def exported() -> dict[str, set[str]]:
    """Every series name a scrape can show, with its labels: one of everything recorded, every probe set."""
    m = Metrics()
    m.decided("admitted")
    m.decided("denied", ["hd"])
    m.latency(0.001)
    m.shadowed(["rate"])
    m.events([{"type": "warning"}])
    m.probes = Probes(breakers=lambda: {"127.0.0.1:6379": "closed"}, record=lambda: {"pending": 0, "lag_seconds": 0.0})

    async def backlog() -> dict[str, Any]:
        return {"waiting": 0, "dead": 0, "oldest_waiting_seconds": 0.0}

    m.probes.backlog = backlog
    asyncio.run(m.scrape())
    names: dict[str, set[str]] = {}
    for family in m.registry.collect():
        for suffix in _SUFFIXES[family.type]:
            names.setdefault(family.name + suffix, set())
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def expressions(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            yield panel["title"], target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            yield f"variable {variable['name']}", variable["query"]["query"]


def named(expr: str) -> tuple[set[str], set[str]]:
    """The metric names an expression selects, and the label names it matches or groups by."""
    labels = set(re.findall(r"([a-z_]+)\s*=~?\s*\"", expr))
    for grouping in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        labels |= {name.strip() for name in grouping.split(",") if name.strip()}
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"|\b(?:by|without)\s*\([^)]*\)", " ", expr)
    label_values = re.findall(r"label_values\(\s*([a-z_:]+)\s*,\s*([a-z_]+)\s*\)", expr)
    labels |= {label for _, label in label_values}
    identifiers = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", bare)) - _FUNCTIONS
    return identifiers - labels, labels


def test_every_expression_names_a_metric_and_labels_the_gateway_exports() -> None:
    """Each panel's and variable's PromQL selects series the registry exports, by labels those series carry."""
    dashboard = json.loads(DASHBOARD.read_text())
    series = exported()
    found = list(expressions(dashboard))
    assert found
    for where, expr in found:
        metrics, labels = named(expr)
        assert metrics, f"{where}: {expr} names no metric"
        for metric in metrics:
            assert metric in series, f"{where}: {metric} is not exported (the registry has {sorted(series)})"
            unknown = labels - series[metric] - _ADDED_BY_PROMETHEUS
            assert not unknown, f"{where}: {metric} has no label {sorted(unknown)}"


def test_the_dashboard_has_the_panels_operators_look_for() -> None:
    """Decisions by outcome, denials by policy, latency, Redis errors and breakers, record lag, webhooks, shadow."""
    dashboard = json.loads(DASHBOARD.read_text())
    charted = {expr for _, expr in expressions(dashboard)}
    for metric in ("gateway_decisions_total", "gateway_decision_seconds_bucket", "gateway_redis_errors_total",
                   "gateway_redis_breaker_state", "gateway_record_lag_seconds", "gateway_webhook_backlog",
                   "gateway_shadow_denials_total"):  # fmt: skip
        assert any(metric in expr for expr in charted), f"no panel charts {metric}"
    assert any('outcome="denied"' in expr and "by (policy)" in expr for expr in charted)
    assert any("histogram_quantile(0.99" in expr for expr in charted)
    # Every series the gateway exports is on the dashboard, so a new one is not forgotten there.
    assert {name for name in exported() if not name.endswith(("_sum", "_count", "_created"))} <= {
        m for expr in charted for m in named(expr)[0]
    }
