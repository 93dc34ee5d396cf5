"""What a status means to a customer: a severity and a sentence per limit and for the credits, and the overall.

The numbers are status.lua's (usage, limit, grace); this module only reads them, in the words of the
pricing library the gateway grew from, with its two faults fixed: a limit of 0 with usage over it is
blocked (the seed said ok), and the overall is the highest severity whatever the order of the keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

from gateway.catalog import CREDITS, Catalog
from gateway.decision import Violation, upgrade_target

Severity = Literal["ok", "warning", "at_limit", "grace", "blocked"]
LEVELS: tuple[Severity, ...] = ("ok", "warning", "at_limit", "grace", "blocked")  # index = level, 0 to 4
TITLES: dict[Severity, str] = {
    "ok": "All good",
    "warning": "Approaching plan limit",
    "at_limit": "At your plan limit",
    "grace": "Over limit — grace active",
    "blocked": "Plan limit reached",
}
LOW_CREDITS = 0.1  # warning at or below this share of the period's allowance plus the purchased credits
PRICING_PAGE = "/_gateway/pricing"


def level(severity: Severity) -> int:
    return LEVELS.index(severity)


def limit_severity(usage: int, to: int | None, grace_active: bool, warn_at: Sequence[float]) -> Severity:
    """Grace while grace is active; else blocked over the limit, at_limit on it; else warning at or above the
    highest threshold; an unlimited limit (`to` None) is ok. A limit of 0 not yet used is ok: the plan does
    not include it, and nothing has been refused."""
    if grace_active:
        return "grace"
    if to is None:
        return "ok"
    if usage > to:
        return "blocked"
    if usage == to:
        return "at_limit" if to > 0 else "ok"
    if warn_at and usage / to >= max(warn_at):
        return "warning"
    return "ok"


def spend_severity(billed: int, cap_units: int, warn_at: Sequence[float]) -> Severity:
    """A billed limit (after_limit = "bill") is measured by its spend cap, not by `to` (past it is billed):
    blocked at the cap, warning at or above the highest threshold of it, else ok; without a cap, ok."""
    if cap_units < 0:
        return "ok"
    if billed >= cap_units:
        return "blocked"
    if warn_at and cap_units > 0 and billed / cap_units >= max(warn_at):
        return "warning"
    return "ok"


def spend_message(name: str, severity: Severity, billed: dict[str, Any]) -> str | None:
    """The sentence of a billed limit at its severity (None when ok)."""
    cap = f"{billed['cap']} {billed['currency'].upper()}"
    if severity == "blocked":
        return (f"You've reached this period's spend cap of {cap} for {noun(name)}: further requests are refused "
                "until the period resets, or the cap is raised.")  # fmt: skip
    if severity == "warning":
        return f"You've spent {billed['amount']} of this period's spend cap of {cap} for {noun(name)}."
    return None


def credits_severity(balance: int | None, allowance: int, purchased: int, debt: int) -> Severity:
    """Unlimited (`balance` None) is ok; blocked at 0 or below (no plan allows a debt); warning at or below
    LOW_CREDITS of the period's allowance plus the purchased credits. A plan without credits, with none
    bought, is ok: it has nothing to run out of."""
    if balance is None or (allowance == 0 and purchased == 0 and debt == 0):
        return "ok"
    if balance <= 0:
        return "blocked"
    if balance <= LOW_CREDITS * (allowance + purchased):
        return "warning"
    return "ok"


def noun(name: str) -> str:
    """A limit's name as a sentence says it (custom_models: custom models)."""
    return name.replace("_", " ")


def _when(iso: str) -> str:
    at = datetime.fromisoformat(iso)
    return f"{at:%B} {at.day} at {at:%H:%M} UTC"


def limit_message(name: str, severity: Severity, usage: int, to: int | None, grace_ends_at: str | None) -> str | None:
    """The seed's sentence for one limit at its severity (None when ok)."""
    what = f"your limit for {noun(name)}" + (f" ({usage}/{to})" if to is not None else "")
    if severity == "warning":
        return f"You're getting close to {what}. Keep an eye on your usage, or upgrade your plan now to stay ahead."
    if severity == "at_limit":
        return f"You've reached {what}. Upgrade your plan to unlock more."
    if severity == "grace":
        deadline = f", and your grace period ends {_when(grace_ends_at)}" if grace_ends_at else ""
        return f"Heads up! You're currently over {what}{deadline}. Please upgrade soon to avoid any interruptions."
    if severity == "blocked":
        return f"You've gone over {what}. Please upgrade your plan."
    return None


def credits_message(severity: Severity, balance: int | None) -> str | None:
    if severity == "warning":
        return f"You're running low on credits ({balance} left). Buy credits or upgrade your plan to stay ahead."
    if severity == "blocked":
        return f"You're out of credits ({balance} left). Buy credits or upgrade your plan to continue."
    return None


def _sentence(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def overall(catalog: Catalog, plan: str, limits: dict[str, dict[str, Any]], credits: dict[str, Any]) -> dict[str, Any]:
    """The banner: the highest severity of the limits and the credits, its title, a sentence naming the keys
    at that severity, and the call to action (the plan that would take them, else the plans)."""
    items = {**limits, CREDITS: credits}
    severity: Severity = max((item["severity"] for item in items.values()), key=level, default="ok")
    keys = [name for name, item in items.items() if item["severity"] == severity] if severity != "ok" else []
    target = None
    if keys:
        violations = [
            Violation(CREDITS, "credits", cost=1) if name == CREDITS else Violation(name, "cap", usage=items[name]["usage"], cost=1)
            for name in keys
        ]
        target = upgrade_target(plan, violations, catalog)
        current, offered = catalog.plans.get(plan), catalog.plans.get(target or "")
        if current is not None and offered is not None and offered.sort_price < current.sort_price:
            target = None  # the highlighted plan, cheaper than this one: not an upgrade
    return {
        "severity": severity,
        "severity_level": level(severity),
        "title": TITLES[severity],
        "message": _overall_message(severity, [noun(k) for k in keys], items, keys),
        "keys": keys,
        "cta_text": f"Upgrade to {catalog.plan_title(target)}" if target else "View plans",
        "cta_url": catalog.settings.upgrade_url or PRICING_PAGE,
    }


def _overall_message(severity: Severity, words: list[str], items: dict[str, dict[str, Any]], keys: list[str]) -> str | None:
    if not words:
        return None
    what = "plan limit" if len(words) == 1 else "plan limits"
    listed = _sentence(words)
    if severity == "blocked":
        return f"Your {what} for {listed} {'has' if len(words) == 1 else 'have'} been exceeded. Please upgrade to continue."
    if severity == "grace":
        ends = sorted(e for k in keys if (e := items[k].get("grace_ends_at")))
        until = f", grace active until {_when(ends[0])}" if ends else ""
        return f"You are over your {what} for {listed}{until}. Please upgrade to avoid service disruption."
    if severity == "at_limit":
        return f"You have reached your {what} for {listed}."
    return f"You are approaching your {what} for {listed}."
