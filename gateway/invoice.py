"""The invoice so far: a billable's period as the lines Stripe will invoice (plan price, overage per meter, pay-as-you-go),
with Decimal amounts in the catalog's currency, from its status (every count is the script's).

`GET /_gateway/admin/billables/{billable}/invoice-preview` answers it; `total` is the sum of the lines,
each rounded to the currency's minor unit as an invoice shows it."""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal
from typing import Any

from gateway.catalog import Catalog
from gateway.money import rounded
from gateway.state import iso


def invoice_preview(catalog: Catalog, status: dict[str, Any], counters: Iterable[tuple[str, int, int]] = ()) -> dict[str, Any]:
    """The lines of `status` (plan price, overage) and of the pay-as-you-go `counters` (state.billed_counters:
    meter, window start in ms, units; the latest window of each meter is this month's)."""
    currency = catalog.settings.currency
    plan = catalog.plans.get(status["plan"])
    lines: list[dict[str, Any]] = []
    if plan is not None and plan.price is not None:
        price = Decimal(str(plan.price))  # the catalog's price is a float: 29.0 is shown as 29
        price = price.quantize(Decimal(1)) if price == price.to_integral_value() else price.normalize()
        lines.append({"kind": "plan", "description": f"{catalog.plan_title(status['plan'])} plan", "quantity": 1,
                      "unit_price": str(price), "amount": str(rounded(price, currency))})  # fmt: skip
    for name, limit in status["limits"].items():
        billed = limit.get("billed")
        if billed is None:
            continue
        amount = Decimal(billed["amount"])
        lines.append({
            "kind": "overage", "description": f"{name} over {limit['limit']} per {limit['per']} ({billed['meter']})",
            "limit": name, "meter": billed["meter"], "quantity": billed["units"], "unit_price": billed["unit_price"],
            "amount": str(rounded(amount, currency)), "cap": billed["cap"], "cap_reached": billed["cap_reached"],
            "period_start": limit["window_start"], "period_end": limit["window_end"],
        })  # fmt: skip
    latest: dict[str, tuple[int, int]] = {}
    for meter, window, units in counters:
        if meter not in latest or window > latest[meter][0]:
            latest[meter] = (window, units)
    for name, operation in sorted(catalog.operations.items()):
        if operation.payg is None or operation.payg.meter not in latest:
            continue
        units = latest[operation.payg.meter][1]
        lines.append({
            "kind": "pay_as_you_go", "description": f"{name} ({operation.payg.meter})", "operation": name,
            "meter": operation.payg.meter, "quantity": units, "unit_price": str(operation.payg.unit_price),
            "amount": str(rounded(units * operation.payg.unit_price, currency)),
            "period_start": iso(latest[operation.payg.meter][0] / 1000),
        })  # fmt: skip
    total = sum((Decimal(line["amount"]) for line in lines), Decimal(0))
    return {"billable": status["billable"], "plan": status["plan"], "currency": currency, "lines": lines, "total": str(rounded(total, currency))}
