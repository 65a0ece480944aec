"""The item co-occurrence table and score (llmrec.cooccurrence), shared by evaluation and the server."""

import numpy as np
import pytest

from llmrec.cooccurrence import CooccurrenceTable


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
