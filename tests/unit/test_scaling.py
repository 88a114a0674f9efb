"""The control plane's moving parts with fakes in place of Ray: the placement hub and its router
links, migrations that add or remove workers make-before-break, the reconciler, the autoscaler
loop, the load board, and the slot budget."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from cluster.config import AutoscalingConfig, RebalanceConfig
from cluster.control.controller import Controller
from cluster.control.placement_hub import PlacementHub
from cluster.control.rebalancer import Rebalancer
from cluster.control.scaler import Autoscaler, Reconciler
from cluster.placement import EMPTY, Placement, WorkerRef, slots_per_worker
from cluster.planning.autoscaler import ScaleSnapshot
from cluster.planning.load_stats import GenerationLoad, LoadBoard, LoadSnapshot, RouterReport

N = 8  # logical experts: 1 layer x 8 experts
SLOTS = 6


class FakeLink:
    """A router: remembers what it was told; `fail` makes every call raise."""

    def __init__(self, name: str, fail: bool = False):
        self.name = name
        self.fail = fail
        self.versions: list[int] = []
        self.workers: list = []
        self.tokens = np.zeros((1, N), dtype=np.int64)

    async def publish(self, placement: Placement) -> None:
        self._check()
        if not self.versions or placement.version > self.versions[-1]:
            self.versions.append(placement.version)

    async def drained(self, version: int, timeout_s: float) -> None:
        self._check()

    async def set_workers(self, workers) -> None:
        self._check()
        self.workers = [getattr(w, "handle", w) for w in workers]  # the handles, as a router uses them

    async def take_report(self) -> RouterReport:
        self._check()
        report, self.tokens = RouterReport(self.name, self.tokens, (0.01,), 0.0, np.array([3, 4])), self.tokens * 0
        return report

    def _check(self) -> None:
        if self.fail:
            raise ConnectionError(f"{self.name} is gone")


class FakeMover:
    """Worker memory: which replicas each worker holds. Checks make-before-break: whenever the
    hub publishes, every replica of the published placement is loaded already."""

    def __init__(self, hub: PlacementHub):
        self.hub = hub
        self.hosted: dict[int, set[int]] = {w: {e for _, e in hub.current.experts_of(w)}
                                            for w in range(hub.current.num_workers)}
        self.log: list[tuple] = []

    async def load_replicas(self, worker: int, experts: list[int], copy_from: dict[int, int]) -> int:
        self.hosted.setdefault(worker, set()).update(experts)
        self.log.append(("load", worker, tuple(experts)))
        return 100 * len(experts)

    async def release_replicas(self, worker: int, experts: list[int]) -> None:
        current = self.hub.current
        for e in experts:
            assert (worker, e) not in current.replica_set, f"released {(worker, e)} still in v{current.version}"
        self.hosted[worker] -= set(experts)
        self.log.append(("release", worker, tuple(experts)))

    def check(self, placement: Placement) -> None:
        for w, e in placement.replica_set:
            assert e in self.hosted.get(w, set()), f"v{placement.version} uses {(w, e)} before it is loaded"


class CheckedHub(PlacementHub):
    mover: FakeMover | None = None

    async def publish(self, placement: Placement) -> None:
        if self.mover is not None:
            self.mover.check(placement)
        await super().publish(placement)


class FakeFleet:
    def __init__(self, workers: int, start_ok: bool = True):
        self.handles = [f"worker-{i}" for i in range(workers)]
        self.pending = 0
        self.start_ok = start_ok
        self.requested: list[int] = []
        self.removed: list[str] = []

    async def add_workers(self, count: int, timeout_s: float) -> list[dict]:
        if not self.start_ok:
            return []
        new = [f"worker-{len(self.handles) + i}" for i in range(count)]
        self.handles += new
        return [{"node_id": "node-b"} for _ in new]

    def remove_workers(self, count: int) -> None:
        self.removed += self.handles[-count:]
        del self.handles[-count:]

    def request_capacity(self, workers: int) -> None:
        self.requested.append(workers)

    def worker_nodes(self) -> list[str]:
        return ["node-a"] * len(self.handles)

    @property
    def refs(self) -> list[WorkerRef]:
        return [WorkerRef(h, f"{h}-incarnation") for h in self.handles]


HOT = np.array([[800.0, 100, 100, 100, 50, 50, 50, 50]])


def plane(workers: int = 2, start_ok: bool = True):
    """A hub with one router link, a real rebalancer and controller over fakes."""
    base = Placement.round_robin(N, workers, SLOTS)
    hub = CheckedHub(base)
    fleet = FakeFleet(workers, start_ok)
    mover = FakeMover(hub)
    hub.mover = mover
    link = FakeLink("router-a")
    rebalancer = Rebalancer(hub, mover, max_loads_per_step=3)
    snapshot = LoadSnapshot(HOT.astype(np.int64), HOT / 10, 10.0, int(HOT.sum()))
    controller = Controller(hub, lambda now: snapshot, rebalancer, [SLOTS] * workers,
                            RebalanceConfig(min_window_tokens=0), worker_nodes=["node-a"] * workers)
    reconciler = Reconciler(fleet, hub, controller, rebalancer, SLOTS, start_timeout_s=5)

    async def setup():
        await hub.set_workers(fleet.handles)
        await hub.attach(link)

    asyncio.run(setup())
    return hub, fleet, mover, link, controller, reconciler


# ---- the hub ---------------------------------------------------------------------------------


def test_hub_fans_out_and_detaches_a_failed_router():
    async def scenario():
        hub = PlacementHub(Placement.round_robin(N, 2, SLOTS))
        await hub.set_workers(["w0", "w1"])
        good, bad = FakeLink("good"), FakeLink("bad")
        await hub.attach(good)
        await hub.attach(bad)
        assert good.versions == [0] and good.workers == ["w0", "w1"]  # brought up to date on attach
        bad.fail = True
        await hub.publish(Placement.round_robin(N, 2, SLOTS).resized(2, 0, 1))
        assert good.versions == [0, 1]
        assert hub.routers == ["good"]  # the failed one is detached; the migration went on

    asyncio.run(scenario())


def test_hub_refuses_a_placement_naming_unknown_workers():
    async def scenario():
        hub = PlacementHub(Placement.round_robin(N, 2, SLOTS))
        await hub.set_workers(["w0", "w1"])
        with pytest.raises(ValueError, match="names 3 workers; 2 are known"):
            await hub.publish(hub.current.resized(3, SLOTS, 1))

    asyncio.run(scenario())


def test_a_drain_that_times_out_stops_the_migration():
    class Stuck(FakeLink):
        async def drained(self, version, timeout_s):
            await asyncio.sleep(10)

    async def scenario():
        hub = PlacementHub(Placement.round_robin(N, 2, SLOTS), link_timeout_s=0.05)
        await hub.attach(Stuck("stuck"))
        with pytest.raises(TimeoutError):
            await hub.drained(1, timeout_s=0.01)
        assert hub.routers == ["stuck"]  # still attached: it is alive, only slow

    asyncio.run(scenario())


def test_reports_are_collected_from_every_router():
    async def scenario():
        hub = PlacementHub(Placement.round_robin(N, 2, SLOTS))
        a, b = FakeLink("a"), FakeLink("b")
        a.tokens[0, 0], b.tokens[0, 1] = 5, 7
        for link in (a, b):
            await hub.attach(link)
        reports = await hub.take_reports()
        assert sorted(r.router_id for r in reports) == ["a", "b"]
        assert sum(r.expert_tokens for r in reports).tolist() == [[5, 7, 0, 0, 0, 0, 0, 0]]

    asyncio.run(scenario())


# ---- migrations that change the worker count ----------------------------------------------------


def test_scale_out_adds_a_worker_then_moves_replicas_onto_it():
    hub, fleet, mover, link, controller, reconciler = plane(workers=2)

    event = asyncio.run(reconciler.scale_to(3, "load above target"))

    assert (event.action, event.from_workers, event.to_workers) == ("out", 2, 3)
    assert fleet.requested == [3]  # asked Ray for room for 3 workers
    assert link.workers == fleet.handles and len(link.workers) == 3
    assert hub.current.num_workers == 3 and controller.capacity == [SLOTS] * 3
    assert hub.current.experts_of(2), "the new worker serves nothing"
    assert event.migration is not None and event.migration.loads > 0
    assert link.versions == sorted(link.versions) and link.versions[-1] == hub.current.version
    assert (hub.current.replica_counts >= 1).all()


def test_scale_out_without_a_node_keeps_the_service_as_it_was():
    hub, fleet, mover, link, controller, reconciler = plane(workers=2, start_ok=False)
    before = hub.current

    event = asyncio.run(reconciler.scale_to(4, "load above target"))

    assert event.action == "failed" and "no node for a new worker within 5s" in event.reason
    assert fleet.requested == [4, 2]  # the request is taken back
    assert hub.current == before and reconciler.events[-1] == event


def test_scale_in_moves_replicas_away_before_the_worker_goes():
    hub, fleet, mover, link, controller, reconciler = plane(workers=3)

    event = asyncio.run(reconciler.scale_to(2, "load below floor"))

    assert (event.action, event.to_workers) == ("in", 2)
    assert fleet.removed == ["worker-2"] and fleet.requested == [2]
    assert hub.current.num_workers == 2 and link.workers == ["worker-0", "worker-1"]
    assert controller.capacity == [SLOTS, SLOTS]
    assert (hub.current.replica_counts >= 1).all()
    # the leaving worker's replicas were released only once placements without them were in service
    assert any(op == "release" and w == 2 for op, w, _ in mover.log)
    assert not mover.hosted[2]


def test_scale_in_below_what_the_slots_hold_fails_cleanly():
    hub, fleet, mover, link, controller, reconciler = plane(workers=2)
    before = hub.current

    event = asyncio.run(reconciler.scale_to(1, "by hand"))  # 8 experts do not fit 6 slots

    assert event.action == "failed" and "capacity too small" in event.reason
    assert hub.current == before and fleet.removed == []


# ---- the autoscaler loop ---------------------------------------------------------------------


def test_autoscaler_acts_in_the_background_and_holds_while_scaling():
    hub, fleet, mover, link, controller, reconciler = plane(workers=2)
    config = AutoscalingConfig(enabled=True, target_tokens_per_s_per_worker=100, upscale_delay_s=0)
    looks = []

    async def observe() -> ScaleSnapshot:
        looks.append(1)
        return ScaleSnapshot(tokens_per_s=500, serving_workers=len(fleet.handles))

    async def scenario():
        scaler = Autoscaler(reconciler, fleet, observe, config, bounds=(1, 3), clock=lambda: 100.0)
        first = await scaler.check()
        assert (first.action, first.target_workers) == ("out", 3)
        second = await scaler.check()  # the scale-out is still running
        assert second.action == "hold" and "placement change is running" in second.reason
        await scaler._scaling
        assert len(fleet.handles) == 3
        third = await scaler.check()
        assert third.action == "hold" and "at workers.max_workers (3)" in third.reason
        again = await scaler.check()
        assert again.action == "hold"
        # each change of mind is kept once, with its reason; the repeated hold is not
        assert [d.action for _, d in scaler.decisions] == ["out", "hold", "hold"]
        assert "at workers.max_workers" in scaler.decisions[-1][1].reason
        await scaler.stop()

    asyncio.run(scenario())
    assert reconciler.events[-1].action == "out"


def test_scaling_by_hand_stays_within_bounds_and_pauses_the_autoscaler():
    hub, fleet, mover, link, controller, reconciler = plane(workers=2)

    async def observe() -> ScaleSnapshot:
        raise AssertionError("a manual scale does not look at the load")

    async def scenario():
        scaler = Autoscaler(reconciler, fleet, observe, AutoscalingConfig(enabled=True), bounds=(2, 3))
        with pytest.raises(ValueError, match="cannot scale to 5 workers: workers.min_workers is 2 and workers.max_workers is 3"):
            await scaler.scale(5)
        event = await scaler.scale(3)
        assert event.action == "out" and scaler.mode == "manual (3 workers)"
        scaler.resume()
        assert scaler.mode == "auto"

    asyncio.run(scenario())


# ---- the load board and the slot budget -----------------------------------------------------


def test_load_board_merges_router_reports():
    board = LoadBoard(1, 4, window_s=10.0, started_s=100.0)
    board.report(RouterReport("a", np.array([[10, 0, 0, 0]]), (0.010, 0.020), 0.0, np.array([5, 0])), now_s=101.0)
    board.report(RouterReport("b", np.array([[0, 30, 0, 0]]), (0.030,) * 8, 0.0, np.array([1, 2])), now_s=102.0)
    snap = board.snapshot(105.0)
    np.testing.assert_array_equal(snap.expert_tokens, [[10, 30, 0, 0]])
    np.testing.assert_allclose(snap.tokens_per_s, [[2.0, 6.0, 0, 0]])  # over the 5 s since the start
    assert board.queue_delay_ms(105.0) == pytest.approx(30.0)  # p90 of 2 + 8 samples
    np.testing.assert_array_equal(board.outstanding_tokens(2), [6, 2])
    # a request still queued for 0.5 s at router b is longer than every finished one
    board.report(RouterReport("b", np.zeros((1, 4), dtype=np.int64), (), 0.5, np.array([0, 0])), now_s=106.0)
    assert board.queue_delay_ms(106.0) == pytest.approx(500.0)
    # outside the window both are forgotten
    assert board.queue_delay_ms(200.0) == 0.0 and board.snapshot(200.0).total_tokens == 0


def test_load_board_counts_what_was_generated_since_a_moment():
    board = LoadBoard(1, 4, window_s=10.0, started_s=100.0)
    idle = np.zeros((1, 4), dtype=np.int64)
    for router, at, tokens, firsts in (("a", 101.0, 7, 2), ("b", 103.0, 5, 1), ("a", 104.0, 9, 0)):
        board.report(RouterReport(router, idle, generation=GenerationLoad(ttft_s=(0.01,) * firsts,
                                                                          output_tokens=tokens)), now_s=at)
    board.report(RouterReport("c", idle), now_s=104.5)  # a router that does not generate
    assert board.generated_since(100.0) == (21, 3)
    assert board.generated_since(103.0) == (14, 1)  # reports taken at or after the moment
    assert board.generated_since(105.0) == (0, 0)


@pytest.mark.parametrize(
    ("experts", "workers", "configured", "replicas", "slots"),
    [
        pytest.param(16, 2, None, 1, 10, id="default-8-plus-25pct"),
        pytest.param(16, 1, None, 1, 20, id="fewest-workers-decide"),
        pytest.param(16, 2, None, 2, 20, id="two-replicas-each"),
        pytest.param(16, 2, 9, 1, 9, id="configured"),
    ],
)
def test_slots_per_worker(experts, workers, configured, replicas, slots):
    assert slots_per_worker(experts, workers, configured, replicas) == slots


def test_too_few_slots_name_the_keys():
    with pytest.raises(ValueError, match=r"workers.slots_per_worker \(7\) is too small: 16 logical experts x "
                                         r"rebalance.min_replicas \(1\) on workers.min_workers \(2\) workers need at least 8"):
        slots_per_worker(16, 2, 7)


def test_resized_rows_are_empty():
    grown = Placement.round_robin(N, 2, SLOTS).resized(3, 2, 1)
    assert grown.slots[2] == (EMPTY, EMPTY)
