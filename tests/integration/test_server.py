"""The real grpc.aio server on the tiny bundle, called through the generated stubs."""

from __future__ import annotations

import queue
import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from llmrec.manifest import VECTORS_FILE, read_manifest
from llmrec.v1 import recommender_pb2 as pb
from llmrec.v1 import recommender_pb2_grpc as pb_grpc
from rpc_helpers import call_error, ids_of
from llmrec.server.validation import EMPTY_USER_MESSAGE

STAR_WARS = ["m1", "m2", "m3"]


def history(*ids: str) -> list[pb.HistoryItem]:
    return [pb.HistoryItem(item_id=i) for i in ids]


@pytest.fixture(scope="module")
def manifest(tiny_bundle):
    return read_manifest(tiny_bundle, verify_hashes=False)


@pytest.fixture(scope="module")
def catalogue_ids(tiny_catalogue) -> set[str]:
    return {item_id for item_id, _ in tiny_catalogue}


# --- Recommend -----------------------------------------------------------------------------------------


def test_recommend_returns_k_distinct_catalogue_items_by_descending_score(stub, manifest, tiny_catalogue):
    response = stub.Recommend(pb.RecommendRequest(history=history(*STAR_WARS), k=10), timeout=10)
    titles = dict((item_id, item.title) for item_id, item in tiny_catalogue)
    assert len(response.items) == 10
    assert len(set(ids_of(response.items))) == 10
    assert all(titles[i.item_id] == i.title for i in response.items)
    scores = [i.score for i in response.items]
    assert scores == sorted(scores, reverse=True)
    assert [i.rank for i in response.items] == list(range(1, 11))
    assert response.model_version == manifest.bundle_version
    assert response.index_version == f"{manifest.bundle_version}:{manifest.item_count}"


def test_scores_are_the_inner_product_of_the_user_vector_with_the_index_rows(stub, tiny_bundle, tiny_catalogue):
    """The scoring contract: score = [user_vector, 1] . [item_vector, item_bias], user vector as Embed gives it."""
    user = pb.UserInput(history=history("m1", "m27"), context=pb.Context(device="tv"))
    ranking = stub.Recommend(pb.RecommendRequest(history=user.history, context=user.context, k=42), timeout=10)
    user_vector = np.array(stub.Embed(pb.EmbedRequest(users=[user]), timeout=10).users[0].values, np.float32)
    rows = np.load(tiny_bundle / VECTORS_FILE)
    row_of = {item_id: row for row, (item_id, _) in enumerate(tiny_catalogue)}
    expected = rows @ np.append(user_vector, 1.0).astype(np.float32)
    served = np.array([i.score for i in ranking.items])
    np.testing.assert_allclose(served, expected[[row_of[i.item_id] for i in ranking.items]], atol=1e-4)
    assert ids_of(ranking.items)[:5] == [tiny_catalogue[r][0] for r in np.argsort(-expected)[:5]]


def test_exclusions_apply_inside_the_search_and_k_items_still_come_back(stub):
    full = stub.Recommend(pb.RecommendRequest(history=history(*STAR_WARS), k=42), timeout=10)
    unseen = [i for i in ids_of(full.items) if i not in STAR_WARS]
    excluded = unseen[:2]
    response = stub.Recommend(pb.RecommendRequest(
        history=history(*STAR_WARS), k=10, exclude_history=True, exclude_item_ids=[*excluded, "no-such-id"]),
        timeout=10)
    got = ids_of(response.items)
    assert len(got) == 10
    assert not set(got) & {*STAR_WARS, *excluded}
    assert got == unseen[2:12]  # the same order as the unfiltered ranking, minus the exclusions


def test_history_items_can_be_recommended_unless_excluded(stub):
    got = ids_of(stub.Recommend(pb.RecommendRequest(history=history(*STAR_WARS), k=5), timeout=10).items)
    assert set(STAR_WARS) & set(got)


def test_fewer_than_k_only_when_exclusions_exhaust_the_catalogue(stub):
    response = stub.Recommend(pb.RecommendRequest(history=history(*STAR_WARS), k=42, exclude_history=True),
                              timeout=10)
    assert len(response.items) == 39


def test_raw_text_history_and_query_only_requests(stub, catalogue_ids):
    text_item = pb.HistoryItem(text=pb.ItemText(title="Blade Runner (1982)", categories=["Sci-Fi", "Noir"],
                                                description="A detective hunts replicants in Los Angeles."))
    mixed = stub.Recommend(pb.RecommendRequest(history=[*history("m1"), text_item], k=5), timeout=10)
    assert len(mixed.items) == 5 and set(ids_of(mixed.items)) <= catalogue_ids
    query_only = stub.Recommend(pb.RecommendRequest(context=pb.Context(query="space adventure"), k=5), timeout=10)
    assert len(query_only.items) == 5


def test_context_changes_the_ranking(stub):
    base = pb.RecommendRequest(history=history("m1", "m13"), k=42)
    plain = stub.Recommend(base, timeout=10)
    with_query = pb.RecommendRequest()
    with_query.CopyFrom(base)
    with_query.context.query = "romantic comedy"
    assert [i.score for i in stub.Recommend(with_query, timeout=10).items] != [i.score for i in plain.items]


def test_concurrent_requests_get_the_same_answer(stub):
    request = pb.RecommendRequest(history=history(*STAR_WARS), k=10)
    expected = ids_of(stub.Recommend(request, timeout=10).items)
    results: queue.Queue = queue.Queue()
    threads = [threading.Thread(target=lambda: results.put(ids_of(stub.Recommend(request, timeout=30).items)))
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [results.get_nowait() for _ in threads] == [expected] * 8


# --- RecommendStream -----------------------------------------------------------------------------------


@pytest.mark.parametrize("k, page_size, sizes", [(10, 3, [3, 3, 3, 1]), (25, 0, [10, 10, 5]), (4, 4, [4])])
def test_stream_pages_concatenate_to_the_unary_result(stub, k, page_size, sizes):
    request = pb.RecommendRequest(history=history(*STAR_WARS), k=k, page_size=page_size, exclude_item_ids=["m5"])
    pages = list(stub.RecommendStream(request, timeout=10))
    assert [len(p.items) for p in pages] == sizes
    assert [p.page for p in pages] == list(range(len(sizes)))
    assert [p.last for p in pages] == [False] * (len(sizes) - 1) + [True]
    assert all(p.model_version and p.index_version for p in pages)
    unary = stub.Recommend(request, timeout=10)
    streamed = [i for p in pages for i in p.items]
    assert ids_of(streamed) == ids_of(unary.items)
    assert [i.rank for i in streamed] == list(range(1, k + 1))


def test_stream_refuses_a_negative_page_size(stub):
    responses = stub.RecommendStream(pb.RecommendRequest(history=history("m1"), k=5, page_size=-1), timeout=10)
    with pytest.raises(grpc.RpcError) as caught:
        list(responses)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_size" in caught.value.details()


# --- Session -------------------------------------------------------------------------------------------


class LiveSession:
    """Lock-step driver for the bidirectional Session stream."""

    def __init__(self, stub: pb_grpc.RecommenderStub, timeout: float = 30) -> None:
        self._requests: queue.Queue = queue.Queue()
        self._responses = stub.Session(iter(self._requests.get, None), timeout=timeout)

    def send(self, event_id: str, **event) -> pb.SessionResponse:
        self._requests.put(pb.SessionRequest(event_id=event_id, **event))
        return next(self._responses)

    def close(self) -> list[pb.SessionResponse]:
        self._requests.put(None)
        return list(self._responses)


def test_session_answers_each_event_and_survives_a_bad_one(stub, catalogue_ids):
    live = LiveSession(stub)
    first = live.send("e1", config=pb.SessionConfig(k=5))
    assert first.event_id == "e1" and first.status.code == 0 and not first.items
    assert first.status.message  # says there is nothing to rank from yet

    after_star_wars = live.send("e2", interaction=pb.HistoryItem(item_id="m1"))
    assert after_star_wars.status.code == 0 and after_star_wars.history_length == 1
    assert len(after_star_wars.items) == 5 and set(ids_of(after_star_wars.items)) <= catalogue_ids
    assert after_star_wars.model_version and after_star_wars.index_version

    with_query = live.send("e3", query="romantic comedy")
    assert with_query.status.code == 0 and with_query.history_length == 1
    assert [i.score for i in with_query.items] != [i.score for i in after_star_wars.items]

    with_context = live.send("e4", context=pb.Context(device="mobile", locale="en-GB"))  # replaces the query too
    assert with_context.status.code == 0 and len(with_context.items) == 5

    bad = live.send("e5", interaction=pb.HistoryItem(item_id="no-such-film"))
    assert bad.event_id == "e5"
    assert bad.status.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert "no-such-film" in bad.status.message
    assert not bad.items and bad.history_length == 1  # the bad event changed nothing

    bad_k = live.send("e6", config=pb.SessionConfig(k=1000))
    assert bad_k.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "k" in bad_k.status.message

    empty_event = live.send("e7")
    assert empty_event.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]

    still_open = live.send("e8", interaction=pb.HistoryItem(text=pb.ItemText(title="Gravity (2013)")))
    assert still_open.status.code == 0 and still_open.history_length == 2 and len(still_open.items) == 5
    assert live.close() == []


def test_session_config_history_and_exclusions(stub):
    live = LiveSession(stub)
    configured = live.send("c", config=pb.SessionConfig(k=8, exclude_history=True, exclude_item_ids=["m5"],
                                                        history=history(*STAR_WARS)))
    assert configured.status.code == 0 and configured.history_length == 3
    assert len(configured.items) == 8 and not set(ids_of(configured.items)) & {*STAR_WARS, "m5"}
    more = live.send("i", interaction=pb.HistoryItem(item_id="m4"))
    assert more.history_length == 4 and "m4" not in ids_of(more.items)
    live.close()


def test_session_is_closed_after_the_idle_timeout(start_server):
    idle_server = start_server(session_idle_timeout_s=0.5)
    with grpc.insecure_channel(idle_server.target) as channel:
        live = LiveSession(pb_grpc.RecommenderStub(channel))
        assert live.send("1", interaction=pb.HistoryItem(item_id="m1")).status.code == 0
        with pytest.raises(grpc.RpcError) as caught:
            next(live._responses)  # send nothing: the server gives up after 0.5 s
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "without an event" in caught.value.details()


# --- Embed, GetModelInfo -------------------------------------------------------------------------------


def test_embed_returns_unit_vectors_of_the_model_dimension(stub, manifest):
    request = pb.EmbedRequest(
        items=[pb.ItemText(title="Star Wars (1977)", categories=["Sci-Fi"]), pb.ItemText(title="Titanic (1997)")],
        users=[pb.UserInput(history=history("m1")), pb.UserInput(context=pb.Context(query="funny films"))],
    )
    response = stub.Embed(request, timeout=10)
    vectors = np.array([v.values for v in [*response.items, *response.users]])
    assert vectors.shape == (4, 384) and manifest.dimension == 384
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert response.model_version == manifest.bundle_version
    assert vectors[0] @ vectors[2] > vectors[1] @ vectors[2]  # Star Wars text is nearer a Star Wars fan
    alone = [np.array(stub.Embed(pb.EmbedRequest(items=request.items[:1]), timeout=10).items[0].values)
             for _ in range(2)]
    np.testing.assert_array_equal(alone[0], alone[1])  # deterministic
    # Dynamic INT8 quantizes activations per batch, so batch mates move a vector slightly (not at FP32).
    assert alone[0] @ vectors[0] > 0.98


def test_get_model_info_reports_every_field(stub, manifest):
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert info.model_version == manifest.bundle_version
    assert info.index_version == f"{manifest.bundle_version}:{manifest.item_count}"
    assert info.template_version == manifest.template_version == "1"
    assert info.base_model == manifest.base_model and info.base_model
    assert info.dimension == 384 and info.item_count == 42
    assert info.execution_provider == "CPUExecutionProvider" and info.model_precision == "int8"
    assert (info.max_k, info.max_history_items, info.max_text_chars) == (100, 500, 2000)
    assert info.created_at == manifest.created_at
    assert info.history_item_score == manifest.history_item_score


# --- health and reflection -----------------------------------------------------------------------------


def test_health_check_and_watch(channel):
    health = health_pb2_grpc.HealthStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    for service in ("", "llmrec.v1.Recommender"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == serving
    unknown = call_error(health.Check, health_pb2.HealthCheckRequest(service="no.Such"))
    assert unknown.code() == grpc.StatusCode.NOT_FOUND
    watch = health.Watch(health_pb2.HealthCheckRequest(service="llmrec.v1.Recommender"), timeout=5)
    assert next(watch).status == serving
    watch.cancel()


def test_not_serving_until_loaded(start_server):
    """Bound but not loaded: health NOT_SERVING and RPCs UNAVAILABLE; SERVING once the model is warm."""
    pending = start_server(load=False)
    with grpc.insecure_channel(pending.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="llmrec.v1.Recommender")
        watch = health.Watch(request, timeout=60)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        early = call_error(pb_grpc.RecommenderStub(channel).Recommend,
                           pb.RecommendRequest(history=history("m1"), k=3))
        assert early.code() == grpc.StatusCode.UNAVAILABLE
        pending.load()
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        assert len(pb_grpc.RecommenderStub(channel).Recommend(
            pb.RecommendRequest(history=history("m1"), k=3), timeout=10).items) == 3


def test_reflection_lists_the_services(channel):
    services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "llmrec.v1.Recommender" in services and "grpc.health.v1.Health" in services


# --- bad requests --------------------------------------------------------------------------------------

LONG = "x" * 2001


@pytest.mark.parametrize("request_, code, words", [
    (pb.RecommendRequest(k=10), grpc.StatusCode.INVALID_ARGUMENT, [EMPTY_USER_MESSAGE]),
    (pb.RecommendRequest(k=10, context=pb.Context(query="   ")), grpc.StatusCode.INVALID_ARGUMENT,
     ["history is empty"]),
    (pb.RecommendRequest(history=history("m1", "zz-unknown"), k=10), grpc.StatusCode.NOT_FOUND,
     ["'zz-unknown'", "unknown item id"]),
    (pb.RecommendRequest(history=history("m1"), k=0), grpc.StatusCode.INVALID_ARGUMENT, ["k must be", "got 0"]),
    (pb.RecommendRequest(history=history("m1"), k=-3), grpc.StatusCode.INVALID_ARGUMENT, ["got -3"]),
    (pb.RecommendRequest(history=history("m1"), k=101), grpc.StatusCode.INVALID_ARGUMENT, ["100", "got 101"]),
    (pb.RecommendRequest(history=history("m1"), k=5, context=pb.Context(query=LONG)),
     grpc.StatusCode.INVALID_ARGUMENT, ["context.query", "2001", "2000"]),
    (pb.RecommendRequest(history=[pb.HistoryItem(text=pb.ItemText(title="ok", description=LONG))], k=5),
     grpc.StatusCode.INVALID_ARGUMENT, ["history[0].text.description"]),
    (pb.RecommendRequest(history=[pb.HistoryItem(text=pb.ItemText(title="ok", categories=["a", LONG]))], k=5),
     grpc.StatusCode.INVALID_ARGUMENT, ["history[0].text.categories[1]"]),
    (pb.RecommendRequest(history=[*history("m1"), pb.HistoryItem()], k=5), grpc.StatusCode.INVALID_ARGUMENT,
     ["history[1]", "item_id", "text"]),
    (pb.RecommendRequest(history=[pb.HistoryItem(text=pb.ItemText(categories=["Drama"]))], k=5),
     grpc.StatusCode.INVALID_ARGUMENT, ["title"]),
    (pb.RecommendRequest(history=history(*["m1"] * 501), k=5), grpc.StatusCode.INVALID_ARGUMENT,
     ["501", "500"]),
    (pb.RecommendRequest(history=history("m1"), k=5, context=pb.Context(utc_offset_minutes=100_000)),
     grpc.StatusCode.INVALID_ARGUMENT, ["utc_offset_minutes"]),
    (pb.RecommendRequest(history=history("m1"), k=5, context=pb.Context(device=LONG)),
     grpc.StatusCode.INVALID_ARGUMENT, ["context.device"]),
], ids=["empty", "blank-query", "unknown-id", "k0", "k-negative", "k-too-big", "long-query", "long-description",
        "long-category", "neither-id-nor-text", "no-title", "too-much-history", "bad-utc-offset", "long-device"])
def test_bad_recommend_requests_get_a_readable_status(stub, request_, code, words):
    error = call_error(stub.Recommend, request_)
    assert error.code() == code
    for word in words:
        assert word in error.details()


def test_limits_are_inclusive(stub):
    request = pb.RecommendRequest(history=history(*["m1"] * 500), k=100,
                                  context=pb.Context(query="y" * 2000))
    assert len(stub.Recommend(request, timeout=30).items) == 42  # k=100 on a 42-item catalogue


def test_bad_embed_requests(stub):
    empty_user = call_error(stub.Embed, pb.EmbedRequest(users=[pb.UserInput()]))
    assert empty_user.code() == grpc.StatusCode.INVALID_ARGUMENT and "users[0]" in empty_user.details()
    no_title = call_error(stub.Embed, pb.EmbedRequest(items=[pb.ItemText(brand="Acme")]))
    assert no_title.code() == grpc.StatusCode.INVALID_ARGUMENT and "items[0].title" in no_title.details()
    too_many = call_error(stub.Embed, pb.EmbedRequest(items=[pb.ItemText(title="t")] * 257))
    assert too_many.code() == grpc.StatusCode.INVALID_ARGUMENT and "256" in too_many.details()
    unknown = call_error(stub.Embed, pb.EmbedRequest(users=[pb.UserInput(history=history("nope"))]))
    assert unknown.code() == grpc.StatusCode.NOT_FOUND


def test_unexpected_failures_are_internal_with_a_generic_message(start_server, caplog):
    broken = start_server()

    def explode(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    broken.server.recommender.search = explode
    with grpc.insecure_channel(broken.target) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        error = call_error(stub.Recommend, pb.RecommendRequest(history=history("m1"), k=3))
        assert error.code() == grpc.StatusCode.INTERNAL
        assert "secret" not in error.details() and "server log" in error.details()
        live = LiveSession(stub)
        failed = live.send("1", interaction=pb.HistoryItem(item_id="m1"))
        assert failed.status.code == grpc.StatusCode.INTERNAL.value[0] and failed.history_length == 0
        assert live.send("2", config=pb.SessionConfig(k=1000)).status.code == 3  # the session went on
        live.close()
    assert "secret internal detail" in caplog.text  # logged for the operator, with the traceback
