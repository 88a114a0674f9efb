"""Expert math: the gated FFN `w2(act(w1 x) * w3 x)` (Mixtral's SwiGLU: act = silu), batched per
expert; the model's `ExpertForm` says the activation (`ACTIVATION_FNS`: silu, gelu, ...; gpt-oss's
clamped SwiGLU), whether the experts have biases (gpt-oss) and whether the gate weight scales the
expert's input (Llama 4) instead of its output.

Weights are kept fused as `w13 = cat(w1, w3)` (`[2F, H]`) so each expert does two GEMMs per
batch, not three. No per-token Python loops: the only loop is over the experts (slots) that
received tokens.

A worker holds each replica as stored (`HeldExpert`: float32 / BF16 / FP16 tensors, or FP8 /
MXFP4 matrices with their scales); the math runs in a compute dtype: activations are cast to it
once per call, a quantized expert is dequantized to it when it runs, and the gate-weighted
partial sums are accumulated in float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cluster.model_spec import ExpertForm
from workers import quant
from workers.quant import Matrix

_SQRT_2_OVER_PI = 0.7978845608028654


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    """transformers' `gelu_new` (`NewGELUActivation`): the tanh approximation, its own formula."""
    return 0.5 * x * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * torch.pow(x, 3.0))))


# config.json's activation name -> the function (as transformers' ACT2FN computes it);
# "gpt_oss_swiglu" is not here: it is a whole gated form (`gate_activation`).
ACTIVATION_FNS = {
    "silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": _gelu_new, "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


def gate_activation(gate: torch.Tensor, up: torch.Tensor, form: ExpertForm) -> torch.Tensor:
    """`[n, F]` gate and up halves -> `[n, F]` the gated hidden units: `act(gate) * up`, or
    gpt-oss's `(clamp(up, -l, l) + 1) * g * sigmoid(alpha g)` with `g = clamp(gate, max=l)`."""
    if form.activation == "gpt_oss_swiglu":
        limit = form.swiglu_limit
        gate = gate.clamp(max=limit)
        return (up.clamp(min=-limit, max=limit) + 1) * (gate * torch.sigmoid(gate * form.swiglu_alpha))
    return ACTIVATION_FNS[form.activation](gate) * up


def fuse_w13(w1: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """w1, w3: `[F, H]` -> `[2F, H]` (gate rows first, then up rows)."""
    return torch.cat([w1, w3], dim=0).contiguous()


@dataclass(frozen=True, eq=False)
class HeldExpert:
    """One replica as a worker holds it: `w13` is one plain tensor `[2F, H]` (w1 rows, then w3)
    or the pair `(w1, w3)` of quantized `[F, H]` matrices; `w2` `[H, F]`; `b13` `[2F]` (b1, then
    b3) and `b2` `[H]` float32 where the experts have biases (gpt-oss), else None."""

    w13: tuple[Matrix, ...]
    w2: Matrix
    b13: torch.Tensor | None = None
    b2: torch.Tensor | None = None

    @classmethod
    def of(cls, w1: Matrix, w3: Matrix, w2: Matrix, device: torch.device | str = "cpu",
           biases: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> HeldExpert:
        """Plain w1 and w3 of one dtype are fused (one GEMM); quantized ones stay apart.
        `biases`: (b1 `[F]`, b3 `[F]`, b2 `[H]`) or None."""
        b13 = b2 = None
        if biases is not None:
            b1, b3, b2 = biases
            b13, b2 = torch.cat([b1, b3]).float().to(device), quant.to_device(b2.float(), device)
        if isinstance(w1, torch.Tensor) and isinstance(w3, torch.Tensor) and w1.dtype == w3.dtype:
            return cls((fuse_w13(w1, w3).to(device),), quant.to_device(w2, device), b13, b2)
        return cls((quant.to_device(w1, device), quant.to_device(w3, device)), quant.to_device(w2, device), b13, b2)

    @property
    def nbytes(self) -> int:
        """Bytes of the weights (scales and biases included)."""
        return sum(quant.nbytes(m) for m in (*self.w13, self.w2)) + sum(
            b.numel() * b.element_size() for b in self.biases())

    def biases(self) -> tuple[torch.Tensor, ...]:
        return () if self.b13 is None else (self.b13, self.b2)

    def split_biases(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(b1, b3, b2) as held, or None."""
        if self.b13 is None:
            return None
        b1, b3 = self.b13.chunk(2)
        return b1, b3, self.b2

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor holding this replica (for counting the memory behind them)."""
        return [t for m in (*self.w13, self.w2) for t in quant.tensors_of(m)] + list(self.biases())

    def split(self) -> tuple[Matrix, Matrix, Matrix]:
        """(w1, w3, w2) as held (a fused w13 is cut back into views)."""
        if len(self.w13) == 1:
            w1, w3 = self.w13[0].chunk(2, dim=0)  # type: ignore[union-attr]
            return w1, w3, self.w2
        return self.w13[0], self.w13[1], self.w2

    def weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13 `[2F, H]`, w2 `[H, F]`) as plain tensors of `dtype`, dequantized if need be."""
        w2 = quant.dequantize(self.w2, dtype)
        if len(self.w13) == 1:
            return quant.dequantize(self.w13[0], dtype), w2
        w1, w3 = self.w13
        rows, cols = w1.shape
        w13 = torch.empty(2 * rows, cols, dtype=dtype, device=w2.device)
        quant.dequantize(w1, dtype, out=w13[:rows])
        quant.dequantize(w3, dtype, out=w13[rows:])
        return w13, w2


def swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """One expert on a batch of tokens.

    x: `[n, H]`; w13: `[2F, H]`; w2: `[H, F]`; returns `[n, H]` (written into `out` if given).
    """
    gate, up = (x @ w13.t()).chunk(2, dim=-1)  # [n, F] each
    hidden = F.silu(gate) * up
    return torch.matmul(hidden, w2.t(), out=out)


def expert_ffn(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, form: ExpertForm,
               b13: torch.Tensor | None = None, b2: torch.Tensor | None = None) -> torch.Tensor:
    """One expert of form `form` on a batch of tokens: `w2(act(w1 x + b1) * (w3 x + b3)) + b2`.

    x: `[n, H]`; w13: `[2F, H]`; w2: `[H, F]`; b13: `[2F]` or None; b2: `[H]` or None; returns
    `[n, H]`. The plain SwiGLU form is `swiglu`, bit for bit.
    """
    if form == ExpertForm() and b13 is None:
        return swiglu(x, w13, w2)
    h = x @ w13.t()
    if b13 is not None:
        h = h + b13.to(h.dtype)
    gate, up = h.chunk(2, dim=-1)
    y = gate_activation(gate, up, form) @ w2.t()
    return y if b2 is None else y + b2.to(y.dtype)


def run_experts(
    x: torch.Tensor,
    experts: Sequence[HeldExpert | tuple[torch.Tensor, torch.Tensor]],
    offsets: torch.Tensor,
    token_idx: torch.Tensor,
    weights: torch.Tensor,
    compute_dtype: torch.dtype | None = None,
    form: ExpertForm | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run several experts on their tokens and sum each token's gate-weighted outputs.

    x: `[T, H]` the whole batch; experts: a `HeldExpert` or `(w13, w2)` per segment; offsets:
    `[S + 1]`, segment `i` is rows `offsets[i]:offsets[i+1]` of token_idx/weights; token_idx:
    `[N]` rows of x; weights: `[N]` gate weights; compute_dtype: the math's dtype (default x's);
    form: what an expert computes (`ExpertForm`, default SwiGLU): with `weight_on_input` each
    token's gate weight scales its input to the expert, not the expert's output.
    Returns `(rows [U], partial [U, H])`: the distinct tokens, ascending, and for each the sum
    of its weighted expert outputs here, in float32 (x's dtype if that is wider). Summing before
    returning sends each token back once, not once per expert it visited here.
    """
    dtype = compute_dtype or x.dtype
    form = form or ExpertForm()
    rows, inverse = torch.unique(token_idx, sorted=True, return_inverse=True)
    partial = torch.zeros(rows.shape[0], x.shape[1], dtype=torch.promote_types(x.dtype, torch.float32),
                          device=x.device)
    xc = x.to(dtype)
    bounds = offsets.tolist()
    for i, expert in enumerate(experts):
        lo, hi = bounds[i], bounds[i + 1]
        if hi == lo:
            continue
        b13 = b2 = None
        if isinstance(expert, HeldExpert):
            w13, w2 = expert.weights(dtype)
            b13, b2 = expert.b13, expert.b2
        else:
            w13, w2 = (w.to(dtype) for w in expert)
        n, w = hi - lo, weights[lo:hi].unsqueeze(1)
        idx = _padded_rows(token_idx[lo:hi], dtype, x.device)  # [m >= n]: rows n.. repeat row 0
        if form.weight_on_input:  # Llama 4: expert(w x), x scaled in its own dtype as transformers does
            w_in = torch.cat([w, w.new_zeros(idx.shape[0] - n, 1)]) if idx.shape[0] > n else w
            xs = (x.index_select(0, idx) * w_in.to(x.dtype)).to(dtype)
            y = expert_ffn(xs, w13, w2, form, b13, b2)[:n].to(partial.dtype)
        else:
            y = expert_ffn(xc.index_select(0, idx), w13, w2, form, b13, b2)[:n].to(partial.dtype)
            y.mul_(w.to(y.dtype))
        partial.index_add_(0, inverse[lo:hi], y)
    return rows, partial


def row_bucket(n: int) -> int:
    """`n` rounded up to one of 8 sizes per power of two (at most 12.5% more rows)."""
    step = 1 << max(0, n.bit_length() - 4)
    return -(-n // step) * step


def _padded_rows(idx: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`idx` `[n]` padded to `row_bucket(n)` rows (repeating its first) for 16-bit math on a
    CPU: oneDNN builds a BF16 / FP16 matmul kernel for each new row count, ~1 ms each, while
    the rows an expert gets change with every batch; bucketed, a few dozen sizes serve them
    all from its cache. The padded rows' outputs are dropped. float32 (MKL) needs none."""
    n = idx.shape[0]
    if dtype == torch.float32 or device.type != "cpu" or row_bucket(n) == n:
        return idx
    return torch.cat([idx, idx[:1].expand(row_bucket(n) - n)])
