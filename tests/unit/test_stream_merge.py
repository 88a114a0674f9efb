"""`serve_concurrently`: the requests of one stream are served at once, each request's responses
stay in order, and leaving early (the client went away) cancels what is still being served. And
the inference servicer's stream over it answers a failed request with an error response."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from router_service.stream_merge import serve_concurrently

TIMEOUT_S = 5.0


async def from_list(items: list, then: asyncio.Event | None = None) -> AsyncIterator:
    """`items`, then (with `then`) stay open until it is set, like a client that keeps the stream open."""
    for item in items:
        yield item
    if then is not None:
        await then.wait()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT_S))


def test_requests_are_served_at_once_and_each_keeps_its_order() -> None:
    async def scenario() -> list:
        gates = {"a": asyncio.Event(), "b": asyncio.Event()}

        async def serve(name: str) -> AsyncIterator[str]:
            # a's second piece waits for b's first: only concurrent serving can finish
            yield f"{name}1"
            other = "b" if name == "a" else "a"
            gates[name].set()
            await gates[other].wait()
            yield f"{name}2"

        return [r async for r in serve_concurrently(from_list(["a", "b"]), serve)]

    got = run(scenario())

    assert sorted(got) == ["a1", "a2", "b1", "b2"]
    assert got.index("a1") < got.index("a2") and got.index("b1") < got.index("b2")


def test_it_ends_only_when_the_requests_end_and_every_one_is_served() -> None:
    async def scenario() -> list:
        release = asyncio.Event()

        async def serve(n: int) -> AsyncIterator[int]:
            await release.wait()
            yield n

        merged = serve_concurrently(from_list([1, 2]), serve)
        first = asyncio.ensure_future(merged.__anext__())
        await asyncio.sleep(0.01)
        assert not first.done(), "nothing is served yet: the stream must not end"
        release.set()
        return [await first] + [r async for r in merged]

    assert sorted(run(scenario())) == [1, 2]


def test_leaving_early_cancels_every_request_still_being_served() -> None:
    async def scenario() -> tuple[list, list]:
        finished, started = [], asyncio.Event()
        client_open = asyncio.Event()  # never set: the client keeps the stream open

        async def serve(n: int) -> AsyncIterator[int]:
            try:
                yield n
                started.set()
                await asyncio.Event().wait()  # generates forever
            finally:
                finished.append(n)

        merged = serve_concurrently(from_list([1, 2], then=client_open), serve)
        got = [await merged.__anext__(), await merged.__anext__()]
        await started.wait()
        await merged.aclose()  # the client went away
        return got, finished

    got, finished = run(scenario())

    assert sorted(got) == [1, 2]
    assert sorted(finished) == [1, 2], "every request's generation must be closed"


def test_cancelling_the_task_that_reads_it_cancels_the_requests() -> None:
    async def scenario() -> list:
        finished = []

        async def serve(n: int) -> AsyncIterator[int]:
            try:
                yield n
                await asyncio.Event().wait()
            finally:
                finished.append(n)

        async def consume(got: list) -> None:
            async for response in serve_concurrently(from_list([7], then=asyncio.Event()), serve):
                got.append(response)

        got: list = []
        task = asyncio.ensure_future(consume(got))
        while not got:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return finished

    assert run(scenario()) == [7]


def test_an_error_reading_the_requests_ends_it_with_that_error() -> None:
    async def requests() -> AsyncIterator[int]:
        yield 1
        raise ValueError("message 2 does not parse")

    async def serve(n: int) -> AsyncIterator[int]:
        await asyncio.Event().wait()  # would never finish: the error must not wait for it
        yield n

    async def scenario() -> None:
        async for _ in serve_concurrently(requests(), serve):
            pass

    with pytest.raises(ValueError, match="message 2 does not parse"):
        run(scenario())


def test_an_error_escaping_serve_ends_it_at_once() -> None:
    async def serve(n: int) -> AsyncIterator[int]:
        raise RuntimeError(f"bug serving {n}")
        yield n  # an async generator

    async def scenario() -> None:
        async for _ in serve_concurrently(from_list([3], then=asyncio.Event()), serve):
            pass

    with pytest.raises(RuntimeError, match="bug serving 3"):
        run(scenario())


# ---- the servicer's stream, without a model -----------------------------------------------------


class RecordedMetrics:
    """A `RequestMetrics` that keeps what it is told."""

    def __init__(self):
        self.requests: list[tuple[str, str, int]] = []

    def record_request(self, model: str, code: str, latency_s: float, tokens: int) -> None:
        self.requests.append((model, code, tokens))

    def queue(self, model: str, tokens: int) -> None:
        pass


def test_a_failed_request_on_the_inference_stream_is_an_error_response_with_its_code() -> None:
    from protos import grpc_predict_v2_pb2 as pb
    from router_service.servicer import InferenceServicer

    metrics = RecordedMetrics()
    servicer = InferenceServicer({}, metrics)

    async def scenario() -> list:
        requests = from_list([pb.ModelInferRequest(model_name="nope", model_version="1", id=f"r{i}") for i in range(2)])
        return [r async for r in servicer.ModelStreamInfer(requests, None)]

    responses = run(scenario())

    assert [r.infer_response.id for r in responses] == ["r0", "r1"]
    for response in responses:
        assert response.error_message == "NOT_FOUND: unknown model 'nope'; this server serves []"
        assert response.infer_response.model_name == "nope" and response.infer_response.model_version == "1"
        assert response.infer_response.parameters["triton_final_response"].bool_param is True
    assert metrics.requests == [("nope", "NOT_FOUND", 0)] * 2
