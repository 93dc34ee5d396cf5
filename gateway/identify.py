"""How a request names its billable: the app's callable over the ASGI scope, a trusted header, or an API key."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from starlette.requests import Request

from gateway.decision import API_KEY_REQUIRED, APP_NAMED_NONE, header_required
from gateway.errors import KeyRevoked
from gateway.identity import key_from_headers
from gateway.ids import billable as billable_id

BillableFn = Callable[[dict[str, Any]], "str | None | Awaitable[str | None]"]


class KeyLookup(Protocol):
    async def authenticate(self, presented: str) -> str | None: ...

    async def revoked_at(self, presented: str) -> datetime | None: ...


class Identifier:
    """The one way this gateway finds a request's billable, shared by the middleware and its endpoints."""

    def __init__(self, *, keys: KeyLookup | None = None, billable: BillableFn | None = None, billable_header: str | None = None) -> None:
        if keys is None and billable is None and billable_header is None:
            raise ValueError("name how billables are found: keys=KeyStore, billable=callable or billable_header=NAME")
        self.keys = keys
        self.billable = billable
        self.header = billable_header.lower().encode() if billable_header else None
        # A 401 names what identifies a billable here; API keys are asked for with a Bearer challenge.
        self.challenge: list[tuple[bytes, bytes]]
        if billable is not None:
            self.unauthorized, self.challenge = APP_NAMED_NONE, []
        elif billable_header is not None:
            self.unauthorized, self.challenge = header_required(billable_header), []
        else:
            self.unauthorized, self.challenge = API_KEY_REQUIRED, [(b"www-authenticate", b"Bearer")]

    async def __call__(self, scope: dict[str, Any]) -> str | None:
        """The billable of a request: the app's callable, the trusted header, or the API key.

        KeyRevoked for a revoked key presented with its own secret; BadRequest when the callable or the header names one outside the billable id rule."""
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        if self.billable is not None:
            found: object = self.billable(scope)  # the app's: its answer may be of any type (compiled, it is checked)
            if found is not None and not isinstance(found, str) and inspect.isawaitable(found):
                found = await found
            return billable_id(found, "the billable callable's answer") if found else None
        if self.header is not None:
            for name, value in headers:
                if name == self.header and value:
                    return billable_id(value.decode("latin-1"), f"the {self.header.decode()} header")
            return None
        presented = key_from_headers(headers)
        if presented is None or self.keys is None:
            return None
        found = await self.keys.authenticate(presented)
        if found is None and (revoked := await self.keys.revoked_at(presented)) is not None:
            at = revoked.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
            raise KeyRevoked(f"This API key was revoked on {at}: use another key of this account, or ask for a new one.")
        return found

    async def of_request(self, request: Request) -> str | None:
        """The billable of a request to the gateway's own endpoints."""
        return await self(dict(request.scope))
