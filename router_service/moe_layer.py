"""The distributed MoE layer as the router runs it: score -> plan dispatch -> scatter ->
gather -> combine.

The router never imports `workers`: it reaches the expert shards through `ExpertBackend`, a
small protocol that the composition root fills with Ray actor handles.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from cluster.model_spec import ModelSpec
from cluster.placement import Placement
from cluster.placement_store import PlacementStore
from router_service.dispatch import ReplicaTable, WorkerRequest, combine, plan_dispatch
from router_service.gate import Routing, mixtral_route


class ExpertBackend(Protocol):
    """How the router reaches the workers."""

    def share(self, x: np.ndarray) -> Any:
        """Make the batch `[T, H]` available to every worker once (e.g. `ray.put`)."""

    def forward(self, shared_x: Any, request: WorkerRequest) -> Awaitable[np.ndarray]:
        """Run `request` on its worker; resolves to `[request.num_tokens, H]` float32."""


@dataclass(frozen=True)
class LayerOutput:
    """hidden: `[T, H]` float32; routing: the gate's choice; expert_tokens: `[E]` tokens routed
    to each expert of the layer; placement_version: the placement this batch was served with."""

    hidden: torch.Tensor
    routing: Routing
    expert_tokens: np.ndarray
    placement_version: int


@dataclass
class StageTimes:
    """CPU seconds the router thread spent in its own stages (gate + dispatch + scatter, and
    combine), summed over batches: the router's overhead beside the workers' math."""

    dispatch: float = 0.0
    combine: float = 0.0
    batches: int = 0

    def add(self, dispatch: float, combine: float) -> None:
        self.dispatch += dispatch
        self.combine += combine
        self.batches += 1

    @property
    def total(self) -> float:
        return self.dispatch + self.combine


class DistributedMoELayer:
    """One model's MoE layers served over expert shard workers.

    gate_weights: `{layer: [E, H] float32}`; placements: the store the router takes one
    placement from per batch, and holds until the batch is back (the seam where replication
    and rebalancing plug in).
    """

    def __init__(
        self,
        spec: ModelSpec,
        gate_weights: dict[int, torch.Tensor],
        placements: PlacementStore,
        backend: ExpertBackend,
    ):
        missing = [layer for layer in spec.moe_layers if layer not in gate_weights]
        if missing:
            raise ValueError(f"gate weights missing for MoE layers {missing}")
        self.spec = spec
        self._gates = {layer: w.float().contiguous() for layer, w in gate_weights.items()}
        self._placements = placements
        self.outstanding = np.zeros(placements.current.num_workers, dtype=np.int64)  # tokens in workers
        self._backend = backend
        self._table: ReplicaTable | None = None
        self.stage_s = StageTimes()

    def _replica_table(self, placement: Placement) -> ReplicaTable:
        if self._table is None or self._table.version != placement.version:
            self._table = ReplicaTable(placement)
            if len(self.outstanding) < placement.num_workers:
                self.outstanding = np.pad(self.outstanding, (0, placement.num_workers - len(self.outstanding)))
        return self._table

    async def forward(self, layer: int, hidden: torch.Tensor) -> LayerOutput:
        """hidden: `[T, H]` float32 for MoE layer `layer` (the model's numbering)."""
        moe_index = self.spec.moe_index(layer)
        with self._placements.use() as placement:
            table = self._replica_table(placement)
            t0 = time.thread_time()
            routing = mixtral_route(hidden, self._gates[layer], self.spec.top_k)  # score
            plan = plan_dispatch(routing, moe_index, self.spec.num_experts, table, self.outstanding)  # plan
            shared_x = self._backend.share(hidden.numpy())  # scatter
            calls = [self._backend.forward(shared_x, request) for request in plan.requests]
            self.outstanding[: len(plan.worker_tokens)] += plan.worker_tokens
            t1 = time.thread_time()
            try:
                outputs = await asyncio.gather(*calls)  # gather
            finally:
                self.outstanding[: len(plan.worker_tokens)] -= plan.worker_tokens
            t2 = time.thread_time()
            out = combine(hidden.shape[0], hidden.shape[1], plan, outputs)  # combine
        self.stage_s.add(dispatch=t1 - t0, combine=time.thread_time() - t2)
        return LayerOutput(out, routing, plan.expert_tokens, plan.placement_version)
