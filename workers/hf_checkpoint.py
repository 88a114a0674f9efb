"""A Hugging Face checkpoint directory as a `WeightSource`: config.json read into a
`ModelSpec`, the MoE tensors found through the safetensors index (or the files' headers) and read
lazily, one file handle per file per call.

A Mixtral checkpoint stores an expert as
`model.layers.{l}.block_sparse_moe.experts.{e}.w{1,2,3}.weight`, next to the router's
`model.layers.{l}.block_sparse_moe.gate.weight` (Qwen3-MoE: `mlp.experts.{e}.gate_proj/up_proj/
down_proj`, `mlp.gate`; every family's keys are in `workers.hf_layouts`). Only these tensors are
read; the rest of the checkpoint (attention, norms, embeddings, dense MLPs) is ignored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from cluster.model_spec import GateWeights, ModelSpec
from workers.hf_layouts import BY_FAMILY, Layout, layout_for
from workers.weights import PROJECTIONS, SHARED, CheckpointError, ExpertWeights, Progress, check_pairs, produce_experts

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SILU = ("silu", "swish")


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
        checked = check_pairs(self.spec, pairs)
        handles: dict[str, Any] = {}  # file name -> open safetensors handle, for this call only

        def read(layer: int, expert: int) -> ExpertWeights:
            keys = {p: self.layout.expert_key(layer, expert, p) for p in PROJECTIONS}
            return ExpertWeights(**{p: self._read(handles, key, p) for p, key in keys.items()})

        def read_shared(layer: int) -> ExpertWeights:
            keys = {p: self.layout.shared_key(layer, p) for p in PROJECTIONS}
            return ExpertWeights(**{p: self._read(handles, key, SHARED[p]) for p, key in keys.items()})

        return produce_experts(self.spec, checked, read, read_shared, progress)

    def dense_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor but the MoE blocks' (embeddings, attention, norms, dense MLP layers, LM
        head), by checkpoint key, as stored: what the router's dense side runs. Reads no expert."""
        moe_prefixes = tuple(f"model.layers.{layer}.{self.layout.block}." for layer in self.spec.moe_layers)
        files = {key: name for key, name in _all_key_files(self.root).items() if not key.startswith(moe_prefixes)}
        handles: dict[str, Any] = {}
        tensors = {}
        for key, name in files.items():
            if name not in handles:
                handles[name] = _open(self.root / name, f"tensor {key!r}")
            try:
                tensors[key] = handles[name].get_tensor(key)
            except SafetensorError as exc:
                raise CheckpointError(f"{self.root / name}: cannot read tensor {key!r}: {exc}") from exc
        return tensors

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


def _all_key_files(root: Path) -> dict[str, str]:
    """Every tensor key of the checkpoint -> the file (name inside `root`) that holds it."""
    index = root / INDEX_FILE
    if index.is_file():
        weight_map = _load_json(index).get("weight_map")
        return {k: v for k, v in weight_map.items() if isinstance(v, str)} if isinstance(weight_map, dict) else {}
    single = root / SINGLE_FILE
    paths = [single] if single.is_file() else sorted(root.glob("*.safetensors"))
    return {key: path.name for path in paths for key in _open(path, "listing its tensors").keys()}


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
