"""How a denial at a member level reads: each level is named in headers and violations by its word and
the item (`key-credits`, `key-rate`, `team-exports`); the org's items keep their catalog names."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # gateway.decision asks this module for its sentences
    from gateway.decision import PolicyState, Violation

EXPIRED = "expired"  # the violation kind of a member past its terms' expiry

_WORDS = ("key", "team")


def level_of(violation: Violation) -> str | None:
    """The member level a violation is at ("key", "team"), None for the org's own."""
    word, dash, _ = violation.name.partition("-")
    return word if dash and word in _WORDS else None


def level_sentence(v: Violation, policies: Sequence[PolicyState], org_credits: int | None) -> str | None:
    """The sentence of a denial at a member level, naming the level and what the org has left."""
    word = level_of(v)
    if word is None:
        return None
    this = f"This {word}'s"
    item = v.name[len(word) + 1 :]
    window = next((p.window for p in policies if p.name == v.name), None)
    every = _adjective(window)
    if v.kind == "feature":
        return f"{this} terms do not allow {item.replace('_', ' ')}: ask the account's owner."
    if v.kind == "suspended":
        return f"This {word} is suspended: its requests are refused until it is lifted. Please contact support."
    if v.kind == EXPIRED:
        return f"{this} terms have expired: ask the account's owner for new ones."
    if v.kind == "credits":
        org = f"; the organization has {org_credits:,} left." if org_credits is not None else "."
        if not v.balance:
            return f"{this} {every}budget of {v.limit or 0:,} credits is spent{org}"
        return f"This request needs {v.cost or 0:,} credits and {this[5:]} {every}budget has {v.balance:,} of {v.limit or 0:,} left{org}"
    if v.kind == "rate":
        return f"Too many requests for this {word} ({v.name}): retry in {_seconds(v.retry_after or 1)}."
    what = item.replace("_", " ")
    if v.kind == "size":
        return f"This request needs {v.cost} {what}, more than {this[5:]} limit of {v.limit}."
    resets = f"; it resets in {_seconds(v.retry_after)}" if v.retry_after else ""
    return f"{this} {every}limit of {v.limit} {what} is reached ({v.usage} used){resets}."


def _adjective(window: int | None) -> str:
    if window is None:
        return ""
    if window == 86400:
        return "daily "
    if window == 7 * 86400:
        return "weekly "
    if 28 * 86400 <= window <= 31 * 86400:
        return "monthly "
    return ""


def _seconds(seconds: int) -> str:
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = round(seconds / size)
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return f"{seconds} second{'s' if seconds != 1 else ''}"
