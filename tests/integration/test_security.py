"""TLS, mutual TLS and bearer tokens on a real router: real gRPC on loopback, real Ray workers,
a throwaway CA made for the run (`tests.unit.test_security.make_pki`).

Three deployments of one tiny model: mutual TLS with inference and admin tokens, TLS alone,
and tokens over plaintext on loopback. Every answer that comes back OK equals the reference.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from cluster.app.launcher import deploy
from cluster.app.reference import ReferenceMoE
from cluster.config import ConfigError, ServeConfig
from protos import moe_admin_pb2 as admin_pb2
from protos import moe_admin_pb2_grpc as admin_pb2_grpc
from router_service.admin_client import AdminClient
from router_service.client import MoEClient, build_request
from router_service.security import ClientCredentials
from tests.integration.support import (
    MARKS,
    NAMESPACE,
    Served,
    health_status,
    hidden_states,
    run_on,
    serve_config,
    wait_until,
)
from tests.unit.test_security import ADMIN_TOKEN, INFERENCE_TOKEN, Pki, make_pki
from workers.random_model import RandomModel

pytestmark = MARKS

TINY = {"layers": 1, "experts": 4, "hidden": 32, "ffn": 48, "top_k": 2, "seed": 5}
WRONG_TOKEN = "not-a-token-of-this-server-0123"
MOE_SERVE = str(Path(sys.executable).with_name("moe-serve"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def token_files(tmp_path_factory) -> dict[str, str]:
    directory = tmp_path_factory.mktemp("tokens")
    (directory / "inference").write_text(f"# inference clients\n{INFERENCE_TOKEN}\n")
    (directory / "admin").write_text(f"{ADMIN_TOKEN}\n")
    return {"inference_tokens_file": str(directory / "inference"), "admin_tokens_file": str(directory / "admin")}


def _deployed(server_loop, config: ServeConfig, credentials: ClientCredentials) -> Iterator[Served]:
    """Deploy `config` and yield it with a client that holds `credentials` (the shared
    `deploy_served` fixture's client speaks plaintext, which a TLS port refuses)."""
    deployment = run_on(server_loop, deploy(config))
    random = config.model.random_or_default
    served = Served(config, deployment, MoEClient(deployment.address, credentials=credentials),
                    ReferenceMoE(RandomModel(random.spec(), random.seed)))
    try:
        served.client.wait_ready(timeout_s=30)
        yield served
    finally:
        served.client.close()
        run_on(server_loop, deployment.stop(grace_s=2.0))


def _mtls_credentials(pki: Pki, token: str | None = INFERENCE_TOKEN, **changes) -> ClientCredentials:
    fields = {"ca_cert_file": str(pki.ca_cert), "client_cert_file": str(pki.client_cert),
              "client_key_file": str(pki.client_key), "token": token, **changes}
    return ClientCredentials(**fields)


@pytest.fixture(scope="module")
def mtls(ray_cluster, server_loop, pki: Pki, token_files) -> Iterator[Served]:
    config = serve_config("it-mtls", random=TINY, workers=1, security={
        "tls_cert_file": str(pki.server_cert), "tls_key_file": str(pki.server_key),
        "tls_client_ca_file": str(pki.ca_cert), **token_files,
    })
    yield from _deployed(server_loop, config, _mtls_credentials(pki))


@pytest.fixture(scope="module")
def tls_only(ray_cluster, server_loop, pki: Pki) -> Iterator[Served]:
    config = serve_config("it-tls", random=TINY, workers=1, security={
        "tls_cert_file": str(pki.server_cert), "tls_key_file": str(pki.server_key),
    })
    yield from _deployed(server_loop, config, ClientCredentials(ca_cert_file=str(pki.ca_cert)))


@pytest.fixture(scope="module")
def plain_tokens(ray_cluster, server_loop, token_files) -> Iterator[Served]:
    """Tokens without TLS (loopback): the client sends the token through an interceptor."""
    config = serve_config("it-plain-tokens", random=TINY, workers=1, security=token_files)
    yield from _deployed(server_loop, config, ClientCredentials(token=INFERENCE_TOKEN))


def _x(seed: int = 0) -> np.ndarray:
    return hidden_states(5, TINY["hidden"], seed)


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code()


def _infer_with(served: Served, credentials: ClientCredentials) -> grpc.StatusCode | None:
    """None when it answered (and the answer was right), else the status code."""
    with MoEClient(served.address, credentials=credentials) as client:
        try:
            got = client.infer(served.name, _x(), layer=0, timeout_s=20)
        except grpc.RpcError as err:
            return err.code()
    want, _, _ = served.expected(0, _x())
    np.testing.assert_allclose(got.hidden_states, want.numpy(), rtol=1e-5, atol=1e-6)
    return None


def _admin_with(served: Served, credentials: ClientCredentials) -> grpc.StatusCode | None:
    with AdminClient(served.address, timeout_s=20, credentials=credentials) as admin:
        try:
            placement = admin.placement(served.name)
        except grpc.RpcError as err:
            return err.code()
    assert placement.num_logical_experts == served.spec.num_logical_experts
    return None


# ---- TLS --------------------------------------------------------------------------------------


def test_mutual_tls_with_a_token_serves_correctly(mtls: Served) -> None:
    for seed in range(3):
        mtls.assert_serves_correctly(0, _x(seed))


def test_tls_with_the_ca_serves_correctly(tls_only: Served, pki: Pki) -> None:
    tls_only.assert_serves_correctly(0, _x())
    assert _admin_with(tls_only, ClientCredentials(ca_cert_file=str(pki.ca_cert))) is None


@pytest.mark.parametrize("fixture", ["mtls", "tls_only"])
def test_a_plaintext_client_cannot_reach_a_tls_port(request, fixture: str) -> None:
    served: Served = request.getfixturevalue(fixture)
    with grpc.insecure_channel(served.address) as channel:
        assert _code(lambda: health_status(channel, timeout_s=5)) == grpc.StatusCode.UNAVAILABLE
    assert _infer_with(served, ClientCredentials(token=INFERENCE_TOKEN)) == grpc.StatusCode.UNAVAILABLE


def test_a_client_that_does_not_trust_the_server_ca_is_refused(tls_only: Served, pki: Pki) -> None:
    assert _infer_with(tls_only, ClientCredentials(ca_cert_file=str(pki.other_ca_cert))) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_a_client_without_a_certificate(mtls: Served, pki: Pki) -> None:
    no_cert = ClientCredentials(ca_cert_file=str(pki.ca_cert), token=INFERENCE_TOKEN)
    assert _infer_with(mtls, no_cert) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_a_certificate_from_another_ca(mtls: Served, pki: Pki) -> None:
    stranger = _mtls_credentials(pki, client_cert_file=str(pki.foreign_client_cert),
                                 client_key_file=str(pki.foreign_client_key))
    assert _infer_with(mtls, stranger) == grpc.StatusCode.UNAVAILABLE


# ---- tokens -----------------------------------------------------------------------------------


@pytest.mark.parametrize("token, code", [
    pytest.param(None, grpc.StatusCode.UNAUTHENTICATED, id="no-token"),
    pytest.param(WRONG_TOKEN, grpc.StatusCode.UNAUTHENTICATED, id="wrong-token"),
    pytest.param(INFERENCE_TOKEN, None, id="inference-token"),
    pytest.param(ADMIN_TOKEN, None, id="admin-token"),
])
def test_inference_needs_a_known_token(mtls: Served, pki: Pki, token: str | None, code) -> None:
    assert _infer_with(mtls, _mtls_credentials(pki, token)) == code


@pytest.mark.parametrize("token, code", [
    pytest.param(None, grpc.StatusCode.UNAUTHENTICATED, id="no-token"),
    pytest.param(WRONG_TOKEN, grpc.StatusCode.UNAUTHENTICATED, id="wrong-token"),
    pytest.param(INFERENCE_TOKEN, grpc.StatusCode.PERMISSION_DENIED, id="inference-token"),
    pytest.param(ADMIN_TOKEN, None, id="admin-token"),
])
def test_admin_needs_an_admin_token(mtls: Served, pki: Pki, token: str | None, code) -> None:
    assert _admin_with(mtls, _mtls_credentials(pki, token)) == code


def test_a_refused_admin_call_changes_nothing(mtls: Served, pki: Pki) -> None:
    before = mtls.deployment.placement
    with _mtls_credentials(pki, INFERENCE_TOKEN).channel(mtls.address) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        code = _code(lambda: stub.Rebalance(admin_pb2.RebalanceRequest(model=mtls.name, force=True), timeout=20))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert mtls.deployment.placement == before


def test_health_is_open_without_a_token(mtls: Served, pki: Pki) -> None:
    with _mtls_credentials(pki, token=None).channel(mtls.address) as channel:
        assert health_status(channel) == "SERVING"


def test_reflection_needs_a_token(mtls: Served, pki: Pki) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with _mtls_credentials(pki, token=None).channel(mtls.address) as channel:
        assert _code(lambda: list(ProtoReflectionDescriptorDatabase(channel).get_services())) == \
            grpc.StatusCode.UNAUTHENTICATED
    with _mtls_credentials(pki).channel(mtls.address) as channel:
        assert "inference.GRPCInferenceService" in set(ProtoReflectionDescriptorDatabase(channel).get_services())


def test_the_token_is_checked_before_the_request_is_parsed(mtls: Served, pki: Pki) -> None:
    with _mtls_credentials(pki, token=None).channel(mtls.address) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        assert _code(lambda: call(b"\xff\xff", timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
    with _mtls_credentials(pki).channel(mtls.address) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        assert _code(lambda: call(b"\xff\xff", timeout=10)) == grpc.StatusCode.INVALID_ARGUMENT


def test_tokens_over_plaintext_on_loopback(plain_tokens: Served) -> None:
    plain_tokens.assert_serves_correctly(0, _x(1))
    assert _infer_with(plain_tokens, ClientCredentials()) == grpc.StatusCode.UNAUTHENTICATED
    assert _admin_with(plain_tokens, ClientCredentials(token=INFERENCE_TOKEN)) == grpc.StatusCode.PERMISSION_DENIED
    assert _admin_with(plain_tokens, ClientCredentials(token=ADMIN_TOKEN)) is None
    with grpc.insecure_channel(plain_tokens.address) as channel:  # health stays open
        assert health_status(channel) == "SERVING"
        stub_call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        request = build_request(plain_tokens.name, _x(), layer=0).SerializeToString()
        assert _code(lambda: stub_call(request, timeout=10, metadata=(("authorization", "Basic abc"),))) == \
            grpc.StatusCode.UNAUTHENTICATED


# ---- the command line -------------------------------------------------------------------------


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "MOE_SERVE_TOKEN"}
    return subprocess.run([MOE_SERVE, *args], capture_output=True, text=True, timeout=120,
                          env={**base, "COLUMNS": "200", **(env or {})})


def test_cli_infer_and_load_over_mutual_tls(mtls: Served, pki: Pki) -> None:
    tls = ["--address", mtls.address, "--model", mtls.name, "--ca-cert", str(pki.ca_cert),
           "--client-cert", str(pki.client_cert), "--client-key", str(pki.client_key)]
    done = _cli("infer", *tls, "--layer", "0", "--tokens", "3", "--token", INFERENCE_TOKEN)
    assert done.returncode == 0 and "[3, 32] float32" in done.stdout, done.stdout + done.stderr

    done = _cli("load", *tls, "--json", env={"MOE_SERVE_TOKEN": INFERENCE_TOKEN})
    assert done.returncode == 1 and "PERMISSION_DENIED" in done.stdout, done.stdout + done.stderr
    done = _cli("load", *tls, "--json", env={"MOE_SERVE_TOKEN": ADMIN_TOKEN})
    assert done.returncode == 0 and f'"model": "{mtls.name}"' in done.stdout, done.stdout + done.stderr


def test_cli_without_a_token_is_unauthenticated(plain_tokens: Served) -> None:
    done = _cli("infer", "--address", plain_tokens.address, "--model", plain_tokens.name, "--layer", "0")
    assert done.returncode == 1 and "UNAUTHENTICATED" in done.stdout and "Bearer" in done.stdout, done.stdout


def test_cli_names_an_unreadable_ca_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.crt"
    done = _cli("infer", "--address", "127.0.0.1:1", "--ca-cert", str(missing))
    assert done.returncode == 2 and f"--ca-cert) {missing}" in done.stdout, done.stdout + done.stderr


# ---- configuration ----------------------------------------------------------------------------


def test_an_exposed_bind_without_admin_tokens_is_refused_before_ray_starts() -> None:
    with pytest.raises(ConfigError, match=r"router.host \('0.0.0.0'\) .* security.admin_tokens_file"):
        serve_config("it-exposed", random=TINY, workers=1, router={"host": "0.0.0.0"})
    done = _cli("serve", "--host", "0.0.0.0", "--address", "127.0.0.1:1")  # an unreachable Ray
    assert done.returncode == 2, done.stdout + done.stderr
    assert "router.host ('0.0.0.0')" in done.stdout and "security.admin_tokens_file" in done.stdout, done.stdout


def test_an_unreadable_security_file_fails_the_start_naming_it_and_frees_the_workers(
    ray_cluster, server_loop, tmp_path: Path
) -> None:
    import ray

    missing = tmp_path / "admin-tokens"
    config = serve_config("it-bad-security", random=TINY, workers=1, security={"admin_tokens_file": str(missing)})
    with pytest.raises(ValueError, match=f"security.admin_tokens_file: cannot read {missing}"):
        run_on(server_loop, deploy(config))

    def worker_gone() -> bool:
        return all(a["name"] != "it-bad-security-worker-00" for a in ray.util.list_named_actors(all_namespaces=True)
                   if a["namespace"] == NAMESPACE)

    wait_until(worker_gone, 30, "the worker of the failed start to go away")
