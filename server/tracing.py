"""OpenTelemetry tracing of llmrec.v1.Recommender calls: off unless otlp_endpoint is set (or a test passes a provider).

Nothing here imports OpenTelemetry at module level: a server without tracing never loads the SDK, the OTLP
exporter or the gRPC instrumentation (together ~0.5 s of start-up on the 2-core development machine, measured by
bench.tracing_overhead).

Each server has a TracerProvider of its own (not the global one: a process may run several servers). The call's
SERVER span comes from opentelemetry-instrumentation-grpc's aio interceptor (a `traceparent` in the metadata makes
it the caller's child); server.observability then marks the call as traced (ACTIVE, a context variable of the
call's task) and names its request id and final status on it. Inside a call:

    /llmrec.v1.Recommender/<Method>     the RPC (SERVER); attributes rpc.*, llmrec.request_id
      llmrec.session.event              Session only: one event, request -> response
      llmrec.queue                      waiting for an encoder worker (submitted -> its micro-batch starts)
      llmrec.tokenize                   the request's texts tokenised
      llmrec.model                      one ONNX Runtime run holding the request's texts (one per text on CPU)
      llmrec.ranking                    the scoring rule's top k: query, adjustments, re-score, final order
        llmrec.index                    the HNSW (or exact) search inside it

The encoder's spans are made on its worker threads, where the call's context is not current: the job carries a
Handoff (the tracer and the submitting context) and its spans are parented on that explicitly.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

SERVICE = "llmrec.v1.Recommender"
SESSION_EVENT = "llmrec.session.event"
QUEUE = "llmrec.queue"
TOKENIZE = "llmrec.tokenize"
MODEL = "llmrec.model"
RANKING = "llmrec.ranking"
RANKING_STAGE = "llmrec.ranking_stage"
INDEX = "llmrec.index"
REQUEST_ID_ATTRIBUTE = "llmrec.request_id"


class Tracing:
    """One server's tracing: its provider, tracer and the gRPC interceptor that opens each call's span.

    Args:
        provider: an opentelemetry.sdk.trace.TracerProvider.
        owned: shut the provider down (flushing what is buffered) when the server stops.
    """

    def __init__(self, provider: TracerProvider, owned: bool) -> None:
        from opentelemetry import context, trace

        self.provider = provider
        self.owned = owned
        self.tracer = provider.get_tracer("llmrec.server")
        self._trace = trace
        self._context = context

    def interceptor(self) -> Any:
        """The instrumentation's aio server interceptor, for llmrec.v1.Recommender only (health probes and
        reflection would only add noise)."""
        from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

        return aio_server_interceptor(tracer_provider=self.provider, filter_=filters.service_name(SERVICE))

    def enter_call(self, request_id: str) -> None:
        """Called in the call's task, inside its SERVER span: later spans of this call go to this tracer."""
        ACTIVE.set(self)
        self._trace.get_current_span().set_attribute(REQUEST_ID_ATTRIBUTE, request_id)

    def end_call(self, code_value: int, code_name: str, server_fault: bool) -> None:
        """The call's final status on its SERVER span. The instrumentation only sees codes set through
        context.abort; rich errors (abort_with_status), cancellations and auth refusals come through here."""
        span = self._trace.get_current_span()
        span.set_attribute("rpc.grpc.status_code", code_value)
        if server_fault:
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, code_name))

    def current_ids(self) -> tuple[str, str] | None:
        context = self._trace.get_current_span().get_span_context()
        if not context.is_valid:
            return None
        return f"{context.trace_id:032x}", f"{context.span_id:016x}"

    def handoff(self) -> Handoff:
        return Handoff(self.tracer, self._context.get_current(), time.time_ns())

    def shutdown(self) -> None:
        if self.owned:
            self.provider.shutdown()


# The Tracing of the call the current task serves; None when the call is not traced (or outside calls).
ACTIVE: contextvars.ContextVar[Tracing | None] = contextvars.ContextVar("llmrec_tracing", default=None)


def otlp_tracing(endpoint: str, service_version: str) -> Tracing:
    """Tracing that batches spans to an OTLP/gRPC collector (OTEL_* variables configure the exporter, the sampler
    and the resource; OTEL_SERVICE_NAME overrides llmrec-server)."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": "llmrec-server",
                                                        "service.version": service_version}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return Tracing(provider, owned=True)


def span(name: str, attributes: dict[str, Any] | None = None) -> contextlib.AbstractContextManager:
    """A child span of the current one, on the event loop; a no-op (one context variable read) when untraced."""
    active = ACTIVE.get()
    if active is None:
        return contextlib.nullcontext()
    return active.tracer.start_as_current_span(name, attributes=attributes)


def current_ids() -> tuple[str, str] | None:
    """(trace id, span id) of the current span in hex, or None when the current call is not traced."""
    active = ACTIVE.get()
    return None if active is None else active.current_ids()


@dataclasses.dataclass(frozen=True, slots=True)
class Handoff:
    """What a worker thread needs to add spans to a call: the tracer and the context that submitted the work."""

    tracer: Tracer
    context: Context
    submitted_ns: int  # time.time_ns(), the start of the queue span

    def record(self, name: str, start_ns: int, end_ns: int, attributes: dict[str, Any] | None = None) -> None:
        """A finished span that ran from start_ns to end_ns (time.time_ns())."""
        self.tracer.start_span(name, context=self.context, start_time=start_ns, attributes=attributes).end(end_ns)

    @contextlib.contextmanager
    def child(self, name: str, attributes: dict[str, Any] | None = None) -> Iterator[Span]:
        """A span around the block, parented on the submitting context (not made current: it has no children)."""
        child = self.tracer.start_span(name, context=self.context, attributes=attributes)
        try:
            yield child
        finally:
            child.end()


def handoff() -> Handoff | None:
    """The current call's Handoff for work run on another thread; None when the call is not traced."""
    active = ACTIVE.get()
    return None if active is None else active.handoff()


def child(parent: Handoff | None, name: str, attributes: dict[str, Any] | None = None
          ) -> contextlib.AbstractContextManager:
    """Handoff.child, or a no-op without a Handoff."""
    return contextlib.nullcontext() if parent is None else parent.child(name, attributes)
