"""Which gRPC services an address serves, by server reflection: how the client tells a user
who dialed a stage or the decoder that they need the coordinator.

Every ditserve server registers reflection (grpc.reflection.v1alpha). The client keeps its
dependencies to grpcio and protobuf, so the two messages it needs are declared here from
their descriptors (reflection.proto, fields `list_services` = 7, `list_services_response` =
6, `service` = 1, `name` = 1) rather than importing grpcio-reflection. There the request's
`list_services` lives in a oneof, which this declaration leaves out: it sends "*" (the
server ignores the content) so that the field is on the wire.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

METHOD = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
ROLES = {"dit.v1.CoordinatorService": "the coordinator",
         "dit.v1.StageService": "a pipeline stage",
         "dit.v1.DecoderService": "the VAE decoder"}


def _message_classes() -> tuple[Any, Any]:
    F = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="ditserve_reflection_client.proto",
                                              package="grpc.reflection.v1alpha", syntax="proto3")

    def message(name: str, *fields: tuple[str, int, int, int, str]) -> None:
        msg = file.message_type.add(name=name)
        for field_name, number, kind, label, type_name in fields:
            field = msg.field.add(name=field_name, number=number, type=kind, label=label)
            if type_name:
                field.type_name = type_name

    one, many = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    message("ServerReflectionRequest", ("list_services", 7, F.TYPE_STRING, one, ""))
    message("ServiceResponse", ("name", 1, F.TYPE_STRING, one, ""))
    message("ListServiceResponse", ("service", 1, F.TYPE_MESSAGE, many, ".grpc.reflection."
                                    "v1alpha.ServiceResponse"))
    message("ServerReflectionResponse", ("list_services_response", 6, F.TYPE_MESSAGE, one,
                                         ".grpc.reflection.v1alpha.ListServiceResponse"))
    pool = descriptor_pool.DescriptorPool()  # private: never clashes with grpcio-reflection
    described = pool.Add(file)
    return (message_factory.GetMessageClass(described.message_types_by_name[name])
            for name in ("ServerReflectionRequest", "ServerReflectionResponse"))


Request, Response = _message_classes()


def _call(channel: Any) -> Any:
    return channel.stream_stream(METHOD, request_serializer=Request.SerializeToString,
                                 response_deserializer=Response.FromString)


def list_services(channel: grpc.Channel, timeout: float = 5.0) -> list[str]:
    """The services `channel`'s server offers (empty when it has no reflection)."""
    try:
        for response in _call(channel)(iter([Request(list_services="*")]), timeout=timeout):
            return [s.name for s in response.list_services_response.service]
    except grpc.RpcError:
        pass
    return []


async def list_services_async(channel: grpc.aio.Channel, timeout: float = 5.0) -> list[str]:
    """`list_services` on an asyncio channel."""
    try:
        async for response in _call(channel)(iter([Request(list_services="*")]),
                                             timeout=timeout):
            return [s.name for s in response.list_services_response.service]
    except grpc.RpcError:
        pass
    return []


def not_the_coordinator(target: str, services: list[str]) -> str:
    """Why an UNIMPLEMENTED answer came back: what `target` serves instead."""
    ours = [s for s in services if s.startswith("dit.v1.")]
    if ours:
        what = ", ".join(f"{s} ({ROLES.get(s, 'a ditserve service')})" for s in ours)
        serves = f"{target} serves {what}"
    elif services:
        serves = f"{target} serves {', '.join(services)}, no ditserve service"
    else:
        serves = f"{target} does not serve the coordinator API (and offers no reflection)"
    return (f"{serves}; this client needs the coordinator (dit.v1.CoordinatorService): "
            "give its address, the one `ditserve up` prints")
