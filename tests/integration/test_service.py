"""The long-lived service on a real Ray: a detached controller owning the workers, a router
actor, scaling by hand under load, a router restart, and the `moe-serve deploy | status | scale
| shutdown` commands from other processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
import yaml

from cluster.app.reference import ReferenceMoE
from cluster.app.service import controller_name, create_controller, find_controller, router_name
from cluster.control.metrics import exported_name
from router_service.client import MoEClient
from tests.integration.conftest import reference_weights
from tests.integration.support import MARKS, NAMESPACE, LoadDriver, free_port, scrape, serve_config, total, wait_until
from workers.pool import worker_name

pytestmark = MARKS

MOE_SERVE = str(Path(sys.executable).with_name("moe-serve"))
SVC_RANDOM = {"layers": 2, "experts": 8, "hidden": 48, "ffn": 64, "top_k": 2, "seed": 5}


def service_config(name: str, port: int):
    return serve_config(name, random=SVC_RANDOM, workers=2, router={"port": port, "num_cpus": 0.25}).with_overrides(**{
        "workers.min_workers": 1, "workers.max_workers": 3, "rebalance.enabled": False,
    })


class Service:
    def __init__(self, name: str, port: int):
        self.config = service_config(name, port)
        self.name = name
        self.reference = ReferenceMoE(reference_weights(self.config))
        self.spec = self.reference.spec
        self.controller = create_controller(self.config)
        self.address = ray.get(self.controller.start.remote(), timeout=120)

    def expected(self, layer: int, x: np.ndarray) -> torch.Tensor:
        return self.reference.forward(layer, torch.from_numpy(x.copy()))[0]

    def status(self) -> dict:
        return ray.get(self.controller.status.remote(), timeout=60)

    def driver(self, **options) -> LoadDriver:
        return LoadDriver(self.address, self.name, self.spec, self.expected, **options)

    def worker_ids(self) -> list[str]:
        ids = []
        for i in range(len(self.status()["workers"])):
            ids.append(ray.get_actor(worker_name(self.name, i), namespace=NAMESPACE)._actor_id.hex())
        return ids


@pytest.fixture(scope="module")
def service(ray_cluster) -> Iterator[Service]:
    svc = Service("it-svc", free_port())
    yield svc
    ray.get(svc.controller.shutdown.remote(1.0), timeout=60)
    ray.kill(svc.controller)


def test_the_service_serves_exactly_and_reports_its_status(service):
    with MoEClient(service.address) as client:
        client.wait_ready(30)
        for i, layer in enumerate(service.spec.moe_layers):
            x = np.random.default_rng(i).standard_normal((40, service.spec.hidden_size), dtype=np.float32)
            got = client.infer(service.name, x, layer=layer, timeout_s=30)
            np.testing.assert_allclose(got.hidden_states, service.expected(layer, x).numpy(), rtol=0, atol=1e-5)

    status = service.status()

    assert status["address"] == service.address and status["routers"] == [router_name(service.name)]
    assert [w["index"] for w in status["workers"]] == [0, 1] and status["pending_workers"] == 0
    assert status["bounds"] == [1, 3] and status["autoscaler"]["mode"] == "off"
    assert status["tokens_per_s"] > 0  # 2 x 40 tokens x top-2 routed within the window
    assert len(status["balancedness"]) == service.spec.num_moe_layers
    json.dumps(status, default=str)  # what `moe-serve status --json` prints


def test_actors_read_well_in_the_ray_dashboard(service):
    named = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE}
    mine = {controller_name(service.name), router_name(service.name), worker_name(service.name, 0),
            worker_name(service.name, 1)}
    assert mine <= named, (mine, named)
    reprs = {name: ray.get(ray.get_actor(name, namespace=NAMESPACE).__ray_call__.remote(lambda self: repr(self)),
                           timeout=30) for name in sorted(mine)}
    # Ray shows the repr recorded at creation forever: nothing in it may change later
    assert reprs[controller_name(service.name)] == "ServiceController(model='it-svc')"
    assert reprs[router_name(service.name)] == f"RouterActor(model='it-svc', name='{router_name(service.name)}')"
    assert re.fullmatch(r"ExpertWorker\(index=1, device=cpu, pid=\d+\)", reprs[worker_name(service.name, 1)])


def test_scaling_by_hand_under_load_loses_no_request(service):
    driver = service.driver(threads=2, seed=10).start()
    try:
        wait_until(lambda: driver.count() >= 10, 60, "requests before scaling")
        out = ray.get(service.controller.scale.remote(3), timeout=120)
        assert (out["action"], out["to_workers"]) == ("out", 3), out
        wait_until(lambda: driver.count() >= 30, 60, "requests on 3 workers")
        back = ray.get(service.controller.scale.remote(2), timeout=120)
        assert (back["action"], back["to_workers"]) == ("in", 2), back
        seen = driver.count()
        wait_until(lambda: driver.count() >= seen + 10, 60, "requests after scaling in")
    finally:
        tally = driver.stop()

    assert tally == {"OK": sum(tally.values())}, tally
    status = service.status()
    assert len(status["workers"]) == 2 and status["autoscaler"]["mode"] == "manual (2 workers)"
    assert [e["action"] for e in status["scale_events"][-2:]] == ["out", "in"]
    with pytest.raises(ValueError):  # the third worker is gone, its name free again
        ray.get_actor(worker_name(service.name, 2), namespace=NAMESPACE)
    ray.get(service.controller.scale.remote(None), timeout=30)
    assert service.status()["autoscaler"]["mode"] == "off"
    # the controller actor exports its events too: one manual scale-out, one scale-in
    events = exported_name("scale_events") + "_total"
    wait_until(lambda: [total(scrape(), events, model=service.name, action=a, trigger="manual") for a in ("out", "in")]
               == [1, 1], 30, "the scaling events on the metrics endpoint", poll_s=0.5)


def test_scaling_outside_the_bounds_is_refused(service):
    out = ray.get(service.controller.scale.remote(4), timeout=30)
    assert out == {"error": "cannot scale to 4 workers: workers.min_workers is 1 and workers.max_workers is 3"}


THREADS = 2


def test_a_router_restart_keeps_the_workers_and_attaches_again(service):
    workers_before = service.worker_ids()
    router = ray.get_actor(router_name(service.name), namespace=NAMESPACE)
    pid_before = ray.get(router.pid.remote(), timeout=30)
    driver = service.driver(threads=THREADS, seed=20, wait_for_ready=True).start()
    try:
        wait_until(lambda: driver.count() >= 5, 60, "requests before the restart")
        ray.kill(router, no_restart=False)  # the process dies; Ray starts it again
        seen = driver.count()
        wait_until(lambda: sum(o == "OK" for o, _ in driver.outcomes[seen:]) >= 10, 60,
                   "requests served by the restarted router")
    finally:
        tally = driver.stop()

    failed = {k: v for k, v in tally.items() if k != "OK"}
    # only requests on the connection that died fail, as UNAVAILABLE: per client thread the one
    # in flight, and at most one more sent before the client saw the socket close
    assert set(failed) <= {"UNAVAILABLE"} and sum(failed.values()) <= 2 * THREADS, (tally, driver.errors)
    tail = [outcome for outcome, _ in driver.outcomes[-10:]]
    assert tail == ["OK"] * 10, (tail, driver.errors)  # the restarted router serves every request
    assert ray.get(router.pid.remote(), timeout=30) != pid_before  # a new router process
    assert service.worker_ids() == workers_before  # the same worker actors, none created twice
    status = service.status()
    assert status["routers"] == [router_name(service.name)] and status["address"] == service.address


def test_deploy_status_scale_shutdown_from_the_command_line(ray_cluster, tmp_path):
    name = "it-svc-cli"
    config = service_config(name, free_port()).model_dump()
    config["ray"] = {"namespace": NAMESPACE}
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(config))
    gcs = ray.get_runtime_context().gcs_address
    env = dict(os.environ, COLUMNS="200", RAY_AUTH_MODE="disabled")

    def cli(*args: str, timeout_s: float = 180) -> subprocess.CompletedProcess:
        # --ray-address: every service command's Ray cluster (`status --address` names a router)
        return subprocess.run([MOE_SERVE, *args, "--ray-address", gcs, "--namespace", NAMESPACE], env=env,
                              capture_output=True, text=True, timeout=timeout_s)

    deployed = cli("deploy", str(path))
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    assert f"deployed {name}" in deployed.stdout
    # the command has exited; the service lives on, owned by its detached controller
    status = json.loads(cli("status", "--model", name, "--json").stdout)
    assert len(status["workers"]) == 2 and status["routers"] == [router_name(name)]
    # the same status through the router's admin API (GetStatus: the router asks the controller)
    via_router = json.loads(cli("status", "--address", status["address"], "--model", name, "--json").stdout)
    assert via_router["routers"] == status["routers"] and via_router["placement"] == status["placement"]
    assert via_router["router_fleet"] == status["router_fleet"] and len(via_router["workers"]) == 2
    with MoEClient(status["address"]) as client:
        client.wait_ready(30)
        x = np.ones((4, SVC_RANDOM["hidden"]), dtype=np.float32)
        assert client.infer(name, x, layer=0, timeout_s=30).hidden_states.shape == (4, SVC_RANDOM["hidden"])

    again = cli("deploy", str(path))
    assert again.returncode == 2 and f"model '{name}' is already deployed" in again.stdout
    scaled = cli("scale", "3", "--model", name)
    assert scaled.returncode == 0 and "out: 2 -> 3 workers" in scaled.stdout, scaled.stdout + scaled.stderr
    refused = cli("scale", "9", "--model", name)
    assert refused.returncode == 2 and "workers.max_workers is 3" in refused.stdout
    table = cli("status", "--model", name)
    assert table.returncode == 0 and "workers (serving / pending)" in table.stdout and "3 / 0" in table.stdout
    picture = tmp_path / "status.png"
    drawn = cli("status", "--model", name, "--png", str(picture))
    assert drawn.returncode == 0 and picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", drawn.stdout + drawn.stderr

    stopped = cli("shutdown", "--model", name, "--grace-s", "1")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    with pytest.raises(ValueError, match="no moe-serve deployment of model 'it-svc-cli'"):
        find_controller(name, NAMESPACE)
    wait_until(lambda: not _named_alive(worker_name(name, 0)), 30, "the workers to go")
    broken = dict(config, model={"name": name, "checkpoint": str(tmp_path / "no-such-checkpoint")})
    path.write_text(yaml.safe_dump(broken))
    refused = cli("deploy", str(path))
    assert refused.returncode == 2 and "no-such-checkpoint" in refused.stdout, refused.stdout + refused.stderr
    assert "Traceback" not in refused.stdout
    missing = cli("status", "--model", name)
    assert missing.returncode == 2 and "start one with `moe-serve deploy" in missing.stdout
    assert controller_name(name) not in {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}


def _named_alive(name: str) -> bool:
    try:
        ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return False
    return True
