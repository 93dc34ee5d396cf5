"""A circuit breaker: a dead Redis node costs microseconds per call, not a timeout each."""

from __future__ import annotations

import time
from collections.abc import Callable


class Breaker:
    """Opens after `threshold` failures in a row; then one probe per cool-down, which doubles up to a cap."""

    def __init__(
        self,
        threshold: int = 3,
        cooldown: float = 1.0,
        max_cooldown: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock
        self.threshold = threshold
        self.base_cooldown = cooldown
        self.max_cooldown = max_cooldown
        self.cooldown = cooldown
        self.failures = 0
        self.open_until = 0.0
        self.probing = False
        self.last_error = ""

    @property
    def state(self) -> str:
        if self.failures < self.threshold:
            return "closed"
        return "half-open" if self.probing or self.clock() >= self.open_until else "open"

    def allow(self) -> bool:
        if self.failures < self.threshold:
            return True
        if self.probing or self.clock() < self.open_until:
            return False
        self.probing = True
        return True

    def refusal(self) -> str:
        """Why `allow` said no, for the caller's error."""
        wait = max(self.open_until - self.clock(), 0.0)
        return f"circuit open after {self.failures} failures ({self.last_error}), next try in {wait:.1f}s"

    def success(self) -> None:
        self.failures = 0
        self.cooldown = self.base_cooldown
        self.probing = False

    def failure(self, reason: str) -> None:
        self.last_error = reason
        self.failures += 1
        if self.probing:
            self.cooldown = min(self.cooldown * 2, self.max_cooldown)
        if self.failures >= self.threshold:
            self.open_until = self.clock() + self.cooldown
        self.probing = False

    def abandon(self) -> None:
        """A call ended without a verdict on Redis (cancelled): let the next one probe."""
        self.probing = False
