"""The gate: score tokens and pick their top-k experts. Pure torch, no Ray, no gRPC."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Routing:
    """Which experts each token goes to, and with what weight.

    topk_ids: `[tokens, k]` int64 expert index within the layer.
    topk_weights: `[tokens, k]` float32, each row sums to 1 (renormalised).
    """

    topk_ids: torch.Tensor
    topk_weights: torch.Tensor


def softmax_topk_route(hidden: torch.Tensor, gate_weight: torch.Tensor, top_k: int,
                       renormalize: bool = True) -> Routing:
    """The router of Mixtral and Qwen-MoE: softmax over all experts in float32, top-k, and
    (Mixtral; Qwen with `norm_topk_prob`) renormalised over the k.

    hidden: `[tokens, H]` float32; gate_weight: `[E, H]`.
    """
    logits = hidden @ gate_weight.t()  # [tokens, E]
    probs = torch.softmax(logits.float(), dim=-1)
    top_values, top_ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        top_values /= top_values.sum(dim=-1, keepdim=True)
    return Routing(top_ids, top_values)
