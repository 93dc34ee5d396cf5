"""gateway-proxy: the full `gateway serve` app proxying to UPSTREAM_URL (billable from the trusted X-Api-Key header)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from common import REDIS_URL

from gateway.app import GatewayApp
from gateway.settings import Settings

# Settings.load: GATEWAY_* variables (e.g. GATEWAY_RECONCILE_INTERVAL) still apply where no value is given here.
app = GatewayApp(
    Settings.load(
        {
            "plans": str(Path(__file__).with_name("plans.toml")),
            "upstream": os.environ["UPSTREAM_URL"],
            "redis_url": REDIS_URL,
            "database_url": f"sqlite:///{tempfile.mkdtemp(prefix='gwbench-')}/gateway.db",
            "billable_header": "x-api-key",
        }
    )
)
