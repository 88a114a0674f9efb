"""Per-layer round trip from the router to the expert workers and back, beside its floors, measured
in one run on the same machine.

    .venv/bin/python -m bench.bench_latency                 # every shape, JSON on stdout
    .venv/bin/python -m bench.bench_latency --quick         # one small shape, few calls

For each model shape and token count (1, 16, 128):
- `dispatch`: one MoE layer as generation calls it (`ModelRouter.moe` on the router's event loop:
  gate, dispatch plan, the workers' actor calls, combine), p50/p90, and its overhead: the round
  trip minus what the busiest worker computed (its `busy_s`, from the workers' counters);
  `dispatch_via_object_store`: the same with the batch always put in the object store (what a
  large batch does); `dispatch_compiled_graph`: the same shares through one Ray compiled graph
  over the workers (the transport the router does not use: see the README's figures);
- `layer_api`: the same layer through the gRPC layer API (KServe v2 `ModelInfer`, a client in this
  process);
- floors: `in_process` (the single-process reference layer, the same math with no distribution),
  `grpc_echo` (a bare gRPC server answering the same bytes), `actor_call` (a bare Ray actor echoing
  the same array), `actor_calls_awaited` (one bare echo actor per worker, called at once and
  awaited together on an asyncio loop, as the dispatch calls its workers) and `compiled_channel` (the same echo through a Ray compiled graph's shared-memory
  channel).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from concurrent import futures

import grpc
import numpy as np
import ray
import torch

from bench.bench_serving import ServedModel
from bench.render import emit
from cluster.app.launcher import connect_ray
from cluster.app.reference import ReferenceMoE
from cluster.config import RayConfig, ServeConfig
from router_service import ray_backend
from router_service.client import MoEClient
from router_service.dispatch import ReplicaTable, combine, plan_dispatch
from router_service.gate import route

SHAPES = {
    "h1024_e8_top2": dict(hidden=1024, ffn=2816, experts=8, top_k=2),
    "h2048_e64_top6": dict(hidden=2048, ffn=1408, experts=64, top_k=6),
    "h2048_e8_top2": dict(hidden=2048, ffn=1408, experts=8, top_k=2),
}
TOKENS = (1, 16, 128)


def quantiles(samples_s: list[float]) -> dict:
    ms = np.array(samples_s) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p90_ms": round(float(np.percentile(ms, 90)), 3),
            "calls": len(ms)}


def timed(fn, calls: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


# ---- floors -------------------------------------------------------------------------------------


@ray.remote(num_cpus=0.25)
class Echo:
    def echo(self, x):
        return x


def actor_floor(xs: dict[int, np.ndarray], calls: int) -> dict:
    echo = Echo.remote()
    ray.get(echo.echo.remote(0))
    return {t: quantiles(timed(lambda x=x: ray.get(echo.echo.remote(x)), calls)) for t, x in xs.items()}


def awaited_floor(xs: dict[int, np.ndarray], calls: int, actors: int = 2) -> dict:
    """`actors` bare echo actors called at once and awaited together on an asyncio loop: what the
    router's dispatch is made of, with no expert math and no gate, plan or combine."""
    echoes = [Echo.remote() for _ in range(actors)]
    ray.get([e.echo.remote(0) for e in echoes])

    async def run(x: np.ndarray) -> list[float]:
        out = []
        for i in range(calls + 5):
            start = time.perf_counter()
            await asyncio.gather(*(e.echo.remote(x) for e in echoes))
            if i >= 5:
                out.append(time.perf_counter() - start)
        return out

    return {t: quantiles(asyncio.run(run(x))) for t, x in xs.items()}


def compiled_floor(xs: dict[int, np.ndarray], calls: int) -> dict:
    """The same echo through a compiled graph (shared-memory channels on one node)."""
    from ray.dag import InputNode

    echo = Echo.remote()
    ray.get(echo.echo.remote(0))
    with InputNode() as inp:
        dag = echo.echo.bind(inp)
    compiled = dag.experimental_compile()
    try:
        return {t: quantiles(timed(lambda x=x: ray.get(compiled.execute(x)), calls)) for t, x in xs.items()}
    finally:
        compiled.teardown()


def grpc_floor(xs: dict[int, np.ndarray], calls: int) -> dict:
    """A bare gRPC unary echo of the same bytes (generic handler, no protobuf parsing)."""
    def echo(request: bytes, context) -> bytes:
        return request

    server = grpc.server(futures.ThreadPoolExecutor(2), options=[("grpc.max_receive_message_length", 2**30),
                                                               ("grpc.max_send_message_length", 2**30)])
    handler = grpc.method_handlers_generic_handler("bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 2**30),
                                                                  ("grpc.max_send_message_length", 2**30)])
    call = channel.unary_unary("/bench.Echo/Echo")
    try:
        return {t: quantiles(timed(lambda b=x.tobytes(): call(b), calls)) for t, x in xs.items()}
    finally:
        channel.close()
        server.stop(0)


# ---- the served paths ---------------------------------------------------------------------------


async def _timed_on_loop(fn, busy, calls: int, warmup: int = 5) -> dict:
    """Round trips of `fn()` on the router's loop (as generation calls it: no thread hop), each
    with the busiest worker's busy time during it (`busy()`: the workers' busy seconds)."""
    rounds, overheads = [], []
    for i in range(calls + warmup):
        before = await asyncio.to_thread(busy)
        start = time.perf_counter()
        await fn()
        took = time.perf_counter() - start
        after = await asyncio.to_thread(busy)
        if i >= warmup:
            rounds.append(took)
            overheads.append(took - max(a - b for a, b in zip(after, before)))
    out = quantiles(rounds)
    out["overhead_p50_ms"] = round(float(np.percentile(overheads, 50)) * 1000, 3)
    out["overhead_p90_ms"] = round(float(np.percentile(overheads, 90)) * 1000, 3)
    return out


def dispatch_point(served: ServedModel, x: torch.Tensor, calls: int, inline_bytes: int | None = None) -> dict:
    """`ModelRouter.moe` as generation calls it (gate, plan, the workers' actor calls, combine).
    inline_bytes: the backend's limit for sending the batch inside each call rather than through
    the object store (None: as configured; -1: always the store)."""
    router = served.deployment.router
    layer = router.spec.moe_layers[0]
    kept = ray_backend.INLINE_BYTES
    if inline_bytes is not None:
        ray_backend.INLINE_BYTES = inline_bytes
    try:
        return served.call(_timed_on_loop(lambda: router.moe(layer, x), served.busy, calls))
    finally:
        ray_backend.INLINE_BYTES = kept


def compiled_point(served: ServedModel, x: torch.Tensor, calls: int) -> dict:
    """The same layer's worker shares through one Ray compiled graph over the deployment's
    workers (`ExpertWorker.forward_compiled`, asyncio execution): gate and plan as the router
    does them, every worker reads the batch from the graph's shared-memory input channel and
    answers on its own channel (None when it has no share), then the combine."""
    from ray.dag import InputNode, MultiOutputNode

    deployment = served.deployment
    spec, layer = deployment.router.spec, deployment.router.spec.moe_layers[0]
    gate = deployment.weights.gate(layer).float()
    table = ReplicaTable(deployment.plane.placement)
    handles = list(deployment.pool.handles)

    async def run() -> dict:
        with InputNode() as inp:
            dag = MultiOutputNode([w.forward_compiled.bind(inp[0], inp[i + 1]) for i, w in enumerate(handles)])
        graph = dag.experimental_compile(enable_asyncio=True)  # inside the loop that will await it
        try:
            async def one():
                routing = route(x, gate, spec.gate, spec.top_k)
                plan = plan_dispatch(routing, spec.moe_index(layer), spec.num_experts, table, None,
                                     spec.num_shared_experts)
                work = [None] * len(handles)
                for request in plan.requests:
                    work[request.worker] = (0, request.share)
                outputs = await asyncio.gather(*await graph.execute_async(x.numpy(), *work))
                combine(x.shape[0], x.shape[1], plan, [outputs[r.worker] for r in plan.requests])

            return await _timed_on_loop(one, served.busy, calls)
        finally:
            await asyncio.to_thread(graph.teardown)

    return served.call(run())


def bench_shape(name: str, shape: dict, args) -> dict:
    config = ServeConfig().with_overrides(**{
        "model.name": f"latency-{name}", "model.random": {"layers": 1, "seed": 0, **shape}, "router.port": 0,
        "workers.count": args.workers, "workers.torch_threads": 1, "workers.num_cpus": 0.5,
        "rebalance.enabled": False, "monitoring.enabled": False,
    })
    rng = np.random.default_rng(0)
    xs = {t: rng.standard_normal((t, shape["hidden"]), dtype=np.float32) for t in args.tokens}
    out: dict = {"shape": shape, "tokens": {}}
    torch.set_num_threads(args.threads)
    reference = ReferenceMoE(_weights(config))
    for t, x in xs.items():
        out["tokens"][str(t)] = {"in_process": quantiles(timed(lambda x=x: reference.forward(0, torch.from_numpy(x)),
                                                                args.calls))}
    reference = None  # its weights are not needed any more
    torch.set_num_threads(1)
    print(f"# {name}: floors", file=sys.stderr, flush=True)
    floors = (("actor_call", actor_floor), ("actor_calls_awaited", lambda xs, calls: awaited_floor(xs, calls, args.workers)),
              ("compiled_channel", compiled_floor), ("grpc_echo", grpc_floor))
    for floor, fn in floors:
        try:
            figures = fn(xs, args.calls)
        except Exception as err:  # a floor Ray cannot give here is reported, not fatal
            figures = {t: {"error": f"{type(err).__name__}: {err}"} for t in xs}
        for t, fig in figures.items():
            out["tokens"][str(t)][floor] = fig
    print(f"# {name}: served", file=sys.stderr, flush=True)
    served = ServedModel(config)
    try:
        with MoEClient(served.deployment.address) as client:
            client.wait_ready(30)
            for t, x in xs.items():
                point = out["tokens"][str(t)]
                point["dispatch"] = dispatch_point(served, torch.from_numpy(x), args.calls)
                point["dispatch_via_object_store"] = dispatch_point(served, torch.from_numpy(x), args.calls, -1)
                try:
                    point["dispatch_compiled_graph"] = compiled_point(served, torch.from_numpy(x), args.calls)
                except Exception as err:  # what Ray cannot give here is reported, not fatal
                    point["dispatch_compiled_graph"] = {"error": f"{type(err).__name__}: {err}"}
                point["layer_api"] = quantiles(timed(lambda x=x: client.infer(served.deployment.router.name, x,
                                                                              layer=0), args.calls))
                floor = point["in_process"]["p50_ms"] + point["grpc_echo"].get("p50_ms", float("nan"))
                point["layer_api_minus_in_process_and_echo_ms"] = round(point["layer_api"]["p50_ms"] - floor, 3)
    finally:
        served.stop()
    return out


def _weights(config: ServeConfig):
    from cluster.app.launcher import weights_for

    return weights_for(config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names of SHAPES")
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="tokens per call")
    parser.add_argument("--calls", type=int, default=200, help="timed calls per point")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="torch threads of the in-process layer")
    parser.add_argument("--quick", action="store_true", help="one small shape, few calls")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        SHAPES["quick"] = dict(hidden=256, ffn=512, experts=8, top_k=2)
        args.shapes, args.calls = "quick", 30
    args.tokens = [int(t) for t in args.tokens.split(",")]
    connect_ray(RayConfig(namespace="moe-serve-latency"), num_cpus=max(4, os.cpu_count() or 2), include_dashboard=False)
    report = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__},
              "workers": args.workers, "shapes": {}}
    for name in args.shapes.split(","):
        print(f"# {name}", file=sys.stderr, flush=True)
        report["shapes"][name] = bench_shape(name, SHAPES[name], args)
    emit(report, args.out)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
