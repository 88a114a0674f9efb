"""The gate (against hand-computed values and transformers' Mixtral router), water filling
(golden cases and brute-force optimality), dispatch planning (every assignment exactly once, to a
worker that hosts its logical expert; a replicated expert's tokens go preferably to the replicas
with spare capacity) and combine (against a direct per-token reference)."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest
import torch

from cluster.placement import EMPTY, Placement
from router_service.dispatch import DispatchPlan, ReplicaTable, combine, plan_dispatch, plan_retry, water_fill
from router_service.gate import Routing, softmax_topk_route

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
        assert req.share.offsets[0] == 0 and req.share.offsets[-1] == req.num_tokens
        assert (np.diff(req.share.offsets) > 0).all(), "no empty segments"
        assert list(req.share.expert_ids) == sorted(set(req.share.expert_ids.tolist()))
        assert req.share.expert_ids.dtype == np.int64 and req.share.offsets.dtype == np.int64
        assert req.share.token_idx.dtype == np.int64 and req.share.weights.dtype == np.float32
        for i, expert in enumerate(req.share.expert_ids):
            assert req.worker in [w for w, _ in placement.replicas[expert]], (
                f"worker {req.worker} hosts no replica of logical expert {expert}"
            )
            local = expert - moe_index * num_experts
            assert 0 <= local < num_experts, "expert of another layer"
            lo, hi = req.share.offsets[i], req.share.offsets[i + 1]
            for t, w in zip(req.share.token_idx[lo:hi], req.share.weights[lo:hi]):
                (js,) = np.nonzero(ids[t] == local)
                assert js.size == 1, f"token {t} was not routed to expert {local}"
                assert w == weights[t, js[0]]
                seen[(int(t), int(js[0]))] += 1
    assert seen == Counter({(t, j): 1 for t in range(tokens) for j in range(k)})
    np.testing.assert_array_equal(plan.expert_tokens, np.bincount(ids.ravel(), minlength=num_experts))
    # worker_tokens: `[W]` rows sent to each worker, zero for workers that get no request
    sent = np.zeros(placement.num_workers, dtype=np.int64)
    for req in plan.requests:
        sent[req.worker] = req.num_tokens
    assert plan.worker_tokens.shape == (placement.num_workers,)
    np.testing.assert_array_equal(plan.worker_tokens, sent)
    assert int(plan.worker_tokens.sum()) == tokens * k


def expert_shares(plan: DispatchPlan, expert: int) -> dict[int, list[int]]:
    """`{worker: token rows}` of one logical expert, in worker order (workers with none left out)."""
    shares = {}
    for req in plan.requests:
        for i, e in enumerate(req.share.expert_ids):
            if e == expert:
                shares[req.worker] = req.share.token_idx[req.share.offsets[i]:req.share.offsets[i + 1]].tolist()
    return shares


def expert_matrices(num_logical: int, hidden: int, seed: int) -> np.ndarray:
    """A fake expert per logical id: `y = x @ M[g]`; `[num_logical, H, H]` float32."""
    return np.random.default_rng(seed).standard_normal((num_logical, hidden, hidden)).astype(np.float32)


def fake_workers(x: np.ndarray, plan: DispatchPlan, mats: np.ndarray) -> list[np.ndarray]:
    """What the workers would return: per distinct token (`req.rows`), the sum of its
    gate-weighted fake expert outputs, `[U, H]` per request."""
    outputs = []
    for req in plan.requests:
        assert list(req.rows) == sorted(set(req.share.token_idx.tolist()))
        y = np.zeros((len(req.rows), x.shape[1]), dtype=np.float32)
        position = {int(t): i for i, t in enumerate(req.rows)}
        for i, expert in enumerate(req.share.expert_ids):
            for j in range(req.share.offsets[i], req.share.offsets[i + 1]):
                t = int(req.share.token_idx[j])
                y[position[t]] += (x[t] @ mats[expert]) * req.share.weights[j]
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

    routing = softmax_topk_route(hidden, gate, top_k=2)

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

    routing = softmax_topk_route(x, gate_weight, top_k)

    torch.testing.assert_close(routing.topk_ids, hf_ids.to(torch.int64), rtol=0, atol=0)
    torch.testing.assert_close(routing.topk_weights, hf_scores)


@pytest.mark.parametrize("norm_topk_prob", [True, False], ids=["renormalised", "raw-softmax"])
def test_gate_equals_transformers_qwen3_moe_router(norm_topk_prob: bool) -> None:
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    config = Qwen3MoeConfig(hidden_size=24, num_experts=12, num_experts_per_tok=3, norm_topk_prob=norm_topk_prob)
    router = Qwen3MoeTopKRouter(config)
    gen = torch.Generator().manual_seed(11)
    gate_weight = torch.randn(12, 24, generator=gen)
    x = torch.randn(40, 24, generator=gen)
    with torch.no_grad():
        router.weight.copy_(gate_weight)
        _, hf_scores, hf_ids = router(x)

    routing = softmax_topk_route(x, gate_weight, 3, renormalize=norm_topk_prob)

    torch.testing.assert_close(routing.topk_ids, hf_ids.to(torch.int64), rtol=0, atol=0)
    torch.testing.assert_close(routing.topk_weights, hf_scores)


def test_gate_weights_sum_to_one_and_pick_the_largest_logits() -> None:
    gen = torch.Generator().manual_seed(3)
    x, gate = torch.randn(100, 16, generator=gen), torch.randn(8, 16, generator=gen)

    routing = softmax_topk_route(x, gate, top_k=3)

    assert routing.topk_ids.shape == routing.topk_weights.shape == (100, 3)
    torch.testing.assert_close(routing.topk_weights.sum(dim=1), torch.ones(100))
    assert (routing.topk_weights > 0).all()
    assert (routing.topk_weights[:, :-1] >= routing.topk_weights[:, 1:]).all(), "sorted descending"
    expected = (x @ gate.t()).topk(3, dim=1).indices
    assert torch.equal(routing.topk_ids, expected)


# ---------------------------------------------------------------------------------------------
# water_fill
# ---------------------------------------------------------------------------------------------


def compositions(n: int, m: int):
    """Every way to split n tokens over m workers (stars and bars)."""
    for cuts in itertools.combinations(range(n + m - 1), m - 1):
        bounds = (-1, *cuts, n + m - 1)
        yield [bounds[i + 1] - bounds[i] - 1 for i in range(m)]


def best_peak(loads: list[float], n: int) -> float:
    """The lowest possible max final load, by trying every split."""
    return min(max(load + s for load, s in zip(loads, split)) for split in compositions(n, len(loads)))


@pytest.mark.parametrize(
    ("loads", "n", "shares"),
    [
        pytest.param([1000, 0], 200, [0, 200], id="busy-worker-gets-nothing"),
        pytest.param([10, 0, 5], 12, [0, 9, 3], id="fill-up-to-below-the-fullest"),  # final 10, 9, 8
        pytest.param([4, 0], 10, [3, 7], id="level-above-every-load"),  # final 7, 7
        pytest.param([2, 9, 0, 9], 6, [2, 0, 4, 0], id="two-of-four-filled"),  # final 4, 9, 4, 9
        pytest.param([0, 0, 0], 7, [3, 2, 2], id="equal-loads"),
        pytest.param([5, 5], 3, [2, 1], id="equal-busy-loads"),
        pytest.param([2.5, 0.0], 3, [0, 3], id="fractional-loads"),  # final 2.5, 3 (1 + 2: 3.5)
        pytest.param([3, 1, 2], 0, [0, 0, 0], id="zero-tokens"),
        pytest.param([0, 0], 0, [0, 0], id="zero-tokens-idle-workers"),
        pytest.param([7], 5, [5], id="one-worker"),
    ],
)  # fmt: skip
def test_water_fill_golden(loads: list[float], n: int, shares: list[int]) -> None:
    got = water_fill(np.array(loads), n)

    assert got.dtype == np.int64
    assert got.tolist() == shares


@pytest.mark.parametrize("integer_loads", [True, False], ids=["integer-loads", "float-loads"])
def test_water_fill_sums_to_n_and_its_peak_is_minimal(integer_loads: bool) -> None:
    rng = np.random.default_rng(int(integer_loads))
    for _ in range(300):
        m, n = int(rng.integers(1, 5)), int(rng.integers(0, 10))
        loads = rng.integers(0, 8, m) if integer_loads else np.round(rng.random(m) * 8, 1)

        shares = water_fill(loads, n)

        assert (shares >= 0).all() and int(shares.sum()) == n, (loads, n, shares)
        assert (loads + shares).max() == pytest.approx(best_peak(loads.tolist(), n)), (loads, n, shares)


@pytest.mark.parametrize("integer_loads", [True, False], ids=["integer-loads", "float-loads"])
def test_water_fill_no_token_is_worth_moving_on_large_cases(integer_loads: bool) -> None:
    # Too large for brute force: check that moving any one token from a worker that got some to
    # another worker cannot lower the fuller of the two, which makes the peak minimal.
    rng = np.random.default_rng(10 + int(integer_loads))
    for _ in range(500):
        m, n = int(rng.integers(1, 9)), int(rng.integers(0, 5000))
        loads = rng.integers(0, 1000, m) if integer_loads else rng.random(m) * 1000

        shares = water_fill(loads, n)

        assert (shares >= 0).all() and int(shares.sum()) == n, (loads, n, shares)
        final = loads + shares
        for i in np.flatnonzero(shares > 0):
            assert (final[i] <= final + 1 + 1e-9).all(), (loads, n, shares)


# ---------------------------------------------------------------------------------------------
# ReplicaTable and plan_dispatch
# ---------------------------------------------------------------------------------------------


def test_replica_table_pads_with_empty() -> None:
    # expert 1 sits in slot 1 of worker 0 and slot 2 of worker 1: slot positions do not matter
    p = Placement.from_mapping(4, 3, {0: [0, 1], 1: [2, EMPTY, 1], 2: [EMPTY]})

    table = ReplicaTable(p)

    assert table.version == 4
    assert table.num_workers == 3
    np.testing.assert_array_equal(table.worker, [[0, EMPTY], [0, 1], [1, EMPTY]])
    np.testing.assert_array_equal(table.count, [1, 2, 1])
    np.testing.assert_array_equal(table.replicated, [1])


def test_replica_table_leaves_out_down_workers() -> None:
    p = Placement.from_mapping(4, 3, {0: [0, 1], 1: [2, EMPTY, 1], 2: [EMPTY]})

    table = ReplicaTable(p, down=frozenset({0}))

    np.testing.assert_array_equal(table.worker, [[EMPTY, EMPTY], [1, EMPTY], [1, EMPTY]])
    np.testing.assert_array_equal(table.count, [0, 1, 1])
    np.testing.assert_array_equal(table.unserved, [0])


def test_tokens_of_an_unserved_expert_are_not_sent_anywhere() -> None:
    placement = Placement.round_robin(4, 2)  # worker 0: experts 0, 2; worker 1: 1, 3
    routing = fixed_routing([[0, 1], [2, 3], [1, 3]])

    plan = plan_dispatch(routing, 0, 4, ReplicaTable(placement, down=frozenset({0})))

    np.testing.assert_array_equal(plan.unserved_tokens, [0, 1])
    np.testing.assert_array_equal(plan.unserved_experts, [0, 2])
    assert [r.worker for r in plan.requests] == [1]
    np.testing.assert_array_equal(plan.requests[0].share.token_idx, [2, 2])  # token 2 alone: experts 1, 3
    np.testing.assert_array_equal(plan.expert_tokens, [1, 2, 1, 2])  # the load counts every token


def test_a_retry_sends_the_same_assignments_to_the_other_replicas() -> None:
    placement = Placement.from_mapping(0, 2, {0: [0, 1], 1: [0, 1]})
    routing = fixed_routing([[0, 1], [1, 0], [0, 1]], [[0.75, 0.25], [0.5, 0.5], [0.5, 0.5]])
    plan = plan_dispatch(routing, 0, 2, ReplicaTable(placement))
    lost = [r for r in plan.requests if r.worker == 0]

    retry = plan_retry(lost, ReplicaTable(placement, down=frozenset({0})))

    assert [r.worker for r in retry.requests] == [1]
    sent = sorted(zip(np.repeat(lost[0].share.expert_ids, np.diff(lost[0].share.offsets)), lost[0].share.token_idx, lost[0].share.weights))
    again = retry.requests[0]
    resent = sorted(zip(np.repeat(again.share.expert_ids, np.diff(again.share.offsets)), again.share.token_idx, again.share.weights))
    assert sent == resent
    assert not retry.expert_tokens.any()  # the load was counted once, by the first plan


def test_plan_dispatch_golden_second_layer() -> None:
    # 2 MoE layers x 4 experts; layer 1 holds logical experts 4..7:
    # worker 0 = [0, 2, 4, 6], worker 1 = [1, 3, 5, 7]
    placement = Placement.round_robin(8, 2)
    routing = fixed_routing([[0, 1], [2, 0]], [[0.75, 0.25], [0.5, 0.5]])  # logical [4, 5], [6, 4]

    plan = plan_dispatch(routing, moe_index=1, num_experts=4, table=ReplicaTable(placement))

    w0, w1 = plan.requests
    assert w0.worker == 0
    np.testing.assert_array_equal(w0.share.expert_ids, [4, 6])
    np.testing.assert_array_equal(w0.share.offsets, [0, 2, 3])
    np.testing.assert_array_equal(w0.share.token_idx, [0, 1, 1])
    np.testing.assert_array_equal(w0.share.weights, np.array([0.75, 0.5, 0.5], dtype=np.float32))
    assert w1.worker == 1
    np.testing.assert_array_equal(w1.share.expert_ids, [5])
    np.testing.assert_array_equal(w1.share.offsets, [0, 1])
    np.testing.assert_array_equal(w1.share.token_idx, [0])
    np.testing.assert_array_equal(w1.share.weights, np.array([0.25], dtype=np.float32))
    np.testing.assert_array_equal(plan.expert_tokens, [2, 1, 1, 0])
    np.testing.assert_array_equal(plan.worker_tokens, [3, 1])


def test_worker_tokens_count_idle_workers_as_zero() -> None:
    placement = Placement.round_robin(4, 4)  # expert e on worker e

    plan = plan_dispatch(fixed_routing([[0, 2]] * 3), 0, 4, ReplicaTable(placement))

    assert [r.worker for r in plan.requests] == [0, 2]
    np.testing.assert_array_equal(plan.worker_tokens, [3, 0, 3, 0])


@pytest.mark.parametrize("queued", [False, True], ids=["no-queue", "random-queues"])
def test_plan_dispatch_invariants_on_random_batches(queued: bool) -> None:
    placement = Placement.from_mapping(3, 16, {
        0: [0, 3, 6, 9, 12, 15, 1], 1: [1, 4, 7, 10, 13, EMPTY, 12], 2: [2, 5, 8, 11, 14, 1, EMPTY],
    })  # fmt: skip  (experts 1 and 12 replicated)
    table = ReplicaTable(placement)
    rng = np.random.default_rng(0)
    for seed in range(10):
        routing = random_routing(tokens=50 + seed, experts=8, top_k=2, seed=seed)
        for moe_index in (0, 1):
            outstanding = rng.integers(0, 100, 3) if queued else None
            plan = plan_dispatch(routing, moe_index, 8, table, outstanding)
            assert_plan_invariants(plan, routing, moe_index, 8, placement)


def test_replicated_expert_gets_near_equal_contiguous_shares() -> None:
    # expert 2 lives on workers 0 and 1, which have nothing else to do
    placement = Placement.from_mapping(0, 4, {0: [0, 2, 1], 1: [3, 2]})
    routing = fixed_routing([[2]] * 7)

    plan = plan_dispatch(routing, 0, 4, ReplicaTable(placement))

    w0, w1 = plan.requests
    assert (w0.worker, w0.share.expert_ids.tolist(), w0.share.token_idx.tolist()) == (0, [2], [0, 1, 2, 3])
    assert (w1.worker, w1.share.expert_ids.tolist(), w1.share.token_idx.tolist()) == (1, [2], [4, 5, 6])
    np.testing.assert_array_equal(plan.worker_tokens, [4, 3])


@pytest.mark.parametrize("queue", [None, 40], ids=["no-queue", "equal-queues"])
@pytest.mark.parametrize("replicas", [2, 3, 4])
@pytest.mark.parametrize("hot_tokens", [1, 5, 10, 31])
def test_replica_shares_on_equally_loaded_workers_differ_by_at_most_one(
    replicas: int, hot_tokens: int, queue: int | None
) -> None:
    # expert 0 has a replica on every worker; expert 1 + w lives on worker w alone and gets 2
    # tokens, so every replica's worker starts out equally loaded
    placement = Placement.from_mapping(0, 1 + replicas, [[0, 1 + w] for w in range(replicas)])
    cold = [1 + w for w in range(replicas)] * 2
    ids: list[list[int]] = []
    for i in range(max(hot_tokens, len(cold))):  # the hot expert's tokens interleaved with the rest
        ids += [[0]] if i < hot_tokens else []
        ids += [[cold[i]]] if i < len(cold) else []
    hot = [t for t, row in enumerate(ids) if row == [0]]
    outstanding = None if queue is None else np.full(replicas, queue)

    plan = plan_dispatch(fixed_routing(ids), 0, 1 + replicas, ReplicaTable(placement), outstanding)

    assert_plan_invariants(plan, fixed_routing(ids), 0, 1 + replicas, placement)
    shares = list(expert_shares(plan, 0).values())
    sizes = [len(s) for s in shares]
    assert sum(sizes) == hot_tokens
    assert max(sizes) - min(sizes) <= 1 if len(sizes) == replicas else max(sizes) == 1
    # contiguous: concatenated in replica order they are the hot tokens in order
    assert [t for share in shares for t in share] == hot


@pytest.mark.parametrize(
    ("outstanding", "shares"),
    [
        pytest.param(None, {0: range(0, 5), 1: range(5, 10)}, id="no-queue-halves"),
        pytest.param([3, 3], {0: range(0, 5), 1: range(5, 10)}, id="equal-queues-halves"),
        pytest.param([4, 0], {0: range(0, 3), 1: range(3, 10)}, id="shorter-queue-gets-more"),  # level 7
        pytest.param([0, 12], {0: range(0, 10)}, id="queue-above-the-level"),  # level 10 < 12
        pytest.param([1000, 0], {1: range(0, 10)}, id="busy-worker-gets-none"),
    ],
)  # fmt: skip
def test_replicated_expert_split_follows_the_queues(
    outstanding: list[int] | None, shares: dict[int, range]
) -> None:
    # expert 1 has replicas on workers 0 and 1; all 10 tokens go to it
    placement = Placement.from_mapping(0, 3, {0: [0, 1], 1: [1, 2]})
    routing = fixed_routing([[1]] * 10)
    queue = None if outstanding is None else np.array(outstanding)

    plan = plan_dispatch(routing, 0, 3, ReplicaTable(placement), outstanding=queue)

    assert_plan_invariants(plan, routing, 0, 3, placement)
    assert expert_shares(plan, 1) == {w: list(r) for w, r in shares.items()}


@pytest.mark.parametrize(
    ("outstanding", "w0_share", "level"),
    [
        pytest.param(None, [6, 7], 8, id="single-replica-tokens-only"),  # loads 6, 0
        pytest.param([0, 2], [6, 7, 8], 9, id="plus-queues"),  # loads 6, 2
    ],
)  # fmt: skip
def test_single_replica_experts_count_toward_the_water_level(
    outstanding: list[int] | None, w0_share: list[int], level: int
) -> None:
    # expert 0 lives on worker 0 alone and gets tokens 0..5; expert 1 on both gets tokens 6..15
    placement = Placement.from_mapping(0, 2, {0: [0, 1], 1: [1]})
    routing = fixed_routing([[0]] * 6 + [[1]] * 10)
    queue = None if outstanding is None else np.array(outstanding)

    plan = plan_dispatch(routing, 0, 2, ReplicaTable(placement), outstanding=queue)

    assert expert_shares(plan, 1) == {0: w0_share, 1: list(range(6 + len(w0_share), 16))}
    final = plan.worker_tokens + (0 if queue is None else queue)
    assert final.tolist() == [level, level]


def test_replicated_experts_are_split_largest_first() -> None:
    # experts 0 (3 tokens) and 1 (10 tokens) both have replicas on workers 0 and 1; worker 1 has
    # 2 tokens queued. Expert 1 goes first: level (2 + 10) / 2 = 6, shares 6 and 4, loads 6 and
    # 6; then expert 0: 2 and 1. (Expert 0 first would give 3 and 0, then 5 and 5.)
    placement = Placement.from_mapping(0, 2, {0: [0, 1], 1: [1, 0]})
    routing = fixed_routing([[0]] * 3 + [[1]] * 10)

    plan = plan_dispatch(routing, 0, 2, ReplicaTable(placement), outstanding=np.array([0, 2]))

    assert expert_shares(plan, 1) == {0: list(range(3, 9)), 1: list(range(9, 13))}
    assert expert_shares(plan, 0) == {0: [0, 1], 1: [2]}
    np.testing.assert_array_equal(plan.worker_tokens, [8, 5])


def test_a_longer_queue_never_gets_more_of_a_replicated_expert() -> None:
    # expert 1 has a replica on each of three workers
    placement = Placement.from_mapping(0, 4, {0: [0, 1], 1: [1, 2], 2: [1, 3]})
    routing = random_routing(40, 4, 2, seed=7)
    table = ReplicaTable(placement)
    shares = []
    for queued in range(0, 90, 3):
        plan = plan_dispatch(routing, 0, 4, table, outstanding=np.array([queued, 5, 0]))
        assert_plan_invariants(plan, routing, 0, 4, placement)
        shares.append(len(expert_shares(plan, 1).get(0, [])))

    assert shares[0] > 0
    assert all(a >= b for a, b in zip(shares, shares[1:])), shares
    assert shares[-1] == 0, "a long enough queue takes worker 0 out of the split"


def test_queues_do_not_move_experts_with_one_replica() -> None:
    placement = Placement.round_robin(8, 4)
    routing = random_routing(30, 8, 2, seed=5)
    table = ReplicaTable(placement)

    plain = plan_dispatch(routing, 0, 8, table)
    queued = plan_dispatch(routing, 0, 8, table, outstanding=np.array([500, 0, 0, 7]))

    np.testing.assert_array_equal(queued.worker_tokens, plain.worker_tokens)
    for a, b in zip(plain.requests, queued.requests, strict=True):
        assert a.worker == b.worker
        for field in ("expert_ids", "offsets", "token_idx", "weights"):
            np.testing.assert_array_equal(getattr(a.share, field), getattr(b.share, field), err_msg=field)


# ---------------------------------------------------------------------------------------------
# Named edge cases, each checked for invariants and against the per-token reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("placement", "routing", "moe_index", "num_experts", "outstanding"),
    [
        pytest.param(Placement.round_robin(4, 2), random_routing(1, 4, 2, seed=0), 0, 4, None,
                     id="single-token"),
        pytest.param(Placement.round_robin(3, 2), random_routing(9, 3, 3, seed=1), 0, 3, None,
                     id="top-k-equals-experts"),
        pytest.param(Placement.round_robin(4, 2), fixed_routing([[2]] * 6), 0, 4, None,
                     id="all-tokens-one-expert"),
        pytest.param(Placement.from_mapping(0, 4, {0: [0, 2], 1: [1, 2], 2: [3, 2]}),
                     fixed_routing([[2, 0]] * 8, [[0.6, 0.4]] * 8), 0, 4, None,
                     id="all-tokens-one-replicated-expert"),
        pytest.param(Placement.round_robin(8, 1), random_routing(20, 8, 2, seed=2), 0, 8, None,
                     id="one-worker"),
        pytest.param(Placement.round_robin(8, 3, slots_per_worker=5), random_routing(33, 4, 2, seed=3),
                     1, 4, None, id="second-layer-spare-slots"),
        pytest.param(Placement.round_robin(8, 8), random_routing(3, 8, 2, seed=4), 0, 8, None,
                     id="fewer-tokens-than-workers"),
        pytest.param(Placement.from_mapping(0, 4, {0: [0, 2], 1: [1, 2], 2: [3, 2]}),
                     random_routing(40, 4, 2, seed=5), 0, 4, np.array([30, 0, 3]),
                     id="replicated-expert-unequal-queues"),
        pytest.param(Placement.from_mapping(0, 8, {0: [0, 2, 4, 6, 1], 1: [1, 3, 5, 7, 4], 2: [4, 1]}),
                     random_routing(25, 4, 2, seed=6), 1, 4, np.array([1000, 0, 0]),
                     id="second-layer-busy-worker-sheds-replicated-experts"),
    ],
)  # fmt: skip
def test_dispatch_and_combine_equal_reference(
    placement: Placement, routing: Routing, moe_index: int, num_experts: int, outstanding: np.ndarray | None
) -> None:
    tokens, hidden = routing.topk_ids.shape[0], 6
    x = np.random.default_rng(tokens).standard_normal((tokens, hidden)).astype(np.float32)
    mats = expert_matrices(placement.num_logical_experts, hidden, seed=moe_index)

    plan = plan_dispatch(routing, moe_index, num_experts, ReplicaTable(placement), outstanding)
    assert_plan_invariants(plan, routing, moe_index, num_experts, placement)
    out = combine(tokens, hidden, plan, fake_workers(x, plan, mats))

    assert out.shape == (tokens, hidden) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), reference_moe(x, routing, moe_index, num_experts, mats),
                               rtol=1e-5, atol=1e-5)


def test_combine_sums_rows_of_the_same_token() -> None:
    placement = Placement.round_robin(2, 2)
    routing = fixed_routing([[0, 1], [1, 0]], [[0.5, 0.5], [0.5, 0.5]])
    plan = plan_dispatch(routing, 0, 2, ReplicaTable(placement))
    # every worker returns ones for each of its tokens: each token gets one row from each worker
    outputs = [np.ones((len(r.rows), 3), dtype=np.float32) for r in plan.requests]

    out = combine(2, 3, plan, outputs)

    torch.testing.assert_close(out, torch.full((2, 3), 2.0))
