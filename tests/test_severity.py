"""Severity and sentences of a status (gateway/severity.py): the seed's rule as a table, its two faults fixed,
and a billable walked from ok to blocked through real decisions, read back by status.lua."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from engine_support import Harness, harness
from services import shared_redis_url

from gateway.catalog import parse_catalog
from gateway.severity import credits_severity, limit_message, limit_severity, overall

T = TypeVar("T")
Go = Callable[[Callable[[Harness], Awaitable[T]]], T]

CATALOG = """
[catalog]
default_plan = "free"
highlighted_plan = "pro"

[plans.free]
price = 0
credits = 100
limits.exports = { to = 10, per = "month", after_limit = "grace_then_block", grace = "1h", warn_at = [0.5, 0.8] }
limits.projects = { to = 5 }

[plans.pro]
price = 29
credits = 1000
limits.exports = { to = 100, per = "month" }
limits.projects = { to = 50 }

[plans.scale]
price = 99
unlimited = ["exports", "projects", "credits"]

[[routes]]
match = "POST /exports"
limit = "exports"
"""


@pytest.mark.parametrize(
    ("usage", "to", "grace", "warn_at", "expected"),
    [
        (0, 5, False, (0.6, 0.8), "ok"),
        (3, 5, False, (0.6, 0.8), "ok"),  # 60 %: only the highest threshold warns
        (4, 5, False, (0.6, 0.8), "warning"),
        (4, 5, False, (), "ok"),
        (5, 5, False, (0.6, 0.8), "at_limit"),
        (6, 5, False, (0.6, 0.8), "blocked"),
        (6, 5, True, (0.6, 0.8), "grace"),
        (3, 0, False, (0.8,), "blocked"),  # the seed said ok: it only compared limits above 0
        (0, 0, False, (0.8,), "ok"),
        (10**6, None, False, (0.8,), "ok"),
    ],
)
def test_the_severity_of_a_limit(usage: int, to: int | None, grace: bool, warn_at: tuple[float, ...], expected: str) -> None:
    """Grace first; then over, on, near the highest threshold; unlimited and an unused 0 limit are ok."""
    assert limit_severity(usage, to, grace, warn_at) == expected


@pytest.mark.parametrize(
    ("balance", "allowance", "purchased", "debt", "expected"),
    [
        (None, 0, 0, 0, "ok"),
        (100, 100, 0, 0, "ok"),
        (11, 100, 0, 0, "ok"),
        (10, 100, 0, 0, "warning"),
        (110, 100, 1000, 0, "warning"),  # 10 % of the allowance plus what was bought
        (0, 100, 0, 0, "blocked"),
        (-5, 100, 0, 5, "blocked"),
        (0, 0, 0, 0, "ok"),  # a plan without credits has none to run out of
    ],
)
def test_the_severity_of_the_credits(balance: int | None, allowance: int, purchased: int, debt: int, expected: str) -> None:
    """Warning at or below 10 % of the period's allowance plus purchased credits, blocked at 0."""
    assert credits_severity(balance, allowance, purchased, debt) == expected


def _item(severity: str, usage: int = 0, grace_ends_at: str | None = None) -> dict[str, Any]:
    return {"severity": severity, "usage": usage, "grace_ends_at": grace_ends_at}


def test_the_overall_is_the_highest_severity_in_any_order() -> None:
    """The seed answered the first grace or blocked key it met: here the order of the keys changes nothing."""
    catalog = parse_catalog(CATALOG)
    credits = _item("ok")
    one = overall(catalog, "free", {"exports": _item("grace", 11, "2026-12-14T09:30:00Z"), "projects": _item("blocked", 6)}, credits)
    two = overall(catalog, "free", {"projects": _item("blocked", 6), "exports": _item("grace", 11, "2026-12-14T09:30:00Z")}, credits)
    assert one == two
    assert one["severity"] == "blocked" and one["severity_level"] == 4 and one["title"] == "Plan limit reached"
    assert one["keys"] == ["projects"]
    assert one["message"] == "Your plan limit for projects has been exceeded. Please upgrade to continue."
    assert one["cta_text"] == "Upgrade to Pro" and one["cta_url"] == "/_gateway/pricing"


@pytest.mark.parametrize(
    ("severities", "title", "message"),
    [
        ({}, "All good", None),
        ({"exports": "warning", "projects": "warning"}, "Approaching plan limit",
         "You are approaching your plan limits for exports and projects."),
        ({"exports": "at_limit", "projects": "warning"}, "At your plan limit", "You have reached your plan limit for exports."),
        ({"exports": "grace"}, "Over limit — grace active",
         "You are over your plan limit for exports, grace active until December 14 at 09:30 UTC. Please upgrade to avoid service disruption."),
        ({"exports": "blocked", "projects": "blocked", "credits": "blocked"}, "Plan limit reached",
         "Your plan limits for exports, projects and credits have been exceeded. Please upgrade to continue."),
    ],
)
def test_the_overall_title_and_message(severities: dict[str, str], title: str, message: str | None) -> None:
    """The title of the highest severity and a sentence naming every key at it."""
    catalog = parse_catalog(CATALOG)
    limits = {name: _item(severities.get(name, "ok"), 1, "2026-12-14T09:30:00Z") for name in ("exports", "projects")}
    found = overall(catalog, "free", limits, _item(severities.get("credits", "ok")))
    assert (found["title"], found["message"]) == (title, message)
    assert found["cta_text"] == ("View plans" if not severities else "Upgrade to Pro")


def test_the_call_to_action_names_the_plan_that_takes_the_usage() -> None:
    """Over what Pro gives, the call names Scale; on the top plan it offers the plans, never a cheaper one."""
    catalog = parse_catalog(CATALOG)
    credits = _item("ok")
    assert overall(catalog, "free", {"projects": _item("blocked", 70)}, credits)["cta_text"] == "Upgrade to Scale"
    assert overall(catalog, "scale", {"projects": _item("blocked", 70)}, credits)["cta_text"] == "View plans"


def test_the_sentences_of_a_limit() -> None:
    """The seed's sentence for each severity, with usage over limit and the end of grace."""
    assert limit_message("custom_models", "warning", 4, 5, None) == (
        "You're getting close to your limit for custom models (4/5). Keep an eye on your usage, or upgrade your plan now to stay ahead."
    )
    assert limit_message("projects", "at_limit", 5, 5, None) == "You've reached your limit for projects (5/5). Upgrade your plan to unlock more."
    assert limit_message("projects", "grace", 6, 5, "2026-12-14T09:30:00Z") == (
        "Heads up! You're currently over your limit for projects (6/5), and your grace period ends December 14 at 09:30 UTC. "
        "Please upgrade soon to avoid any interruptions."
    )
    assert limit_message("projects", "blocked", 3, 0, None) == "You've gone over your limit for projects (3/0). Please upgrade your plan."
    assert limit_message("projects", "ok", 1, 5, None) is None


@pytest.fixture(params=["redis", "embedded"])
def go(request: pytest.FixtureRequest) -> Any:
    url = shared_redis_url() if request.param == "redis" else None
    with harness(url, CATALOG) as runner:
        yield runner


def test_a_billable_walked_from_ok_to_blocked(go: Go[None]) -> None:
    """Real decisions move the status from ok through warning, at_limit and grace to blocked, each with its
    sentence and the overall following; the numbers are the script's."""

    async def fn(h: Harness) -> None:
        seen = []
        for target in (0, 8, 10, 11):
            while (await h.engine.status("org"))["limits"]["exports"]["usage"] < target:
                assert (await h.decide("org", "POST", "/exports")).admitted
            status = await h.engine.status("org")
            seen.append((status["limits"]["exports"]["severity"], status["overall"]["severity"]))
        await h.set_field("org", "g:exports", int((time.time() - 7200) * 1000))  # grace started two hours ago
        status = await h.engine.status("org")
        exports = status["limits"]["exports"]
        seen.append((exports["severity"], status["overall"]["severity"]))
        assert seen == [("ok", "ok"), ("warning", "warning"), ("at_limit", "at_limit"), ("grace", "grace"), ("blocked", "blocked")]
        assert exports["blocked"] and exports["message"] == "You've gone over your limit for exports (11/10). Please upgrade your plan."
        assert status["overall"]["keys"] == ["exports"] and status["overall"]["cta_text"] == "Upgrade to Pro"
        assert status["credits"]["severity"] == "ok" and status["credits"]["message"] is None

    go(fn)
