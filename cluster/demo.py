"""`moe-serve demo`: a first look for a new user. Starts a small random model on an embedded
Ray, drives it with a gRPC client, checks every answer against the in-process reference, and
shows what happened."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from cluster.config import ServeConfig
from cluster.console import console, expert_load_table, load_progress, summary_table, worker_table
from cluster.launcher import Deployment, deploy
from router_service.client import MoEClient
from workers.reference import ReferenceMoE


@dataclass(frozen=True)
class DemoReport:
    requests: int
    tokens: int
    wall_s: float
    latencies_s: np.ndarray
    max_rel_error: float


def drive(address: str, model: str, spec, requests: int, concurrency: int, tokens: int,
          reference: ReferenceMoE, seed: int = 0) -> DemoReport:
    """Send `requests` random requests over `concurrency` threads, checking every output."""
    rng = np.random.default_rng(seed)
    inputs = [
        (spec.moe_layers[i % spec.num_moe_layers],
         rng.standard_normal((tokens, spec.hidden_size), dtype=np.float32))
        for i in range(requests)
    ]
    with MoEClient(address) as client:
        client.wait_ready(30)

        def one(item):
            layer, x = item
            start = time.perf_counter()
            result = client.infer(model, x, layer=layer)
            return time.perf_counter() - start, layer, x, result.hidden_states

        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            answers = list(pool.map(one, inputs))
        wall_s = time.perf_counter() - start
    worst = 0.0
    for _, layer, x, got in answers:
        want, _ = reference.forward(layer, torch.from_numpy(x))
        worst = max(worst, float((torch.from_numpy(got.copy()) - want).abs().max() / want.abs().max()))
    return DemoReport(requests, requests * tokens, wall_s, np.array([a[0] for a in answers]), worst)


async def run_demo(config: ServeConfig, requests: int, concurrency: int, tokens: int) -> DemoReport:
    console.rule("[bold]moe-serve demo")
    spec = config.model.random_or_default.spec()
    console.print(
        f"model [bold]{config.model.name}[/]: {spec.num_moe_layers} MoE layers x {spec.num_experts} experts, "
        f"hidden {spec.hidden_size}, ffn {spec.intermediate_size}, top-{spec.top_k}; "
        f"{config.workers.count} expert shard workers"
    )
    with load_progress() as progress:
        deployment = await deploy(config, progress)
    try:
        console.print(f"router listening on [bold]{deployment.address}[/] (KServe v2 gRPC); "
                      f"sending {requests} requests of {tokens} tokens, {concurrency} at a time")
        reference = ReferenceMoE(deployment.weights)
        report = await asyncio.to_thread(
            drive, deployment.address, config.model.name, spec, requests, concurrency, tokens, reference
        )
        show(deployment, report)
    finally:
        await deployment.stop()
    return report


def show(deployment: Deployment, report: DemoReport) -> None:
    lat_ms = report.latencies_s * 1000
    router = deployment.router
    console.print(summary_table("what happened", {
        "requests served": str(report.requests),
        "tokens served": str(report.tokens),
        "batches sent to workers": str(router.batches_served),
        "throughput": f"{report.tokens / report.wall_s:,.0f} tokens/s",
        "latency p50 / p99": f"{np.percentile(lat_ms, 50):.1f} / {np.percentile(lat_ms, 99):.1f} ms",
        "max relative error vs in-process reference": f"{report.max_rel_error:.1e}",
    }))
    console.print(expert_load_table(router.spec, router.expert_tokens, "tokens routed per expert"))
    console.print(worker_table(router.spec, deployment.placement, deployment.pool.stats()))
