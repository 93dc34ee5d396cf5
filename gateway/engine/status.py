"""The status body of DESIGN §3 from what status.lua evaluated: presentation only, every rule is Lua's."""

from __future__ import annotations

from typing import Any

from gateway import severity, state
from gateway.catalog import CREDITS, Catalog
from gateway.engine.plans import ResolvedPlan
from gateway.engine.spec import shown_rates
from gateway.invoice import invoice
from gateway.money import billed, metered


def status_body(catalog: Catalog, billable: str, resolved: ResolvedPlan, reply: state.StatusReply) -> dict[str, Any]:
    """The body of what status.lua evaluated: only presentation here, every rule is the script's."""
    plan = resolved.terms or catalog.plans[resolved.name]  # the effective terms, overrides in place
    limits: dict[str, Any] = {}
    for found in reply.limits:
        limit = plan.limits.get(found.name) or catalog.limit_kinds[found.name]
        to = None if plan.is_unlimited(found.name) else limit.to
        usage, window = found.usage, found.window_ms
        grace_ends_at = state.iso(found.grace_ends_ms / 1000) if found.grace_ends_ms is not None else None
        level = severity.limit_severity(usage, to, found.grace_active, limit.warn_at)
        limits[found.name] = {
            "usage": usage,
            "limit": to,
            "remaining": None if to is None else max(0, to - usage),
            "percent_used": None if not to else round(100 * usage / to, 2),
            "grace_active": found.grace_active,
            "grace_ends_at": grace_ends_at,
            "blocked": found.blocked,
            "per": limit.per,
            "window_start": state.iso(window[0] / 1000) if window else None,
            "window_end": state.iso(window[1] / 1000) if window else None,
            "after_limit": limit.after_limit,
            "severity": level,
            "severity_level": severity.level(level),
            "message": severity.limit_message(found.name, level, usage, to, grace_ends_at),
        }
        if limit.overage is not None:
            spent = limits[found.name]["billed"] = billed(limit.overage, found.billed or 0, catalog.settings.currency)
            level = severity.spend_severity(spent["units"], limit.overage.max_units, limit.warn_at)
            limits[found.name].update(severity=level, severity_level=severity.level(level),
                                      message=severity.spend_message(found.name, level, spent))  # fmt: skip
    rates = {
        found.name: {"limit": rate.burst, "remaining": found.remaining, "reset": state.iso(found.reset_ms / 1000)}
        for rate, found in zip(shown_rates(catalog, plan), reply.rates, strict=True)
    }
    left = reply.period_left
    balance = None if left is None else left + reply.purchased - reply.debt
    allowance = 0 if plan.is_unlimited(CREDITS) else (plan.credits or 0)
    credit_level = severity.credits_severity(balance, allowance, reply.purchased, reply.debt)
    credits = {
        "balance": balance,
        "period": left,
        "purchased": reply.purchased,
        "held": reply.held,
        "debt": reply.debt,
        "period_ends_at": None if left is None else state.iso(reply.credits_end_ms / 1000),
        "severity": credit_level,
        "severity_level": severity.level(credit_level),
        "message": severity.credits_message(credit_level, balance),
    }
    payg = {}
    for found_meter in reply.payg:
        price, operations = catalog.payg_meters[found_meter.meter]
        start, end = found_meter.window_ms
        payg[found_meter.meter] = {**metered(price, found_meter.units, catalog.settings.currency), "operations": list(operations),
                                   "window_start": state.iso(start / 1000), "window_end": state.iso(end / 1000)}  # fmt: skip
    body = {
        "billable": billable,
        "plan": resolved.name,
        "plan_source": resolved.source,
        "features": sorted(plan.allows),
        "limits": limits,
        "credits": credits,
        "rate_limits": rates,
        "overrides": resolved.overrides.shown() if resolved.overrides is not None else None,
        "suspended": resolved.suspended,
        "overall": severity.overall(catalog, resolved.name, limits, credits),
        "pay_as_you_go": payg,
    }
    body["invoice"] = invoice(catalog, body)
    return body
