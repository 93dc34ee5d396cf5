"""gateway-proxy in its default identity mode: real API keys (`gw_...`) checked against the record.

bench/proxy_keys.sh makes the keys (GATEWAY_BENCH_DB names the SQLite file holding them) and drives it."""

from __future__ import annotations

import os
from pathlib import Path

from common import REDIS_URL

from gateway.app import GatewayApp
from gateway.settings import Settings

app = GatewayApp(
    Settings.load(
        {
            "plans": str(Path(__file__).with_name("plans.toml")),
            "upstream": os.environ["UPSTREAM_URL"],
            "redis_url": REDIS_URL,
            "database_url": f"sqlite:///{os.environ['GATEWAY_BENCH_DB']}",
        }
    )
)
