"""One background loop of a component (the catalog's follower, the census, the reconciler, ...): started
once, cancelled and awaited on stop, so a stop never leaves a task behind or raises its cancellation."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any


class Background:
    def __init__(self, name: str) -> None:
        self.name = name
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run `work()` in the background, unless it runs already (once it ended, it runs again)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(work(), name=self.name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
