"""The router's dense side is the checkpoint's own `transformers` model without its MoE blocks:
it never reads or holds an expert weight, refuses dense tensors that do not fit naming them, and
reports what each layer's attention caches (DeepSeek-V3's MLA: its compressed latent)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from router_service.generation.dense_model import DenseModel, DenseWeightsError
from workers.hf_checkpoint import HFCheckpoint
from workers.tiny_models import BY_NAME


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory) -> tuple[Path, HFCheckpoint]:
    path = tmp_path_factory.mktemp("dense") / "deepseek-v3"
    BY_NAME["deepseek-v3"].save(path)
    return path, HFCheckpoint(path)


def _config(path: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def test_the_dense_side_reads_and_holds_no_expert(deepseek):
    path, checkpoint = deepseek
    tensors = checkpoint.dense_tensors()
    moe_blocks = tuple(f"model.layers.{layer}.mlp." for layer in checkpoint.spec.moe_layers)

    assert tensors and not [k for k in tensors if k.startswith(moe_blocks)]
    assert "model.layers.0.mlp.gate_proj.weight" in tensors, "layer 0 is dense: its MLP runs on the router"
    model = DenseModel(_config(path), tensors, checkpoint.spec.moe_layers)
    names = [n for n, _ in model.model.named_parameters()]
    assert not [n for n in names if n.startswith(moe_blocks)]
    assert model.nbytes == sum(t.numel() * 4 for k, t in tensors.items() if k != "lm_head.weight" or
                               not model.config.tie_word_embeddings)


def test_missing_and_extra_dense_tensors_are_named(deepseek):
    path, checkpoint = deepseek
    tensors = checkpoint.dense_tensors()
    missing = {k: v for k, v in tensors.items() if k != "model.norm.weight"}
    extra = {**tensors, "model.layers.1.mlp.experts.0.gate_proj.weight": torch.zeros(1)}
    wrong = {**tensors, "model.norm.weight": torch.zeros(3)}

    with pytest.raises(DenseWeightsError, match=r"missing 1 dense tensors, first \['model.norm.weight'\]"):
        DenseModel(_config(path), missing, checkpoint.spec.moe_layers)
    with pytest.raises(DenseWeightsError, match=r"1 tensors the model has no place for, first \['model.layers.1.mlp"):
        DenseModel(_config(path), extra, checkpoint.spec.moe_layers)
    with pytest.raises(DenseWeightsError, match=r"'model.norm.weight' has shape \[3\], the config says \[64\]"):
        DenseModel(_config(path), wrong, checkpoint.spec.moe_layers)


def test_what_each_layer_caches(deepseek, tmp_path):
    path, checkpoint = deepseek
    shapes = DenseModel(_config(path), checkpoint.dense_tensors(), checkpoint.spec.moe_layers).kv_shapes()
    config = _config(path)

    assert sorted(shapes) == list(range(config.num_hidden_layers))
    latent = shapes[0]
    assert (latent.key_heads, latent.key_dim) == (1, config.kv_lora_rank), "MLA caches its compressed latent"
    assert (latent.value_heads, latent.value_dim) == (1, config.qk_rope_head_dim)

    mixtral = tmp_path / "mixtral"
    BY_NAME["mixtral"].save(mixtral)
    plain = HFCheckpoint(mixtral)
    gqa = DenseModel(_config(mixtral), plain.dense_tensors(), plain.spec.moe_layers).kv_shapes()[0]
    assert (gqa.key_heads, gqa.key_dim, gqa.value_heads) == (2, 16, 2), "grouped-query keys: 2 heads of 64 / 4"
