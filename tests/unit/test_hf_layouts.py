"""Which checkpoint layout a config.json describes, and which of its layers are MoE layers."""

from __future__ import annotations

import pytest

from cluster.model_spec import GateSpec
from workers.hf_layouts import DEEPSEEK_V2, DEEPSEEK_V3, MIXTRAL, QWEN2_MOE, QWEN3_MOE, layout_for


@pytest.mark.parametrize(("config", "layout"), [
    pytest.param({"architectures": ["MixtralForCausalLM"]}, MIXTRAL, id="mixtral"),
    pytest.param({"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe"}, QWEN3_MOE, id="qwen3-moe"),
    pytest.param({"model_type": "qwen3_moe"}, QWEN3_MOE, id="qwen3-moe-by-model-type"),
    pytest.param({"architectures": ["Qwen2MoeForCausalLM"]}, QWEN2_MOE, id="qwen2-moe"),
    pytest.param({"architectures": ["DeepseekV2ForCausalLM"]}, DEEPSEEK_V2, id="deepseek-v2"),
    pytest.param({"model_type": "deepseek_v3"}, DEEPSEEK_V3, id="deepseek-v3-by-model-type"),
    pytest.param({}, MIXTRAL, id="bare-config"),
])
def test_layout_from_the_config(config, layout):
    assert layout_for(config) is layout


@pytest.mark.parametrize(("config", "words"), [
    pytest.param({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, ["LlamaForCausalLM", "not supported",
                                                                                  "Qwen3MoeForCausalLM"], id="dense-llama"),
    pytest.param({"architectures": ["JambaForCausalLM"], "model_type": "jamba"},
                 ["JambaForCausalLM", "not supported", "DeepseekV3ForCausalLM"], id="jamba"),
])
def test_an_unsupported_architecture_is_named(config, words):
    with pytest.raises(ValueError) as caught:
        layout_for(config)
    assert all(w in str(caught.value) for w in words), str(caught.value)


def test_qwen3_moe_dense_layers_come_from_mlp_only_layers_and_the_sparse_step():
    config = {"mlp_only_layers": [0], "decoder_sparse_step": 2}
    assert [layer for layer in range(6) if QWEN3_MOE.moe_layer(layer, config)] == [1, 3, 5]
    assert QWEN3_MOE.gate_spec({"norm_topk_prob": True}).norm_topk_prob
    assert not QWEN3_MOE.gate_spec({}).norm_topk_prob


def test_deepseek_dense_first_layers_and_layer_frequency():
    assert [layer for layer in range(6) if DEEPSEEK_V3.moe_layer(layer, {"first_k_dense_replace": 2})] == [2, 3, 4, 5]
    config = {"first_k_dense_replace": 1, "moe_layer_freq": 2}
    assert [layer for layer in range(6) if DEEPSEEK_V2.moe_layer(layer, config)] == [2, 4]


def test_gate_variants_from_the_config():
    assert MIXTRAL.gate_spec({}) == GateSpec()
    greedy = DEEPSEEK_V2.gate_spec({"topk_method": "greedy", "n_group": 4, "topk_group": 2, "routed_scaling_factor": 16.0})
    assert (greedy.n_group, greedy.norm_topk_prob, greedy.routed_scaling_factor) == (1, False, 16.0)
    grouped = DEEPSEEK_V2.gate_spec({"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2})
    assert (grouped.n_group, grouped.topk_group, grouped.group_score, grouped.scoring) == (4, 2, "max", "softmax")
    v3 = DEEPSEEK_V3.gate_spec({"n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5, "norm_topk_prob": True})
    assert (v3.scoring, v3.correction_bias, v3.group_score, v3.n_group, v3.routed_scaling_factor) == (
        "sigmoid", True, "top2_sum", 8, 2.5)
    assert QWEN2_MOE.shared_size({"shared_expert_intermediate_size": 40}) == 40
    assert DEEPSEEK_V3.shared_size({"n_shared_experts": 2, "moe_intermediate_size": 16}) == 32


def test_tensor_keys_of_each_layout():
    assert MIXTRAL.expert_key(3, 1, "w1") == "model.layers.3.block_sparse_moe.experts.1.w1.weight"
    assert QWEN3_MOE.expert_key(3, 1, "w1") == "model.layers.3.mlp.experts.1.gate_proj.weight"
    assert QWEN3_MOE.expert_key(3, 1, "w3") == "model.layers.3.mlp.experts.1.up_proj.weight"
    assert QWEN3_MOE.expert_key(3, 1, "w2") == "model.layers.3.mlp.experts.1.down_proj.weight"
    assert QWEN3_MOE.gate_key(2) == "model.layers.2.mlp.gate.weight"
    assert QWEN2_MOE.shared_key(2, "w3") == "model.layers.2.mlp.shared_expert.up_proj.weight"
    assert QWEN2_MOE.shared_gate_key(2) == "model.layers.2.mlp.shared_expert_gate.weight"
    assert DEEPSEEK_V3.shared_key(2, "w2") == "model.layers.2.mlp.shared_experts.down_proj.weight"
    assert DEEPSEEK_V3.correction_bias_key(2) == "model.layers.2.mlp.gate.e_score_correction_bias"
