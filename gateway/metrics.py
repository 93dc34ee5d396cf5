"""Prometheus metrics: decisions by outcome and policy, decision latency, Redis errors, degraded answers,
would-be denials in shadow.

No label carries a billable: their number is unbounded. Each app gets its own registry so several
gateways (and tests) can live in one process.

The counts are plain integers, changed on the event loop's thread and read by one collector when
scraped: prometheus-client's own metric objects take a lock and search the buckets in Python on every
observation, a noticeable share of a decision's Python time.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.admitted = 0
        self.refused: dict[tuple[str, str], int] = {}  # (outcome, policy) of decisions that did not admit
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)  # per bucket, the last one past every bound
        self.latency_sum = 0.0
        self.redis_errors = 0
        self.degraded_answers = 0
        self.event_counts: dict[str, int] = {}
        self.shadow_denials: dict[str, int] = {}  # by policy: admitted in shadow, would have been denied
        self.registry.register(_Collector(self))

    def decided(self, outcome: str, policies: Iterable[str] = ()) -> None:
        if outcome == "admitted":
            self.admitted += 1
            return
        for policy in list(policies) or [""]:
            key = (outcome, policy)
            self.refused[key] = self.refused.get(key, 0) + 1

    def shadowed(self, policies: Iterable[str]) -> None:
        for policy in policies:
            self.shadow_denials[policy] = self.shadow_denials.get(policy, 0) + 1

    def latency(self, seconds: float) -> None:
        self.latency_counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1  # `le`: a value on a bound is in it
        self.latency_sum += seconds

    def redis_error(self) -> None:
        self.redis_errors += 1

    def degraded(self) -> None:
        self.degraded_answers += 1

    def events(self, events: Iterable[dict[str, Any]]) -> None:
        for event in events:
            self.event_counts[event["type"]] = self.event_counts.get(event["type"], 0) + 1

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Collector:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        decisions = CounterMetricFamily("gateway_decisions", "Decisions by outcome and violated policy", labels=["outcome", "policy"])
        decisions.add_metric(["admitted", ""], m.admitted)
        for (outcome, policy), count in sorted(m.refused.items()):
            decisions.add_metric([outcome, policy], count)
        yield decisions
        cumulative, buckets = 0, []
        for bound, count in zip((*(repr(b) for b in LATENCY_BUCKETS), "+Inf"), m.latency_counts, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily(
            "gateway_decision_seconds",
            "Time to decide one request (identity, plan and the Redis script)",
            buckets=buckets,
            sum_value=m.latency_sum,
        )
        yield CounterMetricFamily("gateway_redis_errors", "Redis calls that failed or were refused by the breaker", value=m.redis_errors)
        yield CounterMetricFamily("gateway_degraded_answers", "Requests let through without Redis (fail open)", value=m.degraded_answers)
        events = CounterMetricFamily("gateway_events", "Events emitted by type", labels=["type"])
        for kind, count in sorted(m.event_counts.items()):
            events.add_metric([kind], count)
        yield events
        shadow = CounterMetricFamily("gateway_shadow_denials", "Requests admitted in shadow that would have been denied, by policy", labels=["policy"])
        for policy, count in sorted(m.shadow_denials.items()):
            shadow.add_metric([policy], count)
        yield shadow
