"""ModelRouter: one served model as the gRPC layer sees it — its spec, its request batcher in
front of the distributed MoE layer, and the routed load it has counted."""

from __future__ import annotations

import numpy as np
import torch

from cluster.model_spec import ModelSpec
from router_service.batcher import Batcher, RequestResult
from router_service.moe_layer import DistributedMoELayer, LayerOutput


class ModelRouter:
    """Routes one model's requests. `expert_tokens`: `[num_moe_layers, E]` tokens routed so far."""

    def __init__(self, name: str, layer: DistributedMoELayer, batcher_options: dict):
        self.name = name
        self.spec: ModelSpec = layer.spec
        self.ready = False
        self.expert_tokens = np.zeros((self.spec.num_moe_layers, self.spec.num_experts), dtype=np.int64)
        self.requests_served = 0
        self.batches_served = 0
        self._layer = layer
        self._batcher = Batcher(self._forward, **batcher_options)

    def __repr__(self) -> str:
        return f"ModelRouter(name={self.name!r}, ready={self.ready})"

    async def _forward(self, layer: int, hidden: torch.Tensor) -> LayerOutput:
        out = await self._layer.forward(layer, hidden)
        self.expert_tokens[self.spec.moe_index(layer)] += out.expert_tokens
        self.batches_served += 1
        return out

    async def infer(self, layer: int, hidden: torch.Tensor) -> RequestResult:
        """hidden: `[t, H]` float32, already checked against the spec."""
        result = await self._batcher.submit(layer, hidden)
        self.requests_served += 1
        return result

    async def close(self) -> None:
        self.ready = False
        await self._batcher.close()
