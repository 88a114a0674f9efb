"""ModelAdmin: the admin operations on one served model, in domain terms (numpy arrays and
`Placement` values). The admin gRPC servicer translates them to protobuf; this module knows
neither gRPC nor the router's internals, only what the composition root hands it."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from cluster.control.controller import Controller, RebalanceEvent
from cluster.model_spec import ModelSpec
from cluster.placement import Placement
from cluster.planning.load_stats import LoadSnapshot
from cluster.planning.planner import count_moves, layer_balancedness


class PlacementSource(Protocol):
    """Where the placement in service is read (a `PlacementHub`, or a router's `PlacementStore`)."""

    @property
    def current(self) -> Placement: ...


@dataclass(frozen=True)
class LoadReport:
    """snapshot: the routed load window; balancedness: `[L]`; workers: per-worker counters
    (`index, node_id, replicas, calls, tokens, busy_s, outstanding_tokens, expert_tokens`)."""

    snapshot: LoadSnapshot
    balancedness: np.ndarray
    placement_version: int
    workers: list[dict]
    events: list[RebalanceEvent]


@dataclass(frozen=True)
class PlanReport:
    current: Placement
    proposed: Placement
    moves: int
    balancedness_current: np.ndarray
    balancedness_proposed: np.ndarray
    added: list[tuple[int, int]]    # (worker, logical expert)
    removed: list[tuple[int, int]]


StatusSource = Callable[[bool], Awaitable[dict]]  # (history) -> what `moe-serve status` shows


class ModelAdmin:
    def __init__(self, name: str, spec: ModelSpec, placements: PlacementSource, controller: Controller,
                 load: Callable[[float], LoadSnapshot], worker_stats: Callable[[], Awaitable[list[dict]]],
                 outstanding: Callable[[], np.ndarray], clock: Callable[[], float] = time.monotonic,
                 refresh: Callable[[], Awaitable[None]] | None = None):
        """refresh: collects the routers' latest load before a report (None: the load is live)."""
        self.name = name
        self._refresh = refresh
        self.spec = spec
        self._placements = placements
        self._controller = controller
        self._load = load
        self._worker_stats = worker_stats
        self._outstanding = outstanding
        self._clock = clock
        # what `status` answers: set by whoever builds the whole (`ControlPlane.status`, and
        # for `moe-serve serve` the launcher's, which adds the router's addresses)
        self.status_source: StatusSource | None = None

    def __repr__(self) -> str:
        return f"ModelAdmin(model={self.name!r})"

    @property
    def placement(self) -> Placement:
        return self._placements.current

    async def load_report(self) -> LoadReport:
        if self._refresh is not None:
            await self._refresh()
        snapshot = self._load(self._clock())
        workers = await self._worker_stats()
        outstanding = self._outstanding()
        for w in workers:
            w["outstanding_tokens"] = int(outstanding[w["index"]]) if w["index"] < len(outstanding) else 0
        return LoadReport(
            snapshot, layer_balancedness(self.placement, snapshot.placement_load),
            self.placement.version, workers, list(self._controller.events),
        )

    def plan(self, load: np.ndarray | None = None) -> PlanReport:
        """Dry run. load: routed `[L, E]` (or flat `[L*E]`; the shared experts' load follows
        from it); None uses the recent window."""
        if load is not None:
            load = self.spec.placed_load(self.spec.check_routed_load(load))
        else:
            load = self._load(self._clock()).placement_load.astype(np.float64)
        current = self.placement
        proposed = self._controller.plan(load)
        have, want = current.replica_set, proposed.replica_set
        return PlanReport(
            current, proposed, count_moves(current, proposed),
            layer_balancedness(current, load), layer_balancedness(proposed, load),
            sorted(want - have), sorted(have - want),
        )

    def check_placement(self, placement: Placement) -> Placement:
        """A placement from a user (file, CLI): same model and workers as the one in service."""
        current = self.placement
        if placement.num_logical_experts != current.num_logical_experts:
            raise ValueError(
                f"placement has {placement.num_logical_experts} logical experts; model '{self.name}' "
                f"has {current.num_logical_experts} ({self.spec.describe_shape()})"
            )
        if placement.num_workers != current.num_workers:
            raise ValueError(f"placement has {placement.num_workers} workers; the service has {current.num_workers}")
        capacity = self._controller.capacity
        over = [w for w, row in enumerate(placement.slots) if sum(e >= 0 for e in row) > capacity[w]]
        if over:
            raise ValueError(f"workers {over} would hold more replicas than their {capacity[over[0]]} slots")
        return Placement(current.version + 1, placement.num_logical_experts, placement.slots)

    async def apply(self, placement: Placement) -> RebalanceEvent:
        return await self._controller.apply(self.check_placement(placement))

    async def rebalance(self, force: bool = False) -> RebalanceEvent:
        return await self._controller.check(force=force, explain=True)

    async def status(self, history: bool = False) -> dict:
        """What `moe-serve status` shows (JSON-ready); with `history`, the per-expert load over time."""
        if self.status_source is None:
            raise RuntimeError(f"model '{self.name}': no status source was set (a wiring mistake)")
        return await self.status_source(history)
