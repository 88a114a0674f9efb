"""Shared experts served as extra logical experts: the spec's numbering and labels, the placed
load, the pieces cut from the shared MLP (they add up to it), the random model's shared pieces
and gate tensors, dispatch to every shared piece, the reference layer (by hand, through the
dispatch path, and against transformers' Qwen2-MoE and DeepSeek-V3 blocks), the load board and
the planner."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import DeepseekV3Config, Qwen2MoeConfig
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

from cluster.app.reference import ReferenceMoE
from cluster.model_spec import GateSpec, GateWeights, ModelSpec, expert_label
from cluster.placement import Placement
from cluster.planning.load_stats import LoadBoard, RouterReport
from cluster.planning.planner import plan_placement
from router_service.dispatch import DispatchPlan, ReplicaTable, combine, plan_dispatch
from router_service.gate import Routing, route
from workers.expert_math import fuse_w13, run_experts, swiglu
from workers.random_model import RandomModel
from workers.weights import ExpertWeights, shared_piece

HIDDEN = 32
INTER = 16

# Qwen2-MoE-like: softmax top-2 not renormalised, a sigmoid shared gate, a shared MLP of 40
# units served as 3 pieces of 16 (the last one padded with 8 zero units).
QWEN_SPEC = ModelSpec(
    hidden_size=HIDDEN, intermediate_size=INTER, num_experts=8, top_k=2, moe_layers=(1, 3), num_hidden_layers=4,
    gate=GateSpec(norm_topk_prob=False, shared_gate=True), shared_intermediate_size=40, family="qwen2_moe",
)
# DeepSeek-V3-like: sigmoid scores, correction bias, 4 groups (best 2), renormalised and scaled;
# two shared experts of the routed size, shared weight 1.
V3_SPEC = ModelSpec(
    hidden_size=HIDDEN, intermediate_size=INTER, num_experts=16, top_k=4, moe_layers=(1, 2), num_hidden_layers=3,
    gate=GateSpec(scoring="sigmoid", correction_bias=True, n_group=4, topk_group=2, group_score="top2_sum",
                  routed_scaling_factor=2.5),
    shared_intermediate_size=2 * INTER, family="deepseek_v3",
)
PLAIN_SPEC = ModelSpec(hidden_size=HIDDEN, intermediate_size=INTER, num_experts=8, top_k=2, moe_layers=(0, 1),
                       num_hidden_layers=2)


def spec_with_shared(shared_intermediate_size: int, num_experts: int = 8, top_k: int = 2,
                     moe_layers: tuple[int, ...] = (1, 3), gate: GateSpec | None = None) -> ModelSpec:
    return ModelSpec(hidden_size=HIDDEN, intermediate_size=INTER, num_experts=num_experts, top_k=top_k,
                     moe_layers=moe_layers, num_hidden_layers=4, gate=gate or GateSpec(),
                     shared_intermediate_size=shared_intermediate_size)


def randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def whole_mlp(x: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
    """The SwiGLU MLP written out: `w2 (silu(w1 x) * w3 x)`, x `[T, H]`."""
    return (F.silu(x @ w.w1.t()) * (x @ w.w3.t())) @ w.w2.t()


# ---------------------------------------------------------------------------------------------
# ModelSpec: numbering, labels, placed load
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shared_size", "pieces"),
    [
        pytest.param(0, 0, id="none"),
        pytest.param(1, 1, id="one-unit"),
        pytest.param(16, 1, id="exactly-one"),
        pytest.param(17, 2, id="one-over"),
        pytest.param(32, 2, id="exactly-two"),
        pytest.param(40, 3, id="two-and-a-half"),
        pytest.param(128, 8, id="eight"),
    ],
)
def test_num_shared_experts_is_the_ceiling_of_the_shared_size_over_the_expert_size(shared_size, pieces):
    spec = spec_with_shared(shared_size)
    assert spec.num_shared_experts == pieces
    assert spec.experts_per_layer == 8 + pieces
    assert spec.num_logical_experts == 2 * (8 + pieces)


def test_negative_shared_size_is_refused():
    with pytest.raises(ValueError, match=r"shared_intermediate_size must be an integer >= 0, got -1"):
        spec_with_shared(-1)


def test_layer_expert_and_labels_put_the_shared_pieces_after_the_routed_experts():
    spec = QWEN_SPEC  # layers (1, 3), 8 routed + 3 shared per layer
    assert spec.experts_per_layer == 11 and spec.num_logical_experts == 22
    expected = [(1, e) for e in range(11)] + [(3, e) for e in range(11)]
    assert [spec.layer_expert(logical) for logical in range(22)] == expected
    labels = [spec.expert_label(logical) for logical in range(22)]
    assert labels[:11] == [f"1:{e}" for e in range(8)] + ["1:s0", "1:s1", "1:s2"]
    assert labels[11:] == [f"3:{e}" for e in range(8)] + ["3:s0", "3:s1", "3:s2"]
    assert labels[3] == "1:3" and labels[8] == "1:s0" and labels[19] == "3:s0"
    assert labels == [expert_label(logical, spec.moe_layers, 8, 3) for logical in range(22)]
    assert PLAIN_SPEC.expert_label(9) == "1:1"  # no shared experts: stride E


def test_placed_load_adds_each_layers_token_count_for_every_shared_piece():
    routed = np.array([[40, 0, 10, 30, 0, 20, 0, 0],  # 50 tokens x top-2
                       [5, 5, 5, 5, 5, 5, 5, 5]])  # 20 tokens x top-2
    placed = QWEN_SPEC.placed_load(routed)
    assert placed.shape == (2, 11) and placed.dtype == routed.dtype
    np.testing.assert_array_equal(placed[:, :8], routed)
    np.testing.assert_array_equal(placed[:, 8:], [[50, 50, 50], [20, 20, 20]])
    np.testing.assert_array_equal(placed[:, 8:], np.repeat(routed.sum(1, keepdims=True) / 2, 3, axis=1))

    as_rate = QWEN_SPEC.placed_load(routed / 4.0)  # tokens per second: fractions kept
    np.testing.assert_allclose(as_rate[:, 8:], [[12.5] * 3, [5.0] * 3])


def test_placed_load_without_shared_experts_is_the_routed_load():
    routed = np.arange(16, dtype=np.int64).reshape(2, 8)
    placed = PLAIN_SPEC.placed_load(routed)
    assert placed.shape == (2, 8)
    np.testing.assert_array_equal(placed, routed)


# ---------------------------------------------------------------------------------------------
# Pieces of the shared MLP
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shared_size", [
    pytest.param(16, id="one-piece"),
    pytest.param(32, id="two-whole-pieces"),
    pytest.param(40, id="padded-last"),
    pytest.param(7, id="one-padded-piece"),
    pytest.param(49, id="one-unit-in-the-last"),
])
def test_shared_pieces_add_up_to_the_whole_shared_mlp(shared_size):
    spec = spec_with_shared(shared_size)
    gen = torch.Generator().manual_seed(shared_size)
    whole = ExpertWeights(w1=torch.randn(shared_size, HIDDEN, generator=gen) / HIDDEN ** 0.5,
                          w2=torch.randn(HIDDEN, shared_size, generator=gen) / shared_size ** 0.5,
                          w3=torch.randn(shared_size, HIDDEN, generator=gen) / HIDDEN ** 0.5)
    x = torch.randn(24, HIDDEN, generator=gen)
    pieces = [shared_piece(spec, whole, p) for p in range(spec.num_shared_experts)]
    for p, piece in enumerate(pieces):
        assert piece.w1.shape == (INTER, HIDDEN) and piece.w3.shape == (INTER, HIDDEN)
        assert piece.w2.shape == (HIDDEN, INTER)
        lo, hi = p * INTER, min((p + 1) * INTER, shared_size)
        torch.testing.assert_close(piece.w1[: hi - lo], whole.w1[lo:hi], rtol=0, atol=0)
        torch.testing.assert_close(piece.w3[: hi - lo], whole.w3[lo:hi], rtol=0, atol=0)
        torch.testing.assert_close(piece.w2[:, : hi - lo], whole.w2[:, lo:hi], rtol=0, atol=0)
        assert not piece.w1[hi - lo:].any() and not piece.w3[hi - lo:].any() and not piece.w2[:, hi - lo:].any()
    total = sum(swiglu(x, fuse_w13(p.w1, p.w3), p.w2) for p in pieces)
    expected = whole_mlp(x, whole)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# RandomModel with shared experts
# ---------------------------------------------------------------------------------------------


def test_random_model_yields_pieces_of_its_shared_mlp_after_the_routed_experts():
    model = RandomModel(QWEN_SPEC, seed=3)
    shared = {layer: model.shared(layer) for layer in QWEN_SPEC.moe_layers}
    assert shared[1].w1.shape == (40, HIDDEN) and shared[1].w2.shape == (HIDDEN, 40)
    assert not torch.equal(shared[1].w1, shared[3].w1)
    pairs = [(3, 10), (1, 8), (1, 0), (1, 9), (3, 8)]
    got = list(model.experts(pairs))
    assert [pair for pair, _ in got] == pairs
    for (layer, e), w in got:
        if e >= QWEN_SPEC.num_experts:
            expected = shared_piece(QWEN_SPEC, shared[layer], e - QWEN_SPEC.num_experts)
        else:
            expected = model.expert(layer, e)
        for name in ("w1", "w2", "w3"):
            assert torch.equal(getattr(w, name), getattr(expected, name)), f"({layer}, {e}).{name}"
    assert torch.equal(got[1][1].w1, shared[1].w1[:16]) and torch.equal(got[3][1].w1, shared[1].w1[16:32])
    assert torch.equal(RandomModel(QWEN_SPEC, seed=3).shared(1).w2, shared[1].w2)  # deterministic
    assert not torch.equal(RandomModel(QWEN_SPEC, seed=4).shared(1).w2, shared[1].w2)


@pytest.mark.parametrize("correction_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("shared_gate", [False, True], ids=["no-shared-gate", "shared-gate"])
def test_random_model_gate_has_the_tensors_its_spec_names(correction_bias, shared_gate):
    gate = GateSpec(scoring="sigmoid" if correction_bias else "softmax", correction_bias=correction_bias,
                    shared_gate=shared_gate)
    spec = spec_with_shared(32, gate=gate)
    weights = RandomModel(spec, seed=1).gate(3)
    assert weights.weight.shape == (8, HIDDEN)
    assert torch.equal(weights.weight, RandomModel(spec, seed=1).gate_weight(3))
    if correction_bias:
        assert weights.correction_bias is not None and weights.correction_bias.shape == (8,)
        assert weights.correction_bias.abs().min() > 0
    else:
        assert weights.correction_bias is None
    if shared_gate:
        assert weights.shared_gate is not None and weights.shared_gate.shape == (1, HIDDEN)
        assert weights.shared_gate.abs().sum() > 0
    else:
        assert weights.shared_gate is None


@pytest.mark.parametrize(
    ("spec", "pair", "message"),
    [
        pytest.param(QWEN_SPEC, (1, 11), r"expert 11 of layer 1 is out of range 0\.\.10 \(3 shared after them\)",
                     id="past-the-shared"),
        pytest.param(QWEN_SPEC, (3, -1), r"out of range 0\.\.10 \(3 shared after them\)", id="negative"),
        pytest.param(V3_SPEC, (2, 18), r"out of range 0\.\.17 \(2 shared after them\)", id="v3"),
        pytest.param(PLAIN_SPEC, (0, 8), r"expert 8 of layer 0 is out of range 0\.\.7$", id="no-shared"),
    ],
)
def test_out_of_range_experts_name_the_shared_ones(spec, pair, message):
    model = RandomModel(spec)
    with pytest.raises(ValueError, match=message):
        model.experts([pair])
    with pytest.raises(ValueError, match=message):
        model.expert(*pair)


def test_shared_mlp_of_a_layer_without_moe_is_refused():
    with pytest.raises(ValueError, match=r"layer 0 is not an MoE layer"):
        RandomModel(QWEN_SPEC).shared(0)


# ---------------------------------------------------------------------------------------------
# Dispatch: every token also goes to each shared piece
# ---------------------------------------------------------------------------------------------


def random_routing(tokens: int, experts: int, top_k: int, seed: int, shared_gate: bool) -> Routing:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.rand(tokens, experts, generator=gen).argsort(dim=1)[:, :top_k]
    weights = torch.rand(tokens, top_k, generator=gen) + 0.1
    shared = torch.rand(tokens, generator=gen) if shared_gate else None
    return Routing(ids.to(torch.int64), weights.float(), shared)


def assignments(plan: DispatchPlan, placement: Placement) -> Counter:
    """Every (logical expert, token, weight) the plan sends, checking each goes to a worker that
    hosts that expert."""
    seen: Counter = Counter()
    for req in plan.requests:
        for i, expert in enumerate(req.share.expert_ids.tolist()):
            assert req.worker in [w for w, _ in placement.replicas[expert]]
            lo, hi = req.share.offsets[i], req.share.offsets[i + 1]
            for t, w in zip(req.share.token_idx[lo:hi].tolist(), req.share.weights[lo:hi].tolist()):
                seen[(expert, t, w)] += 1
    return seen


@pytest.mark.parametrize("shared_gate", [True, False], ids=["shared-gate", "weight-one"])
@pytest.mark.parametrize("moe_index", [0, 1])
@pytest.mark.parametrize("replicated", [False, True], ids=["single", "replicated"])
def test_plan_dispatch_sends_every_token_to_each_shared_piece(shared_gate, moe_index, replicated):
    spec = QWEN_SPEC
    experts, shared, tokens = spec.num_experts, spec.num_shared_experts, 20
    stride = experts + shared
    if replicated:
        placement = Placement.replicated(spec.num_logical_experts, 4, copies=2)
    else:
        placement = Placement.round_robin(spec.num_logical_experts, 4, 8)
    routing = random_routing(tokens, experts, spec.top_k, seed=moe_index, shared_gate=shared_gate)
    plan = plan_dispatch(routing, moe_index, experts, ReplicaTable(placement), shared=shared)

    expected: Counter = Counter()
    ids, weights = routing.topk_ids.tolist(), routing.topk_weights.tolist()
    shared_w = [1.0] * tokens if routing.shared_weights is None else routing.shared_weights.tolist()
    for t in range(tokens):
        for e, w in zip(ids[t], weights[t]):
            expected[(moe_index * stride + e, t, w)] += 1
        for s in range(shared):
            expected[(moe_index * stride + experts + s, t, shared_w[t])] += 1
    assert assignments(plan, placement) == expected
    assert plan.expert_tokens.shape == (experts,)
    np.testing.assert_array_equal(plan.expert_tokens, np.bincount(routing.topk_ids.reshape(-1), minlength=experts))
    assert plan.expert_tokens.sum() == tokens * spec.top_k  # the shared pieces are no routed load
    assert plan.worker_tokens.sum() == tokens * (spec.top_k + shared)


def test_plan_dispatch_without_shared_pieces_sends_routed_assignments_only():
    routing = random_routing(10, 8, 2, seed=5, shared_gate=True)
    placement = Placement.round_robin(PLAIN_SPEC.num_logical_experts, 3)
    plan = plan_dispatch(routing, 1, 8, ReplicaTable(placement))
    got = assignments(plan, placement)
    assert sum(got.values()) == 20 and all(8 <= expert < 16 for expert, _, _ in got)


# ---------------------------------------------------------------------------------------------
# The reference layer: by hand, through dispatch and combine, and against transformers
# ---------------------------------------------------------------------------------------------


def expected_by_hand(spec: ModelSpec, model: RandomModel, layer: int,
                     hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(routed, shared) parts of the layer's output: the routed experts token by token, and the
    whole shared MLP times the shared weight."""
    routing = route(hidden, model.gate(layer), spec.gate, spec.top_k)
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for e, w in zip(routing.topk_ids[t].tolist(), routing.topk_weights[t].tolist()):
            out[t] += w * whole_mlp(hidden[t:t + 1], model.expert(layer, e))[0]
    scale = torch.ones(hidden.shape[0]) if routing.shared_weights is None else routing.shared_weights
    return out, scale.unsqueeze(1) * whole_mlp(hidden, model.shared(layer))


def serve_in_process(spec: ModelSpec, model: RandomModel, placement: Placement, layer: int,
                     hidden: torch.Tensor) -> torch.Tensor:
    """The served path without Ray: gate, plan, each worker's share with `run_experts` on its
    own copies of the weights, combine."""
    routing = route(hidden, model.gate(layer).float(), spec.gate, spec.top_k)
    plan = plan_dispatch(routing, spec.moe_index(layer), spec.num_experts, ReplicaTable(placement),
                         shared=spec.num_shared_experts)
    outputs = []
    for req in plan.requests:
        weights = dict(model.experts([spec.layer_expert(int(e)) for e in req.share.expert_ids]))
        experts = [(fuse_w13(w.w1, w.w3), w.w2) for w in weights.values()]
        _, partial = run_experts(hidden, experts, torch.from_numpy(req.share.offsets), torch.from_numpy(req.share.token_idx),
                                 torch.from_numpy(req.share.weights))
        outputs.append(partial.numpy())
    return combine(hidden.shape[0], spec.hidden_size, plan, outputs)


@pytest.mark.parametrize("spec", [pytest.param(QWEN_SPEC, id="qwen2-like"), pytest.param(V3_SPEC, id="v3-like")])
def test_reference_layer_adds_the_shared_pieces_times_the_shared_weight(spec):
    model = RandomModel(spec, seed=7)
    reference = ReferenceMoE(model)
    hidden = randn(12, HIDDEN, seed=8)
    for layer in spec.moe_layers:
        out, routing = reference.forward(layer, hidden)
        assert (routing.shared_weights is not None) == spec.gate.shared_gate
        routed, shared = expected_by_hand(spec, model, layer, hidden)
        assert shared.abs().max() > 0.1 and routed.abs().max() > 0.1
        torch.testing.assert_close(out, routed + shared, rtol=1e-5, atol=1e-5)

        placement = Placement.replicated(spec.num_logical_experts, 3, copies=2)
        torch.testing.assert_close(serve_in_process(spec, model, placement, layer, hidden), out, rtol=1e-5, atol=1e-5)


class HFBlockWeights:
    """The weights of one transformers MoE block (Qwen2-MoE or DeepSeek-V3) as a WeightSource
    of a one-MoE-layer spec, the shared MLP cut into pieces like a checkpoint's."""

    def __init__(self, spec: ModelSpec, block: torch.nn.Module, shared_mlp: torch.nn.Module,
                 bias: torch.Tensor | None = None, shared_gate: torch.Tensor | None = None):
        self.spec, self._block = spec, block
        self._gate = GateWeights(block.gate.weight.detach().clone(), bias, shared_gate)
        self._shared = ExpertWeights(w1=shared_mlp.gate_proj.weight.detach(), w2=shared_mlp.down_proj.weight.detach(),
                                     w3=shared_mlp.up_proj.weight.detach())

    def gate_weight(self, layer: int) -> torch.Tensor:
        return self._gate.weight

    def gate(self, layer: int) -> GateWeights:
        return self._gate

    def experts(self, pairs, progress=None):
        gate_up, down = self._block.experts.gate_up_proj.detach(), self._block.experts.down_proj.detach()
        for layer, e in pairs:
            if e >= self.spec.num_experts:
                yield (layer, e), shared_piece(self.spec, self._shared, e - self.spec.num_experts)
            else:
                w1, w3 = gate_up[e].chunk(2, dim=0)
                yield (layer, e), ExpertWeights(w1=w1, w2=down[e], w3=w3)


def fill_block(block: torch.nn.Module, seed: int) -> None:
    """Random weights for every parameter (the experts' are left uninitialised by transformers)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in block.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) / param.shape[-1] ** 0.5)


def test_reference_layer_equals_transformers_qwen2_moe_block():
    config = Qwen2MoeConfig(hidden_size=HIDDEN, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
                            moe_intermediate_size=INTER, shared_expert_intermediate_size=40)
    block = Qwen2MoeSparseMoeBlock(config).eval()
    fill_block(block, seed=1)
    spec = ModelSpec(hidden_size=HIDDEN, intermediate_size=INTER, num_experts=8, top_k=2, moe_layers=(0,),
                     num_hidden_layers=1, gate=GateSpec(norm_topk_prob=False, shared_gate=True),
                     shared_intermediate_size=40)
    source = HFBlockWeights(spec, block, block.shared_expert, shared_gate=block.shared_expert_gate.weight.detach())
    hidden = randn(2, 10, HIDDEN, seed=2)
    with torch.no_grad():
        expected = block(hidden).reshape(20, HIDDEN)
    out, _ = ReferenceMoE(source).forward(0, hidden.reshape(20, HIDDEN))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_reference_layer_equals_transformers_deepseek_v3_block():
    config = DeepseekV3Config(hidden_size=HIDDEN, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                              routed_scaling_factor=2.5, norm_topk_prob=True, moe_intermediate_size=INTER,
                              n_shared_experts=2)
    block = DeepseekV3MoE(config).eval()
    fill_block(block, seed=3)
    bias = randn(16, seed=4, scale=0.2)
    block.gate.e_score_correction_bias.copy_(bias)
    spec = ModelSpec(hidden_size=HIDDEN, intermediate_size=INTER, num_experts=16, top_k=4, moe_layers=(0,),
                     num_hidden_layers=1, gate=V3_SPEC.gate, shared_intermediate_size=2 * INTER)
    source = HFBlockWeights(spec, block, block.shared_experts, bias=bias)
    hidden = randn(2, 10, HIDDEN, seed=5)
    with torch.no_grad():
        expected = block(hidden).reshape(20, HIDDEN)
    out, _ = ReferenceMoE(source).forward(0, hidden.reshape(20, HIDDEN))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Load board and planner
# ---------------------------------------------------------------------------------------------


def test_load_board_keeps_routed_statistics_and_places_the_shared_load():
    spec = QWEN_SPEC
    board = LoadBoard(spec.num_moe_layers, spec.num_experts, window_s=10.0, started_s=0.0, placed=spec.placed_load)
    routed = np.array([[6, 0, 2, 0, 0, 4, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]], dtype=np.int64)
    board.report(RouterReport("r0", routed), now_s=1.0)
    board.report(RouterReport("r1", routed), now_s=2.0)
    snapshot = board.snapshot(now_s=2.5)
    np.testing.assert_array_equal(snapshot.expert_tokens, 2 * routed)
    assert snapshot.tokens_per_s.shape == (2, 8) and snapshot.total_tokens == 2 * routed.sum()
    assert snapshot.placement_load.shape == (2, 11)
    np.testing.assert_array_equal(snapshot.placement_load, spec.placed_load(2 * routed))
    np.testing.assert_array_equal(snapshot.placement_load[:, 8:], [[12, 12, 12], [8, 8, 8]])

    later = board.snapshot(now_s=30.0)  # the window has passed: nothing routed, nothing placed
    assert later.placement_load.shape == (2, 11) and not later.placement_load.any()


def test_load_board_without_shared_experts_places_the_routed_load():
    board = LoadBoard(2, 8, window_s=10.0, started_s=0.0)
    routed = np.arange(16, dtype=np.int64).reshape(2, 8)
    board.report(RouterReport("r0", routed), now_s=1.0)
    snapshot = board.snapshot(now_s=2.0)
    assert snapshot.placed_tokens is None
    assert snapshot.placement_load is snapshot.expert_tokens
    np.testing.assert_array_equal(snapshot.placement_load, routed)


def test_planner_replicates_the_shared_pieces_that_carry_every_token():
    """1000 tokens x top-2 per layer: two hot experts of 400, six cold of 200, and one shared
    piece that every token visits (1000). 8 workers x 4 slots give each layer 16 slots for 9
    experts: the 7 spare ones go by load per replica, so the shared piece gets at least 5 (it
    stays the heaviest per replica until it is at 1000/5 = 200) and a cold expert at most 2."""
    spec = ModelSpec(hidden_size=HIDDEN, intermediate_size=INTER, num_experts=8, top_k=2, moe_layers=(0, 1),
                     num_hidden_layers=2, shared_intermediate_size=INTER)
    routed = np.array([[400, 400, 200, 200, 200, 200, 200, 200],
                       [200, 200, 200, 400, 200, 200, 200, 400]], dtype=np.float64)
    placed = spec.placed_load(routed)
    np.testing.assert_array_equal(placed[:, 8], [1000, 1000])
    placement = plan_placement(placed, [4] * 8)
    assert placement.num_logical_experts == spec.num_logical_experts == 18
    counts = placement.replica_counts.reshape(2, 9)
    assert (counts >= 1).all() and counts.sum() == 32
    for layer, hot in enumerate([(0, 1), (3, 7)]):
        cold = [e for e in range(8) if e not in hot]
        assert counts[layer, 8] >= 5, f"layer {layer}: {counts[layer].tolist()}"
        assert counts[layer, 8] > counts[layer, cold].max()
        assert spec.expert_label(layer * 9 + 8) == f"{layer}:s0"

    # Planned on the routed load alone (shared pieces weightless), they would get one replica.
    unweighted = plan_placement(np.hstack([routed, np.zeros((2, 1))]), [4] * 8)
    assert (unweighted.replica_counts.reshape(2, 9)[:, 8] == 1).all()
