"""A real tiny text model served over the OpenAI-compatible HTTP API, without Ray: a tiny Mixtral
checkpoint (`workers.tiny_models`), its dense part in a `TextModel`, and its MoE layers run in
process by the checkpoint's own `transformers` MoE blocks (`LocalMoE`). The server and the
engines run on an event loop in a background thread (`LoopThread`); tests talk to them over
loopback with aiohttp's client, on that loop.

`LocalMoE` can be held (its next call waits until released) and can be told to fail every token,
so tests can keep a request in the engine, or fail one, at a moment they choose.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import torch

from router_service.errors import ExpertUnavailable
from router_service.generation.engine import EngineSettings
from router_service.generation.text import TextModel, build_text_model

T = TypeVar("T")
KV_CACHE_BYTES = 8 * 2**20


class LoopThread:
    """An asyncio loop running in a daemon thread; `run` waits for a coroutine's result."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="openai-http-test-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def call(self, fn, *args) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()


class LocalMoE:
    """The checkpoint's own MoE blocks as the engine's `MoECall`: `[N, H]` -> `[N, H]`.
    hold(): later calls wait until release(); failing: every token fails (ExpertUnavailable);
    broken: calls raise (a bug, as the engine sees it)."""

    def __init__(self, hf_model: torch.nn.Module):
        self._hf = hf_model
        self._open = asyncio.Event()
        self._open.set()
        self.failing = False
        self.broken = False
        self.calls = 0
        self.delay_s = 0.0
        self.log: list[tuple[str, int, int]] = []  # ("start" | "end", layer, tokens) of each call

    def hold(self) -> None:  # on the loop
        self._open.clear()

    def release(self) -> None:  # on the loop
        self._open.set()

    async def __call__(self, layer: int, hidden: torch.Tensor, groups=None):
        await self._open.wait()
        self.calls += 1
        self.log.append(("start", layer, hidden.shape[0]))
        await asyncio.sleep(self.delay_s)  # the experts' time, elsewhere: the loop is free meanwhile
        self.log.append(("end", layer, hidden.shape[0]))
        if self.broken:
            raise RuntimeError("secret internals of a bug")
        with torch.no_grad():
            out = self._hf.model.layers[layer].mlp(hidden.float().unsqueeze(0))[0]
        if self.failing:
            return out, torch.ones(hidden.shape[0], dtype=torch.bool), ExpertUnavailable([(layer, 0)])
        return out, None, None


@dataclass
class TextRouter:
    """What the HTTP edge reads of a `ModelRouter`."""

    name: str
    text: TextModel | None
    ready: bool = True
    draining: bool = False

    @property
    def reports_ready(self) -> bool:
        return self.ready and not self.draining


@dataclass
class Recorder:
    """`RequestMetrics` that keeps what it is told: (model, code, latency_s, tokens)."""

    requests: list[tuple[str, str, float, int]] = field(default_factory=list)

    def record_request(self, model: str, code: str, latency_s: float, tokens: int) -> None:
        self.requests.append((model, code, latency_s, tokens))

    def queue(self, model: str, tokens: int) -> None:
        pass

    def codes(self) -> list[str]:
        return [code for _, code, _, _ in self.requests]


def text_model(name: str, path: Path, tensors, moe_layers, moe: LocalMoE, *, max_num_seqs: int = 8,
               max_waiting: int = 16, pipeline: bool = False) -> TextModel:
    settings = EngineSettings(kv_cache_bytes=KV_CACHE_BYTES, block_size=16, max_num_seqs=max_num_seqs,
                              max_batch_tokens=256, prefill_chunk_tokens=64, max_waiting=max_waiting,
                              pipeline_microbatches=pipeline)
    return build_text_model(name, path, tensors, moe_layers, moe, settings, device="cpu", default_max_tokens=16)


# ---- the client side, run on the loop --------------------------------------------------------------


@dataclass
class Answer:
    status: int
    body: Any  # parsed JSON, or the text when it is not JSON

    @property
    def error(self) -> dict:
        assert isinstance(self.body, dict) and set(self.body) == {"error"}, f"not an error object: {self.body!r}"
        assert set(self.body["error"]) == {"message", "type", "param", "code"}, self.body
        return self.body["error"]


async def fetch(url: str, method: str = "POST", body: Any = None, raw: bytes | None = None,
                headers: dict | None = None, ssl=None) -> Answer:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    async with aiohttp.ClientSession() as session, \
            session.request(method, url, data=data, headers=headers, ssl=ssl) as r:
        text = await r.text()
    try:
        return Answer(r.status, json.loads(text))
    except ValueError:
        return Answer(r.status, text)


def parse_events(text: str) -> list[Any]:
    """Server-sent events `data: ...` -> their JSON ("[DONE]" stays a string)."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), f"not an SSE data event: {block!r}"
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


async def stream(url: str, body: dict) -> tuple[int, str, list[Any]]:
    """(status, content type, events) of a streaming call."""
    async with aiohttp.ClientSession() as session, session.post(url, data=json.dumps(body).encode()) as r:
        text = await r.text()
        return r.status, r.headers.get("Content-Type", ""), parse_events(text) if r.status == 200 else [text]
