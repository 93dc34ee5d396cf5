"""The engine against real Redis and the embedded emulation: every rule of DESIGN §4 in one script call."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from engine_support import BASE, Harness, body, harness, headers
from services import shared_redis_url

from gateway.state import Restored, Subscription

T = TypeVar("T")
Go = Callable[[Callable[[Harness], Awaitable[T]]], T]


@pytest.fixture(params=["redis", "embedded"])
def go(request: pytest.FixtureRequest) -> Any:
    url = shared_redis_url() if request.param == "redis" else None
    with harness(url) as runner:
        yield runner


def test_rate_limit_burst_then_429(go: Go[None]) -> None:
    """A route rate limit admits its burst, then answers 429 with Retry-After and consumes nothing."""

    async def fn(h: Harness) -> None:
        first = await h.decide("org", "GET", "/limited")
        second = await h.decide("org", "GET", "/limited")
        third = await h.decide("org", "GET", "/limited")
        assert first.admitted and second.admitted and not third.admitted
        assert third.status == 429 and third.violated_policies == ["rate:GET /limited"]
        assert 1 <= (third.retry_after or 0) <= 30
        hdr = headers(first)
        assert hdr["ratelimit-policy"] == '"rate:GET /limited";q=2;w=60'
        assert hdr["ratelimit"].startswith('"rate:GET /limited";r=1;t=')
        assert headers(third)["retry-after"] == str(third.retry_after)
        problem = body(third, h.catalog)
        assert problem["type"] == "https://iana.org/assignments/http-problem-types#quota-exceeded"

    go(fn)


def test_persistent_cap_hold_release_and_403(go: Go[None]) -> None:
    """A cap admits up to `to`, then 403 limit-reached without Retry-After; a release gives one back."""

    async def fn(h: Harness) -> None:
        assert (await h.decide("org", "POST", "/projects")).admitted
        second = await h.decide("org", "POST", "/projects")
        assert second.admitted
        assert headers(second)["ratelimit"] == '"projects";r=0, "credits";r=10' or "projects" in headers(second)["ratelimit"]
        denied = await h.decide("org", "POST", "/projects")
        assert denied.status == 403 and denied.problem_type == "urn:gateway:limit-reached"
        assert "retry-after" not in headers(denied)
        problem = body(denied, h.catalog)
        assert problem["detail"] == (
            "You've reached your limit of 2 projects (currently using 2). Upgrade to Pro for higher limits."
        )
        assert problem["violated_policies"] == ["projects"] and problem["plan"] == "free"
        assert problem["upgrade_url"] == "https://example.com/pricing"
        await h.engine.release("org", "free", "projects")
        assert (await h.decide("org", "POST", "/projects")).admitted
        await h.engine.release("org", "free", "projects", units=10)
        assert await h.field("org", "u:projects") == "0"

    go(fn)


def test_cost_larger_than_limit_and_zero_limit(go: Go[None]) -> None:
    """A cost above the limit itself is 403 under every policy; a limit of 0 admits nothing."""

    async def fn(h: Harness) -> None:
        big = await h.decide("org", "POST", "/big-projects")
        assert big.status == 403 and big.problem_type == "urn:gateway:limit-reached"
        assert "more than your plan's limit of 2" in body(big, h.catalog)["detail"]
        zero = await h.decide("org", "POST", "/zero")
        assert zero.status == 403
        assert await h.field("org", "u:projects") is None

    go(fn)


def test_allowance_warnings_grace_and_block_once(go: Go[None]) -> None:
    """grace_then_block: warnings at thresholds once, grace starts on the first excess, then 429 and one block event."""

    async def fn(h: Harness) -> None:
        kinds: list[tuple[str, Any]] = []
        for _ in range(4):
            d = await h.decide("org", "POST", "/exports")
            assert d.admitted
            kinds += [(e["type"], e["data"].get("threshold")) for e in d.events]
        assert kinds == [("warning", 0.5), ("warning", 0.9), ("grace_start", None)]
        status = await h.engine.status("org")
        exports = status["limits"]["exports"]
        assert exports["grace_active"] and exports["usage"] == 4 and not exports["blocked"]
        # Grace of 1 h: pretend it began two hours ago.
        await h.set_field("org", "g:exports", int((time.time() - 7200) * 1000))
        denied = await h.decide("org", "POST", "/exports")
        again = await h.decide("org", "POST", "/exports")
        assert denied.status == again.status == 429
        assert [e["type"] for e in denied.events] == ["block"] and again.events == []
        assert (denied.retry_after or 0) > 3600  # to the end of the month
        assert (await h.engine.status("org"))["limits"]["exports"]["blocked"]
        assert await h.field("org", "u:exports") == "4"

    go(fn)


def test_grace_is_not_restarted_and_events_reach_the_list(go: Go[None]) -> None:
    """Grace starts once per window; the pending events list holds every event, in order, once."""

    async def fn(h: Harness) -> None:
        for _ in range(6):
            await h.decide("org", "POST", "/exports")
        events = await h.engine.pending_events("org")
        assert [e["type"] for e in events] == ["warning", "warning", "grace_start"]
        assert all(e["billable"] == "org" and e["plan"] == "free" and e["id"].startswith("evt_") for e in events)
        assert events[2]["data"]["grace_ends_at"].endswith("Z")
        again = await h.engine.pending_events("org")
        assert [e["id"] for e in again] == [e["id"] for e in events]
        await h.engine.ack_events("org", 2)
        assert [e["type"] for e in await h.engine.pending_events("org")] == ["grace_start"]

    go(fn)


def test_just_warn_admits_over_the_limit(go: Go[None]) -> None:
    """just_warn admits past the limit; headers show 0 remaining, never negative."""

    async def fn(h: Harness) -> None:
        for _ in range(3):
            d = await h.decide("org", "POST", "/reports")
            assert d.admitted
        assert '"reports";r=0;t=' in headers(d)["ratelimit"]
        assert (await h.engine.status("org"))["limits"]["reports"]["usage"] == 3

    go(fn)


def test_features_closed_by_default_and_every_violation_listed(go: Go[None]) -> None:
    """A feature outside the plan is 403 with the familiar sentence; nothing is consumed."""

    async def fn(h: Harness) -> None:
        d = await h.decide("org", "POST", "/images")
        assert d.status == 403 and d.violated_policies == ["hd"]
        problem = body(d, h.catalog)
        assert problem["type"] == "urn:gateway:feature-not-in-plan"
        assert problem["detail"] == (
            "Your current plan (Free) doesn't allow you to use HD images. Please upgrade to Pro or higher to access HD images."
        )
        assert (await h.engine.status("org"))["credits"]["balance"] == 10

    go(fn)


def test_limit_missing_from_plan_is_closed(go: Go[None]) -> None:
    """A route naming a limit the plan lacks is 403 feature-not-in-plan."""
    text = BASE.replace("[plans.enterprise]", "[plans.tiny]\nallows = []\n\n[plans.enterprise]")

    async def fn(h: Harness) -> None:
        await h.engine.set_assignment("org", "tiny")
        d = await h.decide("org", "POST", "/exports")
        assert d.status == 403 and d.problem_type == "urn:gateway:feature-not-in-plan"
        assert d.violated_policies == ["exports"]

    with harness(shared_redis_url(), text) as go_tiny:
        go_tiny(fn)


def test_credits_spend_402_and_grant(go: Go[None]) -> None:
    """Credits: spent from the allowance, 402 with the sentence when short, a grant admits again."""

    async def fn(h: Harness) -> None:
        first = await h.decide("org", "POST", "/cheap-images")
        assert first.admitted and first.credits == 5 and headers(first)["x-credits-remaining"] == "5"
        assert '"credits";q=10' in headers(first)["ratelimit-policy"]
        await h.decide("org", "POST", "/cheap-images")
        short = await h.decide("org", "POST", "/cheap-images")
        assert short.status == 402 and short.problem_type == "urn:gateway:insufficient-credits"
        assert body(short, h.catalog)["detail"] == "You're out of credits: this request needs 5 and you have 0."
        assert [e["type"] for e in short.events] == ["insufficient_credits"]
        result = await h.engine.apply_grant("org", 1, 7)
        assert (result.status, result.last_sequence, result.purchased_balance) == ("applied", 1, 7)
        again = await h.decide("org", "POST", "/cheap-images")
        assert again.admitted and again.credits == 2

    go(fn)


def test_credit_events_low_and_depleted(go: Go[None]) -> None:
    """credits_low fires crossing the threshold, credits_depleted reaching 0, each once per crossing."""

    async def fn(h: Harness) -> None:
        await h.engine.set_auto_recharge("org", enabled=False, threshold=6)
        first = await h.decide("org", "POST", "/cheap-images")
        second = await h.decide("org", "POST", "/cheap-images")
        assert [e["type"] for e in first.events] == ["credits_low"]
        assert [e["type"] for e in second.events] == ["credits_depleted"]

    go(fn)


def test_auto_recharge_lease_once(go: Go[None]) -> None:
    """A spend under the threshold starts one recharge; concurrent spends do not start a second."""

    async def fn(h: Harness) -> None:
        await h.engine.apply_grant("org", 1, 100)
        await h.engine.set_auto_recharge("org", enabled=True, threshold=108)
        first = await h.decide("org", "POST", "/cheap-images")
        second = await h.decide("org", "POST", "/cheap-images")
        assert first.recharge and not second.recharge
        await h.engine.end_recharge("org")
        assert (await h.decide("org", "POST", "/cheap-images")).recharge

    go(fn)


def test_metered_reserve_and_settle(go: Go[None]) -> None:
    """A metered operation holds its reserve, then settles to the units reported; settling twice changes nothing."""

    async def fn(h: Harness) -> None:
        await h.engine.apply_grant("org", 1, 200)
        d = await h.decide("org", "POST", "/chat")
        assert d.admitted and d.credits == 110  # 10 allowance + 200 purchased - 100 reserve
        assert d.hold is not None and d.hold.period_credits == 10 and d.hold.purchased_credits == 90
        assert (await h.engine.status("org"))["credits"]["held"] == 100
        balance = await h.engine.settle(d, give_back_limits=False, credits_owed=30)
        assert balance == 180
        assert await h.engine.settle(d, give_back_limits=False, credits_owed=30) is None
        status = (await h.engine.status("org"))["credits"]
        assert {k: status[k] for k in ("balance", "period", "purchased", "held", "debt")} == {
            "balance": 180, "period": 0, "purchased": 180, "held": 0, "debt": 0}

    go(fn)


def test_settle_above_reserve_makes_debt_paid_by_next_grant(go: Go[None]) -> None:
    """A settle above the reserve may go below zero; the next grant pays that debt first."""

    async def fn(h: Harness) -> None:
        await h.engine.apply_grant("org", 1, 90)
        d = await h.decide("org", "POST", "/chat")
        assert await h.engine.settle(d, give_back_limits=False, credits_owed=150) == -50
        assert (await h.decide("org", "POST", "/cheap-images")).status == 402
        result = await h.engine.apply_grant("org", 2, 70)
        assert result.purchased_balance == 20
        assert (await h.engine.status("org"))["credits"]["debt"] == 0

    go(fn)


def test_refund_returns_credits_and_limit_units(go: Go[None]) -> None:
    """A failed upstream answer gives back limit units and the whole reserve, to where they came from."""

    async def fn(h: Harness) -> None:
        p = await h.decide("org", "POST", "/projects")
        await h.engine.settle(p, give_back_limits=True, credits_owed=None)
        assert await h.field("org", "u:projects") == "0"
        c = await h.decide("org", "POST", "/cheap-images")
        assert await h.engine.settle(c, give_back_limits=True, credits_owed=0) == 10

    go(fn)


def test_request_priced_operation(go: Go[None]) -> None:
    """An operation priced from the request spends the cost the caller computed."""

    async def fn(h: Harness) -> None:
        d = await h.decide("org", "POST", "/priced", credit_cost=4)
        assert d.admitted and d.credits == 6
        denied = await h.decide("org", "POST", "/priced", credit_cost=8)
        assert denied.status == 402

    go(fn)


def test_denied_request_consumes_nothing(go: Go[None]) -> None:
    """All or nothing: a request denied by one policy takes nothing from the others."""

    async def fn(h: Harness) -> None:
        for _ in range(2):
            await h.decide("org", "POST", "/cheap-images")
        before = await h.engine.snapshot("org")
        denied = await h.decide("org", "POST", "/cheap-images")
        after = await h.engine.snapshot("org")
        assert denied.status == 402
        keep = lambda s: {k: v for k, v in s.items() if k not in {"chg", "eseq"}}
        assert keep(before.state) == keep(after.state)

    go(fn)


def test_plan_change_seen_by_every_process_on_next_request(go: Go[None]) -> None:
    """An assignment bumps the plan version: another process's cached plan goes stale on its next decision."""

    async def fn(h: Harness) -> None:
        other = h.other_engine()
        assert (await h.decide("org", "POST", "/images", engine=other)).status == 403
        await h.engine.set_assignment("org", "pro")
        d = await h.decide("org", "POST", "/images", engine=other)
        assert d.admitted and d.plan == "pro"
        assert (await h.engine.status("org"))["plan_source"] == "assignment"
        await h.engine.set_assignment("org", None)
        assert (await h.decide("org", "POST", "/images", engine=other)).plan == "free"

    go(fn)


def test_plan_change_keeps_the_period_spending(go: Go[None]) -> None:
    """Moving up makes the difference available; switching back and forth never yields a period twice."""

    async def fn(h: Harness) -> None:
        await h.decide("org", "POST", "/cheap-images")
        await h.decide("org", "POST", "/cheap-images")
        await h.engine.set_assignment("org", "pro")
        assert (await h.engine.status("org"))["credits"]["balance"] == 990
        await h.engine.set_assignment("org", None)
        assert (await h.engine.status("org"))["credits"]["balance"] == 0
        assert (await h.decide("org", "POST", "/cheap-images")).status == 402

    go(fn)


def test_subscription_past_due_grace(go: Go[None]) -> None:
    """An active subscription decides the plan; past_due keeps it during the grace and loses it after."""

    async def fn(h: Harness) -> None:
        await h.engine.set_subscription("org", Subscription("pro", "active"))
        assert (await h.decide("org", "POST", "/images")).plan == "pro"
        await h.engine.set_subscription("org", Subscription("pro", "past_due", time.time() - 3600))
        assert (await h.decide("org", "POST", "/images")).plan == "pro"
        await h.engine.set_subscription("org", Subscription("pro", "past_due", time.time() - 4 * 86400))
        assert (await h.decide("org", "POST", "/images")).plan == "free"
        await h.engine.set_subscription("org", Subscription("pro", "incomplete"))
        assert (await h.engine.status("org"))["plan_source"] == "default"

    go(fn)


def test_unlimited_counts_usage_and_never_denies(go: Go[None]) -> None:
    """unlimited never denies but still counts, credits included."""

    async def fn(h: Harness) -> None:
        await h.engine.set_assignment("org", "enterprise")
        for _ in range(30):
            d = await h.decide("org", "POST", "/projects")
            assert d.admitted
        assert (await h.decide("org", "POST", "/images")).admitted
        status = await h.engine.status("org")
        assert status["limits"]["projects"] == {**status["limits"]["projects"], "usage": 30, "limit": None, "remaining": None}
        assert status["credits"]["balance"] is None and await h.field("org", "c:s") == "5"

    go(fn)


def test_new_window_starts_from_zero(go: Go[None]) -> None:
    """When the calendar window moves on, an allowance starts again at 0 and warnings re-arm."""

    async def fn(h: Harness) -> None:
        for _ in range(4):
            await h.decide("org", "POST", "/exports")
        # The stored window is last month's as far as the script can tell.
        await h.set_field("org", "w:exports", 1)
        d = await h.decide("org", "POST", "/exports")
        assert d.admitted and d.events == []
        assert await h.field("org", "u:exports") == "1" and await h.field("org", "g:exports") == ""

    go(fn)


def test_billing_cycle_window_from_stored_period(go: Go[None]) -> None:
    """billing_cycle windows follow the stored period, extend when renewal is late, else the calendar month."""
    text = BASE.replace('limits.exports = { to = 100, per = "month" }', 'limits.exports = { to = 100, per = "billing_cycle" }')
    text = text.replace('limits.exports = { to = 3, per = "month", after_limit = "grace_then_block", grace = "1h", warn_at = [0.5, 0.9] }',
                        'limits.exports = { to = 3, per = "billing_cycle" }')

    async def fn(h: Harness) -> None:
        now = time.time()
        await h.engine.set_billing_period("org", (now - 86400, now + 86400))
        await h.decide("org", "POST", "/exports")
        status = (await h.engine.status("org"))["limits"]["exports"]
        assert status["window_start"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(now - 86400)))
        await h.engine.set_billing_period("org", (now - 5 * 86400, now - 2 * 86400))
        late = (await h.engine.status("org"))["limits"]["exports"]
        assert late["window_start"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(now - 2 * 86400)))
        assert late["usage"] == 0
        await h.engine.set_billing_period("org", None)
        assert (await h.engine.status("org"))["limits"]["exports"]["window_start"].endswith("-01T00:00:00Z")

    with harness(shared_redis_url(), text) as go_bc:
        go_bc(fn)


def test_grants_in_order_exactly_once(go: Go[None]) -> None:
    """Grants apply strictly in sequence: a repeat is a duplicate, a jump is a gap that applies nothing."""

    async def fn(h: Harness) -> None:
        assert (await h.engine.apply_grant("org", 1, 10)).status == "applied"
        assert (await h.engine.apply_grant("org", 1, 10)).status == "duplicate"
        gap = await h.engine.apply_grant("org", 3, 10)
        assert gap.status == "gap" and gap.last_sequence == 1 and gap.purchased_balance == 10
        taken = await h.engine.apply_grant("org", 2, -25)  # a refund larger than what is left becomes debt
        assert taken.purchased_balance == -15

    go(fn)


def test_set_count_backfills_a_cap(go: Go[None]) -> None:
    """An operator sets a cap's count from the app's own database."""

    async def fn(h: Harness) -> None:
        await h.engine.set_count("org", "projects", 2)
        assert (await h.decide("org", "POST", "/projects")).status == 403
        with pytest.raises(ValueError, match="not a persistent cap"):
            await h.engine.set_count("org", "exports", 1)

    go(fn)


def test_snapshot_and_restore(go: Go[None]) -> None:
    """A snapshot restored after the state is lost continues exactly where it was; live state wins over a restore."""

    async def fn(h: Harness) -> None:
        await h.engine.apply_grant("org", 1, 50)
        await h.decide("org", "POST", "/projects")
        snap = await h.engine.snapshot("org")
        for key in h.engine.keys("org"):
            await h.raw.delete(key)
        assert (await h.engine.restore_state("org", Restored(snap.state))).restored
        assert not (await h.engine.restore_state("org", Restored({"c:p": "999"}))).restored
        assert (await h.decide("org", "POST", "/projects")).admitted
        assert (await h.decide("org", "POST", "/projects")).status == 403
        assert (await h.engine.apply_grant("org", 1, 50)).status == "duplicate"

    go(fn)


def test_missing_state_is_restored_before_deciding(go: Go[None]) -> None:
    """With a record behind it, a billable missing from Redis is restored before its first decision."""

    async def fn(h: Harness) -> None:
        calls: list[str] = []

        async def restore(billable: str) -> Restored:
            calls.append(billable)
            return Restored({"u:projects": "2"})

        engine = h.other_engine(restore=restore)
        assert (await h.decide("org", "POST", "/projects", engine=engine)).status == 403
        assert (await h.decide("org", "POST", "/projects", engine=engine)).status == 403
        assert calls == ["org"]

    go(fn)


@pytest.mark.parametrize("billable", ["a}b", "{x}", "a:b:c", "ünï ☃", "gw:{other}", "", "%7B"])
def test_any_billable_id_is_safe(go: Go[None], billable: str) -> None:
    """Ids with braces, colons or unicode stay inside their own keys (no key injection)."""

    async def fn(h: Harness) -> None:
        keys = h.engine.keys(billable)
        assert all(k.count("{") == 1 and k.count("}") == 1 for k in keys)
        assert (await h.decide(billable, "POST", "/projects")).admitted
        assert (await h.decide(billable, "POST", "/projects")).admitted
        assert (await h.decide(billable, "POST", "/projects")).status == 403
        assert (await h.decide("other", "POST", "/projects")).admitted

    go(fn)


def test_status_of_a_billable_never_seen(go: Go[None]) -> None:
    """A billable never seen gets the default plan's status."""

    async def fn(h: Harness) -> None:
        status = await h.engine.status("nobody")
        assert status["plan"] == "free" and status["plan_source"] == "default"
        assert status["features"] == ["api_access"]
        assert status["limits"]["exports"]["usage"] == 0 and status["limits"]["exports"]["limit"] == 3
        assert status["credits"]["balance"] == 10
        json.dumps(status)

    go(fn)


def test_usage_history_counters(go: Go[None]) -> None:
    """Admitted requests, units and credits are counted per month, route and operation; give-backs undo them."""

    async def fn(h: Harness) -> None:
        await h.engine.apply_grant("org", 1, 500)
        d = await h.decide("org", "POST", "/chat")
        await h.engine.settle(d, give_back_limits=False, credits_owed=42, units=42)
        p = await h.decide("org", "POST", "/projects")
        await h.engine.settle(p, give_back_limits=True, credits_owed=None)
        await h.decide("org", "POST", "/projects")
        state = (await h.engine.snapshot("org")).state
        month = time.strftime("%Y-%m", time.gmtime())
        assert state[f"qr:{month}|POST /chat|chat"] == "1"
        assert state[f"qc:{month}|POST /chat|chat"] == "42" and state[f"qu:{month}|POST /chat|chat"] == "42"
        assert state[f"qr:{month}|POST /projects|"] == "1" and state[f"qu:{month}|POST /projects|"] == "1"

    go(fn)


def test_a_dry_decision_is_the_one_a_request_would_get_and_writes_nothing(go: Go[None]) -> None:
    """decide(dry=True) evaluates every policy as decide does, and leaves Redis as it was: no counters, no
    hold, no events, no rate cell, no warning or block marks."""

    async def fn(h: Harness) -> None:
        await h.engine.apply_grant("org", 1, 200)
        await h.decide("org", "POST", "/exports")
        for method, path in [("POST", "/chat"), ("POST", "/exports"), ("GET", "/limited"), ("POST", "/zero")]:
            before = await h.engine.snapshot("org")
            dry = await h.decide("org", method, path, dry=True)
            after = await h.engine.snapshot("org")
            assert (after.state, after.holds, after.pending_events) == (before.state, before.holds, before.pending_events)
            assert dry.hold is None and dry.events == []
            real = await h.decide("org", method, path)
            assert (dry.admitted, dry.violations, dry.credits) == (real.admitted, real.violations, real.credits), path
            assert [p[:5] for p in dry.policies] == [p[:5] for p in real.policies], path

    go(fn)


def test_the_status_reads_what_the_decisions_wrote_without_writing(go: Go[None]) -> None:
    """status.lua answers from the same rules as decide.lua (window, credits, GCRA) and changes nothing."""

    async def fn(h: Harness) -> None:
        await h.engine.apply_grant("org", 1, 200)
        await h.decide("org", "POST", "/exports")
        await h.decide("org", "GET", "/limited")
        before = await h.engine.snapshot("org")
        status = await h.engine.status("org")
        assert (await h.engine.snapshot("org")).state == before.state
        assert status["limits"]["exports"]["usage"] == 1
        assert status["rate_limits"]["rate:GET /limited"]["remaining"] == 1
        credits = {k: status["credits"][k] for k in ("balance", "period", "purchased", "held", "debt")}
        assert credits == {"balance": 210, "period": 10, "purchased": 200, "held": 0, "debt": 0}

    go(fn)
