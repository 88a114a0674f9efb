"""`moe-serve simulate`: replay a load trace through the planner and the autoscaler, offline.

    moe-serve simulate                                   # built-in diurnal trace, 8..64 workers
    moe-serve simulate --min-workers 128 --max-workers 1024 --png sim.png
    moe-serve simulate deploy/local.yaml --trace recorded.jsonl --json

No Ray starts: `cluster.sim.simulator` is pure. Reports GPU-hours, SLO attainment, moves and
balancedness of the autoscaled run against static provisioning at equal SLO attainment.
"""

from __future__ import annotations

import argparse
import json
import math
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cluster.config import ServeConfig, load_config, validate_config
from cluster.sim.compare import compare
from cluster.sim.simulator import CostModel, fewest_workers, slots_for
from cluster.sim.traces import LoadTrace

SIM_LAYERS, SIM_EXPERTS, SIM_TOP_K = 4, 64, 6
PEAK_SHARE = 0.7  # default peak: what this share of max_workers carries at the autoscaler's target


def sim_config(min_workers: int = 8, max_workers: int = 64, *, layers: int = SIM_LAYERS,
               experts: int = SIM_EXPERTS, slots_per_worker: int | None = None,
               cost: CostModel = CostModel(), count: int | None = None) -> ServeConfig:
    """The built-in simulation config. Slots per worker: two replicas of every layer, or one
    replica of every expert at `min_workers` plus 25%, whichever is more, rounded up to a
    multiple of `layers` (every worker gives each layer the same slots). The autoscaler keeps
    each worker at 16,000-20,000 expert-tokens/s (2/3 of the cost model's default capacity),
    scales out on a queue that would break the SLO (`slo_ms - base_ms`) after 60 s, scales in
    after 15 minutes, by up to an eighth of `max_workers` at once."""
    if slots_per_worker is None:
        slots_per_worker = layers * math.ceil(max(2 * layers, 1.25 * layers * experts / min_workers) / layers)
    return validate_config({
        "workers": {"count": count or min_workers, "min_workers": min_workers, "max_workers": max_workers,
                    "slots_per_worker": slots_per_worker},
        "autoscaling": {
            "enabled": True, "target_tokens_per_s_per_worker": 20000.0,
            "max_queue_delay_ms": cost.slo_ms - cost.base_ms, "downscale_utilization": 0.8,
            "upscale_delay_s": 60.0, "downscale_delay_s": 900.0, "max_step": max(4, max_workers // 8),
        },
    }, source="built-in simulation config")


def add_simulate_parser(sub) -> None:
    p = sub.add_parser("simulate", help="replay a load trace through the planner and autoscaler (no Ray)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="deployment YAML (workers, rebalance, autoscaling); default: a built-in one")
    p.add_argument("--trace", metavar="FILE.jsonl", help="recorded trace (t_s + tokens_per_s per line) instead of the diurnal one")
    g = p.add_argument_group("built-in diurnal trace")
    g.add_argument("--days", type=float, default=1.0, help="simulated days")
    g.add_argument("--step-s", type=float, default=300.0, help="seconds per step (also the resampling step of --trace)")
    g.add_argument("--layers", type=int, help=f"MoE layers (default: model.random.layers, else {SIM_LAYERS})")
    g.add_argument("--experts", type=int, help=f"experts per layer (default: model.random.experts, else {SIM_EXPERTS})")
    g.add_argument("--top-k", type=int, help=f"experts per token (default: model.random.top_k, else {SIM_TOP_K})")
    g.add_argument("--peak-tokens-per-s", type=float, help=f"model tokens/s at the daily peak (default: what {PEAK_SHARE * 100:.0f}%% of max_workers carry at the target)")
    g.add_argument("--trough-ratio", type=float, default=0.25, help="night load / peak load")
    g.add_argument("--zipf-s", type=float, default=1.0, help="skew of expert popularity")
    g.add_argument("--drift-experts-per-hour", type=float, default=0.5, help="hot-set changes per hour")
    g.add_argument("--bursts-per-day", type=float, default=1.0, help="short bursts of +25%% per day")
    g.add_argument("--seed", type=int, default=0, help="seed of the trace")
    w = p.add_argument_group("workers and cost model")
    w.add_argument("--min-workers", type=int, help="workers.min_workers")
    w.add_argument("--max-workers", type=int, help="workers.max_workers")
    w.add_argument("--slots-per-worker", type=int, help="workers.slots_per_worker")
    w.add_argument("--slo-ms", type=float, help=f"latency SLO per batch (default {CostModel().slo_ms:g})")
    w.add_argument("--capacity-tokens-per-s", type=float, help="expert-tokens/s one worker serves")
    w.add_argument("--startup-s", type=float, help="seconds from asking for a worker until it serves")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of tables")
    p.add_argument("--png", metavar="FILE", help="write the plot (load, workers, balancedness, latency, moves)")


def cmd_simulate(args, console: Console) -> int:
    cost = CostModel(**{k: v for k, v in (("slo_ms", args.slo_ms), ("capacity_tokens_per_s", args.capacity_tokens_per_s),
                                          ("startup_s", args.startup_s)) if v is not None})
    recorded = LoadTrace.from_jsonl(args.trace, args.step_s) if args.trace else None
    config = _config(args, cost, recorded)
    trace = recorded or _diurnal(args, config)
    config = _with_start_count(config, trace, builtin=args.config is None)
    started = time.perf_counter()
    with _progress() as progress:
        result = compare(trace, config, cost, progress=progress)
    wall_s = time.perf_counter() - started
    if args.png:
        from cluster.sim.report import write_png
        write_png(result, args.png, cost.slo_ms)
    report = {"settings": _settings(trace, config, cost, args), "wall_s": round(wall_s, 2), **result.to_dict()}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        from cluster.sim.report import summary_table
        console.print(summary_table(result, title=f"{trace.steps} steps of {trace.step_s:g} s, {trace.layers} layers x "
                                                  f"{trace.experts} experts, {wall_s:.1f} s to simulate"))
        console.print(f"GPU-hours saved against static provisioning at equal SLO attainment: "
                      f"[bold]{result.gpu_hours_saved:.1%}[/] (target >= 30%)", highlight=False)
        if args.png:
            console.print(f"wrote {args.png}", highlight=False)
    return 0


def _config(args, cost: CostModel, recorded: LoadTrace | None) -> ServeConfig:
    if args.config is None:
        low, high = args.min_workers or 8, args.max_workers or 64
        if low > high:
            raise ValueError(f"--min-workers ({low}) exceeds --max-workers ({high})")
        layers, experts = args.layers or SIM_LAYERS, args.experts or SIM_EXPERTS
        if recorded is not None:
            layers, experts = recorded.layers, recorded.experts
        return sim_config(low, high, layers=layers, experts=experts, slots_per_worker=args.slots_per_worker, cost=cost)
    config = load_config(args.config)
    low, high = config.workers.bounds
    low, high = args.min_workers or low, args.max_workers or high
    if low >= high:
        raise ValueError(f"simulate needs a range of workers to scale within: workers.min_workers ({low}) must "
                         f"be below workers.max_workers ({high}); set them in {args.config} or with --min-workers/--max-workers")
    return config.with_overrides(**{
        "workers.min_workers": low, "workers.max_workers": high, "workers.count": min(max(config.workers.count, low), high),
        "workers.slots_per_worker": args.slots_per_worker, "autoscaling.enabled": True,
    })


def _diurnal(args, config: ServeConfig) -> LoadTrace:
    model = config.model.random
    layers = args.layers or (model.layers if model else SIM_LAYERS)
    experts = args.experts or (model.experts if model else SIM_EXPERTS)
    top_k = args.top_k or (model.top_k if model else min(SIM_TOP_K, experts))
    peak = args.peak_tokens_per_s
    if peak is None:
        peak = PEAK_SHARE * config.workers.bounds[1] * config.autoscaling.target_tokens_per_s_per_worker / (top_k * layers)
    return LoadTrace.diurnal(layers, experts, top_k, args.days, args.step_s, peak, args.trough_ratio, args.zipf_s,
                             args.drift_experts_per_hour, args.seed, bursts_per_day=args.bursts_per_day)


def _with_start_count(config: ServeConfig, trace: LoadTrace, builtin: bool) -> ServeConfig:
    """The built-in config starts at the count the first step calls for; a YAML at its count."""
    low, high = config.workers.bounds
    need = fewest_workers(config, trace.layers * trace.experts)
    if low < need:
        raise ValueError(f"workers.min_workers ({low}) x {slots_for(config, trace.layers * trace.experts)} slots cannot "
                         f"hold {trace.layers} layers x {trace.experts} experts; use at least {need} workers or more slots")
    if not builtin:
        return config
    first = math.ceil(trace.total_tokens_per_s[0] / config.autoscaling.target_tokens_per_s_per_worker)
    return config.with_overrides(**{"workers.count": min(max(first, low), high)})


def _settings(trace: LoadTrace, config: ServeConfig, cost: CostModel, args) -> dict:
    return {
        "trace": args.trace or "diurnal", "steps": trace.steps, "step_s": trace.step_s, "layers": trace.layers,
        "experts": trace.experts, "peak_expert_tokens_per_s": round(float(trace.total_tokens_per_s.max()), 1),
        "workers": {"start": config.workers.count, "min": config.workers.bounds[0], "max": config.workers.bounds[1],
                    "slots_per_worker": slots_for(config, trace.layers * trace.experts)},
        "target_tokens_per_s_per_worker": config.autoscaling.target_tokens_per_s_per_worker,
        "cost_model": cost.model_dump(),
    }


class _progress:
    """A rich progress bar per simulated run (on stderr, so `--json` output stays clean)."""

    def __init__(self):
        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                             console=Console(stderr=True))
        self._tasks: dict[str, int] = {}

    def __enter__(self):
        self._bar.__enter__()
        return self.update

    def __exit__(self, *exc) -> None:
        self._bar.__exit__(*exc)

    def update(self, label: str, done: int, total: int) -> None:
        if label not in self._tasks:
            self._tasks[label] = self._bar.add_task(f"simulating {label}", total=total)
        self._bar.update(self._tasks[label], completed=done)


HANDLERS = {"simulate": cmd_simulate}
