"""A single-process reference MoE layer: the same gate and expert math with no distribution.

Tests prove the served path equal to this (and this equal to Hugging Face's own Mixtral block);
benchmarks measure the served path against it on the same machine and threads.
"""

from __future__ import annotations

import torch

from router_service.gate import Routing, route
from router_service.skipping import skip_experts
from workers.expert_math import expert_ffn, fuse_w13
from workers.weights import WeightSource


class ReferenceMoE:
    """Every expert (and shared-expert piece) of every MoE layer in this process."""

    def __init__(self, weights: WeightSource, layers: list[int] | None = None):
        self.spec = weights.spec
        layers = list(self.spec.moe_layers if layers is None else layers)
        self._gates = {layer: weights.gate(layer).float() for layer in layers}
        pairs = [(layer, e) for layer in layers for e in range(self.spec.experts_per_layer)]
        self._experts = {
            pair: (fuse_w13(w.w1, w.w3), w.w2.contiguous(), *_fused_biases(w.biases))
            for pair, w in weights.experts(pairs)
        }

    def _expert(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        """One expert (or shared piece, no biases) of `layer` on `x` `[n, H]`, in the model's form."""
        return expert_ffn(x, *self._experts[(layer, expert)][:2], self.spec.expert, *self._experts[(layer, expert)][2:])

    def forward(self, layer: int, hidden: torch.Tensor,
                thresholds: torch.Tensor | None = None) -> tuple[torch.Tensor, Routing]:
        """hidden: `[T, H]` float32 -> (`[T, H]` float32, routing); thresholds: `[T]` expert skip
        thresholds (`router_service.skipping`; None: no skipping), the skipped experts not run."""
        spec = self.spec
        routing = skip_experts(route(hidden, self._gates[layer], spec.gate, spec.top_k), thresholds).routing
        out = torch.zeros_like(hidden)
        flat = routing.topk_ids.reshape(-1)
        token_of = torch.arange(hidden.shape[0]).repeat_interleave(spec.top_k)
        weight_of = routing.topk_weights.reshape(-1)
        if routing.kept is not None:
            sent = routing.kept.reshape(-1)
            flat, token_of, weight_of = flat[sent], token_of[sent], weight_of[sent]
        for expert in torch.unique(flat).tolist():
            rows = (flat == expert).nonzero().squeeze(1)
            tokens = token_of[rows]
            w = weight_of[rows].unsqueeze(1)
            if spec.expert.weight_on_input:  # Llama 4: the gate weight scales the expert's input
                y = self._expert(layer, expert, hidden.index_select(0, tokens) * w)
            else:
                y = self._expert(layer, expert, hidden.index_select(0, tokens)) * w
            out.index_add_(0, tokens, y)
        if spec.num_shared_experts:
            shared = sum(self._expert(layer, spec.num_experts + s, hidden) for s in range(spec.num_shared_experts))
            scale = 1.0 if routing.shared_weights is None else routing.shared_weights.unsqueeze(1)
            out += shared * scale
        return out, routing


def _fused_biases(biases) -> tuple:
    """(b1, b3, b2) -> (b13 `[2F]`, b2 `[H]`), or () without biases."""
    if biases is None:
        return ()
    return torch.cat([biases[0], biases[1]]).float(), biases[2].float()
