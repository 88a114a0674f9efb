"""Autoscaler vs static peak provisioning, in the trace-replay simulator (`cluster.sim.simulator`).

    PYTHONPATH=. .venv/bin/python -m bench.bench_autoscale_sim                # 64, 256, 1024 GPUs
    PYTHONPATH=. .venv/bin/python -m bench.bench_autoscale_sim --max-workers 64 --days 2

Setup: the built-in diurnal trace (`LoadTrace.diurnal`: 4 MoE layers x 64 experts, top-6,
Zipf s=1.0, trough = peak / 4, a hot-set change every ~2 hours, one +25% burst of 20 minutes a
day, seed 0), its peak sized to 70% of `max_workers` at the autoscaler's target; the built-in
simulation config (`simulate_cli.sim_config`: `min_workers = max_workers / 8`, slots per worker
max(8, 1.25 x 256 / min_workers) rounded up to a multiple of 4) and the default `CostModel`
(30,000 expert-tokens/s per worker, SLO 100 ms, base 25 ms, 1 s per replica load, 300 s to
start a worker).

For each `max_workers`: the autoscaled run; static provisioning with live rebalancing and no
autoscaling at the fewest workers whose SLO attainment reaches the autoscaled run's (bisection,
`simulator.compare`); and static at ceil(peak / target). Target: GPU-hours saved against the
static run at equal SLO attainment >= 0.30. Wall times are this machine's, per run (taken from
the progress callbacks), and `plan_placement` at `max_workers` (fresh and re-plan).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from bench.render import emit
from cluster.app.simulate_cli import PEAK_SHARE, SIM_EXPERTS, SIM_LAYERS, SIM_TOP_K, sim_config
from cluster.planning.planner import plan_placement
from cluster.sim.compare import compare
from cluster.sim.simulator import CostModel, slots_for
from cluster.sim.traces import LoadTrace

MAX_WORKERS = (64, 256, 1024)
SAVED_TARGET = 0.30


def run_case(max_workers: int, days: float, step_s: float, seed: int, bursts_per_day: float) -> dict:
    cost = CostModel()
    config = sim_config(max_workers // 8, max_workers, cost=cost)
    target = config.autoscaling.target_tokens_per_s_per_worker
    peak = PEAK_SHARE * max_workers * target / (SIM_TOP_K * SIM_LAYERS)
    trace = LoadTrace.diurnal(SIM_LAYERS, SIM_EXPERTS, SIM_TOP_K, days, step_s, peak, 0.25, 1.0, 0.5, seed,
                              bursts_per_day=bursts_per_day)
    start = min(max(math.ceil(trace.total_tokens_per_s[0] / target), max_workers // 8), max_workers)
    config = config.with_overrides(**{"workers.count": start})
    clock: dict[str, list[float]] = {}

    def progress(label: str, done: int, total: int) -> None:
        clock.setdefault(label, [time.perf_counter(), 0.0])[1] = time.perf_counter()

    started = time.perf_counter()
    result = compare(trace, config, cost, progress=progress)
    total_s = time.perf_counter() - started
    report = result.to_dict()
    auto, static, rule = report["autoscaled"], report["static"], report["static_peak_rule"]
    return {
        "max_workers": max_workers, "min_workers": config.workers.bounds[0],
        "slots_per_worker": slots_for(config, trace.layers * trace.experts), "steps": trace.steps,
        "peak_expert_tokens_per_s": round(float(trace.total_tokens_per_s.max())),
        "autoscaled": _pick(auto, "gpu_hours", "slo_attainment", "moves", "balancedness_mean", "workers_min",
                            "workers_max", "scale_outs", "scale_ins", "rebalances"),
        "static_equal_slo": _pick(static, "workers", "reached", "gpu_hours", "slo_attainment", "moves", "balancedness_mean"),
        "static_peak_rule": _pick(rule, "workers", "gpu_hours", "slo_attainment", "moves", "balancedness_mean"),
        "gpu_hours_saved": report["gpu_hours_saved"], "gpu_hours_saved_vs_rule": report["gpu_hours_saved_vs_rule"],
        "saved_target_met": report["gpu_hours_saved"] >= SAVED_TARGET,
        "static_probes": report["static_probes"],
        "wall_s": {"autoscaled": round(_span(clock, "autoscaled"), 2),
                   "static_runs": round(sum(_span(clock, k) for k in clock if k != "autoscaled"), 2),
                   "total": round(total_s, 2)},
        "plan_placement_s_at_max_workers": _plan_times(trace, config.workers.slots_per_worker, max_workers),
    }


def _pick(summary: dict, *keys: str) -> dict:
    return {k: summary[k] for k in keys}


def _span(clock: dict[str, list[float]], label: str) -> float:
    first, last = clock.get(label, [0.0, 0.0])
    return last - first


def _plan_times(trace: LoadTrace, slots: int, workers: int) -> dict:
    """Seconds for one fresh plan and one re-plan after the trace's load has moved on."""
    first, later = trace.tokens_per_s[0], trace.tokens_per_s[-1]
    t0 = time.perf_counter()
    placement = plan_placement(first, [slots] * workers)
    t1 = time.perf_counter()
    plan_placement(later, [slots] * workers, placement)
    t2 = time.perf_counter()
    return {"fresh": round(t1 - t0, 3), "replan": round(t2 - t1, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-workers", type=int, nargs="+", default=list(MAX_WORKERS), help="simulated GPUs at most")
    parser.add_argument("--days", type=float, default=1.0, help="simulated days")
    parser.add_argument("--step-s", type=float, default=300.0, help="seconds per step")
    parser.add_argument("--seed", type=int, default=0, help="seed of the trace")
    parser.add_argument("--bursts-per-day", type=float, default=1.0, help="+25%% bursts of 20 minutes per day")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    cases = {str(n): run_case(n, args.days, args.step_s, args.seed, args.bursts_per_day) for n in args.max_workers}
    emit({
        "bench": "autoscale_sim", "days": args.days, "step_s": args.step_s, "seed": args.seed,
        "bursts_per_day": args.bursts_per_day,
        "cost_model": CostModel().model_dump(), "saved_target": SAVED_TARGET,
        "all_saved_targets_met": bool(np.all([c["saved_target_met"] for c in cases.values()])),
        "cases": cases,
    }, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
