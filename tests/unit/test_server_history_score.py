"""The server adds the bundle's adjustments (history item score, co-occurrence, history vector, sequence model)
and negative feedback (rejected items) exactly as evaluation does."""

from __future__ import annotations

import asyncio
import types

import hnswlib
import numpy as np
import pytest

from llmrec.cooccurrence import CooccurrenceTable
from llmrec.history_vector import history_vector
from llmrec.manifest import CooccurrenceSpec, HistoryVectorSpec, Manifest, SequenceModelSpec
from llmrec.sequence_runner import SequenceRunner
from llmrec.template import ItemFields
from llmrec.server.catalogue import Catalogue
from llmrec.server.domain import CatalogueItem
from llmrec.server.recommender import Recommender
from llmrec.server.state import CatalogueStore
from llmrec.server.store.local import LocalStore
from llmrec.server.validation import Limits

DIM = 8
COUNT = 50
RECENT, DECAY = 3, 0.5


def recommender(history_item_score: float, cooccurrence_weight: float = 0.0,
                cooccurrence: CooccurrenceTable | None = None,
                history_vector_weight: float = 0.0, sequence_model: SequenceRunner | None = None,
                sequence_weight: float = 0.0, rejected_weight: float = 0.0) -> tuple[Recommender, np.ndarray]:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(COUNT, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rows = np.hstack([vectors, np.zeros((COUNT, 1), np.float32)])
    index = hnswlib.Index(space="ip", dim=DIM + 1)
    index.init_index(max_elements=COUNT, ef_construction=100, M=16, allow_replace_deleted=True)
    index.add_items(rows, np.arange(COUNT))
    index.set_ef(100)
    ids = [f"i{n:02d}" for n in range(COUNT)]
    manifest = types.SimpleNamespace(bundle_version="v1", dimension=DIM, index_dimension=DIM + 1, new_item_bias=0.0,
                                     history_item_score=history_item_score, max_history_items=20,
                                     cooccurrence=CooccurrenceSpec(cooccurrence_weight, RECENT, DECAY, 1),
                                     history_vector=HistoryVectorSpec(history_vector_weight, RECENT, DECAY),
                                     sequence_model=SequenceModelSpec(sequence_weight, sequence_model.max_items)
                                     if sequence_model is not None else None, rejected_item_weight=rejected_weight)
    manifest.scoring_rule = types.MethodType(Manifest.scoring_rule, manifest)
    manifest.fast_path = None
    manifest.fast_scoring_rule = types.MethodType(Manifest.fast_scoring_rule, manifest)
    bundle = types.SimpleNamespace(manifest=manifest, index=index, item_ids=ids, items=[ItemFields(i) for i in ids],
                                   vectors=rows, row_of={item_id: n for n, item_id in enumerate(ids)},
                                   cooccurrence=cooccurrence or CooccurrenceTable.empty(COUNT),
                                   sequence_model=sequence_model, cold_start=None)
    return Recommender(bundle, encoder=None, limits=Limits(), catalogue=Catalogue(bundle)), rows


def reference(rec: Recommender, rows: np.ndarray, user: np.ndarray, history: list[str | None], k: int,
              sequence_vector: np.ndarray | None = None, rejected: list[str] = ()) -> list[tuple[str, float]]:
    """The top k by the scoring rule's dense view (what evaluation computes) over every item but the rejected."""
    catalogued = [int(i[1:]) for i in history if i is not None]
    scores = rec.rule.dense_scores(user[None, :], rows, [catalogued], rec.bundle.cooccurrence,
                                   None if sequence_vector is None else sequence_vector[None, :],
                                   [[int(i[1:]) for i in rejected]])[0]
    scores[[int(i[1:]) for i in rejected]] = -np.inf
    order = np.argsort(-scores, kind="stable")[:k]
    return [(f"i{n:02d}", float(scores[n])) for n in order]


@pytest.mark.parametrize("score", [-0.05, -0.3, -4.0])
def test_history_items_are_lowered_and_the_ranking_matches_exact_scoring(score):
    rec, rows = recommender(score)
    user = rows[0, :DIM]  # the user is most like item 0
    plain = [item.item_id for item in rec.search(user, 10)]
    history = plain[:4] + ["i49"]  # the four best items, and one far down
    got = rec.search(user, 10, history_ids=history + [None])  # None: an item given as text
    want = reference(rec, rows, user, history + [None], 10)
    assert [item.item_id for item in got] == [item_id for item_id, _ in want]
    assert [item.score for item in got] == pytest.approx([s for _, s in want], abs=1e-5)
    assert [item.rank for item in got] == list(range(1, 11))
    if score == -4.0:
        assert not set(history) & {item.item_id for item in got}


def test_rejected_items_are_left_out_and_the_ranking_matches_exact_scoring():
    rec, rows = recommender(-0.3, history_vector_weight=0.5, rejected_weight=0.8)
    user = rows[0, :DIM]
    plain = [item.item_id for item in rec.search(user, 10)]
    rejected = plain[:2] + ["unknown"]  # the two best items, and an id the catalogue lacks (ignored)
    for history in (["i10", "i11"], []):  # with no catalogued history, the query still moves away
        got = rec.search(user, 10, history_ids=history, rejected_ids=rejected)
        want = reference(rec, rows, user, history, 10, rejected=rejected[:2])
        assert [item.item_id for item in got] == [item_id for item_id, _ in want]
        assert [item.score for item in got] == pytest.approx([s for _, s in want], abs=1e-5)
        assert not set(rejected) & {item.item_id for item in got}
    assert [item.item_id for item in rec.search(user, 10, rejected_ids=["unknown"])] == plain


def test_min_score_cuts_the_ranking_at_the_score_as_sent():
    rec, rows = recommender(0.0)
    user = rows[0, :DIM]
    plain = rec.search(user, 10)
    threshold = float(np.float32(plain[3].score))  # what a client read from a response, sent back
    assert rec.search(user, 10, min_score=threshold) == plain[:4]
    assert rec.search(user, 10, min_score=plain[0].score + 1) == []


def test_a_zero_score_leaves_the_ranking_alone():
    rec, rows = recommender(0.0)
    user = rows[3, :DIM]
    plain = rec.search(user, 10)
    assert rec.search(user, 10, history_ids=[i.item_id for i in plain[:3]]) == plain


def test_excluded_history_items_stay_excluded():
    rec, rows = recommender(-0.05)
    user = rows[0, :DIM]
    got = rec.search(user, 10, exclude_ids={"i00"}, history_ids=["i00", "i01"])
    assert "i00" not in {item.item_id for item in got} and len(got) == 10


def test_cooccurring_items_are_raised_and_the_ranking_matches_exact_scoring():
    # Items 40-49 follow items 0-9 in the training sequences; 40-49 are far from the user in vector space.
    table = CooccurrenceTable.from_sequences([[n, 40 + n] for n in range(10)] * 3, COUNT, window=1)
    weight, score = 1.0, -0.3
    rec, rows = recommender(score, weight, table)
    user = rows[20, :DIM]
    history = ["i00", "i01", "i02", "i03"]  # oldest first: i03 is the latest and weighs most
    got = rec.search(user, 10, history_ids=history)
    want = reference(rec, rows, user, history, 10)
    assert [item.item_id for item in got] == [item_id for item_id, _ in want]
    assert [item.score for item in got] == pytest.approx([s for _, s in want], abs=1e-5)
    assert "i43" in {item.item_id for item in got}  # the latest item's neighbour, out of reach of the index alone
    assert "i43" not in {item.item_id for item in rec.search(user, 10)}
    # Excluded and deleted items stay out however much co-occurrence raises them.
    assert "i43" not in {item.item_id for item in rec.search(user, 10, exclude_ids={"i43"}, history_ids=history)}


def test_cooccurrence_follows_catalogue_deletes_and_reupserts(tmp_path):
    table = CooccurrenceTable.from_sequences([[n, 40 + n] for n in range(10)] * 3, COUNT, window=1)
    rec, rows = recommender(0.0, 3.0, table)
    rec.catalogue.open_store(LocalStore(CatalogueStore(tmp_path, "v1", DIM + 1)))
    try:
        user = rows[20, :DIM]
        assert "i43" in {item.item_id for item in rec.search(user, 10, history_ids=["i03"])}
        asyncio.run(rec.catalogue.delete(["i43", "i05"], allow_missing=False))  # i05's label is free for reuse
        assert "i43" not in {item.item_id for item in rec.search(user, 10, history_ids=["i03"])}
        # Back under a new label (the freed one), now the farthest item from the user: only co-occurrence can
        # bring it back, scored with its new vector.
        new_vector = -rows[20, :DIM]
        asyncio.run(rec.catalogue.upsert([CatalogueItem("i43", ItemFields("back"))],
                                         np.stack([rec.catalogue.row_for(new_vector)])))
        got = rec.search(user, 10, history_ids=["i03"])
        assert got[0].item_id == "i43"
        assert got[0].score == pytest.approx(-1.0 + 3.0 * np.log(4.0), abs=1e-5)  # cosine -1 + weight * log(1 + 3)
    finally:
        rec.catalogue.close()


def test_the_history_vector_joins_the_query_and_the_ranking_matches_exact_scoring():
    weight, score = 0.8, -0.3
    rec, rows = recommender(score, history_vector_weight=weight)
    user = rows[20, :DIM]
    history = ["i00", "i01", "i02", "i03", "i04"]  # oldest first; only the RECENT latest count
    got = rec.search(user, 10, history_ids=[history[0], None, *history[1:]])  # None: text, no vector
    want = reference(rec, rows, user, history, 10)
    assert [item.item_id for item in got] == [item_id for item_id, _ in want]
    assert [item.score for item in got] == pytest.approx([s for _, s in want], abs=1e-5)
    without = recommender(score)[0].search(user, 10, history_ids=history)
    assert [item.item_id for item in got] != [item.item_id for item in without]  # the weight changed the ranking
    # The same query as evaluation builds it (llmrec.history_vector over the history's item vectors).
    np.testing.assert_allclose(rec.query_vector(user, history), user + weight * history_vector(
        rows[[0, 1, 2, 3, 4], :DIM], RECENT, DECAY), atol=1e-6)


def test_a_zero_history_vector_weight_or_no_catalogued_history_leaves_the_query_alone():
    rec, rows = recommender(0.0, history_vector_weight=0.0)
    np.testing.assert_array_equal(rec.query_vector(rows[0, :DIM], ["i01", "i02"]), rows[0, :DIM])
    rec, rows = recommender(0.0, history_vector_weight=0.5)
    np.testing.assert_array_equal(rec.query_vector(rows[0, :DIM], [None, None]), rows[0, :DIM])


def test_the_history_vector_uses_the_live_catalogue_vectors(tmp_path):
    rec, rows = recommender(0.0, history_vector_weight=1.0)
    rec.catalogue.open_store(LocalStore(CatalogueStore(tmp_path, "v1", DIM + 1)))
    try:
        user = rows[20, :DIM]
        new_vector = rows[30, :DIM]
        asyncio.run(rec.catalogue.upsert([CatalogueItem("i03", ItemFields("moved"))],
                                         np.stack([rec.catalogue.row_for(new_vector)])))
        np.testing.assert_allclose(rec.query_vector(user, ["i03"]), user + new_vector, atol=1e-6)
        asyncio.run(rec.catalogue.delete(["i03"], allow_missing=False))
        np.testing.assert_allclose(rec.query_vector(user, ["i03"]), user, atol=1e-6)  # deleted: adds nothing
    finally:
        rec.catalogue.close()


@pytest.fixture(scope="module")
def sequence_model(tmp_path_factory):
    """A small random sequence model exported as a bundle holds it, and its PyTorch original."""
    import torch

    from llmrec.export.onnx import export_sequence_model
    from llmrec.training.sequence_model import SequenceModel, SequenceModelConfig

    torch.manual_seed(0)
    model = SequenceModel(DIM, SequenceModelConfig(max_items=4, hidden=16, heads=2, layers=1)).eval()
    path = export_sequence_model(model, tmp_path_factory.mktemp("sequence") / "sequence_model.onnx")
    return SequenceRunner(path, max_items=4), model


def test_the_sequence_vector_joins_the_query_and_the_ranking_matches_exact_scoring(sequence_model):
    import torch

    runner, model = sequence_model
    weight, score = 2.0, -0.3
    rec, rows = recommender(score, sequence_model=runner, sequence_weight=weight)
    user = rows[20, :DIM]
    history = ["i00", "i01", "i02", "i03", "i04", "i05"]  # oldest first; the model reads the latest 4
    latest = torch.as_tensor(rows[[2, 3, 4, 5], :DIM])[None]
    expected = user + weight * model.last(latest, torch.ones(1, 4, dtype=torch.bool))[0].detach().numpy()
    np.testing.assert_allclose(rec.query_vector(user, [history[0], None, *history[1:]]), expected, atol=1e-5)
    got = rec.search(user, 10, history_ids=history)
    sequence = runner.vectors([rows[[0, 1, 2, 3, 4, 5], :DIM]])[0]
    want = reference(rec, rows, user, history, 10, sequence)
    assert [item.item_id for item in got] == [item_id for item_id, _ in want]
    assert [item.item_id for item in got] != [item.item_id for item in recommender(score)[0].search(user, 10, history_ids=history)]
    off, _ = recommender(score, sequence_model=runner, sequence_weight=0.0)
    np.testing.assert_array_equal(off.query_vector(user, history), user)  # weight 0: the model is not run


def test_rejections_with_a_sequence_model_and_no_catalogued_history(sequence_model):
    runner, _ = sequence_model
    rec, rows = recommender(0.0, sequence_model=runner, sequence_weight=1.0, rejected_weight=0.5)
    user = rows[20, :DIM]
    got = rec.search(user, 10, history_ids=[None], rejected_ids=["i20"])  # only an item given as text
    want = reference(rec, rows, user, [], 10, np.zeros(DIM, np.float32), ["i20"])  # no history: no sequence term
    assert [item.item_id for item in got] == [item_id for item_id, _ in want]
    np.testing.assert_allclose(rec.query_vector(user, [], ["i20"]), user - 0.5 * rows[20, :DIM], atol=1e-6)


def test_the_sequence_model_skips_deleted_items(sequence_model, tmp_path):
    runner, _ = sequence_model
    rec, rows = recommender(0.0, sequence_model=runner, sequence_weight=1.0)
    rec.catalogue.open_store(LocalStore(CatalogueStore(tmp_path, "v1", DIM + 1)))
    try:
        user = rows[20, :DIM]
        asyncio.run(rec.catalogue.delete(["i03"], allow_missing=False))
        np.testing.assert_allclose(rec.query_vector(user, ["i01", "i03", "i02"]),
                                   rec.query_vector(user, ["i01", "i02"]), atol=1e-6)
        only_deleted = rec.query_vector(user, ["i03"])
        np.testing.assert_array_equal(only_deleted, user)  # nothing catalogued left: the sequence adds nothing
    finally:
        rec.catalogue.close()
