"""Overage (issue 21 items 1-2): after_limit = "bill" admits past `to`, counts the units past it on the
limit's meter in the billable's state (saturating at the spend cap), and at the cap is block_usage with
its own sentence and one spend_cap_reached event; warnings at warn_at of the cap."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from engine_support import Harness, body, harness
from gateway_support import ADMIN_HEADERS, serving
from services import RedisServer, shared_redis_url

from gateway.catalog import parse_catalog
from gateway.errors import CatalogError

T = TypeVar("T")
Go = Callable[[Callable[[Harness], Awaitable[T]]], T]

CATALOG = """
[catalog]
default_plan = "free"

[plans.free]
price = 0
limits.calls = { to = 3, per = "month", after_limit = "bill", warn_at = [0.5], overage = { unit_price = "0.002", meter = "api_requests", max_per_period = "0.01" } }

[[routes]]
match = "POST /calls"
limit = "calls"

[[routes]]
match = "POST /batch"
limit = "calls"
cost = 2
"""


@pytest.fixture(params=["redis", "embedded"])
def go(request: pytest.FixtureRequest) -> Any:
    url = shared_redis_url() if request.param == "redis" else None
    with harness(url, CATALOG) as runner:
        yield runner


def test_overage_is_admitted_billed_to_the_cap_then_blocked(go: Go[None]) -> None:
    async def fn(h: Harness) -> None:
        events: list[tuple[str, Any]] = []
        for _ in range(3):
            assert (await h.decide("org", "POST", "/calls")).admitted
        within = (await h.engine.status("org"))["limits"]["calls"]
        assert not within["blocked"] and within["billed"]["units"] == 0 and within["billed"]["amount"] == "0.000"
        assert not [f for f in await h.raw.hkeys(f"{h.prefix}:{{org}}") if f.startswith("o:")]  # within `to`: nothing billed
        for _ in range(2):  # a batch of 2 units past `to`, twice: 4 billed
            d = await h.decide("org", "POST", "/batch")
            assert d.admitted
            events += [(e["type"], e["data"].get("threshold")) for e in d.events]
        d = await h.decide("org", "POST", "/calls")  # the 5th billed unit: the cap (0.01 / 0.002)
        assert d.admitted
        events += [(e["type"], e["data"].get("threshold")) for e in d.events]
        assert events == [("spend_warning", 0.5)]
        denied = await h.decide("org", "POST", "/calls")
        again = await h.decide("org", "POST", "/calls")
        assert not denied.admitted and denied.status == 402
        problem = body(denied, h.catalog)
        assert problem["type"] == "urn:gateway:spend-cap-reached"
        assert "spend cap of 0.01 USD" in problem["detail"] and "5 billed at 0.002 each" in problem["detail"]
        assert [e["type"] for e in denied.events] == ["spend_cap_reached"] and again.events == []
        status = (await h.engine.status("org"))["limits"]["calls"]
        assert status["blocked"] and status["usage"] == 8 and status["severity"] == "blocked"
        assert status["message"].startswith("You've reached this period's spend cap of 0.01 USD for calls")
        assert status["billed"] == {"meter": "api_requests", "units": 5, "unit_price": "0.002", "amount": "0.010", "currency": "usd",
                                    "cap": "0.01", "cap_units": 5, "cap_reached": True, "cap_left": "0.000", "cap_units_left": 0}  # fmt: skip
        fields = await h.raw.hgetall(f"{h.prefix}:{{org}}")
        billed = {k: v for k, v in fields.items() if k.startswith("o:")}
        assert list(billed.values()) == ["5"] and fields["u:calls"] == "8"

    go(fn)


def test_a_billed_limit_is_checked_where_it_is_written() -> None:
    bad = {
        'after_limit = "bill" }': 'after_limit = "bill" needs overage',
        'after_limit = "bill", per = "month", overage = { unit_price = 0.002, meter = "m" } }': "decimal string",
        'after_limit = "bill", per = "month", overage = { unit_price = "0.002x", meter = "m" } }': "is not a decimal amount",
        'per = "month", overage = { unit_price = "0.002", meter = "m" } }': 'overage only applies with after_limit = "bill"',
        'after_limit = "bill", overage = { unit_price = "0.002", meter = "m" } }': 'needs per = "month"',
    }
    for tail, message in bad.items():
        text = f'[plans.free]\nprice = 0\nlimits.calls = {{ to = 3, {tail}\n'
        with pytest.raises(CatalogError) as caught:
            parse_catalog(text)
        assert "plans.free.limits.calls" in str(caught.value) and message in str(caught.value), str(caught.value)


SERVED = """
[catalog]
default_plan = "pro"
currency = "usd"

[meters.api_requests]
stripe_meter = "api_requests"

[plans.pro]
price = 29
limits.calls = { to = 2, per = "month", after_limit = "bill", overage = { unit_price = "0.002", meter = "api_requests", max_per_period = "200.00" } }

[operations.search]
metered = { meter = "searches", unit_price = "0.015" }

[[routes]]
match = "POST /v1/calls"
limit = "calls"

[[routes]]
match = "POST /v1/search"
spend = "search"
"""


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def test_the_customer_and_the_operator_see_the_billed_units_the_amount_and_the_cap(tmp_path: Path, redis_server: RedisServer) -> None:
    """Over-limit requests billed as overage and pay-as-you-go searches, through the proxy: the customer's
    status (/_gateway/usage), the operator's (the admin status, the invoice preview) and the account page show
    the period's billed units per meter, the amount so far, and the spend cap with what it leaves."""
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'gw.db'}"
    with serving(tmp_path, SERVED, redis_port=redis_server.port, db_url=db_url) as gw:
        made = httpx.post(f"{gw.url}/_gateway/admin/keys", json={"billable": "org_1"}, headers=ADMIN_HEADERS)
        key = {"Authorization": f"Bearer {made.json()['key']}"}
        before = httpx.get(f"{gw.url}/_gateway/usage", headers=key, timeout=10).json()
        assert before["pay_as_you_go"]["searches"]["units"] == 0 and before["invoice"]["total"] == "29.00"
        for _ in range(7):  # 2 within, 5 billed
            assert httpx.post(f"{gw.url}/v1/calls", headers=key, timeout=10).status_code == 200
        for _ in range(3):  # pay-as-you-go: 3 searches
            assert httpx.post(f"{gw.url}/v1/search", headers=key, timeout=10).status_code == 200
        usage = httpx.get(f"{gw.url}/_gateway/usage", headers=key, timeout=10).json()
        operator = httpx.get(f"{gw.url}/_gateway/admin/billables/org_1", headers=ADMIN_HEADERS, timeout=10).json()
        for status in (usage, operator):
            calls = status["limits"]["calls"]
            assert calls["billed"] == {"meter": "api_requests", "units": 5, "unit_price": "0.002", "amount": "0.010", "currency": "usd",
                                       "cap": "200.00", "cap_units": 100_000, "cap_reached": False, "cap_left": "199.990",
                                       "cap_units_left": 99_995}  # fmt: skip
            assert (calls["blocked"], calls["severity"], calls["message"]) == (False, "ok", None)  # past `to` is billed, not refused
            searches = status["pay_as_you_go"]["searches"]
            assert {k: searches[k] for k in ("units", "unit_price", "amount", "currency", "operations")} == {
                "units": 3, "unit_price": "0.015", "amount": "0.045", "currency": "usd", "operations": ["search"]}  # fmt: skip
            assert searches["window_start"] == calls["window_start"] and searches["window_end"] == calls["window_end"]
            lines = [(line["kind"], line["quantity"], line["unit_price"], line["amount"]) for line in status["invoice"]["lines"]]
            assert lines == [("plan", 1, "29", "29.00"), ("overage", 5, "0.002", "0.01"), ("pay_as_you_go", 3, "0.015", "0.05")]
            assert status["invoice"]["total"] == "29.06" and status["invoice"]["currency"] == "usd"
        preview = httpx.get(f"{gw.url}/_gateway/admin/billables/org_1/invoice-preview", headers=ADMIN_HEADERS, timeout=10)
        assert preview.status_code == 200, preview.text
        assert preview.json() == {"billable": "org_1", "plan": "pro", **usage["invoice"]}
        page = httpx.get(f"{gw.url}/_gateway/account", headers=key, timeout=10).text
        assert "Past the limit: 5 billed at 0.002 USD each, 0.010 USD so far this period; spend cap 200.00 USD." in page
        shown = re.findall(r'<tr data-line="(\w+)" data-meter="(\w*)"><td class="item">[^<]*</td><td class="num">([\d,]+)</td>'
                           r'<td class="num">([\d.]+)</td><td class="num amount">([\d.]+)</td></tr>', page)  # fmt: skip
        assert shown == [("plan", "", "1", "29", "29.00"), ("overage", "api_requests", "5", "0.002", "0.01"),
                         ("pay_as_you_go", "searches", "3", "0.015", "0.05")]  # fmt: skip
        assert 'data-total="29.06">29.06</td>' in page and "Amounts in USD" in page
        assert 'data-cap="calls" data-cap-left="199.990">Calls: spend cap 200.00 USD, 199.990 USD left.</p>' in page


def test_a_request_given_back_is_not_billed(go: Go[None]) -> None:
    """A billed request whose answer failed (its settle gives the limits back) takes its billed units back."""

    async def fn(h: Harness) -> None:
        for _ in range(4):  # 3 within, 1 billed
            assert (await h.decide("org", "POST", "/calls")).admitted
        failed = await h.decide("org", "POST", "/batch")  # 2 more billed, then given back
        assert failed.admitted and failed.hold is not None
        assert (await h.engine.status("org"))["limits"]["calls"]["billed"]["units"] == 3
        await h.engine.settle(failed, give_back_limits=True, credits_owed=None)
        status = (await h.engine.status("org"))["limits"]["calls"]
        assert (status["usage"], status["billed"]["units"]) == (4, 1)
        kept = await h.decide("org", "POST", "/calls")
        await h.engine.settle(kept, give_back_limits=False, credits_owed=None)
        assert (await h.engine.status("org"))["limits"]["calls"]["billed"]["units"] == 2

    go(fn)


PAYG = """
[catalog]
default_plan = "free"

[operations.search]
metered = { meter = "searches", unit_price = "0.01" }

[operations.chat]
metered = { meter = "tokens", unit_price = "0.00001" }
units = "response.json:usage.total_tokens"
max_units = 1000

[plans.free]
price = 0

[[routes]]
match = "POST /search"
spend = "search"

[[routes]]
match = "POST /chat"
spend = "chat"
"""


@pytest.fixture(params=["redis", "embedded"])
def payg(request: pytest.FixtureRequest) -> Any:
    url = shared_redis_url() if request.param == "redis" else None
    with harness(url, PAYG) as runner:
        yield runner


def test_pay_as_you_go_bills_every_unit(payg: Go[None]) -> None:
    """metered = { meter, unit_price } on an operation: a request is a unit billed at once (not when it is
    given back); one priced from the answer bills the units the settle reports (at most max_units)."""

    async def fn(h: Harness) -> None:
        async def billed() -> dict[str, str]:
            fields = await h.raw.hgetall(f"{h.prefix}:{{org}}")
            return {k.partition("|")[0]: v for k, v in fields.items() if k.startswith("o:")}

        for _ in range(3):
            assert (await h.decide("org", "POST", "/search")).admitted
        failed = await h.decide("org", "POST", "/search")
        await h.engine.settle(failed, give_back_limits=True, credits_owed=0)
        assert await billed() == {"o:searches": "3"}
        chat = await h.decide("org", "POST", "/chat")
        assert chat.admitted and chat.hold is not None and chat.hold.id
        assert "o:tokens" not in await billed()  # nothing until the answer says how many
        await h.engine.settle(chat, give_back_limits=False, credits_owed=0, units=120)
        again = await h.decide("org", "POST", "/chat")
        await h.engine.settle(again, give_back_limits=False, credits_owed=0, units=1000)
        assert await billed() == {"o:searches": "3", "o:tokens": "1120"}

    payg(fn)


def test_pay_as_you_go_is_checked_where_it_is_written() -> None:
    bad = '[operations.x]\nmetered = { meter = "m", unit_price = "0.01" }\nunits = "request.json:n"\n[plans.free]\nprice = 0\n'
    with pytest.raises(CatalogError) as caught:
        parse_catalog(bad)
    assert "operations.x" in str(caught.value) and "metered units are read from the answer" in str(caught.value)
    with pytest.raises(CatalogError) as caught:
        parse_catalog('[operations.x]\nmetered = { meter = "m", unit_price = 0.01 }\n[plans.free]\nprice = 0\n')
    assert "operations.x.metered.unit_price" in str(caught.value) and "decimal string" in str(caught.value)
    priced = '[operations.{0}]\nmetered = {{ meter = "m", unit_price = "{1}" }}\n'
    limit = '[plans.free]\nprice = 0\nlimits.calls = { to = 1, per = "month", after_limit = "bill", overage = { unit_price = "0.1", meter = "c" } }\n'
    with pytest.raises(CatalogError) as caught:  # two prices on one meter: its units are one count
        parse_catalog(priced.format("a", "0.01") + priced.format("b", "0.02") + limit)
    assert "operations.b.metered.meter" in str(caught.value) and 'billed at 0.01 by operation "a"' in str(caught.value)
    parse_catalog(priced.format("a", "0.01") + priced.format("b", "0.01") + limit)  # one price: one meter is fine
    with pytest.raises(CatalogError) as caught:  # an overage meter: the same month's counter
        parse_catalog(priced.format("a", "0.01").replace('"m"', '"c"') + limit)
    assert "operations.a.metered.meter" in str(caught.value) and "also a limit's overage meter" in str(caught.value)
