"""The batcher in front of a fake forward (no Ray): concurrent requests share batches, the token
limit holds, every caller gets exactly its own rows, cancelled requests never reach the workers,
errors reach every waiter of their batch, layers stay apart, and close() leaves no caller hanging.

Every scenario runs under `asyncio.run` with an overall timeout, so a batcher that loses a request
fails the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import numpy as np
import pytest
import torch

from cluster.config import RouterConfig
from router_service.batcher import Batcher, RequestResult
from router_service.errors import ExpertUnavailable, Overloaded
from router_service.gate import Routing
from router_service.moe_layer import LayerOutput

H = 4
PLACEMENT_VERSION = 7
SCENARIO_TIMEOUT_S = 10.0


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(scenario(), SCENARIO_TIMEOUT_S)

    asyncio.run(bounded())


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait for `condition` to hold, checking after each turn of the event loop."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.001)


def rows(request_id: int, tokens: int, layer: int = 0) -> torch.Tensor:
    """`[tokens, H]`: column 0 request id, 1 row within the request, 2 layer, 3 noise."""
    hidden = torch.empty(tokens, H)
    hidden[:, 0] = request_id
    hidden[:, 1] = torch.arange(tokens)
    hidden[:, 2] = layer
    hidden[:, 3] = torch.rand(tokens)
    return hidden


class FakeModel:
    """A forward function that records its batches.

    Output rows are `hidden * 2`; routing ids are (request id, row) taken from the input, so a
    caller can tell its own rows. `hold_first` keeps the first batch in the "workers" until
    `release` is set; batches whose call number is in `fail_calls` raise.
    """

    def __init__(self, hold_first: bool = False, fail_calls: tuple[int, ...] = ()):
        self.hold_first = hold_first
        self.fail_calls = fail_calls
        self.batches: list[tuple[int, list[int], int]] = []  # (layer, request ids, tokens)
        self.first_started = asyncio.Event()
        self.release = asyncio.Event()

    async def forward(self, layer: int, hidden: torch.Tensor, groups=None) -> LayerOutput:
        call = len(self.batches)
        ids = torch.unique_consecutive(hidden[:, 0]).long().tolist()
        self.batches.append((layer, ids, int(hidden.shape[0])))
        assert (hidden[:, 2] == layer).all(), "rows of another layer in this batch"
        if call == 0:
            self.first_started.set()
            if self.hold_first:
                await self.release.wait()
        if call in self.fail_calls:
            raise RuntimeError(f"boom in batch {call}")
        await asyncio.sleep(0)  # the workers take a moment
        tokens = hidden.shape[0]
        routing = Routing(hidden[:, :2].long(), torch.full((tokens, 2), 0.5))
        return LayerOutput(hidden * 2, routing, np.zeros(4, dtype=np.int64), PLACEMENT_VERSION)

    def request_ids(self) -> list[list[int]]:
        return [ids for _, ids, _ in self.batches]


class Client:
    """Submits requests as tasks and knows when each has been handed to the batcher."""

    def __init__(self, batcher: Batcher):
        self.batcher = batcher
        self.entered = 0

    def submit(self, request_id: int, tokens: int, layer: int = 0) -> tuple[torch.Tensor, asyncio.Task]:
        hidden = rows(request_id, tokens, layer)

        async def call() -> RequestResult:
            self.entered += 1  # submit() queues the request before its first await
            return await self.batcher.submit(layer, hidden)

        return hidden, asyncio.get_running_loop().create_task(call())

    async def all_entered(self, n: int) -> None:
        await until(lambda: self.entered == n)


def assert_own_rows(result: RequestResult, hidden: torch.Tensor) -> None:
    torch.testing.assert_close(result.hidden, hidden * 2, rtol=0, atol=0)
    assert torch.equal(result.topk_ids, hidden[:, :2].long())
    assert result.topk_weights.shape == (hidden.shape[0], 2)
    assert result.placement_version == PLACEMENT_VERSION


# ---------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------


def test_simultaneous_submits_share_one_batch() -> None:
    async def scenario() -> None:
        model = FakeModel()
        batcher = Batcher(model.forward, RouterConfig(max_batch_tokens=100, max_wait_ms=1.0, max_inflight_batches=2))
        client = Client(batcher)
        submitted = [client.submit(i, tokens) for i, tokens in enumerate([2, 1, 3])]

        results = await asyncio.gather(*(task for _, task in submitted))

        assert model.request_ids() == [[0, 1, 2]]
        for (hidden, _), result in zip(submitted, results):
            assert_own_rows(result, hidden)
            assert result.batch_tokens == 6
            assert result.queued_s >= 0
        await batcher.close()

    run(scenario)


def test_requests_arriving_while_workers_are_busy_join_one_batch() -> None:
    async def scenario() -> None:
        model = FakeModel(hold_first=True)
        batcher = Batcher(model.forward, RouterConfig(max_batch_tokens=100, max_wait_ms=1.0, max_inflight_batches=1))
        client = Client(batcher)
        first = client.submit(0, 2)
        await model.first_started.wait()
        later = [client.submit(i, tokens) for i, tokens in [(1, 1), (2, 3), (3, 2)]]
        await client.all_entered(4)

        model.release.set()
        results = await asyncio.gather(first[1], *(task for _, task in later))

        assert model.request_ids() == [[0], [1, 2, 3]]
        assert [r.batch_tokens for r in results] == [2, 6, 6, 6]
        for (hidden, _), result in zip([first, *later], results):
            assert_own_rows(result, hidden)
        await batcher.close()

    run(scenario)


def test_token_limit_holds_and_requests_never_split() -> None:
    async def scenario() -> None:
        model = FakeModel(hold_first=True)
        batcher = Batcher(model.forward, RouterConfig(max_batch_tokens=8, max_wait_ms=1.0, max_inflight_batches=1))
        client = Client(batcher)
        first = client.submit(0, 1)
        await model.first_started.wait()
        sizes = {1: 3, 2: 4, 3: 2, 4: 10, 5: 1}
        later = [client.submit(i, tokens) for i, tokens in sizes.items()]
        await client.all_entered(6)

        model.release.set()
        results = await asyncio.gather(first[1], *(task for _, task in later))

        # 3 + 4 = 7 fits; + 2 would be 9 > 8. 2 + 10 > 8. 10 > 8 goes alone.
        assert model.request_ids() == [[0], [1, 2], [3], [4], [5]]
        assert [tokens for _, _, tokens in model.batches] == [1, 7, 2, 10, 1]
        for (hidden, _), result in zip([first, *later], results):
            assert_own_rows(result, hidden)
        await batcher.close()

    run(scenario)


def test_full_batch_does_not_wait_for_max_wait() -> None:
    async def scenario() -> None:
        model = FakeModel()
        # a 60 s window: the request only returns in time if a full batch closes at once
        batcher = Batcher(model.forward, RouterConfig(max_batch_tokens=4, max_wait_ms=60_000, max_inflight_batches=1))
        hidden = rows(0, 4)

        result = await asyncio.wait_for(batcher.submit(0, hidden), 5.0)

        assert_own_rows(result, hidden)
        await batcher.close()

    run(scenario)


def test_wait_window_collects_later_requests_until_the_batch_is_full() -> None:
    async def scenario() -> None:
        model = FakeModel()
        # a 60 s window: the test only finishes in time because the batch fills up and goes
        batcher = Batcher(model.forward, RouterConfig(max_batch_tokens=5, max_wait_ms=60_000, max_inflight_batches=1))
        client = Client(batcher)
        first = client.submit(0, 2)
        await client.all_entered(1)
        await until(lambda: batcher.queued_tokens == 0)  # the batch is forming
        second = client.submit(1, 3)

        results = await asyncio.gather(first[1], second[1])

        assert model.request_ids() == [[0, 1]]
        assert [r.batch_tokens for r in results] == [5, 5]
        assert_own_rows(results[0], first[0])
        assert_own_rows(results[1], second[0])
        await batcher.close()

    run(scenario)


def test_many_concurrent_callers_each_get_their_own_rows() -> None:
    async def scenario() -> None:
        model = FakeModel()
        batcher = Batcher(model.forward, RouterConfig(max_batch_tokens=16, max_wait_ms=0.5, max_inflight_batches=2))
        client = Client(batcher)
        rng = np.random.default_rng(0)
        submitted = [client.submit(i, int(rng.integers(1, 9))) for i in range(40)]

        results = await asyncio.gather(*(task for _, task in submitted))

        for (hidden, _), result in zip(submitted, results):
            assert_own_rows(result, hidden)
        served = sorted(i for ids in model.request_ids() for i in ids)
        assert served == list(range(40)), "every request served exactly once"
        assert all(tokens <= 16 for _, _, tokens in model.batches)
        await batcher.close()

    run(scenario)


# ---------------------------------------------------------------------------------------------
# Cancellation, errors, layers
# ---------------------------------------------------------------------------------------------


def test_request_cancelled_while_queued_never_reaches_forward() -> None:
    async def scenario() -> None:
        model = FakeModel(hold_first=True)
        batcher = Batcher(model.forward, RouterConfig(max_batch_tokens=100, max_wait_ms=1.0, max_inflight_batches=1))
        client = Client(batcher)
        first = client.submit(0, 1)
        await model.first_started.wait()
        _, gone = client.submit(1, 2)
        kept = client.submit(2, 3)
        await client.all_entered(3)

        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        model.release.set()
        results = await asyncio.gather(first[1], kept[1])

        assert model.request_ids() == [[0], [2]]
        assert_own_rows(results[1], kept[0])
        assert results[1].batch_tokens == 3
        await batcher.close()

    run(scenario)


def test_all_requests_cancelled_leaves_the_batcher_working() -> None:
    async def scenario() -> None:
        model = FakeModel(hold_first=True)
        batcher = Batcher(model.forward, RouterConfig(max_batch_tokens=100, max_wait_ms=1.0, max_inflight_batches=1))
        client = Client(batcher)
        first = client.submit(0, 1)
        await model.first_started.wait()
        cancelled = [client.submit(i, 1)[1] for i in (1, 2)]
        await client.all_entered(3)
        for task in cancelled:
            task.cancel()
        await asyncio.gather(*cancelled, return_exceptions=True)
        model.release.set()
        await first[1]

        hidden = rows(3, 2)
        result = await batcher.submit(0, hidden)

        assert_own_rows(result, hidden)
        assert model.request_ids() == [[0], [3]]
        await batcher.close()

    run(scenario)


def test_forward_error_reaches_every_waiter_and_the_next_batch_works() -> None:
    async def scenario() -> None:
        model = FakeModel(hold_first=True, fail_calls=(1,))
        batcher = Batcher(model.forward, RouterConfig(max_batch_tokens=100, max_wait_ms=1.0, max_inflight_batches=1))
        client = Client(batcher)
        first = client.submit(0, 1)
        await model.first_started.wait()
        failing = [client.submit(i, 2)[1] for i in (1, 2)]
        await client.all_entered(3)
        model.release.set()

        assert_own_rows(await first[1], first[0])
        outcomes = await asyncio.gather(*failing, return_exceptions=True)
        assert [str(o) for o in outcomes] == ["boom in batch 1", "boom in batch 1"]
        assert all(isinstance(o, RuntimeError) for o in outcomes)

        # the in-flight place was given back: with max_inflight_batches=1 this would hang otherwise
        hidden = rows(3, 2)
        assert_own_rows(await batcher.submit(0, hidden), hidden)
        assert model.request_ids() == [[0], [1, 2], [3]]
        await batcher.close()

    run(scenario)


def test_layers_are_batched_apart() -> None:
    async def scenario() -> None:
        model = FakeModel()
        batcher = Batcher(model.forward, RouterConfig(max_batch_tokens=100, max_wait_ms=1.0, max_inflight_batches=1))
        client = Client(batcher)
        submitted = [client.submit(i, 2, layer=i % 2) for i in range(6)]

        results = await asyncio.gather(*(task for _, task in submitted))

        # FakeModel.forward asserts that every row of a batch belongs to the batch's layer
        assert sorted((layer, ids) for layer, ids, _ in model.batches) == [(0, [0, 2, 4]), (1, [1, 3, 5])]
        for (hidden, _), result in zip(submitted, results):
            assert_own_rows(result, hidden)
        await batcher.close()

    run(scenario)


# ---------------------------------------------------------------------------------------------
# close()
# ---------------------------------------------------------------------------------------------


def test_close_then_submit_again() -> None:
    async def scenario() -> None:
        model = FakeModel()
        batcher = Batcher(model.forward, RouterConfig(max_batch_tokens=100, max_wait_ms=1.0, max_inflight_batches=1))
        hidden = rows(0, 2)
        assert_own_rows(await batcher.submit(0, hidden), hidden)

        await batcher.close()
        assert batcher.queued_tokens == 0
        hidden = rows(1, 3, layer=0)
        assert_own_rows(await batcher.submit(0, hidden), hidden)

        assert model.request_ids() == [[0], [1]]
        await batcher.close()

    run(scenario)


def test_close_cancels_requests_queued_behind_busy_workers() -> None:
    async def scenario() -> None:
        model = FakeModel(hold_first=True)
        batcher = Batcher(model.forward, RouterConfig(max_batch_tokens=100, max_wait_ms=0.0, max_inflight_batches=1))
        client = Client(batcher)
        first = client.submit(0, 1)
        await model.first_started.wait()
        queued = [client.submit(i, 2)[1] for i in (1, 2)]
        await client.all_entered(3)
        assert batcher.queued_tokens == 4

        closing = asyncio.get_running_loop().create_task(batcher.close())
        model.release.set()
        await closing

        # the in-flight batch finishes; the queued requests are cancelled, never served
        assert_own_rows(await first[1], first[0])
        done, pending = await asyncio.wait(queued, timeout=2.0)
        assert not pending, "close() left a submit() waiting forever"
        assert all(task.cancelled() for task in queued)
        assert model.request_ids() == [[0]]

    run(scenario)


def test_close_during_the_wait_window_leaves_no_caller_waiting() -> None:
    async def scenario() -> None:
        model = FakeModel()
        # a 60 s window: the batch is formed and waits for more requests when close() comes
        batcher = Batcher(model.forward, RouterConfig(max_batch_tokens=100, max_wait_ms=60_000, max_inflight_batches=1))
        client = Client(batcher)
        _, waiting = client.submit(0, 2)
        await client.all_entered(1)
        await until(lambda: batcher.queued_tokens == 0)  # taken into the forming batch

        await batcher.close()

        done, pending = await asyncio.wait([waiting], timeout=2.0)
        assert not pending, "close() left a submit() in the forming batch waiting forever"
        assert waiting.cancelled() or waiting.exception() is None

    run(scenario)


# ---------------------------------------------------------------------------------------------
# Faults and admission control
# ---------------------------------------------------------------------------------------------


class UnservedModel(FakeModel):
    """Marks the rows of request `bad_id` failed, as the layer does for tokens whose experts
    have no live replica."""

    def __init__(self, bad_id: int):
        super().__init__()
        self.bad_id = bad_id

    async def forward(self, layer: int, hidden: torch.Tensor, groups=None) -> LayerOutput:
        out = await super().forward(layer, hidden)
        failed = (hidden[:, 0] == self.bad_id).numpy()
        return LayerOutput(out.hidden, out.routing, out.expert_tokens, out.placement_version, failed,
                           ExpertUnavailable([(0, 3)]))


def test_failed_tokens_fail_only_their_own_request() -> None:
    async def scenario() -> None:
        model = UnservedModel(bad_id=2)
        batcher = Batcher(model.forward, RouterConfig(max_batch_tokens=100, max_wait_ms=5.0, max_inflight_batches=1))
        client = Client(batcher)
        calls = [client.submit(i, 3) for i in (1, 2, 3)]
        done = await asyncio.gather(*(task for _, task in calls), return_exceptions=True)
        assert model.request_ids() == [[1, 2, 3]]  # one batch
        assert isinstance(done[1], ExpertUnavailable)
        assert_own_rows(done[0], calls[0][0])
        assert_own_rows(done[2], calls[2][0])

    run(scenario)


def test_a_full_queue_refuses_at_once_and_a_lone_large_request_still_goes() -> None:
    async def scenario() -> None:
        model = FakeModel(hold_first=True)
        batcher = Batcher(model.forward, RouterConfig(max_batch_tokens=100, max_wait_ms=0.0, max_inflight_batches=1,
                                                      max_queued_tokens=10), model="m")
        client = Client(batcher)
        _, first = client.submit(1, 50)  # more than the limit, alone: it goes
        await model.first_started.wait()
        _, queued = client.submit(2, 8)
        await client.all_entered(2)
        with pytest.raises(Overloaded, match="router.max_queued_tokens = 10"):
            await batcher.submit(0, rows(3, 4))
        model.release.set()
        assert (await first).hidden.shape[0] == 50
        assert (await queued).hidden.shape[0] == 8

    run(scenario)


def test_a_batch_whose_every_request_is_cancelled_is_cancelled_in_the_workers() -> None:
    async def scenario() -> None:
        model = FakeModel(hold_first=True)
        batcher = Batcher(model.forward, RouterConfig(max_batch_tokens=100, max_wait_ms=0.0, max_inflight_batches=1))
        client = Client(batcher)
        _, a = client.submit(1, 4)
        await model.first_started.wait()
        assert len(batcher._queues[0]._tasks) == 1
        a.cancel()
        await until(lambda: not batcher._queues[0]._tasks)  # the running batch was cancelled
        _, b = client.submit(2, 4)  # its slot is free again
        model.release.set()
        assert (await b).hidden.shape[0] == 4

    run(scenario)
