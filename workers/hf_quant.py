"""Quantized Hugging Face checkpoints: what `quantization_config` says, and the tensors behind it.

Served:
- `quant_method: fp8` (DeepSeek-V3/R1, Kimi K2, GLM-4.5-FP8, Qwen3-*-FP8): each quantized matrix
  `....weight` (float8_e4m3fn `[R, C]`) has `....weight_scale_inv` (float32 `[ceil(R/bm),
  ceil(C/bn)]`, `[bm, bn]` = `weight_block_size`; one scale for the whole matrix when the config
  gives no block size), as transformers' `finegrained_fp8` reads them. Only the tensors stored as
  float8 are quantized: the gates (and whatever `modules_to_not_convert` names) stay BF16/FP32.
  `activation_scheme` is not used: the workers dequantize the weights and keep activations in
  their compute dtype.
- `quant_method: mxfp4` (gpt-oss): a layer's experts stacked, `experts.{proj}_blocks` uint8
  `[E, R, C/32, 16]` and `experts.{proj}_scales` uint8 `[E, R, C/32]`, for a family layout that
  declares them (`Layout.mxfp4_experts`; gate_up rows interleaved: gate rows even, up rows odd).

Not served (refused naming the key): other methods, among them compressed-tensors, which none of
the families we serve ships in its official releases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from workers.quant import FP8_DTYPES, Fp8Blocks, Mxfp4Blocks
from workers.weights import ExpertWeights

QUANT_METHODS = ("fp8", "mxfp4")
SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
                     "U8": 1, "I8": 1, "I16": 2, "I32": 4, "I64": 8, "BOOL": 1}
STORAGE_OF = {"F64": "float32", "F32": "float32", "BF16": "bfloat16", "F16": "float16", "F8_E4M3": "fp8",
              "F8_E5M2": "fp8", "U8": "mxfp4"}  # a safetensors dtype -> how a worker holds the matrix


@dataclass(frozen=True)
class QuantConfig:
    """method: None (not quantized), "fp8" or "mxfp4"; block: FP8's `weight_block_size` `[bm, bn]`
    (None: one scale per matrix)."""

    method: str | None = None
    block: tuple[int, int] | None = None


def read_quant_config(config: dict[str, Any]) -> QuantConfig:
    """`config.json`'s `quantization_config` -> QuantConfig; ValueError naming the key."""
    q = config.get("quantization_config")
    if not q:
        return QuantConfig()
    if not isinstance(q, dict):
        raise ValueError(f"key 'quantization_config' must be an object, got {q!r}")
    method = q.get("quant_method")
    if method not in QUANT_METHODS:
        raise ValueError(
            f"key 'quantization_config.quant_method' is {method!r}, which is not served; served: 'fp8' (block "
            f"scales, as DeepSeek-V3 ships) and 'mxfp4' (gpt-oss experts); convert the checkpoint to BF16 otherwise")
    if method != "fp8":
        return QuantConfig(method)
    block = q.get("weight_block_size")
    if block is None:
        return QuantConfig(method)
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block)):
        raise ValueError(f"key 'quantization_config.weight_block_size' must be two positive integers [rows, columns], "
                         f"got {block!r}")
    return QuantConfig(method, (block[0], block[1]))


def scale_key(key: str) -> str:
    """The scales of FP8 matrix `key`: `....weight` -> `....weight_scale_inv`."""
    return key.removesuffix(".weight") + ".weight_scale_inv" if key.endswith(".weight") else key + "_scale_inv"


def fp8_matrix(key: str, data: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None) -> Fp8Blocks:
    """An FP8 matrix and its scales as read from the checkpoint; ValueError naming the scale
    tensor when its shape or dtype does not fit."""
    rows, cols = data.shape
    block = block or (rows, cols)
    want = (-(-rows // block[0]), -(-cols // block[1]))
    if not scale.is_floating_point() or scale.dtype in FP8_DTYPES:
        raise ValueError(f"tensor {scale_key(key)!r} has dtype {scale.dtype}; the scales of FP8 tensor {key!r} must be "
                         f"float32, bfloat16 or float8_e8m0fnu")
    if tuple(scale.shape) != want and not (block == (rows, cols) and scale.numel() == 1):
        raise ValueError(f"tensor {scale_key(key)!r} has shape {list(scale.shape)}, expected {list(want)}: FP8 tensor "
                         f"{key!r} {[rows, cols]} in blocks of {list(block)} (quantization_config.weight_block_size)")
    return Fp8Blocks(data.contiguous(), scale.to(torch.float32).reshape(want).contiguous(), block)


def mxfp4_expert(gate_up_blocks: torch.Tensor, gate_up_scales: torch.Tensor, down_blocks: torch.Tensor,
                 down_scales: torch.Tensor) -> ExpertWeights:
    """One expert's slices of gpt-oss's stacked MXFP4 tensors (gate_up `[2F, H/32, 16]` and
    `[2F, H/32]`, gate rows even and up rows odd; down `[H, F/32, 16]` and `[H, F/32]`) as our
    w1, w3 `[F, H]` and w2 `[H, F]`, still packed (moving whole rows of a packed matrix is exact)."""
    w1 = Mxfp4Blocks(gate_up_blocks[0::2].contiguous(), gate_up_scales[0::2].contiguous())
    w3 = Mxfp4Blocks(gate_up_blocks[1::2].contiguous(), gate_up_scales[1::2].contiguous())
    return ExpertWeights(w1=w1, w2=Mxfp4Blocks(down_blocks.contiguous(), down_scales.contiguous()), w3=w3)


def held_bytes(dtype: str, shape: tuple[int, int], block: tuple[int, int] | None) -> int:
    """Bytes a worker holds for one matrix `shape` stored as safetensors `dtype` (FP8: one byte a
    value plus float32 scales per `block`; float64 is held as float32)."""
    rows, cols = shape
    if dtype in ("F8_E4M3", "F8_E5M2"):
        bm, bn = block or (rows, cols)
        return rows * cols + 4 * (-(-rows // bm)) * (-(-cols // bn))
    return rows * cols * min(SAFETENSORS_BYTES[dtype], 4)
