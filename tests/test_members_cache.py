"""A member chain known to the process answers at once (issue 20, and the speed of every request): only a
billable's first lookup waits for the record; one older than the TTL is read again behind the request, so a
slow or hung record never holds a request up, and what it answers next is used from then on."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.members import Chain, Level, Members

pytestmark = pytest.mark.unit  # no service: `pytest -m unit` runs these in seconds


class _Record(Members):
    """Members whose record answers when the test lets it (the real query is tested in test_budgets.py)."""

    def __init__(self, clock: list[float]) -> None:
        super().__init__(db=None, ttl=1.0, clock=lambda: clock[0])  # type: ignore[arg-type]
        self.answer = asyncio.Event()
        self.asked = 0
        self.parent = "org_1"

    async def _fetch(self, billables: list[str]) -> dict[str, Chain]:
        self.asked += 1
        await self.answer.wait()
        self.answer.clear()
        found = {b: Chain(self.parent, (Level(b, "team", None),)) for b in billables}
        for b in billables:
            self._known[b] = (self.clock(), found[b])
        return found


def test_a_known_chain_answers_at_once_and_is_read_again_behind_the_request() -> None:
    async def scenario() -> None:
        clock = [0.0]
        members = _Record(clock)
        first = asyncio.create_task(members.chain("team_a"))
        await asyncio.sleep(0)
        assert not first.done()  # the first lookup waits for the record
        members.answer.set()
        assert (await first) is not None and (await first).root == "org_1"  # type: ignore[union-attr]

        clock[0] = 5.0  # past the TTL: the record is slow now
        members.parent = "org_2"
        stale: Any = await asyncio.wait_for(members.chain("team_a"), 1.0)  # answered without the record
        assert stale.root == "org_1" and members.asked == 2
        again: Any = await asyncio.wait_for(members.chain("team_a"), 1.0)  # one read again at a time
        assert again.root == "org_1" and members.asked == 2
        members.answer.set()
        refreshed = members._refreshing.get("team_a")
        if refreshed is not None:
            await asyncio.wait_for(refreshed, 5.0)
        fresh: Any = await members.chain("team_a")
        assert fresh.root == "org_2"

    asyncio.run(scenario())
