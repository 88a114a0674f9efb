"""The distributed MoE layer when workers are lost, over real expert workers in this process (no
Ray): lost shares are retried on other replicas and the output still equals the reference;
tokens without a live replica fail, alone, naming their experts; retries are bounded; a full
worker holds new batches back."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from cluster.app.reference import ReferenceMoE
from cluster.model_spec import ModelSpec
from cluster.placement import Placement
from router_service.dispatch import WorkerRequest
from router_service.errors import ExpertUnavailable, WorkerLost
from router_service.moe_layer import DistributedMoELayer
from router_service.placement_store import PlacementStore
from workers.random_model import RandomModel
from workers.worker import ExpertWorker

SPEC = ModelSpec(hidden_size=16, intermediate_size=32, num_experts=4, top_k=2, moe_layers=(0,), num_hidden_layers=1)
TOL = 1e-5


class InProcessBackend:
    """Expert workers in this process; `lose(w)` makes every call to worker w fail as a lost
    worker's would; `hold` makes calls wait until released."""

    def __init__(self, model: RandomModel, placement: Placement):
        self.workers = [ExpertWorker(w, model) for w in range(placement.num_workers)]
        for w, worker in enumerate(self.workers):
            worker.load([e for _, e in placement.experts_of(w)])
        self.lost: set[int] = set()
        self._down: set[int] = set()
        self.calls: list[int] = []
        self.hold: asyncio.Event | None = None
        self.poison: set[int] = set()  # batch rows that kill whichever worker computes them
        self.killed: list[int] = []
        self.hang: set[int] = set()  # workers whose calls never answer

    @property
    def down(self) -> frozenset[int]:
        return frozenset(self._down)

    def mark_lost(self, worker: int, incarnation: str | None) -> bool:
        self._down.add(worker)
        return True

    def incarnation(self, worker: int) -> str:
        return f"incarnation-{worker}"

    def share(self, x: np.ndarray) -> np.ndarray:
        return x

    async def forward(self, x: np.ndarray, request: WorkerRequest) -> np.ndarray:
        self.calls.append(request.worker)
        if self.hold is not None:
            await self.hold.wait()
        if request.worker in self.lost:
            raise WorkerLost(request.worker, "was lost (test)")
        if request.worker in self.hang:
            await asyncio.Event().wait()  # never answers
        if self.poison & set(request.share.token_idx.tolist()):
            self.lost.add(request.worker)  # the process died with the share
            self.killed.append(request.worker)
            raise WorkerLost(request.worker, "was lost (poisoned)")
        return self.workers[request.worker].forward(x, request.share)


@pytest.fixture(scope="module")
def model() -> RandomModel:
    return RandomModel(SPEC, seed=3)


def _layer(model: RandomModel, rows, **options) -> tuple[DistributedMoELayer, InProcessBackend]:
    placement = Placement.from_mapping(0, SPEC.num_logical_experts, rows)
    backend = InProcessBackend(model, placement)
    gates = {0: model.gate(0)}
    return DistributedMoELayer(SPEC, gates, PlacementStore(placement), backend, **options), backend


def _x(tokens: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((tokens, SPEC.hidden_size), dtype=np.float32))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_a_lost_workers_share_is_retried_on_the_other_replicas(model):
    layer, backend = _layer(model, [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1]])
    backend.lost.add(1)
    x = _x(64)

    out = asyncio.run(layer.forward(0, x))

    want, _ = ReferenceMoE(model).forward(0, x)
    assert out.failed is None and out.failure is None
    assert _rel(out.hidden, want) < TOL
    assert layer.retries >= 1 and backend.down == {1}
    assert 1 not in backend.calls[backend.calls.index(1) + 1:]  # never asked again once lost


def test_tokens_without_a_live_replica_fail_alone_and_name_their_experts(model):
    layer, backend = _layer(model, [[0, 1], [2, 3]])
    backend.lost.add(1)
    x = _x(64, seed=1)

    out = asyncio.run(layer.forward(0, x))

    ids = out.routing.topk_ids.numpy()
    hits_lost = np.isin(ids, [2, 3]).any(axis=1)
    assert hits_lost.any() and not hits_lost.all()
    np.testing.assert_array_equal(out.failed, hits_lost)
    assert isinstance(out.failure, WorkerLost) and "was lost while serving this request" in str(out.failure)
    want, _ = ReferenceMoE(model).forward(0, x)
    ok = ~hits_lost
    assert _rel(out.hidden[ok], want[ok]) < TOL  # the others are served right

    again = asyncio.run(layer.forward(0, x))  # now the router knows: nothing is sent to worker 1
    np.testing.assert_array_equal(again.failed, hits_lost)
    assert isinstance(again.failure, ExpertUnavailable)
    assert {e for _, e in again.failure.experts} <= {2, 3} and "has no live replica" in str(again.failure)
    assert backend.calls.count(1) == 1


def test_retries_are_bounded_when_every_replica_is_lost(model):
    layer, backend = _layer(model, [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3]], max_retries=1)
    backend.lost.update({0, 1, 2})

    out = asyncio.run(layer.forward(0, _x(32, seed=2)))

    assert out.failed.all()
    assert isinstance(out.failure, (WorkerLost, ExpertUnavailable))
    assert len(backend.calls) <= 2 * 3  # each share tried once, and once more elsewhere


def test_a_full_worker_holds_the_next_batch_back(model):
    async def scenario() -> None:
        layer, backend = _layer(model, [[0, 1], [2, 3]], max_worker_inflight_tokens=8)
        backend.hold = asyncio.Event()
        first = asyncio.create_task(layer.forward(0, _x(64, seed=3)))
        while not backend.calls:
            await asyncio.sleep(0)
        second = asyncio.create_task(layer.forward(0, _x(8, seed=4)))
        for _ in range(50):
            await asyncio.sleep(0)
        sent_while_full = len(backend.calls)
        backend.hold.set()
        await asyncio.gather(first, second)
        assert sent_while_full <= 2  # only the first batch's shares
        assert len(backend.calls) > sent_while_full

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_a_poison_request_fails_alone_and_the_requests_batched_with_it_are_served(model):
    """Three requests in one batch, the second carries a row that kills any worker computing it
    (its 2 experts may sit on 2 workers): the retry sends each request's rows to workers of
    their own, so only the second fails, and it kills at most top_k x (1 + max_retries)
    workers, as a lone poison request does."""
    layer, backend = _layer(model, [[0, 1, 2, 3]] * 6, max_retries=1)
    x = _x(30, seed=5)
    groups = np.repeat([0, 1, 2], 10)
    backend.poison = {14}  # in request 1

    out = asyncio.run(layer.forward(0, x, groups))

    assert out.failed is not None and out.failed[groups == 1].any(), "the poison request fails"
    assert not out.failed[groups != 1].any(), "the requests batched with it do not"
    want, _ = ReferenceMoE(model).forward(0, x)
    innocent = groups != 1
    assert _rel(out.hidden[innocent], want[innocent]) < TOL
    assert len(backend.killed) <= SPEC.top_k * 2 and isinstance(out.failure, WorkerLost)



def test_a_share_past_its_deadline_goes_to_another_replica_and_its_worker_counts_as_hung(model):
    layer, backend = _layer(model, [[0, 1, 2, 3], [0, 1, 2, 3]], share_timeout_s=0.2)
    backend.hang.add(1)
    x = _x(40, seed=6)

    async def timed():
        start = asyncio.get_running_loop().time()
        out = await layer.forward(0, x)
        return out, asyncio.get_running_loop().time() - start

    out, took_s = asyncio.run(timed())

    want, _ = ReferenceMoE(model).forward(0, x)
    assert out.failed is None and _rel(out.hidden, want) < TOL
    assert 0.2 <= took_s < 2.0
    assert layer.hung_workers == {(1, "incarnation-1")} and not layer.lost_workers
    assert backend.down == {1}


def test_the_deadline_follows_what_a_worker_took_lately(model):
    layer, _ = _layer(model, [[0, 1, 2, 3]], share_timeout_s=0.5, share_timeout_factor=10.0)

    assert layer.share_deadline_s(0, 1000) == 0.5, "no measure yet: the floor"
    asyncio.run(layer.forward(0, _x(64, seed=7)))

    assert 0.5 <= layer.share_deadline_s(0, 100) < layer.share_deadline_s(0, 10**7)
