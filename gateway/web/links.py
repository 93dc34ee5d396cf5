"""Signed links to a billable's usage page: a browser cannot send an API key, so the API's own app (which knows
its logged-in customer) asks the gateway for a link that names the billable and when it stops working.

The signature is an HMAC-SHA256 over the billable and the expiry, keyed by GATEWAY_ACCOUNT_SECRET; unset, by a
key derived from GATEWAY_ADMIN_TOKEN (whoever holds that can read every status anyway), so rotating the admin
token ends every link. A link is a bearer credential until it expires: keep `expires_in` short.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from datetime import UTC, datetime
from urllib.parse import urlencode

from gateway.errors import BadRequest
from gateway.ids import billable as billable_id
from gateway.settings import Settings

ACCOUNT_PAGE = "/_gateway/account"
DEFAULT_EXPIRES_IN = 3600
MAX_EXPIRES_IN = 30 * 86400  # a month: longer lived is a password, not a link
FIELDS = ("billable", "expires", "signature")


class LinkRefused(Exception):
    """A link that does not open the page; the message is the page's sentence."""


def secret(settings: Settings) -> bytes | None:
    """The signing key: GATEWAY_ACCOUNT_SECRET, else derived from GATEWAY_ADMIN_TOKEN, else None (links off)."""
    if settings.account_secret:
        return settings.account_secret.encode()
    if settings.admin_token:
        return hmac.new(settings.admin_token.encode(), b"gateway account links", hashlib.sha256).digest()
    return None


def _signature(key: bytes, billable: str, expires: int) -> str:
    return hmac.new(key, f"{billable}\n{expires}".encode(), hashlib.sha256).hexdigest()


def query(key: bytes, billable: str, expires: int) -> str:
    """The link's query string (`billable`, `expires` in Unix seconds, `signature`)."""
    return urlencode({"billable": billable, "expires": expires, "signature": _signature(key, billable, expires)})


def make(key: bytes, base_url: str, billable: str, expires_in: int, now: float) -> dict[str, str]:
    """`{"url", "expires_at"}` of a link to `billable`'s page on the gateway at `base_url`."""
    if not 1 <= expires_in <= MAX_EXPIRES_IN:
        raise BadRequest(f"expires_in is a number of seconds from 1 to {MAX_EXPIRES_IN} (30 days), not {expires_in}.")
    expires = int(now) + expires_in
    url = f"{base_url.rstrip('/')}{ACCOUNT_PAGE}?{query(key, billable, expires)}"
    return {"url": url, "expires_at": datetime.fromtimestamp(expires, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}


def verify(key: bytes | None, params: Mapping[str, str], now: float) -> str:
    """The billable a link names, or LinkRefused saying why it does not open the page."""
    if key is None:
        raise LinkRefused("Account links are off on this gateway: set GATEWAY_ACCOUNT_SECRET (or GATEWAY_ADMIN_TOKEN).")
    missing = [name for name in FIELDS if not params.get(name)]
    if missing:
        raise LinkRefused(f"This link is incomplete (no {', '.join(missing)}): open the usage page again from your account.")
    billable, expires, presented = params["billable"], params["expires"], params["signature"]
    try:
        billable_id(billable, "billable")
        when = int(expires)
    except (BadRequest, ValueError):
        raise LinkRefused("This link is not valid: it was changed. Open the usage page again from your account.") from None
    if not hmac.compare_digest(presented.encode(), _signature(key, billable, when).encode()):
        raise LinkRefused("This link is not valid: it was changed, or made by another gateway. Open the usage page again from your account.")
    if when <= now:
        at = datetime.fromtimestamp(when, UTC).strftime("%B %d, %Y at %H:%M UTC")
        raise LinkRefused(f"This link expired on {at}. Open the usage page again from your account for a new one.")
    return billable
