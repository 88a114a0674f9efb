"""The system shared memory extension against a real deployment (`router.shared_memory: true`):
a layer request whose input and outputs go through registered POSIX shared memory gets the
same answer as through raw bytes (and as the reference layer); unregistering, the status and
every mistake as the contract says; the stock `tritonclient.utils.shared_memory` flow (in its
own venv, `tests/triton_shm_check.py`); and a server without the extension says how to turn it on.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from multiprocessing import shared_memory
from pathlib import Path

import grpc
import numpy as np
import pytest

from protos import grpc_predict_v2_pb2 as pb
from protos import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.integration.conftest import MAIN_RANDOM
from tests.integration.support import FP16_REL_TOL, FP32_REL_TOL, MARKS, Served, hidden_states, rel_err, serve_config
from tests.triton_env import ensure_triton_venv

pytestmark = MARKS

REPO_ROOT = Path(__file__).resolve().parents[2]
CHECK_SCRIPT = REPO_ROOT / "tests" / "triton_shm_check.py"
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def shm_server(deploy_served) -> Iterator[Served]:
    start, stop = deploy_served
    served = start(serve_config("it-shm", random=MAIN_RANDOM, workers=2, router={"shared_memory": True}))
    yield served
    stop(served)


@pytest.fixture(scope="module")
def stub(shm_server: Served) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(shm_server.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture
def objects(stub) -> Iterator:
    """`make(size)` -> a fresh shared memory object; unlinked, and every region unregistered, after."""
    made: list[shared_memory.SharedMemory] = []

    def make(size: int) -> shared_memory.SharedMemory:
        made.append(shared_memory.SharedMemory(create=True, size=size))
        return made[-1]

    yield make
    stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(), timeout=TIMEOUT_S)
    for obj in made:
        obj.close()
        obj.unlink()


def register(stub, name: str, obj: shared_memory.SharedMemory, byte_size: int, offset: int = 0) -> None:
    stub.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(
        name=name, key="/" + obj.name, offset=offset, byte_size=byte_size), timeout=TIMEOUT_S)


def in_region(tensor, region: str, byte_size: int, offset: int = 0) -> None:
    tensor.parameters["shared_memory_region"].string_param = region
    tensor.parameters["shared_memory_byte_size"].int64_param = byte_size
    if offset:
        tensor.parameters["shared_memory_offset"].int64_param = offset


def layer_request(served: Served, layer: int, shape: list[int], datatype: str = "FP32") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=served.name)
    request.parameters["layer"].int64_param = layer
    request.inputs.add(name="hidden_states", datatype=datatype, shape=shape)
    return request


def refused(stub, method: str, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        getattr(stub, method)(request, timeout=TIMEOUT_S)
    return info.value


def test_server_metadata_lists_the_extension(stub) -> None:
    assert list(stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=TIMEOUT_S).extensions) == [
        "system_shared_memory"]


def test_a_layer_request_through_shared_memory_equals_raw_bytes(shm_server: Served, stub, objects) -> None:
    served, layer = shm_server, shm_server.spec.moe_layers[-1]
    tokens, hidden, k = 37, served.spec.hidden_size, served.spec.top_k
    x = hidden_states(tokens, hidden, seed=5)
    obj_in, obj_out = objects(x.nbytes + 64), objects(x.nbytes + tokens * k * 4)
    obj_in.buf[64:64 + x.nbytes] = x.tobytes()
    register(stub, "in", obj_in, x.nbytes + 64)
    register(stub, "out", obj_out, x.nbytes + tokens * k * 4)
    request = layer_request(served, layer, [tokens, hidden])
    in_region(request.inputs[0], "in", x.nbytes, offset=64)
    in_region(request.outputs.add(name="hidden_states"), "out", x.nbytes)
    in_region(request.outputs.add(name="topk_ids"), "out", tokens * k * 4, offset=x.nbytes)
    request.outputs.add(name="topk_weights")

    response = stub.ModelInfer(request, timeout=TIMEOUT_S)
    raw = served.client.infer(served.name, x, layer=layer, topk=True, timeout_s=TIMEOUT_S)

    got = np.frombuffer(obj_out.buf, np.float32, tokens * hidden).reshape(tokens, hidden).copy()
    ids = np.frombuffer(obj_out.buf, np.int32, tokens * k, x.nbytes).reshape(tokens, k).copy()
    np.testing.assert_array_equal(got, raw.hidden_states)  # alone in a batch both times: the same sums
    np.testing.assert_array_equal(ids, raw.topk_ids)
    assert rel_err(got, served.expected(layer, x)[0]) < FP32_REL_TOL
    assert [len(b) for b in response.raw_output_contents] == [0, 0, tokens * k * 4]
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("hidden_states", "FP32", [tokens, hidden]), ("topk_ids", "INT32", [tokens, k]),
        ("topk_weights", "FP32", [tokens, k])]


def test_fp16_in_place_in_one_region(shm_server: Served, stub, objects) -> None:
    served, layer = shm_server, shm_server.spec.moe_layers[0]
    x = hidden_states(9, served.spec.hidden_size, seed=6)
    half = x.astype(np.float16)
    obj = objects(half.nbytes)
    obj.buf[:half.nbytes] = half.tobytes()
    register(stub, "io", obj, half.nbytes)
    request = layer_request(served, layer, list(x.shape), "FP16")
    in_region(request.inputs[0], "io", half.nbytes)
    in_region(request.outputs.add(name="hidden_states"), "io", half.nbytes)

    stub.ModelInfer(request, timeout=TIMEOUT_S)

    got = np.frombuffer(obj.buf, np.float16, x.size).reshape(x.shape).astype(np.float32)
    assert rel_err(got, served.expected(layer, half.astype(np.float32))[0]) < FP16_REL_TOL


def test_status_and_unregister(shm_server: Served, stub, objects) -> None:
    obj = objects(4096)
    register(stub, "a", obj, 1024)
    register(stub, "b", obj, 1024, offset=2048)

    listed = stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), timeout=TIMEOUT_S)
    one = stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(name="b"), timeout=TIMEOUT_S)
    stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="a"), timeout=TIMEOUT_S)
    left = stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), timeout=TIMEOUT_S)

    assert sorted(listed.regions) == ["a", "b"]
    b = one.regions["b"]
    assert (b.name, b.key, b.offset, b.byte_size) == ("b", "/" + obj.name, 2048, 1024)
    assert sorted(left.regions) == ["b"]


def test_a_request_naming_an_unregistered_region_is_refused(shm_server: Served, stub, objects) -> None:
    served = shm_server
    x = hidden_states(2, served.spec.hidden_size, seed=7)
    obj = objects(x.nbytes)
    obj.buf[:x.nbytes] = x.tobytes()
    register(stub, "gone", obj, x.nbytes)
    stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="gone"), timeout=TIMEOUT_S)
    request = layer_request(served, served.spec.moe_layers[0], list(x.shape))
    in_region(request.inputs[0], "gone", x.nbytes)
    calls = served.worker_calls()

    err = refused(stub, "ModelInfer", request)

    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == ("input 'hidden_states' names shared memory region 'gone', which is not registered; "
                             "no region is registered")
    assert served.worker_calls() == calls  # refused before any worker saw it


def test_mistakes_are_invalid_argument_naming_them(shm_server: Served, stub, objects) -> None:
    served, hidden = shm_server, shm_server.spec.hidden_size
    obj = objects(4096)
    register(stub, "r", obj, 4096)
    twice = refused(stub, "SystemSharedMemoryRegister", pb.SystemSharedMemoryRegisterRequest(
        name="r", key=obj.name, byte_size=16))
    no_object = refused(stub, "SystemSharedMemoryRegister", pb.SystemSharedMemoryRegisterRequest(
        name="s", key="/moe-serve-no-such-object", byte_size=16))
    too_big = refused(stub, "SystemSharedMemoryRegister", pb.SystemSharedMemoryRegisterRequest(
        name="s", key=obj.name, offset=4000, byte_size=200))
    wrong_size = layer_request(served, served.spec.moe_layers[0], [2, hidden])
    in_region(wrong_size.inputs[0], "r", 2 * hidden * 4 - 4)
    short_output = layer_request(served, served.spec.moe_layers[0], [2, hidden])
    wrong_size_err = refused(stub, "ModelInfer", wrong_size)
    short_output.raw_input_contents.append(hidden_states(2, hidden, seed=8).tobytes())
    in_region(short_output.outputs.add(name="hidden_states"), "r", 2 * hidden * 4 - 1)
    short_output_err = refused(stub, "ModelInfer", short_output)

    for err in (twice, no_object, too_big, wrong_size_err, short_output_err):
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert "shared memory region 'r' is already registered" in twice.details()
    assert "'s' (offset 4000 + byte_size 200 = 4200 bytes) goes beyond the object" in too_big.details()
    assert "no shared memory object has key '/moe-serve-no-such-object'" in no_object.details()
    assert f"shared_memory_byte_size is {2 * hidden * 4 - 4}, but shape [2, {hidden}] of FP32 needs" in \
        wrong_size_err.details()
    assert f"output 'hidden_states' is FP32 [2, {hidden}]: {2 * hidden * 4} bytes, but its shared_memory_byte_size " \
           f"is {2 * hidden * 4 - 1}" in short_output_err.details()


def test_without_the_extension_the_rpcs_say_how_to_turn_it_on(main_server: Served) -> None:
    with grpc.insecure_channel(main_server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        off = refused(stub, "SystemSharedMemoryRegister", pb.SystemSharedMemoryRegisterRequest(
            name="r", key="/x", byte_size=16))
        cuda = refused(stub, "CudaSharedMemoryStatus", pb.CudaSharedMemoryStatusRequest())
        extensions = stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=TIMEOUT_S).extensions

    assert off.code() == cuda.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "set router.shared_memory: true" in off.details()
    assert "this router has none" in cuda.details()
    assert list(extensions) == []


@pytest.fixture(scope="module")
def triton_python() -> Path:
    return ensure_triton_venv(REPO_ROOT)  # built once (needs PyPI), reused afterwards


def test_stock_tritonclient_shared_memory_gets_the_reference_answer(triton_python: Path, shm_server: Served,
                                                                    tmp_path: Path) -> None:
    served, layer = shm_server, shm_server.spec.moe_layers[-1]
    tokens, hidden, k = 300, served.spec.hidden_size, served.spec.top_k
    x = hidden_states(tokens, hidden, seed=9)
    np.save(tmp_path / "in.npy", x)

    done = subprocess.run(
        [str(triton_python), str(CHECK_SCRIPT), "--url", served.address, "--model", served.name,
         "--hidden", str(hidden), "--top-k", str(k), "--layer", str(layer),
         "--input", str(tmp_path / "in.npy"), "--output", str(tmp_path / "out.npy"), "--timeout-s", "60"],
        capture_output=True, text=True, timeout=180, check=False,
    )

    assert done.returncode == 0, f"triton_shm_check exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    report = json.loads(done.stdout.strip().splitlines()[-1])
    want, _, weights = served.expected(layer, x)
    assert rel_err(np.load(tmp_path / "out.npy"), want) < FP32_REL_TOL
    assert "system_shared_memory" in report["server_extensions"]
    assert len(report["registered"]) == 2 and report["registered_after_unregister"] == []
    assert report["outputs"] == [{"name": "hidden_states", "datatype": "FP32", "shape": [tokens, hidden]},
                                 {"name": "topk_ids", "datatype": "INT32", "shape": [tokens, k]},
                                 {"name": "topk_weights", "datatype": "FP32", "shape": [tokens, k]}]
    assert report["raw_output_bytes"] == [0, tokens * k * 4, 0]
    assert report["topk_weights_row_sums"] == pytest.approx(weights.sum(dim=1)[:4].tolist(), abs=1e-5)
    assert report["topk_ids_in_range"]
    assert report["after_unregister"].startswith("StatusCode.INVALID_ARGUMENT: input 'hidden_states' names shared "
                                                 "memory region"), report["after_unregister"]
