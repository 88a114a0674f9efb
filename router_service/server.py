"""The router's gRPC server: the inference service, the standard health service and server
reflection, on one `grpc.aio` server with message size limits in both directions."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos import grpc_predict_v2_pb2 as pb
from protos import grpc_predict_v2_pb2_grpc as pb_grpc
from protos import moe_admin_pb2, moe_admin_pb2_grpc as admin_pb2_grpc
from router_service.admin_servicer import AdminOperations, AdminServicer
from router_service.router import ModelRouter
from router_service.servicer import InferenceServicer, RequestMetrics

INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
ADMIN_SERVICE = moe_admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name


@dataclass
class RouterServer:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    models: dict[str, ModelRouter]

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for model in self.models.values():
            model.ready = serving
        for service in ("", INFERENCE_SERVICE):
            await self.health.set(service, status)

    async def stop(self, grace_s: float = 5.0) -> None:
        """NOT_SERVING first, then let in-flight calls finish within `grace_s`."""
        await self.set_serving(False)
        await self.server.stop(grace_s)
        for model in self.models.values():
            await model.close()


async def start_server(
    models: dict[str, ModelRouter], host: str, port: int, max_message_bytes: int,
    admins: dict[str, AdminOperations] | None = None, serving: bool = False,
    metrics: RequestMetrics | None = None,
) -> RouterServer:
    """Bind and start; health starts NOT_SERVING until `set_serving(True)` (or SERVING at
    once with `serving`). With `admins`, the admin service (load, placement, rebalance) is
    served on the same port; with `metrics`, every inference request is counted there."""
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
    ])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(models, metrics), server)
    services = [INFERENCE_SERVICE]
    if admins is not None:
        admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(admins), server)
        services.append(ADMIN_SERVICE)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind the gRPC server to {host}:{port} (port in use?)")
    result = RouterServer(server, health_servicer, bound, models)
    await result.set_serving(serving)  # before the port opens: the first request sees it
    await server.start()
    return result
