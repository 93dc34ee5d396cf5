"""The process's cache of resolved plans is bounded (issue 24 item 5): past BILLABLES_KEPT the oldest entry is
forgotten, so a gateway that sees millions of billables keeps a bounded memory; a forgotten one resolves again."""

from __future__ import annotations

import pytest

from gateway.catalog import parse_catalog
from gateway.engine import plans as plans_module
from gateway.engine.plans import Plans

pytestmark = pytest.mark.unit  # no service: `pytest -m unit` runs these in seconds

CATALOG = """
[catalog]
default_plan = "free"
[plans.free]
price = 0
[plans.pro]
price = 10
"""


def test_the_plan_cache_keeps_at_most_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plans_module, "BILLABLES_KEPT", 3)
    plans = Plans(parse_catalog(CATALOG), clock=lambda: 0.0)
    for n in range(10):
        assert plans.resolve(f"org_{n}", 1, "pro", None).name == "pro"
    assert [b for b in (f"org_{n}" for n in range(10)) if plans.cached(b) is not None] == ["org_7", "org_8", "org_9"]
    plans.resolve("org_8", 2, None, None)  # already kept: replaced, nothing forgotten
    assert plans.cached("org_7") is not None and plans.cached("org_8") == plans.resolve("org_8", 2, None, None)
