"""What people look at in the terminal: load progress, tables of load and latency."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cluster.model_spec import ModelSpec
from cluster.placement import Placement

console = Console(stderr=False)


@contextmanager
def load_progress(description: str = "loading expert weights") -> Iterator:
    """Yields `progress(done, total)` drawing a bar (plain lines when not a terminal)."""
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=False,
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def expert_load_table(spec: ModelSpec, expert_tokens: np.ndarray, title: str = "tokens per expert") -> Table:
    """expert_tokens: `[num_moe_layers, E]`; one row per layer, the hottest expert in bold."""
    table = Table(title=title)
    table.add_column("layer", justify="right")
    for e in range(spec.num_experts):
        table.add_column(f"e{e}", justify="right")
    table.add_column("balance", justify="right")
    for i, layer in enumerate(spec.moe_layers):
        row = expert_tokens[i]
        hottest = int(row.argmax()) if row.any() else -1
        cells = [f"[bold red]{v}[/]" if e == hottest else str(v) for e, v in enumerate(row.tolist())]
        balance = row.mean() / row.max() if row.max() else 1.0
        table.add_row(str(layer), *cells, f"{balance:.2f}")
    return table


def worker_table(spec: ModelSpec, placement: Placement, stats: list[dict]) -> Table:
    table = Table(title=f"workers (placement v{placement.version})")
    for col in ("worker", "experts (layer:expert)", "tokens", "calls", "busy s"):
        table.add_column(col, justify="left" if col.startswith("experts") else "right")
    E = spec.num_experts
    for s in stats:
        hosted = [f"{spec.moe_layers[g // E]}:{g % E}" for _, g in placement.experts_of(s["index"])]
        table.add_row(str(s["index"]), " ".join(hosted), str(s["tokens"]), str(s["calls"]), f"{s['busy_s']:.2f}")
    return table


def summary_table(title: str, rows: dict[str, str]) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    for key, value in rows.items():
        table.add_row(key, value)
    return table
