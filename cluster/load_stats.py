"""Load statistics: tokens per logical expert over a sliding window. Pure: the caller passes
the time (`now_s`), so tests drive the clock."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LoadSnapshot:
    """expert_tokens: `[L, E]` tokens routed per logical expert within the window;
    tokens_per_s: `[L, E]` the same as a rate; window_s: how much time it covers."""

    expert_tokens: np.ndarray
    tokens_per_s: np.ndarray
    window_s: float
    total_tokens: int


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
