"""Credits bought through Stripe: packs, refunds, auto-recharge; never doubled across retries, crashes and repairs."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from billing_support import Env, add_plan_prices, billing_env, stripe_server
from fake_stripe import FakeStripe
from services import RedisSpace

from gateway.store.db import credit_grants


@pytest.fixture(scope="module")
def stripe_api() -> Iterator[tuple[FakeStripe, str, dict[str, str]]]:
    with stripe_server() as (fake, url):
        yield fake, url, add_plan_prices(fake)


async def balance(env: Env, billable: str) -> dict[str, Any]:
    credits: dict[str, Any] = (await env.status(billable))["credits"]
    return credits


async def grants_of(env: Env, billable: str) -> list[tuple[int, str]]:
    async with env.db.engine.connect() as conn:
        rows = await conn.execute(
            sa.select(credit_grants.c.amount, credit_grants.c.source).where(credit_grants.c.billable == billable).order_by(credit_grants.c.seq)
        )
        return [(r[0], r[1]) for r in rows]


async def spend_until_recharge(env: Env, billable: str) -> None:
    """Spend 10 credits at a time until a decision takes the auto-recharge lease, then hand it to billing."""
    for _ in range(20):
        decision = await env.decide(billable, "POST /images")
        if decision.recharge:
            env.billing.on_decision(decision)
            await env.billing.recharger.wait()
            return
    raise AssertionError("no decision took the auto-recharge lease")


def test_pack_checkout_is_fulfilled_once_and_refunds_take_back_in_proportion(
    stripe_api: Any, empty_db_url: str, redis_space: RedisSpace
) -> None:
    """A pack's Checkout link (admin and the client's own), fulfilled once whichever of its events come, in any
    order and twice; a half refund takes back half the credits, a full one the rest, as debt once spent."""
    fake, url, _ = stripe_api

    async def main() -> None:
        async with billing_env(fake, url, empty_db_url, redis_space) as env:
            billable = env.billable()
            r = await env.admin("POST", f"/_gateway/admin/billables/{billable}/packs/starter/checkout", {})
            assert r.status_code == 201, r.text
            session = fake.get("checkout_sessions", r.json()["id"])
            assert r.json()["url"].startswith("https://checkout.stripe.test/") and r.json()["credits"] == 1100
            assert session["amount_total"] == 900 and session["success_url"] == "https://example.com/pricing"
            assert session["metadata"] == {"gateway": "pack", "billable": billable, "pack": "starter", "credits": "1100"}
            assert fake.get("customers", session["customer"])["metadata"] == {"billable": billable}

            mine = await env.http.post("/_gateway/usage/packs/starter/checkout", headers={"X-Test-Billable": billable},
                                       json={"success_url": "https://app.example.com/thanks"})
            assert mine.status_code == 201 and fake.get("checkout_sessions", mine.json()["id"])["customer"] == session["customer"]
            assert (await env.http.post("/_gateway/usage/packs/starter/checkout")).status_code == 401
            assert (await env.admin("POST", f"/_gateway/admin/billables/{billable}/packs/nope/checkout")).status_code == 404

            paid = fake.complete_checkout(session["id"])
            events = [
                fake.event("checkout.session.completed", paid),
                fake.event("payment_intent.succeeded", fake.view("payment_intents", paid["payment_intent"])),
            ]
            random.seed(3)
            for event in random.sample(events * 2, 4):
                assert (await env.deliver(event)).status_code == 200
            assert (await balance(env, billable))["purchased"] == 1100
            assert await grants_of(env, billable) == [(1100, "pack")]

            fake.refund(paid["payment_intent"], 450)  # half of 900 cents
            await env.deliver(fake.event("charge.refunded", fake.view("charges", fake.get("payment_intents", paid["payment_intent"])["latest_charge"])))
            assert (await balance(env, billable))["purchased"] == 550
            for _ in range(11):  # 100 of the free allowance, then 1000 purchased... 550 purchased are all there is
                await env.decide(billable, "POST /images")
            spent = await balance(env, billable)
            refund = fake.refund(paid["payment_intent"])  # the rest
            event = fake.event("refund.created", refund)
            await env.deliver(event)
            await env.deliver(event)
            after = await balance(env, billable)
            assert after["purchased"] == 0 and after["debt"] == 550 - spent["purchased"]
            assert [a for a, _ in await grants_of(env, billable)] == [1100, -550, -550]

    asyncio.run(main())


def test_a_refund_seen_before_its_payment_is_taken_back_when_it_is_credited(
    stripe_api: Any, empty_db_url: str, redis_space: RedisSpace
) -> None:
    """Order not trusted: the refund's event first, then the payment's, still nets out."""
    fake, url, _ = stripe_api

    async def main() -> None:
        async with billing_env(fake, url, empty_db_url, redis_space) as env:
            billable = env.billable()
            r = await env.admin("POST", f"/_gateway/admin/billables/{billable}/packs/starter/checkout", {})
            paid = fake.complete_checkout(r.json()["id"])
            refund = fake.refund(paid["payment_intent"], 300)
            assert (await env.deliver(fake.event("refund.created", refund))).status_code == 200
            assert (await env.deliver(fake.event("checkout.session.completed", paid))).status_code == 200
            assert (await balance(env, billable))["purchased"] == 1100 - 1100 * 300 // 900

    asyncio.run(main())


def test_auto_recharge_fails_on_the_card_then_succeeds_counted_once(
    stripe_api: Any, empty_db_url: str, redis_space: RedisSpace
) -> None:
    """A declined card: auto_recharge_failed, a retry after the backoff succeeds; the webhook of that PaymentIntent
    arriving after the API's answer credits nothing more; the lease is given back."""
    fake, url, _ = stripe_api

    async def main() -> None:
        async with billing_env(fake, url, empty_db_url, redis_space) as env:
            billable = env.billable()
            customer = fake.add_customer(billable, payment_method="pm_card_flaky")
            await env.link(billable, customer["id"])
            fake.card_outcomes["pm_card_flaky"] = ["decline"]
            r = await env.admin("PUT", f"/_gateway/admin/billables/{billable}/auto-recharge",
                                {"enabled": True, "amount_cents": 500, "threshold": 50})
            assert r.status_code == 200
            await spend_until_recharge(env, billable)

            assert await grants_of(env, billable) == [(500, "auto_recharge")]
            assert await env.outbox(billable) == ["auto_recharge_failed", "auto_recharge_succeeded"]
            intents = [pi for pi in fake.db["payment_intents"].values() if pi["customer"] == customer["id"]]
            assert sorted(pi["status"] for pi in intents) == ["requires_payment_method", "succeeded"]
            paid = next(pi for pi in intents if pi["status"] == "succeeded")
            assert paid["off_session"] is True and paid["payment_method"] == "pm_card_flaky"
            assert paid["metadata"] == {"gateway": "auto_recharge", "billable": billable, "credits": "500"}

            for _ in range(2):
                assert (await env.deliver(fake.event("payment_intent.succeeded", paid))).status_code == 200
            declined = next(pi for pi in intents if pi["status"] != "succeeded")
            assert (await env.deliver(fake.event("payment_intent.payment_failed", declined))).status_code == 200
            assert await grants_of(env, billable) == [(500, "auto_recharge")]
            assert await env.outbox(billable) == ["auto_recharge_failed", "auto_recharge_succeeded"]
            assert "ar:lease" not in (await env.engine.snapshot(billable)).state

    asyncio.run(main())


def test_a_charge_that_needs_the_customer_is_a_failure(
    stripe_api: Any, empty_db_url: str, redis_space: RedisSpace
) -> None:
    """requires_action (3-D Secure) is a failure: the PaymentIntent is canceled, no credits, a failed event per attempt."""
    fake, url, _ = stripe_api

    async def main() -> None:
        async with billing_env(fake, url, empty_db_url, redis_space, recharge_delays=(0.01,)) as env:
            billable = env.billable()
            customer = fake.add_customer(billable, payment_method="pm_card_3ds")
            fake.card_outcomes["pm_card_3ds"] = ["requires_action", "requires_action"]
            await env.engine.set_auto_recharge(billable, enabled=True, threshold=50, amount_cents=500)
            await spend_until_recharge(env, billable)
            assert await grants_of(env, billable) == []
            assert await env.outbox(billable) == ["auto_recharge_failed", "auto_recharge_failed"]
            assert {pi["status"] for pi in fake.db["payment_intents"].values() if pi["customer"] == customer["id"]} == {"canceled"}
            assert "ar:lease" not in (await env.engine.snapshot(billable)).state

    asyncio.run(main())


def test_credits_are_never_doubled_across_crashes_retries_and_repairs(
    stripe_api: Any, empty_db_url: str, redis_space: RedisSpace
) -> None:
    """The charge went through but the process died before recording it: the lease stays; the webhook credits it;
    the same attempt retried gets the same PaymentIntent back (Idempotency-Key); the repair pass adds nothing."""
    fake, url, _ = stripe_api

    async def main() -> None:
        async with billing_env(fake, url, empty_db_url, redis_space, recharge_delays=()) as env:
            billable = env.billable()
            fake.add_customer(billable, payment_method="pm_card_ok")
            await env.engine.set_auto_recharge(billable, enabled=True, threshold=50, amount_cents=1000)
            real_credit = env.billing.payments.credit
            calls = 0

            async def crash(*args: Any, **kwargs: Any) -> Any:
                nonlocal calls
                calls += 1
                raise ConnectionError("the process died here")

            env.billing.payments.credit = crash  # type: ignore[method-assign]
            await spend_until_recharge(env, billable)
            assert calls == 1 and await grants_of(env, billable) == []
            state = (await env.engine.snapshot(billable)).state
            assert "ar:lease" in state  # kept: nobody charges again before this one is credited

            env.billing.payments.credit = real_credit  # type: ignore[method-assign]
            paid = next(pi for pi in fake.db["payment_intents"].values() if pi["metadata"].get("billable") == billable)
            assert (await env.deliver(fake.event("payment_intent.succeeded", paid))).status_code == 200
            assert await grants_of(env, billable) == [(1000, "auto_recharge")]

            charged = fake.count("payment_intents")
            assert await env.billing.recharger.run(billable) == "succeeded"  # the same lease, attempt 0: a replay
            assert fake.count("payment_intents") == charged
            repaired = await env.billing.repair.run_once()
            assert paid["id"] not in repaired.payments
            assert await grants_of(env, billable) == [(1000, "auto_recharge")]
            assert await env.outbox(billable) == ["auto_recharge_succeeded"]
            assert (await balance(env, billable))["purchased"] == 1000

    asyncio.run(main())


def test_the_repair_pass_applies_what_webhooks_missed_once(
    stripe_api: Any, empty_db_url: str, redis_space: RedisSpace
) -> None:
    """No webhook arrived: the pass finds the subscription, the paid pack and the refund, and repairs each once."""
    fake, url, prices = stripe_api

    async def main() -> None:
        async with billing_env(fake, url, empty_db_url, redis_space) as env:
            billable = env.billable()
            customer = fake.add_customer(billable)
            now = int(time.time())
            sub = fake.subscribe(customer["id"], prices["scale"], start=now - 3600, end=now + 29 * 86400)
            r = await env.admin("POST", f"/_gateway/admin/billables/{billable}/packs/starter/checkout", {})
            paid = fake.complete_checkout(r.json()["id"])
            refund = fake.refund(paid["payment_intent"], 90)

            done = await env.billing.repair.run_once()
            assert sub["id"] in done.subscriptions and paid["payment_intent"] in done.payments
            assert refund["status"] == "succeeded"  # taken back with its payment, when that was credited
            assert (await env.status(billable))["plan"] == "scale"
            assert (await balance(env, billable))["purchased"] == 1100 - 110
            assert (await env.billing.repair.run_once()).total == 0
            later = fake.refund(paid["payment_intent"], 180)
            assert (await env.billing.repair.run_once()).refunds == [later["id"]]
            assert (await balance(env, billable))["purchased"] == 1100 - 110 - 220

            fake.update_subscription(sub["id"], status="canceled")
            again = await env.billing.repair.run_once()
            assert again.subscriptions == [sub["id"]] and (await env.status(billable))["plan"] == "free"
            assert [a for a, _ in await grants_of(env, billable)] == [1100, -110, -220]

    asyncio.run(main())
