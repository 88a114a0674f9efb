"""PlacementStore: the placement in service, published atomically and tracked while in use.

The router takes the current placement once per batch with `use()`, and holds it until the
batch's outputs are back; the rebalancer publishes a new version and then waits until no batch
still uses an older one before it releases old replicas (make-before-break). Both sides meet
here; the store knows neither Ray nor gRPC.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from cluster.placement import Placement


class PlacementStore:
    def __init__(self, placement: Placement):
        self._current = placement
        self._in_use: Counter[int] = Counter()
        self._released: asyncio.Event | None = None

    def __repr__(self) -> str:
        return f"PlacementStore(version={self._current.version}, in_use={dict(self._in_use)})"

    @property
    def current(self) -> Placement:
        return self._current

    @contextmanager
    def use(self) -> Iterator[Placement]:
        """The current placement, counted as in use until the block ends."""
        placement = self._current
        self._in_use[placement.version] += 1
        try:
            yield placement
        finally:
            self._in_use[placement.version] -= 1
            if not self._in_use[placement.version]:
                del self._in_use[placement.version]
                if self._released is not None:
                    self._released.set()

    def publish(self, placement: Placement) -> None:
        """Make `placement` current; later batches use it. Versions only go up."""
        self._current.check_successor(placement)
        self._current = placement

    def in_use_before(self, version: int) -> int:
        """Batches still running on placements older than `version`."""
        return sum(n for v, n in self._in_use.items() if v < version)

    async def drained(self, version: int, timeout_s: float = 60.0) -> None:
        """Wait until no batch uses a placement older than `version`."""
        if self._released is None:
            self._released = asyncio.Event()
        async with asyncio.timeout(timeout_s):
            while self.in_use_before(version):
                self._released.clear()
                await self._released.wait()
