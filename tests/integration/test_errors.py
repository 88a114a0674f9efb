"""Every bad request gets its gRPC status from the real server, never reaches a worker, and the
next good request is still answered right."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest

from protos import grpc_predict_v2_pb2 as pb
from protos import grpc_predict_v2_pb2_grpc as pb_grpc
from router_service.client import build_request
from tests.integration.support import FP32_REL_TOL, MARKS, Served, health_status, hidden_states, rel_err, serve_config

pytestmark = MARKS

H = 48
ERRORS_RANDOM = {"layers": 2, "experts": 4, "hidden": H, "ffn": 64, "top_k": 2, "seed": 21}
MAX_MESSAGE_MB = 1
MODEL = "it-errors"
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def served(deploy_served) -> Iterator[Served]:
    start, stop = deploy_served
    served = start(serve_config(MODEL, random=ERRORS_RANDOM, workers=2, router={"max_message_mb": MAX_MESSAGE_MB}))
    yield served
    stop(served)


@pytest.fixture(scope="module")
def stub(served: Served) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    limit = 16 * 1024 * 1024  # the client may send more than the server takes
    options = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
    with grpc.insecure_channel(served.address, options=options) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _good(tokens: int = 5, layer: int | None = 0, seed: int = 0) -> pb.ModelInferRequest:
    return build_request(MODEL, hidden_states(tokens, H, seed), layer=layer)


def _with_hidden(x: np.ndarray, datatype: str | None = None, layer: int | None = 0) -> pb.ModelInferRequest:
    return build_request(MODEL, x, layer=layer, datatype=datatype)


def _nan_at(token: int, dim: int, value: float, dtype=np.float32) -> pb.ModelInferRequest:
    x = hidden_states(5, H, 1).astype(dtype)
    x[token, dim] = value
    return _with_hidden(x)


def _shape(shape: list[int]) -> pb.ModelInferRequest:
    request = _good()
    request.inputs[0].shape[:] = shape
    return request


def _datatype(name: str, itemsize: int) -> pb.ModelInferRequest:
    request = _good()
    request.inputs[0].datatype = name
    request.raw_input_contents[0] = b"\0" * (5 * H * itemsize)
    return request


def _truncated_raw() -> pb.ModelInferRequest:
    request = _good()
    request.raw_input_contents[0] = request.raw_input_contents[0][:-4]
    return request


def _fp32_contents(count: int) -> pb.ModelInferRequest:
    request = _good()
    del request.raw_input_contents[:]
    request.inputs[0].contents.fp32_contents.extend([0.5] * count)
    return request


def _fp16_in_typed_contents() -> pb.ModelInferRequest:
    request = _fp32_contents(5 * H)
    request.inputs[0].datatype = "FP16"
    return request


def _no_data() -> pb.ModelInferRequest:
    request = _good()
    del request.raw_input_contents[:]
    return request


def _inputs(names: list[str]) -> pb.ModelInferRequest:
    request = _good()
    raw = request.raw_input_contents[0]
    del request.inputs[:]
    del request.raw_input_contents[:]
    for name in names:
        request.inputs.add(name=name, datatype="FP32", shape=[5, H])
        request.raw_input_contents.append(raw)
    return request


def _two_raw_entries() -> pb.ModelInferRequest:
    request = _good()
    request.raw_input_contents.append(request.raw_input_contents[0])
    return request


def _layer(kind: str, value) -> pb.ModelInferRequest:
    request = _good(layer=None)
    setattr(request.parameters["layer"], kind, value)
    return request


def _outputs(names: list[str]) -> pb.ModelInferRequest:
    request = _good()
    del request.outputs[:]
    for name in names:
        request.outputs.add(name=name)
    return request


def _model(name: str, version: str = "") -> pb.ModelInferRequest:
    request = _good()
    request.model_name = name
    request.model_version = version
    return request


@dataclass(frozen=True)
class Bad:
    request: Callable[[], pb.ModelInferRequest]
    code: grpc.StatusCode
    says: tuple[str, ...]  # substrings of the status message: what was expected, what came


def case(case_id: str, request: Callable[[], pb.ModelInferRequest], code: grpc.StatusCode, *says: str):
    return pytest.param(Bad(request, code, says), id=case_id)


NOT_FOUND = grpc.StatusCode.NOT_FOUND
INTEGER = "must be an integer"
RAW_BYTES = 5 * H * 4
LIMIT_BYTES = MAX_MESSAGE_MB * 2**20

BAD_REQUESTS = [
    case("wrong-hidden-size", lambda: _with_hidden(hidden_states(5, H + 1, 0)), INVALID,
         f"[tokens, {H}]", f"got [5, {H + 1}]"),
    case("rank-1-shape", lambda: _shape([5 * H]), INVALID, f"[tokens, {H}]", f"got [{5 * H}]"),
    case("rank-3-shape", lambda: _shape([1, 5, H]), INVALID, f"[tokens, {H}]", f"got [1, 5, {H}]"),
    case("negative-tokens", lambda: _shape([-5, H]), INVALID, f"[tokens, {H}]", f"got [-5, {H}]"),
    case("dtype-fp64", lambda: _datatype("FP64", 8), INVALID, "FP32, FP16, BF16", "'FP64'"),
    case("dtype-int32", lambda: _datatype("INT32", 4), INVALID, "FP32, FP16, BF16", "'INT32'"),
    case("nan", lambda: _nan_at(2, 3, np.nan), INVALID, "NaN/Inf", "[token 2, dim 3]"),
    case("inf", lambda: _nan_at(4, 0, np.inf), INVALID, "NaN/Inf", "[token 4, dim 0]"),
    case("minus-inf", lambda: _nan_at(0, H - 1, -np.inf), INVALID, "NaN/Inf", f"[token 0, dim {H - 1}]"),
    case("inf-fp16", lambda: _nan_at(1, 1, np.inf, np.float16), INVALID, "NaN/Inf", "[token 1, dim 1]"),
    case("empty-batch", lambda: _with_hidden(np.zeros((0, H), np.float32)), INVALID, "empty batch", f"[0, {H}]"),
    case("byte-length-mismatch", _truncated_raw, INVALID, f"is {RAW_BYTES - 4} bytes", f"needs {RAW_BYTES} bytes"),
    case("huge-claimed-shape", lambda: _shape([10**12, H]), INVALID,
         f"is {RAW_BYTES} bytes", f"needs {10**12 * H * 4} bytes"),
    case("fp32-contents-count-mismatch", lambda: _fp32_contents(5 * H - 1), INVALID,
         f"needs {5 * H}", f"got {5 * H - 1}"),
    case("fp16-in-typed-contents", _fp16_in_typed_contents, INVALID, "FP16", "raw_input_contents"),
    case("input-without-data", _no_data, INVALID, "hidden_states", "no data"),
    case("missing-input", lambda: _inputs([]), INVALID, "'hidden_states'", "no inputs"),
    case("wrong-input-name", lambda: _inputs(["x"]), INVALID, "'hidden_states'", "['x']"),
    case("two-inputs", lambda: _inputs(["hidden_states", "hidden_states"]), INVALID,
         "exactly one input", "['hidden_states', 'hidden_states']"),
    case("two-raw-entries", _two_raw_entries, INVALID, "2 entries", "1 input"),
    case("unknown-layer", lambda: _layer("int64_param", 7), INVALID, "layer 7", "valid layers: 0-1"),
    case("negative-layer", lambda: _layer("int64_param", -1), INVALID, "layer -1", "valid layers: 0-1"),
    case("huge-layer", lambda: _layer("uint64_param", 2**63), INVALID, f"layer {2**63}", "valid layers: 0-1"),
    case("layer-not-a-number", lambda: _layer("string_param", "abc"), INVALID, INTEGER, "'abc'"),
    # a digit check lets these through but int() refuses them: they once came back as INTERNAL
    case("layer-string-double-minus", lambda: _layer("string_param", "--1"), INVALID, INTEGER, "'--1'"),
    case("layer-string-superscript-two", lambda: _layer("string_param", "\u00b2"), INVALID, INTEGER, "'\u00b2'"),
    case("layer-bool", lambda: _layer("bool_param", True), INVALID, INTEGER, "bool_param"),
    case("layer-double", lambda: _layer("double_param", 1.0), INVALID, INTEGER, "double_param"),
    case("missing-layer-on-multi-layer-model", lambda: _good(layer=None), INVALID,
         "'layer' is required", "2 MoE layers"),
    case("unknown-output", lambda: _outputs(["hidden_states", "logits"]), INVALID, "['logits']", "topk_ids"),
    case("unknown-model", lambda: _model("no-such-model"), NOT_FOUND, "'no-such-model'", MODEL),
    case("unknown-model-version", lambda: _model(MODEL, "2"), NOT_FOUND, "version '2'", "'1'"),
    case("message-over-size-limit", lambda: _good(tokens=6000), grpc.StatusCode.RESOURCE_EXHAUSTED,
         "larger than max", str(LIMIT_BYTES)),
]


@pytest.mark.parametrize("bad", BAD_REQUESTS)
def test_bad_request_gets_its_status_and_never_reaches_a_worker(served: Served, stub, bad: Bad) -> None:
    request = bad.request()
    calls_before = served.worker_calls()

    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, timeout=30)

    err = caught.value
    assert err.code() == bad.code, f"got {err.code().name}: {err.details()}"
    for text in bad.says:
        assert text in err.details(), f"{text!r} not in status message {err.details()!r}"
    assert served.worker_calls() == calls_before, "a refused request reached a worker"
    # The server is unharmed: the next good request is answered right.
    served.assert_serves_correctly(1, hidden_states(9, H, seed=77))


def test_message_limit_leaves_room_for_requests_just_under_it(served: Served, stub) -> None:
    """Guards the size-limit case: a request a little under the limit is served."""
    tokens = (LIMIT_BYTES - 4096) // (H * 4)
    x = hidden_states(tokens, H, seed=5)
    response = stub.ModelInfer(build_request(MODEL, x, layer=0, topk=False), timeout=60)
    got = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(x.shape)
    want, _, _ = served.expected(0, x)
    assert rel_err(got, want) < FP32_REL_TOL


def test_response_over_size_limit_fails_cleanly(served: Served, stub) -> None:
    """A request under the limit whose answer (hidden states plus top-k) is over it."""
    tokens = (LIMIT_BYTES - 4096) // (H * 4)
    request = build_request(MODEL, hidden_states(tokens, H, seed=6), layer=0, topk=True)
    assert request.ByteSize() < LIMIT_BYTES

    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, timeout=60)

    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value.details()
    served.assert_serves_correctly(0, hidden_states(9, H, seed=78))


@pytest.mark.parametrize("call", ["ModelReady", "ModelMetadata"])
def test_unknown_model_in_model_rpcs_is_not_found(served: Served, stub, call: str) -> None:
    request = pb.ModelReadyRequest(name="nope") if call == "ModelReady" else pb.ModelMetadataRequest(name="nope")
    with pytest.raises(grpc.RpcError) as caught:
        getattr(stub, call)(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "'nope'" in caught.value.details() and MODEL in caught.value.details()


def test_server_healthy_after_all_bad_requests(served: Served) -> None:
    with grpc.insecure_channel(served.address) as channel:
        assert health_status(channel) == "SERVING"
    for layer in served.spec.moe_layers:
        served.assert_serves_correctly(layer, hidden_states(300, H, seed=layer))
