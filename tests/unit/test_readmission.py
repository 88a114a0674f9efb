"""Re-admission cannot be lost: which workers a router may use is decided by one versioned source
(the hub's worker incarnations), so a late failure of incarnation N, arriving after Ray restarted
the worker and the control plane handed incarnation N+1 back, never takes N+1 down. The
interleaving that silently lost half a service's capacity, reproduced deterministically."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import ray

from cluster.placement import ExpertShare, Placement, WorkerRef
from router_service.dispatch import WorkerRequest
from router_service.errors import WorkerLost
from router_service.ray_backend import RayExpertBackend


class _Method:
    def __init__(self, calls: list):
        self._calls = calls

    def remote(self, *args):
        future = asyncio.get_running_loop().create_future()
        self._calls.append(future)
        return future


class FakeActor:
    """An actor handle whose `forward` calls stay pending until the test settles them."""

    def __init__(self):
        self.calls: list[asyncio.Future] = []
        self.forward = _Method(self.calls)
        self.skip = _Method([])


def _request(worker: int) -> WorkerRequest:
    share = ExpertShare(np.array([0]), np.array([0, 1]), np.array([0]), np.ones(1, dtype=np.float32))
    return WorkerRequest(worker, share, np.array([0]))


def test_a_late_failure_of_an_old_incarnation_does_not_take_the_new_one_down():
    async def scenario():
        old, new = FakeActor(), FakeActor()
        backend = RayExpertBackend([WorkerRef(FakeActor(), "w0"), WorkerRef(old, "n")])
        in_flight = asyncio.ensure_future(backend.forward(None, _request(1)))
        await asyncio.sleep(0)
        # Ray restarts worker 1; the supervisor reloads it and hands incarnation n+1 back ...
        backend.set_handles([WorkerRef(FakeActor(), "w0"), WorkerRef(new, "n+1")])
        # ... and only then does the share sent to incarnation n fail
        old.calls[0].set_exception(ray.exceptions.RayActorError())
        with pytest.raises(WorkerLost) as lost:
            await in_flight
        taken = backend.mark_lost(lost.value.worker, lost.value.incarnation)
        return lost.value, taken, backend.down

    lost, taken, down = asyncio.run(scenario())

    assert lost.incarnation == "n"
    assert taken is False and down == frozenset(), "incarnation n+1 stays routable"


def test_a_failure_of_the_incarnation_in_service_counts_it_down_until_handed_back():
    async def scenario():
        actor = FakeActor()
        backend = RayExpertBackend([WorkerRef(actor, "n")])
        call = asyncio.ensure_future(backend.forward(None, _request(0)))
        await asyncio.sleep(0)
        actor.calls[0].set_exception(ray.exceptions.RayActorError())
        with pytest.raises(WorkerLost) as lost:
            await call
        taken = backend.mark_lost(0, lost.value.incarnation)
        down_after_loss = backend.down
        with pytest.raises(WorkerLost, match="expert worker 0 is down"):
            await backend.forward(None, _request(0))
        backend.set_handles([WorkerRef(FakeActor(), "n+1")])
        return taken, down_after_loss, backend.down

    taken, down_after_loss, down_after_handback = asyncio.run(scenario())

    assert taken and down_after_loss == frozenset({0}) and down_after_handback == frozenset()


# ---- the supervisor: stale reports are ignored, a forgotten worker is handed back ---------------


class FakeHub:
    def __init__(self, placement: Placement, refs: list[WorkerRef]):
        self.current, self.refs, self.down = placement, refs, frozenset()
        self.told: list[str] = []

    async def mark_down(self, worker: int) -> None:
        self.down = self.down | {worker}
        self.told.append(f"down {worker}")

    async def mark_up(self, worker: int, ref=None) -> None:
        self.down = self.down - {worker}
        self.told.append(f"up {worker}")

    async def readmit(self) -> None:
        self.told.append("readmit")


class FakeFleet:
    def __init__(self, incarnations: list[str], computing_s: float = 0.0):
        self.incarnations = incarnations
        self.handles = [object() for _ in incarnations]
        self.computing_s = computing_s
        self.restarts: list[int] = []
        self.spares: list = []  # no warm spares here

    @property
    def refs(self) -> list[WorkerRef]:
        return [WorkerRef(h, i) for h, i in zip(self.handles, self.incarnations)]

    async def probe(self, timeout_s: float) -> list[dict]:
        return [{"incarnation": i, "computing_s": self.computing_s} for i in self.incarnations]

    def restart(self, worker: int) -> None:
        self.restarts.append(worker)

    def restarted(self, worker: int, info: dict) -> bool:
        return info["incarnation"] != self.incarnations[worker]

    def incarnation(self, worker: int) -> str:
        return self.incarnations[worker]


def _supervisor(reported: set, hung: frozenset = frozenset(), computing_s: float = 0.0):
    from cluster.control.supervisor import WorkerSupervisor

    fleet = FakeFleet(["a", "b2"], computing_s)
    hub = FakeHub(Placement.round_robin(4, 2, replicas=2), fleet.refs)  # losing one leaves every expert served

    async def lost() -> tuple[set, set]:
        out = set(reported), set(hung)
        reported.clear()
        return out

    supervisor = WorkerSupervisor(fleet, hub, rebalancer=None, capacity=lambda: [2, 2], load=lambda: np.zeros(4),
                                  reported_lost=lost, interval_s=1.0, probe_timeout_s=1.0, hung_after_s=5.0)
    supervisor.fleet = fleet
    return supervisor, hub


def test_a_report_about_an_old_incarnation_is_ignored():
    supervisor, hub = _supervisor({(1, "b1")})  # worker 1 is incarnation b2 now

    asyncio.run(supervisor.check())

    assert hub.told == [] and not supervisor.events


def test_a_worker_a_router_forgot_while_it_still_serves_is_handed_back():
    supervisor, hub = _supervisor({(1, "b2")})  # a router counted the incarnation in service down

    asyncio.run(supervisor.check())

    assert hub.told == ["readmit"]
    assert [(e.kind, e.workers) for e in supervisor.events] == [("readmitted", (1,))]


def test_a_worker_still_computing_the_share_that_missed_its_deadline_is_restarted():
    supervisor, hub = _supervisor(set(), hung=frozenset({(1, "b2")}), computing_s=12.0)

    asyncio.run(supervisor.check())

    assert supervisor.fleet.restarts == [1] and hub.told == ["down 1"]
    assert "hangs (a share's math has run 12.0s); restarting it" in supervisor.events[0].detail


def test_a_worker_that_was_only_slow_is_handed_back():
    supervisor, hub = _supervisor(set(), hung=frozenset({(1, "b2")}), computing_s=0.0)

    asyncio.run(supervisor.check())

    assert supervisor.fleet.restarts == [] and hub.told == ["readmit"]
