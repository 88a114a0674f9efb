"""The soak's deployment in the `moe-serve deploy` layout (`bench.bench_soak`): a detached
`ServiceController` on the embedded Ray owning detached worker and router actors, so that the
controller itself can be killed and come back; what the soak asks of it (forced rebalances,
status, the workers by name, each process's pid) and a thread that watches its status.

The workers are `tests.integration.faults.FaultyWorker`s (worker
`faults.HANG_WORKER` hangs forever in its math on rows whose first value is `faults.HANG`),
handed to the controller by value (`register`).
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass

import ray

from cluster.app.service import create_controller, router_name
from cluster.config import ServeConfig, validate_config
from cluster.placement import Placement
from tests.integration import faults
from workers.pool import SPARE

NAMESPACE = "moe-serve-soak"


def register() -> None:
    """Ship `FaultyWorker` by value: the controller's and workers' processes
    need not import `bench` or `tests`."""
    faults.register()
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def soak_config(model: dict, workers: int, window_s: float, spares: int, share_timeout_s: float) -> ServeConfig:
    return validate_config({
        "model": {"name": "soak", "random": model},
        "workers": {"count": workers, "num_cpus": 0.5, "torch_threads": 1, "slots_per_worker": 14, "spares": spares},
        # no automatic rebalancing: the soak forces its own on a fixed schedule
        "rebalance": {"enabled": False, "min_replicas": 2, "window_s": window_s,
                      "check_interval_s": min(0.5, window_s)},
        # a hung worker's share goes to another replica after share_timeout_s, and the
        # supervisor restarts a worker whose math has run that long
        "router": {"port": 0, "http_port": None, "num_cpus": 0.5, "share_timeout_s": share_timeout_s},
        "ray": {"namespace": NAMESPACE},
    }, source="soak config")


@dataclass(frozen=True)
class WorkerActor:
    """A worker (or spare) actor as it answers now."""

    name: str
    handle: ray.actor.ActorHandle
    index: int  # SPARE for a spare
    pid: int
    incarnation: str


class Service:
    """The deployment and the calls the soak makes on it (every one bounded by a timeout)."""

    def __init__(self, config: ServeConfig, worker_cls: type, start_timeout_s: float = 300.0):
        self.config = config
        self.model = config.model.name
        self.controller = create_controller(config, worker_cls=worker_cls)
        self.address: str = ray.get(self.controller.start.remote(), timeout=start_timeout_s)
        self.router = ray.get_actor(router_name(self.model), namespace=NAMESPACE)
        self.controller_id = self.controller._actor_id.hex()

    def replicate(self, copies: int = 2) -> None:
        """Every logical expert on `copies` distinct workers, and no more (so that rebalances
        really move replicas)."""
        current = self.placement()
        target = Placement.replicated(current.num_logical_experts, current.num_workers, copies=copies,
                                      version=current.version + 1)
        outcome, result, _ = ray.get(self.controller.admin_call.remote("apply", target), timeout=120)
        if outcome != "ok":
            raise RuntimeError(f"applying the replicated placement failed: {result}")

    def placement(self) -> Placement:
        return ray.get(self.router.placement.remote(), timeout=30)

    def rebalance(self) -> dict:
        """A forced rebalance through the controller (it plans for the load it has seen)."""
        outcome, event, _ = ray.get(self.controller.admin_call.remote("rebalance", True), timeout=120)
        if outcome != "ok":
            raise RuntimeError(f"the forced rebalance was refused: {event}")
        report = event.report
        return {"kind": event.kind, "moves": event.moves, "applied": report is not None,
                "bytes_moved": report.bytes_moved if report else 0,
                "duration_s": round(report.duration_s, 3) if report else 0.0,
                "balancedness_before": round(event.balancedness_before, 3),
                "balancedness_planned": round(event.balancedness_planned, 3),
                "version": report.to_version if report else None}

    def workers(self, timeout_s: float = 1.0) -> list[WorkerActor]:
        """The model's worker and spare actors that answer within `timeout_s`, found by name (a
        spare that took a worker's place keeps its `-spare-NN` name and answers with the index)."""
        prefixes = (f"{self.model}-worker-", f"{self.model}-spare-")
        names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                       if a["namespace"] == NAMESPACE and a["name"].startswith(prefixes))
        handles = {}
        for name in names:
            try:
                handles[name] = ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:  # gone since the listing
                continue
        refs = {name: handle.ready.remote() for name, handle in handles.items()}
        done, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s) if refs else ([], [])
        found = []
        for name, ref in refs.items():
            if ref not in done:
                continue
            try:
                info = ray.get(ref)
            except ray.exceptions.RayError:
                continue
            found.append(WorkerActor(name, handles[name], info["index"], info["pid"], info["incarnation"]))
        return found

    def serving(self, worker: int, not_incarnation: str | None, timeout_s: float = 0.25) -> bool:
        """Whether worker `worker`'s place is served by an incarnation other than `not_incarnation`
        that has computed shares (took calls) since it started."""
        for actor in self.workers(timeout_s):
            if actor.index == worker and actor.incarnation != not_incarnation:
                try:
                    if ray.get(actor.handle.stats.remote(), timeout=timeout_s)["calls"] > 0:
                        return True
                except (ray.exceptions.RayError, TimeoutError):
                    continue
        return False

    def pids(self, controller_pid: int | None) -> dict[str, int | None]:
        """Each process of the deployment by role: router, controller, worker-i, spare-N."""
        try:
            router = ray.get(self.router.pid.remote(), timeout=1.0)
        except (ray.exceptions.RayError, TimeoutError):
            router = None
        pids: dict[str, int | None] = {"router": router, "controller": controller_pid}
        for actor in self.workers():
            role = f"worker-{actor.index}" if actor.index != SPARE else actor.name.replace(f"{self.model}-", "")
            pids[role] = actor.pid
        return pids

    def router_retries(self) -> int | None:
        """Worker shares the router has sent again to another replica since it started (read
        from the router actor with Ray's `__ray_call__`: the actor has no getter for it)."""
        try:
            return ray.get(self.router.__ray_call__.remote(_retries), timeout=2.0)
        except (ray.exceptions.RayError, TimeoutError):
            return None

    def controller_state(self) -> tuple[str, int]:
        """(state, pid) of the controller actor in Ray's GCS: ALIVE, RESTARTING, ..."""
        from ray._private import state

        info = state.actors(actor_id=self.controller_id)
        return info.get("State", "?"), int(info.get("Pid") or 0)

    def stop(self) -> None:
        """Stop the routers and workers, then the controller (a controller that never took
        charge stops nothing: the embedded Ray's shutdown ends them)."""
        try:
            ray.get(self.controller.shutdown.remote(2.0), timeout=60)
        except (ray.exceptions.RayError, TimeoutError):
            pass
        ray.kill(self.controller)


def _retries(router_actor) -> int:
    side = router_actor.side
    return 0 if side is None else side.router._layer.retries


class StatusWatch:
    """The controller's `status()` every `interval_s` from a thread: the latest answer, the
    controller's pid as each answer gave it, and every worker event seen. An event's time is
    `answered - age_s` (an upper bound: the controller computed the age before it answered),
    the smallest over every answer that listed it; `sent - age_s` is a lower bound, and the
    largest is kept beside it. A call made while the controller is down waits for the
    restarted one to be in charge, so the first answer with a new pid tells when it took over."""

    def __init__(self, service: Service, interval_s: float = 0.5, call_timeout_s: float = 20.0):
        self._service = service
        self._interval_s = interval_s
        self._call_timeout_s = call_timeout_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True, name="status-watch")
        self.latest: dict | None = None
        # (kind, workers, detail, duration_s, occurrence) -> {"at_s", "at_low_s", ...}
        self._events: dict[tuple, dict] = {}
        self.pids: list[tuple[float, float, int]] = []  # (sent, answered, controller pid) when the pid changes
        self.errors = 0

    def start(self) -> StatusWatch:
        self._poll()
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._poll()

    def _poll(self) -> None:
        sent = time.monotonic()
        try:
            status = ray.get(self._service.controller.status.remote(), timeout=self._call_timeout_s)
        except (ray.exceptions.RayError, TimeoutError):
            self.errors += 1  # sent to the controller just killed: the next call waits for the new one
            return
        answered = time.monotonic()
        with self._lock:
            self.latest = status
            pid = status["controller"]["pid"]
            if not self.pids or self.pids[-1][2] != pid:
                self.pids.append((sent, answered, pid))
            seen: dict[tuple, int] = {}
            for event in status["worker_events"]:  # oldest first, only ever appended to
                key = (event["kind"], tuple(event["workers"]), event["detail"], event["duration_s"])
                seen[key] = occurrence = seen.get(key, 0) + 1
                self._merge((*key, occurrence), sent - event["age_s"], answered - event["age_s"])

    def _merge(self, key: tuple, low_s: float, high_s: float) -> None:
        known = self._events.get(key)
        if known is None:
            self._events[key] = {"at_s": high_s, "at_low_s": low_s, "kind": key[0], "workers": key[1],
                                 "detail": key[2], "duration_s": key[3]}
        else:
            known["at_s"], known["at_low_s"] = min(known["at_s"], high_s), max(known["at_low_s"], low_s)

    def worker_events(self, worker: int, since_s: float) -> list[dict]:
        with self._lock:
            return sorted((dict(e) for e in self._events.values() if worker in e["workers"] and e["at_s"] >= since_s),
                          key=lambda e: e["at_s"])

    def controller_pid(self) -> int | None:
        with self._lock:
            return self.pids[-1][2] if self.pids else None

    def down_workers(self) -> list[int]:
        with self._lock:
            return list(self.latest["down_workers"]) if self.latest else []

    def stop(self) -> None:
        """Stop polling (a call still waiting on a controller that is not in charge is left to
        time out in the daemon thread)."""
        self._stop.set()
        self._thread.join(2.0)
