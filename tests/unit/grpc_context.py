"""A stand-in for `grpc.aio.ServicerContext` in unit tests: `abort` raises, as the real one does."""

from __future__ import annotations

import grpc


class Aborted(grpc.aio.AbortError):
    """What the real context raises (an `AbortError`), with the status it was given."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class FakeContext:
    """What `grpc.aio.ServicerContext.abort` does: raise, never return."""

    async def abort(self, code, details="", trailing_metadata=()):
        raise Aborted(code, details)

    def code(self):
        return None
