"""Token choice for one step of many sequences, each with its own parameters. Pure torch.

Greedy rows take the argmax. Sampled rows divide their logits by the temperature, keep the
`top_k` most likely tokens and the smallest set whose probability reaches `top_p`, and draw from
what is left with their own generator (a request with a seed draws from a generator of its own,
so its tokens do not depend on what else is in the batch). Log-probabilities are the model's
(log-softmax of the raw logits), as the OpenAI API reports them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from router_service.generation.params import SamplingParams


@dataclass(frozen=True)
class Sampled:
    """token_ids: `[B]` int64; logprobs: `[B]` float32, each chosen token's log-probability;
    top_ids / top_logprobs: `[B, n]` the n most likely tokens of each row and theirs (n: the
    largest `logprobs` asked for in the batch; None when no row asked)."""

    token_ids: torch.Tensor
    logprobs: torch.Tensor
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[torch.Generator | None]) -> Sampled:
    """logits: `[B, V]` float32, one row per sequence; `params[i]` and `generators[i]` belong to
    row i (a None generator draws from torch's default one)."""
    if logits.dim() != 2 or logits.shape[0] != len(params) or len(params) != len(generators):
        raise ValueError(f"need logits [B, V] with B = {len(params)} params and generators, got {tuple(logits.shape)}")
    logits = logits.float()
    token_ids = logits.argmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        rows = torch.tensor(sampled)
        probs = _filtered_probs(logits[rows], [params[i] for i in sampled])
        for j, i in enumerate(sampled):
            token_ids[i] = torch.multinomial(probs[j], 1, generator=generators[i])[0]
    log_probs = torch.log_softmax(logits, dim=-1)
    chosen = log_probs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    want = max((p.logprobs or 0) for p in params)
    if want == 0:
        return Sampled(token_ids, chosen)
    top_logprobs, top_ids = log_probs.topk(want, dim=-1)
    return Sampled(token_ids, chosen, top_ids, top_logprobs)


def _filtered_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """`[b, V]` probabilities after temperature, top-k and top-p, one row per sampled sequence."""
    temperature = torch.tensor([p.temperature for p in params], dtype=logits.dtype).unsqueeze(1)
    logits = logits / temperature
    vocab = logits.shape[1]
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params])
    if (top_k < vocab).any():
        kth = logits.sort(dim=-1, descending=True).values.gather(1, (top_k - 1).unsqueeze(1))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    top_p = torch.tensor([p.top_p for p in params], dtype=logits.dtype).unsqueeze(1)
    probs = torch.softmax(logits, dim=-1)
    if (top_p < 1).any():
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely tokens
        drop = before >= top_p  # keeps the smallest prefix reaching top_p (always the top token)
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs
