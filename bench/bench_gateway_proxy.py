"""gateway-proxy: the full `gateway serve` app proxying to UPSTREAM_URL.

The peers' harness sends keys the gateway did not issue, so by default the billable is the trusted
X-Api-Key header. With GATEWAY_BENCH_DB (bench/proxy_keys.sh) it checks real API keys against that record."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import traced
from common import REDIS_URL
from overridden import on_startup, wanted

from gateway.app import GatewayApp
from gateway.settings import Settings

record = os.environ.get("GATEWAY_BENCH_DB")
# Settings.load: GATEWAY_* variables (e.g. GATEWAY_RECONCILE_INTERVAL) still apply where no value is given here.
app = GatewayApp(
    Settings.load(
        {
            "plans": str(Path(__file__).with_name("plans.toml")),
            "upstream": os.environ["UPSTREAM_URL"],
            "redis_url": REDIS_URL,
            "database_url": f"sqlite:///{record or tempfile.mkdtemp(prefix='gwbench-') + '/gateway.db'}",
            **({} if record else {"billable_header": "x-api-key"}),
        }
    ),
    tracer_provider=traced.provider() if traced.wanted() else None,  # BENCH_TRACING=1 (bench/traced.py)
)
if wanted():
    gateway_app = app
    app = on_startup(gateway_app, lambda: gateway_app.gateway.engine)  # type: ignore[assignment]
