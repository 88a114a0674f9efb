"""Where expert and gate weights come from, as every expert-shard worker sees them.

A `WeightSource` gives a model's gate and expert tensors; two implement it: a Hugging Face
checkpoint on disk (`workers.hf_checkpoint.HFCheckpoint`: Mixtral, Qwen2/3-MoE or
DeepSeek-V2/V3 layout, see `workers.hf_layouts`) and a seeded random model
(`workers.random_model.RandomModel`). Both are small, picklable values (paths and a key -> file
map, or a spec and a seed) so the driver can build one and send it to every worker; each worker
then reads or generates only the experts in its own slots. All tensors come out as float32 on
the CPU; callers move them to their device.

An expert is a SwiGLU MLP, `w2(silu(w1 x) * w3 x)` (`ExpertWeights`). Shared experts (Qwen2-MoE
`mlp.shared_expert`, DeepSeek `mlp.shared_experts`) are one MLP per layer; it is served as
`spec.num_shared_experts` pieces of the routed experts' size, cut along its intermediate
dimension (`shared_piece`), by the one reading loop both sources use (`produce_experts`).
"""

from __future__ import annotations

import operator
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from cluster.model_spec import GateWeights, ModelSpec

PROJECTIONS = ("w1", "w2", "w3")
SHARED = {"w1": "s1", "w2": "s2", "w3": "s3"}  # our projection -> its kind in the shared MLP

Progress = Callable[[int], None]


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file and, where relevant, the key."""


@dataclass(frozen=True)
class ExpertWeights:
    """Mixtral SwiGLU expert: w2(silu(w1 x) * w3 x).

    w1: [F, H] gate projection; w2: [H, F] down projection; w3: [F, H] up projection.
    """

    w1: torch.Tensor
    w2: torch.Tensor
    w3: torch.Tensor

    def __post_init__(self) -> None:
        if self.w1.dim() != 2 or self.w1.shape != self.w3.shape:
            raise ValueError(
                f"w1 and w3 must both be [F, H], got {list(self.w1.shape)} and "
                f"{list(self.w3.shape)}"
            )
        if self.w2.shape != self.w1.shape[::-1]:
            raise ValueError(
                f"w2 must be [H, F] = {list(self.w1.shape[::-1])} to match w1 "
                f"{list(self.w1.shape)}, got {list(self.w2.shape)}"
            )


@runtime_checkable
class WeightSource(Protocol):
    """Gate and expert weights of one model, as float32 CPU tensors.

    `layer` is the model's own layer index (one of `spec.moe_layers`).
    """

    spec: ModelSpec

    def gate_weight(self, layer: int) -> torch.Tensor:
        """Router weight of `layer`: [E, H], float32."""
        ...

    def gate(self, layer: int) -> GateWeights:
        """Every router tensor of `layer` that the model's gate uses."""
        ...

    def experts(
        self, pairs: Sequence[tuple[int, int]], progress: Progress | None = None
    ) -> Iterator[tuple[tuple[int, int], ExpertWeights]]:
        """Yield `((layer, expert), weights)` in the order of `pairs`.

        `progress(n)` is called after each expert is read, with n = experts read so far.
        """
        ...


def check_pairs(spec: ModelSpec, pairs: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Validate (layer, expert) pairs against `spec`; ValueError naming the first bad pair."""
    checked: list[tuple[int, int]] = []
    for pair in pairs:
        try:
            layer, expert = (operator.index(v) for v in pair)
        except (TypeError, ValueError):
            raise ValueError(f"expected (layer, expert) pairs of integers, got {pair!r}") from None
        spec.moe_index(layer)
        if not 0 <= expert < spec.experts_per_layer:
            shared = f" ({spec.num_shared_experts} shared after them)" if spec.num_shared_experts else ""
            raise ValueError(
                f"expert {expert} of layer {layer} is out of range 0..{spec.experts_per_layer - 1}{shared}"
            )
        checked.append((layer, expert))
    return checked


def produce_experts(
    spec: ModelSpec,
    pairs: list[tuple[int, int]],
    read: Callable[[int, int], ExpertWeights],
    read_shared: Callable[[int], ExpertWeights],
    progress: Progress | None,
) -> Iterator[tuple[tuple[int, int], ExpertWeights]]:
    """Read experts one at a time, reporting the running count to `progress` after each.

    `read(layer, expert)` gives a routed expert, `read_shared(layer)` a layer's whole shared MLP,
    which is cut into its pieces here (`shared_piece`); the last one read is kept while the
    next pairs are pieces of the same layer, so a worker holding several reads it once.
    """
    shared: tuple[int, ExpertWeights] | None = None
    for count, (layer, expert) in enumerate(pairs, start=1):
        if expert >= spec.num_experts:
            if shared is None or shared[0] != layer:
                shared = (layer, read_shared(layer))
            weights = shared_piece(spec, shared[1], expert - spec.num_experts)
        else:
            weights = read(layer, expert)
        if progress is not None:
            progress(count)
        yield (layer, expert), weights


def shared_piece(spec: ModelSpec, shared: ExpertWeights, piece: int) -> ExpertWeights:
    """Piece `piece` of a layer's shared MLP (`[Fs, H]`, `[H, Fs]`, `[Fs, H]`) as an expert of
    `intermediate_size` F: rows `piece*F ..` of w1 and w3, the same columns of w2. A SwiGLU MLP
    is a sum over its intermediate units, so the pieces add up to the whole; the last one is
    zero-padded, and zero units add exactly 0 (silu(0) * 0)."""
    inter = spec.intermediate_size
    lo, hi = piece * inter, min((piece + 1) * inter, shared.w1.shape[0])
    pad = inter - (hi - lo)

    def rows(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(t[lo:hi], (0, 0, 0, pad)).contiguous()

    w2 = torch.nn.functional.pad(shared.w2[:, lo:hi], (0, pad)).contiguous()
    return ExpertWeights(w1=rows(shared.w1), w2=w2, w3=rows(shared.w3))


def open_weights(
    checkpoint: str | os.PathLike[str] | None, random_spec: ModelSpec | None, seed: int
) -> WeightSource:
    """A Hugging Face checkpoint directory, or a seeded random model; exactly one must be given."""
    from workers.hf_checkpoint import HFCheckpoint
    from workers.random_model import RandomModel

    if (checkpoint is None) == (random_spec is None):
        given = "both" if checkpoint is not None else "neither"
        raise ValueError(
            "give exactly one of checkpoint (a Hugging Face checkpoint directory) or random_spec "
            f"(a ModelSpec for random weights); got {given}"
        )
    if checkpoint is not None:
        return HFCheckpoint(checkpoint)
    return RandomModel(random_spec, seed)  # type: ignore[arg-type]
