"""The checked-in gRPC stubs are fresh, and the KServe v2 service has the shape clients expect."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from protos import codegen
from protos import grpc_predict_v2_pb2 as pb

GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def _checked_in_stubs() -> set[str]:
    package_dir = codegen.REPO_ROOT / codegen.PROTO_PACKAGE
    return {p.name for p in package_dir.iterdir() if p.name.endswith(GENERATED_SUFFIXES)}


def _tools_versions() -> str:
    from importlib.metadata import version

    return f"grpcio-tools {version('grpcio-tools')}, protobuf {version('protobuf')}"


def test_checked_in_stubs_equal_fresh_codegen(tmp_path: Path) -> None:
    written = codegen.generate(codegen.REPO_ROOT, tmp_path)

    fresh_names = {p.name for p in written}
    assert _checked_in_stubs() == fresh_names, (
        "protos/ holds stubs that codegen does not produce (or lacks some); "
        "run `python -m protos.codegen` and delete stubs of removed .proto files"
    )
    for fresh in written:
        checked_in = codegen.REPO_ROOT / codegen.PROTO_PACKAGE / fresh.name
        assert checked_in.read_bytes() == fresh.read_bytes(), (
            f"{checked_in.name} differs from fresh codegen output ({_tools_versions()}); "
            "never edit stubs by hand: run `python -m protos.codegen` and commit the result"
        )


SHARED_MEMORY_RPCS = tuple(f"{kind}SharedMemory{verb}" for kind in ("System", "Cuda")
                           for verb in ("Status", "Register", "Unregister"))


def test_service_has_the_six_v2_rpcs_tritons_stream_and_shared_memory() -> None:
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]

    rpcs = {m.name: (m.input_type.full_name, m.output_type.full_name) for m in service.methods}

    expected = {
        name: (f"inference.{name}Request", f"inference.{name}Response")
        for name in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
                     *SHARED_MEMORY_RPCS)
    }
    expected["ModelStreamInfer"] = ("inference.ModelInferRequest", "inference.ModelStreamInferResponse")
    assert rpcs == expected
    assert service.full_name == "inference.GRPCInferenceService"
    streams = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert streams.pop("ModelStreamInfer") == (True, True)  # bidirectional, as Triton's grpc_service.proto
    assert not any(client or server for client, server in streams.values())


@pytest.mark.parametrize(
    ("message", "field", "number"),
    [
        pytest.param(pb.ModelInferRequest, "raw_input_contents", 7, id="raw-input"),
        pytest.param(pb.ModelInferResponse, "raw_output_contents", 6, id="raw-output"),
        pytest.param(pb.InferParameter, "double_param", 4, id="double-param"),
        pytest.param(pb.InferParameter, "uint64_param", 5, id="uint64-param"),
        pytest.param(pb.ModelMetadataResponse.TensorMetadata, "shape", 3, id="tensor-shape"),
        pytest.param(pb.ModelStreamInferResponse, "error_message", 1, id="stream-error-message"),
        pytest.param(pb.ModelStreamInferResponse, "infer_response", 2, id="stream-infer-response"),
    ],
)
def test_wire_numbers_match_upstream(message: type, field: str, number: int) -> None:
    assert message.DESCRIPTOR.fields_by_name[field].number == number


# Triton's grpc_service.proto (as tritonclient 2.73's service_pb2 holds it): message -> its fields
# (name, number, type); a map field shows as its entry message.
_STRING, _UINT64, _INT64, _BYTES = "string", "uint64", "int64", "bytes"
TRITON_SHARED_MEMORY_MESSAGES = {
    "SystemSharedMemoryStatusRequest": [("name", 1, _STRING)],
    "SystemSharedMemoryStatusResponse": [("regions", 1, "RegionsEntry")],
    "SystemSharedMemoryStatusResponse.RegionStatus": [("name", 1, _STRING), ("key", 2, _STRING),
                                                      ("offset", 3, _UINT64), ("byte_size", 4, _UINT64)],
    "SystemSharedMemoryRegisterRequest": [("name", 1, _STRING), ("key", 2, _STRING), ("offset", 3, _UINT64),
                                          ("byte_size", 4, _UINT64)],
    "SystemSharedMemoryRegisterResponse": [],
    "SystemSharedMemoryUnregisterRequest": [("name", 1, _STRING)],
    "SystemSharedMemoryUnregisterResponse": [],
    "CudaSharedMemoryStatusRequest": [("name", 1, _STRING)],
    "CudaSharedMemoryStatusResponse": [("regions", 1, "RegionsEntry")],
    "CudaSharedMemoryStatusResponse.RegionStatus": [("name", 1, _STRING), ("device_id", 2, _UINT64),
                                                    ("byte_size", 3, _UINT64)],
    "CudaSharedMemoryRegisterRequest": [("name", 1, _STRING), ("raw_handle", 2, _BYTES), ("device_id", 3, _INT64),
                                        ("byte_size", 4, _UINT64)],
    "CudaSharedMemoryRegisterResponse": [],
    "CudaSharedMemoryUnregisterRequest": [("name", 1, _STRING)],
    "CudaSharedMemoryUnregisterResponse": [],
}
_TYPE_NAMES = {9: _STRING, 4: _UINT64, 3: _INT64, 12: _BYTES}


@pytest.mark.parametrize("message", sorted(TRITON_SHARED_MEMORY_MESSAGES))
def test_shared_memory_messages_match_triton(message: str) -> None:
    outer, _, inner = message.partition(".")
    descriptor = pb.DESCRIPTOR.message_types_by_name[outer]
    if inner:
        descriptor = descriptor.nested_types_by_name[inner]

    fields = [(f.name, f.number, f.message_type.name if f.message_type else _TYPE_NAMES[f.type])
              for f in descriptor.fields]

    assert fields == TRITON_SHARED_MEMORY_MESSAGES[message]


def test_model_infer_request_roundtrip_with_raw_contents_and_layer() -> None:
    hidden_states = np.arange(12, dtype=np.float32).reshape(3, 4)
    request = pb.ModelInferRequest(model_name="moe", id="req-1")
    request.parameters["layer"].int64_param = 5
    request.inputs.add(name="hidden_states", datatype="FP32", shape=list(hidden_states.shape))
    request.outputs.add(name="hidden_states")
    request.outputs.add(name="topk_ids")
    request.raw_input_contents.append(hidden_states.tobytes())

    decoded = pb.ModelInferRequest.FromString(request.SerializeToString())

    assert decoded == request
    assert decoded.parameters["layer"].WhichOneof("parameter_choice") == "int64_param"
    assert decoded.parameters["layer"].int64_param == 5
    assert list(decoded.inputs[0].shape) == [3, 4]
    assert [o.name for o in decoded.outputs] == ["hidden_states", "topk_ids"]
    restored = np.frombuffer(decoded.raw_input_contents[0], dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(restored, hidden_states)


def test_infer_parameter_holds_one_value_kind() -> None:
    param = pb.InferParameter(int64_param=3)

    param.string_param = "three"

    assert param.WhichOneof("parameter_choice") == "string_param"
    assert param.int64_param == 0
