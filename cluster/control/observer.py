"""The control plane's eyes: every `interval_s` it collects the routers' load and the workers'
counters, sets the metrics (`cluster.control.metrics.ControlMetrics`), and keeps a bounded history of
per-expert load for the status picture (`moe-serve status --png`)."""

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


class Observer:
    def __init__(self, hub: PlacementHub, feed, worker_stats: Callable[[], Awaitable[list[dict]]],
                 pending: Callable[[], int], metrics: ControlMetrics | None, interval_s: float,
                 history_s: float, clock: Callable[[], float] = time.monotonic):
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
        self.workers: list[dict] = []  # the latest per-worker rates
        self._last: dict[int, tuple[float, dict]] = {}
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
        """Per worker: tokens/s and busy fraction since the previous look; tokens in hand now."""
        outstanding = self._feed.outstanding()
        out = []
        for s in stats:
            index = int(s["index"])
            before_s, before = self._last.get(index, (None, None))
            if before is None or s["tokens"] < before["tokens"]:  # new (or replaced) worker
                tps = busy = 0.0
            else:
                dt = max(now - before_s, 1e-9)
                tps = (s["tokens"] - before["tokens"]) / dt
                busy = min(1.0, (s["busy_s"] - before["busy_s"]) / dt)
            self._last[index] = (now, s)
            queued = int(outstanding[index]) if index < len(outstanding) else 0
            out.append({"index": index, "tokens_per_s": tps, "busy_fraction": busy, "outstanding_tokens": queued})
        live = {int(s["index"]) for s in stats}
        self._last = {i: v for i, v in self._last.items() if i in live}
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
