"""The service's metrics, through `ray.util.metrics`: they reach each node's Prometheus endpoint
(as `ray_<name>`) and the Ray dashboard's metrics views, and `deploy/grafana-moe-serve.json`
charts them.

Every name starts with `moe_serve_`; labels are bounded: model, gRPC status code, MoE layer,
worker index, and (layer, expert) only while a model has at most `expert_series` logical
experts; beyond that the hottest `top_n` are exported by rank. No label is per request.

`RouterMetrics` is recorded by the router (request count by status, latency, tokens, queue);
`ControlMetrics` by the control plane (balancedness, per-expert load and replicas, per-worker
load, workers, rebalance and scaling events). `METRICS` lists every exported name.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from ray.util.metrics import Counter, Gauge, Histogram

PREFIX = "moe_serve_"
LATENCY_BOUNDARIES_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
DURATION_BOUNDARIES_S = [0.01, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900]

# name -> (kind, description, labels); the one list the exporters, the dashboard and the tests share
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "requests": ("counter", "inference requests finished, by gRPC status code", ("model", "code")),
    "request_latency_s": ("histogram", "inference request latency in seconds, as the router sees it", ("model",)),
    "tokens": ("counter", "tokens served (rate: tokens/s)", ("model",)),
    "queue_tokens": ("gauge", "tokens waiting in the router's batch queue", ("model",)),
    "balancedness": ("gauge", "mean / max worker load of the placement in service, per MoE layer", ("model", "layer")),
    "expert_tokens_per_s": ("gauge", "routed expert-tokens per second per logical expert (small models)", ("model", "layer", "expert")),
    "expert_replicas": ("gauge", "replicas per logical expert (small models)", ("model", "layer", "expert")),
    "hot_expert_tokens_per_s": ("gauge", "routed expert-tokens per second of the rank-th hottest logical expert", ("model", "rank")),
    "hot_expert_replicas": ("gauge", "replicas of the rank-th hottest logical expert", ("model", "rank")),
    "hot_expert_id": ("gauge", "which logical expert (moe_index * experts + e) is the rank-th hottest", ("model", "rank")),
    "worker_tokens_per_s": ("gauge", "expert-tokens per second a worker computed", ("model", "worker")),
    "worker_busy_fraction": ("gauge", "share of time a worker spent computing", ("model", "worker")),
    "worker_queue_tokens": ("gauge", "tokens a worker has in hand (queued or running)", ("model", "worker")),
    "workers": ("gauge", "expert shard workers, serving or pending (asked for, no node yet)", ("model", "state")),
    "placement_version": ("gauge", "version of the placement in service", ("model",)),
    "rebalances": ("counter", "rebalance decisions that moved replicas or were skipped, by kind", ("model", "kind")),
    "rebalance_duration_s": ("histogram", "seconds a live rebalance took", ("model",)),
    "rebalance_bytes": ("counter", "expert weight bytes moved by rebalancing", ("model",)),
    "scale_events": ("counter", "worker count changes (and failed attempts), by action and trigger", ("model", "action", "trigger")),
    "scale_duration_s": ("histogram", "seconds a scaling action took", ("model", "action")),
    "worker_events": ("counter", "workers lost and reloaded, and placement repairs, by kind", ("model", "kind")),
}


def exported_name(name: str) -> str:
    """The name on Ray's Prometheus endpoint (Ray prefixes `ray_`)."""
    return f"ray_{PREFIX}{name}"


def _make(name: str):
    kind, description, labels = METRICS[name]
    full = PREFIX + name
    if kind == "counter":
        return Counter(full, description, tag_keys=labels)
    if kind == "gauge":
        return Gauge(full, description, tag_keys=labels)
    boundaries = LATENCY_BOUNDARIES_S if name == "request_latency_s" else DURATION_BOUNDARIES_S
    return Histogram(full, description, boundaries=boundaries, tag_keys=labels)


class RouterMetrics:
    """What one router process records; `record_request` is called once per finished request."""

    def __init__(self, models: Sequence[str]):
        self._models = set(models)
        self._requests = _make("requests")
        self._latency = _make("request_latency_s")
        self._tokens = _make("tokens")
        self._queue = _make("queue_tokens")

    def record_request(self, model: str, code: str, latency_s: float, tokens: int) -> None:
        label = model if model in self._models else "(unknown)"  # a client's typo is not a new series
        self._requests.inc(1, tags={"model": label, "code": code})
        if code == "OK":
            self._latency.observe(latency_s, tags={"model": label})
            if tokens > 0:
                self._tokens.inc(tokens, tags={"model": label})

    def queue(self, model: str, tokens: int) -> None:
        self._queue.set(tokens, tags={"model": model})


class ControlMetrics:
    """What the control plane of one model records after each look at the load."""

    def __init__(self, model: str, layers: Sequence[int], num_experts: int, expert_series: int = 256, top_n: int = 16):
        self.model = model
        self._layers = list(layers)
        self._num_experts = num_experts
        self._per_expert = len(self._layers) * num_experts <= expert_series
        self._top_n = top_n
        self._worker_series: set[int] = set()
        self._gauges = {name: _make(name) for name, (kind, _, _) in METRICS.items()
                        if kind == "gauge" and name not in ("queue_tokens",)}
        self._rebalances = _make("rebalances")
        self._rebalance_s = _make("rebalance_duration_s")
        self._rebalance_bytes = _make("rebalance_bytes")
        self._scales = _make("scale_events")
        self._scale_s = _make("scale_duration_s")
        self._worker_events = _make("worker_events")

    def _set(self, name: str, value: float, **labels) -> None:
        self._gauges[name].set(float(value), tags={"model": self.model, **{k: str(v) for k, v in labels.items()}})

    def load(self, tokens_per_s: np.ndarray, replicas: np.ndarray, balancedness: np.ndarray, version: int) -> None:
        """tokens_per_s: `[L, E]`; replicas: `[L * E]` replica counts; balancedness: `[L]`."""
        for layer, value in zip(self._layers, balancedness):
            self._set("balancedness", value, layer=layer)
        self._set("placement_version", version)
        flat = np.asarray(tokens_per_s, dtype=np.float64).reshape(-1)
        if self._per_expert:
            for g, (rate, count) in enumerate(zip(flat, replicas)):
                layer, expert = self._layers[g // self._num_experts], g % self._num_experts
                self._set("expert_tokens_per_s", rate, layer=layer, expert=expert)
                self._set("expert_replicas", count, layer=layer, expert=expert)
            return
        for rank, g in enumerate(np.argsort(-flat, kind="stable")[: self._top_n]):
            self._set("hot_expert_tokens_per_s", flat[g], rank=rank)
            self._set("hot_expert_replicas", replicas[g], rank=rank)
            self._set("hot_expert_id", g, rank=rank)

    def workers(self, serving: int, pending: int, per_worker: Sequence[dict]) -> None:
        """per_worker: dicts with `index, tokens_per_s, busy_fraction, outstanding_tokens`."""
        self._set("workers", serving, state="serving")
        self._set("workers", pending, state="pending")
        now = {int(w["index"]) for w in per_worker}
        for gone in self._worker_series - now:  # a removed worker's series read 0, not its last value
            for name in ("worker_tokens_per_s", "worker_busy_fraction", "worker_queue_tokens"):
                self._set(name, 0.0, worker=gone)
        self._worker_series = now
        for w in per_worker:
            self._set("worker_tokens_per_s", w["tokens_per_s"], worker=w["index"])
            self._set("worker_busy_fraction", w["busy_fraction"], worker=w["index"])
            self._set("worker_queue_tokens", w["outstanding_tokens"], worker=w["index"])

    def rebalance(self, kind: str, duration_s: float, bytes_moved: int) -> None:
        tags = {"model": self.model}
        self._rebalances.inc(1, tags={**tags, "kind": kind})
        if kind != "skipped":
            self._rebalance_s.observe(duration_s, tags=tags)
            if bytes_moved > 0:  # Ray's counters take only positive steps
                self._rebalance_bytes.inc(bytes_moved, tags=tags)

    def worker_event(self, kind: str, workers: int) -> None:
        self._worker_events.inc(max(1, workers), tags={"model": self.model, "kind": kind})

    def scale(self, action: str, trigger: str, duration_s: float) -> None:
        self._scales.inc(1, tags={"model": self.model, "action": action, "trigger": trigger})
        self._scale_s.observe(duration_s, tags={"model": self.model, "action": action})
