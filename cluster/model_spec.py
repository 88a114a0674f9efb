"""What a served MoE model looks like, independent of where its weights come from.

`ModelSpec` is the one description of the model that the router (gate, request checks,
metadata), the workers (expert shapes) and the placement (how many logical experts) share.
It carries no weights and imports neither Ray nor gRPC.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Datatype names of the Open Inference Protocol (KServe v2) that we accept for hidden states,
# mapped to torch dtypes. Requests are answered in the datatype they came in.
WIRE_DTYPES: dict[str, torch.dtype] = {
    "FP32": torch.float32,
    "FP16": torch.float16,
    "BF16": torch.bfloat16,
}


@dataclass(frozen=True)
class ModelSpec:
    """Shapes of the MoE layers of one model.

    moe_layers: indices (in the model's own numbering) of the decoder layers that have an MoE
        block; a request names one of these as its `layer` parameter; the others are dense.
    intermediate_size: each routed expert's (Mixtral `intermediate_size`, Qwen
        `moe_intermediate_size`).
    norm_topk_prob: the gate renormalises the top-k weights to sum to 1 (Mixtral always;
        Qwen-MoE as its config says).
    family: the checkpoint layout the model comes in ("mixtral", "qwen3_moe").
    """

    hidden_size: int
    intermediate_size: int
    num_experts: int
    top_k: int
    moe_layers: tuple[int, ...]
    num_hidden_layers: int
    norm_topk_prob: bool = True
    family: str = "mixtral"

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_experts", "top_k", "num_hidden_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(
                f"top_k ({self.top_k}) cannot exceed num_experts ({self.num_experts})"
            )
        if not self.moe_layers:
            raise ValueError("a model needs at least one MoE layer, got moe_layers=()")
        if list(self.moe_layers) != sorted(set(self.moe_layers)):
            raise ValueError(f"moe_layers must be sorted and unique, got {self.moe_layers}")
        bad = [layer for layer in self.moe_layers if not 0 <= layer < self.num_hidden_layers]
        if bad:
            raise ValueError(
                f"moe_layers {bad} are outside 0..{self.num_hidden_layers - 1} "
                f"(num_hidden_layers={self.num_hidden_layers})"
            )

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def num_logical_experts(self) -> int:
        """Logical experts over all MoE layers: placement indexes them `moe_index * E + e`."""
        return self.num_moe_layers * self.num_experts

    def moe_index(self, layer: int) -> int:
        """Position of model layer `layer` among the MoE layers; ValueError if it has no MoE."""
        try:
            return self.moe_layers.index(layer)
        except ValueError:
            raise ValueError(
                f"layer {layer} is not an MoE layer of this model; valid layers: "
                f"{self.describe_layers()}"
            ) from None

    def describe_layers(self) -> str:
        """The MoE layers as short ranges, e.g. `"1-3, 7"`."""
        return _ranges(self.moe_layers)

    @property
    def dense_layers(self) -> tuple[int, ...]:
        """Decoder layers without an MoE block (a plain MLP in the checkpoint)."""
        return tuple(layer for layer in range(self.num_hidden_layers) if layer not in self.moe_layers)

    def describe_dense_layers(self) -> str:
        """The dense layers as short ranges, or "none"."""
        return _ranges(self.dense_layers)

    def expert_bytes(self, bytes_per_param: int = 4) -> int:
        """Memory of one expert's three matrices (w1, w3: [F, H]; w2: [H, F])."""
        return 3 * self.hidden_size * self.intermediate_size * bytes_per_param


def _ranges(values: tuple[int, ...]) -> str:
    """`(0, 1, 2, 5)` -> `"0-2, 5"`: short and readable in error messages."""
    if not values:
        return "none"
    parts: list[str] = []
    start = prev = values[0]
    for v in values[1:] + (None,):  # type: ignore[operator]
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(parts)
