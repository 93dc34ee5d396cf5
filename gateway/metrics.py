"""Prometheus metrics: decisions by outcome and policy, decision latency, Redis errors, degraded answers,
would-be denials in shadow; and, read from the running gateway when scraped, each Redis breaker's state,
the record's catch-up lag and the webhook outbox (`Probes`). deploy/grafana/gateway.json charts them.

No label carries a billable: their number is unbounded. Each app gets its own registry so several
gateways (and tests) can live in one process.

The counts are plain integers, changed on the event loop's thread and read by one collector when
scraped: prometheus-client's own metric objects take a lock and search the buckets in Python on every
observation, a noticeable share of a decision's Python time.
"""

from __future__ import annotations

import asyncio
import logging
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

__all__ = ["CONTENT_TYPE_LATEST", "Metrics", "Probes"]

log = logging.getLogger("gateway.metrics")

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
BREAKER_STATES = {"closed": 0, "half-open": 1, "open": 2}  # the value of gateway_redis_breaker_state
BACKLOG_TIMEOUT_S = 2.0  # a scrape never waits long on the database


@dataclass
class Probes:
    """What a scrape reads from the running gateway (unset: not exported): each Redis master's breaker state
    by address, the reconciler's health (`pending`, `lag_seconds`), the outbox's backlog (`waiting`, `dead`,
    `oldest_waiting_seconds`)."""

    breakers: Callable[[], Mapping[str, str]] | None = None
    record: Callable[[], Mapping[str, Any]] | None = None
    backlog: Callable[[], Awaitable[Mapping[str, Any]]] | None = None


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
        self.probes = Probes()
        self.backlog: Mapping[str, Any] | None = None  # as the last scrape read it
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

    async def scrape(self) -> bytes:
        """The exposition, with the outbox's backlog read now (the other probes are read as they render)."""
        if self.probes.backlog is not None:
            try:
                async with asyncio.timeout(BACKLOG_TIMEOUT_S):
                    self.backlog = await self.probes.backlog()
            except Exception as exc:  # noqa: BLE001 - a scrape answers whatever the database does
                self.backlog = None
                log.warning("metrics: could not count the event outbox: %s", exc)
        return self.render()


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
        breakers = GaugeMetricFamily("gateway_redis_breaker_state", "Each Redis master's circuit breaker: 0 closed, 1 half-open, 2 open",
                                     labels=["node"])  # fmt: skip
        for node, state in sorted((m.probes.breakers() if m.probes.breakers else {}).items()):
            breakers.add_metric([node], BREAKER_STATES[state])
        yield breakers
        record = m.probes.record() if m.probes.record else None
        lag = GaugeMetricFamily("gateway_record_lag_seconds", "How long the oldest change not yet in the record has waited")
        pending = GaugeMetricFamily("gateway_record_pending", "Billables whose changes are not yet in the record")
        if record is not None:
            lag.add_metric([], record["lag_seconds"])
            pending.add_metric([], record["pending"])
        yield lag
        yield pending
        backlog = GaugeMetricFamily("gateway_webhook_backlog", "Events in the outbox: waiting to be delivered, or dead-lettered", labels=["state"])
        oldest = GaugeMetricFamily("gateway_webhook_oldest_waiting_seconds", "How long the oldest event waiting for delivery has waited")
        if m.backlog is not None:
            backlog.add_metric(["waiting"], m.backlog["waiting"])
            backlog.add_metric(["dead"], m.backlog["dead"])
            oldest.add_metric([], m.backlog["oldest_waiting_seconds"])
        yield backlog
        yield oldest
