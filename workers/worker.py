"""The expert shard worker: a Ray actor that hosts replicas of logical experts in slots.

The class is plain Python so it can be unit tested without Ray; `workers.pool.ExpertPool`
turns it into an actor (one per GPU where the cluster has GPUs, on CPU otherwise).
"""

from __future__ import annotations

import os
import time
import uuid
import warnings
from collections import deque

import numpy as np
import ray
import torch

from cluster.model_spec import ModelSpec
from cluster.placement import ExpertShare
from workers import precision, quant
from workers.expert_math import HeldExpert, run_experts
from workers.weights import WeightSource

# Arrays that arrive through Ray's object store are read-only views; we only read them.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


CONTROL_GROUP = "control"  # health, stats and skip calls, served beside the expert math
MAX_SKIPS = 4096  # skipped call ids remembered


class ExpertWorker:
    """Hosts expert replicas and runs them on the tokens the router sends.

    Replicas are keyed by global logical expert id (`moe_index * experts_per_layer + e`, see
    `cluster.placement`); each is a `HeldExpert` (`w13 [2F, H]`, `w2 [H, F]`), held in the
    checkpoint's own precision (float32, BF16, FP16, or FP8 / MXFP4 with their scales). The math
    runs in `compute_dtype` (`workers.precision`); inputs and partial outputs stay float32. A
    worker holds at most one replica of a logical expert; during a migration it briefly holds
    new replicas beside old ones.
    """

    def __init__(self, index: int, weights: WeightSource, torch_threads: int = 1, device: str = "auto",
                 compute_dtype: str = "auto"):
        torch.set_num_threads(torch_threads)
        self._torch_threads = torch_threads
        self.index = index
        self._started_index = index  # what the repr shows (`assign` may change `index`)
        self.spec: ModelSpec = weights.spec
        self._weights = weights
        self.device = torch.device(_pick_device(device))
        flags = precision.cpu_flags() if self.device.type == "cpu" else ()
        self.compute_dtype = precision.compute_dtype(compute_dtype, self.spec.expert_dtype, self.device.type, flags)
        self._experts: dict[int, HeldExpert] = {}
        self._expert_tokens: dict[int, int] = {}
        self._tokens = 0
        self._busy_s = 0.0
        self._calls = 0
        self._skip: set[int] = set()  # calls nobody waits for any more (see `skip`)
        self._skip_order: deque[int] = deque()
        self._skipped = 0
        self._computing_since: float | None = None  # a share's math runs since then (time.monotonic)
        self.incarnation = uuid.uuid4().hex  # new each time Ray restarts the actor (empty again)

    def __repr__(self) -> str:
        # Ray records an actor's repr once, when the actor starts, and the dashboard shows that
        # forever: only what never changes in this process goes in (no replica count). The index
        # is the one it started with: a warm spare (index < 0) that takes a worker's place later
        # (`assign`) stays "started as a spare", as its actor name stays `<model>-spare-NN`.
        started = "started as a spare" if self._started_index < 0 else f"index={self._started_index}"
        return f"ExpertWorker({started}, device={self.device}, pid={os.getpid()})"

    @ray.method(concurrency_group=CONTROL_GROUP, enable_task_events=False)
    def ready(self) -> dict:
        """Cheap call to wait for the actor to start, and the supervisor's health probe: it runs
        beside `forward` (its own concurrency group), so a busy worker still answers. A new
        `incarnation` means Ray restarted the actor and it holds no replicas; `computing_s`: how
        long the share being computed has run (0: none), which tells a hung worker."""
        node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
        since = self._computing_since
        return {"index": self.index, "device": str(self.device), "pid": os.getpid(), "node_id": node_id,
                "incarnation": self.incarnation, "replicas": len(self._experts), "weight_bytes": self.weight_bytes(),
                "expert_dtype": self.spec.expert_dtype, "compute_dtype": str(self.compute_dtype).removeprefix("torch."),
                "computing_s": 0.0 if since is None else time.monotonic() - since}

    @ray.method(concurrency_group=CONTROL_GROUP, enable_task_events=False)
    def assign(self, index: int) -> None:
        """A warm spare takes over worker `index`'s place (its replicas are loaded next)."""
        self.index = int(index)

    def load(self, experts: list[int]) -> int:
        """Load replicas of logical experts `experts` from the weight source; returns bytes."""
        todo = sorted(set(int(g) for g in experts) - set(self._experts))
        pairs = [self.spec.layer_expert(g) for g in todo]
        loaded = 0
        for logical, (_, w) in zip(todo, self._weights.stored_experts(pairs)):
            self._install(logical, w.w1, w.w3, w.w2, w.biases)
            loaded += self._experts[logical].nbytes
        return loaded

    def load_from(self, logical: int, tensors: dict) -> int:
        """Install a replica from another worker's `export` (through the object store)."""
        w1, w3, w2 = (quant.from_wire(tensors[name]) for name in ("w1", "w3", "w2"))
        biases = tensors.get("biases")
        self._install(int(logical), w1, w3, w2, None if biases is None else tuple(torch.from_numpy(b) for b in biases))
        return self._experts[int(logical)].nbytes

    def export(self, logical: int) -> dict:
        """A hosted replica's weights, as stored, for `load_from` on another worker: each of
        w1, w3, w2 a numpy array (float32 / float16) or raw bytes with their dtype and shape
        (BF16, FP8 and MXFP4, which numpy has no type for; see `quant.to_wire`)."""
        expert = self._experts[int(logical)]
        w1, w3, w2 = expert.split()
        wire = {"w1": quant.to_wire(w1), "w3": quant.to_wire(w3), "w2": quant.to_wire(w2)}
        biases = expert.split_biases()
        if biases is not None:  # float32 b1, b3, b2 (gpt-oss)
            wire["biases"] = [b.cpu().numpy() for b in biases]
        return wire

    def _install(self, logical: int, w1, w3, w2, biases=None) -> None:
        self._experts[logical] = HeldExpert.of(w1, w3, w2, self.device, biases)
        self._expert_tokens.setdefault(logical, 0)

    def weight_bytes(self) -> int:
        """Bytes of the weights (and scales) of every replica held here."""
        return sum(e.nbytes for e in list(self._experts.values()))  # a copy: `stats` runs beside `load`

    def storage_bytes(self) -> int:
        """Bytes of the distinct tensor storages behind the replicas held here: what they keep
        allocated (a replica that were a view of something larger would count it whole)."""
        storages = {}
        for expert in self._experts.values():
            for t in expert.tensors():
                storage = t.untyped_storage()
                storages[(storage.device, storage.data_ptr())] = storage.nbytes()
        return sum(storages.values())

    def unload(self, experts: list[int]) -> None:
        for logical in experts:
            self._experts.pop(int(logical), None)
            self._expert_tokens.pop(int(logical), None)

    def hosted(self) -> list[int]:
        """Logical experts with a replica loaded here, sorted."""
        return sorted(self._experts)

    # The hot path and the probes keep no per-call task events in Ray's GCS (they would grow it
    # by an event per batch share, ~25 MiB/min under load); the metrics count them instead.
    @ray.method(enable_task_events=False)
    def forward(self, x: np.ndarray, share: ExpertShare, call_id: int | None = None) -> np.ndarray:
        """Run this worker's share of one batch.

        x: `[T, H]` float32, the whole batch (shared by all workers through the object store);
        share: which of this worker's logical experts get which rows of x, with what gate
        weight. Returns `[U, H]` float32: for each distinct token of `share.token_idx`
        (ascending), the sum of its gate-weighted expert outputs. A call the router gave up on
        (`skip(call_id)` came first) returns `[0, H]` at once.
        """
        if call_id is not None and call_id in self._skip:
            self._skip.discard(call_id)
            self._skipped += 1
            return np.zeros((0, x.shape[1]), dtype=np.float32)
        start = time.perf_counter()
        self._computing_since = time.monotonic()
        try:
            return self._compute(x, share, start)
        finally:
            self._computing_since = None

    @ray.method(enable_task_events=False)
    def forward_compiled(self, x: np.ndarray, work: tuple[int, ExpertShare] | None) -> np.ndarray | None:
        """`forward` as a step of the router's compiled graph, which runs on every worker of the
        graph for every batch: `work` is this worker's `(call_id, share)`, None when it has none."""
        if work is None:
            return None
        if torch.get_num_threads() != self._torch_threads:  # the graph's own thread: OpenMP's
            torch.set_num_threads(self._torch_threads)      # thread count is per thread
        return self.forward(x, work[1], work[0])

    def _compute(self, x: np.ndarray, share: ExpertShare, start: float) -> np.ndarray:
        expert_ids, offsets, token_idx = share.expert_ids, share.offsets, share.token_idx
        missing = [int(e) for e in expert_ids if int(e) not in self._experts]
        if missing:
            raise KeyError(f"worker {self.index} has no replica of logical experts {missing}")
        _, partial = run_experts(
            torch.from_numpy(x).to(self.device),
            [self._experts[int(e)] for e in expert_ids],
            torch.from_numpy(offsets),
            torch.from_numpy(token_idx).to(self.device),
            torch.from_numpy(share.weights).to(self.device),
            self.compute_dtype,
            self.spec.expert,
        )
        for e, n in zip(expert_ids.tolist(), np.diff(offsets).tolist()):
            self._expert_tokens[e] += n
        self._calls += 1
        self._tokens += int(token_idx.shape[0])
        self._busy_s += time.perf_counter() - start
        return partial.cpu().numpy()

    @ray.method(concurrency_group=CONTROL_GROUP, enable_task_events=False)
    def skip(self, call_id: int) -> None:
        """The router gave up on `forward` call `call_id` (its requests were cancelled or their
        deadline passed): if it has not started, it will not compute. Runs beside `forward`.
        (Not `ray.cancel`: cancelling queued tasks of an actor with concurrency groups left it
        hanging in Ray 2.60.)"""
        self._skip.add(int(call_id))
        self._skip_order.append(int(call_id))
        while len(self._skip_order) > MAX_SKIPS:  # calls that ran before their skip came
            self._skip.discard(self._skip_order.popleft())

    @ray.method(concurrency_group=CONTROL_GROUP, enable_task_events=False)
    def stats(self) -> dict:
        """Counters since start: calls, tokens, busy seconds, tokens per hosted replica; and the
        bytes the replicas' weights hold now."""
        return {
            "index": self.index,
            "replicas": len(self._experts),
            "weight_bytes": self.weight_bytes(),
            "calls": self._calls,
            "skipped": self._skipped,
            "tokens": self._tokens,
            "busy_s": self._busy_s,
            "expert_tokens": dict(self._expert_tokens),
        }


def _pick_device(device: str) -> str:
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"
