"""Every script checks its arguments before its first write (lua/lib/args.lua): a bad one is an error reply and
Redis holds exactly what it held before, never half a settle or half a decision. On a real redis-server and the
embedded emulation; each call is a real one the engine made, with one argument spoiled."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest
from engine_support import Harness, harness
from services import shared_redis_url

from gateway.errors import RedisReplyError

Go = Callable[[Callable[[Harness], Awaitable[Any]]], Any]


@pytest.fixture(params=["redis", "embedded"])
def go(request: pytest.FixtureRequest) -> Any:
    with harness(shared_redis_url() if request.param == "redis" else None) as runner:
        yield runner


async def keyspace(h: Harness) -> dict[str, Any]:
    """Every key of the test's prefix and what it holds."""
    out: dict[str, Any] = {}
    async for key in h.store.scan(f"{h.prefix}:*"):
        kind = await h.raw.type(key)
        out[key] = await (h.raw.hgetall(key) if kind == "hash" else h.raw.lrange(key, 0, -1) if kind == "list"
                          else h.raw.zrange(key, 0, -1, withscores=True) if kind == "zset" else h.raw.get(key))  # fmt: skip
    return out


def spy(h: Harness) -> list[tuple[str, list[str], list[Any]]]:
    """The scripts the engine runs from now on, with their keys and arguments (and still runs them)."""
    calls: list[tuple[str, list[str], list[Any]]] = []
    run = h.store.run

    async def recording(name: str, keys: list[str], args: Sequence[Any]) -> Any:
        calls.append((name, keys, list(args)))
        return await run(name, keys, args)

    h.store.run = recording  # type: ignore[method-assign]
    return calls


async def refused_unchanged(h: Harness, name: str, keys: list[str], args: list[Any]) -> None:
    before = await keyspace(h)
    with pytest.raises(RedisReplyError, match="argument"):
        await h.store.run(name, keys, args)
    assert await keyspace(h) == before


SETTLE_SPOILED = [(3, "1e30"), (5, "1e30"), (5, "1000000000000000000000000000000"), (5, "-1"), (3, "nan"), (8, "x")]


@pytest.mark.parametrize(("index", "value"), SETTLE_SPOILED, ids=[f"{i}={v[:6]}" for i, v in SETTLE_SPOILED])
def test_a_settle_with_a_bad_argument_writes_nothing(go: Go, index: int, value: str) -> None:
    """A metered hold's settle given units or credits no counter can hold (1e30, 10**30, -1, nan) or a hold that
    is not numbers: refused before the hold leaves its hash, so the good settle after it still settles."""

    async def fn(h: Harness) -> None:
        await h.engine.apply_grant("org", 1, 500)
        decision = await h.decide("org", "POST", "/chat")
        calls = spy(h)
        await h.engine.settle(decision, give_back_limits=False, credits_owed=7, units=7)
        ((name, keys, args),) = calls
        # The same settle again, on a fresh hold: what a real one would send, one argument spoiled.
        fresh = await h.decide("org", "POST", "/chat")
        assert fresh.hold is not None
        args[6] = fresh.hold.id
        spoiled = [*args]
        spoiled[index - 1] = value
        await refused_unchanged(h, name, keys, spoiled)
        assert (await h.engine.settle(fresh, give_back_limits=False, credits_owed=7, units=7)) == 500 + 10 - 14

    go(fn)


async def close(h: Harness, hold_id: str) -> Any:
    return await h.engine.close("org", hold_id, "POST /chat|chat", give_back_limits=False, credits_owed=7, units=7, release="projects")


CLOSE_SPOILED = [(3, "1e30"), (5, "1e30"), (9, "x"), (11, "1e30"), (12, "nan"), (13, "{")]


@pytest.mark.parametrize(("index", "value"), CLOSE_SPOILED, ids=[f"{i}={v[:6]}" for i, v in CLOSE_SPOILED])
def test_a_close_with_a_bad_argument_writes_nothing(go: Go, index: int, value: str) -> None:
    """Closing a check's stored hold (settle and release in one call) given a number no counter can hold, a plan
    version or cap that is not one, or a spec that is not JSON: refused before the hold leaves its hash."""

    async def fn(h: Harness) -> None:
        await h.engine.apply_grant("org", 1, 500)
        decision = await h.decide("org", "POST", "/chat", hold=True)
        assert decision.hold is not None
        calls = spy(h)
        assert (await close(h, decision.hold.id)).status == "ok"
        ((name, keys, args),) = calls
        fresh = await h.decide("org", "POST", "/chat", hold=True)
        assert fresh.hold is not None
        args[6] = fresh.hold.id
        spoiled = [*args]
        spoiled[index - 1] = value
        await refused_unchanged(h, name, keys, spoiled)
        assert (await close(h, fresh.hold.id)).status == "ok"

    go(fn)


def test_a_decision_with_a_bad_hold_lifetime_sends_no_events(go: Go) -> None:
    """A decision that would emit a warning, given a hold lifetime that is not a number, pushes no event and counts
    nothing (the events were pushed before the lifetime was read)."""

    async def fn(h: Harness) -> None:
        assert (await h.decide("org", "POST", "/exports")).admitted
        calls = spy(h)
        assert (await h.decide("org", "POST", "/exports", dry=True)).admitted
        ((name, keys, args),) = calls
        spoiled = [*args]
        spoiled[4], spoiled[7], spoiled[10] = "h1", "soon", "0"  # a held, committing decision: the 2nd export warns
        await refused_unchanged(h, name, keys, spoiled)
        assert await h.engine.pending_events("org") == []

    go(fn)


DECIDE_SPOILED = [(1, "{"), (1, "[false,10]"), (3, "{}"), (3, "m:1,2;w:1,2,3,4"), (3, "w:1,2,3,4;d:1,2,3,4")]


@pytest.mark.parametrize(("index", "value"), DECIDE_SPOILED, ids=[f"{i}={v[:8]}" for i, v in DECIDE_SPOILED])
def test_a_decision_with_a_bad_spec_or_calendar_writes_nothing(go: Go, index: int, value: str) -> None:
    """A committing decision (a monthly limit that warns and starts its grace) given a spec that is not JSON or
    not one (no credits, rate limits or limits), or calendar bounds without the month's four: refused before
    its first write, and the good decision after it still counts."""

    async def fn(h: Harness) -> None:
        for _ in range(3):
            assert (await h.decide("org", "POST", "/exports")).admitted
        calls = spy(h)
        assert (await h.decide("org", "POST", "/exports", dry=True)).admitted
        ((name, keys, args),) = calls
        spoiled = [*args]
        spoiled[10] = "0"  # committing
        spoiled[index - 1] = value
        await refused_unchanged(h, name, keys, spoiled)
        assert (await h.decide("org", "POST", "/exports")).admitted  # the fourth: in grace
        assert [e["type"] for e in await h.engine.pending_events("org")][-1] == "grace_start"

    go(fn)


def test_grants_restores_updates_and_revocations_with_a_bad_argument_write_nothing(go: Go) -> None:
    """A grant of 1e30, a restore whose last grant is not a number, a cap's count of 1e30 and a revocation
    keeping "all" are each refused before their first write."""

    async def fn(h: Harness) -> None:
        await h.engine.apply_grant("org", 1, 500)
        state = h.engine.keys("org").only_state()
        await refused_unchanged(h, "grant", state, [2, "1e30", "0"])
        await refused_unchanged(h, "restore", state, [2, "c:p", "1", 2, 100, 3, "x"])
        await h.raw.hdel(state[0], "hyd")  # a restore would write the fields of a state Redis lost
        await refused_unchanged(h, "restore", state, [2, "c:p", "1", 2, 100, 3, "x"])
        await refused_unchanged(h, "update", state, ["count", "projects", "1e30"])
        await refused_unchanged(h, "update", state, ["period", "1", "later"])
        feed = [f"{h.prefix}:revoked:n", f"{h.prefix}:revoked"]
        await refused_unchanged(h, "revoke", feed, ["key1", "all"])

    go(fn)
