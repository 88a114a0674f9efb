"""The composition root: the one place that wires Ray, the expert shard workers and the router.

`deploy(config)` starts (or joins) Ray, starts the control plane (workers, placement, load,
rebalancing and scaling loops) and a router in the same process, linked in process, with the
gRPC server on top. `cluster.app.service` wires the same two halves as Ray actors instead.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
import torch

from cluster.config import RayConfig, ServeConfig
from cluster.control.admin import ModelAdmin
from cluster.control.control_plane import ControlPlane, LoadProgress, start_control_plane, weights_for
from cluster.control.controller import Controller
from cluster.control.metrics import GenerationMetrics, RouterMetrics
from cluster.model_spec import GateWeights, ModelSpec
from cluster.placement import Placement
from cluster.planning.load_stats import RouterReport
from router_service.admin_servicer import AdminOperations
from router_service.generation.dense_model import DenseWeightsError
from router_service.generation.engine import EngineSettings
from router_service.generation.text import TOKENIZER_FILES, build_text_model, has_tokenizer
from router_service.moe_layer import DistributedMoELayer
from router_service.placement_store import PlacementStore
from router_service.ray_backend import RayExpertBackend
from router_service.router import ModelRouter
from router_service.server import RouterServer, start_server
from workers.hf_checkpoint import HFCheckpoint
from workers.pool import ExpertPool
from workers.weights import WeightSource
from workers.worker import ExpertWorker

log = logging.getLogger(__name__)

__all__ = ["Deployment", "RouterSide", "attach_text_model", "build_router", "connect_ray", "deploy", "describe_text",
           "http_address", "weights_for"]


def connect_ray(config: RayConfig, **init_options) -> None:
    """Join `config.address`, or start an embedded local Ray when it is None."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(
        address=config.address,
        namespace=config.namespace,
        logging_level=logging.WARNING,
        log_to_driver=True,
        **init_options,
    )


@dataclass
class RouterSide:
    """One router: its placement store and worker handles, the batching router, and (once
    `open`) the gRPC server.

    It is the control plane's `RouterLink` to this router when both run in one process.
    """

    name: str
    router: ModelRouter
    store: PlacementStore
    backend: RayExpertBackend
    server: RouterServer | None = None
    text_note: str | None = None  # why it serves MoE layers only (None: it generates text)

    async def publish(self, placement: Placement) -> None:
        if placement.version > self.store.current.version:
            self.store.publish(placement)

    async def drained(self, version: int, timeout_s: float) -> None:
        await self.store.drained(version, timeout_s)

    async def set_workers(self, handles: Sequence[Any]) -> None:
        self.backend.set_handles(handles)

    async def take_report(self) -> RouterReport:
        return self.router.take_report()

    async def open(self, config: ServeConfig, admin: AdminOperations) -> RouterServer:
        """Bind the gRPC server and say SERVING. Call it once the router is attached, so it
        never serves with a placement the control plane has moved past."""
        router = config.router
        metrics = RouterMetrics([self.router.name]) if config.monitoring.enabled else None
        self.router.skip_metrics = metrics  # expert-tokens dropped by expert skipping
        models = {self.router.name: self.router}
        shared = router.bounds[1] > 1  # several routers of the model may share the ports on a node
        self.server = await start_server(
            models, router.host, router.port, router.max_message_mb * 1024 * 1024,
            admins={self.router.name: admin}, serving=True, metrics=metrics, security=config.security,
            reuse_port=shared, shared_memory=router.shared_memory,
        )
        if self.router.text is not None and router.http_port is not None:
            from router_service.openai_http import start_http_server

            try:
                self.server.http = await start_http_server(models, router.host, router.http_port,
                                                           security=config.security, metrics=metrics,
                                                           reuse_port=shared)
            except BaseException:
                await self.server.stop(0)
                raise
            await self.server.http.set_serving(True)
        return self.server


def attach_text_model(config: ServeConfig, weights: WeightSource, router: ModelRouter) -> str | None:
    """Give `router` the checkpoint's text model (the dense part of the model, on this process's
    device, and its tokenizer) when the checkpoint has them and `generation.enabled`; returns
    why it serves MoE layers only, or None when it generates."""
    checkpoint = config.model.checkpoint
    if not config.generation.enabled:
        return "generation.enabled is false"
    if checkpoint is None or not isinstance(weights, HFCheckpoint):
        return "a random model has no dense weights or tokenizer"
    if not has_tokenizer(checkpoint):
        return f"{checkpoint} has no tokenizer ({' or '.join(TOKENIZER_FILES)})"
    gen = config.generation
    settings = EngineSettings(int(gen.kv_cache_mb * 2**20), gen.block_size, gen.max_num_seqs, gen.max_batch_tokens,
                              gen.prefill_chunk_tokens, gen.max_waiting, gen.max_model_len, gen.pipeline_microbatches)
    metrics = GenerationMetrics(config.model.name, router.router_id) if config.monitoring.enabled else None
    try:
        router.text = build_text_model(config.model.name, checkpoint, weights.dense_tensors(), weights.spec.moe_layers,
                                       router.moe, settings, gen.device, gen.default_max_tokens, metrics,
                                       expert_skip_threshold=router.expert_skip_threshold)
    except DenseWeightsError as err:
        return f"{checkpoint} holds no usable dense weights ({err})"
    return None


def http_address(config: ServeConfig, side: RouterSide) -> str | None:
    """host:port of a router's OpenAI-compatible HTTP API, when it serves one."""
    http = side.server.http if side.server is not None else None
    return None if http is None else f"{config.router.host}:{http.port}"


def describe_text(config: ServeConfig, side: RouterSide) -> str:
    """One line for people: where a router serves text, or why it serves MoE layers only."""
    text = side.router.text
    if text is None:
        return f"serving MoE layers only (the layer API): {side.text_note}"
    address = http_address(config, side)
    http = "no HTTP (router.http_port is null)" if address is None else f"OpenAI-compatible HTTP on http://{address}/v1"
    stats = text.engine.stats()
    return (f"generating text: {http}, KServe text_input on the gRPC port; context {text.max_model_len} tokens, "
            f"KV cache {stats['kv_blocks']} blocks of {stats['block_size']} tokens")


def build_router(config: ServeConfig, spec: ModelSpec, gates: dict[int, GateWeights], placement: Placement,
                 handles: Sequence[Any], router_id: str = "router") -> RouterSide:
    """A router for `placement` over the workers `handles`, not yet open to clients."""
    torch.set_num_threads(config.router.torch_threads)
    store = PlacementStore(placement)
    backend = RayExpertBackend(handles)
    layer = DistributedMoELayer(spec, gates, store, backend, max_retries=config.router.max_retries,
                                max_worker_inflight_tokens=config.router.max_worker_inflight_tokens,
                                share_timeout_s=config.router.share_timeout_s,
                                share_timeout_factor=config.router.share_timeout_factor)
    router = ModelRouter(config.model.name, layer, config.router, router_id=router_id,
                         expert_skip_threshold=config.model.expert_skip_threshold)
    return RouterSide(router_id, router, store, backend)


@dataclass
class Deployment:
    """A running model in this process: its control plane, its router and the address clients use."""

    config: ServeConfig
    plane: ControlPlane
    side: RouterSide
    started_s: float = field(default_factory=time.time)

    @property
    def weights(self) -> WeightSource:
        return self.plane.weights

    @property
    def pool(self) -> ExpertPool:
        return self.plane.pool

    @property
    def router(self) -> ModelRouter:
        return self.side.router

    @property
    def server(self) -> RouterServer:
        return self.side.server

    @property
    def controller(self) -> Controller:
        return self.plane.controller

    @property
    def admin(self) -> ModelAdmin:
        return self.plane.admin

    @property
    def placement(self) -> Placement:
        """The placement in service now."""
        return self.plane.placement

    @property
    def address(self) -> str:
        return f"{self.config.router.host}:{self.server.port}"

    @property
    def http_address(self) -> str | None:
        """host:port of the OpenAI-compatible HTTP API, when the model generates text."""
        return http_address(self.config, self.side)

    def describe_text(self) -> str:
        return describe_text(self.config, self.side)

    async def status(self, history: bool = False) -> dict:
        """What `moe-serve status --address` shows of this process (the admin API's GetStatus):
        the control plane's status and its one router, with the keys a `moe-serve deploy`
        service's status has (`cluster.app.service.ServiceController.status`)."""
        status = await self.plane.status(history)
        http = self.http_address
        status.update(address=self.address, http_address=http,
                      router_fleet=[{"name": self.side.name, "address": self.address, "http_address": http}],
                      namespace=self.config.ray.namespace, up_s=time.time() - self.started_s,
                      controller={"pid": os.getpid(), "recovered_s": None},
                      router_scaling={"mode": "off (moe-serve serve runs one router)", "bounds": [1, 1],
                                      "decision": None, "events": []})
        return status

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop deciding and taking requests, let in-flight ones finish, release the workers."""
        await self.plane.stop_loops()
        await self.server.stop(grace_s)
        await self.plane.stop()


async def deploy(config: ServeConfig, progress: LoadProgress | None = None,
                 worker_cls: type[ExpertWorker] = ExpertWorker) -> Deployment:
    """Start serving `config`'s model in this process. Needs Ray connected (`connect_ray`).
    `worker_cls`: a subclass of `ExpertWorker` only to inject faults in tests."""
    if config.router.bounds[1] > 1:
        raise ValueError(f"router.max_count ({config.router.bounds[1]}) > 1: several routers run as Ray actors; "
                         f"serve with `moe-serve deploy` (this process runs one router)")
    plane = await start_control_plane(config, progress, worker_cls)
    try:
        spec = plane.weights.spec
        gates = {layer: plane.weights.gate(layer) for layer in spec.moe_layers}
        side = build_router(config, spec, gates, plane.placement, plane.hub.workers)
        side.text_note = attach_text_model(config, plane.weights, side.router)
        await plane.attach(side)
        await side.open(config, plane.admin)
    except BaseException:
        await plane.stop()
        raise
    plane.start_loops()
    deployment = Deployment(config, plane, side)
    plane.admin.status_source = deployment.status  # GetStatus answers with the router's addresses too
    return deployment
