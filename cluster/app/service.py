"""`moe-serve deploy`: the service as Ray actors that outlive the terminal that started them.

- `ServiceController` (`<model>-controller`, detached, restarted by Ray): runs the control
  plane over the workers (`<model>-worker-NN`) and the routers (`router.count` of them, between
  `router.min_count` and `router.max_count`: data-parallel attention, scaled by `RouterScaler`
  or by hand). Workers and routers are detached actors too, so they serve on when the
  controller's process dies; the restarted controller takes them over (`recover`: the newest
  placement its routers serve, events and pinned counts from `service_state` in Ray's key-value
  store), and it starts a router serving again when Ray restarts that router after a crash.
- `RouterActor` (`cluster.app.router_actor`): one router, restarted by Ray.

This module is the composition root for the actor layout, as `cluster.app.launcher` is for one
process; both build the same `ControlPlane` and `RouterSide`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import time
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cluster.app import service_state
from cluster.app.router_actor import ActorRouterLink, RouterActor, router_name
from cluster.config import ServeConfig, validate_config
from cluster.control.control_plane import ControlPlane, adopt_control_plane, start_control_plane
from cluster.control.router_scaler import RouterScaler
from cluster.placement import Placement
from workers.worker import ExpertWorker

log = logging.getLogger(__name__)

ROUTER_WATCH_S = 1.0  # how often the controller checks that its routers serve

__all__ = ["ServiceController", "controller_name", "create_controller", "find_controller", "router_name"]


def _start_recovery(me: ray.actor.ActorHandle, deadline_s: float = 120.0) -> None:
    """Call `recover` on this restarted controller from a thread of its own: until Ray has it
    back up (its constructor must return first), the call can come back `ActorUnavailableError`
    (Ray still counts it restarting), and is made again."""
    give_up = time.monotonic() + deadline_s
    while True:
        try:
            ray.get(me.recover.remote())
            return
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > give_up:
                log.error("could not reach this restarted controller to take over within %.0fs", deadline_s)
                return
            time.sleep(0.2)


def controller_name(model: str) -> str:
    return f"{model}-controller"


class ServiceController:
    """The detached owner of one model's control plane (workers, placement, load, loops) and of
    its routers (a `RouterFleet` for `RouterScaler`)."""

    def __init__(self, config: dict, worker_cls: type[ExpertWorker] = ExpertWorker):
        """`worker_cls`: a subclass of `ExpertWorker` only to inject faults in tests and benchmarks
        (kept by a restarted controller: Ray passes it the same arguments)."""
        self.config: ServeConfig = validate_config(config, source="deployment")
        self._worker_cls = worker_cls
        self.plane: ControlPlane | None = None
        self.routers: RouterScaler | None = None
        self._progress = (0, 0)
        self._routers: dict[str, ray.actor.ActorHandle] = {}  # name -> actor, oldest first
        self._address: str | None = None
        self._tasks: list[asyncio.Task] = []
        self._started_s = time.time()
        self._up: asyncio.Event | None = None  # set once it is in charge (started, or recovered)
        self.recovered_s: float | None = None  # how long taking over took, after Ray restarted it
        self._recovering = False
        if ray.get_runtime_context().was_current_actor_reconstructed:  # Ray restarted this actor
            me = ray.get_runtime_context().current_actor
            threading.Thread(target=_start_recovery, args=(me,), name="recover", daemon=True).start()

    def __repr__(self) -> str:
        return f"ServiceController(model={self.config.model.name!r})"

    async def _in_charge(self) -> None:
        """Wait until started or recovered (calls that arrive while a restarted one takes over)."""
        if self._up is None:
            self._up = asyncio.Event()
        await self._up.wait()

    async def start(self) -> str:
        """Start the workers, load them, start `router.count` routers; returns the address. The
        workers and routers are detached: they outlive this actor, and a restarted one adopts
        them (`recover`)."""
        if self.plane is None:
            self.plane = await start_control_plane(self.config, self._on_progress, self._worker_cls, detached=True)
            self._add_router_scaler()
        self._mark_in_charge()  # the routers it starts ask it for the placement
        while len(self._routers) < self.config.router.count:
            await self.add_router()
        self._go()
        return self._address

    async def recover(self, attempts: int = 30) -> str | None:
        """Take over after Ray restarted this actor (see `_take_over`), trying again every second
        while the deployment's actors cannot all be reached yet. Once only: a second call (the
        first one's delivery was in doubt) waits for the first."""
        if self._recovering or self.plane is not None:
            await self._in_charge()
            return self._address
        self._recovering = True
        for attempt in range(1, attempts + 1):
            try:
                return await self._take_over()
            except Exception:
                log.exception("taking over the deployment failed (attempt %d of %d)", attempt, attempts)
                await asyncio.sleep(1.0)
        self._recovering = False
        return None

    async def _take_over(self) -> str:
        """Adopt the routers and workers that kept serving (the latest placement a router or the
        saved state has), restore the events and what was pinned by hand, start the loops again."""
        start = time.monotonic()
        state = service_state.load(self.config.ray.namespace, self.config.model.name)
        self._routers = await self._find_routers()
        served = [p for p in await asyncio.gather(*(r.placement.remote() for r in self._routers.values())) if p]
        candidates = served + ([state.placement] if state is not None else [])
        if not candidates:
            raise RuntimeError("no router serves and no saved state: nothing to take over; redeploy")
        self.plane = await adopt_control_plane(self.config, max(candidates, key=lambda p: p.version),
                                                self._worker_cls)
        self._add_router_scaler()
        if state is not None:
            self._restore(state)
        self._mark_in_charge()
        for name, handle in self._routers.items():
            await self.plane.attach(ActorRouterLink(name, handle))
        if self._routers:
            self._address = await next(iter(self._routers.values())).address.remote()
        self._go()
        self.recovered_s = time.monotonic() - start
        log.warning("controller restarted: took over %d workers and %d routers at placement v%d in %.1fs (%s)",
                    len(self.plane.pool.handles), len(self._routers), self.plane.placement.version, self.recovered_s,
                    f"its saved history restored: {sum(map(len, state.events.values()))} events"
                    if state is not None else "no saved history")
        return self._address

    async def _find_routers(self) -> dict[str, ray.actor.ActorHandle]:
        found = {}
        for index in range(self.config.router.bounds[1] + 1):
            name = router_name(self.config.model.name, index)
            try:
                found[name] = ray.get_actor(name, namespace=self.config.ray.namespace)
            except ValueError:
                continue
        return found

    def _add_router_scaler(self) -> None:
        self.routers = RouterScaler(self, self._generation, self.config.autoscaling, self.config.router.bounds,
                                    refresh=self.plane.feed.refresh)
        metrics = self.plane.observer.metrics
        if metrics is not None:
            self.routers.listeners.append(lambda e: metrics.scale(f"routers_{e.action}", e.trigger, e.duration_s))

    def _go(self) -> None:
        """Start the loops, the router watch and the state saving; say it is in charge."""
        self.plane.start_loops()
        self.routers.start()
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._watch_routers(), name="router-watch"),
                           loop.create_task(self._save_state(), name="save-state")]
        self._mark_in_charge()

    def _mark_in_charge(self) -> None:
        if self._up is None:
            self._up = asyncio.Event()
        self._up.set()

    def _snapshot(self) -> service_state.ControllerState:
        plane = self.plane
        events = {"rebalance": list(plane.controller.events), "scale": list(plane.reconciler.events),
                  "workers": list(plane.supervisor.events), "routers": list(self.routers.events)}
        return service_state.ControllerState(plane.placement, events, plane.autoscaler.manual, self.routers.manual)

    def _restore(self, state: service_state.ControllerState) -> None:
        plane = self.plane
        for name, queue in (("rebalance", plane.controller.events), ("scale", plane.reconciler.events),
                            ("workers", plane.supervisor.events), ("routers", self.routers.events)):
            queue.extend(state.events.get(name, []))
        plane.autoscaler.manual, self.routers.manual = state.manual_workers, state.manual_routers

    async def _save_state(self) -> None:
        """Save every `SAVE_INTERVAL_S`, and at once after each event (a scaling, a rebalance, a
        worker fault: what a restarted controller must not forget)."""
        changed = asyncio.Event()
        plane = self.plane
        for listeners in (plane.controller.listeners, plane.reconciler.listeners, plane.supervisor.listeners,
                          self.routers.listeners):
            listeners.append(lambda _event: changed.set())
        while True:
            changed.clear()
            try:
                await asyncio.to_thread(service_state.save, self.config.ray.namespace, self.config.model.name,
                                        self._snapshot())
            except Exception:
                log.exception("saving the controller state failed")
            try:
                await asyncio.wait_for(changed.wait(), service_state.SAVE_INTERVAL_S)
            except asyncio.TimeoutError:
                pass

    def _on_progress(self, done: int, total: int) -> None:
        self._progress = (done, total)

    def progress(self) -> tuple[int, int]:
        """(experts loaded, experts to load) while `start` runs."""
        return self._progress

    def _generation(self) -> dict:
        return self.plane.feed.board.generation(time.monotonic())

    async def describe_text(self) -> str:
        """Where the first router serves text, or why it serves MoE layers only."""
        return await next(iter(self._routers.values())).describe_text.remote()

    # ---- the router fleet -----------------------------------------------------------------------

    @property
    def router_count(self) -> int:
        return len(self._routers)

    async def add_router(self) -> str:
        """Start one more router, on its own node where there is one (Ray's SPREAD); resolves to
        its name once it serves and is attached."""
        index = next(i for i in range(len(self._routers) + 1) if router_name(self.config.model.name, i) not in self._routers)
        name = router_name(self.config.model.name, index)
        strategy = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True) \
            if index == 0 else "SPREAD"
        handle = ray.remote(RouterActor).options(
            name=name, namespace=self.config.ray.namespace, num_cpus=self.config.router.num_cpus,
            max_restarts=-1, max_concurrency=1000, scheduling_strategy=strategy,
            lifetime="detached",  # it serves on when the controller dies; a restarted one adopts it
        ).remote(self.config.model_dump(), controller_name(self.config.model.name), name)
        self._routers[name] = handle
        try:
            address = await handle.start.remote()
        except BaseException:
            self._routers.pop(name, None)
            ray.kill(handle, no_restart=True)
            raise
        self._address = self._address or address
        return name

    async def remove_router(self) -> str:
        """Drain and stop the newest router (never the first: it is the one the address names)."""
        if len(self._routers) <= 1:
            raise ValueError("the last router is not removed; `moe-serve shutdown` stops the service")
        name, handle = list(self._routers.items())[-1]
        try:
            await handle.stop.remote(self.config.router.grace_s, 0.0)
        except ray.exceptions.RayActorError:
            pass
        self.plane.hub.detach(name)
        self.plane.feed.board.forget(name)
        del self._routers[name]
        ray.kill(handle, no_restart=True)
        return name

    async def _watch_routers(self) -> None:
        """A router actor that Ray restarted comes back empty: start it serving again."""
        while True:
            await asyncio.sleep(ROUTER_WATCH_S)
            for name, handle in list(self._routers.items()):
                try:
                    if await handle.address.remote() is None:
                        log.warning("router %s restarted; starting it again", name)
                        address = await handle.start.remote()
                        if name == router_name(self.config.model.name):
                            self._address = address
                except ray.exceptions.RayActorError:
                    pass  # restarting: the next look retries
                except Exception:
                    log.exception("router watch failed for %s", name)

    # ---- what the routers ask -------------------------------------------------------------------

    async def router_bootstrap(self) -> tuple[Placement, list]:
        await self._in_charge()
        return self.plane.placement, self.plane.hub.workers

    async def attach_router(self, name: str) -> None:
        await self._in_charge()
        await self.plane.attach(ActorRouterLink(name, ray.get_actor(name, namespace=self.config.ray.namespace)))

    async def admin_call(self, operation: str, *args) -> tuple[str, Any, float]:
        """An admin operation for a router: ("ok", result, now_s) or ("invalid", message, now_s).
        Only `ValueError`s (the user's mistakes) travel back as text; the rest is logged here."""
        await self._in_charge()
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
        await self._in_charge()
        status = await self.plane.status(history)
        routers = []
        for name, handle in self._routers.items():
            try:
                grpc_address, http = await handle.address.remote(), await handle.http_address.remote()
            except ray.exceptions.RayActorError:
                grpc_address = http = None  # restarting
            routers.append({"name": name, "address": grpc_address, "http_address": http})
        now, scaler = time.monotonic(), self.routers
        status.update(address=self._address, http_address=routers[0]["http_address"] if routers else None,
                      router_fleet=routers, namespace=self.config.ray.namespace, up_s=time.time() - self._started_s,
                      controller={"pid": os.getpid(), "recovered_s": self.recovered_s},
                      router_scaling={
                          "mode": scaler.mode, "bounds": list(scaler.bounds),
                          "decision": None if scaler.last is None else dataclasses.asdict(scaler.last[1]),
                          "events": [{"age_s": now - e.at_s, **{k: v for k, v in dataclasses.asdict(e).items()
                                                                if k != "at_s"}} for e in scaler.events]})
        return status

    async def scale(self, workers: int | None, routers: int | None = None) -> dict:
        """Pin the worker count (`workers`) or the router count (`routers`), or hand both back to
        the autoscaler (neither)."""
        await self._in_charge()
        if routers is not None:
            try:
                events = await self.routers.scale(routers)
            except ValueError as err:
                return {"error": str(err)}
            failed = [e for e in events if e.action == "failed"]
            return {"mode": self.routers.mode, "routers": self.router_count, "action": "failed" if failed else "routers",
                    "reason": failed[0].reason if failed else f"{len(events)} routers added or removed"}
        if workers is None:
            self.plane.autoscaler.resume()
            self.routers.resume()
            return {"mode": self.plane.autoscaler.mode, "workers": len(self.plane.pool.handles),
                    "routers": self.router_count}
        try:
            event = await self.plane.autoscaler.scale(workers)
        except ValueError as err:
            return {"error": str(err)}
        return {"mode": self.plane.autoscaler.mode, **{k: v for k, v in dataclasses.asdict(event).items()
                                                       if k != "migration"}}

    async def shutdown(self, grace_s: float = 5.0, drain_s: float = 0.0) -> None:
        """Stop the routers (after a `drain_s` window of NOT_SERVING; in-flight requests get
        `grace_s`), the loops and the workers, and forget the saved state."""
        for task in self._tasks:
            task.cancel()
        service_state.forget(self.config.ray.namespace, self.config.model.name)
        if self.routers is not None:
            await self.routers.stop()
        handles = list(self._routers.values())

        async def stop(handle) -> None:
            try:
                await handle.stop.remote(grace_s, drain_s)
            except ray.exceptions.RayActorError:
                pass
            ray.kill(handle, no_restart=True)

        await asyncio.gather(*(stop(h) for h in handles))
        self._routers.clear()
        if self.plane is not None:
            await self.plane.stop()


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


def create_controller(config: ServeConfig, worker_cls: type[ExpertWorker] = ExpertWorker) -> ray.actor.ActorHandle:
    """The detached controller of `config`'s model, on this node; ValueError if one runs.
    `worker_cls`: a subclass of `ExpertWorker` only to inject faults in tests and benchmarks
    (register its module with `ray.cloudpickle.register_pickle_by_value` first, so the
    controller's process need not import it)."""
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
        max_restarts=-1,  # killed, it comes back and takes over the workers and routers (`recover`)
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True),
        # Ray warns of any ray.get in an async actor, even in the threads (asyncio.to_thread)
        # where the controller makes its blocking calls so that its event loop stays free.
        runtime_env={"env_vars": {"RAY_WARN_BLOCKING_GET_INSIDE_ASYNC": "0"}},
    ).remote(config.model_dump(), worker_cls)
