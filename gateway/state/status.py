"""status.lua's protocol: a plan's whole StatusSpec in, a StatusReply out (read only, by decide.lua's rules)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from gateway.state.decide import Missing, Stale
from gateway.state.spec import AFTER_CODES, After


@dataclass(frozen=True, slots=True)
class StatusLimit:
    name: str
    to: int  # -1: unlimited
    period: str  # a period code, "" for a persistent cap
    after: After
    grace_ms: int
    overage: tuple[str, int] | None = None  # after = "bill": its meter and spend cap in units (-1: none)

    def encoded(self) -> list[object]:
        item: list[object] = [self.name, self.to, self.period, AFTER_CODES[self.after], self.grace_ms]
        return item + list(self.overage) if self.overage is not None else item


@dataclass(frozen=True, slots=True)
class StatusSpec:
    limits: tuple[StatusLimit, ...]
    rates: tuple[tuple[str, float, int], ...]  # name, interval (ms), burst
    credit_allowance: int  # -1: unlimited
    credit_period: str
    rollover: bool
    payg: tuple[str, ...] = ()  # the pay-as-you-go meters: their units this month are shown

    def encode(self) -> str:
        return json.dumps(
            {
                "l": [lim.encoded() for lim in self.limits],
                "r": [list(r) for r in self.rates],
                "cr": {"a": self.credit_allowance, "p": self.credit_period, "ro": int(self.rollover)},
                "pg": list(self.payg),
            },
            separators=(",", ":"),
        )


@dataclass(frozen=True, slots=True)
class StatusArgs:
    spec: str  # StatusSpec.encode(), cached per plan
    plan_version: int
    calendar: str
    restores: bool

    def argv(self) -> list[str | int]:
        return [self.spec, self.plan_version, self.calendar, "1" if self.restores else "0"]


@dataclass(frozen=True, slots=True)
class LimitStatus:
    name: str
    usage: int
    window_ms: tuple[int, int] | None
    grace_ends_ms: int | None
    grace_active: bool
    blocked: bool
    billed: int | None = None  # after_limit = "bill": the units billed in this window


@dataclass(frozen=True, slots=True)
class RateStatus:
    name: str
    remaining: int
    reset_ms: int


@dataclass(frozen=True, slots=True)
class MeterStatus:
    meter: str
    units: int  # billed on the meter this month (pay-as-you-go), as decide.lua and settle.lua count them
    window_ms: tuple[int, int]


@dataclass(frozen=True, slots=True)
class StatusReply:
    now_ms: int
    limits: list[LimitStatus]
    period_left: int | None  # None: unlimited
    purchased: int
    debt: int
    held: int
    rates: list[RateStatus]
    credits_end_ms: int  # when the credit period ends: its allowance renews (rolls over, with rollover)
    payg: list[MeterStatus]

    @staticmethod
    def parse(raw: list[Any]) -> StatusReply | Stale | Missing:
        """By position: {now, limits, credits {period left, purchased, debt, held, period end}, rates,
        pay-as-you-go meters {meter, units, window start, window end}}."""
        if raw[0] == "stale":
            return Stale.parse(raw)
        if raw[0] == "missing":
            return Missing()
        now, limits, credits, rates, payg = raw
        return StatusReply(
            now_ms=int(now),
            limits=[
                LimitStatus(n, int(u), None if ws is None else (int(ws), int(we)), None if g is None else int(g), bool(a), bool(b),
                            None if len(more) == 0 or more[0] is None else int(more[0]))
                for n, u, ws, we, g, a, b, *more in limits
            ],
            period_left=None if credits[0] is None else int(credits[0]),
            purchased=int(credits[1]),
            debt=int(credits[2]),
            held=int(credits[3]),
            rates=[RateStatus(n, int(r), int(t)) for n, r, t in rates],
            credits_end_ms=int(credits[4]),
            payg=[MeterStatus(m, int(u), (int(ws), int(we))) for m, u, ws, we in payg],
        )
