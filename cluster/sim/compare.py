"""The autoscaled run against static provisioning, through the same simulator: the fewest static
workers that reach the autoscaled run's SLO attainment (a bisection), and the peak rule's count
(ceil(peak load / target per worker)). Pure, like the simulator."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from cluster.config import ServeConfig
from cluster.sim.simulator import CostModel, Progress, SimRun, fewest_workers, simulate
from cluster.sim.traces import LoadTrace

LabelledProgress = Callable[[str, int, int], None]


@dataclass(frozen=True, eq=False)
class Comparison:
    """The autoscaled run against static provisioning through the same code (live rebalancing,
    no autoscaling): `static` has the fewest workers whose SLO attainment reaches the autoscaled
    run's (`static_reached` false: not even `max_workers` does); `rule` has
    ceil(peak load / target_tokens_per_s_per_worker) workers. probes: workers -> attainment
    (an upper bound where the probe gave up) of every static run the search made."""

    autoscaled: SimRun
    static: SimRun
    static_workers: int
    static_reached: bool
    rule: SimRun
    rule_workers: int
    probes: dict[int, float]

    @property
    def gpu_hours_saved(self) -> float:
        """1 - autoscaled / static GPU-hours, at (at least) equal SLO attainment."""
        return 1.0 - self.autoscaled.gpu_hours / self.static.gpu_hours

    def to_dict(self) -> dict:
        return {
            "autoscaled": self.autoscaled.summary(),
            "static": {"workers": self.static_workers, "reached": self.static_reached, **self.static.summary()},
            "static_peak_rule": {"workers": self.rule_workers, **self.rule.summary()},
            "gpu_hours_saved": round(self.gpu_hours_saved, 4),
            "gpu_hours_saved_vs_rule": round(1.0 - self.autoscaled.gpu_hours / self.rule.gpu_hours, 4),
            "static_probes": {str(n): round(a, 5) for n, a in sorted(self.probes.items())},
        }


def compare(trace: LoadTrace, config: ServeConfig, cost: CostModel = CostModel(),
            progress: LabelledProgress | None = None) -> Comparison:
    """Autoscaled run, the peak rule's static run, and a bisection for the fewest static workers
    that reach the autoscaled SLO attainment (assumed to rise with the worker count; probes
    that cannot reach it stop early)."""
    def bar(label: str) -> Progress | None:
        return None if progress is None else (lambda done, total: progress(label, done, total))

    auto = simulate(trace, config, cost, progress=bar("autoscaled"))
    goal = auto.slo_attainment - 1e-9
    low, high = fewest_workers(config, trace.layers * trace.experts), config.workers.bounds[1]
    peak = float(trace.total_tokens_per_s.max())
    rule_n = min(max(math.ceil(peak / config.autoscaling.target_tokens_per_s_per_worker), low), high)
    runs = {rule_n: simulate(trace, config, cost, workers=rule_n, progress=bar(f"static x{rule_n} (peak rule)"))}

    def reaches(n: int) -> bool:
        if n not in runs:
            runs[n] = simulate(trace, config, cost, workers=n, give_up_below=goal, progress=bar(f"static x{n}"))
        return runs[n].slo_attainment >= goal

    lo, hi = (low, rule_n) if reaches(rule_n) else (rule_n + 1, high)
    reached = lo <= hi and reaches(hi)
    while reached and lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if reaches(mid) else (mid + 1, hi)
    n = hi if reached else high
    if n not in runs or runs[n].gave_up:
        runs[n] = simulate(trace, config, cost, workers=n, progress=bar(f"static x{n}"))
    return Comparison(auto, runs[n], n, reached, runs[rule_n], rule_n, {k: r.slo_attainment for k, r in runs.items()})
