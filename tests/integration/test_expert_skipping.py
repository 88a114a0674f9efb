"""Expert skipping on served models: the layer API (a random model whose config skips at 0.25,
beside the shared model that does not) and text generation (a tiny Mixtral checkpoint).

A threshold of 0 gives exactly the unskipped answer; a threshold above 0 drops expert-tokens,
which the router counts (and exports as `skipped_expert_tokens`) and does not count as routed
load, and its answer equals the in-process reference that applies the same skipping
(`ReferenceMoE`, and a text model whose MoE layers are that reference); a request's own value
overrides the model's; an out-of-range value is INVALID_ARGUMENT naming the parameter."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import grpc
import numpy as np
import pytest
import torch

from cluster.control.metrics import exported_name
from protos import grpc_predict_v2_pb2_grpc as pb_grpc
from router_service.client import InferResult, build_request, parse_response
from router_service.generation.engine import EngineSettings
from router_service.generation.params import SamplingParams
from router_service.generation.text import build_text_model
from tests.integration.conftest import MAIN_RANDOM
from tests.integration.support import (
    FP32_REL_TOL,
    MARKS,
    Served,
    hidden_states,
    rel_err,
    run_on,
    scrape,
    serve_config,
    wait_until,
)
from tests.integration.support import total as metric_total
from workers.hf_checkpoint import HFCheckpoint
from workers.tiny_models import BY_NAME

pytestmark = MARKS

MODEL_THRESHOLD = 0.25
SKIPPED = exported_name("skipped_expert_tokens") + "_total"


@pytest.fixture(scope="module")
def skipping(deploy_served):
    """The shared model's weights (same seed, same workers), served with model.expert_skip_threshold 0.25."""
    start, stop = deploy_served
    config = serve_config("it-skip", random=MAIN_RANDOM, workers=2).with_overrides(**{
        "model.expert_skip_threshold": MODEL_THRESHOLD, "rebalance.enabled": False})
    served = start(config)
    yield served
    stop(served)


def infer(served: Served, x: np.ndarray, layer: int, threshold=None, kind: str = "double_param") -> InferResult:
    request = build_request(served.name, x, layer, topk=True)
    if threshold is not None:
        setattr(request.parameters["expert_skip_threshold"], kind, threshold)
    with grpc.insecure_channel(served.address) as channel:
        return parse_response(pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60))


def skipped_in_process(served: Served, layer: int, x: np.ndarray, threshold: float) -> tuple[int, int]:
    """(expert-tokens the in-process reference's gate and skipping drop, expert-tokens they keep) for `x`."""
    _, routing = served.reference.forward(layer, torch.from_numpy(x.copy()), torch.full((x.shape[0],), threshold))
    if routing.kept is None:
        return 0, routing.topk_ids.numel()
    return int((~routing.kept).sum()), int(routing.kept.sum())


def test_threshold_zero_gives_exactly_the_unskipped_answer(main_server: Served, skipping: Served) -> None:
    x = hidden_states(48, MAIN_RANDOM["hidden"], seed=70)
    router = skipping.deployment.router
    before = router.skipped_expert_tokens.copy()
    plain = infer(main_server, x, layer=1)  # a model that does not skip, no parameter
    zero_here = infer(main_server, x, layer=1, threshold=0.0)
    zero_there = infer(skipping, x, layer=1, threshold=0.0)  # overrides the model's 0.25
    zero_int = infer(skipping, x, layer=1, threshold=0, kind="int64_param")
    zero_client = skipping.client.infer(skipping.name, x, layer=1, topk=True, expert_skip_threshold=0.0, timeout_s=60)
    for answer in (zero_here, zero_there, zero_int, zero_client):
        assert np.array_equal(answer.hidden_states, plain.hidden_states), "threshold 0 changed the answer"
        assert np.array_equal(answer.topk_weights, plain.topk_weights)
    assert rel_err(plain.hidden_states, main_server.expected(1, x)[0]) < FP32_REL_TOL
    assert np.array_equal(router.skipped_expert_tokens, before), "threshold 0 skipped something"


def test_the_models_threshold_skips_counts_and_equals_the_reference(skipping: Served, main_server: Served) -> None:
    x = hidden_states(64, MAIN_RANDOM["hidden"], seed=71)
    router = skipping.deployment.router
    layer_index = skipping.spec.moe_index(0)
    skipped_before = int(router.skipped_expert_tokens[layer_index])
    routed_before = int(router.expert_tokens[layer_index].sum())
    want_skipped, want_kept = skipped_in_process(skipping, 0, x, MODEL_THRESHOLD)
    assert 0 < want_skipped < x.shape[0], "the test needs some (not all) tokens to lose an expert"

    got = infer(skipping, x, layer=0)  # no parameter: the model's 0.25
    want, routing = skipping.reference.forward(0, torch.from_numpy(x.copy()), torch.full((64,), MODEL_THRESHOLD))
    assert rel_err(got.hidden_states, want) < FP32_REL_TOL
    np.testing.assert_array_equal(got.topk_weights, routing.topk_weights.numpy())
    assert int((got.topk_weights == 0).sum()) == want_skipped  # the layer API shows the skipped ones as weight 0
    unskipped = infer(main_server, x, layer=0)
    assert rel_err(got.hidden_states, unskipped.hidden_states) > 1e-3, "skipping should change the answer"

    assert int(router.skipped_expert_tokens[layer_index]) - skipped_before == want_skipped
    assert int(router.expert_tokens[layer_index].sum()) - routed_before == want_kept, "skipped ones are no load"
    name = skipping.name
    wait_until(lambda: metric_total(scrape(), SKIPPED, model=name, layer="0") == router.skipped_expert_tokens[layer_index],
               30, "the skipped expert-tokens metric to reach the router's count", poll_s=0.5)


def test_a_requests_threshold_overrides_the_models(skipping: Served) -> None:
    x = hidden_states(40, MAIN_RANDOM["hidden"], seed=72)
    for threshold in (0.05, 0.4):
        got = infer(skipping, x, layer=1, threshold=threshold)
        want, _ = skipping.reference.forward(1, torch.from_numpy(x.copy()), torch.full((40,), threshold))
        assert rel_err(got.hidden_states, want) < FP32_REL_TOL, threshold
        assert int((got.topk_weights == 0).sum()) == skipped_in_process(skipping, 1, x, threshold)[0]


def test_model_metadata_says_the_models_threshold(skipping: Served, main_server: Served) -> None:
    assert skipping.client.model_metadata(skipping.name).parameters["expert_skip_threshold"].double_param == MODEL_THRESHOLD
    assert main_server.client.model_metadata(main_server.name).parameters["expert_skip_threshold"].double_param == 0.0


@pytest.mark.parametrize(("kind", "value", "says"), [
    pytest.param("double_param", 1.0, "must be in [0, 1)", id="one"),
    pytest.param("double_param", -0.5, "got -0.5", id="negative"),
    pytest.param("string_param", "high", "string_param 'high'", id="string"),
])
def test_a_bad_threshold_is_invalid_argument_naming_it(skipping: Served, kind: str, value, says: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        infer(skipping, hidden_states(2, MAIN_RANDOM["hidden"], seed=73), 0, threshold=value, kind=kind)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "expert_skip_threshold" in err.value.details() and says in err.value.details(), err.value.details()


# ---- text generation -------------------------------------------------------------------------------

PROMPTS = ["the cat sat on", "a big red sun", "birds sing of rain"]
NEW_TOKENS = 12
TEXT_THRESHOLD = 0.3


@pytest.fixture(scope="module")
def text_served(deploy_served, tmp_path_factory):
    """A tiny Mixtral checkpoint served whole (no model-level skipping), and its path."""
    path = tmp_path_factory.mktemp("skip-gen") / "mixtral"
    BY_NAME["mixtral"].save(path)
    start, stop = deploy_served
    served = start(serve_config("it-skip-gen", checkpoint=str(path), workers=2, router={"http_port": None})
                   .with_overrides(**{"rebalance.enabled": False}))
    yield served, path
    stop(served)


async def _generate(text, prompt_ids: list[int], params: SamplingParams) -> tuple[list[int], list[float]]:
    tokens, logprobs = [], []
    async for out in text.generate(prompt_ids, params):
        tokens += out.token_ids
        logprobs += [lp.logprob for lp in out.logprobs]
    return tokens, logprobs


def _run_all(loop, text, prompts, params):
    async def run():
        return await asyncio.gather(*(_generate(text, p, params) for p in prompts))
    return run_on(loop, run())


def _reference_text(path, served: Served):
    """The same checkpoint generating in this process, its MoE layers the single-process
    reference with the skipping the engine asks for."""
    reference = served.reference

    async def moe(layer: int, hidden: torch.Tensor, groups, thresholds=None):
        out, _ = reference.forward(layer, hidden.float(), thresholds)
        return out, None, None

    checkpoint = HFCheckpoint(path)
    settings = EngineSettings(kv_cache_bytes=8 * 2**20, block_size=16, max_num_seqs=8, max_batch_tokens=256,
                              prefill_chunk_tokens=64, max_waiting=16)
    return build_text_model("reference", path, checkpoint.dense_tensors(), checkpoint.spec.moe_layers, moe, settings,
                            device="cpu")


def test_generation_skips_counts_and_equals_the_skipping_reference(text_served, server_loop) -> None:
    served, path = text_served
    router = served.deployment.router
    text = router.text
    prompts = [text.prompt_ids(p) for p in PROMPTS]
    reference = _reference_text(path, served)
    try:
        params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, logprobs=0)
        before = int(router.skipped_expert_tokens.sum())
        plain = _run_all(server_loop, text, prompts, params)
        zero = _run_all(server_loop, text, prompts, replace(params, expert_skip_threshold=0.0))
        assert zero == plain, "threshold 0 changed the tokens or their log-probabilities"
        assert int(router.skipped_expert_tokens.sum()) == before

        skip = replace(params, expert_skip_threshold=TEXT_THRESHOLD)
        got = _run_all(server_loop, text, prompts, skip)
        want = _run_all(server_loop, reference, prompts, skip)
        want_plain = _run_all(server_loop, reference, prompts, params)
    finally:
        run_on(server_loop, reference.close())
    skipped = int(router.skipped_expert_tokens.sum()) - before
    assert skipped > 0, "a threshold of 0.3 should drop some expert-tokens of a top-2 model"
    for (tokens, logprobs), (want_tokens, want_logprobs) in zip(got, want):
        assert tokens == want_tokens
        np.testing.assert_allclose(logprobs, want_logprobs, atol=1e-4, rtol=0)
    changed = any(t != wt or np.abs(np.subtract(lp, wlp)).max() > 1e-3 for (t, lp), (wt, wlp) in zip(got, want_plain))
    assert changed, "skipping at 0.3 left every token and log-probability as without skipping"
    wait_until(lambda: metric_total(scrape(), SKIPPED, model=served.name) == router.skipped_expert_tokens.sum(),
               30, "the skipped expert-tokens metric to count the generation's", poll_s=0.5)
