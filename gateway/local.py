"""on_redis_down = "local": rate limits kept in this process while Redis is unreachable (DESIGN §6).

A bounded fallback instead of an open floodgate. Each process enforces its share of every rate limit,
the same GCRA as decide.lua with the rate and the burst divided by the processes that share them
(GATEWAY_PROCESSES), so together they admit about what Redis would. The plan and its features are the
ones this process last resolved for the billable (Engine.offline); caps, allowances and credits cannot
be decided without Redis, so routes that use them answer 503 (the middleware's choice).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

from gateway.catalog import RateLimit, Route
from gateway.decision import Decision, PolicyState, Violation

MAX_CELLS = 100_000  # (billable, policy) cells kept; beyond that the longest-idle are forgotten


class LocalLimits:
    def __init__(self, processes: int = 1, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.processes = max(1, processes)
        self.clock = clock
        # (billable, policy) → theoretical arrival time (s); a cell at or before now is a full burst.
        self._cells: dict[tuple[str, str], float] = {}

    def decide(
        self, billable: str, plan: str, route: Route | None, denied: Sequence[Violation], rates: Sequence[RateLimit]
    ) -> Decision:
        """Admit or deny on this process's share of `rates`, all or nothing; the answer is flagged degraded."""
        now = self.clock()
        violations = list(denied)
        policies: list[PolicyState] = []
        taken: list[tuple[tuple[str, str], float]] = []
        for rate in rates:
            interval = rate.per_seconds / rate.limit * self.processes
            burst = max(1, rate.burst // self.processes)
            cell = (billable, rate.name)
            tat = max(self._cells.get(cell, now), now)
            new_tat = tat + interval
            allow_at = new_tat - burst * interval
            if allow_at - now > 1e-9:  # not float dust: ten steps of 0.1 s are not quite 1 s
                violations.append(Violation(rate.name, "rate", max(1, math.ceil(allow_at - now))))
                policies.append(PolicyState(rate.name, "rate", burst, rate.window, 0, math.ceil(tat - now)))
            else:
                taken.append((cell, new_tat))
                remaining = math.floor((now - allow_at) / interval + 1e-9)
                policies.append(PolicyState(rate.name, "rate", burst, rate.window, remaining, math.ceil(new_tat - now)))
        admitted = not violations
        if admitted and taken:
            for cell, tat in taken:
                self._cells.pop(cell, None)  # re-inserted last: the dict's order is least recently used first
                self._cells[cell] = tat
            if len(self._cells) > MAX_CELLS:
                self._forget(now)
        return Decision(admitted, billable, plan, route, violations, policies, degraded=True)

    def _forget(self, now: float) -> None:
        """Drop cells back at a full burst (nothing to remember), then the least recently used, down to
        nine tenths of the cap: a flood of new billables costs one pass per tenth, not one per request."""
        self._cells = {cell: tat for cell, tat in self._cells.items() if tat > now}
        excess = len(self._cells) - MAX_CELLS * 9 // 10
        for cell in list(self._cells)[: max(0, excess)]:
            del self._cells[cell]
