"""Step 4 of the planner: local search that lowers a layer's most loaded worker.

A replica on the peak worker trades places with a lighter replica or an empty slot on another
worker, only when both workers end below the peak; pure numpy over one layer's `[W, E]` holding.
"""

from __future__ import annotations

import numpy as np

MAX_SEARCH_STEPS = 512  # local-search exchanges per layer and candidate
_REL_EPS = 1e-9  # an exchange must lower the peak by more than this fraction of it


def improve(hold, load, caps, node_of=None, origin=None, target=0.0):
    """Local search on `hold` `[W, E]`: a replica on the most loaded worker w trades places
    with a lighter replica (or an empty slot) on another worker, when both end below w's load.
    Among such exchanges: fewest replicas loaded where `origin` (current's `[W, E]`) lacks
    them, then the lowest load of the pair. Once w's load is <= `target`, only exchanges that
    load nothing new are taken. `node_aware`: no exchange leaves an expert on fewer nodes."""
    hold = hold.copy()
    grid = _grid(hold, caps)  # [W, S] expert per slot; E: empty slot, -1: no slot
    x = np.append(load / hold.sum(axis=0), 0.0)  # [E + 1] load per replica; empty slot: 0
    worker = hold @ x[:-1]
    for _ in range(MAX_SEARCH_STEPS):
        w = int(np.argmax(worker))
        found = _best_exchange(w, hold, grid, x, worker, node_of, origin, target)
        if found is None:
            break
        sa, v, sb = found
        a, b = grid[w, sa], grid[v, sb]
        grid[w, sa], grid[v, sb] = b, a
        hold[w, a], hold[v, a] = False, True
        if b < len(load):
            hold[v, b], hold[w, b] = False, True
        worker[w] += x[b] - x[a]
        worker[v] += x[a] - x[b]
    return hold


def _best_exchange(w, hold, grid, x, worker, node_of, origin, target):
    """`(slot on w, worker v, slot on v)` of the best exchange, or None. Tensors are
    `[S, W, S]`: the replica in slot `sa` of w against slot `sb` of worker v."""
    num_workers, num_experts = hold.shape
    held = np.concatenate([hold, np.zeros((num_workers, 1), bool)], axis=1)  # [W, E + 1]
    a, b = grid[w], grid  # [S], [W, S]
    delta = x[a][:, None, None] - x[b][None]  # load that goes from w to v
    ok = ((a >= 0) & (a < num_experts))[:, None, None] & (b >= 0)[None] & (delta > 0)
    ok &= ~held[:, a].T[:, :, None] & ~held[w][b][None]
    ok[:, w, :] = False
    if node_of is not None:
        ok &= _keeps_nodes(w, hold, grid, node_of)
    pair = np.maximum(worker[w] - delta, worker[None, :, None] + delta)
    ok &= pair < worker[w] * (1 - _REL_EPS)
    cost = np.zeros(ok.shape) if origin is None else _exchange_cost(w, origin, grid)
    if worker[w] <= target:
        ok &= cost <= 0
    if not ok.any():
        return None
    idx = np.flatnonzero(ok)
    best = idx[np.lexsort((pair.flat[idx], cost.flat[idx]))[0]]
    return np.unravel_index(best, ok.shape)


def _exchange_cost(w, origin, grid):
    """`[S, W, S]` replicas an exchange loads where `origin` lacks them, less those it returns."""
    num_workers = origin.shape[0]
    o = np.concatenate([origin, np.zeros((num_workers, 1), bool)], axis=1).astype(np.int64)
    a, b = grid[w], grid
    a_moves = o[w, a][:, None, None] - o[:, a].T[:, :, None]  # a leaves w, lands on v
    b_moves = o[np.arange(num_workers)[:, None], b][None] - o[w, b][None]  # b leaves v for w
    return a_moves + b_moves


def _keeps_nodes(w, hold, grid, node_of):
    """`[S, W, S]` bool: neither replica of the exchange leaves its expert on fewer nodes."""
    num_workers, num_experts = hold.shape
    on_node = np.zeros((num_experts + 1, node_of.max() + 1), np.int64)  # row E: empty slot
    np.add.at(on_node, (np.nonzero(hold)[1], node_of[np.nonzero(hold)[0]]), 1)
    a, f = grid[w], grid
    same = node_of == node_of[w]  # [W]
    a_lost = (on_node[a, node_of[w]] == 1)[:, None] & (on_node[a][:, node_of] > 0) & ~same[None]
    f_lost = (on_node[f, node_of[:, None]] == 1) & (on_node[f, node_of[w]] > 0) & ~same[:, None]
    f_lost[f >= num_experts] = False
    return ~a_lost[:, :, None] & ~f_lost[None]


def _grid(hold, caps):
    """`[W, max(caps)]` expert per slot of `hold` `[W, E]`: held experts, then E for a free
    slot, then -1 past the worker's slots."""
    num_workers, num_experts = hold.shape
    grid = np.full((num_workers, max(int(caps.max()), 1)), -1, np.int64)
    for w in range(num_workers):
        mine = np.flatnonzero(hold[w])
        grid[w, : caps[w]] = num_experts
        grid[w, : len(mine)] = mine
    return grid
