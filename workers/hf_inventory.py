"""What a checkpoint will take in memory, from config.json and the safetensors headers alone (no
tensor data is read): the bytes a worker holds for one replica of each logical expert, as
`ExpertWorker` holds it (the stored dtype; FP8 with float32 block scales; MXFP4 packed; biases
float32; shared-MLP pieces zero-padded to the expert size), and the dense part the router runs.
Layouts that stack a layer's experts in one tensor (`Layout.fused`, MXFP4) give each expert an
equal share of it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from workers.hf_checkpoint import HFCheckpoint
from workers.hf_files import all_key_files, open_file
from workers.hf_quant import SAFETENSORS_BYTES, held_bytes
from workers.weights import PROJECTIONS


@dataclass(frozen=True)
class CheckpointMemory:
    """replica_bytes: `[num_logical_experts]` bytes of one replica of each logical expert (in
    placement order: layer by layer, routed then shared pieces); dense_params: parameters of the
    dense part (scales not counted); dense_disk_bytes: what they take on disk."""

    replica_bytes: list[int]
    dense_params: int
    dense_disk_bytes: int


def checkpoint_memory(ckpt: HFCheckpoint) -> CheckpointMemory:
    """Read the headers of `ckpt`'s files (each opened once) and size every replica and the
    dense part."""
    headers = _Headers(ckpt)
    spec, layout, quant = ckpt.spec, ckpt.layout, ckpt.quant
    replicas: list[int] = []
    for layer in spec.moe_layers:
        if ckpt.quant.method == "mxfp4" or layout.fused is not None:
            replicas += [_stacked_bytes(ckpt, headers, layer) // spec.num_experts] * spec.num_experts
        else:
            for expert in range(spec.num_experts):
                keys = [layout.expert_key(layer, expert, p) for p in PROJECTIONS]
                replicas.append(sum(held_bytes(headers.dtype(k), headers.shape(k), quant) for k in keys))
        if spec.num_shared_experts:
            inter, hidden = spec.intermediate_size, spec.hidden_size
            piece = {"w1": (inter, hidden), "w2": (hidden, inter), "w3": (inter, hidden)}
            dtypes = {p: headers.dtype(layout.shared_key(layer, p)) for p in PROJECTIONS}
            replicas += [sum(held_bytes(dtypes[p], piece[p], quant) for p in PROJECTIONS)] * spec.num_shared_experts
    moe_prefixes = tuple(layout.block_prefix(layer) for layer in spec.moe_layers)
    dense = [key for key in headers.files if not key.startswith(moe_prefixes)]
    scales = {quant.scale_key(key) for key in dense} | {key for key in dense if key.endswith(".input_scale")}
    params = sum(math.prod(headers.shape(key)) for key in dense if key not in scales)
    return CheckpointMemory(replicas, params, sum(headers.nbytes(key) for key in dense))


def _stacked_bytes(ckpt: HFCheckpoint, headers: _Headers, layer: int) -> int:
    """Bytes a worker holds for all of `layer`'s stacked experts: MXFP4 blocks and scales as
    stored, float tensors at most 4 bytes a value, biases as float32."""
    layout, total = ckpt.layout, 0
    if ckpt.quant.method == "mxfp4":
        total += sum(headers.nbytes(layout.mxfp4_key(layer, proj, part)) for proj in (0, 1)
                     for part in ("blocks", "scales"))
    if layout.fused is not None:
        for role, key in layout.fused_keys(layer).items():
            if role.endswith("_bias"):
                total += 4 * math.prod(headers.shape(key))
            elif ckpt.quant.method != "mxfp4":
                total += math.prod(headers.shape(key)) * min(SAFETENSORS_BYTES[headers.dtype(key)], 4)
    return total


class _Headers:
    """Dtype and shape of any tensor of the checkpoint, from its file's header."""

    def __init__(self, ckpt: HFCheckpoint):
        self.root = ckpt.root
        self.files = all_key_files(ckpt.root)
        self._handles: dict[str, Any] = {}

    def _slice(self, key: str):
        name = self.files[key]
        if name not in self._handles:
            self._handles[name] = open_file(self.root / name, f"tensor {key!r}")
        return self._handles[name].get_slice(key)

    def dtype(self, key: str) -> str:
        return self._slice(key).get_dtype()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slice(key).get_shape())

    def nbytes(self, key: str) -> int:
        return math.prod(self.shape(key)) * SAFETENSORS_BYTES[self.dtype(key)]
