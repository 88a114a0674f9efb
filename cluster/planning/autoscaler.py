"""The autoscaler's decision: how many expert shard workers the live load calls for. Pure.

`decide(snapshot, state, now_s, config, bounds)` returns a `ScaleDecision` and the next
`AutoscaleState`; nothing here reads a clock, calls Ray or sleeps, so every case is a unit test
with literal numbers. `cluster.control.scaler.Reconciler` carries a decision out (Ray resource requests,
new workers, make-before-break placement changes).

The rule, in expert-tokens per second (a token routed to k experts counts k times):
- **out** when the load per counted worker (serving + pending) is above
  `target_tokens_per_s_per_worker`, or requests wait longer than `max_queue_delay_ms` in the
  router's queue (unless workers are pending: the queue cannot shrink before they serve): to
  `ceil(load / target)` workers, at least one more, at most `max_step` more.
- **in** when one worker fewer would still carry less than `downscale_utilization x target`
  each, nothing is pending and the queue is short: to `ceil(load / (utilization x target))`,
  at most `max_step` fewer.
- The wish must hold for `upscale_delay_s` / `downscale_delay_s` without a break before it is
  acted on (hysteresis against short bursts); the count stays within `bounds`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

from cluster.config import AutoscalingConfig

Action = Literal["out", "in", "hold"]


@dataclass(frozen=True)
class ScaleSnapshot:
    """What the autoscaler sees at one moment.

    tokens_per_s: expert-tokens routed per second over the load window, all layers together.
    serving_workers: workers that serve; pending_workers: asked for, not serving yet.
    queue_delay_ms: how long requests waited in the router's queue (p90 over the window, or
    the oldest request still queued if longer). balancedness: min over layers of the placement
    in service (mean / max worker load), for the record. migrating: a placement change runs.
    """

    tokens_per_s: float
    serving_workers: int
    pending_workers: int = 0
    queue_delay_ms: float = 0.0
    balancedness: float = 1.0
    migrating: bool = False

    @property
    def counted_workers(self) -> int:
        return self.serving_workers + self.pending_workers


@dataclass(frozen=True)
class AutoscaleState:
    """wish: the direction the load has asked for since `since_s` without a break (None: none)."""

    wish: Action | None = None
    since_s: float = 0.0


@dataclass(frozen=True)
class ScaleDecision:
    """target_workers: the worker count to reach (serving + pending); reason: why, in words."""

    action: Action
    target_workers: int
    reason: str
    trigger: str = "load"  # what calls for it: load, queue or bounds


def decide(snapshot: ScaleSnapshot, state: AutoscaleState, now_s: float, config: AutoscalingConfig,
           bounds: tuple[int, int]) -> tuple[ScaleDecision, AutoscaleState]:
    """The worker count the load calls for now, and the state for the next call. Pure."""
    low, high = bounds
    counted = snapshot.counted_workers
    load = f"{snapshot.tokens_per_s:,.0f} tok/s on {counted} workers"
    if counted < low:
        return ScaleDecision("out", low, f"below workers.min_workers ({counted} < {low})", "bounds"), AutoscaleState()
    if counted > high:
        return ScaleDecision("in", high, f"above workers.max_workers ({counted} > {high})", "bounds"), AutoscaleState()
    if snapshot.migrating:
        return ScaleDecision("hold", counted, f"a placement change is running ({load})"), state
    wish, target, why, trigger = _wish(snapshot, config, low, high)
    action, state, why = _sustained(wish, why, state, now_s, config)
    return ScaleDecision(action, target if action != "hold" else counted, why, trigger), state


def _sustained(wish: Action, why: str, state: AutoscaleState, now_s: float,
               config: AutoscalingConfig) -> tuple[Action, AutoscaleState, str]:
    """Act on `wish` only once it has held for `upscale_delay_s` / `downscale_delay_s` without a
    break: (action, next state, reason)."""
    if wish == "hold":
        return "hold", AutoscaleState(), why
    if state.wish != wish:
        state = AutoscaleState(wish, now_s)
    delay = config.upscale_delay_s if wish == "out" else config.downscale_delay_s
    waited = now_s - state.since_s
    if waited < delay:
        return "hold", state, f"{why}; waiting {waited:.1f}s of {delay:g}s"
    return wish, replace(state, wish=None), why


def _wish(snapshot: ScaleSnapshot, config: AutoscalingConfig, low: int, high: int) -> tuple[Action, int, str, str]:
    counted = snapshot.counted_workers
    target_tps = config.target_tokens_per_s_per_worker
    per_worker = snapshot.tokens_per_s / max(counted, 1)
    state = (f"{per_worker:,.0f} tok/s per worker (target {target_tps:,.0f}), queue "
             f"{snapshot.queue_delay_ms:.0f} ms, balancedness {snapshot.balancedness:.2f}")
    slow = snapshot.queue_delay_ms > config.max_queue_delay_ms
    if slow and snapshot.pending_workers and per_worker <= target_tps:
        # the queue cannot shrink before the pending workers serve; asking for more would overshoot
        return "hold", counted, f"{state}: queue delay above {config.max_queue_delay_ms:g} ms, waiting for {snapshot.pending_workers} pending workers", "queue"
    if per_worker > target_tps or slow:
        if counted >= high:
            return "hold", counted, f"{state}: at workers.max_workers ({high})", "load"
        wanted = max(math.ceil(snapshot.tokens_per_s / target_tps), counted + 1)
        target = min(wanted, counted + config.max_step, high)
        cause = "load above target" if per_worker > target_tps else f"queue delay above {config.max_queue_delay_ms:g} ms"
        return "out", target, f"{state}: {cause}", "load" if per_worker > target_tps else "queue"
    floor = config.downscale_utilization * target_tps
    if counted > low and snapshot.pending_workers == 0 and counted > 1 \
            and snapshot.tokens_per_s / (counted - 1) < floor \
            and snapshot.queue_delay_ms <= config.downscale_utilization * config.max_queue_delay_ms:
        wanted = max(math.ceil(snapshot.tokens_per_s / floor), 1)
        target = max(wanted, counted - config.max_step, low)
        return "in", target, f"{state}: {counted - 1} workers would carry < {floor:,.0f} tok/s each", "load"
    return "hold", counted, state, "load"


# ---- routers: the dense side (data-parallel attention) ------------------------------------------


@dataclass(frozen=True)
class RouterSnapshot:
    """The routers' text generation at one moment: routers serving and starting; sequences
    running and waiting for room (summed over the routers); the fullest router's KV cache;
    `max_num_seqs` of one router."""

    routers: int
    running: int = 0
    waiting: int = 0
    kv_used_max: float = 0.0
    max_num_seqs: int = 1
    pending: int = 0

    @property
    def counted(self) -> int:
        return self.routers + self.pending


@dataclass(frozen=True)
class RouterDecision:
    """target_routers: the router count to reach; reason: why, in words."""

    action: Action
    target_routers: int
    reason: str
    trigger: str = "load"  # waiting, kv, load or bounds


def decide_routers(snapshot: RouterSnapshot, state: AutoscaleState, now_s: float, config: AutoscalingConfig,
                   bounds: tuple[int, int]) -> tuple[RouterDecision, AutoscaleState]:
    """The router count the dense side calls for. Pure, with the same hysteresis as `decide`.

    - **out** (one more router) when more than `router_max_waiting` requests per router wait
      for room in the KV caches, or a router's KV cache is fuller than `router_max_kv_usage`;
    - **in** (one fewer) when one router fewer would still run every sequence below
      `downscale_utilization` of its `max_num_seqs`, nothing waits and no cache is half full;
    - within `bounds` (`router.min_count`, `router.max_count`).
    """
    low, high = bounds
    counted = snapshot.counted
    if counted < low:
        return RouterDecision("out", low, f"below router.min_count ({counted} < {low})", "bounds"), AutoscaleState()
    if counted > high:
        return RouterDecision("in", high, f"above router.max_count ({counted} > {high})", "bounds"), AutoscaleState()
    now = (f"{snapshot.running} running, {snapshot.waiting} waiting on {counted} routers, "
           f"KV cache up to {snapshot.kv_used_max:.0%}")
    wish, trigger, why = "hold", "load", now
    if snapshot.pending:
        why = f"{now}: waiting for {snapshot.pending} routers to start"
    elif snapshot.waiting > config.router_max_waiting * counted or snapshot.kv_used_max > config.router_max_kv_usage:
        trigger = "waiting" if snapshot.waiting > config.router_max_waiting * counted else "kv"
        wish, why = ("out", f"{now}: the dense side is the bottleneck") if counted < high else \
            ("hold", f"{now}: at router.max_count ({high})")
    elif counted > max(low, 1) and snapshot.waiting == 0 and snapshot.kv_used_max < 0.5 \
            and snapshot.running < config.downscale_utilization * snapshot.max_num_seqs * (counted - 1):
        wish, why = "in", f"{now}: {counted - 1} routers would run them below {config.downscale_utilization:.0%} of max_num_seqs"
    action, state, why = _sustained(wish, why, state, now_s, config)
    target = counted + (1 if action == "out" else -1 if action == "in" else 0)
    return RouterDecision(action, target, why, trigger), state
