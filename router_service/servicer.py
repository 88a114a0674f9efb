"""The KServe v2 `inference.GRPCInferenceService` servicer. Domain errors become gRPC status
codes here, in one place (`status_code`); nothing else in the router knows about status codes."""

from __future__ import annotations

import asyncio
import logging
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Protocol

import grpc

from protos import grpc_predict_v2_pb2 as pb
from protos import grpc_predict_v2_pb2_grpc as pb_grpc
from router_service.codec import INPUT_NAME, decode_request, encode_tensor
from router_service.errors import ExpertUnavailable, InvalidRequest, ModelNotReady, Overloaded, UnknownModel, WorkerLost
from router_service.router import ModelRouter

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
}


def status_code(err: Exception) -> grpc.StatusCode:
    """The status the inference service answers `err` with: INTERNAL for anything that is not a
    domain error (its message stays in the server log)."""
    return next((code for kind, code in _CODES.items() if isinstance(err, kind)), grpc.StatusCode.INTERNAL)


async def _abort(context, err: Exception, what: str, model: str) -> None:
    """Answer `err` with its status; an unexpected error is logged, the client gets a generic message."""
    code = status_code(err)
    if code == grpc.StatusCode.INTERNAL:
        log.error("%s failed for model %r", what, model, exc_info=err)
        await context.abort(code, f"{what} failed inside the server; see the server log")
    await context.abort(code, str(err))


class RequestMetrics(Protocol):
    """Where finished requests are counted (implemented by `cluster.control.metrics.RouterMetrics`)."""

    def record_request(self, model: str, code: str, latency_s: float, tokens: int) -> None: ...
    def queue(self, model: str, tokens: int) -> None: ...


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, models: dict[str, ModelRouter], metrics: RequestMetrics | None = None):
        self._models = models
        self._metrics = metrics

    def __repr__(self) -> str:
        return f"InferenceServicer(models={sorted(self._models)})"

    def _model(self, name: str, model_version: str = "") -> ModelRouter:
        model = self._models.get(name)
        if model is None:
            raise UnknownModel(f"unknown model '{name}'; this server serves {sorted(self._models)}")
        if model_version not in ("", MODEL_VERSION):
            raise UnknownModel(f"model '{name}' has no version '{model_version}'; it has ['{MODEL_VERSION}']")
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
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=[])

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
        return response

    async def ModelInfer(self, request, context):
        if self._metrics is None:
            return await self._infer(request, context)
        start, code, tokens = time.perf_counter(), "OK", 0
        try:
            response = await self._infer(request, context)
            tokens = response.outputs[0].shape[0] if response.outputs else 0
            return response
        except asyncio.CancelledError:
            code = "CANCELLED"  # the client went away or its deadline passed
            raise
        except Exception:
            code = context.code().name if context.code() is not None else "UNKNOWN"  # set by abort
            raise
        finally:
            self._metrics.record_request(request.model_name, code, time.perf_counter() - start, tokens)
            model = self._models.get(request.model_name)
            if model is not None:
                self._metrics.queue(model.name, model.queued_tokens)

    async def _infer(self, request, context):
        try:
            model = self._model(request.model_name, request.model_version)
            if not model.ready:
                raise ModelNotReady(f"model '{model.name}' is not ready yet")
            decoded = decode_request(request, model.spec)
            result = await model.infer(decoded.layer, decoded.hidden)
        except Exception as err:
            await _abort(context, err, "inference", request.model_name)
        values = {
            "hidden_states": (result.hidden, decoded.wire_dtype),
            "topk_ids": (result.topk_ids, "INT32"),
            "topk_weights": (result.topk_weights, "FP32"),
        }
        response = pb.ModelInferResponse(model_name=model.name, model_version=MODEL_VERSION, id=request.id)
        for name in decoded.outputs:
            tensor, raw = encode_tensor(name, *values[name])
            response.outputs.append(tensor)
            response.raw_output_contents.append(raw)
        response.parameters["placement_version"].int64_param = result.placement_version
        return response
