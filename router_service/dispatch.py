"""Plan dispatch and combine: which worker slot gets which token rows, and how outputs sum up.

Pure numpy/torch over one batch and one placement: no Ray, no gRPC.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cluster.placement import EMPTY, Placement
from router_service.gate import Routing


@dataclass(frozen=True)
class WorkerRequest:
    """One worker's share of a batch.

    slot_ids: `[S]` slots that receive tokens; offsets: `[S + 1]`, slot `slot_ids[i]` gets
    rows `offsets[i]:offsets[i+1]` of token_idx/weights; token_idx: `[N]` int64 rows of the
    batch; weights: `[N]` float32 gate weights.
    """

    worker: int
    slot_ids: np.ndarray
    offsets: np.ndarray
    token_idx: np.ndarray
    weights: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int(self.token_idx.shape[0])


@dataclass(frozen=True)
class DispatchPlan:
    """requests: one per worker that receives tokens; expert_tokens: `[E]` tokens per logical
    expert of this layer (the routed load)."""

    placement_version: int
    requests: tuple[WorkerRequest, ...]
    expert_tokens: np.ndarray


class ReplicaTable:
    """A placement's replicas as padded arrays, for vectorised lookups (built once per version).

    worker, slot: `[num_logical_experts, max_replicas]`; count: `[num_logical_experts]`.
    """

    def __init__(self, placement: Placement):
        self.version = placement.version
        self.num_slots = max(len(row) for row in placement.slots)
        width = max(len(r) for r in placement.replicas)
        self.worker = np.full((placement.num_logical_experts, width), EMPTY, dtype=np.int64)
        self.slot = np.full_like(self.worker, EMPTY)
        for expert, reps in enumerate(placement.replicas):
            for j, (w, s) in enumerate(reps):
                self.worker[expert, j], self.slot[expert, j] = w, s
        self.count = placement.replica_counts.astype(np.int64)


def plan_dispatch(routing: Routing, moe_index: int, num_experts: int, table: ReplicaTable) -> DispatchPlan:
    """Group the batch's (token, expert) assignments by worker and slot.

    Tokens of an expert with several replicas are split into equal contiguous shares, one per
    replica.
    """
    topk_ids = routing.topk_ids.numpy()
    tokens, k = topk_ids.shape
    logical = moe_index * num_experts + topk_ids.reshape(-1)  # [T*k]
    token_of = np.repeat(np.arange(tokens, dtype=np.int64), k)
    weight_of = routing.topk_weights.numpy().reshape(-1)

    by_expert = np.argsort(logical, kind="stable")
    sorted_expert = logical[by_expert]
    counts = np.bincount(sorted_expert, minlength=table.count.shape[0])
    rank = np.arange(sorted_expert.shape[0]) - (np.cumsum(counts) - counts)[sorted_expert]
    replica = rank * table.count[sorted_expert] // counts[sorted_expert]
    worker = table.worker[sorted_expert, replica]
    slot = table.slot[sorted_expert, replica]

    by_slot = np.argsort(worker * table.num_slots + slot, kind="stable")
    worker, slot = worker[by_slot], slot[by_slot]
    order = by_expert[by_slot]
    requests = []
    for w in np.unique(worker):
        lo, hi = np.searchsorted(worker, [w, w + 1])
        slots, starts = np.unique(slot[lo:hi], return_index=True)
        requests.append(WorkerRequest(
            worker=int(w),
            slot_ids=slots,
            offsets=np.append(starts, hi - lo).astype(np.int64),
            token_idx=np.ascontiguousarray(token_of[order[lo:hi]]),
            weights=np.ascontiguousarray(weight_of[order[lo:hi]]),
        ))
    expert_tokens = counts[moe_index * num_experts:(moe_index + 1) * num_experts]
    return DispatchPlan(table.version, tuple(requests), expert_tokens)


def combine(tokens: int, hidden: int, plan: DispatchPlan, outputs: list[np.ndarray]) -> torch.Tensor:
    """Sum the workers' gate-weighted outputs into `[tokens, hidden]` float32.

    outputs[i]: `[plan.requests[i].num_tokens, hidden]`.
    """
    out = torch.zeros(tokens, hidden, dtype=torch.float32)
    for request, y in zip(plan.requests, outputs, strict=True):
        out.index_add_(0, torch.from_numpy(request.token_idx), torch.from_numpy(y))
    return out
