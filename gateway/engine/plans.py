"""Plan resolution: manual assignment → subscription (past_due within its grace) → the default plan, and
this process's cache of it (stale as soon as the state's plan version moves: decide.lua says so)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from gateway.catalog import Catalog
from gateway.state import Subscription

log = logging.getLogger("gateway.engine")

PlanSource = Literal["assignment", "subscription", "default"]
ACTIVE_STATUSES = frozenset({"active", "trialing"})


@dataclass(frozen=True, slots=True)
class ResolvedPlan:
    name: str
    source: PlanSource
    version: int
    expires_at: float = float("inf")


class Plans:
    def __init__(self, catalog: Catalog, clock: Callable[[], float]) -> None:
        self.catalog = catalog
        self.clock = clock
        self._cache: dict[str, ResolvedPlan] = {}

    def cached(self, billable: str) -> ResolvedPlan | None:
        resolved = self._cache.get(billable)
        return None if resolved is None or resolved.expires_at <= self.clock() else resolved

    def forget(self, billable: str) -> None:
        self._cache.pop(billable, None)

    def resolve(self, billable: str, version: int, assignment: str | None, sub: Subscription | None) -> ResolvedPlan:
        """Manual assignment → active subscription (past_due within the grace) → default plan."""
        plans = self.catalog.plans
        resolved = ResolvedPlan(self.catalog.settings.default_plan, "default", version)
        if assignment and assignment in plans:
            resolved = ResolvedPlan(assignment, "assignment", version)
        elif sub is not None:
            if sub.plan in plans:
                if sub.status in ACTIVE_STATUSES:
                    resolved = ResolvedPlan(sub.plan, "subscription", version)
                elif sub.status == "past_due" and sub.past_due_since is not None:
                    ends = sub.past_due_since + self.catalog.settings.past_due_grace_seconds
                    if self.clock() < ends:
                        resolved = ResolvedPlan(sub.plan, "subscription", version, expires_at=ends)
            else:
                log.warning("billable %r subscribes to plan %r, which plans.toml lacks; using the default", billable, sub.plan)
        elif assignment:
            log.warning("billable %r is assigned plan %r, which plans.toml lacks; using the default", billable, assignment)
        self._cache[billable] = resolved
        return resolved
