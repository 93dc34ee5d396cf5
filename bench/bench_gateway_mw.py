"""gateway-mw: the bare app of peers/bare.py behind the gateway middleware (billable = X-Api-Key); BENCH_TRACING=1
traces every request (bench/traced.py)."""

from __future__ import annotations

from pathlib import Path

import bare  # ../shared/bench/peers
import traced
from common import REDIS_URL, scope_key
from overridden import on_startup, wanted

from gateway.catalog import load_catalog
from gateway.engine import Engine
from gateway.middleware import GatewayMiddleware
from gateway.store.redis import open_redis
from gateway.tracing import traced as tracing

engine = Engine(open_redis(REDIS_URL), load_catalog(Path(__file__).with_name("plans.toml")), prefix="gwbench")
middleware = GatewayMiddleware(bare.app, engine=engine, billable=scope_key)
app = tracing(middleware, traced.provider()) if traced.wanted() else middleware
if wanted():
    app = on_startup(app, lambda: engine)  # type: ignore[assignment]
