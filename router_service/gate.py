"""The gate: score tokens and pick their top-k experts. Pure torch, no Ray, no gRPC.

One function serves every family (`GateSpec` says which variant):

| family | scores | choice | weights |
|---|---|---|---|
| Mixtral | softmax | top-k | renormalised |
| Qwen2/3-MoE | softmax | top-k | renormalised with `norm_topk_prob` |
| DeepSeek-V2 | softmax | top-k, or top-k within the `topk_group` best of `n_group` groups (group max) | x `routed_scaling_factor` |
| DeepSeek-V3 | sigmoid | scores + correction bias, group-limited (sum of each group's best two) | raw scores, renormalised, x `routed_scaling_factor` |

Shared experts (Qwen2-MoE, DeepSeek) take every token; Qwen2-MoE scales their output per
token by `sigmoid(shared_expert_gate x)`, DeepSeek by 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cluster.model_spec import GateSpec, GateWeights


@dataclass(frozen=True)
class Routing:
    """Which experts each token goes to, and with what weight.

    topk_ids: `[tokens, k]` int64 routed expert index within the layer.
    topk_weights: `[tokens, k]` float32 gate weights of those experts.
    shared_weights: `[tokens]` float32 weight of the shared experts' output per token, or None
        for 1 (no shared gate, or no shared experts).
    """

    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    shared_weights: torch.Tensor | None = None


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


def route(hidden: torch.Tensor, gate: GateWeights, spec: GateSpec, top_k: int) -> Routing:
    """Score `hidden` `[tokens, H]` float32 with the layer's `gate` as `spec` says."""
    if spec.scoring == "softmax" and not spec.grouped and gate.correction_bias is None:
        routing = softmax_topk_route(hidden, gate.weight, top_k, spec.norm_topk_prob)
        ids, weights = routing.topk_ids, routing.topk_weights
    else:
        ids, weights = _scored_topk(hidden, gate, spec, top_k)
    if spec.routed_scaling_factor != 1.0:
        weights = weights * spec.routed_scaling_factor
    shared = None
    if gate.shared_gate is not None:
        shared = torch.sigmoid(hidden @ gate.shared_gate.t()).squeeze(1)
    return Routing(ids, weights, shared)


def _scored_topk(hidden: torch.Tensor, gate: GateWeights, spec: GateSpec, top_k: int):
    """Top-k over softmax or sigmoid scores, choosing by scores (+ correction bias), within the
    best groups where the gate is group-limited; weights are the chosen experts' raw scores."""
    logits = hidden.float() @ gate.weight.t()
    scores = torch.softmax(logits, dim=-1) if spec.scoring == "softmax" else logits.sigmoid()
    choice = scores if gate.correction_bias is None else scores + gate.correction_bias
    if spec.grouped:
        tokens, experts = choice.shape
        groups = choice.view(tokens, spec.n_group, experts // spec.n_group)
        if spec.group_score == "max":
            group_scores = groups.max(dim=-1).values
        else:
            group_scores = groups.topk(2, dim=-1).values.sum(dim=-1)
        best = torch.topk(group_scores, spec.topk_group, dim=-1, sorted=False).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        keep = keep.unsqueeze(-1).expand(-1, -1, experts // spec.n_group).reshape(tokens, experts)
        choice = choice.masked_fill(~keep, float("-inf"))
    ids = torch.topk(choice, top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if spec.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + (1e-20 if spec.scoring == "sigmoid" else 0.0))
    return ids, weights
