"""Plan sync: plans.toml against the (fake) Stripe, both ways and twice; the snapshot every process reads."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from billing_support import CATALOG, catalog, stripe_server
from fake_stripe import FakeStripe

from gateway.billing.client import close_client, stripe_client
from gateway.billing.sync import PriceBook, Progress, load_snapshot, sync, table
from gateway.cli import main
from gateway.settings import Settings
from gateway.store.db import Database
from gateway.web.pricing import render


@pytest.fixture
def stripe_api() -> Iterator[tuple[FakeStripe, str]]:
    with stripe_server() as server:
        yield server


def settings(url: str) -> Settings:
    return Settings(stripe_api_key="sk_test_fake", stripe_api_base=url)


async def connect(url: str) -> Database:
    db = await Database.connect(url)
    await db.upgrade()
    return db


def test_push_creates_what_stripe_lacks_once(stripe_api: tuple[FakeStripe, str], empty_db_url: str) -> None:
    """A read shows everything missing; --push creates Features, Products, Prices and attaches Features; a
    second push (and two concurrent ones) creates nothing more, and the snapshot's version moves only on change."""
    fake, url = stripe_api

    async def main_() -> None:
        db = await connect(empty_db_url)
        client = stripe_client(settings(url))
        try:
            first = await sync(client, db, catalog())
            assert {d.status for d in first.differences} == {"missing"}
            assert "plan pro: price month" in table(first.differences)
            assert first.version == 1

            pushed = await sync(client, db, catalog(), push_missing=True)
            assert all(d.ok for d in pushed.differences), table(pushed.differences)
            assert fake.count("features") == 2 and fake.count("products") == 2 and fake.count("prices") == 3
            assert fake.count("product_features") == 4
            pro = fake.price_by_key("pro_monthly")
            assert (pro["unit_amount"], pro["currency"], pro["recurring"]["interval"]) == (2900, "usd", "month")
            yearly = fake.price_by_key("scale_yearly")
            assert (yearly["unit_amount"], yearly["recurring"]["interval"]) == (99000, "year")
            product = fake.get("products", pro["product"])
            assert product["metadata"] == {"plan": "pro"} and product["name"] == "Pro"
            assert product["description"] == "For growing teams."
            assert pushed.version == 2 and pushed.changed

            created = sum(fake.created.values())
            again = await sync(client, db, catalog(), push_missing=True)
            assert again.created == [] and sum(fake.created.values()) == created
            assert (again.version, again.changed) == (2, False)
            assert "plans.toml and Stripe agree" in table(again.differences)
        finally:
            await close_client(client)
            await db.close()

    asyncio.run(main_())


def test_concurrent_pushes_create_each_object_once(stripe_api: tuple[FakeStripe, str], empty_db_url: str) -> None:
    """Two pushes racing from the same empty state send the same Idempotency-Keys: Stripe makes each object once."""
    fake, url = stripe_api

    async def main_() -> None:
        db = await connect(empty_db_url)
        one, two = stripe_client(settings(url)), stripe_client(settings(url))
        try:
            from gateway.billing.sync import push, read_stripe

            states = [await read_stripe(one), await read_stripe(two)]
            await asyncio.gather(push(one, catalog(), states[0]), push(two, catalog(), states[1]))
            assert fake.count("products") == 2 and fake.count("prices") == 3 and fake.count("features") == 2
            assert fake.count("product_features") == 4
            assert fake.replays >= 9
        finally:
            await close_client(one)
            await close_client(two)
            await db.close()

    asyncio.run(main_())


def test_stripe_side_changes_are_reported_and_reach_every_process(stripe_api: tuple[FakeStripe, str], empty_db_url: str) -> None:
    """What Stripe says about prices and names lands in a new snapshot version that another process's PriceBook
    reads without a restart; features Stripe grants beyond plans.toml are reported, never applied."""
    fake, url = stripe_api

    async def main_() -> None:
        db = await connect(empty_db_url)
        client = stripe_client(settings(url))
        other_process = PriceBook(db, ttl=0)
        try:
            await sync(client, db, catalog(), push_missing=True)
            assert "$29" in render(catalog(), await other_process.current())
            version = other_process.version

            # Stripe's side moves: pro costs 35 now (a new price takes the lookup key), the product is renamed,
            # and someone attached "extra" to it.
            old = fake.price_by_key("pro_monthly")
            old["active"] = False
            fake.add_price("pro_monthly", 3500, product=old["product"])
            fake.get("products", old["product"])["name"] = "Pro (2027)"
            extra = fake.put("features", {"lookup_key": "extra", "name": "Extra", "active": True, "metadata": {}})
            fake.put("product_features", {"product": old["product"], "entitlement_feature": extra["id"]})

            result = await sync(client, db, catalog())
            rows = {d.item: d for d in result.differences}
            assert rows["plan pro: price month"].status == "differs" and "$35" in rows["plan pro: price month"].stripe
            assert rows["plan pro: product"].status == "differs" and "Pro (2027)" in rows["plan pro: product"].stripe
            assert rows["plan pro: feature extra"].status == "differs"
            assert result.changed and result.version == version + 1

            snapshot = await other_process.current()
            assert other_process.version == result.version
            assert snapshot["plans"]["pro"]["prices"]["month"]["unit_amount"] == 3500
            page = render(catalog(), snapshot)
            assert "$35" in page and "$29" not in page
            # plans.toml still decides features: nothing about "extra" reached the catalog.
            assert "extra" not in catalog().plans["pro"].allows
            stored = await load_snapshot(db)
            assert stored["version"] == result.version
        finally:
            await close_client(client)
            await db.close()

    asyncio.run(main_())


def test_cli_sync_prints_the_table(stripe_api: tuple[FakeStripe, str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """`gateway stripe sync --push` then `gateway stripe sync`: a table of differences, then agreement."""
    _, url = stripe_api
    plans = tmp_path / "plans.toml"
    plans.write_text(CATALOG)
    monkeypatch.setenv("GATEWAY_STRIPE_API_KEY", "sk_test_fake")
    monkeypatch.setenv("GATEWAY_STRIPE_API_BASE", url)
    args = ["--plans", str(plans), "--database-url", f"sqlite:///{tmp_path}/cli.db"]
    assert main(["stripe", "sync", "--push", *args]) == 0
    out = capsys.readouterr().out
    assert "created in Stripe: 11" in out and "plans.toml and Stripe agree" in out
    assert main(["stripe", "sync", *args]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["item", "plans.toml", "Stripe", "status"]
    assert any(line.startswith("plan scale: price year") and line.rstrip().endswith("ok") for line in lines)
    assert "snapshot version 1 unchanged" in out


def test_progress_bar_draws_in_place() -> None:
    """The progress bar rewrites one line on its stream and ends it; it stays silent when disabled."""
    stream = io.StringIO()
    bar = Progress(stream, enabled=True, width=10)
    bar.start("prices", 4)
    bar.advance(2)
    bar.done()
    text = stream.getvalue()
    assert "\rprices           [#####-----] 2/4" in text and text.endswith("\n")
    quiet = io.StringIO()
    Progress(quiet, enabled=False).start("x", 3)
    assert quiet.getvalue() == ""
