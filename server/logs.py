"""The server's log lines: JSON (python-json-logger) or text, each carrying the request id of its call.

server.observability sets CALL in the task of every llmrec.v1.Recommender call, so every line logged while the call
runs (its own code, the catalogue, auth refusals, grpc) carries its request id and method, and, when the call is
traced, its trace and span ids. Encoder worker threads run outside any call's context: their lines carry none.

json (the default): {"time": ISO 8601 UTC, "level", "logger", "message", "request_id", "rpc_method", "trace_id",
"span_id", "exc_info"}; the call fields only during a call, exc_info only with a traceback.
text (`make serve`): `2026-01-02 10:00:00,123 INFO llmrec.server.servicer [REQUEST_ID]: message`.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import sys
from typing import Literal, TextIO

from pythonjsonlogger.json import JsonFormatter

from llmrec.server import tracing

LogFormat = Literal["json", "text"]


@dataclasses.dataclass(frozen=True)
class Call:
    request_id: str
    method: str  # e.g. "Recommend"


# The call the current task serves; None outside calls. Each RPC runs in its own task, so a set never leaks.
CALL: contextvars.ContextVar[Call | None] = contextvars.ContextVar("llmrec_call", default=None)


class CallFields(logging.Filter):
    """Adds request_id and rpc_method (and trace_id, span_id when traced) to records logged during a call."""

    def filter(self, record: logging.LogRecord) -> bool:
        call = CALL.get()
        if call is not None:
            record.request_id = call.request_id
            record.rpc_method = call.method
            ids = tracing.current_ids()
            if ids is not None:
                record.trace_id, record.span_id = ids
        return True


_TEXT = "%(asctime)s %(levelname)s %(name)s%(call)s: %(message)s"


class TextFormatter(logging.Formatter):
    """One readable line; the request id in brackets after the logger's name during a call."""

    def __init__(self) -> None:
        super().__init__(_TEXT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", None)
        return _TEXT % {**vars(record), "call": f" [{request_id}]" if request_id else ""}


def make_handler(log_format: LogFormat, stream: TextIO | None = None) -> logging.Handler:
    """A stream handler (stderr by default) that writes `log_format` lines with the call fields."""
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(["levelname", "name", "message"], timestamp="time",
                                           rename_fields={"levelname": "level", "name": "logger"}))
    else:
        handler.setFormatter(TextFormatter())
    handler.addFilter(CallFields())
    return handler


def configure(level: str, log_format: LogFormat) -> None:
    """Root logging for `llmrec-server`: one handler on stderr. Library loggers (grpc, asyncio) stay at INFO or
    quieter; `level` debug is for this server's own lines."""
    numeric = logging.getLevelName(level.upper())
    logging.basicConfig(level=max(numeric, logging.INFO), handlers=[make_handler(log_format)])
    logging.getLogger("llmrec.server").setLevel(numeric)
