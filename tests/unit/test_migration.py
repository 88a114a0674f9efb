"""Migration planning (pure) and the placement store's make-before-break bookkeeping."""

import asyncio

import numpy as np
import pytest

from cluster.placement import EMPTY, Placement
from cluster.planning.migration import plan_migration
from router_service.placement_store import PlacementStore


def P(version, rows, n=4):
    return Placement.from_mapping(version, n, rows)


def test_identical_placements_need_no_steps():
    old = P(3, [[0, 1], [2, 3]])
    assert plan_migration(old, P(4, [[1, 0], [3, 2]])).steps == ()


def test_golden_add_a_replica_then_move_one():
    # expert 0 gains a replica on worker 1; expert 3 moves from worker 1 to worker 0
    old = P(0, [[0, 1, EMPTY], [2, 3, EMPTY]])
    new = P(1, [[0, 1, 3], [2, 0, EMPTY]])
    plan = plan_migration(old, new, max_loads_per_step=8)
    assert len(plan.steps) == 1
    step = plan.steps[0]
    assert sorted(step.loads) == [(0, 3), (1, 0)]
    assert step.releases == ((1, 3),)
    assert step.placement.replica_set == new.replica_set
    assert step.placement.version == 1


@pytest.mark.parametrize("chunk", [1, 2, 3, 100])
@pytest.mark.parametrize("seed", range(5))
def test_invariants_over_random_moves(chunk, seed):
    rng = np.random.default_rng(seed)
    n, workers, slots = 12, 4, 5

    def random_placement(version):
        rows = [[] for _ in range(workers)]
        for e in range(n):  # one replica each, then random extra replicas on distinct workers
            rows[int(rng.integers(workers))].append(e)
        for e in rng.permutation(n)[:4]:
            free = [w for w in range(workers) if e not in rows[w] and len(rows[w]) < slots]
            if free:
                rows[free[int(rng.integers(len(free)))]].append(int(e))
        return P(version, rows, n)

    old, new = random_placement(7), random_placement(8)
    plan = plan_migration(old, new, chunk)
    have = set(old.replica_set)
    version = old.version
    for step in plan.steps:
        assert len(step.loads) <= chunk
        assert not set(step.loads) & have  # only new replicas are loaded
        have |= set(step.loads)
        assert step.placement.replica_set | set(step.releases) == have  # publish uses loaded ones only
        have -= set(step.releases)
        assert step.placement.version == version + 1  # versions go up one by one
        version += 1
        assert (step.placement.replica_counts >= 1).all()  # every expert stays served
    assert have == new.replica_set
    assert plan.loads == len(new.replica_set - old.replica_set)
    assert plan.releases == len(old.replica_set - new.replica_set)


@pytest.mark.parametrize(
    ("old", "new", "chunk", "message"),
    [
        pytest.param(P(0, [[0, 1], [2, 3]]), P(1, [[0, 1, 2, 3]]), 2, "differ in shape", id="worker-count"),
        pytest.param(P(0, [[0, 1], [2, 3]]), P(1, [[0, 1], [2, 3]]), 0, "max_loads_per_step", id="zero-chunk"),
    ],
)
def test_errors(old, new, chunk, message):
    with pytest.raises(ValueError, match=message):
        plan_migration(old, new, chunk)


def test_store_tracks_use_and_drains():
    async def scenario():
        store = PlacementStore(P(0, [[0, 1], [2, 3]]))
        with store.use() as first:
            assert first.version == 0
            store.publish(P(1, [[0, 1, 2], [2, 3]]))
            with store.use() as second:
                assert second.version == 1
                assert store.in_use_before(1) == 1
            waiter = asyncio.create_task(store.drained(1, timeout_s=5))
            await asyncio.sleep(0)
            assert not waiter.done()  # v0 still in use
        await asyncio.wait_for(waiter, 5)
        assert store.in_use_before(2) == 0

    asyncio.run(scenario())


def test_store_refuses_older_or_foreign_placements():
    store = PlacementStore(P(3, [[0, 1], [2, 3]]))
    with pytest.raises(ValueError, match="not newer"):
        store.publish(P(3, [[0, 1], [2, 3]]))
    with pytest.raises(ValueError, match="logical experts"):
        store.publish(P(4, [[0, 1], [2, 3, 4]], n=5))


def test_drain_times_out_when_a_batch_never_ends():
    async def scenario():
        store = PlacementStore(P(0, [[0, 1], [2, 3]]))
        with store.use():
            store.publish(P(1, [[0, 1], [2, 3]]))
            with pytest.raises(TimeoutError):
                await store.drained(1, timeout_s=0.05)

    asyncio.run(scenario())
