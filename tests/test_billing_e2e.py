"""Billing in `gateway serve`'s app over real HTTP: the pricing page in headless Chromium, webhooks changing the
plan of the next request, and auto-recharge started by a real request. Redis is a private redis-server (the
app's keys have the default prefix, so they must not meet another run's on the shared one)."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from billing_support import ADMIN, CATALOG, SECRET, add_plan_prices
from browser import chromium, chromium_path, look
from fake_stripe import FakeStripe, sign
from http_servers import serve_in_thread
from services import RedisServer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.app import GatewayApp
from gateway.billing.sync import store_snapshot
from gateway.settings import Settings
from gateway.store.db import Database

PHONE = {"width": 390, "height": 844, "mobile": True}
DESKTOP = {"width": 1280, "height": 900, "mobile": False}


def upstream() -> Starlette:
    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({"plan": request.headers.get("x-plan"), "billable": request.headers.get("x-billable-id")})

    return Starlette(routes=[Route("/{path:path}", echo, methods=["GET", "POST"])])


@dataclass
class Served:
    url: str
    fake: FakeStripe
    prices: dict[str, str]
    app: GatewayApp

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN}"}

    def deliver(self, event: dict[str, Any]) -> httpx.Response:
        payload = json.dumps(event)
        return httpx.post(f"{self.url}/_gateway/stripe/webhook", content=payload, headers={"Stripe-Signature": sign(payload, SECRET)})


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("billing_e2e")
    plans = tmp / "plans.toml"
    plans.write_text(CATALOG)
    db_url = f"sqlite:///{tmp}/gw.db"

    async def synced() -> None:
        # What `gateway stripe sync` left in the record: Stripe says Pro costs 35 now.
        db = await Database.connect(db_url, auto_upgrade=True)
        try:
            body = {"plans": {"pro": {"product": "prod_x", "name": "Pro", "description": None,
                                      "prices": {"month": {"id": "price_x", "lookup_key": "pro_monthly", "unit_amount": 3500,
                                                           "currency": "usd", "interval": "month", "interval_count": 1}}}},
                    "products": {"prod_x": "pro"}, "packs": {}}
            await store_snapshot(db, body)
        finally:
            await db.close()

    asyncio.run(synced())
    fake = FakeStripe()
    prices = add_plan_prices(fake)
    with RedisServer() as redis_server, serve_in_thread(fake.app()) as stripe_url, serve_in_thread(upstream()) as upstream_url:
        settings = Settings(
            plans=str(plans), upstream=upstream_url, redis_url=redis_server.url, database_url=db_url, admin_token=ADMIN,
            stripe_api_key="sk_test_fake", stripe_webhook_secret=SECRET, stripe_api_base=stripe_url,
        )
        app = GatewayApp(settings)
        with serve_in_thread(app) as url:
            yield Served(url, fake, prices, app)


def test_pricing_page_reads_well_on_a_phone_and_a_desktop(served: Served, tmp_path: Path) -> None:
    """Chromium loads /_gateway/pricing: every plan in price order with its synced price, bullets and button, the
    highlighted plan marked, nothing wider than a phone's screen; side by side on a desktop, cards of one
    height, "Contact" at a title's size."""
    if chromium_path() is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed")
        pytest.skip("chromium is not installed: apt-get install -y chromium")
    url = f"{served.url}/_gateway/pricing"
    shots = Path(os.environ.get("GATEWAY_SCREENSHOTS", tmp_path))

    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        with chromium(tmp_path / "profile") as devtools:
            phone = await look(devtools, url, **PHONE, screenshot=shots / "pricing-phone.png")
            desktop = await look(devtools, url, **DESKTOP, screenshot=shots / "pricing-desktop.png")
            return phone, desktop

    phone, desktop = asyncio.run(main())
    assert phone["title"] == "Pricing"
    # innerText puts a blank line between paragraphs; a reader does not see those.
    cards = ["\n".join(line for line in card["text"].split("\n") if line.strip()) for card in phone["cards"]]
    titles = [text.removeprefix("Most popular\n").split("\n")[0] for text in cards]
    assert titles == ["Free", "Pro", "Scale", "Enterprise"]
    free, pro, scale, enterprise = cards
    assert "$0\n/month" in free and "1 project" in free and "Choose Free" in free
    assert pro.startswith("Most popular\nPro\nFor growing teams.\n$35\n/month")  # the synced price, not plans.toml's 29
    assert "HD images" in pro and "Choose Pro" in pro
    assert "$99\n/month" in scale and "or $990/year" in scale and "5,000 credits per billing period" in scale
    assert "Contact" in enterprise and "Unlimited credits" in enterprise and "Contact us" in enterprise
    assert phone["text"].count("Most popular") == 1
    assert "Credit packs" in phone["text"] and "1,000 credits + 100 bonus for $9" in phone["text"]

    # On a phone: one column, nothing off the screen, text at a readable size, the highlighted plan stands out.
    assert phone["scrollWidth"] <= phone["innerWidth"] == 390
    assert phone["fontSize"] >= 16
    boxes = [card["box"] for card in phone["cards"]]
    assert all(b["left"] >= 0 and b["right"] <= 390 for b in boxes)
    assert all(a["bottom"] <= b["top"] for a, b in itertools.pairwise(boxes))
    assert phone["cards"][1]["borderWidth"] > phone["cards"][0]["borderWidth"]
    assert phone["cards"][1]["border"] != phone["cards"][0]["border"]
    # On a desktop: the plans side by side, of one height; a price in words at a title's size, figures larger.
    tops = {round(card["box"]["top"]) for card in desktop["cards"]}
    assert len(tops) == 1 and desktop["scrollWidth"] <= desktop["innerWidth"]
    assert len({round(card["box"]["bottom"]) for card in desktop["cards"]}) == 1
    sizes = [(card["amountSize"], card["titleSize"]) for card in desktop["cards"]]
    assert sizes[3][0] == sizes[3][1] and all(amount > title for amount, title in sizes[:3])


def test_a_webhook_changes_the_plan_of_the_next_request(served: Served) -> None:
    """Link a customer through the admin API (recorded once in the audit log), deliver its subscription: the
    next proxied request carries the plan."""
    fake = served.fake
    r = httpx.post(f"{served.url}/_gateway/admin/keys", json={"billable": "acme", "name": "ci"}, headers=served.admin())
    key = r.json()["key"]
    auth = {"Authorization": f"Bearer {key}"}
    assert httpx.post(f"{served.url}/images", headers=auth).json()["plan"] == "free"

    customer = fake.add_customer()
    r = httpx.put(f"{served.url}/_gateway/admin/billables/acme/stripe-customer", json={"customer": customer["id"]}, headers=served.admin())
    assert r.status_code == 200 and r.json()["customer"] == customer["id"]
    again = httpx.put(f"{served.url}/_gateway/admin/billables/acme/stripe-customer", json={"customer": customer["id"]}, headers=served.admin())
    assert again.status_code == 200  # linked already: no change, so no second audit entry
    audit = httpx.get(f"{served.url}/_gateway/admin/audit", params={"billable": "acme"}, headers=served.admin()).json()["entries"]
    links = [e for e in audit if e["action"] == "stripe_customer.link"]
    assert [(e["token"], e["before"], e["after"]) for e in links] == [("admin", {"customer": None}, {"customer": customer["id"]})]
    sub = fake.subscribe(customer["id"], served.prices["scale"])
    assert served.deliver(fake.event("customer.subscription.created", sub)).status_code == 200
    assert httpx.post(f"{served.url}/images", headers=auth).json()["plan"] == "scale"
    bad = httpx.post(f"{served.url}/_gateway/stripe/webhook", content=b"{}", headers={"Stripe-Signature": "t=1,v1=00"})
    assert bad.status_code == 400


def test_a_spend_under_the_threshold_recharges_through_stripe(served: Served) -> None:
    """The middleware hands the decision that took the lease to billing: one off-session charge, credits granted."""
    fake = served.fake
    r = httpx.post(f"{served.url}/_gateway/admin/keys", json={"billable": "recharged", "name": "ci"}, headers=served.admin())
    auth = {"Authorization": f"Bearer {r.json()['key']}"}
    customer = fake.add_customer("recharged", payment_method="pm_card_visa")
    httpx.put(f"{served.url}/_gateway/admin/billables/recharged/auto-recharge",
              json={"enabled": True, "amount_cents": 300, "threshold": 40}, headers=served.admin())
    for _ in range(7):  # the free plan's 100 credits, 10 a request: under 40 after the 7th
        assert httpx.post(f"{served.url}/images", headers=auth).status_code == 200
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status = httpx.get(f"{served.url}/_gateway/admin/billables/recharged", headers=served.admin()).json()
        if status["credits"]["purchased"]:
            break
        time.sleep(0.05)
    assert status["credits"]["purchased"] == 300
    charges = [pi for pi in fake.db["payment_intents"].values() if pi["customer"] == customer["id"]]
    assert len(charges) == 1 and charges[0]["amount"] == 300 and charges[0]["status"] == "succeeded"
