"""Live serving under skewed traffic: hot-expert replication versus a static placement, and
how fast balance comes back after the hot set rotates. Prints JSON.

    .venv/bin/python -m bench.bench_skew            # Zipf s=1.2, 2 workers (one per core)
    .venv/bin/python -m bench.bench_skew --quick    # shorter phases

Each phase drives the real gRPC path from a client process at a fixed concurrency with
hidden states that the real gate routes to Zipf-distributed experts (`cluster.sim.traffic`).
- static: rebalancing off, the round-robin placement.
- replicated: rebalancing on; measured after the controller's first rebalance.
- rotation: the hot set moves mid-run; we sample the live balancedness (placement in service
  under the last `--probe-s` of routed tokens) and report when it is >= 0.9 again.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time

import numpy as np
import ray

from bench.bench_serving import ServedModel
from bench.render import emit
from cluster.app.launcher import connect_ray, weights_for
from cluster.config import RayConfig, ServeConfig
from cluster.planning.planner import layer_balancedness
from cluster.sim.traffic import SkewedTraffic


def _client(address: str, model: str, phases: list[tuple[list[np.ndarray], float]], concurrency: int, queue) -> None:
    """Send each phase's inputs round-robin for its duration; report every request."""
    from concurrent.futures import ThreadPoolExecutor

    from router_service.client import MoEClient

    records: list[tuple[int, float, float, str]] = []  # phase, start offset, latency, status
    with MoEClient(address) as client:
        client.wait_ready(60)
        t0 = time.perf_counter()
        for phase, (inputs, duration_s) in enumerate(phases):
            end = time.perf_counter() + duration_s

            def loop(offset: int) -> None:
                i = offset
                while time.perf_counter() < end:
                    start = time.perf_counter()
                    try:
                        client.infer(model, inputs[i % len(inputs)], layer=0, timeout_s=60)
                        status = "OK"
                    except Exception as err:  # every outcome is counted: sent == ok + errors
                        status = getattr(err, "code", lambda: type(err).__name__)()
                        status = getattr(status, "name", str(status))
                    records.append((phase, start - t0, time.perf_counter() - start, status))
                    i += concurrency

            with ThreadPoolExecutor(concurrency) as pool:
                list(pool.map(loop, range(concurrency)))
    queue.put(records)


def start_client(address: str, model: str, phases, concurrency: int):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_client, args=(address, model, phases, concurrency, queue))
    proc.start()
    return proc, queue


def summarise(records, phase: int, skip_s: float = 0.0) -> dict:
    rows = [r for r in records if r[0] == phase]
    t_first = min(r[1] for r in rows)
    measured = [r for r in rows if r[1] >= t_first + skip_s]
    ok = [r for r in measured if r[3] == "OK"]
    span = max(r[1] + r[2] for r in measured) - min(r[1] for r in measured)
    lat = np.array([r[2] for r in ok]) * 1000
    return {
        "requests": len(measured),
        "ok": len(ok),
        "errors": {s: sum(r[3] == s for r in measured) for s in {r[3] for r in measured} - {"OK"}},
        "requests_per_s": round(len(ok) / span, 2),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
    }


def probe_balancedness(served: ServedModel, interval_s: float, until_s: float) -> list[tuple[float, float, int]]:
    """Sample (time, live balancedness, placement version) from the routed-token counters."""
    router = served.deployment.router
    samples = []
    last = router.expert_tokens.copy()
    start = time.perf_counter()
    while time.perf_counter() - start < until_s:
        time.sleep(interval_s)
        now = router.expert_tokens.copy()
        delta, last = now - last, now
        placement = served.deployment.placement
        if delta.sum():
            samples.append((time.perf_counter() - start, float(layer_balancedness(placement, delta).min()), placement.version))
    return samples


def config_for(args, rebalance: bool) -> ServeConfig:
    return ServeConfig().with_overrides(**{
        "model.name": f"skew-{'replicated' if rebalance else 'static'}",
        "model.random": {"layers": 1, "experts": args.experts, "hidden": args.hidden, "ffn": args.ffn, "top_k": 2, "seed": 0},
        "router.port": 0,
        "workers.count": args.workers,
        "workers.torch_threads": 1,
        "workers.num_cpus": 0.5,
        "rebalance.enabled": rebalance,
        "rebalance.window_s": 3.0,
        "rebalance.check_interval_s": 0.25,
        "rebalance.min_interval_s": 1.0,
    })


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--s", type=float, default=1.2, help="Zipf exponent")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=1408)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="one per core")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per request")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--phase-s", type=float, default=20.0, help="seconds per measured phase")
    parser.add_argument("--probe-s", type=float, default=1.0, help="live balancedness sampling interval")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.phase_s = 8.0
    connect_ray(RayConfig(namespace="moe-serve-bench-skew"), num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False)

    weights = weights_for(config_for(args, False))
    traffic = SkewedTraffic({0: weights.gate_weight(0)}, s=args.s, seed=1, aim=2)
    before = [traffic.sample(0, args.tokens)[0] for _ in range(64)]
    hot_before = traffic.hot_experts[:3].tolist()
    traffic.rotate(args.experts // 2)
    after = [traffic.sample(0, args.tokens)[0] for _ in range(64)]
    report = {"zipf_s": args.s, "workers": args.workers, "tokens": args.tokens, "concurrency": args.concurrency,
              "model": {"experts": args.experts, "hidden": args.hidden, "ffn": args.ffn, "top_k": 2},
              "hot_experts_before": hot_before, "hot_experts_after": traffic.hot_experts[:3].tolist()}

    print("# static placement ...", file=sys.stderr, flush=True)
    served = ServedModel(config_for(args, False))
    proc, queue = start_client(served.deployment.address, served.deployment.config.model.name, [(before, args.phase_s)], args.concurrency)
    static = queue.get(timeout=600)
    proc.join(30)
    report["static"] = summarise(static, 0, skip_s=2.0)
    report["static"]["balancedness"] = float(layer_balancedness(served.deployment.placement, served.deployment.router.expert_tokens).min())
    served.stop()

    print("# replicated, then rotation ...", file=sys.stderr, flush=True)
    served = ServedModel(config_for(args, True))
    warm_s = 6.0
    phases = [(before, warm_s + args.phase_s), (after, args.phase_s)]
    proc, queue = start_client(served.deployment.address, served.deployment.config.model.name, phases, args.concurrency)
    samples = probe_balancedness(served, args.probe_s, warm_s + 2 * args.phase_s + 5)
    records = queue.get(timeout=600)
    proc.join(30)
    events = list(served.deployment.controller.events)
    served.stop()

    replicated = summarise(records, 0, skip_s=warm_s)
    rotation_at = min(r[1] for r in records if r[0] == 1)
    t0 = min(r[1] for r in records)
    recovered = [t for t, b, _ in samples if t > rotation_at - t0 and b >= 0.9]
    report["replicated"] = replicated
    report["throughput_ratio"] = round(replicated["requests_per_s"] / report["static"]["requests_per_s"], 3)
    report["p99_ratio"] = round(report["static"]["p99_ms"] / replicated["p99_ms"], 3)
    report["rotation"] = {
        "rotated_at_s": round(rotation_at - t0, 2),
        "balancedness_again_0_9_after_s": round(recovered[0] - (rotation_at - t0), 2) if recovered else None,
        "after_rotation": summarise(records, 1),
    }
    report["balancedness_samples"] = [(round(t, 2), round(b, 3), v) for t, b, v in samples]
    report["events"] = [
        {"at_s": round(e.at_s - events[0].at_s, 2), "reason": e.reason, "before": round(e.balancedness_before, 3),
         "planned": round(e.balancedness_planned, 3), "moves": e.moves,
         "duration_s": round(e.report.duration_s, 3) if e.report else None}
        for e in events
    ] if events else []
    report["failed_requests"] = sum(r[3] != "OK" for r in static + records)
    report["targets"] = {
        "throughput_ratio_ge_1_5": report["throughput_ratio"] >= 1.5,
        "p99_ratio_ge_1_5": report["p99_ratio"] >= 1.5,
        "rebalanced_within_10s": report["rotation"]["balancedness_again_0_9_after_s"] is not None
        and report["rotation"]["balancedness_again_0_9_after_s"] <= 10,
        "zero_failed_requests": report["failed_requests"] == 0,
    }
    emit(report, args.out)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
