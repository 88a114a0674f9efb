"""Fuzzing the gRPC edge of a real router (the shared `main_server`): whatever arrives, the
answer is a status a client can act on, never UNKNOWN or INTERNAL, and the server keeps
serving correctly afterwards.

- random bytes to every method of the inference and admin services, sent with identity
  serializers, so they reach the server exactly as drawn;
- structured random `ModelInferRequest`s: valid ones for the model (answers checked against
  the reference) with at most one thing made wrong, and wild ones: shapes, datatypes, names,
  parameters of every kind, typed contents and raw contents of random lengths.

Hypothesis runs derandomized (the same examples every run, so CI does not flake on a new one)
with no example database; to explore further, run with `--hypothesis-seed=N` and without
`derandomize`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos import grpc_predict_v2_pb2 as pb
from router_service.client import parse_response
from router_service.server import ADMIN_DESCRIPTOR, INFERENCE_DESCRIPTOR
from tests.integration.support import (
    BF16_REL_TOL,
    FP16_REL_TOL,
    FP32_REL_TOL,
    MARKS,
    Served,
    from_bf16_bits,
    health_status,
    hidden_states,
    rel_err,
    to_bf16_bits,
)

pytestmark = MARKS

NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
METHODS = [f"/{service.full_name}/{method.name}" for service in (INFERENCE_DESCRIPTOR, ADMIN_DESCRIPTOR)
           for method in service.methods]
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
HIDDEN = 64  # the shared model's hidden size (tests/integration/conftest.py MAIN_RANDOM)
MODEL = "it-main"


@pytest.fixture(scope="module")
def channel(main_server: Served) -> Iterator[grpc.Channel]:
    assert main_server.spec.hidden_size == HIDDEN and main_server.name == MODEL
    with grpc.insecure_channel(main_server.address) as channel:
        yield channel


def _status(call, payload) -> grpc.StatusCode:
    try:
        call(payload, timeout=30)
    except grpc.RpcError as err:
        assert err.code() not in NEVER, f"{err.code().name}: {err.details()}"
        return err.code()
    return grpc.StatusCode.OK


def _raw(channel: grpc.Channel, method: str):
    return channel.unary_unary(method, request_serializer=None, response_deserializer=None)


# ---- random bytes -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS, ids=[m.rsplit("/", 1)[1] for m in METHODS])
def test_corrupt_bytes_are_invalid_argument_on_every_method(channel, method: str) -> None:
    call = _raw(channel, method)
    for garbage in (b"\xff", b"\x0a\x05ab", b"\x08", b"\x0a\xff\xff\xff\xff\x0f"):
        with pytest.raises(grpc.RpcError) as caught:
            call(garbage, timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (garbage, caught.value.details())
        assert "protobuf" in caught.value.details()


SEEN: Counter[str] = Counter()


@pytest.mark.parametrize("method", METHODS, ids=[m.rsplit("/", 1)[1] for m in METHODS])
@FUZZ
@given(raw=st.binary(max_size=300))
def test_random_bytes_are_never_unknown_or_internal(channel, method: str, raw: bytes) -> None:
    SEEN[_status(_raw(channel, method), raw).name] += 1


def test_random_bytes_hit_the_parse_refusal() -> None:
    """The fuzz above must have reached the parser's refusal, or it proved little."""
    if not SEEN:
        pytest.skip("run with the random bytes fuzz")
    assert SEEN["INVALID_ARGUMENT"] > 0, SEEN


# ---- structured random inference requests -------------------------------------------------------

def mostly(common: st.SearchStrategy, rare: st.SearchStrategy) -> st.SearchStrategy:
    """`common` nine times in ten, so most requests get past the first checks."""
    return st.integers(0, 9).flatmap(lambda i: rare if i == 0 else common)


int64s = st.integers(-2**63, 2**63 - 1)
dims = st.sampled_from([-1, 0, 1, 2, 3, HIDDEN, HIDDEN + 1, 2**31, 2**62, -2**63, 2**63 - 1]) | int64s
texts = st.text(max_size=24)
parameters = st.one_of(
    st.builds(lambda v: pb.InferParameter(bool_param=v), st.booleans()),
    st.builds(lambda v: pb.InferParameter(int64_param=v), st.sampled_from([0, 1, 2, -1]) | int64s),
    st.builds(lambda v: pb.InferParameter(string_param=v),
              st.sampled_from(["0", "1", "-1", " 1", "1.5", "9" * 5000, "１"]) | texts),
    st.builds(lambda v: pb.InferParameter(double_param=v), st.floats()),
    st.builds(lambda v: pb.InferParameter(uint64_param=v), st.integers(0, 2**64 - 1)),
    st.just(pb.InferParameter()),
)
parameter_maps = st.dictionaries(st.sampled_from(["layer", "priority", "timeout", ""]) | texts, parameters, max_size=3)
datatypes = st.sampled_from(["FP32", "FP16", "BF16", "INT32", "INT64", "BYTES", "BOOL", "FP64", "", "fp32"]) | texts


@st.composite
def typed_contents(draw) -> pb.InferTensorContents:
    n = st.integers(0, 2 * HIDDEN)
    contents = pb.InferTensorContents()
    kind = draw(st.sampled_from(["fp32", "fp64", "int", "int64", "uint", "uint64", "bool", "bytes"]))
    values = {
        "fp32": st.lists(st.floats(width=32), max_size=draw(n)),
        "fp64": st.lists(st.floats(), max_size=draw(n)),
        "int": st.lists(st.integers(-2**31, 2**31 - 1), max_size=draw(n)),
        "int64": st.lists(int64s, max_size=draw(n)),
        "uint": st.lists(st.integers(0, 2**32 - 1), max_size=draw(n)),
        "uint64": st.lists(st.integers(0, 2**64 - 1), max_size=draw(n)),
        "bool": st.lists(st.booleans(), max_size=draw(n)),
        "bytes": st.lists(st.binary(max_size=16), max_size=4),
    }[kind]
    getattr(contents, f"{kind}_contents").extend(draw(values))
    return contents


@st.composite
def wild_requests(draw) -> pb.ModelInferRequest:
    """Anything the message allows: tensors, parameters and contents at random."""
    request = pb.ModelInferRequest(
        model_name=draw(mostly(st.just(MODEL), texts | st.just("m" * 20000))),
        model_version=draw(mostly(st.sampled_from(["", "1"]), st.just("2") | texts)),
        id=draw(texts),
    )
    for key, value in draw(parameter_maps).items():
        request.parameters[key].CopyFrom(value)
    for _ in range(draw(st.integers(0, 3))):
        tensor = request.inputs.add(name=draw(st.just("hidden_states") | texts), datatype=draw(datatypes),
                                    shape=draw(st.lists(dims, max_size=4)))
        for key, value in draw(parameter_maps).items():
            tensor.parameters[key].CopyFrom(value)
        if draw(st.booleans()):
            tensor.contents.CopyFrom(draw(typed_contents()))
    request.raw_input_contents.extend(draw(st.lists(st.binary(max_size=600), max_size=2)))
    for name in draw(st.lists(st.sampled_from(["hidden_states", "topk_ids", "topk_weights", ""]) | texts, max_size=4)):
        output = request.outputs.add(name=name)
        for key, value in draw(parameter_maps).items():
            output.parameters[key].CopyFrom(value)
    return request


@dataclass(frozen=True)
class Case:
    """A request and, when it was left valid (`mutation` "none"), what the server must answer."""

    request: pb.ModelInferRequest
    mutation: str
    layer: int = 0
    sent: np.ndarray | None = None  # `[T, H]` float32: the values the server decodes
    datatype: str = "FP32"


MUTATIONS = ["none", "none", "none", "datatype", "shape", "name", "extra-input", "extra-raw", "raw-length",
             "non-finite", "layer", "no-layer", "output", "parameters", "model"]


@st.composite
def mutated_requests(draw) -> Case:
    """A valid request for the shared model (FP32 typed or raw, FP16, BF16; the layer as int64,
    uint64 or string), then at most one thing made wrong."""
    tokens, layer = draw(st.integers(1, 4)), draw(st.sampled_from([0, 1]))
    datatype = draw(st.sampled_from(["FP32", "FP16", "BF16"]))
    values = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).standard_normal((tokens, HIDDEN), dtype=np.float32)
    mutation = draw(st.sampled_from(MUTATIONS))
    if mutation == "non-finite":
        values[draw(st.integers(0, tokens - 1)), draw(st.integers(0, HIDDEN - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    if datatype == "FP16":
        raw, sent = values.astype(np.float16).tobytes(), values.astype(np.float16).astype(np.float32)
    elif datatype == "BF16":
        bits = to_bf16_bits(values)
        raw, sent = bits.tobytes(), from_bf16_bits(bits).numpy()
    else:
        raw, sent = values.tobytes(), values
    request = pb.ModelInferRequest(model_name=MODEL, id=draw(texts))
    tensor = request.inputs.add(name="hidden_states", datatype=datatype, shape=[tokens, HIDDEN])
    if datatype == "FP32" and draw(st.booleans()):
        tensor.contents.fp32_contents.extend(values.reshape(-1).tolist())
    else:
        request.raw_input_contents.append(raw)
    kind = draw(st.sampled_from(["int64_param", "uint64_param", "string_param"]))
    setattr(request.parameters["layer"], kind, str(layer) if kind == "string_param" else layer)
    for name in draw(st.lists(st.sampled_from(["hidden_states", "topk_ids", "topk_weights"]), max_size=3, unique=True)):
        request.outputs.add(name=name)

    if mutation == "datatype":
        tensor.datatype = draw(datatypes)
    elif mutation == "shape":
        tensor.ClearField("shape")
        tensor.shape.extend(draw(st.lists(dims, max_size=4)))
    elif mutation == "name":
        tensor.name = draw(texts)
    elif mutation == "extra-input":
        request.inputs.add(name=draw(st.just("hidden_states") | texts), datatype=draw(datatypes),
                           shape=draw(st.lists(dims, max_size=3)))
    elif mutation == "extra-raw":
        request.raw_input_contents.append(draw(st.binary(max_size=64)))
    elif mutation == "raw-length":
        request.ClearField("raw_input_contents")
        request.raw_input_contents.append(draw(st.binary(max_size=2 * len(raw))))
    elif mutation == "layer":
        request.parameters["layer"].CopyFrom(draw(parameters))
    elif mutation == "no-layer":
        del request.parameters["layer"]
    elif mutation == "output":
        request.outputs.add(name=draw(texts))
    elif mutation == "parameters":  # unknown parameters are ignored: still a valid request
        for key, value in draw(parameter_maps).items():
            if key != "layer":
                request.parameters[key].CopyFrom(value)
        for key, value in draw(parameter_maps).items():
            tensor.parameters[key].CopyFrom(value)
    elif mutation == "model":
        request.model_name = draw(texts)
        request.model_version = draw(texts)
    still_valid = mutation in ("none", "parameters")
    return Case(request, mutation if not still_valid else "none", layer, sent if still_valid else None, datatype)


ANSWERED: Counter[str] = Counter()
TOLERANCE = {"FP32": FP32_REL_TOL, "FP16": FP16_REL_TOL, "BF16": BF16_REL_TOL}


def _hidden_as_float32(response: pb.ModelInferResponse) -> np.ndarray:
    hidden = parse_response(response).hidden_states
    return from_bf16_bits(hidden).numpy() if hidden.dtype == np.uint16 else hidden.astype(np.float32)


def _asked_for_hidden(request: pb.ModelInferRequest) -> bool:
    return not request.outputs or any(o.name == "hidden_states" for o in request.outputs)


@settings(max_examples=600, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=mutated_requests() | wild_requests().map(lambda r: Case(r, "wild")))
def test_random_inference_requests_are_never_unknown_or_internal(main_server: Served, channel, case: Case) -> None:
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                               request_serializer=pb.ModelInferRequest.SerializeToString,
                               response_deserializer=pb.ModelInferResponse.FromString)
    try:
        response = call(case.request, timeout=30)
    except grpc.RpcError as err:
        assert err.code() not in NEVER, f"{err.code().name}: {err.details()}\n{case.request}"
        assert case.mutation != "none", f"a valid request was refused: {err.code().name}: {err.details()}"
        ANSWERED[err.code().name] += 1
        return
    ANSWERED["OK"] += 1
    tokens = case.request.inputs[0].shape[0]
    assert response.model_name == MODEL
    assert all(list(o.shape) == [tokens, HIDDEN] for o in response.outputs if o.name == "hidden_states")
    if case.mutation == "none" and _asked_for_hidden(case.request):  # valid: the answer equals the reference
        want, _, _ = main_server.expected(case.layer, case.sent)
        err = rel_err(_hidden_as_float32(response), want)
        assert err < TOLERANCE[case.datatype], f"{case.datatype} answer: relative error {err:.2e}"


def test_after_the_fuzz_the_server_still_serves_correctly(main_server: Served, channel) -> None:
    if not ANSWERED:
        pytest.skip("run with the structured fuzz")
    assert ANSWERED["OK"] > 0 and ANSWERED["INVALID_ARGUMENT"] > 0, ANSWERED  # both sides were reached
    assert health_status(channel) == "SERVING"
    for layer in main_server.spec.moe_layers:
        main_server.assert_serves_correctly(layer, hidden_states(9, HIDDEN, seed=100 + layer))
    assert np.isfinite(main_server.client.infer(MODEL, hidden_states(2, HIDDEN, seed=3), layer=0).hidden_states).all()


def test_an_error_that_echoes_a_huge_input_keeps_its_code(channel) -> None:
    """The unknown-model message quotes the name: cut, or the trailers overflow and the client
    sees RESOURCE_EXHAUSTED instead of NOT_FOUND."""
    request = pb.ModelInferRequest(model_name="m" * 100_000)
    request.inputs.add(name="hidden_states", datatype="FP32", shape=[1, HIDDEN]).contents.fp32_contents.extend([0.5] * HIDDEN)
    with pytest.raises(grpc.RpcError) as caught:
        pb_stub(channel).ModelInfer(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND, caught.value.details()
    assert "more characters)" in caught.value.details()


def pb_stub(channel: grpc.Channel):
    from protos import grpc_predict_v2_pb2_grpc as pb_grpc

    return pb_grpc.GRPCInferenceServiceStub(channel)
