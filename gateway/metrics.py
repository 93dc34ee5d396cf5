"""Prometheus metrics: decisions by outcome and policy, decision latency, Redis errors, degraded answers.

No label carries a billable: their number is unbounded. Each app gets its own registry so several
gateways (and tests) can live in one process.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._decisions = Counter(
            "gateway_decisions", "Decisions by outcome and violated policy", ["outcome", "policy"], registry=self.registry
        )
        self._latency = Histogram(
            "gateway_decision_seconds",
            "Time to decide one request (identity, plan and the Redis script)",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
        self._redis_errors = Counter("gateway_redis_errors", "Redis calls that failed or were refused by the breaker", registry=self.registry)
        self._degraded = Counter("gateway_degraded_answers", "Requests let through without Redis (fail open)", registry=self.registry)
        self._events = Counter("gateway_events", "Events emitted by type", ["type"], registry=self.registry)
        self._admitted = self._decisions.labels("admitted", "")

    def decided(self, outcome: str, policies: Iterable[str]) -> None:
        if outcome == "admitted":
            self._admitted.inc()
            return
        policies = list(policies)
        for policy in policies or [""]:
            self._decisions.labels(outcome, policy).inc()

    def latency(self, seconds: float) -> None:
        self._latency.observe(seconds)

    def redis_error(self) -> None:
        self._redis_errors.inc()

    def degraded(self) -> None:
        self._degraded.inc()

    def events(self, events: Iterable[dict[str, Any]]) -> None:
        for event in events:
            self._events.labels(event["type"]).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
