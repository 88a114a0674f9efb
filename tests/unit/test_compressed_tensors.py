"""FP8 checkpoints in compressed-tensors' `float-quantized` layout (GLM-4.5-FP8, llm-compressor):
`....weight_scale` per row, per matrix or per block beside static `....input_scale`s; read as FP8
with their scales, cut into shared-expert pieces anywhere a per-row scale allows, sized by the
plan as the worker holds them; the layouts we do not serve refused naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from workers.hf_checkpoint import CONFIG_FILE, SINGLE_FILE, HFCheckpoint
from workers.hf_inventory import checkpoint_memory
from workers.hf_quant import read_quant_config
from workers.quant import Fp8Blocks
from workers.tiny_models import BY_NAME
from workers.weights import CheckpointError
from workers.worker import ExpertWorker

pytest.importorskip("transformers")
GLM_EXPERT = "model.layers.1.mlp.experts.2.down_proj.weight"


@pytest.fixture(scope="module", params=["channel", "tensor", "block"])
def glm_fp8(request, tmp_path_factory) -> tuple[str, Path, torch.nn.Module]:
    path = tmp_path_factory.mktemp(f"glm-ct-{request.param}")
    model = BY_NAME["glm4-moe"].save_fp8(path, block=(16, 16), tokenizer=False, dense=True, strategy=request.param)
    return request.param, path, model


def test_the_scales_are_read_as_the_strategy_tiles_them(glm_fp8) -> None:
    strategy, path, _ = glm_fp8
    ckpt = HFCheckpoint(path)
    assert (ckpt.spec.expert_dtype, ckpt.quant.method, ckpt.quant.strategy) == ("fp8", "fp8", strategy)
    on_disk = load_file(str(path / SINGLE_FILE))
    (_, stored), = ckpt.stored_experts([(1, 2)])
    rows, cols = on_disk[GLM_EXPERT].shape
    want = {"channel": (rows, 1), "tensor": (1, 1), "block": (-(-rows // 16), -(-cols // 16))}[strategy]
    assert isinstance(stored.w2, Fp8Blocks) and tuple(stored.w2.scale_inv.shape) == want
    assert torch.equal(stored.w2.scale_inv.flatten(), on_disk[GLM_EXPERT + "_scale"].flatten())


def test_the_experts_are_close_to_the_model_they_were_quantized_from(glm_fp8) -> None:
    _, path, model = glm_fp8
    (_, got), = HFCheckpoint(path).experts([(1, 2)])
    down = model.model.layers[1].mlp.experts.down_proj[2].detach()  # [H, F]
    assert (got.w2 - down).abs().max() < 0.07 * down.abs().max()
    assert not torch.equal(got.w2, down), "FP8 rounds"


def test_dense_tensors_come_dequantized_without_scales_or_activation_scales(glm_fp8) -> None:
    strategy, path, _ = glm_fp8
    dense = HFCheckpoint(path).dense_tensors()
    key = "model.layers.0.self_attn.o_proj.weight"
    whole = load_file(str(path / SINGLE_FILE))
    assert whole[key].dtype == torch.float8_e4m3fn and key.removesuffix("weight") + "input_scale" in whole
    assert dense[key].dtype == torch.float32
    assert not any(k.endswith(("_scale", ".input_scale")) for k in dense), "scales are not model tensors"
    if strategy != "block":  # one scale per row or per matrix: the stored value times it, as compressed-tensors does
        assert torch.equal(dense[key], whole[key].float() * whole[key + "_scale"].float())


def test_the_plan_sizes_each_replica_as_the_worker_holds_it(glm_fp8) -> None:
    _, path, _ = glm_fp8
    ckpt = HFCheckpoint(path)
    worker = ExpertWorker(0, ckpt, device="cpu", torch_threads=torch.get_num_threads())
    assert checkpoint_memory(ckpt).replica_bytes == [worker.load([g]) for g in range(ckpt.spec.num_logical_experts)]


def test_a_per_row_scale_lets_shared_pieces_start_anywhere(tmp_path) -> None:
    """Qwen2-MoE's shared MLP (40 units) as 2 pieces of 24: blocks of 16 rows would be refused
    (see test_compact_weights_checkpoint); per-row scales cut at row 24 as they are."""
    BY_NAME["qwen2-shared-expert"].save_fp8(tmp_path / "q", block=(16, 16), tokenizer=False, strategy="channel")
    ckpt = HFCheckpoint(tmp_path / "q")
    pieces = dict(ckpt.stored_experts([(1, 8), (1, 9)]))
    whole = load_file(str(tmp_path / "q" / SINGLE_FILE))
    for p, key, axis in (("w1", "gate_proj", 0), ("w2", "down_proj", 1)):
        key = f"model.layers.1.mlp.shared_expert.{key}.weight"
        full = whole[key].float() * whole[key + "_scale"]
        first, last = (getattr(pieces[(1, e)], p).dequantize(torch.float32) for e in (8, 9))
        if axis == 0:
            assert torch.equal(first, full[:24]) and torch.equal(last[:16], full[24:]) and not last[16:].any()
        else:
            assert torch.equal(first, full[:, :24]) and torch.equal(last[:, :16], full[:, 24:]) and not last[:, 16:].any()


def _ct(weights: dict, **extra) -> dict:
    return {"quantization_config": {"quant_method": "compressed-tensors", "format": "float-quantized",
                                    "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}, **extra}}


FP8_CHANNEL = {"num_bits": 8, "type": "float", "strategy": "channel"}


def test_the_config_is_parsed_and_what_is_not_served_is_refused_naming_the_key() -> None:
    assert read_quant_config(_ct(FP8_CHANNEL)).strategy == "channel"
    block = read_quant_config(_ct({**FP8_CHANNEL, "strategy": "block", "block_structure": [128, 128]}))
    assert (block.strategy, block.block, block.scale_key("x.weight")) == ("block", (128, 128), "x.weight_scale")
    refusals = [
        ({**_ct(FP8_CHANNEL), "quantization_config": {**_ct(FP8_CHANNEL)["quantization_config"],
                                                      "format": "pack-quantized"}}, "'quantization_config.format'"),
        (_ct({"num_bits": 4, "type": "int", "strategy": "group"}), "must describe 8-bit float weights"),
        (_ct({**FP8_CHANNEL, "strategy": "group"}), "'quantization_config.config_groups.group_0.weights.strategy'"),
        (_ct({**FP8_CHANNEL, "strategy": "block"}), "block_structure"),
        ({"quantization_config": {"quant_method": "compressed-tensors", "format": "float-quantized",
                                  "config_groups": {"a": {"weights": FP8_CHANNEL},
                                                    "b": {"weights": {**FP8_CHANNEL, "strategy": "tensor"}}}}},
         "mixes weight schemes"),
    ]
    for config, words in refusals:
        with pytest.raises(ValueError) as caught:
            read_quant_config(config)
        assert words in str(caught.value), str(caught.value)


def test_a_misshapen_per_row_scale_is_refused_naming_it(tmp_path) -> None:
    path = tmp_path / "bad"
    BY_NAME["glm4-moe"].save_fp8(path, block=(16, 16), tokenizer=False, strategy="channel")
    from safetensors.torch import save_file

    tensors = load_file(str(path / SINGLE_FILE))
    tensors[GLM_EXPERT + "_scale"] = torch.ones(3, 1)
    save_file(tensors, str(path / SINGLE_FILE), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as caught:
        list(HFCheckpoint(path).stored_experts([(1, 2)]))
    for word in (f"'{GLM_EXPERT}_scale' has shape [3, 1]", "one scale per channel", "config_groups.*.weights.strategy"):
        assert word in str(caught.value), str(caught.value)
    assert json.loads((path / CONFIG_FILE).read_text())["quantization_config"]["quant_method"] == "compressed-tensors"
