"""Budgets across an org, its teams and its keys: what decide.lua needs of each member level (lib/members.lua,
beside spec.py's of the org), and what a member's terms deny before it runs. Sentences: gateway.levels."""

from __future__ import annotations

import json
from collections.abc import Sequence

from gateway.decision import Violation
from gateway.engine.spec import period_code
from gateway.levels import EXPIRED
from gateway.members import Chain, Level
from gateway.terms import MemberTerms

_KEPT = 4096


class MemberSpecs:
    """The members argument of decide.lua for a chain, encoded once per distinct (member, terms)."""

    def __init__(self) -> None:
        self._encoded: dict[tuple[tuple[str, str], ...], tuple[str, tuple[Level, ...]]] = {}

    def of(self, chain: Chain) -> tuple[str, tuple[Level, ...]]:
        """The JSON and the levels it names (those with terms), nearest first; "" when none has terms."""
        counted = tuple(level for level in chain.levels if level.terms is not None)
        key = tuple((level.id, level.terms.digest if level.terms else "") for level in counted)
        found = self._encoded.get(key)
        if found is None:
            if len(self._encoded) > _KEPT:
                self._encoded.clear()
            text = json.dumps([_level(level.id, level.word, level.terms) for level in counted if level.terms], separators=(",", ":"))
            found = self._encoded[key] = (text if counted else "", counted)
        return found


def _level(member: str, word: str, terms: MemberTerms) -> dict[str, object]:
    out: dict[str, object] = {"id": member, "lv": word}
    rate = terms.rate
    if rate is not None:
        out["r"] = [rate.per_seconds * 1000 / rate.limit, rate.burst, rate.window]
    if terms.credits is not None:
        out["c"] = [terms.credits, period_code(terms.credit_period)]
    if terms.limits:
        out["l"] = {n: [lim.to, period_code(lim.period) if lim.period else ""] for n, lim in terms.limits.items()}
    return out


def member_denials(levels: Sequence[Level], features: Sequence[str], now: float) -> list[Violation]:
    """What a member level denies before the script runs: a suspension, an expiry, features taken away."""
    out: list[Violation] = []
    for level in levels:
        if level.suspended:
            out.append(Violation(f"{level.word}-suspended", "suspended"))
        if level.terms is None:
            continue
        if level.terms.expired(now):
            out.append(Violation(f"{level.word}-expired", EXPIRED))
        out += [Violation(f"{level.word}-{f}", "feature") for f in features if f in level.terms.disallows]
    return out
