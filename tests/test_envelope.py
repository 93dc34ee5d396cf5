from __future__ import annotations

import re

import pytest

from gateway.admin import plan_changed
from gateway.envelope import caused_event, script_event

pytestmark = pytest.mark.unit  # no service: `pytest -m unit` runs these in seconds

ENVELOPE = ["id", "type", "billable", "plan", "occurred_at", "data"]
ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def test_script_events_keep_the_ids_already_handed_out() -> None:
    """An event of the decide script has the DESIGN §3 envelope and the id it always had for its (billable, seq, at)."""
    raw = {"seq": 7, "at": 1700000000000, "type": "grace_start", "plan": "pro", "data": {"limit": "x", "grace_ends_at": 1700000600}}
    event = script_event("org_1", raw)
    assert list(event) == ENVELOPE
    assert event["id"] == "evt_dcb0408b69315fa9bccd8e2b2ae19167"
    assert event["occurred_at"] == "2023-11-14T22:13:20Z" and event["data"]["grace_ends_at"] == "2023-11-14T22:23:20Z"


def test_caused_events_keep_the_ids_already_handed_out() -> None:
    """A billing event's id is fixed by its billable, type and reference, the same as before the envelope moved."""
    event = caused_event("org_1", "auto_recharge_failed", "stripe:pi:pi_1", None, {"amount_cents": 500})
    assert list(event) == ENVELOPE and ISO.fullmatch(event["occurred_at"])
    assert event["id"] == "evt_0abfdfd8e4c155daad6e1286382f174f"
    assert caused_event("org_1", "auto_recharge_failed", "stripe:pi:pi_1", None, {})["id"] == event["id"]


def test_each_admin_plan_change_is_its_own_event() -> None:
    """Two admin assignments are two plan_changed events in the same envelope, with different ids."""
    one, two = plan_changed("org_1", "free", "pro", "assignment"), plan_changed("org_1", "free", "pro", "assignment")
    assert list(one) == ENVELOPE and one["id"] != two["id"] and one["id"].startswith("evt_")
    assert one["data"] == {"from": "free", "to": "pro", "source": "assignment"} and one["plan"] == "pro"
