"""A seeded random model as a `WeightSource`, for demos, benchmarks and tests, and its writer
to a real Mixtral checkpoint directory (safetensors shards, index and config.json).

Each gate and expert depends only on (seed, layer, expert), so workers generating disjoint sets
of experts agree with each other and with a single-process reference. The experts are stored as
`spec.expert_dtype` says: the float32 weights rounded to BF16 / FP16, or quantized to FP8 blocks
(`FP8_BLOCK`) or MXFP4 (`workers.quant`); `experts()` gives them back dequantized to float32, so a
reference computes on exactly what the workers hold.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from cluster.model_spec import GateSpec, GateWeights, ModelSpec
from workers.hf_checkpoint import CONFIG_FILE, INDEX_FILE, SINGLE_FILE
from workers.hf_layouts import MIXTRAL
from workers.quant import MXFP4_GROUP, quantize_fp8, quantize_mxfp4
from workers.weights import PROJECTIONS, ExpertWeights, Progress, as_float32, check_pairs, produce_experts

_RANDOM_VOCAB_SIZE = 32
FP8_BLOCK = (128, 128)  # DeepSeek-V3's weight_block_size


def gate_key(layer: int) -> str:
    """Mixtral checkpoint key of the router weight of model layer `layer`: a tensor [E, H]."""
    return MIXTRAL.gate_key(layer)


def expert_key(layer: int, expert: int, projection: str) -> str:
    """Mixtral checkpoint key of one expert matrix; `projection` is "w1", "w2" or "w3"."""
    return MIXTRAL.expert_key(layer, expert, projection)


def _generator(*parts: int | str) -> torch.Generator:
    """A CPU generator seeded from `parts` only: same parts -> same stream, in any process."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def _normal(shape: tuple[int, ...], fan_in: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float32) / math.sqrt(fan_in)


class RandomModel:
    """Deterministic random weights: each gate and expert depends only on (seed, layer, expert).

    Workers generating disjoint sets of experts therefore agree with each other and with a
    single-process reference. Scaled like a real init (std 1/sqrt(fan_in)), so outputs stay O(1).
    """

    def __init__(self, spec: ModelSpec, seed: int = 0) -> None:
        if not isinstance(spec, ModelSpec):
            raise TypeError(f"spec must be a ModelSpec, got {type(spec).__name__}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {seed!r}")
        if spec.expert_dtype == "mxfp4" and (spec.hidden_size % MXFP4_GROUP or spec.intermediate_size % MXFP4_GROUP):
            raise ValueError(f"MXFP4 experts need hidden_size ({spec.hidden_size}) and intermediate_size "
                             f"({spec.intermediate_size}) to be multiples of {MXFP4_GROUP}")
        self.spec = spec
        self.seed = seed

    def __repr__(self) -> str:
        return f"RandomModel(spec={self.spec}, seed={self.seed})"

    def gate_weight(self, layer: int) -> torch.Tensor:
        """Router weight of `layer`: [E, H], float32."""
        self.spec.moe_index(layer)
        shape = (self.spec.num_experts, self.spec.hidden_size)
        return _normal(shape, self.spec.hidden_size, _generator(self.seed, "gate", layer))

    def gate(self, layer: int) -> GateWeights:
        """The router weight, plus a small random correction bias and shared-expert gate where
        `spec.gate` uses them."""
        weight = self.gate_weight(layer)
        hidden, gate = self.spec.hidden_size, self.spec.gate
        bias = shared_gate = None
        if gate.correction_bias:
            bias = 0.1 * torch.randn(self.spec.num_experts, generator=_generator(self.seed, "bias", layer))
        if gate.shared_gate:
            shared_gate = _normal((1, hidden), hidden, _generator(self.seed, "shared_gate", layer))
        return GateWeights(weight, bias, shared_gate)

    def expert(self, layer: int, expert: int) -> ExpertWeights:
        """One expert's weights: w1, w3: [F, H]; w2: [H, F] (a shared-MLP piece from
        `num_experts` on)."""
        ((_, weights),) = self.experts([(layer, expert)])
        return weights

    def shared(self, layer: int) -> ExpertWeights:
        """The whole shared MLP of `layer`: `[Fs, H]`, `[H, Fs]`, `[Fs, H]`."""
        self.spec.moe_index(layer)
        return self._swiglu(self.spec.shared_intermediate_size, _generator(self.seed, "shared", layer))

    def _swiglu(self, inter: int, gen: torch.Generator) -> ExpertWeights:
        hidden = self.spec.hidden_size
        w1 = _normal((inter, hidden), hidden, gen)
        w3 = _normal((inter, hidden), hidden, gen)
        w2 = _normal((hidden, inter), inter, gen)
        return ExpertWeights(w1=w1, w2=w2, w3=w3)

    def experts(
        self, pairs: Sequence[tuple[int, int]], progress: Progress | None = None
    ) -> Iterator[tuple[tuple[int, int], ExpertWeights]]:
        """Yield `((layer, expert), ExpertWeights)` for `pairs`, in order, as float32 (what the
        workers hold, dequantized)."""
        return as_float32(self.stored_experts(pairs, progress))

    def stored_experts(
        self, pairs: Sequence[tuple[int, int]], progress: Progress | None = None
    ) -> Iterator[tuple[tuple[int, int], ExpertWeights]]:
        """`experts()` as the workers hold them: stored as `spec.expert_dtype` (shared-MLP pieces
        are cut from the float32 MLP, then stored the same way)."""
        def read(layer: int, expert: int) -> ExpertWeights:
            return self._swiglu(self.spec.intermediate_size, _generator(self.seed, "expert", layer, expert))

        checked = check_pairs(self.spec, pairs)  # now, not when the first expert is asked for
        dtype = self.spec.expert_dtype
        return ((pair, _store(w, dtype)) for pair, w in produce_experts(self.spec, checked, read, self.shared, progress))

    def save_mixtral_checkpoint(
        self, path: str | os.PathLike[str], *, shards: int = 1, dtype: torch.dtype = torch.float32
    ) -> Path:
        """Write this model as a Hugging Face Mixtral checkpoint directory; returns its path.

        `shards` > 1 writes model-0000i-of-0000n.safetensors plus model.safetensors.index.json.
        A few non-MoE tensors (embeddings, norms) are included, as in a real checkpoint.
        """
        root = _prepare_output(self.spec, Path(path), shards, dtype)
        units = [("extra", -1, -1)] + [
            unit for layer in self.spec.moe_layers for unit in self._layer_units(layer)
        ]
        if shards > len(units):
            raise ValueError(f"shards={shards} exceeds the {len(units)} groups of tensors to write")
        weight_map: dict[str, str] = {}
        total_size = 0
        for i in range(shards):
            chunk = units[i * len(units) // shards : (i + 1) * len(units) // shards]
            name = SINGLE_FILE if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            tensors = {k: t.to(dtype).contiguous() for u in chunk for k, t in self._unit(u).items()}
            save_file(tensors, str(root / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, name))
            total_size += sum(t.numel() * t.element_size() for t in tensors.values())
        if shards > 1:
            index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
            (root / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        config = _mixtral_config(self.spec, dtype)
        (root / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        return root

    def _layer_units(self, layer: int) -> list[tuple[str, int, int]]:
        """Groups of tensors written together: (kind, layer, expert)."""
        return [("gate", layer, -1)] + [("expert", layer, e) for e in range(self.spec.num_experts)]

    def _unit(self, unit: tuple[str, int, int]) -> dict[str, torch.Tensor]:
        """The tensors of one group: the non-MoE extras, a layer's gate (+ norms), or an expert."""
        kind, layer, expert = unit
        hidden = self.spec.hidden_size
        if kind == "extra":
            embed = _normal((_RANDOM_VOCAB_SIZE, hidden), 1, _generator(self.seed, "embed"))
            return {"model.embed_tokens.weight": embed, "model.norm.weight": torch.ones(hidden)}
        if kind == "gate":
            return {
                gate_key(layer): self.gate_weight(layer),
                f"model.layers.{layer}.input_layernorm.weight": torch.ones(hidden),
                f"model.layers.{layer}.post_attention_layernorm.weight": torch.ones(hidden),
            }
        weights = self.expert(layer, expert)
        return {expert_key(layer, expert, p): getattr(weights, p) for p in PROJECTIONS}


def _store(weights: ExpertWeights, dtype: str) -> ExpertWeights:
    """float32 `weights` stored as `dtype` (see `ModelSpec.expert_dtype`)."""
    matrices = (weights.w1, weights.w2, weights.w3)
    if dtype == "float32":
        return weights
    if dtype == "fp8":
        return ExpertWeights(*(quantize_fp8(m, FP8_BLOCK) for m in matrices))
    if dtype == "mxfp4":
        return ExpertWeights(*(quantize_mxfp4(m) for m in matrices))
    return ExpertWeights(*(m.to(getattr(torch, dtype)) for m in matrices))


def _prepare_output(spec: ModelSpec, root: Path, shards: int, dtype: torch.dtype) -> Path:
    """Check the arguments of `save_mixtral_checkpoint` and create the (empty) directory."""
    if spec.num_shared_experts or spec.gate != GateSpec():
        raise ValueError("a Mixtral checkpoint has no shared experts and Mixtral's own gate; "
                         f"got {spec.num_shared_experts} shared experts and {spec.gate}")
    if spec.moe_layers != tuple(range(spec.num_hidden_layers)):
        raise ValueError(
            f"a Mixtral checkpoint has an MoE block in every layer, but moe_layers="
            f"{spec.moe_layers} with num_hidden_layers={spec.num_hidden_layers}"
        )
    if not isinstance(shards, int) or isinstance(shards, bool) or shards < 1:
        raise ValueError(f"shards must be a positive integer, got {shards!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root}: exists and is not a directory")
    if root.is_dir() and (any(root.glob("*.safetensors*")) or (root / CONFIG_FILE).exists()):
        raise ValueError(f"{root}: already holds a checkpoint; choose an empty directory")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _mixtral_config(spec: ModelSpec, dtype: torch.dtype) -> dict[str, Any]:
    """A Hugging Face MixtralConfig as JSON: the five MoE keys plus sensible extras."""
    heads = math.gcd(spec.hidden_size // 2, 32) if spec.hidden_size % 2 == 0 else 1
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers, "num_local_experts": spec.num_experts,
        "num_experts_per_tok": spec.top_k,
        "num_attention_heads": heads, "num_key_value_heads": heads,
        "vocab_size": _RANDOM_VOCAB_SIZE, "hidden_act": "silu", "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096, "router_jitter_noise": 0.0,
        "tie_word_embeddings": False, "dtype": str(dtype).removeprefix("torch."),
    }  # fmt: skip
