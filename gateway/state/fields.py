"""Every field of a billable's state hash, and its encoding; nothing outside gateway.state names one.

    pv          plan version: bumped by what decides the plan, so every process's cached plan goes stale
    asg         manual plan assignment          sub     subscription (JSON, Subscription)
    ov          per-billable overrides (JSON, gateway.overrides)   sus     suspended ("1")
    bp_s bp_e   billing period (ms)             hyd     the state is present (restored or made here)
    chg         change counter (the record's flush compares it)
    eseq        last event sequence             hx      earliest expiry among the holds (ms)
    r:<rate>    GCRA theoretical arrival time (ms)
    u:<limit>   usage   w:<limit> its window (ms)   g:<limit> grace start (ms)   b:<limit> block sent
    t:<limit>   highest warning threshold sent
    c:w c:s c:p c:d   credits: period start (ms), spent of the allowance, purchased, debt
    c:seq       last credit grant applied       c:thr   low-balance threshold
    ar:on ar:amt ar:lease ar:n ar:m   auto-recharge: enabled, amount (cents), lease, count this month, month
    qr: qu: qc: <YYYY-MM>|<route>|<operation>   usage history: admitted requests, units, credits
    qs:<YYYY-MM>|<route>|<operation>            usage history: would-be denials admitted in shadow
    mb:<member> the state hash of a member (gateway.state.keys.member_key) the decisions wrote: the record
                keeps its fields with the root's (Snapshot.members) and a restore puts them back with it
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

UsageColumn = Literal["requests", "units", "credits", "shadow_denials"]
_COUNTERS: dict[str, UsageColumn] = {"qr": "requests", "qu": "units", "qc": "credits", "qs": "shadow_denials"}


def ms(seconds: float) -> int:
    """A time as the state stores it."""
    return int(seconds * 1000)


# The fields read alone, across many billables in one pipelined round trip.
CHANGE_FIELD = "chg"
HOLD_EXPIRY_FIELD = "hx"
def counted_fields(limit: str | None) -> tuple[str, str]:
    """A member level's count and the window it was counted in (lib/members.lua): of a limit, or of the
    credits (None)."""
    return ("c:s", "c:w") if limit is None else (f"u:{limit}", f"w:{limit}")


def usage_key(month: str, route: str, operation: str) -> str:
    """What a decision counts its request, units and credits under in the usage history."""
    return f"{month}|{route}|{operation}"


@dataclass(frozen=True, slots=True)
class Subscription:
    """What billing says a billable subscribes to (set through the engine, read by plan resolution)."""

    plan: str
    status: str
    past_due_since: float | None = None  # Unix seconds of the Stripe event that reported past_due

    def to_json(self) -> str:
        return json.dumps({"plan": self.plan, "status": self.status, "past_due_since": self.past_due_since})

    @classmethod
    def from_json(cls, text: str) -> Subscription:
        raw = json.loads(text)
        return cls(raw["plan"], raw["status"], raw.get("past_due_since"))


@dataclass(frozen=True, slots=True)
class UsageCounter:
    period: str  # YYYY-MM
    route: str
    operation: str
    column: UsageColumn
    value: int


def usage_counters(state: dict[str, str]) -> Iterator[UsageCounter]:
    """The usage history a state holds."""
    for field, value in state.items():
        if (column := _COUNTERS.get(field[:2])) is None or field[2:3] != ":":
            continue
        period, _, rest = field[3:].partition("|")
        route, _, operation = rest.rpartition("|")
        yield UsageCounter(period, route, operation, column, int(float(value)))


def billed_counters(state: dict[str, str]) -> Iterator[tuple[str, int, int]]:
    """(meter, window start in ms, units) of each billed-units counter: decide.lua's `o:<meter>|<window>`."""
    for field, value in state.items():
        if field[:2] == "o:":
            meter, _, window = field[2:].rpartition("|")
            if meter and window.isdigit():
                yield meter, int(window), int(float(value))


def past_counters(state: dict[str, str], month: str) -> dict[str, str]:
    """The usage counters of months before `month`, as field → value (what `forget` is given back)."""
    return {
        f: v for f, v in state.items() if f[:2] in _COUNTERS and f[2:3] == ":" and f[3:].partition("|")[0] < month
    }


@dataclass(frozen=True, slots=True)
class Recharge:
    """The auto-recharge settings and the lease of the month's current attempt."""

    enabled: bool
    amount_cents: int
    attempt: str  # names this month's attempt: one idempotency key per lease

    @classmethod
    def of(cls, state: dict[str, str]) -> Recharge:
        return cls(state.get("ar:on") == "1", int(state.get("ar:amt") or 0), f"{state.get('ar:m', '')}-{state.get('ar:n', '')}")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One billable's whole live state, read atomically with Redis TIME (ms).

    `state` is the raw hash: what the record keeps and a restore puts back, opaque outside this package."""

    now_ms: int
    state: dict[str, str]
    holds: dict[str, str]
    pending_events: int
    members: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)  # each member's state hash (raw), read with it

    @classmethod
    def parse(cls, raw: list[Any]) -> Snapshot:
        """snapshot.lua's reply: {now (ms), state field/value pairs, holds field/value pairs, pending events,
        {member, its field/value pairs, ...}}."""
        now, fields, holds, pending, members = raw
        return cls(int(now), _pairs(fields), _pairs(holds), int(pending), dict(zip(members[::2], map(_pairs, members[1::2]), strict=True)))

    @property
    def has_state(self) -> bool:
        """Present in Redis (made or restored here), so it may replace the record's."""
        return "hyd" in self.state

    @property
    def change_counter(self) -> int:
        return change_counter(self.state)

    @property
    def plan_version(self) -> int:
        return int(self.state.get("pv", 0))

    @property
    def assignment(self) -> str | None:
        return self.state.get("asg")

    @property
    def subscription(self) -> Subscription | None:
        text = self.state.get("sub")
        return Subscription.from_json(text) if text else None

    @property
    def overrides(self) -> str | None:
        return self.state.get("ov") or None

    @property
    def suspended(self) -> bool:
        return self.state.get("sus") == "1"

    def says(self, subscription: Subscription | None, period: tuple[float, float] | None) -> tuple[bool, bool]:
        """Whether the state already holds this subscription, and this billing period (Unix seconds)."""
        wanted = (str(ms(period[0])), str(ms(period[1]))) if period else (None, None)
        same_sub = self.state.get("sub") == (subscription.to_json() if subscription else None)
        return same_sub, (self.state.get("bp_s"), self.state.get("bp_e")) == wanted

    @property
    def grant_sequence(self) -> int:
        return grant_sequence(self.state)

    @property
    def recharge(self) -> Recharge:
        return Recharge.of(self.state)


def change_counter(state: dict[str, str]) -> int:
    return int(state.get("chg", 0))


def grant_sequence(state: dict[str, str]) -> int:
    """The number of the last credit grant a (saved) state has applied."""
    return int(state.get("c:seq", 0) or 0)


def restorable(
    saved: dict[str, str] | None,
    assignment: str | None,
    version: int,
    *,
    overrides: str | None = None,
    suspended: bool = False,
) -> dict[str, str]:
    """A saved state as it is put back: with the record's manual assignment, overrides and suspension (the
    record is their truth: a snapshot older than them does not bring back what was), a plan version
    `version` (one no process can have cached) and its change counter bumped (a restore is a change the
    record gets too)."""
    state = dict(saved or {})
    for name, value in (("asg", assignment), ("ov", overrides), ("sus", "1" if suspended else None)):
        if value is not None:
            state[name] = value
        else:
            state.pop(name, None)
    state["pv"] = str(version)
    state["chg"] = str(change_counter(state) + 1)
    return state


def _pairs(flat: list[str] | None) -> dict[str, str]:
    items = flat or []
    return dict(zip(items[::2], items[1::2], strict=True))
