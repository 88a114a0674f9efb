"""The system shared memory registry (`router_service.shm`) and the servicer's shared memory
RPCs: regions made with Python's `multiprocessing.shared_memory` (the POSIX objects
`tritonclient.utils.shared_memory` makes), mapped, viewed without copying, unmapped; every
mistake INVALID_ARGUMENT naming it; the extension off (and CUDA) UNIMPLEMENTED saying why."""

from __future__ import annotations

import asyncio
import mmap
import os
from collections.abc import Iterator
from multiprocessing import shared_memory

import grpc
import numpy as np
import pytest
import torch

from cluster.model_spec import ModelSpec
from protos import grpc_predict_v2_pb2 as pb
from router_service.batcher import RequestResult
from router_service.errors import InvalidRequest, Unsupported
from router_service.servicer import InferenceServicer, status_code
from router_service.shm import SHM_DIR, SharedMemoryOff, SharedMemoryRegistry, object_path
from tests.unit.grpc_context import Aborted, FakeContext

pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable:UserWarning")

PAGE = mmap.ALLOCATIONGRANULARITY


@pytest.fixture
def make_object() -> Iterator:
    """`make_object(size)` -> a fresh POSIX shared memory object (unlinked after the test)."""
    made: list[shared_memory.SharedMemory] = []

    def make(size: int = 4 * PAGE) -> shared_memory.SharedMemory:
        made.append(shared_memory.SharedMemory(create=True, size=size))
        return made[-1]

    yield make
    for shm in made:
        shm.close()
        try:
            shm.unlink()
        except FileNotFoundError:
            pass


@pytest.fixture
def registry() -> Iterator[SharedMemoryRegistry]:
    regs = SharedMemoryRegistry()
    yield regs
    regs.close()


def refused(call, *args) -> str:
    with pytest.raises(InvalidRequest) as info:
        call(*args)
    assert status_code(info.value) == grpc.StatusCode.INVALID_ARGUMENT
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# Registering, viewing, unregistering
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("slash", ["/", ""], ids=["key-with-slash", "key-without-slash"])
def test_a_view_is_the_objects_memory_not_a_copy(registry: SharedMemoryRegistry, make_object, slash: str) -> None:
    shm = make_object()
    registry.register("in", slash + shm.name, PAGE + 8, 64)  # not page aligned: the mapping starts below
    shm.buf[PAGE + 8 + 16:PAGE + 8 + 20] = np.float32(1.5).tobytes()

    with registry.lease() as lease:
        view = lease.view("in", 16, 8, "input 'x'")
        values = torch.frombuffer(view, dtype=torch.float32)
        assert values.tolist() == [1.5, 0.0]
        shm.buf[PAGE + 8 + 20:PAGE + 8 + 24] = np.float32(-2.0).tobytes()  # the client writes ...
        assert values.tolist() == [1.5, -2.0]  # ... and the view sees it
        view[0:4] = np.float32(7.0).tobytes()  # the server writes ...
        del values, view
    assert np.frombuffer(shm.buf, np.float32, 1, PAGE + 8 + 16)[0] == 7.0  # ... and the client sees it


def test_status_lists_regions_by_name(registry: SharedMemoryRegistry, make_object) -> None:
    a, b = make_object(), make_object()
    registry.register("b", "/" + b.name, 0, 128)
    registry.register("a", a.name, 64, 32)

    names = [s.name for s in registry.status()]
    one = registry.status("b")

    assert names == ["a", "b"]
    assert [(s.name, s.key, s.offset, s.byte_size) for s in one] == [("b", "/" + b.name, 0, 128)]


def test_unregister_one_then_all(registry: SharedMemoryRegistry, make_object) -> None:
    shm = make_object()
    for name in ("a", "b", "c"):
        registry.register(name, shm.name, 0, 16)

    assert registry.unregister("b") == ["b"]
    assert [s.name for s in registry.status()] == ["a", "c"]
    assert registry.unregister("") == ["a", "c"]
    assert registry.status() == []


def test_unregistering_an_unknown_name_does_nothing(registry: SharedMemoryRegistry) -> None:
    assert registry.unregister("never") == []  # as Triton: unregistering is idempotent


def test_a_name_is_free_again_after_unregistering(registry: SharedMemoryRegistry, make_object) -> None:
    shm = make_object()
    registry.register("r", shm.name, 0, 16)
    registry.unregister("r")

    registry.register("r", shm.name, 0, 32)

    assert registry.status("r")[0].byte_size == 32


def test_a_region_in_use_stays_mapped_until_its_request_is_done(registry: SharedMemoryRegistry, make_object) -> None:
    shm = make_object()
    registry.register("r", shm.name, 0, 16)
    lease = registry.lease()
    view = lease.view("r", 0, 16, "input 'x'")
    region = registry._regions["r"]

    registry.unregister("r")
    view[0:1] = b"\x05"  # still mapped: the request goes on

    assert registry.status() == []
    assert shm.buf[0] == 5
    del view
    lease.release()
    assert region._mapping is None  # unmapped once the request is done


def test_the_mapping_outlives_a_view_that_outlives_its_lease(registry: SharedMemoryRegistry, make_object) -> None:
    """A tensor still viewing an unregistered region (a batch not yet freed) keeps the mapping
    alive, and the close does not fail; the mapping goes with the last view."""
    shm = make_object()
    registry.register("r", shm.name, 0, 16)
    with registry.lease() as lease:
        kept = torch.frombuffer(lease.view("r", 0, 16, "input 'x'"), dtype=torch.uint8)
        registry.unregister("r")
    shm.buf[3] = 9

    assert int(kept[3]) == 9


def test_close_unmaps_every_region(make_object) -> None:
    registry = SharedMemoryRegistry()
    shm = make_object()
    registry.register("a", shm.name, 0, 16)
    region = registry._regions["a"]

    registry.close()

    assert registry.status() == [] and region._mapping is None


# ---------------------------------------------------------------------------------------------
# Registering: every mistake named
# ---------------------------------------------------------------------------------------------


def test_the_same_name_twice_is_refused(registry: SharedMemoryRegistry, make_object) -> None:
    shm = make_object()
    registry.register("r", shm.name, 0, 16)

    message = refused(registry.register, "r", shm.name, 0, 32)

    assert message == (f"shared memory region 'r' is already registered (key {shm.name!r}, offset 0, 16 bytes); "
                       f"unregister it first or use another name")
    assert registry.status("r")[0].byte_size == 16  # the first one stays


def test_an_empty_name_is_refused(registry: SharedMemoryRegistry, make_object) -> None:
    assert "needs a name" in refused(registry.register, "", make_object().name, 0, 16)


def test_an_unknown_key_is_refused(registry: SharedMemoryRegistry) -> None:
    message = refused(registry.register, "r", "/moe-serve-no-such-object", 0, 16)

    assert message.startswith("cannot register shared memory region 'r': no shared memory object has key "
                              "'/moe-serve-no-such-object' (/dev/shm/moe-serve-no-such-object does not exist)")


@pytest.mark.parametrize("key", [
    pytest.param("", id="empty"),
    pytest.param("///", id="only-slashes"),
    pytest.param("/a/b", id="a-path"),
    pytest.param("/..", id="parent"),
    pytest.param("x" * 256, id="too-long"),
    pytest.param("a\0b", id="nul"),
])
def test_a_key_that_is_no_object_name_is_refused(registry: SharedMemoryRegistry, key: str) -> None:
    assert f"shared memory key {key!r} is not a POSIX shared memory object name" in refused(
        registry.register, "r", key, 0, 16)


@pytest.mark.parametrize(("offset", "byte_size"), [
    pytest.param(0, 4 * PAGE + 1, id="size-beyond"),
    pytest.param(4 * PAGE, 1, id="offset-at-end"),
    pytest.param(3 * PAGE, PAGE + 1, id="offset-plus-size-beyond"),
])
def test_a_region_beyond_its_object_is_refused(registry: SharedMemoryRegistry, make_object,
                                               offset: int, byte_size: int) -> None:
    shm = make_object(4 * PAGE)

    message = refused(registry.register, "r", shm.name, offset, byte_size)

    assert message == (f"shared memory region 'r' (offset {offset} + byte_size {byte_size} = {offset + byte_size} "
                       f"bytes) goes beyond the object {shm.name!r} ({SHM_DIR / shm.name}), which has "
                       f"{4 * PAGE} bytes")


def test_a_zero_byte_region_is_refused(registry: SharedMemoryRegistry, make_object) -> None:
    assert "has byte_size 0; it must be at least 1" in refused(registry.register, "r", make_object().name, 0, 0)


def test_a_directory_is_refused(tmp_path) -> None:
    (tmp_path / "dir").mkdir()
    registry = SharedMemoryRegistry(shm_dir=tmp_path)

    assert "cannot open" in refused(registry.register, "r", "dir", 0, 16)


def test_a_symbolic_link_is_refused(tmp_path) -> None:
    (tmp_path / "real").write_bytes(b"\0" * 64)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    registry = SharedMemoryRegistry(shm_dir=tmp_path)

    assert "cannot open" in refused(registry.register, "r", "link", 0, 16)
    registry.register("r", "real", 0, 16)  # the object itself is fine
    registry.close()


def test_a_fifo_is_refused(tmp_path) -> None:
    os.mkfifo(tmp_path / "pipe")
    registry = SharedMemoryRegistry(shm_dir=tmp_path)

    assert "is not a shared memory object" in refused(registry.register, "r", "pipe", 0, 16)


def test_regions_beyond_the_limit_are_refused(make_object) -> None:
    registry = SharedMemoryRegistry(max_regions=2)
    shm = make_object()
    registry.register("a", shm.name, 0, 8)
    registry.register("b", shm.name, 0, 8)

    assert "2 shared memory regions are registered, the most this router maps" in refused(
        registry.register, "c", shm.name, 0, 8)
    registry.close()


def test_object_path_strips_leading_slashes() -> None:
    assert object_path(SHM_DIR, "//input0") == SHM_DIR / "input0"


# ---------------------------------------------------------------------------------------------
# Using a region: every mistake named
# ---------------------------------------------------------------------------------------------


def test_an_unknown_region_is_refused_listing_the_registered(registry: SharedMemoryRegistry, make_object) -> None:
    registry.register("known", make_object().name, 0, 16)

    with registry.lease() as lease:
        message = refused(lease.view, "nope", 0, 4, "input 'hidden_states'")

    assert message == ("input 'hidden_states' names shared memory region 'nope', which is not registered; "
                       "registered: 'known'")


@pytest.mark.parametrize(("offset", "byte_size"), [
    pytest.param(16, 1, id="offset-at-end"),
    pytest.param(100, 4, id="offset-beyond"),
    pytest.param(8, 9, id="offset-plus-size-beyond"),
])
def test_a_view_beyond_its_region_is_refused(registry: SharedMemoryRegistry, make_object,
                                             offset: int, byte_size: int) -> None:
    registry.register("r", make_object().name, 0, 16)

    with registry.lease() as lease:
        message = refused(lease.view, "r", offset, byte_size, "output 'topk_ids'")

    assert message == (f"output 'topk_ids': shared_memory_offset {offset} + shared_memory_byte_size {byte_size} = "
                       f"{offset + byte_size} bytes go beyond shared memory region 'r', which has 16 bytes")


def test_an_object_that_shrank_since_registration_is_refused(registry: SharedMemoryRegistry, make_object) -> None:
    shm = make_object(2 * PAGE)
    registry.register("r", shm.name, PAGE, PAGE)
    os.truncate(SHM_DIR / shm.name, PAGE)  # reading the mapping now would be SIGBUS

    with registry.lease() as lease:
        message = refused(lease.view, "r", 0, 4, "input 'hidden_states'")

    assert f"has shrunk to {PAGE} bytes since it was registered (the region needs {2 * PAGE})" in message


def test_status_of_an_unknown_region_is_refused(registry: SharedMemoryRegistry) -> None:
    assert refused(registry.status, "nope") == (
        "shared memory region 'nope' is not registered; no region is registered")


# ---------------------------------------------------------------------------------------------
# Off
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call", [
    pytest.param(lambda off: off.register("r", "k", 0, 1), id="register"),
    pytest.param(lambda off: off.status(""), id="status"),
    pytest.param(lambda off: off.unregister(""), id="unregister"),
    pytest.param(lambda off: off.lease().view("r", 0, 1, "input 'hidden_states'"), id="use"),
])
def test_off_says_how_to_turn_it_on(call) -> None:
    with pytest.raises(Unsupported) as info:
        call(SharedMemoryOff())

    assert status_code(info.value) == grpc.StatusCode.UNIMPLEMENTED
    assert "set router.shared_memory: true" in str(info.value)


# ---------------------------------------------------------------------------------------------
# The servicer's RPCs, and a layer request through shared memory
# ---------------------------------------------------------------------------------------------

H, K = 4, 2
SPEC = ModelSpec(hidden_size=H, intermediate_size=6, num_experts=4, top_k=K, moe_layers=(0,), num_hidden_layers=1)


class FakeModel:
    """A ready model whose layer doubles the hidden states; it keeps the input it was given."""

    name, spec, ready, reports_ready, text = "moe", SPEC, True, True, None

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    async def infer(self, layer: int, hidden: torch.Tensor, expert_skip_threshold: float | None = None) -> RequestResult:
        self.seen.append(hidden)
        tokens = hidden.shape[0]
        ids = torch.arange(tokens * K).reshape(tokens, K) % SPEC.num_experts
        weights = torch.full((tokens, K), 0.5)
        return RequestResult(hidden * 2, ids, weights, placement_version=3, batch_tokens=tokens, queued_s=0.0)


def call(servicer: InferenceServicer, method: str, request):
    return asyncio.run(getattr(servicer, method)(request, FakeContext()))


def aborted(servicer: InferenceServicer, method: str, request) -> Aborted:
    with pytest.raises(Aborted) as info:
        call(servicer, method, request)
    return info.value


def test_rpcs_register_list_and_unregister(registry: SharedMemoryRegistry, make_object) -> None:
    servicer = InferenceServicer({}, shared_memory=registry)
    shm = make_object()

    call(servicer, "SystemSharedMemoryRegister",
         pb.SystemSharedMemoryRegisterRequest(name="in", key="/" + shm.name, offset=8, byte_size=256))
    listed = call(servicer, "SystemSharedMemoryStatus", pb.SystemSharedMemoryStatusRequest())
    call(servicer, "SystemSharedMemoryUnregister", pb.SystemSharedMemoryUnregisterRequest(name="in"))
    after = call(servicer, "SystemSharedMemoryStatus", pb.SystemSharedMemoryStatusRequest())

    region = listed.regions["in"]
    assert (region.name, region.key, region.offset, region.byte_size) == ("in", "/" + shm.name, 8, 256)
    assert dict(after.regions) == {}


def test_rpc_mistakes_are_invalid_argument(registry: SharedMemoryRegistry) -> None:
    servicer = InferenceServicer({}, shared_memory=registry)

    bad_key = aborted(servicer, "SystemSharedMemoryRegister",
                      pb.SystemSharedMemoryRegisterRequest(name="r", key="/moe-serve-none", byte_size=4))
    unknown = aborted(servicer, "SystemSharedMemoryStatus", pb.SystemSharedMemoryStatusRequest(name="r"))

    assert bad_key.code == unknown.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "no shared memory object has key '/moe-serve-none'" in bad_key.details
    assert "'r' is not registered" in unknown.details


@pytest.mark.parametrize(("method", "request_type"), [
    ("SystemSharedMemoryRegister", pb.SystemSharedMemoryRegisterRequest),
    ("SystemSharedMemoryStatus", pb.SystemSharedMemoryStatusRequest),
    ("SystemSharedMemoryUnregister", pb.SystemSharedMemoryUnregisterRequest),
])
def test_rpcs_off_are_unimplemented_saying_how_to_turn_it_on(method: str, request_type) -> None:
    err = aborted(InferenceServicer({}), method, request_type(name="r"))

    assert err.code == grpc.StatusCode.UNIMPLEMENTED
    assert "router.shared_memory: true" in err.details


@pytest.mark.parametrize(("method", "request_type"), [
    ("CudaSharedMemoryRegister", pb.CudaSharedMemoryRegisterRequest),
    ("CudaSharedMemoryStatus", pb.CudaSharedMemoryStatusRequest),
    ("CudaSharedMemoryUnregister", pb.CudaSharedMemoryUnregisterRequest),
])
@pytest.mark.parametrize("has_gpu", [False, True], ids=["no-gpu", "gpu"])
def test_cuda_rpcs_are_unimplemented_saying_why(registry: SharedMemoryRegistry, method: str, request_type,
                                                has_gpu: bool) -> None:
    err = aborted(InferenceServicer({}, shared_memory=registry, router_has_gpu=has_gpu), method, request_type())

    assert err.code == grpc.StatusCode.UNIMPLEMENTED
    if has_gpu:
        assert "does not implement the CUDA shared memory extension" in err.details
    else:
        assert "this router has none" in err.details


def test_server_metadata_lists_the_extension_only_when_on(registry: SharedMemoryRegistry) -> None:
    on = call(InferenceServicer({}, shared_memory=registry), "ServerMetadata", pb.ServerMetadataRequest())
    off = call(InferenceServicer({}), "ServerMetadata", pb.ServerMetadataRequest())

    assert list(on.extensions) == ["system_shared_memory"]
    assert list(off.extensions) == []


def _shm_params(tensor, region: str, offset: int, byte_size: int) -> None:
    tensor.parameters["shared_memory_region"].string_param = region
    tensor.parameters["shared_memory_offset"].int64_param = offset
    tensor.parameters["shared_memory_byte_size"].int64_param = byte_size


def test_a_layer_request_in_place_through_shared_memory(registry: SharedMemoryRegistry, make_object) -> None:
    """Input and output in one region, the same bytes (as a client that reuses its buffer):
    the model saw a view on the region, the output is written there, topk_ids comes raw, and
    the raw entries stay one per output (the shared memory one empty)."""
    shm = make_object()
    x = np.arange(3 * H, dtype=np.float32).reshape(3, H)
    shm.buf[:x.nbytes] = x.tobytes()
    registry.register("io", shm.name, 0, PAGE)
    model = FakeModel()
    request = pb.ModelInferRequest(model_name="moe", id="r1")
    _shm_params(request.inputs.add(name="hidden_states", datatype="FP32", shape=[3, H]), "io", 0, x.nbytes)
    _shm_params(request.outputs.add(name="hidden_states"), "io", 0, x.nbytes)
    request.outputs.add(name="topk_ids")

    response = call(InferenceServicer({"moe": model}, shared_memory=registry), "ModelInfer", request)

    np.testing.assert_array_equal(np.frombuffer(shm.buf, np.float32, x.size).reshape(3, H), 2 * x)
    assert torch.equal(model.seen[0], torch.from_numpy(2 * x))  # the model's input was the region itself
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("hidden_states", "FP32", [3, H]), ("topk_ids", "INT32", [3, K])]
    assert response.raw_output_contents[0] == b""
    assert np.frombuffer(response.raw_output_contents[1], np.int32).reshape(3, K).tolist() == [[0, 1], [2, 3], [0, 1]]


def test_the_models_input_is_a_view_on_the_region(registry: SharedMemoryRegistry, make_object) -> None:
    shm = make_object()
    registry.register("in", shm.name, 0, PAGE)
    model = FakeModel()
    request = pb.ModelInferRequest(model_name="moe")
    _shm_params(request.inputs.add(name="hidden_states", datatype="FP32", shape=[2, H]), "in", 64, 2 * H * 4)
    shm.buf[64:64 + 2 * H * 4] = np.ones(2 * H, np.float32).tobytes()

    call(InferenceServicer({"moe": model}, shared_memory=registry), "ModelInfer", request)

    shm.buf[64:68] = np.float32(42.0).tobytes()  # what the model was given changes with the region
    assert float(model.seen[0][0, 0]) == 42.0


def test_an_output_region_too_small_is_refused_before_any_work(registry: SharedMemoryRegistry, make_object) -> None:
    registry.register("out", make_object().name, 0, PAGE)
    model = FakeModel()
    request = pb.ModelInferRequest(model_name="moe")
    request.inputs.add(name="hidden_states", datatype="FP32", shape=[2, H])
    request.raw_input_contents.append(np.ones((2, H), np.float32).tobytes())
    _shm_params(request.outputs.add(name="topk_weights"), "out", 0, 15)

    err = aborted(InferenceServicer({"moe": model}, shared_memory=registry), "ModelInfer", request)

    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details == ("output 'topk_weights' is FP32 [2, 2]: 16 bytes, but its shared_memory_byte_size is 15; "
                           "give it a region of at least 16 bytes")
    assert model.seen == []


def test_a_layer_request_naming_a_region_while_off_is_unimplemented(make_object) -> None:
    request = pb.ModelInferRequest(model_name="moe")
    _shm_params(request.inputs.add(name="hidden_states", datatype="FP32", shape=[1, H]), "in", 0, H * 4)

    err = aborted(InferenceServicer({"moe": FakeModel()}), "ModelInfer", request)

    assert err.code == grpc.StatusCode.UNIMPLEMENTED
    assert err.details.startswith("input 'hidden_states' names shared memory region 'in', but the system shared "
                                  "memory extension is off on this server")
