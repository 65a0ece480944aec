"""gRPC server reflection under both service names clients ask for: grpc.reflection.v1 and v1alpha.

grpcio-reflection (1.85) ships only grpc_reflection.v1alpha, which serves grpc.reflection.v1alpha.ServerReflection.
Current clients (grpcurl, Postman, grpcui, recent grpc_cli) ask grpc.reflection.v1.ServerReflection first. The two
protos are the same messages under another package (grpc/reflection/v1/reflection.proto is the v1alpha file with
`package grpc.reflection.v1`: same fields, same numbers), so they are the same bytes on the wire: the v1 method
is served by the v1alpha servicer with its (de)serializers. The v1 file descriptor is derived from v1alpha's and
added to the default pool, so reflection can also describe the v1 service itself.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection as v1alpha
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2

V1ALPHA_SERVICE_NAME = v1alpha.SERVICE_NAME  # "grpc.reflection.v1alpha.ServerReflection"
V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
V1_FILE = "grpc/reflection/v1/reflection.proto"
_METHOD = "ServerReflectionInfo"


def enable_server_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serve reflection for `service_names` (the two reflection services are added) under v1 and v1alpha."""
    names = (*dict.fromkeys(service_names), V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)
    _add_v1_descriptor()
    servicer = v1alpha.aio.ReflectionServicer(names)
    for service in (V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME):
        handlers = {_METHOD: grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=v1alpha_pb2.ServerReflectionRequest.FromString,
            response_serializer=v1alpha_pb2.ServerReflectionResponse.SerializeToString,
        )}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        server.add_registered_method_handlers(service, handlers)


def _add_v1_descriptor() -> None:
    """grpc/reflection/v1/reflection.proto in the default descriptor pool (once), made from v1alpha's file."""
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(V1_FILE)
        return  # already there (a second server in this process, or a grpcio-reflection that ships v1)
    except KeyError:
        pass
    source = descriptor_pb2.FileDescriptorProto()
    v1alpha_pb2.DESCRIPTOR.CopyToProto(source)
    old_package, new_package = source.package, "grpc.reflection.v1"
    v1 = descriptor_pb2.FileDescriptorProto()
    v1.CopyFrom(source)
    v1.name = V1_FILE
    v1.package = new_package
    v1.ClearField("options")

    def renamed(type_name: str) -> str:
        prefix = f".{old_package}."
        return f".{new_package}." + type_name[len(prefix):] if type_name.startswith(prefix) else type_name

    for message in v1.message_type:
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = renamed(field.type_name)
    for service in v1.service:
        for method in service.method:
            method.input_type = renamed(method.input_type)
            method.output_type = renamed(method.output_type)
    pool.AddSerializedFile(v1.SerializeToString())
