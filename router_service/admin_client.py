"""A blocking Python client for the admin API (`moe.admin.v1.AdminService`).

Placements come back as `cluster.placement.Placement` values, the status as a dict (decoded
JSON); the other answers are the protobuf messages themselves (`LoadResponse`, `PlanResponse`,
`RebalanceEvent`). Errors are
`grpc.RpcError`s with the status the server chose (NOT_FOUND, INVALID_ARGUMENT, ...).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from cluster.placement import Placement
from protos import moe_admin_pb2 as admin_pb2
from protos import moe_admin_pb2_grpc as admin_pb2_grpc
from router_service.admin_servicer import placement_from_pb, placement_to_pb
from router_service.security import ClientCredentials

__all__ = ["AdminClient", "placement_from_pb", "placement_to_pb", "window_tokens", "tokens_per_s"]


def window_tokens(response: admin_pb2.LoadResponse) -> np.ndarray:
    """`[L, E]` int64 tokens routed per logical expert within the window."""
    return np.asarray(response.window_tokens, dtype=np.int64).reshape(len(response.layers), response.num_experts)


def tokens_per_s(response: admin_pb2.LoadResponse) -> np.ndarray:
    """`[L, E]` float64 tokens per second per logical expert over the window."""
    return np.asarray(response.tokens_per_s, dtype=np.float64).reshape(len(response.layers), response.num_experts)


class AdminClient:
    """Blocking client; safe to share between threads. `timeout_s` None: no deadline.
    `credentials`: TLS and a bearer token (an admin token) for a secured server."""

    def __init__(self, address: str, timeout_s: float | None = 60.0, credentials: ClientCredentials | None = None):
        self.address = address
        self.timeout_s = timeout_s
        self._channel = (credentials or ClientCredentials()).channel(address)
        self._stub = admin_pb2_grpc.AdminServiceStub(self._channel)

    def __repr__(self) -> str:
        return f"AdminClient(address={self.address!r})"

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def load(self, model: str) -> admin_pb2.LoadResponse:
        return self._stub.GetLoad(admin_pb2.LoadRequest(model=model), timeout=self.timeout_s)

    def placement(self, model: str) -> Placement:
        response = self._stub.GetPlacement(admin_pb2.PlacementRequest(model=model), timeout=self.timeout_s)
        return placement_from_pb(response.placement)

    def plan(self, model: str, load: np.ndarray | Sequence[float] | None = None) -> admin_pb2.PlanResponse:
        """Dry run. load: `[L, E]` (or flat) tokens per logical expert; None: the recent window."""
        flat = [] if load is None else np.asarray(load, dtype=np.float64).reshape(-1).tolist()
        return self._stub.PlanPlacement(admin_pb2.PlanRequest(model=model, load=flat), timeout=self.timeout_s)

    def apply(self, model: str, placement: Placement) -> admin_pb2.RebalanceEvent:
        """Move to `placement` (its version is ignored: the server numbers the next one)."""
        request = admin_pb2.ApplyRequest(model=model, placement=placement_to_pb(placement))
        return self._stub.ApplyPlacement(request, timeout=self.timeout_s)

    def rebalance(self, model: str, force: bool = False) -> admin_pb2.RebalanceEvent:
        return self._stub.Rebalance(admin_pb2.RebalanceRequest(model=model, force=force), timeout=self.timeout_s)

    def status(self, model: str, history: bool = False) -> dict:
        """What `moe-serve status` shows, as the server's JSON decoded; with `history`, also the
        per-expert load over time (for `status --png`)."""
        response = self._stub.GetStatus(admin_pb2.StatusRequest(model=model, history=history), timeout=self.timeout_s)
        return json.loads(response.status_json)


def event_to_dict(event: admin_pb2.RebalanceEvent) -> dict:
    """A rebalance event as a plain dict (for JSON and tables)."""
    return {f.name: getattr(event, f.name) for f in event.DESCRIPTOR.fields}


def load_to_dict(response: admin_pb2.LoadResponse) -> dict:
    """A load report as a plain dict (for JSON and tables); arrays as nested lists."""
    workers = []
    for w in response.workers:
        entry = {f.name: getattr(w, f.name) for f in w.DESCRIPTOR.fields if f.name != "replica_tokens"}
        workers.append({**entry, "replica_tokens": {str(e): n for e, n in sorted(w.replica_tokens.items())}})
    return {
        "model": response.model, "layers": list(response.layers), "num_experts": response.num_experts,
        "num_shared_experts": response.num_shared_experts,
        "window_s": response.window_s, "placement_version": response.placement_version,
        "window_tokens": window_tokens(response).tolist(), "tokens_per_s": tokens_per_s(response).tolist(),
        "balancedness": list(response.balancedness), "workers": workers,
        "recent_events": [event_to_dict(e) for e in response.recent_events],
    }
