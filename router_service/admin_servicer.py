"""The admin gRPC service (`moe.admin.v1.AdminService`): load, placement, rebalance, status.

The servicer speaks protobuf on one side and `AdminOperations` (implemented by
`cluster.control.admin.ModelAdmin`) on the other. Domain errors become gRPC status codes here, in one
place (`AdminServicer._call`):

- an unknown model: NOT_FOUND, naming the models served;
- a load or a placement that does not fit the model (checked here on the protobuf, cheaply,
  before anything is built from it or sent on: a placement naming 2**31 - 1 logical experts must
  not allocate for them) and any other `ValueError` (a placement that does not fit the
  workers, a missing placement): INVALID_ARGUMENT with its message;
- anything else: INTERNAL with a generic message; the exception goes to the server log only.

The router never imports the control loop: the reports it converts are described here by small
Protocols, and placements travel as `cluster.placement.Placement` values.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Protocol, TypeVar

import grpc
import numpy as np

from cluster.placement import Placement
from protos import moe_admin_pb2 as admin_pb2
from protos import moe_admin_pb2_grpc as admin_pb2_grpc
from router_service.errors import InvalidRequest, UnknownModel

if TYPE_CHECKING:
    from cluster.model_spec import ModelSpec
    from cluster.planning.load_stats import LoadSnapshot

log = logging.getLogger(__name__)

RECENT_EVENTS = 20  # rebalance events a LoadResponse carries, oldest first
T = TypeVar("T")


# ---- what the servicer reads (structural: cluster.control.admin / cluster.control.controller satisfy them) ---


class MigrationReportView(Protocol):
    @property
    def from_version(self) -> int: ...
    @property
    def to_version(self) -> int: ...
    @property
    def bytes_moved(self) -> int: ...
    @property
    def duration_s(self) -> float: ...


class RebalanceEventView(Protocol):
    """at_s: on the `time.monotonic` clock; report: None when the controller skipped."""

    @property
    def at_s(self) -> float: ...
    @property
    def reason(self) -> str: ...
    @property
    def balancedness_before(self) -> float: ...
    @property
    def balancedness_planned(self) -> float: ...
    @property
    def moves(self) -> int: ...
    @property
    def report(self) -> MigrationReportView | None: ...


class LoadReportView(Protocol):
    """balancedness: `[L]`; workers: dicts with `index, node_id, replicas, calls, tokens,
    busy_s, outstanding_tokens, expert_tokens` (`{logical expert: tokens}`)."""

    @property
    def snapshot(self) -> LoadSnapshot: ...
    @property
    def balancedness(self) -> np.ndarray: ...
    @property
    def placement_version(self) -> int: ...
    @property
    def workers(self) -> list[dict]: ...
    @property
    def events(self) -> Sequence[RebalanceEventView]: ...


class PlanReportView(Protocol):
    """balancedness_*: `[L]`; added/removed: `(worker, logical expert)` pairs."""

    @property
    def current(self) -> Placement: ...
    @property
    def proposed(self) -> Placement: ...
    @property
    def moves(self) -> int: ...
    @property
    def balancedness_current(self) -> np.ndarray: ...
    @property
    def balancedness_proposed(self) -> np.ndarray: ...
    @property
    def added(self) -> list[tuple[int, int]]: ...
    @property
    def removed(self) -> list[tuple[int, int]]: ...


class AdminOperations(Protocol):
    """What the admin service needs of one model (implemented by `cluster.control.admin.ModelAdmin`).

    Every method raises `ValueError` with a message for the user when its input does not fit.
    """

    name: str
    spec: ModelSpec

    @property
    def placement(self) -> Placement: ...

    async def load_report(self) -> LoadReportView: ...

    def plan(self, load: np.ndarray | None = None) -> PlanReportView | Awaitable[PlanReportView]:
        """load: `[L, E]` or flat `[L*E]` tokens per logical expert; None: the recent window."""
        ...

    async def apply(self, placement: Placement) -> RebalanceEventView: ...

    async def rebalance(self, force: bool = False) -> RebalanceEventView: ...

    async def status(self, history: bool = False) -> dict:
        """What `moe-serve status` shows, JSON-ready (the control plane's status, with what the
        composition root adds: addresses, routers); with `history`, the per-expert load over time."""
        ...


# ---- conversions (the client uses the same two for placements) ---------------------------


def placement_to_pb(placement: Placement) -> admin_pb2.Placement:
    return admin_pb2.Placement(
        version=placement.version,
        num_logical_experts=placement.num_logical_experts,
        workers=[admin_pb2.WorkerReplicas(experts=list(row)) for row in placement.slots],
    )


def placement_from_pb(message: admin_pb2.Placement) -> Placement:
    """ValueError (from `Placement`'s own checks) when the rows do not make a placement."""
    return Placement.from_mapping(
        message.version, message.num_logical_experts, [list(w.experts) for w in message.workers]
    )


def event_to_pb(event: RebalanceEventView, current_version: int, now_s: float) -> admin_pb2.RebalanceEvent:
    """applied: the controller migrated (it has a report); versions of a skip are the current one."""
    report = event.report
    return admin_pb2.RebalanceEvent(
        applied=report is not None,
        reason=event.reason,
        from_version=report.from_version if report else current_version,
        to_version=report.to_version if report else current_version,
        moves=event.moves,
        balancedness_before=event.balancedness_before,
        balancedness_after=event.balancedness_planned,
        duration_s=report.duration_s if report else 0.0,
        bytes_moved=report.bytes_moved if report else 0,
        age_s=max(0.0, now_s - event.at_s),
    )


def _worker_to_pb(stats: dict) -> admin_pb2.WorkerLoad:
    return admin_pb2.WorkerLoad(
        index=int(stats["index"]),
        node_id=str(stats.get("node_id", "")),
        replicas=int(stats.get("replicas", 0)),
        calls=int(stats.get("calls", 0)),
        tokens=int(stats.get("tokens", 0)),
        busy_s=float(stats.get("busy_s", 0.0)),
        outstanding_tokens=int(stats.get("outstanding_tokens", 0)),
        replica_tokens={int(e): int(n) for e, n in stats.get("expert_tokens", {}).items()},
    )


def _flat(array: np.ndarray) -> list:
    return np.asarray(array).reshape(-1).tolist()


def check_load(values: Sequence[float], spec: ModelSpec) -> np.ndarray:
    """A PlanRequest's flat routed load as `[L, E]` float64 (the shared experts' follows from
    it), checked here before it is sent on (`ModelSpec.check_routed_load`); InvalidRequest
    when it has the wrong length or a value that is negative, NaN or infinite."""
    try:
        return spec.check_routed_load(values)
    except ValueError as err:
        raise InvalidRequest(str(err)) from None


def check_placement_shape(message: admin_pb2.Placement, spec: ModelSpec, current: Placement) -> None:
    """What can be checked on the protobuf before a `Placement` is built from it: the model's
    logical experts, the service's workers, rows no longer than a worker could use."""
    if message.num_logical_experts != spec.num_logical_experts:
        raise InvalidRequest(f"placement has {message.num_logical_experts} logical experts; the model has "
                      f"{spec.num_logical_experts} ({spec.describe_shape()})")
    if len(message.workers) != current.num_workers:
        raise InvalidRequest(f"placement has {len(message.workers)} workers; the service has {current.num_workers}")
    longest = max(spec.num_logical_experts, *(len(row) for row in current.slots))
    long_rows = [w for w, row in enumerate(message.workers) if len(row.experts) > longest]
    if long_rows:
        raise InvalidRequest(f"placement rows of workers {long_rows[:10]} have more than {longest} slots "
                      f"(the model's logical experts, or the longest row in service)")


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, admins: dict[str, AdminOperations], clock: Callable[[], float] = time.monotonic):
        self._admins = admins
        self._clock = clock

    def __repr__(self) -> str:
        return f"AdminServicer(models={sorted(self._admins)})"

    def _admin(self, name: str) -> AdminOperations:
        admin = self._admins.get(name)
        if admin is None:
            raise UnknownModel(f"unknown model '{name}'; this server serves {sorted(self._admins)}")
        return admin

    async def _call(self, context, model: str, what: str, operation: Callable[[AdminOperations], Awaitable[T]]) -> T:
        """Run `operation` on `model`'s admin; every error becomes a status here (and only here).

        `context.abort` raises, so it is called after the `try`, never inside it.
        """
        try:
            return await operation(self._admin(model))
        except UnknownModel as err:
            code, message = grpc.StatusCode.NOT_FOUND, str(err)
        except ValueError as err:  # InvalidRequest, and the admin's own checks of user input
            code, message = grpc.StatusCode.INVALID_ARGUMENT, str(err)
        except Exception:
            log.exception("admin %s failed for model %r", what, model)
            code, message = grpc.StatusCode.INTERNAL, f"{what} failed inside the server; see the server log"
        await context.abort(code, message)
        raise AssertionError("context.abort returned")  # grpc.aio's abort always raises

    async def GetLoad(self, request, context):
        async def get(admin: AdminOperations) -> admin_pb2.LoadResponse:
            report = await admin.load_report()
            now = self._clock()
            snapshot = report.snapshot
            return admin_pb2.LoadResponse(
                model=admin.name,
                layers=list(admin.spec.moe_layers),
                num_experts=admin.spec.num_experts,
                num_shared_experts=admin.spec.num_shared_experts,
                window_s=snapshot.window_s,
                window_tokens=_flat(snapshot.expert_tokens),
                tokens_per_s=_flat(snapshot.tokens_per_s),
                balancedness=_flat(report.balancedness),
                placement_version=report.placement_version,
                workers=[_worker_to_pb(w) for w in report.workers],
                recent_events=[
                    event_to_pb(e, report.placement_version, now) for e in list(report.events)[-RECENT_EVENTS:]
                ],
            )

        return await self._call(context, request.model, "GetLoad", get)

    async def GetPlacement(self, request, context):
        async def get(admin: AdminOperations) -> admin_pb2.PlacementResponse:
            return admin_pb2.PlacementResponse(model=admin.name, placement=placement_to_pb(admin.placement))

        return await self._call(context, request.model, "GetPlacement", get)

    async def PlanPlacement(self, request, context):
        async def plan(admin: AdminOperations) -> admin_pb2.PlanResponse:
            load = check_load(request.load, admin.spec) if len(request.load) else None
            report = admin.plan(load)
            if inspect.isawaitable(report):  # an admin in another process answers later
                report = await report
            changes = [admin_pb2.ReplicaChange(worker=w, expert=e, added=True) for w, e in report.added]
            changes += [admin_pb2.ReplicaChange(worker=w, expert=e, added=False) for w, e in report.removed]
            return admin_pb2.PlanResponse(
                current=placement_to_pb(report.current),
                proposed=placement_to_pb(report.proposed),
                moves=report.moves,
                balancedness_current=_flat(report.balancedness_current),
                balancedness_proposed=_flat(report.balancedness_proposed),
                changes=changes,
            )

        return await self._call(context, request.model, "PlanPlacement", plan)

    async def ApplyPlacement(self, request, context):
        async def apply(admin: AdminOperations) -> admin_pb2.RebalanceEvent:
            if not request.HasField("placement"):
                raise InvalidRequest("ApplyPlacement needs a placement; the request has none")
            check_placement_shape(request.placement, admin.spec, admin.placement)
            event = await admin.apply(placement_from_pb(request.placement))
            return event_to_pb(event, admin.placement.version, self._clock())

        return await self._call(context, request.model, "ApplyPlacement", apply)

    async def Rebalance(self, request, context):
        async def rebalance(admin: AdminOperations) -> admin_pb2.RebalanceEvent:
            event = await admin.rebalance(force=request.force)
            return event_to_pb(event, admin.placement.version, self._clock())

        return await self._call(context, request.model, "Rebalance", rebalance)

    async def GetStatus(self, request, context):
        async def get(admin: AdminOperations) -> admin_pb2.StatusResponse:
            status = await admin.status(history=request.history)
            # default=str: what `moe-serve status --json` does with a value JSON has no type for
            return admin_pb2.StatusResponse(model=admin.name, status_json=json.dumps(status, default=str))

        return await self._call(context, request.model, "GetStatus", get)
