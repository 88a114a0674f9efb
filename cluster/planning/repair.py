"""Placement repair after a worker loss: no logical expert is left without a live replica.

Pure: given the placement in service and the workers that are down, `plan_repair` adds a
replica of every expert whose replicas are all down to a live worker, in a free slot, or, when
none is free, in the slot of a replica whose expert keeps another live one. The supervisor
loads the added replicas, publishes the repaired placement, and releases the evicted ones once
no batch uses the old placement (make-before-break, as every migration).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cluster.placement import EMPTY, Placement


@dataclass(frozen=True)
class RepairPlan:
    """placement: the repaired placement (version + 1); added / evicted: `(worker, logical
    expert)` replicas to load before it is published / to release after; unplaced: experts
    still without a live replica (no live worker had room)."""

    placement: Placement
    added: tuple[tuple[int, int], ...]
    evicted: tuple[tuple[int, int], ...]
    unplaced: tuple[int, ...]


def uncovered_experts(placement: Placement, down: frozenset[int]) -> list[int]:
    """Logical experts whose every replica sits on a worker that is down."""
    return [e for e, reps in enumerate(placement.replicas) if all(w in down for w, _ in reps)]


def plan_repair(placement: Placement, down: frozenset[int], capacity: Sequence[int],
                load: np.ndarray | None = None) -> RepairPlan | None:
    """Cover the experts that lost every live replica; None when none did.

    capacity: `[W]` slots per worker; load: `[num_logical_experts]` recent load (hottest
    experts are placed first, each on the live worker with the least load).
    """
    missing = uncovered_experts(placement, down)
    if not missing:
        return None
    load = np.zeros(placement.num_logical_experts) if load is None else np.asarray(load, dtype=np.float64)
    live = [w for w in range(placement.num_workers) if w not in down]
    rows = [list(row) + [EMPTY] * max(0, capacity[w] - len(row)) for w, row in enumerate(placement.slots)]
    live_count = {e: sum(w not in down for w, _ in reps) for e, reps in enumerate(placement.replicas)}
    worker_load = placement.worker_load(load)
    added, evicted, unplaced = [], [], []
    for expert in sorted(missing, key=lambda e: -load[e]):
        spot = _free_slot(rows, live, worker_load) or _evictable_slot(rows, live, worker_load, live_count, load)
        if spot is None:
            unplaced.append(expert)
            continue
        worker, slot = spot
        if rows[worker][slot] != EMPTY:
            old = rows[worker][slot]
            evicted.append((worker, old))
            live_count[old] -= 1
            worker_load[worker] -= load[old] / max(1, placement.replica_counts[old])
        rows[worker][slot] = expert
        added.append((worker, expert))
        live_count[expert] = 1
        worker_load[worker] += load[expert]
    if not added:
        return RepairPlan(placement, (), (), tuple(unplaced))
    repaired = Placement.from_mapping(placement.version + 1, placement.num_logical_experts, rows)
    return RepairPlan(repaired, tuple(added), tuple(evicted), tuple(unplaced))


def _free_slot(rows, live, worker_load) -> tuple[int, int] | None:
    """The first empty slot of the least loaded live worker that has one."""
    for worker in sorted(live, key=lambda w: worker_load[w]):
        if EMPTY in rows[worker]:
            return worker, rows[worker].index(EMPTY)
    return None


def _evictable_slot(rows, live, worker_load, live_count, load) -> tuple[int, int] | None:
    """A slot whose replica's expert keeps another live replica: the coldest such replica,
    preferring the least loaded worker."""
    best, best_key = None, None
    for worker in live:
        for slot, expert in enumerate(rows[worker]):
            if expert != EMPTY and live_count[expert] > 1:
                key = (load[expert], worker_load[worker])
                if best_key is None or key < best_key:
                    best, best_key = (worker, slot), key
    return best
