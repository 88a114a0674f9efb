"""The control plane of one served model: its workers, the placement in service, the load, and
the loops that change them (rebalancing hot experts, scaling the workers).

It owns everything long-lived: the `ExpertPool` (the workers are its Ray children), the
`PlacementHub` that fans placements out to the routers, the `LoadBoard` fed by the routers'
reports, the rebalance `Controller`, the scaling `Reconciler` and `Autoscaler`, and the
`ModelAdmin` operations. Routers attach to it through `RouterLink`s: in the same process for
`moe-serve serve`, from a router actor for `moe-serve deploy` (see `cluster.app.service`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from cluster.config import ServeConfig
from cluster.control.admin import ModelAdmin
from cluster.control.controller import Controller
from cluster.control.metrics import ControlMetrics
from cluster.control.observer import Observer
from cluster.control.placement_hub import PlacementHub, RouterLink
from cluster.control.rebalancer import Rebalancer, copy_sources
from cluster.control.scaler import Autoscaler, Reconciler, observe_fleet
from cluster.control.supervisor import WorkerSupervisor
from cluster.placement import Placement, slots_per_worker
from cluster.planning.load_stats import LoadBoard
from cluster.planning.planner import layer_balancedness
from workers.pool import ExpertPool
from workers.weights import WeightSource, open_weights
from workers.worker import ExpertWorker

log = logging.getLogger(__name__)

# progress(done, total) while expert weights load into the workers
LoadProgress = Callable[[int, int], None]


def weights_for(config: ServeConfig) -> WeightSource:
    random = config.model.random_or_default
    return open_weights(
        checkpoint=config.model.checkpoint,
        random_spec=random.spec() if random else None,
        seed=random.seed if random else 0,
    )


class LoadFeed:
    """The routers' reports, collected on demand into the board the decisions read."""

    def __init__(self, hub: PlacementHub, board: LoadBoard, clock: Callable[[], float] = time.monotonic):
        self._hub = hub
        self.board = board
        self._clock = clock

    async def refresh(self) -> None:
        for report in await self._hub.take_reports():
            self.board.report(report, self._clock())

    def snapshot(self, now_s: float):
        return self.board.snapshot(now_s)

    def tokens_per_s(self) -> float:
        """Expert-tokens per second the workers carry: routed, plus the shared experts'."""
        snapshot = self.board.snapshot(self._clock())
        return float(snapshot.placement_load.sum() / snapshot.window_s)

    def queue_delay_ms(self) -> float:
        return self.board.queue_delay_ms(self._clock())

    def generation(self) -> dict | None:
        """The routers' text generation (JSON-ready), or None when none generates."""
        now = self._clock()
        routers = self.board.generation(now)
        if not routers:
            return None
        ttft_ms, tpot_ms = self.board.generation_latency_ms(now)
        return {
            "routers": {name: {"running": g.running, "waiting": g.waiting, "kv_used_fraction": g.kv_used_fraction,
                               "max_num_seqs": g.max_num_seqs} for name, g in sorted(routers.items())},
            "output_tokens_per_s": self.board.output_tokens_per_s(now), "ttft_p90_ms": ttft_ms, "tpot_p90_ms": tpot_ms,
        }

    def outstanding(self):
        return self.board.outstanding_tokens(self._hub.current.num_workers)

    async def lost_workers(self) -> tuple[set[tuple[int, str | None]], set[tuple[int, str | None]]]:
        """`(worker, incarnation)` the routers saw lost, and saw hang, since the previous call
        (collects their reports)."""
        await self.refresh()
        return self.board.take_lost_workers()


@dataclass
class ControlPlane:
    config: ServeConfig
    weights: WeightSource
    pool: ExpertPool
    hub: PlacementHub
    feed: LoadFeed
    rebalancer: Rebalancer
    controller: Controller
    reconciler: Reconciler
    autoscaler: Autoscaler
    admin: ModelAdmin
    observer: Observer
    supervisor: WorkerSupervisor
    slots_per_worker: int

    @property
    def placement(self) -> Placement:
        return self.hub.current

    async def attach(self, link: RouterLink) -> None:
        await self.hub.attach(link)

    def start_loops(self) -> None:
        self.supervisor.start()
        self.controller.start()
        self.autoscaler.start()
        self.observer.start()

    async def stop_loops(self) -> None:
        """Stop deciding (idempotent); the workers keep serving."""
        await self.supervisor.stop()
        await self.observer.stop()
        await self.autoscaler.stop()
        await self.controller.stop()

    async def stop(self) -> None:
        """Stop deciding, release the workers and the standing resource request."""
        await self.stop_loops()
        self.pool.shutdown()
        self.pool.request_capacity(0)

    async def status(self, history: bool = False) -> dict:
        """Everything `moe-serve status` shows, as plain data (JSON-ready); with `history`,
        also the per-expert load over time (for `--png`)."""
        report = await self.admin.load_report()
        rates = {w["index"]: w for w in self.observer.workers}
        workers = [{**w, **{k: rates.get(w["index"], {}).get(k, 0.0) for k in ("tokens_per_s", "busy_fraction")}}
                   for w in report.workers]
        now = time.monotonic()
        last = self.autoscaler.last
        return {
            "model": self.config.model.name,
            "placement_version": self.placement.version,
            "placement": self.placement.to_dict(),
            "layers": list(self.weights.spec.moe_layers),
            "num_experts": self.weights.spec.num_experts,
            "num_shared_experts": self.weights.spec.num_shared_experts,
            "slots_per_worker": self.slots_per_worker,
            "workers": workers,
            "pending_workers": self.pool.pending,
            "bounds": list(self.autoscaler.bounds),
            "worker_bundle": self.pool.worker_bundle(),
            "routers": self.hub.routers,
            "window_s": report.snapshot.window_s,
            "tokens_per_s": float(report.snapshot.tokens_per_s.sum()),
            "expert_tokens_per_s": report.snapshot.tokens_per_s.tolist(),
            "queue_delay_ms": self.feed.queue_delay_ms(),
            "generation": self.feed.generation(),
            "balancedness": report.balancedness.tolist(),
            "autoscaler": {
                "mode": self.autoscaler.mode,
                "decision": None if last is None else {**asdict(last[1]), "inputs": asdict(last[0])},
                "recent_decisions": [{"age_s": now - at, **asdict(d)} for at, d in self.autoscaler.decisions],
            },
            "scale_events": [_event_dict(e, now) for e in self.reconciler.events],
            "down_workers": sorted(self.hub.down),
            "worker_events": [{"age_s": now - e.at_s, **{k: v for k, v in asdict(e).items() if k != "at_s"}}
                              for e in self.supervisor.events],
            "rebalance_events": [_rebalance_dict(e, now, self.placement.version) for e in report.events],
            **({"history": self.observer.history_dict()} if history else {}),
        }


def _event_dict(event, now_s: float) -> dict:
    data = {k: v for k, v in asdict(event).items() if k not in ("at_s", "migration")}
    data["age_s"] = now_s - event.at_s
    data["moves"] = event.migration.loads if event.migration else 0
    return data


def _rebalance_dict(event, now_s: float, version: int) -> dict:
    report = event.report
    return {
        "age_s": now_s - event.at_s, "reason": event.reason, "applied": report is not None,
        "from_version": report.from_version if report else version,
        "to_version": report.to_version if report else version,
        "balancedness_before": event.balancedness_before, "balancedness_after": event.balancedness_planned,
        "moves": event.moves, "bytes_moved": report.bytes_moved if report else 0,
        "duration_s": report.duration_s if report else 0.0,
    }


def _live_balancedness(hub: PlacementHub, feed: LoadFeed) -> float:
    return float(layer_balancedness(hub.current, feed.snapshot(time.monotonic()).placement_load).min())


async def start_control_plane(config: ServeConfig, progress: LoadProgress | None = None,
                              worker_cls: type[ExpertWorker] = ExpertWorker, detached: bool = False) -> ControlPlane:
    """Start the workers, load the first placement into them, and build the decision loops
    (not started: `start_loops()` once a router is attached). Needs Ray connected.
    `worker_cls`: a subclass of `ExpertWorker` only to inject faults in tests; `detached`: the
    workers outlive this process (`adopt_control_plane` takes them over)."""
    weights = weights_for(config)
    spec = weights.spec
    slots = _slots(config, spec)
    placement = Placement.round_robin(spec.num_logical_experts, config.workers.count, slots,
                                      config.rebalance.min_replicas)
    pool = ExpertPool(config.model.name, weights, config.workers, config.ray.namespace, worker_cls, detached)
    try:
        pool.request_capacity(config.workers.count)
        await asyncio.to_thread(pool.start, config.workers.count)
        loaded = await asyncio.to_thread(pool.load, placement, progress)
        log.info("loaded %.1f MiB of expert weights into %d workers", loaded / 2**20, config.workers.count)
        pool.start_spares()
        return await _assemble(config, weights, pool, placement, slots)
    except BaseException:
        pool.shutdown()
        raise


async def adopt_control_plane(config: ServeConfig, placement: Placement,
                              worker_cls: type[ExpertWorker] = ExpertWorker) -> ControlPlane:
    """The control plane of a deployment whose workers (detached) still run, for a controller
    that came back: `placement` is the one its routers serve; each worker's replicas are checked
    against it (missing ones loaded, from live replicas where there are; extra ones, a migration
    cut short, released), and workers beyond it (a scale-out cut short) are stopped.
    `worker_cls`: the class the deployment started with (new spares and workers are of it)."""
    weights = weights_for(config)
    pool = ExpertPool(config.model.name, weights, config.workers, config.ray.namespace, worker_cls, detached=True)
    infos = await pool.adopt(placement.num_workers)
    for worker, info in enumerate(infos):
        want, have = {e for _, e in placement.experts_of(worker)}, set(info["hosted"])
        if want - have:
            missing = sorted(want - have)
            await pool.load_replicas(worker, missing, copy_sources(placement, worker, missing, frozenset()))
        if have - want:
            await pool.release_replicas(worker, sorted(have - want))
    pool.request_capacity(placement.num_workers)
    pool.start_spares()
    return await _assemble(config, weights, pool, placement, _slots(config, weights.spec))


def _slots(config: ServeConfig, spec) -> int:
    return slots_per_worker(spec.num_logical_experts, config.workers.bounds[0], config.workers.slots_per_worker,
                            config.rebalance.min_replicas)


async def _assemble(config: ServeConfig, weights: WeightSource, pool: ExpertPool, placement: Placement,
                    slots: int) -> ControlPlane:
    """The decision loops over `pool` serving `placement` (not started)."""
    spec = weights.spec
    workers = placement.num_workers
    hub = PlacementHub(placement)
    await hub.set_workers(pool.refs)
    feed = LoadFeed(hub, LoadBoard(spec.num_moe_layers, spec.num_experts, config.rebalance.window_s,
                                   started_s=time.monotonic(),
                                   placed=spec.placed_load if spec.num_shared_experts else None))
    rebalance = config.rebalance
    rebalancer = Rebalancer(hub, pool, rebalance.max_loads_per_step, rebalance.copy_from_live)
    controller = Controller(hub, feed.snapshot, rebalancer, [slots] * workers, rebalance,
                            worker_nodes=pool.worker_nodes(), refresh=feed.refresh)
    reconciler = Reconciler(pool, hub, controller, rebalancer, slots, config.autoscaling.start_timeout_s)
    observe = observe_fleet(pool, feed, lambda: _live_balancedness(hub, feed),
                            lambda: rebalancer.busy or reconciler.busy)
    autoscaler = Autoscaler(reconciler, pool, observe, config.autoscaling, config.workers.bounds)
    admin = ModelAdmin(config.model.name, spec, hub, controller, feed.snapshot, pool.stats_async,
                       feed.outstanding, refresh=feed.refresh)
    supervisor = WorkerSupervisor(pool, hub, rebalancer, lambda: controller.capacity,
                                  lambda: feed.snapshot(time.monotonic()).placement_load.reshape(-1),
                                  feed.lost_workers, config.workers.health_check_interval_s,
                                  config.workers.health_check_timeout_s, config.workers.health_check_misses,
                                  hung_after_s=config.router.share_timeout_s)
    observer = Observer(hub, feed, pool.stats_async, lambda: pool.pending,
                        _control_metrics(config, spec, controller, reconciler, supervisor),
                        config.monitoring.interval_s, config.monitoring.history_s, config.rebalance.window_s)
    plane = ControlPlane(config, weights, pool, hub, feed, rebalancer, controller, reconciler, autoscaler,
                         admin, observer, supervisor, slots)
    admin.status_source = plane.status  # the admin API's GetStatus (a root may add to it)
    return plane


def _control_metrics(config: ServeConfig, spec, controller: Controller, reconciler: Reconciler,
                     supervisor: WorkerSupervisor) -> ControlMetrics | None:
    """The model's control-plane metrics, told of every rebalance, scaling and worker event."""
    if not config.monitoring.enabled:
        return None
    metrics = ControlMetrics(config.model.name, spec.moe_layers, spec.num_experts,
                             config.monitoring.expert_series, config.monitoring.hot_experts)
    controller.listeners.append(lambda e: metrics.rebalance(
        e.kind, e.report.duration_s if e.report else 0.0, e.report.bytes_moved if e.report else 0))
    reconciler.listeners.append(lambda e: metrics.scale(e.action, e.trigger, e.duration_s))
    supervisor.listeners.append(lambda e: metrics.worker_event(e.kind, len(e.workers)))
    return metrics
