"""settle.lua's protocol: settling a hold, releasing a persistent cap, and the reply of both."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from gateway.state.hold import Hold


@dataclass(frozen=True, slots=True)
class SettleArgs:
    hold: Hold
    give_back_limits: bool
    credits_owed: int | None  # None keeps what was held
    plan: str  # for the events
    units: int | None  # what the answer reported, for the usage history
    restores: bool

    def argv(self) -> list[str | int]:
        return [
            "settle",
            "back" if self.give_back_limits else "keep",
            "" if self.credits_owed is None else self.credits_owed,
            self.plan,
            "" if self.units is None else self.units,
            "1" if self.restores else "0",
            *self.hold.argv(),
        ]


@dataclass(frozen=True, slots=True)
class ReleaseArgs:
    limit: str
    units: int
    cap: int | None
    plan: str
    restores: bool

    def argv(self) -> list[str | int]:
        return ["release", self.limit, self.units, "" if self.cap is None else self.cap, self.plan, "1" if self.restores else "0"]


@dataclass(frozen=True, slots=True)
class SettleReply:
    status: Literal["ok", "settled", "missing"]  # settled: settled before, nothing changed
    balance: int | None

    @classmethod
    def parse(cls, raw: list[Any]) -> SettleReply:
        """{status, balance or nil}."""
        return cls(raw[0], None if len(raw) < 2 or raw[1] is None else int(raw[1]))
