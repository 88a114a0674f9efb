"""Served throughput and latency through the real gRPC path, beside the in-process reference
layer and a naive Ray baseline, measured in one run on the same machine.

    .venv/bin/python -m bench.bench_serving            # full matrix, prints JSON
    .venv/bin/python -m bench.bench_serving --quick    # small smoke run
    .venv/bin/python -m bench.bench_serving --dtypes float32,bfloat16   # which expert dtypes

Systems (same weights, same total torch threads):
- reference: `ReferenceMoE` in this process, requests one after another, `threads` torch threads.
- served: `moe-serve` (router in this process, `workers` expert shard actors with
  `threads // workers` torch threads each); the client runs in another process, `concurrency`
  requests in flight.
- naive: the driver gates, sends each worker its tokens with one actor call per worker,
  `ray.get`s them all and combines; no batching; `concurrency` driver threads.

Expert dtypes (`--dtypes`, default all three, same random weights, same inputs): `float32` runs
the three systems above (`points`); `bfloat16` and `fp8` (the same weights rounded to BF16, or
quantized to FP8 in 128x128 blocks with float32 scales, `model.random.dtype`) run the served
layer only, its workers in their `auto` compute dtype (BF16 on a CPU with AMX / AVX512-BF16),
and are reported under `compact` with `served_vs_float32` (served tokens/s against the float32
served layer at the same point) and `max_rel_error` against float32 math on the same stored
weights. The served models of every dtype are up together and measured in turn at each point.
`held` gives, per dtype, how the workers hold and compute the experts and the bytes they hold;
each served point has `worker_busy_ms_per_request`, the expert math's share of its latency.
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
DTYPES = ("float32", "bfloat16", "fp8")  # model.random.dtype values the benchmark knows


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
        self.deployment = self.call(deploy(config))

    def call(self, coro):
        """Run `coro` on the router's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def busy(self) -> list[float]:
        """Seconds each worker has spent computing so far."""
        return [s["busy_s"] for s in self.deployment.pool.stats()]

    def stop(self) -> None:
        self.call(self.deployment.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


# ---- one model configuration ---------------------------------------------------------------

def bench_config(name: str, shape: dict, args) -> dict:
    """Every point for each of `args.dtypes`: float32 with all three systems (`points`), the
    compact dtypes served only (`compact`). The served models of all dtypes are up together and
    measured in turn at each point, so a change in the shared machine's load between points
    does not read as a difference between dtypes."""
    inputs = _inputs(shape, args)
    configs = {dtype: _config(name, shape, args, dtype) for dtype in args.dtypes}
    results: dict = {f"{t}x{c}": {"tokens": t, "concurrency": c} for t, c in inputs}

    torch.set_num_threads(args.threads)
    expected: dict = {}  # dtype -> tokens -> float32 math on the stored weights (dequantized)
    for dtype, config in configs.items():
        reference = ReferenceMoE(_weights(config))
        if dtype == "float32":
            for t, c in inputs:
                lat, wall = run_in_threads(lambda x: reference.forward(0, torch.from_numpy(x)), inputs[(t, c)], 1)
                results[f"{t}x{c}"]["reference"] = summarise(lat, wall, t)
        expected[dtype] = {t: reference.forward(0, torch.from_numpy(inputs[(t, args.concurrency[0])][0]))[0]
                           for t in args.tokens}
        reference = None  # its weights go before the next dtype's (and the served models') load

    torch.set_num_threads(1)
    served = {dtype: ServedModel(config) for dtype, config in configs.items()}
    held = {dtype: _held(model) for dtype, model in served.items()}
    measured: dict = {dtype: {} for dtype in configs}
    for (t, c), requests in inputs.items():
        for dtype, model in served.items():
            check = expected[dtype][t] if c == args.concurrency[0] else None
            measured[dtype][(t, c)] = _served(model, configs[dtype].model.name, requests, c, t, check)
    for model in served.values():
        model.stop()

    report: dict = {"model": shape, "held": held}
    if "float32" in configs:
        naive = NaiveMoE(_weights(configs["float32"]), args.workers, max(1, args.threads // args.workers))
        for t, c in inputs:
            lat, wall = run_in_threads(lambda x: naive.forward(0, x), inputs[(t, c)], c)
            results[f"{t}x{c}"]["naive"] = summarise(lat, wall, t)
        naive.shutdown()
        for (t, c), point in zip(inputs, results.values()):
            point["served"] = measured["float32"][(t, c)]
            ref, srv, nai = point["reference"]["tokens_per_s"], point["served"]["tokens_per_s"], point["naive"]["tokens_per_s"]
            point["served_vs_reference"] = round(srv / ref, 3)
            point["served_vs_naive"] = round(srv / nai, 3)
        report["points"] = list(results.values())
    report["compact"] = {dtype: [_compact_point(t, c, served_point_, measured.get("float32", {}).get((t, c)))
                                 for (t, c), served_point_ in measured[dtype].items()]
                         for dtype in configs if dtype != "float32"}
    return report


def _config(name: str, shape: dict, args, dtype: str = "float32") -> ServeConfig:
    return ServeConfig().with_overrides(**{
        "model.name": f"bench-{name}-{dtype}",
        "model.random": {"layers": 1, "seed": 0, "dtype": dtype, **shape},
        "router.port": 0,
        "workers.count": args.workers,
        "workers.torch_threads": max(1, args.threads // args.workers),
        "workers.num_cpus": 0.5,
    })


def _inputs(shape: dict, args) -> dict[tuple[int, int], list[np.ndarray]]:
    """The same requests for every dtype: (tokens, concurrency) -> inputs `[tokens, H]`."""
    rng = np.random.default_rng(1)
    points = [(t, c) for t in args.tokens for c in args.concurrency]
    return {
        (t, c): [rng.standard_normal((t, shape["hidden"]), dtype=np.float32)
                 for _ in range(requests_for(t, c, args.min_tokens))]
        for t, c in points
    }


def _held(served: ServedModel) -> dict:
    """How the workers hold and compute the experts, and the bytes they hold."""
    pool = served.deployment.pool
    info = ray.get(pool.handles[0].ready.remote())
    return {"expert_dtype": info["expert_dtype"], "compute_dtype": info["compute_dtype"],
            "weight_bytes": sum(s["weight_bytes"] for s in pool.stats())}


def _served(served: ServedModel, model: str, requests: list[np.ndarray], concurrency: int, tokens: int,
            expected: torch.Tensor | None) -> dict:
    """One served point: tokens/s, latency, the router's CPU share, the workers' compute per
    request, and (given `expected`) the first answer's error against it."""
    layer = served.deployment.router._layer
    before = (layer.stage_s.total, time.perf_counter(), _busy_s(served))
    lat, wall, first = served_point(served.deployment.address, model, requests, concurrency)
    result = summarise(lat, wall, tokens)
    result["router_cpu_fraction"] = round((layer.stage_s.total - before[0]) / (time.perf_counter() - before[1]), 4)
    result["worker_busy_ms_per_request"] = _busy_ms(served, before[2], len(requests))
    if expected is not None:
        result["max_rel_error"] = float((torch.from_numpy(first.copy()) - expected).abs().max() / expected.abs().max())
    return result


def _compact_point(tokens: int, concurrency: int, served: dict, float32: dict | None) -> dict:
    point = {"tokens": tokens, "concurrency": concurrency, "served": served}
    if float32 is not None:
        point["served_vs_float32"] = round(served["tokens_per_s"] / float32["tokens_per_s"], 3)
    return point


def _busy_s(served: ServedModel) -> float:
    """Seconds the workers have spent computing so far, all together."""
    return sum(served.busy())


def _busy_ms(served: ServedModel, since_s: float, requests: int) -> float:
    """The workers' compute per request and per worker (the client's warm-up and its checked
    request included, hence `requests + 2`): what the expert math takes of each request."""
    workers = len(served.deployment.pool.handles)
    return round((_busy_s(served) - since_s) * 1000 / (requests + 2) / workers, 2)


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
    parser.add_argument("--dtypes", default=",".join(DTYPES),
                        help=f"expert dtypes, comma-separated from {', '.join(DTYPES)} (float32: all three systems; "
                             f"the others: the served layer)")
    parser.add_argument("--quick", action="store_true", help="one small config, few tokens")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        CONFIGS["quick"] = dict(hidden=256, ffn=512, experts=8, top_k=2)
        args.configs, args.tokens, args.min_tokens = "quick", "64,512", 2048
    args.tokens = [int(t) for t in args.tokens.split(",")]
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = [d for d in args.dtypes if d not in DTYPES]
    if unknown or not args.dtypes:
        parser.error(f"--dtypes: {unknown or 'nothing'} not known; choose from {', '.join(DTYPES)}")

    # every dtype's served model is up at once (measured in turn): room in Ray's CPU count for
    # all their workers; only one model computes at a time, so the cores are not oversubscribed
    connect_ray(RayConfig(namespace="moe-serve-bench"), num_cpus=max(2, os.cpu_count() or 2) * len(args.dtypes),
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
