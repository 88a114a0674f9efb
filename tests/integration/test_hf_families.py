"""Checkpoints of every family we serve, saved by `transformers` itself from its own config
classes (`workers/tiny_models.py`): Mixtral, Qwen3-MoE, Qwen2-MoE (shared expert with a sigmoid gate), DeepSeek-V2 (greedy and
group-limited, shared experts, a dense first layer) and DeepSeek-V3 (sigmoid scores with a
correction bias, group-limited, shared experts), GLM-4.5 MoE, Mistral 4 (stacked experts), DBRX
(fused expert tensors, p-norm weights), gpt-oss (router bias, expert biases, clamped SwiGLU),
Llama 4 (sigmoid top-1 scaling the expert's input, a shared expert) and a Mixtral whose experts
are GELU-gated.

For each: the spec comes from config.json; the served layer equals the family's own MoE block
to float32 precision (and picks the same experts); the whole model generates the same greedy
tokens with its MoE blocks served as alone (`moe-serve verify`); a dense layer is refused
naming the MoE layers; the model metadata lists both."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
import torch

from cluster.app.verify import LOGIT_REL_TOL, moe_blocks, verify
from tests.integration.support import FP32_REL_TOL, MARKS, Served, hidden_states, rel_err, serve_config
from workers.tiny_models import FAMILIES, TinyFamily

pytestmark = MARKS
pytest.importorskip("transformers")


@dataclass
class FamilyServed:
    case: TinyFamily
    served: Served
    hf: torch.nn.Module  # the family's ForCausalLM, float32, eval


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda c: c.name)
def family(request, deploy_served, tmp_path_factory) -> Iterator[FamilyServed]:
    case: TinyFamily = request.param
    path = tmp_path_factory.mktemp(case.name)
    model = case.save(path)
    start, stop = deploy_served
    served = start(serve_config(f"it-{case.name}", checkpoint=str(path), workers=2))
    yield FamilyServed(case, served, model)
    stop(served)


def _sizes(cfg) -> tuple[int, int, int]:
    """(hidden, expert intermediate, top-k) as the family's own config object says."""
    if hasattr(cfg, "ffn_config"):  # DBRX
        return cfg.d_model, cfg.ffn_config.ffn_hidden_size, cfg.ffn_config.moe_top_k
    inter = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    return cfg.hidden_size, inter, cfg.num_experts_per_tok


def _block_routing(block: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, ids) `[T, k]` from the family's own router module."""
    name = type(block).__name__
    if name == "DbrxFFN":
        return block.route_tokens_to_experts(block.router(x))
    if name == "GptOssMLP":
        _, weights, ids = block.router(x)
        return weights, ids
    if name == "Llama4TextMoe":
        scores, logits = block.router(x)
        ids = torch.topk(logits, block.top_k, dim=1).indices
        return scores.gather(1, ids), ids
    _, weights, ids = block.gate(x)
    return weights, ids


def test_spec_read_from_the_config(family: FamilyServed) -> None:
    spec, cfg = family.served.spec, family.hf.config
    assert spec.family == family.case.family
    assert (spec.hidden_size, spec.intermediate_size, spec.top_k) == _sizes(cfg)
    assert spec.dense_layers == family.case.dense and spec.num_shared_experts == family.case.shared


@pytest.mark.parametrize("tokens", [1, 9, 200])
def test_served_layer_equals_the_family_block(family: FamilyServed, tokens: int) -> None:
    served = family.served
    for layer in served.spec.moe_layers:
        x = hidden_states(tokens, served.spec.hidden_size, seed=10 * layer + tokens)
        got = served.client.infer(served.name, x, layer=layer, topk=True, timeout_s=60)
        block = moe_blocks(family.hf, served.spec)[layer]
        with torch.no_grad():
            want = block(torch.from_numpy(x.copy()).unsqueeze(0))
            want = (want[0] if isinstance(want, tuple) else want).reshape(tokens, -1)
            weights, ids = _block_routing(block, torch.from_numpy(x.copy()))
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
    if not family.case.dense:
        pytest.skip(f"{family.case.family} has no dense layer")
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
    dense = ", ".join(map(str, family.case.dense)) or "none"
    assert params["moe_layers"].string_param == family.served.spec.describe_layers()
    assert params["dense_layers"].string_param == dense
    assert params["family"].string_param == family.case.family
    assert params["top_k"].int64_param == _sizes(family.hf.config)[2]
    assert params["num_shared_experts"].int64_param == family.case.shared
