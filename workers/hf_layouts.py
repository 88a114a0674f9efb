"""Hugging Face checkpoint layouts of the MoE families we serve: where a layer's router, expert
and shared-expert tensors sit, which layers have an MoE block, and which gate variant
`config.json` describes.

| family | architectures | MoE block | expert matrices (ours: w1, w3, w2) | experts / size keys | shared experts | MoE layers |
|---|---|---|---|---|---|---|
| Mixtral | `MixtralForCausalLM` | `block_sparse_moe` | `w1`, `w3`, `w2` | `num_local_experts`, `intermediate_size` | none | all |
| Qwen3-MoE | `Qwen3MoeForCausalLM` | `mlp` | `gate_proj`, `up_proj`, `down_proj` | `num_experts` (transformers 5: `num_local_experts`), `moe_intermediate_size` | none | not in `mlp_only_layers`, every `decoder_sparse_step` |
| Qwen2-MoE | `Qwen2MoeForCausalLM` | `mlp` | same | same | `shared_expert` (`shared_expert_intermediate_size`), sigmoid `shared_expert_gate` | same |
| DeepSeek-V2 | `DeepseekV2ForCausalLM` | `mlp` | same | `n_routed_experts`, `moe_intermediate_size` | `shared_experts` (`n_shared_experts` x the expert size) | from `first_k_dense_replace`, every `moe_layer_freq` |
| DeepSeek-V3 | `DeepseekV3ForCausalLM` | `mlp` | same | same | same | same |

Every expert is a SwiGLU MLP `w2(silu(w1 x) * w3 x)`. The gates (see `router_service.gate`):
Mixtral and Qwen softmax top-k (Qwen renormalises only with `norm_topk_prob`); DeepSeek-V2
softmax, group-limited with `topk_method: group_limited_greedy`, scaled by
`routed_scaling_factor` and never renormalised (as `transformers` does); DeepSeek-V3 sigmoid
scores plus `gate.e_score_correction_bias` to choose, group-limited (`n_group`, `topk_group`),
renormalised with `norm_topk_prob`, scaled by `routed_scaling_factor`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cluster.model_spec import GateSpec

Config = dict[str, Any]


@dataclass(frozen=True)
class Layout:
    family: str
    architectures: tuple[str, ...]
    model_type: str
    block: str  # the MoE block's name inside `model.layers.{l}`
    projections: tuple[tuple[str, str], ...]  # (ours, the checkpoint's) for w1, w2, w3
    num_experts_keys: tuple[str, ...]  # the first one config.json has
    intermediate_key: str
    moe_layer: Callable[[int, Config], bool]  # (layer, config) -> has an MoE block
    gate_spec: Callable[[Config], GateSpec]
    shared_block: str | None = None  # the shared experts' MLP inside the block
    shared_size: Callable[[Config], int] | None = None  # its intermediate size
    shared_gate: str | None = None  # the shared experts' sigmoid gate inside the block

    def gate_key(self, layer: int) -> str:
        """Key of the router weight of model layer `layer`: a tensor [E, H]."""
        return f"model.layers.{layer}.{self.block}.gate.weight"

    def correction_bias_key(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.block}.gate.e_score_correction_bias"

    def shared_gate_key(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.block}.{self.shared_gate}.weight"

    def expert_key(self, layer: int, expert: int, projection: str) -> str:
        """Key of one expert matrix; `projection` is ours: "w1", "w2" or "w3"."""
        return f"model.layers.{layer}.{self.block}.experts.{expert}.{dict(self.projections)[projection]}.weight"

    def shared_key(self, layer: int, projection: str) -> str:
        """Key of one matrix of the layer's shared-expert MLP (all shared experts together)."""
        return f"model.layers.{layer}.{self.block}.{self.shared_block}.{dict(self.projections)[projection]}.weight"


def _every_layer(layer: int, config: Config) -> bool:
    return True


def _qwen_moe_layer(layer: int, config: Config) -> bool:
    step = config.get("decoder_sparse_step", 1) or 1
    return layer not in (config.get("mlp_only_layers") or []) and (layer + 1) % step == 0


def _deepseek_moe_layer(layer: int, config: Config) -> bool:
    freq = config.get("moe_layer_freq", 1) or 1
    return layer >= (config.get("first_k_dense_replace") or 0) and layer % freq == 0


def _qwen_gate(config: Config) -> GateSpec:
    return GateSpec(norm_topk_prob=bool(config.get("norm_topk_prob", False)))


DEEPSEEK_V2_METHODS = ("greedy", "group_limited_greedy")


def _deepseek_v2_gate(config: Config) -> GateSpec:
    method = config.get("topk_method") or "greedy"
    if method not in DEEPSEEK_V2_METHODS:
        raise ValueError(f"key 'topk_method' is {method!r}; DeepSeek-V2 routes with one of {DEEPSEEK_V2_METHODS}")
    grouped = method == "group_limited_greedy"
    return GateSpec(
        norm_topk_prob=False, routed_scaling_factor=float(config.get("routed_scaling_factor", 1.0)),
        n_group=(config.get("n_group") or 1) if grouped else 1,
        topk_group=(config.get("topk_group") or 1) if grouped else 1, group_score="max",
    )


def _deepseek_v3_gate(config: Config) -> GateSpec:
    return GateSpec(
        scoring="sigmoid", correction_bias=True, norm_topk_prob=bool(config.get("norm_topk_prob", True)),
        routed_scaling_factor=float(config.get("routed_scaling_factor", 1.0)),
        n_group=config.get("n_group") or 1, topk_group=config.get("topk_group") or 1, group_score="top2_sum",
    )


def _deepseek_shared(config: Config) -> int:
    return (config.get("n_shared_experts") or 0) * config["moe_intermediate_size"]


def _qwen2_shared(config: Config) -> int:
    return config.get("shared_expert_intermediate_size") or 0


_HF_NAMES = (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj"))
_QWEN_EXPERTS = ("num_experts", "num_local_experts")
_DEEPSEEK_EXPERTS = ("n_routed_experts", "num_local_experts", "num_experts")

MIXTRAL = Layout(
    family="mixtral", architectures=("MixtralForCausalLM",), model_type="mixtral", block="block_sparse_moe",
    projections=(("w1", "w1"), ("w2", "w2"), ("w3", "w3")), num_experts_keys=("num_local_experts",),
    intermediate_key="intermediate_size", moe_layer=_every_layer, gate_spec=lambda config: GateSpec(),
)
QWEN3_MOE = Layout(
    family="qwen3_moe", architectures=("Qwen3MoeForCausalLM",), model_type="qwen3_moe", block="mlp",
    projections=_HF_NAMES, num_experts_keys=_QWEN_EXPERTS, intermediate_key="moe_intermediate_size",
    moe_layer=_qwen_moe_layer, gate_spec=_qwen_gate,
)
QWEN2_MOE = Layout(
    family="qwen2_moe", architectures=("Qwen2MoeForCausalLM",), model_type="qwen2_moe", block="mlp",
    projections=_HF_NAMES, num_experts_keys=_QWEN_EXPERTS, intermediate_key="moe_intermediate_size",
    moe_layer=_qwen_moe_layer, gate_spec=_qwen_gate,
    shared_block="shared_expert", shared_size=_qwen2_shared, shared_gate="shared_expert_gate",
)
DEEPSEEK_V2 = Layout(
    family="deepseek_v2", architectures=("DeepseekV2ForCausalLM",), model_type="deepseek_v2", block="mlp",
    projections=_HF_NAMES, num_experts_keys=_DEEPSEEK_EXPERTS, intermediate_key="moe_intermediate_size",
    moe_layer=_deepseek_moe_layer, gate_spec=_deepseek_v2_gate,
    shared_block="shared_experts", shared_size=_deepseek_shared,
)
DEEPSEEK_V3 = Layout(
    family="deepseek_v3", architectures=("DeepseekV3ForCausalLM",), model_type="deepseek_v3", block="mlp",
    projections=_HF_NAMES, num_experts_keys=_DEEPSEEK_EXPERTS, intermediate_key="moe_intermediate_size",
    moe_layer=_deepseek_moe_layer, gate_spec=_deepseek_v3_gate,
    shared_block="shared_experts", shared_size=_deepseek_shared,
)
LAYOUTS = (MIXTRAL, QWEN3_MOE, QWEN2_MOE, DEEPSEEK_V2, DEEPSEEK_V3)
BY_FAMILY = {layout.family: layout for layout in LAYOUTS}


def layout_for(config: Config) -> Layout:
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
    raise ValueError(f"architecture {named!r} is not supported; supported: {supported}")
