"""Load statistics: tokens per logical expert over a sliding window, and the board that merges
the routers' reports into it. Pure: the caller passes the time (`now_s`), so tests drive the
clock."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np


@dataclass(frozen=True)
class LoadSnapshot:
    """expert_tokens: `[L, E]` tokens routed per logical expert within the window;
    tokens_per_s: `[L, E]` the same as a rate; window_s: how much time it covers;
    placed_tokens: `[L, experts_per_layer]` the load the placement carries, the routed load plus
    the shared experts' (every token), or None when the model has no shared experts. Routed
    statistics (metrics, hot experts, traces) read `expert_tokens`; placement and scaling read
    `placement_load`."""

    expert_tokens: np.ndarray
    tokens_per_s: np.ndarray
    window_s: float
    total_tokens: int
    placed_tokens: np.ndarray | None = None

    @property
    def placement_load(self) -> np.ndarray:
        """`[L, experts_per_layer]` tokens per placed logical expert within the window."""
        return self.expert_tokens if self.placed_tokens is None else self.placed_tokens


class SlidingWindowLoad:
    """Counts routed tokens per logical expert in time buckets and sums the last `window_s`.

    Memory is bounded: at most `window_s / bucket_s + 1` buckets of `[L, E]` int64.
    """

    def __init__(self, num_layers: int, num_experts: int, window_s: float = 30.0, bucket_s: float = 1.0):
        if window_s <= 0 or bucket_s <= 0 or bucket_s > window_s:
            raise ValueError(f"need 0 < bucket_s ({bucket_s}) <= window_s ({window_s})")
        self.shape = (num_layers, num_experts)
        self.window_s = window_s
        self.bucket_s = bucket_s
        self._buckets: deque[tuple[int, np.ndarray]] = deque()
        self._started_s: float | None = None

    def add(self, moe_index: int, expert_tokens: np.ndarray, now_s: float) -> None:
        """expert_tokens: `[E]` tokens routed to each expert of MoE layer `moe_index`."""
        if self._started_s is None:
            self._started_s = now_s
        bucket = int(now_s // self.bucket_s)
        if not self._buckets or self._buckets[-1][0] != bucket:
            self._buckets.append((bucket, np.zeros(self.shape, dtype=np.int64)))
        self._buckets[-1][1][moe_index] += expert_tokens
        self._expire(now_s)

    def _expire(self, now_s: float) -> None:
        oldest = int((now_s - self.window_s) // self.bucket_s)
        while self._buckets and self._buckets[0][0] <= oldest:
            self._buckets.popleft()

    def snapshot(self, now_s: float) -> LoadSnapshot:
        self._expire(now_s)
        total = np.zeros(self.shape, dtype=np.int64)
        for _, counts in self._buckets:
            total += counts
        covered = self.window_s if self._started_s is None else min(self.window_s, max(now_s - self._started_s, self.bucket_s))
        return LoadSnapshot(total, total / covered, covered, int(total.sum()))


@dataclass(frozen=True)
class GenerationLoad:
    """A router's text generation (its dense side) at one moment: sequences running and waiting
    for room, the share of its KV cache in use, its `max_num_seqs`, and the time to first token
    and time per output token of the requests finished since its previous report (the latest
    ones, bounded)."""

    running: int = 0
    waiting: int = 0
    kv_used_fraction: float = 0.0
    max_num_seqs: int = 1
    ttft_s: tuple[float, ...] = ()
    tpot_s: tuple[float, ...] = ()
    output_tokens: int = 0  # generated since the previous report


@dataclass(frozen=True)
class RouterReport:
    """What one router has seen since its previous report.

    expert_tokens: `[L, E]` tokens routed per logical expert since then; queue_delays_s: how long
    the requests finished since then waited in the queue (the latest ones, bounded);
    oldest_queued_s: how long the oldest request still queued has waited; outstanding_tokens:
    `[W]` tokens the router has in the workers now; lost_workers: `(worker, incarnation)` of the
    calls that failed because their worker was lost, since then (the incarnation the call went
    to, None when not known); generation: its dense side, when it generates text.
    """

    router_id: str
    expert_tokens: np.ndarray
    queue_delays_s: tuple[float, ...] = ()
    oldest_queued_s: float = 0.0
    outstanding_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    lost_workers: tuple[tuple[int, str | None], ...] = ()
    generation: GenerationLoad | None = None
    routable_workers: int = 0  # workers the router may send to now
    serving_workers: int = 0  # of which got a share recently
    hung_workers: tuple[tuple[int, str | None], ...] = ()  # (worker, incarnation) that missed a share's deadline


class LoadBoard:
    """The control plane's view of the load: router reports merged into one sliding window.

    Pure like `SlidingWindowLoad`: every method takes the time. The window starts at `started_s`,
    so rates early on are averaged over the time since the service started, not over the first
    report's bucket.
    """

    def __init__(self, num_layers: int, num_experts: int, window_s: float, started_s: float,
                 placed: Callable[[np.ndarray], np.ndarray] | None = None):
        """placed: the routed load `[L, E]` -> the placed load (`ModelSpec.placed_load`), for
        models with shared experts."""
        self._placed = placed
        self.window = SlidingWindowLoad(num_layers, num_experts, window_s, bucket_s=min(1.0, window_s / 10))
        self.window.add(0, np.zeros(num_experts, dtype=np.int64), started_s)
        self._delays: deque[tuple[float, float]] = deque(maxlen=4096)  # (at_s, delay_s)
        self._ttft: deque[tuple[float, float]] = deque(maxlen=4096)  # (at_s, time to first token s)
        self._tpot: deque[tuple[float, float]] = deque(maxlen=4096)  # (at_s, time per output token s)
        self._generated: deque[tuple[float, int]] = deque(maxlen=4096)  # (at_s, output tokens)
        self._latest: dict[str, tuple[float, RouterReport]] = {}
        self._lost: set[tuple[int, str | None]] = set()
        self._hung: set[tuple[int, str | None]] = set()

    def report(self, report: RouterReport, now_s: float) -> None:
        for moe_index, counts in enumerate(np.asarray(report.expert_tokens)):
            if counts.any():
                self.window.add(moe_index, counts, now_s)
        self._delays.extend((now_s, d) for d in report.queue_delays_s)
        if report.generation is not None:
            self._ttft.extend((now_s, t) for t in report.generation.ttft_s)
            self._tpot.extend((now_s, t) for t in report.generation.tpot_s)
            self._generated.append((now_s, report.generation.output_tokens))
        self._latest[report.router_id] = (now_s, report)
        self._lost.update(report.lost_workers)
        self._hung.update(report.hung_workers)

    def take_lost_workers(self) -> tuple[set[tuple[int, str | None]], set[tuple[int, str | None]]]:
        """`(worker, incarnation)` the routers saw lost, and saw miss a share's deadline (hung),
        since the previous call."""
        lost, hung, self._lost, self._hung = self._lost, self._hung, set(), set()
        return lost, hung

    def forget(self, router_id: str) -> None:
        self._latest.pop(router_id, None)

    def snapshot(self, now_s: float) -> LoadSnapshot:
        snapshot = self.window.snapshot(now_s)
        if self._placed is None:
            return snapshot
        return replace(snapshot, placed_tokens=self._placed(snapshot.expert_tokens))

    def queue_delay_ms(self, now_s: float, quantile: float = 0.9) -> float:
        """The `quantile` of queue delays within the window, or the oldest request still queued
        at a router if it has waited longer; 0 without requests."""
        start = now_s - self.window.window_s
        recent = [d for at, d in self._delays if at >= start]
        finished = float(np.quantile(recent, quantile)) if recent else 0.0
        waiting = max((r.oldest_queued_s for at, r in self._latest.values() if at >= start), default=0.0)
        return 1000.0 * max(finished, waiting)

    def generation(self, now_s: float) -> dict[str, GenerationLoad]:
        """The latest generation state of each router that generates and reported within the window."""
        start = now_s - self.window.window_s
        return {name: r.generation for name, (at, r) in self._latest.items()
                if r.generation is not None and at >= start}

    def router_workers(self, now_s: float) -> dict[str, tuple[int, int]]:
        """Per router that reported within the window: (routable workers, serving workers)."""
        start = now_s - self.window.window_s
        return {name: (r.routable_workers, r.serving_workers) for name, (at, r) in self._latest.items() if at >= start}

    def generation_latency_ms(self, now_s: float, quantile: float = 0.9) -> tuple[float, float]:
        """(time to first token, time per output token) at `quantile` over the window, in ms;
        0 without finished requests."""
        start = now_s - self.window.window_s

        def q(samples: deque) -> float:
            recent = [v for at, v in samples if at >= start]
            return 1000.0 * float(np.quantile(recent, quantile)) if recent else 0.0
        return q(self._ttft), q(self._tpot)

    def generated_since(self, since_s: float) -> tuple[int, int]:
        """(tokens generated, requests that got their first token) in the reports taken at or
        after `since_s`, all routers together (within the last 4096 reports of each)."""
        return (sum(n for at, n in self._generated if at >= since_s),
                sum(1 for at, _ in self._ttft if at >= since_s))

    def output_tokens_per_s(self, now_s: float) -> float:
        """Tokens generated per second over the window, all routers together."""
        start = now_s - self.window.window_s
        return sum(n for at, n in self._generated if at >= start) / self.window.window_s

    def outstanding_tokens(self, num_workers: int) -> np.ndarray:
        """`[W]` tokens in the workers now, summed over the routers' latest reports."""
        total = np.zeros(num_workers, dtype=np.int64)
        for _, r in self._latest.values():
            n = min(num_workers, len(r.outstanding_tokens))
            total[:n] += np.asarray(r.outstanding_tokens)[:n]
        return total
