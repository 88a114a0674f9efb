"""Scaling the routers: data-parallel attention over one expert pool.

Every router runs the dense part of the model (attention with its KV cache, norms, LM head,
sampling) for the requests it takes, and sends every MoE layer to the shared expert pool; the
placement hub publishes to all of them. When the dense side is the bottleneck (requests wait for
room in the KV caches, or a cache is nearly full) `RouterScaler` adds a router; when the routers
idle it removes one. `decide_routers` (pure, `cluster.planning.autoscaler`) decides; a
`RouterFleet` (the composition root's Ray actors) acts. `scale(n)` pins the count by hand.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from cluster.config import AutoscalingConfig
from cluster.control.controller import notify
from cluster.control.loops import Periodic
from cluster.planning.autoscaler import AutoscaleState, RouterDecision, RouterSnapshot, decide_routers
from cluster.planning.load_stats import GenerationLoad

log = logging.getLogger(__name__)


class RouterFleet(Protocol):
    """The routers of one model (implemented in `cluster.app.service`)."""

    @property
    def router_count(self) -> int: ...
    def add_router(self) -> Awaitable[str]:
        """Start one more router and attach it; resolves to its name once it serves."""
    def remove_router(self) -> Awaitable[str]:
        """Drain the newest router (NOT_SERVING, in-flight requests finish), detach it, stop it."""


@dataclass(frozen=True)
class RouterEvent:
    """A router count change: action out | in | failed; trigger: what called for it."""

    at_s: float
    action: str
    from_routers: int
    to_routers: int
    reason: str
    duration_s: float
    trigger: str = "load"


class RouterScaler:
    """Looks at the routers' generation every `check_interval_s` (when `autoscaling.enabled`),
    and adds or removes one router at a time as `decide_routers` says."""

    def __init__(self, fleet: RouterFleet, generation: Callable[[], dict[str, GenerationLoad]],
                 config: AutoscalingConfig, bounds: tuple[int, int], clock: Callable[[], float] = time.monotonic,
                 refresh: Callable[[], Awaitable[None]] | None = None):
        self._fleet = fleet
        self._generation = generation
        self._refresh = refresh
        self.config = config
        self.bounds = bounds
        self._clock = clock
        self.state = AutoscaleState()
        self.last: tuple[RouterSnapshot, RouterDecision] | None = None
        self.events: deque[RouterEvent] = deque(maxlen=100)
        self.listeners: list[Callable[[RouterEvent], None]] = []  # told of every event (metrics)
        self.manual: int | None = None
        self._lock = asyncio.Lock()
        self._loop = Periodic("router-scaler", config.check_interval_s, self._check_when_automatic)

    def __repr__(self) -> str:
        return f"RouterScaler({self.mode}, routers={self._fleet.router_count}, bounds={self.bounds})"

    @property
    def mode(self) -> str:
        if self.manual is not None:
            return f"manual ({self.manual} routers)"
        return "auto" if self.config.enabled and self.bounds[0] < self.bounds[1] else "off"

    def snapshot(self) -> RouterSnapshot:
        loads = list(self._generation().values())
        return RouterSnapshot(
            routers=self._fleet.router_count, running=sum(g.running for g in loads),
            waiting=sum(g.waiting for g in loads), kv_used_max=max((g.kv_used_fraction for g in loads), default=0.0),
            max_num_seqs=max((g.max_num_seqs for g in loads), default=1))

    async def check(self) -> RouterDecision:
        """Observe once, decide, act (one router at a time)."""
        if self._refresh is not None:
            await self._refresh()
        snapshot = self.snapshot()
        decision, self.state = decide_routers(snapshot, self.state, self._clock(), self.config, self.bounds)
        self.last = (snapshot, decision)
        if decision.action != "hold":
            await self._act(decision.target_routers, decision.reason, decision.trigger)
        return decision

    async def scale(self, routers: int) -> list[RouterEvent]:
        """Set the router count by hand, within the bounds; automatic decisions pause until `resume`."""
        low, high = self.bounds
        if not low <= routers <= high:
            raise ValueError(f"cannot scale to {routers} routers: router.min_count is {low} and "
                             f"router.max_count is {high}")
        self.manual = routers
        return await self._act(routers, f"scaled by hand to {routers} routers", "manual")

    def resume(self) -> None:
        self.manual = None
        self.state = AutoscaleState()

    async def _act(self, target: int, reason: str, trigger: str) -> list[RouterEvent]:
        events = []
        async with self._lock:
            while self._fleet.router_count != target:
                before, start = self._fleet.router_count, self._clock()
                action = "out" if target > before else "in"
                try:
                    name = await (self._fleet.add_router() if action == "out" else self._fleet.remove_router())
                    log.info("routers %s: %s (%d -> %d): %s", action, name, before, self._fleet.router_count, reason)
                except Exception as err:
                    log.exception("router scale %s failed", action)
                    events.append(self._record(RouterEvent(self._clock(), "failed", before, self._fleet.router_count,
                                                           f"{reason}: {err}", self._clock() - start, trigger)))
                    break
                events.append(self._record(RouterEvent(self._clock(), action, before, self._fleet.router_count,
                                                       reason, self._clock() - start, trigger)))
        return events

    def _record(self, event: RouterEvent) -> RouterEvent:
        self.events.append(event)
        notify(self.listeners, event)
        return event

    def start(self) -> None:
        self._loop.start()

    async def _check_when_automatic(self) -> None:
        if self.mode == "auto":
            await self.check()

    async def stop(self) -> None:
        await self._loop.stop()
