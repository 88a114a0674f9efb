"""The rebalance decision: whether to move to a new placement now, and which one. Pure.

`decide(load, window_tokens, placement, capacity, state, now_s, config, ...)` returns a
`RebalanceDecision` and the next `RebalanceState`; it reads no clock and calls no Ray, so the
live controller (`cluster.control.controller`) and the trace-replay simulator
(`cluster.sim.simulator`) take the same decision from the same inputs. Its steps:

1. **Enough load**: fewer than `min_window_tokens` routed tokens in the window decide nothing
   (unless forced).
2. **Workers in service**: while a worker is down nothing moves (the supervisor is restoring it).
3. **Trigger** (`wants_plan`): balancedness (min over layers) below `min(threshold, floor)`
   and `min_interval_s` since the last plan.
4. **Plan** with `cluster.planning.planner.plan_placement` on the placed load.
5. **Gain**: a plan that improves balancedness by less than `min_gain` is skipped, and the
   floor drops to (balancedness now - hysteresis); otherwise it is acted on, and the floor is
   (balancedness planned - hysteresis), so a placement as good as it gets is not re-planned
   until the load has drifted further.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from cluster.config import RebalanceConfig
from cluster.placement import Placement
from cluster.planning.planner import count_moves, layer_balancedness, plan_placement

Action = Literal["act", "skip", "wait"]


@dataclass(frozen=True)
class RebalanceState:
    """last_s: when the controller last planned; floor: trigger only below this balancedness."""

    last_s: float = float("-inf")
    floor: float = 1.0


@dataclass(frozen=True)
class RebalanceDecision:
    """What to do about the placement now, and why.

    action: `act` (move to `target`), `skip` (a plan was made but gains less than `min_gain`)
    or `wait` (no plan was made: balanced, within hysteresis, too soon, too little load, or a
    worker is down). balancedness_*: min over layers, now and under `target` (the same as now
    when there is no plan); moves: replicas `target` loads; changes: `target` holds other
    replicas than the placement it was planned from; forced: decided on demand.
    """

    action: Action
    reason: str
    balancedness_before: float
    balancedness_planned: float
    target: Placement | None = None
    moves: int = 0
    changes: bool = False
    forced: bool = False


def wants_plan(balancedness: float, state: RebalanceState, now_s: float,
               config: RebalanceConfig) -> tuple[bool, str, RebalanceState]:
    """Whether to plan a rebalance now (step 3). Pure.

    Triggers when balancedness is below `min(threshold, floor)` and `min_interval_s` has passed.
    A balanced load resets the floor.
    """
    if balancedness >= config.threshold:
        return False, f"balanced ({balancedness:.3f} >= threshold {config.threshold})", replace(state, floor=1.0)
    trigger_below = min(config.threshold, state.floor)
    if balancedness >= trigger_below:
        return False, f"within hysteresis ({balancedness:.3f} >= {trigger_below:.3f})", state
    if now_s - state.last_s < config.min_interval_s:
        return False, f"too soon ({now_s - state.last_s:.1f}s < min_interval_s {config.min_interval_s})", state
    return True, f"balancedness {balancedness:.3f} < {trigger_below:.3f}", replace(state, last_s=now_s)


def plan_for(load: np.ndarray, capacity: Sequence[int], current: Placement, config: RebalanceConfig,
             worker_nodes: Sequence[str] | None = None) -> Placement:
    """The placement the planner chooses for the placed `load` `[L, experts_per_layer]` over
    `capacity` `[W]` slots per worker (0 empties a worker), moving as little of `current` as it
    can. Workers in `current` keep their index; a longer `capacity` adds empty workers."""
    if len(capacity) != current.num_workers:
        current = current.resized(len(capacity), 0, current.version)
    return plan_placement(
        np.asarray(load, dtype=np.float64), list(capacity), current,
        min_replicas=config.min_replicas, policy=config.policy, worker_nodes=worker_nodes,
    )


def decide(load: np.ndarray, window_tokens: float, placement: Placement, capacity: Sequence[int],
           state: RebalanceState, now_s: float, config: RebalanceConfig,
           worker_nodes: Sequence[str] | None = None, down: frozenset[int] = frozenset(),
           force: bool = False) -> tuple[RebalanceDecision, RebalanceState]:
    """The whole rebalance decision (the module's steps 1-5). Pure.

    load: `[L, experts_per_layer]` the placed load (routed plus shared pieces) over the window,
    tokens or tokens/s (balancedness and plans do not depend on the scale); window_tokens:
    routed tokens in the window; placement: the one in service; capacity: `[W]` slots per
    worker; worker_nodes: `[W]` node per worker (the `node_aware` policy); down: workers not in
    service now; force: plan whatever the trigger says, and act whatever the plan gains.
    """
    before = float(layer_balancedness(placement, load).min())

    def wait(reason: str) -> tuple[RebalanceDecision, RebalanceState]:
        return RebalanceDecision("wait", reason, before, before, forced=force), state

    if window_tokens < config.min_window_tokens and not force:
        return wait(f"too few routed tokens in the window ({window_tokens:.0f} < min_window_tokens "
                    f"{config.min_window_tokens})")
    if down:  # no migration onto, or from, a worker that is not there
        return wait(f"workers {sorted(down)} are down; the supervisor is restoring them")
    trigger, reason, state = wants_plan(before, state, now_s, config)
    if force and not trigger:
        reason = f"forced on demand at balancedness {before:.3f}"
    if not (trigger or force):
        return wait(reason)
    target = plan_for(load, capacity, placement, config, worker_nodes)
    planned = float(layer_balancedness(target, load).min())
    moves = count_moves(placement, target)
    changes = target.replica_set != placement.replica_set
    if not force and planned - before < config.min_gain:
        reason = f"{reason}: plan gains {planned - before:.3f} < min_gain {config.min_gain}"
        return (RebalanceDecision("skip", reason, before, planned, target, moves, changes, force),
                replace(state, floor=before - config.hysteresis))
    return (RebalanceDecision("act", reason, before, planned, target, moves, changes, force),
            replace(state, floor=planned - config.hysteresis))
