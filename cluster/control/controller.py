"""The rebalance controller: watches the routed load and replicates hot experts, live.

`Controller` is the loop: it reads the load window, takes the pure decision of
`cluster.planning.rebalance.decide` (which also plans), and hands a plan to act on to the
`Rebalancer`. Every decision that acts or skips is kept as an event with its reason.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from cluster.config import RebalanceConfig
from cluster.control.loops import Periodic
from cluster.control.placement_hub import PlacementHub
from cluster.control.rebalancer import MigrationReport, Rebalancer
from cluster.placement import Placement
from cluster.planning.load_stats import LoadSnapshot
from cluster.planning.planner import count_moves, layer_balancedness
from cluster.planning.rebalance import RebalanceDecision, RebalanceState, decide, plan_for

log = logging.getLogger(__name__)
T = TypeVar("T")


def notify(listeners: Sequence[Callable[[T], None]], event: T) -> None:
    """Tell each listener (metrics) of `event`; one that fails is logged, the event stands."""
    for listener in listeners:
        try:
            listener(event)
        except Exception:
            log.exception("event listener failed")


@dataclass(frozen=True)
class RebalanceEvent:
    """What the controller did and why; `report` is None when it skipped. kind: automatic,
    forced (rebalance on demand), applied (a given placement), skipped (too little gain) or
    unchanged (the plan is the placement in service)."""

    at_s: float
    reason: str
    balancedness_before: float
    balancedness_planned: float
    moves: int
    report: MigrationReport | None
    kind: str = "automatic"


class Controller:
    def __init__(self, hub: PlacementHub, load: Callable[[float], LoadSnapshot], rebalancer: Rebalancer,
                 capacity: Sequence[int], config: RebalanceConfig, worker_nodes: Sequence[str] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 refresh: Callable[[], Awaitable[None]] | None = None):
        self._hub = hub
        self._load = load
        self._refresh = refresh
        self._rebalancer = rebalancer
        self.capacity = list(capacity)
        self.config = config
        self._nodes = list(worker_nodes) if worker_nodes is not None else None
        self._clock = clock
        self.state = RebalanceState()
        self.events: deque[RebalanceEvent] = deque(maxlen=200)
        self.listeners: list[Callable[[RebalanceEvent], None]] = []  # told of every event (metrics)
        self._loop = Periodic("rebalance-controller", config.check_interval_s, self.check)
        self._lock = asyncio.Lock()

    def exclusive(self) -> asyncio.Lock:
        """Held while the controller plans and moves; a scaler holds it to change the workers."""
        return self._lock

    def __repr__(self) -> str:
        return f"Controller(version={self._hub.current.version}, events={len(self.events)})"

    def balancedness(self, snapshot: LoadSnapshot | None = None) -> np.ndarray:
        """`[L]` live balancedness of the placement in service under the recent load."""
        snapshot = snapshot or self._load(self._clock())
        return layer_balancedness(self._hub.current, snapshot.placement_load)

    def resize(self, capacity: Sequence[int], worker_nodes: Sequence[str] | None) -> None:
        """The workers changed (scaling): `[W]` slots and node per worker from now on."""
        self.capacity = list(capacity)
        self._nodes = list(worker_nodes) if worker_nodes is not None else None

    def plan(self, load: np.ndarray | None = None, capacity: Sequence[int] | None = None) -> Placement:
        """A dry run: the placement the planner would choose for `load` `[L, E]` (default:
        recent) over `capacity` `[W]` slots per worker (default: the workers in service; 0
        empties a worker). The workers in service keep their index."""
        if load is None:
            load = self._load(self._clock()).placement_load
        capacity = self.capacity if capacity is None else list(capacity)
        return plan_for(load, capacity, self._hub.current, self.config, self._nodes)

    async def check(self, force: bool = False, explain: bool = False) -> RebalanceEvent | None:
        """Look at the load once; plan and apply when `decide` says so (or `force`).

        Returns the event when it acted or skipped a plan; with `explain`, also (unrecorded) why
        it did not plan at all.
        """
        if self._refresh is not None:
            await self._refresh()
        async with self._lock:
            return await self._check(force, explain)

    async def _check(self, force: bool, explain: bool) -> RebalanceEvent | None:
        now = self._clock()
        snapshot = self._load(now)
        decision, self.state = decide(
            snapshot.placement_load, snapshot.total_tokens, self._hub.current, self.capacity, self.state, now,
            self.config, self._nodes, frozenset(self._hub.down), force)
        if decision.action == "wait":
            if force:  # asked for and not done: recorded
                event = self._event(now, decision, f"skipped: {decision.reason}", None, "skipped")
                self._record(event)
                return event
            return self._event(now, decision, decision.reason, None, "automatic") if explain else None
        if decision.action == "skip":
            event = self._event(now, decision, f"skipped: {decision.reason}", None, "skipped")
        elif decision.changes:
            report = await self._rebalancer.apply(decision.target)
            event = self._event(now, decision, decision.reason, report, "forced" if force else "automatic")
        else:
            event = self._event(now, decision, f"{decision.reason}: the plan is the placement in service", None,
                                "unchanged")
        self._record(event)
        log.info("rebalance: %s (%.3f -> %.3f, %d moves)", event.reason, event.balancedness_before,
                 event.balancedness_planned, event.moves)
        return event

    @staticmethod
    def _event(now: float, decision: RebalanceDecision, reason: str, report: MigrationReport | None,
               kind: str) -> RebalanceEvent:
        return RebalanceEvent(now, reason, decision.balancedness_before, decision.balancedness_planned,
                              decision.moves, report, kind)

    async def apply(self, target: Placement, reason: str = "applied on demand") -> RebalanceEvent:
        """Move to a given placement (e.g. imported from a file), make-before-break."""
        async with self._lock:
            return await self._apply(target, reason)

    async def _apply(self, target: Placement, reason: str) -> RebalanceEvent:
        if self._hub.down:
            raise ValueError(f"workers {sorted(self._hub.down)} are down; apply the placement once the "
                             f"supervisor has reloaded them (moe-serve status shows them)")
        before = float(self.balancedness().min())
        moves = count_moves(self._hub.current, target)
        if target.replica_set == self._hub.current.replica_set:
            event = RebalanceEvent(self._clock(), "already in service: nothing to move", before, before, 0, None, "unchanged")
            self._record(event)
            return event
        report = await self._rebalancer.apply(target)
        after = float(self.balancedness().min())
        event = RebalanceEvent(self._clock(), reason, before, after, moves, report, "applied")
        self._record(event)
        return event

    def _record(self, event: RebalanceEvent) -> None:
        self.events.append(event)
        notify(self.listeners, event)

    def start(self) -> None:
        if self.config.enabled:
            self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()
