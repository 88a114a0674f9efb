"""What a simulation shows: a PNG (matplotlib's Agg canvas, no screen needed) and a rich table.

Panels, over simulated hours: load and workers (autoscaled billed and serving vs static),
balancedness, batch latency against the SLO line (overloaded steps drawn at the top), moves.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.table import Table

from cluster.sim.compare import Comparison
from cluster.sim.simulator import SimRun

LATENCY_CEILING = 10.0  # overloaded steps (latency unbounded) are drawn at this many x the SLO


def write_png(result: Comparison, path: str | Path, slo_ms: float, dpi: int = 110) -> None:
    """Four panels comparing the autoscaled run with the static baseline, written to `path`."""
    figure = Figure(figsize=(11, 10), layout="constrained")
    FigureCanvasAgg(figure)
    load_ax, balance_ax, latency_ax, moves_ax = figure.subplots(4, 1, sharex=True)
    auto, static = result.autoscaled, result.static
    static_label = f"static x{result.static_workers}"
    _load_and_workers(load_ax, auto, static, static_label)
    for run, label, style in ((auto, "autoscaled", "-"), (static, static_label, "--")):
        balance_ax.plot(_hours(run), run.balancedness, style, label=label)
        latency_ax.plot(_hours(run), _drawn_latency(run.latency_ms, slo_ms), style, label=label)
        moves_ax.step(_hours(run), run.moves, style, where="post", label=label)
    balance_ax.set_ylabel("balancedness\n(min over layers)")
    balance_ax.set_ylim(top=1.01)
    latency_ax.axhline(slo_ms, color="red", lw=1, label=f"SLO {slo_ms:g} ms")
    latency_ax.set_yscale("log")
    latency_ax.set_ylabel("batch latency ms")
    moves_ax.set_ylabel("replicas loaded\nper step")
    moves_ax.set_xlabel("simulated hours")
    for ax in (balance_ax, latency_ax, moves_ax):
        ax.legend(loc="upper left", fontsize="small")
        ax.grid(alpha=0.3)
    figure.suptitle(f"autoscaled {auto.gpu_hours:,.0f} GPU-h (SLO {auto.slo_attainment:.2%}) vs {static_label} "
                    f"{static.gpu_hours:,.0f} GPU-h (SLO {static.slo_attainment:.2%}): {result.gpu_hours_saved:.1%} saved")
    figure.savefig(path, dpi=dpi, format="png")


def _load_and_workers(ax, auto: SimRun, static: SimRun, static_label: str) -> None:
    ax.fill_between(_hours(auto), auto.load_tokens_per_s, step="post", color="0.85", label="load")
    ax.set_ylabel("expert-tokens/s")
    ax.set_ylim(bottom=0)
    workers = ax.twinx()
    workers.step(_hours(auto), auto.billed, where="post", label="autoscaled: billed")
    workers.step(_hours(auto), auto.serving, where="post", lw=0.8, label="autoscaled: serving")
    workers.step(_hours(static), static.serving, "--", where="post", label=static_label)
    workers.set_ylabel("workers (GPUs)")
    workers.set_ylim(bottom=0)
    lines, labels = ax.get_legend_handles_labels()
    more, more_labels = workers.get_legend_handles_labels()
    workers.legend(lines + more, labels + more_labels, loc="upper left", fontsize="small")
    ax.grid(alpha=0.3)


def _hours(run: SimRun) -> np.ndarray:
    return run.times_s / 3600


def _drawn_latency(latency_ms: np.ndarray, slo_ms: float) -> np.ndarray:
    return np.minimum(latency_ms, LATENCY_CEILING * slo_ms)  # inf (overloaded) -> the ceiling


def summary_table(result: Comparison, title: str = "simulation") -> Table:
    """Autoscaled vs static at equal SLO attainment vs static at peak / target, one column each."""
    runs = {
        "autoscaled": result.autoscaled,
        f"static x{result.static_workers} (equal SLO{'' if result.static_reached else ', not reached'})": result.static,
        f"static x{result.rule_workers} (peak / target)": result.rule,
    }
    table = Table(title=title)
    table.add_column("")
    for name in runs:
        table.add_column(name, justify="right")
    summaries = [run.summary() for run in runs.values()]
    rows = {
        "workers (min..max)": lambda s: f"{s['workers_min']}..{s['workers_max']}",
        "GPU-hours": lambda s: f"{s['gpu_hours']:,.1f}",
        "SLO attainment (token-weighted)": lambda s: f"{s['slo_attainment']:.3%}",
        "replicas loaded (moves)": lambda s: f"{s['moves']:,}",
        "moved GiB": lambda s: f"{s['moved_bytes'] / 2**30:,.1f}",
        "balancedness mean / min": lambda s: f"{s['balancedness_mean']:.3f} / {s['balancedness_min']:.3f}",
        "scale-outs / scale-ins": lambda s: f"{s['scale_outs']} / {s['scale_ins']}",
        "rebalances": lambda s: str(s["rebalances"]),
    }
    for label, cell in rows.items():
        table.add_row(label, *(cell(s) for s in summaries))
    return table
