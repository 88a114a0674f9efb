"""Served throughput and latency through the real gRPC path, beside the in-process reference
layer and a naive Ray baseline, measured in one run on the same machine.

    .venv/bin/python -m bench.bench_serving            # full matrix, prints JSON
    .venv/bin/python -m bench.bench_serving --quick    # small smoke run

Systems (same weights, same total torch threads):
- reference: `ReferenceMoE` in this process, requests one after another, `threads` torch threads.
- served: `moe-serve` (router in this process, `workers` expert shard actors with
  `threads // workers` torch threads each); the client runs in another process, `concurrency`
  requests in flight.
- naive: the driver gates, sends each worker its tokens with one actor call per worker,
  `ray.get`s them all and combines; no batching; `concurrency` driver threads.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import ray
import torch

from bench.naive import NaiveMoE
from bench.render import emit
from cluster.app.launcher import connect_ray, deploy
from cluster.app.reference import ReferenceMoE
from cluster.config import RayConfig, ServeConfig

CONFIGS = {
    "h1024_e8_top2": dict(hidden=1024, ffn=2816, experts=8, top_k=2),
    "h2048_e64_top6": dict(hidden=2048, ffn=1408, experts=64, top_k=6),
}


def requests_for(tokens: int, concurrency: int, min_tokens: int) -> int:
    """Enough requests for a stable figure: at least `min_tokens` tokens, 2 per in-flight slot."""
    return max(2 * concurrency, -(-min_tokens // tokens), 4)


def summarise(latencies_s: list[float], wall_s: float, tokens: int) -> dict:
    lat = np.array(latencies_s) * 1000
    return {
        "requests": len(lat),
        "tokens_per_s": round(len(lat) * tokens / wall_s, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 2),
        "p99_ms": round(float(np.percentile(lat, 99)), 2),
    }


def run_in_threads(fn, inputs: list[np.ndarray], concurrency: int) -> tuple[list[float], float]:
    def timed(x):
        start = time.perf_counter()
        fn(x)
        return time.perf_counter() - start

    fn(inputs[0])  # warm-up
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(timed, inputs))
    return latencies, time.perf_counter() - start


# ---- the client process (served path) ------------------------------------------------------

def _client_main(address: str, model: str, inputs: list[np.ndarray], concurrency: int, queue) -> None:
    from router_service.client import MoEClient

    with MoEClient(address) as client:
        client.wait_ready(30)
        latencies, wall_s = run_in_threads(lambda x: client.infer(model, x, layer=0), inputs, concurrency)
        first = client.infer(model, inputs[0], layer=0).hidden_states
    queue.put((latencies, wall_s, first))


def served_point(address: str, model: str, inputs: list[np.ndarray], concurrency: int) -> tuple:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_client_main, args=(address, model, inputs, concurrency, queue))
    proc.start()
    result = queue.get(timeout=1800)
    proc.join(60)
    return result


class ServedModel:
    """A deployment whose router runs on an event loop in a background thread."""

    def __init__(self, config: ServeConfig):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.deployment = self._call(deploy(config))

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self._call(self.deployment.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


# ---- one model configuration ---------------------------------------------------------------

def bench_config(name: str, shape: dict, args) -> dict:
    config = ServeConfig().with_overrides(**{
        "model.name": f"bench-{name}",
        "model.random": {"layers": 1, "seed": 0, **shape},
        "router.port": 0,
        "workers.count": args.workers,
        "workers.torch_threads": max(1, args.threads // args.workers),
        "workers.num_cpus": 0.5,
    })
    rng = np.random.default_rng(1)
    points = [(t, c) for t in args.tokens for c in args.concurrency]
    inputs = {
        (t, c): [rng.standard_normal((t, shape["hidden"]), dtype=np.float32)
                 for _ in range(requests_for(t, c, args.min_tokens))]
        for t, c in points
    }
    results: dict = {f"{t}x{c}": {"tokens": t, "concurrency": c} for t, c in points}

    torch.set_num_threads(args.threads)
    reference = ReferenceMoE(_weights(config))
    for t, c in points:
        lat, wall = run_in_threads(lambda x: reference.forward(0, torch.from_numpy(x)), inputs[(t, c)], 1)
        results[f"{t}x{c}"]["reference"] = summarise(lat, wall, t)
    expected = {t: reference.forward(0, torch.from_numpy(inputs[(t, args.concurrency[0])][0]))[0] for t in args.tokens}
    del reference

    torch.set_num_threads(1)
    served = ServedModel(config)
    layer = served.deployment.router._layer
    for t, c in points:
        before = (layer.stage_s.total, time.perf_counter())
        lat, wall, first = served_point(served.deployment.address, config.model.name, inputs[(t, c)], c)
        router_cpu_s = layer.stage_s.total - before[0]
        point = results[f"{t}x{c}"]
        point["served"] = summarise(lat, wall, t)
        point["served"]["router_cpu_fraction"] = round(router_cpu_s / (time.perf_counter() - before[1]), 4)
        if c == args.concurrency[0]:
            want = expected[t]
            point["served"]["max_rel_error"] = float((torch.from_numpy(first.copy()) - want).abs().max() / want.abs().max())
    served.stop()

    naive = NaiveMoE(_weights(config), args.workers, max(1, args.threads // args.workers))
    for t, c in points:
        lat, wall = run_in_threads(lambda x: naive.forward(0, x), inputs[(t, c)], c)
        results[f"{t}x{c}"]["naive"] = summarise(lat, wall, t)
    naive.shutdown()

    for point in results.values():
        ref, srv, nai = point["reference"]["tokens_per_s"], point["served"]["tokens_per_s"], point["naive"]["tokens_per_s"]
        point["served_vs_reference"] = round(srv / ref, 3)
        point["served_vs_naive"] = round(srv / nai, 3)
    return {"model": shape, "points": list(results.values())}


def _weights(config: ServeConfig):
    from cluster.app.launcher import weights_for

    return weights_for(config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names from CONFIGS")
    parser.add_argument("--tokens", default="64,512,4096", help="tokens per request")
    parser.add_argument("--concurrency", default="1,8", help="requests in flight")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="total torch threads")
    parser.add_argument("--workers", type=int, default=2, help="expert shard workers")
    parser.add_argument("--min-tokens", type=int, default=16384, help="tokens per measured point, at least")
    parser.add_argument("--quick", action="store_true", help="one small config, few tokens")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        CONFIGS["quick"] = dict(hidden=256, ffn=512, experts=8, top_k=2)
        args.configs, args.tokens, args.min_tokens = "quick", "64,512", 2048
    args.tokens = [int(t) for t in args.tokens.split(",")]
    args.concurrency = [int(c) for c in args.concurrency.split(",")]

    connect_ray(RayConfig(namespace="moe-serve-bench"), num_cpus=max(2, os.cpu_count() or 2),
                include_dashboard=False)
    report = {
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__},
        "threads": args.threads,
        "workers": args.workers,
        "configs": {},
    }
    for name in args.configs.split(","):
        print(f"# benchmarking {name} ...", file=sys.stderr, flush=True)
        report["configs"][name] = bench_config(name, CONFIGS[name], args)
    emit(report, args.out)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
