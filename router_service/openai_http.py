"""The OpenAI-compatible HTTP API beside the gRPC port (aiohttp): text generation with the models'
`TextModel`s, for the stock OpenAI clients.

| route                               | what                                                        |
|-------------------------------------|-------------------------------------------------------------|
| `GET /health`                       | 200 while serving, 503 otherwise (load balancers; no token) |
| `GET /v1/models`, `/v1/models/{id}` | the models that generate text                               |
| `POST /v1/completions`              | prompts (text or token ids), streaming or not               |
| `POST /v1/chat/completions`         | messages through the chat template, streaming or not        |

A request body is checked by `openai_schema` (types, then values through `SamplingParams`), each
prompt goes to the engine as its own sequence (`TextModel.generate`), and the answer is built by
`openai_format`. Streams are server-sent events: chunks, a finish chunk per choice, a usage chunk
(always: every answer has its counts), then `data: [DONE]`.

Errors become HTTP statuses and OpenAI error objects in one place (`error_kind`); an error in the
middle of a stream is sent as a `data: {"error": ...}` event, and the stream ends. A client that
goes away cancels its handler (`handler_cancellation`), which cancels its streams: the engine
frees their sequences at its next step.

Security is the gRPC port's (`security:`): TLS (mutual with `tls_client_ca_file`) and bearer
tokens (`Authorization: Bearer <token>`) on every /v1 call, with the gRPC port's rule for
inference calls (`security.http_denial`); /health is open.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from cluster.config import is_loopback_host
from router_service.errors import ExpertUnavailable, InvalidRequest, ModelNotReady, Overloaded, UnknownModel, WorkerLost
from router_service.generation.engine import GenerationStream, StepOutput
from router_service.generation.params import SamplingParams
from router_service.generation.text import TextModel
from router_service.openai_format import (
    ChatFormat,
    Choice,
    CompletionFormat,
    Header,
    error_object,
    model_card,
    sse,
    usage_chunk,
)
from router_service.openai_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    FieldError,
    fit_max_tokens,
    parse_request,
)
from router_service.router import ModelRouter
from router_service.security import ServerSecurity, TokenPolicy, http_denial, http_ssl_context
from router_service.servicer import RequestMetrics
from router_service.stream_merge import serve_concurrently

if TYPE_CHECKING:
    from cluster.config import SecurityConfig

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 2**20
CLOSE_TIMEOUT_S = 0.5  # after the grace period: how long cancelled handlers get to unwind


# ---- errors: domain errors to HTTP, in one place -------------------------------------------------


class Unauthenticated(Exception):
    """No usable bearer token; `str()` says what to send."""


class UnknownPath(LookupError):
    """No such route."""


@dataclass(frozen=True)
class ErrorKind:
    """status: HTTP; kind, code: the OpenAI error object's `type` and `code`; status_name: the gRPC
    status the request is counted under in the metrics (so dashboards line up with the gRPC port)."""

    status: int
    kind: str
    code: str | None
    status_name: str


_UNAVAILABLE = ErrorKind(503, "service_unavailable_error", "unavailable", "UNAVAILABLE")
# What a client should do: 400, 404 — change the request; 401 — send a token; 429 — back off,
# then retry; 503 — retry (the service repairs itself, or is still starting).
_ERRORS: dict[type[Exception], ErrorKind] = {
    InvalidRequest: ErrorKind(400, "invalid_request_error", None, "INVALID_ARGUMENT"),
    Unauthenticated: ErrorKind(401, "authentication_error", "invalid_api_key", "UNAUTHENTICATED"),
    UnknownModel: ErrorKind(404, "invalid_request_error", "model_not_found", "NOT_FOUND"),
    UnknownPath: ErrorKind(404, "invalid_request_error", "unknown_url", "NOT_FOUND"),
    Overloaded: ErrorKind(429, "rate_limit_error", "overloaded", "RESOURCE_EXHAUSTED"),
    ModelNotReady: _UNAVAILABLE,
    WorkerLost: _UNAVAILABLE,
    ExpertUnavailable: _UNAVAILABLE,
}
INTERNAL = ErrorKind(500, "server_error", "internal_error", "INTERNAL")


def error_kind(err: BaseException) -> ErrorKind:
    """How `err` is answered: INTERNAL for anything that is not a domain error (its message stays
    in the server log); aiohttp's own refusals (e.g. a method a route does not take) keep their status."""
    if isinstance(err, web.HTTPException):
        return ErrorKind(err.status, "invalid_request_error", None, "INVALID_ARGUMENT")
    return next((kind for cls, kind in _ERRORS.items() if isinstance(err, cls)), INTERNAL)


def error_body(err: BaseException, what: str) -> tuple[ErrorKind, dict]:
    """The OpenAI error object for `err`; an unexpected error is logged and answered generically."""
    kind = error_kind(err)
    if kind is INTERNAL:
        log.error("%s failed", what, exc_info=err)
        message = f"{what} failed inside the server; see the server log"
    else:
        message = str(err) or getattr(err, "reason", type(err).__name__)
    return kind, error_object(message, kind.kind, getattr(err, "param", None), kind.code)


def error_response(err: BaseException, what: str) -> web.Response:
    kind, body = error_body(err, what)
    return web.json_response(body, status=kind.status)


# ---- streams ----------------------------------------------------------------------------------


def merged(streams: Sequence[GenerationStream]) -> AsyncIterator[tuple[int, StepOutput]]:
    """The outputs of several streams as they come, as (stream index, output); the first error
    raised by any is raised here. Leaving early (or being cancelled) cancels every stream."""
    async def indexed() -> AsyncIterator[tuple[int, GenerationStream]]:
        for item in enumerate(streams):
            yield item

    async def outputs(item: tuple[int, GenerationStream]) -> AsyncIterator[tuple[int, StepOutput]]:
        i, stream = item
        async for out in stream:
            yield i, out

    return serve_concurrently(indexed(), outputs)


# ---- the API ------------------------------------------------------------------------------------


class OpenAIApi:
    """The routes' handlers over `models`; serving: what /health says; stopping: /v1 refused."""

    def __init__(self, models: Mapping[str, ModelRouter], policy: TokenPolicy, metrics: RequestMetrics | None,
                 clock: Callable[[], float] = time.time):
        self._models, self._policy, self._metrics, self._clock = models, policy, metrics, clock
        self._created = int(clock())
        self.serving = False
        self.stopping = False
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._edge], client_max_size=MAX_BODY_BYTES)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/v1/models/{model}", self.get_model)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        return app

    async def wait_idle(self, timeout_s: float) -> bool:
        """True once no request is in flight, False if some still are after `timeout_s`."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    @web.middleware
    async def _edge(self, request: web.Request, handler) -> web.StreamResponse:
        """Tokens and shutdown for /v1; every error as an OpenAI error object; in-flight count."""
        what = f"{request.method} {request.path}"
        if request.path.startswith("/v1"):
            if self.stopping:
                return error_response(ModelNotReady("the server is shutting down; retry on another replica"), what)
            denial = http_denial(self._policy, request.headers.get("Authorization"))
            if denial is not None:
                return error_response(Unauthenticated(denial), what)
        self._inflight += 1
        self._idle.clear()
        try:
            return await handler(request)
        except web.HTTPNotFound:
            return error_response(UnknownPath(f"no route {what}: this server serves /health, /v1/models, "
                                              f"/v1/completions and /v1/chat/completions"), what)
        except Exception as err:
            return error_response(err, what)
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    async def health(self, request: web.Request) -> web.Response:
        if self.serving and not self.stopping:
            return web.json_response({"status": "ok"})
        return web.json_response({"status": "unavailable"}, status=503)

    def _text_models(self) -> dict[str, TextModel]:
        return {name: r.text for name, r in self._models.items() if r.text is not None}

    async def list_models(self, request: web.Request) -> web.Response:
        cards = [model_card(name, self._created, text.max_model_len) for name, text in self._text_models().items()]
        return web.json_response({"object": "list", "data": cards})

    async def get_model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        text = self._text_models().get(name)
        if text is None:
            raise self._unknown(name)
        return web.json_response(model_card(name, self._created, text.max_model_len))

    def _unknown(self, name: str) -> UnknownModel:
        router = self._models.get(name)
        why = "serves MoE layers only (no text generation)" if router is not None else "is not served here"
        return UnknownModel(f"model '{name}' {why}; the models that generate text here are {sorted(self._text_models())}")

    def _text_model(self, name: str) -> TextModel:
        router = self._models.get(name)
        if router is None or router.text is None:
            raise self._unknown(name)
        if not router.ready:
            raise ModelNotReady(f"model '{name}' is not ready yet; retry shortly")
        return router.text

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, CompletionRequest)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, ChatCompletionRequest)

    async def _generate(self, request: web.Request,
                        kind: type[CompletionRequest | ChatCompletionRequest]) -> web.StreamResponse:
        """One generation request, counted once in the metrics however it ends; its streams are
        cancelled however it ends."""
        start, model, status = time.perf_counter(), "", "OK"
        streams: list[GenerationStream] = []
        choices: list[Choice] = []
        try:
            req = parse_request(kind, await _read_body(request))
            model = req.model
            text = self._text_model(model)
            params = req.sampling_params(text.default_max_tokens)
            if isinstance(req, CompletionRequest):
                prompts = [text.prompt_ids(p) for p in req.prompt]
                fmt = CompletionFormat(text.token_text, req.logprobs is not None)
            else:
                prompts = [text.chat_ids(req.messages)]
                fmt = ChatFormat(text.token_text, bool(req.logprobs))
            streams = _submit(text, prompts, params, req.asked_max_tokens)
            choices = [Choice(i, s.prompt_tokens) for i, s in enumerate(streams)]
            header = Header(f"{fmt.id_prefix}{uuid.uuid4().hex}", int(self._clock()), model)
            if req.stream:
                response, status = await self._stream(request, streams, choices, header, fmt)
                return response
            async with aclosing(merged(streams)) as outputs:
                async for i, out in outputs:
                    choices[i].add(out)
            return web.json_response(fmt.whole(header, choices))
        except asyncio.CancelledError:
            status = "CANCELLED"  # the client went away
            raise
        except Exception as err:
            status = error_kind(err).status_name
            raise
        finally:
            for stream in streams:
                stream.cancel()
            if self._metrics is not None:
                tokens = sum(c.prompt_tokens + c.completion_tokens for c in choices)
                self._metrics.record_request(model, status, time.perf_counter() - start, tokens)

    async def _stream(self, request: web.Request, streams: Sequence[GenerationStream], choices: list[Choice],
                      header: Header, fmt: CompletionFormat | ChatFormat) -> tuple[web.StreamResponse, str]:
        """Send the streams as server-sent events; returns the response and the request's status
        name. Once the headers are sent an error is an event, and the stream ends."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        try:
            await response.prepare(request)
            for chunk in fmt.first_chunks(header, choices):
                await response.write(sse(chunk))
            async with aclosing(merged(streams)) as outputs:
                async for i, out in outputs:
                    for chunk in fmt.step_chunks(header, choices[i], out):
                        await response.write(sse(chunk))
                    choices[i].add(out)
                    if out.finish_reason is not None:
                        await response.write(sse(fmt.finish_chunk(header, choices[i])))
            await response.write(sse(usage_chunk(header, fmt.object, choices)))
            await response.write(sse("[DONE]"))
            return response, "OK"
        except ConnectionResetError:  # the client went away while we wrote
            return response, "CANCELLED"
        except Exception as err:
            kind, body = error_body(err, f"{request.method} {request.path} for model '{header.model}'")
            try:
                await response.write(sse(body))
            except ConnectionResetError:
                return response, "CANCELLED"
            return response, kind.status_name


async def _read_body(request: web.Request) -> bytes:
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise FieldError(f"the request body is larger than {MAX_BODY_BYTES} bytes", None) from None


def _submit(text: TextModel, prompts: Sequence[list[int]], params: SamplingParams,
            asked_max_tokens: bool) -> list[GenerationStream]:
    """Queue one sequence per prompt. Every prompt is checked against the context before any is
    queued; if the engine refuses one (Overloaded), those already queued are cancelled."""
    fitted = [fit_max_tokens(params, asked_max_tokens, len(ids), text.max_model_len) for ids in prompts]
    for ids, p in zip(prompts, fitted):
        p.check_length(len(ids), text.max_model_len)
    streams: list[GenerationStream] = []
    try:
        for ids, p in zip(prompts, fitted):
            streams.append(text.generate(ids, p))
    except BaseException:
        for stream in streams:
            stream.cancel()
        raise
    return streams


# ---- the server ---------------------------------------------------------------------------------


class HttpServer:
    """A running OpenAI-compatible server. port: the bound port."""

    def __init__(self, api: OpenAIApi, runner: web.AppRunner, site: web.TCPSite, port: int):
        self._api, self._runner, self._site, self.port = api, runner, site, port
        self._stopped = False

    def __repr__(self) -> str:
        return f"HttpServer(port={self.port}, serving={self._api.serving})"

    async def set_serving(self, serving: bool) -> None:
        """What /health says (200 or 503); requests are served either way until `stop`."""
        self._api.serving = serving

    async def stop(self, grace_s: float) -> None:
        """Refuse new requests (503) and close the listening socket, let those in flight finish
        within `grace_s`, then cancel what is left and close. Once only."""
        if self._stopped:
            return
        self._stopped = True
        self._api.stopping = True
        await self._site.stop()
        if not await self._api.wait_idle(grace_s):
            log.warning("HTTP requests still in flight after %gs; cancelling them", grace_s)
        await self._runner.cleanup()


async def start_http_server(models: Mapping[str, ModelRouter], host: str, port: int,
                            security: SecurityConfig | None = None, metrics: RequestMetrics | None = None,
                            reuse_port: bool = False) -> HttpServer:
    """Bind `host:port` (0 picks a free port) and serve; /health says 503 until `set_serving(True)`.
    security: `cluster.config.SecurityConfig`, its files read now (ValueError naming the key and
    path); metrics: every generation request is counted there once it ends; reuse_port: other
    routers of the model may bind the same port on this node (SO_REUSEPORT), as the gRPC port."""
    policy = ServerSecurity.load(security).policy
    ssl_context = http_ssl_context(security)
    if not is_loopback_host(host) and ssl_context is None and not policy.open:
        log.warning("HTTP API on %s without TLS: bearer tokens cross the network in plaintext "
                    "(set security.tls_cert_file and security.tls_key_file)", host)
    api = OpenAIApi(models, policy, metrics)
    runner = web.AppRunner(api.app(), handler_cancellation=True, shutdown_timeout=CLOSE_TIMEOUT_S)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context, reuse_port=reuse_port or None)
    try:
        await site.start()
    except OSError as err:
        await runner.cleanup()
        raise OSError(f"cannot bind the HTTP server to {host}:{port} (router.http_port): {err.strerror or err}") from err
    bound = runner.addresses[0][1]
    log.info("OpenAI-compatible HTTP API on %s://%s:%d", "https" if ssl_context else "http", host, bound)
    return HttpServer(api, runner, site, bound)
