"""Production serving through the real grpc.aio server: rich error details, reflection v1 and v1alpha, the CLI's
exit codes, and the fault-probe defects (cancelled and expired calls, cancelled sessions, undecodable requests,
long ids in messages, ListItems pages past the message limit)."""

from __future__ import annotations

import gc
import json
import logging
import os
import queue
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2
from grpc_status import rpc_status

from typer.testing import CliRunner

from llmrec.clients.cli import app
from llmrec.clients.client import RecommenderClient, RecommenderError
from llmrec.server import metrics
from llmrec.server.recommender import UPSERT_ENCODE_CHUNK
from llmrec.v1 import recommender_pb2 as pb
from llmrec.v1 import recommender_pb2_grpc as pb_grpc
from rpc_helpers import call_error
from tests.google_rpc_details import unpacked

LLMREC = Path(sys.executable).parent / "llmrec"
runner = CliRunner()


def details(error: grpc.RpcError) -> dict:
    """The google.rpc details of a failed call, read with the real google.rpc types (not the client's)."""
    status = rpc_status.from_call(error)  # also checks code and message against the status proto
    assert status is not None, "the status carries no google.rpc.Status"
    return unpacked(status)


def rpc_count(method: str, code: str) -> float:
    return metrics.RPCS.labels(method, code)._value.get()


def encodes() -> float:
    return sum(metrics.RUNS.labels(lane)._value.get() for lane in ("alone", "parallel"))


# --- rich errors -------------------------------------------------------------------------------------------


def test_invalid_argument_names_the_field_path(stub):
    error = call_error(stub.Recommend, pb.RecommendRequest(
        history=[pb.HistoryItem(item_id="m1"), pb.HistoryItem(item_id="m2"), pb.HistoryItem(item_id="m3"),
                 pb.HistoryItem(item_id="")], k=5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "history[3].item_id" in error.details()
    found = details(error)
    assert [(v.field, v.description) for v in found["bad_request"].field_violations] == [
        ("history[3].item_id", error.details())]
    assert (found["info"].reason, found["info"].domain) == ("INVALID_FIELD", "llmrec.v1")
    assert "retry" not in found

    k_error = call_error(stub.Recommend, pb.RecommendRequest(history=[pb.HistoryItem(item_id="m1")], k=0))
    assert [v.field for v in details(k_error)["bad_request"].field_violations] == ["k"]


def test_not_found_carries_the_unknown_ids_in_error_info(stub):
    error = call_error(stub.Recommend, pb.RecommendRequest(
        history=[pb.HistoryItem(item_id="m1"), pb.HistoryItem(item_id="zz-unknown")], k=3))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "'zz-unknown'" in error.details()
    info = details(error)["info"]
    assert info.reason == "ITEM_NOT_FOUND" and info.domain == "llmrec.v1"
    assert json.loads(info.metadata["item_ids"]) == ["zz-unknown"] and info.metadata["unknown_count"] == "1"


def test_retryable_statuses_carry_a_retry_delay(start_server):
    loading = start_server(load=False)
    with grpc.insecure_channel(loading.target) as channel:
        early = call_error(pb_grpc.RecommenderStub(channel).GetModelInfo, pb.GetModelInfoRequest())
    assert early.code() == grpc.StatusCode.UNAVAILABLE
    found = details(early)
    assert found["info"].reason == "MODEL_NOT_LOADED" and found["retry"].retry_delay.ToTimedelta().total_seconds() > 0

    full = start_server(max_sessions=1)
    with grpc.insecure_channel(full.target) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        first = queue.Queue()
        holding = stub.Session(iter(first.get, None), timeout=30)
        first.put(pb.SessionRequest(event_id="1", query="space"))
        assert next(holding).status.code == 0
        refused = stub.Session(iter([pb.SessionRequest(event_id="1", query="space")]), timeout=10)
        with pytest.raises(grpc.RpcError) as caught:
            list(refused)
        holding.cancel()
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    found = details(caught.value)
    assert found["info"].reason == "TOO_MANY_SESSIONS" and found["info"].metadata["max_sessions"] == "1"
    assert found["retry"].retry_delay.seconds == 5


def test_internal_errors_carry_error_info_and_no_internals(start_server):
    broken = start_server()

    def explode(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    broken.server.recommender.search = explode
    with grpc.insecure_channel(broken.target) as channel:
        error = call_error(pb_grpc.RecommenderStub(channel).Recommend,
                           pb.RecommendRequest(history=[pb.HistoryItem(item_id="m1")], k=3))
    assert error.code() == grpc.StatusCode.INTERNAL and "secret" not in error.details()
    info = details(error)["info"]
    assert info.reason == "INTERNAL" and not info.metadata


def test_the_python_client_exposes_the_details(server):
    with RecommenderClient(server.target, timeout_s=10) as client:
        with pytest.raises(RecommenderError) as bad_k:
            client.recommend(["m1"], k=1000)
        with pytest.raises(RecommenderError) as unknown:
            client.get_item("no-such-item")
    assert bad_k.value.code == grpc.StatusCode.INVALID_ARGUMENT and not bad_k.value.retryable
    assert [(v.field, v.description) for v in bad_k.value.field_violations] == [("k", bad_k.value.message)]
    assert bad_k.value.reason == "INVALID_FIELD" and bad_k.value.domain == "llmrec.v1"
    assert bad_k.value.retry_after_s is None
    assert unknown.value.reason == "ITEM_NOT_FOUND" and json.loads(unknown.value.metadata["item_ids"]) == [
        "no-such-item"]


def test_the_python_client_reads_retry_delays(start_server):
    loading = start_server(load=False)
    with RecommenderClient(loading.target, timeout_s=10) as client, pytest.raises(RecommenderError) as caught:
        client.model_info()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE and caught.value.retryable
    assert caught.value.reason == "MODEL_NOT_LOADED" and caught.value.retry_after_s == 1.0


# --- reflection ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("service", ["grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"])
def test_reflection_answers_under_v1_and_v1alpha(channel, service):
    # v1 and v1alpha are the same messages under two packages: v1alpha's classes speak v1 on the wire.
    call = channel.stream_stream(f"/{service}/ServerReflectionInfo",
                                 request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                 response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
    requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol=service)]
    listed, described = list(call(iter(requests), timeout=10))
    names = {s.name for s in listed.list_services_response.service}
    assert {"llmrec.v1.Recommender", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= names
    assert described.file_descriptor_response.file_descriptor_proto  # the reflection service describes itself


# --- the CLI's exit codes ------------------------------------------------------------------------------------


def llmrec(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMREC_")}
    return subprocess.run([str(LLMREC), *args], input=stdin, capture_output=True, text=True, timeout=120, env=env)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_cli_exit_codes_tell_usage_permanent_and_retryable_apart(server):
    """The installed `llmrec` script, in its own process."""
    usage = llmrec("recommend", "--target", server.target, "--k", "many")
    assert usage.returncode == 2

    not_found = llmrec("item", "no-such-item", "--target", server.target)
    assert not_found.returncode == 3 and "error: NOT_FOUND: unknown item id 'no-such-item'" in not_found.stderr

    nobody = llmrec("info", "--target", f"127.0.0.1:{free_port()}", "--timeout", "3")
    assert nobody.returncode == 4 and "UNAVAILABLE" in nobody.stderr


def test_cli_documents_exit_codes_and_prints_the_details(server, start_server):
    """The same app in process (CliRunner): the help text, a field violation, a retry delay."""
    help_text = runner.invoke(app, ["--help"], terminal_width=200).output
    assert all(line in help_text for line in ("Exit status", "2  usage error", "3  permanent failure",
                                              "4  retryable failure", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"))

    bad_k = runner.invoke(app, ["recommend", "--target", server.target, "--item", "m1", "--k", "0"])
    assert bad_k.exit_code == 3 and "INVALID_ARGUMENT" in bad_k.stderr and "field: k" in bad_k.stderr

    full = start_server(max_sessions=1)
    with grpc.insecure_channel(full.target) as channel:
        held = queue.Queue()
        holding = pb_grpc.RecommenderStub(channel).Session(iter(held.get, None), timeout=60)
        held.put(pb.SessionRequest(event_id="1", query="space"))
        next(holding)
        refused = runner.invoke(app, ["session", "--target", full.target], input="quit\n")
        holding.cancel()
    assert refused.exit_code == 4 and "RESOURCE_EXHAUSTED" in refused.stderr and "retry after 5 s" in refused.stderr


# --- cancelled and expired calls --------------------------------------------------------------------------


# Large enough that no machine encodes it all within the 0.5 s deadline.
BATCH = 1000


def test_an_expired_upsert_stops_encoding_changes_nothing_and_is_counted_as_such(start_server, tmp_path, caplog):
    writable = start_server(state_dir=tmp_path / "state")
    description = " ".join(["a long description that fills the item token window"] * 12)
    items = [pb.CatalogueItem(item_id=f"late-{i:03d}", text=pb.ItemText(title=f"Late film {i}",
                                                                       description=description))
             for i in range(BATCH)]
    caplog.set_level(logging.DEBUG, logger="llmrec.server.observability")
    with grpc.insecure_channel(writable.target) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        before = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        expired_before = gone_count()
        ran_before = encodes()
        with pytest.raises(grpc.RpcError) as caught:
            stub.UpsertItems(pb.UpsertItemsRequest(items=items), timeout=0.5)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        at_expiry = encodes()

        # The encoder goes quiet soon after: what runs on is the chunk in hand, not the rest of the batch
        # (how much was encoded before the deadline depends on the machine's speed, so it is not bounded).
        settled = time.monotonic() + 60
        last, quiet_since = encodes(), time.monotonic()
        while time.monotonic() < settled and time.monotonic() - quiet_since < 1.5:
            time.sleep(0.1)
            if encodes() != last:
                last, quiet_since = encodes(), time.monotonic()
        after_expiry = last - at_expiry
        assert after_expiry <= 3 * UPSERT_ENCODE_CHUNK, f"{after_expiry:.0f} texts were encoded after the deadline"
        assert last - ran_before < BATCH, "the whole batch was encoded for an expired call"

        # Nothing was half-applied: the batch is one journaled change, written only after every text is encoded.
        after = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        assert (after.item_count, after.index_version) == (before.item_count, before.index_version)
        missing = call_error(stub.GetItem, pb.GetItemRequest(item_id="late-000"))
        assert missing.code() == grpc.StatusCode.NOT_FOUND
    deadline = time.monotonic() + 10
    while gone_count() == expired_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone_count() == expired_before + 1
    assert "UpsertItems OK" not in caplog.text
    assert "UpsertItems DEADLINE_EXCEEDED" in caplog.text or "UpsertItems CANCELLED" in caplog.text


def gone_count() -> float:
    """UpsertItems calls counted as expired or cancelled. Usually the server's own deadline ends the call; on a
    loaded machine the request can reach the server late, so its deadline (the time left when it was sent) is
    still running when the client's expires and the client's cancel ends the call: CANCELLED, never OK."""
    return rpc_count("UpsertItems", "DEADLINE_EXCEEDED") + rpc_count("UpsertItems", "CANCELLED")


def test_cancelled_sessions_are_counted_cancelled_and_leave_no_unretrieved_task_errors(server, caplog):
    sessions = 30
    ok_before, cancelled_before = rpc_count("Session", "OK"), rpc_count("Session", "CANCELLED")
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        for n in range(sessions):
            requests = queue.Queue()
            call = stub.Session(iter(requests.get, None), timeout=30)
            requests.put(pb.SessionRequest(event_id="1", interaction=pb.HistoryItem(item_id="m1")))
            if n % 3:
                next(call)
            # at least 10 ms: a call cancelled before the server starts its handler is never seen by the server
            # (a known gap: grpc.aio does not run the handler, so nothing counts it)
            time.sleep(0.01 * (n % 4 + 1))
            call.cancel()
        deadline = time.monotonic() + 20
        while rpc_count("Session", "CANCELLED") - cancelled_before < sessions and time.monotonic() < deadline:
            time.sleep(0.05)
    server.run(_collect_garbage())
    gc.collect()
    assert "never retrieved" not in caplog.text
    assert rpc_count("Session", "CANCELLED") - cancelled_before == sessions
    assert rpc_count("Session", "OK") == ok_before


async def _collect_garbage() -> None:
    gc.collect()


# --- undecodable requests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method, message", [
    ("Recommend", "llmrec.v1.RecommendRequest"), ("GetItem", "llmrec.v1.GetItemRequest"),
    ("RecommendStream", "llmrec.v1.RecommendRequest"), ("Session", "llmrec.v1.SessionRequest"),
])
def test_undecodable_requests_get_invalid_argument_and_no_traceback(channel, caplog, method, message):
    path = f"/llmrec.v1.Recommender/{method}"
    caplog.set_level(logging.INFO)
    for _ in range(20):
        with pytest.raises(grpc.RpcError) as caught:
            if method == "Session":
                list(channel.stream_stream(path)(iter([b"\xff"]), timeout=10))
            elif method == "RecommendStream":
                list(channel.unary_stream(path)(b"\xff", timeout=10))
            else:
                channel.unary_unary(path)(b"\xff", timeout=10)
        error = caught.value
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details() == f"request could not be decoded as {message}"
        assert details(error)["info"].reason == "REQUEST_UNDECODABLE"
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [r for r in records if r.levelno >= logging.ERROR or r.exc_info], [r.getMessage() for r in records]
    assert len(records) <= 1 and all(len(r.getMessage()) < 200 for r in records)  # one short line, rate-limited


# --- long ids -----------------------------------------------------------------------------------------------


def test_not_found_for_long_ids_stays_not_found(stub, state_server):
    emoji = "\U0001F600" * 2000  # a valid id (2,000 characters): 8,000 bytes, 24,000 percent-encoded
    long_ids = [emoji, *(f"{i}" + "x" * 1999 for i in range(5))]
    error = call_error(stub.GetItem, pb.GetItemRequest(item_id=emoji))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "…" in error.details() and len(error.details()) < 600
    assert details(error)["info"].metadata["unknown_count"] == "1"

    many = call_error(stub.Recommend, pb.RecommendRequest(history=[pb.HistoryItem(item_id=i) for i in long_ids], k=3))
    assert many.code() == grpc.StatusCode.NOT_FOUND and "and 1 more" in many.details()
    info = details(many)["info"]
    assert info.metadata["unknown_count"] == "6"
    assert all(len(i) == 2000 for i in json.loads(info.metadata["item_ids"]))  # full ids only, never cut ones

    with grpc.insecure_channel(state_server.target) as channel:
        deleting = call_error(pb_grpc.RecommenderStub(channel).DeleteItems, pb.DeleteItemsRequest(item_ids=long_ids))
    assert deleting.code() == grpc.StatusCode.NOT_FOUND and "nothing was deleted" in deleting.details()


# --- ListItems pages bounded by bytes ---------------------------------------------------------------------


def test_list_items_pages_stay_under_the_message_limit(start_server, tmp_path, tiny_catalogue):
    small = start_server(state_dir=tmp_path / "state", max_message_mib=1)
    attributes = {f"a{k:02d}": chr(ord("a") + k % 26) * 1500 for k in range(64)}  # ~96 KB per item
    with grpc.insecure_channel(small.target) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        for batch in range(3):
            stub.UpsertItems(pb.UpsertItemsRequest(items=[
                pb.CatalogueItem(item_id=f"big-{batch}-{i}", text=pb.ItemText(title=f"Big film {batch}.{i}"),
                                 attributes=attributes) for i in range(8)]), timeout=60)
        pages, token = [], ""
        while True:
            page = stub.ListItems(pb.ListItemsRequest(page_token=token), timeout=10)  # default page size: 100
            assert page.ByteSize() <= 1 << 20
            pages.append(page)
            token = page.next_page_token
            if not token:
                break
    listed = [item.item_id for page in pages for item in page.items]
    expected = sorted([item_id for item_id, _ in tiny_catalogue] + [f"big-{b}-{i}" for b in range(3) for i in range(8)])
    assert listed == expected and len(pages) > 1 and pages[0].total_count == len(expected)
