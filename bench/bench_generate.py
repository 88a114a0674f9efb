"""Text generation through the served stack beside `transformers` in this process, measured in
one run on the same machine, for a Mixtral-shaped ("S") and a Qwen3-MoE-shaped ("Q") model.

    .venv/bin/python -m bench.bench_generate                      # both models, prints JSON
    .venv/bin/python -m bench.bench_generate --quick --out g.json  # tiny smoke run (under a minute)

Systems (same checkpoint: random seeded weights, float32; greedy; exactly the asked tokens):
- served: `moe-serve` (router, its dense model and its continuous-batching engine in this
  process, `--workers` expert shard actors with 1 torch thread each, router 2 threads); the client
  runs in another process (`bench.generate_load`) and streams over the OpenAI-compatible HTTP API,
  so time to first token (TTFT) is seen per request.
- transformers: `generate` in this process, 2 torch threads; for the stream, (a) static batches and
  (b) `transformers`' own continuous batching, sized like the served engine.

Workloads (`Workloads`): single (one 512-token prompt, 128 new tokens: TTFT and time per output
token, TPOT, medians of `--repeats` runs); concurrent (32 requests of 128 tokens at once, 64
new each: output tokens/s); mixed (128 requests, prompt and output lengths log-uniform, a Poisson
stream at `--load` x the served concurrent throughput / mean output length, the same arrival
times for every system: output tokens/s and p50/p99 TTFT and TPOT). Each system gets a short
warm-up request first. Targets are ratios measured in the same run (`targets`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import ray
import torch
import transformers

from bench import generate_baselines as hf
from bench.bench_serving import ServedModel
from bench.generate_load import Request, Timing, at_rate, poisson_requests, same_requests, summarise, summarise_single
from bench.render import emit
from cluster.app.launcher import connect_ray
from cluster.config import RayConfig, ServeConfig, validate_config

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "moe-serve-bench-generate"
TORCH_THREADS = 2  # transformers in process, and the router
GENERATION = {"kv_cache_mb": 1024, "max_num_seqs": 64, "max_batch_tokens": 2048, "prefill_chunk_tokens": 512}
TPOT_BUDGET_MS_PER_MOE_LAYER = 1.5
CLIENT_TIMEOUT_S = 3600


@dataclass(frozen=True)
class Workloads:
    single_prompt: int = 512
    single_new: int = 128
    repeats: int = 3
    concurrent: int = 32
    concurrent_prompt: int = 128
    concurrent_new: int = 64
    mixed: int = 128
    mixed_prompt: tuple[int, int] = (16, 1024)
    mixed_new: tuple[int, int] = (16, 256)
    static_max_batch: int = 32
    decode_probe_prompt: int = 16  # the served decode breakdown's prompt (short: its prefill is negligible)


QUICK = Workloads(single_prompt=64, single_new=16, repeats=2, concurrent=4, concurrent_prompt=32, concurrent_new=8,
                  mixed=8, mixed_prompt=(8, 64), mixed_new=(4, 16), static_max_batch=4, decode_probe_prompt=8)


def progress(message: str) -> None:
    print(f"# {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


# ---- the served side ------------------------------------------------------------------------------

def serve_config(name: str, checkpoint: Path, workers: int) -> ServeConfig:
    return validate_config({
        "model": {"name": f"bench-gen-{name.lower()}", "checkpoint": str(checkpoint)},
        "workers": {"count": workers, "torch_threads": 1, "num_cpus": 0.5},
        "router": {"port": 0, "http_port": 0, "torch_threads": TORCH_THREADS},
        "generation": dict(GENERATION),
        "rebalance": {"enabled": False},
        "ray": {"namespace": NAMESPACE},
    }, source="bench_generate config")


def client_timings(address: str, model: str, requests: list[Request], sequential: bool = False) -> list[Timing]:
    """Run `requests` from a client process of its own (`bench.generate_load`)."""
    spec = {"url": f"http://{address}/v1/completions", "model": model, "requests": [asdict(r) for r in requests],
            "sequential": sequential}
    done = subprocess.run([sys.executable, "-m", "bench.generate_load"], input=json.dumps(spec), cwd=ROOT,
                          stdout=subprocess.PIPE, text=True, timeout=CLIENT_TIMEOUT_S, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the client process failed (exit {done.returncode}); its stderr is above")
    return [Timing(**t) for t in json.loads(done.stdout)["timings"]]


class MoEProbe:
    """Times every MoE layer call the served engine makes, as (tokens, wall seconds), by wrapping
    the engine's MoE hook (a benchmark-only seam: the engine exposes no public one)."""

    def __init__(self, engine):
        self.calls: list[tuple[int, float]] = []
        inner = engine._moe

        async def timed(layer: int, hidden: torch.Tensor, *rest):  # rest: whatever else the hook takes
            start = time.perf_counter()
            try:
                return await inner(layer, hidden, *rest)
            finally:
                self.calls.append((int(hidden.shape[0]), time.perf_counter() - start))

        engine._moe = timed

    def take(self) -> list[tuple[int, float]]:
        calls, self.calls = self.calls, []
        return calls


def decode_breakdown(served: ServedModel, probe: MoEProbe, request: Request, moe_layers: int) -> dict:
    """Where one sequence's time per output token goes on the served side: a short prompt (so
    the figures are decode steps), the MoE layer calls as the router waits for them, the workers'
    compute in them, an empty actor call's round trip, and the rest (dense model, sampling, HTTP)."""
    deployment = served.deployment
    layer, pool = deployment.router._layer, deployment.pool
    round_trips = []
    for _ in range(50):
        start = time.perf_counter()
        ray.get(pool.handles[0].stats.remote())
        round_trips.append(time.perf_counter() - start)
    busy_before, stages_before = pool.stats(), (layer.stage_s.total, layer.stage_s.batches)
    probe.take()
    timing = client_timings(deployment.http_address, deployment.config.model.name, [request])[0]
    calls = [s for n, s in probe.take() if n == 1]
    busy_s = sum(a["busy_s"] - b["busy_s"] for a, b in zip(pool.stats(), busy_before))
    router_cpu_s = layer.stage_s.total - stages_before[0]
    layer_calls = layer.stage_s.batches - stages_before[1]
    tpot_ms = timing.tpot_s * 1000
    moe_ms = float(np.median(calls)) * 1000 * moe_layers
    return {
        "prompt_tokens": len(request.prompt), "new_tokens": request.new_tokens,
        "tpot_ms": round(tpot_ms, 3),
        "moe_ms_per_token": round(moe_ms, 3),
        "moe_share_of_tpot": round(moe_ms / tpot_ms, 3),
        "moe_ms_per_layer_call_p50": round(moe_ms / moe_layers, 3),
        "worker_compute_ms_per_layer_call": round(busy_s * 1000 / max(1, layer_calls), 3),
        "router_moe_cpu_ms_per_layer_call": round(router_cpu_s * 1000 / max(1, layer_calls), 3),
        "empty_actor_call_ms_p50": round(float(np.median(round_trips)) * 1000, 3),
        "dense_and_rest_ms_per_token": round(tpot_ms - moe_ms, 3),
    }


# ---- one model --------------------------------------------------------------------------------------

def bench_model(name: str, args, work: Workloads, directory: Path) -> dict:
    load_start = os.getloadavg()
    progress(f"{name}: building and saving the model")
    model = hf.build_model(name, args.quick, args.seed, directory / name)
    vocab = model.config.vocab_size
    rng = np.random.default_rng(args.seed)
    one = same_requests(rng, 1, work.single_prompt, work.single_new, vocab)[0]
    together = same_requests(rng, work.concurrent, work.concurrent_prompt, work.concurrent_new, vocab)
    unit_stream = poisson_requests(rng, work.mixed, work.mixed_prompt, work.mixed_new, vocab)
    probe_request = Request(one.prompt[:work.decode_probe_prompt], work.single_new)

    progress(f"{name}: deploying the served model")
    served = ServedModel(serve_config(name, directory / name, args.workers))
    try:
        deployment = served.deployment
        text = deployment.router.text
        if text is None:
            raise RuntimeError(f"the served model does not generate: {deployment.describe_text()}")
        probe = MoEProbe(text.engine)
        moe_layers = len(deployment.weights.spec.moe_layers)
        address, served_name = deployment.http_address, deployment.config.model.name
        torch.set_num_threads(TORCH_THREADS)
        hf.warm_up(model, one.prompt)

        progress(f"{name}: single, served")
        single = {"served": summarise_single(client_timings(address, served_name, [one] * work.repeats, True))}
        progress(f"{name}: single, served decode breakdown")
        single["served_decode_breakdown"] = decode_breakdown(served, probe, probe_request, moe_layers)
        progress(f"{name}: single, transformers")
        single["transformers"] = summarise_single(hf.single(model, one, work.repeats))

        progress(f"{name}: concurrent, served")
        concurrent = {"served": summarise(client_timings(address, served_name, together))}
        progress(f"{name}: concurrent, served with pipelined micro-batches")
        text.engine.microbatches = 2  # generation.pipeline_microbatches, switched on the live engine
        try:
            concurrent["served_pipelined"] = summarise(client_timings(address, served_name, together))
        finally:
            text.engine.microbatches = 1
        progress(f"{name}: concurrent, transformers generate")
        concurrent["transformers"] = summarise(hf.static_batch(model, together))

        mean_new = float(np.mean([r.new_tokens for r in unit_stream]))
        rate = args.load * concurrent["served"]["tokens_per_s"] / mean_new
        stream = at_rate(unit_stream, rate)
        mixed: dict = {"rate_per_s": round(rate, 4), "mean_new_tokens": round(mean_new, 1),
                       "mean_prompt_tokens": round(float(np.mean([len(r.prompt) for r in stream])), 1),
                       "last_arrival_s": round(stream[-1].at_s, 2)}
        progress(f"{name}: mixed stream ({len(stream)} requests at {rate:.3f}/s), served")
        mixed["served"] = summarise(client_timings(address, served_name, stream))
        progress(f"{name}: mixed stream, transformers static batching")
        mixed["transformers_static"] = summarise(hf.static_stream(model, stream, work.static_max_batch))
        progress(f"{name}: mixed stream, transformers continuous batching")
        mixed["transformers_continuous"] = continuous_or_error(model, stream)
    finally:
        progress(f"{name}: stopping the served model")
        served.stop()
    load_end = os.getloadavg()
    result = {"model": describe_model(model, moe_layers), "single": single, "concurrent": concurrent, "mixed": mixed,
              "load_average": {"start": [round(v, 2) for v in load_start], "end": [round(v, 2) for v in load_end]}}
    result["targets"] = targets(result, moe_layers)
    return result


def continuous_or_error(model: torch.nn.Module, stream: list[Request]) -> dict:
    """transformers' continuous batching on the stream, or why it is unavailable here."""
    try:
        timings = hf.continuous_stream(model, stream, GENERATION["kv_cache_mb"], GENERATION["max_batch_tokens"],
                                       GENERATION["max_num_seqs"])
    except Exception as err:  # any failure of the baseline is a finding, not a crash of the benchmark
        progress(f"transformers' continuous batching is unavailable: {type(err).__name__}: {err}")
        return {"available": False, "error": f"{type(err).__name__}: {err}"}
    return {"available": True, **summarise(timings)}


def describe_model(model: torch.nn.Module, moe_layers: int) -> dict:
    config = model.config
    keys = ("hidden_size", "num_hidden_layers", "num_local_experts", "num_experts", "num_experts_per_tok",
            "intermediate_size", "moe_intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
            "vocab_size")
    return {"family": config.model_type, "moe_layers": moe_layers,
            "parameters": sum(p.numel() for p in model.parameters()),
            "experts_implementation": getattr(config, "_experts_implementation", None),
            "attention_implementation": config._attn_implementation,
            **{k: getattr(config, k) for k in keys if getattr(config, k, None) is not None}}


# ---- targets ------------------------------------------------------------------------------------------

def _check(name: str, ratio: float | None, target: str, passed: bool | None, **figures) -> dict:
    return {"name": name, "ratio": None if ratio is None else round(ratio, 3), "target": target, "pass": passed,
            **figures}


def targets(result: dict, moe_layers: int) -> list[dict]:
    """Pass/fail of each target, from figures measured in the same run."""
    single, concurrent, mixed = result["single"], result["concurrent"], result["mixed"]
    tpot_s, tpot_h = single["served"]["tpot_ms"], single["transformers"]["tpot_ms"]
    budget_ms = TPOT_BUDGET_MS_PER_MOE_LAYER * moe_layers
    ttft = single["served"]["ttft_ms"] / single["transformers"]["ttft_ms"]
    conc = concurrent["served"]["tokens_per_s"] / concurrent["transformers"]["tokens_per_s"]
    static = mixed["served"]["tokens_per_s"] / mixed["transformers_static"]["tokens_per_s"]
    checks = [
        _check("single TPOT <= transformers + 1.5 ms per MoE layer", tpot_s / tpot_h,
               f"served - transformers <= {budget_ms:g} ms", tpot_s - tpot_h <= budget_ms,
               excess_ms=round(tpot_s - tpot_h, 3)),
        _check("single TTFT <= 1.3x transformers", ttft, "<= 1.3", ttft <= 1.3),
        _check("concurrent tokens/s >= 0.9x transformers generate", conc, ">= 0.9", conc >= 0.9),
        _check("mixed tokens/s >= 1.5x transformers static batching", static, ">= 1.5", static >= 1.5),
    ]
    piped = concurrent["served_pipelined"]["tokens_per_s"] / concurrent["served"]["tokens_per_s"]
    checks.append(_check("pipelined micro-batches: concurrent tokens/s no slower than without", piped,
                         ">= 0.95 (the run's noise)", piped >= 0.95))
    cb = mixed["transformers_continuous"]
    if cb["available"]:
        ratio = mixed["served"]["tokens_per_s"] / cb["tokens_per_s"]
        checks.append(_check("mixed tokens/s >= 1.0x transformers continuous batching", ratio, ">= 1.0", ratio >= 1.0))
    else:
        checks.append(_check("mixed tokens/s >= 1.0x transformers continuous batching", None, ">= 1.0", None,
                             note="transformers' continuous batching unavailable: " + cb["error"]))
    return checks


# ---- the run --------------------------------------------------------------------------------------------

def machine() -> dict:
    cpu_model = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": cpu_model, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "ray": ray.__version__}


def settings(args, work: Workloads) -> dict:
    return {
        "seed": args.seed, "quick": args.quick, "load": args.load,
        "served": {"workers": args.workers, "worker_torch_threads": 1, "router_torch_threads": TORCH_THREADS,
                   "rebalance": "disabled", "generation": GENERATION, "client": "separate process, HTTP streaming"},
        "transformers": {"torch_threads": TORCH_THREADS, "static_max_batch": work.static_max_batch,
                         "continuous": {"page_tokens": hf.CB_PAGE_TOKENS, "kv_cache_mb": GENERATION["kv_cache_mb"],
                                        "max_batch_tokens": GENERATION["max_batch_tokens"],
                                        "max_requests_per_batch": GENERATION["max_num_seqs"]}},
        "workloads": asdict(work),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="S,Q", help="comma-separated, from " + ",".join(hf.MODELS))
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few requests: a smoke run")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--seed", type=int, default=0, help="weights, prompts, lengths and arrivals")
    parser.add_argument("--requests", type=int, help="requests in the mixed stream (default 128, quick 8)")
    parser.add_argument("--repeats", type=int, help="runs of the single sequence (default 3, quick 2)")
    parser.add_argument("--load", type=float, default=0.9,
                        help="mixed arrival rate as a fraction of served concurrent tokens/s / mean output length "
                             "(the mixed prompts are longer: 0.9 offers more than the served capacity)")
    parser.add_argument("--workers", type=int, default=2, help="expert shard workers")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in hf.MODELS]
    if unknown or not names:
        parser.error(f"--models: unknown {unknown}; choose from {list(hf.MODELS)}")
    work = QUICK if args.quick else Workloads()
    overrides = {k: v for k, v in (("mixed", args.requests), ("repeats", args.repeats)) if v is not None}
    work = replace(work, **overrides)

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    progress("starting Ray")
    connect_ray(RayConfig(namespace=NAMESPACE), num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False)
    report = {"machine": machine(), "settings": settings(args, work), "models": {}}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-generate-") as directory:
            for name in names:
                report["models"][name] = bench_model(name, args, work, Path(directory))
    finally:
        ray.shutdown()
    emit(report, args.out)
    for name, result in report["models"].items():
        for check in result["targets"]:
            verdict = {True: "PASS", False: "FAIL", None: "N/A"}[check["pass"]]
            progress(f"{name}: {verdict} {check['name']}: ratio {check['ratio']} (target {check['target']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
