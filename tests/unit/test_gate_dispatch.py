"""The gate (against hand-computed values and transformers' Mixtral router), dispatch planning
(every assignment exactly once, in the slot that hosts its expert, replicas share the load) and
combine (against a direct per-token reference)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from cluster.placement import EMPTY, Placement
from router_service.dispatch import DispatchPlan, ReplicaTable, combine, plan_dispatch
from router_service.gate import Routing, mixtral_route

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def random_routing(tokens: int, experts: int, top_k: int, seed: int) -> Routing:
    """Distinct experts per token, positive weights summing to 1."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.rand(tokens, experts, generator=gen).argsort(dim=1)[:, :top_k]
    weights = torch.rand(tokens, top_k, generator=gen) + 0.1
    return Routing(ids.to(torch.int64), (weights / weights.sum(dim=1, keepdim=True)).float())


def fixed_routing(ids: list[list[int]], weights: list[list[float]] | None = None) -> Routing:
    topk_ids = torch.tensor(ids, dtype=torch.int64)
    if weights is None:
        topk_weights = torch.full(topk_ids.shape, 1.0 / topk_ids.shape[1])
    else:
        topk_weights = torch.tensor(weights, dtype=torch.float32)
    return Routing(topk_ids, topk_weights.float())


def assert_plan_invariants(
    plan: DispatchPlan, routing: Routing, moe_index: int, num_experts: int, placement: Placement
) -> None:
    ids = routing.topk_ids.numpy()
    weights = routing.topk_weights.numpy()
    tokens, k = ids.shape
    seen: Counter[tuple[int, int]] = Counter()
    workers = [r.worker for r in plan.requests]
    assert workers == sorted(set(workers)), "one request per worker, in worker order"
    assert plan.placement_version == placement.version
    for req in plan.requests:
        assert req.offsets[0] == 0 and req.offsets[-1] == req.num_tokens
        assert (np.diff(req.offsets) > 0).all(), "no empty segments"
        assert list(req.slot_ids) == sorted(set(req.slot_ids.tolist()))
        assert req.token_idx.dtype == np.int64 and req.weights.dtype == np.float32
        for i, slot in enumerate(req.slot_ids):
            expert = placement.slots[req.worker][slot]
            assert expert != EMPTY
            local = expert - moe_index * num_experts
            assert 0 <= local < num_experts, "slot hosts an expert of another layer"
            lo, hi = req.offsets[i], req.offsets[i + 1]
            for t, w in zip(req.token_idx[lo:hi], req.weights[lo:hi]):
                (js,) = np.nonzero(ids[t] == local)
                assert js.size == 1, f"token {t} was not routed to expert {local}"
                assert w == weights[t, js[0]]
                seen[(int(t), int(js[0]))] += 1
    assert seen == Counter({(t, j): 1 for t in range(tokens) for j in range(k)})
    np.testing.assert_array_equal(plan.expert_tokens, np.bincount(ids.ravel(), minlength=num_experts))


def expert_matrices(num_logical: int, hidden: int, seed: int) -> np.ndarray:
    """A fake expert per logical id: `y = x @ M[g]`; `[num_logical, H, H]` float32."""
    return np.random.default_rng(seed).standard_normal((num_logical, hidden, hidden)).astype(np.float32)


def fake_workers(
    x: np.ndarray, plan: DispatchPlan, placement: Placement, mats: np.ndarray
) -> list[np.ndarray]:
    """What the workers would return: gate-weighted fake expert outputs, `[N, H]` per request."""
    outputs = []
    for req in plan.requests:
        y = np.empty((req.num_tokens, x.shape[1]), dtype=np.float32)
        for i, slot in enumerate(req.slot_ids):
            lo, hi = req.offsets[i], req.offsets[i + 1]
            expert = placement.slots[req.worker][slot]
            y[lo:hi] = (x[req.token_idx[lo:hi]] @ mats[expert]) * req.weights[lo:hi, None]
        outputs.append(y)
    return outputs


def reference_moe(
    x: np.ndarray, routing: Routing, moe_index: int, num_experts: int, mats: np.ndarray
) -> np.ndarray:
    """Per-token loop: out[t] = sum_j w[t, j] * x[t] @ M[moe_index * E + ids[t, j]]."""
    ids, weights = routing.topk_ids.numpy(), routing.topk_weights.numpy()
    out = np.zeros_like(x, dtype=np.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            g = moe_index * num_experts + ids[t, j]
            out[t] += weights[t, j] * (x[t].astype(np.float64) @ mats[g].astype(np.float64))
    return out


# ---------------------------------------------------------------------------------------------
# Gate
# ---------------------------------------------------------------------------------------------


def test_gate_hand_computed_case() -> None:
    gate = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # [E=3, H=2]
    hidden = torch.tensor([
        [math.log(3), math.log(2)],   # logits [ln 3, ln 2, -ln 3]: probs ~ 3 : 2 : 1/3
        [-math.log(2), math.log(4)],  # logits [-ln 2, ln 4, ln 2]: probs ~ 1/2 : 4 : 2
    ])  # fmt: skip

    routing = mixtral_route(hidden, gate, top_k=2)

    assert routing.topk_ids.tolist() == [[0, 1], [1, 2]]
    # renormalised over the two picked: 3/(3+2), 2/(3+2); 4/(4+2), 2/(4+2)
    torch.testing.assert_close(routing.topk_weights, torch.tensor([[3 / 5, 2 / 5], [2 / 3, 1 / 3]]))
    assert routing.topk_ids.dtype == torch.int64
    assert routing.topk_weights.dtype == torch.float32


@pytest.mark.parametrize(
    ("tokens", "hidden", "experts", "top_k"),
    [(1, 16, 8, 2), (37, 32, 8, 2), (64, 24, 16, 4), (5, 8, 4, 4), (20, 8, 6, 1)],
)
def test_gate_equals_transformers_mixtral_router(tokens: int, hidden: int, experts: int, top_k: int) -> None:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    config = MixtralConfig(hidden_size=hidden, num_local_experts=experts, num_experts_per_tok=top_k)
    router = MixtralTopKRouter(config)
    gen = torch.Generator().manual_seed(tokens * 1000 + experts)
    gate_weight = torch.randn(experts, hidden, generator=gen)
    x = torch.randn(tokens, hidden, generator=gen)
    with torch.no_grad():
        router.weight.copy_(gate_weight)
        _, hf_scores, hf_ids = router(x)

    routing = mixtral_route(x, gate_weight, top_k)

    torch.testing.assert_close(routing.topk_ids, hf_ids.to(torch.int64), rtol=0, atol=0)
    torch.testing.assert_close(routing.topk_weights, hf_scores)


def test_gate_weights_sum_to_one_and_pick_the_largest_logits() -> None:
    gen = torch.Generator().manual_seed(3)
    x, gate = torch.randn(100, 16, generator=gen), torch.randn(8, 16, generator=gen)

    routing = mixtral_route(x, gate, top_k=3)

    assert routing.topk_ids.shape == routing.topk_weights.shape == (100, 3)
    torch.testing.assert_close(routing.topk_weights.sum(dim=1), torch.ones(100))
    assert (routing.topk_weights > 0).all()
    assert (routing.topk_weights[:, :-1] >= routing.topk_weights[:, 1:]).all(), "sorted descending"
    expected = (x @ gate.t()).topk(3, dim=1).indices
    assert torch.equal(routing.topk_ids, expected)


# ---------------------------------------------------------------------------------------------
# ReplicaTable and plan_dispatch
# ---------------------------------------------------------------------------------------------


def test_replica_table_pads_with_empty() -> None:
    p = Placement.from_mapping(4, 3, {0: [0, 1], 1: [2, 1, EMPTY]})

    table = ReplicaTable(p)

    assert table.version == 4
    assert table.num_slots == 3
    np.testing.assert_array_equal(table.worker, [[0, EMPTY], [0, 1], [1, EMPTY]])
    np.testing.assert_array_equal(table.slot, [[0, EMPTY], [1, 1], [0, EMPTY]])
    np.testing.assert_array_equal(table.count, [1, 2, 1])


def test_plan_dispatch_golden_second_layer() -> None:
    # 2 MoE layers x 4 experts; layer 1 holds logical experts 4..7:
    # worker 0 = [0, 2, 4, 6], worker 1 = [1, 3, 5, 7]
    placement = Placement.round_robin(8, 2)
    routing = fixed_routing([[0, 1], [2, 0]], [[0.75, 0.25], [0.5, 0.5]])  # logical [4, 5], [6, 4]

    plan = plan_dispatch(routing, moe_index=1, num_experts=4, table=ReplicaTable(placement))

    w0, w1 = plan.requests
    assert w0.worker == 0
    np.testing.assert_array_equal(w0.slot_ids, [2, 3])  # experts 4 and 6
    np.testing.assert_array_equal(w0.offsets, [0, 2, 3])
    np.testing.assert_array_equal(w0.token_idx, [0, 1, 1])
    np.testing.assert_array_equal(w0.weights, np.array([0.75, 0.5, 0.5], dtype=np.float32))
    assert w1.worker == 1
    np.testing.assert_array_equal(w1.slot_ids, [2])  # expert 5
    np.testing.assert_array_equal(w1.offsets, [0, 1])
    np.testing.assert_array_equal(w1.token_idx, [0])
    np.testing.assert_array_equal(w1.weights, np.array([0.25], dtype=np.float32))
    np.testing.assert_array_equal(plan.expert_tokens, [2, 1, 1, 0])


def test_plan_dispatch_invariants_on_random_batches() -> None:
    placement = Placement.from_mapping(3, 16, {
        0: [0, 3, 6, 9, 12, 15, 1], 1: [1, 4, 7, 10, 13, EMPTY, 12], 2: [2, 5, 8, 11, 14, 1, EMPTY],
    })  # fmt: skip  (experts 1 and 12 replicated)
    table = ReplicaTable(placement)
    for seed in range(10):
        routing = random_routing(tokens=50 + seed, experts=8, top_k=2, seed=seed)
        for moe_index in (0, 1):
            plan = plan_dispatch(routing, moe_index, 8, table)
            assert_plan_invariants(plan, routing, moe_index, 8, placement)


def test_replicated_expert_gets_near_equal_contiguous_shares() -> None:
    # expert 2 lives in worker 0 slot 1 and worker 1 slot 1
    placement = Placement.from_mapping(0, 4, {0: [0, 2, 1], 1: [3, 2]})
    routing = fixed_routing([[2]] * 7)

    plan = plan_dispatch(routing, 0, 4, ReplicaTable(placement))

    w0, w1 = plan.requests
    assert (w0.worker, w0.slot_ids.tolist(), w0.token_idx.tolist()) == (0, [1], [0, 1, 2, 3])
    assert (w1.worker, w1.slot_ids.tolist(), w1.token_idx.tolist()) == (1, [1], [4, 5, 6])


@pytest.mark.parametrize("replicas", [2, 3, 4])
@pytest.mark.parametrize("hot_tokens", [1, 5, 10, 31])
def test_replica_shares_differ_by_at_most_one(replicas: int, hot_tokens: int) -> None:
    # expert 0 replicated over `replicas` workers; expert 1 on worker 0 only
    placement = Placement.from_mapping(0, 2, [[0, 1]] + [[0]] * (replicas - 1))
    # the hot expert's tokens are interleaved with expert 1's tokens
    hot = list(range(0, 2 * hot_tokens, 2))
    ids = [[0] if t in hot else [1] for t in range(2 * hot_tokens)]

    plan = plan_dispatch(fixed_routing(ids), 0, 2, ReplicaTable(placement))

    shares = []
    for req in plan.requests:
        for i, slot in enumerate(req.slot_ids):
            if placement.slots[req.worker][slot] == 0:
                shares.append(req.token_idx[req.offsets[i]:req.offsets[i + 1]].tolist())
    sizes = [len(s) for s in shares]
    assert sum(sizes) == hot_tokens
    assert max(sizes) - min(sizes) <= 1 if len(sizes) == replicas else max(sizes) == 1
    # contiguous: concatenated in replica order they are the hot tokens in order
    assert [t for share in shares for t in share] == hot


# ---------------------------------------------------------------------------------------------
# Named edge cases, each checked for invariants and against the per-token reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("placement", "routing", "moe_index", "num_experts"),
    [
        pytest.param(Placement.round_robin(4, 2), random_routing(1, 4, 2, seed=0), 0, 4,
                     id="single-token"),
        pytest.param(Placement.round_robin(3, 2), random_routing(9, 3, 3, seed=1), 0, 3,
                     id="top-k-equals-experts"),
        pytest.param(Placement.round_robin(4, 2), fixed_routing([[2]] * 6), 0, 4,
                     id="all-tokens-one-expert"),
        pytest.param(Placement.from_mapping(0, 4, {0: [0, 2], 1: [1, 2], 2: [3, 2]}),
                     fixed_routing([[2, 0]] * 8, [[0.6, 0.4]] * 8), 0, 4,
                     id="all-tokens-one-replicated-expert"),
        pytest.param(Placement.round_robin(8, 1), random_routing(20, 8, 2, seed=2), 0, 8,
                     id="one-worker"),
        pytest.param(Placement.round_robin(8, 3, slots_per_worker=5), random_routing(33, 4, 2, seed=3),
                     1, 4, id="second-layer-spare-slots"),
        pytest.param(Placement.round_robin(8, 8), random_routing(3, 8, 2, seed=4), 0, 8,
                     id="fewer-tokens-than-workers"),
    ],
)  # fmt: skip
def test_dispatch_and_combine_equal_reference(
    placement: Placement, routing: Routing, moe_index: int, num_experts: int
) -> None:
    tokens, hidden = routing.topk_ids.shape[0], 6
    x = np.random.default_rng(tokens).standard_normal((tokens, hidden)).astype(np.float32)
    mats = expert_matrices(placement.num_logical_experts, hidden, seed=moe_index)

    plan = plan_dispatch(routing, moe_index, num_experts, ReplicaTable(placement))
    assert_plan_invariants(plan, routing, moe_index, num_experts, placement)
    out = combine(tokens, hidden, plan, fake_workers(x, plan, placement, mats))

    assert out.shape == (tokens, hidden) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), reference_moe(x, routing, moe_index, num_experts, mats),
                               rtol=1e-5, atol=1e-5)


def test_combine_sums_rows_of_the_same_token() -> None:
    placement = Placement.round_robin(2, 2)
    routing = fixed_routing([[0, 1], [1, 0]], [[0.5, 0.5], [0.5, 0.5]])
    plan = plan_dispatch(routing, 0, 2, ReplicaTable(placement))
    # every worker returns ones for each of its rows: each token gets one row from each worker
    outputs = [np.ones((r.num_tokens, 3), dtype=np.float32) for r in plan.requests]

    out = combine(2, 3, plan, outputs)

    torch.testing.assert_close(out, torch.full((2, 3), 2.0))
