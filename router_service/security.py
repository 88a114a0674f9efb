"""Who may call the router's gRPC port: TLS credentials and bearer tokens, both ends.

Server side (`security:` in the YAML, `cluster.config.SecurityConfig`):

- TLS: `tls_cert_file` + `tls_key_file` make the port TLS-only; with `tls_client_ca_file` every
  client must also present a certificate that CA signed (mutual TLS).
- Tokens: metadata `authorization: Bearer <token>`, checked by `TokenInterceptor` before any
  servicer sees the call. What a call needs (`required_access`):

  | service                              | needs, once that kind of token is configured        |
  |--------------------------------------|-----------------------------------------------------|
  | `grpc.health.v1.Health`              | nothing, ever (load balancers probe without secrets)|
  | `moe.admin.v1.AdminService`          | an admin token                                      |
  | everything else: inference, reflection | an inference token or an admin token              |

  The shared memory extension's RPCs (`SystemSharedMemoryRegister`, ...) are inference calls, as
  in Triton: a client registers memory of its own to send its tensors through.
  A missing, malformed or unknown token is UNAUTHENTICATED; an inference token on an admin call
  is PERMISSION_DENIED. Reflection is treated like inference: it describes the API, which the
  clients that may call it already know, and nobody else needs it.
  A token is compared with `hmac.compare_digest` against every configured token.

The decision (`TokenPolicy.check`) is pure. Files are read once, when the server starts
(`ServerSecurity.load`), and a file that cannot be used is refused naming its key and path.

Client side: `ClientCredentials` builds the channel: TLS (a CA file, optionally a client
certificate and key) and the token as call credentials; over plaintext (a loopback server
without TLS) the token travels as metadata added by a client interceptor, since gRPC sends
call credentials only over secure channels.
"""

from __future__ import annotations

import collections
import enum
import hmac
import logging
import re
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from protos import moe_admin_pb2

if TYPE_CHECKING:
    from cluster.config import SecurityConfig

log = logging.getLogger(__name__)

HEALTH_SERVICE = "grpc.health.v1.Health"
ADMIN_SERVICE = moe_admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
MIN_TOKEN_CHARS = 16
_TOKEN = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")  # RFC 6750 b64token: what fits in `Bearer <token>`


class Access(enum.Enum):
    OPEN = "open"
    INFERENCE = "inference"
    ADMIN = "admin"


def required_access(method: str) -> Access:
    """method: `/package.Service/Method`, as gRPC names it."""
    service = method.lstrip("/").partition("/")[0]
    if service == HEALTH_SERVICE:
        return Access.OPEN
    if service == ADMIN_SERVICE:
        return Access.ADMIN
    return Access.INFERENCE


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the first `authorization` entry: None without one, "" when it is not
    `Bearer <token>` (any case of `Bearer`)."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, token = value.strip().partition(" ")
        return token.strip() if scheme.lower() == "bearer" else ""
    return None


@dataclass(frozen=True)
class Denial:
    code: grpc.StatusCode
    message: str


def _known(token: str, tokens: Sequence[str]) -> bool:
    """Constant time in the token's content, and every configured token is compared."""
    candidate = token.encode()
    found = False
    for known in tokens:
        found |= hmac.compare_digest(candidate, known.encode())
    return found


@dataclass(frozen=True)
class TokenPolicy:
    """Which bearer tokens a call needs. No tokens of a kind: calls of that kind are open."""

    inference_tokens: tuple[str, ...] = ()
    admin_tokens: tuple[str, ...] = ()

    def __repr__(self) -> str:  # never the tokens themselves
        return f"TokenPolicy(inference_tokens={len(self.inference_tokens)}, admin_tokens={len(self.admin_tokens)})"

    @property
    def open(self) -> bool:
        return not self.inference_tokens and not self.admin_tokens

    def check(self, method: str, token: str | None) -> Denial | None:
        """None: let the call through. token: what `bearer_token` found."""
        access = required_access(method)
        if access is Access.OPEN:
            return None
        needed = self.admin_tokens if access is Access.ADMIN else self.inference_tokens
        if not needed:
            return None
        what = access.value
        if token is None:
            return Denial(grpc.StatusCode.UNAUTHENTICATED,
                          f"{what} calls need a bearer token: send metadata 'authorization: Bearer <token>'")
        if not token:
            return Denial(grpc.StatusCode.UNAUTHENTICATED,
                          "the 'authorization' metadata must be 'Bearer <token>'")
        if _known(token, self.admin_tokens):
            return None  # an admin token may do everything
        if access is Access.INFERENCE and _known(token, self.inference_tokens):
            return None
        if access is Access.ADMIN and _known(token, self.inference_tokens):
            return Denial(grpc.StatusCode.PERMISSION_DENIED,
                          "this is an inference token; admin calls need an admin token (security.admin_tokens_file)")
        return Denial(grpc.StatusCode.UNAUTHENTICATED, f"the bearer token is not valid for {what} calls on this server")


def _refusing(handler: grpc.RpcMethodHandler, denial: Denial) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers `denial` and reads nothing."""

    async def refuse(request, context):
        await context.abort(denial.code, denial.message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Applies a `TokenPolicy` to every call before its servicer runs."""

    def __init__(self, policy: TokenPolicy):
        self._policy = policy

    def __repr__(self) -> str:
        return f"TokenInterceptor({self._policy!r})"

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:  # no such method: UNIMPLEMENTED, nothing to protect
            return None
        denial = self._policy.check(handler_call_details.method, bearer_token(handler_call_details.invocation_metadata))
        if denial is None:
            return handler
        log.debug("refused %s: %s", handler_call_details.method, denial.code.name)
        return _refusing(handler, denial)


# ---- the server's files, read once -------------------------------------------------------------


def _read_file(path: str, key: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise ValueError(f"security.{key}: cannot read {path}: {err.strerror or err}") from None


def read_tokens(path: str, key: str) -> tuple[str, ...]:
    """One token per line; blank lines and lines starting with '#' are skipped. ValueError
    naming `key`, `path` and the line (never the token) when a line is not a usable token."""
    try:
        text = _read_file(path, key).decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"security.{key}: {path} is not a text file of tokens") from None
    tokens = []
    for number, line in enumerate(text.splitlines(), start=1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if not _TOKEN.match(token):
            raise ValueError(f"security.{key}: line {number} of {path} is not a token: use letters, digits "
                             f"and -._~+/ only (no spaces), one token per line")
        if len(token) < MIN_TOKEN_CHARS:
            raise ValueError(f"security.{key}: the token on line {number} of {path} has {len(token)} characters; "
                             f"use at least {MIN_TOKEN_CHARS} (e.g. `openssl rand -hex 32`)")
        tokens.append(token)
    if not tokens:
        raise ValueError(f"security.{key}: {path} holds no tokens (one per line; '#' starts a comment)")
    return tuple(dict.fromkeys(tokens))


def _no_passphrase() -> bytes:
    raise ValueError("encrypted")


def _check_tls_files(cert: str, key: str, client_ca: str | None) -> None:
    """The stdlib's OpenSSL parses the files now, so a mistake is named at start and not at
    the first handshake."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=_no_passphrase)
    except ValueError:
        raise ValueError(f"security.tls_key_file: {key} is encrypted; give the key unencrypted "
                         f"(the server cannot ask for a passphrase)") from None
    except ssl.SSLError as err:
        raise ValueError(f"security.tls_cert_file ({cert}) and security.tls_key_file ({key}) are not a PEM "
                         f"certificate and its private key: {err.reason or err}") from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except ssl.SSLError as err:
            raise ValueError(f"security.tls_client_ca_file: {client_ca} holds no PEM CA certificate: "
                             f"{err.reason or err}") from None


@dataclass(frozen=True)
class ServerSecurity:
    """credentials: None for a plaintext port."""

    credentials: grpc.ServerCredentials | None = None
    policy: TokenPolicy = TokenPolicy()
    mutual_tls: bool = False

    @classmethod
    def load(cls, config: SecurityConfig | None) -> ServerSecurity:
        """Read every file `config` names, now. ValueError naming the key and path."""
        if config is None:
            return cls()
        credentials = None
        if config.tls_cert_file is not None:
            cert = _read_file(config.tls_cert_file, "tls_cert_file")
            key = _read_file(config.tls_key_file, "tls_key_file")
            ca = None if config.tls_client_ca_file is None else _read_file(config.tls_client_ca_file, "tls_client_ca_file")
            _check_tls_files(config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file)
            credentials = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)
        inference = () if config.inference_tokens_file is None else read_tokens(config.inference_tokens_file, "inference_tokens_file")
        admin = () if config.admin_tokens_file is None else read_tokens(config.admin_tokens_file, "admin_tokens_file")
        if set(inference) & set(admin):
            raise ValueError(
                f"security.inference_tokens_file ({config.inference_tokens_file}) and security.admin_tokens_file "
                f"({config.admin_tokens_file}) share a token: an admin token must not be handed out for inference"
            )
        return cls(credentials, TokenPolicy(inference, admin), mutual_tls=config.tls_client_ca_file is not None)

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [] if self.policy.open else [TokenInterceptor(self.policy)]


# ---- clients --------------------------------------------------------------------------------


class _CallDetails(
    collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
    grpc.ClientCallDetails,
):
    pass


class _BearerMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call of a plaintext channel."""

    def __init__(self, token: str):
        self._entry = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> _CallDetails:
        return _CallDetails(details.method, details.timeout, [*(details.metadata or ()), self._entry],
                            details.credentials, details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)


def _read_client_file(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise ValueError(f"cannot read the {what} {path}: {err.strerror or err}") from None


@dataclass(frozen=True)
class ClientCredentials:
    """How a client reaches a router. The default is what an unsecured loopback server needs:
    plaintext, no token.

    ca_cert_file: PEM CA that signed the server's certificate (implies TLS); tls: TLS with the
    system's root CAs when there is no ca_cert_file; client_cert_file + client_key_file: for a
    server that wants client certificates (mutual TLS); token: the bearer token.
    """

    ca_cert_file: str | None = None
    client_cert_file: str | None = None
    client_key_file: str | None = None
    token: str | None = None
    tls: bool = False

    def __post_init__(self) -> None:
        if (self.client_cert_file is None) != (self.client_key_file is None):
            raise ValueError("a client certificate needs its key and a key its certificate: "
                             f"got client cert {self.client_cert_file!r}, client key {self.client_key_file!r}")
        if self.token is not None and not _TOKEN.match(self.token):
            raise ValueError("the token must be one word of letters, digits and -._~+/ (no spaces or newlines)")

    def __repr__(self) -> str:
        token = None if self.token is None else "***"
        return (f"ClientCredentials(ca_cert_file={self.ca_cert_file!r}, client_cert_file={self.client_cert_file!r}, "
                f"token={token}, tls={self.uses_tls})")

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.ca_cert_file is not None or self.client_cert_file is not None

    def channel(self, address: str, options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
        """A blocking channel to `address`; ValueError naming a file that cannot be read."""
        options = list(options)
        if not self.uses_tls:
            channel = grpc.insecure_channel(address, options=options)
            return channel if self.token is None else grpc.intercept_channel(channel, _BearerMetadata(self.token))
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read_client_file(self.ca_cert_file, "CA certificate (--ca-cert)"),
            private_key=_read_client_file(self.client_key_file, "client key (--client-key)"),
            certificate_chain=_read_client_file(self.client_cert_file, "client certificate (--client-cert)"),
        )
        if self.token is not None:
            credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(self.token))
        return grpc.secure_channel(address, credentials, options=options)


# ---- the OpenAI-compatible HTTP port (`router_service.openai_http`) ----------------------------

HTTP_INFERENCE_METHOD = "/openai.v1/Generate"  # what a /v1 call is to `TokenPolicy`: inference access


def http_denial(policy: TokenPolicy, authorization: str | None) -> str | None:
    """Why an HTTP /v1 call with this `Authorization` header value is refused (HTTP 401), or
    None to let it through. The same rule as an inference call on the gRPC port: a token is
    needed once inference tokens are configured, and an admin token also serves."""
    token = bearer_token(() if authorization is None else [("authorization", authorization)])
    denial = policy.check(HTTP_INFERENCE_METHOD, token)
    if denial is None:
        return None
    if token is None:
        return "this server needs a bearer token: send the header 'Authorization: Bearer <token>'"
    if not token:
        return "the Authorization header must be 'Bearer <token>'"
    return denial.message


def http_ssl_context(config: SecurityConfig | None) -> ssl.SSLContext | None:
    """The TLS context of the HTTP port from the same keys as the gRPC port's (None: plaintext):
    the server certificate and key, and with `tls_client_ca_file` a client certificate that CA
    signed is required (mutual TLS). ValueError naming the key and path of an unusable file."""
    if config is None or config.tls_cert_file is None:
        return None
    _check_tls_files(config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.tls_cert_file, config.tls_key_file, password=_no_passphrase)
    if config.tls_client_ca_file is not None:
        context.load_verify_locations(cafile=config.tls_client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
