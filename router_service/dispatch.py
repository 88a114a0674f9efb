"""Plan dispatch and combine: which worker gets which token rows of which expert, and how the
outputs sum up. Pure numpy/torch over one batch and one placement: no Ray, no gRPC.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from cluster.placement import EMPTY, ExpertShare, Placement
from router_service.gate import Routing


@dataclass(frozen=True)
class WorkerRequest:
    """One worker's share of a batch, as the router keeps it.

    share: what the worker gets (`ExpertShare`: logical experts, their token rows and gate
    weights); rows: `[U]` the distinct tokens of `share.token_idx`, ascending: the worker
    answers `[U, H]`, one summed row per distinct token.
    """

    worker: int
    share: ExpertShare
    rows: np.ndarray

    @property
    def num_tokens(self) -> int:
        return self.share.num_tokens


@dataclass(frozen=True)
class DispatchPlan:
    """requests: one per worker that receives tokens; expert_tokens: `[E]` tokens per logical
    expert of this layer (the routed load); worker_tokens: `[W]` tokens sent to each worker;
    unserved_tokens: `[u]` batch rows not sent because one of their experts has no live
    replica, which are `unserved_experts` (global logical ids)."""

    placement_version: int
    requests: tuple[WorkerRequest, ...]
    expert_tokens: np.ndarray
    worker_tokens: np.ndarray
    unserved_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    unserved_experts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


class ReplicaTable:
    """A placement's live replicas as padded arrays, for vectorised lookups (built once per
    placement version and set of down workers).

    worker: `[num_logical_experts, max_replicas]` (EMPTY-padded); count: `[num_logical_experts]`
    live replicas. Replicas on `down` workers (lost, restarting) are left out; an expert whose
    every replica is down has count 0 (`unserved`).
    """

    def __init__(self, placement: Placement, down: frozenset[int] = frozenset()):
        self.version = placement.version
        self.down = down
        self.num_workers = placement.num_workers
        width = max(len(r) for r in placement.replicas)
        self.worker = np.full((placement.num_logical_experts, width), EMPTY, dtype=np.int64)
        self.count = np.zeros(placement.num_logical_experts, dtype=np.int64)
        for expert, reps in enumerate(placement.replicas):
            live = [w for w, _ in reps if w not in down]
            self.worker[expert, : len(live)] = live
            self.count[expert] = len(live)
        self.replicated = np.flatnonzero(self.count > 1)
        self.unserved = np.flatnonzero(self.count == 0)


def water_fill(loads: np.ndarray, n: int) -> np.ndarray:
    """Split `n` tokens over workers with `loads` `[m]` so the fullest ends as low as possible:
    raise the least loaded first, like water poured into vessels. Returns int shares `[m]`."""
    order = np.argsort(loads, kind="stable")
    sorted_loads = loads[order].astype(np.float64)
    prefix = np.cumsum(sorted_loads)
    m = len(loads)
    for j in range(1, m + 1):
        level = (n + prefix[j - 1]) / j
        if j == m or level <= sorted_loads[j]:
            break
    exact = np.maximum(0.0, level - loads.astype(np.float64))
    shares = np.floor(exact).astype(np.int64)
    short = n - int(shares.sum())
    if short > 0:
        shares[np.argsort(-(exact - shares), kind="stable")[:short]] += 1
    return shares


def _replica_of(sorted_expert: np.ndarray, counts: np.ndarray, table: ReplicaTable,
                outstanding: np.ndarray | None) -> np.ndarray:
    """Replica index for each assignment, sorted by expert: `[N]`.

    A replicated expert's tokens are split into contiguous shares, one per replica, by spare
    capacity: the workers' `outstanding` tokens (queued or running, `[W]`) plus this batch's
    tokens of experts with one replica are the water level each replica's share fills up to.
    """
    replica = np.zeros(sorted_expert.shape[0], dtype=np.int64)
    hot = table.replicated[counts[table.replicated] > 0]
    if hot.size == 0:
        return replica
    single = np.flatnonzero((table.count == 1) & (counts > 0))
    load = np.zeros(table.num_workers, dtype=np.float64)
    if outstanding is not None:
        load[: len(outstanding)] += outstanding[: table.num_workers]
    np.add.at(load, table.worker[single, 0], counts[single])
    starts = np.cumsum(counts) - counts
    for expert in hot[np.argsort(-counts[hot], kind="stable")]:
        n = counts[expert]
        workers = table.worker[expert, : table.count[expert]]
        shares = water_fill(load[workers], int(n))
        load[workers] += shares
        bounds = np.cumsum(shares)
        replica[starts[expert]: starts[expert] + n] = np.searchsorted(bounds, np.arange(n), side="right")
    return replica


def plan_dispatch(routing: Routing, moe_index: int, num_experts: int, table: ReplicaTable,
                  outstanding: np.ndarray | None = None, shared: int = 0) -> DispatchPlan:
    """Group the batch's (token, expert) assignments by worker and logical expert.

    shared: the layer's shared-expert pieces (experts `num_experts ..`, logical stride
    `num_experts + shared`); every token goes to each of them, weighted by
    `routing.shared_weights` (or 1), and they count as no routed load (`expert_tokens` is the
    routed experts' `[E]`).
    outstanding: `[W]` tokens each worker still has in hand; replicated experts' tokens go
    preferably to the replicas with spare capacity (see `_replica_of`). Tokens routed to an
    expert without a live replica are not sent anywhere: they are the plan's `unserved` tokens.
    Assignments that `routing.kept` clears (expert skipping) are left out first: no worker gets
    them and they are no routed load (a token then has fewer than k experts).
    """
    topk_ids = routing.topk_ids.numpy()
    tokens, k = topk_ids.shape
    base = moe_index * (num_experts + shared)
    logical = base + topk_ids.reshape(-1)  # [T*k]
    token_of = np.repeat(np.arange(tokens, dtype=np.int64), k)
    weight_of = routing.topk_weights.numpy().reshape(-1)
    if routing.kept is not None:  # [N <= T*k]
        sent = routing.kept.numpy().reshape(-1)
        logical, token_of, weight_of = logical[sent], token_of[sent], weight_of[sent]
    expert_tokens = np.bincount(logical - base, minlength=num_experts)
    if shared:
        rows = np.arange(tokens, dtype=np.int64)
        w = np.ones(tokens, np.float32) if routing.shared_weights is None else routing.shared_weights.numpy()
        logical = np.concatenate([logical, np.repeat(base + num_experts + np.arange(shared), tokens)])
        token_of = np.concatenate([token_of, np.tile(rows, shared)])
        weight_of = np.concatenate([weight_of, np.tile(w.astype(np.float32), shared)])
    return _plan(logical, token_of, weight_of, table, outstanding, expert_tokens)


def plan_retry(failed: Sequence[WorkerRequest], table: ReplicaTable,
               outstanding: np.ndarray | None = None) -> DispatchPlan:
    """Send the assignments of `failed` requests again, to the live replicas of `table`
    (built without the workers that failed). expert_tokens is zero: the load was counted once."""
    logical, token_of, weight_of = _assignments(failed)
    return _plan(logical, token_of, weight_of, table, outstanding, np.zeros(0, dtype=np.int64))


def plan_isolated_retry(failed: Sequence[WorkerRequest], placement: Placement, down: frozenset[int],
                        groups: np.ndarray, outstanding: np.ndarray | None = None) -> DispatchPlan:
    """`plan_retry`, keeping requests apart: groups `[T]` says which request each batch row
    belongs to, and each request's assignments go to as few workers as cover its experts,
    workers no other request of this retry uses where the replicas allow. A request that kills
    its workers again (a poison request) then fails alone, and the innocent requests it was
    batched with are served."""
    logical, token_of, weight_of = _assignments(failed)
    requests, unserved_tokens, unserved_experts = [], [], []
    worker_tokens = np.zeros(placement.num_workers, dtype=np.int64)
    used: set[int] = set()
    suspects: set[int] = set()  # workers given to the requests in every lost share
    holders = {e: {w for w, _ in reps} - down for e, reps in enumerate(placement.replicas)}
    # a request with rows in every lost share is the likeliest killer: it goes first, on workers
    # the others then avoid above all
    seen = {g: sum(g in set(groups[r.share.token_idx].tolist()) for r in failed) for g in np.unique(groups[token_of])}
    for group in sorted(seen, key=lambda g: (-seen[g], g)):
        mine = groups[token_of] == group
        workers = _cover(np.unique(logical[mine]).tolist(), holders, used, suspects)
        if seen[group] == len(failed):
            suspects |= workers
        table = ReplicaTable(placement, frozenset(range(placement.num_workers)) - workers)
        plan = _plan(logical[mine], token_of[mine], weight_of[mine], table, outstanding, np.zeros(0, dtype=np.int64))
        requests += plan.requests
        used.update(r.worker for r in plan.requests)
        worker_tokens += plan.worker_tokens
        unserved_tokens.append(plan.unserved_tokens)
        unserved_experts.append(plan.unserved_experts)
    return DispatchPlan(placement.version, tuple(requests), np.zeros(0, dtype=np.int64), worker_tokens,
                        np.unique(np.concatenate(unserved_tokens)), np.unique(np.concatenate(unserved_experts)))


def _cover(experts: list[int], holders: dict[int, set[int]], used: set[int],
           suspects: set[int] = frozenset()) -> frozenset[int]:
    """Few live workers that hold every one of `experts` (greedy set cover), avoiding `suspects`
    above all, then workers in `used`; an expert no live worker holds is left uncovered (its
    tokens go unserved)."""
    left, chosen = {e for e in experts if holders[e]}, set()
    while left:
        candidates = {w for e in left for w in holders[e]}
        best = max(candidates, key=lambda w: (w not in suspects, w not in used, sum(w in holders[e] for e in left), -w))
        chosen.add(best)
        left = {e for e in left if best not in holders[e]}
    return frozenset(chosen)


def _assignments(requests: Sequence[WorkerRequest]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The flat assignments `[N]` of `requests`: global logical expert, batch row, gate weight."""
    logical = np.concatenate([np.repeat(r.share.expert_ids, np.diff(r.share.offsets)) for r in requests])
    token_of = np.concatenate([r.share.token_idx for r in requests])
    weight_of = np.concatenate([r.share.weights for r in requests])
    return logical, token_of, weight_of


def _plan(logical: np.ndarray, token_of: np.ndarray, weight_of: np.ndarray, table: ReplicaTable,
          outstanding: np.ndarray | None, expert_tokens: np.ndarray) -> DispatchPlan:
    """The plan for flat assignments `[N]`: global logical expert, batch row, gate weight."""
    unserved_tokens = np.zeros(0, dtype=np.int64)
    unserved_experts = np.zeros(0, dtype=np.int64)
    if table.unserved.size:
        lost = table.count[logical] == 0
        if lost.any():  # every assignment of a token that cannot be fully served is dropped
            unserved_experts = np.unique(logical[lost])
            unserved_tokens = np.unique(token_of[lost])
            keep = ~np.isin(token_of, unserved_tokens)
            logical, token_of, weight_of = logical[keep], token_of[keep], weight_of[keep]

    by_expert = np.argsort(logical, kind="stable")
    sorted_expert = logical[by_expert]
    counts = np.bincount(sorted_expert, minlength=table.count.shape[0])
    worker = table.worker[sorted_expert, _replica_of(sorted_expert, counts, table, outstanding)]

    by_worker = np.argsort(worker, kind="stable")  # stays sorted by expert within a worker
    worker, expert = worker[by_worker], sorted_expert[by_worker]
    order = by_expert[by_worker]
    requests = []
    for w in np.unique(worker):
        lo, hi = np.searchsorted(worker, [w, w + 1])
        expert_ids, starts = np.unique(expert[lo:hi], return_index=True)
        token_idx = np.ascontiguousarray(token_of[order[lo:hi]])
        share = ExpertShare(
            expert_ids=expert_ids,
            offsets=np.append(starts, hi - lo).astype(np.int64),
            token_idx=token_idx,
            weights=np.ascontiguousarray(weight_of[order[lo:hi]]),
        )
        requests.append(WorkerRequest(worker=int(w), share=share, rows=np.unique(token_idx)))
    worker_tokens = np.bincount(worker, minlength=table.num_workers)
    return DispatchPlan(table.version, tuple(requests), expert_tokens, worker_tokens,
                        unserved_tokens, unserved_experts)


def combine(tokens: int, hidden: int, plan: DispatchPlan, outputs: list[np.ndarray]) -> torch.Tensor:
    """Sum the workers' partial sums into `[tokens, hidden]` float32.

    outputs[i]: `[len(plan.requests[i].rows), hidden]`, one row per distinct token.
    """
    out = torch.zeros(tokens, hidden, dtype=torch.float32)
    add_partials(out, zip(plan.requests, outputs, strict=True))
    return out


def add_partials(out: torch.Tensor, answered) -> None:
    """Add each `(request, output)` pair's partial sums into `out` `[tokens, hidden]`."""
    tokens = out.shape[0]
    for request, y in answered:
        if len(request.rows) == tokens:  # the worker saw every token: a plain add
            out += torch.from_numpy(y)
        else:
            out.index_add_(0, torch.from_numpy(request.rows), torch.from_numpy(y))
