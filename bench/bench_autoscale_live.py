"""Closed-loop autoscaling on a fake multi-node Ray cluster: load rises, a GPU node and a serving
worker are added; load falls, they are removed; no request fails and every answer is exact.

    python -m bench.bench_autoscale_live            # runs itself in a private namespace (root)

It boots `deploy/cluster-local.yaml` (Ray's fake multi-node provider: each node is processes
on this machine) inside its own PID, mount and network namespace, because the fake cluster
runs `ray stop --force`. Prints JSON: time from the load rise to a new serving worker (target
< 30 s), to the node's removal after the load falls, and the request tally of each phase.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ISOLATED_ENV = "MOE_SERVE_ISOLATED"
MODEL = "autoscale"
RANDOM = {"layers": 2, "experts": 8, "hidden": 64, "ffn": 128, "top_k": 2, "seed": 3}


def scenario_config(target_tokens_per_s: float):
    from cluster.config import validate_config

    return validate_config({
        "model": {"name": MODEL, "random": RANDOM},
        "workers": {"count": 1, "min_workers": 1, "max_workers": 2, "num_gpus": 1, "num_cpus": 0.5,
                    "resources": {"expert_worker": 1}, "device": "cpu", "slots_per_worker": 20},
        "router": {"port": 0, "num_cpus": 0.5},
        "rebalance": {"window_s": 2.0, "check_interval_s": 0.25, "min_interval_s": 0.5, "min_window_tokens": 256},
        "autoscaling": {"enabled": True, "target_tokens_per_s_per_worker": target_tokens_per_s,
                        "upscale_delay_s": 1.0, "downscale_delay_s": 3.0, "check_interval_s": 0.25,
                        "downscale_utilization": 0.5, "max_queue_delay_ms": 10000, "start_timeout_s": 90},
        "ray": {"namespace": "moe-serve-autoscale"},
    }, source="autoscaling scenario")


def _wait(condition, timeout_s: float, what: str, poll_s: float = 0.25):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def run_scenario(target_tokens_per_s: float = 400.0, phase_timeout_s: float = 120.0) -> dict:
    """The whole scenario on a fresh fake cluster; needs to run isolated (see the module doc)."""
    import ray
    import torch

    from bench.load_driver import LoadDriver
    from cluster.app.local_cluster import LocalAutoscalingCluster, expert_nodes
    from cluster.app.reference import ReferenceMoE
    from cluster.app.service import create_controller
    from workers.random_model import RandomModel

    config = scenario_config(target_tokens_per_s)
    reference = ReferenceMoE(RandomModel(config.model.random.spec(), RANDOM["seed"]))

    def expected(layer, x):
        return reference.forward(layer, torch.from_numpy(x.copy()))[0]

    cluster = LocalAutoscalingCluster()
    cluster.start()
    result: dict = {"target_tokens_per_s_per_worker": target_tokens_per_s}
    try:
        ray.init(address="auto", namespace=config.ray.namespace, logging_level="ERROR")
        start = time.monotonic()
        controller = create_controller(config)
        address = ray.get(controller.start.remote(), timeout=phase_timeout_s)
        result["deploy_s"] = time.monotonic() - start  # includes launching the first GPU node
        result["expert_nodes_at_start"] = len(expert_nodes())

        def status():
            return ray.get(controller.status.remote(), timeout=30)

        def driver(**options):
            return LoadDriver(address, MODEL, reference.spec, expected, **options)

        heavy = driver(threads=2, tokens=(64, 128), seed=1).start()
        rise = time.monotonic()
        try:
            _wait(lambda: len(status()["workers"]) == 2, phase_timeout_s, "a second worker")
            result["rise_to_worker_s"] = time.monotonic() - rise
            _wait(lambda: status()["workers"][1]["tokens"] > 0, phase_timeout_s, "the new worker to serve")
            result["rise_to_serving_worker_s"] = time.monotonic() - rise
            result["expert_nodes_at_peak"] = len(expert_nodes())
            seen = heavy.count()
            _wait(lambda: heavy.count() >= seen + 10, phase_timeout_s, "requests on two workers")
        finally:
            result["rise_requests"] = heavy.stop()

        light = driver(threads=1, tokens=(8, 16), seed=2, pause_s=0.5).start()
        fall = time.monotonic()
        try:
            _wait(lambda: len(status()["workers"]) == 1, phase_timeout_s, "the second worker to go")
            result["fall_to_worker_removed_s"] = time.monotonic() - fall
            _wait(lambda: len(expert_nodes()) == 1, phase_timeout_s, "the idle GPU node to go")
            result["fall_to_node_removed_s"] = time.monotonic() - fall
        finally:
            result["fall_requests"] = light.stop()
        final = status()
        result["scale_events"] = [
            {k: e[k] for k in ("action", "from_workers", "to_workers", "duration_s", "moves", "reason")}
            for e in final["scale_events"]
        ]
        result["expert_nodes_at_end"] = len(expert_nodes())
        ray.get(controller.shutdown.remote(1.0), timeout=60)
        ray.kill(controller)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-tokens-per-s", type=float, default=400.0, help="autoscaling target per worker")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if os.environ.get(ISOLATED_ENV) != "1":
        from cluster.app.local_cluster import can_isolate, isolated

        why = can_isolate()
        if why:
            print(json.dumps({"skipped": why}))
            return 2
        env = dict(os.environ, **{ISOLATED_ENV: "1"}, RAY_AUTH_MODE="disabled")
        cmd = isolated([sys.executable, "-m", "bench.bench_autoscale_live", *(argv or sys.argv[1:])])
        return subprocess.run(cmd, env=env, cwd=Path(__file__).resolve().parents[1]).returncode
    result = run_scenario(args.target_tokens_per_s)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
