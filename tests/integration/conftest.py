"""Integration tier: one real local Ray cluster per test session, real gRPC servers on port 0.

The servers run on an asyncio loop in a background thread (`server_loop`), so tests talk to them
with the blocking `MoEClient` and gRPC stubs from the main thread.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Iterator

import pytest
import ray

from cluster.app.launcher import connect_ray, deploy
from cluster.app.reference import ReferenceMoE
from cluster.config import RayConfig, ServeConfig
from router_service.client import MoEClient
from tests.integration.support import NAMESPACE, Served, run_on, serve_config
from workers.hf_checkpoint import HFCheckpoint
from workers.random_model import RandomModel
from workers.weights import WeightSource
from workers.worker import ExpertWorker

# The model most tests share: 2 MoE layers x 8 experts over 2 workers.
MAIN_RANDOM = {"layers": 2, "experts": 8, "hidden": 64, "ffn": 128, "top_k": 2, "seed": 11}


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        raise RuntimeError("Ray is already initialised in the test process; the integration tier owns it")
    # metrics reach the node's Prometheus endpoint within ~1 s instead of ~10 s
    # logical CPUs: the modules keep several small deployments up at once (2 cores do the work)
    connect_ray(RayConfig(namespace=NAMESPACE), num_cpus=8, include_dashboard=False,
                _system_config={"metrics_report_interval_ms": 1000})
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def server_loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="grpc-server-loop", daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    if not thread.is_alive():
        loop.close()


def reference_weights(config: ServeConfig) -> WeightSource:
    """The config's weights built here, independently of the launcher."""
    if config.model.checkpoint is not None:
        return HFCheckpoint(config.model.checkpoint)
    random = config.model.random_or_default
    return RandomModel(random.spec(), random.seed)


DeployFn = Callable[..., Served]  # (config, worker_cls=ExpertWorker) -> Served


@pytest.fixture(scope="session")
def deploy_served(ray_cluster, server_loop) -> Iterator[tuple[DeployFn, Callable[[Served], None]]]:
    """(start, stop) for deployments; whatever is still running at session end is stopped."""
    running: list[Served] = []

    def start(config: ServeConfig, worker_cls: type[ExpertWorker] = ExpertWorker) -> Served:
        deployment = run_on(server_loop, deploy(config, worker_cls=worker_cls))
        served = Served(config, deployment, MoEClient(deployment.address), ReferenceMoE(reference_weights(config)))
        running.append(served)
        served.client.wait_ready(timeout_s=30)
        return served

    def stop(served: Served) -> None:
        if served in running:
            running.remove(served)
            served.client.close()
            run_on(server_loop, served.deployment.stop(grace_s=2.0))

    yield start, stop
    for served in list(running):
        stop(served)


@pytest.fixture(scope="session")
def main_server(deploy_served) -> Iterator[Served]:
    """The shared random model: 2 layers, 8 experts, hidden 64, 2 workers."""
    start, stop = deploy_served
    served = start(serve_config("it-main", random=MAIN_RANDOM, workers=2))
    yield served
    stop(served)
