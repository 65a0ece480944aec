"""Domain errors, the one table that maps them to gRPC status codes, and the helpers that apply it.

Core code (recommender, validation, session) raises these exceptions and never sees gRPC; the servicer turns
them into a status with `rich_status` and `abort_with`. Anything else that escapes is a bug: it is logged with
its traceback and the caller gets INTERNAL with a generic message (no internals leak to clients).

Every error status carries, besides its human message, a google.rpc.Status with details (grpcio-status):
    ErrorInfo   always: reason (UPPER_SNAKE, stable, for programs), domain "llmrec.v1", metadata (bounded);
    BadRequest  on INVALID_ARGUMENT that names a field: one field violation with its path ("history[3].item_id");
    RetryInfo   on RESOURCE_EXHAUSTED, and on UNAVAILABLE where retrying can succeed: the delay to wait first.
Everything the status carries is bounded (ERROR_MESSAGE_BYTES, ERROR_METADATA_BYTES, SHOWN_ID_CHARS): gRPC sends
it as trailing metadata, and metadata past the receiver's limit turns the call into RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

logger = logging.getLogger(__name__)

DOMAIN = "llmrec.v1"
INTERNAL_MESSAGE = "internal error; the server log has the details"

# Bounds on what one status carries (UTF-8 bytes). The message travels twice: as grpc-message (percent-encoded:
# up to 3x) and inside grpc-status-details-bin (base64: 4/3x) with the details. At worst about 6 KiB together,
# under gRPC's default 8 KiB metadata limit.
ERROR_MESSAGE_BYTES = 800
ERROR_FIELD_BYTES = 200       # a field path
ERROR_VIOLATION_BYTES = 300   # a field violation's description (the message, cut)
ERROR_METADATA_BYTES = 1024   # all ErrorInfo metadata keys and values together
SHOWN_ID_CHARS = 64  # an id echoed in a message is cut to this many characters, then "…"


class ServiceError(Exception):
    """A request the server can explain: the message is shown to the caller as is, so keep it readable.

    Args:
        message: the human explanation (bounded to ERROR_MESSAGE_BYTES when sent).
        field: the request field at fault, as a path ("history[3].item_id", "k"); INVALID_ARGUMENT sends it as a
            BadRequest field violation.
        reason: ErrorInfo.reason, UPPER_SNAKE; None = the class's default in ERROR_TABLE.
        metadata: ErrorInfo.metadata (string values; bounded when sent).
        retry_after_s: RetryInfo.retry_delay; None = the class's default in ERROR_TABLE (none for most).
    """

    def __init__(self, message: str, *, field: str | None = None, reason: str | None = None,
                 metadata: Mapping[str, str] | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.reason = reason
        self.metadata = dict(metadata or {})
        self.retry_after_s = retry_after_s


class InvalidArgument(ServiceError):
    """The request is malformed or breaks a documented limit."""


class NotFound(ServiceError):
    """The request names something (an item id) the server does not have."""


class Unavailable(ServiceError):
    """The server cannot answer yet (model still loading) or any more (shutting down, storage broken)."""


class DeadlineExceeded(ServiceError):
    """Something took too long, e.g. a Session that stayed idle past the idle timeout."""


class ResourceExhausted(ServiceError):
    """A server-wide limit is reached (e.g. the most live sessions); retrying later may succeed."""


class FailedPrecondition(ServiceError):
    """The server is not set up for this request (e.g. catalogue changes without a state directory)."""


class Aborted(ServiceError):
    """The operation was ended by another one, e.g. a Session dropped by ForgetSession."""


@dataclasses.dataclass(frozen=True)
class ErrorKind:
    """How one class of domain error goes on the wire.

    Attributes:
        code: the gRPC status code.
        reason: ErrorInfo.reason when the raise names none.
        retry_after_s: RetryInfo delay when the raise names none; None = no RetryInfo.
    """

    code: grpc.StatusCode
    reason: str
    retry_after_s: float | None = None


# The one mapping from domain errors to gRPC statuses. Subclasses map through their nearest listed base.
# UNAVAILABLE has no default delay: only some causes pass (model loading, shutting down: retry, perhaps on another
# replica); a broken state directory does not (catalogue.py raises it without one).
ERROR_TABLE: dict[type[ServiceError], ErrorKind] = {
    InvalidArgument: ErrorKind(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    NotFound: ErrorKind(grpc.StatusCode.NOT_FOUND, "NOT_FOUND"),
    Unavailable: ErrorKind(grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE"),
    DeadlineExceeded: ErrorKind(grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED"),
    ResourceExhausted: ErrorKind(grpc.StatusCode.RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED", retry_after_s=1.0),
    FailedPrecondition: ErrorKind(grpc.StatusCode.FAILED_PRECONDITION, "FAILED_PRECONDITION"),
    Aborted: ErrorKind(grpc.StatusCode.ABORTED, "ABORTED"),
}
_INTERNAL = ErrorKind(grpc.StatusCode.INTERNAL, "INTERNAL")

# Kept for readers of the former name: the codes of ERROR_TABLE.
STATUS_CODES: dict[type[ServiceError], grpc.StatusCode] = {cls: kind.code for cls, kind in ERROR_TABLE.items()}

# The reasons the server sends besides the class defaults above (ErrorInfo.reason; docs list them).
REASON_FIELD = "INVALID_FIELD"                # InvalidArgument naming a field (BadRequest says which)
REASON_UNDECODABLE = "REQUEST_UNDECODABLE"    # the request bytes are not the method's request message
REASON_ITEM_NOT_FOUND = "ITEM_NOT_FOUND"      # metadata: item_ids (JSON list, as many as fit), unknown_count
REASON_SESSION_NOT_FOUND = "SESSION_NOT_FOUND"
REASON_SESSION_FORGOTTEN = "SESSION_FORGOTTEN"
REASON_SESSION_IDLE = "SESSION_IDLE_TIMEOUT"
REASON_TOO_MANY_SESSIONS = "TOO_MANY_SESSIONS"
REASON_CLIENT_SESSIONS = "CLIENT_SESSION_LIMIT"  # one client's live sessions (server.fairness)
REASON_CLIENT_BUSY = "CLIENT_BUSY"                # one client's in-flight requests (server.fairness)
REASON_QUEUE_FULL = "ENCODER_QUEUE_FULL"
REASON_DEADLINE = "REQUEST_DEADLINE_EXCEEDED"
REASON_NOT_LOADED = "MODEL_NOT_LOADED"
REASON_SHUTTING_DOWN = "SHUTTING_DOWN"
REASON_BUNDLE_REJECTED = "BUNDLE_REJECTED"            # LoadModel: metadata bundle_path, stage; the old model serves on
REASON_LOAD_IN_PROGRESS = "MODEL_LOAD_IN_PROGRESS"    # LoadModel while another load or swap runs
REASON_VERSION_SUPERSEDED = "MODEL_VERSION_SUPERSEDED"  # a change to a version a rollout made read-only: retry
REASON_NO_RANKING_STAGE = "NO_RANKING_STAGE"  # ranking_stage asked of a model without one (FAILED_PRECONDITION)


@dataclasses.dataclass(frozen=True)
class Described:
    """An exception as the caller will see it: code, message and the google.rpc details."""

    code: grpc.StatusCode
    message: str
    reason: str
    metadata: dict[str, str]
    field: str | None = None
    retry_after_s: float | None = None


def kind_of(error: BaseException) -> ErrorKind | None:
    """The table entry for a domain error (None for anything else)."""
    if isinstance(error, ServiceError):
        for cls in type(error).__mro__:
            if cls in ERROR_TABLE:
                return ERROR_TABLE[cls]
    return None


def describe(error: BaseException, method: str = "") -> Described:
    """The bounded, caller-facing description of an exception; unexpected ones are logged here (traceback)."""
    kind = kind_of(error)
    if kind is None or not isinstance(error, ServiceError):
        logger.error("unexpected error in %s", method or "a request", exc_info=error)
        return Described(_INTERNAL.code, INTERNAL_MESSAGE, _INTERNAL.reason, {})
    field = bounded(error.field, ERROR_FIELD_BYTES) if error.field else None
    reason = error.reason or (REASON_FIELD if field and kind.code == grpc.StatusCode.INVALID_ARGUMENT
                              else kind.reason)
    metadata = dict(error.metadata)
    if field:
        metadata.setdefault("field", field)
    retry = error.retry_after_s if error.retry_after_s is not None else kind.retry_after_s
    return Described(kind.code, bounded(error.message, ERROR_MESSAGE_BYTES), reason, bounded_metadata(metadata),
                     field, retry)


def status_for(error: BaseException, method: str = "") -> tuple[grpc.StatusCode, str]:
    """The status code and caller-facing message for an exception; unexpected ones are logged here."""
    described = describe(error, method)
    return described.code, described.message


def rich_status(error: BaseException, method: str = "") -> status_pb2.Status:
    """The google.rpc.Status for an exception: code, message and details (ErrorInfo, BadRequest, RetryInfo)."""
    return to_rpc_status(describe(error, method))


def to_rpc_status(described: Described) -> status_pb2.Status:
    status = status_pb2.Status(code=code_number(described.code), message=described.message)
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason=described.reason, domain=DOMAIN,
                                                          metadata=described.metadata))
    if described.field and described.code == grpc.StatusCode.INVALID_ARGUMENT:
        status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(
                field=described.field, description=bounded(described.message, ERROR_VIOLATION_BYTES),
                reason=described.reason)]))
    if described.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(round(max(described.retry_after_s, 0.0) * 1e9)))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return status


def code_number(code: grpc.StatusCode) -> int:
    """The google.rpc.Code number of a status code (0 OK, 3 INVALID_ARGUMENT, 5 NOT_FOUND, ...)."""
    return int(code.value[0])


async def abort_with(context: grpc.aio.ServicerContext, error: BaseException, method: str = "") -> None:
    """End the RPC with the rich status for `error`. Always raises (grpc.aio's AbortError)."""
    await abort_with_described(context, describe(error, method))


async def abort_with_described(context: grpc.aio.ServicerContext, described: Described) -> None:
    await context.abort_with_status(rpc_status.to_status(to_rpc_status(described)))


# --- bounded text -----------------------------------------------------------------------------------------


def bounded(text: str, max_bytes: int) -> str:
    """`text` cut to at most max_bytes of UTF-8 (whole characters), ending in "…" when cut."""
    encoded = text.encode("utf-8", "replace")
    if len(encoded) <= max_bytes:
        return text
    return encoded[: max(max_bytes - 3, 0)].decode("utf-8", "ignore") + "…"


def bounded_metadata(metadata: Mapping[str, str], max_bytes: int = ERROR_METADATA_BYTES) -> dict[str, str]:
    """ErrorInfo metadata within max_bytes (keys and values together); values that do not fit are cut."""
    out: dict[str, str] = {}
    left = max_bytes
    for key, value in metadata.items():
        key = bounded(str(key), 64)
        room = left - len(key.encode())
        if room <= 3:
            break
        out[key] = bounded(str(value), room)
        left = room - len(out[key].encode())
    return out


def shown_id(item_id: str) -> str:
    """An id as a message echoes it: repr, cut to SHOWN_ID_CHARS characters (+ "…"). Full ids go in metadata."""
    return repr(item_id) if len(item_id) <= SHOWN_ID_CHARS else repr(item_id[:SHOWN_ID_CHARS]) + "…"


def unknown_items(item_ids: Sequence[str], explanation: str, shown: int = 5) -> NotFound:
    """NotFound for ids the catalogue lacks: the message names up to `shown` (each cut to SHOWN_ID_CHARS);
    ErrorInfo ITEM_NOT_FOUND carries unknown_count and item_ids, a JSON list of the unknown ids, in order, whose
    full text fits the metadata budget (an id is never cut: one that does not fit is left out, so the list can
    be shorter than unknown_count)."""
    names = ", ".join(shown_id(i) for i in item_ids[:shown])
    more = f" and {len(item_ids) - shown} more" if len(item_ids) > shown else ""
    noun = "item id" if len(item_ids) == 1 else "item ids"
    return NotFound(f"unknown {noun} {names}{more}: {explanation}", reason=REASON_ITEM_NOT_FOUND,
                    metadata={"unknown_count": str(len(item_ids)), "item_ids": _json_ids(item_ids)})


def _json_ids(item_ids: Sequence[str], budget: int = ERROR_METADATA_BYTES - 100) -> str:
    """A JSON list of the ids, in order, whose full text fits the budget (never a cut id)."""
    kept: list[str] = []
    size = 2
    for item_id in item_ids:
        cost = len(json.dumps(item_id, ensure_ascii=False).encode()) + 2
        if size + cost <= budget:
            kept.append(item_id)
            size += cost
    return json.dumps(kept, ensure_ascii=False)


# --- rate-limited warnings --------------------------------------------------------------------------------


class ThrottledWarning:
    """At most one WARNING line per `every_s` seconds for one kind of event; the next line counts the ones left out.

    For events a client can cause at will (undecodable requests): one line each would let it fill the log.
    """

    def __init__(self, log: logging.Logger, every_s: float = 10.0) -> None:
        self._log = log
        self._every_s = every_s
        self._next = -math.inf
        self._left_out = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next:
            self._left_out += 1
            return
        left_out, self._left_out = self._left_out, 0
        self._next = now + self._every_s
        suffix = f" ({left_out} more like it in the last {self._every_s:g} s not logged)" if left_out else ""
        self._log.warning(message + suffix, *args)
