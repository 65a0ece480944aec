"""Read google.rpc.Status details with the real google.rpc types (not the client's private copies)."""

from __future__ import annotations

from google.rpc import error_details_pb2

KINDS = (("info", error_details_pb2.ErrorInfo), ("bad_request", error_details_pb2.BadRequest),
         ("retry", error_details_pb2.RetryInfo))


def unpacked(status) -> dict:
    """{"info": ErrorInfo, "bad_request": BadRequest, "retry": RetryInfo}, for those a google.rpc.Status holds."""
    found = {}
    for detail in status.details:
        for name, kind in KINDS:
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                found[name] = message
    return found
