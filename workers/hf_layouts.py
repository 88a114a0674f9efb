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
| GLM-4.5 MoE | `Glm4MoeForCausalLM` | `mlp` | same | same | same | from `first_k_dense_replace` |
| Mistral 4 | `Mistral4ForCausalLM` | `mlp` | stacked `experts.gate_up_proj` `[E, 2F, H]` (gate, then up), `experts.down_proj` `[E, H, F]` | `n_routed_experts`, `moe_intermediate_size` | `shared_experts` | from `first_k_dense_replace` |
| DBRX | `DbrxForCausalLM` | `ffn` of `transformer.blocks.{l}` | `experts.mlp.w1`, `v1`, `w2`, each `[E*F, H]` (w2 transposed) | `ffn_config.moe_num_experts`, `ffn_config.ffn_hidden_size` | none | all |
| gpt-oss | `GptOssForCausalLM` | `mlp` | stacked `experts.gate_up_proj` `[E, H, 2F]` (gate, up interleaved), `experts.down_proj` `[E, F, H]`, with biases; MXFP4 `*_blocks`/`*_scales` | `num_local_experts`, `intermediate_size` | none | all |
| Llama 4 | `Llama4ForCausalLM` | `feed_forward` | stacked `experts.gate_up_proj` `[E, H, 2F]` (gate, then up), `experts.down_proj` `[E, F, H]` | `num_local_experts`, `intermediate_size` | `shared_expert` (`intermediate_size`) | `moe_layers`, else every `interleave_moe_layer_step` |

Every expert is a gated MLP `w2(act(w1 x) * w3 x)`, act from config.json (`hidden_act`; DBRX
`ffn_config.ffn_act_fn.name`; gpt-oss: its clamped SwiGLU with `swiglu_limit`, and expert
biases), see `cluster.model_spec.ExpertForm`. A layout whose family ships MXFP4 experts
(gpt-oss) names its stacked projections in `mxfp4_experts`; FP8 checkpoints keep the per-expert
keys above, each matrix with its `weight_scale_inv` beside it (`workers.hf_quant`). The gates (see `router_service.gate`):
Mixtral and Qwen softmax top-k (Qwen renormalises only with `norm_topk_prob`); DeepSeek-V2
softmax, group-limited with `topk_method: group_limited_greedy`, scaled by
`routed_scaling_factor` and never renormalised (as `transformers` does); DeepSeek-V3 sigmoid
scores plus `gate.e_score_correction_bias` to choose, group-limited (`n_group`, `topk_group`),
renormalised with `norm_topk_prob`, scaled by `routed_scaling_factor` (GLM-4.5 MoE the same);
Mistral 4 softmax, group-limited by each group's best two when `n_group` > 1, renormalised,
scaled; DBRX softmax top-k divided by the p-norm `moe_normalize_expert_weights`; gpt-oss softmax
over the top-k of the logits plus `router.bias`; Llama 4 sigmoid of the top-k logits, applied to
the expert's input (`ExpertForm.weight_on_input`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cluster.model_spec import ExpertForm, GateSpec

Config = dict[str, Any]


@dataclass(frozen=True)
class FusedExperts:
    """A layer's experts stacked in one tensor per projection inside `{block}.experts`, cut per
    expert when read.

    gate_up, down: the stacked tensors' names; transposed: stored for `x @ W` (gate_up
    `[E, H, 2F]`, down `[E, F, H]`; else `[E, 2F, H]`, `[E, H, F]`); interleaved: gate and up
    units alternate in gate_up (gpt-oss), else gate_up is the gate half, then the up half;
    biases: the (gate_up `[E, 2F]`, down `[E, H]`) bias tensors' names, or None;
    separate: DBRX's three tensors (w1, v1 = up, w2) each `[E*F, H]` instead (w2 transposed).
    """

    gate_up: str = "gate_up_proj"
    down: str = "down_proj"
    transposed: bool = False
    interleaved: bool = False
    biases: tuple[str, str] | None = None
    separate: tuple[str, str, str] | None = None


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
    # MXFP4 experts (`quant_method: mxfp4`): the stacked (gate_up, down) projections inside
    # `{block}.experts`, gate_up rows interleaved (gate even, up odd), as gpt-oss stores them
    mxfp4_experts: tuple[str, str] | None = None
    prefix: str = "model.layers"  # the decoder layers' keys (DBRX: `transformer.blocks`)
    router: str = "gate"  # the router inside the block (DBRX `router.layer`, gpt-oss / Llama 4 `router`)
    fused: FusedExperts | None = None  # the experts stacked per layer (else one key per expert)
    expert_form: Callable[[Config], ExpertForm] = lambda config: ExpertForm(config.get("hidden_act", "silu"))
    flatten: Callable[[Config], Config] = lambda config: config  # nested configs (DBRX) -> the usual keys

    def block_prefix(self, layer: int) -> str:
        """`model.layers.{layer}.{block}.`: every MoE tensor of the layer starts with it."""
        return f"{self.prefix}.{layer}.{self.block}."

    def gate_key(self, layer: int) -> str:
        """Key of the router weight of model layer `layer`: a tensor [E, H]."""
        return f"{self.block_prefix(layer)}{self.router}.weight"

    def router_bias_key(self, layer: int) -> str:
        """Key of the router's logit bias `[E]` (gpt-oss)."""
        return f"{self.block_prefix(layer)}{self.router}.bias"

    def correction_bias_key(self, layer: int) -> str:
        return f"{self.block_prefix(layer)}{self.router}.e_score_correction_bias"

    def shared_gate_key(self, layer: int) -> str:
        return f"{self.block_prefix(layer)}{self.shared_gate}.weight"

    def expert_key(self, layer: int, expert: int, projection: str) -> str:
        """Key of one expert matrix; `projection` is ours: "w1", "w2" or "w3"."""
        if self.fused is not None:
            raise ValueError(f"{self.family} checkpoints stack a layer's experts; see `fused_keys`")
        return f"{self.block_prefix(layer)}experts.{expert}.{dict(self.projections)[projection]}.weight"

    def fused_keys(self, layer: int) -> dict[str, str]:
        """The stacked expert tensors of `layer` by role: "gate_up", "down" (and "gate_up_bias",
        "down_bias"), or DBRX's "w1", "w3", "w2"."""
        fused, base = self.fused, f"{self.block_prefix(layer)}experts."
        if fused is None:
            raise ValueError(f"{self.family} checkpoints keep one key per expert")
        if fused.separate is not None:
            return {role: base + name for role, name in zip(("w1", "w3", "w2"), fused.separate)}
        keys = {"gate_up": base + fused.gate_up, "down": base + fused.down}
        if fused.biases is not None:
            keys.update(gate_up_bias=base + fused.biases[0], down_bias=base + fused.biases[1])
        return keys

    def mxfp4_key(self, layer: int, projection: int, part: str) -> str:
        """Key of a layer's stacked MXFP4 experts: projection 0 (gate_up) or 1 (down), part
        "blocks" (uint8 `[E, R, C/32, 16]`) or "scales" (uint8 `[E, R, C/32]`)."""
        if self.mxfp4_experts is None:
            raise ValueError(f"{self.family} checkpoints have no MXFP4 experts")
        return f"{self.block_prefix(layer)}experts.{self.mxfp4_experts[projection]}_{part}"

    def shared_key(self, layer: int, projection: str) -> str:
        """Key of one matrix of the layer's shared-expert MLP (all shared experts together)."""
        return f"{self.block_prefix(layer)}{self.shared_block}.{dict(self.projections)[projection]}.weight"


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


def _first_k_dense(layer: int, config: Config) -> bool:
    return layer >= (config.get("first_k_dense_replace") or 0)


def _llama4_moe_layer(layer: int, config: Config) -> bool:
    if config.get("moe_layers") is not None:
        return layer in config["moe_layers"]
    step = config.get("interleave_moe_layer_step", 1) or 1
    return (layer + 1) % step == 0


def _mistral4_gate(config: Config) -> GateSpec:
    return GateSpec(norm_topk_prob=bool(config.get("norm_topk_prob", True)),
                    routed_scaling_factor=float(config.get("routed_scaling_factor", 1.0)),
                    n_group=config.get("n_group") or 1, topk_group=config.get("topk_group") or 1, group_score="top2_sum")


def _dbrx_flatten(config: Config) -> Config:
    """DBRX's nested config (`d_model`, `n_layers`, `ffn_config`) -> the keys every family uses."""
    ffn = config.get("ffn_config") or {}
    if not isinstance(ffn, dict):
        raise ValueError(f"key 'ffn_config' must be an object, got {ffn!r}")
    act = ffn.get("ffn_act_fn") or {"name": "silu"}
    if not isinstance(act, dict) or "name" not in act:
        raise ValueError(f"key 'ffn_config.ffn_act_fn' must be an object with a 'name', got {act!r}")
    return {**config, "hidden_size": config.get("d_model"), "num_hidden_layers": config.get("n_layers"),
            "intermediate_size": ffn.get("ffn_hidden_size"), "num_local_experts": ffn.get("moe_num_experts"),
            "num_experts_per_tok": ffn.get("moe_top_k"), "hidden_act": act["name"],
            "moe_normalize_expert_weights": ffn.get("moe_normalize_expert_weights", 1.0)}


def _dbrx_gate(config: Config) -> GateSpec:
    p = config.get("moe_normalize_expert_weights", 1.0)
    if p is None:
        return GateSpec(norm_topk_prob=False)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not p > 0:
        raise ValueError(f"key 'ffn_config.moe_normalize_expert_weights' must be a number > 0 or null, got {p!r}")
    return GateSpec(norm_topk_prob=True, norm_p=float(p))


def _gpt_oss_form(config: Config) -> ExpertForm:
    limit = config.get("swiglu_limit", 7.0)
    alpha = config.get("swiglu_alpha", 1.702)
    for key, value in (("swiglu_limit", limit), ("swiglu_alpha", alpha)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"key {key!r} must be a number > 0, got {value!r}")
    return ExpertForm("gpt_oss_swiglu", swiglu_limit=float(limit), swiglu_alpha=float(alpha), bias=True)


def _llama4_form(config: Config) -> ExpertForm:
    return ExpertForm(config.get("hidden_act", "silu"), weight_on_input=True)


GLM4_MOE = Layout(
    family="glm4_moe", architectures=("Glm4MoeForCausalLM",), model_type="glm4_moe", block="mlp",
    projections=_HF_NAMES, num_experts_keys=_DEEPSEEK_EXPERTS, intermediate_key="moe_intermediate_size",
    moe_layer=_first_k_dense, gate_spec=_deepseek_v3_gate, shared_block="shared_experts", shared_size=_deepseek_shared,
)
MISTRAL4 = Layout(
    family="mistral4", architectures=("Mistral4ForCausalLM",), model_type="mistral4", block="mlp",
    projections=_HF_NAMES, num_experts_keys=_DEEPSEEK_EXPERTS, intermediate_key="moe_intermediate_size",
    moe_layer=_first_k_dense, gate_spec=_mistral4_gate, shared_block="shared_experts", shared_size=_deepseek_shared,
    fused=FusedExperts(),
)
DBRX = Layout(
    family="dbrx", architectures=("DbrxForCausalLM",), model_type="dbrx", block="ffn", projections=_HF_NAMES,
    num_experts_keys=("num_local_experts",), intermediate_key="intermediate_size", moe_layer=_every_layer,
    gate_spec=_dbrx_gate, prefix="transformer.blocks", router="router.layer",
    fused=FusedExperts(separate=("mlp.w1", "mlp.v1", "mlp.w2")), flatten=_dbrx_flatten,
)
GPT_OSS = Layout(
    family="gpt_oss", architectures=("GptOssForCausalLM",), model_type="gpt_oss", block="mlp", projections=_HF_NAMES,
    num_experts_keys=("num_local_experts",), intermediate_key="intermediate_size", moe_layer=_every_layer,
    gate_spec=lambda config: GateSpec(router_bias=True), router="router", mxfp4_experts=("gate_up_proj", "down_proj"),
    fused=FusedExperts(transposed=True, interleaved=True, biases=("gate_up_proj_bias", "down_proj_bias")),
    expert_form=_gpt_oss_form,
)
LLAMA4 = Layout(
    family="llama4", architectures=("Llama4ForCausalLM",), model_type="llama4_text", block="feed_forward",
    projections=_HF_NAMES, num_experts_keys=("num_local_experts",), intermediate_key="intermediate_size",
    moe_layer=_llama4_moe_layer, gate_spec=lambda config: GateSpec(scoring="sigmoid", norm_topk_prob=False),
    router="router", fused=FusedExperts(transposed=True), shared_block="shared_expert",
    shared_size=lambda config: config["intermediate_size"], expert_form=_llama4_form,
)
LAYOUTS = (MIXTRAL, QWEN3_MOE, QWEN2_MOE, DEEPSEEK_V2, DEEPSEEK_V3, GLM4_MOE, MISTRAL4, DBRX, GPT_OSS, LLAMA4)
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
