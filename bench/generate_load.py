"""Generation workloads for `bench.bench_generate`: the requests (seeded prompts, output lengths
and arrival times), each request's timing and their summary, and the streaming client that runs a
workload against the OpenAI-compatible HTTP API from a process of its own.

    .venv/bin/python -m bench.generate_load < spec.json > timings.json

The client reads `{"url", "model", "requests": [{"prompt", "new_tokens", "at_s"}], "sequential"}`
on stdin, sends one short warm-up request, then each request at its arrival time (`at_s` seconds
after the start; `sequential`: one after another instead) to `/v1/completions` with
`stream: true`, greedy, `ignore_eos` and `logprobs: 0` (so every step sends a chunk, even a
token whose text is empty), and writes `{"timings": [...]}` on stdout. Every request must get
exactly its `new_tokens`. No torch here: the client process stays light.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace

import numpy as np

FIRST_ID = 3  # token ids 0, 1, 2 are <unk>, <s>, </s> (`workers.tiny_models.SPECIAL_TOKENS`)
WARMUP_PROMPT_TOKENS = 16
WARMUP_NEW_TOKENS = 4


@dataclass(frozen=True)
class Request:
    """prompt: token ids; new_tokens: exactly this many are generated; at_s: arrival, seconds
    after the workload's start."""

    prompt: list[int]
    new_tokens: int
    at_s: float = 0.0


@dataclass(frozen=True)
class Timing:
    """One request: ttft_s from its arrival to its first token; tpot_s: the mean gap between
    its later tokens (None with one token); tokens: output tokens; done_s: its last token,
    seconds after the workload's start."""

    ttft_s: float
    tpot_s: float | None
    tokens: int
    done_s: float

    @classmethod
    def from_stamps(cls, start_s: float, at_s: float, stamps: list[float]) -> Timing:
        """stamps: when each output token was there, on the clock of `start_s` (the workload's start)."""
        if not stamps:
            raise ValueError("a request with no output token has no timing")
        n = len(stamps)
        tpot = (stamps[-1] - stamps[0]) / (n - 1) if n > 1 else None
        return cls(stamps[0] - (start_s + at_s), tpot, n, stamps[-1] - start_s)


# ---- workloads --------------------------------------------------------------------------------

def random_prompt(rng: np.random.Generator, tokens: int, vocab_size: int) -> list[int]:
    """`tokens` random ids, none of them special."""
    return rng.integers(FIRST_ID, vocab_size, tokens).tolist()


def log_uniform(rng: np.random.Generator, low: int, high: int, n: int) -> np.ndarray:
    """`[n]` integers log-uniform over low..high (both included)."""
    values = np.exp(rng.uniform(math.log(low), math.log(high + 1), n)).astype(np.int64)
    return np.clip(values, low, high)


def same_requests(rng: np.random.Generator, n: int, prompt_tokens: int, new_tokens: int,
                  vocab_size: int) -> list[Request]:
    """`n` requests arriving together, each its own random prompt."""
    return [Request(random_prompt(rng, prompt_tokens, vocab_size), new_tokens) for _ in range(n)]


def poisson_requests(rng: np.random.Generator, n: int, prompt_tokens: tuple[int, int],
                     new_tokens: tuple[int, int], vocab_size: int) -> list[Request]:
    """`n` requests, prompt and output lengths log-uniform over the (low, high) ranges, arriving
    as a Poisson stream of rate 1 per second from 0 (scale it with `at_rate`)."""
    prompts = log_uniform(rng, *prompt_tokens, n)
    outputs = log_uniform(rng, *new_tokens, n)
    gaps = rng.exponential(1.0, n)
    arrivals = np.cumsum(gaps) - gaps[0]
    return [Request(random_prompt(rng, int(p), vocab_size), int(o), float(a))
            for p, o, a in zip(prompts, outputs, arrivals)]


def at_rate(requests: list[Request], rate_per_s: float) -> list[Request]:
    """The same stream at `rate_per_s` requests per second (arrival times divided by it)."""
    if rate_per_s <= 0:
        raise ValueError(f"rate_per_s must be > 0, got {rate_per_s}")
    return [replace(r, at_s=r.at_s / rate_per_s) for r in requests]


# ---- figures ------------------------------------------------------------------------------------

def _ms(values: list[float], q: float) -> float:
    return round(float(np.percentile(np.array(values) * 1000, q)), 2)


def summarise(timings: list[Timing]) -> dict:
    """A stream's figures: output tokens per second from its start to its last token, and
    p50/p99 of TTFT and TPOT over its requests."""
    wall_s = max(t.done_s for t in timings)
    tokens = sum(t.tokens for t in timings)
    tpots = [t.tpot_s for t in timings if t.tpot_s is not None]
    return {
        "requests": len(timings),
        "output_tokens": tokens,
        "wall_s": round(wall_s, 3),
        "tokens_per_s": round(tokens / wall_s, 2),
        "ttft_ms": {"p50": _ms([t.ttft_s for t in timings], 50), "p99": _ms([t.ttft_s for t in timings], 99)},
        "tpot_ms": {"p50": _ms(tpots, 50), "p99": _ms(tpots, 99)} if tpots else None,
    }


def summarise_single(timings: list[Timing]) -> dict:
    """One sequence, measured `len(timings)` times one after another: medians, and every run."""
    ttft = [t.ttft_s * 1000 for t in timings]
    tpot = [t.tpot_s * 1000 for t in timings if t.tpot_s is not None]
    return {"ttft_ms": round(float(np.median(ttft)), 2), "tpot_ms": round(float(np.median(tpot)), 3),
            "runs": {"ttft_ms": [round(v, 2) for v in ttft], "tpot_ms": [round(v, 3) for v in tpot]}}


# ---- the client (its own process) -------------------------------------------------------------

async def _one(session, url: str, model: str, request: Request, start_s: float) -> Timing:
    await asyncio.sleep(max(0.0, start_s + request.at_s - time.perf_counter()))
    body = {"model": model, "prompt": request.prompt, "max_tokens": request.new_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True, "logprobs": 0}
    stamps: list[float] = []
    async with session.post(url, json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status} from {url}: {(await response.text())[:500]}")
        async for raw in response.content:
            line = raw.strip()
            if not line.startswith(b"data: "):
                continue
            data = line[len(b"data: "):]
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"the stream ended with an error: {event['error']}")
            now = time.perf_counter()
            for choice in event.get("choices", ()):
                logprobs = choice.get("logprobs")
                if logprobs:
                    stamps += [now] * len(logprobs["tokens"])
    if len(stamps) != request.new_tokens:
        raise RuntimeError(f"asked for {request.new_tokens} tokens, got {len(stamps)}")
    return Timing.from_stamps(start_s, request.at_s, stamps)


async def run_client(url: str, model: str, requests: list[Request], sequential: bool) -> list[Timing]:
    """Warm up with one short request, then run `requests`; their timings in order."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        warmup = Request(requests[0].prompt[:WARMUP_PROMPT_TOKENS], WARMUP_NEW_TOKENS)
        await _one(session, url, model, warmup, time.perf_counter())
        if sequential:
            return [await _one(session, url, model, replace(r, at_s=0.0), time.perf_counter()) for r in requests]
        start_s = time.perf_counter()
        return list(await asyncio.gather(*(_one(session, url, model, r, start_s) for r in requests)))


def main() -> int:
    spec = json.load(sys.stdin)
    requests = [Request(**r) for r in spec["requests"]]
    timings = asyncio.run(run_client(spec["url"], spec["model"], requests, spec.get("sequential", False)))
    json.dump({"timings": [asdict(t) for t in timings]}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
