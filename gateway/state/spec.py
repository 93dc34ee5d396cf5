"""The spec: what decide.lua needs of one plan and route, typed here and encoded once per (plan, route)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

After = Literal["block_usage", "just_warn", "grace_then_block", "bill"]
AFTER_CODES: dict[str, str] = {"block_usage": "b", "just_warn": "w", "grace_then_block": "g", "bill": "o"}


@dataclass(frozen=True, slots=True)
class RateSpec:
    name: str
    interval_ms: float  # one request's share of the period
    burst: int
    window: int  # the policy's window (s), for the headers


@dataclass(frozen=True, slots=True)
class LimitSpec:
    name: str
    to: int  # -1: unlimited
    cost: int
    period: str  # a period code (gateway.periods), "" for a persistent cap
    after: After
    grace_ms: int
    grace_max: int  # -1: no maximum
    warn_at: tuple[float, ...]
    window: int | None  # the period's nominal length (s), for the headers
    overage: tuple[str, int] | None = None  # after = "bill": its meter and the units its spend cap allows (-1: none)


@dataclass(frozen=True, slots=True)
class CreditSpec:
    allowance: int  # -1: unlimited
    period: str
    rollover: bool
    cost: int
    shown: bool  # the route spends: the balance is shown even when it is 0


@dataclass(frozen=True, slots=True)
class Spec:
    rates: tuple[RateSpec, ...]
    limits: tuple[LimitSpec, ...]
    credits: CreditSpec
    recharges_per_month: int
    shadow: bool = False  # enforce = "shadow": a would-be denial is admitted, charged and reported
    # Pay-as-you-go: the operation's meter, and 1 when a request is one unit billed at once (0: its answer's
    # units are billed at the settle).
    payg: tuple[str, int] | None = None

    def encode(self) -> str:
        """The JSON array decide.lua reads by position (lib/spec.lua); it names the state fields itself."""
        c = self.credits
        limits = [
            [lim.name, lim.to, lim.cost, lim.period, AFTER_CODES[lim.after], lim.grace_ms, lim.grace_max,
             False if lim.window is None else lim.window, False if lim.overage is None else list(lim.overage), list(lim.warn_at)]
            for lim in self.limits
        ]  # fmt: skip
        spec = [
            self.shadow,
            self.recharges_per_month,
            [c.allowance, c.period, c.rollover, c.cost, c.shown],
            False if self.payg is None else [self.payg[0], self.payg[1] == 1],
            [[r.name, r.interval_ms, r.burst, r.window] for r in self.rates],
            limits,
        ]
        return json.dumps(spec, separators=(",", ":"))
