"""The gate variants of Qwen2-MoE and DeepSeek-V2/V3 against transformers' own router modules
(same experts per token, same weights to float32 precision), their invariants over random
gates (group-limited choice, renormalised weights, the plain softmax path), and the errors a
bad gate configuration gives."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DeepseekV2Config, DeepseekV3Config, Qwen2MoeConfig
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock, Qwen2MoeTopKRouter

from cluster.model_spec import GateSpec, GateWeights, ModelSpec
from router_service.gate import Routing, route, softmax_topk_route
from workers.hf_layouts import DEEPSEEK_V2, DEEPSEEK_V3, QWEN2_MOE

HIDDEN = 32
TOKENS = 64
ATOL = 1e-6

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def by_id(ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's (ids, weights) sorted by expert id: `[T, k]` each."""
    order = ids.argsort(dim=1)
    return ids.gather(1, order), weights.gather(1, order)


def assert_same_routing(ours: Routing, hf_weights: torch.Tensor, hf_ids: torch.Tensor) -> None:
    """Same experts per token (as sets) and the same weight per expert."""
    assert ours.topk_ids.shape == hf_ids.shape
    assert ours.topk_weights.dtype == torch.float32
    our_ids, our_w = by_id(ours.topk_ids, ours.topk_weights)
    hf_ids, hf_w = by_id(hf_ids.to(torch.int64), hf_weights.float())
    differ = (our_ids != hf_ids).any(dim=1).nonzero().squeeze(1).tolist()
    assert not differ, (f"tokens {differ[:5]} choose {our_ids[differ[:1]].tolist()}, "
                        f"transformers {hf_ids[differ[:1]].tolist()}")
    torch.testing.assert_close(our_w, hf_w, atol=ATOL, rtol=0)


def chosen_sets(ids: torch.Tensor) -> list[frozenset[int]]:
    return [frozenset(row) for row in ids.tolist()]


def model_spec(num_experts: int, top_k: int, gate: GateSpec) -> ModelSpec:
    """A one-layer spec: also checks that `gate` fits `num_experts` and `top_k`."""
    return ModelSpec(hidden_size=HIDDEN, intermediate_size=16, num_experts=num_experts, top_k=top_k,
                     moe_layers=(0,), num_hidden_layers=1, gate=gate)


# ---------------------------------------------------------------------------------------------
# DeepSeek-V2: softmax, greedy or group-limited (group max), scaled, never renormalised
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topk_method", "num_experts", "top_k", "n_group", "topk_group", "scaling"),
    [
        pytest.param("greedy", 8, 3, 4, 2, 2.5, id="greedy-ignores-groups"),
        pytest.param("greedy", 16, 6, 1, 1, 16.0, id="greedy-16"),
        pytest.param("group_limited_greedy", 16, 3, 4, 2, 1.7, id="4-groups-best-2"),
        pytest.param("group_limited_greedy", 12, 4, 3, 1, 0.5, id="3-groups-best-1-full"),
        pytest.param("group_limited_greedy", 16, 4, 8, 3, 3.0, id="8-groups-best-3"),
    ],
)
def test_deepseek_v2_gate_matches_transformers(topk_method, num_experts, top_k, n_group, topk_group, scaling):
    config = DeepseekV2Config(
        hidden_size=HIDDEN, n_routed_experts=num_experts, num_experts_per_tok=top_k, topk_method=topk_method,
        n_group=n_group, topk_group=topk_group, routed_scaling_factor=scaling, moe_intermediate_size=16,
    )
    gate = DEEPSEEK_V2.gate_spec(config.to_dict())
    grouped = topk_method == "group_limited_greedy"
    assert (gate.scoring, gate.norm_topk_prob, gate.group_score) == ("softmax", False, "max")
    assert not gate.correction_bias
    assert gate.routed_scaling_factor == scaling
    assert (gate.n_group, gate.topk_group) == ((n_group, topk_group) if grouped else (1, 1))
    model_spec(num_experts, top_k, gate)

    weight = randn(num_experts, HIDDEN, seed=1)
    hidden = randn(TOKENS, HIDDEN, seed=2)
    router = DeepseekV2TopkRouter(config)
    with torch.no_grad():
        router.weight.copy_(weight)
        _, hf_weights, hf_ids = router(hidden)
    ours = route(hidden, GateWeights(weight), gate, top_k)
    assert_same_routing(ours, hf_weights, hf_ids)
    assert ours.shared_weights is None
    if grouped:  # the groups matter here: plain top-k would choose otherwise for some token
        plain = route(hidden, GateWeights(weight), replace(gate, n_group=1, topk_group=1), top_k)
        assert chosen_sets(plain.topk_ids) != chosen_sets(ours.topk_ids)


def test_deepseek_v2_weights_are_scaled_softmax_probabilities():
    """Not renormalised: the k weights are the softmax probabilities times the scaling factor."""
    weight, hidden = randn(8, HIDDEN, seed=3), randn(TOKENS, HIDDEN, seed=4)
    gate = DEEPSEEK_V2.gate_spec({"topk_method": "greedy", "routed_scaling_factor": 4.0})
    ours = route(hidden, GateWeights(weight), gate, 2)
    probs = torch.softmax(hidden @ weight.t(), dim=-1)
    torch.testing.assert_close(ours.topk_weights, 4.0 * probs.gather(1, ours.topk_ids), atol=ATOL, rtol=0)
    assert (ours.topk_weights.sum(dim=1) < 4.0).all()


# ---------------------------------------------------------------------------------------------
# DeepSeek-V3: sigmoid, correction bias to choose, group-limited (top-2 sum), renormalised
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_topk_prob", [True, False], ids=["renormalised", "raw"])
@pytest.mark.parametrize(
    ("num_experts", "top_k", "n_group", "topk_group"),
    [
        pytest.param(16, 4, 4, 2, id="4-groups-best-2"),
        pytest.param(16, 3, 8, 3, id="8-groups-best-3"),
        pytest.param(8, 2, 1, 1, id="ungrouped"),
    ],
)
def test_deepseek_v3_gate_matches_transformers(num_experts, top_k, n_group, topk_group, norm_topk_prob):
    config = DeepseekV3Config(
        hidden_size=HIDDEN, n_routed_experts=num_experts, num_experts_per_tok=top_k, n_group=n_group,
        topk_group=topk_group, routed_scaling_factor=2.5, norm_topk_prob=norm_topk_prob, moe_intermediate_size=16,
    )
    gate = DEEPSEEK_V3.gate_spec(config.to_dict())
    assert (gate.scoring, gate.correction_bias, gate.group_score) == ("sigmoid", True, "top2_sum")
    assert (gate.n_group, gate.topk_group, gate.norm_topk_prob) == (n_group, topk_group, norm_topk_prob)
    model_spec(num_experts, top_k, gate)

    weight = randn(num_experts, HIDDEN, seed=5)
    bias = randn(num_experts, seed=6, scale=0.2)
    hidden = randn(TOKENS, HIDDEN, seed=7)
    router = DeepseekV3TopkRouter(config)
    with torch.no_grad():
        router.weight.copy_(weight)
        router.e_score_correction_bias.copy_(bias)
        _, hf_weights, hf_ids = router(hidden)
    ours = route(hidden, GateWeights(weight, correction_bias=bias), gate, top_k)
    assert_same_routing(ours, hf_weights, hf_ids)
    assert ours.shared_weights is None

    # The bias changes the choice for some token (so the comparison above saw it at work) ...
    unbiased = route(hidden, GateWeights(weight), gate, top_k)
    assert chosen_sets(unbiased.topk_ids) != chosen_sets(ours.topk_ids)
    # ... but never the weights: they are the raw sigmoid scores of the chosen experts.
    raw = torch.sigmoid(hidden @ weight.t()).gather(1, ours.topk_ids)
    expected = raw / raw.sum(dim=1, keepdim=True) if norm_topk_prob else raw
    torch.testing.assert_close(ours.topk_weights, 2.5 * expected, atol=ATOL, rtol=0)


def test_deepseek_v3_group_choice_uses_the_biased_scores():
    """Groups are scored by the biased scores: a big bias on group 3 makes every token take
    group 3's experts, even where their raw scores are the lowest."""
    num_experts, n_group = 16, 4
    weight, hidden = randn(num_experts, HIDDEN, seed=8), randn(TOKENS, HIDDEN, seed=9)
    bias = torch.zeros(num_experts)
    bias[12:] = 10.0
    gate = GateSpec(scoring="sigmoid", correction_bias=True, n_group=n_group, topk_group=1, group_score="top2_sum")
    ours = route(hidden, GateWeights(weight, correction_bias=bias), gate, 2)
    assert (ours.topk_ids // 4 == 3).all()
    assert (ours.topk_weights < 1.0 + ATOL).all() and torch.allclose(ours.topk_weights.sum(1), torch.ones(TOKENS))


# ---------------------------------------------------------------------------------------------
# Qwen2-MoE: softmax top-k (renormalised only with norm_topk_prob) and the sigmoid shared gate
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_topk_prob", [True, False], ids=["renormalised", "raw"])
def test_qwen2_moe_gate_and_shared_gate_match_transformers(norm_topk_prob):
    num_experts, top_k = 12, 4
    config = Qwen2MoeConfig(
        hidden_size=HIDDEN, num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=norm_topk_prob,
        moe_intermediate_size=16, shared_expert_intermediate_size=40,
    )
    gate = replace(QWEN2_MOE.gate_spec(config.to_dict()), shared_gate=True)  # as the checkpoint reader does
    assert gate == GateSpec(norm_topk_prob=norm_topk_prob, shared_gate=True)
    model_spec(num_experts, top_k, gate)

    weight = randn(num_experts, HIDDEN, seed=10)
    shared_gate = randn(1, HIDDEN, seed=11, scale=0.5)
    hidden = randn(TOKENS, HIDDEN, seed=12)
    block = Qwen2MoeSparseMoeBlock(config)
    assert isinstance(block.gate, Qwen2MoeTopKRouter)
    with torch.no_grad():
        block.gate.weight.copy_(weight)
        block.shared_expert_gate.weight.copy_(shared_gate)
        _, hf_weights, hf_ids = block.gate(hidden)
        hf_shared = torch.sigmoid(block.shared_expert_gate(hidden)).squeeze(-1)
    ours = route(hidden, GateWeights(weight, shared_gate=shared_gate), gate, top_k)
    assert_same_routing(ours, hf_weights, hf_ids)
    assert ours.shared_weights is not None and ours.shared_weights.shape == (TOKENS,)
    torch.testing.assert_close(ours.shared_weights, hf_shared, atol=ATOL, rtol=0)
    assert ours.shared_weights.std() > 0.01  # a per-token gate, not a constant
    sums = ours.topk_weights.sum(dim=1)
    assert torch.allclose(sums, torch.ones(TOKENS)) == norm_topk_prob


def test_no_shared_gate_means_shared_weight_one():
    weight, hidden = randn(8, HIDDEN, seed=13), randn(TOKENS, HIDDEN, seed=14)
    assert route(hidden, GateWeights(weight), GateSpec(), 2).shared_weights is None


# ---------------------------------------------------------------------------------------------
# Invariants over random gates
# ---------------------------------------------------------------------------------------------


@st.composite
def grouped_gates(draw):
    """(GateSpec, num_experts, top_k) of a valid group-limited gate."""
    n_group = draw(st.sampled_from([2, 3, 4, 8]))
    group_size = draw(st.integers(2, 4))
    topk_group = draw(st.integers(1, n_group - 1))
    top_k = draw(st.integers(1, topk_group * group_size))
    scoring = draw(st.sampled_from(["softmax", "sigmoid"]))
    gate = GateSpec(
        scoring=scoring, n_group=n_group, topk_group=topk_group, group_score=draw(st.sampled_from(["max", "top2_sum"])),
        norm_topk_prob=draw(st.booleans()), correction_bias=scoring == "sigmoid",
        routed_scaling_factor=draw(st.floats(0.25, 8.0)),
    )
    return gate, n_group * group_size, top_k


@settings(max_examples=30, deadline=None)
@given(case=grouped_gates(), seed=st.integers(0, 2**31 - 1))
def test_group_limited_routing_stays_within_topk_group_groups(case, seed):
    gate, num_experts, top_k = case
    model_spec(num_experts, top_k, gate)
    group_size = num_experts // gate.n_group
    bias = randn(num_experts, seed=seed + 1, scale=0.1) if gate.correction_bias else None
    weights = GateWeights(randn(num_experts, HIDDEN, seed=seed + 2), bias)
    routing = route(randn(16, HIDDEN, seed=seed), weights, gate, top_k)
    ids = routing.topk_ids
    assert ids.shape == (16, top_k) and ids.dtype == torch.int64
    assert ((ids >= 0) & (ids < num_experts)).all()
    for row in ids.tolist():
        assert len(set(row)) == top_k, f"an expert chosen twice: {row}"
        groups = {e // group_size for e in row}
        assert len(groups) <= gate.topk_group, f"experts {row} span groups {groups} > topk_group {gate.topk_group}"
    assert (routing.topk_weights > 0).all()


@settings(max_examples=30, deadline=None)
@given(
    scoring=st.sampled_from(["softmax", "sigmoid"]),
    groups=st.sampled_from([(1, 1), (4, 2), (4, 4), (8, 2)]),
    top_k=st.integers(1, 4),
    scaling=st.floats(0.1, 16.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_renormalised_weights_sum_to_the_scaling_factor(scoring, groups, top_k, scaling, seed):
    n_group, topk_group = groups
    gate = GateSpec(scoring=scoring, n_group=n_group, topk_group=topk_group, norm_topk_prob=True,
                    routed_scaling_factor=scaling, group_score="top2_sum" if scoring == "sigmoid" else "max")
    num_experts = 16
    model_spec(num_experts, top_k, gate)
    routing = route(randn(16, HIDDEN, seed=seed), GateWeights(randn(num_experts, HIDDEN, seed=seed + 1)), gate, top_k)
    torch.testing.assert_close(routing.topk_weights.sum(dim=1), torch.full((16,), scaling), rtol=1e-5, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(
    num_experts=st.integers(2, 16),
    data=st.data(),
    renormalize=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_plain_softmax_gate_is_softmax_topk_route(num_experts, data, renormalize, seed):
    top_k = data.draw(st.integers(1, num_experts))
    hidden, weight = randn(8, HIDDEN, seed=seed), randn(num_experts, HIDDEN, seed=seed + 1)
    ours = route(hidden, GateWeights(weight), GateSpec(norm_topk_prob=renormalize), top_k)
    plain = softmax_topk_route(hidden, weight, top_k, renormalize)
    assert torch.equal(ours.topk_ids, plain.topk_ids)
    assert torch.equal(ours.topk_weights, plain.topk_weights)
    assert ours.shared_weights is None


# ---------------------------------------------------------------------------------------------
# Configuration errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "message"),
    [
        pytest.param(lambda: model_spec(10, 2, GateSpec(n_group=4, topk_group=2)),
                     r"num_experts \(10\) must split into n_group \(4\) equal groups", id="experts-not-divisible"),
        pytest.param(lambda: model_spec(8, 5, GateSpec(n_group=4, topk_group=2)),
                     r"top_k \(5\) exceeds the experts of topk_group \(2\) groups of 2", id="top-k-over-groups"),
        pytest.param(lambda: GateSpec(n_group=2, topk_group=3),
                     r"topk_group \(3\) cannot exceed n_group \(2\)", id="topk-group-over-n-group"),
        pytest.param(lambda: GateSpec(scoring="relu"),
                     r"gate scoring must be one of \('softmax', 'sigmoid'\), got 'relu'", id="bad-scoring"),
        pytest.param(lambda: GateSpec(group_score="mean"), r"group_score must be one of", id="bad-group-score"),
        pytest.param(lambda: GateSpec(n_group=0), r"n_group must be a positive integer, got 0", id="zero-groups"),
        pytest.param(lambda: GateSpec(routed_scaling_factor=0.0), r"routed_scaling_factor must be > 0",
                     id="zero-scaling"),
        pytest.param(lambda: model_spec(4, 1, GateSpec(n_group=4, topk_group=2, group_score="top2_sum")),
                     r"top2_sum' needs at least 2 experts per group", id="top2-sum-of-one"),
        pytest.param(lambda: model_spec(16, 2, DEEPSEEK_V3.gate_spec({"n_group": 3, "topk_group": 1})),
                     r"num_experts \(16\) must split into n_group \(3\)", id="v3-config-groups"),
    ],
)
def test_bad_gate_configuration_is_a_clear_value_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_top_k_filling_the_chosen_groups_exactly_is_valid():
    """The boundary of the top-k check: top_k == topk_group * group size is allowed, and then a
    token takes every expert of its chosen groups."""
    gate = GateSpec(n_group=4, topk_group=2)
    model_spec(8, 4, gate)
    routing = route(randn(TOKENS, HIDDEN, seed=15), GateWeights(randn(8, HIDDEN, seed=16)), gate, 4)
    for row in routing.topk_ids.tolist():
        groups = {e // 2 for e in row}
        assert len(groups) == 2 and sorted(row) == sorted(e for g in groups for e in (2 * g, 2 * g + 1))
