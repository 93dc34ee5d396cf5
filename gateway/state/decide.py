"""decide.lua's protocol: `DecideArgs.argv()` in, `DecideReply.parse()` out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from gateway.state.fields import Subscription
from gateway.state.hold import HeldLimit, Hold


class Violation(NamedTuple):
    """One violated policy: a feature, a limit, a rate limit or the credit balance."""

    name: str
    kind: str  # feature | cap | size | allow | rate | credits | unauthorized | suspended | unavailable | no_route
    retry_after: int | None = None
    usage: int | None = None
    limit: int | None = None
    cost: int | None = None
    balance: int | None = None


class PolicyState(NamedTuple):
    """One applied policy's state after the decision, for the headers (a tuple: built per request)."""

    name: str
    kind: str  # rate | cap | allow | credits
    quota: int
    window: int | None
    remaining: int | None
    reset: int | None  # seconds until more is available; None for caps and credits


@dataclass(slots=True)  # built per request: a frozen dataclass costs a microsecond more
class DecideArgs:
    spec: str  # Spec.encode(), cached per (plan, route)
    plan_version: int  # what the caller's cached plan was resolved at (-1: none)
    calendar: str  # candidate calendar windows (lib/args.lua bounds_arg, see Engine._calendar)
    forced_deny: bool  # the caller denies already (features): evaluate, write nothing but events
    hold_id: str  # a metered spend's hold id ("" for none)
    credit_cost: int | None  # prices the operation from the request (None: the spec's cost)
    restores: bool  # missing state is restored from the record first
    hold_ttl: int  # seconds
    plan: str  # for the events
    usage_key: str  # fields.usage_key
    dry: bool = False  # evaluate everything, write nothing: the decision the request would get
    shadowed: bool = False  # the caller shadows a denial of its own (features): admitted, counted as one
    members: str = ""  # the member levels' specs (gateway.budgets.member_specs; keys 4.. are their state)
    fingerprint: str = ""  # with an idempotency record as the last key: what the request asked (gateway/idempotency.py)

    def argv(self) -> list[str | int]:
        return [
            self.spec,
            self.plan_version,
            self.calendar,
            "1" if self.forced_deny else "s" if self.shadowed else "0",
            self.hold_id,
            "" if self.credit_cost is None else self.credit_cost,
            "1" if self.restores else "0",
            self.hold_ttl,
            self.plan,
            self.usage_key,
            "1" if self.dry else "0",
            # Trailing arguments only when given: a plain decision sends eleven.
            *((self.members,) if self.members or self.fingerprint else ()),
            *((self.fingerprint,) if self.fingerprint else ()),
        ]


@dataclass(frozen=True, slots=True)
class Stale:
    """The caller's plan is stale: here is what decides it now."""

    plan_version: int
    assignment: str | None
    subscription: Subscription | None
    overrides: str | None = None  # the billable's overrides as stored (gateway.overrides JSON)
    suspended: bool = False

    @classmethod
    def parse(cls, raw: list[Any]) -> Stale:
        """{"stale", version, assignment, subscription, overrides, suspended}, each nil for none (a Lua array
        ends at its first nil: older scripts sent fewer)."""
        assignment, sub, overrides, suspended = [*raw[2:6], None, None, None, None][:4]
        return cls(int(raw[1]), assignment, Subscription.from_json(sub) if sub else None, overrides or None, bool(suspended))


@dataclass(frozen=True, slots=True)
class Seen:
    """The request's idempotency record was there: it was decided before, nothing was taken now."""

    record: str  # its JSON (gateway/idempotency.py)


@dataclass(frozen=True, slots=True)
class Missing:
    """Redis lost the state: restore it first."""


@dataclass(slots=True)
class CreditReply:
    allowance: int  # -1: unlimited
    shown: bool
    balance: int | None  # None: unlimited
    recharge: bool  # this spend took the auto-recharge lease
    purchased: int


@dataclass(slots=True)
class DecideReply:
    admitted: bool
    now_ms: int
    policies: list[PolicyState]
    violations: list[Violation]
    events: list[str]  # JSON each, as the pending events list holds them
    credit: CreditReply | None
    hold: Hold | None

    @staticmethod
    def parse(raw: list[Any], hold_id: str) -> DecideReply | Stale | Missing | Seen:
        """By position (decide.lua's reply: one flat array, each list its count and then its items)."""
        if raw[0] == "stale":
            return Stale.parse(raw)
        if raw[0] == "missing":
            return Missing()
        if raw[0] == "once":
            return Seen(raw[1])
        # Without conversions: this runs once per request, on integers and strings already.
        at = 3 + 6 * raw[2]
        policies = [PolicyState(raw[i], raw[i + 1], raw[i + 2], raw[i + 3], raw[i + 4], None if raw[i + 1] == "cap" else raw[i + 5])
                    for i in range(3, at, 6)]  # fmt: skip
        end = at + 1 + 7 * raw[at]
        violations = [Violation(*raw[i : i + 7]) for i in range(at + 1, end, 7)]
        at = end + 1 + raw[end]
        events = raw[end + 1 : at]
        credit = None
        if raw[at] == 1:
            credit = CreditReply(raw[at + 1], raw[at + 2] == 1, raw[at + 3], raw[at + 4] == 1, raw[at + 5])
            at += 5
        hold = None
        if raw[at + 1] == 1:
            cp, cb, window, allowance, usage_key, members, count = raw[at + 2 : at + 9]
            limits = tuple(HeldLimit(raw[i], raw[i + 1], raw[i + 2]) for i in range(at + 9, at + 9 + 3 * count, 3))
            hold = Hold(cp, cb, window, allowance, usage_key, limits, hold_id, members or "")
        return DecideReply(raw[0] == 1, raw[1], policies, violations, events, credit, hold)
