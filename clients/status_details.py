"""Read the rich error details an llmrec server sends: a google.rpc.Status, in the `grpc-status-details-bin`
trailer of a failed call, or per entry of a RecommendBatch response.

The google.rpc messages come from googleapis-common-protos, which the client installs anyway (the stubs import
google.rpc.status_pb2 for RecommendBatch); grpcio-status, a server dependency, is not needed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from google.rpc import error_details_pb2, status_pb2

DETAILS_METADATA_KEY = "grpc-status-details-bin"


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


def status_details(status: status_pb2.Status) -> StatusDetails:
    """The details of a google.rpc.Status; detail types other than ErrorInfo, BadRequest, RetryInfo are skipped."""
    reason = domain = ""
    metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    retry_after_s = None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            request = error_details_pb2.BadRequest()
            detail.Unpack(request)
            violations.extend(FieldViolation(v.field, v.description) for v in request.field_violations)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after_s = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
    return StatusDetails(reason, domain, metadata, tuple(violations), retry_after_s)


def parse_status_details(status_bytes: bytes) -> StatusDetails:
    """The details of a serialized google.rpc.Status.

    Raises:
        google.protobuf.message.DecodeError: the bytes are not a Status.
    """
    return status_details(status_pb2.Status.FromString(status_bytes))


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
