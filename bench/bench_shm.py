"""What system shared memory saves a co-located client of the layer API: one layer request of
`--tokens` x `--hidden` float32 (default 4096 x 1024, 16 MiB each way) sent as raw bytes in the
gRPC message vs through registered shared memory, from a client in another process to a server
in this one (an embedded Ray, 2 expert workers, rebalancing off).

    .venv/bin/python -m bench.bench_shm [--tokens 4096] [--hidden 1024] [--reps 10] [--out FILE]

The client (this module with `--client`, our own environment's gRPC stubs) is driven through
its stdin: each command runs `n` requests one after another and prints their round trips, and
around each command this process reads the workers' busy seconds (`pool.stats()`), so the
transport overhead per request is the round trip minus the workers' busy time. The workers run
in parallel, so the busy time on the critical path is at least the busiest worker's; the
overhead figure subtracts that (the upper bound of what is not worker math) and also shows the
sum. Rounds alternate raw and shared memory, so both see the same machine load.

What a round trip holds: raw: building the request (the input's bytes copied into it),
serialising, the transfer, the server parsing it, decoding, the layer, encoding the output's
bytes, the transfer back, parsing. Shared memory: copying the input into the region (as a client
that has its data elsewhere must; one that produces it in place saves this), the request
metadata, the server reading its input from the region (no copy before the gate and the object
store put), the layer, writing the output into the region; the client reads the output in place.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np


def _client(address: str, model: str, tokens: int, hidden: int, layer: int) -> None:
    """Answer stdin commands `raw N` / `shm N` with one JSON line of N round trips (seconds)."""
    import grpc

    from protos import grpc_predict_v2_pb2 as pb
    from protos import grpc_predict_v2_pb2_grpc as pb_grpc

    x = np.random.default_rng(0).standard_normal((tokens, hidden), dtype=np.float32)
    options = [("grpc.max_send_message_length", 1 << 30), ("grpc.max_receive_message_length", 1 << 30)]
    channel = grpc.insecure_channel(address, options=options)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    regions = {name: shared_memory.SharedMemory(create=True, size=x.nbytes) for name in ("in", "out")}
    for name, region in regions.items():
        stub.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(
            name=f"bench-{name}", key="/" + region.name, byte_size=x.nbytes))
    region_in = np.ndarray(x.shape, np.float32, buffer=regions["in"].buf)
    region_out = np.ndarray(x.shape, np.float32, buffer=regions["out"].buf)

    def request() -> pb.ModelInferRequest:
        req = pb.ModelInferRequest(model_name=model)
        req.parameters["layer"].int64_param = layer
        req.inputs.add(name="hidden_states", datatype="FP32", shape=[tokens, hidden])
        return req

    def raw_once() -> np.ndarray:
        req = request()
        req.raw_input_contents.append(x.tobytes())
        response = stub.ModelInfer(req, timeout=120)
        return np.frombuffer(response.raw_output_contents[0], np.float32).reshape(tokens, hidden)

    def shm_once() -> np.ndarray:
        np.copyto(region_in, x)
        req = request()
        for tensor, region in ((req.inputs[0], "bench-in"), (req.outputs.add(name="hidden_states"), "bench-out")):
            tensor.parameters["shared_memory_region"].string_param = region
            tensor.parameters["shared_memory_byte_size"].int64_param = x.nbytes
        stub.ModelInfer(req, timeout=120)
        return region_out

    same = np.array_equal(raw_once(), shm_once())
    print(json.dumps({"ready": True, "same_answer": bool(same)}), flush=True)
    for line in sys.stdin:
        kind, count = line.split()
        once = raw_once if kind == "raw" else shm_once
        times = []
        for _ in range(int(count)):
            start = time.perf_counter()
            once()
            times.append(time.perf_counter() - start)
        print(json.dumps({"kind": kind, "times_s": times}), flush=True)
    del region_in, region_out
    stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest())
    for region in regions.values():
        region.close()
        region.unlink()


def _busy(pool) -> list[float]:
    return [float(s["busy_s"]) for s in pool.stats()]


def _run(args: argparse.Namespace) -> dict:
    import ray

    from cluster.app.launcher import connect_ray, deploy
    from cluster.config import validate_config

    config = validate_config({
        "model": {"name": "bench", "random": {"layers": 1, "experts": 8, "hidden": args.hidden, "ffn": args.ffn,
                                              "top_k": 2, "seed": 0}},
        "workers": {"count": 2, "num_cpus": 0.5, "torch_threads": 1},
        "router": {"port": 0, "http_port": None, "shared_memory": True, "max_message_mb": 1024},
        "rebalance": {"enabled": False},
        "monitoring": {"enabled": False},
        "ray": {"namespace": "moe-serve-shm-bench"},
    }, source="shm bench")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    connect_ray(config.ray, num_cpus=4, include_dashboard=False)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    deployment = asyncio.run_coroutine_threadsafe(deploy(config), loop).result(300)
    client = subprocess.Popen(
        [sys.executable, "-m", "bench.bench_shm", "--client", deployment.address,
         "--tokens", str(args.tokens), "--hidden", str(args.hidden)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        hello = json.loads(client.stdout.readline())

        def command(kind: str, count: int) -> tuple[list[float], list[float]]:
            before = _busy(deployment.pool)
            client.stdin.write(f"{kind} {count}\n")
            client.stdin.flush()
            times = json.loads(client.stdout.readline())["times_s"]
            return times, [b - a for a, b in zip(before, _busy(deployment.pool))]

        command("raw", 2), command("shm", 2)  # warm-up
        figures = {kind: {"times_s": [], "busy_s": [0.0, 0.0]} for kind in ("raw", "shm")}
        for _ in range(args.rounds):
            for kind in ("raw", "shm"):
                times, busy = command(kind, args.reps)
                figures[kind]["times_s"] += times
                figures[kind]["busy_s"] = [a + b for a, b in zip(figures[kind]["busy_s"], busy)]
        client.stdin.close()
        client.wait(60)
    finally:
        if client.poll() is None:
            client.kill()
        asyncio.run_coroutine_threadsafe(deployment.stop(grace_s=1.0), loop).result(60)
        ray.shutdown()
    return {"tokens": args.tokens, "hidden": args.hidden, "ffn": args.ffn, "same_answer": hello["same_answer"],
            **{kind: _summary(f["times_s"], f["busy_s"]) for kind, f in figures.items()}}


def _summary(times_s: list[float], busy_s: list[float]) -> dict:
    n = len(times_s)
    mean = statistics.fmean(times_s)
    busiest, total = max(busy_s) / n, sum(busy_s) / n
    return {"requests": n, "rtt_median_ms": 1e3 * statistics.median(times_s), "rtt_mean_ms": 1e3 * mean,
            "rtt_min_ms": 1e3 * min(times_s), "busiest_worker_ms": 1e3 * busiest, "workers_sum_ms": 1e3 * total,
            "overhead_ms": 1e3 * (mean - busiest), "overhead_vs_sum_ms": 1e3 * (mean - total)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=128, help="expert intermediate size (small: the transport shows)")
    parser.add_argument("--reps", type=int, default=5, help="requests per round and kind")
    parser.add_argument("--rounds", type=int, default=4, help="rounds, each raw then shared memory")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures here (JSON)")
    parser.add_argument("--client", default=None, help=argparse.SUPPRESS)  # the client process: its address
    args = parser.parse_args(argv)
    if args.client is not None:
        _client(args.client, "bench", args.tokens, args.hidden, 0)
        return 0
    figures = _run(args)
    print(f"{args.tokens} x {args.hidden} float32 ({args.tokens * args.hidden * 4 / 2**20:.0f} MiB each way), "
          f"{figures['raw']['requests']} requests per kind; same answer both ways: {figures['same_answer']}")
    print(f"{'':14}{'rtt median':>12}{'rtt mean':>10}{'rtt min':>9}{'busiest worker':>16}{'overhead':>10}"
          f"{'(vs sum)':>10}")
    for kind, label in (("raw", "raw bytes"), ("shm", "shared memory")):
        f = figures[kind]
        print(f"{label:14}{f['rtt_median_ms']:10.1f}ms{f['rtt_mean_ms']:8.1f}ms{f['rtt_min_ms']:7.1f}ms"
              f"{f['busiest_worker_ms']:14.1f}ms{f['overhead_ms']:8.1f}ms{f['overhead_vs_sum_ms']:8.1f}ms")
    if args.out is not None:
        args.out.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
