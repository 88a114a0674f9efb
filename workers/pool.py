"""ExpertPool: the one owner of Ray calls that create, load and kill expert shard workers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import ray

from cluster.config import WorkersConfig
from cluster.placement import Placement
from workers.weights import WeightSource
from workers.worker import ExpertWorker

LOAD_CHUNK_SLOTS = 4  # experts per load call: bounds memory per call and paces the progress bar


def worker_name(model_name: str, index: int) -> str:
    """Actor name as it reads in the Ray dashboard, e.g. `mixtral-worker-03`."""
    return f"{model_name}-worker-{index:02d}"


class ExpertPool:
    """Creates the expert shard actors for one model, loads a placement into them, kills them."""

    def __init__(self, model_name: str, weights: WeightSource, config: WorkersConfig, namespace: str):
        self.model_name = model_name
        self.namespace = namespace
        self._weights = weights
        self._config = config
        self.handles: list[ray.actor.ActorHandle] = []
        self._nodes: list[str] = []

    def __repr__(self) -> str:
        return f"ExpertPool(model={self.model_name!r}, workers={len(self.handles)})"

    def gpus_per_worker(self) -> float:
        setting = self._config.num_gpus
        if setting == "auto":
            return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        return float(setting)

    def start(self, num_workers: int) -> list[dict]:
        """Create `num_workers` actors and wait until each answers; returns their `ready()` info."""
        actor_cls = ray.remote(ExpertWorker)
        num_gpus = self.gpus_per_worker()
        for index in range(num_workers):
            handle = actor_cls.options(
                name=worker_name(self.model_name, index),
                namespace=self.namespace,
                num_cpus=self._config.num_cpus,
                num_gpus=num_gpus,
                max_concurrency=1,
            ).remote(index, self._weights, self._config.torch_threads, self._config.device)
            self.handles.append(handle)
        infos = ray.get([h.ready.remote() for h in self.handles])
        self._nodes = [info["node_id"] for info in infos]
        return infos

    def load(self, placement: Placement, progress: Callable[[int, int], None] | None = None) -> int:
        """Load every worker's replicas of `placement`, in chunks, workers in parallel.

        `progress(done, total)` is called in experts after each chunk. Returns bytes loaded.
        """
        if placement.num_workers != len(self.handles):
            raise ValueError(
                f"placement v{placement.version} has {placement.num_workers} workers, "
                f"the pool has {len(self.handles)}"
            )
        queues = {w: [e for _, e in placement.experts_of(w)] for w in range(placement.num_workers)}
        total = sum(len(q) for q in queues.values())
        done = loaded = 0
        pending: dict[ray.ObjectRef, tuple[int, int]] = {}

        def submit(worker: int) -> None:
            chunk, queues[worker] = queues[worker][:LOAD_CHUNK_SLOTS], queues[worker][LOAD_CHUNK_SLOTS:]
            if chunk:
                pending[self.handles[worker].load.remote(chunk)] = (worker, len(chunk))

        for worker in queues:
            submit(worker)
        if progress:
            progress(0, total)
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            worker, count = pending.pop(ref)
            loaded += ray.get(ref)
            done += count
            if progress:
                progress(done, total)
            submit(worker)
        return loaded

    async def load_replicas(self, worker: int, experts: list[int], copy_from: dict[int, int]) -> int:
        """Load `experts` into `worker`: copied from a live replica through the object store
        where `copy_from` names a source worker, else read from the weight source."""
        target = self.handles[worker]
        calls = [
            target.load_from.remote(e, self.handles[src].export.remote(e)) for e, src in copy_from.items()
        ]
        fresh = [e for e in experts if e not in copy_from]
        if fresh:
            calls.append(target.load.remote(fresh))
        return sum(await asyncio.gather(*calls))

    async def release_replicas(self, worker: int, experts: list[int]) -> None:
        await self.handles[worker].unload.remote(experts)

    def worker_nodes(self) -> list[str]:
        """`[W]` the Ray node id each worker runs on (for node-aware placement)."""
        return list(self._nodes)

    async def stats_async(self) -> list[dict]:
        """Each worker's `stats()` plus its node id, without blocking the event loop."""
        stats = await asyncio.gather(*(h.stats.remote() for h in self.handles))
        return [{**s, "node_id": self._nodes[i]} for i, s in enumerate(stats)]

    def stats(self) -> list[dict]:
        return ray.get([h.stats.remote() for h in self.handles])

    def shutdown(self) -> None:
        for handle in self.handles:
            ray.kill(handle, no_restart=True)
        self.handles = []
