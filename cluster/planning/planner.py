"""Placement planner: replica counts and worker slots from recent load per logical expert.

A pure function over arrays: no Ray, no gRPC, no clock, no random numbers. Each MoE layer is
balanced on its own, as DeepSeek's EPLB and vLLM do: a batch visits the layers one after
another and waits at each for its most loaded worker (the layer's *peak*).

For each layer:
1. **Slots**: `split_capacity` gives the layer a share of each worker's slots.
2. **Replica counts**: every logical expert starts at `min_replicas`; each further slot goes to
   the expert with the highest load per replica, while the counts can still be spread over
   distinct workers (a worker never holds two replicas of one expert).
3. **Packing**: replicas heaviest first, each on the least loaded worker with a free slot
   (`node_aware`: on a node that lacks the expert, where one has room). The *fresh* candidate
   packs from empty; the *sticky* one first keeps the replicas of `current` that the new
   counts and slots allow ("replicas that can stay where they are, stay").
4. **Local search** (`local_search.improve`): a replica on the peak worker trades places with a lighter replica or an
   empty slot elsewhere, only when both workers end below the peak. The sticky candidate
   prefers exchanges that load the fewest replicas, and stops paying loads once its peak is
   within `STICKY_TOLERANCE` of the fresh candidate's.
5. **Choice**: the sticky candidate, unless the fresh one's peak is lower by more than
   `STICKY_TOLERANCE`; and `current`'s own layout for the layer if its peak is lower still,
   so a plan is never worse than the placement in service on the load it is given (when that
   placement fits the slots).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np

from cluster.placement import EMPTY, Placement
from cluster.planning.local_search import improve

POLICIES = ("global", "node_aware")
STICKY_TOLERANCE = 0.005
"""Moves buy balance only while they lower the most loaded worker by more than 0.5% of its load:
the sticky candidate stops paying moves once within this of the fresh one, and the fresh one
is taken only when lighter by more. Balancedness within 0.5% counts as equal (see the bench)."""


def plan_placement(
    load: np.ndarray,
    capacity: Sequence[int],
    current: Placement | None = None,
    *,
    min_replicas: int = 1,
    policy: str = "global",
    worker_nodes: Sequence[str] | None = None,
) -> Placement:
    """A placement that balances `load`, moving as few replicas of `current` as it can.

    load: `[L, E]` float >= 0, recent tokens per logical expert (`moe_index * E + e`).
    capacity: `[W]` slots per worker. current: the placement in service, or None.
    worker_nodes: `[W]` node id per worker; required by `policy="node_aware"`, ignored otherwise.
    Returns a placement of `L * E` logical experts, version `current.version + 1` (or 0), with
    row `w` of length `capacity[w]` (unfilled slots `EMPTY`). Replicas kept from `current` keep
    their slot index where it still exists; if nothing helps, the rows are current's.
    Raises ValueError for bad inputs, or when a layer's share of the slots cannot hold
    `min_replicas` replicas of each of its experts on distinct workers.
    """
    load, caps, node_of = _check_inputs(load, capacity, current, min_replicas, policy, worker_nodes)
    num_layers, num_experts = load.shape
    held = None if current is None else _held_by_layer(current, num_layers, num_experts)
    split = split_capacity(caps, num_layers, None if held is None else held.sum(axis=2).T)
    if not all(_spreadable(np.full(num_experts, min_replicas), split[:, l]) for l in range(num_layers)):
        split = split_capacity(caps, num_layers)  # current's layout per layer cannot be kept
    for layer in range(num_layers):
        _check_layer(layer, split[:, layer], num_experts, min_replicas)
    holds = [
        _plan_layer(load[l], split[:, l], min_replicas, node_of, None if held is None else held[l])
        for l in range(num_layers)
    ]
    rows = _assemble_rows(holds, caps, current)
    version = 0 if current is None else current.version + 1
    return Placement(version, num_layers * num_experts, rows)


def split_capacity(capacity: np.ndarray, num_layers: int, held: np.ndarray | None = None) -> np.ndarray:
    """Slots each worker gives each MoE layer: `[W, L]` int, row `w` summing to `capacity[w]`.

    held: `[W, L]` replicas each worker holds now per layer (from `current`), or None. When a
    worker has room for all of them, it keeps giving those layers those slots. Every other slot
    goes, worker by worker, to the layer with the fewest slots so far over all workers (ties:
    the layer this worker gave fewest, then the lowest layer). From nothing, layer totals differ
    by at most one and each worker gives each layer floor(c / L) or ceil(c / L) slots.
    """
    caps = np.asarray(capacity, dtype=np.int64)
    split = np.zeros((len(caps), num_layers), dtype=np.int64)
    if held is not None:
        fits = held.sum(axis=1) <= caps
        split[fits] = held[fits]
    totals = split.sum(axis=0)
    for w, cap in enumerate(caps):
        for _ in range(int(cap - split[w].sum())):
            layer = min(range(num_layers), key=lambda l: (totals[l], split[w, l], l))
            split[w, layer] += 1
            totals[layer] += 1
    return split


def layer_balancedness(placement: Placement, load: np.ndarray) -> np.ndarray:
    """`[L]` mean worker load / max worker load per MoE layer (1.0 for a layer without load).

    load: `[L, E]` tokens per logical expert; each expert's load is split evenly over its
    replicas.
    """
    worker_layer = worker_layer_load(placement, load)  # [W, L]
    peak = worker_layer.max(axis=0)
    mean = worker_layer.mean(axis=0)
    return np.where(peak > 0, mean / np.where(peak > 0, peak, 1.0), 1.0)


def count_moves(old: Placement, new: Placement) -> int:
    """Replicas `(worker, logical expert)` that `new` has and `old` has not: weight loads."""
    if old.num_logical_experts != new.num_logical_experts:
        raise ValueError(
            f"placements number different logical experts: {old.num_logical_experts} vs "
            f"{new.num_logical_experts}"
        )
    return len(new.replica_set - old.replica_set)


# ---- input checks ---------------------------------------------------------------------------


def _check_inputs(load, capacity, current, min_replicas, policy, worker_nodes):
    load = np.asarray(load, dtype=np.float64)
    if load.ndim != 2 or load.size == 0:
        raise ValueError(f"load must be [layers, experts] with both >= 1, got shape {load.shape}")
    if not np.isfinite(load).all() or (load < 0).any():
        raise ValueError("load must be finite and >= 0 (tokens per logical expert)")
    caps = np.asarray(capacity, dtype=np.int64).reshape(-1)
    if caps.size == 0 or (caps < 0).any():
        raise ValueError(f"capacity needs one slot count >= 0 per worker, got {list(capacity)}")
    if isinstance(min_replicas, bool) or not isinstance(min_replicas, int) or min_replicas < 1:
        raise ValueError(f"min_replicas must be an integer >= 1, got {min_replicas!r}")
    if min_replicas > caps.size:
        raise ValueError(
            f"min_replicas={min_replicas} exceeds the {caps.size} workers; replicas of one "
            f"expert must sit on distinct workers"
        )
    needed = load.size * min_replicas
    if caps.sum() < needed:
        raise ValueError(
            f"capacity too small: {int(caps.sum())} slots in all, but {load.shape[0]} layers x "
            f"{load.shape[1]} experts x min_replicas={min_replicas} need {needed}"
        )
    if current is not None and (current.num_logical_experts, current.num_workers) != (load.size, caps.size):
        raise ValueError(
            f"current placement has {current.num_logical_experts} logical experts on "
            f"{current.num_workers} workers, but load {load.shape} and capacity give {load.size} "
            f"on {caps.size}"
        )
    return load, caps, _node_index(policy, worker_nodes, caps.size)


def _node_index(policy: str, worker_nodes, num_workers: int) -> np.ndarray | None:
    """`[W]` int node number per worker for `node_aware`, None for `global`."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if policy == "global":
        return None
    if worker_nodes is None or len(worker_nodes) != num_workers:
        got = None if worker_nodes is None else len(worker_nodes)
        raise ValueError(f"policy 'node_aware' needs worker_nodes with one node per worker "
                         f"({num_workers}), got {got}")
    names = {name: i for i, name in enumerate(dict.fromkeys(worker_nodes))}
    return np.array([names[n] for n in worker_nodes], dtype=np.int64)


def _check_layer(layer: int, caps: np.ndarray, num_experts: int, min_replicas: int) -> None:
    if not _spreadable(np.full(num_experts, min_replicas), caps):
        raise ValueError(
            f"MoE layer {layer} gets {int(caps.sum())} slots on {int((caps > 0).sum())} workers "
            f"(slots per worker {caps.tolist()}); its {num_experts} experts x "
            f"min_replicas={min_replicas} cannot sit on distinct workers: add slots or workers"
        )


def _spreadable(counts: np.ndarray, caps: np.ndarray) -> bool:
    """Whether `counts` `[E]` replicas fit `caps` `[W]` slots with no worker holding an expert
    twice (Gale-Ryser: the k largest counts never need more than sum_w min(caps_w, k))."""
    need = np.cumsum(np.sort(counts)[::-1])
    k = np.arange(1, len(counts) + 1)
    room = np.minimum(caps[None, :], k[:, None]).sum(axis=1)
    return bool((need <= room).all())


# ---- one layer ------------------------------------------------------------------------------


def _plan_layer(load, caps, min_replicas, node_of, held):
    """`[W, E]` bool: which worker holds which expert of one layer. held: current's, or None."""
    counts = _replica_counts(load, caps, min_replicas, None if held is None else held.sum(axis=0))
    fresh = _pack(load, counts, caps, np.zeros((len(caps), len(load)), bool), node_of)
    fresh = improve(fresh, load, caps, node_of)
    if held is None:
        return fresh
    sticky = _pack(load, counts, caps, _keepable(held, counts, caps, load / counts), node_of)
    sticky = improve(sticky, load, caps, node_of, held, _peak(fresh, load) / (1 - STICKY_TOLERANCE))
    best = fresh if _peak(fresh, load) < (1 - STICKY_TOLERANCE) * _peak(sticky, load) else sticky
    current_ok = (held.sum(axis=0) >= min_replicas).all() and (held.sum(axis=1) <= caps).all()
    return held if current_ok and _peak(held, load) < _peak(best, load) else best


def _peak(hold: np.ndarray, load: np.ndarray) -> float:
    """Most loaded worker of `hold` `[W, E]`, each expert's `load` `[E]` split over replicas."""
    return float((hold @ (load / np.maximum(hold.sum(axis=0), 1))).max())


def _replica_counts(load, caps, min_replicas, prefer):
    """`[E]` replicas per expert: `min_replicas` each, then each free slot to the expert with
    the highest load per replica (ties: one `prefer` `[E]` has more replicas of, then fewer
    replicas, then the lower id), skipping experts that could no longer be spread over
    distinct workers."""
    counts = np.full(len(load), min_replicas, dtype=np.int64)
    prefer = np.zeros_like(counts) if prefer is None else prefer

    def key(e: int) -> tuple:
        return (-load[e] / counts[e], -int(prefer[e] > counts[e]), counts[e], e)

    heap = [key(e) for e in range(len(load))]
    heapq.heapify(heap)
    budget = int(caps.sum()) - int(counts.sum())
    while budget > 0 and heap:
        e = heapq.heappop(heap)[-1]
        counts[e] += 1
        if not _spreadable(counts, caps):
            counts[e] -= 1  # more counts elsewhere only make it harder: e is done
            continue
        budget -= 1
        heapq.heappush(heap, key(e))
    return counts


def _keepable(held, counts, caps, weights):
    """`[W, E]` bool: current's replicas that can stay. An expert over its new count drops the
    replicas on the most loaded workers; a worker over its slots drops its heaviest replicas."""
    keep = held.copy()
    worker_load = keep @ weights
    for e in np.flatnonzero(keep.sum(axis=0) > counts):
        on = np.flatnonzero(keep[:, e])
        drop = on[np.argsort(-worker_load[on], kind="stable")][: len(on) - counts[e]]
        keep[drop, e] = False
    for w in np.flatnonzero(keep.sum(axis=1) > caps):
        mine = np.flatnonzero(keep[w])
        keep[w, mine[np.argsort(-weights[mine], kind="stable")][: len(mine) - caps[w]]] = False
    return keep


def _pack(load, counts, caps, start, node_of):
    """`[W, E]` bool: `start` plus the missing replicas, heaviest first, each on the least loaded
    worker with a free slot that lacks the expert (`node_aware`: on a node that lacks it, where
    one has room). When that gets stuck, everything is dealt out afresh (`_deal`)."""
    weights = load / counts
    hold = start.copy()
    worker = hold @ weights
    todo = np.maximum(counts - hold.sum(axis=0), 0)
    for e in sorted(np.repeat(np.arange(len(counts)), todo), key=lambda e: (-weights[e], e)):
        open_ = (caps - hold.sum(axis=1) > 0) & ~hold[:, e]
        if not open_.any():
            open_ = _make_room(e, hold, worker, caps, weights)
            if open_ is None:
                return _deal(weights, counts, caps)
        crowded = np.zeros(len(caps), bool) if node_of is None else np.isin(node_of, node_of[hold[:, e]])
        w = next(w for w in np.lexsort((worker, crowded)) if open_[w])
        hold[w, e] = True
        worker[w] += weights[e]
    return hold


def _make_room(e, hold, worker, caps, weights):
    """Free a slot for expert `e` on a worker that lacks it, by moving one of that worker's
    replicas to a worker with a free slot. Returns the `[W]` mask of the worker freed, or None."""
    free = np.flatnonzero(caps - hold.sum(axis=1) > 0)
    for v in np.flatnonzero(~hold[:, e]):
        for u in free:
            movable = np.flatnonzero(hold[v] & ~hold[u])
            if movable.size:
                f = movable[np.argmin(weights[movable])]
                hold[v, f], hold[u, f] = False, True
                worker[v] -= weights[f]
                worker[u] += weights[f]
                return np.arange(len(caps)) == v
    return None


def _deal(weights, counts, caps):
    """`[W, E]` bool from scratch, always possible when `_spreadable(counts, caps)`: experts with
    the most replicas first, each onto the workers with the most free slots (then least load)."""
    hold = np.zeros((len(caps), len(counts)), bool)
    free = caps.astype(np.int64).copy()
    worker = np.zeros(len(caps))
    for e in np.lexsort((-weights, -counts)):
        chosen = np.lexsort((worker, -free))[: counts[e]]
        hold[chosen, e] = True
        free[chosen] -= 1
        worker[chosen] += weights[e]
    return hold


# ---- between placements and layers ----------------------------------------------------------


def _held_by_layer(current: Placement, num_layers: int, num_experts: int) -> np.ndarray:
    """`[L, W, E]` bool: worker w holds a replica of expert e of layer l in `current`."""
    held = np.zeros((num_layers, current.num_workers, num_experts), bool)
    for w, row in enumerate(current.slots):
        for expert in row:
            if expert != EMPTY:
                held[expert // num_experts, w, expert % num_experts] = True
    return held


def _assemble_rows(holds, caps, current):
    """Rows of the new placement from per-layer `[W, E]` holds: a replica `current` has stays
    in its slot when that slot still exists; new replicas fill the free slots in id order."""
    num_experts = holds[0].shape[1]
    rows = []
    for w, cap in enumerate(caps):
        wanted = {l * num_experts + int(e) for l, h in enumerate(holds) for e in np.flatnonzero(h[w])}
        old = list(current.slots[w][:cap]) if current is not None else []
        row = [e if e in wanted else EMPTY for e in old] + [EMPTY] * (int(cap) - len(old))
        new = iter(sorted(wanted - set(row)))
        rows.append(tuple(next(new, EMPTY) if e == EMPTY else e for e in row))
    return tuple(rows)


def worker_layer_load(placement: Placement, load: np.ndarray) -> np.ndarray:
    """`[W, L]` load per worker and layer; `load` `[L, E]` split evenly over replicas."""
    load = np.asarray(load, dtype=np.float64)
    if load.ndim != 2 or load.size != placement.num_logical_experts:
        raise ValueError(
            f"load of shape {load.shape} does not cover the placement's "
            f"{placement.num_logical_experts} logical experts as [layers, experts]"
        )
    num_layers, num_experts = load.shape
    pairs = np.array([(w, e) for w, row in enumerate(placement.slots) for e in row if e != EMPTY], dtype=np.int64)
    workers, experts = pairs[:, 0], pairs[:, 1]
    per_replica = load.reshape(-1) / np.maximum(placement.replica_counts, 1)
    cells = workers * num_layers + experts // num_experts
    return np.bincount(cells, weights=per_replica[experts], minlength=placement.num_workers * num_layers).reshape(
        placement.num_workers, num_layers)
