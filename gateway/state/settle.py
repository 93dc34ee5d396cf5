"""settle.lua's protocol: settling a hold, releasing a persistent cap, closing a check's hold (both in one
call), and their replies."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from gateway.state.decide import Stale
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
class CloseArgs:
    """A consuming check's stored hold, settled as `settled_as` ("<route>|<operation>", what its usage key
    ends with) and, when `release` names a cap, that cap given back too: one call."""

    hold_id: str
    settled_as: str
    give_back_limits: bool
    credits_owed: int | None  # None keeps what was held
    units: int | None
    plan: str
    plan_version: int
    release: ReleaseArgs | None
    status_spec: str  # the plan's status spec (its credits), for the balance
    calendar: str
    restores: bool
    members: tuple[str, ...] = ()  # the member levels it is settled at, nearest first (their keys follow the third)

    def argv(self) -> list[str | int]:
        release = self.release
        return [
            "close",
            "back" if self.give_back_limits else "keep",
            "" if self.credits_owed is None else self.credits_owed,
            self.plan,
            "" if self.units is None else self.units,
            "1" if self.restores else "0",
            self.hold_id,
            self.settled_as,
            self.plan_version,
            "" if release is None else release.limit,
            0 if release is None else release.units,
            "" if release is None or release.cap is None else release.cap,
            self.status_spec,
            self.calendar,
            json.dumps(self.members) if self.members else "",
        ]


@dataclass(frozen=True, slots=True)
class CloseReply:
    """status "ok" (balance: status's, None when the credits are unlimited), "settled" (settled before or
    past its lifetime: nothing changed), "missing" (Redis lost the state), "mismatch" (the hold was taken
    for another route or operation: nothing changed), "read" (it was held at other member levels than the
    ones named, the chain changed since: settle it with SettleArgs, nothing changed); or Stale."""

    status: Literal["ok", "settled", "missing", "mismatch", "read"]
    balance: int | None

    @classmethod
    def parse(cls, raw: list[Any]) -> CloseReply | Stale:
        if raw[0] == "stale":
            return Stale.parse(raw)
        return cls(raw[0], None if len(raw) < 2 or raw[1] is None else int(raw[1]))


@dataclass(frozen=True, slots=True)
class SettleReply:
    status: Literal["ok", "settled", "missing"]  # settled: settled before, nothing changed
    balance: int | None

    @classmethod
    def parse(cls, raw: list[Any]) -> SettleReply:
        """{status, balance or nil}."""
        return cls(raw[0], None if len(raw) < 2 or raw[1] is None else int(raw[1]))
