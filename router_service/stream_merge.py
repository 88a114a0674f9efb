"""One bidirectional stream, many requests at once: `serve_concurrently` starts serving each request
as it is read, and yields every request's responses as they come (a request's own responses in
order). Nothing here knows gRPC; the servicer's `ModelStreamInfer` is a thin loop over it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TypeVar

Request = TypeVar("Request")
Response = TypeVar("Response")

_END = object()  # every request was read and served


@dataclass(frozen=True)
class _Failed:
    error: Exception


async def serve_concurrently(requests: AsyncIterator[Request],
                             serve: Callable[[Request], AsyncIterator[Response]]) -> AsyncIterator[Response]:
    """`serve(request)`'s responses for every request of `requests`, merged as they come.

    Ends when `requests` ends and every request is served. An exception from `requests` (a
    message that does not parse) or escaping a `serve` (a bug: `serve` answers a request's own
    failure as a response) ends it with that exception. Leaving the loop early, or cancelling
    the task that runs it (the client went away), cancels every request still being served.
    """
    out: asyncio.Queue = asyncio.Queue()
    reader = asyncio.get_running_loop().create_task(_read(requests, serve, out.put_nowait))
    try:
        while (item := await out.get()) is not _END:
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)


async def _read(requests: AsyncIterator[Request], serve: Callable[[Request], AsyncIterator[Response]],
                put: Callable[[object], None]) -> None:
    tasks: set[asyncio.Task] = set()
    try:
        async for request in requests:
            task = asyncio.get_running_loop().create_task(_drain(serve(request), put))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
        put(_END)
    except Exception as err:
        put(_Failed(err))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _drain(responses: AsyncIterator[Response], put: Callable[[object], None]) -> None:
    try:
        async for response in responses:
            put(response)
    except Exception as err:
        put(_Failed(err))
