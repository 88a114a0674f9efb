"""The soak's faults (`bench.bench_soak`), each timed from its injection to the service serving
again: a worker killed, a worker hung inside its math, the controller killed.

Every time is `time.monotonic()` (one clock for every process of this machine). For each fault:
`injected_s`; `noticed_s` (the supervisor's "lost" event for the worker; for the controller, Ray
running its new process); `served_s` (the worker's place takes calls again: an incarnation other
than the one hit has computed shares; the controller answers `status()` with a new pid, i.e. it
is back in charge). `report` adds the requests that failed around it.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field

import grpc
import numpy as np
import ray
import torch

from bench.soak_load import Failure, Shapes
from bench.soak_service import Service, StatusWatch
from cluster.app.reference import ReferenceMoE
from router_service.client import MoEClient
from tests.integration import faults

PLACED_BACK = ("replaced", "reloaded")  # supervisor events: the worker's place serves again
HANG_TOKENS = 256
HANG_ATTEMPTS = 5
NOT_IN_CHARGE_S = 15.0  # a restarted controller running this long without answering status is stuck
AROUND_S = (1.0, 3.0)  # failures this long before the injection and after serving again are the fault's


@dataclass
class Fault:
    kind: str
    at_s: float  # planned offset in the soak (it waits while another fault is still pending)
    injected_s: float | None = None
    noticed_s: float | None = None
    served_s: float | None = None
    retries: list[int | None] = field(default_factory=list)  # the router's, at injection and serving again
    detail: dict = field(default_factory=dict)

    @property
    def pending(self) -> bool:
        """Injected and not serving again yet."""
        return self.injected_s is not None and self.served_s is None

    @property
    def settled(self) -> bool:
        """Nothing more to learn about it."""
        return not self.pending

    def watch(self, service: Service, status: StatusWatch) -> None:
        raise NotImplementedError

    def status(self) -> str:
        if self.injected_s is None:
            return ""
        return f" {self.kind}:" + ("..." if self.pending else f"{self.served_s - self.injected_s:.1f}s")

    def report(self, start_s: float, failures: list[Failure], shapes: Shapes, end_s: float) -> dict:
        """The fault's figures: times after the injection, and the requests around it."""
        if self.injected_s is None:
            return {"fault": self.kind, "planned_at_s": round(self.at_s, 1), "injected": False, **self.detail}

        def after(t: float | None) -> float | None:
            return None if t is None else round(t - self.injected_s, 3)

        low, high = self.injected_s - AROUND_S[0], (self.served_s or end_s) + AROUND_S[1]
        around = [f for f in failures if low <= f.at_s <= high]
        latencies = shapes.answered_between(self.injected_s, self.served_s or end_s)
        before, at_serving = (self.retries + [None, None])[:2]
        return {
            "fault": self.kind, "planned_at_s": round(self.at_s, 1), "injected_at_s": round(self.injected_s - start_s, 2),
            "noticed_after_s": after(self.noticed_s), "served_again_after_s": after(self.served_s),
            **self.detail,
            "requests_failed_around": len(around),
            "failures_around": [{"after_s": round(f.at_s - self.injected_s, 2), "source": f.source,
                                 "outcome": f.outcome, "detail": f.detail} for f in around[:10]],
            "requests_ok_until_served_again": len(latencies),
            "max_latency_ms_until_served_again": round(1000 * max(latencies), 1) if latencies else None,
            "router_retries": None if before is None or at_serving is None else at_serving - before,
        }


@dataclass
class WorkerFault(Fault):
    """A fault of one worker; the supervisor's events and the worker's calls tell the rest."""

    worker: int = 0
    incarnation_before: str | None = None

    def _mark(self, service: Service) -> bool:
        """Note the worker's pid and incarnation before the fault; False when it does not answer."""
        actor = next((a for a in service.workers() if a.index == self.worker), None)
        if actor is None:
            return False
        self.incarnation_before = actor.incarnation
        self.detail.update(worker=self.worker, pid_before=actor.pid, actor_before=actor.name)
        return True

    def _follow(self, service: Service, timeout_s: float = 120.0, poll_s: float = 0.1) -> None:
        """Look every `poll_s` until the worker's place takes calls again (from a thread): the
        time is that of the first look that saw it, within the look before (`..._within_s`)."""
        looked_s = self.injected_s
        while self.served_s is None and time.monotonic() - self.injected_s < timeout_s:
            start = time.monotonic()
            if service.serving(self.worker, self.incarnation_before):
                now = time.monotonic()
                actor = next((a for a in service.workers() if a.index == self.worker), None)
                if actor is not None:
                    self.detail.update(pid_after=actor.pid, actor_after=actor.name)
                self.detail["served_again_within_s"] = round(now - looked_s, 3)
                self.served_s = now
                return
            looked_s = start
            time.sleep(poll_s)

    def watch(self, service: Service, status: StatusWatch) -> None:
        """The supervisor's events for the worker since the injection (lost, then replaced or
        reloaded), as the controller's status lists them."""
        if self.injected_s is None:
            return
        events = status.worker_events(self.worker, self.injected_s - 0.1)
        lost = next((e for e in events if e["kind"] == "lost"), None)
        if lost is None:
            return
        self.noticed_s = lost["at_s"]
        self.detail["noticed_within_s"] = round(lost["at_s"] - lost["at_low_s"], 3)
        self.detail["events"] = [{"after_s": round(e["at_s"] - self.injected_s, 3), "kind": e["kind"],
                                  "took_s": round(e["duration_s"], 3), "detail": e["detail"]} for e in events]
        back = next((e for e in events if e["kind"] in PLACED_BACK and e["at_s"] >= lost["at_s"]), None)
        if back is not None:
            self.detail["placed_back_after_s"] = round(back["at_s"] - self.injected_s, 3)
            self.detail["placed_back_by"] = ("a warm spare" if back["kind"] == "replaced"
                                             else "reloading the worker Ray restarted")


@dataclass
class WorkerKill(WorkerFault):
    """SIGKILL of a worker's process (`ray.kill(handle, no_restart=False)`): Ray restarts it
    empty, or a warm spare takes its place; the router retries the shares it lost."""

    def fire(self, service: Service) -> bool:
        if not self._mark(service):
            return False
        handle = next(a.handle for a in service.workers() if a.index == self.worker)
        self.injected_s = time.monotonic()
        ray.kill(handle, no_restart=False)
        threading.Thread(target=self._follow, args=(service,), daemon=True, name="worker-kill").start()
        return True


@dataclass
class WorkerHang(WorkerFault):
    """One request whose rows carry `faults.HANG`: worker `faults.HANG_WORKER` hangs forever in
    its math on its share. The router sends the share to another replica after
    `router.share_timeout_s`; the supervisor restarts the worker (or a spare takes its place).

    The hang only happens if the worker gets a share of the request (the rows all go to the same
    experts, split over their replicas by spare capacity): an answer faster than the share
    timeout means it did not, and the request is sent again (up to HANG_ATTEMPTS)."""

    worker: int = faults.HANG_WORKER
    share_timeout_s: float = 2.0

    def fire(self, service: Service, reference: ReferenceMoE, rng: np.random.Generator) -> bool:
        placement = service.placement()
        spec = reference.spec
        hosted = {e for _, e in placement.experts_of(self.worker)}
        for layer in spec.moe_layers:
            x = rng.standard_normal((HANG_TOKENS, spec.hidden_size), dtype=np.float32)
            x[:, 0] = faults.HANG
            want, routing = reference.forward(layer, torch.from_numpy(x.copy()))
            experts = {spec.moe_index(layer) * spec.experts_per_layer + int(e) for e in routing.topk_ids.unique()}
            if experts & hosted and self._mark(service):
                self.detail.update(layer=layer, hang_experts=sorted(experts))
                self.injected_s = time.monotonic()  # each attempt sets it again as it sends
                threading.Thread(target=self._send, args=(service, x, layer, want), daemon=True,
                                 name="hang-request").start()
                threading.Thread(target=self._follow, args=(service,), daemon=True, name="worker-hang").start()
                return True
        return False  # the worker hosts none of the experts the rows go to: try later, after a rebalance

    def _send(self, service: Service, x: np.ndarray, layer: int, want: torch.Tensor) -> None:
        attempts = []
        with MoEClient(service.address) as client:
            for _ in range(HANG_ATTEMPTS):
                self.injected_s = sent = time.monotonic()
                try:
                    got = client.infer(service.model, x, layer=layer, timeout_s=60)
                    rel = float((torch.from_numpy(got.hidden_states.copy()) - want).abs().max() / want.abs().max())
                    outcome = "OK" if rel < 1e-5 else f"wrong: rel {rel:.2e}"
                except grpc.RpcError as err:
                    outcome = f"{err.code().name}: {err.details()}"
                took = time.monotonic() - sent
                attempts.append({"answered_after_s": round(took, 3), "outcome": outcome})
                self.detail["hang_request"] = attempts
                if took >= self.share_timeout_s or outcome != "OK":
                    return  # it hung its share (or failed: reported as it is)
        self.detail["hang_request_note"] = f"worker {self.worker} got no share in {HANG_ATTEMPTS} attempts"
        self.served_s = self.injected_s  # nothing hung: nothing to wait for


@dataclass
class ControllerKill(Fault):
    """SIGKILL of the controller's process: Ray restarts the actor, which takes over the detached
    workers and routers (`ServiceController.recover`). Requests never pass through it."""

    pid_before: int | None = None

    def fire(self, service: Service, status: StatusWatch) -> bool:
        self.pid_before = status.controller_pid()
        if self.pid_before is None:
            return False
        self.detail["pid_before"] = self.pid_before
        self.injected_s = time.monotonic()
        os.kill(self.pid_before, signal.SIGKILL)
        threading.Thread(target=self._follow_ray, args=(service,), daemon=True, name="controller-gcs").start()
        return True

    def _follow_ray(self, service: Service, timeout_s: float = 120.0, poll_s: float = 0.05) -> None:
        """Ray's view of the controller actor: when it saw it die, when its new process runs."""
        while time.monotonic() - self.injected_s < timeout_s:
            try:
                state, pid = service.controller_state()
            except Exception as err:  # noqa: BLE001 - whatever the GCS client raises: look again
                self.detail["gcs_error"] = repr(err)
                state, pid = "?", 0
            now = time.monotonic()
            if state != "ALIVE" and "ray_restarting_after_s" not in self.detail:
                self.detail["ray_restarting_after_s"] = round(now - self.injected_s, 3)
            if state == "ALIVE" and pid and pid != self.pid_before:
                self.detail["new_process_pid"] = pid
                self.noticed_s = now
                return
            time.sleep(poll_s)

    @property
    def settled(self) -> bool:
        return self.injected_s is None or (self.served_s is not None and self.detail.get("takeover_s") is not None)

    def watch(self, service: Service, status: StatusWatch) -> None:
        """The first status answer from a new pid (the restarted controller in charge); how long
        its take-over took (`recovered_s`, set once its loops run again: a later answer)."""
        if self.injected_s is None:
            return
        if self.served_s is None:
            for _, answered_s, pid in list(status.pids):
                if answered_s > self.injected_s and pid != self.pid_before:
                    self.served_s = answered_s
                    self.detail["pid_after"] = pid
                    break
        controller = (status.latest or {}).get("controller", {})
        if self.served_s is not None and controller.get("pid") == self.detail["pid_after"]:
            recovered_s = controller.get("recovered_s")
            self.detail["takeover_s"] = None if recovered_s is None else round(recovered_s, 3)
        waited_s = 0.0 if self.noticed_s is None else time.monotonic() - self.noticed_s
        if self.served_s is not None:
            self.detail.pop("not_in_charge", None)
        elif waited_s > NOT_IN_CHARGE_S:
            self.detail["not_in_charge"] = (
                f"the restarted controller process (pid {self.detail['new_process_pid']}) has run for "
                f"{waited_s:.0f}s without answering status(): it has not taken over (its own `recover` "
                f"call can fail while Ray still counts the actor as restarting)")
