"""What a deployment's controller keeps in Ray's GCS key-value store, so that a controller that
dies and comes back (Ray restarts it) finds its history: the placement in service, the recent
rebalance, scaling, worker and router events, and what was pinned by hand. The workers and the
routers keep serving meanwhile (they are detached actors): they hold the live state, this only
what the loops remember.

Saved every `SAVE_INTERVAL_S` by the controller and on every placement change; read once when a
restarted controller takes over.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import ray.cloudpickle as pickle
from ray.experimental import internal_kv

from cluster.placement import Placement

log = logging.getLogger(__name__)

SAVE_INTERVAL_S = 1.0
KV_NAMESPACE = "moe-serve"


@dataclass
class ControllerState:
    """placement: the latest published; events: name -> recent events (oldest first); manual:
    the worker and router counts pinned by hand (None: the autoscaler decides)."""

    placement: Placement
    events: dict[str, list[Any]] = field(default_factory=dict)
    manual_workers: int | None = None
    manual_routers: int | None = None


def state_key(namespace: str, model: str) -> str:
    return f"{namespace}/{model}/controller-state"


def save(namespace: str, model: str, state: ControllerState) -> None:
    internal_kv._internal_kv_put(state_key(namespace, model), pickle.dumps(state), overwrite=True,
                                 namespace=KV_NAMESPACE)


def load(namespace: str, model: str) -> ControllerState | None:
    raw = internal_kv._internal_kv_get(state_key(namespace, model), namespace=KV_NAMESPACE)
    if raw is None:
        return None
    try:
        return pickle.loads(raw)
    except Exception:  # written by another version: start without the history
        log.exception("cannot read the saved controller state; going on without its history")
        return None


def forget(namespace: str, model: str) -> None:
    internal_kv._internal_kv_del(state_key(namespace, model), namespace=KV_NAMESPACE)
