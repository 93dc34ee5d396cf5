"""The event envelope of DESIGN §3, `{"id", "type", "billable", "plan", "occurred_at", "data"}`, built here only.

An event's id is fixed by what caused it, so an event seen twice (a redelivered webhook, a batch read
again after a crash) is added to the outbox once and a receiver deduplicates it by `Gateway-Event-Id`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

# Namespaces of the ids already handed out: changing one would give every pending event a new id.
_SCRIPT = uuid.UUID("6f1c2a4e-8d0b-4f57-9a61-3c2b7e5d9a10")  # emitted by the decide script: (billable, seq, at)
_CAUSED = uuid.UUID("0b7f6c1e-2d4a-4c8e-9f3b-5a1d7e2c9b40")  # with a named cause: (billable, type, reference)


def iso(seconds: float) -> str:
    """A time in events: ISO 8601 UTC to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _envelope(namespace: uuid.UUID, cause: str, type_: str, billable: str, plan: str | None, at: float, data: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "evt_" + uuid.uuid5(namespace, cause).hex,
        "type": type_,
        "billable": billable,
        "plan": plan,
        "occurred_at": iso(at),
        "data": data,
    }


def script_event(billable: str, raw: dict[str, Any]) -> dict[str, Any]:
    """An event the decide script emitted (`seq`, `at` in ms, `type`, `plan`, `data`), in the envelope."""
    data = raw.get("data") or {}
    if "grace_ends_at" in data:
        data["grace_ends_at"] = iso(data["grace_ends_at"])
    cause = f"{billable}\0{raw['seq']}\0{raw['at']}"
    return _envelope(_SCRIPT, cause, raw["type"], billable, raw.get("plan"), raw["at"] / 1000, data)


def caused_event(billable: str, type_: str, reference: str, plan: str | None, data: dict[str, Any]) -> dict[str, Any]:
    """An event of now whose cause is `reference` (a payment, a Stripe event, an admin change)."""
    return _envelope(_CAUSED, f"{billable}\0{type_}\0{reference}", type_, billable, plan, time.time(), data)
