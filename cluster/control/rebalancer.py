"""The rebalancer: applies a migration plan to live workers, make-before-break.

For each step: load the new replicas (copied from a live replica through the Ray object store,
or read from the checkpoint), publish the step's placement (the routers switch atomically at
their next batch), wait until no batch uses the older placement, then release the replicas the
step drops. Requests keep flowing throughout; none sees a replica that is not loaded.

A target may have more workers than the placement in service (scale-out: the new workers join
with empty slots first) or fewer (scale-in: the leaving workers, always the last ones, are
emptied by the steps, then dropped from the placement once no batch uses them).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from cluster.control.placement_hub import PlacementHub
from cluster.placement import Placement
from cluster.planning.migration import MigrationPlan, plan_migration


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
    def __init__(self, hub: PlacementHub, mover: ReplicaMover, max_loads_per_step: int = 8,
                 copy_from_live: bool = True, drain_timeout_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self._hub = hub
        self._mover = mover
        self._max_loads = max_loads_per_step
        self._copy = copy_from_live
        self._drain_timeout_s = drain_timeout_s
        self._clock = clock
        self._lock = asyncio.Lock()

    def plan(self, target: Placement) -> MigrationPlan:
        return plan_migration(self._hub.current, target, self._max_loads)

    def exclusive(self) -> asyncio.Lock:
        """Held while a migration runs; the supervisor holds it to repair or reload workers."""
        return self._lock

    @property
    def busy(self) -> bool:
        """A migration is running."""
        return self._lock.locked()

    async def apply(self, target: Placement) -> MigrationReport:
        """Move the service to `target`'s rows; one migration at a time."""
        async with self._lock:
            start = self._clock()
            before = self._hub.current.version
            joining = target.slots[self._hub.current.num_workers:]
            if joining:  # new workers join empty; nothing runs on them yet, so nothing to drain
                slots = max(len(row) for row in joining)
                await self._hub.publish(self._hub.current.resized(target.num_workers, slots, before + 1))
            plan = self.plan(_padded(target, self._hub.current))
            moved = 0
            for step in plan.steps:
                moved += await self.step(step.loads, step.placement, step.releases)
            if target.num_workers < self._hub.current.num_workers:
                current = self._hub.current
                await self._publish(current.resized(target.num_workers, 0, current.version + 1))
            return MigrationReport(
                before, self._hub.current.version, len(plan.steps), plan.loads, plan.releases,
                moved, self._clock() - start,
            )

    async def step(self, loads: tuple[tuple[int, int], ...], placement: Placement,
                   releases: tuple[tuple[int, int], ...]) -> int:
        """One make-before-break step: load the `(worker, logical expert)` replicas `loads`,
        publish `placement` and wait until no batch runs on an older one, then release
        `releases`. Returns the bytes loaded. The caller holds `exclusive()`."""
        moved = await self._load(loads)
        await self._publish(placement)
        await asyncio.gather(*(
            self._mover.release_replicas(w, experts) for w, experts in by_worker(releases).items()
        ))
        return moved

    async def _publish(self, placement: Placement) -> None:
        """Publish, then wait until no batch runs on an older placement."""
        await self._hub.publish(placement)
        await self._hub.drained(placement.version, self._drain_timeout_s)

    async def _load(self, loads: tuple[tuple[int, int], ...]) -> int:
        current = self._hub.current
        calls = []
        for worker, experts in by_worker(loads).items():
            sources = copy_sources(current, worker, experts, self._hub.down) if self._copy else {}
            calls.append(self._mover.load_replicas(worker, experts, sources))
        return sum(await asyncio.gather(*calls))


def copy_sources(placement: Placement, worker: int, experts: list[int], down: frozenset[int]) -> dict[int, int]:
    """For each of `experts` to load into `worker`: a live worker to copy it from (spread over
    the replicas), where `placement` has one that is not down."""
    sources = {}
    for e in experts:
        live = [w for w, _ in placement.replicas[e] if w != worker and w not in down]
        if live:
            sources[e] = live[hash((worker, e)) % len(live)]
    return sources


def by_worker(replicas) -> dict[int, list[int]]:
    """`[(worker, logical expert)]` -> `{worker: [logical experts]}`."""
    out: dict[int, list[int]] = {}
    for worker, expert in replicas:
        out.setdefault(worker, []).append(expert)
    return out


def _padded(target: Placement, current: Placement) -> Placement:
    """`target` with empty rows for the workers of `current` it no longer has (they leave)."""
    if target.num_workers >= current.num_workers:
        return target
    rows = target.slots + tuple(() for _ in range(current.num_workers - target.num_workers))
    return Placement(target.version, target.num_logical_experts, rows)
