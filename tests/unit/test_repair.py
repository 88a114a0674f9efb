"""Placement repair after worker loss: every logical expert keeps a live replica where room
allows, make-before-break (what is added is new, what is evicted had a spare live replica)."""

from __future__ import annotations

import numpy as np
import pytest

from cluster.placement import EMPTY, Placement
from cluster.planning.repair import plan_repair, uncovered_experts

X = EMPTY


def _placement(rows, experts: int | None = None, version: int = 3) -> Placement:
    flat = [e for r in rows for e in r if e != X]
    return Placement.from_mapping(version, experts or max(flat) + 1, rows)


def _live_counts(p: Placement, down: frozenset[int]) -> np.ndarray:
    counts = np.zeros(p.num_logical_experts, dtype=int)
    for w, e in p.replica_set:
        if w not in down:
            counts[e] += 1
    return counts


def test_nothing_to_repair_when_every_expert_keeps_a_live_replica():
    p = _placement([[0, 1], [1, 0], [2, 3], [3, 2]])
    assert uncovered_experts(p, frozenset({0})) == []
    assert plan_repair(p, frozenset({0}), [2, 2, 2, 2]) is None


def test_lost_experts_go_to_free_slots_least_loaded_worker_first():
    p = _placement([[0, 1, X], [2, 3, X], [4, 5, X]])
    load = np.array([3, 1, 50, 50, 5, 5], dtype=float)
    plan = plan_repair(p, frozenset({0}), [3, 3, 3], load)

    assert uncovered_experts(p, frozenset({0})) == [0, 1]
    # the hotter lost expert goes to the least loaded worker (2: load 10); its one free slot
    # taken, the other goes to worker 1
    assert plan.added == ((2, 0), (1, 1))
    assert plan.evicted == () and plan.unplaced == ()
    assert plan.placement.version == p.version + 1
    assert (_live_counts(plan.placement, frozenset({0})) >= 1).all()


def test_without_free_slots_a_spare_replica_of_the_coldest_expert_is_evicted():
    p = _placement([[0, 1], [2, 3], [3, 2]])
    load = np.array([9, 9, 5, 1], dtype=float)
    plan = plan_repair(p, frozenset({0}), [2, 2, 2], load)

    assert sorted(e for _, e in plan.added) == [0, 1]
    assert sorted(e for _, e in plan.evicted) == [2, 3]  # each kept one live replica
    live = _live_counts(plan.placement, frozenset({0}))
    assert (live >= 1).all(), live


def test_experts_with_no_room_anywhere_are_reported_unplaced():
    p = _placement([[0, 1], [2, 3]])
    plan = plan_repair(p, frozenset({0}), [2, 2])

    assert plan.added == ()
    assert sorted(plan.unplaced) == [0, 1]
    assert plan.placement is p


@pytest.mark.parametrize("down", [pytest.param(frozenset({1}), id="one-down"),
                                  pytest.param(frozenset({0, 2}), id="two-down")])
def test_repair_invariants_on_a_random_placement(down):
    rng = np.random.default_rng(7)
    experts, workers, slots = 12, 4, 6  # 3 free slots per worker: room for two workers' experts
    p = Placement.round_robin(experts, workers, slots)
    load = rng.random(experts)
    plan = plan_repair(p, down, [slots] * workers, load)

    assert plan is not None and plan.unplaced == ()
    new = plan.placement
    assert all(len(row) <= slots for row in new.slots)
    assert (_live_counts(new, down) >= 1).all()
    assert set(plan.added) == new.replica_set - p.replica_set
    assert set(plan.evicted) == p.replica_set - new.replica_set
    assert all(w not in down for w, _ in plan.added)
    for w in down:  # the down workers' rows are untouched: they get them back when reloaded
        assert new.slots[w] == p.slots[w]
