"""Settings from flags and environment (DESIGN §3): stored typed first, loaded and checked after."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

from gateway.errors import ConfigError

DEFAULT_MAX_BODY = 10 * 1024 * 1024
LISTEN_BACKLOG = 2048  # connections the kernel queues before accept, as uvicorn's

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
    "trust_forwarded": "GATEWAY_TRUST_FORWARDED",
    "admin_token": "GATEWAY_ADMIN_TOKEN",
    "admin_tokens": "GATEWAY_ADMIN_TOKENS",
    "metrics_token": "GATEWAY_METRICS_TOKEN",
    "webhook_secret": "GATEWAY_WEBHOOK_SECRET",
    "account_secret": "GATEWAY_ACCOUNT_SECRET",
    "events_retention_days": "GATEWAY_EVENTS_RETENTION_DAYS",
    "stripe_api_key": "GATEWAY_STRIPE_API_KEY",
    "stripe_webhook_secret": "GATEWAY_STRIPE_WEBHOOK_SECRET",
    "stripe_api_base": "GATEWAY_STRIPE_API_BASE",
    "stripe_meter_stream_above": "GATEWAY_STRIPE_METER_STREAM_ABOVE",
    "stripe_meter_lease": "GATEWAY_STRIPE_METER_LEASE",
    "processes": "GATEWAY_PROCESSES",
    # the server's life cycle and its limits (DESIGN §3, §5)
    "workers": "GATEWAY_WORKERS",
    "header_timeout": "GATEWAY_HEADER_TIMEOUT",
    "body_timeout": "GATEWAY_BODY_TIMEOUT",
    "max_connections": "GATEWAY_MAX_CONNECTIONS",
    "shutdown_grace": "GATEWAY_SHUTDOWN_GRACE",
    "db_timeout": "GATEWAY_DB_TIMEOUT",
    "hold_ttl": "GATEWAY_HOLD_TTL",
    "otel_endpoint": "GATEWAY_OTEL_ENDPOINT",
}
# Read when GATEWAY_OTEL_ENDPOINT is not set: OpenTelemetry's own variable for the same collector.
OTEL_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"


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
    trust_forwarded: bool = False  # the client's X-Forwarded-* are a load balancer's: appended to, not dropped
    admin_token: str | None = field(default=None, repr=False)
    # Named admin tokens, name → token ("ops=...,billing=..."): the audit log shows the name.
    admin_tokens: dict[str, str] = field(default_factory=dict, repr=False)
    metrics_token: str | None = field(default=None, repr=False)  # unset: /_gateway/metrics needs the admin token
    webhook_secret: str | None = field(default=None, repr=False)
    # Signs the customer's usage-page links; unset: derived from GATEWAY_ADMIN_TOKEN (gateway/web/links.py).
    account_secret: str | None = field(default=None, repr=False)
    events_retention_days: float = 7.0  # the outbox forgets an event this long after it was emitted
    stripe_api_key: str | None = field(default=None, repr=False)
    stripe_webhook_secret: str | None = field(default=None, repr=False)
    stripe_api_base: str | None = None
    # Meter events: a claim of more due rows than this goes by the v2 meter event stream (None: always v1;
    # gateway/billing/meters.py says why), and how long a claim keeps other senders off its rows (seconds).
    stripe_meter_stream_above: int | None = None
    stripe_meter_lease: float = 30.0
    # Processes sharing the rate limits of on_redis_down = "local" (each enforces limit / processes).
    processes: int = 1
    # the server's life cycle and its limits (DESIGN §3, §5)
    workers: int = 1  # processes on one port, each a whole gateway (needs a real Redis)
    header_timeout: float = 10.0  # seconds to receive a request's headers
    body_timeout: float = 30.0  # seconds a request body may sit idle
    max_connections: int = 10_000  # open client connections per process; requests beyond get 503
    shutdown_grace: float = 10.0  # seconds from SIGTERM to exit: in-flight requests finish, the record is flushed
    db_timeout: float = 5.0  # deadline of one record operation
    hold_ttl: int = 3600  # seconds before a hold whose settle never came leaves its billable's holds, charged
    otel_endpoint: str | None = None  # an OTLP/HTTP collector: a span per request (gateway/tracing.py); None: off

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
        if "processes" not in values:  # by default, the number of workers
            workers = values.get("workers") or flags.get("workers") or environ.get("GATEWAY_WORKERS")
            if workers:
                values["processes"] = _convert("processes", workers, "GATEWAY_WORKERS")
        if "otel_endpoint" not in values and environ.get(OTEL_ENDPOINT):
            values["otel_endpoint"] = _convert("otel_endpoint", environ[OTEL_ENDPOINT], OTEL_ENDPOINT)
        if values.get("admin_token") and values["admin_token"] in values.get("admin_tokens", {}).values():
            raise ConfigError("GATEWAY_ADMIN_TOKENS: a named token is the same as GATEWAY_ADMIN_TOKEN (the audit log could not tell them apart)")
        return cls(**values)


_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


# A bearer token guards the admin API (grants, plans, keys): one short enough to guess is refused at start.
MIN_TOKEN_LENGTH = 16
_TOKENS = frozenset({"admin_token", "metrics_token", "account_secret"})


def _long_enough(token: str, source: str) -> str:
    if len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(f"{source}: a token of {len(token)} characters is too easy to guess: use at least "
                          f"{MIN_TOKEN_LENGTH} (python3 -c 'import secrets; print(secrets.token_urlsafe(24))')")
    return token


_TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_RESERVED = {"admin": "GATEWAY_ADMIN_TOKEN's", "cli": "the CLI's", "serve": "a start-up's", "sighup": "a SIGHUP's"}


def admin_tokens(raw: str | Mapping[str, str], source: str = "GATEWAY_ADMIN_TOKENS") -> dict[str, str]:
    """`ops=...,billing=...` (or a mapping) as name → token; ConfigError naming the first thing wrong."""
    pairs = list(raw.items()) if isinstance(raw, Mapping) else []
    if not isinstance(raw, Mapping):
        for item in str(raw).split(","):
            name, equals, token = item.strip().partition("=")
            if not equals:
                raise ConfigError(f'{source}: {item.strip()!r} is not NAME=TOKEN (write "ops=<token>,billing=<token>")')
            pairs.append((name.strip(), token.strip()))
    found: dict[str, str] = {}
    for name, token in pairs:
        if not _TOKEN_NAME.fullmatch(name):
            raise ConfigError(f"{source}: the name {name!r} is not a name (letters, digits, _ . -; up to 64)")
        if name in _RESERVED:
            raise ConfigError(f'{source}: "{name}" is {_RESERVED[name]} name in the audit log: choose another')
        if not token:
            raise ConfigError(f'{source}: the token of "{name}" is empty')
        _long_enough(token, f'{source}: "{name}"')
        if name in found:
            raise ConfigError(f'{source}: "{name}" is named twice')
        if token in found.values():
            raise ConfigError(f'{source}: "{name}" has the same token as another name (the audit log could not tell them apart)')
        found[name] = token
    return found


def _convert(name: str, raw: Any, source: str) -> Any:
    if name == "admin_tokens":
        return admin_tokens(raw, source)
    if name in _TOKENS:
        return _long_enough(str(raw), source)
    if name == "trust_forwarded":
        if isinstance(raw, bool):
            return raw
        if str(raw).strip().lower() not in _BOOLEANS:
            raise ConfigError(f"{source}: expected true or false, got {raw!r}")
        return _BOOLEANS[str(raw).strip().lower()]
    kind = {"port": int, "max_body": int, "reconcile_interval": float, "upstream_timeout": float,
            "events_retention_days": float, "processes": int,
            "workers": int, "max_connections": int, "hold_ttl": int, "header_timeout": float, "body_timeout": float,
            "shutdown_grace": float, "db_timeout": float, "stripe_meter_stream_above": int, "stripe_meter_lease": float}.get(name)
    if name == "upstream":
        return _upstream(str(raw), source)
    if name == "otel_endpoint":
        return _http_url(str(raw), source, "the OpenTelemetry collector is its OTLP/HTTP address, like http://127.0.0.1:4318")
    if kind is None:
        return str(raw)
    try:
        value = kind(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: expected a number, got {raw!r}")
    if value <= 0 or (name == "port" and value > 65535):
        raise ConfigError(f"{source}: {raw!r} is out of range")
    return value


def _upstream(text: str, source: str) -> str:
    return _http_url(text, source, "the upstream is an http:// or https:// URL, like http://127.0.0.1:9000")


def _http_url(text: str, source: str, what: str) -> str:
    try:
        url = urlsplit(text)
        usable = url.scheme in ("http", "https") and bool(url.hostname)
        url.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        usable = False
    if not usable:
        raise ConfigError(f"{source}: {what}, not {text!r}")
    return text
