"""Headers that tell the truth (DESIGN §3): a denial consumed nothing, so it shows what is really left (the
same `r` as the request before it, for every policy), and the credits item's `q` (the nominal allowance
plus the purchased credits on hand) is never below its `r`."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from engine_support import Harness, harness, headers
from gateway_support import ADMIN_HEADERS, serving
from services import RedisServer, shared_redis_url

from gateway.decision import Decision

T = TypeVar("T")
Go = Callable[[Callable[[Harness], Awaitable[T]]], T]

# Rates slow enough that nothing refills while a test runs: every r below is exact.
CATALOG = """
[catalog]
default_plan = "free"

[features]
api = "API"
hd = "HD"

[operations.image]
cost = 5

[operations.huge]
cost = 100000

[plans.free]
price = 0
allows = ["api"]
credits = 20
rate_limit = { limit = 10, per = "1h" }
limits.projects = { to = 2 }
limits.exports = { to = 3, per = "month" }

[[routes]]
match = "POST /images"
features = ["api", "hd"]
spend = "image"

[[routes]]
match = "POST /cheap"
features = ["api"]
spend = "image"

[[routes]]
match = "POST /huge"
spend = "huge"

[[routes]]
match = "POST /projects"
limit = "projects"
spend = "image"

[[routes]]
match = "POST /exports"
limit = "exports"

[[routes]]
match = "POST /hd-exports"
features = ["hd"]
limit = "exports"

[[routes]]
match = "GET /limited"
rate_limit = "2/hour"
"""


@pytest.fixture(params=["redis", "embedded"])
def go(request: pytest.FixtureRequest) -> Iterator[Any]:
    url = shared_redis_url() if request.param == "redis" else None
    with harness(url, CATALOG) as runner:
        yield runner


def items(text: str) -> dict[str, dict[str, int]]:
    """A RateLimit or RateLimit-Policy header as {policy: {parameter: value}}."""
    out: dict[str, dict[str, int]] = {}
    for item in text.split(", "):
        name, *params = item.split(";")
        out[name.strip('"')] = {k: int(v) for k, v in (p.split("=") for p in params)}
    return out


def left(d: Decision) -> dict[str, int]:
    """Each policy's r, and the credit balance, as the client reads them."""
    h = headers(d)
    shown = {name: p["r"] for name, p in items(h["ratelimit"]).items()} if "ratelimit" in h else {}
    if "x-credits-remaining" in h:
        shown["X-Credits-Remaining"] = int(h["x-credits-remaining"])
    return shown


def r_within_q(d: Decision) -> None:
    h = headers(d)
    quotas = items(h["ratelimit-policy"])
    for name, p in items(h["ratelimit"]).items():
        assert 0 <= p["r"] <= quotas[name]["q"], (name, h)


def test_repeated_403s_show_what_is_left(go: Go[None]) -> None:
    """Three 403s (a feature the plan lacks) show the rate, allowance and credits of the request before them:
    nothing was taken (the issue's `"rate";r=3` going down, then X-Credits-Remaining: 99)."""

    async def fn(h: Harness) -> None:
        before = await h.decide("org", "POST", "/cheap")
        assert before.admitted and left(before) == {"rate": 9, "credits": 15, "X-Credits-Remaining": 15}
        for _ in range(3):
            denied = await h.decide("org", "POST", "/images")
            assert denied.status == 403 and denied.violated_policies == ["hd"]
            assert left(denied) == left(before)
            r_within_q(denied)
        exports = await h.decide("org", "POST", "/exports")
        assert left(exports) == {"rate": 8, "exports": 2, "X-Credits-Remaining": 15}
        for _ in range(3):
            denied = await h.decide("org", "POST", "/hd-exports")  # would take an export, but the feature denies
            assert denied.status == 403 and left(denied) == left(exports)
        assert (await h.field("org", "u:exports")) == "1" and (await h.field("org", "c:s")) == "5"

    go(fn)


def test_repeated_403s_at_a_cap_show_the_credits_not_spent(go: Go[None]) -> None:
    """A cap's 403 on a route that also spends: the cap reads 0 left, the credits read the balance before."""

    async def fn(h: Harness) -> None:
        for credits in (15, 10):
            project = await h.decide("org", "POST", "/projects")
            assert project.admitted and left(project)["credits"] == credits
        assert left(project) == {"rate": 8, "projects": 0, "credits": 10, "X-Credits-Remaining": 10}
        for _ in range(3):
            denied = await h.decide("org", "POST", "/projects")
            assert denied.status == 403 and denied.violated_policies == ["projects"]
            assert left(denied) == left(project)

    go(fn)


def test_repeated_429s_show_the_same_r(go: Go[None]) -> None:
    """429s of a route's rate limit show 0 for it and the plan's rate as before: not one unit per denial."""

    async def fn(h: Harness) -> None:
        assert (await h.decide("org", "GET", "/limited")).admitted
        last = await h.decide("org", "GET", "/limited")
        assert left(last) == {"rate": 8, "rate:GET /limited": 0, "X-Credits-Remaining": 20}
        for _ in range(4):
            denied = await h.decide("org", "GET", "/limited")
            assert denied.status == 429 and left(denied) == left(last)
            reset = items(headers(denied)["ratelimit"])["rate:GET /limited"]["t"]
            assert 1 <= reset <= 3600

    go(fn)


def test_repeated_402s_show_the_balance_not_spent(go: Go[None]) -> None:
    """402s show the balance and every other policy as before them."""

    async def fn(h: Harness) -> None:
        for _ in range(4):
            last = await h.decide("org", "POST", "/cheap")
        assert left(last) == {"rate": 6, "credits": 0, "X-Credits-Remaining": 0}
        for _ in range(3):
            denied = await h.decide("org", "POST", "/cheap")
            assert denied.status == 402 and left(denied) == left(last)
        assert (await h.decide("org", "POST", "/exports")).admitted  # the rate limit really still had 6

    go(fn)


def test_credits_r_never_above_q_with_purchased_credits(go: Go[None]) -> None:
    """q = the plan's 20 a period + the purchased credits on hand: r (the balance) stays within it as the
    allowance, then the purchased credits, are spent; a 402 shows the balance before it, also within q."""

    async def fn(h: Harness) -> None:
        granted = await h.engine.apply_grant("org", 1, 500)
        assert granted.status == "applied"
        seen: list[tuple[int, int]] = []
        for _ in range(6):
            d = await h.decide("org", "POST", "/cheap")
            assert d.admitted
            r_within_q(d)
            credits_item = items(headers(d)["ratelimit-policy"])["credits"]["q"], left(d)["credits"]
            seen.append(credits_item)
            assert left(d)["credits"] == left(d)["X-Credits-Remaining"] == d.credits
        # The allowance goes first (q stays 20 + 500), then purchased credits (q follows what is on hand).
        assert seen == [(520, 515), (520, 510), (520, 505), (520, 500), (515, 495), (510, 490)]
        status = await h.engine.status("org")
        assert status["credits"]["balance"] == 490 and status["credits"]["purchased"] == 490
        denied = await h.decide("org", "POST", "/huge")
        assert denied.status == 402
        r_within_q(denied)
        assert items(headers(denied)["ratelimit-policy"])["credits"]["q"] == 510
        assert left(denied)["credits"] == left(denied)["X-Credits-Remaining"] == 490

    go(fn)


def test_through_http_repeated_denials_show_what_is_left(tmp_path: Path) -> None:
    """The issue's case through the running gateway and a real redis-server: 403s on an HD route after a
    spend read the same RateLimit and X-Credits-Remaining as the spend before them."""
    with RedisServer() as server, serving(tmp_path, CATALOG.replace("/images", "/v1/images").replace("/cheap", "/v1/cheap"),
                                          redis_port=server.port, db_url=f"sqlite:///{tmp_path}/gw.db",
                                          billable_header="X-Org") as gw:
        org = {"X-Org": "org_http"}
        spend = httpx.post(f"{gw.url}/v1/cheap", headers=org)
        assert spend.status_code == 200
        assert re.fullmatch(r'"rate";r=9;t=\d+, "credits";r=15', spend.headers["ratelimit"])
        remaining = {name: p["r"] for name, p in items(spend.headers["ratelimit"]).items()}
        for _ in range(3):
            denied = httpx.post(f"{gw.url}/v1/images", headers=org)
            assert denied.status_code == 403 and denied.headers["x-credits-remaining"] == "15"
            assert {name: p["r"] for name, p in items(denied.headers["ratelimit"]).items()} == remaining
            assert denied.headers["ratelimit-policy"] == spend.headers["ratelimit-policy"]
        status = httpx.get(f"{gw.url}/_gateway/admin/billables/org_http", headers=ADMIN_HEADERS).json()
        assert status["credits"]["balance"] == 15 and status["rate_limits"]["rate"]["remaining"] == 9
