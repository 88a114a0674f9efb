"""Load traces: routed expert-tokens per second per logical expert over time, for the simulator.

A `LoadTrace` holds `tokens_per_s: [steps, layers, experts]`, the load of each logical expert
during step `k` (from `k * step_s` to `(k + 1) * step_s`), in expert-tokens per second: a token
routed to k experts counts once at each of them, as the router's load window counts it.

Two sources:
- `LoadTrace.diurnal(...)`: a seeded synthetic day/night trace with drifting hot experts.
- `LoadTrace.from_jsonl(path)`: a recorded one, JSON Lines; each line an object with `t_s`
  (seconds) and `tokens_per_s`, either nested `[layers][experts]` or flat `layers * experts`
  beside `layers` (a list of layer ids) and `num_experts`. That is what `moe-serve load --json`
  prints, plus a `t_s` key; `record_line` / `append_jsonl` write such lines for a recorder.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cluster.sim.traffic import zipf_probs

DAY_S = 86400.0
PEAK_HOUR = 16.0  # the smooth daily curve peaks at 16:00 and bottoms out 12 hours earlier


@dataclass(frozen=True, eq=False)
class LoadTrace:
    """step_s: seconds per step; tokens_per_s: `[steps, layers, experts]` float >= 0, the
    expert-tokens per second each logical expert is routed during each step."""

    step_s: float
    tokens_per_s: np.ndarray

    def __post_init__(self) -> None:
        if not (isinstance(self.step_s, (int, float)) and math.isfinite(self.step_s) and self.step_s > 0):
            raise ValueError(f"step_s must be a finite number of seconds > 0, got {self.step_s!r}")
        load = np.array(self.tokens_per_s, dtype=np.float64)
        if load.ndim != 3 or 0 in load.shape:
            raise ValueError(f"tokens_per_s must be [steps, layers, experts], all >= 1, got shape {load.shape}")
        if not np.isfinite(load).all() or (load < 0).any():
            raise ValueError("tokens_per_s must be finite and >= 0 (expert-tokens per second)")
        load.setflags(write=False)
        object.__setattr__(self, "tokens_per_s", load)

    @property
    def steps(self) -> int:
        return self.tokens_per_s.shape[0]

    @property
    def layers(self) -> int:
        return self.tokens_per_s.shape[1]

    @property
    def experts(self) -> int:
        return self.tokens_per_s.shape[2]

    @property
    def duration_s(self) -> float:
        return self.steps * self.step_s

    @property
    def times_s(self) -> np.ndarray:
        """`[steps]` start of each step, seconds from the start of the trace."""
        return np.arange(self.steps) * float(self.step_s)

    @property
    def total_tokens_per_s(self) -> np.ndarray:
        """`[steps]` expert-tokens per second, all layers and experts together (the autoscaler's
        `tokens_per_s`)."""
        return self.tokens_per_s.sum(axis=(1, 2))

    # ---- the built-in synthetic trace -------------------------------------------------------

    @classmethod
    def diurnal(cls, layers: int = 4, experts: int = 64, top_k: int = 6, days: float = 1.0,
                step_s: float = 300.0, peak_tokens_per_s: float = 10000.0, trough_ratio: float = 0.25,
                zipf_s: float = 1.0, drift_experts_per_hour: float = 0.5, seed: int = 0, *,
                noise_std: float = 0.03, bursts_per_day: float = 1.0, burst_ratio: float = 0.25,
                burst_s: float = 1200.0) -> LoadTrace:
        """A day/night trace with drifting hot experts. Seeded: the same arguments, the same trace.

        - **Total load**: `peak_tokens_per_s` model tokens per second at the smooth peak (16:00),
          `trough_ratio * peak` at the trough (04:00), a raised cosine in between; times a
          slow multiplicative noise (AR(1) in log space, std `noise_std`); plus
          `round(bursts_per_day * days)` bursts of `+burst_ratio` lasting `burst_s`, at seeded
          times in the day (08:00-22:00). Each layer sees `tokens * top_k` expert-tokens/s.
        - **Popularity** per layer: Zipf(`zipf_s`) over ranks; a rank-to-expert map per layer,
          seeded. An expert takes at most one of a token's `top_k` picks, so shares are capped
          at one pick per token and the excess goes to the others (water-filling).
        - **Drift**: hot-set changes arrive as a Poisson process, `drift_experts_per_hour` per
          hour; at each, in every layer, one expert of the hot set (the top eighth of ranks)
          trades ranks with one from outside it: a cold expert becomes hot. A topic shift moves
          all layers at once, so the controller re-plans once per change.
        Returns `[steps, layers, experts]` with `steps = ceil(days * 86400 / step_s)`.
        """
        _check_diurnal(layers, experts, top_k, days, step_s, peak_tokens_per_s, trough_ratio,
                       zipf_s, drift_experts_per_hour, noise_std, burst_ratio, burst_s)
        rng = np.random.default_rng(seed)
        steps = max(1, math.ceil(days * DAY_S / step_s))
        times = np.arange(steps) * step_s
        tokens = peak_tokens_per_s * _daily_curve(times, trough_ratio) * _slow_noise(steps, noise_std, rng)
        tokens *= _bursts(times, round(bursts_per_day * days), burst_ratio, burst_s, rng)
        by_rank = _drifting_ranks(steps, layers, experts, step_s, drift_experts_per_hour, rng)
        shares = _capped_shares(zipf_probs(experts, zipf_s), top_k)  # [E] picks per token by rank
        load = np.zeros((steps, layers, experts))
        rows, cols = np.arange(steps)[:, None, None], np.arange(layers)[None, :, None]
        load[rows, cols, by_rank] = shares[None, None, :]
        return cls(float(step_s), load * tokens[:, None, None])

    # ---- recorded traces --------------------------------------------------------------------

    @classmethod
    def from_jsonl(cls, path: str | Path, step_s: float | None = None) -> LoadTrace:
        """Read a recorded trace and resample it to steps of `step_s` (default: the median time
        between records). Each record's rate holds until the next record's `t_s` (the last one
        for one median interval); a step's load is the time-weighted mean over it, so the
        expert-tokens routed are kept. Raises ValueError naming the file and line."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise ValueError(f"{path}: cannot read trace file: {err.strerror}") from None
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not a text file; expected JSON Lines") from None
        times, loads = [], []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                t_s, load = _parse_line(line, f"{path}:{lineno}", loads[0].shape if loads else None)
                if times and t_s <= times[-1]:
                    raise ValueError(f"{path}:{lineno}: t_s {t_s} is not after the previous line's {times[-1]}; "
                                     f"times must increase")
                times.append(t_s)
                loads.append(load)
        if not loads:
            raise ValueError(f"{path}: no records; expected one JSON object per line with t_s and tokens_per_s")
        return cls._resampled(np.array(times), np.stack(loads), step_s, path)

    @classmethod
    def _resampled(cls, times: np.ndarray, loads: np.ndarray, step_s: float | None, path: Path) -> LoadTrace:
        gaps = np.diff(times)
        hold_s = float(np.median(gaps)) if gaps.size else (step_s or 1.0)
        step_s = float(step_s) if step_s is not None else hold_s
        if not (math.isfinite(step_s) and step_s > 0):
            raise ValueError(f"{path}: step_s must be > 0, got {step_s}")
        ends = np.append(times[1:], times[-1] + hold_s)  # [N] each record holds until here
        span = ends[-1] - times[0]
        steps = max(1, round(span / step_s))
        edges = times[0] + np.arange(steps + 1) * step_s
        flat = loads.reshape(len(times), -1)
        cum = np.concatenate([np.zeros((1, flat.shape[1])), np.cumsum(flat * (ends - times)[:, None], axis=0)])
        idx = np.clip(np.searchsorted(times, edges, side="right") - 1, 0, len(times) - 1)
        within = np.clip(edges - times[idx], 0.0, (ends - times)[idx])
        at_edges = cum[idx] + flat[idx] * within[:, None]  # [steps + 1, L * E] tokens since t0
        mean = np.diff(at_edges, axis=0) / step_s
        return cls(step_s, mean.reshape(steps, *loads.shape[1:]))

    def to_jsonl(self, path: str | Path) -> None:
        """Write one line per step (`t_s` = step start, nested `tokens_per_s`); `from_jsonl`
        with the same `step_s` reads back the same trace."""
        with open(path, "w") as f:
            for t_s, load in zip(self.times_s, self.tokens_per_s):
                f.write(json.dumps({"t_s": float(t_s), "tokens_per_s": load.tolist()}) + "\n")


def record_line(load_report: dict, t_s: float) -> str:
    """One trace line from `moe-serve load --json` output (`load_to_dict`) taken at `t_s`: its
    flat `tokens_per_s`, `layers` and `num_experts`, plus `t_s`; other keys are left out."""
    keys = ("tokens_per_s", "layers", "num_experts")
    missing = [k for k in keys if k not in load_report]
    if missing:
        raise ValueError(f"load report lacks {missing}; expected `moe-serve load --json` output")
    return json.dumps({"t_s": float(t_s), **{k: load_report[k] for k in keys}})


def append_jsonl(path: str | Path, t_s: float, tokens_per_s: np.ndarray | dict) -> None:
    """Append one record: `tokens_per_s` `[layers, experts]`, or a `load --json` report."""
    if isinstance(tokens_per_s, dict):
        line = record_line(tokens_per_s, t_s)
    else:
        line = json.dumps({"t_s": float(t_s), "tokens_per_s": np.asarray(tokens_per_s, dtype=np.float64).tolist()})
    with open(path, "a") as f:
        f.write(line + "\n")


# ---- parsing ----------------------------------------------------------------------------------


def _parse_line(line: str, where: str, shape: tuple[int, int] | None) -> tuple[float, np.ndarray]:
    """`(t_s, [layers, experts])` from one JSON line; `shape` that of the first line, or None."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object with t_s and tokens_per_s, got {type(record).__name__}")
    for key in ("t_s", "tokens_per_s"):
        if key not in record:
            raise ValueError(f"{where}: missing key {key!r}; the line has {sorted(record)}")
    t_s = record["t_s"]
    if isinstance(t_s, bool) or not isinstance(t_s, (int, float)) or not math.isfinite(t_s):
        raise ValueError(f"{where}: t_s must be a finite number of seconds, got {t_s!r}")
    try:
        load = np.array(record["tokens_per_s"], dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: tokens_per_s must be numbers, [layers][experts] or flat") from None
    if load.ndim == 1:
        load = _unflatten(load, record, where)
    if load.ndim != 2 or 0 in load.shape:
        raise ValueError(f"{where}: tokens_per_s must be [layers][experts], got shape {load.shape}")
    if shape is not None and load.shape != shape:
        raise ValueError(f"{where}: tokens_per_s has shape {load.shape}, the first line {shape}")
    if not np.isfinite(load).all() or (load < 0).any():
        raise ValueError(f"{where}: tokens_per_s must be finite and >= 0")
    return float(t_s), load


def _unflatten(flat: np.ndarray, record: dict, where: str) -> np.ndarray:
    layers, experts = record.get("layers"), record.get("num_experts")
    if not isinstance(layers, list) or isinstance(experts, bool) or not isinstance(experts, int) or experts < 1:
        raise ValueError(f"{where}: a flat tokens_per_s needs 'layers' (a list of layer ids) and "
                         f"'num_experts' (an integer >= 1), got {layers!r} and {experts!r}")
    if flat.size != len(layers) * experts:
        raise ValueError(f"{where}: flat tokens_per_s has {flat.size} values, but {len(layers)} layers x "
                         f"{experts} experts need {len(layers) * experts}")
    return flat.reshape(len(layers), experts)


# ---- the synthetic trace's parts -------------------------------------------------------------


def _check_diurnal(layers, experts, top_k, days, step_s, peak, trough, zipf_s, drift, noise, burst_ratio, burst_s):
    checks = [
        (layers >= 1, f"layers must be >= 1, got {layers}"),
        (experts >= 1, f"experts must be >= 1, got {experts}"),
        (1 <= top_k <= experts, f"top_k must be in 1..experts ({experts}), got {top_k}"),
        (days > 0, f"days must be > 0, got {days}"),
        (step_s > 0, f"step_s must be > 0, got {step_s}"),
        (peak >= 0, f"peak_tokens_per_s must be >= 0, got {peak}"),
        (0 <= trough <= 1, f"trough_ratio must be in 0..1, got {trough}"),
        (zipf_s >= 0, f"zipf_s must be >= 0, got {zipf_s}"),
        (drift >= 0, f"drift_experts_per_hour must be >= 0, got {drift}"),
        (noise >= 0, f"noise_std must be >= 0, got {noise}"),
        (burst_ratio >= 0 and burst_s >= 0, f"burst_ratio and burst_s must be >= 0, got {burst_ratio} and {burst_s}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def _daily_curve(times_s: np.ndarray, trough_ratio: float) -> np.ndarray:
    """`[steps]` in `trough_ratio..1`: 1 at PEAK_HOUR, trough_ratio 12 hours away."""
    phase = 2 * np.pi * (times_s / DAY_S - PEAK_HOUR / 24)
    return trough_ratio + (1 - trough_ratio) * 0.5 * (1 + np.cos(phase))


def _slow_noise(steps: int, std: float, rng: np.random.Generator, corr: float = 0.9) -> np.ndarray:
    """`[steps]` multiplicative noise around 1: exp of an AR(1) with stationary std `std`."""
    shocks = rng.standard_normal(steps) * std * math.sqrt(1 - corr**2)
    walk = np.zeros(steps)
    walk[0] = rng.standard_normal() * std
    for k in range(1, steps):
        walk[k] = corr * walk[k - 1] + shocks[k]
    return np.exp(walk)


def _bursts(times_s: np.ndarray, count: int, ratio: float, burst_s: float, rng: np.random.Generator) -> np.ndarray:
    """`[steps]` factor: `1 + ratio` within `count` bursts of `burst_s`, 1 elsewhere."""
    factor = np.ones(len(times_s))
    days = max(1, math.ceil((times_s[-1] + 1) / DAY_S))
    for _ in range(count):
        start = rng.integers(days) * DAY_S + rng.uniform(8, 22) * 3600
        factor[(times_s >= start) & (times_s < start + burst_s)] = 1 + ratio
    return factor


def _drifting_ranks(steps: int, layers: int, experts: int, step_s: float, per_hour: float,
                    rng: np.random.Generator) -> np.ndarray:
    """`[steps, layers, experts]` expert id at each popularity rank, per step and layer."""
    by_rank = np.stack([rng.permutation(experts) for _ in range(layers)])
    hot = max(1, experts // 8)
    out = np.empty((steps, layers, experts), dtype=np.int64)
    for k in range(steps):
        for _ in range(rng.poisson(per_hour * step_s / 3600) if hot < experts else 0):
            for layer in range(layers):
                a, b = rng.integers(hot), rng.integers(hot, experts)
                by_rank[layer, [a, b]] = by_rank[layer, [b, a]]
        out[k] = by_rank
    return out


def _capped_shares(probs: np.ndarray, top_k: int) -> np.ndarray:
    """`[E]` expected picks per token (sum `top_k`, each <= 1) proportional to `probs` where no
    cap binds: an expert takes at most one of a token's picks."""
    shares = np.zeros(len(probs))
    free = np.ones(len(probs), bool)
    while True:
        left = top_k - (~free).sum()
        shares[free] = left * probs[free] / probs[free].sum()
        over = free & (shares > 1)
        if not over.any():
            return shares
        shares[over] = 1.0
        free &= ~over
