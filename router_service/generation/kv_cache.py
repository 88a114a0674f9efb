"""The paged KV cache: keys and values of every running sequence, in fixed-size blocks handed out
as sequences grow (never reserved for the longest possible sequence).

`BlockAllocator` is the bookkeeping (which block ids are free). `PagedKVCache` holds the tensors:
per decoder layer one key and one value tensor of `num_blocks * block_size` slots, shaped as that
layer's attention module writes them (`[slots, heads, dim]`; DeepSeek-V3's MLA writes its
compressed latent, one "head"). It is what `transformers`' attention modules see as their cache:
`update(key, value, layer_idx)` stores the step's new keys and values in their slots and returns
the whole context of every sequence in the step, concatenated in batch order, for
`router_service.generation.attention` to attend over.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from router_service.generation.attention import StepLayout


class BlockAllocator:
    """Free block ids of a cache of `num_blocks` blocks."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"a KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first

    def __repr__(self) -> str:
        return f"BlockAllocator(free={len(self._free)} of {self.num_blocks})"

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used_fraction(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise ValueError(f"asked for {count} KV blocks with {len(self._free)} free")
        return [self._free.pop() for _ in range(count)]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


@dataclass(frozen=True)
class LayerShape:
    """What one layer's attention module stores per token: key `[key_heads, key_dim]`, value
    `[value_heads, value_dim]`."""

    key_heads: int
    key_dim: int
    value_heads: int
    value_dim: int

    def bytes_per_token(self, element_size: int) -> int:
        return (self.key_heads * self.key_dim + self.value_heads * self.value_dim) * element_size


class PagedKVCache:
    """Keys and values of `num_blocks` blocks of `block_size` tokens for every layer in `shapes`."""

    def __init__(self, shapes: Mapping[int, LayerShape], num_blocks: int, block_size: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.block_size = block_size
        self.num_blocks = num_blocks
        slots = num_blocks * block_size
        self._keys = {layer: torch.zeros(slots, s.key_heads, s.key_dim, dtype=dtype, device=device)
                      for layer, s in shapes.items()}
        self._values = {layer: torch.zeros(slots, s.value_heads, s.value_dim, dtype=dtype, device=device)
                        for layer, s in shapes.items()}

    def __repr__(self) -> str:
        return f"PagedKVCache(layers={len(self._keys)}, blocks={self.num_blocks} x {self.block_size} tokens)"

    @staticmethod
    def blocks_within(budget_bytes: int, shapes: Mapping[int, LayerShape], block_size: int, element_size: int) -> int:
        """How many blocks of every layer fit in `budget_bytes`."""
        per_block = block_size * sum(s.bytes_per_token(element_size) for s in shapes.values())
        return budget_bytes // per_block

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self._keys.values(), *self._values.values()))

    def step(self, layout: StepLayout) -> StepCache:
        """The cache as one forward pass over `layout` sees it (where its new tokens go, whose
        context it reads). Passes over disjoint sequences may run at once (pipelined
        micro-batches): each has its own view, and their slots never overlap."""
        return StepCache(self, layout)

    def update(self, layout: StepLayout, key: torch.Tensor, value: torch.Tensor, layer_idx: int):
        """key: `[1, key_heads, N, key_dim]`, value: `[1, value_heads, N, value_dim]` of the
        N new tokens of `layout` -> the context of every sequence in it, `[1, heads, K, dim]`
        each, K = the sum of their context lengths (new tokens included), in batch order."""
        keys, values = self._keys[layer_idx], self._values[layer_idx]
        keys[layout.slot_mapping] = key[0].transpose(0, 1).to(keys.dtype)
        values[layout.slot_mapping] = value[0].transpose(0, 1).to(values.dtype)
        return (keys[layout.context_slots].transpose(0, 1).unsqueeze(0),
                values[layout.context_slots].transpose(0, 1).unsqueeze(0))


class StepCache:
    """What `transformers`' attention modules see as their cache for one forward pass:
    `update(key, value, layer_idx, ...)` stores into `cache` where `layout` says."""

    def __init__(self, cache: PagedKVCache, layout: StepLayout):
        self.cache = cache
        self.layout = layout

    def __repr__(self) -> str:
        return f"StepCache(tokens={self.layout.num_tokens}, sequences={len(self.layout.q_lens)})"

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        return self.cache.update(self.layout, key, value, layer_idx)


class ShapeProbe:
    """A stand-in cache for one forward pass that records what each layer would store, and
    stores nothing (the pass attends over the new tokens alone)."""

    def __init__(self):
        self.shapes: dict[int, LayerShape] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.shapes[layer_idx] = LayerShape(key.shape[1], key.shape[3], value.shape[1], value.shape[3])
        return key, value
