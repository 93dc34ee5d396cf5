"""What a request's hold comes to, from how its answer went (DESIGN §4 "Holds, settlement and refunds").

Pure functions of the outcome: the middleware observes the answer, these decide, the engine applies.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from gateway.bounds import MAX_INT
from gateway.catalog import Operation


class Outcome(enum.Enum):
    COMPLETE = "complete"  # the whole answer went out
    TRUNCATED = "truncated"  # the answer started, then the stream died or the client left
    NO_ANSWER = "no_answer"  # the app returned without answering: the client left before the answer
    APP_FAILED = "app_failed"  # the app raised before answering: nothing was delivered


def outcome(status: int | None, complete: bool, failed: bool) -> Outcome:
    """The outcome of an answer that sent `status` (None: no start), all of it or not, the app raising or not."""
    if status is None:
        return Outcome.APP_FAILED if failed else Outcome.NO_ANSWER
    return Outcome.COMPLETE if complete else Outcome.TRUNCATED


@dataclass(frozen=True, slots=True)
class Settle:
    """One settle of the hold: give the limit units back or not, the credits owed (None: the whole reserve)."""

    give_back_limits: bool
    credits_owed: int | None
    units: float | None = None


def settlement(result: Outcome, status: int | None, units: float | None, metered: Operation | None) -> Settle | None:
    """What to do with a hold; None keeps it as charged.

    `units` are what the answer reported (for a truncated one, what was seen); `metered` is the metered
    operation (None when the operation is not metered). The units charged and counted are at most its
    max_units (and 2^53 - 1), whatever the answer said: the settle script gets numbers it can hold."""
    if result is Outcome.NO_ANSWER:
        return None
    if result is Outcome.APP_FAILED:
        return Settle(give_back_limits=True, credits_owed=0)
    ok = status is not None and 200 <= status < 300
    if result is Outcome.TRUNCATED or ok:
        # Charged: a metered reserve settles to the units reported (seen), else stays whole.
        if metered is None:
            return None
        if units is None:
            return Settle(give_back_limits=False, credits_owed=None, units=None)
        return _charged(False, metered, units)
    # A non-2xx answer gives everything back, unless it reports units (then those are charged).
    if metered is None:
        return Settle(give_back_limits=True, credits_owed=0)
    if units is None:
        return Settle(give_back_limits=True, credits_owed=0, units=None)
    return _charged(True, metered, units)


def _charged(give_back_limits: bool, metered: Operation, units: float) -> Settle:
    units = metered.charged_units(units)
    return Settle(give_back_limits=give_back_limits, credits_owed=min(metered.price(units), MAX_INT), units=units)


def releases(result: Outcome, status: int | None, confirmed: bool) -> bool:
    """Whether a `release` route gives its cap back: a whole 2xx answer that did not say `X-Gateway-Release: 0`."""
    return result is Outcome.COMPLETE and status is not None and 200 <= status < 300 and confirmed
