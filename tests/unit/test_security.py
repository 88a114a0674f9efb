"""The gRPC edge without a socket: the token policy and its interceptor, the security files read
at start, client credentials, and the guarded handlers that parse raw request bytes.

`make_pki` (a throwaway CA, a server certificate for 127.0.0.1/localhost, a client certificate)
is shared with the integration tier's TLS tests.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cluster.config import SecurityConfig
from protos import grpc_predict_v2_pb2 as pb
from protos import moe_admin_pb2 as admin_pb2
from router_service.security import (
    MIN_TOKEN_CHARS,
    Access,
    ClientCredentials,
    ServerSecurity,
    TokenInterceptor,
    TokenPolicy,
    bearer_token,
    read_tokens,
    required_access,
)
from router_service.server import ADMIN_DESCRIPTOR, INFERENCE_DESCRIPTOR, MAX_DETAILS_CHARS, guarded_handlers
from tests.unit.grpc_context import Aborted, FakeContext

INFERENCE_TOKEN = "inference-token-0123456789"
OTHER_INFERENCE_TOKEN = "inference-token-abcdefghij"
ADMIN_TOKEN = "admin-token-0123456789abcdef"
INFER = "/inference.GRPCInferenceService/ModelInfer"
SHM_REGISTER = "/inference.GRPCInferenceService/SystemSharedMemoryRegister"
ADMIN = "/moe.admin.v1.AdminService/ApplyPlacement"
HEALTH = "/grpc.health.v1.Health/Check"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


# ---- a throwaway PKI ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_cert: Path  # another CA: it signed only the foreign client certificate
    foreign_client_cert: Path
    foreign_client_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key, issuer: str, issuer_key, *, ca: bool = False, server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost"),
        ]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate | None = None, key=None) -> Path:
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return path


def make_pki(directory: Path) -> Pki:
    ca_key, server_key, client_key, other_key, foreign_key = _key(), _key(), _key(), _key(), _key()
    ca = _cert("moe-serve test CA", ca_key, "moe-serve test CA", ca_key, ca=True)
    other = _cert("some other CA", other_key, "some other CA", other_key, ca=True)
    return Pki(
        ca_cert=_write(directory / "ca.crt", ca),
        server_cert=_write(directory / "server.crt", _cert("127.0.0.1", server_key, "moe-serve test CA", ca_key, server=True)),
        server_key=_write(directory / "server.key", key=server_key),
        client_cert=_write(directory / "client.crt", _cert("a client", client_key, "moe-serve test CA", ca_key)),
        client_key=_write(directory / "client.key", key=client_key),
        other_ca_cert=_write(directory / "other-ca.crt", other),
        foreign_client_cert=_write(directory / "foreign.crt", _cert("a stranger", foreign_key, "some other CA", other_key)),
        foreign_client_key=_write(directory / "foreign.key", key=foreign_key),
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# ---- which call needs what --------------------------------------------------------------------


@pytest.mark.parametrize("method, access", [
    pytest.param(INFER, Access.INFERENCE, id="model-infer"),
    pytest.param("/inference.GRPCInferenceService/ServerLive", Access.INFERENCE, id="server-live"),
    pytest.param(ADMIN, Access.ADMIN, id="admin"),
    pytest.param("/moe.admin.v1.AdminService/GetLoad", Access.ADMIN, id="admin-read"),
    pytest.param("/moe.admin.v1.AdminService/GetStatus", Access.ADMIN, id="admin-status"),  # names workers, nodes
    pytest.param(HEALTH, Access.OPEN, id="health-check"),
    pytest.param("/grpc.health.v1.Health/Watch", Access.OPEN, id="health-watch"),
    pytest.param(REFLECTION, Access.INFERENCE, id="reflection"),
    pytest.param("/some.Other/Thing", Access.INFERENCE, id="unknown-service"),
    pytest.param("/moe.admin.v1.AdminServiceX/GetLoad", Access.INFERENCE, id="admin-prefix-is-not-admin"),
    # the shared memory extension is part of inference, as in Triton: what the client maps is its own
    pytest.param(SHM_REGISTER, Access.INFERENCE, id="shm-register"),
    pytest.param("/inference.GRPCInferenceService/SystemSharedMemoryStatus", Access.INFERENCE, id="shm-status"),
    pytest.param("/inference.GRPCInferenceService/SystemSharedMemoryUnregister", Access.INFERENCE,
                 id="shm-unregister"),
    pytest.param("/inference.GRPCInferenceService/CudaSharedMemoryRegister", Access.INFERENCE,
                 id="cuda-shm-register"),
])
def test_required_access(method: str, access: Access) -> None:
    assert required_access(method) is access


@pytest.mark.parametrize("metadata, token", [
    pytest.param((), None, id="none"),
    pytest.param((("user-agent", "x"),), None, id="other-keys-only"),
    pytest.param((("authorization", f"Bearer {ADMIN_TOKEN}"),), ADMIN_TOKEN, id="bearer"),
    pytest.param((("authorization", f"bearer   {ADMIN_TOKEN} "),), ADMIN_TOKEN, id="any-case-and-spaces"),
    pytest.param((("Authorization", f"Bearer {ADMIN_TOKEN}"),), ADMIN_TOKEN, id="key-any-case"),
    pytest.param((("authorization", f"Bearer {ADMIN_TOKEN}".encode()),), ADMIN_TOKEN, id="bytes-value"),
    pytest.param((("authorization", "Basic dXNlcjpwYXNz"),), "", id="other-scheme"),
    pytest.param((("authorization", "Bearer"),), "", id="bearer-without-token"),
    pytest.param((("authorization", f"Bearer {ADMIN_TOKEN}"), ("authorization", "Bearer x")), ADMIN_TOKEN,
                 id="first-entry-counts"),
])
def test_bearer_token_from_metadata(metadata, token) -> None:
    assert bearer_token(metadata) == token


POLICY = TokenPolicy(inference_tokens=(INFERENCE_TOKEN, OTHER_INFERENCE_TOKEN), admin_tokens=(ADMIN_TOKEN,))
OK = None
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("policy, method, token, code", [
    pytest.param(POLICY, INFER, INFERENCE_TOKEN, OK, id="inference-token-infers"),
    pytest.param(POLICY, INFER, OTHER_INFERENCE_TOKEN, OK, id="any-listed-inference-token"),
    pytest.param(POLICY, INFER, ADMIN_TOKEN, OK, id="admin-token-infers"),
    pytest.param(POLICY, INFER, None, UNAUTHENTICATED, id="inference-without-token"),
    pytest.param(POLICY, INFER, "", UNAUTHENTICATED, id="inference-malformed-authorization"),
    pytest.param(POLICY, INFER, INFERENCE_TOKEN + "x", UNAUTHENTICATED, id="inference-wrong-token"),
    pytest.param(POLICY, INFER, INFERENCE_TOKEN[:-1], UNAUTHENTICATED, id="inference-token-prefix"),
    pytest.param(POLICY, ADMIN, ADMIN_TOKEN, OK, id="admin-token-admins"),
    pytest.param(POLICY, ADMIN, INFERENCE_TOKEN, PERMISSION_DENIED, id="inference-token-on-admin"),
    pytest.param(POLICY, ADMIN, None, UNAUTHENTICATED, id="admin-without-token"),
    pytest.param(POLICY, ADMIN, "wrong-token-0123456789", UNAUTHENTICATED, id="admin-wrong-token"),
    pytest.param(POLICY, HEALTH, None, OK, id="health-open"),
    pytest.param(POLICY, HEALTH, "garbage", OK, id="health-open-whatever-the-token"),
    pytest.param(POLICY, REFLECTION, None, UNAUTHENTICATED, id="reflection-needs-a-token"),
    pytest.param(POLICY, REFLECTION, INFERENCE_TOKEN, OK, id="reflection-with-inference-token"),
    pytest.param(POLICY, SHM_REGISTER, None, UNAUTHENTICATED, id="shm-register-needs-a-token"),
    pytest.param(POLICY, SHM_REGISTER, INFERENCE_TOKEN, OK, id="shm-register-with-inference-token"),
    pytest.param(TokenPolicy(admin_tokens=(ADMIN_TOKEN,)), INFER, None, OK, id="only-admin-tokens-inference-open"),
    pytest.param(TokenPolicy(admin_tokens=(ADMIN_TOKEN,)), ADMIN, None, UNAUTHENTICATED,
                 id="only-admin-tokens-admin-closed"),
    pytest.param(TokenPolicy(inference_tokens=(INFERENCE_TOKEN,)), ADMIN, None, OK,
                 id="only-inference-tokens-admin-open-on-loopback"),
    pytest.param(TokenPolicy(), ADMIN, None, OK, id="no-tokens-all-open"),
])
def test_policy_decides(policy: TokenPolicy, method: str, token: str | None, code) -> None:
    denial = policy.check(method, token)
    assert (denial.code if denial else None) == code, denial


def test_denials_say_what_to_do_and_never_echo_the_token() -> None:
    assert "authorization: Bearer <token>" in POLICY.check(INFER, None).message
    assert "admin token" in POLICY.check(ADMIN, INFERENCE_TOKEN).message
    wrong = "wrong-token-0123456789"
    assert wrong not in POLICY.check(ADMIN, wrong).message
    assert INFERENCE_TOKEN not in POLICY.check(ADMIN, INFERENCE_TOKEN).message
    assert ADMIN_TOKEN not in repr(POLICY) and INFERENCE_TOKEN not in repr(POLICY)


@dataclass(frozen=True)
class CallDetails:
    method: str
    invocation_metadata: tuple


async def _unary(request, context):
    return "served"


async def _stream(request_iterator, context):
    yield "served"


def _intercept(interceptor: TokenInterceptor, method: str, metadata: tuple, handler) -> grpc.RpcMethodHandler | None:
    async def continuation(details):
        return handler

    return asyncio.run(interceptor.intercept_service(continuation, CallDetails(method, metadata)))


def _run_unary(handler: grpc.RpcMethodHandler):
    return asyncio.run(handler.unary_unary(b"", FakeContext()))


@pytest.mark.parametrize("method, metadata, outcome", [
    pytest.param(INFER, (("authorization", f"Bearer {INFERENCE_TOKEN}"),), "served", id="let-through"),
    pytest.param(INFER, (), UNAUTHENTICATED, id="no-token"),
    pytest.param(ADMIN, (("authorization", f"Bearer {INFERENCE_TOKEN}"),), PERMISSION_DENIED, id="inference-on-admin"),
    pytest.param(HEALTH, (), "served", id="health"),
])
def test_interceptor_lets_through_or_refuses_unary_calls(method, metadata, outcome) -> None:
    handler = _intercept(TokenInterceptor(POLICY), method, metadata, grpc.unary_unary_rpc_method_handler(_unary))
    if outcome == "served":
        assert _run_unary(handler) == "served"
        return
    with pytest.raises(Aborted) as caught:
        _run_unary(handler)
    assert caught.value.code == outcome


def test_interceptor_refuses_a_streaming_call_with_a_streaming_handler() -> None:
    """Reflection is a bidirectional stream: the refusal must be a handler of the same kind."""
    handler = _intercept(TokenInterceptor(POLICY), REFLECTION, (), grpc.stream_stream_rpc_method_handler(_stream))
    assert handler.request_streaming and handler.response_streaming
    with pytest.raises(Aborted) as caught:
        asyncio.run(handler.stream_stream(iter(()), FakeContext()))
    assert caught.value.code == UNAUTHENTICATED


def test_interceptor_passes_unknown_methods_on_as_unimplemented() -> None:
    assert _intercept(TokenInterceptor(POLICY), "/no.Such/Method", (), None) is None


# ---- files read at start ------------------------------------------------------------------------


def _tokens_file(tmp_path: Path, text: str, name: str = "tokens") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_tokens_file_skips_blank_lines_and_comments(tmp_path: Path) -> None:
    path = _tokens_file(tmp_path, f"# the ops team\n\n  {ADMIN_TOKEN}  \n{INFERENCE_TOKEN}\n{ADMIN_TOKEN}\n")
    assert read_tokens(path, "admin_tokens_file") == (ADMIN_TOKEN, INFERENCE_TOKEN)


@pytest.mark.parametrize("text, says", [
    pytest.param("", "holds no tokens", id="empty"),
    pytest.param("# only a comment\n\n", "holds no tokens", id="only-comments"),
    pytest.param(f"{ADMIN_TOKEN}\nshort\n", f"line 2 of {{path}} has 5 characters; use at least {MIN_TOKEN_CHARS}",
                 id="too-short"),
    pytest.param("two words in-one-line-0123456789\n", "line 1 of {path} is not a token", id="spaces"),
])
def test_unusable_tokens_file_names_key_path_and_line(tmp_path: Path, text: str, says: str) -> None:
    path = _tokens_file(tmp_path, text)
    with pytest.raises(ValueError) as caught:
        read_tokens(path, "admin_tokens_file")
    message = str(caught.value)
    assert message.startswith("security.admin_tokens_file: ") and says.format(path=path) in message, message
    assert "in-one-line" not in message, "the message must not echo a token"


def test_missing_tokens_file_names_key_and_path(tmp_path: Path) -> None:
    path = tmp_path / "nope"
    with pytest.raises(ValueError, match=f"security.inference_tokens_file: cannot read {path}: No such file"):
        ServerSecurity.load(SecurityConfig(inference_tokens_file=str(path)))


def test_no_security_section_is_plaintext_and_open() -> None:
    for config in (None, SecurityConfig()):
        loaded = ServerSecurity.load(config)
        assert loaded.credentials is None and loaded.policy.open and loaded.interceptors() == []


def test_security_files_load(tmp_path: Path, pki: Pki) -> None:
    loaded = ServerSecurity.load(SecurityConfig(
        tls_cert_file=str(pki.server_cert), tls_key_file=str(pki.server_key), tls_client_ca_file=str(pki.ca_cert),
        inference_tokens_file=_tokens_file(tmp_path, INFERENCE_TOKEN, "inference"),
        admin_tokens_file=_tokens_file(tmp_path, ADMIN_TOKEN, "admin"),
    ))
    assert isinstance(loaded.credentials, grpc.ServerCredentials) and loaded.mutual_tls
    assert loaded.policy == TokenPolicy((INFERENCE_TOKEN,), (ADMIN_TOKEN,))
    assert len(loaded.interceptors()) == 1


def test_a_token_in_both_files_is_refused_naming_both_keys(tmp_path: Path) -> None:
    both = _tokens_file(tmp_path, ADMIN_TOKEN)
    with pytest.raises(ValueError) as caught:
        ServerSecurity.load(SecurityConfig(inference_tokens_file=both, admin_tokens_file=both))
    assert "security.inference_tokens_file" in str(caught.value) and "security.admin_tokens_file" in str(caught.value)


@pytest.mark.parametrize("mistake, says", [
    pytest.param("cert-missing", "security.tls_cert_file: cannot read", id="cert-missing"),
    pytest.param("key-missing", "security.tls_key_file: cannot read", id="key-missing"),
    pytest.param("ca-missing", "security.tls_client_ca_file: cannot read", id="ca-missing"),
    pytest.param("wrong-key", "are not a PEM certificate and its private key", id="key-of-another-cert"),
    pytest.param("not-pem", "are not a PEM certificate and its private key", id="cert-not-pem"),
    pytest.param("ca-not-pem", "security.tls_client_ca_file", id="ca-not-pem"),
    pytest.param("encrypted-key", "is encrypted", id="encrypted-key"),
])
def test_unusable_tls_files_are_named_at_start(tmp_path: Path, pki: Pki, mistake: str, says: str) -> None:
    cert, key, ca = str(pki.server_cert), str(pki.server_key), str(pki.ca_cert)
    if mistake == "cert-missing":
        cert = str(tmp_path / "nope.crt")
    elif mistake == "key-missing":
        key = str(tmp_path / "nope.key")
    elif mistake == "ca-missing":
        ca = str(tmp_path / "nope-ca.crt")
    elif mistake == "wrong-key":
        key = str(pki.client_key)
    elif mistake == "not-pem":
        cert = _tokens_file(tmp_path, "not a certificate\n", "bad.crt")
    elif mistake == "ca-not-pem":
        ca = _tokens_file(tmp_path, "not a certificate\n", "bad-ca.crt")
    elif mistake == "encrypted-key":
        private = serialization.load_pem_private_key(pki.server_key.read_bytes(), None)
        encrypted = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.BestAvailableEncryption(b"passphrase"))
        (tmp_path / "encrypted.key").write_bytes(encrypted)
        key = str(tmp_path / "encrypted.key")
    with pytest.raises(ValueError) as caught:
        ServerSecurity.load(SecurityConfig(tls_cert_file=cert, tls_key_file=key, tls_client_ca_file=ca))
    assert says in str(caught.value), caught.value


# ---- client credentials -----------------------------------------------------------------------


def test_client_credentials_default_to_plaintext_without_a_token() -> None:
    assert not ClientCredentials().uses_tls
    assert ClientCredentials(ca_cert_file="ca.crt").uses_tls
    assert ClientCredentials(tls=True).uses_tls


@pytest.mark.parametrize("kwargs, says", [
    pytest.param({"client_cert_file": "c.crt"}, "needs its key", id="cert-without-key"),
    pytest.param({"client_key_file": "c.key"}, "needs its key", id="key-without-cert"),
    pytest.param({"token": "two words"}, "one word", id="token-with-space"),
    pytest.param({"token": "line\nbreak"}, "one word", id="token-with-newline"),
])
def test_client_credentials_refuse_mistakes(kwargs: dict, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        ClientCredentials(**kwargs)


def test_client_credentials_never_show_the_token() -> None:
    assert ADMIN_TOKEN not in repr(ClientCredentials(token=ADMIN_TOKEN))


def test_unreadable_client_files_name_the_flag_and_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"CA certificate \\(--ca-cert\\) {tmp_path / 'nope'}"):
        ClientCredentials(ca_cert_file=str(tmp_path / "nope")).channel("127.0.0.1:1")


# ---- guarded handlers: raw bytes in, INVALID_ARGUMENT for garbage, nothing leaks ---------------


class EchoServicer:
    """Answers every method with an empty response; `boom` makes each one fail like a bug."""

    def __init__(self, boom: bool = False, details: str = ""):
        self.seen: list = []
        self._boom = boom
        self._details = details

    def __getattr__(self, method: str):
        descriptor = INFERENCE_DESCRIPTOR.methods_by_name.get(method) or ADMIN_DESCRIPTOR.methods_by_name[method]

        async def behaviour(request, context):
            self.seen.append(request)
            if self._details:
                await context.abort(grpc.StatusCode.NOT_FOUND, self._details)
            if self._boom:
                raise RuntimeError("/secret/internal/path")
            from google.protobuf import message_factory
            return message_factory.GetMessageClass(descriptor.output_type)()

        async def stream_behaviour(requests, context):  # a bidirectional stream: one answer per request
            async for request in requests:
                yield await behaviour(request, context)

        return stream_behaviour if descriptor.client_streaming else behaviour


SERVICES = [pytest.param(INFERENCE_DESCRIPTOR, id="inference"), pytest.param(ADMIN_DESCRIPTOR, id="admin")]


def _call(handler: grpc.RpcMethodHandler, raw: bytes):
    """A unary call with `raw`, or a bidirectional stream that sends `raw` once (its responses)."""
    if not handler.request_streaming:
        return asyncio.run(handler.unary_unary(raw, FakeContext()))

    async def one_message():
        yield raw

    async def stream() -> list:
        return [response async for response in handler.stream_stream(one_message(), FakeContext())]

    return asyncio.run(stream())


def test_the_inference_stream_is_guarded_as_a_bidirectional_stream() -> None:
    handler = guarded_handlers(INFERENCE_DESCRIPTOR, EchoServicer())["ModelStreamInfer"]
    assert (handler.request_streaming, handler.response_streaming) == (True, True)
    assert handler.request_deserializer is None
    assert _call(handler, pb.ModelInferRequest(id="x").SerializeToString()) == [pb.ModelStreamInferResponse()]


@pytest.mark.parametrize("service", SERVICES)
def test_every_method_is_guarded_and_parses_its_own_bytes(service) -> None:
    servicer = EchoServicer()
    handlers = guarded_handlers(service, servicer)
    assert set(handlers) == {m.name for m in service.methods}
    for method in service.methods:
        handler = handlers[method.name]
        assert handler.request_deserializer is None, "grpcio would parse and answer INTERNAL on garbage"
        _call(handler, b"")  # the empty message is a valid message of every type
        assert servicer.seen[-1].DESCRIPTOR is method.input_type


@pytest.mark.parametrize("service", SERVICES)
@pytest.mark.parametrize("raw", [
    pytest.param(b"\xff", id="bad-tag"),
    pytest.param(b"\x0a\x05ab", id="truncated-length"),
    pytest.param(b"\x08", id="missing-varint"),
])
def test_garbage_bytes_are_invalid_argument_naming_the_message(service, raw: bytes) -> None:
    servicer = EchoServicer()
    for method in service.methods:
        with pytest.raises(Aborted) as caught:
            _call(guarded_handlers(service, servicer)[method.name], raw)
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT, method.name
        assert caught.value.details.startswith(f"request is not a valid {method.input_type.full_name} protobuf: ")
    assert not servicer.seen, "no servicer may see a request that did not parse"


@pytest.mark.parametrize("service, method", [
    pytest.param(INFERENCE_DESCRIPTOR, "ModelInfer", id="model-infer"),
    pytest.param(ADMIN_DESCRIPTOR, "GetLoad", id="admin-get-load"),
])
def test_a_string_that_is_not_utf8_is_invalid_argument(service, method: str) -> None:
    field_1 = service.methods_by_name[method].input_type.fields_by_number[1]
    assert field_1.type == field_1.TYPE_STRING  # model_name / model
    with pytest.raises(Aborted) as caught:
        _call(guarded_handlers(service, EchoServicer())[method], b"\x0a\x01\xff")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in caught.value.details


@pytest.mark.parametrize("service", SERVICES)
def test_an_escaping_exception_is_internal_and_leaks_nothing(service, caplog) -> None:
    handlers = guarded_handlers(service, EchoServicer(boom=True))
    for method in service.methods:
        with caplog.at_level(logging.ERROR, logger="router_service.server"), pytest.raises(Aborted) as caught:
            _call(handlers[method.name], b"")
        assert caught.value.code == grpc.StatusCode.INTERNAL
        assert caught.value.details == f"{method.name} failed inside the server; see the server log"
    assert any("/secret/internal/path" in (r.exc_text or "") for r in caplog.records), "the traceback must be logged"


def test_long_status_details_are_cut() -> None:
    handler = guarded_handlers(INFERENCE_DESCRIPTOR, EchoServicer(details="x" * 100_000))["ModelInfer"]
    with pytest.raises(Aborted) as caught:
        _call(handler, pb.ModelInferRequest(model_name="m").SerializeToString())
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert len(caught.value.details) < MAX_DETAILS_CHARS + 100
    assert caught.value.details.endswith(f"({100_000 - MAX_DETAILS_CHARS} more characters)")


def test_a_valid_admin_request_reaches_the_servicer_intact() -> None:
    servicer = EchoServicer()
    request = admin_pb2.PlanRequest(model="m", load=[1.0, 2.5])
    _call(guarded_handlers(ADMIN_DESCRIPTOR, servicer)["PlanPlacement"], request.SerializeToString())
    assert servicer.seen == [request]
