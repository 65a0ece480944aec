"""The history vector (llmrec.history_vector): a decayed sum of the most recent items' vectors."""

import numpy as np

from llmrec.history_vector import history_vector


def test_the_latest_item_weighs_most_and_only_the_most_recent_count():
    vectors = np.eye(4, dtype=np.float32)  # oldest first
    np.testing.assert_allclose(history_vector(vectors, recent_items=3, recency_decay=0.5), [0, 0.25, 0.5, 1.0])


def test_an_empty_history_or_window_gives_zeros():
    assert not history_vector(np.zeros((0, 3)), 5, 0.9).any()
    assert not history_vector(np.eye(3), 0, 0.9).any()
