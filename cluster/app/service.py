"""`moe-serve deploy`: the service as Ray actors that outlive the terminal that started them.

- `ServiceController` (`<model>-controller`, detached): owns the control plane, so the workers
  (`<model>-worker-NN`) are its children and live as long as it does, whatever happens to the
  command line or the router. It creates the router actor and restarts its serving when the
  router actor comes back after a crash.
- `RouterActor` (`<model>-router`, owned by the controller, restarted by Ray): the gRPC server.
  On start it opens the gate weights, asks the controller for the placement and the worker
  handles, and attaches under its own name, so a restarted router replaces its old link and
  creates nothing twice. Admin calls go through to the controller.

This module is the composition root for the actor layout, as `cluster.app.launcher` is for one
process; both build the same `ControlPlane` and `RouterSide`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cluster.app.launcher import RouterSide, attach_text_model, build_router
from cluster.config import ServeConfig, validate_config
from cluster.control.control_plane import ControlPlane, start_control_plane, weights_for
from cluster.placement import Placement

log = logging.getLogger(__name__)

ROUTER_WATCH_S = 1.0  # how often the controller checks that its router serves


def controller_name(model: str) -> str:
    return f"{model}-controller"


def router_name(model: str) -> str:
    return f"{model}-router"


class ActorRouterLink:
    """The control plane's link to a router actor."""

    def __init__(self, name: str, handle: ray.actor.ActorHandle):
        self.name = name
        self._handle = handle

    async def publish(self, placement: Placement) -> None:
        await self._handle.publish.remote(placement)

    async def drained(self, version: int, timeout_s: float) -> None:
        await self._handle.drained.remote(version, timeout_s)

    async def set_workers(self, handles: Sequence[Any]) -> None:
        await self._handle.set_workers.remote(list(handles))

    async def take_report(self):
        return await self._handle.take_report.remote()


class ServiceController:
    """The detached owner of one model's control plane (workers, placement, load, loops)."""

    def __init__(self, config: dict):
        self.config: ServeConfig = validate_config(config, source="deployment")
        self.plane: ControlPlane | None = None
        self._progress = (0, 0)
        self._router: ray.actor.ActorHandle | None = None
        self._address: str | None = None
        self._watch: asyncio.Task | None = None
        self._started_s = time.time()

    def __repr__(self) -> str:
        return f"ServiceController(model={self.config.model.name!r}, router={self._address})"

    async def start(self) -> str:
        """Start the workers, load them, start the router; returns the router's address."""
        if self.plane is None:
            self.plane = await start_control_plane(self.config, self._on_progress)
            self._router = self._router_actor()
        self._address = await self._router.start.remote()
        self.plane.start_loops()
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._watch_router(), name="router-watch")
        return self._address

    def _on_progress(self, done: int, total: int) -> None:
        self._progress = (done, total)

    def progress(self) -> tuple[int, int]:
        """(experts loaded, experts to load) while `start` runs."""
        return self._progress

    def _router_actor(self) -> ray.actor.ActorHandle:
        here = ray.get_runtime_context().get_node_id()
        return ray.remote(RouterActor).options(
            name=router_name(self.config.model.name),
            namespace=self.config.ray.namespace,
            num_cpus=self.config.router.num_cpus,
            max_restarts=-1,
            max_concurrency=1000,
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True),
        ).remote(self.config.model_dump(), controller_name(self.config.model.name))

    async def _watch_router(self) -> None:
        """A router actor that Ray restarted comes back empty: start it serving again."""
        while True:
            await asyncio.sleep(ROUTER_WATCH_S)
            try:
                if await self._router.address.remote() is None:
                    log.warning("router actor restarted; starting it again")
                    self._address = await self._router.start.remote()
            except ray.exceptions.RayActorError:
                pass  # restarting: the next look retries
            except Exception:
                log.exception("router watch failed")

    # ---- what the router asks ---------------------------------------------------------------

    def router_bootstrap(self) -> tuple[Placement, list]:
        return self.plane.placement, self.plane.hub.workers

    async def attach_router(self, name: str) -> None:
        await self.plane.attach(ActorRouterLink(name, ray.get_actor(name, namespace=self.config.ray.namespace)))

    async def admin_call(self, operation: str, *args) -> tuple[str, Any, float]:
        """An admin operation for a router: ("ok", result, now_s) or ("invalid", message, now_s).
        Only `ValueError`s (the user's mistakes) travel back as text; the rest is logged here."""
        admin = self.plane.admin
        try:
            if operation == "load_report":
                result = await admin.load_report()
            elif operation == "plan":
                result = admin.plan(*args)
            elif operation in ("apply", "rebalance"):
                result = await getattr(admin, operation)(*args)
            else:
                raise ValueError(f"unknown admin operation {operation!r}")
        except ValueError as err:
            return "invalid", str(err), time.monotonic()
        return "ok", result, time.monotonic()

    # ---- what the command line asks -----------------------------------------------------------

    async def status(self, history: bool = False) -> dict:
        status = await self.plane.status(history)
        status.update(address=self._address, namespace=self.config.ray.namespace,
                      up_s=time.time() - self._started_s)
        return status

    async def scale(self, workers: int | None) -> dict:
        """Pin the worker count (`workers`), or hand it back to the autoscaler (None)."""
        if workers is None:
            self.plane.autoscaler.resume()
            return {"mode": self.plane.autoscaler.mode, "workers": len(self.plane.pool.handles)}
        try:
            event = await self.plane.autoscaler.scale(workers)
        except ValueError as err:
            return {"error": str(err)}
        return {"mode": self.plane.autoscaler.mode, **{k: v for k, v in dataclasses.asdict(event).items()
                                                       if k != "migration"}}

    async def shutdown(self, grace_s: float = 5.0, drain_s: float = 0.0) -> None:
        """Stop the router (after a `drain_s` window of NOT_SERVING; in-flight requests get
        `grace_s`), the loops and the workers."""
        if self._watch is not None:
            self._watch.cancel()
        if self._router is not None:
            try:
                await self._router.stop.remote(grace_s, drain_s)
            except ray.exceptions.RayActorError:
                pass
            ray.kill(self._router, no_restart=True)
        if self.plane is not None:
            await self.plane.stop()


class RouterActor:
    """The gRPC router as a Ray actor; see the module docstring."""

    def __init__(self, config: dict, controller: str):
        self.config: ServeConfig = validate_config(config, source="deployment")
        self._controller_name = controller
        self.side: RouterSide | None = None
        self._starting = asyncio.Lock()

    def __repr__(self) -> str:
        return f"RouterActor(model={self.config.model.name!r}, address={self.address()})"

    def address(self) -> str | None:
        """host:port once serving, else None."""
        if self.side is None or self.side.server is None:
            return None
        return f"{self.config.router.host}:{self.side.server.port}"

    def pid(self) -> int:
        return os.getpid()

    async def start(self) -> str:
        async with self._starting:
            if self.side is None:
                await self._start()
        return self.address()

    async def _start(self) -> None:
        name = router_name(self.config.model.name)
        controller = ray.get_actor(self._controller_name, namespace=self.config.ray.namespace)
        weights = weights_for(self.config)
        spec = weights.spec
        gates = {layer: weights.gate(layer) for layer in spec.moe_layers}
        placement, handles = await controller.router_bootstrap.remote()
        side = build_router(self.config, spec, gates, placement, handles, router_id=name)
        side.text_note = attach_text_model(self.config, weights, side.router)
        self.side = side
        await controller.attach_router.remote(name)
        await side.open(self.config, RemoteAdmin(self.config.model.name, spec, controller, side.store))

    async def publish(self, placement: Placement) -> None:
        await self.side.publish(placement)

    async def drained(self, version: int, timeout_s: float) -> None:
        await self.side.drained(version, timeout_s)

    async def set_workers(self, handles: list) -> None:
        await self.side.set_workers(handles)

    async def take_report(self):
        return await self.side.take_report()

    async def stop(self, grace_s: float = 5.0, drain_s: float = 0.0) -> None:
        """Leave service: `drain_s` of NOT_SERVING while still serving, then in-flight requests
        get `grace_s`."""
        if self.side is not None and self.side.server is not None:
            await self.side.server.drain(drain_s, grace_s)


class RemoteAdmin:
    """`AdminOperations` for a router actor: each operation runs in the controller. Event times
    come back on the router's clock (the two may run on different machines)."""

    def __init__(self, name: str, spec, controller: ray.actor.ActorHandle, store):
        self.name = name
        self.spec = spec
        self._controller = controller
        self.store = store  # the router's PlacementStore

    @property
    def placement(self) -> Placement:
        return self.store.current

    async def _call(self, operation: str, *args):
        status, result, then_s = await self._controller.admin_call.remote(operation, *args)
        if status != "ok":
            raise ValueError(result)
        return result, time.monotonic() - then_s

    async def load_report(self):
        report, shift = await self._call("load_report")
        return dataclasses.replace(report, events=[_shifted(e, shift) for e in report.events])

    async def plan(self, load=None):
        report, _ = await self._call("plan", load)
        return report

    async def apply(self, placement: Placement):
        event, shift = await self._call("apply", placement)
        return _shifted(event, shift)

    async def rebalance(self, force: bool = False):
        event, shift = await self._call("rebalance", force)
        return _shifted(event, shift)


def _shifted(event, shift_s: float):
    return dataclasses.replace(event, at_s=event.at_s + shift_s)


# ---- for the command line ---------------------------------------------------------------------


def find_controller(model: str, namespace: str) -> ray.actor.ActorHandle:
    """The running service of `model`; ValueError saying how to start one when there is none."""
    try:
        return ray.get_actor(controller_name(model), namespace=namespace)
    except ValueError:
        raise ValueError(
            f"no moe-serve deployment of model {model!r} in Ray namespace {namespace!r}; "
            f"start one with `moe-serve deploy CONFIG.yaml --address auto`"
        ) from None


def create_controller(config: ServeConfig) -> ray.actor.ActorHandle:
    """The detached controller of `config`'s model, on this node; ValueError if one runs."""
    name, namespace = controller_name(config.model.name), config.ray.namespace
    try:
        ray.get_actor(name, namespace=namespace)
    except ValueError:
        pass
    else:
        raise ValueError(
            f"model {config.model.name!r} is already deployed in Ray namespace {namespace!r}; "
            f"see `moe-serve status --model {config.model.name}` or stop it with `moe-serve shutdown`"
        )
    here = ray.get_runtime_context().get_node_id()
    return ray.remote(ServiceController).options(
        name=name, namespace=namespace, lifetime="detached", num_cpus=0, max_concurrency=1000,
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True),
        # Ray warns of any ray.get in an async actor, even in the threads (asyncio.to_thread)
        # where the controller makes its blocking calls so that its event loop stays free.
        runtime_env={"env_vars": {"RAY_WARN_BLOCKING_GET_INSIDE_ASYNC": "0"}},
    ).remote(config.model_dump())
