"""`moe-serve demo`: a first look for a new user. Starts a small random model on an embedded
Ray, drives it over gRPC with skewed traffic (a few hot experts), checks every answer against
the in-process reference, and shows the hot experts being replicated and the load evening out.
Everything it shows comes through the public APIs (inference and admin gRPC)."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from rich.console import Console

from cluster.app.console import events_table, layer_expert_table, load_progress, placement_table, summary_table
from cluster.app.launcher import deploy
from cluster.app.reference import ReferenceMoE
from cluster.config import ServeConfig
from cluster.model_spec import ModelSpec
from cluster.sim.traffic import SkewedTraffic
from router_service.admin_client import AdminClient, load_to_dict
from router_service.client import MoEClient

DEMO_REBALANCE = {  # react within a second or two, so the demo shows it
    "rebalance.window_s": 3.0, "rebalance.check_interval_s": 0.25,
    "rebalance.min_interval_s": 1.0, "rebalance.min_window_tokens": 1024,
}


def demo_config(workers: int) -> ServeConfig:
    return ServeConfig().with_overrides(**{"router.port": 0, "workers.count": workers, **DEMO_REBALANCE})


@dataclass(frozen=True)
class DemoReport:
    requests: int
    failed: int
    tokens: int
    wall_s: float
    latencies_s: np.ndarray
    max_rel_error: float


def drive(address: str, model: str, spec: ModelSpec, traffic: SkewedTraffic, reference: ReferenceMoE,
          requests: int, concurrency: int, tokens: int) -> DemoReport:
    """Send `requests` skewed requests over `concurrency` threads; check every answer."""
    inputs = [(spec.moe_layers[i % spec.num_moe_layers], None) for i in range(requests)]
    inputs = [(layer, traffic.sample(layer, tokens)[0]) for layer, _ in inputs]
    with MoEClient(address) as client:
        client.wait_ready(30)

        def one(item):
            layer, x = item
            start = time.perf_counter()
            try:
                got = client.infer(model, x, layer=layer).hidden_states
            except Exception:  # counted, never hidden: the demo reports failed requests
                return time.perf_counter() - start, layer, x, None
            return time.perf_counter() - start, layer, x, got

        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            answers = list(pool.map(one, inputs))
        wall_s = time.perf_counter() - start
    worst = 0.0
    for _, layer, x, got in answers:
        if got is not None:
            want, _ = reference.forward(layer, torch.from_numpy(x))
            worst = max(worst, float((torch.from_numpy(got.copy()) - want).abs().max() / want.abs().max()))
    failed = sum(a[3] is None for a in answers)
    return DemoReport(requests, failed, requests * tokens, wall_s, np.array([a[0] for a in answers]), worst)


async def run_demo(config: ServeConfig, console: Console, requests: int, concurrency: int, tokens: int,
                   zipf_s: float = 1.2) -> DemoReport:
    """Deploy `config`, drive it, and tell the story on `console`."""
    console.rule("[bold]moe-serve demo")
    spec = config.model.random_or_default.spec()
    console.print(
        f"model [bold]{config.model.name}[/]: {spec.num_moe_layers} MoE layers x {spec.num_experts} experts, "
        f"hidden {spec.hidden_size}, ffn {spec.intermediate_size}, top-{spec.top_k}; "
        f"{config.workers.count} expert shard workers", highlight=False,
    )
    with load_progress(console) as progress:
        deployment = await deploy(config, progress)
    try:
        reference = ReferenceMoE(deployment.weights)
        traffic = SkewedTraffic({l: deployment.weights.gate_weight(l) for l in spec.moe_layers}, s=zipf_s,
                                seed=0, aim=spec.top_k)
        console.print(
            f"router on [bold]{deployment.address}[/] (KServe v2 gRPC + admin). Sending {requests} requests "
            f"of {tokens} tokens, {concurrency} at a time, skewed: Zipf s={zipf_s}, hottest experts "
            f"{traffic.hot_experts[:3].tolist()} in every layer", highlight=False,
        )
        before = deployment.placement
        report = await asyncio.to_thread(
            drive, deployment.address, config.model.name, spec, traffic, reference, requests, concurrency, tokens
        )
        await asyncio.to_thread(show, console, deployment.address, config.model.name, before, report)
    finally:
        await deployment.stop()
    return report


def show(console: Console, address: str, model: str, before, report: DemoReport) -> None:
    with AdminClient(address) as admin:
        load = load_to_dict(admin.load(model))
        after = admin.placement(model)
    lat_ms = report.latencies_s * 1000
    events = load["recent_events"]
    first = events[0]["balancedness_before"] if events else float("nan")
    console.print(summary_table("what happened", {
        "requests served / failed": f"{report.requests - report.failed} / {report.failed}",
        "tokens served": str(report.tokens),
        "throughput": f"{report.tokens / report.wall_s:,.0f} tokens/s",
        "latency p50 / p99": f"{np.percentile(lat_ms, 50):.1f} / {np.percentile(lat_ms, 99):.1f} ms",
        "max relative error vs in-process reference": f"{report.max_rel_error:.1e}",
        "balancedness before -> now (min over layers)": f"{first:.3f} -> {min(load['balancedness']):.3f}",
        "placement version": f"v{before.version} -> v{after.version}",
    }))
    console.print(layer_expert_table(
        load["layers"], np.asarray(load["window_tokens"]), f"tokens routed per expert, last {load['window_s']:.0f}s",
        load["balancedness"],
    ))
    console.print(placement_table(model, before.to_dict(), load["layers"], load["num_experts"]))
    console.print(placement_table(model, after.to_dict(), load["layers"], load["num_experts"]))
    if events:
        console.print(events_table(events, "rebalance events (hot experts replicated, live)"))
