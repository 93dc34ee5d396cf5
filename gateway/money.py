"""Money, exactly: the catalog's plan prices against Stripe's minor units (29 in the currency is 2900; people
read "$29"), and what the gateway bills (overage, pay-as-you-go) as exact decimals, never floats: the
catalog writes them as decimal strings ("0.002"), the scripts count whole units, and an amount is units ×
unit price, rounded to the currency's minor unit only where a line is shown."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BeforeValidator

if TYPE_CHECKING:
    from gateway.catalog import Overage

# Stripe's zero-decimal currencies: their amounts are already whole units.
ZERO_DECIMAL = frozenset(
    {"bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv", "xaf", "xof", "xpf"}
)
SYMBOLS = {"usd": "$", "eur": "€", "gbp": "£", "jpy": "¥", "cad": "CA$", "aud": "A$", "inr": "₹"}


def to_minor(amount: float, currency: str) -> int:
    return round(amount) if currency.lower() in ZERO_DECIMAL else round(amount * 100)


def from_minor(amount: int, currency: str) -> float:
    return float(amount) if currency.lower() in ZERO_DECIMAL else amount / 100


def show(amount: int, currency: str) -> str:
    """A readable price from minor units: $29, $9.50, 1,000 ¥, 12 CHF."""
    value = from_minor(amount, currency)
    text = f"{value:,.0f}" if value == int(value) else f"{value:,.2f}"
    symbol = SYMBOLS.get(currency.lower())
    if symbol is None:
        return f"{text} {currency.upper()}"
    return f"{text} {symbol}" if currency.lower() == "jpy" else f"{symbol}{text}"


def credits_for(amount_cents: int, credits_per_dollar: int) -> int:
    """Credits an amount buys at the catalog's rate (auto-recharge, packs without their own rate)."""
    return amount_cents * credits_per_dollar // 100

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
    step = Decimal(1) if currency.lower() in ZERO_DECIMAL else Decimal("0.01")
    return amount.quantize(step, rounding=ROUND_HALF_UP)


def billed(overage: Overage, units: int, currency: str) -> dict[str, Any]:
    """A billed limit's period so far, as the status and the usage page show it (money as decimal strings):
    `cap_left` is what the spend cap leaves to spend, `cap_units_left` the units it still bills."""
    cap = overage.max_per_period
    amount = units * overage.unit_price
    return {
        "meter": overage.meter,
        "units": units,
        "unit_price": str(overage.unit_price),
        "amount": str(amount),
        "currency": currency,
        "cap": None if cap is None else str(cap),
        "cap_units": None if cap is None else overage.max_units,
        "cap_reached": cap is not None and units >= overage.max_units,
        "cap_left": None if cap is None else str(max(cap - amount, Decimal(0))),
        "cap_units_left": None if cap is None else max(0, overage.max_units - units),
    }


def metered(unit_price: Decimal, units: int, currency: str) -> dict[str, Any]:
    """A pay-as-you-go meter's units this month and what they cost so far (no cap: every unit is billed)."""
    return {"units": units, "unit_price": str(unit_price), "amount": str(units * unit_price), "currency": currency}
