"""ExpertPool: the one owner of Ray calls that create, load and kill expert shard workers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import ray

from cluster.config import WorkersConfig
from cluster.placement import Placement, WorkerRef
from workers.weights import WeightSource
from workers.worker import CONTROL_GROUP, ExpertWorker

LOAD_CHUNK_SLOTS = 4  # experts per load call: bounds memory per call and paces the progress bar


def worker_name(model_name: str, index: int) -> str:
    """Actor name as it reads in the Ray dashboard, e.g. `mixtral-worker-03`."""
    return f"{model_name}-worker-{index:02d}"


def spare_name(model_name: str, number: int) -> str:
    """A warm spare's actor name, e.g. `mixtral-spare-00`; it keeps it once it takes a worker's place."""
    return f"{model_name}-spare-{number:02d}"


SPARE = -1  # the index a warm spare answers with until it takes a worker's place


class ExpertPool:
    """Creates the expert shard actors for one model, loads a placement into them, kills them,
    and asks Ray's autoscaler for the nodes they need."""

    def __init__(self, model_name: str, weights: WeightSource, config: WorkersConfig, namespace: str,
                 worker_cls: type[ExpertWorker] = ExpertWorker, detached: bool = False):
        """detached: the workers outlive the process that creates them (`moe-serve deploy`: a
        controller that dies and comes back finds them serving, `adopt`)."""
        self.model_name = model_name
        self._detached = detached
        self._worker_cls = worker_cls  # a subclass only to inject faults in tests
        self.namespace = namespace
        self._weights = weights
        self._config = config
        self.handles: list[ray.actor.ActorHandle] = []
        self.spares: list[ray.actor.ActorHandle] = []  # started, torch imported, no replicas
        self._spares_made = 0
        self._nodes: list[str] = []
        self._incarnations: list[str] = []  # what each worker's `ready()` said when it was loaded
        self._num_gpus: float | None = None
        self.pending = 0  # workers asked for that are not serving yet

    def __repr__(self) -> str:
        return f"ExpertPool(model={self.model_name!r}, workers={len(self.handles)}, pending={self.pending})"

    def gpus_per_worker(self) -> float:
        """Fixed at the first call, so workers added later match the first ones."""
        if self._num_gpus is None:
            setting = self._config.num_gpus
            if setting == "auto":
                self._num_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
            else:
                self._num_gpus = float(setting)
        return self._num_gpus

    def worker_bundle(self) -> dict[str, float]:
        """The resources one worker reserves (what Ray's autoscaler must find a node for)."""
        bundle = {"CPU": self._config.num_cpus, "GPU": self.gpus_per_worker(), **self._config.resources}
        return {k: float(v) for k, v in bundle.items() if v > 0}

    def _create(self, index: int, name: str | None = None) -> ray.actor.ActorHandle:
        """A worker actor (a warm spare with `index` SPARE). Ray restarts it where it dies (on
        another node if its node is lost); it comes back empty, and the supervisor reloads it."""
        return ray.remote(concurrency_groups={CONTROL_GROUP: 1})(self._worker_cls).options(
            name=name or worker_name(self.model_name, index),
            namespace=self.namespace,
            num_cpus=self._config.num_cpus,
            num_gpus=self.gpus_per_worker(),
            resources=dict(self._config.resources),
            max_concurrency=1,
            scheduling_strategy="SPREAD" if self._config.spread else "DEFAULT",
            max_restarts=-1,
            max_task_retries=0,  # the router retries elsewhere, boundedly: never a crash loop
            lifetime="detached" if self._detached else None,
        ).remote(index, self._weights, self._config.torch_threads, self._config.device, self._config.compute_dtype)

    def start(self, num_workers: int) -> list[dict]:
        """Create `num_workers` actors and wait until each answers; returns their `ready()` info."""
        self.handles.extend(self._create(index) for index in range(len(self.handles), num_workers))
        infos = ray.get([h.ready.remote() for h in self.handles])
        self._nodes = [info["node_id"] for info in infos]
        self._incarnations = [info["incarnation"] for info in infos]
        return infos

    async def adopt(self, count: int, timeout_s: float = 30.0) -> list[dict]:
        """Take over the model's actors that already run (a controller that came back): the ones
        answering as workers `0 .. count-1` (a spare that took a place answers with that index),
        the spares; workers beyond `count` (a scale-out cut short) are stopped. Returns the
        workers' `ready()` info, with what each hosts."""
        found = {}
        for name in self._own_actor_names():
            handle = ray.get_actor(name, namespace=self.namespace)
            try:
                found[name] = (handle, await asyncio.wait_for(handle.ready.remote(), timeout_s))
            except (asyncio.TimeoutError, ray.exceptions.RayActorError):
                ray.kill(handle, no_restart=True)  # neither serving nor spare: gone
        by_index = {info["index"]: handle for handle, info in found.values()}
        missing = [i for i in range(count) if i not in by_index]
        spares = [(name, handle) for name, (handle, info) in found.items() if info["index"] == SPARE]
        if len(missing) > len(spares):
            raise RuntimeError(f"workers {missing} of {count} do not run; the deployment cannot be taken over")
        for index, (name, handle) in zip(missing, spares):  # e.g. a worker Ray restarted as the spare it was made
            await handle.assign.remote(index)
            by_index[index] = handle
            found[name] = (handle, {**found[name][1], "index": index})
        for handle, info in found.values():
            if info["index"] >= count:
                ray.kill(handle, no_restart=True)
        self.handles = [by_index[i] for i in range(count)]
        self.spares = [handle for handle, info in found.values() if info["index"] == SPARE]  # the ones left
        self._spares_made = 1 + max((int(n.rsplit("-", 1)[1]) for n in found if "-spare-" in n), default=-1)
        infos = [info for i in range(count) for handle, info in found.values() if handle is by_index[i]]
        hosted = await asyncio.gather(*(h.hosted.remote() for h in self.handles))
        self._nodes = [info["node_id"] for info in infos]
        self._incarnations = [info["incarnation"] for info in infos]
        return [{**info, "hosted": experts} for info, experts in zip(infos, hosted)]

    def _own_actor_names(self) -> list[str]:
        prefixes = (f"{self.model_name}-worker-", f"{self.model_name}-spare-")
        return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                      if a["namespace"] == self.namespace and a["name"].startswith(prefixes))

    async def add_workers(self, count: int, timeout_s: float) -> list[dict]:
        """Create `count` more workers (indices after the last) and wait until they answer.

        Workers that get no node within `timeout_s` are killed; the ones that came up are kept
        (and returned, with their `ready()` info), so a partial scale-out still counts.
        """
        first = len(self.handles)
        created = [await self._create_when_free(first + i) for i in range(count)]
        self.pending += count
        try:
            refs = [h.ready.remote() for h in created]
            done, _ = await asyncio.to_thread(ray.wait, refs, num_returns=len(refs), timeout=timeout_s)
        finally:
            self.pending -= count
        up = [ref in done for ref in refs]
        kept = created[: up.index(False)] if False in up else created  # indices stay contiguous
        for handle in created[len(kept):]:
            ray.kill(handle, no_restart=True)
        infos = [await ref for ref in refs[: len(kept)]]
        self.handles.extend(kept)
        self._nodes.extend(info["node_id"] for info in infos)
        self._incarnations.extend(info["incarnation"] for info in infos)
        return infos

    async def _create_when_free(self, index: int, timeout_s: float = 30.0) -> ray.actor.ActorHandle:
        """Create worker `index`; a just-killed worker of that index may hold its name a moment."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self._create(index)
            except ValueError:  # "the name ... is already taken"
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    # ---- warm spares: a lost worker's place taken in well under a second ------------------------

    def start_spares(self) -> None:
        """Start spares until `workers.spares` run (without waiting for them to answer)."""
        while len(self.spares) < self._config.spares:
            self.spares.append(self._create(SPARE, spare_name(self.model_name, self._spares_made)))
            self._spares_made += 1

    async def swap_in_spare(self, worker: int, timeout_s: float = 1.0) -> dict | None:
        """Put a live spare in `worker`'s place (the old actor is killed); its `ready()` info,
        or None when no spare answers within `timeout_s`. Load its replicas next."""
        while self.spares:
            spare = self.spares.pop(0)
            try:
                info = await asyncio.wait_for(spare.ready.remote(), timeout_s)
            except (asyncio.TimeoutError, ray.exceptions.RayActorError):
                ray.kill(spare, no_restart=True)
                continue
            await spare.assign.remote(worker)
            ray.kill(self.handles[worker], no_restart=True)
            self.handles[worker] = spare
            self._incarnations[worker] = info["incarnation"]
            self._nodes[worker] = info["node_id"]
            self.start_spares()  # a new spare for the next loss
            return info
        self.start_spares()
        return None

    def remove_workers(self, count: int) -> None:
        """Kill the last `count` workers (their replicas must have been moved away)."""
        if not 0 < count < len(self.handles):
            raise ValueError(f"can remove 1..{len(self.handles) - 1} of {len(self.handles)} workers, not {count}")
        for handle in self.handles[-count:]:
            ray.kill(handle, no_restart=True)
        del self.handles[-count:]
        del self._nodes[-count:]
        del self._incarnations[-count:]

    def request_capacity(self, workers: int) -> None:
        """Ask Ray's autoscaler for room for `workers` workers and the spares in all (a standing
        request that replaces the previous one): it launches nodes for more, and may reclaim idle
        ones when fewer are asked for. Without an autoscaler this changes nothing."""
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[self.worker_bundle()] * (workers + self._config.spares))

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

    async def probe(self, timeout_s: float) -> list[dict | None]:
        """Each worker's `ready()` now, None where it does not answer within `timeout_s` (dead,
        restarting, or its node lost). Answers come from the control concurrency group, so a
        busy worker is not taken for a lost one."""
        refs = [h.ready.remote() for h in self.handles]
        done, _ = await asyncio.to_thread(ray.wait, refs, num_returns=len(refs), timeout=timeout_s)
        done = set(done)
        infos: list[dict | None] = []
        for ref in refs:
            try:
                infos.append(await ref if ref in done else None)
            except ray.exceptions.RayActorError:
                infos.append(None)
        return infos

    def restart(self, worker: int) -> None:
        """Kill a hung worker's process; Ray starts it again (empty: it is reloaded once it
        answers as its new incarnation)."""
        ray.kill(self.handles[worker], no_restart=False)

    def restarted(self, worker: int, info: dict) -> bool:
        """Whether `info` (from `probe`) comes from a new incarnation of `worker`: Ray
        restarted it, and it holds none of its replicas."""
        return info["incarnation"] != self._incarnations[worker]

    async def reload(self, worker: int, info: dict, experts: list[int], copy_from: dict[int, int]) -> int:
        """Load a restarted worker's replicas again; from now on `info` is its incarnation."""
        await self.handles[worker].assign.remote(worker)  # a spare that took the place came back as one
        loaded = await self.load_replicas(worker, experts, copy_from)
        self._incarnations[worker] = info["incarnation"]
        self._nodes[worker] = info["node_id"]
        return loaded

    @property
    def refs(self) -> list[WorkerRef]:
        """Each worker's handle with the incarnation it was loaded as (what routers get)."""
        return [WorkerRef(h, i) for h, i in zip(self.handles, self._incarnations)]

    def incarnation(self, worker: int) -> str:
        return self._incarnations[worker]

    def worker_nodes(self) -> list[str]:
        """`[W]` the Ray node id each worker runs on (for node-aware placement)."""
        return list(self._nodes)

    async def stats_async(self, timeout_s: float = 2.0) -> list[dict]:
        """Each worker's `stats()` plus its node id, without blocking the event loop. A worker
        that does not answer within `timeout_s` (lost, restarting) reads as zeros, `down`."""

        async def one(index: int, handle) -> dict:
            try:
                return {**await asyncio.wait_for(handle.stats.remote(), timeout_s), "down": False}
            except (asyncio.TimeoutError, ray.exceptions.RayActorError):
                return {"index": index, "replicas": 0, "weight_bytes": 0, "calls": 0, "tokens": 0, "busy_s": 0.0,
                        "expert_tokens": {}, "down": True}

        stats = await asyncio.gather(*(one(i, h) for i, h in enumerate(self.handles)))
        return [{**s, "node_id": self._nodes[i]} for i, s in enumerate(stats)]

    def stats(self) -> list[dict]:
        return ray.get([h.stats.remote() for h in self.handles])

    def shutdown(self) -> None:
        for handle in [*self.handles, *self.spares]:
            ray.kill(handle, no_restart=True)
        self.handles, self.spares = [], []
        self._nodes = []
        self._incarnations = []
