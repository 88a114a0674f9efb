"""Health, reflection, the KServe v2 metadata calls, actor names, and the serving lifecycle."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version

import grpc
import numpy as np
import pytest
import ray
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from cluster.app.launcher import Deployment, deploy
from cluster.app.reference import ReferenceMoE
from protos import grpc_predict_v2_pb2 as pb
from protos import grpc_predict_v2_pb2_grpc as pb_grpc
from router_service.client import MoEClient, build_request
from tests.integration import faults
from tests.integration.support import (
    FP32_REL_TOL,
    MARKS,
    NAMESPACE,
    Served,
    health_status,
    hidden_states,
    rel_err,
    run_on,
    serve_config,
    wait_until,
)
from workers.random_model import RandomModel

pytestmark = MARKS

INFERENCE = "inference.GRPCInferenceService"
HEALTH = "grpc.health.v1.Health"


@pytest.fixture(scope="module")
def channel(main_server: Served) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(main_server.address) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(channel)


def _named_actors(namespace: str = NAMESPACE) -> set[str]:
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == namespace}


@pytest.mark.parametrize("service", ["", INFERENCE], ids=["server", "inference-service"])
def test_health_is_serving_once_deployed(channel, service: str) -> None:
    assert health_status(channel, service) == "SERVING"


def test_health_of_an_unknown_service_is_not_found(channel) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        health_status(channel, "no.such.Service")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services_and_their_methods(channel) -> None:
    database = ProtoReflectionDescriptorDatabase(channel)
    services = set(database.get_services())
    assert {INFERENCE, HEALTH} <= services, services

    methods = {m.name for m in DescriptorPool(database).FindServiceByName(INFERENCE).methods}
    assert {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer"} <= methods


def test_server_live_and_ready(stub) -> None:
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready


@pytest.mark.parametrize("model_version", ["", "1"])
def test_model_ready(main_server: Served, stub, model_version: str) -> None:
    assert stub.ModelReady(pb.ModelReadyRequest(name=main_server.name, version=model_version), timeout=10).ready


def test_server_metadata(stub) -> None:
    meta = stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10)
    assert meta.name == "moe-serve"
    assert meta.version == version("moe-serve")


def test_model_metadata_gives_hidden_size_and_top_k(main_server: Served, stub) -> None:
    spec = main_server.spec
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=main_server.name), timeout=10)

    assert meta.name == main_server.name
    assert list(meta.versions) == ["1"]
    tensors = lambda ts: [(t.name, t.datatype, list(t.shape)) for t in ts]  # noqa: E731
    assert tensors(meta.inputs) == [("hidden_states", "FP32", [-1, spec.hidden_size])]
    assert tensors(meta.outputs) == [
        ("hidden_states", "FP32", [-1, spec.hidden_size]),
        ("topk_ids", "INT32", [-1, spec.top_k]),
        ("topk_weights", "FP32", [-1, spec.top_k]),
    ]


def test_worker_actors_are_named_in_the_configured_namespace(main_server: Served) -> None:
    names = _named_actors()
    workers = main_server.config.workers.count
    expected = {f"{main_server.name}-worker-{i:02d}" for i in range(workers)}
    assert expected <= names, names
    assert f"{main_server.name}-worker-{workers:02d}" not in names
    assert not expected & _named_actors("moe-serve"), "workers leaked into the default namespace"


def test_workers_report_their_replicas(main_server: Served) -> None:
    stats = main_server.deployment.pool.stats()
    assert [s["index"] for s in stats] == list(range(main_server.config.workers.count))
    assert sum(s["replicas"] for s in stats) == main_server.spec.num_logical_experts


def test_not_serving_while_draining_then_stop_releases_workers_and_port(deploy_served, server_loop) -> None:
    """A one-layer model (the `layer` parameter may be left out), from deploy to stop."""
    start, stop = deploy_served
    served = start(serve_config("it-lifecycle", random={"layers": 1, "experts": 4, "hidden": 32, "ffn": 48}, workers=1))
    address, name, x = served.address, served.name, hidden_states(6, 32, seed=4)
    try:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert f"{name}-worker-00" in _named_actors()
            served.assert_serves_correctly(0, x)
            no_layer = served.client.infer(name, x, layer=None)  # the only MoE layer is the default
            assert no_layer.hidden_states.tobytes() == served.client.infer(name, x, layer=0).hidden_states.tobytes()

            run_on(server_loop, served.deployment.server.set_serving(False))  # what stop() does first
            assert health_status(channel) == "NOT_SERVING"
            assert not stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
            assert not stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=10).ready
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfer(build_request(name, x, layer=0), timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert name in caught.value.details()

            run_on(server_loop, served.deployment.server.set_serving(True))
            served.assert_serves_correctly(0, x)
    finally:
        stop(served)

    wait_until(lambda: f"{name}-worker-00" not in _named_actors(), 30, "the worker actor to go away")
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as caught:
        health_status(channel, timeout_s=2)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_second_deployment_under_a_taken_name_fails_and_leaves_the_first_serving(
    main_server: Served, deploy_served
) -> None:
    start, _ = deploy_served
    with pytest.raises(ValueError, match=f"{main_server.name}-worker-00"):
        start(main_server.config)

    assert {f"{main_server.name}-worker-{i:02d}" for i in range(main_server.config.workers.count)} <= _named_actors()
    for layer in main_server.spec.moe_layers:
        main_server.assert_serves_correctly(layer, hidden_states(7, main_server.spec.hidden_size, seed=layer))


async def _tokens_in_workers(deployment: Deployment) -> int:
    return int(deployment.router.outstanding_tokens_now().sum())


def _refused(address: str, name: str, x: np.ndarray) -> bool:
    """A new request on a new connection: True if refused with UNAVAILABLE, False if served."""
    with MoEClient(address) as client:
        try:
            client.infer(name, x, layer=0, timeout_s=20)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE, f"{err.code().name}: {err.details()}"
            return True
    return False


def test_drain_serves_through_the_window_lets_in_flight_requests_finish_then_refuses(
    ray_cluster, server_loop
) -> None:
    """What `moe-serve serve` does on SIGTERM (`RouterServer.drain`), step by step."""
    config = serve_config("it-drain", random={"layers": 1, "experts": 4, "hidden": 32, "ffn": 48}, workers=1)
    faults.register()
    deployment = run_on(server_loop, deploy(config, worker_cls=faults.FaultyWorker))
    random = config.model.random_or_default
    served = Served(config, deployment, MoEClient(deployment.address), ReferenceMoE(RandomModel(random.spec(), random.seed)))
    address, name, x = served.address, served.name, hidden_states(6, 32, seed=9)
    slow = x.copy()
    slow[0, 0] = faults.SLOW
    said: list[str] = []
    window_over = asyncio.Event()
    try:
        served.client.wait_ready(timeout_s=30)
        draining = asyncio.run_coroutine_threadsafe(
            deployment.server.drain(drain_s=120, grace_s=30, say=said.append, cut_short=window_over), server_loop)
        with grpc.insecure_channel(address) as channel:
            wait_until(lambda: health_status(channel) == "NOT_SERVING", 10, "health to say NOT_SERVING")
            readiness = pb_grpc.GRPCInferenceServiceStub(channel)
            assert not readiness.ServerReady(pb.ServerReadyRequest()).ready  # readiness probes say no too
            assert not readiness.ModelReady(pb.ModelReadyRequest(name=name)).ready
        served.assert_serves_correctly(0, x)  # the window: load balancers look elsewhere, we still serve
        assert not draining.done()

        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(served.client.infer, name, slow, layer=0, timeout_s=60)
            wait_until(lambda: run_on(server_loop, _tokens_in_workers(deployment)) > 0, 20,
                       "the slow request to reach its worker")
            server_loop.call_soon_threadsafe(window_over.set)
            # `stopping` is said on the server's loop just before it marks the model not ready,
            # with no await between: no request can slip in after we see it
            wait_until(lambda: any(line.startswith("stopping") for line in said), 10, "the window to end")
            assert _refused(address, name, x), "a new request after the window was served"
            assert not in_flight.done(), "the request in flight should still be running when new ones are refused"
            got = in_flight.result(timeout=60)
        want, _, _ = served.expected(0, slow)
        assert rel_err(got.hidden_states, want) < FP32_REL_TOL
        draining.result(timeout=60)
        assert [line.split(":")[0] for line in said] == ["draining", "drain window cut short", "stopping"], said
        assert "health NOT_SERVING" in said[0]
    finally:
        served.client.close()
        run_on(server_loop, deployment.stop(grace_s=2.0))  # the server is down already: frees the workers
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as caught:
        health_status(channel, timeout_s=2)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
