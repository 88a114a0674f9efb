"""Overload and give-ups: admission control refuses excess requests at once with
RESOURCE_EXHAUSTED; a request whose deadline passes, or whose client cancels, never runs on a
worker (queued in the router it is dropped; queued at a worker its share is skipped)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from protos import grpc_predict_v2_pb2_grpc as pb_grpc
from router_service.client import build_request, parse_response
from tests.integration import faults
from tests.integration.support import FP32_REL_TOL, MARKS, Served, hidden_states, rel_err, serve_config, wait_until

pytestmark = MARKS

OVERLOAD_RANDOM = {"layers": 1, "experts": 4, "hidden": 64, "ffn": 128, "top_k": 2, "seed": 41}
MAX_QUEUED = 2048
HOLD = 256  # tokens of a slow request: every worker computes some, and takes faults.SLOW_S over it


@pytest.fixture(scope="module")
def served(deploy_served) -> Iterator[Served]:
    faults.register()
    start, stop = deploy_served
    served = start(serve_config("it-overload", random=OVERLOAD_RANDOM, workers=2, router={
        "max_inflight_batches": 2, "max_queued_tokens": MAX_QUEUED, "max_batch_tokens": 4096,
    }).with_overrides(**{"rebalance.enabled": False}), worker_cls=faults.FaultyWorker)
    yield served
    stop(served)


@pytest.fixture
def stub(served: Served) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(served.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _hidden(served: Served, tokens: int, seed: int, slow: bool = False) -> np.ndarray:
    x = hidden_states(tokens, served.spec.hidden_size, seed=seed)
    if slow:
        x[:, 0] = faults.SLOW
    return x


def _send(served: Served, stub, x: np.ndarray, timeout_s: float = 60.0):
    return stub.ModelInfer.future(build_request(served.name, x, layer=0), timeout=timeout_s)


def _assert_right(served: Served, x: np.ndarray, response) -> None:
    want, _, _ = served.expected(0, x)
    assert rel_err(parse_response(response).hidden_states, want) < FP32_REL_TOL


def _hold_workers(served: Served, stub, seed: int, holding: int = 1):
    """A slow request, once it is in the workers and they hold nothing but `holding` slow
    requests (this one included): (its input, its future)."""
    layer = served.deployment.router._layer
    x = _hidden(served, HOLD, seed, slow=True)
    future = _send(served, stub, x)
    top_k = served.spec.top_k
    wait_until(lambda: layer.outstanding.sum() == holding * top_k * HOLD, 30, "the slow request in the workers")
    return x, future


def test_overload_is_refused_at_once_with_resource_exhausted(served: Served, stub) -> None:
    slow_x, slow = _hold_workers(served, stub, seed=1)
    inputs = [_hidden(served, 512, seed=100 + i) for i in range(16)]
    futures = [_send(served, stub, x) for x in inputs]
    finished: dict[int, tuple[str, float]] = {}
    for i, future in enumerate(futures):
        future.add_done_callback(lambda f, i=i: finished.__setitem__(i, (f.code().name, time.monotonic())))
    _assert_right(served, slow_x, slow.result(timeout=60))
    slow_done = time.monotonic()
    for future in futures:
        future.exception(timeout=60)

    codes = {i: code for i, (code, _) in finished.items()}
    assert len(codes) == len(inputs)  # every request ended, in exactly one status
    refused = [i for i, code in codes.items() if code == "RESOURCE_EXHAUSTED"]
    admitted = [i for i, code in codes.items() if code == "OK"]
    assert len(refused) + len(admitted) == len(inputs), codes
    # one request takes the free batch slot, the queue holds MAX_QUEUED tokens, the rest are refused
    assert len(admitted) == 1 + MAX_QUEUED // 512, codes
    assert all(finished[i][1] < slow_done for i in refused), "a refusal waited for the busy workers"
    details = futures[refused[0]].details()
    assert "router.max_queued_tokens" in details and "retry" in details, details
    for i in admitted:
        _assert_right(served, inputs[i], futures[i].result())


def test_expired_and_cancelled_requests_never_run_on_a_worker(served: Served, stub) -> None:
    router = served.deployment.router
    calls_before = served.worker_calls()
    first_x, first = _hold_workers(served, stub, seed=2)
    # the second batch slot is free: this one goes to the workers, waits there behind the slow
    # one, and expires there; its shares are skipped before their turn
    with pytest.raises(grpc.RpcError) as expired_in_worker:
        stub.ModelInfer(build_request(served.name, _hidden(served, 1024, seed=3), layer=0), timeout=0.3)
    assert expired_in_worker.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    second_x, second = _hold_workers(served, stub, seed=4, holding=2)  # the expired one is gone
    # both batch slots are busy: this one waits in the router's queue, and is cancelled there
    cancelled = _send(served, stub, _hidden(served, 256, seed=5))
    wait_until(lambda: router.queued_tokens >= 256, 30, "the request in the router's queue")
    assert cancelled.cancel()
    _assert_right(served, first_x, first.result(timeout=60))
    _assert_right(served, second_x, second.result(timeout=60))

    wait_until(lambda: router._layer.outstanding.sum() == 0, 30, "the workers idle")
    assert served.worker_calls() - calls_before == 4  # the slow requests' shares, one per worker each
    served.assert_serves_correctly(0, hidden_states(64, served.spec.hidden_size, seed=9))
