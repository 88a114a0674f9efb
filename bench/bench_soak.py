"""A bounded soak: many requests of random shapes through the real gRPC path, forced rebalances
under a rotating hot set, and three faults (a worker killed, a worker hung, the controller
killed), each timed until the service serves again; memory growth and error counts as JSON.

    .venv/bin/python -m bench.bench_soak                        # 120 s soak
    .venv/bin/python -m bench.bench_soak --quick --out soak.json  # 30 s soak, ~50-70 s with Ray's start

The deployment runs in the `moe-serve deploy` layout, on an embedded Ray: a detached
`ServiceController` owning detached worker and router actors (`bench.soak_service`), so the
controller itself can be killed and come back. A small random model (2 MoE layers x 8 experts)
on 3 workers with every logical expert replicated twice (`rebalance.min_replicas: 2`, so a lost
or hung worker costs a reroute), `--spares` warm spare workers (default 1: a lost worker's place
is taken by a spare instead of waiting for Ray to start a process), `router.share_timeout_s`
`--share-timeout-s` (default 2 s: a share unanswered that long goes to another replica). This
process runs a `LoadDriver` whose threads check every answer against the single-process
reference: token counts log-uniform over 1..2048, both layers, 3 in 4 aimed at a Zipf-hot set
(`cluster.sim.traffic`), the rest standard normal; a side thread sends FP16 requests and checks
them to FP16 rounding. Every failure is timestamped.

During the soak: every `--rebalance-every-s` a forced rebalance through the controller
(`admin_call("rebalance", True)`) plans for the hot set, which then rotates (so replicas really
move); at 25% of the run worker 2's process is killed, at 50% one request hangs worker 1
forever inside its math (`tests.integration.faults`), at 75% the controller's process is killed
(SIGKILL). A fault waits while an earlier one is not served again; rebalances wait while a fault
is pending (a forced one skips the controller's own check for a worker down). For each fault
(`bench.soak_faults`): when it was injected, when the service noticed, when it served again, and
the requests that failed around it. Every `--sample-every-s` the RSS of this process (load
driver, prober, reference), the router, the controller and each worker and spare is read; the
report gives start/end/max per process and the growth over the second half of the run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import ray
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from bench.render import emit
from bench.soak_faults import ControllerKill, Fault, WorkerHang, WorkerKill
from bench.soak_load import MAX_TOKENS, MIB, Fp16Prober, Memory, Shapes, TimedLoadDriver
from bench.soak_service import NAMESPACE, Service, StatusWatch, register, soak_config
from cluster.app.launcher import connect_ray
from cluster.app.reference import ReferenceMoE
from cluster.config import RayConfig
from cluster.placement import Placement
from cluster.sim.traffic import SkewedTraffic
from tests.integration import faults
from workers.random_model import RandomModel

MODEL = {"layers": 2, "experts": 8, "hidden": 64, "ffn": 128, "top_k": 2, "seed": 17}
WORKERS = 3
KILLED_WORKER = 2  # the hang hits faults.HANG_WORKER (1): each fault a different worker
SETTLE_S = 30.0  # after the planned duration, how long a fault still pending may take to serve again


def ray_pids() -> dict[str, int]:
    """The embedded Ray's own daemons on this node (the raylet holds the object store), where
    this process started them; empty when it joined a cluster."""
    node = getattr(ray._private.worker, "_global_node", None)
    processes = getattr(node, "all_processes", None) or {}
    return {f"ray {kind}": infos[0].process.pid for kind, infos in processes.items()
            if kind in ("raylet", "gcs_server") and infos}


class Schedule:
    """The soak's timeline: memory samples, forced rebalances (then the hot set rotates) and the
    three faults, watched until each serves again."""

    def __init__(self, service: Service, status: StatusWatch, shapes: Shapes, driver: TimedLoadDriver,
                 reference: ReferenceMoE, args, progress: Progress):
        self.service, self.status, self.shapes, self.driver = service, status, shapes, driver
        self.reference, self.args, self.progress = reference, args, progress
        d = args.duration_s
        self.faults: list[Fault] = [
            WorkerKill("worker kill", 0.25 * d, worker=KILLED_WORKER),
            WorkerHang("worker hang", 0.5 * d, share_timeout_s=args.share_timeout_s),
            ControllerKill("controller kill", 0.75 * d),
        ]
        self.memory = Memory()
        self.rebalances: list[dict] = []
        self.deferred = 0
        self.daemons = ray_pids()
        self.rng = np.random.default_rng(5)
        self.start_s = time.monotonic()

    def run(self) -> dict:
        task = self.progress.add_task("soak", total=self.args.duration_s, status="")
        next_sample, next_rebalance = 0.0, self.args.rebalance_every_s
        retries_before = self.service.router_retries()
        while (now := time.monotonic() - self.start_s) < self.args.duration_s:
            if now >= next_sample:
                self.sample(now)
                next_sample += self.args.sample_every_s
            self.watch_faults()
            if now >= next_rebalance:  # before a fault due at the same time
                next_rebalance += self.args.rebalance_every_s
                self.maybe_rebalance(now)
            self.maybe_fire(now)
            failed = self.driver.not_ok()
            self.progress.update(task, completed=now, status=(
                f"{self.shapes.sent} req {failed} bad {len(self.rebalances)} rebal"
                f"{''.join(f.status() for f in self.faults)} {self.memory.latest_mib():,.0f} MiB"))
            time.sleep(0.25)
        deadline = time.monotonic() + SETTLE_S
        while not all(f.settled for f in self.faults) and time.monotonic() < deadline:  # slow, but still counted
            self.watch_faults()  # the load goes on: a worker's place can only take calls under load
            time.sleep(0.1)
        self.sample(time.monotonic() - self.start_s)
        load_end_s = time.monotonic()
        wall_s = load_end_s - self.start_s  # the load stops right after (main)
        self.progress.update(task, completed=self.args.duration_s)
        retries_after = self.service.router_retries()
        return {"wall_s": wall_s, "load_end_s": load_end_s, "memory": self.memory, "rebalances": self.rebalances,
                "deferred": self.deferred, "faults": self.faults,
                "router_retries": None if None in (retries_before, retries_after) else retries_after - retries_before}

    def sample(self, now: float) -> None:
        pids = {"bench": os.getpid(), **self.service.pids(self.status.controller_pid()), **self.daemons}
        self.memory.sample(now, pids, self.shapes.sent)

    def watch_faults(self) -> None:
        for fault in self.faults:
            fault.watch(self.service, self.status)
            if fault.served_s is not None and len(fault.retries) == 1:  # served again since the last look
                fault.retries.append(self.service.router_retries())
                self.progress.console.log(f"{fault.kind}: serving again {fault.served_s - fault.injected_s:.1f}s "
                                          f"after the injection")

    def maybe_fire(self, now: float) -> None:
        """The next fault, once its time has come and nothing else is down or pending."""
        fault = next((f for f in self.faults if f.injected_s is None), None)
        if fault is None or now < fault.at_s or any(f.pending for f in self.faults) or self.status.down_workers():
            return
        retries = self.service.router_retries()
        if isinstance(fault, WorkerKill):
            fired = fault.fire(self.service)
        elif isinstance(fault, WorkerHang):
            fired = fault.fire(self.service, self.reference, self.rng)
        else:
            fired = fault.fire(self.service, self.status)
        if fired:
            fault.retries = [retries]
            self.progress.console.log(f"{fault.kind} at {now:.1f}s {fault.detail.get('worker', '')}")

    def maybe_rebalance(self, now: float) -> None:
        if any(f.pending for f in self.faults) or self.status.down_workers():
            self.deferred += 1  # not while a fault is pending: `force` skips the controller's check for it
            return
        self.rebalances.append(r := {"at_s": round(now, 1), **self.service.rebalance()})
        self.shapes.rotate()
        self.progress.console.log(f"rebalance at {now:.1f}s: {r['kind']}, {r['moves']} moves, "
                                  f"{r['bytes_moved'] / MIB:.1f} MiB")
        for fault in self.faults:  # the first rebalance after the controller came back: it is in charge
            if isinstance(fault, ControllerKill) and fault.served_s is not None \
                    and "first_rebalance_after_s" not in fault.detail:
                fault.detail["first_rebalance_after_s"] = round(time.monotonic() - fault.injected_s, 2)
                fault.detail["first_rebalance_applied"] = r["applied"]


def summarise(shapes: Shapes, tally: dict[str, int], driver: TimedLoadDriver, fp16: Fp16Prober, fp16_report: dict,
              run: dict, args, placement: Placement) -> dict:
    lat_ms = np.array(shapes.latencies_s() or [0.0]) * 1000
    tokens = np.array(shapes.tokens_sent or [0])
    memory: Memory = run["memory"]
    rebalances = run["rebalances"]
    replicas = [len(r) for r in placement.replicas]
    wall_s = run["wall_s"]
    start_s = run["load_end_s"] - wall_s
    failures = sorted(driver.failures + fp16.failures, key=lambda f: f.at_s)
    faults = [f.report(start_s, failures, shapes, run["load_end_s"]) for f in run["faults"]]
    return {
        "config": {"duration_s": args.duration_s, "quick": args.quick, "model": MODEL, "workers": WORKERS,
                   "layout": "moe-serve deploy: detached ServiceController, workers and router on an embedded Ray",
                   "min_replicas": 2, "spares": args.spares, "share_timeout_s": args.share_timeout_s,
                   "threads": args.threads, "tokens": f"log-uniform 1..{MAX_TOKENS}", "skewed_fraction": 0.75,
                   "rebalance_every_s": args.rebalance_every_s, "sample_every_s": args.sample_every_s,
                   "faults": {f.kind: round(f.at_s, 1) for f in run["faults"]}},
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__},
        "requests": {"sent": shapes.sent, "outcomes": tally, "outcomes_total": sum(tally.values()),
                     "sent_equals_outcomes": shapes.sent == sum(tally.values()),
                     "not_ok": sum(v for k, v in tally.items() if k != "OK"), "errors": driver.errors[:5],
                     "tokens": {"min": int(tokens.min()), "median": int(np.median(tokens)), "max": int(tokens.max()),
                                "total": int(tokens.sum())}},
        "fp16": fp16_report,
        "failures": [{"at_s": round(f.at_s - start_s, 2), "source": f.source, "outcome": f.outcome,
                      "detail": f.detail} for f in failures[:20]],
        "throughput": {"wall_s": round(wall_s, 1), "requests_per_s": round(shapes.sent / wall_s, 1),
                       "ok_tokens_per_s": round(shapes.ok_tokens / wall_s, 1),
                       "p50_ms": round(float(np.percentile(lat_ms, 50)), 1),
                       "p99_ms": round(float(np.percentile(lat_ms, 99)), 1), "max_ms": round(float(lat_ms.max()), 1)},
        "rebalances": {"count": len(rebalances), "applied": sum(r["applied"] for r in rebalances),
                       "moves": sum(r["moves"] for r in rebalances),
                       "bytes_moved": sum(r["bytes_moved"] for r in rebalances),
                       "deferred_while_a_fault_was_pending": run["deferred"], "events": rebalances},
        "served_again_after_s": {f["fault"]: f.get("served_again_after_s") for f in faults},
        "faults": faults,
        "router_retries": run["router_retries"],  # worker shares sent again to another replica, whole run
        "memory": {"note": ("RSS; 'bench' is this process (load driver, FP16 prober, reference); 'router', "
                            "'controller', 'worker-i' and 'spare-NN' are the actors' processes (a pid per "
                            "incarnation); 'ray raylet' holds the object store"),
                   "second_half_from_s": args.duration_s / 2, "processes": memory.report(args.duration_s / 2)},
        "placement": {"version_end": placement.version, "min_replicas_end": min(replicas),
                      "max_replicas_end": max(replicas)},
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=120.0, help="how long the load runs")
    parser.add_argument("--rebalance-every-s", type=float, default=10.0, help="forced rebalance interval")
    parser.add_argument("--sample-every-s", type=float, default=2.0, help="memory sample interval")
    parser.add_argument("--threads", type=int, default=3, help="load driver threads")
    parser.add_argument("--spares", type=int, default=1, help="warm spare workers (0: Ray restarts a lost one)")
    parser.add_argument("--share-timeout-s", type=float, default=2.0, help="router.share_timeout_s (hung shares)")
    parser.add_argument("--quick", action="store_true", help="a 30 s smoke run (~50-70 s with Ray's start)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration_s, args.rebalance_every_s, args.sample_every_s = 30.0, 5.0, 1.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # 2 cores: the workers need them more than the reference
    console = Console(stderr=True)
    console.log("starting Ray and the deployment ...")
    # logical CPUs: 3 workers, a spare, its replacement starting and the router reserve 0.5 each
    connect_ray(RayConfig(namespace=NAMESPACE), num_cpus=max(8, os.cpu_count() or 2), include_dashboard=False)
    register()
    config = soak_config(MODEL, WORKERS, window_s=0.8 * args.rebalance_every_s, spares=args.spares,
                         share_timeout_s=args.share_timeout_s)
    weights = RandomModel(config.model.random.spec(), MODEL["seed"])
    reference = ReferenceMoE(weights)
    spec = reference.spec
    shapes = Shapes(SkewedTraffic({layer: weights.gate_weight(layer) for layer in spec.moe_layers},
                                  s=1.2, seed=3, aim=spec.top_k), reference)
    service = status = None
    try:
        service = Service(config, faults.FaultyWorker)
        service.replicate(copies=2)
        status = StatusWatch(service).start()
        driver = TimedLoadDriver(service.address, config.model.name, spec, shapes.expected, threads=args.threads,
                                 tokens=(1, MAX_TOKENS + 1), seed=1, sample=shapes.sample)
        fp16 = Fp16Prober(service.address, config.model.name, shapes, reference, list(spec.moe_layers), pause_s=0.2)
        with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                      TextColumn("{task.fields[status]}"), console=console) as progress:
            driver.start()
            fp16.start()
            try:
                run = Schedule(service, status, shapes, driver, reference, args, progress).run()
            finally:
                tally = driver.stop()
                fp16_report = fp16.stop()
        report = summarise(shapes, tally, driver, fp16, fp16_report, run, args, service.placement())
    finally:
        if status is not None:
            status.stop()
        if service is not None:
            service.stop()
        ray.shutdown()
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
