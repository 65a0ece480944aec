"""llmrec.scoring: the dense view (evaluation, calibration) and the top-k view (the server's catalogue) rank alike."""

from __future__ import annotations

import dataclasses
import types

import hnswlib
import numpy as np
import pytest

from llmrec.cooccurrence import Borrowers, CooccurrenceTable, nearest_donors
from llmrec.scoring import (
    DEFAULT_REJECTED_WEIGHT, Adjustments, Recency, ScoreTerms, ScoringRule, item_rows, query_rows,
)
from llmrec.server import catalogue as catalogue_module
from llmrec.server.catalogue import Catalogue
from llmrec.server.domain import CatalogueItem
from llmrec.server.state import Upsert
from llmrec.template import ItemFields

DIM, COUNT = 16, 300
RULE = ScoringRule(Adjustments(history_item_score=-0.3, cooccurrence_weight=0.2, history_vector_weight=0.5,
                               sequence_weight=0.4), Recency(5, 0.7), Recency(4, 0.8), rejected_weight=0.6)


def catalogue_inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    rows = item_rows(rng.normal(size=(COUNT, DIM)), rng.normal(scale=2.0, size=COUNT), 0.05)
    sequences = [rng.integers(0, COUNT, size=rng.integers(2, 12)).tolist() for _ in range(400)]
    table = CooccurrenceTable.from_sequences(sequences, COUNT)
    users = rng.normal(size=(20, DIM)).astype(np.float32)
    users /= np.linalg.norm(users, axis=1, keepdims=True)
    histories = [rng.choice(COUNT, size=rng.integers(1, 9), replace=False) for _ in range(20)]
    sequence_vectors = rng.normal(scale=0.3, size=(20, DIM)).astype(np.float32)
    return rows, table, users, histories, sequence_vectors


def rejections(seed: int = 0) -> list[np.ndarray]:
    """Per user, 0 to 4 rejected items."""
    rng = np.random.default_rng(seed + 100)
    return [rng.choice(COUNT, size=rng.integers(0, 5), replace=False) for _ in range(20)]


def catalogue_of(rows: np.ndarray, table: CooccurrenceTable | None = None, new_item_cooccurrence: float = 1.0
                 ) -> Catalogue:
    """A catalogue whose bundle holds these rows (and this co-occurrence table over them)."""
    count = len(rows)
    index = hnswlib.Index(space="ip", dim=DIM + 1)
    index.init_index(max_elements=COUNT, ef_construction=200, M=32, allow_replace_deleted=True)
    index.add_items(rows, np.arange(count))
    index.set_ef(COUNT)  # wide enough to be exact: the views must then agree item for item
    ids = [f"i{n:03d}" for n in range(count)]
    manifest = types.SimpleNamespace(bundle_version="v1", dimension=DIM, new_item_bias=0.0)
    bundle = types.SimpleNamespace(manifest=manifest, index=index, item_ids=ids, items=[ItemFields(i) for i in ids],
                                   vectors=rows, row_of={item_id: n for n, item_id in enumerate(ids)}, cold_start=None,
                                   cooccurrence=table if table is not None else CooccurrenceTable.empty(count))
    return Catalogue(bundle, new_item_cooccurrence=new_item_cooccurrence)


@pytest.mark.parametrize("rule", [RULE, ScoringRule(), ScoringRule(Adjustments(history_item_score=2.0)),
                                  ScoringRule(rejected_weight=0.0), ScoringRule(rejected_weight=3.0)])
@pytest.mark.parametrize("with_rejections", [False, True])
def test_the_top_k_view_ranks_like_the_dense_view(rule, with_rejections):
    rows, table, users, histories, sequence_vectors = catalogue_inputs()
    rejected = rejections() if with_rejections else None
    catalogue = catalogue_of(rows)
    dense = rule.dense_scores(users, rows, histories, table, sequence_vectors, rejected)
    for user in range(len(users)):
        history = histories[user]
        mine = [] if rejected is None else rejected[user]
        query = rule.query(users[user:user + 1], [rows[history, :DIM]], sequence_vectors[user:user + 1],
                           [rows[mine, :DIM]])[0]
        got = catalogue.top_k(rule, query, 10, [f"i{n:03d}" for n in history], table,
                              exclude_ids={f"i{n:03d}" for n in mine})  # the server never returns them
        scores = dense[user].copy()
        scores[mine] = -np.inf
        want = np.argsort(-scores, kind="stable")[:10]
        assert [item.item_id for item in got] == [f"i{n:03d}" for n in want]
        assert [item.score for item in got] == pytest.approx(dense[user, want].tolist(), abs=1e-5)


NEW = 60  # the last NEW of COUNT items are new: upserted after the co-occurrence table was counted


def with_new_items(seed: int):
    """Inputs whose last NEW items are new: (rows, users, sequence vectors, the trained items' count, a table over
    them, histories of trained items, the upsert of the new items, their borrowers)."""
    rows, _, users, _, sequence_vectors = catalogue_inputs(seed)
    trained = COUNT - NEW
    rng = np.random.default_rng(seed)
    table = CooccurrenceTable.from_sequences(
        [rng.integers(0, trained, size=rng.integers(2, 12)).tolist() for _ in range(400)], trained)
    histories = [rng.choice(trained, size=rng.integers(1, 9), replace=False) for _ in range(len(users))]
    upsert = Upsert([CatalogueItem(f"i{n:03d}", ItemFields(f"i{n:03d}"), upserted=True)
                     for n in range(trained, COUNT)], rows[trained:])
    donors, weights = nearest_donors(rows[trained:, :DIM], rows[:trained, :DIM], table.has_row())
    return rows, users, sequence_vectors, trained, table, histories, upsert, Borrowers(np.arange(trained, COUNT),
                                                                                        donors, weights)


def test_new_items_borrow_cooccurrence_alike_in_both_views():
    """Items upserted after the table was counted (no row of their own) borrow their nearest trained items'
    co-occurrence, in the server's top-k view exactly as in the dense view."""
    rows, users, sequence_vectors, trained, table, histories, upsert, borrowers = with_new_items(7)
    catalogue = catalogue_of(rows[:trained], table)
    catalogue._apply(upsert)
    for rule in (RULE, dataclasses.replace(RULE, borrowed_cooccurrence=0.0)):
        dense = rule.dense_scores(users, rows, histories, table, sequence_vectors, borrowers=borrowers)
        for user in range(len(users)):
            query = rule.query(users[user:user + 1], [rows[histories[user], :DIM]], sequence_vectors[user:user + 1])[0]
            got = catalogue.top_k(rule, query, 10, [f"i{n:03d}" for n in histories[user]], table)
            want = np.argsort(-dense[user], kind="stable")[:10]
            assert [item.item_id for item in got] == [f"i{n:03d}" for n in want]
            assert [item.score for item in got] == pytest.approx(dense[user, want].tolist(), abs=1e-5)
    lent = RULE.adjustments_of(histories[0], table, borrowers=borrowers)
    alone = dataclasses.replace(RULE, borrowed_cooccurrence=0.0).adjustments_of(histories[0], table,
                                                                                 borrowers=borrowers)
    assert np.isin(lent[0], borrowers.items).any() and not np.isin(alone[0], borrowers.items).any()


@pytest.mark.parametrize("boost", [0.0, 0.4, 50.0])
def test_the_new_item_boost_raises_new_items_alike_in_both_views(boost):
    """new_item_boost is added to every new item's score: the server's top-k view (the list's own new items raised,
    the best new items beyond it merged in) ranks exactly like the dense view, exclusions holding; a boost larger
    than any score gap puts the best new items first, in the model's own order among them."""
    rows, users, sequence_vectors, trained, table, histories, upsert, borrowers = with_new_items(11)
    catalogue = catalogue_of(rows[:trained], table)
    catalogue._apply(upsert)
    rule = dataclasses.replace(RULE, new_item_boost=boost)
    new_items = np.arange(trained, COUNT)
    dense = rule.dense_scores(users, rows, histories, table, sequence_vectors, borrowers=borrowers,
                              new_items=new_items)
    for user in range(len(users)):
        query = rule.query(users[user:user + 1], [rows[histories[user], :DIM]], sequence_vectors[user:user + 1])[0]
        excluded = {f"i{n:03d}" for n in (trained + user, trained + 30 + user)}  # two new items excluded
        got = catalogue.top_k(rule, query, 10, [f"i{n:03d}" for n in histories[user]], table, exclude_ids=excluded)
        scores = dense[user].copy()
        scores[[trained + user, trained + 30 + user]] = -np.inf
        want = np.argsort(-scores, kind="stable")[:10]
        assert [item.item_id for item in got] == [f"i{n:03d}" for n in want]
        assert [item.score for item in got] == pytest.approx(dense[user, want].tolist(), abs=1e-5)
        if boost == 50.0:
            assert all(n >= trained for n in want)
        with_slots = catalogue.top_k(rule, query, 10, [f"i{n:03d}" for n in histories[user]], table,
                                     exclude_ids=excluded, new_item_slots=10)  # reserved slots: the same scale
        new_scores = np.where(np.arange(COUNT) >= trained, scores, -np.inf)
        assert [item.score for item in with_slots] == pytest.approx(np.sort(new_scores)[::-1][:10].tolist(),
                                                                    abs=1e-5)
    unboosted = RULE.dense_scores(users, rows, histories, table, sequence_vectors, borrowers=borrowers,
                                  new_items=new_items)
    assert np.allclose(dense - unboosted, np.where(np.arange(COUNT) >= trained, boost, 0.0))


def test_without_borrowing_no_donors_are_searched_and_the_ranking_is_unchanged(monkeypatch):
    """new_item_cooccurrence 0: applying new items runs no donor search, and every list is the one a catalogue that
    found their donors gives under a rule that borrows nothing (what the server served before it skipped them)."""
    rows, users, sequence_vectors, trained, table, histories, new_items, _ = with_new_items(9)
    searches = []
    monkeypatch.setattr(catalogue_module, "nearest_donors",
                        lambda *args, **kwargs: searches.append(args) or nearest_donors(*args, **kwargs))
    borrowing, without = catalogue_of(rows[:trained], table), catalogue_of(rows[:trained], table, 0.0)
    borrowing._apply(new_items)
    assert len(searches) == 1  # the table has rows: with borrowing on, the new items' donors are searched
    without._apply(new_items)
    assert len(searches) == 1 and without._borrowers_now().items.size == 0
    rule = dataclasses.replace(RULE, borrowed_cooccurrence=0.0)
    for user in range(len(users)):
        query = rule.query(users[user:user + 1], [rows[histories[user], :DIM]], sequence_vectors[user:user + 1])[0]
        history = [f"i{n:03d}" for n in histories[user]]
        before = borrowing.top_k(rule, query, 20, history, table, new_item_slots=3)
        assert without.top_k(rule, query, 20, history, table, new_item_slots=3) == before


def test_donors_are_the_nearest_items_with_a_row_weighted_by_their_cosine():
    rows, _, _, _, _ = catalogue_inputs(8)
    unit = rows[:, :DIM]
    is_donor = np.arange(COUNT) % 3 != 0  # every third item has no row: never a donor
    donors, weights = nearest_donors(unit[:5], unit, is_donor, donors=4, chunk_rows=37)  # chunks: same answer
    for n in range(5):
        cosines = np.where(is_donor, unit @ unit[n], -np.inf)
        want = np.argsort(-cosines, kind="stable")[:4]
        assert donors[n].tolist() == want.tolist()
        np.testing.assert_allclose(weights[n], np.maximum(cosines[want], 0) / 4, rtol=1e-5)


def test_rejections_move_the_query_away_from_the_mean_of_the_rejected_items():
    rng = np.random.default_rng(4)
    user, rejected = rng.normal(size=(2, DIM)), rng.normal(size=(3, DIM))
    rule = ScoringRule(rejected_weight=0.4)
    expected = user[0] - 0.4 * rejected.mean(axis=0)
    got = rule.query(user, [np.zeros((0, DIM)), np.zeros((0, DIM))], None, [rejected, np.zeros((0, DIM))])
    np.testing.assert_allclose(got[0], expected, rtol=1e-5)
    np.testing.assert_allclose(got[1], user[1], rtol=1e-6)  # no rejections, no change
    assert ScoringRule().rejected_weight == DEFAULT_REJECTED_WEIGHT > 0
    np.testing.assert_allclose(ScoringRule(rejected_weight=0.0).query(user[:1], [rejected], None, [rejected]),
                               user[:1], rtol=1e-6)


def test_a_rejection_lowers_each_item_by_the_weight_times_its_cosine_with_the_rejected_item():
    rows, _, users, _, _ = catalogue_inputs(5)
    unit = rows[:, :DIM]
    rule = ScoringRule(rejected_weight=DEFAULT_REJECTED_WEIGHT)
    before = rule.dense_scores(users[:1], rows, [[]], None)[0]
    rejected = int(np.argmax(before))
    after = rule.dense_scores(users[:1], rows, [[]], None, rejected=[[rejected]])[0]
    np.testing.assert_allclose(before - after, DEFAULT_REJECTED_WEIGHT * (unit @ unit[rejected]), atol=1e-5)


def test_the_top_k_view_keeps_exclusions_out_however_much_an_item_is_raised():
    rows, table, users, histories, sequence_vectors = catalogue_inputs(1)
    rule = ScoringRule(Adjustments(cooccurrence_weight=50.0))
    catalogue = catalogue_of(rows)
    history = [f"i{n:03d}" for n in histories[0]]
    raised = catalogue.top_k(rule, users[0], 5, history, table)
    excluded = {raised[0].item_id}
    again = catalogue.top_k(rule, users[0], 5, history, table, exclude_ids=excluded)
    assert raised[0].item_id not in {item.item_id for item in again} and len(again) == 5


@pytest.mark.parametrize("adjustments", [Adjustments(), RULE.adjustments, Adjustments(-4.0, 0.8, 1.6, 1.5)])
def test_the_terms_combine_to_the_dense_scores(adjustments):
    rows, table, users, histories, sequence_vectors = catalogue_inputs(2)
    rule = ScoringRule(adjustments, RULE.cooccurrence_recency, RULE.history_vector_recency)
    terms = ScoreTerms.of(RULE, query_rows(users) @ rows.T, rows[:, :DIM], histories, table, sequence_vectors)
    np.testing.assert_allclose(terms.combine(adjustments),
                               rule.dense_scores(users, rows, histories, table, sequence_vectors), atol=1e-5)


def test_adjustments_follow_the_formula():
    table = CooccurrenceTable.from_sequences([[1, 5], [2, 6], [2, 6]], 10, window=1)
    rule = ScoringRule(Adjustments(history_item_score=-1.0, cooccurrence_weight=0.5), Recency(2, 0.5))
    items, values = rule.adjustments_of([1, 2, 1, 3], table)  # oldest first: the latest two are 1 and 3
    got = dict(zip(items.tolist(), values.tolist()))
    # 1, 2 and 3 are history items; 5 co-occurs with 1 (the second latest, decay 0.5): 0.5 * 0.5 * log(2);
    # 2's neighbour 6 is older than the two latest and is not read.
    assert got == pytest.approx({1: -1.0, 2: -1.0, 3: -1.0, 5: 0.25 * np.log(2.0)})


def test_the_query_adds_the_weighted_history_and_sequence_vectors():
    rng = np.random.default_rng(3)
    user, history, sequence = rng.normal(size=(1, DIM)), rng.normal(size=(3, DIM)), rng.normal(size=(1, DIM))
    rule = ScoringRule(Adjustments(history_vector_weight=0.5, sequence_weight=2.0), history_vector_recency=Recency(2, 0.5))
    expected = user[0] + 0.5 * (history[2] + 0.5 * history[1]) + 2.0 * sequence[0]
    np.testing.assert_allclose(rule.query(user, [history], sequence)[0], expected, rtol=1e-5)
    with pytest.raises(ValueError, match="sequence"):
        rule.query(user, [history])
