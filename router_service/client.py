"""A small Python client for the inference API (KServe v2 over gRPC).

Any KServe v2 client works against the server (stock `tritonclient` included); this one adds
what our users need most: numpy in and out, the `layer` parameter, top-k outputs, and waiting
for the health service to say SERVING.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import grpc_predict_v2_pb2 as pb
from protos import grpc_predict_v2_pb2_grpc as pb_grpc
from router_service.security import ClientCredentials

_NUMPY_DTYPES = {"FP32": np.dtype("<f4"), "FP16": np.dtype("<f2"), "INT32": np.dtype("<i4")}


@dataclass(frozen=True)
class InferResult:
    """hidden_states: `[T, H]` (float32, float16, or uint16 bit patterns for BF16);
    topk_ids / topk_weights: `[T, k]` when asked for."""

    hidden_states: np.ndarray
    topk_ids: np.ndarray | None
    topk_weights: np.ndarray | None
    placement_version: int


def dtype_name(array: np.ndarray) -> str:
    for name, dtype in _NUMPY_DTYPES.items():
        if array.dtype == dtype:
            return name
    raise TypeError(f"hidden states must be float32 or float16, got {array.dtype}")


def build_request(model: str, hidden: np.ndarray, layer: int | None, topk: bool = False,
                  datatype: str | None = None, expert_skip_threshold: float | None = None) -> pb.ModelInferRequest:
    """hidden: `[T, H]`; BF16 callers pass the raw uint16 bit patterns and datatype="BF16";
    expert_skip_threshold: this request's expert skipping (None: the model's)."""
    datatype = datatype or dtype_name(hidden)
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="hidden_states", datatype=datatype, shape=list(hidden.shape))
    request.raw_input_contents.append(np.ascontiguousarray(hidden).tobytes())
    if layer is not None:
        request.parameters["layer"].int64_param = layer
    if expert_skip_threshold is not None:
        request.parameters["expert_skip_threshold"].double_param = expert_skip_threshold
    for name in ("hidden_states", "topk_ids", "topk_weights") if topk else ("hidden_states",):
        request.outputs.add(name=name)
    return request


def parse_response(response: pb.ModelInferResponse) -> InferResult:
    arrays = {}
    for tensor, raw in zip(response.outputs, response.raw_output_contents):
        dtype = np.dtype("<u2") if tensor.datatype == "BF16" else _NUMPY_DTYPES[tensor.datatype]
        arrays[tensor.name] = np.frombuffer(raw, dtype=dtype).reshape(tuple(tensor.shape))
    version = response.parameters["placement_version"].int64_param if "placement_version" in response.parameters else -1
    return InferResult(arrays["hidden_states"], arrays.get("topk_ids"), arrays.get("topk_weights"), version)


class MoEClient:
    """Blocking client; safe to share between threads. `credentials`: TLS and a bearer token
    for a secured server (default: plaintext, no token)."""

    def __init__(self, address: str, max_message_mb: int = 256, credentials: ClientCredentials | None = None):
        limit = max_message_mb * 1024 * 1024
        self.address = address
        self._channel = (credentials or ClientCredentials()).channel(address, options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ])
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> MoEClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Block until the health service says SERVING; TimeoutError naming the address if not."""
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                status = self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            except grpc.RpcError as err:
                last = err.code().name
            time.sleep(0.1)
        raise TimeoutError(f"server at {self.address} not SERVING after {timeout_s:.0f}s (last: {last})")

    def infer(self, model: str, hidden: np.ndarray, layer: int | None = None, topk: bool = False,
              timeout_s: float | None = None, datatype: str | None = None,
              wait_for_ready: bool = False, expert_skip_threshold: float | None = None) -> InferResult:
        """`wait_for_ready`: while the server is unreachable (e.g. restarting), wait for it
        within the deadline instead of failing at once with UNAVAILABLE. `expert_skip_threshold`:
        this request's expert skipping, overriding the model's (None: the model's)."""
        request = build_request(model, hidden, layer, topk, datatype, expert_skip_threshold)
        response = self._stub.ModelInfer(request, timeout=timeout_s, wait_for_ready=wait_for_ready)
        return parse_response(response)

    def model_metadata(self, model: str, timeout_s: float | None = None) -> pb.ModelMetadataResponse:
        return self._stub.ModelMetadata(pb.ModelMetadataRequest(name=model), timeout=timeout_s)

    def server_metadata(self) -> pb.ServerMetadataResponse:
        return self._stub.ServerMetadata(pb.ServerMetadataRequest())

