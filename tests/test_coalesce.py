"""Coalescer: one fetch in flight; keys asked for meanwhile share the next; errors reach every caller."""

from __future__ import annotations

import asyncio

import pytest

from gateway.coalesce import Coalescer

pytestmark = pytest.mark.unit  # no service: `pytest -m unit` runs these in seconds


def test_keys_asked_during_a_fetch_share_the_next_and_batches_are_capped() -> None:
    async def main() -> None:
        fetched: list[list[int]] = []
        gate = asyncio.Event()

        async def fetch(keys: list[int]) -> dict[int, str]:
            fetched.append(keys)
            await gate.wait()
            return {k: f"v{k}" for k in keys if k != 3}

        batches: Coalescer[int, str] = Coalescer(fetch, size=4)
        first = asyncio.ensure_future(batches.get(1))
        await asyncio.sleep(0)
        later = [asyncio.ensure_future(batches.get(k)) for k in (1, 2, 3, 4, 5, 6)]  # 1 is on its way already
        await asyncio.sleep(0)
        gate.set()
        assert await first == "v1"
        assert await asyncio.gather(*later) == ["v1", "v2", None, "v4", "v5", "v6"]
        assert fetched == [[1], [2, 3, 4, 5], [6]]

    asyncio.run(main())


def test_a_failed_fetch_fails_its_callers_only_and_add_can_be_drained() -> None:
    async def main() -> None:
        seen: list[list[str]] = []

        async def fetch(keys: list[str]) -> dict[str, int]:
            seen.append(keys)
            if "bad" in keys:
                raise OSError("down")
            return {k: len(k) for k in keys}

        batches: Coalescer[str, int] = Coalescer(fetch)
        with pytest.raises(OSError, match="down"):
            await asyncio.gather(batches.get("bad"), batches.get("also"))
        assert await batches.get("fine") == 4
        batches.add("x")
        batches.add("y")
        await batches.drain()
        assert seen[-1] == ["x", "y"]

    asyncio.run(main())
