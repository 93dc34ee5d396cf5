"""Shadow mode (DESIGN §4): `enforce = "shadow"` on a route, a plan or [catalog] admits and charges a request
that would be denied, says so in `X-Gateway-Shadow`, counts it in the usage history and marks its events;
an enforcing route beside it still denies. Decided on the shared Redis under a private key prefix."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
from engine_support import Harness, harness, headers
from services import shared_redis_url

from gateway.state import usage_counters

T = TypeVar("T")
Go = Callable[[Callable[[Harness], Awaitable[T]]], T]

CATALOG = """
[catalog]
default_plan = "free"
upgrade_url = "https://example.com/pricing"

[features]
api_access = "API access"
hd = "HD"

[operations.image]
cost = 5

[plans.free]
price = 0
allows = ["api_access"]
credits = 10
limits.exports = { to = 2, per = "month" }
limits.projects = { to = 1 }

[plans.trial]
price = 0
enforce = "shadow"
allows = ["api_access"]
limits.exports = { to = 1, per = "month" }

[[routes]]
match = "POST /exports"
limit = "exports"
enforce = "shadow"

[[routes]]
match = "POST /strict-exports"
limit = "exports"

[[routes]]
match = "POST /projects"
limit = "projects"

[[routes]]
match = "POST /images"
features = ["api_access", "hd"]
spend = "image"
enforce = "shadow"

[[routes]]
match = "GET /limited"
rate_limit = "2/hour"
enforce = "shadow"

[[routes]]
match = "POST /strict"
limit = "projects"
enforce = "enforce"

[[routes]]
match = "* /*"
"""


@pytest.fixture
def go() -> Iterator[Go[Any]]:
    with harness(shared_redis_url(), CATALOG) as runner:
        yield runner


def shadow_counts(state: dict[str, str]) -> dict[str, int]:
    """Would-be denials per route in the usage history a state holds."""
    return {c.route: c.value for c in usage_counters(state) if c.column == "shadow_denials"}


def test_a_shadowed_route_over_its_allowance_is_admitted_charged_and_flagged(go: Go[None]) -> None:
    """Over `to` on a shadowed route: admitted with `X-Gateway-Shadow: 429 exports`, counted over the limit,
    a block event marked shadow, a would-be denial in the usage history; the enforcing route beside it denies."""

    async def check(h: Harness) -> None:
        for _ in range(2):
            assert (await h.decide("org", "POST", "/exports")).shadowed == []
        over = await h.decide("org", "POST", "/exports")
        assert over.admitted and over.status == 200 and over.violations == []
        assert headers(over)["x-gateway-shadow"] == "429 exports"
        assert headers(over)["ratelimit"].startswith('"exports";r=0;t=')
        assert "retry-after" not in headers(over)
        blocks = [e for e in over.events if e["type"] == "block"]
        assert [b["data"] for b in blocks] == [{"limit": "exports", "usage": 2, "shadow": True}]
        again = await h.decide("org", "POST", "/exports")
        assert again.admitted and [e["type"] for e in again.events] == []  # one block per window
        status = await h.engine.status("org")
        assert (status["limits"]["exports"]["usage"], status["limits"]["exports"]["limit"]) == (4, 2)

        strict = await h.decide("org", "POST", "/strict-exports")
        assert not strict.admitted and strict.status == 429 and strict.violated_policies == ["exports"]
        assert "x-gateway-shadow" not in headers(strict)
        # Enforcement has its own block, even after the shadowed one of the same window.
        assert [(e["type"], e["data"]) for e in strict.events] == [("block", {"limit": "exports", "usage": 4})]
        assert (await h.engine.status("org"))["limits"]["exports"]["usage"] == 4  # the denial took nothing

        snap = await h.engine.snapshot("org")
        assert shadow_counts(snap.state) == {"POST /exports": 2}
        requests = {c.route: c.value for c in usage_counters(snap.state) if c.column == "requests"}
        assert requests == {"POST /exports": 4}

    go(check)


def test_a_shadowed_rate_limit_advances_as_if_admitted(go: Go[None]) -> None:
    """Past its burst, a shadowed rate limit admits with `429 rate:GET /limited`, and its cell moves on: the
    next request is over it too."""

    async def check(h: Harness) -> None:
        seen = [await h.decide("org", "GET", "/limited") for _ in range(4)]
        assert all(d.admitted for d in seen)
        assert [d.shadow for d in seen] == [None, None, "429 rate:GET /limited", "429 rate:GET /limited"]
        assert headers(seen[3])["ratelimit"].startswith('"rate:GET /limited";r=0;t=')

    go(check)


def test_features_and_credits_in_shadow_go_into_debt_and_report_403_first(go: Go[None]) -> None:
    """A feature the plan lacks and credits short on a shadowed route: admitted with `403 hd credits` (403
    before 402), charged into debt, its insufficient_credits event marked shadow; a grant pays the debt first."""

    async def check(h: Harness) -> None:
        first = await h.decide("org", "POST", "/images")
        assert first.admitted and first.shadow == "403 hd" and first.credits == 5
        await h.decide("org", "POST", "/images")
        third = await h.decide("org", "POST", "/images")
        assert third.admitted and third.shadow == "403 hd credits"
        assert headers(third)["x-credits-remaining"] == "-5"
        assert [(e["type"], e["data"]) for e in third.events] == [
            ("insufficient_credits", {"needed": 5, "balance": 0, "shadow": True})
        ]
        credits = (await h.engine.status("org"))["credits"]
        assert (credits["balance"], credits["debt"]) == (-5, 5)
        await h.engine.apply_grant("org", 1, 8)
        assert (await h.engine.status("org"))["credits"]["balance"] == 3
        assert shadow_counts((await h.engine.snapshot("org")).state) == {"POST /images": 3}

    go(check)


def test_a_shadowed_hold_given_back_returns_its_debt(go: Go[None]) -> None:
    """A non-2xx answer gives back a shadowed spend, the part that went into debt included."""

    async def check(h: Harness) -> None:
        for _ in range(2):
            await h.decide("org", "POST", "/images")
        into_debt = await h.decide("org", "POST", "/images")
        assert into_debt.hold is not None and into_debt.hold.credits_held == 5
        await h.engine.settle(into_debt, give_back_limits=True, credits_owed=0)
        credits = (await h.engine.status("org"))["credits"]
        assert (credits["balance"], credits["debt"]) == (0, 0)

    go(check)


def test_a_plan_in_shadow_admits_what_its_routes_would_deny(go: Go[None]) -> None:
    """`enforce = "shadow"` on a plan: over its allowance on a route with no say of its own, and a limit the
    plan lacks (`403 projects`), both admitted; a route that says "enforce" still denies."""

    async def check(h: Harness) -> None:
        await h.engine.set_assignment("org", "trial")
        await h.decide("org", "POST", "/strict-exports")
        over = await h.decide("org", "POST", "/strict-exports")
        assert over.admitted and over.shadow == "429 exports" and over.plan == "trial"
        lacking = await h.decide("org", "POST", "/projects")
        assert lacking.admitted and lacking.shadow == "403 projects"
        strict = await h.decide("org", "POST", "/strict")
        assert not strict.admitted and strict.status == 403 and strict.violated_policies == ["projects"]
        assert shadow_counts((await h.engine.snapshot("org")).state) == {"POST /strict-exports": 1, "POST /projects": 1}

    go(check)


def test_a_catalog_in_shadow_admits_everything_but_what_enforces() -> None:
    """`[catalog] enforce = "shadow"`: every plan and route is shadowed unless it says "enforce"."""
    text = CATALOG.replace('upgrade_url = "https://example.com/pricing"', 'enforce = "shadow"')

    async def check(h: Harness) -> None:
        await h.decide("org", "POST", "/projects")
        over = await h.decide("org", "POST", "/projects")
        assert over.admitted and over.shadow == "403 projects"
        strict = await h.decide("org", "POST", "/strict")
        assert not strict.admitted and strict.status == 403

    with harness(shared_redis_url(), text) as run:
        run(check)


def test_a_dry_decision_in_shadow_writes_nothing(go: Go[None]) -> None:
    """A dry decision on a shadowed route answers the shadow it would report, and counts nothing."""

    async def check(h: Harness) -> None:
        for _ in range(2):
            await h.decide("org", "POST", "/exports")
        dry = await h.decide("org", "POST", "/exports", dry=True)
        assert dry.admitted and dry.shadow == "429 exports"
        assert (await h.engine.status("org"))["limits"]["exports"]["usage"] == 2
        assert shadow_counts((await h.engine.snapshot("org")).state) == {}

    go(check)
