"""A bounded soak: many requests of random shapes through the real gRPC path, forced rebalances
under a rotating hot set, and one worker kill; memory growth and error counts as JSON.

    .venv/bin/python -m bench.bench_soak                        # 120 s soak
    .venv/bin/python -m bench.bench_soak --quick --out soak.json  # ~35 s smoke run, Ray start included

One process: an embedded Ray, a small random model (2 MoE layers x 8 experts) on 3 workers
with every logical expert replicated twice (`rebalance.min_replicas: 2`, so a lost worker costs
a reroute), its router and control plane on a background event loop, and a `LoadDriver` whose
threads check every answer against the single-process reference. Requests: token counts
log-uniform over 1..2048, both layers, 3 in 4 aimed at a Zipf-hot set (`cluster.sim.traffic`), the
rest standard normal; a side thread sends FP16 requests and checks them to FP16 rounding.

During the soak: every `--rebalance-every-s` a forced rebalance plans for the hot set, which
then rotates (so replicas really move); at 40% of the run worker 1's process is killed, Ray
restarts it and the supervisor reloads it. Every `--sample-every-s` the RSS of this process
(router + control plane + load driver + reference) and of each worker process is read; the
report gives start/end/max per process and the growth over the second half of the run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time
from dataclasses import dataclass, field

import grpc
import numpy as np
import ray
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from bench.load_driver import LoadDriver
from bench.render import emit
from cluster.app.launcher import connect_ray, deploy
from cluster.app.reference import ReferenceMoE
from cluster.config import RayConfig, ServeConfig, validate_config
from cluster.placement import Placement
from cluster.sim.traffic import SkewedTraffic
from router_service.client import MoEClient
from workers.random_model import RandomModel

MODEL = {"layers": 2, "experts": 8, "hidden": 64, "ffn": 128, "top_k": 2, "seed": 17}
WORKERS = 3
KILLED_WORKER = 1
MAX_TOKENS = 2048
FP16_REL_TOL = 2e-3  # FP16 answers: unit roundoff 2**-11 ~ 4.9e-4 of the largest output, plus slack
MIB = 2**20


def soak_config(window_s: float) -> ServeConfig:
    return validate_config({
        "model": {"name": "soak", "random": MODEL},
        "workers": {"count": WORKERS, "num_cpus": 0.5, "torch_threads": 1, "slots_per_worker": 14},
        # no automatic rebalancing: the soak forces its own on a fixed schedule
        "rebalance": {"enabled": False, "min_replicas": 2, "window_s": window_s,
                      "check_interval_s": min(0.5, window_s)},
        "router": {"port": 0},
        "ray": {"namespace": "moe-serve-soak"},
    }, source="soak config")


class Shapes:
    """The load driver's `sample` and `expected`: random shapes, skewed or plain hidden states,
    and per-request bookkeeping (sample is called right before a request, expected right after
    a successful answer, on the same thread: the gap is the request's latency)."""

    def __init__(self, traffic: SkewedTraffic, reference: ReferenceMoE, skewed_fraction: float = 0.75):
        self._traffic = traffic
        self._reference = reference
        self._skewed_fraction = skewed_fraction
        self._lock = threading.Lock()  # SkewedTraffic keeps one rng: one caller at a time
        self._local = threading.local()
        self.sent = 0
        self.tokens_sent: list[int] = []
        self.latencies_s: list[float] = []
        self.ok_tokens = 0

    def tokens(self, rng: np.random.Generator) -> int:
        """Log-uniform over 1..MAX_TOKENS."""
        return int(min(MAX_TOKENS, np.floor(np.exp(rng.uniform(0.0, np.log(MAX_TOKENS + 1))))))

    def hidden(self, layer: int, rng: np.random.Generator) -> np.ndarray:
        n = self.tokens(rng)
        if rng.random() < self._skewed_fraction:
            with self._lock:
                return self._traffic.sample(layer, n)[0]
        return rng.standard_normal((n, self._traffic.hidden_size), dtype=np.float32)

    def sample(self, layer: int, _n: int, rng: np.random.Generator) -> np.ndarray:
        x = self.hidden(layer, rng)
        with self._lock:
            self.sent += 1
            self.tokens_sent.append(x.shape[0])
        self._local.sent_at = time.perf_counter()
        return x

    def expected(self, layer: int, x: np.ndarray) -> torch.Tensor:
        latency_s = time.perf_counter() - self._local.sent_at
        with self._lock:
            self.latencies_s.append(latency_s)
            self.ok_tokens += x.shape[0]
        return self._reference.forward(layer, torch.from_numpy(x.copy()))[0]

    def rotate(self, shift: int = 3) -> None:
        with self._lock:
            self._traffic.rotate(shift)


class Fp16Prober:
    """FP16 requests from one thread (the load driver checks to FP32 tolerance only), each
    answer checked against the reference on the same FP16 input to FP16_REL_TOL."""

    def __init__(self, address: str, model: str, shapes: Shapes, reference: ReferenceMoE,
                 layers: list[int], pause_s: float, seed: int = 99):
        self._args = (address, model, shapes, reference, layers, pause_s, seed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="fp16-prober")
        self.tally: dict[str, int] = {}
        self.sent = 0

    def start(self) -> Fp16Prober:
        self._thread.start()
        return self

    def _run(self) -> None:
        address, model, shapes, reference, layers, pause_s, seed = self._args
        rng = np.random.default_rng(seed)
        with MoEClient(address) as client:
            while not self._stop.wait(pause_s):
                layer = layers[int(rng.integers(len(layers)))]
                x = shapes.hidden(layer, rng).astype(np.float16)
                self.sent += 1
                try:
                    got = client.infer(model, x, layer=layer, timeout_s=30)
                except grpc.RpcError as err:
                    self._count(err.code().name)
                    continue
                want = reference.forward(layer, torch.from_numpy(x.astype(np.float32)))[0].double()
                rel = float((torch.from_numpy(got.hidden_states.astype(np.float64)) - want).abs().max() / want.abs().max())
                ok = got.hidden_states.dtype == np.float16 and rel < FP16_REL_TOL
                self._count("OK" if ok else f"wrong: {got.hidden_states.dtype} rel {rel:.2e}")

    def _count(self, outcome: str) -> None:
        self.tally[outcome] = self.tally.get(outcome, 0) + 1

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(60)
        return {"sent": self.sent, "outcomes": dict(self.tally), "sent_equals_outcomes": self.sent == sum(self.tally.values())}


@dataclass
class Memory:
    """RSS samples per process: `series[(name, pid)] = [(t_s, rss_bytes, requests_sent)]`."""

    series: dict[tuple[str, int], list[tuple[float, int, int]]] = field(default_factory=dict)

    def sample(self, t_s: float, pids: dict[str, int | None], requests: int) -> None:
        import psutil  # comes with Ray (ray/thirdparty_files, on sys.path once ray is imported)

        for name, pid in pids.items():
            if pid is None:
                continue
            try:
                rss = psutil.Process(pid).memory_info().rss
            except psutil.Error:  # the process just died (the kill)
                continue
            self.series.setdefault((name, pid), []).append((t_s, rss, requests))

    def latest_mib(self) -> float:
        """Sum of the newest sample of every process seen in the last round."""
        newest = max((s[-1][0] for s in self.series.values()), default=0.0)
        return sum(s[-1][1] for s in self.series.values() if s[-1][0] == newest) / MIB

    def report(self, second_half_from_s: float) -> list[dict]:
        """Per process: start/end/max RSS, and the growth over the second half of the run, or
        of the process's own life when it started later (the restarted worker warms up too)."""
        out = []
        for (name, pid), samples in self.series.items():
            rss = [r for _, r, _ in samples]
            entry = {
                "process": name, "pid": pid, "samples": len(samples),
                "from_s": round(samples[0][0], 1), "to_s": round(samples[-1][0], 1),
                "start_mib": round(rss[0] / MIB, 1), "end_mib": round(rss[-1] / MIB, 1),
                "max_mib": round(max(rss) / MIB, 1), "second_half": None,
            }
            from_s = max(second_half_from_s, (samples[0][0] + samples[-1][0]) / 2)
            late = [s for s in samples if s[0] >= from_s]
            if len(late) >= 2:
                growth = (late[-1][1] - late[0][1]) / MIB
                requests = late[-1][2] - late[0][2]
                t, mib = np.array([x[0] for x in late]), np.array([x[1] for x in late]) / MIB
                entry["second_half"] = {
                    "from_s": round(late[0][0], 1), "to_s": round(late[-1][0], 1),
                    "growth_mib": round(growth, 2), "requests": requests,
                    "slope_mib_per_min": round(60 * float(np.polyfit(t, mib, 1)[0]), 3),  # least squares
                    "mib_per_1000_requests": round(1000 * growth / requests, 3) if requests else None,
                }
            out.append(entry)
        return out


def ray_pids() -> dict[str, int]:
    """The embedded Ray's own daemons on this node (the raylet holds the object store), where
    this process started them; empty when it joined a cluster."""
    node = getattr(ray._private.worker, "_global_node", None)
    processes = getattr(node, "all_processes", None) or {}
    return {f"ray {kind}": infos[0].process.pid for kind, infos in processes.items()
            if kind in ("raylet", "gcs_server") and infos}


def worker_pids(handles: list, timeout_s: float = 1.0) -> list[int | None]:
    """Each worker's process id now, None where it does not answer (dead or restarting)."""
    refs = [h.ready.remote() for h in handles]
    done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    pids: list[int | None] = []
    for ref in refs:
        try:
            pids.append(ray.get(ref)["pid"] if ref in done else None)
        except ray.exceptions.RayError:
            pids.append(None)
    return pids


class Soak:
    """The deployment on its own event loop, and the actions the schedule takes on it."""

    def __init__(self, config: ServeConfig):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="soak-server-loop")
        self._thread.start()
        self.deployment = self.run(deploy(config))
        current = self.deployment.placement
        self.run(self.deployment.admin.apply(Placement.replicated(
            current.num_logical_experts, WORKERS, copies=2, version=current.version + 1)))

    def run(self, coro, timeout_s: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def rebalance(self) -> dict:
        event = self.run(self.deployment.admin.rebalance(force=True))
        report = event.report
        return {"kind": event.kind, "moves": event.moves, "applied": report is not None,
                "bytes_moved": report.bytes_moved if report else 0,
                "duration_s": round(report.duration_s, 3) if report else 0.0,
                "balancedness_before": round(event.balancedness_before, 3),
                "balancedness_planned": round(event.balancedness_planned, 3),
                "version": report.to_version if report else self.deployment.placement.version}

    def worker_events(self, worker: int, since_s: float) -> list:
        return [e for e in list(self.deployment.plane.supervisor.events) if worker in e.workers and e.at_s >= since_s]

    def stop(self) -> None:
        self.run(self.deployment.stop(grace_s=2.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@dataclass
class Kill:
    worker: int
    at_s: float  # offset in the soak
    killed_monotonic: float | None = None
    pid_before: int | None = None
    lost_after_s: float | None = None
    recovered_after_s: float | None = None
    events: list[dict] = field(default_factory=list)

    def watch(self, soak: Soak) -> None:
        """Pick up the supervisor's lost/reloaded events for the killed worker."""
        if self.killed_monotonic is None or self.recovered_after_s is not None:
            return
        events = soak.worker_events(self.worker, self.killed_monotonic)
        lost = [e for e in events if e.kind == "lost"]
        reloaded = [e for e in events if e.kind == "reloaded"]
        if lost and self.lost_after_s is None:
            self.lost_after_s = round(lost[0].at_s - self.killed_monotonic, 3)
        if reloaded:
            self.recovered_after_s = round(reloaded[0].at_s - self.killed_monotonic, 3)
            self.events = [{"kind": e.kind, "after_s": round(e.at_s - self.killed_monotonic, 3),
                            "took_s": round(e.duration_s, 3), "detail": e.detail} for e in events]

    @property
    def pending(self) -> bool:
        """Killed and not yet reloaded."""
        return self.killed_monotonic is not None and self.recovered_after_s is None

    def fire(self, handles: list) -> None:
        """Kill the worker's process; Ray restarts it empty, the supervisor reloads it."""
        self.pid_before = worker_pids([handles[self.worker]])[0]
        self.killed_monotonic = time.monotonic()
        ray.kill(handles[self.worker], no_restart=False)

    def status(self) -> str:
        if self.killed_monotonic is None:
            return ""
        return " kill:" + ("down" if self.pending else f"{self.recovered_after_s:.1f}s")


def drive(soak: Soak, shapes: Shapes, driver: LoadDriver, args, progress: Progress) -> dict:
    """The schedule: memory samples, forced rebalances (then the hot set rotates), one kill."""
    deployment = soak.deployment
    layer = deployment.router._layer  # the router's retry counter, as bench_serving reads its stage times
    retries_before = layer.retries
    memory, kill = Memory(), Kill(KILLED_WORKER, 0.4 * args.duration_s)
    rebalances: list[dict] = []
    deferred = 0
    names = ["router"] + [f"worker-{i}" for i in range(WORKERS)]
    daemons = ray_pids()

    def pids() -> dict[str, int | None]:
        return {**dict(zip(names, [os.getpid(), *worker_pids(deployment.pool.handles)])), **daemons}

    task = progress.add_task("soak", total=args.duration_s, status="")
    start = time.monotonic()
    next_sample, next_rebalance = 0.0, args.rebalance_every_s
    while (now := time.monotonic() - start) < args.duration_s:
        if now >= next_sample:
            memory.sample(now, pids(), shapes.sent)
            next_sample += args.sample_every_s
        if kill.killed_monotonic is None and now >= kill.at_s:
            kill.fire(deployment.pool.handles)
            progress.console.log(f"killed worker {kill.worker} (pid {kill.pid_before}) at {now:.1f}s")
        kill.watch(soak)
        if now >= next_rebalance:
            next_rebalance += args.rebalance_every_s
            if kill.pending or deployment.plane.hub.down:
                deferred += 1  # not while a worker is down: `force` skips the controller's check for that
            else:
                rebalances.append(r := {"at_s": round(now, 1), **soak.rebalance()})
                shapes.rotate()
                progress.console.log(f"rebalance at {now:.1f}s: {r['kind']}, {r['moves']} moves, "
                                     f"{r['bytes_moved'] / MIB:.1f} MiB")
        failed = sum(1 for o, _ in list(driver.outcomes) if o != "OK")
        progress.update(task, completed=now, status=(
            f"{shapes.sent} req {failed} bad {len(rebalances)} rebal{kill.status()} {memory.latest_mib():,.0f} MiB"))
        time.sleep(0.25)
    wall_s = time.monotonic() - start
    deadline = time.monotonic() + 30
    while kill.pending and time.monotonic() < deadline:  # a slow reload still counts, but later
        kill.watch(soak)
        time.sleep(0.1)
    memory.sample(time.monotonic() - start, pids(), shapes.sent)
    progress.update(task, completed=args.duration_s)
    return {"wall_s": wall_s, "memory": memory, "kill": kill, "rebalances": rebalances, "deferred": deferred,
            "router_retries": layer.retries - retries_before}


def summarise(shapes: Shapes, tally: dict[str, int], driver: LoadDriver, fp16: dict, run: dict, args, placement) -> dict:
    lat_ms = np.array(shapes.latencies_s) * 1000 if shapes.latencies_s else np.zeros(1)
    tokens = np.array(shapes.tokens_sent or [0])
    kill: Kill = run["kill"]
    memory: Memory = run["memory"]
    rebalances = run["rebalances"]
    processes = memory.report(second_half_from_s=args.duration_s / 2)
    replicas = [len(r) for r in placement.replicas]
    wall_s = run["wall_s"]
    return {
        "config": {"duration_s": args.duration_s, "quick": args.quick, "model": MODEL, "workers": WORKERS,
                   "min_replicas": 2, "threads": args.threads, "tokens": f"log-uniform 1..{MAX_TOKENS}",
                   "skewed_fraction": 0.75, "rebalance_every_s": args.rebalance_every_s,
                   "sample_every_s": args.sample_every_s, "kill_at_s": kill.at_s},
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__},
        "requests": {"sent": shapes.sent, "outcomes": tally, "outcomes_total": sum(tally.values()),
                     "sent_equals_outcomes": shapes.sent == sum(tally.values()),
                     "not_ok": sum(v for k, v in tally.items() if k != "OK"), "errors": driver.errors[:5],
                     "tokens": {"min": int(tokens.min()), "median": int(np.median(tokens)), "max": int(tokens.max()),
                                "total": int(tokens.sum())}},
        "fp16": fp16,
        "throughput": {"wall_s": round(wall_s, 1), "requests_per_s": round(shapes.sent / wall_s, 1),
                       "ok_tokens_per_s": round(shapes.ok_tokens / wall_s, 1),
                       "p50_ms": round(float(np.percentile(lat_ms, 50)), 1),
                       "p99_ms": round(float(np.percentile(lat_ms, 99)), 1), "max_ms": round(float(lat_ms.max()), 1)},
        "rebalances": {"count": len(rebalances), "applied": sum(r["applied"] for r in rebalances),
                       "moves": sum(r["moves"] for r in rebalances),
                       "bytes_moved": sum(r["bytes_moved"] for r in rebalances),
                       "deferred_while_worker_down": run["deferred"], "events": rebalances},
        "kill": {"worker": kill.worker, "at_s": kill.at_s, "pid_before": kill.pid_before,
                 "pid_after": next((p["pid"] for p in processes if p["process"] == f"worker-{kill.worker}"
                                    and p["pid"] != kill.pid_before), None),
                 "lost_after_s": kill.lost_after_s, "recovered_after_s": kill.recovered_after_s,
                 "router_retries": run["router_retries"],  # worker shares sent again to another replica
                 "events": kill.events},
        "memory": {"note": ("RSS; 'router' is this process (router, control plane, load driver, reference); "
                            "'ray raylet' holds the object store"),
                   "second_half_from_s": args.duration_s / 2, "processes": processes},
        "placement": {"version_end": placement.version, "min_replicas_end": min(replicas),
                      "max_replicas_end": max(replicas)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=120.0, help="how long the load runs")
    parser.add_argument("--rebalance-every-s", type=float, default=10.0, help="forced rebalance interval")
    parser.add_argument("--sample-every-s", type=float, default=2.0, help="memory sample interval")
    parser.add_argument("--threads", type=int, default=3, help="load driver threads")
    parser.add_argument("--quick", action="store_true", help="a short smoke run (~35 s with Ray's start)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration_s, args.rebalance_every_s, args.sample_every_s = 16.0, 4.0, 1.0

    torch.set_num_threads(1)  # 2 cores: the workers need them more than the reference
    console = Console(stderr=True)
    console.log("starting Ray and the deployment ...")
    connect_ray(RayConfig(namespace="moe-serve-soak"), num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False)
    config = soak_config(window_s=0.8 * args.rebalance_every_s)
    weights = RandomModel(config.model.random.spec(), MODEL["seed"])
    reference = ReferenceMoE(weights)
    spec = reference.spec
    shapes = Shapes(SkewedTraffic({layer: weights.gate_weight(layer) for layer in spec.moe_layers},
                                  s=1.2, seed=3, aim=spec.top_k), reference)
    soak = None
    try:
        soak = Soak(config)
        address = soak.deployment.address
        driver = LoadDriver(address, config.model.name, spec, shapes.expected, threads=args.threads,
                            tokens=(1, MAX_TOKENS + 1), seed=1, sample=shapes.sample)
        fp16 = Fp16Prober(address, config.model.name, shapes, reference, list(spec.moe_layers), pause_s=0.2)
        with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                      TextColumn("{task.fields[status]}"), console=console) as progress:
            driver.start()
            fp16.start()
            try:
                run = drive(soak, shapes, driver, args, progress)
            finally:
                tally = driver.stop()
                fp16_report = fp16.stop()
        report = summarise(shapes, tally, driver, fp16_report, run, args, soak.deployment.placement)
    finally:
        if soak is not None:
            soak.stop()
        ray.shutdown()
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
