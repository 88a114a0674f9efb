"""Expert math: the Mixtral SwiGLU FFN `w2(silu(w1 x) * w3 x)`, batched per expert.

Weights are kept fused as `w13 = cat(w1, w3)` (`[2F, H]`) so each expert does two GEMMs per
batch, not three. No per-token Python loops: the only loop is over the experts (slots) that
received tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fuse_w13(w1: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """w1, w3: `[F, H]` -> `[2F, H]` (gate rows first, then up rows)."""
    return torch.cat([w1, w3], dim=0).contiguous()


def swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """One expert on a batch of tokens.

    x: `[n, H]`; w13: `[2F, H]`; w2: `[H, F]`; returns `[n, H]` (written into `out` if given).
    """
    gate, up = (x @ w13.t()).chunk(2, dim=-1)  # [n, F] each
    hidden = F.silu(gate) * up
    return torch.matmul(hidden, w2.t(), out=out)


def run_experts(
    x: torch.Tensor,
    experts: list[tuple[torch.Tensor, torch.Tensor]],
    offsets: torch.Tensor,
    token_idx: torch.Tensor,
    weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run several experts on their tokens and sum each token's gate-weighted outputs.

    x: `[T, H]` the whole batch; experts: `(w13, w2)` per segment; offsets: `[S + 1]`,
    segment `i` is rows `offsets[i]:offsets[i+1]` of token_idx/weights; token_idx: `[N]` rows
    of x; weights: `[N]` gate weights. Returns `(rows [U], partial [U, H])`: the distinct
    tokens, ascending, and for each the sum of its weighted expert outputs here. Summing
    before returning sends each token back once, not once per expert it visited here.
    """
    rows, inverse = torch.unique(token_idx, sorted=True, return_inverse=True)
    partial = torch.zeros(rows.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
    bounds = offsets.tolist()
    for i, (w13, w2) in enumerate(experts):
        lo, hi = bounds[i], bounds[i + 1]
        if hi == lo:
            continue
        y = swiglu(x.index_select(0, token_idx[lo:hi]), w13, w2)
        y.mul_(weights[lo:hi].unsqueeze(1).to(y.dtype))
        partial.index_add_(0, inverse[lo:hi], y)
    return rows, partial
