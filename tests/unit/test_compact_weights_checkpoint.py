"""Compact checkpoints read as stored: BF16 saved by `transformers`, FP8 blocks written with
DeepSeek-V3's tensor names and scale shapes (`TinyFamily.save_fp8`), gpt-oss's stacked MXFP4
experts; the bad ones refused naming the tensor or key; a worker's memory for them measured
against the bytes on disk; the header-only sizes `moe-serve plan` uses."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from workers.hf_checkpoint import CONFIG_FILE, SINGLE_FILE, HFCheckpoint
from workers.hf_inventory import checkpoint_memory
from workers.hf_quant import mxfp4_expert, read_quant_config
from workers.quant import Fp8Blocks, Mxfp4Blocks
from workers.tiny_models import BY_NAME
from workers.weights import CheckpointError
from workers.worker import ExpertWorker

pytest.importorskip("transformers")
V3_EXPERT = "model.layers.1.mlp.experts.3.down_proj.weight"
V3_SHARED = "model.layers.2.mlp.shared_experts.gate_proj.weight"


@pytest.fixture(scope="module")
def fp8_v3(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fp8-v3")
    BY_NAME["deepseek-v3"].save_fp8(path, block=(16, 16), tokenizer=False, dense=True)
    return path


@pytest.fixture(scope="module")
def bf16_v3(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bf16-v3")
    BY_NAME["deepseek-v3"].save(path, tokenizer=False, dtype=torch.bfloat16)
    return path


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in (CONFIG_FILE, SINGLE_FILE):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def _edit_tensors(path: Path, edit) -> None:
    tensors = load_file(str(path / SINGLE_FILE))
    edit(tensors)
    save_file(tensors, str(path / SINGLE_FILE), metadata={"format": "pt"})


def _edit_config(path: Path, edit) -> None:
    config = json.loads((path / CONFIG_FILE).read_text())
    edit(config)
    (path / CONFIG_FILE).write_text(json.dumps(config))


# ---- reading ---------------------------------------------------------------------------------

def test_an_fp8_checkpoint_is_read_as_fp8_blocks_with_their_scales(fp8_v3: Path) -> None:
    ckpt = HFCheckpoint(fp8_v3)
    assert (ckpt.spec.expert_dtype, ckpt.quant.method, ckpt.quant.block) == ("fp8", "fp8", (16, 16))
    (_, stored), = ckpt.stored_experts([(1, 3)])
    on_disk = load_file(str(fp8_v3 / SINGLE_FILE))
    assert isinstance(stored.w2, Fp8Blocks) and stored.w2.shape == (64, 24) and stored.w2.scale_inv.shape == (4, 2)
    assert torch.equal(stored.w2.data.view(torch.uint8), on_disk[V3_EXPERT].view(torch.uint8))
    assert torch.equal(stored.w2.scale_inv, on_disk[V3_EXPERT + "_scale_inv"])
    (_, dequantized), = ckpt.experts([(1, 3)])
    assert dequantized.w2.dtype == torch.float32 and torch.equal(dequantized.w2, stored.w2.dequantize(torch.float32))
    gate = ckpt.gate(1)
    assert gate.weight.dtype == torch.float32 and on_disk["model.layers.1.mlp.gate.weight"].dtype == torch.float32


def test_the_fp8_experts_are_close_to_the_model_they_were_quantized_from(tmp_path) -> None:
    model = BY_NAME["deepseek-v3"].save_fp8(tmp_path / "m", block=(16, 16), tokenizer=False)
    (_, got), = HFCheckpoint(tmp_path / "m").experts([(2, 5)])
    gate_up = model.model.layers[2].mlp.experts.gate_up_proj[5].detach()
    assert (got.w1 - gate_up[:24]).abs().max() < 0.07 * gate_up.abs().max()
    assert not torch.equal(got.w1, gate_up[:24]), "FP8 rounds"


def test_shared_experts_are_cut_into_pieces_with_their_scales(tmp_path) -> None:
    """Qwen2-MoE's shared MLP (40 units) served as 2 pieces of the expert size 24: block rows of 8
    let each piece start at a block boundary."""
    BY_NAME["qwen2-shared-expert"].save_fp8(tmp_path / "q", block=(8, 8), tokenizer=False)
    ckpt = HFCheckpoint(tmp_path / "q")
    pieces = dict(ckpt.stored_experts([(1, 8), (1, 9)]))
    whole = load_file(str(tmp_path / "q" / SINGLE_FILE))
    key = "model.layers.1.mlp.shared_expert.gate_proj.weight"
    full = Fp8Blocks(whole[key], whole[key + "_scale_inv"], (8, 8)).dequantize(torch.float32)
    first, last = (pieces[(1, 8)].w1.dequantize(torch.float32), pieces[(1, 9)].w1.dequantize(torch.float32))
    assert torch.equal(first, full[:24]) and torch.equal(last[:16], full[24:]) and not last[16:].any()


def test_dense_fp8_tensors_reach_the_router_dequantized(fp8_v3: Path) -> None:
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    dense = HFCheckpoint(fp8_v3).dense_tensors()
    whole = load_file(str(fp8_v3 / SINGLE_FILE))
    key = "model.layers.0.self_attn.o_proj.weight"
    assert whole[key].dtype == torch.float8_e4m3fn and not any(k.endswith("_scale_inv") for k in dense)
    want = _dequantize_fp8_weight(whole[key], whole[key + "_scale_inv"], [16, 16], torch.float32)
    assert torch.equal(dense[key], want)


def test_a_bf16_checkpoint_is_held_as_bf16(bf16_v3: Path) -> None:
    ckpt = HFCheckpoint(bf16_v3)
    (_, stored), = ckpt.stored_experts([(1, 0)])
    (_, as_float), = ckpt.experts([(1, 0)])
    assert ckpt.spec.expert_dtype == "bfloat16" and stored.w1.dtype == torch.bfloat16
    assert as_float.w1.dtype == torch.float32 and torch.equal(as_float.w1, stored.w1.float())


def test_gpt_oss_stacked_mxfp4_slices_are_our_w1_w3_w2() -> None:
    """gpt-oss stacks a layer's experts (gate_up `[E, 2F, H/32, 16]`, gate rows even, up rows odd);
    transformers dequantizes them to `[E, H, 2F]` and `[E, F, H]` (`x @ W`)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    gen = torch.Generator().manual_seed(0)
    experts, hidden, inter = 3, 64, 32
    gu = torch.randint(0, 256, (experts, 2 * inter, hidden // 32, 16), dtype=torch.uint8, generator=gen)
    gu_s = torch.randint(120, 130, (experts, 2 * inter, hidden // 32), dtype=torch.uint8, generator=gen)
    dn = torch.randint(0, 256, (experts, hidden, inter // 32, 16), dtype=torch.uint8, generator=gen)
    dn_s = torch.randint(120, 130, (experts, hidden, inter // 32), dtype=torch.uint8, generator=gen)
    gate_up = convert_moe_packed_tensors(gu, gu_s, dtype=torch.float32)  # [E, H, 2F]
    down = convert_moe_packed_tensors(dn, dn_s, dtype=torch.float32)  # [E, F, H]
    ours = mxfp4_expert(gu[1], gu_s[1], dn[1], dn_s[1])
    assert isinstance(ours.w1, Mxfp4Blocks) and ours.w1.shape == (inter, hidden) and ours.w2.shape == (hidden, inter)
    assert torch.equal(ours.w1.dequantize(torch.float32), gate_up[1][:, 0::2].t())
    assert torch.equal(ours.w3.dequantize(torch.float32), gate_up[1][:, 1::2].t())
    assert torch.equal(ours.w2.dequantize(torch.float32), down[1].t())


# ---- refused, naming the tensor or key ---------------------------------------------------------

BAD_FP8 = [
    pytest.param(lambda t: t.pop(V3_EXPERT + "_scale_inv"), None,
                 [f"'{V3_EXPERT}_scale_inv' not found", f"FP8 tensor '{V3_EXPERT}'"], id="missing-scale"),
    pytest.param(lambda t: t.update({V3_EXPERT + "_scale_inv": torch.ones(2, 2)}), None,
                 [f"'{V3_EXPERT}_scale_inv' has shape [2, 2], expected [4, 2]", "[64, 24]", "[16, 16]",
                  "weight_block_size"], id="misshapen-scale"),
    pytest.param(lambda t: t.update({V3_EXPERT + "_scale_inv": torch.ones(4, 2, dtype=torch.int32)}), None,
                 [f"'{V3_EXPERT}_scale_inv' has dtype torch.int32", "float32"], id="integer-scale"),
    pytest.param(None, lambda c: c.update(quantization_config={"quant_method": "gptq", "bits": 4}),
                 ["'quantization_config.quant_method' is 'gptq'", "not served"], id="unknown-quant-method"),
    pytest.param(None, lambda c: c["quantization_config"].update(weight_block_size=[128]),
                 ["'quantization_config.weight_block_size'", "[128]"], id="malformed-block-size"),
    pytest.param(None, lambda c: c["quantization_config"].update(quant_method="mxfp4"),
                 ["'mxfp4'", "deepseek_v3 checkpoints do not store their experts in MXFP4"], id="mxfp4-not-this-family"),
    pytest.param(None, lambda c: c.pop("quantization_config"),
                 [f"'{V3_EXPERT.replace('1.mlp.experts.3.down', '1.mlp.experts.0.gate')}' has dtype "
                  "torch.float8_e4m3fn"], id="fp8-without-quantization-config"),
]


@pytest.mark.parametrize(("tensors", "config", "words"), BAD_FP8)
def test_a_bad_fp8_checkpoint_is_refused_naming_what_is_wrong(fp8_v3, tmp_path, tensors, config, words) -> None:
    path = _copy(fp8_v3, tmp_path / "bad")
    if tensors:
        _edit_tensors(path, tensors)
    if config:
        _edit_config(path, config)
    with pytest.raises(CheckpointError) as caught:
        ckpt = HFCheckpoint(path)
        list(ckpt.stored_experts([(1, 3)]))
    assert all(w in str(caught.value) for w in words), str(caught.value)


def test_shared_pieces_that_cut_a_block_are_refused_naming_the_tensor(tmp_path) -> None:
    BY_NAME["qwen2-shared-expert"].save_fp8(tmp_path / "q", block=(16, 16), tokenizer=False)
    with pytest.raises(CheckpointError) as caught:
        HFCheckpoint(tmp_path / "q")
    for word in ("'model.layers.1.mlp.shared_expert.gate_proj.weight'", "2 shared-expert pieces of 24 rows",
                 "blocks of 16", "weight_block_size [16, 16]"):
        assert word in str(caught.value), str(caught.value)


def test_quant_config_parsing() -> None:
    assert read_quant_config({}).method is None
    assert read_quant_config({"quantization_config": {"quant_method": "fp8"}}).block is None  # one scale per matrix
    fp8 = read_quant_config({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 64]}})
    assert (fp8.method, fp8.block) == ("fp8", (128, 64))
    with pytest.raises(ValueError, match="'quantization_config' must be an object"):
        read_quant_config({"quantization_config": "fp8"})


# ---- memory: what a worker holds against the bytes on disk ---------------------------------------

def _disk_bytes(path: Path, keys: set[str]) -> int:
    """Bytes of `keys` in the safetensors file, from its header's data offsets."""
    with open(path / SINGLE_FILE, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k in keys)


@pytest.mark.parametrize("which", ["fp8", "bf16"])
def test_a_workers_memory_for_compact_experts_is_within_10_percent_of_the_disk_bytes(fp8_v3, bf16_v3, which):
    """Measured as the bytes of the distinct tensor storages the worker's replicas keep alive
    (not the process RSS, which the interpreter, torch and the test runner swamp at this size)."""
    path = fp8_v3 if which == "fp8" else bf16_v3
    ckpt = HFCheckpoint(path)
    threads = torch.get_num_threads()
    try:
        worker = ExpertWorker(0, ckpt, device="cpu")
    finally:
        torch.set_num_threads(threads)
    routed = [g for g in range(ckpt.spec.num_logical_experts) if ckpt.spec.layer_expert(g)[1] < ckpt.spec.num_experts]
    worker.load(routed)
    keys = {k for k in load_file(str(path / SINGLE_FILE)) if ".mlp.experts." in k}
    disk = _disk_bytes(path, keys)
    held = worker.storage_bytes()
    assert abs(held - disk) <= 0.1 * disk, (held, disk)
    assert held == worker.weight_bytes(), "no replica keeps a larger tensor alive"


def test_the_plan_sizes_each_replica_as_the_worker_holds_it(fp8_v3, bf16_v3) -> None:
    for path in (fp8_v3, bf16_v3):
        ckpt = HFCheckpoint(path)
        sizes = checkpoint_memory(ckpt)
        worker = ExpertWorker(0, ckpt, device="cpu", torch_threads=torch.get_num_threads())
        assert sizes.replica_bytes == [worker.load([g]) for g in range(ckpt.spec.num_logical_experts)]
        moe = tuple(f"model.layers.{layer}.mlp." for layer in ckpt.spec.moe_layers)
        dense = {k: t for k, t in load_file(str(path / SINGLE_FILE)).items() if not k.startswith(moe)}
        assert sizes.dense_params == sum(t.numel() for k, t in dense.items() if not k.endswith("_scale_inv"))
        assert sizes.dense_disk_bytes == _disk_bytes(path, set(dense))


# ---- stacked experts: gpt-oss in MXFP4 (its release format) and the fused BF16 layouts -----------

def _as_mxfp4(path: Path) -> None:
    """Rewrite a gpt-oss checkpoint's stacked experts as gpt-oss releases them: per layer
    `experts.gate_up_proj_blocks` uint8 `[E, 2F, H/32, 16]` and `_scales` `[E, 2F, H/32]` (the
    rows of `gate_up_proj` `[E, H, 2F]` transposed, gate and up interleaved), `down_proj_blocks`
    `[E, H, F/32, 16]` and `_scales`; the biases stay as they are."""
    from workers.quant import quantize_mxfp4

    def edit(tensors: dict) -> None:
        for key in [k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
            packed = [quantize_mxfp4(w.t().float()) for w in tensors.pop(key)]  # each [R, C] = [out, in]
            tensors[key + "_blocks"] = torch.stack([p.blocks for p in packed])
            tensors[key + "_scales"] = torch.stack([p.scales for p in packed])

    _edit_tensors(path, edit)
    _edit_config(path, lambda c: c.update(quantization_config={"quant_method": "mxfp4",
                                                               "modules_to_not_convert": ["model.layers.*.self_attn"]}))


@pytest.fixture(scope="module")
def mxfp4_gpt_oss(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mxfp4-gpt-oss")
    BY_NAME["gpt-oss"].save(path, tokenizer=False, dtype=torch.bfloat16)
    _as_mxfp4(path)
    return path


def test_gpt_oss_mxfp4_experts_are_held_packed_and_dequantize_as_transformers_does(mxfp4_gpt_oss: Path) -> None:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    ckpt = HFCheckpoint(mxfp4_gpt_oss)
    assert ckpt.spec.expert_dtype == "mxfp4"
    on_disk = load_file(str(mxfp4_gpt_oss / SINGLE_FILE))
    base = "model.layers.1.mlp.experts."
    gate_up = convert_moe_packed_tensors(on_disk[base + "gate_up_proj_blocks"], on_disk[base + "gate_up_proj_scales"],
                                         dtype=torch.float32)  # [E, H, 2F]
    down = convert_moe_packed_tensors(on_disk[base + "down_proj_blocks"], on_disk[base + "down_proj_scales"],
                                      dtype=torch.float32)  # [E, F, H]
    (_, stored), = ckpt.stored_experts([(1, 2)])
    (_, plain), = ckpt.experts([(1, 2)])
    assert all(isinstance(m, Mxfp4Blocks) for m in (stored.w1, stored.w2, stored.w3))
    assert torch.equal(plain.w1, gate_up[2][:, 0::2].t()) and torch.equal(plain.w3, gate_up[2][:, 1::2].t())
    assert torch.equal(plain.w2, down[2].t())
    assert plain.biases is not None and torch.equal(plain.biases[2], on_disk[base + "down_proj_bias"][2].float())


@pytest.mark.parametrize("case", ["mxfp4", "gpt-oss-bf16", "dbrx-bf16"])
def test_stacked_experts_hold_only_their_share_and_the_plan_sizes_them(case, mxfp4_gpt_oss, tmp_path) -> None:
    """A worker's replica cut from a layer's stacked tensor owns its memory (it does not keep the
    stack alive), and `moe-serve plan` sizes it as the worker holds it."""
    if case == "mxfp4":
        path = mxfp4_gpt_oss
    else:
        path = tmp_path / case
        BY_NAME[case.removesuffix("-bf16")].save(path, tokenizer=False, dtype=torch.bfloat16)
    ckpt = HFCheckpoint(path)
    worker = ExpertWorker(0, ckpt, device="cpu", torch_threads=torch.get_num_threads())
    sizes = checkpoint_memory(ckpt)
    assert sizes.replica_bytes == [worker.load([g]) for g in range(ckpt.spec.num_logical_experts)]
    assert worker.storage_bytes() == worker.weight_bytes() == sum(sizes.replica_bytes)
    if case == "mxfp4":  # the packed matrices are the bytes on disk; the biases are held as float32
        packed = {k for k in load_file(str(path / SINGLE_FILE)) if k.endswith(("_blocks", "_scales"))}
        spec = ckpt.spec
        biases = spec.num_logical_experts * 4 * (2 * spec.intermediate_size + spec.hidden_size)
        assert worker.weight_bytes() - biases == _disk_bytes(path, packed)
