"""The composition root: the one place that wires Ray, the expert shard workers and the router.

`deploy(config)` starts (or joins) Ray, creates the workers through an `ExpertPool`, loads the
placement into them with progress, and starts the gRPC router on top.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import ray
import torch

from cluster.config import RayConfig, ServeConfig
from cluster.admin import ModelAdmin
from cluster.controller import Controller
from cluster.placement import Placement
from cluster.placement_store import PlacementStore
from cluster.rebalancer import Rebalancer
from router_service.moe_layer import DistributedMoELayer
from router_service.ray_backend import RayExpertBackend
from router_service.router import ModelRouter
from router_service.server import RouterServer, start_server
from workers.pool import ExpertPool
from workers.weights import WeightSource, open_weights

log = logging.getLogger(__name__)

# progress(done, total) while expert weights load into the workers
LoadProgress = Callable[[int, int], None]


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


def weights_for(config: ServeConfig) -> WeightSource:
    random = config.model.random_or_default
    return open_weights(
        checkpoint=config.model.checkpoint,
        random_spec=random.spec() if random else None,
        seed=random.seed if random else 0,
    )


@dataclass
class Deployment:
    """A running model: its workers, its router and the address clients use."""

    config: ServeConfig
    weights: WeightSource
    pool: ExpertPool
    router: ModelRouter
    server: RouterServer
    placements: PlacementStore
    controller: Controller
    admin: ModelAdmin

    @property
    def placement(self) -> Placement:
        """The placement in service now."""
        return self.placements.current

    @property
    def address(self) -> str:
        return f"{self.config.router.host}:{self.server.port}"

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop rebalancing and taking requests, let in-flight ones finish, release the workers."""
        await self.controller.stop()
        await self.server.stop(grace_s)
        self.pool.shutdown()


async def deploy(config: ServeConfig, progress: LoadProgress | None = None) -> Deployment:
    """Start serving `config`'s model. Needs Ray connected (`connect_ray`)."""
    torch.set_num_threads(config.router.torch_threads)
    weights = weights_for(config)
    spec = weights.spec
    slots = slots_per_worker(spec.num_logical_experts, config.workers.count, config.workers.slots_per_worker)
    placement = Placement.round_robin(spec.num_logical_experts, config.workers.count, slots)
    placements = PlacementStore(placement)
    pool = ExpertPool(config.model.name, weights, config.workers, config.ray.namespace)
    try:
        await asyncio.to_thread(pool.start, config.workers.count)
        loaded = await asyncio.to_thread(pool.load, placement, progress)
        log.info("loaded %.1f MiB of expert weights into %d workers", loaded / 2**20, config.workers.count)
        gates = {layer: weights.gate_weight(layer) for layer in spec.moe_layers}
        layer = DistributedMoELayer(spec, gates, placements, RayExpertBackend(pool.handles))
        router = ModelRouter(config.model.name, layer, {
            "max_batch_tokens": config.router.max_batch_tokens,
            "max_wait_ms": config.router.max_wait_ms,
            "max_inflight_batches": config.router.max_inflight_batches,
        }, window_s=config.rebalance.window_s)
        rebalance = config.rebalance
        rebalancer = Rebalancer(placements, pool, rebalance.max_loads_per_step, rebalance.copy_from_live)
        controller = Controller(placements, router.load.snapshot, rebalancer, [slots] * config.workers.count,
                                rebalance, worker_nodes=pool.worker_nodes())
        admin = ModelAdmin(config.model.name, spec, placements, controller, router.load.snapshot,
                           pool.stats_async, router.outstanding_tokens_now)
        server = await start_server(
            {config.model.name: router}, config.router.host, config.router.port,
            config.router.max_message_mb * 1024 * 1024, admins={config.model.name: admin},
        )
    except BaseException:
        pool.shutdown()
        raise
    await server.set_serving(True)
    controller.start()
    return Deployment(config, weights, pool, router, server, placements, controller, admin)


def slots_per_worker(num_logical_experts: int, num_workers: int, configured: int | None) -> int:
    """The configured slots, or one replica of every expert plus 25% room for hot replicas."""
    if configured is not None:
        return configured
    needed = -(-num_logical_experts // num_workers)
    return needed + max(1, needed // 4)
