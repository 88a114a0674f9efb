"""Scaling, decided and carried out: the `Reconciler` changes the worker count make-before-break,
and the `Autoscaler` loop feeds it the pure `cluster.planning.autoscaler.decide` from live load.

Scale-out: ask Ray's autoscaler for room for the new workers (`request_resources`, so the
cluster launches GPU nodes), start them, and once they answer tell the routers their handles,
then re-plan the placement over the larger capacity and move to it live.
Scale-in: re-plan with no slots on the leaving workers (always the last ones), move their
replicas away live, drop them from the placement once no batch uses them, kill them, and lower
the resource request so Ray can reclaim the idle nodes.

Every decision that acts, and every failure, is kept as a `ScaleEvent` with its reason.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from cluster.config import AutoscalingConfig
from cluster.control.controller import Controller, notify
from cluster.control.loops import Periodic
from cluster.control.placement_hub import PlacementHub
from cluster.control.rebalancer import MigrationReport, Rebalancer
from cluster.placement import WorkerRef
from cluster.planning.autoscaler import AutoscaleState, ScaleDecision, ScaleSnapshot, decide

log = logging.getLogger(__name__)


class WorkerFleet(Protocol):
    """The workers as the reconciler changes them (implemented by `workers.pool.ExpertPool`)."""

    handles: list[Any]
    pending: int

    @property
    def refs(self) -> list[WorkerRef]: ...

    def add_workers(self, count: int, timeout_s: float) -> Awaitable[list[dict]]: ...
    def remove_workers(self, count: int) -> None: ...
    def request_capacity(self, workers: int) -> None: ...
    def worker_nodes(self) -> list[str]: ...


@dataclass(frozen=True)
class ScaleEvent:
    """A change of the worker count (or a failed attempt); at_s on the control plane's clock."""

    at_s: float
    action: str  # "out", "in" or "failed"
    from_workers: int
    to_workers: int
    reason: str
    duration_s: float
    migration: MigrationReport | None = None
    trigger: str = "load"  # what asked for it: load, queue, bounds or manual


class Reconciler:
    def __init__(self, fleet: WorkerFleet, hub: PlacementHub, controller: Controller, rebalancer: Rebalancer,
                 slots_per_worker: int, start_timeout_s: float, clock: Callable[[], float] = time.monotonic):
        self._fleet = fleet
        self._hub = hub
        self._controller = controller
        self._rebalancer = rebalancer
        self._slots = slots_per_worker
        self._start_timeout_s = start_timeout_s
        self._clock = clock
        self._lock = asyncio.Lock()
        self.events: deque[ScaleEvent] = deque(maxlen=200)
        self.listeners: list[Callable[[ScaleEvent], None]] = []  # told of every event (metrics)

    def __repr__(self) -> str:
        return f"Reconciler(workers={len(self._fleet.handles)}, pending={self._fleet.pending})"

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    async def scale_to(self, target: int, reason: str, trigger: str = "load") -> ScaleEvent:
        """Reach `target` serving workers; one change at a time."""
        async with self._lock:
            start, before = self._clock(), len(self._fleet.handles)
            try:
                if target > before:
                    event = await self._out(target, reason, start)
                elif target < before:
                    event = await self._in(target, reason, start)
                else:
                    return ScaleEvent(start, "hold", before, before, f"{reason}: already {before} workers", 0.0)
            except Exception as err:  # the service goes on with the workers it has
                log.exception("scaling %d -> %d failed", before, target)
                self._fleet.request_capacity(len(self._fleet.handles))
                event = self._event("failed", before, start, f"{reason}: {type(err).__name__}: {err}")
            event = replace(event, trigger=trigger)
            self.events.append(event)
            notify(self.listeners, event)
            log.info("scale %s: %d -> %d workers (%s)", event.action, event.from_workers, event.to_workers, event.reason)
            return event

    async def _out(self, target: int, reason: str, start: float) -> ScaleEvent:
        before = len(self._fleet.handles)
        self._fleet.request_capacity(target)
        added = await self._fleet.add_workers(target - before, self._start_timeout_s)
        if not added:
            self._fleet.request_capacity(before)
            return self._event("failed", before, start,
                               f"{reason}: no node for a new worker within {self._start_timeout_s:g}s")
        if len(added) < target - before:
            self._fleet.request_capacity(len(self._fleet.handles))
            reason += f" ({len(added)} of {target - before} new workers found a node in time)"
        async with self._controller.exclusive():
            await self._hub.set_workers(self._fleet.refs)
            self._controller.resize([self._slots] * len(self._fleet.handles), self._fleet.worker_nodes())
            report = await self._rebalancer.apply(self._controller.plan())
        return self._event("out", before, start, reason, report)

    async def _in(self, target: int, reason: str, start: float) -> ScaleEvent:
        before = len(self._fleet.handles)
        async with self._controller.exclusive():
            emptied = self._controller.plan(capacity=[self._slots] * target + [0] * (before - target))
            report = await self._rebalancer.apply(emptied.resized(target, 0, emptied.version))
            await self._hub.set_workers(self._fleet.refs[:target])
            self._fleet.remove_workers(before - target)
            self._controller.resize([self._slots] * target, self._fleet.worker_nodes())
        self._fleet.request_capacity(target)
        return self._event("in", before, start, reason, report)

    def _event(self, action: str, before: int, start: float, reason: str,
               report: MigrationReport | None = None) -> ScaleEvent:
        now = self._clock()
        return ScaleEvent(now, action, before, len(self._fleet.handles), reason, now - start, report)


class Autoscaler:
    """Looks at the load every `check_interval_s` and hands what `decide` says to the reconciler.

    `scale(n)` pins the worker count by hand (automatic decisions pause until `resume()`).
    """

    def __init__(self, reconciler: Reconciler, fleet: WorkerFleet, observe: Callable[[], Awaitable[ScaleSnapshot]],
                 config: AutoscalingConfig, bounds: tuple[int, int], clock: Callable[[], float] = time.monotonic):
        self._reconciler = reconciler
        self._fleet = fleet
        self._observe = observe
        self.config = config
        self.bounds = bounds
        self._clock = clock
        self.state = AutoscaleState()
        self.last: tuple[ScaleSnapshot, ScaleDecision] | None = None
        self.decisions: deque[tuple[float, ScaleDecision]] = deque(maxlen=50)  # (at_s, decision) when it changed
        self.manual: int | None = None
        self._loop = Periodic("autoscaler", config.check_interval_s, self._check_when_automatic)
        self._scaling: asyncio.Task | None = None

    def __repr__(self) -> str:
        mode = f"manual {self.manual}" if self.manual is not None else ("auto" if self.config.enabled else "off")
        return f"Autoscaler({mode}, bounds={self.bounds})"

    @property
    def mode(self) -> str:
        if self.manual is not None:
            return f"manual ({self.manual} workers)"
        return "auto" if self.config.enabled else "off"

    async def check(self) -> ScaleDecision:
        """Observe once, decide, and start the change in the background when it says so."""
        snapshot = await self._observe()
        scaling = self._scaling is not None and not self._scaling.done()
        if scaling:
            snapshot = ScaleSnapshot(snapshot.tokens_per_s, snapshot.serving_workers, snapshot.pending_workers,
                                     snapshot.queue_delay_ms, snapshot.balancedness, migrating=True)
        wish_before = self.state.wish
        decision, self.state = decide(snapshot, self.state, self._clock(), self.config, self.bounds)
        previous = self.last[1] if self.last else None
        if previous is None or (decision.action, decision.target_workers, self.state.wish) != \
                (previous.action, previous.target_workers, wish_before):
            self.decisions.append((self._clock(), decision))  # a change of mind, kept with its reason
            log.info("autoscaler: %s -> %d workers (%s)", decision.action, decision.target_workers, decision.reason)
        self.last = (snapshot, decision)
        if decision.action != "hold" and not scaling:
            self._start(decision)
        return decision

    async def scale(self, workers: int) -> ScaleEvent:
        """Set the worker count by hand, within the bounds; automatic scaling pauses."""
        low, high = self.bounds
        if not low <= workers <= high:
            raise ValueError(
                f"cannot scale to {workers} workers: workers.min_workers is {low} and "
                f"workers.max_workers is {high}"
            )
        self.manual = workers
        if self._scaling is not None and not self._scaling.done():
            await asyncio.shield(self._scaling)
        return await self._reconciler.scale_to(workers, f"scaled by hand to {workers} workers", "manual")

    def resume(self) -> None:
        """Hand the worker count back to the automatic decisions."""
        self.manual = None
        self.state = AutoscaleState()

    def _start(self, decision: ScaleDecision) -> None:
        self._scaling = asyncio.get_running_loop().create_task(
            self._reconciler.scale_to(decision.target_workers, decision.reason, decision.trigger),
            name=f"scale-to-{decision.target_workers}",
        )

    def start(self) -> None:
        self._loop.start()

    async def _check_when_automatic(self) -> None:
        if self.config.enabled and self.manual is None:
            await self.check()

    async def stop(self) -> None:
        await self._loop.stop()
        if self._scaling is not None:
            self._scaling.cancel()
            await asyncio.gather(self._scaling, return_exceptions=True)
            self._scaling = None


class LoadView(Protocol):
    """The load as the autoscaler reads it (implemented by `cluster.control.control_plane.LoadFeed`)."""

    def refresh(self) -> Awaitable[None]: ...
    def tokens_per_s(self) -> float: ...
    def queue_delay_ms(self) -> float: ...


def observe_fleet(fleet: WorkerFleet, load: LoadView, balancedness: Callable[[], float],
                  migrating: Callable[[], bool]) -> Callable[[], Awaitable[ScaleSnapshot]]:
    """An `observe()` for the autoscaler out of the control plane's parts."""

    async def observe() -> ScaleSnapshot:
        await load.refresh()
        return ScaleSnapshot(
            tokens_per_s=load.tokens_per_s(), serving_workers=len(fleet.handles), pending_workers=fleet.pending,
            queue_delay_ms=load.queue_delay_ms(), balancedness=balancedness(), migrating=migrating(),
        )

    return observe
