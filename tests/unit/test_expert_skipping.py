"""Expert skipping (`router_service.skipping`): golden cases with literal tensors, the invariants
over every family's gate variant (top expert always kept, threshold 0 changes nothing bit for
bit, per-token thresholds, kept weights back to the pre-skip sum, shares measured against the
top-k sum where the family does not renormalise), the dispatch plan that never sends a skipped
assignment and does not count it as load, the batcher's per-token thresholds, and the setting's
checks at every edge (config, KServe layer and text parameters, OpenAI fields)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from cluster.config import ConfigError, RouterConfig, validate_config
from cluster.model_spec import GateSpec, GateWeights
from cluster.placement import Placement
from protos import grpc_predict_v2_pb2 as pb
from router_service.batcher import Batcher
from router_service.codec import decode_request, skip_threshold
from router_service.dispatch import ReplicaTable, combine, plan_dispatch
from router_service.errors import InvalidRequest
from router_service.gate import Routing, route
from router_service.moe_layer import LayerOutput
from router_service.openai_schema import ChatCompletionRequest, CompletionRequest, FieldError, parse_request
from router_service.skipping import check_threshold, skip_experts, token_thresholds
from router_service.text_codec import sampling_params
from tests.unit.test_codec import SPEC, make_request
from tests.unit.test_text_codec import set_param

HIDDEN = 16


def routing_of(weights: list[list[float]], ids: list[list[int]] | None = None, shared=None) -> Routing:
    w = torch.tensor(weights, dtype=torch.float32)
    topk_ids = torch.tensor(ids) if ids is not None else torch.arange(w.shape[1]).repeat(w.shape[0], 1)
    return Routing(topk_ids.to(torch.int64), w, shared)


def per_token(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Golden cases
# ---------------------------------------------------------------------------------------------


def test_mixtral_top2_golden_case() -> None:
    """Renormalised weights: the second expert goes when below the threshold, the kept one
    takes the token's whole weight (Lu et al.: renormalised to 1)."""
    routing = routing_of([[0.7, 0.3], [0.9, 0.1], [0.55, 0.45]])
    result = skip_experts(routing, per_token(0.2, 0.2, 0.2))
    assert result.skipped == 1
    assert result.routing.kept.tolist() == [[True, True], [True, False], [True, True]]
    assert result.routing.topk_weights.tolist() == [[pytest.approx(0.7), pytest.approx(0.3)], [1.0, 0.0],
                                                    [pytest.approx(0.55), pytest.approx(0.45)]]
    assert torch.equal(result.routing.topk_ids, routing.topk_ids)


def test_scaled_weights_are_judged_by_their_share_and_keep_their_sum() -> None:
    """DeepSeek-V3 renormalises, then scales by routed_scaling_factor (2.5): weights 1.5, 0.75,
    0.25 (sum 2.5) are shares 0.6, 0.3, 0.1. At 0.2 the third goes although its raw weight 0.25
    is above 0.2; the kept two are scaled back to the pre-skip sum 2.5 (x 2.5 / 2.25)."""
    routing = routing_of([[1.5, 0.75, 0.25]])
    result = skip_experts(routing, per_token(0.2))
    assert result.skipped == 1
    torch.testing.assert_close(result.routing.topk_weights, torch.tensor([[5 / 3, 5 / 6, 0.0]]), rtol=1e-6, atol=0)


def test_the_share_not_the_raw_weight_is_compared() -> None:
    """Weights summing to 0.2 (a raw softmax over many experts: DeepSeek-V2, Qwen without
    norm_topk_prob):
    every raw weight is below 0.25, yet only the expert with a share below 0.25 is dropped."""
    routing = routing_of([[0.12, 0.06, 0.02]])  # shares 0.6, 0.3, 0.1
    result = skip_experts(routing, per_token(0.25))
    assert result.routing.kept.tolist() == [[True, True, False]]
    torch.testing.assert_close(result.routing.topk_weights.sum(), torch.tensor(0.2), rtol=1e-6, atol=0)


def test_the_top_expert_by_weight_stays_even_where_it_was_not_chosen_first() -> None:
    """DeepSeek-V3 chooses with a correction bias: the first chosen expert may carry the smaller
    weight. The largest weight is the one always kept, whatever the threshold."""
    routing = routing_of([[0.2, 0.8], [0.2, 0.8]], ids=[[5, 1], [5, 1]])
    result = skip_experts(routing, per_token(0.5, 0.99))
    assert result.routing.kept.tolist() == [[False, True], [False, True]]
    assert result.routing.topk_weights.tolist() == [[0.0, 1.0], [0.0, 1.0]]
    assert result.skipped == 2


@pytest.mark.parametrize("thresholds", [
    pytest.param(None, id="none"),
    pytest.param(per_token(0.0, 0.0, 0.0), id="zeros"),
    pytest.param(per_token(0.05, 0.0, 0.01), id="below-every-share"),
])
def test_nothing_skipped_changes_nothing_bit_for_bit(thresholds) -> None:
    routing = routing_of([[0.7, 0.3], [0.9, 0.1], [0.55, 0.45]])
    result = skip_experts(routing, thresholds)
    assert result.skipped == 0 and result.routing is routing  # the very same tensors


def test_per_token_thresholds_only_touch_their_tokens() -> None:
    routing = routing_of([[0.6, 0.3, 0.1]] * 4)
    result = skip_experts(routing, per_token(0.0, 0.15, 0.35, 0.99))
    assert result.routing.kept.tolist() == [[True, True, True], [True, True, False], [True, False, False],
                                            [True, False, False]]
    assert result.skipped == 5
    assert torch.equal(result.routing.topk_weights[0], routing.topk_weights[0])  # its threshold is 0
    torch.testing.assert_close(result.routing.topk_weights[1], torch.tensor([2 / 3, 1 / 3, 0.0]), rtol=1e-6, atol=0)
    assert result.routing.topk_weights[2:].tolist() == [[1.0, 0.0, 0.0]] * 2


def test_skipping_twice_skips_nothing_again() -> None:
    once = skip_experts(routing_of([[0.6, 0.3, 0.1]]), per_token(0.2))
    twice = skip_experts(once.routing, per_token(0.2))
    assert once.skipped == 1 and twice.skipped == 0
    assert torch.equal(twice.routing.kept, once.routing.kept)


@pytest.mark.parametrize(("thresholds", "says"), [
    pytest.param(per_token(0.1, 1.0), "got 1.0", id="one"),
    pytest.param(per_token(-0.1, 0.1), "got -0.1", id="negative"),
    pytest.param(per_token(float("nan"), 0.1), "got nan", id="nan"),
    pytest.param(per_token(0.1), "[tokens] = [2]", id="shape"),
])
def test_bad_thresholds_are_refused(thresholds, says: str) -> None:
    with pytest.raises(ValueError, match=r".*") as err:
        skip_experts(routing_of([[0.7, 0.3], [0.6, 0.4]]), thresholds)
    assert says in str(err.value)


def test_token_thresholds_repeat_each_groups_value_and_are_none_when_none_skips() -> None:
    assert token_thresholds([0.0, 0.0], [3, 2]) is None
    assert token_thresholds([0.0, 0.25, 0.1], [2, 1, 3]).tolist() == pytest.approx([0, 0, 0.25, 0.1, 0.1, 0.1])


# ---------------------------------------------------------------------------------------------
# Every family's gate variant: invariants
# ---------------------------------------------------------------------------------------------

FAMILIES = [  # (GateSpec, experts, top_k)
    pytest.param(GateSpec(), 8, 2, id="mixtral"),
    pytest.param(GateSpec(norm_topk_prob=False), 6, 2, id="qwen3-raw-softmax"),
    pytest.param(GateSpec(norm_topk_prob=True), 6, 4, id="qwen3-renormalised-top4"),
    pytest.param(GateSpec(norm_topk_prob=False, shared_gate=True), 8, 2, id="qwen2-shared-gate"),
    pytest.param(GateSpec(norm_topk_prob=False, routed_scaling_factor=1.5), 8, 3, id="deepseek-v2-greedy"),
    pytest.param(GateSpec(norm_topk_prob=False, n_group=4, topk_group=2, routed_scaling_factor=1.5), 8, 3,
                 id="deepseek-v2-group-limited"),
    pytest.param(GateSpec(scoring="sigmoid", n_group=4, topk_group=2, group_score="top2_sum",
                          routed_scaling_factor=2.5, correction_bias=True), 8, 2, id="deepseek-v3"),
]


def family_routing(spec: GateSpec, experts: int, top_k: int, tokens: int = 256) -> Routing:
    gen = torch.Generator().manual_seed(experts * 10 + top_k)
    gate = GateWeights(
        weight=torch.randn(experts, HIDDEN, generator=gen),
        correction_bias=0.3 * torch.randn(experts, generator=gen) if spec.correction_bias else None,
        shared_gate=torch.randn(1, HIDDEN, generator=gen) if spec.shared_gate else None,
    )
    return route(torch.randn(tokens, HIDDEN, generator=gen), gate, spec, top_k)


@pytest.mark.parametrize(("spec", "experts", "top_k"), FAMILIES)
def test_invariants_on_every_family_gate(spec: GateSpec, experts: int, top_k: int) -> None:
    routing = family_routing(spec, experts, top_k)
    tokens = routing.topk_ids.shape[0]
    thresholds = torch.rand(tokens, generator=torch.Generator().manual_seed(1)) * 0.6
    thresholds[::4] = 0.0  # a quarter of the tokens do not skip
    result = skip_experts(routing, thresholds)
    out, w = result.routing, routing.topk_weights
    kept = out.kept
    share = w / w.sum(dim=1, keepdim=True)
    top = w.argmax(dim=1)

    assert out.topk_ids is routing.topk_ids and out.shared_weights is routing.shared_weights  # shared never skipped
    assert kept[torch.arange(tokens), top].all(), "the top expert is always kept"
    assert (share[~kept] < thresholds.unsqueeze(1).expand_as(share)[~kept]).all(), "only shares below go"
    at_or_above = share >= thresholds.unsqueeze(1)
    is_top = torch.arange(top_k) == top.unsqueeze(1)
    assert (at_or_above | is_top)[kept].all() and at_or_above[~kept].logical_not().all(), "every share at or above stays"
    assert result.skipped == int((~kept).sum()) > 0
    assert (out.topk_weights[~kept] == 0).all()
    torch.testing.assert_close(out.topk_weights.sum(dim=1), w.sum(dim=1), rtol=2e-6, atol=0)  # the pre-skip sum
    ratio = torch.where(kept, out.topk_weights / w, torch.nan)  # kept weights scaled alike per token
    spread = ratio.nan_to_num(0).amax(dim=1) - ratio.nan_to_num(float("inf")).amin(dim=1)
    assert float(spread.max()) < 1e-5
    untouched = kept.all(dim=1)
    assert untouched[::4].all()
    assert torch.equal(out.topk_weights[untouched], w[untouched]), "a token that keeps all is bit for bit"


@pytest.mark.parametrize(("spec", "experts", "top_k"), FAMILIES)
def test_a_higher_threshold_skips_a_superset(spec: GateSpec, experts: int, top_k: int) -> None:
    routing = family_routing(spec, experts, top_k, tokens=64)
    tokens = routing.topk_ids.shape[0]
    previous = torch.ones_like(routing.topk_ids, dtype=torch.bool)
    counts = []
    for t in (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.9):
        result = skip_experts(routing, torch.full((tokens,), t))
        kept = result.routing.kept if result.routing.kept is not None else torch.ones_like(previous)
        assert not (kept & ~previous).any(), f"threshold {t} keeps an expert a lower one dropped"
        previous, counts = kept, counts + [result.skipped]
    assert counts[0] == 0 and counts[-1] == tokens * (top_k - 1)  # 0.9: only the top one is left


# ---------------------------------------------------------------------------------------------
# Dispatch: skipped assignments go nowhere and are no load
# ---------------------------------------------------------------------------------------------


def test_the_plan_sends_exactly_the_kept_assignments_and_counts_only_them() -> None:
    experts, tokens = 4, 6
    placement = Placement.from_mapping(0, experts, [[0, 1], [2, 3]])
    routing = family_routing(GateSpec(), experts, 3, tokens=tokens)
    skipped = skip_experts(routing, torch.full((tokens,), 0.3)).routing
    assert skipped.kept is not None and not skipped.kept.all()
    plan = plan_dispatch(skipped, 0, experts, ReplicaTable(placement))
    sent = sorted((int(t), int(e)) for r in plan.requests
                  for e, lo, hi in zip(r.share.expert_ids, r.share.offsets[:-1], r.share.offsets[1:])
                  for t in r.share.token_idx[lo:hi])
    want = sorted((t, int(skipped.topk_ids[t, j])) for t in range(tokens) for j in range(3) if skipped.kept[t, j])
    assert sent == want
    assert plan.expert_tokens.tolist() == np.bincount(skipped.topk_ids[skipped.kept].numpy(), minlength=experts).tolist()
    assert int(plan.worker_tokens.sum()) == int(skipped.kept.sum())
    # the combined output equals the per-token sum over the kept experts
    mats = torch.randn(experts, HIDDEN, HIDDEN, generator=torch.Generator().manual_seed(3))
    x = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(4))
    outputs = []
    for r in plan.requests:
        y = torch.zeros(len(r.rows), HIDDEN)
        pos = {int(t): i for i, t in enumerate(r.rows)}
        for i, e in enumerate(r.share.expert_ids):
            for j in range(r.share.offsets[i], r.share.offsets[i + 1]):
                t = int(r.share.token_idx[j])
                y[pos[t]] += (x[t] @ mats[e]) * float(r.share.weights[j])
        outputs.append(y.numpy())
    got = combine(tokens, HIDDEN, plan, outputs)
    want_out = torch.stack([sum(float(skipped.topk_weights[t, j]) * (x[t] @ mats[skipped.topk_ids[t, j]])
                                for j in range(3) if skipped.kept[t, j]) for t in range(tokens)])
    torch.testing.assert_close(got, want_out, rtol=1e-5, atol=1e-5)


def test_threshold_zero_plans_the_same_as_no_skipping() -> None:
    placement = Placement.from_mapping(0, 4, [[0, 1], [2, 3]])
    routing = family_routing(GateSpec(), 4, 2, tokens=8)
    plain = plan_dispatch(routing, 0, 4, ReplicaTable(placement))
    zero = plan_dispatch(skip_experts(routing, torch.zeros(8)).routing, 0, 4, ReplicaTable(placement))
    assert np.array_equal(plain.expert_tokens, zero.expert_tokens)
    for a, b in zip(plain.requests, zero.requests, strict=True):
        assert a.worker == b.worker and np.array_equal(a.share.token_idx, b.share.token_idx)
        assert np.array_equal(a.share.weights, b.share.weights)


# ---------------------------------------------------------------------------------------------
# The batcher passes per-token thresholds
# ---------------------------------------------------------------------------------------------


class RecordingForward:
    def __init__(self):
        self.calls: list[tuple] = []

    async def __call__(self, layer: int, hidden: torch.Tensor, groups, *rest) -> LayerOutput:
        self.calls.append((hidden.shape[0], groups.tolist(), *(r.tolist() for r in rest)))
        tokens = hidden.shape[0]
        return LayerOutput(hidden, Routing(torch.zeros(tokens, 2, dtype=torch.int64), torch.full((tokens, 2), 0.5)),
                           np.zeros(4, dtype=np.int64), 0)


def test_a_batch_of_mixed_requests_passes_each_rows_threshold() -> None:
    async def scenario() -> RecordingForward:
        forward = RecordingForward()
        batcher = Batcher(forward, RouterConfig(max_batch_tokens=100, max_wait_ms=200.0, max_inflight_batches=1))
        await asyncio.gather(batcher.submit(0, torch.zeros(2, HIDDEN), 0.0),
                             batcher.submit(0, torch.zeros(3, HIDDEN), 0.25),
                             batcher.submit(0, torch.zeros(1, HIDDEN), 0.1))
        await batcher.submit(0, torch.zeros(2, HIDDEN))  # alone, no skipping: no thresholds at all
        await batcher.close()
        return forward

    calls = asyncio.run(scenario()).calls
    assert len(calls) == 2, calls
    tokens, groups, thresholds = calls[0]
    assert (tokens, groups) == (6, [0, 0, 1, 1, 1, 2])
    assert thresholds == pytest.approx([0, 0, 0.25, 0.25, 0.25, 0.1])
    assert calls[1] == (2, [0, 0])


# ---------------------------------------------------------------------------------------------
# The setting at every edge
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1, 1.0, -0.01, float("nan"), "half"])
def test_the_model_setting_is_bounded(value) -> None:
    with pytest.raises(ConfigError, match="model.expert_skip_threshold"):
        validate_config({"model": {"expert_skip_threshold": value}}, source="test")
    assert validate_config({"model": {"expert_skip_threshold": 0.2}}, source="test").model.expert_skip_threshold == 0.2
    assert validate_config({}, source="test").model.expert_skip_threshold == 0.0  # off by default


@pytest.mark.parametrize("value", [True, None, "0.1", float("inf"), 1, -1e-9])
def test_check_threshold_names_where_it_came_from(value) -> None:
    with pytest.raises(InvalidRequest, match=r"^somewhere must be"):
        check_threshold(value, "somewhere")


def _layer_request(**param) -> pb.ModelInferRequest:
    request = make_request(torch.zeros(2, SPEC.hidden_size))
    for kind, value in param.items():
        setattr(request.parameters["expert_skip_threshold"], kind, value)
    return request


@pytest.mark.parametrize(("param", "expected"), [
    pytest.param({}, None, id="absent"),
    pytest.param({"double_param": 0.2}, 0.2, id="double"),
    pytest.param({"double_param": 0.0}, 0.0, id="zero"),
    pytest.param({"int64_param": 0}, 0.0, id="int-zero"),
    pytest.param({"string_param": "0.15"}, 0.15, id="string"),
])
def test_the_layer_api_parameter_is_read(param: dict, expected) -> None:
    decoded = decode_request(_layer_request(**param), SPEC)
    assert decoded.expert_skip_threshold == (pytest.approx(expected) if expected is not None else None)


@pytest.mark.parametrize(("param", "says"), [
    pytest.param({"double_param": 1.0}, "in [0, 1)", id="one"),
    pytest.param({"double_param": -0.5}, "got -0.5", id="negative"),
    pytest.param({"double_param": float("nan")}, "got nan", id="nan"),
    pytest.param({"int64_param": 3}, "got 3.0", id="int"),
    pytest.param({"string_param": "lots"}, "string_param 'lots'", id="not-a-number"),
    pytest.param({"bool_param": True}, "bool_param True", id="bool"),
])
def test_a_bad_layer_api_parameter_is_refused_naming_it(param: dict, says: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        decode_request(_layer_request(**param), SPEC)
    assert "request parameter 'expert_skip_threshold'" in str(err.value) and says in str(err.value)
    assert skip_threshold({}) is None


@pytest.mark.parametrize(("value", "expected"), [(0.3, 0.3), (0, 0.0), ("0.05", 0.05)])
def test_the_text_parameter_is_read(value, expected) -> None:
    param = pb.InferParameter()
    set_param(param, value)
    params = sampling_params({"expert_skip_threshold": param}, 16)
    assert params.expert_skip_threshold == pytest.approx(expected)
    assert sampling_params({}, 16).expert_skip_threshold is None  # the model's


@pytest.mark.parametrize("value", [1.5, -0.2, "x", True])
def test_a_bad_text_parameter_is_refused_naming_it(value) -> None:
    param = pb.InferParameter()
    set_param(param, value)
    with pytest.raises(InvalidRequest, match="expert_skip_threshold"):
        sampling_params({"expert_skip_threshold": param}, 16)


@pytest.mark.parametrize("kind", [CompletionRequest, ChatCompletionRequest])
def test_the_openai_field_is_read_and_checked(kind) -> None:
    base = {"model": "m", "prompt": "x"} if kind is CompletionRequest else \
        {"model": "m", "messages": [{"role": "user", "content": "x"}]}

    def params(value):
        import json
        return parse_request(kind, json.dumps({**base, "expert_skip_threshold": value}).encode()).sampling_params(16)

    assert params(0.2).expert_skip_threshold == 0.2 and params(0).expert_skip_threshold == 0
    assert params(None).expert_skip_threshold is None
    for bad, says in ((1.0, "must be in [0, 1)"), (-1, "must be in [0, 1)"), ("0.1", "valid number")):
        with pytest.raises(FieldError) as err:
            params(bad)
        assert err.value.param == "expert_skip_threshold" and says in str(err.value), str(err.value)
