"""Read the rich error details an llmrec server sends (google.rpc.Status in `grpc-status-details-bin`).

The client install depends on grpcio and protobuf only, not on googleapis-common-protos, so the few google.rpc
messages read here (Status, ErrorInfo, BadRequest, RetryInfo) are declared in a private descriptor pool: the
same wire format, and no clash with the real google.rpc modules when a program imports those too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, duration_pb2, message_factory

DETAILS_METADATA_KEY = "grpc-status-details-bin"
_F = descriptor_pb2.FieldDescriptorProto


@dataclasses.dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request: its path ("history[3].item_id", "k") and what is wrong with it."""

    field: str
    description: str


@dataclasses.dataclass(frozen=True)
class StatusDetails:
    """What a google.rpc.Status carries besides code and message (empty values when absent)."""

    reason: str = ""
    domain: str = ""
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    field_violations: tuple[FieldViolation, ...] = ()
    retry_after_s: float | None = None


def _field(name: str, number: int, kind: int, type_name: str = "", repeated: bool = False) -> _F:
    field = _F(name=name, number=number, type=kind,
               label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL)
    if type_name:
        field.type_name = type_name
    return field


def _message_classes() -> dict[str, Any]:
    pool = descriptor_pool.DescriptorPool()
    for dependency in (any_pb2, duration_pb2):
        pool.AddSerializedFile(dependency.DESCRIPTOR.serialized_pb)
    file = descriptor_pb2.FileDescriptorProto(
        name="llmrec/clients/google_rpc_subset.proto", package="google.rpc", syntax="proto3",
        dependency=["google/protobuf/any.proto", "google/protobuf/duration.proto"])
    file.message_type.add(name="Status", field=[
        _field("code", 1, _F.TYPE_INT32), _field("message", 2, _F.TYPE_STRING),
        _field("details", 3, _F.TYPE_MESSAGE, ".google.protobuf.Any", repeated=True)])
    info = file.message_type.add(name="ErrorInfo", field=[
        _field("reason", 1, _F.TYPE_STRING), _field("domain", 2, _F.TYPE_STRING),
        _field("metadata", 3, _F.TYPE_MESSAGE, ".google.rpc.ErrorInfo.MetadataEntry", repeated=True)])
    entry = info.nested_type.add(name="MetadataEntry", field=[
        _field("key", 1, _F.TYPE_STRING), _field("value", 2, _F.TYPE_STRING)])
    entry.options.map_entry = True
    request = file.message_type.add(name="BadRequest", field=[
        _field("field_violations", 1, _F.TYPE_MESSAGE, ".google.rpc.BadRequest.FieldViolation", repeated=True)])
    request.nested_type.add(name="FieldViolation", field=[
        _field("field", 1, _F.TYPE_STRING), _field("description", 2, _F.TYPE_STRING),
        _field("reason", 3, _F.TYPE_STRING)])
    file.message_type.add(name="RetryInfo", field=[
        _field("retry_delay", 1, _F.TYPE_MESSAGE, ".google.protobuf.Duration")])
    pool.AddSerializedFile(file.SerializeToString())
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"google.rpc.{name}"))
            for name in ("Status", "ErrorInfo", "BadRequest", "RetryInfo")}


_CLASSES: dict[str, Any] | None = None


def parse_status_details(status_bytes: bytes) -> StatusDetails:
    """The details of a serialized google.rpc.Status; unknown detail types are skipped.

    Raises:
        google.protobuf.message.DecodeError: the bytes are not a Status.
    """
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _message_classes()
    status = _CLASSES["Status"].FromString(status_bytes)
    reason = domain = ""
    metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    retry_after_s = None
    for detail in status.details:
        kind = detail.type_url.rsplit("/", 1)[-1]
        if kind == "google.rpc.ErrorInfo":
            info = _CLASSES["ErrorInfo"].FromString(detail.value)
            reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
        elif kind == "google.rpc.BadRequest":
            violations.extend(FieldViolation(v.field, v.description)
                              for v in _CLASSES["BadRequest"].FromString(detail.value).field_violations)
        elif kind == "google.rpc.RetryInfo":
            delay = _CLASSES["RetryInfo"].FromString(detail.value).retry_delay
            retry_after_s = delay.seconds + delay.nanos / 1e9
    return StatusDetails(reason, domain, metadata, tuple(violations), retry_after_s)


def details_of(error: Any) -> StatusDetails:
    """The rich details of a grpc.RpcError (a grpc.Call); empty ones when it has none or they cannot be read."""
    try:
        trailing = error.trailing_metadata() or ()
    except Exception:  # noqa: BLE001 - not a Call (e.g. a channel error raised before any call)
        return StatusDetails()
    for key, value in trailing:
        if key == DETAILS_METADATA_KEY and isinstance(value, bytes):
            try:
                return parse_status_details(value)
            except Exception:  # noqa: BLE001 - malformed details must not hide the error itself
                return StatusDetails()
    return StatusDetails()
