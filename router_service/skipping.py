"""Expert skipping: drop a token's routed experts whose renormalised gate weight is below a
threshold, always keeping its top one. Pure torch over one batch's `Routing`, no Ray, no gRPC.

The rule, per token `t` with top-k weights `w[t, :]` (as the family's gate gives them, after
`norm_topk_prob` and `routed_scaling_factor`) and threshold `s[t]` (0: off for that token):

1. share `w[t, j] / sum_j w[t, j]`: the *renormalised* gate weight, whatever the family does to
   its weights (DeepSeek-V2 never renormalises, DeepSeek scales by `routed_scaling_factor`), so
   one threshold means the same on every family;
2. drop expert `j` when its share is below `s[t]`, except the token's largest weight (its top
   expert by weight: DeepSeek-V3 chooses with a correction bias, so the first chosen expert need
   not carry the largest weight), which is always kept;
3. scale the kept weights so that they sum to what all k summed before (`sum_j w[t, j]`).

Step 3 is the dynamic skipping of Lu et al., "Not All Experts are Equal" (ACL 2024, Mixtral:
skip the second expert when `w1 < beta * w0`, then renormalise the kept weights to 1), carried to
families whose weights do not sum to 1: keeping the pre-skip sum keeps the routed output's scale
(DeepSeek's `routed_scaling_factor`, Qwen's raw softmax mass) and equals Lu et al. where the
weights sum to 1. For top-2, a threshold `s` is their `beta = s / (1 - s)`. Shared experts are
never skipped (the Qwen2-MoE shared gate is left as it is).

A token with nothing dropped keeps its weights bit for bit, so a threshold of 0 changes nothing.
Skipped assignments stay in the `[T, k]` routing with weight 0 and `kept` false; the dispatch
plan leaves them out, so no worker receives them and they are no routed load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from router_service.errors import InvalidRequest
from router_service.gate import Routing

PARAMETER = "expert_skip_threshold"  # the request parameter and the config key


@dataclass(frozen=True)
class SkipResult:
    """routing: the gate's choice with the skipped assignments' weights 0 and `kept` false (the
    input unchanged when nothing was skipped); skipped: expert-tokens dropped."""

    routing: Routing
    skipped: int


def skip_experts(routing: Routing, thresholds: torch.Tensor | None) -> SkipResult:
    """Drop the assignments of `routing` (`[T, k]`) whose renormalised weight is below their
    token's threshold (`thresholds`: `[T]` float in [0, 1); 0 or None: no skipping), keeping each
    token's largest weight, the kept weights scaled back to the token's pre-skip sum.

    ValueError when `thresholds` is not `[T]` or holds a value outside [0, 1).
    """
    weights = routing.topk_weights
    tokens = weights.shape[0]
    if thresholds is None:
        return SkipResult(routing, 0)
    if thresholds.shape != (tokens,):
        raise ValueError(f"thresholds must be [tokens] = [{tokens}], got {list(thresholds.shape)}")
    thresholds = thresholds.to(dtype=weights.dtype)
    if not bool(((thresholds >= 0) & (thresholds < 1)).all()):  # also refuses NaN
        bad = thresholds[~((thresholds >= 0) & (thresholds < 1))][0].item()
        raise ValueError(f"expert skip thresholds must be in [0, 1), got {bad}")
    if not bool((thresholds > 0).any()):
        return SkipResult(routing, 0)
    total = weights.sum(dim=1, keepdim=True)  # [T, 1]
    share = torch.where(total > 0, weights / torch.where(total > 0, total, 1.0), 1.0)  # [T, k]
    drop = share < thresholds.unsqueeze(1)
    drop[torch.arange(tokens), weights.argmax(dim=1)] = False  # the top expert stays
    if routing.kept is not None:
        drop &= routing.kept  # what was skipped before stays skipped, and is not counted again
    skipped = int(drop.sum())
    if skipped == 0:
        return SkipResult(routing, 0)
    rows = drop.any(dim=1, keepdim=True)  # [T, 1] tokens that lose an expert
    kept_weights = weights.masked_fill(drop, 0.0)
    rescaled = kept_weights * (total / kept_weights.sum(dim=1, keepdim=True))
    kept = ~drop if routing.kept is None else routing.kept & ~drop
    return SkipResult(replace(routing, topk_weights=torch.where(rows, rescaled, weights), kept=kept), skipped)


def check_threshold(value: object, where: str) -> float:
    """`value` as a threshold (a finite number in [0, 1)); InvalidRequest naming `where` (the
    field or parameter it came from) otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRequest(f"{where} must be a number in [0, 1) (0: no expert skipping), got {value!r}")
    if not 0 <= value < 1:
        raise InvalidRequest(f"{where} must be in [0, 1) (0: no expert skipping), got {value}")
    return float(value)


def token_thresholds(per_group: list[float], group_tokens: list[int]) -> torch.Tensor | None:
    """Per-token thresholds `[T]` float32 for a batch of groups (requests, sequences) of
    `group_tokens` rows each, in order; None when no group skips (the batch runs unskipped)."""
    if not any(per_group):
        return None
    return torch.tensor(per_group, dtype=torch.float32).repeat_interleave(torch.tensor(group_tokens))
