"""The fast path through the real server: catalogued-only requests are ranked without the encoder, exactly as the
scoring rule ranks the fast path's user vector (the bundle's user map's prediction, or zero without one) with the
bundle's fast-path adjustments; everything else takes the full path."""

from __future__ import annotations

import json
import queue

import grpc
import numpy as np
import pytest

from llmrec import manifest as mf
from llmrec.cooccurrence import CooccurrenceTable
from llmrec.fast_user import FEATURE_RECENCIES, FastUserMap
from llmrec.item_record import read_items
from llmrec.server.metrics import REGISTRY
from llmrec.v1 import recommender_pb2 as pb
from llmrec.v1 import recommender_pb2_grpc as pb_grpc
from conftest import BackgroundServer, settings_for
from rpc_helpers import ids_of

# Weights the tiny bundle (a pretrained encoder: no adjustments of its own) does not have, so that the fast path's
# ranking differs from the bias-only ranking a zero user vector alone would give.
FAST = {"history_item_score": -0.5, "cooccurrence_weight": 0.0, "history_vector_weight": 1.0, "sequence_weight": 0.0}
HISTORY = ["m1", "m4", "m9"]


@pytest.fixture
def fast_bundle(bundle_copy):
    return bundle_copy(fast_path=FAST)


@pytest.fixture
def mapped_bundle(bundle_copy):
    """The tiny bundle with fast-path adjustments and a user map: the latest item's vector, turned (a fixed random
    rotation), as the user vector."""
    bundle = bundle_copy(fast_path={**FAST, "user_map": True})
    manifest = json.loads((bundle / mf.MANIFEST_FILE).read_text())
    dimension = manifest["dimension"]
    rotation, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(dimension, dimension)))
    weights = np.zeros((len(FEATURE_RECENCIES) * dimension + 1, dimension), np.float32)
    weights[:dimension] = rotation
    np.save(bundle / mf.FAST_USER_MAP_FILE, weights)
    manifest["files"][mf.FAST_USER_MAP_FILE] = mf.sha256_file(bundle / mf.FAST_USER_MAP_FILE)
    (bundle / mf.MANIFEST_FILE).write_text(json.dumps(manifest))
    mf.write_manifest_digest(bundle)
    return bundle


@pytest.fixture
def start_server():
    """Factory for a private server of another bundle: start_server(bundle, **settings)."""
    started: list[BackgroundServer] = []

    def start(bundle, **overrides) -> BackgroundServer:
        started.append(BackgroundServer(settings_for(bundle, **overrides)))
        return started[-1].start()

    yield start
    for running in started:
        running.close()


def request(history=HISTORY, k=10, **fields) -> pb.RecommendRequest:
    return pb.RecommendRequest(history=[pb.HistoryItem(item_id=i) for i in history], k=k, **fields)


def encoder_runs() -> float:
    return sum(REGISTRY.get_sample_value("llmrec_runs_total", {"lane": lane}) or 0.0 for lane in ("alone", "parallel"))


def rankings(path: str) -> float:
    return REGISTRY.get_sample_value("llmrec_rankings_total", {"path": path}) or 0.0


def expected(bundle, history, k):
    """The top k of ScoringRule.dense_scores with the manifest's fast adjustments and the fast path's user vector:
    the bundle's user map's prediction (llmrec.fast_user), or zero without one."""
    manifest = mf.read_manifest(bundle)
    rows = np.load(bundle / mf.VECTORS_FILE)
    ids = [item_id for item_id, _ in read_items(bundle / mf.ITEMS_FILE)]
    row_of = {item_id: n for n, item_id in enumerate(ids)}
    rule = manifest.fast_scoring_rule()
    history_rows = [row_of[i] for i in history]
    user = np.zeros((1, manifest.dimension), np.float32)
    if manifest.fast_path.user_map:
        user = FastUserMap(np.load(bundle / mf.FAST_USER_MAP_FILE)).user_vectors([rows[history_rows, :-1]])
    scores = rule.dense_scores(user, rows, [history_rows], CooccurrenceTable.load(bundle / mf.COOCCURRENCE_FILE))[0]
    order = np.argsort(-scores, kind="stable")[:k]
    return [ids[n] for n in order], scores[order]


def test_catalogued_only_request_is_ranked_without_the_encoder_exactly_as_the_rule(start_server, fast_bundle):
    server = start_server(fast_bundle)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).fast_path
        runs, fast = encoder_runs(), rankings("fast")
        response = stub.Recommend(request(k=10), timeout=10)
        assert encoder_runs() == runs  # no encoder run
        assert rankings("fast") == fast + 1
        want_ids, want_scores = expected(fast_bundle, HISTORY, 10)
        assert response.serving_path == pb.SERVING_PATH_FAST
        assert ids_of(response.items) == want_ids
        assert [item.score for item in response.items] == pytest.approx(want_scores.tolist(), abs=1e-5)
        # the time, device and locale of the context do not close the fast path (docs/serving.md)
        timed = stub.Recommend(request(context=pb.Context(device="mobile", locale="en-US", utc_offset_minutes=60)),
                               timeout=10)
        assert timed.serving_path == pb.SERVING_PATH_FAST and ids_of(timed.items) == want_ids


def test_the_fast_path_user_map_predicts_the_user_vector_as_the_rule_says(start_server, fast_bundle, mapped_bundle):
    for bundle in (mapped_bundle, fast_bundle):
        server = start_server(bundle)
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.RecommenderStub(channel)
            runs = encoder_runs()
            response = stub.Recommend(request(k=10), timeout=10)
            assert encoder_runs() == runs and response.serving_path == pb.SERVING_PATH_FAST
            want_ids, want_scores = expected(bundle, HISTORY, 10)
            assert ids_of(response.items) == want_ids
            assert [item.score for item in response.items] == pytest.approx(want_scores.tolist(), abs=1e-5)
        if bundle is mapped_bundle:
            mapped = want_ids
    assert mapped != want_ids  # the map's user vector changes the ranking


def test_a_user_map_of_the_wrong_size_is_refused_at_load(mapped_bundle):
    from llmrec.server.bundle import LoadedBundle

    np.save(mapped_bundle / mf.FAST_USER_MAP_FILE, np.zeros((7, 3), np.float32))
    manifest = json.loads((mapped_bundle / mf.MANIFEST_FILE).read_text())
    manifest["files"][mf.FAST_USER_MAP_FILE] = mf.sha256_file(mapped_bundle / mf.FAST_USER_MAP_FILE)
    (mapped_bundle / mf.MANIFEST_FILE).write_text(json.dumps(manifest))
    mf.write_manifest_digest(mapped_bundle)
    with pytest.raises(mf.BundleError, match="unreadable model/fast_user_map.npy"):
        LoadedBundle.load(mapped_bundle, prefer_gpu=False)


def test_a_query_a_text_item_or_the_request_field_take_the_full_path(start_server, fast_bundle):
    server = start_server(fast_bundle)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        text_item = pb.HistoryItem(text=pb.ItemText(title="A film about space pirates"))
        full = [request(context=pb.Context(query="space")),
                pb.RecommendRequest(history=[pb.HistoryItem(item_id="m1"), text_item], k=5),
                request(force_full_path=True)]
        for message in full:
            runs = encoder_runs()
            response = stub.Recommend(message, timeout=10)
            assert response.serving_path == pb.SERVING_PATH_FULL and len(response.items) >= 5
            assert encoder_runs() > runs
        batch = stub.RecommendBatch(pb.RecommendBatchRequest(requests=[request(k=3), full[0]]), timeout=10)
        assert [r.serving_path for r in batch.results] == [pb.SERVING_PATH_FAST, pb.SERVING_PATH_FULL]
        assert ids_of(batch.results[0].items) == expected(fast_bundle, HISTORY, 3)[0]
        pages = list(stub.RecommendStream(request(k=4, page_size=2), timeout=10))
        assert {p.serving_path for p in pages} == {pb.SERVING_PATH_FAST}


def test_encoder_path_always_forces_the_full_path(start_server, fast_bundle):
    server = start_server(fast_bundle, encoder_path="always")
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        assert not stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).fast_path
        assert stub.Recommend(request(), timeout=10).serving_path == pb.SERVING_PATH_FULL


def test_a_bundle_without_fast_adjustments_takes_the_full_path(stub, start_server, bundle_copy):
    assert not stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).fast_path  # exported with fast_path null
    runs = encoder_runs()
    assert stub.Recommend(request(), timeout=10).serving_path == pb.SERVING_PATH_FULL
    assert encoder_runs() > runs
    old = bundle_copy()
    manifest = json.loads((old / mf.MANIFEST_FILE).read_text())
    del manifest["fast_path"]  # as exported before the field existed
    (old / mf.MANIFEST_FILE).write_text(json.dumps(manifest))
    mf.write_manifest_digest(old)
    with grpc.insecure_channel(start_server(old).target) as channel:
        assert pb_grpc.RecommenderStub(channel).Recommend(request(), timeout=10).serving_path == pb.SERVING_PATH_FULL


def test_a_fast_sequence_weight_needs_the_bundles_sequence_model(tiny_bundle):
    manifest = json.loads((tiny_bundle / mf.MANIFEST_FILE).read_text())
    assert manifest["sequence_model"] is None
    with pytest.raises(mf.BundleError, match="fast_path.sequence_weight needs the bundle's sequence model"):
        mf.Manifest.from_dict({**manifest, "fast_path": {**FAST, "sequence_weight": 0.5}})


def test_session_interactions_with_catalogued_items_run_no_encoder(start_server, fast_bundle):
    server = start_server(fast_bundle)
    with grpc.insecure_channel(server.target) as channel:
        requests: queue.Queue = queue.Queue()
        responses = pb_grpc.RecommenderStub(channel).Session(iter(requests.get, None), timeout=30)

        def send(**event) -> pb.SessionResponse:
            requests.put(pb.SessionRequest(**event))
            return next(responses)

        assert send(config=pb.SessionConfig(k=5)).serving_path == pb.SERVING_PATH_UNSPECIFIED  # nothing to rank
        runs = encoder_runs()
        for item_id in HISTORY:
            answer = send(interaction=pb.HistoryItem(item_id=item_id))
            assert answer.status.code == 0 and answer.serving_path == pb.SERVING_PATH_FAST
        assert encoder_runs() == runs
        assert ids_of(answer.items) == expected(fast_bundle, HISTORY, 5)[0]
        assert send(query="space").serving_path == pb.SERVING_PATH_FULL
        assert send(query="").serving_path == pb.SERVING_PATH_FAST
        assert send(config=pb.SessionConfig(k=5, force_full_path=True)).serving_path == pb.SERVING_PATH_FULL
        requests.put(None)
        list(responses)


def test_the_client_reports_the_path_and_can_force_the_full_one(start_server, fast_bundle):
    from llmrec.clients.client import RecommenderClient

    server = start_server(fast_bundle)
    with RecommenderClient(server.target) as client:
        fast = client.recommend(HISTORY, k=5)
        full = client.recommend(HISTORY, k=5, force_full_path=True)
    assert (fast.serving_path, full.serving_path) == ("fast", "full")
    assert [item.item_id for item in fast.items] == expected(fast_bundle, HISTORY, 5)[0]
