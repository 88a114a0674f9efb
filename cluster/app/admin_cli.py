"""The admin commands of a running model: `moe-serve load`, `rebalance` and `placement show |
plan | apply | export | import`, over the router's admin gRPC service."""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from rich.console import Console
from rich.markup import escape

from cluster.app.client_flags import add_client_flags, client_credentials
from cluster.app.console import (
    events_table,
    layer_expert_table,
    placement_table,
    plan_tables,
    summary_table,
    worker_load_table,
)
from cluster.placement import Placement


def _admin_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", default="127.0.0.1:8001", help="router address host:port")
    common.add_argument("--model", default="moe", help="model name")
    common.add_argument("--timeout-s", type=float, default=300.0, help="deadline of each admin call")
    add_client_flags(common)
    return common


def add_admin_parsers(sub) -> None:
    common = _admin_options()
    p = sub.add_parser("load", parents=[common], help="routed load per expert, balancedness, workers, events")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--record", metavar="FILE.jsonl", help="append a load trace line every --interval-s until Ctrl-C "
                                                          "(or --duration-s); replay it with `moe-serve simulate --trace`")
    p.add_argument("--interval-s", type=float, default=10.0, help="seconds between recorded lines")
    p.add_argument("--duration-s", type=float, help="stop recording after this long")
    p = sub.add_parser("rebalance", parents=[common], help="plan and apply a new placement now if it gains enough")
    p.add_argument("--force", action="store_true", help="apply the plan whatever it gains")
    p.add_argument("--json", action="store_true", help="print the event as JSON")
    placement = sub.add_parser("placement", help="show, plan, apply, export or import the placement")
    actions = placement.add_subparsers(dest="action", required=True)
    p = actions.add_parser("show", parents=[common], help="which worker holds which experts")
    p.add_argument("--json", action="store_true", help="print the placement (export format) as JSON")
    p = actions.add_parser("plan", parents=[common], help="dry run: what the planner would do now")
    p.add_argument("--load", metavar="FILE.json", help="plan for this load ([layers][experts] tokens, or `load --json` output) instead of the recent window")
    p.add_argument("--output", metavar="FILE.json", help="also write the proposed placement here (export format)")
    p = actions.add_parser("apply", parents=[common], help="move to the placement in a file, live")
    p.add_argument("file", metavar="FILE.json", help="a placement (export format, or version/num_logical_experts/slots)")
    p = actions.add_parser("export", parents=[common], help="write the placement in service to a file")
    p.add_argument("file", metavar="FILE.json")
    p = actions.add_parser("import", parents=[common], help="apply a placement exported with `placement export`")
    p.add_argument("file", metavar="FILE.json")


def _admin(args):
    from router_service.admin_client import AdminClient

    return AdminClient(args.address, timeout_s=args.timeout_s, credentials=client_credentials(args))


def _print_json(data: dict) -> None:
    print(json.dumps(data, indent=2))


def _print_event(console: Console, event, as_json: bool = False) -> None:
    from router_service.admin_client import event_to_dict

    data = event_to_dict(event)
    if as_json:
        _print_json(data)
        return
    console.print(summary_table("rebalance event", {
        "applied": "yes" if data["applied"] else "no",
        "reason": escape(data["reason"]),
        "placement version": f"v{data['from_version']} -> v{data['to_version']}",
        "replica loads": str(data["moves"]),
        "balancedness (min over layers)": f"{data['balancedness_before']:.3f} -> {data['balancedness_after']:.3f}",
        "moved": f"{data['bytes_moved'] / 2**20:.1f} MiB",
        "took": f"{data['duration_s']:.2f} s",
    }))


def cmd_load(args, console: Console) -> int:
    from router_service.admin_client import load_to_dict

    if args.record:
        return _record_trace(args, console)
    with _admin(args) as admin:
        data = load_to_dict(admin.load(args.model))
    if args.json:
        _print_json(data)
        return 0
    console.print(layer_expert_table(
        data["layers"], np.asarray(data["tokens_per_s"]),
        f"{data['model']}: tokens/s per expert over the last {data['window_s']:.1f}s "
        f"(placement v{data['placement_version']})", data["balancedness"], decimals=1,
    ))
    console.print(worker_load_table(data["workers"]))
    if data["recent_events"]:
        console.print(events_table(data["recent_events"]))
    else:
        console.print("no rebalance events yet")
    return 0


def _record_trace(args, console: Console) -> int:
    """Append the load window's rates to a trace file every `interval_s` (wall-clock `t_s`)."""
    from cluster.sim.traces import append_jsonl
    from router_service.admin_client import load_to_dict

    start = time.monotonic()
    lines = 0
    with _admin(args) as admin:
        try:
            while args.duration_s is None or time.monotonic() - start < args.duration_s:
                append_jsonl(args.record, time.time(), load_to_dict(admin.load(args.model)))
                lines += 1
                console.print(f"recorded {lines} lines to {args.record}", end="\r", highlight=False)
                time.sleep(args.interval_s)
        except KeyboardInterrupt:
            pass
    console.print(f"recorded {lines} lines to {args.record}; replay with `moe-serve simulate --trace {args.record}`",
                  highlight=False)
    return 0


def cmd_rebalance(args, console: Console) -> int:
    with _admin(args) as admin:
        _print_event(console, admin.rebalance(args.model, force=args.force), args.json)
    return 0


def _export_text(model: str, placement: Placement) -> str:
    """The export format: `{"model", "version", "num_logical_experts", "slots"}`, a row a line."""
    data = placement.to_dict()
    rows = ",\n".join(f"    {json.dumps(r)}" for r in data["slots"])
    return (
        f'{{\n  "model": {json.dumps(model)},\n  "version": {data["version"]},\n'
        f'  "num_logical_experts": {data["num_logical_experts"]},\n  "slots": [\n{rows}\n  ]\n}}\n'
    )


def _read_json(path: str, what: str):
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as err:
        raise ValueError(f"cannot read {what} file {path}: {err.strerror or err}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} file {path} is not JSON: {err}") from None


def read_placement_file(path: str, model: str, require_model: bool) -> Placement:
    """A placement from `path` (export format; with `require_model` the `model` key must be
    there). ValueError naming the file when it is missing, not JSON, or not a placement."""
    data = _read_json(path, "placement")
    if not isinstance(data, dict):
        raise ValueError(f"placement file {path} must hold a JSON object as `moe-serve placement export` writes it, got {type(data).__name__}")
    if "model" not in data and require_model:
        raise ValueError(f"placement file {path} names no model; `moe-serve placement export` files have a 'model' key (keys here: {sorted(data)})")
    if "model" in data and data["model"] != model:
        raise ValueError(f"placement file {path} is for model {data['model']!r}, not {model!r}; pass --model {data['model']} to use it there")
    try:
        return Placement.from_dict(data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"placement file {path} is not a valid placement: {err}") from None


def read_load_file(path: str) -> np.ndarray:
    """Tokens per logical expert: a JSON list (`[layers][experts]` or flat), or an object with
    `window_tokens` (what `moe-serve load --json` prints) or `load`."""
    data = _read_json(path, "load")
    if isinstance(data, dict):
        key = next((k for k in ("window_tokens", "load") if k in data), None)
        if key is None:
            raise ValueError(f"load file {path} has no 'window_tokens' or 'load' key (keys: {sorted(data)})")
        data = data[key]
    try:
        return np.asarray(data, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"load file {path} is not a list of numbers per layer and expert: {err}") from None


def cmd_placement(args, console: Console) -> int:
    with _admin(args) as admin:
        if args.action in ("apply", "import"):
            placement = read_placement_file(args.file, args.model, require_model=args.action == "import")
            _print_event(console, admin.apply(args.model, placement))
        elif args.action == "export":
            placement = admin.placement(args.model)
            with open(args.file, "w") as f:
                f.write(_export_text(args.model, placement))
            console.print(f"wrote placement v{placement.version} of {args.model} to {args.file}", highlight=False)
        elif args.action == "show":
            placement = admin.placement(args.model)
            if args.json:
                _print_json({"model": args.model, **placement.to_dict()})
            else:
                load = admin.load(args.model)
                console.print(placement_table(args.model, placement.to_dict(), load.layers, load.num_experts,
                                              load.num_shared_experts))
        else:
            _show_plan(console, admin, args)
    return 0


def _show_plan(console: Console, admin, args) -> None:
    from router_service.admin_client import placement_from_pb

    load = read_load_file(args.load) if args.load else None
    plan = admin.plan(args.model, load)
    shape = admin.load(args.model)
    changes, balance = plan_tables({
        "moves": plan.moves, "balancedness_current": list(plan.balancedness_current),
        "balancedness_proposed": list(plan.balancedness_proposed),
        "changes": [{"worker": c.worker, "expert": c.expert, "added": c.added} for c in plan.changes],
    }, shape.layers, shape.num_experts, shape.num_shared_experts)
    console.print(f"dry run for {args.model}: placement v{plan.current.version} stays in service; "
                  f"{'the recent window' if load is None else args.load} as the load", highlight=False)
    console.print(changes)
    console.print(balance)
    if args.output:
        with open(args.output, "w") as f:
            f.write(_export_text(args.model, placement_from_pb(plan.proposed)))
        console.print(f"wrote the proposed placement to {args.output}; apply it with `moe-serve placement import {args.output}`", highlight=False)


HANDLERS = {"load": cmd_load, "placement": cmd_placement, "rebalance": cmd_rebalance}
