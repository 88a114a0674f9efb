"""A checked load: requests from background threads, every answer compared with a reference
MoE layer, every outcome counted (tests and benchmarks that must show no request was lost)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import grpc
import numpy as np
import torch

from cluster.model_spec import ModelSpec
from router_service.client import MoEClient
from router_service.security import ClientCredentials

FP32_REL_TOL = 1e-5


class LoadDriver:
    """Requests from background threads until `stop()`, every answer checked against `expected`.

    outcomes: `"OK"`, `"wrong: ..."` or the gRPC status name of a failure, per request, with the
    placement version that served it (-1 for a failure). `sample(layer, tokens, rng)` makes the
    hidden states (default: standard normal); `pause_s` between requests sets a light load;
    `credentials`: TLS and token for a secured server.
    """

    def __init__(self, address: str, model: str, spec: ModelSpec,
                 expected: Callable[[int, np.ndarray], torch.Tensor], threads: int = 2,
                 tokens: tuple[int, int] = (16, 96), seed: int = 0, timeout_s: float = 30.0,
                 wait_for_ready: bool = False, sample: Callable[[int, int, np.random.Generator], np.ndarray] | None = None,
                 pause_s: float = 0.0, credentials: ClientCredentials | None = None):
        self._args = (address, model, spec, expected, tokens, timeout_s, wait_for_ready)
        self._credentials = credentials
        self._pause_s = pause_s
        self._sample = sample or (lambda layer, n, rng: rng.standard_normal((n, spec.hidden_size), dtype=np.float32))
        self._seeds = [seed + i for i in range(threads)]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.outcomes: list[tuple[str, int]] = []
        self.errors: list[str] = []  # "CODE: details" of each failure

    def start(self) -> LoadDriver:
        self._threads = [threading.Thread(target=self._drive, args=(s,), daemon=True) for s in self._seeds]
        for thread in self._threads:
            thread.start()
        return self

    def _drive(self, seed: int) -> None:
        address, model, spec, expected, (low, high), timeout_s, wait = self._args
        rng = np.random.default_rng(seed)
        with MoEClient(address, credentials=self._credentials) as client:
            while not self._stop.wait(self._pause_s):
                layer = spec.moe_layers[int(rng.integers(spec.num_moe_layers))]
                x = self._sample(layer, int(rng.integers(low, high)), rng)
                try:
                    got = client.infer(model, x, layer=layer, timeout_s=timeout_s, wait_for_ready=wait)
                except grpc.RpcError as err:
                    self._record(err.code().name, -1, err.details())
                    continue
                want = expected(layer, x)
                rel = float((torch.from_numpy(got.hidden_states.copy()) - want).abs().max() / want.abs().max())
                self._record("OK" if rel < FP32_REL_TOL else f"wrong: rel {rel:.2e}", got.placement_version)

    def _record(self, outcome: str, version: int, details: str | None = None) -> None:
        with self._lock:
            self.outcomes.append((outcome, version))
            if details is not None:
                self.errors.append(f"{outcome}: {details}")

    def count(self) -> int:
        with self._lock:
            return len(self.outcomes)

    def stop(self) -> dict[str, int]:
        """Stop, wait for the threads, and return `{outcome: requests}`."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        tally: dict[str, int] = {}
        for outcome, _ in self.outcomes:
            tally[outcome] = tally.get(outcome, 0) + 1
        return tally
