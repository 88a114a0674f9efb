"""A Qwen3-MoE checkpoint saved by `transformers` itself is served: the spec (MoE and dense
layers, gate renormalisation) comes from its config.json, and the served layer equals the
family's own `Qwen3MoeSparseMoeBlock` to float32 precision. A dense layer is refused naming the
MoE layers."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
import torch

from tests.integration.support import FP32_REL_TOL, MARKS, Served, hidden_states, rel_err, serve_config

pytestmark = MARKS
transformers = pytest.importorskip("transformers")


@dataclass(frozen=True)
class Case:
    name: str
    norm_topk_prob: bool
    seed: int


CASES = [Case("renormalised", True, 3), Case("raw-softmax", False, 4)]
DENSE = [0]  # mlp_only_layers: layer 0 has a plain MLP


@dataclass
class QwenServed:
    served: Served
    hf: torch.nn.Module  # Qwen3MoeForCausalLM, float32, eval


def _tiny_qwen3_moe(case: Case):
    config = transformers.Qwen3MoeConfig(
        hidden_size=64, moe_intermediate_size=48, intermediate_size=96, num_hidden_layers=3,
        num_experts=6, num_experts_per_tok=2, norm_topk_prob=case.norm_topk_prob, mlp_only_layers=DENSE,
        decoder_sparse_step=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=32,
        max_position_embeddings=64, initializer_range=0.1,
    )
    torch.manual_seed(case.seed)
    return transformers.Qwen3MoeForCausalLM(config).eval()


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.name)
def qwen(request, deploy_served, tmp_path_factory) -> Iterator[QwenServed]:
    case: Case = request.param
    model = _tiny_qwen3_moe(case)
    path = tmp_path_factory.mktemp(f"qwen3-moe-{case.name}")
    model.save_pretrained(path)
    start, stop = deploy_served
    served = start(serve_config(f"it-qwen3-{case.name}", checkpoint=str(path), workers=2))
    yield QwenServed(served, model)
    stop(served)


def test_spec_read_from_the_qwen3_moe_config(qwen: QwenServed) -> None:
    spec, cfg = qwen.served.spec, qwen.hf.config
    assert (spec.hidden_size, spec.intermediate_size, spec.num_experts, spec.top_k) == (
        cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok)
    assert spec.moe_layers == (1, 2) and spec.norm_topk_prob == cfg.norm_topk_prob


@pytest.mark.parametrize("tokens", [1, 9, 200])
def test_served_layer_equals_the_qwen3_moe_block(qwen: QwenServed, tokens: int) -> None:
    served = qwen.served
    for layer in served.spec.moe_layers:
        x = hidden_states(tokens, served.spec.hidden_size, seed=10 * layer + tokens)
        got = served.client.infer(served.name, x, layer=layer, topk=True, timeout_s=60)
        block = qwen.hf.model.layers[layer].mlp
        with torch.no_grad():
            want = block(torch.from_numpy(x.copy()).unsqueeze(0)).squeeze(0)
            _, weights, ids = block.gate(torch.from_numpy(x.copy()))
        assert rel_err(got.hidden_states, want) < FP32_REL_TOL, f"layer {layer}"
        assert (torch.from_numpy(got.topk_ids.astype("int64")).sort(-1).values == ids.sort(-1).values).all()
        weight_sums = torch.from_numpy(got.topk_weights.copy()).sum(-1)
        assert torch.allclose(weight_sums, weights.sum(-1), atol=1e-5)  # 1.0 only when renormalised


def test_a_dense_layer_is_refused_naming_the_moe_layers(qwen: QwenServed) -> None:
    served = qwen.served
    with pytest.raises(grpc.RpcError) as caught:
        served.client.infer(served.name, hidden_states(4, served.spec.hidden_size, seed=1), layer=DENSE[0], timeout_s=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "layer 0 is not an MoE layer" in caught.value.details() and "1-2" in caught.value.details()


def test_model_metadata_names_the_moe_and_the_dense_layers(qwen: QwenServed) -> None:
    from protos import grpc_predict_v2_pb2 as pb
    from protos import grpc_predict_v2_pb2_grpc as pb_grpc

    with grpc.insecure_channel(qwen.served.address) as channel:
        meta = pb_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(pb.ModelMetadataRequest(name=qwen.served.name))
    params = meta.parameters
    assert params["moe_layers"].string_param == "1-2" and params["dense_layers"].string_param == "0"
    assert params["family"].string_param == "qwen3_moe" and params["top_k"].int64_param == 2
