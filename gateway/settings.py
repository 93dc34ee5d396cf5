"""Settings from flags and environment (DESIGN §3): stored typed first, loaded and checked after."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from gateway.errors import ConfigError

DEFAULT_MAX_BODY = 10 * 1024 * 1024

# flag name → environment variable; flags win over the environment.
ENVIRONMENT = {
    "plans": "GATEWAY_PLANS",
    "upstream": "GATEWAY_UPSTREAM",
    "host": "GATEWAY_HOST",
    "port": "GATEWAY_PORT",
    "redis_url": "GATEWAY_REDIS_URL",
    "database_url": "GATEWAY_DATABASE_URL",
    "reconcile_interval": "GATEWAY_RECONCILE_INTERVAL",
    "billable_header": "GATEWAY_BILLABLE_HEADER",
    "upstream_timeout": "GATEWAY_UPSTREAM_TIMEOUT",
    "max_body": "GATEWAY_MAX_BODY",
    "admin_token": "GATEWAY_ADMIN_TOKEN",
    "metrics_token": "GATEWAY_METRICS_TOKEN",
    "webhook_secret": "GATEWAY_WEBHOOK_SECRET",
    "events_retention_days": "GATEWAY_EVENTS_RETENTION_DAYS",
    "stripe_api_key": "GATEWAY_STRIPE_API_KEY",
    "stripe_webhook_secret": "GATEWAY_STRIPE_WEBHOOK_SECRET",
    "stripe_api_base": "GATEWAY_STRIPE_API_BASE",
}


@dataclass
class Settings:
    plans: str = "plans.toml"
    upstream: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    redis_url: str | None = None  # None: the in-process emulation
    database_url: str = "sqlite:///gateway.db"
    reconcile_interval: float = 1.0
    billable_header: str | None = None
    upstream_timeout: float = 60.0
    max_body: int = DEFAULT_MAX_BODY
    admin_token: str | None = field(default=None, repr=False)
    metrics_token: str | None = field(default=None, repr=False)  # unset: /_gateway/metrics needs the admin token
    webhook_secret: str | None = field(default=None, repr=False)
    events_retention_days: float = 7.0  # the outbox forgets an event this long after it was emitted
    stripe_api_key: str | None = field(default=None, repr=False)
    stripe_webhook_secret: str | None = field(default=None, repr=False)
    stripe_api_base: str | None = None

    @classmethod
    def load(cls, flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
        """Flags (None means not given) over environment over defaults, each converted and checked."""
        environ = os.environ if environ is None else environ
        flags = flags or {}
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = flags.get(f.name)
            source = f"--{f.name.replace('_', '-')}"
            if raw is None and ENVIRONMENT[f.name] in environ and environ[ENVIRONMENT[f.name]] != "":
                raw, source = environ[ENVIRONMENT[f.name]], ENVIRONMENT[f.name]
            if raw is None:
                continue
            values[f.name] = _convert(f.name, raw, source)
        return cls(**values)


def _convert(name: str, raw: Any, source: str) -> Any:
    kind = {"port": int, "max_body": int, "reconcile_interval": float, "upstream_timeout": float, "events_retention_days": float}.get(name)
    if kind is None:
        return str(raw)
    try:
        value = kind(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: expected a number, got {raw!r}")
    if value <= 0 or (name == "port" and value > 65535):
        raise ConfigError(f"{source}: {raw!r} is out of range")
    return value
