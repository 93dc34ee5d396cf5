"""`Idempotency-Key` on the way in: a consuming check or a settle retried with the same key within 24 h
answers what the first answered, and takes nothing more.

The record of a key lives in Redis under the billable's hash tag (`<state key>:once:<scope>:<digest>`),
so it sits on the billable's node with its state. A consuming check's record is made by decide.lua in
the same call that takes the hold (`{"f": fingerprint, "h": hold id}`), so two identical requests racing
each other can never both take one; the answer is added to it once it is known (`"a"`). A retry that
finds a record without its answer waits for it (the first request is still being answered); a settle's
record is made once the settle script has settled its hold (which settles once whatever happens).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from gateway.errors import BadRequest, GatewayError

LIFETIME = 86_400  # seconds a key is remembered (Stripe's: 24 h)
MAX_KEY_LENGTH = 255
KEY_PATTERN = "^[\\x20-\\x7e]+$"  # printable ASCII, as key_from checks it (for the OpenAPI document)
_WAIT = 5.0  # seconds a retry waits for the first request's answer before answering 409


class KeyReused(GatewayError):
    """The key was used with a different request: answered 422, nothing done."""


class StillAnswering(GatewayError):
    """The first request with this key has not answered yet (it may have stopped): answered 409."""


class Decided(GatewayError):
    """decide.lua found the request's record: it was decided before, and nothing was taken now."""

    def __init__(self, record: str) -> None:
        super().__init__("decided before")
        self.record = record


@dataclass(frozen=True, slots=True)
class Once:
    """One request's idempotency: where its record lives and what it asked (its fingerprint)."""

    key: str  # the client's Idempotency-Key
    record: str  # the Redis key of its record
    fingerprint: str


def key_from(header: str | None, member: Any) -> str | None:
    """The request's key: the `Idempotency-Key` header or the body's `idempotency_key` (both: the same)."""
    if member is not None and not isinstance(member, str):
        raise BadRequest("idempotency_key must be a string (the same as the Idempotency-Key header, when both are sent).")
    if header is not None and member is not None and header != member:
        raise BadRequest("The Idempotency-Key header and idempotency_key differ: send one of them (or the same key in both).")
    key = header if header is not None else member
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_KEY_LENGTH or not key.isprintable() or not key.isascii():
        raise BadRequest(f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable ASCII characters (a UUID is a good one).")
    return key


def once(state_key: str, scope: str, key: str, question: dict[str, Any]) -> Once:
    """The record of `key` for a `scope` ("check", "settle") of the billable whose state hash is `state_key`."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    fingerprint = hashlib.sha256(json.dumps(question, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]
    return Once(key, f"{state_key}:once:{scope}:{digest}", fingerprint)


def answer_of(request: Once, raw: str) -> dict[str, Any] | None:
    """The first answer in a record found by a retry; None while it is not there yet. KeyReused when the
    record is another request's."""
    found = json.loads(raw)
    if found.get("f") != request.fingerprint:
        raise KeyReused(f"Idempotency-Key {request.key[:80]!r} was used with a different request in the last 24 hours: "
                        "a retry must send the same body; use a new key for a new request.")  # fmt: skip
    answer: dict[str, Any] | None = found.get("a")
    return answer


def record(request: Once, answer: dict[str, Any], hold: str = "") -> str:
    return json.dumps({"f": request.fingerprint, "h": hold, "a": answer}, separators=(",", ":"))


async def wait_for_answer(request: Once, read: Callable[[], Awaitable[str | None]]) -> dict[str, Any] | None:
    """The first answer, read with `read()` until it is there; None once `_WAIT` has passed without it."""
    deadline = time.monotonic() + _WAIT
    delay = 0.005
    while True:
        raw = await read()
        answer = None if raw is None else answer_of(request, raw)
        if answer is not None:
            return answer
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.2)


def still_answering(request: Once) -> StillAnswering:
    return StillAnswering(f"The request with Idempotency-Key {request.key[:80]!r} has not answered yet (or stopped before it "
                          "could): nothing more was taken. Retry in a few seconds with the same key.")  # fmt: skip
