"""RecommendBatch, negative feedback and the score threshold through the real server, the client library and the
command line: results, validation errors with their field violations, the manifest weight."""

from __future__ import annotations

import json
import math

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from typer.testing import CliRunner

from llmrec import manifest as mf
from llmrec.clients.cli import app
from llmrec.clients.client import RecommenderClient
from llmrec.scoring import DEFAULT_REJECTED_WEIGHT
from llmrec.server import metrics
from llmrec.v1 import recommender_pb2 as pb
from llmrec.v1 import recommender_pb2_grpc as pb_grpc
from conftest import BackgroundServer, settings_for
from rpc_helpers import call_error, ids_of
from test_production_serving import details

runner = CliRunner()
ALL = 42  # the tiny catalogue: k = ALL ranks every item


def request(*item_ids: str, k: int = 10, **fields) -> pb.RecommendRequest:
    return pb.RecommendRequest(history=[pb.HistoryItem(item_id=i) for i in item_ids], k=k, **fields)


def violations(status) -> list[str]:
    """The BadRequest field paths of a google.rpc.Status (one batch entry)."""
    found = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found += [v.field for v in bad.field_violations]
    return found


def unit_vector(stub, item_id: str) -> np.ndarray:
    return np.asarray(stub.GetItem(pb.GetItemRequest(item_id=item_id, include_vector=True), timeout=10)
                      .vector.values[:-1], dtype=np.float64)


# --- RecommendBatch -------------------------------------------------------------------------------------------


def test_a_batch_answers_each_request_in_order_with_its_own_status(stub):
    good = [request("m1", "m2", k=5, exclude_history=True), request(k=3, context=pb.Context(query="funny cartoon")),
            request("m27", k=4, rejected_item_ids=["m28"])]
    bad_k, unknown = request("m1", k=0), request("m1", "nope")
    response = stub.RecommendBatch(pb.RecommendBatchRequest(requests=[good[0], bad_k, good[1], unknown, good[2]]),
                                   timeout=30)
    codes = [r.status.code for r in response.results]
    assert codes == [0, grpc.StatusCode.INVALID_ARGUMENT.value[0], 0, grpc.StatusCode.NOT_FOUND.value[0], 0]
    # Each good entry is exactly what Recommend gives it alone (on CPU a user's vector never depends on others).
    for entry, alone in zip([response.results[i] for i in (0, 2, 4)], good):
        single = stub.Recommend(alone, timeout=10)
        assert [(i.item_id, i.score) for i in entry.items] == [(i.item_id, i.score) for i in single.items]
    assert violations(response.results[1].status) == ["requests[1].k"]
    assert "k must be between 1 and 100" in response.results[1].status.message and not response.results[1].items
    assert "'nope'" in response.results[3].status.message
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert (response.model_version, response.index_version) == (info.model_version, info.index_version)


def test_a_batch_over_the_limit_or_empty_fails_as_a_whole(start_server):
    running = start_server(max_recommend_batch=3)
    with grpc.insecure_channel(running.target) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).max_recommend_batch == 3
        for count in (4, 0):
            error = call_error(stub.RecommendBatch, pb.RecommendBatchRequest(requests=[request("m1")] * count))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "1 to 3 requests" in error.details()
            assert [v.field for v in details(error)["bad_request"].field_violations] == ["requests"]
        assert len(stub.RecommendBatch(pb.RecommendBatchRequest(requests=[request("m1")] * 3), timeout=30)
                   .results) == 3


# --- negative feedback ----------------------------------------------------------------------------------------


def test_rejected_items_never_come_back_and_items_like_them_lose_weight_times_cosine(stub):
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    weight = info.rejected_item_weight
    assert weight == pytest.approx(DEFAULT_REJECTED_WEIGHT) and info.max_rejected_items == 1000
    before = stub.Recommend(request("m1", k=ALL), timeout=10)
    after = stub.Recommend(request("m1", k=ALL, rejected_item_ids=["m2", "m2"]), timeout=10)
    assert "m2" not in ids_of(after.items) and len(after.items) == ALL - 1
    rejected = unit_vector(stub, "m2")
    old = {i.item_id: i.score for i in before.items}
    for item in after.items:  # the query moved by -weight * m2's vector: each score by -weight * cosine
        expected = old[item.item_id] - weight * float(unit_vector(stub, item.item_id) @ rejected)
        assert item.score == pytest.approx(expected, abs=2e-4)
    # Films like the rejected one move down the ranking of the rest; films unlike it move up.
    rest = [i for i in ids_of(before.items) if i != "m2"]
    moved = {i: ids_of(after.items).index(i) - rest.index(i) for i in rest}
    similarity = {i: float(unit_vector(stub, i) @ rejected) for i in rest}
    close = [moved[i] for i in rest if similarity[i] > 0.65]
    unlike = [moved[i] for i in rest if similarity[i] <= 0.5]
    assert close and unlike and np.mean(close) >= 1 and np.mean(unlike) <= 0


def test_unknown_rejected_ids_are_ignored_and_counted(stub):
    counted = metrics.REJECTED_UNKNOWN._value.get()
    plain = stub.Recommend(request("m1", k=5), timeout=10)
    ignored = stub.Recommend(request("m1", k=5, rejected_item_ids=["gone-1", "gone-2"]), timeout=10)
    assert [(i.item_id, i.score) for i in ignored.items] == [(i.item_id, i.score) for i in plain.items]
    assert metrics.REJECTED_UNKNOWN._value.get() == counted + 2


@pytest.mark.parametrize("fields, field", [
    ({"rejected_item_ids": ["m2", ""]}, "rejected_item_ids[1]"),
    ({"rejected_item_ids": ["m2", "x" * 2001]}, "rejected_item_ids[1]"),
    ({"rejected_item_ids": [f"r{i}" for i in range(1001)]}, "rejected_item_ids"),
    ({"min_score": math.nan}, "min_score"),
    ({"min_score": math.inf}, "min_score"),
])
def test_bad_rejections_and_thresholds_name_their_field(stub, fields, field):
    error = call_error(stub.Recommend, request("m1", **fields))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in details(error)["bad_request"].field_violations] == [field]


def serve(bundle):
    return BackgroundServer(settings_for(bundle)).start()


def test_a_bundle_without_the_rejected_weight_still_loads_and_a_zero_weight_only_excludes(bundle_copy):
    old = bundle_copy()
    manifest = json.loads((old / mf.MANIFEST_FILE).read_text())
    del manifest["rejected_item_weight"]  # as exported before the field existed
    (old / mf.MANIFEST_FILE).write_text(json.dumps(manifest))
    mf.write_manifest_digest(old)
    running = serve(old)
    try:
        with grpc.insecure_channel(running.target) as channel:
            info = pb_grpc.RecommenderStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    finally:
        running.close()
    assert info.rejected_item_weight == pytest.approx(DEFAULT_REJECTED_WEIGHT)

    running = serve(bundle_copy(rejected_item_weight=0.0))
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.RecommenderStub(channel)
            plain = stub.Recommend(request("m1", k=ALL), timeout=10)
            rejected = stub.Recommend(request("m1", k=ALL, rejected_item_ids=["m2"]), timeout=10)
    finally:
        running.close()
    assert [(i.item_id, i.score) for i in rejected.items] == [(i.item_id, i.score) for i in plain.items
                                                              if i.item_id != "m2"]


# --- score threshold ------------------------------------------------------------------------------------------


def test_min_score_drops_the_items_below_it_and_can_leave_none(stub):
    full = stub.Recommend(request("m1", "m13", k=10), timeout=10)
    threshold = full.items[4].score  # a score the server sent: items 1-5 reach it exactly
    kept = stub.Recommend(request("m1", "m13", k=10, min_score=threshold), timeout=10)
    assert [(i.item_id, i.score, i.rank) for i in kept.items] == \
        [(i.item_id, i.score, i.rank) for i in full.items if i.score >= threshold]
    assert 5 <= len(kept.items) < 10 and all(i.score >= threshold for i in kept.items)
    assert stub.Recommend(request("m1", k=10, min_score=full.items[0].score + 1.0), timeout=10).items == []
    stream = list(stub.RecommendStream(request("m1", "m13", k=10, min_score=threshold, page_size=2), timeout=10))
    assert [i.item_id for page in stream for i in page.items] == ids_of(kept.items)


# --- sessions -------------------------------------------------------------------------------------------------


def test_a_session_rejection_and_threshold(server):
    with RecommenderClient(server.target, timeout_s=30) as client, client.session() as live:
        first = live.configure(k=5, history=["m1"])
        top = first.items[0].item_id
        rejected = live.reject(top)
        assert rejected.ok and top not in [i.item_id for i in rejected.items] and len(rejected.items) == 5
        floor = rejected.items[2].score
        strict = live.configure(k=5, min_score=floor)  # the rejection is kept: an empty list keeps them
        assert strict.ok and top not in [i.item_id for i in strict.items]
        assert [i.item_id for i in strict.items] == [i.item_id for i in rejected.items[:3]]
        assert live.configure(k=5, rejected=["m5"]).items[0].item_id == top  # a non-empty list replaces them
        bad = live.reject("")
        assert bad.code_name == "INVALID_ARGUMENT" and "rejection is empty" in bad.message
        assert live.interact("m2").ok  # the session goes on


# --- client library and command line ---------------------------------------------------------------------------


def test_the_client_library_batches_rejects_and_thresholds(server):
    with RecommenderClient(server.target, timeout_s=30) as client:
        batch = client.recommend_batch([{"history": ["m1"], "k": 3, "rejected": ["m2"]},
                                        {"history": ["m1"], "k": 0},
                                        {"query": "funny", "k": 2, "min_score": -5.0}])
        assert [entry.ok for entry in batch.results] == [True, False, True]
        assert "m2" not in [i.item_id for i in batch.results[0].items] and len(batch.results[2].items) == 2
        error = batch.results[1].error
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT and not error.retryable
        assert [v.field for v in error.field_violations] == ["requests[1].k"] and error.reason == "INVALID_FIELD"
        single = client.recommend(["m1"], k=3, rejected=["m2"])
        assert [i.item_id for i in single.items] == [i.item_id for i in batch.results[0].items]
        assert client.recommend(["m1"], k=3, min_score=single.items[0].score + 1).items == []


def test_the_cli_recommends_with_rejections_and_a_threshold_and_runs_a_batch(server, tmp_path):
    result = runner.invoke(app, ["recommend", "--target", server.target, "--item", "m1", "--k", "4",
                                 "--reject", "m2", "--reject", "m3", "--min-score", "-5", "--json"])
    assert result.exit_code == 0, result.output
    assert not {"m2", "m3"} & {i["item_id"] for i in json.loads(result.stdout)["items"]}

    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(json.dumps(r) for r in (
        {"history": ["m1"], "k": 2}, {"history": ["m1", "nope"]}, {"query": "space", "k": 1, "rejected": ["m1"]})))
    batch = runner.invoke(app, ["batch", str(requests), "--target", server.target, "--json"])
    assert batch.exit_code == 3, batch.output  # one permanent failure among them
    lines = [json.loads(line) for line in batch.stdout.splitlines()]
    assert [len(line["items"]) for line in lines] == [2, 0, 1] and lines[1]["error"]["code"] == "NOT_FOUND"
    table = runner.invoke(app, ["batch", str(requests), "--target", server.target])
    assert "request 1: error: NOT_FOUND" in table.output and "request 0:" in table.output

    requests.write_text(json.dumps({"history": ["m1"], "colour": "red"}))
    assert runner.invoke(app, ["batch", str(requests), "--target", server.target]).exit_code == 2
