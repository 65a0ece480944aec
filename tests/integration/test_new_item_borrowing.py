"""--new-item-cooccurrence and --new-item-boost through the real server, on the tiny bundle with a co-occurrence
table counted from the tiny interactions: new items' donors are searched when the item is applied (upsert and
replay) only if they borrow; the boost raises every new item's served score by exactly its value."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from llmrec import manifest as mf
from llmrec.cooccurrence import CooccurrenceTable
from llmrec.export.bundle import with_cooccurrence
from llmrec.item_record import read_items
from llmrec.server import catalogue as catalogue_module
from llmrec.training.data import load_interactions
from llmrec.v1 import recommender_pb2 as pb
from llmrec.v1 import recommender_pb2_grpc as pb_grpc

TINY = Path(__file__).parents[1] / "fixtures" / "tiny"
NEW_ITEMS = [
    pb.CatalogueItem(item_id="new-gravity", text=pb.ItemText(title="Gravity (2013)", categories=["Sci-Fi"])),
    pb.CatalogueItem(item_id="new-paddington", text=pb.ItemText(title="Paddington (2014)", categories=["Family"])),
    pb.CatalogueItem(item_id="new-heat", text=pb.ItemText(title="Heat (1995)", categories=["Crime"])),
]


def tiny_table(bundle: Path) -> CooccurrenceTable:
    """The tiny interactions' co-occurrence table over the bundle's rows."""
    data = load_interactions(TINY)
    row_of = {item_id: row for row, (item_id, _) in enumerate(read_items(bundle / mf.ITEMS_FILE))}
    return CooccurrenceTable.from_sequences(data.sequences, data.num_items).renumber(
        np.array([row_of[i] for i in data.item_ids]), len(row_of))


@pytest.fixture(scope="module")
def cooccurrence_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_cooccurrence(tiny_bundle, tiny_table(tiny_bundle), tmp_path_factory.mktemp("bundles"))


@pytest.fixture
def donor_searches(monkeypatch) -> list[int]:
    """How many items each donor search the catalogue runs is for."""
    searches: list[int] = []
    search = catalogue_module.nearest_donors
    monkeypatch.setattr(catalogue_module, "nearest_donors",
                        lambda vectors, *args, **kwargs: searches.append(len(vectors)) or search(vectors, *args, **kwargs))
    return searches


@pytest.mark.parametrize("borrowing", [0.0, 1.0])
def test_new_items_donors_are_searched_only_when_they_borrow(borrowing, cooccurrence_bundle, serve_bundle,
                                                              donor_searches, tmp_path):
    searched = len(NEW_ITEMS) if borrowing else 0
    server = serve_bundle(cooccurrence_bundle, state_dir=tmp_path, new_item_cooccurrence=borrowing)
    assert server.server.recommender.rule.borrowed_cooccurrence == borrowing  # the catalogue's, one setting
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        assert stub.UpsertItems(pb.UpsertItemsRequest(items=NEW_ITEMS), timeout=30).created == len(NEW_ITEMS)
        ranked = stub.Recommend(pb.RecommendRequest(history=[pb.HistoryItem(item_id=i) for i in ("m1", "m2")], k=5,
                                                    new_item_share=0.4), timeout=30)
    assert sum(donor_searches) == searched
    assert len(ranked.items) == 5 and sum(i.item_id.startswith("new-") for i in ranked.items) >= 2
    server.close()
    replayed = serve_bundle(cooccurrence_bundle, state_dir=tmp_path, new_item_cooccurrence=borrowing)
    assert replayed.server.recommender.catalogue.count == len(read_items(cooccurrence_bundle / mf.ITEMS_FILE)) + len(NEW_ITEMS)
    assert sum(donor_searches) == 2 * searched  # the replayed upsert searches again only when borrowing


def test_the_new_item_boost_raises_new_items_scores_by_its_value(cooccurrence_bundle, serve_bundle, tmp_path):
    history = [pb.HistoryItem(item_id=i) for i in ("m1", "m2")]
    served = {}
    for boost in (0.0, 0.25, 100.0):
        server = serve_bundle(cooccurrence_bundle, state_dir=tmp_path / str(boost), new_item_boost=boost)
        assert server.server.recommender.rule.new_item_boost == boost
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.RecommenderStub(channel)
            info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
            assert (info.new_item_boost, info.new_item_cooccurrence, info.new_item_share) == (boost, 1.0, 0.0)
            stub.UpsertItems(pb.UpsertItemsRequest(items=NEW_ITEMS), timeout=30)
            ranked = stub.Recommend(pb.RecommendRequest(history=history, k=20), timeout=30)
            if not boost:  # the new items alone, in the model's order: every slot reserved for them
                new_only = stub.Recommend(pb.RecommendRequest(history=history, k=len(NEW_ITEMS), new_item_share=1.0),
                                          timeout=30)
        served[boost] = [(item.item_id, item.score) for item in ranked.items]
        server.close()
    unboosted = dict(served[0.0])
    for item_id, score in served[0.25]:
        if item_id in unboosted:
            assert score == pytest.approx(unboosted[item_id] + (0.25 if item_id.startswith("new-") else 0.0), abs=1e-4)
    assert [item_id for item_id, _ in served[100.0][: len(NEW_ITEMS)]] == [item.item_id for item in new_only.items]
    assert sum(item_id.startswith("new-") for item_id, _ in served[0.0][: len(NEW_ITEMS)]) < len(NEW_ITEMS)
    with pytest.raises(ValueError, match="new_item_boost"):
        serve_bundle(cooccurrence_bundle, state_dir=tmp_path / "negative", new_item_boost=-1.0)


def test_a_bundle_with_another_cooccurrence_table_is_a_verified_bundle_of_its_own(tiny_bundle, tmp_path):
    table = tiny_table(tiny_bundle)
    derived = with_cooccurrence(tiny_bundle, table, tmp_path)
    original, manifest = mf.read_manifest(tiny_bundle), mf.read_manifest(derived)  # every sha256 checked
    assert derived.name == manifest.bundle_version != original.bundle_version
    loaded = CooccurrenceTable.load(derived / mf.COOCCURRENCE_FILE)
    assert loaded.has_row().any() and all(np.array_equal(getattr(loaded, f), getattr(table, f))
                                          for f in ("indptr", "neighbours", "weights"))
    changed = {f for f in original.files if manifest.files[f] != original.files[f]}
    assert changed == {mf.COOCCURRENCE_FILE}
    assert mf.sha256_file(derived / mf.MODEL_INT8_FILE) == original.files[mf.MODEL_INT8_FILE]
    with pytest.raises(ValueError, match="items"):
        with_cooccurrence(tiny_bundle, CooccurrenceTable.empty(3), tmp_path / "other")
    assert not (tmp_path / "other").exists()
