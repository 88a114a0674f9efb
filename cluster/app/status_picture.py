"""`moe-serve status --png FILE`: the service as a picture (matplotlib's Agg canvas, no screen).

Panels: per-expert load over time (a heatmap, hot experts bright, placement changes marked),
the placement per worker (which worker holds a replica of which logical expert), and each
worker's load and busy fraction over the load window (`rebalance.window_s`, the same window as the
routed load in the title).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cluster.model_spec import expert_label

PANELS = ("per-expert load over time", "placement per worker", "worker load")  # the last one + its window


def write_status_png(status: dict, path: str | Path, dpi: int = 110) -> list[str]:
    """Draw `status` (with `history`, as `ControlPlane.status(history=True)` gives) to `path`;
    returns the panel titles drawn."""
    layers, num_experts = status["layers"], status["num_experts"]
    history = status.get("history") or {"t_s": [], "tokens_per_s": [], "versions": []}
    figure = Figure(figsize=(12, 10), layout="constrained")
    FigureCanvasAgg(figure)
    heat_ax, place_ax, worker_ax = figure.subplots(3, 1, height_ratios=(3, 2, 1.2))
    _load_heatmap(heat_ax, history, layers, num_experts)
    _placement(place_ax, status["placement"], layers, num_experts, status.get("num_shared_experts", 0))
    window = _window(status.get("window_s"))
    _workers(worker_ax, status["workers"], window)
    figure.suptitle(
        f"moe-serve {status['model']}: placement v{status['placement_version']}, {len(status['workers'])} workers, "
        f"{status['tokens_per_s']:,.0f} expert-tokens/s{window}, balancedness {min(status['balancedness']):.2f}")
    figure.savefig(path, dpi=dpi)
    return [ax.get_title() for ax in (heat_ax, place_ax, worker_ax)]


def _window(window_s: float | None) -> str:
    """' over the last 5 s': the load window both the routed load and the worker rates cover."""
    return "" if window_s is None else f" over the last {window_s:g} s"


def _labels(layers, num_experts: int) -> list[str]:
    return [f"{layer}:{e}" for layer in layers for e in range(num_experts)]


def _ticks(ax, count: int, labels: list[str], axis: str = "y", most: int = 32) -> None:
    step = max(1, count // most)
    positions = np.arange(0, count, step)
    (ax.set_yticks if axis == "y" else ax.set_xticks)(positions, [labels[i] for i in positions], fontsize=7)


def _load_heatmap(ax, history: dict, layers, num_experts: int) -> None:
    ax.set_title(PANELS[0])
    n = len(layers) * num_experts
    if not history["t_s"]:
        ax.text(0.5, 0.5, "no load history yet", ha="center", va="center", transform=ax.transAxes)
        return
    grid = np.asarray(history["tokens_per_s"], dtype=np.float64).reshape(len(history["t_s"]), n).T  # [N, T]
    seconds = np.asarray(history["t_s"]) - history["t_s"][-1]
    extent = (seconds[0], seconds[-1] if len(seconds) > 1 else 1.0, n - 0.5, -0.5)
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="inferno", extent=extent)
    ax.figure.colorbar(image, ax=ax, label="expert-tokens/s")
    versions = np.asarray(history["versions"])
    for i in np.flatnonzero(np.diff(versions)) + 1:
        ax.axvline(seconds[i], color="cyan", lw=0.8, alpha=0.7)
    ax.set_xlabel("seconds before now (cyan: a new placement)")
    ax.set_ylabel("logical expert (layer:expert)")
    _ticks(ax, n, _labels(layers, num_experts))


def _placement(ax, placement: dict, layers, num_experts: int, shared: int = 0) -> None:
    ax.set_title(PANELS[1])
    stride = num_experts + shared
    n = len(layers) * stride
    rows = placement["slots"]
    held = np.zeros((len(rows), n))
    for w, row in enumerate(rows):
        for e in row:
            if e >= 0:
                held[w, e] = 1 + e // stride  # coloured by layer
    ax.imshow(np.ma.masked_equal(held, 0), aspect="auto", interpolation="nearest", cmap="tab10", vmin=1, vmax=10)
    ax.set_ylabel("worker")
    ax.set_yticks(range(len(rows)))
    ax.set_xlabel("logical expert (layer:expert); a cell is a replica, coloured by layer")
    _ticks(ax, n, [expert_label(g, layers, num_experts, shared) for g in range(n)], axis="x")


def _workers(ax, workers: list[dict], window: str) -> None:
    ax.set_title(PANELS[2] + window)
    index = [w["index"] for w in workers]
    ax.bar(index, [w.get("tokens_per_s", 0.0) for w in workers], color="tab:blue", label="expert-tokens/s")
    ax.set_ylabel("expert-tokens/s")
    if any("weight_bytes" in w for w in workers):  # each worker's expert weights under its number
        ax.set_xlabel("worker (and the bytes its replicas' weights hold)")
        ax.set_xticks(index, [f"{w['index']}\n{w.get('weight_bytes', 0) / 2**20:,.1f} MiB" for w in workers])
    else:
        ax.set_xlabel("worker")
        ax.set_xticks(index)
    busy = ax.twinx()
    busy.plot(index, [w.get("busy_fraction", 0.0) for w in workers], "o", color="tab:red", label="busy fraction")
    busy.set_ylim(0, 1.05)
    busy.set_ylabel("busy fraction", color="tab:red")
