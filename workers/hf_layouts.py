"""Hugging Face checkpoint layouts of the MoE families we serve: where a layer's router and
expert tensors sit, and how `config.json` says which layers have an MoE block.

| family | architectures | MoE block | expert matrices (ours: w1, w3, w2) | experts / size keys |
|---|---|---|---|---|
| Mixtral | `MixtralForCausalLM` | `block_sparse_moe` | `w1`, `w3`, `w2` | `num_local_experts`, `intermediate_size` |
| Qwen3-MoE | `Qwen3MoeForCausalLM` | `mlp` | `gate_proj`, `up_proj`, `down_proj` | `num_experts` (transformers 5: `num_local_experts`), `moe_intermediate_size` |

Every expert is a SwiGLU MLP `w2(silu(w1 x) * w3 x)`. Qwen3-MoE layers are dense where
`mlp_only_layers` lists them or `(layer + 1) % decoder_sparse_step != 0`; its gate renormalises
the top-k weights only with `norm_topk_prob`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Layout:
    family: str
    architectures: tuple[str, ...]
    model_type: str
    block: str  # the MoE block's name inside `model.layers.{l}`
    projections: tuple[tuple[str, str], ...]  # (ours, the checkpoint's) for w1, w2, w3
    num_experts_keys: tuple[str, ...]  # the first one config.json has
    intermediate_key: str
    moe_layer: Callable[[int, dict[str, Any]], bool]  # (layer, config) -> has an MoE block
    norm_topk_prob: Callable[[dict[str, Any]], bool]

    def gate_key(self, layer: int) -> str:
        """Key of the router weight of model layer `layer`: a tensor [E, H]."""
        return f"model.layers.{layer}.{self.block}.gate.weight"

    def expert_key(self, layer: int, expert: int, projection: str) -> str:
        """Key of one expert matrix; `projection` is ours: "w1", "w2" or "w3"."""
        return f"model.layers.{layer}.{self.block}.experts.{expert}.{dict(self.projections)[projection]}.weight"


def _every_layer(layer: int, config: dict[str, Any]) -> bool:
    return True


def _always(config: dict[str, Any]) -> bool:
    return True


def _norm_topk_prob(config: dict[str, Any]) -> bool:
    return bool(config.get("norm_topk_prob", False))


def _qwen_moe_layer(layer: int, config: dict[str, Any]) -> bool:
    step = config.get("decoder_sparse_step", 1) or 1
    return layer not in (config.get("mlp_only_layers") or []) and (layer + 1) % step == 0


MIXTRAL = Layout(
    family="mixtral", architectures=("MixtralForCausalLM",), model_type="mixtral", block="block_sparse_moe",
    projections=(("w1", "w1"), ("w2", "w2"), ("w3", "w3")), num_experts_keys=("num_local_experts",),
    intermediate_key="intermediate_size", moe_layer=_every_layer, norm_topk_prob=_always,
)
QWEN3_MOE = Layout(
    family="qwen3_moe", architectures=("Qwen3MoeForCausalLM",), model_type="qwen3_moe", block="mlp",
    projections=(("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")), num_experts_keys=("num_experts", "num_local_experts"),
    intermediate_key="moe_intermediate_size", moe_layer=_qwen_moe_layer,
    norm_topk_prob=_norm_topk_prob,
)
LAYOUTS = (MIXTRAL, QWEN3_MOE)
BY_FAMILY = {layout.family: layout for layout in LAYOUTS}
# Known MoE families not served yet, and what they need that we lack.
NOT_YET = {
    "qwen2_moe": "a shared expert with its own sigmoid gate",
    "deepseek_v2": "group-limited routing and shared experts",
    "deepseek_v3": "sigmoid scores with a correction bias, group-limited routing and shared experts",
}


def layout_for(config: dict[str, Any]) -> Layout:
    """The layout `config.json` describes (by `architectures`, else `model_type`); ValueError
    naming the architecture when it is not one we serve."""
    architectures = config.get("architectures") or []
    model_type = config.get("model_type")
    if not architectures and model_type is None:
        return MIXTRAL  # a bare config: the layout this project started with
    for layout in LAYOUTS:
        if any(a in layout.architectures for a in architectures) or (not architectures and model_type == layout.model_type):
            return layout
    named = architectures or [model_type]
    supported = ", ".join(a for layout in LAYOUTS for a in layout.architectures)
    why = NOT_YET.get(str(model_type))
    later = f" ({model_type} needs {why}, which is not served yet)" if why else ""
    raise ValueError(f"architecture {named!r} is not supported{later}; supported: {supported}")
