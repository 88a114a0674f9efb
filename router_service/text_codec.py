"""Text generation over the Open Inference Protocol (KServe v2), as Triton's TensorRT-LLM and vLLM
backends serve it: a BYTES input `text_input` (one UTF-8 prompt) with the sampling parameters as
request parameters, and a BYTES output `text_output` with the token counts and the finish reason
as response parameters.

Checks raise `InvalidRequest` naming the input or parameter at fault; the servicer turns it into
a gRPC status. Nothing here knows status codes, tokenizers or the engine.

BYTES tensors travel as Triton sends them: in `raw_input_contents`, each element a 4-byte
little-endian length and then its bytes (what `tritonclient`'s `set_data_from_numpy` writes), or
in `contents.bytes_contents`, one entry per element. Answers use the raw form.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from protos import grpc_predict_v2_pb2 as pb
from router_service.errors import InvalidRequest
from router_service.generation.params import SamplingParams

TEXT_INPUT = "text_input"
TEXT_OUTPUT = "text_output"
FINAL_RESPONSE = "triton_final_response"  # set on every streamed response; true on a request's last
TRITON_PREFIX = "triton_"  # Triton's own request parameters (e.g. triton_enable_empty_final_response): not ours to check
_LENGTH = struct.Struct("<I")

# request parameter -> what it must be (how `_value` converts it)
PARAMETERS: dict[str, str] = {
    "max_tokens": "integer",
    "temperature": "number",
    "top_p": "number",
    "top_k": "integer",
    "seed": "integer",
    "stop": "string",
    "ignore_eos": "boolean",
    "expert_skip_threshold": "number",  # [0, 1): expert skipping (router_service.skipping); absent: the model's
}


@dataclass(frozen=True)
class TextRequest:
    """One text request: its prompt and how to sample the answer."""

    prompt: str
    params: SamplingParams


def is_text_request(request: pb.ModelInferRequest) -> bool:
    """Whether `request` asks for text (it has an input named `text_input`) rather than an MoE layer."""
    return any(tensor.name == TEXT_INPUT for tensor in request.inputs)


def decode_text_request(request: pb.ModelInferRequest, default_max_tokens: int) -> TextRequest:
    """The prompt and sampling parameters of a text request; `default_max_tokens` when it does not
    say `max_tokens`. InvalidRequest naming what is wrong."""
    if len(request.inputs) != 1:
        raise InvalidRequest(f"a text request has exactly one input, '{TEXT_INPUT}'; got "
                             f"{[tensor.name for tensor in request.inputs]}")
    unknown = [o.name for o in request.outputs if o.name != TEXT_OUTPUT]
    if unknown:
        raise InvalidRequest(f"unknown requested outputs {unknown}; a text request answers ['{TEXT_OUTPUT}']")
    shared = [t.name for t in (*request.inputs, *request.outputs) if "shared_memory_region" in t.parameters]
    if shared:
        raise InvalidRequest(f"a text request's tensors travel in the request, not in shared memory (got "
                             f"'shared_memory_region' on {shared}); only the layer API's tensors can")
    prompt = decode_prompt(request.inputs[0], list(request.raw_input_contents))
    return TextRequest(prompt, sampling_params(request.parameters, default_max_tokens))


def decode_prompt(tensor: pb.ModelInferRequest.InferInputTensor, raw_contents: list[bytes]) -> str:
    """The one UTF-8 string of a BYTES tensor of shape [1] or [1, 1]."""
    if tensor.datatype != "BYTES":
        raise InvalidRequest(f"input '{TEXT_INPUT}' datatype must be BYTES, got '{tensor.datatype}'")
    shape = list(tensor.shape)
    if shape not in ([1], [1, 1]):
        raise InvalidRequest(f"input '{TEXT_INPUT}' shape must be [1] or [1, 1] (one prompt), got {shape}")
    if raw_contents and tensor.HasField("contents"):
        raise InvalidRequest(f"input '{TEXT_INPUT}' sets both contents and raw_input_contents; send one")
    if raw_contents:
        if len(raw_contents) != 1:
            raise InvalidRequest(f"raw_input_contents has {len(raw_contents)} entries for 1 input")
        data = _one_raw_element(raw_contents[0])
    elif tensor.HasField("contents"):
        elements = tensor.contents.bytes_contents
        if len(elements) != 1:
            raise InvalidRequest(f"input '{TEXT_INPUT}' shape {shape} needs 1 bytes_contents entry, got {len(elements)}")
        data = elements[0]
    else:
        raise InvalidRequest(f"input '{TEXT_INPUT}' has no data: set raw_input_contents or contents.bytes_contents")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidRequest(f"input '{TEXT_INPUT}' is not valid UTF-8: {err.reason} at byte {err.start}") from None


def _one_raw_element(raw: bytes) -> bytes:
    """The element of a serialized BYTES tensor of one element: length (uint32 LE), then bytes."""
    if len(raw) < _LENGTH.size:
        raise InvalidRequest(f"input '{TEXT_INPUT}' raw content is {len(raw)} bytes; a BYTES element starts "
                             f"with its 4-byte little-endian length")
    (length,) = _LENGTH.unpack_from(raw)
    if len(raw) != _LENGTH.size + length:
        raise InvalidRequest(f"input '{TEXT_INPUT}' raw content is {len(raw)} bytes, but its element says "
                             f"{length} bytes (+4 for the length): it must hold exactly one element")
    return raw[_LENGTH.size:]


def sampling_params(parameters: Mapping[str, pb.InferParameter], default_max_tokens: int) -> SamplingParams:
    """The request parameters as `SamplingParams`: each of `PARAMETERS` in any parameter kind
    that holds its value sensibly (an integer as int64, uint64, an integral double or a decimal
    string; a boolean as bool, "true"/"false" or 0/1; `stop` as a string, or a JSON list of
    strings in one). Triton's own parameters (`triton_...`) are left alone; any other name is
    refused."""
    unknown = sorted(name for name in parameters if name not in PARAMETERS and not name.startswith(TRITON_PREFIX))
    if unknown:
        raise InvalidRequest(f"unknown request parameters {unknown} for a text request; it takes {list(PARAMETERS)}")
    values = {name: _value(name, parameters[name]) for name in PARAMETERS if name in parameters}
    values.setdefault("max_tokens", default_max_tokens)
    if "stop" in values:
        values["stop"] = _stop(values["stop"])
    return SamplingParams(**values)


def _value(name: str, param: pb.InferParameter) -> int | float | bool | str:
    kind = param.WhichOneof("parameter_choice")
    value = getattr(param, kind) if kind else None
    wanted = PARAMETERS[name]
    if wanted == "integer":
        if kind in ("int64_param", "uint64_param"):
            return value
        if kind == "double_param" and value.is_integer():
            return int(value)
        if kind == "string_param" and _parses(int, value):
            return int(value)
    elif wanted == "number":
        if kind in ("int64_param", "uint64_param", "double_param"):
            return float(value)
        if kind == "string_param" and _parses(float, value):
            return float(value)
    elif wanted == "boolean":
        if kind == "bool_param":
            return value
        if kind == "string_param" and value.strip().lower() in ("true", "false", "1", "0"):
            return value.strip().lower() in ("true", "1")
        if kind in ("int64_param", "uint64_param") and value in (0, 1):
            return bool(value)
    elif kind == "string_param":
        return value
    shown = f"{kind} {value!r}" if kind else "an empty parameter"
    raise InvalidRequest(f"request parameter '{name}' must be {_article(wanted)} {wanted}, got {shown}")


def _stop(text: str) -> tuple[str, ...]:
    """`stop` as a string: one stop string, or a JSON list of them."""
    if not text.lstrip().startswith("["):
        return (text,)
    try:
        stops = json.loads(text)
    except json.JSONDecodeError as err:
        raise InvalidRequest(f"request parameter 'stop' starts with '[' but is not a JSON list: {err.msg} at "
                             f"character {err.pos} (a stop string that starts with '[' goes in a list: "
                             f"'[\"[END]\"]')") from None
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise InvalidRequest(f"request parameter 'stop' must be a string or a JSON list of strings, got {text!r}")
    return tuple(stops)


def _parses(kind: type, text: str) -> bool:
    try:
        kind(text)
    except ValueError:
        return False
    return True


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def serialize_bytes(data: bytes) -> bytes:
    """One BYTES element in Triton's raw form: its 4-byte little-endian length, then the bytes."""
    return _LENGTH.pack(len(data)) + data


def text_response(model_name: str, model_version: str, request_id: str, text: str, prompt_tokens: int,
                  completion_tokens: int, finish_reason: str | None, final: bool | None = None) -> pb.ModelInferResponse:
    """An answer (or one streamed piece of it) to a text request: `text_output` holds `text`;
    parameters `prompt_tokens`, `completion_tokens` (so far), `finish_reason` (once finished)
    and, for a streamed piece (`final` not None), `triton_final_response`."""
    response = pb.ModelInferResponse(model_name=model_name, model_version=model_version, id=request_id)
    response.outputs.add(name=TEXT_OUTPUT, datatype="BYTES", shape=[1])
    response.raw_output_contents.append(serialize_bytes(text.encode("utf-8")))
    params = response.parameters
    params["prompt_tokens"].int64_param = prompt_tokens
    params["completion_tokens"].int64_param = completion_tokens
    if finish_reason is not None:
        params["finish_reason"].string_param = finish_reason
    if final is not None:
        params[FINAL_RESPONSE].bool_param = final
    return response
