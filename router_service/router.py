"""ModelRouter: one served model as the gRPC layer sees it — its spec, its request batcher in
front of the distributed MoE layer, and the routed load it has counted."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from cluster.load_stats import SlidingWindowLoad
from cluster.model_spec import ModelSpec
from router_service.batcher import Batcher, RequestResult
from router_service.moe_layer import DistributedMoELayer, LayerOutput


class ModelRouter:
    """Routes one model's requests and counts the routed load.

    expert_tokens: `[num_moe_layers, E]` tokens routed since start; load: the same over a
    sliding window (what rebalancing decides on).
    """

    def __init__(self, name: str, layer: DistributedMoELayer, batcher_options: dict,
                 window_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.name = name
        self.spec: ModelSpec = layer.spec
        self.ready = False
        self.expert_tokens = np.zeros((self.spec.num_moe_layers, self.spec.num_experts), dtype=np.int64)
        self.load = SlidingWindowLoad(self.spec.num_moe_layers, self.spec.num_experts, window_s,
                                      bucket_s=min(1.0, window_s / 10))
        self._clock = clock
        self.batches_served = 0
        self._layer = layer
        self._batcher = Batcher(self._forward, **batcher_options)

    def __repr__(self) -> str:
        return f"ModelRouter(name={self.name!r}, ready={self.ready})"

    async def _forward(self, layer: int, hidden: torch.Tensor) -> LayerOutput:
        out = await self._layer.forward(layer, hidden)
        moe_index = self.spec.moe_index(layer)
        self.expert_tokens[moe_index] += out.expert_tokens
        self.load.add(moe_index, out.expert_tokens, self._clock())
        self.batches_served += 1
        return out

    async def infer(self, layer: int, hidden: torch.Tensor) -> RequestResult:
        """hidden: `[t, H]` float32, already checked against the spec."""
        return await self._batcher.submit(layer, hidden)

    def outstanding_tokens_now(self) -> np.ndarray:
        """`[W]` tokens each worker has in hand (queued or running) from this router."""
        return self._layer.outstanding.copy()

    async def close(self) -> None:
        self.ready = False
        await self._batcher.close()
