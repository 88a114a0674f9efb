"""Attention over a flat batch of many sequences (prefill chunks and decode tokens together),
registered with `transformers` as an attention implementation, so each family's own attention
module (projections, rotary embeddings, q/k norms, DeepSeek's MLA) computes the queries, keys
and values and this only does the softmax(q k^T) v part.

`StepLayout` says where each sequence's tokens are: its rows of the step's N new tokens, its
positions, the cache slots its new keys and values go to, and the slots of its whole context.
Sequences reading a prompt chunk attend with a causal mask offset by what is already cached;
decoding sequences (one new token each) are attended together in one padded call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

IMPLEMENTATION = "moe_serve_paged"
LAYOUT_KWARG = "moe_serve_layout"


@dataclass(frozen=True)
class SeqSlots:
    """One sequence of a step: it holds `blocks` (in order) and has `computed` tokens cached;
    the step adds `new_tokens` after them."""

    blocks: Sequence[int]
    computed: int
    new_tokens: int


@dataclass(eq=False)
class StepLayout:
    """Where a step's tokens are. positions / slot_mapping: `[N]` absolute position and cache slot
    of each new token; context_slots: `[K]` the slots of every sequence's whole context (cached
    plus new), concatenated in batch order; q_lens / kv_lens: `[B]` per sequence."""

    positions: torch.Tensor
    slot_mapping: torch.Tensor
    context_slots: torch.Tensor
    q_lens: list[int]
    kv_lens: list[int]
    _masks: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, seqs: Sequence[SeqSlots], block_size: int) -> StepLayout:
        positions, slots, context = [], [], []
        for s in seqs:
            total = s.computed + s.new_tokens
            if len(s.blocks) * block_size < total:
                raise ValueError(f"a sequence of {total} tokens holds only {len(s.blocks)} blocks of {block_size}")
            table = torch.as_tensor(list(s.blocks), dtype=torch.int64)
            span = torch.arange(total)
            all_slots = table[span // block_size] * block_size + span % block_size
            positions.append(span[s.computed:])
            slots.append(all_slots[s.computed:])
            context.append(all_slots)
        return cls(torch.cat(positions), torch.cat(slots), torch.cat(context),
                   [s.new_tokens for s in seqs], [s.computed + s.new_tokens for s in seqs])

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    def decode_group(self, window: int | None):
        """(query rows `[D]`, key index `[D, maxK]`, mask `[D, 1, 1, maxK]`) of the sequences that
        add one token, or None; built once per step and window."""
        key = ("decode", window)
        if key not in self._masks:
            self._masks[key] = self._decode_group(window)
        return self._masks[key]

    def _decode_group(self, window: int | None):
        q_starts, k_starts = _starts(self.q_lens), _starts(self.kv_lens)
        group = [i for i, n in enumerate(self.q_lens) if n == 1]
        if not group:
            return None
        lens = torch.tensor([self.kv_lens[i] for i in group])
        span = torch.arange(int(lens.max()))
        index = torch.tensor([k_starts[i] for i in group]).unsqueeze(1) + span  # [D, maxK]
        mask = span < lens.unsqueeze(1)
        if window is not None:
            mask &= span > (lens - 1 - window).unsqueeze(1)
        index = torch.where(mask, index, 0)
        return torch.tensor([q_starts[i] for i in group]), index, mask[:, None, None, :]


def _starts(lengths: Sequence[int]) -> list[int]:
    out, total = [], 0
    for n in lengths:
        out.append(total)
        total += n
    return out


def _chunk_mask(q_len: int, kv_len: int, window: int | None) -> torch.Tensor | None:
    """`[q_len, kv_len]` bool: query i (at position kv_len - q_len + i) sees keys up to itself."""
    if q_len == kv_len and window is None:
        return None  # plain causal
    query_pos = torch.arange(kv_len - q_len, kv_len).unsqueeze(1)
    key_pos = torch.arange(kv_len)
    mask = key_pos <= query_pos
    if window is not None:
        mask &= key_pos > query_pos - window
    return mask


def paged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    sliding_window: int | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query: `[1, Hq, N, D]` of the step's new tokens; key / value: `[1, Hk, K, D]` the contexts
    from `PagedKVCache.update`. Returns `[1, N, Hq, Dv]`."""
    layout: StepLayout = kwargs[LAYOUT_KWARG]
    q, k, v = query[0], key[0], value[0]
    gqa = q.shape[0] != k.shape[0]
    out = q.new_empty(q.shape[1], q.shape[0], v.shape[-1])
    q_start = k_start = 0
    for q_len, kv_len in zip(layout.q_lens, layout.kv_lens):
        if q_len > 1:
            mask = _chunk_mask(q_len, kv_len, sliding_window)
            o = F.scaled_dot_product_attention(
                q[:, q_start:q_start + q_len].unsqueeze(0), k[:, k_start:k_start + kv_len].unsqueeze(0),
                v[:, k_start:k_start + kv_len].unsqueeze(0), attn_mask=mask, is_causal=mask is None, scale=scaling,
                enable_gqa=gqa)
            out[q_start:q_start + q_len] = o[0].transpose(0, 1)
        q_start += q_len
        k_start += kv_len
    group = layout.decode_group(sliding_window)
    if group is not None:
        rows, index, mask = group
        o = F.scaled_dot_product_attention(
            q[:, rows].transpose(0, 1).unsqueeze(2), k[:, index].transpose(0, 1), v[:, index].transpose(0, 1),
            attn_mask=mask, scale=scaling, enable_gqa=gqa)  # [D, Hq, 1, Dv]
        out[rows] = o[:, :, 0]
    return out.unsqueeze(0), None


def register() -> None:
    """Make `IMPLEMENTATION` known to `transformers`' attention modules (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, paged_attention)
