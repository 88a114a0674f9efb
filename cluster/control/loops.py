"""The control plane's periodic loops (rebalance checks, worker probes, load looks, autoscaling)
share one shape: every `interval_s`, one step; a step that fails is logged and the next one
retries, so one bad look never stops a loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class Periodic:
    """Runs `step()` every `interval_s` (after the first wait, or at once with `first_now`)."""

    def __init__(self, name: str, interval_s: float, step: Callable[[], Awaitable[object]], first_now: bool = False):
        self.name = name
        self.interval_s = interval_s
        self._step = step
        self._first_now = first_now
        self._task: asyncio.Task | None = None

    def __repr__(self) -> str:
        return f"Periodic({self.name!r}, every {self.interval_s:g}s, running={self.running})"

    @property
    def running(self) -> bool:
        return self._task is not None

    def start(self) -> None:
        """Start the loop on the running event loop (no-op when it runs already)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def _run(self) -> None:
        if not self._first_now:
            await asyncio.sleep(self.interval_s)
        while True:
            try:
                await self._step()
            except Exception:  # the loop outlives one failed step; the next one retries
                log.exception("%s failed", self.name)
            await asyncio.sleep(self.interval_s)

    async def stop(self) -> None:
        """Cancel the loop and wait for it (idempotent)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
