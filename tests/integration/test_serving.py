"""The served MoE layer equals the single-process reference, over 2 and 3 workers, every layer,
one to hundreds of tokens, batched or not, in every wire datatype."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import torch

from protos import grpc_predict_v2_pb2 as pb
from protos import grpc_predict_v2_pb2_grpc as pb_grpc
from router_service.client import build_request, parse_response
from tests.integration.support import (
    BF16_REL_TOL,
    FP16_REL_TOL,
    FP32_REL_TOL,
    MARKS,
    Served,
    from_bf16_bits,
    hidden_states,
    rel_err,
    serve_config,
    to_bf16_bits,
)

pytestmark = MARKS

# 3 MoE layers x 6 experts over 3 workers (6 slots each). Batches wait up to 100 ms and only one
# is in the workers at a time, so concurrent requests for one layer share batches; batches close
# at 256 tokens, so a 300-token request goes alone and smaller ones fill several batches.
THREE_RANDOM = {"layers": 3, "experts": 6, "hidden": 64, "ffn": 96, "top_k": 2, "seed": 5}
THREE_ROUTER = {"max_wait_ms": 100.0, "max_inflight_batches": 1, "max_batch_tokens": 256}
TOKEN_COUNTS = (1, 7, 300)


@pytest.fixture(scope="module")
def three_server(deploy_served) -> Iterator[Served]:
    start, stop = deploy_served
    served = start(serve_config("it-three", random=THREE_RANDOM, workers=3, router=THREE_ROUTER))
    yield served
    stop(served)


@pytest.fixture(params=["main_server", "three_server"], ids=["2-workers", "3-workers"])
def served(request) -> Served:
    return request.getfixturevalue(request.param)


@pytest.fixture
def stub(served: Served) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(served.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _assert_routing_equal(got_ids: np.ndarray, got_weights: np.ndarray, want_ids: torch.Tensor,
                          want_weights: torch.Tensor) -> None:
    assert got_ids.dtype == np.int32
    assert got_weights.dtype == np.float32
    np.testing.assert_array_equal(got_ids, want_ids.numpy().astype(np.int32))
    np.testing.assert_allclose(got_weights, want_weights.numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("tokens", TOKEN_COUNTS)
def test_every_layer_equals_reference(served: Served, tokens: int) -> None:
    for layer in served.spec.moe_layers:
        x = hidden_states(tokens, served.spec.hidden_size, seed=100 * layer + tokens)
        got = served.client.infer(served.name, x, layer=layer, topk=True, timeout_s=60)
        want, want_ids, want_weights = served.expected(layer, x)

        assert got.hidden_states.dtype == np.float32
        err = rel_err(got.hidden_states, want)
        assert err < FP32_REL_TOL, f"layer {layer}, {tokens} tokens: relative error {err:.2e}"
        assert got.topk_ids.shape == (tokens, served.spec.top_k)
        _assert_routing_equal(got.topk_ids, got.topk_weights, want_ids, want_weights)
        assert got.placement_version == served.deployment.placement.version


def test_layers_differ(served: Served) -> None:
    """Guards the test above: a server that ignored `layer` would answer the same for every layer."""
    x = hidden_states(7, served.spec.hidden_size, seed=3)
    outputs = [served.client.infer(served.name, x, layer=layer).hidden_states for layer in served.spec.moe_layers]
    for a, b in zip(outputs, outputs[1:]):
        assert rel_err(a, b) > 1e-2


def _infer_concurrently(served: Served, jobs: list[tuple[int, np.ndarray]]) -> list:
    """Send every (layer, x) from its own thread, released together; returns results in order."""
    results: list = [None] * len(jobs)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(jobs))

    def one(i: int) -> None:
        layer, x = jobs[i]
        try:
            barrier.wait(timeout=30)
            results[i] = served.client.infer(served.name, x, layer=layer, topk=True, timeout_s=60)
        except BaseException as err:  # reported in the main thread below
            errors.append(err)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert not any(t.is_alive() for t in threads), "a request thread is still running after 90 s"
    assert not errors, f"{len(errors)} concurrent requests failed, first: {errors[0]!r}"
    return results


CONCURRENT_SIZES = (1, 300, 7, 2, 129, 5, 64, 31)


def test_concurrent_requests_of_different_sizes_are_each_answered_right(served: Served) -> None:
    layers = served.spec.moe_layers
    jobs = [
        (layers[i % len(layers)], hidden_states(n, served.spec.hidden_size, seed=1000 + i))
        for i, n in enumerate(CONCURRENT_SIZES)
    ]
    results = _infer_concurrently(served, jobs)
    for (layer, x), got in zip(jobs, results):
        want, want_ids, want_weights = served.expected(layer, x)
        err = rel_err(got.hidden_states, want)
        assert err < FP32_REL_TOL, f"layer {layer}, {x.shape[0]} tokens: relative error {err:.2e}"
        _assert_routing_equal(got.topk_ids, got.topk_weights, want_ids, want_weights)


def test_concurrent_requests_for_one_layer_share_batches(three_server: Served) -> None:
    """8 requests for one layer at once: fewer batches than requests reach the workers, and each
    request still gets exactly its own rows back."""
    served = three_server
    layer = served.spec.moe_layers[1]
    jobs = [(layer, hidden_states(n, served.spec.hidden_size, seed=2000 + i)) for i, n in enumerate(CONCURRENT_SIZES)]
    batches_before = served.deployment.router.batches_served

    results = _infer_concurrently(served, jobs)

    batches = served.deployment.router.batches_served - batches_before
    assert 1 <= batches < len(jobs), f"{len(jobs)} concurrent requests went out in {batches} batches"
    for (_, x), got in zip(jobs, results):
        want, want_ids, want_weights = served.expected(layer, x)
        assert got.hidden_states.shape == x.shape
        err = rel_err(got.hidden_states, want)
        assert err < FP32_REL_TOL, f"{x.shape[0]} tokens: relative error {err:.2e}"
        _assert_routing_equal(got.topk_ids, got.topk_weights, want_ids, want_weights)


def test_fp16_input_is_answered_in_fp16(served: Served) -> None:
    layer = served.spec.moe_layers[-1]
    x16 = hidden_states(33, served.spec.hidden_size, seed=7).astype(np.float16)

    got = served.client.infer(served.name, x16, layer=layer, topk=True, timeout_s=60)

    assert got.hidden_states.dtype == np.float16
    want, want_ids, want_weights = served.expected(layer, x16.astype(np.float32))
    err = rel_err(got.hidden_states.astype(np.float32), want)
    assert err < FP16_REL_TOL, f"FP16 answer: relative error {err:.2e}"
    _assert_routing_equal(got.topk_ids, got.topk_weights, want_ids, want_weights)


def test_bf16_input_is_answered_in_bf16(served: Served) -> None:
    layer = served.spec.moe_layers[0]
    bits = to_bf16_bits(hidden_states(33, served.spec.hidden_size, seed=8))

    got = served.client.infer(served.name, bits, layer=layer, topk=True, timeout_s=60, datatype="BF16")

    assert got.hidden_states.dtype == np.uint16  # BF16 bit patterns
    upcast = from_bf16_bits(bits).numpy()
    want, want_ids, want_weights = served.expected(layer, upcast)
    err = rel_err(from_bf16_bits(got.hidden_states), want)
    assert err < BF16_REL_TOL, f"BF16 answer: relative error {err:.2e}"
    _assert_routing_equal(got.topk_ids, got.topk_weights, want_ids, want_weights)


def test_typed_fp32_contents_input(served: Served, stub) -> None:
    layer = served.spec.moe_layers[-1]
    x = hidden_states(7, served.spec.hidden_size, seed=9)
    request = pb.ModelInferRequest(model_name=served.name)
    tensor = request.inputs.add(name="hidden_states", datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    request.parameters["layer"].int64_param = layer

    got = parse_response(stub.ModelInfer(request, timeout=60))

    want, _, _ = served.expected(layer, x)
    assert rel_err(got.hidden_states, want) < FP32_REL_TOL


@pytest.mark.parametrize("kind", ["int64_param", "uint64_param", "string_param"])
def test_layer_parameter_kinds(main_server: Served, kind: str) -> None:
    served = main_server
    layer = served.spec.moe_layers[1]
    x = hidden_states(5, served.spec.hidden_size, seed=10)
    request = build_request(served.name, x, layer=None)
    setattr(request.parameters["layer"], kind, str(layer) if kind == "string_param" else layer)
    with grpc.insecure_channel(served.address) as channel:
        got = parse_response(pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60))
    want, _, _ = served.expected(layer, x)
    assert rel_err(got.hidden_states, want) < FP32_REL_TOL


def test_response_carries_request_id_and_only_requested_outputs(main_server: Served) -> None:
    served = main_server
    x = hidden_states(4, served.spec.hidden_size, seed=12)
    request = build_request(served.name, x, layer=0)
    request.id = "request-42"
    del request.outputs[:]
    request.outputs.add(name="topk_weights")
    request.outputs.add(name="topk_ids")
    with grpc.insecure_channel(served.address) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)

    assert response.id == "request-42"
    assert response.model_name == served.name
    assert response.model_version == "1"
    assert [o.name for o in response.outputs] == ["topk_weights", "topk_ids"]
    assert [o.datatype for o in response.outputs] == ["FP32", "INT32"]
    assert [list(o.shape) for o in response.outputs] == [[4, served.spec.top_k]] * 2
    assert len(response.raw_output_contents) == 2
    _, want_ids, want_weights = served.expected(0, x)
    got_weights = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(4, -1)
    got_ids = np.frombuffer(response.raw_output_contents[1], dtype="<i4").reshape(4, -1)
    _assert_routing_equal(got_ids, got_weights, want_ids, want_weights)
