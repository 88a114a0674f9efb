"""Lose a whole node under load, on a multi-node Ray cluster of its own (`ray.cluster_utils.
Cluster`, fake GPU nodes): the workers there are restarted by Ray on the nodes left, reloaded by
the supervisor, and no request is lost or wrong. Prints one JSON line with the figures.

Run in its own process (`python -m tests.integration.node_loss_check`): it starts and stops a
Ray cluster, which must not be the test session's.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time

import ray
from ray.cluster_utils import Cluster

from bench.load_driver import LoadDriver
from cluster.app.launcher import deploy
from cluster.app.reference import ReferenceMoE
from cluster.config import validate_config
from cluster.placement import Placement
from workers.random_model import RandomModel

MODEL = {"layers": 2, "experts": 4, "hidden": 48, "ffn": 96, "top_k": 2, "seed": 51}
WORKERS = 3
GPUS_PER_NODE = 2
RESULT = "RESULT "  # the line of stdout that carries the figures


def _config():
    return validate_config({
        "model": {"name": "node-loss", "random": MODEL},
        "workers": {"count": WORKERS, "num_gpus": 1, "num_cpus": 0.25, "device": "cpu", "slots_per_worker": 6},
        "rebalance": {"enabled": False},
        "router": {"port": 0},
        "monitoring": {"enabled": False},
        "ray": {"namespace": "node-loss"},
    })


def main() -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "num_gpus": 0, "include_dashboard": False,
        # node death is noticed in about a second
        "_system_config": {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                           "health_check_failure_threshold": 2},
    })
    nodes = [cluster.add_node(num_cpus=1, num_gpus=GPUS_PER_NODE) for _ in range(3)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="node-loss", logging_level="WARNING")
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def run(coro, timeout_s=120):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout_s)

    config = _config()
    deployment = run(deploy(config))
    try:
        current = deployment.placement
        run(deployment.admin.apply(Placement.replicated(current.num_logical_experts, WORKERS, copies=2,
                                                        version=current.version + 1)))
        reference = ReferenceMoE(RandomModel(config.model.random.spec(), config.model.random.seed))
        spec = deployment.weights.spec
        driver = LoadDriver(deployment.address, config.model.name, spec,
                            lambda layer, x: reference.forward(layer, __import__("torch").from_numpy(x.copy()))[0],
                            threads=3, tokens=(8, 64), seed=5).start()
        deadline = time.monotonic() + 60
        while driver.count() < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        plane = deployment.plane
        victim_node = plane.pool.worker_nodes()[1]
        on_victim = [i for i, n in enumerate(plane.pool.worker_nodes()) if n == victim_node]
        node = next(n for n in nodes if n.node_id == victim_node)
        killed_at = time.monotonic()
        cluster.remove_node(node, allow_graceful=False)

        def recovered() -> bool:
            reloaded = {w for e in list(plane.supervisor.events) if e.kind == "reloaded" and e.at_s >= killed_at
                        for w in e.workers}
            return set(on_victim) <= reloaded and not plane.hub.down

        deadline = time.monotonic() + 60
        while not recovered() and time.monotonic() < deadline:
            time.sleep(0.05)
        recovery_s = time.monotonic() - killed_at if recovered() else None
        seen = driver.count()
        deadline = time.monotonic() + 60
        while driver.count() < seen + 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        tally = driver.stop()
        moved = [n for i, n in enumerate(plane.pool.worker_nodes()) if i in on_victim]
        print(RESULT + json.dumps({
            "workers_on_lost_node": on_victim, "recovery_s": recovery_s, "sent": len(driver.outcomes),
            "outcomes": tally, "errors": driver.errors[:10], "tail": [o for o, _ in driver.outcomes[-10:]], "new_nodes_differ": all(n != victim_node for n in moved),
            "events": [f"+{e.at_s - killed_at:.1f}s {e.kind}: {e.detail}" for e in plane.supervisor.events],
        }), flush=True)
    finally:
        run(deployment.stop(grace_s=1.0))
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
