"""Shadow mode (DESIGN §4): `enforce = "shadow"` on a route, a plan or [catalog] admits and charges a request
that would be denied, says so in `X-Gateway-Shadow`, counts it in the usage history and marks its events;
an enforcing route beside it still denies. Decided on the shared Redis under a private key prefix."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from engine_support import Harness, harness, headers
from gateway_support import ADMIN_HEADERS, serving
from services import RedisServer, RedisSpace, shared_redis_url
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route as StarletteRoute
from starlette.testclient import TestClient

from gateway.catalog import parse_catalog
from gateway.metrics import Metrics
from gateway.middleware import GatewayMiddleware
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


def test_a_shadow_flood_leaves_the_rate_cell_empty_not_in_debt(go: Go[None]) -> None:
    """Fifty requests over `2/hour` in shadow leave the cell empty, never further: once enforced, the next unit
    comes within one interval (30 min), not after 24 hours of refusals."""

    async def check(h: Harness) -> None:
        for _ in range(50):
            assert (await h.decide("org", "GET", "/limited")).admitted
        cell = (await h.engine.status("org"))["rate_limits"]["rate:GET /limited"]
        assert cell["remaining"] == 0
        last = await h.decide("org", "GET", "/limited")
        wait = int(headers(last)["ratelimit"].rsplit("t=", 1)[1])
        assert wait <= 3600  # an empty cell of burst 2 at 2/hour frees its next unit within the hour

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


# ---- through the proxy and the middleware -----------------------------------------------------------------


def test_through_the_proxy_shadow_is_flagged_counted_and_in_the_usage_history(tmp_path: Path, empty_db_url: str) -> None:
    """`gateway serve` on a real redis-server and record: the shadowed route answers 200 with `X-Gateway-Shadow:
    429 exports` and the usual headers, the enforcing one beside it 429; /_gateway/metrics counts the would-be
    denial by policy; the record's block event says shadow; the usage history (endpoint and `gateway usage`)
    has it in its "would have been denied" column."""
    org = {"X-Org": "org_shadow"}
    with RedisServer() as server, serving(tmp_path, CATALOG, redis_port=server.port, db_url=empty_db_url,
                                          billable_header="X-Org") as gw:
        assert [httpx.post(f"{gw.url}/exports", headers=org).status_code for _ in range(2)] == [200, 200]
        over = httpx.post(f"{gw.url}/exports", headers=org)
        assert over.status_code == 200 and over.json()["billable"] == "org_shadow"
        assert over.headers["x-gateway-shadow"] == "429 exports"
        assert over.headers["ratelimit-policy"].startswith('"exports";q=2;w=')
        assert over.headers["ratelimit"].startswith('"exports";r=0;t=')
        strict = httpx.post(f"{gw.url}/strict-exports", headers=org)
        assert strict.status_code == 429 and "x-gateway-shadow" not in strict.headers
        assert strict.json()["violated_policies"] == ["exports"]
        assert gw.upstream_saw.count("POST /exports org_shadow") == 3 and "POST /strict-exports org_shadow" not in gw.upstream_saw

        status = httpx.get(f"{gw.url}/_gateway/admin/billables/org_shadow", headers=ADMIN_HEADERS).json()
        assert (status["limits"]["exports"]["usage"], status["limits"]["exports"]["limit"]) == (3, 2)
        metrics = httpx.get(f"{gw.url}/_gateway/metrics", headers=ADMIN_HEADERS).text
        assert 'gateway_shadow_denials_total{policy="exports"} 1.0' in metrics
        assert 'gateway_decisions_total{outcome="denied",policy="exports"} 1.0' in metrics

        usage = httpx.get(f"{gw.url}/_gateway/admin/billables/org_shadow/usage", headers=ADMIN_HEADERS).json()
        rows = {r["route"]: r for r in usage["routes"]}
        assert (rows["POST /exports"]["requests"], rows["POST /exports"]["shadow_denials"]) == (3, 1)
        assert usage["totals"]["shadow_denials"] == 1
        bodies = [json.loads(b) for (b,) in gw.query("select body from events_outbox where billable = 'org_shadow'")]
        blocks = sorted((e["data"].get("shadow", False), e["data"]["usage"]) for e in bodies if e["type"] == "block")
        assert blocks == [(False, 3), (True, 2)]  # the shadowed crossing, then enforcement's own

        plans = str(tmp_path / "plans.toml")
        table = subprocess.run([sys.executable, "-m", "gateway.cli", "usage", "org_shadow", "--plans", plans,
                                "--database-url", empty_db_url], capture_output=True, text=True, timeout=60, check=False)
        assert table.returncode == 0, table.stderr
        head, line = table.stdout.splitlines()[1], next(x for x in table.stdout.splitlines() if x.startswith("POST /exports"))
        assert head.endswith("would have been denied") and line.split()[-1] == "1"


def test_through_the_middleware_shadow_is_flagged_and_counted(redis_space: RedisSpace) -> None:
    """The ASGI middleware in a Starlette app: a shadowed rate limit past its burst reaches the app with the
    shadow header; the feature a plan lacks on a shadowed route too (`403 hd`); both in the metrics. A request
    without a billable, or with a path that cannot be made canonical, is refused all the same."""
    engine = redis_space.engine(parse_catalog(CATALOG))
    metrics = Metrics()

    async def ok(request: Request) -> Response:
        return JSONResponse({"billable": request.headers.get("x-billable-id")})

    def org(scope: dict[str, Any]) -> str | None:
        return dict(scope["headers"]).get(b"x-org", b"").decode() or None

    inner = Starlette(routes=[StarletteRoute("/{rest:path}", ok, methods=["GET", "POST"])])
    app = GatewayMiddleware(inner, engine=engine, billable=org, metrics=metrics)
    with TestClient(app) as client:
        limited = [client.get("/limited", headers={"x-org": "org_mw"}) for _ in range(3)]
        assert [r.status_code for r in limited] == [200, 200, 200]
        assert [r.headers.get("x-gateway-shadow") for r in limited] == [None, None, "429 rate:GET /limited"]
        image = client.post("/images", headers={"x-org": "org_mw"})
        assert image.status_code == 200 and image.json() == {"billable": "org_mw"}
        assert image.headers["x-gateway-shadow"] == "403 hd" and image.headers["x-credits-remaining"] == "5"
        strict = client.post("/strict", headers={"x-org": "org_mw"})
        assert strict.status_code == 200  # within its cap
        assert client.post("/strict", headers={"x-org": "org_mw"}).status_code == 403
        # Shadow never relaxes a 401 or a 400.
        assert client.post("/images").status_code == 401
        assert client.post("/images%2Fx", headers={"x-org": "org_mw"}).status_code == 400
    rendered = metrics.render().decode()
    assert 'gateway_shadow_denials_total{policy="rate:GET /limited"} 1.0' in rendered
    assert 'gateway_shadow_denials_total{policy="hd"} 1.0' in rendered
    assert 'gateway_shadow_denials_total{policy="projects"}' not in rendered
