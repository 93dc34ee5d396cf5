"""Assemble a running gateway from Settings: catalog, Redis, the record, keys, engine, endpoints, proxy."""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from starlette.requests import Request

from gateway.admin import Endpoints
from gateway.billing.sync import PriceBook
from gateway.catalog import Catalog, load_catalog
from gateway.engine import Engine
from gateway.events import Deliverer
from gateway.grants import Grants
from gateway.identity import KeyStore
from gateway.metrics import Metrics
from gateway.middleware import ASGIApp, GatewayMiddleware
from gateway.proxy import Proxy
from gateway.reconcile import Reconciler, attach
from gateway.revocations import RevocationFeed
from gateway.settings import Settings
from gateway.store.db import Database
from gateway.store.redis import RedisStore, open_redis
from gateway.web.pricing import pricing_route

log = logging.getLogger("gateway")


@dataclass
class Gateway:
    """The parts of one gateway process; `start` connects them, `stop` closes them."""

    settings: Settings
    catalog: Catalog
    store: RedisStore
    metrics: Metrics = field(default_factory=Metrics)
    db: Database | None = None
    keys: KeyStore | None = None
    engine: Engine | None = None
    grants: Grants | None = None
    reconciler: Reconciler | None = None
    deliverer: Deliverer | None = None
    book: PriceBook | None = None
    billing: Any = None  # gateway.billing.Billing when GATEWAY_STRIPE_API_KEY is set

    @classmethod
    def from_settings(cls, settings: Settings) -> Gateway:
        catalog = load_catalog(settings.plans)
        return cls(settings=settings, catalog=catalog, store=open_redis(settings.redis_url))

    async def start(self) -> None:
        self.db = await Database.connect(self.settings.database_url, auto_upgrade=self.settings.database_url.startswith("sqlite"))
        await self.db.check_current()
        self.keys = None if self.settings.billable_header else KeyStore(self.db, feed=RevocationFeed(self.store))
        self.engine = Engine(self.store, self.catalog)
        self.grants = Grants(self.db, self.engine)
        # Redis lost a billable's state: its first request restores it from the record before deciding.
        self.reconciler = attach(
            self.engine, self.db, self.grants, interval=self.settings.reconcile_interval,
            events_retention=timedelta(days=self.settings.events_retention_days),
        )  # fmt: skip
        self.reconciler.start()
        policy = await self.store.eviction_policy()
        if policy not in (None, "noeviction"):
            log.warning("Redis maxmemory-policy is %r: it may evict billables' state; run it with noeviction", policy)
        # The pricing page reads the latest Stripe snapshot (or plans.toml alone); billing needs an API key.
        self.book = PriceBook(self.db)
        if self.settings.stripe_api_key:
            from gateway.billing import Billing

            self.billing = Billing(settings=self.settings, db=self.db, engine=self.engine, grants=self.grants, book=self.book)
            await self.billing.start()
        if self.catalog.file.events.webhook_url:
            self.deliverer = Deliverer(self.db, self.catalog.file.events.webhook_url, self.settings.webhook_secret)
            self.deliverer.start()

    async def stop(self) -> None:
        if self.billing is not None:
            await self.billing.stop()
        if self.reconciler is not None:
            await self.reconciler.stop()  # flushes once more, while Redis and the database are still open
        if self.deliverer is not None:
            await self.deliverer.stop()
        if self.keys is not None:
            await self.keys.close()  # lets pending last_used_at writes finish
        await self.store.close()
        if self.db is not None:
            await self.db.close()


class GatewayApp:
    """The ASGI app `gateway serve` runs: lifespan starts the gateway, requests go through the middleware."""

    def __init__(self, settings: Settings, upstream_app: ASGIApp | None = None) -> None:
        self.gateway = Gateway.from_settings(settings)
        self.settings = settings
        self.upstream: Any = upstream_app or Proxy(
            settings.upstream or "", timeout=settings.upstream_timeout, max_body=settings.max_body
        )
        self.middleware: GatewayMiddleware | None = None

    async def _startup(self) -> None:
        gw = self.gateway
        await gw.start()
        assert gw.engine is not None
        middleware = GatewayMiddleware(
            self.upstream,
            engine=gw.engine,
            keys=gw.keys,
            billable_header=self.settings.billable_header,
            metrics=gw.metrics,
            max_body=self.settings.max_body,
        )

        async def identify(request: Request) -> str | None:
            return await middleware.identify(dict(request.scope))

        assert gw.book is not None
        public = [pricing_route(self.gateway.catalog, gw.book)]
        if gw.billing is not None:
            middleware.on_decision = gw.billing.on_decision  # auto-recharge when a spend took the lease
            public += gw.billing.routes(identify)

        middleware.endpoints = Endpoints(
            engine=gw.engine,
            keys=gw.keys,
            db=gw.db,
            grants=gw.grants,
            reconciler=gw.reconciler,
            metrics=gw.metrics,
            identify=identify,
            admin_token=self.settings.admin_token,
            metrics_token=self.settings.metrics_token,
            extra_routes=public,
            extra_admin_routes=gw.billing.admin_routes() if gw.billing is not None else None,
        )
        self.middleware = middleware
        # Everything loaded so far (catalog, SQLAlchemy, aiohttp, ...) lives as long as the process: keep
        # it out of the collector's scans, which otherwise cost more than the decision under load.
        gc.collect()
        gc.freeze()

    async def _shutdown(self) -> None:
        if hasattr(self.upstream, "aclose"):
            await self.upstream.aclose()
        await self.gateway.stop()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    try:
                        await self._startup()
                    except Exception as exc:  # noqa: BLE001 - the server prints this and exits
                        log.error("gateway could not start: %s", exc)
                        await send({"type": "lifespan.startup.failed", "message": str(exc)})
                        return
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self._shutdown()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        assert self.middleware is not None, "the gateway serves requests after lifespan startup"
        await self.middleware(scope, receive, send)


__all__ = ["Gateway", "GatewayApp"]
