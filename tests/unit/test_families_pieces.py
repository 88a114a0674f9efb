"""The pure pieces behind the newer families, with literal tensors against the families' own
`transformers` modules: the gate variants (DBRX p-norm, gpt-oss router bias, Llama 4 sigmoid
top-1, Mistral 4 group-limited softmax), the activation table, gpt-oss's clamped SwiGLU with
biases, Llama 4's input-scaled experts, and the layouts (keys, MoE layers, refusals)."""

from __future__ import annotations

import pytest
import torch

from cluster.model_spec import ACTIVATIONS, ExpertForm, GateSpec, GateWeights
from router_service.gate import route
from workers.expert_math import ACTIVATION_FNS, expert_ffn, run_experts
from workers.hf_layouts import BY_FAMILY, DBRX, GPT_OSS, LLAMA4, layout_for

transformers = pytest.importorskip("transformers")
from transformers.activations import ACT2FN  # noqa: E402

H, E = 16, 8


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _sorted(ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = ids.argsort(dim=-1)
    return ids.gather(1, order), weights.gather(1, order)


def _same_routing(ours, ids: torch.Tensor, weights: torch.Tensor) -> None:
    got_ids, got_w = _sorted(ours.topk_ids, ours.topk_weights)
    want_ids, want_w = _sorted(ids, weights.float())
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_w, want_w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("p", [1.0, 2.0, None], ids=["sum", "l2", "none"])
def test_dbrx_router_with_its_p_norm(p) -> None:
    from transformers.models.dbrx.modeling_dbrx import DbrxFFN

    config = transformers.DbrxConfig(d_model=H, n_heads=2, ffn_config={"ffn_hidden_size": 8, "moe_num_experts": E,
                                                                       "moe_top_k": 3, "moe_normalize_expert_weights": p})
    ffn = DbrxFFN(config).eval()
    weight = randn(E, H, seed=1)
    ffn.router.layer.weight.data.copy_(weight)
    x = randn(20, H, seed=2)
    with torch.no_grad():
        want_w, want_ids = ffn.route_tokens_to_experts(ffn.router(x))
    spec = DBRX.gate_spec(DBRX.flatten(config.to_dict()))
    assert spec.norm_topk_prob == (p is not None) and spec.norm_p == (p or 1.0)
    _same_routing(route(x, GateWeights(weight), spec, 3), want_ids, want_w)


def test_gpt_oss_router_adds_its_bias_and_softmaxes_the_top_k() -> None:
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter

    config = transformers.GptOssConfig(hidden_size=H, num_local_experts=E, num_experts_per_tok=2)
    router = GptOssTopKRouter(config)
    weight, bias = randn(E, H, seed=3), 2.0 * randn(E, seed=4)
    router.weight.data.copy_(weight)
    router.bias.data.copy_(bias)
    x = randn(20, H, seed=5)
    with torch.no_grad():
        _, want_w, want_ids = router(x)
    spec = GPT_OSS.gate_spec({})
    _same_routing(route(x, GateWeights(weight, bias=bias), spec, 2), want_ids, want_w)
    unbiased = route(x, GateWeights(weight, bias=torch.zeros(E)), spec, 2)
    assert not torch.equal(unbiased.topk_ids.sort(-1).values, want_ids.sort(-1).values), "the bias must matter here"
    with pytest.raises(ValueError, match="router bias"):
        route(x, GateWeights(weight), spec, 2)


def test_llama4_router_is_sigmoid_of_the_top_logit() -> None:
    from transformers.models.llama4.modeling_llama4 import Llama4Router

    config = transformers.Llama4TextConfig(hidden_size=H, num_local_experts=E, num_experts_per_tok=1)
    router = Llama4Router(config)
    weight = randn(E, H, seed=6)
    router.weight.data.copy_(weight)
    x = randn(20, H, seed=7)
    with torch.no_grad():
        scores, logits = router(x)
    ids = logits.topk(1, dim=1).indices
    _same_routing(route(x, GateWeights(weight), LLAMA4.gate_spec({}), 1), ids, scores.gather(1, ids))


def test_mistral4_router_group_limited_softmax() -> None:
    from transformers.models.mistral4.modeling_mistral4 import Mistral4TopkRouter

    config = transformers.Mistral4Config(hidden_size=H, n_routed_experts=E, num_experts_per_tok=3, n_group=4,
                                         topk_group=2, routed_scaling_factor=1.5, norm_topk_prob=True)
    router = Mistral4TopkRouter(config)
    weight = randn(E, H, seed=8)
    router.weight.data.copy_(weight)
    x = randn(30, H, seed=9)
    with torch.no_grad():
        _, want_w, want_ids = router(x)
    spec = BY_FAMILY["mistral4"].gate_spec(config.to_dict())
    _same_routing(route(x, GateWeights(weight), spec, 3), want_ids, want_w)


@pytest.mark.parametrize("name", sorted(ACTIVATION_FNS))
def test_the_activation_table_is_transformers_act2fn(name) -> None:
    x = torch.linspace(-6, 6, 101)
    theirs = ACT2FN["gelu_pytorch_tanh" if name == "gelu_tanh" else name]  # gelu_tanh: our alias (Grok's name)
    torch.testing.assert_close(ACTIVATION_FNS[name](x), theirs(x), rtol=1e-6, atol=1e-6)


def test_the_table_covers_every_served_activation_and_unknown_ones_are_refused() -> None:
    assert set(ACTIVATION_FNS) | {"gpt_oss_swiglu"} == set(ACTIVATIONS)
    with pytest.raises(ValueError, match="'tanh' is not served.*silu"):
        ExpertForm("tanh")
    with pytest.raises(ValueError, match="swiglu_limit"):
        ExpertForm("silu", swiglu_limit=7.0)


def test_gelu_experts_differ_from_silu_ones() -> None:
    x, w13, w2 = randn(5, H, seed=10), randn(12, H, seed=11), randn(H, 6, seed=12)
    gelu = expert_ffn(x, w13, w2, ExpertForm("gelu"))
    gate, up = (x @ w13.t()).chunk(2, dim=-1)
    torch.testing.assert_close(gelu, (torch.nn.functional.gelu(gate) * up) @ w2.t())
    assert not torch.allclose(gelu, expert_ffn(x, w13, w2, ExpertForm()))


def test_gpt_oss_expert_with_biases_and_its_clamp_equals_its_module() -> None:
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    config = transformers.GptOssConfig(hidden_size=H, intermediate_size=6, num_local_experts=1, swiglu_limit=0.5)
    module = GptOssExperts(config)
    gate_up, gate_up_bias = randn(1, H, 12, seed=13), randn(1, 12, seed=14)
    down, down_bias = randn(1, 6, H, seed=15), randn(1, H, seed=16)
    for param, value in ((module.gate_up_proj, gate_up), (module.gate_up_proj_bias, gate_up_bias),
                         (module.down_proj, down), (module.down_proj_bias, down_bias)):
        param.data.copy_(value)
    x = randn(7, H, seed=17)
    with torch.no_grad():
        want = module(x, torch.zeros(7, 1, dtype=torch.int64), torch.ones(7, 1))
    w = gate_up[0].t()  # [2F, H], gate rows even, up rows odd
    w13 = torch.cat([w[0::2], w[1::2]])
    b13 = torch.cat([gate_up_bias[0, 0::2], gate_up_bias[0, 1::2]])
    form = ExpertForm("gpt_oss_swiglu", swiglu_limit=0.5, bias=True)
    torch.testing.assert_close(expert_ffn(x, w13, down[0].t(), form, b13, down_bias[0]), want, rtol=1e-5, atol=1e-6)


def test_llama4_weights_scale_the_input_of_the_expert() -> None:
    x, w13, w2 = randn(4, H, seed=18), randn(12, H, seed=19), randn(H, 6, seed=20)
    weights = torch.tensor([0.2, 0.5, 0.9, 0.7])
    offsets, token_idx = torch.tensor([0, 4]), torch.arange(4)
    _, on_input = run_experts(x, [(w13, w2)], offsets, token_idx, weights, form=ExpertForm(weight_on_input=True))
    _, on_output = run_experts(x, [(w13, w2)], offsets, token_idx, weights)
    torch.testing.assert_close(on_input, expert_ffn(x * weights[:, None], w13, w2, ExpertForm()))
    torch.testing.assert_close(on_output, expert_ffn(x, w13, w2, ExpertForm()) * weights[:, None])
    assert not torch.allclose(on_input, on_output)


def test_layout_keys_and_moe_layers_of_the_new_families() -> None:
    assert DBRX.gate_key(2) == "transformer.blocks.2.ffn.router.layer.weight"
    assert DBRX.fused_keys(0) == {"w1": "transformer.blocks.0.ffn.experts.mlp.w1",
                                  "w3": "transformer.blocks.0.ffn.experts.mlp.v1",
                                  "w2": "transformer.blocks.0.ffn.experts.mlp.w2"}
    assert GPT_OSS.router_bias_key(1) == "model.layers.1.mlp.router.bias"
    assert GPT_OSS.fused_keys(1)["down_bias"] == "model.layers.1.mlp.experts.down_proj_bias"
    assert LLAMA4.shared_key(3, "w2") == "model.layers.3.feed_forward.shared_expert.down_proj.weight"
    interleaved = {"interleave_moe_layer_step": 2}
    assert [layer for layer in range(6) if LLAMA4.moe_layer(layer, interleaved)] == [1, 3, 5]
    assert [layer for layer in range(6) if LLAMA4.moe_layer(layer, {"moe_layers": [0, 4]})] == [0, 4]
    assert [layer for layer in range(4) if BY_FAMILY["glm4_moe"].moe_layer(layer, {"first_k_dense_replace": 3})] == [3]
    with pytest.raises(ValueError, match="stack a layer's experts"):
        DBRX.expert_key(0, 0, "w1")


@pytest.mark.parametrize(("config", "words"), [
    ({"architectures": ["GrokForCausalLM"]}, ["GrokForCausalLM", "not supported", "DbrxForCausalLM",
                                               "GptOssForCausalLM", "Llama4ForCausalLM", "Mistral4ForCausalLM",
                                               "Glm4MoeForCausalLM"]),
    ({"architectures": ["Llama4ForConditionalGeneration"]}, ["Llama4ForConditionalGeneration", "Llama4ForCausalLM"]),
])
def test_an_unserved_architecture_is_refused_listing_the_served_ones(config, words) -> None:
    with pytest.raises(ValueError) as caught:
        layout_for(config)
    assert all(w in str(caught.value) for w in words), str(caught.value)


@pytest.mark.parametrize(("ffn", "match"), [
    ({"moe_normalize_expert_weights": -1}, "moe_normalize_expert_weights"),
    ({"ffn_act_fn": "silu"}, "ffn_act_fn"),
])
def test_bad_dbrx_configs_are_refused_naming_the_key(ffn, match) -> None:
    with pytest.raises(ValueError, match=match):
        DBRX.gate_spec(DBRX.flatten({"ffn_config": ffn}))


def test_gate_spec_checks_its_norm_p() -> None:
    with pytest.raises(ValueError, match="norm_p"):
        GateSpec(norm_p=0.0)


def test_llama4_temperature_tuning_on_no_rope_layers_is_refused_for_generation() -> None:
    from router_service.generation.dense_model import DenseModel, DenseWeightsError

    config = transformers.Llama4TextConfig(hidden_size=H, num_hidden_layers=4, num_attention_heads=2, head_dim=8,
                                           num_key_value_heads=1, no_rope_layers=[1, 1, 1, 0],
                                           attn_temperature_tuning=True)
    with pytest.raises(DenseWeightsError, match=r"temperature tuning.*no-RoPE layers \[3\].*MoE layers only"):
        DenseModel(config, {}, [1])
