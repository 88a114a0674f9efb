"""Placement: the round-robin layout, the invariants every placement keeps (a worker holds at most
one replica of a logical expert), its own input checks, serialisation, and worker load /
balancedness with replicated experts."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest

from cluster.placement import EMPTY, ExpertShare, Placement

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def assert_placement_invariants(p: Placement) -> None:
    """What every valid placement guarantees, checked from its raw slots."""
    hosted = [(w, s, e) for w, row in enumerate(p.slots) for s, e in enumerate(row) if e != EMPTY]
    # ids in range
    for w, s, e in hosted:
        assert 0 <= e < p.num_logical_experts, (w, s, e)
    # replica_counts counts the occupied slots per expert, and sums to the occupied slot count
    expected_counts = np.zeros(p.num_logical_experts, dtype=np.int64)
    for _, _, e in hosted:
        expected_counts[e] += 1
    np.testing.assert_array_equal(p.replica_counts, expected_counts)
    assert int(p.replica_counts.sum()) == len(hosted)
    # every logical expert has a replica
    assert (p.replica_counts >= 1).all()
    # no worker holds a logical expert twice: a replica's workers are distinct
    for w, row in enumerate(p.slots):
        held = [e for e in row if e != EMPTY]
        assert len(held) == len(set(held)), (w, row)
    # replicas[e] lists exactly the (worker, slot) pairs that hold e, in slot order
    assert len(p.replicas) == p.num_logical_experts
    for e, reps in enumerate(p.replicas):
        assert list(reps) == [(w, s) for w, s, x in hosted if x == e]
    # primary is the first replica of every expert
    workers, slots = p.primary
    assert workers.shape == slots.shape == (p.num_logical_experts,)
    for e in range(p.num_logical_experts):
        assert (int(workers[e]), int(slots[e])) == p.replicas[e][0]
        assert p.slots[workers[e]][slots[e]] == e
    # experts_of agrees with the slots
    for w in range(p.num_workers):
        assert p.experts_of(w) == [(s, e) for ww, s, e in hosted if ww == w]


def random_replicated(rng: np.random.Generator, experts: int, workers: int, extra: int) -> Placement:
    """Round robin, then `extra` more slots per worker, each left EMPTY or given a replica of a
    random logical expert that worker does not hold yet (so replicas sit on distinct workers)."""
    base = Placement.round_robin(experts, workers)
    rows = []
    for row in base.slots:
        row = list(row)
        for _ in range(extra):
            free = sorted(set(range(experts)) - set(row))
            pick = int(rng.integers(-1, len(free)))  # -1: the slot stays EMPTY
            row.append(EMPTY if pick < 0 else free[pick])
        rows.append(row)
    return Placement.from_mapping(1, experts, rows)


# ---------------------------------------------------------------------------------------------
# round_robin
# ---------------------------------------------------------------------------------------------


def test_round_robin_golden_five_experts_two_workers() -> None:
    p = Placement.round_robin(5, 2)

    assert p.slots == ((0, 2, 4), (1, 3, EMPTY))
    assert p.version == 0
    assert p.num_logical_experts == 5
    assert p.num_workers == 2
    np.testing.assert_array_equal(p.replica_counts, [1, 1, 1, 1, 1])
    assert p.replicas == (((0, 0),), ((1, 0),), ((0, 1),), ((1, 1),), ((0, 2),))
    np.testing.assert_array_equal(p.primary[0], [0, 1, 0, 1, 0])
    np.testing.assert_array_equal(p.primary[1], [0, 0, 1, 1, 2])
    assert p.experts_of(1) == [(0, 1), (1, 3)]


def test_round_robin_extra_slots_stay_empty() -> None:
    p = Placement.round_robin(5, 2, slots_per_worker=4)

    assert p.slots == ((0, 2, 4, EMPTY), (1, 3, EMPTY, EMPTY))
    np.testing.assert_array_equal(p.replica_counts, [1, 1, 1, 1, 1])


def test_round_robin_more_workers_than_experts_leaves_workers_empty() -> None:
    p = Placement.round_robin(2, 3)

    assert p.slots == ((0,), (1,), (EMPTY,))
    assert p.experts_of(2) == []


def test_round_robin_too_few_slots_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"5 logical experts do not fit in 2 workers x 2 slots; "
                                         r"need at least 3 slots per worker"):
        Placement.round_robin(5, 2, slots_per_worker=2)


def test_round_robin_needs_a_worker() -> None:
    with pytest.raises(ValueError, match=r"num_workers must be >= 1, got 0"):
        Placement.round_robin(4, 0)


@pytest.mark.parametrize(
    ("experts", "workers", "slots_per_worker"),
    [
        pytest.param(1, 1, None, id="one-expert"),
        pytest.param(8, 2, None, id="even"),
        pytest.param(8, 3, None, id="uneven"),
        pytest.param(7, 7, None, id="one-per-worker"),
        pytest.param(3, 5, None, id="more-workers-than-experts"),
        pytest.param(16, 4, 6, id="spare-slots"),
        pytest.param(64, 8, None, id="mixtral-2-layers"),
    ],
)
def test_round_robin_invariants(experts: int, workers: int, slots_per_worker: int | None) -> None:
    p = Placement.round_robin(experts, workers, slots_per_worker)

    assert_placement_invariants(p)
    np.testing.assert_array_equal(p.replica_counts, np.ones(experts, dtype=np.int64))
    assert p.num_workers == workers
    needed = -(-experts // workers)
    assert {len(row) for row in p.slots} == {slots_per_worker or needed}
    # dealt in turn: worker loads under uniform load differ by at most one expert
    load = p.worker_load(np.ones(experts))
    assert load.max() - load.min() <= 1


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(("experts", "workers", "extra"), [(4, 2, 2), (8, 3, 3), (16, 4, 1)])
def test_replicated_placements_keep_invariants(seed: int, experts: int, workers: int, extra: int) -> None:
    p = random_replicated(np.random.default_rng(seed), experts, workers, extra)
    assert_placement_invariants(p)
    assert (p.replica_counts > 1).any(), "the generator should replicate some expert"
    assert p.replica_counts.max() <= workers

    load = np.random.default_rng(seed + 100).integers(0, 50, experts).astype(np.float64)
    # splitting an expert's load over its replicas conserves the total
    assert p.worker_load(load).sum() == pytest.approx(load.sum())
    assert 0.0 < p.balancedness(load) <= 1.0


# ---------------------------------------------------------------------------------------------
# Validation in __post_init__
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "num_logical_experts", "slots", "message"),
    [
        pytest.param(0, 4, ((0, 1), (2, 4)), r"worker 1 slot 1 holds logical expert 4, outside 0\.\.3",
                     id="id-too-large"),
        pytest.param(0, 4, ((0, 1, -2), (2, 3)), r"worker 0 slot 2 holds logical expert -2, outside 0\.\.3",
                     id="negative-id-that-is-not-empty"),
        pytest.param(3, 4, ((0, 1), (2, EMPTY)), r"logical experts \[3\] have no replica in placement v3",
                     id="expert-without-replica"),
        pytest.param(0, 3, ((EMPTY,), (EMPTY,)), r"logical experts \[0, 1, 2\] have no replica",
                     id="all-slots-empty"),
        pytest.param(-1, 2, ((0, 1),), r"placement version must be >= 0, got -1", id="negative-version"),
        pytest.param(0, 2, (), r"a placement needs at least one worker, got none", id="no-workers"),
        pytest.param(0, 0, ((EMPTY,),), r"num_logical_experts must be >= 1, got 0", id="no-experts"),
        pytest.param(0, 3, ((0, 1), (2, EMPTY, 2)),
                     r"worker 1 holds logical experts \[2\] more than once; a second replica on the "
                     r"same worker adds no capacity", id="same-expert-twice-on-a-worker"),
        pytest.param(0, 4, ((3, 0, 1, 0, 1), (2,)), r"worker 0 holds logical experts \[0, 1\] more than once",
                     id="several-experts-twice-on-a-worker"),
    ],
)  # fmt: skip
def test_invalid_placements_are_refused(
    version: int, num_logical_experts: int, slots: tuple, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Placement(version, num_logical_experts, slots)


def test_from_mapping_refuses_a_worker_holding_an_expert_twice() -> None:
    with pytest.raises(ValueError, match=r"worker 1 holds logical experts \[0\] more than once"):
        Placement.from_mapping(2, 3, {0: [0, 1], 1: [2, 0, EMPTY, 0]})


def test_replicas_on_distinct_workers_and_repeated_empty_slots_are_fine() -> None:
    p = Placement.from_mapping(0, 3, {0: [0, 1, EMPTY, EMPTY], 1: [2, 0, EMPTY], 2: [0, EMPTY]})

    assert p.replicas[0] == ((0, 0), (1, 1), (2, 0))
    np.testing.assert_array_equal(p.replica_counts, [3, 1, 1])


def test_many_missing_experts_are_listed_shortly() -> None:
    with pytest.raises(ValueError, match=r"logical experts \[1, 2, 3, 4, 5, 6, 7, 8, 9, 10\]\.\.\. "
                                         r"have no replica"):
        Placement(0, 20, ((0,),))


def test_placement_is_frozen() -> None:
    p = Placement.round_robin(4, 2)

    with pytest.raises(dataclasses.FrozenInstanceError):
        p.version = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        p.slots[0][0] = 3  # type: ignore[index]
    assert p == Placement.round_robin(4, 2)
    assert hash(p) == hash(Placement.round_robin(4, 2))
    assert p.replica_counts is p.replica_counts  # derived views are computed once


# ---------------------------------------------------------------------------------------------
# Named constructors and serialisation
# ---------------------------------------------------------------------------------------------


def test_from_mapping_dict_orders_workers_and_converts_ids() -> None:
    p = Placement.from_mapping(2, 4, {1: [3, np.int64(2)], 0: [0, 1, 2]})

    assert p.slots == ((0, 1, 2), (3, 2))
    assert all(type(e) is int for row in p.slots for e in row)
    assert p.version == 2
    np.testing.assert_array_equal(p.replica_counts, [1, 1, 2, 1])
    assert p.replicas[2] == ((0, 2), (1, 1))


def test_from_mapping_list_keeps_row_order() -> None:
    p = Placement.from_mapping(0, 3, [[2, EMPTY], [0, 1]])

    assert p.slots == ((2, EMPTY), (0, 1))
    assert p.experts_of(0) == [(0, 2)]


def test_from_mapping_validates() -> None:
    with pytest.raises(ValueError, match=r"logical experts \[2\] have no replica"):
        Placement.from_mapping(0, 3, {0: [0], 1: [1]})


def test_to_dict_from_dict_roundtrip_through_json() -> None:
    p = Placement.from_mapping(5, 4, {0: [0, 1, 2], 1: [3, 2, EMPTY]})

    data = p.to_dict()
    assert data == {"version": 5, "num_logical_experts": 4, "slots": [[0, 1, 2], [3, 2, -1]]}
    assert Placement.from_dict(json.loads(json.dumps(data))) == p


def test_from_dict_missing_key_names_it() -> None:
    with pytest.raises(ValueError, match=r"placement is missing key 'slots'; "
                                         r"it has \['num_logical_experts', 'version'\]"):
        Placement.from_dict({"version": 0, "num_logical_experts": 2})


# ---------------------------------------------------------------------------------------------
# Worker load and balancedness
# ---------------------------------------------------------------------------------------------


def test_worker_load_splits_a_replicated_expert_evenly() -> None:
    # expert 1 has replicas on workers 0 and 1
    p = Placement.from_mapping(1, 4, {0: [0, 1], 1: [2, 1], 2: [3, EMPTY]})
    load = np.array([10, 6, 4, 2])

    # per replica: e0 10, e1 6/2 = 3, e2 4, e3 2
    # worker 0: 10 + 3 = 13; worker 1: 4 + 3 = 7; worker 2: 2
    np.testing.assert_allclose(p.worker_load(load), [13.0, 7.0, 2.0])
    # mean (13 + 7 + 2) / 3 = 22/3, max 13 -> 22/39
    assert p.balancedness(load) == pytest.approx(22 / 39)


def test_balancedness_perfect_and_idle() -> None:
    p = Placement.round_robin(4, 2)

    # workers get 1 + 1 = 2 each
    assert p.balancedness(np.ones(4)) == 1.0
    # nothing loaded counts as balanced
    assert p.balancedness(np.zeros(4)) == 1.0
    # all load on expert 0 (worker 0): loads [8, 0], mean 4, max 8 -> 0.5
    assert p.balancedness(np.array([8, 0, 0, 0])) == 0.5


def test_replicating_the_hot_expert_improves_balancedness() -> None:
    hot = np.array([12, 2, 2, 2])
    naive = Placement.round_robin(4, 2, slots_per_worker=3)
    # naive loads: worker 0 = 12 + 2 = 14, worker 1 = 2 + 2 = 4; mean 9 / max 14
    assert naive.balancedness(hot) == pytest.approx(9 / 14)

    replicated = Placement.from_mapping(1, 4, {0: [0, 2, 1], 1: [1, 3, 0]})
    # expert 0 split 6 + 6, expert 1 split 1 + 1: worker 0 = 6 + 2 + 1 = 9, worker 1 = 1 + 2 + 6 = 9
    np.testing.assert_allclose(replicated.worker_load(hot), [9.0, 9.0])
    assert replicated.balancedness(hot) == 1.0


def test_resized_adds_empty_workers_and_drops_empty_ones():
    base = Placement.from_mapping(4, 4, [[0, 1], [2, 3], [EMPTY, EMPTY]])
    grown = base.resized(5, new_slots=3, version=5)
    assert grown.version == 5 and grown.num_workers == 5
    assert grown.slots[3:] == ((EMPTY,) * 3, (EMPTY,) * 3)
    assert grown.replica_set == base.replica_set
    shrunk = grown.resized(2, new_slots=3, version=6)
    assert shrunk.slots == base.slots[:2] and shrunk.version == 6


def test_resized_refuses_to_drop_a_worker_that_holds_replicas():
    base = Placement.from_mapping(0, 4, [[0, 1], [2, 3], [1, EMPTY]])
    with pytest.raises(ValueError, match=r"workers \[2\] still hold replicas in placement v0"):
        base.resized(2, new_slots=2, version=1)


@pytest.mark.parametrize(("experts", "workers", "copies"), [
    pytest.param(8, 3, 2, id="two-copies"), pytest.param(5, 5, 5, id="everywhere"), pytest.param(7, 2, 1, id="one-copy"),
])
def test_replicated_puts_every_expert_on_distinct_workers(experts, workers, copies):
    p = Placement.replicated(experts, workers, copies, version=4)

    assert p.version == 4 and p.num_workers == workers
    assert (p.replica_counts == copies).all()
    assert all(len({w for w, _ in reps}) == copies for reps in p.replicas)


def test_replicated_refuses_more_copies_than_workers():
    with pytest.raises(ValueError, match="copies must be 1..num_workers"):
        Placement.replicated(4, 2, copies=3)


# ---- ExpertShare: the one checked value a router sends a worker -----------------------------


def _share(**changes):
    fields = {"expert_ids": np.array([3, 7]), "offsets": np.array([0, 2, 3]), "token_idx": np.array([0, 4, 4]),
              "weights": np.array([0.5, 0.25, 1.0], dtype=np.float32)}
    return ExpertShare(**{**fields, **changes})


def test_expert_share_counts_its_assignments():
    assert _share().num_tokens == 3


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        pytest.param({"offsets": np.array([0, 3])}, "offsets has 2 entries for 2 experts; needs 3", id="offsets-short"),
        pytest.param({"weights": np.ones(2, dtype=np.float32)}, "weights has 2 entries for 3 token rows",
                     id="weights-short"),
        pytest.param({"offsets": np.array([0, 2, 4])}, "offsets must rise from 0 to the 3 token rows", id="past-the-end"),
        pytest.param({"offsets": np.array([1, 2, 3])}, "offsets must rise from 0", id="not-from-zero"),
        pytest.param({"offsets": np.array([0, 3, 3]), "token_idx": np.array([0, 4, 4])}, None, id="empty-segment-ok"),
        pytest.param({"offsets": np.array([0, 3, 2, 3]), "expert_ids": np.array([1, 2, 3])}, "must rise",
                     id="goes-back"),
        pytest.param({"token_idx": np.array([[0, 4, 4]])}, "token_idx must be a 1-d numpy array", id="2-d"),
        pytest.param({"expert_ids": [3, 7]}, "expert_ids must be a 1-d numpy array, got list", id="a-list"),
        pytest.param({"token_idx": np.array([0.0, 4.0, 4.0])}, "token_idx must be integer, got float64",
                     id="float-rows"),
        pytest.param({"weights": np.array([1, 1, 1])}, "weights must be float, got int64", id="int-weights"),
    ],
)
def test_expert_share_refuses_parts_that_disagree(changes, message):
    if message is None:
        _share(**changes)
        return
    with pytest.raises(ValueError, match=re.escape(message)):
        _share(**changes)


def test_round_robin_with_replicas_puts_each_experts_copies_on_distinct_workers() -> None:
    p = Placement.round_robin(5, 3, slots_per_worker=4, replicas=2)

    assert_placement_invariants(p)
    assert all(len(reps) == 2 and len({w for w, _ in reps}) == 2 for reps in p.replicas)
    assert [sum(e != EMPTY for e in row) for row in p.slots] == [3, 4, 3]  # copy 1 of e starts at worker e + 1
    with pytest.raises(ValueError, match=r"5 logical experts x 3 replicas do not fit in 3 workers x 4 slots"):
        Placement.round_robin(5, 3, slots_per_worker=4, replicas=3)
    with pytest.raises(ValueError, match=r"replicas must be 1..num_workers \(3\), got 4"):
        Placement.round_robin(5, 3, replicas=4)
