"""The live catalogue on a synthetic index: search against brute force, changes, filters, paging, concurrency."""

from __future__ import annotations

import asyncio
import threading
import types

import hnswlib
import numpy as np
import pytest

from llmrec.cold_start import ColdStartMap
from llmrec.template import ItemFields
from llmrec.server import catalogue as catalogue_module
from llmrec.server.catalogue import Catalogue
from llmrec.server.domain import AttributeFilter, CatalogueItem
from llmrec.server.errors import FailedPrecondition, InvalidArgument, NotFound
from llmrec.server.state import CatalogueStore
from llmrec.cooccurrence import CooccurrenceTable
from llmrec.server.store.local import LocalStore

DIM = 8
COUNT = 60
BIAS = -0.01


def make_bundle(seed: int = 0, cold_start=None):
    """A LoadedBundle stand-in: COUNT unit vectors plus a bias column in an hnswlib "ip" index."""
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(COUNT, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rows = np.hstack([vectors, rng.normal(0, 0.01, size=(COUNT, 1))]).astype(np.float32)
    index = hnswlib.Index(space="ip", dim=DIM + 1)
    index.init_index(max_elements=COUNT, ef_construction=100, M=16, allow_replace_deleted=True)
    index.add_items(rows, np.arange(COUNT))
    index.set_ef(100)
    ids = [f"i{n:02d}" for n in range(COUNT)]
    items = [ItemFields(f"Item {n}", ("Even" if n % 2 == 0 else "Odd", "All")) for n in range(COUNT)]
    manifest = types.SimpleNamespace(bundle_version="v1", dimension=DIM, index_dimension=DIM + 1, new_item_bias=BIAS)
    return types.SimpleNamespace(manifest=manifest, index=index, item_ids=ids, items=items, vectors=rows,
                                 row_of={item_id: n for n, item_id in enumerate(ids)}, cold_start=cold_start,
                                 cooccurrence=CooccurrenceTable.empty(COUNT))


def unit(rng, n=1):
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def brute_force(cat: Catalogue, user: np.ndarray, k: int, allowed=lambda item_id: True) -> list[str]:
    query = np.append(user, 1.0)
    scored = []
    for item in cat.list_page(10_000, "")[0]:
        _, row = cat.get(item.item_id, include_vector=True)
        if allowed(item.item_id):
            scored.append((float(row @ query), item.item_id))
    return [item_id for _, item_id in sorted(scored, reverse=True)[:k]]


@pytest.fixture
def cat(tmp_path):
    catalogue = Catalogue(make_bundle())
    catalogue.open_store(LocalStore(CatalogueStore(tmp_path, "v1", DIM + 1, snapshot_every=5)))
    yield catalogue
    catalogue.close()


def upsert(cat: Catalogue, items: list[CatalogueItem], rng) -> None:
    rows = np.stack([cat.row_for(v) for v in unit(rng, len(items))])
    asyncio.run(cat.upsert(items, rows))


def test_search_matches_brute_force_through_changes(cat):
    rng = np.random.default_rng(1)
    users = unit(rng, 5)
    for user in users:
        assert [i.item_id for i in cat.search(user, 10)] == brute_force(cat, user, 10)
    upsert(cat, [CatalogueItem(f"new{n}", ItemFields(f"New {n}")) for n in range(20)], rng)
    upsert(cat, [CatalogueItem("i00", ItemFields("Replaced"))], rng)
    result = asyncio.run(cat.delete([f"i{n:02d}" for n in range(1, 30)], allow_missing=False))
    assert result.deleted == 29 and result.item_count == COUNT + 20 - 29 and cat.count == COUNT - 9
    for user in users:
        got = cat.search(user, 10)
        assert [i.item_id for i in got] == brute_force(cat, user, 10)
        assert [i.rank for i in got] == list(range(1, 11))
    assert cat.get("i00")[0].fields.title == "Replaced" and cat.get("i00")[0].upserted
    with pytest.raises(NotFound):
        cat.get("i05")


def test_rows_are_text_vectors_with_the_new_item_bias(cat):
    row = cat.row_for(np.full(DIM, 3.0, np.float32))
    np.testing.assert_allclose(np.linalg.norm(row[:DIM]), 1.0, rtol=1e-6)
    assert row[DIM] == np.float32(BIAS) and row.shape == (DIM + 1,)


def test_deleted_labels_are_reused_and_the_index_grows_when_full(cat):
    rng = np.random.default_rng(2)
    index = cat._index
    asyncio.run(cat.delete(["i01", "i02"], allow_missing=False))
    upsert(cat, [CatalogueItem("a", ItemFields("A")), CatalogueItem("b", ItemFields("B"))], rng)
    assert index.get_current_count() == COUNT  # two tombstones reused, nothing added
    upsert(cat, [CatalogueItem(f"g{n}", ItemFields(f"G{n}")) for n in range(3 * COUNT)], rng)
    assert index.get_max_elements() >= 4 * COUNT and cat.count == 4 * COUNT - 2 + 2
    user = unit(rng)[0]
    assert [i.item_id for i in cat.search(user, 20)] == brute_force(cat, user, 20)


def test_filters_match_categories_and_attributes_case_insensitively(cat, monkeypatch):
    rng = np.random.default_rng(3)
    upsert(cat, [CatalogueItem("s1", ItemFields("S1", ("Odd",)), (("Studio", " A24 "),)),
                 CatalogueItem("s2", ItemFields("S2"), (("studio", "a24"), ("category", "Even")))], rng)
    user = unit(rng)[0]
    odd = [i.item_id for i in cat.search(user, 100, filters=[AttributeFilter("CATEGORY", ("odd",))])]
    assert set(odd) == {f"i{n:02d}" for n in range(1, COUNT, 2)} | {"s1"}
    studio = cat.search(user, 5, filters=[AttributeFilter("studio", ("A24",))])
    assert {i.item_id for i in studio} == {"s1", "s2"}
    both = cat.search(user, 5, filters=[AttributeFilter("studio", ("a24",)), AttributeFilter("category", ("even",))])
    assert [i.item_id for i in both] == ["s2"]
    assert cat.search(user, 5, filters=[AttributeFilter("studio", ("nobody",))]) == []
    # Through the HNSW walk with a filter callable (and an exact fallback if it comes back short).
    monkeypatch.setattr(catalogue_module, "EXACT_SEARCH_MAX_CANDIDATES", 0)
    even = cat.search(user, 10, exclude_ids={"i00", "i02"}, filters=[AttributeFilter("category", ("Even", "nope"))])
    expected = brute_force(cat, user, 10, lambda i: i in {f"i{n:02d}" for n in range(4, COUNT, 2)} | {"s2"})
    assert [i.item_id for i in even] == expected


def test_exclusions_leave_k_items_and_fall_back_to_exact_search(cat):
    rng = np.random.default_rng(4)
    user = unit(rng)[0]
    keep = {"i10", "i20", "i30"}
    got = cat.search(user, 5, exclude_ids={i for i in cat._label_of if i not in keep})
    assert {i.item_id for i in got} == keep  # fewer than k only because exclusions leave three


def test_list_pages_cover_the_catalogue_in_id_order(cat):
    rng = np.random.default_rng(5)
    upsert(cat, [CatalogueItem("zz", ItemFields("Z")), CatalogueItem("aa", ItemFields("A"))], rng)
    asyncio.run(cat.delete(["i03"], allow_missing=False))
    seen, token = [], ""
    while True:
        items, token, total = cat.list_page(7, token)
        seen += [i.item_id for i in items]
        if not token:
            break
    assert seen == sorted(seen) and len(seen) == total == COUNT + 1 and "i03" not in seen
    with pytest.raises(InvalidArgument, match="page_token"):
        cat.list_page(5, "not-a-token")


def test_delete_of_an_unknown_id_deletes_nothing_unless_allowed(cat):
    with pytest.raises(NotFound, match="'nope'"):
        asyncio.run(cat.delete(["i01", "nope"], allow_missing=False))
    assert cat.count == COUNT and cat.revision == 0
    assert asyncio.run(cat.delete(["i01", "nope"], allow_missing=True)).deleted == 1
    assert cat.revision == 1 and cat.index_version == f"v1:{COUNT - 1}:r1"


def test_writes_need_a_store():
    read_only = Catalogue(make_bundle())
    with pytest.raises(FailedPrecondition, match="--state-dir"):
        asyncio.run(read_only.delete(["i01"], allow_missing=False))
    assert read_only.count == COUNT and read_only.index_version == f"v1:{COUNT}"
    read_only.close()


def test_changes_are_replayed_on_a_fresh_bundle(tmp_path):
    rng = np.random.default_rng(6)
    first = Catalogue(make_bundle())
    first.open_store(LocalStore(CatalogueStore(tmp_path, "v1", DIM + 1, snapshot_every=3)))  # snapshots along the way
    for n in range(7):
        upsert(first, [CatalogueItem(f"n{n}", ItemFields(f"N{n}", ("New",)), (("k", str(n)),))], rng)
    upsert(first, [CatalogueItem("i00", ItemFields("Changed"))], rng)
    asyncio.run(first.delete(["i01", "n3"], allow_missing=False))
    user = unit(rng)[0]
    before = [(i.item_id, round(i.score, 5)) for i in first.search(user, 15)]
    rows = {i.item_id: first.get(i.item_id, True)[1] for i in first.list_page(1000, "")[0]}
    revision = first.revision
    first.close()
    second = Catalogue(make_bundle())  # the bundle as shipped, changes replayed on top
    second.open_store(LocalStore(CatalogueStore(tmp_path, "v1", DIM + 1)))
    assert second.revision == revision == 9 and second.count == COUNT + 7 - 2
    assert [(i.item_id, round(i.score, 5)) for i in second.search(user, 15)] == before
    for item_id, row in rows.items():
        np.testing.assert_array_equal(second.get(item_id, True)[1], row)
    assert second.search(user, 10, filters=[AttributeFilter("k", ("5",))])[0].item_id == "n5"
    second.close()


def test_queries_stay_correct_while_writes_run(cat):
    """Readers and the writer at once: no crash, and every answer is a consistent top-k."""
    rng = np.random.default_rng(7)
    users = unit(rng, 8)
    stop = threading.Event()
    failures: list[BaseException] = []

    def reader(user):
        while not stop.is_set():
            try:
                got = cat.search(user, 10, filters=[AttributeFilter("category", ("All", "New"))] if user[0] > 0 else ())
                ids = [i.item_id for i in got]
                scores = [i.score for i in got]
                assert len(ids) == 10 == len(set(ids)) and scores == sorted(scores, reverse=True)
            except BaseException as error:  # noqa: BLE001 - reported below
                failures.append(error)
                return

    threads = [threading.Thread(target=reader, args=(u,)) for u in users[:4]]
    for thread in threads:
        thread.start()
    try:
        for n in range(8):
            upsert(cat, [CatalogueItem(f"c{n}-{m}", ItemFields("C", ("New",))) for m in range(5)], rng)
            asyncio.run(cat.delete([f"c{n}-0", f"c{n}-1"], allow_missing=False))
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not failures, failures[:1]
    for user in users:
        assert [i.item_id for i in cat.search(user, 10)] == brute_force(cat, user, 10)


def test_with_a_cold_start_map_rows_are_text_plus_the_predicted_id_vector_and_bias(tmp_path):
    rng = np.random.default_rng(9)
    weights = rng.normal(0, 0.1, size=(DIM + 1, DIM + 1)).astype(np.float32)
    catalogue = Catalogue(make_bundle(cold_start=ColdStartMap(weights)))
    text = unit(rng)[0]
    row = catalogue.row_for(3.0 * text)  # the text vector is normalised first, as the encoder's always is
    predicted = np.append(text, 1.0) @ weights
    expected = text + predicted[:DIM]
    np.testing.assert_allclose(row[:DIM], expected / np.linalg.norm(expected), rtol=1e-5)
    np.testing.assert_allclose(row[DIM], predicted[DIM], rtol=1e-5)
    without = Catalogue(make_bundle(cold_start=ColdStartMap(weights)), use_cold_start_map=False)
    assert without.row_for(text)[DIM] == np.float32(BIAS)


def test_new_item_slots_put_the_best_new_items_in_the_list_in_score_order(cat):
    rng = np.random.default_rng(11)
    user = unit(rng)[0]
    # New items far from the user: the model alone never lists them.
    far = [-user + rng.normal(0, 0.05, DIM).astype(np.float32) for _ in range(4)]
    new_items = [CatalogueItem(f"new{n}", ItemFields(f"New {n}", ("Odd",) if n == 3 else ("Even",)))
                 for n in range(4)]
    asyncio.run(cat.upsert(new_items, np.stack([cat.row_for(v) for v in far])))
    plain = [i.item_id for i in cat.search(user, 10)]
    assert not any(i.startswith("new") for i in plain)
    rule = catalogue_module._BARE_MODEL

    def listed(slots, **kwargs):
        return cat.top_k(rule, user, 10, (), None, new_item_slots=slots, **kwargs)

    two = listed(2)
    best_new = [i for i in brute_force(cat, user, COUNT + 4) if i.startswith("new")]
    assert [i.item_id for i in two] == plain[:8] + best_new[:2]  # they replace the lowest-scoring others
    assert [i.score for i in two] == sorted((i.score for i in two), reverse=True)
    assert [i.rank for i in two] == list(range(1, 11))
    assert [i.item_id for i in listed(0)] == plain
    # Exclusions and filters bind the reserved slots too; only as many as exist are added.
    excluded = [i.item_id for i in listed(2, exclude_ids={best_new[0]})]
    assert best_new[0] not in excluded and best_new[1] in excluded and best_new[2] in excluded
    odd = [i.item_id for i in listed(3, filters=[AttributeFilter("category", ("Odd",))])]
    assert [i for i in odd if i.startswith("new")] == ["new3"]
    asyncio.run(cat.delete(["new3"], allow_missing=False))
    assert not [i for i in (x.item_id for x in listed(3, filters=[AttributeFilter("category", ("Odd",))]))
                if i.startswith("new")]
