"""Amounts: the catalog says 29 (in the currency), Stripe says 2900 (minor units); people read "$29"."""

from __future__ import annotations

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
