"""A Hugging Face checkpoint directory as a `WeightSource`: config.json read into a
`ModelSpec`, the MoE tensors found through the safetensors index (or the files' headers) and read
lazily, one file handle per file per call.

A Mixtral checkpoint stores an expert as
`model.layers.{l}.block_sparse_moe.experts.{e}.w{1,2,3}.weight`, next to the router's
`model.layers.{l}.block_sparse_moe.gate.weight` (Qwen3-MoE: `mlp.experts.{e}.gate_proj/up_proj/
down_proj`, `mlp.gate`; every family's keys are in `workers.hf_layouts`). Only these tensors are
read; the rest of the checkpoint (attention, norms, embeddings, dense MLPs) is ignored.

Experts are read as stored (`stored_experts`: float32, BF16, FP16, FP8 with block scales, MXFP4;
`workers.hf_quant` says which quantized layouts are served) and only `experts()` converts them to
float32; gates are always read as float32.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from cluster.model_spec import GateWeights, ModelSpec
from workers.hf_files import (  # noqa: F401  (the file names: imported from here by others)
    CONFIG_FILE,
    INDEX_FILE,
    SINGLE_FILE,
    all_key_files,
    header_dtype,
    key_files,
    load_json,
    open_file,
)
from workers.hf_layouts import BY_FAMILY, Layout, layout_for
from workers.hf_quant import STORAGE_OF, QuantConfig, fp8_matrix, mxfp4_expert, read_quant_config, scale_key
from workers.quant import FP8_DTYPES, Matrix
from workers.weights import (
    PROJECTIONS,
    SHARED,
    CheckpointError,
    ExpertWeights,
    Progress,
    as_float32,
    check_pairs,
    produce_experts,
)


def _expected_shape(spec: ModelSpec, kind: str) -> tuple[int, ...]:
    """Shape of a router tensor ("gate", "bias", "shared_gate"), an expert matrix ("w1", "w2",
    "w3") or a shared-MLP matrix ("s1", "s2", "s3") under `spec`."""
    hidden = spec.hidden_size
    fixed = {"gate": (spec.num_experts, hidden), "bias": (spec.num_experts,), "shared_gate": (1, hidden)}
    if kind in fixed:
        return fixed[kind]
    inter = spec.shared_intermediate_size if kind.startswith("s") else spec.intermediate_size
    return (hidden, inter) if kind[1] == "2" else (inter, hidden)


def _required_keys(spec: ModelSpec, layout: Layout, method: str | None) -> list[str]:
    """Every MoE tensor the checkpoint must hold (MXFP4 and fused families: a layer's experts
    stacked)."""
    keys = []
    for layer in spec.moe_layers:
        keys.append(layout.gate_key(layer))
        if spec.gate.correction_bias:
            keys.append(layout.correction_bias_key(layer))
        if spec.gate.router_bias:
            keys.append(layout.router_bias_key(layer))
        if spec.gate.shared_gate:
            keys.append(layout.shared_gate_key(layer))
        if method == "mxfp4":
            keys += [layout.mxfp4_key(layer, proj, part) for proj in (0, 1) for part in ("blocks", "scales")]
            keys += [k for role, k in layout.fused_keys(layer).items() if role.endswith("_bias")]
        elif layout.fused is not None:
            keys += list(layout.fused_keys(layer).values())
        else:
            keys += [layout.expert_key(layer, e, p) for e in range(spec.num_experts) for p in PROJECTIONS]
        if spec.num_shared_experts:
            keys += [layout.shared_key(layer, p) for p in PROJECTIONS]
    return keys


def _matrix_keys(spec: ModelSpec, layout: Layout) -> list[str]:
    """The expert and shared-expert matrices (whose FP8 scales a checkpoint may hold)."""
    keys = [] if layout.fused is not None else [
        layout.expert_key(layer, e, p) for layer in spec.moe_layers for e in range(spec.num_experts) for p in PROJECTIONS]
    return keys + [layout.shared_key(layer, p) for layer in spec.moe_layers if spec.num_shared_experts
                   for p in PROJECTIONS]


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
        self.spec, self.quant = _read_config(root / CONFIG_FILE)
        scales = [self.quant.scale_key(k) for k in _matrix_keys(self.spec, self.layout)] \
            if self.quant.method == "fp8" else []
        self._files = key_files(root, _required_keys(self.spec, self.layout, self.quant.method), scales)
        self.spec = replace(self.spec, expert_dtype=self._expert_storage())
        self._check_shared_blocks()

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
            self._read(handles, layout.router_bias_key(layer), "bias") if gate.router_bias else None,
        )

    def experts(
        self, pairs: Sequence[tuple[int, int]], progress: Progress | None = None
    ) -> Iterator[tuple[tuple[int, int], ExpertWeights]]:
        """Yield `((layer, expert), ExpertWeights)` for `pairs`, in order (experts from
        `num_experts` on are shared-MLP pieces), as float32; reads nothing else."""
        return as_float32(self.stored_experts(pairs, progress))

    def stored_experts(
        self, pairs: Sequence[tuple[int, int]], progress: Progress | None = None
    ) -> Iterator[tuple[tuple[int, int], ExpertWeights]]:
        """`experts()` as stored: float32 / BF16 / FP16 tensors, FP8 matrices with their block
        scales, or MXFP4 (see `workers.hf_quant`)."""
        checked = check_pairs(self.spec, pairs)
        handles: dict[str, Any] = {}  # file name -> open safetensors handle, for this call only

        def read(layer: int, expert: int) -> ExpertWeights:
            if self.quant.method == "mxfp4":
                return replace(self._read_mxfp4(handles, layer, expert), biases=self._read_biases(handles, layer, expert))
            if self.layout.fused is not None:
                return self._read_fused(handles, layer, expert)
            keys = {p: self.layout.expert_key(layer, expert, p) for p in PROJECTIONS}
            return ExpertWeights(**{p: self._read_matrix(handles, key, p) for p, key in keys.items()})

        def read_shared(layer: int) -> ExpertWeights:
            keys = {p: self.layout.shared_key(layer, p) for p in PROJECTIONS}
            return ExpertWeights(**{p: self._read_matrix(handles, key, SHARED[p]) for p, key in keys.items()})

        return produce_experts(self.spec, checked, read, read_shared, progress)

    def dense_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor but the MoE blocks' (embeddings, attention, norms, dense MLP layers, LM
        head), by checkpoint key, as stored: what the router's dense side runs; FP8 matrices come
        dequantized to float32, without their `weight_scale_inv`. Reads no expert."""
        moe_prefixes = tuple(self.layout.block_prefix(layer) for layer in self.spec.moe_layers)
        files = {key: name for key, name in all_key_files(self.root).items() if not key.startswith(moe_prefixes)}
        handles: dict[str, Any] = {}
        tensors = {key: self._get(handles, key, name) for key, name in files.items()}
        for key in [k for k, t in tensors.items() if t.dtype in FP8_DTYPES]:
            scales = tensors.pop(self.quant.scale_key(key), None)
            if scales is None:
                raise CheckpointError(f"{self.root / files[key]}: tensor {self.quant.scale_key(key)!r} not found: FP8 "
                                      f"tensor {key!r} needs its scales")
            tensors.pop(key.removesuffix(".weight") + ".input_scale", None)  # static activation scales: not used
            try:
                tensors[key] = fp8_matrix(key, tensors[key], scales, self.quant).dequantize(torch.float32)
            except ValueError as exc:
                raise CheckpointError(f"{self.root / files[key]}: {exc}") from None
        return tensors

    def _part(self, handles: dict[str, Any], key: str, shape: tuple[int, ...] | None = None, name: str | None = None):
        """The safetensors slice of tensor `key` (in file `name`, default the one the index
        names; `handles` caches open files), its shape checked against `shape` from config.json
        if given; no data is read yet."""
        name = name or self._files[key]
        path = self.root / name
        if name not in handles:
            handles[name] = open_file(path, f"tensor {key!r}", safe_open)  # this module's: tests count the opens
        try:
            part = handles[name].get_slice(key)
            got = tuple(part.get_shape())
        except SafetensorError as exc:
            raise CheckpointError(f"{path}: cannot read tensor {key!r}: {exc}") from exc
        if shape is not None and got != shape:
            raise CheckpointError(f"{path}: tensor {key!r} has shape {list(got)}, expected {list(shape)} "
                                  f"from {CONFIG_FILE}")
        return part

    def _get(self, handles: dict[str, Any], key: str, name: str | None = None, shape: tuple[int, ...] | None = None,
             index=None) -> torch.Tensor:
        """Read tensor `key` (or only `tensor[index]`), checking its shape as `_part` does."""
        part, name = self._part(handles, key, shape, name), name or self._files[key]
        try:
            return handles[name].get_tensor(key) if index is None else part[index]
        except SafetensorError as exc:
            raise CheckpointError(f"{self.root / name}: cannot read tensor {key!r}: {exc}") from exc

    def _read(self, handles: dict[str, Any], key: str, kind: str) -> torch.Tensor:
        """Read one router tensor (`kind`: see `_expected_shape`) as float32, checking its shape."""
        tensor = self._get(handles, key, shape=_expected_shape(self.spec, kind))
        if not tensor.is_floating_point() or tensor.dtype.itemsize < 2:  # float8 needs its scales
            raise CheckpointError(f"{self.root / self._files[key]}: tensor {key!r} has dtype {tensor.dtype}, expected "
                                  f"a float of 16 or 32 bits (router tensors are not quantized)")
        return tensor.to(torch.float32)

    def _read_matrix(self, handles: dict[str, Any], key: str, kind: str) -> Matrix:
        """Read one expert matrix as stored (float64 becomes float32), checking its shape; an FP8
        one with its scales (`hf_quant.fp8_matrix`)."""
        tensor = self._get(handles, key, shape=_expected_shape(self.spec, kind))
        path = self.root / self._files[key]
        if tensor.dtype in FP8_DTYPES:
            scales = self.quant.scale_key(key)
            if self.quant.method != "fp8":
                raise CheckpointError(_needs_scales(path, key, tensor.dtype))
            if scales not in self._files:
                raise CheckpointError(f"{path}: tensor {scales!r} not found: FP8 tensor {key!r} needs its block scales")
            try:
                return fp8_matrix(key, tensor, self._get(handles, scales), self.quant)
            except ValueError as exc:
                raise CheckpointError(f"{self.root / self._files[scales]}: {exc}") from None
        if not tensor.is_floating_point() or tensor.dtype.itemsize < 2:
            raise CheckpointError(f"{path}: tensor {key!r} has dtype {tensor.dtype}, expected a float of 16 or 32 "
                                  f"bits, or float8 with quantization_config.quant_method 'fp8'")
        return tensor.to(torch.float32) if tensor.dtype == torch.float64 else tensor

    def _read_fused(self, handles: dict[str, Any], layer: int, expert: int) -> ExpertWeights:
        """Expert `expert` of `layer` cut from the layer's stacked tensors (`Layout.fused`): only
        its slice is read. Returns our w1, w3 `[F, H]` and w2 `[H, F]` (contiguous, as stored)
        and its biases where the family has them."""
        fused, keys = self.layout.fused, self.layout.fused_keys(layer)
        hidden, inter, experts = self.spec.hidden_size, self.spec.intermediate_size, self.spec.num_experts
        if fused.separate is not None:  # DBRX: [E*F, H] each, w2 stored as [F, H] per expert
            rows = slice(expert * inter, (expert + 1) * inter)
            w1, w3, w2t = (self._slice(handles, keys[r], (experts * inter, hidden), rows) for r in ("w1", "w3", "w2"))
            return ExpertWeights(w1=w1.contiguous(), w2=w2t.t().contiguous(), w3=w3.contiguous())
        gate_up_shape = (experts, hidden, 2 * inter) if fused.transposed else (experts, 2 * inter, hidden)
        down_shape = (experts, inter, hidden) if fused.transposed else (experts, hidden, inter)
        gate_up = self._slice(handles, keys["gate_up"], gate_up_shape, expert)
        down = self._slice(handles, keys["down"], down_shape, expert)
        if fused.transposed:
            gate_up, down = gate_up.t(), down.t()  # [2F, H], [H, F]
        w1, w3 = (gate_up[0::2], gate_up[1::2]) if fused.interleaved else (gate_up[:inter], gate_up[inter:])
        return ExpertWeights(w1=w1.contiguous(), w2=down.contiguous(), w3=w3.contiguous(),
                             biases=self._read_biases(handles, layer, expert))

    def _read_biases(self, handles: dict[str, Any], layer: int, expert: int):
        """(b1, b3, b2) float32 of one expert from the stacked bias tensors, or None."""
        fused = self.layout.fused
        if fused is None or fused.biases is None:
            return None
        keys, inter = self.layout.fused_keys(layer), self.spec.intermediate_size
        b13 = self._slice(handles, keys["gate_up_bias"], (self.spec.num_experts, 2 * inter), expert).float()
        b2 = self._slice(handles, keys["down_bias"], (self.spec.num_experts, self.spec.hidden_size), expert).float()
        b1, b3 = (b13[0::2], b13[1::2]) if fused.interleaved else (b13[:inter], b13[inter:])
        return b1.contiguous(), b3.contiguous(), b2.contiguous()

    def _slice(self, handles: dict[str, Any], key: str, shape: tuple[int, ...], index) -> torch.Tensor:
        """`tensor[index]` of stacked tensor `key` (its shape checked against `shape` from
        config.json), reading only that slice; a float of 16 or 32 bits (float64 -> float32)."""
        tensor = self._get(handles, key, shape=shape, index=index)
        if not tensor.is_floating_point() or tensor.dtype.itemsize < 2:
            raise CheckpointError(f"{self.root / self._files[key]}: tensor {key!r} has dtype {tensor.dtype}, expected "
                                  f"a float of 16 or 32 bits (stacked experts are served unquantized or, for gpt-oss, "
                                  f"as MXFP4)")
        return tensor.to(torch.float32) if tensor.dtype == torch.float64 else tensor

    def _read_mxfp4(self, handles: dict[str, Any], layer: int, expert: int) -> ExpertWeights:
        """Expert `expert` of `layer` from the layer's stacked MXFP4 tensors."""
        spec, layout = self.spec, self.layout
        hidden, inter = spec.hidden_size, spec.intermediate_size
        shapes = {(0, "blocks"): (2 * inter, hidden // 32, 16), (0, "scales"): (2 * inter, hidden // 32),
                  (1, "blocks"): (hidden, inter // 32, 16), (1, "scales"): (hidden, inter // 32)}
        parts = []
        for (proj, part), shape in shapes.items():
            key = layout.mxfp4_key(layer, proj, part)
            tensor = self._get(handles, key, shape=(spec.num_experts, *shape), index=expert)  # this expert's rows
            if tensor.dtype != torch.uint8:
                raise CheckpointError(f"{self.root / self._files[key]}: tensor {key!r} has dtype {tensor.dtype}, "
                                      f"expected uint8 (MXFP4 {part})")
            parts.append(tensor)
        return mxfp4_expert(*parts)

    def _expert_storage(self) -> str:
        """How the routed experts are stored (`ModelSpec.expert_dtype`), from the first one's header."""
        if self.quant.method == "mxfp4":
            return "mxfp4"
        layer = self.spec.moe_layers[0]
        if self.layout.fused is not None:
            key = next(iter(self.layout.fused_keys(layer).values()))
        else:
            key = self.layout.expert_key(layer, 0, "w1")
        dtype = header_dtype(self.root / self._files[key], key)
        path = self.root / self._files[key]
        if dtype not in STORAGE_OF or dtype == "U8":
            raise CheckpointError(f"{path}: tensor {key!r} has dtype {dtype}, expected a float of 16 or 32 bits, or "
                                  f"float8 with its scales")
        if STORAGE_OF[dtype] == "fp8" and self.quant.method != "fp8":
            raise CheckpointError(_needs_scales(path, key, torch.float8_e4m3fn if dtype == "F8_E4M3" else torch.float8_e5m2))
        return STORAGE_OF[dtype]

    def _check_shared_blocks(self) -> None:
        """FP8 shared experts are cut into pieces of `intermediate_size` with their scales: each
        piece must start at a block boundary (else CheckpointError naming the tensor and sizes)."""
        spec, block = self.spec, self.quant.block
        if self.quant.method != "fp8" or self.quant.strategy != "block" or spec.num_shared_experts < 2 or block is None:
            return  # a scale per row or per matrix cuts anywhere (`Fp8Blocks.rows` / `cols`)
        for p, axis in (("w1", 0), ("w2", 1)):
            key = self.layout.shared_key(spec.moe_layers[0], p)
            path = self.root / self._files[key]
            if spec.intermediate_size % block[axis] and header_dtype(path, key).startswith("F8"):
                raise CheckpointError(
                    f"{path}: FP8 tensor {key!r} is served as {spec.num_shared_experts} shared-expert pieces of "
                    f"{spec.intermediate_size} {('rows', 'columns')[axis]}, which do not start at its blocks of "
                    f"{block[axis]} (quantization_config.weight_block_size {list(block)}): not served; convert the "
                    f"shared experts to BF16")


def _needs_scales(path: Path, key: str, dtype: torch.dtype) -> str:
    return (f"{path}: tensor {key!r} has dtype {dtype}, an 8-bit float that needs its scales: {CONFIG_FILE} must say "
            f"quantization_config.quant_method 'fp8' (or 'compressed-tensors', float-quantized) and the checkpoint "
            f"hold its scales ({scale_key(key)!r}, or {key + '_scale'!r})")


def _read_config(path: Path) -> tuple[ModelSpec, QuantConfig]:
    """config.json -> (ModelSpec, its quantization); the MoE layers (and the layout family) as
    the config says."""
    if not path.is_file():
        raise CheckpointError(
            f"{path}: missing; a Hugging Face checkpoint directory needs {CONFIG_FILE}"
        )
    config = load_json(path)
    architectures = config.get("architectures")
    if architectures is not None and (
            not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures)):
        raise CheckpointError(f"{path}: key 'architectures' must be a list of names, got {architectures!r}")
    try:
        layout = layout_for(config)
        config = layout.flatten(config)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    experts_key = next((k for k in layout.num_experts_keys if config.get(k) is not None), layout.num_experts_keys[0])
    try:
        quantized = read_quant_config(config)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    if quantized.method == "mxfp4" and layout.mxfp4_experts is None:
        raise CheckpointError(f"{path}: key 'quantization_config.quant_method' is 'mxfp4', but {layout.family} "
                              f"checkpoints do not store their experts in MXFP4 (gpt-oss does); not served")
    if quantized.method == "fp8" and layout.fused is not None:
        raise CheckpointError(f"{path}: key 'quantization_config.quant_method' is 'fp8', but {layout.family} "
                              f"checkpoints stack a layer's experts, which are served unquantized only; convert to BF16")
    try:
        form = layout.expert_form(config)
    except ValueError as exc:
        act_key = "ffn_config.ffn_act_fn.name" if layout.family == "dbrx" else "hidden_act"
        raise CheckpointError(f"{path}: key {act_key!r} is {config.get('hidden_act')!r}: {exc}") from None
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
        spec = ModelSpec(moe_layers=moe_layers, gate=gate, shared_intermediate_size=shared, family=layout.family,
                         expert=form, **values)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return spec, quantized
