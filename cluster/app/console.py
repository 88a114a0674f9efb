"""What people look at in the terminal: load progress, tables of load and latency. Nothing here
prints by itself: each command gets its `rich` console from `moe-serve`'s `main` and prints the
tables these functions build."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cluster.model_spec import expert_label


@contextmanager
def load_progress(console: Console, description: str = "loading expert weights") -> Iterator:
    """Yields `progress(done, total)` drawing a bar on `console` (plain lines when not a terminal)."""
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=False,
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def layer_expert_table(layers: Sequence[int], values: np.ndarray, title: str,
                       balancedness: Sequence[float] | None = None, balance_label: str = "balancedness",
                       decimals: int = 0) -> Table:
    """values: `[len(layers), E]` (tokens, tokens/s); one row per MoE layer, the hottest expert
    in bold red; `balancedness`: `[len(layers)]` shown in a last column when given."""
    values = np.asarray(values)
    table = Table(title=title)
    table.add_column("layer", justify="right")
    for e in range(values.shape[1] if values.ndim == 2 else 0):
        table.add_column(f"e{e}", justify="right")
    if balancedness is not None:
        table.add_column(balance_label, justify="right")
    for i, layer in enumerate(layers):
        row = values[i]
        hottest = int(row.argmax()) if row.any() else -1
        cells = [f"[bold red]{v:.{decimals}f}[/]" if e == hottest else f"{v:.{decimals}f}"
                 for e, v in enumerate(row.astype(np.float64).tolist())]
        extra = [f"{balancedness[i]:.2f}"] if balancedness is not None else []
        table.add_row(str(layer), *cells, *extra)
    return table


def summary_table(title: str, rows: dict[str, str]) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    for key, value in rows.items():
        table.add_row(key, value)
    return table


def placement_table(model: str, placement: dict, layers: Sequence[int], num_experts: int, shared: int = 0) -> Table:
    """placement: `Placement.to_dict()`; one row per worker, its replicas as `layer:expert`
    (`layer:s0` for a piece of the `shared` experts)."""
    table = Table(title=f"placement of {model} (v{placement['version']})")
    for col in ("worker", "replicas", "experts (layer:expert)"):
        table.add_column(col, justify="left" if col.startswith("experts") else "right")
    for w, row in enumerate(placement["slots"]):
        held = [e for e in row if e >= 0]
        table.add_row(str(w), str(len(held)), " ".join(expert_label(e, layers, num_experts, shared) for e in held))
    return table


def worker_load_table(workers: list[dict]) -> Table:
    """workers: dicts with `index, node_id, replicas, calls, tokens, busy_s, outstanding_tokens`
    (counters since the workers started; outstanding: tokens in hand now), and `weight_bytes`
    (what the replicas' weights hold now) where the workers report it."""
    rates = bool(workers) and "busy_fraction" in workers[0]  # the service's status has rates too
    memory = any("weight_bytes" in w for w in workers)
    table = Table(title="workers")
    columns = ["worker", "node", "replicas"] + (["weights"] if memory else []) + ["calls", "tokens", "busy s",
                                                                                  "outstanding"]
    columns += ["tokens/s", "busy"] if rates else []
    for col in columns:
        table.add_column(col, justify="left" if col == "node" else "right")
    for w in workers:
        index = f"{w['index']} [red]down[/]" if w.get("down") else str(w["index"])
        cells = [index, str(w["node_id"])[:12], str(w["replicas"])]
        cells += [format_bytes(w.get("weight_bytes", 0))] if memory else []
        cells += [str(w["calls"]), str(w["tokens"]), f"{w['busy_s']:.2f}", str(w["outstanding_tokens"])]
        if rates:
            cells += [f"{w['tokens_per_s']:,.0f}", f"{w['busy_fraction']:.0%}"]
        table.add_row(*cells)
    return table


def format_bytes(n: int) -> str:
    """`1.50 GiB`, `12.0 MiB`, `512 KiB`: bytes for people."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.1f} {unit}"
    return f"{n} B"


def worker_events_table(events: list[dict], title: str = "recent worker faults") -> Table:
    """events: dicts with `age_s, kind, workers, duration_s, detail` (`WorkerEvent`), oldest first."""
    table = Table(title=title)
    for col in ("age s", "event", "workers", "took s", "detail"):
        table.add_column(col, justify="left" if col == "detail" else "right")
    colour = {"lost": "red", "unrepaired": "red", "repaired": "yellow", "reloaded": "green"}
    for e in events:
        table.add_row(f"{e['age_s']:.1f}", f"[{colour.get(e['kind'], 'white')}]{e['kind']}[/]",
                      ", ".join(map(str, e["workers"])), f"{e['duration_s']:.2f}", escape(e["detail"]))
    return table


def events_table(events: list[dict], title: str = "recent rebalance events") -> Table:
    """events: dicts with the `RebalanceEvent` fields, oldest first."""
    table = Table(title=title)
    for col in ("age s", "applied", "version", "moves", "balancedness", "moved MiB", "took s", "reason"):
        table.add_column(col, justify="left" if col == "reason" else "right")
    for e in events:
        table.add_row(
            f"{e['age_s']:.1f}", "yes" if e["applied"] else "no", f"v{e['from_version']} -> v{e['to_version']}",
            str(e["moves"]), f"{e['balancedness_before']:.3f} -> {e['balancedness_after']:.3f}",
            f"{e['bytes_moved'] / 2**20:.1f}", f"{e['duration_s']:.2f}", escape(e["reason"]),
        )
    return table


def plan_tables(plan: dict, layers: Sequence[int], num_experts: int, shared: int = 0) -> tuple[Table, Table]:
    """plan: `{moves, balancedness_current, balancedness_proposed, changes: [{worker, expert,
    added}]}`; (replica changes, per-layer balancedness current vs proposed)."""
    changes = Table(title=f"replica changes ({plan['moves']} loads)")
    for col in ("worker", "change", "expert (layer:expert)"):
        changes.add_column(col, justify="right")
    for c in sorted(plan["changes"], key=lambda c: (c["worker"], not c["added"], c["expert"])):
        changes.add_row(
            str(c["worker"]), "[green]+ add[/]" if c["added"] else "[red]- remove[/]",
            expert_label(c["expert"], layers, num_experts, shared),
        )
    balance = Table(title="balancedness per layer")
    for col in ("layer", "current", "proposed"):
        balance.add_column(col, justify="right")
    for i, layer in enumerate(layers):
        balance.add_row(str(layer), f"{plan['balancedness_current'][i]:.3f}", f"{plan['balancedness_proposed'][i]:.3f}")
    return changes, balance


def scale_events_table(events: list[dict], title: str = "recent scaling events") -> Table:
    """events: dicts with `age_s, action, from_workers, to_workers, moves, duration_s, reason`."""
    table = Table(title=title)
    for col in ("age s", "action", "workers", "moves", "took s", "reason"):
        table.add_column(col, justify="left" if col == "reason" else "right")
    colour = {"out": "green", "in": "yellow", "failed": "red"}
    for e in events:
        action = e["action"]
        table.add_row(
            f"{e['age_s']:.1f}", f"[{colour.get(action, 'white')}]{action}[/]",
            f"{e['from_workers']} -> {e['to_workers']}", str(e["moves"]), f"{e['duration_s']:.2f}",
            escape(e["reason"]),
        )
    return table


def service_summary(status: dict) -> Table:
    """The headline of `moe-serve status`: where it serves, how many workers, what the
    autoscaler last decided and why."""
    decision = status["autoscaler"]["decision"]
    low, high = status["bounds"]
    rows = {
        "router": str(status.get("address")) + (f" (HTTP {status['http_address']})" if status.get("http_address") else ""),
        "placement version": f"v{status['placement_version']}",
        "workers (serving / pending)": f"{len(status['workers'])} / {status['pending_workers']}  (bounds {low}..{high})",
        "worker resources": ", ".join(f"{k}={v:g}" for k, v in status["worker_bundle"].items()),
        "load": f"{status['tokens_per_s']:,.0f} expert-tokens/s over {status['window_s']:.1f}s",
        "queue delay (p90)": f"{status['queue_delay_ms']:.1f} ms",
        "balancedness (min layer)": f"{min(status['balancedness']):.3f}",
        "autoscaler": status["autoscaler"]["mode"],
    }
    held = [w["weight_bytes"] for w in status["workers"] if "weight_bytes" in w]
    if held:
        rows["expert weights held"] = f"{format_bytes(sum(held))} (most on one worker: {format_bytes(max(held))})"
    generation = status.get("generation")
    if generation:
        routers = generation["routers"]
        rows["generation"] = (f"{generation['output_tokens_per_s']:,.1f} tokens/s; TTFT p90 {generation['ttft_p90_ms']:.0f} ms, "
                              f"TPOT p90 {generation['tpot_p90_ms']:.1f} ms")
        rows["sequences (running / waiting)"] = (f"{sum(r['running'] for r in routers.values())} / "
                                                 f"{sum(r['waiting'] for r in routers.values())} over {len(routers)} routers")
        rows["KV cache in use"] = ", ".join(f"{name}: {r['kv_used_fraction']:.0%}" for name, r in routers.items())
    if status.get("down_workers"):
        rows["workers down"] = f"[red]{', '.join(map(str, status['down_workers']))}[/] (routed around; reloaded once back)"
    if decision is not None:
        rows["last decision"] = escape(f"{decision['action']} -> {decision['target_workers']}: {decision['reason']}")
    return summary_table(f"moe-serve: {status['model']}", rows)


def decisions_table(decisions: list[dict], title: str = "autoscaler: recent changes of mind") -> Table:
    """decisions: dicts with `age_s, action, target_workers, reason`, oldest first."""
    table = Table(title=title)
    for col in ("age s", "decision", "workers", "reason"):
        table.add_column(col, justify="left" if col == "reason" else "right")
    for d in decisions:
        table.add_row(f"{d['age_s']:.1f}", d["action"], str(d["target_workers"]), escape(d["reason"]))
    return table


def routers_table(status: dict) -> Table:
    """The routers of a deployment (data-parallel attention): address, HTTP, generation load."""
    generation = (status.get("generation") or {}).get("routers", {})
    scaling = status.get("router_scaling") or {}
    title = f"routers ({scaling.get('mode', 'off')}, bounds {scaling.get('bounds', ['?', '?'])})"
    decision = scaling.get("decision")
    if decision:
        title += f": {escape(decision['action'])} -> {decision['target_routers']} ({escape(decision['reason'])})"
    table = Table(title=title)
    for col in ("router", "gRPC", "HTTP", "running", "waiting", "KV cache"):
        table.add_column(col, justify="left" if col in ("router", "gRPC", "HTTP") else "right")
    for r in status.get("router_fleet", []):
        g = generation.get(r["name"], {})
        table.add_row(r["name"], str(r["address"] or "restarting"), str(r["http_address"] or "-"),
                      str(g.get("running", "-")), str(g.get("waiting", "-")),
                      f"{g['kv_used_fraction']:.0%}" if "kv_used_fraction" in g else "-")
    return table
