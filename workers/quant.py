"""Compact expert matrices: held as the checkpoint stores them, dequantized when an expert runs.

A `Matrix` is one of:
- a plain tensor, float32, bfloat16 or float16 `[R, C]`;
- `Fp8Blocks` (`quantization_config.quant_method: fp8`, DeepSeek-V3 / Qwen3-FP8, transformers'
  `integrations/finegrained_fp8.py`): `data` float8_e4m3fn (or e5m2) `[R, C]` and `scale_inv`
  float32 `[ceil(R / bm), ceil(C / bn)]` for blocks of `[bm, bn]`; the weight is
  `w[r, c] = data[r, c] * scale_inv[r // bm, c // bn]` (a partial last block uses its block's
  scale, as `FP8Linear` and `_dequantize_fp8_weight` do);
- `Mxfp4Blocks` (`quant_method: mxfp4`, gpt-oss, transformers' `integrations/mxfp4.py`):
  `blocks` uint8 `[R, C / 32, 16]`, two E2M1 4-bit values a byte (low nibble first), and
  `scales` uint8 `[R, C / 32]` (E8M0: the group of 32 is multiplied by `2 ** (s - 127)`).

Everything here is pure tensor code: no checkpoint files (`workers.hf_checkpoint`), no actors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
PLAIN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
MXFP4_GROUP = 32  # values per E8M0 scale
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_E4M3_SHIFT = 2.0**120  # an e4m3 byte's bits placed in a float32 read as value * 2**-120 (see _fp8_values)
_E4M3_MASK = 0x87F00000 - 2**32  # float32's sign bit and the 7 bits below its top 4, as an int32


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, eq=False)
class Fp8Blocks:
    """An FP8 matrix with one float32 scale per `block` `[bm, bn]`: data `[R, C]` float8,
    scale_inv `[ceil(R/bm), ceil(C/bn)]` float32."""

    data: torch.Tensor
    scale_inv: torch.Tensor
    block: tuple[int, int]

    def __post_init__(self) -> None:
        if self.data.dtype not in FP8_DTYPES or self.data.dim() != 2:
            raise ValueError(f"FP8 data must be a 2-D float8 tensor, got {self.data.dtype} {list(self.data.shape)}")
        bm, bn = self.block
        if not all(isinstance(b, int) and b >= 1 for b in (bm, bn)):
            raise ValueError(f"FP8 block must be two positive integers, got {self.block!r}")
        want = expected_scale_shape(tuple(self.data.shape), self.block)
        if tuple(self.scale_inv.shape) != want or self.scale_inv.dtype != torch.float32:
            raise ValueError(f"FP8 scales must be float32 {list(want)} for data {list(self.data.shape)} in blocks of "
                             f"{list(self.block)}, got {self.scale_inv.dtype} {list(self.scale_inv.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.data.shape)  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        return _nbytes(self.data) + _nbytes(self.scale_inv)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.data, self.scale_inv

    def to(self, device: torch.device | str) -> Fp8Blocks:
        return Fp8Blocks(_owned(self.data, device), _owned(self.scale_inv, device), self.block)

    def dequantize(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """`[R, C]` in `dtype` (written into `out` if given): each value times its block's scale,
        computed in float32 and rounded once to `dtype`."""
        rows, cols = self.shape
        bm, bn = self.block
        values, scale = _fp8_values(self.data, self.scale_inv)  # float32 [R, C], float32 [Rb, Cb]
        scale = scale.repeat_interleave(bm, dim=0)[:rows]  # [R, Cb]: one scale row per weight row
        if out is None:  # the product is rounded to `dtype` as it is written (one pass, no float32 copy)
            out = values if dtype == torch.float32 else torch.empty(rows, cols, dtype=dtype, device=values.device)
        full = cols // bn
        if full:
            torch.mul(values[:, : full * bn].unflatten(1, (full, bn)), scale[:, :full, None],
                      out=out[:, : full * bn].unflatten(1, (full, bn)))
        if cols % bn:
            torch.mul(values[:, full * bn:], scale[:, full:], out=out[:, full * bn:])
        return out

    def rows(self, lo: int, hi: int, size: int) -> Fp8Blocks:
        """Rows `lo:hi`, zero-padded to `size` rows; `lo` must start a block, unless one block
        spans every row (a scale per matrix or per column block): then any rows keep it."""
        bm = self.block[0]
        if self.scale_inv.shape[0] == 1:
            return Fp8Blocks(_pad_rows(self.data[lo:hi], size), self.scale_inv.clone(), (max(size, 1), self.block[1]))
        if lo % bm:
            raise ValueError(f"rows {lo}:{hi} do not start at a block boundary (blocks of {bm} rows)")
        data = _pad_rows(self.data[lo:hi], size)
        scale = _pad_rows(self.scale_inv[lo // bm: _cdiv(hi, bm)], _cdiv(size, bm), fill=1.0)
        return Fp8Blocks(data, scale, self.block)

    def cols(self, lo: int, hi: int, size: int) -> Fp8Blocks:
        """Columns `lo:hi`, zero-padded to `size` columns; `lo` must start a block, unless one
        block spans every column (a scale per row or per matrix): then any columns keep it."""
        bn = self.block[1]
        if self.scale_inv.shape[1] == 1:
            data = _pad_rows(self.data[:, lo:hi].t(), size).t().contiguous()
            return Fp8Blocks(data, self.scale_inv.clone(), (self.block[0], max(size, 1)))
        if lo % bn:
            raise ValueError(f"columns {lo}:{hi} do not start at a block boundary (blocks of {bn} columns)")
        data = _pad_rows(self.data[:, lo:hi].t(), size).t().contiguous()
        scale = _pad_rows(self.scale_inv[:, lo // bn: _cdiv(hi, bn)].t(), _cdiv(size, bn), fill=1.0).t().contiguous()
        return Fp8Blocks(data, scale, self.block)


@dataclass(frozen=True, eq=False)
class Mxfp4Blocks:
    """An MXFP4 matrix `[R, C]`: blocks uint8 `[R, C/32, 16]`, scales uint8 (E8M0) `[R, C/32]`."""

    blocks: torch.Tensor
    scales: torch.Tensor

    def __post_init__(self) -> None:
        b, s = self.blocks, self.scales
        if b.dtype != torch.uint8 or b.dim() != 3 or b.shape[2] != MXFP4_GROUP // 2:
            raise ValueError(f"MXFP4 blocks must be uint8 [R, C/32, 16], got {b.dtype} {list(b.shape)}")
        if s.dtype != torch.uint8 or tuple(s.shape) != tuple(b.shape[:2]):
            raise ValueError(f"MXFP4 scales must be uint8 {list(b.shape[:2])} (one per 32 values), got "
                             f"{s.dtype} {list(s.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.blocks.shape[0], self.blocks.shape[1] * MXFP4_GROUP

    @property
    def nbytes(self) -> int:
        return _nbytes(self.blocks) + _nbytes(self.scales)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.blocks, self.scales

    def to(self, device: torch.device | str) -> Mxfp4Blocks:
        return Mxfp4Blocks(_owned(self.blocks, device), _owned(self.scales, device))

    def dequantize(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """`[R, C]` in `dtype`: each E2M1 value times `2 ** (scale - 127)` (exact in float32)."""
        rows, groups, _ = self.blocks.shape
        pairs = _byte_pairs(self.blocks.device)  # [256, 2]: a byte's (low, high) E2M1 values
        values = torch.index_select(pairs, 0, self.blocks.reshape(-1).to(torch.int32))
        values = values.view(rows, groups, MXFP4_GROUP)
        scale = torch.ldexp(torch.ones(rows, groups, device=self.blocks.device), self.scales.to(torch.int32) - 127)
        values.mul_(scale.unsqueeze(-1))  # a power of two: exact
        return _cast(values.view(rows, groups * MXFP4_GROUP), dtype, out)

    def rows(self, lo: int, hi: int, size: int) -> Mxfp4Blocks:
        return Mxfp4Blocks(_pad_rows(self.blocks[lo:hi], size), _pad_rows(self.scales[lo:hi], size, fill=127))

    def cols(self, lo: int, hi: int, size: int) -> Mxfp4Blocks:
        if lo % MXFP4_GROUP or size % MXFP4_GROUP or (hi - lo) % MXFP4_GROUP:
            raise ValueError(f"columns {lo}:{hi} (padded to {size}) are not whole groups of {MXFP4_GROUP} values")
        g_lo, g_hi, g_size = lo // MXFP4_GROUP, hi // MXFP4_GROUP, size // MXFP4_GROUP
        blocks = _pad_rows(self.blocks[:, g_lo:g_hi].transpose(0, 1), g_size).transpose(0, 1).contiguous()
        scales = _pad_rows(self.scales[:, g_lo:g_hi].t(), g_size, fill=127).t().contiguous()
        return Mxfp4Blocks(blocks, scales)


Quantized = Fp8Blocks | Mxfp4Blocks
Matrix = torch.Tensor | Fp8Blocks | Mxfp4Blocks


def expected_scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """The `weight_scale_inv` shape of an FP8 matrix `[R, C]` in blocks `[bm, bn]`."""
    return _cdiv(shape[0], block[0]), _cdiv(shape[1], block[1])


def storage_name(matrix: Matrix) -> str:
    """"float32", "bfloat16", "float16", "fp8" or "mxfp4"."""
    if isinstance(matrix, Fp8Blocks):
        return "fp8"
    if isinstance(matrix, Mxfp4Blocks):
        return "mxfp4"
    return str(matrix.dtype).removeprefix("torch.")


def nbytes(matrix: Matrix) -> int:
    """Bytes of the matrix's elements (and scales)."""
    return _nbytes(matrix) if isinstance(matrix, torch.Tensor) else matrix.nbytes


def tensors_of(matrix: Matrix) -> tuple[torch.Tensor, ...]:
    """The tensors that hold the matrix (data and scales for the quantized ones)."""
    return (matrix,) if isinstance(matrix, torch.Tensor) else matrix.tensors()


def to_device(matrix: Matrix, device: torch.device | str) -> Matrix:
    """The matrix on `device`, its tensors contiguous and owning their memory (a slice of a
    layer's stacked experts is copied out, so it does not keep the whole stack alive)."""
    return _owned(matrix, device) if isinstance(matrix, torch.Tensor) else matrix.to(device)


def dequantize(matrix: Matrix, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The matrix as a plain `[R, C]` tensor of `dtype` (a plain tensor of that dtype is
    returned as it is, unless `out` is given)."""
    if isinstance(matrix, torch.Tensor):
        if out is not None:
            return out.copy_(matrix)
        return matrix if matrix.dtype == dtype else matrix.to(dtype)
    return matrix.dequantize(dtype, out)


def slice_rows(matrix: Matrix, lo: int, hi: int, size: int) -> Matrix:
    """Rows `lo:hi` zero-padded to `size` rows (a piece of a shared-expert MLP's w1 / w3)."""
    if isinstance(matrix, torch.Tensor):
        return _pad_rows(matrix[lo:hi], size)
    return matrix.rows(lo, hi, size)


def slice_cols(matrix: Matrix, lo: int, hi: int, size: int) -> Matrix:
    """Columns `lo:hi` zero-padded to `size` columns (a piece of a shared-expert MLP's w2)."""
    if isinstance(matrix, torch.Tensor):
        return torch.nn.functional.pad(matrix[:, lo:hi], (0, size - (hi - lo))).contiguous()
    return matrix.cols(lo, hi, size)


# ---- between workers: numpy arrays through Ray's object store (numpy has no bfloat16 or float8) --

def to_wire(matrix: Matrix) -> np.ndarray | dict:
    """A float32 / float16 matrix as its numpy array; anything else as `{"format", parts...}`
    with each tensor's raw bytes (uint8) and its dtype and shape, for `from_wire`."""
    if isinstance(matrix, torch.Tensor) and matrix.dtype in (torch.float32, torch.float16):
        return matrix.cpu().numpy()
    return {"format": storage_name(matrix), "block": list(getattr(matrix, "block", ())),
            "parts": [_raw(t) for t in tensors_of(matrix)]}


def from_wire(value: np.ndarray | dict) -> Matrix:
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    parts = [_unraw(p) for p in value["parts"]]
    if value["format"] == "fp8":
        return Fp8Blocks(parts[0], parts[1], tuple(value["block"]))  # type: ignore[arg-type]
    if value["format"] == "mxfp4":
        return Mxfp4Blocks(parts[0], parts[1])
    return parts[0]


def _raw(t: torch.Tensor) -> dict:
    t = t.detach().cpu().contiguous()
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
            "bytes": t.reshape(-1).view(torch.uint8).numpy()}


def _unraw(part: dict) -> torch.Tensor:
    dtype = getattr(torch, part["dtype"])
    return torch.from_numpy(np.ascontiguousarray(part["bytes"])).view(dtype).reshape(part["shape"])


# ---- quantizers: FP8 blocks as transformers' `Fp8Quantize` writes them; MXFP4 by nearest value ----

def quantize_fp8(weight: torch.Tensor, block: tuple[int, int]) -> Fp8Blocks:
    """`weight` `[R, C]` -> float8_e4m3fn with per-block scales: each block's largest magnitude
    maps to 448 (`scale_inv = amax / 448`, 1 for an all-zero block); partial last blocks allowed."""
    rows, cols = weight.shape
    bm, bn = block
    rb, cb = expected_scale_shape((rows, cols), block)
    padded = torch.zeros(rb * bm, cb * bn, dtype=torch.float32)
    padded[:rows, :cols] = weight.float()
    tiles = padded.view(rb, bm, cb, bn)
    amax = tiles.abs().amax(dim=(1, 3))
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    data = (tiles / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return Fp8Blocks(data.view(rb * bm, cb * bn)[:rows, :cols].contiguous(), scale_inv.contiguous(), (bm, bn))


def quantize_mxfp4(weight: torch.Tensor) -> Mxfp4Blocks:
    """`weight` `[R, C]` (C a multiple of 32) -> MXFP4: per group of 32 a power-of-two scale that
    brings the largest magnitude to at most 6, each value rounded to the nearest E2M1 value."""
    rows, cols = weight.shape
    if cols % MXFP4_GROUP:
        raise ValueError(f"MXFP4 needs whole groups of {MXFP4_GROUP} columns, got {cols}")
    groups = weight.float().reshape(rows, cols // MXFP4_GROUP, MXFP4_GROUP)
    amax = groups.abs().amax(dim=-1).clamp(min=2.0**-126)
    exponent = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127).to(torch.int32)
    scaled = torch.ldexp(groups, -exponent.unsqueeze(-1))
    magnitudes = torch.tensor(FP4_VALUES[:8])
    nearest = (scaled.abs().unsqueeze(-1) - magnitudes).abs().argmin(dim=-1)  # 0..7
    codes = (nearest + 8 * (scaled < 0)).to(torch.uint8)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return Mxfp4Blocks(packed.contiguous(), (exponent + 127).to(torch.uint8).contiguous())


# ---- helpers ----------------------------------------------------------------------------------

def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _owned(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`t` contiguous on `device`, copied if it is a view of a larger storage."""
    t = t.contiguous()
    if t.untyped_storage().nbytes() > _nbytes(t):
        t = t.clone()
    return t.to(device)


def _cast(values: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    if out is not None:
        return out.copy_(values)
    return values if dtype == torch.float32 else values.to(dtype)


def _pad_rows(t: torch.Tensor, size: int, fill: float = 0) -> torch.Tensor:
    """A new tensor: `t` with rows appended (filled with `fill`) up to `size` rows (never a view,
    so a piece does not keep the whole matrix it was cut from alive)."""
    if t.shape[0] == size:
        return t.clone(memory_format=torch.contiguous_format)
    pad = torch.full((size - t.shape[0], *t.shape[1:]), fill, dtype=t.dtype, device=t.device)
    return torch.cat([t, pad]).contiguous()


def _byte_pairs(device: torch.device) -> torch.Tensor:
    """`[256, 2]` float32: byte `b` holds E2M1 values `FP4_VALUES[b & 15]` then `FP4_VALUES[b >> 4]`."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=device)
    return torch.stack([lut.repeat(16), lut.repeat_interleave(16)], dim=1)


def _fp8_values(data: torch.Tensor, scale_inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 `[R, C]`, float32 scales) whose product is the dequantized weight.

    float8_e4m3fn goes through its bits (torch's own conversion runs ~5x slower on CPU): sign
    and the 7 exponent+mantissa bits placed at float32's sign and top bits read as the exact
    value times 2**-120 (subnormals included), and the 2**120 goes into the scales; so each
    product is rounded once, exactly as `data.float() * scale`. The byte is read as a signed
    int8, so its sign bit, extended, lands on float32's: one shift and one mask. Scales of 2**8
    or more (which would overflow) take torch's conversion."""
    if data.dtype == torch.float8_e4m3fn and float(scale_inv.abs().max()) < 2.0**8:
        bits = data.view(torch.int8).to(torch.int32).bitwise_left_shift_(20).bitwise_and_(_E4M3_MASK)
        return bits.view(torch.float32), scale_inv * _E4M3_SHIFT
    if data.dtype == torch.float8_e5m2:  # the top byte of a float16
        half = data.view(torch.uint8).to(torch.int16).bitwise_left_shift_(8).view(torch.float16)
        return half.float(), scale_inv
    return data.to(torch.float32), scale_inv


def fp8_block_bytes(shape: tuple[int, int], block: tuple[int, int], itemsize: int = 1) -> int:
    """Bytes of an FP8 matrix `shape` with its float32 block scales (for memory plans)."""
    return math.prod(shape) * itemsize + 4 * math.prod(expected_scale_shape(shape, block))
