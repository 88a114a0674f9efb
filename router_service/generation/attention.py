"""Attention over a flat batch of many sequences (prefill chunks and decode tokens together),
registered with `transformers` as an attention implementation, so each family's own attention
module (projections, rotary embeddings, q/k norms, DeepSeek's MLA) computes the queries, keys
and values and this only does the softmax(q k^T) v part.

`StepLayout` says where each sequence's tokens are: its rows of the step's N new tokens, its
positions, the cache slots its new keys and values go to, and the slots of its whole context.
Sequences reading a prompt chunk attend with a causal mask offset by what is already cached;
decoding sequences (one new token each) are attended together in one padded call. What the
family's attention module passes is honoured: a sliding window (gpt-oss, Mistral), attention
sinks `s_aux` (gpt-oss: one logit per head that takes part in the softmax and is dropped), and
Llama 4's chunked attention (a query sees the keys of its own `attention_chunk_size` chunk, on
the layers `layer_types` marks "chunked_attention").
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

    def decode_group(self, window: int | None, chunk: int | None = None):
        """(query rows `[D]`, key index `[D, maxK]`, mask `[D, 1, 1, maxK]`) of the sequences that
        add one token, or None; built once per step, window and chunk size."""
        key = ("decode", window, chunk)
        if key not in self._masks:
            self._masks[key] = self._decode_group(window, chunk)
        return self._masks[key]

    def _decode_group(self, window: int | None, chunk: int | None = None):
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
        if chunk is not None:
            mask &= span >= ((lens - 1) // chunk * chunk).unsqueeze(1)
        index = torch.where(mask, index, 0)
        return torch.tensor([q_starts[i] for i in group]), index, mask[:, None, None, :]


def _starts(lengths: Sequence[int]) -> list[int]:
    out, total = [], 0
    for n in lengths:
        out.append(total)
        total += n
    return out


def _chunk_mask(q_len: int, kv_len: int, window: int | None, chunk: int | None = None) -> torch.Tensor | None:
    """`[q_len, kv_len]` bool: query i (at position kv_len - q_len + i) sees keys up to itself
    (within `window`, and from the start of its attention chunk of `chunk` positions)."""
    if q_len == kv_len and window is None and chunk is None:
        return None  # plain causal
    query_pos = torch.arange(kv_len - q_len, kv_len).unsqueeze(1)
    key_pos = torch.arange(kv_len)
    mask = key_pos <= query_pos
    if window is not None:
        mask &= key_pos > query_pos - window
    if chunk is not None:
        mask &= key_pos >= query_pos // chunk * chunk
    return mask


def _attention_chunk(module: torch.nn.Module) -> int | None:
    """Llama 4: the attention chunk size of a "chunked_attention" layer, else None."""
    config, layer = getattr(module, "config", None), getattr(module, "layer_idx", None)
    types = getattr(config, "layer_types", None)
    if types is None or layer is None or types[layer] != "chunked_attention":
        return None
    return getattr(config, "attention_chunk_size", None)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None,
            gqa: bool, sinks: torch.Tensor | None) -> torch.Tensor:
    """q `[B, Hq, Lq, D]`, k / v `[B, Hk, Lk, D]`, mask bool broadcastable to `[B, Hq, Lq, Lk]`
    (None: causal, Lq == Lk) -> `[B, Hq, Lq, Dv]`. With `sinks` `[Hq]` (gpt-oss) each head's
    sink logit joins the softmax and is dropped, as the family's eager attention does."""
    if sinks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                              enable_gqa=gqa)
    if gqa:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    logits = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if mask is None:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    logits = logits.masked_fill(~mask, float("-inf"))
    sink = sinks.reshape(1, -1, 1, 1).to(logits.dtype).expand(logits.shape[0], -1, logits.shape[2], 1)
    combined = torch.cat([logits, sink], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    probs = torch.softmax(combined, dim=-1)[..., :-1]
    return probs.to(v.dtype) @ v


def paged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    sliding_window: int | None = None, s_aux: torch.Tensor | None = None,
                    **kwargs) -> tuple[torch.Tensor, None]:
    """query: `[1, Hq, N, D]` of the step's new tokens; key / value: `[1, Hk, K, D]` the contexts
    from `PagedKVCache.update`; s_aux: `[Hq]` attention sinks (gpt-oss) or None. Returns
    `[1, N, Hq, Dv]`."""
    layout: StepLayout = kwargs[LAYOUT_KWARG]
    chunk = _attention_chunk(module)
    q, k, v = query[0], key[0], value[0]
    gqa = q.shape[0] != k.shape[0]
    out = q.new_empty(q.shape[1], q.shape[0], v.shape[-1])
    q_start = k_start = 0
    for q_len, kv_len in zip(layout.q_lens, layout.kv_lens):
        if q_len > 1:
            mask = _chunk_mask(q_len, kv_len, sliding_window, chunk)
            o = _attend(q[:, q_start:q_start + q_len].unsqueeze(0), k[:, k_start:k_start + kv_len].unsqueeze(0),
                        v[:, k_start:k_start + kv_len].unsqueeze(0), mask, scaling, gqa, s_aux)
            out[q_start:q_start + q_len] = o[0].transpose(0, 1)
        q_start += q_len
        k_start += kv_len
    group = layout.decode_group(sliding_window, chunk)
    if group is not None:
        rows, index, mask = group
        o = _attend(q[:, rows].transpose(0, 1).unsqueeze(2), k[:, index].transpose(0, 1), v[:, index].transpose(0, 1),
                    mask, scaling, gqa, s_aux)  # [D, Hq, 1, Dv]
        out[rows] = o[:, :, 0]
    return out.unsqueeze(0), None


def register() -> None:
    """Make `IMPLEMENTATION` known to `transformers`' attention modules (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, paged_attention)
