"""Quantized Hugging Face checkpoints: what `quantization_config` says, and the tensors behind it.

Served:
- `quant_method: fp8` (DeepSeek-V3/R1, Kimi K2, Qwen3-*-FP8): each quantized matrix
  `....weight` (float8_e4m3fn `[R, C]`) has `....weight_scale_inv` (float32 `[ceil(R/bm),
  ceil(C/bn)]`, `[bm, bn]` = `weight_block_size`; one scale for the whole matrix when the config
  gives no block size), as transformers' `finegrained_fp8` reads them. Only the tensors stored as
  float8 are quantized: the gates (and whatever `modules_to_not_convert` names) stay BF16/FP32.
  `activation_scheme` is not used: the workers dequantize the weights and keep activations in
  their compute dtype.
- `quant_method: compressed-tensors` with `format: float-quantized` (GLM-4.5-FP8 and the FP8
  checkpoints `llm-compressor` writes): every `config_groups` entry's `weights` are 8-bit floats
  with one `strategy`: `channel` (`....weight_scale` `[R, 1]`), `tensor` (`[1]`) or `block`
  (`block_structure` `[bm, bn]`, scales `[ceil(R/bm), ceil(C/bn)]`); the weight is the stored
  value times its scale, as with `fp8`. `input_activations` (static `....input_scale` or
  dynamic) are not used, for the same reason as `activation_scheme`.
- `quant_method: mxfp4` (gpt-oss): a layer's experts stacked, `experts.{proj}_blocks` uint8
  `[E, R, C/32, 16]` and `experts.{proj}_scales` uint8 `[E, R, C/32]`, for a family layout that
  declares them (`Layout.mxfp4_experts`; gate_up rows interleaved: gate rows even, up rows odd).

Not served (refused naming the key): other methods, and compressed-tensors formats other than
8-bit floats (integer, packed 4-bit, NVFP4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from workers.quant import FP8_DTYPES, Fp8Blocks, Mxfp4Blocks
from workers.weights import ExpertWeights

QUANT_METHODS = ("fp8", "compressed-tensors", "mxfp4")
FP8_STRATEGIES = ("block", "channel", "tensor")  # compressed-tensors `weights.strategy` values served
SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
                     "U8": 1, "I8": 1, "I16": 2, "I32": 4, "I64": 8, "BOOL": 1}
STORAGE_OF = {"F64": "float32", "F32": "float32", "BF16": "bfloat16", "F16": "float16", "F8_E4M3": "fp8",
              "F8_E5M2": "fp8", "U8": "mxfp4"}  # a safetensors dtype -> how a worker holds the matrix


@dataclass(frozen=True)
class QuantConfig:
    """method: None (not quantized), "fp8" (8-bit float matrices with scales, from either `fp8` or
    compressed-tensors) or "mxfp4"; strategy: how FP8 scales tile a matrix ("block", "channel":
    one per row, "tensor": one per matrix); block: `[bm, bn]` for "block" (None: one scale per
    matrix); scale_suffix: the scale tensor's name after `....weight`."""

    method: str | None = None
    block: tuple[int, int] | None = None
    strategy: str = "block"
    scale_suffix: str = "_scale_inv"

    def block_for(self, shape: tuple[int, int]) -> tuple[int, int]:
        """The `[bm, bn]` one scale covers in a matrix of `shape` `[R, C]`."""
        rows, cols = shape
        if self.strategy == "channel":
            return 1, cols
        return self.block if self.strategy == "block" and self.block is not None else (rows, cols)

    @property
    def scheme_key(self) -> str:
        """The `quantization_config` key that sets how scales tile a matrix."""
        return "weight_block_size" if self.scale_suffix == "_scale_inv" else "config_groups.*.weights.strategy"

    def scale_key(self, key: str) -> str:
        """The scales of FP8 matrix `key`: `....weight` -> `....weight_scale_inv` (fp8) or
        `....weight_scale` (compressed-tensors)."""
        return key + self.scale_suffix


FP8 = QuantConfig("fp8")  # DeepSeek-V3's names, one scale per matrix unless a block is given


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
            f"scales, as DeepSeek-V3 ships), 'compressed-tensors' with 8-bit float weights (GLM-4.5-FP8) and 'mxfp4' "
            f"(gpt-oss experts); convert the checkpoint to BF16 otherwise")
    if method == "mxfp4":
        return QuantConfig(method)
    if method == "compressed-tensors":
        return _compressed_tensors(q)
    block = q.get("weight_block_size")
    return QuantConfig(method) if block is None else QuantConfig(method, _block(block, "weight_block_size"))


def _block(block: Any, key: str) -> tuple[int, int]:
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block)):
        raise ValueError(f"key 'quantization_config.{key}' must be two positive integers [rows, columns], "
                         f"got {block!r}")
    return block[0], block[1]


def _compressed_tensors(q: dict[str, Any]) -> QuantConfig:
    """compressed-tensors' `float-quantized` FP8: every group's weights 8-bit floats, one strategy."""
    if q.get("format") != "float-quantized":
        raise ValueError(f"key 'quantization_config.format' is {q.get('format')!r}: of compressed-tensors checkpoints "
                         f"only 'float-quantized' (8-bit float weights) is served")
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ValueError("key 'quantization_config.config_groups' must name at least one group with its 'weights'")
    schemes = set()
    for name, group in groups.items():
        weights = group.get("weights") if isinstance(group, dict) else None
        where = f"quantization_config.config_groups.{name}.weights"
        if not isinstance(weights, dict) or weights.get("type") != "float" or weights.get("num_bits") != 8:
            raise ValueError(f"key {where!r} must describe 8-bit float weights (type 'float', num_bits 8), "
                             f"got {weights!r}")
        strategy = weights.get("strategy")
        if strategy not in FP8_STRATEGIES:
            raise ValueError(f"key '{where}.strategy' is {strategy!r}; served: {', '.join(FP8_STRATEGIES)}")
        block = _block(weights.get("block_structure"), f"config_groups.{name}.weights.block_structure") \
            if strategy == "block" else None
        schemes.add((strategy, block))
    if len(schemes) > 1:
        raise ValueError(f"key 'quantization_config.config_groups' mixes weight schemes {sorted(map(str, schemes))}: "
                         f"one strategy for every group is served")
    (strategy, block), = schemes
    return QuantConfig("fp8", block, strategy, "_scale")


def scale_key(key: str, quant: QuantConfig = FP8) -> str:
    """The scales of FP8 matrix `key` under `quant` (default DeepSeek-V3's `....weight_scale_inv`)."""
    return quant.scale_key(key)


def fp8_matrix(key: str, data: torch.Tensor, scale: torch.Tensor, quant: QuantConfig) -> Fp8Blocks:
    """An FP8 matrix and its scales as read from the checkpoint; ValueError naming the scale
    tensor when its shape or dtype does not fit."""
    rows, cols = data.shape
    block = quant.block_for((rows, cols))
    want = (-(-rows // block[0]), -(-cols // block[1]))
    if not scale.is_floating_point() or scale.dtype in FP8_DTYPES:
        raise ValueError(f"tensor {quant.scale_key(key)!r} has dtype {scale.dtype}; the scales of FP8 tensor {key!r} "
                         f"must be float32, bfloat16 or float8_e8m0fnu")
    if tuple(scale.shape) != want and not (want == (1, 1) and scale.numel() == 1):
        tiling = f"in blocks of {list(block)}" if quant.strategy == "block" else f"one scale per {quant.strategy}"
        raise ValueError(f"tensor {quant.scale_key(key)!r} has shape {list(scale.shape)}, expected {list(want)}: FP8 "
                         f"tensor {key!r} {[rows, cols]} {tiling} (quantization_config.{quant.scheme_key})")
    return Fp8Blocks(data.contiguous(), scale.to(torch.float32).reshape(want).contiguous(), block)


def mxfp4_expert(gate_up_blocks: torch.Tensor, gate_up_scales: torch.Tensor, down_blocks: torch.Tensor,
                 down_scales: torch.Tensor) -> ExpertWeights:
    """One expert's slices of gpt-oss's stacked MXFP4 tensors (gate_up `[2F, H/32, 16]` and
    `[2F, H/32]`, gate rows even and up rows odd; down `[H, F/32, 16]` and `[H, F/32]`) as our
    w1, w3 `[F, H]` and w2 `[H, F]`, still packed (moving whole rows of a packed matrix is exact)."""
    w1 = Mxfp4Blocks(gate_up_blocks[0::2].contiguous(), gate_up_scales[0::2].contiguous())
    w3 = Mxfp4Blocks(gate_up_blocks[1::2].contiguous(), gate_up_scales[1::2].contiguous())
    return ExpertWeights(w1=w1, w2=Mxfp4Blocks(down_blocks.contiguous(), down_scales.contiguous()), w3=w3)


def held_bytes(dtype: str, shape: tuple[int, int], quant: QuantConfig = FP8) -> int:
    """Bytes a worker holds for one matrix `shape` stored as safetensors `dtype` (FP8: one byte a
    value plus a float32 scale per block of `quant`; float64 is held as float32)."""
    rows, cols = shape
    if dtype in ("F8_E4M3", "F8_E5M2"):
        bm, bn = quant.block_for((rows, cols))
        return rows * cols + 4 * (-(-rows // bm)) * (-(-cols // bn))
    return rows * cols * min(SAFETENSORS_BYTES[dtype], 4)
