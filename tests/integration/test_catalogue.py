"""Catalogue changes through the real gRPC server on the tiny bundle: upsert, delete, get, list, filters,
durability across an in-process restart, and the errors."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest

from llmrec.manifest import read_manifest
from llmrec.v1 import recommender_pb2 as pb
from llmrec.v1 import recommender_pb2_grpc as pb_grpc
from rpc_helpers import call_error, ids_of

GRAVITY = pb.CatalogueItem(
    item_id="new-gravity",
    text=pb.ItemText(title="Gravity (2013)", categories=["Sci-Fi", "Space"],
                     description="Two astronauts stranded in orbit after debris destroys their shuttle."),
    attributes={"studio": "Warner Bros.", "decade": "2010s"},
)


@pytest.fixture(scope="module")
def writable(state_server):
    with grpc.insecure_channel(state_server.target) as channel:
        yield pb_grpc.RecommenderStub(channel)


def test_an_upserted_item_is_encoded_by_the_served_model_and_recommended_at_once(writable, tiny_bundle):
    manifest = read_manifest(tiny_bundle, verify_hashes=False)
    before = writable.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    response = writable.UpsertItems(pb.UpsertItemsRequest(items=[GRAVITY]), timeout=10)
    assert (response.created, response.replaced) == (1, 0)
    assert response.item_count == before.item_count + 1
    assert response.index_version != before.index_version and response.index_version.startswith(manifest.bundle_version)
    info = writable.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert info.item_count == response.item_count and info.index_version == response.index_version

    # Text only: [unit text vector, new_item_bias], the text vector being what Embed gives for the same text.
    got = writable.GetItem(pb.GetItemRequest(item_id="new-gravity", include_vector=True), timeout=10)
    assert got.upserted and got.item.text == GRAVITY.text and dict(got.item.attributes) == dict(GRAVITY.attributes)
    text_vector = np.array(writable.Embed(pb.EmbedRequest(items=[GRAVITY.text]), timeout=10).items[0].values)
    row = np.array(got.vector.values)
    assert row.shape == (manifest.dimension + 1,)
    np.testing.assert_allclose(row[:-1], text_vector, atol=1e-6)
    assert row[-1] == pytest.approx(manifest.new_item_bias, abs=1e-7)

    # The very next Recommend sees it, scored by the same contract as every other item.
    ranking = writable.Recommend(pb.RecommendRequest(context=pb.Context(query="astronauts stranded in orbit"), k=3),
                                 timeout=10)
    assert ranking.items[0].item_id == "new-gravity" and ranking.items[0].title == "Gravity (2013)"
    assert ranking.index_version == info.index_version
    user = pb.UserInput(context=pb.Context(query="astronauts stranded in orbit"))
    user_vector = np.array(writable.Embed(pb.EmbedRequest(users=[user]), timeout=10).users[0].values)
    assert ranking.items[0].score == pytest.approx(float(np.append(user_vector, 1.0) @ row), abs=1e-4)
    # ... and it can be part of a history.
    assert writable.Recommend(pb.RecommendRequest(history=[pb.HistoryItem(item_id="new-gravity")], k=3),
                              timeout=10).items


def test_replace_then_delete(writable):
    changed = pb.CatalogueItem(item_id="m14", text=pb.ItemText(title="Airplane! (1980, remastered)",
                                                               categories=["Comedy", "Parody"]))
    response = writable.UpsertItems(pb.UpsertItemsRequest(items=[changed]), timeout=10)
    assert (response.created, response.replaced) == (0, 1)
    got = writable.GetItem(pb.GetItemRequest(item_id="m14"), timeout=10)
    assert got.upserted and got.item.text.title == "Airplane! (1980, remastered)" and not got.HasField("vector")
    top = writable.Recommend(pb.RecommendRequest(context=pb.Context(query="parody"), k=42), timeout=10)
    assert "Airplane! (1980, remastered)" in [i.title for i in top.items]

    deleted = writable.DeleteItems(pb.DeleteItemsRequest(item_ids=["m14", "m15"]), timeout=10)
    assert deleted.deleted == 2 and deleted.item_count == response.item_count - 2
    assert call_error(writable.GetItem, pb.GetItemRequest(item_id="m14")).code() == grpc.StatusCode.NOT_FOUND
    everything = writable.Recommend(pb.RecommendRequest(context=pb.Context(query="comedy"), k=100), timeout=10)
    assert not {"m14", "m15"} & set(ids_of(everything.items)) and len(everything.items) == deleted.item_count
    gone = call_error(writable.Recommend, pb.RecommendRequest(history=[pb.HistoryItem(item_id="m14")], k=3))
    assert gone.code() == grpc.StatusCode.NOT_FOUND and "m14" in gone.details()

    missing = call_error(writable.DeleteItems, pb.DeleteItemsRequest(item_ids=["m16", "no-such"]))
    assert missing.code() == grpc.StatusCode.NOT_FOUND and "no-such" in missing.details()
    assert writable.GetItem(pb.GetItemRequest(item_id="m16"), timeout=10).item.item_id == "m16"  # not deleted
    tolerant = writable.DeleteItems(pb.DeleteItemsRequest(item_ids=["no-such"], allow_missing=True), timeout=10)
    assert tolerant.deleted == 0

    restored = writable.UpsertItems(pb.UpsertItemsRequest(items=[changed]), timeout=10)  # a deleted id comes back
    assert restored.created == 1 and writable.GetItem(pb.GetItemRequest(item_id="m14"), timeout=10).upserted


def test_list_items_pages_through_the_live_catalogue(writable):
    total = writable.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).item_count
    seen, token, pages = [], "", 0
    while True:
        page = writable.ListItems(pb.ListItemsRequest(page_size=10, page_token=token), timeout=10)
        assert page.total_count == total and len(page.items) <= 10
        seen += ids_of(page.items)
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == total == len(set(seen)) and seen == sorted(seen) and pages == -(-total // 10)
    first = writable.ListItems(pb.ListItemsRequest(), timeout=10)
    assert len(first.items) == total and not first.next_page_token  # default page size 100
    m1 = next(i for i in first.items if i.item_id == "m1")
    assert m1.text.title == "Star Wars (1977)" and list(m1.text.categories)[:2] == ["Action", "Adventure"]


def test_filters_restrict_inside_the_search(writable, tiny_catalogue):
    fields = dict(tiny_catalogue)
    comedy = writable.Recommend(pb.RecommendRequest(
        history=[pb.HistoryItem(item_id="m1")], k=5,
        filters=[pb.AttributeFilter(key="category", values=["comedy"])]), timeout=10)
    assert len(comedy.items) == 5 and all("Comedy" in fields[i].categories for i in ids_of(comedy.items))
    unfiltered = writable.Recommend(pb.RecommendRequest(history=[pb.HistoryItem(item_id="m1")], k=42), timeout=10)
    in_order = [i for i in ids_of(unfiltered.items) if i in fields and "Comedy" in fields[i].categories]
    assert ids_of(comedy.items) == in_order[:5]  # the unfiltered order, restricted

    animation = writable.Recommend(pb.RecommendRequest(
        context=pb.Context(query="films"), k=10, exclude_item_ids=["m23"],
        filters=[pb.AttributeFilter(key="Category", values=["Animation", "Musical"])]), timeout=10)
    assert set(ids_of(animation.items)) == {"m24", "m25", "m26"}  # fewer than k: only three are left

    by_attribute = writable.Recommend(pb.RecommendRequest(
        context=pb.Context(query="space"), k=5,
        filters=[pb.AttributeFilter(key="studio", values=["warner bros."]),
                 pb.AttributeFilter(key="category", values=["Space"])]), timeout=10)
    assert ids_of(by_attribute.items) == ["new-gravity"]


@pytest.mark.parametrize("method, request_, code, words", [
    ("UpsertItems", pb.UpsertItemsRequest(), grpc.StatusCode.INVALID_ARGUMENT, ["items is empty"]),
    ("UpsertItems", pb.UpsertItemsRequest(items=[pb.CatalogueItem(item_id="x", text=pb.ItemText(title="X"))] * 2),
     grpc.StatusCode.INVALID_ARGUMENT, ["items[1].item_id", "twice"]),
    ("UpsertItems", pb.UpsertItemsRequest(items=[pb.CatalogueItem(item_id="x", text=pb.ItemText(brand="b"))]),
     grpc.StatusCode.INVALID_ARGUMENT, ["items[0].text.title"]),
    ("UpsertItems", pb.UpsertItemsRequest(items=[pb.CatalogueItem(text=pb.ItemText(title="X"))]),
     grpc.StatusCode.INVALID_ARGUMENT, ["items[0].item_id is empty"]),
    ("UpsertItems", pb.UpsertItemsRequest(items=[pb.CatalogueItem(item_id="x", text=pb.ItemText(title="X"),
                                                                   attributes={"": "v"})]),
     grpc.StatusCode.INVALID_ARGUMENT, ["empty key"]),
    ("UpsertItems", pb.UpsertItemsRequest(items=[pb.CatalogueItem(item_id=f"x{n}", text=pb.ItemText(title="X"))
                                                 for n in range(1001)]),
     grpc.StatusCode.INVALID_ARGUMENT, ["1001", "1000"]),
    ("DeleteItems", pb.DeleteItemsRequest(), grpc.StatusCode.INVALID_ARGUMENT, ["item_ids is empty"]),
    ("GetItem", pb.GetItemRequest(), grpc.StatusCode.INVALID_ARGUMENT, ["item_id is empty"]),
    ("GetItem", pb.GetItemRequest(item_id="nope"), grpc.StatusCode.NOT_FOUND, ["'nope'"]),
    ("ListItems", pb.ListItemsRequest(page_size=1001), grpc.StatusCode.INVALID_ARGUMENT, ["page_size", "1000"]),
    ("ListItems", pb.ListItemsRequest(page_token="garbage"), grpc.StatusCode.INVALID_ARGUMENT, ["page_token"]),
    ("Recommend", pb.RecommendRequest(context=pb.Context(query="x"), k=3, filters=[pb.AttributeFilter(key="c")]),
     grpc.StatusCode.INVALID_ARGUMENT, ["filters[0].values is empty"]),
    ("Recommend", pb.RecommendRequest(context=pb.Context(query="x"), k=3,
                                      filters=[pb.AttributeFilter(values=["v"])]),
     grpc.StatusCode.INVALID_ARGUMENT, ["filters[0].key is empty"]),
], ids=["upsert-empty", "upsert-duplicate", "upsert-no-title", "upsert-no-id", "upsert-empty-key",
        "upsert-too-many", "delete-empty", "get-no-id", "get-unknown", "list-page-size", "list-token",
        "filter-no-values", "filter-no-key"])
def test_bad_catalogue_requests_get_a_readable_status(writable, method, request_, code, words):
    error = call_error(getattr(writable, method), request_)
    assert error.code() == code
    for word in words:
        assert word in error.details()


def test_without_a_state_directory_the_catalogue_is_read_only(stub):
    error = call_error(stub.UpsertItems, pb.UpsertItemsRequest(items=[GRAVITY]))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "--state-dir" in error.details()
    error = call_error(stub.DeleteItems, pb.DeleteItemsRequest(item_ids=["m1"]))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert stub.GetItem(pb.GetItemRequest(item_id="m1"), timeout=10).item.text.title == "Star Wars (1977)"
    assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).item_count == 42


def test_concurrent_upserts_and_recommends(writable):
    """Writes serialise on the writer thread while queries run; every acknowledged upsert is then visible."""
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for m in range(5):
                item = pb.CatalogueItem(item_id=f"c{n}-{m}", text=pb.ItemText(title=f"Concurrent {n}-{m}",
                                                                                categories=["Batch"]))
                writable.UpsertItems(pb.UpsertItemsRequest(items=[item]), timeout=30)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    def reader() -> None:
        try:
            for _ in range(10):
                response = writable.Recommend(pb.RecommendRequest(history=[pb.HistoryItem(item_id="m1")], k=10),
                                              timeout=30)
                assert len(response.items) == 10
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(3)] + \
              [threading.Thread(target=reader) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[:1]
    batch = writable.Recommend(pb.RecommendRequest(context=pb.Context(query="concurrent"), k=20,
                                                   filters=[pb.AttributeFilter(key="category", values=["batch"])]),
                               timeout=10)
    assert sorted(ids_of(batch.items)) == sorted(f"c{n}-{m}" for n in range(3) for m in range(5))


def test_changes_survive_a_restart(start_server, tmp_path):
    first = start_server(state_dir=tmp_path, snapshot_every=2)
    with grpc.insecure_channel(first.target) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        stub.UpsertItems(pb.UpsertItemsRequest(items=[GRAVITY]), timeout=10)
        for n in range(3):
            stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.CatalogueItem(
                item_id=f"r{n}", text=pb.ItemText(title=f"Restart {n}"))]), timeout=10)
        stub.DeleteItems(pb.DeleteItemsRequest(item_ids=["m1", "r1"]), timeout=10)
        before = stub.Recommend(pb.RecommendRequest(context=pb.Context(query="space"), k=42), timeout=10)
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    first.close()
    second = start_server(state_dir=tmp_path)
    with grpc.insecure_channel(second.target) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        again = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        assert (again.item_count, again.index_version) == (info.item_count, info.index_version)
        assert again.item_count == 42 + 4 - 2
        after = stub.Recommend(pb.RecommendRequest(context=pb.Context(query="space"), k=42), timeout=10)
        assert ids_of(after.items) == ids_of(before.items)
        assert stub.GetItem(pb.GetItemRequest(item_id="new-gravity"), timeout=10).item == GRAVITY
        assert call_error(stub.GetItem, pb.GetItemRequest(item_id="m1")).code() == grpc.StatusCode.NOT_FOUND
