"""Compiling a plan and a route into what the scripts need, once per (plan, route), and the cache of it."""

from __future__ import annotations

from dataclasses import dataclass

from gateway import state
from gateway.catalog import CREDITS, Catalog, Limit, Plan, RateLimit, Route
from gateway.decision import Violation
from gateway.periods import Period

_KEPT = 65536  # compiled specs at most (distinct overrides × routes), before the cache starts again


def period_code(period: Period) -> str:
    """How a window is named to the scripts: m, w, d, bc, or s<seconds>."""
    if period.kind == "duration":
        return f"s{period.seconds}"
    return {"month": "m", "week": "w", "day": "d", "billing_cycle": "bc"}[period.kind]


@dataclass(frozen=True, slots=True)
class Compiled:
    spec: str  # state.Spec, encoded
    denied: tuple[Violation, ...]  # the route's features the plan lacks
    metered: bool
    rates: tuple[RateLimit, ...]  # the plan's and the route's rate limits
    shadow: bool = False  # enforce = "shadow": `denied` and the script's violations are reported, not enforced


class Specs:
    """The compiled specs of the catalog's plans, by (plan, overrides digest, route) for decide and by (plan,
    digest) for the status: `terms` is the effective plan of overrides named by `digest` ("" for none)."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._routes: dict[tuple[str, str, int], Compiled] = {}
        self._status: dict[tuple[str, str], str] = {}

    def route(self, plan_name: str, route: Route | None, terms: Plan | None = None, digest: str = "") -> Compiled:
        if route is not None and route.index < 0:
            # A check's own route (gateway/check.py: a feature, a limit or an operation asked about alone):
            # compiled per call, so that any `by` a caller sends leaves nothing cached.
            return compile_spec(self.catalog, terms or self.catalog.plans[plan_name], route)
        key = (plan_name, digest, route.index if route else -1)
        found = self._routes.get(key)
        if found is None:
            found = compile_spec(self.catalog, terms or self.catalog.plans[plan_name], route)
            # A request in flight across a catalog swap brings a route of the old catalog: never cached here.
            routes = self.catalog.routes
            if route is None or (route.index < len(routes) and routes[route.index] is route):
                if len(self._routes) > _KEPT:
                    self._routes.clear()
                self._routes[key] = found
        return found

    def status(self, plan_name: str, terms: Plan | None = None, digest: str = "") -> str:
        key = (plan_name, digest)
        found = self._status.get(key)
        if found is None:
            if len(self._status) > _KEPT:
                self._status.clear()
            found = self._status[key] = status_spec(self.catalog, terms or self.catalog.plans[plan_name]).encode()
        return found


def compile_spec(catalog: Catalog, plan: Plan, route: Route | None) -> Compiled:
    """Everything decide.lua needs for this plan and route, encoded once.

    `plan` is the effective plan: a per-billable override is compiled the same way."""
    denied: list[Violation] = []
    shadow = catalog.enforcement(plan, route) == "shadow"
    # A check's own route (negative index) asks about the plan's terms, not the request's pace: no plan rate.
    plan_rate = plan.rate if route is None or route.index >= 0 else None
    rates = [r for r in (plan_rate, route.rate if route else None) if r is not None]
    limits: list[state.LimitSpec] = []
    metered = False
    cost = 0
    payg: tuple[str, int] | None = None
    if route is not None:
        config = route.config
        denied += [Violation(f, "feature") for f in config.features if not plan.allows_feature(f)]
        if config.limit is not None:
            limit = plan.limits.get(config.limit)
            unlimited = plan.is_unlimited(config.limit)
            if limit is None and not unlimited:
                denied.append(Violation(config.limit, "feature"))
            else:
                limits.append(limit_spec(config.limit, limit or catalog.limit_kinds[config.limit], config.cost, unlimited))
        if config.spend is not None:
            operation = catalog.operations[config.spend]
            metered = operation.metered
            cost = operation.hold if operation.per_unit is not None else (operation.cost or 0)
            if operation.payg is not None:
                payg = (operation.payg.meter, 0 if operation.metered else 1)
    spec = state.Spec(
        rates=tuple(state.RateSpec(r.name, r.per_seconds * 1000 / r.limit, r.burst, r.window) for r in rates),
        limits=tuple(limits),
        credits=state.CreditSpec(
            allowance=-1 if plan.is_unlimited(CREDITS) else (plan.credits or 0),
            period=period_code(plan.credit_period),
            rollover=plan.rollover,
            cost=cost,
            shown=route is not None and route.config.spend is not None,
        ),
        recharges_per_month=catalog.settings.auto_recharge_max_per_month,
        shadow=shadow,
        payg=payg,
    )
    return Compiled(spec.encode(), tuple(denied), metered, tuple(rates), shadow)



def limit_spec(name: str, limit: Limit, cost: int, unlimited: bool) -> state.LimitSpec:
    period = limit.period
    return state.LimitSpec(
        name=name,
        to=-1 if unlimited else limit.to,
        cost=cost,
        period=period_code(period) if period else "",
        after=limit.after_limit,
        grace_ms=limit.grace_seconds * 1000,
        grace_max=-1 if limit.grace_max is None else limit.grace_max,
        warn_at=tuple(limit.warn_at),
        window=period.nominal_seconds if period is not None else None,
        overage=(limit.overage.meter, limit.overage.max_units) if limit.overage is not None else None,
    )


def status_spec(catalog: Catalog, plan: Plan) -> state.StatusSpec:
    limits = []
    for name in [*plan.limits, *(n for n in plan.unlimited if n != CREDITS and n not in plan.limits)]:
        limit = plan.limits.get(name) or catalog.limit_kinds[name]
        limits.append(
            state.StatusLimit(
                name=name,
                to=-1 if plan.is_unlimited(name) else limit.to,
                period=period_code(limit.period) if limit.period is not None else "",
                after=limit.after_limit,
                grace_ms=limit.grace_seconds * 1000,
                overage=(limit.overage.meter, limit.overage.max_units) if limit.overage is not None else None,
            )
        )
    rates = shown_rates(catalog, plan)
    return state.StatusSpec(
        limits=tuple(limits),
        rates=tuple((r.name, r.per_seconds * 1000 / r.limit, r.burst) for r in rates),
        credit_allowance=-1 if plan.is_unlimited(CREDITS) else (plan.credits or 0),
        credit_period=period_code(plan.credit_period),
        rollover=plan.rollover,
        payg=tuple(catalog.payg_meters),
    )


def shown_rates(catalog: Catalog, plan: Plan) -> list[RateLimit]:
    """The rate limits a status shows: the plan's and every route's."""
    return [r for r in [plan.rate, *(route.rate for route in catalog.routes)] if r is not None]
