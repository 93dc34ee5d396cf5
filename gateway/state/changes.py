"""update.lua's and grant.lua's protocols: operator and billing changes to one billable's state, and a
credit grant applied once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from gateway.state.fields import Subscription, ms


@dataclass(frozen=True, slots=True)
class Update:
    """One change update.lua makes; the constructors below are every change it knows."""

    op: str
    values: tuple[str | int, ...] = ()

    def argv(self) -> list[str | int]:
        return [self.op, *self.values]

    @classmethod
    def assign(cls, plan: str | None) -> Update:
        return cls("assign", (plan or "",))

    @classmethod
    def subscription(cls, subscription: Subscription | None) -> Update:
        return cls("subscription", (subscription.to_json() if subscription else "",))

    @classmethod
    def billing_period(cls, period: tuple[float, float] | None) -> Update:
        return cls("period", ("",) if period is None else (ms(period[0]), ms(period[1])))

    @classmethod
    def count(cls, limit: str, usage: int) -> Update:
        return cls("count", (limit, usage))

    @classmethod
    def overrides(cls, stored: str | None) -> Update:
        return cls("overrides", (stored or "",))

    @classmethod
    def suspend(cls, suspended: bool) -> Update:
        return cls("suspend", ("1" if suspended else "",))

    @classmethod
    def reset(cls, limit: str) -> Update:
        return cls("reset", (limit,))

    @classmethod
    def recharge(cls, enabled: bool, threshold: int | None, amount_cents: int | None) -> Update:
        return cls("recharge", ("1" if enabled else "0", "" if threshold is None else threshold,
                                "" if amount_cents is None else amount_cents))  # fmt: skip

    @classmethod
    def recharge_done(cls) -> Update:
        return cls("recharge_done")


@dataclass(frozen=True, slots=True)
class GrantArgs:
    sequence: int
    amount: int  # negative takes back
    restores: bool

    def argv(self) -> list[str | int]:
        return [self.sequence, self.amount, "1" if self.restores else "0"]


@dataclass(frozen=True, slots=True)
class GrantReply:
    status: Literal["applied", "duplicate", "gap", "missing"]  # missing: restore the billable first
    last_sequence: int
    purchased_balance: int  # purchased - debt

    @classmethod
    def parse(cls, raw: list[Any]) -> GrantReply:
        """{status, last applied, purchased - debt}."""
        return cls(raw[0], int(raw[1]), int(raw[2]))
