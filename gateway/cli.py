"""`gateway serve | demo | check | db upgrade | events replay`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
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


def _serve(settings: Settings) -> int:
    import uvicorn

    from gateway.app import GatewayApp

    app = GatewayApp(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, lifespan="on", log_level="info", access_log=False)
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
