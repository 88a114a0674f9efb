"""The codec's shared memory paths: an input read as a view on its region in every wire
datatype, outputs written into theirs, and every bad set of shared memory parameters
INVALID_ARGUMENT naming the tensor and what is wrong. Regions are made with Python's
`multiprocessing.shared_memory` and registered with a real `SharedMemoryRegistry`."""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from multiprocessing import shared_memory

import grpc
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.model_spec import ModelSpec
from protos import grpc_predict_v2_pb2 as pb
from router_service.codec import decode_request, write_tensor
from router_service.errors import InvalidRequest
from router_service.servicer import status_code
from router_service.shm import Lease, SharedMemoryRegistry

pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable:UserWarning")

H, K = 4, 2
SPEC = ModelSpec(hidden_size=H, intermediate_size=6, num_experts=4, top_k=K, moe_layers=(0, 1), num_hidden_layers=2)
REGION_BYTES = mmap.ALLOCATIONGRANULARITY
WIRE = {"FP32": torch.float32, "FP16": torch.float16, "BF16": torch.bfloat16}


@pytest.fixture
def region() -> Iterator[tuple[shared_memory.SharedMemory, Lease]]:
    """An object registered whole as region 'r', and a lease to read it through."""
    shm = shared_memory.SharedMemory(create=True, size=REGION_BYTES)
    registry = SharedMemoryRegistry()
    registry.register("r", "/" + shm.name, 0, REGION_BYTES)
    lease = registry.lease()
    yield shm, lease
    lease.release()
    registry.close()
    shm.close()
    shm.unlink()


def wire_bytes(x: torch.Tensor, datatype: str) -> bytes:
    value = x.to(WIRE[datatype])
    return (value.view(torch.int16) if datatype == "BF16" else value).numpy().tobytes()


def put(shm: shared_memory.SharedMemory, offset: int, data: bytes) -> None:
    shm.buf[offset:offset + len(data)] = data


def params(tensor, **values) -> None:
    """`params(t, region="r", offset=0, byte_size=16)`: each as Triton's clients set it."""
    for key, value in values.items():
        param = tensor.parameters[f"shared_memory_{key}"]
        if isinstance(value, str):
            param.string_param = value
        elif isinstance(value, float):
            param.double_param = value
        else:
            param.int64_param = value


def shm_request(tokens: int = 3, datatype: str = "FP32", outputs: tuple[str, ...] = (), **input_params
                ) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="moe")
    request.parameters["layer"].int64_param = 0
    tensor = request.inputs.add(name="hidden_states", datatype=datatype, shape=[tokens, H])
    params(tensor, **input_params)
    for name in outputs:
        request.outputs.add(name=name)
    return request


def refused(request: pb.ModelInferRequest, lease: Lease | None) -> str:
    with pytest.raises(InvalidRequest) as info:
        decode_request(request, SPEC, lease)
    assert status_code(info.value) == grpc.StatusCode.INVALID_ARGUMENT
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# Good requests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("datatype", list(WIRE))
def test_an_input_in_shared_memory_decodes_like_raw_bytes(region, datatype: str) -> None:
    shm, lease = region
    x = torch.randn(3, H, generator=torch.Generator().manual_seed(1))
    data = wire_bytes(x, datatype)
    put(shm, 64, data)

    decoded = decode_request(shm_request(datatype=datatype, region="r", offset=64, byte_size=len(data)), SPEC, lease)

    torch.testing.assert_close(decoded.hidden, x.to(WIRE[datatype]).float(), rtol=0, atol=0)
    assert decoded.hidden.dtype == torch.float32 and decoded.wire_dtype == datatype


def test_an_fp32_input_is_a_view_on_the_region_not_a_copy(region) -> None:
    shm, lease = region
    put(shm, 0, np.ones(3 * H, np.float32).tobytes())

    decoded = decode_request(shm_request(region="r", byte_size=3 * H * 4), SPEC, lease)  # offset defaults to 0
    put(shm, 4, np.float32(9.0).tobytes())

    assert float(decoded.hidden[0, 1]) == 9.0


def test_an_input_at_an_odd_address_is_copied_aligned(region) -> None:
    shm, lease = region
    x = torch.randn(2, H, generator=torch.Generator().manual_seed(2))
    put(shm, 3, wire_bytes(x, "FP32"))

    decoded = decode_request(shm_request(tokens=2, region="r", offset=3, byte_size=2 * H * 4), SPEC, lease)

    torch.testing.assert_close(decoded.hidden, x, rtol=0, atol=0)
    assert decoded.hidden.data_ptr() % 4 == 0


def test_unsigned_offset_and_size_are_taken_too(region) -> None:
    shm, lease = region
    request = shm_request(tokens=1, region="r")
    request.inputs[0].parameters["shared_memory_offset"].uint64_param = 16
    request.inputs[0].parameters["shared_memory_byte_size"].uint64_param = H * 4
    put(shm, 16, np.arange(H, dtype=np.float32).tobytes())

    assert decode_request(request, SPEC, lease).hidden.tolist() == [[0.0, 1.0, 2.0, 3.0]]


@pytest.mark.parametrize(("name", "datatype", "itemsize", "width"), [
    pytest.param("hidden_states", "FP32", 4, H, id="hidden-fp32"),
    pytest.param("hidden_states", "BF16", 2, H, id="hidden-bf16"),
    pytest.param("topk_ids", "INT32", 4, K, id="topk-ids"),
    pytest.param("topk_weights", "FP32", 4, K, id="topk-weights"),
])
def test_output_regions_are_cut_to_the_outputs_size(region, name: str, datatype: str, itemsize: int,
                                                    width: int) -> None:
    _, lease = region
    wire = "BF16" if datatype == "BF16" else "FP32"
    request = pb.ModelInferRequest(model_name="moe")
    request.inputs.add(name="hidden_states", datatype=wire, shape=[3, H])
    request.raw_input_contents.append(wire_bytes(torch.ones(3, H), wire))
    params(request.outputs.add(name=name), region="r", offset=100, byte_size=1000)  # larger is fine
    request.parameters["layer"].int64_param = 0

    decoded = decode_request(request, SPEC, lease)

    assert decoded.output_regions[name].nbytes == 3 * width * itemsize


@pytest.mark.parametrize("datatype", list(WIRE))
def test_write_tensor_puts_the_wire_bytes_into_the_region(region, datatype: str) -> None:
    shm, lease = region
    value = torch.randn(3, H, generator=torch.Generator().manual_seed(3))
    nbytes = len(wire_bytes(value, datatype))

    tensor = write_tensor("hidden_states", value, datatype, lease.view("r", 32, nbytes, "output 'hidden_states'"))

    assert bytes(shm.buf[32:32 + nbytes]) == wire_bytes(value, datatype)
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("hidden_states", datatype, [3, H])
    assert not tensor.HasField("contents")


# ---------------------------------------------------------------------------------------------
# Bad shared memory parameters, each named
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("given", "message"), [
    pytest.param({"offset": 0}, "input 'hidden_states' has parameter 'shared_memory_offset' but no "
                 "'shared_memory_region'; set both or neither", id="offset-without-region"),
    pytest.param({"byte_size": 48}, "input 'hidden_states' has parameter 'shared_memory_byte_size' but no "
                 "'shared_memory_region'; set both or neither", id="size-without-region"),
    pytest.param({"region": "r"}, "input 'hidden_states' names shared memory region 'r' but not its size: "
                 "set parameter 'shared_memory_byte_size'", id="region-without-size"),
    pytest.param({"region": 3, "byte_size": 48}, "input 'hidden_states': parameter 'shared_memory_region' must be "
                 "a non-empty string (string_param), got int64_param 3", id="region-not-a-string"),
    pytest.param({"region": "", "byte_size": 48}, "input 'hidden_states': parameter 'shared_memory_region' must "
                 "be a non-empty string (string_param), got string_param ''", id="region-empty"),
    pytest.param({"region": "r", "byte_size": "48"}, "input 'hidden_states': parameter 'shared_memory_byte_size' "
                 "must be an integer >= 0 (int64_param), got string_param '48'", id="size-a-string"),
    pytest.param({"region": "r", "byte_size": -48}, "input 'hidden_states': parameter 'shared_memory_byte_size' "
                 "must be an integer >= 0 (int64_param), got int64_param -48", id="size-negative"),
    pytest.param({"region": "r", "byte_size": 48, "offset": 1.5}, "input 'hidden_states': parameter "
                 "'shared_memory_offset' must be an integer >= 0 (int64_param), got double_param 1.5",
                 id="offset-a-float"),
    pytest.param({"region": "r", "byte_size": 48, "offset": -1}, "input 'hidden_states': parameter "
                 "'shared_memory_offset' must be an integer >= 0 (int64_param), got int64_param -1",
                 id="offset-negative"),
])
def test_bad_input_parameters(region, given: dict, message: str) -> None:
    assert refused(shm_request(**given), region[1]) == message


@pytest.mark.parametrize(("datatype", "byte_size", "needed"), [
    pytest.param("FP32", 47, 48, id="fp32-short"),
    pytest.param("FP32", 49, 48, id="fp32-long"),
    pytest.param("FP16", 48, 24, id="fp16-sized-as-fp32"),
])
def test_input_byte_size_must_match_shape_and_datatype(region, datatype: str, byte_size: int, needed: int) -> None:
    message = refused(shm_request(datatype=datatype, region="r", byte_size=byte_size), region[1])

    assert message == (f"input 'hidden_states' shared_memory_byte_size is {byte_size}, but shape [3, {H}] of "
                       f"{datatype} needs {needed} bytes")


def test_input_in_shared_memory_and_raw_is_refused(region) -> None:
    request = shm_request(region="r", byte_size=48)
    request.raw_input_contents.append(b"\0" * 48)

    assert refused(request, region[1]) == ("input 'hidden_states' is in shared memory region 'r'; leave "
                                           "raw_input_contents and contents empty")


def test_input_in_shared_memory_and_typed_contents_is_refused(region) -> None:
    request = shm_request(region="r", byte_size=48)
    request.inputs[0].contents.fp32_contents.extend([0.0] * 12)

    assert "leave raw_input_contents and contents empty" in refused(request, region[1])


def test_an_unregistered_input_region_is_refused(region) -> None:
    message = refused(shm_request(region="gone", byte_size=48), region[1])

    assert message == ("input 'hidden_states' names shared memory region 'gone', which is not registered; "
                       "registered: 'r'")


def test_a_region_without_a_registry_is_refused() -> None:
    message = refused(shm_request(region="r", byte_size=48), None)

    assert message == "input 'hidden_states' names shared memory region 'r', but no region is registered"


def test_an_input_beyond_its_region_is_refused(region) -> None:
    message = refused(shm_request(region="r", offset=REGION_BYTES - 40, byte_size=48), region[1])

    assert message == (f"input 'hidden_states': shared_memory_offset {REGION_BYTES - 40} + shared_memory_byte_size "
                       f"48 = {REGION_BYTES + 8} bytes go beyond shared memory region 'r', which has "
                       f"{REGION_BYTES} bytes")


def _with_output(fixture, name: str, datatype: str = "FP32", **output_params) -> str:
    _, lease = fixture
    request = pb.ModelInferRequest(model_name="moe")
    request.parameters["layer"].int64_param = 0
    request.inputs.add(name="hidden_states", datatype=datatype, shape=[3, H])
    request.raw_input_contents.append(wire_bytes(torch.ones(3, H), datatype))
    params(request.outputs.add(name=name), **output_params)
    return refused(request, lease)


@pytest.mark.parametrize(("name", "datatype", "needed", "shown"), [
    pytest.param("hidden_states", "FP32", 48, f"FP32 [3, {H}]", id="hidden-fp32"),
    pytest.param("hidden_states", "FP16", 24, f"FP16 [3, {H}]", id="hidden-fp16"),
    pytest.param("topk_ids", "FP16", 24, f"INT32 [3, {K}]", id="topk-ids"),
])
def test_an_output_region_too_small_is_refused(region, name: str, datatype: str, needed: int, shown: str) -> None:
    message = _with_output(region, name, datatype, region="r", byte_size=needed - 1)

    assert message == (f"output '{name}' is {shown}: {needed} bytes, but its shared_memory_byte_size is "
                       f"{needed - 1}; give it a region of at least {needed} bytes")


def test_an_unregistered_output_region_is_refused(region) -> None:
    assert _with_output(region, "topk_ids", region="nope", byte_size=64) == (
        "output 'topk_ids' names shared memory region 'nope', which is not registered; registered: 'r'")


def test_an_output_beyond_its_region_is_refused(region) -> None:
    message = _with_output(region, "hidden_states", region="r", offset=REGION_BYTES, byte_size=48)

    assert message.startswith(f"output 'hidden_states': shared_memory_offset {REGION_BYTES} + "
                              f"shared_memory_byte_size 48")


def test_bad_output_parameters_name_the_output(region) -> None:
    assert _with_output(region, "topk_weights", offset=8) == (
        "output 'topk_weights' has parameter 'shared_memory_offset' but no 'shared_memory_region'; "
        "set both or neither")


# ---------------------------------------------------------------------------------------------
# Whatever the parameters: served or INVALID_ARGUMENT, never anything else
# ---------------------------------------------------------------------------------------------

_values = st.one_of(
    st.builds(lambda v: pb.InferParameter(int64_param=v),
              st.sampled_from([0, 1, 4, 47, 48, REGION_BYTES - 48, REGION_BYTES, -1, 2**63 - 1])),
    st.builds(lambda v: pb.InferParameter(uint64_param=v), st.sampled_from([0, 48, 2**64 - 1])),
    st.builds(lambda v: pb.InferParameter(string_param=v), st.sampled_from(["r", "", "other", "48"])),
    st.builds(lambda v: pb.InferParameter(double_param=v), st.floats()),
    st.just(pb.InferParameter()),
)
_shm_params = st.dictionaries(st.sampled_from(["region", "offset", "byte_size"]), _values, max_size=3)


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(input_params=_shm_params, output_params=_shm_params, output=st.sampled_from(["hidden_states", "topk_ids"]))
def test_any_shared_memory_parameters_are_served_or_invalid_argument(region, input_params: dict,
                                                                     output_params: dict, output: str) -> None:
    request = pb.ModelInferRequest(model_name="moe")
    request.parameters["layer"].int64_param = 0
    tensor = request.inputs.add(name="hidden_states", datatype="FP32", shape=[3, H])
    for key, value in input_params.items():
        tensor.parameters[f"shared_memory_{key}"].CopyFrom(value)
    if "region" not in input_params:
        request.raw_input_contents.append(wire_bytes(torch.ones(3, H), "FP32"))
    requested = request.outputs.add(name=output)
    for key, value in output_params.items():
        requested.parameters[f"shared_memory_{key}"].CopyFrom(value)

    try:
        decoded = decode_request(request, SPEC, region[1])
    except InvalidRequest as err:
        assert str(err)
        return
    assert decoded.hidden.shape == (3, H)
