"""The rebalance controller: watches the routed load and replicates hot experts, live.

`decide` is the pure decision (balancedness, state, now -> trigger?, state); `Controller` is the
loop that reads the load window, plans with `cluster.planner`, and hands the plan to the
`Rebalancer`. Every decision that acts or skips is kept as an event with its reason.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

import numpy as np

from cluster.config import RebalanceConfig
from cluster.load_stats import LoadSnapshot
from cluster.loops import Periodic
from cluster.placement import Placement
from cluster.placement_hub import PlacementHub
from cluster.planner import count_moves, layer_balancedness, plan_placement
from cluster.rebalancer import MigrationReport, Rebalancer

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
class RebalanceState:
    """last_s: when the controller last planned; floor: trigger only below this balancedness."""

    last_s: float = float("-inf")
    floor: float = 1.0


def decide(balancedness: float, state: RebalanceState, now_s: float, config: RebalanceConfig) -> tuple[bool, str, RebalanceState]:
    """Whether to plan a rebalance now. Pure.

    Triggers when balancedness is below `min(threshold, floor)` and `min_interval_s` has passed.
    After a rebalance the floor is (balancedness reached - hysteresis), so a placement that is
    as good as it gets is not re-planned until the load has drifted further.
    """
    if balancedness >= config.threshold:
        return False, f"balanced ({balancedness:.3f} >= threshold {config.threshold})", replace(state, floor=1.0)
    trigger_below = min(config.threshold, state.floor)
    if balancedness >= trigger_below:
        return False, f"within hysteresis ({balancedness:.3f} >= {trigger_below:.3f})", state
    if now_s - state.last_s < config.min_interval_s:
        return False, f"too soon ({now_s - state.last_s:.1f}s < min_interval_s {config.min_interval_s})", state
    return True, f"balancedness {balancedness:.3f} < {trigger_below:.3f}", replace(state, last_s=now_s)


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
        current = self._hub.current
        if len(capacity) != current.num_workers:
            current = current.resized(len(capacity), 0, current.version)
        return plan_placement(
            np.asarray(load, dtype=np.float64), capacity, current,
            min_replicas=self.config.min_replicas, policy=self.config.policy, worker_nodes=self._nodes,
        )

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
        before = float(self.balancedness(snapshot).min())
        if snapshot.total_tokens < self.config.min_window_tokens and not force:
            reason = f"too few routed tokens in the window ({snapshot.total_tokens} < min_window_tokens {self.config.min_window_tokens})"
            return RebalanceEvent(now, reason, before, before, 0, None) if explain else None
        if self._hub.down:  # no migration onto, or from, a worker that is not there
            reason = f"workers {sorted(self._hub.down)} are down; the supervisor is restoring them"
            if force:
                event = RebalanceEvent(now, f"skipped: {reason}", before, before, 0, None, "skipped")
                self._record(event)
                return event
            return RebalanceEvent(now, reason, before, before, 0, None) if explain else None
        trigger, reason, self.state = decide(before, self.state, now, self.config)
        if force and not trigger:
            reason = f"forced on demand at balancedness {before:.3f}"
        if not (trigger or force):
            return RebalanceEvent(now, reason, before, before, 0, None) if explain else None
        target = self.plan(snapshot.placement_load)
        planned = float(layer_balancedness(target, snapshot.placement_load).min())
        moves = count_moves(self._hub.current, target)
        if not force and planned - before < self.config.min_gain:
            event = RebalanceEvent(now, f"skipped: plan gains {planned - before:.3f} < min_gain {self.config.min_gain}",
                                   before, planned, moves, None, "skipped")
            self.state = replace(self.state, floor=before - self.config.hysteresis)
        else:
            changes = target.replica_set != self._hub.current.replica_set
            report = await self._rebalancer.apply(target) if changes else None
            kind = ("forced" if force else "automatic") if changes else "unchanged"
            event = RebalanceEvent(now, reason if changes else f"{reason}: the plan is the placement in service",
                                   before, planned, moves, report, kind)
            self.state = replace(self.state, floor=planned - self.config.hysteresis)
        self._record(event)
        log.info("rebalance: %s (%.3f -> %.3f, %d moves)", event.reason, before, planned, moves)
        return event

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
