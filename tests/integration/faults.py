"""Fault injection for the fault tests: a worker that dies on a poison request, or takes its
time over a slow one (so tests can hold the workers busy without racing the clock).

Ray ships this module's classes to the workers by value (`register`), so the worker processes
need not import the tests package.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import ray

from workers.worker import ExpertWorker

POISON = 1234.5  # a token whose first value is this kills every worker that computes it
SLOW = 4321.5  # a token whose first value is this holds its workers for SLOW_S
SLOW_S = 2.0
HANG = 5678.5  # a token whose first value is this hangs worker HANG_WORKER forever inside its math
HANG_WORKER = 1


class FaultyWorker(ExpertWorker):
    """An expert worker whose process exits (as on a segfault or OOM kill) when its share of a
    batch contains the poison token, that computes slowly when it contains the slow one, and
    that hangs forever in its math (worker HANG_WORKER only) when it contains the hang token."""

    @ray.method(enable_task_events=False)  # as the worker's own: no task event per share
    def forward(self, x: np.ndarray, share, call_id=None):
        if call_id is not None and call_id in self._skip:  # given up on: no fault, no wait
            return super().forward(x, share, call_id)
        first = x[share.token_idx, 0]
        if np.any(first == POISON):
            os._exit(1)
        if np.any(first == SLOW):
            time.sleep(SLOW_S)
        return super().forward(x, share, call_id)


    def _compute(self, x, share, start):
        if self.index == HANG_WORKER and np.any(x[share.token_idx, 0] == HANG):
            while True:  # a hang inside the expert math: only killing the process ends it
                time.sleep(60)
        return super()._compute(x, share, start)


def register() -> None:
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def restarts(actor_name: str) -> int:
    """How many times Ray restarted the named actor (from the GCS; no dashboard needed)."""
    from ray._private import state

    for info in state.actors().values():
        if info.get("Name") == actor_name and info.get("State") != "DEAD":
            return int(info.get("NumRestarts", 0))
    raise LookupError(f"no live actor named {actor_name!r}")
