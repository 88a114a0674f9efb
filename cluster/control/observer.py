"""The control plane's eyes: every `interval_s` it collects the routers' load and the workers'
counters, sets the metrics (`cluster.control.metrics.ControlMetrics`), and keeps a bounded history of
per-expert load for the status picture (`moe-serve status --png`).

One window for everything it shows: the routed load is summed over `rebalance.window_s`, and each
worker's tokens/s and busy fraction are rated over the same window (between the oldest and the
newest of its looks within it), so a burst stays visible for the whole window, not for one look."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from cluster.control.loops import Periodic
from cluster.control.metrics import ControlMetrics
from cluster.control.placement_hub import PlacementHub
from cluster.planning.planner import layer_balancedness

log = logging.getLogger(__name__)

HISTORY_VALUES = 2_000_000  # floats of per-expert history kept at most (bounds memory for big models)


@dataclass(frozen=True)
class LoadPoint:
    """One look: wall-clock time, `[L, E]` expert-tokens/s (float32), the placement version."""

    at_s: float
    tokens_per_s: np.ndarray
    version: int


@dataclass(frozen=True)
class WorkerLook:
    """One look at a worker's counters: monotonic time, tokens computed, seconds busy (since start)."""

    at_s: float
    tokens: int
    busy_s: float


class WorkerRates:
    """Each worker's tokens/s and busy fraction over the last `window_s`: the looks within the
    window are kept and the rate is taken between the oldest and the newest (the previous look
    is always kept, so a window shorter than the looks' interval rates between two looks).
    A worker whose counters went back (Ray restarted it) starts again from its new look; one
    that did not answer (`down`: its counters read as zeros) shows 0 and its looks are kept."""

    def __init__(self, window_s: float):
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.window_s = window_s
        self._looks: dict[int, deque[WorkerLook]] = {}

    def rate(self, stats: list[dict], now_s: float) -> dict[int, tuple[float, float]]:
        """`{worker index: (tokens_per_s, busy_fraction)}` over the window ending `now_s`, from
        each worker's `stats()` (`index`, `tokens`, `busy_s`); workers not in `stats` are forgotten."""
        out = {}
        for s in stats:
            index = int(s["index"])
            if s.get("down"):  # no counters this time (lost, restarting, or slow to answer)
                out[index] = (0.0, 0.0)
                continue
            look = WorkerLook(now_s, int(s["tokens"]), float(s["busy_s"]))
            looks = self._looks.setdefault(index, deque())
            if looks and (look.tokens < looks[-1].tokens or look.busy_s < looks[-1].busy_s):
                looks.clear()  # new (or restarted) worker: its counters began again
            looks.append(look)
            while len(looks) > 2 and looks[0].at_s < now_s - self.window_s:
                looks.popleft()
            first = looks[0]
            span_s = look.at_s - first.at_s
            if span_s <= 0:
                out[index] = (0.0, 0.0)
            else:
                out[index] = ((look.tokens - first.tokens) / span_s, min(1.0, (look.busy_s - first.busy_s) / span_s))
        live = {int(s["index"]) for s in stats}
        self._looks = {i: v for i, v in self._looks.items() if i in live}
        return out


class Observer:
    def __init__(self, hub: PlacementHub, feed, worker_stats: Callable[[], Awaitable[list[dict]]],
                 pending: Callable[[], int], metrics: ControlMetrics | None, interval_s: float,
                 history_s: float, window_s: float, clock: Callable[[], float] = time.monotonic):
        self._hub = hub
        self._feed = feed
        self._worker_stats = worker_stats
        self._pending = pending
        self._metrics = metrics
        self.metrics = metrics  # the control plane's, for the loops the roots add (router scaling)
        self.interval_s = interval_s
        self._clock = clock
        shape = feed.snapshot(clock()).expert_tokens.shape
        points = max(10, min(int(history_s / interval_s), HISTORY_VALUES // max(1, shape[0] * shape[1])))
        self.history: deque[LoadPoint] = deque(maxlen=points)
        self.workers: list[dict] = []  # the latest per-worker rates, over `window_s`
        self._worker_rates = WorkerRates(window_s)
        self._loop = Periodic("observer", interval_s, self.look, first_now=True)

    def __repr__(self) -> str:
        return f"Observer(every {self.interval_s:g}s, history={len(self.history)}/{self.history.maxlen})"

    async def look(self) -> None:
        await self._feed.refresh()
        now = self._clock()
        snapshot = self._feed.snapshot(now)
        placement = self._hub.current
        self.history.append(LoadPoint(time.time(), snapshot.tokens_per_s.astype(np.float32), placement.version))
        self.workers = self._rates(await self._worker_stats(), now)
        if self._metrics is not None:
            layers, routed = snapshot.tokens_per_s.shape  # routed experts only: shared ones are no routed load
            replicas = placement.replica_counts.reshape(layers, -1)[:, :routed].reshape(-1)
            self._metrics.load(snapshot.tokens_per_s, replicas,
                               layer_balancedness(placement, snapshot.placement_load), placement.version)
            self._metrics.workers(placement.num_workers, self._pending(), self.workers)
            self._metrics.router_workers(self._feed.board.router_workers(now))

    def _rates(self, stats: list[dict], now: float) -> list[dict]:
        """Per worker: tokens/s and busy fraction over the load window; tokens in hand now."""
        outstanding = self._feed.outstanding()
        rates = self._worker_rates.rate(stats, now)
        out = []
        for s in stats:
            index = int(s["index"])
            tps, busy = rates[index]
            queued = int(outstanding[index]) if index < len(outstanding) else 0
            out.append({"index": index, "tokens_per_s": tps, "busy_fraction": busy, "outstanding_tokens": queued})
        return out

    def history_dict(self) -> dict:
        """The load history as plain data: `t_s [T]`, `tokens_per_s [T][L][E]`, `versions [T]`."""
        return {
            "t_s": [p.at_s for p in self.history],
            "tokens_per_s": [p.tokens_per_s.tolist() for p in self.history],
            "versions": [p.version for p in self.history],
        }

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()
