"""Money the gateway bills (overage, pay-as-you-go): exact decimals, never floats.

The catalog writes them as decimal strings ("0.002") in its currency; the scripts count whole units, and
an amount is units × unit price, rounded to the currency's minor unit only where a line is shown.
(gateway/billing/money.py converts the catalog's plan prices to Stripe's minor units.)"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BeforeValidator

if TYPE_CHECKING:
    from gateway.catalog import Overage

MAX_PRICE = Decimal(1_000_000_000)


def _price(value: Any) -> Decimal:
    if isinstance(value, Decimal):
        return value
    if not isinstance(value, str):
        raise ValueError(f'write money as a decimal string, such as "0.002" (not {value!r}): a float cannot hold every price exactly')  # noqa: TRY004 (pydantic reports ValueError)
    try:
        amount = Decimal(value.strip())
    except InvalidOperation:
        raise ValueError(f'{value[:40]!r} is not a decimal amount: write it as "0.002"') from None
    if not amount.is_finite() or not 0 < amount <= MAX_PRICE:
        raise ValueError(f"{value[:40]!r} is not an amount above 0 and at most {MAX_PRICE}")
    return amount


# An amount of money in the catalog's currency, written as a decimal string ("0.002").
Price = Annotated[Decimal, BeforeValidator(_price)]


def units_within(amount: Decimal, unit_price: Decimal) -> int:
    """The whole units `amount` pays for at `unit_price` (a spend cap as units: the script counts units)."""
    return int(amount // unit_price)


def rounded(amount: Decimal, currency: str) -> Decimal:
    """`amount` rounded (half up) to the currency's minor unit, as an invoice line shows it."""
    # Imported here: gateway.billing imports the catalog, which imports this module.
    from gateway.billing.money import ZERO_DECIMAL

    step = Decimal(1) if currency.lower() in ZERO_DECIMAL else Decimal("0.01")
    return amount.quantize(step, rounding=ROUND_HALF_UP)


def billed(overage: Overage, units: int, currency: str) -> dict[str, Any]:
    """A billed limit's period so far, as the status and the usage page show it (money as decimal strings)."""
    cap = overage.max_per_period
    return {
        "meter": overage.meter,
        "units": units,
        "unit_price": str(overage.unit_price),
        "amount": str(units * overage.unit_price),
        "currency": currency,
        "cap": None if cap is None else str(cap),
        "cap_units": None if cap is None else overage.max_units,
        "cap_reached": cap is not None and units >= overage.max_units,
    }
