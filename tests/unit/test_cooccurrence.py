"""The item co-occurrence table and score (llmrec.cooccurrence), shared by evaluation and the server."""

import numpy as np
import pytest

from llmrec.cooccurrence import DONORS, Borrowers, CooccurrenceTable


def dense(table: CooccurrenceTable) -> np.ndarray:
    out = np.zeros((table.num_items, table.num_items))
    rows, cols, counts = table.counts()
    out[rows, cols] = counts
    return out


def test_counts_pairs_within_the_window_in_both_orders_without_self_pairs():
    table = CooccurrenceTable.from_sequences([[0, 1, 2, 0], [1, 2]], num_items=4, window=2)
    counts = dense(table)
    # pairs at distance 1: (0,1) (1,2) (2,0) and (1,2); distance 2: (0,2) (1,0); 0 with itself at distance 3: none
    assert counts[1, 2] == counts[2, 1] == 2
    assert counts[0, 1] == counts[1, 0] == 2
    assert counts[0, 2] == counts[2, 0] == 2
    assert counts[3].sum() == 0 and np.diag(counts).sum() == 0
    assert table.weights == pytest.approx(np.log1p(counts[counts > 0]))


def test_scores_weight_recent_items_more_and_look_back_a_fixed_number_of_items():
    table = CooccurrenceTable.from_sequences([[0, 5], [1, 6], [2, 7]], num_items=8, window=1)
    items, scores = table.scores([0, 1, 2], recent_items=2, recency_decay=0.5)
    got = dict(zip(items.tolist(), scores.tolist()))
    # 2 is the latest (weight 1), 1 the one before (0.5), 0 is out of the window.
    assert got == pytest.approx({7: np.log(2), 6: 0.5 * np.log(2)})
    assert table.scores([], recent_items=2)[0].size == 0


def test_renumbering_keeps_counts_and_drops_missing_items(tmp_path):
    table = CooccurrenceTable.from_sequences([[0, 1, 2], [0, 1]], num_items=3, window=1)
    moved = table.renumber(np.array([2, 0, -1]), num_new_items=4)  # 0 -> 2, 1 -> 0, 2 dropped
    counts = dense(moved)
    assert counts[2, 0] == counts[0, 2] == 2 and counts.sum() == 4
    moved.save(tmp_path / "table.npz")
    loaded = CooccurrenceTable.load(tmp_path / "table.npz")
    assert np.array_equal(dense(loaded), counts)


def test_a_borrower_scores_the_weighted_sum_of_its_donors_scores():
    rng = np.random.default_rng(3)
    table = CooccurrenceTable.from_sequences([rng.integers(0, 50, size=8).tolist() for _ in range(80)], 50)
    donors = rng.integers(0, 50, size=(30, DONORS))
    weights = rng.uniform(0, 0.1, size=(30, DONORS)).astype(np.float32)
    borrowers = Borrowers(np.arange(100, 130), donors, weights)
    rows, values = table.scores([3, 17, 42])
    items, borrowed = borrowers.scores(rows, values)
    score_of = dict(zip(rows.tolist(), values.tolist()))
    expected = np.array([sum(w * score_of.get(int(d), 0.0) for d, w in zip(donors[n], weights[n])) for n in range(30)])
    assert items.tolist() == (100 + np.flatnonzero(expected > 0)).tolist()
    np.testing.assert_allclose(borrowed, expected[expected > 0], rtol=1e-6)
    assert borrowers.scores(rows[:0], values[:0])[0].size == 0 and Borrowers.none().scores(rows, values)[0].size == 0
