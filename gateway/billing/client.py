"""The Stripe client of one gateway process, and the few helpers every billing module shares.

`stripe_client(settings)` is the official `StripeClient` on aiohttp (the async calls, `*_async`), pointed
at `GATEWAY_STRIPE_API_BASE` when set (tests and local doubles) instead of api.stripe.com. Every object
the API answers is turned into plain dicts at once (`plain`), so the rest of billing reads JSON.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import stripe
from stripe._base_address import BaseAddresses

from gateway.errors import ConfigError
from gateway.settings import Settings

TIMEOUT_S = 20.0
NETWORK_RETRIES = 2

ListCall = Callable[..., Awaitable[Any]]


def stripe_client(settings: Settings, *, timeout: float = TIMEOUT_S) -> stripe.StripeClient:
    """A StripeClient from GATEWAY_STRIPE_API_KEY, honouring GATEWAY_STRIPE_API_BASE."""
    if not settings.stripe_api_key:
        raise ConfigError("Stripe is not configured: set GATEWAY_STRIPE_API_KEY")
    base = (settings.stripe_api_base or "").rstrip("/") or None
    addresses: BaseAddresses = {}
    if base is not None:
        if not base.startswith(("http://", "https://")):
            raise ConfigError(f"GATEWAY_STRIPE_API_BASE: {base!r} is not an http(s) URL")
        addresses = {"api": base, "connect": base, "files": base, "meter_events": base}
    return stripe.StripeClient(
        settings.stripe_api_key,
        base_addresses=addresses,
        # The library retries connection errors, 409s and 5xx with the same Idempotency-Key.
        max_network_retries=NETWORK_RETRIES,
        http_client=stripe.AIOHTTPClient(timeout=aiohttp.ClientTimeout(total=timeout)),
    )


async def close_client(client: stripe.StripeClient) -> None:
    http = getattr(client._requestor, "_client", None)  # the library keeps its HTTP client here
    if http is not None:
        await http.close_async()


def plain(obj: Any) -> dict[str, Any]:
    """A StripeObject (or a dict) as a plain, recursive dict."""
    if isinstance(obj, stripe.StripeObject):
        return obj.to_dict()
    return dict(obj)


async def each(call: ListCall, params: dict[str, Any] | None = None, *, page_size: int = 100) -> AsyncIterator[dict[str, Any]]:
    """Every item of a Stripe list endpoint, page after page (`starting_after`)."""
    query = {**(params or {}), "limit": page_size}
    while True:
        page = plain(await call(params=query))
        items = page.get("data") or []
        for item in items:
            yield item
        if not page.get("has_more") or not items:
            return
        query = {**query, "starting_after": items[-1]["id"]}


def idempotency_key(*parts: object) -> str:
    """A deterministic Idempotency-Key from its parts; long ones are hashed (Stripe takes up to 255 chars)."""
    text = "gateway:" + ":".join(str(p) for p in parts)
    if len(text) <= 200:
        return text
    return "gateway:" + hashlib.sha256(text.encode()).hexdigest()


def is_missing(exc: stripe.StripeError) -> bool:
    """A 404 for an object Stripe does not have (deleted or never existed)."""
    return exc.http_status == 404 or exc.code == "resource_missing"
