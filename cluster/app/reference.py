"""A single-process reference MoE layer: the same gate and expert math with no distribution.

Tests prove the served path equal to this (and this equal to Hugging Face's own Mixtral block);
benchmarks measure the served path against it on the same machine and threads.
"""

from __future__ import annotations

import torch

from router_service.gate import Routing, route
from workers.expert_math import fuse_w13, swiglu
from workers.weights import WeightSource


class ReferenceMoE:
    """Every expert (and shared-expert piece) of every MoE layer in this process."""

    def __init__(self, weights: WeightSource, layers: list[int] | None = None):
        self.spec = weights.spec
        layers = list(self.spec.moe_layers if layers is None else layers)
        self._gates = {layer: weights.gate(layer).float() for layer in layers}
        pairs = [(layer, e) for layer in layers for e in range(self.spec.experts_per_layer)]
        self._experts = {
            pair: (fuse_w13(w.w1, w.w3), w.w2.contiguous()) for pair, w in weights.experts(pairs)
        }

    def forward(self, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        """hidden: `[T, H]` float32 -> (`[T, H]` float32, routing)."""
        spec = self.spec
        routing = route(hidden, self._gates[layer], spec.gate, spec.top_k)
        out = torch.zeros_like(hidden)
        flat = routing.topk_ids.reshape(-1)
        token_of = torch.arange(hidden.shape[0]).repeat_interleave(spec.top_k)
        weight_of = routing.topk_weights.reshape(-1)
        for expert in torch.unique(flat).tolist():
            rows = (flat == expert).nonzero().squeeze(1)
            tokens = token_of[rows]
            y = swiglu(hidden.index_select(0, tokens), *self._experts[(layer, expert)])
            out.index_add_(0, tokens, y * weight_of[rows].unsqueeze(1))
        if spec.num_shared_experts:
            shared = sum(swiglu(hidden, *self._experts[(layer, spec.num_experts + s)])
                         for s in range(spec.num_shared_experts))
            scale = 1.0 if routing.shared_weights is None else routing.shared_weights.unsqueeze(1)
            out += shared * scale
        return out, routing
