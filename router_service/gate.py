"""The gate: score tokens and pick their top-k experts. Pure torch, no Ray, no gRPC.

One function serves every family (`GateSpec` says which variant):

| family | scores | choice | weights |
|---|---|---|---|
| Mixtral | softmax | top-k | renormalised |
| Qwen2/3-MoE | softmax | top-k | renormalised with `norm_topk_prob` |
| DeepSeek-V2 | softmax | top-k, or top-k within the `topk_group` best of `n_group` groups (group max) | x `routed_scaling_factor` |
| DeepSeek-V3, GLM-4.5 MoE | sigmoid | scores + correction bias, group-limited (sum of each group's best two) | raw scores, renormalised, x `routed_scaling_factor` |
| Mistral 4 | softmax | top-k, group-limited by each group's best two where `n_group` > 1 | renormalised, x `routed_scaling_factor` |
| DBRX | softmax | top-k | divided by their p-norm, p = `moe_normalize_expert_weights` |
| gpt-oss | softmax over the top-k of logits + router bias | top-k | (the softmax of the k) |
| Llama 4 | sigmoid | top-k (top-1) | raw scores, applied to the expert's input by the workers |

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
    kept: `[tokens, k]` bool, the assignments to send to the experts, or None for all; expert
        skipping (`router_service.skipping`) clears the ones it drops (their weight is 0).
    """

    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    shared_weights: torch.Tensor | None = None
    kept: torch.Tensor | None = None


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
    if spec.router_bias and gate.bias is None:
        raise ValueError("the gate spec has a router bias (router_bias) but the layer's gate weights carry none")
    if spec.router_bias or spec.norm_p != 1.0:
        ids, weights = _biased_softmax_topk(hidden, gate, spec, top_k)
    elif spec.scoring == "softmax" and not spec.grouped and gate.correction_bias is None:
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


def _biased_softmax_topk(hidden: torch.Tensor, gate: GateWeights, spec: GateSpec, top_k: int):
    """gpt-oss (logits + router bias, top-k, softmax over the k) and DBRX (softmax, top-k,
    divided by the k weights' `norm_p`-norm) routers."""
    logits = hidden.float() @ gate.weight.t()
    if gate.bias is not None and spec.router_bias:
        logits = logits + gate.bias
    if spec.router_bias:  # softmax of the top-k logits: the renormalised top-k of the softmax
        values, ids = torch.topk(logits, top_k, dim=-1)
        return ids, torch.softmax(values, dim=-1)
    values, ids = torch.topk(torch.softmax(logits, dim=-1), top_k, dim=-1)
    if spec.norm_topk_prob:
        values = values / torch.linalg.vector_norm(values, ord=spec.norm_p, dim=-1, keepdim=True)
    return ids, values


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
