"""The expert shard worker: a Ray actor that hosts replicas of logical experts in slots.

The class is plain Python so it can be unit tested without Ray; `workers.pool.ExpertPool`
turns it into an actor (one per GPU where the cluster has GPUs, on CPU otherwise).
"""

from __future__ import annotations

import os
import time
import warnings

import numpy as np
import torch

from cluster.model_spec import ModelSpec
from workers.expert_math import fuse_w13, run_slots
from workers.weights import WeightSource

# Arrays that arrive through Ray's object store are read-only views; we only read them.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


class ExpertWorker:
    """Hosts expert replicas in slots and runs them on the tokens the router sends.

    A slot holds `(w13 [2F, H], w2 [H, F])` of one logical expert (global id
    `moe_index * num_experts + e`, see `cluster.placement`).
    """

    def __init__(self, index: int, weights: WeightSource, torch_threads: int = 1, device: str = "auto"):
        torch.set_num_threads(torch_threads)
        self.index = index
        self.spec: ModelSpec = weights.spec
        self._weights = weights
        self.device = torch.device(_pick_device(device))
        self._slots: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}
        self._tokens = 0
        self._busy_s = 0.0
        self._calls = 0

    def __repr__(self) -> str:
        return (
            f"ExpertWorker(index={self.index}, slots={len(self._slots)}, device={self.device}, "
            f"pid={os.getpid()})"
        )

    def ready(self) -> dict:
        """Cheap call the pool uses to wait for the actor to start."""
        return {"index": self.index, "device": str(self.device), "pid": os.getpid()}

    def load(self, assignments: list[tuple[int, int]]) -> int:
        """Load `[(slot, logical expert)]` from the weight source; returns bytes loaded."""
        E = self.spec.num_experts
        slots_of: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for slot, logical in assignments:  # an expert may fill several slots: read it once
            slots_of.setdefault((self.spec.moe_layers[logical // E], logical % E), []).append((slot, logical))
        loaded = 0
        for pair, w in self._weights.experts(list(slots_of)):
            w13 = fuse_w13(w.w1, w.w3).to(self.device)
            w2 = w.w2.contiguous().to(self.device)
            for slot, logical in slots_of[pair]:
                self._slots[slot] = (logical, w13, w2)
                loaded += (w13.numel() + w2.numel()) * w13.element_size()
        return loaded

    def unload(self, slots: list[int]) -> None:
        for slot in slots:
            self._slots.pop(slot, None)

    def hosted(self) -> dict[int, int]:
        """`{slot: logical expert}` currently loaded."""
        return {slot: entry[0] for slot, entry in self._slots.items()}

    def forward(
        self,
        x: np.ndarray,
        slot_ids: np.ndarray,
        offsets: np.ndarray,
        token_idx: np.ndarray,
        weights: np.ndarray,
    ) -> np.ndarray:
        """Run this worker's share of one batch.

        x: `[T, H]` float32, the whole batch (shared by all workers through the object store);
        slot_ids: `[S]`; offsets: `[S + 1]`; token_idx: `[N]` rows of x, grouped by slot;
        weights: `[N]` gate weights. Returns `[N, H]` float32: gate-weighted expert outputs.
        """
        start = time.perf_counter()
        missing = [int(s) for s in slot_ids if int(s) not in self._slots]
        if missing:
            raise KeyError(f"worker {self.index} has no replica loaded in slots {missing}")
        experts = [self._slots[int(s)][1:] for s in slot_ids]
        out = run_slots(
            torch.from_numpy(x).to(self.device),
            experts,
            torch.from_numpy(offsets),
            torch.from_numpy(token_idx).to(self.device),
            torch.from_numpy(weights).to(self.device),
        )
        self._calls += 1
        self._tokens += int(token_idx.shape[0])
        self._busy_s += time.perf_counter() - start
        return out.cpu().numpy()

    def stats(self) -> dict:
        return {
            "index": self.index,
            "slots": len(self._slots),
            "calls": self._calls,
            "tokens": self._tokens,
            "busy_s": self._busy_s,
        }


def _pick_device(device: str) -> str:
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"
