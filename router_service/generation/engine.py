"""The generation engine: one loop per router that runs the model a step at a time over every
running sequence (continuous batching), and streams each request's tokens as they come.

A step: drop what was cancelled (its KV blocks are free again), ask the pure `schedule` which
sequences run and how many tokens each computes, hand out the blocks it asked for, run the dense
model over the flat batch (every MoE layer goes to the expert pool once for the whole batch),
sample a token for each sequence that finished its pending tokens, and hand each request its news.
A sequence whose MoE tokens could not be served (no live replica) fails alone; the others go on.
Expert skipping is per sequence (`SamplingParams.expert_skip_threshold`): a step whose sequences
skip passes the MoE call each token's threshold, a step where none does passes none.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from cluster.planning.load_stats import GenerationLoad
from router_service.errors import ModelNotReady, Overloaded, ServingError
from router_service.generation.attention import SeqSlots, StepLayout
from router_service.generation.dense_model import DenseModel
from router_service.generation.detokenizer import Detokenizer
from router_service.generation.kv_cache import BlockAllocator, PagedKVCache
from router_service.generation.params import SamplingParams
from router_service.generation.sampling import sample
from router_service.generation.scheduler import Scheduled, SchedulerConfig, SeqState, schedule, split_microbatches
from router_service.skipping import token_thresholds

log = logging.getLogger(__name__)

# (layer, hidden [N, H], groups [N]: the sequence of each token[, thresholds [N]: each token's expert
# skip threshold, given only when some sequence skips]) -> (output [N, H], failed [N] bool or None, why)
MoECall = Callable[..., Awaitable[tuple[torch.Tensor, torch.Tensor | None, ServingError | None]]]


@dataclass(frozen=True)
class EngineSettings:
    """The engine's share of the `generation` config (see `cluster.config.GenerationConfig`)."""

    kv_cache_bytes: int
    block_size: int
    max_num_seqs: int
    max_batch_tokens: int
    prefill_chunk_tokens: int
    max_waiting: int
    max_model_len: int | None = None
    pipeline_microbatches: bool = False


class GenerationMetrics(Protocol):
    """Where the engine's figures go (`cluster.control.metrics.GenerationMetrics`)."""

    def finished(self, prompt_tokens: int, output_tokens: int, ttft_s: float | None, tpot_s: float | None,
                 e2e_s: float, reason: str) -> None: ...
    def state(self, running: int, waiting: int, kv_used_fraction: float) -> None: ...


@dataclass(frozen=True)
class TokenLogprob:
    """A new token's log-probability and its most likely alternatives `(token id, logprob)`."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class StepOutput:
    """A request's news from one step: token_ids: its new tokens (several only when text held
    back is flushed); text: the text it can show now; finish_reason: "stop" (end-of-sequence or
    a stop string) or "length" (max_tokens or the context), None while it goes on."""

    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(eq=False)
class _Sequence:
    seq_id: int
    tokens: list[int]
    prompt_tokens: int
    params: SamplingParams
    detok: Detokenizer
    generator: torch.Generator | None
    arrived_s: float
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    computed: int = 0
    blocks: list[int] = field(default_factory=list)
    first_token_s: float | None = None
    cancelled: bool = False
    done: bool = False

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_tokens

    def state(self) -> SeqState:
        return SeqState(self.seq_id, len(self.tokens), self.computed, len(self.blocks))


class GenerationStream:
    """One request's outputs as an async iterator of `StepOutput`; raises the `ServingError`
    that ended it, if one did. Closing it early (`cancel`, or leaving the loop) frees its
    sequence at the engine's next step."""

    def __init__(self, seq: _Sequence, wake: Callable[[], None]):
        self._seq, self._wake = seq, wake

    @property
    def prompt_tokens(self) -> int:
        return self._seq.prompt_tokens

    def cancel(self) -> None:
        if not self._seq.done:
            self._seq.cancelled = True
            self._wake()

    async def __aiter__(self) -> AsyncIterator[StepOutput]:
        try:
            while True:
                item = await self._seq.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            self.cancel()


class GenerationEngine:
    def __init__(self, model: DenseModel, tokenizer, moe: MoECall, settings: EngineSettings,
                 eos_token_ids: Sequence[int], metrics: GenerationMetrics | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.model, self._tokenizer, self._moe = model, tokenizer, moe
        self._metrics, self._clock = metrics, clock
        self._eos = frozenset(eos_token_ids)
        shapes = model.kv_shapes()
        element = torch.empty(0, dtype=model.dtype).element_size()
        blocks = PagedKVCache.blocks_within(settings.kv_cache_bytes, shapes, settings.block_size, element)
        if blocks < 2:
            raise ValueError(f"generation.kv_cache_mb ({settings.kv_cache_bytes / 2**20:g}) holds {blocks} blocks of "
                             f"{settings.block_size} tokens; give it room for at least 2")
        self.cache = PagedKVCache(shapes, blocks, settings.block_size, model.dtype, model.device)
        self.allocator = BlockAllocator(blocks)
        limit = settings.max_model_len or getattr(model.config, "max_position_embeddings", None) or blocks * settings.block_size
        self.max_model_len = min(limit, blocks * settings.block_size)
        if self.max_model_len < limit:
            log.warning("the KV cache (%d blocks of %d tokens) holds %d tokens, fewer than max_model_len %d: "
                        "sequences are limited to that", blocks, settings.block_size, self.max_model_len, limit)
        self._schedule = SchedulerConfig(settings.max_num_seqs, settings.max_batch_tokens,
                                         settings.prefill_chunk_tokens, settings.block_size)
        self._max_waiting = settings.max_waiting
        self.microbatches = 2 if settings.pipeline_microbatches else 1  # per step (pipelining: 2)
        self._running: list[_Sequence] = []
        self._waiting: deque[_Sequence] = deque()
        self._ids = 0
        self._work = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closed = False
        self.steps = 0
        self._ttft: deque[float] = deque(maxlen=512)  # finished since the last take_load
        self._tpot: deque[float] = deque(maxlen=512)
        self._generated = 0

    def __repr__(self) -> str:
        return (f"GenerationEngine(running={len(self._running)}, waiting={len(self._waiting)}, "
                f"kv_blocks={self.allocator.num_blocks - self.allocator.free}/{self.allocator.num_blocks})")

    def stats(self) -> dict:
        return {"running": len(self._running), "waiting": len(self._waiting),
                "kv_used_fraction": self.allocator.used_fraction, "kv_blocks": self.allocator.num_blocks,
                "block_size": self.cache.block_size, "max_model_len": self.max_model_len, "steps": self.steps}

    def take_load(self) -> GenerationLoad:
        """The engine's state now, with the latencies and tokens since the previous call."""
        load = GenerationLoad(len(self._running), len(self._waiting), self.allocator.used_fraction,
                              self._schedule.max_num_seqs, tuple(self._ttft), tuple(self._tpot), self._generated)
        self._ttft.clear()
        self._tpot.clear()
        self._generated = 0
        return load

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams) -> GenerationStream:
        """Queue a request; InvalidRequest when it does not fit the context, Overloaded when the
        queue is full."""
        if self._closed:
            raise ModelNotReady("the generation engine is shutting down")
        params.check_length(len(prompt_ids), self.max_model_len)
        if len(self._waiting) >= self._max_waiting:
            raise Overloaded(f"{len(self._waiting)} requests are waiting for room in the KV cache (limit "
                             f"generation.max_waiting = {self._max_waiting}); retry with backoff")
        self._ids += 1
        generator = None if params.seed is None else torch.Generator().manual_seed(params.seed)
        seq = _Sequence(self._ids, list(prompt_ids), len(prompt_ids), params,
                        Detokenizer(self._tokenizer, prompt_ids, params.stop), generator, self._clock())
        self._waiting.append(seq)
        self._start()
        self._work.set()
        return GenerationStream(seq, self._work.set)

    def _start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="generation-engine")

    async def close(self) -> None:
        """Stop the loop; requests still running or waiting end with ModelNotReady."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for seq in [*self._running, *self._waiting]:
            self._fail(seq, ModelNotReady("the generation engine shut down before the request finished"))

    async def _loop(self) -> None:
        while True:
            self._drop_cancelled()
            self._report()
            if not self._running and not self._waiting:
                self._work.clear()
                await self._work.wait()
                continue
            try:
                await self._step()
            except Exception as err:  # a bug: fail what ran, keep serving the rest
                log.exception("generation step failed")
                for seq in list(self._running):
                    self._fail(seq, err)
            await asyncio.sleep(0)  # let requests arrive and streams drain between steps

    async def _step(self) -> None:
        plan = schedule([s.state() for s in self._running], [s.state() for s in self._waiting],
                        self.allocator.free, self._schedule)
        by_id = {s.seq_id: s for s in (*self._running, *self._waiting)}
        for seq_id in plan.preempted:
            seq = by_id[seq_id]
            self.allocator.release(seq.blocks)
            seq.blocks, seq.computed = [], 0
            self._running.remove(seq)
        for seq_id in reversed(plan.preempted):
            self._waiting.appendleft(by_id[seq_id])
        for seq_id in plan.admitted:
            seq = by_id[seq_id]
            self._waiting.remove(seq)
            self._running.append(seq)
        if not plan.scheduled:
            await asyncio.sleep(0.001)  # nothing fits: wait for a cancellation to free blocks
            return
        parts = split_microbatches(plan.scheduled, self.microbatches)
        for part in parts:  # blocks first, so every micro-batch's layout is known up front
            for item in part:
                by_id[item.seq_id].blocks += self.allocator.allocate(item.new_blocks)
        done = await asyncio.gather(*(self._forward([by_id[item.seq_id] for item in part], part) for part in parts),
                                    return_exceptions=True)  # each runs to its end before a failure is raised
        self.steps += 1
        for result in done:
            if isinstance(result, BaseException):
                raise result

    async def _forward(self, batch: list[_Sequence], scheduled: Sequence[Scheduled]) -> None:
        """One forward pass over `batch` (a step, or one of its micro-batches), then its samples.
        Micro-batches of one step run at once: while one waits for the experts, the next runs
        its attention."""
        slots, ids = [], []
        for seq, item in zip(batch, scheduled):
            slots.append(SeqSlots(seq.blocks, seq.computed, item.tokens))
            ids += seq.tokens[seq.computed:seq.computed + item.tokens]
        layout = StepLayout.build(slots, self.cache.block_size)
        failed = torch.zeros(layout.num_tokens, dtype=torch.bool)
        failures: list[ServingError] = []
        groups = np.repeat(np.arange(len(batch)), layout.q_lens)  # a poison sequence fails alone
        thresholds = token_thresholds([seq.params.expert_skip_threshold or 0.0 for seq in batch],
                                      [item.tokens for item in scheduled])
        skip = () if thresholds is None else (thresholds,)

        async def moe(layer: int, hidden: torch.Tensor) -> torch.Tensor:
            out, bad, why = await self._moe(layer, hidden, groups, *skip)
            if bad is not None:
                failed.logical_or_(bad)
                failures.append(why)
            return out

        hidden = await self.model.forward(torch.tensor(ids), layout, self.cache, moe)
        self._finish_step(batch, scheduled, hidden, failed, failures[0] if failures else None)

    def _finish_step(self, batch, scheduled, hidden: torch.Tensor, failed: torch.Tensor,
                     failure: ServingError | None) -> None:
        rows, sampling, row = [], [], 0
        for seq, item in zip(batch, scheduled):
            seq.computed += item.tokens
            row += item.tokens
            if failure is not None and bool(failed[row - item.tokens:row].any()):
                self._fail(seq, failure)
            elif item.samples and not seq.cancelled:
                rows.append(row - 1)
                sampling.append(seq)
        if not sampling:
            return
        logits = self.model.logits(hidden[torch.tensor(rows)])
        picked = sample(logits, [s.params for s in sampling], [s.generator for s in sampling])
        now = self._clock()
        for i, seq in enumerate(sampling):
            self._emit(seq, int(picked.token_ids[i]), _logprob(picked, i, seq.params.logprobs), now)

    def _emit(self, seq: _Sequence, token: int, logprob: TokenLogprob | None, now: float) -> None:
        seq.tokens.append(token)
        seq.first_token_s = seq.first_token_s or now
        self._generated += 1
        text = seq.detok.add(token)
        reason = None
        if seq.detok.stopped or (token in self._eos and not seq.params.ignore_eos):
            reason = "stop"
        elif seq.generated >= seq.params.max_tokens or len(seq.tokens) >= self.max_model_len:
            reason = "length"
        if reason is not None and not seq.detok.stopped:
            text += seq.detok.flush()
        seq.queue.put_nowait(StepOutput((token,), text, (logprob,) if logprob else (), reason,
                                        seq.prompt_tokens, seq.generated))
        if reason is not None:
            self._retire(seq, reason, now)

    def _retire(self, seq: _Sequence, reason: str, now: float) -> None:
        seq.done = True
        self.allocator.release(seq.blocks)
        seq.blocks = []
        if seq in self._running:
            self._running.remove(seq)
        elif seq in self._waiting:
            self._waiting.remove(seq)
        if reason == "abort":
            return
        tpot = (now - seq.first_token_s) / (seq.generated - 1) if seq.generated > 1 else None
        ttft = seq.first_token_s - seq.arrived_s if seq.first_token_s is not None else None
        if ttft is not None:
            self._ttft.append(ttft)
        if tpot is not None:
            self._tpot.append(tpot)
        if self._metrics is not None:
            self._metrics.finished(seq.prompt_tokens, seq.generated, ttft, tpot, now - seq.arrived_s, reason)

    def _fail(self, seq: _Sequence, err: BaseException) -> None:
        if not seq.done:
            seq.queue.put_nowait(err)
            self._retire(seq, "abort", self._clock())

    def _drop_cancelled(self) -> None:
        for seq in [s for s in (*self._running, *self._waiting) if s.cancelled]:
            self._retire(seq, "abort", self._clock())

    def _report(self) -> None:
        if self._metrics is not None:
            self._metrics.state(len(self._running), len(self._waiting), self.allocator.used_fraction)


def _logprob(picked, row: int, wanted: int | None) -> TokenLogprob | None:
    if wanted is None:
        return None
    top = ()
    if wanted and picked.top_ids is not None:
        top = tuple(zip(picked.top_ids[row, :wanted].tolist(), picked.top_logprobs[row, :wanted].tolist()))
    return TokenLogprob(int(picked.token_ids[row]), float(picked.logprobs[row]), top)
