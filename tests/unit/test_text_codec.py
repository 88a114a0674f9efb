"""Text requests over KServe v2, as Triton's LLM backends take them: the prompt in every form a
client sends BYTES, each sampling parameter in every parameter kind that holds it sensibly, and
every bad input or value refused as INVALID_ARGUMENT naming it."""

from __future__ import annotations

import struct

import grpc
import pytest

from protos import grpc_predict_v2_pb2 as pb
from router_service.errors import InvalidRequest
from router_service.generation.params import SamplingParams
from router_service.servicer import status_code
from router_service.text_codec import (
    FINAL_RESPONSE,
    decode_text_request,
    is_text_request,
    sampling_params,
    serialize_bytes,
    text_response,
)

DEFAULT_MAX_TOKENS = 16


def text_request(prompt: str | bytes = "the cat", *, raw: bool = True, shape: tuple[int, ...] = (1,),
                 datatype: str = "BYTES", **parameters) -> pb.ModelInferRequest:
    """A text request as tritonclient builds it (raw, length-prefixed) or with bytes_contents."""
    data = prompt.encode() if isinstance(prompt, str) else prompt
    request = pb.ModelInferRequest(model_name="m", id="r1")
    tensor = request.inputs.add(name="text_input", datatype=datatype, shape=list(shape))
    if raw:
        request.raw_input_contents.append(struct.pack("<I", len(data)) + data)
    else:
        tensor.contents.bytes_contents.append(data)
    for name, value in parameters.items():
        set_param(request.parameters[name], value)
    return request


def set_param(param: pb.InferParameter, value) -> None:
    """As tritonclient does: str, bool, int, float -> the matching kind; ("uint64", v) for uint64."""
    if isinstance(value, tuple):
        param.uint64_param = value[1]
    elif isinstance(value, str):
        param.string_param = value
    elif isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        param.int64_param = value
    else:
        param.double_param = value


def params_of(**parameters) -> SamplingParams:
    return decode_text_request(text_request(**parameters), DEFAULT_MAX_TOKENS).params


def refusal(request: pb.ModelInferRequest) -> str:
    with pytest.raises(InvalidRequest) as caught:
        decode_text_request(request, DEFAULT_MAX_TOKENS)
    assert status_code(caught.value) == grpc.StatusCode.INVALID_ARGUMENT
    return str(caught.value)


# ---- the prompt ---------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [pytest.param(True, id="raw-length-prefixed"), pytest.param(False, id="bytes-contents")])
@pytest.mark.parametrize("shape", [(1,), (1, 1)], ids=["shape-1", "shape-1x1"])
def test_the_prompt_decodes_from_either_form(raw: bool, shape: tuple[int, ...]) -> None:
    request = text_request("héllo, wörld ✓", raw=raw, shape=shape)

    decoded = decode_text_request(request, DEFAULT_MAX_TOKENS)

    assert decoded.prompt == "héllo, wörld ✓"
    assert decoded.params == SamplingParams(max_tokens=DEFAULT_MAX_TOKENS)
    assert is_text_request(request)


def test_a_layer_request_is_not_a_text_request() -> None:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="hidden_states", datatype="FP32", shape=[1, 4])
    assert not is_text_request(request)


@pytest.mark.parametrize("mutate, words", [
    pytest.param(lambda r: r.inputs[0].__setattr__("datatype", "FP32"), ["datatype must be BYTES", "'FP32'"], id="datatype"),
    pytest.param(lambda r: r.inputs[0].shape.__setitem__(0, 2), ["shape must be [1] or [1, 1]", "[2]"], id="two-prompts"),
    pytest.param(lambda r: r.inputs[0].shape.append(2), ["shape must be [1] or [1, 1]", "[1, 2]"], id="shape-1x2"),
    pytest.param(lambda r: r.inputs.add(name="stream", datatype="BOOL", shape=[1]), ["exactly one input", "stream"],
                 id="second-input"),
    pytest.param(lambda r: r.outputs.add(name="hidden_states"), ["unknown requested outputs", "hidden_states"],
                 id="layer-output"),
    pytest.param(lambda r: r.raw_input_contents.append(b"x"), ["raw_input_contents has 2 entries"], id="two-raw"),
    pytest.param(lambda r: r.inputs[0].contents.bytes_contents.append(b"x"), ["both contents and raw_input_contents"],
                 id="both-forms"),
    pytest.param(lambda r: r.ClearField("raw_input_contents"), ["has no data"], id="no-data"),
    pytest.param(lambda r: r.inputs[0].parameters["shared_memory_region"].__setattr__("string_param", "in"),
                 ["not in shared memory", "['text_input']"], id="input-in-shared-memory"),
    pytest.param(lambda r: r.outputs.add(name="text_output").parameters["shared_memory_region"].__setattr__(
        "string_param", "out"), ["not in shared memory", "['text_output']"], id="output-in-shared-memory"),
])
def test_a_bad_text_input_is_refused_naming_it(mutate, words: list[str]) -> None:
    request = text_request()
    mutate(request)

    message = refusal(request)

    assert all(w in message for w in words), message


@pytest.mark.parametrize("raw, words", [
    pytest.param(b"\x05\x00", ["is 2 bytes", "4-byte little-endian length"], id="shorter-than-length"),
    pytest.param(struct.pack("<I", 9) + b"abc", ["is 7 bytes", "says 9 bytes"], id="length-too-long"),
    pytest.param(serialize_bytes(b"ab") + serialize_bytes(b"cd"), ["exactly one element"], id="two-elements"),
])
def test_a_malformed_raw_bytes_element_is_refused(raw: bytes, words: list[str]) -> None:
    request = text_request()
    request.raw_input_contents[0] = raw

    message = refusal(request)

    assert "text_input" in message and all(w in message for w in words), message


def test_a_prompt_that_is_not_utf8_is_refused_with_its_byte() -> None:
    message = refusal(text_request(b"ab\xffcd"))
    assert "text_input" in message and "not valid UTF-8" in message and "at byte 2" in message, message


def test_several_bytes_contents_entries_are_refused() -> None:
    request = text_request(raw=False)
    request.inputs[0].contents.bytes_contents.append(b"second")
    assert "needs 1 bytes_contents entry, got 2" in refusal(request)


# ---- the sampling parameters --------------------------------------------------------------------


@pytest.mark.parametrize("parameters, expected", [
    pytest.param({}, SamplingParams(max_tokens=DEFAULT_MAX_TOKENS), id="defaults"),
    pytest.param(dict(max_tokens=5), SamplingParams(max_tokens=5), id="int64"),
    pytest.param(dict(max_tokens=("uint64", 5)), SamplingParams(max_tokens=5), id="uint64"),
    pytest.param(dict(max_tokens=5.0), SamplingParams(max_tokens=5), id="integral-double"),
    pytest.param(dict(max_tokens=" 5"), SamplingParams(max_tokens=5), id="decimal-string"),
    pytest.param(dict(temperature=0), SamplingParams(max_tokens=16, temperature=0.0), id="temperature-int"),
    pytest.param(dict(temperature=0.7, top_p="0.9"), SamplingParams(max_tokens=16, temperature=0.7, top_p=0.9),
                 id="number-double-and-string"),
    pytest.param(dict(top_k=5, seed=("uint64", 7)), SamplingParams(max_tokens=16, top_k=5, seed=7), id="top-k-seed"),
    pytest.param(dict(seed=-3), SamplingParams(max_tokens=16, seed=-3), id="negative-seed"),
    pytest.param(dict(stop="\n"), SamplingParams(max_tokens=16, stop=("\n",)), id="stop-string"),
    pytest.param(dict(stop='["a", "b c"]'), SamplingParams(max_tokens=16, stop=("a", "b c")), id="stop-json-list"),
    pytest.param(dict(stop="[]"), SamplingParams(max_tokens=16), id="stop-empty-list"),
    pytest.param(dict(ignore_eos=True), SamplingParams(max_tokens=16, ignore_eos=True), id="bool"),
    pytest.param(dict(ignore_eos="False"), SamplingParams(max_tokens=16, ignore_eos=False), id="bool-string"),
    pytest.param(dict(ignore_eos=1), SamplingParams(max_tokens=16, ignore_eos=True), id="bool-int"),
    pytest.param(dict(triton_enable_empty_final_response=True), SamplingParams(max_tokens=16),
                 id="triton-own-parameter-left-alone"),
])
def test_parameters_in_every_sensible_kind(parameters: dict, expected: SamplingParams) -> None:
    assert params_of(**parameters) == expected


@pytest.mark.parametrize("parameters, words", [
    pytest.param(dict(max_tokens=True), ["'max_tokens' must be an integer", "bool_param True"], id="max-tokens-bool"),
    pytest.param(dict(max_tokens=2.5), ["'max_tokens' must be an integer", "double_param 2.5"], id="max-tokens-fraction"),
    pytest.param(dict(max_tokens="many"), ["'max_tokens' must be an integer", "'many'"], id="max-tokens-word"),
    pytest.param(dict(max_tokens=0), ["max_tokens must be >= 1, got 0"], id="max-tokens-zero"),
    pytest.param(dict(temperature=True), ["'temperature' must be a number", "bool_param"], id="temperature-bool"),
    pytest.param(dict(temperature="hot"), ["'temperature' must be a number", "'hot'"], id="temperature-word"),
    pytest.param(dict(temperature=-1.0), ["temperature must be >= 0"], id="temperature-negative"),
    pytest.param(dict(temperature="nan"), ["temperature must be a finite number"], id="temperature-nan"),
    pytest.param(dict(top_p=1.5), ["top_p must be in (0, 1]", "1.5"], id="top-p-above-one"),
    pytest.param(dict(top_k=-2), ["top_k must be >= -1", "-2"], id="top-k-below-minus-one"),
    pytest.param(dict(seed=("uint64", 2**64 - 1)), ["seed must be in"], id="seed-beyond-int64"),
    pytest.param(dict(stop=3), ["'stop' must be a string", "int64_param 3"], id="stop-int"),
    pytest.param(dict(stop=""), ["stop must be a string or a list of non-empty strings"], id="stop-empty"),
    pytest.param(dict(stop='["a", 1]'), ["'stop' must be a string or a JSON list of strings"], id="stop-list-of-int"),
    pytest.param(dict(stop='["a"'), ["'stop' starts with '[' but is not a JSON list"], id="stop-bad-json"),
    pytest.param(dict(stop='["a","b","c","d","e"]'), ["stop takes at most 4 strings"], id="stop-five"),
    pytest.param(dict(ignore_eos="yes"), ["'ignore_eos' must be a boolean", "'yes'"], id="ignore-eos-word"),
    pytest.param(dict(ignore_eos=2), ["'ignore_eos' must be a boolean", "int64_param 2"], id="ignore-eos-two"),
    pytest.param(dict(ignore_eos=1.0), ["'ignore_eos' must be a boolean", "double_param"], id="ignore-eos-double"),
    pytest.param(dict(max_token=5), ["unknown request parameters ['max_token']", "max_tokens"], id="typo"),
    pytest.param(dict(layer=0), ["unknown request parameters ['layer']"], id="layer-on-text"),
])
def test_a_bad_parameter_is_refused_naming_it(parameters: dict, words: list[str]) -> None:
    message = refusal(text_request(**parameters))
    assert all(w in message for w in words), message


def test_an_empty_parameter_is_refused_as_such() -> None:
    request = text_request()
    request.parameters["top_k"].CopyFrom(pb.InferParameter())
    assert "'top_k' must be an integer, got an empty parameter" in refusal(request)


def test_sampling_params_takes_the_default_max_tokens_only_when_not_given() -> None:
    assert sampling_params({}, 7).max_tokens == 7
    assert sampling_params({"max_tokens": pb.InferParameter(int64_param=3)}, 7).max_tokens == 3


# ---- the answer ---------------------------------------------------------------------------------


def test_a_streamed_piece_carries_text_counts_and_the_final_flag() -> None:
    piece = text_response("m", "1", "r1", "wörld", prompt_tokens=4, completion_tokens=2, finish_reason=None, final=False)
    last = text_response("m", "1", "r1", "", prompt_tokens=4, completion_tokens=3, finish_reason="length", final=True)

    (tensor,) = piece.outputs
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("text_output", "BYTES", [1])
    assert piece.raw_output_contents[0] == struct.pack("<I", len("wörld".encode())) + "wörld".encode()
    assert piece.id == "r1" and piece.model_name == "m"
    assert piece.parameters["prompt_tokens"].int64_param == 4
    assert piece.parameters["completion_tokens"].int64_param == 2
    assert "finish_reason" not in piece.parameters
    assert piece.parameters[FINAL_RESPONSE].bool_param is False
    assert last.parameters["finish_reason"].string_param == "length"
    assert last.parameters[FINAL_RESPONSE].bool_param is True
    assert last.raw_output_contents[0] == b"\x00\x00\x00\x00"


def test_a_unary_answer_has_no_final_flag() -> None:
    whole = text_response("m", "1", "", "text", prompt_tokens=1, completion_tokens=1, finish_reason="stop")
    assert FINAL_RESPONSE not in whole.parameters
    assert whole.parameters["finish_reason"].string_param == "stop"
