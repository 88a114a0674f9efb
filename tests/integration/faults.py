"""Fault injection for the fault tests: a worker that dies on a poison request.

Ray ships this module's classes to the workers by value (`register`), so the worker processes
need not import the tests package.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import ray

from workers.worker import ExpertWorker

POISON = 1234.5  # a request whose first value is this kills every worker that computes it


class PoisonedWorker(ExpertWorker):
    """An expert worker whose process exits (as on a segfault or OOM kill) when its share of a
    batch contains the poison token."""

    def forward(self, x: np.ndarray, expert_ids, offsets, token_idx, weights):
        if np.any(x[token_idx, 0] == POISON):
            os._exit(1)
        return super().forward(x, expert_ids, offsets, token_idx, weights)


def register() -> None:
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def restarts(actor_name: str) -> int:
    """How many times Ray restarted the named actor (from the GCS; no dashboard needed)."""
    from ray._private import state

    for info in state.actors().values():
        if info.get("Name") == actor_name and info.get("State") != "DEAD":
            return int(info.get("NumRestarts", 0))
    raise LookupError(f"no live actor named {actor_name!r}")
