"""The status body of DESIGN §3 from what status.lua evaluated: presentation only, every rule is Lua's."""

from __future__ import annotations

from typing import Any

from gateway import state
from gateway.catalog import Catalog
from gateway.engine.plans import ResolvedPlan
from gateway.engine.spec import shown_rates


def status_body(catalog: Catalog, billable: str, resolved: ResolvedPlan, reply: state.StatusReply) -> dict[str, Any]:
    """The body of what status.lua evaluated: only presentation here, every rule is the script's."""
    plan = resolved.terms or catalog.plans[resolved.name]  # the effective terms, overrides in place
    limits: dict[str, Any] = {}
    for found in reply.limits:
        limit = plan.limits.get(found.name) or catalog.limit_kinds[found.name]
        to = None if plan.is_unlimited(found.name) else limit.to
        usage, window = found.usage, found.window_ms
        limits[found.name] = {
            "usage": usage,
            "limit": to,
            "remaining": None if to is None else max(0, to - usage),
            "percent_used": None if not to else round(100 * usage / to, 2),
            "grace_active": found.grace_active,
            "grace_ends_at": state.iso(found.grace_ends_ms / 1000) if found.grace_ends_ms is not None else None,
            "blocked": found.blocked,
            "per": limit.per,
            "window_start": state.iso(window[0] / 1000) if window else None,
            "window_end": state.iso(window[1] / 1000) if window else None,
            "after_limit": limit.after_limit,
        }
    rates = {
        found.name: {"limit": rate.burst, "remaining": found.remaining, "reset": state.iso(found.reset_ms / 1000)}
        for rate, found in zip(shown_rates(catalog, plan), reply.rates, strict=True)
    }
    left = reply.period_left
    return {
        "billable": billable,
        "plan": resolved.name,
        "plan_source": resolved.source,
        "features": sorted(plan.allows),
        "limits": limits,
        "credits": {
            "balance": None if left is None else left + reply.purchased - reply.debt,
            "period": left,
            "purchased": reply.purchased,
            "held": reply.held,
            "debt": reply.debt,
        },
        "rate_limits": rates,
        "overrides": resolved.overrides.shown() if resolved.overrides is not None else None,
        "suspended": resolved.suspended,
    }
