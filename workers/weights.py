"""Where expert and gate weights come from, as every expert-shard worker sees them.

A `WeightSource` gives a model's gate and expert tensors; two implement it: a Hugging Face
checkpoint on disk (`workers.hf_checkpoint.HFCheckpoint`: Mixtral, Qwen2/3-MoE or
DeepSeek-V2/V3 layout, see `workers.hf_layouts`) and a seeded random model
(`workers.random_model.RandomModel`). Both are small, picklable values (paths and a key -> file
map, or a spec and a seed) so the driver can build one and send it to every worker; each worker
then reads or generates only the experts in its own slots. Gate tensors and `experts()` come
out as float32 on the CPU; `stored_experts()` gives the experts as they are stored (float32,
BF16 or FP16 tensors, or FP8 / MXFP4 matrices with their scales, see `workers.quant`), which
is what the workers hold; callers move them to their device.

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
from workers import quant
from workers.quant import Matrix

PROJECTIONS = ("w1", "w2", "w3")
SHARED = {"w1": "s1", "w2": "s2", "w3": "s3"}  # our projection -> its kind in the shared MLP

Progress = Callable[[int], None]


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file and, where relevant, the key."""


@dataclass(frozen=True)
class ExpertWeights:
    """Mixtral SwiGLU expert: w2(silu(w1 x) * w3 x).

    w1: [F, H] gate projection; w2: [H, F] down projection; w3: [F, H] up projection. Each is a
    plain tensor or a quantized matrix (`workers.quant.Matrix`). biases: (b1 `[F]`, b3 `[F]`,
    b2 `[H]`) where the family's experts have them (gpt-oss), else None.
    """

    w1: Matrix
    w2: Matrix
    w3: Matrix
    biases: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        w1, w2, w3 = (tuple(m.shape) for m in (self.w1, self.w2, self.w3))
        if self.biases is not None:
            got = [list(b.shape) for b in self.biases]
            if got != [[w1[0]], [w1[0]], [w2[0]]]:
                raise ValueError(f"biases b1, b3, b2 must be [{w1[0]}], [{w1[0]}], [{w2[0]}], got {got}")
        if len(w1) != 2 or w1 != w3:
            raise ValueError(f"w1 and w3 must both be [F, H], got {list(w1)} and {list(w3)}")
        if w2 != w1[::-1]:
            raise ValueError(f"w2 must be [H, F] = {list(w1[::-1])} to match w1 {list(w1)}, got {list(w2)}")

    @property
    def storage(self) -> str:
        """How w1 is stored: "float32", "bfloat16", "float16", "fp8" or "mxfp4"."""
        return quant.storage_name(self.w1)

    @property
    def nbytes(self) -> int:
        """Bytes the three matrices hold (scales included)."""
        return sum(quant.nbytes(m) for m in (self.w1, self.w2, self.w3))

    def dequantized(self, dtype: torch.dtype = torch.float32) -> ExpertWeights:
        """The same expert as plain tensors of `dtype`."""
        return ExpertWeights(*(quant.dequantize(m, dtype) for m in (self.w1, self.w2, self.w3)), biases=self.biases)


@runtime_checkable
class WeightSource(Protocol):
    """Gate and expert weights of one model, on the CPU: the gate and `experts()` as float32,
    `stored_experts()` as stored (what the workers hold).

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
        """Yield `((layer, expert), weights)` in the order of `pairs`, as float32 tensors
        (dequantized where the checkpoint is quantized).

        `progress(n)` is called after each expert is read, with n = experts read so far.
        """
        ...

    def stored_experts(
        self, pairs: Sequence[tuple[int, int]], progress: Progress | None = None
    ) -> Iterator[tuple[tuple[int, int], ExpertWeights]]:
        """`experts()` as stored: float32 / BF16 / FP16 tensors, or FP8 / MXFP4 matrices."""
        ...


def as_float32(
    items: Iterator[tuple[tuple[int, int], ExpertWeights]],
) -> Iterator[tuple[tuple[int, int], ExpertWeights]]:
    """`stored_experts()` -> `experts()`: every matrix dequantized to float32."""
    for pair, weights in items:
        yield pair, weights.dequantized(torch.float32)


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
    zero-padded, and zero units add exactly 0 (silu(0) * 0). A quantized MLP is cut with its
    scales (FP8: each piece must start at a block boundary, ValueError otherwise)."""
    inter = spec.intermediate_size
    lo, hi = piece * inter, min((piece + 1) * inter, shared.w1.shape[0])
    return ExpertWeights(w1=quant.slice_rows(shared.w1, lo, hi, inter), w2=quant.slice_cols(shared.w2, lo, hi, inter),
                         w3=quant.slice_rows(shared.w3, lo, hi, inter))


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
