"""The invoice so far: a billable's period as the lines Stripe will invoice (plan price, overage per meter, pay-as-you-go
per meter), with Decimal amounts in the catalog's currency, from its status (every count is the script's).

The status carries it as `invoice` (so `/_gateway/usage` and the account page show the amount so far);
`GET /_gateway/admin/billables/{billable}/invoice-preview` answers it alone. `total` is the sum of the lines,
each rounded to the currency's minor unit as an invoice shows it."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from gateway.catalog import Catalog
from gateway.money import rounded


def invoice(catalog: Catalog, status: dict[str, Any]) -> dict[str, Any]:
    """The lines of `status`: its plan's price, each billed limit's overage and each pay-as-you-go meter."""
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
        lines.append({
            "kind": "overage", "description": f"{name} over {limit['limit']} per {limit['per']} ({billed['meter']})",
            "limit": name, "meter": billed["meter"], "quantity": billed["units"], "unit_price": billed["unit_price"],
            "amount": str(rounded(Decimal(billed["amount"]), currency)), "cap": billed["cap"], "cap_left": billed["cap_left"],
            "cap_reached": billed["cap_reached"], "period_start": limit["window_start"], "period_end": limit["window_end"],
        })  # fmt: skip
    for meter, used in status["pay_as_you_go"].items():
        lines.append({
            "kind": "pay_as_you_go", "description": f"{', '.join(used['operations'])} ({meter})", "operations": used["operations"],
            "meter": meter, "quantity": used["units"], "unit_price": used["unit_price"],
            "amount": str(rounded(Decimal(used["amount"]), currency)),
            "period_start": used["window_start"], "period_end": used["window_end"],
        })  # fmt: skip
    total = sum((Decimal(line["amount"]) for line in lines), Decimal(0))
    return {"currency": currency, "lines": lines, "total": str(rounded(total, currency))}
