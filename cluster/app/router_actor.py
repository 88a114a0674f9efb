"""A router as a Ray actor (`<model>-router`, and `<model>-router-N` for the others when there
are several: data-parallel attention over one expert pool), and the control plane's link to it.

On start a router opens the gate weights (and the dense side of the model, when it generates
text), asks the controller for the placement and the worker handles, binds the gRPC (and HTTP)
ports, shared with the other routers on its node (SO_REUSEPORT) when there may be several, and
attaches under its own name, so a restarted router replaces its old link and creates nothing
twice. Admin calls go through to the controller.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Any

import ray

from cluster.app.launcher import RouterSide, attach_text_model, build_router, describe_text, http_address
from cluster.config import ServeConfig, validate_config
from cluster.control.control_plane import weights_for
from cluster.placement import Placement


def router_name(model: str, index: int = 0) -> str:
    """The first router is `<model>-router`, the next ones `<model>-router-1`, `-2`, ..."""
    return f"{model}-router" if index == 0 else f"{model}-router-{index}"


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


class RouterActor:
    """One router as a Ray actor; see the module docstring."""

    def __init__(self, config: dict, controller: str, name: str):
        self.config: ServeConfig = validate_config(config, source="deployment")
        self._controller_name = controller
        self.name = name
        self.side: RouterSide | None = None
        self._starting = asyncio.Lock()

    def __repr__(self) -> str:
        # Ray records the repr once, at creation (before the router serves): no address here.
        return f"RouterActor(model={self.config.model.name!r}, name={self.name!r})"

    def address(self) -> str | None:
        """host:port once serving, else None."""
        if self.side is None or self.side.server is None:
            return None
        return f"{self.config.router.host}:{self.side.server.port}"

    def pid(self) -> int:
        return os.getpid()

    def http_address(self) -> str | None:
        return None if self.side is None else http_address(self.config, self.side)

    def describe_text(self) -> str:
        return "starting" if self.side is None else describe_text(self.config, self.side)

    async def start(self) -> str:
        async with self._starting:
            if self.side is None:
                await self._start()
        return self.address()

    async def _start(self) -> None:
        name = self.name
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

    def placement(self):
        """The placement this router serves (None before it starts): a restarted controller
        takes over from the newest one."""
        return None if self.side is None else self.side.store.current

    def stats(self) -> dict:
        """What this router has served: batches through the expert pool, and its generation."""
        if self.side is None:
            return {"name": self.name, "serving": False}
        text = self.side.router.text
        return {"name": self.name, "serving": self.address() is not None, "pid": os.getpid(),
                "batches_served": self.side.router.batches_served,
                "generation": None if text is None else text.engine.stats()}

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

    async def status(self, history: bool = False) -> dict:
        """The controller's status (what `moe-serve status` shows of the deployment, every router)."""
        return await self._controller.status.remote(history)


def _shifted(event, shift_s: float):
    return dataclasses.replace(event, at_s=event.at_s + shift_s)
