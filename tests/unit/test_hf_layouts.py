"""Which checkpoint layout a config.json describes, and which of its layers are MoE layers."""

from __future__ import annotations

import pytest

from workers.hf_layouts import MIXTRAL, QWEN3_MOE, layout_for


@pytest.mark.parametrize(("config", "layout"), [
    pytest.param({"architectures": ["MixtralForCausalLM"]}, MIXTRAL, id="mixtral"),
    pytest.param({"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe"}, QWEN3_MOE, id="qwen3-moe"),
    pytest.param({"model_type": "qwen3_moe"}, QWEN3_MOE, id="qwen3-moe-by-model-type"),
    pytest.param({}, MIXTRAL, id="bare-config"),
])
def test_layout_from_the_config(config, layout):
    assert layout_for(config) is layout


@pytest.mark.parametrize(("config", "words"), [
    pytest.param({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, ["LlamaForCausalLM", "not supported",
                                                                                  "Qwen3MoeForCausalLM"], id="dense-llama"),
    pytest.param({"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"},
                 ["DeepseekV3ForCausalLM", "correction bias", "not served yet"], id="deepseek-v3"),
    pytest.param({"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe"},
                 ["Qwen2MoeForCausalLM", "shared expert"], id="qwen2-moe"),
])
def test_an_unsupported_architecture_is_named(config, words):
    with pytest.raises(ValueError) as caught:
        layout_for(config)
    assert all(w in str(caught.value) for w in words), str(caught.value)


def test_qwen3_moe_dense_layers_come_from_mlp_only_layers_and_the_sparse_step():
    config = {"mlp_only_layers": [0], "decoder_sparse_step": 2}
    assert [layer for layer in range(6) if QWEN3_MOE.moe_layer(layer, config)] == [1, 3, 5]
    assert QWEN3_MOE.norm_topk_prob({"norm_topk_prob": True}) and not QWEN3_MOE.norm_topk_prob({})


def test_tensor_keys_of_each_layout():
    assert MIXTRAL.expert_key(3, 1, "w1") == "model.layers.3.block_sparse_moe.experts.1.w1.weight"
    assert QWEN3_MOE.expert_key(3, 1, "w1") == "model.layers.3.mlp.experts.1.gate_proj.weight"
    assert QWEN3_MOE.expert_key(3, 1, "w3") == "model.layers.3.mlp.experts.1.up_proj.weight"
    assert QWEN3_MOE.expert_key(3, 1, "w2") == "model.layers.3.mlp.experts.1.down_proj.weight"
    assert QWEN3_MOE.gate_key(2) == "model.layers.2.mlp.gate.weight"
