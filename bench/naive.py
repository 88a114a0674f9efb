"""The naive Ray baseline: what a first attempt at expert parallelism on Ray looks like.

The driver gates, gathers each worker's tokens per expert, sends each worker its tokens with
one actor call, `ray.get`s them all, then weights and combines. No batching across requests,
no shared object for the batch, no overlap.
"""

from __future__ import annotations

import numpy as np
import ray
import torch

from router_service.gate import route
from workers.expert_math import fuse_w13, swiglu
from workers.weights import WeightSource


@ray.remote
class NaiveWorker:
    def __init__(self, weights: WeightSource, pairs: list[tuple[int, int]], threads: int):
        torch.set_num_threads(threads)
        self._experts = {pair: (fuse_w13(w.w1, w.w3), w.w2.contiguous()) for pair, w in weights.experts(pairs)}

    def forward(self, layer: int, tokens_by_expert: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        return {
            e: swiglu(torch.from_numpy(x), *self._experts[(layer, e)]).numpy()
            for e, x in tokens_by_expert.items()
        }


class NaiveMoE:
    def __init__(self, weights: WeightSource, num_workers: int, threads: int):
        spec = self.spec = weights.spec
        if spec.num_shared_experts:
            raise ValueError("the naive baseline serves routed experts only; this model has shared experts")
        self._gates = {layer: weights.gate(layer) for layer in spec.moe_layers}
        self._owner = {e: e % num_workers for e in range(spec.num_experts)}
        self._workers = [
            NaiveWorker.options(num_cpus=0.5).remote(
                weights, [(layer, e) for layer in spec.moe_layers for e in range(spec.num_experts) if e % num_workers == w],
                threads,
            )
            for w in range(num_workers)
        ]

    def forward(self, layer: int, x: np.ndarray) -> np.ndarray:
        hidden = torch.from_numpy(x)
        routing = route(hidden, self._gates[layer], self.spec.gate, self.spec.top_k)
        per_worker: list[dict[int, np.ndarray]] = [{} for _ in self._workers]
        positions = {}
        for e in torch.unique(routing.topk_ids).tolist():
            tok, slot = (routing.topk_ids == e).nonzero(as_tuple=True)
            per_worker[self._owner[e]][e] = x[tok.numpy()]
            positions[e] = (tok, routing.topk_weights[tok, slot])
        results = ray.get([w.forward.remote(layer, chunk) for w, chunk in zip(self._workers, per_worker)])
        out = torch.zeros_like(hidden)
        for result in results:
            for e, y in result.items():
                tok, weight = positions[e]
                out.index_add_(0, tok, torch.from_numpy(y) * weight.unsqueeze(1))
        return out.numpy()

    def shutdown(self) -> None:
        for w in self._workers:
            ray.kill(w)
