"""The admin servicer alone: a real `ModelAdmin` over a fake controller, a fake gRPC context.

Checks the protobuf conversions (placement both ways, load report, plan, events) and that every
kind of error becomes the status code the API promises, with a message the user can act on and
nothing of the server's internals.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from collections import deque
from pathlib import Path

import grpc
import numpy as np
import pytest

from cluster.control.admin import ModelAdmin
from cluster.control.controller import RebalanceEvent
from cluster.control.rebalancer import MigrationReport
from cluster.model_spec import ModelSpec
from cluster.placement import EMPTY, Placement
from cluster.planning.load_stats import LoadSnapshot
from cluster.planning.planner import layer_balancedness
from protos import moe_admin_pb2 as admin_pb2
from router_service.admin_servicer import AdminServicer, placement_from_pb, placement_to_pb
from router_service.placement_store import PlacementStore
from tests.unit.grpc_context import Aborted, FakeContext

MODEL = "tiny"
SPEC = ModelSpec(hidden_size=8, intermediate_size=8, num_experts=4, top_k=2, moe_layers=(1, 3), num_hidden_layers=4)
N = SPEC.num_moe_layers * SPEC.num_experts  # 8 logical experts
SLOTS = 6  # per worker, 2 workers: 4 spare slots
NOW_S = 1000.0
# [L, E] tokens in the window; layer 0 expert 0 is hot
TOKENS = np.array([[40, 10, 10, 20], [5, 5, 5, 5]], dtype=np.int64)


class FakeController:
    """Plans a fixed proposal; `apply` publishes the target in one step."""

    def __init__(self, store: PlacementStore, proposed: Placement):
        self.capacity = [SLOTS, SLOTS]
        self.events: deque[RebalanceEvent] = deque()
        self.planned_for: list[np.ndarray] = []
        self._store = store
        self._proposed = proposed

    def plan(self, load=None) -> Placement:
        self.planned_for.append(np.asarray(load))
        return Placement(self._store.current.version + 1, N, self._proposed.slots)

    async def apply(self, target: Placement, reason: str = "applied on demand") -> RebalanceEvent:
        before = self._store.current.version
        self._store.publish(target)
        report = MigrationReport(before, target.version, 1, 1, 0, 3 * 2**20, 0.25)
        event = RebalanceEvent(NOW_S - 2.0, reason, 0.5, 0.9, 1, report)
        self.events.append(event)
        return event

    async def check(self, force: bool = False, explain: bool = False) -> RebalanceEvent:
        if force:
            return await self.apply(self.plan(), "on demand: forced")
        return RebalanceEvent(NOW_S - 1.5, "balanced (0.900 >= threshold 0.85)", 0.9, 0.9, 0, None)


def _stats() -> list[dict]:
    return [
        {"index": 0, "node_id": "node-a", "replicas": 4, "calls": 3, "tokens": 70, "busy_s": 0.25,
         "expert_tokens": {0: 40, 2: 10, 4: 5, 6: 5}},
        {"index": 1, "node_id": "node-a", "replicas": 4, "calls": 3, "tokens": 40, "busy_s": 0.125,
         "expert_tokens": {1: 10, 3: 20, 5: 5, 7: 5}},
    ]


@pytest.fixture
def store() -> PlacementStore:
    return PlacementStore(Placement.round_robin(N, 2, SLOTS))


@pytest.fixture
def controller(store) -> FakeController:
    proposed = [list(row) for row in store.current.slots]
    proposed[1][4] = 0  # a second replica of the hot expert, on worker 1
    return FakeController(store, Placement.from_mapping(0, N, proposed))


@pytest.fixture
def servicer(store, controller) -> AdminServicer:
    snapshot = LoadSnapshot(TOKENS, TOKENS / 10.0, 10.0, int(TOKENS.sum()))

    async def worker_stats() -> list[dict]:
        return _stats()

    admin = ModelAdmin(MODEL, SPEC, store, controller, lambda now_s: snapshot, worker_stats,
                       lambda: np.array([7, 0]), clock=lambda: NOW_S)
    admin.status_source = fake_status
    return AdminServicer({MODEL: admin}, clock=lambda: NOW_S)


async def fake_status(history: bool) -> dict:
    """A status as the control plane gives it (abridged)."""
    return {"model": MODEL, "placement_version": 0, "workers": [{"index": 0, "tokens_per_s": 1.5}],
            "balancedness": [0.5, 1.0], **({"history": {"t_s": [1.0], "versions": [0]}} if history else {})}


def call(servicer: AdminServicer, method: str, request):
    return asyncio.run(getattr(servicer, method)(request, FakeContext()))


def rejected(servicer: AdminServicer, method: str, request) -> Aborted:
    with pytest.raises(Aborted) as info:
        call(servicer, method, request)
    return info.value


def apply_request(slots, num_logical_experts: int = N, version: int = 0) -> admin_pb2.ApplyRequest:
    message = admin_pb2.Placement(
        version=version, num_logical_experts=num_logical_experts,
        workers=[admin_pb2.WorkerReplicas(experts=row) for row in slots],
    )
    return admin_pb2.ApplyRequest(model=MODEL, placement=message)


# ---- conversions ------------------------------------------------------------------------


@pytest.mark.parametrize("placement", [
    pytest.param(Placement.round_robin(N, 2, SLOTS), id="empty-slots"),
    pytest.param(Placement.from_mapping(7, N, [[0, 2, 4, 6, 1], [1, 3, 5, 7]]), id="ragged-rows"),
    pytest.param(Placement.round_robin(1, 1), id="one-expert"),
])
def test_placement_round_trips_through_protobuf(placement):
    message = placement_to_pb(placement)
    assert [list(w.experts) for w in message.workers] == [list(r) for r in placement.slots]
    assert placement_from_pb(admin_pb2.Placement.FromString(message.SerializeToString())) == placement


def test_get_load_converts_the_report(servicer, controller):
    controller.events.append(RebalanceEvent(NOW_S - 12.5, "skipped: plan gains 0.010 < min_gain 0.03", 0.6, 0.61, 2, None))
    response = call(servicer, "GetLoad", admin_pb2.LoadRequest(model=MODEL))

    assert response.model == MODEL
    assert list(response.layers) == [1, 3] and response.num_experts == 4
    assert response.window_s == 10.0
    assert list(response.window_tokens) == TOKENS.reshape(-1).tolist()
    np.testing.assert_allclose(response.tokens_per_s, TOKENS.reshape(-1) / 10.0)
    want = layer_balancedness(Placement.round_robin(N, 2, SLOTS), TOKENS)
    np.testing.assert_allclose(response.balancedness, want)
    assert response.placement_version == 0
    w0 = response.workers[0]
    assert (w0.index, w0.node_id, w0.replicas, w0.calls, w0.tokens, w0.busy_s, w0.outstanding_tokens) == (
        0, "node-a", 4, 3, 70, 0.25, 7)
    assert dict(w0.replica_tokens) == {0: 40, 2: 10, 4: 5, 6: 5}
    assert response.workers[1].outstanding_tokens == 0
    (event,) = response.recent_events
    assert not event.applied and event.reason.startswith("skipped")
    assert (event.from_version, event.to_version, event.moves) == (0, 0, 2)
    assert event.age_s == pytest.approx(12.5)
    assert (event.bytes_moved, event.duration_s) == (0, 0.0)


def test_get_load_sends_only_recent_events(servicer, controller):
    for i in range(50):
        controller.events.append(RebalanceEvent(float(i), f"event {i}", 1.0, 1.0, 0, None))
    events = call(servicer, "GetLoad", admin_pb2.LoadRequest(model=MODEL)).recent_events
    assert [e.reason for e in events] == [f"event {i}" for i in range(30, 50)]


def test_get_placement_is_the_one_in_service(servicer, store):
    response = call(servicer, "GetPlacement", admin_pb2.PlacementRequest(model=MODEL))
    assert response.model == MODEL
    assert placement_from_pb(response.placement) == store.current


def test_plan_for_a_given_load_is_a_dry_run(servicer, store, controller):
    load = np.array([[100, 0, 0, 0], [1, 1, 1, 1]], dtype=np.float64)
    response = call(servicer, "PlanPlacement", admin_pb2.PlanRequest(model=MODEL, load=load.reshape(-1).tolist()))

    np.testing.assert_array_equal(controller.planned_for[-1], load)
    assert store.current.version == 0
    assert placement_from_pb(response.current) == store.current
    assert list(response.proposed.workers[1].experts)[4] == 0
    assert response.moves == 1
    assert [(c.worker, c.expert, c.added) for c in response.changes] == [(1, 0, True)]
    np.testing.assert_allclose(response.balancedness_current, layer_balancedness(store.current, load))
    assert response.balancedness_proposed[0] > response.balancedness_current[0]


def test_plan_without_load_uses_the_window(servicer, controller):
    call(servicer, "PlanPlacement", admin_pb2.PlanRequest(model=MODEL))
    np.testing.assert_array_equal(controller.planned_for[-1], TOKENS)


def test_apply_moves_to_the_placement_and_reports(servicer, store):
    slots = [list(r) for r in store.current.slots]
    slots[0][4] = 1
    event = call(servicer, "ApplyPlacement", apply_request(slots, version=42))

    assert event.applied and event.reason == "applied on demand"
    assert (event.from_version, event.to_version) == (0, 1)  # the server numbers it, not the file
    assert store.current.version == 1 and store.current.slots[0][4] == 1
    assert event.bytes_moved == 3 * 2**20 and event.duration_s == 0.25
    assert event.age_s == pytest.approx(2.0)
    assert (event.balancedness_before, event.balancedness_after) == (0.5, 0.9)


def test_rebalance_that_skips_says_why(servicer, store):
    event = call(servicer, "Rebalance", admin_pb2.RebalanceRequest(model=MODEL))
    assert not event.applied and event.reason.startswith("balanced")
    assert (event.from_version, event.to_version) == (0, 0)
    assert store.current.version == 0


def test_forced_rebalance_applies(servicer, store):
    event = call(servicer, "Rebalance", admin_pb2.RebalanceRequest(model=MODEL, force=True))
    assert event.applied and event.reason.startswith("on demand")
    assert (event.from_version, event.to_version) == (0, 1) == (0, store.current.version)


def test_get_status_is_the_status_as_json(servicer):
    response = call(servicer, "GetStatus", admin_pb2.StatusRequest(model=MODEL))
    assert response.model == MODEL
    status = json.loads(response.status_json)
    assert status["workers"] == [{"index": 0, "tokens_per_s": 1.5}] and status["balancedness"] == [0.5, 1.0]
    assert "history" not in status, "the load history only when asked for (it can be large)"
    with_history = json.loads(call(servicer, "GetStatus", admin_pb2.StatusRequest(model=MODEL, history=True)).status_json)
    assert with_history["history"] == {"t_s": [1.0], "versions": [0]}


def test_a_model_admin_without_a_status_source_is_a_wiring_mistake(store, controller):
    admin = ModelAdmin(MODEL, SPEC, store, controller, lambda now_s: None, None, lambda: np.zeros(2))
    with pytest.raises(RuntimeError, match="no status source"):
        asyncio.run(admin.status())


# ---- errors -------------------------------------------------------------------------------

ALL_CALLS = [
    ("GetLoad", admin_pb2.LoadRequest),
    ("GetPlacement", admin_pb2.PlacementRequest),
    ("PlanPlacement", admin_pb2.PlanRequest),
    ("ApplyPlacement", admin_pb2.ApplyRequest),
    ("Rebalance", admin_pb2.RebalanceRequest),
    ("GetStatus", admin_pb2.StatusRequest),
]


@pytest.mark.parametrize("method, request_type", ALL_CALLS, ids=[m for m, _ in ALL_CALLS])
def test_unknown_model_is_not_found_naming_the_served_ones(servicer, method, request_type):
    err = rejected(servicer, method, request_type(model="nope"))
    assert err.code == grpc.StatusCode.NOT_FOUND
    assert "'nope'" in err.details and "['tiny']" in err.details


def _round_robin_rows() -> list[list[int]]:
    return [list(r) for r in Placement.round_robin(N, 2, SLOTS).slots]


def _with(rows: list[list[int]], worker: int, slot: int, expert: int) -> list[list[int]]:
    rows[worker][slot] = expert
    return rows


BAD_PLACEMENTS = [
    pytest.param(Placement.round_robin(6, 2, SLOTS).slots, 6, "has 6 logical experts", id="wrong-expert-count"),
    pytest.param(Placement.round_robin(N, 3, SLOTS).slots, N, "3 workers", id="wrong-worker-count"),
    pytest.param([list(range(7)), [7]], N, "more replicas than their 6 slots", id="over-capacity"),
    pytest.param(_with(_round_robin_rows(), 0, 0, EMPTY), N, "have no replica", id="expert-without-replica"),
    pytest.param(_with(_round_robin_rows(), 0, 4, 2), N, "more than once", id="duplicate-in-a-worker"),
    pytest.param(_with(_round_robin_rows(), 1, 4, N), N, "outside 0..7", id="expert-id-out-of-range"),
    pytest.param(_with(_round_robin_rows(), 1, 4, -2), N, "outside 0..7", id="negative-expert-id"),
    pytest.param([], N, "placement has 0 workers; the service has 2", id="no-workers"),
    pytest.param(_round_robin_rows(), 0, "placement has 0 logical experts; the model has 8 (2 layers x 4 experts)",
                 id="zero-experts"),
    pytest.param(_round_robin_rows(), 2**31 - 1, "placement has 2147483647 logical experts", id="huge-expert-count"),
    pytest.param([list(range(N)) + [EMPTY] * 10**6, [0]], N, "rows of workers [0] have more than 8 slots",
                 id="row-longer-than-any-worker"),
]


@pytest.mark.parametrize("slots, num_logical_experts, message", BAD_PLACEMENTS)
def test_bad_placement_is_invalid_argument_with_the_reason(servicer, store, slots, num_logical_experts, message):
    err = rejected(servicer, "ApplyPlacement", apply_request(slots, num_logical_experts))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.details
    assert store.current.version == 0


def test_apply_without_a_placement_is_invalid_argument(servicer):
    err = rejected(servicer, "ApplyPlacement", admin_pb2.ApplyRequest(model=MODEL))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "needs a placement" in err.details


@pytest.mark.parametrize("load, message", [
    pytest.param([1.0] * 7, "2 x 4 = 8 values", id="too-short"),
    pytest.param([1.0] * 16, "2 x 4 = 8 values", id="too-long"),
    pytest.param([1.0] * 7 + [-1.0], "finite and >= 0", id="negative"),
    pytest.param([1.0] * 7 + [float("nan")], "finite and >= 0", id="nan"),
    pytest.param([1.0] * 5 + [float("inf")] + [1.0] * 2, "the first at layer index 1, expert 1: inf", id="inf"),
    pytest.param([1.0] * 10**6, "got 1000000", id="far-too-long"),
])
def test_plan_with_a_bad_load_is_invalid_argument(servicer, controller, load, message):
    err = rejected(servicer, "PlanPlacement", admin_pb2.PlanRequest(model=MODEL, load=load))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.details
    assert not controller.planned_for


class BrokenAdmin:
    """Every operation fails the way a bug or a dead worker would."""

    name = MODEL
    spec = SPEC

    @property
    def placement(self) -> Placement:
        raise KeyError("/secret/internal/path")

    async def load_report(self):
        raise RuntimeError("/secret/internal/path")

    def plan(self, load=None):
        raise RuntimeError("/secret/internal/path")

    async def apply(self, placement):
        raise ConnectionError("/secret/internal/path")

    async def rebalance(self, force=False):
        raise RuntimeError("/secret/internal/path")

    async def status(self, history=False):
        raise RuntimeError("/secret/internal/path")


@pytest.mark.parametrize("method, request_type", ALL_CALLS, ids=[m for m, _ in ALL_CALLS])
def test_unexpected_failure_is_internal_and_leaks_nothing(method, request_type, caplog):
    servicer = AdminServicer({MODEL: BrokenAdmin()})
    request = request_type(model=MODEL)
    if method == "ApplyPlacement":
        request = apply_request(_round_robin_rows())
    with caplog.at_level(logging.ERROR, logger="router_service.admin_servicer"):
        err = rejected(servicer, method, request)
    assert err.code == grpc.StatusCode.INTERNAL
    assert method in err.details and "server log" in err.details
    assert "secret" not in err.details
    assert any("secret" in (r.exc_text or "") for r in caplog.records), "the exception must reach the log"


def test_router_side_never_imports_the_control_loop_or_workers():
    code = (
        "import sys, router_service.admin_servicer, router_service.admin_client\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('workers', 'ray') or m in "
        "('cluster.control.controller', 'cluster.control.admin', 'cluster.control.rebalancer'))\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stdout + done.stderr
