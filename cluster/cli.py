"""`moe-serve`: serve a model, send it requests, or run the demo."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time

import grpc
import numpy as np

from cluster.config import ConfigError, ServeConfig, load_config
from cluster.console import console, load_progress, summary_table


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over gRPC until SIGTERM")
    p.add_argument("config", nargs="?", help="YAML config (defaults: a small random model)")
    p.add_argument("--checkpoint", help="Hugging Face Mixtral-layout checkpoint directory")
    p.add_argument("--model-name", help="name clients use (model.name)")
    p.add_argument("--host", help="bind address (router.host), default 127.0.0.1")
    p.add_argument("--port", type=int, help="gRPC port (router.port), 0 picks a free one")
    p.add_argument("--workers", type=int, help="expert shard workers (workers.count)")
    p.add_argument("--address", help="Ray cluster to join ('auto' or host:port); default: embedded Ray")
    p.add_argument("--drain-s", type=float, default=10.0, help="grace period for in-flight requests on SIGTERM")


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


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="start a local cluster with a small random model and drive it")
    p.add_argument("--requests", type=int, default=64, help="requests to send")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    p.add_argument("--tokens", type=int, default=128, help="tokens per request")
    p.add_argument("--workers", type=int, default=2, help="expert shard workers")


def cmd_serve(args) -> int:
    from cluster.launcher import connect_ray

    config = load_config(args.config).with_overrides(**{
        "model.checkpoint": args.checkpoint, "model.name": args.model_name, "router.host": args.host,
        "router.port": args.port, "workers.count": args.workers, "ray.address": args.address,
    })
    connect_ray(config.ray)
    asyncio.run(_serve(config, args.drain_s))
    return 0


async def _serve(config: ServeConfig, drain_s: float) -> None:
    from cluster.launcher import deploy

    with load_progress() as progress:
        deployment = await deploy(config, progress)
    spec = deployment.weights.spec
    console.print(
        f"serving model [bold]{config.model.name}[/] on [bold]{deployment.address}[/]: "
        f"{spec.num_moe_layers} MoE layers x {spec.num_experts} experts over "
        f"{config.workers.count} workers, placement v{deployment.placement.version}. "
        f"SIGTERM or Ctrl-C drains and stops.", highlight=False,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    console.print(f"draining: health NOT_SERVING, in-flight requests get up to {drain_s:.0f}s")
    await deployment.stop(grace_s=drain_s)
    console.print("stopped")


def cmd_infer(args) -> int:
    from router_service.client import MoEClient

    with MoEClient(args.address) as client:
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
    from cluster.demo import run_demo
    from cluster.launcher import connect_ray

    config = ServeConfig().with_overrides(**{"router.port": 0, "workers.count": args.workers})
    connect_ray(config.ray, num_cpus=max(2, os.cpu_count() or 2))
    report = asyncio.run(run_demo(config, args.requests, args.concurrency, args.tokens))
    return 0 if report.max_rel_error < 1e-5 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe-serve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _infer_parser(sub)
    _demo_parser(sub)
    args = parser.parse_args(argv)
    handlers = {"serve": cmd_serve, "infer": cmd_infer, "demo": cmd_demo}
    try:
        return handlers[args.command](args)
    except (ConfigError, ValueError, TypeError, OSError) as err:
        console.print(f"[red]error:[/] {err}", highlight=False)
        return 2
    except grpc.RpcError as err:
        console.print(f"[red]error:[/] {err.code().name}: {err.details()}", highlight=False)
        return 1


if __name__ == "__main__":
    sys.exit(main())
