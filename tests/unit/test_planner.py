"""The placement planner: golden layouts worked out by hand, invariants over random loads,
stickiness, named edge cases, and the errors a caller can act on."""

from __future__ import annotations

import numpy as np
import pytest

from cluster.placement import EMPTY, Placement
from cluster.planning.planner import count_moves, layer_balancedness, plan_placement, split_capacity

# ---------------------------------------------------------------------------------------------
# Helpers: computed from raw slots, independently of the planner
# ---------------------------------------------------------------------------------------------


def layer_loads(p: Placement, load: np.ndarray) -> np.ndarray:
    """`[L, W]` load per layer and worker, each expert's load split evenly over its replicas."""
    num_layers, num_experts = load.shape
    counts = np.zeros(num_layers * num_experts)
    for row in p.slots:
        for e in row:
            if e != EMPTY:
                counts[e] += 1
    out = np.zeros((num_layers, p.num_workers))
    for w, row in enumerate(p.slots):
        for e in row:
            if e != EMPTY:
                out[e // num_experts, w] += load.reshape(-1)[e] / counts[e]
    return out


def layer_peaks(p: Placement, load: np.ndarray) -> np.ndarray:
    """`[L]` most loaded worker per layer: the planner's objective."""
    return layer_loads(p, load).max(axis=1)


def rows_as_sets(p: Placement) -> list[set[int]]:
    return [{e for e in row if e != EMPTY} for row in p.slots]


def assert_plan_invariants(p: Placement, load: np.ndarray, capacity: list[int], min_replicas: int) -> None:
    num_layers, num_experts = load.shape
    assert p.num_logical_experts == num_layers * num_experts
    assert p.num_workers == len(capacity)
    for w, row in enumerate(p.slots):
        assert len(row) == capacity[w], f"worker {w} row length {len(row)} != capacity {capacity[w]}"
        held = [e for e in row if e != EMPTY]
        assert all(0 <= e < p.num_logical_experts for e in held)  # ids in range
        assert len(held) == len(set(held)), f"worker {w} holds an expert twice"
    for e, reps in enumerate(p.replicas):
        workers = [w for w, _ in reps]
        assert len(workers) >= min_replicas, f"expert {e} has {len(workers)} replicas"
        assert len(set(workers)) == len(workers), f"expert {e} twice on one worker"
    assert int(p.replica_counts.sum()) <= sum(capacity)


def zipf_load(rng: np.random.Generator, num_layers: int, num_experts: int, s: float = 1.0) -> np.ndarray:
    """`[L, E]` Zipf popularity over shuffled experts, times a token count, per layer."""
    base = 1.0 / np.arange(1, num_experts + 1) ** s
    return np.stack([rng.permutation(base) for _ in range(num_layers)]) * float(rng.integers(100, 10_000))


# ---------------------------------------------------------------------------------------------
# Golden cases (worked out by hand)
# ---------------------------------------------------------------------------------------------


def test_golden_no_spare_slots_pairs_heavy_with_light() -> None:
    # 4 experts, 2 workers x 2 slots: one replica each. Total 10; the best split is
    # {4, 1} | {3, 2} = 5 | 5 (any other pairing gives 7 | 3 or 6 | 4).
    load = np.array([[4.0, 3.0, 2.0, 1.0]])
    p = plan_placement(load, [2, 2])

    assert sorted(map(sorted, rows_as_sets(p))) == [[0, 3], [1, 2]]
    np.testing.assert_allclose(layer_peaks(p, load), [5.0])
    np.testing.assert_allclose(layer_balancedness(p, load), [1.0])
    assert p.version == 0


def test_golden_spare_slot_replicates_the_hot_expert() -> None:
    # 3 experts, 2 workers x 2 slots: 1 spare slot, which goes to expert 0 (6 per replica beats
    # 1). Expert 0 then weighs 3 per replica and sits on both workers: 3 + 1 | 3 + 1 = 4 | 4.
    load = np.array([[6.0, 1.0, 1.0]])
    p = plan_placement(load, [2, 2])

    np.testing.assert_array_equal(p.replica_counts, [2, 1, 1])
    assert all(0 in row for row in rows_as_sets(p))
    np.testing.assert_allclose(layer_peaks(p, load), [4.0])


def test_golden_two_spare_slots_go_to_the_two_heaviest() -> None:
    # [8, 4, 2, 2] on 2 workers x 3 slots: first spare to expert 0 (8 -> 4 + 4); the second
    # to expert 1 (4 -> 2 + 2; expert 0 cannot take a third, there are only 2 workers).
    # Each worker: 4 + 2 + 2 = 8, half of the 16 tokens.
    load = np.array([[8.0, 4.0, 2.0, 2.0]])
    p = plan_placement(load, [3, 3])

    np.testing.assert_array_equal(p.replica_counts, [2, 2, 1, 1])
    np.testing.assert_allclose(layer_loads(p, load), [[8.0, 8.0]])


def test_golden_local_search_beats_greedy_packing() -> None:
    # [3, 3, 2, 2, 2] on workers of 3 and 2 slots. Heaviest first on the least loaded worker:
    # 3 -> w0, 3 -> w1, 2 -> w0 (tie), 2 -> w1 (w1 now full), 2 -> w0: 7 | 5. Exchanging a 3
    # on w0 for a 2 on w1 gives the optimum {2, 2, 2} | {3, 3} = 6 | 6.
    load = np.array([[3.0, 3.0, 2.0, 2.0, 2.0]])
    p = plan_placement(load, [3, 2])

    assert rows_as_sets(p) == [{2, 3, 4}, {0, 1}]
    np.testing.assert_allclose(layer_loads(p, load), [[6.0, 6.0]])


def test_golden_layout_in_service_wins_when_it_is_better() -> None:
    # Greedy counts give both spare slots to expert 0 (9 -> 4.5 -> 3), so every worker holds
    # 3 plus one of 2, 3, 0: peak 6. The layout in service splits expert 0 in two (4.5) and
    # expert 1 in two (1): 0 + 4.5 | 1 + 3 | 4.5 + 1 = peak 5.5, so it stays.
    current = Placement.from_mapping(7, 4, [[3, 0], [1, 2], [0, 1]])
    load = np.array([[9.0, 2.0, 3.0, 0.0]])
    p = plan_placement(load, [2, 2, 2], current)

    np.testing.assert_allclose(layer_peaks(plan_placement(load, [2, 2, 2]), load), [6.0])
    assert p.slots == current.slots
    np.testing.assert_allclose(layer_peaks(p, load), [5.5])


def test_golden_two_layers_each_balanced_in_its_share_of_slots() -> None:
    # 2 layers x 2 experts on 2 workers x 3 slots. split_capacity: worker 0 gives layers
    # (2, 1), worker 1 gives (1, 2). Layer 0 [6, 2]: 3 slots, spare to expert 0 (3 + 3);
    # worker 0 holds 0 and 1 (3 + 2 = 5), worker 1 holds 0 (3): peak 5, balancedness 4 / 5.
    # Layer 1 [2, 6] mirrors it on worker 1.
    load = np.array([[6.0, 2.0], [2.0, 6.0]])
    p = plan_placement(load, [3, 3])

    np.testing.assert_array_equal(split_capacity(np.array([3, 3]), 2), [[2, 1], [1, 2]])
    assert rows_as_sets(p) == [{0, 1, 3}, {0, 2, 3}]
    np.testing.assert_allclose(layer_peaks(p, load), [5.0, 5.0])
    np.testing.assert_allclose(layer_balancedness(p, load), [0.8, 0.8])


def test_golden_sticky_replan_after_the_hot_set_flips() -> None:
    # Planned for [8, 4, 2, 2]: workers {0, 1, 2} | {0, 1, 3}. The load flips to [2, 2, 8, 4]:
    # experts 2 and 3 now need a replica on each worker, experts 0 and 1 one each. Keeping
    # 2 on worker 0, 3 on worker 1 and one of 0 / 1 on each needs just 2 loads; each worker
    # then carries 4 + 2 + 2 = 8.
    first = plan_placement(np.array([[8.0, 4.0, 2.0, 2.0]]), [3, 3])
    load = np.array([[2.0, 2.0, 8.0, 4.0]])
    second = plan_placement(load, [3, 3], first)

    assert count_moves(first, second) == 2
    np.testing.assert_array_equal(second.replica_counts, [1, 1, 2, 2])
    np.testing.assert_allclose(layer_loads(second, load), [[8.0, 8.0]])
    assert second.version == first.version + 1


def test_golden_sticky_keeps_an_optimal_layout_that_fresh_would_relabel() -> None:
    # Under [2, 2, 8, 4] the layout {1, 2, 3} | {0, 2, 3} is optimal (2 + 4 + 2 = 8 each). A
    # fresh plan finds {0, 2, 3} | {1, 2, 3}, as good but 2 loads away; the planner keeps it.
    current = Placement.from_mapping(3, 4, [[1, 2, 3], [0, 2, 3]])
    load = np.array([[2.0, 2.0, 8.0, 4.0]])
    fresh = plan_placement(load, [3, 3])
    p = plan_placement(load, [3, 3], current)

    assert count_moves(current, fresh) == 2  # what the test guards against
    assert p.slots == current.slots
    assert p.version == 4


def test_golden_round_robin_start_is_rebalanced() -> None:
    # Round robin puts experts 0, 2 on worker 0 (9 + 1 = 10) and 1, 3 on worker 1 (0 + 0).
    # The best pairs expert 0 with a zero-load expert: 9 | 1.
    current = Placement.round_robin(4, 2)
    load = np.array([[9.0, 0.0, 1.0, 0.0]])
    p = plan_placement(load, [2, 2], current)

    np.testing.assert_allclose(layer_peaks(p, load), [9.0])
    assert layer_peaks(p, load)[0] < layer_peaks(current, load)[0]


# ---------------------------------------------------------------------------------------------
# Invariants over random loads
# ---------------------------------------------------------------------------------------------

CONFIGS = [
    pytest.param(1, 16, [5, 5, 5, 5], 1, None, id="1x16-on-4"),
    pytest.param(2, 8, [7, 6, 5], 1, None, id="2x8-uneven"),
    pytest.param(3, 8, [14, 14, 14, 14], 2, None, id="3x8-min2"),
    pytest.param(1, 64, [10] * 8, 1, None, id="1x64-on-8"),
    pytest.param(2, 16, [7] * 6, 1, ["a", "a", "b", "b", "c", "c"], id="2x16-node-aware"),
]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("layers", "experts", "capacity", "min_replicas", "nodes"), CONFIGS)
def test_invariants_over_random_loads(seed, layers, experts, capacity, min_replicas, nodes) -> None:
    rng = np.random.default_rng(seed)
    load = zipf_load(rng, layers, experts, s=float(rng.uniform(0.3, 1.5)))
    kw = dict(min_replicas=min_replicas, policy="node_aware" if nodes else "global", worker_nodes=nodes)
    p = plan_placement(load, capacity, **kw)

    assert_plan_invariants(p, load, capacity, min_replicas)
    # never worse than the placement in service, here a plan for an unrelated load
    current = plan_placement(zipf_load(rng, layers, experts), capacity, **kw)
    replanned = plan_placement(load, capacity, current, **kw)
    assert_plan_invariants(replanned, load, capacity, min_replicas)
    assert (layer_peaks(replanned, load) <= layer_peaks(current, load) * (1 + 1e-12)).all()
    assert replanned.version == current.version + 1
    # sticky: the same load again moves nothing
    assert count_moves(p, plan_placement(load, capacity, p, **kw)) == 0
    # deterministic
    assert plan_placement(load, capacity, **kw).slots == p.slots


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("layers", "experts", "workers", "slots"), [(1, 16, 4, 4), (2, 16, 4, 10), (1, 64, 8, 10)])
def test_never_worse_than_round_robin(seed: int, layers: int, experts: int, workers: int, slots: int) -> None:
    load = zipf_load(np.random.default_rng(seed), layers, experts)
    naive = Placement.round_robin(layers * experts, workers, slots)
    p = plan_placement(load, [slots] * workers)

    assert (layer_peaks(p, load) <= layer_peaks(naive, load) * (1 + 1e-12)).all()
    # and from round robin as the placement in service
    assert (layer_peaks(plan_placement(load, [slots] * workers, naive), load)
            <= layer_peaks(naive, load) * (1 + 1e-12)).all()


@pytest.mark.parametrize("seed", range(8))
def test_split_capacity_is_even_from_nothing(seed: int) -> None:
    rng = np.random.default_rng(seed)
    caps = rng.integers(0, 20, size=int(rng.integers(1, 9)))
    layers = int(rng.integers(1, 6))
    split = split_capacity(caps, layers)

    np.testing.assert_array_equal(split.sum(axis=1), caps)
    assert split.sum(axis=0).max() - split.sum(axis=0).min() <= 1
    np.testing.assert_array_less(split - caps[:, None] // layers, 2)
    assert (split >= caps[:, None] // layers).all()
    assert (split <= -(-caps[:, None] // layers)).all()


def test_fallback_deal_fills_any_spreadable_counts() -> None:
    # the packer's last resort when a sticky start leaves no slot for an expert
    from cluster.planning.planner import _deal, _spreadable

    rng = np.random.default_rng(0)
    tried = 0
    for _ in range(3000):
        caps = rng.integers(0, 8, size=int(rng.integers(1, 6)))
        counts = rng.integers(1, len(caps) + 1, size=int(rng.integers(1, 9)))
        if not _spreadable(counts, caps):
            continue
        tried += 1
        hold = _deal(rng.random(len(counts)), counts, caps)
        np.testing.assert_array_equal(hold.sum(axis=0), counts)
        assert (hold.sum(axis=1) <= caps).all()
    assert tried > 300


def test_split_capacity_keeps_the_layout_in_service() -> None:
    # worker 0 holds 3 replicas of layer 0 and 1 of layer 1, and gets one more slot
    held = np.array([[3, 1], [1, 2]])
    split = split_capacity(np.array([5, 3]), 2, held)

    np.testing.assert_array_equal(split, [[3, 2], [1, 2]])


# ---------------------------------------------------------------------------------------------
# Named edge cases
# ---------------------------------------------------------------------------------------------


def _hot_expert_load() -> np.ndarray:
    load = np.zeros((1, 8))
    load[0, 5] = 100.0
    return load


@pytest.mark.parametrize(
    ("load", "capacity", "min_replicas", "check"),
    [
        pytest.param(np.arange(1.0, 9.0)[None], [8], 1,
                     lambda p, load: rows_as_sets(p) == [set(range(8))], id="one-worker"),
        pytest.param(np.arange(1.0, 9.0)[None], [10], 1,
                     lambda p, load: p.slots[0][8:] == (EMPTY, EMPTY), id="one-worker-spare-slots-stay-empty"),
        pytest.param(np.arange(1.0, 9.0)[None], [2, 2, 2, 2], 1,
                     lambda p, load: (p.replica_counts == 1).all()
                     and np.isclose(layer_peaks(p, load)[0], 9.0), id="capacity-exactly-E"),
        pytest.param(np.ones((1, 8)), [6, 2, 2, 2], 1,
                     lambda p, load: [len([e for e in r if e != EMPTY]) for r in p.slots] == [6, 2, 2, 2],
                     id="uneven-capacities"),
        pytest.param(np.zeros((2, 8)), [5, 5, 5, 5], 1,
                     lambda p, load: (layer_balancedness(p, load) == 1.0).all(), id="zero-load"),
        pytest.param(_hot_expert_load(), [3, 3, 3, 3], 1,
                     lambda p, load: p.replica_counts[5] == 4
                     and np.allclose(layer_loads(p, load), 25.0), id="one-expert-takes-all-load"),
        pytest.param(np.arange(1.0, 9.0)[None], [5, 5, 5, 5], 2,
                     lambda p, load: (p.replica_counts >= 2).all(), id="min-replicas-2"),
        pytest.param(np.array([[5.0, 1.0, 1.0], [1.0, 1.0, 5.0]]), [4, 4], 1,
                     lambda p, load: p.replica_counts[0] == 2 and p.replica_counts[5] == 2
                     and np.allclose(layer_loads(p, load), 3.5), id="two-layers"),
    ],
)
def test_edge_cases(load: np.ndarray, capacity: list[int], min_replicas: int, check) -> None:
    p = plan_placement(load, capacity, min_replicas=min_replicas)

    assert_plan_invariants(p, load, capacity, min_replicas)
    assert check(p, load), p.slots
    assert count_moves(p, plan_placement(load, capacity, p, min_replicas=min_replicas)) == 0


@pytest.mark.parametrize(
    ("load", "replicated"),
    [
        # expert 0 is hot and gets 2 replicas. Packed heaviest first on the least loaded
        # worker, both would land on workers 0 and 1 (node "a") as `global` does.
        pytest.param([40.0, 5.0, 4.0, 3.0, 2.0, 1.0, 1.0], [0], id="packing-prefers-a-new-node"),
        # experts 0 and 2 get 2 replicas each; without its node check the local search ends
        # as good, with 2 on node "a" only and 0 on node "b" only.
        pytest.param([19.0, 10.0, 12.0, 10.0, 9.0, 4.0], [0, 2], id="search-keeps-the-spread"),
    ],
)
def test_node_aware_spreads_hot_experts_over_nodes(load: list[float], replicated: list[int]) -> None:
    nodes = ["a", "a", "b", "b"]
    p = plan_placement(np.array([load]), [2, 2, 2, 2], policy="node_aware", worker_nodes=nodes)

    for e in replicated:
        assert p.replica_counts[e] == 2
        assert {nodes[w] for w, _ in p.replicas[e]} == {"a", "b"}, p.slots


def test_node_aware_replan_keeps_the_spread() -> None:
    rng = np.random.default_rng(3)
    nodes = ["a", "a", "b", "b", "c", "c"]
    kw = dict(policy="node_aware", worker_nodes=nodes)
    first = plan_placement(zipf_load(rng, 1, 24, 1.4), [6] * 6, **kw)
    load = zipf_load(rng, 1, 24, 1.4)
    second = plan_placement(load, [6] * 6, first, **kw)

    for e, reps in enumerate(second.replicas):
        spread = len({nodes[w] for w, _ in reps})
        assert spread == min(len(reps), 3), (e, reps)


@pytest.mark.parametrize(("before", "after"), [pytest.param(5, 7, id="capacity-grows"),
                                               pytest.param(7, 5, id="capacity-shrinks")])
def test_replan_when_worker_capacity_changes(before: int, after: int) -> None:
    load = zipf_load(np.random.default_rng(11), 2, 8)
    current = plan_placement(load, [before] * 4)
    p = plan_placement(load, [after] * 4, current)

    assert_plan_invariants(p, load, [after] * 4, 1)
    if after > before:  # the layout in service still fits, so it bounds the peak
        assert (layer_peaks(p, load) <= layer_peaks(current, load) * (1 + 1e-12)).all()


def test_current_rows_come_back_when_nothing_helps() -> None:
    # the load in service is already perfectly balanced: same rows, next version
    current = Placement.from_mapping(4, 4, [[0, 3], [1, 2]])
    p = plan_placement(np.array([[4.0, 3.0, 2.0, 1.0]]), [2, 2], current)

    assert p.slots == current.slots
    assert p.version == 5


# ---------------------------------------------------------------------------------------------
# Helpers exported beside the planner
# ---------------------------------------------------------------------------------------------


def test_layer_balancedness_golden() -> None:
    # layer 0: worker loads 3 | 1 -> mean 2 / max 3; layer 1: expert 2 on both workers,
    # 2 | 2 -> 1.0
    p = Placement.from_mapping(0, 4, [[0, 2], [1, 2, 3]])
    load = np.array([[3.0, 1.0], [4.0, 0.0]])

    np.testing.assert_allclose(layer_balancedness(p, load), [2 / 3, 1.0])


def test_count_moves_counts_new_worker_expert_pairs() -> None:
    old = Placement.from_mapping(0, 4, [[0, 1, EMPTY], [2, 3, EMPTY]])
    new = Placement.from_mapping(1, 4, [[1, 0, 3], [2, EMPTY, 0]])  # slot order does not matter

    assert count_moves(old, new) == 2
    assert count_moves(old, old) == 0


# ---------------------------------------------------------------------------------------------
# Errors a caller can act on
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param(dict(load=np.ones((1, 6)), capacity=[4, 4], current=Placement.round_robin(8, 2)),
                     r"current placement has 8 logical experts on 2 workers, but load \(1, 6\)",
                     id="load-shape-vs-current"),
        pytest.param(dict(load=np.ones((1, 8)), capacity=[4, 4], current=Placement.round_robin(8, 4)),
                     r"on 4 workers, but .* give 8 on 2", id="workers-vs-current"),
        pytest.param(dict(load=np.array([[1.0, -1.0]]), capacity=[2]), r"finite and >= 0", id="negative-load"),
        pytest.param(dict(load=np.array([[1.0, np.nan]]), capacity=[2]), r"finite and >= 0", id="nan-load"),
        pytest.param(dict(load=np.ones(4), capacity=[4]), r"\[layers, experts\]", id="1d-load"),
        pytest.param(dict(load=np.ones((2, 8)), capacity=[3, 3, 3, 3, 3]),
                     r"capacity too small: 15 slots in all, but 2 layers x 8 experts x min_replicas=1 need 16",
                     id="capacity-too-small"),
        pytest.param(dict(load=np.ones((1, 2)), capacity=[3, 1], min_replicas=2),
                     r"MoE layer 0 gets 4 slots on 2 workers .* cannot sit on distinct workers",
                     id="cannot-spread"),
        pytest.param(dict(load=np.ones((1, 4)), capacity=[4, 4], min_replicas=3),
                     r"min_replicas=3 exceeds the 2 workers", id="min-replicas-over-workers"),
        pytest.param(dict(load=np.ones((1, 4)), capacity=[4], min_replicas=0),
                     r"min_replicas must be an integer >= 1", id="min-replicas-zero"),
        pytest.param(dict(load=np.ones((1, 4)), capacity=[2, 2], policy="node_aware"),
                     r"node_aware' needs worker_nodes", id="node-aware-without-nodes"),
        pytest.param(dict(load=np.ones((1, 4)), capacity=[2, 2], policy="node_aware", worker_nodes=["a"]),
                     r"one node per worker \(2\), got 1", id="node-aware-short-nodes"),
        pytest.param(dict(load=np.ones((1, 4)), capacity=[2, 2], policy="random"),
                     r"policy must be one of", id="unknown-policy"),
        pytest.param(dict(load=np.ones((1, 4)), capacity=[2, -1]), r"slot count >= 0", id="negative-capacity"),
    ],
)
def test_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan_placement(**kwargs)


def test_helpers_reject_mismatched_placements() -> None:
    with pytest.raises(ValueError, match=r"different logical experts: 4 vs 8"):
        count_moves(Placement.round_robin(4, 2), Placement.round_robin(8, 2))
    with pytest.raises(ValueError, match=r"does not cover the placement's 4 logical experts"):
        layer_balancedness(Placement.round_robin(4, 2), np.ones((1, 3)))
