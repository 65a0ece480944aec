"""Tracing, request ids in logs and responses, and stream metrics, through the real server (docs/serving.md)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import re
import secrets
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from llmrec.v1 import recommender_pb2 as pb
from llmrec.v1 import recommender_pb2_grpc as pb_grpc
from llmrec.server import logs, metrics, security, tracing

# The conftest's server helper, for a module-scoped server (as in test_security).
_spec = importlib.util.spec_from_file_location("_integration_conftest", Path(__file__).with_name("conftest.py"))
_conftest = sys.modules.setdefault(_spec.name, importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(_conftest)
BackgroundServer, settings_for = _conftest.BackgroundServer, _conftest.settings_for

RECOMMEND = "/llmrec.v1.Recommender/Recommend"
RECOMMEND_BATCH = "/llmrec.v1.Recommender/RecommendBatch"
SESSION = "/llmrec.v1.Recommender/Session"


def history(*ids: str) -> list[pb.HistoryItem]:
    return [pb.HistoryItem(item_id=i) for i in ids]


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


@contextlib.contextmanager
def captured_logs(log_format: logs.LogFormat = "json") -> Iterator[io.StringIO]:
    """The server's log lines (debug included) as `llmrec-server` writes them (server.logs)."""
    stream = io.StringIO()
    handler = logs.make_handler(log_format, stream)
    logger = logging.getLogger("llmrec.server")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def eventually(check: Callable[[], bool], attempts: int = 500) -> bool:
    """check() once it holds, polling every 20 ms. An error status is sent before the handler's task finishes
    (grpc.aio's abort), so what is recorded as the call ends may land just after the caller has the error."""
    for _ in range(attempts):
        if check():
            return True
        time.sleep(0.02)
    return check()


def echoed_id(metadata) -> str:
    return dict(metadata)["x-request-id"]


# --- tracing ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def traced(tiny_bundle) -> Iterator[tuple[BackgroundServer, InMemorySpanExporter]]:
    """A server whose calls are traced into memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    running = BackgroundServer(settings_for(tiny_bundle), tracer_provider=provider).start()
    yield running, exporter
    running.close()
    provider.shutdown()


def _trace_of(exporter: InMemorySpanExporter, rpc_name: str):
    """The one span named rpc_name and every finished span of its trace, by name."""
    spans = exporter.get_finished_spans()
    (rpc,) = [s for s in spans if s.name == rpc_name]
    family: dict[str, list] = {}
    for found in spans:
        if found.context.trace_id == rpc.context.trace_id and found is not rpc:
            family.setdefault(found.name, []).append(found)
    return rpc, family


def _within(child, parent) -> bool:
    return parent.start_time <= child.start_time <= child.end_time <= parent.end_time


def test_one_recommend_yields_the_rpc_span_with_its_stage_spans(traced):
    running, exporter = traced
    exporter.clear()
    caller_trace, caller_span = secrets.token_hex(16), secrets.token_hex(8)
    with grpc.insecure_channel(running.target) as channel:
        response, call = pb_grpc.RecommenderStub(channel).Recommend.with_call(
            pb.RecommendRequest(history=history("m1", "m2"), k=5), timeout=30,
            metadata=[("x-request-id", "traced-1"), ("traceparent", f"00-{caller_trace}-{caller_span}-01")])
    assert len(response.items) == 5 and echoed_id(call.initial_metadata()) == "traced-1"

    rpc, family = _trace_of(exporter, RECOMMEND)
    assert rpc.kind == SpanKind.SERVER
    assert rpc.context.trace_id == int(caller_trace, 16) and rpc.parent.span_id == int(caller_span, 16)
    assert rpc.attributes[tracing.REQUEST_ID_ATTRIBUTE] == "traced-1" and rpc.attributes["rpc.grpc.status_code"] == 0
    assert {tracing.QUEUE, tracing.TOKENIZE, tracing.MODEL, tracing.RANKING, tracing.INDEX} <= family.keys()
    for name in (tracing.QUEUE, tracing.TOKENIZE, tracing.MODEL, tracing.RANKING):  # children of the rpc span
        for found in family[name]:
            assert found.parent.span_id == rpc.context.span_id, name
            assert _within(found, rpc), name
    (ranking,) = family[tracing.RANKING]
    (index,) = family[tracing.INDEX]
    assert index.parent.span_id == ranking.context.span_id and _within(index, ranking)
    (queue,) = family[tracing.QUEUE]
    (model,) = family[tracing.MODEL]  # one user text: one run
    assert queue.end_time <= model.start_time and model.end_time <= ranking.start_time
    assert model.attributes["llmrec.texts"] == 1 and model.attributes["llmrec.lane"] in ("alone", "parallel")


def test_a_batch_queued_fairly_beside_another_client_keeps_its_encoder_spans_under_its_own_rpc(traced):
    """RecommendBatch's encoder jobs (one per worker) go through the fair queue with another client's Recommends
    waiting beside them: every queue, tokenize and model span still hangs under the call that submitted it."""
    running, exporter = traced
    exporter.clear()
    users = [("m1", "m2"), ("m3",), ("m4", "m5", "m6"), ("m7",)]
    batch = pb.RecommendBatchRequest(requests=[pb.RecommendRequest(history=history(*ids), k=3) for ids in users])
    with grpc.insecure_channel(running.target) as channel, futures.ThreadPoolExecutor(2) as pool:
        stub = pb_grpc.RecommenderStub(channel)
        other = [pool.submit(stub.Recommend, pb.RecommendRequest(history=history("m8"), k=3), timeout=30,
                             metadata=[("llmrec-client-id", "other")]) for _ in range(3)]
        answer = stub.RecommendBatch(batch, timeout=30, metadata=[("llmrec-client-id", "batcher")])
        assert all(len(call.result().items) == 3 for call in other)
    assert [r.status.code for r in answer.results] == [0] * len(users) and answer.model_version

    rpc, family = _trace_of(exporter, RECOMMEND_BATCH)
    for name in (tracing.QUEUE, tracing.TOKENIZE, tracing.MODEL, tracing.RANKING):
        assert family.get(name), name
        for found in family[name]:
            assert found.parent.span_id == rpc.context.span_id and _within(found, rpc), name
    assert len(family[tracing.QUEUE]) == len(family[tracing.TOKENIZE]) >= 1  # one per encoder job
    assert sum(m.attributes["llmrec.texts"] for m in family[tracing.MODEL]) == len(users)  # per text on CPU
    assert len(family[tracing.RANKING]) == len(users)
    others = [s for s in exporter.get_finished_spans() if s.name == RECOMMEND]
    assert len(others) == 3 and rpc.context.trace_id not in {s.context.trace_id for s in others}
    for call in others:  # the other client's work stays in its own traces
        family_of_other = [s for s in exporter.get_finished_spans()
                           if s.context.trace_id == call.context.trace_id and s.name == tracing.MODEL]
        assert len(family_of_other) == 1 and family_of_other[0].parent.span_id == call.context.span_id


def test_session_events_are_spans_of_the_session_span(traced):
    running, exporter = traced
    exporter.clear()
    events = [pb.SessionRequest(event_id="1", interaction=pb.HistoryItem(item_id="m1")),
              pb.SessionRequest(event_id="2", query="space adventure")]
    with grpc.insecure_channel(running.target) as channel:
        answers = list(pb_grpc.RecommenderStub(channel).Session(iter(events), timeout=30))
    assert [a.status.code for a in answers] == [0, 0]

    session, family = _trace_of(exporter, SESSION)
    event_spans = family[tracing.SESSION_EVENT]
    assert [e.attributes["llmrec.session.event"] for e in sorted(event_spans, key=lambda e: e.start_time)] == \
        ["interaction", "query"]
    assert all(e.parent.span_id == session.context.span_id and _within(e, session) for e in event_spans)
    event_ids = {e.context.span_id for e in event_spans}
    for name in (tracing.QUEUE, tracing.MODEL, tracing.RANKING):  # each event's work hangs under its event
        assert len(family[name]) == 2 and all(found.parent.span_id in event_ids for found in family[name]), name


def test_an_error_is_the_rpc_spans_status_code(traced):
    running, exporter = traced
    exporter.clear()
    with grpc.insecure_channel(running.target) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.RecommenderStub(channel).Recommend(pb.RecommendRequest(history=history("nope"), k=5), timeout=30)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert eventually(lambda: any(s.name == RECOMMEND for s in exporter.get_finished_spans()))
    rpc, _ = _trace_of(exporter, RECOMMEND)
    assert rpc.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that keeps what it is sent."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def Export(self, request, context):  # noqa: N802 - the OTLP service's name
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


def test_otlp_endpoint_exports_the_calls_spans(start_server):
    collector = _Collector()
    receiver = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, receiver)
    port = receiver.add_insecure_port("127.0.0.1:0")
    receiver.start()
    try:
        # Unloaded: the call is answered UNAVAILABLE, which is enough to make a span.
        running = start_server(load=False, otlp_endpoint=f"http://127.0.0.1:{port}")
        with grpc.insecure_channel(running.target) as channel:
            with pytest.raises(grpc.RpcError):
                pb_grpc.RecommenderStub(channel).Recommend(pb.RecommendRequest(history=history("m1")), timeout=30)
        running.close()  # shuts the tracer provider down: what is batched is sent
    finally:
        receiver.stop(None)
    exported = [(resource_spans.resource, span) for request in collector.requests
                for resource_spans in request.resource_spans for scope in resource_spans.scope_spans
                for span in scope.spans]
    assert [span.name for _, span in exported] == [RECOMMEND]
    resource = {a.key: a.value.string_value for a in exported[0][0].attributes}
    assert resource["service.name"] == "llmrec-server"


# --- request ids and logs --------------------------------------------------------------------------------------


def test_request_id_is_echoed_and_on_the_calls_log_lines(server):
    with captured_logs("json") as json_lines, captured_logs("text") as text_lines:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.RecommenderStub(channel)
            _, given = stub.Recommend.with_call(pb.RecommendRequest(history=history("m1"), k=3), timeout=30,
                                                metadata=[("x-request-id", "order-42")])
            _, generated = stub.Recommend.with_call(pb.RecommendRequest(history=history("m1"), k=3), timeout=30)
            _, replaced = stub.Recommend.with_call(pb.RecommendRequest(history=history("m1"), k=3), timeout=30,
                                                   metadata=[("x-request-id", "has spaces")])
            with pytest.raises(grpc.RpcError) as failed:
                stub.Recommend(pb.RecommendRequest(history=history("nope"), k=3), timeout=30,
                               metadata=[("x-request-id", "order-43")])
            assert eventually(lambda: "Recommend NOT_FOUND" in json_lines.getvalue())
    assert echoed_id(given.initial_metadata()) == "order-42"
    new_id = echoed_id(generated.initial_metadata())
    assert re.fullmatch(r"[0-9a-f]{32}", new_id)
    assert re.fullmatch(r"[0-9a-f]{32}", echoed_id(replaced.initial_metadata()))  # unusable ids are replaced
    assert echoed_id(failed.value.initial_metadata()) == "order-43"  # errors carry it too

    records = [json.loads(line) for line in json_lines.getvalue().splitlines()]
    assert all({"time", "level", "logger", "message"} <= record.keys() for record in records)
    for request_id, outcome in (("order-42", "Recommend OK"), (new_id, "Recommend OK"),
                                ("order-43", "Recommend NOT_FOUND")):
        mine = [record for record in records if record.get("request_id") == request_id]
        assert mine and all(record["rpc_method"] == "Recommend" for record in mine), request_id
        assert any(record["message"].startswith(outcome) for record in mine), request_id
    assert "[order-42]: Recommend OK" in text_lines.getvalue()


def test_auth_refusals_are_counted_logged_and_carry_the_request_id(start_server):
    token = secrets.token_urlsafe(32)
    running = start_server(load=False, auth_tokens=(f"reader@{security.hash_token(token)}=read",))
    unauthenticated = sample("llmrec_rpcs_total", method="Recommend", code="UNAUTHENTICATED")
    denied = sample("llmrec_rpcs_total", method="UpsertItems", code="PERMISSION_DENIED")
    with captured_logs() as lines, grpc.insecure_channel(running.target) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        with pytest.raises(grpc.RpcError) as anonymous:
            stub.Recommend(pb.RecommendRequest(history=history("m1")), timeout=30,
                           metadata=[("x-request-id", "no-token-1")])
        with pytest.raises(grpc.RpcError) as reader:
            stub.UpsertItems(pb.UpsertItemsRequest(), timeout=30,
                             metadata=[("authorization", f"Bearer {token}"), ("x-request-id", "reader-1")])
    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert reader.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert echoed_id(anonymous.value.initial_metadata()) == "no-token-1"
    assert eventually(lambda: sample("llmrec_rpcs_total", method="UpsertItems", code="PERMISSION_DENIED") > denied)
    assert sample("llmrec_rpcs_total", method="Recommend", code="UNAUTHENTICATED") == unauthenticated + 1
    assert sample("llmrec_rpcs_total", method="UpsertItems", code="PERMISSION_DENIED") == denied + 1
    records = [json.loads(line) for line in lines.getvalue().splitlines()]
    refusal = [r for r in records if r.get("request_id") == "no-token-1" and r["logger"] == "llmrec.server.security"]
    assert refusal and "missing bearer token" in refusal[0]["message"]


# --- metrics -----------------------------------------------------------------------------------------------


def test_streams_are_measured_per_message_and_per_event_not_in_the_rpc_histogram(server):
    before = {
        "stream_rpc": sample("llmrec_rpc_seconds_count", method="RecommendStream"),
        "session_rpc": sample("llmrec_rpc_seconds_count", method="Session"),
        "stream_life": sample("llmrec_stream_seconds_count", method="RecommendStream"),
        "session_life": sample("llmrec_stream_seconds_count", method="Session"),
        "pages": sample("llmrec_stream_message_seconds_count", method="RecommendStream"),
        "interactions": sample("llmrec_session_event_seconds_count", event="interaction"),
        "ok": sample("llmrec_session_events_total", event="interaction", code="OK"),
        "not_found": sample("llmrec_session_events_total", event="interaction", code="NOT_FOUND"),
        "config": sample("llmrec_session_events_total", event="config", code="OK"),
    }
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        pages = list(stub.RecommendStream(pb.RecommendRequest(history=history("m1"), k=5, page_size=2), timeout=30))
        events = [pb.SessionRequest(event_id="1", config=pb.SessionConfig(k=3)),
                  pb.SessionRequest(event_id="2", interaction=pb.HistoryItem(item_id="m1")),
                  pb.SessionRequest(event_id="3", interaction=pb.HistoryItem(item_id="nope"))]
        answers = list(stub.Session(iter(events), timeout=30))
    assert len(pages) == 3 and [a.status.code for a in answers] == [0, 0, grpc.StatusCode.NOT_FOUND.value[0]]
    after = {
        "stream_rpc": sample("llmrec_rpc_seconds_count", method="RecommendStream"),
        "session_rpc": sample("llmrec_rpc_seconds_count", method="Session"),
        "stream_life": sample("llmrec_stream_seconds_count", method="RecommendStream"),
        "session_life": sample("llmrec_stream_seconds_count", method="Session"),
        "pages": sample("llmrec_stream_message_seconds_count", method="RecommendStream"),
        "interactions": sample("llmrec_session_event_seconds_count", event="interaction"),
        "ok": sample("llmrec_session_events_total", event="interaction", code="OK"),
        "not_found": sample("llmrec_session_events_total", event="interaction", code="NOT_FOUND"),
        "config": sample("llmrec_session_events_total", event="config", code="OK"),
    }
    assert {key: after[key] - before[key] for key in before} == {
        "stream_rpc": 0, "session_rpc": 0, "stream_life": 1, "session_life": 1, "pages": 3, "interactions": 2,
        "ok": 1, "not_found": 1, "config": 1}


def test_metrics_are_served_by_default_and_can_be_turned_off(server, start_server):
    assert server.server.metrics_port  # the tests' settings ask for any free port
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=5).read().decode()
    assert "# HELP llmrec_dropped_total Encoder requests (one per batch of texts to encode" in text
    assert "# TYPE llmrec_session_event_seconds histogram" in text
    assert start_server(load=False, metrics=False).server.metrics_port is None
