"""The soak's load and its measurements (`bench.bench_soak`): request shapes and their latencies,
a load driver that timestamps every failure, an FP16 prober, and RSS samples per process.

Every time here is `time.monotonic()`, which is one clock for every process of this machine, so
it compares directly with the controller's event times (`bench.soak_service.StatusWatch`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import grpc
import numpy as np
import torch

from bench.load_driver import LoadDriver
from cluster.app.reference import ReferenceMoE
from cluster.sim.traffic import SkewedTraffic
from router_service.client import MoEClient

MAX_TOKENS = 2048
FP16_REL_TOL = 2e-3  # FP16 answers: unit roundoff 2**-11 ~ 4.9e-4 of the largest output, plus slack
MIB = 2**20


@dataclass(frozen=True)
class Failure:
    """A request that did not end OK: when it ended (monotonic), its outcome and the details."""

    at_s: float
    source: str  # "load" (the load driver) or "fp16" (the prober)
    outcome: str
    detail: str | None


class Shapes:
    """The load driver's `sample` and `expected`: random shapes, skewed or plain hidden states,
    and per-request bookkeeping (sample is called right before a request, expected right after
    a successful answer, on the same thread: the gap is the request's latency)."""

    def __init__(self, traffic: SkewedTraffic, reference: ReferenceMoE, skewed_fraction: float = 0.75):
        self._traffic = traffic
        self._reference = reference
        self._skewed_fraction = skewed_fraction
        self._lock = threading.Lock()  # SkewedTraffic keeps one rng: one caller at a time
        self._local = threading.local()
        self.sent = 0
        self.tokens_sent: list[int] = []
        self.answered: list[tuple[float, float]] = []  # (answered at, latency_s) of each OK request
        self.ok_tokens = 0

    def tokens(self, rng: np.random.Generator) -> int:
        """Log-uniform over 1..MAX_TOKENS."""
        return int(min(MAX_TOKENS, np.floor(np.exp(rng.uniform(0.0, np.log(MAX_TOKENS + 1))))))

    def hidden(self, layer: int, rng: np.random.Generator) -> np.ndarray:
        n = self.tokens(rng)
        if rng.random() < self._skewed_fraction:
            with self._lock:
                return self._traffic.sample(layer, n)[0]
        return rng.standard_normal((n, self._traffic.hidden_size), dtype=np.float32)

    def sample(self, layer: int, _n: int, rng: np.random.Generator) -> np.ndarray:
        x = self.hidden(layer, rng)
        with self._lock:
            self.sent += 1
            self.tokens_sent.append(x.shape[0])
        self._local.sent_at = time.monotonic()
        return x

    def expected(self, layer: int, x: np.ndarray) -> torch.Tensor:
        now = time.monotonic()
        with self._lock:
            self.answered.append((now, now - self._local.sent_at))
            self.ok_tokens += x.shape[0]
        return self._reference.forward(layer, torch.from_numpy(x.copy()))[0]

    def latencies_s(self) -> list[float]:
        with self._lock:
            return [latency for _, latency in self.answered]

    def answered_between(self, from_s: float, to_s: float) -> list[float]:
        """Latencies of the requests answered between two monotonic times."""
        with self._lock:
            return [latency for at, latency in self.answered if from_s <= at <= to_s]

    def rotate(self, shift: int = 3) -> None:
        with self._lock:
            self._traffic.rotate(shift)


class TimedLoadDriver(LoadDriver):
    """`LoadDriver`, with the time of every request that did not end OK (so each failure can be
    set beside the faults)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.failures: list[Failure] = []

    def _record(self, outcome: str, version: int, details: str | None = None) -> None:
        if outcome != "OK":
            self.failures.append(Failure(time.monotonic(), "load", outcome, details))
        super()._record(outcome, version, details)

    def not_ok(self) -> int:
        return len(self.failures)


class Fp16Prober:
    """FP16 requests from one thread (the load driver checks to FP32 tolerance only), each
    answer checked against the reference on the same FP16 input to FP16_REL_TOL."""

    def __init__(self, address: str, model: str, shapes: Shapes, reference: ReferenceMoE,
                 layers: list[int], pause_s: float, seed: int = 99):
        self._args = (address, model, shapes, reference, layers, pause_s, seed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="fp16-prober")
        self.tally: dict[str, int] = {}
        self.failures: list[Failure] = []
        self.sent = 0

    def start(self) -> Fp16Prober:
        self._thread.start()
        return self

    def _run(self) -> None:
        address, model, shapes, reference, layers, pause_s, seed = self._args
        rng = np.random.default_rng(seed)
        with MoEClient(address) as client:
            while not self._stop.wait(pause_s):
                layer = layers[int(rng.integers(len(layers)))]
                x = shapes.hidden(layer, rng).astype(np.float16)
                self.sent += 1
                try:
                    got = client.infer(model, x, layer=layer, timeout_s=30)
                except grpc.RpcError as err:
                    self._count(err.code().name, err.details())
                    continue
                want = reference.forward(layer, torch.from_numpy(x.astype(np.float32)))[0].double()
                rel = float((torch.from_numpy(got.hidden_states.astype(np.float64)) - want).abs().max() / want.abs().max())
                ok = got.hidden_states.dtype == np.float16 and rel < FP16_REL_TOL
                self._count("OK" if ok else f"wrong: {got.hidden_states.dtype} rel {rel:.2e}")

    def _count(self, outcome: str, detail: str | None = None) -> None:
        self.tally[outcome] = self.tally.get(outcome, 0) + 1
        if outcome != "OK":
            self.failures.append(Failure(time.monotonic(), "fp16", outcome, detail))

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(60)
        return {"sent": self.sent, "outcomes": dict(self.tally), "sent_equals_outcomes": self.sent == sum(self.tally.values())}


@dataclass
class Memory:
    """RSS samples per process: `series[(name, pid)] = [(t_s, rss_bytes, requests_sent)]`."""

    series: dict[tuple[str, int], list[tuple[float, int, int]]] = field(default_factory=dict)

    def sample(self, t_s: float, pids: dict[str, int | None], requests: int) -> None:
        import psutil  # comes with Ray (ray/thirdparty_files, on sys.path once ray is imported)

        for name, pid in pids.items():
            if pid is None:
                continue
            try:
                rss = psutil.Process(pid).memory_info().rss
            except psutil.Error:  # the process just died (a kill)
                continue
            self.series.setdefault((name, pid), []).append((t_s, rss, requests))

    def latest_mib(self) -> float:
        """Sum of the newest sample of every process seen in the last round."""
        newest = max((s[-1][0] for s in self.series.values()), default=0.0)
        return sum(s[-1][1] for s in self.series.values() if s[-1][0] == newest) / MIB

    def report(self, second_half_from_s: float) -> list[dict]:
        """Per process: start/end/max RSS, and the growth over the second half of the run, or
        of the process's own life when it started later (a replacement warms up too)."""
        out = []
        for (name, pid), samples in self.series.items():
            rss = [r for _, r, _ in samples]
            entry = {
                "process": name, "pid": pid, "samples": len(samples),
                "from_s": round(samples[0][0], 1), "to_s": round(samples[-1][0], 1),
                "start_mib": round(rss[0] / MIB, 1), "end_mib": round(rss[-1] / MIB, 1),
                "max_mib": round(max(rss) / MIB, 1), "second_half": None,
            }
            from_s = max(second_half_from_s, (samples[0][0] + samples[-1][0]) / 2)
            late = [s for s in samples if s[0] >= from_s]
            if len(late) >= 2:
                growth = (late[-1][1] - late[0][1]) / MIB
                requests = late[-1][2] - late[0][2]
                t, mib = np.array([x[0] for x in late]), np.array([x[1] for x in late]) / MIB
                entry["second_half"] = {
                    "from_s": round(late[0][0], 1), "to_s": round(late[-1][0], 1),
                    "growth_mib": round(growth, 2), "requests": requests,
                    "slope_mib_per_min": round(60 * float(np.polyfit(t, mib, 1)[0]), 3),  # least squares
                    "mib_per_1000_requests": round(1000 * growth / requests, 3) if requests else None,
                }
            out.append(entry)
        return out
