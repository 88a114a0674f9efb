"""Batch concurrent requests so the workers see big batches.

Requests for the same MoE layer queue up while the workers are busy. When one of
`max_inflight_batches` places in the workers is free, the queued requests form the next batch
(up to `max_batch_tokens`), which may wait up to `max_wait_ms` for more before it goes. A request never
splits; one larger than the limit goes alone. A request cancelled while queued (client gone,
deadline passed) is dropped before it reaches a worker; a batch whose every request is
cancelled is cancelled too, and its shares not yet started are skipped at the workers.

Admission control: a request that would take the model's queue past `max_queued_tokens` is
refused at once with `Overloaded` (unless the queue is empty: a lone large request goes).
Tokens of a batch that could not be served fail only the requests they belong to.

Expert skipping: each request brings its threshold (`router_service.skipping`); a batch that
mixes thresholds passes them per token, and a batch where none skips passes none.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from cluster.config import RouterConfig
from router_service.errors import Overloaded
from router_service.moe_layer import LayerOutput
from router_service.skipping import token_thresholds

# (layer, hidden [T, H] float32, groups [T]: the request of each row[, thresholds [T]: each row's
# expert skip threshold, given only when some row skips]) -> output for the whole batch
ForwardFn = Callable[..., Awaitable[LayerOutput]]


@dataclass
class _Pending:
    hidden: torch.Tensor
    future: asyncio.Future
    enqueued_s: float = field(default_factory=time.perf_counter)
    skip_threshold: float = 0.0

    @property
    def tokens(self) -> int:
        return int(self.hidden.shape[0])


@dataclass(frozen=True)
class RequestResult:
    """One request's slice of a batch output."""

    hidden: torch.Tensor  # [t, H] float32
    topk_ids: torch.Tensor  # [t, k] int64
    topk_weights: torch.Tensor  # [t, k] float32
    placement_version: int
    batch_tokens: int
    queued_s: float


class _LayerQueue:
    def __init__(self, layer: int, forward: ForwardFn, max_batch_tokens: int, max_wait_s: float, inflight: int):
        self.layer = layer
        self._forward = forward
        self._max_tokens = max_batch_tokens
        self._max_wait_s = max_wait_s
        self._slots = asyncio.Semaphore(inflight)
        self._items: deque[_Pending] = deque()
        self._arrived = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._forming: list[_Pending] = []  # taken from the queue, not yet handed to a worker
        self._loop_task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-layer-{layer}")

    def put(self, item: _Pending) -> None:
        self._items.append(item)
        self._arrived.set()

    @property
    def queued_tokens(self) -> int:
        return sum(i.tokens for i in self._items if not i.future.done())

    def oldest_enqueued_s(self) -> float | None:
        """`perf_counter` time the oldest request still waiting was queued; None when none."""
        waiting = [i.enqueued_s for i in (*self._forming, *self._items) if not i.future.done()]
        return min(waiting, default=None)

    def _take(self, batch: list[_Pending], tokens: int) -> int:
        """Move live queued requests into `batch` while they fit; returns the token count."""
        while self._items:
            item = self._items[0]
            if item.future.done():  # cancelled while queued
                self._items.popleft()
                continue
            if batch and tokens + item.tokens > self._max_tokens:
                break
            batch.append(self._items.popleft())
            tokens += item.tokens
        return tokens

    async def _run(self) -> None:
        while True:
            if not self._items:
                self._arrived.clear()
                await self._arrived.wait()
            await self._slots.acquire()  # requests queue up while the workers are busy
            batch = self._forming = []
            tokens = self._take(batch, 0)
            deadline = time.perf_counter() + self._max_wait_s
            while batch and tokens < self._max_tokens and (wait := deadline - time.perf_counter()) > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), wait)
                except asyncio.TimeoutError:
                    break
                tokens = self._take(batch, tokens)
            batch, self._forming = [item for item in batch if not item.future.done()], []
            if not batch:
                self._slots.release()
                continue
            task = asyncio.get_running_loop().create_task(self._serve(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            _cancel_when_abandoned(task, batch)

    async def _serve(self, batch: list[_Pending]) -> None:
        try:
            hidden = batch[0].hidden if len(batch) == 1 else torch.cat([i.hidden for i in batch])
            groups = np.repeat(np.arange(len(batch)), [i.tokens for i in batch])
            thresholds = token_thresholds([i.skip_threshold for i in batch], [i.tokens for i in batch])
            started = time.perf_counter()
            if thresholds is None:
                result = await self._forward(self.layer, hidden, groups)
            else:
                result = await self._forward(self.layer, hidden, groups, thresholds)
        except asyncio.CancelledError:  # closing: nobody is left waiting
            for item in batch:
                item.future.cancel()
            raise
        except Exception as err:  # every waiter gets the batch's error; the loop lives on
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(err)
            return
        finally:
            self._slots.release()
        start = 0
        for item in batch:
            end = start + item.tokens
            if item.future.done():
                pass
            elif result.failed is not None and result.failed[start:end].any():
                item.future.set_exception(result.failure)
            else:
                item.future.set_result(RequestResult(
                    hidden=result.hidden[start:end],
                    topk_ids=result.routing.topk_ids[start:end],
                    topk_weights=result.routing.topk_weights[start:end],
                    placement_version=result.placement_version,
                    batch_tokens=int(hidden.shape[0]),
                    queued_s=started - item.enqueued_s,
                ))
            start = end

    async def close(self) -> None:
        self._loop_task.cancel()
        for item in [*self._forming, *self._items]:
            item.future.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _cancel_when_abandoned(task: asyncio.Task, batch: list[_Pending]) -> None:
    """Cancel `task` once every request of its batch is cancelled (nobody waits for it)."""

    def check(_future: asyncio.Future) -> None:
        if not task.done() and all(item.future.cancelled() for item in batch):
            task.cancel()

    for item in batch:
        item.future.add_done_callback(check)


class Batcher:
    """Per-layer request queues in front of one model's `forward`."""

    def __init__(self, forward: ForwardFn, config: RouterConfig, model: str = "model"):
        """config: the router's section; its batching keys (`max_batch_tokens`, `max_wait_ms`,
        `max_inflight_batches`) and admission limit (`max_queued_tokens`) are read here."""
        self._forward = forward
        self._max_queued = config.max_queued_tokens
        self._model = model
        self._max_tokens = config.max_batch_tokens
        self._max_wait_s = config.max_wait_ms / 1000.0
        self._inflight = config.max_inflight_batches
        self._queues: dict[int, _LayerQueue] = {}

    async def submit(self, layer: int, hidden: torch.Tensor, skip_threshold: float = 0.0) -> RequestResult:
        """hidden: `[t, H]` float32; skip_threshold: the request's expert skip threshold (0:
        none). Cancelling the caller drops the request if still queued. Raises `Overloaded` at
        once when the queue is full."""
        queued = self.queued_tokens
        if queued and queued + hidden.shape[0] > self._max_queued:
            raise Overloaded(
                f"model '{self._model}' is overloaded: {queued} tokens are queued and this request "
                f"adds {hidden.shape[0]} (limit router.max_queued_tokens = {self._max_queued}); "
                f"retry with backoff"
            )
        queue = self._queues.get(layer)
        if queue is None:
            queue = self._queues[layer] = _LayerQueue(
                layer, self._forward, self._max_tokens, self._max_wait_s, self._inflight
            )
        item = _Pending(hidden, asyncio.get_running_loop().create_future(), skip_threshold=skip_threshold)
        queue.put(item)
        return await item.future

    @property
    def queued_tokens(self) -> int:
        return sum(q.queued_tokens for q in self._queues.values())

    def oldest_queued_s(self) -> float:
        """How long the oldest request still waiting for a batch has waited (0 when none)."""
        times = [t for q in self._queues.values() if (t := q.oldest_enqueued_s()) is not None]
        return time.perf_counter() - min(times) if times else 0.0

    async def close(self) -> None:
        await asyncio.gather(*(q.close() for q in self._queues.values()))
        self._queues.clear()
