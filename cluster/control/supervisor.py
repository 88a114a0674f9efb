"""The worker supervisor: losing a worker (or a node) costs a reroute, not the service.

Every `interval_s` it probes each worker (`ready()`, which runs beside the expert math):
- a worker that does not answer, and that a router saw fail (or that missed `max_misses`
  probes in a row: Ray orders one caller's calls to an actor, so a probe can wait behind batch
  shares whose inputs are still on their way), is **down**: the routers stop sending to
  it (they already retried its in-flight shares on other replicas, and count it down
  themselves until told otherwise);
- if that leaves logical experts without a live replica, the placement is **repaired**
  (`cluster.planning.repair`): they get a replica on a live worker, loaded before it is published;
- Ray restarts a dead worker (on another node if its node is gone); when it answers with a new
  incarnation it is **reloaded** with its row of the placement in service (copied from live
  replicas where there are, else read from the checkpoint) and the routers use it again.

What routers report is about one incarnation (`WorkerRef`): a failure of an incarnation that is
no longer in service is stale and ignored, so it can never take down the one that replaced it.
A router that counted the incarnation in service down while it still answers, unrestarted, is
**re-admitted**: every router is told again which workers serve (the hub is the one source of
which workers a router may use). A worker a router saw miss a share's deadline is **hung** if
its probe says a share's math has run for `hung_after_s` or more: its process is killed and Ray
starts it again (then it is reloaded as above); if its math is done, it was only slow, and it
is re-admitted. With warm spares (`workers.spares`), a worker that is lost (or hung) does not wait
for Ray: a spare takes its place at once, is loaded with its replicas, and serves.

Repairs and reloads hold the rebalancer's lock, so no migration changes the placement under
them; automatic rebalancing waits while a worker is down.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from cluster.control.controller import notify
from cluster.control.loops import Periodic
from cluster.control.placement_hub import PlacementHub
from cluster.control.rebalancer import Rebalancer, copy_sources
from cluster.placement import WorkerRef
from cluster.planning.repair import plan_repair, uncovered_experts

log = logging.getLogger(__name__)
Reported = tuple[int, str | None]  # (worker, incarnation) a router saw fail


class SupervisedFleet(Protocol):
    """The workers as the supervisor sees them (`workers.pool.ExpertPool`)."""

    handles: list

    @property
    def refs(self) -> list[WorkerRef]: ...
    async def probe(self, timeout_s: float) -> list[dict | None]: ...
    def restarted(self, worker: int, info: dict) -> bool: ...
    def incarnation(self, worker: int) -> str: ...
    def restart(self, worker: int) -> None: ...
    spares: list
    async def swap_in_spare(self, worker: int) -> dict | None: ...
    async def load_replicas(self, worker: int, experts: list[int], copy_from: dict[int, int]) -> int: ...
    async def reload(self, worker: int, info: dict, experts: list[int], copy_from: dict[int, int]) -> int: ...


@dataclass(frozen=True)
class WorkerEvent:
    """kind: lost (stopped answering), replaced (a warm spare took its place, loaded),
    reloaded (back with its replicas), readmitted (a router counted it down, but it still
    serves), repaired (experts that lost every live replica got one elsewhere), unrepaired (no
    room for them)."""

    at_s: float
    kind: str
    workers: tuple[int, ...]
    detail: str
    duration_s: float = 0.0


class WorkerSupervisor:
    def __init__(self, fleet: SupervisedFleet, hub: PlacementHub, rebalancer: Rebalancer,
                 capacity: Callable[[], Sequence[int]], load: Callable[[], np.ndarray],
                 reported_lost: Callable[[], Awaitable[tuple[set[Reported], set[Reported]]]], interval_s: float,
                 probe_timeout_s: float,
                 max_misses: int = 10, clock: Callable[[], float] = time.monotonic, hung_after_s: float = 10.0):
        self._fleet = fleet
        self._hub = hub
        self._rebalancer = rebalancer
        self._capacity = capacity
        self._load = load  # [num_logical_experts] recent load, hottest repaired first
        self._reported_lost = reported_lost  # workers the routers saw fail since the last call
        self._max_misses = max_misses
        self._hung_after_s = hung_after_s
        self._misses: dict[int, int] = {}
        self.interval_s = interval_s
        self._probe_timeout_s = probe_timeout_s
        self._clock = clock
        self._down_since: dict[int, float] = {}
        self.events: deque[WorkerEvent] = deque(maxlen=200)
        self.listeners: list[Callable[[WorkerEvent], None]] = []  # told of every event (metrics)
        self._loop = Periodic("worker-supervisor", interval_s, self.check)

    def __repr__(self) -> str:
        return f"WorkerSupervisor(down={sorted(self._hub.down)}, events={len(self.events)})"

    async def check(self) -> None:
        """One look at every worker; mark down, repair and reload as needed."""
        count = len(self._fleet.handles)
        infos = await self._fleet.probe(self._probe_timeout_s)
        if len(self._fleet.handles) != count or count != self._hub.current.num_workers:
            return  # the workers changed meanwhile (scaling): look again next time
        lost, hung = await self._reported_lost()
        reported, hung = self._current(lost), self._current(hung)
        readmit = []
        for worker, info in enumerate(infos):
            self._misses[worker] = self._misses.get(worker, 0) + 1 if info is None else 0
            restarted = info is not None and self._fleet.restarted(worker, info)
            silent = info is None and (worker in reported or worker in hung or self._misses[worker] >= self._max_misses)
            stuck = (info is not None and not restarted and worker in hung
                     and info.get("computing_s", 0.0) >= self._hung_after_s)
            if (restarted or silent or stuck) and worker not in self._hub.down:
                await self._hub.mark_down(worker)
                self._down_since[worker] = self._clock()
                if stuck:
                    self._fleet.restart(worker)
                why = ("was restarted by Ray (no replicas)" if restarted else
                       f"hangs (a share's math has run {info['computing_s']:.1f}s); restarting it" if stuck else
                       "stopped answering")
                self._record("lost", (worker,), f"worker {worker} {why}; routing around it")
            elif info is not None and (worker in reported or worker in hung) and worker not in self._hub.down:
                readmit.append(worker)  # a router counted it down, but it answers as the same incarnation
        for worker in sorted(self._hub.down):
            if worker in self._down_since and await self._replace(worker):
                infos[worker] = None  # its probe answered for the actor it replaced
        if readmit:
            await self._hub.readmit()
            self._record("readmitted", tuple(readmit), f"workers {readmit} still serve as the same incarnation; "
                         "the routers that counted them down use them again")
        if uncovered_experts(self._hub.current, self._hub.down):
            await self._repair()
        for worker, info in enumerate(infos):
            if info is not None and worker in self._hub.down and info.get("computing_s", 0.0) < self._hung_after_s:
                if self._fleet.restarted(worker, info):
                    await self._reload(worker, info)
                else:  # it only answered late: it still holds its replicas
                    await self._hub.mark_up(worker)
                    self._down_since.pop(worker, None)
                    self._record("reloaded", (worker,), f"worker {worker} answers again; it kept its replicas")

    def _current(self, reported: set[Reported]) -> set[int]:
        """The workers whose incarnation in service a router saw fail (stale reports dropped)."""
        current = set()
        for worker, incarnation in reported:
            if worker >= len(self._fleet.handles):
                continue
            if incarnation is None or incarnation == self._fleet.incarnation(worker):
                current.add(worker)
            else:
                log.debug("ignored a late failure of worker %d's old incarnation %s", worker, incarnation[:8])
        return current

    async def _repair(self) -> None:
        async with self._rebalancer.exclusive():
            start, current, down = self._clock(), self._hub.current, self._hub.down
            plan = plan_repair(current, down, self._capacity(), self._load())
            if plan is None:
                return
            if plan.added:  # the experts added have no live replica to copy from: read from the weights
                await self._rebalancer.step(plan.added, plan.placement, plan.evicted)
                self._record("repaired", tuple(sorted(down)),
                             f"{len(plan.added)} experts without a live replica got one on a live worker "
                             f"(placement v{plan.placement.version}, {len(plan.evicted)} spare replicas evicted)",
                             self._clock() - start)
            if plan.unplaced:
                self._record("unrepaired", tuple(sorted(down)),
                             f"no live worker has room for logical experts {list(plan.unplaced)[:10]}; they "
                             f"answer UNAVAILABLE until a worker is back")

    async def _replace(self, worker: int) -> bool:
        """A warm spare in the place of down `worker`, loaded with its replicas and handed to the
        routers; False when no spare is ready."""
        if not self._fleet.spares:
            return False
        async with self._rebalancer.exclusive():
            start, current, down = self._clock(), self._hub.current, self._hub.down
            if await self._fleet.swap_in_spare(worker) is None:
                return False
            experts = [e for _, e in current.experts_of(worker)]
            loaded = await self._fleet.load_replicas(worker, experts, copy_sources(current, worker, experts, down))
            await self._hub.mark_up(worker, self._fleet.refs[worker])
        since = self._down_since.pop(worker, start)
        self._record("replaced", (worker,),
                     f"a warm spare took worker {worker}'s place with {len(experts)} replicas "
                     f"({loaded / 2**20:.1f} MiB; down {self._clock() - since:.1f}s)", self._clock() - start)
        return True

    async def _reload(self, worker: int, info: dict) -> None:
        async with self._rebalancer.exclusive():
            start, current, down = self._clock(), self._hub.current, self._hub.down
            experts = [e for _, e in current.experts_of(worker)]
            loaded = await self._fleet.reload(worker, info, experts, copy_sources(current, worker, experts, down))
            await self._hub.mark_up(worker, self._fleet.refs[worker])
        since = self._down_since.pop(worker, start)
        self._record("reloaded", (worker,),
                     f"worker {worker} serves again with {len(experts)} replicas "
                     f"({loaded / 2**20:.1f} MiB; down {self._clock() - since:.1f}s)", self._clock() - start)

    def _record(self, kind: str, workers: tuple[int, ...], detail: str, duration_s: float = 0.0) -> None:
        event = WorkerEvent(self._clock(), kind, workers, detail, duration_s)
        self.events.append(event)
        log.warning("workers: %s", detail)
        notify(self.listeners, event)

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()
