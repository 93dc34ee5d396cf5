"""The pending events list: what the scripts push (JSON {seq, type, at (ms), plan, data}) as DESIGN §3 events."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

_EVENT_NAMESPACE = uuid.UUID("6f1c2a4e-8d0b-4f57-9a61-3c2b7e5d9a10")


@dataclass(frozen=True, slots=True)
class EventBatch:
    """Events read from the list, oldest first, and the mark (seq, time in ms) of the last one."""

    events: list[dict[str, Any]]
    mark: tuple[int, int] | None

    @classmethod
    def parse(cls, billable: str, items: list[str]) -> EventBatch:
        raw = [json.loads(item) for item in items]
        mark = (int(raw[-1]["seq"]), int(raw[-1]["at"])) if raw else None
        return cls([envelope(billable, e) for e in raw], mark)


def envelope(billable: str, raw: dict[str, Any]) -> dict[str, Any]:
    """An engine event in the shape of DESIGN §3; its id is stable across redeliveries."""
    data = raw.get("data") or {}
    if "grace_ends_at" in data:
        data["grace_ends_at"] = iso(data["grace_ends_at"])
    return {
        "id": "evt_" + uuid.uuid5(_EVENT_NAMESPACE, f"{billable}\0{raw['seq']}\0{raw['at']}").hex,
        "type": raw["type"],
        "billable": billable,
        "plan": raw.get("plan"),
        "occurred_at": iso(raw["at"] / 1000),
        "data": data,
    }


def parse_all(billable: str, items: list[str]) -> list[dict[str, Any]]:
    return [envelope(billable, json.loads(e)) for e in items]


def iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
