"""Open Inference Protocol (KServe v2) tensors <-> torch, with every input check the contract
names. Checks raise `InvalidRequest`, a domain error the servicer turns into a gRPC status;
nothing here knows status codes or touches a worker.

A tensor whose parameters name a system shared memory region (`shared_memory_region`,
`shared_memory_byte_size`, optionally `shared_memory_offset`, as Triton's clients set them) is
read from that region (`RegionViews`, see `router_service.shm`) without copying its bytes out:
the input is a torch view on the mapping (the gate reads it, the object store put copies it);
a requested output is written into its region and answered with its metadata only.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from cluster.model_spec import WIRE_DTYPES, ModelSpec
from protos import grpc_predict_v2_pb2 as pb
from router_service.errors import InvalidRequest
from router_service.skipping import PARAMETER as SKIP_PARAMETER
from router_service.skipping import check_threshold

warnings.filterwarnings("ignore", message="The given buffer is not writable")

INPUT_NAME = "hidden_states"
OUTPUT_NAMES = ("hidden_states", "topk_ids", "topk_weights")
_OUTPUT_DTYPES = {**WIRE_DTYPES, "INT32": torch.int32}
_ITEMSIZE = {name: torch.empty(0, dtype=dt).element_size() for name, dt in WIRE_DTYPES.items()}
_OUTPUT_ITEMSIZE = {name: torch.empty(0, dtype=dt).element_size() for name, dt in _OUTPUT_DTYPES.items()}
SHM_REGION = "shared_memory_region"
SHM_OFFSET = "shared_memory_offset"
SHM_BYTE_SIZE = "shared_memory_byte_size"


class RegionViews(Protocol):
    """Where shared memory regions are looked up for one request (`router_service.shm.Lease`)."""

    def view(self, region: str, offset: int, byte_size: int, what: str) -> memoryview:
        """`byte_size` bytes from `offset` of `region`, writable, not copied; raises
        `InvalidRequest` (or `Unsupported` when the extension is off) naming `what`."""


@dataclass(frozen=True)
class ShmRef:
    """Where a tensor lies in shared memory: `byte_size` bytes from `offset` of `region`."""

    region: str
    offset: int
    byte_size: int


@dataclass(frozen=True)
class DecodedRequest:
    """hidden: `[T, H]` float32 (a view on shared memory when the input came that way);
    wire_dtype: the datatype to answer in; output_regions: where the outputs that go to shared
    memory are written, by name (already checked to fit); expert_skip_threshold: the request's
    parameter of that name, in [0, 1) (None: the model's setting)."""

    layer: int
    hidden: torch.Tensor
    wire_dtype: str
    outputs: tuple[str, ...]
    output_regions: dict[str, memoryview] = field(default_factory=dict)
    expert_skip_threshold: float | None = None


def decode_request(request: pb.ModelInferRequest, spec: ModelSpec,
                   regions: RegionViews | None = None) -> DecodedRequest:
    """`regions`: where shared memory tensors are found (None: a tensor in shared memory is
    refused as if no region were registered)."""
    if len(request.inputs) != 1 or request.inputs[0].name != INPUT_NAME:
        got = [i.name for i in request.inputs] or "no inputs"
        raise InvalidRequest(f"expected exactly one input named '{INPUT_NAME}', got {got}")
    if request.raw_input_contents and len(request.raw_input_contents) != 1:
        raise InvalidRequest(
            f"raw_input_contents has {len(request.raw_input_contents)} entries for 1 input"
        )
    tensor = request.inputs[0]
    what = f"input '{INPUT_NAME}'"
    ref = shm_ref(tensor.parameters, what)
    if ref is not None and (request.raw_input_contents or tensor.HasField("contents")):
        raise InvalidRequest(
            f"{what} is in shared memory region '{ref.region}'; leave raw_input_contents and contents empty"
        )
    raw = request.raw_input_contents[0] if request.raw_input_contents else None
    hidden = _decode_hidden(tensor, raw, spec, ref, regions)
    layer, outputs = _layer(request, spec), _requested_outputs(request)
    return DecodedRequest(
        layer=layer,
        hidden=hidden,
        wire_dtype=tensor.datatype,
        outputs=outputs,
        output_regions=_output_regions(request, spec, hidden.shape[0], tensor.datatype, regions),
        expert_skip_threshold=skip_threshold(request.parameters),
    )


def skip_threshold(parameters) -> float | None:
    """The request parameter `expert_skip_threshold` (`parameters`: the request's map of
    `InferParameter`): a number in [0, 1) as a double, an integer (0) or a decimal string; None
    when absent. InvalidRequest naming it otherwise."""
    if SKIP_PARAMETER not in parameters:
        return None
    param = parameters[SKIP_PARAMETER]
    kind = param.WhichOneof("parameter_choice")
    where = f"request parameter '{SKIP_PARAMETER}'"
    if kind in ("double_param", "int64_param", "uint64_param"):
        return check_threshold(float(getattr(param, kind)), where)
    if kind == "string_param":
        try:
            value = float(param.string_param)
        except ValueError:
            value = None
        if value is not None:
            return check_threshold(value, where)
    raise InvalidRequest(f"{where} must be a number in [0, 1) (double_param; 0: no expert skipping), got {_shown(param)}")


def shm_ref(parameters, what: str) -> ShmRef | None:
    """The shared memory parameters of a tensor (`parameters`: its map of `InferParameter`),
    or None when it names no region; `what` names the tensor in errors."""
    given = [name for name in (SHM_REGION, SHM_OFFSET, SHM_BYTE_SIZE) if name in parameters]
    if not given:
        return None
    if SHM_REGION not in parameters:
        raise InvalidRequest(f"{what} has parameter '{given[0]}' but no '{SHM_REGION}'; set both or neither")
    region = parameters[SHM_REGION]
    if region.WhichOneof("parameter_choice") != "string_param" or not region.string_param:
        raise InvalidRequest(f"{what}: parameter '{SHM_REGION}' must be a non-empty string (string_param), "
                             f"got {_shown(region)}")
    if SHM_BYTE_SIZE not in parameters:
        raise InvalidRequest(f"{what} names shared memory region '{region.string_param}' but not its size: "
                             f"set parameter '{SHM_BYTE_SIZE}'")
    offset = _count(parameters[SHM_OFFSET], SHM_OFFSET, what) if SHM_OFFSET in parameters else 0
    return ShmRef(region.string_param, offset, _count(parameters[SHM_BYTE_SIZE], SHM_BYTE_SIZE, what))


def _count(param: pb.InferParameter, name: str, what: str) -> int:
    kind = param.WhichOneof("parameter_choice")
    value = getattr(param, kind) if kind in ("int64_param", "uint64_param") else None
    if value is None or value < 0:
        raise InvalidRequest(f"{what}: parameter '{name}' must be an integer >= 0 (int64_param), got {_shown(param)}")
    return value


def _shown(param: pb.InferParameter) -> str:
    kind = param.WhichOneof("parameter_choice")
    return f"{kind} {getattr(param, kind)!r}" if kind else "an empty parameter"


def _output_regions(request: pb.ModelInferRequest, spec: ModelSpec, tokens: int, wire_dtype: str,
                    regions: RegionViews | None) -> dict[str, memoryview]:
    """The shared memory each requested output goes to, checked to hold it before any work."""
    found = {}
    for out in request.outputs:
        what = f"output '{out.name}'"
        ref = shm_ref(out.parameters, what)
        if ref is None:
            continue
        datatype, width = (wire_dtype, spec.hidden_size) if out.name == "hidden_states" else \
            ("INT32" if out.name == "topk_ids" else "FP32", spec.top_k)
        needed = tokens * width * _OUTPUT_ITEMSIZE[datatype]
        if ref.byte_size < needed:
            raise InvalidRequest(
                f"{what} is {datatype} [{tokens}, {width}]: {needed} bytes, but its {SHM_BYTE_SIZE} "
                f"is {ref.byte_size}; give it a region of at least {needed} bytes"
            )
        found[out.name] = _view(regions, ref, what)[:needed]
    return found


def _view(regions: RegionViews | None, ref: ShmRef, what: str) -> memoryview:
    if regions is None:
        raise InvalidRequest(f"{what} names shared memory region '{ref.region}', but no region is registered")
    return regions.view(ref.region, ref.offset, ref.byte_size, what)


def _decode_hidden(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None, spec: ModelSpec,
                   ref: ShmRef | None = None, regions: RegionViews | None = None) -> torch.Tensor:
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
    if ref is not None:
        hidden = _from_shared(ref, regions, tensor.datatype, count, shape)
    elif raw is not None:
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


def _from_shared(ref: ShmRef, regions: RegionViews | None, datatype: str, count: int, shape: list[int]) -> torch.Tensor:
    """The input as a view on its region (copied only when its address is not a multiple of its
    element size, which torch's kernels assume)."""
    expected = count * _ITEMSIZE[datatype]
    if ref.byte_size != expected:
        raise InvalidRequest(
            f"input '{INPUT_NAME}' {SHM_BYTE_SIZE} is {ref.byte_size}, but shape {shape} of {datatype} "
            f"needs {expected} bytes"
        )
    hidden = torch.frombuffer(_view(regions, ref, f"input '{INPUT_NAME}'"), dtype=WIRE_DTYPES[datatype])
    return hidden if hidden.data_ptr() % hidden.element_size() == 0 else hidden.clone()


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
    array = _wire_array(value, wire_dtype)
    tensor = pb.ModelInferResponse.InferOutputTensor(name=name, datatype=wire_dtype, shape=list(array.shape))
    return tensor, array.tobytes()


def write_tensor(name: str, value: torch.Tensor, wire_dtype: str,
                 target: memoryview) -> pb.ModelInferResponse.InferOutputTensor:
    """Write a torch tensor's little-endian bytes into `target` (its shared memory, exactly its
    size: `DecodedRequest.output_regions`); returns the output tensor description alone."""
    array = _wire_array(value, wire_dtype)
    if array.nbytes != target.nbytes:
        raise ValueError(f"output '{name}' has {array.nbytes} bytes, its shared memory {target.nbytes}")
    target[:] = array.reshape(-1).view(np.uint8)
    return pb.ModelInferResponse.InferOutputTensor(name=name, datatype=wire_dtype, shape=list(array.shape))


def _wire_array(value: torch.Tensor, wire_dtype: str) -> np.ndarray:
    """`value` in `wire_dtype`, C-contiguous, as numpy (BF16: the same 16 bits as int16)."""
    value = value.to(_OUTPUT_DTYPES[wire_dtype])
    if wire_dtype == "BF16":  # numpy has no bfloat16: ship the same 16 bits as int16
        value = value.view(torch.int16)
    return np.ascontiguousarray(value.numpy())
