"""Per-billable terms and operator tools (DESIGN §4, issue 13 items 1-2): overrides on top of the plan,
suspension and an allowance's reset, each seen by every gateway process from its next request. Two
gateways (`gateway serve`'s app under uvicorn) on one private redis-server, the record on SQLite and
Postgres."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from gateway_support import ADMIN_HEADERS, Served, serving
from services import RedisServer
from waiting import wait_until

from gateway.catalog import parse_catalog
from gateway.overrides import validate

CATALOG = """
[catalog]
default_plan = "free"
highlighted_plan = "pro"

[features]
api = "API"
hd = "HD"

[operations.image]
cost = 1

[plans.free]
price = 0
allows = ["api"]
credits = 10
rate_limit = { limit = 100, per = "1h" }
limits.exports = { to = 2, per = "month" }
limits.projects = { to = 1 }

[plans.pro]
price = 29
allows = ["api", "hd"]
credits = 100
limits.exports = { to = 20, per = "month" }
limits.projects = { to = 10 }

[[routes]]
match = "POST /exports"
features = ["api"]
limit = "exports"

[[routes]]
match = "POST /hd"
features = ["hd"]

[[routes]]
match = "POST /images"
spend = "image"

[[routes]]
match = "* /*"
"""

ORG = {"X-Org": "org_1"}


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def pair(tmp_path: Path, redis_server: RedisServer, empty_db_url: str) -> Iterator[tuple[Served, Served]]:
    """Two gateway processes on one Redis and one record."""
    with ExitStack() as stack:
        a, b = (
            stack.enter_context(serving(tmp_path, CATALOG, redis_port=redis_server.port, db_url=empty_db_url, billable_header="X-Org"))
            for _ in range(2)
        )
        yield a, b


def post(gw: Served, path: str, billable: dict[str, str] = ORG) -> httpx.Response:
    return httpx.post(f"{gw.url}{path}", headers=billable, timeout=10)


def admin(gw: Served, method: str, path: str, body: Any = None) -> httpx.Response:
    return httpx.request(method, f"{gw.url}/_gateway/admin/billables/org_1{path}", json=body, headers=ADMIN_HEADERS, timeout=10)


def status(gw: Served) -> dict[str, Any]:
    answer = admin(gw, "GET", "")
    assert answer.status_code == 200, answer.text
    found: dict[str, Any] = answer.json()
    return found


def test_a_raised_limit_admits_on_both_processes_from_the_next_request_and_survives_a_plan_change(pair: tuple[Served, Served]) -> None:
    """An override of `exports.to` admits on the other process at once; headers, sentences and the status
    use the effective number; an assignment to another plan keeps it; DELETE goes back to the plan."""
    a, b = pair
    assert [post(a, "/exports").status_code, post(b, "/exports").status_code, post(a, "/exports").status_code] == [200, 200, 429]

    put = admin(a, "PUT", "/overrides", {"limits": {"exports": {"to": 4}}, "allows": ["hd"], "reason": "enterprise trial"})
    assert put.status_code == 200, put.text
    body = put.json()
    assert body["limits"]["exports"]["limit"] == 4
    assert "hd" in body["features"]
    assert body["overrides"] == {"limits": {"exports": {"to": 4}}, "allows": ["hd"], "reason": "enterprise trial"}

    third = post(b, "/exports")
    assert third.status_code == 200, third.text
    assert '"exports";q=4' in third.headers["ratelimit-policy"]
    assert '"exports";r=1' in third.headers["ratelimit"]
    assert post(b, "/hd").status_code == 200  # a feature added
    assert post(a, "/exports").status_code == 200
    denied = post(b, "/exports")
    assert denied.status_code == 429
    assert denied.json()["detail"].startswith("You've reached your limit of 4 exports (currently using 4).")
    assert denied.json()["violated_policies"] == ["exports"]

    assert admin(a, "PUT", "/plan", {"plan": "pro"}).status_code == 200
    after = status(b)
    assert (after["plan"], after["limits"]["exports"]["limit"], after["limits"]["projects"]["limit"]) == ("pro", 4, 10)
    assert post(b, "/exports").status_code == 429  # pro's 20 does not replace the override's 4

    removed = admin(b, "DELETE", "/overrides")
    assert removed.status_code == 200
    assert (removed.json()["overrides"], removed.json()["limits"]["exports"]["limit"]) == (None, 20)
    assert post(a, "/exports").status_code == 200


def test_an_expired_override_falls_back_to_the_plan_without_a_write(pair: tuple[Served, Served]) -> None:
    """Past `expires_at` every process decides with the plan again: nothing had to remove the override."""
    a, b = pair
    soon = (datetime.now(UTC) + timedelta(seconds=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
    put = admin(a, "PUT", "/overrides", {"limits": {"exports": {"to": 50}}, "credits": 500, "expires_at": soon})
    assert put.status_code == 200, put.text
    assert [post(b, "/exports").status_code for _ in range(3)] == [200, 200, 200]
    assert post(a, "/images").headers["x-credits-remaining"] == "499"
    # The status consumes nothing: polled, it shows when b's terms fall back.
    wait_until(lambda: status(b)["limits"]["exports"]["limit"] == 2, "the override to expire on b", timeout=20)
    assert post(b, "/exports").status_code == 429
    assert post(a, "/exports").status_code == 429
    shown = status(a)
    assert shown["limits"]["exports"]["limit"] == 2
    assert shown["credits"]["period"] == 9  # the plan's 10, one spent
    assert shown["overrides"]["expires_at"] == soon  # still stored: it is just no longer in force


def test_a_bad_override_is_400_naming_every_place_and_changes_nothing(pair: tuple[Served, Served]) -> None:
    """Each problem at its place, unknown names with a did-you-mean, a limit's per refused."""
    a, _ = pair
    bad = {
        "limits": {"exports": {"to": -1, "per": "day"}, "exprts": {"to": 3}, "projects": {"grace": "1d"}},
        "allows": ["hdd"],
        "rate_limit": "fast",
        "expires_at": "2001-01-01T00:00:00Z",
    }
    answer = admin(a, "PUT", "/overrides", bad)
    assert answer.status_code == 400
    assert answer.headers["content-type"] == "application/problem+json"
    problems = {p["place"]: p["message"] for p in answer.json()["problems"]}
    assert set(problems) == {
        "overrides.limits.exports.to", "overrides.limits.exports.per", "overrides.limits.exprts",
        "overrides.allows[0]", "overrides.rate_limit",
    }, problems  # fmt: skip
    assert 'did you mean "exports"' in problems["overrides.limits.exprts"]
    assert 'did you mean "hd"' in problems["overrides.allows[0]"]
    assert "overrides.limits.exports.to:" in answer.json()["detail"]

    # Once the shape is right, the catalog's own rules run on the merged limit.
    answer = admin(a, "PUT", "/overrides", {"limits": {"projects": {"grace": "1d"}}, "expires_at": "2001-01-01T00:00:00Z"})
    assert answer.status_code == 400
    places = [p["place"] for p in answer.json()["problems"]]
    assert places == ["overrides.limits.projects", "overrides.expires_at"], answer.text
    assert status(a)["overrides"] is None


HUGE = [
    ({"rate_limit": {"limit": 2**60, "per": "1s"}}, "overrides.rate_limit.limit"),
    ({"rate_limit": {"limit": 10**30}}, "overrides.rate_limit.limit"),
    ({"rate_limit": {"limit": 5, "burst": 2**60}}, "overrides.rate_limit.burst"),
    ({"rate_limit": f"{2**60}/second"}, "overrides.rate_limit"),
    ({"rate_limit": "5/99999999999999999999w"}, "overrides.rate_limit"),
    ({"limits": {"exports": {"to": 10**30}}}, "overrides.limits.exports.to"),
    ({"limits": {"exports": {"after_limit": "grace_then_block", "grace": "9999999999999w"}}}, "overrides.limits.exports.grace"),
    ({"credits": 2**53}, "overrides.credits"),
]


def test_every_number_of_an_override_is_bounded_like_the_catalogs(tmp_path: Path, redis_server: RedisServer) -> None:
    """A rate limit of 2**60 or 10**30 requests (or burst), a count or credits past 2**53 - 1 and a grace of
    aeons are 400 naming the place, with the catalog's own bound; nothing is applied, and the status never shows
    a remaining past what a counter holds."""
    with serving(tmp_path, CATALOG, redis_port=redis_server.port, db_url=f"sqlite:///{tmp_path}/gw.db", billable_header="X-Org") as gw:
        for body, place in HUGE:
            answer = admin(gw, "PUT", "/overrides", body)
            assert answer.status_code == 400, (body, answer.text)
            assert [p["place"] for p in answer.json()["problems"]] == [place], answer.text
            assert status(gw)["overrides"] is None
        # The largest that is accepted still decides and shows numbers a client can read.
        answer = admin(gw, "PUT", "/overrides", {"rate_limit": {"limit": 2**53 - 1, "per": "1s"}})
        assert answer.status_code == 200, answer.text
        assert post(gw, "/exports").status_code == 200
        assert 0 <= status(gw)["rate_limits"]["rate"]["remaining"] <= 2**53 - 1


def test_a_suspension_refuses_every_request_on_every_process_consuming_nothing_until_lifted(pair: tuple[Served, Served]) -> None:
    """403 suspended (the reason not shown), nothing consumed, on the other process from the next request;
    a lift is seen there on the next request too."""
    a, b = pair
    assert post(a, "/images").status_code == 200
    assert admin(a, "PUT", "/suspension", {"reason": "chargeback fraud"}).status_code == 200
    before = b.state("org_1")
    for path in ("/exports", "/images", "/hd", "/anything"):
        denied = post(b, path)
        assert denied.status_code == 403, denied.text
        problem = denied.json()
        assert (problem["type"], problem["violated_policies"]) == ("urn:gateway:suspended", ["suspended"])
        assert "chargeback" not in denied.text
    assert b.state("org_1") == before  # nothing consumed, nothing written
    shown = status(b)
    assert (shown["suspended"], shown["limits"]["exports"]["usage"], shown["credits"]["balance"]) == (True, 0, 9)
    assert httpx.post(f"{b.url}/exports", timeout=10).status_code == 401  # identity still comes first
    checked = httpx.post(f"{a.url}/_gateway/check", json={"billable": "org_1", "route": "POST /exports"}, headers=ADMIN_HEADERS, timeout=10)
    assert (checked.json()["allowed"], checked.json()["status"], checked.json()["violated_policies"]) == (False, 403, ["suspended"])

    assert admin(b, "DELETE", "/suspension").status_code == 200
    assert post(a, "/exports").status_code == 200
    assert post(b, "/images").headers["x-credits-remaining"] == "8"


def test_a_reset_starts_the_allowance_again_on_every_process_and_refuses_what_it_cannot_reset(pair: tuple[Served, Served]) -> None:
    """The use in the current window back to 0 (as if it had just begun), answered as the limit's status;
    a cap is 400 and an unknown limit 404, each with one clear line."""
    a, b = pair
    assert [post(a, "/exports").status_code for _ in range(3)] == [200, 200, 429]
    reset = admin(b, "POST", "/limits/exports/reset")
    assert reset.status_code == 200, reset.text
    assert (reset.json()["usage"], reset.json()["remaining"], reset.json()["blocked"]) == (0, 2, False)
    assert [post(a, "/exports").status_code for _ in range(3)] == [200, 200, 429]

    cap = admin(a, "POST", "/limits/projects/reset")
    assert cap.status_code == 400 and "persistent cap" in cap.json()["detail"]
    unknown = admin(a, "POST", "/limits/nope/reset")
    assert unknown.status_code == 404 and 'No limit "nope"' in unknown.json()["detail"]


def test_each_change_is_audited_once_with_before_and_after(pair: tuple[Served, Served]) -> None:
    """overrides.set/remove, suspension.set/lift and limit.reset: once each, with the admin token's name."""
    a, _ = pair
    assert admin(a, "PUT", "/overrides", {"credits": 50}).status_code == 200
    assert admin(a, "DELETE", "/overrides").status_code == 200
    assert admin(a, "PUT", "/suspension", {"reason": "abuse"}).status_code == 200
    assert admin(a, "DELETE", "/suspension").status_code == 200
    assert post(a, "/exports").status_code == 200
    assert admin(a, "POST", "/limits/exports/reset").status_code == 200
    entries = httpx.get(f"{a.url}/_gateway/admin/audit", params={"billable": "org_1"}, headers=ADMIN_HEADERS, timeout=10).json()["entries"]
    assert [(e["action"], e["token"], e["before"], e["after"]) for e in reversed(entries)] == [
        ("overrides.set", "admin", None, {"credits": 50}),
        ("overrides.remove", "admin", {"credits": 50}, None),
        ("suspension.set", "admin", {"suspended": False, "reason": None}, {"suspended": True, "reason": "abuse"}),
        ("suspension.lift", "admin", {"suspended": True, "reason": "abuse"}, {"suspended": False, "reason": None}),
        ("limit.reset", "admin", {"limit": "exports", "usage": 1}, {"limit": "exports", "usage": 0}),
    ]


@pytest.mark.parametrize("flushed", [True, False], ids=["from-the-snapshot", "from-the-record"])
def test_overrides_and_a_suspension_come_back_after_redis_loses_the_billable(
    tmp_path: Path, redis_server: RedisServer, empty_db_url: str, flushed: bool
) -> None:
    """The billable's keys gone from Redis: its restored state has its overrides and suspension again,
    from the snapshot, or from the record when no snapshot has them yet."""
    interval = 0.2 if flushed else 3600
    with serving(tmp_path, CATALOG, redis_port=redis_server.port, db_url=empty_db_url, billable_header="X-Org",
                 reconcile_interval=interval) as gw:  # fmt: skip
        assert post(gw, "/exports").status_code == 200
        assert admin(gw, "PUT", "/overrides", {"limits": {"exports": {"to": 3}}}).status_code == 200
        assert post(gw, "/exports").status_code == 200
        assert admin(gw, "PUT", "/suspension", {"reason": "x"}).status_code == 200
        if flushed:
            wait_until(lambda: gw.snapshot("org_1") == gw.state("org_1"), "the snapshot to have the overrides", timeout=20)
        with gw.redis() as client:
            assert client.delete(*gw.billable_keys()) >= 1
        assert post(gw, "/exports").status_code == 403
        assert admin(gw, "DELETE", "/suspension").status_code == 200
        shown = status(gw)
        assert (shown["limits"]["exports"]["limit"], shown["overrides"]) == (3, {"limits": {"exports": {"to": 3}}})
        expected_usage = 2 if flushed else 0  # no snapshot: the record kept no usage, only the terms
        assert shown["limits"]["exports"]["usage"] == expected_usage
        statuses = [post(gw, "/exports").status_code for _ in range(4 - expected_usage)]
        assert statuses[-1] == 429 and set(statuses[:-1]) == {200}


def test_the_effective_plan_is_the_plan_with_the_overrides_in_place() -> None:
    """apply() on the catalog's models: derived values (the rate, a grace's seconds) follow the new fields,
    unlimited and numbers replace each other, features are added and taken away."""
    catalog = parse_catalog(CATALOG.replace('limits.exports = { to = 20, per = "month" }',
                                            'limits.exports = { to = 20, per = "month", after_limit = "grace_then_block" }'))  # fmt: skip
    pro = catalog.plans["pro"]
    assert pro.rate is None and pro.limits["exports"].grace_seconds == 7 * 86400  # computed before the copy
    body = {"limits": {"exports": {"grace": "1d", "to": 30}, "projects": {"unlimited": True}}, "rate_limit": "50/second",
            "credits": 7, "disallows": ["hd"]}  # fmt: skip
    effective = validate(body, catalog, "pro", time.time()).apply(pro, catalog)
    assert effective.rate is not None and (effective.rate.limit, effective.rate.per_seconds) == (50, 1)
    assert (effective.limits["exports"].to, effective.limits["exports"].grace_seconds) == (30, 86400)
    assert effective.is_unlimited("projects") and effective.credits == 7
    assert (effective.allows, effective.disallows) == (("api",), ("hd",))
    assert pro.limits["exports"].to == 20 and pro.rate is None  # the catalog's plan is untouched


def test_shadow_never_relaxes_a_suspension(tmp_path: Path, redis_server: RedisServer, empty_db_url: str) -> None:
    """In a catalog that only shadows its denials, a suspended billable is still refused, consuming nothing."""
    shadowed = CATALOG.replace("[catalog]\n", '[catalog]\nenforce = "shadow"\n')
    with serving(tmp_path, shadowed, redis_port=redis_server.port, db_url=empty_db_url, billable_header="X-Org") as gw:
        assert [post(gw, "/exports").status_code for _ in range(3)] == [200, 200, 200]  # the third only shadowed
        assert admin(gw, "PUT", "/suspension", {"reason": "abuse"}).status_code == 200
        before = gw.state("org_1")
        denied = post(gw, "/exports")
        assert (denied.status_code, denied.json()["type"]) == (403, "urn:gateway:suspended")
        assert "x-gateway-shadow" not in denied.headers
        assert gw.state("org_1") == before
