"""Compact expert matrices (`workers.quant`) against transformers' own dequantization, the compute
dtype decision (`workers.precision`), and a worker holding BF16 / FP8 / MXFP4 replicas: it
computes what the float32 replica computes, moves them between workers as stored, and the bytes
it reports are the bytes its tensors hold."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers.integrations.finegrained_fp8 import Fp8Dequantize, _dequantize_fp8_weight
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from cluster.model_spec import ModelSpec
from cluster.placement import ExpertShare
from workers import precision, quant
from workers.expert_math import HeldExpert, run_experts
from workers.quant import Fp8Blocks, Mxfp4Blocks, quantize_fp8, quantize_mxfp4
from workers.random_model import RandomModel
from workers.worker import ExpertWorker

BF16_REL_TOL = 1.6e-2  # unit roundoff 2**-8, plus slack (as tests/integration/support.py)


def _weight(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05


# ---- FP8 blocks ------------------------------------------------------------------------------

@pytest.mark.parametrize(("shape", "block"), [
    pytest.param((64, 96), (16, 32), id="blocks-divide"),
    pytest.param((40, 70), (16, 32), id="partial-last-blocks"),
    pytest.param((24, 64), (128, 128), id="one-block-larger-than-the-matrix"),
])
def test_fp8_dequantize_equals_transformers(shape, block) -> None:
    q = quantize_fp8(_weight(*shape, seed=1), block)
    want = _dequantize_fp8_weight(q.data, q.scale_inv, list(block), torch.float32)
    assert torch.equal(q.dequantize(torch.float32), want)
    assert torch.equal(q.dequantize(torch.bfloat16), want.to(torch.bfloat16)), "rounded once, from float32"
    if shape[0] % block[0] == 0 and shape[1] % block[1] == 0:  # the loader's path, which needs whole blocks
        loader = Fp8Dequantize(None)._dequantize_one(q.data, q.scale_inv, output_dtype=torch.float32)
        assert torch.equal(q.dequantize(torch.float32), loader)


def test_fp8_quantization_is_close_and_keeps_each_blocks_largest_value() -> None:
    w = _weight(64, 64, seed=2)
    q = quantize_fp8(w, (32, 32))
    assert q.scale_inv.shape == (2, 2) and q.data.dtype == torch.float8_e4m3fn
    assert (q.dequantize(torch.float32) - w).abs().max() <= 0.07 * w.abs().max()  # e4m3: 3 mantissa bits
    assert torch.equal(q.data.float().abs().amax(), torch.tensor(448.0))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3fn", "e5m2"])
@pytest.mark.parametrize("scale", [0.5, 300.0], ids=["fast-path", "large-scale-fallback"])
def test_every_fp8_byte_dequantizes_as_torch_converts_it(dtype, scale) -> None:
    data = torch.arange(256, dtype=torch.uint8).view(dtype).reshape(16, 16)
    q = Fp8Blocks(data, torch.full((1, 1), scale), (16, 16))
    got, want = q.dequantize(torch.float32), data.float() * torch.tensor(scale)
    finite = want.isfinite()
    assert torch.equal(got[finite], want[finite])


def test_fp8_refuses_misshapen_scales() -> None:
    data = torch.zeros(40, 70).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"float32 \[3, 3\].*got torch.float32 \[2, 3\]"):
        Fp8Blocks(data, torch.ones(2, 3), (16, 32))


# ---- MXFP4 -----------------------------------------------------------------------------------

def test_mxfp4_dequantize_equals_transformers_on_random_packed_data() -> None:
    gen = torch.Generator().manual_seed(3)
    blocks = torch.randint(0, 256, (3, 48, 4, 16), dtype=torch.uint8, generator=gen)  # [E, R, C/32, 16]
    scales = torch.randint(110, 140, (3, 48, 4), dtype=torch.uint8, generator=gen)
    want = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)  # [E, C, R]
    got = torch.stack([Mxfp4Blocks(blocks[e], scales[e]).dequantize(torch.bfloat16).t() for e in range(3)])
    assert torch.equal(got, want)


def test_mxfp4_quantization_is_exact_on_representable_values() -> None:
    values = torch.tensor(quant.FP4_VALUES)[torch.randint(0, 16, (8, 64), generator=torch.Generator().manual_seed(4))]
    values = values * 2.0 ** torch.randint(-3, 3, (8, 2, 1)).repeat_interleave(32, 1).reshape(8, 64)
    assert torch.equal(quantize_mxfp4(values).dequantize(torch.float32), values)


# ---- cutting (shared-expert pieces) and moving between workers -------------------------------

@pytest.mark.parametrize("make", [
    pytest.param(lambda w: w.to(torch.bfloat16), id="bf16"),
    pytest.param(lambda w: quantize_fp8(w, (8, 8)), id="fp8"),
    pytest.param(quantize_mxfp4, id="mxfp4"),
])
def test_a_piece_equals_the_same_piece_of_the_dequantized_matrix(make) -> None:
    m = make(_weight(64, 96, seed=5))
    full = quant.dequantize(m, torch.float32)
    rows = quant.dequantize(quant.slice_rows(m, 32, 56, 32), torch.float32)
    assert torch.equal(rows[:24], full[32:56]) and not rows[24:].any()
    cols = quant.dequantize(quant.slice_cols(m, 32, 64, 64), torch.float32)
    assert torch.equal(cols[:, :32], full[:, 32:64]) and not cols[:, 32:].any()
    for t in quant.tensors_of(quant.slice_rows(m, 0, 32, 32)):
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), "a piece is not a view of the whole"


def test_a_piece_that_cuts_a_block_is_refused() -> None:
    q = quantize_fp8(_weight(64, 64, seed=6), (16, 16))
    with pytest.raises(ValueError, match="rows 24:48 do not start at a block boundary"):
        q.rows(24, 48, 24)
    with pytest.raises(ValueError, match="columns 8:16 do not start"):
        q.cols(8, 16, 8)


@pytest.mark.parametrize("make", [
    pytest.param(lambda w: w, id="float32"), pytest.param(lambda w: w.to(torch.bfloat16), id="bf16"),
    pytest.param(lambda w: quantize_fp8(w, (16, 16)), id="fp8"), pytest.param(quantize_mxfp4, id="mxfp4"),
])
def test_the_wire_form_carries_the_matrix_exactly(make) -> None:
    m = make(_weight(32, 64, seed=7))
    back = quant.from_wire(quant.to_wire(m))
    assert quant.storage_name(back) == quant.storage_name(m)
    assert [t.dtype for t in quant.tensors_of(back)] == [t.dtype for t in quant.tensors_of(m)]
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.dtype.itemsize == 1 else torch.equal(a, b)
               for a, b in zip(quant.tensors_of(back), quant.tensors_of(m)))


# ---- the compute dtype -----------------------------------------------------------------------

@pytest.mark.parametrize(("setting", "storage", "device", "flags", "want"), [
    pytest.param("auto", "float32", "cuda", (), torch.float32, id="float32-weights-stay-float32"),
    pytest.param("auto", "bfloat16", "cpu", ("avx512f", "amx_bf16"), torch.bfloat16, id="amx"),
    pytest.param("auto", "fp8", "cpu", ("avx512_bf16",), torch.bfloat16, id="avx512-bf16"),
    pytest.param("auto", "bfloat16", "cpu", ("avx2", "avx512f"), torch.float32, id="cpu-without-native-bf16"),
    pytest.param("auto", "mxfp4", "cuda", (), torch.bfloat16, id="gpu"),
    pytest.param("auto", "float16", "cuda", (), torch.float16, id="fp16-on-gpu"),
    pytest.param("auto", "float16", "cpu", ("amx_bf16",), torch.float32, id="fp16-on-cpu"),
    pytest.param("bfloat16", "float32", "cpu", (), torch.bfloat16, id="named-wins"),
    pytest.param("float32", "fp8", "cuda", (), torch.float32, id="named-float32"),
])
def test_compute_dtype_decision(setting, storage, device, flags, want) -> None:
    assert precision.compute_dtype(setting, storage, device, flags) == want


def test_compute_dtype_refuses_an_unknown_setting() -> None:
    with pytest.raises(ValueError, match="compute_dtype must be one of .*'auto'.*got 'fp8'"):
        precision.compute_dtype("fp8", "float32", "cpu")


def test_cpu_flags_come_from_cpuinfo(tmp_path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f amx_bf16 amx_tile\n\nprocessor\t: 1\nflags\t: fpu\n")
    assert precision.cpu_flags(info) == {"fpu", "sse", "avx512f", "amx_bf16", "amx_tile"}
    assert precision.native_bf16(precision.cpu_flags(info))
    assert precision.cpu_flags(tmp_path / "missing") == frozenset() and not precision.native_bf16(())


# ---- expert math and the worker --------------------------------------------------------------

def test_bf16_math_accumulates_in_float32() -> None:
    w1, w3, w2 = (_weight(48, 32, 8), _weight(48, 32, 9), _weight(32, 48, 10))
    x = torch.randn(10, 32, generator=torch.Generator().manual_seed(11))
    held = HeldExpert.of(w1.bfloat16(), w3.bfloat16(), w2.bfloat16())
    args = (torch.tensor([0, 10]), torch.arange(10), torch.full((10,), 0.5))
    _, got = run_experts(x, [held], *args, compute_dtype=torch.bfloat16)
    _, want = run_experts(x, [HeldExpert.of(w1, w3, w2)], *args)
    assert got.dtype == torch.float32
    err = float((got - want).abs().max() / want.abs().max())
    assert 0 < err < BF16_REL_TOL


SPEC = ModelSpec(hidden_size=64, intermediate_size=96, num_experts=4, top_k=2, moe_layers=(0, 1), num_hidden_layers=2,
                 shared_intermediate_size=160)
DTYPES = ("float32", "bfloat16", "float16", "fp8", "mxfp4")
ITEM_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1, "mxfp4": 0.5 + 1 / 32}


@pytest.fixture
def restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _share() -> ExpertShare:  # experts 1 (6 tokens), 4 (a shared piece, 8 tokens), 7 (3 tokens)
    token_idx = np.concatenate([np.arange(6), np.arange(8), np.array([1, 5, 7])])
    weights = np.random.default_rng(1).uniform(0.1, 1, token_idx.shape[0]).astype(np.float32)
    return ExpertShare(np.array([1, 4, 7]), np.array([0, 6, 14, 17]), token_idx, weights)


def _reference(model: RandomModel, x: np.ndarray, share: ExpertShare) -> np.ndarray:
    """float32 math on `experts()` (the stored weights dequantized), in float64."""
    spec = model.spec
    pairs = [spec.layer_expert(int(e)) for e in share.expert_ids]
    out = np.zeros((8, spec.hidden_size))
    for i, (_, w) in enumerate(model.experts(pairs)):
        lo, hi = share.offsets[i], share.offsets[i + 1]
        xs = torch.from_numpy(x[share.token_idx[lo:hi]]).double()
        y = torch.nn.functional.linear(torch.nn.functional.silu(xs @ w.w1.double().t()) * (xs @ w.w3.double().t()),
                                       w.w2.double())
        np.add.at(out, share.token_idx[lo:hi], y.numpy() * share.weights[lo:hi, None])
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_worker_holding_compact_replicas_computes_the_dequantized_float32_result(dtype, restore_torch_threads):
    model = RandomModel(replace(SPEC, expert_dtype=dtype), seed=3)
    x = np.random.default_rng(2).standard_normal((8, 64)).astype(np.float32)
    exact = ExpertWorker(0, model, device="cpu", compute_dtype="float32")
    loaded = exact.load([1, 4, 7])
    np.testing.assert_allclose(exact.forward(x, _share()), _reference(model, x, _share()), rtol=1e-5, atol=1e-5)
    assert loaded == exact.weight_bytes() == exact.storage_bytes() == exact.stats()["weight_bytes"]
    assert loaded == round(3 * 3 * 64 * 96 * ITEM_BYTES[dtype]) + (3 * 4 * (1 + 1 + 1) if dtype == "fp8" else 0)
    fast = ExpertWorker(1, model, device="cpu", compute_dtype="bfloat16")
    fast.load([1, 4, 7])
    want = _reference(model, x, _share())
    err = np.abs(fast.forward(x, _share()) - want).max() / np.abs(want).max()
    assert err < BF16_REL_TOL


@pytest.mark.parametrize("dtype", ("bfloat16", "fp8", "mxfp4"))
def test_export_and_load_from_move_a_replica_as_stored(dtype, restore_torch_threads) -> None:
    spec = replace(SPEC, expert_dtype=dtype)
    source = ExpertWorker(0, RandomModel(spec, seed=3), device="cpu")
    other = ExpertWorker(1, RandomModel(spec, seed=99), device="cpu")  # its own source holds other weights
    source.load([1, 4, 7])
    moved = {e: other.load_from(e, source.export(e)) for e in (1, 4, 7)}
    assert sum(moved.values()) == source.weight_bytes() == other.weight_bytes()
    x = np.random.default_rng(5).standard_normal((8, 64)).astype(np.float32)
    np.testing.assert_array_equal(other.forward(x, _share()), source.forward(x, _share()))


def test_ready_reports_how_the_experts_are_held_and_computed(restore_torch_threads) -> None:
    spec = replace(SPEC, expert_dtype="fp8")
    worker = ExpertWorker(0, RandomModel(spec, seed=3), device="cpu", compute_dtype="float32")
    worker.load([0])
    ready = worker.ready()
    assert (ready["expert_dtype"], ready["compute_dtype"], ready["weight_bytes"]) == ("fp8", "float32",
                                                                                       worker.weight_bytes())


def test_a_random_model_config_names_how_its_experts_are_stored() -> None:
    from cluster.config import ConfigError, ServeConfig

    config = ServeConfig().with_overrides(**{"model.random": {"layers": 1, "hidden": 64, "ffn": 96, "dtype": "fp8"}})
    assert config.model.random.spec().expert_dtype == "fp8"
    with pytest.raises((ConfigError, ValueError), match=r"random.hidden \(48\).*multiples of 32"):
        ServeConfig().with_overrides(**{"model.random": {"hidden": 48, "ffn": 64, "dtype": "mxfp4"}})
    with pytest.raises((ConfigError, ValueError), match="int8"):
        ServeConfig().with_overrides(**{"model.random": {"dtype": "int8"}})


def test_row_buckets_are_few_and_waste_little() -> None:
    from workers.expert_math import row_bucket

    sizes = [row_bucket(n) for n in range(1, 8193)]
    assert all(n <= b <= max(n * 1.125, n + 1) for n, b in zip(range(1, 8193), sizes))
    assert len(set(sizes)) <= 8 * 13 + 16, "8 sizes per power of two"


def test_padded_bf16_rows_compute_only_the_real_tokens() -> None:
    """37 tokens run as 40 rows (the bucket): the 3 padded rows are dropped, every real token's
    sum is right to BF16 precision, and a token not sent gets nothing."""
    w1, w3, w2 = (_weight(48, 32, 12), _weight(48, 32, 13), _weight(32, 48, 14))
    x = torch.randn(50, 32, generator=torch.Generator().manual_seed(15))
    token_idx = torch.arange(1, 38)
    args = (torch.tensor([0, 37]), token_idx, torch.full((37,), 0.5))
    rows, got = run_experts(x, [HeldExpert.of(w1.bfloat16(), w3.bfloat16(), w2.bfloat16())], *args,
                            compute_dtype=torch.bfloat16)
    _, want = run_experts(x, [HeldExpert.of(w1.bfloat16().float(), w3.bfloat16().float(), w2.bfloat16().float())],
                          *args)
    assert torch.equal(rows, token_idx) and got.shape == (37, 32)
    assert float((got - want).abs().max() / want.abs().max()) < BF16_REL_TOL
