"""The router's gRPC server: the inference service, the admin service, the standard health
service and server reflection, on one `grpc.aio` server with message size limits in both
directions, optionally TLS and bearer tokens (`router_service.security`).

The inference and admin services are registered through `guarded_handlers`, one wrapper for
every method of both, built from the service descriptors:

- the handler receives the raw bytes and parses them itself, so bytes that are not the
  method's request message are INVALID_ARGUMENT naming the message type (grpcio's own
  deserializer would answer INTERNAL, "Exception deserializing request!"); for the
  bidirectional stream (`ModelStreamInfer`) each message is parsed as it is read, and one that
  does not parse ends the stream so (the servicer must let an exception from its request
  iterator end the call, as `stream_merge.serve_concurrently` does);
- an exception that escapes a servicer is logged with its traceback and answered INTERNAL,
  "<method> failed inside the server; see the server log" (grpcio would send its text to the
  client, as UNKNOWN);
- status details longer than `MAX_DETAILS_CHARS` are cut (an error echoing a huge input would
  otherwise overflow the trailers, and the client would see RESOURCE_EXHAUSTED instead).

Health and reflection are registered as their packages provide them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import grpc
import torch
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cluster.config import is_loopback_host
from protos import grpc_predict_v2_pb2 as pb
from protos import moe_admin_pb2
from router_service.admin_servicer import AdminOperations, AdminServicer
from router_service.router import ModelRouter
from router_service.security import ServerSecurity
from router_service.servicer import InferenceServicer, RequestMetrics
from router_service.shm import SharedMemoryOff, SharedMemoryRegistry

if TYPE_CHECKING:
    from cluster.config import SecurityConfig

log = logging.getLogger(__name__)

INFERENCE_DESCRIPTOR = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
ADMIN_DESCRIPTOR = moe_admin_pb2.DESCRIPTOR.services_by_name["AdminService"]
INFERENCE_SERVICE = INFERENCE_DESCRIPTOR.full_name
ADMIN_SERVICE = ADMIN_DESCRIPTOR.full_name
MAX_DETAILS_CHARS = 2000


def _bounded(details: str) -> str:
    if len(details) <= MAX_DETAILS_CHARS:
        return details
    return f"{details[:MAX_DETAILS_CHARS]}... ({len(details) - MAX_DETAILS_CHARS} more characters)"


class _BoundedContext:
    """The servicer's context, with `abort` details cut to `MAX_DETAILS_CHARS`."""

    def __init__(self, context: grpc.aio.ServicerContext):
        self._context = context

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata=()) -> None:
        await self._context.abort(code, _bounded(details), trailing_metadata)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def _parse_error(err: Exception) -> str:
    """protobuf's "Error parsing message with type 'x': why" -> "why"."""
    return str(err).rpartition("': ")[2] or type(err).__name__


def _guarded(method: MethodDescriptor, behaviour: Callable[[Any, Any], Awaitable[Any]]):
    request_type = message_factory.GetMessageClass(method.input_type)
    type_name, method_name = method.input_type.full_name, method.name

    async def handle(raw: bytes, context: grpc.aio.ServicerContext):
        try:
            request = request_type.FromString(raw)
        except Exception as err:  # protobuf's DecodeError; whatever it raises, the bytes are at fault
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"request is not a valid {type_name} protobuf: {_parse_error(err)}")
        try:
            return await behaviour(request, _BoundedContext(context))
        except grpc.aio.AbortError:  # the servicer chose the status
            raise
        except Exception:
            log.exception("%s failed", method.full_name)
            await context.abort(grpc.StatusCode.INTERNAL, f"{method_name} failed inside the server; see the server log")

    return handle


def _guarded_stream(method: MethodDescriptor, behaviour: Callable[[AsyncIterator[Any], Any], AsyncIterator[Any]]):
    """`_guarded` for a bidirectional stream: `behaviour(requests, context)` gets the parsed
    requests as an async iterator and yields the responses."""
    request_type = message_factory.GetMessageClass(method.input_type)
    type_name, method_name = method.input_type.full_name, method.name

    async def handle(raw_requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext):
        async def requests():
            async for raw in raw_requests:
                try:
                    request = request_type.FromString(raw)
                except Exception as err:  # as in `_guarded`: the bytes are at fault
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"request is not a valid {type_name} protobuf: {_parse_error(err)}")
                yield request

        try:
            async for response in behaviour(requests(), _BoundedContext(context)):
                yield response
        except grpc.aio.AbortError:  # the servicer (or a message that did not parse) chose the status
            raise
        except Exception:
            log.exception("%s failed", method.full_name)
            await context.abort(grpc.StatusCode.INTERNAL, f"{method_name} failed inside the server; see the server log")

    return handle


def guarded_handlers(service: ServiceDescriptor, servicer: object) -> dict[str, grpc.RpcMethodHandler]:
    """A raw-bytes handler for every method of `service`, calling `servicer.<Method>`: unary
    methods, and bidirectional streams (TypeError for a method that streams one way only)."""
    handlers = {}
    for method in service.methods:
        response_type = message_factory.GetMessageClass(method.output_type)
        behaviour = getattr(servicer, method.name)
        if method.client_streaming and method.server_streaming:
            make, handle = grpc.stream_stream_rpc_method_handler, _guarded_stream(method, behaviour)
        elif method.client_streaming or method.server_streaming:
            raise TypeError(f"{method.full_name} streams one way only; guarded_handlers serves unary methods "
                            f"and bidirectional streams")
        else:
            make, handle = grpc.unary_unary_rpc_method_handler, _guarded(method, behaviour)
        handlers[method.name] = make(
            handle,
            request_deserializer=None,  # the handler gets the bytes and parses them itself
            response_serializer=response_type.SerializeToString,
        )
    return handlers


def _add_guarded(server: grpc.aio.Server, service: ServiceDescriptor, servicer: object) -> None:
    handlers = guarded_handlers(service, servicer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


class HttpFace(Protocol):
    """The OpenAI-compatible HTTP server beside the gRPC port (`router_service.openai_http`)."""

    port: int

    async def set_serving(self, serving: bool) -> None: ...
    async def stop(self, grace_s: float) -> None: ...


@dataclass
class RouterServer:
    """The gRPC server, and the HTTP server beside it when the model generates text (`http`):
    health, drain and stop cover both."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    models: dict[str, ModelRouter]
    http: HttpFace | None = None
    shared_memory: SharedMemoryRegistry | SharedMemoryOff = field(default_factory=SharedMemoryOff)
    _stopped: bool = field(default=False, repr=False)

    async def set_health(self, serving: bool) -> None:
        """What the health service says, for the server and the inference service."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", INFERENCE_SERVICE):
            await self.health.set(service, status)
        if self.http is not None:
            await self.http.set_serving(serving)

    async def set_serving(self, serving: bool) -> None:
        """Health and the models' readiness: not ready, inference answers UNAVAILABLE."""
        for model in self.models.values():
            model.ready = serving
        await self.set_health(serving)

    async def drain(self, drain_s: float, grace_s: float, say: Callable[[str], None] = log.info,
                    cut_short: asyncio.Event | None = None) -> None:
        """Leave service gracefully: health NOT_SERVING at once while requests are still
        served for `drain_s` (load balancers notice and stop sending; `cut_short` set ends
        the window early), then `stop(grace_s)`: new requests are refused (UNAVAILABLE) and
        those in flight get `grace_s` to finish. `say` hears each step."""
        await self.set_health(False)
        for model in self.models.values():
            model.draining = True  # ServerReady / ModelReady say no too
        say(f"draining: health NOT_SERVING; requests are still served for {drain_s:g}s while load balancers notice")
        if drain_s > 0 and cut_short is None:
            await asyncio.sleep(drain_s)
        elif drain_s > 0:
            try:
                await asyncio.wait_for(cut_short.wait(), drain_s)
                say("drain window cut short")
            except asyncio.TimeoutError:
                pass
        say(f"stopping: new requests refused; requests in flight get up to {grace_s:g}s to finish")
        await self.stop(grace_s)

    async def stop(self, grace_s: float = 5.0) -> None:
        """NOT_SERVING first, then let in-flight calls finish within `grace_s`. Once only:
        a second call returns at once."""
        if self._stopped:
            return
        self._stopped = True
        await self.set_serving(False)
        if self.http is not None:
            await asyncio.gather(self.server.stop(grace_s), self.http.stop(grace_s))
        else:
            await self.server.stop(grace_s)
        self.shared_memory.close()  # every region is unmapped once the calls are done
        for model in self.models.values():
            await model.close()


def _bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


async def start_server(
    models: dict[str, ModelRouter], host: str, port: int, max_message_bytes: int,
    admins: dict[str, AdminOperations] | None = None, serving: bool = False,
    metrics: RequestMetrics | None = None, security: SecurityConfig | None = None, reuse_port: bool = False,
    shared_memory: bool = False,
) -> RouterServer:
    """Bind and start; health starts NOT_SERVING until `set_serving(True)` (or SERVING at
    once with `serving`). With `admins`, the admin service (load, placement, rebalance) is
    served on the same port; with `metrics`, every inference request is counted there; with
    `security`, its files are read now (ValueError naming the key and path) and the port
    speaks TLS and checks tokens as it says. `reuse_port`: other routers of the model may bind
    the same port on this node (SO_REUSEPORT: the kernel spreads the connections); otherwise a
    port in use is an error. `shared_memory`: serve the system shared memory extension (the
    caller has checked the host, `cluster.config.RouterConfig`)."""
    secured = ServerSecurity.load(security)
    if not is_loopback_host(host) and secured.credentials is None and not secured.policy.open:
        log.warning("router on %s without TLS: bearer tokens cross the network in plaintext "
                    "(set security.tls_cert_file and security.tls_key_file)", host)
    server = grpc.aio.server(interceptors=secured.interceptors(), options=[
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 1 if reuse_port else 0),  # several routers of one model on one node
    ])
    regions = SharedMemoryRegistry() if shared_memory else SharedMemoryOff()
    _add_guarded(server, INFERENCE_DESCRIPTOR, InferenceServicer(models, metrics, regions, torch.cuda.is_available()))
    services = [INFERENCE_SERVICE]
    if admins is not None:
        _add_guarded(server, ADMIN_DESCRIPTOR, AdminServicer(admins))
        services.append(ADMIN_SERVICE)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    address = _bind_address(host, port)
    if secured.credentials is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, secured.credentials)
    if bound == 0:
        raise OSError(f"cannot bind the gRPC server to {address} (port in use?)")
    result = RouterServer(server, health_servicer, bound, models, shared_memory=regions)
    await result.set_serving(serving)  # before the port opens: the first request sees it
    await server.start()
    return result
