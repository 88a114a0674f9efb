"""`moe-serve`: serve a model, send it requests, run the demo, look at and change a running
model's load and placement (`load`, `placement show|plan|apply|export|import`, `rebalance`), or
run it as a long-lived service on a Ray cluster (`deploy`, `status`, `scale`, `shutdown`), or check
it end to end against Hugging Face transformers (`verify`), or see whether a checkpoint fits its
workers' memory before starting anything (`plan`)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time

import grpc
import numpy as np
from rich.console import Console
from rich.markup import escape

from cluster.app import admin_cli, plan_cli, service_cli, simulate_cli, verify_cli
from cluster.app.client_flags import add_client_flags, client_credentials
from cluster.app.console import load_progress, summary_table
from cluster.config import ConfigError, ServeConfig, load_config


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over gRPC until SIGTERM")
    p.add_argument("config", nargs="?", help="YAML config (defaults: a small random model)")
    p.add_argument("--checkpoint", help="Hugging Face checkpoint directory (Mixtral, Qwen2/3-MoE, DeepSeek-V2/V3)")
    p.add_argument("--model-name", help="name clients use (model.name)")
    p.add_argument("--host", help="bind address (router.host), default 127.0.0.1")
    p.add_argument("--port", type=int, help="gRPC port (router.port), 0 picks a free one")
    p.add_argument("--http-port", type=int, help="OpenAI-compatible HTTP port (router.http_port, default 8000), "
                                                 "0 picks a free one")
    p.add_argument("--workers", type=int, help="expert shard workers (workers.count)")
    p.add_argument("--address", help="Ray cluster to join ('auto' or host:port); default: embedded Ray")
    p.add_argument("--drain-s", type=float, help="on SIGTERM, how long health says NOT_SERVING while requests are "
                                                 "still served (router.drain_s, default 5)")
    p.add_argument("--grace-s", type=float, help="then how long in-flight requests get once new ones are refused "
                                                 "(router.grace_s, default 10)")


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
    add_client_flags(p)


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="start a local cluster with a small random model and drive it")
    p.add_argument("--requests", type=int, default=400, help="requests to send")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    p.add_argument("--tokens", type=int, default=128, help="tokens per request")
    p.add_argument("--workers", type=int, default=2, help="expert shard workers")
    p.add_argument("--zipf-s", type=float, default=1.2, help="skew of the traffic (Zipf exponent; 0: uniform)")
    p.add_argument("--no-text", action="store_true", help="skip the second part: a tiny whole model generating text")


def cmd_serve(args, console: Console) -> int:
    from cluster.app.launcher import connect_ray

    config = load_config(args.config).with_overrides(**{
        "model.checkpoint": args.checkpoint, "model.name": args.model_name, "router.host": args.host,
        "router.port": args.port, "router.http_port": args.http_port, "workers.count": args.workers,
        "ray.address": args.address,
        "router.drain_s": args.drain_s, "router.grace_s": args.grace_s,
    })
    connect_ray(config.ray)
    asyncio.run(_serve(config, console))
    return 0


async def _serve(config: ServeConfig, console: Console) -> None:
    from cluster.app.launcher import deploy

    with load_progress(console) as progress:
        deployment = await deploy(config, progress)
    spec = deployment.weights.spec
    console.print(
        f"serving model [bold]{config.model.name}[/] on [bold]{deployment.address}[/]: "
        f"{spec.family}, {spec.describe_shape()} over "
        f"{config.workers.count} workers, placement v{deployment.placement.version}. "
        f"SIGTERM or Ctrl-C drains and stops.", highlight=False,
    )
    console.print(deployment.describe_text(), highlight=False)
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


def cmd_infer(args, console: Console) -> int:
    from router_service.client import MoEClient

    with MoEClient(args.address, credentials=client_credentials(args)) as client:
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


def cmd_demo(args, console: Console) -> int:
    from cluster.app.demo import demo_config, run_demo
    from cluster.app.demo_text import run_text_demo
    from cluster.app.launcher import connect_ray

    config = demo_config(args.workers)
    connect_ray(config.ray, num_cpus=max(2, os.cpu_count() or 2))
    report = asyncio.run(run_demo(config, console, args.requests, args.concurrency, args.tokens, args.zipf_s))
    exact_text = True if args.no_text else asyncio.run(run_text_demo(config, console))
    return 0 if report.max_rel_error < 1e-5 and report.failed == 0 and exact_text else 1


HANDLERS = {"serve": cmd_serve, "infer": cmd_infer, "demo": cmd_demo}


def main(argv: list[str] | None = None, console: Console | None = None) -> int:
    """Run one command; `console` is where it prints (default: the terminal)."""
    console = console or Console()
    parser = argparse.ArgumentParser(prog="moe-serve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _infer_parser(sub)
    _demo_parser(sub)
    admin_cli.add_admin_parsers(sub)
    service_cli.add_service_parsers(sub)
    simulate_cli.add_simulate_parser(sub)
    verify_cli.add_verify_parser(sub)
    plan_cli.add_plan_parser(sub)
    args = parser.parse_args(argv)
    handlers = {**HANDLERS, **admin_cli.HANDLERS, **service_cli.HANDLERS, **simulate_cli.HANDLERS,
                **verify_cli.HANDLERS, **plan_cli.HANDLERS}
    try:
        return handlers[args.command](args, console)
    except (ConfigError, ValueError, TypeError, OSError) as err:
        console.print(f"[red]error:[/] {escape(str(err))}", highlight=False)
        return 2
    except grpc.RpcError as err:
        console.print(f"[red]error:[/] {err.code().name}: {escape(err.details() or '')}", highlight=False)
        return 1


if __name__ == "__main__":
    sys.exit(main())
