"""The rebalancer: applies a migration plan to live workers, make-before-break.

For each step: load the new replicas (copied from a live replica through the Ray object store,
or read from the checkpoint), publish the step's placement (the router switches atomically at
its next batch), wait until no batch uses the older placement, then release the replicas the
step drops. Requests keep flowing throughout; none sees a replica that is not loaded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from cluster.migration import MigrationPlan, plan_migration
from cluster.placement import Placement
from cluster.placement_store import PlacementStore


class ReplicaMover(Protocol):
    """Moves weights between workers (implemented over Ray by `workers.pool.ExpertPool`)."""

    def load_replicas(self, worker: int, experts: list[int], copy_from: dict[int, int]) -> Awaitable[int]:
        """Load `experts` into `worker`; `copy_from[e]` names a worker to copy e from, else the
        weights come from the checkpoint. Resolves to bytes loaded."""

    def release_replicas(self, worker: int, experts: list[int]) -> Awaitable[None]:
        """Drop `experts` from `worker`."""


@dataclass(frozen=True)
class MigrationReport:
    from_version: int
    to_version: int
    steps: int
    loads: int
    releases: int
    bytes_moved: int
    duration_s: float


class Rebalancer:
    def __init__(self, store: PlacementStore, mover: ReplicaMover, max_loads_per_step: int = 8,
                 copy_from_live: bool = True, drain_timeout_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self._store = store
        self._mover = mover
        self._max_loads = max_loads_per_step
        self._copy = copy_from_live
        self._drain_timeout_s = drain_timeout_s
        self._clock = clock
        self._lock = asyncio.Lock()

    def plan(self, target: Placement) -> MigrationPlan:
        return plan_migration(self._store.current, target, self._max_loads)

    async def apply(self, target: Placement) -> MigrationReport:
        """Move the service to `target`'s rows; one migration at a time."""
        async with self._lock:
            start = self._clock()
            before = self._store.current.version
            plan = self.plan(target)
            moved = 0
            for step in plan.steps:
                moved += await self._load(step.loads)
                self._store.publish(step.placement)
                await self._store.drained(step.placement.version, self._drain_timeout_s)
                await asyncio.gather(*(
                    self._mover.release_replicas(w, experts) for w, experts in _by_worker(step.releases).items()
                ))
            return MigrationReport(
                before, self._store.current.version, len(plan.steps), plan.loads, plan.releases,
                moved, self._clock() - start,
            )

    async def _load(self, loads: tuple[tuple[int, int], ...]) -> int:
        current = self._store.current
        calls = []
        for worker, experts in _by_worker(loads).items():
            sources = {}
            if self._copy:
                for e in experts:
                    live = [w for w, _ in current.replicas[e] if w != worker]
                    if live:
                        sources[e] = live[hash((worker, e)) % len(live)]
            calls.append(self._mover.load_replicas(worker, experts, sources))
        return sum(await asyncio.gather(*calls))


def _by_worker(replicas: tuple[tuple[int, int], ...]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for worker, expert in replicas:
        out.setdefault(worker, []).append(expert)
    return out
