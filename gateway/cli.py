"""`gateway serve | demo | check | db upgrade | events replay | reconcile | usage | stripe sync`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from gateway.catalog import CREDITS, Catalog, load_catalog
from gateway.errors import CatalogError, ConfigError, DatabaseUnavailable, GatewayError
from gateway.settings import Settings


def summary(catalog: Catalog) -> str:
    """A readable table of the catalog: plans × features, limits, rates and credits."""
    plans = list(catalog.plans)
    rows: list[list[str]] = [["", *plans]]
    rows.append(["price", *[_price(catalog, p) for p in plans]])
    for feature in sorted(catalog.feature_names):
        rows.append([catalog.feature_title(feature), *["yes" if catalog.plans[p].allows_feature(feature) else "-" for p in plans]])
    rows.append(["rate limit", *[_rate(catalog, p) for p in plans]])
    for name, kind in sorted(catalog.limit_kinds.items()):
        label = f"{name} ({'per ' + kind.per if kind.per else 'cap'})"
        rows.append([label, *[_limit(catalog, p, name) for p in plans]])
    rows.append(["credits", *[_credits(catalog, p) for p in plans]])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    routes = [f"  {r.match:<32} " + _route(r.config) for r in catalog.routes]
    return "\n".join(
        [f"{catalog.source}: {len(plans)} plans, {len(catalog.routes)} routes, default plan {catalog.settings.default_plan}", "", *lines, "", "routes (first match wins):", *routes]
    )


def _price(catalog: Catalog, name: str) -> str:
    plan = catalog.plans[name]
    if plan.price_string:
        return plan.price_string
    return "-" if plan.price is None else f"{plan.price:g} {catalog.settings.currency}"


def _rate(catalog: Catalog, name: str) -> str:
    rate = catalog.plans[name].rate
    return "-" if rate is None else f"{rate.limit}/{rate.per_seconds}s burst {rate.burst}"


def _limit(catalog: Catalog, plan_name: str, limit: str) -> str:
    plan = catalog.plans[plan_name]
    if plan.is_unlimited(limit):
        return "unlimited"
    found = plan.limits.get(limit)
    if found is None:
        return "closed"
    policy = {"block_usage": "", "just_warn": " warn", "grace_then_block": f" grace {found.grace or '7d'}"}[found.after_limit]
    return f"{found.to}{policy}"


def _credits(catalog: Catalog, name: str) -> str:
    plan = catalog.plans[name]
    if plan.is_unlimited(CREDITS):
        return "unlimited"
    if not plan.credits:
        return "-"
    return f"{plan.credits}/{plan.credits_per}" + (" rollover" if plan.rollover else "")


def _route(config: Any) -> str:
    parts = []
    if config.public:
        parts.append("public")
    if config.features:
        parts.append("needs " + ", ".join(config.features))
    if config.limit:
        parts.append(f"limit {config.limit} x{config.cost}")
    if config.spend:
        parts.append(f"spends {config.spend}")
    if config.release:
        parts.append(f"releases {config.release}")
    if config.rate_limit is not None:
        parts.append("own rate limit")
    return "; ".join(parts) or "identity and plan rate limit"


def _serve_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plans", help="catalog file (GATEWAY_PLANS, default plans.toml)")
    parser.add_argument("--upstream", help="the API to protect (GATEWAY_UPSTREAM)")
    parser.add_argument("--host", help="listen address (GATEWAY_HOST, default 127.0.0.1)")
    parser.add_argument("--port", help="listen port (GATEWAY_PORT, default 8080)")
    parser.add_argument("--redis-url", help="redis://, rediss:// or redis+cluster://; default: in-process emulation")
    parser.add_argument("--database-url", help="postgresql://... or sqlite:///PATH (default sqlite:///gateway.db)")
    parser.add_argument("--reconcile-interval", help="seconds between flushes to the record (default 1)")
    parser.add_argument("--billable-header", help="trust this header to name the billable instead of API keys")
    parser.add_argument("--upstream-timeout", help="seconds (default 60)")
    parser.add_argument("--max-body", help="bytes (default 10 MiB)")
    parser.add_argument("--workers", help="processes on the port, each a whole gateway (GATEWAY_WORKERS, default 1; needs --redis-url)")
    parser.add_argument("--header-timeout", help="seconds to receive a request's headers (GATEWAY_HEADER_TIMEOUT, default 10)")
    parser.add_argument("--body-timeout", help="seconds a request body may sit idle (GATEWAY_BODY_TIMEOUT, default 30)")
    parser.add_argument("--max-connections", help="open client connections per process; more get 503 (GATEWAY_MAX_CONNECTIONS, default 10000)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway", description="A Redis-first rate and quota gateway.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway in front of --upstream")
    _serve_flags(serve)
    demo = commands.add_parser("demo", help="run the gateway on its embedded defaults in front of a demo API")
    _serve_flags(demo)
    check = commands.add_parser("check", help="validate a plans.toml and print a summary")
    check.add_argument("plans", nargs="?", default=None)
    db = commands.add_parser("db", help="the record's schema")
    db.add_argument("action", choices=["upgrade"])
    db.add_argument("--database-url")
    events = commands.add_parser("events", help="the webhook outbox")
    events.add_argument("action", choices=["replay"])
    events.add_argument("--dead", action="store_true", help="only dead-lettered events (the default with no filter)")
    events.add_argument("--since", help="events created at or after this ISO 8601 time (UTC unless it says)")
    events.add_argument("--id", dest="event_id", help="this event")
    events.add_argument("--database-url")
    reconcile = commands.add_parser("reconcile", help="flush Redis to the record (what every gateway process does)")
    reconcile.add_argument("--once", action="store_true", help="one full pass (sweep every node, flush), then exit")
    for flag in ("--plans", "--redis-url", "--database-url", "--reconcile-interval"):
        reconcile.add_argument(flag)
    usage = commands.add_parser("usage", help="a billable's usage in a month, per route and operation, from the record")
    usage.add_argument("billable")
    usage.add_argument("--period", help="YYYY-MM (default: this month, flushed from Redis first when --redis-url is set)")
    usage.add_argument("--json", action="store_true", help="print the JSON the admin API answers")
    for flag in ("--plans", "--redis-url", "--database-url"):
        usage.add_argument(flag)
    stripe_cmd = commands.add_parser("stripe", help="Stripe: compare plans.toml with Stripe's products and prices")
    stripe_cmd.add_argument("action", choices=["sync"])
    stripe_cmd.add_argument("--push", action="store_true", help="create in Stripe what plans.toml has and Stripe lacks")
    for flag in ("--plans", "--database-url"):
        stripe_cmd.add_argument(flag)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        if args.command == "check":
            catalog = load_catalog(args.plans or Settings.load().plans)
            print(summary(catalog))
            return 0
        flags = {k: v for k, v in vars(args).items() if k != "command"}
        settings = Settings.load(flags)
        if args.command == "db":
            return asyncio.run(_db_upgrade(settings))
        if args.command == "events":
            return asyncio.run(_events_replay(settings, args.dead, _iso(args.since), args.event_id))
        if args.command == "reconcile":
            return asyncio.run(_reconcile(settings, once=args.once))
        if args.command == "usage":
            return asyncio.run(_usage(settings, args.billable, args.period, as_json=args.json))
        if args.command == "stripe":
            return asyncio.run(_stripe_sync(settings, push=args.push))
        if args.command == "demo":
            from gateway.demo import run_demo

            return run_demo(settings)
        if not settings.upstream:
            raise ConfigError("gateway serve needs the API to protect: --upstream URL or GATEWAY_UPSTREAM")
        return _serve(settings)
    except CatalogError as exc:
        print(exc, file=sys.stderr)
        return 1
    except GatewayError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2


async def _stripe_sync(settings: Settings, *, push: bool) -> int:
    """`gateway stripe sync [--push]`: the differences as a table, the snapshot stored for every process."""
    import stripe

    from gateway.billing.client import close_client, stripe_client
    from gateway.billing.sync import Progress, sync, table
    from gateway.store.db import Database

    catalog = load_catalog(settings.plans)
    client = stripe_client(settings)
    db = await Database.connect(settings.database_url, auto_upgrade=True)
    try:
        result = await sync(client, db, catalog, push_missing=push, progress=Progress(sys.stderr))
    except stripe.StripeError as exc:
        print(f"gateway: Stripe answered: {exc.user_message or exc}", file=sys.stderr)
        return 2
    finally:
        await close_client(client)
        await db.close()
    if push:
        print(f"created in Stripe: {len(result.created)}" + "".join(f"\n  {d.item}: {d.stripe}" for d in result.created))
        print()
    print(table(result.differences))
    state = "stored" if result.changed else "unchanged"
    print(f"snapshot version {result.version} {state}; every gateway process reads it within seconds")
    return 0


def _serve(settings: Settings) -> int:
    from gateway.server import serve

    return serve(settings)


async def _db_upgrade(settings: Settings) -> int:
    from gateway.store.db import Database

    db = await Database.connect(settings.database_url, auto_upgrade=False)
    try:
        await db.upgrade()
    finally:
        await db.close()
    print(f"{settings.database_url}: schema is current")
    return 0


def _iso(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"--since: {text!r} is not an ISO 8601 time (like 2026-11-01T00:00:00Z)") from None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at


async def _events_replay(settings: Settings, dead: bool, since: datetime | None, event_id: str | None) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from gateway.events import replay
    from gateway.store.db import Database

    db = await Database.connect(settings.database_url, auto_upgrade=True)
    try:
        count = await replay(db, dead=dead, since=since, event_id=event_id)
    except (SQLAlchemyError, OSError) as exc:
        raise DatabaseUnavailable(f"the database at {db.shown} did not answer: {exc}") from exc
    finally:
        await db.close()
    print(f"{count} event(s) queued for delivery again")
    return 0


async def _reconcile(settings: Settings, *, once: bool) -> int:
    from gateway.engine import Engine
    from gateway.grants import Grants
    from gateway.reconcile import attach
    from gateway.store.db import Database
    from gateway.store.redis import open_redis

    if settings.redis_url is None:
        raise ConfigError("gateway reconcile needs the Redis to read: --redis-url URL or GATEWAY_REDIS_URL")
    catalog = load_catalog(settings.plans)
    db = await Database.connect(settings.database_url, auto_upgrade=True)
    store = open_redis(settings.redis_url)
    engine = Engine(store, catalog)
    reconciler = attach(engine, db, Grants(db, engine), interval=settings.reconcile_interval)
    try:
        if once:
            flushed = await reconciler.run_once()
            print(f"flushed {flushed} billable(s) to {db.shown}")
            return 0
        reconciler.start()
        await asyncio.Event().wait()  # until interrupted
        return 0
    finally:
        await reconciler.stop()
        await store.close()
        await db.close()


async def _usage(settings: Settings, billable: str, period: str | None, *, as_json: bool) -> int:
    import json

    from sqlalchemy.exc import SQLAlchemyError

    from gateway.store.db import Database
    from gateway.usage import PERIOD, current_period, render, usage_report

    catalog = load_catalog(settings.plans) if settings.redis_url or os.path.exists(settings.plans) else None
    current = current_period(catalog.settings.zone if catalog else UTC, time.time())
    period = period or current
    if not PERIOD.match(period):
        raise ConfigError(f"--period: a month, YYYY-MM (like {current}), not {period!r}")
    db = await Database.connect(settings.database_url, auto_upgrade=True)
    try:
        if period == current and settings.redis_url and catalog is not None:
            await _flush_one(settings, catalog, db, billable)
        try:
            report = await usage_report(db, billable, period)
        except (SQLAlchemyError, OSError) as exc:
            raise DatabaseUnavailable(f"the database at {db.shown} did not answer: {exc}") from exc
    finally:
        await db.close()
    print(json.dumps(report, indent=2) if as_json else render(report))
    return 0


async def _flush_one(settings: Settings, catalog: Catalog, db: Any, billable: str) -> None:
    """This month's answer includes what Redis counted since the last flush."""
    from gateway.engine import Engine
    from gateway.reconcile import Reconciler
    from gateway.store.redis import open_redis

    store = open_redis(settings.redis_url)
    try:
        await Reconciler(Engine(store, catalog), db).flush([billable], force=True)
    finally:
        await store.close()


if __name__ == "__main__":
    sys.exit(main())
