"""Checkpoints of every family we serve, saved by `transformers` itself from its own config
classes: Qwen3-MoE, Qwen2-MoE (shared expert with a sigmoid gate), DeepSeek-V2 (greedy and
group-limited, shared experts, a dense first layer) and DeepSeek-V3 (sigmoid scores with a
correction bias, group-limited, shared experts).

For each: the spec comes from config.json; the served layer equals the family's own MoE block
to float32 precision (and picks the same experts); the whole model generates the same greedy
tokens with its MoE blocks served as alone (`moe-serve verify`); a dense layer is refused
naming the MoE layers; the model metadata lists both."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
import torch

from cluster.verify import LOGIT_REL_TOL, verify
from tests.integration.support import FP32_REL_TOL, MARKS, Served, hidden_states, rel_err, serve_config

pytestmark = MARKS
transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=48, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             max_position_embeddings=64, initializer_range=0.1)
DEEPSEEK_ATTENTION = dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                          qk_nope_head_dim=8, v_head_dim=16)


@dataclass(frozen=True)
class Case:
    name: str
    family: str
    config: Callable[[], object]
    dense: tuple[int, ...]  # layers with a plain MLP
    shared: int  # shared-expert pieces the spec should have
    seed: int


def _qwen3(norm: bool):
    return lambda: transformers.Qwen3MoeConfig(
        **SMALL, moe_intermediate_size=48, num_experts=6, num_experts_per_tok=2, norm_topk_prob=norm,
        mlp_only_layers=[0], decoder_sparse_step=1, num_key_value_heads=2, head_dim=16)


def _qwen2():
    return transformers.Qwen2MoeConfig(
        **SMALL, moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=False, mlp_only_layers=[0], decoder_sparse_step=1, num_key_value_heads=2)


def _deepseek_v2(method: str):
    return lambda: transformers.DeepseekV2Config(
        **SMALL, **DEEPSEEK_ATTENTION, moe_intermediate_size=24, n_routed_experts=8, n_shared_experts=2,
        num_experts_per_tok=3, first_k_dense_replace=1, topk_method=method, n_group=4, topk_group=2,
        routed_scaling_factor=1.5)


def _deepseek_v3():
    return transformers.DeepseekV3Config(
        **{**SMALL, **DEEPSEEK_ATTENTION, "q_lora_rank": 24}, moe_intermediate_size=24, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, norm_topk_prob=True)


CASES = [
    Case("qwen3-renormalised", "qwen3_moe", _qwen3(True), (0,), 0, 3),
    Case("qwen3-raw-softmax", "qwen3_moe", _qwen3(False), (0,), 0, 4),
    Case("qwen2-shared-expert", "qwen2_moe", _qwen2, (0,), 2, 5),  # 40 = 24 + 16 (+ 8 zero rows)
    Case("deepseek-v2-greedy", "deepseek_v2", _deepseek_v2("greedy"), (0,), 2, 6),
    Case("deepseek-v2-group-limited", "deepseek_v2", _deepseek_v2("group_limited_greedy"), (0,), 2, 7),
    Case("deepseek-v3", "deepseek_v3", _deepseek_v3, (0,), 1, 8),
]


@dataclass
class FamilyServed:
    case: Case
    served: Served
    hf: torch.nn.Module  # the family's ForCausalLM, float32, eval


def _tiny_model(case: Case) -> torch.nn.Module:
    torch.manual_seed(case.seed)
    model = transformers.AutoModelForCausalLM.from_config(case.config()).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            bias = getattr(getattr(layer.mlp, "gate", None), "e_score_correction_bias", None)
            if bias is not None:  # a trained model's bias is not zero: make it choose differently
                bias.copy_(0.3 * torch.randn_like(bias))
    return model


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.name)
def family(request, deploy_served, tmp_path_factory) -> Iterator[FamilyServed]:
    case: Case = request.param
    model = _tiny_model(case)
    path = tmp_path_factory.mktemp(case.name)
    model.save_pretrained(path)
    start, stop = deploy_served
    served = start(serve_config(f"it-{case.name}", checkpoint=str(path), workers=2))
    yield FamilyServed(case, served, model)
    stop(served)


def test_spec_read_from_the_config(family: FamilyServed) -> None:
    spec, cfg = family.served.spec, family.hf.config
    assert spec.family == family.case.family
    assert (spec.hidden_size, spec.intermediate_size, spec.top_k) == (
        cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok)
    assert spec.dense_layers == family.case.dense and spec.num_shared_experts == family.case.shared


@pytest.mark.parametrize("tokens", [1, 9, 200])
def test_served_layer_equals_the_family_block(family: FamilyServed, tokens: int) -> None:
    served = family.served
    for layer in served.spec.moe_layers:
        x = hidden_states(tokens, served.spec.hidden_size, seed=10 * layer + tokens)
        got = served.client.infer(served.name, x, layer=layer, topk=True, timeout_s=60)
        block = family.hf.model.layers[layer].mlp
        with torch.no_grad():
            want = block(torch.from_numpy(x.copy()).unsqueeze(0)).squeeze(0)
            _, weights, ids = block.gate(torch.from_numpy(x.copy()))
        assert rel_err(got.hidden_states, want) < FP32_REL_TOL, f"layer {layer}"
        assert (torch.from_numpy(got.topk_ids.astype("int64")).sort(-1).values == ids.sort(-1).values).all()
        served_weights = torch.from_numpy(got.topk_weights.copy()).sort(-1).values
        assert torch.allclose(served_weights, weights.sort(-1).values.float(), atol=1e-5)


def test_greedy_generation_through_the_served_layers_equals_transformers(family: FamilyServed) -> None:
    report = verify(family.hf, family.served.spec, family.served.client, family.served.name,
                    new_tokens=8, prompt_tokens=6, batch=2, seed=family.case.seed)
    assert report.tokens_equal, (report.reference_tokens, report.served_tokens)
    assert report.rel_logit_err < LOGIT_REL_TOL and report.ok
    assert report.moe_calls == (1 + 8 - 1) * family.served.spec.num_moe_layers + family.served.spec.num_moe_layers


def test_a_dense_layer_is_refused_naming_the_moe_layers(family: FamilyServed) -> None:
    served = family.served
    dense = family.case.dense[0]
    with pytest.raises(grpc.RpcError) as caught:
        served.client.infer(served.name, hidden_states(4, served.spec.hidden_size, seed=1), layer=dense, timeout_s=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"layer {dense} is not an MoE layer" in caught.value.details() and "1-2" in caught.value.details()


def test_model_metadata_names_the_moe_and_the_dense_layers(family: FamilyServed) -> None:
    from protos import grpc_predict_v2_pb2 as pb
    from protos import grpc_predict_v2_pb2_grpc as pb_grpc

    with grpc.insecure_channel(family.served.address) as channel:
        meta = pb_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(pb.ModelMetadataRequest(name=family.served.name))
    params = meta.parameters
    assert params["moe_layers"].string_param == "1-2" and params["dense_layers"].string_param == "0"
    assert params["family"].string_param == family.case.family
    assert params["top_k"].int64_param == family.hf.config.num_experts_per_tok
    assert params["num_shared_experts"].int64_param == family.case.shared
