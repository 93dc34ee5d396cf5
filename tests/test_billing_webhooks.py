"""Stripe webhooks: verified, processed once, order not trusted; subscriptions drive plans and billing windows."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from billing_support import Env, add_plan_prices, billing_env, stripe_server
from fake_stripe import FakeStripe
from http_servers import closed_port
from services import RedisSpace

from gateway.store.db import stripe_events, subscriptions
from gateway.store.redis import open_redis

DAY = 86400


@pytest.fixture(scope="module")
def stripe_api() -> Iterator[tuple[FakeStripe, str, dict[str, str]]]:
    with stripe_server() as (fake, url):
        yield fake, url, add_plan_prices(fake)


async def twice(env: Env, event: dict[str, Any]) -> dict[str, Any]:
    """Deliver an event twice: the second is answered as a duplicate and changes nothing."""
    first = await env.deliver(event)
    assert first.status_code == 200, first.text
    again = await env.deliver(event)
    assert again.status_code == 200 and again.json()["duplicate"] is True, again.text
    body: dict[str, Any] = first.json()
    return body


async def plan(env: Env, billable: str) -> tuple[str, str]:
    status = await env.status(billable)
    return status["plan"], status["plan_source"]


async def period(env: Env, billable: str) -> tuple[int, int] | None:
    state = (await env.engine.snapshot(billable)).state
    return (int(state["bp_s"]) // 1000, int(state["bp_e"]) // 1000) if "bp_s" in state else None


async def recorded_events(env: Env) -> int:
    async with env.db.engine.connect() as conn:
        return int((await conn.execute(sa.select(sa.func.count()).select_from(stripe_events))).scalar() or 0)


def test_bad_signature_old_timestamp_and_malformed_body_are_refused(
    stripe_api: Any, empty_db_url: str, redis_space: RedisSpace
) -> None:
    """400 with a clear reason and no effect: wrong secret, no header, an old timestamp, a body that is not an event."""
    fake, url, prices = stripe_api

    async def main() -> None:
        async with billing_env(fake, url, empty_db_url, redis_space) as env:
            billable = env.billable()
            customer = fake.add_customer(billable)
            event = fake.event("customer.subscription.created", fake.subscribe(customer["id"], prices["pro"]))

            wrong = await env.deliver(event, secret="whsec_other")
            assert wrong.status_code == 400 and "No signatures found matching" in wrong.json()["detail"]
            unsigned = await env.http.post("/_gateway/stripe/webhook", content=json.dumps(event).encode())
            assert unsigned.status_code == 400 and unsigned.json()["detail"] == "No Stripe-Signature header."
            old = await env.deliver(event, timestamp=int(time.time()) - 301)
            assert old.status_code == 400 and "tolerance" in old.json()["detail"]
            future = await env.deliver(event, timestamp=int(time.time()) + 3600)
            assert future.status_code == 400 and "future" in future.json()["detail"]
            tampered = json.dumps(event)
            r = await env.http.post(
                "/_gateway/stripe/webhook",
                content=tampered.replace("active", "trialing").encode(),
                headers={"Stripe-Signature": __import__("fake_stripe").sign(tampered, "whsec_test_secret")},
            )
            assert r.status_code == 400
            for body, reason in (("{not json", "not JSON"), ("[1, 2]", "not a Stripe event"),
                                 ('{"id": "evt_1", "type": "customer.subscription.created", "data": {}}', "no data.object")):
                r = await env.deliver({}, body=body)
                assert r.status_code == 400 and reason in r.json()["detail"], r.text
            huge = await env.deliver({}, body=" " * (1 << 20) + "{}")
            assert huge.status_code == 413
            assert await plan(env, billable) == ("free", "default")
            assert await recorded_events(env) == 0

            assert (await env.deliver(event)).status_code == 200
            assert await plan(env, billable) == ("pro", "subscription")

    asyncio.run(main())


def test_subscription_lifecycle_twice_and_out_of_order(
    stripe_api: Any, empty_db_url: str, redis_space: RedisSpace
) -> None:
    """created → upgraded → paused → resumed → cancel at period end → deleted, each event delivered twice; then
    every event again, shuffled, and fresh copies too: the state is always what Stripe says now."""
    fake, url, prices = stripe_api

    async def main() -> None:
        async with billing_env(fake, url, empty_db_url, redis_space) as env:
            billable = env.billable()
            customer = fake.add_customer()
            assert await env.link(billable, customer["id"]) == customer["id"]
            assert fake.get("customers", customer["id"])["metadata"] == {"billable": billable}
            start = int(time.time()) - 2 * DAY
            sub = fake.subscribe(customer["id"], prices["pro"], start=start, end=start + 30 * DAY)
            sent: list[dict[str, Any]] = []

            async def step(kind: str, **changes: Any) -> dict[str, Any]:
                obj = fake.update_subscription(sub["id"], **changes) if changes else fake.view("subscriptions", sub["id"])
                event = fake.event(kind, obj)
                sent.append(event)
                return await twice(env, event)

            body = await step("customer.subscription.created")
            assert body["plan"] == "pro" and body["billable"] == billable
            assert await plan(env, billable) == ("pro", "subscription")
            assert await period(env, billable) == (start, start + 30 * DAY)

            await step("customer.subscription.updated", price=prices["scale"])
            assert await plan(env, billable) == ("scale", "subscription")
            await step("customer.subscription.paused", status="paused")
            assert await plan(env, billable) == ("free", "default")
            assert await period(env, billable) is None
            await step("customer.subscription.resumed", status="active")
            assert await plan(env, billable) == ("scale", "subscription")
            await step("customer.subscription.updated", cancel_at_period_end=True)
            assert await plan(env, billable) == ("scale", "subscription")
            async with env.db.engine.connect() as conn:
                row = (await conn.execute(sa.select(subscriptions).where(subscriptions.c.id == sub["id"]))).one()
            assert row.cancel_at_period_end and row.price == prices["scale"] and row.billable == billable
            await step("customer.subscription.deleted", status="canceled")
            assert await plan(env, billable) == ("free", "default")
            assert await period(env, billable) is None  # the calendar month again

            random.seed(7)
            shuffled = sent[:]
            random.shuffle(shuffled)
            for event in shuffled:
                r = await env.deliver(event)
                assert r.status_code == 200 and r.json()["duplicate"] is True
            for event in shuffled:  # the same stale copies under new ids: fetched, so still "canceled"
                assert (await env.deliver({**event, "id": event["id"] + "_again"})).status_code == 200
            assert await plan(env, billable) == ("free", "default")
            assert await recorded_events(env) == 2 * len(sent)
            # free → pro → scale → free → scale → free: one plan_changed each, none for the repeats.
            assert await env.outbox(billable) == ["plan_changed"] * 5

    asyncio.run(main())


def test_incomplete_changes_nothing_and_trial_counts(
    stripe_api: Any, empty_db_url: str, redis_space: RedisSpace
) -> None:
    """An incomplete subscription changes nothing; a trialing one gives its plan and its trial period as the window."""
    fake, url, prices = stripe_api

    async def main() -> None:
        async with billing_env(fake, url, empty_db_url, redis_space) as env:
            billable = env.billable()
            customer = fake.add_customer(billable)  # linked by the merchant's own code: metadata.billable only
            incomplete = fake.subscribe(customer["id"], prices["scale"], status="incomplete")
            await twice(env, fake.event("customer.subscription.created", incomplete))
            assert await plan(env, billable) == ("free", "default")
            assert await period(env, billable) is None

            now = int(time.time())
            trial = fake.subscribe(customer["id"], prices["pro"], status="trialing", start=now, end=now + 14 * DAY,
                                   trial_end=now + 14 * DAY)
            await twice(env, fake.event("customer.subscription.created", trial))
            assert await plan(env, billable) == ("pro", "subscription")
            assert await period(env, billable) == (now, now + 14 * DAY)
            await twice(env, fake.event("customer.subscription.updated", fake.view("subscriptions", incomplete["id"])))
            assert await plan(env, billable) == ("pro", "subscription")

    asyncio.run(main())


def test_upgrade_and_downgrade_mid_period_never_yield_a_period_twice(
    stripe_api: Any, empty_db_url: str, redis_space: RedisSpace
) -> None:
    """Plan changes take effect on the next request; the period's spending stays counted across them, and the
    overage report says what a downgrade needs removed."""
    fake, url, prices = stripe_api

    async def main() -> None:
        async with billing_env(fake, url, empty_db_url, redis_space) as env:
            billable = env.billable()
            customer = fake.add_customer(billable)
            sub = fake.subscribe(customer["id"], prices["pro"])
            await twice(env, fake.event("customer.subscription.created", sub))
            for _ in range(30):
                assert (await env.decide(billable, "POST /images")).admitted
            assert (await env.status(billable))["credits"]["balance"] == 700

            up = fake.update_subscription(sub["id"], price=prices["scale"])
            await twice(env, fake.event("customer.subscription.updated", up))
            decision = await env.decide(billable, "POST /images")
            assert decision.plan == "scale" and decision.credits == 5000 - 310

            down = fake.update_subscription(sub["id"], price=prices["pro"])
            await twice(env, fake.event("customer.subscription.updated", down))
            assert (await env.decide(billable, "POST /images")).credits == 1000 - 320
            again = fake.update_subscription(sub["id"], price=prices["scale"])
            await twice(env, fake.event("customer.subscription.updated", again))
            assert (await env.status(billable))["credits"]["balance"] == 5000 - 320

            await env.engine.set_count(billable, "projects", 40)
            r = await env.admin("GET", f"/_gateway/admin/billables/{billable}/overage?plan=pro")
            assert r.status_code == 200 and r.json()["ok"] is False
            assert [i["sentence"] for i in r.json()["items"]] == ["projects: 40 > 25 (reduce by 15)"]
            assert (await env.admin("GET", f"/_gateway/admin/billables/{billable}/overage?plan=enterprise")).json()["ok"]

    asyncio.run(main())


def test_past_due_keeps_the_plan_during_the_grace_and_loses_it_after(
    stripe_api: Any, empty_db_url: str, redis_space: RedisSpace
) -> None:
    """invoice.payment_failed (past_due): the plan stays for past_due_grace from that event, then the default plan;
    invoice.paid brings it back with the renewed period."""
    fake, url, prices = stripe_api

    async def main() -> None:
        async with billing_env(fake, url, empty_db_url, redis_space) as env:
            billable = env.billable()
            customer = fake.add_customer(billable)
            start = int(time.time()) - 30 * DAY
            sub = fake.subscribe(customer["id"], prices["pro"], start=start, end=start + 30 * DAY)
            await twice(env, fake.event("customer.subscription.created", sub))

            fake.update_subscription(sub["id"], status="past_due")
            failed = fake.event("invoice.payment_failed", fake.invoice(sub["id"], status="open"))
            await twice(env, failed)
            assert await plan(env, billable) == ("pro", "subscription")
            env.clock.offset = 2 * DAY
            assert (await env.decide(billable, "POST /images")).plan == "pro"
            env.clock.offset = 3 * DAY + 60
            assert (await env.decide(billable, "POST /images")).plan == "free"
            # A later event about the same past_due episode does not restart the grace.
            await twice(env, fake.event("customer.subscription.updated", fake.view("subscriptions", sub["id"])))
            assert await plan(env, billable) == ("free", "default")

            renewed = fake.update_subscription(sub["id"], status="active", start=start + 30 * DAY, end=start + 60 * DAY)
            await twice(env, fake.event("invoice.paid", fake.invoice(sub["id"])))
            assert renewed["status"] == "active"
            assert (await env.decide(billable, "POST /images")).plan == "pro"
            assert await period(env, billable) == (start + 30 * DAY, start + 60 * DAY)

    asyncio.run(main())


def test_an_unlinked_customer_is_picked_up_when_linked(
    stripe_api: Any, empty_db_url: str, redis_space: RedisSpace
) -> None:
    """A subscription of a customer with no billable is recorded; linking the customer (admin API) applies it.
    With no body the endpoint creates a customer once, then returns the one already linked."""
    fake, url, prices = stripe_api

    async def main() -> None:
        async with billing_env(fake, url, empty_db_url, redis_space) as env:
            billable = env.billable()
            customer = fake.add_customer()
            body = await twice(env, fake.event("customer.subscription.created", fake.subscribe(customer["id"], prices["pro"])))
            assert body["billable"] is None
            assert await plan(env, billable) == ("free", "default")
            await env.link(billable, customer["id"])
            assert await plan(env, billable) == ("pro", "subscription")

            other = env.billable()
            created = await env.link(other)
            assert await env.link(other) == created
            assert fake.get("customers", created)["metadata"] == {"billable": other}
            taken = await env.admin("PUT", f"/_gateway/admin/billables/{other}/stripe-customer", {"customer": customer["id"]})
            assert taken.status_code == 409
            unknown = await env.admin("PUT", f"/_gateway/admin/billables/{other}/stripe-customer", {"customer": "cus_nope"})
            assert unknown.status_code == 404
            assert (await env.http.put(f"/_gateway/admin/billables/{other}/stripe-customer")).status_code == 401

    asyncio.run(main())


def test_database_or_redis_down_answers_5xx_and_the_retry_heals(
    stripe_api: Any, empty_db_url: str, redis_space: RedisSpace
) -> None:
    """The database down: 503, nothing recorded. Redis down after the commit: 503; Stripe's retry is a duplicate
    that re-applies the record to Redis."""
    fake, url, prices = stripe_api

    async def main() -> None:
        billable = f"org-{time.time_ns()}"
        customer = fake.add_customer(billable)
        event = fake.event("customer.subscription.created", fake.subscribe(customer["id"], prices["pro"]))
        dead_db = f"postgresql://nobody@127.0.0.1:{closed_port()}/gone"
        async with billing_env(fake, url, dead_db, redis_space, upgrade=False) as env:
            r = await env.deliver(event)
            assert r.status_code == 503 and "database" in r.json()["detail"]

        dead_redis = open_redis(f"redis://127.0.0.1:{closed_port()}/0", socket_timeout=0.2)
        async with billing_env(fake, url, empty_db_url, redis_space, store=dead_redis) as env:
            r = await env.deliver(event)
            assert r.status_code == 503 and "Redis" in r.json()["detail"]
        async with billing_env(fake, url, empty_db_url, redis_space) as env:
            r = await env.deliver(event)
            assert r.status_code == 200 and r.json()["duplicate"] is True
            assert await plan(env, billable) == ("pro", "subscription")

    asyncio.run(main())


def test_product_and_price_events_resync_and_entitlements_are_reported(
    stripe_api: Any, empty_db_url: str, redis_space: RedisSpace
) -> None:
    """price.* and product.* store a new snapshot (once per event); an entitlement summary is paged past its first
    ten and reported against the plan, never applied."""
    fake, url, prices = stripe_api

    async def main() -> None:
        async with billing_env(fake, url, empty_db_url, redis_space) as env:
            before = await env.billing.book.current()
            assert before == {}
            await twice(env, fake.event("price.updated", fake.view("prices", prices["pro"])))
            snapshot = await env.billing.book.current()
            assert snapshot["plans"]["pro"]["prices"]["month"]["unit_amount"] == 2900
            assert snapshot["plans"]["scale"]["prices"]["year"]["id"] == prices["scale_yearly"]
            await twice(env, fake.event("product.updated", fake.view("prices", prices["scale"])))
            assert env.billing.book.version == 1

            billable = env.billable()
            customer = fake.add_customer(billable)
            await twice(env, fake.event("customer.subscription.created", fake.subscribe(customer["id"], prices["pro"])))
            keys = ["api_access"] + [f"extra_{i:02d}" for i in range(11)]
            fake.entitlements[customer["id"]] = keys
            first_ten = fake._active_entitlements({"customer": customer["id"]})
            assert first_ten["has_more"] is True and len(first_ten["data"]) == 10
            summary = {"object": "entitlements.active_entitlement_summary", "customer": customer["id"], "entitlements": first_ten}
            report = await twice(env, fake.event("entitlements.active_entitlement_summary.updated", summary))
            assert report["entitlements"] == sorted(keys)
            assert report["only_in_stripe"] == [f"extra_{i:02d}" for i in range(11)]
            assert report["only_in_plan"] == ["hd"]
            assert (await env.status(billable))["features"] == ["api_access", "hd"]

            unknown = await env.deliver(fake.event("balance.available", {"object": "balance"}))
            assert unknown.status_code == 200 and unknown.json()["ignored"] is True

    asyncio.run(main())


def test_the_record_on_each_backend_takes_each_event_once(
    stripe_api: Any, empty_db_url: str, redis_space: RedisSpace
) -> None:
    """On SQLite and Postgres: concurrent deliveries of one event record it once with its effect; a paid pack and
    its refund are granted once; the snapshot keeps one version per change."""
    fake, url, prices = stripe_api

    async def main() -> None:
        async with billing_env(fake, url, empty_db_url, redis_space) as env:
            billable = env.billable()
            customer = fake.add_customer(billable)
            event = fake.event("customer.subscription.created", fake.subscribe(customer["id"], prices["pro"]))
            answers = await asyncio.gather(*(env.deliver(event) for _ in range(4)))
            assert sorted(r.json()["duplicate"] for r in answers) == [False, True, True, True]
            assert await plan(env, billable) == ("pro", "subscription")

            r = await env.admin("POST", f"/_gateway/admin/billables/{billable}/packs/starter/checkout", {})
            paid = fake.complete_checkout(r.json()["id"])
            pack = [fake.event("checkout.session.completed", paid),
                    fake.event("payment_intent.succeeded", fake.view("payment_intents", paid["payment_intent"]))]
            await asyncio.gather(*(env.deliver(e) for e in pack * 2))
            refund = fake.refund(paid["payment_intent"], 900)
            await asyncio.gather(*(env.deliver(fake.event("refund.created", refund)) for _ in range(2)))
            credits = (await env.status(billable))["credits"]
            assert (credits["purchased"], credits["debt"]) == (0, 0)
            assert await env.outbox(billable) == ["plan_changed"]

            from gateway.billing.sync import store_snapshot

            assert await store_snapshot(env.db, {"plans": {}}) == (1, True)
            assert await store_snapshot(env.db, {"plans": {}}) == (1, False)
            assert await store_snapshot(env.db, {"plans": {"pro": {}}}) == (2, True)

    asyncio.run(main())
