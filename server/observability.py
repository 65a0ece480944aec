"""CallObserver: the interceptor every llmrec.v1.Recommender call passes through before authorization.

For each call it
* takes the request id from the `x-request-id` metadata (1 to 128 visible ASCII characters; anything else is
  replaced) or makes one (32 hex digits), and sends it back at once as `x-request-id` initial metadata, so the
  caller has it with the answer and with any error, auth refusals included;
* sets it for the call's log lines (server.logs.CALL) and on the call's span when traced (server.tracing);
* counts the call with the status it really ended with (server.metrics.observe_call): a call whose client
  cancelled or whose deadline passed is CANCELLED or DEADLINE_EXCEEDED, not OK (grpc.aio cancels the handler
  task); one that AuthInterceptor refused is UNAUTHENTICATED or PERMISSION_DENIED. A unary call's time goes to the
  latency histogram, a stream's to the lifetime histogram; the servicer measures streams per message and event.

Interceptor order (server.app): tracing (opens the SERVER span), this, authorization.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from llmrec.server import logs, metrics
from llmrec.server.servicer import HANDLER_KINDS
from llmrec.server.tracing import SERVICE, Tracing

logger = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")  # visible ASCII: safe in a log line and in metadata
# Server-side faults by the OpenTelemetry conventions for a SERVER span; the rest are the caller's doing.
_SERVER_FAULTS = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED,
                            grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE,
                            grpc.StatusCode.DATA_LOSS})


def request_id_of(metadata: Any) -> str:
    """The caller's x-request-id when it is usable, else a new random one."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _REQUEST_ID.fullmatch(value):
            return value
    return secrets.token_hex(16)


def _deadline_passed(context: grpc.aio.ServicerContext) -> bool:
    with contextlib.suppress(Exception):
        remaining = context.time_remaining()
        return remaining is not None and remaining <= 0.05
    return False


def gone_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """Why a call ended without an answer: its deadline passed (DEADLINE_EXCEEDED) or its client left (CANCELLED)."""
    return grpc.StatusCode.DEADLINE_EXCEEDED if _deadline_passed(context) else grpc.StatusCode.CANCELLED


def _ended(context: grpc.aio.ServicerContext) -> bool:
    """The call is over for the caller: its deadline passed or it was cancelled."""
    with contextlib.suppress(Exception):
        if context.cancelled():
            return True
    return _deadline_passed(context)


def aborted_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    with contextlib.suppress(Exception):
        code = context.code()
        if isinstance(code, grpc.StatusCode):
            return code
        for status in grpc.StatusCode:
            if status.value[0] == code:
                return status
    return grpc.StatusCode.UNKNOWN


class CallObserver(grpc.aio.ServerInterceptor):
    """See the module docstring. tracing: the server's Tracing, None when it traces nothing."""

    def __init__(self, tracing: Tracing | None) -> None:
        self._tracing = tracing
        self._observed: dict[str, Any] = {}  # method -> its wrapped handler (the server's handlers never change)

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        path = handler_call_details.method
        observed = self._observed.get(path)
        if observed is not None:
            return observed
        handler = await continuation(handler_call_details)
        if handler is None or not path.startswith(f"/{SERVICE}/"):
            return handler
        observed = self._observed[path] = self._wrap(handler, path.rsplit("/", 1)[-1])
        return observed

    @contextlib.asynccontextmanager
    async def _scope(self, method: str, context: grpc.aio.ServicerContext, streaming: bool) -> AsyncIterator[None]:
        started = time.perf_counter()
        request_id = request_id_of(context.invocation_metadata())
        logs.CALL.set(logs.Call(request_id, method))  # the call's own task: never seen by another call
        if self._tracing is not None:
            self._tracing.enter_call(request_id)
        code = grpc.StatusCode.OK
        try:
            await context.send_initial_metadata(((REQUEST_ID_KEY, request_id),))
            yield
        except grpc.aio.AbortError:
            code = aborted_code(context)
            if code is grpc.StatusCode.UNKNOWN and _ended(context):
                # aborted after the deadline passed or the client left (the encoder saw it first): the call's
                # code was no longer settable, and the caller already has DEADLINE_EXCEEDED or CANCELLED
                code = gone_code(context)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            # grpc.aio cancels the handler when the client cancels or the deadline passes (a stream may instead be
            # closed at a yield): the call is neither OK nor an error of ours.
            code = gone_code(context)
            raise
        except Exception:  # the servicer turns every error into a status; anything here is a bug below it...
            # ...unless the call had already ended: aborting an expired or cancelled call fails (ExecuteBatchError)
            code = gone_code(context) if _ended(context) else grpc.StatusCode.UNKNOWN
            raise
        finally:
            # Never the request itself: histories and queries are personal data.
            elapsed = time.perf_counter() - started
            metrics.observe_call(method, code.name, elapsed, streaming)
            if self._tracing is not None:
                self._tracing.end_call(code.value[0], code.name, code in _SERVER_FAULTS)
            logger.debug("%s %s in %.1f ms", method, code.name, elapsed * 1e3)

    def _wrap(self, handler: Any, method: str) -> Any:
        """The same handler with its behaviour run inside _scope."""
        if handler.response_streaming:
            behaviour = handler.stream_stream if handler.request_streaming else handler.unary_stream

            async def observed_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                async with self._scope(method, context, streaming=True):
                    async for response in behaviour(request, context):
                        yield response

            wrapped: Callable = observed_stream
        else:
            behaviour = handler.stream_unary if handler.request_streaming else handler.unary_unary

            async def observed_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                async with self._scope(method, context, streaming=False):
                    return await behaviour(request, context)

            wrapped = observed_unary
        make = HANDLER_KINDS[(handler.request_streaming, handler.response_streaming)]
        return make(wrapped, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)
