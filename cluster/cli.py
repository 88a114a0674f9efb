"""`moe-serve`: serve a model, send it requests, run the demo, look at and change a running
model's load and placement (`load`, `placement show|plan|apply|export|import`, `rebalance`), or
run it as a long-lived service on a Ray cluster (`deploy`, `status`, `scale`, `shutdown`), or check
it end to end against Hugging Face transformers (`verify`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time

import grpc
import numpy as np
from rich.markup import escape

from cluster.config import ConfigError, ServeConfig, load_config
from cluster.console import (
    console,
    events_table,
    layer_expert_table,
    load_progress,
    placement_table,
    plan_tables,
    summary_table,
    worker_load_table,
)
from cluster.placement import Placement
from cluster.service_cli import HANDLERS as SERVICE_HANDLERS, add_service_parsers
from cluster.simulate_cli import add_simulate_parser, cmd_simulate
from cluster.verify_cli import add_verify_parser, cmd_verify


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over gRPC until SIGTERM")
    p.add_argument("config", nargs="?", help="YAML config (defaults: a small random model)")
    p.add_argument("--checkpoint", help="Hugging Face checkpoint directory (Mixtral, Qwen2/3-MoE, DeepSeek-V2/V3)")
    p.add_argument("--model-name", help="name clients use (model.name)")
    p.add_argument("--host", help="bind address (router.host), default 127.0.0.1")
    p.add_argument("--port", type=int, help="gRPC port (router.port), 0 picks a free one")
    p.add_argument("--workers", type=int, help="expert shard workers (workers.count)")
    p.add_argument("--address", help="Ray cluster to join ('auto' or host:port); default: embedded Ray")
    p.add_argument("--drain-s", type=float, help="on SIGTERM, how long health says NOT_SERVING while requests are "
                                                 "still served (router.drain_s, default 5)")
    p.add_argument("--grace-s", type=float, help="then how long in-flight requests get once new ones are refused "
                                                 "(router.grace_s, default 10)")


TOKEN_ENV = "MOE_SERVE_TOKEN"


def _client_options(p: argparse.ArgumentParser) -> None:
    """TLS and token flags of every command that calls a router."""
    p.add_argument("--ca-cert", metavar="PEM", help="CA certificate that signed the server's (implies TLS)")
    p.add_argument("--tls", action="store_true", help="TLS with the system's root CAs (when no --ca-cert)")
    p.add_argument("--client-cert", metavar="PEM", help="client certificate, for a server that wants one (mutual TLS)")
    p.add_argument("--client-key", metavar="PEM", help="private key of --client-cert")
    p.add_argument("--token", help=f"bearer token (default: ${TOKEN_ENV}; the variable keeps it out of `ps`)")


def _client_credentials(args):
    """The `ClientCredentials` of the flags; the one place `MOE_SERVE_TOKEN` is read."""
    from router_service.security import ClientCredentials

    token = args.token or os.environ.get(TOKEN_ENV) or None
    return ClientCredentials(args.ca_cert, args.client_cert, args.client_key, token.strip() if token else None, args.tls)


def _infer_parser(sub) -> None:
    p = sub.add_parser("infer", help="send hidden states to a server and print the result")
    p.add_argument("--address", default="127.0.0.1:8001", help="router address host:port")
    p.add_argument("--model", default="moe", help="model name")
    p.add_argument("--layer", type=int, help="MoE layer (required when the model has several)")
    p.add_argument("--input", help=".npy file with hidden states [tokens, hidden] (float32/float16)")
    p.add_argument("--tokens", type=int, default=8, help="random tokens to send when no --input")
    p.add_argument("--seed", type=int, default=0, help="seed of the random hidden states")
    p.add_argument("--output", help="save the output hidden states to this .npy file")
    p.add_argument("--topk", action="store_true", help="also ask for topk_ids and topk_weights")
    p.add_argument("--timeout-s", type=float, default=30.0, help="request deadline")
    _client_options(p)


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="start a local cluster with a small random model and drive it")
    p.add_argument("--requests", type=int, default=400, help="requests to send")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    p.add_argument("--tokens", type=int, default=128, help="tokens per request")
    p.add_argument("--workers", type=int, default=2, help="expert shard workers")
    p.add_argument("--zipf-s", type=float, default=1.2, help="skew of the traffic (Zipf exponent; 0: uniform)")


def cmd_serve(args) -> int:
    from cluster.launcher import connect_ray

    config = load_config(args.config).with_overrides(**{
        "model.checkpoint": args.checkpoint, "model.name": args.model_name, "router.host": args.host,
        "router.port": args.port, "workers.count": args.workers, "ray.address": args.address,
        "router.drain_s": args.drain_s, "router.grace_s": args.grace_s,
    })
    connect_ray(config.ray)
    asyncio.run(_serve(config))
    return 0


async def _serve(config: ServeConfig) -> None:
    from cluster.launcher import deploy

    with load_progress() as progress:
        deployment = await deploy(config, progress)
    spec = deployment.weights.spec
    console.print(
        f"serving model [bold]{config.model.name}[/] on [bold]{deployment.address}[/]: "
        f"{spec.family}, {spec.describe_shape()} over "
        f"{config.workers.count} workers, placement v{deployment.placement.version}. "
        f"SIGTERM or Ctrl-C drains and stops.", highlight=False,
    )
    stop, again = asyncio.Event(), asyncio.Event()  # a second signal cuts the drain window short
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: (again if stop.is_set() else stop).set())
    await stop.wait()
    router = config.router
    await deployment.server.drain(router.drain_s, router.grace_s, say=lambda text: console.print(text, highlight=False),
                                  cut_short=again)
    await deployment.stop(grace_s=router.grace_s)  # the server is down already: stops the loops, frees the workers
    console.print("stopped")


def cmd_infer(args) -> int:
    from router_service.client import MoEClient

    with MoEClient(args.address, credentials=_client_credentials(args)) as client:
        if args.input:
            hidden = np.load(args.input)
        else:
            meta = client.model_metadata(args.model, timeout_s=args.timeout_s)
            width = meta.inputs[0].shape[-1]
            hidden = np.random.default_rng(args.seed).standard_normal((args.tokens, width), dtype=np.float32)
        start = time.perf_counter()
        result = client.infer(args.model, hidden, layer=args.layer, topk=args.topk, timeout_s=args.timeout_s)
        latency_ms = (time.perf_counter() - start) * 1000
    rows = {
        "model": args.model,
        "input": f"{list(hidden.shape)} {hidden.dtype}",
        "output": f"{list(result.hidden_states.shape)} {result.hidden_states.dtype}",
        "latency": f"{latency_ms:.1f} ms",
        "placement version": str(result.placement_version),
        "output mean |x|": f"{np.abs(result.hidden_states.astype(np.float32)).mean():.4f}",
    }
    if result.topk_ids is not None:
        rows["topk_ids (first tokens)"] = str(result.topk_ids[:4].tolist())
        rows["topk_weights (first tokens)"] = str(np.round(result.topk_weights[:4], 3).tolist())
    console.print(summary_table("inference", rows))
    if args.output:
        np.save(args.output, result.hidden_states)
        console.print(f"saved output to {args.output}")
    return 0


def cmd_demo(args) -> int:
    from cluster.demo import demo_config, run_demo
    from cluster.launcher import connect_ray

    config = demo_config(args.workers)
    connect_ray(config.ray, num_cpus=max(2, os.cpu_count() or 2))
    report = asyncio.run(run_demo(config, args.requests, args.concurrency, args.tokens, args.zipf_s))
    return 0 if report.max_rel_error < 1e-5 and report.failed == 0 else 1


def _admin_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", default="127.0.0.1:8001", help="router address host:port")
    common.add_argument("--model", default="moe", help="model name")
    common.add_argument("--timeout-s", type=float, default=300.0, help="deadline of each admin call")
    _client_options(common)
    return common


def _admin_parsers(sub) -> None:
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

    return AdminClient(args.address, timeout_s=args.timeout_s, credentials=_client_credentials(args))


def _print_json(data: dict) -> None:
    print(json.dumps(data, indent=2))


def _print_event(event, as_json: bool = False) -> None:
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


def cmd_load(args) -> int:
    from router_service.admin_client import load_to_dict

    if args.record:
        return _record_trace(args)
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


def _record_trace(args) -> int:
    """Append the load window's rates to a trace file every `interval_s` (wall-clock `t_s`)."""
    from cluster.traces import append_jsonl
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


def cmd_rebalance(args) -> int:
    with _admin(args) as admin:
        _print_event(admin.rebalance(args.model, force=args.force), args.json)
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


def cmd_placement(args) -> int:
    with _admin(args) as admin:
        if args.action in ("apply", "import"):
            placement = read_placement_file(args.file, args.model, require_model=args.action == "import")
            _print_event(admin.apply(args.model, placement))
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
            _show_plan(admin, args)
    return 0


def _show_plan(admin, args) -> None:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe-serve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _infer_parser(sub)
    _demo_parser(sub)
    _admin_parsers(sub)
    add_service_parsers(sub)
    add_simulate_parser(sub)
    add_verify_parser(sub, _client_options)
    args = parser.parse_args(argv)
    handlers = {
        "serve": cmd_serve, "infer": cmd_infer, "demo": cmd_demo,
        "load": cmd_load, "placement": cmd_placement, "rebalance": cmd_rebalance, "simulate": cmd_simulate,
        "verify": lambda args: cmd_verify(args, _client_credentials(args)),
        **SERVICE_HANDLERS,
    }
    try:
        return handlers[args.command](args)
    except (ConfigError, ValueError, TypeError, OSError) as err:
        console.print(f"[red]error:[/] {escape(str(err))}", highlight=False)
        return 2
    except grpc.RpcError as err:
        console.print(f"[red]error:[/] {err.code().name}: {escape(err.details() or '')}", highlight=False)
        return 1


if __name__ == "__main__":
    sys.exit(main())
