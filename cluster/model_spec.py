"""What a served MoE model looks like, independent of where its weights come from.

`ModelSpec` is the one description of the model that the router (gate, request checks,
metadata), the workers (expert shapes) and the placement (how many logical experts) share.
It carries no weights and imports neither Ray nor gRPC.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

# Datatype names of the Open Inference Protocol (KServe v2) that we accept for hidden states,
# mapped to torch dtypes. Requests are answered in the datatype they came in.
WIRE_DTYPES: dict[str, torch.dtype] = {
    "FP32": torch.float32,
    "FP16": torch.float16,
    "BF16": torch.bfloat16,
}


SCORINGS = ("softmax", "sigmoid")
# How expert weights are stored (and held by the workers): plain floats, FP8 with block scales,
# or MXFP4 (see `workers.quant`).
EXPERT_DTYPES = ("float32", "bfloat16", "float16", "fp8", "mxfp4")
GROUP_SCORES = ("max", "top2_sum")
# The activation of an expert's gate half, by the name config.json gives it (`hidden_act`, DBRX
# `ffn_config.ffn_act_fn.name`); "gpt_oss_swiglu" is gpt-oss's clamped form (see `ExpertForm`).
ACTIVATIONS = ("silu", "swish", "gelu", "gelu_pytorch_tanh", "gelu_new", "gelu_tanh", "relu", "quick_gelu",
               "gpt_oss_swiglu")


@dataclass(frozen=True)
class ExpertForm:
    """What one expert computes, beyond its three matrices (w1, w3 `[F, H]`, w2 `[H, F]`):
    `w2(act(w1 x + b1) * (w3 x + b3)) + b2`.

    activation: one of `ACTIVATIONS` (the gated MLP's nonlinearity; Mixtral and most: silu;
        Grok-1-like experts: gelu); "gpt_oss_swiglu" is gpt-oss's
        `(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)`, `g = clamp(gate, max=limit)`;
    swiglu_limit, swiglu_alpha: that form's `swiglu_limit` and alpha (1.702);
    bias: the experts have biases b1, b3 `[F]` and b2 `[H]` (gpt-oss), else none;
    weight_on_input: the gate weight scales the expert's INPUT (Llama 4: `expert(w x)`), not its
        output (`w expert(x)`, every other family); for a nonlinear expert these differ.
    """

    activation: str = "silu"
    swiglu_limit: float | None = None
    swiglu_alpha: float = 1.702
    bias: bool = False
    weight_on_input: bool = False

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"expert activation {self.activation!r} is not served; served: {', '.join(ACTIVATIONS)}")
        if (self.activation == "gpt_oss_swiglu") != (self.swiglu_limit is not None):
            raise ValueError(f"swiglu_limit ({self.swiglu_limit!r}) goes with activation 'gpt_oss_swiglu' and only "
                             f"with it (activation {self.activation!r})")
        if self.swiglu_limit is not None and not self.swiglu_limit > 0:
            raise ValueError(f"swiglu_limit must be > 0, got {self.swiglu_limit!r}")


@dataclass(frozen=True)
class GateSpec:
    """How a layer's gate turns router logits into top-k experts and weights.

    scoring: "softmax" (Mixtral, Qwen, DeepSeek-V2) or "sigmoid" (DeepSeek-V3) over the logits;
    correction_bias: the layer has a bias `[E]` added to the scores to *choose* the experts
        (DeepSeek-V3 `e_score_correction_bias`), while the weights come from the raw scores;
    n_group, topk_group: group-limited routing: the experts split into `n_group` equal groups,
        each token picks its `topk_group` best groups (scored by their best expert, "max",
        DeepSeek-V2; or by the sum of their best two, "top2_sum", DeepSeek-V3) and its top-k
        experts among those; 1 and 1 is plain top-k;
    norm_topk_prob: the k weights are renormalised to sum to 1;
    routed_scaling_factor: the routed experts' weights are multiplied by it (DeepSeek);
    shared_gate: the shared experts' output is scaled per token by a sigmoid gate
        (Qwen2-MoE `shared_expert_gate`, a `[1, H]` weight); otherwise by 1;
    router_bias: the router has a bias `[E]` added to its logits (gpt-oss `router.bias`);
    norm_p: with `norm_topk_prob`, the k weights are divided by their p-norm (DBRX
        `moe_normalize_expert_weights`; 1: by their sum, every other family).
    """

    scoring: str = "softmax"
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "max"
    routed_scaling_factor: float = 1.0
    correction_bias: bool = False
    shared_gate: bool = False
    router_bias: bool = False
    norm_p: float = 1.0

    def __post_init__(self) -> None:
        if not self.norm_p > 0:
            raise ValueError(f"gate norm_p must be > 0, got {self.norm_p!r}")
        if self.scoring not in SCORINGS:
            raise ValueError(f"gate scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if self.group_score not in GROUP_SCORES:
            raise ValueError(f"gate group_score must be one of {GROUP_SCORES}, got {self.group_score!r}")
        for name in ("n_group", "topk_group"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"gate {name} must be a positive integer, got {value!r}")
        if self.topk_group > self.n_group:
            raise ValueError(f"gate topk_group ({self.topk_group}) cannot exceed n_group ({self.n_group})")
        if not self.routed_scaling_factor > 0:
            raise ValueError(f"gate routed_scaling_factor must be > 0, got {self.routed_scaling_factor!r}")

    @property
    def grouped(self) -> bool:
        return self.n_group > 1


@dataclass(frozen=True)
class GateWeights:
    """A layer's router tensors, float32: weight `[E, H]`; correction_bias `[E]` (DeepSeek-V3),
    shared_gate `[1, H]` (Qwen2-MoE), bias `[E]` added to the logits (gpt-oss), where the family
    has them."""

    weight: torch.Tensor
    correction_bias: torch.Tensor | None = None
    shared_gate: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def float(self) -> GateWeights:
        def f(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.float().contiguous()
        return GateWeights(f(self.weight), f(self.correction_bias), f(self.shared_gate), f(self.bias))


@dataclass(frozen=True)
class ModelSpec:
    """Shapes of the MoE layers of one model.

    moe_layers: indices (in the model's own numbering) of the decoder layers that have an MoE
        block; a request names one of these as its `layer` parameter; the others are dense.
    intermediate_size: each routed expert's (Mixtral `intermediate_size`, Qwen
        `moe_intermediate_size`).
    gate: how the gate scores and picks experts (`GateSpec`; Mixtral's by default).
    shared_intermediate_size: the intermediate size of the layer's shared experts taken
        together (0: none). Every token goes through them. They are served as
        `num_shared_experts` extra experts of `intermediate_size` each, the shared MLP cut along
        its intermediate dimension (and zero-padded to a whole number of pieces, which adds
        exactly nothing), so they are placed and replicated like any other expert.
    family: the checkpoint layout the model comes in (see `workers.hf_layouts`).
    expert_dtype: how the routed experts are stored and held, one of `EXPERT_DTYPES` (the
        workers dequantize FP8 / MXFP4 when an expert runs; the math's dtype is the workers'
        `compute_dtype`).
    expert: what each expert computes (`ExpertForm`: activation, biases, where the gate weight
        goes); the shared experts compute the same (with no biases).

    Logical experts: in MoE layer position `m`, expert `e` is `m * experts_per_layer + e`; the
    routed experts are `e < num_experts`, the shared ones follow.
    """

    hidden_size: int
    intermediate_size: int
    num_experts: int
    top_k: int
    moe_layers: tuple[int, ...]
    num_hidden_layers: int
    gate: GateSpec = field(default_factory=GateSpec)
    shared_intermediate_size: int = 0
    family: str = "mixtral"
    expert_dtype: str = "float32"
    expert: ExpertForm = field(default_factory=ExpertForm)

    def __post_init__(self) -> None:
        if self.expert_dtype not in EXPERT_DTYPES:
            raise ValueError(f"expert_dtype must be one of {EXPERT_DTYPES}, got {self.expert_dtype!r}")
        for name in ("hidden_size", "intermediate_size", "num_experts", "top_k", "num_hidden_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(
                f"top_k ({self.top_k}) cannot exceed num_experts ({self.num_experts})"
            )
        if not isinstance(self.shared_intermediate_size, int) or self.shared_intermediate_size < 0:
            raise ValueError(f"shared_intermediate_size must be an integer >= 0, got {self.shared_intermediate_size!r}")
        if self.num_experts % self.gate.n_group:
            raise ValueError(f"num_experts ({self.num_experts}) must split into n_group ({self.gate.n_group}) equal groups")
        if self.gate.grouped and self.top_k > self.gate.topk_group * (self.num_experts // self.gate.n_group):
            raise ValueError(
                f"top_k ({self.top_k}) exceeds the experts of topk_group ({self.gate.topk_group}) groups "
                f"of {self.num_experts // self.gate.n_group}"
            )
        if self.gate.group_score == "top2_sum" and self.gate.grouped and self.num_experts // self.gate.n_group < 2:
            raise ValueError("group_score 'top2_sum' needs at least 2 experts per group")
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
    def num_shared_experts(self) -> int:
        """Shared-expert pieces per MoE layer, each of `intermediate_size`."""
        return -(-self.shared_intermediate_size // self.intermediate_size)

    @property
    def experts_per_layer(self) -> int:
        """Placed experts per MoE layer: the routed ones, then the shared pieces."""
        return self.num_experts + self.num_shared_experts

    @property
    def num_logical_experts(self) -> int:
        """Logical experts over all MoE layers: placement indexes them
        `moe_index * experts_per_layer + e`."""
        return self.num_moe_layers * self.experts_per_layer

    def layer_expert(self, logical: int) -> tuple[int, int]:
        """(model layer, expert within the layer) of a logical expert; shared pieces are
        `num_experts` and up."""
        return self.moe_layers[logical // self.experts_per_layer], logical % self.experts_per_layer

    def placed_load(self, routed: np.ndarray) -> np.ndarray:
        """The load the placement must carry, `[L, experts_per_layer]`, from the routed load
        `[L, E]` (tokens the gate sent to each expert): every token of a layer also goes through
        each shared piece, so those get the layer's token count (routed / top_k). The routed
        columns are returned as they are."""
        routed = np.asarray(routed)
        if not self.num_shared_experts:
            return routed
        tokens = routed.sum(axis=1, keepdims=True) / self.top_k
        return np.hstack([routed, np.repeat(tokens, self.num_shared_experts, axis=1).astype(routed.dtype)])

    def check_routed_load(self, values) -> np.ndarray:
        """A user's routed load (`[L, E]` or flat, e.g. for a dry-run plan) as `[L, E]` float64;
        ValueError when it has the wrong size or a value that is negative, NaN or infinite."""
        layers, experts = self.num_moe_layers, self.num_experts
        load = np.asarray(values, dtype=np.float64)
        if load.size != layers * experts:
            raise ValueError(f"load must have {layers} x {experts} = {layers * experts} values (layers x experts), "
                             f"got {load.size}")
        load = load.reshape(layers, experts)
        bad = np.flatnonzero(~np.isfinite(load) | (load < 0))
        if bad.size:
            layer, expert = divmod(int(bad[0]), experts)
            raise ValueError(f"load values must be finite and >= 0; {bad.size} are not, the first at layer index "
                             f"{layer}, expert {expert}: {load[layer, expert]}")
        return load

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

    def describe_shape(self) -> str:
        """`"2 layers x 8 experts"`, or `"2 layers x 10 experts (8 routed + 2 shared)"`."""
        shared = f" ({self.num_experts} routed + {self.num_shared_experts} shared)" if self.num_shared_experts else ""
        return f"{self.num_moe_layers} layers x {self.experts_per_layer} experts{shared}"

    def expert_label(self, logical: int) -> str:
        """`layer:expert` of a logical expert, `layer:s0` for a shared piece."""
        return expert_label(logical, self.moe_layers, self.num_experts, self.num_shared_experts)

    def expert_bytes(self, bytes_per_param: int = 4) -> int:
        """Memory of one expert's three matrices (w1, w3: [F, H]; w2: [H, F])."""
        return 3 * self.hidden_size * self.intermediate_size * bytes_per_param


def expert_label(logical: int, layers, num_experts: int, shared: int = 0) -> str:
    """`layer:expert` of logical expert `logical` (stride `num_experts + shared`); the shared
    pieces read `layer:s0`, `layer:s1`, ..."""
    stride = num_experts + shared
    layer, e = layers[logical // stride], logical % stride
    return f"{layer}:{e}" if e < num_experts else f"{layer}:s{e - num_experts}"


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


def causal_lm_class(config) -> type:
    """The family's causal LM class for its `transformers` config: the auto mapping's, else the
    class its `architectures` names (transformers 5.25 maps no auto class to Mistral 4).
    ValueError naming the config when transformers has neither."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        names = list(getattr(config, "architectures", None) or [])
        found = [getattr(transformers, n) for n in names if hasattr(transformers, n)]
        if not found:
            raise ValueError(f"transformers has no causal LM class for {type(config).__name__} "
                             f"(architectures {names})") from None
        return found[0]
