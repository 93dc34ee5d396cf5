"""What a decision holds until its settle: credits taken, limit units counted, and where they came from."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, NamedTuple


class HeldLimit(NamedTuple):
    """A tuple: built per request."""

    name: str
    units: int
    window_ms: int  # the limit's window when counted; 0 for a persistent cap


@dataclass(slots=True)
class Hold:
    period_credits: int  # taken from the period's allowance
    purchased_credits: int  # taken from purchased credits
    credit_window_ms: int  # the credit period they were taken in
    allowance: int  # the plan's allowance then (-1 unlimited)
    usage_key: str  # what the usage history counted the request under
    limits: tuple[HeldLimit, ...]
    id: str = ""  # a metered hold's id in the holds hash ("" for none: nothing was stored)
    members: str = ""  # what each member level held (lib/members.lua's JSON, nearest first; "" for none)

    @property
    def member_ids(self) -> list[str]:
        """The member levels this hold took from, in the order settle.lua gives back to them."""
        return [str(m["id"]) for m in json.loads(self.members)] if self.members else []

    @property
    def credits_held(self) -> int:
        return self.period_credits + self.purchased_credits

    @property
    def needs_settle(self) -> bool:
        """Whether a settle can change anything without a meter: limit units or credits to give back."""
        return bool(self.limits) or self.credits_held > 0

    @classmethod
    def parse(cls, raw: list[Any], hold_id: str) -> Hold:
        """decide.lua's hold reply: {period credits, purchased credits, window, allowance, usage key, limits,
        member holds or nil}."""
        cp, cb, window, allowance, usage_key, limits = raw[:6]  # integers and strings already (no cjson numbers)
        members = raw[6] if len(raw) > 6 and raw[6] else ""
        return cls(cp, cb, window, allowance, usage_key, tuple(map(HeldLimit._make, limits)) if limits else (), hold_id, members)

    @classmethod
    def stored(cls, raw: str, hold_id: str, now_ms: int) -> StoredHold | None:
        """A hold as decide.lua stored it in the holds hash (cjson: `l` is {} when empty), None once it is past
        its lifetime (then it is kept as charged)."""
        found = json.loads(raw)
        if int(found.get("exp", 0)) <= now_ms:
            return None
        # cjson's numbers: integers as read back by json may come as floats.
        limits = [[str(n), int(u), int(w)] for n, u, w in (found.get("l") or [])]
        members = json.dumps(found["m"]) if found.get("m") else ""
        values = [int(found["cp"]), int(found["cb"]), int(found["w"]), int(found.get("a", 0)), str(found.get("q", "")), limits, members]
        hold = cls.parse(values, hold_id)
        # The usage key (fields.usage_key) names the route and the operation the hold was taken for.
        _, _, counted = hold.usage_key.partition("|")
        route, _, operation = counted.rpartition("|")
        return StoredHold(hold, route, operation or None)

    def argv(self) -> list[str | int]:
        """As settle.lua reads it, from its 7th argument on."""
        out: list[str | int] = [self.id, self.period_credits, self.purchased_credits, self.credit_window_ms,
                                self.allowance, self.usage_key, self.members]  # fmt: skip
        for limit in self.limits:
            out += [limit.name, limit.units, limit.window_ms]
        return out


@dataclass(frozen=True, slots=True)
class StoredHold:
    """A stored hold still open, with the route (its match) and the operation it was taken for."""

    hold: Hold
    route: str
    operation: str | None
