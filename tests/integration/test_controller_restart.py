"""A control plane that survives its own death: the deployment's workers and routers are detached
actors, so killing the controller's process (SIGKILL) under load fails no request and leaves the
same worker and router processes serving; Ray restarts the controller, which takes them over
again (the placement the routers serve, its events from Ray's key-value store) and is back in
charge: scaling works again."""

from __future__ import annotations

import os
import signal
import time

import ray
import torch

from cluster.app.reference import ReferenceMoE
from cluster.app.service import create_controller, router_name
from tests.integration.conftest import reference_weights
from tests.integration.support import MARKS, NAMESPACE, LoadDriver, free_port, serve_config, wait_until
from workers.pool import worker_name

pytestmark = MARKS

RANDOM = {"layers": 2, "experts": 8, "hidden": 48, "ffn": 64, "top_k": 2, "seed": 9}
TAKEOVER_S = 10.0


def _pids(name: str, workers: int) -> dict[str, int]:
    actors = {worker_name(name, i): ray.get_actor(worker_name(name, i), namespace=NAMESPACE) for i in range(workers)}
    pids = {n: ray.get(a.ready.remote(), timeout=30)["pid"] for n, a in actors.items()}
    router = ray.get_actor(router_name(name), namespace=NAMESPACE)
    pids[router_name(name)] = ray.get(router.pid.remote(), timeout=30)
    return pids


def test_killing_the_controller_loses_no_request_and_it_takes_over_again(ray_cluster):
    name = "it-restart"
    config = serve_config(name, random=RANDOM, workers=2, router={"port": free_port(), "num_cpus": 0.25}).with_overrides(
        **{"workers.min_workers": 1, "workers.max_workers": 3, "rebalance.enabled": False})
    controller = create_controller(config)
    address = ray.get(controller.start.remote(), timeout=180)
    reference = ReferenceMoE(reference_weights(config))
    try:
        event = ray.get(controller.scale.remote(3), timeout=120)  # a history to keep: a scale-out ...
        assert event["action"] == "out", event
        before = ray.get(controller.status.remote(), timeout=60)
        pids = _pids(name, 3)
        driver = LoadDriver(address, name, reference.spec, lambda layer, x: reference.forward(
            layer, torch.from_numpy(x.copy()))[0], threads=2, seed=3).start()
        try:
            wait_until(lambda: driver.count() >= 20, 60, "requests before the kill")
            os.kill(before["controller"]["pid"], signal.SIGKILL)
            killed_at = time.monotonic()

            def back() -> bool:
                try:
                    status = ray.get(controller.status.remote(), timeout=5)
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                    return False
                return status["controller"]["pid"] != before["controller"]["pid"]

            wait_until(back, 30, "the controller back in charge", poll_s=0.2)
            took_s = time.monotonic() - killed_at
            seen = driver.count()
            wait_until(lambda: driver.count() >= seen + 20, 60, "requests after the takeover")
        finally:
            tally = driver.stop()

        assert set(tally) == {"OK"}, (tally, driver.errors[:5])
        assert took_s < TAKEOVER_S, f"the controller took {took_s:.1f}s to take over"
        after = ray.get(controller.status.remote(), timeout=60)
        assert _pids(name, 3) == pids, "the same worker and router processes served throughout"
        assert after["placement_version"] == before["placement_version"]
        assert [e["action"] for e in after["scale_events"]] == [e["action"] for e in before["scale_events"]]
        assert after["autoscaler"]["mode"] == "manual (3 workers)", "what was pinned by hand is kept"
        assert after["controller"]["recovered_s"] is not None

        back_to_two = ray.get(controller.scale.remote(2), timeout=120)  # in charge: it scales again
        assert (back_to_two["action"], back_to_two["to_workers"]) == ("in", 2), back_to_two
    finally:
        ray.get(controller.shutdown.remote(1.0), timeout=120)
        ray.kill(controller)
