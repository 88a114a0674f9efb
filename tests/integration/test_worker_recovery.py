"""Redundancy that never silently disappears: with every expert on two workers and warm spares,
a worker killed 20 times in a row under concurrent load serves again (its place takes calls)
within 5 s every time, no request fails and none is wrong. (Between kills the test waits for the
spares to be up again: a new spare is a new process, which takes seconds to start here.)"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import ray

from tests.integration.support import MARKS, LoadDriver, Served, serve_config, wait_until

pytestmark = MARKS

RANDOM = {"layers": 2, "experts": 4, "hidden": 48, "ffn": 96, "top_k": 2, "seed": 17}
KILLS = 20
BACK_S = 5.0


@pytest.fixture(scope="module")
def spared(deploy_served) -> Iterator[Served]:
    start, stop = deploy_served
    config = serve_config("it-spares", random=RANDOM, workers=3).with_overrides(**{
        "rebalance.enabled": False, "rebalance.min_replicas": 2, "workers.slots_per_worker": 6, "workers.spares": 3,
        "workers.num_cpus": 0.25,
    })
    served = start(config)
    yield served
    stop(served)


def _serving_pid(served: Served, worker: int) -> tuple[int, int] | None:
    """(pid, calls) of the process in worker `worker`'s place, None while it does not answer."""
    pool = served.deployment.pool
    try:
        handle = pool.handles[worker]
        pid = ray.get(handle.ready.remote(), timeout=1)["pid"]
        calls = ray.get(handle.stats.remote(), timeout=1)["calls"]
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return None
    return pid, calls


def test_a_worker_killed_20_times_serves_again_within_5s_every_time(spared: Served) -> None:
    plane = spared.deployment.plane
    wait_until(lambda: len(plane.pool.spares) == 3 and not plane.hub.down, 60, "spares up and every worker serving")
    assert all(len(reps) == 2 for reps in plane.placement.replicas), "every expert on two workers from the start"
    expected = lambda layer, x: spared.expected(layer, x)[0]  # noqa: E731
    driver = LoadDriver(spared.address, spared.name, spared.spec, expected, threads=3, tokens=(8, 32), seed=4).start()
    back_s = []
    try:
        wait_until(lambda: driver.count() >= 10, 60, "requests before the first kill")
        for kill in range(KILLS):
            worker = kill % 3
            wait_until(lambda: _spares_up(spared), 60, "a spare up before the next kill", poll_s=0.1)
            pid, _ = _serving_pid(spared, worker)
            ray.kill(plane.pool.handles[worker], no_restart=False)
            killed_at = time.monotonic()

            def serving_again() -> bool:
                now = _serving_pid(spared, worker)
                return now is not None and now[0] != pid and now[1] > 0

            wait_until(serving_again, 30, f"worker {worker} taking calls after kill {kill + 1}", poll_s=0.05)
            back_s.append(time.monotonic() - killed_at)
            seen = driver.count()
            wait_until(lambda: driver.count() >= seen + 3, 30, "requests between kills")
    finally:
        tally = driver.stop()

    assert set(tally) == {"OK"}, (tally, driver.errors[:5])
    assert max(back_s) < BACK_S, f"serving again after {max(back_s):.1f}s (all: {[round(s, 1) for s in back_s]})"
    kinds = [e.kind for e in plane.supervisor.events]
    assert kinds.count("replaced") >= KILLS // 2, kinds


def _spares_up(served: Served) -> bool:
    """The next spare in line answers (a new spare is a new process: it takes seconds to start)."""
    spares = list(served.deployment.pool.spares)
    try:
        return bool(spares) and ray.get(spares[0].ready.remote(), timeout=0.5) is not None
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return False
