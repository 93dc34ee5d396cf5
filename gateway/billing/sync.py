"""Plan sync: what Stripe sells (Products, Prices, entitlement Features) against plans.toml.

    result = await sync(client, db, catalog, push=False, progress=Progress(sys.stderr))
    print(table(result.differences))

plans.toml stays the one source of features and numbers: differences are reported, never applied from
Stripe. What Stripe says about prices and names is stored as a versioned snapshot (the `settings` row
`stripe.snapshot`) that every gateway process reads through a `PriceBook`, so a sync is seen without a
restart. `push` creates what plans.toml has and Stripe lacks, found again by lookup keys and
`metadata.plan`, each creation under a deterministic Idempotency-Key: a second run creates nothing.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

import sqlalchemy as sa
import stripe
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.billing.client import each, idempotency_key, plain
from gateway.catalog import Catalog, Plan
from gateway.money import show, to_minor
from gateway.store.db import Database
from gateway.store.db import settings as settings_table

SNAPSHOT_KEY = "stripe.snapshot"
INTERVALS = ("month", "year")


# ---- progress -----------------------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on a stream (stderr), redrawn in place; silent when not enabled."""

    def __init__(self, stream: TextIO | None = None, *, enabled: bool | None = None, width: int = 24) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.width = width
        self.total: int | None = None
        self.count = 0
        self._drawn = False

    def start(self, label: str, total: int | None = None) -> None:
        self.label, self.total, self.count = label, total, 0
        self._draw()

    def advance(self, n: int = 1) -> None:
        self.count += n
        self._draw()

    def done(self) -> None:
        if self.enabled and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
        self._drawn = False

    def _draw(self) -> None:
        if not self.enabled:
            return
        if self.total:
            filled = min(self.width, self.width * self.count // self.total)
            bar = "#" * filled + "-" * (self.width - filled)
            line = f"\r{self.label:<16} [{bar}] {self.count}/{self.total}"
        else:
            line = f"\r{self.label:<16} {self.count} read"
        self.stream.write(line)
        self.stream.flush()
        self._drawn = True


# ---- what Stripe has ------------------------------------------------------------------------------------


@dataclass
class StripeState:
    products: dict[str, dict[str, Any]] = field(default_factory=dict)
    prices: list[dict[str, Any]] = field(default_factory=list)
    features: dict[str, dict[str, Any]] = field(default_factory=dict)  # by lookup_key
    product_features: dict[str, set[str]] = field(default_factory=dict)  # product id → feature lookup keys

    def price(self, ref: str) -> dict[str, Any] | None:
        """The price a catalog reference names: by id, else the active price with that lookup_key."""
        for price in self.prices:
            if price["id"] == ref:
                return price
        for price in self.prices:
            if price.get("lookup_key") == ref and price.get("active", True):
                return price
        return None

    def product_of_plan(self, plan: str, refs: list[str]) -> dict[str, Any] | None:
        for ref in refs:
            price = self.price(ref)
            if price is not None and _product_id(price) in self.products:
                return self.products[_product_id(price)]
        for product in self.products.values():
            if (product.get("metadata") or {}).get("plan") == plan:
                return product
        return None


def _product_id(price: dict[str, Any]) -> str:
    product = price.get("product")
    return str(product["id"] if isinstance(product, dict) else product)


async def read_stripe(client: stripe.StripeClient, progress: Progress | None = None) -> StripeState:
    progress = progress or Progress(enabled=False)
    state = StripeState()
    progress.start("products")
    async for product in each(client.v1.products.list_async, {"active": True}):
        state.products[product["id"]] = product
        progress.advance()
    progress.start("prices")
    async for price in each(client.v1.prices.list_async, {"active": True}):
        state.prices.append(price)
        progress.advance()
    progress.start("features")
    async for feature in each(client.v1.entitlements.features.list_async):
        state.features[feature["lookup_key"]] = feature
        progress.advance()
    progress.start("product features", len(state.products))
    for product_id in state.products:
        attached: set[str] = set()
        async for item in each(lambda params, p=product_id: client.v1.products.features.list_async(p, params)):
            feature = item.get("entitlement_feature") or {}
            if feature.get("lookup_key"):
                attached.add(feature["lookup_key"])
        state.product_features[product_id] = attached
        progress.advance()
    progress.done()
    return state


# ---- what plans.toml wants --------------------------------------------------------------------------------


@dataclass(frozen=True)
class WantedPrice:
    plan: str
    interval: str
    ref: str  # a price id or lookup_key
    amount: int | None  # minor units; None when plans.toml names no price

    def describe(self, currency: str) -> str:
        amount = "no price" if self.amount is None else f"{show(self.amount, currency)} {currency}/{self.interval}"
        return f"{amount} ({self.ref})"


def wanted_prices(catalog: Catalog) -> list[WantedPrice]:
    currency = catalog.settings.currency
    out = []
    for name, plan in catalog.plans.items():
        ref = plan.stripe_price
        if ref is None:
            continue
        month = None if plan.price is None else to_minor(plan.price, currency)
        if plan.price_yearly is not None:
            year: int | None = to_minor(plan.price_yearly, currency)
        else:
            year = None if plan.price is None else to_minor(plan.price * 12, currency)
        if isinstance(ref, str):
            out.append(WantedPrice(name, "month", ref, month))
        else:
            if ref.month:
                out.append(WantedPrice(name, "month", ref.month, month))
            if ref.year:
                out.append(WantedPrice(name, "year", ref.year, year))
    return out


def _plan_title(catalog: Catalog, name: str) -> str:
    return catalog.plan_title(name)


# ---- the comparison ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Difference:
    item: str
    catalog: str
    stripe: str
    status: str  # ok | missing | differs | only in Stripe | created

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "created")


def _price_text(price: dict[str, Any]) -> str:
    recurring = price.get("recurring") or {}
    interval = recurring.get("interval")
    amount = price.get("unit_amount")
    currency = str(price.get("currency", ""))
    text = "no amount" if amount is None else f"{show(int(amount), currency)} {currency}"
    return f"{text}/{interval} {price['id']}" if interval else f"{text} {price['id']}"


def compare(catalog: Catalog, state: StripeState) -> list[Difference]:
    currency = catalog.settings.currency
    rows: list[Difference] = []
    wanted = wanted_prices(catalog)
    sold = sorted({w.plan for w in wanted}, key=list(catalog.plans).index)
    for feature in sorted(catalog.feature_names):
        found = state.features.get(feature)
        rows.append(
            Difference(
                f"feature {feature}",
                catalog.feature_title(feature),
                found["name"] if found else "-",
                "ok" if found else "missing",
            )
        )
    for name in sold:
        plan = catalog.plans[name]
        refs = [w.ref for w in wanted if w.plan == name]
        product = state.product_of_plan(name, refs)
        title = _plan_title(catalog, name)
        if product is None:
            rows.append(Difference(f"plan {name}: product", title, "-", "missing"))
        else:
            stripe_name = str(product.get("name") or "")
            status = "ok" if stripe_name == title else "differs"
            rows.append(Difference(f"plan {name}: product", title, f"{stripe_name} ({product['id']})", status))
            if plan.description and (product.get("description") or "") != plan.description:
                rows.append(
                    Difference(f"plan {name}: description", plan.description, product.get("description") or "-", "differs")
                )
            if (product.get("metadata") or {}).get("plan") != name:
                rows.append(
                    Difference(f"plan {name}: metadata.plan", name, (product.get("metadata") or {}).get("plan") or "-", "differs")
                )
        for want in (w for w in wanted if w.plan == name):
            rows.append(_compare_price(want, state.price(want.ref), currency))
        rows.extend(_compare_features(catalog, name, plan, product, state))
    for product in state.products.values():
        plan_name = (product.get("metadata") or {}).get("plan")
        if plan_name and plan_name not in catalog.plans:
            rows.append(Difference(f"plan {plan_name}: product", "-", f"{product.get('name')} ({product['id']})", "only in Stripe"))
    for name, pack in catalog.packs.items():
        if pack.stripe_price is None:
            continue
        price = state.price(pack.stripe_price)
        asked = "-" if pack.price is None else f"{show(to_minor(pack.price, currency), currency)} {currency}"
        if price is None:
            rows.append(Difference(f"pack {name}: price", f"{asked} ({pack.stripe_price})", "-", "missing"))
        else:
            same = pack.price is None or (
                price.get("unit_amount") == to_minor(pack.price, currency) and price.get("currency") == currency
            )
            rows.append(Difference(f"pack {name}: price", f"{asked} ({pack.stripe_price})", _price_text(price), "ok" if same else "differs"))
    return rows


def _compare_price(want: WantedPrice, price: dict[str, Any] | None, currency: str) -> Difference:
    item = f"plan {want.plan}: price {want.interval}"
    if price is None:
        return Difference(item, want.describe(currency), "-", "missing")
    recurring = price.get("recurring") or {}
    same = (
        (want.amount is None or price.get("unit_amount") == want.amount)
        and price.get("currency") == currency
        and recurring.get("interval") == want.interval
        and int(recurring.get("interval_count") or 1) == 1
    )
    return Difference(item, want.describe(currency), _price_text(price), "ok" if same else "differs")


def _compare_features(
    catalog: Catalog, name: str, plan: Plan, product: dict[str, Any] | None, state: StripeState
) -> list[Difference]:
    attached = state.product_features.get(product["id"], set()) if product else set()
    rows = []
    for feature in sorted(set(plan.allows) | attached):
        allowed, has = feature in plan.allows, feature in attached
        if allowed and has:
            status = "ok"
        elif allowed:
            status = "missing"
        else:
            status = "differs"  # Stripe grants what plans.toml does not: reported, never applied
        rows.append(
            Difference(f"plan {name}: feature {feature}", "allowed" if allowed else "-", "attached" if has else "-", status)
        )
    return rows


def table(rows: list[Difference]) -> str:
    """The differences as an aligned text table, then a one-line count."""
    header = ("item", "plans.toml", "Stripe", "status")
    cells = [header, *[(r.item, r.catalog, r.stripe, r.status) for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    off = [r for r in rows if not r.ok]
    lines.append("")
    lines.append(f"{len(off)} difference(s)" if off else "plans.toml and Stripe agree")
    return "\n".join(lines)


# ---- pushing what Stripe lacks ----------------------------------------------------------------------------


def _key(*parts: object) -> str:
    return idempotency_key("sync", *parts)


async def push(
    client: stripe.StripeClient, catalog: Catalog, state: StripeState, progress: Progress | None = None
) -> list[Difference]:
    """Create the Features, Products, Prices and product Features plans.toml has and Stripe lacks."""
    progress = progress or Progress(enabled=False)
    currency = catalog.settings.currency
    created: list[Difference] = []
    wanted = [w for w in wanted_prices(catalog) if state.price(w.ref) is None and w.amount is not None]
    sold = sorted({w.plan for w in wanted_prices(catalog)}, key=list(catalog.plans).index)
    missing_features = sorted(f for f in catalog.feature_names if f not in state.features)
    missing_products = [p for p in sold if state.product_of_plan(p, [w.ref for w in wanted_prices(catalog) if w.plan == p]) is None]
    progress.start("pushing", len(missing_features) + len(missing_products) + len(wanted) + len(sold))

    for feature in missing_features:
        title = catalog.feature_title(feature)
        params: Any = {"lookup_key": feature, "name": title, "metadata": {"gateway": "feature"}}
        made = plain(await client.v1.entitlements.features.create_async(params, {"idempotency_key": _key("feature", feature)}))
        state.features[feature] = made
        created.append(Difference(f"feature {feature}", title, made["id"], "created"))
        progress.advance()

    for name in missing_products:
        plan = catalog.plans[name]
        title = _plan_title(catalog, name)
        params = {"name": title, "metadata": {"plan": name}}  # typed Any above: Stripe's TypedDicts are too narrow
        if plan.description:
            params["description"] = plan.description
        made = plain(await client.v1.products.create_async(params, {"idempotency_key": _key("product", name, title)}))
        state.products[made["id"]] = made
        state.product_features[made["id"]] = set()
        created.append(Difference(f"plan {name}: product", title, made["id"], "created"))
        progress.advance()

    for want in wanted:
        product = state.product_of_plan(want.plan, [])
        assert product is not None, "every sold plan has a product by now"
        assert want.amount is not None
        params = {
            "product": product["id"],
            "currency": currency,
            "unit_amount": want.amount,
            "recurring": {"interval": want.interval},
            "lookup_key": want.ref,
            "nickname": f"{_plan_title(catalog, want.plan)} ({want.interval}ly)",
            "metadata": {"plan": want.plan},
        }
        key = _key("price", want.plan, want.ref, want.interval, want.amount, currency)
        made = plain(await client.v1.prices.create_async(params, {"idempotency_key": key}))
        state.prices.append(made)
        created.append(Difference(f"plan {want.plan}: price {want.interval}", want.describe(currency), made["id"], "created"))
        progress.advance()

    for name in sold:
        refs = [w.ref for w in wanted_prices(catalog) if w.plan == name]
        product = state.product_of_plan(name, refs)
        assert product is not None
        attached = state.product_features.setdefault(product["id"], set())
        for feature in sorted(set(catalog.plans[name].allows) - attached):
            found = state.features.get(feature)
            if found is None:
                continue
            await client.v1.products.features.create_async(
                product["id"],
                {"entitlement_feature": found["id"]},
                {"idempotency_key": _key("product-feature", product["id"], feature)},
            )
            attached.add(feature)
            created.append(Difference(f"plan {name}: feature {feature}", "allowed", "attached", "created"))
        progress.advance()
    progress.done()
    return created


# ---- the snapshot -------------------------------------------------------------------------------------


def snapshot_of(catalog: Catalog, state: StripeState) -> dict[str, Any]:
    """What the gateway keeps of Stripe: each sold plan's product name and prices, each pack's price."""
    plans: dict[str, Any] = {}
    products: dict[str, str] = {}
    for name in catalog.plans:
        refs = [w for w in wanted_prices(catalog) if w.plan == name]
        if not refs:
            continue
        product = state.product_of_plan(name, [w.ref for w in refs])
        prices = {}
        for want in refs:
            price = state.price(want.ref)
            if price is not None:
                prices[want.interval] = _price_facts(price)
        plans[name] = {
            "product": product["id"] if product else None,
            "name": product.get("name") if product else None,
            "description": product.get("description") if product else None,
            "prices": prices,
        }
        if product:
            products[product["id"]] = name
    packs = {}
    for name, pack in catalog.packs.items():
        if pack.stripe_price:
            price = state.price(pack.stripe_price)
            if price is not None:
                packs[name] = {"price": _price_facts(price)}
    return {"plans": plans, "products": products, "packs": packs}


def _price_facts(price: dict[str, Any]) -> dict[str, Any]:
    recurring = price.get("recurring") or {}
    return {
        "id": price["id"],
        "lookup_key": price.get("lookup_key"),
        "unit_amount": price.get("unit_amount"),
        "currency": price.get("currency"),
        "interval": recurring.get("interval"),
        "interval_count": recurring.get("interval_count") or (1 if recurring else None),
    }


async def load_snapshot(db: Database) -> dict[str, Any]:
    """The latest snapshot ({} before the first sync)."""
    async with db.engine.connect() as conn:
        raw = (await conn.execute(sa.select(settings_table.c.value).where(settings_table.c.key == SNAPSHOT_KEY))).scalar()
    return json.loads(raw) if raw else {}


async def store_snapshot(db: Database, body: dict[str, Any]) -> tuple[int, bool]:
    """Store `body` as the next version unless it equals the latest; answers (version, changed)."""
    async with db.engine.begin() as conn:
        return await write_snapshot(db, conn, body)


async def write_snapshot(db: Database, conn: AsyncConnection, body: dict[str, Any]) -> tuple[int, bool]:
    """`store_snapshot` inside the caller's transaction (a webhook records its event id with it)."""
    raw = (
        await conn.execute(
            sa.select(settings_table.c.value).where(settings_table.c.key == SNAPSHOT_KEY).with_for_update()
        )
    ).scalar()
    current = json.loads(raw) if raw else {}
    if current.get("body") == body:
        return int(current.get("version", 0)), False
    version = int(current.get("version", 0)) + 1
    value = json.dumps({"version": version, "taken_at": datetime.now(UTC).isoformat(), "body": body}, sort_keys=True)
    stmt = db.insert(settings_table).values(key=SNAPSHOT_KEY, value=value)
    await conn.execute(stmt.on_conflict_do_update(index_elements=["key"], set_={"value": value}))
    return version, True


class PriceBook:
    """The latest Stripe snapshot, re-read from the record at most every `ttl` seconds: a sync made by
    any process (or `gateway stripe sync`) is seen by every process without a restart."""

    def __init__(self, db: Database | None, *, ttl: float = 5.0) -> None:
        self.db = db
        self.ttl = ttl
        self._body: dict[str, Any] = {}
        self.version = 0
        self._read_at = -float("inf")

    async def current(self) -> dict[str, Any]:
        if self.db is None or time.monotonic() - self._read_at < self.ttl:
            return self._body
        try:
            found = await load_snapshot(self.db)
        except Exception:  # noqa: BLE001 - the page shows catalog prices while the record is away
            return self._body
        self._read_at = time.monotonic()
        self._body, self.version = found.get("body") or {}, int(found.get("version", 0))
        return self._body

    def forget(self) -> None:
        self._read_at = -float("inf")


@dataclass
class SyncResult:
    differences: list[Difference]
    created: list[Difference]
    version: int
    changed: bool


async def sync(
    client: stripe.StripeClient,
    db: Database,
    catalog: Catalog,
    *,
    push_missing: bool = False,
    progress: Progress | None = None,
) -> SyncResult:
    """Read Stripe, optionally push what it lacks, compare, and store the snapshot."""
    state = await read_stripe(client, progress)
    created: list[Difference] = []
    if push_missing:
        created = await push(client, catalog, state, progress)
        if created:
            state = await read_stripe(client, progress)
    version, changed = await store_snapshot(db, snapshot_of(catalog, state))
    return SyncResult(compare(catalog, state), created, version, changed)
