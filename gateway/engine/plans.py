"""Plan resolution: manual assignment → subscription (past_due within its grace) → the default plan, with
the billable's overrides on top and its suspension, and this process's cache of it (stale as soon as the
state's plan version moves: decide.lua says so, with everything resolution reads)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import ValidationError

from gateway.catalog import Catalog, Plan
from gateway.overrides import Overrides
from gateway.state import Subscription

log = logging.getLogger("gateway.engine")

PlanSource = Literal["assignment", "subscription", "default"]
ACTIVE_STATUSES = frozenset({"active", "trialing"})
_NEVER = float("inf")
_KEPT = 4096  # distinct overrides parsed at most, before the caches start again
BILLABLES_KEPT = 100_000  # billables whose plan this process remembers; past it the oldest is resolved again


@dataclass(frozen=True, slots=True)
class ResolvedPlan:
    name: str
    source: PlanSource
    version: int
    expires_at: float = float("inf")
    overrides: Overrides | None = None  # as stored, in force or expired
    terms: Plan | None = None  # the effective plan when overrides are in force, else None (the catalog's)
    suspended: bool = False

    @property
    def digest(self) -> str:
        """Names the effective terms in the compile caches ("" for the catalog's plan)."""
        return self.overrides.digest if self.overrides is not None and self.terms is not None else ""


class Plans:
    def __init__(self, catalog: Catalog, clock: Callable[[], float]) -> None:
        self.catalog = catalog
        self.clock = clock
        self._cache: dict[str, ResolvedPlan] = {}
        # Overrides as stored → parsed, and (plan, digest) → effective plan: shared by every billable alike.
        self._parsed: dict[str, Overrides | None] = {}
        self._terms: dict[tuple[str, str], Plan] = {}

    def cached(self, billable: str) -> ResolvedPlan | None:
        resolved = self._cache.get(billable)
        if resolved is None or (resolved.expires_at != _NEVER and resolved.expires_at <= self.clock()):
            return None
        return resolved

    def forget(self, billable: str) -> None:
        self._cache.pop(billable, None)

    def resolve(
        self,
        billable: str,
        version: int,
        assignment: str | None,
        sub: Subscription | None,
        overrides: str | None = None,
        suspended: bool = False,
    ) -> ResolvedPlan:
        """Manual assignment → active subscription (past_due within the grace) → default plan; then the
        overrides on top until they expire (the cached resolution expires with them: no write needed)."""
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
        resolved = self._with_terms(billable, resolved, overrides, suspended)
        cache = self._cache
        if len(cache) >= BILLABLES_KEPT and billable not in cache:
            # The first one in: a forgotten plan costs one stale answer from decide.lua, never a wrong one.
            del cache[next(iter(cache))]
        cache[billable] = resolved
        return resolved

    def _with_terms(self, billable: str, resolved: ResolvedPlan, text: str | None, suspended: bool) -> ResolvedPlan:
        terms = self._parse(billable, text) if text else None
        if terms is None:
            return ResolvedPlan(resolved.name, resolved.source, resolved.version, resolved.expires_at, suspended=suspended)
        ends = terms.expires()
        if ends <= self.clock():
            return ResolvedPlan(resolved.name, resolved.source, resolved.version, resolved.expires_at, terms, suspended=suspended)
        key = (resolved.name, terms.digest)
        effective = self._terms.get(key)
        if effective is None:
            effective = self._terms[key] = terms.apply(self.catalog.plans[resolved.name], self.catalog)
        return ResolvedPlan(resolved.name, resolved.source, resolved.version, min(resolved.expires_at, ends), terms, effective, suspended)

    def _parse(self, billable: str, text: str) -> Overrides | None:
        if text not in self._parsed:
            if len(self._parsed) > _KEPT:
                self._parsed.clear()
                self._terms.clear()
            try:
                self._parsed[text] = Overrides.from_json(text)
            except ValidationError as exc:
                log.warning("billable %r has overrides this gateway cannot read (%s); using its plan", billable, exc)
                self._parsed[text] = None
        return self._parsed[text]
