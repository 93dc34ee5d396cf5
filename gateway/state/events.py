"""The pending events list: what the scripts push (JSON {seq, type, at (ms), plan, data}) as DESIGN §3 events (gateway.envelope)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from gateway.envelope import iso, script_event

__all__ = ["EventBatch", "iso", "script_event"]


@dataclass(frozen=True, slots=True)
class EventBatch:
    """Events read from the list, oldest first, and the mark (seq, time in ms) of the last one."""

    events: list[dict[str, Any]]
    mark: tuple[int, int] | None

    @classmethod
    def parse(cls, billable: str, items: list[str]) -> EventBatch:
        raw = [json.loads(item) for item in items]
        mark = (int(raw[-1]["seq"]), int(raw[-1]["at"])) if raw else None
        return cls([script_event(billable, e) for e in raw], mark)

