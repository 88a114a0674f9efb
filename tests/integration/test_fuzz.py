"""Fuzzing the gRPC edge of a real router (the shared `main_server`): whatever arrives, the
answer is a status a client can act on, never UNKNOWN or INTERNAL, and the server keeps
serving correctly afterwards.

- random bytes to every method of the inference and admin services, sent with identity
  serializers, so they reach the server exactly as drawn;
- structured random `ModelInferRequest`s: shapes, datatypes, names, parameters of every kind,
  typed contents and raw contents of random lengths, some of them right for the model.

Hypothesis runs derandomized (the same examples every run, so CI does not flake on a new one)
with no example database; to explore further, run with `--hypothesis-seed=N` and without
`derandomize`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos import grpc_predict_v2_pb2 as pb
from router_service.server import ADMIN_DESCRIPTOR, INFERENCE_DESCRIPTOR
from tests.integration.support import MARKS, Served, health_status, hidden_states

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
itemsize = {"FP32": 4, "FP16": 2, "BF16": 2}


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
def infer_requests(draw) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(
        model_name=draw(mostly(st.just(MODEL), texts | st.just("m" * 20000))),
        model_version=draw(mostly(st.sampled_from(["", "1"]), st.just("2") | texts)),
        id=draw(texts),
    )
    for key, value in draw(parameter_maps).items():
        request.parameters[key].CopyFrom(value)
    if draw(st.booleans()):  # close to a good request: one hidden_states tensor of the right width
        tokens = draw(st.integers(1, 4))
        datatype = draw(st.sampled_from(sorted(itemsize)))
        tensor = request.inputs.add(name="hidden_states", datatype=datatype, shape=[tokens, HIDDEN])
        size = tokens * HIDDEN * itemsize[datatype]
        if datatype == "FP32" and draw(st.booleans()):
            tensor.contents.fp32_contents.extend(draw(st.lists(
                st.floats(-4, 4, width=32) | st.floats(width=32), min_size=tokens * HIDDEN, max_size=tokens * HIDDEN)))
        else:
            request.raw_input_contents.append(draw(st.binary(min_size=size, max_size=size) | st.binary(max_size=2 * size)))
        if draw(st.booleans()):
            request.parameters["layer"].int64_param = draw(st.sampled_from([0, 1]))
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


ANSWERED: Counter[str] = Counter()


@settings(max_examples=250, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(request=infer_requests())
def test_random_inference_requests_are_never_unknown_or_internal(channel, request: pb.ModelInferRequest) -> None:
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                               request_serializer=pb.ModelInferRequest.SerializeToString,
                               response_deserializer=pb.ModelInferResponse.FromString)
    try:
        response = call(request, timeout=30)
    except grpc.RpcError as err:
        assert err.code() not in NEVER, f"{err.code().name}: {err.details()}\n{request}"
        ANSWERED[err.code().name] += 1
        return
    ANSWERED["OK"] += 1
    tokens = request.inputs[0].shape[0]
    assert response.model_name == MODEL
    assert all(list(o.shape) == [tokens, HIDDEN] for o in response.outputs if o.name == "hidden_states")


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
