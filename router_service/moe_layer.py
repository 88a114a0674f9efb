"""The distributed MoE layer as the router runs it: score -> plan dispatch -> scatter ->
gather -> combine.

The router never imports `workers`: it reaches the expert shards through `ExpertBackend`, a
small protocol that the composition root fills with Ray actor handles.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from cluster.model_spec import GateWeights, ModelSpec
from cluster.placement import Placement
from router_service.dispatch import (
    DispatchPlan,
    ReplicaTable,
    WorkerRequest,
    add_partials,
    plan_dispatch,
    plan_isolated_retry,
    plan_retry,
)
from router_service.errors import ExpertUnavailable, ServingError, WorkerLost
from router_service.gate import Routing, route
from router_service.placement_store import PlacementStore
from router_service.skipping import skip_experts


class ExpertBackend(Protocol):
    """How the router reaches the workers."""

    def share(self, x: np.ndarray) -> Any:
        """Make the batch `[T, H]` available to every worker once (e.g. `ray.put`)."""

    def forward(self, shared_x: Any, request: WorkerRequest) -> Awaitable[np.ndarray]:
        """Run `request` on its worker; resolves to `[len(request.rows), H]` float32, or
        raises `WorkerLost` when the worker is gone (then it counts as down)."""

    @property
    def down(self) -> frozenset[int]:
        """Workers not to send to now."""

    def mark_lost(self, worker: int, incarnation: str | None) -> bool:
        """Count `worker` as down until the control plane says otherwise, if `incarnation` (the
        one a failed call went to) is the one in service; returns whether it did."""

    def incarnation(self, worker: int) -> str | None:
        """The incarnation of `worker` calls go to now (None: down or unknown)."""


@dataclass(frozen=True)
class LayerOutput:
    """hidden: `[T, H]` float32; routing: the gate's choice (after expert skipping: the skipped
    assignments have weight 0 and `kept` false); expert_tokens: `[E]` tokens sent to each expert
    of the layer (skipped ones are not); placement_version: the placement this batch was served
    with; failed: `[T]` bool, tokens that could not be served (their rows of `hidden` are not
    valid), and `failure` says why; skipped_expert_tokens: (token, expert) assignments dropped by
    expert skipping."""

    hidden: torch.Tensor
    routing: Routing
    expert_tokens: np.ndarray
    placement_version: int
    failed: np.ndarray | None = None
    failure: ServingError | None = None
    skipped_expert_tokens: int = 0


@dataclass
class StageTimes:
    """CPU seconds the router thread spent in its own stages (gate + dispatch + scatter, and
    combine), summed over batches: the router's overhead beside the workers' math."""

    dispatch: float = 0.0
    combine: float = 0.0
    batches: int = 0

    def add(self, dispatch: float, combine: float) -> None:
        self.dispatch += dispatch
        self.combine += combine
        self.batches += 1

    @property
    def total(self) -> float:
        return self.dispatch + self.combine


class DistributedMoELayer:
    """One model's MoE layers served over expert shard workers.

    gates: `{layer: GateWeights}`; placements: the store the router takes one
    placement from per batch, and holds until the batch is back (the seam where replication
    and rebalancing plug in).

    Faults: a worker share that fails because its worker was lost is sent again to the other
    live replicas of its experts, at most `max_retries` times per batch (so a request that
    kills workers cannot crash-loop them), each request's rows (`groups`) on workers of their
    own where the replicas allow, so that a request that kills workers fails alone; tokens whose
    experts have no live replica fail at once with `ExpertUnavailable`. Admission: a batch waits to be sent while some worker has
    `max_worker_inflight_tokens` or more in hand (expert-token assignments).
    """

    def __init__(
        self,
        spec: ModelSpec,
        gates: dict[int, GateWeights],
        placements: PlacementStore,
        backend: ExpertBackend,
        max_retries: int = 1,
        max_worker_inflight_tokens: int | None = None,
        share_timeout_s: float | None = None,
        share_timeout_factor: float = 20.0,
    ):
        missing = [layer for layer in spec.moe_layers if layer not in gates]
        if missing:
            raise ValueError(f"gate weights missing for MoE layers {missing}")
        self.spec = spec
        self._gates = {layer: gate.float() for layer, gate in gates.items()}
        self._placements = placements
        self.outstanding = np.zeros(placements.current.num_workers, dtype=np.int64)  # tokens in workers
        self._backend = backend
        self._table: ReplicaTable | None = None
        self._max_retries = max_retries
        self._max_inflight = max_worker_inflight_tokens
        self._room = asyncio.Condition()
        self._share_timeout_s = share_timeout_s
        self._share_timeout_factor = share_timeout_factor
        self._seconds_per_token: dict[int, float] = {}  # worker -> what a share took lately, per assignment
        self.retries = 0  # worker shares sent again after their worker was lost
        self.last_share_s: dict[int, float] = {}  # worker -> when it last got a share (time.monotonic)
        self.lost_workers: set[tuple[int, str | None]] = set()  # (worker, incarnation) lost since the last report
        self.hung_workers: set[tuple[int, str | None]] = set()  # ... that did not answer in time
        self.stage_s = StageTimes()

    def _replica_table(self, placement: Placement) -> ReplicaTable:
        down = self._backend.down
        if self._table is None or self._table.version != placement.version or self._table.down != down:
            self._table = ReplicaTable(placement, down)
            if len(self.outstanding) < placement.num_workers:
                self.outstanding = np.pad(self.outstanding, (0, placement.num_workers - len(self.outstanding)))
        return self._table

    async def forward(self, layer: int, hidden: torch.Tensor, groups: np.ndarray | None = None,
                      thresholds: torch.Tensor | None = None) -> LayerOutput:
        """hidden: `[T, H]` float32 for MoE layer `layer` (the model's numbering); groups: `[T]`
        which request each row belongs to (retries keep requests apart, see `plan_retry`);
        thresholds: `[T]` each row's expert skip threshold (`router_service.skipping`; None: no
        skipping)."""
        moe_index = self.spec.moe_index(layer)
        await self._wait_for_room()
        with self._placements.use() as placement:
            t0 = time.thread_time()
            routing = route(hidden, self._gates[layer], self.spec.gate, self.spec.top_k)  # score
            skip = skip_experts(routing, thresholds)  # ... and skip
            routing = skip.routing
            plan = plan_dispatch(routing, moe_index, self.spec.num_experts, self._replica_table(placement),
                                 self.outstanding, self.spec.num_shared_experts)  # plan
            shared_x = self._backend.share(hidden.numpy())  # scatter
            out = torch.zeros_like(hidden)
            failed = np.zeros(hidden.shape[0], dtype=bool)
            failure = self._unserved(plan, failed)
            expert_tokens = plan.expert_tokens  # the routed load, counted once (retries add none)
            dispatch_s, combine_s = time.thread_time() - t0, 0.0
            for attempt in range(self._max_retries + 1):
                answered, lost = await self._send(shared_x, plan.requests)  # gather
                t0 = time.thread_time()
                add_partials(out, answered)  # combine
                for request, err in lost:
                    self._backend.mark_lost(request.worker, err.incarnation)
                    (self.hung_workers if err.hung else self.lost_workers).add((request.worker, err.incarnation))
                if lost and attempt == self._max_retries:
                    for request, _ in lost:
                        failed[request.rows] = True
                    failure = failure or WorkerLost(
                        lost[0][1].worker, f"was lost while serving this request, and so were the "
                        f"replicas it was sent to again ({self._max_retries} retries)")
                elif lost:  # the same assignments, to the other live replicas
                    self.retries += len(lost)
                    failed_shares = [r for r, _ in lost]
                    table = self._replica_table(placement)
                    plan = plan_retry(failed_shares, table, self.outstanding) if groups is None else \
                        plan_isolated_retry(failed_shares, placement, table.down, groups, self.outstanding)
                    if plan.unserved_tokens.size:
                        failed[plan.unserved_tokens] = True
                        failure = failure or WorkerLost(
                            lost[0][1].worker, "was lost while serving this request, and no live replica "
                            "of its experts is left to send it to")
                combine_s += time.thread_time() - t0
                if not lost:
                    break
        self.stage_s.add(dispatch=dispatch_s, combine=combine_s)
        return LayerOutput(out, routing, expert_tokens, placement.version, failed if failed.any() else None, failure,
                           skip.skipped)

    def _unserved(self, plan: DispatchPlan, failed: np.ndarray) -> ExpertUnavailable | None:
        """Mark the plan's unserved tokens failed; the error naming their experts."""
        if not plan.unserved_tokens.size:
            return None
        failed[plan.unserved_tokens] = True
        return ExpertUnavailable([self.spec.layer_expert(g) for g in plan.unserved_experts.tolist()],
                                 self.spec.num_experts)

    async def _send(self, shared_x, requests) -> tuple[list, list]:
        """Run `requests` on their workers at once: ([(request, output)], [(request, WorkerLost)]).
        Any other error fails the batch."""
        results = await asyncio.gather(*(self._call(shared_x, r) for r in requests), return_exceptions=True)
        answered, lost = [], []
        for request, result in zip(requests, results):
            if isinstance(result, WorkerLost):
                lost.append((request, result))
            elif isinstance(result, BaseException):
                raise result
            else:
                answered.append((request, result))
        return answered, lost

    def worker_view(self, now_s: float, window_s: float) -> tuple[int, int]:
        """(workers this router may send to, workers that got a share within `window_s`): under
        load the two should match; a routable worker that gets nothing is a bug to see."""
        routable = self._placements.current.num_workers - len(self._backend.down)
        serving = sum(now_s - at <= window_s for at in self.last_share_s.values())
        return routable, serving

    def share_deadline_s(self, worker: int, tokens: int) -> float | None:
        """How long a share of `tokens` assignments may take on `worker` before it counts as
        hung: the floor, or `share_timeout_factor` x what that took lately, if longer."""
        if self._share_timeout_s is None:
            return None
        lately = self._seconds_per_token.get(worker, 0.0) * max(tokens, 1)
        return max(self._share_timeout_s, self._share_timeout_factor * lately)

    async def _call(self, shared_x, request: WorkerRequest) -> np.ndarray:
        worker = request.worker
        start = self.last_share_s[worker] = time.monotonic()
        self.outstanding[worker] += request.num_tokens
        deadline = self.share_deadline_s(worker, request.num_tokens)
        try:
            try:
                out = await asyncio.wait_for(self._backend.forward(shared_x, request), deadline)
            except asyncio.TimeoutError:
                incarnation = self._backend.incarnation(worker)
                raise WorkerLost(worker, f"did not answer within {deadline:.1f}s (hung?)", incarnation,
                                 hung=True) from None
            per_token = (time.monotonic() - start) / max(request.num_tokens, 1)
            self._seconds_per_token[worker] = 0.8 * self._seconds_per_token.get(worker, per_token) + 0.2 * per_token
            return out
        finally:
            self.outstanding[worker] -= request.num_tokens
            if self._max_inflight is not None:
                async with self._room:
                    self._room.notify_all()

    async def _wait_for_room(self) -> None:
        """Hold the batch while a worker has its fill of tokens in hand (backpressure: the
        requests queue up in the batcher, where admission control sees them)."""
        if self._max_inflight is None:
            return
        async with self._room:
            await self._room.wait_for(lambda: self.outstanding.max(initial=0) < self._max_inflight)

