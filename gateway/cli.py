"""`gateway serve | demo | check | keys | plans | db upgrade | events replay | reconcile | usage | stripe sync |
account-link`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.catalog import CREDITS, Catalog, load_catalog
from gateway.errors import CatalogError, ConfigError, GatewayError, RedisUnavailable
from gateway.settings import ENVIRONMENT, Settings

# Help for the settings' flags (the variable and the default are added from gateway.settings). Every command
# takes every one: a setting a command does not use is accepted and ignored, so one environment or one line of
# flags serves them all. Secrets are read from the environment only: a flag would show in `ps`.
_HELP = {
    "plans": "the catalog file",
    "upstream": "the API to protect",
    "host": "listen address",
    "port": "listen port",
    "redis_url": "the Redis your gateways run on: redis://, rediss:// or redis+cluster://HOST:PORT,... "
    "unset: the in-process emulation",
    "database_url": "the record: postgresql://USER@HOST:PORT/DB or sqlite:///PATH",
    "reconcile_interval": "seconds between flushes to the record",
    "billable_header": "trust this header to name the billable instead of API keys",
    "upstream_timeout": "seconds the upstream may take",
    "max_body": "bytes a request body may have",
    "trust_forwarded": "append to the client's X-Forwarded-* instead of dropping them: only behind a load balancer",
    "workers": "processes on the port, each a whole gateway (needs --redis-url)",
    "header_timeout": "seconds to receive a request's headers",
    "body_timeout": "seconds a request body may sit idle",
    "max_connections": "open client connections per process; more get 503",
    "shutdown_grace": "seconds from SIGTERM to exit",
    "db_timeout": "deadline of one record operation, seconds",
    "hold_ttl": "seconds before a hold whose settle never came is dropped, charged",
    "events_retention_days": "days the outbox keeps an event",
    "stripe_api_base": "Stripe's API address (tests)",
    "processes": "processes sharing on_redis_down = \"local\" limits (default: --workers)",
    "otel_endpoint": "an OTLP/HTTP collector (http://HOST:4318) to send a span per request to; needs the otel extra "
    "(else OTEL_EXPORTER_OTLP_ENDPOINT; unset: no tracing)",
}
SECRETS = {"admin_token", "admin_tokens", "metrics_token", "webhook_secret", "stripe_api_key", "stripe_webhook_secret",
           "account_secret"}


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
    billed = [f"  {_billed(catalog, plan, name, limit)}" for plan, name, limit in catalog.billed_limits]
    billed += [f"  operations.{name}: every unit {op.payg.unit_price} {catalog.settings.currency.upper()} on meter {op.payg.meter} "
               f"({'the units its answer reports' if op.metered else 'one a request'}; "
               f"{'Stripe meter ' + (catalog.stripe_meter(op.payg.meter) or '') if catalog.stripe_meter(op.payg.meter) else 'no Stripe meter'})"
               for name, op in sorted(catalog.operations.items()) if op.payg is not None]  # fmt: skip
    return "\n".join(
        [f"{catalog.source}: {len(plans)} plans, {len(catalog.routes)} routes, default plan {catalog.settings.default_plan}", "", *lines, "", "routes (first match wins):", *routes,
         *(["", "billed (invoiced by Stripe at the period's end):", *billed] if billed else [])]
    )  # fmt: skip


def _billed(catalog: Catalog, plan: str, name: str, limit: Any) -> str:
    """One billed limit in words: what is admitted past `to`, its price, meter and spend cap."""
    o = limit.overage
    currency = catalog.settings.currency.upper()
    cap = (f"at most {o.max_per_period} {currency} a period ({o.max_units} units), then refused (402)"
           if o.max_per_period is not None else "no spend cap")  # fmt: skip
    sent = catalog.stripe_meter(o.meter)
    to = f"Stripe meter {sent}" if sent else "no Stripe meter ([meters] has none)"
    return f"{plan}.{name}: past {limit.to} per {limit.per}, each unit {o.unit_price} {currency} on meter {o.meter} ({to}); {cap}"


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
    policy = {"block_usage": "", "just_warn": " warn", "grace_then_block": f" grace {found.grace or '7d'}", "bill": " then billed"}[found.after_limit]
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


def _settings() -> argparse.ArgumentParser:
    """The settings' flags, a parent of every command's parser. Not given, a flag sets nothing (SUPPRESS): a
    group's parser (keys) and its action's (keys create) both take it without one clearing the other."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group(
        "settings", "Every command takes these, as flags or GATEWAY_* variables (flags win); one it does not use is "
        "ignored. " + ", ".join(ENVIRONMENT[s] for s in sorted(SECRETS)) + " are read from the environment only.")
    defaults = Settings()
    for name, variable in ENVIRONMENT.items():
        if name in SECRETS:
            continue
        default = getattr(defaults, name)
        shown = f"{variable}; default {default}" if default not in (None, "", False) and name != "processes" else variable
        switch: dict[str, Any] = {"action": "store_true"} if name == "trust_forwarded" else {}
        group.add_argument("--" + name.replace("_", "-"), default=argparse.SUPPRESS, help=f"{_HELP.get(name, name)} ({shown})", **switch)
    return parent


_SETTINGS = _settings()


def _command(commands: Any, name: str, summary: str, description: str | None = None) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(
        name, help=summary, description=description or summary[0].upper() + summary[1:] + ".", parents=[_SETTINGS]
    )
    return parser


def _parser() -> argparse.ArgumentParser:
    from gateway import __version__

    parser = argparse.ArgumentParser(
        prog="gateway",
        description="A Redis-first rate and quota gateway. Every command takes the settings of serve, as flags "
        "or GATEWAY_* environment variables (flags win).",
    )
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _command(commands, "serve", "run the gateway in front of --upstream",
                     "Run the gateway as a streaming reverse proxy in front of --upstream.")
    _command(commands, "demo", "run the gateway on its embedded defaults in front of a demo API",
                    "Run the gateway in front of a built-in demo API, with the in-process Redis emulation and a fresh "
                    "record that is deleted when it stops; prints an API key and curl lines to try.")
    check = _command(commands, "check", "validate a plans.toml and print a summary",
                     "Validate a catalog: print plans x features, limits, rates, credits and routes, and its warnings "
                     "(exit 0), or every problem with its place (exit 1).")
    check.add_argument("file", nargs="?", metavar="PLANS", help="the catalog (default: --plans, GATEWAY_PLANS, else plans.toml)")

    keys = _command(commands, "keys", "create, list and revoke customers' API keys, in the record",
                    "API keys, working on the record directly (no running gateway needed). Pass the settings "
                    "your gateways run with: a revocation is then announced on their Redis, and they refuse the key "
                    "within a second.")
    key_actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = _command(key_actions, "create", "a new key for a billable, printed once")
    create.add_argument("billable", metavar="BILLABLE", help="the customer the key identifies (e.g. org_1)")
    create.add_argument("--name", default="", help="a label to tell keys apart (e.g. ci)")
    create.add_argument("--credits", type=int, help="the key's own budget of credits per --credits-per, beside its owner's (e.g. 500)")
    create.add_argument("--credits-per", default="month", help="the period of --credits (default month)")
    create.add_argument("--rate", help='the key\'s own rate limit (e.g. "2/second")')
    create.add_argument("--disallow", action="append", default=[], metavar="FEATURE", help="a feature of the plan this key may not use (repeatable)")
    create.add_argument("--expires", metavar="ISO", help="when the key's terms end, e.g. 2027-01-01T00:00:00Z (then it is refused)")
    listed = _command(key_actions, "list", "a billable's keys: id, name, created, last used, revoked (never a secret)")
    listed.add_argument("billable", metavar="BILLABLE", help="the customer whose keys to list")
    revoke = _command(key_actions, "revoke", "revoke a key by its id, on every gateway within a second",
                      "Revoke a key by its id. In the record first; then, with --redis-url, announced on the Redis "
                      "your gateways run on, so each refuses it within a second (gateways on the in-process "
                      "emulation ask the record every second).")
    revoke.add_argument("key_id", metavar="ID", help="the key's id (the part after gw_, as keys list shows it)")

    plans = _command(commands, "plans", "put a customer on a plan, in the record and on Redis",
                     "Manual plan assignments, working on the record directly (no running gateway needed), audited as "
                     "\"cli\". With --redis-url (the Redis your gateways run on) every gateway decides with it from its "
                     "next request. A manual plan wins over Stripe's until it is unassigned.")
    plan_actions = plans.add_subparsers(dest="action", required=True, metavar="ACTION")
    assign = _command(plan_actions, "assign", "put a billable on a plan of the catalog")
    assign.add_argument("billable", metavar="BILLABLE", help="the customer (e.g. org_1)")
    assign.add_argument("plan", metavar="PLAN", help="a plan of the running catalog (e.g. pro)")
    unassign = _command(plan_actions, "unassign", "remove a billable's manual plan: back to Stripe's or the default")
    unassign.add_argument("billable", metavar="BILLABLE", help="the customer (e.g. org_1)")

    catalog_cmd = _command(commands, "catalog", "publish a catalog to every gateway on the record and Redis")
    catalog_actions = catalog_cmd.add_subparsers(dest="action", required=True, metavar="ACTION")
    push = _command(catalog_actions, "push", "publish a plans.toml: every gateway on this Redis runs it within 2 s",
                    "Validate a plans.toml and publish it as the next catalog version, in the record directly (no "
                    "running gateway needed); with --redis-url it is announced there, and every gateway on that Redis "
                    "runs it within 2 s. A file that does not load is refused with every problem, and nothing changes.")
    push.add_argument("file", metavar="PLANS", help="the catalog to publish (e.g. plans.toml)")
    audit_cmd = _command(commands, "audit", "the audit log: every admin and CLI change, newest first",
                         "Print the audit log (every change made through the admin API or the CLI, newest first) as "
                         "the admin endpoint answers it.")
    audit_cmd.add_argument("--billable", help="only this billable's changes")
    audit_cmd.add_argument("--since", help="changes at or after this ISO 8601 time (UTC unless it says)")

    db = _command(commands, "db", "the record's schema", "The record's schema (Alembic migrations).")
    db_actions = db.add_subparsers(dest="action", required=True, metavar="ACTION")
    _command(db_actions, "upgrade", "migrate the record to the schema this gateway needs",
                       "Migrate the record to the schema this gateway needs (the embedded SQLite file upgrades itself "
                       "at start; a Postgres that is behind is refused until this runs).")
    events = _command(commands, "events", "the webhook outbox")
    event_actions = events.add_subparsers(dest="action", required=True, metavar="ACTION")
    replay = _command(event_actions, "replay", "queue events for delivery again",
                      "Queue events for delivery again: the dead-lettered ones, or those named by --since or --id.")
    replay.add_argument("--dead", action="store_true", help="only dead-lettered events (the default with no filter)")
    replay.add_argument("--since", help="events created at or after this ISO 8601 time (UTC unless it says)")
    replay.add_argument("--id", dest="event_id", help="this event")
    reconcile = _command(commands, "reconcile", "flush Redis to the record (what every gateway process does)",
                         "Flush what Redis counted to the record, as every gateway process does each interval; "
                         "runs until interrupted, or once with --once.")
    reconcile.add_argument("--once", action="store_true", help="one full pass (sweep every node, flush), then exit")
    usage = _command(commands, "usage", "a billable's usage in a month, per route and operation, from the record")
    usage.add_argument("billable", metavar="BILLABLE", help="the customer (e.g. org_1)")
    usage.add_argument("--period", help="YYYY-MM (default: this month, flushed from Redis first when --redis-url is set)")
    usage.add_argument("--json", action="store_true", help="print the JSON the admin API answers")
    link = _command(commands, "account-link", "a signed link to a billable's usage page (GATEWAY_ACCOUNT_SECRET)")
    link.add_argument("billable", metavar="BILLABLE", help="the customer (e.g. org_1)")
    link.add_argument("--expires-in", type=int, default=3600, help="seconds the link works (default 3600, at most 30 days)")
    link.add_argument("--url", help="the gateway's address as the customer reaches it (default http://HOST:PORT)")
    stripe_cmd = _command(commands, "stripe", "Stripe: compare plans.toml with Stripe's products and prices")
    stripe_actions = stripe_cmd.add_subparsers(dest="action", required=True, metavar="ACTION")
    sync = _command(stripe_actions, "sync", "compare plans.toml with Stripe's products, prices and features",
                    "Compare plans.toml with Stripe's products, prices and features, as a table, and store Stripe's "
                    "prices for every gateway process (needs GATEWAY_STRIPE_API_KEY).")
    sync.add_argument("--push", action="store_true", help="create in Stripe what plans.toml has and Stripe lacks")
    meters = _command(stripe_actions, "meters", "compare the units the gateway billed with Stripe's meter event summaries",
                      "Compare the gateway's billed units per customer and meter in a month with Stripe's meter event "
                      "summaries; prints every total and exits 1 when one differs (needs GATEWAY_STRIPE_API_KEY).")  # fmt: skip
    meters.add_argument("--period", required=True, metavar="YYYY-MM", help="the month (UTC), e.g. 2026-12")
    _command(stripe_actions, "send-meters", "send the billed units waiting in the record to Stripe, until stopped",
             "Send the meter outbox to Stripe (what `gateway serve` does with GATEWAY_STRIPE_API_KEY set), until "
             "SIGINT or SIGTERM; a row sent twice is refused by Stripe, so any number may run.")  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # A server logs what it does; a one-shot command prints its answer, and only warnings besides.
    running = args.command in ("serve", "demo") or (args.command == "reconcile" and not args.once)
    logging.basicConfig(level=logging.INFO if running else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        return _run(args)
    except CatalogError as exc:
        print(exc, file=sys.stderr)
        return 1
    except GatewayError as exc:
        # One line: a driver's message may trail a second one ("Background on this error at: ...").
        print(f"gateway: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - a command ends in one line, never a traceback
        print(f"gateway: unexpected {type(exc).__name__}: {exc} (a bug: please report it with the command)", file=sys.stderr)
        return 70


def _run(args: argparse.Namespace) -> int:
    settings = Settings.load({k: v for k, v in vars(args).items() if k in ENVIRONMENT})
    if args.command == "check":
        catalog = load_catalog(args.file or settings.plans)
        if settings.stripe_api_key and (unmapped := catalog.unmapped_meters()):
            raise CatalogError(unmapped, catalog.source)  # the units billed could not reach Stripe
        print(summary(catalog))
        for warning in catalog.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        return 0
    _record_folder(settings)
    if args.command == "keys":
        return asyncio.run(_keys(settings, args))
    if args.command == "plans":
        return asyncio.run(_plans(settings, args.billable, getattr(args, "plan", None)))
    if args.command == "db":
        return asyncio.run(_db_upgrade(settings))
    if args.command == "catalog":
        return asyncio.run(_catalog_push(settings, args.file))
    if args.command == "audit":
        _existing_record(settings)
        return asyncio.run(_audit(settings, args.billable, _iso(args.since)))
    if args.command == "events":
        _existing_record(settings)
        return asyncio.run(_events_replay(settings, args.dead, _iso(args.since), args.event_id))
    if args.command == "reconcile":
        return asyncio.run(_reconcile(settings, once=args.once))
    if args.command == "usage":
        _existing_record(settings)
        return asyncio.run(_usage(settings, args.billable, args.period, as_json=args.json))
    if args.command == "stripe" and args.action == "meters":
        _existing_record(settings)
        return asyncio.run(_stripe_meters(settings, args.period))
    if args.command == "stripe" and args.action == "send-meters":
        _existing_record(settings)
        return asyncio.run(_send_meters(settings))
    if args.command == "stripe":
        return asyncio.run(_stripe_sync(settings, push=args.push))
    if args.command == "account-link":
        return _account_link(settings, args.billable, args.expires_in, args.url)
    if args.command == "demo":
        from gateway.demo import run_demo

        return run_demo(settings)
    if not settings.upstream:
        raise ConfigError("gateway serve needs the API to protect: --upstream URL or GATEWAY_UPSTREAM")
    return _serve(settings)


def _record_folder(settings: Settings) -> None:
    from gateway.store.db import sqlite_path

    path = sqlite_path(settings.database_url)
    if path is not None and not path.parent.is_dir():
        raise ConfigError(f"the folder of the record {settings.database_url} does not exist: create {path.parent} or pass another --database-url")


def _existing_record(settings: Settings) -> None:
    """A command that reads the record never creates an empty one: a SQLite file that is not there is a mistake."""
    from gateway.store.db import sqlite_path

    path = sqlite_path(settings.database_url)
    if path is not None and not path.exists():
        raise ConfigError(
            f"no record at {settings.database_url} ({path} does not exist): run this where the gateway keeps its "
            "record, or pass --database-url (GATEWAY_DATABASE_URL)"
        )


async def _keys(settings: Settings, args: argparse.Namespace) -> int:
    """`gateway keys create | list | revoke`: on the record; a revocation is announced on Redis when it is set."""
    from gateway.identity import KeyStore
    from gateway.revocations import RevocationFeed
    from gateway.store.db import Database
    from gateway.store.redis import open_redis

    if args.action != "create":
        _existing_record(settings)
    elif not args.billable:
        raise ConfigError("name the billable the key is for, e.g. gateway keys create org_1")
    store = open_redis(settings.redis_url) if settings.redis_url and args.action == "revoke" else None
    db = await Database.connect(settings.database_url, auto_upgrade=True)
    keys = KeyStore(db, feed=RevocationFeed(store) if store is not None else None)
    try:
        if args.action == "create":
            terms = _key_terms(settings, args)
            return await _create_key(keys, db, args.billable, args.name, terms, await _seat(settings, db, args.billable))
        if args.action == "list":
            return _list_keys(args.billable, await keys.list(args.billable))
        return await _revoke_key(keys, db, settings, args.key_id)
    finally:
        await keys.close()
        if store is not None:
            await store.close()
        await db.close()


def _key_terms(settings: Settings, args: argparse.Namespace) -> Any:
    """The key's own terms from --credits, --rate, --disallow, --expires (None without any), by the catalog's rules."""
    from gateway.catalog import load_catalog
    from gateway.errors import BadRequest
    from gateway.terms import validate

    body: dict[str, Any] = {}
    if args.credits is not None:
        body |= {"credits": args.credits, "credits_per": args.credits_per}
    if args.rate is not None:
        body["rate_limit"] = args.rate
    if args.disallow:
        body["disallows"] = args.disallow
    if args.expires is not None:
        body["expires_at"] = args.expires
    if not body:
        return None
    try:
        return validate(body, load_catalog(settings.plans), time.time())
    except BadRequest as exc:
        raise ConfigError(str(exc)) from None


async def _seat(settings: Settings, db: Any, billable: str) -> Any:
    """What the key's insert takes first when the catalog has seats: its org's seat, as the admin API takes
    it (the org's plan is read from Redis, where the gateways decide it)."""
    from gateway.engine import Engine
    from gateway.errors import RedisReplyError, RedisUnavailable
    from gateway.ids import billable as billable_id
    from gateway.members import root_of
    from gateway.seats import seat_taker
    from gateway.store.redis import open_redis

    if not Path(settings.plans).exists():
        # No catalog here: the key is made as before seats (a setting keys create may not need), and it says so.
        print(f"gateway: no {settings.plans} here, so the key's seats are not checked (pass --plans PATH to check them)",
              file=sys.stderr)  # fmt: skip
        return None
    catalog = load_catalog(settings.plans)
    if all(plan.seats is None for plan in catalog.plans.values()):
        return None
    root = await root_of(db, billable_id(billable, "billable"))
    if not settings.redis_url:
        raise ConfigError(f"cannot check {root}'s seats (plans.toml sets seats): its plan is in the gateways' Redis; set "
                          "GATEWAY_REDIS_URL to it, or create the key with POST /_gateway/admin/keys")  # fmt: skip
    store = open_redis(settings.redis_url)
    try:
        plan = (await Engine(store, catalog).plan_of(root)).name
    except (RedisUnavailable, RedisReplyError) as exc:
        raise ConfigError(f"cannot check {root}'s seats: Redis at {store.url} did not answer ({exc}); retry, or create "
                          "the key with POST /_gateway/admin/keys") from None  # fmt: skip
    finally:
        await store.close()
    return seat_taker(db, catalog, plan, root)


async def _create_key(keys: Any, db: Any, billable: str, name: str, terms: Any = None, seat: Any = None) -> int:
    from gateway import audit
    from gateway.members import key_member, set_terms
    from gateway.seats import NoSeat

    try:
        created = await keys.create(billable, name, seat=seat)
    except ValueError as exc:  # the billable id rule
        raise ConfigError(str(exc)) from None
    except NoSeat as exc:
        raise ConfigError(f"no seat for a key of {billable}: {exc}") from None
    await audit.record(db, token=audit.CLI, action="key.create", billable=billable, before=None, after={"id": created.id, "name": created.name})
    if terms is not None:
        await set_terms(db, key_member(created.id), terms, parent=billable)
        await audit.record(db, token=audit.CLI, action="key.terms", billable=billable, before=None, after={"id": created.id, "terms": terms.shown()})
    print(created.key)
    print(f"key {created.id} for {billable}" + (f" ({name})" if name else "") + ": shown once, store it now", file=sys.stderr)
    return 0


def _list_keys(billable: str, found: list[Any]) -> int:
    if not found:
        print(f"{billable} has no API keys")
        return 0
    rows = [["id", "name", "created", "last used", "revoked"]]
    for k in found:
        rows.append([k.id, k.name or "-", _when(k.created_at), _when(k.last_used_at), "revoked" if k.revoked else "-"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print("\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows))
    return 0


def _when(at: datetime | None) -> str:
    return "-" if at is None else at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


async def _revoke_key(keys: Any, db: Any, settings: Settings, key_id: str) -> int:
    from gateway import audit

    owner = await keys.owner(key_id)

    async def recorded() -> None:
        if owner is not None and not owner[1]:  # revoking again changes nothing
            before, after = {"id": key_id, "revoked": False}, {"id": key_id, "revoked": True}
            await audit.record(db, token=audit.CLI, action="key.revoke", billable=owner[0], before=before, after=after)

    try:
        found = await keys.revoke(key_id)
    except RedisUnavailable as exc:
        await recorded()
        raise GatewayError(
            f"revoked {key_id} in the record, but Redis did not take the announcement ({str(exc).rstrip('.')}); "
            f"gateways that did not hear it may accept the key for a few minutes: run `gateway keys revoke {key_id}` "
            "again when Redis is back"
        ) from None
    if not found:
        raise ConfigError(f"no API key {key_id} in the record: `gateway keys list BILLABLE` shows the ids")
    await recorded()
    where = "announced on Redis" if settings.redis_url else "gateways on this record refuse it within a second"
    print(f"revoked {key_id} ({where})")
    return 0


async def _plans(settings: Settings, billable: str, plan: str | None) -> int:
    """`gateway plans assign BILLABLE PLAN | unassign BILLABLE`: what PUT / DELETE .../plan do, under the
    running catalog (the newest published to the record, else --plans)."""
    from gateway import audit
    from gateway.admin import ArchivedPlan, assign_plan
    from gateway.errors import BadRequest
    from gateway.ids import billable as billable_id
    from gateway.publishing import Catalogs
    from gateway.reconcile import connect
    from gateway.store.db import Database
    from gateway.store.redis import open_redis

    billable_id(billable, "BILLABLE")
    db = await Database.connect(settings.database_url, auto_upgrade=True)
    store = open_redis(settings.redis_url)
    try:
        published = await Catalogs(db, store).newest()
        catalog = published.catalog if published is not None else load_catalog(settings.plans)
        connected = connect(store, catalog, db)
        try:
            status = await assign_plan(connected.engine, connected.grants, db, billable, plan, token=audit.CLI)
        except (BadRequest, ArchivedPlan) as exc:
            print(f"gateway: {exc}", file=sys.stderr)
            return 1
    finally:
        await store.close()
        await db.close()
    where = (f"every gateway on {store.url} decides with it from its next request" if settings.redis_url
             else "no --redis-url: in the record; a gateway on the in-process emulation takes it when it next starts")  # fmt: skip
    print(f"{billable} is on {status['plan']} ({status['plan_source']}): {where}")
    return 0


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


async def _stripe_meters(settings: Settings, period: str) -> int:
    """`gateway stripe meters --period YYYY-MM`: the gateway's billed totals against Stripe's, 1 if one differs."""
    import stripe

    from gateway.billing.client import close_client, stripe_client
    from gateway.billing.meters import compare, month_bounds, totals_table
    from gateway.store.db import Database

    try:
        month_bounds(period)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    catalog = load_catalog(settings.plans)
    client = stripe_client(settings)
    db = await Database.connect(settings.database_url, auto_upgrade=settings.database_url.startswith("sqlite"))
    try:
        totals = await compare(db, client, catalog.stripe_meter, period)
    except stripe.StripeError as exc:
        print(f"gateway: Stripe answered: {exc.user_message or exc}", file=sys.stderr)
        return 2
    finally:
        await close_client(client)
        await db.close()
    if not totals:
        print(f"nothing billed in {period}")
        return 0
    print(totals_table(totals))
    differing = [t for t in totals if t.differs]
    print(f"{len(differing)} of {len(totals)} total(s) differ" if differing else f"all {len(totals)} total(s) agree with Stripe")
    return 1 if differing else 0


async def _send_meters(settings: Settings) -> int:
    """`gateway stripe send-meters`: the meter sender alone, until interrupted."""
    from gateway.billing.client import close_client, stripe_client
    from gateway.billing.meters import MeterSender
    from gateway.store.db import Database

    catalog = load_catalog(settings.plans)
    client = stripe_client(settings)
    db = await Database.connect(settings.database_url, auto_upgrade=settings.database_url.startswith("sqlite"))
    sender = MeterSender(db, client, event_name=lambda meter: catalog.stripe_meter(meter) or meter,
                         stream_above=settings.stripe_meter_stream_above, lease=settings.stripe_meter_lease)  # fmt: skip
    sender.start()
    try:
        await asyncio.Event().wait()  # until interrupted
        return 0
    finally:
        await sender.stop()
        await close_client(client)
        await db.close()


async def _catalog_push(settings: Settings, path: str) -> int:
    """`gateway catalog push PLANS`: the next version in the record, announced on Redis."""
    from gateway import audit
    from gateway.publishing import Catalogs
    from gateway.store.db import Database
    from gateway.store.redis import open_redis

    catalog = load_catalog(path)  # every problem with its place, and nothing changes
    text = Path(path).read_text(encoding="utf-8")
    db = await Database.connect(settings.database_url, auto_upgrade=True)
    store = open_redis(settings.redis_url)
    catalogs = Catalogs(db, store)
    try:
        published, changed = await catalogs.publish(text, token=audit.CLI, catalog=catalog)
    except RedisUnavailable as exc:
        running = catalogs.running
        raise GatewayError(
            f"{path} is catalog version {running.version if running else '?'} in the record, but Redis did not take the "
            f"announcement ({str(exc).rstrip('.')}): gateways run it when they next start; push again when Redis is back"
        ) from None
    finally:
        await store.close()
        await db.close()
    where = (f"every gateway on {store.url} runs it within 2 s" if settings.redis_url
             else "no --redis-url: gateways on this record run it when they next start")  # fmt: skip
    if changed:
        print(f"published {path} as catalog version {published.version} (sha256 {published.sha256}): {where}")
    else:
        print(f"{path} is catalog version {published.version} already (sha256 {published.sha256}): nothing to publish")
    return 0


async def _audit(settings: Settings, billable: str | None, since: datetime | None) -> int:
    import json

    from gateway import audit
    from gateway.ids import billable as billable_id
    from gateway.store.db import Database

    if billable is not None:
        billable_id(billable, "--billable")  # BadRequest: the command's one line
    db = await Database.connect(settings.database_url, auto_upgrade=True)
    try:
        found = await audit.entries(db, billable=billable, since=since)
    finally:
        await db.close()
    print(json.dumps({"entries": found}, indent=2))
    return 0


def _serve(settings: Settings) -> int:
    from gateway.server import serve

    return serve(settings)


async def _db_upgrade(settings: Settings) -> int:
    from gateway.store.db import Database

    logging.getLogger("gateway.store.db").setLevel(logging.WARNING)  # the one line below says what happened
    db = await Database.connect(settings.database_url, auto_upgrade=False)
    try:
        before = await db.revision()
        await db.upgrade()
        after = await db.revision()
    finally:
        await db.close()
    if before is None:
        print(f"{db.shown}: schema created (revision {after})")
    elif before != after:
        print(f"{db.shown}: upgraded from revision {before} to {after}")
    else:
        print(f"{db.shown}: already at revision {after}, nothing to do")
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

    from gateway.events import replay
    from gateway.store.db import Database

    db = await Database.connect(settings.database_url, auto_upgrade=True)
    try:
        count = await replay(db, dead=dead, since=since, event_id=event_id)
    finally:
        await db.close()
    print(f"{count} event(s) queued for delivery again")
    return 0


async def _reconcile(settings: Settings, *, once: bool) -> int:
    from gateway.reconcile import connect
    from gateway.store.db import Database
    from gateway.store.redis import open_redis

    if settings.redis_url is None:
        raise ConfigError("gateway reconcile needs the Redis to read: --redis-url URL or GATEWAY_REDIS_URL")
    catalog = load_catalog(settings.plans)
    db = await Database.connect(settings.database_url, auto_upgrade=True)
    store = open_redis(settings.redis_url)
    reconciler = connect(store, catalog, db, interval=settings.reconcile_interval).reconciler
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

    from gateway.store.db import Database
    from gateway.usage import PERIOD, current_period, render, usage_report

    # The catalog only gives the timezone (and the flush); the record has the usage without it.
    named = settings.plans != Settings().plans
    catalog = load_catalog(settings.plans) if settings.redis_url or named or os.path.exists(settings.plans) else None
    current = current_period(catalog.settings.zone if catalog else UTC, time.time())
    period = period or current
    if not PERIOD.match(period):
        raise ConfigError(f"--period: a month, YYYY-MM (like {current}), not {period!r}")
    db = await Database.connect(settings.database_url, auto_upgrade=True)
    try:
        if period == current and settings.redis_url and catalog is not None:
            logging.getLogger("gateway.reconcile").setLevel(logging.ERROR)  # the failure is this command's one line
            await _flush_one(settings, catalog, db, billable)
        report = await usage_report(db, billable, period)  # an outage is DatabaseUnavailable (store.db.answering)
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


def _account_link(settings: Settings, billable: str, expires_in: int, url: str | None) -> int:
    """Print the link (stdout) and when it expires (stderr), as POST .../account-link answers them."""
    from gateway.ids import billable as billable_id
    from gateway.web import links

    key = links.secret(settings)
    if key is None:
        raise ConfigError("account links are signed with GATEWAY_ACCOUNT_SECRET (or GATEWAY_ADMIN_TOKEN): set the one the gateway runs with")
    made = links.make(key, url or f"http://{settings.host}:{settings.port}", billable_id(billable, "BILLABLE"), expires_in, time.time())
    print(made["url"])
    print(f"expires at {made['expires_at']}", file=sys.stderr)
    return 0
