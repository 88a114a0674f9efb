"""ModelRouter: one served model as the gRPC and HTTP edges see it: its spec, its request batcher
in front of the distributed MoE layer (the layer API), its text model when it generates (whose
MoE layers go through the same distributed layer), and the routed load both have counted, which
the control plane collects with `take_report`."""

from __future__ import annotations

import time
from collections import deque
from typing import Protocol

import numpy as np
import torch

from cluster.config import RouterConfig
from cluster.model_spec import ModelSpec
from cluster.planning.load_stats import RouterReport
from router_service.batcher import Batcher, RequestResult
from router_service.errors import ServingError
from router_service.generation.text import TextModel
from router_service.moe_layer import DistributedMoELayer, LayerOutput
from router_service.skipping import check_threshold

SERVING_WINDOW_S = 10.0  # a worker that got a share within this long counts as serving


class SkipMetrics(Protocol):
    """Where skipped expert-tokens are counted (`cluster.control.metrics.RouterMetrics`)."""

    def skipped(self, model: str, layer: int, expert_tokens: int) -> None: ...


class ModelRouter:
    """Routes one model's requests and counts the routed load.

    expert_tokens: `[num_moe_layers, E]` tokens routed since start (sent to the experts: what
    expert skipping dropped is no load). `take_report` hands the counts since the previous report
    (and the queue delays seen) to the control plane, which keeps the sliding window that
    rebalancing and autoscaling decide on.
    expert_skip_threshold: the model's expert skipping (`router_service.skipping`; 0: off), for
    requests that do not set their own; skipped_expert_tokens: `[num_moe_layers]` (token,
    expert) assignments dropped since start, also counted in `skip_metrics` when set.
    """

    MAX_DELAY_SAMPLES = 512  # queue delays kept between two reports (the latest ones)

    def __init__(self, name: str, layer: DistributedMoELayer, config: RouterConfig, router_id: str = "router",
                 expert_skip_threshold: float = 0.0):
        """config: the router's section (batching and admission keys); expert_skip_threshold:
        `model.expert_skip_threshold`."""
        self.name = name
        self.expert_skip_threshold = check_threshold(expert_skip_threshold, "model.expert_skip_threshold")
        self.router_id = router_id
        self.spec: ModelSpec = layer.spec
        self.ready = False  # serves requests
        self.draining = False  # leaving service: still serves, but tells readiness probes no
        self.expert_tokens = np.zeros((self.spec.num_moe_layers, self.spec.num_experts), dtype=np.int64)
        self._reported = self.expert_tokens.copy()
        self.skipped_expert_tokens = np.zeros(self.spec.num_moe_layers, dtype=np.int64)
        self.skip_metrics: SkipMetrics | None = None
        self._queue_delays: deque[float] = deque(maxlen=self.MAX_DELAY_SAMPLES)
        self.batches_served = 0
        self._layer = layer
        self._batcher = Batcher(self._forward, config, model=name)
        self.text: TextModel | None = None  # set when the model generates text

    def __repr__(self) -> str:
        return f"ModelRouter(name={self.name!r}, ready={self.ready}, draining={self.draining})"

    @property
    def reports_ready(self) -> bool:
        """What `ServerReady` / `ModelReady` say: serving, and not draining."""
        return self.ready and not self.draining

    async def _forward(self, layer: int, hidden: torch.Tensor, groups: np.ndarray | None = None,
                       thresholds: torch.Tensor | None = None) -> LayerOutput:
        out = await self._layer.forward(layer, hidden, groups, thresholds)
        moe_index = self.spec.moe_index(layer)
        self.expert_tokens[moe_index] += out.expert_tokens
        if out.skipped_expert_tokens:
            self.skipped_expert_tokens[moe_index] += out.skipped_expert_tokens
            if self.skip_metrics is not None:
                self.skip_metrics.skipped(self.name, layer, out.skipped_expert_tokens)
        self.batches_served += 1
        return out

    async def moe(self, layer: int, hidden: torch.Tensor, groups: np.ndarray | None = None,
                  thresholds: torch.Tensor | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor | None, ServingError | None]:
        """One MoE layer of a generation step, `[N, H]` (any device and float dtype; `groups`:
        `[N]` the sequence of each token; `thresholds`: `[N]` each token's expert skip threshold,
        None: no skipping) -> its output `[N, H]` float32 on the CPU, the tokens that could not
        be served (`[N]` bool, or None) and why. Counted as routed load like the layer API's
        requests."""
        out = await self._forward(layer, hidden.detach().to(device="cpu", dtype=torch.float32).contiguous(), groups,
                                  thresholds)
        failed = None if out.failed is None else torch.from_numpy(out.failed)
        return out.hidden, failed, out.failure

    async def infer(self, layer: int, hidden: torch.Tensor, expert_skip_threshold: float | None = None) -> RequestResult:
        """hidden: `[t, H]` float32, already checked against the spec; expert_skip_threshold: the
        request's own (already checked), None: the model's."""
        threshold = self.expert_skip_threshold if expert_skip_threshold is None else expert_skip_threshold
        result = await self._batcher.submit(layer, hidden, threshold)
        self._queue_delays.append(result.queued_s)
        return result

    @property
    def queued_tokens(self) -> int:
        """Tokens waiting for a batch now."""
        return self._batcher.queued_tokens

    def outstanding_tokens_now(self) -> np.ndarray:
        """`[W]` tokens each worker has in hand (queued or running) from this router."""
        return self._layer.outstanding.copy()

    def take_report(self) -> RouterReport:
        """The routed tokens and queue delays since the previous call."""
        counts = self.expert_tokens.copy()
        delta, self._reported = counts - self._reported, counts
        delays = tuple(self._queue_delays)
        self._queue_delays.clear()
        lost, hung = (tuple(sorted(pairs, key=lambda pair: (pair[0], pair[1] or "")))
                      for pairs in (self._layer.lost_workers, self._layer.hung_workers))
        self._layer.lost_workers, self._layer.hung_workers = set(), set()
        generation = self.text.engine.take_load() if self.text is not None else None
        routable, serving = self._layer.worker_view(time.monotonic(), SERVING_WINDOW_S)
        return RouterReport(self.router_id, delta, delays, self._batcher.oldest_queued_s(),
                            self.outstanding_tokens_now(), lost, generation, routable, serving, hung)

    async def close(self) -> None:
        self.ready = False
        if self.text is not None:
            await self.text.close()
        await self._batcher.close()
