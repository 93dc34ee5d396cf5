from __future__ import annotations

import pytest

from gateway.catalog import Operation
from gateway.settlement import Outcome, Settle, outcome, releases, settlement

pytestmark = pytest.mark.unit  # no service: `pytest -m unit` runs these in seconds

METERED = Operation(per_unit=2, units="response.json:usage.total_tokens")


C, T, N, F = Outcome.COMPLETE, Outcome.TRUNCATED, Outcome.NO_ANSWER, Outcome.APP_FAILED

# (outcome, status, units, metered, what happens to the hold): DESIGN §4 "Holds, settlement and refunds".
TABLE: list[tuple[Outcome, int | None, float | None, bool, Settle | None]] = [
    # 2xx: the hold is kept; a metered reserve settles to the units reported, or stays whole.
    (C, 200, None, False, None),
    (C, 204, 7.0, False, None),
    (C, 200, 7.0, True, Settle(give_back_limits=False, credits_owed=14, units=7.0)),
    (C, 200, None, True, Settle(give_back_limits=False, credits_owed=None, units=None)),
    (C, 200, 0.0, True, Settle(give_back_limits=False, credits_owed=0, units=0.0)),
    # Non-2xx: everything given back, unless a metered answer reports units (then those are charged).
    (C, 500, None, False, Settle(give_back_limits=True, credits_owed=0)),
    (C, 429, None, False, Settle(give_back_limits=True, credits_owed=0)),
    (C, 302, None, False, Settle(give_back_limits=True, credits_owed=0)),
    (C, 502, None, True, Settle(give_back_limits=True, credits_owed=0, units=None)),
    (C, 400, 3.0, True, Settle(give_back_limits=True, credits_owed=6, units=3.0)),
    # A stream dying or the client leaving mid-answer: charged, the units seen so far, else the whole reserve.
    (T, 200, None, False, None),
    (T, 500, None, False, None),
    (T, 200, 2.5, True, Settle(give_back_limits=False, credits_owed=5, units=2.5)),
    (T, 200, None, True, Settle(give_back_limits=False, credits_owed=None, units=None)),
    (T, 503, 1.0, True, Settle(give_back_limits=False, credits_owed=2, units=1.0)),
    # The client left before any answer: charged as held.
    (N, None, None, False, None),
    (N, None, None, True, None),
    # The app failed before answering: nothing was delivered, everything given back.
    (F, None, None, False, Settle(give_back_limits=True, credits_owed=0)),
    (F, None, None, True, Settle(give_back_limits=True, credits_owed=0)),
]


@pytest.mark.parametrize(("result", "status", "units", "metered", "expected"), TABLE)
def test_settlement_table(result: Outcome, status: int | None, units: float | None, metered: bool, expected: Settle | None) -> None:
    """Every outcome, status class and metering settles the hold as DESIGN §4 says."""
    assert settlement(result, status, units, METERED if metered else None) == expected


@pytest.mark.parametrize(
    ("status", "complete", "failed", "expected"),
    [(200, True, False, C), (500, True, True, C), (200, False, False, T), (200, False, True, T), (None, False, False, N), (None, False, True, F)],
)
def test_outcome_from_the_answer(status: int | None, complete: bool, failed: bool, expected: Outcome) -> None:
    """An answer's outcome comes from whether it started, whether it finished, and whether the app raised."""
    assert outcome(status, complete, failed) is expected


@pytest.mark.parametrize(
    ("result", "status", "confirmed", "expected"),
    [(C, 200, True, True), (C, 201, False, False), (C, 404, True, False), (T, 200, True, False), (F, None, True, False), (N, None, True, False)],
)
def test_release_only_on_a_whole_confirmed_2xx(result: Outcome, status: int | None, confirmed: bool, expected: bool) -> None:
    """A release route gives its cap back only for a whole 2xx answer that did not say X-Gateway-Release: 0."""
    assert releases(result, status, confirmed) is expected
