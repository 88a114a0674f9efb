"""Helpers shared by the integration tests: configs, a served-model handle, comparisons, waits.

Nothing here starts Ray or a server by itself; the fixtures in `conftest.py` do.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
import urllib.request
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
import ray
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.load_driver import FP32_REL_TOL, LoadDriver  # noqa: F401  (LoadDriver: for the tests)
from cluster.app.launcher import Deployment
from cluster.app.reference import ReferenceMoE
from cluster.config import ServeConfig, validate_config
from cluster.model_spec import ModelSpec
from router_service.client import MoEClient

NAMESPACE = "moe-serve-test"
# Relative error of answering in a 16-bit type: half an ulp of the largest output, plus slack.
FP16_REL_TOL = 2e-3  # unit roundoff 2**-11 ~ 4.9e-4
BF16_REL_TOL = 1.6e-2  # unit roundoff 2**-8 ~ 3.9e-3

T = TypeVar("T")


def serve_config(
    name: str,
    *,
    random: dict | None = None,
    checkpoint: str | None = None,
    workers: int = 2,
    router: dict | None = None,
    security: dict | None = None,
) -> ServeConfig:
    """A config on port 0 in the test namespace; `random`/`router`/`security` are sections as in YAML."""
    model: dict[str, Any] = {"name": name}
    if checkpoint is not None:
        model["checkpoint"] = checkpoint
    else:
        model["random"] = random or {}
    return validate_config({
        "model": model,
        "workers": {"count": workers, "num_cpus": 0.5, "torch_threads": 1},
        "router": {"port": 0, "http_port": 0, **(router or {})},
        "ray": {"namespace": NAMESPACE},
        "security": security or {},
    }, source=f"test config {name}")


def run_on(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T], timeout_s: float = 120.0) -> T:
    """Run `coro` on the server's event loop (another thread) and wait for its result; past
    `timeout_s` it is cancelled (a deployment that never came up does not linger on)."""
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return future.result(timeout_s)
    except TimeoutError:
        future.cancel()
        raise


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.05) -> None:
    """Poll `predicate` until true; AssertionError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll_s)
    if not predicate():
        raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rel_err(got: torch.Tensor | np.ndarray, want: torch.Tensor | np.ndarray) -> float:
    """max |got - want| / max |want|, in float64."""
    got_t = torch.as_tensor(np.array(got, copy=True)).double()
    want_t = torch.as_tensor(np.array(want, copy=True)).double()
    assert got_t.shape == want_t.shape, f"shape {list(got_t.shape)} != reference {list(want_t.shape)}"
    scale = float(want_t.abs().max())
    assert scale > 0, "reference output is all zeros: the comparison would prove nothing"
    return float((got_t - want_t).abs().max()) / scale


def hidden_states(tokens: int, hidden: int, seed: int) -> np.ndarray:
    """`[tokens, hidden]` float32 standard normal, seeded."""
    return np.random.default_rng(seed).standard_normal((tokens, hidden), dtype=np.float32)


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 `[T, H]` -> uint16 bit patterns of the bfloat16 rounding (what BF16 carries)."""
    return torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def from_bf16_bits(bits: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(bits.copy().view(np.int16)).view(torch.bfloat16).float()


def health_status(channel: grpc.Channel, service: str = "", timeout_s: float = 5.0) -> str:
    status = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
    ).status
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


@dataclass
class Served:
    """A deployed model as a test sees it: the deployment, a client and its reference layer."""

    config: ServeConfig
    deployment: Deployment
    client: MoEClient
    reference: ReferenceMoE

    @property
    def name(self) -> str:
        return self.config.model.name

    @property
    def address(self) -> str:
        return self.deployment.address

    @property
    def spec(self) -> ModelSpec:
        return self.deployment.weights.spec

    def worker_calls(self) -> int:
        """Sum of `calls` over the workers: how many batch shares reached a worker."""
        return sum(s["calls"] for s in self.deployment.pool.stats())

    def expected(self, layer: int, x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reference (hidden `[T, H]`, topk_ids `[T, k]`, topk_weights `[T, k]`) for float32 `x`."""
        out, routing = self.reference.forward(layer, torch.from_numpy(x.copy()))
        return out, routing.topk_ids, routing.topk_weights

    def assert_serves_correctly(self, layer: int, x: np.ndarray, timeout_s: float = 60.0) -> None:
        """One good request; its answer equals the reference to FP32_REL_TOL."""
        got = self.client.infer(self.name, x, layer=layer, timeout_s=timeout_s)
        want, _, _ = self.expected(layer, x)
        err = rel_err(got.hidden_states, want)
        assert err < FP32_REL_TOL, f"layer {layer}, {x.shape[0]} tokens: relative error {err:.2e}"


# Every integration module: `pytestmark = MARKS`. The filters silence torch's notes about
# read-only buffers, which the server's own module-level filters cannot (pytest resets them).
MARKS = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:The given (buffer|NumPy array) is not writable:UserWarning"),
]


METRIC_SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$')


def scrape() -> list[tuple[str, dict[str, str], float]]:
    """Every sample on this node's metrics endpoint: (name, labels, value)."""
    node = next(n for n in ray.nodes() if n["Alive"])
    with urllib.request.urlopen(f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = []
    for line in text.splitlines():
        match = METRIC_SAMPLE.match(line)
        if match and not line.startswith("#"):
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match["labels"] or ""))
            out.append((match["name"], labels, float(match["value"])))
    return out


def total(samples, name: str, **labels: str) -> float:
    return sum(v for n, l, v in samples if n == name and all(l.get(k) == want for k, want in labels.items()))
