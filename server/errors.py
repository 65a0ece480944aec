"""Domain errors, the one table that maps them to gRPC status codes, and the helpers that apply it.

Core code (recommender, validation, session) raises these exceptions and never sees gRPC; the servicer turns
them into a status with `status_for` and `abort_with`. Anything else that escapes is a bug: it is logged with
its traceback and the caller gets INTERNAL with a generic message (no internals leak to clients).
"""

from __future__ import annotations

import logging

import grpc

logger = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error; the server log has the details"


class ServiceError(Exception):
    """A request the server can explain: the message is shown to the caller as is, so keep it readable."""


class InvalidArgument(ServiceError):
    """The request is malformed or breaks a documented limit."""


class NotFound(ServiceError):
    """The request names something (an item id) the server does not have."""


class Unavailable(ServiceError):
    """The server cannot answer yet (model still loading) or any more (shutting down)."""


class DeadlineExceeded(ServiceError):
    """Something took too long, e.g. a Session that stayed idle past the idle timeout."""


class ResourceExhausted(ServiceError):
    """A server-wide limit is reached (e.g. the most live sessions); retrying later may succeed."""


class FailedPrecondition(ServiceError):
    """The server is not set up for this request (e.g. catalogue changes without a state directory)."""


class Aborted(ServiceError):
    """The operation was ended by another one, e.g. a Session dropped by ForgetSession."""


# The one mapping from domain errors to gRPC codes. Subclasses map through their nearest listed base.
STATUS_CODES: dict[type[ServiceError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Aborted: grpc.StatusCode.ABORTED,
}


def status_for(error: BaseException, method: str = "") -> tuple[grpc.StatusCode, str]:
    """The status code and caller-facing message for an exception; unexpected ones are logged here."""
    if isinstance(error, ServiceError):
        for cls in type(error).__mro__:
            if cls in STATUS_CODES:
                return STATUS_CODES[cls], str(error)
    logger.error("unexpected error in %s", method or "a request", exc_info=error)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


def code_number(code: grpc.StatusCode) -> int:
    """The google.rpc.Code number of a status code (0 OK, 3 INVALID_ARGUMENT, 5 NOT_FOUND, ...)."""
    return int(code.value[0])


async def abort_with(context: grpc.aio.ServicerContext, error: BaseException, method: str = "") -> None:
    """End the RPC with the status for `error`. Always raises (grpc.aio's AbortError)."""
    code, message = status_for(error, method)
    await context.abort(code, message)
