"""Usage history: per period, route and operation, from the record's `usage_totals` (never a second counter).

The decision and settle scripts count admitted requests, units and credits into the billable's own state,
per `<YYYY-MM>|<route>|<operation>` (gateway.state.fields). The reconciler writes those absolute values to
`usage_totals`; this module turns a state into rows and the record back into an answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Any

import sqlalchemy as sa

from gateway.state import usage_counters
from gateway.store.db import Database, usage_daily, usage_totals

PERIOD = re.compile(r"^\d{4}-(0[1-9]|1[0-2])$")
COLUMNS = ("requests", "units", "credits", "amount_cents", "shadow_denials")
DAILY = ("requests", "units", "credits")  # what usage_daily keeps of each total's increase
# The terminal's name of a column, where its JSON key would not say it to an operator.
_HEADINGS = {"shadow_denials": "would have been denied"}


@dataclass(frozen=True, slots=True)
class UsageRow:
    period: str
    route: str
    operation: str
    requests: int = 0
    units: int = 0
    credits: int = 0
    amount_cents: int = 0
    shadow_denials: int = 0  # admitted in shadow mode, would have been denied


def current_period(zone: tzinfo, now: float) -> str:
    """YYYY-MM of `now` in the catalog's timezone: the label the scripts count under."""
    at = datetime.fromtimestamp(now, zone)
    return f"{at.year:04d}-{at.month:02d}"


def day_of(zone: tzinfo, now: float) -> str:
    """YYYY-MM-DD of `now` in the catalog's timezone: the day a flush's increases are recorded on."""
    return datetime.fromtimestamp(now, zone).date().isoformat()


async def daily_usage(db: Database, billable: str, period: str) -> list[dict[str, Any]]:
    """A billable's daily rows of `period` (YYYY-MM): day, route, operation, requests, units, credits."""
    t = usage_daily
    async with db.engine.connect() as conn:
        found = await conn.execute(
            sa.select(t.c.day, t.c.route, t.c.operation, *(t.c[c] for c in DAILY))
            .where(t.c.billable == billable, t.c.day.startswith(f"{period}-"))
            .order_by(t.c.day, t.c.route, t.c.operation)
        )
        return [dict(r._mapping) for r in found]


def cents(credits: int, credits_per_dollar: int) -> int:
    """What `credits` cost, in whole cents (half a cent rounds up)."""
    return (credits * 100 * 2 + credits_per_dollar) // (credits_per_dollar * 2)


def rows_from_state(saved: dict[str, str], credits_per_dollar: int) -> list[UsageRow]:
    """The usage totals a billable's state holds, one row per (period, route, operation)."""
    found: dict[tuple[str, str, str], dict[str, int]] = {}
    for c in usage_counters(saved):
        found.setdefault((c.period, c.route, c.operation), {})[c.column] = c.value
    rows = []
    for (period, route, operation), values in sorted(found.items()):
        credits = values.get("credits", 0)
        rows.append(
            UsageRow(period, route, operation, values.get("requests", 0), values.get("units", 0), credits,
                     cents(credits, credits_per_dollar), values.get("shadow_denials", 0))
        )
    return rows


async def usage_report(db: Database, billable: str, period: str) -> dict[str, Any]:
    """Requests, units, credits, amount_cents and shadow_denials (admitted in shadow, would have been denied)
    per route and operation in `period`, with totals."""
    t = usage_totals
    async with db.engine.connect() as conn:
        found = (
            await conn.execute(
                sa.select(t.c.route, t.c.operation, t.c.requests, t.c.units, t.c.credits, t.c.amount_cents, t.c.shadow_denials)
                .where(t.c.billable == billable, t.c.period == period)
                .order_by(t.c.route, t.c.operation)
            )
        ).all()
    routes = [
        {"route": r.route, "operation": r.operation or None, "requests": r.requests, "units": r.units,
         "credits": r.credits, "amount_cents": r.amount_cents, "shadow_denials": r.shadow_denials}
        for r in found
    ]
    totals = {k: sum(int(r[k]) for r in routes) for k in COLUMNS}
    return {"billable": billable, "period": period, "routes": routes, "totals": totals}


def render(report: dict[str, Any]) -> str:
    """The report as a table for the terminal."""
    head = ["route", "operation", *(_HEADINGS.get(k, k) for k in COLUMNS)]
    rows = [[r["route"], r["operation"] or "-", *(str(r[k]) for k in COLUMNS)] for r in report["routes"]]
    rows.append(["total", "", *(str(report["totals"][k]) for k in COLUMNS)])
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i >= 2 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join(
        [f"{report['billable']}, {report['period']}", line(head), "  ".join("-" * w for w in widths),
         *[line(r) for r in rows]]
    )
