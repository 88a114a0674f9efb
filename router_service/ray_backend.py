"""`ExpertBackend` over Ray actor handles: the batch goes to the object store once, and each
worker's actor call reads it from there (zero-copy on the same node)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import ray

from router_service.dispatch import WorkerRequest


class RayExpertBackend:
    def __init__(self, handles: Sequence[ray.actor.ActorHandle]):
        self._handles = list(handles)

    def __repr__(self) -> str:
        return f"RayExpertBackend(workers={len(self._handles)})"

    def set_handles(self, handles: Sequence[ray.actor.ActorHandle]) -> None:
        """The worker of each placement index from now on (workers join and leave at the end,
        so batches already sent keep the handles they used)."""
        self._handles = list(handles)

    def share(self, x: np.ndarray) -> ray.ObjectRef:
        return ray.put(x)

    def forward(self, shared_x: Any, request: WorkerRequest) -> ray.ObjectRef:
        return self._handles[request.worker].forward.remote(
            shared_x, request.expert_ids, request.offsets, request.token_idx, request.weights
        )
