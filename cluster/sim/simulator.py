"""Trace-replay simulator: a load trace through the real planner, rebalance controller decision
and autoscaler decision, on 64 to 1024 simulated workers, with a simple cost model. Pure: no
Ray, no gRPC, no clock, no random numbers (the trace carries any randomness, seeded).

Each step `k` of the trace (`[k * step_s, (k + 1) * step_s)`, load `[layers, experts]`):
1. **Join**: workers asked for at least `startup_s` earlier join at the step's start (rounded
   up to a step) and the planner places replicas on them (`plan_placement` with their slots).
2. **Rebalance**: the live controller's own pure decision, `cluster.planning.rebalance.decide`,
   on the step's load (it plans, and skips a plan that gains less than `min_gain`).
3. **Autoscale**: the real `cluster.planning.autoscaler.decide`, called every `check_interval_s` of the
   step (skipping calls whose answer cannot change: the step's inputs are constant), on a
   `ScaleSnapshot` of the step's load and the queue delay the cost model gives now (closed
   loop). Out: new workers are pending, billed from the ask. In: from the highest index; their
   replicas first move away (make-before-break: the planner gets 0 slots for them, so every
   logical expert keeps a replica), the rows go at the step's end, billed until then.
4. **Cost**: the placement at the step's end under the step's load.

Cost model (`CostModel`), documented approximations:
- A worker serves `capacity_tokens_per_s` expert-tokens per second (all layers together); its
  utilisation is its load (each expert's load split evenly over its replicas, as the planner
  assumes; the router's water-filling does better) over its capacity. Each replica loaded onto
  it in the step costs `move_s` of its time: capacity x (1 - moves x move_s / step_s).
- Latency of a batch: `base_ms` spread evenly over the layers, each layer waiting for its
  busiest worker: `base_ms / L x sum_l 1 / (1 - rho_l)`, rho_l the highest utilisation of a
  worker carrying layer l; unbounded at rho >= 1. A step meets the SLO when it is <= `slo_ms`.
  The autoscaler's `queue_delay_ms` is the latency less `base_ms`.
- A new worker serves `startup_s` after it is asked for (node boot and loading its first
  replicas: those loads count as moves and bytes but cost it no capacity); `move_bytes` per
  replica loaded.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.config import ServeConfig
from cluster.placement import Placement, slots_per_worker
from cluster.planning import autoscaler, rebalance
from cluster.planning.planner import layer_balancedness, plan_placement, worker_layer_load
from cluster.sim.traces import LoadTrace

Progress = Callable[[int, int], None]
MAX_CHECKS_PER_STEP = 100_000  # guards the autoscaler loop against a runaway


class CostModel(BaseModel):
    """What a simulated worker can do and what changes cost. Units in the names."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    capacity_tokens_per_s: Annotated[float, Field(gt=0, description="expert-tokens per second one worker serves, all layers together")] = 30000.0
    base_ms: Annotated[float, Field(gt=0, description="latency of a batch through all layers on idle workers")] = 25.0
    slo_ms: Annotated[float, Field(gt=0, description="a step meets the SLO when its batch latency is at most this")] = 100.0
    move_s: Annotated[float, Field(ge=0, description="seconds of the target worker's time per replica loaded")] = 1.0
    move_bytes: Annotated[int, Field(ge=0, description="bytes per replica loaded (one expert's weights)")] = 17_301_504
    startup_s: Annotated[float, Field(ge=0, description="from asking for a worker until it can take replicas (billed)")] = 300.0

    @model_validator(mode="after")
    def _slo_reachable(self) -> CostModel:
        if self.slo_ms <= self.base_ms:
            raise ValueError(f"slo_ms ({self.slo_ms}) must exceed base_ms ({self.base_ms}): the SLO could never be met")
        return self


@dataclass(frozen=True)
class SimEvent:
    """kind: out | in | join | rebalance | skip (a plan that gained too little); moves: loads."""

    at_s: float
    kind: str
    detail: str
    moves: int = 0


@dataclass(frozen=True, eq=False)
class SimRun:
    """Per-step records, each `[steps]` (fewer when the run gave up), and what happened.

    billed: workers billed in the step (serving, leaving and pending, pro rata from the ask);
    balancedness: min over layers of the placement at the step's end; utilisation: the busiest
    worker's; latency_ms: inf when a worker is overloaded. placements: per step, the placement
    in service at its end before leaving workers' (empty) rows go; kept when asked for.
    """

    step_s: float
    times_s: np.ndarray
    load_tokens_per_s: np.ndarray
    serving: np.ndarray
    pending: np.ndarray
    billed: np.ndarray
    balancedness: np.ndarray
    utilisation: np.ndarray
    latency_ms: np.ndarray
    slo_met: np.ndarray
    moves: np.ndarray
    events: tuple[SimEvent, ...]
    slo_attainment: float
    move_bytes: int
    gave_up: bool = False
    placements: tuple[Placement, ...] = ()

    @property
    def gpu_hours(self) -> float:
        return float(self.billed.sum() * self.step_s / 3600)

    def summary(self) -> dict:
        kinds = [e.kind for e in self.events]
        return {
            "steps": int(len(self.times_s)), "hours": len(self.times_s) * self.step_s / 3600,
            "gpu_hours": round(self.gpu_hours, 3), "slo_attainment": round(self.slo_attainment, 5),
            "moves": int(self.moves.sum()), "moved_bytes": int(self.moves.sum()) * self.move_bytes,
            "balancedness_mean": round(float(self.balancedness.mean()), 4),
            "balancedness_min": round(float(self.balancedness.min()), 4),
            "workers_min": int(self.serving.min()), "workers_max": int(self.serving.max()),
            "workers_mean": round(float(self.billed.mean()), 2),
            "scale_outs": kinds.count("out"), "scale_ins": kinds.count("in"),
            "rebalances": kinds.count("rebalance"), "gave_up": self.gave_up,
        }


def simulate(trace: LoadTrace, config: ServeConfig, cost: CostModel = CostModel(), *, workers: int | None = None,
             keep_placements: bool = False, give_up_below: float | None = None,
             progress: Progress | None = None) -> SimRun:
    """Replay `trace` through the planner, the rebalance decision and (unless `workers` fixes
    the count, or `config.autoscaling.enabled` is false) the autoscaler, from
    `config.workers.count` workers. `give_up_below`: stop once the SLO attainment can no longer
    reach this (a search probe); the run is then marked `gave_up`."""
    run = _Run(trace, config, cost, workers, keep_placements, give_up_below)
    for k in range(trace.steps):
        if not run.step(k):
            break
        if progress is not None:
            progress(k + 1, trace.steps)
    return run.result()


def slots_for(config: ServeConfig, num_logical_experts: int) -> int:
    """`workers.slots_per_worker`, or the service's default (see `slots_per_worker`); whether
    the configured slots hold the model is checked per run, on the workers it starts with."""
    if config.workers.slots_per_worker is not None:
        return config.workers.slots_per_worker
    return slots_per_worker(num_logical_experts, config.workers.bounds[0], None, config.rebalance.min_replicas)


def fewest_workers(config: ServeConfig, num_logical_experts: int) -> int:
    """The fewest workers whose slots hold `min_replicas` of every logical expert."""
    need = num_logical_experts * config.rebalance.min_replicas
    return max(config.rebalance.min_replicas, -(-need // slots_for(config, num_logical_experts)))


class _Run:
    """One replay's mutable state; `simulate` drives it step by step and returns `result()`."""

    def __init__(self, trace: LoadTrace, config: ServeConfig, cost: CostModel, fixed_workers: int | None,
                 keep_placements: bool, give_up_below: float | None):
        self.trace, self.config, self.cost, self.keep_placements = trace, config, cost, keep_placements
        self.num_logical = trace.layers * trace.experts
        self.slots = slots_for(config, self.num_logical)
        self.autoscale = fixed_workers is None and config.autoscaling.enabled
        start = config.workers.count if fixed_workers is None else fixed_workers
        _check_fits(start, "workers", config, trace)
        if self.autoscale:
            _check_fits(config.workers.bounds[0], "workers.min_workers", config, trace)
        self.placement = self._plan(trace.tokens_per_s[0], [self.slots] * start, None)
        self.rstate, self.astate = rebalance.RebalanceState(), autoscaler.AutoscaleState()
        self.rows: dict[str, list] = {k: [] for k in _COLUMNS}
        self.events: list[SimEvent] = []
        self.kept: list[Placement] = []
        self.pending: list[tuple[float, float]] = []  # (ask_s, ready_s) per worker asked for
        self.leaving, self.missed = 0, 0.0
        self.total_weight = float(trace.total_tokens_per_s.sum())
        self.allowed_miss = None if give_up_below is None else (1 - give_up_below) * self.total_weight + 1e-9

    # ---- one step ---------------------------------------------------------------------------

    def step(self, k: int) -> bool:
        t = k * self.trace.step_s
        load = self.trace.tokens_per_s[k]
        self.moves_w = np.zeros(self.placement.num_workers, dtype=np.int64)
        self.booting = np.zeros(self.placement.num_workers, dtype=bool)  # joined this step
        self._seen = (-1, 0.0, 1.0)  # (placement version, queue delay ms, balancedness) this step
        joined = self._join(t, load)
        if self.config.rebalance.enabled and not joined:
            self._rebalance(t, load)
        if self.autoscale:
            self._autoscale(t, load)
        return self._close_step(t, load)

    def _join(self, t: float, load: np.ndarray) -> bool:
        ready = [p for p in self.pending if p[1] <= t]
        if not ready:
            return False
        self.pending = [p for p in self.pending if p[1] > t]
        old = self.placement
        grown = old.resized(old.num_workers + len(ready), self.slots, old.version + 1)
        self.moves_w = np.append(self.moves_w, np.zeros(len(ready), dtype=np.int64))
        self.booting = np.arange(grown.num_workers) >= old.num_workers
        moves = self._apply(self._plan(load, [self.slots] * grown.num_workers, grown), grown)
        self.events.append(SimEvent(t, "join", f"{len(ready)} workers joined: {old.num_workers} -> {grown.num_workers}", moves))
        return True

    def _rebalance(self, t: float, load: np.ndarray) -> None:
        """The controller's decision (`rebalance.decide`) on the step's load; `act` applies."""
        cfg = self.config.rebalance
        capacity = [self.slots] * self.placement.num_workers
        decision, self.rstate = rebalance.decide(load, float(load.sum()) * cfg.window_s, self.placement, capacity,
                                                 self.rstate, t, cfg, self._nodes(len(capacity)))
        if decision.action == "skip":
            self.events.append(SimEvent(t, "skip", decision.reason))
        elif decision.action == "act":
            moves = self._apply(decision.target, self.placement)
            self.events.append(SimEvent(t, "rebalance", f"{decision.reason} -> {decision.balancedness_planned:.3f}",
                                        moves))

    def _autoscale(self, t: float, load: np.ndarray) -> None:
        """The real autoscaler `decide` every `check_interval_s`; a call whose inputs are those
        of the last one and whose state has no wish to wait out would answer the same: stop."""
        cfg, bounds = self.config.autoscaling, self.config.workers.bounds
        now, end, migrating_until = t, t + self.trace.step_s, -math.inf
        for _ in range(MAX_CHECKS_PER_STEP):
            if now >= end:
                return
            snapshot = self._snapshot(load, migrating=now < migrating_until)
            decision, self.astate = autoscaler.decide(snapshot, self.astate, now, cfg, bounds)
            if decision.action == "out":
                self._scale_out(now, decision)
            elif decision.action == "in":
                migrating_until = now + self._scale_in(now, decision, load)
            elif snapshot.migrating:
                now = _next_check(t, now, migrating_until, cfg.check_interval_s)
                continue
            elif self.astate.wish is None:
                return
            else:
                delay = cfg.upscale_delay_s if self.astate.wish == "out" else cfg.downscale_delay_s
                now = _next_check(t, now, self.astate.since_s + delay, cfg.check_interval_s)
                continue
            now += cfg.check_interval_s
        raise RuntimeError(f"autoscaler loop did not settle within {MAX_CHECKS_PER_STEP} checks at t={t}s")

    def _snapshot(self, load: np.ndarray, migrating: bool) -> autoscaler.ScaleSnapshot:
        if self._seen[0] != self.placement.version:  # the placement (and so the cost) changed
            _, latency_ms = self._cost(load)
            self._seen = (self.placement.version, latency_ms - self.cost.base_ms,
                          float(layer_balancedness(self.placement, load).min()))
        serving = self.placement.num_workers - self.leaving
        return autoscaler.ScaleSnapshot(
            tokens_per_s=float(load.sum()), serving_workers=serving, pending_workers=len(self.pending),
            queue_delay_ms=self._seen[1], balancedness=self._seen[2], migrating=migrating)

    def _scale_out(self, now: float, decision: autoscaler.ScaleDecision) -> None:
        counted = self.placement.num_workers - self.leaving + len(self.pending)
        added = decision.target_workers - counted
        self.pending += [(now, now + self.cost.startup_s)] * added
        self.events.append(SimEvent(now, "out", f"{counted} -> {decision.target_workers}: {decision.reason}"))

    def _scale_in(self, now: float, decision: autoscaler.ScaleDecision, load: np.ndarray) -> float:
        """Empty the highest-index workers (make-before-break); returns the migration's seconds."""
        counted = self.placement.num_workers - self.leaving
        self.leaving += counted - decision.target_workers
        keep = self.placement.num_workers - self.leaving
        target = self._plan(load, [self.slots] * keep + [0] * self.leaving, self.placement)
        before = self.moves_w.copy()
        moves = self._apply(target, self.placement)
        self.events.append(SimEvent(now, "in", f"{counted} -> {decision.target_workers}: {decision.reason}", moves))
        return float((self.moves_w - before).max(initial=0) * self.cost.move_s)

    # ---- placements and cost --------------------------------------------------------------

    def _nodes(self, workers: int) -> list[str]:
        """One node per simulated worker (what the `node_aware` policy spreads over)."""
        return [str(w) for w in range(workers)]

    def _plan(self, load: np.ndarray, capacity: list[int], current: Placement | None) -> Placement:
        cfg = self.config.rebalance
        if current is None:
            return plan_placement(load, capacity, None, min_replicas=cfg.min_replicas, policy=cfg.policy,
                                  worker_nodes=self._nodes(len(capacity)))
        return rebalance.plan_for(load, capacity, current, cfg, self._nodes(len(capacity)))

    def _apply(self, target: Placement, old: Placement) -> int:
        """Put `target` in service; its replicas that `old` lacks are loads on their workers."""
        added = target.replica_set - old.replica_set
        if added:
            np.add.at(self.moves_w, [w for w, _ in added], 1)
        self.placement = target
        return len(added)

    def _cost(self, load: np.ndarray) -> tuple[float, float]:
        """(busiest worker's utilisation, batch latency ms) of the placement in service."""
        worker_layer = worker_layer_load(self.placement, load)  # [W, L]
        paid = np.where(self.booting, 0, self.moves_w)  # a joining worker's loads are in startup_s
        left = np.clip(1 - paid * self.cost.move_s / self.trace.step_s, 0.0, 1.0)
        capacity = self.cost.capacity_tokens_per_s * left
        total = worker_layer.sum(axis=1)
        util = np.where(total > 0, total / np.where(capacity > 0, capacity, np.nan), 0.0)
        util = np.nan_to_num(util, nan=math.inf)
        rho_layer = np.where(worker_layer > 0, util[:, None], 0.0).max(axis=0)  # [L]
        if (rho_layer >= 1).any():
            return float(util.max()), math.inf
        return float(util.max()), float(self.cost.base_ms / len(rho_layer) * (1 / (1 - rho_layer)).sum())

    def _close_step(self, t: float, load: np.ndarray) -> bool:
        step_s = self.trace.step_s
        rows = self.placement.num_workers
        billed = rows + sum((t + step_s - max(ask, t)) / step_s for ask, _ in self.pending)
        utilisation, latency_ms = self._cost(load)
        if self.keep_placements:
            self.kept.append(self.placement)
        if self.leaving:
            self.placement = self.placement.resized(rows - self.leaving, 0, self.placement.version + 1)
            self.leaving = 0
        weight = float(load.sum())
        met = latency_ms <= self.cost.slo_ms
        self.missed += 0.0 if met else weight
        values = (t, weight, self.placement.num_workers, len(self.pending), billed,
                  float(layer_balancedness(self.placement, load).min()), utilisation, latency_ms, met,
                  int(self.moves_w.sum()))
        for name, value in zip(_COLUMNS, values):
            self.rows[name].append(value)
        return self.allowed_miss is None or self.missed <= self.allowed_miss

    def result(self) -> SimRun:
        columns = {name: np.array(values) for name, values in self.rows.items()}
        attainment = max(0.0, 1.0 - self.missed / self.total_weight) if self.total_weight > 0 else 1.0
        return SimRun(
            step_s=float(self.trace.step_s), **columns, events=tuple(self.events), slo_attainment=attainment,
            move_bytes=self.cost.move_bytes, gave_up=len(self.rows["times_s"]) < self.trace.steps,
            placements=tuple(self.kept))


_COLUMNS = ("times_s", "load_tokens_per_s", "serving", "pending", "billed", "balancedness", "utilisation",
            "latency_ms", "slo_met", "moves")


def _check_fits(workers: int, what: str, config: ServeConfig, trace: LoadTrace) -> None:
    need = fewest_workers(config, trace.layers * trace.experts)
    if workers < need:
        raise ValueError(
            f"{what} ({workers}) x {slots_for(config, trace.layers * trace.experts)} slots (workers.slots_per_worker) "
            f"cannot hold {trace.layers} layers x {trace.experts} experts x rebalance.min_replicas="
            f"{config.rebalance.min_replicas}; need at least {need} workers")


def _next_check(t: float, now: float, wake_s: float, interval_s: float) -> float:
    """The first check time on the grid `t + i * interval_s` after `now` and at or after `wake_s`."""
    at_or_after = math.ceil((wake_s - t) / interval_s - 1e-9)
    return t + max(math.floor((now - t) / interval_s + 1e-9) + 1, at_or_after) * interval_s
