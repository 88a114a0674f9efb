"""Open Inference Protocol (KServe v2) tensors <-> torch, with every input check the contract
names. Checks raise `InvalidRequest`, a domain error the servicer turns into a gRPC status;
nothing here knows status codes or touches a worker.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from cluster.model_spec import WIRE_DTYPES, ModelSpec
from protos import grpc_predict_v2_pb2 as pb
from router_service.errors import InvalidRequest

warnings.filterwarnings("ignore", message="The given buffer is not writable")

INPUT_NAME = "hidden_states"
OUTPUT_NAMES = ("hidden_states", "topk_ids", "topk_weights")
_ITEMSIZE = {name: torch.empty(0, dtype=dt).element_size() for name, dt in WIRE_DTYPES.items()}
_OUTPUT_DTYPES = {**WIRE_DTYPES, "INT32": torch.int32}


@dataclass(frozen=True)
class DecodedRequest:
    """hidden: `[T, H]` float32; wire_dtype: the datatype to answer in."""

    layer: int
    hidden: torch.Tensor
    wire_dtype: str
    outputs: tuple[str, ...]


def decode_request(request: pb.ModelInferRequest, spec: ModelSpec) -> DecodedRequest:
    if len(request.inputs) != 1 or request.inputs[0].name != INPUT_NAME:
        got = [i.name for i in request.inputs] or "no inputs"
        raise InvalidRequest(f"expected exactly one input named '{INPUT_NAME}', got {got}")
    if request.raw_input_contents and len(request.raw_input_contents) != 1:
        raise InvalidRequest(
            f"raw_input_contents has {len(request.raw_input_contents)} entries for 1 input"
        )
    tensor = request.inputs[0]
    hidden = _decode_hidden(tensor, request.raw_input_contents[0] if request.raw_input_contents else None, spec)
    return DecodedRequest(
        layer=_layer(request, spec),
        hidden=hidden,
        wire_dtype=tensor.datatype,
        outputs=_requested_outputs(request),
    )


def _decode_hidden(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None, spec: ModelSpec) -> torch.Tensor:
    if tensor.datatype not in WIRE_DTYPES:
        raise InvalidRequest(
            f"input '{INPUT_NAME}' datatype must be one of {', '.join(WIRE_DTYPES)}, got "
            f"'{tensor.datatype}'"
        )
    shape = list(tensor.shape)
    if len(shape) != 2 or shape[1] != spec.hidden_size or shape[0] < 0:
        raise InvalidRequest(
            f"input '{INPUT_NAME}' shape must be [tokens, {spec.hidden_size}], got {shape}"
        )
    if shape[0] == 0:
        raise InvalidRequest(f"input '{INPUT_NAME}' is an empty batch (shape {shape}); send at least one token")
    count = shape[0] * shape[1]
    if raw is not None:
        hidden = _from_raw(raw, tensor.datatype, count, shape)
    elif tensor.datatype == "FP32" and tensor.HasField("contents"):
        values = tensor.contents.fp32_contents
        if len(values) != count:
            raise InvalidRequest(
                f"input '{INPUT_NAME}' shape {shape} needs {count} fp32_contents values, got {len(values)}"
            )
        hidden = torch.tensor(np.asarray(values, dtype=np.float32))
    elif tensor.HasField("contents"):
        raise InvalidRequest(
            f"input '{INPUT_NAME}' with datatype {tensor.datatype} must be sent in "
            f"raw_input_contents (the protocol has no typed field for it)"
        )
    else:
        raise InvalidRequest(f"input '{INPUT_NAME}' has no data: set raw_input_contents or contents")
    hidden = hidden.reshape(shape).float()
    if math.isfinite(float(hidden.sum())):  # a NaN/Inf anywhere makes the sum non-finite
        return hidden
    finite = torch.isfinite(hidden)  # the slow exact check, only when the sum says so
    if not bool(finite.all()):
        bad = (~finite).nonzero()[0].tolist()
        raise InvalidRequest(
            f"input '{INPUT_NAME}' has {int((~finite).sum())} NaN/Inf values, first at "
            f"[token {bad[0]}, dim {bad[1]}]"
        )
    return hidden


def _from_raw(raw: bytes, datatype: str, count: int, shape: list[int]) -> torch.Tensor:
    expected = count * _ITEMSIZE[datatype]
    if len(raw) != expected:
        raise InvalidRequest(
            f"input '{INPUT_NAME}' raw content is {len(raw)} bytes, but shape {shape} of "
            f"{datatype} needs {expected} bytes"
        )
    return torch.frombuffer(raw, dtype=WIRE_DTYPES[datatype])


def _layer(request: pb.ModelInferRequest, spec: ModelSpec) -> int:
    if "layer" not in request.parameters:
        if spec.num_moe_layers == 1:
            return spec.moe_layers[0]
        raise InvalidRequest(
            f"request parameter 'layer' is required: this model has {spec.num_moe_layers} "
            f"MoE layers ({spec.describe_layers()})"
        )
    param = request.parameters["layer"]
    kind = param.WhichOneof("parameter_choice")
    if kind in ("int64_param", "uint64_param"):
        layer = getattr(param, kind)
    elif kind == "string_param" and _is_int(param.string_param):
        layer = int(param.string_param)
    else:
        shown = f"{kind} {getattr(param, kind)!r}" if kind else "an empty parameter"
        raise InvalidRequest(f"request parameter 'layer' must be an integer, got {shown}")
    try:
        spec.moe_index(layer)
    except ValueError as err:
        raise InvalidRequest(str(err)) from None
    return layer


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _requested_outputs(request: pb.ModelInferRequest) -> tuple[str, ...]:
    names = tuple(o.name for o in request.outputs) or ("hidden_states",)
    unknown = [n for n in names if n not in OUTPUT_NAMES]
    if unknown:
        raise InvalidRequest(f"unknown requested outputs {unknown}; this model offers {list(OUTPUT_NAMES)}")
    return names


def encode_tensor(name: str, value: torch.Tensor, wire_dtype: str) -> tuple[pb.ModelInferResponse.InferOutputTensor, bytes]:
    """A torch tensor as an output tensor description plus its raw little-endian bytes."""
    value = value.to(_OUTPUT_DTYPES[wire_dtype])
    if wire_dtype == "BF16":  # numpy has no bfloat16: ship the same 16 bits as int16
        value = value.view(torch.int16)
    raw = value.numpy().tobytes()
    tensor = pb.ModelInferResponse.InferOutputTensor(name=name, datatype=wire_dtype, shape=list(value.shape))
    return tensor, raw
