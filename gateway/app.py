"""Assemble a running gateway from Settings: catalog, Redis, the record, keys, engine, endpoints, proxy."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from gateway import tracing
from gateway.admin import Endpoints
from gateway.billing.sync import PriceBook
from gateway.catalog import Catalog, load_catalog
from gateway.check import Checker, CheckResult, Outcome, SettleResult
from gateway.engine import Engine
from gateway.errors import ConfigError, DatabaseUnavailable, RedisRefused, RedisUnavailable
from gateway.events import Deliverer, Outbox
from gateway.grants import Grants
from gateway.identify import BillableFn, Identifier
from gateway.identity import KeyStore
from gateway.ids import billable as billable_id
from gateway.metrics import Metrics, Probes
from gateway.middleware import ASGIApp, GatewayMiddleware, freeze_heap
from gateway.proxy import Proxy
from gateway.publishing import Catalogs, Published
from gateway.reconcile import Reconciler, connect
from gateway.revocations import RevocationFeed
from gateway.settings import Settings
from gateway.state import CHANGE_FIELD, PREFIX, probe_key
from gateway.store.db import Database, database_url
from gateway.store.redis import RedisStore, open_redis
from gateway.web import links
from gateway.web.account import Account
from gateway.web.pricing import pricing_route

if TYPE_CHECKING:  # the billing (and stripe) is imported only when GATEWAY_STRIPE_API_KEY is set
    from gateway.billing import Billing

log = logging.getLogger("gateway")

CHECK_TIMEOUT_S = 3.0  # a start-up check of Redis or the upstream: said, never waited on for long


@dataclass
class Prepared:
    """What a gateway process is made of before any I/O: the settings, the catalog, the Redis store.
    `start` connects it into a running Gateway."""

    settings: Settings
    catalog: Catalog
    store: RedisStore
    metrics: Metrics = field(default_factory=Metrics)
    plans_text: str = ""  # the --plans file as read at start: published when the record has no catalog

    @classmethod
    def from_settings(cls, settings: Settings) -> Prepared:
        """Everything a setting can get wrong is found here, before a server starts (no I/O yet)."""
        catalog = load_catalog(settings.plans)
        database_url(settings.database_url)
        for warning in catalog.warnings:
            log.warning("%s: %s", catalog.source, warning)
        text = Path(settings.plans).read_text(encoding="utf-8")
        return cls(settings=settings, catalog=catalog, store=open_redis(settings.redis_url), plans_text=text)

    async def start(self) -> Gateway:
        """Connect the record, keys, engine, reconciliation, billing and events: the whole running gateway."""
        settings = self.settings
        await self.check_redis()
        try:
            db = await Database.connect(
                settings.database_url, auto_upgrade=settings.database_url.startswith("sqlite"), timeout=settings.db_timeout
            )
            await db.check_current()
        except DatabaseUnavailable as exc:
            raise exc.also(": check that it runs and that --database-url (GATEWAY_DATABASE_URL) names it") from exc
        # The newest catalog published to the record, else --plans, published now as its first version.
        catalogs = Catalogs(db, self.store)
        running, line = await catalogs.start_with(self.catalog, self.plans_text)
        log.info("%s", line)
        catalog = running.catalog
        # The in-process emulation is heard by this process alone, and `gateway keys revoke` cannot reach it:
        # without a shared Redis the record is asked about each key every second instead.
        feed = RevocationFeed(self.store) if settings.redis_url else None
        keys = None if settings.billable_header else KeyStore(db, feed=feed)
        # Redis lost a billable's state: its first request restores it from the record before deciding.
        connected = connect(
            self.store, catalog, db, hold_ttl=settings.hold_ttl, interval=settings.reconcile_interval,
            events_retention=timedelta(days=settings.events_retention_days),
        )  # fmt: skip
        engine, grants, reconciler = connected.engine, connected.grants, connected.reconciler
        reconciler.start()
        catalogs.start(on_change=lambda published: engine.use_catalog(published.catalog))
        policy = await self.store.eviction_policy()
        if policy not in (None, "noeviction"):
            log.warning("Redis maxmemory-policy is %r: it may evict billables' state; run it with noeviction", policy)
        # The pricing page reads the latest Stripe snapshot (or plans.toml alone); billing needs an API key.
        book = PriceBook(db)
        billing = None
        if settings.stripe_api_key:
            from gateway.billing import Billing

            billing = Billing(settings=settings, db=db, engine=engine, grants=grants, book=book)
            await billing.start()
        deliverer = None
        if catalog.file.events.webhook_url:
            deliverer = Deliverer(db, catalog.file.events.webhook_url, settings.webhook_secret)
            deliverer.start()
        store = self.store
        self.metrics.probes = Probes(breakers=lambda: {node: b.state for node, b in store.breakers().items()},
                                     record=reconciler.health, backlog=Outbox(db).backlog)  # fmt: skip
        return Gateway(
            settings=settings, store=self.store, metrics=self.metrics, db=db, keys=keys, engine=engine, grants=grants,
            reconciler=reconciler, book=book, billing=billing, deliverer=deliverer, catalogs=catalogs,
        )  # fmt: skip

    async def check_redis(self) -> None:
        """Say at start what is wrong with Redis: unreachable is a line (routes follow on_redis_down until it
        answers); a Redis that answers but refuses the URL (a database index it lacks) is a setting to fix."""
        if self.store.embedded:
            return
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                await self.store.fields([probe_key(PREFIX)], CHANGE_FIELD)
        except RedisRefused as exc:
            raise ConfigError(
                f"Redis at {self.store.url} refused the connection: {exc}. Fix GATEWAY_REDIS_URL "
                "(a database index must be one the server has: 0 to 15 unless redis.conf `databases` says more)"
            ) from exc
        except (RedisUnavailable, TimeoutError) as exc:
            tls = " If that port speaks no TLS, the URL is redis://, not rediss://." if self.store.url.startswith("rediss:") else ""
            log.warning(
                "%s Starting anyway (the catalog's on_redis_down: %s).%s",
                exc or f"Redis at {self.store.url} did not answer within {CHECK_TIMEOUT_S:g}s.",
                self.catalog.settings.on_redis_down, tls,
            )


@dataclass
class Gateway:
    """The parts of one running gateway process, made whole by `Prepared.start`; `stop` closes them."""

    settings: Settings
    store: RedisStore
    metrics: Metrics
    db: Database
    keys: KeyStore | None  # None: billables are named by a trusted header
    engine: Engine
    grants: Grants
    reconciler: Reconciler
    book: PriceBook
    billing: Billing | None  # when GATEWAY_STRIPE_API_KEY is set
    deliverer: Deliverer | None  # when the catalog names an [events] webhook_url
    catalogs: Catalogs  # the published versions; the newest runs here

    @property
    def catalog(self) -> Catalog:
        """The catalog deciding now: the engine holds it, a published version replaces it there."""
        return self.engine.catalog

    async def reload(self) -> Published:
        """SIGHUP: read --plans again and publish it (every process on this Redis follows)."""
        catalog = load_catalog(self.settings.plans)
        text = Path(self.settings.plans).read_text(encoding="utf-8")
        published, changed = await self.catalogs.publish(text, token="sighup", catalog=catalog)
        log.info("SIGHUP: %s %s", self.settings.plans, f"published as version {published.version}" if changed else f"is version {published.version} already")
        return published

    async def stop(self) -> None:
        await self.catalogs.stop()
        if self.billing is not None:
            await self.billing.stop()
        await self.reconciler.stop()  # flushes once more, while Redis and the database are still open
        if self.deliverer is not None:
            await self.deliverer.stop()
        if self.keys is not None:
            await self.keys.close()  # lets pending last_used_at writes finish
        await self.store.close()
        await self.db.close()


class GatewayApp:
    """The whole gateway as one ASGI app: what `gateway serve` runs, and what an app is wrapped in.

    Lifespan starts the gateway (the record, reconciliation, events, the admin API under /_gateway), then
    the wrapped app's own lifespan; requests go through the middleware to the wrapped app, or to the proxy
    in front of `settings.upstream` when there is none. `GatewayApp.wrap(app, ...)` builds one from keyword
    settings, as `gateway serve` does from flags.
    """

    def __init__(
        self, settings: Settings, upstream_app: ASGIApp | None = None, *, billable: BillableFn | None = None,
        tracer_provider: Any = None,
    ) -> None:
        self.prepared = Prepared.from_settings(settings)
        # OpenTelemetry (gateway/tracing.py): the caller's TracerProvider, else one exporting to --otel-endpoint.
        self._own_provider = tracer_provider is None
        self.tracer_provider: Any = tracing.provider(settings) if tracer_provider is None else tracer_provider
        self._serve: ASGIApp | None = None  # the middleware, in a span per request when tracing is on
        self._gateway: Gateway | None = None
        self.settings = settings
        self.upstream: Any = upstream_app or Proxy(
            settings.upstream or "", timeout=settings.upstream_timeout, max_body=settings.max_body,
            trust_forwarded=settings.trust_forwarded,
        )  # fmt: skip
        self.billable = billable  # the app names the billable (a callable over the ASGI scope), instead of keys
        self.middleware: GatewayMiddleware | None = None
        self._inner: _Lifespan | None = None
        self._check: Checker | None = None

    @property
    def gateway(self) -> Gateway:
        """The running gateway's parts (after the lifespan's startup)."""
        assert self._gateway is not None, "the gateway is started by the lifespan's startup"
        return self._gateway

    @classmethod
    def wrap(cls, app: ASGIApp, *, billable: BillableFn | None = None, tracer_provider: Any = None, **settings: Any) -> GatewayApp:
        """`app` behind the whole gateway. Settings are keyword arguments named as `gateway serve`'s flags
        (`plans`, `redis_url`, `database_url`, `admin_token`, `billable_header`, ...), else the GATEWAY_*
        environment, else the defaults; `billable` names the billable from the ASGI scope (else API keys);
        `tracer_provider` (an OpenTelemetry TracerProvider) traces every request (gateway/tracing.py)."""
        known = {f.name for f in fields(Settings)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise TypeError(f"unknown setting(s) {', '.join(unknown)}: the settings are {', '.join(sorted(known))}")
        return cls(Settings.load(settings), upstream_app=app, billable=billable, tracer_provider=tracer_provider)

    async def startup(self, scope: dict[str, Any] | None = None) -> None:
        """Connect the gateway, then start the wrapped app (the lifespan's startup; `gateway serve` calls
        it directly, without a lifespan scope)."""
        gw = self._gateway = await self.prepared.start()
        if isinstance(self.upstream, Proxy):
            await _check_upstream(self.upstream.upstream)
        identifier = Identifier(keys=gw.keys, billable=self.billable, billable_header=self.settings.billable_header)
        engine = gw.engine
        public = [pricing_route(lambda: engine.catalog, gw.book)]
        account = Account(engine=engine, db=gw.db, identify=identifier.of_request, secret=links.secret(self.settings), billing=gw.billing)
        public += account.routes()
        admin = account.admin_routes()
        if gw.billing is not None:
            public += gw.billing.routes(identifier.of_request)
            admin += gw.billing.admin_routes()
        endpoints = Endpoints(
            engine=gw.engine,
            keys=gw.keys,
            db=gw.db,
            grants=gw.grants,
            reconciler=gw.reconciler,
            metrics=gw.metrics,
            identify=identifier.of_request,
            admin_token=self.settings.admin_token,
            admin_tokens=self.settings.admin_tokens,
            catalogs=gw.catalogs,
            metrics_token=self.settings.metrics_token,
            extra_routes=public,
            extra_admin_routes=admin,
        )
        self.middleware = GatewayMiddleware(
            self.upstream,
            engine=gw.engine,
            identifier=identifier,
            endpoints=endpoints,
            metrics=gw.metrics,
            max_body=self.settings.max_body,
            processes=self.settings.processes,
            # Auto-recharge when a spend took the lease.
            on_decision=gw.billing.on_decision if gw.billing is not None else None,
            freeze_gc=False,  # done below, once the wrapped app has started too
        )
        provider = self.tracer_provider
        self._serve = self.middleware if provider is None else tracing.traced(self.middleware, provider)
        self._inner = _Lifespan(self.upstream, scope or {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}})
        await self._inner.startup()
        freeze_heap()  # everything loaded so far (catalog, SQLAlchemy, aiohttp, ...) lives as long as the process

    async def reload(self) -> Published:
        """SIGHUP: publish --plans again (gateway serve calls it)."""
        return await self.gateway.reload()

    # ---- the decision as data, for an app that does not send its requests through the middleware ----------

    async def check(
        self,
        billable: str,
        *,
        route: str | None = None,
        feature: str | None = None,
        limit: str | None = None,
        by: int | None = None,
        operation: str | None = None,
        units: float | None = None,
        consume: bool = False,
        idempotency_key: str | None = None,
    ) -> CheckResult:
        """May `billable` do this now? Name a route (`"POST /v1/images"`, decided as the proxy decides it) or a
        feature, a limit with `by` units, or an operation with `units`. Dry by default (writes nothing);
        `consume=True` takes it as the proxy admits a request and answers a `hold` for `settle`. BadRequest
        (gateway.errors) for an unknown name or a bad number. With an `idempotency_key`, a consuming check
        retried within 24 h answers the first answer and takes nothing more. See gateway/check.py."""
        return await self._checker().check(
            billable, route=route, feature=feature, limit=limit, by=by, operation=operation, units=units, consume=consume,
            idempotency_key=idempotency_key,
        )  # fmt: skip

    async def settle(self, hold: str, *, outcome: Outcome, units: float | None = None, idempotency_key: str | None = None) -> SettleResult:
        """Settle a consuming check's hold (from any process on the same Redis) as the proxy settles an answer:
        `"success"` keeps it (a metered operation charged for `units`), `"failure"` gives it back.
        gateway.check.HoldNotOpen when it was settled already or outlived GATEWAY_HOLD_TTL."""
        return await self._checker().settle(hold, outcome=outcome, units=units, idempotency_key=idempotency_key)

    async def status(self, billable: str) -> dict[str, Any]:
        """The billable's status as /_gateway/usage answers it: usage, limits, credits and rate limits, each
        limit's and the credits' severity and sentence, and the overall banner (see gateway/severity.py)."""
        return await self.gateway.engine.status(billable_id(billable, "billable"))

    def _checker(self) -> Checker:
        if self._check is None:
            assert self.gateway.engine is not None, "check and settle work after the gateway started (lifespan startup)"
            self._check = Checker(self.gateway.engine)
        return self._check

    async def shutdown(self) -> None:
        if self._inner is not None:
            await self._inner.shutdown()
        if hasattr(self.upstream, "aclose"):
            await self.upstream.aclose()
        if self._gateway is None:
            await self.prepared.store.close()
        else:
            await self._gateway.stop()
        if self._own_provider and self.tracer_provider is not None:
            await tracing.shut_down(self.tracer_provider)  # exports the spans still batched

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    try:
                        await self.startup(scope)
                    except Exception as exc:  # noqa: BLE001 - the server prints this and exits
                        log.error("gateway could not start: %s", exc)
                        await send({"type": "lifespan.startup.failed", "message": str(exc)})
                        return
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.shutdown()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        assert self._serve is not None, "the gateway serves requests after lifespan startup"
        await self._serve(scope, receive, send)


class _Lifespan:
    """The wrapped app's own lifespan, run inside the gateway's: its startup after the gateway's, its
    shutdown before. An app that does not speak lifespan (it raises on it) is run without, as servers do."""

    def __init__(self, app: ASGIApp, scope: dict[str, Any]) -> None:
        self.app = app
        self.scope = scope
        self._to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._from_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def startup(self) -> None:
        self._task = asyncio.create_task(self._run())
        await self._to_app.put({"type": "lifespan.startup"})
        answer = await self._from_app.get()
        if answer["type"] == "lifespan.startup.failed":
            raise RuntimeError(f"the app did not start: {answer.get('message', '')}")

    async def shutdown(self) -> None:
        if self._task is None or self._task.done():
            return
        await self._to_app.put({"type": "lifespan.shutdown"})
        answer = await self._from_app.get()
        await self._task
        if answer["type"] == "lifespan.shutdown.failed":
            log.error("the app did not shut down cleanly: %s", answer.get("message", ""))

    async def _run(self) -> None:
        try:
            await self.app(self.scope, self._to_app.get, self._from_app.put)
        except Exception as exc:  # noqa: BLE001 - an app without lifespan support raises on it
            log.debug("the app does not handle lifespan (%s): run without it", exc)
        # Whatever it did not answer, it has nothing more to say.
        await self._from_app.put({"type": "lifespan.startup.complete"})
        await self._from_app.put({"type": "lifespan.shutdown.complete"})


async def _check_upstream(upstream: str) -> None:
    """An upstream that does not accept connections is a start-up line, not a failure (requests get 502)."""
    url = urlsplit(upstream)
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            _, writer = await asyncio.open_connection(url.hostname, url.port or (443 if url.scheme == "https" else 80))
    except TimeoutError:
        reason = f"no answer within {CHECK_TIMEOUT_S:g}s"
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
    else:
        writer.close()
        return
    log.warning("the upstream %s does not accept connections (%s): starting anyway; requests get 502 until it does", upstream, reason)


__all__ = ["Gateway", "GatewayApp", "Prepared"]
