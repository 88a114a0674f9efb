"""`moe-serve deploy | status | scale | shutdown`: a long-lived service on a running Ray cluster.

`deploy` creates the detached controller (see `cluster.app.service`) and returns once the router
serves; the service then lives on without the terminal. The other commands find it by model
name in its Ray namespace; `status --address HOST:PORT` asks a router's admin API instead, which
works for `moe-serve serve` (one process, no controller actor) as well as for a deployment.
"""

from __future__ import annotations

import argparse
import json
import time

from rich.console import Console

from cluster.app.client_flags import add_client_flags, client_credentials
from cluster.app.console import (
    decisions_table,
    events_table,
    load_progress,
    placement_table,
    routers_table,
    scale_events_table,
    service_summary,
    worker_events_table,
    worker_load_table,
)
from cluster.config import ConfigError, RayConfig, load_config

DEFAULT_NAMESPACE = RayConfig().namespace


def add_service_parsers(sub) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", "--ray-address", dest="address",
                        help="Ray cluster to join ('auto' or host:port); default: ray.address of the config")
    common.add_argument("--namespace", help="Ray namespace of the deployment; default: ray.namespace of the config")
    p = sub.add_parser("deploy", parents=[common], help="start a long-lived service on a Ray cluster")
    p.add_argument("config", help="deployment YAML (model, workers, autoscaling, router)")
    p.add_argument("--model-name", help="name clients use (model.name)")
    p.add_argument("--port", type=int, help="gRPC port of the router (router.port)")
    p.add_argument("--http-port", type=int, help="OpenAI-compatible HTTP port of the router (router.http_port)")
    p.add_argument("--host", help="bind address of the router (router.host)")
    p.add_argument("--timeout-s", type=float, default=1800.0, help="give up when the service is not serving by then")
    by_name = argparse.ArgumentParser(add_help=False)  # a deployment found by name in Ray
    by_name.add_argument("--namespace", default=DEFAULT_NAMESPACE, help="Ray namespace of the deployment")
    by_name.add_argument("--model", default="moe", help="model name of the deployment")
    named = argparse.ArgumentParser(add_help=False, parents=[by_name])
    named.add_argument("--address", "--ray-address", dest="ray_address", default="auto",
                       help="Ray cluster to join ('auto' or host:port)")
    p = sub.add_parser("status", parents=[by_name], help="workers, placement, load, autoscaler decisions, events "
                       "(of a deployment found by name, or of any router with --address)")
    p.add_argument("--address", metavar="HOST:PORT", help="ask this router's admin API (its gRPC port) instead of "
                   "finding a deployment in Ray: works for `moe-serve serve` as well as `deploy`")
    p.add_argument("--ray-address", default="auto", help="Ray cluster to find the deployment in, without --address "
                   "('auto' or host:port)")
    p.add_argument("--timeout-s", type=float, default=60.0, help="deadline of each admin call (with --address)")
    add_client_flags(p)
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.add_argument("--watch", type=float, metavar="SECONDS", help="a live view, refreshed every SECONDS until Ctrl-C")
    p.add_argument("--png", metavar="FILE", help="also write a picture: per-expert load over time, placement, workers")
    p = sub.add_parser("scale", parents=[named], help="set the worker count by hand, or hand it back to the autoscaler")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("workers", nargs="?", type=int, help="workers to run (within min/max workers)")
    group.add_argument("--routers", type=int, help="routers to run (within router.min_count/max_count): "
                                                  "data-parallel attention over the expert pool")
    group.add_argument("--auto", action="store_true", help="let the autoscaler decide again (workers and routers)")
    p = sub.add_parser("shutdown", parents=[named], help="stop the router and the workers, remove the service")
    p.add_argument("--drain-s", type=float, default=0.0, help="first say NOT_SERVING and keep serving this long, "
                   "so load balancers stop sending (default 0: stop at once)")
    p.add_argument("--grace-s", type=float, default=10.0, help="time in-flight requests get to finish")


def _connect(address: str, namespace: str) -> None:
    from cluster.app.launcher import connect_ray

    connect_ray(RayConfig(address=address, namespace=namespace))


def cmd_deploy(args, console: Console) -> int:
    import ray

    from cluster.app.service import create_controller

    config = load_config(args.config).with_overrides(**{
        "model.name": args.model_name, "router.port": args.port, "router.http_port": args.http_port,
        "router.host": args.host,
        "ray.namespace": args.namespace,
    })
    address = args.address or config.ray.address
    if address is None:
        raise ConfigError(f"{args.config}: moe-serve deploy needs a running Ray cluster: pass --address auto "
                          f"(or host:port), or set ray.address")
    _connect(address, config.ray.namespace)
    controller = create_controller(config)
    started = controller.start.remote()
    deadline = time.monotonic() + args.timeout_s
    with load_progress(console) as progress:
        while not ray.wait([started], timeout=0.25)[0]:
            progress(*ray.get(controller.progress.remote()))
            if time.monotonic() > deadline:
                ray.kill(controller)
                raise TimeoutError(f"the service was not serving after {args.timeout_s:.0f}s; removed it")
        try:
            address = ray.get(started)
        except ray.exceptions.RayTaskError as err:  # e.g. a checkpoint that cannot be read
            ray.kill(controller)
            cause = err.cause
            if isinstance(cause, (ValueError, TypeError, OSError)):
                raise cause from None  # its message, without the actor's traceback
            raise
        progress(*ray.get(controller.progress.remote()))
    console.print(
        f"deployed [bold]{config.model.name}[/] in namespace {config.ray.namespace}: router on "
        f"[bold]{address}[/]; it keeps running after this command. "
        f"`moe-serve status --model {config.model.name}` shows it, `moe-serve shutdown --model "
        f"{config.model.name}` stops it.", highlight=False,
    )
    console.print(ray.get(controller.describe_text.remote()), highlight=False)
    return 0


def _controller(args):
    from cluster.app.service import find_controller

    _connect(args.ray_address, args.namespace)
    return find_controller(args.model, args.namespace)


def _status_source(args):
    """`fetch() -> status dict`: over a router's admin API with `--address`, else from the
    deployment's controller actor found by name in Ray."""
    history = bool(args.png)
    if args.address:
        from router_service.admin_client import AdminClient

        client = AdminClient(args.address, timeout_s=args.timeout_s, credentials=client_credentials(args))
        return lambda: client.status(args.model, history=history)
    import ray

    controller = _controller(args)
    return lambda: ray.get(controller.status.remote(history=history))


def cmd_status(args, console: Console) -> int:
    fetch = _status_source(args)
    status = fetch()
    if args.png:
        from cluster.app.status_picture import write_status_png

        write_status_png(status, args.png)
        status.pop("history")
    if args.json:
        print(json.dumps(status, indent=2, default=str))
    elif args.watch:
        from rich.live import Live

        with Live(status_view(status), console=console, refresh_per_second=4) as live:
            try:
                while True:
                    time.sleep(args.watch)
                    live.update(status_view(fetch()))
            except KeyboardInterrupt:
                pass
    else:
        console.print(status_view(status))
    if args.png:
        console.print(f"wrote {args.png}", highlight=False)
    return 0


def status_view(status: dict):
    """The status as one renderable: headline, workers, placement, decisions and events."""
    from rich.console import Group

    parts = [service_summary(status), routers_table(status), worker_load_table(status["workers"]),
             placement_table(status["model"], status["placement"], status["layers"], status["num_experts"],
                             status.get("num_shared_experts", 0))]
    if status["autoscaler"]["recent_decisions"]:
        parts.append(decisions_table(status["autoscaler"]["recent_decisions"][-5:]))
    if status["scale_events"]:
        parts.append(scale_events_table(status["scale_events"][-10:]))
    if status["rebalance_events"]:
        parts.append(events_table(status["rebalance_events"][-10:]))
    if status.get("worker_events"):
        parts.append(worker_events_table(status["worker_events"][-10:]))
    return Group(*parts)


def cmd_scale(args, console: Console) -> int:
    import ray

    result = ray.get(_controller(args).scale.remote(None if args.auto else args.workers, args.routers))
    if "error" in result:
        raise ValueError(result["error"])
    if args.auto:
        console.print(f"autoscaler: {result['mode']} ({result['workers']} workers, {result['routers']} routers now)")
    elif args.routers is not None:
        console.print(f"{result['routers']} routers serving ({result['reason']}); the router count stays until "
                      f"`moe-serve scale --auto`", highlight=False)
    else:
        console.print(
            f"{result['action']}: {result['from_workers']} -> {result['to_workers']} workers in "
            f"{result['duration_s']:.1f}s ({result['reason']}); the autoscaler waits until `moe-serve scale --auto`",
            highlight=False,
        )
    return 0 if result.get("action") != "failed" else 1


def cmd_shutdown(args, console: Console) -> int:
    import ray

    controller = _controller(args)
    if args.drain_s > 0:
        console.print(f"draining {args.model}: health NOT_SERVING, still serving for {args.drain_s:g}s", highlight=False)
    ray.get(controller.shutdown.remote(args.grace_s, args.drain_s))
    ray.kill(controller)
    console.print(f"stopped {args.model}: router, workers and controller are gone")
    return 0


HANDLERS = {"deploy": cmd_deploy, "status": cmd_status, "scale": cmd_scale, "shutdown": cmd_shutdown}
