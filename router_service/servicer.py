"""The KServe v2 `inference.GRPCInferenceService` servicer. Domain errors become gRPC status
codes here, in one place (`status_code`); nothing else in the router knows about status codes.

`ModelInfer` serves two kinds of request: the layer API (`hidden_states` of one MoE layer,
`router_service.codec`) and, when the model generates, text (`text_input`, as Triton's LLM
backends take it, `router_service.text_codec`). `ModelStreamInfer` is Triton's streaming
inference (decoupled mode): the requests of one stream are served concurrently, a text request
is answered piece by piece (the last piece with `triton_final_response: true`), a layer request
with one response, and a failed request with an `error_message` response that starts with its
status code's name (a stream has one status, for all its requests), e.g. "INVALID_ARGUMENT: ...".

The system shared memory extension (`router_service.shm`) registers regions that layer requests
then read their input from and write their outputs to. It is off unless the router's config
turns it on; while off, its RPCs (and a request naming a region) answer UNIMPLEMENTED saying
how to turn it on, as Triton answers them when client shared memory is off (UNSUPPORTED, which
Triton maps to UNIMPLEMENTED): a permanent refusal that clients and gRPC retry policies do not
retry, where UNAVAILABLE would invite retries that can never succeed. The CUDA shared memory
extension is not implemented: its RPCs answer UNIMPLEMENTED, saying whether the router has a
GPU at all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from importlib.metadata import PackageNotFoundError, version
from typing import Protocol

import grpc

from protos import grpc_predict_v2_pb2 as pb
from protos import grpc_predict_v2_pb2_grpc as pb_grpc
from router_service.codec import INPUT_NAME, decode_request, encode_tensor, write_tensor
from router_service.errors import (
    ExpertUnavailable,
    InvalidRequest,
    ModelNotReady,
    Overloaded,
    UnknownModel,
    Unsupported,
    WorkerLost,
)
from router_service.generation.engine import StepOutput
from router_service.router import ModelRouter
from router_service.shm import SharedMemoryOff, SharedMemoryRegistry
from router_service.stream_merge import serve_concurrently
from router_service.text_codec import (
    FINAL_RESPONSE,
    TEXT_INPUT,
    TEXT_OUTPUT,
    decode_text_request,
    is_text_request,
    text_response,
)

log = logging.getLogger(__name__)

SERVER_NAME = "moe-serve"
PLATFORM = "moe-serve_mixtral"
MODEL_VERSION = "1"
try:
    SERVER_VERSION = version("moe-serve")
except PackageNotFoundError:  # running from a source tree
    SERVER_VERSION = "0+unknown"


# What a client should do: INVALID_ARGUMENT, NOT_FOUND — change the request; UNAVAILABLE — retry
# (the service repairs itself, or is still starting); RESOURCE_EXHAUSTED — back off, then retry.
_CODES: dict[type[Exception], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    UnknownModel: grpc.StatusCode.NOT_FOUND,
    ModelNotReady: grpc.StatusCode.UNAVAILABLE,
    WorkerLost: grpc.StatusCode.UNAVAILABLE,
    ExpertUnavailable: grpc.StatusCode.UNAVAILABLE,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unsupported: grpc.StatusCode.UNIMPLEMENTED,
}
CUDA_NO_GPU = ("CUDA shared memory needs a GPU on the router, and this router has none; send tensors through "
               "system shared memory (SystemSharedMemoryRegister) or in the request")
CUDA_NOT_IMPLEMENTED = ("moe-serve does not implement the CUDA shared memory extension (CUDA IPC handles); send "
                        "tensors through system shared memory (SystemSharedMemoryRegister) or in the request")


def status_code(err: Exception) -> grpc.StatusCode:
    """The status the inference service answers `err` with: INTERNAL for anything that is not a
    domain error (its message stays in the server log)."""
    return next((code for kind, code in _CODES.items() if isinstance(err, kind)), grpc.StatusCode.INTERNAL)


def client_message(err: Exception, what: str, model: str) -> str:
    """What the client is told of `err`; an unexpected error is logged, the client gets a generic message."""
    if status_code(err) == grpc.StatusCode.INTERNAL:
        log.error("%s failed for model %r", what, model, exc_info=err)
        return f"{what} failed inside the server; see the server log"
    return str(err)


async def _abort(context, err: Exception, what: str, model: str) -> None:
    """Answer `err` with its status and `client_message`."""
    await context.abort(status_code(err), client_message(err, what, model))


class RequestMetrics(Protocol):
    """Where finished requests are counted (implemented by `cluster.control.metrics.RouterMetrics`):
    each request once, streamed ones too; `tokens` is a layer request's hidden-state rows, or a
    text request's generated tokens."""

    def record_request(self, model: str, code: str, latency_s: float, tokens: int) -> None: ...
    def queue(self, model: str, tokens: int) -> None: ...


def _add_outputs(response: pb.ModelInferResponse, names: tuple[str, ...], values: dict[str, tuple],
                 regions: dict[str, memoryview]) -> None:
    """Each output in `names` as raw bytes in `response`, or written into its shared memory
    region (`regions`) and answered, as Triton does, with its metadata and an empty raw entry
    (the raw entries stay one per output, in order)."""
    for name in names:
        target = regions.get(name)
        if target is None:
            tensor, raw = encode_tensor(name, *values[name])
        else:
            tensor, raw = write_tensor(name, *values[name], target), b""
        response.outputs.append(tensor)
        response.raw_output_contents.append(raw)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, models: dict[str, ModelRouter], metrics: RequestMetrics | None = None,
                 shared_memory: SharedMemoryRegistry | SharedMemoryOff | None = None, router_has_gpu: bool = False):
        """shared_memory: the system shared memory regions (None: the extension is off);
        router_has_gpu: what the CUDA shared memory RPCs say they lack."""
        self._models = models
        self._metrics = metrics
        self._shm = SharedMemoryOff() if shared_memory is None else shared_memory
        self._cuda_message = CUDA_NOT_IMPLEMENTED if router_has_gpu else CUDA_NO_GPU

    def __repr__(self) -> str:
        return f"InferenceServicer(models={sorted(self._models)})"

    def _model(self, name: str, model_version: str = "") -> ModelRouter:
        model = self._models.get(name)
        if model is None:
            raise UnknownModel(f"unknown model '{name}'; this server serves {sorted(self._models)}")
        if model_version not in ("", MODEL_VERSION):
            raise UnknownModel(f"model '{name}' has no version '{model_version}'; it has ['{MODEL_VERSION}']")
        return model

    def _serving(self, request: pb.ModelInferRequest) -> ModelRouter:
        model = self._model(request.model_name, request.model_version)
        if not model.ready:
            raise ModelNotReady(f"model '{model.name}' is not ready yet")
        return model

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=bool(self._models) and all(m.reports_ready for m in self._models.values()))

    async def ModelReady(self, request, context):
        try:
            return pb.ModelReadyResponse(ready=self._model(request.name, request.version).reports_ready)
        except UnknownModel as err:
            await _abort(context, err, "ModelReady", request.name)

    async def ServerMetadata(self, request, context):
        extensions = list(self._shm.extensions)  # "system_shared_memory" when it is on
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=extensions)

    async def ModelMetadata(self, request, context):
        try:
            model = self._model(request.name, request.version)
        except UnknownModel as err:
            await _abort(context, err, "ModelMetadata", request.name)
        spec = model.spec
        meta = pb.ModelMetadataResponse.TensorMetadata
        response = pb.ModelMetadataResponse(
            name=model.name,
            versions=[MODEL_VERSION],
            platform=PLATFORM,
            inputs=[meta(name=INPUT_NAME, datatype="FP32", shape=[-1, spec.hidden_size])],
            outputs=[
                meta(name="hidden_states", datatype="FP32", shape=[-1, spec.hidden_size]),
                meta(name="topk_ids", datatype="INT32", shape=[-1, spec.top_k]),
                meta(name="topk_weights", datatype="FP32", shape=[-1, spec.top_k]),
            ],
        )
        params = response.parameters
        params["moe_layers"].string_param = spec.describe_layers()
        params["dense_layers"].string_param = spec.describe_dense_layers()
        params["family"].string_param = spec.family
        params["num_experts"].int64_param = spec.num_experts
        params["top_k"].int64_param = spec.top_k
        params["num_shared_experts"].int64_param = spec.num_shared_experts  # pieces served beside the routed
        params["gate"].string_param = spec.gate.scoring + (" group-limited" if spec.gate.grouped else "")
        params["generates_text"].bool_param = model.text is not None
        params["expert_skip_threshold"].double_param = model.expert_skip_threshold  # a request may set its own
        if model.text is not None:  # the layer API's tensors stay first
            response.inputs.append(meta(name=TEXT_INPUT, datatype="BYTES", shape=[1]))
            response.outputs.append(meta(name=TEXT_OUTPUT, datatype="BYTES", shape=[-1]))
            params["max_model_len"].int64_param = model.text.max_model_len
            params["default_max_tokens"].int64_param = model.text.default_max_tokens
        return response

    async def ModelInfer(self, request, context):
        start, code, tokens = time.perf_counter(), "OK", 0
        try:
            response, tokens = await self._answer(request)
            return response
        except asyncio.CancelledError:
            code = "CANCELLED"  # the client went away or its deadline passed
            raise
        except Exception as err:
            code = status_code(err).name
            await _abort(context, err, "inference", request.model_name)
        finally:
            self._record(request.model_name, code, start, tokens)

    async def ModelStreamInfer(self, request_iterator, context):
        async for response in serve_concurrently(request_iterator, self._stream_one):
            yield response

    async def SystemSharedMemoryStatus(self, request, context):
        try:
            regions = self._shm.status(request.name)
        except (InvalidRequest, Unsupported) as err:
            await _abort(context, err, "SystemSharedMemoryStatus", "")
        response = pb.SystemSharedMemoryStatusResponse()
        for region in regions:
            response.regions[region.name].CopyFrom(pb.SystemSharedMemoryStatusResponse.RegionStatus(
                name=region.name, key=region.key, offset=region.offset, byte_size=region.byte_size))
        return response

    async def SystemSharedMemoryRegister(self, request, context):
        try:
            self._shm.register(request.name, request.key, request.offset, request.byte_size)
        except (InvalidRequest, Unsupported) as err:
            await _abort(context, err, "SystemSharedMemoryRegister", "")
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(self, request, context):
        try:
            self._shm.unregister(request.name)
        except Unsupported as err:
            await _abort(context, err, "SystemSharedMemoryUnregister", "")
        return pb.SystemSharedMemoryUnregisterResponse()

    async def CudaSharedMemoryStatus(self, request, context):
        await _abort(context, Unsupported(self._cuda_message), "CudaSharedMemoryStatus", "")

    async def CudaSharedMemoryRegister(self, request, context):
        await _abort(context, Unsupported(self._cuda_message), "CudaSharedMemoryRegister", "")

    async def CudaSharedMemoryUnregister(self, request, context):
        await _abort(context, Unsupported(self._cuda_message), "CudaSharedMemoryUnregister", "")

    async def _answer(self, request: pb.ModelInferRequest) -> tuple[pb.ModelInferResponse, int]:
        """The whole answer to one request and the tokens it served (hidden-state rows, or new
        tokens of text); raises the domain error that stopped it."""
        model = self._serving(request)
        if not is_text_request(request):
            return await self._layer(model, request)
        pieces, last = [], None
        async for last in self._generate(model, request):
            pieces.append(last.text)
        response = text_response(model.name, MODEL_VERSION, request.id, "".join(pieces), last.prompt_tokens,
                                 last.completion_tokens, last.finish_reason)
        return response, last.completion_tokens

    async def _stream_one(self, request: pb.ModelInferRequest) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """One request of a stream: each piece of text as it comes (or the layer's one answer),
        or its failure as an `error_message` response."""
        start, code, tokens = time.perf_counter(), "OK", 0
        try:
            model = self._serving(request)
            if not is_text_request(request):
                response, tokens = await self._layer(model, request)
                yield pb.ModelStreamInferResponse(infer_response=response)
                return
            async for out in self._generate(model, request):
                tokens = out.completion_tokens
                piece = text_response(model.name, MODEL_VERSION, request.id, out.text, out.prompt_tokens,
                                      out.completion_tokens, out.finish_reason, final=out.finish_reason is not None)
                yield pb.ModelStreamInferResponse(infer_response=piece)
        except asyncio.CancelledError:
            code = "CANCELLED"  # the client closed or cancelled the stream
            raise
        except Exception as err:
            code = status_code(err).name
            failed = pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version,
                                           id=request.id)
            failed.parameters[FINAL_RESPONSE].bool_param = True  # nothing more comes for this request
            message = f"{code}: {client_message(err, 'inference', request.model_name)}"
            yield pb.ModelStreamInferResponse(error_message=message, infer_response=failed)
        finally:
            self._record(request.model_name, code, start, tokens)

    async def _generate(self, model: ModelRouter, request: pb.ModelInferRequest) -> AsyncIterator[StepOutput]:
        """A text request's outputs, step by step; leaving early (the client went away) cancels
        the generation, and the engine frees its KV blocks at its next step."""
        if model.text is None:
            raise InvalidRequest(f"model '{model.name}' does not generate text (it serves MoE layers only): send "
                                 f"input '{INPUT_NAME}' with request parameter 'layer' instead of '{TEXT_INPUT}'")
        decoded = decode_text_request(request, model.text.default_max_tokens)
        stream = model.text.generate(model.text.prompt_ids(decoded.prompt), decoded.params)
        try:
            async for out in stream:
                yield out
        finally:
            stream.cancel()

    async def _layer(self, model: ModelRouter, request: pb.ModelInferRequest) -> tuple[pb.ModelInferResponse, int]:
        """A layer request; the shared memory regions it names stay mapped until it is answered."""
        with self._shm.lease() as regions:
            decoded = decode_request(request, model.spec, regions)
            tokens = decoded.hidden.shape[0]
            result = await model.infer(decoded.layer, decoded.hidden, decoded.expert_skip_threshold)
            values = {
                "hidden_states": (result.hidden, decoded.wire_dtype),
                "topk_ids": (result.topk_ids, "INT32"),
                "topk_weights": (result.topk_weights, "FP32"),
            }
            response = pb.ModelInferResponse(model_name=model.name, model_version=MODEL_VERSION, id=request.id)
            _add_outputs(response, decoded.outputs, values, decoded.output_regions)
            del decoded  # its views on the regions go before the lease ends (then an unregistered one unmaps)
        response.parameters["placement_version"].int64_param = result.placement_version
        return response, tokens

    def _record(self, model_name: str, code: str, start_s: float, tokens: int) -> None:
        """Count one finished request (a stream counts each of its requests)."""
        if self._metrics is None:
            return
        self._metrics.record_request(model_name, code, time.perf_counter() - start_s, tokens)
        model = self._models.get(model_name)
        if model is not None:
            self._metrics.queue(model.name, model.queued_tokens)
