"""Deadlines and cancellation: the caller gets its status, the server keeps serving right."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from protos import grpc_predict_v2_pb2_grpc as pb_grpc
from router_service.client import build_request, parse_response
from tests.integration.support import FP32_REL_TOL, MARKS, Served, health_status, hidden_states, rel_err

pytestmark = MARKS


@pytest.fixture
def channel(main_server: Served) -> Iterator[grpc.Channel]:
    limit = 64 * 2**20
    options = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
    with grpc.insecure_channel(main_server.address, options=options) as channel:
        yield channel


def _assert_healthy_and_right(served: Served, channel: grpc.Channel) -> None:
    assert health_status(channel) == "SERVING"
    for layer in served.spec.moe_layers:
        for tokens in (1, 300):
            served.assert_serves_correctly(layer, hidden_states(tokens, served.spec.hidden_size, seed=tokens + layer))


@pytest.mark.parametrize(
    ("tokens", "timeout_s"),
    [
        pytest.param(16384, 0.001, id="expires-before-the-server-answers"),
        # ~1 s of work on a 2-core CPU: the deadline passes once the request is in the server
        pytest.param(65536, 0.1, id="expires-while-in-the-workers"),
    ],
)
def test_deadline_exceeded_then_server_keeps_serving(main_server: Served, channel, tokens: int,
                                                     timeout_s: float) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    request = build_request(main_server.name, hidden_states(tokens, main_server.spec.hidden_size, seed=1), layer=0)

    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, timeout=timeout_s)

    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, caught.value.details()
    _assert_healthy_and_right(main_server, channel)


def test_cancelled_requests_leave_the_server_healthy(main_server: Served, channel) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    inputs = [hidden_states(16384, main_server.spec.hidden_size, seed=50 + i) for i in range(4)]
    futures = [stub.ModelInfer.future(build_request(main_server.name, x, layer=1), timeout=120) for x in inputs]

    assert futures[0].cancel(), "a request just sent could not be cancelled"
    first_done = parse_response(futures[1].result(timeout=120))  # the others are queued or in the workers
    for future in futures[2:]:
        future.cancel()

    assert futures[0].cancelled()
    want, _, _ = main_server.expected(1, inputs[1])
    assert rel_err(first_done.hidden_states, want) < FP32_REL_TOL
    for x, future in zip(inputs[2:], futures[2:]):
        if future.cancelled():
            with pytest.raises(grpc.FutureCancelledError):
                future.result()
        else:  # it finished before the cancel arrived: then it must be right
            got = parse_response(future.result())
            want, _, _ = main_server.expected(1, x)
            assert rel_err(got.hidden_states, want) < FP32_REL_TOL
    _assert_healthy_and_right(main_server, channel)


def test_many_cancelled_requests_do_not_leak_batch_slots(main_server: Served, channel) -> None:
    """Cancel more requests than the router has batch slots; then as many concurrent requests as
    it has slots are all answered (a leaked slot would leave one waiting until its deadline)."""
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    slots = main_server.config.router.max_inflight_batches
    x = hidden_states(8192, main_server.spec.hidden_size, seed=3)
    request = build_request(main_server.name, x, layer=0)
    futures = [stub.ModelInfer.future(request, timeout=120) for _ in range(3 * slots)]
    for future in futures:
        future.cancel()

    follow_ups = [hidden_states(2048, main_server.spec.hidden_size, seed=60 + i) for i in range(slots + 1)]
    pending = [stub.ModelInfer.future(build_request(main_server.name, y, layer=0), timeout=60) for y in follow_ups]
    for y, future in zip(follow_ups, pending):
        got = parse_response(future.result(timeout=60))
        want, _, _ = main_server.expected(0, y)
        assert rel_err(got.hidden_states, want) < FP32_REL_TOL
    _assert_healthy_and_right(main_server, channel)
