"""Where expert and gate weights come from: a Hugging Face checkpoint on disk (Mixtral,
Qwen2/3-MoE or DeepSeek-V2/V3 layout, see `workers.hf_layouts`), or a seeded random model.

Both sources implement `WeightSource`. They are small, picklable values (paths and a key -> file
map, or a spec and a seed) so the driver can build one and send it to every expert-shard worker;
each worker then reads or generates only the experts in its own slots. All tensors come out as
float32 on the CPU; callers move them to their device.

An expert is a SwiGLU MLP, `w2(silu(w1 x) * w3 x)`; a Mixtral checkpoint stores it as
`model.layers.{l}.block_sparse_moe.experts.{e}.w{1,2,3}.weight`, next to the router's
`model.layers.{l}.block_sparse_moe.gate.weight` (Qwen3-MoE: `mlp.experts.{e}.gate_proj/up_proj/
down_proj`, `mlp.gate`). Shared experts (Qwen2-MoE `mlp.shared_expert`, DeepSeek
`mlp.shared_experts`) are one MLP per layer; it is served as `spec.num_shared_experts` pieces of
the routed experts' size, cut along its intermediate dimension (`shared_piece`). Only these
tensors are read; the rest of the checkpoint (attention, norms, embeddings, dense MLPs) is
ignored.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from cluster.model_spec import GateSpec, ModelSpec
from router_service.gate import GateWeights
from workers.hf_layouts import BY_FAMILY, MIXTRAL, Layout, layout_for

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PROJECTIONS = ("w1", "w2", "w3")
SHARED = {"w1": "s1", "w2": "s2", "w3": "s3"}  # our projection -> its kind in the shared MLP
SILU = ("silu", "swish")
_RANDOM_VOCAB_SIZE = 32

Progress = Callable[[int], None]


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file and, where relevant, the key."""


def gate_key(layer: int) -> str:
    """Mixtral checkpoint key of the router weight of model layer `layer`: a tensor [E, H]."""
    return MIXTRAL.gate_key(layer)


def expert_key(layer: int, expert: int, projection: str) -> str:
    """Mixtral checkpoint key of one expert matrix; `projection` is "w1", "w2" or "w3"."""
    return MIXTRAL.expert_key(layer, expert, projection)


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


def _check_pairs(spec: ModelSpec, pairs: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
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


def _produce(
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


def _expected_shape(spec: ModelSpec, kind: str) -> tuple[int, ...]:
    """Shape of a router tensor ("gate", "bias", "shared_gate"), an expert matrix ("w1", "w2",
    "w3") or a shared-MLP matrix ("s1", "s2", "s3") under `spec`."""
    hidden = spec.hidden_size
    fixed = {"gate": (spec.num_experts, hidden), "bias": (spec.num_experts,), "shared_gate": (1, hidden)}
    if kind in fixed:
        return fixed[kind]
    inter = spec.shared_intermediate_size if kind.startswith("s") else spec.intermediate_size
    return (hidden, inter) if kind[1] == "2" else (inter, hidden)


def _required_keys(spec: ModelSpec, layout: Layout) -> list[str]:
    """Every MoE tensor the checkpoint must hold."""
    keys = []
    for layer in spec.moe_layers:
        keys.append(layout.gate_key(layer))
        if spec.gate.correction_bias:
            keys.append(layout.correction_bias_key(layer))
        if spec.gate.shared_gate:
            keys.append(layout.shared_gate_key(layer))
        keys += [layout.expert_key(layer, e, p) for e in range(spec.num_experts) for p in PROJECTIONS]
        if spec.num_shared_experts:
            keys += [layout.shared_key(layer, p) for p in PROJECTIONS]
    return keys


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


class HFCheckpoint:
    """A Hugging Face checkpoint directory (any layout of `workers.hf_layouts`), read lazily
    with safetensors.

    Construction reads config.json and the tensor index (never tensor data) and checks that
    every gate and expert tensor is present. Holds only the directory and a key -> file map,
    so it pickles small; each `experts()` call opens each file it needs once.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        root = Path(path)
        if not root.is_dir():
            raise CheckpointError(
                f"{root}: not a directory; expected a Hugging Face checkpoint directory"
            )
        self.root = root
        self.spec = _read_config(root / CONFIG_FILE)
        self._files = _key_files(root, _required_keys(self.spec, self.layout))

    def __repr__(self) -> str:
        return f"HFCheckpoint({str(self.root)!r}, spec={self.spec})"

    @property
    def layout(self) -> Layout:
        return BY_FAMILY[self.spec.family]

    def gate_weight(self, layer: int) -> torch.Tensor:
        """Router weight of `layer`: [E, H], float32."""
        self.spec.moe_index(layer)
        return self._read({}, self.layout.gate_key(layer), "gate")

    def gate(self, layer: int) -> GateWeights:
        """The router weight of `layer`, and its correction bias and shared-expert gate where
        the family has them."""
        self.spec.moe_index(layer)
        handles: dict[str, Any] = {}
        layout, gate = self.layout, self.spec.gate
        return GateWeights(
            self._read(handles, layout.gate_key(layer), "gate"),
            self._read(handles, layout.correction_bias_key(layer), "bias") if gate.correction_bias else None,
            self._read(handles, layout.shared_gate_key(layer), "shared_gate") if gate.shared_gate else None,
        )

    def experts(
        self, pairs: Sequence[tuple[int, int]], progress: Progress | None = None
    ) -> Iterator[tuple[tuple[int, int], ExpertWeights]]:
        """Yield `((layer, expert), ExpertWeights)` for `pairs`, in order (experts from
        `num_experts` on are shared-MLP pieces); reads nothing else."""
        checked = _check_pairs(self.spec, pairs)
        handles: dict[str, Any] = {}  # file name -> open safetensors handle, for this call only

        def read(layer: int, expert: int) -> ExpertWeights:
            keys = {p: self.layout.expert_key(layer, expert, p) for p in PROJECTIONS}
            return ExpertWeights(**{p: self._read(handles, key, p) for p, key in keys.items()})

        def read_shared(layer: int) -> ExpertWeights:
            keys = {p: self.layout.shared_key(layer, p) for p in PROJECTIONS}
            return ExpertWeights(**{p: self._read(handles, key, SHARED[p]) for p, key in keys.items()})

        return _produce(self.spec, checked, read, read_shared, progress)

    def _read(self, handles: dict[str, Any], key: str, kind: str) -> torch.Tensor:
        """Read one tensor (`kind`: see `_expected_shape`) as float32, checking its shape;
        `handles` caches open files."""
        name = self._files[key]
        path = self.root / name
        if name not in handles:
            handles[name] = _open(path, f"tensor {key!r}")
        expected = _expected_shape(self.spec, kind)
        try:
            tensor_slice = handles[name].get_slice(key)
            got = tuple(tensor_slice.get_shape())
            if got != expected:
                raise CheckpointError(
                    f"{path}: tensor {key!r} has shape {list(got)}, expected {list(expected)} "
                    f"from {CONFIG_FILE}"
                )
            tensor = handles[name].get_tensor(key)
        except SafetensorError as exc:
            raise CheckpointError(f"{path}: cannot read tensor {key!r}: {exc}") from exc
        if not tensor.is_floating_point() or tensor.dtype.itemsize < 2:  # float8 needs its scales
            raise CheckpointError(
                f"{path}: tensor {key!r} has dtype {tensor.dtype}, expected a float of 16 or 32 bits (an 8-bit float needs its scales)"
            )
        return tensor.to(torch.float32)


def _open(path: Path, needed_for: str) -> Any:
    """Open a safetensors file for lazy reads; CheckpointError naming the file and what needs it."""
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file is missing; needed for {needed_for}") from None
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({exc}); needed for {needed_for}"
        ) from exc


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: malformed JSON: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_config(path: Path) -> ModelSpec:
    """config.json -> ModelSpec; the MoE layers (and the layout family) as the config says."""
    if not path.is_file():
        raise CheckpointError(
            f"{path}: missing; a Hugging Face checkpoint directory needs {CONFIG_FILE}"
        )
    config = _load_json(path)
    architectures = config.get("architectures")
    if architectures is not None and (
            not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures)):
        raise CheckpointError(f"{path}: key 'architectures' must be a list of names, got {architectures!r}")
    try:
        layout = layout_for(config)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    experts_key = next((k for k in layout.num_experts_keys if config.get(k) is not None), layout.num_experts_keys[0])
    quantized = config.get("quantization_config")
    if quantized:
        method = quantized.get("quant_method", "?") if isinstance(quantized, dict) else quantized
        raise CheckpointError(f"{path}: the checkpoint is quantized (quantization_config {method!r}, e.g. DeepSeek-V3's "
                              "FP8 blocks with their scales); it is not served: convert it to BF16 or FP32 first")
    act = config.get("hidden_act", "silu")
    if act not in SILU:
        raise CheckpointError(f"{path}: key 'hidden_act' is {act!r}; the experts are served as SwiGLU "
                              f"MLPs, which need {' or '.join(map(repr, SILU))}")
    keys = {"hidden_size": "hidden_size", layout.intermediate_key: "intermediate_size",
            "num_hidden_layers": "num_hidden_layers", experts_key: "num_experts",
            "num_experts_per_tok": "top_k"}
    values: dict[str, int] = {}
    for key, field in keys.items():
        if key not in config:
            raise CheckpointError(f"{path}: required key {key!r} is missing")
        value = config[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CheckpointError(f"{path}: key {key!r} must be a positive integer, got {value!r}")
        values[field] = value
    if values["top_k"] > values["num_experts"]:
        raise CheckpointError(
            f"{path}: key 'num_experts_per_tok' ({values['top_k']}) cannot exceed "
            f"{experts_key!r} ({values['num_experts']})"
        )
    moe_layers = tuple(layer for layer in range(values["num_hidden_layers"]) if layout.moe_layer(layer, config))
    if not moe_layers:
        raise CheckpointError(f"{path}: no layer has an MoE block (a dense model); nothing to serve")
    shared = 0
    if layout.shared_size is not None:
        shared = layout.shared_size(config)
        if not isinstance(shared, int) or isinstance(shared, bool) or shared < 0:
            raise CheckpointError(f"{path}: the shared experts' size must be an integer >= 0, got {shared!r}")
    try:
        gate = replace(layout.gate_spec(config), shared_gate=layout.shared_gate is not None and shared > 0)
        return ModelSpec(moe_layers=moe_layers, gate=gate, shared_intermediate_size=shared, family=layout.family,
                         **values)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def _key_files(root: Path, required: list[str]) -> dict[str, str]:
    """Map every required key to the file (name inside `root`) that holds it."""
    index = root / INDEX_FILE
    if index.is_file():
        files, where = _files_from_index(index, set(required)), str(index)
    else:
        files, where = _files_from_headers(root, set(required))
    missing = [key for key in required if key not in files]
    if missing:
        more = f" (and {len(missing) - 1} more MoE tensors)" if len(missing) > 1 else ""
        raise CheckpointError(f"{where}: tensor {missing[0]!r} not found{more}")
    if index.is_file():
        for key, name in files.items():
            if not (root / name).is_file():
                raise CheckpointError(
                    f"{root / name}: shard file is missing; {INDEX_FILE} maps {key!r} to it"
                )
    return files


def _files_from_index(index: Path, required: set[str]) -> dict[str, str]:
    weight_map = _load_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: key 'weight_map' must be an object, got {weight_map!r}")
    files = {}
    for key, name in weight_map.items():
        if key in required:
            if not isinstance(name, str):
                raise CheckpointError(
                    f"{index}: 'weight_map' entry {key!r} is {name!r}, not a file name"
                )
            files[key] = name
    return files


def _files_from_headers(root: Path, required: set[str]) -> tuple[dict[str, str], str]:
    """No index: read the key list of model.safetensors, or of every *.safetensors."""
    single = root / SINGLE_FILE
    paths = [single] if single.is_file() else sorted(root.glob("*.safetensors"))
    if not paths:
        raise CheckpointError(
            f"{root}: no {SINGLE_FILE}, {INDEX_FILE} or other *.safetensors files"
        )
    files: dict[str, str] = {}
    for path in paths:
        for key in _open(path, "listing its tensors").keys():
            if key not in required:
                continue
            if key in files:
                raise CheckpointError(f"{path}: tensor {key!r} is also in {root / files[key]}")
            files[key] = path.name
    return files, ", ".join(str(p) for p in paths)


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
        """Yield `((layer, expert), ExpertWeights)` for `pairs`, in order."""
        def read(layer: int, expert: int) -> ExpertWeights:
            return self._swiglu(self.spec.intermediate_size, _generator(self.seed, "expert", layer, expert))

        return _produce(self.spec, _check_pairs(self.spec, pairs), read, self.shared, progress)

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


def open_weights(
    checkpoint: str | os.PathLike[str] | None, random_spec: ModelSpec | None, seed: int
) -> WeightSource:
    """A Hugging Face checkpoint directory, or a seeded random model; exactly one must be given."""
    if (checkpoint is None) == (random_spec is None):
        given = "both" if checkpoint is not None else "neither"
        raise ValueError(
            "give exactly one of checkpoint (a Hugging Face checkpoint directory) or random_spec "
            f"(a ModelSpec for random weights); got {given}"
        )
    if checkpoint is not None:
        return HFCheckpoint(checkpoint)
    return RandomModel(random_spec, seed)  # type: ignore[arg-type]
