"""`ExpertBackend` over Ray actor handles: the batch goes to the object store once, and each
worker's actor call reads it from there (zero-copy on the same node).

A call that fails because its worker died, is restarting, or came back without its replicas
becomes `WorkerLost`, and the worker counts as down here until the control plane hands its
handle back (`set_handles`). A call whose caller gives up (cancelled) is skipped at the worker
if it has not started, so a worker does not compute work nobody waits for.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import ray

from router_service.dispatch import WorkerRequest
from router_service.errors import WorkerLost


class RayExpertBackend:
    def __init__(self, handles: Sequence[ray.actor.ActorHandle | None]):
        self._handles = list(handles)
        self._call_ids = itertools.count()

    def __repr__(self) -> str:
        return f"RayExpertBackend(workers={len(self._handles)}, down={sorted(self.down)})"

    def set_handles(self, handles: Sequence[ray.actor.ActorHandle | None]) -> None:
        """The worker of each placement index from now on; None: that worker is down (workers
        join and leave at the end, so batches already sent keep the handles they used)."""
        self._handles = list(handles)

    @property
    def down(self) -> frozenset[int]:
        """Workers not to send to: lost, restarting, or not yet loaded."""
        return frozenset(i for i, h in enumerate(self._handles) if h is None)

    def mark_lost(self, worker: int) -> None:
        if worker < len(self._handles):
            self._handles[worker] = None

    def share(self, x: np.ndarray) -> ray.ObjectRef:
        return ray.put(x)

    async def forward(self, shared_x: Any, request: WorkerRequest) -> np.ndarray:
        handle = self._handles[request.worker] if request.worker < len(self._handles) else None
        if handle is None:
            raise WorkerLost(request.worker, "is down")
        call_id = next(self._call_ids)
        ref = handle.forward.remote(shared_x, request.share, call_id)
        try:
            return await ref
        except asyncio.CancelledError:
            handle.skip.remote(call_id)  # a queued call will not compute; a running one finishes
            raise
        except ray.exceptions.RayActorError as err:  # died, restarting, or unreachable
            raise WorkerLost(request.worker, f"was lost ({type(err).__name__})") from err
        except ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, KeyError):  # restarted and not reloaded yet
                raise WorkerLost(request.worker, "has not loaded its replicas (restarted)") from err
            raise
