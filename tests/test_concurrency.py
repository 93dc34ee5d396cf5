"""Exactness under concurrency and clock skew: several OS processes, one billable, real Redis."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from engine_support import Harness, harness
from services import shared_redis_url

from gateway.catalog import parse_catalog
from gateway.engine import Engine
from gateway.store.redis import open_redis

CATALOG = """
[catalog]
default_plan = "free"
[operations.op]
cost = 1
[plans.free]
credits = 500
limits.seats = { to = 1000 }
limits.calls = { to = 1000, per = "month", after_limit = "grace_then_block", grace_max = 100 }
[[routes]]
match = "POST /seats"
limit = "seats"
[[routes]]
match = "POST /calls"
limit = "calls"
[[routes]]
match = "POST /spend"
spend = "op"
"""


def _fire(url: str, prefix: str, path: str, count: int, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    """One gateway process: `count` decisions, 50 in flight, reporting admissions and events."""

    async def main() -> tuple[int, list[str], list[int]]:
        store = open_redis(url)
        catalog = parse_catalog(CATALOG)
        engine = Engine(store, catalog, prefix=prefix)
        route = catalog.route_for("POST", path)
        admitted = 0
        events: list[str] = []
        balances: list[int] = []
        queue = list(range(count))

        async def worker() -> None:
            nonlocal admitted
            while queue:
                queue.pop()
                d = await engine.decide("org", route)
                admitted += d.admitted
                events.extend(f"{e['type']}:{e['data'].get('threshold', '')}" for e in d.events)
                if d.credits is not None:
                    balances.append(d.credits)

        await asyncio.gather(*(worker() for _ in range(50)))
        await store.close()
        return admitted, events, balances

    out.put(asyncio.run(main()))


def _run_processes(path: str, per_process: int = 500) -> tuple[int, Counter[str], list[int]]:
    prefix = f"gwt{uuid.uuid4().hex[:10]}"
    ctx = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue = ctx.Queue()  # type: ignore[type-arg]
    procs = [ctx.Process(target=_fire, args=(shared_redis_url(), prefix, path, per_process, out)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    admitted = sum(r[0] for r in results)
    events = Counter(e for r in results for e in r[1])
    balances = [b for r in results for b in r[2]]
    with harness(shared_redis_url(), CATALOG) as go:

        async def clean(h: Harness) -> None:
            h.prefix = prefix

        go(clean)
    return admitted, events, balances


@pytest.mark.slow
def test_four_processes_never_pass_a_cap_together() -> None:
    """2,000 concurrent decisions from 4 processes against a cap of 1,000: exactly 1,000 admitted, events once."""
    admitted, events, _ = _run_processes("/seats")
    assert admitted == 1000
    assert events == Counter({"warning:0.6": 1, "warning:0.8": 1, "warning:0.95": 1, "block:": 1})


@pytest.mark.slow
def test_four_processes_share_one_grace() -> None:
    """The same against an allowance with grace_then_block and grace_max 100: 1,100 admitted, one grace, one block."""
    admitted, events, _ = _run_processes("/calls")
    assert admitted == 1100
    assert events == Counter({"warning:0.6": 1, "warning:0.8": 1, "warning:0.95": 1, "grace_start:": 1, "block:": 1})


@pytest.mark.slow
def test_four_processes_never_overspend_credits() -> None:
    """2,000 concurrent spends of 1 credit against 500: exactly 500 admitted, never below zero."""
    admitted, events, balances = _run_processes("/spend")
    assert admitted == 500
    assert min(balances) == 0 and sorted(set(balances)) == list(range(500))
    assert events["credits_depleted:"] == 1 and events["insufficient_credits:"] == 1500


def test_clock_skew_of_five_seconds_still_one_window_and_one_grace() -> None:
    """Two engines whose clocks straddle a day boundary 5 s apart still count one window and start one grace."""
    text = CATALOG.replace('limits.calls = { to = 1000, per = "month", after_limit = "grace_then_block", grace_max = 100 }',
                           'limits.calls = { to = 3, per = "day", after_limit = "grace_then_block", grace = "1h" }')
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    midnight = tomorrow.timestamp()

    async def fn(h: Harness) -> None:
        # Redis says today; one process believes it is just past midnight, the other just before.
        ahead = Engine(h.store, h.catalog, prefix=h.prefix, clock=lambda: midnight + 2.5)
        behind = Engine(h.store, h.catalog, prefix=h.prefix, clock=lambda: midnight - 2.5)
        route = h.catalog.route_for("POST", "/calls")
        decisions = []
        for i in range(6):
            decisions.append(await (ahead if i % 2 else behind).decide("org", route))
        events = [e["type"] for d in decisions for e in d.events]
        assert [d.admitted for d in decisions] == [True] * 6
        assert events.count("grace_start") == 1
        assert await h.field("org", "u:calls") == "6"
        windows = {await h.field("org", "w:calls")}
        assert len(windows) == 1

    with harness(shared_redis_url(), text) as go:
        go(fn)
    assert time.time() < midnight  # the test ran before the real boundary it simulated
